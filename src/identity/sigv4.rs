//! The `sigv4` identity source: callers of the IVS Chat HTTP API sign their requests with AWS Signature
//! Version 4, as every AWS SDK and the AWS CLI do, using access keys this service issues to them.
//!
//! A credentials file maps each access key id to its secret key and the principal the caller becomes:
//!
//! ```toml
//! [[keys]]
//! access_key_id = "CTSWEB0000000000001"
//! secret_access_key = "…40 random characters…"
//! principal = "spiffe://cluster.local/ns/chat/sa/web"
//! ```
//!
//! The expected signature is computed with `aws-sigv4`, the signer the AWS SDK for Rust uses, over the
//! request as it arrived (the headers the caller signed, the body read in full), then compared in constant
//! time. The credential scope must name service `ivschat` and an allowed region; `x-amz-date` must lie
//! within the allowed clock skew of ours; an `x-amz-content-sha256` header, when sent, must be the body's
//! hash.
//!
//! The signed `Host` must be one of the names callers reach this service by (`identity.sigv4.hosts`;
//! the loopback names when that is empty), so a request signed for another service that shares the keys'
//! format cannot be replayed here.
//!
//! A request without an `AWS4-HMAC-SHA256` `Authorization` header is unsigned and falls to the next
//! source. A signed request that fails any check is refused: it is never treated as unsigned, or a
//! caller with a wrong key would silently become anonymous. A malformed request is told what is wrong
//! with it; every failure of the signature itself (an unknown access key, a wrong secret, a host not
//! served here) gets one answer, [`SIGNATURE_REFUSED`], so a caller cannot probe which access key ids
//! exist; the server log says which it was. Secret keys never reach logs or errors.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
use serde::Deserialize;

use crate::config::Sigv4Config;
use crate::domain::{Caller, CallerSource, IVS_SIGNING_NAME, Region, Secret};

/// The only signing algorithm accepted: SigV4 with HMAC-SHA256 (not SigV4a).
const ALGORITHM: &str = "AWS4-HMAC-SHA256";
/// Most headers a caller may sign; SDKs sign about six. Bounds the work an unauthenticated request causes.
const MAX_SIGNED_HEADERS: usize = 32;
/// Most keys a credentials file may hold.
const MAX_KEYS: usize = 10_000;
/// The answer to every signature that does not verify, whatever the reason.
pub const SIGNATURE_REFUSED: &str = "the request signature is not valid for this service: check the access key, the secret and the \
     endpoint signed for";
/// The names a signature may be for when `identity.sigv4.hosts` is empty.
const LOOPBACK_HOSTS: [&str; 3] = ["localhost", "127.0.0.1", "[::1]"];

/// What the `sigv4` source found on a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// No SigV4 `Authorization` header: let the next source decide.
    Unsigned,
    /// A valid signature by a known key: the key's principal.
    Verified(Caller),
    /// Signed, but the signature cannot be accepted.
    Refused {
        /// What the caller is told: what is wrong with the request's form, or [`SIGNATURE_REFUSED`].
        reason: &'static str,
        /// What the server log says: exactly what failed. Never a secret.
        detail: &'static str,
    },
}

impl Verdict {
    /// A refusal the caller may be told in full.
    fn malformed(reason: &'static str) -> Self {
        Verdict::Refused {
            reason,
            detail: reason,
        }
    }
}

/// A check that failed: the request's form, or the signature.
enum Failure {
    Malformed(&'static str),
    Signature(&'static str),
}

/// Why the credentials file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    /// The file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a valid credentials file. The message never contains a secret key.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CredentialsFile {
    keys: Vec<KeyEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    access_key_id: String,
    secret_access_key: Secret,
    principal: String,
}

/// A secret key and who holds it.
struct Key {
    secret: Secret,
    principal: Caller,
}

/// Verifies SigV4 signatures against the keys of a credentials file, reloaded when the file changes.
pub struct Verifier {
    path: PathBuf,
    keys: ArcSwap<HashMap<String, Key>>,
    /// Regions a credential scope may name; empty means any.
    regions: Vec<Region>,
    /// The hosts a signature may be for (`identity.sigv4.hosts`, or the loopback names).
    hosts: Vec<AllowedHost>,
    max_clock_skew: Duration,
}

/// One of `identity.sigv4.hosts`: a name, and its port when one is given.
#[derive(Debug)]
struct AllowedHost {
    host: String,
    port: Option<u16>,
}

impl AllowedHost {
    fn parse(name: &str) -> Option<Self> {
        let authority = name.parse::<http::uri::Authority>().ok()?;
        Some(AllowedHost {
            host: authority.host().to_ascii_lowercase(),
            port: authority.port_u16(),
        })
    }

    /// Whether `authority` (as signed) names this host, on its port when it has one.
    fn admits(&self, authority: &http::uri::Authority) -> bool {
        authority.host().eq_ignore_ascii_case(&self.host)
            && self
                .port
                .is_none_or(|port| authority.port_u16() == Some(port))
    }
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("path", &self.path)
            .field("keys", &self.keys.load().len())
            .field("regions", &self.regions)
            .field("hosts", &self.hosts)
            .field("max_clock_skew", &self.max_clock_skew)
            .finish()
    }
}

impl Verifier {
    /// Loads `credentials_file` with the checks `settings` describe.
    pub fn load(credentials_file: &Path, settings: &Sigv4Config) -> Result<Self, CredentialsError> {
        Ok(Verifier {
            path: credentials_file.to_owned(),
            keys: ArcSwap::from_pointee(load_keys(credentials_file)?),
            regions: settings.regions.clone(),
            hosts: if settings.hosts.is_empty() {
                LOOPBACK_HOSTS
                    .iter()
                    .filter_map(|h| AllowedHost::parse(h))
                    .collect()
            } else {
                // The configuration check has parsed each of them.
                settings
                    .hosts
                    .iter()
                    .filter_map(|h| AllowedHost::parse(h))
                    .collect()
            },
            max_clock_skew: settings.max_clock_skew,
        })
    }

    /// The credentials file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Re-reads the credentials file: on success the new keys verify the next request and their count is
    /// returned; a file that no longer parses is refused and the keys loaded before stay in force.
    pub fn reload(&self) -> Result<usize, CredentialsError> {
        let keys = load_keys(&self.path)?;
        let count = keys.len();
        self.keys.store(Arc::new(keys));
        Ok(count)
    }

    /// Checks the signature of a request with `parts` and the whole `body`, received at `now`.
    pub fn verify(&self, parts: &http::request::Parts, body: &[u8], now: SystemTime) -> Verdict {
        if has_presigned_query(&parts.uri) {
            return Verdict::malformed(
                "presigned URLs are not accepted; sign the Authorization header",
            );
        }
        let Some(authorization) = parts.headers.get(http::header::AUTHORIZATION) else {
            return Verdict::Unsigned;
        };
        let Ok(authorization) = authorization.to_str() else {
            return Verdict::Unsigned;
        };
        let Some(fields) = authorization.strip_prefix(ALGORITHM) else {
            // SigV4a and other AWS4 algorithms are signatures we cannot check: refuse, never ignore.
            if authorization.starts_with("AWS4-") {
                return Verdict::malformed(
                    "only the AWS4-HMAC-SHA256 signing algorithm is accepted",
                );
            }
            return Verdict::Unsigned;
        };
        match self.check(parts, body, now, fields) {
            Ok(caller) => Verdict::Verified(caller),
            Err(Failure::Malformed(reason)) => Verdict::malformed(reason),
            Err(Failure::Signature(detail)) => Verdict::Refused {
                reason: SIGNATURE_REFUSED,
                detail,
            },
        }
    }

    fn check(
        &self,
        parts: &http::request::Parts,
        body: &[u8],
        now: SystemTime,
        fields: &str,
    ) -> Result<Caller, Failure> {
        self.check_form(parts, body, now, fields)
            .map_err(Failure::Malformed)?
            .map_err(Failure::Signature)
    }

    /// The checks of the request's form (`Err`), then those of the signature (`Ok(Err)`).
    fn check_form(
        &self,
        parts: &http::request::Parts,
        body: &[u8],
        now: SystemTime,
        fields: &str,
    ) -> Result<Result<Caller, &'static str>, &'static str> {
        let auth = Authorization::parse(fields).ok_or("malformed SigV4 Authorization header")?;
        let scope = &auth.scope;
        if scope.service != IVS_SIGNING_NAME {
            return Err("the credential scope must name service ivschat");
        }
        if !self.regions.is_empty() && !self.regions.iter().any(|r| r.as_str() == scope.region) {
            return Err("the credential scope names a region that is not allowed");
        }
        let date = parts
            .headers
            .get("x-amz-date")
            .and_then(|v| v.to_str().ok())
            .ok_or("x-amz-date is required")?;
        let signed_at = parse_amz_date(date).ok_or("x-amz-date must be YYYYMMDDTHHMMSSZ")?;
        if !date.starts_with(scope.date) {
            return Err("the credential scope's date is not x-amz-date's");
        }
        let skew = now
            .duration_since(signed_at)
            .unwrap_or_else(|e| e.duration());
        if skew > self.max_clock_skew {
            return Err("x-amz-date is too far from the server's time");
        }
        if !auth.signed_headers.contains(&"host") || !auth.signed_headers.contains(&"x-amz-date") {
            return Err("host and x-amz-date must be signed");
        }
        if let Some(declared) = parts.headers.get("x-amz-content-sha256") {
            let actual = hex::encode(ring::digest::digest(&ring::digest::SHA256, body));
            if declared.as_bytes() != actual.as_bytes() {
                return Err("x-amz-content-sha256 does not match the body");
            }
        }
        // HTTP/2 carries the host in :authority, which hyper keeps in the URI, not in the headers.
        let host = parts
            .uri
            .authority()
            .map(http::uri::Authority::as_str)
            .filter(|_| !parts.headers.contains_key(http::header::HOST));
        let signed_host = match host {
            Some(host) => host,
            None => parts
                .headers
                .get(http::header::HOST)
                .and_then(|v| v.to_str().ok())
                .ok_or("host and x-amz-date must be signed")?,
        };
        let signed_host = signed_host
            .parse::<http::uri::Authority>()
            .map_err(|_| "the host header is not a host name")?;
        if !self
            .hosts
            .iter()
            .any(|allowed| allowed.admits(&signed_host))
        {
            return Ok(Err("the signed host is not one of identity.sigv4.hosts"));
        }
        let keys = self.keys.load();
        let Some(key) = keys.get(scope.access_key_id) else {
            return Ok(Err("the access key id is not known"));
        };

        let mut headers = Vec::with_capacity(auth.signed_headers.len() + 1);
        for &name in &auth.signed_headers {
            if name == "host"
                && let Some(host) = host
            {
                headers.push((name, host));
                continue;
            }
            let mut values = parts.headers.get_all(name).iter().peekable();
            if values.peek().is_none() {
                return Err("a signed header is missing from the request");
            }
            for value in values {
                headers.push((
                    name,
                    value
                        .to_str()
                        .map_err(|_| "a signed header is not visible ASCII")?,
                ));
            }
        }
        let path_and_query = parts
            .uri
            .path_and_query()
            .map_or("/", http::uri::PathAndQuery::as_str);
        let request = SignableRequest::new(
            parts.method.as_str(),
            path_and_query,
            headers.into_iter(),
            SignableBody::Bytes(body),
        )
        .map_err(|_| "the request cannot be canonicalised")?;

        let identity = aws_credential_types::Credentials::new(
            scope.access_key_id,
            key.secret.expose(),
            None,
            None,
            "chat-token-service",
        )
        .into();
        let mut settings = SigningSettings::default();
        // Exactly the headers the caller signed, no more and no fewer.
        settings.excluded_headers = None;
        let params = aws_sigv4::sign::v4::SigningParams::builder()
            .identity(&identity)
            .region(scope.region)
            .name(IVS_SIGNING_NAME)
            .time(signed_at)
            .settings(settings)
            .build()
            .map_err(|_| "the request cannot be canonicalised")?
            .into();
        let expected = sign(request, &params).map_err(|_| "the request cannot be canonicalised")?;
        Ok(
            orion::util::secure_cmp(expected.signature().as_bytes(), auth.signature.as_bytes())
                .map(|()| key.principal.clone())
                .map_err(|_| "the signature does not match"),
        )
    }
}

/// `Credential=AKID/DATE/REGION/SERVICE/aws4_request, SignedHeaders=a;b, Signature=HEX`.
struct Authorization<'a> {
    scope: Scope<'a>,
    signed_headers: Vec<&'a str>,
    signature: &'a str,
}

struct Scope<'a> {
    access_key_id: &'a str,
    date: &'a str,
    region: &'a str,
    service: &'a str,
}

impl<'a> Authorization<'a> {
    fn parse(fields: &'a str) -> Option<Self> {
        let (mut credential, mut signed_headers, mut signature) = (None, None, None);
        for field in fields.split(',') {
            let (name, value) = field.trim().split_once('=')?;
            let slot = match name {
                "Credential" => &mut credential,
                "SignedHeaders" => &mut signed_headers,
                "Signature" => &mut signature,
                _ => return None,
            };
            if slot.replace(value).is_some() {
                return None;
            }
        }
        let mut parts = credential?.split('/');
        let scope = Scope {
            access_key_id: parts.next().filter(|id| !id.is_empty())?,
            date: parts.next().filter(|d| d.len() == 8)?,
            region: parts.next().filter(|r| !r.is_empty())?,
            service: parts.next()?,
        };
        if parts.next()? != "aws4_request" || parts.next().is_some() {
            return None;
        }
        let signed_headers: Vec<&str> = signed_headers?.split(';').collect();
        let well_formed = signed_headers.len() <= MAX_SIGNED_HEADERS
            && signed_headers.windows(2).all(|w| w[0] < w[1])
            && signed_headers.iter().all(|h| {
                !h.is_empty() && http::HeaderName::from_bytes(h.as_bytes()).is_ok_and(|n| n == *h)
            });
        let signature = signature?;
        let hex_signature = signature.len() == 64
            && signature
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        (well_formed && hex_signature).then_some(Authorization {
            scope,
            signed_headers,
            signature,
        })
    }
}

fn has_presigned_query(uri: &http::Uri) -> bool {
    uri.query().is_some_and(|q| {
        q.split('&').any(|pair| {
            pair.split('=')
                .next()
                .is_some_and(|k| k.eq_ignore_ascii_case("X-Amz-Signature"))
        })
    })
}

/// `YYYYMMDDTHHMMSSZ`, the only form SigV4 uses.
fn parse_amz_date(value: &str) -> Option<SystemTime> {
    let bytes = value.as_bytes();
    if bytes.len() != 16 || bytes[8] != b'T' || bytes[15] != b'Z' {
        return None;
    }
    let number = |range: std::ops::Range<usize>| -> Option<u32> {
        let digits = value.get(range)?;
        digits
            .bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| digits.parse().ok())?
    };
    let month = time::Month::try_from(u8::try_from(number(4..6)?).ok()?).ok()?;
    let date = time::Date::from_calendar_date(
        i32::try_from(number(0..4)?).ok()?,
        month,
        u8::try_from(number(6..8)?).ok()?,
    )
    .ok()?;
    let time = time::Time::from_hms(
        u8::try_from(number(9..11)?).ok()?,
        u8::try_from(number(11..13)?).ok()?,
        u8::try_from(number(13..15)?).ok()?,
    )
    .ok()?;
    Some(time::PrimitiveDateTime::new(date, time).assume_utc().into())
}

fn load_keys(path: &Path) -> Result<HashMap<String, Key>, CredentialsError> {
    let text = std::fs::read_to_string(path).map_err(|source| CredentialsError::Read {
        path: path.to_owned(),
        source,
    })?;
    crate::secret_file::warn_if_shared(path, "the SigV4 credentials file");
    let invalid = |reason: String| CredentialsError::Invalid {
        path: path.to_owned(),
        reason,
    };
    // toml's messages quote the offending line, which may hold a secret key: report the position only.
    let file: CredentialsFile = toml::from_str(&text).map_err(|e| {
        invalid(match e.span() {
            Some(span) => format!(
                "not a valid credentials file (error at byte {}): expected [[keys]] tables with \
                 access_key_id, secret_access_key and principal",
                span.start
            ),
            None => "not a valid credentials file".into(),
        })
    })?;
    if file.keys.len() > MAX_KEYS {
        return Err(invalid(format!(
            "at most {MAX_KEYS} keys, got {}",
            file.keys.len()
        )));
    }
    let mut keys = HashMap::with_capacity(file.keys.len());
    for (index, entry) in file.keys.into_iter().enumerate() {
        let id_ok = (16..=128).contains(&entry.access_key_id.len())
            && entry
                .access_key_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric());
        if !id_ok {
            return Err(invalid(format!(
                "keys[{index}].access_key_id must be 16 to 128 letters and digits"
            )));
        }
        if entry.secret_access_key.expose().len() < 20 {
            return Err(invalid(format!(
                "keys[{index}].secret_access_key must be at least 20 characters"
            )));
        }
        if entry.principal.trim().is_empty() {
            return Err(invalid(format!(
                "keys[{index}].principal must not be empty"
            )));
        }
        let key = Key {
            secret: entry.secret_access_key,
            principal: Caller::with_source(entry.principal, CallerSource::Sigv4),
        };
        if keys.insert(entry.access_key_id, key).is_some() {
            return Err(invalid(format!(
                "keys[{index}].access_key_id is listed twice"
            )));
        }
    }
    Ok(keys)
}

#[cfg(test)]
mod tests;
