//! Why a request was refused: one [`Error`] for every layer, issuer and store, with one word per cause
//! ([`Error::outcome`]). How a caller sees it (a gRPC status, an IVS error shape) is decided once, by the
//! front doors' rescue table; messages here name what went wrong and never carry tokens, keys, user ids
//! or attribute values.

use std::{
    borrow::Cow,
    fmt,
    time::{Duration, SystemTime},
};

use super::action::Action;

/// One field of a request that failed validation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldViolation {
    /// The proto field name, as callers see it in their generated code (also when IVS Chat refused the
    /// field).
    pub field: Cow<'static, str>,
    /// Why the value was refused. Describes the rule, never echoes the value.
    pub description: String,
}

impl FieldViolation {
    /// A violation of `field`, explained by `description`.
    pub fn new(field: impl Into<Cow<'static, str>>, description: impl Into<String>) -> Self {
        FieldViolation {
            field: field.into(),
            description: description.into(),
        }
    }
}

impl fmt::Display for FieldViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.field, self.description)
    }
}

/// Why a token was not issued.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request breaks IVS Chat's rules; one entry per bad field.
    #[error("invalid request: {}", join(.0))]
    InvalidArgument(Vec<FieldViolation>),

    /// No identity could be resolved and no anonymous principal is configured.
    #[error("no caller identity: {0}")]
    Unauthenticated(&'static str),

    /// The end user's identity token the caller forwarded is present but cannot be accepted: it is never
    /// ignored.
    #[error("end-user token refused: {0}")]
    EndUserInvalid(EndUserRejection),

    /// The request names a user other than the one its end-user token proves.
    #[error("the request's user id is not the end user's its end-user token proves")]
    EndUserMismatch,

    /// The end-user token's issuer has no keys this service could load (its JWK set cannot be fetched and
    /// none is cached): the token can be neither accepted nor refused.
    #[error("the end-user token's issuer keys are unavailable")]
    EndUserKeysUnavailable {
        /// When the keys will be fetched again.
        retry_after: Duration,
    },

    /// Policy does not allow this caller to grant what it asked for.
    #[error("denied by policy")]
    PolicyDenied {
        /// Ids of the policies that determined the decision (empty when nothing permitted it).
        policy_ids: Vec<String>,
    },

    /// One or more rate limits are exhausted.
    #[error("rate limited by {}", .limits.iter().map(|l| l.name.as_str()).collect::<Vec<_>>().join(", "))]
    RateLimited {
        /// Every enforced limit the request exceeded.
        limits: Vec<ExceededLimit>,
        /// When a retry can succeed: the longest wait among `limits`.
        retry_after: Duration,
    },

    /// This replica is at one of its bounds; the call was shed before any work was done.
    #[error("overloaded: {0}")]
    Overloaded(Overload),

    /// Amazon IVS Chat refused the request or could not be reached, after the SDK's bounded retries.
    #[error("IVS Chat: {message}")]
    Upstream {
        /// The IVS operation that failed.
        operation: Action,
        /// What kind of failure, which decides the gRPC code.
        kind: UpstreamKind,
        /// What happened, for the caller: never credentials, tokens or user ids.
        message: String,
        /// IVS's request id, for AWS support.
        request_id: Option<String>,
    },

    /// The self-hosted chat backend (`messaging.webhook_url`) refused a SendEvent or DeleteMessage, or
    /// could not be reached, within `messaging.timeout`.
    #[error("chat backend: {message}")]
    ChatBackend {
        /// The operation that failed.
        operation: Action,
        /// What kind of failure, which decides the gRPC code (as for IVS Chat's).
        kind: UpstreamKind,
        /// What happened, for the caller: never the request's values or the backend's own words.
        message: String,
    },

    /// SendEvent or DeleteMessage with the local issuer and no chat backend to deliver them.
    #[error("{}", super::messaging::MESSAGING_NOT_CONFIGURED)]
    MessagingNotConfigured,

    /// The caller's deadline passed before a token was issued; upstream work was cancelled.
    #[error("the caller's deadline passed before the token was issued")]
    DeadlineExceeded,

    /// The call reached one of the server's time limits and was ended; upstream work was cancelled.
    #[error("{0}")]
    TimeLimit(TimeLimit),

    /// Rate limits cannot be checked: the shared store (Redis) is unreachable and configured to fail
    /// closed, so nothing is issued unchecked.
    #[error("rate-limit store unavailable")]
    LimiterUnavailable {
        /// When the store will be tried again.
        retry_after: Duration,
    },

    /// The user is banned from the room: no token is issued until the ban ends or is lifted.
    #[error("the user is banned from the room")]
    UserBanned {
        /// When the ban ends; `None`: when it is lifted. The ban's reason is for moderators only.
        expires_at: Option<SystemTime>,
    },

    /// VerifyChatToken refused the token.
    #[error("token refused: {0}")]
    TokenRejected(TokenRejection),

    /// The configured issuer cannot do what was asked (VerifyChatToken with the ivs issuer).
    #[error("unsupported: {0}")]
    Unsupported(&'static str),

    /// The in-process moderation store is full of entries still in force; nothing was forgotten to make
    /// room.
    #[error("moderation store full ({capacity} entries in force)")]
    StoreFull {
        /// The configured bound (`limiter.max_tracked_keys`).
        capacity: usize,
    },

    /// A fault on our side (e.g. the local issuer could not encrypt). The message is for the server log;
    /// the caller sees a generic one.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// The cause in one fixed word: the `outcome` of audit events and the label of error metrics. One
    /// word per cause, beside the table that gives each cause its code, so logs, metrics and statuses
    /// agree, and label sets stay bounded.
    pub fn outcome(&self) -> &'static str {
        match self {
            Error::InvalidArgument(_) => "invalid_argument",
            Error::Unauthenticated(_) => "unauthenticated",
            Error::EndUserInvalid(_) => "end_user_invalid",
            Error::EndUserMismatch => "end_user_mismatch",
            Error::EndUserKeysUnavailable { .. } => "end_user_keys_unavailable",
            Error::PolicyDenied { .. } => "denied_by_policy",
            Error::RateLimited { .. } => "rate_limited",
            Error::Overloaded(_) => "overloaded",
            Error::Upstream { kind, .. } => match kind {
                UpstreamKind::Invalid(_) => "upstream_invalid",
                UpstreamKind::NotFound => "upstream_not_found",
                UpstreamKind::AccessDenied => "upstream_access_denied",
                UpstreamKind::PendingVerification => "upstream_pending_verification",
                UpstreamKind::Throttled { .. } => "upstream_throttled",
                UpstreamKind::Unavailable => "upstream_unavailable",
            },
            Error::ChatBackend { kind, .. } => match kind {
                UpstreamKind::Invalid(_) => "chat_backend_invalid",
                UpstreamKind::NotFound => "chat_backend_not_found",
                UpstreamKind::Throttled { .. } => "chat_backend_throttled",
                UpstreamKind::AccessDenied
                | UpstreamKind::PendingVerification
                | UpstreamKind::Unavailable => "chat_backend_unavailable",
            },
            Error::MessagingNotConfigured => "messaging_not_configured",
            Error::DeadlineExceeded => "deadline_exceeded",
            Error::TimeLimit(TimeLimit::CallDuration(_)) => "call_too_long",
            Error::TimeLimit(TimeLimit::StreamAge(_)) => "stream_too_old",
            Error::LimiterUnavailable { .. } => "limiter_unavailable",
            Error::UserBanned { .. } => "user_banned",
            Error::TokenRejected(_) => "token_rejected",
            Error::Unsupported(_) => "unsupported",
            Error::StoreFull { .. } => "store_full",
            Error::Internal(_) => "internal_error",
        }
    }
}

/// The server's time limits on a call (the caller's own deadline is [`Error::DeadlineExceeded`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TimeLimit {
    /// `transport.max_call_duration`: the longest any call but a health `Watch` may take.
    #[error("the call took longer than transport.max_call_duration ({})", humantime::format_duration(*.0))]
    CallDuration(Duration),
    /// `transport.max_stream_age`: the longest a health `Watch` stream lives; the client watches again.
    #[error("the stream reached transport.max_stream_age ({}); open it again", humantime::format_duration(*.0))]
    StreamAge(Duration),
}

/// Which of a replica's bounds shed a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Overload {
    /// `max_concurrent_calls` calls are in flight.
    #[error("{max_calls} calls already in flight")]
    Calls {
        /// The configured cap.
        max_calls: usize,
    },
    /// The request bytes held for calls in flight would pass `transport.max_request_bytes_in_flight`.
    #[error("{budget} bytes of requests already held")]
    RequestBytes {
        /// The configured budget.
        budget: usize,
    },
    /// `transport.max_streaming_calls` streaming calls (health `Watch`, reflection) are open.
    #[error("{max_streams} streaming calls already open")]
    Streams {
        /// The configured bound.
        max_streams: usize,
    },
    /// `transport.max_streaming_calls_per_connection` streaming calls are open on this connection.
    #[error("{max_streams} streaming calls already open on this connection")]
    StreamsOnConnection {
        /// The configured bound.
        max_streams: usize,
    },
}

impl Overload {
    /// The setting that bounds it.
    pub fn setting(self) -> &'static str {
        match self {
            Overload::Calls { .. } => "max_concurrent_calls",
            Overload::RequestBytes { .. } => "transport.max_request_bytes_in_flight",
            Overload::Streams { .. } => "transport.max_streaming_calls",
            Overload::StreamsOnConnection { .. } => "transport.max_streaming_calls_per_connection",
        }
    }

    /// The setting's value.
    pub fn max(self) -> usize {
        match self {
            Overload::Calls { max_calls } => max_calls,
            Overload::RequestBytes { budget } => budget,
            Overload::Streams { max_streams } | Overload::StreamsOnConnection { max_streams } => {
                max_streams
            }
        }
    }
}

/// The kinds of IVS Chat failure, each with its gRPC code.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UpstreamKind {
    /// ValidationException: IVS refused fields our own validation let through.
    Invalid(Vec<FieldViolation>),
    /// ResourceNotFoundException: no such room.
    NotFound,
    /// AccessDeniedException: our AWS identity may not mint tokens for this room.
    AccessDenied,
    /// PendingVerification: the AWS account is not verified for IVS Chat yet.
    PendingVerification,
    /// ThrottlingException or HTTP 429, still after the retries: IVS's quota is spent, as when our own
    /// quota guard refuses, and answered with the same code (RESOURCE_EXHAUSTED).
    Throttled {
        /// A wait that should let a retry through.
        retry_after: Duration,
    },
    /// 5xx, connection or timeout errors, still after the retries.
    Unavailable,
}

/// A rate limit a request exceeded, for `google.rpc.QuotaFailure`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExceededLimit {
    /// The limit's configured name.
    pub name: String,
    /// What it limits, e.g. `100/s per caller, burst 200`. Never a key value (user ids are personal).
    pub description: String,
}

/// `violations` as one line: `field why; field why`.
pub fn join(violations: &[FieldViolation]) -> String {
    violations
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Why VerifyChatToken refused a token. Each has its own `google.rpc.ErrorInfo` reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenRejection {
    /// Not a token of this service at all.
    #[error("not a well-formed chat token")]
    Malformed,
    /// Encrypted with a key this service does not hold (rotated out, or another deployment's).
    #[error("the token was encrypted with a key this service does not hold")]
    UnknownKey,
    /// Authentication failed, or the authentic claims are not chat token claims: altered or forged.
    #[error("the token failed authentication")]
    Tampered,
    /// Not valid yet.
    #[error("the token is not valid yet")]
    NotYetValid,
    /// Past its expiration time.
    #[error("the token has expired")]
    Expired,
    /// Issued before the user was disconnected or banned from the room.
    #[error("the token was revoked: its user was disconnected or banned from the room")]
    Revoked,
    /// Single-use mode, and the token was verified before.
    #[error("the token was already used")]
    AlreadyUsed,
}

impl TokenRejection {
    /// The `google.rpc.ErrorInfo` reason.
    pub fn reason(self) -> &'static str {
        match self {
            TokenRejection::Malformed => "TOKEN_MALFORMED",
            TokenRejection::UnknownKey => "TOKEN_UNKNOWN_KEY",
            TokenRejection::Tampered => "TOKEN_TAMPERED",
            TokenRejection::NotYetValid => "TOKEN_NOT_YET_VALID",
            TokenRejection::Expired => "TOKEN_EXPIRED",
            TokenRejection::Revoked => "TOKEN_REVOKED",
            TokenRejection::AlreadyUsed => "TOKEN_ALREADY_USED",
        }
    }

    /// Whether the token is genuine and only its state (time, revocation, use) refuses it.
    pub fn is_genuine(self) -> bool {
        matches!(
            self,
            TokenRejection::NotYetValid
                | TokenRejection::Expired
                | TokenRejection::Revoked
                | TokenRejection::AlreadyUsed
        )
    }
}

/// Why an end user's identity token was refused. Each has a word of its own (the `cause` of
/// `END_USER_TOKEN_INVALID`), so a caller can tell an expired token from a forged one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EndUserRejection {
    /// Not a compact JWS, or its header or payload is not JSON of the expected shape, or it is too long.
    #[error("the end-user token is not a well-formed JWT")]
    Malformed,
    /// The header appears more than once.
    #[error("the end-user token header appears more than once")]
    Repeated,
    /// `iss` names no configured issuer.
    #[error("the end-user token's issuer is not one this service trusts")]
    Issuer,
    /// `alg` is not one the issuer is configured for (`none` and HMAC never are), or not the key's.
    #[error("the end-user token's algorithm is not allowed for its issuer or key")]
    Algorithm,
    /// No key of the issuer has the token's `kid`, even after a refresh of the issuer's keys.
    #[error("the end-user token names a key its issuer does not publish")]
    UnknownKey,
    /// The signature does not verify: altered or forged.
    #[error("the end-user token's signature does not verify")]
    Signature,
    /// `aud` names none of the issuer's configured audiences.
    #[error("the end-user token is not meant for this service (audience)")]
    Audience,
    /// Past `exp`.
    #[error("the end-user token has expired")]
    Expired,
    /// Before `nbf`, or issued (`iat`) in the future.
    #[error("the end-user token is not valid yet")]
    NotYetValid,
    /// Issued longer ago than the issuer's `max_token_age`.
    #[error("the end-user token is older than its issuer's maximum token age")]
    TooOld,
    /// The claim that gives the user id is missing or unusable, or an exposed claim is not strings within
    /// the bounds.
    #[error("the end-user token lacks a usable user id or carries an unusable claim")]
    Claim,
}

impl EndUserRejection {
    /// The word in `google.rpc.ErrorInfo.metadata["cause"]`, audit events and metrics.
    pub fn cause(self) -> &'static str {
        match self {
            EndUserRejection::Malformed => "malformed",
            EndUserRejection::Repeated => "repeated",
            EndUserRejection::Issuer => "issuer",
            EndUserRejection::Algorithm => "algorithm",
            EndUserRejection::UnknownKey => "unknown_key",
            EndUserRejection::Signature => "signature",
            EndUserRejection::Audience => "audience",
            EndUserRejection::Expired => "expired",
            EndUserRejection::NotYetValid => "not_yet_valid",
            EndUserRejection::TooOld => "too_old",
            EndUserRejection::Claim => "claim",
        }
    }
}
