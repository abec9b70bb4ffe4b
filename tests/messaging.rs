//! MessagingService (SendEvent, DeleteMessage) end to end over real sockets: with the ivs issuer the calls
//! reach the IVS stub field for field, signed for the room's region, and IVS's errors map; IVS Chat's
//! limits hold at their edges; the production policy and the quota guards refuse before IVS is called;
//! with the local issuer the calls go to a signed webhook (a receiver started here), whose answers are
//! bounded in size and time, and without one they fail with FAILED_PRECONDITION.
//!
//! The AWS CLI and boto3 drive the same operations in tests/aws_cli.rs.

mod common;

use std::{
    collections::HashMap,
    net::SocketAddr,
    num::NonZeroU32,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    Json, Router,
    extract::State,
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::post,
};
use chat_token_service::{
    config::{Config, EndpointUrl},
    domain::Rate,
    identity::IdentitySource,
    proto::ivschat::v1::{
        DeleteMessageRequest, SendEventRequest, messaging_service_client::MessagingServiceClient,
    },
};
use common::{ACCOUNT_111_ROOM, LocalKeys, MODERATION, TestServer, WEB, ivs_stub::IvsStub};
use serde_json::{Value, json};
use tonic::{Code, Request, Status, transport::Channel};
use tonic_types::StatusExt;

const WEST: &str = "arn:aws:ivschat:us-west-2:111111111111:room";
const EU: &str = "arn:aws:ivschat:eu-west-1:222222222222:room";
/// The production entities' game server.
const GAME_SERVER: &str = "spiffe://cluster.local/ns/games/sa/game-server";
/// A message id as IVS Chat makes them.
const MESSAGE_ID: &str = "AbCdEf123456";

async fn messaging(server: &TestServer) -> MessagingServiceClient<Channel> {
    MessagingServiceClient::new(server.channel().await)
}

fn event(room: &str, name: &str) -> SendEventRequest {
    SendEventRequest {
        room_identifier: room.into(),
        event_name: name.into(),
        attributes: HashMap::new(),
    }
}

fn delete(room: &str, id: &str, reason: &str) -> DeleteMessageRequest {
    DeleteMessageRequest {
        room_identifier: room.into(),
        id: id.into(),
        reason: reason.into(),
    }
}

/// `request` from `caller`, named in the `x-caller-id` header.
fn from<T>(caller: &str, request: T) -> Request<T> {
    let mut request = Request::new(request);
    request
        .metadata_mut()
        .insert("x-caller-id", caller.parse().unwrap());
    request
}

/// The ErrorInfo reason of `status`.
fn reason(status: &Status) -> String {
    status
        .get_details_error_info()
        .map(|info| info.reason)
        .unwrap_or_default()
}

/// The fields `status` names as bad.
fn bad_fields(status: &Status) -> Vec<String> {
    status
        .get_details_bad_request()
        .map(|bad| bad.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

/// The calls the stub received for `operation`.
fn calls_of(stub: &IvsStub, operation: &str) -> Vec<common::ivs_stub::SeenCall> {
    stub.calls()
        .into_iter()
        .filter(|call| call.operation == operation)
        .collect()
}

#[tokio::test]
async fn send_event_and_delete_message_reach_ivs_field_for_field_in_the_rooms_region() {
    let stub = IvsStub::start().await;
    let server = TestServer::ivs(&stub, |_| {}).await;
    let mut client = messaging(&server).await;

    let sent = client
        .send_event(SendEventRequest {
            room_identifier: format!("{EU}/lobby"),
            event_name: "game:score".into(),
            attributes: [
                ("home".to_string(), "3".to_string()),
                ("scorer".to_string(), "Zoë".to_string()),
            ]
            .into(),
        })
        .await
        .unwrap()
        .into_inner();
    let deleted = client
        .delete_message(delete(&format!("{WEST}/lobby"), MESSAGE_ID, "spam"))
        .await
        .unwrap()
        .into_inner();
    client
        .delete_message(delete(&format!("{WEST}/lobby"), MESSAGE_ID, ""))
        .await
        .unwrap();

    let calls = stub.calls();
    assert_eq!(calls.len(), 3);
    assert_eq!(
        (calls[0].operation, calls[0].signed_region.as_str()),
        ("SendEvent", "eu-west-1")
    );
    assert_eq!(
        calls[0].body,
        json!({
            "roomIdentifier": format!("{EU}/lobby"),
            "eventName": "game:score",
            "attributes": {"home": "3", "scorer": "Zoë"},
        })
    );
    assert_eq!(
        (calls[1].operation, calls[1].signed_region.as_str()),
        ("DeleteMessage", "us-west-2")
    );
    assert_eq!(
        calls[1].body,
        json!({"roomIdentifier": format!("{WEST}/lobby"), "id": MESSAGE_ID, "reason": "spam"})
    );
    // No reason stays absent: IVS refuses an empty one.
    assert_eq!(
        calls[2].body,
        json!({"roomIdentifier": format!("{WEST}/lobby"), "id": MESSAGE_ID})
    );
    // IVS's ids reach the caller unchanged.
    assert_eq!(sent.id, calls[0].response.as_ref().unwrap()["id"]);
    assert_eq!(deleted.id, calls[1].response.as_ref().unwrap()["id"]);
}

#[tokio::test]
async fn ivs_failures_map_to_their_grpc_codes_for_both_operations() {
    let stub = IvsStub::start().await;
    let server = TestServer::ivs(&stub, |config| {
        config.ivs.max_attempts = NonZeroU32::new(1).unwrap();
    })
    .await;
    let mut client = messaging(&server).await;
    for (room, code, why) in [
        ("notfound1", Code::NotFound, "IVS_ROOM_NOT_FOUND"),
        ("denied1", Code::PermissionDenied, "IVS_ACCESS_DENIED"),
        (
            "pending1",
            Code::FailedPrecondition,
            "IVS_PENDING_VERIFICATION",
        ),
        ("throttled1", Code::ResourceExhausted, "IVS_THROTTLED"),
        ("broken1", Code::Unavailable, "IVS_UNAVAILABLE"),
        ("invalid1", Code::InvalidArgument, "IVS_VALIDATION"),
    ] {
        let room = format!("{WEST}/{room}");
        let sent = client.send_event(event(&room, "e")).await.unwrap_err();
        let deleted = client
            .delete_message(delete(&room, MESSAGE_ID, ""))
            .await
            .unwrap_err();
        for status in [&sent, &deleted] {
            assert_eq!(
                (status.code(), reason(status).as_str()),
                (code, why),
                "{status:?}"
            );
        }
        if code == Code::InvalidArgument {
            // IVS's field names come back as ours.
            assert_eq!(bad_fields(&sent), ["event_name"]);
            assert_eq!(bad_fields(&deleted), ["id"]);
        }
        if code == Code::PermissionDenied {
            // IVS's message names our IAM principal: it stays in our log.
            assert!(!sent.message().contains("arn:aws:sts"), "{sent:?}");
            assert!(sent.message().contains("send events to"), "{sent:?}");
        }
    }
}

#[tokio::test]
async fn ivs_chats_limits_hold_at_their_edges_and_only_valid_calls_reach_ivs() {
    let stub = IvsStub::start().await;
    let server = TestServer::ivs(&stub, |_| {}).await;
    let mut client = messaging(&server).await;
    let room = format!("{WEST}/lobby");
    let attributes = |bytes: usize| -> HashMap<String, String> {
        [("k".to_string(), "v".repeat(bytes - 1))].into()
    };

    let mut valid = 0;
    let sends = [
        (String::new(), attributes(1), Some("event_name")),
        ("e".into(), attributes(1), None),
        ("é".repeat(100), attributes(1), None),
        ("e".repeat(101), attributes(1), Some("event_name")),
        ("e".into(), attributes(1024), None),
        ("e".into(), attributes(1025), Some("attributes")),
    ];
    for (name, attributes, bad) in sends {
        let chars = name.chars().count();
        let request = SendEventRequest {
            room_identifier: room.clone(),
            event_name: name,
            attributes,
        };
        match (client.send_event(request).await, bad) {
            (Ok(_), None) => valid += 1,
            (Err(status), Some(field)) => {
                assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
                assert_eq!(bad_fields(&status), [field], "{chars} characters");
            }
            (answer, expected) => panic!("{chars} characters: {answer:?}, expected {expected:?}"),
        }
    }
    let deletes = [
        ("AbCdEf12345", String::new(), Some("id")),
        (MESSAGE_ID, String::new(), None),
        ("AbCdEf1234567", String::new(), Some("id")),
        ("AbCdEf12345-", String::new(), Some("id")),
        (MESSAGE_ID, "r".into(), None),
        (MESSAGE_ID, "ř".repeat(256), None),
        (MESSAGE_ID, "r".repeat(257), Some("reason")),
    ];
    for (id, reason, bad) in deletes {
        match (client.delete_message(delete(&room, id, &reason)).await, bad) {
            (Ok(_), None) => valid += 1,
            (Err(status), Some(field)) => {
                assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
                assert_eq!(bad_fields(&status), [field], "{id} {}", reason.len());
            }
            (answer, expected) => panic!("{id}: {answer:?}, expected {expected:?}"),
        }
    }
    // Every bad field at once; the room too.
    let status = client
        .send_event(SendEventRequest {
            room_identifier: "room-1".into(),
            event_name: String::new(),
            attributes: attributes(2000),
        })
        .await
        .unwrap_err();
    assert_eq!(
        bad_fields(&status),
        ["room_identifier", "event_name", "attributes"]
    );
    assert_eq!(valid, 6);
    assert_eq!(
        stub.calls().len(),
        valid,
        "only the valid calls reached IVS, and IVS's own rules (the stub's) accepted every one"
    );
    assert!(stub.calls().iter().all(|call| call.response.is_some()));
}

#[tokio::test]
async fn the_production_policy_and_the_quota_guards_refuse_before_ivs_is_called() {
    let stub = IvsStub::start().await;
    let server = TestServer::ivs(&stub, |config| {
        common::production_policy(config);
        config.identity.sources = vec![IdentitySource::Header];
        config.identity.allow_anonymous = false;
        config.ivs.send_event_quota = Rate::parse("1/h").unwrap();
        config.ivs.send_event_quota_burst = NonZeroU32::new(2).unwrap();
        config.ivs.delete_message_quota = Rate::parse("1/h").unwrap();
        config.ivs.delete_message_quota_burst = NonZeroU32::new(3).unwrap();
    })
    .await;
    let mut client = messaging(&server).await;
    let room = ACCOUNT_111_ROOM;

    let denied = |status: Status| {
        assert_eq!(
            (status.code(), reason(&status).as_str()),
            (Code::PermissionDenied, "POLICY_DENIED"),
            "{status:?}"
        );
    };
    // Web front ends send no events; game servers send the ones our clients handle, in their accounts.
    denied(
        client
            .send_event(from(WEB, event(room, "game:score")))
            .await
            .unwrap_err(),
    );
    denied(
        client
            .send_event(from(GAME_SERVER, event(room, "chat:hello")))
            .await
            .unwrap_err(),
    );
    denied(
        client
            .send_event(from(
                GAME_SERVER,
                event(&format!("{EU}/lobby"), "game:score"),
            ))
            .await
            .unwrap_err(),
    );
    // Moderators delete messages, with a reason; game servers do not.
    denied(
        client
            .delete_message(from(GAME_SERVER, delete(room, MESSAGE_ID, "spam")))
            .await
            .unwrap_err(),
    );
    denied(
        client
            .delete_message(from(MODERATION, delete(room, MESSAGE_ID, "")))
            .await
            .unwrap_err(),
    );
    assert!(stub.calls().is_empty(), "no refused call reached IVS");

    client
        .delete_message(from(MODERATION, delete(room, MESSAGE_ID, "spam")))
        .await
        .unwrap();
    for _ in 0..2 {
        client
            .send_event(from(GAME_SERVER, event(room, "game:score")))
            .await
            .unwrap();
    }
    // The SendEvent quota's burst is spent: refused before IVS, naming the guard.
    let throttled = client
        .send_event(from(GAME_SERVER, event(room, "stream:start")))
        .await
        .unwrap_err();
    assert_eq!(throttled.code(), Code::ResourceExhausted, "{throttled:?}");
    let quota = throttled.get_details_quota_failure().unwrap();
    assert_eq!(quota.violations[0].subject, "limit:ivs-send-event-quota");
    assert!(throttled.get_details_retry_info().is_some());
    assert_eq!(calls_of(&stub, "SendEvent").len(), 2);
    // DeleteMessage has a quota of its own: untouched by SendEvent's, and spent by its own calls only.
    client
        .delete_message(from(MODERATION, delete(room, MESSAGE_ID, "again")))
        .await
        .unwrap();
    client
        .delete_message(from(MODERATION, delete(room, MESSAGE_ID, "and again")))
        .await
        .unwrap();
    let throttled = client
        .delete_message(from(MODERATION, delete(room, MESSAGE_ID, "once more")))
        .await
        .unwrap_err();
    assert_eq!(throttled.code(), Code::ResourceExhausted, "{throttled:?}");
    let quota = throttled.get_details_quota_failure().unwrap();
    assert_eq!(
        quota.violations[0].subject,
        "limit:ivs-delete-message-quota"
    );
    assert_eq!(calls_of(&stub, "DeleteMessage").len(), 3);
}

#[tokio::test]
async fn configured_limits_count_each_messaging_action_in_budgets_of_their_own() {
    let stub = IvsStub::start().await;
    let server = TestServer::ivs(&stub, |config| {
        config.rate_limits = vec![chat_token_service::domain::Limit {
            name: "per-room".into(),
            key: chat_token_service::domain::LimitKey::Room,
            rate: Rate::parse("1/h").unwrap(),
            burst: NonZeroU32::new(1).unwrap(),
            shadow: false,
        }];
    })
    .await;
    let mut client = messaging(&server).await;
    let room = format!("{WEST}/lobby");
    client.send_event(event(&room, "e")).await.unwrap();
    client
        .delete_message(delete(&room, MESSAGE_ID, ""))
        .await
        .unwrap();
    let again = client.send_event(event(&room, "e")).await.unwrap_err();
    assert_eq!(again.code(), Code::ResourceExhausted);
    assert_eq!(
        again.get_details_quota_failure().unwrap().violations[0].subject,
        "limit:per-room"
    );
    // CreateChatToken's budget in the room is untouched.
    server
        .client()
        .await
        .create_chat_token(
            chat_token_service::proto::ivschat::v1::CreateChatTokenRequest {
                room_identifier: room.clone(),
                user_id: "u".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(stub.calls().len(), 3);
}

#[tokio::test]
async fn without_a_chat_backend_the_local_issuer_answers_failed_precondition_saying_how_to_enable_it()
 {
    let keys = LocalKeys::new();
    let server = TestServer::from_config(keys.config()).await;
    let mut client = messaging(&server).await;
    let sent = client
        .send_event(event(ACCOUNT_111_ROOM, "game:score"))
        .await
        .unwrap_err();
    // Whatever the request: a deployment without a backend cannot deliver a valid one either.
    let deleted = client
        .delete_message(delete("not-a-room", "", ""))
        .await
        .unwrap_err();
    for status in [sent, deleted] {
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert_eq!(reason(&status), "MESSAGING_NOT_CONFIGURED");
        assert!(
            status.message().contains("messaging.webhook_url"),
            "{status:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------------
// The webhook
// ---------------------------------------------------------------------------------------------------

const SECRET: &str = "a-webhook-signing-secret-of-32-bytes-or-more";

/// One request the receiver got.
#[derive(Clone, Debug)]
struct Delivery {
    body: Value,
    /// Whether `x-cts-signature` is the HMAC-SHA256 of `x-cts-timestamp.body` under [`SECRET`].
    signed: bool,
    /// `x-cts-timestamp`.
    timestamp: u64,
}

/// A chat server's webhook: checks each request's signature and answers as the room id asks.
struct Receiver {
    addr: SocketAddr,
    deliveries: Arc<Mutex<Vec<Delivery>>>,
}

impl Receiver {
    async fn start() -> Receiver {
        let deliveries = Arc::new(Mutex::new(Vec::new()));
        let app = Router::new()
            .route("/cts", post(receive))
            .with_state(deliveries.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Receiver { addr, deliveries }
    }

    fn url(&self) -> String {
        format!("http://{}/cts", self.addr)
    }

    fn deliveries(&self) -> Vec<Delivery> {
        self.deliveries.lock().unwrap().clone()
    }
}

async fn receive(
    State(deliveries): State<Arc<Mutex<Vec<Delivery>>>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let timestamp = headers["x-cts-timestamp"].to_str().unwrap().to_owned();
    let signature = headers["x-cts-signature"].to_str().unwrap();
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET.as_bytes());
    let signed = signature
        .strip_prefix("v1=")
        .and_then(|hex| hex::decode(hex).ok())
        .is_some_and(|tag| {
            let message = [timestamp.as_bytes(), b".", &body].concat();
            ring::hmac::verify(&key, &message, &tag).is_ok()
        });
    let body: Value = serde_json::from_slice(&body).unwrap();
    deliveries.lock().unwrap().push(Delivery {
        body: body.clone(),
        signed,
        timestamp: timestamp.parse().unwrap(),
    });
    if !signed {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let room = body["roomIdentifier"].as_str().unwrap();
    let room_id = room.rsplit('/').next().unwrap();
    let prefix = |p: &str| room_id.starts_with(p);
    if prefix("refuse") {
        StatusCode::BAD_REQUEST.into_response()
    } else if prefix("missing") {
        StatusCode::NOT_FOUND.into_response()
    } else if prefix("throttle") {
        (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "7")]).into_response()
    } else if prefix("broken") {
        StatusCode::INTERNAL_SERVER_ERROR.into_response()
    } else if prefix("slow") {
        tokio::time::sleep(Duration::from_secs(30)).await;
        Json(json!({"id": "SlowSlow1234"})).into_response()
    } else if prefix("huge") {
        Json(json!({"id": "HugeHuge1234", "padding": "x".repeat(8192)})).into_response()
    } else if prefix("badid") {
        Json(json!({"id": "not-an-ivs-id"})).into_response()
    } else {
        Json(json!({"id": "Deliver12345"})).into_response()
    }
}

/// A secret file for [`SECRET`], readable by its owner only.
fn secret_file(keys: &LocalKeys, secret: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = keys.dir.path().join("webhook-secret");
    std::fs::write(&path, format!("{secret}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

async fn webhook_server(
    keys: &LocalKeys,
    receiver: &Receiver,
    tweak: impl FnOnce(&mut Config),
) -> TestServer {
    let mut config = keys.config();
    config.messaging.webhook_url = Some(EndpointUrl::parse(&receiver.url()).unwrap());
    config.messaging.signing_secret_file = Some(secret_file(keys, SECRET));
    tweak(&mut config);
    TestServer::from_config(config).await
}

#[tokio::test]
async fn the_webhook_gets_each_call_signed_and_its_id_reaches_the_caller() {
    let keys = LocalKeys::new();
    let receiver = Receiver::start().await;
    let server = webhook_server(&keys, &receiver, |_| {}).await;
    let mut client = messaging(&server).await;

    let mut request = event(&format!("{WEST}/lobby"), "game:score");
    request.attributes = [("home".to_string(), "3".to_string())].into();
    let sent = client.send_event(request).await.unwrap().into_inner();
    assert_eq!(sent.id, "Deliver12345");
    client
        .delete_message(delete(&format!("{WEST}/lobby"), MESSAGE_ID, "spam"))
        .await
        .unwrap();
    client
        .delete_message(delete(&format!("{WEST}/lobby"), MESSAGE_ID, ""))
        .await
        .unwrap();

    let deliveries = receiver.deliveries();
    assert_eq!(deliveries.len(), 3);
    assert!(deliveries.iter().all(|d| d.signed), "{deliveries:?}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(deliveries.iter().all(|d| now.abs_diff(d.timestamp) <= 5));
    let ids: Vec<&str> = deliveries
        .iter()
        .map(|d| d.body["deliveryId"].as_str().unwrap())
        .collect();
    assert!(ids[0] != ids[1] && ids[1] != ids[2], "{ids:?}");
    let without_id = |delivery: &Delivery| {
        let mut body = delivery.body.clone();
        body.as_object_mut().unwrap().remove("deliveryId");
        body
    };
    assert_eq!(
        without_id(&deliveries[0]),
        json!({
            "operation": "SendEvent", "caller": "anonymous", "roomIdentifier": format!("{WEST}/lobby"),
            "eventName": "game:score", "attributes": {"home": "3"},
        })
    );
    assert_eq!(
        without_id(&deliveries[1]),
        json!({
            "operation": "DeleteMessage", "caller": "anonymous", "roomIdentifier": format!("{WEST}/lobby"),
            "id": MESSAGE_ID, "reason": "spam",
        })
    );
    assert!(deliveries[2].body.get("reason").is_none());
}

#[tokio::test]
async fn the_webhooks_refusals_and_failures_map_to_their_codes_and_are_bounded() {
    let keys = LocalKeys::new();
    let receiver = Receiver::start().await;
    let server = webhook_server(&keys, &receiver, |config| {
        config.messaging.timeout = Duration::from_millis(500);
    })
    .await;
    let mut client = messaging(&server).await;
    for (room, code, why) in [
        ("refuse1", Code::InvalidArgument, "CHAT_BACKEND_VALIDATION"),
        ("missing1", Code::NotFound, "CHAT_BACKEND_NOT_FOUND"),
        (
            "throttle1",
            Code::ResourceExhausted,
            "CHAT_BACKEND_THROTTLED",
        ),
        ("broken1", Code::Unavailable, "CHAT_BACKEND_UNAVAILABLE"),
        ("huge1", Code::Unavailable, "CHAT_BACKEND_UNAVAILABLE"),
        ("badid1", Code::Unavailable, "CHAT_BACKEND_UNAVAILABLE"),
    ] {
        let status = client
            .send_event(event(&format!("{WEST}/{room}"), "e"))
            .await
            .unwrap_err();
        assert_eq!(
            (status.code(), reason(&status).as_str()),
            (code, why),
            "{room}: {status:?}"
        );
        match room {
            "throttle1" => assert_eq!(
                status.get_details_retry_info().unwrap().retry_delay,
                Some(Duration::from_secs(7)),
                "the webhook's Retry-After"
            ),
            "huge1" => assert!(
                status.message().contains("more than 4096 bytes"),
                "{status:?}"
            ),
            _ => {}
        }
    }

    // A webhook that never answers is given up on at messaging.timeout, not at its 30 seconds.
    let started = Instant::now();
    let status = client
        .send_event(event(&format!("{WEST}/slow1"), "e"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("messaging.timeout"), "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );

    // Positive control: the same server delivers.
    client
        .send_event(event(&format!("{WEST}/lobby"), "e"))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_webhook_that_refuses_our_signature_or_cannot_be_reached_is_unavailable() {
    let keys = LocalKeys::new();
    let receiver = Receiver::start().await;
    let server = webhook_server(&keys, &receiver, |config| {
        config.messaging.signing_secret_file = Some(secret_file(
            &keys,
            "not-the-secret-the-receiver-knows-000000",
        ));
    })
    .await;
    let status = messaging(&server)
        .await
        .send_event(event(&format!("{WEST}/lobby"), "e"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("HTTP 401"), "{status:?}");
    assert!(!receiver.deliveries()[0].signed);

    // Nothing listens: a closed port.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/cts", closed.local_addr().unwrap());
    drop(closed);
    let mut config = keys.config();
    config.messaging.webhook_url = Some(EndpointUrl::parse(&url).unwrap());
    config.messaging.signing_secret_file = Some(secret_file(&keys, SECRET));
    let server = TestServer::from_config(config).await;
    let status = messaging(&server)
        .await
        .delete_message(delete(&format!("{WEST}/lobby"), MESSAGE_ID, ""))
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), status.message()),
        (Code::Unavailable, "chat backend: cannot connect")
    );
}

#[tokio::test]
async fn a_secret_file_too_short_or_missing_stops_start_up_naming_the_setting() {
    let keys = LocalKeys::new();
    let mut config = keys.config();
    config.messaging.webhook_url = Some(EndpointUrl::parse("http://127.0.0.1:9/cts").unwrap());
    config.messaging.signing_secret_file = Some(secret_file(&keys, "short"));
    let error = chat_token_service::app::build(&config)
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(
        error.contains("messaging.signing_secret_file")
            && error.contains("32 to 1024 bytes, got 5"),
        "{error}"
    );
    config.messaging.signing_secret_file = Some(keys.dir.path().join("nope"));
    let error = chat_token_service::app::build(&config)
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(error.contains("cannot read"), "{error}");
}

#[tokio::test]
async fn reflection_describes_messaging_service_with_its_two_methods() {
    let keys = LocalKeys::new();
    let server = TestServer::from_config(keys.config()).await;
    let (services, described) =
        common::reflect(server.channel().await, &["ivschat.v1.MessagingService"]).await;
    assert!(
        services.iter().any(|s| s == "ivschat.v1.MessagingService"),
        "{services:?}"
    );
    let methods: Vec<&str> = described[0]
        .iter()
        .flat_map(|file| &file.service)
        .filter(|service| service.name() == "MessagingService")
        .flat_map(|service| service.method.iter().map(|m| m.name()))
        .collect();
    assert_eq!(methods, ["SendEvent", "DeleteMessage"]);
}

#[tokio::test]
async fn rooms_outside_the_served_regions_are_refused_before_any_budget_is_spent() {
    let stub = IvsStub::start().await;
    let server = TestServer::ivs(&stub, |config| {
        config.ivs.allowed_regions =
            vec![chat_token_service::domain::Region::parse("us-west-2").unwrap()];
        config.rate_limits = vec![chat_token_service::domain::Limit {
            name: "everything".into(),
            key: chat_token_service::domain::LimitKey::Global,
            rate: Rate::parse("1/h").unwrap(),
            burst: NonZeroU32::new(1).unwrap(),
            shadow: false,
        }];
    })
    .await;
    let mut client = messaging(&server).await;
    for _ in 0..3 {
        let status = client
            .send_event(event(&format!("{EU}/lobby"), "e"))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert_eq!(bad_fields(&status), ["room_identifier"]);
    }
    // The one call the global limit admits is still there for a served room.
    client
        .send_event(event(&format!("{WEST}/lobby"), "e"))
        .await
        .unwrap();
    assert_eq!(stub.calls().len(), 1);
}

/// Attribute values and reasons are the application's words: whatever happens to a call, they reach
/// neither the server's log nor the caller's error.
#[tokio::test]
async fn attribute_values_and_reasons_never_reach_the_log_or_errors() {
    const VALUE: &str = "ATTRIBUTE-VALUE-7f3a";
    const REASON: &str = "REASON-TEXT-91c2";
    let stub = IvsStub::start().await;
    let receiver = Receiver::start().await;
    let keys = LocalKeys::new();
    let secret = secret_file(&keys, SECRET);
    let ivs = common::Binary::start(&[
        ("CTS_ISSUER", "ivs"),
        ("CTS_IVS__ENDPOINT_URL", &stub.endpoint()),
        ("CTS_IVS__MAX_ATTEMPTS", "1"),
        ("AWS_ACCESS_KEY_ID", "AKIDOFTHESERVICE0000"),
        ("AWS_SECRET_ACCESS_KEY", "service-secret"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ]);
    let local = common::Binary::start(&[
        ("CTS_LOCAL_ISSUER__KEYS_FILE", keys.path.to_str().unwrap()),
        ("CTS_MESSAGING__WEBHOOK_URL", &receiver.url()),
        (
            "CTS_MESSAGING__SIGNING_SECRET_FILE",
            secret.to_str().unwrap(),
        ),
    ]);
    let mut refusals = Vec::new();
    for binary in [&ivs, &local] {
        let mut client = MessagingServiceClient::connect(format!("http://{}", binary.addr))
            .await
            .unwrap();
        for room in [
            "lobby", "invalid1", "denied1", "broken1", "refuse1", "missing1", "huge1",
        ] {
            let room = format!("{WEST}/{room}");
            let mut request = event(&room, "game:score");
            request.attributes = [("detail".to_string(), VALUE.to_string())].into();
            let sent = client.send_event(request).await;
            let deleted = client
                .delete_message(delete(&room, MESSAGE_ID, REASON))
                .await;
            refusals.extend(sent.err().into_iter().chain(deleted.err()));
        }
        // Too long: refused by validation, which describes the rule.
        let mut request = event(ACCOUNT_111_ROOM, "e");
        request.attributes = [("detail".to_string(), VALUE.repeat(200))].into();
        refusals.extend(client.send_event(request).await.err());
    }
    assert!(refusals.len() >= 10, "{refusals:?}");
    for status in &refusals {
        let shown = format!("{status:?}");
        assert!(!shown.contains(VALUE) && !shown.contains(REASON), "{shown}");
    }
    assert!(
        stub.calls()
            .iter()
            .any(|call| call.body.to_string().contains(VALUE))
            && receiver
                .deliveries()
                .iter()
                .any(|d| d.body.to_string().contains(REASON)),
        "positive control: the values did travel to IVS and to the webhook"
    );
    for binary in [ivs, local] {
        binary.signal("-TERM");
        let (status, log) = binary.exit().await;
        assert_eq!(status.code(), Some(0));
        let log = log.join("\n");
        assert!(log.contains("messaging"), "the calls were logged: {log}");
        assert!(!log.contains(VALUE) && !log.contains(REASON), "{log}");
    }
}

/// An `https://` webhook signed by a private CA: trusted through `SSL_CERT_FILE`, refused without it.
#[tokio::test]
async fn an_https_webhook_is_trusted_through_the_system_roots_or_ssl_cert_file() {
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let ca = common::pki::Ca::new("chat server CA");
    let leaf = ca.server();
    let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(Arc::new(
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![CertificateDer::from_pem_slice(leaf.cert_pem.as_bytes()).unwrap()],
        PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap(),
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let bodies = Arc::new(Mutex::new(Vec::<Value>::new()));
    tokio::spawn({
        let bodies = bodies.clone();
        async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, bodies) = (acceptor.clone(), bodies.clone());
                tokio::spawn(async move {
                    // One HTTP/1.1 request per connection, enough for the webhook's single POST.
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut read = Vec::new();
                    let mut buffer = [0; 4096];
                    let body = loop {
                        let n = tls.read(&mut buffer).await.unwrap();
                        assert!(n > 0, "the request ended early");
                        read.extend_from_slice(&buffer[..n]);
                        let text = String::from_utf8_lossy(&read).into_owned();
                        let Some((head, body)) = text.split_once("\r\n\r\n") else {
                            continue;
                        };
                        let length: usize = head
                            .lines()
                            .find_map(|line| {
                                line.to_ascii_lowercase()
                                    .strip_prefix("content-length: ")
                                    .map(str::to_owned)
                            })
                            .unwrap()
                            .parse()
                            .unwrap();
                        if body.len() >= length {
                            break body.to_owned();
                        }
                    };
                    bodies
                        .lock()
                        .unwrap()
                        .push(serde_json::from_str(&body).unwrap());
                    let answer = r#"{"id":"OverTls12345"}"#;
                    let response = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}",
                        answer.len()
                    );
                    tls.write_all(response.as_bytes()).await.unwrap();
                    tls.shutdown().await.ok();
                });
            }
        }
    });

    let keys = LocalKeys::new();
    let secret = secret_file(&keys, SECRET);
    let ca_file = keys.dir.path().join("chat-server-ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let url = format!("https://localhost:{port}/cts");
    let send = |trust: Option<&PathBuf>| {
        let mut env = vec![
            (
                "CTS_LOCAL_ISSUER__KEYS_FILE",
                keys.path.to_str().unwrap().to_owned(),
            ),
            ("CTS_MESSAGING__WEBHOOK_URL", url.clone()),
            (
                "CTS_MESSAGING__SIGNING_SECRET_FILE",
                secret.to_str().unwrap().to_owned(),
            ),
        ];
        if let Some(ca_file) = trust {
            env.push(("SSL_CERT_FILE", ca_file.to_str().unwrap().to_owned()));
        }
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let binary = common::Binary::start(&env);
        async move {
            let answer = MessagingServiceClient::connect(format!("http://{}", binary.addr))
                .await
                .unwrap()
                .send_event(event(&format!("{WEST}/lobby"), "game:score"))
                .await;
            drop(binary);
            answer
        }
    };

    let untrusted = send(None).await.unwrap_err();
    assert_eq!(
        (untrusted.code(), untrusted.message()),
        (Code::Unavailable, "chat backend: cannot connect")
    );
    assert!(bodies.lock().unwrap().is_empty());
    let trusted = send(Some(&ca_file)).await.unwrap().into_inner();
    assert_eq!(trusted.id, "OverTls12345");
    assert_eq!(bodies.lock().unwrap()[0]["eventName"], "game:score");
}
