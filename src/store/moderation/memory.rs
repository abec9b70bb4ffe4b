//! [`MemoryModeration`]: bans, revocations and used token ids in process, for one replica, and the local
//! copy a Redis-backed store answers from while Redis is down (fail_open).
//!
//! Bounded by `limiter.max_tracked_keys` entries per kind: when full of entries still in force, a new ban
//! (or revocation, or used token id) is refused with RESOURCE_EXHAUSTED rather than forgetting one. Entries
//! that no longer matter (ended bans, revocations past every token they cover, expired token ids) make
//! room.

use std::{
    collections::{BTreeMap, HashMap},
    num::NonZeroUsize,
    ops::Bound,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, SystemTime},
};

use super::ModerationStore;
use crate::domain::{Ban, BanPage, PageToken, RoomArn, UserId};
use crate::key::digest_hex;
use crate::store::StoreError;

/// The in-process store. Clones share state.
#[derive(Clone)]
pub struct MemoryModeration {
    state: Arc<Mutex<State>>,
    /// Most entries of each kind (bans, revocations, used token ids).
    capacity: usize,
}

#[derive(Default)]
struct State {
    /// Bans per room, ordered by their user's digest (the page order).
    bans: HashMap<RoomArn, BTreeMap<String, Ban>>,
    /// Bans across every room: what the capacity bounds (counting the rooms' maps would cost a pass over
    /// them on every ban).
    ban_count: usize,
    /// Revocation instant and when to forget it, per room and user.
    revocations: HashMap<(RoomArn, UserId), (SystemTime, SystemTime)>,
    /// Used token ids and when they expire.
    used: HashMap<String, SystemTime>,
}

impl MemoryModeration {
    /// A store holding at most `capacity` entries of each kind.
    pub fn new(capacity: NonZeroUsize) -> Self {
        MemoryModeration {
            state: Arc::default(),
            capacity: capacity.get(),
        }
    }

    /// How many entries of each kind it may hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent maps behind; keep serving.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn full(&self) -> StoreError {
        StoreError::Full {
            capacity: self.capacity,
        }
    }

    /// Forgets the ban of `user_id` in `room`, in force or not, and hands it back.
    pub(super) fn remove(&self, room: &RoomArn, user_id: &UserId) -> Option<Ban> {
        let mut state = self.lock();
        let bans = state.bans.get_mut(room)?;
        let removed = bans.remove(&digest_hex(user_id.expose()));
        if bans.is_empty() {
            state.bans.remove(room);
        }
        if removed.is_some() {
            state.ban_count -= 1;
        }
        removed
    }
}

impl State {
    fn purge_bans(&mut self, now: SystemTime) {
        let mut removed = 0;
        self.bans.retain(|_, bans| {
            let before = bans.len();
            bans.retain(|_, ban| ban.in_force(now));
            removed += before - bans.len();
            !bans.is_empty()
        });
        self.ban_count -= removed;
    }
}

// Every operation is decided before its future is returned: no lock is ever held across an await.
impl ModerationStore for MemoryModeration {
    async fn ban(&self, ban: &Ban) -> Result<(), StoreError> {
        let now = SystemTime::now();
        let mut state = self.lock();
        let user = digest_hex(ban.user_id.expose());
        let replaces = state
            .bans
            .get(&ban.room)
            .is_some_and(|bans| bans.contains_key(&user));
        if !replaces && state.ban_count >= self.capacity {
            state.purge_bans(now);
            if state.ban_count >= self.capacity {
                return Err(self.full());
            }
        }
        let room = state.bans.entry(ban.room.clone()).or_default();
        if room.insert(user, ban.clone()).is_none() {
            state.ban_count += 1;
        }
        Ok(())
    }

    async fn unban(&self, room: &RoomArn, user_id: &UserId) -> Result<bool, StoreError> {
        Ok(self
            .remove(room, user_id)
            .is_some_and(|ban| ban.in_force(SystemTime::now())))
    }

    async fn ban_of(&self, room: &RoomArn, user_id: &UserId) -> Result<Option<Ban>, StoreError> {
        let now = SystemTime::now();
        Ok(self
            .lock()
            .bans
            .get(room)
            .and_then(|bans| bans.get(&digest_hex(user_id.expose())))
            .filter(|ban| ban.in_force(now))
            .cloned())
    }

    async fn list_bans(
        &self,
        room: &RoomArn,
        after: Option<&PageToken>,
        limit: usize,
    ) -> Result<BanPage, StoreError> {
        let now = SystemTime::now();
        let state = self.lock();
        let Some(bans) = state.bans.get(room) else {
            return Ok(BanPage::default());
        };
        let start = match after {
            Some(token) => Bound::Excluded(token.as_str().to_owned()),
            None => Bound::Unbounded,
        };
        let mut in_force = bans
            .range((start, Bound::Unbounded))
            .filter(|(_, ban)| ban.in_force(now));
        let page: Vec<(&String, &Ban)> = in_force.by_ref().take(limit).collect();
        let more = in_force.next().is_some();
        Ok(BanPage {
            next: more
                .then(|| {
                    page.last()
                        .map(|(key, _)| PageToken::from_key((*key).clone()))
                })
                .flatten(),
            bans: page.into_iter().map(|(_, ban)| ban.clone()).collect(),
        })
    }

    async fn revoke(
        &self,
        room: &RoomArn,
        user_id: &UserId,
        at: SystemTime,
        keep_for: Duration,
    ) -> Result<(), StoreError> {
        let now = SystemTime::now();
        let mut state = self.lock();
        let key = (room.clone(), user_id.clone());
        if !state.revocations.contains_key(&key) && state.revocations.len() >= self.capacity {
            state.revocations.retain(|_, (_, forget)| *forget > now);
            if state.revocations.len() >= self.capacity {
                return Err(self.full());
            }
        }
        let entry = state.revocations.entry(key).or_insert((at, at + keep_for));
        // Revocations only move forward: a late write from a slower path never un-revokes tokens.
        if at >= entry.0 {
            *entry = (at, at + keep_for);
        }
        Ok(())
    }

    async fn revoked_at(
        &self,
        room: &RoomArn,
        user_id: &UserId,
    ) -> Result<Option<SystemTime>, StoreError> {
        let now = SystemTime::now();
        Ok(self
            .lock()
            .revocations
            .get(&(room.clone(), user_id.clone()))
            .filter(|(_, forget)| *forget > now)
            .map(|(at, _)| *at))
    }

    async fn first_use(&self, token_id: &str, until: SystemTime) -> Result<bool, StoreError> {
        let now = SystemTime::now();
        let mut state = self.lock();
        if let Some(expires) = state.used.get(token_id)
            && *expires > now
        {
            return Ok(false);
        }
        if state.used.len() >= self.capacity {
            state.used.retain(|_, expires| *expires > now);
            if state.used.len() >= self.capacity {
                return Err(self.full());
            }
        }
        state.used.insert(token_id.to_owned(), until);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Caller, Reason};

    const ROOM: &str = "arn:aws:ivschat:us-west-2:123456789012:room/abc";

    fn ban(user: &str, lasts: Option<Duration>) -> Ban {
        let now = crate::domain::moderation::whole_millis(SystemTime::now());
        Ban {
            room: RoomArn::parse(ROOM).unwrap(),
            user_id: UserId::parse(user.into()).unwrap(),
            banned_by: Caller::new("moderator"),
            created_at: now,
            expires_at: lasts.map(|d| now + d),
            reason: Reason::parse("spam".into()).unwrap(),
        }
    }

    fn store(capacity: usize) -> MemoryModeration {
        MemoryModeration::new(NonZeroUsize::new(capacity).unwrap())
    }

    #[tokio::test]
    async fn a_full_store_refuses_a_new_ban_rather_than_forget_one() {
        let store = store(2);
        store.ban(&ban("a", None)).await.unwrap();
        store.ban(&ban("b", None)).await.unwrap();
        // Replacing an existing ban needs no room.
        store
            .ban(&ban("b", Some(Duration::from_secs(60))))
            .await
            .unwrap();
        let refused = store.ban(&ban("c", None)).await;
        assert!(
            matches!(refused, Err(StoreError::Full { capacity: 2 })),
            "{refused:?}"
        );
        let room = RoomArn::parse(ROOM).unwrap();
        assert!(
            store
                .unban(&room, &UserId::parse("a".into()).unwrap())
                .await
                .unwrap()
        );
        store.ban(&ban("c", None)).await.unwrap();
    }

    #[tokio::test]
    async fn ended_bans_make_room_and_are_not_listed() {
        let store = store(1);
        let mut ended = ban("a", None);
        ended.expires_at = Some(SystemTime::now() - Duration::from_millis(1));
        store.ban(&ended).await.unwrap();
        let room = RoomArn::parse(ROOM).unwrap();
        assert_eq!(
            store.list_bans(&room, None, 10).await.unwrap(),
            BanPage::default()
        );
        store.ban(&ban("b", None)).await.unwrap();
        assert_eq!(
            store.list_bans(&room, None, 10).await.unwrap().bans.len(),
            1
        );
    }

    #[tokio::test]
    async fn pages_cover_every_ban_once_in_digest_order() {
        let store = store(100);
        for i in 0..7 {
            store.ban(&ban(&format!("user-{i}"), None)).await.unwrap();
        }
        let room = RoomArn::parse(ROOM).unwrap();
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let page = store.list_bans(&room, after.as_ref(), 3).await.unwrap();
            assert!(page.bans.len() <= 3);
            seen.extend(page.bans.iter().map(|b| digest_hex(b.user_id.expose())));
            match page.next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        let mut sorted = seen.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(seen, sorted);
        assert_eq!(seen.len(), 7);
    }

    #[tokio::test]
    async fn a_token_id_is_used_once_until_it_expires() {
        let store = store(1);
        let until = SystemTime::now() + Duration::from_secs(60);
        assert!(store.first_use("t1", until).await.unwrap());
        assert!(!store.first_use("t1", until).await.unwrap());
        // Full of an id still in force: a second id is refused, not the first forgotten.
        assert!(matches!(
            store.first_use("t2", until).await,
            Err(StoreError::Full { .. })
        ));
    }

    #[tokio::test]
    async fn revocations_only_move_forward() {
        let store = store(10);
        let room = RoomArn::parse(ROOM).unwrap();
        let user = UserId::parse("u".into()).unwrap();
        let later = SystemTime::now();
        let earlier = later - Duration::from_secs(5);
        let keep = Duration::from_secs(60);
        store.revoke(&room, &user, later, keep).await.unwrap();
        store.revoke(&room, &user, earlier, keep).await.unwrap();
        assert_eq!(store.revoked_at(&room, &user).await.unwrap(), Some(later));
    }
}
