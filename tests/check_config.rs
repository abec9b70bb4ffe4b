//! `chat-token-service --check-config`: the real binary, real files, no network.

mod common;

use std::{path::Path, process::Command};

use chat_token_service::issuer::local::generate_key;
use common::pki::{Ca, write_server_files};

struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `--check-config` on `config` (TOML) written to `dir`, with only `env` in the environment.
fn check(dir: &Path, config: &str, env: &[(&str, &str)]) -> Outcome {
    let file = dir.join("config.toml");
    std::fs::write(&file, config).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_chat-token-service"))
        .env_clear()
        .envs(env.iter().copied())
        .arg("--config")
        .arg(&file)
        .arg("--check-config")
        .output()
        .unwrap();
    Outcome {
        code: output.status.code(),
        stdout: String::from_utf8(output.stdout).unwrap(),
        stderr: String::from_utf8(output.stderr).unwrap(),
    }
}

fn policy_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/policy")
}

fn key_set(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("keys.toml");
    std::fs::write(
        &path,
        format!("[[keys]]\nkey = \"{}\"\nactive = true\n", generate_key()),
    )
    .unwrap();
    path
}

#[test]
fn a_production_configuration_loads_and_is_summarised() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("check-config CA");
    let (cert, key, client_ca) = write_server_files(dir.path(), &ca.server(), &ca);
    let keys = key_set(dir.path());
    let policy = policy_dir();
    let config = format!(
        r#"
listen_addr = "0.0.0.0:50051"
[tls]
cert_file = {cert:?}
key_file = {key:?}
client_ca_file = {client_ca:?}
[identity]
sources = ["mtls"]
allow_anonymous = false
[policy]
files = [{cedar:?}]
entities_file = {entities:?}
[local_issuer]
keys_file = {keys:?}
[limiter]
backend = "redis"
failure_mode = "fail_closed"
[[rate_limits]]
name = "per-user"
key = "user"
rate = "5/min"
burst = 5
"#,
        cedar = policy.join("production.cedar"),
        entities = policy.join("production.entities.json"),
    );
    // Port 9 (discard) on a documentation address: nothing answers, and nothing may be asked.
    let outcome = check(
        dir.path(),
        &config,
        &[(
            "CTS_LIMITER__REDIS_URL",
            "redis://cts:hunter2-secret@192.0.2.1:9/0",
        )],
    );

    assert_eq!(outcome.code, Some(0), "{}", outcome.stderr);
    let summary = &outcome.stdout;
    assert!(summary.contains("configuration OK"), "{summary}");
    assert!(
        summary.contains("0.0.0.0:50051 gRPC and the IVS Chat HTTP API, TLS")
            && summary.contains("client certificates required"),
        "{summary}"
    );
    assert!(
        summary.contains("sources [mtls]; unidentified callers refused"),
        "{summary}"
    );
    assert!(summary.contains("production.cedar, entities"), "{summary}");
    assert!(
        summary.contains("key set") && summary.contains("active key k4.lid."),
        "{summary}"
    );
    assert!(
        summary.contains("per-user: 5/min per user per room, burst 5"),
        "{summary}"
    );
    assert!(
        summary.contains("Redis at 192.0.2.1:9") && summary.contains("fail_closed"),
        "{summary}"
    );
    assert!(
        !summary.contains("hunter2"),
        "the Redis password was shown: {summary}"
    );
    assert!(
        summary.lines().count() <= 24,
        "more than a screen: {summary}"
    );
}

#[test]
fn every_broken_file_is_named_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate").unwrap();
    let bad_policy = dir.path().join("bad.cedar");
    std::fs::write(
        &bad_policy,
        "permit (principal, action, resource) when { nonsense };",
    )
    .unwrap();
    let keys = dir.path().join("keys.toml");
    std::fs::write(&keys, "[[keys]]\nkey = \"k4.local.short\"\nactive = true\n").unwrap();
    let config = format!(
        r#"
[tls]
cert_file = {garbage:?}
key_file = {garbage:?}
[policy]
files = [{bad_policy:?}]
[local_issuer]
keys_file = {keys:?}
"#
    );

    let outcome = check(dir.path(), &config, &[]);

    assert_eq!(outcome.code, Some(1));
    assert!(outcome.stdout.is_empty(), "{}", outcome.stdout);
    let problems: Vec<&str> = outcome.stderr.lines().collect();
    assert_eq!(problems.len(), 3, "{}", outcome.stderr);
    assert!(
        problems[0].contains("policy.files") && problems[0].contains("bad.cedar"),
        "{}",
        problems[0]
    );
    assert!(
        problems[1].contains("local issuer keys") && problems[1].contains("not a PASERK"),
        "{}",
        problems[1]
    );
    assert!(problems[2].contains("tls.cert_file"), "{}", problems[2]);
    assert!(
        !outcome.stderr.contains("k4.local.short"),
        "key material in an error: {}",
        outcome.stderr
    );
}

#[test]
fn settings_that_do_not_parse_are_named_with_their_source() {
    let dir = tempfile::tempdir().unwrap();

    let outcome = check(dir.path(), "listen_addr = \"nowhere\"", &[]);
    assert_eq!(outcome.code, Some(1));
    assert!(
        outcome.stderr.contains("listen_addr") && outcome.stderr.contains("config.toml"),
        "{}",
        outcome.stderr
    );

    let outcome = check(
        dir.path(),
        "[limiter]\nbackend = \"redis\"",
        &[("CTS_LIMITER__REDIS_URL", "http://cts:hunter2@redis:6379")],
    );
    assert_eq!(outcome.code, Some(1));
    assert!(
        outcome.stderr.contains("limiter.redis_url"),
        "{}",
        outcome.stderr
    );
    assert!(!outcome.stderr.contains("hunter2"), "{}", outcome.stderr);
}

#[test]
fn the_development_defaults_say_what_they_are() {
    let dir = tempfile::tempdir().unwrap();
    let outcome = check(dir.path(), "", &[]);
    assert_eq!(outcome.code, Some(0), "{}", outcome.stderr);
    assert!(
        outcome
            .stdout
            .contains("127.0.0.1:50051 gRPC and the IVS Chat HTTP API, plaintext"),
        "{}",
        outcome.stdout
    );
    assert!(
        outcome.stdout.contains("development policy"),
        "{}",
        outcome.stdout
    );
    assert!(
        outcome.stdout.contains("ephemeral key"),
        "{}",
        outcome.stdout
    );
    assert!(
        outcome.stdout.contains("in memory, per replica"),
        "{}",
        outcome.stdout
    );
}

#[test]
fn it_is_not_combined_with_a_command() {
    let output = Command::new(env!("CARGO_BIN_EXE_chat-token-service"))
        .env_clear()
        .args(["--check-config", "serve"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
}

#[test]
fn the_check_subcommand_is_check_config_with_the_config_before_or_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.toml");
    std::fs::write(&file, "max_request_bytes = 100").unwrap();
    let run = |args: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_chat-token-service"))
            .env_clear()
            .args(args)
            .output()
            .unwrap();
        (
            output.status.code(),
            String::from_utf8(output.stderr).unwrap(),
        )
    };
    let file = file.to_str().unwrap();
    for args in [
        ["check", "--config", file],
        ["--config", file, "check"],
        ["--config", file, "--check-config"],
    ] {
        let (code, stderr) = run(&args);
        assert_eq!(code, Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains("max_request_bytes"), "{args:?}: {stderr}");
    }
    // The same file, fixed, passes the same three ways.
    std::fs::write(file, "max_request_bytes = 9000").unwrap();
    for args in [
        ["check", "--config", file],
        ["--config", file, "check"],
        ["--config", file, "--check-config"],
    ] {
        assert_eq!(run(&args).0, Some(0), "{args:?}");
    }
    let (code, stderr) = run(&["--check-config", "generate-key"]);
    assert_eq!(code, Some(2), "{stderr}");
}
