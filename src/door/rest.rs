//! IVS Chat's own REST-JSON API, beside gRPC on the same listener: `POST /CreateChatToken` and
//! `POST /DisconnectUser` exactly as IVS Chat's service model defines them, so `aws ivschat
//! create-chat-token --endpoint-url …` (and `disconnect-user`) and every AWS SDK become clients by changing
//! only their endpoint.
//!
//! This door is as thin as the gRPC one: JSON ⇄ domain types, nothing else. Both go through the same
//! [`Door`] and [`ModerationDoor`]: one identity resolver (plus the `sigv4` source, which needs the body),
//! one domain stack, one audit trail. Errors come from the same table ([`crate::rescue`]), shaped as IVS
//! shapes them so SDKs raise their typed exceptions.
//!
//! Every response carries `x-amzn-RequestId`: the call's trace id (set by the
//! [`RpcTraceLayer`](crate::transport::trace::RpcTraceLayer), the one its log lines carry), else a fresh
//! UUID, so the CLI's `--debug` output and SDK exceptions name something the server log can be searched
//! for.
//!
//! ```
//! # use chat_token_service::{config::HttpApiConfig, door::{Door, rest}, transport::inflight::Calls};
//! # async fn example(door: Door) {
//! // No moderation door: only CreateChatToken. `rest::beside` puts it next to the gRPC routes.
//! let router = rest::router(door, None, &HttpApiConfig::default(), Calls::new(1024));
//! # }
//! ```

use std::{collections::BTreeMap, sync::Arc, time::SystemTime};

use axum::body::Body;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use serde::Deserialize;

use super::{Door, ModerationDoor, ModerationNames, UncheckedModeration, ivs_error};
use crate::config::HttpApiConfig;
use crate::domain::{
    Action, Capabilities, Error, FieldNames, IssuedToken, TokenRequest, UncheckedRequest,
};
use crate::rescue::{IvsError, UNKNOWN_OPERATION, VALIDATION_OTHER};
use crate::transport::{inflight::Calls, listener::peer_certs, trace::CallTraceId};

/// The header AWS SDKs read the request id from.
const REQUEST_ID: &str = "x-amzn-requestid";
/// The header AWS SDKs read the error shape from.
const ERROR_TYPE: &str = "x-amzn-errortype";

/// What every route of this API needs.
struct Api {
    door: Door,
    /// Largest body read (`http_api.max_body_bytes`).
    max_body_bytes: usize,
    /// Token calls in flight, shared with gRPC's, and their cap (`max_concurrent_calls`).
    calls: Calls,
}

/// `grpc`'s routes with the IVS Chat API's (`rest`, from [`router`]) beside them. Requests for paths
/// neither serves get gRPC's UNIMPLEMENTED when they are gRPC, else IVS's ValidationException
/// `UNKNOWN_OPERATION`: an SDK calling an operation this service does not offer gets an error, never an
/// empty success.
pub fn beside(grpc: tonic::service::Routes, rest: axum::Router) -> tonic::service::Routes {
    grpc.into_axum_router()
        .merge(rest)
        .fallback(unknown_operation)
        .into()
}

async fn unknown_operation(request: Request<Body>) -> Response<Body> {
    let grpc = request
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if grpc {
        let (parts, ()) = tonic::Status::unimplemented("")
            .into_http::<()>()
            .into_parts();
        return Response::from_parts(parts, Body::empty());
    }
    let request_id = request_id(&request);
    let offered: Vec<String> = Action::ALL
        .into_iter()
        .filter(|action| action.in_ivs_api())
        .map(|action| format!("{action} (POST /{action})"))
        .collect();
    let mut response = error_response(&IvsError::unreadable(
        UNKNOWN_OPERATION,
        format!(
            "this service offers {} of IVS Chat's API",
            offered.join(" and ")
        ),
    ));
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(REQUEST_ID, value);
    }
    response
}

/// The routes of the IVS Chat API: CreateChatToken through `door`, and DisconnectUser through
/// `moderation` when there is one. CreateChatToken calls take a place in `calls` (with gRPC's).
pub fn router(
    door: Door,
    moderation: Option<ModerationDoor>,
    settings: &HttpApiConfig,
    calls: Calls,
) -> axum::Router {
    let api = Arc::new(Api {
        door,
        max_body_bytes: settings.max_body_bytes,
        calls,
    });
    let router = axum::Router::new().route(&path(Action::CreateChatToken), {
        let api = api.clone();
        axum::routing::any(move |request| create_chat_token(api.clone(), request))
    });
    match moderation {
        Some(moderation) => router.route(
            &path(Action::DisconnectUser),
            axum::routing::any(move |request| {
                disconnect_user(api.clone(), moderation.clone(), request)
            }),
        ),
        None => router,
    }
}

/// Where IVS Chat's API serves `action`.
fn path(action: Action) -> String {
    format!("/{action}")
}

/// `CreateChatTokenRequest` as IVS Chat's model spells it. Absent strings decode as empty, so validation
/// reports them as required fields, by name, like every other bad field.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateChatTokenInput {
    #[serde(default)]
    room_identifier: String,
    #[serde(default)]
    user_id: String,
    #[serde(default)]
    capabilities: Vec<String>,
    session_duration_in_minutes: Option<i64>,
    #[serde(default)]
    attributes: BTreeMap<String, String>,
}

async fn create_chat_token(api: Arc<Api>, request: Request<Body>) -> Response<Body> {
    respond(
        request_id(&request),
        issue(&api, request)
            .await
            .map(|issued| token_output(&issued)),
    )
}

/// The response to a call: 200 with `output`, or the error in IVS's shape; with a request id either way.
fn respond(request_id: String, result: Result<serde_json::Value, IvsError>) -> Response<Body> {
    let mut response = match result {
        Ok(output) => json_response(StatusCode::OK, &output),
        Err(error) => error_response(&error),
    };
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(REQUEST_ID, value);
    }
    response
}

/// A call's head and whole body, once it is a POST of JSON within the size limit.
async fn accept(
    api: &Api,
    operation: Action,
    request: Request<Body>,
) -> Result<(http::request::Parts, axum::body::Bytes), IvsError> {
    if request.method() != Method::POST {
        return Err(IvsError {
            status: StatusCode::METHOD_NOT_ALLOWED,
            ..IvsError::unreadable(VALIDATION_OTHER, format!("{operation} takes POST"))
        });
    }
    let (parts, body) = request.into_parts();
    check_content_type(&parts.headers)?;
    let body = read_body(&parts.headers, body, api.max_body_bytes).await?;
    Ok((parts, body))
}

async fn issue(api: &Api, request: Request<Body>) -> Result<IssuedToken, IvsError> {
    let (parts, body) = accept(api, Action::CreateChatToken, request).await?;
    // The same cap as gRPC token calls, taken once the whole body has arrived (see
    // crate::transport::inflight).
    let _place = api.calls.admit().ok_or_else(|| {
        let error = Error::Overloaded {
            max_calls: api.calls.max(),
        };
        tracing::info!(target: "audit", outcome = error.outcome(), "token refused");
        ivs_error(error)
    })?;
    let door = &api.door;
    let peer_certs = peer_certs(&parts.extensions);
    let caller = door
        .identity()
        .resolve_http(&parts, &body, peer_certs)
        .map_err(|error| ivs_error(door.refuse(None, error)))?;

    let input: CreateChatTokenInput = serde_json::from_slice(&body).map_err(|e| {
        // serde's messages can quote the values (user ids, attributes): report where, not what.
        IvsError::unreadable(
            VALIDATION_OTHER,
            format!(
                "the body is not a CreateChatToken request in JSON (line {}, column {}): expected an \
                 object with roomIdentifier, userId, capabilities, sessionDurationInMinutes, attributes",
                e.line(),
                e.column()
            ),
        )
    })?;
    let unchecked = UncheckedRequest {
        room_identifier: input.room_identifier,
        user_id: input.user_id,
        capabilities: Capabilities::from_ivs_names(&input.capabilities),
        session_duration_in_minutes: input.session_duration_in_minutes,
        attributes: input.attributes.into_iter().collect(),
    };
    let request = TokenRequest::validate(caller.clone(), unchecked, &FieldNames::IVS)
        .map_err(|error| ivs_error(door.refuse(Some(&caller), error)))?;
    let request = door
        .bind(request, &parts.headers, &FieldNames::IVS, None)
        .await
        .map_err(ivs_error)?;
    door.issue(request, None).await.map_err(ivs_error)
}

/// `DisconnectUserRequest` as IVS Chat's model spells it; absent strings are reported as required fields.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DisconnectUserInput {
    #[serde(default)]
    room_identifier: String,
    #[serde(default)]
    user_id: String,
    #[serde(default)]
    reason: String,
}

async fn disconnect_user(
    api: Arc<Api>,
    moderation: ModerationDoor,
    request: Request<Body>,
) -> Response<Body> {
    // DisconnectUserResponse has no members.
    respond(
        request_id(&request),
        disconnect(&api, &moderation, request)
            .await
            .map(|()| serde_json::json!({})),
    )
}

async fn disconnect(
    api: &Api,
    moderation: &ModerationDoor,
    request: Request<Body>,
) -> Result<(), IvsError> {
    const ACTION: Action = Action::DisconnectUser;
    let (parts, body) = accept(api, ACTION, request).await?;
    let peer_certs = peer_certs(&parts.extensions);
    let caller = moderation
        .identity()
        .resolve_http(&parts, &body, peer_certs)
        .map_err(|error| ivs_error(ModerationDoor::unidentified(ACTION, error)))?;
    let input: DisconnectUserInput = serde_json::from_slice(&body).map_err(|e| {
        // serde's messages can quote the values (user ids, reasons): report where, not what.
        IvsError::unreadable(
            VALIDATION_OTHER,
            format!(
                "the body is not a DisconnectUser request in JSON (line {}, column {}): expected an \
                 object with roomIdentifier, userId, reason",
                e.line(),
                e.column()
            ),
        )
    })?;
    let fields = UncheckedModeration {
        room_identifier: input.room_identifier,
        user_id: input.user_id,
        reason: input.reason,
        ..UncheckedModeration::default()
    };
    let validated = moderation.validate(ACTION, caller.clone(), fields, &ModerationNames::IVS);
    // IVS's HTTP API carries no deadline; ivs.operation_timeout bounds the upstream call.
    moderation
        .decide(ACTION, &caller, validated, None)
        .await
        .map_err(ivs_error)?;
    Ok(())
}

/// REST-JSON bodies are `application/json`; a body in anything else is refused rather than guessed at.
fn check_content_type(headers: &http::HeaderMap) -> Result<(), IvsError> {
    let Some(content_type) = headers.get(header::CONTENT_TYPE) else {
        return Ok(());
    };
    let essence = content_type
        .to_str()
        .ok()
        .and_then(|v| v.split(';').next())
        .map(str::trim);
    match essence {
        Some(essence) if essence.eq_ignore_ascii_case("application/json") => Ok(()),
        _ => Err(IvsError {
            status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ..IvsError::unreadable(VALIDATION_OTHER, "the body must be application/json")
        }),
    }
}

/// The whole body, refused with 413 past `limit` bytes: at once when `content-length` says so, else as
/// soon as the bytes read pass it.
async fn read_body(
    headers: &http::HeaderMap,
    body: Body,
    limit: usize,
) -> Result<axum::body::Bytes, IvsError> {
    let too_large = || IvsError {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        ..IvsError::unreadable(
            VALIDATION_OTHER,
            format!("the body must be at most {limit} bytes"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return Err(too_large());
    }
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let over_limit =
            std::iter::successors(Some(&e as &(dyn std::error::Error + 'static)), |e| {
                e.source()
            })
            .any(|e| e.is::<http_body_util::LengthLimitError>());
        if over_limit {
            too_large()
        } else {
            IvsError::unreadable(VALIDATION_OTHER, "the body could not be read")
        }
    })
}

/// `CreateChatTokenResponse`. Times are ISO 8601 in whole seconds with an explicit UTC offset, which every
/// SDK parses and the AWS CLI prints as the reference page shows: `2022-03-16T03:45:09+00:00`.
fn token_output(issued: &IssuedToken) -> serde_json::Value {
    let time = |at: SystemTime| {
        let utc = humantime::format_rfc3339_seconds(at).to_string();
        format!("{}+00:00", utc.trim_end_matches('Z'))
    };
    serde_json::json!({
        "token": issued.token,
        "tokenExpirationTime": time(issued.token_expires_at),
        "sessionExpirationTime": time(issued.session_expires_at),
    })
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<Body> {
    let mut response = Response::new(Body::from(body.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn error_response(error: &IvsError) -> Response<Body> {
    let mut response = json_response(error.status, &error.body());
    let headers = response.headers_mut();
    headers.insert(ERROR_TYPE, HeaderValue::from_static(error.error_type));
    if let Some(seconds) = error.retry_after_seconds() {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}

/// The call's trace id, or a fresh UUID outside the
/// [`RpcTraceLayer`](crate::transport::trace::RpcTraceLayer).
fn request_id<B>(request: &Request<B>) -> String {
    match request.extensions().get::<CallTraceId>() {
        Some(CallTraceId(trace_id)) => trace_id.to_string(),
        None => uuid::Uuid::new_v4().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::issuer::local::{KeySet, LocalIssuer};
    use tower::ServiceExt;

    const ARN: &str = "arn:aws:ivschat:us-west-2:123456789012:room/g1H2I3j4k5L6";

    async fn router(max_body_bytes: usize) -> axum::Router {
        router_with_cap(max_body_bytes, Calls::new(1024)).await
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
            &HttpApiConfig {
                max_body_bytes,
                ..HttpApiConfig::default()
            },
            calls,
        )
    }

    async fn call(
        router: axum::Router,
        request: Request<Body>,
    ) -> (Response<()>, serde_json::Value) {
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
        let calls = Calls::new(1);
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
            super::router(door().await, None, &config.http_api, Calls::new(1024)),
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
        assert_eq!(json["message"], "the body must be application/json");

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
        let (response, json) =
            call(router(limit).await, post("application/json", padded(limit))).await;
        assert_eq!(response.status(), StatusCode::OK, "{json}");
        let mut declared = post("application/json", padded(limit + 1));
        declared
            .headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(limit + 1));
        let (response, json) = call(router(limit).await, declared).await;
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(json["message"], "the body must be at most 8192 bytes");

        // Without content-length (chunked): refused as soon as the bytes read pass the limit.
        let stream = futures_util::stream::iter([Ok::<_, std::io::Error>(
            axum::body::Bytes::from(padded(limit + 1)),
        )]);
        let (response, _) = call(
            router(limit).await,
            post("application/json", Body::from_stream(stream)),
        )
        .await;
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }
}
