//! Who is calling: resolves a [`Caller`] from the sources enabled in config, first match wins.
//!
//! One [`Resolver`] serves every front door: it reads an [`http::HeaderMap`] and the TLS peer's
//! certificates, so the gRPC service and the HTTP API identify callers the same way:
//! [`Resolver::resolve`] for gRPC, [`Resolver::resolve_http`] for HTTP API requests (which may be signed).
//!
//! - `mtls`: the server terminates TLS and has verified the client certificate against the configured CA.
//!   The caller is the certificate's first URI SAN (a SPIFFE id such as
//!   `spiffe://cluster.local/ns/chat/sa/web`); `identity.certificate_names` may allow falling back to the
//!   first DNS SAN and then the subject CN. A DNS SAN or CN that looks like a URI is refused, so a
//!   certificate without a URI SAN can never pass for a SPIFFE id.
//! - `xfcc`: the `x-forwarded-client-cert` header an Envoy/Istio sidecar sets after verifying the client;
//!   the caller is the `URI=` of its **last** element: the one the proxy nearest to us appended. Earlier
//!   elements were written by hops further away, which we have no reason to believe. Enable **only** behind
//!   a sidecar that strips or overwrites this header on outside traffic, or anyone can claim any identity.
//! - `sigv4`: an AWS Signature Version 4 signature on an IVS Chat HTTP API request, by an access key from
//!   the credentials file; the caller is the key's principal (see [`sigv4`]). gRPC calls are unsigned. A
//!   signed request whose signature fails is refused whatever the other sources say.
//! - `header`: a plain header (default `x-caller-id`). For development only: anyone can set it.
//!
//! A source whose input is absent lets the next one try. A source whose input is present but unusable (a
//! malformed or repeated header, a certificate that cannot be parsed or names no acceptable identity)
//! fails the call with UNAUTHENTICATED: falling through would let a caller pick which source believes it.
//! When no source yields an identity, the configured anonymous principal is used; without one the call is
//! refused with UNAUTHENTICATED.

pub mod end_user;
pub mod sigv4;

use std::{sync::Arc, time::SystemTime};

use rustls_pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

pub use crate::config::{CertificateName, IdentitySource};
use crate::domain::{Caller, CallerSource, Error};

/// Envoy's forwarded client certificate header.
pub const XFCC_HEADER: &str = "x-forwarded-client-cert";

/// Resolves callers from requests; built once from config.
#[derive(Clone, Debug)]
pub struct Resolver {
    sources: Vec<IdentitySource>,
    /// Header name of the `header` source.
    header: http::HeaderName,
    certificate_names: Vec<CertificateName>,
    anonymous: Option<Caller>,
    /// Checks signatures for the `sigv4` source.
    sigv4: Option<Arc<sigv4::Verifier>>,
}

impl Resolver {
    /// Tries `sources` in order; `header` names the `header` source's header; `certificate_names` are the
    /// certificate names the `mtls` source accepts, in order; `anonymous`, when set, is the principal of
    /// callers no source identifies.
    pub fn new(
        sources: Vec<IdentitySource>,
        header: http::HeaderName,
        certificate_names: Vec<CertificateName>,
        anonymous: Option<String>,
    ) -> Self {
        Resolver {
            sources,
            header,
            certificate_names,
            anonymous: anonymous.map(|id| Caller::with_source(id, CallerSource::Anonymous)),
            sigv4: None,
        }
    }

    /// This resolver, with `verifier` checking signatures for the `sigv4` source.
    pub fn with_sigv4(mut self, verifier: Arc<sigv4::Verifier>) -> Self {
        self.sigv4 = Some(verifier);
        self
    }

    /// The caller of a gRPC call with `headers`, whose TLS peer presented `peer_certs` (leaf first).
    pub fn resolve(
        &self,
        headers: &http::HeaderMap,
        peer_certs: Option<&[CertificateDer<'_>]>,
    ) -> Result<Caller, Error> {
        self.resolve_from(headers, peer_certs, None)
    }

    /// The caller of an HTTP API request with `parts` and the whole `body`, whose TLS peer presented
    /// `peer_certs`. A SigV4 signature that fails verification refuses the request outright.
    pub fn resolve_http(
        &self,
        parts: &http::request::Parts,
        body: &[u8],
        peer_certs: Option<&[CertificateDer<'_>]>,
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
                sigv4::Verdict::Refused { reason, detail } => {
                    tracing::info!(reason = detail, "SigV4 signature refused");
                    return Err(Error::Unauthenticated(reason));
                }
            },
        };
        self.resolve_from(&parts.headers, peer_certs, signed)
    }

    fn resolve_from(
        &self,
        headers: &http::HeaderMap,
        peer_certs: Option<&[CertificateDer<'_>]>,
        mut signed: Option<Caller>,
    ) -> Result<Caller, Error> {
        for source in &self.sources {
            let found = match source {
                IdentitySource::Mtls => match peer_certs.and_then(|certs| certs.first()) {
                    Some(leaf) => Some(caller_from_certificate(leaf, &self.certificate_names)?),
                    None => None,
                },
                IdentitySource::Xfcc => match single_header(headers, XFCC_HEADER)? {
                    Some(value) => Some(Caller::with_source(
                        uri_from_xfcc(value)?,
                        CallerSource::Xfcc,
                    )),
                    None => None,
                },
                IdentitySource::Header => single_header(headers, self.header.as_str())?
                    .map(str::trim)
                    .filter(|v| !v.is_empty())
                    .map(|id| Caller::with_source(id, CallerSource::Header)),
                IdentitySource::Sigv4 => signed.take(),
            };
            if let Some(caller) = found {
                return Ok(caller);
            }
        }
        self.anonymous.clone().ok_or(Error::Unauthenticated(
            "none of the configured identity sources identified the caller",
        ))
    }
}

/// The value of `name` when the request carries it once; more than one field is an identification failure,
/// since proxies and applications disagree on which one counts.
fn single_header<'h>(headers: &'h http::HeaderMap, name: &str) -> Result<Option<&'h str>, Error> {
    let mut values = headers.get_all(name).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(Error::Unauthenticated(
            "an identity header appears more than once",
        ));
    }
    value
        .to_str()
        .map(Some)
        .map_err(|_| Error::Unauthenticated("an identity header is not visible ASCII"))
}

/// The caller a verified client certificate names: the first of `accepted` names it has.
pub fn caller_from_certificate(der: &[u8], accepted: &[CertificateName]) -> Result<Caller, Error> {
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|_| Error::Unauthenticated("the client certificate cannot be parsed"))?;
    let sans: Vec<GeneralName<'_>> = cert
        .subject_alternative_name()
        .map_err(|_| {
            Error::Unauthenticated(
                "the client certificate's subject alternative names cannot be parsed",
            )
        })?
        .map(|ext| ext.value.general_names.clone())
        .unwrap_or_default();
    for name in accepted {
        let found = match name {
            CertificateName::Uri => sans.iter().find_map(|n| match n {
                GeneralName::URI(uri) => Some((uri.to_string(), CallerSource::UriSan)),
                _ => None,
            }),
            CertificateName::Dns => sans.iter().find_map(|n| match n {
                GeneralName::DNSName(dns) => Some((dns.to_string(), CallerSource::DnsSan)),
                _ => None,
            }),
            CertificateName::Cn => cert
                .subject()
                .iter_common_name()
                .next()
                .map(|cn| {
                    cn.as_str().map_err(|_| {
                        Error::Unauthenticated("the client certificate's common name is not text")
                    })
                })
                .transpose()?
                .map(|cn| (cn.to_owned(), CallerSource::CommonName)),
        };
        let Some((id, source)) = found else {
            continue;
        };
        if source != CallerSource::UriSan && id.contains(':') {
            // A name or CN such as "spiffe://td/ns/x/sa/admin" must not pass for the SPIFFE id only a
            // URI SAN can carry.
            return Err(Error::Unauthenticated(
                "the client certificate's DNS name or common name looks like a URI",
            ));
        }
        if id.is_empty() {
            return Err(Error::Unauthenticated(
                "the client certificate names an empty identity",
            ));
        }
        return Ok(Caller::with_source(id, source));
    }
    Err(Error::Unauthenticated(
        "the client certificate has none of the names identity.certificate_names accepts",
    ))
}

/// The keys Envoy writes in an `x-forwarded-client-cert` element.
const XFCC_KEYS: &[&str] = &["by", "hash", "cert", "chain", "subject", "uri", "dns"];

/// The `URI=` value of the last element of an `x-forwarded-client-cert` header, parsed strictly by
/// Envoy's grammar: elements separated by `,`, key-value pairs by `;`, keys from values by `=`; a value is
/// either bare (no `,` `;` `=` `"`) or double-quoted, where `\` escapes the next character. Anything else
/// (an unbalanced quote, a pair without `=`, an unknown key, an empty element, a repeated `URI`) is
/// malformed and refused whole: a partial parse could take an identity from the wrong element.
pub fn uri_from_xfcc(header: &str) -> Result<String, Error> {
    let elements = parse_xfcc(header)
        .map_err(|_| Error::Unauthenticated("the x-forwarded-client-cert header is malformed"))?;
    let last = elements.last().ok_or(Error::Unauthenticated(
        "the x-forwarded-client-cert header is empty",
    ))?;
    let mut uris = last
        .iter()
        .filter(|(key, _)| key.eq_ignore_ascii_case("uri"));
    match (uris.next(), uris.next()) {
        (Some((_, uri)), None) if !uri.is_empty() => Ok(uri.clone()),
        (Some(_), Some(_)) => Err(Error::Unauthenticated(
            "the x-forwarded-client-cert header's last element has more than one URI",
        )),
        _ => Err(Error::Unauthenticated(
            "the x-forwarded-client-cert header's last element has no URI",
        )),
    }
}

/// A syntax error in an `x-forwarded-client-cert` header; deliberately without detail, which would echo
/// the caller's input.
struct Malformed;

/// Every element of the header, each a list of (key, unescaped value).
fn parse_xfcc(header: &str) -> Result<Vec<Vec<(&str, String)>>, Malformed> {
    let mut elements = Vec::new();
    let mut pairs = Vec::new();
    let mut rest = header;
    loop {
        let (key, after_key) = rest.split_once('=').ok_or(Malformed)?;
        if !XFCC_KEYS.iter().any(|k| k.eq_ignore_ascii_case(key)) {
            return Err(Malformed);
        }
        let (value, after_value) = xfcc_value(after_key)?;
        pairs.push((key, value));
        let mut chars = after_value.chars();
        match chars.next() {
            None => {
                elements.push(pairs);
                return Ok(elements);
            }
            Some(';') => {}
            Some(',') => elements.push(std::mem::take(&mut pairs)),
            Some(_) => return Err(Malformed),
        }
        rest = chars.as_str();
    }
}

/// One value at the start of `input`, and what follows it.
fn xfcc_value(input: &str) -> Result<(String, &str), Malformed> {
    let Some(quoted) = input.strip_prefix('"') else {
        let end = input.find([',', ';']).unwrap_or(input.len());
        let value = &input[..end];
        if value.contains(['"', '=']) {
            return Err(Malformed);
        }
        return Ok((value.to_owned(), &input[end..]));
    };
    let mut value = String::new();
    let mut chars = quoted.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' => value.push(chars.next().ok_or(Malformed)?.1),
            '"' => return Ok((value, &quoted[i + 1..])),
            c => value.push(c),
        }
    }
    Err(Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> http::HeaderMap {
        let mut map = http::HeaderMap::new();
        for (k, v) in pairs {
            map.append(*k, v.parse().unwrap());
        }
        map
    }

    fn unauthenticated(result: Result<impl std::fmt::Debug, Error>) -> &'static str {
        match result {
            Err(Error::Unauthenticated(why)) => why,
            other => panic!("expected UNAUTHENTICATED, got {other:?}"),
        }
    }

    #[test]
    fn xfcc_takes_the_uri_of_the_last_element() {
        let header = r#"By=spiffe://cluster.local/ns/chat/sa/gw;Hash=abc;URI=spiffe://cluster.local/ns/edge/sa/ingress,By=spiffe://cluster.local/ns/chat/sa/cts;Hash=def;Subject="CN=web,O=Acme, Inc.;x=y";URI=spiffe://cluster.local/ns/chat/sa/web"#;
        assert_eq!(
            uri_from_xfcc(header).unwrap(),
            "spiffe://cluster.local/ns/chat/sa/web"
        );
    }

    #[test]
    fn xfcc_quoted_values_unescape() {
        assert_eq!(
            uri_from_xfcc(r#"Hash=1;URI="spiffe://td/a,b""#).unwrap(),
            "spiffe://td/a,b"
        );
        assert_eq!(
            uri_from_xfcc(r#"Subject="CN=\"x\";y";URI=spiffe://td/a"#).unwrap(),
            "spiffe://td/a"
        );
    }

    #[test]
    fn xfcc_refuses_every_malformed_or_ambiguous_header() {
        for header in [
            "",
            "URI=",
            "By=spiffe://x;Hash=1",
            "URI=spiffe://x,Hash=1",
            r#"URI="spiffe://td/admin"#,
            r#"Subject="CN=a;URI=spiffe://td/admin"#,
            r#"URI=spiffe://td/a"b"#,
            "URI=spiffe://td/a;;",
            "URI=spiffe://td/a,",
            ",URI=spiffe://td/a",
            "URI=spiffe://td/a;URI=spiffe://td/b",
            "Role=admin;URI=spiffe://td/a",
            "URI=spiffe://td/a;Hash",
            r#"URI="spiffe://td/a"x"#,
        ] {
            unauthenticated(uri_from_xfcc(header));
        }
    }

    #[test]
    fn a_present_but_bad_source_never_falls_through() {
        let resolver = Resolver::new(
            vec![IdentitySource::Xfcc, IdentitySource::Header],
            http::HeaderName::from_static("x-caller-id"),
            vec![CertificateName::Uri],
            Some("anonymous".into()),
        );
        let unbalanced = headers(&[
            (XFCC_HEADER, r#"URI="spiffe://td/ns/a/sa/web"#),
            ("x-caller-id", "spiffe://td/ns/moderation/sa/mod"),
        ]);
        unauthenticated(resolver.resolve(&unbalanced, None));
        let twice = headers(&[
            (XFCC_HEADER, "URI=spiffe://td/ns/a/sa/web"),
            (XFCC_HEADER, "URI=spiffe://td/ns/moderation/sa/mod"),
        ]);
        unauthenticated(resolver.resolve(&twice, None));
        let header_twice = headers(&[("x-caller-id", "a"), ("x-caller-id", "b")]);
        unauthenticated(resolver.resolve(&header_twice, None));
    }

    #[test]
    fn first_match_wins_in_configured_order_and_records_its_source() {
        let resolver = Resolver::new(
            vec![IdentitySource::Xfcc, IdentitySource::Header],
            http::HeaderName::from_bytes(b"X-Caller-Id").unwrap(),
            vec![CertificateName::Uri],
            None,
        );
        let both = headers(&[
            (XFCC_HEADER, "URI=spiffe://td/ns/a/sa/xfcc"),
            ("x-caller-id", "dev-header"),
        ]);
        let caller = resolver.resolve(&both, None).unwrap();
        assert_eq!(caller.id(), "spiffe://td/ns/a/sa/xfcc");
        assert_eq!(caller.source(), Some(CallerSource::Xfcc));
        let header_only = headers(&[("x-caller-id", "dev-header")]);
        let caller = resolver.resolve(&header_only, None).unwrap();
        assert_eq!(caller.id(), "dev-header");
        assert_eq!(caller.source(), Some(CallerSource::Header));
    }

    #[test]
    fn disabled_sources_are_ignored_and_anonymous_is_the_fallback() {
        let strict = Resolver::new(
            vec![IdentitySource::Mtls],
            http::HeaderName::from_static("x-caller-id"),
            vec![CertificateName::Uri],
            None,
        );
        let claims = headers(&[
            (XFCC_HEADER, "URI=spiffe://td/ns/a/sa/forged"),
            ("x-caller-id", "forged"),
        ]);
        unauthenticated(strict.resolve(&claims, None));

        let lenient = Resolver::new(
            vec![IdentitySource::Header],
            http::HeaderName::from_static("x-caller-id"),
            vec![CertificateName::Uri],
            Some("anonymous".into()),
        );
        let anonymous = lenient.resolve(&http::HeaderMap::new(), None).unwrap();
        assert_eq!(anonymous.id(), "anonymous");
        assert_eq!(anonymous.source(), Some(CallerSource::Anonymous));
        let blank = headers(&[("x-caller-id", "  ")]);
        assert_eq!(lenient.resolve(&blank, None).unwrap().id(), "anonymous");
    }

    fn cert(sans: Vec<rcgen::SanType>, cn: &str) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = sans;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn certificate_names_follow_the_configured_fallback() {
        let uri = rcgen::SanType::URI("spiffe://td/ns/chat/sa/web".try_into().unwrap());
        let dns = rcgen::SanType::DnsName("web.chat.svc".try_into().unwrap());
        let all = [
            CertificateName::Uri,
            CertificateName::Dns,
            CertificateName::Cn,
        ];
        let identify = |der: &[u8], accepted: &[CertificateName]| {
            caller_from_certificate(der, accepted).map(|c| (c.id().to_owned(), c.source()))
        };
        assert_eq!(
            identify(&cert(vec![dns.clone(), uri], "web-cn"), &all).unwrap(),
            (
                "spiffe://td/ns/chat/sa/web".to_owned(),
                Some(CallerSource::UriSan)
            )
        );
        assert_eq!(
            identify(&cert(vec![dns.clone()], "web-cn"), &all).unwrap(),
            ("web.chat.svc".to_owned(), Some(CallerSource::DnsSan))
        );
        assert_eq!(
            identify(&cert(vec![], "web-cn"), &all).unwrap(),
            ("web-cn".to_owned(), Some(CallerSource::CommonName))
        );
        // The default accepts URI SANs only.
        unauthenticated(identify(
            &cert(vec![dns], "web-cn"),
            &[CertificateName::Uri],
        ));
    }

    #[test]
    fn a_common_name_never_passes_for_a_spiffe_id() {
        let der = cert(vec![], "spiffe://td/ns/moderation/sa/mod");
        unauthenticated(caller_from_certificate(
            &der,
            &[
                CertificateName::Uri,
                CertificateName::Dns,
                CertificateName::Cn,
            ],
        ));
    }

    #[test]
    fn an_unparseable_certificate_is_unauthenticated() {
        unauthenticated(caller_from_certificate(b"not DER", &[CertificateName::Uri]));
        let resolver = Resolver::new(
            vec![IdentitySource::Mtls, IdentitySource::Header],
            http::HeaderName::from_static("x-caller-id"),
            vec![CertificateName::Uri],
            Some("anonymous".into()),
        );
        let garbage = [CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01])];
        unauthenticated(resolver.resolve(&headers(&[("x-caller-id", "admin")]), Some(&garbage)));
    }
}
