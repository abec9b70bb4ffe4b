//! [`MessagingDoor`]: SendEvent and DeleteMessage as every door serves them: the same identity resolver as
//! the other calls, validation with IVS Chat's limits, the messaging stack within the caller's deadline,
//! and one audit event of the same shape as moderation's.

use tracing::Instrument;

use super::{short_hash, within};
use crate::domain::messaging::optional_reason;
use crate::domain::{
    Action, Attributes, Caller, CallerSource, Error, EventName, FieldViolation, MessageId,
    MessagingAction, MessagingOutcome, MessagingRequest, RoomArn,
};
use crate::identity::Resolver;
use crate::stack::MessagingStack;
use crate::transport::deadline::CallDeadline;

/// SendEvent and DeleteMessage for both doors.
#[derive(Clone)]
pub struct MessagingDoor {
    /// Who is calling.
    identity: Resolver,
    /// The issuer's name, for audit events (`ivs` delivers through IVS Chat, `local` through the webhook).
    issuer: &'static str,
    /// Policy, scope, limits, the messenger; `None` when nothing can deliver them (the local issuer without
    /// `messaging.webhook_url`): every call is then refused with [`Error::MessagingNotConfigured`].
    stack: Option<MessagingStack>,
}

/// How a door names the fields of messaging requests in validation errors, so callers see their own names.
pub struct MessagingNames {
    room_identifier: &'static str,
    event_name: &'static str,
}

impl MessagingNames {
    /// The proto field names, for gRPC callers.
    pub const PROTO: MessagingNames = MessagingNames {
        room_identifier: "room_identifier",
        event_name: "event_name",
    };
    /// IVS Chat's own member names, for the REST-JSON API.
    pub const IVS: MessagingNames = MessagingNames {
        room_identifier: "roomIdentifier",
        event_name: "eventName",
    };
}

/// The fields of a messaging call as a door decoded them, before validation.
#[derive(Default)]
pub struct UncheckedMessage {
    /// `roomIdentifier`.
    pub room_identifier: String,
    /// SendEvent's `eventName`.
    pub event_name: String,
    /// SendEvent's `attributes`.
    pub attributes: Vec<(String, String)>,
    /// DeleteMessage's `id`.
    pub id: String,
    /// DeleteMessage's `reason`; empty: none.
    pub reason: String,
}

impl MessagingDoor {
    /// A door identifying callers with `identity` and sending every valid request through `stack`, whose
    /// issuer is called `issuer` in audit events; without a stack it refuses every call.
    pub fn new(identity: Resolver, issuer: &'static str, stack: Option<MessagingStack>) -> Self {
        MessagingDoor {
            identity,
            issuer,
            stack,
        }
    }

    /// Who is calling.
    pub fn identity(&self) -> &Resolver {
        &self.identity
    }

    /// Records a call whose caller could not be identified, and hands the error back.
    pub fn unidentified(action: Action, error: Error) -> Error {
        tracing::info!(target: "audit", action = action.as_str(), outcome = error.outcome(), "messaging refused");
        error
    }

    /// Validates the fields of `action` from `caller`, reporting every bad field at once under `names`.
    pub fn validate(
        &self,
        action: Action,
        caller: Caller,
        fields: UncheckedMessage,
        names: &MessagingNames,
    ) -> Result<MessagingRequest, Error> {
        let mut bad = Vec::new();
        let mut check =
            |field: &'static str, why: String| bad.push(FieldViolation::new(field, why));
        let room = RoomArn::parse(&fields.room_identifier)
            .map_err(|why| check(names.room_identifier, why))
            .ok();
        let action =
            match action {
                Action::SendEvent => {
                    let event_name = EventName::parse(fields.event_name)
                        .map_err(|why| check(names.event_name, why))
                        .ok();
                    let attributes = Attributes::parse(fields.attributes)
                        .map_err(|why| check("attributes", why))
                        .ok();
                    event_name.zip(attributes).map(|(event_name, attributes)| {
                        MessagingAction::SendEvent {
                            event_name,
                            attributes,
                        }
                    })
                }
                Action::DeleteMessage => {
                    let message_id = MessageId::parse(&fields.id)
                        .map_err(|why| check("id", why))
                        .ok();
                    let reason = optional_reason(fields.reason)
                        .map_err(|why| check("reason", why))
                        .ok();
                    message_id.zip(reason).map(|(message_id, reason)| {
                        MessagingAction::DeleteMessage { message_id, reason }
                    })
                }
                other => {
                    return Err(Error::Internal(format!("{other} is not a messaging call")));
                }
            };
        match (room, action) {
            (Some(room), Some(action)) if bad.is_empty() => Ok(MessagingRequest {
                caller,
                room,
                action,
            }),
            _ => Err(Error::InvalidArgument(bad)),
        }
    }

    /// The part of every messaging call that no door changes: refuses it when nothing can deliver it or
    /// when it did not validate, runs the stack (giving up at `deadline`), and audits the outcome.
    pub async fn decide(
        &self,
        action: Action,
        caller: &Caller,
        validated: Result<MessagingRequest, Error>,
        deadline: Option<CallDeadline>,
    ) -> Result<MessagingOutcome, Error> {
        let action = action.as_str();
        let refused = |error: Error| {
            tracing::info!(target: "audit", caller = %caller, action, outcome = error.outcome(), "messaging refused");
            error
        };
        // A deployment that cannot deliver says so whatever the request: fixing the request cannot help.
        let Some(stack) = &self.stack else {
            return Err(refused(Error::MessagingNotConfigured));
        };
        let request = validated.map_err(refused)?;
        // Who sent what kind of call to which room, and a hash of the message it is about: never attribute
        // values or the reason.
        let audit = tracing::info_span!(
            target: "audit",
            "audit",
            caller = %request.caller,
            caller_source = request.caller.source().map(CallerSource::name),
            room = %request.room,
            action,
            message_hash = request
                .action
                .message_id()
                .map(|id| tracing::field::display(short_hash(id.as_str()))),
            issuer = self.issuer,
        );
        // On a task of its own, as moderation: a message sent or deleted is audited even if the caller
        // goes away, and the work is still bounded by the call's deadline.
        let stack = stack.clone();
        let task = tokio::spawn(
            async move {
                let done = within(deadline, stack, request).await;
                audit.in_scope(|| match &done {
                    Ok(outcome) => tracing::info!(
                        target: "audit",
                        outcome = "done",
                        id_hash = %short_hash(&outcome.id),
                        "messaging done"
                    ),
                    Err(error) => {
                        tracing::info!(target: "audit", outcome = error.outcome(), "messaging refused")
                    }
                });
                done
            }
            .in_current_span(),
        );
        task.await
            .unwrap_or_else(|e| Err(Error::Internal(format!("messaging task failed: {e}"))))
    }
}
