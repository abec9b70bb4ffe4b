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

use std::{fmt, future::Future, num::NonZeroU32, time::Duration};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

pub use self::redis::RedisStore;
pub use fallback::{FailureMode, FallbackStore, RedisFault};
pub use gcra::{Quota, Rate};
pub use layer::{RateLimit, RateLimitLayer, ResponseFuture, Stats};
pub use memory::MemoryStore;

/// The name of the built-in limit that keeps CreateChatToken calls under IVS Chat's own quota (per AWS
/// account and region), added by [`crate::stack`] when the issuer is `ivs`.
pub const IVS_QUOTA_LIMIT_NAME: &str = "ivs-quota";
/// The name of the IVS issuer's DisconnectUser quota guard (per AWS account and region).
pub const DISCONNECT_QUOTA_LIMIT_NAME: &str = "ivs-disconnect-quota";

/// One limit, as configured in a `[[rate_limits]]` entry.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Limit {
    /// Names the limit in errors (`google.rpc.QuotaFailure` subject `limit:NAME`) and logs, and keeps its
    /// keys apart from every other limit's. Unique among the configured limits and not empty; renaming a
    /// limit starts its budgets afresh.
    pub name: String,
    /// What the limit counts by: `"caller"` (the calling service), `"user"` (one user in one room),
    /// `"room"`, `"caller_room"` (one caller in one room), `"account_region"` (one AWS account in one
    /// region) or `"global"` (all requests together).
    pub key: LimitKey,
    /// The sustained rate: `"N/s"`, `"N/min"` or `"N/h"` (also `second`, `minute`, `hour`), `N` at least 1.
    pub rate: Rate,
    /// How many requests are admitted at once from a fully recovered state; at least 1.
    pub burst: NonZeroU32,
    /// Evaluate the limit and log and count the requests it would refuse, but refuse none: for trying a
    /// limit on real traffic before enforcing it. Default `false`.
    #[serde(default)]
    pub shadow: bool,
}

impl Limit {
    /// The limit's GCRA parameters.
    pub fn quota(&self) -> Quota {
        Quota::new(self.rate, self.burst)
    }

    /// What the limit limits, e.g. `100/s per caller, burst 200`, for callers who hit it. Describes the
    /// rule, never a key value.
    pub fn description(&self) -> String {
        format!("{} {}, burst {}", self.rate, self.key.scope(), self.burst)
    }
}

/// What a limit counts requests by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitKey {
    /// The calling service: caps what one internal service can mint.
    Caller,
    /// One user in one room (room ARN + user id): caps reconnect storms of a single user.
    User,
    /// The room: caps a stampede into one room.
    Room,
    /// One caller in one room.
    CallerRoom,
    /// The AWS account and region that own the room: what IVS Chat's own quotas count by.
    AccountRegion,
    /// Every request together: caps the service as a whole, e.g. below an upstream quota.
    Global,
}

impl LimitKey {
    /// The setting's spelling, also part of every store key so a limit whose key kind changes starts afresh.
    pub fn as_str(self) -> &'static str {
        match self {
            LimitKey::Caller => "caller",
            LimitKey::User => "user",
            LimitKey::Room => "room",
            LimitKey::CallerRoom => "caller_room",
            LimitKey::AccountRegion => "account_region",
            LimitKey::Global => "global",
        }
    }

    fn scope(self) -> &'static str {
        match self {
            LimitKey::Caller => "per caller",
            LimitKey::User => "per user per room",
            LimitKey::Room => "per room",
            LimitKey::CallerRoom => "per caller per room",
            LimitKey::AccountRegion => "per AWS account and region",
            LimitKey::Global => "in total",
        }
    }
}

impl fmt::Display for LimitKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

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
