//! [`BanCheckLayer`]: refuses CreateChatToken for a user banned from the room, with PERMISSION_DENIED and
//! `google.rpc.ErrorInfo` reason `USER_BANNED` (metadata `expires_at`; never the ban's reason).
//!
//! It sits after policy (a caller policy denies learns nothing about bans and costs no store round trip)
//! and before the rate limits (a banned user consumes no budget or upstream quota).
//!
//! ```
//! use std::num::NonZeroUsize;
//! use chat_token_service::{ban_check::BanCheckLayer, store::moderation::MemoryModeration};
//! let store = MemoryModeration::new(NonZeroUsize::new(1000).unwrap());
//! let layer = BanCheckLayer::new(store); // ServiceBuilder::new().layer(layer).service(issuer)
//! ```

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use tower::{Layer, Service};
use tracing::Instrument;

use crate::domain::{Error, TokenRequest};
use crate::store::ModerationStore;
use crate::telemetry::trace_only_span;

/// Wraps a service in [`BanCheck`].
#[derive(Clone)]
pub struct BanCheckLayer<St> {
    store: St,
}

impl<St> BanCheckLayer<St> {
    /// Checks bans in `store`.
    pub fn new(store: St) -> Self {
        BanCheckLayer { store }
    }
}

impl<S, St: Clone> Layer<S> for BanCheckLayer<St> {
    type Service = BanCheck<S, St>;

    fn layer(&self, inner: S) -> BanCheck<S, St> {
        BanCheck {
            inner,
            store: self.store.clone(),
        }
    }
}

/// Refuses requests for banned users before they reach `S`.
#[derive(Clone)]
pub struct BanCheck<S, St> {
    inner: S,
    store: St,
}

impl<S, St> Service<TokenRequest> for BanCheck<S, St>
where
    S: Service<TokenRequest, Error = Error> + Clone + Send + 'static,
    S::Future: Send,
    S::Response: Send + 'static,
    St: ModerationStore + Clone,
{
    type Response = S::Response;
    type Error = Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: TokenRequest) -> Self::Future {
        // Keep the clone that was polled ready for the call after the check.
        let fresh = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, fresh);
        let store = self.store.clone();
        Box::pin(async move {
            let ban = store
                .ban_of(&request.room, &request.user_id)
                .instrument(trace_only_span(|| {
                    tracing::info_span!("moderation.ban_check")
                }))
                .await?;
            if let Some(ban) = ban {
                return Err(Error::UserBanned {
                    expires_at: ban.expires_at,
                });
            }
            inner.call(request).await
        })
    }
}

#[cfg(test)]
mod tests {
    use std::{
        num::NonZeroUsize,
        time::{Duration, SystemTime},
    };

    use tower::ServiceExt;
    use tower_test::{assert_request_eq, mock};

    use super::*;
    use crate::domain::token::test_request;
    use crate::domain::{Ban, Caller, Reason, RoomArn};
    use crate::store::moderation::MemoryModeration;

    const ROOM: &str = "arn:aws:ivschat:us-west-2:123456789012:room/abc";

    fn request(user: &str) -> TokenRequest {
        test_request().caller("web").room(ROOM).user(user).build()
    }

    #[tokio::test]
    async fn a_banned_user_is_refused_with_the_end_of_the_ban_and_others_pass() {
        let store = MemoryModeration::new(NonZeroUsize::new(10).unwrap());
        let end =
            crate::domain::moderation::whole_millis(SystemTime::now() + Duration::from_secs(60));
        store
            .ban(&Ban {
                room: RoomArn::parse(ROOM).unwrap(),
                user_id: request("banned").user_id,
                banned_by: Caller::new("moderator"),
                created_at: SystemTime::now(),
                expires_at: Some(end),
                reason: Reason::parse("spam".into()).unwrap(),
            })
            .await
            .unwrap();
        let (inner, mut handle) = mock::pair::<TokenRequest, &'static str>();
        let service =
            BanCheckLayer::new(store).layer(inner.map_err(
                |e: Box<dyn std::error::Error + Send + Sync>| Error::Internal(e.to_string()),
            ));

        let refused = service.clone().oneshot(request("banned")).await;
        assert!(
            matches!(refused, Err(Error::UserBanned { expires_at: Some(at) }) if at == end),
            "{refused:?}"
        );

        let allowed = tokio::spawn(service.oneshot(request("someone-else")));
        assert_request_eq!(handle, request("someone-else")).send_response("issued");
        assert_eq!(allowed.await.unwrap().unwrap(), "issued");
    }
}
