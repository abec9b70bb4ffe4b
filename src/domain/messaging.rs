//! Messaging's vocabulary: IVS Chat's server-side SendEvent and DeleteMessage, validated, and what they
//! answer.
//!
//! A game server announces "stream starting" or a score with SendEvent; a moderation bot removes a message
//! from every client's view with DeleteMessage. Both reach a room's clients through IVS Chat (issuer `ivs`)
//! or through a self-hosted chat server's webhook (issuer `local`). The limits are IVS Chat's own, from its
//! service model: an event name of 1 to 100 characters, attributes of at most 1 KiB, a message id of 12
//! letters and digits, a reason of at most 256 characters.

use std::fmt;

use super::action::Action;
use super::caller::Caller;
use super::moderation::Reason;
use super::room::RoomArn;
use super::token::Attributes;

/// Shortest event name IVS Chat's SendEvent accepts, in characters.
pub const MIN_EVENT_NAME_CHARS: usize = 1;
/// Longest event name IVS Chat's SendEvent accepts, in characters.
pub const MAX_EVENT_NAME_CHARS: usize = 100;
/// The length of IVS Chat's message ids (`MessageID`, and the `ID` SendEvent and DeleteMessage answer).
pub const MESSAGE_ID_CHARS: usize = 12;
/// Why SendEvent and DeleteMessage are refused when nothing can deliver them.
pub const MESSAGING_NOT_CONFIGURED: &str = "SendEvent and DeleteMessage need a chat backend, and the local \
     issuer has none: set messaging.webhook_url and messaging.signing_secret_file to have them delivered \
     to your chat server (see docs/messaging.md), or use issuer = \"ivs\"";

/// A SendEvent or DeleteMessage call that passed validation, from an identified caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessagingRequest {
    /// The internal service asking (a game server, a moderation bot).
    pub caller: Caller,
    /// The room whose clients get the event.
    pub room: RoomArn,
    /// What to send.
    pub action: MessagingAction,
}

/// What a messaging call sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MessagingAction {
    /// An application event for every client of the room.
    SendEvent {
        /// What the event is, for the clients' code.
        event_name: EventName,
        /// Application data sent with it; the values are the application's, never logged.
        attributes: Attributes,
    },
    /// Directs the room's clients to remove a message from view and history.
    DeleteMessage {
        /// The message, as IVS Chat named it to the clients.
        message_id: MessageId,
        /// Why, for the clients; absent when the request named none.
        reason: Option<Reason>,
    },
}

impl MessagingAction {
    /// The operation: the Cedar action and the audit / metric name of the call.
    pub fn action(&self) -> Action {
        match self {
            MessagingAction::SendEvent { .. } => Action::SendEvent,
            MessagingAction::DeleteMessage { .. } => Action::DeleteMessage,
        }
    }

    /// The message the call is about, if it is about one (DeleteMessage).
    pub fn message_id(&self) -> Option<&MessageId> {
        match self {
            MessagingAction::SendEvent { .. } => None,
            MessagingAction::DeleteMessage { message_id, .. } => Some(message_id),
        }
    }
}

/// What a messaging call did: the id the chat backend gave the event (SendEvent: the event message's id,
/// which a DeleteMessage can name; DeleteMessage: the id of the deletion event).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessagingOutcome {
    /// As the backend answered it.
    pub id: String,
}

/// An application-defined event name: 1 to 100 characters of any text, as IVS Chat's SendEvent requires.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct EventName(String);

impl EventName {
    /// Counts characters, not bytes, as IVS Chat does.
    pub fn parse(name: String) -> Result<Self, String> {
        match name.chars().count() {
            0 => Err("is required".into()),
            MIN_EVENT_NAME_CHARS..=MAX_EVENT_NAME_CHARS => Ok(EventName(name)),
            chars => Err(format!(
                "must be {MIN_EVENT_NAME_CHARS} to {MAX_EVENT_NAME_CHARS} characters, got {chars}"
            )),
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An IVS Chat message id: exactly 12 ASCII letters and digits (the model's `MessageID`, pattern
/// `[a-zA-Z0-9]+`). Not personal: IVS Chat makes it up; audit events still carry only a short hash of it,
/// as they do of a user.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct MessageId(String);

impl MessageId {
    /// Accepts exactly what IVS Chat's `MessageID` accepts.
    pub fn parse(id: &str) -> Result<Self, String> {
        if id.is_empty() {
            return Err("is required".into());
        }
        if id.len() == MESSAGE_ID_CHARS && id.bytes().all(|b| b.is_ascii_alphanumeric()) {
            Ok(MessageId(id.to_owned()))
        } else {
            Err(format!(
                "must be {MESSAGE_ID_CHARS} letters and digits (an IVS Chat message id)"
            ))
        }
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({})", self.0)
    }
}

/// DeleteMessage's reason: empty means none (proto3 cannot tell an empty string from an absent one, so the
/// HTTP API reads them alike too); otherwise 1 to 256 characters, as IVS Chat requires.
pub fn optional_reason(reason: String) -> Result<Option<Reason>, String> {
    if reason.is_empty() {
        Ok(None)
    } else {
        Reason::parse(reason).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_names_are_1_to_100_characters() {
        assert_eq!(EventName::parse(String::new()).unwrap_err(), "is required");
        assert_eq!(EventName::parse("e".into()).unwrap().as_str(), "e");
        assert!(
            EventName::parse("é".repeat(100)).is_ok(),
            "characters, not bytes"
        );
        assert_eq!(
            EventName::parse("e".repeat(101)).unwrap_err(),
            "must be 1 to 100 characters, got 101"
        );
    }

    #[test]
    fn message_ids_are_12_letters_and_digits() {
        assert_eq!(
            MessageId::parse("AbCdEf123456").unwrap().as_str(),
            "AbCdEf123456"
        );
        for bad in [
            "AbCdEf12345",
            "AbCdEf1234567",
            "AbCdEf12345-",
            "AbCdEf12345é",
            "ÀbCdEf12345",
        ] {
            assert!(MessageId::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(MessageId::parse("").unwrap_err(), "is required");
    }

    #[test]
    fn a_reason_is_optional_and_at_most_256_characters() {
        assert_eq!(optional_reason(String::new()), Ok(None));
        assert!(optional_reason("r".repeat(256)).unwrap().is_some());
        assert!(optional_reason("r".repeat(257)).is_err());
    }
}
