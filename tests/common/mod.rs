//! Test harness: starts the real server on 127.0.0.1:0 in-process and hands out real tonic clients.
#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod idp;
pub mod ivs_stub;
pub mod pki;
pub mod raw;
pub mod redis_server;

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::Duration,
};

use chat_token_service::{
    app::{self, App, Overrides},
    config::{Config, EndpointUrl, IssuerKind},
    issuer::{
        Issuer,
        local::{KeySet, generate_key},
    },
    proto::ivschat::v1::{CreateChatTokenRequest, token_service_client::TokenServiceClient},
    server,
    store::Backend,
};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::transport::{Channel, Endpoint};

pub const ROOM_ARN: &str = "arn:aws:ivschat:us-west-2:123456789012:room/g1H2I3j4k5L6";

/// A running server and the means to stop it.
pub struct TestServer {
    pub addr: SocketAddr,
    /// The state backend it uses, for observing it (Redis outages, readiness).
    pub backend: Backend,
    shutdown: Option<oneshot::Sender<()>>,
    handle: JoinHandle<Result<(), chat_token_service::server::ServerError>>,
}

impl TestServer {
    /// Starts the service exactly as `config` describes it, through the functions the binary uses.
    pub async fn from_config(config: Config) -> Self {
        Self::serve(app::build(&config).await.expect("valid config")).await
    }

    /// Starts the service around `issuer`, with everything else as `config` describes it.
    pub async fn start(config: Config, issuer: impl Issuer) -> Self {
        Self::serve(
            app::build_around(&config, issuer)
                .await
                .expect("valid config"),
        )
        .await
    }

    /// Starts the service with the ivs issuer against `stub`, with static test credentials; `tweak` sets
    /// the rest of the configuration.
    pub async fn ivs(stub: &ivs_stub::IvsStub, tweak: impl FnOnce(&mut Config)) -> Self {
        let mut config = Config {
            issuer: IssuerKind::Ivs,
            ..Config::default()
        };
        config.ivs.endpoint_url = Some(EndpointUrl::parse(&stub.endpoint()).unwrap());
        config.ivs.initial_backoff = Duration::from_millis(5);
        tweak(&mut config);
        let base = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(None::<aws_config::Region>)
            .credentials_provider(aws_sdk_ivschat::config::Credentials::new(
                "AKIDSTUB",
                "stub-secret",
                None,
                None,
                "test",
            ))
            .load()
            .await;
        let overrides = Overrides {
            aws_sdk: Some(base),
        };
        Self::serve(
            app::build_with(&config, overrides)
                .await
                .expect("valid config"),
        )
        .await
    }

    /// Serves `app` on a free loopback port.
    pub async fn serve(app: App) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let backend = app.backend.clone();
        let (tx, rx) = oneshot::channel();
        let handle = tokio::spawn(async move {
            server::run(listener, app, async {
                let _ = rx.await;
            })
            .await
        });
        TestServer {
            addr,
            backend,
            shutdown: Some(tx),
            handle,
        }
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
    pub async fn shutdown(mut self) -> Result<(), chat_token_service::server::ServerError> {
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
        // Nothing in front of a test server polls its health.
        config.shutdown_drain_delay = std::time::Duration::ZERO;
        config
    }
}

/// The production example policy and entities shipped in deploy/policy.
pub fn production_policy(config: &mut Config) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/policy");
    config.policy.files = vec![root.join("production.cedar")];
    config.policy.entities_file = Some(root.join("production.entities.json"));
}

pub const WEB: &str = "spiffe://cluster.local/ns/chat/sa/web";
pub const MODERATION: &str = "spiffe://cluster.local/ns/chat/sa/moderation";
/// The production example's end-user-facing caller: it mints only for end users proven by their tokens.
pub const WEB_GATEWAY: &str = "spiffe://cluster.local/ns/chat/sa/web-gateway";
pub const ACCOUNT_111_ROOM: &str = "arn:aws:ivschat:us-west-2:111111111111:room/lobby";
pub const ACCOUNT_222_ROOM: &str = "arn:aws:ivschat:eu-west-1:222222222222:room/backstage";

/// A request that passes every rule.
pub fn valid_request() -> CreateChatTokenRequest {
    CreateChatTokenRequest {
        room_identifier: ROOM_ARN.into(),
        user_id: "user-1".into(),
        ..Default::default()
    }
}

/// How long a test waits for something that should happen soon before it fails: generous, because a
/// loaded 2-core machine is slow, and finite, so a broken feature fails with a message instead of hanging.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// `limiter.redis_timeout` for tests that are not about it, as a setting (`CTS_LIMITER__REDIS_TIMEOUT`, a
/// TOML value; [`redis_timeout`] as a `Duration`). The default, 50 ms, is a production budget: on a loaded
/// 2-core machine a Redis round trip sometimes takes longer, and the call then fails closed (or falls
/// back to local state) for a reason the test is not about. Tests of the timeout set their own.
pub const REDIS_TIMEOUT_SETTING: &str = "2s";

/// [`REDIS_TIMEOUT_SETTING`] as a `Duration`, for configs built in Rust.
pub fn redis_timeout() -> Duration {
    humantime::parse_duration(REDIS_TIMEOUT_SETTING).expect("a valid duration")
}

/// Polls `check` every 10 ms until it gives a value; fails naming `what` after [`PATIENCE`].
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "waited {PATIENCE:?} for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `future`'s output; fails naming `what` if it takes longer than [`PATIENCE`].
pub async fn within<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, future)
        .await
        .unwrap_or_else(|_| panic!("waited {PATIENCE:?} for {what}"))
}

/// The real binary, started with `envs`, and the address it logged.
pub struct Binary {
    pub child: Child,
    pub addr: SocketAddr,
    /// Lines read while waiting for the address.
    startup_log: Vec<String>,
    pub log: std::sync::mpsc::Receiver<String>,
}

impl Binary {
    pub fn start(envs: &[(&str, &str)]) -> Binary {
        Self::start_command(Command::new(env!("CARGO_BIN_EXE_chat-token-service")), envs)
    }

    /// [`Binary::start`], with at most `fds` open file descriptors (`ulimit -n`).
    pub fn start_with_fd_limit(fds: u32, envs: &[(&str, &str)]) -> Binary {
        let mut command = Command::new("sh");
        command.args([
            "-c",
            &format!("ulimit -n {fds} && exec \"$0\""),
            env!("CARGO_BIN_EXE_chat-token-service"),
        ]);
        Self::start_command(command, envs)
    }

    pub fn start_command(mut command: Command, envs: &[(&str, &str)]) -> Binary {
        let mut child = command
            .env_clear()
            .env("CTS_LISTEN_ADDR", "127.0.0.1:0")
            .env("RUST_LOG", "info")
            // Nothing in front of a test binary polls its health; tests that need the delay set it.
            .env("CTS_SHUTDOWN_DRAIN_DELAY", "0s")
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, log) = std::sync::mpsc::channel();
        let stderr = BufReader::new(child.stderr.take().unwrap());
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut startup_log = Vec::new();
        let addr = loop {
            let line = log
                .recv_timeout(Duration::from_secs(30))
                .expect("the binary should log its address");
            // Text logs say `addr=IP:PORT`, JSON logs `"addr":"IP:PORT"`.
            let addr = line
                .split("addr=")
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .or_else(|| line.split("\"addr\":\"").nth(1)?.split('"').next())
                .map(|addr| addr.parse::<SocketAddr>().unwrap());
            startup_log.push(line);
            if let Some(addr) = addr {
                break addr;
            }
        };
        Binary {
            child,
            addr,
            startup_log,
            log,
        }
    }

    /// A client connected to the binary.
    pub async fn client(&self) -> TokenServiceClient<Channel> {
        TokenServiceClient::connect(format!("http://{}", self.addr))
            .await
            .unwrap()
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits, at most [`PATIENCE`], for the binary to exit and its log to end, without blocking the
    /// runtime (the binary may need a collector or stub served by this test's runtime to exit); returns
    /// its status and everything it logged. A binary still running after that fails the test, and is
    /// killed when dropped.
    pub async fn exit(mut self) -> (std::process::ExitStatus, Vec<String>) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "waited {PATIENCE:?} for the binary to exit"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let mut log = std::mem::take(&mut self.startup_log);
        // The reader thread ends at EOF, which follows exit.
        loop {
            match self.log.try_recv() {
                Ok(line) => log.push(line),
                Err(std::sync::mpsc::TryRecvError::Disconnected) => break,
                Err(std::sync::mpsc::TryRecvError::Empty) => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "waited {PATIENCE:?} for the binary's log to end"
                    );
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
        (status, log)
    }

    /// [`Binary::exit`], bounded the same way, but blocking its thread (and so a worker of the runtime):
    /// only for tests not yet moved to `exit().await`.
    pub fn wait(mut self) -> (std::process::ExitStatus, Vec<String>) {
        let deadline = std::time::Instant::now() + PATIENCE;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "waited {PATIENCE:?} for the binary to exit"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut log = std::mem::take(&mut self.startup_log);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.log.recv_timeout(left) {
                Ok(line) => log.push(line),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    panic!("waited {PATIENCE:?} for the binary's log to end")
                }
            }
        }
        (status, log)
    }
}

/// A test that ends (or fails) without stopping its binary does not leave it running.
impl Drop for Binary {
    fn drop(&mut self) {
        // Both do nothing once the binary has exited and been waited for.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The status reflection v1 answers a ListServices with on `channel`: its error, or OK.
pub async fn reflect_status(channel: Channel) -> tonic::Status {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest,
    };
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut client = ServerReflectionClient::new(channel);
    match client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
    {
        Err(status) => status,
        Ok(stream) => match stream.into_inner().message().await {
            Err(status) => status,
            Ok(_) => tonic::Status::ok(""),
        },
    }
}

/// What reflection v1 says on `channel`: the services it lists, and for each of `symbols` the file
/// descriptors it answers, decoded.
pub async fn reflect(
    channel: Channel,
    symbols: &[&str],
) -> (Vec<String>, Vec<Vec<prost_types::FileDescriptorProto>>) {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let request = |message| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(message),
    };
    let requests: Vec<_> = std::iter::once(request(MessageRequest::ListServices(String::new())))
        .chain(
            symbols
                .iter()
                .map(|symbol| request(MessageRequest::FileContainingSymbol(symbol.to_string()))),
        )
        .collect();
    let mut responses = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        responses.message().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list");
    };
    let mut described = Vec::new();
    for symbol in symbols {
        let Some(MessageResponse::FileDescriptorResponse(files)) =
            responses.message().await.unwrap().unwrap().message_response
        else {
            panic!("expected the file descriptors of {symbol}");
        };
        described.push(
            files
                .file_descriptor_proto
                .iter()
                .map(|file| prost::Message::decode(file.as_slice()).unwrap())
                .collect(),
        );
    }
    (
        list.service.into_iter().map(|s| s.name).collect(),
        described,
    )
}

/// Whether policy allowed a call: `true` when it succeeded, `false` when refused PERMISSION_DENIED by
/// policy (ErrorInfo `POLICY_DENIED`). Anything else (UNAVAILABLE, a dead server, a validation error)
/// fails the test: it says nothing about policy.
pub fn allowed_by_policy<T: std::fmt::Debug>(result: Result<T, tonic::Status>) -> bool {
    use tonic_types::StatusExt;
    match result {
        Ok(_) => true,
        Err(status) if status.code() == tonic::Code::PermissionDenied => {
            let reason = status.get_details_error_info().map(|info| info.reason);
            assert_eq!(
                reason.as_deref(),
                Some("POLICY_DENIED"),
                "refused, but not by policy: {status:?}"
            );
            false
        }
        Err(status) => panic!("neither allowed nor denied by policy: {status:?}"),
    }
}
