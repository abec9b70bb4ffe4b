//! The IVS issuer: mints tokens with Amazon IVS Chat's CreateChatToken through aws-sdk-ivschat.
//!
//! - **Region routing**: each call goes to the region in its room ARN, through one SDK client per region
//!   (and per assumed role), created on first use and shared after.
//! - **Bounds**: connect, read, per-attempt and whole-operation timeouts, and the SDK's standard retry
//!   (throttling, 5xx and connection errors) with a bounded number of attempts. The caller's gRPC deadline
//!   is enforced above the issuer and cancels the call in flight.
//! - **Quota guard**: IVS allows 200 CreateChatToken calls per second per account and region, and the
//!   quota cannot be raised. A GCRA limit per account+region, kept in the same limiter store as the rate
//!   limits (so replicas sharing a store share the budget), refuses calls over it with RESOURCE_EXHAUSTED
//!   before they reach AWS.
//! - **DisconnectUser**: the issuer is also the [`Moderator`] of the ivs deployment: DisconnectUser goes to
//!   the room's region with the same clients, timeouts, retries and error mapping, under a quota guard of
//!   its own (IVS allows 100 DisconnectUser calls per second per account and region).
//! - **Errors**: SDK errors are mapped to [`Error`] here and nowhere else; SDK types never leave this module.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
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

use super::{IssuedToken, Issuer};
use crate::config::{ConfigError, IvsConfig};
use crate::error::{Error, ExceededLimit, FieldViolation, UpstreamKind};
use crate::issuer::local::TokenClaims;
use crate::moderation::{Moderator, Reason};
use crate::ratelimit::{Check, LimiterStore, Quota, Verdict};
use crate::request::{Capability, RoomArn, TokenRequest, UserId};
use crate::telemetry::metrics::metrics;

/// The quota guard's name in RESOURCE_EXHAUSTED refusals.
pub const QUOTA_LIMIT_NAME: &str = "ivs-quota";
/// The DisconnectUser quota guard's name in RESOURCE_EXHAUSTED refusals.
pub const DISCONNECT_QUOTA_LIMIT_NAME: &str = "ivs-disconnect-quota";

/// Which client serves a call: its region, and the role assumed for its account, if any.
type ClientKey = (String, Option<String>);

/// Mints tokens with Amazon IVS Chat.
pub struct IvsIssuer<St> {
    settings: IvsConfig,
    /// Shared AWS settings: credentials chain, HTTP client, timeouts, retries.
    base: SdkConfig,
    /// One client per (region, assumed role), made on first use. The cell lets concurrent first calls
    /// share one client (and one STS session) instead of racing to make several.
    clients: Mutex<HashMap<ClientKey, Arc<OnceCell<Client>>>>,
    /// Where the quota guard keeps its state: the rate limits' store.
    store: St,
    quota: Quota,
    /// The DisconnectUser quota guard's parameters.
    disconnect_quota: Quota,
}

impl<St: LimiterStore> IvsIssuer<St> {
    /// An issuer using AWS settings loaded the standard way: credentials from the default chain, no
    /// default region (each call's region comes from its room ARN), rustls with ring for HTTPS.
    pub async fn from_environment(settings: &IvsConfig, store: St) -> Result<Self, ConfigError> {
        let base = aws_config::defaults(aws_config::BehaviorVersion::latest())
            // No default region: nothing probes instance metadata for one; each client sets its own.
            .region(None::<Region>)
            // The credential providers (STS web identity, ECS, IMDS) make HTTP calls too.
            .http_client(https_client())
            .load()
            .await;
        Self::new(settings, base, store)
    }

    /// An issuer on top of `base` (credentials, HTTP client), with `settings`' timeouts, retries and
    /// endpoint override applied.
    pub fn new(settings: &IvsConfig, base: SdkConfig, store: St) -> Result<Self, ConfigError> {
        let base = base
            .into_builder()
            .http_client(https_client())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(settings.connect_timeout)
                    .read_timeout(settings.read_timeout)
                    .operation_attempt_timeout(settings.attempt_timeout)
                    .operation_timeout(settings.operation_timeout)
                    .build(),
            )
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(settings.max_attempts)
                    .with_initial_backoff(settings.initial_backoff),
            )
            .build();
        Ok(IvsIssuer {
            quota: settings.quota()?,
            disconnect_quota: settings.disconnect_quota()?,
            settings: settings.clone(),
            base,
            clients: Mutex::default(),
            store,
        })
    }

    /// Refuses rooms outside the configured regions and accounts, before any network call.
    fn check_allowed(&self, room: &RoomArn) -> Result<(), Error> {
        let refuse = |what: &str, value: &str, allowed: &[String]| {
            Err(Error::InvalidArgument(vec![FieldViolation::new(
                "room_identifier",
                format!(
                    "{what} {value} is not served here (allowed: {})",
                    allowed.join(", ")
                ),
            )]))
        };
        let allowed = &self.settings.allowed_regions;
        if !allowed.is_empty() && !allowed.iter().any(|r| r == room.region()) {
            return refuse("region", room.region(), allowed);
        }
        let allowed = &self.settings.allowed_accounts;
        if !allowed.is_empty() && !allowed.iter().any(|a| a == room.account()) {
            return refuse("account", room.account(), allowed);
        }
        Ok(())
    }

    /// Admits a CreateChatToken call under the account+region quota, or refuses it with the wait until it
    /// would fit.
    async fn guard_quota(&self, room: &RoomArn) -> Result<(), Error> {
        let description = format!(
            "{}/s CreateChatToken calls per AWS account and region, burst {} (IVS Chat quota)",
            self.settings.quota.trim_end_matches("/s"),
            self.settings.quota_burst
        );
        self.guard(QUOTA_LIMIT_NAME, self.quota, room, description)
            .await
    }

    /// Admits a call named `name` under `quota` for `room`'s account and region.
    async fn guard(
        &self,
        name: &str,
        quota: Quota,
        room: &RoomArn,
        description: String,
    ) -> Result<(), Error> {
        let check = Check {
            key: format!("{name}:{}:{}", room.account(), room.region()),
            quota,
            shadow: false,
        };
        let verdicts = self.store.check(std::slice::from_ref(&check)).await?;
        match verdicts.first() {
            Some(Verdict::Allowed) => Ok(()),
            Some(Verdict::Denied { retry_after }) => Err(Error::RateLimited {
                limits: vec![ExceededLimit {
                    name: name.into(),
                    description,
                }],
                retry_after: *retry_after,
            }),
            None => Err(Error::Internal(
                "IVS quota guard: the store returned no verdict".into(),
            )),
        }
    }

    /// The client for `room`: its region, and the role configured for its account, if any.
    async fn client(&self, room: &RoomArn) -> Client {
        let role = self.settings.assume_roles.get(room.account()).cloned();
        let cell = self
            .clients
            .lock()
            .expect("client map lock poisoned")
            .entry((room.region().to_owned(), role.clone()))
            .or_default()
            .clone();
        cell.get_or_init(|| async {
            let region = Region::new(room.region().to_owned());
            let mut config =
                aws_sdk_ivschat::config::Builder::from(&self.base).region(region.clone());
            if let Some(url) = &self.settings.endpoint_url {
                config = config.endpoint_url(url);
            }
            if let Some(role) = role {
                let provider = AssumeRoleProvider::builder(role)
                    .session_name("chat-token-service")
                    .region(region)
                    .configure(&self.base)
                    .build()
                    .await;
                config = config.credentials_provider(provider);
            }
            tracing::info!(
                region = room.region(),
                account = room.account(),
                "IVS Chat client created"
            );
            Client::from_conf(config.build())
        })
        .await
        .clone()
    }
}

impl<St: LimiterStore> Issuer for IvsIssuer<St> {
    const NAME: &'static str = "ivs";

    async fn issue(&self, request: TokenRequest) -> Result<IssuedToken, Error> {
        self.check_allowed(&request.room)?;
        self.guard_quota(&request.room).await?;
        let client = self.client(&request.room).await;

        let started = std::time::Instant::now();
        let span = tracing::info_span!(
            "ivschat.CreateChatToken",
            otel.name = "ivschat/CreateChatToken",
            otel.kind = "client",
            rpc.system = "aws-api",
            rpc.service = "ivschat",
            rpc.method = "CreateChatToken",
            cloud.region = request.room.region(),
            aws.request_id = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
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
            let error = map_error(e, "create tokens for");
            span.record("otel.status_code", "ERROR");
            if let Error::Upstream {
                request_id: Some(id),
                ..
            } = &error
            {
                span.record("aws.request_id", id.as_str());
            }
            metrics()
                .upstream_errors
                .add(1, &[KeyValue::new("kind", error_kind(&error))]);
            tracing::warn!(
                region = request.room.region(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "IVS Chat CreateChatToken failed: {error}"
            );
            error
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
        })
    }
}

impl<St: LimiterStore> Moderator for IvsIssuer<St> {
    const NAME: &'static str = "ivs";

    async fn disconnect(
        &self,
        room: &RoomArn,
        user_id: &UserId,
        reason: &Reason,
    ) -> Result<(), Error> {
        self.check_allowed(room)?;
        let description = format!(
            "{}/s DisconnectUser calls per AWS account and region, burst {} (IVS Chat quota)",
            self.settings.disconnect_quota.trim_end_matches("/s"),
            self.settings.disconnect_quota_burst
        );
        self.guard(
            DISCONNECT_QUOTA_LIMIT_NAME,
            self.disconnect_quota,
            room,
            description,
        )
        .await?;
        let client = self.client(room).await;

        let started = std::time::Instant::now();
        let span = tracing::info_span!(
            "ivschat.DisconnectUser",
            otel.name = "ivschat/DisconnectUser",
            otel.kind = "client",
            rpc.system = "aws-api",
            rpc.service = "ivschat",
            rpc.method = "DisconnectUser",
            cloud.region = room.region(),
            aws.request_id = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
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
            Err(e) => {
                let error = map_error(e, "disconnect users from");
                span.record("otel.status_code", "ERROR");
                if let Error::Upstream {
                    request_id: Some(id),
                    ..
                } = &error
                {
                    span.record("aws.request_id", id.as_str());
                }
                metrics()
                    .upstream_errors
                    .add(1, &[KeyValue::new("kind", error_kind(&error))]);
                tracing::warn!(
                    region = room.region(),
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "IVS Chat DisconnectUser failed: {error}"
                );
                Err(error)
            }
        }
    }

    async fn verify(&self, _: TokenClaims) -> Result<TokenClaims, Error> {
        Err(Error::Unsupported(IVS_VERIFIES_ITS_TOKENS))
    }
}

/// Why VerifyChatToken is refused with the ivs issuer.
pub const IVS_VERIFIES_ITS_TOKENS: &str =
    "VerifyChatToken verifies tokens of the local issuer; Amazon IVS Chat verifies its own tokens";

/// HTTPS through rustls with ring: the SDK's default client would bring aws-lc-rs and a second hyper.
fn https_client() -> aws_sdk_ivschat::config::SharedHttpClient {
    aws_smithy_http_client::Builder::new()
        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
            aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https()
}

/// The `kind` attribute of `cts.upstream.errors`.
fn error_kind(error: &Error) -> &'static str {
    match error {
        Error::Upstream { kind, .. } => match kind {
            UpstreamKind::Invalid(_) => "validation",
            UpstreamKind::NotFound => "not_found",
            UpstreamKind::AccessDenied => "access_denied",
            UpstreamKind::PendingVerification => "pending_verification",
            UpstreamKind::Throttled { .. } => "throttled",
            UpstreamKind::Unavailable => "unavailable",
        },
        _ => "other",
    }
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

/// The errors IVS Chat operations share, whichever operation answered them.
enum Known<'a> {
    Validation(&'a aws_sdk_ivschat::types::error::ValidationException),
    NotFound,
    AccessDenied(&'a aws_sdk_ivschat::types::error::AccessDeniedException),
    PendingVerification,
    Other,
}

/// An operation's error enum, seen through [`Known`].
trait OperationError: ProvideErrorMetadata {
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

/// The one place SDK errors become domain errors. `denied_to` completes "this service's AWS identity may
/// not …" for AccessDenied.
fn map_error<E>(
    error: SdkError<E, aws_sdk_ivschat::config::http::HttpResponse>,
    denied_to: &str,
) -> Error
where
    E: OperationError + std::error::Error + Send + Sync + 'static,
{
    let request_id = error.request_id().map(str::to_owned);
    let upstream = |kind, message: String| Error::Upstream {
        kind,
        message,
        request_id: request_id.clone(),
    };
    match &error {
        SdkError::ServiceError(service) => {
            let status = service.raw().status().as_u16();
            let other = service.err();
            match other.known() {
                Known::Validation(e) => upstream(
                    UpstreamKind::Invalid(
                        e.field_list()
                            .iter()
                            .map(|f| FieldViolation::new(f.name().to_owned(), f.message()))
                            .collect(),
                    ),
                    format!("request refused: {}", e.message()),
                ),
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
                    "IVS Chat answered HTTP {status} {} (request id {}): {}",
                    other.code().unwrap_or("without an error code"),
                    request_id.as_deref().unwrap_or("unknown"),
                    other.message().unwrap_or_default()
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
