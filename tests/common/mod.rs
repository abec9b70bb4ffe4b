//! Test harness: starts the real server on 127.0.0.1:0 in-process and hands out real tonic clients.
#![allow(dead_code)] // each test binary uses a different part of the harness

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use chat_token_service::{
    config::Config,
    issuer::local::{KeySet, generate_key},
    proto::ivschat::v1::{CreateChatTokenRequest, token_service_client::TokenServiceClient},
    server,
    stack::{self, TokenStack},
};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::transport::{Channel, Endpoint};

pub const ROOM_ARN: &str = "arn:aws:ivschat:us-west-2:123456789012:room/g1H2I3j4k5L6";

/// A running server and the means to stop it.
pub struct TestServer {
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    handle: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl TestServer {
    /// Starts `stack` with `config`'s server settings on a free loopback port.
    pub async fn start(config: Config, stack: TokenStack) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel();
        let handle = tokio::spawn(async move {
            server::run(listener, &config, stack, async {
                let _ = rx.await;
            })
            .await
        });
        TestServer {
            addr,
            shutdown: Some(tx),
            handle,
        }
    }

    /// Starts the service exactly as `config` describes it.
    pub async fn from_config(config: Config) -> Self {
        let stack = stack::from_config(&config).expect("valid config");
        Self::start(config, stack).await
    }

    pub async fn channel(&self) -> Channel {
        Endpoint::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    pub async fn client(&self) -> TokenServiceClient<Channel> {
        TokenServiceClient::new(self.channel().await)
    }

    /// Asks the server to drain without waiting for it.
    pub fn begin_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Drains and waits for `run` to return.
    pub async fn shutdown(mut self) -> Result<(), tonic::transport::Error> {
        self.begin_shutdown();
        self.handle.await.unwrap()
    }
}

/// A key set file holding one fresh active key, the config pointing at it, and the keys to verify with.
pub struct LocalKeys {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
    pub keys: Arc<KeySet>,
}

impl LocalKeys {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        std::fs::write(
            &path,
            format!("[[keys]]\nkey = \"{}\"\nactive = true\n", generate_key()),
        )
        .unwrap();
        let keys = Arc::new(KeySet::load(&path).unwrap());
        LocalKeys { dir, path, keys }
    }

    pub fn config(&self) -> Config {
        let mut config = Config::default();
        config.local_issuer.keys_file = Some(self.path.clone());
        config
    }
}

/// A request that passes every rule.
pub fn valid_request() -> CreateChatTokenRequest {
    CreateChatTokenRequest {
        room_identifier: ROOM_ARN.into(),
        user_id: "user-1".into(),
        ..Default::default()
    }
}
