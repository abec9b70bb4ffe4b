//! Policy end to end, over real sockets: the production example policy allows and denies the cases it is
//! written for, denials carry ErrorInfo without the policy text, and policy files reload while serving.

mod common;

use std::time::Duration;

use chat_token_service::{identity::IdentitySource, proto::ivschat::v1::CreateChatTokenRequest};
use common::{
    ACCOUNT_111_ROOM, ACCOUNT_222_ROOM, LocalKeys, MODERATION, TestServer, WEB, production_policy,
};
use tonic::{Code, Request};
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
        client.create_chat_token(request(&case)).await.is_ok()
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
