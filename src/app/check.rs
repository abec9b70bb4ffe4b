//! `--check-config`: load everything start-up would load (settings, Cedar policies against the schema and
//! their entities, the local issuer's key set, the TLS files, the Redis URL's syntax) without binding,
//! serving or connecting anywhere, then print one screen of what would run.
//!
//! Start-up stops at its first problem; this check goes on past a bad file so a deployment's mistakes can
//! be fixed in one round. Only a configuration that does not parse at all stops it early: nothing after it
//! can be judged.

use std::{fmt::Write as _, path::Path, time::Duration};

use super::{key_source, policy_source};
use crate::config::{
    Config, FailureMode, IssuerKind, LimiterBackend, LogFormat, service_link_variables,
};
use crate::identity::{end_user, sigv4::Verifier};
use crate::issuer::{local::KeySource, webhook::SigningSecret};
use crate::policy::{PolicyEngine, PolicySource};
use crate::store::redis::RedisTls;
use crate::telemetry;
use crate::transport::tls::Tls;

/// What the check found: the summary when everything loads, else every problem, each naming its setting.
pub fn check(config_file: Option<&Path>) -> Result<String, Vec<String>> {
    let config = Config::load(config_file).map_err(|e| vec![e.to_string()])?;
    let mut problems = Vec::new();

    if let Err(e) = PolicyEngine::load_with_claims(
        policy_source(&config.policy),
        &config.end_user.claims,
        (&config.policy).into(),
    ) {
        problems.push(format!("configuration error: policy.files: {e}"));
    }
    let keys = if config.issuer == IssuerKind::Local {
        match key_source(&config.local_issuer).load() {
            Ok(keys) => Some(format!(
                "active key {} of {}",
                keys.active_key_id(),
                keys.key_ids().count()
            )),
            Err(e) => {
                problems.push(format!("configuration error: local issuer keys: {e}"));
                None
            }
        }
    } else {
        None
    };
    let identity = &config.identity;
    if let Some(file) = identity.sigv4_credentials()
        && let Err(e) = Verifier::load(file, &identity.sigv4)
    {
        problems.push(format!(
            "configuration error: identity.sigv4.credentials_file: {e}"
        ));
    }
    if let Err(e) = end_user::Verifier::new(&config.end_user) {
        problems.push(format!("configuration error: {e}"));
    }
    if let Some(tls) = &config.tls
        && let Err(e) = Tls::load(tls)
    {
        problems.push(e.to_string());
    }
    if config.limiter.redis().is_some()
        && let Err(e) = RedisTls::load(&config.limiter)
    {
        problems.push(e.to_string());
    }
    if let Some(file) = &config.messaging.signing_secret_file
        && let Err(e) = SigningSecret::load(file)
    {
        problems.push(format!(
            "configuration error: messaging.signing_secret_file: {e}"
        ));
    }

    for (_, export) in telemetry::check_export() {
        if let Err(e) = export {
            problems.push(format!("configuration error: {e}"));
        }
    }

    if problems.is_empty() {
        Ok(summary(&config, config_file, keys.as_deref()))
    } else {
        Err(problems)
    }
}

/// One line per concern, in the order a request meets them.
fn summary(config: &Config, config_file: Option<&Path>, keys: Option<&str>) -> String {
    let mut out = String::new();
    let source = match config_file {
        Some(file) => format!("{} and CTS_* environment variables", file.display()),
        None => "defaults and CTS_* environment variables".into(),
    };
    let _ = writeln!(
        out,
        "chat-token-service {}: configuration OK ({source})",
        env!("CARGO_PKG_VERSION")
    );

    let transport = match &config.tls {
        None => "plaintext (no TLS): behind a mesh sidecar or for development".to_owned(),
        Some(tls) => match &tls.client_ca_file {
            Some(ca) => format!(
                "TLS ({}), client certificates required, signed by {}",
                tls.cert_file.display(),
                ca.display()
            ),
            None => format!("TLS ({})", tls.cert_file.display()),
        },
    };
    let protocols = if config.http_api.enabled {
        "gRPC and the IVS Chat HTTP API"
    } else {
        "gRPC"
    };
    line(
        &mut out,
        "listener",
        format!("{} {protocols}, {transport}", config.listen_addr),
    );
    line(
        &mut out,
        "calls",
        format!(
            "at most {} calls in flight, requests up to {} bytes, {} request bytes held at once",
            config.max_concurrent_calls,
            config.max_request_bytes,
            config.transport.max_request_bytes_in_flight
        ),
    );
    line(
        &mut out,
        "shutdown",
        format!(
            "calls in flight get {} to finish after SIGTERM",
            duration(config.shutdown_grace_period)
        ),
    );

    let identity = &config.identity;
    let sources: Vec<&str> = identity.sources.iter().map(|s| s.as_str()).collect();
    let anonymous = if identity.allow_anonymous {
        format!(
            "unidentified callers pass as {:?}",
            identity.anonymous_principal
        )
    } else {
        "unidentified callers refused (UNAUTHENTICATED)".into()
    };
    line(
        &mut out,
        "identity",
        format!("sources [{}]; {anonymous}", sources.join(", ")),
    );

    let end_users = &config.end_user;
    let end_users = if end_users.issuers.is_empty() {
        format!("no issuers: a request with {} is refused", end_users.header)
    } else {
        let issuers: Vec<&str> = end_users
            .issuers
            .iter()
            .map(|issuer| issuer.issuer.as_str())
            .collect();
        format!(
            "tokens in {} from {}; policies see claims [{}]",
            end_users.header,
            issuers.join(", "),
            end_users.claims.join(", ")
        )
    };
    line(&mut out, "end users", end_users);

    let policy = match policy_source(&config.policy) {
        PolicySource::Development => {
            "embedded development policy: permits every valid request (loopback only)".to_owned()
        }
        PolicySource::Files { policies, entities } => {
            let files: Vec<String> = policies.iter().map(|p| p.display().to_string()).collect();
            let entities = match entities {
                Some(file) => format!(", entities {}", file.display()),
                None => String::new(),
            };
            format!("{}{entities}", files.join(", "))
        }
    };
    let shadow = if config.policy.shadow {
        " (shadow: logs denials, denies nothing)"
    } else {
        ""
    };
    line(&mut out, "policy", format!("{policy}{shadow}"));

    let issuer = match config.issuer {
        IssuerKind::Local => {
            let keys = keys.unwrap_or_default();
            let keys = match key_source(&config.local_issuer) {
                KeySource::File(path) => format!("key set {} ({keys})", path.display()),
                KeySource::Single(_) => format!("one key from local_issuer.key ({keys})"),
                KeySource::Ephemeral => {
                    "an ephemeral key made at start-up (tokens do not survive a restart)".into()
                }
            };
            format!(
                "local (PASETO v4.local), tokens valid {}, {keys}",
                duration(config.local_issuer.token_ttl)
            )
        }
        IssuerKind::Ivs => {
            let ivs = &config.ivs;
            let any = |list: Vec<&str>| {
                if list.is_empty() {
                    "any".to_owned()
                } else {
                    list.join(", ")
                }
            };
            format!(
                "ivs (Amazon IVS Chat) at {}; regions {}; accounts {}; {} assumed role(s); quota {} burst {}",
                ivs.endpoint_url
                    .as_ref()
                    .map_or("the room's regional endpoint", |url| url.as_str()),
                any(ivs.allowed_regions.iter().map(|r| r.as_str()).collect()),
                any(ivs.allowed_accounts.iter().map(|a| a.as_str()).collect()),
                ivs.assume_roles.len(),
                ivs.quota,
                ivs.quota_burst
            )
        }
    };
    line(&mut out, "issuer", issuer);

    if config.rate_limits.is_empty() {
        line(&mut out, "limits", "none".into());
    }
    for limit in &config.rate_limits {
        let shadow = if limit.shadow { " (shadow)" } else { "" };
        line(
            &mut out,
            "limit",
            format!("{}: {}{shadow}", limit.name, limit.description()),
        );
    }

    let limiter = &config.limiter;
    let store = match limiter.backend {
        LimiterBackend::Memory => format!(
            "in memory, per replica (up to {} keys)",
            limiter.max_tracked_keys
        ),
        LimiterBackend::Redis => {
            // The address only: the URL may carry a password.
            let address = limiter
                .redis()
                .map(|url| url.info().addr().to_string())
                .unwrap_or_default();
            let tls = match (&limiter.redis_ca_file, &limiter.redis_client_cert_file) {
                (Some(ca), Some(cert)) => format!(
                    " (TLS: CA {}, client certificate {})",
                    ca.display(),
                    cert.display()
                ),
                (Some(ca), None) => format!(" (TLS: CA {})", ca.display()),
                (None, Some(cert)) => format!(" (TLS: client certificate {})", cert.display()),
                (None, None) => String::new(),
            };
            format!(
                "Redis{} at {address}{tls}, prefix {:?}, timeout {}, {} while unreachable",
                if limiter.redis_cluster {
                    " Cluster"
                } else {
                    ""
                },
                limiter.key_prefix,
                duration(limiter.redis_timeout),
                match limiter.failure_mode {
                    FailureMode::FailOpen => "fail_open (per-replica limits)",
                    FailureMode::FailClosed => "fail_closed (UNAVAILABLE, NOT_SERVING)",
                }
            )
        }
    };
    line(&mut out, "state", store);
    line(
        &mut out,
        "moderation",
        format!(
            "bans up to {}; single-use tokens {}",
            duration(config.moderation.max_ban_duration),
            if config.moderation.single_use_tokens {
                "on"
            } else {
                "off"
            }
        ),
    );
    let ivs = &config.ivs;
    let messaging = match (config.issuer, &config.messaging.webhook_url) {
        (IssuerKind::Ivs, _) => format!(
            "SendEvent and DeleteMessage to IVS Chat; quotas {} burst {}, {} burst {}",
            ivs.send_event_quota,
            ivs.send_event_quota_burst,
            ivs.delete_message_quota,
            ivs.delete_message_quota_burst
        ),
        (IssuerKind::Local, Some(url)) => format!(
            "SendEvent and DeleteMessage to the webhook {}, signed, within {}",
            url.as_str(),
            duration(config.messaging.timeout)
        ),
        (IssuerKind::Local, None) => {
            "no chat backend: SendEvent and DeleteMessage answer FAILED_PRECONDITION".into()
        }
    };
    line(&mut out, "messaging", messaging);

    let otlp = [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
    ]
    .iter()
    .find_map(|name| std::env::var(name).ok().filter(|v| !v.is_empty()));
    let transports: Vec<String> = telemetry::check_export()
        .into_iter()
        .filter_map(|(signal, export)| Some(format!("{signal} {}", export.ok()?)))
        .collect();
    line(
        &mut out,
        "telemetry",
        format!(
            "{} logs; OTLP export {}",
            match config.log_format {
                LogFormat::Text => "text",
                LogFormat::Json => "json",
            },
            otlp.map_or(
                "off (OTEL_EXPORTER_OTLP_ENDPOINT unset)".into(),
                |endpoint| format!("to {endpoint} ({})", transports.join("; "))
            )
        ),
    );
    let links = service_link_variables();
    if !links.is_empty() {
        line(
            &mut out,
            "environment",
            format!(
                "ignoring Kubernetes service links, not settings: {}",
                links.join(", ")
            ),
        );
    }
    out
}

fn line(out: &mut String, label: &str, text: String) {
    let _ = writeln!(out, "  {label:<10} {text}");
}

/// Whole days as days (`365d`), not humantime's months of 30.44 days; anything else as humantime writes it.
fn duration(duration: Duration) -> String {
    const DAY: u64 = 24 * 3600;
    match duration.as_secs() {
        secs if secs >= DAY && secs % DAY == 0 && duration.subsec_nanos() == 0 => {
            format!("{}d", secs / DAY)
        }
        _ => humantime::format_duration(duration).to_string(),
    }
}
