//! The local issuer's chat backend: SendEvent and DeleteMessage POSTed to a self-hosted chat server's
//! webhook (`messaging.webhook_url`) as JSON, signed with HMAC-SHA256.
//!
//! Each request carries `x-cts-timestamp` (Unix seconds) and `x-cts-signature: v1=HEX`, the lowercase hex
//! HMAC-SHA256 of `TIMESTAMP.BODY` under the signing secret (`messaging.signing_secret_file`), so the chat
//! server can tell our requests from anyone else's and refuse stale ones; the body's `deliveryId` is unique
//! per request, for refusing replays. docs/messaging.md shows the body and a receiver that checks it.
//!
//! Bounds: one attempt, which connecting, sending and reading the answer must finish within
//! `messaging.timeout`; an answer of at most [`MAX_ANSWER_BYTES`]. The answer is read, never passed on: a
//! 2xx must carry `{"id": "…"}` with an id shaped like IVS Chat's (12 letters and digits); 400 and 422 are
//! the caller's fault (INVALID_ARGUMENT), 404 NOT_FOUND, 429 RESOURCE_EXHAUSTED; anything else, a timeout
//! or a connection error is UNAVAILABLE. The chat server's own words stay out of errors and logs: they may
//! quote the request.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioTimer},
};
use ring::hmac;
use serde_json::json;
use tracing::Instrument;

use super::Messenger;
use crate::config::EndpointUrl;
use crate::domain::{
    Action, Error, FieldViolation, MessageId, MessagingAction, MessagingOutcome, MessagingRequest,
    UpstreamKind,
};

/// The header carrying the request's time, in Unix seconds.
pub const TIMESTAMP_HEADER: &str = "x-cts-timestamp";
/// The header carrying `v1=` and the signature.
pub const SIGNATURE_HEADER: &str = "x-cts-signature";
/// The largest answer read from the webhook, in bytes; `{"id": "…"}` takes 20.
pub const MAX_ANSWER_BYTES: usize = 4096;
/// The shortest signing secret, in bytes: HMAC-SHA256's own output size.
pub const MIN_SECRET_BYTES: usize = 32;
/// The longest signing secret, in bytes.
pub const MAX_SECRET_BYTES: usize = 1024;
/// How long a throttled caller is told to wait when the webhook's 429 names no usable `Retry-After`.
const THROTTLED_RETRY_AFTER: Duration = Duration::from_secs(1);
/// The longest wait a webhook's `Retry-After` can ask of callers.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// Why the signing secret cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The secret is too short or too long.
    #[error(
        "{path}: the secret must be {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} bytes, got {bytes}"
    )]
    Size {
        /// The file.
        path: PathBuf,
        /// The secret's size, without a trailing newline.
        bytes: usize,
    },
}

/// The webhook's signing secret, from its file; replaced when the file changes ([`SigningSecret::reload`]).
pub struct SigningSecret {
    path: PathBuf,
    key: ArcSwap<hmac::Key>,
}

impl SigningSecret {
    /// Reads the secret in `path`; warns when the file is open to others than the service.
    pub fn load(path: &Path) -> Result<Self, SecretError> {
        let key = read_key(path)?;
        Ok(SigningSecret {
            path: path.to_owned(),
            key: ArcSwap::from_pointee(key),
        })
    }

    /// Re-reads the file; on failure the current secret stays in force.
    pub fn reload(&self) -> Result<(), SecretError> {
        self.key.store(Arc::new(read_key(&self.path)?));
        Ok(())
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `v1=` and the lowercase hex HMAC-SHA256 of `TIMESTAMP.BODY`.
    pub fn sign(&self, timestamp: u64, body: &[u8]) -> String {
        let key = self.key.load();
        let mut context = hmac::Context::with_key(&key);
        context.update(timestamp.to_string().as_bytes());
        context.update(b".");
        context.update(body);
        format!("v1={}", hex::encode(context.sign().as_ref()))
    }
}

fn read_key(path: &Path) -> Result<hmac::Key, SecretError> {
    let read = std::fs::read(path).map_err(|source| SecretError::Read {
        path: path.to_owned(),
        source,
    })?;
    let secret = read
        .strip_suffix(b"\n")
        .map(|s| s.strip_suffix(b"\r").unwrap_or(s))
        .unwrap_or(&read);
    if !(MIN_SECRET_BYTES..=MAX_SECRET_BYTES).contains(&secret.len()) {
        return Err(SecretError::Size {
            path: path.to_owned(),
            bytes: secret.len(),
        });
    }
    // Whoever can read the secret can send events as this service.
    crate::secret_file::warn_if_shared(path, "the webhook's signing secret file");
    Ok(hmac::Key::new(hmac::HMAC_SHA256, secret))
}

/// Why the webhook's client cannot be made.
#[derive(Debug, thiserror::Error)]
#[error("messaging.webhook_url: no TLS root certificates for https: {0}")]
pub struct WebhookError(std::io::Error);

/// Delivers SendEvent and DeleteMessage to the chat server's webhook.
pub struct Webhook {
    url: http::Uri,
    secret: Arc<SigningSecret>,
    timeout: Duration,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl Webhook {
    /// POSTs to `url`, signing with `secret`, each call bounded by `timeout`. HTTPS trusts the system's
    /// root certificates (and `SSL_CERT_FILE` / `SSL_CERT_DIR`, for a private CA).
    pub fn new(
        url: &EndpointUrl,
        secret: Arc<SigningSecret>,
        timeout: Duration,
    ) -> Result<Self, WebhookError> {
        let url: http::Uri = url.as_str().parse().expect("checked when parsed");
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(timeout));
        http.set_nodelay(true);
        let tls = hyper_rustls::HttpsConnectorBuilder::new();
        let tls = if url.scheme_str() == Some("https") {
            tls.with_provider_and_native_roots(
                tokio_rustls::rustls::crypto::ring::default_provider(),
            )
            .map_err(WebhookError)?
        } else {
            // A loopback (or meshed) http:// URL never uses TLS: no root certificates to load.
            tls.with_tls_config(
                tokio_rustls::rustls::ClientConfig::builder_with_provider(Arc::new(
                    tokio_rustls::rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .expect("ring supports the default protocol versions")
                .with_root_certificates(tokio_rustls::rustls::RootCertStore::empty())
                .with_no_client_auth(),
            )
        };
        let connector = tls.https_or_http().enable_http1().wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(32)
            .build(connector);
        Ok(Webhook {
            url,
            secret,
            timeout,
            client,
        })
    }

    /// The request body: the operation, a delivery id, the caller and the call's fields in IVS's names.
    fn body(request: &MessagingRequest) -> Vec<u8> {
        let mut body = json!({
            "operation": request.action.action().as_str(),
            "deliveryId": uuid::Uuid::new_v4().to_string(),
            "caller": request.caller.id(),
            "roomIdentifier": request.room.as_str(),
        });
        match &request.action {
            MessagingAction::SendEvent {
                event_name,
                attributes,
            } => {
                body["eventName"] = event_name.as_str().into();
                body["attributes"] = json!(attributes.expose());
            }
            MessagingAction::DeleteMessage { message_id, reason } => {
                body["id"] = message_id.as_str().into();
                if let Some(reason) = reason {
                    body["reason"] = reason.expose().into();
                }
            }
        }
        body.to_string().into_bytes()
    }

    /// One POST, its answer read within the bounds: the status, `Retry-After`, and the body.
    async fn post(&self, body: Vec<u8>) -> Result<(StatusCode, Option<Duration>, Bytes), String> {
        let timestamp = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let signature = self.secret.sign(timestamp, &body);
        let request = http::Request::post(self.url.clone())
            .header(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )
            .header(
                header::USER_AGENT,
                concat!("chat-token-service/", env!("CARGO_PKG_VERSION")),
            )
            .header(TIMESTAMP_HEADER, timestamp)
            .header(SIGNATURE_HEADER, signature)
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| format!("the request cannot be built: {e}"))?;
        let exchange = async {
            let response = self.client.request(request).await.map_err(|e| {
                if e.is_connect() {
                    "cannot connect".to_owned()
                } else {
                    "the connection failed".to_owned()
                }
            })?;
            let (parts, body) = response.into_parts();
            let bytes = Limited::new(body, MAX_ANSWER_BYTES)
                .collect()
                .await
                .map_err(|e| {
                    if e.is::<http_body_util::LengthLimitError>() {
                        format!("answered more than {MAX_ANSWER_BYTES} bytes")
                    } else {
                        "the answer could not be read".to_owned()
                    }
                })?
                .to_bytes();
            Ok((parts.status, retry_after(&parts.headers), bytes))
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "no answer within {} (messaging.timeout)",
                    humantime::format_duration(self.timeout)
                ))
            })
    }
}

impl Messenger for Webhook {
    const NAME: &'static str = "webhook";

    async fn deliver(&self, request: MessagingRequest) -> Result<MessagingOutcome, Error> {
        let operation = request.action.action();
        let span = tracing::info_span!(
            "chat_backend.call",
            otel.name = %format_args!("POST {operation}"),
            otel.kind = "client",
            http.request.method = "POST",
            http.response.status_code = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        let started = std::time::Instant::now();
        let answered = self
            .post(Self::body(&request))
            .instrument(span.clone())
            .await;
        let outcome = match answered {
            Ok((status, wait, body)) => {
                span.record("http.response.status_code", status.as_u16());
                judge(operation, status, wait, &body)
            }
            Err(why) => Err(failed(operation, UpstreamKind::Unavailable, why)),
        };
        if let Err(error) = &outcome {
            span.record("otel.status_code", "ERROR");
            tracing::warn!(
                parent: &span,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "chat backend {operation} failed: {error}"
            );
        }
        outcome
    }
}

/// What the webhook's answer means to the caller.
fn judge(
    operation: Action,
    status: StatusCode,
    wait: Option<Duration>,
    body: &[u8],
) -> Result<MessagingOutcome, Error> {
    let http = status.as_u16();
    match http {
        200..=299 => {
            let id = serde_json::from_slice::<serde_json::Value>(body)
                .ok()
                .and_then(|answer| answer["id"].as_str().map(MessageId::parse))
                .and_then(Result::ok);
            match id {
                Some(id) => Ok(MessagingOutcome {
                    id: id.as_str().to_owned(),
                }),
                None => Err(failed(
                    operation,
                    UpstreamKind::Unavailable,
                    format!(
                        "HTTP {http} without {{\"id\": …}} of 12 letters and digits, as IVS Chat's ids are"
                    ),
                )),
            }
        }
        400 | 422 => Err(failed(
            operation,
            UpstreamKind::Invalid(vec![FieldViolation::new(
                "request",
                format!("refused by the chat backend (HTTP {http})"),
            )]),
            format!("the request was refused (HTTP {http})"),
        )),
        404 => Err(failed(
            operation,
            UpstreamKind::NotFound,
            "no such room or message (HTTP 404)".into(),
        )),
        429 => Err(failed(
            operation,
            UpstreamKind::Throttled {
                retry_after: wait.unwrap_or(THROTTLED_RETRY_AFTER),
            },
            "throttled (HTTP 429)".into(),
        )),
        401 | 403 => Err(failed(
            operation,
            UpstreamKind::Unavailable,
            format!(
                "refused this service (HTTP {http}): does it check signatures with the secret of \
                 messaging.signing_secret_file?"
            ),
        )),
        _ => Err(failed(
            operation,
            UpstreamKind::Unavailable,
            format!("answered HTTP {http}"),
        )),
    }
}

fn failed(operation: Action, kind: UpstreamKind, message: String) -> Error {
    Error::ChatBackend {
        operation,
        kind,
        message,
    }
}

/// `Retry-After` in whole seconds, at least 1 and at most [`MAX_RETRY_AFTER`].
fn retry_after(headers: &http::HeaderMap) -> Option<Duration> {
    let seconds: u64 = headers
        .get(header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(seconds).clamp(Duration::from_secs(1), MAX_RETRY_AFTER))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn judged(status: u16, body: &str) -> Result<MessagingOutcome, Error> {
        judge(
            Action::SendEvent,
            StatusCode::from_u16(status).unwrap(),
            None,
            body.as_bytes(),
        )
    }

    fn kind(result: Result<MessagingOutcome, Error>) -> UpstreamKind {
        match result {
            Err(Error::ChatBackend { kind, .. }) => kind,
            other => panic!("expected a chat backend error, got {other:?}"),
        }
    }

    #[test]
    fn a_2xx_answer_needs_an_id_shaped_like_ivs_chats() {
        assert_eq!(
            judged(200, r#"{"id": "AbCdEf123456"}"#).unwrap().id,
            "AbCdEf123456"
        );
        assert_eq!(
            judged(202, r#"{"id": "AbCdEf123456", "more": 1}"#)
                .unwrap()
                .id,
            "AbCdEf123456"
        );
        for body in ["", "{}", r#"{"id": 5}"#, r#"{"id": "short"}"#, "not json"] {
            assert_eq!(
                kind(judged(200, body)),
                UpstreamKind::Unavailable,
                "{body:?}"
            );
        }
    }

    #[test]
    fn each_refusal_gets_its_kind() {
        assert!(matches!(kind(judged(400, "")), UpstreamKind::Invalid(_)));
        assert!(matches!(kind(judged(422, "")), UpstreamKind::Invalid(_)));
        assert_eq!(kind(judged(404, "")), UpstreamKind::NotFound);
        assert_eq!(
            kind(judged(429, "")),
            UpstreamKind::Throttled {
                retry_after: THROTTLED_RETRY_AFTER
            }
        );
        for status in [301, 401, 403, 409, 500, 503] {
            assert_eq!(
                kind(judged(status, "")),
                UpstreamKind::Unavailable,
                "{status}"
            );
        }
    }

    #[test]
    fn retry_after_is_whole_seconds_within_bounds() {
        let wait = |value: &str| {
            let mut headers = http::HeaderMap::new();
            headers.insert(header::RETRY_AFTER, value.parse().unwrap());
            retry_after(&headers)
        };
        assert_eq!(wait("5"), Some(Duration::from_secs(5)));
        assert_eq!(wait("0"), Some(Duration::from_secs(1)));
        assert_eq!(wait("86400"), Some(MAX_RETRY_AFTER));
        assert_eq!(wait("soon"), None);
    }

    #[test]
    fn the_signature_is_hmac_sha256_of_timestamp_dot_body_in_hex() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, format!("{}\n", "k".repeat(32))).unwrap();
        let secret = SigningSecret::load(&path).unwrap();
        // HMAC-SHA256("kkkk…k" (32), "1700000000.{}"), computed independently (Python's hmac module).
        assert_eq!(
            secret.sign(1_700_000_000, b"{}"),
            "v1=0b3b35525c10b3757ffa78df69037021fc3168d8390a51a4fcb4a8d56a25b557"
        );
    }

    #[test]
    fn secrets_are_32_to_1024_bytes_without_the_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        for (contents, ok) in [
            ("k".repeat(31) + "\n", false),
            ("k".repeat(32), true),
            ("k".repeat(1024) + "\r\n", true),
            ("k".repeat(1025), false),
        ] {
            std::fs::write(&path, &contents).unwrap();
            assert_eq!(
                SigningSecret::load(&path).is_ok(),
                ok,
                "{} bytes",
                contents.len()
            );
        }
        let missing = SigningSecret::load(&dir.path().join("nope"))
            .err()
            .unwrap()
            .to_string();
        assert!(missing.contains("cannot read"), "{missing}");
    }
}
