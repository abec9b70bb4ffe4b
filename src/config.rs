//! The service's one configuration: embedded defaults, then a TOML file (`--config PATH`), then `CTS_*`
//! environment variables, each overriding the one before.
//!
//! Environment names are the setting's path in upper case, prefixed with `CTS_`, with `__` between a
//! section and its field: `listen_addr` is `CTS_LISTEN_ADDR`, `local_issuer.keys_file` is
//! `CTS_LOCAL_ISSUER__KEYS_FILE`. Durations are written as humans write them: `"60s"`, `"2m"`, `"500ms"`.
//!
//! A bad value stops start-up with an error naming the setting, where it came from, and why.

use std::{
    collections::{BTreeMap, HashSet},
    net::SocketAddr,
    num::{NonZeroU32, NonZeroUsize},
    path::{Path, PathBuf},
    time::Duration,
};

use figment::{
    Figment,
    providers::{Env, Format, Toml},
};
use serde::{Deserialize, Serialize};

use crate::identity::{CertificateName, IdentitySource};
use crate::ratelimit::{FailureMode, Limit, gcra::Rate};

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
    /// parsed. The largest valid request is under 4 KiB. Default `65536`; at least `8192`.
    pub max_request_bytes: usize,

    /// Most CreateChatToken calls in flight at once on this replica; more are shed at once with
    /// UNAVAILABLE (health checks and reflection are never shed). Default `1024`; at least 1.
    pub max_concurrent_calls: NonZeroUsize,

    /// How often policy and TLS files are checked for changes; SIGHUP reloads both at once.
    /// Default `10s`; at least `100ms`.
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,

    /// TLS termination. Absent: plaintext HTTP/2 (behind a mesh sidecar, or for development).
    pub tls: Option<TlsConfig>,

    /// How log lines are written: `"text"` for people, `"json"` for log collectors. `--log-format`
    /// overrides it. Default `"text"`.
    pub log_format: crate::telemetry::LogFormat,

    /// How callers are identified.
    pub identity: IdentityConfig,

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

    /// Per-connection limits and timeouts of the listener. See the README's "Limits and timeouts".
    pub transport: TransportConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen_addr: SocketAddr::from(([127, 0, 0, 1], 50051)),
            shutdown_drain_delay: Duration::from_secs(5),
            shutdown_grace_period: Duration::from_secs(20),
            max_request_bytes: 64 * 1024,
            max_concurrent_calls: NonZeroUsize::new(1024).expect("1024 is not zero"),
            reload_interval: Duration::from_secs(10),
            tls: None,
            log_format: crate::telemetry::LogFormat::Text,
            identity: IdentityConfig::default(),
            policy: PolicyConfig::default(),
            issuer: IssuerKind::Local,
            ivs: IvsConfig::default(),
            local_issuer: LocalIssuerConfig::default(),
            rate_limits: Vec::new(),
            limiter: LimiterConfig::default(),
            http_api: HttpApiConfig::default(),
            moderation: ModerationConfig::default(),
            transport: TransportConfig::default(),
        }
    }
}

/// Per-connection limits and timeouts, so one client or a few cannot hold what every caller needs.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TransportConfig {
    /// HTTP/2 streams one connection may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS). Well below
    /// `max_concurrent_calls`, so no single connection can take every call slot; gRPC clients open more
    /// connections when they need more. Default `128`.
    pub max_concurrent_streams: NonZeroU32,

    /// Largest header block a client may send, in bytes (SETTINGS_MAX_HEADER_LIST_SIZE). Identity
    /// headers, trace context and grpc-timeout fit in a few KiB. Default `16384`.
    pub max_header_list_bytes: NonZeroU32,

    /// How often an HTTP/2 PING checks that a connection's peer is still there. Default `30s`.
    #[serde(with = "humantime_serde")]
    pub keepalive_interval: Duration,

    /// How long a PING may go unanswered before the connection is closed: a silent peer's connection is
    /// not held forever. Default `10s`.
    #[serde(with = "humantime_serde")]
    pub keepalive_timeout: Duration,

    /// How long a connection may live before the server sends GOAWAY, so clients reconnect and spread
    /// over replicas added since (gRPC's MAX_CONNECTION_AGE). Default `30m`.
    #[serde(with = "humantime_serde")]
    pub max_connection_age: Duration,

    /// After that GOAWAY, how long calls still open on the connection may take before it is closed.
    /// Default `30s`.
    #[serde(with = "humantime_serde")]
    pub max_connection_age_grace: Duration,

    /// The longest any call may take, including receiving its request message: applies when the client
    /// sends no `grpc-timeout` or a longer one, so a stream that never sends its body is ended. Default
    /// `30s`; at least `1s`.
    #[serde(with = "humantime_serde")]
    pub max_call_duration: Duration,

    /// Connections open at once on this replica, TLS handshakes included; one more is accepted and
    /// closed at once, so its client tries another replica. Each open connection costs a file
    /// descriptor and some tens of KiB of buffers. Default `4096`.
    pub max_connections: NonZeroUsize,

    /// How long a new connection may stay silent: its first request bytes (the HTTP/2 preface, or an
    /// HTTP/1.1 request line) must arrive this soon after it is accepted, or after its TLS handshake.
    /// Clients send them at once. Default `5s`; at least `100ms`.
    #[serde(with = "humantime_serde")]
    pub preface_timeout: Duration,

    /// A connection without a call open for this long is closed (gRPC's MAX_CONNECTION_IDLE): HTTP/2
    /// PINGs keep a connection alive only while calls are open. Clients reconnect on their next call.
    /// Default `5m`; at least `1s`.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            max_concurrent_streams: NonZeroU32::new(128).expect("128 is not zero"),
            max_header_list_bytes: NonZeroU32::new(16 * 1024).expect("16384 is not zero"),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            max_connection_age: Duration::from_secs(30 * 60),
            max_connection_age_grace: Duration::from_secs(30),
            max_call_duration: Duration::from_secs(30),
            max_connections: NonZeroUsize::new(4096).expect("4096 is not zero"),
            preface_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(5 * 60),
        }
    }
}

/// Settings of the IVS Chat REST-JSON API. See [`crate::rest`].
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpApiConfig {
    /// Whether the listener also answers IVS Chat's REST-JSON API over HTTP/1.1 and HTTP/2, so
    /// `aws ivschat create-chat-token --endpoint-url …` and every AWS SDK work unchanged. Off: only gRPC is
    /// served. Default `true`.
    pub enabled: bool,

    /// Largest request body accepted, in bytes; larger ones are refused with 413 before they are parsed.
    /// The largest valid request is under 8 KiB even with every character of its attributes escaped.
    /// Default `16384`; between `8192` and `1048576`.
    pub max_body_bytes: usize,
}

impl Default for HttpApiConfig {
    fn default() -> Self {
        HttpApiConfig {
            enabled: true,
            max_body_bytes: 16 * 1024,
        }
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

/// TLS settings. Files are re-read when they change (every `reload_interval`), so certificates rotated
/// by cert-manager or SPIRE take effect without a restart; connections already open keep their session.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The server's certificate chain, PEM, leaf first. Required.
    pub cert_file: PathBuf,
    /// The server's private key, PEM (PKCS#8, PKCS#1 or SEC1). Required.
    pub key_file: PathBuf,
    /// CA certificates, PEM, that client certificates must chain to. When set, every client must present
    /// a valid certificate (mutual TLS) or the handshake fails; needed by the `mtls` identity source.
    pub client_ca_file: Option<PathBuf>,
    /// How long a client may take to complete the TLS handshake. Default `10s`.
    #[serde(default = "default_handshake_timeout", with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// TLS handshakes in progress at once; a connection arriving while this many are is closed at once.
    /// A handshake costs a signature (about a millisecond of CPU), so this bounds what a burst of new
    /// connections can take from calls in flight. Default `128`.
    #[serde(default = "default_max_concurrent_handshakes")]
    pub max_concurrent_handshakes: NonZeroUsize,
}

fn default_handshake_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_max_concurrent_handshakes() -> NonZeroUsize {
    NonZeroUsize::new(128).expect("128 is not zero")
}

/// Policy settings. See [`crate::policy`] for what a policy sees.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
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
}

impl PolicyConfig {
    /// Where the policies these settings name come from.
    pub fn source(&self) -> crate::policy::PolicySource {
        if self.files.is_empty() {
            crate::policy::PolicySource::Development
        } else {
            crate::policy::PolicySource::Files {
                policies: self.files.clone(),
                entities: self.entities_file.clone(),
            }
        }
    }
}

/// Where caller identities come from. See [`crate::identity`] and the README's "Security model".
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct IdentityConfig {
    /// Sources tried in order, first match wins: `"mtls"` (needs `tls.client_ca_file`), `"xfcc"` (only
    /// behind an Envoy/Istio sidecar that sets the header), `"sigv4"` (AWS Signature Version 4 on the HTTP
    /// API; needs `identity.sigv4.credentials_file`), `"header"` (development only). Default `["header"]`.
    pub sources: Vec<IdentitySource>,

    /// The header the `header` source reads. Default `"x-caller-id"`.
    pub header: String,

    /// Which names of a client certificate the `mtls` source accepts, tried in order: `"uri"` (URI SAN,
    /// where SPIFFE ids live), `"dns"` (DNS SAN), `"cn"` (subject common name). A DNS SAN or CN that looks
    /// like a URI is always refused. Default `["uri"]`: meshes and SPIRE issue URI SANs, and a
    /// certificate without one says nothing a policy written for SPIFFE ids can rely on.
    pub certificate_names: Vec<CertificateName>,

    /// Whether callers no source identifies are let through as `anonymous_principal` (policy still
    /// applies). Off means they get UNAUTHENTICATED. Default `true`, for local development; off loopback
    /// it needs `trust_network_in_front`.
    pub allow_anonymous: bool,

    /// The principal anonymous callers get in policy and rate limits. Default `"anonymous"`.
    pub anonymous_principal: String,

    /// Declares that everything able to reach `listen_addr` is trusted to say who it is: the `header`
    /// source and `allow_anonymous` believe any client, so on a non-loopback `listen_addr` the server
    /// refuses to start with either unless this is `true`. Set it only when a gateway or mesh in front
    /// authenticates callers and overwrites the identity header. Default `false`.
    pub trust_network_in_front: bool,

    /// Settings of the `sigv4` source.
    pub sigv4: Sigv4Config,
}

/// Settings of the `sigv4` identity source: AWS Signature Version 4 on the HTTP API, checked against
/// access keys this service issues. See [`crate::identity::sigv4`].
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Sigv4Config {
    /// TOML file of `[[keys]]` with `access_key_id`, `secret_access_key` and `principal`: who signs with
    /// which key. Re-read when it changes and on SIGHUP. Required when `sources` has `"sigv4"`.
    /// Default: none.
    pub credentials_file: Option<PathBuf>,

    /// Regions a signature's credential scope may name (callers sign for a region, as for any AWS
    /// endpoint). Default `[]`: any region.
    pub regions: Vec<String>,

    /// How far a request's `x-amz-date` may be from the server's clock, either way; older signed requests
    /// cannot be replayed. Default `5m` (what AWS allows); between `1s` and `15m`.
    #[serde(with = "humantime_serde")]
    pub max_clock_skew: Duration,
}

impl Default for Sigv4Config {
    fn default() -> Self {
        Sigv4Config {
            credentials_file: None,
            regions: Vec::new(),
            max_clock_skew: Duration::from_secs(300),
        }
    }
}

impl Default for IdentityConfig {
    fn default() -> Self {
        IdentityConfig {
            sources: vec![IdentitySource::Header],
            header: "x-caller-id".into(),
            certificate_names: vec![CertificateName::Uri],
            allow_anonymous: true,
            anonymous_principal: "anonymous".into(),
            trust_network_in_front: false,
            sigv4: Sigv4Config::default(),
        }
    }
}

impl IdentityConfig {
    /// The resolver these settings describe. With the `sigv4` source it loads the credentials file and
    /// re-reads it every `reload_interval` when it changes, so call it once, inside a tokio runtime.
    pub fn resolver(
        &self,
        reload_interval: Duration,
    ) -> Result<crate::identity::Resolver, ConfigError> {
        let resolver = crate::identity::Resolver::new(
            self.sources.clone(),
            &self.header,
            self.certificate_names.clone(),
            self.allow_anonymous
                .then(|| self.anonymous_principal.clone()),
        );
        if !self.sources.contains(&IdentitySource::Sigv4) {
            return Ok(resolver);
        }
        let file = self
            .sigv4
            .credentials_file
            .as_deref()
            .ok_or_else(|| ConfigError::Invalid {
                setting: "identity.sigv4.credentials_file".into(),
                reason: "is required when identity.sources has \"sigv4\"".into(),
            })?;
        let verifier = crate::identity::sigv4::Verifier::load(file, &self.sigv4).map_err(|e| {
            ConfigError::Invalid {
                setting: "identity.sigv4.credentials_file".into(),
                reason: e.to_string(),
            }
        })?;
        let verifier = std::sync::Arc::new(verifier);
        verifier.watch(reload_interval);
        Ok(resolver.with_sigv4(verifier))
    }

    /// Refuses settings that believe any client, on a listener other clients can reach.
    fn check_trust(&self, listen_addr: SocketAddr) -> Result<(), ConfigError> {
        if listen_addr.ip().is_loopback() || self.trust_network_in_front {
            return Ok(());
        }
        let believes_anyone = match (
            self.sources.contains(&IdentitySource::Header),
            self.allow_anonymous,
        ) {
            (true, true) => {
                "identity.sources includes \"header\" and identity.allow_anonymous is true"
            }
            (true, false) => "identity.sources includes \"header\"",
            (false, true) => "identity.allow_anonymous is true",
            (false, false) => return Ok(()),
        };
        Err(ConfigError::Invalid {
            setting: "identity.trust_network_in_front".into(),
            reason: format!(
                "{believes_anyone}, so any client could choose who it is, and listen_addr {listen_addr} \
                 is not loopback; use identity.sources = [\"mtls\"] or [\"xfcc\"] with \
                 identity.allow_anonymous = false, or set identity.trust_network_in_front = true if a \
                 proxy in front authenticates every caller"
            ),
        })
    }
}

/// The issuers a deployment can choose from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum IssuerKind {
    /// The built-in issuer: PASETO v4.local tokens encrypted with our own keys.
    Local,
    /// Amazon IVS Chat's CreateChatToken, through aws-sdk-ivschat.
    Ivs,
}

impl IssuerKind {
    /// The issuer's name in logs, spans, metrics and audit events.
    pub fn name(self) -> &'static str {
        match self {
            IssuerKind::Local => "local",
            IssuerKind::Ivs => "ivs",
        }
    }
}

/// The regions where Amazon IVS Chat exists (its API endpoints), the default of `ivs.allowed_regions`.
pub const IVS_CHAT_REGIONS: [&str; 7] = [
    "us-east-1",
    "us-west-2",
    "eu-west-1",
    "eu-central-1",
    "ap-northeast-1",
    "ap-northeast-2",
    "ap-south-1",
];

/// Settings of the IVS Chat issuer. Credentials come from the standard AWS chain (environment, shared
/// profile, web identity / IRSA, ECS, EC2 instance metadata); the region of each call comes from the room
/// ARN.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct IvsConfig {
    /// Send every call here instead of the regional IVS Chat endpoint, e.g. `http://127.0.0.1:4566` for the
    /// stub (`cargo run --example ivschat_stub`). Requests are still signed for the room's region.
    /// Default: none (the real endpoints).
    pub endpoint_url: Option<String>,

    /// Regions whose rooms may be used; others are refused with INVALID_ARGUMENT before any budget is spent
    /// or AWS is called. It bounds what a request can make the service hold (one SDK client, one quota key,
    /// one metric label per region), so it cannot be empty. Default: the regions where IVS Chat exists
    /// (us-east-1, us-west-2, eu-west-1, eu-central-1, ap-northeast-1, ap-northeast-2, ap-south-1).
    pub allowed_regions: Vec<String>,

    /// AWS accounts whose rooms may be used; others are refused with INVALID_ARGUMENT before any budget is
    /// spent or AWS is called. Default `[]`: any account.
    pub allowed_accounts: Vec<String>,

    /// Role to assume (account id → role ARN) for rooms owned by other AWS accounts. Rooms of accounts not
    /// listed use the service's own credentials. Default: none.
    pub assume_roles: BTreeMap<String, String>,

    /// Longest wait to open a connection to IVS Chat. Default `1s`.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,

    /// Longest wait for IVS Chat's response once the request is sent. Default `2s`.
    #[serde(with = "humantime_serde")]
    pub read_timeout: Duration,

    /// Longest time one attempt may take, connect to last byte. Default `3s`.
    #[serde(with = "humantime_serde")]
    pub attempt_timeout: Duration,

    /// Longest time the whole call may take, retries included. The caller's gRPC deadline, when shorter,
    /// wins. Default `5s`.
    #[serde(with = "humantime_serde")]
    pub operation_timeout: Duration,

    /// Attempts per call, the first included; throttling, 5xx and connection errors are retried with
    /// exponential backoff. Default `3`; at least 1.
    pub max_attempts: NonZeroU32,

    /// First retry's backoff (jittered, doubling up to 20s). Default `100ms`.
    #[serde(with = "humantime_serde")]
    pub initial_backoff: Duration,

    /// Upstream quota guard: CreateChatToken calls per AWS account and region across this deployment
    /// (IVS allows 200 per second, not adjustable). A built-in limit of the rate-limit layer, checked with
    /// the others in one store call: calls over it are refused with RESOURCE_EXHAUSTED before they reach
    /// AWS and consume no other budget. Default `"200/s"`.
    pub quota: Rate,

    /// Calls admitted at once from a fully recovered quota. Default `20`; at least 1.
    pub quota_burst: NonZeroU32,

    /// Upstream quota guard for DisconnectUser (ModerationService DisconnectUser and BanUser): calls per AWS
    /// account and region across this deployment (IVS allows 100 per second, not adjustable). Calls over it
    /// are refused with RESOURCE_EXHAUSTED before they reach AWS. Default `"100/s"`.
    pub disconnect_quota: Rate,

    /// DisconnectUser calls admitted at once from a fully recovered quota. Default `10`; at least 1.
    pub disconnect_quota_burst: NonZeroU32,
}

impl Default for IvsConfig {
    fn default() -> Self {
        IvsConfig {
            endpoint_url: None,
            allowed_regions: IVS_CHAT_REGIONS.map(String::from).to_vec(),
            allowed_accounts: Vec::new(),
            assume_roles: BTreeMap::new(),
            connect_timeout: Duration::from_secs(1),
            read_timeout: Duration::from_secs(2),
            attempt_timeout: Duration::from_secs(3),
            operation_timeout: Duration::from_secs(5),
            max_attempts: NonZeroU32::new(3).expect("3 is not zero"),
            initial_backoff: Duration::from_millis(100),
            quota: Rate::parse("200/s").expect("a valid rate"),
            quota_burst: NonZeroU32::new(20).expect("20 is not zero"),
            disconnect_quota: Rate::parse("100/s").expect("a valid rate"),
            disconnect_quota_burst: NonZeroU32::new(10).expect("10 is not zero"),
        }
    }
}

/// Settings of the local issuer.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LocalIssuerConfig {
    /// How long a minted token can be used to open a connection. IVS Chat's tokens last one minute.
    /// Default `60s`; between `1s` and `1h`.
    #[serde(with = "humantime_serde")]
    pub token_ttl: Duration,

    /// A key set file: several PASERK `k4.local` keys, one marked `active = true` for new tokens, all
    /// accepted when verifying; make keys with `chat-token-service generate-key`. Re-read when it changes
    /// (every `reload_interval`) and on SIGHUP, so keys rotate without a restart. Should be readable by the
    /// service's user only (a warning says so otherwise). Default: none.
    pub keys_file: Option<PathBuf>,

    /// A single PASERK `k4.local` key, usually given as `CTS_LOCAL_ISSUER__KEY` from a secret store.
    /// Not together with `keys_file`. With neither, the service generates an ephemeral key at start-up
    /// and tokens do not survive a restart. Default: none.
    pub key: Option<Secret>,
}

impl Default for LocalIssuerConfig {
    fn default() -> Self {
        LocalIssuerConfig {
            token_ttl: Duration::from_secs(60),
            keys_file: None,
            key: None,
        }
    }
}

/// Settings of the rate limiter's state store.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimiterConfig {
    /// Where limit state lives: `"memory"`, in each replica (with `R` replicas a limit admits up to `R`
    /// times its rate), or `"redis"`, shared by every replica. Default `"memory"`.
    pub backend: LimiterBackend,

    /// Most keys (one per limit and caller, user, room… as the limit counts) whose state is kept in memory,
    /// so a flood of distinct users cannot exhaust it. Each costs about 50 bytes (a digest of the key,
    /// not the key). Beyond the cap the keys closest to recovery are forgotten, which can only make a limit more
    /// lenient. With the Redis backend it bounds the fail_open fallback. Default `1000000`; at least 1.
    pub max_tracked_keys: NonZeroUsize,

    /// The Redis to share state through: `redis://host:6379`, `rediss://` for TLS, `user:password@` for
    /// auth, `/N` for a database. May carry a password, so it is never logged or shown; prefer the
    /// `CTS_LIMITER__REDIS_URL` environment variable from a secret store. Required with `backend = "redis"`.
    pub redis_url: Option<Secret>,

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
    pub fn redis_url(&self) -> Option<&Secret> {
        self.redis_url
            .as_ref()
            .filter(|_| self.backend == LimiterBackend::Redis)
    }

    /// Checks the Redis settings together. Errors never show the URL: it may carry a password.
    fn check(&self) -> Result<(), ConfigError> {
        let invalid = |setting: &str, reason: String| ConfigError::Invalid {
            setting: format!("limiter.{setting}"),
            reason,
        };
        let url = match (self.backend, &self.redis_url) {
            (LimiterBackend::Memory, None) => return Ok(()),
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
        if redis::IntoConnectionInfo::into_connection_info(url.expose()).is_err() {
            return Err(invalid(
                "redis_url",
                "is not a Redis URL: redis://[user:password@]host[:port][/db], or rediss:// for TLS".into(),
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

pub use crate::domain::Secret;

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
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let mut figment = Figment::new();
        if let Some(file) = file {
            figment = figment.merge(Toml::file_exact(file));
        }
        let config: Config = figment
            // CTS_CONFIG names the file (a flag's environment form), not a setting.
            .merge(Env::prefixed(ENV_PREFIX).ignore(&["config"]).split("__"))
            .extract()
            .map_err(describe)?;
        config.validate()?;
        Ok(config)
    }

    /// Range checks that types alone cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.transport.max_call_duration < Duration::from_secs(1) {
            return Err(ConfigError::Invalid {
                setting: "transport.max_call_duration".into(),
                reason: format!(
                    "must be at least 1s, got {}",
                    humantime::format_duration(self.transport.max_call_duration)
                ),
            });
        }
        for (setting, value, min) in [
            (
                "transport.preface_timeout",
                self.transport.preface_timeout,
                Duration::from_millis(100),
            ),
            (
                "transport.idle_timeout",
                self.transport.idle_timeout,
                Duration::from_secs(1),
            ),
        ] {
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
        }
        let ttl = self.local_issuer.token_ttl;
        if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&ttl) {
            return Err(ConfigError::Invalid {
                setting: "local_issuer.token_ttl".into(),
                reason: format!(
                    "must be between 1s and 1h, got {}",
                    humantime::format_duration(ttl)
                ),
            });
        }
        if let Err(e) = http::HeaderName::from_bytes(self.identity.header.as_bytes()) {
            return Err(ConfigError::Invalid {
                setting: "identity.header".into(),
                reason: format!("not a valid header name: {e}"),
            });
        }
        if self.identity.sources.contains(&IdentitySource::Mtls)
            && self
                .tls
                .as_ref()
                .and_then(|t| t.client_ca_file.as_ref())
                .is_none()
        {
            return Err(ConfigError::Invalid {
                setting: "identity.sources".into(),
                reason:
                    "the mtls source needs tls.client_ca_file (and tls.cert_file, tls.key_file)"
                        .into(),
            });
        }
        if self.identity.certificate_names.is_empty() {
            return Err(ConfigError::Invalid {
                setting: "identity.certificate_names".into(),
                reason: "must name at least one of \"uri\", \"dns\", \"cn\"".into(),
            });
        }
        if self.policy.files.is_empty() && !self.listen_addr.ip().is_loopback() {
            return Err(ConfigError::Invalid {
                setting: "policy.files".into(),
                reason: format!(
                    "no policy files: the development policy permits every request, so it is only \
                     allowed on a loopback listen_addr, not {}; configure policies (see \
                     deploy/policy/production.cedar)",
                    self.listen_addr
                ),
            });
        }
        self.identity.check_trust(self.listen_addr)?;
        if self.policy.entities_file.is_some() && self.policy.files.is_empty() {
            return Err(ConfigError::Invalid {
                setting: "policy.entities_file".into(),
                reason: "entities need policy files that use them (policy.files is empty)".into(),
            });
        }
        if self.moderation.max_ban_duration < Duration::from_secs(1) {
            return Err(ConfigError::Invalid {
                setting: "moderation.max_ban_duration".into(),
                reason: format!(
                    "must be at least 1s, got {}",
                    humantime::format_duration(self.moderation.max_ban_duration)
                ),
            });
        }
        if self.local_issuer.keys_file.is_some() && self.local_issuer.key.is_some() {
            return Err(ConfigError::Invalid {
                setting: "local_issuer.key".into(),
                reason: "set either local_issuer.key or local_issuer.keys_file, not both".into(),
            });
        }
        if self.ivs.allowed_regions.is_empty() {
            return Err(ConfigError::Invalid {
                setting: "ivs.allowed_regions".into(),
                reason: format!(
                    "must name at least one region (IVS Chat's: {})",
                    IVS_CHAT_REGIONS.join(", ")
                ),
            });
        }
        for region in &self.ivs.allowed_regions {
            let is_region = !region.is_empty()
                && region
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
            if !is_region {
                return Err(ConfigError::Invalid {
                    setting: "ivs.allowed_regions".into(),
                    reason: format!("{region:?} is not an AWS region name"),
                });
            }
        }
        for (account, role) in &self.ivs.assume_roles {
            if account.is_empty() || !account.bytes().all(|b| b.is_ascii_digit()) {
                return Err(ConfigError::Invalid {
                    setting: "ivs.assume_roles".into(),
                    reason: format!("{account:?} is not an AWS account id"),
                });
            }
            if !role.starts_with("arn:aws") || !role.contains(":role/") {
                return Err(ConfigError::Invalid {
                    setting: format!("ivs.assume_roles.{account}"),
                    reason: format!("{role:?} is not an IAM role ARN"),
                });
            }
        }
        if let Some(url) = &self.ivs.endpoint_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(ConfigError::Invalid {
                setting: "ivs.endpoint_url".into(),
                reason: format!("{url:?} must start with http:// or https://"),
            });
        }
        if self.reload_interval < Duration::from_millis(100) {
            return Err(ConfigError::Invalid {
                setting: "reload_interval".into(),
                reason: format!(
                    "must be at least 100ms, got {}",
                    humantime::format_duration(self.reload_interval)
                ),
            });
        }
        if self.max_request_bytes < 8192 {
            return Err(ConfigError::Invalid {
                setting: "max_request_bytes".into(),
                reason: format!(
                    "must be at least 8192 so every valid request fits, got {}",
                    self.max_request_bytes
                ),
            });
        }
        if !(8192..=1024 * 1024).contains(&self.http_api.max_body_bytes) {
            return Err(ConfigError::Invalid {
                setting: "http_api.max_body_bytes".into(),
                reason: format!(
                    "must be between 8192 and 1048576, got {}",
                    self.http_api.max_body_bytes
                ),
            });
        }
        if self.identity.sources.contains(&IdentitySource::Sigv4) {
            if self.identity.sigv4.credentials_file.is_none() {
                return Err(ConfigError::Invalid {
                    setting: "identity.sigv4.credentials_file".into(),
                    reason: "is required when identity.sources has \"sigv4\"".into(),
                });
            }
            if !self.http_api.enabled {
                return Err(ConfigError::Invalid {
                    setting: "identity.sources".into(),
                    reason: "the sigv4 source identifies HTTP API callers, but http_api.enabled is false"
                        .into(),
                });
            }
        }
        let skew = self.identity.sigv4.max_clock_skew;
        if !(Duration::from_secs(1)..=Duration::from_secs(900)).contains(&skew) {
            return Err(ConfigError::Invalid {
                setting: "identity.sigv4.max_clock_skew".into(),
                reason: format!(
                    "must be between 1s and 15m, got {}",
                    humantime::format_duration(skew)
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
            if [
                crate::ratelimit::IVS_QUOTA_LIMIT_NAME,
                crate::ratelimit::DISCONNECT_QUOTA_LIMIT_NAME,
            ]
            .contains(&limit.name.as_str())
            {
                return Err(invalid(format!(
                    "{:?} names a built-in IVS quota limit (ivs.quota, ivs.disconnect_quota)",
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
mod tests {
    use std::collections::BTreeSet;

    use super::*;

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
        assert_eq!(config.max_request_bytes, 65536);
        assert_eq!(config.issuer, IssuerKind::Local);
        assert_eq!(config.local_issuer.token_ttl, Duration::from_secs(60));
    }

    const EXAMPLE: &str = include_str!("../deploy/config.example.toml");

    /// The example with every commented-out setting and section header put back in: a `#` line whose
    /// rest parses as TOML on its own (`key = value`, `[section]`, `[[array]]`); prose does not.
    fn uncommented_example() -> String {
        EXAMPLE
            .lines()
            .map(|line| match line.trim_start().strip_prefix('#') {
                Some(rest)
                    if rest.trim().parse::<toml::Table>().is_ok() && !rest.trim().is_empty() =>
                {
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
            serde_json::Value::Object(fields)
                if !fields.is_empty() && prefix != "ivs.assume_roles" =>
            {
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

    fn paths_of(config: &Config) -> BTreeSet<String> {
        let mut paths = BTreeSet::new();
        setting_paths(&serde_json::to_value(config).unwrap(), "", &mut paths);
        paths
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
                cert_file: "c".into(),
                key_file: "k".into(),
                client_ca_file: Some("ca".into()),
                handshake_timeout: default_handshake_timeout(),
                max_concurrent_handshakes: default_max_concurrent_handshakes(),
            }),
            rate_limits: vec![Limit {
                name: "per-caller".into(),
                key: crate::ratelimit::LimitKey::Caller,
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
        let config = load_str(include_str!("../deploy/config.production.example.toml")).unwrap();
        assert!(!config.identity.allow_anonymous);
        assert_eq!(config.identity.sources, [IdentitySource::Mtls]);
        assert!(config.tls.is_some());
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
                err.contains("local_issuer.token_ttl: ")
                    && err.contains("CTS_LOCAL_ISSUER__TOKEN_TTL"),
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
             [identity]\nsources = [\"xfcc\"]\nallow_anonymous = false",
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
            ("sources = [\"xfcc\"]", "identity.allow_anonymous is true"),
            (
                "sources = [\"xfcc\", \"header\"]\nallow_anonymous = false",
                "identity.sources includes \"header\",",
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
        assert_eq!(limits[1].key, crate::ratelimit::LimitKey::User);
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
                other => panic!("{toml}: expected {setting} to be refused, got {other:?}"),
            }
        }
    }

    #[test]
    fn the_key_never_shows_in_debug_output() {
        let config = load_str("[local_issuer]\nkey = \"k4.local.very-secret\"").unwrap();
        assert!(!format!("{config:?}").contains("very-secret"));
    }
}
