//! Running the service where platform teams run it: Kubernetes service links in the environment, Redis
//! over TLS with a private CA and a client certificate, the `health` command of the image's HEALTHCHECK,
//! and the development mode for a try-out. The real binary or the real server, real Redis, real TLS.

mod common;

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use chat_token_service::{config::Config, store::Backend};
use common::{
    LocalKeys, TestServer,
    pki::{Ca, Leaf},
    redis_server::{RedisServer, TlsFiles, unique_prefix},
    valid_request,
};
use tonic::Code;

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
