//! Where bans, revocations and used token ids live: the limiter store's backend.
//!
//! [`ModerationStore`] is a small sibling of [`crate::ratelimit::LimiterStore`], implemented by the same
//! backends:
//! - [`MemoryModeration`]: in process, for one replica. Bounded by `limiter.max_tracked_keys` entries per
//!   kind; when full of entries still in force, a new ban (or revocation, or used token id) is refused with
//!   RESOURCE_EXHAUSTED rather than forgetting one.
//! - [`SharedModeration`]: in Redis, shared by every replica, so a ban made through one replica is in force
//!   on every other one as soon as Redis has it (one round trip). Keys are hashed like the limits' keys;
//!   every entry lives exactly as long as it matters (the ban's end, the longest token lifetime, the token's
//!   expiry) through Redis TTLs.
//!
//! While Redis is unreachable the limiter's failure mode decides: `fail_closed` refuses moderation calls
//! *and* token requests with UNAVAILABLE (a ban cannot be checked, so nothing is issued); `fail_open`
//! answers from a local copy of every ban, revocation and used token id this replica has written or read
//! while Redis was up, so a ban it has seen is never forgotten, and writes made during the outage are kept
//! locally (and are not copied to Redis afterwards: ban again once Redis is back).

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    future::Future,
    num::NonZeroUsize,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use orion::hazardous::hash::blake2::blake2b::Blake2b;

use crate::domain::{Ban, PageToken};
use crate::ratelimit::{
    Check, FailureMode, FallbackStore, LimiterStore, StoreError, fallback::PROBE_INTERVAL,
    redis::Gate,
};
use crate::request::{RoomArn, UserId};
use crate::telemetry::metrics::metrics;

pub use crate::domain::BanPage;

/// Where bans, revocations and used token ids are kept.
pub trait ModerationStore: Send + Sync + 'static {
    /// Puts `ban` in force, replacing any ban of the same user in the same room.
    fn ban(&self, ban: &Ban) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Lifts the ban of `user_id` in `room`; `true` when one was in force.
    fn unban(
        &self,
        room: &RoomArn,
        user_id: &UserId,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// The ban of `user_id` in `room`, if one is in force.
    fn ban_of(
        &self,
        room: &RoomArn,
        user_id: &UserId,
    ) -> impl Future<Output = Result<Option<Ban>, StoreError>> + Send;

    /// Up to `limit` bans in force in `room`, after `after`.
    fn list_bans(
        &self,
        room: &RoomArn,
        after: Option<&PageToken>,
        limit: usize,
    ) -> impl Future<Output = Result<BanPage, StoreError>> + Send;

    /// Records that tokens of `user_id` for `room` issued before `at` are revoked; the record is kept for
    /// `keep_for` (the longest a token can live), after which every such token has expired anyway.
    fn revoke(
        &self,
        room: &RoomArn,
        user_id: &UserId,
        at: SystemTime,
        keep_for: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The latest revocation of `user_id`'s tokens for `room` still kept.
    fn revoked_at(
        &self,
        room: &RoomArn,
        user_id: &UserId,
    ) -> impl Future<Output = Result<Option<SystemTime>, StoreError>> + Send;

    /// Marks `token_id` used until `until` (its expiry); `true` when this is its first use.
    fn first_use(
        &self,
        token_id: &str,
        until: SystemTime,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
}

/// Bytes of BLAKE2b digest in an order key: 128 bits, as in the limiter's Redis keys.
const DIGEST_BYTES: usize = 16;

/// The lowercase hex BLAKE2b-128 digest of `value`: how user ids, rooms and token ids appear in Redis keys,
/// and the order of ListBans pages (the same in every backend).
pub(crate) fn digest_hex(value: &str) -> String {
    let mut hasher = Blake2b::new(DIGEST_BYTES).expect("16 bytes is a valid BLAKE2b size");
    hasher
        .update(value.as_bytes())
        .expect("a fresh hasher accepts input");
    let digest = hasher.finalize().expect("a fresh hasher finalizes once");
    let mut hex = String::with_capacity(2 * DIGEST_BYTES);
    for byte in digest.as_ref() {
        write!(hex, "{byte:02x}").expect("writing to a String cannot fail");
    }
    hex
}

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

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent maps behind; keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn full(&self) -> StoreError {
        StoreError::Full {
            capacity: self.capacity,
        }
    }

    fn put_ban(&self, ban: &Ban) -> Result<(), StoreError> {
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

    fn remove_ban(&self, room: &RoomArn, user_id: &UserId) -> Option<Ban> {
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

    fn get_ban(&self, room: &RoomArn, user_id: &UserId) -> Option<Ban> {
        let now = SystemTime::now();
        self.lock()
            .bans
            .get(room)?
            .get(&digest_hex(user_id.expose()))
            .filter(|ban| ban.in_force(now))
            .cloned()
    }

    fn page(&self, room: &RoomArn, after: Option<&PageToken>, limit: usize) -> BanPage {
        let now = SystemTime::now();
        let state = self.lock();
        let Some(bans) = state.bans.get(room) else {
            return BanPage::default();
        };
        let start = match after {
            Some(token) => std::ops::Bound::Excluded(token.as_str().to_owned()),
            None => std::ops::Bound::Unbounded,
        };
        let mut in_force = bans
            .range((start, std::ops::Bound::Unbounded))
            .filter(|(_, ban)| ban.in_force(now));
        let page: Vec<(&String, &Ban)> = in_force.by_ref().take(limit).collect();
        let more = in_force.next().is_some();
        BanPage {
            next: more
                .then(|| {
                    page.last()
                        .map(|(key, _)| PageToken::from_key((*key).clone()))
                })
                .flatten(),
            bans: page.into_iter().map(|(_, ban)| ban.clone()).collect(),
        }
    }

    fn put_revocation(
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

    fn get_revocation(&self, room: &RoomArn, user_id: &UserId) -> Option<SystemTime> {
        let now = SystemTime::now();
        self.lock()
            .revocations
            .get(&(room.clone(), user_id.clone()))
            .filter(|(_, forget)| *forget > now)
            .map(|(at, _)| *at)
    }

    fn mark_used(&self, token_id: &str, until: SystemTime) -> Result<bool, StoreError> {
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

impl ModerationStore for MemoryModeration {
    async fn ban(&self, ban: &Ban) -> Result<(), StoreError> {
        self.put_ban(ban)
    }

    async fn unban(&self, room: &RoomArn, user_id: &UserId) -> Result<bool, StoreError> {
        Ok(self
            .remove_ban(room, user_id)
            .is_some_and(|ban| ban.in_force(SystemTime::now())))
    }

    async fn ban_of(&self, room: &RoomArn, user_id: &UserId) -> Result<Option<Ban>, StoreError> {
        Ok(self.get_ban(room, user_id))
    }

    async fn list_bans(
        &self,
        room: &RoomArn,
        after: Option<&PageToken>,
        limit: usize,
    ) -> Result<BanPage, StoreError> {
        Ok(self.page(room, after, limit))
    }

    async fn revoke(
        &self,
        room: &RoomArn,
        user_id: &UserId,
        at: SystemTime,
        keep_for: Duration,
    ) -> Result<(), StoreError> {
        self.put_revocation(room, user_id, at, keep_for)
    }

    async fn revoked_at(
        &self,
        room: &RoomArn,
        user_id: &UserId,
    ) -> Result<Option<SystemTime>, StoreError> {
        Ok(self.get_revocation(room, user_id))
    }

    async fn first_use(&self, token_id: &str, until: SystemTime) -> Result<bool, StoreError> {
        self.mark_used(token_id, until)
    }
}

/// The Redis store with the limiter's timeout and failure mode, and the local copy that fail_open answers
/// from. Clones share everything.
#[derive(Clone)]
pub struct SharedModeration {
    /// The limiter's Redis store: its connection, timeout, outage tracking and failure mode.
    limiter: FallbackStore,
    /// Every ban, revocation and used token id this replica has written or read from Redis.
    local: MemoryModeration,
}

impl SharedModeration {
    /// Shares `limiter`'s Redis, keeping a local copy of at most `capacity` entries of each kind.
    pub fn new(limiter: FallbackStore, capacity: NonZeroUsize) -> Self {
        SharedModeration {
            limiter,
            local: MemoryModeration::new(capacity),
        }
    }

    /// What to answer when Redis did not: the local copy (fail_open) or UNAVAILABLE (fail_closed).
    fn outage(&self) -> Result<&MemoryModeration, StoreError> {
        match self.limiter.failure_mode() {
            FailureMode::FailOpen => {
                metrics().limiter_fallbacks.add(1, &[]);
                Ok(&self.local)
            }
            FailureMode::FailClosed => Err(StoreError::Unavailable {
                retry_after: PROBE_INTERVAL,
            }),
        }
    }

    /// Keeps `ban` in the local copy; a full copy is logged, not fatal: Redis has the ban.
    fn remember(&self, ban: &Ban) {
        if self.local.put_ban(ban).is_err() {
            tracing::warn!(
                capacity = self.local.capacity,
                "the local copy of bans is full; this ban is enforced only while Redis is reachable"
            );
        }
    }
}

impl SharedModeration {
    /// CreateChatToken's ban check and its rate limits together: on a single Redis node one script call,
    /// one round trip ([`crate::ratelimit::RedisStore`]). A banned user is answered with the ban and spends
    /// no budget. While Redis is down, the failure mode decides both, as [`ModerationStore::ban_of`] and
    /// the limiter do one after the other: fail_open answers from the local copy of bans and the local
    /// limits, fail_closed refuses with UNAVAILABLE.
    pub(crate) async fn check_with_ban(
        &self,
        room: &RoomArn,
        user_id: &UserId,
        checks: &[Check],
    ) -> Result<Gate, StoreError> {
        match self
            .limiter
            .redis_call(|redis| redis.check_with_ban(room, user_id, checks))
            .await
        {
            // Redis is the truth while it answers: the copy follows it, unbans made elsewhere included.
            Some(Gate::Banned(ban)) => {
                self.remember(&ban);
                Ok(Gate::Banned(ban))
            }
            Some(verdicts) => {
                self.local.remove_ban(room, user_id);
                Ok(verdicts)
            }
            None => match self.outage()?.get_ban(room, user_id) {
                Some(ban) => Ok(Gate::Banned(ban)),
                None => self.limiter.check(checks).await.map(Gate::Verdicts),
            },
        }
    }
}

impl ModerationStore for SharedModeration {
    async fn ban(&self, ban: &Ban) -> Result<(), StoreError> {
        match self.limiter.redis_call(|redis| redis.put_ban(ban)).await {
            Some(()) => {
                self.remember(ban);
                Ok(())
            }
            None => self.outage()?.put_ban(ban),
        }
    }

    async fn unban(&self, room: &RoomArn, user_id: &UserId) -> Result<bool, StoreError> {
        match self
            .limiter
            .redis_call(|redis| redis.remove_ban(room, user_id))
            .await
        {
            Some(was_banned) => {
                self.local.remove_ban(room, user_id);
                Ok(was_banned)
            }
            None => self.outage()?.unban(room, user_id).await,
        }
    }

    async fn ban_of(&self, room: &RoomArn, user_id: &UserId) -> Result<Option<Ban>, StoreError> {
        match self
            .limiter
            .redis_call(|redis| redis.get_ban(room, user_id))
            .await
        {
            // Redis is the truth while it answers: the copy follows it, unbans made elsewhere included.
            Some(Some(ban)) => {
                self.remember(&ban);
                Ok(Some(ban))
            }
            Some(None) => {
                self.local.remove_ban(room, user_id);
                Ok(None)
            }
            None => Ok(self.outage()?.get_ban(room, user_id)),
        }
    }

    async fn list_bans(
        &self,
        room: &RoomArn,
        after: Option<&PageToken>,
        limit: usize,
    ) -> Result<BanPage, StoreError> {
        match self
            .limiter
            .redis_call(|redis| redis.list_bans(room, after, limit))
            .await
        {
            Some(page) => Ok(page),
            None => Ok(self.outage()?.page(room, after, limit)),
        }
    }

    async fn revoke(
        &self,
        room: &RoomArn,
        user_id: &UserId,
        at: SystemTime,
        keep_for: Duration,
    ) -> Result<(), StoreError> {
        let written = self
            .limiter
            .redis_call(|redis| redis.put_revocation(room, user_id, at, keep_for))
            .await;
        let local = match written {
            Some(()) => &self.local,
            None => self.outage()?,
        };
        local.put_revocation(room, user_id, at, keep_for)
    }

    async fn revoked_at(
        &self,
        room: &RoomArn,
        user_id: &UserId,
    ) -> Result<Option<SystemTime>, StoreError> {
        match self
            .limiter
            .redis_call(|redis| redis.get_revocation(room, user_id))
            .await
        {
            Some(shared) => {
                let local = self.local.get_revocation(room, user_id);
                Ok(shared.max(local))
            }
            None => Ok(self.outage()?.get_revocation(room, user_id)),
        }
    }

    async fn first_use(&self, token_id: &str, until: SystemTime) -> Result<bool, StoreError> {
        match self
            .limiter
            .redis_call(|redis| redis.mark_used(token_id, until))
            .await
        {
            // Recorded locally too, so a token used before an outage cannot be used again during it.
            Some(first) => Ok(self.local.mark_used(token_id, until).unwrap_or(true) && first),
            None => self.outage()?.mark_used(token_id, until),
        }
    }
}

/// The moderation store the limiter configuration chose; one per process, clones share it.
#[derive(Clone)]
pub enum ModerationStores {
    /// In process (`limiter.backend = "memory"`).
    Memory(MemoryModeration),
    /// In Redis with a local copy (`limiter.backend = "redis"`).
    Redis(SharedModeration),
}

impl ModerationStore for ModerationStores {
    async fn ban(&self, ban: &Ban) -> Result<(), StoreError> {
        match self {
            ModerationStores::Memory(store) => store.ban(ban).await,
            ModerationStores::Redis(store) => store.ban(ban).await,
        }
    }

    async fn unban(&self, room: &RoomArn, user_id: &UserId) -> Result<bool, StoreError> {
        match self {
            ModerationStores::Memory(store) => store.unban(room, user_id).await,
            ModerationStores::Redis(store) => store.unban(room, user_id).await,
        }
    }

    async fn ban_of(&self, room: &RoomArn, user_id: &UserId) -> Result<Option<Ban>, StoreError> {
        match self {
            ModerationStores::Memory(store) => store.ban_of(room, user_id).await,
            ModerationStores::Redis(store) => store.ban_of(room, user_id).await,
        }
    }

    async fn list_bans(
        &self,
        room: &RoomArn,
        after: Option<&PageToken>,
        limit: usize,
    ) -> Result<BanPage, StoreError> {
        match self {
            ModerationStores::Memory(store) => store.list_bans(room, after, limit).await,
            ModerationStores::Redis(store) => store.list_bans(room, after, limit).await,
        }
    }

    async fn revoke(
        &self,
        room: &RoomArn,
        user_id: &UserId,
        at: SystemTime,
        keep_for: Duration,
    ) -> Result<(), StoreError> {
        match self {
            ModerationStores::Memory(store) => store.revoke(room, user_id, at, keep_for).await,
            ModerationStores::Redis(store) => store.revoke(room, user_id, at, keep_for).await,
        }
    }

    async fn revoked_at(
        &self,
        room: &RoomArn,
        user_id: &UserId,
    ) -> Result<Option<SystemTime>, StoreError> {
        match self {
            ModerationStores::Memory(store) => store.revoked_at(room, user_id).await,
            ModerationStores::Redis(store) => store.revoked_at(room, user_id).await,
        }
    }

    async fn first_use(&self, token_id: &str, until: SystemTime) -> Result<bool, StoreError> {
        match self {
            ModerationStores::Memory(store) => store.first_use(token_id, until).await,
            ModerationStores::Redis(store) => store.first_use(token_id, until).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::moderation::Reason;
    use crate::request::Caller;

    const ROOM: &str = "arn:aws:ivschat:us-west-2:123456789012:room/abc";

    fn ban(user: &str, lasts: Option<Duration>) -> Ban {
        let now = crate::moderation::whole_millis(SystemTime::now());
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
