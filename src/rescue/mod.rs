//! The one error table: every domain [`Error`] is classified once ([`rescue`]) into a [`Rescue`], which is
//! then rendered as a gRPC status ([`Rescue::into_status`]: code and `google.rpc` details) or as IVS Chat's
//! REST-JSON error shape ([`Rescue::into_ivs`]: HTTP status, `x-amzn-ErrorType`, JSON body), so the two front
//! doors can never disagree and both replies are bounded the same way whatever the input.
//!
//! It sits below the transport as well as the doors because the transport sheds over-capacity calls
//! ([`Error::Overloaded`]) before any door sees them. Messages name what went wrong and never carry tokens,
//! keys, user ids or attribute values.
//!
//! Every gRPC error carries a `google.rpc.ErrorInfo` (AIP-193): one reason per cause, in
//! [`ERROR_DOMAIN`] for this service's decisions and [`IVS_ERROR_DOMAIN`] for IVS Chat's. Every retry
//! delay is given three ways: `google.rpc.RetryInfo`, `retry-after` (whole seconds, for people and
//! proxies) and `grpc-retry-pushback-ms` (gRFC A6: what gRPC clients' retry policies obey).

use std::{
    collections::HashMap,
    time::{Duration, SystemTime},
};

use http::StatusCode;
use tonic::{Code, Status, metadata::MetadataValue};
use tonic_types::{ErrorDetails, QuotaViolation, StatusExt};

use crate::domain::messaging::MESSAGING_NOT_CONFIGURED;
use crate::domain::{
    Action, Error, ExceededLimit, FieldViolation, TimeLimit, UpstreamKind, error::join,
};

mod ivs;

pub use ivs::{ERROR_TYPE, IvsError, IvsMembers};

/// `google.rpc.ErrorInfo.domain` for errors this service decides. AIP-193 wants a DNS-style name for the
/// service that defines the reasons, stable wherever it runs. This service has no public domain of its
/// own; `.internal` is the top-level domain ICANN reserved (2024) for private use, which will never be
/// delegated, so the name cannot collide with anyone's registered service, and it says whose reasons
/// these are: this service's, not IVS Chat's ([`IVS_ERROR_DOMAIN`]).
pub const ERROR_DOMAIN: &str = "chat-token-service.internal";
/// `google.rpc.ErrorInfo.domain` for errors Amazon IVS Chat returned.
pub const IVS_ERROR_DOMAIN: &str = "ivschat.amazonaws.com";

/// gRFC A6's retry pushback, in whole milliseconds: a gRPC client retrying under a retry policy waits
/// this long before its next attempt, instead of its own backoff. (gRPC clients ignore `retry-after`.)
pub const RETRY_PUSHBACK: &str = "grpc-retry-pushback-ms";

/// The longest message a caller gets, in bytes. gRPC messages travel in the `grpc-message` trailer, next
/// to `grpc-status-details-bin`; gRPC clients refuse header blocks past 8 KiB (grpc-go, grpcio) or 16 KiB,
/// so both are kept well below that whatever the input. REST bodies get the same bound.
pub const MAX_MESSAGE_BYTES: usize = 1024;
/// The longest description of one field violation, in bytes.
pub const MAX_DESCRIPTION_BYTES: usize = 512;
/// The most field violations one reply carries; past it, one more entry says how many were left out.
pub const MAX_VIOLATIONS: usize = 16;

/// `ValidationException.reason` for fields that break IVS's rules.
pub const FIELD_VALIDATION_FAILED: &str = "FIELD_VALIDATION_FAILED";
/// `ValidationException.reason` for a request that cannot be read at all.
pub const VALIDATION_OTHER: &str = "OTHER";
/// `ValidationException.reason` for a path that names no operation.
pub const UNKNOWN_OPERATION: &str = "UNKNOWN_OPERATION";

/// How a refusal is answered, whichever door it leaves through.
#[derive(Clone, Debug, PartialEq)]
pub struct Rescue {
    /// The gRPC code.
    code: Code,
    /// The HTTP status of IVS's shape for the same refusal.
    http: StatusCode,
    /// IVS's error shape, sent as `x-amzn-ErrorType`: SDKs pick the exception class by it.
    ivs_type: &'static str,
    /// What went wrong, at most [`MAX_MESSAGE_BYTES`]; the same words through both doors.
    message: String,
    /// `google.rpc.ErrorInfo`.
    info: Option<ErrorInfo>,
    /// Bad fields (bounded), with IVS's `ValidationException.reason` for them.
    fields: Option<(&'static str, Vec<FieldViolation>)>,
    /// Exhausted limits, for `google.rpc.QuotaFailure`.
    quota: Vec<ExceededLimit>,
    /// `ThrottlingException`'s `resourceId` and `resourceType`.
    resource: Option<(String, &'static str)>,
    /// When a retry can succeed: `google.rpc.RetryInfo`, `retry-after` / `Retry-After` (whole seconds)
    /// and `grpc-retry-pushback-ms`.
    retry_after: Option<Duration>,
}

/// `google.rpc.ErrorInfo`: a reason, its domain, and metadata that never holds personal data.
#[derive(Clone, Debug, PartialEq)]
struct ErrorInfo {
    reason: &'static str,
    domain: &'static str,
    metadata: Vec<(&'static str, String)>,
}

impl Rescue {
    fn new(
        code: Code,
        http: StatusCode,
        ivs_type: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Rescue {
            code,
            http,
            ivs_type,
            message: truncated(message.into(), MAX_MESSAGE_BYTES),
            info: None,
            fields: None,
            quota: Vec::new(),
            resource: None,
            retry_after: None,
        }
    }

    fn info(
        mut self,
        reason: &'static str,
        domain: &'static str,
        metadata: Vec<(&'static str, String)>,
    ) -> Self {
        self.info = Some(ErrorInfo {
            reason,
            domain,
            metadata,
        });
        self
    }

    fn fields(mut self, reason: &'static str, violations: Vec<FieldViolation>) -> Self {
        self.fields = Some((reason, violations));
        self
    }

    fn retry_after(mut self, delay: Duration) -> Self {
        self.retry_after = Some(delay);
        self
    }

    /// The gRPC code.
    pub fn code(&self) -> Code {
        self.code
    }

    /// The status a gRPC caller gets.
    pub fn into_status(self) -> Status {
        let has_details = self.info.is_some()
            || self
                .fields
                .as_ref()
                .is_some_and(|(_, fields)| !fields.is_empty())
            || !self.quota.is_empty()
            || self.retry_after.is_some();
        let mut details = ErrorDetails::new();
        if let Some(info) = self.info {
            let metadata: HashMap<String, String> = info
                .metadata
                .into_iter()
                .map(|(key, value)| (key.to_owned(), value))
                .collect();
            details.set_error_info(info.reason, info.domain, metadata);
        }
        for violation in self.fields.into_iter().flat_map(|(_, fields)| fields) {
            details.add_bad_request_violation(violation.field, violation.description);
        }
        if !self.quota.is_empty() {
            details.set_quota_failure(
                self.quota
                    .into_iter()
                    .map(|l| QuotaViolation::new(format!("limit:{}", l.name), l.description))
                    .collect::<Vec<_>>(),
            );
        }
        if let Some(delay) = self.retry_after {
            details.set_retry_info(Some(delay));
        }
        let mut status = if !has_details {
            Status::new(self.code, self.message)
        } else {
            Status::with_error_details(self.code, self.message, details)
        };
        if let Some(delay) = self.retry_after {
            let metadata = status.metadata_mut();
            metadata.insert("retry-after", MetadataValue::from(whole_seconds(delay)));
            metadata.insert(RETRY_PUSHBACK, MetadataValue::from(whole_millis(delay)));
        }
        status
    }

    /// The error an AWS SDK or the AWS CLI gets.
    pub fn into_ivs(self) -> IvsError {
        let members = match (self.fields, self.resource) {
            (Some((reason, fields)), _) => IvsMembers::Validation { reason, fields },
            (None, Some((id, kind))) => IvsMembers::Resource { id, kind },
            (None, None) => IvsMembers::None,
        };
        IvsError {
            status: self.http,
            error_type: self.ivs_type,
            message: self.message,
            members,
            retry_after: self.retry_after,
        }
    }
}

/// Classifies `error`: the one place that decides what a caller sees of it.
pub fn rescue(error: Error) -> Rescue {
    use StatusCode as S;
    match error {
        Error::InvalidArgument(violations) => {
            let violations = bounded(violations);
            let fields = field_names(&violations);
            Rescue::new(
                Code::InvalidArgument,
                S::BAD_REQUEST,
                "ValidationException",
                format!("invalid request: {}", join(&violations)),
            )
            .info(FIELD_VALIDATION_FAILED, ERROR_DOMAIN, vec![("fields", fields)])
            .fields(FIELD_VALIDATION_FAILED, violations)
        }
        // IVS has no "unauthenticated" shape: AWS answers unknown keys and bad signatures with 403.
        Error::Unauthenticated(why) => Rescue::new(
            Code::Unauthenticated,
            S::FORBIDDEN,
            "AccessDeniedException",
            format!("no caller identity: {why}"),
        )
        .info("NO_CALLER_IDENTITY", ERROR_DOMAIN, Vec::new()),
        // The cause tells an expired token from a forged one; the token and its claims never appear.
        Error::EndUserInvalid(rejection) => Rescue::new(
            Code::Unauthenticated,
            S::FORBIDDEN,
            "AccessDeniedException",
            rejection.to_string(),
        )
        .info(
            "END_USER_TOKEN_INVALID",
            ERROR_DOMAIN,
            vec![("cause", rejection.cause().to_owned())],
        ),
        Error::EndUserMismatch => Rescue::new(
            Code::PermissionDenied,
            S::FORBIDDEN,
            "AccessDeniedException",
            "the request's user id is not the one the end-user token proves",
        )
        .info("END_USER_MISMATCH", ERROR_DOMAIN, Vec::new()),
        Error::EndUserKeysUnavailable { retry_after } => Rescue::new(
            Code::Unavailable,
            S::SERVICE_UNAVAILABLE,
            "ServiceUnavailableException",
            "the end-user token's issuer keys cannot be loaded right now; retry later",
        )
        .info("END_USER_KEYS_UNAVAILABLE", ERROR_DOMAIN, Vec::new())
        .retry_after(retry_after),
        Error::PolicyDenied { policy_ids } => Rescue::new(
            Code::PermissionDenied,
            S::FORBIDDEN,
            "AccessDeniedException",
            "policy does not allow this caller to do this in this room",
        )
        .info(
            "POLICY_DENIED",
            ERROR_DOMAIN,
            vec![("policy_ids", policy_ids.join(","))],
        ),
        Error::RateLimited {
            limits,
            retry_after,
        } => {
            let names: Vec<_> = limits.iter().map(|l| l.name.as_str()).collect();
            let mut rescue = Rescue::new(
                Code::ResourceExhausted,
                S::TOO_MANY_REQUESTS,
                "ThrottlingException",
                format!("rate limit exceeded: {}", names.join(", ")),
            )
            .info(
                "RATE_LIMIT_EXCEEDED",
                ERROR_DOMAIN,
                vec![("limits", names.join(","))],
            )
            .retry_after(retry_after);
            rescue.resource = Some((names.join(","), "RATE_LIMIT"));
            rescue.quota = limits;
            rescue
        }
        Error::Overloaded(overload) => Rescue::new(
            Code::Unavailable,
            S::SERVICE_UNAVAILABLE,
            "ServiceUnavailableException",
            format!("server overloaded: {overload}; retry, preferably on another replica"),
        )
        .info(
            "SERVER_OVERLOADED",
            ERROR_DOMAIN,
            vec![
                ("setting", overload.setting().to_owned()),
                ("max", overload.max().to_string()),
            ],
        )
        .retry_after(OVERLOADED_RETRY_AFTER),
        Error::Upstream {
            operation,
            kind,
            message,
            request_id,
        } => upstream(operation, kind, message, request_id),
        Error::ChatBackend {
            operation,
            kind,
            message,
        } => chat_backend(operation, kind, message),
        // A deployment without a chat backend: nothing the caller can change in the request. IVS's model
        // gives SendEvent no shape for it; ValidationException is what SDKs surface with the message.
        Error::MessagingNotConfigured => Rescue::new(
            Code::FailedPrecondition,
            S::BAD_REQUEST,
            "ValidationException",
            MESSAGING_NOT_CONFIGURED,
        )
        .info("MESSAGING_NOT_CONFIGURED", ERROR_DOMAIN, Vec::new())
        .fields(VALIDATION_OTHER, Vec::new()),
        Error::DeadlineExceeded => Rescue::new(
            Code::DeadlineExceeded,
            S::GATEWAY_TIMEOUT,
            "RequestTimeoutException",
            "the caller's deadline passed before the token was issued",
        )
        .info("DEADLINE_EXCEEDED", ERROR_DOMAIN, Vec::new()),
        Error::TimeLimit(limit @ TimeLimit::CallDuration(_)) => Rescue::new(
            Code::DeadlineExceeded,
            S::GATEWAY_TIMEOUT,
            "RequestTimeoutException",
            limit.to_string(),
        )
        .info("CALL_TOO_LONG", ERROR_DOMAIN, Vec::new()),
        // Not the client's fault and not final: a stream ended for its age is opened again at once.
        Error::TimeLimit(limit @ TimeLimit::StreamAge(_)) => Rescue::new(
            Code::Unavailable,
            S::SERVICE_UNAVAILABLE,
            "ServiceUnavailableException",
            limit.to_string(),
        )
        .info("STREAM_TOO_OLD", ERROR_DOMAIN, Vec::new()),
        Error::LimiterUnavailable { retry_after } => Rescue::new(
            Code::Unavailable,
            S::SERVICE_UNAVAILABLE,
            "ServiceUnavailableException",
            "rate limits cannot be checked right now; retry later",
        )
        .info("RATE_LIMITS_UNAVAILABLE", ERROR_DOMAIN, Vec::new())
        .retry_after(retry_after),
        // The end of the ban tells the user's app when to try again; the reason stays with the moderators.
        Error::UserBanned { expires_at } => Rescue::new(
            Code::PermissionDenied,
            S::FORBIDDEN,
            "AccessDeniedException",
            "the user is banned from this room",
        )
        .info(
            "USER_BANNED",
            ERROR_DOMAIN,
            expires_at
                .iter()
                .map(|end| ("expires_at", rfc3339_millis(*end)))
                .collect(),
        ),
        // A genuine token refused for its state is a precondition failure; anything else is not a token of
        // ours.
        Error::TokenRejected(rejection) => Rescue::new(
            if rejection.is_genuine() {
                Code::FailedPrecondition
            } else {
                Code::InvalidArgument
            },
            S::BAD_REQUEST,
            "ValidationException",
            rejection.to_string(),
        )
        .info(rejection.reason(), ERROR_DOMAIN, Vec::new())
        .fields(VALIDATION_OTHER, Vec::new()),
        Error::Unsupported(what) => Rescue::new(
            Code::Unimplemented,
            S::BAD_REQUEST,
            "ValidationException",
            what,
        )
        .info("UNSUPPORTED_BY_ISSUER", ERROR_DOMAIN, Vec::new())
        .fields(UNKNOWN_OPERATION, Vec::new()),
        Error::StoreFull { capacity } => Rescue::new(
            Code::ResourceExhausted,
            S::PAYMENT_REQUIRED,
            "ServiceQuotaExceededException",
            format!(
                "the moderation store holds {capacity} entries still in force; none is forgotten to make room"
            ),
        )
        .info("MODERATION_STORE_FULL", ERROR_DOMAIN, Vec::new()),
        // The detail is for the server log (the doors write it); the caller sees a generic message.
        Error::Internal(_) => Rescue::new(
            Code::Internal,
            S::INTERNAL_SERVER_ERROR,
            "InternalServerException",
            "internal error; the server log has details",
        )
        .info("INTERNAL_ERROR", ERROR_DOMAIN, Vec::new()),
    }
}

/// The status of a gRPC call to a method this server does not serve (no domain error: nothing was
/// asked of the service), with its ErrorInfo like every other error. (The HTTP API answers an unknown
/// path with [`IvsError::unreadable`]`(`[`UNKNOWN_OPERATION`]`)`, the same shape given here.)
pub fn unknown_method() -> Status {
    Rescue::new(
        Code::Unimplemented,
        StatusCode::BAD_REQUEST,
        "ValidationException",
        "this server does not serve this method; reflection lists those it does",
    )
    .info("UNKNOWN_METHOD", ERROR_DOMAIN, Vec::new())
    .into_status()
}

/// How long a caller shed for overload is advised to wait: another replica can take it at once.
const OVERLOADED_RETRY_AFTER: Duration = Duration::from_millis(100);

fn upstream(
    operation: Action,
    kind: UpstreamKind,
    message: String,
    request_id: Option<String>,
) -> Rescue {
    use StatusCode as S;
    let message = match &request_id {
        Some(id) => format!("IVS Chat: {message} (request id {id})"),
        None => format!("IVS Chat: {message}"),
    };
    let metadata: Vec<_> = request_id
        .into_iter()
        .map(|id| ("aws_request_id", id))
        .collect();
    let (code, http, ivs_type, reason) = match &kind {
        UpstreamKind::Invalid(_) => (
            Code::InvalidArgument,
            S::BAD_REQUEST,
            "ValidationException",
            "IVS_VALIDATION",
        ),
        UpstreamKind::NotFound => (
            Code::NotFound,
            S::NOT_FOUND,
            "ResourceNotFoundException",
            "IVS_ROOM_NOT_FOUND",
        ),
        UpstreamKind::AccessDenied => (
            Code::PermissionDenied,
            S::FORBIDDEN,
            "AccessDeniedException",
            "IVS_ACCESS_DENIED",
        ),
        UpstreamKind::PendingVerification => (
            Code::FailedPrecondition,
            S::FORBIDDEN,
            "PendingVerification",
            "IVS_PENDING_VERIFICATION",
        ),
        // The same cause as our own quota guard refusing (IVS's quota is spent), so the same code:
        // callers back off the same way whichever of the two noticed first.
        UpstreamKind::Throttled { .. } => (
            Code::ResourceExhausted,
            S::TOO_MANY_REQUESTS,
            "ThrottlingException",
            "IVS_THROTTLED",
        ),
        UpstreamKind::Unavailable => (
            Code::Unavailable,
            S::SERVICE_UNAVAILABLE,
            "ServiceUnavailableException",
            "IVS_UNAVAILABLE",
        ),
    };
    let mut rescue =
        Rescue::new(code, http, ivs_type, message).info(reason, IVS_ERROR_DOMAIN, metadata);
    match kind {
        UpstreamKind::Invalid(violations) => {
            rescue = rescue.fields(FIELD_VALIDATION_FAILED, bounded(violations));
        }
        UpstreamKind::Throttled { retry_after } => {
            rescue = rescue.retry_after(retry_after);
            rescue.resource = Some((operation.as_str().to_owned(), "IVS_QUOTA"));
        }
        _ => {}
    }
    rescue
}

/// `google.rpc.ErrorInfo.domain` for errors the self-hosted chat backend returned.
pub const CHAT_BACKEND_ERROR_DOMAIN: &str = "chat-backend";

/// The chat backend's refusals and failures, in the same codes and shapes as IVS Chat's (its words stay in
/// our log: they may quote the request).
fn chat_backend(operation: Action, kind: UpstreamKind, message: String) -> Rescue {
    use StatusCode as S;
    let message = format!("chat backend: {message}");
    match kind {
        UpstreamKind::Invalid(violations) => Rescue::new(
            Code::InvalidArgument,
            S::BAD_REQUEST,
            "ValidationException",
            message,
        )
        .info(
            "CHAT_BACKEND_VALIDATION",
            CHAT_BACKEND_ERROR_DOMAIN,
            Vec::new(),
        )
        .fields(FIELD_VALIDATION_FAILED, bounded(violations)),
        UpstreamKind::NotFound => Rescue::new(
            Code::NotFound,
            S::NOT_FOUND,
            "ResourceNotFoundException",
            message,
        )
        .info(
            "CHAT_BACKEND_NOT_FOUND",
            CHAT_BACKEND_ERROR_DOMAIN,
            Vec::new(),
        ),
        UpstreamKind::Throttled { retry_after } => {
            let mut rescue = Rescue::new(
                Code::ResourceExhausted,
                S::TOO_MANY_REQUESTS,
                "ThrottlingException",
                message,
            )
            .info(
                "CHAT_BACKEND_THROTTLED",
                CHAT_BACKEND_ERROR_DOMAIN,
                Vec::new(),
            )
            .retry_after(retry_after);
            rescue.resource = Some((operation.as_str().to_owned(), "CHAT_BACKEND"));
            rescue
        }
        UpstreamKind::AccessDenied
        | UpstreamKind::PendingVerification
        | UpstreamKind::Unavailable => Rescue::new(
            Code::Unavailable,
            S::SERVICE_UNAVAILABLE,
            "ServiceUnavailableException",
            message,
        )
        .info(
            "CHAT_BACKEND_UNAVAILABLE",
            CHAT_BACKEND_ERROR_DOMAIN,
            Vec::new(),
        ),
    }
}

/// `text` cut to at most `max` bytes on a character boundary, marked with `…` when cut.
fn truncated(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max - '…'.len_utf8();
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

/// The names of the fields `violations` refuses, for ErrorInfo's metadata: comma-separated, each once.
fn field_names(violations: &[FieldViolation]) -> String {
    let mut names: Vec<&str> = Vec::new();
    for violation in violations {
        if !violation.field.is_empty() && !names.contains(&violation.field.as_ref()) {
            names.push(&violation.field);
        }
    }
    names.join(",")
}

/// `violations` within the reply bounds: at most [`MAX_VIOLATIONS`], each description at most
/// [`MAX_DESCRIPTION_BYTES`].
fn bounded(violations: Vec<FieldViolation>) -> Vec<FieldViolation> {
    let total = violations.len();
    let mut kept: Vec<_> = violations
        .into_iter()
        .take(MAX_VIOLATIONS)
        .map(|v| FieldViolation {
            field: v.field,
            description: truncated(v.description, MAX_DESCRIPTION_BYTES),
        })
        .collect();
    if total > MAX_VIOLATIONS {
        kept.push(FieldViolation::new(
            "",
            format!("and {} more violations", total - MAX_VIOLATIONS),
        ));
    }
    kept
}

/// Retry pushback in whole milliseconds, rounded up, so retrying after it never fails early.
fn whole_millis(delay: Duration) -> u64 {
    u64::try_from(delay.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX)
}

/// Retry hints in whole seconds, rounded up, so retrying at the advertised second never fails early.
fn whole_seconds(delay: Duration) -> u64 {
    u64::try_from(delay.as_nanos().div_ceil(1_000_000_000)).unwrap_or(u64::MAX)
}

/// `at` as RFC 3339 UTC with milliseconds, e.g. `2023-11-14T22:13:20.123Z`.
fn rfc3339_millis(at: SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
}

#[cfg(test)]
mod tests;
