//! Who is calling: resolves a [`Caller`] from the sources enabled in config, first match wins.
//!
//! - `mtls`: the server terminates TLS and has verified the client certificate against the configured CA;
//!   the caller is the certificate's first URI SAN (a SPIFFE id such as
//!   `spiffe://cluster.local/ns/chat/sa/web`), else its first DNS SAN, else its subject CN.
//! - `xfcc`: the `x-forwarded-client-cert` header an Envoy/Istio sidecar sets after verifying the client;
//!   the caller is the `URI=` of its last element (the hop nearest us). Enable **only** behind a sidecar
//!   that strips this header from outside traffic, or anyone can claim any identity.
//! - `sigv4`: an AWS Signature Version 4 signature on an IVS Chat HTTP API request, by an access key from
//!   the credentials file; the caller is the key's principal (see [`sigv4`]). gRPC calls are unsigned. A
//!   signed request whose signature fails is refused whatever the other sources say.
//! - `header`: a plain header (default `x-caller-id`). For development only: anyone can set it.
//!
//! When no source yields an identity, the configured anonymous principal is used; without one the call is
//! refused with UNAUTHENTICATED.
//!
//! Both front doors use the same [`Resolver`]: [`Resolver::resolve`] for gRPC metadata,
//! [`Resolver::resolve_http`] for HTTP API requests.

pub mod sigv4;

use std::{sync::Arc, time::SystemTime};

use serde::{Deserialize, Serialize};
use tonic::metadata::MetadataMap;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::error::Error;
use crate::request::Caller;

/// Envoy's forwarded client certificate header.
pub const XFCC_HEADER: &str = "x-forwarded-client-cert";

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

/// Resolves callers from requests; built once from config.
#[derive(Clone, Debug)]
pub struct Resolver {
    sources: Vec<IdentitySource>,
    /// Metadata key of the `header` source, lower case.
    header: String,
    anonymous: Option<Caller>,
    /// Checks signatures for the `sigv4` source.
    sigv4: Option<Arc<sigv4::Verifier>>,
}

impl Resolver {
    /// Tries `sources` in order; `header` names the `header` source's header; `anonymous`, when set, is
    /// the principal of callers no source identifies.
    pub fn new(sources: Vec<IdentitySource>, header: &str, anonymous: Option<String>) -> Self {
        Resolver {
            sources,
            header: header.to_ascii_lowercase(),
            anonymous: anonymous.map(Caller::new),
            sigv4: None,
        }
    }

    /// This resolver, with `verifier` checking signatures for the `sigv4` source.
    pub fn with_sigv4(mut self, verifier: Arc<sigv4::Verifier>) -> Self {
        self.sigv4 = Some(verifier);
        self
    }

    /// The caller of a gRPC call with `metadata`, whose TLS peer presented `peer_certs` (leaf first).
    pub fn resolve(
        &self,
        metadata: &MetadataMap,
        peer_certs: Option<&[rustls_pki_types::CertificateDer<'static>]>,
    ) -> Result<Caller, Error> {
        self.resolve_from(
            |name| metadata.get(name).and_then(|v| v.to_str().ok()),
            peer_certs,
            None,
        )
    }

    /// The caller of an HTTP API request with `parts` and the whole `body`, whose TLS peer presented
    /// `peer_certs`. A SigV4 signature that fails verification refuses the request outright.
    pub fn resolve_http(
        &self,
        parts: &http::request::Parts,
        body: &[u8],
        peer_certs: Option<&[rustls_pki_types::CertificateDer<'static>]>,
    ) -> Result<Caller, Error> {
        let signed = match self
            .sigv4
            .as_deref()
            .filter(|_| self.sources.contains(&IdentitySource::Sigv4))
        {
            None => None,
            Some(verifier) => match verifier.verify(parts, body, SystemTime::now()) {
                sigv4::Verdict::Unsigned => None,
                sigv4::Verdict::Verified(caller) => Some(caller),
                sigv4::Verdict::Refused(why) => {
                    tracing::info!(reason = why, "SigV4 signature refused");
                    return Err(Error::Unauthenticated(why));
                }
            },
        };
        self.resolve_from(
            |name| parts.headers.get(name).and_then(|v| v.to_str().ok()),
            peer_certs,
            signed,
        )
    }

    fn resolve_from<'a>(
        &self,
        header: impl Fn(&str) -> Option<&'a str>,
        peer_certs: Option<&[rustls_pki_types::CertificateDer<'static>]>,
        mut signed: Option<Caller>,
    ) -> Result<Caller, Error> {
        for source in &self.sources {
            let found = match source {
                IdentitySource::Mtls => peer_certs
                    .and_then(|certs| certs.first())
                    .and_then(|leaf| identity_from_certificate(leaf)),
                IdentitySource::Xfcc => header(XFCC_HEADER).and_then(uri_from_xfcc),
                IdentitySource::Header => header(self.header.as_str())
                    .map(str::trim)
                    .filter(|v| !v.is_empty())
                    .map(str::to_owned),
                IdentitySource::Sigv4 => {
                    if let Some(caller) = signed.take() {
                        return Ok(caller);
                    }
                    None
                }
            };
            if let Some(id) = found {
                return Ok(Caller::new(id));
            }
        }
        self.anonymous.clone().ok_or(Error::Unauthenticated(
            "none of the configured identity sources identified the caller",
        ))
    }
}

/// First URI SAN, else first DNS SAN, else subject CN.
pub fn identity_from_certificate(der: &[u8]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let sans: Vec<GeneralName<'_>> = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|ext| ext.value.general_names.clone())
        .unwrap_or_default();
    let uri = sans.iter().find_map(|n| match n {
        GeneralName::URI(uri) => Some(uri.to_string()),
        _ => None,
    });
    let dns = || {
        sans.iter().find_map(|n| match n {
            GeneralName::DNSName(dns) => Some(dns.to_string()),
            _ => None,
        })
    };
    let cn = || {
        cert.subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned)
    };
    uri.or_else(dns).or_else(cn)
}

/// The `URI=` value of the last element of an `x-forwarded-client-cert` header.
///
/// Elements are separated by `,`, pairs by `;`, keys from values by `=`; values may be double-quoted, and
/// quoted values may contain `,`, `;` and `=` (Envoy quotes `Subject`). `\"` escapes a quote.
pub fn uri_from_xfcc(header: &str) -> Option<String> {
    let last = split_unquoted(header, ',').pop()?;
    split_unquoted(last, ';').into_iter().find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        key.trim()
            .eq_ignore_ascii_case("uri")
            .then(|| unquote(value.trim()))
            .filter(|v| !v.is_empty())
    })
}

fn split_unquoted(s: &str, separator: char) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            c if c == separator && !quoted => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

fn unquote(value: &str) -> String {
    match value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
        Some(inner) => inner.replace("\\\"", "\""),
        None => value.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata(pairs: &[(&'static str, &str)]) -> MetadataMap {
        let mut map = MetadataMap::new();
        for (k, v) in pairs {
            map.insert(*k, v.parse().unwrap());
        }
        map
    }

    #[test]
    fn xfcc_takes_the_uri_of_the_last_element() {
        let header = r#"By=spiffe://cluster.local/ns/chat/sa/gw;Hash=abc;URI=spiffe://cluster.local/ns/edge/sa/ingress,By=spiffe://cluster.local/ns/chat/sa/cts;Hash=def;Subject="CN=web,O=Acme, Inc.;x=y";URI=spiffe://cluster.local/ns/chat/sa/web"#;
        assert_eq!(
            uri_from_xfcc(header).as_deref(),
            Some("spiffe://cluster.local/ns/chat/sa/web")
        );
    }

    #[test]
    fn xfcc_quoted_values_and_missing_uri() {
        assert_eq!(
            uri_from_xfcc(r#"Hash=1;URI="spiffe://td/a,b""#).as_deref(),
            Some("spiffe://td/a,b")
        );
        assert_eq!(uri_from_xfcc("By=spiffe://x;Hash=1"), None);
        assert_eq!(
            uri_from_xfcc("URI=spiffe://x,Hash=1"),
            None,
            "last element has no URI"
        );
        assert_eq!(uri_from_xfcc(""), None);
        assert_eq!(uri_from_xfcc("URI="), None);
    }

    #[test]
    fn first_match_wins_in_configured_order() {
        let resolver = Resolver::new(
            vec![IdentitySource::Xfcc, IdentitySource::Header],
            "X-Caller-Id",
            None,
        );
        let both = metadata(&[
            (XFCC_HEADER, "URI=spiffe://td/ns/a/sa/xfcc"),
            ("x-caller-id", "dev-header"),
        ]);
        assert_eq!(
            resolver.resolve(&both, None).unwrap().id(),
            "spiffe://td/ns/a/sa/xfcc"
        );
        let header_only = metadata(&[("x-caller-id", "dev-header")]);
        assert_eq!(
            resolver.resolve(&header_only, None).unwrap().id(),
            "dev-header"
        );
    }

    #[test]
    fn disabled_sources_are_ignored_and_anonymous_is_the_fallback() {
        let strict = Resolver::new(vec![IdentitySource::Mtls], "x-caller-id", None);
        let claims = metadata(&[
            (XFCC_HEADER, "URI=spiffe://td/ns/a/sa/forged"),
            ("x-caller-id", "forged"),
        ]);
        assert!(matches!(
            strict.resolve(&claims, None),
            Err(Error::Unauthenticated(_))
        ));

        let lenient = Resolver::new(
            vec![IdentitySource::Header],
            "x-caller-id",
            Some("anonymous".into()),
        );
        assert_eq!(
            lenient.resolve(&MetadataMap::new(), None).unwrap().id(),
            "anonymous"
        );
        let blank = metadata(&[("x-caller-id", "  ")]);
        assert_eq!(lenient.resolve(&blank, None).unwrap().id(), "anonymous");
    }

    #[test]
    fn certificate_identity_prefers_uri_then_dns_then_cn() {
        let cert = |sans: Vec<rcgen::SanType>, cn: &str| {
            let mut params = rcgen::CertificateParams::default();
            params.subject_alt_names = sans;
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, cn);
            let key = rcgen::KeyPair::generate().unwrap();
            params.self_signed(&key).unwrap().der().to_vec()
        };
        let uri = rcgen::SanType::URI("spiffe://td/ns/chat/sa/web".try_into().unwrap());
        let dns = rcgen::SanType::DnsName("web.chat.svc".try_into().unwrap());
        assert_eq!(
            identity_from_certificate(&cert(vec![dns.clone(), uri], "web-cn")).as_deref(),
            Some("spiffe://td/ns/chat/sa/web")
        );
        assert_eq!(
            identity_from_certificate(&cert(vec![dns], "web-cn")).as_deref(),
            Some("web.chat.svc")
        );
        assert_eq!(
            identity_from_certificate(&cert(vec![], "web-cn")).as_deref(),
            Some("web-cn")
        );
    }
}
