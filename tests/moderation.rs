//! ModerationService end to end over real sockets: bans keep a user out of CreateChatToken (and only that
//! user), end on time, lift and list; two processes sharing a real Redis share bans; the ivs issuer forwards
//! DisconnectUser to the IVS stub signed for the room's region; the local issuer revokes and verifies its
//! tokens; the production policy gives moderation to moderators only.

mod common;

use std::time::{Duration, SystemTime};

use chat_token_service::{
    config::{Config, FailureMode, LimiterBackend, RedisUrl},
    domain::Rate,
    identity::IdentitySource,
    issuer::local::generate_key,
    proto::ivschat::v1::{
        BanUserRequest, CreateChatTokenRequest, DisconnectUserRequest, ListBansRequest,
        UnbanUserRequest, VerifyChatTokenRequest,
        moderation_service_client::ModerationServiceClient,
        token_service_client::TokenServiceClient,
    },
};
use common::{
    ACCOUNT_111_ROOM, Binary, LocalKeys, MODERATION, ROOM_ARN, TestServer, WEB,
    ivs_stub::IvsStub,
    production_policy,
    redis_server::{RedisServer, unique_prefix},
};
use tonic::{Code, Request, Status, transport::Channel};
use tonic_types::StatusExt;

async fn moderation_client(server: &TestServer) -> ModerationServiceClient<Channel> {
    ModerationServiceClient::new(server.channel().await)
}

fn token_request(room: &str, user: &str) -> CreateChatTokenRequest {
    CreateChatTokenRequest {
        room_identifier: room.into(),
        user_id: user.into(),
        ..Default::default()
    }
}

fn ban(room: &str, user: &str, seconds: Option<i64>, reason: &str) -> BanUserRequest {
    BanUserRequest {
        room_identifier: room.into(),
        user_id: user.into(),
        duration: seconds.map(|seconds| prost_types::Duration { seconds, nanos: 0 }),
        reason: reason.into(),
    }
}

/// The ErrorInfo reason of `status`.
fn reason(status: &Status) -> String {
    status
        .get_details_error_info()
        .map(|info| info.reason)
        .unwrap_or_default()
}

/// Asserts `status` is the USER_BANNED refusal, ending at `until` (none: until unbanned), and that it
/// does not show the moderators' reason.
fn assert_banned(status: &Status, until: Option<SystemTime>, secret_reason: &str) {
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "USER_BANNED");
    assert_eq!(
        info.metadata.get("expires_at").cloned(),
        until.map(|end| humantime::format_rfc3339_millis(end).to_string())
    );
    assert!(!format!("{status:?}").contains(secret_reason), "{status:?}");
}

#[tokio::test]
async fn a_ban_refuses_only_the_banned_user_and_ends_on_time() {
    let keys = LocalKeys::new();
    let server = TestServer::from_config(keys.config()).await;
    let mut tokens = server.client().await;
    let mut moderation = moderation_client(&server).await;

    let banned = moderation
        .ban_user(ban(ROOM_ARN, "troll", Some(2), "posted spam links"))
        .await
        .unwrap()
        .into_inner()
        .ban
        .unwrap();
    let until: SystemTime = banned.expiration_time.unwrap().try_into().unwrap();
    let created: SystemTime = banned.created_time.unwrap().try_into().unwrap();
    assert_eq!(
        until.duration_since(created).unwrap(),
        Duration::from_secs(2)
    );
    assert_eq!(banned.banned_by, "anonymous");

    let refused = tokens
        .create_chat_token(token_request(ROOM_ARN, "troll"))
        .await
        .unwrap_err();
    assert_banned(&refused, Some(until), "spam links");
    // Others in the room, and the same user elsewhere, still get tokens.
    tokens
        .create_chat_token(token_request(ROOM_ARN, "bystander"))
        .await
        .unwrap();
    tokens
        .create_chat_token(token_request(ACCOUNT_111_ROOM, "troll"))
        .await
        .unwrap();

    // Refused up to the end of the ban: every answer given wholly before `until` is a refusal (one that
    // comes back after it may have been decided on either side, so it proves nothing); the last refusal
    // comes close to the end. Admitted from then on.
    let mut last_refusal = None;
    while SystemTime::now() < until {
        let answer = tokens
            .create_chat_token(token_request(ROOM_ARN, "troll"))
            .await;
        let answered = SystemTime::now();
        if answered < until {
            assert_banned(&answer.unwrap_err(), Some(until), "spam links");
            last_refusal = Some(until.duration_since(answered).unwrap());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let early = last_refusal.expect("a refusal before the ban's end");
    assert!(
        early < Duration::from_millis(1000),
        "the last refusal came {early:?} before the ban's end: too slow to tell"
    );
    tokens
        .create_chat_token(token_request(ROOM_ARN, "troll"))
        .await
        .expect("the ban has ended");
}

#[tokio::test]
async fn unban_lifts_a_ban_at_once_and_says_whether_there_was_one() {
    let keys = LocalKeys::new();
    let server = TestServer::from_config(keys.config()).await;
    let mut tokens = server.client().await;
    let mut moderation = moderation_client(&server).await;

    moderation
        .ban_user(ban(ROOM_ARN, "troll", None, "harassment"))
        .await
        .unwrap();
    let refused = tokens
        .create_chat_token(token_request(ROOM_ARN, "troll"))
        .await
        .unwrap_err();
    assert_banned(&refused, None, "harassment");

    let unban = UnbanUserRequest {
        room_identifier: ROOM_ARN.into(),
        user_id: "troll".into(),
    };
    assert!(
        moderation
            .unban_user(unban.clone())
            .await
            .unwrap()
            .into_inner()
            .was_banned
    );
    tokens
        .create_chat_token(token_request(ROOM_ARN, "troll"))
        .await
        .unwrap();
    assert!(
        !moderation
            .unban_user(unban)
            .await
            .unwrap()
            .into_inner()
            .was_banned
    );
}

#[tokio::test]
async fn list_bans_pages_through_every_ban_once_with_who_when_why_and_until() {
    let keys = LocalKeys::new();
    let server = TestServer::from_config(keys.config()).await;
    let mut moderation = moderation_client(&server).await;
    for i in 0..5 {
        moderation
            .ban_user(ban(
                ROOM_ARN,
                &format!("user-{i}"),
                Some(600),
                &format!("reason {i}"),
            ))
            .await
            .unwrap();
    }
    moderation
        .ban_user(ban(ACCOUNT_111_ROOM, "elsewhere", None, "other room"))
        .await
        .unwrap();

    let mut listed = Vec::new();
    let mut page_token = String::new();
    let mut pages = 0;
    loop {
        let page = moderation
            .list_bans(ListBansRequest {
                room_identifier: ROOM_ARN.into(),
                page_size: 2,
                page_token,
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(
            pages <= 3,
            "more pages than bans: the page token never ends"
        );
        assert!(page.bans.len() <= 2);
        listed.extend(page.bans);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(pages, 3);
    let mut users: Vec<_> = listed.iter().map(|b| b.user_id.clone()).collect();
    users.sort();
    assert_eq!(users, ["user-0", "user-1", "user-2", "user-3", "user-4"]);
    for entry in &listed {
        assert_eq!(entry.room_identifier, ROOM_ARN);
        assert_eq!(entry.banned_by, "anonymous");
        assert_eq!(entry.reason, format!("reason {}", &entry.user_id[5..]));
        assert!(entry.created_time.is_some() && entry.expiration_time.is_some());
    }

    // The page size's edges: 1000 is the most, 1001 one too many.
    let list = |page_size| ListBansRequest {
        room_identifier: ROOM_ARN.into(),
        page_size,
        page_token: String::new(),
    };
    assert_eq!(
        moderation
            .list_bans(list(1000))
            .await
            .unwrap()
            .into_inner()
            .bans
            .len(),
        5
    );
    let too_big = moderation.list_bans(list(1001)).await.unwrap_err();
    assert_eq!(too_big.code(), Code::InvalidArgument);
    assert_eq!(
        too_big.get_details_bad_request().unwrap().field_violations[0].field,
        "page_size"
    );
    let bad_token = moderation
        .list_bans(ListBansRequest {
            page_token: "not-ours".into(),
            ..list(10)
        })
        .await
        .unwrap_err();
    assert_eq!(bad_token.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn moderation_requests_are_validated_at_their_edges() {
    let keys = LocalKeys::new();
    let mut config = keys.config();
    config.moderation.max_ban_duration = Duration::from_secs(3600);
    let server = TestServer::from_config(config).await;
    let mut moderation = moderation_client(&server).await;
    let field = |status: Status| {
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        status
            .get_details_bad_request()
            .unwrap()
            .field_violations
            .into_iter()
            .map(|v| v.field)
            .collect::<Vec<_>>()
    };

    // Reason: 1 to 256 characters.
    let disconnect = |reason: String| DisconnectUserRequest {
        room_identifier: ROOM_ARN.into(),
        user_id: "u".into(),
        reason,
    };
    moderation
        .disconnect_user(disconnect("x".into()))
        .await
        .unwrap();
    moderation
        .disconnect_user(disconnect("é".repeat(256)))
        .await
        .unwrap();
    assert_eq!(
        field(
            moderation
                .disconnect_user(disconnect("é".repeat(257)))
                .await
                .unwrap_err()
        ),
        ["reason"]
    );
    assert_eq!(
        field(
            moderation
                .disconnect_user(disconnect(String::new()))
                .await
                .unwrap_err()
        ),
        ["reason"]
    );

    // Duration: 1 s to the configured maximum, whole seconds.
    moderation
        .ban_user(ban(ROOM_ARN, "a", Some(1), "r"))
        .await
        .unwrap();
    moderation
        .ban_user(ban(ROOM_ARN, "b", Some(3600), "r"))
        .await
        .unwrap();
    assert_eq!(
        field(
            moderation
                .ban_user(ban(ROOM_ARN, "c", Some(3601), "r"))
                .await
                .unwrap_err()
        ),
        ["duration"]
    );
    assert_eq!(
        field(
            moderation
                .ban_user(ban(ROOM_ARN, "c", Some(0), "r"))
                .await
                .unwrap_err()
        ),
        ["duration"]
    );

    // Every bad field at once.
    let all_bad = moderation
        .ban_user(BanUserRequest {
            room_identifier: "nope".into(),
            user_id: String::new(),
            duration: Some(prost_types::Duration {
                seconds: 5,
                nanos: 1,
            }),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        field(all_bad),
        ["room_identifier", "user_id", "duration", "reason"]
    );
}

/// Redis' MONITOR feed: every command any client sends, one line each (commands run by scripts show as
/// `[0 lua]`).
struct Monitor {
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::net::TcpStream>>,
}

impl Monitor {
    async fn start(redis: &RedisServer) -> Monitor {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(redis.addr).await.unwrap();
        stream.write_all(b"MONITOR\r\n").await.unwrap();
        let mut lines = tokio::io::BufReader::new(stream).lines();
        assert_eq!(lines.next_line().await.unwrap().as_deref(), Some("+OK"));
        Monitor { lines }
    }

    /// The commands seen that name `prefix`'s keys and came from a client rather than a script, up to
    /// `ECHO <marker>` (sent here, after everything to count).
    async fn client_commands(mut self, redis: &RedisServer, prefix: &str) -> Vec<String> {
        let marker = format!("{prefix}:end-of-count");
        redis.command(&["ECHO", &marker]);
        common::within("MONITOR to show the marker", async {
            let mut seen = Vec::new();
            while let Some(line) = self.lines.next_line().await.unwrap() {
                if line.contains(&marker) {
                    return seen;
                }
                // The health probe (`<prefix>:probe`) runs every second whatever the requests do.
                if line.contains(prefix) && !line.contains(" lua]") && !line.contains(":probe") {
                    seen.push(line);
                }
            }
            panic!("MONITOR ended before the marker");
        })
        .await
    }
}

#[tokio::test]
async fn one_redis_round_trip_per_token_request_with_the_ban_check_and_three_limits() {
    let redis = RedisServer::shared();
    let url = redis.url();
    let prefix = unique_prefix();
    let key = generate_key();
    let env = [
        ("CTS_LIMITER__BACKEND", "redis"),
        ("CTS_LIMITER__REDIS_TIMEOUT", common::REDIS_TIMEOUT_SETTING),
        ("CTS_LIMITER__REDIS_URL", url.as_str()),
        ("CTS_LIMITER__KEY_PREFIX", prefix.as_str()),
        ("CTS_LOCAL_ISSUER__KEY", key.as_str()),
        (
            "CTS_RATE_LIMITS",
            r#"[{name="caller",key="caller",rate="1000/s",burst=1000},
                {name="user",key="user",rate="1/h",burst=1},
                {name="room",key="room",rate="1000/s",burst=1000}]"#,
        ),
    ];
    let binary = Binary::start(&env);
    let mut tokens = binary.client().await;
    let mut moderation = ModerationServiceClient::connect(format!("http://{}", binary.addr))
        .await
        .unwrap();
    // The first call loads the script (NOSCRIPT, SCRIPT LOAD, EVALSHA): not counted.
    tokens
        .create_chat_token(token_request(ROOM_ARN, "warm-up"))
        .await
        .unwrap();
    moderation
        .ban_user(ban(ROOM_ARN, "troll", Some(300), "raid"))
        .await
        .unwrap();

    let monitor = Monitor::start(&redis).await;
    for user in ["ann", "bob", "cy"] {
        tokens
            .create_chat_token(token_request(ROOM_ARN, user))
            .await
            .unwrap();
    }
    for _ in 0..3 {
        let refused = tokens
            .create_chat_token(token_request(ROOM_ARN, "troll"))
            .await
            .unwrap_err();
        assert_eq!(reason(&refused), "USER_BANNED", "{refused:?}");
    }
    let sent = monitor.client_commands(&redis, &prefix).await;
    assert_eq!(
        sent.len(),
        6,
        "one command per request, ban check and three limits together: {sent:#?}"
    );
    assert!(
        sent.iter().all(|line| line.contains("\"EVALSHA\"")),
        "{sent:#?}"
    );

    // The banned requests spent none of the user's budget of one.
    moderation
        .unban_user(UnbanUserRequest {
            room_identifier: ROOM_ARN.into(),
            user_id: "troll".into(),
        })
        .await
        .unwrap();
    tokens
        .create_chat_token(token_request(ROOM_ARN, "troll"))
        .await
        .unwrap();
    let exhausted = tokens
        .create_chat_token(token_request(ROOM_ARN, "troll"))
        .await
        .unwrap_err();
    assert_eq!(exhausted.code(), Code::ResourceExhausted, "{exhausted:?}");
}

#[tokio::test]
async fn a_ban_through_one_process_is_refused_by_another_sharing_redis() {
    let redis = RedisServer::shared();
    let url = redis.url();
    let prefix = unique_prefix();
    let key = generate_key();
    let env = [
        ("CTS_LIMITER__BACKEND", "redis"),
        ("CTS_LIMITER__REDIS_TIMEOUT", common::REDIS_TIMEOUT_SETTING),
        ("CTS_LIMITER__REDIS_URL", url.as_str()),
        ("CTS_LIMITER__KEY_PREFIX", prefix.as_str()),
        ("CTS_LOCAL_ISSUER__KEY", key.as_str()),
    ];
    let first = Binary::start(&env);
    let second = Binary::start(&env);
    let mut moderation = ModerationServiceClient::connect(format!("http://{}", first.addr))
        .await
        .unwrap();
    let mut elsewhere = ModerationServiceClient::connect(format!("http://{}", second.addr))
        .await
        .unwrap();
    let mut tokens = second.client().await;

    tokens
        .create_chat_token(token_request(ROOM_ARN, "troll"))
        .await
        .unwrap();
    let ban = moderation
        .ban_user(ban(ROOM_ARN, "troll", Some(300), "raid"))
        .await
        .unwrap()
        .into_inner()
        .ban
        .unwrap();
    let until: SystemTime = ban.expiration_time.unwrap().try_into().unwrap();
    let refused = tokens
        .create_chat_token(token_request(ROOM_ARN, "troll"))
        .await
        .unwrap_err();
    assert_banned(&refused, Some(until), "raid");
    tokens
        .create_chat_token(token_request(ROOM_ARN, "bystander"))
        .await
        .unwrap();

    // The other replica lists it, and lifting it there lifts it everywhere.
    let listed = elsewhere
        .list_bans(ListBansRequest {
            room_identifier: ROOM_ARN.into(),
            page_size: 0,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.bans.len(), 1);
    assert_eq!(listed.bans[0].user_id, "troll");
    let unban = UnbanUserRequest {
        room_identifier: ROOM_ARN.into(),
        user_id: "troll".into(),
    };
    assert!(
        elsewhere
            .unban_user(unban)
            .await
            .unwrap()
            .into_inner()
            .was_banned
    );
    let mut first_tokens = first.client().await;
    first_tokens
        .create_chat_token(token_request(ROOM_ARN, "troll"))
        .await
        .unwrap();

    // Every moderation call is audited with who, which room, a hash of the user, and the outcome; the
    // user id and the reason never reach the log.
    let mut logs = Vec::new();
    for binary in [first, second] {
        binary.signal("-TERM");
        let (status, log) = binary.exit().await;
        assert!(status.success());
        logs.extend(log);
    }
    let audited = logs
        .iter()
        .find(|line| line.contains("moderation done") && line.contains("action=\"BanUser\""))
        .unwrap_or_else(|| panic!("no audit event for the ban in {logs:#?}"));
    assert!(audited.contains("user_hash="), "{audited}");
    assert!(audited.contains(&format!("room={ROOM_ARN}")), "{audited}");
    for line in &logs {
        assert!(!line.contains("troll") && !line.contains("raid"), "{line}");
    }
}

const EU_ROOM: &str = "arn:aws:ivschat:eu-west-1:222222222222:room/backstage";

#[tokio::test]
async fn ivs_disconnect_and_ban_reach_ivs_signed_for_the_rooms_region_and_errors_map() {
    let stub = IvsStub::start().await;
    let server = TestServer::ivs(&stub, |_| {}).await;
    let mut moderation = moderation_client(&server).await;
    let mut tokens = server.client().await;

    moderation
        .disconnect_user(DisconnectUserRequest {
            room_identifier: EU_ROOM.into(),
            user_id: "user-1".into(),
            reason: "off topic".into(),
        })
        .await
        .unwrap();
    moderation
        .ban_user(ban(ROOM_ARN, "user-2", None, "spam"))
        .await
        .unwrap();
    let calls: Vec<_> = stub
        .calls()
        .into_iter()
        .filter(|call| call.operation == "DisconnectUser")
        .collect();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0].signed_region, "eu-west-1");
    assert_eq!(calls[0].body["roomIdentifier"], EU_ROOM);
    assert_eq!(calls[0].body["userId"], "user-1");
    assert_eq!(calls[0].body["reason"], "off topic");
    assert_eq!(calls[1].signed_region, "us-west-2");
    assert_eq!(calls[1].body["userId"], "user-2");
    let refused = tokens
        .create_chat_token(token_request(ROOM_ARN, "user-2"))
        .await
        .unwrap_err();
    assert_banned(&refused, None, "spam");

    let disconnect = |room: &str| DisconnectUserRequest {
        room_identifier: format!("arn:aws:ivschat:us-west-2:111111111111:room/{room}"),
        user_id: "user-1".into(),
        reason: "r".into(),
    };
    for (room, code, why) in [
        ("notfound", Code::NotFound, "IVS_ROOM_NOT_FOUND"),
        ("denied", Code::PermissionDenied, "IVS_ACCESS_DENIED"),
        (
            "pending",
            Code::FailedPrecondition,
            "IVS_PENDING_VERIFICATION",
        ),
        ("invalid", Code::InvalidArgument, "IVS_VALIDATION"),
        ("throttled", Code::ResourceExhausted, "IVS_THROTTLED"),
        ("broken", Code::Unavailable, "IVS_UNAVAILABLE"),
    ] {
        let status = moderation
            .disconnect_user(disconnect(room))
            .await
            .unwrap_err();
        assert_eq!(
            (status.code(), reason(&status).as_str()),
            (code, why),
            "{room}: {status:?}"
        );
        assert!(!status.message().contains("assumed-role"), "{status:?}");
    }

    let unsupported = moderation
        .verify_chat_token(VerifyChatTokenRequest {
            token: "anything".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unsupported.code(), Code::Unimplemented);
}

#[tokio::test]
async fn the_disconnect_quota_guard_refuses_before_ivs_and_only_past_its_burst() {
    let stub = IvsStub::start().await;
    let server = TestServer::ivs(&stub, |config| {
        config.ivs.disconnect_quota = Rate::parse("1/min").unwrap();
        config.ivs.disconnect_quota_burst = std::num::NonZeroU32::new(2).unwrap();
    })
    .await;
    let mut moderation = moderation_client(&server).await;
    let disconnect = DisconnectUserRequest {
        room_identifier: ROOM_ARN.into(),
        user_id: "u".into(),
        reason: "r".into(),
    };
    moderation
        .disconnect_user(disconnect.clone())
        .await
        .unwrap();
    moderation
        .disconnect_user(disconnect.clone())
        .await
        .unwrap();
    let refused = moderation.disconnect_user(disconnect).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    let quota = refused.get_details_quota_failure().unwrap();
    assert_eq!(quota.violations[0].subject, "limit:ivs-disconnect-quota");
    assert_eq!(stub.attempts("g1H2I3j4k5L6"), 2);
}

/// A local-issuer server and clients for it.
async fn local_server(tweak: impl FnOnce(&mut Config)) -> (LocalKeys, TestServer) {
    let keys = LocalKeys::new();
    let mut config = keys.config();
    tweak(&mut config);
    let server = TestServer::from_config(config).await;
    (keys, server)
}

async fn mint(tokens: &mut TokenServiceClient<Channel>, user: &str) -> String {
    tokens
        .create_chat_token(token_request(ROOM_ARN, user))
        .await
        .unwrap()
        .into_inner()
        .token
}

fn verify(token: &str) -> VerifyChatTokenRequest {
    VerifyChatTokenRequest {
        token: token.into(),
    }
}

#[tokio::test]
async fn local_disconnect_revokes_tokens_minted_before_it_and_not_after() {
    let (_keys, server) = local_server(|_| {}).await;
    let mut tokens = server.client().await;
    let mut moderation = moderation_client(&server).await;

    let before = mint(&mut tokens, "user-1").await;
    let other_user = mint(&mut tokens, "user-2").await;
    let claims = moderation
        .verify_chat_token(verify(&before))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(claims.room_identifier, ROOM_ARN);
    assert_eq!(claims.user_id, "user-1");

    moderation
        .disconnect_user(DisconnectUserRequest {
            room_identifier: ROOM_ARN.into(),
            user_id: "user-1".into(),
            reason: "cool off".into(),
        })
        .await
        .unwrap();
    let revoked = moderation
        .verify_chat_token(verify(&before))
        .await
        .unwrap_err();
    assert_eq!(
        (revoked.code(), reason(&revoked).as_str()),
        (Code::FailedPrecondition, "TOKEN_REVOKED")
    );
    moderation
        .verify_chat_token(verify(&other_user))
        .await
        .unwrap();

    // A disconnect is not a ban: a new token, minted after it, verifies.
    let after = mint(&mut tokens, "user-1").await;
    moderation.verify_chat_token(verify(&after)).await.unwrap();
}

#[tokio::test]
async fn verification_refuses_tampered_unknown_key_and_expired_tokens_each_with_its_reason() {
    let (_keys, server) = local_server(|config| {
        config.local_issuer.token_ttl = Duration::from_secs(1);
    })
    .await;
    let mut tokens = server.client().await;
    let mut moderation = moderation_client(&server).await;
    let token = mint(&mut tokens, "user-1").await;

    // Flip one character of the encrypted payload.
    let mut tampered: Vec<char> = token.chars().collect();
    let middle = tampered.len() / 2;
    tampered[middle] = if tampered[middle] == 'A' { 'B' } else { 'A' };
    let tampered: String = tampered.into_iter().collect();
    let status = moderation
        .verify_chat_token(verify(&tampered))
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), reason(&status).as_str()),
        (Code::InvalidArgument, "TOKEN_TAMPERED")
    );

    // A token of another deployment's key.
    let (_other_keys, other) = local_server(|_| {}).await;
    let foreign = mint(&mut other.client().await, "user-1").await;
    let status = moderation
        .verify_chat_token(verify(&foreign))
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), reason(&status).as_str()),
        (Code::InvalidArgument, "TOKEN_UNKNOWN_KEY")
    );

    let status = moderation
        .verify_chat_token(verify("v4.local.nonsense"))
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), reason(&status).as_str()),
        (Code::InvalidArgument, "TOKEN_MALFORMED")
    );
    let status = moderation
        .verify_chat_token(verify(&"x".repeat(8193)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    // The token lives one second, and verifies for VERIFY_LEEWAY (clock skew) after that.
    let claims = moderation
        .verify_chat_token(verify(&token))
        .await
        .unwrap()
        .into_inner();
    let expires: SystemTime = claims.token_expiration_time.unwrap().try_into().unwrap();
    tokio::time::sleep(
        (expires + chat_token_service::issuer::local::VERIFY_LEEWAY)
            .duration_since(SystemTime::now())
            .unwrap_or_default(),
    )
    .await;
    let status = moderation
        .verify_chat_token(verify(&token))
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), reason(&status).as_str()),
        (Code::FailedPrecondition, "TOKEN_EXPIRED")
    );
}

#[tokio::test]
async fn single_use_mode_verifies_a_token_once() {
    let (_keys, server) = local_server(|config| config.moderation.single_use_tokens = true).await;
    let mut tokens = server.client().await;
    let mut moderation = moderation_client(&server).await;
    let token = mint(&mut tokens, "user-1").await;
    moderation.verify_chat_token(verify(&token)).await.unwrap();
    let replay = moderation
        .verify_chat_token(verify(&token))
        .await
        .unwrap_err();
    assert_eq!(
        (replay.code(), reason(&replay).as_str()),
        (Code::FailedPrecondition, "TOKEN_ALREADY_USED")
    );
    // Each token once: a fresh one verifies.
    moderation
        .verify_chat_token(verify(&mint(&mut tokens, "user-1").await))
        .await
        .unwrap();
}

#[tokio::test]
async fn under_the_production_policy_a_web_caller_cannot_ban_and_a_moderator_can() {
    let keys = LocalKeys::new();
    let mut config = keys.config();
    production_policy(&mut config);
    config.identity.sources = vec![IdentitySource::Header];
    config.identity.allow_anonymous = false;
    let server = TestServer::from_config(config).await;
    let mut moderation = moderation_client(&server).await;
    let as_caller = |caller: &str| {
        let mut request = Request::new(ban(ACCOUNT_111_ROOM, "troll", Some(60), "spam"));
        request
            .metadata_mut()
            .insert("x-caller-id", caller.parse().unwrap());
        request
    };

    let denied = moderation.ban_user(as_caller(WEB)).await.unwrap_err();
    assert_eq!(
        (denied.code(), reason(&denied).as_str()),
        (Code::PermissionDenied, "POLICY_DENIED")
    );
    moderation.ban_user(as_caller(MODERATION)).await.unwrap();

    // The web caller still mints for others, and is told the banned user is banned.
    let mut tokens = server.client().await;
    let mint_as_web = |user: &str| {
        let mut request = Request::new(token_request(ACCOUNT_111_ROOM, user));
        request
            .metadata_mut()
            .insert("x-caller-id", WEB.parse().unwrap());
        request
    };
    tokens
        .create_chat_token(mint_as_web("bystander"))
        .await
        .unwrap();
    let banned = tokens
        .create_chat_token(mint_as_web("troll"))
        .await
        .unwrap_err();
    assert_eq!(reason(&banned), "USER_BANNED");
}

/// A local-issuer config sharing state through the Redis at `url`.
fn redis_config(keys: &LocalKeys, url: &str, mode: FailureMode) -> Config {
    let mut config = keys.config();
    config.limiter.backend = LimiterBackend::Redis;
    config.limiter.redis_timeout = common::redis_timeout();
    config.limiter.redis_url = Some(RedisUrl::parse(url).unwrap());
    config.limiter.key_prefix = unique_prefix();
    config.limiter.failure_mode = mode;
    config
}

#[tokio::test]
async fn fail_open_keeps_enforcing_every_ban_it_has_seen_while_redis_is_down() {
    let mut redis = RedisServer::private();
    let keys = LocalKeys::new();
    let server =
        TestServer::from_config(redis_config(&keys, &redis.url(), FailureMode::FailOpen)).await;
    let mut tokens = server.client().await;
    let mut moderation = moderation_client(&server).await;
    moderation
        .ban_user(ban(ROOM_ARN, "troll", None, "spam"))
        .await
        .unwrap();

    redis.stop();
    let refused = tokens
        .create_chat_token(token_request(ROOM_ARN, "troll"))
        .await
        .unwrap_err();
    assert_banned(&refused, None, "spam");
    // The service keeps serving everyone else, and bans made during the outage hold on this replica.
    tokens
        .create_chat_token(token_request(ROOM_ARN, "bystander"))
        .await
        .unwrap();
    moderation
        .ban_user(ban(ROOM_ARN, "bystander", None, "late"))
        .await
        .unwrap();
    let refused = tokens
        .create_chat_token(token_request(ROOM_ARN, "bystander"))
        .await
        .unwrap_err();
    assert_banned(&refused, None, "late");
}

#[tokio::test]
async fn fail_closed_refuses_tokens_and_moderation_while_redis_is_down() {
    let mut redis = RedisServer::private();
    let keys = LocalKeys::new();
    let server =
        TestServer::from_config(redis_config(&keys, &redis.url(), FailureMode::FailClosed)).await;
    let mut tokens = server.client().await;
    let mut moderation = moderation_client(&server).await;
    tokens
        .create_chat_token(token_request(ROOM_ARN, "user-1"))
        .await
        .unwrap();

    redis.stop();
    let refused = tokens
        .create_chat_token(token_request(ROOM_ARN, "user-1"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    let refused = moderation
        .ban_user(ban(ROOM_ARN, "user-1", None, "spam"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
}

#[tokio::test]
async fn redis_list_bans_pages_skip_ended_bans_and_cover_the_rest_once() {
    let redis = RedisServer::shared();
    let keys = LocalKeys::new();
    let server =
        TestServer::from_config(redis_config(&keys, &redis.url(), FailureMode::FailClosed)).await;
    let mut moderation = moderation_client(&server).await;
    let mut last_end = SystemTime::UNIX_EPOCH;
    for i in 0..6 {
        // Every other ban ends after a second.
        let seconds = if i % 2 == 0 { Some(1) } else { None };
        let made = moderation
            .ban_user(ban(ROOM_ARN, &format!("user-{i}"), seconds, "r"))
            .await
            .unwrap()
            .into_inner()
            .ban
            .unwrap();
        if let Some(end) = made.expiration_time {
            last_end = last_end.max(end.try_into().unwrap());
        }
    }
    let list = |page_token: String| ListBansRequest {
        room_identifier: ROOM_ARN.into(),
        page_size: 2,
        page_token,
    };
    let first = moderation
        .list_bans(list(String::new()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.bans.len(), 2);
    assert!(!first.next_page_token.is_empty());

    // Until the last of the ending bans has ended (to the millisecond, as bans are kept).
    let wait = (last_end + Duration::from_millis(1)).duration_since(SystemTime::now());
    tokio::time::sleep(wait.unwrap_or_default()).await;
    let mut users = Vec::new();
    let mut page_token = String::new();
    for pages in 1.. {
        assert!(
            pages <= 3,
            "more pages than bans: the page token never ends"
        );
        let page = moderation
            .list_bans(list(page_token))
            .await
            .unwrap()
            .into_inner();
        users.extend(page.bans.into_iter().map(|b| b.user_id));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    users.sort();
    assert_eq!(users, ["user-1", "user-3", "user-5"]);
}

#[tokio::test]
async fn bans_work_in_redis_cluster_under_hashed_keys_that_expire_with_the_ban() {
    let redis = RedisServer::cluster();
    let keys = LocalKeys::new();
    let mut config = redis_config(&keys, &redis.url(), FailureMode::FailClosed);
    config.limiter.redis_cluster = true;
    let prefix = config.limiter.key_prefix.clone();
    let server = TestServer::from_config(config).await;
    let mut tokens = server.client().await;
    let mut moderation = moderation_client(&server).await;

    moderation
        .ban_user(ban(ROOM_ARN, "troll", Some(600), "spam"))
        .await
        .unwrap();
    let refused = tokens
        .create_chat_token(token_request(ROOM_ARN, "troll"))
        .await
        .unwrap_err();
    assert_eq!(reason(&refused), "USER_BANNED");

    // No key names the user or the room; the ban record and its index expire with the ban.
    let stored = redis.keys(&prefix);
    assert!(!stored.is_empty());
    for key in &stored {
        assert!(
            !key.contains("troll") && !key.contains("g1H2I3j4k5L6"),
            "{key}"
        );
    }
    for kind in [":ban:", ":bans:"] {
        let key = stored.iter().find(|k| k.contains(kind)).unwrap();
        let ttl: u64 = redis
            .command(&["PTTL", key])
            .trim_start_matches(':')
            .trim()
            .parse()
            .unwrap();
        assert!(ttl > 590_000 && ttl <= 600_000, "{key}: {ttl}");
    }

    let listed = moderation
        .list_bans(ListBansRequest {
            room_identifier: ROOM_ARN.into(),
            page_size: 0,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.bans.len(), 1);
    let unban = UnbanUserRequest {
        room_identifier: ROOM_ARN.into(),
        user_id: "troll".into(),
    };
    assert!(
        moderation
            .unban_user(unban)
            .await
            .unwrap()
            .into_inner()
            .was_banned
    );
    tokens
        .create_chat_token(token_request(ROOM_ARN, "troll"))
        .await
        .unwrap();
    assert!(redis.keys(&prefix).iter().all(|k| !k.contains(":ban")));
}
