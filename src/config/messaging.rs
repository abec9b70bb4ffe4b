//! `[messaging]`: where SendEvent and DeleteMessage go with the local issuer.

use std::{net::IpAddr, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

use super::{ConfigError, EndpointUrl, IssuerKind};

/// Shortest `messaging.timeout`: a webhook on the same host answers within it.
pub const MIN_WEBHOOK_TIMEOUT: Duration = Duration::from_millis(100);
/// Longest `messaging.timeout`: a call waits for the webhook at most this long, whatever the setting.
pub const MAX_WEBHOOK_TIMEOUT: Duration = Duration::from_secs(30);

/// Settings of MessagingService (SendEvent, DeleteMessage) with the local issuer. With `issuer = "ivs"`
/// both go to IVS Chat and this section must stay empty.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct MessagingConfig {
    /// The self-hosted chat server's webhook: each SendEvent and DeleteMessage is POSTed here as JSON,
    /// signed with HMAC-SHA256 (docs/messaging.md). `https://`, or `http://` to a loopback host (or
    /// anywhere with `allow_plaintext`). Default: none; both calls then fail with FAILED_PRECONDITION.
    pub webhook_url: Option<EndpointUrl>,

    /// The file holding the webhook's signing secret (at least 32 bytes; a trailing newline is not part of
    /// it). Required with `webhook_url`. Re-read when it changes (every `reload_interval`) and on SIGHUP;
    /// should be readable by the service's user only (a warning says so otherwise). Default: none.
    pub signing_secret_file: Option<PathBuf>,

    /// Longest wait for the webhook's answer, connecting included; the caller's gRPC deadline, when shorter,
    /// wins. Default `2s`; between `100ms` and `30s`.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,

    /// Allow an `http://` `webhook_url` whose host is not loopback: only where the network encrypts it (a
    /// mesh sidecar's mutual TLS). Default `false`: the request carries attribute values and reasons.
    pub allow_plaintext: bool,
}

impl Default for MessagingConfig {
    fn default() -> Self {
        MessagingConfig {
            webhook_url: None,
            signing_secret_file: None,
            timeout: Duration::from_secs(2),
            allow_plaintext: false,
        }
    }
}

impl MessagingConfig {
    /// The rules of this section, and the one it shares with `issuer`.
    pub(super) fn check(&self, issuer: IssuerKind) -> Result<(), ConfigError> {
        let invalid = |setting: &str, reason: String| ConfigError::Invalid {
            setting: format!("messaging.{setting}"),
            reason,
        };
        if !(MIN_WEBHOOK_TIMEOUT..=MAX_WEBHOOK_TIMEOUT).contains(&self.timeout) {
            return Err(invalid(
                "timeout",
                format!(
                    "must be between {} and {}, got {}",
                    humantime::format_duration(MIN_WEBHOOK_TIMEOUT),
                    humantime::format_duration(MAX_WEBHOOK_TIMEOUT),
                    humantime::format_duration(self.timeout)
                ),
            ));
        }
        let Some(url) = &self.webhook_url else {
            return match self.signing_secret_file {
                Some(_) => Err(invalid(
                    "signing_secret_file",
                    "signs webhook requests, and messaging.webhook_url is not set".into(),
                )),
                None => Ok(()),
            };
        };
        if issuer == IssuerKind::Ivs {
            return Err(invalid(
                "webhook_url",
                "the ivs issuer delivers SendEvent and DeleteMessage through IVS Chat; the webhook is \
                 for the local issuer"
                    .into(),
            ));
        }
        if self.signing_secret_file.is_none() {
            return Err(invalid(
                "signing_secret_file",
                "is required with messaging.webhook_url: every webhook request is signed".into(),
            ));
        }
        let uri: http::Uri = url.as_str().parse().expect("checked when parsed");
        if uri.scheme_str() == Some("http") && !self.allow_plaintext && !loopback(uri.host()) {
            return Err(invalid(
                "webhook_url",
                format!(
                    "{} sends events, attribute values and reasons in plaintext off this host; use \
                     https://, or set messaging.allow_plaintext where the network encrypts it (a mesh)",
                    url.as_str()
                ),
            ));
        }
        Ok(())
    }
}

/// Whether `host` names this machine: `localhost` or a loopback address.
fn loopback(host: Option<&str>) -> bool {
    let Some(host) = host else { return false };
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn webhook(url: &str) -> MessagingConfig {
        MessagingConfig {
            webhook_url: Some(EndpointUrl::parse(url).unwrap()),
            signing_secret_file: Some("secret".into()),
            ..MessagingConfig::default()
        }
    }

    #[test]
    fn plaintext_webhooks_are_for_loopback_unless_allowed() {
        for url in [
            "https://chat.example.com/hook",
            "http://127.0.0.1:8080/hook",
            "http://[::1]:8080/hook",
            "http://localhost/hook",
        ] {
            webhook(url).check(IssuerKind::Local).unwrap();
        }
        let remote = webhook("http://chat.chat.svc:8080/hook");
        let err = remote.check(IssuerKind::Local).unwrap_err().to_string();
        assert!(
            err.contains("messaging.webhook_url") && err.contains("plaintext"),
            "{err}"
        );
        MessagingConfig {
            allow_plaintext: true,
            ..remote
        }
        .check(IssuerKind::Local)
        .unwrap();
    }

    #[test]
    fn the_webhook_needs_its_secret_the_local_issuer_and_a_bounded_timeout() {
        let unsigned = MessagingConfig {
            signing_secret_file: None,
            ..webhook("https://chat.example.com/hook")
        };
        let err = unsigned.check(IssuerKind::Local).unwrap_err().to_string();
        assert!(err.contains("messaging.signing_secret_file"), "{err}");
        let err = webhook("https://chat.example.com/hook")
            .check(IssuerKind::Ivs)
            .unwrap_err()
            .to_string();
        assert!(err.contains("ivs issuer"), "{err}");
        let secret_alone = MessagingConfig {
            signing_secret_file: Some("secret".into()),
            ..MessagingConfig::default()
        };
        assert!(secret_alone.check(IssuerKind::Local).is_err());
        for (timeout, ok) in [(99, false), (100, true), (30_000, true), (30_001, false)] {
            let config = MessagingConfig {
                timeout: Duration::from_millis(timeout),
                ..MessagingConfig::default()
            };
            assert_eq!(config.check(IssuerKind::Local).is_ok(), ok, "{timeout}ms");
        }
    }
}
