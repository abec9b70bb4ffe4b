//! Issuers: the innermost service of the domain stack, the thing that actually mints a token.
//!
//! An issuer implements the small [`Issuer`] trait, and, when it can moderate, [`Moderator`]; [`IssuerService`] adapts any issuer to a
//! `tower::Service<TokenRequest>` so policy and rate-limit layers can wrap it without knowing which
//! issuer sits inside. [`local::LocalIssuer`] mints PASETO tokens itself; [`ivs::IvsIssuer`] asks Amazon IVS
//! Chat.
//!
//! SendEvent and DeleteMessage go to a [`Messenger`], adapted the same way by [`MessengerService`]: the
//! IVS issuer (IVS Chat's own operations) or, with the local issuer, [`webhook::Webhook`] (the self-hosted
//! chat server).

pub mod ivs;
mod ivs_messaging;
pub mod local;
pub mod webhook;

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use opentelemetry::KeyValue;
use tracing::Instrument;

use crate::domain::{
    Error, IssuedToken, MessagingOutcome, MessagingRequest, Reason, RoomArn, TokenClaims,
    TokenRequest, UserId,
};
use crate::telemetry::{metrics::metrics, trace_only_span};

/// Something that turns a validated request into a token.
pub trait Issuer: Send + Sync + 'static {
    /// The issuer's name in spans and metrics, e.g. `local`.
    const NAME: &'static str;

    /// Mints one token for `request`.
    fn issue(
        &self,
        request: TokenRequest,
    ) -> impl Future<Output = Result<IssuedToken, Error>> + Send;
}

/// A shared issuer issues as itself: the ivs issuer is shared with its moderator.
impl<I: Issuer> Issuer for Arc<I> {
    const NAME: &'static str = I::NAME;

    fn issue(
        &self,
        request: TokenRequest,
    ) -> impl Future<Output = Result<IssuedToken, Error>> + Send {
        I::issue(self, request)
    }
}

/// What an issuer does for moderation.
pub trait Moderator: Send + Sync + 'static {
    /// The issuer's name in spans and metrics.
    const NAME: &'static str;

    /// Ends the user's chat connections to the room.
    fn disconnect(
        &self,
        room: &RoomArn,
        user_id: &UserId,
        reason: &Reason,
    ) -> impl Future<Output = Result<(), Error>> + Send;

    /// Checks the state of an authentic token (revocation, single use) and passes its claims on.
    fn verify(
        &self,
        claims: TokenClaims,
    ) -> impl Future<Output = Result<TokenClaims, Error>> + Send;
}

impl<M: Moderator> Moderator for Arc<M> {
    const NAME: &'static str = M::NAME;

    fn disconnect(
        &self,
        room: &RoomArn,
        user_id: &UserId,
        reason: &Reason,
    ) -> impl Future<Output = Result<(), Error>> + Send {
        M::disconnect(self, room, user_id, reason)
    }

    fn verify(
        &self,
        claims: TokenClaims,
    ) -> impl Future<Output = Result<TokenClaims, Error>> + Send {
        M::verify(self, claims)
    }
}

/// Adapts an [`Issuer`] to `tower::Service`, sharing it behind an `Arc` so the service clones cheaply.
pub struct IssuerService<I>(Arc<I>);

impl<I> IssuerService<I> {
    /// Wraps `issuer`.
    pub fn new(issuer: I) -> Self {
        IssuerService(Arc::new(issuer))
    }
}

impl<I> Clone for IssuerService<I> {
    fn clone(&self) -> Self {
        IssuerService(self.0.clone())
    }
}

impl<I: Issuer> tower::Service<TokenRequest> for IssuerService<I> {
    type Response = IssuedToken;
    type Error = Error;
    type Future = Pin<Box<dyn Future<Output = Result<IssuedToken, Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Error>> {
        // Issuers have no back-pressure of their own; concurrency is capped at the HTTP level.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: TokenRequest) -> Self::Future {
        let issuer = self.0.clone();
        let span = trace_only_span(|| {
            tracing::info_span!(
                "issuer.issue",
                issuer = I::NAME,
                otel.status_code = tracing::field::Empty
            )
        });
        let failed = span.clone();
        Box::pin(
            async move {
                let issued = issuer.issue(request).await;
                match &issued {
                    Ok(_) => metrics()
                        .tokens_issued
                        .add(1, &[KeyValue::new("issuer", I::NAME)]),
                    Err(_) => {
                        failed.record("otel.status_code", "ERROR");
                    }
                }
                issued
            }
            .instrument(span),
        )
    }
}

/// What delivers SendEvent and DeleteMessage to a room's clients.
pub trait Messenger: Send + Sync + 'static {
    /// The backend's name in spans, metrics and audit events, e.g. `ivs`.
    const NAME: &'static str;

    /// Sends `request` on, answering the id the backend gave it.
    fn deliver(
        &self,
        request: MessagingRequest,
    ) -> impl Future<Output = Result<MessagingOutcome, Error>> + Send;
}

impl<M: Messenger> Messenger for Arc<M> {
    const NAME: &'static str = M::NAME;

    fn deliver(
        &self,
        request: MessagingRequest,
    ) -> impl Future<Output = Result<MessagingOutcome, Error>> + Send {
        M::deliver(self, request)
    }
}

/// Adapts a [`Messenger`] to `tower::Service`, sharing it behind an `Arc` so the service clones cheaply.
pub struct MessengerService<M>(Arc<M>);

impl<M> MessengerService<M> {
    /// Wraps `messenger`.
    pub fn new(messenger: M) -> Self {
        MessengerService(Arc::new(messenger))
    }
}

impl<M> Clone for MessengerService<M> {
    fn clone(&self) -> Self {
        MessengerService(self.0.clone())
    }
}

impl<M: Messenger> tower::Service<MessagingRequest> for MessengerService<M> {
    type Response = MessagingOutcome;
    type Error = Error;
    type Future = Pin<Box<dyn Future<Output = Result<MessagingOutcome, Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: MessagingRequest) -> Self::Future {
        let messenger = self.0.clone();
        let action = request.action.action().as_str();
        let span = tracing::info_span!(
            "messaging.deliver",
            messaging.action = action,
            messaging.backend = M::NAME,
            otel.status_code = tracing::field::Empty
        );
        let failed = span.clone();
        Box::pin(
            async move {
                let outcome = messenger.deliver(request).await;
                if outcome.is_err() {
                    failed.record("otel.status_code", "ERROR");
                }
                metrics().messaging_calls.add(
                    1,
                    &[
                        KeyValue::new("action", action),
                        KeyValue::new("backend", M::NAME),
                        KeyValue::new("result", if outcome.is_ok() { "ok" } else { "error" }),
                    ],
                );
                outcome
            }
            .instrument(span),
        )
    }
}
