//! The policy engine's caches: bounded, concurrent maps. Callers choose the keys (room ARNs, capabilities,
//! attribute keys), so the bound caps the memory whatever they send; the eviction policy keeps the keys
//! that come back. `quick_cache`'s sync cache is sharded (a lock per shard, no global one) and evicts with
//! S3-FIFO: a key seen once is dropped before one seen again, so a scan of one-off rooms does not push
//! the live (caller, room) pairs out. Keys are hashed with SipHash (the crate's default features, and its
//! faster hasher, are off): callers choose them.

use std::{hash::Hash, sync::Arc};

use quick_cache::{Equivalent, sync::Cache};

#[derive(Debug)]
pub(super) struct BoundedCache<K, V> {
    entries: Cache<K, Arc<V>>,
}

impl<K: Hash + Eq, V> BoundedCache<K, V> {
    /// A cache of about `capacity` entries (each shard rounds its share up).
    pub(super) fn new(capacity: usize) -> Self {
        BoundedCache {
            entries: Cache::new(capacity),
        }
    }

    /// The value kept for `key`, or the one `make` makes, kept from now on. Two callers that miss the
    /// same key at once both make it (neither thread waits on the other); the second one kept wins,
    /// which is harmless for values that depend only on the key.
    pub(super) fn get_or_try_insert<Q, E>(
        &self,
        key: &Q,
        make: impl FnOnce() -> Result<V, E>,
    ) -> Result<Arc<V>, E>
    where
        Q: Hash + Equivalent<K> + ToOwned<Owned = K> + ?Sized,
    {
        if let Some(value) = self.entries.get(key) {
            return Ok(value);
        }
        let value = Arc::new(make()?);
        self.entries.insert(key.to_owned(), value.clone());
        Ok(value)
    }

    pub(super) fn len(&self) -> usize {
        self.entries.len()
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
    fn string_keys_are_looked_up_by_str() {
        let cache: BoundedCache<String, usize> = BoundedCache::new(64);
        cache.get_or_try_insert("a", || Ok::<_, ()>(1)).unwrap();
        let kept = cache.get_or_try_insert("a", || Err(())).unwrap();
        assert_eq!(*kept, 1);
    }
}
