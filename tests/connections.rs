//! The connection layer (src/listener.rs, src/inflight.rs) over real sockets: silent, idle and surplus
//! connections are closed, header-only streams take no call slots, and an accept loop out of file
//! descriptors pauses instead of spinning.

mod common;

use common::PATIENCE;

use std::{
    net::SocketAddr,
    num::NonZeroUsize,
    sync::Arc,
    time::{Duration, Instant},
};

use chat_token_service::config::{Config, TlsConfig};
use common::{
    Binary, LocalKeys, TestServer,
    pki::{Ca, write_server_files},
    raw::RawConnection,
    valid_request,
};

const CREATE: &str = "/ivschat.v1.TokenService/CreateChatToken";
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tonic::{
    Code,
    transport::{Certificate, ClientTlsConfig, Endpoint},
};

/// Waits for the server to close `tcp`: end of stream or a reset. Panics after [`PATIENCE`].
async fn closed_by_server(tcp: &mut TcpStream) {
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(PATIENCE, tcp.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return,
            // The server may say something first (its HTTP/2 SETTINGS, a GOAWAY).
            Ok(Ok(_)) => continue,
            Err(_) => panic!("the server kept the connection open for {PATIENCE:?}"),
        }
    }
}

/// Whether the server still holds `tcp` open after `wait`.
async fn still_open_after(tcp: &mut TcpStream, wait: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Err(_) => return true,
            Ok(Ok(0)) | Ok(Err(_)) => return false,
            Ok(Ok(_)) => continue,
        }
    }
}

fn header_only_token_call(addr: SocketAddr) -> http::Request<()> {
    common::raw::grpc_head(addr, CREATE, &[])
}

#[tokio::test]
async fn header_only_streams_on_many_connections_take_no_call_slots() {
    let keys = LocalKeys::new();
    let mut config = keys.config();
    config.max_concurrent_calls = NonZeroUsize::new(16).unwrap();
    let server = TestServer::from_config(config).await;

    // 4 connections × 32 streams that send their headers and never their request message: 8 times the
    // cap of calls in flight.
    let mut connections = Vec::new();
    let mut pings = Vec::new();
    let mut streams = Vec::new();
    for _ in 0..4 {
        let tcp = TcpStream::connect(server.addr).await.unwrap();
        let (send, mut connection) = h2::client::handshake(tcp).await.unwrap();
        pings.push(connection.ping_pong().unwrap());
        connections.push(tokio::spawn(connection));
        for _ in 0..32 {
            let mut send = send.clone().ready().await.unwrap();
            streams.push(
                send.send_request(header_only_token_call(server.addr), false)
                    .unwrap(),
            );
        }
    }
    // The server has read every stream's headers once it answers a PING sent after them.
    for ping in &mut pings {
        common::within("the PING's answer", ping.ping(h2::Ping::opaque()))
            .await
            .unwrap();
    }

    let mut client = server.client().await;
    for _ in 0..20 {
        client
            .create_chat_token(valid_request())
            .await
            .expect("a caller with whole messages is served while 128 bodiless streams are open");
    }
    drop(streams);
    for connection in connections {
        connection.abort();
    }
}

/// How late after its timeout a loaded 2-core machine may close a connection; anything else that would
/// close it (the idle timeout, 60 s by default) comes much later.
const CLOSE_MARGIN: Duration = Duration::from_secs(3);

/// A connection the server closed `held` after it opened (or went idle) was closed at `timeout`: not
/// before, and not long after.
fn assert_closed_at_the_edge(what: &str, held: Duration, timeout: Duration) {
    assert!(
        held >= timeout,
        "{what}: closed after {held:?}, before its timeout of {timeout:?}"
    );
    assert!(
        held < timeout + CLOSE_MARGIN,
        "{what}: closed only after {held:?}, its timeout is {timeout:?}"
    );
}

const PREFACE_TIMEOUT: Duration = Duration::from_millis(300);

#[tokio::test]
async fn a_silent_tcp_client_is_closed_after_the_preface_timeout_and_a_talking_one_is_not() {
    let keys = LocalKeys::new();
    let mut config = keys.config();
    config.transport.preface_timeout = PREFACE_TIMEOUT;
    let server = TestServer::from_config(config).await;

    // Closed at the timeout's edge: never before it (the server accepts after our connect returns, so its
    // timer cannot start earlier), and well before anything else would close it.
    let opened = Instant::now();
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    closed_by_server(&mut silent).await;
    assert_closed_at_the_edge("a silent client", opened.elapsed(), PREFACE_TIMEOUT);

    // A client that sent only part of the preface is silent too.
    let opened = Instant::now();
    let mut stalled = TcpStream::connect(server.addr).await.unwrap();
    stalled.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    closed_by_server(&mut stalled).await;
    assert_closed_at_the_edge("half a preface", opened.elapsed(), PREFACE_TIMEOUT);

    // A client that sends its preface at once keeps that very connection past the timeout: two calls on
    // one raw HTTP/2 connection (no reconnection could hide a close), 600 ms apart.
    let mut talking = RawConnection::open(server.addr).await;
    let (code, message) = talking.unary(CREATE, &[], &valid_request()).await;
    assert_eq!(code, Code::Ok, "{message}");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        !talking.driver.is_finished(),
        "the server closed a talking connection"
    );
    let (code, message) = talking.unary(CREATE, &[], &valid_request()).await;
    assert_eq!(code, Code::Ok, "{message}");
}

/// A TLS server config (no client certificates) with `handshake_timeout`.
fn tls_config(keys: &LocalKeys, dir: &std::path::Path, server_ca: &Ca) -> Config {
    let (cert_file, key_file, _) =
        write_server_files(dir, &server_ca.server(), &Ca::new("unused client CA"));
    let mut config = keys.config();
    config.tls = Some(TlsConfig {
        cert_file,
        key_file,
        client_ca_file: None,
        handshake_timeout: Duration::from_millis(300),
        max_concurrent_handshakes: NonZeroUsize::new(2).unwrap(),
        max_handshakes_per_peer: std::num::NonZeroUsize::new(16).unwrap(),
    });
    config.transport.preface_timeout = Duration::from_millis(300);
    config
}

async fn tls_client(addr: SocketAddr, server_ca: &Ca) -> Result<(), tonic::Status> {
    let channel = Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(server_ca.pem()))
                .domain_name("localhost"),
        )
        .unwrap()
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut client =
        chat_token_service::proto::ivschat::v1::token_service_client::TokenServiceClient::new(
            channel,
        );
    client.create_chat_token(valid_request()).await.map(drop)
}

/// Completes a TLS handshake with the server and returns the stream, having sent nothing over it.
async fn tls_handshake_only(
    addr: SocketAddr,
    server_ca: &Ca,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    use tokio_rustls::rustls::{self, pki_types::CertificateDer};
    let mut roots = rustls::RootCertStore::empty();
    let ca = rustls_pki_types::pem::PemObject::from_pem_slice(server_ca.pem().as_bytes()).unwrap();
    roots.add(CertificateDer::clone(&ca)).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await.unwrap();
    connector
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap()
}

#[tokio::test]
async fn silent_tls_clients_are_closed_during_and_after_the_handshake() {
    let keys = LocalKeys::new();
    let dir = tempfile::tempdir().unwrap();
    let server_ca = Ca::new("server CA");
    let server = TestServer::from_config(tls_config(&keys, dir.path(), &server_ca)).await;

    // Silent before the handshake: closed after transport.preface_timeout, holding no handshake place.
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    closed_by_server(&mut silent).await;

    // Handshake done, then silent: closed after transport.preface_timeout.
    let mut quiet = tls_handshake_only(server.addr, &server_ca).await;
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(PATIENCE, quiet.read(&mut buf))
        .await
        .expect("the server closes a TLS connection that never sends its preface");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "expected a close, got {read:?}"
    );

    tls_client(server.addr, &server_ca)
        .await
        .expect("a TLS client that talks is served");
}

#[tokio::test]
async fn handshakes_over_the_cap_are_refused_at_once() {
    let keys = LocalKeys::new();
    let dir = tempfile::tempdir().unwrap();
    let server_ca = Ca::new("server CA");
    let mut config = tls_config(&keys, dir.path(), &server_ca);
    // Long enough that the stalled handshakes below hold their places for the whole test.
    config.tls.as_mut().unwrap().handshake_timeout = Duration::from_secs(30);
    let server = TestServer::from_config(config).await;

    // Two clients that start a ClientHello (one byte of a TLS record) and stall take both places.
    let mut silent = Vec::new();
    for _ in 0..2 {
        let mut tcp = TcpStream::connect(server.addr).await.unwrap();
        tcp.write_all(&[0x16]).await.unwrap();
        silent.push(tcp);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut third = TcpStream::connect(server.addr).await.unwrap();
    third.write_all(&[0x16]).await.unwrap();
    closed_by_server(&mut third).await;
    for tcp in &mut silent {
        assert!(
            still_open_after(tcp, Duration::from_millis(100)).await,
            "the handshakes already in progress keep their places"
        );
    }

    drop(silent);
    common::eventually(
        "a TLS client served once the stalled handshakes are gone",
        || async { tls_client(server.addr, &server_ca).await.ok() },
    )
    .await;
}

/// A TCP connection to `addr` from `source`, a loopback address of its own (`127.0.0.2`, …), so the
/// server sees another client host.
async fn connect_from(source: [u8; 4], addr: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::from((source, 0)))
        .expect("Linux routes all of 127.0.0.0/8 to loopback");
    socket.connect(addr).await.unwrap()
}

/// Issue 20, "TLS lock-out": sockets that never send a byte used to hold every handshake place for
/// `tls.handshake_timeout`, shutting valid clients out. Now a place is taken only once a ClientHello
/// starts, and one address holds at most `tls.max_handshakes_per_peer` connections in handshake.
#[tokio::test]
async fn silent_sockets_never_shut_valid_tls_clients_out_and_one_host_cannot_take_every_place() {
    let keys = LocalKeys::new();
    let dir = tempfile::tempdir().unwrap();
    let server_ca = Ca::new("server CA");
    let mut config = tls_config(&keys, dir.path(), &server_ca);
    let tls = config.tls.as_mut().unwrap();
    tls.handshake_timeout = Duration::from_secs(30);
    tls.max_concurrent_handshakes = NonZeroUsize::new(4).unwrap();
    tls.max_handshakes_per_peer = NonZeroUsize::new(2).unwrap();
    config.transport.preface_timeout = Duration::from_secs(30);
    let server = TestServer::from_config(config).await;

    // Ten times the handshake places in silent sockets, from ten other hosts.
    let mut silent = Vec::new();
    for host in 2..12 {
        for _ in 0..4 {
            silent.push(connect_from([127, 0, 0, host], server.addr).await);
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    tls_client(server.addr, &server_ca)
        .await
        .expect("40 silent sockets hold no handshake place");

    // A host that starts handshakes and stalls holds at most two places: its third connection is closed
    // at once, and a valid client still finds a place.
    let mut stalled = Vec::new();
    for _ in 0..2 {
        let mut tcp = connect_from([127, 0, 0, 20], server.addr).await;
        tcp.write_all(&[0x16]).await.unwrap();
        stalled.push(tcp);
    }
    let mut third = connect_from([127, 0, 0, 20], server.addr).await;
    third.write_all(&[0x16]).await.unwrap();
    closed_by_server(&mut third).await;
    for tcp in &mut stalled {
        assert!(still_open_after(tcp, Duration::from_millis(100)).await);
    }
    tls_client(server.addr, &server_ca)
        .await
        .expect("a valid client is served while one host stalls its handshakes");
    drop(silent);
}

#[tokio::test]
async fn connections_over_max_connections_are_closed_at_once() {
    let keys = LocalKeys::new();
    let mut config = keys.config();
    config.transport.max_connections = NonZeroUsize::new(2).unwrap();
    config.transport.preface_timeout = Duration::from_secs(30);
    let server = TestServer::from_config(config).await;

    let first = TcpStream::connect(server.addr).await.unwrap();
    let mut second = TcpStream::connect(server.addr).await.unwrap();
    let mut third = TcpStream::connect(server.addr).await.unwrap();
    closed_by_server(&mut third).await;
    assert!(
        still_open_after(&mut second, Duration::from_millis(200)).await,
        "connections within the cap stay open"
    );

    drop(first);
    drop(second);
    common::eventually("a call served once connections are closed", || async {
        let connection = TcpStream::connect(server.addr).await.ok()?;
        // A connection the server still counts against the cap is closed at once: retried.
        let (send, driver) = h2::client::handshake(connection).await.ok()?;
        let driver = tokio::spawn(async move { driver.await.ok() });
        let mut raw = send.ready().await.ok()?;
        let (response, mut body) = raw
            .send_request(header_only_token_call(server.addr), false)
            .ok()?;
        body.send_data(common::raw::frame(&valid_request()), true)
            .ok()?;
        let response = response.await.ok()?;
        driver.abort();
        (response.status() == 200).then_some(())
    })
    .await;
}

const IDLE_TIMEOUT: Duration = Duration::from_secs(1);

#[tokio::test]
async fn an_idle_connection_is_closed_but_not_while_a_call_is_open() {
    let keys = LocalKeys::new();
    let mut config = keys.config();
    config.transport.idle_timeout = IDLE_TIMEOUT;
    // PINGs every 200 ms: they do not count as activity.
    config.transport.keepalive_interval = Duration::from_millis(200);
    let server = TestServer::from_config(config).await;

    // A connection with a call open (its headers sent, its message not yet) is not idle.
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let (send, connection) = h2::client::handshake(tcp).await.unwrap();
    let mut connection = tokio::spawn(connection);
    let mut send = send.ready().await.unwrap();
    let (response, open_call) = send
        .send_request(header_only_token_call(server.addr), false)
        .unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(2500), &mut connection)
            .await
            .is_err(),
        "a connection with a call open is not idle"
    );

    // Once the call ends (the client resets it), the connection is idle and is closed, a whole
    // idle_timeout later: the server ends the call after our reset, and keeps that end in whole
    // milliseconds (so up to 1 ms earlier than it was). `send` stays: with the last handle gone, h2's
    // client would close the connection itself, and the server's close would go unseen.
    drop((response, open_call));
    let idle = Instant::now();
    tokio::time::timeout(PATIENCE, &mut connection)
        .await
        .expect("an idle connection is closed")
        .unwrap()
        .ok();
    assert_closed_at_the_edge(
        "an idle connection",
        idle.elapsed() + Duration::from_millis(1),
        IDLE_TIMEOUT,
    );
    drop(send);
}

/// CPU time (user + system) the process `pid` has used.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // Linux reports in USER_HZ, 100 on every architecture we run on.
    Duration::from_millis(ticks * 10)
}

#[tokio::test]
async fn out_of_file_descriptors_the_accept_loop_pauses_and_recovers() {
    let keys = LocalKeys::new();
    let key_file = keys.path.clone();
    let binary = Binary::start_with_fd_limit(
        64,
        &[
            ("CTS_LOCAL_ISSUER__KEYS_FILE", key_file.to_str().unwrap()),
            ("CTS_TRANSPORT__PREFACE_TIMEOUT", "60s"),
        ],
    );
    // Hold more connections than the binary has file descriptors for.
    let mut held = Vec::new();
    for _ in 0..80 {
        held.push(TcpStream::connect(binary.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = cpu_time(binary.child.id());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let spent = cpu_time(binary.child.id()) - before;
    assert!(
        spent < Duration::from_millis(500),
        "the accept loop spun on EMFILE: {spent:?} of CPU in 1.5 s"
    );

    drop(held);
    let mut client = common::eventually(
        "the binary to accept again once descriptors are free",
        || async {
            chat_token_service::proto::ivschat::v1::token_service_client::TokenServiceClient::connect(
                format!("http://{}", binary.addr),
            )
            .await
            .ok()
        },
    )
    .await;
    client
        .create_chat_token(valid_request())
        .await
        .expect("and serves");
    binary.signal("-TERM");
    let (status, log) = binary.exit().await;
    assert!(status.success());
    let pauses = log
        .iter()
        .filter(|line| line.contains("pausing the accept loop"))
        .count();
    assert!(
        (1..=2).contains(&pauses),
        "one warning per 10 s, not one per failed accept: {pauses}\n{}",
        log.join("\n")
    );
}

/// The SETTINGS frame the server sends first on a new HTTP/2 connection, as (identifier, value) pairs.
async fn server_settings(addr: SocketAddr) -> Vec<(u16, u32)> {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    // The client preface and an empty SETTINGS frame.
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let mut header = [0u8; 9];
    tokio::time::timeout(PATIENCE, tcp.read_exact(&mut header))
        .await
        .unwrap()
        .unwrap();
    let length = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
    assert_eq!(header[3], 0x4, "the server's first frame is SETTINGS");
    let mut payload = vec![0u8; length];
    tcp.read_exact(&mut payload).await.unwrap();
    payload
        .chunks_exact(6)
        .map(|setting| {
            (
                u16::from_be_bytes([setting[0], setting[1]]),
                u32::from_be_bytes([setting[2], setting[3], setting[4], setting[5]]),
            )
        })
        .collect()
}

#[tokio::test]
async fn the_server_advertises_its_stream_and_header_limits_in_settings() {
    const MAX_CONCURRENT_STREAMS: u16 = 0x3;
    const MAX_HEADER_LIST_SIZE: u16 = 0x6;
    let keys = LocalKeys::new();
    let server = TestServer::from_config(keys.config()).await;
    let settings = server_settings(server.addr).await;
    assert!(
        settings.contains(&(MAX_CONCURRENT_STREAMS, 128)),
        "{settings:?}"
    );
    assert!(
        settings.contains(&(MAX_HEADER_LIST_SIZE, 16 * 1024)),
        "{settings:?}"
    );

    let mut config = keys.config();
    config.transport.max_concurrent_streams = std::num::NonZeroU32::new(7).unwrap();
    config.transport.max_header_list_bytes = std::num::NonZeroU32::new(4096).unwrap();
    let server = TestServer::from_config(config).await;
    let settings = server_settings(server.addr).await;
    assert!(
        settings.contains(&(MAX_CONCURRENT_STREAMS, 7)),
        "{settings:?}"
    );
    assert!(
        settings.contains(&(MAX_HEADER_LIST_SIZE, 4096)),
        "{settings:?}"
    );
}

/// Opens an HTTP/2 connection with raw bytes (the client preface and an empty SETTINGS) that then never
/// writes again: it answers no PING.
async fn mute_h2_peer(addr: SocketAddr) -> TcpStream {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    tcp
}

/// Reads frames from `tcp` until the server closes it; how many PING frames (not acknowledgements) it
/// sent. Panics after [`PATIENCE`].
async fn pings_until_closed(tcp: &mut TcpStream) -> usize {
    common::within("the server to close the connection", async {
        let mut pings = 0;
        loop {
            let mut header = [0u8; 9];
            if tcp.read_exact(&mut header).await.is_err() {
                return pings;
            }
            let length = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
            let mut payload = vec![0u8; length];
            if tcp.read_exact(&mut payload).await.is_err() {
                return pings;
            }
            const PING: u8 = 0x6;
            const ACK: u8 = 0x1;
            if header[3] == PING && header[4] & ACK == 0 {
                pings += 1;
            }
        }
    })
    .await
}

/// Keepalive (`transport.keepalive_interval` / `keepalive_timeout`): the server PINGs, and a peer that
/// never answers is closed after the timeout, while one that answers (h2 does) keeps its connection.
#[tokio::test]
async fn a_peer_that_never_answers_keepalive_pings_is_closed_and_one_that_answers_is_kept() {
    const INTERVAL: Duration = Duration::from_millis(200);
    // Long enough that the answering side, on a loaded machine, always answers in time.
    const TIMEOUT: Duration = Duration::from_millis(1000);
    let keys = LocalKeys::new();
    let mut config = keys.config();
    config.transport.keepalive_interval = INTERVAL;
    config.transport.keepalive_timeout = TIMEOUT;
    let server = TestServer::from_config(config).await;

    let mut answering = RawConnection::open(server.addr).await;
    let started = tokio::time::Instant::now();
    let mut mute = mute_h2_peer(server.addr).await;
    let pings = pings_until_closed(&mut mute).await;
    let closed = started.elapsed();
    assert!(pings >= 1, "the server sent no keepalive PING");
    assert!(
        closed >= INTERVAL + TIMEOUT - Duration::from_millis(50),
        "closed after {closed:?}, before a PING could go unanswered"
    );

    // Positive control: the connection that answers PINGs (h2 acknowledges them) is still open, several
    // intervals and timeouts later, and serves on.
    tokio::time::sleep((INTERVAL + TIMEOUT) * 2).await;
    assert!(
        !answering.driver.is_finished(),
        "the server closed a connection that answers its PINGs"
    );
    let (code, message) = answering.unary(CREATE, &[], &valid_request()).await;
    assert_eq!(code, Code::Ok, "{message}");
}

/// `transport.max_connection_age` and `max_connection_age_grace`: at its age a connection is told GOAWAY
/// (no new stream is accepted on it) yet a call already open keeps it for the grace period; then it is
/// closed. Both on one raw connection, which cannot reconnect behind the test's back.
#[tokio::test]
async fn a_connection_is_sent_goaway_at_its_maximum_age_and_closed_after_the_grace() {
    const AGE: Duration = Duration::from_millis(1000);
    const GRACE: Duration = Duration::from_millis(1500);
    let keys = LocalKeys::new();
    let mut config = keys.config();
    config.transport.max_connection_age = AGE;
    config.transport.max_connection_age_grace = GRACE;
    let server = TestServer::from_config(config).await;

    let mut old = RawConnection::open(server.addr).await;
    let opened = tokio::time::Instant::now();
    // A call before the age is served; then one stays open (headers sent, message never).
    let (code, message) = old.unary(CREATE, &[], &valid_request()).await;
    assert_eq!(code, Code::Ok, "{message}");
    let head = old.head(CREATE, &[]);
    let (_open_response, _open_body) = old
        .send
        .clone()
        .ready()
        .await
        .unwrap()
        .send_request(head, false)
        .unwrap();

    // GOAWAY at the age: the connection refuses new streams, but stays open for the call in grace.
    common::eventually("GOAWAY at the connection's maximum age", || {
        let send = old.send.clone();
        let head = old.head(CREATE, &[]);
        async move {
            let refused = match send.ready().await {
                Err(_) => true,
                Ok(mut send) => match send.send_request(head, true) {
                    Err(_) => true,
                    Ok((response, _)) => response
                        .await
                        .is_err_and(|e| e.is_go_away() || e.is_remote()),
                },
            };
            refused.then_some(())
        }
    })
    .await;
    let goaway = opened.elapsed();
    assert!(
        goaway >= AGE - Duration::from_millis(50),
        "GOAWAY after {goaway:?}"
    );
    assert!(
        !old.driver.is_finished(),
        "closed at GOAWAY ({goaway:?}), before the grace period for the open call"
    );
    common::within("the close after max_connection_age_grace", &mut old.driver)
        .await
        .unwrap()
        .ok();
    let closed = opened.elapsed();
    assert!(
        closed >= AGE + GRACE - Duration::from_millis(50),
        "closed after {closed:?}, within the grace period"
    );

    // Positive control: a new connection is served.
    let mut fresh = RawConnection::open(server.addr).await;
    let (code, message) = fresh.unary(CREATE, &[], &valid_request()).await;
    assert_eq!(code, Code::Ok, "{message}");
}
