//! `[end_user]`: the identity providers whose tokens bind a request to its end user.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

use super::ConfigError;
use crate::domain::end_user::{DEFAULT_POLICY_CLAIMS, MAX_POLICY_CLAIMS};

/// Most issuers a deployment can trust.
pub const MAX_ISSUERS: usize = 16;
/// Most token attributes an issuer may fill from claims.
pub const MAX_CLAIM_ATTRIBUTES: usize = 8;

/// End-user tokens: a caller forwards its end user's own identity token in `header`, and a token that
/// verifies binds the request to the user it names. See docs/security.md, "End-user binding".
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct EndUserConfig {
    /// The request header (gRPC metadata key) carrying the end user's token, the same for both doors.
    /// Default `"x-end-user-token"`.
    #[serde(with = "super::identity::header_name")]
    pub header: http::HeaderName,

    /// Clock skew allowed on `exp`, `nbf` and `iat`, either way. Default `30s`; at most `5m`.
    #[serde(with = "humantime_serde")]
    pub leeway: Duration,

    /// The claims policies see in `context.end_user.claims`, each as a set of strings (a string claim is a
    /// one-element set; true, false and numbers are their JSON text). At most 16 names. Default
    /// `["groups"]`.
    pub claims: Vec<String>,

    /// How long a fetched JWK set is used before it is fetched again. If the identity provider cannot be
    /// reached then, the keys already fetched keep working. Default `1h`; between `1m` and `24h`.
    #[serde(with = "humantime_serde")]
    pub jwks_max_age: Duration,

    /// The least time between two fetches of one issuer's JWK set (on an unknown `kid`, at
    /// `jwks_max_age`, or after a failure), so a flood of tokens with made-up key ids cannot hammer the
    /// identity provider. Default `30s`; between `1s` and `1h`.
    #[serde(with = "humantime_serde")]
    pub jwks_min_refresh_interval: Duration,

    /// Longest time one fetch of a discovery document or JWK set may take, connect to last byte. Default
    /// `5s`; between `100ms` and `30s`.
    #[serde(with = "humantime_serde")]
    pub fetch_timeout: Duration,

    /// Largest discovery document or JWK set read, in bytes; a larger one is refused. Default `65536`;
    /// between `1024` and `1048576`.
    pub max_jwks_bytes: usize,

    /// Most keys kept per issuer; keys past it in a JWK set are left out (and logged). Default `16`;
    /// between 1 and 100.
    pub max_keys: usize,

    /// The identity providers trusted, each as `[[end_user.issuers]]`. At most 16. Default: none (a
    /// request carrying an end-user token is then refused: its issuer is not trusted).
    pub issuers: Vec<EndUserIssuer>,
}

impl Default for EndUserConfig {
    fn default() -> Self {
        EndUserConfig {
            header: http::HeaderName::from_static("x-end-user-token"),
            leeway: Duration::from_secs(30),
            claims: DEFAULT_POLICY_CLAIMS.map(str::to_owned).to_vec(),
            jwks_max_age: Duration::from_secs(3600),
            jwks_min_refresh_interval: Duration::from_secs(30),
            fetch_timeout: Duration::from_secs(5),
            max_jwks_bytes: 64 * 1024,
            max_keys: 16,
            issuers: Vec::new(),
        }
    }
}

/// A JWS algorithm an issuer may sign with. HMAC and `none` are not among them: a shared secret would let
/// anyone holding it mint any user's token, and `none` signs nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, Serialize)]
pub enum JwtAlgorithm {
    /// RSASSA-PKCS1-v1_5 with SHA-256, 2048 to 8192-bit keys.
    RS256,
    /// ECDSA on P-256 with SHA-256.
    ES256,
    /// Ed25519.
    EdDSA,
}

impl JwtAlgorithm {
    /// The algorithm's `alg` name.
    pub fn as_str(self) -> &'static str {
        match self {
            JwtAlgorithm::RS256 => "RS256",
            JwtAlgorithm::ES256 => "ES256",
            JwtAlgorithm::EdDSA => "EdDSA",
        }
    }
}

/// One identity provider.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EndUserIssuer {
    /// The issuer exactly as its tokens' `iss` claim says, e.g. `"https://accounts.example.com"`. Without
    /// `jwks_url` or `jwks_file` its keys are found by OpenID Connect discovery at
    /// `{issuer}/.well-known/openid-configuration`. Required.
    pub issuer: String,

    /// The audiences accepted: a token's `aud` must name at least one (for an ID token, the client id of
    /// the application the user signed in to). Required, at least one.
    pub audiences: Vec<String>,

    /// Where the issuer's JWK set is fetched, instead of the discovery document's `jwks_uri`. `https://`
    /// (plain `http://` only to a loopback address). Default: none.
    #[serde(default)]
    pub jwks_url: Option<FetchUrl>,

    /// A JWK set file instead of fetching one: re-read when it changes and on SIGHUP. Not together with
    /// `jwks_url`. Default: none.
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,

    /// The algorithms accepted from this issuer: `"RS256"`, `"ES256"`, `"EdDSA"`. Default all three.
    #[serde(default = "all_algorithms")]
    pub algorithms: Vec<JwtAlgorithm>,

    /// The claim that gives the user id. It must be a string. Default `"sub"`.
    #[serde(default = "sub")]
    pub user_id_claim: String,

    /// How the user id is made from that claim: the text with `{CLAIM}` (the claim's name in braces)
    /// replaced by its value, e.g. `"oidc|{sub}"`. Default: none (the claim's value itself).
    #[serde(default)]
    pub user_id_template: Option<String>,

    /// Tokens issued (`iat`) longer ago than this are refused, however long they would still be valid;
    /// `iat` is then required. Default: none (`exp` alone decides).
    #[serde(default, with = "humantime_serde")]
    pub max_token_age: Option<Duration>,

    /// Token attributes filled from string claims, attribute → claim, e.g. `{ displayName = "name" }`:
    /// they replace what the caller sent for the same attribute, within IVS's 1024-byte limit. At most 8.
    /// Default: none.
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
}

fn all_algorithms() -> Vec<JwtAlgorithm> {
    vec![
        JwtAlgorithm::RS256,
        JwtAlgorithm::ES256,
        JwtAlgorithm::EdDSA,
    ]
}

fn sub() -> String {
    "sub".into()
}

impl EndUserIssuer {
    /// Where this issuer's keys come from.
    pub fn key_source(&self) -> KeySource<'_> {
        match (&self.jwks_file, &self.jwks_url) {
            (Some(path), _) => KeySource::File(path),
            (None, Some(url)) => KeySource::Url(url),
            (None, None) => KeySource::Discovery,
        }
    }

    /// The discovery document's URL: `{issuer}/.well-known/openid-configuration`.
    pub fn discovery_url(&self) -> Result<FetchUrl, String> {
        FetchUrl::parse(&format!(
            "{}/.well-known/openid-configuration",
            self.issuer.trim_end_matches('/')
        ))
    }

    fn check(&self, index: usize) -> Result<(), ConfigError> {
        let invalid = |field: &str, reason: String| ConfigError::Invalid {
            setting: format!("end_user.issuers[{index}].{field}"),
            reason,
        };
        if self.issuer.is_empty() {
            return Err(invalid("issuer", "must not be empty".into()));
        }
        if self.key_source() == KeySource::Discovery {
            self.discovery_url().map_err(|why| {
                invalid(
                    "issuer",
                    format!(
                        "without jwks_url or jwks_file the keys are found by discovery, so the issuer must be \
                         an https:// URL: {why}"
                    ),
                )
            })?;
        }
        if self.jwks_file.is_some() && self.jwks_url.is_some() {
            return Err(invalid(
                "jwks_file",
                "set either jwks_file or jwks_url, not both".into(),
            ));
        }
        if self.audiences.is_empty() || self.audiences.iter().any(String::is_empty) {
            return Err(invalid(
                "audiences",
                "must name at least one audience, none empty: a token for another application must not pass"
                    .into(),
            ));
        }
        if self.algorithms.is_empty() {
            return Err(invalid(
                "algorithms",
                "must name at least one of \"RS256\", \"ES256\", \"EdDSA\"".into(),
            ));
        }
        if self.user_id_claim.is_empty() {
            return Err(invalid("user_id_claim", "must not be empty".into()));
        }
        if let Some(template) = &self.user_id_template {
            let placeholder = format!("{{{}}}", self.user_id_claim);
            if template.matches(&placeholder).count() != 1 {
                return Err(invalid(
                    "user_id_template",
                    format!("must contain {placeholder} exactly once, got {template:?}"),
                ));
            }
        }
        if self.max_token_age.is_some_and(|age| age.is_zero()) {
            return Err(invalid("max_token_age", "must be more than 0s".into()));
        }
        if self.attributes.len() > MAX_CLAIM_ATTRIBUTES
            || self
                .attributes
                .iter()
                .any(|(k, c)| k.is_empty() || c.is_empty())
        {
            return Err(invalid(
                "attributes",
                format!("at most {MAX_CLAIM_ATTRIBUTES} entries, neither key nor claim empty"),
            ));
        }
        Ok(())
    }
}

/// Where an issuer's keys come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeySource<'a> {
    /// A JWK set file, reloaded when it changes.
    File(&'a PathBuf),
    /// A JWK set fetched from this URL.
    Url(&'a FetchUrl),
    /// The discovery document's `jwks_uri`.
    Discovery,
}

impl EndUserConfig {
    /// The rules of this section that its types do not hold.
    pub(super) fn check(&self) -> Result<(), ConfigError> {
        let invalid = |setting: &str, reason: String| ConfigError::Invalid {
            setting: format!("end_user.{setting}"),
            reason,
        };
        let between = |setting: &str, value: Duration, min: Duration, max: Duration| {
            if (min..=max).contains(&value) {
                Ok(())
            } else {
                Err(invalid(
                    setting,
                    format!(
                        "must be between {} and {}, got {}",
                        humantime::format_duration(min),
                        humantime::format_duration(max),
                        humantime::format_duration(value)
                    ),
                ))
            }
        };
        between(
            "leeway",
            self.leeway,
            Duration::ZERO,
            Duration::from_secs(300),
        )?;
        between(
            "jwks_max_age",
            self.jwks_max_age,
            Duration::from_secs(60),
            Duration::from_secs(24 * 3600),
        )?;
        between(
            "jwks_min_refresh_interval",
            self.jwks_min_refresh_interval,
            Duration::from_secs(1),
            Duration::from_secs(3600),
        )?;
        between(
            "fetch_timeout",
            self.fetch_timeout,
            Duration::from_millis(100),
            Duration::from_secs(30),
        )?;
        if !(1024..=1024 * 1024).contains(&self.max_jwks_bytes) {
            return Err(invalid(
                "max_jwks_bytes",
                format!(
                    "must be between 1024 and 1048576, got {}",
                    self.max_jwks_bytes
                ),
            ));
        }
        if !(1..=100).contains(&self.max_keys) {
            return Err(invalid(
                "max_keys",
                format!("must be between 1 and 100, got {}", self.max_keys),
            ));
        }
        if self.claims.len() > MAX_POLICY_CLAIMS {
            return Err(invalid(
                "claims",
                format!(
                    "at most {MAX_POLICY_CLAIMS} claims, got {}",
                    self.claims.len()
                ),
            ));
        }
        for (index, claim) in self.claims.iter().enumerate() {
            if self.claims[..index].contains(claim) {
                return Err(invalid("claims", format!("{claim:?} is named twice")));
            }
            // Names go into the policy schema as quoted attribute names.
            let usable = !claim.is_empty()
                && claim.len() <= 64
                && claim
                    .chars()
                    .all(|c| c.is_ascii_graphic() && c != '"' && c != '\\');
            if !usable {
                return Err(invalid(
                    "claims",
                    format!(
                        "{claim:?}: claim names are 1 to 64 visible ASCII characters, without \" or \\"
                    ),
                ));
            }
        }
        if self.issuers.len() > MAX_ISSUERS {
            return Err(invalid(
                "issuers",
                format!("at most {MAX_ISSUERS} issuers, got {}", self.issuers.len()),
            ));
        }
        for (index, issuer) in self.issuers.iter().enumerate() {
            issuer.check(index)?;
            if self.issuers[..index]
                .iter()
                .any(|other| other.issuer == issuer.issuer)
            {
                return Err(invalid(
                    &format!("issuers[{index}].issuer"),
                    format!("{:?} is configured twice", issuer.issuer),
                ));
            }
        }
        Ok(())
    }
}

/// A URL keys are fetched from: `https://`, or `http://` to a loopback address only (a local identity
/// provider, tests), so keys never travel where anyone on the path could replace them. Checked at load.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct FetchUrl(http::Uri);

impl FetchUrl {
    /// Accepts absolute `https://` URLs, and `http://` ones whose host is a loopback address or
    /// `localhost`.
    pub fn parse(url: &str) -> Result<Self, String> {
        let uri: http::Uri = url.parse().map_err(|_| format!("{url:?} is not a URL"))?;
        let Some(host) = uri.host() else {
            return Err(format!("{url:?} names no host"));
        };
        let loopback = host == "localhost"
            || host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        match uri.scheme_str() {
            Some("https") => Ok(FetchUrl(uri)),
            Some("http") if loopback => Ok(FetchUrl(uri)),
            Some("http") => Err(format!(
                "{url:?}: keys are fetched over https:// (http:// only from a loopback address)"
            )),
            _ => Err(format!("{url:?} must start with https://")),
        }
    }

    /// The URL.
    pub fn uri(&self) -> &http::Uri {
        &self.0
    }
}

impl TryFrom<String> for FetchUrl {
    type Error = String;

    fn try_from(url: String) -> Result<Self, String> {
        FetchUrl::parse(&url)
    }
}

impl From<FetchUrl> for String {
    fn from(url: FetchUrl) -> String {
        url.0.to_string()
    }
}
