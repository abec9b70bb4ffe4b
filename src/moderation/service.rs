//! The gRPC handler of `ivschat.v1.ModerationService`: proto in, moderation stack, proto out.
//!
//! Every call is identified with the same [`Resolver`] as CreateChatToken, validated into a
//! [`ModerationRequest`] (INVALID_ARGUMENT naming every bad field), sent through the moderation stack
//! within the caller's deadline, and audited: caller, room, action, a short hash of the user id, outcome.
//!
//! VerifyChatToken opens the token here, before the stack: its room is what policy decides about, and only
//! an authentic token names one. Opening is stateless (decrypt, authenticate, check the expiry); revocation
//! and single use are checked by the moderator, after policy and rate limits.

use std::time::Duration;

use tonic::{Request, Response, Status};
use tower::ServiceExt;

use crate::domain::moderation::{DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, MAX_TOKEN_BYTES, MIN_BAN};
use crate::domain::{
    Ban, Caller, Error, FieldViolation, ModerationAction, ModerationOutcome, ModerationRequest,
    PageToken, Reason, RoomArn, TokenClaims, TokenRejection, UserId,
};
use crate::identity::Resolver;
use crate::issuer::ivs::IVS_VERIFIES_ITS_TOKENS;
use crate::issuer::local::LiveKeys;
use crate::proto::ivschat::v1::{
    self as pb, BanUserRequest, BanUserResponse, DisconnectUserRequest, DisconnectUserResponse,
    ListBansRequest, ListBansResponse, UnbanUserRequest, UnbanUserResponse, VerifyChatTokenRequest,
    VerifyChatTokenResponse, moderation_service_server,
};
use crate::service::{DEADLINE_MARGIN, grpc_timeout, short_hash};
use crate::stack::ModerationStack;
use crate::transport::{inflight::CallStarted, listener::peer_certs};

/// Serves `ivschat.v1.ModerationService` on top of the moderation stack.
#[derive(Clone)]
pub struct ModerationGrpc {
    identity: Resolver,
    /// The issuer's name, for audit events.
    issuer: &'static str,
    stack: ModerationStack,
    /// The local issuer's keys, which open tokens for VerifyChatToken; `None` with the ivs issuer.
    verifier: Option<LiveKeys>,
    /// Longest ban accepted with a duration (`moderation.max_ban_duration`).
    max_ban: Duration,
}

impl ModerationGrpc {
    /// A handler identifying callers with `identity`, opening tokens with `verifier`, refusing bans longer
    /// than `max_ban`, and sending every valid request through `stack`.
    pub fn new(
        identity: Resolver,
        issuer: &'static str,
        stack: ModerationStack,
        verifier: Option<LiveKeys>,
        max_ban: Duration,
    ) -> Self {
        ModerationGrpc {
            identity,
            issuer,
            stack,
            verifier,
            max_ban,
        }
    }

    /// Identifies the caller, validates with `validate`, runs the stack within the caller's deadline, and
    /// audits the outcome.
    async fn moderate<T>(
        &self,
        action: &'static str,
        request: Request<T>,
        validate: impl FnOnce(&Self, Caller, T) -> Result<ModerationRequest, Error>,
    ) -> Result<ModerationOutcome, Status> {
        let caller = self
            .identity
            .resolve(
                request.metadata().as_ref(),
                peer_certs(request.extensions()),
            )
            .map_err(|error| Self::unidentified(action, error))?;
        let deadline = grpc_timeout(request.metadata()).map(|timeout| {
            let started = request
                .extensions()
                .get::<CallStarted>()
                .map_or_else(tokio::time::Instant::now, |started| started.0);
            started + timeout.saturating_sub(DEADLINE_MARGIN)
        });
        let validated = validate(self, caller.clone(), request.into_inner());
        Ok(self.decide(action, &caller, validated, deadline).await?)
    }

    /// The resolver that identifies callers, for front doors other than gRPC.
    pub(crate) fn identity(&self) -> &Resolver {
        &self.identity
    }

    /// Records a call whose caller could not be identified, and hands the error back.
    pub(crate) fn unidentified(action: &'static str, error: Error) -> Error {
        tracing::info!(target: "audit", action, outcome = error.outcome(), "moderation refused");
        error
    }

    /// The part of every moderation call that no front door changes: refuses what did not validate, runs
    /// the stack (giving up at `deadline`), and audits the outcome. The gRPC handler and the IVS HTTP API
    /// both end here, so the same request gets the same decision and audit event through either.
    pub(crate) async fn decide(
        &self,
        action: &'static str,
        caller: &Caller,
        validated: Result<ModerationRequest, Error>,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<ModerationOutcome, Error> {
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
        let moderating = self.stack.clone().oneshot(request);
        let done = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, moderating)
                .await
                .unwrap_or(Err(Error::DeadlineExceeded)),
            None => moderating.await,
        };
        audit.in_scope(|| match &done {
            Ok(_) => tracing::info!(target: "audit", outcome = "done", "moderation done"),
            Err(error) => {
                tracing::info!(target: "audit", outcome = error.outcome(), "moderation refused")
            }
        });
        done
    }

    /// Opens `token` with the local issuer's keys: its authentic, unexpired claims.
    fn open(&self, token: &str) -> Result<TokenClaims, Error> {
        let keys = self
            .verifier
            .as_ref()
            .ok_or(Error::Unsupported(IVS_VERIFIES_ITS_TOKENS))?;
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
        keys.current()
            .verify(token)
            .map_err(|e| Error::TokenRejected(TokenRejection::from(e)))
    }

    fn ban_duration(
        &self,
        duration: Option<prost_types::Duration>,
    ) -> Result<Option<Duration>, String> {
        let Some(duration) = duration else {
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
        if duration.nanos != 0 {
            return Err(out_of_range());
        }
        let seconds = u64::try_from(duration.seconds).map_err(|_| out_of_range())?;
        let duration = Duration::from_secs(seconds);
        if (MIN_BAN..=max).contains(&duration) {
            Ok(Some(duration))
        } else {
            Err(out_of_range())
        }
    }
}

fn invalid(field: &'static str, why: String) -> Error {
    Error::InvalidArgument(vec![FieldViolation::new(field, why)])
}

/// Collects every bad field of a request, then builds it from the good ones.
#[derive(Default)]
struct Fields(Vec<FieldViolation>);

impl Fields {
    fn check<T>(&mut self, field: &'static str, parsed: Result<T, String>) -> Option<T> {
        parsed
            .map_err(|why| self.0.push(FieldViolation::new(field, why)))
            .ok()
    }

    fn finish<T>(self, built: Option<T>) -> Result<T, Error> {
        match built {
            Some(built) if self.0.is_empty() => Ok(built),
            _ => Err(Error::InvalidArgument(self.0)),
        }
    }
}

/// A DisconnectUser request from its fields, every bad one reported by the name in `names` (room, user,
/// reason): the proto's for gRPC, IVS Chat's for its HTTP API.
pub(crate) fn disconnect_request(
    caller: Caller,
    room_identifier: &str,
    user_id: String,
    reason: String,
    names: [&'static str; 3],
) -> Result<ModerationRequest, Error> {
    let [room_name, user_name, reason_name] = names;
    let mut fields = Fields::default();
    let room = fields.check(room_name, RoomArn::parse(room_identifier));
    let user_id = fields.check(user_name, user(user_id));
    let reason = fields.check(reason_name, Reason::parse(reason));
    let built = (|| {
        Some(ModerationRequest {
            caller,
            room: room?,
            action: ModerationAction::Disconnect {
                user_id: user_id?,
                reason: reason?,
            },
        })
    })();
    fields.finish(built)
}

fn user(user_id: String) -> Result<UserId, String> {
    UserId::parse(user_id)
}

#[tonic::async_trait]
impl moderation_service_server::ModerationService for ModerationGrpc {
    async fn disconnect_user(
        &self,
        request: Request<DisconnectUserRequest>,
    ) -> Result<Response<DisconnectUserResponse>, Status> {
        self.moderate("DisconnectUser", request, |_, caller, request| {
            disconnect_request(
                caller,
                &request.room_identifier,
                request.user_id,
                request.reason,
                ["room_identifier", "user_id", "reason"],
            )
        })
        .await?;
        Ok(Response::new(DisconnectUserResponse {}))
    }

    async fn ban_user(
        &self,
        request: Request<BanUserRequest>,
    ) -> Result<Response<BanUserResponse>, Status> {
        let outcome = self
            .moderate("BanUser", request, |this, caller, request| {
                let mut fields = Fields::default();
                let room =
                    fields.check("room_identifier", RoomArn::parse(&request.room_identifier));
                let user_id = fields.check("user_id", user(request.user_id));
                let duration = fields.check("duration", this.ban_duration(request.duration));
                let reason = fields.check("reason", Reason::parse(request.reason));
                let built = (|| {
                    Some(ModerationRequest {
                        caller,
                        room: room?,
                        action: ModerationAction::Ban {
                            user_id: user_id?,
                            duration: duration?,
                            reason: reason?,
                        },
                    })
                })();
                fields.finish(built)
            })
            .await?;
        match outcome {
            ModerationOutcome::Banned(ban) => Ok(Response::new(BanUserResponse {
                ban: Some(ban_to_proto(ban)),
            })),
            other => Err(unexpected(other)),
        }
    }

    async fn unban_user(
        &self,
        request: Request<UnbanUserRequest>,
    ) -> Result<Response<UnbanUserResponse>, Status> {
        let outcome = self
            .moderate("UnbanUser", request, |_, caller, request| {
                let mut fields = Fields::default();
                let room =
                    fields.check("room_identifier", RoomArn::parse(&request.room_identifier));
                let user_id = fields.check("user_id", user(request.user_id));
                let built = (|| {
                    Some(ModerationRequest {
                        caller,
                        room: room?,
                        action: ModerationAction::Unban { user_id: user_id? },
                    })
                })();
                fields.finish(built)
            })
            .await?;
        match outcome {
            ModerationOutcome::Unbanned { was_banned } => {
                Ok(Response::new(UnbanUserResponse { was_banned }))
            }
            other => Err(unexpected(other)),
        }
    }

    async fn list_bans(
        &self,
        request: Request<ListBansRequest>,
    ) -> Result<Response<ListBansResponse>, Status> {
        let outcome = self
            .moderate("ListBans", request, |_, caller, request| {
                let mut fields = Fields::default();
                let room =
                    fields.check("room_identifier", RoomArn::parse(&request.room_identifier));
                let page_size = fields.check("page_size", page_size(request.page_size));
                let after = fields.check(
                    "page_token",
                    (!request.page_token.is_empty())
                        .then(|| PageToken::parse(&request.page_token))
                        .transpose(),
                );
                let built = (|| {
                    Some(ModerationRequest {
                        caller,
                        room: room?,
                        action: ModerationAction::ListBans {
                            page_size: page_size?,
                            after: after?,
                        },
                    })
                })();
                fields.finish(built)
            })
            .await?;
        match outcome {
            ModerationOutcome::Bans(page) => Ok(Response::new(ListBansResponse {
                bans: page.bans.into_iter().map(ban_to_proto).collect(),
                next_page_token: page
                    .next
                    .map(|token| token.as_str().to_owned())
                    .unwrap_or_default(),
            })),
            other => Err(unexpected(other)),
        }
    }

    async fn verify_chat_token(
        &self,
        request: Request<VerifyChatTokenRequest>,
    ) -> Result<Response<VerifyChatTokenResponse>, Status> {
        let outcome = self
            .moderate("VerifyChatToken", request, |this, caller, request| {
                let claims = this.open(&request.token)?;
                Ok(ModerationRequest {
                    caller,
                    room: claims.room.clone(),
                    action: ModerationAction::Verify {
                        claims: Box::new(claims),
                    },
                })
            })
            .await?;
        match outcome {
            ModerationOutcome::Verified(claims) => Ok(Response::new(claims_to_proto(*claims))),
            other => Err(unexpected(other)),
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

/// The stack answered a different action than asked: a bug, never a caller's fault.
fn unexpected(outcome: ModerationOutcome) -> Status {
    Error::Internal(format!(
        "moderation stack answered an unexpected outcome: {}",
        match outcome {
            ModerationOutcome::Disconnected => "Disconnected",
            ModerationOutcome::Banned(_) => "Banned",
            ModerationOutcome::Unbanned { .. } => "Unbanned",
            ModerationOutcome::Bans(_) => "Bans",
            ModerationOutcome::Verified(_) => "Verified",
        }
    ))
    .into()
}

fn ban_to_proto(ban: Ban) -> pb::Ban {
    pb::Ban {
        room_identifier: ban.room.as_str().to_owned(),
        user_id: ban.user_id.expose().to_owned(),
        banned_by: ban.banned_by.id().to_owned(),
        created_time: Some(ban.created_at.into()),
        expiration_time: ban.expires_at.map(Into::into),
        reason: ban.reason.expose().to_owned(),
    }
}

fn claims_to_proto(claims: TokenClaims) -> VerifyChatTokenResponse {
    VerifyChatTokenResponse {
        token_id: claims.token_id,
        room_identifier: claims.room.as_str().to_owned(),
        user_id: claims.user_id.expose().to_owned(),
        capabilities: crate::request::capabilities_to_proto(&claims.capabilities),
        attributes: claims.attributes.expose().clone().into_iter().collect(),
        issued_time: Some(claims.issued_at.into()),
        token_expiration_time: Some(claims.token_expires_at.into()),
        session_expiration_time: Some(claims.session_expires_at.into()),
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
    fn reason_bounds_count_characters() {
        assert!(Reason::parse(String::new()).is_err());
        assert!(Reason::parse("x".into()).is_ok());
        assert!(Reason::parse("é".repeat(256)).is_ok());
        assert!(Reason::parse("é".repeat(257)).is_err());
    }

    #[test]
    fn page_tokens_are_what_the_store_hands_out() {
        assert!(PageToken::parse(&"0123456789abcdef".repeat(2)).is_ok());
        assert!(PageToken::parse(&"0123456789ABCDEF".repeat(2)).is_err());
        assert!(PageToken::parse("abc").is_err());
    }
}
