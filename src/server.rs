//! The gRPC server: the token service, health checking, reflection, and graceful shutdown.
//!
//! [`run`] serves until `shutdown` completes, then:
//! 1. reports NOT_SERVING for every health-checked service, so load balancers stop sending work;
//! 2. stops accepting connections (the listener is closed) and sends HTTP/2 GOAWAY on open ones;
//! 3. lets calls already in flight finish, for at most `shutdown_grace_period`;
//! 4. returns `Ok(())` as soon as no call is in flight, without waiting for idle connections to close
//!    (see [`crate::drain`]).

use std::future::Future;

use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

use crate::config::Config;
use crate::drain::{Calls, CountCallsLayer};
use crate::proto::{FILE_DESCRIPTOR_SET, ivschat::v1::token_service_server::TokenServiceServer};
use crate::service::TokenService;
use crate::stack::TokenStack;

/// The health-check name of the token service; `""` stands for the server as a whole.
pub const TOKEN_SERVICE_NAME: &str = "ivschat.v1.TokenService";

/// Serves on `listener` until `shutdown` completes, then drains as described in the module docs.
pub async fn run(
    listener: TcpListener,
    config: &Config,
    stack: TokenStack,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status(TOKEN_SERVICE_NAME, ServingStatus::Serving)
        .await;

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("the descriptor set compiled by build.rs is valid");
    // grpcurl before 1.8.8 and some other tools only speak v1alpha.
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .expect("the descriptor set compiled by build.rs is valid");

    let token_service =
        TokenServiceServer::new(TokenService::new(config.identity.resolver(), stack))
            .max_decoding_message_size(config.max_request_bytes);

    let calls = Calls::default();
    let (drain_tx, drain_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tonic::transport::Server::builder()
        .layer(CountCallsLayer::new(calls.clone()))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(token_service)
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            async {
                // A dropped sender also means "drain".
                let _ = drain_rx.await;
            },
        );
    let mut server = std::pin::pin!(server);

    tokio::select! {
        result = &mut server => return result,
        () = shutdown => {}
    }

    tracing::info!(
        grace_period = %humantime::format_duration(config.shutdown_grace_period),
        "shutdown requested: reporting NOT_SERVING and draining in-flight calls"
    );
    for service in ["", TOKEN_SERVICE_NAME] {
        health
            .set_service_status(service, ServingStatus::NotServing)
            .await;
    }
    let _ = drain_tx.send(());

    let drained = async {
        tokio::select! {
            result = &mut server => result,
            () = calls.idle() => Ok(()),
        }
    };
    match tokio::time::timeout(config.shutdown_grace_period, drained).await {
        Ok(result) => {
            tracing::info!("all calls finished; server stopped");
            result
        }
        Err(_) => {
            tracing::warn!(
                in_flight = calls.in_flight(),
                "shutdown grace period elapsed with calls still in flight; they are abandoned"
            );
            Ok(())
        }
    }
}
