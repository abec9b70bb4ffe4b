//! The innermost service of the moderation stack: the [`Moderator`] for disconnects and verification, the
//! moderation store for bans.
//!
//! IVS Chat's own guidance is to implement bans by disconnecting the user *and* no longer creating tokens for
//! them: a ban is stored first (from then on the token stack's ban check refuses the user), then the user
//! is disconnected. The stack around this service (policy, rate limits) is composed in [`crate::stack`].

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::SystemTime,
};

use opentelemetry::KeyValue;
use tracing::Instrument;

use crate::domain::moderation::whole_millis;
use crate::domain::{Ban, Error, ModerationAction, ModerationOutcome, ModerationRequest};
use crate::issuer::Moderator;
use crate::store::ModerationStore;
use crate::telemetry::metrics::metrics;

/// The innermost service of the moderation stack: the moderator for disconnects and verification, the
/// store for bans. Clones share both.
pub struct ModerationService<M, St> {
    moderator: Arc<M>,
    /// Where bans are kept: the same store the token stack's ban check reads.
    store: St,
}

impl<M, St: Clone> Clone for ModerationService<M, St> {
    fn clone(&self) -> Self {
        ModerationService {
            moderator: self.moderator.clone(),
            store: self.store.clone(),
        }
    }
}

impl<M: Moderator, St: ModerationStore + Clone> ModerationService<M, St> {
    /// Moderates with `moderator`, keeping bans in `store`.
    pub fn new(moderator: M, store: St) -> Self {
        ModerationService {
            moderator: Arc::new(moderator),
            store,
        }
    }

    async fn execute(
        moderator: &M,
        store: &St,
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
            ModerationAction::Verify { opened } => {
                let claims = opened.map_err(Error::TokenRejected)?;
                Ok(ModerationOutcome::Verified(Box::new(
                    moderator.verify(*claims).await?,
                )))
            }
        }
    }
}

impl<M: Moderator, St: ModerationStore + Clone> tower::Service<ModerationRequest>
    for ModerationService<M, St>
{
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
