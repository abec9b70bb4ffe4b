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
    time::Duration,
};

use tokio::time::Instant;

use super::{Check, LimiterStore, Verdict, gcra::Outcome};
use crate::store::StoreError;

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
    /// TATs are kept as nanoseconds since this instant (8 bytes instead of an `Instant`'s 16).
    epoch: Instant,
}

impl MemoryStore {
    /// A store that tracks at most `max_tracked_keys` keys at any time.
    pub fn new(max_tracked_keys: NonZeroUsize) -> Self {
        let max = max_tracked_keys.get();
        // Every shard gets at least one slot, else keys routed to it could never be limited.
        let count = SHARDS.min(max);
        let seeds = RandomState::new();
        let shards = (0..count)
            .map(|i| {
                let capacity = max / count + usize::from(i < max % count);
                Mutex::new(Shard::new(capacity, seeds.hash_one(i)))
            })
            .collect();
        MemoryStore {
            inner: Arc::new(Inner {
                shards,
                digests: RandomState::new(),
                epoch: Instant::now(),
            }),
        }
    }

    /// How many keys are tracked now.
    pub fn len(&self) -> usize {
        self.inner.shards.iter().map(|s| lock(s).len).sum()
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
        let epoch = self.inner.epoch;
        let nanos = |at: Instant| at.saturating_duration_since(epoch).as_nanos() as u64;
        let instant = |nanos: u64| epoch + Duration::from_nanos(nanos);
        let now_nanos = nanos(now);

        let mut verdicts = vec![Verdict::Allowed; checks.len()];
        let mut admitted: Vec<(usize, Instant)> = Vec::new();
        for (i, check) in checks.iter().enumerate().filter(|(_, c)| !c.shadow) {
            // A key checked twice in one call counts twice, as two requests one after the other would.
            let tat = admitted
                .iter()
                .rev()
                .find(|(j, _)| digests[*j] == digests[i])
                .map(|&(_, tat)| tat)
                .or_else(|| {
                    locked_shard(&mut locked, shard_of[i])
                        .get(digests[i])
                        .map(instant)
                });
            match check.quota.check(tat, now) {
                Outcome::Allowed { tat } => admitted.push((i, tat)),
                Outcome::Denied { retry_after } => verdicts[i] = Verdict::Denied { retry_after },
            }
        }
        let all_admitted = verdicts.iter().all(|v| *v == Verdict::Allowed);
        if all_admitted {
            for (i, tat) in admitted {
                locked_shard(&mut locked, shard_of[i]).set(digests[i], nanos(tat), now_nanos);
            }
        }
        for (i, check) in checks.iter().enumerate().filter(|(_, c)| c.shadow) {
            let shard = locked_shard(&mut locked, shard_of[i]);
            match check.quota.check(shard.get(digests[i]).map(instant), now) {
                Outcome::Allowed { tat } => shard.set(digests[i], nanos(tat), now_nanos),
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

/// One shard of the store: an open-addressing hash table (linear probing) of 16-byte slots, the key's
/// digest and its theoretical arrival time. A digest, not the key: 8 bytes instead of a heap string
/// (`user:<id>`, a room ARN). Two keys share state only if their keyed 64-bit digests collide: about one
/// chance in 10^7 among a million keys. The table holds at most three slots in four, so a million users
/// (62,500 a shard) take 131,072 slots a shard: 32 MiB in all, no other allocation per key.
struct Shard {
    /// The slots; a power of two of them (or none). A slot whose key is [`EMPTY`] is free.
    slots: Box<[Slot]>,
    /// Occupied slots.
    len: usize,
    /// This shard's share of `max_tracked_keys`.
    capacity: usize,
    /// New keys inserted since the last sweep.
    inserted_since_sweep: usize,
    /// How many new keys trigger the next sweep.
    sweep_interval: usize,
    /// State of the xorshift generator that picks eviction samples.
    rng: u64,
}

/// The key of a free slot; a digest of 0 is stored as 1 (see [`stored_key`]).
const EMPTY: u64 = 0;
/// Fewest slots in a table that holds anything.
const MIN_SLOTS: usize = 16;

#[derive(Clone, Copy)]
struct Slot {
    key: u64,
    /// The TAT in nanoseconds since the store's epoch.
    tat: u64,
}

const FREE: Slot = Slot { key: EMPTY, tat: 0 };

/// The digest as stored: never [`EMPTY`]. Merging digests 0 and 1 costs one chance in 2^64 more of sharing.
fn stored_key(digest: u64) -> u64 {
    digest.max(1)
}

impl Shard {
    fn new(capacity: usize, seed: u64) -> Self {
        Shard {
            slots: Box::new([]),
            len: 0,
            capacity,
            inserted_since_sweep: 0,
            sweep_interval: MIN_SWEEP_INTERVAL,
            // xorshift never leaves 0, so never start there.
            rng: seed | 1,
        }
    }

    /// Where `key`'s probe sequence starts: the digest's top bits (the shard was chosen by its remainder, so
    /// these are independent of it). Only for a table with slots.
    fn home(&self, key: u64) -> usize {
        let bits = self.slots.len().trailing_zeros();
        (key >> (64 - bits)) as usize
    }

    /// The slot holding `key`, or the free slot ending its probe sequence.
    fn find(&self, key: u64) -> Result<usize, usize> {
        let mask = self.slots.len() - 1;
        let mut i = self.home(key);
        loop {
            match self.slots[i].key {
                k if k == key => return Ok(i),
                EMPTY => return Err(i),
                _ => i = (i + 1) & mask,
            }
        }
    }

    fn get(&self, digest: u64) -> Option<u64> {
        if self.len == 0 {
            return None;
        }
        self.find(stored_key(digest))
            .ok()
            .map(|i| self.slots[i].tat)
    }

    fn set(&mut self, digest: u64, tat: u64, now: u64) {
        let key = stored_key(digest);
        if self.len > 0
            && let Ok(i) = self.find(key)
        {
            self.slots[i].tat = tat;
            return;
        }
        self.inserted_since_sweep += 1;
        if self.inserted_since_sweep >= self.sweep_interval {
            self.sweep(now);
        }
        if self.len >= self.capacity {
            self.evict_one();
        }
        // At most three slots in four taken, so probe sequences stay short.
        if (self.len + 1) * 4 > self.slots.len() * 3 {
            self.resize((self.slots.len() * 2).max(MIN_SLOTS));
        }
        let i = self.find(key).expect_err("the key is not in the table");
        self.slots[i] = Slot { key, tat };
        self.len += 1;
    }

    /// Moves every entry into a table of `slots` slots.
    fn resize(&mut self, slots: usize) {
        let old = std::mem::replace(&mut self.slots, vec![FREE; slots].into_boxed_slice());
        for slot in old.iter().filter(|s| s.key != EMPTY) {
            let i = self.find(slot.key).expect_err("keys are unique");
            self.slots[i] = *slot;
        }
    }

    /// Drops every fully recovered key, and shrinks the table to what the survivors need.
    fn sweep(&mut self, now: u64) {
        let before = std::mem::take(&mut self.slots);
        self.len = before
            .iter()
            .filter(|s| s.key != EMPTY && s.tat > now)
            .count();
        let mut slots = MIN_SLOTS;
        while self.len * 4 > slots * 3 {
            slots *= 2;
        }
        self.slots = vec![FREE; slots].into_boxed_slice();
        for slot in before.iter().filter(|s| s.key != EMPTY && s.tat > now) {
            let i = self.find(slot.key).expect_err("keys are unique");
            self.slots[i] = *slot;
        }
        self.inserted_since_sweep = 0;
        // Sweeping again after as many new keys as survived bounds the sweep cost per insert.
        self.sweep_interval = self.len.max(MIN_SWEEP_INTERVAL);
    }

    /// Evicts the sampled key with the earliest TAT. A recovered key, if sampled, is always the one.
    fn evict_one(&mut self) {
        if self.len == 0 {
            return;
        }
        let mut victim = self.random_entry();
        for _ in 1..EVICTION_SAMPLE.min(self.len) {
            let candidate = self.random_entry();
            if self.slots[candidate].tat < self.slots[victim].tat {
                victim = candidate;
            }
        }
        self.remove(victim);
    }

    /// An occupied slot: the first at or after a random position. The table is at least 3/8 full once
    /// grown, so this is a few steps.
    fn random_entry(&mut self) -> usize {
        let mask = self.slots.len() - 1;
        let mut i = self.random_below(self.slots.len());
        while self.slots[i].key == EMPTY {
            i = (i + 1) & mask;
        }
        i
    }

    /// Frees slot `i`, moving later entries of its probe run back so every key stays reachable from its
    /// home (backward-shift deletion: no tombstones).
    fn remove(&mut self, i: usize) {
        let mask = self.slots.len() - 1;
        let mut hole = i;
        let mut j = i;
        loop {
            j = (j + 1) & mask;
            let key = self.slots[j].key;
            if key == EMPTY {
                break;
            }
            // The entry at j may fill the hole if the hole lies between its home and j.
            let home = self.home(key);
            if (j.wrapping_sub(home) & mask) >= (j.wrapping_sub(hole) & mask) {
                self.slots[hole] = self.slots[j];
                hole = j;
            }
        }
        self.slots[hole] = FREE;
        self.len -= 1;
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
    use crate::domain::Rate;
    use crate::store::limits::Quota;

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
    fn every_key_stays_reachable_through_evictions_sweeps_and_growth() {
        let mut shard = Shard::new(500, 7);
        let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for round in 0..20_000_u64 {
            // Keys bunched in a narrow digest range make long probe runs, which removal must keep intact.
            let key = if round % 2 == 0 { next() } else { next() % 64 };
            let tat = 1_000 + next() % 1_000;
            shard.set(key, tat, round / 20);
            assert_eq!(shard.get(key), Some(tat), "a key just set is found");
            let live = shard.slots.iter().filter(|s| s.key != EMPTY).count();
            assert_eq!(live, shard.len);
            assert!(shard.len <= 500);
            if round % 997 == 0 {
                for slot in shard.slots.iter().filter(|s| s.key != EMPTY) {
                    assert_eq!(
                        shard.get(slot.key),
                        Some(slot.tat),
                        "every stored key is reachable"
                    );
                }
            }
        }
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
        // The watchdog: each thread says when it is done; a deadlock fails the test instead of hanging it.
        let (done, finished) = std::sync::mpsc::channel();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let store = store.clone();
                let done = done.clone();
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
                    done.send(()).unwrap();
                })
            })
            .collect();
        drop(done);
        for _ in &threads {
            match finished.recv_timeout(std::time::Duration::from_secs(60)) {
                Ok(()) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    panic!("deadlocked: no thread finished its 5,000 checks within 60 s")
                }
                // A thread panicked: its join below says why.
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        for thread in threads {
            thread.join().unwrap();
        }
    }
}
