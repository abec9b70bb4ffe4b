//! `issuer`, `[ivs]` and `[local_issuer]`: who mints the tokens.

use std::{collections::BTreeMap, num::NonZeroU32, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

use super::ConfigError;
use crate::domain::{AccountId, Rate, Region, Secret};

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
    pub endpoint_url: Option<EndpointUrl>,

    /// Regions whose rooms may be used; others are refused with INVALID_ARGUMENT before any budget is spent
    /// or AWS is called. It bounds what a request can make the service hold (one SDK client, one quota key,
    /// one metric label per region), so it cannot be empty. Default: the regions where IVS Chat exists
    /// (us-east-1, us-west-2, eu-west-1, eu-central-1, ap-northeast-1, ap-northeast-2, ap-south-1).
    pub allowed_regions: Vec<Region>,

    /// AWS accounts whose rooms may be used; others are refused with INVALID_ARGUMENT before any budget is
    /// spent or AWS is called. Default `[]`: any account.
    pub allowed_accounts: Vec<AccountId>,

    /// Role to assume (account id → role ARN) for rooms owned by other AWS accounts. Rooms of accounts not
    /// listed use the service's own credentials. Default: none.
    pub assume_roles: BTreeMap<AccountId, RoleArn>,

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

    /// Upstream quota guard for SendEvent (MessagingService SendEvent and `POST /SendEvent`): calls per AWS
    /// account and region across this deployment. Default `"100/s"`: IVS Chat's SendEvent quota, 100
    /// requests per second per account and region, not adjustable (IVS Chat User Guide, "IVS Chat Service
    /// Quotas", API call rate quotas). Calls over it are refused with RESOURCE_EXHAUSTED before they reach
    /// AWS and consume no other budget.
    pub send_event_quota: Rate,

    /// SendEvent calls admitted at once from a fully recovered quota. Default `10`; at least 1.
    pub send_event_quota_burst: NonZeroU32,

    /// Upstream quota guard for DeleteMessage (MessagingService DeleteMessage and `POST /DeleteMessage`):
    /// calls per AWS account and region across this deployment. Default `"100/s"`: IVS Chat's DeleteMessage
    /// quota, 100 requests per second per account and region, not adjustable (IVS Chat User Guide, "IVS
    /// Chat Service Quotas", API call rate quotas). Calls over it are refused with RESOURCE_EXHAUSTED before
    /// they reach AWS and consume no other budget.
    pub delete_message_quota: Rate,

    /// DeleteMessage calls admitted at once from a fully recovered quota. Default `10`; at least 1.
    pub delete_message_quota_burst: NonZeroU32,
}

impl Default for IvsConfig {
    fn default() -> Self {
        IvsConfig {
            endpoint_url: None,
            allowed_regions: IVS_CHAT_REGIONS
                .iter()
                .map(|region| Region::parse(region).expect("a region name"))
                .collect(),
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
            send_event_quota: Rate::parse("100/s").expect("a valid rate"),
            send_event_quota_burst: NonZeroU32::new(10).expect("10 is not zero"),
            delete_message_quota: Rate::parse("100/s").expect("a valid rate"),
            delete_message_quota_burst: NonZeroU32::new(10).expect("10 is not zero"),
        }
    }
}

impl IvsConfig {
    /// The rules of this section that its types do not hold.
    pub(super) fn check(&self) -> Result<(), ConfigError> {
        if self.allowed_regions.is_empty() {
            return Err(ConfigError::Invalid {
                setting: "ivs.allowed_regions".into(),
                reason: format!(
                    "must name at least one region (IVS Chat's: {})",
                    IVS_CHAT_REGIONS.join(", ")
                ),
            });
        }
        Ok(())
    }
}

/// An IAM role ARN to assume, `arn:aws…:iam::ACCOUNT:role/NAME`: checked at load.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct RoleArn(String);

impl RoleArn {
    /// Accepts ARNs of IAM roles (any partition).
    pub fn parse(arn: &str) -> Result<Self, String> {
        if arn.starts_with("arn:aws") && arn.contains(":role/") {
            Ok(RoleArn(arn.to_owned()))
        } else {
            Err(format!("{arn:?} is not an IAM role ARN"))
        }
    }

    /// The ARN.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for RoleArn {
    type Error = String;

    fn try_from(arn: String) -> Result<Self, String> {
        RoleArn::parse(&arn)
    }
}

impl From<RoleArn> for String {
    fn from(arn: RoleArn) -> String {
        arn.0
    }
}

/// Where every IVS call goes instead of the regional endpoint: an `http://` or `https://` URL with a host,
/// checked at load.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct EndpointUrl(String);

impl EndpointUrl {
    /// Accepts absolute `http://` and `https://` URLs.
    pub fn parse(url: &str) -> Result<Self, String> {
        let uri: http::Uri = url.parse().map_err(|_| format!("{url:?} is not a URL"))?;
        let scheme_ok = matches!(uri.scheme_str(), Some("http" | "https"));
        if scheme_ok && uri.host().is_some() {
            Ok(EndpointUrl(url.to_owned()))
        } else {
            Err(format!(
                "{url:?} must start with http:// or https:// and name a host"
            ))
        }
    }

    /// The URL as configured.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for EndpointUrl {
    type Error = String;

    fn try_from(url: String) -> Result<Self, String> {
        EndpointUrl::parse(&url)
    }
}

impl From<EndpointUrl> for String {
    fn from(url: EndpointUrl) -> String {
        url.0
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

    /// Where clients connect with the tokens (the self-hosted chat server), returned with every token as
    /// `chat_endpoint`: a `wss://`, `ws://`, `https://` or `http://` URL. Default: none (the field is
    /// empty and clients must know where to connect).
    pub chat_endpoint: Option<ChatEndpoint>,
}

/// Where a chat client connects: a `wss://`, `ws://`, `https://` or `http://` URL with a host, checked at
/// load.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct ChatEndpoint(String);

impl ChatEndpoint {
    /// Accepts absolute WebSocket and HTTP URLs.
    pub fn parse(url: &str) -> Result<Self, String> {
        let uri: http::Uri = url.parse().map_err(|_| format!("{url:?} is not a URL"))?;
        let scheme_ok = matches!(uri.scheme_str(), Some("wss" | "ws" | "https" | "http"));
        if scheme_ok && uri.host().is_some() {
            Ok(ChatEndpoint(url.to_owned()))
        } else {
            Err(format!(
                "{url:?} must start with wss://, ws://, https:// or http:// and name a host"
            ))
        }
    }

    /// The URL as configured.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ChatEndpoint {
    type Error = String;

    fn try_from(url: String) -> Result<Self, String> {
        ChatEndpoint::parse(&url)
    }
}

impl From<ChatEndpoint> for String {
    fn from(url: ChatEndpoint) -> String {
        url.0
    }
}

impl Default for LocalIssuerConfig {
    fn default() -> Self {
        LocalIssuerConfig {
            token_ttl: Duration::from_secs(60),
            keys_file: None,
            key: None,
            chat_endpoint: None,
        }
    }
}

impl LocalIssuerConfig {
    /// The rules of this section.
    pub(super) fn check(&self) -> Result<(), ConfigError> {
        let ttl = self.token_ttl;
        if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&ttl) {
            return Err(ConfigError::Invalid {
                setting: "local_issuer.token_ttl".into(),
                reason: format!(
                    "must be between 1s and 1h, got {}",
                    humantime::format_duration(ttl)
                ),
            });
        }
        if self.keys_file.is_some() && self.key.is_some() {
            return Err(ConfigError::Invalid {
                setting: "local_issuer.key".into(),
                reason: "set either local_issuer.key or local_issuer.keys_file, not both".into(),
            });
        }
        Ok(())
    }
}
