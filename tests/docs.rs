//! The documentation, executed: every fenced example of README.md and docs/**/*.md runs here, and the
//! configuration reference is checked against the code.
//!
//! How each kind of block is run:
//! - `sh`, `bash`: each command in one bash per page (variables and files carry over from block to
//!   block), in a scratch directory holding `deploy/`, `proto/` and `target/` of this checkout. Every
//!   command must exit 0 (with `<!-- docs-test: fails -->`, the last one must not).
//! - `console`: `$ command` lines run the same way; the lines after one are its expected output.
//! - `toml`: a configuration (its top-level keys are settings) goes through `--check-config`, then the
//!   binary starts with it and stops on SIGTERM (with `serve`, it stays up as the page's server; with
//!   `file` alone, it is only written, for a later command to check or start: it may be broken on
//!   purpose). Other TOML (a key set, SigV4 credentials) must name its file with `file`.
//! - `json` and `yaml` are parsed; `python` runs with the AWS clients' virtualenv's python (with `file`,
//!   it is only written and compiled, for a later command to run); `cedar` is loaded as a policy through
//!   `--check-config`.
//! - `text` is shown, not run, unless it is an expected output.
//!
//! The servers: `cargo run …` and `chat-token-service …` (without a one-shot subcommand) start the binary
//! under test in the background on `127.0.0.1:0` with the line's environment variables and arguments;
//! `cargo run --example ivschat_stub` starts the IVS Chat stub. The docs name them `127.0.0.1:50051` and
//! `127.0.0.1:4566` (and Redis `127.0.0.1:6379`): commands and code get the real addresses. A page whose
//! command names `127.0.0.1:50051` before starting a server gets one on the embedded defaults, as after
//! the README's `cargo run`. One-shot `cargo run -- ARGS` runs the binary under test with ARGS.
//!
//! Directives, an HTML comment right before a fence:
//! - `<!-- docs-test: skip (why) -->`: not run (needs AWS, a cluster, a code change); counted and listed.
//! - `<!-- docs-test: output -->` on `json` or `text`: what the previous command printed (stdout and
//!   stderr). JSON: the same keys and types, strings equal; `…` in a string or a line stands for anything,
//!   and any timestamp matches any timestamp. Text: every line, in order, among the lines printed.
//! - `<!-- docs-test: file PATH -->`: the block is also written to PATH (relative to the scratch
//!   directory).
//! - `<!-- docs-test: fails -->`: the block's last command must fail.
//! - `<!-- docs-test: serve -->` on a configuration: it becomes the page's server.
//!
//! Missing tools (grpcurl, the AWS CLI, boto3, pyseto in the virtualenv tests/run.sh makes) fail the
//! test: run tests/run.sh.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    fs,
    io::{BufRead, BufReader, Write as _},
    net::SocketAddr,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use chat_token_service::config::{Config, TlsConfig};
use common::{ivs_stub::IvsStub, redis_server::RedisServer};
use serde_json::{Value, json};

const BINARY: &str = env!("CARGO_BIN_EXE_chat-token-service");
/// Where the docs' examples reach the service, the IVS Chat stub and Redis.
const DOCS_SERVICE: &str = "127.0.0.1:50051";
const DOCS_STUB: &str = "127.0.0.1:4566";
const DOCS_REDIS: &str = "127.0.0.1:6379";
/// The longest one command may take (the AWS CLI starts in about a second).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
const SYSTEM_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// `text` with each placeholder of `named` replaced by its address, in one pass: an address put in is
/// never read again as a placeholder (the service on 127.0.0.1:63790 stays whole where Redis's placeholder
/// is 127.0.0.1:6379).
fn substitute(text: &str, named: &[(&str, String)]) -> String {
    let marker = |i: usize| format!("\u{1}{i}\u{1}");
    let mut text = text.to_owned();
    for (i, (placeholder, _)) in named.iter().enumerate() {
        text = text.replace(placeholder, &marker(i));
    }
    for (i, (_, addr)) in named.iter().enumerate() {
        text = text.replace(&marker(i), addr);
    }
    text
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// README.md and every page under docs/, sorted.
fn pages() -> Vec<PathBuf> {
    fn walk(dir: &Path, pages: &mut Vec<PathBuf>) {
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, pages);
            } else if path.extension().is_some_and(|e| e == "md") {
                pages.push(path);
            }
        }
    }
    let mut pages = vec![root().join("README.md")];
    walk(&root().join("docs"), &mut pages);
    pages.sort();
    pages
}

fn page_name(path: &Path) -> String {
    path.strip_prefix(root()).unwrap().display().to_string()
}

// ---------------------------------------------------------------------------------------------------
// The configuration reference
// ---------------------------------------------------------------------------------------------------

/// What the code says a setting's default is.
#[derive(Debug, PartialEq)]
enum CodeDefault {
    /// Must be given when its section is (a `[tls]` file, a rate limit's fields).
    Required,
    Value(Value),
}

/// Every setting path (`identity.sigv4.regions`, `tls.cert_file`, `rate_limits[].burst`) and its default,
/// from the code: `Config::default()` serialised, plus the fields of the optional sections (`tls`, a
/// `[[rate_limits]]` entry) as serde fills them in from their required fields alone.
fn settings_from_code() -> BTreeMap<String, CodeDefault> {
    let mut settings = BTreeMap::new();
    let defaults = serde_json::to_value(Config::default()).unwrap();
    collect_settings(&defaults, "", &mut settings);
    // Optional sections: the fields serde requires, then each other field's default.
    type Parse = fn(Value) -> Option<Value>;
    let sections: [(&str, Value, Parse); 3] = [
        ("tls", json!({"cert_file": "c", "key_file": "k"}), |v| {
            serde_json::from_value::<TlsConfig>(v)
                .ok()
                .map(|t| serde_json::to_value(t).unwrap())
        }),
        (
            "rate_limits[]",
            json!({"name": "n", "key": "caller", "rate": "1/s", "burst": 1}),
            |v| {
                let config = json!({ "rate_limits": [v] });
                serde_json::from_value::<Config>(config)
                    .ok()
                    .map(|c| serde_json::to_value(&c.rate_limits[0]).unwrap())
            },
        ),
        (
            "end_user.issuers[]",
            json!({"issuer": "https://id.example.com", "audiences": ["app"]}),
            |v| {
                let config = json!({ "end_user": { "issuers": [v] } });
                serde_json::from_value::<Config>(config)
                    .ok()
                    .map(|c| serde_json::to_value(&c.end_user.issuers[0]).unwrap())
            },
        ),
    ];
    for (section, required, parse) in sections {
        let filled = parse(required.clone()).expect("the required fields alone make a section");
        settings.remove(section.trim_end_matches("[]"));
        for (field, value) in filled.as_object().unwrap() {
            let path = format!("{section}.{field}");
            let mut without = required.clone();
            let default = if without.as_object_mut().unwrap().remove(field).is_some() {
                assert!(parse(without).is_none(), "{path} is not required after all");
                CodeDefault::Required
            } else {
                CodeDefault::Value(value.clone())
            };
            settings.insert(path, default);
        }
    }
    settings
}

fn collect_settings(value: &Value, prefix: &str, settings: &mut BTreeMap<String, CodeDefault>) {
    match value {
        // A map keyed by data (account id → role) is one setting.
        Value::Object(fields) if prefix != "ivs.assume_roles" => {
            for (name, field) in fields {
                let path = if prefix.is_empty() {
                    name.clone()
                } else {
                    format!("{prefix}.{name}")
                };
                collect_settings(field, &path, settings);
            }
        }
        _ => {
            settings.insert(prefix.to_owned(), CodeDefault::Value(value.clone()));
        }
    }
}

/// The rows of docs/configuration.md's tables: `| \`setting\` | default | meaning |`.
fn settings_in_reference(page: &str) -> Vec<(String, String, usize)> {
    let mut rows = Vec::new();
    for (index, line) in page.lines().enumerate() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // ["", "`setting`", "default", "meaning", ""]
        if cells.len() < 4 || !cells[0].is_empty() {
            continue;
        }
        let Some(setting) = cells[1].strip_prefix('`').and_then(|s| s.strip_suffix('`')) else {
            continue;
        };
        rows.push((setting.to_owned(), cells[2].to_owned(), index + 1));
    }
    rows
}

/// Whether the reference's default cell says what the code does: a TOML value in backticks (durations
/// compared as durations), `none` for a setting without a default, `required`.
fn default_matches(cell: &str, code: &CodeDefault) -> Result<(), String> {
    match code {
        CodeDefault::Required => (cell == "required")
            .then_some(())
            .ok_or_else(|| "should say `required`".into()),
        CodeDefault::Value(Value::Null) => (cell
            .strip_prefix("none")
            .is_some_and(|rest| !rest.starts_with(char::is_alphanumeric)))
        .then_some(())
        .ok_or_else(|| "should start with `none` (no default)".into()),
        CodeDefault::Value(expected) => {
            let literal = cell
                .strip_prefix('`')
                .and_then(|c| c.split_once('`'))
                .map(|(literal, _)| literal)
                .ok_or_else(|| format!("should start with the default in backticks: {expected}"))?;
            let table: toml::Table = format!("v = {literal}")
                .parse()
                .map_err(|e| format!("`{literal}` is not a TOML value: {e}"))?;
            let documented = serde_json::to_value(&table["v"]).unwrap();
            let same = documented == *expected
                || matches!((&documented, expected), (Value::String(a), Value::String(b))
                    if humantime::parse_duration(a).ok().is_some_and(|a| Some(a) == humantime::parse_duration(b).ok()));
            same.then_some(())
                .ok_or_else(|| format!("says {documented}, the code {expected}"))
        }
    }
}

#[test]
fn the_configuration_reference_lists_every_setting_with_the_codes_default() {
    let path = root().join("docs/configuration.md");
    let page = fs::read_to_string(&path).unwrap();
    let code = settings_from_code();
    let rows = settings_in_reference(&page);
    let mut problems = Vec::new();

    let mut documented = BTreeSet::new();
    for (setting, cell, line) in &rows {
        if !documented.insert(setting.clone()) {
            problems.push(format!("line {line}: {setting} is listed twice"));
        }
        match code.get(setting) {
            None => problems.push(format!(
                "line {line}: {setting} is not a setting of the code (src/config.rs)"
            )),
            Some(default) => {
                if let Err(why) = default_matches(cell, default) {
                    problems.push(format!("line {line}: {setting}: default {why}"));
                }
            }
        }
    }
    for (setting, default) in &code {
        if !documented.contains(setting) {
            problems.push(format!(
                "{setting} (default {default:?}) has no row in docs/configuration.md"
            ));
        }
    }
    // Every section has its heading, as it is written in a file.
    for section in [
        "[identity]",
        "[identity.sigv4]",
        "[end_user]",
        "[[end_user.issuers]]",
        "[tls]",
        "[http_api]",
        "[transport]",
        "[policy]",
        "[ivs]",
        "[local_issuer]",
        "[[rate_limits]]",
        "[limiter]",
        "[moderation]",
    ] {
        if !page.contains(&format!("`{section}`")) {
            problems.push(format!("the section {section} is not named"));
        }
    }
    assert!(
        problems.is_empty(),
        "docs/configuration.md and src/config.rs disagree:\n{}",
        problems.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------------
// Pages: size and links
// ---------------------------------------------------------------------------------------------------

/// Pages another branch writes; links to them are expected to dangle here.
const PAGES_OF_ANOTHER_BRANCH: [&str; 2] = ["docs/deploy.md", "docs/operations.md"];

#[test]
fn pages_are_short_and_their_links_resolve() {
    let mut problems = Vec::new();
    let pages = pages();
    for page in &pages {
        let name = page_name(page);
        let text = fs::read_to_string(page).unwrap();
        let limit = if name == "README.md" { 250 } else { 420 };
        let lines = text.lines().count();
        if lines > limit {
            problems.push(format!("{name}: {lines} lines, more than {limit}"));
        }
        for (line, target) in links(&text) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let (file, anchor) = target.split_once('#').unwrap_or((&target, ""));
            let file = if file.is_empty() {
                page.clone()
            } else {
                page.parent().unwrap().join(file)
            };
            let file = normalise(&file);
            let relative = file
                .strip_prefix(root())
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            if PAGES_OF_ANOTHER_BRANCH.contains(&relative.as_str()) {
                continue;
            }
            if !file.exists() {
                problems.push(format!("{name}:{line}: {target}: no such file"));
                continue;
            }
            if !anchor.is_empty() && file.extension().is_some_and(|e| e == "md") {
                let anchors = anchors(&fs::read_to_string(&file).unwrap());
                if !anchors.contains(anchor) {
                    problems.push(format!("{name}:{line}: {target}: no such heading"));
                }
            }
        }
    }
    // Every page is reachable from the README.
    let readme = fs::read_to_string(root().join("README.md")).unwrap();
    let linked: BTreeSet<String> = links(&readme)
        .into_iter()
        .map(|(_, t)| t.split('#').next().unwrap().to_owned())
        .collect();
    for page in &pages {
        let name = page_name(page);
        let reachable = name == "README.md"
            || linked.contains(&name)
            || (name.starts_with("docs/dev/")
                && pages.iter().any(|p| {
                    fs::read_to_string(p)
                        .unwrap()
                        .contains(name.trim_start_matches("docs/"))
                }));
        if !reachable {
            problems.push(format!("{name} is not linked from README.md"));
        }
    }
    for page in PAGES_OF_ANOTHER_BRANCH {
        if !linked.contains(page) {
            problems.push(format!("README.md should link to {page}"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// `[text](target)` links outside code, with their line numbers.
fn links(text: &str) -> Vec<(usize, String)> {
    let mut links = Vec::new();
    let mut fenced = false;
    for (index, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        let mut rest = line;
        while let Some(start) = rest.find("](") {
            let after = &rest[start + 2..];
            let Some(end) = after.find(')') else { break };
            links.push((index + 1, after[..end].to_owned()));
            rest = &after[end..];
        }
    }
    links
}

/// GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces to `-`.
fn anchors(text: &str) -> BTreeSet<String> {
    let mut anchors = BTreeSet::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        }
        if fenced || !line.starts_with('#') {
            continue;
        }
        let heading = line.trim_start_matches('#').trim().to_lowercase();
        let mut anchor = String::new();
        for c in heading.chars() {
            if c.is_alphanumeric() || c == '-' || c == '_' {
                anchor.push(c);
            } else if c == ' ' {
                anchor.push('-');
            }
        }
        let mut unique = anchor.clone();
        let mut n = 1;
        while anchors.contains(&unique) {
            unique = format!("{anchor}-{n}");
            n += 1;
        }
        anchors.insert(unique);
    }
    anchors
}

fn normalise(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------------
// Blocks and directives
// ---------------------------------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq)]
enum Directive {
    Skip(String),
    Output,
    File(String),
    Fails,
    Serve,
}

#[derive(Debug)]
struct Block {
    /// Line of the opening fence, from 1.
    line: usize,
    lang: String,
    body: String,
    directives: Vec<Directive>,
}

impl Block {
    fn has(&self, directive: &Directive) -> bool {
        self.directives.contains(directive)
    }

    fn file(&self) -> Option<&str> {
        self.directives.iter().find_map(|d| match d {
            Directive::File(path) => Some(path.as_str()),
            _ => None,
        })
    }
}

/// The fenced blocks of a page with their directives; a malformed or stray directive is an error.
fn blocks(text: &str) -> Result<Vec<Block>, String> {
    let mut blocks = Vec::new();
    let mut pending: Vec<Directive> = Vec::new();
    let mut lines = text.lines().enumerate();
    while let Some((index, line)) = lines.next() {
        let trimmed = line.trim();
        if let Some(rest) = trimmed.strip_prefix("<!-- docs-test:") {
            let rest = rest
                .strip_suffix("-->")
                .ok_or_else(|| format!("line {}: a directive ends with -->", index + 1))?
                .trim();
            let (verb, argument) = rest.split_once(' ').unwrap_or((rest, ""));
            let argument = argument.trim();
            pending.push(match verb {
                "skip" => {
                    let reason = argument
                        .strip_prefix('(')
                        .and_then(|r| r.strip_suffix(')'))
                        .filter(|r| !r.trim().is_empty())
                        .ok_or_else(|| {
                            format!("line {}: skip needs a reason: skip (why)", index + 1)
                        })?;
                    Directive::Skip(reason.to_owned())
                }
                "output" => Directive::Output,
                "fails" => Directive::Fails,
                "serve" => Directive::Serve,
                "file" if !argument.is_empty() => Directive::File(argument.to_owned()),
                _ => return Err(format!("line {}: unknown directive {rest:?}", index + 1)),
            });
            continue;
        }
        if let Some(info) = line.strip_prefix("```") {
            let lang = info.split_whitespace().next().unwrap_or("").to_lowercase();
            let mut body = String::new();
            let mut closed = false;
            for (_, line) in lines.by_ref() {
                if line.trim_end() == "```" {
                    closed = true;
                    break;
                }
                body.push_str(line);
                body.push('\n');
            }
            if !closed {
                return Err(format!("line {}: the fence is never closed", index + 1));
            }
            blocks.push(Block {
                line: index + 1,
                lang,
                body,
                directives: std::mem::take(&mut pending),
            });
            continue;
        }
        if !pending.is_empty() {
            return Err(format!(
                "line {}: a docs-test directive must be right before a fence",
                index + 1
            ));
        }
    }
    Ok(blocks)
}

// ---------------------------------------------------------------------------------------------------
// Shell words and commands
// ---------------------------------------------------------------------------------------------------

/// Whether `text` is a whole shell command: quotes closed, no trailing `\`, here-documents ended,
/// compound commands (`for … do … done`, `if … fi`, `case … esac`, `{ … }`) closed.
fn is_complete(text: &str) -> bool {
    let (mut single, mut double) = (false, false);
    let mut continued = false;
    let mut heredoc: Option<String> = None;
    let mut depth = 0i32;
    for line in text.split_inclusive('\n') {
        if let Some(word) = &heredoc {
            if line.trim() == word {
                heredoc = None;
            }
            continue;
        }
        continued = false;
        let mut starts_heredoc = None;
        let mut chars = line.chars().peekable();
        let mut word = String::new();
        let mut quoted_word = false;
        let end_word = |word: &mut String, quoted: &mut bool, depth: &mut i32| {
            if !*quoted {
                match word.as_str() {
                    "do" | "if" | "case" | "{" => *depth += 1,
                    "done" | "fi" | "esac" | "}" => *depth -= 1,
                    _ => {}
                }
            }
            word.clear();
            *quoted = false;
        };
        while let Some(c) = chars.next() {
            if single || double {
                match c {
                    '\'' if single => single = false,
                    '"' if double => double = false,
                    '\\' if double => {
                        chars.next();
                    }
                    _ => {}
                }
                continue;
            }
            match c {
                '\\' => match chars.next() {
                    Some('\n') | None => continued = true,
                    Some(_) => quoted_word = true,
                },
                '\'' => {
                    single = true;
                    quoted_word = true;
                }
                '"' => {
                    double = true;
                    quoted_word = true;
                }
                '#' if word.is_empty() && !quoted_word => break,
                '<' if chars.peek() == Some(&'<') => {
                    chars.next();
                    let rest: String = chars.clone().collect();
                    let marker: String = rest
                        .trim_start_matches('-')
                        .trim_start()
                        .trim_start_matches(['\'', '"'])
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    if !marker.is_empty() {
                        starts_heredoc = Some(marker);
                    }
                }
                c if c.is_whitespace() || matches!(c, ';' | '|' | '&' | '(' | ')') => {
                    end_word(&mut word, &mut quoted_word, &mut depth);
                }
                c => word.push(c),
            }
        }
        end_word(&mut word, &mut quoted_word, &mut depth);
        if starts_heredoc.is_some() {
            heredoc = starts_heredoc;
        }
    }
    !single && !double && !continued && heredoc.is_none() && depth <= 0
}

/// A script's commands: lines joined while a command is incomplete; blank lines and comments dropped.
fn commands(script: &str) -> Result<Vec<String>, String> {
    let mut commands = Vec::new();
    let mut current = String::new();
    for line in script.lines() {
        if current.is_empty() && (line.trim().is_empty() || line.trim_start().starts_with('#')) {
            continue;
        }
        current.push_str(line);
        current.push('\n');
        if is_complete(&current) {
            commands.push(std::mem::take(&mut current).trim_end().to_owned());
        }
    }
    if !current.is_empty() {
        return Err(format!("an unfinished command: {current}"));
    }
    Ok(commands)
}

/// The words of a simple command (no pipes, redirections, substitutions), or `None`.
fn simple_words(command: &str) -> Option<Vec<String>> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = command.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some('\n') => {}
                Some(c) => {
                    word.push(c);
                    in_word = true;
                }
                None => {}
            },
            '\'' => {
                in_word = true;
                for c in chars.by_ref() {
                    if c == '\'' {
                        break;
                    }
                    word.push(c);
                }
            }
            '"' => {
                in_word = true;
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '$' | '`' => return None,
                        '\\' => word.push(chars.next()?),
                        c => word.push(c),
                    }
                }
            }
            '#' if !in_word => break,
            '|' | '&' | ';' | '<' | '>' | '(' | ')' | '$' | '`' => return None,
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(word);
    }
    Some(words)
}

/// What a command starts in the background instead of running it.
#[derive(Debug, PartialEq)]
enum Launch {
    Service {
        env: Vec<(String, String)>,
        args: Vec<String>,
    },
    Stub,
}

/// Subcommands and flags that make the binary do one thing and exit.
const ONE_SHOT: [&str; 11] = [
    "generate-key",
    "verify-token",
    "check",
    "health",
    "help",
    "--check-config",
    "--help",
    "-h",
    "--version",
    "-V",
    "-q",
];

fn launch_of(command: &str) -> Result<Option<Launch>, String> {
    let Some(words) = simple_words(command) else {
        return Ok(None);
    };
    let mut env = Vec::new();
    let mut words = words.into_iter().peekable();
    while let Some(word) = words.peek() {
        match word.split_once('=') {
            Some((name, value))
                if !name.is_empty()
                    && name
                        .chars()
                        .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_') =>
            {
                env.push((name.to_owned(), value.to_owned()));
                words.next();
            }
            _ => break,
        }
    }
    let Some(program) = words.next() else {
        return Ok(None);
    };
    let rest: Vec<String> = words.collect();
    let args = match program.as_str() {
        "chat-token-service" => rest,
        "cargo" if rest.first().is_some_and(|w| w == "run") => {
            let mut rest = rest.into_iter().skip(1);
            let mut args = Vec::new();
            while let Some(word) = rest.next() {
                match word.as_str() {
                    "--release" | "-q" | "--quiet" => {}
                    "--example" => {
                        let example = rest.next().unwrap_or_default();
                        if example != "ivschat_stub" {
                            return Err(format!("no stand-in for the example {example}"));
                        }
                        let args: Vec<String> = rest.skip_while(|w| w == "--").collect();
                        if !(args.is_empty() || args == [DOCS_STUB]) {
                            return Err(format!("the stub runs on {DOCS_STUB} in the docs"));
                        }
                        return Ok(Some(Launch::Stub));
                    }
                    "--" => {
                        args.extend(rest.by_ref());
                    }
                    other => return Err(format!("unsupported option of cargo run: {other}")),
                }
            }
            args
        }
        _ => return Ok(None),
    };
    if args.iter().any(|a| ONE_SHOT.contains(&a.as_str())) {
        return Ok(None);
    }
    Ok(Some(Launch::Service { env, args }))
}

// ---------------------------------------------------------------------------------------------------
// Matching output
// ---------------------------------------------------------------------------------------------------

/// `text` with every RFC 3339 timestamp (`2026-11-28T03:59:26Z`, `… 13:00:57+00:00`) as `<time>`.
fn without_times(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::new();
    let mut i = 0;
    let digits = |at: usize, n: usize| {
        at + n <= bytes.len() && bytes[at..at + n].iter().all(u8::is_ascii_digit)
    };
    while i < bytes.len() {
        let date = digits(i, 4)
            && bytes.get(i + 4) == Some(&b'-')
            && digits(i + 5, 2)
            && bytes.get(i + 7) == Some(&b'-')
            && digits(i + 8, 2)
            && matches!(bytes.get(i + 10), Some(b'T' | b' '))
            && digits(i + 11, 2)
            && bytes.get(i + 13) == Some(&b':')
            && digits(i + 14, 2)
            && bytes.get(i + 16) == Some(&b':')
            && digits(i + 17, 2);
        if !date {
            let c = text[i..].chars().next().unwrap();
            out.push(c);
            i += c.len_utf8();
            continue;
        }
        let mut end = i + 19;
        if bytes.get(end) == Some(&b'.') {
            end += 1;
            while end < bytes.len() && bytes[end].is_ascii_digit() {
                end += 1;
            }
        }
        if bytes.get(end) == Some(&b'Z') {
            end += 1;
        } else if matches!(bytes.get(end), Some(b'+' | b'-'))
            && digits(end + 1, 2)
            && bytes.get(end + 3) == Some(&b':')
            && digits(end + 4, 2)
        {
            end += 6;
        }
        out.push_str("<time>");
        i = end;
    }
    out
}

/// Whether `text` matches `pattern`, where `…` stands for any run of characters.
fn glob(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('…').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first) || !text[first.len()..].ends_with(last) {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    true
}

/// Every expected line, in order, among the printed lines.
fn text_matches(expected: &str, actual: &str) -> Result<(), String> {
    let actual = without_times(actual);
    let mut printed = actual.lines().map(str::trim_end);
    for line in without_times(expected).lines().map(str::trim_end) {
        if line.is_empty() {
            continue;
        }
        if !printed.by_ref().any(|printed| glob(line, printed)) {
            return Err(format!("no line (in order) matches {line:?}"));
        }
    }
    Ok(())
}

fn json_values(text: &str) -> Result<Vec<Value>, String> {
    serde_json::Deserializer::from_str(text)
        .into_iter::<Value>()
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())
}

fn json_matches(expected: &Value, actual: &Value, at: &str) -> Result<(), String> {
    match (expected, actual) {
        (Value::Object(e), Value::Object(a)) => {
            let (ek, ak): (BTreeSet<_>, BTreeSet<_>) = (e.keys().collect(), a.keys().collect());
            if ek != ak {
                return Err(format!("{at}: keys {ek:?}, printed {ak:?}"));
            }
            for (key, value) in e {
                json_matches(value, &a[key], &format!("{at}.{key}"))?;
            }
            Ok(())
        }
        (Value::Array(e), Value::Array(a)) => {
            if e.len() != a.len() {
                return Err(format!("{at}: {} entries, printed {}", e.len(), a.len()));
            }
            for (index, (e, a)) in e.iter().zip(a).enumerate() {
                json_matches(e, a, &format!("{at}[{index}]"))?;
            }
            Ok(())
        }
        (Value::String(e), Value::String(a)) => glob(&without_times(e), &without_times(a))
            .then_some(())
            .ok_or_else(|| format!("{at}: {e:?}, printed {a:?}")),
        (e, a) if e == a => Ok(()),
        (e, a) => Err(format!("{at}: {e}, printed {a}")),
    }
}

fn output_matches(lang: &str, expected: &str, actual: &str) -> Result<(), String> {
    if lang != "json" {
        return text_matches(expected, actual);
    }
    let expected = json_values(expected).map_err(|e| format!("the block is not JSON: {e}"))?;
    let actual = json_values(actual).map_err(|e| format!("the output is not JSON: {e}"))?;
    if expected.len() != actual.len() {
        return Err(format!(
            "{} JSON values, printed {}",
            expected.len(),
            actual.len()
        ));
    }
    for (e, a) in expected.iter().zip(&actual) {
        json_matches(e, a, "$")?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------
// Processes: the page's shell, servers
// ---------------------------------------------------------------------------------------------------

/// The virtualenv tests/run.sh makes, with the AWS CLI, boto3, grpcurl and pyseto.
fn venv() -> PathBuf {
    let venv = std::env::var_os("AWS_CLIENTS_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/venv"));
    let have = |tool: &str| venv.join("bin").join(tool).exists();
    let modules = Command::new(venv.join("bin/python"))
        .args(["-c", "import boto3, pyseto, yaml"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        have("aws") && have("grpcurl") && modules,
        "the docs' examples need grpcurl, the AWS CLI, boto3 and pyseto in {}: run tests/run.sh (it \
         installs them), or set AWS_CLIENTS_VENV",
        venv.display()
    );
    venv
}

/// One bash per page: commands run one at a time, their output (stdout and stderr together) kept.
struct Shell {
    child: Child,
    stdin: ChildStdin,
    done: mpsc::Receiver<i32>,
    output: PathBuf,
}

impl Shell {
    fn start(dir: &Path, path: &str) -> Shell {
        let mut child = Command::new("bash")
            .args(["--noprofile", "--norc"])
            .current_dir(dir)
            .env_clear()
            .env("PATH", path)
            .env("HOME", dir)
            .env("LANG", "C.UTF-8")
            // The AWS CLI as on a machine without AWS configuration.
            .env("AWS_CONFIG_FILE", "/dev/null")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("AWS_PAGER", "")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("bash");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let (tx, done) = mpsc::channel();
        std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                if let Some(status) = line.strip_prefix("__docs_test_done__ ") {
                    let _ = tx.send(status.trim().parse().unwrap_or(-1));
                }
            }
        });
        Shell {
            child,
            stdin,
            done,
            output: dir.join(".docs-test-output"),
        }
    }

    /// Runs `command`; its exit status and what it printed.
    fn run(&mut self, command: &str) -> Result<(i32, String), String> {
        let script = format!(
            "{{ {command}\n}} >{out:?} 2>&1 </dev/null; printf '\\n__docs_test_done__ %s\\n' \"$?\"\n",
            out = self.output
        );
        self.stdin
            .write_all(script.as_bytes())
            .map_err(|e| format!("the shell is gone: {e}"))?;
        let status = self
            .done
            .recv_timeout(COMMAND_TIMEOUT)
            .map_err(|e| match e {
                mpsc::RecvTimeoutError::Timeout => format!("no end within {COMMAND_TIMEOUT:?}"),
                mpsc::RecvTimeoutError::Disconnected => {
                    "the page's shell exited (a syntax error, or `exit`?)".to_owned()
                }
            })?;
        let printed = fs::read(&self.output).unwrap_or_default();
        Ok((status, String::from_utf8_lossy(&printed).into_owned()))
    }
}

impl Drop for Shell {
    fn drop(&mut self) {
        // The shell and whatever it left running: its own process group.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// The binary under test, serving in the background.
struct Server {
    child: Child,
    addr: SocketAddr,
    log: mpsc::Receiver<String>,
    startup_log: Vec<String>,
}

impl Server {
    fn start(dir: &Path, args: &[String], env: &[(String, String)]) -> Result<Server, String> {
        let mut child = Command::new(BINARY)
            .args(args)
            .current_dir(dir)
            .env_clear()
            .env("PATH", SYSTEM_PATH)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("CTS_LISTEN_ADDR", "127.0.0.1:0")
            // Nothing in front of it polls its health.
            .env("CTS_SHUTDOWN_DRAIN_DELAY", "0s")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        let (tx, log) = mpsc::channel();
        let stderr = BufReader::new(child.stderr.take().unwrap());
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut startup_log = Vec::new();
        loop {
            match log.recv_timeout(Duration::from_secs(30)) {
                Ok(line) => {
                    let addr = line
                        .split("addr=")
                        .nth(1)
                        .and_then(|rest| rest.split_whitespace().next())
                        .or_else(|| line.split("\"addr\":\"").nth(1)?.split('"').next())
                        .and_then(|addr| addr.parse().ok());
                    startup_log.push(line);
                    if let Some(addr) = addr {
                        return Ok(Server {
                            child,
                            addr,
                            log,
                            startup_log,
                        });
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let status = child.wait().ok();
                    return Err(format!(
                        "the server did not start ({status:?}):\n{}",
                        startup_log.join("\n")
                    ));
                }
            }
        }
    }

    /// SIGTERM, then its exit status must be 0.
    fn stop(mut self) -> Result<(), String> {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().map_err(|e| e.to_string())? {
                let log: Vec<String> = self.log.try_iter().collect();
                return status.success().then_some(()).ok_or_else(|| {
                    format!(
                        "the server exited with {status} after SIGTERM:\n{}",
                        log.join("\n")
                    )
                });
            }
            if Instant::now() > deadline {
                return Err("the server did not stop within 30 s of SIGTERM".into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------------
// Running a page
// ---------------------------------------------------------------------------------------------------

#[derive(Default)]
struct Tally {
    ran: BTreeMap<String, usize>,
    outputs: usize,
    shown: usize,
    skipped: Vec<String>,
    failures: Vec<String>,
}

struct Page<'t> {
    name: String,
    dir: tempfile::TempDir,
    venv: Option<PathBuf>,
    shell: Shell,
    server: Option<Server>,
    stub: Option<(tokio::runtime::Runtime, IvsStub)>,
    redis: Option<RedisServer>,
    /// What the previous command printed, for an `output` block.
    printed: Option<String>,
    /// The address of the server the previous command started: its log names it where the docs say
    /// `127.0.0.1:50051`.
    printed_by_server: Option<String>,
    tally: &'t mut Tally,
}

impl<'t> Page<'t> {
    fn new(name: &str, venv: Option<PathBuf>, tally: &'t mut Tally) -> Page<'t> {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        fs::create_dir(&bin).unwrap();
        std::os::unix::fs::symlink(BINARY, bin.join("chat-token-service")).unwrap();
        fs::write(
            bin.join("cargo"),
            format!(
                "#!/bin/sh\n# The docs test's `cargo run`: the binary under test with the arguments after --.\n\
                 [ \"$1\" = run ] || {{ echo \"docs test: only cargo run runs here: cargo $*\" >&2; exit 2; }}\n\
                 shift\n\
                 while [ $# -gt 0 ]; do case \"$1\" in --release|-q|--quiet) shift;; --) shift; break;; \
                 *) echo \"docs test: unsupported option of cargo run: $1\" >&2; exit 2;; esac; done\n\
                 exec {BINARY:?} \"$@\"\n"
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(bin.join("cargo"), fs::Permissions::from_mode(0o755)).unwrap();
        for linked in ["deploy", "proto", "target"] {
            std::os::unix::fs::symlink(root().join(linked), dir.path().join(linked)).unwrap();
        }
        let mut path = format!("{}:", bin.display());
        if let Some(venv) = &venv {
            write!(path, "{}:", venv.join("bin").display()).unwrap();
        }
        path.push_str(SYSTEM_PATH);
        let shell = Shell::start(dir.path(), &path);
        Page {
            name: name.to_owned(),
            dir,
            venv,
            shell,
            server: None,
            stub: None,
            redis: None,
            printed: None,
            printed_by_server: None,
            tally,
        }
    }

    fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn python(&self) -> PathBuf {
        self.venv
            .as_ref()
            .map(|v| v.join("bin/python"))
            .unwrap_or_else(|| "python3".into())
    }

    /// `text` with the docs' addresses replaced by the real ones, starting what is not running yet.
    fn addresses(&mut self, text: &str) -> Result<String, String> {
        self.addresses_of(text, true)
    }

    /// [`Page::addresses`]; `service: false` leaves the service's address alone (a configuration's own
    /// `listen_addr`: the test starts servers on a port of their own anyway).
    fn addresses_of(&mut self, text: &str, service: bool) -> Result<String, String> {
        // Which placeholders the page's own text names is decided before anything is replaced, and the
        // replacing goes through markers, so a real address that starts like another placeholder (the
        // service on port 45660 reads "127.0.0.1:4566…", the stub's placeholder) is never taken for it.
        let mut named: Vec<(&str, String)> = Vec::new();
        if service && text.contains(DOCS_SERVICE) {
            if self.server.is_none() {
                self.server = Some(Server::start(self.dir.path(), &[], &[])?);
            }
            let addr = self.server.as_ref().unwrap().addr.to_string();
            named.push((DOCS_SERVICE, addr));
        }
        if text.contains(DOCS_STUB) {
            let (_, stub) = self
                .stub
                .as_ref()
                .ok_or("names the IVS Chat stub before `cargo run --example ivschat_stub`")?;
            named.push((DOCS_STUB, stub.addr.to_string()));
        }
        if text.contains(DOCS_REDIS) {
            let redis = self.redis.get_or_insert_with(RedisServer::shared);
            named.push((DOCS_REDIS, redis.addr.to_string()));
        }
        Ok(substitute(text, &named))
    }

    fn write(&self, relative: &str, contents: &str) -> PathBuf {
        let path = self.dir().join(relative.trim_start_matches('/'));
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, contents).unwrap();
        path
    }

    /// Runs one command of a script: a server start, or a command in the page's shell.
    fn command(&mut self, command: &str) -> Result<i32, String> {
        self.printed_by_server = None;
        match launch_of(command)? {
            Some(Launch::Stub) => {
                let runtime = tokio::runtime::Runtime::new().unwrap();
                let stub = runtime.block_on(IvsStub::start());
                self.printed = Some(format!("IVS Chat stub listening on {}", stub.endpoint()));
                self.stub = Some((runtime, stub));
                Ok(0)
            }
            Some(Launch::Service { env, args }) => {
                if let Some(old) = self.server.take() {
                    old.stop()?;
                }
                let mut resolved = Vec::new();
                for (name, value) in env {
                    resolved.push((name, self.addresses(&value)?));
                }
                let server = Server::start(self.dir.path(), &args, &resolved)?;
                self.printed = Some(server.startup_log.join("\n"));
                self.printed_by_server = Some(server.addr.to_string());
                self.server = Some(server);
                Ok(0)
            }
            None => {
                let command = self.addresses(command)?;
                let (status, printed) = self.shell.run(&command)?;
                self.printed = Some(printed);
                Ok(status)
            }
        }
    }

    /// Runs `commands` in order; the last must fail when `fails`, every other must succeed.
    fn script(&mut self, commands: &[(String, Option<String>)], fails: bool) -> Result<(), String> {
        for (index, (command, expected)) in commands.iter().enumerate() {
            let status = self.command(command)?;
            let printed = self.printed.clone().unwrap_or_default();
            let must_fail = fails && index == commands.len() - 1;
            if (status != 0) != must_fail {
                return Err(format!(
                    "`{command}` exited {status}{}:\n{printed}",
                    if must_fail { ", expected to fail" } else { "" }
                ));
            }
            if let Some(expected) = expected {
                let expected = self.expected(expected);
                text_matches(&expected, &printed)
                    .map_err(|e| format!("`{command}` printed something else: {e}:\n{printed}"))?;
            }
        }
        Ok(())
    }

    /// An expected output as the previous command would print it.
    fn expected(&self, expected: &str) -> String {
        match &self.printed_by_server {
            Some(addr) => expected.replace(DOCS_SERVICE, addr),
            None => expected.to_owned(),
        }
    }

    /// Runs `--check-config` on `file`.
    fn check_config(&self, file: &Path) -> Result<(), String> {
        let output = Command::new(BINARY)
            .arg("--check-config")
            .arg("--config")
            .arg(file)
            .current_dir(self.dir())
            .env_clear()
            .env("PATH", SYSTEM_PATH)
            .output()
            .map_err(|e| e.to_string())?;
        output.status.success().then_some(()).ok_or_else(|| {
            format!(
                "--check-config refuses it:\n{}",
                String::from_utf8_lossy(&output.stderr)
            )
        })
    }

    fn block(&mut self, block: &Block) -> Result<(), String> {
        let fails = block.has(&Directive::Fails);
        if let Some(file) = block.file() {
            let contents = self.addresses_of(&block.body, block.lang != "toml")?;
            self.write(file, &contents);
        }
        match block.lang.as_str() {
            "sh" | "bash" | "shell" => {
                let commands = commands(&block.body)?;
                let commands: Vec<_> = commands.into_iter().map(|c| (c, None)).collect();
                self.script(&commands, fails)
            }
            "console" => {
                let mut commands: Vec<(String, Option<String>)> = Vec::new();
                let mut lines = block.body.lines().peekable();
                while let Some(line) = lines.next() {
                    let Some(first) = line.strip_prefix("$ ") else {
                        return Err(format!("console blocks start with `$ `: {line:?}"));
                    };
                    let mut command = format!("{first}\n");
                    while !is_complete(&command) {
                        let next = lines.next().ok_or("an unfinished command")?;
                        command.push_str(next);
                        command.push('\n');
                    }
                    let mut expected = String::new();
                    while let Some(line) = lines.next_if(|l| !l.starts_with("$ ")) {
                        expected.push_str(line);
                        expected.push('\n');
                    }
                    let expected = (!expected.trim().is_empty()).then_some(expected);
                    commands.push((command.trim_end().to_owned(), expected));
                }
                self.script(&commands, fails)
            }
            "toml" => self.toml(block),
            "json" | "text" if block.has(&Directive::Output) => {
                let printed = self
                    .printed
                    .as_deref()
                    .ok_or("an output block with no command before it")?;
                self.tally.outputs += 1;
                output_matches(&block.lang, &self.expected(&block.body), printed).map_err(|e| {
                    format!(
                        "the previous command printed something else: {e}\n--- printed:\n{printed}"
                    )
                })
            }
            "json" => json_values(&block.body)
                .map_err(|e| format!("not JSON: {e}"))
                .and_then(|values| {
                    (!values.is_empty())
                        .then_some(())
                        .ok_or_else(|| "empty".to_owned())
                }),
            "yaml" | "yml" => {
                let file = self.write(".docs-test.yaml", &block.body);
                let status = Command::new(self.python())
                    .args([
                        "-c",
                        "import sys, yaml; list(yaml.safe_load_all(open(sys.argv[1])))",
                    ])
                    .arg(file)
                    .status()
                    .map_err(|e| e.to_string())?;
                status
                    .success()
                    .then_some(())
                    .ok_or_else(|| "not YAML".into())
            }
            "python" => {
                let code = self.addresses(&block.body)?;
                let file = match block.file() {
                    Some(file) => self.dir().join(file),
                    None => self.write(&format!(".docs-test-{}.py", block.line), &code),
                };
                if block.file().is_some() {
                    let output = Command::new(self.python())
                        .args(["-m", "py_compile"])
                        .arg(&file)
                        .output()
                        .map_err(|e| e.to_string())?;
                    return output
                        .status
                        .success()
                        .then_some(())
                        .ok_or_else(|| String::from_utf8_lossy(&output.stderr).into_owned());
                }
                self.script(&[(format!("python3 {}", file.display()), None)], fails)
            }
            "cedar" => {
                let policy = self.write(&format!(".docs-test-{}.cedar", block.line), &block.body);
                let config = self.write(
                    ".docs-test-policy.toml",
                    &format!("[policy]\nfiles = [{:?}]\n", policy.display().to_string()),
                );
                self.check_config(&config)
            }
            "text" => {
                self.tally.shown += 1;
                Ok(())
            }
            other => Err(format!(
                "a `{other}` block cannot run here: mark it <!-- docs-test: skip (why) -->"
            )),
        }
    }

    /// A configuration is checked and started; other TOML is a file that something else reads.
    fn toml(&mut self, block: &Block) -> Result<(), String> {
        let table: toml::Table = block.body.parse().map_err(|e| format!("not TOML: {e}"))?;
        let settings = serde_json::to_value(Config::default()).unwrap();
        let is_config = table.keys().all(|key| settings.get(key).is_some());
        if !is_config {
            return match block.file() {
                Some(_) => Ok(()),
                None => Err(format!(
                    "not a configuration ({:?} are no settings): name its file with <!-- docs-test: file PATH -->",
                    table.keys().collect::<Vec<_>>()
                )),
            };
        }
        let contents = self.addresses_of(&block.body, false)?;
        let file = match block.file() {
            // A later command checks or starts it (it may be broken on purpose).
            Some(_) if !block.has(&Directive::Serve) => return Ok(()),
            Some(file) => self.dir().join(file.trim_start_matches('/')),
            None => self.write(&format!(".docs-test-{}.toml", block.line), &contents),
        };
        self.check_config(&file)?;
        let args = vec!["--config".to_owned(), file.display().to_string()];
        let server = Server::start(self.dir.path(), &args, &[])?;
        self.printed = Some(server.startup_log.join("\n"));
        if block.has(&Directive::Serve) {
            if let Some(old) = self.server.replace(server) {
                old.stop()?;
            }
            Ok(())
        } else {
            server.stop()
        }
    }

    fn run(&mut self, blocks: &[Block]) {
        for block in blocks {
            let kind = if block.lang.is_empty() {
                "(no language)".to_owned()
            } else {
                block.lang.clone()
            };
            if let Some(reason) = block.directives.iter().find_map(|d| match d {
                Directive::Skip(reason) => Some(reason),
                _ => None,
            }) {
                self.tally
                    .skipped
                    .push(format!("{}:{} {kind}: {reason}", self.name, block.line));
                continue;
            }
            let started = Instant::now();
            match self.block(block) {
                Ok(()) => {
                    if block.lang != "text" && !block.has(&Directive::Output) {
                        *self.tally.ran.entry(kind).or_default() += 1;
                    }
                }
                Err(why) => self
                    .tally
                    .failures
                    .push(format!("{}:{} ({kind}): {why}", self.name, block.line)),
            }
            if started.elapsed() > Duration::from_secs(20) {
                eprintln!(
                    "{}:{} took {:.1?}",
                    self.name,
                    block.line,
                    started.elapsed()
                );
            }
        }
        if let Some(server) = self.server.take()
            && let Err(why) = server.stop()
        {
            self.tally.failures.push(format!("{}: {why}", self.name));
        }
    }
}

fn run_page(name: &str, text: &str, venv: Option<PathBuf>, tally: &mut Tally) {
    match blocks(text) {
        Ok(blocks) => Page::new(name, venv, tally).run(&blocks),
        Err(why) => tally.failures.push(format!("{name}: {why}")),
    }
}

#[test]
fn every_example_in_the_docs_runs() {
    let venv = venv();
    let mut tally = Tally::default();
    for page in pages() {
        let text = fs::read_to_string(&page).unwrap();
        run_page(&page_name(&page), &text, Some(venv.clone()), &mut tally);
    }
    let ran: usize = tally.ran.values().sum();
    eprintln!(
        "docs: ran {ran} blocks ({}), checked {} outputs, showed {} text blocks, skipped {}:",
        tally
            .ran
            .iter()
            .map(|(kind, n)| format!("{n} {kind}"))
            .collect::<Vec<_>>()
            .join(", "),
        tally.outputs,
        tally.shown,
        tally.skipped.len()
    );
    for skipped in &tally.skipped {
        eprintln!("  skipped {skipped}");
    }
    assert!(
        tally.failures.is_empty(),
        "{} examples in the docs do not work:\n\n{}",
        tally.failures.len(),
        tally.failures.join("\n\n")
    );
    assert!(ran > 0, "no example ran");
}

/// The runner itself fails what it should: a broken configuration, an output that differs, a block it
/// cannot run, a failing command, a stray directive.
#[test]
fn the_runner_fails_broken_examples() {
    let broken = [
        (
            "an unknown setting",
            "```toml\n[limiter]\nmax_keys = 1\n```\n",
        ),
        (
            "an output that differs",
            "```console\n$ echo hello\ngoodbye\n```\n",
        ),
        (
            "JSON output of another shape",
            "```sh\necho '{\"a\": 1}'\n```\n<!-- docs-test: output -->\n```json\n{\"b\": 1}\n```\n",
        ),
        ("a language it cannot run", "```go\nfunc main() {}\n```\n"),
        ("a failing command", "```sh\nfalse\n```\n"),
        (
            "a command that should fail but works",
            "<!-- docs-test: fails -->\n```sh\ntrue\n```\n",
        ),
        ("a stray directive", "<!-- docs-test: output -->\nprose\n"),
        (
            "a skip without a reason",
            "<!-- docs-test: skip -->\n```go\n```\n",
        ),
        (
            "a server that does not start",
            "```sh\nCTS_ISSUER=nobody cargo run\n```\n",
        ),
    ];
    for (what, page) in broken {
        let mut tally = Tally::default();
        run_page("broken.md", page, None, &mut tally);
        assert!(!tally.failures.is_empty(), "{what} passed");
    }
    let fine = "<!-- docs-test: skip (needs Go) -->\n```go\n```\n\
                ```console\n$ echo hello world\nhello …\n```\n\
                ```sh\necho '{\"at\": \"2026-01-01T00:00:00Z\", \"token\": \"v4.local.abc\"}'\n```\n\
                <!-- docs-test: output -->\n```json\n{\"at\": \"2026-11-28T03:59:26Z\", \"token\": \"v4.local.…\"}\n```\n";
    let mut tally = Tally::default();
    run_page("fine.md", fine, None, &mut tally);
    assert!(tally.failures.is_empty(), "{:?}", tally.failures);
    assert_eq!(tally.skipped.len(), 1);
    assert_eq!(tally.outputs, 1);
}

/// Addresses put into an example are not taken for placeholders: a service on port 63790 or 45660 looks
/// like Redis's or the stub's placeholder followed by a digit (seen as a flaky failure of this test).
#[test]
fn real_addresses_are_never_read_as_placeholders() {
    let text = "grpcurl 127.0.0.1:50051; redis 127.0.0.1:6379; stub 127.0.0.1:4566";
    let named = [
        (DOCS_SERVICE, "127.0.0.1:63790".to_owned()),
        (DOCS_REDIS, "127.0.0.1:45660".to_owned()),
        (DOCS_STUB, "127.0.0.1:50051".to_owned()),
    ];
    assert_eq!(
        substitute(text, &named),
        "grpcurl 127.0.0.1:63790; redis 127.0.0.1:45660; stub 127.0.0.1:50051"
    );
}

#[test]
fn shell_commands_are_split_and_launches_recognised() {
    let script = "# a comment\nA=1 \\\n  cargo run\necho 'a\nb' # c\ncat > f <<'EOF'\nx = \"$y\"\nEOF\n\nfor i in 1 2; do\n  echo \"done $i\"\ndone\nls\n";
    assert_eq!(
        commands(script).unwrap(),
        [
            "A=1 \\\n  cargo run",
            "echo 'a\nb' # c",
            "cat > f <<'EOF'\nx = \"$y\"\nEOF",
            "for i in 1 2; do\n  echo \"done $i\"\ndone",
            "ls"
        ]
    );
    assert_eq!(
        launch_of("CTS_ISSUER=ivs X='a b' cargo run --release -- --config c.toml").unwrap(),
        Some(Launch::Service {
            env: vec![
                ("CTS_ISSUER".into(), "ivs".into()),
                ("X".into(), "a b".into())
            ],
            args: vec!["--config".into(), "c.toml".into()],
        })
    );
    assert_eq!(launch_of("cargo run -- generate-key").unwrap(), None);
    assert_eq!(
        launch_of("chat-token-service --config x.toml --check-config").unwrap(),
        None
    );
    assert_eq!(
        launch_of("echo $TOKEN | chat-token-service verify-token -").unwrap(),
        None
    );
    assert_eq!(
        launch_of("cargo run --example ivschat_stub -- 127.0.0.1:4566").unwrap(),
        Some(Launch::Stub)
    );
    assert_eq!(
        without_times("a 2026-11-28T03:59:26.123Z b 2026-11-28 13:00:57+00:00"),
        "a <time> b <time>"
    );
    assert!(glob("v4.local.…", "v4.local.abc"));
    assert!(!glob("a…c", "ab"));
}
