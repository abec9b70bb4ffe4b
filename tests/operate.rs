//! Running the service where platform teams run it: Kubernetes service links in the environment, Redis
//! over TLS with a private CA and a client certificate, the `health` command of the image's HEALTHCHECK,
//! and the development mode for a try-out. The real binary or the real server, real Redis, real TLS.

mod common;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

use chat_token_service::{
    config::Config, proto::ivschat::v1::token_service_client::TokenServiceClient, store::Backend,
};
use common::{
    Binary, LocalKeys, TestServer,
    pki::{Ca, Leaf},
    redis_server::{RedisServer, TlsFiles, unique_prefix},
    valid_request,
};
use tonic::{Code, Request};

const BINARY: &str = env!("CARGO_BIN_EXE_chat-token-service");

/// The binary run to its end with `args` and only `env` in its environment.
fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(BINARY)
        .env_clear()
        .envs(env.iter().copied())
        .args(args)
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The binary serving with `args` (e.g. `--dev`) and `env`, on the address it logs.
fn serve_with(args: &[&str], env: &[(&str, &str)]) -> Binary {
    let mut command = Command::new(BINARY);
    command.args(args);
    Binary::start_command(command, env)
}

/// Kubernetes' service links for Services named `cts` (the gRPC port) and `cts-redis`.
const SERVICE_LINKS: [(&str, &str); 9] = [
    ("CTS_SERVICE_HOST", "10.96.0.20"),
    ("CTS_SERVICE_PORT", "50051"),
    ("CTS_SERVICE_PORT_GRPC", "50051"),
    ("CTS_PORT", "tcp://10.96.0.20:50051"),
    ("CTS_PORT_50051_TCP", "tcp://10.96.0.20:50051"),
    ("CTS_PORT_50051_TCP_PROTO", "tcp"),
    ("CTS_PORT_50051_TCP_PORT", "50051"),
    ("CTS_PORT_50051_TCP_ADDR", "10.96.0.20"),
    ("CTS_REDIS_SERVICE_HOST", "10.96.0.21"),
];

#[tokio::test]
async fn kubernetes_service_links_do_not_stop_start_up_and_are_named_in_a_warning() {
    let binary = Binary::start(&SERVICE_LINKS);
    let mut client = binary.client().await;
    client.create_chat_token(valid_request()).await.unwrap();
    binary.signal("-TERM");
    let (status, log) = binary.exit().await;
    assert_eq!(status.code(), Some(0));
    let warning = log
        .iter()
        .find(|line| line.contains("service links"))
        .unwrap_or_else(|| panic!("no warning names the service links: {log:?}"));
    for (name, _) in SERVICE_LINKS {
        assert!(
            warning.contains(&format!("\"{name}\"")),
            "{name}: {warning}"
        );
    }

    // `check` names them too.
    let checked = run(&["check"], &SERVICE_LINKS);
    assert_eq!(checked.status.code(), Some(0), "{}", text(&checked.stderr));
    assert!(
        text(&checked.stdout).contains("ignoring Kubernetes service links, not settings: CTS_"),
        "{}",
        text(&checked.stdout)
    );

    // A variable of that name whose value the kubelet would never write is a setting, and unknown.
    let refused = run(&["check"], &[("CTS_REDIS_SERVICE_HOST", "redis.chat.svc")]);
    assert_eq!(refused.status.code(), Some(1));
    let stderr = text(&refused.stderr);
    assert!(
        stderr.contains("unknown field") && stderr.contains("CTS_REDIS_SERVICE_HOST"),
        "{stderr}"
    );
}

/// Writes `leaf`'s certificate and key into `dir` as `NAME.crt` and `NAME.key`.
fn write_leaf(dir: &Path, name: &str, leaf: &Leaf) -> (PathBuf, PathBuf) {
    let (cert, key) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&cert, &leaf.cert_pem).unwrap();
    std::fs::write(&key, &leaf.key_pem).unwrap();
    (cert, key)
}

/// A TLS Redis's files in `dir`: a private CA, a server certificate for `localhost` and a client
/// certificate, both from that CA.
struct RedisPki {
    server: TlsFiles,
    client_cert: PathBuf,
    client_key: PathBuf,
}

impl RedisPki {
    fn new(dir: &Path) -> Self {
        let ca = Ca::new("redis-ca");
        let ca_file = dir.join("redis-ca.crt");
        std::fs::write(&ca_file, ca.pem()).unwrap();
        let (cert, key) = write_leaf(dir, "redis-server", &ca.server());
        let (client_cert, client_key) = write_leaf(
            dir,
            "redis-client",
            &ca.client("spiffe://test/chat-token-service"),
        );
        RedisPki {
            server: TlsFiles {
                cert,
                key,
                ca: ca_file,
            },
            client_cert,
            client_key,
        }
    }
}

/// A configuration with the local issuer, one limit of one call per minute per user, and Redis at
/// `rediss://localhost:PORT` failing closed (so a call that cannot reach Redis is refused, never decided
/// locally), plus `tls` lines for `[limiter]`.
fn rediss_config(keys: &LocalKeys, port: u16, prefix: &str, cluster: bool, tls: &str) -> Config {
    let path = keys
        .dir
        .path()
        .join(format!("config-{}.toml", uuid::Uuid::new_v4()));
    std::fs::write(
        &path,
        format!(
            "[local_issuer]\nkeys_file = \"{}\"\n\n\
             [[rate_limits]]\nname = \"per-user\"\nkey = \"user\"\nrate = \"1/min\"\nburst = 1\n\n\
             [limiter]\nbackend = \"redis\"\nredis_url = \"rediss://localhost:{port}\"\n\
             redis_cluster = {cluster}\nkey_prefix = \"{prefix}\"\nfailure_mode = \"fail_closed\"\n\
             redis_timeout = \"2s\"\n{tls}\n",
            keys.path.display(),
        ),
    )
    .unwrap();
    let mut config = Config::load(Some(&path)).expect("valid config");
    config.shutdown_drain_delay = Duration::ZERO;
    config
}

/// `[limiter]` lines naming the CA and, with `client`, the client certificate and key.
fn tls_lines(pki: &RedisPki, ca: bool, client: bool) -> String {
    let mut lines = String::new();
    if ca {
        lines += &format!("redis_ca_file = \"{}\"\n", pki.server.ca.display());
    }
    if client {
        lines += &format!(
            "redis_client_cert_file = \"{}\"\nredis_client_key_file = \"{}\"\n",
            pki.client_cert.display(),
            pki.client_key.display()
        );
    }
    lines
}

/// What the first token call gets, once Redis has been tried: polls (bounded) until the call is decided
/// by Redis (OK or over the limit) or refused because Redis cannot be reached and the probe has said why.
async fn first_call(server: &TestServer) -> Result<(), Code> {
    let Backend::Redis(stores) = &server.backend else {
        panic!("the Redis backend was configured");
    };
    let redis = stores.limits.redis().clone();
    let mut client = server.client().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match client.create_chat_token(valid_request()).await {
            Ok(_) => return Ok(()),
            Err(status) if status.code() == Code::Unavailable && redis.fault().is_some() => {
                return Err(status.code());
            }
            Err(status) => assert!(
                Instant::now() < deadline,
                "Redis never decided: {status:?}, fault {:?}",
                redis.fault()
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn rediss_with_a_private_ca_and_a_client_certificate_shares_limits_over_tls() {
    let keys = LocalKeys::new();
    let pki = RedisPki::new(keys.dir.path());
    let (redis, tls_port) = RedisServer::tls(&pki.server, true, false);

    // The CA and the client certificate: Redis decides, and keeps its state under our prefix.
    let prefix = unique_prefix();
    let config = rediss_config(
        &keys,
        tls_port,
        &prefix,
        false,
        &tls_lines(&pki, true, true),
    );
    let server = TestServer::from_config(config.clone()).await;
    assert_eq!(first_call(&server).await, Ok(()));
    let mut client = server.client().await;
    let refused = client.create_chat_token(valid_request()).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        !redis.keys(&prefix).is_empty(),
        "the limit's state is in Redis"
    );
    // A second replica shares the budget through the same Redis: nothing left for this user.
    let other = TestServer::from_config(config).await;
    let shared = other
        .client()
        .await
        .create_chat_token(valid_request())
        .await;
    assert_eq!(shared.unwrap_err().code(), Code::ResourceExhausted);

    // Without the CA, the server's certificate is not trusted (the system's roots do not hold it);
    // without the client certificate, Redis refuses the handshake. Either way Redis cannot decide.
    for (ca, client) in [(false, true), (true, false)] {
        let config = rediss_config(
            &keys,
            tls_port,
            &unique_prefix(),
            false,
            &tls_lines(&pki, ca, client),
        );
        let server = TestServer::from_config(config).await;
        assert_eq!(
            first_call(&server).await,
            Err(Code::Unavailable),
            "CA {ca}, client certificate {client}"
        );
    }
}

#[tokio::test]
async fn a_redis_cluster_over_tls_uses_the_ca_and_client_certificate_on_every_node() {
    let keys = LocalKeys::new();
    let pki = RedisPki::new(keys.dir.path());
    let (redis, tls_port) = RedisServer::tls(&pki.server, true, true);

    let prefix = unique_prefix();
    let config = rediss_config(&keys, tls_port, &prefix, true, &tls_lines(&pki, true, true));
    let server = TestServer::from_config(config).await;
    assert_eq!(first_call(&server).await, Ok(()));
    let refused = server
        .client()
        .await
        .create_chat_token(valid_request())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        !redis.keys(&prefix).is_empty(),
        "the limit's state is in Redis"
    );

    let config = rediss_config(
        &keys,
        tls_port,
        &unique_prefix(),
        true,
        &tls_lines(&pki, false, true),
    );
    let untrusted = TestServer::from_config(config).await;
    assert_eq!(first_call(&untrusted).await, Err(Code::Unavailable));
}

#[test]
fn redis_tls_files_are_checked_at_start_up_naming_the_setting() {
    let keys = LocalKeys::new();
    let pki = RedisPki::new(keys.dir.path());
    let not_pem = keys.dir.path().join("not.pem");
    std::fs::write(&not_pem, "not a certificate").unwrap();
    let other_key = write_leaf(keys.dir.path(), "other", &Ca::new("other").server()).1;
    let load = |lines: String| {
        let config = rediss_config(&keys, 6380, &unique_prefix(), false, &lines);
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let _entered = runtime.enter();
        Backend::new(&config.limiter).err().map(|e| e.to_string())
    };
    assert_eq!(load(tls_lines(&pki, true, true)), None);
    for (lines, setting) in [
        (
            format!("redis_ca_file = \"{}\"", not_pem.display()),
            "limiter.redis_ca_file",
        ),
        (
            format!(
                "redis_ca_file = \"{}\"",
                keys.dir.path().join("missing.crt").display()
            ),
            "limiter.redis_ca_file",
        ),
        (
            format!(
                "redis_client_cert_file = \"{}\"\nredis_client_key_file = \"{}\"",
                pki.client_cert.display(),
                other_key.display()
            ),
            "limiter.redis_client_key_file",
        ),
    ] {
        let error = load(lines.clone()).unwrap_or_else(|| panic!("{lines} was accepted"));
        assert!(
            error.starts_with(&format!("configuration error: {setting}: ")),
            "{lines}: {error}"
        );
    }
}

/// A token client of the server listening on `addr`'s port on loopback.
async fn loopback_client(addr: SocketAddr) -> TokenServiceClient<tonic::transport::Channel> {
    TokenServiceClient::connect(format!("http://127.0.0.1:{}", addr.port()))
        .await
        .unwrap()
}

#[tokio::test]
async fn development_mode_serves_the_trusting_defaults_on_every_address_and_says_so() {
    let anywhere = [("CTS_LISTEN_ADDR", "0.0.0.0:0")];
    // Without --dev, the defaults are refused off loopback, pointing at --dev.
    let refused = run(&["check"], &anywhere);
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        text(&refused.stderr).contains("serve --dev"),
        "{}",
        text(&refused.stderr)
    );

    for args in [&["--dev"][..], &["serve", "--dev"]] {
        let binary = serve_with(args, &anywhere);
        assert!(
            binary.addr.ip().is_unspecified(),
            "{args:?}: {}",
            binary.addr
        );
        let mut client = loopback_client(binary.addr).await;
        let mut request = Request::new(valid_request());
        request
            .metadata_mut()
            .insert("x-caller-id", "spiffe://try/out".parse().unwrap());
        client.create_chat_token(request).await.unwrap();
        // The image's HEALTHCHECK in the try-out: the same variables, 0.0.0.0 dialled as 127.0.0.1.
        let listen = binary.addr.to_string();
        let healthy = health(&[("CTS_LISTEN_ADDR", listen.as_str())]);
        assert_eq!(healthy.status.code(), Some(0), "{}", text(&healthy.stderr));
        assert_eq!(
            text(&healthy.stdout),
            format!(
                "ivschat.v1.TokenService on 127.0.0.1:{}: SERVING\n",
                binary.addr.port()
            )
        );
        binary.signal("-TERM");
        let (status, log) = binary.exit().await;
        assert_eq!(status.code(), Some(0));
        let warning = log
            .iter()
            .find(|line| line.contains("DEVELOPMENT MODE"))
            .unwrap_or_else(|| panic!("{args:?}: no development-mode warning in {log:?}"));
        for trusted in [
            "the development policy permits every valid request",
            "x-caller-id header",
            "pass as \"anonymous\"",
            "0.0.0.0:",
        ] {
            assert!(warning.contains(trusted), "{trusted}: {warning}");
        }
    }

    // --dev is serve's: with another subcommand it is a usage error.
    let misused = run(&["--dev", "check"], &[]);
    assert_eq!(misused.status.code(), Some(2), "{}", text(&misused.stderr));
}

/// `health` against the server `env` describes (the same variables the server was started with).
fn health(env: &[(&str, &str)]) -> Output {
    run(&["health", "--timeout", "5s"], env)
}

#[tokio::test]
async fn health_exits_0_while_serving_1_when_draining_or_stopped_2_on_a_configuration_error() {
    // A drain delay long enough to be seen: after SIGTERM the server reports NOT_SERVING and keeps
    // serving meanwhile.
    let binary = Binary::start(&[("CTS_SHUTDOWN_DRAIN_DELAY", "30s")]);
    let listen = binary.addr.to_string();
    let env = [("CTS_LISTEN_ADDR", listen.as_str())];

    let serving = health(&env);
    assert_eq!(serving.status.code(), Some(0), "{}", text(&serving.stderr));
    assert_eq!(
        text(&serving.stdout),
        format!("ivschat.v1.TokenService on {listen}: SERVING\n")
    );
    let liveness = run(&["health", "--service", ""], &env);
    assert_eq!(
        liveness.status.code(),
        Some(0),
        "{}",
        text(&liveness.stderr)
    );

    binary.signal("-TERM");
    let deadline = Instant::now() + Duration::from_secs(20);
    let draining = loop {
        let outcome = health(&env);
        if outcome.status.code() != Some(0) {
            break outcome;
        }
        assert!(Instant::now() < deadline, "still SERVING after SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(draining.status.code(), Some(1));
    assert!(
        text(&draining.stderr).contains("ivschat.v1.TokenService on 127.0.0.1:"),
        "{}",
        text(&draining.stderr)
    );
    assert!(
        text(&draining.stderr).contains("is NOT_SERVING"),
        "{}",
        text(&draining.stderr)
    );
    drop(binary);

    let stopped = health(&env);
    assert_eq!(stopped.status.code(), Some(1));
    assert!(
        text(&stopped.stderr).contains("cannot reach"),
        "{}",
        text(&stopped.stderr)
    );

    let misconfigured = health(&[("CTS_CONFIG", "/nonexistent/config.toml")]);
    assert_eq!(
        misconfigured.status.code(),
        Some(2),
        "{}",
        text(&misconfigured.stderr)
    );
    let bad_flag = run(&["health", "--timeout", "soon"], &[]);
    assert_eq!(bad_flag.status.code(), Some(2));
}

#[tokio::test]
async fn health_speaks_mutual_tls_trusting_exactly_the_servers_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("cts-ca");
    let ca_file = dir.path().join("ca.crt");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let (cert, key) = write_leaf(dir.path(), "server", &ca.server());
    let (cert, key, ca_file) = (
        cert.display().to_string(),
        key.display().to_string(),
        ca_file.display().to_string(),
    );
    let tls = [
        ("CTS_TLS__CERT_FILE", cert.as_str()),
        ("CTS_TLS__KEY_FILE", key.as_str()),
        ("CTS_TLS__CLIENT_CA_FILE", ca_file.as_str()),
    ];
    let binary = Binary::start(&tls);
    let listen = binary.addr.to_string();
    let mut env = tls.to_vec();
    env.push(("CTS_LISTEN_ADDR", listen.as_str()));

    let serving = health(&env);
    assert_eq!(serving.status.code(), Some(0), "{}", text(&serving.stderr));

    // Another certificate from the same CA is not the server's own: not trusted.
    let (other_cert, other_key) = write_leaf(dir.path(), "other", &ca.server());
    let (other_cert, other_key) = (
        other_cert.display().to_string(),
        other_key.display().to_string(),
    );
    let mut impostor = env.clone();
    impostor[0].1 = &other_cert;
    impostor[1].1 = &other_key;
    let refused = health(&impostor);
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        text(&refused.stderr).contains("cannot reach"),
        "{}",
        text(&refused.stderr)
    );
    // Plaintext to a TLS server answers nothing a health client understands.
    let plaintext = health(&[("CTS_LISTEN_ADDR", listen.as_str())]);
    assert_eq!(plaintext.status.code(), Some(1));
    // A key that does not load is a configuration error.
    let mut broken = env.clone();
    broken[1].1 = &cert;
    assert_eq!(health(&broken).status.code(), Some(2));

    binary.signal("-TERM");
    assert_eq!(binary.exit().await.0.code(), Some(0));
}
