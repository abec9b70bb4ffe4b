//! Issue 20's security review, one test (or more) per finding, over real sockets against the running
//! service: what an attacker on the port could do, and that it no longer works. The TLS lock-out test
//! lives with the other connection tests (tests/connections.rs,
//! `silent_sockets_never_shut_valid_tls_clients_out_and_one_host_cannot_take_every_place`).
//!
//! Each test also shows the positive control: what a well-behaved client does in the same situation
//! still works.

mod common;

use common::{
    PATIENCE,
    raw::{grpc_head, status},
};

use std::{
    net::SocketAddr,
    num::NonZeroUsize,
    time::{Duration, SystemTime},
};

use chat_token_service::{
    config::{Config, FailureMode, LimiterBackend, RedisUrl},
    domain::{AccountId, Limit, LimitKey, Rate, RoomArn, UserId},
    proto::ivschat::v1::{
        BanUserRequest, CreateChatTokenRequest, DisconnectUserRequest, ListBansRequest,
        VerifyChatTokenRequest, moderation_service_client::ModerationServiceClient,
    },
    store::{Backend, ModerationStore},
};
use common::{
    ACCOUNT_111_ROOM, Binary, LocalKeys, ROOM_ARN, TestServer,
    ivs_stub::{IvsStub, LAG},
    production_policy,
    redis_server::{RedisServer, unique_prefix},
    valid_request,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tonic::{Code, Request, Status, transport::Channel};
use tonic_types::StatusExt;

const CHAT_SERVER: &str = "spiffe://cluster.local/ns/chat/sa/chat-server";
const STRANGER: &str = "spiffe://cluster.local/ns/chat/sa/stranger";

async fn moderation(server: &TestServer) -> ModerationServiceClient<Channel> {
    ModerationServiceClient::new(server.channel().await)
}

/// `message` from `caller` (the `x-caller-id` header).
fn from<T>(caller: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("x-caller-id", caller.parse().unwrap());
    request
}

fn token_request(room: &str, user: &str) -> CreateChatTokenRequest {
    CreateChatTokenRequest {
        room_identifier: room.into(),
        user_id: user.into(),
        ..Default::default()
    }
}

fn verify(token: &str) -> VerifyChatTokenRequest {
    VerifyChatTokenRequest {
        token: token.into(),
    }
}

/// The ErrorInfo reason of `status`, or "" without one.
fn reason(status: &Status) -> String {
    status
        .get_details_error_info()
        .map(|info| info.reason)
        .unwrap_or_default()
}

/// Asserts `status` has `code` and, when given, ErrorInfo `why`.
#[track_caller]
fn assert_refused(status: &Status, code: Code, why: &str) {
    assert_eq!(status.code(), code, "{status:?}");
    assert_eq!(reason(status), why, "{status:?}");
}

/// A token for `user` in `room`, and when it expires.
async fn mint(server: &TestServer, room: &str, user: &str) -> (String, SystemTime) {
    let token = server
        .client()
        .await
        .create_chat_token(token_request(room, user))
        .await
        .unwrap()
        .into_inner();
    let exp = token.token_expiration_time.unwrap();
    let exp = SystemTime::UNIX_EPOCH + Duration::from_secs(exp.seconds as u64);
    (token.token, exp)
}

/// Sleeps until `at` (at once if it has passed).
async fn sleep_until(at: SystemTime) {
    if let Ok(wait) = at.duration_since(SystemTime::now()) {
        tokio::time::sleep(wait).await;
    }
}

// ---------------------------------------------------------------------------------------------------
// "Single-use tokens replay": the used record must outlive the token's last valid instant.

async fn single_use_server(tweak: impl FnOnce(&mut Config)) -> (LocalKeys, TestServer) {
    let keys = LocalKeys::new();
    let mut config = keys.config();
    config.moderation.single_use_tokens = true;
    config.local_issuer.token_ttl = Duration::from_secs(1);
    tweak(&mut config);
    let server = TestServer::from_config(config).await;
    (keys, server)
}

/// Verifies `token` once, then again just after its expiry (within the verify leeway): the second is
/// TOKEN_ALREADY_USED, never a second success; after the leeway it is TOKEN_EXPIRED.
async fn assert_used_once_until_the_end(server: &TestServer) {
    let (token, exp) = mint(server, ROOM_ARN, "viewer").await;
    let mut verifier = moderation(server).await;
    verifier.verify_chat_token(verify(&token)).await.unwrap();
    // The record used to live until `exp`; the token verifies until `exp + 5 s`.
    sleep_until(exp + Duration::from_secs(1)).await;
    let replay = verifier
        .verify_chat_token(verify(&token))
        .await
        .unwrap_err();
    assert_refused(&replay, Code::FailedPrecondition, "TOKEN_ALREADY_USED");
    sleep_until(exp + Duration::from_secs(4)).await;
    let replay = verifier
        .verify_chat_token(verify(&token))
        .await
        .unwrap_err();
    assert_refused(&replay, Code::FailedPrecondition, "TOKEN_ALREADY_USED");
    sleep_until(exp + Duration::from_secs(5)).await;
    let late = verifier
        .verify_chat_token(verify(&token))
        .await
        .unwrap_err();
    assert_refused(&late, Code::FailedPrecondition, "TOKEN_EXPIRED");
}

#[tokio::test]
async fn a_single_use_token_cannot_be_replayed_in_the_verify_leeway_in_memory() {
    let (_keys, server) = single_use_server(|_| {}).await;
    assert_used_once_until_the_end(&server).await;
}

#[tokio::test]
async fn a_single_use_token_cannot_be_replayed_in_the_verify_leeway_in_redis() {
    let redis = RedisServer::shared();
    let (_keys, server) = single_use_server(|config| {
        config.limiter.backend = LimiterBackend::Redis;
        config.limiter.redis_timeout = common::redis_timeout();
        config.limiter.redis_url = Some(RedisUrl::parse(&redis.url()).unwrap());
        config.limiter.key_prefix = unique_prefix();
    })
    .await;
    assert_used_once_until_the_end(&server).await;
}

// ---------------------------------------------------------------------------------------------------
// "Revocation forgotten": a revocation outlives every token it covers; a ban refuses its user's tokens.

#[tokio::test]
async fn a_disconnect_revokes_a_token_for_as_long_as_it_could_verify() {
    let keys = LocalKeys::new();
    let mut config = keys.config();
    config.local_issuer.token_ttl = Duration::from_secs(1);
    let server = TestServer::from_config(config).await;
    let (token, exp) = mint(&server, ROOM_ARN, "viewer").await;
    let mut moderator = moderation(&server).await;
    moderator
        .disconnect_user(DisconnectUserRequest {
            room_identifier: ROOM_ARN.into(),
            user_id: "viewer".into(),
            reason: "spam".into(),
        })
        .await
        .unwrap();
    // Kept `token_ttl` (1 s) from the disconnect, the revocation used to end before the token's leeway.
    sleep_until(exp + Duration::from_secs(2)).await;
    let status = moderator
        .verify_chat_token(verify(&token))
        .await
        .unwrap_err();
    assert_refused(&status, Code::FailedPrecondition, "TOKEN_REVOKED");
}

/// "Redis revocations move backwards": a revocation written late (a slower replica's, one microsecond
/// earlier) never un-revokes tokens in Redis; a later one still moves it forward.
#[tokio::test]
async fn a_redis_revocation_only_moves_forward() {
    let redis = RedisServer::shared();
    let mut config = Config::default();
    config.limiter.backend = LimiterBackend::Redis;
    config.limiter.redis_timeout = common::redis_timeout();
    config.limiter.redis_url = Some(RedisUrl::parse(&redis.url()).unwrap());
    config.limiter.key_prefix = unique_prefix();
    // Decided in Redis or not at all: a store that fell back in process would not be under test.
    config.limiter.failure_mode = FailureMode::FailClosed;
    // Each replica keeps a local copy of what it wrote and answers the later of it and Redis's: every
    // write and the read go through a replica of their own, so only Redis can carry the answer.
    let replica = || match Backend::new(&config.limiter).expect("no Redis TLS files") {
        Backend::Redis(stores) => stores.moderation,
        Backend::Memory(_) => panic!("the Redis backend was configured"),
    };
    let (first, late, reader) = (replica(), replica(), replica());
    let room = RoomArn::parse(ROOM_ARN).unwrap();
    let user = UserId::parse("viewer".into()).unwrap();
    let keep = Duration::from_secs(60);
    // Whole microseconds, as Redis keeps them.
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64;
    let at = |micros: u64| SystemTime::UNIX_EPOCH + Duration::from_micros(micros);
    let (t1, t2, t3) = (at(now - 1), at(now), at(now + 1));

    first.revoke(&room, &user, t2, keep).await.unwrap();
    assert_eq!(reader.revoked_at(&room, &user).await.unwrap(), Some(t2));
    late.revoke(&room, &user, t1, keep).await.unwrap();
    assert_eq!(
        reader.revoked_at(&room, &user).await.unwrap(),
        Some(t2),
        "an earlier revocation written late leaves the later one"
    );
    late.revoke(&room, &user, t3, keep).await.unwrap();
    assert_eq!(
        reader.revoked_at(&room, &user).await.unwrap(),
        Some(t3),
        "a later revocation moves it forward"
    );
}

#[tokio::test]
async fn a_banned_users_token_is_refused_as_user_banned_and_others_still_verify() {
    let keys = LocalKeys::new();
    let server = TestServer::from_config(keys.config()).await;
    let (banned, _) = mint(&server, ROOM_ARN, "troll").await;
    let (bystander, _) = mint(&server, ROOM_ARN, "bystander").await;
    let mut moderator = moderation(&server).await;
    moderator
        .ban_user(BanUserRequest {
            room_identifier: ROOM_ARN.into(),
            user_id: "troll".into(),
            reason: "raid".into(),
            duration: None,
        })
        .await
        .unwrap();
    let status = moderator
        .verify_chat_token(verify(&banned))
        .await
        .unwrap_err();
    assert_refused(&status, Code::PermissionDenied, "USER_BANNED");
    assert!(!format!("{status:?}").contains("raid"), "{status:?}");
    moderator
        .verify_chat_token(verify(&bystander))
        .await
        .expect("another user's token still verifies");
}

// ---------------------------------------------------------------------------------------------------
// "Memory before identity": request bytes are budgeted before anything is decoded; streams are capped.

#[tokio::test]
async fn unfinished_requests_past_the_byte_budget_are_shed_before_identity() {
    let keys = LocalKeys::new();
    let mut config = keys.config();
    config.transport.max_request_bytes_in_flight = NonZeroUsize::new(64 * 1024).unwrap();
    let server = TestServer::from_config(config).await;
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let (send, connection) = h2::client::handshake(tcp).await.unwrap();
    let connection = tokio::spawn(connection);

    // Calls that announce a 16,000-byte message, send 100 bytes of it and stall: four fit in 64 KiB.
    let mut prefix = vec![0u8];
    prefix.extend_from_slice(&16_000u32.to_be_bytes());
    prefix.extend_from_slice(&[0x0a; 100]);
    let mut stalled = Vec::new();
    for _ in 0..4 {
        let mut send = send.clone().ready().await.unwrap();
        let (response, mut body) = send
            .send_request(
                grpc_head(server.addr, "/ivschat.v1.TokenService/CreateChatToken", &[]),
                false,
            )
            .unwrap();
        body.send_data(prefix.clone().into(), false).unwrap();
        stalled.push((response, body));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The fifth is shed at once, with nothing decoded and no caller identified.
    let mut send = send.clone().ready().await.unwrap();
    let (fifth, mut body) = send
        .send_request(
            grpc_head(server.addr, "/ivschat.v1.TokenService/CreateChatToken", &[]),
            false,
        )
        .unwrap();
    body.send_data(prefix.clone().into(), false).unwrap();
    assert_eq!(status(fifth).await.0, Code::Unavailable);

    // A whole, small request still fits in what is left, and health checks are never shed.
    server
        .client()
        .await
        .create_chat_token(valid_request())
        .await
        .expect("a small call is served beside the stalled ones");
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel().await);
    health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap();
    drop(stalled);
    connection.abort();
}

/// Writes `request` on a new connection to `addr` and reads the whole answer (the request should say
/// `Connection: close`); waits at most [`PATIENCE`]. Returns the status and the head and body as text.
async fn http1(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(PATIENCE, tcp.read_to_end(&mut answer))
        .await
        .expect("the server answers and closes")
        .ok();
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    (status, answer)
}

/// A CreateChatToken POST to `addr` with `headers` (each `Name: value\r\n`) and a valid body.
fn create_chat_token_post(addr: SocketAddr, headers: &str) -> Vec<u8> {
    let body = format!(r#"{{"roomIdentifier":"{ROOM_ARN}","userId":"u"}}"#);
    format!(
        "POST /CreateChatToken HTTP/1.1\r\nHost: {addr}\r\n{headers}Content-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[tokio::test]
async fn unfinished_http_api_bodies_past_the_byte_budget_are_shed_with_503() {
    let keys = LocalKeys::new();
    let mut config = keys.config();
    config.transport.max_request_bytes_in_flight = NonZeroUsize::new(64 * 1024).unwrap();
    let server = TestServer::from_config(config).await;
    let head = |length: usize| {
        format!(
            "POST /CreateChatToken HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
             Content-Length: {length}\r\n\r\n{{",
            server.addr
        )
    };
    // Four bodies of 16,000 bytes announced, one byte sent: 64 KiB held.
    let mut stalled = Vec::new();
    for _ in 0..4 {
        let mut tcp = TcpStream::connect(server.addr).await.unwrap();
        tcp.write_all(head(16_000).as_bytes()).await.unwrap();
        stalled.push(tcp);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, answer) = http1(server.addr, head(16_000).as_bytes()).await;
    assert_eq!(status, 503, "{answer}");
    assert!(answer.contains("ServiceUnavailableException"), "{answer}");
    let (status, answer) = http1(
        server.addr,
        &create_chat_token_post(server.addr, "Content-Type: application/json\r\n"),
    )
    .await;
    assert_eq!(status, 200, "a small whole request is served: {answer}");
    drop(stalled);
}

#[tokio::test]
async fn health_watch_streams_are_capped_per_connection_and_end_at_their_maximum_age() {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let keys = LocalKeys::new();
    let mut config = keys.config();
    config.transport.max_stream_age = Duration::from_secs(1);
    let server = TestServer::from_config(config).await;
    let mut health = HealthClient::new(server.channel().await);
    let mut watches = Vec::new();
    for _ in 0..4 {
        let mut watch = health
            .watch(HealthCheckRequest::default())
            .await
            .unwrap()
            .into_inner();
        watch.message().await.unwrap().expect("SERVING");
        watches.push(watch);
    }
    // The fifth on the same connection is refused; another connection may still watch.
    let refused = match health.watch(HealthCheckRequest::default()).await {
        Err(status) => status,
        Ok(stream) => stream.into_inner().message().await.unwrap_err(),
    };
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    let mut elsewhere = HealthClient::new(server.channel().await);
    let mut other = elsewhere
        .watch(HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    other.message().await.unwrap().expect("SERVING");

    // Every stream ends at transport.max_stream_age (1 s) with UNAVAILABLE: the client watches again.
    let ended = tokio::time::timeout(PATIENCE, async {
        loop {
            match watches[0].message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("a watch must end with a status"),
                Err(status) => break status,
            }
        }
    })
    .await
    .expect("the watch ends at its maximum age");
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
    assert!(ended.message().contains("max_stream_age"), "{ended:?}");
}

// ---------------------------------------------------------------------------------------------------
// "Cancelled ban, no audit": a stored ban is completed and audited even when the caller goes away.

#[tokio::test]
async fn a_ban_cancelled_by_its_caller_is_still_completed_and_audited() {
    let stub = IvsStub::start().await;
    let endpoint = stub.endpoint();
    let binary = Binary::start(&[
        ("CTS_ISSUER", "ivs"),
        ("CTS_IVS__ENDPOINT_URL", &endpoint),
        ("CTS_LOG_FORMAT", "json"),
        ("AWS_ACCESS_KEY_ID", "AKIDFROMENV"),
        ("AWS_SECRET_ACCESS_KEY", "env-secret"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ]);
    let room = "arn:aws:ivschat:us-west-2:123456789012:room/lag-ban";
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", binary.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut moderator = ModerationServiceClient::new(channel.clone());
    // The ban is stored at once; the disconnect that follows takes the stub 1.5 s. The caller gives up
    // once the disconnect has reached the stub: its call is cancelled (RST_STREAM), the ban is not.
    let cancelled = tokio::spawn(async move {
        moderator
            .ban_user(BanUserRequest {
                room_identifier: room.into(),
                user_id: "troll".into(),
                reason: "raid".into(),
                duration: None,
            })
            .await
    });
    common::eventually("the ban's disconnect to reach the stub", || async {
        (stub.attempts("lag-ban") > 0).then_some(())
    })
    .await;
    cancelled.abort();
    // The disconnect still reaches IVS.
    tokio::time::timeout(PATIENCE, async {
        while !stub
            .calls()
            .iter()
            .any(|call| call.operation == "DisconnectUser" && call.response.is_some())
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the ban's disconnect completes after its caller went away");
    let bans = ModerationServiceClient::new(channel)
        .list_bans(ListBansRequest {
            room_identifier: room.into(),
            page_size: 0,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(bans.bans.len(), 1);
    let ban_audited = |line: &String| {
        serde_json::from_str::<serde_json::Value>(line).is_ok_and(|line| {
            line["target"] == "audit"
                && line["fields"]["message"] == "moderation done"
                && line["span"]["action"] == "BanUser"
        })
    };
    let mut log = Vec::new();
    common::within("the cancelled ban's audit line", async {
        while !log.iter().any(ban_audited) {
            log.extend(binary.log.try_iter());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    binary.signal("-TERM");
    log.extend(binary.exit().await.1);
    let audited = log.iter().filter(|line| ban_audited(line)).count();
    assert_eq!(audited, 1, "the cancelled ban is audited once: {log:#?}");
}

// ---------------------------------------------------------------------------------------------------
// "Browser-reachable local mode": what a web page can send is refused; what SDKs send is served.

#[tokio::test]
async fn the_http_api_refuses_what_a_web_page_can_send_and_serves_what_sdks_send() {
    let keys = LocalKeys::new();
    let server = TestServer::from_config(keys.config()).await;
    let addr = server.addr;
    let port = addr.port();
    for (headers, status, case) in [
        ("", 415, "no Content-Type: a cross-site simple request"),
        ("Content-Type: text/plain\r\n", 415, "a form's text/plain"),
        (
            "Content-Type: application/x-www-form-urlencoded\r\n",
            415,
            "a form post",
        ),
        (
            "Content-Type: application/json\r\nOrigin: https://evil.example\r\n",
            403,
            "a page's fetch",
        ),
        (
            "Content-Type: application/json\r\nSec-Fetch-Site: cross-site\r\n",
            403,
            "a cross-site request without Origin",
        ),
        ("Content-Type: application/json\r\n", 200, "the AWS SDKs"),
        (
            "Content-Type: application/x-amz-json-1.1\r\n",
            200,
            "the JSON protocol's type",
        ),
        (
            "Content-Type: application/json; charset=utf-8\r\n",
            200,
            "with a charset",
        ),
    ] {
        let (got, answer) = http1(addr, &create_chat_token_post(addr, headers)).await;
        assert_eq!(got, status, "{case}: {answer}");
    }
    // DNS rebinding: a page's own name, now resolving to 127.0.0.1, is refused; loopback names are not.
    for (host, status) in [
        (format!("evil.example:{port}"), 403),
        (format!("127.0.0.1.nip.example:{port}"), 403),
        (format!("localhost:{port}"), 200),
        (format!("[::1]:{port}"), 200),
        (format!("127.0.0.2:{port}"), 200),
    ] {
        let body = format!(r#"{{"roomIdentifier":"{ROOM_ARN}","userId":"u"}}"#);
        let request = format!(
            "POST /CreateChatToken HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let (got, answer) = http1(addr, request.as_bytes()).await;
        assert_eq!(got, status, "Host: {host}: {answer}");
    }
    // The moderation door a page would aim at is guarded the same way.
    let disconnect = format!(
        "POST /DisconnectUser HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
    );
    let (got, answer) = http1(addr, disconnect.as_bytes()).await;
    assert_eq!(got, 415, "{answer}");
}

#[tokio::test]
async fn an_allowed_origin_may_call_the_http_api() {
    let keys = LocalKeys::new();
    let mut config = keys.config();
    config.http_api.allowed_origins = vec!["https://admin.example".into()];
    let server = TestServer::from_config(config).await;
    let addr = server.addr;
    let (got, answer) = http1(
        addr,
        &create_chat_token_post(
            addr,
            "Content-Type: application/json\r\nOrigin: https://admin.example\r\nSec-Fetch-Site: cross-site\r\n",
        ),
    )
    .await;
    assert_eq!(got, 200, "{answer}");
    let (got, answer) = http1(
        addr,
        &create_chat_token_post(
            addr,
            "Content-Type: application/json\r\nOrigin: https://other.example\r\n",
        ),
    )
    .await;
    assert_eq!(got, 403, "{answer}");
}

// ---------------------------------------------------------------------------------------------------
// Lower findings.

/// "Moderation calls are outside max_concurrent_calls": they take a place like every call, on both doors.
#[tokio::test]
async fn moderation_calls_take_a_place_under_the_same_cap_on_both_doors() {
    let stub = IvsStub::start().await;
    let server = TestServer::ivs(&stub, |config| {
        config.max_concurrent_calls = NonZeroUsize::new(1).unwrap();
    })
    .await;
    // A token call the stub answers after 1.5 s holds the only place.
    let mut holder = server.client().await;
    let held = tokio::spawn(async move {
        holder
            .create_chat_token(token_request(
                "arn:aws:ivschat:us-west-2:123456789012:room/lag-hold",
                "u",
            ))
            .await
    });
    common::eventually("the held call to reach the stub", || async {
        (stub.attempts("lag-hold") > 0).then_some(())
    })
    .await;
    let disconnect = DisconnectUserRequest {
        room_identifier: ROOM_ARN.into(),
        user_id: "u".into(),
        reason: "spam".into(),
    };
    let mut moderator = moderation(&server).await;
    let shed = moderator
        .disconnect_user(disconnect.clone())
        .await
        .unwrap_err();
    assert_eq!(shed.code(), Code::Unavailable, "{shed:?}");
    let body = format!(r#"{{"roomIdentifier":"{ROOM_ARN}","userId":"u","reason":"spam"}}"#);
    let request = format!(
        "POST /DisconnectUser HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        server.addr,
        body.len()
    );
    let (status, answer) = http1(server.addr, request.as_bytes()).await;
    assert_eq!(status, 503, "{answer}");
    held.await.unwrap().expect("the held call completes");
    moderator
        .disconnect_user(disconnect)
        .await
        .expect("served once the place is free");
}

/// "HTTP/1.1 heads bounded by hyper's ~400 KiB default", and "the first-bytes timeout ends after any 24
/// bytes": heads are bounded by transport.max_header_list_bytes, and a connection must send a whole
/// first request within transport.preface_timeout.
#[tokio::test]
async fn request_heads_are_bounded_in_size_and_time_on_both_protocols() {
    let keys = LocalKeys::new();
    let mut config = keys.config();
    config.transport.preface_timeout = Duration::from_millis(500);
    let server = TestServer::from_config(config).await;
    let addr = server.addr;

    let header = |bytes: usize| {
        format!(
            "X-Padding: {}\r\nContent-Type: application/json\r\n",
            "p".repeat(bytes)
        )
    };
    let (status, answer) = http1(addr, &create_chat_token_post(addr, &header(8 * 1024))).await;
    assert_eq!(status, 200, "an 8 KiB head is served: {answer}");
    let (status, answer) = http1(addr, &create_chat_token_post(addr, &header(32 * 1024))).await;
    assert_eq!(status, 431, "a 32 KiB head is refused: {answer}");

    // A head that never ends, and an HTTP/2 connection that sends its preface and SETTINGS but never a
    // call, are closed like silent ones.
    let started = tokio::time::Instant::now();
    let mut slow_head = TcpStream::connect(addr).await.unwrap();
    slow_head
        .write_all(b"POST /CreateChatToken HTTP/1.1\r\nHost: localhost\r\n")
        .await
        .unwrap();
    let mut preface_only = TcpStream::connect(addr).await.unwrap();
    preface_only
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    // On a kept-alive HTTP/1.1 connection, a later head that never ends is bounded the same way.
    let mut second_head = TcpStream::connect(addr).await.unwrap();
    let body = format!(r#"{{"roomIdentifier":"{ROOM_ARN}","userId":"u"}}"#);
    second_head
        .write_all(
            format!(
                "POST /CreateChatToken HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\n\r\n{body}POST /CreateChatToken HTTP/1.1\r\nHost: {addr}\r\n",
                body.len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    for tcp in [&mut slow_head, &mut preface_only, &mut second_head] {
        let mut buf = [0u8; 1024];
        tokio::time::timeout(PATIENCE, async {
            loop {
                match tcp.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    // The server's own SETTINGS, a 408, a GOAWAY.
                    Ok(_) => continue,
                }
            }
        })
        .await
        .expect("closed after transport.preface_timeout");
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

/// "VerifyChatToken tells a caller that policy denies which state a token is in, unthrottled": policy
/// decides first, and verification has a rate limit of its own.
#[tokio::test]
async fn verify_chat_token_tells_a_denied_caller_nothing_and_is_rate_limited() {
    let keys = LocalKeys::new();
    let mut config = keys.config();
    production_policy(&mut config);
    config.local_issuer.token_ttl = Duration::from_secs(1);
    config.rate_limits = vec![Limit {
        name: "per-caller".into(),
        key: LimitKey::Caller,
        rate: Rate::parse("1/min").unwrap(),
        burst: std::num::NonZeroU32::new(4).unwrap(),
        shadow: false,
    }];
    let server = TestServer::from_config(config).await;
    let web = common::WEB;
    let token = server
        .client()
        .await
        .create_chat_token(from(web, token_request(ACCOUNT_111_ROOM, "viewer")))
        .await
        .unwrap()
        .into_inner()
        .token;
    let mut verifier = moderation(&server).await;
    let tampered = format!("{}A", &token[..token.len() - 1]);

    // A caller policy does not let verify learns nothing: genuine, tampered and garbage look alike.
    for probe in [&token, &tampered, "v4.local.garbage"] {
        let status = verifier
            .verify_chat_token(from(STRANGER, verify(probe)))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    }
    // The chat server learns the state of its own rooms' tokens, and a token that does not open names
    // no room of its account: it is told no more than the stranger.
    let tampered_refused = verifier
        .verify_chat_token(from(CHAT_SERVER, verify(&tampered)))
        .await
        .unwrap_err();
    assert_eq!(tampered_refused.code(), Code::PermissionDenied);
    // Its verifications spend a budget of their own (burst 4): the fourth is within it, the fifth is not,
    // and its token budget is untouched.
    for _ in 0..4 {
        verifier
            .verify_chat_token(from(CHAT_SERVER, verify(&token)))
            .await
            .expect("a genuine token of its account, within the budget");
    }
    let limited = verifier
        .verify_chat_token(from(CHAT_SERVER, verify(&token)))
        .await
        .unwrap_err();
    assert_eq!(limited.code(), Code::ResourceExhausted, "{limited:?}");
    server
        .client()
        .await
        .create_chat_token(from(CHAT_SERVER, token_request(ACCOUNT_111_ROOM, "u")))
        .await
        .expect("minting has a budget of its own");
}

/// "A REST call cut by max_call_duration answers HTTP 200": it answers 504, IVS's shape; gRPC gets
/// DEADLINE_EXCEEDED.
#[tokio::test]
async fn a_call_cut_by_max_call_duration_is_a_timeout_on_both_doors() {
    let stub = IvsStub::start().await;
    let server = TestServer::ivs(&stub, |config| {
        config.transport.max_call_duration = Duration::from_secs(1);
    })
    .await;
    let room = "arn:aws:ivschat:us-west-2:123456789012:room/lag-long";
    let body = format!(r#"{{"roomIdentifier":"{room}","userId":"u"}}"#);
    let request = format!(
        "POST /CreateChatToken HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        server.addr,
        body.len()
    );
    let started = tokio::time::Instant::now();
    let (status, answer) = http1(server.addr, request.as_bytes()).await;
    assert_eq!(status, 504, "{answer}");
    assert!(answer.contains("RequestTimeoutException"), "{answer}");
    assert!(started.elapsed() < LAG, "{:?}", started.elapsed());
    let status = server
        .client()
        .await
        .create_chat_token(token_request(room, "u"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("max_call_duration"), "{status:?}");
}

/// "BanUser stores bans for rooms the issuer does not serve": refused before anything is stored.
#[tokio::test]
async fn a_ban_for_a_room_the_issuer_does_not_serve_is_refused_and_never_stored() {
    let redis = RedisServer::shared();
    let prefix = unique_prefix();
    let stub = IvsStub::start().await;
    let server = TestServer::ivs(&stub, |config| {
        config.ivs.allowed_accounts = vec![AccountId::parse("111111111111").unwrap()];
        config.limiter.backend = LimiterBackend::Redis;
        config.limiter.redis_timeout = common::redis_timeout();
        config.limiter.redis_url = Some(RedisUrl::parse(&redis.url()).unwrap());
        config.limiter.key_prefix = prefix.clone();
    })
    .await;
    let mut moderator = moderation(&server).await;
    let unserved = "arn:aws:ivschat:us-west-2:222222222222:room/elsewhere";
    let ban = |room: &str| BanUserRequest {
        room_identifier: room.into(),
        user_id: "troll".into(),
        reason: "raid".into(),
        duration: None,
    };
    let refused = moderator.ban_user(ban(unserved)).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(redis.keys(&prefix).is_empty(), "{:?}", redis.keys(&prefix));
    moderator
        .ban_user(ban(ACCOUNT_111_ROOM))
        .await
        .expect("a served room's ban is stored");
    assert!(!redis.keys(&prefix).is_empty());
}

/// "Reflection is always on, uncapped, and outlives max_call_duration".
#[tokio::test]
async fn reflection_can_be_turned_off_and_its_streams_are_capped_and_timed() {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest,
    };
    let keys = LocalKeys::new();
    let mut config = keys.config();
    config.reflection.enabled = false;
    let off = TestServer::from_config(config).await;
    let status = common::reflect_status(off.channel().await).await;
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");

    let mut config = keys.config();
    config.transport.max_call_duration = Duration::from_secs(1);
    let on = TestServer::from_config(config).await;
    let mut client = ServerReflectionClient::new(on.channel().await);
    let list = || ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    // Four open streams on one connection; the fifth is refused.
    let mut open = Vec::new();
    for _ in 0..4 {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(list()).await.unwrap();
        let mut stream = client
            .server_reflection_info(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        stream.message().await.unwrap().expect("the service list");
        open.push((tx, stream));
    }
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(list()).await.unwrap();
    let refused = match client
        .server_reflection_info(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
    {
        Err(status) => status,
        Ok(stream) => stream.into_inner().message().await.unwrap_err(),
    };
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    // An open stream ends at max_call_duration.
    let (_tx, stream) = &mut open[0];
    let ended = tokio::time::timeout(PATIENCE, stream.message())
        .await
        .expect("the stream ends at max_call_duration")
        .unwrap_err();
    assert_eq!(ended.code(), Code::DeadlineExceeded, "{ended:?}");
}

/// "xfcc off loopback is not covered by trust_network_in_front".
#[test]
fn xfcc_off_loopback_needs_trust_network_in_front() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("p.cedar");
    std::fs::write(&policy, "permit (principal, action, resource);").unwrap();
    let run = |trust: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_chat-token-service"))
            .arg("check")
            .env_clear()
            .env("CTS_LISTEN_ADDR", "0.0.0.0:50051")
            .env("CTS_POLICY__FILES", format!("[\"{}\"]", policy.display()))
            .env("CTS_IDENTITY__SOURCES", "[\"xfcc\"]")
            .env("CTS_IDENTITY__ALLOW_ANONYMOUS", "false")
            .env("CTS_IDENTITY__TRUST_NETWORK_IN_FRONT", trust)
            .output()
            .unwrap()
    };
    let refused = run("false");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("identity.trust_network_in_front") && stderr.contains("\"xfcc\""),
        "{stderr}"
    );
    let trusted = run("true");
    assert!(
        trusted.status.success(),
        "{}",
        String::from_utf8_lossy(&trusted.stderr)
    );
}

/// "The SigV4 credentials file's permissions are not checked": a file others may read is warned about.
#[test]
fn a_sigv4_credentials_file_others_can_read_is_warned_about() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sigv4.toml");
    std::fs::write(
        &file,
        "[[keys]]\naccess_key_id = \"CTSTEST000000000001\"\n\
         secret_access_key = \"wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY\"\nprincipal = \"web\"\n",
    )
    .unwrap();
    let check = |mode: u32| {
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
        let binary = Binary::start(&[
            ("CTS_IDENTITY__SOURCES", "[\"sigv4\", \"header\"]"),
            (
                "CTS_IDENTITY__SIGV4__CREDENTIALS_FILE",
                file.to_str().unwrap(),
            ),
        ]);
        binary.signal("-TERM");
        let (status, log) = binary.wait();
        assert!(status.success(), "{log:#?}");
        log.join("\n")
    };
    let shared = check(0o644);
    assert!(
        shared.contains("the SigV4 credentials file is accessible to its group or others"),
        "{shared}"
    );
    assert!(!shared.contains("EXAMPLEKEY"), "{shared}");
    let private = check(0o600);
    assert!(!private.contains("SigV4 credentials file"), "{private}");
}

/// Start-up warns when the transport's bounds could take more than three quarters of the memory limit.
#[test]
fn start_up_warns_when_the_transport_bounds_do_not_fit_the_memory_limit() {
    let warned = |limit: &str| {
        let binary = Binary::start(&[("CTS_TRANSPORT__MEMORY_LIMIT_BYTES", limit)]);
        binary.signal("-TERM");
        let (_, log) = binary.wait();
        log.iter()
            .any(|line| line.contains("transport.memory_limit_bytes"))
    };
    // The defaults' bound: 4096 connections × 64 KiB + 3 × 16 MiB = 304 MiB; three quarters of 405 MiB
    // is 303.75 MiB, of 406 MiB 304.5 MiB.
    assert!(warned(&(405u64 << 20).to_string()));
    assert!(!warned(&(406u64 << 20).to_string()));
}

/// "The production example configs turn the HTTP API on": they turn on only what they need.
#[test]
fn the_production_example_turns_on_only_what_it_needs() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/config.production.example.toml"
    ))
    .unwrap();
    let config: Config = toml::from_str(&text).unwrap();
    assert!(!config.http_api.enabled);
    assert!(!config.reflection.enabled);
    assert!(!config.identity.allow_anonymous);
}
