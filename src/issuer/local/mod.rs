//! The local issuer: mints its own encrypted, authenticated chat tokens, and verifies them.
//!
//! Tokens are [PASETO] `v4.local` (XChaCha20 + BLAKE2b-MAC; minted here on RustCrypto's `chacha20` and
//! `blake2b_simd`, opened by the `pasetors` crate): the claims are
//! encrypted, so the token reveals nothing to its holder, and authenticated, so nobody without the key can
//! forge or alter one. The footer, authenticated but not encrypted, carries `kid`: the [PASERK] local id
//! (`k4.lid.…`) of the key that encrypted the token, so keys can rotate: a [`KeySet`] encrypts with its one
//! active key and accepts tokens from any of its keys.
//!
//! A chat backend accepts these tokens with [`KeySet::verify`]:
//!
//! ```
//! use std::{sync::Arc, time::Duration};
//! use chat_token_service::domain::{Caller, FieldNames, TokenRequest, UncheckedRequest};
//! use chat_token_service::issuer::{Issuer, local::{KeySet, LocalIssuer, generate_key}};
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let paserk = generate_key(); // in production: the same key the service was configured with
//! let issuer = LocalIssuer::new(Arc::new(KeySet::from_paserk(&paserk)?), Duration::from_secs(60));
//! let request = TokenRequest::validate(
//!     Caller::new("doc"),
//!     UncheckedRequest {
//!         room_identifier: "arn:aws:ivschat:us-west-2:123456789012:room/g1H2I3j4k5L6".into(),
//!         user_id: "user-1".into(),
//!         capabilities: Ok(Default::default()),
//!         session_duration_in_minutes: None,
//!         attributes: Vec::new(),
//!     },
//!     &FieldNames::PROTO,
//! )?;
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

pub mod keys;
pub mod moderator;
mod paseto;
pub mod token;

use std::time::{Duration, SystemTime};

use time::OffsetDateTime;

use super::Issuer;
use crate::domain::{Error, IssuedToken, TokenRequest};

pub use crate::domain::TokenClaims;
pub use keys::{KeyError, KeySet, KeySource, LiveKeys, generate_key};
pub use moderator::LocalModerator;
use token::NewClaims;
pub use token::{IMPLICIT_ASSERTION, VERIFY_LEEWAY, VerifyError};

/// Mints PASETO v4.local chat tokens with the active key of the [`LiveKeys`] in force.
pub struct LocalIssuer {
    keys: LiveKeys,
    /// How long a token may be used to connect; IVS Chat uses one minute.
    token_ttl: Duration,
    /// Where clients connect with the tokens (`local_issuer.chat_endpoint`).
    chat_endpoint: Option<String>,
}

impl LocalIssuer {
    /// An issuer that encrypts with the active key of `keys` (as they are when each token is minted),
    /// minting tokens valid for `token_ttl`.
    pub fn new(keys: impl Into<LiveKeys>, token_ttl: Duration) -> Self {
        LocalIssuer {
            keys: keys.into(),
            token_ttl,
            chat_endpoint: None,
        }
    }

    /// This issuer, answering every token with `endpoint`: the chat server clients connect to.
    pub fn with_chat_endpoint(mut self, endpoint: Option<String>) -> Self {
        self.chat_endpoint = endpoint;
        self
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
        let claims = NewClaims {
            jti: &token_id,
            iat: issued_at,
            nbf: now,
            exp,
            room_arn: request.room.as_str(),
            user_id: request.user_id.expose(),
            capabilities: &request.capabilities,
            attributes: request.attributes.expose(),
            session_expiration_time,
        };
        let token =
            self.keys.current().encrypt(&claims).map_err(|e| {
                Error::Internal(format!("local issuer could not encrypt a token: {e}"))
            })?;
        Ok(IssuedToken {
            token,
            token_id: Some(token_id),
            token_expires_at: exp.into(),
            session_expires_at: session_expiration_time.into(),
            chat_endpoint: self.chat_endpoint.clone(),
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
    use std::sync::Arc;

    use super::*;
    use crate::domain::Capability;
    use crate::domain::token::test_request;

    fn request() -> TokenRequest {
        test_request()
            .user("ユーザー")
            .capabilities(&[Capability::SendMessage, Capability::DeleteMessage])
            .attribute("displayName", "Ann")
            .build()
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
        let last_accepted = exp + VERIFY_LEEWAY - Duration::from_secs(1);
        assert!(keys.verify_at(&issued.token, last_accepted).is_ok());
        assert_eq!(
            keys.verify_at(&issued.token, exp + VERIFY_LEEWAY)
                .unwrap_err(),
            VerifyError::Expired
        );
    }

    #[test]
    fn a_verifier_whose_clock_is_behind_by_the_leeway_accepts_a_fresh_token() {
        let keys = Arc::new(KeySet::ephemeral());
        let issuer = LocalIssuer::new(keys.clone(), Duration::from_secs(60));
        let issued_at = SystemTime::now();
        let issued = issuer.mint(&request(), issued_at).unwrap();
        let nbf = OffsetDateTime::from(issued_at)
            .replace_nanosecond(0)
            .unwrap();
        assert!(keys.verify_at(&issued.token, nbf - VERIFY_LEEWAY).is_ok());
        assert_eq!(
            keys.verify_at(&issued.token, nbf - VERIFY_LEEWAY - Duration::from_secs(1))
                .unwrap_err(),
            VerifyError::NotYetValid
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
