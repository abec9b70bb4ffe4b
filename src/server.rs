//! The gRPC server: the token service, health checking, reflection, and graceful shutdown.
//!
//! Health has two names. `""` is liveness: the process serves gRPC; it stays SERVING until shutdown,
//! because restarting cannot fix a dependency. [`TOKEN_SERVICE_NAME`] is readiness: whether token requests
//! can succeed here. It follows `readiness` when one is given (the Redis limiter store in fail_closed
//! mode: NOT_SERVING while Redis is unreachable), so point readiness probes at it.
//!
//! [`run`] serves until `shutdown` completes, then:
//! 1. reports NOT_SERVING for every health-checked service, so load balancers stop sending work, and
//!    ends health `Watch` streams (UNAVAILABLE) once that update is written (see
//!    [`crate::transport::end_on_drain`]);
//! 2. keeps serving new calls for `shutdown_drain_delay`, while probes and load balancers catch up;
//! 3. stops accepting connections (the listener is closed) and sends HTTP/2 GOAWAY on open ones;
//! 4. lets calls already in flight finish, for at most `shutdown_grace_period`;
//! 5. returns `Ok(())` as soon as no call is in flight, without waiting for idle connections to close
//!    (see [`crate::transport::inflight`]).

use std::future::Future;

use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::app::{App, Serving};
use crate::door::{
    grpc::{MessagingGrpc, ModerationGrpc, TokenGrpc},
    rest,
};
use crate::proto::{
    FILE_DESCRIPTOR_SET,
    ivschat::v1::{
        messaging_service_server::MessagingServiceServer,
        moderation_service_server::ModerationServiceServer,
        token_service_server::{self, TokenServiceServer},
    },
};
use crate::telemetry::metrics::observe_in_flight;
use crate::transport::{
    end_on_drain::EndOnDrain,
    inflight::{Calls, InFlightLayer},
    listener::{self, ConnectionLimits},
    trace::RpcTraceLayer,
};

/// Streams a client may open and reset before the server accepts them, per connection (hyper's default).
const MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;
/// Streams the server may reset for a client's protocol errors before closing its connection (hyper's
/// default).
const MAX_LOCAL_ERROR_RESET_STREAMS: usize = 1024;

/// The health-check name of the token service; `""` stands for the server as a whole.
pub const TOKEN_SERVICE_NAME: &str = token_service_server::SERVICE_NAME;

/// Why the server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The transport failed.
    #[error("server error: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The listener has no local address.
    #[error("cannot read the listening address: {0}")]
    Listener(#[from] std::io::Error),
}

/// Serves `app` on `listener` until `shutdown` completes, then drains as described in the module docs.
pub async fn run(
    listener: TcpListener,
    app: App,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let App {
        door,
        moderation,
        messaging,
        readiness,
        tls,
        serving,
        backend: _,
    } = app;
    tracing::info!(
        addr = %listener.local_addr()?,
        issuer = serving.issuer,
        "chat-token-service listening"
    );
    let (health, health_service) = tonic_health::server::health_reporter();
    let ready = readiness.as_ref().is_none_or(|ready| *ready.borrow());
    health
        .set_service_status(TOKEN_SERVICE_NAME, serving_status(ready))
        .await;
    let readiness = readiness.map(|ready| tokio::spawn(follow_readiness(health.clone(), ready)));

    // Reflection describes our service, health, and the google.rpc error details, so grpcurl and buf curl
    // can decode BadRequest, ErrorInfo, RetryInfo and QuotaFailure in error responses.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .expect("the descriptor sets are valid");
    // grpcurl before 1.8.8 and some other tools only speak v1alpha.
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .expect("the descriptor sets are valid");

    let max_request_bytes = serving.max_request_bytes;
    let token_service = TokenServiceServer::new(TokenGrpc::new(door.clone()))
        .max_decoding_message_size(max_request_bytes);
    let moderation_service = moderation.clone().map(|moderation| {
        ModerationServiceServer::new(ModerationGrpc::new(moderation))
            .max_decoding_message_size(max_request_bytes)
    });
    let messaging_service = messaging.clone().map(|messaging| {
        MessagingServiceServer::new(MessagingGrpc::new(messaging))
            .max_decoding_message_size(max_request_bytes)
    });

    let calls = Calls::new(serving.max_concurrent_calls.get());
    observe_in_flight({
        let calls = calls.clone();
        move || calls.in_flight()
    });
    let layers = tower::ServiceBuilder::new()
        // Outermost: every call gets its server span and duration, shed ones included.
        .layer(RpcTraceLayer)
        // Counts every call for draining, sheds token calls over the cap before any decoding, policy or
        // issuing work is spent on them.
        .layer(InFlightLayer::new(calls.clone()));
    // Health and reflection get the token service's bound too: nothing decodes (or echoes) more.
    let (draining_tx, draining) = watch::channel(false);
    let mut routes = tonic::service::Routes::builder();
    routes
        .add_service(EndOnDrain::new(
            health_service.max_decoding_message_size(max_request_bytes),
            draining,
        ))
        .add_service(reflection_v1.max_decoding_message_size(max_request_bytes))
        .add_service(reflection_v1alpha.max_decoding_message_size(max_request_bytes))
        .add_service(token_service);
    if let Some(moderation_service) = moderation_service {
        routes.add_service(moderation_service);
    }
    if let Some(messaging_service) = messaging_service {
        routes.add_service(messaging_service);
    }
    let mut routes = routes.routes();
    // The IVS Chat REST-JSON API: its routes beside the gRPC ones, over HTTP/1.1 as well as HTTP/2.
    if serving.http_api.enabled {
        routes = rest::beside(
            routes,
            rest::router(
                door,
                moderation,
                messaging,
                &serving.http_api,
                calls.clone(),
            ),
        );
    }
    let transport = &serving.transport;
    let router = tonic::transport::Server::builder()
        .max_concurrent_streams(transport.max_concurrent_streams.get())
        .http2_max_header_list_size(transport.max_header_list_bytes.get())
        .http2_keepalive_interval(Some(transport.keepalive_interval))
        .http2_keepalive_timeout(Some(transport.keepalive_timeout))
        .max_connection_age(transport.max_connection_age)
        .max_connection_age_grace(transport.max_connection_age_grace)
        .timeout(transport.max_call_duration)
        // h2's reset-flood guards (CVE-2023-44487 "rapid reset", CVE-2025-8671 "MadeYouReset"), set
        // explicitly so they cannot silently change with a dependency: streams a client opens and resets
        // before we accept them, and streams we reset for its protocol errors, per connection.
        .http2_max_pending_accept_reset_streams(Some(MAX_PENDING_ACCEPT_RESET_STREAMS))
        .http2_max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESET_STREAMS))
        .accept_http1(serving.http_api.enabled)
        .layer(layers)
        .add_routes(routes);

    let (drain_tx, drain_rx) = tokio::sync::oneshot::channel::<()>();
    let drain_signal = async {
        // A dropped sender also means "drain".
        let _ = drain_rx.await;
    };
    let limits = ConnectionLimits::from_config(transport);
    let drain = Drain {
        health,
        readiness,
        calls,
        serving: &serving,
        draining: draining_tx,
        drain_tx,
    };
    match tls {
        None => {
            let incoming = listener::incoming(listener, limits, |tcp| std::future::ready(Ok(tcp)));
            drain
                .serve(
                    router.serve_with_incoming_shutdown(incoming, drain_signal),
                    shutdown,
                )
                .await
        }
        Some(tls) => {
            let incoming = listener::incoming(listener, limits, move |tcp| tls.handshake(tcp));
            drain
                .serve(
                    router.serve_with_incoming_shutdown(incoming, drain_signal),
                    shutdown,
                )
                .await
        }
    }
}

fn serving_status(ready: bool) -> ServingStatus {
    if ready {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    }
}

/// Reports every change of `ready` as the token service's health, until aborted or `ready`'s sender is gone.
async fn follow_readiness(health: HealthReporter, mut ready: watch::Receiver<bool>) {
    while ready.changed().await.is_ok() {
        let status = serving_status(*ready.borrow_and_update());
        tracing::info!(?status, "token service readiness changed");
        health.set_service_status(TOKEN_SERVICE_NAME, status).await;
    }
}

/// What the shutdown sequence needs, whichever transport serves.
struct Drain<'a> {
    health: HealthReporter,
    /// The task that makes health follow readiness; stopped before shutdown reports NOT_SERVING, so a
    /// dependency recovering during the drain cannot report SERVING again.
    readiness: Option<JoinHandle<()>>,
    calls: Calls,
    serving: &'a Serving,
    /// Ends health `Watch` streams.
    draining: watch::Sender<bool>,
    /// Tells the tonic server to stop accepting and send GOAWAY.
    drain_tx: tokio::sync::oneshot::Sender<()>,
}

impl Drain<'_> {
    async fn serve(
        self,
        server: impl Future<Output = Result<(), tonic::transport::Error>>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ServerError> {
        let mut server = std::pin::pin!(server);
        tokio::select! {
            result = &mut server => return Ok(result?),
            () = shutdown => {}
        }

        let delay = self.serving.shutdown_drain_delay;
        let grace = self.serving.shutdown_grace_period;
        tracing::info!(
            drain_delay = %humantime::format_duration(delay),
            grace_period = %humantime::format_duration(grace),
            "shutdown requested: reporting NOT_SERVING, serving on for the drain delay, then draining \
             in-flight calls"
        );
        if let Some(task) = self.readiness {
            task.abort();
            // Once it has ended, nothing but this sequence writes health any more.
            let _ = task.await;
        }
        for service in ["", TOKEN_SERVICE_NAME] {
            self.health
                .set_service_status(service, ServingStatus::NotServing)
                .await;
        }
        self.draining.send_replace(true);
        tokio::select! {
            result = &mut server => return Ok(result?),
            () = tokio::time::sleep(delay) => {}
        }
        tracing::info!("drain delay over: closing the listener");
        let _ = self.drain_tx.send(());

        let drained = async {
            tokio::select! {
                result = &mut server => result,
                () = self.calls.idle() => Ok(()),
            }
        };
        match tokio::time::timeout(grace, drained).await {
            Ok(result) => {
                tracing::info!("all calls finished; server stopped");
                Ok(result?)
            }
            Err(_) => {
                tracing::warn!(
                    in_flight = self.calls.in_flight(),
                    "shutdown grace period elapsed with calls still in flight; they are abandoned"
                );
                Ok(())
            }
        }
    }
}
