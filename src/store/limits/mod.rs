//! Where rate-limit state lives: each key's GCRA state, behind the small [`LimiterStore`] trait.
//!
//! - [`gcra`]: the algorithm, pure arithmetic on instants.
//! - [`memory`]: the in-process store, bounded in memory.
//! - [`redis`]: the shared store: the same GCRA in a Lua script inside Redis, one budget for every replica,
//!   with the in-process store deciding while Redis is down (fail_open).
//!
//! Every limit of a request is checked in one call, all at once: a request refused by one enforced limit
//! consumes nothing from the others, so a client hammering one limit does not drain its budget elsewhere.

pub mod gcra;
pub mod memory;
pub mod redis;

use std::{future::Future, time::Duration};

use super::StoreError;

pub use gcra::Quota;
pub use memory::MemoryStore;
pub use redis::RedisLimits;

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
