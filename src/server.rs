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
use tonic_reflection::pb::{
    v1::ServerReflectionRequest as ReflectionRequestV1,
    v1alpha::ServerReflectionRequest as ReflectionRequestV1Alpha,
};

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
    deadline::{self, DeadlineLayer},
    decode_errors::ReportDecodeErrors,
    end_on_drain::EndOnDrain,
    inflight::{CallLimits, Calls, InFlightLayer},
    listener::{self, ConnectionLimits},
    serve::{self, HttpSettings},
    trace::RpcTraceLayer,
    unknown_method::UnknownMethodLayer,
};

/// The health-check name of the token service; `""` stands for the server as a whole.
pub const TOKEN_SERVICE_NAME: &str = token_service_server::SERVICE_NAME;

/// Why the server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
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
    warn_if_memory_may_not_fit(&serving, tls.is_some());
    let (health, health_service) = tonic_health::server::health_reporter();
    let ready = readiness.as_ref().is_none_or(|ready| *ready.borrow());
    health
        .set_service_status(TOKEN_SERVICE_NAME, serving_status(ready))
        .await;
    let readiness = readiness.map(|ready| tokio::spawn(follow_readiness(health.clone(), ready)));

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

    let transport = &serving.transport;
    let calls = Calls::new(CallLimits {
        max_calls: serving.max_concurrent_calls.get(),
        request_bytes: transport.max_request_bytes_in_flight.get(),
        max_http_body: serving.http_api.max_body_bytes,
        max_streams: transport.max_streaming_calls.get(),
        max_streams_per_connection: transport.max_streaming_calls_per_connection.get(),
    });
    observe_in_flight({
        let calls = calls.clone();
        move || calls.in_flight()
    });
    // Health and reflection get the token service's bound too: nothing decodes (or echoes) more.
    let (draining_tx, draining) = watch::channel(false);
    let mut routes = tonic::service::Routes::builder();
    routes
        .add_service(EndOnDrain::new(
            health_service.max_decoding_message_size(max_request_bytes),
            draining,
        ))
        .add_service(token_service);
    if serving.reflection.enabled {
        // Reflection describes our service, health, and the google.rpc error details, so grpcurl and buf
        // curl can decode BadRequest, ErrorInfo, RetryInfo and QuotaFailure in error responses.
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
        };
        let v1 = reflection()
            .build_v1()
            .expect("the descriptor sets are valid");
        // grpcurl before 1.8.8 and some other tools only speak v1alpha.
        let v1alpha = reflection()
            .build_v1alpha()
            .expect("the descriptor sets are valid");
        // tonic-reflection ends its reply OK at a request it cannot decode: the wrapper decodes first
        // (within the same bound) and ends the reply with that error, OUT_OF_RANGE for an oversized one.
        routes
            .add_service(ReportDecodeErrors::<_, ReflectionRequestV1>::new(
                v1.max_decoding_message_size(max_request_bytes),
                max_request_bytes,
            ))
            .add_service(ReportDecodeErrors::<_, ReflectionRequestV1Alpha>::new(
                v1alpha.max_decoding_message_size(max_request_bytes),
                max_request_bytes,
            ));
    }
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
    let service = tower::ServiceBuilder::new()
        // Outermost: every call gets its server span and duration, shed ones included.
        .layer(RpcTraceLayer::new(tls.is_some()))
        // Counts every call for draining, and sheds calls over the cap, the request byte budget or the
        // streaming bounds before any decoding, policy or issuing work is spent on them.
        .layer(InFlightLayer::new(calls.clone()))
        // Every call ends by its deadline: the caller's grpc-timeout, within the server's own limits.
        .layer(DeadlineLayer::new(deadline::Limits {
            max_call_duration: transport.max_call_duration,
            max_stream_age: transport.max_stream_age,
        }))
        // Unknown gRPC methods are answered here, with ErrorInfo, before any service sees them.
        .layer(UnknownMethodLayer)
        .service(routes.prepare().into_axum_router());
    let settings = HttpSettings {
        transport: transport.clone(),
        max_request_bytes,
        http1: serving.http_api.enabled,
    };

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
            let incoming =
                listener::incoming(listener, limits, |tcp, _| std::future::ready(Ok(tcp)));
            drain
                .serve(
                    serve::serve(incoming, service, settings, drain_signal),
                    shutdown,
                )
                .await
        }
        Some(tls) => {
            let first_bytes = transport.preface_timeout;
            let incoming = listener::incoming(listener, limits, move |tcp, peer| {
                tls.handshake(tcp, peer, first_bytes)
            });
            drain
                .serve(
                    serve::serve(incoming, service, settings, drain_signal),
                    shutdown,
                )
                .await
        }
    }
}

/// What one open connection costs at most besides its calls, in bytes: hyper's and h2's buffers (grown by
/// the largest frames the client sent) and state. Measured at 54 KiB with 4,000 connections that sent
/// 12 KiB header blocks (docs/security.md, "Limits and timeouts").
pub const CONNECTION_BYTES: u64 = 64 * 1024;
/// The same over TLS, with rustls's buffers: measured at 65 KiB.
pub const TLS_CONNECTION_BYTES: u64 = 80 * 1024;
/// What the calls holding the request byte budget cost per byte reserved: header maps, decode buffers and
/// the allocator's slack. Measured at 2.6 (42 MiB of RSS for the 16 MiB budget).
pub const HELD_CALL_FACTOR: u64 = 3;

/// The most memory the transport's bounds let clients make this replica hold before any of them is
/// identified: every connection open, and the request byte budget (which holds every call's head and
/// message) spent.
pub fn transport_memory_bound(serving: &Serving, tls: bool) -> u64 {
    let transport = &serving.transport;
    let per_connection = if tls {
        TLS_CONNECTION_BYTES
    } else {
        CONNECTION_BYTES
    };
    (transport.max_connections.get() as u64).saturating_mul(per_connection)
        + HELD_CALL_FACTOR * transport.max_request_bytes_in_flight.get() as u64
}

/// Warns at start-up when the transport's bounds could use more than three quarters of the memory the
/// operator declared (`transport.memory_limit_bytes`), leaving the rest to the process itself (about
/// 20 MiB) and its in-memory stores.
fn warn_if_memory_may_not_fit(serving: &Serving, tls: bool) {
    let Some(limit) = serving.transport.memory_limit_bytes else {
        return;
    };
    let bound = transport_memory_bound(serving, tls);
    if bound > limit / 4 * 3 {
        tracing::warn!(
            bound_mib = bound / (1024 * 1024),
            memory_limit_mib = limit / (1024 * 1024),
            "transport.max_connections and transport.max_request_bytes_in_flight let clients hold more \
             than three quarters of transport.memory_limit_bytes; lower them, or raise the memory limit"
        );
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
    /// Tells the server to stop accepting and send GOAWAY.
    drain_tx: tokio::sync::oneshot::Sender<()>,
}

impl Drain<'_> {
    async fn serve(
        self,
        server: impl Future<Output = ()>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ServerError> {
        let mut server = std::pin::pin!(server);
        tokio::select! {
            () = &mut server => return Ok(()),
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
            () = &mut server => return Ok(()),
            () = tokio::time::sleep(delay) => {}
        }
        tracing::info!("drain delay over: closing the listener");
        let _ = self.drain_tx.send(());

        let drained = async {
            tokio::select! {
                () = &mut server => {}
                () = self.calls.idle() => {}
            }
        };
        match tokio::time::timeout(grace, drained).await {
            Ok(()) => {
                tracing::info!("all calls finished; server stopped");
                Ok(())
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
