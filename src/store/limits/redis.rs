//! [`RedisLimits`], the shared [`LimiterStore`]: GCRA evaluated inside Redis, so every replica spends one
//! budget.
//!
//! One Lua script (`gcra.lua`) holds the whole decision. It is loaded once per Redis server and then
//! invoked by its SHA (EVALSHA; on NOSCRIPT, after a Redis restart or failover, it is loaded again and the
//! call retried). The EVALSHA command is built straight into one buffer (keys written through one reused
//! string, numbers without a string of their own), not through redis-rs' script invocation, which keeps
//! every key and argument in a vector of its own and copies them all again into the command. It reads the clock with Redis' own `TIME`, so replicas whose clocks disagree still agree
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
//! On a single node, CreateChatToken's ban lookup can ride in the same script call as its limits (the
//! script's optional ban key, [`RedisLimits::check_after_ban`]; the moderation store's ban gate uses it):
//! one round trip per request, whatever the number of limits.
//!
//! Every call gets the shared connection's timeout and failure mode ([`SharedRedis`]); while Redis is down
//! in fail_open mode the in-process [`MemoryStore`] decides with the same limits.

use std::{num::NonZeroU32, sync::LazyLock, time::Duration};

use redis::{RedisError, RedisResult, Script};

use super::{Check, LimiterStore, MemoryStore, Quota, Verdict};
use crate::domain::Rate;
use crate::store::{
    StoreError,
    redis::{Connection, Probe, SharedRedis},
};

/// The GCRA script; knows its own SHA for EVALSHA.
static SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("gcra.lua")));

/// Rate-limit state in Redis, shared by every clone and every replica pointed at the same Redis.
#[derive(Clone)]
pub struct RedisLimits {
    /// The connection, its timeout and failure mode, shared with the moderation store.
    redis: SharedRedis,
    /// Decides in fail_open mode while Redis is down.
    local: MemoryStore,
}

/// What [`RedisLimits::check_after_ban`] found.
pub enum AfterBan {
    /// The ban record (JSON) held at the ban key: nothing was decided, nothing spent.
    Banned(Vec<u8>),
    /// No ban record: one verdict per check.
    Verdicts(Vec<Verdict>),
}

impl RedisLimits {
    /// Limits kept in `redis`, decided by `local` while Redis is down in fail_open mode.
    pub fn new(redis: SharedRedis, local: MemoryStore) -> Self {
        RedisLimits { redis, local }
    }

    /// The shared connection: its readiness, fault and outage count.
    pub fn redis(&self) -> &SharedRedis {
        &self.redis
    }

    /// The probe of [`SharedRedis`]: the rate-limit script on a key of its own, `<prefix>:probe`, exactly
    /// as a request would run it, write included: what stops requests (a replica's READONLY, OOM, a script
    /// that cannot run, CROSSSLOT) stops the probe too, so health follows what requests see. The key lives
    /// a millisecond. In a cluster it reaches the node owning the probe key's slot.
    pub fn probe(prefix: &str) -> Probe {
        let key = format!("{prefix}:probe");
        let probe = Check {
            key: String::new(),
            quota: Quota::new(
                Rate::parse("1000000/s").expect("a valid rate"),
                NonZeroU32::MIN,
            ),
            shadow: false,
        };
        Box::new(move |connection| {
            let key = key.clone();
            let probe = probe.clone();
            Box::pin(async move {
                decide(connection, std::slice::from_ref(&probe), |out, _| {
                    out.push_str(&key)
                })
                .await
                .map(drop)
            })
        })
    }

    /// Writes `<prefix>:rl:{<hex digest of key>}` to `redis_key`.
    fn write_key(&self, redis_key: &mut String, key: &str) {
        redis_key.push_str(self.redis.prefix());
        redis_key.push_str(":rl:{");
        crate::key::push_digest_hex(redis_key, key);
        redis_key.push('}');
    }

    /// On a single node, one script call: the record at `ban_key` if there is one (deciding nothing), else
    /// the verdicts on `checks`. Call it through [`SharedRedis::call`], on this store's connection.
    pub async fn check_after_ban(
        &self,
        connection: &Connection,
        ban_key: String,
        checks: &[Check],
    ) -> RedisResult<AfterBan> {
        let evalsha = evalsha(Some(&ban_key), checks, |out, check| {
            self.write_key(out, &check.key)
        });
        match connection.evalsha(&SCRIPT, &evalsha).await? {
            redis::Value::BulkString(record) => Ok(AfterBan::Banned(record)),
            redis::Value::Array(waits) => {
                if waits.len() != checks.len() {
                    return Err(corrupt(
                        "the rate-limit script answered a verdict count unlike the check count",
                    ));
                }
                waits
                    .into_iter()
                    .map(|wait| match wait {
                        redis::Value::Int(wait) => Ok(verdict(wait as u64)),
                        _ => Err(corrupt(
                            "the rate-limit script answered a non-integer verdict",
                        )),
                    })
                    .collect::<RedisResult<_>>()
                    .map(AfterBan::Verdicts)
            }
            _ => Err(corrupt(
                "the rate-limit script answered neither verdicts nor a ban",
            )),
        }
    }

    /// Decides `checks` on `connection` with the contract of [`LimiterStore::check`] (all-or-nothing is
    /// best effort in cluster mode, see the module docs), without the timeout and failure mode: call it
    /// through [`SharedRedis::call`].
    pub async fn decide(
        &self,
        connection: &Connection,
        checks: &[Check],
    ) -> RedisResult<Vec<Verdict>> {
        decide(connection, checks, |out, check| {
            self.write_key(out, &check.key)
        })
        .await
    }
}

impl LimiterStore for RedisLimits {
    async fn check(&self, checks: &[Check]) -> Result<Vec<Verdict>, StoreError> {
        match self
            .redis
            .call(|connection| self.decide(connection, checks))
            .await
        {
            Some(verdicts) => Ok(verdicts),
            None => self.redis.outage(&self.local)?.check(checks).await,
        }
    }
}

/// Runs the script over `checks`, each stored at the key `key` writes for it.
async fn decide(
    connection: &Connection,
    checks: &[Check],
    key: impl Fn(&mut String, &Check),
) -> RedisResult<Vec<Verdict>> {
    let waits: Vec<u64> = match connection {
        Connection::Single(_) => {
            connection
                .evalsha(&SCRIPT, &evalsha(None, checks, key))
                .await?
        }
        Connection::Cluster(_) => {
            let calls = checks.iter().map(|check| {
                let evalsha = evalsha(None, std::slice::from_ref(check), &key);
                async move {
                    let waits: Vec<u64> = connection.evalsha(&SCRIPT, &evalsha).await?;
                    waits
                        .first()
                        .copied()
                        .ok_or_else(|| corrupt("the rate-limit script answered no verdict"))
                }
            });
            futures_util::future::try_join_all(calls).await?
        }
    };
    if waits.len() != checks.len() {
        return Err(corrupt(
            "the rate-limit script answered a verdict count unlike the check count",
        ));
    }
    Ok(waits.into_iter().map(verdict).collect())
}

fn corrupt(what: &'static str) -> RedisError {
    RedisError::from((redis::ErrorKind::UnexpectedReturnType, what))
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

/// EVALSHA of the script (see gcra.lua): `ban_key` if any, each check's key as `key` writes it, then
/// the ban flag and each check's arguments.
fn evalsha(
    ban_key: Option<&str>,
    checks: &[Check],
    key: impl Fn(&mut String, &Check),
) -> redis::Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(SCRIPT.get_hash())
        .arg(checks.len() + usize::from(ban_key.is_some()));
    if let Some(ban_key) = ban_key {
        cmd.arg(ban_key);
    }
    let mut written = String::with_capacity(96);
    for check in checks {
        written.clear();
        key(&mut written, check);
        cmd.arg(written.as_str());
    }
    cmd.arg(if ban_key.is_some() { "1" } else { "0" });
    for check in checks {
        push_args(&mut cmd, check);
    }
    cmd
}

/// Appends a check's emission interval and tolerance in whole microseconds (at least 1 µs per request),
/// and its shadow flag.
fn push_args(cmd: &mut redis::Cmd, check: &Check) {
    let interval = u64::try_from(check.quota.emission_interval().as_micros())
        .unwrap_or(u64::MAX)
        .max(1);
    // B·T from the rounded T, so a full burst is still exactly B requests.
    let tolerance = interval.saturating_mul(u64::from(check.quota.burst().get()));
    cmd.arg(interval)
        .arg(tolerance)
        .arg(if check.shadow { "1" } else { "0" });
}
