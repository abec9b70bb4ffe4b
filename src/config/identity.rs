//! `[identity]`: who is calling.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use super::{ConfigError, HttpApiConfig, TlsConfig};
use crate::domain::Region;

/// A place a caller's identity can come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum IdentitySource {
    /// The verified TLS client certificate.
    Mtls,
    /// The `x-forwarded-client-cert` header from a trusted sidecar.
    Xfcc,
    /// A plain header; development only.
    Header,
    /// An AWS SigV4 signature on an HTTP API request.
    Sigv4,
}

impl IdentitySource {
    /// The source's name, as the configuration spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            IdentitySource::Mtls => "mtls",
            IdentitySource::Xfcc => "xfcc",
            IdentitySource::Header => "header",
            IdentitySource::Sigv4 => "sigv4",
        }
    }
}

/// A name in a client certificate that can identify the caller, tried in the configured order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CertificateName {
    /// The first URI subject alternative name (SPIFFE ids live here).
    Uri,
    /// The first DNS subject alternative name.
    Dns,
    /// The subject's common name.
    Cn,
}

/// Where caller identities come from. See docs/security.md.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct IdentityConfig {
    /// Sources tried in order, first match wins: `"mtls"` (needs `tls.client_ca_file`), `"xfcc"` (only
    /// behind an Envoy/Istio sidecar that sets the header), `"sigv4"` (AWS Signature Version 4 on the HTTP
    /// API; needs `identity.sigv4.credentials_file`), `"header"` (development only). Default `["header"]`.
    pub sources: Vec<IdentitySource>,

    /// The header the `header` source reads. Default `"x-caller-id"`.
    #[serde(with = "header_name")]
    pub header: http::HeaderName,

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
/// access keys this service issues.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Sigv4Config {
    /// TOML file of `[[keys]]` with `access_key_id`, `secret_access_key` and `principal`: who signs with
    /// which key. Re-read when it changes and on SIGHUP. Required when `sources` has `"sigv4"`.
    /// Default: none.
    pub credentials_file: Option<PathBuf>,

    /// Regions a signature's credential scope may name (callers sign for a region, as for any AWS
    /// endpoint). Default `[]`: any region.
    pub regions: Vec<Region>,

    /// How far a request's `x-amz-date` may be from the server's clock, either way; older signed requests
    /// cannot be replayed. Default `5m` (what AWS allows); between `1s` and `15m`.
    #[serde(with = "humantime_serde")]
    pub max_clock_skew: Duration,

    /// The names callers reach this service by (`chat-token.internal`, `chat-token.internal:8443`): a
    /// signature is accepted only for a signed `Host` that is one of them, so a request signed for
    /// another service cannot be replayed here. A name without a port matches any port. Default `[]`:
    /// the loopback names only (`localhost`, `127.0.0.1`, `[::1]`); required off loopback.
    pub hosts: Vec<String>,
}

impl Default for Sigv4Config {
    fn default() -> Self {
        Sigv4Config {
            credentials_file: None,
            regions: Vec::new(),
            max_clock_skew: Duration::from_secs(300),
            hosts: Vec::new(),
        }
    }
}

impl Default for IdentityConfig {
    fn default() -> Self {
        IdentityConfig {
            sources: vec![IdentitySource::Header],
            header: http::HeaderName::from_static("x-caller-id"),
            certificate_names: vec![CertificateName::Uri],
            allow_anonymous: true,
            anonymous_principal: "anonymous".into(),
            trust_network_in_front: false,
            sigv4: Sigv4Config::default(),
        }
    }
}

impl IdentityConfig {
    /// The SigV4 credentials file when the `sigv4` source is on (the load checked that it is set then).
    pub fn sigv4_credentials(&self) -> Option<&Path> {
        self.sigv4
            .credentials_file
            .as_deref()
            .filter(|_| self.sources.contains(&IdentitySource::Sigv4))
    }

    /// The rules of this section, and those it shares with `listen_addr`, `tls` and `http_api`.
    pub(super) fn check(
        &self,
        listen_addr: SocketAddr,
        tls: Option<&TlsConfig>,
        http_api: &HttpApiConfig,
    ) -> Result<(), ConfigError> {
        if self.sources.contains(&IdentitySource::Mtls)
            && tls.and_then(|t| t.client_ca_file.as_ref()).is_none()
        {
            return Err(ConfigError::Invalid {
                setting: "identity.sources".into(),
                reason:
                    "the mtls source needs tls.client_ca_file (and tls.cert_file, tls.key_file)"
                        .into(),
            });
        }
        if self.certificate_names.is_empty() {
            return Err(ConfigError::Invalid {
                setting: "identity.certificate_names".into(),
                reason: "must name at least one of \"uri\", \"dns\", \"cn\"".into(),
            });
        }
        self.check_trust(listen_addr)?;
        if self.sources.contains(&IdentitySource::Sigv4) {
            if self.sigv4.credentials_file.is_none() {
                return Err(ConfigError::Invalid {
                    setting: "identity.sigv4.credentials_file".into(),
                    reason: "is required when identity.sources has \"sigv4\"".into(),
                });
            }
            if !http_api.enabled {
                return Err(ConfigError::Invalid {
                    setting: "identity.sources".into(),
                    reason: "the sigv4 source identifies HTTP API callers, but http_api.enabled is false"
                        .into(),
                });
            }
            if self.sigv4.hosts.is_empty() && !listen_addr.ip().is_loopback() {
                return Err(ConfigError::Invalid {
                    setting: "identity.sigv4.hosts".into(),
                    reason: format!(
                        "is required off loopback (listen_addr {listen_addr}): the names callers sign \
                         requests for, such as \"chat-token.internal\""
                    ),
                });
            }
            if let Some(host) = self
                .sigv4
                .hosts
                .iter()
                .find(|host| host.parse::<http::uri::Authority>().is_err())
            {
                return Err(ConfigError::Invalid {
                    setting: "identity.sigv4.hosts".into(),
                    reason: format!("{host:?} is not a host name, with or without a port"),
                });
            }
        }
        let skew = self.sigv4.max_clock_skew;
        if !(Duration::from_secs(1)..=Duration::from_secs(900)).contains(&skew) {
            return Err(ConfigError::Invalid {
                setting: "identity.sigv4.max_clock_skew".into(),
                reason: format!(
                    "must be between 1s and 15m, got {}",
                    humantime::format_duration(skew)
                ),
            });
        }
        Ok(())
    }

    /// Refuses settings that believe any client, on a listener other clients can reach.
    fn check_trust(&self, listen_addr: SocketAddr) -> Result<(), ConfigError> {
        if listen_addr.ip().is_loopback() || self.trust_network_in_front {
            return Ok(());
        }
        // What believes whatever a client says: a plain header, an x-forwarded-client-cert header (only a
        // sidecar that strips the client's own makes it true), and the anonymous principal.
        let believed: Vec<&str> = [
            (
                self.sources.contains(&IdentitySource::Header),
                "identity.sources includes \"header\"",
            ),
            (
                self.sources.contains(&IdentitySource::Xfcc),
                "identity.sources includes \"xfcc\"",
            ),
            (self.allow_anonymous, "identity.allow_anonymous is true"),
        ]
        .into_iter()
        .filter_map(|(believes, what)| believes.then_some(what))
        .collect();
        if believed.is_empty() {
            return Ok(());
        }
        Err(ConfigError::Invalid {
            setting: "identity.trust_network_in_front".into(),
            reason: format!(
                "{}, so a client that reaches listen_addr {listen_addr} (not loopback) directly could \
                 choose who it is; use identity.sources = [\"mtls\"] with identity.allow_anonymous = \
                 false, or set identity.trust_network_in_front = true when a proxy or mesh sidecar in \
                 front authenticates every caller and overwrites these headers",
                believed.join(" and ")
            ),
        })
    }
}

/// Header names as the configuration writes them: parsed (and lower-cased) at load.
pub(super) mod header_name {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(
        name: &http::HeaderName,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(name.as_str())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<http::HeaderName, D::Error> {
        let name = String::deserialize(deserializer)?;
        http::HeaderName::from_bytes(name.as_bytes())
            .map_err(|e| D::Error::custom(format!("not a valid header name: {e}")))
    }
}
