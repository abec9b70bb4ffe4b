//! The [`LimiterStore`] contract, run against both stores: in memory, and shared through a real Redis
//! (the one on 127.0.0.1:6379 when it answers, else our own; without redis-server this fails, never
//! skips). A new store, or a new operation on one, passes the same function.

mod common;

use std::{num::NonZeroU32, time::Duration};

use chat_token_service::{
    config::{Config, FailureMode, LimiterBackend, RedisUrl},
    domain::Rate,
    store::{Backend, Check, LimiterStore, Quota, Verdict},
};
use common::redis_server::{RedisServer, unique_prefix};

fn check(key: &str, rate: &str, burst: u32, shadow: bool) -> Check {
    Check {
        key: key.into(),
        quota: Quota::new(Rate::parse(rate).unwrap(), NonZeroU32::new(burst).unwrap()),
        shadow,
    }
}

fn admitted(verdicts: &[Verdict]) -> Vec<bool> {
    verdicts.iter().map(|v| *v == Verdict::Allowed).collect()
}

/// What every store must do. `scope` keeps this run's keys apart from any other's.
async fn contract(store: &impl LimiterStore, scope: &str) {
    let key = |name: &str| format!("{scope}:{name}");

    // One verdict per check, in order; a fresh key admits exactly its burst, then says when to retry.
    let burst = check(&key("burst"), "1/h", 3, false);
    for _ in 0..3 {
        let verdicts = store.check(std::slice::from_ref(&burst)).await.unwrap();
        assert_eq!(admitted(&verdicts), [true]);
    }
    let verdicts = store.check(std::slice::from_ref(&burst)).await.unwrap();
    match verdicts[..] {
        [Verdict::Denied { retry_after }] => assert!(
            retry_after > Duration::from_secs(3590) && retry_after <= Duration::from_secs(3600),
            "{retry_after:?}"
        ),
        _ => panic!("the fourth request of a burst of 3 is denied: {verdicts:?}"),
    }

    // Enforced checks are all or nothing: refused by one, nothing is taken from the other.
    let spare = check(&key("spare"), "1/h", 1, false);
    let exhausted = burst.clone();
    let verdicts = store.check(&[spare.clone(), exhausted]).await.unwrap();
    assert_eq!(admitted(&verdicts), [true, false], "{verdicts:?}");
    let verdicts = store.check(std::slice::from_ref(&spare)).await.unwrap();
    assert_eq!(
        admitted(&verdicts),
        [true],
        "the refused request took nothing from `spare`"
    );
    let verdicts = store.check(std::slice::from_ref(&spare)).await.unwrap();
    assert_eq!(admitted(&verdicts), [false]);

    // Shadow checks commit on their own and never change the enforced outcome.
    let shadow = check(&key("shadow"), "1/h", 1, true);
    let enforced = check(&key("enforced"), "1/h", 2, false);
    let verdicts = store
        .check(&[shadow.clone(), enforced.clone()])
        .await
        .unwrap();
    assert_eq!(admitted(&verdicts), [true, true]);
    let verdicts = store
        .check(&[shadow.clone(), enforced.clone()])
        .await
        .unwrap();
    assert_eq!(
        admitted(&verdicts),
        [false, true],
        "a shadow denial refuses nothing"
    );
    let verdicts = store.check(&[shadow, enforced]).await.unwrap();
    assert_eq!(admitted(&verdicts), [false, false]);

    // No checks, no verdicts.
    assert!(store.check(&[]).await.unwrap().is_empty());
}

/// The state backend `backend` names, sharing `redis` when given.
fn store(backend: LimiterBackend, redis: Option<&RedisServer>) -> Backend {
    let mut config = Config::default();
    config.limiter.backend = backend;
    if let Some(redis) = redis {
        config.limiter.redis_url = Some(RedisUrl::parse(&redis.url()).unwrap());
        config.limiter.key_prefix = unique_prefix();
        // Decided in Redis or not at all: a store that fell back in process would not be under test.
        config.limiter.failure_mode = FailureMode::FailClosed;
        config.limiter.redis_timeout = Duration::from_secs(2);
    }
    Backend::new(&config.limiter).unwrap()
}

#[tokio::test]
async fn the_memory_store_keeps_the_contract() {
    let Backend::Memory(stores) = store(LimiterBackend::Memory, None) else {
        panic!("the memory backend was configured");
    };
    contract(&stores.limits, "memory").await;
}

#[tokio::test]
async fn the_redis_store_keeps_the_contract() {
    let redis = RedisServer::shared();
    let Backend::Redis(stores) = store(LimiterBackend::Redis, Some(&redis)) else {
        panic!("the Redis backend was configured");
    };
    contract(&stores.limits, "redis").await;
}

/// The scripts are invoked by their SHA: after `SCRIPT FLUSH` (what a Redis restart or a failover to a
/// fresh replica does to the script cache) the next call meets NOSCRIPT, loads the script and still
/// decides in Redis, for the limits alone and for the ban check riding with them.
#[tokio::test]
async fn a_flushed_script_cache_is_reloaded_on_the_next_call() {
    let redis = RedisServer::private();
    let Backend::Redis(stores) = store(LimiterBackend::Redis, Some(&redis)) else {
        panic!("the Redis backend was configured");
    };
    let limit = check("noscript", "1/h", 2, false);
    let verdicts = stores
        .limits
        .check(std::slice::from_ref(&limit))
        .await
        .unwrap();
    assert_eq!(admitted(&verdicts), [true]);

    let client = redis::Client::open(redis.url()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let flushed: String = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut connection)
        .await
        .unwrap();
    assert_eq!(flushed, "OK");

    // Fail-closed: a call that could not reload the script would be refused, not decided in process.
    let verdicts = stores
        .limits
        .check(std::slice::from_ref(&limit))
        .await
        .unwrap();
    assert_eq!(
        admitted(&verdicts),
        [true],
        "decided in Redis: the second of a burst of 2"
    );
    let verdicts = stores
        .limits
        .check(std::slice::from_ref(&limit))
        .await
        .unwrap();
    assert_eq!(
        admitted(&verdicts),
        [false],
        "Redis kept the state across the flush"
    );

    let _: String = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut connection)
        .await
        .unwrap();
    let gate = stores
        .ban_gate
        .as_ref()
        .expect("a single node has the ban gate");
    let room = chat_token_service::domain::RoomArn::parse(
        "arn:aws:ivschat:us-west-2:111111111111:room/noscript",
    )
    .unwrap();
    let user = chat_token_service::domain::UserId::parse("noscript-user".into()).unwrap();
    let gated = gate
        .check(&room, &user, &[check("noscript-gated", "1/h", 1, false)])
        .await
        .unwrap();
    assert!(
        matches!(&gated, chat_token_service::store::Gated::Verdicts(verdicts) if admitted(verdicts) == [true]),
        "after a flush the fused script is loaded again"
    );
}
