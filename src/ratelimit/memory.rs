//! The in-process [`LimiterStore`]: each key's theoretical arrival time in a sharded map, bounded in memory.
//!
//! Each replica keeps its own state, so with `R` replicas behind a load balancer a limit admits up to `R`
//! times its rate. That is the price of needing nothing else running; a shared store removes it.
//!
//! Memory stays bounded two ways:
//! - A key whose TAT has passed is fully recovered and carries no information: forgetting it changes no
//!   decision. Each shard drops such keys in a sweep every time it has taken in as many new keys as
//!   survived its last sweep, which keeps the cost per insert constant.
//! - `max_tracked_keys` is a hard cap, split across the shards. A new key for a full shard evicts the key
//!   closest to recovery among a few sampled ones (as Redis' `maxmemory` sampling does). Evicting a key
//!   that has not recovered forgets part of its spent budget, so eviction can only make the limiter more
//!   lenient for that key, never stricter; choosing the one closest to recovery forgets the least.

use std::{
    collections::hash_map::RandomState,
    future::{Future, ready},
    hash::BuildHasher,
    num::NonZeroUsize,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use indexmap::IndexMap;
use tokio::time::Instant;

use super::{Check, LimiterStore, StoreError, Verdict, gcra::Outcome};

/// Most shards: enough that 2 to 8 cores rarely contend on one lock.
const SHARDS: usize = 16;
/// Keys compared per eviction; Redis' default `maxmemory-samples`.
const EVICTION_SAMPLE: usize = 5;
/// Fewest new keys between two sweeps of a shard, so a small shard is not swept on every insert.
const MIN_SWEEP_INTERVAL: usize = 64;

/// In-process limiter state, shared by every clone.
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

struct Inner {
    shards: Box<[Mutex<Shard>]>,
    /// Turns a key into the 64-bit digest the shards store and route by; seeded per process, so nobody can
    /// aim many keys at one shard or make two keys collide.
    digests: RandomState,
}

impl MemoryStore {
    /// A store that tracks at most `max_tracked_keys` keys at any time.
    pub fn new(max_tracked_keys: NonZeroUsize) -> Self {
        let max = max_tracked_keys.get();
        // Every shard gets at least one slot, else keys routed to it could never be limited.
        let count = SHARDS.min(max);
        let seeds = RandomState::new();
        // Shards keep each TAT as nanoseconds after this.
        let epoch = Instant::now();
        let shards = (0..count)
            .map(|i| {
                let capacity = max / count + usize::from(i < max % count);
                Mutex::new(Shard::new(capacity, seeds.hash_one(i), epoch))
            })
            .collect();
        MemoryStore {
            inner: Arc::new(Inner {
                shards,
                digests: RandomState::new(),
            }),
        }
    }

    /// How many keys are tracked now.
    pub fn len(&self) -> usize {
        self.inner.shards.iter().map(|s| lock(s).tats.len()).sum()
    }

    /// Whether no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn decide(&self, checks: &[Check]) -> Vec<Verdict> {
        let digests: Vec<u64> = checks
            .iter()
            .map(|c| self.inner.digests.hash_one(&c.key))
            .collect();
        let shards = self.inner.shards.len() as u64;
        let shard_of: Vec<usize> = digests.iter().map(|d| (d % shards) as usize).collect();
        // Locking in ascending shard order means two calls needing the same shards never wait on each other
        // in a cycle; holding them all makes the enforced checks one atomic decision.
        let mut locked: Vec<Option<MutexGuard<'_, Shard>>> =
            self.inner.shards.iter().map(|_| None).collect();
        let mut needed = shard_of.clone();
        needed.sort_unstable();
        needed.dedup();
        for i in needed {
            locked[i] = Some(lock(&self.inner.shards[i]));
        }
        // Read the clock only once every lock is held, so decisions on one key happen in clock order.
        let now = Instant::now();

        let mut verdicts = vec![Verdict::Allowed; checks.len()];
        let mut admitted: Vec<(usize, Instant)> = Vec::new();
        for (i, check) in checks.iter().enumerate().filter(|(_, c)| !c.shadow) {
            // A key checked twice in one call counts twice, as two requests one after the other would.
            let tat = admitted
                .iter()
                .rev()
                .find(|(j, _)| digests[*j] == digests[i])
                .map(|&(_, tat)| tat)
                .or_else(|| locked_shard(&mut locked, shard_of[i]).get(digests[i]));
            match check.quota.check(tat, now) {
                Outcome::Allowed { tat } => admitted.push((i, tat)),
                Outcome::Denied { retry_after } => verdicts[i] = Verdict::Denied { retry_after },
            }
        }
        let all_admitted = verdicts.iter().all(|v| *v == Verdict::Allowed);
        if all_admitted {
            for (i, tat) in admitted {
                locked_shard(&mut locked, shard_of[i]).set(digests[i], tat, now);
            }
        }
        for (i, check) in checks.iter().enumerate().filter(|(_, c)| c.shadow) {
            let shard = locked_shard(&mut locked, shard_of[i]);
            match check.quota.check(shard.get(digests[i]), now) {
                Outcome::Allowed { tat } => shard.set(digests[i], tat, now),
                Outcome::Denied { retry_after } => verdicts[i] = Verdict::Denied { retry_after },
            }
        }
        verdicts
    }
}

impl LimiterStore for MemoryStore {
    fn check(
        &self,
        checks: &[Check],
    ) -> impl Future<Output = Result<Vec<Verdict>, StoreError>> + Send {
        // Decided before returning: no lock is ever held across an await.
        ready(Ok(self.decide(checks)))
    }
}

fn locked_shard<'a>(
    locked: &'a mut [Option<MutexGuard<'_, Shard>>],
    shard: usize,
) -> &'a mut Shard {
    locked[shard]
        .as_deref_mut()
        .expect("every needed shard is locked first")
}

/// A shard's lock. A panic while it was held cannot leave a TAT half-written, so a poisoned shard is as
/// good as any.
fn lock(shard: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    shard.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One shard of the store.
struct Shard {
    /// Key digest → theoretical arrival time, in nanoseconds after `epoch`. Indexed so eviction can
    /// sample entries at random positions. A digest, not the key: 8 bytes instead of a heap string
    /// (`user:<id>`, a room ARN); a `u64` of nanoseconds, not an `Instant` (16 bytes): each entry is 24
    /// bytes plus its index slot, so a million users fit in about 43 MB. Two keys share state only if their
    /// keyed 64-bit digests collide: about one chance in 10^7 among a million keys.
    tats: IndexMap<u64, u64>,
    /// The store's epoch (see `tats`).
    epoch: Instant,
    /// This shard's share of `max_tracked_keys`.
    capacity: usize,
    /// New keys inserted since the last sweep.
    inserted_since_sweep: usize,
    /// How many new keys trigger the next sweep.
    sweep_interval: usize,
    /// State of the xorshift generator that picks eviction samples.
    rng: u64,
}

impl Shard {
    fn new(capacity: usize, seed: u64, epoch: Instant) -> Self {
        Shard {
            tats: IndexMap::new(),
            epoch,
            capacity,
            inserted_since_sweep: 0,
            sweep_interval: MIN_SWEEP_INTERVAL,
            // xorshift never leaves 0, so never start there.
            rng: seed | 1,
        }
    }

    fn get(&self, key: u64) -> Option<Instant> {
        self.tats
            .get(&key)
            .map(|&nanos| self.epoch + std::time::Duration::from_nanos(nanos))
    }

    /// `at` as nanoseconds after the epoch. Saturates some 584 years on: only a quota whose keys take
    /// longer than that to recover could tell.
    fn nanos(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    fn set(&mut self, key: u64, tat: Instant, now: Instant) {
        let tat = self.nanos(tat);
        if let Some(stored) = self.tats.get_mut(&key) {
            *stored = tat;
            return;
        }
        self.inserted_since_sweep += 1;
        if self.inserted_since_sweep >= self.sweep_interval {
            self.sweep(now);
        }
        if self.tats.len() >= self.capacity {
            self.evict_one();
        }
        self.tats.insert(key, tat);
    }

    /// Drops every fully recovered key.
    fn sweep(&mut self, now: Instant) {
        let now = self.nanos(now);
        self.tats.retain(|_, tat| *tat > now);
        self.inserted_since_sweep = 0;
        // Sweeping again after as many new keys as survived bounds the sweep cost per insert.
        self.sweep_interval = self.tats.len().max(MIN_SWEEP_INTERVAL);
    }

    /// Evicts the sampled key with the earliest TAT. A recovered key, if sampled, is always the one.
    fn evict_one(&mut self) {
        let len = self.tats.len();
        let mut victim = self.random_below(len);
        for _ in 1..EVICTION_SAMPLE.min(len) {
            let candidate = self.random_below(len);
            if self.tats[candidate] < self.tats[victim] {
                victim = candidate;
            }
        }
        self.tats.swap_remove_index(victim);
    }

    fn random_below(&mut self, n: usize) -> usize {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng % n as u64) as usize
    }
}

#[cfg(test)]
mod tests {
    use std::{num::NonZeroU32, time::Duration};

    use super::*;
    use crate::ratelimit::gcra::{Quota, Rate};

    fn store(max_tracked_keys: usize) -> MemoryStore {
        MemoryStore::new(NonZeroUsize::new(max_tracked_keys).unwrap())
    }

    fn check(key: &str, rate: &str, burst: u32, shadow: bool) -> Check {
        Check {
            key: key.into(),
            quota: Quota::new(Rate::parse(rate).unwrap(), NonZeroU32::new(burst).unwrap()),
            shadow,
        }
    }

    fn denied(verdict: &Verdict) -> bool {
        matches!(verdict, Verdict::Denied { .. })
    }

    #[tokio::test(start_paused = true)]
    async fn a_denied_enforced_check_consumes_nothing_from_the_others() {
        let store = store(100);
        let roomy = check("roomy", "1/s", 10, false);
        let tight = check("tight", "1/s", 1, false);
        assert_eq!(
            store.check(&[roomy.clone(), tight.clone()]).await.unwrap(),
            [Verdict::Allowed, Verdict::Allowed]
        );
        for _ in 0..20 {
            let verdicts = store.check(&[roomy.clone(), tight.clone()]).await.unwrap();
            assert_eq!(verdicts[0], Verdict::Allowed);
            assert!(denied(&verdicts[1]));
        }
        // Twenty refusals later, `roomy` has still spent only one of its ten.
        let roomy_alone = vec![roomy; 9];
        assert!(
            store
                .check(&roomy_alone)
                .await
                .unwrap()
                .iter()
                .all(|v| *v == Verdict::Allowed)
        );
        assert!(denied(&store.check(&roomy_alone[..1]).await.unwrap()[0]));
    }

    #[tokio::test(start_paused = true)]
    async fn shadow_checks_consume_on_their_own_and_never_block() {
        let store = store(100);
        let shadow = check("shadow", "1/s", 1, true);
        let enforced = check("enforced", "1/s", 2, false);
        let both = [shadow, enforced];
        assert_eq!(
            store.check(&both).await.unwrap(),
            [Verdict::Allowed, Verdict::Allowed]
        );
        let second = store.check(&both).await.unwrap();
        assert!(denied(&second[0]), "the shadow limit is spent");
        assert_eq!(
            second[1],
            Verdict::Allowed,
            "and did not stop the enforced one"
        );
        let third = store.check(&both).await.unwrap();
        assert!(denied(&third[0]) && denied(&third[1]));
    }

    #[tokio::test(start_paused = true)]
    async fn a_key_checked_twice_in_one_call_counts_twice() {
        let store = store(100);
        let once = check("k", "1/s", 2, false);
        let verdicts = store.check(&[once.clone(), once.clone()]).await.unwrap();
        assert_eq!(verdicts, [Verdict::Allowed, Verdict::Allowed]);
        let verdicts = store.check(&[once.clone(), once]).await.unwrap();
        assert!(denied(&verdicts[0]) && denied(&verdicts[1]));
    }

    #[tokio::test(start_paused = true)]
    async fn a_million_distinct_keys_stay_within_the_cap() {
        let cap = 10_000;
        let store = store(cap);
        for user in 0..1_000_000 {
            let verdicts = store
                .check(&[check(&format!("per-user/{user}"), "1/min", 1, false)])
                .await
                .unwrap();
            assert_eq!(verdicts, [Verdict::Allowed], "every key is new");
        }
        assert_eq!(
            store.len(),
            cap,
            "every shard is full, none beyond its share"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn recovered_keys_are_dropped_as_new_keys_arrive() {
        let store = store(1_000_000);
        for user in 0..1_000 {
            store
                .check(&[check(&format!("old/{user}"), "1/s", 1, false)])
                .await
                .unwrap();
        }
        assert_eq!(store.len(), 1_000);
        tokio::time::advance(Duration::from_secs(1)).await;
        // Every shard sees far more new keys than its sweep interval, so every shard sweeps.
        for user in 0..4_000 {
            store
                .check(&[check(&format!("new/{user}"), "1/s", 1, false)])
                .await
                .unwrap();
        }
        assert_eq!(store.len(), 4_000, "only the keys still recovering remain");
    }

    #[test]
    fn a_tiny_cap_still_gives_every_shard_a_slot() {
        let store = store(3);
        assert_eq!(store.inner.shards.len(), 3);
        assert!(store.inner.shards.iter().all(|s| lock(s).capacity == 1));
        let odd = super::MemoryStore::new(NonZeroUsize::new(1_000_003).unwrap());
        let capacities: usize = odd.inner.shards.iter().map(|s| lock(s).capacity).sum();
        assert_eq!(capacities, 1_000_003);
    }

    #[test]
    fn concurrent_multi_key_checks_do_not_deadlock() {
        let store = store(1_000);
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let store = store.clone();
                std::thread::spawn(move || {
                    for i in 0..5_000 {
                        // Each thread names the keys in a different order.
                        let mut keys = [
                            format!("a/{}", i % 7),
                            format!("b/{}", i % 11),
                            format!("c/{}", i % 13),
                        ];
                        keys.rotate_left(t % 3);
                        let checks: Vec<_> = keys
                            .iter()
                            .map(|k| check(k, "1000/s", 10, t == 3))
                            .collect();
                        store.decide(&checks);
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
    }
}
