//! `[limiter]`: where rate-limit and moderation state live.

use std::{fmt, num::NonZeroUsize, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

use super::ConfigError;
use crate::domain::Secret;

/// Settings of the rate limiter's state store.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimiterConfig {
    /// Where limit state lives: `"memory"`, in each replica (with `R` replicas a limit admits up to `R`
    /// times its rate), or `"redis"`, shared by every replica. Default `"memory"`.
    pub backend: LimiterBackend,

    /// Most keys (one per limit and caller, user, room… as the limit counts) whose state is kept in memory,
    /// so a flood of distinct users cannot exhaust it. Each costs about 40 bytes (a digest of the key, not the
    /// key: 1,000,000 keys raise peak RSS by 37 MiB, see docs/performance.md). Beyond the cap the keys closest to
    /// recovery are forgotten, which can only make a limit more lenient. It also bounds each kind of
    /// moderation state kept in memory (bans, revocations, used token ids), and with the Redis backend the
    /// fail_open fallback. Default `1000000`; at least 1.
    pub max_tracked_keys: NonZeroUsize,

    /// The Redis to share state through: `redis://host:6379`, `rediss://` for TLS, `user:password@` for
    /// auth, `/N` for a database. May carry a password, so it is never logged or shown; prefer the
    /// `CTS_LIMITER__REDIS_URL` environment variable from a secret store. Required with `backend = "redis"`.
    pub redis_url: Option<RedisUrl>,

    /// CA certificates, PEM, that the Redis server's certificate must chain to, in place of the system's
    /// trusted roots: for a Redis whose certificate a private CA signed. Needs a `rediss://` URL; used for
    /// every node of a cluster. Read at start-up. Default: none (the system's roots).
    pub redis_ca_file: Option<PathBuf>,

    /// A client certificate chain, PEM, presented to Redis (for `tls-auth-clients yes`, Redis' default
    /// with TLS); with `redis_client_key_file`. Needs a `rediss://` URL. Default: none.
    pub redis_client_cert_file: Option<PathBuf>,

    /// The private key of `redis_client_cert_file`, PEM (PKCS#8, PKCS#1 or SEC1). Default: none.
    pub redis_client_key_file: Option<PathBuf>,

    /// Whether `redis_url` is a node of a Redis Cluster (the other nodes are discovered). In a cluster a
    /// request's limits are checked one key at a time, so a request refused by one limit may still consume
    /// from another. Default `false`.
    pub redis_cluster: bool,

    /// The longest a rate-limit check may wait for Redis before the failure mode decides instead. Default
    /// `50ms`; between `1ms` and `10s`.
    #[serde(with = "humantime_serde")]
    pub redis_timeout: Duration,

    /// While Redis is unreachable: `"fail_open"` decides in process with the same limits (per replica) and
    /// keeps serving; `"fail_closed"` refuses token requests with UNAVAILABLE and reports the token service
    /// NOT_SERVING. Default `"fail_open"`.
    pub failure_mode: FailureMode,

    /// Starts every Redis key, so several deployments can share one Redis without sharing budgets. Not
    /// empty, no `{` or `}` (they would change the Cluster hash slot). Default `"cts"`.
    pub key_prefix: String,
}

impl Default for LimiterConfig {
    fn default() -> Self {
        LimiterConfig {
            backend: LimiterBackend::Memory,
            max_tracked_keys: NonZeroUsize::new(1_000_000).expect("not zero"),
            redis_url: None,
            redis_ca_file: None,
            redis_client_cert_file: None,
            redis_client_key_file: None,
            redis_cluster: false,
            redis_timeout: Duration::from_millis(50),
            failure_mode: FailureMode::FailOpen,
            key_prefix: "cts".into(),
        }
    }
}

/// Where rate-limit state lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LimiterBackend {
    /// In each replica's memory: nothing else to run, but limits apply per replica.
    Memory,
    /// In Redis, shared by every replica.
    Redis,
}

impl LimiterConfig {
    /// The Redis URL when the Redis backend is chosen (the load checked that it is set then, and only then).
    pub fn redis(&self) -> Option<&RedisUrl> {
        self.redis_url
            .as_ref()
            .filter(|_| self.backend == LimiterBackend::Redis)
    }

    /// Checks the Redis settings together. Errors never show the URL: it may carry a password.
    pub(super) fn check(&self) -> Result<(), ConfigError> {
        let invalid = |setting: &str, reason: String| ConfigError::Invalid {
            setting: format!("limiter.{setting}"),
            reason,
        };
        let tls_files = [
            ("redis_ca_file", &self.redis_ca_file),
            ("redis_client_cert_file", &self.redis_client_cert_file),
            ("redis_client_key_file", &self.redis_client_key_file),
        ];
        let url = match (self.backend, &self.redis_url) {
            (LimiterBackend::Memory, None) => {
                if let Some((setting, _)) = tls_files.iter().find(|(_, file)| file.is_some()) {
                    return Err(invalid(
                        setting,
                        "is set but limiter.backend is \"memory\": it is for a rediss:// limiter.redis_url"
                            .into(),
                    ));
                }
                return Ok(());
            }
            (LimiterBackend::Memory, Some(_)) => {
                return Err(invalid(
                    "redis_url",
                    "is set but limiter.backend is \"memory\"; set limiter.backend = \"redis\" to share \
                     limits through it"
                        .into(),
                ));
            }
            (LimiterBackend::Redis, None) => {
                return Err(invalid(
                    "redis_url",
                    "is required with limiter.backend = \"redis\"".into(),
                ));
            }
            (LimiterBackend::Redis, Some(url)) => url,
        };
        if let Err(why) = url.client(self.redis_cluster) {
            return Err(invalid("redis_url", why));
        }
        if !url.is_tls()
            && let Some((setting, _)) = tls_files.iter().find(|(_, file)| file.is_some())
        {
            return Err(invalid(
                setting,
                "needs TLS: limiter.redis_url must be rediss://, not redis://".into(),
            ));
        }
        if self.redis_client_cert_file.is_some() != self.redis_client_key_file.is_some() {
            let missing = if self.redis_client_cert_file.is_some() {
                "redis_client_key_file"
            } else {
                "redis_client_cert_file"
            };
            return Err(invalid(
                missing,
                "is required with the other: a client certificate needs its key and the key its \
                 certificate"
                    .into(),
            ));
        }
        if !(Duration::from_millis(1)..=Duration::from_secs(10)).contains(&self.redis_timeout) {
            return Err(invalid(
                "redis_timeout",
                format!(
                    "must be between 1ms and 10s, got {}",
                    humantime::format_duration(self.redis_timeout)
                ),
            ));
        }
        if self.key_prefix.is_empty() || self.key_prefix.contains(['{', '}']) {
            return Err(invalid(
                "key_prefix",
                format!(
                    "must not be empty and must not contain {{ or }}, got {:?}",
                    self.key_prefix
                ),
            ));
        }
        Ok(())
    }
}

/// What to do while Redis cannot be reached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureMode {
    /// Keep serving under per-replica, in-process limits: availability over exact limits.
    #[default]
    FailOpen,
    /// Refuse with UNAVAILABLE and report not ready: exact limits (an upstream quota) over availability.
    FailClosed,
}

/// `limiter.redis_url`, parsed when the configuration loads, so nothing after the load can find it bad.
/// It may carry a password: `Debug` and serialised output never show it, and parse errors do not quote it.
#[derive(Clone, Deserialize)]
#[serde(try_from = "Secret")]
pub struct RedisUrl(redis::ConnectionInfo);

impl RedisUrl {
    /// Accepts what redis-rs accepts: `redis://[user:password@]host[:port][/db]`, `rediss://` for TLS.
    pub fn parse(url: &str) -> Result<Self, String> {
        redis::IntoConnectionInfo::into_connection_info(url)
            .map(RedisUrl)
            .map_err(|_| {
                "is not a Redis URL: redis://[user:password@]host[:port][/db], or rediss:// for TLS"
                    .to_owned()
            })
    }

    /// Where and how to connect.
    pub fn info(&self) -> &redis::ConnectionInfo {
        &self.0
    }

    /// Whether the URL asks for TLS (`rediss://`).
    pub fn is_tls(&self) -> bool {
        matches!(self.0.addr(), redis::ConnectionAddr::TcpTls { .. })
    }

    /// Builds (without connecting) the client start-up will build, so whatever it could refuse is refused
    /// at load.
    fn client(&self, cluster: bool) -> Result<(), String> {
        let built = if cluster {
            redis::cluster::ClusterClient::new([self.0.clone()]).map(drop)
        } else {
            redis::Client::open(self.0.clone()).map(drop)
        };
        // redis-rs' errors describe the URL's problem without echoing it, password included.
        built.map_err(|e| format!("cannot be used: {e}"))
    }
}

impl TryFrom<Secret> for RedisUrl {
    type Error = String;

    fn try_from(url: Secret) -> Result<Self, String> {
        RedisUrl::parse(url.expose())
    }
}

impl Serialize for RedisUrl {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str("<redacted>")
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}
