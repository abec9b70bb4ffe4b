//! The benchmark's load generator: a fixed number of calls in flight over a few HTTP/2 connections, every
//! answer's status checked, latencies in an HDR histogram. bench/run.sh drives it; on its own:
//!
//! ```sh
//! # CreateChatToken through a tonic client: 64 calls in flight over 4 connections.
//! cargo run --release --example loadgen -- grpc --addr 127.0.0.1:50051 --requests 100000
//! # The same, one distinct user id per call, then the server's peak and current RSS.
//! cargo run --release --example loadgen -- grpc --addr 127.0.0.1:50051 --users 1000000 \
//!   --requests 1000000 --server-pid "$(pgrep -n chat-token-service)"
//! # 10,000 rooms and 1,000 callers (x-caller-id spiffe://cluster.local/ns/caller-N/sa/web; the server
//! # needs those callers in its entities file, see bench/run.sh).
//! cargo run --release --example loadgen -- grpc --addr 127.0.0.1:50051 --rooms 10000 --callers 1000
//! # CreateChatToken over the IVS REST-JSON door: HTTP/1.1 keep-alive (one connection per call in
//! # flight), or h2c (--h2c, over --connections), optionally SigV4-signed with a key of the server's
//! # identity.sigv4.credentials_file.
//! cargo run --release --example loadgen -- http --addr 127.0.0.1:50051 --h2c \
//!   --sign CTSWEB0000000000001:webSecretAccessKey0000000000000000000000
//! # CreateChatToken straight to an IVS Chat endpoint (the stub) through aws-sdk-ivschat.
//! cargo run --release --example loadgen -- ivs --endpoint http://127.0.0.1:4566 --requests 20000
//! # What unauthenticated clients can make the server hold: 64 connections × 100 streams, each with
//! # 12 KiB of headers and a 16 KiB message announced but never finished; RSS before and while held.
//! cargo run --release --example loadgen -- hold --addr 127.0.0.1:50051 --connections 64 --streams 100 \
//!   --server-pid "$(pgrep -n chat-token-service)"
//! # The same, each call forwarding an end user's identity token (end-user binding): first a JWK set file
//! # and a token for user-0, signed with an RSA key (PKCS#1 DER, e.g. from `openssl genpkey`).
//! cargo run --release --example loadgen -- end-user-token --rsa-key key.der --jwks jwks.json \
//!   --issuer https://id.example.com --audience chat-app --sub user-0 > token
//! cargo run --release --example loadgen -- grpc --addr 127.0.0.1:50051 --end-user-token "$(cat token)"
//! # Milliseconds from exec to the token service answering SERVING on the gRPC health check.
//! cargo run --release --example loadgen -- startup --addr 127.0.0.1:50051 -- target/release/chat-token-service
//! ```
//!
//! The result is one line of `key=value` pairs on stdout (the first failure, if any, on stderr); the exit
//! status is non-zero when any call failed.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use chat_token_service::proto::ivschat::v1::{
    CreateChatTokenRequest, token_service_client::TokenServiceClient,
};
use clap::{Args, Parser, Subcommand};
use hdrhistogram::Histogram;
use http_body_util::Full;
use tokio::sync::Mutex;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// CreateChatToken over gRPC (the service or the baseline).
    Grpc {
        /// The server, `host:port` (plaintext HTTP/2).
        #[arg(long)]
        addr: SocketAddr,
        /// An end user's identity token sent with every call (`x-end-user-token`); its user must be
        /// every call's, so use it with `--users 1`.
        #[arg(long)]
        end_user_token: Option<String>,
        #[command(flatten)]
        load: Load,
    },
    /// CreateChatToken over the IVS REST-JSON door (`POST /CreateChatToken`, JSON), as an AWS SDK sends
    /// it: HTTP/1.1 keep-alive with one connection per call in flight, or h2c over `--connections`.
    Http {
        /// The server, `host:port` (plaintext).
        #[arg(long)]
        addr: SocketAddr,
        /// HTTP/2 with prior knowledge (h2c) instead of HTTP/1.1.
        #[arg(long)]
        h2c: bool,
        /// Sign every call with SigV4 (service `ivschat`, region `us-west-2`) with this
        /// `ACCESS_KEY_ID:SECRET_ACCESS_KEY`; unsigned when absent.
        #[arg(long)]
        sign: Option<String>,
        #[command(flatten)]
        load: Load,
    },
    /// Writes a JWK set file with the public half of an RSA key and prints an RS256 ID token signed with
    /// it, valid for an hour: the fixture of the end-user binding benchmark.
    EndUserToken {
        /// The RSA private key, PKCS#1 DER (`openssl genpkey -algorithm RSA -outform DER`).
        #[arg(long)]
        rsa_key: PathBuf,
        /// Where the JWK set is written.
        #[arg(long)]
        jwks: PathBuf,
        /// The token's `iss`.
        #[arg(long)]
        issuer: String,
        /// The token's `aud`.
        #[arg(long)]
        audience: String,
        /// The token's `sub`.
        #[arg(long, default_value = "user-0")]
        sub: String,
    },
    /// CreateChatToken straight to an IVS Chat endpoint through aws-sdk-ivschat.
    Ivs {
        /// The endpoint override, e.g. the stub's `http://127.0.0.1:4566`.
        #[arg(long)]
        endpoint: String,
        #[command(flatten)]
        load: Load,
    },
    /// Opens streams that send their headers and the start of a message, and never finish: what an
    /// unauthenticated client can make the server hold. Reports how many the server shed at once, and
    /// its RSS before and while they are held.
    Hold {
        /// The server, `host:port` (plaintext HTTP/2).
        #[arg(long)]
        addr: SocketAddr,
        /// HTTP/2 connections.
        #[arg(long, default_value_t = 64)]
        connections: usize,
        /// Streams opened on each connection.
        #[arg(long, default_value_t = 100)]
        streams: usize,
        /// Bytes of padding header per stream (besides the gRPC ones).
        #[arg(long, default_value_t = 12 * 1024)]
        header_bytes: usize,
        /// The message length each stream announces in its gRPC prefix.
        #[arg(long, default_value_t = 16_000)]
        message_bytes: u32,
        /// Bytes of the message each stream sends.
        #[arg(long, default_value_t = 1_000)]
        sent_bytes: usize,
        /// Seconds to hold the streams open before measuring.
        #[arg(long, default_value_t = 2)]
        settle_seconds: u64,
        /// The server process whose RSS is reported.
        #[arg(long)]
        server_pid: u32,
        /// Connect over TLS, trusting this CA (PEM) for the name `localhost`.
        #[arg(long)]
        tls_ca: Option<PathBuf>,
    },
    /// Runs a server and prints the time from exec until its token service answers SERVING.
    Startup {
        /// Where the server listens (set it in the server's configuration too).
        #[arg(long)]
        addr: SocketAddr,
        /// The server's command line.
        #[arg(last = true, required = true)]
        command: Vec<PathBuf>,
    },
}

#[derive(Args, Clone)]
struct Load {
    /// Calls measured.
    #[arg(long, default_value_t = 50_000)]
    requests: u64,
    /// The most seconds a run may take: it stops early, with fewer calls, when the server is slow.
    #[arg(long, default_value_t = 20)]
    max_seconds: u64,
    /// Calls made before measuring (connections, caches, allocator warm).
    #[arg(long, default_value_t = 2_000)]
    warmup: u64,
    /// Calls in flight at any time.
    #[arg(long, default_value_t = 64)]
    concurrency: u64,
    /// HTTP/2 connections the calls are spread over (gRPC and h2c).
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Distinct user ids, `user-0` … `user-(N-1)`, one after the other; 1 sends `user-0` every time.
    #[arg(long, default_value_t = 1)]
    users: u64,
    /// The room every call asks for; with `--rooms N` above 1, call `i` asks for this ARN followed by
    /// `-(i % N)`.
    #[arg(
        long,
        default_value = "arn:aws:ivschat:us-west-2:111111111111:room/lobby"
    )]
    room: String,
    /// Distinct rooms, one after the other (see `--room`).
    #[arg(long, default_value_t = 1)]
    rooms: u64,
    /// Distinct callers named in `x-caller-id`, `spiffe://cluster.local/ns/caller-N/sa/web` for N from 0
    /// to `callers - 1`, one after the other; 0 (the default) sends no `x-caller-id`.
    #[arg(long, default_value_t = 0)]
    callers: u64,
    /// A server process whose peak and current RSS (from /proc) are reported after the run.
    #[arg(long)]
    server_pid: Option<u32>,
}

/// The VmRSS of `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("the server process is gone")
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .expect("/proc/PID/status has VmRSS")
}

/// See [`Command::Hold`].
#[allow(clippy::too_many_arguments)]
async fn hold(
    tls: Option<tokio_rustls::TlsConnector>,
    addr: SocketAddr,
    connections: usize,
    streams: usize,
    header_bytes: usize,
    message_bytes: u32,
    sent_bytes: usize,
    settle: Duration,
    server_pid: u32,
) -> ExitCode {
    let before = rss_kib(server_pid);
    let mut prefix = vec![0u8];
    prefix.extend_from_slice(&message_bytes.to_be_bytes());
    prefix.resize(5 + sent_bytes.min(message_bytes as usize), 0x0a);
    let prefix = bytes::Bytes::from(prefix);
    let padding = "p".repeat(header_bytes);
    let mut held = Vec::new();
    let mut responses = Vec::new();
    let mut open = 0usize;
    for _ in 0..connections {
        let Ok(tcp) = tokio::net::TcpStream::connect(addr).await else {
            break;
        };
        let send = match &tls {
            None => {
                let Ok((send, connection)) = h2::client::handshake(tcp).await else {
                    continue;
                };
                held.push(tokio::spawn(async move {
                    let _ = connection.await;
                }));
                send
            }
            Some(connector) => {
                let name = "localhost".try_into().expect("a valid name");
                let Ok(tls) = connector.connect(name, tcp).await else {
                    continue;
                };
                let Ok((send, connection)) = h2::client::handshake(tls).await else {
                    continue;
                };
                held.push(tokio::spawn(async move {
                    let _ = connection.await;
                }));
                send
            }
        };
        open += 1;
        for _ in 0..streams {
            let Ok(mut send) = send.clone().ready().await else {
                break;
            };
            let request = http::Request::post(format!(
                "http://{addr}/ivschat.v1.TokenService/CreateChatToken"
            ))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("x-padding", padding.as_str())
            .body(())
            .expect("a valid request");
            let Ok((response, mut body)) = send.send_request(request, false) else {
                break;
            };
            let _ = body.send_data(prefix.clone(), false);
            responses.push((response, body));
        }
    }
    tokio::time::sleep(settle).await;
    let during = rss_kib(server_pid);
    // A stream the server shed has its answer by now; the others are still waiting.
    let mut shed = 0usize;
    let mut waiting = 0usize;
    for (response, _body) in &mut responses {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match std::pin::Pin::new(response).poll(&mut cx) {
            std::task::Poll::Ready(_) => shed += 1,
            std::task::Poll::Pending => waiting += 1,
        }
    }
    println!(
        "connections={open} streams={} held={waiting} shed={shed} rss_before_kib={before} \
         rss_held_kib={during} held_kib={}",
        responses.len(),
        during.saturating_sub(before)
    );
    drop(responses);
    for connection in held {
        connection.abort();
    }
    ExitCode::SUCCESS
}

/// A TLS connector that trusts the CA in `ca` (PEM) and offers HTTP/2.
fn tls_connector(ca: &std::path::Path) -> tokio_rustls::TlsConnector {
    use rustls_pki_types::{CertificateDer, pem::PemObject};
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("a readable CA file") {
        roots
            .add(cert.expect("a PEM certificate"))
            .expect("a CA certificate");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS 1.2 and 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// What one call asks for.
struct Call {
    room: String,
    user: String,
    /// The `x-caller-id` to send, if any.
    caller: Option<String>,
}

/// Something that makes one CreateChatToken call.
trait Caller: Clone + Send + 'static {
    /// Makes `call`; the error says what went wrong.
    fn call(&mut self, call: Call) -> impl Future<Output = Result<(), String>> + Send;
}

#[derive(Clone)]
struct GrpcCaller {
    client: TokenServiceClient<Channel>,
    end_user_token: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

impl Caller for GrpcCaller {
    async fn call(&mut self, call: Call) -> Result<(), String> {
        let mut request = tonic::Request::new(CreateChatTokenRequest {
            room_identifier: call.room,
            user_id: call.user,
            ..Default::default()
        });
        if let Some(token) = &self.end_user_token {
            request
                .metadata_mut()
                .insert("x-end-user-token", token.clone());
        }
        if let Some(caller) = call.caller {
            request.metadata_mut().insert(
                "x-caller-id",
                caller.parse().map_err(|_| "a caller id is ASCII")?,
            );
        }
        match self.client.create_chat_token(request).await {
            Ok(response) if !response.get_ref().token.is_empty() => Ok(()),
            Ok(_) => Err("OK with an empty token".into()),
            Err(status) => Err(format!("{:?}: {}", status.code(), status.message())),
        }
    }
}

#[derive(Clone)]
struct IvsCaller(aws_sdk_ivschat::Client);

impl Caller for IvsCaller {
    async fn call(&mut self, call: Call) -> Result<(), String> {
        match self
            .0
            .create_chat_token()
            .room_identifier(call.room)
            .user_id(call.user)
            .send()
            .await
        {
            Ok(output) if output.token.is_some() => Ok(()),
            Ok(_) => Err("OK without a token".into()),
            Err(error) => Err(format!(
                "{}",
                aws_sdk_ivschat::error::DisplayErrorContext(error)
            )),
        }
    }
}

/// An HTTP/1.1 connection (one call at a time) or an h2c one (shared by the workers given it).
#[derive(Clone)]
enum HttpConnection {
    Http1(Arc<Mutex<hyper::client::conn::http1::SendRequest<Full<Bytes>>>>),
    H2c(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

/// CreateChatToken over the REST-JSON door, signed with SigV4 when `key` is set.
#[derive(Clone)]
struct HttpCaller {
    connection: HttpConnection,
    host: Arc<str>,
    /// Access key id and secret.
    key: Option<Arc<(String, String)>>,
}

impl HttpCaller {
    async fn connect(addr: SocketAddr, h2c: bool, key: Option<Arc<(String, String)>>) -> Self {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .expect("cannot connect");
        tcp.set_nodelay(true).expect("TCP_NODELAY");
        let io = hyper_util::rt::TokioIo::new(tcp);
        let connection = if h2c {
            let (send, connection) =
                hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                    .await
                    .expect("h2c handshake");
            tokio::spawn(connection);
            HttpConnection::H2c(send)
        } else {
            let (send, connection) = hyper::client::conn::http1::handshake(io)
                .await
                .expect("HTTP/1.1 handshake");
            tokio::spawn(connection);
            HttpConnection::Http1(Arc::new(Mutex::new(send)))
        };
        HttpCaller {
            connection,
            host: addr.to_string().into(),
            key,
        }
    }

    /// The request, signed as an AWS SDK signs it (host and content-type, the body's hash) when a key is set.
    fn request(
        &self,
        body: Bytes,
        caller: Option<String>,
    ) -> Result<http::Request<Full<Bytes>>, String> {
        let mut request = http::Request::post(format!("http://{}/CreateChatToken", self.host))
            .header("host", &*self.host)
            .header("content-type", "application/json");
        if let Some(caller) = caller {
            request = request.header("x-caller-id", caller);
        }
        let mut request = request.body(()).map_err(|e| e.to_string())?;
        if let Some(key) = &self.key {
            use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
            let identity =
                aws_credential_types::Credentials::new(&key.0, &key.1, None, None, "loadgen")
                    .into();
            let params = aws_sigv4::sign::v4::SigningParams::builder()
                .identity(&identity)
                .region("us-west-2")
                .name("ivschat")
                .time(std::time::SystemTime::now())
                .settings(SigningSettings::default())
                .build()
                .map_err(|e| e.to_string())?
                .into();
            let uri = request.uri().to_string();
            let headers = request
                .headers()
                .iter()
                .map(|(name, value)| (name.as_str(), value.to_str().unwrap_or_default()));
            let signable = SignableRequest::new("POST", &uri, headers, SignableBody::Bytes(&body))
                .map_err(|e| e.to_string())?;
            let (instructions, _) = sign(signable, &params)
                .map_err(|e| e.to_string())?
                .into_parts();
            instructions.apply_to_request_http1x(&mut request);
        }
        Ok(request.map(|()| Full::new(body)))
    }
}

impl Caller for HttpCaller {
    async fn call(&mut self, call: Call) -> Result<(), String> {
        let body = serde_json::to_vec(&serde_json::json!({
            "roomIdentifier": call.room, "userId": call.user,
        }))
        .expect("JSON");
        let request = self.request(body.into(), call.caller)?;
        let response = match &mut self.connection {
            HttpConnection::Http1(send) => {
                let mut send = send.lock().await;
                send.ready().await.map_err(|e| e.to_string())?;
                send.send_request(request).await
            }
            HttpConnection::H2c(send) => {
                send.ready().await.map_err(|e| e.to_string())?;
                send.send_request(request).await
            }
        }
        .map_err(|e| e.to_string())?;
        let status = response.status();
        let body = http_body_util::BodyExt::collect(response.into_body())
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        if status == http::StatusCode::OK && body.starts_with(b"{") && contains(&body, b"\"token\"")
        {
            Ok(())
        } else {
            Err(format!("{status}: {}", String::from_utf8_lossy(&body)))
        }
    }
}

/// Whether `needle` occurs in `haystack`.
fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

/// What one run measured.
struct Report {
    elapsed: Duration,
    latencies: Histogram<u64>,
    errors: u64,
    first_error: Option<String>,
}

#[tokio::main]
async fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Grpc {
            addr,
            end_user_token,
            load,
        } => {
            let end_user_token =
                end_user_token.map(|token| token.parse().expect("a token is visible ASCII"));
            let mut clients = Vec::with_capacity(load.connections);
            for _ in 0..load.connections {
                // One Endpoint::connect is one HTTP/2 connection.
                let channel = Endpoint::from_shared(format!("http://{addr}"))
                    .expect("a valid URI")
                    .tcp_nodelay(true)
                    .connect()
                    .await
                    .expect("cannot connect");
                clients.push(GrpcCaller {
                    client: TokenServiceClient::new(channel),
                    end_user_token: end_user_token.clone(),
                });
            }
            measure(clients, &load).await
        }
        Command::Http {
            addr,
            h2c,
            sign,
            load,
        } => {
            let key = sign.map(|key| {
                let (id, secret) = key
                    .split_once(':')
                    .expect("--sign takes ACCESS_KEY_ID:SECRET_ACCESS_KEY");
                Arc::new((id.to_owned(), secret.to_owned()))
            });
            // HTTP/1.1 carries one call at a time: a connection per call in flight, as an SDK's pool has.
            let connections = if h2c {
                load.connections
            } else {
                load.concurrency as usize
            };
            let mut clients = Vec::with_capacity(connections);
            for _ in 0..connections {
                clients.push(HttpCaller::connect(addr, h2c, key.clone()).await);
            }
            measure(clients, &load).await
        }
        Command::Hold {
            addr,
            connections,
            streams,
            header_bytes,
            message_bytes,
            sent_bytes,
            settle_seconds,
            server_pid,
            tls_ca,
        } => {
            let tls = tls_ca.map(|ca| tls_connector(&ca));
            hold(
                tls,
                addr,
                connections,
                streams,
                header_bytes,
                message_bytes,
                sent_bytes,
                Duration::from_secs(settle_seconds),
                server_pid,
            )
            .await
        }
        Command::Ivs { endpoint, load } => {
            let config = aws_sdk_ivschat::Config::builder()
                .behavior_version(aws_sdk_ivschat::config::BehaviorVersion::latest())
                .region(aws_sdk_ivschat::config::Region::new("us-west-2"))
                .endpoint_url(endpoint)
                .credentials_provider(aws_sdk_ivschat::config::Credentials::new(
                    "stub", "stub", None, None, "bench",
                ))
                // The same HTTP stack the service's IVS issuer uses: rustls with ring.
                .http_client(
                    aws_smithy_http_client::Builder::new()
                        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                            aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
                        ))
                        .build_https(),
                )
                .build();
            let client = IvsCaller(aws_sdk_ivschat::Client::from_conf(config));
            measure(vec![client], &load).await
        }
        Command::Startup { addr, command } => startup(addr, &command).await,
        Command::EndUserToken {
            rsa_key,
            jwks,
            issuer,
            audience,
            sub,
        } => end_user_token(&rsa_key, &jwks, &issuer, &audience, &sub),
    }
}

/// See [`Command::EndUserToken`].
fn end_user_token(
    rsa_key: &Path,
    jwks: &Path,
    issuer: &str,
    audience: &str,
    sub: &str,
) -> ExitCode {
    use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
    use ring::signature::{RSA_PKCS1_SHA256, RsaKeyPair, RsaPublicKeyComponents};
    let der = std::fs::read(rsa_key).expect("cannot read the RSA key");
    let pair = RsaKeyPair::from_der(&der).expect("an RSA private key in PKCS#1 DER");
    let public = RsaPublicKeyComponents::<Vec<u8>>::from(pair.public());
    let set = serde_json::json!({"keys": [{
        "kty": "RSA", "use": "sig", "alg": "RS256", "kid": "bench",
        "n": B64.encode(&public.n), "e": B64.encode(&public.e),
    }]});
    std::fs::write(jwks, set.to_string()).expect("cannot write the JWK set");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    let header = serde_json::json!({"alg": "RS256", "kid": "bench", "typ": "JWT"});
    let claims = serde_json::json!({
        "iss": issuer, "aud": audience, "sub": sub, "iat": now, "exp": now + 3600,
    });
    let input = format!(
        "{}.{}",
        B64.encode(header.to_string()),
        B64.encode(claims.to_string())
    );
    let mut signature = vec![0; pair.public().modulus_len()];
    pair.sign(
        &RSA_PKCS1_SHA256,
        &ring::rand::SystemRandom::new(),
        input.as_bytes(),
        &mut signature,
    )
    .expect("RSA signing");
    println!("{input}.{}", B64.encode(signature));
    ExitCode::SUCCESS
}

/// The clock ticks per second of `/proc/PID/stat`'s times: USER_HZ, 100 on every Linux architecture
/// this runs on.
const USER_HZ: u64 = 100;

/// A process's user + system CPU time so far, in clock ticks (`/proc/PID/stat` fields 14 and 15).
fn cpu_ticks(pid: u32) -> u64 {
    let stat =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("the server process is gone");
    // The command name (field 2) may hold spaces; the fields after it follow its closing parenthesis.
    let after_name = &stat[stat
        .rfind(')')
        .expect("/proc/PID/stat has the command name")
        + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // Field 3 (state) is the first after the name, so fields 14 and 15 are at 11 and 12.
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

/// Warms up, then measures `load.requests` calls spread round-robin over `clients`.
async fn measure<C: Caller>(clients: Vec<C>, load: &Load) -> ExitCode {
    let warmup = run(&clients, load, load.warmup, 0).await;
    if warmup.errors > 0 {
        eprintln!(
            "warm-up: {} failed calls, first: {}",
            warmup.errors,
            warmup.first_error.unwrap_or_default()
        );
        return ExitCode::FAILURE;
    }
    let cpu_before = load.server_pid.map(cpu_ticks);
    let report = run(&clients, load, load.requests, load.warmup).await;
    let cpu_after = load.server_pid.map(cpu_ticks);
    let seconds = report.elapsed.as_secs_f64();
    let micros = |quantile: f64| report.latencies.value_at_quantile(quantile);
    let calls = report.latencies.len();
    let mut line = format!(
        "requests={calls} errors={} seconds={seconds:.3} rps={:.0} p50_us={} p99_us={} p999_us={} max_us={}",
        report.errors,
        calls as f64 / seconds,
        micros(0.50),
        micros(0.99),
        micros(0.999),
        report.latencies.max(),
    );
    if let (Some(before), Some(after)) = (cpu_before, cpu_after) {
        // The server's user + system CPU over the measured calls (clock ticks of 10 ms: over 100,000
        // calls that is a resolution of 0.1 µs a call).
        let micros = (after - before) as f64 * 1_000_000.0 / USER_HZ as f64;
        line.push_str(&format!(
            " server_cpu_us={:.1}",
            micros / calls.max(1) as f64
        ));
    }
    if let Some(pid) = load.server_pid {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .expect("the server process is gone");
        for (field, key) in [("VmHWM:", "rss_peak_kib"), ("VmRSS:", "rss_kib")] {
            let kib = status
                .lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches(" kB").parse::<u64>().ok())
                .expect("/proc/PID/status has VmHWM and VmRSS");
            line.push_str(&format!(" {key}={kib}"));
        }
    }
    println!("{line}");
    if let Some(error) = report.first_error {
        eprintln!("{} failed calls, first: {error}", report.errors);
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// Makes `count` calls (fewer if `load.max_seconds` pass first), `load.concurrency` at a time; call `i` is for
/// user `(first + i) % load.users`, in room `(first + i) % load.rooms` from caller `(first + i) % load.callers`.
async fn run<C: Caller>(clients: &[C], load: &Load, count: u64, first: u64) -> Report {
    let next = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(Mutex::new(None));
    let room: Arc<str> = load.room.as_str().into();
    let started = Instant::now();
    let stop_at = started + Duration::from_secs(load.max_seconds);
    let workers: Vec<_> = (0..load.concurrency)
        .map(|worker| {
            let mut client = clients[worker as usize % clients.len()].clone();
            let (next, first_error, room, users, rooms, callers) = (
                next.clone(),
                first_error.clone(),
                room.clone(),
                load.users,
                load.rooms,
                load.callers,
            );
            tokio::spawn(async move {
                // Microseconds, 1 µs to 60 s, 3 significant digits.
                let mut latencies = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
                    .expect("valid histogram bounds");
                let mut errors = 0;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count || Instant::now() >= stop_at {
                        break;
                    }
                    let n = first + i;
                    let call = Call {
                        room: if rooms > 1 {
                            format!("{room}-{}", n % rooms)
                        } else {
                            room.to_string()
                        },
                        user: format!("user-{}", n % users),
                        caller: (callers > 0).then(|| {
                            format!("spiffe://cluster.local/ns/caller-{}/sa/web", n % callers)
                        }),
                    };
                    let sent = Instant::now();
                    let result = client.call(call).await;
                    latencies.saturating_record(sent.elapsed().as_micros() as u64);
                    if let Err(error) = result {
                        errors += 1;
                        first_error.lock().await.get_or_insert(error);
                    }
                }
                (latencies, errors)
            })
        })
        .collect();
    let mut latencies = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
    let mut errors = 0;
    for worker in workers {
        let (worker_latencies, worker_errors) = worker.await.expect("a worker panicked");
        latencies.add(worker_latencies).expect("same bounds");
        errors += worker_errors;
    }
    let elapsed = started.elapsed();
    let first_error = first_error.lock().await.take();
    Report {
        elapsed,
        latencies,
        errors,
        first_error,
    }
}

/// Spawns `command`, polls the health check every millisecond, reports when the token service is SERVING,
/// then stops the server.
async fn startup(addr: SocketAddr, command: &[PathBuf]) -> ExitCode {
    let started = Instant::now();
    let mut server = tokio::process::Command::new(&command[0])
        .args(&command[1..])
        .kill_on_drop(true)
        .spawn()
        .expect("cannot start the server");
    let endpoint = Endpoint::from_shared(format!("http://{addr}")).expect("a valid URI");
    let deadline = started + Duration::from_secs(10);
    let serving = loop {
        if Instant::now() > deadline {
            break None;
        }
        if let Ok(channel) = endpoint.connect().await {
            let status = health_client::HealthClient::new(channel)
                .check(HealthCheckRequest {
                    service: "ivschat.v1.TokenService".into(),
                })
                .await;
            if let Ok(response) = status
                && response.get_ref().status() == ServingStatus::Serving
            {
                break Some(started.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    server.start_kill().expect("cannot stop the server");
    let _ = server.wait().await;
    match serving {
        Some(elapsed) => {
            println!("serving_ms={:.1}", elapsed.as_secs_f64() * 1000.0);
            ExitCode::SUCCESS
        }
        None => {
            eprintln!("the server was not SERVING within 10 s");
            ExitCode::FAILURE
        }
    }
}
