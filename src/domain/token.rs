//! A token request validated into domain types, the token that answers it, and what a verified token
//! grants.
//!
//! A front door decodes its wire format into an [`UncheckedRequest`], which [`TokenRequest::validate`]
//! turns into a [`TokenRequest`] whose fields can only hold values IVS Chat would accept. Everything
//! downstream (policy, rate limits, issuers) takes these types and never re-checks them. Validation
//! reports every bad field of a request at once, each named as the front door that carried it names it
//! (proto field names for gRPC, IVS member names for the HTTP API).
//!
//! User ids and attribute values are personal data: their `Debug` output shows only their size, so a
//! stray `?request` in a log line cannot leak them.

use std::{
    collections::BTreeMap,
    collections::BTreeSet,
    fmt,
    time::{Duration, SystemTime},
};

use super::caller::Caller;
use super::end_user::EndUser;
use super::error::{Error, FieldViolation};
use super::room::RoomArn;
pub use super::user::{MAX_USER_ID_CHARS, UserId};

/// Shortest session IVS Chat accepts, in minutes.
pub const MIN_SESSION_MINUTES: u32 = 1;
/// Longest session IVS Chat accepts, in minutes.
pub const MAX_SESSION_MINUTES: u32 = 180;
/// Session length IVS Chat applies when the request names none, in minutes.
pub const DEFAULT_SESSION_MINUTES: u32 = 60;
/// Most bytes all attribute keys and values may take together.
pub const MAX_ATTRIBUTES_BYTES: usize = 1024;

/// A request that passed IVS Chat's validation rules, from an identified caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRequest {
    /// The internal service asking for the token (not the end user).
    pub caller: Caller,
    /// The room the token opens.
    pub room: RoomArn,
    /// The end user the token is for.
    pub user_id: UserId,
    /// What the user may do besides reading.
    pub capabilities: Capabilities,
    /// Absent when the caller named no duration: IVS then applies its own default, and the local issuer
    /// applies the same one through [`TokenRequest::session_duration`].
    pub session_duration: Option<SessionDuration>,
    /// Application data attached to the session.
    pub attributes: Attributes,
    /// The end user the caller proved with the user's own identity token ([`TokenRequest::bind`]); `None`
    /// when the caller forwarded none.
    pub end_user: Option<EndUser>,
}

/// What a front door decoded, before validation. Capabilities arrive already decoded, because each door
/// spells them differently (proto enum numbers, IVS names).
pub struct UncheckedRequest {
    /// `roomIdentifier`.
    pub room_identifier: String,
    /// `userId`.
    pub user_id: String,
    /// `capabilities`, or why they cannot be decoded.
    pub capabilities: Result<Capabilities, String>,
    /// `sessionDurationInMinutes`.
    pub session_duration_in_minutes: Option<i64>,
    /// `attributes`.
    pub attributes: Vec<(String, String)>,
}

/// How a front door names the request's fields in validation errors, so callers see their own names.
pub struct FieldNames {
    room_identifier: &'static str,
    user_id: &'static str,
    capabilities: &'static str,
    session_duration_in_minutes: &'static str,
    attributes: &'static str,
}

impl FieldNames {
    /// The proto field names, for gRPC callers.
    pub const PROTO: FieldNames = FieldNames {
        room_identifier: "room_identifier",
        user_id: "user_id",
        capabilities: "capabilities",
        session_duration_in_minutes: "session_duration_in_minutes",
        attributes: "attributes",
    };
    /// IVS Chat's own member names, for the REST-JSON API (ValidationException `fieldList`).
    pub const IVS: FieldNames = FieldNames {
        room_identifier: "roomIdentifier",
        user_id: "userId",
        capabilities: "capabilities",
        session_duration_in_minutes: "sessionDurationInMinutes",
        attributes: "attributes",
    };
}

impl TokenRequest {
    /// Validates `request` from `caller`, reporting every bad field at once under `names`.
    pub fn validate(
        caller: Caller,
        request: UncheckedRequest,
        names: &FieldNames,
    ) -> Result<Self, Error> {
        let mut violations = Vec::new();
        let room = RoomArn::parse(&request.room_identifier)
            .map_err(|why| violations.push(FieldViolation::new(names.room_identifier, why)))
            .ok();
        let user_id = UserId::parse(request.user_id)
            .map_err(|why| violations.push(FieldViolation::new(names.user_id, why)))
            .ok();
        let capabilities = request
            .capabilities
            .map_err(|why| violations.push(FieldViolation::new(names.capabilities, why)))
            .ok();
        let session_duration = request
            .session_duration_in_minutes
            .map(SessionDuration::from_minutes)
            .transpose()
            .map_err(|why| {
                violations.push(FieldViolation::new(names.session_duration_in_minutes, why))
            })
            .ok();
        let attributes = Attributes::parse(request.attributes)
            .map_err(|why| violations.push(FieldViolation::new(names.attributes, why)))
            .ok();

        match (room, user_id, capabilities, session_duration, attributes) {
            (
                Some(room),
                Some(user_id),
                Some(capabilities),
                Some(session_duration),
                Some(attributes),
            ) if violations.is_empty() => Ok(TokenRequest {
                caller,
                room,
                user_id,
                capabilities,
                session_duration,
                attributes,
                end_user: None,
            }),
            _ => Err(Error::InvalidArgument(violations)),
        }
    }

    /// Binds this request to `end_user`, proven by their own identity token: the request must be for that
    /// user ([`Error::EndUserMismatch`] otherwise), and the token attributes taken from the user's claims
    /// replace what the caller sent for the same keys, within the same limits (reported under
    /// `attributes`, named as `names` name it). Kept beside validation: it is the same kind of rule, and
    /// both doors apply it the same way.
    pub fn bind(mut self, end_user: EndUser, names: &FieldNames) -> Result<Self, Error> {
        if end_user.user_id != self.user_id {
            return Err(Error::EndUserMismatch);
        }
        if !end_user.attributes.is_empty() {
            let mut merged = self.attributes.0.clone();
            merged.extend(end_user.attributes.iter().cloned());
            self.attributes = Attributes::parse(merged).map_err(|why| {
                Error::InvalidArgument(vec![FieldViolation::new(
                    names.attributes,
                    format!("with the attributes taken from the end user's token: {why}"),
                )])
            })?;
        }
        self.end_user = Some(end_user);
        Ok(self)
    }

    /// The session length that applies: the requested one, or IVS Chat's default of 60 minutes.
    pub fn session_duration(&self) -> SessionDuration {
        self.session_duration
            .unwrap_or(SessionDuration(DEFAULT_SESSION_MINUTES))
    }
}

/// A token and when it, and the session it opens, expire.
#[derive(Clone, PartialEq, Eq)]
pub struct IssuedToken {
    /// The encrypted token. A bearer secret: never log it.
    pub token: String,
    /// The token's unique id, when the issuer knows it (the local issuer's `jti`); audit events carry a
    /// short hash of it.
    pub token_id: Option<String>,
    /// After this instant the token can no longer open a connection.
    pub token_expires_at: SystemTime,
    /// After this instant a session opened with the token ends.
    pub session_expires_at: SystemTime,
    /// Where the user's chat client connects with the token: for IVS Chat the room's region's messaging
    /// endpoint (`wss://edge.ivschat.REGION.amazonaws.com`), for the local issuer the configured chat
    /// server; `None` when the issuer knows none.
    pub chat_endpoint: Option<String>,
}

impl fmt::Debug for IssuedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedToken")
            .field("token", &format_args!("<{} bytes>", self.token.len()))
            .field("token_expires_at", &self.token_expires_at)
            .field("session_expires_at", &self.session_expires_at)
            .field("chat_endpoint", &self.chat_endpoint)
            .finish()
    }
}

/// What a verified local-issuer token grants.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenClaims {
    /// Unique per token (`jti`), for replay detection and audit.
    pub token_id: String,
    /// The room the token opens.
    pub room: RoomArn,
    /// The end user the token is for.
    pub user_id: UserId,
    /// What the user may do besides reading.
    pub capabilities: Capabilities,
    /// Application data for the session.
    pub attributes: Attributes,
    /// When the token was minted.
    pub issued_at: SystemTime,
    /// After this instant the token no longer opens a connection.
    pub token_expires_at: SystemTime,
    /// After this instant a session opened with the token ends.
    pub session_expires_at: SystemTime,
}

/// Something a user may do in a room beyond reading messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Capability {
    /// Send messages.
    SendMessage,
    /// Disconnect other users (moderation).
    DisconnectUser,
    /// Delete messages (moderation).
    DeleteMessage,
}

impl Capability {
    /// All capabilities, in IVS's order.
    pub const ALL: [Capability; 3] = [
        Capability::SendMessage,
        Capability::DisconnectUser,
        Capability::DeleteMessage,
    ];

    /// The name IVS Chat uses on the wire and in tokens.
    pub fn ivs_name(self) -> &'static str {
        match self {
            Capability::SendMessage => "SEND_MESSAGE",
            Capability::DisconnectUser => "DISCONNECT_USER",
            Capability::DeleteMessage => "DELETE_MESSAGE",
        }
    }

    /// The inverse of [`Capability::ivs_name`].
    pub fn from_ivs_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.ivs_name() == name)
    }
}

/// A set of capabilities: repeats in the request collapse to one.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Capabilities(BTreeSet<Capability>);

impl Capabilities {
    /// Builds a set from capabilities already known to be valid.
    pub fn new(capabilities: impl IntoIterator<Item = Capability>) -> Self {
        Capabilities(capabilities.into_iter().collect())
    }

    /// Accepts IVS's names (`SEND_MESSAGE`, …), naming each offending position.
    pub fn from_ivs_names(names: &[String]) -> Result<Self, String> {
        let mut set = BTreeSet::new();
        let mut bad = Vec::new();
        for (index, name) in names.iter().enumerate() {
            match Capability::from_ivs_name(name) {
                Some(capability) => {
                    set.insert(capability);
                }
                None => bad.push(format!("[{index}]")),
            }
        }
        if bad.is_empty() {
            Ok(Capabilities(set))
        } else {
            Err(format!(
                "each capability must be SEND_MESSAGE, DISCONNECT_USER or DELETE_MESSAGE; invalid: {}",
                bad.join(", ")
            ))
        }
    }

    /// The capabilities in IVS's order, each once.
    pub fn iter(&self) -> impl Iterator<Item = Capability> + '_ {
        self.0.iter().copied()
    }

    /// The set as IVS Chat names it, for logs: debug-formats as `["SEND_MESSAGE", …]`, allocating nothing.
    pub fn ivs_names(&self) -> impl fmt::Debug + '_ {
        struct IvsNames<'a>(&'a Capabilities);
        impl fmt::Debug for IvsNames<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_list()
                    .entries(self.0.iter().map(Capability::ivs_name))
                    .finish()
            }
        }
        IvsNames(self)
    }

    /// Whether the set grants `capability`.
    pub fn contains(&self, capability: Capability) -> bool {
        self.0.contains(&capability)
    }

    /// Whether the set grants nothing beyond reading.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A session length between 1 and 180 minutes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SessionDuration(u32);

impl SessionDuration {
    /// Accepts 1..=180.
    pub fn from_minutes(minutes: i64) -> Result<Self, String> {
        match u32::try_from(minutes) {
            Ok(m @ MIN_SESSION_MINUTES..=MAX_SESSION_MINUTES) => Ok(SessionDuration(m)),
            _ => Err(format!(
                "must be between {MIN_SESSION_MINUTES} and {MAX_SESSION_MINUTES} minutes, got {minutes}"
            )),
        }
    }

    /// The length in minutes.
    pub fn minutes(self) -> u32 {
        self.0
    }

    /// The length as a duration.
    pub fn as_duration(self) -> Duration {
        Duration::from_secs(u64::from(self.0) * 60)
    }
}

/// Application attributes: at most 1024 bytes of keys and values together. Values are personal data.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Attributes(BTreeMap<String, String>);

impl Attributes {
    /// Accepts maps whose keys plus values take at most 1024 bytes of UTF-8.
    pub fn parse(attributes: impl IntoIterator<Item = (String, String)>) -> Result<Self, String> {
        let map: BTreeMap<String, String> = attributes.into_iter().collect();
        let bytes = byte_size(&map);
        if bytes > MAX_ATTRIBUTES_BYTES {
            return Err(format!(
                "keys and values together must be at most {MAX_ATTRIBUTES_BYTES} bytes, got {bytes}"
            ));
        }
        Ok(Attributes(map))
    }

    /// Total bytes of keys plus values.
    pub fn byte_size(&self) -> usize {
        byte_size(&self.0)
    }

    /// The keys, sorted. Keys are not secret; values are.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }

    /// The attributes themselves. Do not log the values.
    pub fn expose(&self) -> &BTreeMap<String, String> {
        &self.0
    }

    /// Whether there are no attributes.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn byte_size(map: &BTreeMap<String, String>) -> usize {
    map.iter().map(|(k, v)| k.len() + v.len()).sum()
}

impl fmt::Debug for Attributes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Attributes")
            .field("keys", &self.0.keys().collect::<Vec<_>>())
            .field("bytes", &self.byte_size())
            .finish()
    }
}

/// The one builder of [`TokenRequest`]s for unit tests: a valid request from caller `test` for
/// `user-1` in a us-west-2 room, each part replaceable.
#[cfg(test)]
pub(crate) fn test_request() -> TestRequest {
    TestRequest {
        caller: Caller::new("test"),
        request: UncheckedRequest {
            room_identifier: "arn:aws:ivschat:us-west-2:123456789012:room/g1H2I3j4k5L6".into(),
            user_id: "user-1".into(),
            capabilities: Ok(Capabilities::default()),
            session_duration_in_minutes: None,
            attributes: Vec::new(),
        },
    }
}

/// See [`test_request`].
#[cfg(test)]
pub(crate) struct TestRequest {
    caller: Caller,
    request: UncheckedRequest,
}

#[cfg(test)]
impl TestRequest {
    pub(crate) fn caller(mut self, caller: &str) -> Self {
        self.caller = Caller::new(caller);
        self
    }

    pub(crate) fn room(mut self, arn: &str) -> Self {
        self.request.room_identifier = arn.into();
        self
    }

    pub(crate) fn user(mut self, user_id: &str) -> Self {
        self.request.user_id = user_id.into();
        self
    }

    pub(crate) fn capabilities(mut self, capabilities: &[Capability]) -> Self {
        self.request.capabilities = Ok(Capabilities::new(capabilities.iter().copied()));
        self
    }

    pub(crate) fn session_minutes(mut self, minutes: i64) -> Self {
        self.request.session_duration_in_minutes = Some(minutes);
        self
    }

    pub(crate) fn attribute(mut self, key: &str, value: &str) -> Self {
        self.request.attributes.push((key.into(), value.into()));
        self
    }

    /// The validated request; panics when the parts given are invalid.
    pub(crate) fn build(self) -> TokenRequest {
        TokenRequest::validate(self.caller, self.request, &FieldNames::PROTO)
            .expect("a valid test request")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_debug_hides_values() {
        let attrs = Attributes::parse([("name".into(), "Alice Secret".into())]).unwrap();
        let shown = format!("{attrs:?}");
        assert!(!shown.contains("Alice"), "{shown}");
        assert!(shown.contains("name"), "{shown}");
    }

    #[test]
    fn session_duration_bounds() {
        assert!(SessionDuration::from_minutes(0).is_err());
        assert!(SessionDuration::from_minutes(-1).is_err());
        assert_eq!(SessionDuration::from_minutes(1).unwrap().minutes(), 1);
        assert_eq!(SessionDuration::from_minutes(180).unwrap().minutes(), 180);
        assert!(SessionDuration::from_minutes(181).is_err());
        assert!(SessionDuration::from_minutes(i64::MIN).is_err());
    }

    #[test]
    fn every_bad_field_is_reported_at_once_under_the_doors_names() {
        let unchecked = || UncheckedRequest {
            room_identifier: "nope".into(),
            user_id: String::new(),
            capabilities: Err("bad".into()),
            session_duration_in_minutes: Some(0),
            attributes: vec![("k".to_string(), "v".repeat(1024))],
        };
        for (names, expected) in [
            (
                &FieldNames::PROTO,
                [
                    "room_identifier",
                    "user_id",
                    "capabilities",
                    "session_duration_in_minutes",
                    "attributes",
                ],
            ),
            (
                &FieldNames::IVS,
                [
                    "roomIdentifier",
                    "userId",
                    "capabilities",
                    "sessionDurationInMinutes",
                    "attributes",
                ],
            ),
        ] {
            let err = TokenRequest::validate(Caller::new("test"), unchecked(), names).unwrap_err();
            let Error::InvalidArgument(violations) = err else {
                panic!("expected InvalidArgument, got {err:?}");
            };
            let fields: Vec<_> = violations.iter().map(|v| v.field.as_ref()).collect();
            assert_eq!(fields, expected);
        }
    }

    #[test]
    fn capabilities_from_ivs_names_name_each_bad_position() {
        let names = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        assert_eq!(
            Capabilities::from_ivs_names(&names(&["SEND_MESSAGE", "SEND_MESSAGE"])),
            Ok(Capabilities::new([Capability::SendMessage]))
        );
        let reason =
            Capabilities::from_ivs_names(&names(&["SEND_MESSAGE", "FLY", "x"])).unwrap_err();
        assert!(reason.ends_with("invalid: [1], [2]"), "{reason}");
    }
}
