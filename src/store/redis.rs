//! [`SharedRedis`]: the one connection to Redis that every shared store (rate limits, moderation state)
//! uses, with a deadline on every call and a policy for when Redis is gone.
//!
//! A rate limiter must never be the reason a request hangs. Every call to Redis gets `redis_timeout`
//! (50 ms by default); a call that fails or runs out of time marks Redis *down*, and while it is down calls
//! do not wait on Redis at all: they are decided at once by the failure mode ([`SharedRedis::outage`]):
//!
//! - [`FailureMode::FailOpen`]: each store answers from its in-process twin with the same rules. The
//!   service keeps serving, each replica enforcing the limits on its own (so `R` replicas admit up to `R`
//!   times a limit's rate during the outage). Logged once when the outage starts and once when it ends;
//!   every call decided locally is counted.
//! - [`FailureMode::FailClosed`]: refused with [`StoreError::Unavailable`] (UNAVAILABLE with RetryInfo), and
//!   [`SharedRedis::readiness`] reports not ready, so load balancers and Kubernetes stop routing here.
//!
//! A background task probes Redis every [`PROBE_INTERVAL`] whether or not calls arrive: it notices an outage
//! on an idle replica (readiness) and the end of one (calls go back to Redis, without a restart). The probe
//! is what requests would meet (the stores give it: the rate-limit script on a key of its own, write
//! included), so a replica (READONLY) or a full Redis (OOM) stays down instead of looking healthy between
//! calls. Every failure is classified ([`RedisFault`]: transient, or a misconfiguration that will not pass)
//! and logged when the state changes, never once per call. The in-process state gathered during an outage
//! is not copied to Redis: shared state resumes from what Redis remembers.

use std::{
    future::Future,
    path::Path,
    pin::Pin,
    sync::{
        Arc, Weak,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use opentelemetry::KeyValue;
use redis::{
    ClientTlsConfig, ConnectionInfo, FromRedisValue, RedisResult, TlsCertificates,
    aio::{ConnectionManager, ConnectionManagerConfig},
    cluster::{ClusterClient, ClusterConfig},
    cluster_async::ClusterConnection,
};
use tokio::sync::watch;
use tokio_rustls::rustls::RootCertStore;

use super::StoreError;
use crate::config::{FailureMode, LimiterConfig};
use crate::pem::{self, ClientIdentity, PemError};
use crate::telemetry::metrics::metrics;

/// How often Redis is probed: how soon a replica notices an outage while idle, and its end at all. Also
/// the retry delay advised to callers refused in fail_closed mode.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// Each connection attempt gives up after this long; reconnecting goes on in the background.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// The longest pause between two reconnection attempts, so a restarted Redis is found again quickly.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(1);

/// A reconnecting connection to one Redis server or to a cluster. Clones share it.
#[derive(Clone)]
pub enum Connection {
    /// One multiplexed connection, re-established in the background when it breaks.
    Single(ConnectionManager),
    /// Connections to every primary, following slot moves.
    Cluster(ClusterConnection),
}

impl Connection {
    /// A connection to the Redis `info` names (`redis://` or `rediss://` for TLS, `user:password@` for
    /// ACL auth, a `/db` number), or to the cluster it is a node of; over TLS with `tls`'s CA and client
    /// certificate when given ([`RedisTls::load`]). Connects lazily, so the service starts even while Redis
    /// is down.
    ///
    /// # Panics
    /// If redis-rs refuses `info` or `tls`: the configuration's load built the same client from the URL
    /// ([`crate::config::RedisUrl`]) and [`RedisTls::load`] checked the files, so this cannot happen
    /// after both succeeded.
    pub fn open(info: &ConnectionInfo, cluster: bool, tls: Option<&RedisTls>) -> Self {
        const CHECKED: &str =
            "the Redis URL and TLS files were checked when the configuration was loaded";
        let certificates = tls.map(|tls| tls.0.clone());
        if cluster {
            let mut builder =
                ClusterClient::builder([info.clone()]).connection_timeout(CONNECT_TIMEOUT);
            if let Some(certificates) = certificates {
                builder = builder.certs(certificates);
            }
            let client = builder.build().expect(CHECKED);
            Connection::Cluster(
                client.get_pending_async_connection_with_config(ClusterConfig::new()),
            )
        } else {
            let client = match certificates {
                Some(certificates) => redis::Client::build_with_tls(info.clone(), certificates),
                None => redis::Client::open(info.clone()),
            }
            .expect(CHECKED);
            // No response timeout of redis-rs's own: its 500 ms default would cut every call short of a
            // longer `limiter.redis_timeout`, which [`SharedRedis::call`] applies to every call.
            let config = ConnectionManagerConfig::new()
                .set_response_timeout(None)
                .set_connection_timeout(Some(CONNECT_TIMEOUT))
                .set_max_delay(MAX_RECONNECT_DELAY);
            Connection::Single(
                ConnectionManager::new_lazy_with_config(client, config).expect(CHECKED),
            )
        }
    }

    /// Sends `cmd` and reads its answer as a `T`.
    pub async fn query<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> RedisResult<T> {
        match self {
            Connection::Single(connection) => cmd.query_async(&mut connection.clone()).await,
            Connection::Cluster(connection) => cmd.query_async(&mut connection.clone()).await,
        }
    }

    /// Sends `evalsha`, an EVALSHA of `script`'s hash, and reads its answer as a `T`; on NOSCRIPT (a
    /// restarted or failed-over Redis, a flushed script cache) loads `script` and sends it again. What
    /// [`Self::invoke`] does, for a command built without an invocation's allocation per argument.
    pub async fn evalsha<T: FromRedisValue>(
        &self,
        script: &redis::Script,
        evalsha: &redis::Cmd,
    ) -> RedisResult<T> {
        match self.query(evalsha).await {
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                let load = script.prepare_invoke();
                match self {
                    Connection::Single(connection) => {
                        load.load_async(&mut connection.clone()).await?
                    }
                    Connection::Cluster(connection) => {
                        load.load_async(&mut connection.clone()).await?
                    }
                };
                self.query(evalsha).await
            }
            answer => answer,
        }
    }

    /// Runs a script invocation (EVALSHA, loading the script on NOSCRIPT) and reads its answer as a `T`.
    pub async fn invoke<T: FromRedisValue>(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> RedisResult<T> {
        match self {
            Connection::Single(connection) => {
                invocation.invoke_async(&mut connection.clone()).await
            }
            Connection::Cluster(connection) => {
                invocation.invoke_async(&mut connection.clone()).await
            }
        }
    }
}

/// The TLS files `[limiter]` names, read and checked: the CA the server's certificate must chain to
/// (`limiter.redis_ca_file`) and the client certificate and key (`limiter.redis_client_cert_file`,
/// `limiter.redis_client_key_file`). Both single-node and cluster connections use them.
#[derive(Clone)]
pub struct RedisTls(TlsCertificates);

impl RedisTls {
    /// The files `settings` name, or `None` when it names none. Refuses unreadable files, PEM without a
    /// certificate, and a key that does not match its certificate, naming the setting.
    pub fn load(settings: &LimiterConfig) -> Result<Option<Self>, PemError> {
        let ca = settings.redis_ca_file.as_deref();
        let client = settings
            .redis_client_cert_file
            .as_deref()
            .zip(settings.redis_client_key_file.as_deref());
        if ca.is_none() && client.is_none() {
            return Ok(None);
        }
        let roots = match ca {
            Some(ca) => pem::roots(ca, "limiter.redis_ca_file")?,
            None => RootCertStore::empty(),
        };
        // What redis-rs will build from these files at each connection, built once now so a bad file
        // stops start-up instead of every connection.
        pem::client_config(
            roots,
            client.map(|(cert, key)| ClientIdentity {
                cert: (cert, "limiter.redis_client_cert_file"),
                key: (key, "limiter.redis_client_key_file"),
            }),
        )?;
        let read = |path: &Path, setting: &str| {
            std::fs::read(path).map_err(|e| PemError {
                setting: setting.to_owned(),
                reason: format!("{}: {e}", path.display()),
            })
        };
        Ok(Some(RedisTls(TlsCertificates {
            root_cert: ca.map(|ca| read(ca, "limiter.redis_ca_file")).transpose()?,
            client_tls: client
                .map(|(cert, key)| {
                    Ok::<_, PemError>(ClientTlsConfig {
                        client_cert: read(cert, "limiter.redis_client_cert_file")?,
                        client_key: read(key, "limiter.redis_client_key_file")?,
                    })
                })
                .transpose()?,
        })))
    }
}

/// How the probe judges Redis: what the stores' own calls would meet.
pub type Probe = Box<
    dyn Fn(&Connection) -> Pin<Box<dyn Future<Output = RedisResult<()>> + Send + '_>> + Send + Sync,
>;

/// The shared connection with its timeout, failure mode, outage tracking and probe. Clones share
/// everything.
#[derive(Clone)]
pub struct SharedRedis {
    inner: Arc<Inner>,
}

struct Inner {
    /// Carries every call of every store: one multiplexed connection per Redis node.
    connection: Connection,
    /// Starts every key, so several deployments (or tests) can share one Redis without sharing state.
    prefix: Arc<str>,
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

impl SharedRedis {
    /// Shares `connection`, giving every call `timeout` and deciding as `mode` says while Redis is down;
    /// keys start with `prefix`. Starts `probe`, at once and then every [`PROBE_INTERVAL`], so call it
    /// inside a tokio runtime; the probe ends when the last clone is dropped.
    ///
    /// Redis counts as up until a call or the first probe says otherwise, so the first requests after
    /// start-up are not decided locally while the connection is being made.
    pub fn new(
        connection: Connection,
        prefix: &str,
        timeout: Duration,
        mode: FailureMode,
        probe: Probe,
    ) -> Self {
        let inner = Arc::new(Inner {
            connection,
            prefix: prefix.into(),
            timeout,
            mode,
            up: watch::Sender::new(true),
            fault: std::sync::Mutex::new(None),
            outage_calls: AtomicU64::new(0),
        });
        tokio::spawn(run_probe(Arc::downgrade(&inner), probe));
        SharedRedis { inner }
    }

    /// Follows whether Redis is reachable: `true` while it answers within the timeout. In fail_closed mode
    /// this is the token service's readiness.
    pub fn readiness(&self) -> watch::Receiver<bool> {
        self.inner.up.subscribe()
    }

    /// Why Redis is down, while it is.
    pub fn fault(&self) -> Option<RedisFault> {
        *lock(&self.inner.fault)
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

    /// What every key starts with.
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// Runs `call` under the timeout and outage tracking every shared store's calls get: `None` when Redis
    /// is down, or the call fails or times out (Redis is then marked down), for [`SharedRedis::outage`]
    /// to decide.
    pub async fn call<'a, T, F>(&'a self, call: impl FnOnce(&'a Connection) -> F) -> Option<T>
    where
        F: Future<Output = RedisResult<T>>,
    {
        let inner = &self.inner;
        if *inner.up.borrow() {
            match tokio::time::timeout(inner.timeout, call(&inner.connection)).await {
                Ok(Ok(answer)) => return Some(answer),
                Ok(Err(e)) => inner.mark_down(RedisFault::of(&e), &e),
                Err(_) => inner.mark_down(RedisFault::Timeout, &TIMED_OUT),
            }
        }
        inner.outage_calls.fetch_add(1, Ordering::Relaxed);
        None
    }

    /// What answers a call Redis did not: `local`, the in-process twin, in fail_open mode (counted in
    /// `cts.limiter.fallbacks`); UNAVAILABLE in fail_closed mode.
    pub fn outage<T>(&self, local: T) -> Result<T, StoreError> {
        match self.inner.mode {
            FailureMode::FailOpen => {
                metrics().limiter_fallbacks.add(1, &[]);
                Ok(local)
            }
            FailureMode::FailClosed => Err(StoreError::Unavailable {
                retry_after: PROBE_INTERVAL,
            }),
        }
    }
}

/// The fault lock. A panic while it was held cannot leave a fault half-written, so a poisoned lock is as
/// good as any.
fn lock(
    fault: &std::sync::Mutex<Option<RedisFault>>,
) -> std::sync::MutexGuard<'_, Option<RedisFault>> {
    fault
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
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
        let previous = lock(&self.fault).replace(fault);
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
        lock(&self.fault).take();
        if self.up.send_if_modified(|up| !std::mem::replace(up, true)) {
            tracing::info!(
                outage_calls = self.outage_calls.load(Ordering::Relaxed),
                "Redis answers again: shared rate limits restored"
            );
        }
    }
}

/// Probes Redis with `probe` at once and then every [`PROBE_INTERVAL`], until the last clone is dropped.
async fn run_probe(shared: Weak<Inner>, probe: Probe) {
    let mut ticks = tokio::time::interval(PROBE_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(inner) = shared.upgrade() else {
            return;
        };
        match tokio::time::timeout(inner.timeout, probe(&inner.connection)).await {
            Ok(Ok(())) => inner.mark_up(),
            Ok(Err(e)) => inner.mark_down(RedisFault::of(&e), &e),
            Err(_) => inner.mark_down(RedisFault::Timeout, &TIMED_OUT),
        }
    }
}
