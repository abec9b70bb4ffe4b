//! Rate limits: a tower layer that refuses requests over a limit at once, with RESOURCE_EXHAUSTED and the
//! exact time a retry will succeed. It never queues or waits (unlike `tower::limit::RateLimit`).
//!
//! ```
//! use std::num::{NonZeroU32, NonZeroUsize};
//! use chat_token_service::ratelimit::{Limit, LimitKey, MemoryStore, RateLimitLayer, gcra::Rate};
//!
//! let per_user = Limit {
//!     name: "per-user".into(),
//!     key: LimitKey::User,
//!     rate: Rate::parse("5/min").unwrap(),
//!     burst: NonZeroU32::new(5).unwrap(),
//!     shadow: false,
//! };
//! let store = MemoryStore::new(NonZeroUsize::new(100_000).unwrap());
//! let layer = RateLimitLayer::new(vec![per_user], store);
//! // ServiceBuilder::new().layer(layer).service(issuer)
//! ```
//!
//! - [`gcra`]: the algorithm, pure arithmetic on instants.
//! - [`LimiterStore`]: where each key's state lives; the seam a shared (Redis) store plugs into.
//! - [`memory`]: the in-process store, bounded in memory.
//! - [`redis`]: the shared store: the same GCRA in a Lua script inside Redis, one budget for every replica.
//! - [`fallback`]: the Redis store with a per-call timeout and a failure mode (fall back in process, or
//!   refuse with UNAVAILABLE), and the readiness that follows Redis.
//! - [`Store`]: whichever of the two the configuration chose; one value shared by every user of limits.
//! - [`layer`]: [`RateLimitLayer`], which turns a request into one [`Check`] per configured [`Limit`].
//!
//! Every limit is checked on every request, all at once: a request refused by one enforced limit consumes
//! nothing from the others, so a client hammering one limit does not drain its budget elsewhere.

pub mod fallback;
pub mod gcra;
pub mod layer;
pub mod memory;
pub mod redis;

use std::{future::Future, time::Duration};

use tokio::sync::watch;

pub use self::redis::RedisStore;
pub use crate::domain::Rate;
pub use fallback::{FailureMode, FallbackStore, RedisFault};
pub use gcra::Quota;
pub use layer::{RateLimit, RateLimitLayer, ResponseFuture, Stats};
pub use memory::MemoryStore;

pub use crate::domain::limit::{
    DISCONNECT_QUOTA_LIMIT_NAME, IVS_QUOTA_LIMIT_NAME, Limit, LimitKey,
};

/// One limit to check for one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    /// Whose budget: identifies the limit and the counted parts of the request. Contains user ids: never
    /// log it.
    pub key: String,
    /// The limit's parameters.
    pub quota: Quota,
    /// A shadow check never changes the outcome of the others.
    pub shadow: bool,
}

/// A store's answer to one [`Check`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Within the limit. For an enforced check this does not mean it consumed: when another enforced check
    /// of the same call is denied, none consumes.
    Allowed,
    /// Over the limit.
    Denied {
        /// When the same request would be admitted by this limit.
        retry_after: Duration,
    },
}

/// Where limit state lives. The in-process [`MemoryStore`] keeps it per replica; a shared store keeps one
/// budget across replicas. Every store keeps the contract below; `tests/limiter_store.rs` runs it against
/// each store, and a new store (or a new operation) joins it there.
pub trait LimiterStore: Send + Sync + 'static {
    /// Checks all `checks` at once and answers one [`Verdict`] per check, in order.
    ///
    /// Enforced checks are all-or-nothing: if any enforced check is denied, no enforced check consumes.
    /// Shadow checks are evaluated and committed independently and never affect the outcome of enforced
    /// ones.
    fn check(
        &self,
        checks: &[Check],
    ) -> impl Future<Output = Result<Vec<Verdict>, StoreError>> + Send;
}

/// Why a store could not decide.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The shared store cannot be reached and is configured to fail closed: the request is refused rather
    /// than decided without it. The in-process store never fails.
    #[error("rate-limit store unavailable")]
    Unavailable {
        /// When the store will next be tried, for the caller's retry.
        retry_after: Duration,
    },
    /// The in-process store holds as many entries still in force as it may (moderation state: bans,
    /// revocations, used token ids); rather than forget one, the new one is refused. Rate-limit checks never
    /// fail this way: they forget the keys closest to recovery.
    #[error("store full: {capacity} entries in force")]
    Full {
        /// The configured bound (`limiter.max_tracked_keys`).
        capacity: usize,
    },
}

impl From<StoreError> for crate::error::Error {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Unavailable { retry_after } => {
                crate::error::Error::LimiterUnavailable { retry_after }
            }
            StoreError::Full { capacity } => crate::error::Error::StoreFull { capacity },
        }
    }
}

/// The limiter store the configuration chose. Build ONE per process and clone it to every user (the
/// rate-limit layer and anything else that limits): clones share state, so they share budgets.
#[derive(Clone)]
pub enum Store {
    /// Per-replica state (`limiter.backend = "memory"`).
    Memory(MemoryStore),
    /// State shared through Redis, with a timeout and a failure mode (`limiter.backend = "redis"`).
    Redis(FallbackStore),
}

impl Store {
    /// What the token service's readiness should follow, if anything: Redis' reachability when the store
    /// fails closed. A fail_open or in-process store keeps the service ready whatever happens to Redis.
    pub fn readiness(&self) -> Option<watch::Receiver<bool>> {
        match self {
            Store::Redis(store) if store.failure_mode() == FailureMode::FailClosed => {
                Some(store.readiness())
            }
            Store::Redis(_) | Store::Memory(_) => None,
        }
    }
}

impl LimiterStore for Store {
    async fn check(&self, checks: &[Check]) -> Result<Vec<Verdict>, StoreError> {
        match self {
            Store::Memory(store) => store.check(checks).await,
            Store::Redis(store) => store.check(checks).await,
        }
    }
}
