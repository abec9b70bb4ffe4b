use super::*;
use crate::config::Config;
use crate::issuer::local::{KeySet, LocalIssuer};
use crate::transport::inflight::CallLimits;
use tower::ServiceExt;

const ARN: &str = "arn:aws:ivschat:us-west-2:123456789012:room/g1H2I3j4k5L6";

async fn router(max_body_bytes: usize) -> axum::Router {
    router_with_cap(max_body_bytes, Calls::new(CallLimits::default())).await
}

/// The door of the embedded defaults, around an ephemeral local key.
async fn door() -> Door {
    let config = Config::default();
    let issuer = LocalIssuer::new(Arc::new(KeySet::ephemeral()), config.local_issuer.token_ttl);
    crate::app::build_around(&config, issuer)
        .await
        .unwrap()
        .door
}

async fn router_with_cap(max_body_bytes: usize, calls: Calls) -> axum::Router {
    super::router(
        door().await,
        None,
        None,
        &HttpApiConfig {
            max_body_bytes,
            ..HttpApiConfig::default()
        },
        calls,
    )
}

async fn call(router: axum::Router, request: Request<Body>) -> (Response<()>, serde_json::Value) {
    let response = router.oneshot(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap();
    let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    (Response::from_parts(parts, ()), json)
}

fn post(content_type: &str, body: impl Into<Body>) -> Request<Body> {
    Request::post(path(Action::CreateChatToken))
        .header(header::CONTENT_TYPE, content_type)
        .body(body.into())
        .unwrap()
}

#[tokio::test]
async fn token_calls_over_the_shared_cap_get_service_unavailable() {
    let calls = Calls::new(CallLimits {
        max_calls: 1,
        ..CallLimits::default()
    });
    let held = calls.admit().expect("the only place");
    let request = || {
        post(
            "application/json",
            format!(r#"{{"roomIdentifier":"{ARN}","userId":"u"}}"#),
        )
    };
    let router = router_with_cap(16 * 1024, calls.clone()).await;
    let (response, json) = call(router.clone(), request()).await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE, "{json}");
    assert_eq!(
        response.headers()[ERROR_TYPE],
        "ServiceUnavailableException"
    );
    assert!(response.headers().contains_key(header::RETRY_AFTER));

    drop(held);
    let (response, json) = call(router, request()).await;
    assert_eq!(response.status(), StatusCode::OK, "{json}");
    assert_eq!(calls.capped(), 0, "the place is given back with the answer");
}

#[tokio::test]
async fn unknown_paths_are_unimplemented_for_grpc_and_unknown_operation_for_sdks() {
    let config = Config::default();
    let routes = beside(
        tonic::service::Routes::default(),
        super::router(
            door().await,
            None,
            None,
            &config.http_api,
            Calls::new(CallLimits::default()),
        ),
    );
    let router = routes.into_axum_router();

    let (_, json) = call(router.clone(), post("application/json", "{}")).await;
    assert_eq!(
        json["reason"], "FIELD_VALIDATION_FAILED",
        "CreateChatToken is served: {json}"
    );

    let mut sdk = post("application/json", "{}");
    *sdk.uri_mut() = "/GetRoom".parse().unwrap();
    let (response, json) = call(router.clone(), sdk).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(json["reason"], "UNKNOWN_OPERATION");

    let mut grpc = post("application/grpc", Body::empty());
    *grpc.uri_mut() = "/ivschat.v1.Nope/Call".parse().unwrap();
    let (response, _) = call(router, grpc).await;
    assert_eq!(response.headers()["grpc-status"], "12");
}

#[tokio::test]
async fn issues_a_token_with_iso_8601_times_and_a_request_id() {
    let body = serde_json::json!({
        "roomIdentifier": ARN, "userId": "11231234", "capabilities": ["SEND_MESSAGE"],
        "sessionDurationInMinutes": 30,
    });
    let (response, json) = call(
        router(16384).await,
        post("application/json", body.to_string()),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK, "{json}");
    assert!(json["token"].as_str().unwrap().starts_with("v4.local."));
    let session = json["sessionExpirationTime"].as_str().unwrap();
    assert!(
        time::OffsetDateTime::parse(session, &time::format_description::well_known::Rfc3339)
            .is_ok(),
        "{session}"
    );
    assert!(
        session.ends_with("+00:00") && !session.contains('.'),
        "{session}"
    );
    assert!(response.headers().contains_key(REQUEST_ID));
}

#[test]
fn the_response_keeps_ivs_shape_without_the_chat_endpoint() {
    let issued = IssuedToken {
        token: "t".into(),
        token_id: None,
        token_expires_at: SystemTime::UNIX_EPOCH,
        session_expires_at: SystemTime::UNIX_EPOCH,
        chat_endpoint: Some("wss://edge.ivschat.us-west-2.amazonaws.com".into()),
    };
    let output = token_output(&issued);
    let mut keys: Vec<_> = output.as_object().unwrap().keys().collect();
    keys.sort();
    assert_eq!(
        keys,
        ["sessionExpirationTime", "token", "tokenExpirationTime"]
    );
}

#[tokio::test]
async fn every_bad_field_is_listed_with_ivs_names() {
    let body = serde_json::json!({
        "roomIdentifier": "nope", "capabilities": ["SEND_MESSAGE", "FLY"], "sessionDurationInMinutes": 181,
    });
    let (response, json) = call(
        router(16384).await,
        post("application/json", body.to_string()),
    )
    .await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(response.headers()[ERROR_TYPE], "ValidationException");
    assert_eq!(json["reason"], "FIELD_VALIDATION_FAILED");
    let names: Vec<_> = json["fieldList"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "roomIdentifier",
            "userId",
            "capabilities",
            "sessionDurationInMinutes"
        ]
    );
}

#[tokio::test]
async fn unreadable_requests_get_a_clear_4xx() {
    let (response, json) = call(
        router(16384).await,
        post("application/json", "{\"userId\": 5"),
    )
    .await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(json["reason"], "OTHER");
    assert!(response.headers().contains_key(REQUEST_ID));

    let (response, json) = call(
        router(16384).await,
        post(
            "application/json",
            "{\"userId\": \"secret-user\", \"roomIdentifier\": 7}",
        ),
    )
    .await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(json["reason"], "OTHER");
    assert!(
        !json.to_string().contains("secret-user"),
        "says where, never echoes values: {json}"
    );

    let (response, json) = call(router(16384).await, post("text/plain", "{}")).await;
    assert_eq!(response.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(
        json["message"],
        "the body must be JSON, sent with Content-Type: application/json"
    );

    let get = Request::get(path(Action::CreateChatToken))
        .body(Body::empty())
        .unwrap();
    let (response, _) = call(router(16384).await, get).await;
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn the_body_limit_admits_its_size_and_refuses_one_byte_more() {
    let limit = 8192;
    let padded = |size: usize| {
        let head = format!("{{\"roomIdentifier\":\"{ARN}\",\"userId\":\"u\",\"pad\":\"");
        let tail = "\"}";
        format!("{head}{}{tail}", "x".repeat(size - head.len() - tail.len()))
    };
    let (response, json) = call(router(limit).await, post("application/json", padded(limit))).await;
    assert_eq!(response.status(), StatusCode::OK, "{json}");
    let mut declared = post("application/json", padded(limit + 1));
    declared
        .headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(limit + 1));
    let (response, json) = call(router(limit).await, declared).await;
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(json["message"], "the body must be at most 8192 bytes");

    // Without content-length (chunked): refused as soon as the bytes read pass the limit.
    let stream = futures_util::stream::iter([Ok::<_, std::io::Error>(axum::body::Bytes::from(
        padded(limit + 1),
    ))]);
    let (response, _) = call(
        router(limit).await,
        post("application/json", Body::from_stream(stream)),
    )
    .await;
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
}
