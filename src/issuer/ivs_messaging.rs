//! The IVS issuer as the [`Messenger`] of the ivs deployment: SendEvent and DeleteMessage go to IVS Chat's
//! own operations in the room's region, with the issuer's clients, bounds, client span and error mapping.
//! Their quota guards (`ivs.send_event_quota`, `ivs.delete_message_quota`) are limits of the stack's
//! rate-limit layer, checked before a call gets here.

use aws_sdk_ivschat::operation::{
    RequestId, delete_message::DeleteMessageError, send_event::SendEventError,
};
use opentelemetry::KeyValue;
use tracing::Instrument;

use super::Messenger;
use super::ivs::{IvsIssuer, Known, OperationError, client_span, map_error, upstream_failed};
use crate::domain::{Error, MessagingAction, MessagingOutcome, MessagingRequest};
use crate::store::LimiterStore;
use crate::telemetry::metrics::metrics;

impl<St: LimiterStore> Messenger for IvsIssuer<St> {
    const NAME: &'static str = "ivs";

    async fn deliver(&self, request: MessagingRequest) -> Result<MessagingOutcome, Error> {
        let room = &request.room;
        self.served.check(room)?;
        let client = self.client(room).await?;
        let operation = request.action.action();

        let started = std::time::Instant::now();
        let span = client_span(operation, room.region());
        // (IVS's request id, IVS's id for the event), or our summary of IVS's refusal.
        let answered = match &request.action {
            MessagingAction::SendEvent {
                event_name,
                attributes,
            } => client
                .send_event()
                .room_identifier(room.as_str())
                .event_name(event_name.as_str())
                .set_attributes((!attributes.is_empty()).then(|| {
                    attributes
                        .expose()
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect()
                }))
                .send()
                .instrument(span.clone())
                .await
                .map(|output| (output.request_id().map(str::to_owned), output.id))
                .map_err(|e| map_error(e, operation, "send events to")),
            MessagingAction::DeleteMessage { message_id, reason } => client
                .delete_message()
                .room_identifier(room.as_str())
                .id(message_id.as_str())
                // Absent stays absent: IVS refuses an empty reason.
                .set_reason(reason.as_ref().map(|r| r.expose().to_owned()))
                .send()
                .instrument(span.clone())
                .await
                .map(|output| (output.request_id().map(str::to_owned), output.id))
                .map_err(|e| map_error(e, operation, "delete messages in")),
        };
        metrics().upstream_duration.record(
            started.elapsed().as_secs_f64(),
            &[
                KeyValue::new("region", room.region().to_owned()),
                KeyValue::new("outcome", if answered.is_ok() { "ok" } else { "error" }),
            ],
        );
        let (request_id, id) =
            answered.map_err(|e| upstream_failed(&span, e, room.region(), started))?;
        if let Some(request_id) = &request_id {
            span.record("aws.request_id", request_id.as_str());
        }
        let id =
            id.ok_or_else(|| Error::Internal(format!("IVS Chat's {operation} answered no id")))?;
        Ok(MessagingOutcome { id })
    }
}

impl OperationError for SendEventError {
    fn known(&self) -> Known<'_> {
        match self {
            SendEventError::ValidationException(e) => Known::Validation(e),
            SendEventError::ResourceNotFoundException(_) => Known::NotFound,
            SendEventError::AccessDeniedException(e) => Known::AccessDenied(e),
            SendEventError::PendingVerification(_) => Known::PendingVerification,
            _ => Known::Other,
        }
    }
}

impl OperationError for DeleteMessageError {
    fn known(&self) -> Known<'_> {
        match self {
            DeleteMessageError::ValidationException(e) => Known::Validation(e),
            DeleteMessageError::ResourceNotFoundException(_) => Known::NotFound,
            DeleteMessageError::AccessDeniedException(e) => Known::AccessDenied(e),
            DeleteMessageError::PendingVerification(_) => Known::PendingVerification,
            _ => Known::Other,
        }
    }
}
