//! IVS Chat's own REST-JSON API, beside gRPC on the same listener: `POST /CreateChatToken`,
//! `POST /DisconnectUser`, `POST /SendEvent` and `POST /DeleteMessage` exactly as IVS Chat's service model
//! defines them, so `aws ivschat create-chat-token --endpoint-url …` (and `disconnect-user`, `send-event`,
//! `delete-message`) and every AWS SDK become clients by changing only their endpoint.
//!
//! This door is as thin as the gRPC one: JSON ⇄ domain types, nothing else. Both go through the same
//! [`Door`], [`ModerationDoor`] and [`MessagingDoor`]: one identity resolver (plus the `sigv4` source, which needs the body),
//! one domain stack, one audit trail. Errors come from the same table ([`crate::rescue`]), shaped as IVS
//! shapes them so SDKs raise their typed exceptions.
//!
//! What a browser can do to a developer's machine is what shapes the checks before any body is read, so
//! a web page open in the developer's browser cannot drive a local service (CSRF) or read what it
//! answers (DNS rebinding):
//! - a request carrying `Origin`, or `Sec-Fetch-Site` other than `same-origin` or `none`, is refused
//!   (403) unless its origin is in `http_api.allowed_origins`: SDKs and the CLI send neither;
//! - a body must say it is JSON (`application/json`, or `application/x-amz-json-1.1`), which a page can
//!   only send after a CORS preflight that is never answered (415 otherwise, also with no Content-Type);
//! - on a loopback listener the `Host` must be a loopback name (`localhost`, `127.0.0.1`, `[::1]`), so a
//!   rebound DNS name reaches nothing (403).
//!
//! Then every call takes a place under `max_concurrent_calls`, like gRPC's, and runs within its
//! deadline (`transport.max_call_duration`): one that passes it answers IVS's `RequestTimeoutException`
//! (504), never a 200.
//!
//! Every response carries `x-amzn-RequestId`: the call's trace id (set by the
//! [`RpcTraceLayer`](crate::transport::trace::RpcTraceLayer), the one its log lines carry), else a fresh
//! UUID, so the CLI's `--debug` output and SDK exceptions name something the server log can be searched
//! for.
//!
//! ```
//! # use chat_token_service::{config::HttpApiConfig, door::{Door, rest}, transport::inflight::Calls};
//! # async fn example(door: Door) {
//! // No moderation or messaging door: only CreateChatToken. `rest::beside` puts it next to the gRPC
//! // routes.
//! let calls = Calls::new(Default::default());
//! let router = rest::router(door, None, None, &HttpApiConfig::default(), calls);
//! # }
//! ```

use std::{collections::BTreeMap, sync::Arc, time::SystemTime};

use axum::body::Body;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use serde::Deserialize;

use super::{
    Door, MessagingDoor, MessagingNames, ModerationDoor, ModerationNames, UncheckedMessage,
    UncheckedModeration, ivs_error,
};
use crate::config::HttpApiConfig;
use crate::domain::{
    Action, Capabilities, FieldNames, IssuedToken, TokenRequest, UncheckedRequest,
};
#[cfg(test)]
use crate::rescue::ERROR_TYPE;
use crate::rescue::{IvsError, IvsMembers, UNKNOWN_OPERATION, VALIDATION_OTHER, unknown_method};
use crate::transport::{
    deadline::CallDeadline,
    inflight::{Calls, Place},
    listener::{ConnInfo, peer_certs},
    trace::CallTraceId,
};

/// The header AWS SDKs read the request id from.
const REQUEST_ID: &str = "x-amzn-requestid";

/// What every route of this API needs.
struct Api {
    door: Door,
    /// Largest body read (`http_api.max_body_bytes`).
    max_body_bytes: usize,
    /// Calls in flight, shared with gRPC's, and their cap (`max_concurrent_calls`).
    calls: Calls,
    /// Web origins whose pages may call (`http_api.allowed_origins`).
    allowed_origins: Vec<String>,
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
        let (parts, ()) = unknown_method().into_http::<()>().into_parts();
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
            offered.join(", ")
        ),
    ));
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(REQUEST_ID, value);
    }
    response
}

/// The routes of the IVS Chat API: CreateChatToken through `door`, DisconnectUser through `moderation`
/// and SendEvent and DeleteMessage through `messaging` when there are those. CreateChatToken calls take a
/// place in `calls` (with gRPC's).
pub fn router(
    door: Door,
    moderation: Option<ModerationDoor>,
    messaging: Option<MessagingDoor>,
    settings: &HttpApiConfig,
    calls: Calls,
) -> axum::Router {
    let api = Arc::new(Api {
        door,
        max_body_bytes: settings.max_body_bytes,
        calls,
        allowed_origins: settings.allowed_origins.clone(),
    });
    let mut router = axum::Router::new().route(&path(Action::CreateChatToken), {
        let api = api.clone();
        axum::routing::any(move |request| create_chat_token(api.clone(), request))
    });
    if let Some(moderation) = moderation {
        let api = api.clone();
        router = router.route(
            &path(Action::DisconnectUser),
            axum::routing::any(move |request| {
                disconnect_user(api.clone(), moderation.clone(), request)
            }),
        );
    }
    if let Some(messaging) = messaging {
        for action in [Action::SendEvent, Action::DeleteMessage] {
            let (api, messaging) = (api.clone(), messaging.clone());
            router = router.route(
                &path(action),
                axum::routing::any(move |request| {
                    send_message(api.clone(), messaging.clone(), action, request)
                }),
            );
        }
    }
    router
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

/// A call that may go on: its head, its whole body, and its place under the cap.
struct Accepted {
    parts: http::request::Parts,
    body: axum::body::Bytes,
    /// Held until the call ends.
    _place: Place,
}

impl Accepted {
    /// The deadline the transport set (see [`crate::transport::deadline`]).
    fn deadline(&self) -> Option<CallDeadline> {
        self.parts.extensions.get::<CallDeadline>().copied()
    }
}

/// A call's head and whole body, once it is a POST of JSON, not from a web page, within the size limit
/// and the cap on calls. Refusals are audited by operation: no caller is known yet.
async fn accept(
    api: &Api,
    operation: Action,
    request: Request<Body>,
) -> Result<Accepted, IvsError> {
    let refused = |error: IvsError| {
        tracing::info!(
            target: "audit",
            action = operation.as_str(),
            outcome = error.error_type,
            status = error.status.as_u16(),
            "call refused"
        );
        error
    };
    if request.method() != Method::POST {
        return Err(refused(IvsError {
            status: StatusCode::METHOD_NOT_ALLOWED,
            ..IvsError::unreadable(VALIDATION_OTHER, format!("{operation} takes POST"))
        }));
    }
    let (parts, body) = request.into_parts();
    check_browser(&parts.headers, &api.allowed_origins).map_err(refused)?;
    check_host(&parts).map_err(refused)?;
    check_content_type(&parts.headers).map_err(refused)?;
    let body = read_body(&parts.headers, body, api.max_body_bytes)
        .await
        .map_err(refused)?;
    // The same cap as gRPC calls, taken once the whole body has arrived (see
    // crate::transport::inflight).
    let place = api
        .calls
        .admit()
        .map_err(|error| refused(ivs_error(error)))?;
    Ok(Accepted {
        parts,
        body,
        _place: place,
    })
}

/// 403 for what a web page sends and SDKs never do: an `Origin` not in `allowed`, or a `Sec-Fetch-Site`
/// saying the request comes from another site.
fn check_browser(headers: &http::HeaderMap, allowed: &[String]) -> Result<(), IvsError> {
    let origin = headers.get(header::ORIGIN);
    let allowed_origin = origin
        .and_then(|origin| origin.to_str().ok())
        .is_some_and(|origin| allowed.iter().any(|a| a.eq_ignore_ascii_case(origin)));
    if allowed_origin {
        return Ok(());
    }
    let cross_site = headers
        .get("sec-fetch-site")
        .is_some_and(|site| !matches!(site.as_bytes(), b"same-origin" | b"none"));
    if origin.is_some() || cross_site {
        return Err(forbidden(
            "requests from web pages are refused: this API is for AWS SDKs and the CLI (allow an origin \
             with http_api.allowed_origins)",
        ));
    }
    Ok(())
}

/// On a loopback listener, 403 unless the request names a loopback host: a web page whose DNS name was
/// rebound to 127.0.0.1 sends its own name, and is refused. A request without a host (HTTP/1.0) is let
/// through: browsers always send one.
fn check_host(parts: &http::request::Parts) -> Result<(), IvsError> {
    let loopback_listener = parts
        .extensions
        .get::<ConnInfo>()
        .is_some_and(|conn| conn.local.ip().is_loopback());
    if !loopback_listener {
        return Ok(());
    }
    // HTTP/2's :authority, else HTTP/1.1's Host; one that does not parse is no loopback name.
    let authority = match parts.uri.authority() {
        Some(authority) => Some(authority.host().to_owned()),
        None => parts.headers.get(header::HOST).map(|host| {
            host.to_str()
                .ok()
                .and_then(|host| host.parse::<http::uri::Authority>().ok())
                .map(|authority| authority.host().to_owned())
                .unwrap_or_default()
        }),
    };
    match authority {
        None => Ok(()),
        Some(host) if is_loopback_name(&host) => Ok(()),
        Some(_) => Err(forbidden(
            "this service listens on a loopback address and answers only requests for localhost, \
             127.0.0.1 or [::1]",
        )),
    }
}

/// `localhost`, a name under `.localhost`, or a loopback address (`127.0.0.0/8`, `[::1]`).
fn is_loopback_name(host: &str) -> bool {
    let host = host.trim_end_matches('.');
    let ip = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .len()
            .checked_sub(".localhost".len())
            .is_some_and(|at| host[at..].eq_ignore_ascii_case(".localhost"))
        || ip
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// AccessDeniedException (403) for a request refused before it is read.
fn forbidden(message: &str) -> IvsError {
    IvsError {
        status: StatusCode::FORBIDDEN,
        error_type: "AccessDeniedException",
        message: message.to_owned(),
        members: IvsMembers::None,
        retry_after: None,
    }
}

async fn issue(api: &Api, request: Request<Body>) -> Result<IssuedToken, IvsError> {
    let accepted = accept(api, Action::CreateChatToken, request).await?;
    let deadline = accepted.deadline();
    let (parts, body) = (&accepted.parts, &accepted.body);
    let door = &api.door;
    let peer_certs = peer_certs(&parts.extensions);
    let caller = door
        .identity()
        .resolve_http(parts, body, peer_certs)
        .map_err(|error| ivs_error(door.refuse(None, error)))?;

    let input: CreateChatTokenInput = serde_json::from_slice(body).map_err(|e| {
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
        .bind(request, &parts.headers, &FieldNames::IVS, deadline)
        .await
        .map_err(ivs_error)?;
    door.issue(request, deadline).await.map_err(ivs_error)
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
    let accepted = accept(api, ACTION, request).await?;
    let deadline = accepted.deadline();
    let (parts, body) = (&accepted.parts, &accepted.body);
    let peer_certs = peer_certs(&parts.extensions);
    let caller = moderation
        .identity()
        .resolve_http(parts, body, peer_certs)
        .map_err(|error| ivs_error(ModerationDoor::unidentified(ACTION, error)))?;
    let input: DisconnectUserInput = serde_json::from_slice(body).map_err(|e| {
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
    moderation
        .decide(ACTION, &caller, validated, deadline)
        .await
        .map_err(ivs_error)?;
    Ok(())
}

/// `SendEventRequest` and `DeleteMessageRequest` as IVS Chat's model spells them (one struct: each
/// operation's members are absent from the other's body). Absent strings are reported as required fields.
#[derive(Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct MessageInput {
    room_identifier: String,
    event_name: String,
    attributes: BTreeMap<String, String>,
    id: String,
    reason: String,
}

/// SendEvent and DeleteMessage: `{"id": …}`, as IVS Chat answers both.
async fn send_message(
    api: Arc<Api>,
    messaging: MessagingDoor,
    action: Action,
    request: Request<Body>,
) -> Response<Body> {
    respond(
        request_id(&request),
        message(&api, &messaging, action, request)
            .await
            .map(|id| serde_json::json!({ "id": id })),
    )
}

async fn message(
    api: &Api,
    messaging: &MessagingDoor,
    action: Action,
    request: Request<Body>,
) -> Result<String, IvsError> {
    let accepted = accept(api, action, request).await?;
    let deadline = accepted.deadline();
    let (parts, body) = (&accepted.parts, &accepted.body);
    let peer_certs = peer_certs(&parts.extensions);
    let caller = messaging
        .identity()
        .resolve_http(parts, body, peer_certs)
        .map_err(|error| ivs_error(MessagingDoor::unidentified(action, error)))?;
    let input: MessageInput = serde_json::from_slice(body).map_err(|e| {
        // serde's messages can quote the values (attributes, reasons): report where, not what.
        IvsError::unreadable(
            VALIDATION_OTHER,
            format!(
                "the body is not a {action} request in JSON (line {}, column {}): expected an object \
                 with roomIdentifier and eventName, attributes (SendEvent) or id, reason (DeleteMessage)",
                e.line(),
                e.column()
            ),
        )
    })?;
    let fields = UncheckedMessage {
        room_identifier: input.room_identifier,
        event_name: input.event_name,
        attributes: input.attributes.into_iter().collect(),
        id: input.id,
        reason: input.reason,
    };
    let validated = messaging.validate(action, caller.clone(), fields, &MessagingNames::IVS);
    let outcome = messaging
        .decide(action, &caller, validated, deadline)
        .await
        .map_err(ivs_error)?;
    Ok(outcome.id)
}

/// The content types AWS SDKs and the CLI send: REST-JSON's, and the JSON protocol's.
const JSON_TYPES: [&str; 2] = ["application/json", "application/x-amz-json-1.1"];

/// The body must say it is JSON: anything else, or no Content-Type at all (what an HTML form or a
/// cross-site "simple request" sends), is refused with 415 rather than guessed at.
fn check_content_type(headers: &http::HeaderMap) -> Result<(), IvsError> {
    let essence = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(str::trim);
    match essence {
        Some(essence) if JSON_TYPES.iter().any(|t| essence.eq_ignore_ascii_case(t)) => Ok(()),
        _ => Err(IvsError {
            status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ..IvsError::unreadable(
                VALIDATION_OTHER,
                "the body must be JSON, sent with Content-Type: application/json",
            )
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
    error.to_http().map(Body::from)
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
mod tests;
