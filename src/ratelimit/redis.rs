//! The shared [`LimiterStore`](super::LimiterStore): GCRA evaluated inside Redis, so every replica spends one
//! budget.
//!
//! One Lua script (`gcra.lua`) holds the whole decision. It is loaded once per Redis server and then
//! invoked by its SHA (EVALSHA; on NOSCRIPT, after a Redis restart or failover, it is loaded again and the
//! call retried). It reads the clock with Redis' own `TIME`, so replicas whose clocks disagree still agree
//! on every decision, and it stores each key's theoretical arrival time with a TTL equal to the time to
//! full recovery: a key that expires carries no information, so nothing is left behind.
//!
//! Keys are `<prefix>:rl:{<digest>}`: a 128-bit BLAKE2b digest of the limit's store key, so Redis never
//! holds user ids or room ARNs in clear (and key length is bounded). The digest sits in a hash tag so that,
//! in Redis Cluster, each key picks its slot by its own content. The health probe writes `<prefix>:probe`,
//! which lives a millisecond.
//!
//! - **Single node** (also Sentinel-managed primaries and managed Redis/Valkey endpoints): one script call
//!   over all of a request's keys, one round trip, atomic: enforced checks are all or nothing, exactly as in
//!   the in-process store.
//! - **Cluster**: a script may only touch keys of one slot, so each check is its own script call, all sent
//!   at once (still one round trip of latency). Each key is decided atomically, but a request refused by one
//!   enforced limit may already have consumed from another: all-or-nothing becomes best effort, erring on
//!   the strict side. Each key is clocked by the node that owns it.
//!
//! Decisions have microsecond resolution: intervals are truncated to whole microseconds, and at least
//! 1 µs, so a single key admits at most 1,000,000 requests per second.
//!
//! Bans, revocations and used token ids live here too, under keys of their own (`redis/moderation.rs`). On a
//! single node, CreateChatToken's ban lookup rides in the same script call as its limits
//! ([`RedisStore::check_with_ban`]): one round trip per request, whatever the number of limits. In a
//! cluster the ban record lives in its room's slot, not the limits' slots, so it is read first (two round
//! trips), which keeps a banned user from spending budget.
//!
//! This store has no timeout or failure policy of its own; [`super::fallback::FallbackStore`] adds them.

use std::{fmt::Write as _, num::NonZeroU32, sync::Arc, time::Duration};

use orion::hazardous::hash::blake2::blake2b::Blake2b;
use redis::{
    RedisError, RedisResult, Script,
    aio::{ConnectionManager, ConnectionManagerConfig},
    cluster::{ClusterClient, ClusterConfig},
    cluster_async::ClusterConnection,
};

use super::{Check, Quota, Rate, Verdict};

mod moderation;

pub(crate) use moderation::Gate;

/// Each connection attempt gives up after this long; reconnecting goes on in the background.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// The longest pause between two reconnection attempts, so a restarted Redis is found again quickly.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(1);
/// Bytes of BLAKE2b digest in a key: 128 bits, no collision among any number of keys Redis can hold.
const DIGEST_BYTES: usize = 16;

/// Rate-limit state in Redis, shared by every clone and every replica pointed at the same Redis.
#[derive(Clone)]
pub struct RedisStore {
    /// Shared by clones: one multiplexed connection carries every replica-local call.
    connection: Connection,
    /// The GCRA script; knows its own SHA for EVALSHA.
    script: Arc<Script>,
    /// Starts every key, so several deployments (or tests) can share one Redis without sharing budgets.
    prefix: Arc<str>,
}

/// A reconnecting connection to one Redis server or to a cluster.
#[derive(Clone)]
enum Connection {
    /// One multiplexed connection, re-established in the background when it breaks.
    Single(ConnectionManager),
    /// Connections to every primary, following slot moves.
    Cluster(ClusterConnection),
}

impl RedisStore {
    /// A store on the Redis at `url` (`redis://` or `rediss://` for TLS, `user:password@` for ACL auth, a
    /// `/db` number), or on the cluster `url` is a node of. Connects lazily, so the service starts even
    /// while Redis is down; call inside a tokio runtime.
    pub fn open(url: &str, cluster: bool, prefix: &str) -> Result<RedisStore, RedisError> {
        let connection = if cluster {
            let client = ClusterClient::builder([url])
                .connection_timeout(CONNECT_TIMEOUT)
                .build()?;
            Connection::Cluster(
                client.get_pending_async_connection_with_config(ClusterConfig::new()),
            )
        } else {
            let client = redis::Client::open(url)?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(CONNECT_TIMEOUT))
                .set_max_delay(MAX_RECONNECT_DELAY);
            Connection::Single(ConnectionManager::new_lazy_with_config(client, config)?)
        };
        Ok(RedisStore {
            connection,
            script: Arc::new(Script::new(include_str!("gcra.lua"))),
            prefix: prefix.into(),
        })
    }

    /// Decides `checks` in Redis, with the contract of [`super::LimiterStore::check`] (all-or-nothing is
    /// best effort in cluster mode, see the module docs).
    pub async fn check(&self, checks: &[Check]) -> RedisResult<Vec<Verdict>> {
        self.decide(checks, |check| self.redis_key(&check.key))
            .await
    }

    /// Runs the script over `checks`, each stored at `key(check)`.
    async fn decide(
        &self,
        checks: &[Check],
        key: impl Fn(&Check) -> String,
    ) -> RedisResult<Vec<Verdict>> {
        let waits: Vec<u64> = match &self.connection {
            Connection::Single(connection) => {
                let mut invocation = self.script.prepare_invoke();
                // No ban key (see gcra.lua).
                invocation.arg("0");
                for check in checks {
                    invocation.key(key(check));
                    push_args(&mut invocation, check);
                }
                invocation.invoke_async(&mut connection.clone()).await?
            }
            Connection::Cluster(connection) => {
                let calls = checks.iter().map(|check| {
                    let mut connection = connection.clone();
                    let mut invocation = self.script.key(key(check));
                    invocation.arg("0");
                    push_args(&mut invocation, check);
                    async move {
                        let waits: Vec<u64> = invocation.invoke_async(&mut connection).await?;
                        waits.first().copied().ok_or_else(|| {
                            RedisError::from((
                                redis::ErrorKind::UnexpectedReturnType,
                                "the rate-limit script answered no verdict",
                            ))
                        })
                    }
                });
                futures_util::future::try_join_all(calls).await?
            }
        };
        if waits.len() != checks.len() {
            return Err(RedisError::from((
                redis::ErrorKind::UnexpectedReturnType,
                "the rate-limit script answered a verdict count unlike the check count",
            )));
        }
        Ok(waits.into_iter().map(verdict).collect())
    }

    /// Runs the rate-limit script on a key of its own, `<prefix>:probe`, exactly as a request would, write
    /// included: what stops requests (a replica's READONLY, OOM, a script that cannot run, CROSSSLOT)
    /// stops the probe too, so health follows what requests see. The key lives a millisecond. In a cluster
    /// it reaches the node owning the probe key's slot.
    pub async fn probe(&self) -> RedisResult<()> {
        let probe = Check {
            key: String::new(),
            quota: Quota::new(
                Rate::parse("1000000/s").expect("a valid rate"),
                NonZeroU32::MIN,
            ),
            shadow: false,
        };
        self.decide(std::slice::from_ref(&probe), |_| {
            format!("{}:probe", self.prefix)
        })
        .await
        .map(drop)
    }

    /// `<prefix>:rl:{<hex digest of key>}`.
    fn redis_key(&self, key: &str) -> String {
        let mut hasher = Blake2b::new(DIGEST_BYTES).expect("16 bytes is a valid BLAKE2b size");
        hasher
            .update(key.as_bytes())
            .expect("a fresh hasher accepts input");
        let digest = hasher.finalize().expect("a fresh hasher finalizes once");
        let mut redis_key = format!("{}:rl:{{", self.prefix);
        for byte in digest.as_ref() {
            write!(redis_key, "{byte:02x}").expect("writing to a String cannot fail");
        }
        redis_key.push('}');
        redis_key
    }
}

/// The script's answer for one check: 0 when admitted, else the microseconds until it would be.
fn verdict(wait: u64) -> Verdict {
    match wait {
        0 => Verdict::Allowed,
        micros => Verdict::Denied {
            retry_after: Duration::from_micros(micros),
        },
    }
}

/// Appends a check's emission interval and tolerance in whole microseconds (at least 1 µs per request),
/// and its shadow flag.
fn push_args(invocation: &mut redis::ScriptInvocation<'_>, check: &Check) {
    let interval = u64::try_from(check.quota.emission_interval().as_micros())
        .unwrap_or(u64::MAX)
        .max(1);
    // B·T from the rounded T, so a full burst is still exactly B requests.
    let tolerance = interval.saturating_mul(u64::from(check.quota.burst().get()));
    invocation
        .arg(interval)
        .arg(tolerance)
        .arg(if check.shadow { "1" } else { "0" });
}
