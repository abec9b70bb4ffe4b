//! The server around the token service: health checking, reflection, graceful shutdown, and the real
//! binary's start-up and signal handling.

mod common;

use std::{net::SocketAddr, process::Command, sync::Arc, time::Duration};

use chat_token_service::{
    config::Config,
    domain::{Error, IssuedToken, TokenRequest},
    issuer::{Issuer, local::LocalIssuer},
};
use common::{Binary, LocalKeys, TestServer, allowed_by_policy, reflect, valid_request};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::Notify,
};
use tokio_stream::StreamExt;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

#[tokio::test]
async fn health_reports_serving_for_the_server_and_the_token_service() {
    let keys = LocalKeys::new();
    let server = TestServer::from_config(keys.config()).await;
    let mut health = HealthClient::new(server.channel().await);
    for service in ["", "ivschat.v1.TokenService"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "service {service:?}");
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
}

#[tokio::test]
async fn reflection_v1_lists_and_describes_every_service_and_the_error_details() {
    let keys = LocalKeys::new();
    let server = TestServer::from_config(keys.config()).await;
    let (services, described) = reflect(
        server.channel().await,
        &[
            "ivschat.v1.TokenService",
            "ivschat.v1.ModerationService",
            // Error details, so grpcurl can decode them.
            "google.rpc.BadRequest",
        ],
    )
    .await;
    for expected in [
        "ivschat.v1.TokenService",
        "ivschat.v1.ModerationService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    ] {
        assert!(
            services.iter().any(|s| s == expected),
            "{expected} missing from {services:?}"
        );
    }
    let service = |files: &[prost_types::FileDescriptorProto], name: &str| {
        files
            .iter()
            .flat_map(|file| &file.service)
            .find(|s| s.name() == name)
            .map(|s| s.method.len())
    };
    assert_eq!(service(&described[0], "TokenService"), Some(1));
    assert_eq!(
        service(&described[1], "ModerationService"),
        Some(5),
        "ModerationService with its five methods"
    );
    let bad_request = described[2]
        .iter()
        .filter(|file| file.package() == "google.rpc")
        .flat_map(|file| &file.message_type)
        .find(|message| message.name() == "BadRequest");
    assert!(
        bad_request
            .is_some_and(|message| message.field.iter().any(|f| f.name() == "field_violations")),
        "google.rpc.BadRequest with its field_violations"
    );
}

#[tokio::test]
async fn reflection_v1alpha_serves_older_clients() {
    use tonic_reflection::pb::v1alpha::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let keys = LocalKeys::new();
    let server = TestServer::from_config(keys.config()).await;
    let mut client = ServerReflectionClient::new(server.channel().await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::once(request))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        responses.next().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list");
    };
    assert!(
        list.service
            .iter()
            .any(|s| s.name == "ivschat.v1.TokenService")
    );
}

/// An issuer that holds every call until the test releases it.
struct GatedIssuer {
    entered: Arc<Notify>,
    release: Arc<Notify>,
    inner: LocalIssuer,
}

impl Issuer for GatedIssuer {
    const NAME: &'static str = "gated";

    async fn issue(&self, request: TokenRequest) -> Result<IssuedToken, Error> {
        self.entered.notify_one();
        self.release.notified().await;
        self.inner.issue(request).await
    }
}

fn gated(keys: &LocalKeys) -> (Arc<Notify>, Arc<Notify>, GatedIssuer) {
    let entered = Arc::new(Notify::new());
    let release = Arc::new(Notify::new());
    let issuer = GatedIssuer {
        entered: entered.clone(),
        release: release.clone(),
        inner: LocalIssuer::new(keys.keys.clone(), Duration::from_secs(60)),
    };
    (entered, release, issuer)
}

async fn connection_refused(addr: SocketAddr) -> bool {
    tokio::net::TcpStream::connect(addr).await.is_err()
}

#[tokio::test]
async fn shutdown_reports_not_serving_refuses_connections_and_finishes_calls_in_flight() {
    let keys = LocalKeys::new();
    let (entered, release, issuer) = gated(&keys);
    let mut server = TestServer::start(keys.config(), issuer).await;

    // A health watcher on its own connection, opened before shutdown.
    let mut health = HealthClient::new(server.channel().await);
    let mut watch = health
        .watch(HealthCheckRequest {
            service: "ivschat.v1.TokenService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.next().await.unwrap().unwrap().status,
        ServingStatus::Serving as i32
    );

    let mut client = server.client().await;
    let in_flight = tokio::spawn(async move { client.create_chat_token(valid_request()).await });
    entered.notified().await;

    server.begin_shutdown();
    assert_eq!(
        watch.next().await.unwrap().unwrap().status,
        ServingStatus::NotServing as i32
    );
    drop(watch); // a watcher is a call in flight too; a real one goes away when its connection does

    tokio::time::timeout(Duration::from_secs(5), async {
        while !connection_refused(server.addr).await {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the listener should close once shutdown starts");

    release.notify_one();
    let response = in_flight
        .await
        .unwrap()
        .expect("the call in flight completes")
        .into_inner();
    keys.keys
        .verify(&response.token)
        .expect("and its token is valid");
    tokio::time::timeout(Duration::from_secs(5), server.shutdown())
        .await
        .expect("the server stops once the last call is done")
        .unwrap();
}

#[tokio::test]
async fn shutdown_gives_up_on_calls_that_outlast_the_grace_period() {
    let keys = LocalKeys::new();
    let (entered, _release, issuer) = gated(&keys);
    let config = Config {
        shutdown_grace_period: Duration::from_millis(200),
        ..keys.config()
    };
    let server = TestServer::start(config, issuer).await;
    let mut client = server.client().await;
    let stuck = tokio::spawn(async move { client.create_chat_token(valid_request()).await });
    entered.notified().await;
    tokio::time::timeout(Duration::from_secs(10), server.shutdown())
        .await
        .expect("run returns after the grace period")
        .unwrap();
    // In the binary, returning from `run` ends the process and with it the abandoned call; in-process
    // its connection task lives on, so it is dropped here rather than awaited.
    stuck.abort();
}

#[tokio::test]
async fn the_binary_serves_on_defaults_and_exits_0_on_sigterm_and_sigint() {
    for signal in ["-TERM", "-INT"] {
        let binary = Binary::start(&[]);
        let mut client = binary.client().await;
        client.create_chat_token(valid_request()).await.unwrap();
        binary.signal(signal);
        let (status, log) = binary.exit().await;
        assert_eq!(status.code(), Some(0), "{signal}: {log:?}");
        assert!(log.iter().any(|l| l.contains("server stopped")), "{log:?}");
    }
}

#[tokio::test]
async fn sigterm_ends_health_watches_at_once_and_serves_through_the_drain_delay() {
    // The drain delay is long enough that "at once" (within HALF of it) and "within it" stay true on a
    // loaded machine, and short against the 20 s grace period the exit must come long before.
    const DRAIN: Duration = Duration::from_secs(5);
    let binary = Binary::start(&[("CTS_SHUTDOWN_DRAIN_DELAY", "5s")]);
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", binary.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut watch = HealthClient::new(channel.clone())
        .watch(HealthCheckRequest {
            service: "ivschat.v1.TokenService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.next().await.unwrap().unwrap().status,
        ServingStatus::Serving as i32
    );
    let mut client =
        chat_token_service::proto::ivschat::v1::token_service_client::TokenServiceClient::new(
            channel,
        );

    let signalled = std::time::Instant::now();
    binary.signal("-TERM");
    // Heard before half the drain delay: a server that told watchers only when it stopped serving
    // would take the whole delay.
    let update = tokio::time::timeout(DRAIN / 2, watch.next())
        .await
        .expect("the watcher hears of the shutdown at once");
    assert_eq!(
        update.unwrap().unwrap().status,
        ServingStatus::NotServing as i32
    );
    let end = tokio::time::timeout(DRAIN / 2 - signalled.elapsed().min(DRAIN / 2), watch.next())
        .await
        .expect("and its stream ends at once");
    match end {
        None => {}
        Some(Err(status)) => assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}"),
        Some(Ok(update)) => panic!("no update after NOT_SERVING: {update:?}"),
    }

    // Still within the drain delay: new calls are served.
    client
        .create_chat_token(valid_request())
        .await
        .expect("a call during the drain delay succeeds");
    assert!(signalled.elapsed() < DRAIN, "{:?}", signalled.elapsed());

    let (status, log) = binary.exit().await;
    assert_eq!(status.code(), Some(0), "{log:?}");
    assert!(
        signalled.elapsed() >= DRAIN && signalled.elapsed() < Duration::from_secs(15),
        "exits after the 5 s delay, long before the 20 s grace period: {:?}",
        signalled.elapsed()
    );
    assert!(
        log.iter().any(|l| l.contains("drain delay over")),
        "{log:?}"
    );
}

#[test]
fn the_binary_warns_when_its_key_is_ephemeral() {
    let binary = Binary::start(&[]);
    binary.signal("-TERM");
    let (_, log) = binary.wait();
    let log = log.join("\n");
    assert!(log.contains("ephemeral key"), "{log}");
}

#[test]
fn a_bad_setting_stops_start_up_naming_the_setting() {
    let output = Command::new(env!("CARGO_BIN_EXE_chat-token-service"))
        .env_clear()
        .env("CTS_LOCAL_ISSUER__TOKEN_TTL", "2h")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("local_issuer.token_ttl"), "{stderr}");

    let output = Command::new(env!("CARGO_BIN_EXE_chat-token-service"))
        .env_clear()
        .env("CTS_LISTEN_ADDR", "not-an-address")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("listen_addr") && stderr.contains("CTS_LISTEN_ADDR"),
        "{stderr}"
    );
}

#[tokio::test]
async fn generate_key_then_verify_token_round_trip_through_the_cli() {
    let bin = env!("CARGO_BIN_EXE_chat-token-service");
    let key = Command::new(bin).arg("generate-key").output().unwrap();
    assert!(key.status.success());
    let key = String::from_utf8(key.stdout).unwrap().trim().to_owned();
    assert!(key.starts_with("k4.local."), "{key}");

    let dir = tempfile::tempdir().unwrap();
    let keys_file = dir.path().join("keys.toml");
    std::fs::write(
        &keys_file,
        format!("[[keys]]\nkey = \"{key}\"\nactive = true\n"),
    )
    .unwrap();
    let keys_file = keys_file.to_str().unwrap();

    let binary = Binary::start(&[("CTS_LOCAL_ISSUER__KEYS_FILE", keys_file)]);
    let mut client = binary.client().await;
    let token = client
        .create_chat_token(valid_request())
        .await
        .unwrap()
        .into_inner()
        .token;
    binary.signal("-TERM");
    binary.exit().await;

    let mut verify = Command::new(bin)
        .args(["verify-token", "-"])
        .env("CTS_LOCAL_ISSUER__KEYS_FILE", keys_file)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    verify
        .stdin
        .take()
        .unwrap()
        .write_all(token.as_bytes())
        .unwrap();
    let out = verify.wait_with_output().unwrap();
    assert!(out.status.success());
    let claims: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // The names VerifyChatToken gives the claims.
    assert_eq!(claims["room_identifier"], common::ROOM_ARN);
    assert_eq!(claims["user_id"], "user-1");
    assert!(claims["issued_time"].is_string() && claims["token_id"].is_string());

    // Another key set refuses it.
    let other = Command::new(bin)
        .args(["verify-token", &token])
        .env(
            "CTS_LOCAL_ISSUER__KEY",
            chat_token_service::issuer::local::generate_key(),
        )
        .output()
        .unwrap();
    assert_eq!(other.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&other.stderr).contains("key set does not hold"));
}

#[tokio::test]
async fn sighup_reloads_policies_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.cedar");
    let only = |caller: &str| {
        format!(r#"@id("only") permit (principal == Caller::"{caller}", action, resource);"#)
    };
    std::fs::write(&policy, only("a")).unwrap();
    let binary = Binary::start(&[
        ("CTS_POLICY__FILES", &format!("[\"{}\"]", policy.display())),
        ("CTS_RELOAD_INTERVAL", "1h"),
    ]);
    let mut client = binary.client().await;
    let mut allowed = async |caller: &str| {
        let mut request = tonic::Request::new(valid_request());
        request
            .metadata_mut()
            .insert("x-caller-id", caller.parse().unwrap());
        allowed_by_policy(client.create_chat_token(request).await)
    };
    assert!(allowed("a").await && !allowed("b").await);

    std::fs::write(&policy, only("b")).unwrap();
    binary.signal("-HUP");
    // `allowed` borrows the client mutably, so this poll is written out; bounded like `eventually`.
    let deadline = tokio::time::Instant::now() + common::PATIENCE;
    while !allowed("b").await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "SIGHUP did not reload the policy within {:?}",
            common::PATIENCE
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    binary.signal("-TERM");
    let (status, log) = binary.exit().await;
    assert_eq!(status.code(), Some(0));
    assert!(
        log.iter()
            .any(|l| l.contains("policies reloaded") && l.contains("Hangup")),
        "{log:?}"
    );
}

#[tokio::test]
async fn sighup_never_ends_the_binary_on_the_embedded_defaults() {
    let binary = Binary::start(&[]);
    for _ in 0..3 {
        binary.signal("-HUP");
    }
    let mut client = binary.client().await;
    common::eventually("the SIGHUP to be logged", || async {
        binary
            .log
            .try_iter()
            .any(|l| l.contains("SIGHUP received: nothing to reload"))
            .then_some(())
    })
    .await;
    client.create_chat_token(valid_request()).await.unwrap();
    binary.signal("-TERM");
    let (status, log) = binary.exit().await;
    assert_eq!(status.code(), Some(0), "{log:?}");
}

#[test]
fn identity_that_believes_anyone_is_refused_off_loopback() {
    let output = Command::new(env!("CARGO_BIN_EXE_chat-token-service"))
        .env_clear()
        .env("CTS_LISTEN_ADDR", "0.0.0.0:0")
        .env("CTS_POLICY__FILES", "[\"deploy/policy/production.cedar\"]")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("identity.trust_network_in_front") && stderr.contains("\"header\""),
        "{stderr}"
    );
}

#[tokio::test]
async fn eight_thousand_bad_capabilities_get_a_short_invalid_argument() {
    let server = TestServer::from_config(LocalKeys::new().config()).await;
    let mut request = valid_request();
    // As many as fit in max_request_bytes (16 KiB): one byte each.
    request.capabilities = vec![42; 8_000];
    let status = server
        .client()
        .await
        .create_chat_token(request)
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("8000 invalid"), "{status:?}");
    // grpc-go and grpcio refuse header blocks over 8 KiB by default.
    assert!(
        status.message().len() + status.details().len() < 2048,
        "{} + {} bytes",
        status.message().len(),
        status.details().len()
    );
}

/// CreateChatTokenRequest's `room_identifier` (field 1) as raw bytes, to send a string that is not UTF-8.
#[derive(Clone, PartialEq, prost::Message)]
struct RawRoomIdentifier {
    #[prost(bytes = "vec", tag = "1")]
    room_identifier: Vec<u8>,
}

#[tokio::test]
async fn a_request_that_cannot_be_decoded_is_invalid_argument() {
    let server = TestServer::from_config(LocalKeys::new().config()).await;
    let mut grpc = tonic::client::Grpc::new(server.channel().await);
    grpc.ready().await.unwrap();
    let status = grpc
        .unary::<_, (), _>(
            tonic::Request::new(RawRoomIdentifier {
                room_identifier: vec![0xff, 0xfe],
            }),
            http::uri::PathAndQuery::from_static("/ivschat.v1.TokenService/CreateChatToken"),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("UTF-8"), "{status:?}");
}

#[tokio::test]
async fn a_key_rotated_on_disk_is_used_after_sighup_while_tokens_of_the_old_key_still_verify() {
    use chat_token_service::issuer::local::{KeySet, generate_key};
    use chat_token_service::proto::ivschat::v1::{
        VerifyChatTokenRequest, moderation_service_client::ModerationServiceClient,
    };

    let (old, new) = (generate_key(), generate_key());
    let dir = tempfile::tempdir().unwrap();
    let keys_file = dir.path().join("keys.toml");
    std::fs::write(
        &keys_file,
        format!("[[keys]]\nkey = \"{old}\"\nactive = true\n"),
    )
    .unwrap();
    let binary = Binary::start(&[("CTS_LOCAL_ISSUER__KEYS_FILE", keys_file.to_str().unwrap())]);
    let mut client = binary.client().await;
    let mint = |mut client: chat_token_service::proto::ivschat::v1::token_service_client::TokenServiceClient<_>| async move {
        client
            .create_chat_token(valid_request())
            .await
            .unwrap()
            .into_inner()
            .token
    };
    let old_token = mint(client.clone()).await;
    KeySet::from_paserk(&old)
        .unwrap()
        .verify(&old_token)
        .unwrap();

    // Rotate: the new key becomes active, the old one stays listed. reload_interval is 10 s: SIGHUP is
    // what makes the service pick it up now.
    std::fs::write(
        &keys_file,
        format!("[[keys]]\nkey = \"{new}\"\nactive = true\n\n[[keys]]\nkey = \"{old}\"\n"),
    )
    .unwrap();
    binary.signal("-HUP");
    let new_only = KeySet::from_paserk(&new).unwrap();
    let new_token = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let token = mint(client.clone()).await;
            if new_only.verify(&token).is_ok() {
                break token;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("tokens are minted with the new key without a restart");

    // Both keys' tokens verify: with the rotated key set, and in the running service.
    let rotated = KeySet::load(&keys_file).unwrap();
    rotated.verify(&old_token).unwrap();
    rotated.verify(&new_token).unwrap();
    let mut moderation = ModerationServiceClient::connect(format!("http://{}", binary.addr))
        .await
        .unwrap();
    for token in [old_token, new_token] {
        moderation
            .verify_chat_token(VerifyChatTokenRequest { token })
            .await
            .unwrap();
    }
    client.create_chat_token(valid_request()).await.unwrap();

    binary.signal("-TERM");
    let (status, log) = binary.exit().await;
    assert_eq!(status.code(), Some(0));
    assert!(
        log.iter()
            .any(|line| line.contains("local issuer keys reloaded")),
        "{log:#?}"
    );
    // tempfile writes 0644: the key file is readable by others, and the service says so.
    assert!(
        log.iter()
            .any(|line| line.contains("accessible to its group or others")),
        "{log:#?}"
    );
    assert!(
        !log.iter()
            .any(|line| line.contains(&old) || line.contains(&new)),
        "key material never reaches the log"
    );
}

/// An HTTP/2 frame: its 9-byte header and `payload`.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut frame = u32::try_from(payload.len()).unwrap().to_be_bytes()[1..].to_vec();
    frame.extend_from_slice(&[kind, flags]);
    frame.extend_from_slice(&stream.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// An HPACK string literal (no Huffman coding), for strings under 127 bytes.
fn hpack_string(text: &str) -> Vec<u8> {
    let mut out = vec![u8::try_from(text.len()).unwrap()];
    assert!(out[0] < 0x7f);
    out.extend_from_slice(text.as_bytes());
    out
}

/// The header block of a gRPC CreateChatToken call, every field literal without indexing (so each frame
/// stands alone, whatever the server's dynamic table holds).
fn create_chat_token_headers(authority: &str) -> Vec<u8> {
    let mut block = vec![0x83, 0x86]; // :method POST, :scheme http (static table 3 and 6)
    block.push(0x04); // :path (static name 4), literal value
    block.extend(hpack_string("/ivschat.v1.TokenService/CreateChatToken"));
    block.push(0x01); // :authority (static name 1)
    block.extend(hpack_string(authority));
    block.extend([0x0f, 0x10]); // content-type (static name 31)
    block.extend(hpack_string("application/grpc"));
    block.push(0x00); // a new name: te
    block.extend(hpack_string("te"));
    block.extend(hpack_string("trailers"));
    block
}

/// 1,100 streams opened with raw HEADERS frames on one connection, each without its request message, so
/// no client library can queue or drop any: the server takes the 128 it advertises, refuses each of the
/// other 972 with RST_STREAM REFUSED_STREAM (below the 1,024 local resets that would end the connection),
/// and another caller is served meanwhile.
#[tokio::test]
async fn eleven_hundred_header_only_streams_on_one_connection_do_not_shut_out_another_caller() {
    const STREAMS: u32 = 1_100;
    const ADVERTISED: u32 = 128;
    const SETTINGS: u8 = 0x4;
    const HEADERS: u8 = 0x1;
    const RST_STREAM: u8 = 0x3;
    const GOAWAY: u8 = 0x7;
    const END_HEADERS: u8 = 0x4;
    const ACK: u8 = 0x1;
    const REFUSED_STREAM: u32 = 0x7;
    let server = TestServer::from_config(LocalKeys::new().config()).await;
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (mut read, mut write) = tcp.into_split();
    write
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    write
        .write_all(&h2_frame(SETTINGS, 0, 0, &[]))
        .await
        .unwrap();

    // Every frame the server sends: (type, flags, stream, payload).
    let (frames_tx, mut frames) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let mut header = [0u8; 9];
            if read.read_exact(&mut header).await.is_err() {
                return;
            }
            let length = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
            let stream =
                u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff;
            let mut payload = vec![0u8; length];
            if read.read_exact(&mut payload).await.is_err() {
                return;
            }
            if frames_tx
                .send((header[3], header[4], stream, payload))
                .is_err()
            {
                return;
            }
        }
    });
    let (kind, flags, _, advertised) = common::within("the server's SETTINGS", frames.recv())
        .await
        .unwrap();
    assert_eq!((kind, flags), (SETTINGS, 0));
    assert!(
        advertised
            .chunks_exact(6)
            .any(|s| s[..2] == [0, 3] && s[2..] == ADVERTISED.to_be_bytes()),
        "the server advertises {ADVERTISED} concurrent streams"
    );
    let mut flood = h2_frame(SETTINGS, ACK, 0, &[]);
    let block = create_chat_token_headers(&server.addr.to_string());
    for stream in (0..STREAMS).map(|n| 2 * n + 1) {
        flood.extend(h2_frame(HEADERS, END_HEADERS, stream, &block));
    }
    write.write_all(&flood).await.unwrap();

    // Another caller is served while the flood holds its streams.
    server
        .client()
        .await
        .create_chat_token(valid_request())
        .await
        .expect("another caller is served while the flood holds its streams");

    let mut refused = std::collections::BTreeSet::new();
    common::within(
        "a REFUSED_STREAM for every stream past the advertised limit",
        async {
            while refused.len() < (STREAMS - ADVERTISED) as usize {
                let (kind, _, stream, payload) =
                    frames.recv().await.expect("the connection stays open");
                assert_ne!(kind, GOAWAY, "the server ended the connection: {payload:?}");
                assert_ne!(
                    kind, HEADERS,
                    "stream {stream} was answered without its message"
                );
                if kind == RST_STREAM {
                    assert_eq!(
                        u32::from_be_bytes(payload[..4].try_into().unwrap()),
                        REFUSED_STREAM,
                        "stream {stream}"
                    );
                    refused.insert(stream);
                }
            }
        },
    )
    .await;
    let first_refused = 2 * ADVERTISED + 1;
    assert_eq!(
        refused.first().copied(),
        Some(first_refused),
        "the first {ADVERTISED} streams are taken, the rest refused"
    );
    assert_eq!(refused.last().copied(), Some(2 * STREAMS - 1));
}

/// `grpc.reflection.v1.ServerReflectionRequest` (and v1alpha's) with only its `host` (field 1) set, and
/// its `list_services` (field 7) when asked.
#[derive(Clone, PartialEq, prost::Message)]
struct ReflectionHost {
    #[prost(string, tag = "1")]
    host: String,
    #[prost(string, optional, tag = "7")]
    list_services: Option<String>,
}

/// Sends one `ReflectionHost` of `host_bytes` to `path` and returns how the first reply ended: the status
/// of the call or of its first message; `Ok(true)` for a reply, `Ok(false)` for a stream that ended OK.
async fn reflect_host(
    server: &TestServer,
    path: &'static str,
    host_bytes: usize,
) -> Result<bool, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(server.channel().await);
    grpc.ready().await.unwrap();
    let request = ReflectionHost {
        host: "x".repeat(host_bytes),
        list_services: None,
    };
    let response = grpc
        .streaming::<_, ReflectionHost, (), _>(
            tonic::Request::new(tokio_stream::iter([request])),
            http::uri::PathAndQuery::from_static(path),
            tonic_prost::ProstCodec::default(),
        )
        .await?;
    Ok(response.into_inner().message().await?.is_some())
}

#[tokio::test]
async fn an_oversized_reflection_request_is_refused_not_echoed() {
    let server = TestServer::from_config(LocalKeys::new().config()).await;
    for path in [
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    ] {
        // Refused before decoding, and said so: OUT_OF_RANGE, neither a reply echoing the request (before
        // the bound, the 3 MiB host came back inside a 6 MiB reply) nor a stream ending OK with nothing
        // (tonic-reflection's own answer to a request it cannot decode).
        let refused = reflect_host(&server, path, 3 * 1024 * 1024).await;
        match refused {
            Err(status) => assert_eq!(status.code(), tonic::Code::OutOfRange, "{path}: {status:?}"),
            Ok(reply) => {
                panic!("{path}: a 3 MiB request must be refused, not ended OK (reply: {reply})")
            }
        }
        // The same request within the bound is decoded and answered (it asks for nothing, so the answer
        // is INVALID_ARGUMENT).
        let answered = reflect_host(&server, path, 1024)
            .await
            .expect_err("a request without a question");
        assert_eq!(
            answered.code(),
            tonic::Code::InvalidArgument,
            "{path}: {answered:?}"
        );
    }
}

/// A `ServerReflectionRequest` whose `host` (a string) comes as a varint: it cannot be decoded.
#[derive(Clone, PartialEq, prost::Message)]
struct MalformedReflection {
    #[prost(uint64, tag = "1")]
    host: u64,
}

#[tokio::test]
async fn a_reflection_stream_answers_up_to_the_request_it_cannot_decode_then_says_why() {
    let server = TestServer::from_config(LocalKeys::new().config()).await;
    let path = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo";
    // A question, then a message over the bound: the answer, then OUT_OF_RANGE.
    let mut grpc = tonic::client::Grpc::new(server.channel().await);
    grpc.ready().await.unwrap();
    let list = ReflectionHost {
        host: String::new(),
        list_services: Some(String::new()),
    };
    let oversized = ReflectionHost {
        host: "x".repeat(3 * 1024 * 1024),
        list_services: None,
    };
    let mut replies = grpc
        .streaming::<_, ReflectionHost, ReflectionHost, _>(
            tonic::Request::new(tokio_stream::iter([list, oversized])),
            http::uri::PathAndQuery::from_static(path),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .unwrap()
        .into_inner();
    assert!(
        replies.message().await.unwrap().is_some(),
        "the question is answered"
    );
    let refused = replies
        .message()
        .await
        .expect_err("then the oversized request is refused");
    assert_eq!(refused.code(), tonic::Code::OutOfRange, "{refused:?}");
    // A message that is not a ServerReflectionRequest: INTERNAL, not OK.
    let mut grpc = tonic::client::Grpc::new(server.channel().await);
    grpc.ready().await.unwrap();
    let malformed = grpc
        .streaming::<_, MalformedReflection, (), _>(
            tonic::Request::new(tokio_stream::iter([MalformedReflection { host: 1 }])),
            http::uri::PathAndQuery::from_static(path),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .expect_err("a malformed request is refused");
    assert_eq!(malformed.code(), tonic::Code::Internal, "{malformed:?}");
}
