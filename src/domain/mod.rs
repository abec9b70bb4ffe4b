//! The vocabulary every other module speaks: who calls ([`Caller`]), about which room ([`RoomArn`]), asking
//! for what ([`Action`], [`TokenRequest`], [`ModerationRequest`], [`MessagingRequest`]), under which rules
//! ([`Limit`]), and why it was refused ([`Error`]).
//!
//! This is the bottom layer: it imports nothing else of the crate, and no wire format (tonic, prost, http),
//! store (redis), upstream (aws), policy engine (cedar) or runtime (tokio), so every type here can be used
//! and tested without any of them.

pub mod action;
pub mod caller;
pub mod end_user;
pub mod error;
pub mod limit;
pub mod messaging;
pub mod moderation;
pub mod room;
pub mod secret;
pub mod token;
pub mod user;

pub use action::{Action, IVS_SIGNING_NAME};
pub use caller::{Caller, CallerSource};
pub use end_user::EndUser;
pub use error::{
    EndUserRejection, Error, ExceededLimit, FieldViolation, Overload, TimeLimit, TokenRejection,
    UpstreamKind,
};
pub use limit::{
    DELETE_MESSAGE_QUOTA_LIMIT_NAME, DISCONNECT_QUOTA_LIMIT_NAME, IVS_QUOTA_LIMIT_NAME, Limit,
    LimitKey, Rate, SEND_EVENT_QUOTA_LIMIT_NAME,
};
pub use messaging::{EventName, MessageId, MessagingAction, MessagingOutcome, MessagingRequest};
pub use moderation::{
    Ban, BanPage, ModerationAction, ModerationOutcome, ModerationRequest, PageToken, Reason,
};
pub use room::{AccountId, MAX_ROOM_ARN_CHARS, Region, RoomArn, ServedRooms};
pub use secret::Secret;
pub use token::{
    Attributes, Capabilities, Capability, FieldNames, IssuedToken, SessionDuration, TokenClaims,
    TokenRequest, UncheckedRequest, UserId,
};
