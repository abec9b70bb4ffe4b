//! Rate limits shared through a real Redis: the GCRA script's decisions, limits shared by two service
//! processes, clock skew, Redis going away and coming back in both failure modes, and Redis Cluster.
//!
//! Tests reuse the Redis on 127.0.0.1:6379 when one answers (each with a key prefix of its own), and start
//! their own `redis-server` otherwise; tests that stop Redis always start their own. Without redis-server
//! they fail: they never skip.

mod common;

use std::time::{Duration, Instant, SystemTime};

use chat_token_service::{
    config::Config,
    proto::ivschat::v1::CreateChatTokenRequest,
    store::{
        Backend, Check, LimiterStore, StoreError, Verdict,
        limits::RedisLimits,
        redis::{RedisFault, SharedRedis},
    },
};
use common::{
    Binary, LocalKeys, ROOM_ARN, TestServer,
    redis_server::{RedisServer, libfaketime, unique_prefix},
};
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tonic_types::StatusExt;

/// A config using Redis at `redis` with `prefix`, plus `extra` TOML (limits, failure mode), and
/// [`common::REDIS_TIMEOUT_SETTING`] unless `extra` sets `redis_timeout`.
fn redis_config(keys: &LocalKeys, redis: &RedisServer, prefix: &str, extra: &str) -> Config {
    let path = keys
        .dir
        .path()
        .join(format!("config-{}.toml", uuid::Uuid::new_v4()));
    let (limiter, rest) = extra.split_once("\n\n").unwrap_or((extra, ""));
    let timeout = if limiter.contains("redis_timeout") {
        String::new()
    } else {
        format!("redis_timeout = \"{}\"\n", common::REDIS_TIMEOUT_SETTING)
    };
    std::fs::write(
        &path,
        format!(
            "[local_issuer]\nkeys_file = \"{}\"\n\n{rest}\n\n[limiter]\nbackend = \"redis\"\n\
             redis_url = \"{}\"\nkey_prefix = \"{prefix}\"\n{timeout}{limiter}\n",
            keys.path.display(),
            redis.url(),
        ),
    )
    .unwrap();
    Config::load(Some(&path)).expect("valid config")
}

fn check(key: &str, rate: &str, burst: u32, shadow: bool) -> Check {
    use chat_token_service::{domain::Rate, store::Quota};
    Check {
        key: key.into(),
        quota: Quota::new(
            Rate::parse(rate).unwrap(),
            std::num::NonZeroU32::new(burst).unwrap(),
        ),
        shadow,
    }
}

/// The Redis limits store `config` describes.
fn limits(config: &Config) -> RedisLimits {
    match Backend::new(&config.limiter).unwrap() {
        Backend::Redis(stores) => stores.limits,
        Backend::Memory(_) => panic!("the Redis backend was configured"),
    }
}

fn denied(verdict: &Verdict) -> bool {
    matches!(verdict, Verdict::Denied { .. })
}

fn for_user(user: &str) -> CreateChatTokenRequest {
    CreateChatTokenRequest {
        room_identifier: ROOM_ARN.into(),
        user_id: user.into(),
        ..Default::default()
    }
}

/// The token service's health status as a health client sees it.
async fn health(server: &TestServer, service: &str) -> i32 {
    HealthClient::new(server.channel().await)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
}

#[tokio::test]
async fn gcra_in_redis_admits_the_burst_then_exactly_the_configured_rate() {
    let redis = RedisServer::shared();
    let keys = LocalKeys::new();
    let prefix = unique_prefix();
    let store = limits(&redis_config(&keys, &redis, &prefix, ""));
    let limit = [check("per-user/ann", "10/s", 3, false)];

    for i in 0..3 {
        assert_eq!(
            store.check(&limit).await.unwrap(),
            [Verdict::Allowed],
            "burst request {i}"
        );
    }
    let Verdict::Denied { retry_after } = store.check(&limit).await.unwrap()[0] else {
        panic!("the fourth request exceeds the burst");
    };
    assert!(
        Duration::ZERO < retry_after && retry_after <= Duration::from_millis(100),
        "{retry_after:?}"
    );

    // The key lives exactly until full recovery (3 × 100 ms), under a digest: no user id in Redis.
    let stored = redis.keys(&format!("{prefix}:rl:"));
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert!(!stored[0].contains("ann"), "{}", stored[0]);
    assert!(
        stored[0].starts_with(&format!("{prefix}:rl:{{")) && stored[0].ends_with('}'),
        "{}",
        stored[0]
    );
    let ttl: u64 = redis
        .command(&["PTTL", &stored[0]])
        .trim_start_matches(':')
        .trim()
        .parse()
        .unwrap();
    assert!(0 < ttl && ttl <= 300, "PTTL {ttl} ms");

    // Steady state: one request per emission interval, the next one refused.
    for _ in 0..3 {
        let Verdict::Denied { retry_after } = store.check(&limit).await.unwrap()[0] else {
            panic!("still within the interval");
        };
        tokio::time::sleep(retry_after).await;
        assert_eq!(store.check(&limit).await.unwrap(), [Verdict::Allowed]);
        assert!(denied(&store.check(&limit).await.unwrap()[0]));
    }
}

#[tokio::test]
async fn enforced_checks_are_all_or_nothing_and_shadow_checks_independent_in_redis() {
    let redis = RedisServer::shared();
    let keys = LocalKeys::new();
    let store = limits(&redis_config(&keys, &redis, &unique_prefix(), ""));
    let roomy = check("roomy", "1/h", 10, false);
    let tight = check("tight", "1/h", 1, false);
    assert_eq!(
        store.check(&[roomy.clone(), tight.clone()]).await.unwrap(),
        [Verdict::Allowed, Verdict::Allowed]
    );
    for _ in 0..20 {
        let verdicts = store.check(&[roomy.clone(), tight.clone()]).await.unwrap();
        assert_eq!(verdicts[0], Verdict::Allowed);
        assert!(denied(&verdicts[1]));
    }
    let roomy_alone = vec![roomy.clone(); 9];
    assert!(
        store
            .check(&roomy_alone)
            .await
            .unwrap()
            .iter()
            .all(|v| *v == Verdict::Allowed),
        "twenty refusals by `tight` cost `roomy` nothing, and a key checked twice counts twice"
    );
    assert!(denied(&store.check(&[roomy]).await.unwrap()[0]));

    let shadow = check("shadow", "1/h", 1, true);
    let enforced = check("enforced", "1/h", 2, false);
    let both = [shadow, enforced];
    assert_eq!(
        store.check(&both).await.unwrap(),
        [Verdict::Allowed, Verdict::Allowed]
    );
    let second = store.check(&both).await.unwrap();
    assert!(denied(&second[0]) && second[1] == Verdict::Allowed);
}

#[tokio::test]
async fn two_service_processes_share_one_limit_instead_of_doubling_it() {
    let redis = RedisServer::shared();
    let prefix = unique_prefix();
    let url = redis.url();
    let env = [
        ("CTS_LIMITER__BACKEND", "redis"),
        ("CTS_LIMITER__REDIS_TIMEOUT", common::REDIS_TIMEOUT_SETTING),
        ("CTS_LIMITER__REDIS_URL", url.as_str()),
        ("CTS_LIMITER__KEY_PREFIX", prefix.as_str()),
        (
            "CTS_RATE_LIMITS",
            r#"[{name="global",key="global",rate="1/h",burst=10}]"#,
        ),
    ];
    let first = Binary::start(&env);
    let second = Binary::start(&env);
    let mut clients = Vec::new();
    for binary in [&first, &second] {
        clients.push(binary.client().await);
    }

    let mut admitted = 0;
    for i in 0..20 {
        match clients[i % 2].create_chat_token(for_user("ann")).await {
            Ok(_) => admitted += 1,
            Err(status) => assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}"),
        }
    }
    assert_eq!(
        admitted, 10,
        "one budget of 10 between both processes, not 10 each"
    );

    for binary in [first, second] {
        binary.signal("-TERM");
        let (status, log) = binary.exit().await;
        assert!(status.success(), "{log:?}");
        assert!(
            log.iter().all(|line| !line.contains(&url)),
            "the Redis URL is never logged"
        );
    }
}

#[tokio::test]
async fn a_skewed_wall_clock_does_not_change_decisions() {
    let redis = RedisServer::shared();
    let prefix = unique_prefix();
    let url = redis.url();
    let faketime = libfaketime().display().to_string();
    let env = [
        ("CTS_LIMITER__BACKEND", "redis"),
        ("CTS_LIMITER__REDIS_TIMEOUT", common::REDIS_TIMEOUT_SETTING),
        ("CTS_LIMITER__REDIS_URL", url.as_str()),
        ("CTS_LIMITER__KEY_PREFIX", prefix.as_str()),
        (
            "CTS_RATE_LIMITS",
            r#"[{name="per-user",key="user",rate="1/min",burst=2}]"#,
        ),
    ];
    let honest = Binary::start(&env);
    // Ten minutes fast: a store that read the local clock would see the honest replica's state as long
    // recovered and admit again.
    let mut skewed_env = env.to_vec();
    skewed_env.extend([
        ("LD_PRELOAD", faketime.as_str()),
        ("FAKETIME", "+600"),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
    ]);
    let skewed = Binary::start(&skewed_env);

    let mut honest_client = honest.client().await;
    let mut skewed_client = skewed.client().await;
    honest_client
        .create_chat_token(for_user("ann"))
        .await
        .unwrap();
    honest_client
        .create_chat_token(for_user("ann"))
        .await
        .unwrap();
    let refusal = skewed_client
        .create_chat_token(for_user("ann"))
        .await
        .unwrap_err();
    assert_eq!(refusal.code(), Code::ResourceExhausted, "{refusal:?}");
    let delay = refusal
        .get_details_retry_info()
        .and_then(|r| r.retry_delay)
        .expect("RetryInfo");
    assert!(
        Duration::from_secs(59) < delay && delay <= Duration::from_secs(60),
        "the skewed replica advises the same wait as Redis' clock gives: {delay:?}"
    );

    skewed.signal("-TERM");
    let (_, log) = skewed.exit().await;
    honest.signal("-TERM");
    honest.exit().await;
    // The skew really applied: the skewed process stamped its log lines ten minutes ahead.
    let stamp = log
        .iter()
        .find_map(|line| humantime::parse_rfc3339_weak(line.split_whitespace().next()?).ok())
        .expect("timestamped log lines");
    let ahead = stamp
        .duration_since(SystemTime::now())
        .expect("the skewed clock runs ahead");
    assert!(ahead > Duration::from_secs(500), "{ahead:?}");
}

/// A server on `redis` in `mode`, and the store behind it.
async fn server_with_store(
    keys: &LocalKeys,
    redis: &RedisServer,
    prefix: &str,
    mode: &str,
) -> (TestServer, Backend) {
    let config = redis_config(
        keys,
        redis,
        prefix,
        &format!(
            "failure_mode = \"{mode}\"\n\n[[rate_limits]]\nname = \"per-user\"\nkey = \"user\"\n\
             rate = \"1/h\"\nburst = 2\n"
        ),
    );
    let server = TestServer::from_config(config).await;
    let store = server.backend.clone();
    (server, store)
}

fn redis_store(backend: &Backend) -> &SharedRedis {
    match backend {
        Backend::Redis(stores) => stores.limits.redis(),
        Backend::Memory(_) => panic!("the Redis backend was configured"),
    }
}

#[tokio::test]
async fn fail_open_keeps_serving_with_local_limits_and_shares_again_once_redis_returns() {
    let mut redis = RedisServer::private();
    let keys = LocalKeys::new();
    let prefix = unique_prefix();
    let (server, store) = server_with_store(&keys, &redis, &prefix, "fail_open").await;
    let mut client = server.client().await;
    client.create_chat_token(for_user("ann")).await.unwrap();
    assert_eq!(
        redis.keys(&format!("{prefix}:rl:")).len(),
        1,
        "decided in Redis"
    );

    redis.stop();
    // Local limits, as configured, from a fresh local budget: two admitted, the third refused.
    for _ in 0..2 {
        client
            .create_chat_token(for_user("ann"))
            .await
            .expect("fail_open keeps serving");
    }
    let refusal = client.create_chat_token(for_user("ann")).await.unwrap_err();
    assert_eq!(refusal.code(), Code::ResourceExhausted, "{refusal:?}");
    assert_eq!(
        health(&server, "ivschat.v1.TokenService").await,
        ServingStatus::Serving as i32,
        "fail_open stays ready"
    );
    assert!(redis_store(&store).outage_calls() >= 3);

    redis.restart();
    let up = redis_store(&store).readiness();
    common::eventually("Redis to be seen again", || {
        let up = *up.borrow();
        async move { up.then_some(()) }
    })
    .await;
    client
        .create_chat_token(for_user("bob"))
        .await
        .expect("decided in Redis again");
    assert_eq!(
        redis.keys(&format!("{prefix}:rl:")).len(),
        1,
        "the restarted Redis holds the new decision: shared limits are back without a service restart"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn fail_closed_answers_unavailable_and_is_not_ready_until_redis_returns() {
    let mut redis = RedisServer::private();
    let keys = LocalKeys::new();
    let (server, _store) = server_with_store(&keys, &redis, &unique_prefix(), "fail_closed").await;
    let mut client = server.client().await;
    common::eventually("the token service to be ready", || async {
        (health(&server, "ivschat.v1.TokenService").await == ServingStatus::Serving as i32)
            .then_some(())
    })
    .await;
    client.create_chat_token(for_user("ann")).await.unwrap();

    redis.stop();
    // The answer comes back (no hang); how fast is the store's business, bounded by redis_timeout.
    let status = common::within(
        "an answer, not a hang",
        client.create_chat_token(for_user("ann")),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let retry = status.get_details_retry_info().expect("RetryInfo");
    assert!(retry.retry_delay.is_some());
    common::eventually("the token service to report NOT_SERVING", || async {
        (health(&server, "ivschat.v1.TokenService").await == ServingStatus::NotServing as i32)
            .then_some(())
    })
    .await;
    assert_eq!(
        health(&server, "").await,
        ServingStatus::Serving as i32,
        "liveness is not Redis' business"
    );

    redis.restart();
    common::eventually("the token service to be ready again", || async {
        (health(&server, "ivschat.v1.TokenService").await == ServingStatus::Serving as i32)
            .then_some(())
    })
    .await;
    client
        .create_chat_token(for_user("ann"))
        .await
        .expect("served again, without a restart");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn redis_cluster_checks_several_limits_of_one_request() {
    let redis = RedisServer::cluster();
    let keys = LocalKeys::new();
    let prefix = unique_prefix();
    let config = redis_config(
        &keys,
        &redis,
        &prefix,
        "redis_cluster = true\n\n\
         [[rate_limits]]\nname = \"per-user\"\nkey = \"user\"\nrate = \"1/h\"\nburst = 2\n\n\
         [[rate_limits]]\nname = \"per-room\"\nkey = \"room\"\nrate = \"1/h\"\nburst = 3\n",
    );
    let server = TestServer::from_config(config).await;
    let mut client = server.client().await;
    for _ in 0..2 {
        client.create_chat_token(for_user("ann")).await.unwrap();
    }
    let status = client.create_chat_token(for_user("ann")).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(status.message(), "rate limit exceeded: per-user");
    let stored = redis.keys(&format!("{prefix}:rl:"));
    assert_eq!(stored.len(), 2, "one key per limit: {stored:?}");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_read_only_replica_is_reported_as_such_and_readiness_does_not_flap() {
    // Pointed at a replica, SCRIPT LOAD succeeds but every write is refused: the probe runs the real
    // script, so health follows what requests see instead of flapping every second.
    let replica = RedisServer::replica();
    let keys = LocalKeys::new();
    let config = redis_config(
        &keys,
        &replica,
        &unique_prefix(),
        "failure_mode = \"fail_closed\"\nredis_timeout = \"1s\"",
    );
    let backend = Backend::new(&config.limiter).unwrap();
    let Backend::Redis(stores) = &backend else {
        panic!("the Redis backend was configured");
    };
    let (redis, store) = (stores.limits.redis(), &stores.limits);
    let mut ready = backend.readiness().expect("fail_closed follows Redis");
    common::within(
        "the first probe to find the replica read-only",
        ready.wait_for(|up| !*up),
    )
    .await
    .unwrap();
    assert_eq!(redis.fault(), Some(RedisFault::ReadOnly));
    assert!(RedisFault::ReadOnly.is_misconfiguration());
    assert!(matches!(
        store.check(&[check("k", "1/s", 1, false)]).await,
        Err(StoreError::Unavailable { .. })
    ));

    // Three probes later it has never looked ready again.
    let flapped = tokio::time::timeout(Duration::from_millis(3500), ready.wait_for(|up| *up)).await;
    assert!(flapped.is_err(), "readiness flapped back to ready");
    assert_eq!(redis.fault(), Some(RedisFault::ReadOnly));
}

// ---------------------------------------------------------------------------------------------------
// `limiter.redis_timeout` against a Redis that is there but does not answer, and one that answers late.

/// A "Redis" that accepts connections and never answers: what a hung server or a black-holed network
/// looks like from here. The listener lives until the test binary exits.
fn hung_redis() -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            held.push(stream);
        }
    });
    addr
}

/// Settings for a Redis at `addr` with `timeout` and `mode`.
fn hung_config(keys: &LocalKeys, addr: std::net::SocketAddr, mode: &str, timeout: &str) -> Config {
    let path = keys
        .dir
        .path()
        .join(format!("config-{}.toml", uuid::Uuid::new_v4()));
    std::fs::write(
        &path,
        format!(
            "shutdown_drain_delay = \"0s\"\n\n[local_issuer]\nkeys_file = \"{}\"\n\n[limiter]\nbackend = \"redis\"\n\
             redis_url = \"redis://{addr}\"\nkey_prefix = \"{}\"\nfailure_mode = \"{mode}\"\n\
             redis_timeout = \"{timeout}\"\n\n[[rate_limits]]\nname = \"per-user\"\nkey = \"user\"\n\
             rate = \"1/h\"\nburst = 1\n",
            keys.path.display(),
            unique_prefix(),
        ),
    )
    .unwrap();
    Config::load(Some(&path)).expect("valid config")
}

/// The most a loaded 2-core machine adds to a deadline before a call returns: well under redis-rs's own
/// 1 s connection timeout, so a call that waited for it instead of `redis_timeout` fails.
const MARGIN: Duration = Duration::from_millis(400);

#[tokio::test]
async fn a_hung_redis_fails_a_check_within_redis_timeout_not_redis_rs_timeouts() {
    let keys = LocalKeys::new();
    let config = hung_config(&keys, hung_redis(), "fail_closed", "50ms");
    assert_eq!(
        config.limiter.redis_timeout,
        Duration::from_millis(50),
        "the documented default"
    );
    let store = limits(&config);
    let started = Instant::now();
    let answer = common::within(
        "a check against a hung Redis",
        store.check(&[check("k", "1/s", 1, false)]),
    )
    .await;
    let took = started.elapsed();
    assert!(
        matches!(answer, Err(StoreError::Unavailable { .. })),
        "{answer:?}"
    );
    assert!(
        took < Duration::from_millis(50) + MARGIN,
        "refused after {took:?}"
    );
    assert_eq!(store.redis().fault(), Some(RedisFault::Timeout));
    // Once down, calls are decided at once, without waiting on Redis again.
    let started = Instant::now();
    let answer = store.check(&[check("k", "1/s", 1, false)]).await;
    assert!(matches!(answer, Err(StoreError::Unavailable { .. })));
    assert!(started.elapsed() < MARGIN, "{:?}", started.elapsed());
}

/// The same end to end, on the token service: fail_closed answers UNAVAILABLE with RetryInfo, fail_open
/// issues the token from the local limits, both within `redis_timeout` plus the margin; positive control:
/// fail_open's local limits still refuse past the burst, with RESOURCE_EXHAUSTED.
#[tokio::test]
async fn a_hung_redis_is_answered_within_redis_timeout_in_both_failure_modes() {
    let keys = LocalKeys::new();
    let hung = hung_redis();
    let closed = TestServer::from_config(hung_config(&keys, hung, "fail_closed", "50ms")).await;
    let open = TestServer::from_config(hung_config(&keys, hung, "fail_open", "50ms")).await;
    let (mut closed_client, mut open_client) = (closed.client().await, open.client().await);

    let started = Instant::now();
    let status = common::within(
        "CreateChatToken against a hung Redis (fail_closed)",
        closed_client.create_chat_token(for_user("ann")),
    )
    .await
    .unwrap_err();
    let took = started.elapsed();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(
        status
            .get_details_error_info()
            .map(|info| info.reason)
            .as_deref(),
        Some("RATE_LIMITS_UNAVAILABLE"),
        "{status:?}"
    );
    assert!(status.get_details_retry_info().is_some(), "{status:?}");
    assert!(
        took < Duration::from_millis(50) + MARGIN,
        "answered after {took:?}"
    );

    let started = Instant::now();
    common::within(
        "CreateChatToken against a hung Redis (fail_open)",
        open_client.create_chat_token(for_user("ann")),
    )
    .await
    .expect("fail_open issues from the local limits");
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(50) + MARGIN,
        "answered after {took:?}"
    );
    let status = open_client
        .create_chat_token(for_user("ann"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    closed.shutdown().await.unwrap();
    open.shutdown().await.unwrap();
}

/// A Redis slower than redis-rs's own 500 ms response timeout but within `redis_timeout` decides: the
/// setting is the one deadline (redis-rs's default used to cut every call at 500 ms, whatever it said).
async fn a_slow_redis_decides(redis: RedisServer, extra: &str) {
    let keys = LocalKeys::new();
    let config = redis_config(
        &keys,
        &redis,
        &unique_prefix(),
        &format!("failure_mode = \"fail_closed\"\nredis_timeout = \"5s\"\n{extra}"),
    );
    let store = limits(&config);
    let limit = [check("slow", "1/h", 1, false)];
    assert_eq!(store.check(&limit).await.unwrap(), [Verdict::Allowed]);
    // Every client's commands wait 1.5 s: Redis is slow, not gone. The check must still be waiting past
    // redis-rs's 500 ms (asserted below) for the test to mean anything; 1.5 s leaves a stalled machine 1 s.
    let reply = redis.command(&["CLIENT", "PAUSE", "1500", "ALL"]);
    assert!(reply.starts_with("+OK"), "{reply}");
    let started = Instant::now();
    let answer = common::within("a check against a slow Redis", store.check(&limit)).await;
    let took = started.elapsed();
    assert!(
        matches!(answer.as_deref(), Ok([Verdict::Denied { .. }])),
        "decided in Redis after {took:?}: {answer:?}"
    );
    assert!(
        took >= Duration::from_millis(500),
        "Redis was paused: {took:?}"
    );
    assert_eq!(store.redis().fault(), None);
}

#[tokio::test]
async fn a_redis_answering_within_a_long_redis_timeout_decides() {
    a_slow_redis_decides(RedisServer::private(), "").await;
}

#[tokio::test]
async fn a_redis_cluster_answering_within_a_long_redis_timeout_decides() {
    a_slow_redis_decides(RedisServer::cluster(), "redis_cluster = true").await;
}
