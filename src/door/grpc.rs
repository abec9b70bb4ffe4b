//! The gRPC door: `ivschat.v1.TokenService`, `ivschat.v1.ModerationService` and
//! `ivschat.v1.MessagingService`, proto in, domain through the shared [`Door`], [`ModerationDoor`] and
//! [`MessagingDoor`], proto out. Conversions between the wire format and the
//! domain are the free functions at the end; no business rule lives here.

use tonic::{Request, Response, Status};

use super::{
    Door, MessagingDoor, MessagingNames, ModerationDoor, ModerationNames, UncheckedMessage,
    UncheckedModeration, status,
};
use crate::domain::{
    Action, Ban, Caller, Capabilities, Capability, Error, FieldNames, IssuedToken,
    ModerationOutcome, ModerationRequest, TokenClaims, TokenRequest, UncheckedRequest,
};
use crate::proto::ivschat::v1::{
    self as pb, BanUserRequest, BanUserResponse, CreateChatTokenRequest, CreateChatTokenResponse,
    DeleteMessageRequest, DeleteMessageResponse, DisconnectUserRequest, DisconnectUserResponse,
    ListBansRequest, ListBansResponse, SendEventRequest, SendEventResponse, UnbanUserRequest,
    UnbanUserResponse, VerifyChatTokenRequest, VerifyChatTokenResponse, messaging_service_server,
    moderation_service_server, token_service_server,
};
use crate::transport::{deadline::CallDeadline, listener::peer_certs};

/// Serves `ivschat.v1.TokenService` through a [`Door`].
#[derive(Clone)]
pub struct TokenGrpc {
    door: Door,
}

impl TokenGrpc {
    /// A handler that passes every call through `door`.
    pub fn new(door: Door) -> Self {
        TokenGrpc { door }
    }
}

#[tonic::async_trait]
impl token_service_server::TokenService for TokenGrpc {
    async fn create_chat_token(
        &self,
        request: Request<CreateChatTokenRequest>,
    ) -> Result<Response<CreateChatTokenResponse>, Status> {
        let door = &self.door;
        let caller = door
            .identity()
            .resolve(
                request.metadata().as_ref(),
                peer_certs(request.extensions()),
            )
            .map_err(|error| status(door.refuse(None, error)))?;
        let deadline = deadline(&request);
        let (metadata, _, message) = request.into_parts();
        let request = token_request(caller.clone(), message)
            .map_err(|error| status(door.refuse(Some(&caller), error)))?;
        let request = door
            .bind(request, metadata.as_ref(), &FieldNames::PROTO, deadline)
            .await
            .map_err(status)?;
        let issued = door.issue(request, deadline).await.map_err(status)?;
        Ok(Response::new(token_to_proto(issued)))
    }
}

/// Serves `ivschat.v1.ModerationService` through a [`ModerationDoor`].
#[derive(Clone)]
pub struct ModerationGrpc {
    door: ModerationDoor,
}

impl ModerationGrpc {
    /// A handler that passes every call through `door`.
    pub fn new(door: ModerationDoor) -> Self {
        ModerationGrpc { door }
    }

    /// Identifies the caller, validates with `validate`, runs the stack within the caller's deadline, and
    /// audits the outcome.
    async fn moderate<T>(
        &self,
        action: Action,
        request: Request<T>,
        validate: impl FnOnce(&ModerationDoor, Caller, T) -> Result<ModerationRequest, Error>,
    ) -> Result<ModerationOutcome, Status> {
        let door = &self.door;
        let caller = door
            .identity()
            .resolve(
                request.metadata().as_ref(),
                peer_certs(request.extensions()),
            )
            .map_err(|error| status(ModerationDoor::unidentified(action, error)))?;
        let deadline = deadline(&request);
        let validated = validate(door, caller.clone(), request.into_inner());
        door.decide(action, &caller, validated, deadline)
            .await
            .map_err(status)
    }

    /// [`Self::moderate`] for the calls whose fields [`ModerationDoor::validate`] checks.
    async fn moderate_fields<T>(
        &self,
        action: Action,
        request: Request<T>,
        fields: impl FnOnce(T) -> UncheckedModeration,
    ) -> Result<ModerationOutcome, Status> {
        self.moderate(action, request, |door, caller, request| {
            door.validate(action, caller, fields(request), &ModerationNames::PROTO)
        })
        .await
    }
}

#[tonic::async_trait]
impl moderation_service_server::ModerationService for ModerationGrpc {
    async fn disconnect_user(
        &self,
        request: Request<DisconnectUserRequest>,
    ) -> Result<Response<DisconnectUserResponse>, Status> {
        self.moderate_fields(Action::DisconnectUser, request, |request| {
            UncheckedModeration {
                room_identifier: request.room_identifier,
                user_id: request.user_id,
                reason: request.reason,
                ..UncheckedModeration::default()
            }
        })
        .await?;
        Ok(Response::new(DisconnectUserResponse {}))
    }

    async fn ban_user(
        &self,
        request: Request<BanUserRequest>,
    ) -> Result<Response<BanUserResponse>, Status> {
        let outcome = self
            .moderate_fields(Action::BanUser, request, |request| UncheckedModeration {
                room_identifier: request.room_identifier,
                user_id: request.user_id,
                reason: request.reason,
                duration: request.duration.map(|d| (d.seconds, d.nanos)),
                ..UncheckedModeration::default()
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
            .moderate_fields(Action::UnbanUser, request, |request| UncheckedModeration {
                room_identifier: request.room_identifier,
                user_id: request.user_id,
                ..UncheckedModeration::default()
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
            .moderate_fields(Action::ListBans, request, |request| UncheckedModeration {
                room_identifier: request.room_identifier,
                page_size: request.page_size,
                page_token: request.page_token,
                ..UncheckedModeration::default()
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
        // The token is opened before the stack: its room is what policy decides about, and only an
        // authentic token names one. Its times, bans, revocation and single use are checked by the
        // moderator, after policy and rate limits.
        let outcome = self
            .moderate(Action::VerifyChatToken, request, |door, caller, request| {
                door.verify_request(caller, &request.token)
            })
            .await?;
        match outcome {
            ModerationOutcome::Verified(claims) => Ok(Response::new(claims_to_proto(*claims))),
            other => Err(unexpected(other)),
        }
    }
}

/// Serves `ivschat.v1.MessagingService` through a [`MessagingDoor`].
#[derive(Clone)]
pub struct MessagingGrpc {
    door: MessagingDoor,
}

impl MessagingGrpc {
    /// A handler that passes every call through `door`.
    pub fn new(door: MessagingDoor) -> Self {
        MessagingGrpc { door }
    }

    /// Identifies the caller, validates the fields, runs the stack within the caller's deadline, and
    /// audits the outcome; answers the id the chat backend gave the event.
    async fn send<T>(
        &self,
        action: Action,
        request: Request<T>,
        fields: impl FnOnce(T) -> UncheckedMessage,
    ) -> Result<String, Status> {
        let door = &self.door;
        let caller = door
            .identity()
            .resolve(
                request.metadata().as_ref(),
                peer_certs(request.extensions()),
            )
            .map_err(|error| status(MessagingDoor::unidentified(action, error)))?;
        let deadline = deadline(&request);
        let validated = door.validate(
            action,
            caller.clone(),
            fields(request.into_inner()),
            &MessagingNames::PROTO,
        );
        let outcome = door
            .decide(action, &caller, validated, deadline)
            .await
            .map_err(status)?;
        Ok(outcome.id)
    }
}

#[tonic::async_trait]
impl messaging_service_server::MessagingService for MessagingGrpc {
    async fn send_event(
        &self,
        request: Request<SendEventRequest>,
    ) -> Result<Response<SendEventResponse>, Status> {
        let id = self
            .send(Action::SendEvent, request, |request| UncheckedMessage {
                room_identifier: request.room_identifier,
                event_name: request.event_name,
                attributes: request.attributes.into_iter().collect(),
                ..UncheckedMessage::default()
            })
            .await?;
        Ok(Response::new(SendEventResponse { id }))
    }

    async fn delete_message(
        &self,
        request: Request<DeleteMessageRequest>,
    ) -> Result<Response<DeleteMessageResponse>, Status> {
        let id = self
            .send(Action::DeleteMessage, request, |request| UncheckedMessage {
                room_identifier: request.room_identifier,
                id: request.id,
                reason: request.reason,
                ..UncheckedMessage::default()
            })
            .await?;
        Ok(Response::new(DeleteMessageResponse { id }))
    }
}

/// The stack answered a different action than asked: a bug, never a caller's fault.
fn unexpected(outcome: ModerationOutcome) -> Status {
    status(Error::Internal(format!(
        "moderation stack answered an unexpected outcome: {}",
        match outcome {
            ModerationOutcome::Disconnected => "Disconnected",
            ModerationOutcome::Banned(_) => "Banned",
            ModerationOutcome::Unbanned { .. } => "Unbanned",
            ModerationOutcome::Bans(_) => "Bans",
            ModerationOutcome::Verified(_) => "Verified",
        }
    )))
}

/// The call's deadline, as the transport set it (see [`crate::transport::deadline`]).
fn deadline<T>(request: &Request<T>) -> Option<CallDeadline> {
    request.extensions().get::<CallDeadline>().copied()
}

/// Validates `request` from `caller`, reporting every bad field at once by its proto name.
pub fn token_request(
    caller: Caller,
    request: CreateChatTokenRequest,
) -> Result<TokenRequest, Error> {
    let unchecked = UncheckedRequest {
        capabilities: capabilities_from_proto(&request.capabilities),
        room_identifier: request.room_identifier,
        user_id: request.user_id,
        session_duration_in_minutes: request.session_duration_in_minutes.map(i64::from),
        attributes: request.attributes.into_iter().collect(),
    };
    TokenRequest::validate(caller, unchecked, &FieldNames::PROTO)
}

/// Refuses UNSPECIFIED and numbers the proto does not define. The reason counts the bad entries and
/// names only the first few, so it stays short however many a request sends.
fn capabilities_from_proto(values: &[i32]) -> Result<Capabilities, String> {
    const NAMED: usize = 3;
    let mut set = Vec::new();
    let mut bad = 0usize;
    let mut named = Vec::with_capacity(NAMED);
    for (index, &value) in values.iter().enumerate() {
        match pb::ChatTokenCapability::try_from(value) {
            Ok(pb::ChatTokenCapability::SendMessage) => set.push(Capability::SendMessage),
            Ok(pb::ChatTokenCapability::DisconnectUser) => set.push(Capability::DisconnectUser),
            Ok(pb::ChatTokenCapability::DeleteMessage) => set.push(Capability::DeleteMessage),
            Ok(pb::ChatTokenCapability::Unspecified) | Err(_) => {
                bad += 1;
                if named.len() < NAMED {
                    named.push(format!("[{index}]={value}"));
                }
            }
        }
    }
    if bad == 0 {
        return Ok(Capabilities::new(set));
    }
    let more = if bad > named.len() {
        format!(" and {} more", bad - named.len())
    } else {
        String::new()
    };
    Err(format!(
        "each capability must be SEND_MESSAGE, DISCONNECT_USER or DELETE_MESSAGE; {bad} invalid: {}{more}",
        named.join(", ")
    ))
}

fn capabilities_to_proto(capabilities: &Capabilities) -> Vec<i32> {
    capabilities
        .iter()
        .map(|c| match c {
            Capability::SendMessage => pb::ChatTokenCapability::SendMessage,
            Capability::DisconnectUser => pb::ChatTokenCapability::DisconnectUser,
            Capability::DeleteMessage => pb::ChatTokenCapability::DeleteMessage,
        } as i32)
        .collect()
}

fn token_to_proto(issued: IssuedToken) -> CreateChatTokenResponse {
    CreateChatTokenResponse {
        token: issued.token,
        token_expiration_time: Some(issued.token_expires_at.into()),
        session_expiration_time: Some(issued.session_expires_at.into()),
        chat_endpoint: issued.chat_endpoint.unwrap_or_default(),
    }
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
        capabilities: capabilities_to_proto(&claims.capabilities),
        attributes: claims.attributes.expose().clone().into_iter().collect(),
        issued_time: Some(claims.issued_at.into()),
        token_expiration_time: Some(claims.token_expires_at.into()),
        session_expiration_time: Some(claims.session_expires_at.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::domain::IssuedToken;
    use crate::issuer::Issuer;
    use crate::proto::ivschat::v1::token_service_server::TokenService as _;
    use std::time::Duration;
    use tokio::time::Instant;

    /// An issuer that never answers: a hung upstream.
    struct Hung;

    impl Issuer for Hung {
        const NAME: &'static str = "hung";

        async fn issue(&self, _: TokenRequest) -> Result<IssuedToken, Error> {
            std::future::pending().await
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_past_its_deadline_is_answered_by_the_door_just_before_it() {
        let app = crate::app::build_around(&Config::default(), Hung)
            .await
            .unwrap();
        let service = TokenGrpc::new(app.door);
        for (limit, code) in [
            (None, tonic::Code::DeadlineExceeded),
            (
                Some(crate::domain::TimeLimit::CallDuration(Duration::from_secs(
                    30,
                ))),
                tonic::Code::DeadlineExceeded,
            ),
        ] {
            let mut request = Request::new(CreateChatTokenRequest {
                room_identifier: "arn:aws:ivschat:us-west-2:123456789012:room/abc".into(),
                user_id: "u".into(),
                ..Default::default()
            });
            let arrived = Instant::now();
            request.extensions_mut().insert(CallDeadline {
                at: arrived + Duration::from_millis(300),
                limit,
            });
            let status = service.create_chat_token(request).await.unwrap_err();
            assert_eq!(status.code(), code);
            if limit.is_some() {
                assert!(status.message().contains("max_call_duration"), "{status:?}");
            }
            // Answered before the transport's own timer (at 300 ms) would answer.
            assert_eq!(
                arrived.elapsed(),
                Duration::from_millis(300) - super::super::DEADLINE_MARGIN
            );
        }
    }
}
