//! A stub of Amazon IVS Chat's REST-JSON API, enough for CreateChatToken, DisconnectUser, SendEvent and
//! DeleteMessage, for tests and the local stack (`cargo run --example ivschat_stub`).
//!
//! `POST /CreateChatToken`, `POST /DisconnectUser`, `POST /SendEvent` and `POST /DeleteMessage` check, as
//! IVS does:
//! - a SigV4 `Authorization` header whose credential scope is service `ivschat` in the region of the room
//!   ARN (the signature itself is not verified: the stub does not know the secret key);
//! - the service model's field limits, answering `ValidationException` (400) with a `fieldList`.
//!
//! What happens next depends on the room id (the part after `room/`), so a test or a person can ask for
//! every outcome:
//!
//! | room id starts with | answer |
//! |---|---|
//! | `notfound` | 404 `ResourceNotFoundException` |
//! | `denied` | 403 `AccessDeniedException` |
//! | `pending` | 403 `PendingVerification` |
//! | `invalid` | 400 `ValidationException` naming `userId` (SendEvent: `eventName`, DeleteMessage: `id`) |
//! | `throttled` | 429 `ThrottlingException`, every time |
//! | `broken` | 500, every time |
//! | `flaky` | 500 on the first attempt, then success |
//! | `slow` | CreateChatToken: success after 30 seconds; a call its caller drops first is counted by `abandoned` |
//! | `lag` | success after 1.5 seconds (CreateChatToken and DisconnectUser): longer than the shortest `max_call_duration`, shorter than the default `ivs.read_timeout` |
//! | anything else | CreateChatToken: 200 with a token, expiring one minute / the session duration from now; DisconnectUser: 200 `{}`; SendEvent and DeleteMessage: 200 with a fresh `id` |

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use axum::{
    Json, Router,
    extract::State,
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::post,
};
use serde_json::{Value, json};

/// One call the stub received.
#[derive(Clone, Debug)]
pub struct SeenCall {
    /// `CreateChatToken`, `DisconnectUser`, `SendEvent` or `DeleteMessage`.
    pub operation: &'static str,
    /// The region of the SigV4 credential scope.
    pub signed_region: String,
    /// The JSON body as sent.
    pub body: Value,
    /// The success body the stub answered with, if it succeeded.
    pub response: Option<Value>,
}

#[derive(Default)]
struct StubState {
    calls: Mutex<Vec<SeenCall>>,
    attempts: Mutex<HashMap<String, usize>>,
    /// Room ids of the calls whose handler was dropped before it answered: the caller went away.
    abandoned: Mutex<Vec<String>>,
}

/// Records its room id in [`StubState::abandoned`] when dropped before [`Answering::answered`]: the
/// handler's future is dropped exactly when the server under test drops its upstream call.
struct Answering {
    state: Arc<StubState>,
    room_id: String,
    answered: bool,
}

impl Answering {
    fn answered(mut self) {
        self.answered = true;
    }
}

impl Drop for Answering {
    fn drop(&mut self) {
        if !self.answered {
            self.state
                .abandoned
                .lock()
                .unwrap()
                .push(std::mem::take(&mut self.room_id));
        }
    }
}

/// A running stub.
pub struct IvsStub {
    pub addr: SocketAddr,
    state: Arc<StubState>,
}

impl IvsStub {
    /// Serves on a free loopback port.
    pub async fn start() -> IvsStub {
        Self::start_on("127.0.0.1:0".parse().unwrap()).await
    }

    /// Serves on `addr`.
    pub async fn start_on(addr: SocketAddr) -> IvsStub {
        let state = Arc::new(StubState::default());
        let app = Router::new()
            .route("/CreateChatToken", post(create_chat_token))
            .route("/DisconnectUser", post(disconnect_user))
            .route("/SendEvent", post(send_event))
            .route("/DeleteMessage", post(delete_message))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        IvsStub { addr, state }
    }

    /// The endpoint URL to configure as `ivs.endpoint_url`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every call received so far, in order.
    pub fn calls(&self) -> Vec<SeenCall> {
        self.state.calls.lock().unwrap().clone()
    }

    /// How many calls for room ids starting with `room_id` were dropped by their caller before the stub
    /// answered them.
    pub fn abandoned(&self, room_id: &str) -> usize {
        self.state
            .abandoned
            .lock()
            .unwrap()
            .iter()
            .filter(|id| id.starts_with(room_id))
            .count()
    }

    /// How many calls were received for room ids starting with `room_id`.
    pub fn attempts(&self, room_id: &str) -> usize {
        self.state
            .attempts
            .lock()
            .unwrap()
            .iter()
            .filter(|(id, _)| id.starts_with(room_id))
            .map(|(_, n)| n)
            .sum()
    }
}

fn error(status: StatusCode, code: &str, body: Value) -> Response {
    let mut response = (status, Json(body)).into_response();
    response
        .headers_mut()
        .insert("x-amzn-errortype", code.parse().unwrap());
    response.headers_mut().insert(
        "x-amzn-requestid",
        uuid::Uuid::new_v4().to_string().parse().unwrap(),
    );
    response
}

fn validation(fields: Vec<(&str, String)>) -> Response {
    let field_list: Vec<Value> = fields
        .into_iter()
        .map(|(name, message)| json!({ "name": name, "message": message }))
        .collect();
    error(
        StatusCode::BAD_REQUEST,
        "ValidationException",
        json!({ "message": "invalid request", "reason": "FIELD_VALIDATION_FAILED", "fieldList": field_list }),
    )
}

/// The region and service of a SigV4 `Authorization` header's credential scope.
fn signed_scope(headers: &HeaderMap) -> Option<(String, String)> {
    let auth = headers.get("authorization")?.to_str().ok()?;
    let rest = auth.strip_prefix("AWS4-HMAC-SHA256 ")?;
    let credential = rest
        .split(',')
        .map(str::trim)
        .find_map(|part| part.strip_prefix("Credential="))?;
    // AKID/DATE/REGION/SERVICE/aws4_request
    let parts: Vec<&str> = credential.split('/').collect();
    match parts[..] {
        [_, _, region, service, "aws4_request"] => Some((region.to_owned(), service.to_owned())),
        _ => None,
    }
}

/// The model's rules for CreateChatToken's fields.
fn model_violations(body: &Value) -> Vec<(&'static str, String)> {
    let mut violations = Vec::new();
    let room = body["roomIdentifier"].as_str().unwrap_or_default();
    if room.is_empty() || room.chars().count() > 128 {
        violations.push(("roomIdentifier", "must be 1 to 128 characters".into()));
    }
    let user = body["userId"].as_str().unwrap_or_default();
    if user.is_empty() || user.chars().count() > 128 {
        violations.push(("userId", "must be 1 to 128 characters".into()));
    }
    if let Some(minutes) = body.get("sessionDurationInMinutes")
        && !matches!(minutes.as_i64(), Some(1..=180))
    {
        violations.push(("sessionDurationInMinutes", "must be 1 to 180".into()));
    }
    if let Some(capabilities) = body.get("capabilities").and_then(Value::as_array) {
        let known = ["SEND_MESSAGE", "DISCONNECT_USER", "DELETE_MESSAGE"];
        if capabilities
            .iter()
            .any(|c| !known.contains(&c.as_str().unwrap_or_default()))
        {
            violations.push(("capabilities", "unknown capability".into()));
        }
    }
    violations
}

/// What every operation does first: the SigV4 scope check, the model's rules (`violations`), then the
/// outcome the room id asks for. `Err` is the answer to send; `Ok` the call to record once it succeeds.
fn admit(
    state: &StubState,
    operation: &'static str,
    headers: &HeaderMap,
    body: &Value,
    violations: Vec<(&'static str, String)>,
) -> Result<SeenCall, Box<Response>> {
    let room = body["roomIdentifier"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let room_region = room.split(':').nth(3).unwrap_or_default().to_owned();
    let room_id = room.rsplit('/').next().unwrap_or_default().to_owned();

    let Some((signed_region, service)) = signed_scope(headers) else {
        return Err(Box::new(error(
            StatusCode::FORBIDDEN,
            "MissingAuthenticationTokenException",
            json!({ "message": "missing SigV4 Authorization header" }),
        )));
    };
    let attempt = {
        let mut attempts = state.attempts.lock().unwrap();
        let n = attempts.entry(room_id.clone()).or_default();
        *n += 1;
        *n
    };
    let call = SeenCall {
        operation,
        signed_region: signed_region.clone(),
        body: body.clone(),
        response: None,
    };
    if service != "ivschat" || signed_region != room_region {
        state.calls.lock().unwrap().push(call);
        return Err(Box::new(error(
            StatusCode::FORBIDDEN,
            "InvalidSignatureException",
            json!({ "message": format!("credential scope {signed_region}/{service} does not match the room's region {room_region}/ivschat") }),
        )));
    }
    let outcome = if !violations.is_empty() {
        Some(validation(violations))
    } else if room_id.starts_with("notfound") {
        Some(error(
            StatusCode::NOT_FOUND,
            "ResourceNotFoundException",
            json!({ "message": "room not found", "resourceId": room_id, "resourceType": "ROOM" }),
        ))
    } else if room_id.starts_with("denied") {
        Some(error(
            StatusCode::FORBIDDEN,
            "AccessDeniedException",
            json!({ "message": format!("User: arn:aws:sts::123456789012:assumed-role/app/x is not authorized to perform: ivschat:{operation}") }),
        ))
    } else if room_id.starts_with("pending") {
        Some(error(
            StatusCode::FORBIDDEN,
            "PendingVerification",
            json!({ "message": "account pending verification" }),
        ))
    } else if room_id.starts_with("invalid") {
        let field = match operation {
            "SendEvent" => "eventName",
            "DeleteMessage" => "id",
            _ => "userId",
        };
        Some(validation(vec![(field, "rejected by the stub".into())]))
    } else if room_id.starts_with("throttled") {
        Some(error(
            StatusCode::TOO_MANY_REQUESTS,
            "ThrottlingException",
            json!({ "message": "Rate exceeded" }),
        ))
    } else if room_id.starts_with("broken") || (room_id.starts_with("flaky") && attempt == 1) {
        Some(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalServerException",
            json!({ "message": "internal error" }),
        ))
    } else {
        None
    };
    match outcome {
        Some(response) => {
            state.calls.lock().unwrap().push(call);
            Err(Box::new(response))
        }
        None => Ok(call),
    }
}

/// The model's rules for DisconnectUser's fields.
fn disconnect_violations(body: &Value) -> Vec<(&'static str, String)> {
    let mut violations = Vec::new();
    let room = body["roomIdentifier"].as_str().unwrap_or_default();
    if room.is_empty() || room.chars().count() > 128 {
        violations.push(("roomIdentifier", "must be 1 to 128 characters".into()));
    }
    let user = body["userId"].as_str().unwrap_or_default();
    if user.is_empty() || user.chars().count() > 128 {
        violations.push(("userId", "must be 1 to 128 characters".into()));
    }
    if let Some(reason) = body.get("reason")
        && !matches!(reason.as_str().map(|r| r.chars().count()), Some(1..=256))
    {
        violations.push(("reason", "must be 1 to 256 characters".into()));
    }
    violations
}

/// How long `lag…` rooms take.
pub const LAG: Duration = Duration::from_millis(1500);

/// The room id of a request body: the part of its room ARN after `room/`.
fn room_id_of(body: &Value) -> String {
    body["roomIdentifier"]
        .as_str()
        .unwrap_or_default()
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_owned()
}

async fn disconnect_user(
    State(state): State<Arc<StubState>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let violations = disconnect_violations(&body);
    let mut call = match admit(&state, "DisconnectUser", &headers, &body, violations) {
        Ok(call) => call,
        Err(response) => return *response,
    };
    if room_id_of(&body).starts_with("lag") {
        tokio::time::sleep(LAG).await;
    }
    call.response = Some(json!({}));
    state.calls.lock().unwrap().push(call);
    Json(json!({})).into_response()
}

async fn create_chat_token(
    State(state): State<Arc<StubState>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let violations = model_violations(&body);
    let mut call = match admit(&state, "CreateChatToken", &headers, &body, violations) {
        Ok(call) => call,
        Err(response) => return *response,
    };
    let room_id = room_id_of(&body);
    let answering = Answering {
        state: state.clone(),
        room_id: room_id.clone(),
        answered: false,
    };
    if room_id.starts_with("slow") {
        tokio::time::sleep(Duration::from_secs(30)).await;
    }
    if room_id.starts_with("lag") {
        tokio::time::sleep(LAG).await;
    }
    answering.answered();

    let now = SystemTime::now();
    let session = Duration::from_secs(60 * body["sessionDurationInMinutes"].as_u64().unwrap_or(60));
    let response = json!({
        "token": format!("ivschat-stub-token-{}", uuid::Uuid::new_v4()),
        "tokenExpirationTime": humantime::format_rfc3339_seconds(now + Duration::from_secs(60)).to_string(),
        "sessionExpirationTime": humantime::format_rfc3339_seconds(now + session).to_string(),
    });
    call.response = Some(response.clone());
    state.calls.lock().unwrap().push(call);
    Json(response).into_response()
}

/// The model's rule for every operation's `roomIdentifier`: 1 to 128 characters matching its pattern.
fn room_violations(body: &Value) -> Vec<(&'static str, String)> {
    let room = body["roomIdentifier"].as_str().unwrap_or_default();
    let pattern_ok = room
        .strip_prefix("arn:aws:ivschat:")
        .and_then(|rest| rest.split_once(":room/"))
        .is_some_and(|(scope, id)| {
            !id.is_empty()
                && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && scope.contains(':')
        });
    if room.is_empty() || room.chars().count() > 128 || !pattern_ok {
        vec![(
            "roomIdentifier",
            "must be a room ARN of 1 to 128 characters".into(),
        )]
    } else {
        Vec::new()
    }
}

/// The model's rules for SendEvent's fields (`eventName` 1 to 100 characters; attributes at most 1 KB in
/// total, as the API reference says).
fn send_event_violations(body: &Value) -> Vec<(&'static str, String)> {
    let mut violations = room_violations(body);
    let name = body["eventName"].as_str().unwrap_or_default();
    if !(1..=100).contains(&name.chars().count()) {
        violations.push(("eventName", "must be 1 to 100 characters".into()));
    }
    if let Some(attributes) = body.get("attributes") {
        let bytes = attributes.as_object().map(|map| {
            map.iter()
                .map(|(k, v)| k.len() + v.as_str().map_or(usize::MAX / 2, str::len))
                .sum::<usize>()
        });
        if bytes.is_none_or(|bytes| bytes > 1024) {
            violations.push((
                "attributes",
                "must be string values, at most 1 KB in total".into(),
            ));
        }
    }
    violations
}

/// The model's rules for DeleteMessage's fields (`id` a `MessageID`: 12 letters and digits; `reason` 1 to
/// 256 characters when present).
fn delete_message_violations(body: &Value) -> Vec<(&'static str, String)> {
    let mut violations = room_violations(body);
    let id = body["id"].as_str().unwrap_or_default();
    if id.len() != 12 || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        violations.push(("id", "must be 12 letters and digits".into()));
    }
    if let Some(reason) = body.get("reason")
        && !matches!(reason.as_str().map(|r| r.chars().count()), Some(1..=256))
    {
        violations.push(("reason", "must be 1 to 256 characters".into()));
    }
    violations
}

/// A fresh IVS Chat `ID`: 12 letters and digits.
fn fresh_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_owned()
}

async fn send_event(
    State(state): State<Arc<StubState>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    answer_with_id(
        &state,
        "SendEvent",
        &headers,
        &body,
        send_event_violations(&body),
    )
}

async fn delete_message(
    State(state): State<Arc<StubState>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    answer_with_id(
        &state,
        "DeleteMessage",
        &headers,
        &body,
        delete_message_violations(&body),
    )
}

/// SendEvent's and DeleteMessage's answer: `{"id": …}`, once `admit` lets the call through.
fn answer_with_id(
    state: &StubState,
    operation: &'static str,
    headers: &HeaderMap,
    body: &Value,
    violations: Vec<(&'static str, String)>,
) -> Response {
    let mut call = match admit(state, operation, headers, body, violations) {
        Ok(call) => call,
        Err(response) => return *response,
    };
    let response = json!({ "id": fresh_id() });
    call.response = Some(response.clone());
    state.calls.lock().unwrap().push(call);
    Json(response).into_response()
}
