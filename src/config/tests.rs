use std::num::NonZeroU32;

use super::transport::{
    default_handshake_timeout, default_max_concurrent_handshakes, default_max_handshakes_per_peer,
};
use super::*;
use crate::domain::{LimitKey, Rate};

mod example;

use example::paths_of;

fn load_str(toml: &str) -> Result<Config, ConfigError> {
    let config: Config = Figment::new()
        .merge(Toml::string(toml))
        .extract()
        .map_err(describe)?;
    config.validate()?;
    Ok(config)
}

#[test]
fn an_empty_file_gives_the_documented_defaults() {
    let config = load_str("").unwrap();
    assert_eq!(config.listen_addr, "127.0.0.1:50051".parse().unwrap());
    assert_eq!(config.shutdown_drain_delay, Duration::from_secs(5));
    assert_eq!(config.shutdown_grace_period, Duration::from_secs(20));
    assert_eq!(config.max_request_bytes, 16384);
    assert_eq!(config.issuer, IssuerKind::Local);
    assert_eq!(config.local_issuer.token_ttl, Duration::from_secs(60));
}

#[test]
fn moderation_and_disconnect_quota_settings_are_checked() {
    let err = load_str("[moderation]\nmax_ban_duration = \"0s\"").unwrap_err();
    assert!(
        err.to_string().contains("moderation.max_ban_duration"),
        "{err}"
    );
    assert!(load_str("[moderation]\nmax_ban_duration = \"1s\"").is_ok());
    let err = load_str("[ivs]\ndisconnect_quota_burst = 0").unwrap_err();
    assert!(
        err.to_string().contains("ivs.disconnect_quota_burst"),
        "{err}"
    );
    let err = load_str("[ivs]\ndisconnect_quota = \"fast\"").unwrap_err();
    assert!(err.to_string().contains("ivs.disconnect_quota"), "{err}");
}

#[test]
fn errors_name_the_setting() {
    let err = load_str("listen_addr = \"nowhere\"")
        .unwrap_err()
        .to_string();
    assert!(err.contains("listen_addr"), "{err}");
    let err = load_str("[local_issuer]\ntoken_ttl = \"0s\"")
        .unwrap_err()
        .to_string();
    assert!(err.contains("local_issuer.token_ttl"), "{err}");
    let err = load_str("issuer = \"aws\"").unwrap_err().to_string();
    assert!(err.contains("issuer") && err.contains("local"), "{err}");
    let err = load_str("listen_adr = \"127.0.0.1:1\"")
        .unwrap_err()
        .to_string();
    assert!(err.contains("listen_adr"), "{err}");
}

#[test]
#[allow(clippy::result_large_err)] // figment::Jail's closure returns figment::Error
fn environment_errors_name_the_variable() {
    figment::Jail::expect_with(|jail| {
        jail.set_env("CTS_LISTEN_ADDR", "nowhere");
        let err = Config::load(None).unwrap_err().to_string();
        assert!(err.contains("listen_addr: "), "{err}");
        assert!(
            err.contains("(environment variable CTS_LISTEN_ADDR)"),
            "{err}"
        );
        jail.set_env("CTS_LISTEN_ADDR", "127.0.0.1:1");
        jail.set_env("CTS_LOCAL_ISSUER__TOKEN_TTL", "soon");
        let err = Config::load(None).unwrap_err().to_string();
        assert!(
            err.contains("local_issuer.token_ttl: ") && err.contains("CTS_LOCAL_ISSUER__TOKEN_TTL"),
            "{err}"
        );
        Ok(())
    });
}

#[test]
#[allow(clippy::result_large_err)] // figment::Jail's closure returns figment::Error
fn the_config_file_variable_is_not_a_setting() {
    figment::Jail::expect_with(|jail| {
        jail.create_file("cts.toml", "max_request_bytes = 9000")?;
        jail.set_env("CTS_CONFIG", "cts.toml");
        let config = Config::load(Some(Path::new("cts.toml"))).unwrap();
        assert_eq!(config.max_request_bytes, 9000);
        Ok(())
    });
}

#[test]
#[allow(clippy::result_large_err)] // figment::Jail's closure returns figment::Error
fn file_errors_name_the_file() {
    figment::Jail::expect_with(|jail| {
        jail.create_file("cts.toml", "shutdown_grace_period = 5")?;
        let err = Config::load(Some(Path::new("cts.toml")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("shutdown_grace_period: "), "{err}");
        assert!(err.contains("cts.toml"), "{err}");
        let err = Config::load(Some(Path::new("missing.toml")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.toml"), "{err}");
        Ok(())
    });
}

#[test]
fn the_development_policy_is_refused_off_loopback() {
    let err = load_str("listen_addr = \"0.0.0.0:50051\"")
        .unwrap_err()
        .to_string();
    assert!(err.contains("policy.files"), "{err}");
    load_str(
        "listen_addr = \"0.0.0.0:50051\"\n[policy]\nfiles = [\"p.cedar\"]\n\
         [identity]\nsources = [\"mtls\"]\nallow_anonymous = false\n\
         [tls]\ncert_file = \"c\"\nkey_file = \"k\"\nclient_ca_file = \"ca\"",
    )
    .unwrap();
    load_str("listen_addr = \"[::1]:50051\"").unwrap();
}

#[test]
fn identity_that_believes_anyone_is_refused_off_loopback() {
    let production = "listen_addr = \"0.0.0.0:50051\"\n[policy]\nfiles = [\"p.cedar\"]\n";
    for (identity, named) in [
        (
            "",
            "identity.sources includes \"header\" and identity.allow_anonymous",
        ),
        (
            "sources = [\"xfcc\"]",
            "identity.sources includes \"xfcc\" and identity.allow_anonymous is true",
        ),
        (
            "sources = [\"xfcc\"]\nallow_anonymous = false",
            "identity.sources includes \"xfcc\",",
        ),
        (
            "sources = [\"xfcc\", \"header\"]\nallow_anonymous = false",
            "identity.sources includes \"header\" and identity.sources includes \"xfcc\",",
        ),
    ] {
        let err = load_str(&format!("{production}[identity]\n{identity}"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("identity.trust_network_in_front") && err.contains(named),
            "{err}"
        );
        load_str(&format!(
            "{production}[identity]\n{identity}\ntrust_network_in_front = true"
        ))
        .unwrap();
    }
    // Loopback keeps the embedded defaults working.
    let defaults = load_str("").unwrap();
    assert!(defaults.identity.allow_anonymous);
    assert_eq!(defaults.identity.certificate_names, [CertificateName::Uri]);
    let err = load_str("[identity]\ncertificate_names = []")
        .unwrap_err()
        .to_string();
    assert!(err.contains("identity.certificate_names"), "{err}");
}

#[test]
fn the_mtls_source_needs_a_client_ca() {
    let err = load_str("[identity]\nsources = [\"mtls\"]")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("identity.sources") && err.contains("client_ca_file"),
        "{err}"
    );
    load_str(
        "[identity]\nsources = [\"mtls\"]\n[tls]\ncert_file = \"c\"\nkey_file = \"k\"\nclient_ca_file = \"ca\"",
    )
    .unwrap();
    let err = load_str("[tls]\ncert_file = \"c\"")
        .unwrap_err()
        .to_string();
    assert!(err.contains("key_file"), "{err}");
}

#[test]
fn rate_limits_parse_with_their_defaults() {
    let config = load_str(
        r#"
        [[rate_limits]]
        name = "per-caller"
        key = "caller"
        rate = "100/s"
        burst = 200

        [[rate_limits]]
        name = "per-user"
        key = "user"
        rate = "5/minute"
        burst = 5
        shadow = true
        "#,
    )
    .unwrap();
    let limits = &config.rate_limits;
    assert_eq!(limits.len(), 2);
    assert_eq!(limits[0].description(), "100/s per caller, burst 200");
    assert!(!limits[0].shadow);
    assert_eq!(limits[1].key, LimitKey::User);
    assert!(limits[1].shadow);
    assert_eq!(config.limiter.max_tracked_keys.get(), 1_000_000);
    assert!(load_str("").unwrap().rate_limits.is_empty());
}

/// The `setting` of the `ConfigError::Invalid` that `toml` fails validation with, and its reason.
fn invalid_setting(toml: &str) -> (String, String) {
    match load_str(toml) {
        Err(ConfigError::Invalid { setting, reason }) => (setting, reason),
        other => panic!("expected an invalid setting, got {other:?}"),
    }
}

#[test]
fn rate_limit_errors_name_the_entry_and_field() {
    let entry = |name: &str, rate: &str, burst: u32| {
        format!(
            "[[rate_limits]]\nname = {name:?}\nkey = \"room\"\nrate = {rate:?}\nburst = {burst}\n"
        )
    };
    let three = |third: String| entry("a", "1/s", 1) + &entry("b", "1/s", 1) + &third;

    // Values that do not parse are refused while the file is read, with the setting's path.
    let err = load_str(&three(entry("c", "100/day", 1)))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("rate_limits[2].rate: ") && err.contains("100/day"),
        "{err}"
    );
    let err = load_str(&three(entry("c", "0/s", 1)))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("rate_limits[2].rate: ") && err.contains("at least 1"),
        "{err}"
    );
    let err = load_str(&three(entry("c", "1/s", 0)))
        .unwrap_err()
        .to_string();
    assert!(err.contains("rate_limits[2].burst: "), "{err}");
    let err = load_str("[limiter]\nmax_tracked_keys = 0")
        .unwrap_err()
        .to_string();
    assert!(err.contains("limiter.max_tracked_keys: "), "{err}");
    let err = load_str("[ivs]\nmax_attempts = 0").unwrap_err().to_string();
    assert!(err.contains("ivs.max_attempts: "), "{err}");
    let err = load_str("[ivs]\nquota = \"200/s/s\"")
        .unwrap_err()
        .to_string();
    assert!(err.contains("ivs.quota: "), "{err}");

    // Rules across entries are checked right after.
    let (setting, _) = invalid_setting(&three(entry(" ", "1/s", 1)));
    assert_eq!(setting, "rate_limits[2].name");
    let (setting, reason) = invalid_setting(&three(entry("a", "1/s", 1)));
    assert_eq!(setting, "rate_limits[2].name");
    assert!(reason.contains("unique"), "{reason}");
    let (setting, reason) = invalid_setting(&entry("ivs-quota", "1/s", 1));
    assert_eq!(setting, "rate_limits[0].name");
    assert!(reason.contains("built-in"), "{reason}");

    let err = load_str(&(entry("a", "1/s", 1) + "burts = 2\n"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("burts"), "{err}");
    let err =
        load_str("[[rate_limits]]\nname = \"a\"\nkey = \"user_id\"\nrate = \"1/s\"\nburst = 1")
            .unwrap_err()
            .to_string();
    assert!(err.contains("rate_limits[0].key: "), "{err}");
    assert!(
        err.contains("user_id") && err.contains("caller_room"),
        "{err}"
    );
    let err = load_str("[[rate_limits]]\nname = \"a\"\nkey = \"user\"\nrate = \"1/s\"")
        .unwrap_err()
        .to_string();
    assert!(err.contains("burst"), "{err}");
}

#[test]
fn key_and_keys_file_together_are_refused() {
    let (setting, reason) =
        invalid_setting("[local_issuer]\nkey = \"k4.local.x\"\nkeys_file = \"keys.toml\"");
    assert_eq!(setting, "local_issuer.key");
    assert!(reason.contains("not both"), "{reason}");
}

#[test]
fn redis_settings_are_checked_and_the_url_never_shown() {
    let config = load_str(
        "[limiter]\nbackend = \"redis\"\nredis_url = \"rediss://cts:hunter2@redis.internal:6380/1\"\n\
         failure_mode = \"fail_closed\"\nredis_timeout = \"20ms\"",
    )
    .unwrap();
    assert_eq!(config.limiter.failure_mode, FailureMode::FailClosed);
    assert_eq!(config.limiter.redis_timeout, Duration::from_millis(20));
    assert!(!format!("{config:?}").contains("hunter2"));

    let defaults = load_str("").unwrap().limiter;
    assert_eq!(defaults.backend, LimiterBackend::Memory);
    assert_eq!(defaults.redis_timeout, Duration::from_millis(50));
    assert_eq!(defaults.failure_mode, FailureMode::FailOpen);
    assert_eq!(defaults.key_prefix, "cts");

    for (toml, setting) in [
        ("backend = \"redis\"", "limiter.redis_url"),
        ("redis_url = \"redis://h\"", "limiter.redis_url"),
        (
            "backend = \"redis\"\nredis_url = \"http://:hunter2@h\"",
            "limiter.redis_url",
        ),
        (
            "backend = \"redis\"\nredis_url = \"redis://h\"\nredis_timeout = \"0s\"",
            "limiter.redis_timeout",
        ),
        (
            "backend = \"redis\"\nredis_url = \"redis://h\"\nkey_prefix = \"{a}\"",
            "limiter.key_prefix",
        ),
    ] {
        match load_str(&format!("[limiter]\n{toml}")) {
            Err(ConfigError::Invalid {
                setting: got,
                reason,
            }) => {
                assert_eq!(got, setting, "{toml}");
                assert!(!reason.contains("hunter2"), "{reason}");
            }
            // A value that does not parse is refused while the file is read, naming the setting.
            Err(ConfigError::Parse(problem)) => {
                assert!(problem.starts_with(&format!("{setting}: ")), "{problem}");
                assert!(!problem.contains("hunter2"), "{problem}");
            }
            other => panic!("{toml}: expected {setting} to be refused, got {other:?}"),
        }
    }
}

#[test]
fn the_key_never_shows_in_debug_output() {
    let config = load_str("[local_issuer]\nkey = \"k4.local.very-secret\"").unwrap();
    assert!(!format!("{config:?}").contains("very-secret"));
}

#[test]
fn kubernetes_service_links_are_recognised_by_name_and_value() {
    use super::service_links::is_service_link;
    // What the kubelet injects for Services named `cts`, `cts-redis` (port 6379, named `redis`) and
    // `cts-v6` (an IPv6 cluster IP, UDP).
    for (name, value) in [
        ("CTS_SERVICE_HOST", "10.0.0.11"),
        ("CTS_SERVICE_PORT", "50051"),
        ("CTS_SERVICE_PORT_GRPC", "50051"),
        ("CTS_PORT", "tcp://10.0.0.11:50051"),
        ("CTS_PORT_50051_TCP", "tcp://10.0.0.11:50051"),
        ("CTS_PORT_50051_TCP_PROTO", "tcp"),
        ("CTS_PORT_50051_TCP_PORT", "50051"),
        ("CTS_PORT_50051_TCP_ADDR", "10.0.0.11"),
        ("CTS_REDIS_SERVICE_HOST", "10.0.0.12"),
        ("CTS_REDIS_SERVICE_PORT_REDIS", "6379"),
        ("CTS_REDIS_PORT_6379_TCP_ADDR", "10.0.0.12"),
        ("CTS_V6_PORT", "udp://[fd00::1]:53"),
        ("CTS_V6_PORT_53_UDP", "udp://[fd00::1]:53"),
        ("CTS_V6_SERVICE_HOST", "fd00::1"),
    ] {
        assert!(is_service_link(name, value), "{name}={value}");
    }
    // Names of that shape whose values are not what the kubelet writes stay settings (and are refused as
    // unknown ones), as do settings and near misses.
    for (name, value) in [
        ("CTS_PORT", "50051"),
        ("CTS_SERVICE_HOST", "cts.chat.svc"),
        ("CTS_REDIS_SERVICE_PORT", "six"),
        ("CTS_PORT_50051_TCP", "tcp://10.0.0.11:6379"),
        ("CTS_PORT_50051_TCP_PROTO", "udp"),
        ("CTS_PORT_50051_TCP_PORT", "6379"),
        ("CTS_PORT_50051_HTTP", "http://10.0.0.11:50051"),
        ("CTS_PORT_50051_TCP_HOST", "10.0.0.11"),
        ("CTS_LISTEN_ADDR", "10.0.0.11:50051"),
        ("OTHER_SERVICE_HOST", "10.0.0.11"),
    ] {
        assert!(!is_service_link(name, value), "{name}={value}");
    }
}

#[test]
fn no_setting_can_be_taken_for_a_service_link() {
    use super::service_links::is_service_link;
    let whole = Config {
        tls: Some(TlsConfig {
            cert_file: "c".into(),
            key_file: "k".into(),
            client_ca_file: Some("ca".into()),
            handshake_timeout: default_handshake_timeout(),
            max_concurrent_handshakes: default_max_concurrent_handshakes(),
            max_handshakes_per_peer: default_max_handshakes_per_peer(),
        }),
        ..Config::default()
    };
    let values = ["10.0.0.11", "6379", "tcp://10.0.0.11:6379", "tcp"];
    for setting in paths_of(&whole) {
        let variable = format!("{ENV_PREFIX}{}", setting.replace('.', "__").to_uppercase());
        for value in values {
            assert!(!is_service_link(&variable, value), "{variable}={value}");
        }
    }
}

#[test]
fn redis_tls_files_need_a_rediss_url_and_come_as_a_pair() {
    let redis = "backend = \"redis\"\nredis_url = \"rediss://redis.internal:6380\"";
    assert!(
        load_str(&format!(
            "[limiter]\n{redis}\nredis_ca_file = \"ca.crt\"\nredis_client_cert_file = \"c.crt\"\n\
             redis_client_key_file = \"c.key\""
        ))
        .is_ok()
    );
    for (toml, setting, why) in [
        (
            "redis_ca_file = \"ca.crt\"",
            "limiter.redis_ca_file",
            "\"memory\"",
        ),
        (
            "backend = \"redis\"\nredis_url = \"redis://redis.internal\"\nredis_ca_file = \"ca.crt\"",
            "limiter.redis_ca_file",
            "rediss://",
        ),
        (
            &format!("{redis}\nredis_client_cert_file = \"c.crt\""),
            "limiter.redis_client_key_file",
            "is required with the other",
        ),
        (
            &format!("{redis}\nredis_client_key_file = \"c.key\""),
            "limiter.redis_client_cert_file",
            "is required with the other",
        ),
    ] {
        let (got, reason) = invalid_setting(&format!("[limiter]\n{toml}"));
        assert_eq!(got, setting, "{toml}");
        assert!(reason.contains(why), "{toml}: {reason}");
    }
}

#[test]
fn end_user_settings_are_checked_at_their_edges() {
    let ok = |toml: &str| {
        load_str(toml).unwrap_or_else(|e| panic!("{toml}: {e}"));
    };
    let refused = |toml: &str, setting: &str| {
        let err = load_str(toml).unwrap_err().to_string();
        assert!(err.contains(setting), "{toml}: {err}");
    };
    for (setting, min, max, below, above) in [
        ("leeway", "0s", "5m", None, Some("301s")),
        ("jwks_max_age", "1m", "24h", Some("59s"), Some("86401s")),
        (
            "jwks_min_refresh_interval",
            "1s",
            "1h",
            Some("999ms"),
            Some("3601s"),
        ),
        ("fetch_timeout", "100ms", "30s", Some("99ms"), Some("31s")),
    ] {
        ok(&format!("[end_user]\n{setting} = \"{min}\""));
        ok(&format!("[end_user]\n{setting} = \"{max}\""));
        for bad in [below, above].into_iter().flatten() {
            refused(
                &format!("[end_user]\n{setting} = \"{bad}\""),
                &format!("end_user.{setting}"),
            );
        }
    }
    for (setting, min, max) in [("max_jwks_bytes", 1024, 1048576), ("max_keys", 1, 100)] {
        ok(&format!("[end_user]\n{setting} = {min}"));
        ok(&format!("[end_user]\n{setting} = {max}"));
        refused(
            &format!("[end_user]\n{setting} = {}", min - 1),
            &format!("end_user.{setting}"),
        );
        refused(
            &format!("[end_user]\n{setting} = {}", max + 1),
            &format!("end_user.{setting}"),
        );
    }
    let sixteen: Vec<String> = (0..16).map(|i| format!("\"c{i}\"")).collect();
    ok(&format!("[end_user]\nclaims = [{}]", sixteen.join(",")));
    refused(
        &format!("[end_user]\nclaims = [{}, \"c16\"]", sixteen.join(",")),
        "end_user.claims",
    );
    refused("[end_user]\nclaims = [\"a\\\"b\"]", "end_user.claims");
    refused("[end_user]\nclaims = [\"g\", \"g\"]", "end_user.claims");

    let issuer = |fields: &str| format!("[[end_user.issuers]]\n{fields}\n");
    ok(&issuer(
        "issuer = \"https://id.example.com\"\naudiences = [\"app\"]",
    ));
    refused(
        &issuer("issuer = \"https://id.example.com\"\naudiences = []"),
        "end_user.issuers[0].audiences",
    );
    // Keys travel over https, or plain http to loopback only.
    ok(&issuer(
        "issuer = \"http://127.0.0.1:8080\"\naudiences = [\"app\"]",
    ));
    refused(
        &issuer("issuer = \"http://id.example.com\"\naudiences = [\"app\"]"),
        "end_user.issuers[0].issuer",
    );
    refused(
        &issuer(
            "issuer = \"x\"\naudiences = [\"app\"]\njwks_url = \"http://keys.example.com/jwks\"",
        ),
        "jwks_url",
    );
    ok(&issuer(
        "issuer = \"not-a-url\"\naudiences = [\"app\"]\njwks_url = \"https://keys.example.com/jwks\"",
    ));
    refused(
        &issuer(
            "issuer = \"https://a\"\naudiences = [\"app\"]\njwks_url = \"https://k/j\"\njwks_file = \"/j\"",
        ),
        "end_user.issuers[0].jwks_file",
    );
    refused(
        &issuer(
            "issuer = \"https://a\"\naudiences = [\"app\"]\nuser_id_template = \"oidc|{email}\"",
        ),
        "end_user.issuers[0].user_id_template",
    );
    refused(
        &issuer("issuer = \"https://a\"\naudiences = [\"app\"]\nalgorithms = [\"HS256\"]"),
        "end_user.issuers[0].algorithms",
    );
    refused(
        &format!(
            "{}{}",
            issuer("issuer = \"https://a\"\naudiences = [\"app\"]"),
            issuer("issuer = \"https://a\"\naudiences = [\"other\"]")
        ),
        "end_user.issuers[1].issuer",
    );
}

#[test]
fn policy_cache_sizes_of_zero_are_refused() {
    for setting in ["decision_cache_entries", "slice_cache_entries"] {
        let err = load_str(&format!("[policy]\n{setting} = 0")).unwrap_err();
        assert!(
            err.to_string().contains(&format!("policy.{setting}")),
            "{err}"
        );
        assert!(load_str(&format!("[policy]\n{setting} = 1")).is_ok());
    }
}
