use std::time::SystemTime;

use tonic::{Code, Status};
use tonic_types::StatusExt;

use super::*;
use crate::domain::{Action, ExceededLimit, FieldViolation, Overload, TimeLimit, UpstreamKind};

mod both_doors;

fn grpc_status(error: Error) -> Status {
    rescue(error).into_status()
}

fn ivs_error(error: Error) -> IvsError {
    rescue(error).into_ivs()
}

#[test]
fn invalid_argument_carries_one_bad_request_violation_per_field() {
    let status = grpc_status(Error::InvalidArgument(vec![
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
    let status = grpc_status(Error::InvalidArgument(violations));
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
    let status = grpc_status(Error::Unauthenticated("no client certificate"));
    assert_eq!(status.code(), Code::Unauthenticated);
    assert_eq!(
        status.message(),
        "no caller identity: no client certificate"
    );
}

#[test]
fn policy_denied_carries_error_info_with_the_deciding_policies() {
    let status = grpc_status(Error::PolicyDenied {
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
    let status = grpc_status(Error::RateLimited {
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
        grpc_status(Error::Upstream {
            operation: Action::CreateChatToken,
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
        grpc_status(Error::DeadlineExceeded).code(),
        Code::DeadlineExceeded
    );
}

#[test]
fn limiter_unavailable_is_unavailable_with_retry_info_and_retry_after() {
    let status = grpc_status(Error::LimiterUnavailable {
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
    let end = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
    let status = grpc_status(Error::UserBanned {
        expires_at: Some(end),
    });
    assert_eq!(status.code(), Code::PermissionDenied);
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "USER_BANNED");
    assert_eq!(info.domain, ERROR_DOMAIN);
    assert_eq!(info.metadata["expires_at"], "2023-11-14T22:13:20.123Z");
    assert_eq!(info.metadata.len(), 1);

    let until_lifted = grpc_status(Error::UserBanned { expires_at: None });
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
        let status = grpc_status(Error::TokenRejected(rejection));
        assert_eq!(status.code(), code, "{rejection:?}");
        assert_eq!(status.get_details_error_info().unwrap().reason, reason);
    }
}

#[test]
fn unsupported_is_unimplemented_and_a_full_store_resource_exhausted() {
    assert_eq!(
        grpc_status(Error::Unsupported("not here")).code(),
        Code::Unimplemented
    );
    let full = grpc_status(Error::StoreFull { capacity: 3 });
    assert_eq!(full.code(), Code::ResourceExhausted);
    assert_eq!(
        full.get_details_error_info().unwrap().reason,
        "MODERATION_STORE_FULL"
    );
}

#[test]
fn internal_hides_the_detail_from_the_caller() {
    let status = grpc_status(Error::Internal("key material exploded".into()));
    assert_eq!(status.code(), Code::Internal);
    assert!(!status.message().contains("key material"));
}

#[test]
fn retry_delays_go_out_as_retry_info_retry_after_and_grpc_retry_pushback_ms() {
    let status = grpc_status(Error::RateLimited {
        limits: vec![ExceededLimit {
            name: "per-user".into(),
            description: "5/min per user, burst 5".into(),
        }],
        retry_after: Duration::from_micros(12_000_001),
    });
    assert_eq!(status.metadata().get("retry-after").unwrap(), "13");
    assert_eq!(status.metadata().get(RETRY_PUSHBACK).unwrap(), "12001");
    // Without a delay, neither header: a client must not be told to wait for nothing.
    let denied = grpc_status(Error::PolicyDenied { policy_ids: vec![] });
    assert!(denied.metadata().get(RETRY_PUSHBACK).is_none());
    assert!(denied.metadata().get("retry-after").is_none());
}

#[test]
fn invalid_argument_error_info_names_each_bad_field_once() {
    let status = grpc_status(Error::InvalidArgument(vec![
        FieldViolation::new("user_id", "is required"),
        FieldViolation::new("attributes", "too many"),
        FieldViolation::new("user_id", "too long"),
    ]));
    let info = status.get_details_error_info().unwrap();
    assert_eq!(info.reason, "FIELD_VALIDATION_FAILED");
    assert_eq!(info.metadata["fields"], "user_id,attributes");
}

#[test]
fn the_codec_refuses_in_the_same_error_domain() {
    assert_eq!(crate::proto::codec::ERROR_DOMAIN, ERROR_DOMAIN);
}

#[test]
fn an_unknown_method_is_unimplemented_with_its_own_reason() {
    let status = unknown_method();
    assert_eq!(status.code(), Code::Unimplemented);
    let info = status.get_details_error_info().unwrap();
    assert_eq!(
        (info.reason.as_str(), info.domain.as_str()),
        ("UNKNOWN_METHOD", ERROR_DOMAIN)
    );
}

#[test]
fn messaging_without_a_backend_is_a_failed_precondition_that_says_how_to_enable_it() {
    let grpc = grpc_status(Error::MessagingNotConfigured);
    assert_eq!(grpc.code(), Code::FailedPrecondition);
    assert!(grpc.message().contains("messaging.webhook_url"), "{grpc:?}");
    let info = grpc.get_details_error_info().expect("ErrorInfo");
    assert_eq!(
        (info.reason.as_str(), info.domain.as_str()),
        ("MESSAGING_NOT_CONFIGURED", ERROR_DOMAIN)
    );
    let ivs = ivs_error(Error::MessagingNotConfigured);
    assert_eq!(
        (ivs.status.as_u16(), ivs.error_type),
        (400, "ValidationException")
    );
    assert_eq!(
        ivs.message,
        grpc.message(),
        "the same words through both doors"
    );
    assert_eq!(ivs.body()["reason"], "OTHER");
}

#[test]
fn chat_backend_failures_map_like_ivs_chats_in_their_own_domain() {
    let failed = |kind| Error::ChatBackend {
        operation: Action::SendEvent,
        kind,
        message: "what happened".into(),
    };
    let cases = [
        (
            UpstreamKind::Invalid(vec![FieldViolation::new("request", "refused")]),
            Code::InvalidArgument,
            400,
            "ValidationException",
            "CHAT_BACKEND_VALIDATION",
        ),
        (
            UpstreamKind::NotFound,
            Code::NotFound,
            404,
            "ResourceNotFoundException",
            "CHAT_BACKEND_NOT_FOUND",
        ),
        (
            UpstreamKind::Throttled {
                retry_after: Duration::from_secs(3),
            },
            Code::ResourceExhausted,
            429,
            "ThrottlingException",
            "CHAT_BACKEND_THROTTLED",
        ),
        (
            UpstreamKind::Unavailable,
            Code::Unavailable,
            503,
            "ServiceUnavailableException",
            "CHAT_BACKEND_UNAVAILABLE",
        ),
    ];
    for (kind, code, status, error_type, reason) in cases {
        let grpc = grpc_status(failed(kind.clone()));
        let ivs = ivs_error(failed(kind));
        assert_eq!(grpc.code(), code, "{reason}");
        assert_eq!(grpc.message(), "chat backend: what happened");
        let info = grpc.get_details_error_info().expect("ErrorInfo");
        assert_eq!(
            (info.reason.as_str(), info.domain.as_str()),
            (reason, CHAT_BACKEND_ERROR_DOMAIN)
        );
        assert_eq!((ivs.status.as_u16(), ivs.error_type), (status, error_type));
        assert_eq!(ivs.message, grpc.message());
    }
    let throttled = ivs_error(failed(UpstreamKind::Throttled {
        retry_after: Duration::from_secs(3),
    }));
    assert_eq!(throttled.retry_after_seconds(), Some(3));
    assert_eq!(throttled.body()["resourceId"], "SendEvent");
}
