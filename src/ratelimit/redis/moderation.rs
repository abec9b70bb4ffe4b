//! Moderation state in Redis, next to the rate limits, for [`crate::moderation::store::SharedModeration`].
//!
//! | key | type | holds | lives |
//! |---|---|---|---|
//! | `<prefix>:ban:{<room>}:<user>` | string | the ban record (JSON) | until the ban ends (no TTL: until unbanned) |
//! | `<prefix>:bans:{<room>}` | sorted set | `<user>` of every ban in the room, score 0 (ordered by digest) | as long as its longest ban |
//! | `<prefix>:rev:{<room>}:<user>` | string | when the user's tokens were revoked (µs since the epoch) | the longest token lifetime |
//! | `<prefix>:used:{<token>}` | string | `1`: the token id was verified once | until the token expires |
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

use std::{
    sync::LazyLock,
    time::{Duration, SystemTime},
};

use redis::{RedisError, RedisResult, Script};
use serde::{Deserialize, Serialize};

use super::{Connection, RedisStore, push_args, verdict};
use crate::moderation::{Ban, PageToken, Reason, store::BanPage, store::digest_hex};
use crate::ratelimit::{Check, Verdict};
use crate::request::{Caller, RoomArn, UserId};

/// Most index reads one ListBans page makes while skipping members whose ban has expired.
const MAX_LIST_ROUNDS: usize = 8;

/// Writes a ban and indexes it, in one atomic step; the index lives as long as its longest ban.
static BAN_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(BAN_SOURCE));

/// Deletes a ban and its index entry in one atomic step (a script, so it also holds in Redis Cluster,
/// where both keys share the room's slot); answers how many ban records it deleted.
static UNBAN_SCRIPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new("redis.call('ZREM', KEYS[2], ARGV[1])\nreturn redis.call('DEL', KEYS[1])")
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

/// What [`RedisStore::check_with_ban`] found: a ban in force (nothing decided, nothing spent), or the
/// verdicts on the checks.
pub(crate) enum Gate {
    /// The user is banned from the room.
    Banned(Ban),
    /// Not banned: one verdict per check.
    Verdicts(Vec<Verdict>),
}

fn parse_record(json: &str) -> RedisResult<Ban> {
    serde_json::from_str::<BanRecord>(json)
        .map_err(|_| corrupt("a ban record that is not JSON"))?
        .into_ban()
}

impl RedisStore {
    fn ban_key(&self, room_tag: &str, user: &str) -> String {
        format!("{}:ban:{{{room_tag}}}:{user}", self.prefix)
    }

    fn index_key(&self, room_tag: &str) -> String {
        format!("{}:bans:{{{room_tag}}}", self.prefix)
    }

    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> RedisResult<T> {
        match &self.connection {
            Connection::Single(connection) => cmd.query_async(&mut connection.clone()).await,
            Connection::Cluster(connection) => cmd.query_async(&mut connection.clone()).await,
        }
    }

    /// Puts `ban` in force: the record with the ban's TTL, and its index entry.
    pub(crate) async fn put_ban(&self, ban: &Ban) -> RedisResult<()> {
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
        let _: i64 = match &self.connection {
            Connection::Single(connection) => {
                invocation.invoke_async(&mut connection.clone()).await?
            }
            Connection::Cluster(connection) => {
                invocation.invoke_async(&mut connection.clone()).await?
            }
        };
        Ok(())
    }

    /// Lifts the ban; `true` when one was in force.
    pub(crate) async fn remove_ban(&self, room: &RoomArn, user_id: &UserId) -> RedisResult<bool> {
        let room = digest_hex(room.as_str());
        let user = digest_hex(user_id.expose());
        let mut invocation = UNBAN_SCRIPT.key(self.ban_key(&room, &user));
        invocation.key(self.index_key(&room)).arg(&user);
        let deleted: u32 = match &self.connection {
            Connection::Single(connection) => {
                invocation.invoke_async(&mut connection.clone()).await?
            }
            Connection::Cluster(connection) => {
                invocation.invoke_async(&mut connection.clone()).await?
            }
        };
        Ok(deleted == 1)
    }

    /// The ban in force, if any.
    pub(crate) async fn get_ban(
        &self,
        room: &RoomArn,
        user_id: &UserId,
    ) -> RedisResult<Option<Ban>> {
        let key = self.ban_key(&digest_hex(room.as_str()), &digest_hex(user_id.expose()));
        let record: Option<String> = self.query(redis::cmd("GET").arg(key)).await?;
        let ban = record.as_deref().map(parse_record).transpose()?;
        Ok(ban.filter(|ban| ban.in_force(SystemTime::now())))
    }

    /// The ban of `user_id` in `room` if one is in force, else the verdicts on `checks`: on a single node one
    /// script call reads the ban record and, only when there is none, decides the checks (a banned user
    /// spends nothing). In a cluster the ban record's slot is its room's, so it is read first, then the
    /// checks are decided as [`RedisStore::check`] does.
    pub(crate) async fn check_with_ban(
        &self,
        room: &RoomArn,
        user_id: &UserId,
        checks: &[Check],
    ) -> RedisResult<Gate> {
        let Connection::Single(connection) = &self.connection else {
            return Ok(match self.get_ban(room, user_id).await? {
                Some(ban) => Gate::Banned(ban),
                None => Gate::Verdicts(self.check(checks).await?),
            });
        };
        let mut invocation = self.script.prepare_invoke();
        invocation
            .key(self.ban_key(&digest_hex(room.as_str()), &digest_hex(user_id.expose())))
            .arg("1");
        for check in checks {
            invocation.key(self.redis_key(&check.key));
            push_args(&mut invocation, check);
        }
        match invocation.invoke_async(&mut connection.clone()).await? {
            redis::Value::BulkString(record) => {
                let record = std::str::from_utf8(&record)
                    .map_err(|_| corrupt("a ban record that is not UTF-8"))?;
                let ban = parse_record(record)?;
                if ban.in_force(SystemTime::now()) {
                    return Ok(Gate::Banned(ban));
                }
                // Redis still holds a ban this host's clock says has ended (the record's TTL and the
                // clock disagree by a moment): not banned, and nothing was decided yet.
                Ok(Gate::Verdicts(self.check(checks).await?))
            }
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
                    .map(Gate::Verdicts)
            }
            _ => Err(corrupt(
                "the rate-limit script answered neither verdicts nor a ban",
            )),
        }
    }

    /// Up to `limit` bans after `after`, dropping index entries whose ban has ended.
    pub(crate) async fn list_bans(
        &self,
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
            let members: Vec<String> = self
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
            let records: Vec<Option<String>> = self.query(redis::cmd("MGET").arg(&keys)).await?;
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
                        return self.drop_ended(&index, ended).await.map(|()| page);
                    }
                    None => {
                        ended.push(member.clone());
                        cursor = Some(member.clone());
                    }
                }
            }
            self.drop_ended(&index, ended).await?;
            if members.len() < want {
                return Ok(page);
            }
        }
        // Many ended bans in a row: hand back what was found and where to go on.
        page.next = cursor.map(PageToken::from_key);
        Ok(page)
    }

    async fn drop_ended(&self, index: &str, ended: Vec<String>) -> RedisResult<()> {
        if ended.is_empty() {
            return Ok(());
        }
        self.query(redis::cmd("ZREM").arg(index).arg(ended)).await
    }

    fn revocation_key(&self, room: &RoomArn, user_id: &UserId) -> String {
        format!(
            "{}:rev:{{{}}}:{}",
            self.prefix,
            digest_hex(room.as_str()),
            digest_hex(user_id.expose())
        )
    }

    /// Records the revocation instant, kept for `keep_for`.
    pub(crate) async fn put_revocation(
        &self,
        room: &RoomArn,
        user_id: &UserId,
        at: SystemTime,
        keep_for: Duration,
    ) -> RedisResult<()> {
        self.query(
            redis::cmd("SET")
                .arg(self.revocation_key(room, user_id))
                .arg(micros(at))
                .arg("PX")
                .arg((keep_for.as_millis() as u64).max(1)),
        )
        .await
    }

    /// The revocation instant, if one is kept.
    pub(crate) async fn get_revocation(
        &self,
        room: &RoomArn,
        user_id: &UserId,
    ) -> RedisResult<Option<SystemTime>> {
        let at: Option<u64> = self
            .query(redis::cmd("GET").arg(self.revocation_key(room, user_id)))
            .await?;
        Ok(at.map(|us| SystemTime::UNIX_EPOCH + Duration::from_micros(us)))
    }

    /// Marks the token id used until `until`; `true` on its first use.
    pub(crate) async fn mark_used(&self, token_id: &str, until: SystemTime) -> RedisResult<bool> {
        let ttl = until
            .duration_since(SystemTime::now())
            .map_or(1, |left| (left.as_millis() as u64).max(1));
        let key = format!("{}:used:{{{}}}", self.prefix, digest_hex(token_id));
        let set: Option<String> = self
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
