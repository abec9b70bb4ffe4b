//! The one table from domain errors to gRPC statuses.
//!
//! Every layer and issuer returns [`Error`]; only [`From<Error> for tonic::Status`] decides which gRPC code
//! and which `google.rpc` details a caller sees. Messages name what went wrong and never carry tokens,
//! keys, user ids or attribute values.

use std::time::Duration;

use tonic::{Code, Status, metadata::MetadataValue};
use tonic_types::{ErrorDetails, QuotaViolation, StatusExt};

/// `google.rpc.ErrorInfo.domain` for errors this service decides.
pub const ERROR_DOMAIN: &str = "chat-token-service";
/// `google.rpc.ErrorInfo.domain` for errors Amazon IVS Chat returned.
pub const IVS_ERROR_DOMAIN: &str = "ivschat.amazonaws.com";

pub use crate::domain::error::{Error, ExceededLimit, FieldViolation, UpstreamKind, join};

/// The longest status message a caller gets, in bytes. Messages travel in the `grpc-message` trailer,
/// next to `grpc-status-details-bin`; gRPC clients refuse header blocks past 8 KiB (grpc-go, grpcio) or
/// 16 KiB, so both are kept well below that whatever the input.
pub const MAX_MESSAGE_BYTES: usize = 1024;
/// The longest description of one field violation, in bytes.
pub const MAX_DESCRIPTION_BYTES: usize = 512;
/// The most field violations one reply carries; past it, one more entry says how many were left out.
pub const MAX_VIOLATIONS: usize = 16;

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

/// `retry-after` metadata: whole seconds, rounded up, so retrying at the advertised second never fails
/// early.
fn whole_seconds(delay: Duration) -> u64 {
    u64::try_from(delay.as_nanos().div_ceil(1_000_000_000)).unwrap_or(u64::MAX)
}

impl From<Error> for Status {
    fn from(error: Error) -> Status {
        match error {
            Error::InvalidArgument(violations) => {
                let violations = bounded(violations);
                let message = truncated(
                    format!("invalid request: {}", join(&violations)),
                    MAX_MESSAGE_BYTES,
                );
                let mut details = ErrorDetails::new();
                for violation in violations {
                    details.add_bad_request_violation(violation.field, violation.description);
                }
                Status::with_error_details(Code::InvalidArgument, message, details)
            }
            Error::Unauthenticated(why) => {
                Status::unauthenticated(format!("no caller identity: {why}"))
            }
            Error::PolicyDenied { policy_ids } => {
                let metadata = std::collections::HashMap::from([(
                    "policy_ids".to_string(),
                    policy_ids.join(","),
                )]);
                Status::with_error_details(
                    Code::PermissionDenied,
                    "policy does not allow this caller to do this in this room",
                    ErrorDetails::with_error_info("POLICY_DENIED", ERROR_DOMAIN, metadata),
                )
            }
            Error::RateLimited {
                limits,
                retry_after,
            } => {
                let names: Vec<_> = limits.iter().map(|l| l.name.as_str()).collect();
                let message = format!("rate limit exceeded: {}", names.join(", "));
                let mut details = ErrorDetails::with_retry_info(Some(retry_after));
                details.set_quota_failure(
                    limits
                        .into_iter()
                        .map(|l| QuotaViolation::new(format!("limit:{}", l.name), l.description))
                        .collect::<Vec<_>>(),
                );
                let mut status =
                    Status::with_error_details(Code::ResourceExhausted, message, details);
                status.metadata_mut().insert(
                    "retry-after",
                    MetadataValue::from(whole_seconds(retry_after)),
                );
                status
            }
            Error::Overloaded { max_calls } => {
                let mut status = Status::with_error_details(
                    Code::Unavailable,
                    format!(
                        "server overloaded: {max_calls} token calls already in flight; retry, preferably on another replica"
                    ),
                    ErrorDetails::with_retry_info(Some(Duration::from_millis(100))),
                );
                status
                    .metadata_mut()
                    .insert("retry-after", MetadataValue::from(1u64));
                status
            }
            Error::Upstream {
                kind,
                message,
                request_id,
            } => {
                let message = truncated(
                    match &request_id {
                        Some(id) => format!("IVS Chat: {message} (request id {id})"),
                        None => format!("IVS Chat: {message}"),
                    },
                    MAX_MESSAGE_BYTES,
                );
                let info = |reason: &str| {
                    let metadata: std::collections::HashMap<String, String> = request_id
                        .iter()
                        .map(|id| ("aws_request_id".to_string(), id.clone()))
                        .collect();
                    ErrorDetails::with_error_info(reason, IVS_ERROR_DOMAIN, metadata)
                };
                match kind {
                    UpstreamKind::Invalid(violations) => {
                        let mut details = info("IVS_VALIDATION");
                        for violation in bounded(violations) {
                            details
                                .add_bad_request_violation(violation.field, violation.description);
                        }
                        Status::with_error_details(Code::InvalidArgument, message, details)
                    }
                    UpstreamKind::NotFound => Status::with_error_details(
                        Code::NotFound,
                        message,
                        info("IVS_ROOM_NOT_FOUND"),
                    ),
                    UpstreamKind::AccessDenied => Status::with_error_details(
                        Code::PermissionDenied,
                        message,
                        info("IVS_ACCESS_DENIED"),
                    ),
                    UpstreamKind::PendingVerification => Status::with_error_details(
                        Code::FailedPrecondition,
                        message,
                        info("IVS_PENDING_VERIFICATION"),
                    ),
                    // The same cause as our own quota guard refusing (IVS's quota is spent), so the same
                    // code: callers back off the same way whichever of the two noticed first.
                    UpstreamKind::Throttled { retry_after } => {
                        let mut details = info("IVS_THROTTLED");
                        details.set_retry_info(Some(retry_after));
                        let mut status =
                            Status::with_error_details(Code::ResourceExhausted, message, details);
                        status.metadata_mut().insert(
                            "retry-after",
                            MetadataValue::from(whole_seconds(retry_after)),
                        );
                        status
                    }
                    UpstreamKind::Unavailable => Status::with_error_details(
                        Code::Unavailable,
                        message,
                        info("IVS_UNAVAILABLE"),
                    ),
                }
            }
            Error::DeadlineExceeded => Status::deadline_exceeded(
                "the caller's deadline passed before the token was issued",
            ),
            Error::LimiterUnavailable { retry_after } => {
                let mut status = Status::with_error_details(
                    Code::Unavailable,
                    "rate limits cannot be checked right now; retry later",
                    ErrorDetails::with_retry_info(Some(retry_after)),
                );
                status.metadata_mut().insert(
                    "retry-after",
                    MetadataValue::from(whole_seconds(retry_after)),
                );
                status
            }
            Error::UserBanned { expires_at } => {
                // The end of the ban tells the user's app when to try again; the reason stays with the
                // moderators.
                let metadata: std::collections::HashMap<String, String> = expires_at
                    .iter()
                    .map(|end| {
                        (
                            "expires_at".to_string(),
                            humantime::format_rfc3339_millis(*end).to_string(),
                        )
                    })
                    .collect();
                Status::with_error_details(
                    Code::PermissionDenied,
                    "the user is banned from this room",
                    ErrorDetails::with_error_info("USER_BANNED", ERROR_DOMAIN, metadata),
                )
            }
            Error::TokenRejected(rejection) => {
                // A genuine token refused for its state is a precondition failure; anything else is not a
                // token of ours.
                let code = if rejection.is_genuine() {
                    Code::FailedPrecondition
                } else {
                    Code::InvalidArgument
                };
                Status::with_error_details(
                    code,
                    rejection.to_string(),
                    ErrorDetails::with_error_info(
                        rejection.reason(),
                        ERROR_DOMAIN,
                        std::collections::HashMap::new(),
                    ),
                )
            }
            Error::Unsupported(what) => Status::unimplemented(what),
            Error::StoreFull { capacity } => Status::with_error_details(
                Code::ResourceExhausted,
                format!(
                    "the moderation store holds {capacity} entries still in force; none is forgotten to make room"
                ),
                ErrorDetails::with_error_info(
                    "MODERATION_STORE_FULL",
                    ERROR_DOMAIN,
                    std::collections::HashMap::new(),
                ),
            ),
            Error::Internal(detail) => {
                tracing::error!(error = %detail, "internal error while issuing a token");
                Status::internal(
                    "internal error while issuing the token; the server log has details",
                )
            }
        }
    }
}

/// A refusal as IVS Chat's REST-JSON API returns it, so AWS SDKs and the CLI raise their typed
/// exceptions: HTTP status, `x-amzn-ErrorType`, a JSON body with `message` and the shape's own fields.
///
/// [`From<Error>`] maps every domain error here from the same cases as [`From<Error> for Status`]: a test
/// holds the two side by side, so the two front doors cannot disagree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IvsError {
    /// The HTTP status, as IVS's service model gives it for the shape.
    pub status: http::StatusCode,
    /// The error shape's name, sent as `x-amzn-ErrorType`: SDKs pick the exception class by it.
    pub error_type: &'static str,
    /// What went wrong; the same words as the gRPC message. Never tokens, keys, user ids or attributes.
    pub message: String,
    /// The shape's own members besides `message`.
    pub members: IvsMembers,
    /// When a retry can succeed, sent as `Retry-After` in whole seconds.
    pub retry_after: Option<Duration>,
}

/// The members an IVS error shape has besides `message`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IvsMembers {
    /// Only `message`.
    None,
    /// ValidationException's `reason` and `fieldList` (one entry per bad field, IVS's field names).
    Validation {
        /// One of IVS's `ValidationExceptionReason` values.
        reason: &'static str,
        /// The bad fields; may be empty.
        fields: Vec<FieldViolation>,
    },
    /// ThrottlingException's `resourceId` and `resourceType`.
    Resource {
        /// What is limited: our limits' names, or the IVS operation.
        id: String,
        /// What kind of thing `id` names.
        kind: &'static str,
    },
}

/// `ValidationException.reason` for fields that break IVS's rules.
pub const FIELD_VALIDATION_FAILED: &str = "FIELD_VALIDATION_FAILED";
/// `ValidationException.reason` for a request that cannot be read at all.
pub const VALIDATION_OTHER: &str = "OTHER";
/// `ValidationException.reason` for a path that names no operation.
pub const UNKNOWN_OPERATION: &str = "UNKNOWN_OPERATION";

impl IvsError {
    /// An error of shape `error_type` with `status` and `message` and no other fields.
    pub fn new(
        status: http::StatusCode,
        error_type: &'static str,
        message: impl Into<String>,
    ) -> Self {
        IvsError {
            status,
            error_type,
            message: message.into(),
            members: IvsMembers::None,
            retry_after: None,
        }
    }

    /// A ValidationException (400) with `reason` and no field list: the request could not be read.
    pub fn unreadable(reason: &'static str, message: impl Into<String>) -> Self {
        IvsError {
            members: IvsMembers::Validation {
                reason,
                fields: Vec::new(),
            },
            ..IvsError::new(
                http::StatusCode::BAD_REQUEST,
                "ValidationException",
                message,
            )
        }
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        let mut body = serde_json::json!({ "message": self.message });
        match &self.members {
            IvsMembers::None => {}
            IvsMembers::Validation { reason, fields } => {
                body["reason"] = (*reason).into();
                if !fields.is_empty() {
                    body["fieldList"] = fields
                        .iter()
                        .map(|f| serde_json::json!({ "name": f.field, "message": f.description }))
                        .collect();
                }
            }
            IvsMembers::Resource { id, kind } => {
                body["resourceId"] = id.as_str().into();
                body["resourceType"] = (*kind).into();
            }
        }
        body
    }

    /// `Retry-After`: whole seconds, rounded up.
    pub fn retry_after_seconds(&self) -> Option<u64> {
        self.retry_after.map(whole_seconds)
    }
}

impl From<Error> for IvsError {
    fn from(error: Error) -> IvsError {
        use http::StatusCode as S;
        match error {
            Error::InvalidArgument(violations) => IvsError {
                members: IvsMembers::Validation {
                    reason: FIELD_VALIDATION_FAILED,
                    fields: violations.clone(),
                },
                ..IvsError::new(
                    S::BAD_REQUEST,
                    "ValidationException",
                    format!("invalid request: {}", join(&violations)),
                )
            },
            // IVS has no "unauthenticated" shape: AWS answers unknown keys and bad signatures with 403.
            Error::Unauthenticated(why) => IvsError::new(
                S::FORBIDDEN,
                "AccessDeniedException",
                format!("no caller identity: {why}"),
            ),
            Error::PolicyDenied { .. } => IvsError::new(
                S::FORBIDDEN,
                "AccessDeniedException",
                "policy does not allow this caller to do this in this room",
            ),
            Error::RateLimited {
                limits,
                retry_after,
            } => {
                let names: Vec<_> = limits.iter().map(|l| l.name.as_str()).collect();
                IvsError {
                    members: IvsMembers::Resource {
                        id: names.join(","),
                        kind: "RATE_LIMIT",
                    },
                    retry_after: Some(retry_after),
                    ..IvsError::new(
                        S::TOO_MANY_REQUESTS,
                        "ThrottlingException",
                        format!("rate limit exceeded: {}", names.join(", ")),
                    )
                }
            }
            Error::Overloaded { max_calls } => IvsError {
                retry_after: Some(Duration::from_secs(1)),
                ..IvsError::new(
                    S::SERVICE_UNAVAILABLE,
                    "ServiceUnavailableException",
                    format!(
                        "server overloaded: {max_calls} token calls already in flight; retry, preferably on another replica"
                    ),
                )
            },
            Error::Upstream {
                kind,
                message,
                request_id,
            } => {
                let message = match &request_id {
                    Some(id) => format!("IVS Chat: {message} (request id {id})"),
                    None => format!("IVS Chat: {message}"),
                };
                match kind {
                    UpstreamKind::Invalid(violations) => IvsError {
                        members: IvsMembers::Validation {
                            reason: FIELD_VALIDATION_FAILED,
                            fields: violations,
                        },
                        ..IvsError::new(S::BAD_REQUEST, "ValidationException", message)
                    },
                    UpstreamKind::NotFound => {
                        IvsError::new(S::NOT_FOUND, "ResourceNotFoundException", message)
                    }
                    UpstreamKind::AccessDenied => {
                        IvsError::new(S::FORBIDDEN, "AccessDeniedException", message)
                    }
                    UpstreamKind::PendingVerification => {
                        IvsError::new(S::FORBIDDEN, "PendingVerification", message)
                    }
                    UpstreamKind::Throttled { retry_after } => IvsError {
                        members: IvsMembers::Resource {
                            id: "CreateChatToken".into(),
                            kind: "IVS_QUOTA",
                        },
                        retry_after: Some(retry_after),
                        ..IvsError::new(S::TOO_MANY_REQUESTS, "ThrottlingException", message)
                    },
                    UpstreamKind::Unavailable => IvsError::new(
                        S::SERVICE_UNAVAILABLE,
                        "ServiceUnavailableException",
                        message,
                    ),
                }
            }
            Error::DeadlineExceeded => IvsError::new(
                S::GATEWAY_TIMEOUT,
                "RequestTimeoutException",
                "the caller's deadline passed before the token was issued",
            ),
            Error::LimiterUnavailable { retry_after } => IvsError {
                retry_after: Some(retry_after),
                ..IvsError::new(
                    S::SERVICE_UNAVAILABLE,
                    "ServiceUnavailableException",
                    "rate limits cannot be checked right now; retry later",
                )
            },
            Error::UserBanned { .. } => IvsError::new(
                S::FORBIDDEN,
                "AccessDeniedException",
                "the user is banned from this room",
            ),
            Error::TokenRejected(rejection) => {
                IvsError::unreadable(VALIDATION_OTHER, rejection.to_string())
            }
            Error::Unsupported(what) => IvsError::unreadable(UNKNOWN_OPERATION, what),
            Error::StoreFull { capacity } => IvsError::new(
                S::PAYMENT_REQUIRED,
                "ServiceQuotaExceededException",
                format!(
                    "the moderation store holds {capacity} entries still in force; none is forgotten to make room"
                ),
            ),
            Error::Internal(detail) => {
                tracing::error!(error = %detail, "internal error while issuing a token");
                IvsError::new(
                    S::INTERNAL_SERVER_ERROR,
                    "InternalServerException",
                    "internal error while issuing the token; the server log has details",
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_argument_carries_one_bad_request_violation_per_field() {
        let status = Status::from(Error::InvalidArgument(vec![
            FieldViolation::new("user_id", "is required"),
            FieldViolation::new("room_identifier", "must be an IVS Chat room ARN"),
        ]));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(
            status.message(),
            "invalid request: user_id is required; room_identifier must be an IVS Chat room ARN"
        );
        let bad_request = status
            .get_details_bad_request()
            .expect("BadRequest details");
        let fields: Vec<_> = bad_request
            .field_violations
            .iter()
            .map(|v| (v.field.as_str(), v.description.as_str()))
            .collect();
        assert_eq!(
            fields,
            [
                ("user_id", "is required"),
                ("room_identifier", "must be an IVS Chat room ARN")
            ]
        );
    }

    #[test]
    fn invalid_argument_replies_are_bounded_whatever_the_input() {
        let violations = (0..10_000)
            .map(|i| FieldViolation::new(format!("field_{i}"), "é".repeat(10_000)))
            .collect();
        let status = Status::from(Error::InvalidArgument(violations));
        assert!(status.message().len() <= MAX_MESSAGE_BYTES);
        assert!(status.message().ends_with('…'));
        let fields = status.get_details_bad_request().unwrap().field_violations;
        assert_eq!(fields.len(), MAX_VIOLATIONS + 1);
        assert!(
            fields
                .iter()
                .all(|v| v.description.len() <= MAX_DESCRIPTION_BYTES)
        );
        assert_eq!(
            fields[MAX_VIOLATIONS].description,
            format!("and {} more violations", 10_000 - MAX_VIOLATIONS)
        );
        assert!(
            status.details().len() < 16 * 1024,
            "{}",
            status.details().len()
        );
    }

    #[test]
    fn unauthenticated_says_why() {
        let status = Status::from(Error::Unauthenticated("no client certificate"));
        assert_eq!(status.code(), Code::Unauthenticated);
        assert_eq!(
            status.message(),
            "no caller identity: no client certificate"
        );
    }

    #[test]
    fn policy_denied_carries_error_info_with_the_deciding_policies() {
        let status = Status::from(Error::PolicyDenied {
            policy_ids: vec![
                "moderation-needs-moderators".into(),
                "web-max-session".into(),
            ],
        });
        assert_eq!(status.code(), Code::PermissionDenied);
        let info = status.get_details_error_info().expect("ErrorInfo");
        assert_eq!(info.reason, "POLICY_DENIED");
        assert_eq!(info.domain, ERROR_DOMAIN);
        assert_eq!(
            info.metadata["policy_ids"],
            "moderation-needs-moderators,web-max-session"
        );
    }

    #[test]
    fn rate_limited_carries_retry_info_quota_failure_and_retry_after() {
        let status = Status::from(Error::RateLimited {
            limits: vec![ExceededLimit {
                name: "per-user".into(),
                description: "5/min per user, burst 5".into(),
            }],
            retry_after: Duration::from_millis(12_001),
        });
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(status.message(), "rate limit exceeded: per-user");
        let retry = status.get_details_retry_info().expect("RetryInfo");
        assert_eq!(retry.retry_delay, Some(Duration::from_millis(12_001)));
        let quota = status.get_details_quota_failure().expect("QuotaFailure");
        assert_eq!(quota.violations[0].subject, "limit:per-user");
        assert_eq!(quota.violations[0].description, "5/min per user, burst 5");
        assert_eq!(status.metadata().get("retry-after").unwrap(), "13");
    }

    #[test]
    fn upstream_failures_map_to_their_codes_and_keep_the_request_id() {
        let upstream = |kind| {
            Status::from(Error::Upstream {
                kind,
                message: "what happened".into(),
                request_id: Some("req-1".into()),
            })
        };
        let cases = [
            (UpstreamKind::NotFound, Code::NotFound, "IVS_ROOM_NOT_FOUND"),
            (
                UpstreamKind::AccessDenied,
                Code::PermissionDenied,
                "IVS_ACCESS_DENIED",
            ),
            (
                UpstreamKind::PendingVerification,
                Code::FailedPrecondition,
                "IVS_PENDING_VERIFICATION",
            ),
            (
                UpstreamKind::Unavailable,
                Code::Unavailable,
                "IVS_UNAVAILABLE",
            ),
        ];
        for (kind, code, reason) in cases {
            let status = upstream(kind);
            assert_eq!(status.code(), code);
            assert_eq!(
                status.message(),
                "IVS Chat: what happened (request id req-1)"
            );
            let info = status.get_details_error_info().expect("ErrorInfo");
            assert_eq!(info.reason, reason);
            assert_eq!(info.domain, IVS_ERROR_DOMAIN);
            assert_eq!(info.metadata["aws_request_id"], "req-1");
        }

        let throttled = upstream(UpstreamKind::Throttled {
            retry_after: Duration::from_millis(1500),
        });
        assert_eq!(throttled.code(), Code::ResourceExhausted);
        assert_eq!(
            throttled.get_details_retry_info().unwrap().retry_delay,
            Some(Duration::from_millis(1500))
        );
        assert_eq!(throttled.metadata().get("retry-after").unwrap(), "2");

        let invalid = upstream(UpstreamKind::Invalid(vec![FieldViolation::new(
            "user_id", "too long",
        )]));
        assert_eq!(invalid.code(), Code::InvalidArgument);
        let fields = invalid.get_details_bad_request().unwrap().field_violations;
        assert_eq!(
            (fields[0].field.as_str(), fields[0].description.as_str()),
            ("user_id", "too long")
        );
    }

    #[test]
    fn deadline_exceeded() {
        assert_eq!(
            Status::from(Error::DeadlineExceeded).code(),
            Code::DeadlineExceeded
        );
    }

    #[test]
    fn limiter_unavailable_is_unavailable_with_retry_info_and_retry_after() {
        let status = Status::from(Error::LimiterUnavailable {
            retry_after: Duration::from_millis(1_500),
        });
        assert_eq!(status.code(), Code::Unavailable);
        let retry = status.get_details_retry_info().expect("RetryInfo");
        assert_eq!(retry.retry_delay, Some(Duration::from_millis(1_500)));
        assert_eq!(status.metadata().get("retry-after").unwrap(), "2");
        assert!(!status.message().to_lowercase().contains("redis"));
    }

    #[test]
    fn user_banned_is_permission_denied_with_the_end_of_the_ban_only() {
        let end = std::time::SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        let status = Status::from(Error::UserBanned {
            expires_at: Some(end),
        });
        assert_eq!(status.code(), Code::PermissionDenied);
        let info = status.get_details_error_info().expect("ErrorInfo");
        assert_eq!(info.reason, "USER_BANNED");
        assert_eq!(info.domain, ERROR_DOMAIN);
        assert_eq!(info.metadata["expires_at"], "2023-11-14T22:13:20.123Z");
        assert_eq!(info.metadata.len(), 1);

        let until_lifted = Status::from(Error::UserBanned { expires_at: None });
        assert!(
            until_lifted
                .get_details_error_info()
                .unwrap()
                .metadata
                .is_empty()
        );
    }

    #[test]
    fn token_rejections_carry_their_reason_genuine_ones_as_failed_precondition() {
        use crate::domain::TokenRejection::*;
        for (rejection, code, reason) in [
            (Malformed, Code::InvalidArgument, "TOKEN_MALFORMED"),
            (UnknownKey, Code::InvalidArgument, "TOKEN_UNKNOWN_KEY"),
            (Tampered, Code::InvalidArgument, "TOKEN_TAMPERED"),
            (NotYetValid, Code::FailedPrecondition, "TOKEN_NOT_YET_VALID"),
            (Expired, Code::FailedPrecondition, "TOKEN_EXPIRED"),
            (Revoked, Code::FailedPrecondition, "TOKEN_REVOKED"),
            (AlreadyUsed, Code::FailedPrecondition, "TOKEN_ALREADY_USED"),
        ] {
            let status = Status::from(Error::TokenRejected(rejection));
            assert_eq!(status.code(), code, "{rejection:?}");
            assert_eq!(status.get_details_error_info().unwrap().reason, reason);
        }
    }

    #[test]
    fn unsupported_is_unimplemented_and_a_full_store_resource_exhausted() {
        assert_eq!(
            Status::from(Error::Unsupported("not here")).code(),
            Code::Unimplemented
        );
        let full = Status::from(Error::StoreFull { capacity: 3 });
        assert_eq!(full.code(), Code::ResourceExhausted);
        assert_eq!(
            full.get_details_error_info().unwrap().reason,
            "MODERATION_STORE_FULL"
        );
    }

    #[test]
    fn internal_hides_the_detail_from_the_caller() {
        let status = Status::from(Error::Internal("key material exploded".into()));
        assert_eq!(status.code(), Code::Internal);
        assert!(!status.message().contains("key material"));
    }

    /// Every domain error, through both doors: the gRPC code and the IVS shape must tell the same story.
    #[test]
    fn both_doors_map_every_error_from_the_same_cases() {
        let violations = || {
            vec![FieldViolation::new(
                "sessionDurationInMinutes",
                "must be between 1 and 180 minutes, got 181",
            )]
        };
        let upstream = |kind| Error::Upstream {
            kind,
            message: "what happened".into(),
            request_id: Some("req-1".into()),
        };
        let rate_limited = || Error::RateLimited {
            limits: vec![ExceededLimit {
                name: "per-user".into(),
                description: "5/min per user, burst 5".into(),
            }],
            retry_after: Duration::from_millis(1_500),
        };
        type Case = (fn() -> Error, Code, u16, &'static str, Option<&'static str>);
        let cases: Vec<Case> = vec![
            (
                || {
                    Error::InvalidArgument(vec![FieldViolation::new(
                        "sessionDurationInMinutes",
                        "must be between 1 and 180 minutes, got 181",
                    )])
                },
                Code::InvalidArgument,
                400,
                "ValidationException",
                None,
            ),
            (
                || Error::Unauthenticated("the signature does not match"),
                Code::Unauthenticated,
                403,
                "AccessDeniedException",
                None,
            ),
            (
                || Error::PolicyDenied {
                    policy_ids: vec!["p".into()],
                },
                Code::PermissionDenied,
                403,
                "AccessDeniedException",
                None,
            ),
            (
                || Error::Overloaded { max_calls: 3 },
                Code::Unavailable,
                503,
                "ServiceUnavailableException",
                Some("1"),
            ),
            (
                || Error::DeadlineExceeded,
                Code::DeadlineExceeded,
                504,
                "RequestTimeoutException",
                None,
            ),
            (
                || Error::LimiterUnavailable {
                    retry_after: Duration::from_millis(200),
                },
                Code::Unavailable,
                503,
                "ServiceUnavailableException",
                Some("1"),
            ),
            (
                || Error::Internal("boom".into()),
                Code::Internal,
                500,
                "InternalServerException",
                None,
            ),
            (
                || Error::UserBanned { expires_at: None },
                Code::PermissionDenied,
                403,
                "AccessDeniedException",
                None,
            ),
            (
                || Error::Unsupported("not here"),
                Code::Unimplemented,
                400,
                "ValidationException",
                None,
            ),
            (
                || Error::StoreFull { capacity: 9 },
                Code::ResourceExhausted,
                402,
                "ServiceQuotaExceededException",
                None,
            ),
        ];
        for (error, code, status, error_type, retry_after) in cases {
            let grpc = Status::from(error());
            let ivs = IvsError::from(error());
            assert_eq!(grpc.code(), code, "{error_type}");
            assert_eq!((ivs.status.as_u16(), ivs.error_type), (status, error_type));
            assert_eq!(
                ivs.message,
                grpc.message(),
                "the same words through both doors"
            );
            assert_eq!(
                ivs.retry_after_seconds().map(|s| s.to_string()).as_deref(),
                retry_after,
                "{error_type}"
            );
        }

        let grpc = Status::from(rate_limited());
        let ivs = IvsError::from(rate_limited());
        assert_eq!(grpc.code(), Code::ResourceExhausted);
        assert_eq!(
            (ivs.status.as_u16(), ivs.error_type),
            (429, "ThrottlingException")
        );
        assert_eq!(ivs.message, grpc.message());
        assert_eq!(ivs.retry_after_seconds(), Some(2));
        assert_eq!(grpc.metadata().get("retry-after").unwrap(), "2");
        assert_eq!(ivs.body()["resourceId"], "per-user");

        let ivs = IvsError::from(Error::InvalidArgument(violations()));
        assert_eq!(
            ivs.body(),
            serde_json::json!({
                "message": "invalid request: sessionDurationInMinutes must be between 1 and 180 minutes, got 181",
                "reason": "FIELD_VALIDATION_FAILED",
                "fieldList": [{"name": "sessionDurationInMinutes", "message": "must be between 1 and 180 minutes, got 181"}],
            })
        );

        for (kind, code, status, error_type) in [
            (
                UpstreamKind::Invalid(violations()),
                Code::InvalidArgument,
                400,
                "ValidationException",
            ),
            (
                UpstreamKind::NotFound,
                Code::NotFound,
                404,
                "ResourceNotFoundException",
            ),
            (
                UpstreamKind::AccessDenied,
                Code::PermissionDenied,
                403,
                "AccessDeniedException",
            ),
            (
                UpstreamKind::PendingVerification,
                Code::FailedPrecondition,
                403,
                "PendingVerification",
            ),
            (
                UpstreamKind::Throttled {
                    retry_after: Duration::from_secs(2),
                },
                Code::ResourceExhausted,
                429,
                "ThrottlingException",
            ),
            (
                UpstreamKind::Unavailable,
                Code::Unavailable,
                503,
                "ServiceUnavailableException",
            ),
        ] {
            let grpc = Status::from(upstream(kind.clone()));
            let ivs = IvsError::from(upstream(kind));
            assert_eq!(grpc.code(), code, "{error_type}");
            assert_eq!((ivs.status.as_u16(), ivs.error_type), (status, error_type));
            assert_eq!(ivs.message, grpc.message());
            assert!(ivs.message.contains("req-1"));
        }
    }
}
