//! The policy engine's caches: a map that holds at most a fixed number of entries and starts afresh when
//! full. Callers choose the keys (room ARNs, capabilities, attribute keys), so the bound caps the memory
//! whatever they send, and the hot keys come back at once.

use std::{
    collections::HashMap,
    hash::Hash,
    sync::{Arc, RwLock},
};

#[derive(Debug)]
pub(super) struct BoundedCache<K, V> {
    capacity: usize,
    entries: RwLock<HashMap<K, Arc<V>>>,
}

impl<K: Hash + Eq, V> BoundedCache<K, V> {
    pub(super) fn new(capacity: usize) -> Self {
        BoundedCache {
            capacity,
            entries: RwLock::default(),
        }
    }

    /// The value kept for `key`, or the one `make` makes, kept from now on. Two callers that miss the
    /// same key at once both make it; the second one kept wins, which is harmless for values that depend
    /// only on the key.
    pub(super) fn get_or_try_insert<E>(
        &self,
        key: K,
        make: impl FnOnce() -> Result<V, E>,
    ) -> Result<Arc<V>, E> {
        let kept = self
            .entries
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(&key)
            .cloned();
        if let Some(value) = kept {
            return Ok(value);
        }
        let value = Arc::new(make()?);
        let mut entries = self
            .entries
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if entries.len() >= self.capacity {
            entries.clear();
        }
        entries.insert(key, value.clone());
        Ok(value)
    }

    pub(super) fn len(&self) -> usize {
        self.entries
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_what_it_made_and_starts_afresh_when_full() {
        let cache = BoundedCache::new(2);
        let mut made = 0;
        for key in [1, 2, 1, 2] {
            cache
                .get_or_try_insert(key, || {
                    made += 1;
                    Ok::<_, ()>(key * 10)
                })
                .unwrap();
        }
        assert_eq!(made, 2);
        assert_eq!(cache.len(), 2);
        assert_eq!(*cache.get_or_try_insert(3, || Ok::<_, ()>(30)).unwrap(), 30);
        assert_eq!(cache.len(), 1, "emptied before the third key");
        assert!(cache.get_or_try_insert(4, || Err("no")).is_err());
        assert_eq!(cache.len(), 1, "a failure keeps nothing");
    }
}
