//! [`RateLimitLayer`]: checks every configured [`Limit`] before the inner service sees a request, and refuses
//! at once with [`Error::RateLimited`] when an enforced one is exhausted.
//!
//! ```
//! # use std::num::{NonZeroU32, NonZeroUsize};
//! # use chat_token_service::{domain::{Limit, LimitKey, Rate}, ratelimit::RateLimitLayer};
//! # use chat_token_service::store::limits::MemoryStore;
//! # let limits = vec![Limit {
//! #     name: "per-caller".into(),
//! #     key: LimitKey::Caller,
//! #     rate: Rate::parse("100/s").unwrap(),
//! #     burst: NonZeroU32::new(200).unwrap(),
//! #     shadow: false,
//! # }];
//! let layer = RateLimitLayer::new(limits, MemoryStore::new(NonZeroUsize::new(1_000_000).unwrap()));
//! let stats = layer.stats();
//! assert_eq!(stats.enforced_rejections, 0);
//! ```

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use opentelemetry::KeyValue;
use tower::{Layer, Service};
use tracing::Instrument;

use crate::domain::{
    Caller, Error, ExceededLimit, Limit, LimitKey, MessagingRequest, ModerationRequest, RoomArn,
    TokenRequest, UserId,
};
use crate::store::{BanGate, Check, Gated, LimiterStore, Quota, Verdict};
use crate::telemetry::{metrics::metrics, trace_only_span};

/// Wraps a service in [`RateLimit`]. Every service it makes shares the same store and counters.
#[derive(Clone)]
pub struct RateLimitLayer<St> {
    limits: Arc<[Limit]>,
    store: St,
    counters: Arc<Counters>,
    /// Where bans are looked up along with the limits, if here (see [`RateLimitLayer::with_ban_gate`]).
    ban_gate: Option<BanGate>,
}

impl<St> RateLimitLayer<St> {
    /// Checks `limits` (names unique) against `store`.
    pub fn new(limits: Vec<Limit>, store: St) -> Self {
        RateLimitLayer {
            limits: limits.into(),
            store,
            counters: Arc::default(),
            ban_gate: None,
        }
    }

    /// Also refuses users banned from the room (requests whose [`Limited::ban_checked`] says so), asking
    /// `gate`, which looks the ban up in the same Redis call as the limits: one round trip per request,
    /// and a banned user spends no budget. Takes the place of a [`crate::ban_check::BanCheckLayer`] in
    /// front of this layer; the gate decides the limits in its own store, so give it this layer's.
    pub fn with_ban_gate(mut self, gate: BanGate) -> Self {
        self.ban_gate = Some(gate);
        self
    }

    /// Rejections so far, by every service this layer made.
    pub fn stats(&self) -> Stats {
        self.counters.snapshot()
    }
}

impl<S, St: Clone> Layer<S> for RateLimitLayer<St> {
    type Service = RateLimit<S, St>;

    fn layer(&self, inner: S) -> RateLimit<S, St> {
        RateLimit {
            inner,
            limits: self.limits.clone(),
            store: self.store.clone(),
            counters: self.counters.clone(),
            ban_gate: self.ban_gate.clone(),
        }
    }
}

/// Refuses requests over an enforced limit before they reach `S`; lets everything else through.
#[derive(Clone)]
pub struct RateLimit<S, St> {
    inner: S,
    limits: Arc<[Limit]>,
    store: St,
    counters: Arc<Counters>,
    /// Where bans are looked up along with the limits, if here (see [`RateLimitLayer::with_ban_gate`]).
    ban_gate: Option<BanGate>,
}

impl<S, St> RateLimit<S, St> {
    /// Rejections so far, by this service, its clones and its layer's other services.
    pub fn stats(&self) -> Stats {
        self.counters.snapshot()
    }
}

/// This layer's rejection counts, readable in-process (tests, embedders); the process-wide view is the
/// `cts.ratelimit.rejections` metric.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Requests refused because an enforced limit was exhausted (one per request, however many limits).
    pub enforced_rejections: u64,
    /// Shadow limits that would have refused a request (one per limit and request); none was refused.
    pub shadow_rejections: u64,
}

#[derive(Default)]
struct Counters {
    enforced_rejections: AtomicU64,
    shadow_rejections: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> Stats {
        Stats {
            enforced_rejections: self.enforced_rejections.load(Ordering::Relaxed),
            shadow_rejections: self.shadow_rejections.load(Ordering::Relaxed),
        }
    }
}

/// What a limit can count a request by.
pub trait Limited {
    /// The calling service.
    fn caller(&self) -> &Caller;
    /// The room.
    fn room(&self) -> &RoomArn;
    /// The end user the request is about, if any: `user` limits count a request about no user (ListBans)
    /// once per room.
    fn user_id(&self) -> Option<&UserId>;
    /// Keeps the budgets of a kind of call apart from CreateChatToken's (`None`): banning a user must not
    /// spend the user's token budget, nor a chat server's verifications its callers' minting budget.
    fn scope(&self) -> Option<&'static str>;
    /// Whether a user banned from the room is refused (CreateChatToken); moderation calls are not.
    fn ban_checked(&self) -> bool {
        false
    }
}

impl Limited for TokenRequest {
    fn caller(&self) -> &Caller {
        &self.caller
    }

    fn room(&self) -> &RoomArn {
        &self.room
    }

    fn user_id(&self) -> Option<&UserId> {
        Some(&self.user_id)
    }

    fn scope(&self) -> Option<&'static str> {
        None
    }

    fn ban_checked(&self) -> bool {
        true
    }
}

impl Limited for ModerationRequest {
    fn caller(&self) -> &Caller {
        &self.caller
    }

    fn room(&self) -> &RoomArn {
        &self.room
    }

    fn user_id(&self) -> Option<&UserId> {
        self.action.user_id()
    }

    fn scope(&self) -> Option<&'static str> {
        Some(self.action.action().as_str())
    }
}

/// SendEvent and DeleteMessage are about no user: `user` limits count them once per room, each action in
/// budgets of its own.
impl Limited for MessagingRequest {
    fn caller(&self) -> &Caller {
        &self.caller
    }

    fn room(&self) -> &RoomArn {
        &self.room
    }

    fn user_id(&self) -> Option<&UserId> {
        None
    }

    fn scope(&self) -> Option<&'static str> {
        Some(self.action.action().as_str())
    }
}

impl<S, St, R> Service<R> for RateLimit<S, St>
where
    R: Limited + Send + Sync + 'static,
    S: Service<R, Error = Error> + Clone + Send + 'static,
    S::Future: Send,
    S::Response: Send + 'static,
    St: LimiterStore + Clone,
{
    type Response = S::Response;
    type Error = Error;
    type Future = ResponseFuture<S::Response>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: R) -> Self::Future {
        // `self.inner` is the clone that was polled ready; keep it for the call after the check and leave a
        // fresh clone behind for the next poll_ready.
        let fresh = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, fresh);
        let checks: Vec<Check> = self
            .limits
            .iter()
            .map(|limit| Check {
                key: store_key(limit, &request),
                quota: Quota::of(limit),
                shadow: limit.shadow,
            })
            .collect();
        let limits = self.limits.clone();
        let store = self.store.clone();
        let counters = self.counters.clone();
        let gate = self.ban_gate.clone().filter(|_| request.ban_checked());
        ResponseFuture {
            future: Box::pin(async move {
                let checked = async {
                    let verdicts = match (&gate, request.user_id()) {
                        (Some(gate), Some(user_id)) => {
                            // Boxed: the gate's Redis call is most of this future's size, and inline it
                            // would make every call's future a large allocation, Redis or not.
                            match Box::pin(gate.check(request.room(), user_id, &checks)).await? {
                                Gated::Banned(ban) => {
                                    return Err(Error::UserBanned {
                                        expires_at: ban.expires_at,
                                    });
                                }
                                Gated::Verdicts(verdicts) => verdicts,
                            }
                        }
                        _ => store.check(&checks).await?,
                    };
                    judge(&limits, &verdicts, request.caller(), &counters)
                };
                checked
                    .instrument(trace_only_span(|| {
                        tracing::info_span!("ratelimit.check", ratelimit.limits = limits.len())
                    }))
                    .await?;
                inner.call(request).await
            }),
        }
    }
}

/// The response of [`RateLimit`]: the store's check, then the inner call unless a limit refused it.
///
/// Boxed because the store's future is an `impl Future` that cannot be named in a struct; one allocation
/// per request is noise next to minting a token.
pub struct ResponseFuture<T> {
    future: Pin<Box<dyn Future<Output = Result<T, Error>> + Send>>,
}

impl<T> Future for ResponseFuture<T> {
    type Output = Result<T, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.future.as_mut().poll(cx)
    }
}

impl<T> fmt::Debug for ResponseFuture<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

/// Turns the store's verdicts into a refusal naming every exhausted enforced limit, and reports shadow
/// denials.
fn judge(
    limits: &[Limit],
    verdicts: &[Verdict],
    caller: &Caller,
    counters: &Counters,
) -> Result<(), Error> {
    if verdicts.len() != limits.len() {
        return Err(Error::Internal(format!(
            "rate-limit store answered {} verdicts for {} checks",
            verdicts.len(),
            limits.len()
        )));
    }
    let mut exceeded = Vec::new();
    let mut retry_after = Duration::ZERO;
    for (limit, verdict) in limits.iter().zip(verdicts) {
        let Verdict::Denied { retry_after: wait } = *verdict else {
            continue;
        };
        if limit.shadow {
            counters.shadow_rejections.fetch_add(1, Ordering::Relaxed);
            metrics().ratelimit_rejections.add(
                1,
                &[
                    KeyValue::new("limit", limit.name.clone()),
                    KeyValue::new("mode", "shadow"),
                ],
            );
            // The caller id names a service, not a person; the key (with its user id) stays out of logs.
            tracing::info!(
                limit = %limit.name,
                caller = %caller,
                retry_after = ?wait,
                "shadow rate limit would have refused this request"
            );
        } else {
            exceeded.push(ExceededLimit {
                name: limit.name.clone(),
                description: limit.description(),
            });
            retry_after = retry_after.max(wait);
        }
    }
    if exceeded.is_empty() {
        return Ok(());
    }
    counters.enforced_rejections.fetch_add(1, Ordering::Relaxed);
    for limit in &exceeded {
        metrics().ratelimit_rejections.add(
            1,
            &[
                KeyValue::new("limit", limit.name.clone()),
                KeyValue::new("mode", "enforce"),
            ],
        );
    }
    Err(Error::RateLimited {
        limits: exceeded,
        retry_after,
    })
}

/// The store key of `limit` for `request`: the limit's name and key kind, then the request parts the kind
/// counts by. Every part is length-prefixed, because caller ids and user ids may contain any character:
/// no choice of them can make two different requests, or two limits, share a key.
fn store_key(limit: &Limit, request: &impl Limited) -> String {
    let mut key = String::with_capacity(160);
    let mut part = |part: &str| crate::key::push_part(&mut key, part);
    part(&limit.name);
    part(limit.key.as_str());
    if let Some(scope) = request.scope() {
        part(scope);
    }
    match limit.key {
        LimitKey::Caller => part(request.caller().id()),
        LimitKey::User => {
            part(request.room().as_str());
            // No user id is empty, so "no user" keeps its own budget.
            part(request.user_id().map_or("", UserId::expose));
        }
        LimitKey::Room => part(request.room().as_str()),
        LimitKey::CallerRoom => {
            part(request.caller().id());
            part(request.room().as_str());
        }
        LimitKey::AccountRegion => {
            part(request.room().account());
            part(request.room().region());
        }
        LimitKey::Global => {}
    }
    key
}

#[cfg(test)]
mod tests;
