//! End users' own identity tokens: the caller forwards its end user's token (an OpenID Connect ID token,
//! or any JWT from a configured issuer) in one header, the same for gRPC metadata and the HTTP API
//! (`end_user.header`, default `x-end-user-token`), and [`Verifier::resolve`] turns it into the
//! [`EndUser`] it proves.
//!
//! A token is accepted only when all of these hold, in this order (the first that fails is the
//! [`EndUserRejection`]):
//! 1. it is a compact JWS of at most [`MAX_TOKEN_BYTES`] whose `iss` is a configured issuer;
//! 2. its `alg` is one the issuer allows (RS256, ES256, EdDSA: never `none`, never HMAC) and the very
//!    algorithm of the key its `kid` names (no algorithm confusion), the key being in the issuer's JWK set
//!    ([`jwks`]: fetched and cached, or a file);
//! 3. the signature verifies (jsonwebtoken, on ring: [`crypto`]); `exp` has not passed and `nbf` has, with
//!    `end_user.leeway`; `aud` names a configured audience; `iat`, when present, is not in the future,
//!    and with `max_token_age` it is required and recent enough;
//! 4. the user-id claim is a string making a valid user id (through the template), and every claim
//!    exposed to policy is strings within bounds.
//!
//! A header that is absent means no end user; one that is present is never ignored: it binds, or the call
//! is refused (UNAUTHENTICATED, or UNAVAILABLE when the issuer's keys cannot be had at all).

mod crypto;
pub mod fetch;
pub mod jwks;

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Weak},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, Validation, errors::ErrorKind};
use opentelemetry::KeyValue;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::config::{EndUserConfig, EndUserIssuer, EndUserKeySource, JwtAlgorithm};
use crate::domain::end_user::{MAX_CLAIM_VALUE_BYTES, MAX_CLAIM_VALUES};
use crate::domain::{EndUser, EndUserRejection, Error, UserId};
use crate::telemetry::metrics::metrics;
use fetch::{FetchError, Fetcher};
use jwks::{FetchSettings, IssuerKeys, Lookup, Source};

/// Longest end-user token accepted, in bytes. ID tokens are a few KB; the bound keeps the work an
/// unverified token causes small.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// Why the end-user verifier cannot be built from the configuration.
#[derive(Debug, thiserror::Error)]
pub enum VerifierError {
    /// An issuer's JWK set file does not load.
    #[error("end_user.issuers[{index}].jwks_file: {reason}")]
    KeysFile {
        /// The issuer's position in `end_user.issuers`.
        index: usize,
        /// Why.
        reason: String,
    },
    /// The HTTPS client for fetching keys cannot be made.
    #[error("end_user.issuers: {0}")]
    Fetcher(FetchError),
    /// Another jsonwebtoken crypto provider was installed in this process first.
    #[error("end_user: another JWT crypto provider is installed in this process")]
    Provider,
}

/// Verifies end-user tokens against the configured issuers.
pub struct Verifier {
    /// The header carrying the token.
    header: http::HeaderName,
    /// The trusted issuers, by `iss`.
    issuers: HashMap<String, Issuer>,
    /// The claims policies see.
    claims: Vec<String>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("header", &self.header)
            .field("issuers", &self.issuers.keys().collect::<Vec<_>>())
            .field("claims", &self.claims)
            .finish()
    }
}

/// One trusted issuer, ready to verify.
struct Issuer {
    keys: Arc<IssuerKeys>,
    allowed: Vec<JwtAlgorithm>,
    /// The signature and claim checks, one per allowed algorithm.
    validations: Vec<(Algorithm, Validation)>,
    /// Clock skew allowed on `iat`.
    leeway: Duration,
    max_token_age: Option<Duration>,
    user_id_claim: String,
    /// The user id template split around its placeholder.
    user_id_template: Option<(String, String)>,
    /// Token attribute ← claim.
    attributes: Vec<(String, String)>,
}

/// What the token's segments say before anything is verified: only used to pick the issuer and key.
#[derive(Deserialize)]
struct UnverifiedHeader {
    alg: String,
    kid: Option<String>,
}

#[derive(Deserialize)]
struct UnverifiedIssuer {
    iss: String,
}

fn to_jsonwebtoken(algorithm: JwtAlgorithm) -> Algorithm {
    match algorithm {
        JwtAlgorithm::RS256 => Algorithm::RS256,
        JwtAlgorithm::ES256 => Algorithm::ES256,
        JwtAlgorithm::EdDSA => Algorithm::EdDSA,
    }
}

impl Verifier {
    /// The verifier `settings` describe: JWK set files are read now; fetched keys are fetched on first
    /// use (or by [`Verifier::prefetch`]). Builds nothing else and spawns nothing.
    pub fn new(settings: &EndUserConfig) -> Result<Self, VerifierError> {
        if !crypto::install() {
            return Err(VerifierError::Provider);
        }
        let fetches = settings
            .issuers
            .iter()
            .any(|issuer| !matches!(issuer.key_source(), EndUserKeySource::File(_)));
        let fetch = Arc::new(FetchSettings {
            fetcher: fetches
                .then(|| Fetcher::new(settings.fetch_timeout, settings.max_jwks_bytes))
                .transpose()
                .map_err(VerifierError::Fetcher)?,
            max_bytes: settings.max_jwks_bytes,
            max_age: settings.jwks_max_age,
            min_interval: settings.jwks_min_refresh_interval,
            max_keys: settings.max_keys,
        });
        let mut issuers = HashMap::new();
        for (index, issuer) in settings.issuers.iter().enumerate() {
            let source = match issuer.key_source() {
                EndUserKeySource::File(path) => Source::File(path.clone()),
                EndUserKeySource::Url(url) => Source::Url(url.clone()),
                EndUserKeySource::Discovery => Source::Discovery(
                    issuer
                        .discovery_url()
                        .expect("checked when the configuration was loaded"),
                ),
            };
            let keys = IssuerKeys::new(
                issuer.issuer.clone(),
                source,
                issuer.algorithms.clone(),
                fetch.clone(),
            )
            .map_err(|reason| VerifierError::KeysFile { index, reason })?;
            issuers.insert(
                issuer.issuer.clone(),
                Issuer::new(issuer, Arc::new(keys), settings.leeway),
            );
        }
        Ok(Verifier {
            header: settings.header.clone(),
            issuers,
            claims: settings.claims.clone(),
        })
    }

    /// The header carrying end users' tokens.
    pub fn header(&self) -> &http::HeaderName {
        &self.header
    }

    /// The JWK set files, each with the keys to reload from it (for the file watcher).
    pub fn files(&self) -> Vec<(PathBuf, Weak<IssuerKeys>)> {
        self.issuers
            .values()
            .filter_map(|issuer| {
                let path = issuer.keys.file()?.to_owned();
                Some((path, Arc::downgrade(&issuer.keys)))
            })
            .collect()
    }

    /// Starts fetching every fetched issuer's keys, so the first tokens need not wait for them. Call it
    /// inside a tokio runtime.
    pub fn prefetch(&self) {
        for issuer in self.issuers.values() {
            if issuer.keys.file().is_none() {
                let keys = issuer.keys.clone();
                tokio::spawn(async move { keys.prefetch().await });
            }
        }
    }

    /// The end user a request with `headers` proves: `None` without the header, else the verified user
    /// or why not. Each outcome is counted by issuer.
    pub async fn resolve(&self, headers: &http::HeaderMap) -> Result<Option<EndUser>, Error> {
        let mut values = headers.get_all(&self.header).iter();
        let Some(value) = values.next() else {
            return Ok(None);
        };
        let verified = if values.next().is_some() {
            Err(("unknown", Error::EndUserInvalid(EndUserRejection::Repeated)))
        } else {
            match value.to_str() {
                // Boxed: verifying (and perhaps fetching keys) is a large future, which inline would
                // make every call's future larger, with a token or not.
                Ok(token) => Box::pin(self.verify(token.trim())).await,
                Err(_) => Err((
                    "unknown",
                    Error::EndUserInvalid(EndUserRejection::Malformed),
                )),
            }
        };
        let (issuer, outcome) = match &verified {
            Ok(user) => (user.issuer.clone(), "bound"),
            Err((issuer, Error::EndUserInvalid(rejection))) => {
                ((*issuer).to_owned(), rejection.cause())
            }
            Err((issuer, _)) => ((*issuer).to_owned(), "keys_unavailable"),
        };
        metrics().end_user_verifications.add(
            1,
            &[
                KeyValue::new("issuer", issuer),
                KeyValue::new("outcome", outcome),
            ],
        );
        verified.map(Some).map_err(|(_, error)| error)
    }

    /// Verifies `token`; a refusal comes with the issuer to count it under (`unknown` before one is
    /// found).
    async fn verify(&self, token: &str) -> Result<EndUser, (&str, Error)> {
        let invalid = |issuer, why| (issuer, Error::EndUserInvalid(why));
        if token.is_empty() || token.len() > MAX_TOKEN_BYTES {
            return Err(invalid("unknown", EndUserRejection::Malformed));
        }
        let mut segments = token.split('.');
        let (Some(header), Some(payload), Some(_), None) = (
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
        ) else {
            return Err(invalid("unknown", EndUserRejection::Malformed));
        };
        let header: UnverifiedHeader =
            segment(header).ok_or_else(|| invalid("unknown", EndUserRejection::Malformed))?;
        let claimed: UnverifiedIssuer =
            segment(payload).ok_or_else(|| invalid("unknown", EndUserRejection::Malformed))?;
        let Some((name, issuer)) = self.issuers.get_key_value(&claimed.iss) else {
            return Err(invalid("unknown", EndUserRejection::Issuer));
        };
        let name = name.as_str();
        let reject = |why| invalid(name, why);
        let algorithm = issuer
            .allowed
            .iter()
            .find(|allowed| allowed.as_str() == header.alg)
            .map(|allowed| to_jsonwebtoken(*allowed))
            .ok_or_else(|| reject(EndUserRejection::Algorithm))?;
        let key = match issuer.keys.lookup(header.kid.as_deref(), algorithm).await {
            Lookup::Found(key) => key,
            Lookup::Unknown => return Err(reject(EndUserRejection::UnknownKey)),
            Lookup::Unavailable(retry_after) => {
                return Err((name, Error::EndUserKeysUnavailable { retry_after }));
            }
        };
        if key.algorithm != algorithm {
            return Err(reject(EndUserRejection::Algorithm));
        }
        let validation = issuer
            .validations
            .iter()
            .find(|(of, _)| *of == algorithm)
            .map(|(_, validation)| validation)
            .ok_or_else(|| reject(EndUserRejection::Algorithm))?;
        let claims = jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, validation)
            .map_err(|e| reject(rejection(e.kind())))?
            .claims;
        issuer
            .check_issued_at(&claims, SystemTime::now())
            .map_err(reject)?;
        let user_id = issuer.user_id(&claims).map_err(reject)?;
        let policy_claims = self
            .claims
            .iter()
            .filter_map(|name| {
                claims
                    .get(name)
                    .map(|value| strings(value).map(|values| (name.clone(), values)))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(reject)?;
        let attributes = issuer.attributes(&claims).map_err(reject)?;
        Ok(EndUser {
            issuer: name.to_owned(),
            subject: claims
                .get("sub")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
            user_id,
            claims: policy_claims,
            attributes,
        })
    }
}

/// One base64url segment of a compact JWS, as JSON of shape `T`.
fn segment<T: for<'de> Deserialize<'de>>(encoded: &str) -> Option<T> {
    let json = URL_SAFE_NO_PAD.decode(encoded).ok()?;
    serde_json::from_slice(&json).ok()
}

/// Why jsonwebtoken refused a token, in our words.
fn rejection(kind: &ErrorKind) -> EndUserRejection {
    match kind {
        ErrorKind::InvalidSignature
        | ErrorKind::InvalidEcdsaKey
        | ErrorKind::InvalidEddsaKey
        | ErrorKind::InvalidRsaKey(_)
        | ErrorKind::InvalidKeyFormat => EndUserRejection::Signature,
        ErrorKind::InvalidAlgorithm
        | ErrorKind::InvalidAlgorithmName
        | ErrorKind::UnsupportedAlgorithm
        | ErrorKind::MissingAlgorithm => EndUserRejection::Algorithm,
        ErrorKind::ExpiredSignature => EndUserRejection::Expired,
        ErrorKind::ImmatureSignature => EndUserRejection::NotYetValid,
        ErrorKind::InvalidAudience => EndUserRejection::Audience,
        ErrorKind::InvalidIssuer => EndUserRejection::Issuer,
        ErrorKind::InvalidSubject => EndUserRejection::Claim,
        _ => EndUserRejection::Malformed,
    }
}

/// A claim exposed to policy as a set of strings, within [`MAX_CLAIM_VALUES`] and
/// [`MAX_CLAIM_VALUE_BYTES`].
fn strings(value: &Value) -> Result<Vec<String>, EndUserRejection> {
    let one = |value: &Value| match value {
        Value::String(s) => Some(s.clone()),
        Value::Bool(_) | Value::Number(_) => Some(value.to_string()),
        _ => None,
    };
    let values = match value {
        Value::Array(items) if items.len() <= MAX_CLAIM_VALUES => items
            .iter()
            .map(one)
            .collect::<Option<Vec<_>>>()
            .ok_or(EndUserRejection::Claim)?,
        Value::Array(_) => return Err(EndUserRejection::Claim),
        value => vec![one(value).ok_or(EndUserRejection::Claim)?],
    };
    if values.iter().any(|v| v.len() > MAX_CLAIM_VALUE_BYTES) {
        return Err(EndUserRejection::Claim);
    }
    Ok(values)
}

impl Issuer {
    fn new(settings: &EndUserIssuer, keys: Arc<IssuerKeys>, leeway: Duration) -> Self {
        let validations = settings
            .algorithms
            .iter()
            .map(|algorithm| {
                let algorithm = to_jsonwebtoken(*algorithm);
                let mut validation = Validation::new(algorithm);
                validation.leeway = leeway.as_secs();
                validation.validate_nbf = true;
                validation.set_issuer(&[&settings.issuer]);
                validation.set_audience(&settings.audiences);
                validation.set_required_spec_claims(&["exp", "iss", "aud"]);
                (algorithm, validation)
            })
            .collect();
        let placeholder = format!("{{{}}}", settings.user_id_claim);
        Issuer {
            keys,
            allowed: settings.algorithms.clone(),
            validations,
            leeway,
            max_token_age: settings.max_token_age,
            user_id_claim: settings.user_id_claim.clone(),
            user_id_template: settings.user_id_template.as_ref().and_then(|template| {
                template
                    .split_once(&placeholder)
                    .map(|(before, after)| (before.to_owned(), after.to_owned()))
            }),
            attributes: settings
                .attributes
                .iter()
                .map(|(key, claim)| (key.clone(), claim.clone()))
                .collect(),
        }
    }

    /// `iat` is not in the future, and with `max_token_age` it is present and recent enough.
    fn check_issued_at(
        &self,
        claims: &Map<String, Value>,
        now: SystemTime,
    ) -> Result<(), EndUserRejection> {
        let now = now
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        let issued_at = match claims.get("iat") {
            None if self.max_token_age.is_none() => return Ok(()),
            None => return Err(EndUserRejection::TooOld),
            Some(iat) => iat.as_f64().ok_or(EndUserRejection::Malformed)?,
        };
        let leeway = self.leeway.as_secs_f64();
        if issued_at > now + leeway {
            return Err(EndUserRejection::NotYetValid);
        }
        match self.max_token_age {
            Some(max) if now - issued_at > max.as_secs_f64() + leeway => {
                Err(EndUserRejection::TooOld)
            }
            _ => Ok(()),
        }
    }

    /// The user id the claims map to.
    fn user_id(&self, claims: &Map<String, Value>) -> Result<UserId, EndUserRejection> {
        let value = claims
            .get(&self.user_id_claim)
            .and_then(Value::as_str)
            .filter(|value| !value.is_empty())
            .ok_or(EndUserRejection::Claim)?;
        let id = match &self.user_id_template {
            Some((before, after)) => format!("{before}{value}{after}"),
            None => value.to_owned(),
        };
        UserId::parse(id).map_err(|_| EndUserRejection::Claim)
    }

    /// The token attributes taken from string claims; claims the token lacks are skipped.
    fn attributes(
        &self,
        claims: &Map<String, Value>,
    ) -> Result<Vec<(String, String)>, EndUserRejection> {
        self.attributes
            .iter()
            .filter_map(|(key, claim)| {
                claims.get(claim).map(|value| {
                    value
                        .as_str()
                        .map(|value| (key.clone(), value.to_owned()))
                        .ok_or(EndUserRejection::Claim)
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
