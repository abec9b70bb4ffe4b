//! Moderation for the local issuer: a disconnect revokes the user's tokens for the room issued so far, and
//! verification refuses revoked tokens (and, in single-use mode, tokens verified before).
//!
//! A self-hosted chat server checks every connecting client's token with VerifyChatToken, so a revoked
//! token cannot open a connection again; connections already open are the chat server's to close (it learns
//! of disconnects from its own moderation flow).

use std::time::{Duration, SystemTime};

use crate::domain::{Error, Reason, RoomArn, TokenClaims, TokenRejection, UserId};
use crate::issuer::Moderator;
use crate::store::ModerationStore;

/// The local issuer's [`Moderator`].
pub struct LocalModerator<St> {
    store: St,
    /// How long revocations are kept: the longest a token lives (`local_issuer.token_ttl`). Every token a
    /// revocation covers has expired by then.
    token_ttl: Duration,
    /// Whether a token verifies only once.
    single_use: bool,
}

impl<St: ModerationStore> LocalModerator<St> {
    /// Keeps revocations (and, with `single_use`, used token ids) in `store`, for tokens that live at most
    /// `token_ttl`.
    pub fn new(store: St, token_ttl: Duration, single_use: bool) -> Self {
        LocalModerator {
            store,
            token_ttl,
            single_use,
        }
    }
}

impl<St: ModerationStore> Moderator for LocalModerator<St> {
    const NAME: &'static str = "local";

    async fn disconnect(&self, room: &RoomArn, user_id: &UserId, _: &Reason) -> Result<(), Error> {
        Ok(self
            .store
            .revoke(room, user_id, SystemTime::now(), self.token_ttl)
            .await?)
    }

    async fn verify(&self, claims: TokenClaims) -> Result<TokenClaims, Error> {
        let revoked_at = self.store.revoked_at(&claims.room, &claims.user_id).await?;
        if revoked_at.is_some_and(|revoked_at| claims.issued_at < revoked_at) {
            return Err(Error::TokenRejected(TokenRejection::Revoked));
        }
        if self.single_use
            && !self
                .store
                .first_use(&claims.token_id, claims.token_expires_at)
                .await?
        {
            return Err(Error::TokenRejected(TokenRejection::AlreadyUsed));
        }
        Ok(claims)
    }
}
