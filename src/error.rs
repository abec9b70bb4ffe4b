//! The one table from domain errors to gRPC statuses.
//!
//! Every layer and issuer returns [`Error`]; only [`From<Error> for tonic::Status`] decides which gRPC code
//! and which `google.rpc` details a caller sees. Messages name what went wrong and never carry tokens,
//! keys, user ids or attribute values.

use std::fmt;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// One field of a request that failed validation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldViolation {
    /// The proto field name, as callers see it in their generated code.
    pub field: &'static str,
    /// Why the value was refused. Describes the rule, never echoes the value.
    pub description: String,
}

impl FieldViolation {
    /// A violation of `field`, explained by `description`.
    pub fn new(field: &'static str, description: impl Into<String>) -> Self {
        FieldViolation {
            field,
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

    /// A fault on our side (e.g. the local issuer could not encrypt). The message is for the server log;
    /// the caller sees a generic one.
    #[error("internal error: {0}")]
    Internal(String),
}

fn join(violations: &[FieldViolation]) -> String {
    violations
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl From<Error> for Status {
    fn from(error: Error) -> Status {
        match error {
            Error::InvalidArgument(violations) => {
                let message = format!("invalid request: {}", join(&violations));
                let mut details = ErrorDetails::new();
                for violation in violations {
                    details.add_bad_request_violation(violation.field, violation.description);
                }
                Status::with_error_details(Code::InvalidArgument, message, details)
            }
            Error::Internal(detail) => {
                tracing::error!(error = %detail, "internal error while issuing a token");
                Status::internal(
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
    fn internal_hides_the_detail_from_the_caller() {
        let status = Status::from(Error::Internal("key material exploded".into()));
        assert_eq!(status.code(), Code::Internal);
        assert!(!status.message().contains("key material"));
    }
}
