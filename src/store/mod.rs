//! State backends: where rate-limit state and moderation state (bans, revocations, used token ids) live.
//!
//! One [`Backend`] is built per process, from the limiter settings: both stores in memory, or both in the
//! same Redis through one [`redis::SharedRedis`] connection with its timeout, failure mode and probe.
//! Everything above sees the two store traits ([`limits::LimiterStore`], [`moderation::ModerationStore`])
//! and, on a single Redis node, the [`BanGate`] that checks a ban and the limits in one round trip.
//! Clones of a store share its state, so everything that limits shares one budget.

mod error;
pub mod limits;
pub mod moderation;
pub mod redis;

use std::num::NonZeroUsize;

use tokio::sync::watch;

use crate::config::{FailureMode, LimiterBackend, LimiterConfig};
use crate::pem::PemError;
use limits::{MemoryStore, RedisLimits};
use moderation::{MemoryModeration, RedisModeration};

pub use error::StoreError;
pub use limits::{Check, LimiterStore, Quota, Verdict};
pub use moderation::{BanGate, Gated, ModerationStore};

/// The rate-limit store and the moderation store of one backend, and, where the backend can, the gate
/// that checks a ban and the limits in one round trip.
#[derive(Clone)]
pub struct Stores<L, M> {
    /// Rate-limit state: every limit, the IVS quota guards included.
    pub limits: L,
    /// Bans, revocations, used token ids.
    pub moderation: M,
    /// CreateChatToken's ban check inside the limits' call: a single Redis node only.
    pub ban_gate: Option<BanGate>,
}

/// The process's state backend, chosen by `limiter.backend`. Build it once: its variants hold both
/// stores, and clones of them share state.
#[derive(Clone)]
pub enum Backend {
    /// Per-replica state (`limiter.backend = "memory"`).
    Memory(Stores<MemoryStore, MemoryModeration>),
    /// State shared through Redis, with a timeout and a failure mode (`limiter.backend = "redis"`).
    Redis(Stores<RedisLimits, RedisModeration>),
}

impl Backend {
    /// The backend `settings` choose. With Redis it reads the TLS files `settings` name (refusing bad
    /// ones) and starts the probe, so call it inside a tokio runtime; Redis need not be up yet. Each kind
    /// of state is bounded by `limiter.max_tracked_keys` in memory.
    pub fn new(settings: &LimiterConfig) -> Result<Self, PemError> {
        let capacity = settings.max_tracked_keys;
        let Some(url) = settings.redis() else {
            return Ok(Backend::memory(capacity));
        };
        let tls = redis::RedisTls::load(settings)?;
        let connection = redis::Connection::open(url.info(), settings.redis_cluster, tls.as_ref());
        let shared = redis::SharedRedis::new(
            connection,
            &settings.key_prefix,
            settings.redis_timeout,
            settings.failure_mode,
            RedisLimits::probe(&settings.key_prefix),
        );
        tracing::info!(
            cluster = settings.redis_cluster,
            tls = url.is_tls(),
            private_ca = settings.redis_ca_file.is_some(),
            client_certificate = settings.redis_client_cert_file.is_some(),
            timeout = ?settings.redis_timeout,
            failure_mode = ?settings.failure_mode,
            "rate limits and moderation state shared through Redis"
        );
        let limits = RedisLimits::new(shared.clone(), MemoryStore::new(capacity));
        let moderation = RedisModeration::new(shared, MemoryModeration::new(capacity));
        // In a cluster the ban record and the limits live in different slots: no single script sees both.
        let ban_gate =
            (!settings.redis_cluster).then(|| BanGate::new(moderation.clone(), limits.clone()));
        Ok(Backend::Redis(Stores {
            limits,
            moderation,
            ban_gate,
        }))
    }

    /// Both stores in process, each holding at most `capacity` keys or entries of a kind.
    pub fn memory(capacity: NonZeroUsize) -> Self {
        Backend::Memory(Stores {
            limits: MemoryStore::new(capacity),
            moderation: MemoryModeration::new(capacity),
            ban_gate: None,
        })
    }

    /// Which backend this is.
    pub fn kind(&self) -> LimiterBackend {
        match self {
            Backend::Memory(_) => LimiterBackend::Memory,
            Backend::Redis(_) => LimiterBackend::Redis,
        }
    }

    /// What the token service's readiness should follow, if anything: Redis' reachability when it fails
    /// closed. A fail_open or in-process backend keeps the service ready whatever happens to Redis.
    pub fn readiness(&self) -> Option<watch::Receiver<bool>> {
        match self {
            Backend::Redis(stores)
                if stores.limits.redis().failure_mode() == FailureMode::FailClosed =>
            {
                Some(stores.limits.redis().readiness())
            }
            Backend::Redis(_) | Backend::Memory(_) => None,
        }
    }
}
