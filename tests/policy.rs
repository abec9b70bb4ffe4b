//! Policy end to end, over real sockets: the production example policy allows and denies the cases it is
//! written for, denials carry ErrorInfo without the policy text, and policy files reload while serving.

mod common;

use std::time::Duration;

use chat_token_service::{
    identity::IdentitySource,
    proto::ivschat::v1::{
        CreateChatTokenRequest, ListBansRequest, UnbanUserRequest, VerifyChatTokenRequest,
        moderation_service_client::ModerationServiceClient,
    },
};
use common::{
    ACCOUNT_111_ROOM, ACCOUNT_222_ROOM, LocalKeys, MODERATION, TestServer, WEB, allowed_by_policy,
    production_policy,
};
use tonic::{Code, Request, Status};
use tonic_types::StatusExt;

const SEND: i32 = 1;
const DISCONNECT: i32 = 2;
const DELETE: i32 = 3;

struct Case {
    what: &'static str,
    caller: &'static str,
    room: &'static str,
    capabilities: Vec<i32>,
    minutes: Option<i32>,
    attributes: &'static [&'static str],
    /// `None`: allowed; `Some(ids)`: denied, citing these policies.
    denied_by: Option<&'static str>,
}

fn request(case: &Case) -> Request<CreateChatTokenRequest> {
    let mut request = Request::new(CreateChatTokenRequest {
        room_identifier: case.room.into(),
        user_id: "user-7".into(),
        capabilities: case.capabilities.clone(),
        session_duration_in_minutes: case.minutes,
        attributes: case
            .attributes
            .iter()
            .map(|k| (k.to_string(), "v".to_string()))
            .collect(),
    });
    request
        .metadata_mut()
        .insert("x-caller-id", case.caller.parse().unwrap());
    request
}

#[tokio::test]
async fn the_production_example_allows_and_denies_what_it_is_written_for() {
    let keys = LocalKeys::new();
    let mut config = keys.config();
    production_policy(&mut config);
    config.identity.sources = vec![IdentitySource::Header];
    config.identity.allow_anonymous = false;
    let server = TestServer::from_config(config).await;
    let mut client = server.client().await;

    let case = |what, caller, room, capabilities: &[i32], minutes, attributes, denied_by| Case {
        what,
        caller,
        room,
        capabilities: capabilities.to_vec(),
        minutes,
        attributes,
        denied_by,
    };
    let cases = [
        case(
            "web sends in its account",
            WEB,
            ACCOUNT_111_ROOM,
            &[SEND],
            None,
            &["displayName"],
            None,
        ),
        case(
            "web at its 60-minute max",
            WEB,
            ACCOUNT_111_ROOM,
            &[SEND],
            Some(60),
            &[],
            None,
        ),
        case(
            "web over 60 minutes",
            WEB,
            ACCOUNT_111_ROOM,
            &[SEND],
            Some(61),
            &[],
            Some("web-max-session-60"),
        ),
        case(
            "web may not disconnect users",
            WEB,
            ACCOUNT_111_ROOM,
            &[SEND, DISCONNECT],
            None,
            &[],
            Some("moderation-only-for-moderators"),
        ),
        case(
            "web may not delete messages",
            WEB,
            ACCOUNT_111_ROOM,
            &[DELETE],
            None,
            &[],
            Some("moderation-only-for-moderators"),
        ),
        case(
            "web outside its accounts",
            WEB,
            ACCOUNT_222_ROOM,
            &[SEND],
            None,
            &[],
            Some(""),
        ),
        case(
            "moderator moderates in either account",
            MODERATION,
            ACCOUNT_222_ROOM,
            &[DISCONNECT, DELETE],
            Some(120),
            &[],
            None,
        ),
        case(
            "moderator over 120 minutes",
            MODERATION,
            ACCOUNT_111_ROOM,
            &[],
            Some(121),
            &[],
            Some("moderators-max-session-120"),
        ),
        case(
            "attribute outside the allow-list",
            WEB,
            ACCOUNT_111_ROOM,
            &[SEND],
            None,
            &["displayName", "email"],
            Some("attribute-keys-allow-list"),
        ),
        case(
            "unknown caller",
            "spiffe://cluster.local/ns/other/sa/x",
            ACCOUNT_111_ROOM,
            &[],
            None,
            &[],
            Some(""),
        ),
    ];
    for case in &cases {
        let result = client.create_chat_token(request(case)).await;
        match (case.denied_by, result) {
            (None, Ok(_)) => {}
            (Some(policy_ids), Err(status)) => {
                assert_eq!(
                    status.code(),
                    Code::PermissionDenied,
                    "{}: {status:?}",
                    case.what
                );
                let info = status.get_details_error_info().expect("ErrorInfo");
                assert_eq!(info.reason, "POLICY_DENIED", "{}", case.what);
                assert_eq!(info.metadata["policy_ids"], policy_ids, "{}", case.what);
                assert!(
                    !status.message().contains("forbid"),
                    "policy text leaked: {status:?}"
                );
            }
            (expected, got) => panic!(
                "{}: expected denial by {expected:?}, got {got:?}",
                case.what
            ),
        }
    }
}

#[tokio::test]
async fn policy_files_reload_while_serving_and_bad_ones_are_refused() {
    let keys = LocalKeys::new();
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.cedar");
    let only = |caller: &str| {
        format!(r#"@id("only") permit (principal == Caller::"{caller}", action, resource);"#)
    };
    std::fs::write(&policy, only("a")).unwrap();

    let mut config = keys.config();
    config.policy.files = vec![policy.clone()];
    config.reload_interval = Duration::from_millis(100);
    let server = TestServer::from_config(config).await;
    let mut client = server.client().await;
    let mut allowed = async |caller: &'static str| {
        let case = Case {
            what: "",
            caller,
            room: ACCOUNT_111_ROOM,
            capabilities: vec![],
            minutes: None,
            attributes: &[],
            denied_by: None,
        };
        allowed_by_policy(client.create_chat_token(request(&case)).await)
    };
    assert!(allowed("a").await);
    assert!(!allowed("b").await);

    // A good new file takes effect without a restart.
    std::fs::write(&policy, only("b")).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !allowed("b").await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new policy never took effect"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!allowed("a").await);

    // A bad file is refused: the last good policy stays in force over several reload intervals.
    std::fs::write(
        &policy,
        "permit (principal, action, resource) when { context.nope };",
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(allowed("b").await);
    assert!(!allowed("a").await);

    // ...and the watcher is still alive for the next good file.
    std::fs::write(&policy, only("a")).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !allowed("a").await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "reloading stopped after a bad file"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const CHAT_SERVER: &str = "spiffe://cluster.local/ns/chat/sa/chat-server";

/// `message` from `caller` (the `x-caller-id` header).
fn from<T>(caller: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("x-caller-id", caller.parse().unwrap());
    request
}

/// `None` when `result` is allowed; the deciding policies' ids when policy denied it. Any other outcome
/// fails the test.
fn policy_ids<T: std::fmt::Debug>(result: Result<T, Status>) -> Option<String> {
    match result {
        Err(status) if status.code() == Code::PermissionDenied => {
            let info = status.get_details_error_info().expect("ErrorInfo");
            assert_eq!(info.reason, "POLICY_DENIED", "{status:?}");
            Some(info.metadata["policy_ids"].clone())
        }
        result => {
            assert!(allowed_by_policy(result));
            None
        }
    }
}

/// The production example's rules for VerifyChatToken, ListBans and UnbanUser: only chat servers verify,
/// only moderators list bans and unban, each in the accounts it serves. Every denial has its allowed
/// counterpart (the same call by the right caller or in the right account).
#[tokio::test]
async fn the_production_example_lets_only_chat_servers_verify_and_only_moderators_list_and_unban() {
    let keys = LocalKeys::new();
    let mut config = keys.config();
    production_policy(&mut config);
    config.identity.sources = vec![IdentitySource::Header];
    config.identity.allow_anonymous = false;
    let server = TestServer::from_config(config).await;
    let mut tokens = server.client().await;
    let mut mint = async |room: &str| {
        tokens
            .create_chat_token(from(
                MODERATION,
                CreateChatTokenRequest {
                    room_identifier: room.into(),
                    user_id: "user-7".into(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .token
    };
    let in_111 = mint(ACCOUNT_111_ROOM).await;
    let in_222 = mint(ACCOUNT_222_ROOM).await;
    let mut moderation = ModerationServiceClient::new(server.channel().await);

    let verify = |token: &str| VerifyChatTokenRequest {
        token: token.into(),
    };
    let verified = policy_ids(
        moderation
            .verify_chat_token(from(CHAT_SERVER, verify(&in_111)))
            .await,
    );
    assert_eq!(
        verified, None,
        "a chat server verifies its account's tokens"
    );
    for (what, caller, token) in [
        ("another account's token", CHAT_SERVER, &in_222),
        ("a moderator", MODERATION, &in_111),
        ("a web front end", WEB, &in_111),
    ] {
        let denied = policy_ids(
            moderation
                .verify_chat_token(from(caller, verify(token)))
                .await,
        );
        assert_eq!(denied.as_deref(), Some(""), "VerifyChatToken by {what}");
    }

    let list = |room: &str| ListBansRequest {
        room_identifier: room.into(),
        ..Default::default()
    };
    let unban = |room: &str| UnbanUserRequest {
        room_identifier: room.into(),
        user_id: "user-7".into(),
    };
    for room in [ACCOUNT_111_ROOM, ACCOUNT_222_ROOM] {
        let listed = policy_ids(moderation.list_bans(from(MODERATION, list(room))).await);
        assert_eq!(listed, None, "a moderator lists bans in {room}");
        let unbanned = policy_ids(moderation.unban_user(from(MODERATION, unban(room))).await);
        assert_eq!(unbanned, None, "a moderator unbans in {room}");
    }
    let outside = "arn:aws:ivschat:us-west-2:333333333333:room/elsewhere";
    for (what, caller, room) in [
        ("a moderator outside its accounts", MODERATION, outside),
        ("a web front end", WEB, ACCOUNT_111_ROOM),
        ("a chat server", CHAT_SERVER, ACCOUNT_111_ROOM),
    ] {
        let listed = policy_ids(moderation.list_bans(from(caller, list(room))).await);
        assert_eq!(listed.as_deref(), Some(""), "ListBans by {what}");
        let unbanned = policy_ids(moderation.unban_user(from(caller, unban(room))).await);
        assert_eq!(unbanned.as_deref(), Some(""), "UnbanUser by {what}");
    }
}
