//! The policy engine's caches: bounded, concurrent maps. Callers choose the keys (room ARNs, capabilities,
//! attribute keys), so the bound caps the memory whatever they send; the eviction policy keeps the keys
//! that come back. `quick_cache`'s sync cache is sharded (a lock per shard, no global one) and evicts with
//! S3-FIFO: a key seen once is dropped before one seen again, so a scan of one-off rooms does not push
//! the live (caller, room) pairs out. Keys are hashed with SipHash (the crate's default features, and its
//! faster hasher, are off): callers choose them. The decision cache is keyed by [`Digest`]s instead, which
//! are already uniform and secret-keyed, so their bits are the hash ([`DigestBits`]).

use std::hash::{BuildHasher, Hash, Hasher, RandomState};

use quick_cache::{
    Equivalent, UnitWeighter,
    sync::{Cache, DefaultLifecycle},
};

#[derive(Debug)]
pub(super) struct BoundedCache<K, V, B = RandomState> {
    /// Values are cloned out on every hit: an `Arc` for a large one, small ones inline (no shared count
    /// to touch).
    entries: Cache<K, V, UnitWeighter, B>,
}

impl<K: Hash + Eq, V: Clone> BoundedCache<K, V> {
    /// A cache of about `capacity` entries (each shard rounds its share up).
    pub(super) fn new(capacity: usize) -> Self {
        Self::with_hasher(capacity, RandomState::new())
    }
}

impl<K: Hash + Eq, V: Clone, B: BuildHasher + Clone> BoundedCache<K, V, B> {
    /// [`Self::new`], hashing keys with `hasher`.
    pub(super) fn with_hasher(capacity: usize, hasher: B) -> Self {
        BoundedCache {
            entries: Cache::with(
                capacity,
                capacity as u64,
                UnitWeighter,
                hasher,
                DefaultLifecycle::default(),
            ),
        }
    }

    /// The value kept for `key`, or the one `make` makes, kept from now on. Two callers that miss the
    /// same key at once both make it (neither thread waits on the other); the second one kept wins,
    /// which is harmless for values that depend only on the key.
    pub(super) fn get_or_try_insert<Q, E>(
        &self,
        key: &Q,
        make: impl FnOnce() -> Result<V, E>,
    ) -> Result<V, E>
    where
        Q: Hash + Equivalent<K> + ToOwned<Owned = K> + ?Sized,
    {
        if let Some(value) = self.entries.get(key) {
            return Ok(value);
        }
        let value = make()?;
        self.entries.insert(key.to_owned(), value.clone());
        Ok(value)
    }

    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }
}

/// A 128-bit keyed digest of a key (the decision cache's: see `PolicyEngine::decide`): 16 bytes kept inline
/// in the cache's table, compared without following a pointer to a key on the heap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Digest(pub(super) u128);

impl Hash for Digest {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.0 as u64 ^ (self.0 >> 64) as u64);
    }
}

impl Digest {
    /// Bytes of domain separation after the key block: absorbing them compresses the key block once, in
    /// [`Digester::new`], instead of once per digest.
    const DOMAIN: &'static [u8] = b"chat-token-service policy decision key";
}

/// Makes [`Digest`]s: BLAKE2b-128 keyed with a key drawn when made (a policy set's load), so no caller can
/// look for two keys with one digest; 2^-64 chance of any collision among 2^32 keys.
pub(super) struct Digester {
    /// The keyed state after [`Digest::DOMAIN`], cloned per digest. Derived from a key of this process's
    /// own that protects nothing else, so it is not zeroed when dropped (blake2b_simd's `State` cannot be).
    state: blake2b_simd::State,
}

impl Digester {
    pub(super) fn new() -> Self {
        let mut key = [0; blake2b_simd::KEYBYTES];
        rand::fill(&mut key);
        let mut state = blake2b_simd::Params::new()
            .hash_length(16)
            .key(&key)
            .to_state();
        state.update(Digest::DOMAIN);
        Digester { state }
    }

    pub(super) fn digest(&self, key: &str) -> Digest {
        let mut state = self.state.clone();
        state.update(key.as_bytes());
        let bytes = state.finalize();
        Digest(u128::from_le_bytes(
            bytes.as_bytes().try_into().expect("16 bytes"),
        ))
    }
}

impl std::fmt::Debug for Digester {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Digester")
    }
}

/// Hashes a [`Digest`] to its own bits: they are uniform, and unknown to callers, who cannot choose keys
/// that fall in one bucket without the digest's key.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct DigestBits;

impl BuildHasher for DigestBits {
    type Hasher = DigestHasher;

    fn build_hasher(&self) -> DigestHasher {
        DigestHasher(0)
    }
}

/// See [`DigestBits`].
#[derive(Debug)]
pub(super) struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write_u64(&mut self, bits: u64) {
        self.0 ^= bits;
    }

    /// Only [`Digest`]s are hashed with this hasher, through `write_u64`; anything else is folded in
    /// 8 bytes at a time (correct, not made to spread).
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = self.0.rotate_left(5) ^ u64::from_le_bytes(word);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_what_it_made_within_the_bound() {
        let cache = BoundedCache::new(64);
        let mut made = 0;
        for key in [1, 2, 1, 2] {
            cache
                .get_or_try_insert(&key, || {
                    made += 1;
                    Ok::<_, ()>(key * 10)
                })
                .unwrap();
        }
        assert_eq!(made, 2);
        assert_eq!(cache.len(), 2);
        for key in 0..1000 {
            cache.get_or_try_insert(&key, || Ok::<_, ()>(key)).unwrap();
            assert!(cache.len() <= 64, "{} entries", cache.len());
        }
        assert!(cache.get_or_try_insert(&5000, || Err("no")).is_err());
        assert!(
            cache.get_or_try_insert(&5000, || Ok::<_, ()>(1)).is_ok(),
            "a failure keeps nothing"
        );
    }

    #[test]
    fn a_key_that_comes_back_outlives_a_scan_of_one_off_keys() {
        let cache = BoundedCache::new(64);
        let mut made = 0;
        for one_off in 1..10_000 {
            cache
                .get_or_try_insert(&0, || {
                    made += 1;
                    Ok::<_, ()>(0)
                })
                .unwrap();
            cache
                .get_or_try_insert(&one_off, || Ok::<_, ()>(one_off))
                .unwrap();
        }
        assert_eq!(made, 1, "the hot key was made once");
    }

    #[test]
    fn digests_are_of_the_whole_key_and_of_this_digester_only() {
        let digester = Digester::new();
        let key = "3:web15:CreateChatToken40:arn:aws:ivschat:us-west-2:1:room/a";
        assert_eq!(digester.digest(key), digester.digest(key));
        // A change anywhere in the key changes the digest: the first byte, one in the middle, the last.
        let mut seen = std::collections::HashSet::from([digester.digest(key).0]);
        for at in [0, key.len() / 2, key.len() - 1] {
            let mut changed = key.as_bytes().to_vec();
            changed[at] ^= 1;
            let changed = String::from_utf8(changed).unwrap();
            assert!(seen.insert(digester.digest(&changed).0), "byte {at}");
        }
        assert!(seen.insert(digester.digest(&key[..key.len() - 1]).0));
        assert!(seen.insert(digester.digest("").0));
        // Keyed: another policy load's digester gives other digests for the same keys.
        assert_ne!(Digester::new().digest(key), digester.digest(key));
    }

    #[test]
    fn digests_hash_to_their_own_bits() {
        let hash = |digest: u128| DigestBits.hash_one(Digest(digest));
        assert_eq!(hash(0x0123_4567_89ab_cdef), 0x0123_4567_89ab_cdef);
        assert_eq!(hash(1 << 64 | 1), 0);
        assert_eq!(hash(0xff << 64), 0xff);
        // Anything else is folded in, not ignored.
        assert_ne!(DigestBits.hash_one(1u8), DigestBits.hash_one(2u8));
        // Every key below hashes to 0: the cache is still right, only slower.
        let cache = BoundedCache::with_hasher(64, DigestBits);
        for key in 0..1000u128 {
            let kept = cache
                .get_or_try_insert(&Digest(key << 64 | key), || Ok::<_, ()>(key))
                .unwrap();
            assert_eq!(kept, key);
            assert!(cache.len() <= 64, "{} entries", cache.len());
        }
        let kept = cache.get_or_try_insert(&Digest(999 << 64 | 999), || Err(()));
        assert_eq!(kept.unwrap(), 999, "the last one made is kept");
    }

    #[test]
    fn string_keys_are_looked_up_by_str() {
        let cache: BoundedCache<String, usize> = BoundedCache::new(64);
        cache.get_or_try_insert("a", || Ok::<_, ()>(1)).unwrap();
        let kept = cache.get_or_try_insert("a", || Err(())).unwrap();
        assert_eq!(kept, 1);
    }
}
