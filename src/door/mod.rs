//! The front doors: gRPC ([`grpc`]) and IVS Chat's REST-JSON API ([`rest`]), thin translations of their
//! wire formats around what both share here.
//!
//! Every call, whichever door carried it, takes the same path: identify the caller (one
//! [`Resolver`]), validate the request into a domain type (each door naming fields its own way), for
//! CreateChatToken verify the end user's own token when the caller forwards one and bind the request to
//! that user ([`Door::bind`]), run it through the domain stack within the caller's deadline, and write one
//! audit event. So the same request
//! gets the same decision and the same audit event through either door, and refusals are rendered from one
//! table ([`crate::rescue`]).

pub mod grpc;
pub mod messaging;
pub mod rest;

use std::{
    fmt,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Duration,
};

use futures_util::{FutureExt, future::Either};
use pin_project_lite::pin_project;
use tower::{Service, ServiceExt};
use tracing::Instrument;

use crate::domain::moderation::{
    DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, MAX_TOKEN_BYTES, MIN_BAN, VERIFY_NEEDS_LOCAL_ISSUER,
};
use crate::domain::{
    Action, Caller, CallerSource, Error, FieldNames, FieldViolation, IssuedToken, ModerationAction,
    ModerationOutcome, ModerationRequest, PageToken, Reason, RoomArn, TokenRejection, TokenRequest,
    UserId,
};
use crate::identity::{Resolver, end_user};
use crate::issuer::local::LiveKeys;
use crate::rescue::{IvsError, rescue};
use crate::stack::{ModerationStack, TokenStack};
use crate::transport::deadline::CallDeadline;

pub use messaging::{MessagingDoor, MessagingNames, UncheckedMessage};

/// CreateChatToken as every door serves it: one identity resolver, one token stack, one audit trail.
#[derive(Clone)]
pub struct Door {
    /// Who is calling.
    identity: Resolver,
    /// The end user behind the call, from the token the caller forwards.
    end_user: Arc<end_user::Verifier>,
    /// The issuer's name, for audit events.
    issuer: &'static str,
    /// Policy, scope, bans, limits, issuer.
    stack: TokenStack,
}

impl Door {
    /// A door that identifies callers with `identity` and their end users with `end_user`, and sends
    /// every valid request through `stack`, whose issuer is called `issuer` in audit events.
    pub fn new(
        identity: Resolver,
        end_user: Arc<end_user::Verifier>,
        issuer: &'static str,
        stack: TokenStack,
    ) -> Self {
        Door {
            identity,
            end_user,
            issuer,
            stack,
        }
    }

    /// Who is calling.
    pub fn identity(&self) -> &Resolver {
        &self.identity
    }

    /// Binds `request` to the end user the token in `headers` proves, when the caller forwarded one (the
    /// request's user must be that user); a request without one goes on unbound, for policy to judge.
    /// Verifying gives up just before `deadline` as the stack does. Refusals are audited here.
    pub async fn bind(
        &self,
        request: TokenRequest,
        headers: &http::HeaderMap,
        names: &FieldNames,
        deadline: Option<CallDeadline>,
    ) -> Result<TokenRequest, Error> {
        let resolved = match deadline {
            Some(deadline) => tokio::time::timeout_at(
                deadline
                    .at
                    .checked_sub(DEADLINE_MARGIN)
                    .unwrap_or(deadline.at),
                self.end_user.resolve(headers),
            )
            .await
            .unwrap_or_else(|_| Err(deadline.error())),
            None => self.end_user.resolve(headers).await,
        };
        let caller = request.caller.clone();
        let bound = match resolved {
            Ok(Some(end_user)) => request.bind(end_user, names),
            Ok(None) => Ok(request),
            Err(error) => Err(error),
        };
        bound.map_err(|error| self.refuse(Some(&caller), error))
    }

    /// Records the refusal of a request that never became a [`TokenRequest`] (no identity, or invalid),
    /// and hands the error back.
    pub fn refuse(&self, caller: Option<&Caller>, error: Error) -> Error {
        match caller {
            Some(caller) => {
                tracing::info!(target: "audit", caller = %caller, outcome = error.outcome(), "token refused")
            }
            None => tracing::info!(target: "audit", outcome = error.outcome(), "token refused"),
        }
        error
    }

    /// Sends `request` through the token stack and records the decision. With a `deadline`, gives up just
    /// before it with the deadline's error, cancelling any upstream call in flight.
    ///
    /// A future of its own rather than an `async fn`, which would keep the request twice in every call's
    /// future (its argument, and the call it moved into).
    pub fn issue(
        &self,
        request: TokenRequest,
        deadline: Option<CallDeadline>,
    ) -> impl Future<Output = Result<IssuedToken, Error>> + use<> {
        // What the decision was about: never the user id or attribute values.
        let audit = tracing::info_span!(
            target: "audit",
            "audit",
            caller = %request.caller,
            caller_source = request.caller.source().map(CallerSource::name),
            room = %request.room,
            capabilities = ?request.capabilities.ivs_names(),
            session_minutes = request.session_duration().minutes(),
            issuer = self.issuer,
            // Whether the user was proven by their own token, and by whom: never the token or its claims.
            end_user_bound = request.end_user.is_some(),
            end_user_issuer = request.end_user.as_ref().map(|user| user.issuer.as_str()),
        );
        Audited {
            call: within(deadline, self.stack.clone(), request),
            audit,
        }
    }
}

pin_project! {
    /// [`Door::issue`]'s future: the call, then its audit line in the `audit` span.
    struct Audited<F> {
        #[pin]
        call: F,
        audit: tracing::Span,
    }
}

impl<F: Future<Output = Result<IssuedToken, Error>>> Future for Audited<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let issued = ready!(this.call.poll(cx));
        this.audit.in_scope(|| match &issued {
            Ok(token) => tracing::info!(
                target: "audit",
                outcome = "issued",
                token_id_hash = %short_hash(token.token_id.as_deref().unwrap_or(&token.token)),
                "token issued"
            ),
            Err(error) => {
                tracing::info!(target: "audit", outcome = error.outcome(), "token refused")
            }
        });
        Poll::Ready(issued)
    }
}

/// The moderation calls as every door serves them: the same identity resolver as tokens, the moderation
/// stack, one audit trail.
#[derive(Clone)]
pub struct ModerationDoor {
    /// Who is calling.
    identity: Resolver,
    /// The issuer's name, for audit events.
    issuer: &'static str,
    /// Policy, limits, the moderator and the ban store.
    stack: ModerationStack,
    /// The local issuer's keys, which open tokens for VerifyChatToken; `None` with the ivs issuer.
    verifier: Option<LiveKeys>,
    /// Longest ban accepted with a duration (`moderation.max_ban_duration`).
    max_ban: Duration,
}

impl ModerationDoor {
    /// A door identifying callers with `identity`, opening tokens with `verifier`, refusing bans longer
    /// than `max_ban`, and sending every valid request through `stack`.
    pub fn new(
        identity: Resolver,
        issuer: &'static str,
        stack: ModerationStack,
        verifier: Option<LiveKeys>,
        max_ban: Duration,
    ) -> Self {
        ModerationDoor {
            identity,
            issuer,
            stack,
            verifier,
            max_ban,
        }
    }

    /// Who is calling.
    pub fn identity(&self) -> &Resolver {
        &self.identity
    }

    /// Records a call whose caller could not be identified, and hands the error back.
    pub fn unidentified(action: Action, error: Error) -> Error {
        tracing::info!(target: "audit", action = action.as_str(), outcome = error.outcome(), "moderation refused");
        error
    }

    /// The part of every moderation call that no door changes: refuses what did not validate, runs the
    /// stack (giving up at `deadline`), and audits the outcome.
    ///
    /// The stack and the audit line run on a task of their own: a caller that goes away (a cancelled
    /// call, a closed connection) cannot cut a ban between being stored and being audited, or leave a
    /// disconnect half done. The work is still bounded by the call's deadline.
    pub async fn decide(
        &self,
        action: Action,
        caller: &Caller,
        validated: Result<ModerationRequest, Error>,
        deadline: Option<CallDeadline>,
    ) -> Result<ModerationOutcome, Error> {
        let action = action.as_str();
        let request = validated.inspect_err(|error| {
            tracing::info!(target: "audit", caller = %caller, action, outcome = error.outcome(), "moderation refused");
        })?;
        // Who did what to which room, and a hash of whom: never the user id or the reason text.
        let audit = tracing::info_span!(
            target: "audit",
            "audit",
            caller = %request.caller,
            room = %request.room,
            action,
            user_hash = request
                .action
                .user_id()
                .map(|user| tracing::field::display(short_hash(user.expose()))),
            issuer = self.issuer,
        );
        let stack = self.stack.clone();
        let task = tokio::spawn(
            async move {
                let done = within(deadline, stack, request).await;
                audit.in_scope(|| match &done {
                    Ok(_) => tracing::info!(target: "audit", outcome = "done", "moderation done"),
                    Err(error) => {
                        tracing::info!(target: "audit", outcome = error.outcome(), "moderation refused")
                    }
                });
                done
            }
            .in_current_span(),
        );
        task.await
            .unwrap_or_else(|e| Err(Error::Internal(format!("moderation task failed: {e}"))))
    }

    /// VerifyChatToken's request for `token` from `caller`: the token opened with the local issuer's keys
    /// (its authentic claims, whatever their times), or why it did not open. Policy decides about the
    /// room it names, or [`RoomArn::UNOPENED_TOKEN`], before anything about the token is told; only an
    /// empty or oversized token is refused here.
    pub fn verify_request(&self, caller: Caller, token: &str) -> Result<ModerationRequest, Error> {
        let keys = self
            .verifier
            .as_ref()
            .ok_or(Error::Unsupported(VERIFY_NEEDS_LOCAL_ISSUER))?;
        if token.is_empty() {
            return Err(invalid("token", "is required".into()));
        }
        if token.len() > MAX_TOKEN_BYTES {
            return Err(invalid(
                "token",
                format!(
                    "must be at most {MAX_TOKEN_BYTES} bytes, got {}",
                    token.len()
                ),
            ));
        }
        let opened = keys
            .current()
            .open(token)
            .map(Box::new)
            .map_err(TokenRejection::from);
        let room = match &opened {
            Ok(claims) => claims.room.clone(),
            Err(_) => RoomArn::unopened_token(),
        };
        Ok(ModerationRequest {
            caller,
            room,
            action: ModerationAction::Verify { opened },
        })
    }

    /// A ban's length from whole `seconds` (and `nanos`, which must be 0): `None` (until unbanned) when
    /// absent, else between [`MIN_BAN`] and `moderation.max_ban_duration`.
    fn ban_duration(&self, duration: Option<(i64, i32)>) -> Result<Option<Duration>, String> {
        let Some((seconds, nanos)) = duration else {
            return Ok(None);
        };
        let max = self.max_ban;
        let out_of_range = || {
            format!(
                "must be whole seconds between {} and {} (moderation.max_ban_duration), or absent for a ban until unbanned",
                humantime::format_duration(MIN_BAN),
                humantime::format_duration(max)
            )
        };
        let seconds = u64::try_from(seconds)
            .ok()
            .filter(|_| nanos == 0)
            .ok_or_else(out_of_range)?;
        let duration = Duration::from_secs(seconds);
        (MIN_BAN..=max)
            .contains(&duration)
            .then_some(Some(duration))
            .ok_or_else(out_of_range)
    }
}

/// How much earlier than a call's deadline a door gives up, so its own answer (audited, in the door's
/// shape) is certain to come before the transport's (see [`crate::transport::deadline`]).
pub const DEADLINE_MARGIN: Duration = Duration::from_millis(5);

/// Runs `request` through `stack`, giving up [`DEADLINE_MARGIN`] before `deadline` with its error; dropping
/// the call cancels whatever it was waiting on (an upstream call, a store).
///
/// A combinator, not an `async fn`: an `async fn` would keep its arguments beside the call it moved them
/// into, a second copy of the request in every call's future.
fn within<S, R>(
    deadline: Option<CallDeadline>,
    stack: S,
    request: R,
) -> impl Future<Output = Result<S::Response, Error>>
where
    S: Service<R, Error = Error>,
{
    let call = stack.oneshot(request);
    match deadline {
        Some(deadline) => {
            let at = deadline
                .at
                .checked_sub(DEADLINE_MARGIN)
                .unwrap_or(deadline.at);
            Either::Left(
                tokio::time::timeout_at(at, call)
                    .map(move |outcome| outcome.unwrap_or_else(|_| Err(deadline.error()))),
            )
        }
        None => Either::Right(call),
    }
}

/// A domain error as a gRPC status, through the one table; internal faults are logged here, once, with
/// their detail (the caller sees none).
pub fn status(error: Error) -> tonic::Status {
    log_internal(&error);
    rescue(error).into_status()
}

/// A domain error in IVS Chat's shape, through the one table; internal faults are logged as [`status`]
/// logs them.
pub fn ivs_error(error: Error) -> IvsError {
    log_internal(&error);
    rescue(error).into_ivs()
}

fn log_internal(error: &Error) {
    if let Error::Internal(detail) = error {
        tracing::error!(error = %detail, "internal error");
    }
}

/// The first 12 hex digits of SHA-256: enough to correlate a token or user across logs, useless to a
/// thief.
pub(crate) fn short_hash(value: &str) -> ShortHash {
    let digest = ring::digest::digest(&ring::digest::SHA256, value.as_bytes());
    let mut digits = [0; 12];
    hex::encode_to_slice(&digest.as_ref()[..6], &mut digits).expect("12 digits hold 6 bytes");
    ShortHash(digits)
}

/// See [`short_hash`]: its digits, displayed without allocating.
pub(crate) struct ShortHash([u8; 12]);

impl fmt::Display for ShortHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(std::str::from_utf8(&self.0).expect("hex digits are ASCII"))
    }
}

fn invalid(field: &'static str, why: String) -> Error {
    Error::InvalidArgument(vec![FieldViolation::new(field, why)])
}

/// How a door names the fields of moderation requests in validation errors, so callers see their own
/// names.
pub struct ModerationNames {
    room_identifier: &'static str,
    user_id: &'static str,
    reason: &'static str,
}

impl ModerationNames {
    /// The proto field names, for gRPC callers.
    pub const PROTO: ModerationNames = ModerationNames {
        room_identifier: "room_identifier",
        user_id: "user_id",
        reason: "reason",
    };
    /// IVS Chat's own member names, for the REST-JSON API.
    pub const IVS: ModerationNames = ModerationNames {
        room_identifier: "roomIdentifier",
        user_id: "userId",
        reason: "reason",
    };
}

/// The fields of a moderation call as a door decoded them, before validation.
#[derive(Default)]
pub struct UncheckedModeration {
    /// `roomIdentifier`.
    pub room_identifier: String,
    /// `userId` (DisconnectUser, BanUser, UnbanUser).
    pub user_id: String,
    /// `reason` (DisconnectUser, BanUser).
    pub reason: String,
    /// A ban's length in whole seconds and nanoseconds; `None`: until unbanned.
    pub duration: Option<(i64, i32)>,
    /// ListBans' page size; 0: the default.
    pub page_size: i32,
    /// ListBans' page token; empty: the first page.
    pub page_token: String,
}

impl ModerationDoor {
    /// Validates the fields of `action` (not VerifyChatToken, whose token is opened instead) from `caller`,
    /// reporting every bad field at once under `names`.
    pub fn validate(
        &self,
        action: Action,
        caller: Caller,
        fields: UncheckedModeration,
        names: &ModerationNames,
    ) -> Result<ModerationRequest, Error> {
        let mut bad = Vec::new();
        let mut check = |field: &'static str, why: String| {
            bad.push(FieldViolation::new(field, why));
        };
        let room = RoomArn::parse(&fields.room_identifier)
            .map_err(|why| check(names.room_identifier, why))
            .ok();
        let about_a_user = !matches!(action, Action::ListBans);
        let user_id = about_a_user
            .then(|| UserId::parse(fields.user_id))
            .transpose()
            .map_err(|why| check(names.user_id, why))
            .ok()
            .flatten();
        let duration = matches!(action, Action::BanUser)
            .then(|| self.ban_duration(fields.duration))
            .transpose()
            .map_err(|why| check("duration", why))
            .ok()
            .flatten();
        let with_reason = matches!(action, Action::DisconnectUser | Action::BanUser);
        let reason = with_reason
            .then(|| Reason::parse(fields.reason))
            .transpose()
            .map_err(|why| check(names.reason, why))
            .ok()
            .flatten();
        let listing = matches!(action, Action::ListBans);
        let page_size = listing
            .then(|| page_size(fields.page_size))
            .transpose()
            .map_err(|why| check("page_size", why))
            .ok()
            .flatten();
        let after = (listing && !fields.page_token.is_empty())
            .then(|| PageToken::parse(&fields.page_token))
            .transpose()
            .map_err(|why| check("page_token", why));
        let action = match action {
            Action::DisconnectUser => user_id
                .zip(reason)
                .map(|(user_id, reason)| ModerationAction::Disconnect { user_id, reason }),
            Action::BanUser => match (user_id, duration, reason) {
                (Some(user_id), Some(duration), Some(reason)) => Some(ModerationAction::Ban {
                    user_id,
                    duration,
                    reason,
                }),
                _ => None,
            },
            Action::UnbanUser => user_id.map(|user_id| ModerationAction::Unban { user_id }),
            Action::ListBans => page_size
                .zip(after.ok())
                .map(|(page_size, after)| ModerationAction::ListBans { page_size, after }),
            Action::CreateChatToken
            | Action::VerifyChatToken
            | Action::SendEvent
            | Action::DeleteMessage => {
                return Err(Error::Internal(format!(
                    "{action} is not a moderation call with fields to validate"
                )));
            }
        };
        match (room, action) {
            (Some(room), Some(action)) if bad.is_empty() => Ok(ModerationRequest {
                caller,
                room,
                action,
            }),
            _ => Err(Error::InvalidArgument(bad)),
        }
    }
}

/// 0 → the default; otherwise 1 to [`MAX_PAGE_SIZE`].
fn page_size(requested: i32) -> Result<usize, String> {
    match usize::try_from(requested) {
        Ok(0) => Ok(DEFAULT_PAGE_SIZE),
        Ok(size @ 1..=MAX_PAGE_SIZE) => Ok(size),
        _ => Err(format!(
            "must be between 0 (the default, {DEFAULT_PAGE_SIZE}) and {MAX_PAGE_SIZE}, got {requested}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_size_bounds() {
        assert_eq!(page_size(0), Ok(DEFAULT_PAGE_SIZE));
        assert_eq!(page_size(1), Ok(1));
        assert_eq!(page_size(1000), Ok(1000));
        assert!(page_size(1001).is_err());
        assert!(page_size(-1).is_err());
    }

    #[test]
    fn short_hash_is_the_first_12_hex_digits_of_sha_256() {
        // SHA-256("abc") = ba7816bf8f01cfea…
        assert_eq!(short_hash("abc").to_string(), "ba7816bf8f01");
    }
}
