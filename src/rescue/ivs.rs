//! IVS Chat's REST-JSON error shape, as the HTTP door sends it.

use std::time::Duration;

use http::StatusCode;

use super::{MAX_MESSAGE_BYTES, truncated, whole_seconds};
use crate::domain::FieldViolation;

/// A refusal as IVS Chat's REST-JSON API returns it, so AWS SDKs and the CLI raise their typed
/// exceptions: HTTP status, `x-amzn-ErrorType`, a JSON body with `message` and the shape's own fields.
/// Domain errors get theirs from [`rescue`]; the HTTP API's own refusals (a body it cannot read) are made
/// with [`IvsError::unreadable`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IvsError {
    /// The HTTP status, as IVS's service model gives it for the shape.
    pub status: StatusCode,
    /// The error shape's name, sent as `x-amzn-ErrorType`.
    pub error_type: &'static str,
    /// What went wrong. Never tokens, keys, user ids or attributes.
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

impl IvsError {
    /// A ValidationException (400) with `reason` and no field list: the request could not be read.
    pub fn unreadable(reason: &'static str, message: impl Into<String>) -> Self {
        IvsError {
            status: StatusCode::BAD_REQUEST,
            error_type: "ValidationException",
            message: truncated(message.into(), MAX_MESSAGE_BYTES),
            members: IvsMembers::Validation {
                reason,
                fields: Vec::new(),
            },
            retry_after: None,
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

    /// The HTTP response: the status, `x-amzn-ErrorType`, `Retry-After` when a retry can succeed, and the
    /// JSON body.
    pub fn to_http(&self) -> http::Response<bytes::Bytes> {
        let mut response = http::Response::new(bytes::Bytes::from(self.body().to_string()));
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        headers.insert(ERROR_TYPE, http::HeaderValue::from_static(self.error_type));
        if let Some(seconds) = self.retry_after_seconds() {
            headers.insert(http::header::RETRY_AFTER, http::HeaderValue::from(seconds));
        }
        response
    }
}

/// The header AWS SDKs read the error shape from.
pub const ERROR_TYPE: &str = "x-amzn-errortype";
