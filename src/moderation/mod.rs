//! Moderation: disconnect, ban and verify, so a user removed from a room stays out.
//!
//! IVS Chat's own guidance is to implement bans by disconnecting the user *and* no longer creating tokens for
//! them. This module is both halves:
//! - [`ModerationRequest`]: the validated domain form of every `ivschat.v1.ModerationService` call.
//! - [`store`]: where bans, revocations and used token ids live: the limiter store's backend (in memory for
//!   one replica, Redis for many), behind the small [`store::ModerationStore`] trait.
//! - [`ban_check`]: the layer in the CreateChatToken stack that refuses a banned user with USER_BANNED.
//! - [`Moderator`]: what an issuer does for moderation: disconnect a user (IVS: its DisconnectUser API; local:
//!   revoke the user's tokens issued so far) and verify a token (local issuer only).
//! - [`ModerationService`]: the innermost service of the moderation stack; [`service`]: the gRPC handler.
//!
//! The moderation stack is composed in [`crate::stack`] from the same policy and rate-limit layers as the
//! token stack, so a moderation call is identified, authorized (Cedar actions `DisconnectUser`, `BanUser`,
//! `UnbanUser`, `ListBans`, `VerifyChatToken`), rate limited, audited and traced like CreateChatToken.

pub mod ban_check;
pub mod local;
pub mod service;
pub mod store;

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::SystemTime,
};

use opentelemetry::KeyValue;
use tracing::Instrument;

use crate::error::Error;
use crate::issuer::local::TokenClaims;
use crate::request::{RoomArn, UserId};
use crate::telemetry::metrics::metrics;
use store::ModerationStore;

pub use ban_check::BanCheckLayer;
pub use service::ModerationGrpc;
pub use store::ModerationStores;

pub use crate::domain::moderation::{
    Ban, BanPage, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, MAX_REASON_CHARS, MAX_TOKEN_BYTES, MIN_BAN,
    MIN_REASON_CHARS, ModerationAction, ModerationOutcome, ModerationRequest, PageToken, Reason,
    TokenRejection, whole_millis,
};

/// What an issuer does for moderation.
pub trait Moderator: Send + Sync + 'static {
    /// The issuer's name in spans and metrics.
    const NAME: &'static str;

    /// Ends the user's chat connections to the room.
    fn disconnect(
        &self,
        room: &RoomArn,
        user_id: &UserId,
        reason: &Reason,
    ) -> impl Future<Output = Result<(), Error>> + Send;

    /// Checks the state of an authentic token (revocation, single use) and passes its claims on.
    fn verify(
        &self,
        claims: TokenClaims,
    ) -> impl Future<Output = Result<TokenClaims, Error>> + Send;
}

impl<M: Moderator> Moderator for Arc<M> {
    const NAME: &'static str = M::NAME;

    fn disconnect(
        &self,
        room: &RoomArn,
        user_id: &UserId,
        reason: &Reason,
    ) -> impl Future<Output = Result<(), Error>> + Send {
        M::disconnect(self, room, user_id, reason)
    }

    fn verify(
        &self,
        claims: TokenClaims,
    ) -> impl Future<Output = Result<TokenClaims, Error>> + Send {
        M::verify(self, claims)
    }
}

/// The innermost service of the moderation stack: the moderator for disconnects and verification, the
/// store for bans. Clones share both.
pub struct ModerationService<M> {
    moderator: Arc<M>,
    store: ModerationStores,
}

impl<M> Clone for ModerationService<M> {
    fn clone(&self) -> Self {
        ModerationService {
            moderator: self.moderator.clone(),
            store: self.store.clone(),
        }
    }
}

impl<M: Moderator> ModerationService<M> {
    /// Moderates with `moderator`, keeping bans in `store`.
    pub fn new(moderator: M, store: ModerationStores) -> Self {
        ModerationService {
            moderator: Arc::new(moderator),
            store,
        }
    }

    async fn execute(
        moderator: &M,
        store: &ModerationStores,
        request: ModerationRequest,
    ) -> Result<ModerationOutcome, Error> {
        let room = request.room;
        match request.action {
            ModerationAction::Disconnect { user_id, reason } => {
                moderator.disconnect(&room, &user_id, &reason).await?;
                Ok(ModerationOutcome::Disconnected)
            }
            ModerationAction::Ban {
                user_id,
                duration,
                reason,
            } => {
                let created_at = whole_millis(SystemTime::now());
                let ban = Ban {
                    expires_at: duration.map(|d| created_at + d),
                    room,
                    user_id,
                    banned_by: request.caller,
                    created_at,
                    reason,
                };
                // The ban first: from here on no new token is issued, so a user cannot slip back in
                // between the disconnect and the ban.
                store.ban(&ban).await?;
                moderator
                    .disconnect(&ban.room, &ban.user_id, &ban.reason)
                    .await?;
                Ok(ModerationOutcome::Banned(ban))
            }
            ModerationAction::Unban { user_id } => Ok(ModerationOutcome::Unbanned {
                was_banned: store.unban(&room, &user_id).await?,
            }),
            ModerationAction::ListBans { page_size, after } => Ok(ModerationOutcome::Bans(
                store.list_bans(&room, after.as_ref(), page_size).await?,
            )),
            ModerationAction::Verify { claims } => Ok(ModerationOutcome::Verified(Box::new(
                moderator.verify(*claims).await?,
            ))),
        }
    }
}

impl<M: Moderator> tower::Service<ModerationRequest> for ModerationService<M> {
    type Response = ModerationOutcome;
    type Error = Error;
    type Future = Pin<Box<dyn Future<Output = Result<ModerationOutcome, Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: ModerationRequest) -> Self::Future {
        let moderator = self.moderator.clone();
        let store = self.store.clone();
        let action = request.action.action().as_str();
        let span = tracing::info_span!(
            "moderation.execute",
            moderation.action = action,
            issuer = M::NAME,
            otel.status_code = tracing::field::Empty
        );
        Box::pin(
            async move {
                let outcome = Self::execute(&moderator, &store, request).await;
                let result = match &outcome {
                    Ok(_) => "ok",
                    Err(_) => {
                        tracing::Span::current().record("otel.status_code", "ERROR");
                        "error"
                    }
                };
                metrics().moderation_actions.add(
                    1,
                    &[
                        KeyValue::new("action", action),
                        KeyValue::new("result", result),
                    ],
                );
                outcome
            }
            .instrument(span),
        )
    }
}
