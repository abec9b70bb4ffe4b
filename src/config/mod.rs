//! The service's one configuration: embedded defaults, then a TOML file (`--config PATH`), then `CTS_*`
//! environment variables, each overriding the one before.
//!
//! Environment names are the setting's path in upper case, prefixed with `CTS_`, with `__` between a
//! section and its field: `listen_addr` is `CTS_LISTEN_ADDR`, `local_issuer.keys_file` is
//! `CTS_LOCAL_ISSUER__KEYS_FILE`. Durations are written as humans write them: `"60s"`, `"2m"`, `"500ms"`.
//!
//! A bad value stops start-up with an error naming the setting, where it came from, and why. Values are
//! parsed into their types here (URLs, regions, accounts, role ARNs, header names, rates), so nothing that
//! uses a loaded configuration can find a value bad. This module is data only: it builds no runtime object
//! and starts nothing.

mod end_user;
mod identity;
mod issuer;
mod limiter;
mod messaging;
mod service_links;
mod transport;

use std::{
    collections::HashSet,
    net::SocketAddr,
    num::NonZeroUsize,
    path::{Path, PathBuf},
    time::Duration,
};

use figment::{
    Figment,
    providers::{Env, Format, Toml},
};
use serde::{Deserialize, Serialize};

use crate::domain::{
    DELETE_MESSAGE_QUOTA_LIMIT_NAME, DISCONNECT_QUOTA_LIMIT_NAME, IVS_QUOTA_LIMIT_NAME, Limit,
    SEND_EVENT_QUOTA_LIMIT_NAME,
};
pub use crate::telemetry::LogFormat;

pub use end_user::{
    EndUserConfig, EndUserIssuer, FetchUrl, JwtAlgorithm, KeySource as EndUserKeySource,
    MAX_ISSUERS,
};
pub use identity::{CertificateName, IdentityConfig, IdentitySource, Sigv4Config};
pub use issuer::{
    ChatEndpoint, EndpointUrl, IVS_CHAT_REGIONS, IssuerKind, IvsConfig, LocalIssuerConfig, RoleArn,
};
pub use limiter::{FailureMode, LimiterBackend, LimiterConfig, RedisUrl};
pub use messaging::{MAX_WEBHOOK_TIMEOUT, MIN_WEBHOOK_TIMEOUT, MessagingConfig};
pub use service_links::service_link_variables;
pub use transport::{HttpApiConfig, TlsConfig, TransportConfig};

/// Prefix of environment variables that override settings.
pub const ENV_PREFIX: &str = "CTS_";

/// Everything the service can be told. Every field has a default, so an empty file is a valid config.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where the gRPC server listens. Loopback by default, so a fresh checkout exposes nothing.
    /// Default `127.0.0.1:50051`.
    pub listen_addr: SocketAddr,

    /// After SIGTERM or SIGINT, how long the server reports NOT_SERVING while still serving, before it
    /// closes the listener: long enough for kubelet probes and load balancers to see NOT_SERVING and
    /// send new work elsewhere, so no caller meets a refused connection. `0s` closes at once (nothing in
    /// front of it polls health). Default `5s`.
    #[serde(with = "humantime_serde")]
    pub shutdown_drain_delay: Duration,

    /// After the drain delay, how long calls already in flight may take to finish before the process
    /// exits anyway. Keep `shutdown_drain_delay` plus this below Kubernetes'
    /// `terminationGracePeriodSeconds`. Default `20s`.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace_period: Duration,

    /// Largest request message the transport accepts, in bytes; larger ones are refused before they are
    /// parsed. The largest valid request is under 9 KiB (VerifyChatToken with a token of the largest size
    /// read); a CreateChatToken request under 3 KiB. Default `16384`; at least `8192`.
    pub max_request_bytes: usize,

    /// Most CreateChatToken calls in flight at once on this replica; more are shed at once with
    /// UNAVAILABLE (health checks and reflection are never shed). Default `1024`; at least 1.
    pub max_concurrent_calls: NonZeroUsize,

    /// How often the files the service reads are checked for changes (policies and entities, TLS, the
    /// local issuer's key set, SigV4 credentials, end-user JWK set files); SIGHUP reloads them all at
    /// once. Default `10s`; at least `100ms`.
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,

    /// TLS termination. Absent: plaintext HTTP/2 (behind a mesh sidecar, or for development).
    pub tls: Option<TlsConfig>,

    /// How log lines are written: `"text"` for people, `"json"` for log collectors. `--log-format`
    /// overrides it. Default `"text"`.
    pub log_format: LogFormat,

    /// How callers are identified.
    pub identity: IdentityConfig,

    /// End users' own identity tokens, which bind a request to the user they prove.
    pub end_user: EndUserConfig,

    /// Which Cedar policies decide who may mint what.
    pub policy: PolicyConfig,

    /// Which issuer mints tokens: `"local"` (the built-in PASETO issuer) or `"ivs"` (Amazon IVS Chat).
    /// Default `"local"`.
    pub issuer: IssuerKind,

    /// Settings of the IVS Chat issuer.
    pub ivs: IvsConfig,

    /// Settings of the local issuer.
    pub local_issuer: LocalIssuerConfig,

    /// Rate limits, every one checked on every request; a request over any enforced limit is refused with
    /// RESOURCE_EXHAUSTED and consumes nothing from the others. Names are unique and not empty. Default:
    /// none.
    pub rate_limits: Vec<Limit>,

    /// Where rate-limit state is kept; bans, revocations and used token ids live there too.
    pub limiter: LimiterConfig,

    /// IVS Chat's own REST-JSON API (`POST /CreateChatToken`) on the same listener, for the AWS CLI and
    /// SDKs.
    pub http_api: HttpApiConfig,

    /// Moderation: bans and token verification (ivschat.v1.ModerationService).
    pub moderation: ModerationConfig,

    /// SendEvent and DeleteMessage (ivschat.v1.MessagingService) with the local issuer: the chat server's
    /// webhook.
    pub messaging: MessagingConfig,

    /// Per-connection limits and timeouts of the listener. See docs/security.md, "Limits and timeouts".
    pub transport: TransportConfig,

    /// gRPC server reflection, for grpcurl and buf curl.
    pub reflection: ReflectionConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen_addr: SocketAddr::from(([127, 0, 0, 1], 50051)),
            shutdown_drain_delay: Duration::from_secs(5),
            shutdown_grace_period: Duration::from_secs(20),
            max_request_bytes: 16 * 1024,
            max_concurrent_calls: NonZeroUsize::new(1024).expect("1024 is not zero"),
            reload_interval: Duration::from_secs(10),
            tls: None,
            log_format: LogFormat::Text,
            identity: IdentityConfig::default(),
            end_user: EndUserConfig::default(),
            policy: PolicyConfig::default(),
            issuer: IssuerKind::Local,
            ivs: IvsConfig::default(),
            local_issuer: LocalIssuerConfig::default(),
            rate_limits: Vec::new(),
            limiter: LimiterConfig::default(),
            http_api: HttpApiConfig::default(),
            moderation: ModerationConfig::default(),
            messaging: MessagingConfig::default(),
            transport: TransportConfig::default(),
            reflection: ReflectionConfig::default(),
        }
    }
}

/// gRPC server reflection.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReflectionConfig {
    /// Whether the server describes its API (v1 and v1alpha) to tools such as grpcurl, which then need
    /// no proto files. Its streams count against `transport.max_streaming_calls` and end at
    /// `transport.max_call_duration`. Default `true`.
    pub enabled: bool,
}

impl Default for ReflectionConfig {
    fn default() -> Self {
        ReflectionConfig { enabled: true }
    }
}

/// Settings of the moderation service.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModerationConfig {
    /// Longest ban BanUser accepts with a duration (a ban without one lasts until UnbanUser), so a typo
    /// cannot ban someone for a century by accident. Default `365d`; at least `1s`.
    #[serde(with = "humantime_serde")]
    pub max_ban_duration: Duration,

    /// Local issuer: a token verifies (VerifyChatToken) only once; its id is remembered until it expires.
    /// For chat servers that must refuse a replayed token. While Redis is unreachable in fail_open mode each
    /// replica remembers only the ids it saw. Default `false`.
    pub single_use_tokens: bool,
}

impl Default for ModerationConfig {
    fn default() -> Self {
        ModerationConfig {
            max_ban_duration: Duration::from_secs(365 * 24 * 3600),
            single_use_tokens: false,
        }
    }
}

impl ModerationConfig {
    /// The rules of this section that its types do not hold.
    fn check(&self) -> Result<(), ConfigError> {
        at_least(
            "moderation.max_ban_duration",
            self.max_ban_duration,
            Duration::from_secs(1),
        )
    }
}

/// Policy settings. See docs/policy.md for what a policy sees.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyConfig {
    /// Cedar policy files, evaluated as one set. Empty (the default): the embedded development policy,
    /// which permits every valid request; it is refused unless `listen_addr` is a loopback address.
    pub files: Vec<PathBuf>,

    /// Cedar entities (JSON): callers' groups and attributes such as `accounts`. Default: none.
    pub entities_file: Option<PathBuf>,

    /// Evaluate policies and log what they would deny, but deny nothing: for trying a new policy on live
    /// traffic. Default `false`.
    pub shadow: bool,

    /// How many decisions are kept, by caller, action, room and the context the policies read: live
    /// (caller, room) pairs beyond it are decided by Cedar again. Bounds the memory whatever callers send
    /// (a few hundred bytes an entry). At least 1. Default 16384.
    pub decision_cache_entries: usize,

    /// How many (caller, room) entity slices are kept, built again on a decision cache miss when
    /// evicted (a few KB an entry). At least 1. Default 1024.
    pub slice_cache_entries: usize,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            files: Vec::new(),
            entities_file: None,
            shadow: false,
            decision_cache_entries: 16384,
            slice_cache_entries: 1024,
        }
    }
}

impl PolicyConfig {
    /// The rules of this section, and the one it shares with `listen_addr`.
    fn check(&self, listen_addr: SocketAddr) -> Result<(), ConfigError> {
        if self.files.is_empty() && !listen_addr.ip().is_loopback() {
            return Err(ConfigError::Invalid {
                setting: "policy.files".into(),
                reason: format!(
                    "no policy files: the development policy permits every request, so it is only \
                     allowed on a loopback listen_addr, not {listen_addr}; configure policies (see \
                     deploy/policy/production.cedar), or run `serve --dev` to try the service out"
                ),
            });
        }
        for (setting, entries) in [
            ("policy.decision_cache_entries", self.decision_cache_entries),
            ("policy.slice_cache_entries", self.slice_cache_entries),
        ] {
            if entries == 0 {
                return Err(ConfigError::Invalid {
                    setting: setting.into(),
                    reason: "must be at least 1: an empty cache would have Cedar decide every call"
                        .into(),
                });
            }
        }
        if self.entities_file.is_some() && self.files.is_empty() {
            return Err(ConfigError::Invalid {
                setting: "policy.entities_file".into(),
                reason: "entities need policy files that use them (policy.files is empty)".into(),
            });
        }
        Ok(())
    }
}

/// What a configuration is loaded for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// Serving as configured: settings that believe any client (the development policy, the `header`
    /// identity source, anonymous callers) are refused off loopback unless a proxy in front is declared.
    #[default]
    Serve,
    /// Development mode (`serve --dev`), for trying the service out: those settings are allowed on any
    /// `listen_addr`. Start-up says loudly what is trusted ([`Config::trusts_any_client`]).
    Development,
}

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file or an environment variable does not parse: each problem names the setting and its source.
    #[error("configuration error: {0}")]
    Parse(String),
    /// A value parses but is out of range.
    #[error("configuration error: {setting}: {reason}")]
    Invalid {
        /// The setting's path in the file, e.g. `local_issuer.token_ttl` or `rate_limits[2].rate`.
        setting: String,
        /// What is wrong and what is allowed.
        reason: String,
    },
}

impl Config {
    /// Defaults, overridden by `file` (which must exist when given), overridden by `CTS_*` variables.
    /// Kubernetes service links that happen to start with `CTS_` are not settings and are left out
    /// ([`service_link_variables`] names them, for a warning).
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_for(file, Mode::Serve)
    }

    /// [`Config::load`], checked for `mode`.
    pub fn load_for(file: Option<&Path>, mode: Mode) -> Result<Config, ConfigError> {
        let mut figment = Figment::new();
        if let Some(file) = file {
            figment = figment.merge(Toml::file_exact(file));
        }
        // CTS_CONFIG names the file (a flag's environment form), not a setting.
        let not_settings: Vec<String> = std::iter::once("CONFIG".to_owned())
            .chain(
                service_link_variables()
                    .into_iter()
                    .map(|name| name[ENV_PREFIX.len()..].to_owned()),
            )
            .collect();
        let not_settings: Vec<&str> = not_settings.iter().map(String::as_str).collect();
        let config: Config = figment
            .merge(Env::prefixed(ENV_PREFIX).ignore(&not_settings).split("__"))
            .extract()
            .map_err(describe)?;
        config.validate_for(mode)?;
        Ok(config)
    }

    /// The rules that types alone cannot express, for serving as configured ([`Mode::Serve`]).
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_for(Mode::Serve)
    }

    /// The rules that types alone cannot express, for `mode`. Development mode waives exactly the rules
    /// that keep settings which believe any client on loopback: they are checked as if `listen_addr` were
    /// loopback; everything else is checked the same.
    pub fn validate_for(&self, mode: Mode) -> Result<(), ConfigError> {
        match mode {
            Mode::Serve => self.check_rules(),
            Mode::Development => Config {
                listen_addr: SocketAddr::from(([127, 0, 0, 1], self.listen_addr.port())),
                ..self.clone()
            }
            .check_rules(),
        }
    }

    /// What this configuration believes of any client that reaches `listen_addr`, one phrase each: empty
    /// when it believes nothing a client says of itself. Development mode's warning names them.
    pub fn trusts_any_client(&self) -> Vec<String> {
        let identity = &self.identity;
        let mut trusts = Vec::new();
        if self.policy.files.is_empty() {
            trusts.push("the development policy permits every valid request".to_owned());
        }
        if identity.sources.contains(&IdentitySource::Header) {
            trusts.push(format!(
                "any client names itself in the {} header",
                identity.header
            ));
        }
        if identity.allow_anonymous {
            trusts.push(format!(
                "callers no identity source names pass as {:?}",
                identity.anonymous_principal
            ));
        }
        trusts
    }

    /// Each section's own rules, then those across sections.
    fn check_rules(&self) -> Result<(), ConfigError> {
        self.transport.check()?;
        self.local_issuer.check()?;
        // Policy before identity: without policy files nothing else off loopback matters yet.
        self.policy.check(self.listen_addr)?;
        self.identity
            .check(self.listen_addr, self.tls.as_ref(), &self.http_api)?;
        self.moderation.check()?;
        self.messaging.check(self.issuer)?;
        self.end_user.check()?;
        self.ivs.check()?;
        at_least(
            "reload_interval",
            self.reload_interval,
            Duration::from_millis(100),
        )?;
        if self.max_request_bytes < 8192 {
            return Err(ConfigError::Invalid {
                setting: "max_request_bytes".into(),
                reason: format!(
                    "must be at least 8192 so every valid request fits, got {}",
                    self.max_request_bytes
                ),
            });
        }
        self.http_api.check()?;
        if self.transport.max_request_bytes_in_flight.get() < self.max_request_bytes {
            return Err(ConfigError::Invalid {
                setting: "transport.max_request_bytes_in_flight".into(),
                reason: format!(
                    "must be at least max_request_bytes ({}), got {}",
                    self.max_request_bytes, self.transport.max_request_bytes_in_flight
                ),
            });
        }
        self.check_limit_names()?;
        self.limiter.check()
    }

    /// Limit names are unique and not empty: they name budgets in the store and limits in refusals.
    fn check_limit_names(&self) -> Result<(), ConfigError> {
        let mut names = HashSet::new();
        for (index, limit) in self.rate_limits.iter().enumerate() {
            let invalid = |reason: String| ConfigError::Invalid {
                setting: format!("rate_limits[{index}].name"),
                reason,
            };
            if limit.name.trim().is_empty() {
                return Err(invalid("must not be empty".into()));
            }
            let built_in = [
                IVS_QUOTA_LIMIT_NAME,
                DISCONNECT_QUOTA_LIMIT_NAME,
                SEND_EVENT_QUOTA_LIMIT_NAME,
                DELETE_MESSAGE_QUOTA_LIMIT_NAME,
            ];
            if built_in.contains(&limit.name.as_str()) {
                return Err(invalid(format!(
                    "{:?} names a built-in IVS quota limit (ivs.quota, ivs.disconnect_quota, \
                     ivs.send_event_quota, ivs.delete_message_quota)",
                    limit.name
                )));
            }
            if !names.insert(limit.name.as_str()) {
                return Err(invalid(format!(
                    "{:?} names an earlier limit too; names must be unique",
                    limit.name
                )));
            }
        }
        Ok(())
    }
}

/// Refuses `value` below `min` for `setting`.
fn at_least(setting: &str, value: Duration, min: Duration) -> Result<(), ConfigError> {
    if value < min {
        return Err(ConfigError::Invalid {
            setting: setting.into(),
            reason: format!(
                "must be at least {}, got {}",
                humantime::format_duration(min),
                humantime::format_duration(value)
            ),
        });
    }
    Ok(())
}

/// A setting's path as written in the file and in validation errors: `rate_limits[2].rate`.
fn setting_path(path: &[String]) -> String {
    let mut setting = String::new();
    for segment in path {
        if segment.bytes().all(|b| b.is_ascii_digit()) {
            setting.push_str(&format!("[{segment}]"));
        } else {
            if !setting.is_empty() {
                setting.push('.');
            }
            setting.push_str(&segment.to_ascii_lowercase());
        }
    }
    setting
}

/// Turns figment's errors into one line per problem: `setting: why (where it came from)`.
fn describe(errors: figment::Error) -> ConfigError {
    let problems: Vec<String> = errors
        .into_iter()
        .map(|e| {
            let setting = setting_path(&e.path);
            let origin = match &e.metadata {
                Some(md) if md.name.contains("environment") => format!(
                    " (environment variable {ENV_PREFIX}{})",
                    e.path.join("__").to_ascii_uppercase()
                ),
                Some(md) => match &md.source {
                    Some(source) => format!(" (in {source})"),
                    None => format!(" ({})", md.name),
                },
                None => String::new(),
            };
            if setting.is_empty() {
                format!("{}{origin}", e.kind)
            } else {
                format!("{setting}: {}{origin}", e.kind)
            }
        })
        .collect();
    ConfigError::Parse(problems.join("; "))
}

#[cfg(test)]
mod tests;
