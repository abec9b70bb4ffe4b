//! The IVS issuer: mints tokens with Amazon IVS Chat's CreateChatToken through aws-sdk-ivschat.
//!
//! - **Region routing**: each call goes to the region in its room ARN, through one SDK client per allowed
//!   region (and per assumed role), created on first use and shared after. Only the regions given at
//!   construction ever get a client, so no request can make the issuer grow.
//! - **Bounds**: connect, read, per-attempt and whole-operation timeouts, and the SDK's standard retry
//!   (throttling, 5xx and connection errors) with a bounded number of attempts. The caller's gRPC deadline
//!   is enforced above the issuer and cancels the call in flight.
//! - **Before it**: rooms outside the served regions and accounts are refused by [`crate::scope`], and
//!   CreateChatToken calls are kept under IVS's quota by the built-in `ivs-quota` limit of
//!   [`crate::ratelimit`]; both run before any budget is spent, so a refused request costs nothing. The
//!   issuer checks the served rooms again itself: it may be composed without the scope layer.
//! - **DisconnectUser**: the issuer is also the [`Moderator`] of the ivs deployment: DisconnectUser goes to
//!   the room's region with the same clients, timeouts, retries and error mapping, under a quota guard of
//!   its own (IVS allows 100 DisconnectUser calls per second per account and region).
//! - **SendEvent, DeleteMessage**: and its [`Messenger`](super::Messenger) (in `ivs_messaging.rs`), with
//!   the same clients and error mapping; their quota guards are built-in limits of the messaging stack's
//!   rate-limit layer, as CreateChatToken's is of the token stack's.
//! - **Errors**: SDK errors are mapped to [`Error`] here and nowhere else; SDK types never leave this module.
//!   IVS's messages are summarised, never passed on: they may quote the request's values.

use std::{
    collections::{BTreeMap, HashMap},
    num::NonZeroU32,
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, SystemTime},
};

use aws_config::{
    Region, SdkConfig, retry::RetryConfig, sts::AssumeRoleProvider, timeout::TimeoutConfig,
};
use aws_sdk_ivschat::{
    Client,
    error::{ProvideErrorMetadata, SdkError},
    operation::{
        RequestId, create_chat_token::CreateChatTokenError, disconnect_user::DisconnectUserError,
    },
    types::ChatTokenCapability,
};
use opentelemetry::KeyValue;
use tokio::sync::OnceCell;
use tracing::Instrument;

use super::{Issuer, Moderator};
use crate::config::{EndpointUrl, RoleArn};
use crate::domain::moderation::VERIFY_NEEDS_LOCAL_ISSUER;
use crate::domain::{
    AccountId, Action, Capability, Error, ExceededLimit, FieldViolation, IVS_SIGNING_NAME,
    IssuedToken, Limit, Reason, RoomArn, ServedRooms, TokenClaims, TokenRequest, UpstreamKind,
    UserId,
};
use crate::store::{Check, LimiterStore, Quota, Verdict};
use crate::telemetry::metrics::metrics;

/// How each call to IVS Chat is bounded.
#[derive(Clone, Copy, Debug)]
pub struct CallBounds {
    /// Longest wait to open a connection.
    pub connect_timeout: Duration,
    /// Longest wait for the response once the request is sent.
    pub read_timeout: Duration,
    /// Longest time one attempt may take, connect to last byte.
    pub attempt_timeout: Duration,
    /// Longest time the whole call may take, retries included.
    pub operation_timeout: Duration,
    /// Attempts per call, the first included.
    pub max_attempts: NonZeroU32,
    /// First retry's backoff (jittered, doubling).
    pub initial_backoff: Duration,
}

/// Where calls go and as whom.
#[derive(Clone, Debug)]
pub struct Routes {
    /// Rooms served: their regions are the only ones that ever get a client.
    pub served: ServedRooms,
    /// Role to assume (account id → role ARN) for rooms of other accounts.
    pub assume_roles: BTreeMap<AccountId, RoleArn>,
    /// Every call goes here instead of the regional endpoint (the stub, a proxy), still signed for the
    /// room's region.
    pub endpoint_url: Option<EndpointUrl>,
}

/// The clients of the served regions: one cell per (region, identity), each filled on first use.
struct Clients {
    /// Per served region, one cell per identity: `[0]` the service's own credentials, `[1 + i]` the
    /// `i`-th role of `roles`. The cells let concurrent first calls share one client (and one STS session).
    by_region: HashMap<String, Vec<OnceCell<Client>>>,
    /// Distinct roles to assume, in a fixed order.
    roles: Vec<String>,
    /// Account id → index into `roles`.
    role_of_account: HashMap<String, usize>,
    /// Clients made so far.
    created: AtomicUsize,
}

/// Mints tokens with Amazon IVS Chat, and disconnects users (the [`Moderator`] of the ivs deployment).
pub struct IvsIssuer<St> {
    /// Shared AWS settings: credentials chain, HTTP client, timeouts, retries.
    base: SdkConfig,
    endpoint_url: Option<String>,
    pub(super) served: ServedRooms,
    clients: Clients,
    /// Where the DisconnectUser quota guard keeps its state: the rate limits' store.
    store: St,
    /// The DisconnectUser quota guard (per account and region).
    disconnect_quota: Limit,
}

impl<St: LimiterStore> IvsIssuer<St> {
    /// An issuer using AWS settings loaded the standard way: credentials from the default chain, no
    /// default region (each call's region comes from its room ARN), rustls with ring for HTTPS.
    pub async fn from_environment(
        bounds: CallBounds,
        routes: Routes,
        store: St,
        disconnect_quota: Limit,
    ) -> Self {
        let base = aws_config::defaults(aws_config::BehaviorVersion::latest())
            // No default region: nothing probes instance metadata for one; each client sets its own.
            .region(None::<Region>)
            // The credential providers (STS web identity, ECS, IMDS) make HTTP calls too.
            .http_client(https_client())
            .load()
            .await;
        Self::new(base, bounds, routes, store, disconnect_quota)
    }

    /// An issuer on top of `base` (credentials, HTTP client), with `bounds` and `routes` applied; the
    /// DisconnectUser guard keeps `disconnect_quota` in `store`.
    pub fn new(
        base: SdkConfig,
        bounds: CallBounds,
        routes: Routes,
        store: St,
        disconnect_quota: Limit,
    ) -> Self {
        let base = base
            .into_builder()
            .http_client(https_client())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(bounds.connect_timeout)
                    .read_timeout(bounds.read_timeout)
                    .operation_attempt_timeout(bounds.attempt_timeout)
                    .operation_timeout(bounds.operation_timeout)
                    .build(),
            )
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(bounds.max_attempts.get())
                    .with_initial_backoff(bounds.initial_backoff),
            )
            .build();
        let mut roles: Vec<String> = routes
            .assume_roles
            .values()
            .map(|role| role.as_str().to_owned())
            .collect();
        roles.sort();
        roles.dedup();
        let role_of_account = routes
            .assume_roles
            .iter()
            .map(|(account, role)| {
                let index = roles
                    .binary_search_by(|listed| listed.as_str().cmp(role.as_str()))
                    .expect("every role is listed");
                (account.as_str().to_owned(), index)
            })
            .collect();
        let by_region = routes
            .served
            .regions()
            .iter()
            .map(|region| {
                let cells = std::iter::repeat_with(OnceCell::new)
                    .take(1 + roles.len())
                    .collect();
                (region.as_str().to_owned(), cells)
            })
            .collect();
        IvsIssuer {
            base,
            endpoint_url: routes.endpoint_url.map(|url| url.as_str().to_owned()),
            served: routes.served,
            clients: Clients {
                by_region,
                roles,
                role_of_account,
                created: AtomicUsize::new(0),
            },
            store,
            disconnect_quota,
        }
    }

    /// How many SDK clients exist: at most one per served region and identity.
    pub fn clients_created(&self) -> usize {
        self.clients.created.load(Ordering::Relaxed)
    }

    /// Admits a DisconnectUser call under its account+region quota, or refuses it with the wait until it
    /// would fit.
    async fn guard_disconnect_quota(&self, room: &RoomArn) -> Result<(), Error> {
        let limit = &self.disconnect_quota;
        let check = Check {
            key: format!("{}:{}:{}", limit.name, room.account(), room.region()),
            quota: Quota::of(limit),
            shadow: false,
        };
        let verdicts = self.store.check(std::slice::from_ref(&check)).await?;
        match verdicts.first() {
            Some(Verdict::Allowed) => Ok(()),
            Some(Verdict::Denied { retry_after }) => Err(Error::RateLimited {
                limits: vec![ExceededLimit {
                    name: limit.name.clone(),
                    description: limit.description(),
                }],
                retry_after: *retry_after,
            }),
            None => Err(Error::Internal(
                "IVS quota guard: the store returned no verdict".into(),
            )),
        }
    }

    /// The client for `room`: its region, and the role configured for its account, if any. A region not
    /// served gets no client: the request is refused.
    pub(super) async fn client(&self, room: &RoomArn) -> Result<Client, Error> {
        let Some(cells) = self.clients.by_region.get(room.region()) else {
            return Err(Error::InvalidArgument(vec![FieldViolation::new(
                "room_identifier",
                format!("region {} is not served here", room.region()),
            )]));
        };
        let role = self.clients.role_of_account.get(room.account()).copied();
        let cell = &cells[role.map_or(0, |index| 1 + index)];
        let client = cell
            .get_or_init(|| async {
                let region = Region::new(room.region().to_owned());
                let mut config =
                    aws_sdk_ivschat::config::Builder::from(&self.base).region(region.clone());
                if let Some(url) = &self.endpoint_url {
                    config = config.endpoint_url(url);
                }
                if let Some(index) = role {
                    let provider = AssumeRoleProvider::builder(&self.clients.roles[index])
                        .session_name("chat-token-service")
                        .region(region)
                        .configure(&self.base)
                        .build()
                        .await;
                    config = config.credentials_provider(provider);
                }
                self.clients.created.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    region = room.region(),
                    account = room.account(),
                    "IVS Chat client created"
                );
                Client::from_conf(config.build())
            })
            .await;
        Ok(client.clone())
    }
}

impl<St: LimiterStore> Issuer for IvsIssuer<St> {
    const NAME: &'static str = "ivs";

    async fn issue(&self, request: TokenRequest) -> Result<IssuedToken, Error> {
        self.served.check(&request.room)?;
        let client = self.client(&request.room).await?;

        let started = std::time::Instant::now();
        let span = client_span(Action::CreateChatToken, request.room.region());
        let response = client
            .create_chat_token()
            .room_identifier(request.room.as_str())
            .user_id(request.user_id.expose())
            .set_capabilities(Some(
                request.capabilities.iter().map(ivs_capability).collect(),
            ))
            // Absent stays absent: IVS applies its own default.
            .set_session_duration_in_minutes(request.session_duration.map(|d| d.minutes() as i32))
            .set_attributes((!request.attributes.is_empty()).then(|| {
                request
                    .attributes
                    .expose()
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            }))
            .send()
            .instrument(span.clone())
            .await;
        let outcome = match &response {
            Ok(_) => "ok",
            Err(_) => "error",
        };
        metrics().upstream_duration.record(
            started.elapsed().as_secs_f64(),
            &[
                KeyValue::new("region", request.room.region().to_owned()),
                KeyValue::new("outcome", outcome),
            ],
        );
        let response = response.map_err(|e| {
            upstream_failed(
                &span,
                map_error(e, Action::CreateChatToken, "create tokens for"),
                request.room.region(),
                started,
            )
        })?;
        if let Some(id) = response.request_id() {
            span.record("aws.request_id", id);
        }

        let timestamp = |t: Option<&aws_sdk_ivschat::primitives::DateTime>, what: &str| {
            t.and_then(|t| SystemTime::try_from(*t).ok())
                .ok_or_else(|| Error::Internal(format!("IVS Chat returned no usable {what}")))
        };
        Ok(IssuedToken {
            token_expires_at: timestamp(response.token_expiration_time(), "tokenExpirationTime")?,
            session_expires_at: timestamp(
                response.session_expiration_time(),
                "sessionExpirationTime",
            )?,
            token: response
                .token
                .ok_or_else(|| Error::Internal("IVS Chat returned no token".into()))?,
            token_id: None,
            chat_endpoint: Some(messaging_endpoint(request.room.region())),
        })
    }
}

/// IVS Chat's Messaging API endpoint of `region`, where clients open their WebSocket with a token of a room
/// there (IVS Chat User Guide, "Send and Receive Your First Message").
pub fn messaging_endpoint(region: &str) -> String {
    format!("wss://edge.ivschat.{region}.amazonaws.com")
}

impl<St: LimiterStore> Moderator for IvsIssuer<St> {
    const NAME: &'static str = "ivs";

    async fn disconnect(
        &self,
        room: &RoomArn,
        user_id: &UserId,
        reason: &Reason,
    ) -> Result<(), Error> {
        self.served.check(room)?;
        self.guard_disconnect_quota(room).await?;
        let client = self.client(room).await?;

        let started = std::time::Instant::now();
        let span = client_span(Action::DisconnectUser, room.region());
        let response = client
            .disconnect_user()
            .room_identifier(room.as_str())
            .user_id(user_id.expose())
            .reason(reason.expose())
            .send()
            .instrument(span.clone())
            .await;
        metrics().upstream_duration.record(
            started.elapsed().as_secs_f64(),
            &[
                KeyValue::new("region", room.region().to_owned()),
                KeyValue::new("outcome", if response.is_ok() { "ok" } else { "error" }),
            ],
        );
        match response {
            Ok(output) => {
                if let Some(id) = output.request_id() {
                    span.record("aws.request_id", id);
                }
                Ok(())
            }
            Err(e) => Err(upstream_failed(
                &span,
                map_error(e, Action::DisconnectUser, "disconnect users from"),
                room.region(),
                started,
            )),
        }
    }

    async fn verify(&self, _: TokenClaims) -> Result<TokenClaims, Error> {
        Err(Error::Unsupported(VERIFY_NEEDS_LOCAL_ISSUER))
    }
}

/// The client span of one call to IVS Chat, per the OpenTelemetry conventions for AWS SDK calls.
pub(super) fn client_span(operation: Action, region: &str) -> tracing::Span {
    tracing::info_span!(
        "ivschat.call",
        otel.name = %format_args!("{IVS_SIGNING_NAME}/{operation}"),
        otel.kind = "client",
        rpc.system = "aws-api",
        rpc.service = IVS_SIGNING_NAME,
        rpc.method = operation.as_str(),
        cloud.region = region,
        aws.request_id = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    )
}

/// HTTPS through rustls with ring: the SDK's default client would bring aws-lc-rs and a second hyper.
fn https_client() -> aws_sdk_ivschat::config::SharedHttpClient {
    aws_smithy_http_client::Builder::new()
        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
            aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https()
}

fn ivs_capability(capability: Capability) -> ChatTokenCapability {
    match capability {
        Capability::SendMessage => ChatTokenCapability::SendMessage,
        Capability::DisconnectUser => ChatTokenCapability::DisconnectUser,
        Capability::DeleteMessage => ChatTokenCapability::DeleteMessage,
    }
}

/// How long to advise a throttled caller to wait: IVS's quota refills within a second.
const THROTTLED_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Our proto field name for each of IVS Chat's request fields, so a BadRequest from IVS names fields the
/// way our own validation does.
fn our_field(ivs_field: &str) -> &'static str {
    match ivs_field {
        "roomIdentifier" => "room_identifier",
        "userId" => "user_id",
        "capabilities" => "capabilities",
        "sessionDurationInMinutes" => "session_duration_in_minutes",
        "attributes" => "attributes",
        "reason" => "reason",
        "eventName" => "event_name",
        "id" => "id",
        _ => "request",
    }
}

/// The errors IVS Chat operations share, whichever operation answered them.
pub(super) enum Known<'a> {
    Validation(&'a aws_sdk_ivschat::types::error::ValidationException),
    NotFound,
    AccessDenied(&'a aws_sdk_ivschat::types::error::AccessDeniedException),
    PendingVerification,
    Other,
}

/// An operation's error enum, seen through [`Known`].
pub(super) trait OperationError: ProvideErrorMetadata {
    fn known(&self) -> Known<'_>;
}

impl OperationError for CreateChatTokenError {
    fn known(&self) -> Known<'_> {
        match self {
            CreateChatTokenError::ValidationException(e) => Known::Validation(e),
            CreateChatTokenError::ResourceNotFoundException(_) => Known::NotFound,
            CreateChatTokenError::AccessDeniedException(e) => Known::AccessDenied(e),
            CreateChatTokenError::PendingVerification(_) => Known::PendingVerification,
            _ => Known::Other,
        }
    }
}

impl OperationError for DisconnectUserError {
    fn known(&self) -> Known<'_> {
        match self {
            DisconnectUserError::ValidationException(e) => Known::Validation(e),
            DisconnectUserError::ResourceNotFoundException(_) => Known::NotFound,
            DisconnectUserError::AccessDeniedException(e) => Known::AccessDenied(e),
            DisconnectUserError::PendingVerification(_) => Known::PendingVerification,
            _ => Known::Other,
        }
    }
}

/// Records an upstream call's failure on its client span, in `cts.upstream.errors` and in the log (IVS's
/// message never: `error` is already our summary), and hands the error back.
pub(super) fn upstream_failed(
    span: &tracing::Span,
    error: Error,
    region: &str,
    started: std::time::Instant,
) -> Error {
    span.record("otel.status_code", "ERROR");
    let operation = match &error {
        Error::Upstream {
            operation,
            request_id,
            ..
        } => {
            if let Some(id) = request_id {
                span.record("aws.request_id", id.as_str());
            }
            operation.as_str()
        }
        _ => "a call",
    };
    metrics()
        .upstream_errors
        .add(1, &[KeyValue::new("kind", error.outcome())]);
    tracing::warn!(
        region,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "IVS Chat {operation} failed: {error}"
    );
    error
}

/// The one place SDK errors become domain errors, of `operation`. `denied_to` completes "this service's
/// AWS identity may not …" for AccessDenied. IVS's own messages stay out of what callers see (and of our logs, but for
/// AccessDenied's, which names our IAM principal): they may quote the user id or attributes. Codes,
/// reasons and field names are enough.
pub(super) fn map_error<E>(
    error: SdkError<E, aws_sdk_ivschat::config::http::HttpResponse>,
    operation: Action,
    denied_to: &str,
) -> Error
where
    E: OperationError + std::error::Error + Send + Sync + 'static,
{
    let request_id = error.request_id().map(str::to_owned);
    let upstream = |kind, message: String| Error::Upstream {
        operation,
        kind,
        message,
        request_id: request_id.clone(),
    };
    match &error {
        SdkError::ServiceError(service) => {
            let status = service.raw().status().as_u16();
            let other = service.err();
            match other.known() {
                Known::Validation(e) => {
                    let reason = e.reason().as_str();
                    let mut violations: Vec<FieldViolation> = e
                        .field_list()
                        .iter()
                        .map(|f| {
                            FieldViolation::new(
                                our_field(f.name()),
                                "refused by IVS Chat's validation",
                            )
                        })
                        .collect();
                    if violations.is_empty() {
                        violations.push(FieldViolation::new(
                            "request",
                            format!("refused by IVS Chat's validation ({reason})"),
                        ));
                    }
                    upstream(
                        UpstreamKind::Invalid(violations),
                        format!("request refused by validation ({reason})"),
                    )
                }
                Known::NotFound => {
                    upstream(UpstreamKind::NotFound, "the room does not exist".into())
                }
                Known::AccessDenied(e) => {
                    // IVS's message names our IAM principal; that is for our log, not for callers.
                    tracing::warn!("IVS Chat denied access: {}", e.message());
                    upstream(
                        UpstreamKind::AccessDenied,
                        format!("this service's AWS identity may not {denied_to} the room"),
                    )
                }
                Known::PendingVerification => upstream(
                    UpstreamKind::PendingVerification,
                    "the room's AWS account is pending verification for IVS Chat".into(),
                ),
                Known::Other
                    if status == 429
                        || matches!(
                            other.code(),
                            Some("ThrottlingException" | "TooManyRequestsException")
                        ) =>
                {
                    upstream(
                        UpstreamKind::Throttled {
                            retry_after: THROTTLED_RETRY_AFTER,
                        },
                        "throttled, still after retries".into(),
                    )
                }
                Known::Other if status >= 500 => upstream(
                    UpstreamKind::Unavailable,
                    format!("HTTP {status}, still after retries"),
                ),
                Known::Other => Error::Internal(format!(
                    "IVS Chat answered HTTP {status} {} (request id {})",
                    other.code().unwrap_or("without an error code"),
                    request_id.as_deref().unwrap_or("unknown"),
                )),
            }
        }
        SdkError::TimeoutError(_) => upstream(
            UpstreamKind::Unavailable,
            "no answer within the configured timeouts".into(),
        ),
        SdkError::DispatchFailure(failure) => upstream(
            UpstreamKind::Unavailable,
            if failure.is_timeout() {
                "connection timed out".into()
            } else {
                "cannot connect".into()
            },
        ),
        SdkError::ResponseError(_) => {
            upstream(UpstreamKind::Unavailable, "unreadable response".into())
        }
        _ => Error::Internal(format!(
            "IVS Chat request could not be built: {}",
            aws_sdk_ivschat::error::DisplayErrorContext(&error)
        )),
    }
}
