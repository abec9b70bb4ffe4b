//! The CreateChatToken contract over a real socket: what a caller gets back, and IVS Chat's limits
//! enforced at their edges (min, max, one past), each refusal an INVALID_ARGUMENT naming the field.

mod common;

use std::time::{Duration, SystemTime};

use chat_token_service::domain::Capability;
use chat_token_service::proto::ivschat::v1::{ChatTokenCapability, CreateChatTokenRequest};
use common::{LocalKeys, ROOM_ARN, TestServer, valid_request};
use tonic::Code;
use tonic_types::StatusExt;

struct Fixture {
    keys: LocalKeys,
    server: TestServer,
}

async fn fixture() -> Fixture {
    let keys = LocalKeys::new();
    let server = TestServer::from_config(keys.config()).await;
    Fixture { keys, server }
}

/// Sends `request` and expects INVALID_ARGUMENT naming exactly `fields`.
async fn assert_invalid(server: &TestServer, request: CreateChatTokenRequest, fields: &[&str]) {
    let status = server
        .client()
        .await
        .create_chat_token(request)
        .await
        .expect_err("request should be refused");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let bad = status
        .get_details_bad_request()
        .expect("google.rpc.BadRequest details");
    let named: Vec<_> = bad
        .field_violations
        .iter()
        .map(|v| v.field.as_str())
        .collect();
    assert_eq!(named, fields, "{status:?}");
}

async fn assert_valid(server: &TestServer, request: CreateChatTokenRequest) {
    if let Err(status) = server.client().await.create_chat_token(request).await {
        panic!("request should be accepted: {status:?}");
    }
}

fn with(f: impl FnOnce(&mut CreateChatTokenRequest)) -> CreateChatTokenRequest {
    let mut request = valid_request();
    f(&mut request);
    request
}

#[tokio::test]
async fn the_token_decrypts_to_exactly_what_was_asked_for() {
    let Fixture { keys, server } = fixture().await;
    let request = CreateChatTokenRequest {
        room_identifier: ROOM_ARN.into(),
        user_id: "ユーザー-42".into(),
        capabilities: vec![
            ChatTokenCapability::SendMessage as i32,
            ChatTokenCapability::DeleteMessage as i32,
            ChatTokenCapability::SendMessage as i32,
        ],
        session_duration_in_minutes: Some(30),
        attributes: [
            ("displayName".to_string(), "Zoë".to_string()),
            ("badge".to_string(), "gold".to_string()),
        ]
        .into(),
    };
    let before = SystemTime::now();
    let response = server
        .client()
        .await
        .create_chat_token(request.clone())
        .await
        .unwrap()
        .into_inner();

    let claims = keys.keys.verify(&response.token).unwrap();
    assert_eq!(claims.room.as_str(), ROOM_ARN);
    assert_eq!(claims.user_id.expose(), "ユーザー-42");
    assert_eq!(
        claims.capabilities.iter().collect::<Vec<_>>(),
        [Capability::SendMessage, Capability::DeleteMessage]
    );
    assert_eq!(
        claims.attributes.expose(),
        &request.attributes.into_iter().collect()
    );

    let token_exp = SystemTime::try_from(response.token_expiration_time.unwrap()).unwrap();
    let session_exp = SystemTime::try_from(response.session_expiration_time.unwrap()).unwrap();
    assert_eq!(claims.token_expires_at, token_exp);
    assert_eq!(claims.session_expires_at, session_exp);
    // Expirations count from the issue time's whole second; the issue time itself keeps its fraction (so
    // revocations can tell a token minted just after a disconnect from one minted just before).
    let issued_second = whole_second(claims.issued_at);
    assert_eq!(
        token_exp.duration_since(issued_second).unwrap(),
        Duration::from_secs(60)
    );
    assert_eq!(
        session_exp.duration_since(issued_second).unwrap(),
        Duration::from_secs(30 * 60)
    );
    assert!(claims.issued_at >= before);
    assert!(claims.issued_at <= SystemTime::now());
}

#[tokio::test]
async fn every_token_is_unique() {
    let Fixture { keys, server } = fixture().await;
    let mut client = server.client().await;
    let a = client
        .create_chat_token(valid_request())
        .await
        .unwrap()
        .into_inner();
    let b = client
        .create_chat_token(valid_request())
        .await
        .unwrap()
        .into_inner();
    assert_ne!(a.token, b.token);
    assert_ne!(
        keys.keys.verify(&a.token).unwrap().token_id,
        keys.keys.verify(&b.token).unwrap().token_id
    );
}

#[tokio::test]
async fn room_identifier_limits() {
    let Fixture { server, .. } = fixture().await;
    let prefix = "arn:aws:ivschat:us-west-2:123456789012:room/";
    let room_of_len = |n: usize| format!("{prefix}{}", "a".repeat(n - prefix.len()));

    assert_invalid(
        &server,
        with(|r| r.room_identifier.clear()),
        &["room_identifier"],
    )
    .await;
    assert_valid(&server, with(|r| r.room_identifier = format!("{prefix}a"))).await;
    assert_valid(&server, with(|r| r.room_identifier = room_of_len(128))).await;
    assert_invalid(
        &server,
        with(|r| r.room_identifier = room_of_len(129)),
        &["room_identifier"],
    )
    .await;
    for bad in [
        "g1H2I3j4k5L6",
        "arn:aws:ivschat:us-west-2:123456789012:room/",
        "arn:aws:ivschat:us-west-2:acct:room/abc",
        "arn:aws:ivschat:US-WEST-2:123456789012:room/abc",
        "arn:aws:ivs:us-west-2:123456789012:channel/abc",
        "arn:aws:ivschat:us-west-2:123456789012:room/abc_def",
        "arn:aws:ivschat:us-west-2:123456789012:room/ab c",
    ] {
        assert_invalid(
            &server,
            with(|r| r.room_identifier = bad.into()),
            &["room_identifier"],
        )
        .await;
    }
}

#[tokio::test]
async fn user_id_limits_count_characters_not_bytes() {
    let Fixture { server, .. } = fixture().await;
    assert_invalid(&server, with(|r| r.user_id.clear()), &["user_id"]).await;
    assert_valid(&server, with(|r| r.user_id = "u".into())).await;
    assert_valid(&server, with(|r| r.user_id = "u".repeat(128))).await;
    assert_invalid(&server, with(|r| r.user_id = "u".repeat(129)), &["user_id"]).await;
    // 128 four-byte characters: 512 bytes, still 128 characters.
    assert_valid(&server, with(|r| r.user_id = "🦀".repeat(128))).await;
    assert_invalid(
        &server,
        with(|r| r.user_id = "🦀".repeat(129)),
        &["user_id"],
    )
    .await;
}

#[tokio::test]
async fn capabilities_accept_only_the_three_real_values() {
    let Fixture { keys, server } = fixture().await;
    assert_valid(&server, with(|r| r.capabilities = vec![])).await;
    assert_valid(&server, with(|r| r.capabilities = vec![1, 2, 3])).await;
    assert_invalid(
        &server,
        with(|r| r.capabilities = vec![0]),
        &["capabilities"],
    )
    .await;
    assert_invalid(
        &server,
        with(|r| r.capabilities = vec![1, 4]),
        &["capabilities"],
    )
    .await;
    assert_invalid(
        &server,
        with(|r| r.capabilities = vec![-1]),
        &["capabilities"],
    )
    .await;

    let token = server
        .client()
        .await
        .create_chat_token(with(|r| r.capabilities = vec![2, 2, 2]))
        .await
        .unwrap()
        .into_inner()
        .token;
    let claims = keys.keys.verify(&token).unwrap();
    assert_eq!(
        claims.capabilities.iter().collect::<Vec<_>>(),
        [Capability::DisconnectUser]
    );
}

#[tokio::test]
async fn session_duration_limits_and_default() {
    let Fixture { keys, server } = fixture().await;
    let session_minutes = |minutes: Option<i32>| {
        let server = &server;
        let keys = &keys;
        async move {
            let token = server
                .client()
                .await
                .create_chat_token(with(|r| r.session_duration_in_minutes = minutes))
                .await
                .unwrap()
                .into_inner()
                .token;
            let claims = keys.keys.verify(&token).unwrap();
            claims
                .session_expires_at
                .duration_since(whole_second(claims.issued_at))
                .unwrap()
                .as_secs()
                / 60
        }
    };
    assert_eq!(session_minutes(None).await, 60);
    assert_eq!(session_minutes(Some(1)).await, 1);
    assert_eq!(session_minutes(Some(180)).await, 180);
    for bad in [0, 181, -1, i32::MAX] {
        assert_invalid(
            &server,
            with(|r| r.session_duration_in_minutes = Some(bad)),
            &["session_duration_in_minutes"],
        )
        .await;
    }
}

#[tokio::test]
async fn attributes_may_total_1024_bytes() {
    let Fixture { server, .. } = fixture().await;
    let attrs = |value_bytes: usize| [("k".to_string(), "v".repeat(value_bytes))].into();
    assert_valid(&server, with(|r| r.attributes = Default::default())).await;
    assert_valid(&server, with(|r| r.attributes = attrs(1023))).await; // 1 + 1023 = 1024
    assert_invalid(
        &server,
        with(|r| r.attributes = attrs(1024)),
        &["attributes"],
    )
    .await;
    // Bytes, not characters: 341 three-byte characters + a 1-byte key = 1024 bytes.
    assert_valid(
        &server,
        with(|r| r.attributes = [("k".into(), "€".repeat(341))].into()),
    )
    .await;
    assert_invalid(
        &server,
        with(|r| r.attributes = [("kk".into(), "€".repeat(341))].into()),
        &["attributes"],
    )
    .await;
    // Keys count too, summed over all entries.
    let many: std::collections::HashMap<_, _> = (0..128)
        .map(|i| (format!("k{i:03}"), "vvvv".to_string()))
        .collect(); // 128 × 8 = 1024
    assert_valid(&server, with(|r| r.attributes = many.clone())).await;
    let mut one_more = many;
    one_more.insert("x".into(), String::new());
    assert_invalid(&server, with(|r| r.attributes = one_more), &["attributes"]).await;
}

#[tokio::test]
async fn all_violations_are_reported_together() {
    let Fixture { server, .. } = fixture().await;
    assert_invalid(
        &server,
        CreateChatTokenRequest {
            room_identifier: String::new(),
            user_id: String::new(),
            capabilities: vec![0],
            session_duration_in_minutes: Some(0),
            attributes: [("k".to_string(), "v".repeat(2000))].into(),
        },
        &[
            "room_identifier",
            "user_id",
            "capabilities",
            "session_duration_in_minutes",
            "attributes",
        ],
    )
    .await;
}

#[tokio::test]
async fn error_messages_never_echo_user_ids_or_attribute_values() {
    let Fixture { server, .. } = fixture().await;
    let status = server
        .client()
        .await
        .create_chat_token(with(|r| {
            r.user_id = "secret-user-".repeat(20);
            r.attributes = [("k".to_string(), "secret-value".repeat(100))].into();
        }))
        .await
        .unwrap_err();
    let everything = format!("{status:?} {:?}", status.get_error_details());
    assert!(!everything.contains("secret"), "{everything}");
}

#[tokio::test]
async fn oversized_messages_are_refused_by_the_transport() {
    let Fixture { server, .. } = fixture().await;
    let status = server
        .client()
        .await
        .create_chat_token(with(|r| {
            r.attributes = [("k".to_string(), "v".repeat(70 * 1024))].into();
        }))
        .await
        .unwrap_err();
    // tonic refuses frames over max_decoding_message_size before decoding them.
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(status.message().contains("16384"), "{status:?}");
    // The server is still healthy afterwards.
    assert_valid(&server, valid_request()).await;
}

/// `at` truncated to its whole second.
fn whole_second(at: SystemTime) -> SystemTime {
    let since_epoch = at.duration_since(SystemTime::UNIX_EPOCH).unwrap();
    SystemTime::UNIX_EPOCH + Duration::from_secs(since_epoch.as_secs())
}

/// The claims format checked independently of the service's own key set: pasetors decrypts the token with
/// the key read from the key file, checks `exp`, `nbf` and `iat` by its own rules, requires the footer to
/// name the key by its PASERK id and the implicit assertion the docs give, and the payload holds exactly
/// the claims docs/local-issuer.md lists, spelled as IVS Chat spells them.
#[tokio::test]
async fn pasetors_alone_decrypts_a_token_to_the_documented_claims() {
    use pasetors::{
        Local, claims::ClaimsValidationRules, footer::Footer, keys::SymmetricKey, paserk::Id,
        token::UntrustedToken, version4::V4,
    };
    let Fixture { keys, server } = fixture().await;
    let response = server
        .client()
        .await
        .create_chat_token(CreateChatTokenRequest {
            room_identifier: ROOM_ARN.into(),
            user_id: "user-42".into(),
            capabilities: vec![ChatTokenCapability::DisconnectUser as i32],
            session_duration_in_minutes: Some(15),
            attributes: [("displayName".to_string(), "Zoë".to_string())].into(),
        })
        .await
        .unwrap()
        .into_inner();

    let file = std::fs::read_to_string(&keys.path).unwrap();
    let paserk = file
        .split('"')
        .find(|part| part.starts_with("k4.local."))
        .expect("the key file holds a k4.local PASERK key");
    let key = SymmetricKey::<V4>::try_from(paserk).unwrap();
    let mut footer = Footer::new();
    footer.key_id(&Id::from(&key));
    let untrusted = UntrustedToken::<Local, V4>::try_from(response.token.as_str()).unwrap();
    let trusted = pasetors::local::decrypt(
        &key,
        &untrusted,
        &ClaimsValidationRules::new(),
        Some(&footer),
        Some(b"ivschat.v1.ChatToken"),
    )
    .expect("pasetors decrypts and validates the token");
    assert!(
        pasetors::local::decrypt(
            &key,
            &untrusted,
            &ClaimsValidationRules::new(),
            Some(&footer),
            Some(b"another purpose"),
        )
        .is_err(),
        "the token is bound to its purpose by the implicit assertion"
    );

    let claims: serde_json::Value = serde_json::from_str(trusted.payload()).unwrap();
    let mut names: Vec<&str> = claims
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "attributes",
            "capabilities",
            "exp",
            "iat",
            "jti",
            "nbf",
            "roomArn",
            "sessionExpirationTime",
            "userId"
        ]
    );
    assert_eq!(claims["roomArn"], ROOM_ARN);
    assert_eq!(claims["userId"], "user-42");
    assert_eq!(
        claims["capabilities"],
        serde_json::json!(["DISCONNECT_USER"])
    );
    assert_eq!(
        claims["attributes"],
        serde_json::json!({ "displayName": "Zoë" })
    );
    let time = |name: &str| {
        humantime::parse_rfc3339(claims[name].as_str().unwrap())
            .unwrap_or_else(|e| panic!("{name} is RFC 3339: {e}"))
    };
    assert_eq!(
        time("exp"),
        SystemTime::try_from(response.token_expiration_time.unwrap()).unwrap()
    );
    assert_eq!(
        time("sessionExpirationTime"),
        SystemTime::try_from(response.session_expiration_time.unwrap()).unwrap()
    );
    assert_eq!(
        time("exp").duration_since(time("nbf")).unwrap(),
        Duration::from_secs(60)
    );
    assert!(!claims["jti"].as_str().unwrap().is_empty());
}
