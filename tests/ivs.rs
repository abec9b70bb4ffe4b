//! The IVS issuer end to end: tonic client → service → the real aws-sdk-ivschat client → the IVS Chat stub
//! (tests/common/ivs_stub.rs) through the SDK's endpoint override, all on loopback.

mod common;

use std::{
    num::NonZeroU32,
    time::{Duration, SystemTime},
};

use tokio::time::Instant;

use chat_token_service::{
    app::{self, Overrides},
    config::{Config, EndpointUrl, IssuerKind},
    domain::{AccountId, Limit, LimitKey, Rate, Region},
    proto::ivschat::v1::CreateChatTokenRequest,
    store::limits::MemoryStore,
};
use common::{Binary, TestServer, eventually, ivs_stub::IvsStub, raw::RawConnection};
use tonic::{Code, Request};
use tonic_types::StatusExt;

const WEST: &str = "arn:aws:ivschat:us-west-2:111111111111:room";
const EU: &str = "arn:aws:ivschat:eu-west-1:222222222222:room";

fn request(room: &str) -> CreateChatTokenRequest {
    CreateChatTokenRequest {
        room_identifier: room.into(),
        user_id: "user-1".into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn tokens_come_from_ivs_with_each_room_routed_to_its_own_region() {
    let stub = IvsStub::start().await;
    let server = TestServer::ivs(&stub, |_| {}).await;
    let mut client = server.client().await;

    let west = client
        .create_chat_token(CreateChatTokenRequest {
            room_identifier: format!("{WEST}/lobby"),
            user_id: "ユーザー".into(),
            capabilities: vec![1, 3, 1],
            session_duration_in_minutes: Some(30),
            attributes: [("displayName".to_string(), "Zoë".to_string())].into(),
        })
        .await
        .unwrap()
        .into_inner();
    let eu = client
        .create_chat_token(request(&format!("{EU}/backstage")))
        .await
        .unwrap()
        .into_inner();

    let calls = stub.calls();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0].signed_region, "us-west-2");
    assert_eq!(calls[1].signed_region, "eu-west-1");

    // The request reached IVS field for field.
    let body = &calls[0].body;
    assert_eq!(body["roomIdentifier"], format!("{WEST}/lobby"));
    assert_eq!(body["userId"], "ユーザー");
    assert_eq!(
        body["capabilities"],
        serde_json::json!(["SEND_MESSAGE", "DELETE_MESSAGE"])
    );
    assert_eq!(body["sessionDurationInMinutes"], 30);
    assert_eq!(
        body["attributes"],
        serde_json::json!({ "displayName": "Zoë" })
    );
    // Absent stays absent: IVS applies its own default.
    assert!(
        calls[1].body.get("sessionDurationInMinutes").is_none(),
        "{:?}",
        calls[1].body
    );

    // Each client is told its room's region's messaging endpoint.
    assert_eq!(
        west.chat_endpoint,
        "wss://edge.ivschat.us-west-2.amazonaws.com"
    );
    assert_eq!(
        eu.chat_endpoint,
        "wss://edge.ivschat.eu-west-1.amazonaws.com"
    );

    // And IVS's answer reached the caller unchanged.
    for (response, call) in [(&west, &calls[0]), (&eu, &calls[1])] {
        let stub_said = call.response.as_ref().unwrap();
        assert_eq!(response.token, stub_said["token"].as_str().unwrap());
        let expected =
            |field: &str| humantime::parse_rfc3339(stub_said[field].as_str().unwrap()).unwrap();
        assert_eq!(
            SystemTime::try_from(response.token_expiration_time.unwrap()).unwrap(),
            expected("tokenExpirationTime")
        );
        assert_eq!(
            SystemTime::try_from(response.session_expiration_time.unwrap()).unwrap(),
            expected("sessionExpirationTime")
        );
    }
}

#[tokio::test]
async fn every_upstream_failure_maps_to_its_grpc_code() {
    let stub = IvsStub::start().await;
    let server = TestServer::ivs(&stub, |_| {}).await;
    let mut client = server.client().await;
    let cases = [
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
    ];
    for (room, code, reason) in cases {
        let status = client
            .create_chat_token(request(&format!("{WEST}/{room}")))
            .await
            .unwrap_err();
        assert_eq!(status.code(), code, "{room}: {status:?}");
        let info = status.get_details_error_info().expect("ErrorInfo");
        assert_eq!(info.reason, reason, "{room}");
        assert!(
            !info.metadata["aws_request_id"].is_empty(),
            "{room}: request id kept"
        );
        assert!(
            status.message().contains("request id"),
            "{room}: {status:?}"
        );
        assert!(
            !status.message().contains("arn:aws:sts"),
            "{room}: IAM principal leaked"
        );
        assert!(
            !status.message().contains("stub-secret") && !status.message().contains("AKIDSTUB")
        );
        match room {
            "invalid" => {
                let fields = status.get_details_bad_request().unwrap().field_violations;
                assert_eq!(
                    fields[0].field, "user_id",
                    "the upstream field list is passed on, in our field names"
                );
                assert!(
                    !status.message().contains("rejected by the stub")
                        && !fields[0].description.contains("rejected by the stub"),
                    "IVS's own message is summarised, never echoed: {status:?}"
                );
            }
            "throttled" => {
                assert!(
                    status
                        .get_details_retry_info()
                        .unwrap()
                        .retry_delay
                        .is_some()
                );
                assert!(status.metadata().get("retry-after").is_some());
            }
            _ => {}
        }
    }
}

#[tokio::test]
async fn retries_on_500_and_throttling_stop_at_the_configured_bound() {
    let stub = IvsStub::start().await;
    let server = TestServer::ivs(&stub, |config| {
        config.ivs.max_attempts = NonZeroU32::new(3).unwrap()
    })
    .await;
    let mut client = server.client().await;

    let status = client
        .create_chat_token(request(&format!("{WEST}/broken")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(stub.attempts("broken"), 3);
    let status = client
        .create_chat_token(request(&format!("{WEST}/throttled")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(stub.attempts("throttled"), 3);

    // A transient 500 is retried away.
    client
        .create_chat_token(request(&format!("{WEST}/flaky")))
        .await
        .unwrap();
    assert_eq!(stub.attempts("flaky"), 2);

    // Four-hundreds other than throttling are final.
    let status = client
        .create_chat_token(request(&format!("{WEST}/notfound")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert_eq!(stub.attempts("notfound"), 1);
}

/// Deadline propagation seen from the server's side: a raw HTTP/2 call (no client timer that could end it
/// first) with `grpc-timeout: 500m` is answered `DEADLINE_EXCEEDED` by the server within the deadline and a
/// small margin, and the server drops its upstream call, which the stub sees.
#[tokio::test]
async fn a_slow_upstream_is_cut_at_the_callers_deadline() {
    const DEADLINE: Duration = Duration::from_millis(500);
    /// What a loaded 2-core machine may add; far below `ivs.attempt_timeout` (3 s), the next thing that
    /// would end the call if the deadline were ignored.
    const MARGIN: Duration = Duration::from_millis(1000);
    let stub = IvsStub::start().await;
    let server = TestServer::ivs(&stub, |_| {}).await;
    let mut connection = RawConnection::open(server.addr).await;
    let started = Instant::now();
    let (code, message) = tokio::time::timeout(
        DEADLINE + MARGIN,
        connection.unary(
            "/ivschat.v1.TokenService/CreateChatToken",
            &[("grpc-timeout", "500m")],
            &request(&format!("{WEST}/slow")),
        ),
    )
    .await
    .expect("the server answers by the caller's deadline");
    let answered = started.elapsed();
    assert_eq!(code, Code::DeadlineExceeded, "{message}");
    assert!(
        answered >= DEADLINE - Duration::from_millis(50),
        "answered {answered:?}, before the deadline"
    );
    assert_eq!(stub.attempts("slow"), 1, "the call reached the stub");
    tokio::time::timeout_at(started + DEADLINE + MARGIN, async {
        while stub.abandoned("slow") == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the server drops its upstream call at the deadline");

    // Positive control: the same connection serves the next call.
    let (code, message) = connection
        .unary(
            "/ivschat.v1.TokenService/CreateChatToken",
            &[("grpc-timeout", "5S")],
            &request(&format!("{WEST}/lobby")),
        )
        .await;
    assert_eq!(code, Code::Ok, "{message}");
    assert_eq!(stub.abandoned("lobby"), 0);
}

#[tokio::test]
async fn a_slow_upstream_without_a_deadline_is_cut_by_the_operation_timeout() {
    let stub = IvsStub::start().await;
    let server = TestServer::ivs(&stub, |config| {
        config.ivs.attempt_timeout = Duration::from_millis(200);
        config.ivs.operation_timeout = Duration::from_millis(500);
    })
    .await;
    let status = server
        .client()
        .await
        .create_chat_token(request(&format!("{WEST}/slow")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
}

#[tokio::test]
async fn the_quota_guard_refuses_past_the_rate_before_calling_ivs() {
    let stub = IvsStub::start().await;
    let server = TestServer::ivs(&stub, |config| {
        config.ivs.quota = Rate::parse("2/s").unwrap();
        config.ivs.quota_burst = NonZeroU32::new(2).unwrap();
    })
    .await;
    let mut client = server.client().await;
    for _ in 0..2 {
        client
            .create_chat_token(request(&format!("{WEST}/lobby")))
            .await
            .unwrap();
    }
    let status = client
        .create_chat_token(request(&format!("{WEST}/lobby")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let delay = status
        .get_details_retry_info()
        .unwrap()
        .retry_delay
        .unwrap();
    assert!(
        delay > Duration::ZERO && delay <= Duration::from_millis(500),
        "{delay:?}"
    );
    let quota = status.get_details_quota_failure().unwrap();
    assert_eq!(quota.violations[0].subject, "limit:ivs-quota");
    assert_eq!(stub.calls().len(), 2, "the refused call never reached IVS");

    // The budget is per account and region: another region is unaffected.
    client
        .create_chat_token(request(&format!("{EU}/lobby")))
        .await
        .unwrap();
}

#[tokio::test]
async fn rooms_outside_the_allow_lists_are_refused_before_any_aws_call() {
    let stub = IvsStub::start().await;
    let server = TestServer::ivs(&stub, |config| {
        config.ivs.allowed_regions = vec![Region::parse("us-west-2").unwrap()];
        config.ivs.allowed_accounts = vec![AccountId::parse("111111111111").unwrap()];
    })
    .await;
    let mut client = server.client().await;
    let status = client
        .create_chat_token(request(&format!("{EU}/lobby")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let violation = &status.get_details_bad_request().unwrap().field_violations[0];
    assert_eq!(violation.field, "room_identifier");
    assert!(violation.description.contains("eu-west-1"), "{violation:?}");
    let status = client
        .create_chat_token(request("arn:aws:ivschat:us-west-2:999999999999:room/lobby"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(stub.calls().is_empty());
    client
        .create_chat_token(request(&format!("{WEST}/lobby")))
        .await
        .unwrap();
}

#[tokio::test]
async fn an_unreachable_ivs_is_unavailable() {
    // A port nobody listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let stub = IvsStub::start().await;
    let server = TestServer::ivs(&stub, |config| {
        config.ivs.endpoint_url = Some(EndpointUrl::parse(&format!("http://{closed}")).unwrap());
        config.ivs.max_attempts = NonZeroU32::new(2).unwrap();
    })
    .await;
    let status = server
        .client()
        .await
        .create_chat_token(request(&format!("{WEST}/lobby")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("cannot connect"), "{status:?}");
}

#[tokio::test]
async fn the_binary_takes_credentials_from_the_standard_chain() {
    let stub = IvsStub::start().await;
    let endpoint = stub.endpoint();
    let binary = Binary::start(&[
        ("CTS_ISSUER", "ivs"),
        ("CTS_IVS__ENDPOINT_URL", &endpoint),
        ("AWS_ACCESS_KEY_ID", "AKIDFROMENV"),
        ("AWS_SECRET_ACCESS_KEY", "env-secret"),
        // Never reach for instance metadata from a test.
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ]);
    let mut client = binary.client().await;
    client
        .create_chat_token(request(&format!("{WEST}/lobby")))
        .await
        .unwrap();
    binary.signal("-TERM");
    assert_eq!(binary.exit().await.0.code(), Some(0));
    assert_eq!(stub.calls()[0].signed_region, "us-west-2");
}

#[tokio::test]
async fn requests_refused_by_the_allow_lists_or_the_quota_consume_no_rate_limit_budget() {
    let stub = IvsStub::start().await;
    let server = TestServer::ivs(&stub, |config| {
        // Each caller may have two tokens an hour; IVS's quota (here) one call per hour per account+region.
        config.rate_limits = vec![Limit {
            name: "per-caller".into(),
            key: LimitKey::Caller,
            rate: Rate::parse("2/h").unwrap(),
            burst: NonZeroU32::new(2).unwrap(),
            shadow: false,
        }];
        config.ivs.quota = Rate::parse("1/h").unwrap();
        config.ivs.quota_burst = NonZeroU32::MIN;
        config.ivs.allowed_accounts = ["111111111111", "222222222222"]
            .map(|a| AccountId::parse(a).unwrap())
            .to_vec();
    })
    .await;
    let client = server.client().await;
    let refused = |room: String| {
        let mut client = client.clone();
        async move { client.create_chat_token(request(&room)).await.unwrap_err() }
    };

    // Refused by the allow-lists, many times: a made-up region, an account not served.
    for _ in 0..5 {
        let status = refused("arn:aws:ivschat:mars-north-1:111111111111:room/a".into()).await;
        assert_eq!(status.code(), Code::InvalidArgument);
        let status = refused("arn:aws:ivschat:us-west-2:999999999999:room/a".into()).await;
        assert_eq!(status.code(), Code::InvalidArgument);
    }
    // The first token of us-west-2 spends the quota there; further ones are refused by it alone.
    client
        .clone()
        .create_chat_token(request(&format!("{WEST}/lobby")))
        .await
        .unwrap();
    for _ in 0..5 {
        let status = refused(format!("{WEST}/lobby")).await;
        assert_eq!(status.code(), Code::ResourceExhausted);
        let quota = status.get_details_quota_failure().unwrap();
        assert_eq!(quota.violations.len(), 1, "{quota:?}");
        assert_eq!(quota.violations[0].subject, "limit:ivs-quota");
        assert_eq!(
            quota.violations[0].description,
            "1/h per AWS account and region, burst 1"
        );
    }
    // None of those twenty refusals spent the caller's budget: its second token still comes.
    client
        .clone()
        .create_chat_token(request(&format!("{EU}/lobby")))
        .await
        .unwrap();
    let status = refused(format!("{EU}/other")).await;
    let quota = status.get_details_quota_failure().unwrap();
    let subjects: Vec<_> = quota
        .violations
        .iter()
        .map(|v| v.subject.as_str())
        .collect();
    assert!(subjects.contains(&"limit:per-caller"), "{subjects:?}");
    assert_eq!(
        stub.calls().len(),
        2,
        "only the two issued tokens reached IVS"
    );
}

#[tokio::test]
async fn a_thousand_made_up_regions_create_no_client() {
    let config = Config {
        issuer: IssuerKind::Ivs,
        ..Config::default()
    };
    let base = aws_config::SdkConfig::builder()
        .behavior_version(aws_config::BehaviorVersion::latest())
        .build();
    let issuer = app::ivs_issuer(
        &config,
        Overrides {
            aws_sdk: Some(base),
        },
        MemoryStore::new(config.limiter.max_tracked_keys),
    )
    .await;
    for i in 0..1000 {
        let room = format!("arn:aws:ivschat:made-up-{i}:111111111111:room/a");
        let request = chat_token_service::door::grpc::token_request(
            chat_token_service::domain::Caller::new("c"),
            request(&room),
        )
        .unwrap();
        let refused = chat_token_service::issuer::Issuer::issue(&issuer, request).await;
        assert!(
            matches!(
                refused,
                Err(chat_token_service::domain::Error::InvalidArgument(_))
            ),
            "{refused:?}"
        );
    }
    assert_eq!(issuer.clients_created(), 0);
}

#[tokio::test]
async fn a_call_shed_for_overload_is_audited() {
    let stub = IvsStub::start().await;
    let endpoint = stub.endpoint();
    let binary = Binary::start(&[
        ("CTS_ISSUER", "ivs"),
        ("CTS_IVS__ENDPOINT_URL", &endpoint),
        ("CTS_MAX_CONCURRENT_CALLS", "1"),
        ("CTS_LOG_FORMAT", "json"),
        ("AWS_ACCESS_KEY_ID", "AKIDFROMENV"),
        ("AWS_SECRET_ACCESS_KEY", "env-secret"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ]);
    // One call held in flight by a slow upstream (until its deadline) ...
    let mut slow_client = binary.client().await;
    let slow = tokio::spawn(async move {
        let mut slow = Request::new(request(&format!("{WEST}/slow")));
        slow.set_timeout(Duration::from_secs(3));
        slow_client.create_chat_token(slow).await
    });
    eventually("the slow call to reach the stub", || async {
        (stub.attempts("slow") > 0).then_some(())
    })
    .await;
    // ... so the next one is shed.
    let status = binary
        .client()
        .await
        .create_chat_token(request(&format!("{WEST}/lobby")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    slow.abort();
    binary.signal("-TERM");
    let (_, log) = binary.exit().await;
    let shed: Vec<serde_json::Value> = log
        .iter()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|line| line["target"] == "audit" && line["fields"]["outcome"] == "overloaded")
        .collect();
    assert_eq!(shed.len(), 1, "{log:#?}");
}
