//! The local issuer: mints its own encrypted, authenticated chat tokens, and verifies them.
//!
//! Tokens are [PASETO] `v4.local` (XChaCha20 + BLAKE2b-MAC, from the `pasetors` crate): the claims are
//! encrypted, so the token reveals nothing to its holder, and authenticated, so nobody without the key can
//! forge or alter one. The footer, authenticated but not encrypted, carries `kid`: the [PASERK] local id
//! (`k4.lid.…`) of the key that encrypted the token, so keys can rotate: a [`KeySet`] encrypts with its one
//! active key and accepts tokens from any of its keys.
//!
//! A chat backend accepts these tokens with [`KeySet::verify`]:
//!
//! ```
//! use std::{sync::Arc, time::Duration};
//! use chat_token_service::issuer::{Issuer, local::{KeySet, LocalIssuer, generate_key}};
//! use chat_token_service::proto::ivschat::v1::CreateChatTokenRequest;
//! use chat_token_service::request::{Caller, TokenRequest};
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let paserk = generate_key(); // in production: the same key the service was configured with
//! let issuer = LocalIssuer::new(Arc::new(KeySet::from_paserk(&paserk)?), Duration::from_secs(60));
//! let request = TokenRequest::from_proto(Caller::new("doc"), CreateChatTokenRequest {
//!     room_identifier: "arn:aws:ivschat:us-west-2:123456789012:room/g1H2I3j4k5L6".into(),
//!     user_id: "user-1".into(),
//!     ..Default::default()
//! })?;
//! let token = issuer.issue(request).await?.token;
//!
//! // In the chat backend:
//! let keys = KeySet::from_paserk(&paserk)?;
//! let claims = keys.verify(&token)?; // decrypts, authenticates and checks expiry
//! assert_eq!(claims.room.room_id(), "g1H2I3j4k5L6");
//! # Ok(()) }
//! ```
//!
//! [PASETO]: https://github.com/paseto-standard/paseto-spec
//! [PASERK]: https://github.com/paseto-standard/paserk

use std::{
    collections::BTreeMap,
    fmt,
    path::Path,
    sync::Arc,
    time::{Duration, SystemTime},
};

use pasetors::{
    Local,
    claims::{Claims, ClaimsValidationRules},
    footer::Footer,
    keys::{Generate, SymmetricKey},
    paserk::{FormatAsPaserk, Id},
    token::UntrustedToken,
    version4::V4,
};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::{IssuedToken, Issuer};
use crate::error::Error;
use crate::request::{Attributes, Capabilities, Capability, RoomArn, TokenRequest, UserId};

/// Bound into every token's authentication tag, so a v4.local token minted by another system with the
/// same key can never pass as a chat token. Verifiers must supply the same bytes; [`KeySet::verify`] does.
pub const IMPLICIT_ASSERTION: &[u8] = b"ivschat.v1.ChatToken";

/// One symmetric key and its PASERK id.
struct LocalKey {
    /// `k4.lid.…`, derived from the key itself, so it can never name the wrong key.
    id: String,
    key: SymmetricKey<V4>,
}

impl LocalKey {
    fn new(key: SymmetricKey<V4>) -> Self {
        let mut id = String::new();
        Id::from(&key)
            .fmt(&mut id)
            .expect("formatting a PASERK id into a String cannot fail");
        LocalKey { id, key }
    }
}

/// The keys of the local issuer: one active key encrypts new tokens; every key verifies.
pub struct KeySet {
    /// Index into `keys` of the key that encrypts new tokens.
    active: usize,
    keys: Vec<LocalKey>,
}

impl fmt::Debug for KeySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeySet")
            .field("active", &self.active_key_id())
            .field(
                "ids",
                &self.keys.iter().map(|k| k.id.as_str()).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// Why a key or key set could not be loaded. Never contains key material.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key file could not be read.
    #[error("cannot read key set file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// The key file is not valid TOML of the expected shape.
    #[error("key set file {path} is not valid: {reason}")]
    Format { path: String, reason: String },
    /// A key is not a PASERK `k4.local.` string.
    #[error(
        "{location}: not a PASERK k4.local key (generate one with `chat-token-service generate-key`)"
    )]
    NotAKey { location: String },
    /// The file does not mark exactly one key active.
    #[error("key set file {path}: exactly one key must have `active = true`, found {found}")]
    Active { path: String, found: usize },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    keys: Vec<KeyEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    key: String,
    #[serde(default)]
    active: bool,
}

impl KeySet {
    /// A set of one fresh random key. Tokens it mints cannot be verified after a restart.
    pub fn ephemeral() -> Self {
        let key = SymmetricKey::<V4>::generate().expect("the OS random number generator failed");
        KeySet {
            active: 0,
            keys: vec![LocalKey::new(key)],
        }
    }

    /// A set of one key given as a PASERK `k4.local.` string.
    pub fn from_paserk(paserk: &str) -> Result<Self, KeyError> {
        Ok(KeySet {
            active: 0,
            keys: vec![parse_key(paserk.trim(), "key")?],
        })
    }

    /// Reads a key set file:
    ///
    /// ```toml
    /// [[keys]]
    /// key = "k4.local.…"   # encrypts new tokens
    /// active = true
    ///
    /// [[keys]]
    /// key = "k4.local.…"   # an older key: its tokens are still accepted
    /// ```
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::from_toml(&text, &shown)
    }

    /// Parses the contents of a key set file; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, KeyError> {
        let file: KeyFile = toml::from_str(text).map_err(|e| KeyError::Format {
            path: origin.to_owned(),
            // toml's message quotes the offending line, which may be a key: keep only the reason.
            reason: e.message().to_owned(),
        })?;
        let keys = file
            .keys
            .iter()
            .enumerate()
            .map(|(i, entry)| parse_key(&entry.key, &format!("{origin}: keys[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        let active: Vec<usize> = file
            .keys
            .iter()
            .enumerate()
            .filter(|(_, e)| e.active)
            .map(|(i, _)| i)
            .collect();
        match active[..] {
            [active] => Ok(KeySet { active, keys }),
            _ => Err(KeyError::Active {
                path: origin.to_owned(),
                found: active.len(),
            }),
        }
    }

    /// The PASERK id of the key that encrypts new tokens.
    pub fn active_key_id(&self) -> &str {
        &self.keys[self.active].id
    }

    /// Decrypts and authenticates `token`, checks it has not expired, and returns what it grants.
    pub fn verify(&self, token: &str) -> Result<TokenClaims, VerifyError> {
        self.verify_at(token, OffsetDateTime::now_utc())
    }

    fn verify_at(&self, token: &str, now: OffsetDateTime) -> Result<TokenClaims, VerifyError> {
        let untrusted =
            UntrustedToken::<Local, V4>::try_from(token).map_err(|_| VerifyError::Malformed)?;
        let mut footer = Footer::new();
        footer
            .parse_bytes(untrusted.untrusted_footer())
            .map_err(|_| VerifyError::Malformed)?;
        let kid = footer
            .get_claim("kid")
            .and_then(|v| v.as_str())
            .ok_or(VerifyError::Malformed)?;
        let key = self
            .keys
            .iter()
            .find(|k| k.id == kid)
            .ok_or(VerifyError::UnknownKey)?;

        // Expiry is checked below against `now`, so tests can verify at a chosen instant.
        let mut rules = ClaimsValidationRules::new();
        rules.disable_valid_at();
        let trusted =
            pasetors::local::decrypt(&key.key, &untrusted, &rules, None, Some(IMPLICIT_ASSERTION))
                .map_err(|e| match e {
                    // pasetors checks `exp` against the real clock even with the valid-at rules off; the
                    // token authenticated, it is only too old.
                    pasetors::errors::Error::ClaimValidation(
                        pasetors::errors::ClaimValidationError::Exp,
                    ) => VerifyError::Expired,
                    _ => VerifyError::Forged,
                })?;
        let payload: Payload =
            serde_json::from_str(trusted.payload()).map_err(|_| VerifyError::Claims)?;
        if now < payload.nbf {
            return Err(VerifyError::NotYetValid);
        }
        if now >= payload.exp {
            return Err(VerifyError::Expired);
        }
        payload.into_claims()
    }

    fn encrypt(&self, payload: &Payload) -> Result<String, pasetors::errors::Error> {
        let active = &self.keys[self.active];
        let json =
            serde_json::to_string(payload).map_err(|_| pasetors::errors::Error::InvalidClaim)?;
        let claims = Claims::from_string(&json)?;
        let mut footer = Footer::new();
        footer.key_id(&Id::from(&active.key));
        pasetors::local::encrypt(
            &active.key,
            &claims,
            Some(&footer),
            Some(IMPLICIT_ASSERTION),
        )
    }
}

fn parse_key(paserk: &str, location: &str) -> Result<LocalKey, KeyError> {
    SymmetricKey::<V4>::try_from(paserk)
        .map(LocalKey::new)
        .map_err(|_| KeyError::NotAKey {
            location: location.to_owned(),
        })
}

/// A fresh random key as a PASERK `k4.local.` string, for a key set file or `CTS_LOCAL_ISSUER__KEY`.
pub fn generate_key() -> String {
    let key = SymmetricKey::<V4>::generate().expect("the OS random number generator failed");
    let mut paserk = String::new();
    key.fmt(&mut paserk)
        .expect("formatting a PASERK key into a String cannot fail");
    paserk
}

/// Why a token was refused. Deliberately coarse: a verifier should not help a forger.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// Not a v4.local token with a `kid` footer.
    #[error("not a well-formed v4.local chat token")]
    Malformed,
    /// The `kid` names no key of this key set.
    #[error("token was encrypted with a key this key set does not hold")]
    UnknownKey,
    /// Decryption or authentication failed: wrong key, tampering or wrong purpose.
    #[error("token failed authentication")]
    Forged,
    /// Authentic, but the claims are not what this issuer writes.
    #[error("token claims are not valid chat token claims")]
    Claims,
    /// The token's `nbf` is in the future.
    #[error("token is not valid yet")]
    NotYetValid,
    /// The token's `exp` has passed.
    #[error("token has expired")]
    Expired,
}

/// What a verified token grants.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenClaims {
    /// Unique per token (`jti`), for replay detection and audit.
    pub token_id: String,
    /// The room the token opens.
    pub room: RoomArn,
    /// The end user the token is for.
    pub user_id: UserId,
    /// What the user may do besides reading.
    pub capabilities: Capabilities,
    /// Application data for the session.
    pub attributes: Attributes,
    /// When the token was minted.
    pub issued_at: SystemTime,
    /// After this instant the token no longer opens a connection.
    pub token_expires_at: SystemTime,
    /// After this instant a session opened with the token ends.
    pub session_expires_at: SystemTime,
}

/// The token's claims as they appear in the PASETO payload. Names follow IVS Chat's API.
#[derive(Serialize, Deserialize)]
struct Payload {
    jti: String,
    #[serde(with = "time::serde::rfc3339")]
    iat: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    nbf: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    exp: OffsetDateTime,
    #[serde(rename = "roomArn")]
    room_arn: String,
    #[serde(rename = "userId")]
    user_id: String,
    capabilities: Vec<String>,
    attributes: BTreeMap<String, String>,
    #[serde(rename = "sessionExpirationTime", with = "time::serde::rfc3339")]
    session_expiration_time: OffsetDateTime,
}

impl Payload {
    fn into_claims(self) -> Result<TokenClaims, VerifyError> {
        let capabilities = self
            .capabilities
            .iter()
            .map(|name| Capability::from_ivs_name(name).ok_or(VerifyError::Claims))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(TokenClaims {
            token_id: self.jti,
            room: RoomArn::parse(&self.room_arn).map_err(|_| VerifyError::Claims)?,
            user_id: UserId::parse(self.user_id).map_err(|_| VerifyError::Claims)?,
            capabilities: Capabilities::new(capabilities),
            attributes: Attributes::parse(self.attributes).map_err(|_| VerifyError::Claims)?,
            issued_at: self.iat.into(),
            token_expires_at: self.exp.into(),
            session_expires_at: self.session_expiration_time.into(),
        })
    }
}

/// Mints PASETO v4.local chat tokens with the active key of a [`KeySet`].
pub struct LocalIssuer {
    keys: Arc<KeySet>,
    /// How long a token may be used to connect; IVS Chat uses one minute.
    token_ttl: Duration,
}

impl LocalIssuer {
    /// An issuer that encrypts with `keys`' active key, minting tokens valid for `token_ttl`.
    pub fn new(keys: Arc<KeySet>, token_ttl: Duration) -> Self {
        LocalIssuer { keys, token_ttl }
    }

    fn mint(&self, request: &TokenRequest, now: SystemTime) -> Result<IssuedToken, Error> {
        // `iat` keeps sub-second precision, so a token minted right after a revocation (DisconnectUser)
        // in the same second is told apart from one minted before it.
        let issued_at = OffsetDateTime::from(now);
        // Expirations in whole seconds, as IVS Chat returns them; the token and the response then agree
        // exactly.
        let now = issued_at
            .replace_nanosecond(0)
            .expect("0 is a valid nanosecond");
        let exp = now + self.token_ttl;
        let session_expiration_time = now + request.session_duration().as_duration();
        let token_id = uuid::Uuid::new_v4().to_string();
        let payload = Payload {
            jti: token_id.clone(),
            iat: issued_at,
            nbf: now,
            exp,
            room_arn: request.room.as_str().to_owned(),
            user_id: request.user_id.expose().to_owned(),
            capabilities: request
                .capabilities
                .iter()
                .map(|c| c.ivs_name().to_owned())
                .collect(),
            attributes: request.attributes.expose().clone(),
            session_expiration_time,
        };
        let token = self
            .keys
            .encrypt(&payload)
            .map_err(|e| Error::Internal(format!("local issuer could not encrypt a token: {e}")))?;
        Ok(IssuedToken {
            token,
            token_id: Some(token_id),
            token_expires_at: exp.into(),
            session_expires_at: session_expiration_time.into(),
        })
    }
}

impl Issuer for LocalIssuer {
    const NAME: &'static str = "local";

    async fn issue(&self, request: TokenRequest) -> Result<IssuedToken, Error> {
        self.mint(&request, SystemTime::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::Caller;

    fn request() -> TokenRequest {
        TokenRequest {
            caller: Caller::new("test"),
            room: RoomArn::parse("arn:aws:ivschat:us-west-2:123456789012:room/abc").unwrap(),
            user_id: UserId::parse("ユーザー".into()).unwrap(),
            capabilities: Capabilities::new([Capability::SendMessage, Capability::DeleteMessage]),
            session_duration: None,
            attributes: Attributes::parse([("displayName".into(), "Ann".into())]).unwrap(),
        }
    }

    #[test]
    fn a_minted_token_verifies_to_exactly_the_request() {
        let keys = Arc::new(KeySet::ephemeral());
        let issuer = LocalIssuer::new(keys.clone(), Duration::from_secs(60));
        let now = SystemTime::now();
        let issued = issuer.mint(&request(), now).unwrap();
        let claims = keys.verify(&issued.token).unwrap();
        let req = request();
        assert_eq!(claims.room, req.room);
        assert_eq!(claims.user_id, req.user_id);
        assert_eq!(claims.capabilities, req.capabilities);
        assert_eq!(claims.attributes, req.attributes);
        assert_eq!(claims.token_expires_at, issued.token_expires_at);
        assert_eq!(claims.session_expires_at, issued.session_expires_at);
        // `iat` keeps the instant of minting; expirations count from its whole second.
        assert_eq!(claims.issued_at, now);
        let token_life = claims
            .token_expires_at
            .duration_since(claims.issued_at)
            .unwrap();
        assert!(
            token_life > Duration::from_secs(59) && token_life <= Duration::from_secs(60),
            "{token_life:?}"
        );
        assert_eq!(
            claims
                .session_expires_at
                .duration_since(claims.token_expires_at)
                .unwrap(),
            Duration::from_secs(59 * 60)
        );
    }

    #[test]
    fn tokens_expire_at_their_exp() {
        let keys = Arc::new(KeySet::ephemeral());
        let issuer = LocalIssuer::new(keys.clone(), Duration::from_secs(60));
        let issued = issuer.mint(&request(), SystemTime::now()).unwrap();
        let exp = OffsetDateTime::from(issued.token_expires_at);
        assert!(
            keys.verify_at(&issued.token, exp - Duration::from_secs(1))
                .is_ok()
        );
        assert_eq!(
            keys.verify_at(&issued.token, exp).unwrap_err(),
            VerifyError::Expired
        );
    }

    #[test]
    fn rotation_accepts_old_keys_and_refuses_unknown_and_tampered_tokens() {
        let old = generate_key();
        let new = generate_key();
        let old_only = Arc::new(KeySet::from_paserk(&old).unwrap());
        let old_token = LocalIssuer::new(old_only, Duration::from_secs(60))
            .mint(&request(), SystemTime::now())
            .unwrap()
            .token;

        let rotated = KeySet::from_toml(
            &format!("[[keys]]\nkey = \"{new}\"\nactive = true\n[[keys]]\nkey = \"{old}\"\n"),
            "test",
        )
        .unwrap();
        assert!(rotated.verify(&old_token).is_ok());
        assert_ne!(
            rotated.active_key_id(),
            KeySet::from_paserk(&old).unwrap().active_key_id()
        );

        let stranger = KeySet::ephemeral();
        assert_eq!(
            stranger.verify(&old_token).unwrap_err(),
            VerifyError::UnknownKey
        );

        let mut tampered = old_token.clone().into_bytes();
        tampered[20] = if tampered[20] == b'A' { b'B' } else { b'A' };
        assert_eq!(
            rotated
                .verify(std::str::from_utf8(&tampered).unwrap())
                .unwrap_err(),
            VerifyError::Forged
        );
        assert_eq!(
            rotated.verify("not a token").unwrap_err(),
            VerifyError::Malformed
        );
    }

    #[test]
    fn key_file_errors_name_the_problem_without_key_material() {
        let key = generate_key();
        let none_active = KeySet::from_toml(&format!("[[keys]]\nkey = \"{key}\"\n"), "keys.toml");
        assert!(matches!(
            none_active,
            Err(KeyError::Active { found: 0, .. })
        ));

        let err = KeySet::from_toml(
            "[[keys]]\nkey = \"k4.local.short-secret\"\nactive = true\n",
            "keys.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("keys.toml: keys[0]"), "{err}");
        assert!(!err.contains("short-secret"), "{err}");

        let err = KeySet::from_toml("keys = 3 # k4.local.secret", "keys.toml")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("secret"), "{err}");
    }
}
