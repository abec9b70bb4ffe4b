//! The shipped example configurations: they load, show exactly the defaults and cover every setting.

use std::collections::BTreeSet;

use super::*;

const EXAMPLE: &str = include_str!("../../../deploy/config.example.toml");

/// The example with every commented-out setting and section header put back in: a `#` line whose
/// rest parses as TOML on its own (`key = value`, `[section]`, `[[array]]`); prose does not.
fn uncommented_example() -> String {
    EXAMPLE
        .lines()
        .map(|line| match line.trim_start().strip_prefix('#') {
            Some(rest) if rest.trim().parse::<toml::Table>().is_ok() && !rest.trim().is_empty() => {
                rest.trim()
            }
            _ => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The dotted path of every setting in `value`: a map keyed by data (`ivs.assume_roles`), an array
/// of values or a null is a setting of its own; entries of an array of tables are `name[i]`.
fn setting_paths(value: &serde_json::Value, prefix: &str, paths: &mut BTreeSet<String>) {
    match value {
        serde_json::Value::Object(fields) if !fields.is_empty() && prefix != "ivs.assume_roles" => {
            for (name, field) in fields {
                let path = if prefix.is_empty() {
                    name.clone()
                } else {
                    format!("{prefix}.{name}")
                };
                setting_paths(field, &path, paths);
            }
        }
        serde_json::Value::Array(entries)
            if !entries.is_empty() && entries.iter().all(serde_json::Value::is_object) =>
        {
            for (index, entry) in entries.iter().enumerate() {
                setting_paths(entry, &format!("{prefix}[{index}]"), paths);
            }
        }
        _ => {
            paths.insert(prefix.to_owned());
        }
    }
}

/// [`setting_paths`] of a TOML document.
fn toml_paths(value: &toml::Value, prefix: &str, paths: &mut BTreeSet<String>) {
    match value {
        toml::Value::Table(fields) if !fields.is_empty() && prefix != "ivs.assume_roles" => {
            for (name, field) in fields {
                let path = if prefix.is_empty() {
                    name.clone()
                } else {
                    format!("{prefix}.{name}")
                };
                toml_paths(field, &path, paths);
            }
        }
        toml::Value::Array(entries)
            if entries.iter().all(toml::Value::is_table) && !entries.is_empty() =>
        {
            for (index, entry) in entries.iter().enumerate() {
                toml_paths(entry, &format!("{prefix}[{index}]"), paths);
            }
        }
        _ => {
            paths.insert(prefix.to_owned());
        }
    }
}

pub(super) fn paths_of(config: &Config) -> BTreeSet<String> {
    let mut paths = BTreeSet::new();
    setting_paths(&serde_json::to_value(config).unwrap(), "", &mut paths);
    paths
}

#[test]
fn the_shipped_example_config_shows_exactly_the_defaults() {
    let example = load_str(EXAMPLE).unwrap();
    assert_eq!(
        serde_json::to_value(&example).unwrap(),
        serde_json::to_value(Config::default()).unwrap()
    );
}

#[test]
fn the_example_config_covers_the_whole_config() {
    // Every optional section filled in, so its fields are listed too.
    let whole = Config {
        tls: Some(TlsConfig {
            max_handshakes_per_peer: default_max_handshakes_per_peer(),
            cert_file: "c".into(),
            key_file: "k".into(),
            client_ca_file: Some("ca".into()),
            handshake_timeout: default_handshake_timeout(),
            max_concurrent_handshakes: default_max_concurrent_handshakes(),
        }),
        rate_limits: vec![Limit {
            name: "per-caller".into(),
            key: LimitKey::Caller,
            rate: Rate::parse("1/s").unwrap(),
            burst: NonZeroU32::MIN,
            shadow: false,
        }],
        ..Config::default()
    };
    let expected = paths_of(&whole);

    // Every key of the example, commented out or not, is a setting (unknown keys are refused) ...
    let uncommented = uncommented_example();
    let _: Config = Figment::new()
        .merge(Toml::string(&uncommented))
        .extract()
        .map_err(describe)
        .unwrap();
    // ... and every setting has its line.
    let table: toml::Table = uncommented.parse().unwrap();
    let mut listed = BTreeSet::new();
    toml_paths(&toml::Value::Table(table), "", &mut listed);
    let missing: Vec<_> = expected
        .iter()
        .filter(|path| !listed.contains(*path))
        .collect();
    assert!(
        missing.is_empty(),
        "deploy/config.example.toml lacks {missing:?}"
    );
}

#[test]
fn the_production_example_config_is_valid() {
    let config = load_str(include_str!(
        "../../../deploy/config.production.example.toml"
    ))
    .unwrap();
    assert!(!config.identity.allow_anonymous);
    assert_eq!(config.identity.sources, [IdentitySource::Mtls]);
    assert!(config.tls.is_some());
}
