//! What Cedar is asked about a request: the principal, the action, the resource and the action's context,
//! as the schema declares them.

use cedar_policy::{Context, RestrictedExpression};

use super::load::string;
use crate::domain::{
    Action, Caller, Capability, EndUser, Error, MessagingAction, MessagingRequest,
    ModerationAction, ModerationRequest, RoomArn, TokenRequest,
};

/// A request Cedar can decide: who asks to do what to which room, and the action's context.
pub trait Authorize {
    /// The principal.
    fn caller(&self) -> &Caller;
    /// The resource.
    fn room(&self) -> &RoomArn;
    /// The action, one of the schema's actions.
    fn action(&self) -> Action;
    /// The action's context, as the schema declares it: one list both for Cedar and for the decision
    /// cache's key, so the two cannot disagree about what a decision depends on.
    fn context(&self) -> Vec<(&'static str, ContextValue<'_>)>;
}

/// A value in a request's context, in the shapes the schema uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ContextValue<'a> {
    String(&'a str),
    Long(i64),
    Bool(bool),
    /// A set of strings.
    Strings(Vec<&'a str>),
    /// A record: its attributes, each name once.
    Record(Vec<(&'a str, ContextValue<'a>)>),
}

impl ContextValue<'_> {
    fn to_cedar(&self) -> Result<RestrictedExpression, Error> {
        Ok(match self {
            ContextValue::String(s) => string(s),
            ContextValue::Long(n) => RestrictedExpression::new_long(*n),
            ContextValue::Bool(b) => RestrictedExpression::new_bool(*b),
            ContextValue::Strings(items) => {
                RestrictedExpression::new_set(items.iter().map(|s| string(s)))
            }
            ContextValue::Record(fields) => RestrictedExpression::new_record(
                fields
                    .iter()
                    .map(|(name, value)| Ok(((*name).to_owned(), value.to_cedar()?)))
                    .collect::<Result<Vec<_>, Error>>()?,
            )
            .map_err(|e| Error::Internal(format!("policy context: {e}")))?,
        })
    }
}

/// `pairs` as a Cedar context.
pub(super) fn cedar_context<'a>(
    pairs: impl IntoIterator<Item = &'a (&'static str, ContextValue<'a>)>,
) -> Result<Context, Error> {
    Context::from_pairs(
        pairs
            .into_iter()
            .map(|(name, value)| Ok(((*name).to_owned(), value.to_cedar()?)))
            .collect::<Result<Vec<_>, Error>>()?,
    )
    .map_err(|e| Error::Internal(format!("policy context: {e}")))
}

impl Authorize for TokenRequest {
    fn caller(&self) -> &Caller {
        &self.caller
    }

    fn room(&self) -> &RoomArn {
        &self.room
    }

    fn action(&self) -> Action {
        Action::CreateChatToken
    }

    fn context(&self) -> Vec<(&'static str, ContextValue<'_>)> {
        vec![
            (
                "capabilities",
                ContextValue::Strings(self.capabilities.iter().map(Capability::ivs_name).collect()),
            ),
            (
                "sessionDurationInMinutes",
                ContextValue::Long(self.session_duration().minutes().into()),
            ),
            ("userId", ContextValue::String(self.user_id.expose())),
            (
                "attributeKeys",
                ContextValue::Strings(self.attributes.keys().collect()),
            ),
            (
                "attributesBytes",
                ContextValue::Long(self.attributes.byte_size() as i64),
            ),
            ("end_user", end_user(self.end_user.as_ref())),
        ]
    }
}

/// `context.end_user`: whether an end-user token bound the request, its issuer and subject (empty when
/// none did), and the claims policies may see; claims the token lacks are absent (policies test them with
/// `has`).
fn end_user(user: Option<&EndUser>) -> ContextValue<'_> {
    ContextValue::Record(vec![
        ("verified", ContextValue::Bool(user.is_some())),
        (
            "issuer",
            ContextValue::String(user.map_or("", |u| u.issuer.as_str())),
        ),
        (
            "subject",
            ContextValue::String(user.map_or("", |u| u.subject.as_str())),
        ),
        (
            "claims",
            ContextValue::Record(
                user.into_iter()
                    .flat_map(|u| &u.claims)
                    .map(|(name, values)| {
                        (
                            name.as_str(),
                            ContextValue::Strings(values.iter().map(String::as_str).collect()),
                        )
                    })
                    .collect(),
            ),
        ),
    ])
}

impl Authorize for ModerationRequest {
    fn caller(&self) -> &Caller {
        &self.caller
    }

    fn room(&self) -> &RoomArn {
        &self.room
    }

    fn action(&self) -> Action {
        self.action.action()
    }

    fn context(&self) -> Vec<(&'static str, ContextValue<'_>)> {
        let mut context: Vec<(&'static str, ContextValue<'_>)> = self
            .action
            .user_id()
            .map(|user| ("userId", ContextValue::String(user.expose())))
            .into_iter()
            .collect();
        if let ModerationAction::Ban { duration, .. } = &self.action {
            let seconds = duration.map_or(0, |d| d.as_secs());
            context.push((
                "durationSeconds",
                ContextValue::Long(i64::try_from(seconds).unwrap_or(i64::MAX)),
            ));
        }
        context
    }
}

impl Authorize for MessagingRequest {
    fn caller(&self) -> &Caller {
        &self.caller
    }

    fn room(&self) -> &RoomArn {
        &self.room
    }

    fn action(&self) -> Action {
        self.action.action()
    }

    fn context(&self) -> Vec<(&'static str, ContextValue<'_>)> {
        match &self.action {
            // Attribute values and the message id are not shown: values are the application's data, and an
            // id IVS made up says nothing a policy could decide on.
            MessagingAction::SendEvent {
                event_name,
                attributes,
            } => vec![
                ("eventName", ContextValue::String(event_name.as_str())),
                (
                    "attributeKeys",
                    ContextValue::Strings(attributes.keys().collect()),
                ),
                (
                    "attributesBytes",
                    ContextValue::Long(attributes.byte_size() as i64),
                ),
            ],
            MessagingAction::DeleteMessage { reason, .. } => vec![(
                "reasonLength",
                ContextValue::Long(reason.as_ref().map_or(0, |r| r.expose().chars().count()) as i64),
            )],
        }
    }
}
