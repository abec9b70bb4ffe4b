//! Moderation for the local issuer: a disconnect revokes the user's tokens for the room issued so far, and
//! verification refuses tokens out of their validity period, tokens of users banned from their room,
//! revoked tokens and, in single-use mode, tokens verified before.
//!
//! Everything that must outlive a token is kept until the last instant it can verify, its expiry plus
//! [`VERIFY_LEEWAY`]: revocations for `token_ttl` plus the leeway after they are made, used-token records
//! until the token's expiry plus the leeway.
//!
//! A self-hosted chat server checks every connecting client's token with VerifyChatToken, so a revoked
//! token cannot open a connection again; connections already open are the chat server's to close (it learns
//! of disconnects from its own moderation flow).

use std::time::{Duration, SystemTime};

use super::token::{VERIFY_LEEWAY, check_times};
use crate::domain::{Error, Reason, RoomArn, TokenClaims, TokenRejection, UserId};
use crate::issuer::Moderator;
use crate::store::ModerationStore;

/// The local issuer's [`Moderator`].
pub struct LocalModerator<St> {
    store: St,
    /// How long revocations are kept: the longest a token lives (`local_issuer.token_ttl`) plus
    /// [`VERIFY_LEEWAY`]. Every token a revocation covers has stopped verifying by then.
    keep_revocations: Duration,
    /// Whether a token verifies only once.
    single_use: bool,
}

impl<St: ModerationStore> LocalModerator<St> {
    /// Keeps revocations (and, with `single_use`, used token ids) in `store`, for tokens that live at most
    /// `token_ttl`.
    pub fn new(store: St, token_ttl: Duration, single_use: bool) -> Self {
        LocalModerator {
            store,
            keep_revocations: token_ttl + VERIFY_LEEWAY,
            single_use,
        }
    }
}

impl<St: ModerationStore> Moderator for LocalModerator<St> {
    const NAME: &'static str = "local";

    async fn disconnect(&self, room: &RoomArn, user_id: &UserId, _: &Reason) -> Result<(), Error> {
        Ok(self
            .store
            .revoke(room, user_id, SystemTime::now(), self.keep_revocations)
            .await?)
    }

    async fn verify(&self, claims: TokenClaims) -> Result<TokenClaims, Error> {
        check_times(&claims, SystemTime::now())
            .map_err(|e| Error::TokenRejected(TokenRejection::from(e)))?;
        // A banned user's tokens stop verifying at once, as CreateChatToken stops issuing them: a ban
        // made without a disconnect (or whose disconnect failed) still holds here.
        if let Some(ban) = self.store.ban_of(&claims.room, &claims.user_id).await? {
            return Err(Error::UserBanned {
                expires_at: ban.expires_at,
            });
        }
        let revoked_at = self.store.revoked_at(&claims.room, &claims.user_id).await?;
        if revoked_at.is_some_and(|revoked_at| claims.issued_at < revoked_at) {
            return Err(Error::TokenRejected(TokenRejection::Revoked));
        }
        if self.single_use
            && !self
                .store
                .first_use(&claims.token_id, claims.token_expires_at + VERIFY_LEEWAY)
                .await?
        {
            return Err(Error::TokenRejected(TokenRejection::AlreadyUsed));
        }
        Ok(claims)
    }
}
