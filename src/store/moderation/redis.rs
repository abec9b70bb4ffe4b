//! [`RedisModeration`]: moderation state in Redis, next to the rate limits, shared by every replica, so a
//! ban made through one replica is in force on every other one as soon as Redis has it (one round trip).
//!
//! | key | type | holds | lives |
//! |---|---|---|---|
//! | `<prefix>:ban:{<room>}:<user>` | string | the ban record (JSON) | until the ban ends (no TTL: until unbanned) |
//! | `<prefix>:bans:{<room>}` | sorted set | `<user>` of every ban in the room, score 0 (ordered by digest) | as long as its longest ban |
//! | `<prefix>:rev:{<room>}:<user>` | string | when the user's tokens were revoked (µs since the epoch); only moves forward | the longest token lifetime plus the verify leeway |
//! | `<prefix>:used:{<token>}` | string | `1`: the token id was verified once | until the token's last valid instant (expiry plus leeway), at least 1 s |
//!
//! `<room>`, `<user>` and `<token>` are BLAKE2b-128 digests (hex) of the room ARN, user id and token id: no
//! key names a user. The room digest is the hash tag, so in Redis Cluster a room's bans and its index share a
//! slot and change together atomically.
//!
//! The ban *record* holds the user id, who banned them and why, in clear: ListBans must show moderators
//! whom a ban is about, and a digest cannot be listed. It is moderators' data about a user, kept only while
//! the ban lasts, in the same Redis (and under the same access control) as the rate limits; a deployment
//! that may not keep user ids in Redis should use user ids that are already pseudonymous.
//!
//! The index is cleaned as it is read: ListBans drops members whose ban record has expired.

//! While Redis is unreachable the failure mode decides: `fail_closed` refuses moderation calls *and*
//! token requests with UNAVAILABLE (a ban cannot be checked, so nothing is issued); `fail_open` answers
//! from a local copy of every ban, revocation and used token id this replica has written or read while
//! Redis was up, so a ban it has seen is never forgotten, and writes made during the outage are kept
//! locally (and are not copied to Redis afterwards: ban again once Redis is back).
//!
//! [`BanGate`] is CreateChatToken's ban check and rate limits in one script call on a single node.

use std::{
    sync::LazyLock,
    time::{Duration, SystemTime},
};

use redis::{RedisError, RedisResult, Script};
use serde::{Deserialize, Serialize};

use super::{MemoryModeration, ModerationStore};
use crate::domain::{Ban, BanPage, Caller, PageToken, Reason, RoomArn, UserId};
use crate::key::digest_hex;
use crate::store::{
    StoreError,
    limits::{Check, LimiterStore, RedisLimits, Verdict, redis::AfterBan},
    redis::{Connection, SharedRedis},
};

/// Most index reads one ListBans page makes while skipping members whose ban has expired.
const MAX_LIST_ROUNDS: usize = 8;

/// Writes a ban and indexes it, in one atomic step; the index lives as long as its longest ban.
static BAN_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(BAN_SOURCE));

/// Deletes a ban and its index entry in one atomic step (a script, so it also holds in Redis Cluster,
/// where both keys share the room's slot); answers how many ban records it deleted.
static UNBAN_SCRIPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new("redis.call('ZREM', KEYS[2], ARGV[1])\nreturn redis.call('DEL', KEYS[1])")
});

/// Records a revocation unless a later one is kept: revocations only move forward, as in memory, so a
/// late write from a slower replica never un-revokes tokens. Answers 1 when it wrote.
static REVOKE_SCRIPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "local kept = tonumber(redis.call('GET', KEYS[1]))\n\
         if kept and kept >= tonumber(ARGV[1]) then return 0 end\n\
         redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])\n\
         return 1",
    )
});

const BAN_SOURCE: &str = r"
-- KEYS[1] ban record, KEYS[2] the room's index; ARGV[1] record, ARGV[2] member, ARGV[3] ms to live (0: until unbanned)
local ttl = tonumber(ARGV[3])
local index_ttl = redis.call('PTTL', KEYS[2])
redis.call('ZADD', KEYS[2], 0, ARGV[2])
if ttl == 0 then
  redis.call('SET', KEYS[1], ARGV[1])
  redis.call('PERSIST', KEYS[2])
else
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
  -- -2: the index is new; -1: it holds a ban until unbanned and must stay.
  if index_ttl == -2 or (index_ttl >= 0 and index_ttl < ttl) then
    redis.call('PEXPIRE', KEYS[2], ttl)
  end
end
return 1
";

/// A ban as stored: times in milliseconds since the epoch.
#[derive(Serialize, Deserialize)]
struct BanRecord {
    room: String,
    user: String,
    by: String,
    at: u64,
    until: Option<u64>,
    reason: String,
}

fn millis(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

fn micros(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as u64
}

fn corrupt(what: &'static str) -> RedisError {
    RedisError::from((redis::ErrorKind::UnexpectedReturnType, what))
}

impl BanRecord {
    fn from_ban(ban: &Ban) -> Self {
        BanRecord {
            room: ban.room.as_str().to_owned(),
            user: ban.user_id.expose().to_owned(),
            by: ban.banned_by.id().to_owned(),
            at: millis(ban.created_at),
            until: ban.expires_at.map(millis),
            reason: ban.reason.expose().to_owned(),
        }
    }

    fn into_ban(self) -> RedisResult<Ban> {
        let at = |ms: u64| SystemTime::UNIX_EPOCH + Duration::from_millis(ms);
        Ok(Ban {
            room: RoomArn::parse(&self.room).map_err(|_| corrupt("a ban record's room"))?,
            user_id: UserId::parse(self.user).map_err(|_| corrupt("a ban record's user"))?,
            banned_by: Caller::new(self.by),
            created_at: at(self.at),
            expires_at: self.until.map(at),
            reason: Reason::parse(self.reason).map_err(|_| corrupt("a ban record's reason"))?,
        })
    }
}

fn parse_record(json: &str) -> RedisResult<Ban> {
    serde_json::from_str::<BanRecord>(json)
        .map_err(|_| corrupt("a ban record that is not JSON"))?
        .into_ban()
}

/// Bans, revocations and used token ids in Redis, with the shared connection's timeout and failure mode,
/// and the local copy that fail_open answers from. Clones share everything.
#[derive(Clone)]
pub struct RedisModeration {
    /// The connection, its timeout and failure mode, shared with the rate limits.
    redis: SharedRedis,
    /// Every ban, revocation and used token id this replica has written or read from Redis.
    local: MemoryModeration,
}

impl RedisModeration {
    /// Moderation state in `redis`, with `local` as the copy fail_open answers from.
    pub fn new(redis: SharedRedis, local: MemoryModeration) -> Self {
        RedisModeration { redis, local }
    }

    /// Keeps `ban` in the local copy; a full copy is logged, not fatal: Redis has the ban.
    async fn remember(&self, ban: &Ban) {
        if self.local.ban(ban).await.is_err() {
            tracing::warn!(
                capacity = self.local.capacity(),
                "the local copy of bans is full; this ban is enforced only while Redis is reachable"
            );
        }
    }

    fn ban_key(&self, room_tag: &str, user: &str) -> String {
        format!("{}:ban:{{{room_tag}}}:{user}", self.redis.prefix())
    }

    fn index_key(&self, room_tag: &str) -> String {
        format!("{}:bans:{{{room_tag}}}", self.redis.prefix())
    }

    fn revocation_key(&self, room: &RoomArn, user_id: &UserId) -> String {
        format!(
            "{}:rev:{{{}}}:{}",
            self.redis.prefix(),
            digest_hex(room.as_str()),
            digest_hex(user_id.expose())
        )
    }
}

/// The Redis commands, on the connection a [`SharedRedis::call`] hands over.
impl RedisModeration {
    /// Puts `ban` in force: the record with the ban's TTL, and its index entry.
    async fn put_ban_in(&self, connection: &Connection, ban: &Ban) -> RedisResult<()> {
        let room = digest_hex(ban.room.as_str());
        let user = digest_hex(ban.user_id.expose());
        let ttl_ms = match ban.expires_at {
            None => 0,
            Some(end) => match end.duration_since(SystemTime::now()) {
                Ok(left) => (left.as_millis() as u64).max(1),
                // Already over: nothing to keep.
                Err(_) => return Ok(()),
            },
        };
        let record = serde_json::to_string(&BanRecord::from_ban(ban))
            .map_err(|_| corrupt("a ban that cannot be encoded"))?;
        let mut invocation = BAN_SCRIPT.key(self.ban_key(&room, &user));
        invocation
            .key(self.index_key(&room))
            .arg(record)
            .arg(&user)
            .arg(ttl_ms);
        let _: i64 = connection.invoke(&invocation).await?;
        Ok(())
    }

    /// Lifts the ban; `true` when one was in force.
    async fn remove_ban_in(
        &self,
        connection: &Connection,
        room: &RoomArn,
        user_id: &UserId,
    ) -> RedisResult<bool> {
        let room = digest_hex(room.as_str());
        let user = digest_hex(user_id.expose());
        let mut invocation = UNBAN_SCRIPT.key(self.ban_key(&room, &user));
        invocation.key(self.index_key(&room)).arg(&user);
        let deleted: u32 = connection.invoke(&invocation).await?;
        Ok(deleted == 1)
    }

    /// The ban in force, if any.
    async fn get_ban_in(
        &self,
        connection: &Connection,
        room: &RoomArn,
        user_id: &UserId,
    ) -> RedisResult<Option<Ban>> {
        let key = self.ban_key(&digest_hex(room.as_str()), &digest_hex(user_id.expose()));
        let record: Option<String> = connection.query(redis::cmd("GET").arg(key)).await?;
        let ban = record.as_deref().map(parse_record).transpose()?;
        Ok(ban.filter(|ban| ban.in_force(SystemTime::now())))
    }

    /// Up to `limit` bans after `after`, dropping index entries whose ban has ended.
    async fn list_bans_in(
        &self,
        connection: &Connection,
        room: &RoomArn,
        after: Option<&PageToken>,
        limit: usize,
    ) -> RedisResult<BanPage> {
        let room_tag = digest_hex(room.as_str());
        let index = self.index_key(&room_tag);
        let mut cursor = after.map(|token| token.as_str().to_owned());
        let mut page = BanPage::default();
        let now = SystemTime::now();
        for _ in 0..MAX_LIST_ROUNDS {
            // One more than wanted: whether there is a next page.
            let want = limit - page.bans.len() + 1;
            let start = cursor
                .as_ref()
                .map_or_else(|| "-".to_owned(), |c| format!("({c}"));
            let members: Vec<String> = connection
                .query(
                    redis::cmd("ZRANGEBYLEX")
                        .arg(&index)
                        .arg(start)
                        .arg("+")
                        .arg("LIMIT")
                        .arg(0)
                        .arg(want),
                )
                .await?;
            if members.is_empty() {
                return Ok(page);
            }
            let keys: Vec<String> = members.iter().map(|m| self.ban_key(&room_tag, m)).collect();
            let records: Vec<Option<String>> =
                connection.query(redis::cmd("MGET").arg(&keys)).await?;
            let mut ended = Vec::new();
            for (member, record) in members.iter().zip(records) {
                let ban = record.as_deref().map(parse_record).transpose()?;
                match ban.filter(|ban| ban.in_force(now)) {
                    Some(ban) if page.bans.len() < limit => {
                        page.bans.push(ban);
                        cursor = Some(member.clone());
                    }
                    Some(_) => {
                        page.next = cursor.map(PageToken::from_key);
                        return drop_ended(connection, &index, ended).await.map(|()| page);
                    }
                    None => {
                        ended.push(member.clone());
                        cursor = Some(member.clone());
                    }
                }
            }
            drop_ended(connection, &index, ended).await?;
            if members.len() < want {
                return Ok(page);
            }
        }
        // Many ended bans in a row: hand back what was found and where to go on.
        page.next = cursor.map(PageToken::from_key);
        Ok(page)
    }

    /// Records the revocation instant, kept for `keep_for` (whole milliseconds, rounded up), unless a
    /// later one is kept.
    async fn put_revocation_in(
        &self,
        connection: &Connection,
        room: &RoomArn,
        user_id: &UserId,
        at: SystemTime,
        keep_for: Duration,
    ) -> RedisResult<()> {
        let mut invocation = REVOKE_SCRIPT.key(self.revocation_key(room, user_id));
        invocation.arg(micros(at)).arg(ceil_millis(keep_for).max(1));
        let _wrote: u32 = connection.invoke(&invocation).await?;
        Ok(())
    }

    /// The revocation instant, if one is kept.
    async fn get_revocation_in(
        &self,
        connection: &Connection,
        room: &RoomArn,
        user_id: &UserId,
    ) -> RedisResult<Option<SystemTime>> {
        let at: Option<u64> = connection
            .query(redis::cmd("GET").arg(self.revocation_key(room, user_id)))
            .await?;
        Ok(at.map(|us| SystemTime::UNIX_EPOCH + Duration::from_micros(us)))
    }

    /// Marks the token id used until `until`; `true` on its first use.
    async fn mark_used_in(
        &self,
        connection: &Connection,
        token_id: &str,
        until: SystemTime,
    ) -> RedisResult<bool> {
        // Until `until` (rounded up to the millisecond), and never less than a second: a token verified at
        // its last instant keeps its record past it, never a millisecond's.
        let ttl = until
            .duration_since(SystemTime::now())
            .map_or(0, ceil_millis)
            .max(MIN_USED_RECORD_MS);
        let key = format!("{}:used:{{{}}}", self.redis.prefix(), digest_hex(token_id));
        let set: Option<String> = connection
            .query(
                redis::cmd("SET")
                    .arg(key)
                    .arg(1)
                    .arg("NX")
                    .arg("PX")
                    .arg(ttl),
            )
            .await?;
        Ok(set.is_some())
    }
}

/// The shortest a used-token record lives in Redis, in milliseconds.
const MIN_USED_RECORD_MS: u64 = 1000;

/// `duration` in whole milliseconds, rounded up.
fn ceil_millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX)
}

async fn drop_ended(connection: &Connection, index: &str, ended: Vec<String>) -> RedisResult<()> {
    if ended.is_empty() {
        return Ok(());
    }
    connection
        .query(redis::cmd("ZREM").arg(index).arg(ended))
        .await
}

impl ModerationStore for RedisModeration {
    async fn ban(&self, ban: &Ban) -> Result<(), StoreError> {
        match self.redis.call(|c| self.put_ban_in(c, ban)).await {
            Some(()) => {
                self.remember(ban).await;
                Ok(())
            }
            None => self.redis.outage(&self.local)?.ban(ban).await,
        }
    }

    async fn unban(&self, room: &RoomArn, user_id: &UserId) -> Result<bool, StoreError> {
        match self
            .redis
            .call(|c| self.remove_ban_in(c, room, user_id))
            .await
        {
            Some(was_banned) => {
                self.local.remove(room, user_id);
                Ok(was_banned)
            }
            None => self.redis.outage(&self.local)?.unban(room, user_id).await,
        }
    }

    async fn ban_of(&self, room: &RoomArn, user_id: &UserId) -> Result<Option<Ban>, StoreError> {
        match self.redis.call(|c| self.get_ban_in(c, room, user_id)).await {
            // Redis is the truth while it answers: the copy follows it, unbans made elsewhere included.
            Some(Some(ban)) => {
                self.remember(&ban).await;
                Ok(Some(ban))
            }
            Some(None) => {
                self.local.remove(room, user_id);
                Ok(None)
            }
            None => self.redis.outage(&self.local)?.ban_of(room, user_id).await,
        }
    }

    async fn list_bans(
        &self,
        room: &RoomArn,
        after: Option<&PageToken>,
        limit: usize,
    ) -> Result<BanPage, StoreError> {
        match self
            .redis
            .call(|c| self.list_bans_in(c, room, after, limit))
            .await
        {
            Some(page) => Ok(page),
            None => {
                self.redis
                    .outage(&self.local)?
                    .list_bans(room, after, limit)
                    .await
            }
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
            .redis
            .call(|c| self.put_revocation_in(c, room, user_id, at, keep_for))
            .await;
        let local = match written {
            Some(()) => &self.local,
            None => self.redis.outage(&self.local)?,
        };
        local.revoke(room, user_id, at, keep_for).await
    }

    async fn revoked_at(
        &self,
        room: &RoomArn,
        user_id: &UserId,
    ) -> Result<Option<SystemTime>, StoreError> {
        match self
            .redis
            .call(|c| self.get_revocation_in(c, room, user_id))
            .await
        {
            Some(shared) => Ok(shared.max(self.local.revoked_at(room, user_id).await?)),
            None => {
                self.redis
                    .outage(&self.local)?
                    .revoked_at(room, user_id)
                    .await
            }
        }
    }

    async fn first_use(&self, token_id: &str, until: SystemTime) -> Result<bool, StoreError> {
        match self
            .redis
            .call(|c| self.mark_used_in(c, token_id, until))
            .await
        {
            // Recorded locally too, so a token used before an outage cannot be used again during it.
            Some(first) => Ok(self.local.first_use(token_id, until).await.unwrap_or(true) && first),
            None => {
                self.redis
                    .outage(&self.local)?
                    .first_use(token_id, until)
                    .await
            }
        }
    }
}

/// CreateChatToken's ban check and its rate limits together, on a single Redis node: one script call, one
/// round trip. A banned user is answered with the ban and spends no budget. While Redis is down the
/// failure mode decides both, as [`ModerationStore::ban_of`] and the limits would one after the other:
/// fail_open answers from the local copy of bans and the local limits, fail_closed refuses with
/// UNAVAILABLE. In a Redis Cluster the ban record lives in its room's slot, not the limits' slots, so there
/// is no gate: the ban check is a layer of its own (two round trips).
#[derive(Clone)]
pub struct BanGate {
    moderation: RedisModeration,
    limits: RedisLimits,
}

/// What [`BanGate::check`] found.
#[derive(Debug)]
pub enum Gated {
    /// The user is banned from the room: nothing was decided, nothing spent.
    Banned(Ban),
    /// Not banned: one verdict per check.
    Verdicts(Vec<Verdict>),
}

impl BanGate {
    /// The gate over `moderation` and `limits`, which share one single-node Redis.
    pub fn new(moderation: RedisModeration, limits: RedisLimits) -> Self {
        BanGate { moderation, limits }
    }

    /// The ban of `user_id` in `room` if one is in force, else the verdicts on `checks`.
    pub async fn check(
        &self,
        room: &RoomArn,
        user_id: &UserId,
        checks: &[Check],
    ) -> Result<Gated, StoreError> {
        let moderation = &self.moderation;
        let answer = moderation
            .redis
            .call(|connection| async move {
                let key =
                    moderation.ban_key(&digest_hex(room.as_str()), &digest_hex(user_id.expose()));
                match self.limits.check_after_ban(connection, key, checks).await? {
                    AfterBan::Verdicts(verdicts) => Ok(Gated::Verdicts(verdicts)),
                    AfterBan::Banned(record) => {
                        let record = std::str::from_utf8(&record)
                            .map_err(|_| corrupt("a ban record that is not UTF-8"))?;
                        let ban = parse_record(record)?;
                        if ban.in_force(SystemTime::now()) {
                            return Ok(Gated::Banned(ban));
                        }
                        // Redis still holds a ban this host's clock says has ended (the record's TTL and
                        // the clock disagree by a moment): not banned, and nothing was decided yet.
                        Ok(Gated::Verdicts(
                            self.limits.decide(connection, checks).await?,
                        ))
                    }
                }
            })
            .await;
        match answer {
            // Redis is the truth while it answers: the copy follows it, unbans made elsewhere included.
            Some(Gated::Banned(ban)) => {
                moderation.remember(&ban).await;
                Ok(Gated::Banned(ban))
            }
            Some(verdicts) => {
                moderation.local.remove(room, user_id);
                Ok(verdicts)
            }
            None => match moderation
                .redis
                .outage(&moderation.local)?
                .ban_of(room, user_id)
                .await?
            {
                Some(ban) => Ok(Gated::Banned(ban)),
                None => self.limits.check(checks).await.map(Gated::Verdicts),
            },
        }
    }
}
