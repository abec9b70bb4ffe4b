//! The [`ModerationStore`] contract, run against every backend: in memory, shared through a real Redis,
//! and through a Redis Cluster (the Redis on 127.0.0.1:6379 when it answers, else our own; a cluster is
//! always our own; without redis-server these fail, never skip). A new store, or a new operation on one,
//! passes the same functions.
//!
//! Each store is built as the app builds it ([`Backend::new`]) and, for Redis, twice on the same Redis and
//! key prefix: two replicas. One writes (bans, revokes, uses a token) and the other reads, so only what
//! Redis keeps can carry the answer (each replica also keeps a local copy of what it wrote). In memory the
//! "other replica" is a clone of the same store: that backend shares nothing between processes.
//!
//! Time windows are tested at their edges in real time (the stores read the wall clock): a store is asked
//! again and again until the edge, every answer given wholly before it must be the "before" answer, and the
//! first question asked just after it must get the "after" answer ([`across`]). Nothing depends on how fast
//! the machine is, except that some answer must come within [`CLOSE`] of the edge.

mod common;

use std::{
    fmt::Debug,
    future::Future,
    time::{Duration, SystemTime},
};

use chat_token_service::{
    config::{Config, FailureMode, LimiterBackend, RedisUrl},
    domain::{
        Ban, Caller, Error, PageToken, Reason, RoomArn, TokenClaims, TokenRejection, UserId,
        moderation::whole_millis,
    },
    issuer::{
        Moderator,
        local::{LocalModerator, VERIFY_LEEWAY},
    },
    store::{Backend, ModerationStore, StoreError},
};
use common::redis_server::{RedisServer, unique_prefix};

const ROOM: &str = "arn:aws:ivschat:us-west-2:123456789012:room/contract";
const OTHER_ROOM: &str = "arn:aws:ivschat:us-west-2:123456789012:room/elsewhere";

/// The latest an answer before an edge may come and still show the store's state just before it.
const CLOSE: Duration = Duration::from_millis(500);

/// Pause between two questions while waiting for an edge.
const POLL: Duration = Duration::from_millis(10);

fn room(arn: &str) -> RoomArn {
    RoomArn::parse(arn).unwrap()
}

fn user(id: &str) -> UserId {
    UserId::parse(id.into()).unwrap()
}

/// A ban of `id` in `arn` made now, to the millisecond as stores keep it, ending after `lasts`.
fn ban(arn: &str, id: &str, lasts: Option<Duration>, why: &str) -> Ban {
    let now = whole_millis(SystemTime::now());
    Ban {
        room: room(arn),
        user_id: user(id),
        banned_by: Caller::new("moderator"),
        created_at: now,
        expires_at: lasts.map(|d| now + d),
        reason: Reason::parse(why.into()).unwrap(),
    }
}

/// The two replicas of a store: `writer` changes state, `reader` sees it; `fresh` builds another one that
/// has seen nothing, for questions a replica's local copy would answer after a first look (used ids).
struct Replicas<M> {
    writer: M,
    reader: M,
    fresh: Box<dyn Fn() -> M>,
}

/// Where the stores live.
enum Shared<'a> {
    Memory,
    Redis(&'a RedisServer),
    Cluster(&'a RedisServer),
}

/// The limiter settings the app would read for `shared`, one key prefix for both replicas.
fn config(shared: &Shared, prefix: &str) -> Config {
    let mut config = Config::default();
    let redis = match shared {
        Shared::Memory => return config,
        Shared::Redis(redis) => redis,
        Shared::Cluster(redis) => {
            config.limiter.redis_cluster = true;
            redis
        }
    };
    config.limiter.backend = LimiterBackend::Redis;
    config.limiter.redis_url = Some(RedisUrl::parse(&redis.url()).unwrap());
    config.limiter.key_prefix = prefix.to_owned();
    // Decided in Redis or not at all: a store that fell back in process would not be under test.
    config.limiter.failure_mode = FailureMode::FailClosed;
    config.limiter.redis_timeout = Duration::from_secs(2);
    config
}

/// Runs `test` on two replicas of the moderation store `shared` names.
async fn with_replicas<F, Fut>(shared: Shared<'_>, test: F)
where
    F: FnOnce(Replicas<Store>) -> Fut,
    Fut: Future<Output = ()>,
{
    let config = config(&shared, &unique_prefix());
    let build = move || match Backend::new(&config.limiter).expect("no TLS files to read") {
        Backend::Memory(stores) => Store::Memory(stores.moderation),
        Backend::Redis(stores) => Store::Redis(stores.moderation),
    };
    let replicas = match (&shared, build()) {
        (Shared::Memory, Store::Memory(store)) => Replicas {
            reader: Store::Memory(store.clone()),
            writer: Store::Memory(store.clone()),
            fresh: Box::new(move || Store::Memory(store.clone())),
        },
        (Shared::Redis(_) | Shared::Cluster(_), writer @ Store::Redis(_)) => Replicas {
            writer,
            reader: build(),
            fresh: Box::new(build),
        },
        _ => panic!("the backend configured was not built"),
    };
    test(replicas).await;
}

/// Either store, so one test body runs on both.
#[derive(Clone)]
enum Store {
    Memory(chat_token_service::store::moderation::MemoryModeration),
    Redis(chat_token_service::store::moderation::RedisModeration),
}

macro_rules! on {
    ($store:expr, $s:ident => $call:expr) => {
        match $store {
            Store::Memory($s) => $call.await,
            Store::Redis($s) => $call.await,
        }
    };
}

impl ModerationStore for Store {
    async fn ban(&self, ban: &Ban) -> Result<(), StoreError> {
        on!(self, s => s.ban(ban))
    }
    async fn unban(&self, room: &RoomArn, user_id: &UserId) -> Result<bool, StoreError> {
        on!(self, s => s.unban(room, user_id))
    }
    async fn ban_of(&self, room: &RoomArn, user_id: &UserId) -> Result<Option<Ban>, StoreError> {
        on!(self, s => s.ban_of(room, user_id))
    }
    async fn list_bans(
        &self,
        room: &RoomArn,
        after: Option<&PageToken>,
        limit: usize,
    ) -> Result<chat_token_service::domain::BanPage, StoreError> {
        on!(self, s => s.list_bans(room, after, limit))
    }
    async fn revoke(
        &self,
        room: &RoomArn,
        user_id: &UserId,
        at: SystemTime,
        keep_for: Duration,
    ) -> Result<(), StoreError> {
        on!(self, s => s.revoke(room, user_id, at, keep_for))
    }
    async fn revoked_at(
        &self,
        room: &RoomArn,
        user_id: &UserId,
    ) -> Result<Option<SystemTime>, StoreError> {
        on!(self, s => s.revoked_at(room, user_id))
    }
    async fn first_use(&self, token_id: &str, until: SystemTime) -> Result<bool, StoreError> {
        on!(self, s => s.first_use(token_id, until))
    }
}

/// Every page of `room`'s bans, `limit` at a time, as the reader lists them: each page's user ids.
async fn pages(store: &impl ModerationStore, arn: &str, limit: usize) -> Vec<Vec<String>> {
    let mut pages = Vec::new();
    let mut after = None;
    // Bounded: a store whose next-page token never ends fails here instead of looping.
    for _ in 0..100 {
        let page = store
            .list_bans(&room(arn), after.as_ref(), limit)
            .await
            .unwrap();
        assert!(page.bans.len() <= limit, "a page of {limit} held more");
        pages.push(
            page.bans
                .iter()
                .map(|b| b.user_id.expose().to_owned())
                .collect(),
        );
        match page.next {
            Some(next) => after = Some(next),
            None => return pages,
        }
    }
    panic!("ListBans never reached its last page");
}

/// Bans: put in force, seen by the other replica, replaced, kept apart by room and user, lifted; pages
/// cover every ban once at every page size, and end where the bans end.
async fn bans_contract(Replicas { writer, reader, .. }: Replicas<Store>) {
    let (lobby, other) = (room(ROOM), room(OTHER_ROOM));

    // A ban until unbanned, seen by the other replica exactly as made; its user only, its room only.
    let forever = ban(ROOM, "ann", None, "spam");
    assert_eq!(reader.ban_of(&lobby, &user("ann")).await.unwrap(), None);
    writer.ban(&forever).await.unwrap();
    assert_eq!(
        reader.ban_of(&lobby, &user("ann")).await.unwrap(),
        Some(forever.clone())
    );
    assert_eq!(reader.ban_of(&lobby, &user("bob")).await.unwrap(), None);
    assert_eq!(reader.ban_of(&other, &user("ann")).await.unwrap(), None);

    // Banning again replaces the ban: one ban, the new one.
    let replaced = ban(ROOM, "ann", Some(Duration::from_secs(3600)), "flood");
    writer.ban(&replaced).await.unwrap();
    assert_eq!(
        reader.ban_of(&lobby, &user("ann")).await.unwrap(),
        Some(replaced.clone())
    );
    assert_eq!(
        reader.list_bans(&lobby, None, 10).await.unwrap().bans,
        [replaced]
    );

    // A ban that has already ended is not in force, not listed, and there is nothing to lift.
    writer
        .ban(&Ban {
            expires_at: Some(SystemTime::now() - Duration::from_millis(1)),
            ..ban(ROOM, "over", None, "old")
        })
        .await
        .unwrap();
    assert_eq!(reader.ban_of(&lobby, &user("over")).await.unwrap(), None);
    assert!(!reader.unban(&lobby, &user("over")).await.unwrap());

    // Unban lifts it at once, for every replica, and says whether there was one.
    assert!(!writer.unban(&lobby, &user("bob")).await.unwrap());
    assert!(reader.unban(&lobby, &user("ann")).await.unwrap());
    assert_eq!(writer.ban_of(&lobby, &user("ann")).await.unwrap(), None);
    assert_eq!(reader.ban_of(&lobby, &user("ann")).await.unwrap(), None);
    assert!(!writer.unban(&lobby, &user("ann")).await.unwrap());
    assert_eq!(pages(&reader, ROOM, 10).await, [Vec::<String>::new()]);

    // Paging: 7 bans (and one in another room) at every page size from 1 to past the end.
    let users: Vec<String> = (0..7).map(|i| format!("user-{i}")).collect();
    for id in &users {
        writer.ban(&ban(ROOM, id, None, "spam")).await.unwrap();
    }
    writer
        .ban(&ban(OTHER_ROOM, "user-0", None, "spam"))
        .await
        .unwrap();
    let everyone = pages(&reader, ROOM, 100).await;
    assert_eq!(everyone.len(), 1, "one page holds them all: {everyone:?}");
    let order = everyone[0].clone();
    let mut sorted_ids = order.clone();
    sorted_ids.sort();
    assert_eq!(
        sorted_ids, users,
        "each ban of the room once, no other room's"
    );
    for limit in 1..=8 {
        let paged = pages(&reader, ROOM, limit).await;
        let sizes: Vec<usize> = paged.iter().map(Vec::len).collect();
        let mut expected = vec![limit.min(7); 7 / limit];
        if 7 % limit != 0 {
            expected.push(7 % limit);
        }
        assert_eq!(
            sizes, expected,
            "pages of {limit}: full pages, then the rest, no empty last page"
        );
        assert_eq!(
            paged.concat(),
            order,
            "pages of {limit} cover every ban once in one stable order"
        );
    }
    // A page token from one replica works on the other, and a page after the last ban is empty.
    let first = writer.list_bans(&lobby, None, 6).await.unwrap();
    let next = first.next.expect("a seventh ban");
    let rest = reader.list_bans(&lobby, Some(&next), 6).await.unwrap();
    assert_eq!(rest.bans.len(), 1);
    assert_eq!(rest.next, None);
    let past_the_end = PageToken::parse(&"f".repeat(32)).unwrap();
    let empty = reader
        .list_bans(&lobby, Some(&past_the_end), 6)
        .await
        .unwrap();
    assert_eq!((empty.bans.len(), empty.next), (0, None));

    // A lifted ban leaves the pages.
    assert!(writer.unban(&lobby, &user("user-3")).await.unwrap());
    let mut left = pages(&reader, ROOM, 2).await.concat();
    left.sort();
    assert_eq!(left.len(), 6);
    assert!(!left.contains(&"user-3".to_owned()));
}

/// Revocations: seen by the other replica, kept apart by room and user, and only moving forward whatever
/// order the replicas write in.
async fn revocations_contract(Replicas { writer, reader, .. }: Replicas<Store>) {
    let (lobby, other) = (room(ROOM), room(OTHER_ROOM));
    let keep = Duration::from_secs(60);
    // Whole microseconds, as Redis keeps them.
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64;
    let at = |micros: u64| SystemTime::UNIX_EPOCH + Duration::from_micros(micros);
    let (t1, t2, t3) = (at(now - 1), at(now), at(now + 1));

    assert_eq!(reader.revoked_at(&lobby, &user("ann")).await.unwrap(), None);
    writer.revoke(&lobby, &user("ann"), t2, keep).await.unwrap();
    assert_eq!(
        reader.revoked_at(&lobby, &user("ann")).await.unwrap(),
        Some(t2)
    );
    assert_eq!(reader.revoked_at(&lobby, &user("bob")).await.unwrap(), None);
    assert_eq!(reader.revoked_at(&other, &user("ann")).await.unwrap(), None);
    // The reader writes an earlier one late: it leaves the later one, for both replicas.
    reader.revoke(&lobby, &user("ann"), t1, keep).await.unwrap();
    for replica in [&writer, &reader] {
        assert_eq!(
            replica.revoked_at(&lobby, &user("ann")).await.unwrap(),
            Some(t2),
            "an earlier revocation written late leaves the later one"
        );
    }
    reader.revoke(&lobby, &user("ann"), t3, keep).await.unwrap();
    assert_eq!(
        writer.revoked_at(&lobby, &user("ann")).await.unwrap(),
        Some(t3),
        "a later revocation moves it forward"
    );
}

/// Used token ids: the first use is the only one, for every replica; ids are kept apart.
async fn used_contract(Replicas { writer, reader, .. }: Replicas<Store>) {
    let until = SystemTime::now() + Duration::from_secs(60);
    let id = uuid::Uuid::new_v4().to_string();
    assert!(writer.first_use(&id, until).await.unwrap(), "the first use");
    assert!(!writer.first_use(&id, until).await.unwrap());
    assert!(
        !reader.first_use(&id, until).await.unwrap(),
        "used through one replica, used for the other"
    );
    let other = uuid::Uuid::new_v4().to_string();
    assert!(reader.first_use(&other, until).await.unwrap());
    assert!(!writer.first_use(&other, until).await.unwrap());
}

/// Sleeps until `at` (at once if it has passed).
async fn sleep_until(at: SystemTime) {
    if let Ok(wait) = at.duration_since(SystemTime::now()) {
        tokio::time::sleep(wait).await;
    }
}

/// Asks `probe` again and again until `edge`: every answer given wholly before `edge` must be `before`,
/// and the last of them must come within [`CLOSE`] of it. Then asks once more at `after_from` (at or just
/// after `edge`): that answer must be `after`. `probe` is told which question it answers (`true`: the one
/// after the edge), for a question that writes (a first use records one).
async fn across<T, F, Fut>(
    what: &str,
    edge: SystemTime,
    after_from: SystemTime,
    (before, after): (T, T),
    mut probe: F,
) where
    T: PartialEq + Debug,
    F: FnMut(bool) -> Fut,
    Fut: Future<Output = T>,
{
    let mut last_before = None;
    while SystemTime::now() < edge {
        let answer = probe(false).await;
        let answered = SystemTime::now();
        if answered < edge {
            let early = edge.duration_since(answered).unwrap();
            assert_eq!(answer, before, "{what}: asked {early:?} before the edge");
            last_before = Some(early);
        }
        tokio::time::sleep(POLL).await;
    }
    let early = last_before.unwrap_or_else(|| panic!("{what}: no answer came before the edge"));
    assert!(
        early <= CLOSE,
        "{what}: the last answer before the edge came {early:?} before it: too slow to tell"
    );
    sleep_until(after_from).await;
    let late = SystemTime::now().duration_since(edge).unwrap();
    assert_eq!(
        probe(true).await,
        after,
        "{what}: asked {late:?} after the edge"
    );
}

/// How long a write to a store took: a store's own record of a time window (a Redis TTL) starts
/// somewhere within it, so it may end as much later than the window.
async fn timed<T>(write: impl Future<Output = T>) -> (T, Duration) {
    let start = SystemTime::now();
    let out = write.await;
    (out, SystemTime::now().duration_since(start).unwrap())
}

/// A ban ends at its end: in force (for the other replica, listed) until the instant before, over at it.
async fn a_ban_ends_at_its_end(Replicas { writer, reader, .. }: Replicas<Store>) {
    let lobby = room(ROOM);
    let ending = ban(ROOM, "brief", Some(Duration::from_millis(1500)), "spam");
    let end = ending.expires_at.unwrap();
    let (banned, took) = timed(writer.ban(&ending)).await;
    banned.unwrap();
    writer.ban(&ban(ROOM, "stays", None, "spam")).await.unwrap();
    across(
        "a ban's end",
        end,
        end,
        (Some(ending.clone()), None),
        |_| async { reader.ban_of(&lobby, &user("brief")).await.unwrap() },
    )
    .await;
    let listed = reader.list_bans(&lobby, None, 10).await.unwrap();
    let listed: Vec<&str> = listed.bans.iter().map(|b| b.user_id.expose()).collect();
    assert_eq!(listed, ["stays"], "an ended ban is not listed");
    // Unban asks Redis' record, whose TTL started when the write reached Redis: up to the write's own
    // time after the ban was made. (ban_of and ListBans read the end from the record: exact.)
    sleep_until(end + took + Duration::from_millis(2)).await;
    assert!(
        !writer.unban(&lobby, &user("brief")).await.unwrap(),
        "there is no ended ban to lift"
    );
}

/// A revocation is kept for `keep_for` from when it is made, and no longer.
async fn a_revocation_is_kept_for_its_time(Replicas { writer, reader, .. }: Replicas<Store>) {
    let lobby = room(ROOM);
    let keep = Duration::from_millis(1500);
    // Whole microseconds, as Redis keeps them.
    let at = SystemTime::UNIX_EPOCH
        + Duration::from_micros(
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_micros() as u64,
        );
    let (revoked, took) = timed(writer.revoke(&lobby, &user("ann"), at, keep)).await;
    revoked.unwrap();
    let edge = at + keep;
    across(
        "a revocation's end",
        edge,
        edge + took + Duration::from_millis(2),
        (Some(at), None),
        |_| async { reader.revoked_at(&lobby, &user("ann")).await.unwrap() },
    )
    .await;
}

/// A used token id stays used until `until`, then is forgotten.
async fn a_used_token_is_kept_until_its_end(Replicas { writer, fresh, .. }: Replicas<Store>) {
    // Two ids used alike: one asked about before the end, the other only after it. A question is a use,
    // and a use in the last moment before the end records the id anew (for Redis' shortest record, 1 s),
    // so the id asked about before the end cannot tell whether the first record ended.
    let (asked_before, asked_after) = (
        uuid::Uuid::new_v4().to_string(),
        uuid::Uuid::new_v4().to_string(),
    );
    // Longer than Redis' shortest record (1 s), so the record's end is `until`'s.
    let until = SystemTime::now() + Duration::from_millis(1500);
    let ((first, second), took) = timed(async {
        (
            writer.first_use(&asked_before, until).await,
            writer.first_use(&asked_after, until).await,
        )
    })
    .await;
    assert!(first.unwrap() && second.unwrap());
    across(
        "a used token's end",
        until,
        until + took + Duration::from_millis(2),
        (false, true),
        |after| {
            let replica = fresh();
            let id = if after { &asked_after } else { &asked_before }.clone();
            async move { replica.first_use(&id, until).await.unwrap() }
        },
    )
    .await;
}

/// Everything above on two replicas of one store, the time windows in parallel.
async fn the_whole_contract<'a>(shared: impl Fn() -> Shared<'a>) {
    with_replicas(shared(), bans_contract).await;
    with_replicas(shared(), revocations_contract).await;
    with_replicas(shared(), used_contract).await;
    tokio::join!(
        with_replicas(shared(), a_ban_ends_at_its_end),
        with_replicas(shared(), a_revocation_is_kept_for_its_time),
        with_replicas(shared(), a_used_token_is_kept_until_its_end),
    );
}

#[tokio::test]
async fn the_memory_store_keeps_the_contract() {
    the_whole_contract(|| Shared::Memory).await;
}

#[tokio::test]
async fn the_redis_store_keeps_the_contract_across_replicas() {
    let redis = RedisServer::shared();
    the_whole_contract(|| Shared::Redis(&redis)).await;
}

#[tokio::test]
async fn the_redis_cluster_store_keeps_the_contract_across_replicas() {
    let redis = RedisServer::cluster();
    the_whole_contract(|| Shared::Cluster(&redis)).await;
}

// ---------------------------------------------------------------------------------------------------
// The windows verification relies on, through the local issuer's moderator as the app builds it over
// each store: a token verifies until `exp + VERIFY_LEEWAY`, so its used record and any revocation covering
// it must last at least as long. The first replica verifies or disconnects, the other verifies after.

const TOKEN_TTL: Duration = Duration::from_secs(1);

/// Claims of a token for `id` in the lobby minted at `issued_at`, living [`TOKEN_TTL`].
fn claims(id: &str, issued_at: SystemTime) -> TokenClaims {
    TokenClaims {
        token_id: uuid::Uuid::new_v4().to_string(),
        room: room(ROOM),
        user_id: user(id),
        capabilities: Default::default(),
        attributes: Default::default(),
        issued_at,
        token_expires_at: issued_at + TOKEN_TTL,
        session_expires_at: issued_at + TOKEN_TTL,
    }
}

/// What verifying `claims` answers: verified, or refused and why.
async fn verify(
    moderator: &LocalModerator<Store>,
    claims: &TokenClaims,
) -> Result<(), TokenRejection> {
    match moderator.verify(claims.clone()).await {
        Ok(verified) => {
            assert_eq!(&verified, claims);
            Ok(())
        }
        Err(Error::TokenRejected(why)) => Err(why),
        Err(other) => panic!("verification failed for another reason: {other:?}"),
    }
}

/// A single-use token verifies once; every replica refuses it as used just before, at and after `exp`,
/// until `exp + leeway`, where it is refused as expired.
async fn single_use_across_exp_and_leeway(
    Replicas {
        writer,
        reader,
        fresh,
    }: Replicas<Store>,
) {
    let (first, second) = (
        LocalModerator::new(writer, TOKEN_TTL, true),
        LocalModerator::new(reader, TOKEN_TTL, true),
    );
    // Each question from a replica that has not seen the token yet: only the shared record can answer.
    let ask = |token: &TokenClaims| {
        let (verifier, token) = (LocalModerator::new(fresh(), TOKEN_TTL, true), token.clone());
        async move { verify(&verifier, &token).await }
    };
    let token = claims("viewer", SystemTime::now());
    let exp = token.token_expires_at;
    assert_eq!(verify(&first, &token).await, Ok(()), "the first use");
    let other = claims("viewer", SystemTime::now());
    assert_eq!(
        verify(&second, &other).await,
        Ok(()),
        "another token is its own"
    );
    let used = Err(TokenRejection::AlreadyUsed);
    assert_eq!(
        verify(&second, &token).await,
        used,
        "used through the other replica"
    );
    across("exp", exp, exp, (used, used), |_| ask(&token)).await;
    let last = exp + VERIFY_LEEWAY;
    let expired = Err(TokenRejection::Expired);
    across("exp + leeway", last, last, (used, expired), |_| ask(&token)).await;
}

/// A disconnect revokes the tokens minted before it, for every replica, just before, at and after their
/// `exp`, until `exp + leeway`, where they are refused as expired; a token minted after it verifies.
async fn revocation_across_exp_and_leeway(Replicas { writer, reader, .. }: Replicas<Store>) {
    let (moderator, verifier) = (
        LocalModerator::new(writer, TOKEN_TTL, false),
        LocalModerator::new(reader, TOKEN_TTL, false),
    );
    let token = claims("viewer", SystemTime::now() - Duration::from_millis(1));
    let exp = token.token_expires_at;
    assert_eq!(
        verify(&verifier, &token).await,
        Ok(()),
        "before the disconnect"
    );
    moderator
        .disconnect(
            &room(ROOM),
            &user("viewer"),
            &Reason::parse("spam".into()).unwrap(),
        )
        .await
        .unwrap();
    let fresh = claims("viewer", SystemTime::now());
    assert_eq!(
        verify(&verifier, &fresh).await,
        Ok(()),
        "minted after the disconnect"
    );
    let revoked = Err(TokenRejection::Revoked);
    across("exp", exp, exp, (revoked, revoked), |_| {
        verify(&verifier, &token)
    })
    .await;
    let last = exp + VERIFY_LEEWAY;
    let expired = Err(TokenRejection::Expired);
    across("exp + leeway", last, last, (revoked, expired), |_| {
        verify(&verifier, &token)
    })
    .await;
}

#[tokio::test]
async fn single_use_tokens_stay_used_until_exp_plus_leeway_in_memory() {
    with_replicas(Shared::Memory, single_use_across_exp_and_leeway).await;
}

#[tokio::test]
async fn single_use_tokens_stay_used_until_exp_plus_leeway_in_redis() {
    let redis = RedisServer::shared();
    with_replicas(Shared::Redis(&redis), single_use_across_exp_and_leeway).await;
}

#[tokio::test]
async fn revocations_hold_until_exp_plus_leeway_in_memory() {
    with_replicas(Shared::Memory, revocation_across_exp_and_leeway).await;
}

#[tokio::test]
async fn revocations_hold_until_exp_plus_leeway_in_redis() {
    let redis = RedisServer::shared();
    with_replicas(Shared::Redis(&redis), revocation_across_exp_and_leeway).await;
}
