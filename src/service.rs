//! The gRPC handler: proto in, domain stack, proto out. No business rules live here.

use tonic::{Request, Response, Status};
use tower::ServiceExt;

use crate::identity::Resolver;
use crate::issuer::IssuedToken;
use crate::proto::ivschat::v1::{
    CreateChatTokenRequest, CreateChatTokenResponse, token_service_server,
};
use crate::request::TokenRequest;
use crate::stack::TokenStack;

/// Serves `ivschat.v1.TokenService` on top of the domain stack.
#[derive(Clone)]
pub struct TokenService {
    identity: Resolver,
    stack: TokenStack,
}

impl TokenService {
    /// A handler that identifies callers with `identity` and sends every valid request through `stack`.
    pub fn new(identity: Resolver, stack: TokenStack) -> Self {
        TokenService { identity, stack }
    }
}

#[tonic::async_trait]
impl token_service_server::TokenService for TokenService {
    async fn create_chat_token(
        &self,
        request: Request<CreateChatTokenRequest>,
    ) -> Result<Response<CreateChatTokenResponse>, Status> {
        let peer_certs = request.peer_certs();
        let caller = self
            .identity
            .resolve(request.metadata(), peer_certs.as_deref().map(Vec::as_slice))?;
        let request = TokenRequest::from_proto(caller, request.into_inner())?;
        let issued = self.stack.clone().oneshot(request).await?;
        Ok(Response::new(to_proto(issued)))
    }
}

fn to_proto(issued: IssuedToken) -> CreateChatTokenResponse {
    CreateChatTokenResponse {
        token: issued.token,
        token_expiration_time: Some(issued.token_expires_at.into()),
        session_expiration_time: Some(issued.session_expires_at.into()),
    }
}
