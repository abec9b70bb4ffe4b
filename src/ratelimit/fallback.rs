//! [`FallbackStore`]: the Redis store with a deadline on every call and a policy for when Redis is gone.
//!
//! A rate limiter must never be the reason a request hangs. Every call to Redis gets `redis_timeout`
//! (50 ms by default); a call that fails or runs out of time marks Redis *down*, and while it is down calls
//! do not wait on Redis at all: they are decided at once by the failure mode.
//!
//! - [`FailureMode::FailOpen`]: decided by an in-process [`MemoryStore`] with the same limits. The service
//!   keeps serving, each replica enforcing the limits on its own (so `R` replicas admit up to `R` times a
//!   limit's rate during the outage). Logged once when the outage starts and once when it ends; every call
//!   decided locally is counted.
//! - [`FailureMode::FailClosed`]: refused with [`StoreError::Unavailable`] (UNAVAILABLE with RetryInfo), and
//!   [`FallbackStore::readiness`] reports not ready, so load balancers and Kubernetes stop routing here.
//!
//! A background task probes Redis every [`PROBE_INTERVAL`] whether or not calls arrive: it notices an outage
//! on an idle replica (readiness) and the end of one (calls go back to Redis, without a restart). The probe
//! runs the real script on a key of its own, write included, so Redis is judged by what requests would
//! meet: a replica (READONLY) or a full Redis (OOM) stays down instead of looking healthy between calls.
//! Every failure is classified ([`RedisFault`]: transient, or a misconfiguration that will not pass) and
//! logged when the state changes, never once per call. The
//! in-process state gathered during an outage is not copied to Redis: shared limits resume from what Redis
//! remembers.

use std::{
    future::Future,
    sync::{
        Arc, Weak,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use opentelemetry::KeyValue;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{Check, LimiterStore, MemoryStore, StoreError, Verdict, redis::RedisStore};
use crate::telemetry::metrics::metrics;

/// How often Redis is probed: how soon a replica notices an outage while idle, and its end at all. Also
/// the retry delay advised to callers refused in fail_closed mode.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// What to do while Redis cannot be reached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureMode {
    /// Keep serving under per-replica, in-process limits: availability over exact limits.
    #[default]
    FailOpen,
    /// Refuse with UNAVAILABLE and report not ready: exact limits (an upstream quota) over availability.
    FailClosed,
}

/// The Redis store with a timeout, a failure mode and a probe. Clones share everything.
#[derive(Clone)]
pub struct FallbackStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// Decides every call while Redis is up.
    redis: RedisStore,
    /// Decides in fail_open mode while Redis is down.
    local: MemoryStore,
    /// The deadline of every Redis call, probes included.
    timeout: Duration,
    /// What decides while Redis is down.
    mode: FailureMode,
    /// Whether Redis answered the last call or probe. Calls go to Redis only while it is `true`; receivers
    /// learn of every change (readiness).
    up: watch::Sender<bool>,
    /// Why Redis is down, while it is: logging happens when this changes.
    fault: std::sync::Mutex<Option<RedisFault>>,
    /// Calls Redis did not decide: decided locally (fail_open) or refused (fail_closed).
    outage_calls: AtomicU64,
}

impl FallbackStore {
    /// Wraps `redis`, falling back to `local` or refusing as `mode` says. Starts the probe, so call it inside
    /// a tokio runtime; the probe ends when the last clone is dropped.
    ///
    /// Redis counts as up until a call or the first probe (sent at once) says otherwise, so the first
    /// requests after start-up are not decided locally while the connection is being made.
    pub fn new(
        redis: RedisStore,
        local: MemoryStore,
        timeout: Duration,
        mode: FailureMode,
    ) -> Self {
        let inner = Arc::new(Inner {
            redis,
            local,
            timeout,
            mode,
            up: watch::Sender::new(true),
            fault: std::sync::Mutex::new(None),
            outage_calls: AtomicU64::new(0),
        });
        tokio::spawn(probe(Arc::downgrade(&inner)));
        FallbackStore { inner }
    }

    /// Follows whether Redis is reachable: `true` while it answers within the timeout. In fail_closed mode
    /// this is the token service's readiness.
    pub fn readiness(&self) -> watch::Receiver<bool> {
        self.inner.up.subscribe()
    }

    /// Why Redis is down, while it is.
    pub fn fault(&self) -> Option<RedisFault> {
        *self.inner.fault.lock().expect("fault lock poisoned")
    }

    /// The configured failure mode.
    pub fn failure_mode(&self) -> FailureMode {
        self.inner.mode
    }

    /// Calls Redis did not decide because it was unreachable, readable in-process; the process-wide view is
    /// the `cts.limiter.fallbacks` metric (fail_open) and the UNAVAILABLE answers (fail_closed).
    pub fn outage_calls(&self) -> u64 {
        self.inner.outage_calls.load(Ordering::Relaxed)
    }
}

impl FallbackStore {
    /// Runs `call` on Redis under the same timeout and outage tracking as every limit check: `None` when
    /// Redis is down or the call fails or times out (Redis is then marked down), for the caller's failure
    /// mode to decide. Moderation state (bans, revocations) shares Redis this way.
    pub(crate) async fn redis_call<'a, T, F>(
        &'a self,
        call: impl FnOnce(&'a RedisStore) -> F,
    ) -> Option<T>
    where
        F: Future<Output = redis::RedisResult<T>>,
    {
        let inner = &self.inner;
        if *inner.up.borrow() {
            match tokio::time::timeout(inner.timeout, call(&inner.redis)).await {
                Ok(Ok(answer)) => return Some(answer),
                Ok(Err(e)) => inner.mark_down(RedisFault::of(&e), &e),
                Err(_) => inner.mark_down(RedisFault::Timeout, &TIMED_OUT),
            }
        }
        inner.outage_calls.fetch_add(1, Ordering::Relaxed);
        None
    }
}

impl LimiterStore for FallbackStore {
    async fn check(&self, checks: &[Check]) -> Result<Vec<Verdict>, StoreError> {
        if let Some(verdicts) = self.redis_call(|redis| redis.check(checks)).await {
            return Ok(verdicts);
        }
        match self.inner.mode {
            FailureMode::FailOpen => {
                metrics().limiter_fallbacks.add(1, &[]);
                self.inner.local.check(checks).await
            }
            FailureMode::FailClosed => Err(StoreError::Unavailable {
                retry_after: PROBE_INTERVAL,
            }),
        }
    }
}

/// What the log says of a call that ran out of time.
const TIMED_OUT: &str = "no answer within limiter.redis_timeout";

/// Why Redis did not decide, in the terms an operator acts on: which faults pass by themselves and which
/// are a misconfiguration that will not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RedisFault {
    /// No answer within `limiter.redis_timeout`: load or the network. Transient.
    Timeout,
    /// Cannot connect, or the connection broke: Redis restarting, a failover, the network. Transient.
    Unreachable,
    /// A script the server should hold is missing, even after loading it again. Transient (a script
    /// cache flush), unless it persists.
    NoScript,
    /// READONLY: the URL names a replica, so no write can succeed. Misconfiguration (or a failover
    /// demoting the primary, which the next probe after it will show).
    ReadOnly,
    /// OOM: Redis is at `maxmemory` and its eviction policy refuses writes. Misconfiguration: memory or
    /// `maxmemory-policy` (use an `allkeys-*` or `volatile-*` policy: every key here has a TTL).
    OutOfMemory,
    /// CROSSSLOT: a Redis Cluster used without `limiter.redis_cluster = true`. Misconfiguration.
    CrossSlot,
    /// Authentication or ACL permission refused: the URL's credentials. Misconfiguration.
    Denied,
    /// Any other error Redis answered.
    Other,
}

impl RedisFault {
    /// Classifies a failed call.
    pub fn of(error: &redis::RedisError) -> Self {
        use redis::{ErrorKind, ServerErrorKind};
        match (error.kind(), error.code()) {
            (ErrorKind::Server(ServerErrorKind::ReadOnly), _) | (_, Some("READONLY")) => {
                RedisFault::ReadOnly
            }
            (_, Some("OOM")) => RedisFault::OutOfMemory,
            (ErrorKind::Server(ServerErrorKind::NoScript), _) => RedisFault::NoScript,
            (ErrorKind::Server(ServerErrorKind::CrossSlot), _) => RedisFault::CrossSlot,
            (ErrorKind::AuthenticationFailed | ErrorKind::Server(ServerErrorKind::NoPerm), _) => {
                RedisFault::Denied
            }
            _ if error.is_timeout() => RedisFault::Timeout,
            _ if error.is_io_error()
                || error.is_connection_refusal()
                || error.is_connection_dropped() =>
            {
                RedisFault::Unreachable
            }
            _ => RedisFault::Other,
        }
    }

    /// Whether waiting will not fix it: someone must change Redis or the configuration.
    pub fn is_misconfiguration(self) -> bool {
        matches!(
            self,
            RedisFault::ReadOnly
                | RedisFault::OutOfMemory
                | RedisFault::CrossSlot
                | RedisFault::Denied
        )
    }

    /// The fault's name in logs and in the `kind` label of `cts.limiter.store.errors`.
    pub fn as_str(self) -> &'static str {
        match self {
            RedisFault::Timeout => "timeout",
            RedisFault::Unreachable => "unreachable",
            RedisFault::NoScript => "noscript",
            RedisFault::ReadOnly => "readonly",
            RedisFault::OutOfMemory => "oom",
            RedisFault::CrossSlot => "crossslot",
            RedisFault::Denied => "denied",
            RedisFault::Other => "other",
        }
    }
}

impl Inner {
    /// Records a failed call or probe. Logs when the state changes: Redis going down, or failing for a
    /// different reason than before; never once per call. `reason` never holds a key: keys are digests,
    /// and Redis errors name no keys.
    fn mark_down(&self, fault: RedisFault, reason: &dyn std::fmt::Display) {
        metrics()
            .limiter_store_errors
            .add(1, &[KeyValue::new("kind", fault.as_str())]);
        let previous = self
            .fault
            .lock()
            .expect("fault lock poisoned")
            .replace(fault);
        let went_down = self.up.send_if_modified(|up| std::mem::replace(up, false));
        if !went_down && previous == Some(fault) {
            return;
        }
        let cause = if fault.is_misconfiguration() {
            "misconfiguration: it will not pass by itself"
        } else {
            "transient"
        };
        let consequence = match self.mode {
            FailureMode::FailOpen => {
                "rate limits are enforced per replica, in process, until it answers again"
            }
            FailureMode::FailClosed => {
                "refusing token requests with UNAVAILABLE and reporting not ready until it answers again"
            }
        };
        if fault.is_misconfiguration() || self.mode == FailureMode::FailClosed {
            tracing::error!(fault = fault.as_str(), cause, error = %reason, "Redis cannot decide: {consequence}");
        } else {
            tracing::warn!(fault = fault.as_str(), cause, error = %reason, "Redis cannot decide: {consequence}");
        }
    }

    fn mark_up(&self) {
        self.fault.lock().expect("fault lock poisoned").take();
        if self.up.send_if_modified(|up| !std::mem::replace(up, true)) {
            tracing::info!(
                outage_calls = self.outage_calls.load(Ordering::Relaxed),
                "Redis answers again: shared rate limits restored"
            );
        }
    }
}

/// Probes Redis at once and then every [`PROBE_INTERVAL`], until the store is dropped.
async fn probe(store: Weak<Inner>) {
    let mut ticks = tokio::time::interval(PROBE_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(inner) = store.upgrade() else {
            return;
        };
        match tokio::time::timeout(inner.timeout, inner.redis.probe()).await {
            Ok(Ok(())) => inner.mark_up(),
            Ok(Err(e)) => inner.mark_down(RedisFault::of(&e), &e),
            Err(_) => inner.mark_down(RedisFault::Timeout, &TIMED_OUT),
        }
    }
}
