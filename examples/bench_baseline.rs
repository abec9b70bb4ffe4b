//! The benchmark's baseline: a bare tonic server on the same proto answering every CreateChatToken with one
//! fixed token, so bench/run.sh can put the service's cost per call beside what tonic itself costs.
//!
//! ```sh
//! cargo run --release --example bench_baseline -- 127.0.0.1:50061
//! ```
//!
//! No identity, policy, limits, issuer, telemetry or in-flight accounting: only transport, HTTP/2 and
//! protobuf, on the same multi-threaded tokio runtime the service uses.

use std::net::SocketAddr;

use chat_token_service::proto::ivschat::v1::{
    CreateChatTokenRequest, CreateChatTokenResponse,
    token_service_server::{TokenService, TokenServiceServer},
};
use tonic::{Request, Response, Status, transport::server::TcpIncoming};

/// As long as a local-issuer token (PASETO v4.local with the usual claims), so both servers send the same
/// number of bytes per answer.
const TOKEN_LEN: usize = 560;

struct FixedToken {
    response: CreateChatTokenResponse,
}

#[tonic::async_trait]
impl TokenService for FixedToken {
    async fn create_chat_token(
        &self,
        _: Request<CreateChatTokenRequest>,
    ) -> Result<Response<CreateChatTokenResponse>, Status> {
        Ok(Response::new(self.response.clone()))
    }
}

#[tokio::main]
async fn main() {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:50061".into())
        .parse()
        .expect("usage: bench_baseline [ADDR:PORT]");
    let now = std::time::SystemTime::now();
    let service = FixedToken {
        response: CreateChatTokenResponse {
            token: format!("v4.local.{}", "A".repeat(TOKEN_LEN - 9)),
            token_expiration_time: Some(now.into()),
            session_expiration_time: Some(now.into()),
            chat_endpoint: String::new(),
        },
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .expect("cannot listen");
    println!(
        "baseline listening on {}",
        listener.local_addr().expect("bound")
    );
    tonic::transport::Server::builder()
        .add_service(TokenServiceServer::new(service))
        .serve_with_incoming(TcpIncoming::from(listener).with_nodelay(Some(true)))
        .await
        .expect("serve");
}
