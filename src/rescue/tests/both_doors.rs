//! Both doors side by side: every domain error through the gRPC and the IVS rendering, with the same
//! story and the same bounds.

use super::*;

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
        operation: Action::CreateChatToken,
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
    // (error, gRPC code, HTTP status, IVS shape, retry-after seconds, ErrorInfo reason)
    type Case = (
        fn() -> Error,
        Code,
        u16,
        &'static str,
        Option<&'static str>,
        &'static str,
    );
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
            "FIELD_VALIDATION_FAILED",
        ),
        (
            || Error::Unauthenticated("the signature does not match"),
            Code::Unauthenticated,
            403,
            "AccessDeniedException",
            None,
            "NO_CALLER_IDENTITY",
        ),
        (
            || Error::EndUserInvalid(crate::domain::EndUserRejection::Expired),
            Code::Unauthenticated,
            403,
            "AccessDeniedException",
            None,
            "END_USER_TOKEN_INVALID",
        ),
        (
            || Error::EndUserMismatch,
            Code::PermissionDenied,
            403,
            "AccessDeniedException",
            None,
            "END_USER_MISMATCH",
        ),
        (
            || Error::EndUserKeysUnavailable {
                retry_after: Duration::from_millis(1_200),
            },
            Code::Unavailable,
            503,
            "ServiceUnavailableException",
            Some("2"),
            "END_USER_KEYS_UNAVAILABLE",
        ),
        (
            || Error::PolicyDenied {
                policy_ids: vec!["p".into()],
            },
            Code::PermissionDenied,
            403,
            "AccessDeniedException",
            None,
            "POLICY_DENIED",
        ),
        (
            || Error::Overloaded(Overload::Calls { max_calls: 3 }),
            Code::Unavailable,
            503,
            "ServiceUnavailableException",
            Some("1"),
            "SERVER_OVERLOADED",
        ),
        (
            || Error::DeadlineExceeded,
            Code::DeadlineExceeded,
            504,
            "RequestTimeoutException",
            None,
            "DEADLINE_EXCEEDED",
        ),
        (
            || Error::TimeLimit(TimeLimit::CallDuration(Duration::from_secs(30))),
            Code::DeadlineExceeded,
            504,
            "RequestTimeoutException",
            None,
            "CALL_TOO_LONG",
        ),
        (
            || Error::TimeLimit(TimeLimit::StreamAge(Duration::from_secs(1800))),
            Code::Unavailable,
            503,
            "ServiceUnavailableException",
            None,
            "STREAM_TOO_OLD",
        ),
        (
            || Error::Overloaded(Overload::StreamsOnConnection { max_streams: 4 }),
            Code::Unavailable,
            503,
            "ServiceUnavailableException",
            Some("1"),
            "SERVER_OVERLOADED",
        ),
        (
            || Error::LimiterUnavailable {
                retry_after: Duration::from_millis(200),
            },
            Code::Unavailable,
            503,
            "ServiceUnavailableException",
            Some("1"),
            "RATE_LIMITS_UNAVAILABLE",
        ),
        (
            || Error::Internal("boom".into()),
            Code::Internal,
            500,
            "InternalServerException",
            None,
            "INTERNAL_ERROR",
        ),
        (
            || Error::UserBanned { expires_at: None },
            Code::PermissionDenied,
            403,
            "AccessDeniedException",
            None,
            "USER_BANNED",
        ),
        (
            || Error::Unsupported("not here"),
            Code::Unimplemented,
            400,
            "ValidationException",
            None,
            "UNSUPPORTED_BY_ISSUER",
        ),
        (
            || Error::MessagingNotConfigured,
            Code::FailedPrecondition,
            400,
            "ValidationException",
            None,
            "MESSAGING_NOT_CONFIGURED",
        ),
        (
            || Error::StoreFull { capacity: 9 },
            Code::ResourceExhausted,
            402,
            "ServiceQuotaExceededException",
            None,
            "MODERATION_STORE_FULL",
        ),
    ];
    for (error, code, status, error_type, retry_after, reason) in cases {
        covered(&error());
        let grpc = grpc_status(error());
        let ivs = ivs_error(error());
        assert_eq!(grpc.code(), code, "{error_type}");
        let info = grpc
            .get_details_error_info()
            .expect("ErrorInfo on every error");
        assert_eq!(
            (info.reason.as_str(), info.domain.as_str()),
            (reason, ERROR_DOMAIN)
        );
        assert_eq!(
            grpc.metadata()
                .get(RETRY_PUSHBACK)
                .map(|v| v.to_str().unwrap().to_owned()),
            grpc.get_details_retry_info()
                .and_then(|r| r.retry_delay)
                .map(|d| d.as_millis().to_string()),
            "{error_type}: grpc-retry-pushback-ms wherever a retry delay is given"
        );
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

    covered(&rate_limited());
    let grpc = grpc_status(rate_limited());
    let ivs = ivs_error(rate_limited());
    assert_eq!(grpc.code(), Code::ResourceExhausted);
    let info = grpc.get_details_error_info().unwrap();
    assert_eq!(
        (info.reason.as_str(), info.domain.as_str()),
        ("RATE_LIMIT_EXCEEDED", ERROR_DOMAIN)
    );
    assert_eq!(info.metadata["limits"], "per-user");
    assert_eq!(grpc.metadata().get(RETRY_PUSHBACK).unwrap(), "1500");
    assert_eq!(
        (ivs.status.as_u16(), ivs.error_type),
        (429, "ThrottlingException")
    );
    assert_eq!(ivs.message, grpc.message());
    assert_eq!(ivs.retry_after_seconds(), Some(2));
    assert_eq!(grpc.metadata().get("retry-after").unwrap(), "2");
    assert_eq!(ivs.body()["resourceId"], "per-user");

    let ivs = ivs_error(Error::InvalidArgument(violations()));
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
        covered(&upstream(kind.clone()));
        let grpc = grpc_status(upstream(kind.clone()));
        let ivs = ivs_error(upstream(kind));
        assert_eq!(grpc.code(), code, "{error_type}");
        let info = grpc
            .get_details_error_info()
            .expect("ErrorInfo on every error");
        assert_eq!(info.domain, IVS_ERROR_DOMAIN, "{error_type}");
        assert_eq!((ivs.status.as_u16(), ivs.error_type), (status, error_type));
        assert_eq!(ivs.message, grpc.message());
        assert!(ivs.message.contains("req-1"));
    }
}

#[test]
fn both_doors_bound_their_replies_the_same_way() {
    let violations = || {
        (0..10_000)
            .map(|i| FieldViolation::new(format!("field_{i}"), "é".repeat(10_000)))
            .collect::<Vec<_>>()
    };
    let grpc = grpc_status(Error::InvalidArgument(violations()));
    let rest = ivs_error(Error::InvalidArgument(violations()));
    assert_eq!(rest.message, grpc.message(), "the same bounded words");
    assert!(rest.message.len() <= MAX_MESSAGE_BYTES);
    let IvsMembers::Validation { fields, .. } = &rest.members else {
        panic!("a ValidationException with its fields");
    };
    assert_eq!(fields.len(), MAX_VIOLATIONS + 1);
    assert!(
        fields
            .iter()
            .all(|v| v.description.len() <= MAX_DESCRIPTION_BYTES)
    );
    assert!(
        rest.body().to_string().len() < 16 * 1024,
        "{}",
        rest.body().to_string().len()
    );

    let upstream = || Error::Upstream {
        operation: Action::CreateChatToken,
        kind: UpstreamKind::Invalid(violations()),
        message: "x".repeat(100_000),
        request_id: Some("req-1".into()),
    };
    let grpc = grpc_status(upstream());
    let rest = ivs_error(upstream());
    assert_eq!(rest.message, grpc.message());
    assert!(rest.message.len() <= MAX_MESSAGE_BYTES);
    assert!(rest.body().to_string().len() < 16 * 1024);
}

#[test]
fn internal_errors_show_no_detail_through_either_door() {
    let grpc = grpc_status(Error::Internal("key material exploded".into()));
    let rest = ivs_error(Error::Internal("key material exploded".into()));
    assert_eq!(grpc.message(), "internal error; the server log has details");
    assert_eq!(rest.message, grpc.message());
    assert_eq!(rest.status.as_u16(), 500);
}

/// Every variant of [`Error`], matched without a wildcard: a new variant does not compile until it is
/// added here, and so to the side-by-side cases above (token rejections, and the upstream and chat
/// backend failures with their own error domains, have tests of their own).
fn covered(error: &Error) {
    match error {
        Error::InvalidArgument(_)
        | Error::Unauthenticated(_)
        | Error::EndUserInvalid(_)
        | Error::EndUserMismatch
        | Error::EndUserKeysUnavailable { .. }
        | Error::PolicyDenied { .. }
        | Error::RateLimited { .. }
        | Error::Overloaded { .. }
        | Error::Upstream { .. }
        | Error::DeadlineExceeded
        | Error::TimeLimit(_)
        | Error::LimiterUnavailable { .. }
        | Error::UserBanned { .. }
        | Error::TokenRejected(_)
        | Error::Unsupported(_)
        | Error::StoreFull { .. }
        | Error::MessagingNotConfigured
        | Error::ChatBackend { .. }
        | Error::Internal(_) => {}
    }
}
