//! The accept loop, and what guards each connection before tonic's HTTP/2 (and HTTP/1.1) server sees it.
//!
//! hyper and h2 bound what happens inside a connection (streams, header sizes, keepalive, resets); this
//! module bounds the connections themselves, so a few clients cannot hold what every caller needs:
//!
//! - **How many:** at most `transport.max_connections` are open at once (TLS handshakes included). One
//!   more is accepted and closed at once, so its client moves on to another replica instead of waiting
//!   in the kernel's backlog.
//! - **Silent clients:** a new connection must send its first request (over HTTP/2 the preface and the
//!   first call's whole header block, over HTTP/1.1 a whole request head) within
//!   `transport.preface_timeout` of being accepted, or of its TLS handshake completing; else it is
//!   closed. A client that sends the preface, or SETTINGS and PINGs, and never a call is closed like a
//!   silent one. Over TLS the ClientHello must start within the same time, and only then does the
//!   connection take a handshake place (see [`super::tls`]).
//! - **Idle clients:** a connection with no call open for `transport.idle_timeout` is closed (gRPC's
//!   MAX_CONNECTION_IDLE). HTTP/2 PINGs do not count as activity, calls do. The close is checked only
//!   when the socket has nothing left to read, so a request already received is never dropped.
//! - **Out of file descriptors:** `accept` failing with EMFILE, ENFILE, ENOBUFS or ENOMEM pauses the
//!   loop for [`ACCEPT_BACKOFF`] instead of spinning on the error; connections wait in the backlog.
//!
//! Every refusal and close is counted in `cts.connections.closed` by reason, and logged at most once per
//! [`LOG_EVERY`] per reason with the number suppressed, so a flood cannot flood the log.
//!
//! Each connection's [`ConnInfo`] (peer address, client certificates, activity) is in every request's
//! extensions; [`peer_certs`] reads the client certificates from there.

use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use rustls_pki_types::CertificateDer;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
    time::{Instant, Sleep},
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use crate::telemetry::metrics::metrics;

mod first_request;

use first_request::FirstRequest;

/// How long the accept loop pauses when the process is out of file descriptors or memory.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// At most one log line per this long per kind of refusal or close.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// The bounds of [`incoming`], from `[transport]`.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionLimits {
    /// Connections open at once, handshakes included.
    pub max_connections: usize,
    /// Time from accept (or the end of the TLS handshake) to the first request bytes.
    pub preface_timeout: Duration,
    /// Time without an open call after which a connection is closed.
    pub idle_timeout: Duration,
}

impl ConnectionLimits {
    /// The limits `transport` sets.
    pub fn from_config(transport: &crate::config::TransportConfig) -> Self {
        ConnectionLimits {
            max_connections: transport.max_connections.get(),
            preface_timeout: transport.preface_timeout,
            idle_timeout: transport.idle_timeout,
        }
    }
}

/// Why a connection was refused or closed: the `reason` of `cts.connections.closed`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Closed {
    /// `transport.max_connections` were open.
    MaxConnections,
    /// `tls.max_concurrent_handshakes` were in progress.
    MaxHandshakes,
    /// `tls.max_handshakes_per_peer` were in progress from the client's address.
    MaxHandshakesPerPeer,
    /// The TLS handshake failed (no or a bad client certificate, not TLS, …).
    HandshakeFailed,
    /// The TLS handshake took longer than `tls.handshake_timeout`.
    HandshakeTimeout,
    /// No first request (or, over TLS, no ClientHello) within `transport.preface_timeout`.
    PrefaceTimeout,
    /// No call for `transport.idle_timeout`.
    Idle,
}

impl Closed {
    const ALL: [Closed; 7] = [
        Closed::MaxConnections,
        Closed::MaxHandshakes,
        Closed::MaxHandshakesPerPeer,
        Closed::HandshakeFailed,
        Closed::HandshakeTimeout,
        Closed::PrefaceTimeout,
        Closed::Idle,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Closed::MaxConnections => "max_connections",
            Closed::MaxHandshakes => "max_handshakes",
            Closed::MaxHandshakesPerPeer => "max_handshakes_per_peer",
            Closed::HandshakeFailed => "handshake_failed",
            Closed::HandshakeTimeout => "handshake_timeout",
            Closed::PrefaceTimeout => "preface_timeout",
            Closed::Idle => "idle",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Closed::MaxConnections => {
                "connection refused: transport.max_connections connections are open"
            }
            Closed::MaxHandshakes => {
                "connection refused: tls.max_concurrent_handshakes handshakes are in progress"
            }
            Closed::MaxHandshakesPerPeer => {
                "connection refused: tls.max_handshakes_per_peer handshakes are in progress from its address"
            }
            Closed::HandshakeFailed => "TLS handshake refused",
            Closed::HandshakeTimeout => "TLS handshake timed out (tls.handshake_timeout)",
            Closed::PrefaceTimeout => {
                "connection closed: no request within transport.preface_timeout"
            }
            Closed::Idle => "connection closed: no call within transport.idle_timeout",
        }
    }

    /// Counts it, and logs it unless a line for the same reason was written within [`LOG_EVERY`].
    /// `detail` (e.g. rustls's error) is logged, never put in the metric.
    pub fn record(self, peer: SocketAddr, detail: Option<&dyn std::fmt::Display>) {
        metrics()
            .connections_closed
            .add(1, &[opentelemetry::KeyValue::new("reason", self.as_str())]);
        static LOGS: [LogThrottle; Closed::ALL.len()] =
            [const { LogThrottle::new() }; Closed::ALL.len()];
        let index = Closed::ALL
            .iter()
            .position(|c| *c == self)
            .expect("every reason is in ALL");
        let Some(suppressed) = LOGS[index].admit() else {
            return;
        };
        let what = self.describe();
        let detail = detail.map(|d| d.to_string());
        match self {
            Closed::MaxConnections | Closed::MaxHandshakes | Closed::MaxHandshakesPerPeer => {
                tracing::warn!(%peer, suppressed, "{what}")
            }
            _ => tracing::info!(%peer, suppressed, detail, "{what}"),
        }
    }
}

/// Admits one log line per [`LOG_EVERY`]; counts the rest.
struct LogThrottle {
    /// Milliseconds since [`log_epoch`] at which the last line was written, plus one (0: never).
    last: AtomicU64,
    suppressed: AtomicU64,
}

fn log_epoch() -> std::time::Instant {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(std::time::Instant::now)
}

impl LogThrottle {
    const fn new() -> Self {
        LogThrottle {
            last: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(lines suppressed since the last one)` when a line may be written now.
    fn admit(&self) -> Option<u64> {
        let now = log_epoch().elapsed().as_millis() as u64 + 1;
        let last = self.last.load(Ordering::Relaxed);
        // Another thread may have stored a later time since `now` was read: saturate, never underflow.
        if last != 0 && now.saturating_sub(last) < LOG_EVERY.as_millis() as u64
            || self
                .last
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}

/// A transport a connection can run over: plaintext TCP, or TLS.
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// The client's certificate chain, leaf first, when it presented one (mutual TLS).
    fn peer_certs(&self) -> Option<Arc<Vec<CertificateDer<'static>>>>;
}

impl Transport for TcpStream {
    fn peer_certs(&self) -> Option<Arc<Vec<CertificateDer<'static>>>> {
        None
    }
}

impl Transport for tokio_rustls::server::TlsStream<TcpStream> {
    fn peer_certs(&self) -> Option<Arc<Vec<CertificateDer<'static>>>> {
        self.get_ref()
            .1
            .peer_certificates()
            .map(|certs| Arc::new(certs.to_vec()))
    }
}

/// What a connection's requests know of it, in their extensions (tonic inserts it into each).
#[derive(Clone, Debug)]
pub struct ConnInfo {
    /// The client's address.
    pub peer: SocketAddr,
    /// The address the client connected to: the listener's (a loopback listener answers only loopback
    /// names, see [`crate::door::rest`]).
    pub local: SocketAddr,
    certs: Option<Arc<Vec<CertificateDer<'static>>>>,
    activity: Arc<Activity>,
}

impl ConnInfo {
    /// The client's certificate chain, when it presented one.
    pub fn peer_certs(&self) -> Option<&[CertificateDer<'static>]> {
        self.certs.as_deref().map(Vec::as_slice)
    }

    /// Marks a call open on this connection until the returned guard is dropped, so the connection is
    /// not closed as idle meanwhile.
    pub fn call(&self) -> OpenCall {
        self.activity.open.fetch_add(1, Ordering::AcqRel);
        OpenCall(self.activity.clone())
    }

    /// A connection from and to `127.0.0.1`, accepted now, for unit tests.
    #[cfg(test)]
    pub(crate) fn for_tests() -> Self {
        ConnInfo {
            peer: SocketAddr::from(([127, 0, 0, 1], 40000)),
            local: SocketAddr::from(([127, 0, 0, 1], 50051)),
            certs: None,
            activity: Arc::new(Activity {
                open: AtomicUsize::new(0),
                streams: AtomicUsize::new(0),
                start: Instant::now(),
                last_end: AtomicU64::new(0),
            }),
        }
    }

    /// A place for one streaming call on this connection, if fewer than `max` are open; given back when
    /// the returned guard is dropped.
    pub fn stream(&self, max: usize) -> Option<StreamingCall> {
        self.activity
            .streams
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < max).then_some(open + 1)
            })
            .ok()
            .map(|_| StreamingCall(self.activity.clone()))
    }
}

/// One streaming call's place on its connection; see [`ConnInfo::stream`].
#[derive(Debug)]
pub struct StreamingCall(Arc<Activity>);

impl Drop for StreamingCall {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The client certificates of the connection a request came on (`None` for plaintext, or TLS without a
/// client certificate).
pub fn peer_certs(extensions: &http::Extensions) -> Option<&[CertificateDer<'static>]> {
    extensions.get::<ConnInfo>()?.peer_certs()
}

/// Calls open on a connection, and when the last one ended.
#[derive(Debug)]
struct Activity {
    open: AtomicUsize,
    /// Streaming calls open (see [`ConnInfo::stream`]).
    streams: AtomicUsize,
    /// When the connection was accepted; `last_end` counts from here.
    start: Instant,
    /// Milliseconds from `start` to the end of the last call.
    last_end: AtomicU64,
}

impl Activity {
    /// When the connection last became idle, or `None` while a call is open.
    fn idle_since(&self) -> Option<Instant> {
        (self.open.load(Ordering::Acquire) == 0)
            .then(|| self.start + Duration::from_millis(self.last_end.load(Ordering::Acquire)))
    }
}

/// One open call on a connection; see [`ConnInfo::call`].
#[derive(Debug)]
pub struct OpenCall(Arc<Activity>);

impl Drop for OpenCall {
    fn drop(&mut self) {
        let since_start = self.0.start.elapsed().as_millis() as u64;
        self.0.last_end.fetch_max(since_start, Ordering::AcqRel);
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Why a handshake gave no connection.
#[derive(Debug)]
pub struct HandshakeRefused {
    /// The reason, for the metric.
    pub reason: Closed,
    /// What went wrong, for the log.
    pub detail: Option<io::Error>,
}

/// Accepts connections on `listener` within `limits`, runs `handshake` on each with its client's address
/// (on its own task, so a slow one never holds up the loop), and yields those that complete it. The listener closes when the
/// stream is dropped.
pub fn incoming<T, H, F>(
    listener: TcpListener,
    limits: ConnectionLimits,
    handshake: H,
) -> ReceiverStream<io::Result<Conn<T>>>
where
    T: Transport,
    H: Fn(TcpStream, SocketAddr) -> F + Send + 'static,
    F: Future<Output = Result<T, HandshakeRefused>> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    crate::telemetry::metrics::observe_connections({
        let connections = Arc::downgrade(&connections);
        let max = limits.max_connections;
        move || {
            connections
                .upgrade()
                .map_or(0, |c| max - c.available_permits())
        }
    });
    tokio::spawn(async move {
        let out_of_resources = LogThrottle::new();
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = tx.closed() => return,
            };
            let (tcp, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(e) if is_out_of_resources(&e) => {
                    if let Some(suppressed) = out_of_resources.admit() {
                        tracing::warn!(
                            suppressed,
                            "accept failed: {e}; pausing the accept loop for {ACCEPT_BACKOFF:?}"
                        );
                    }
                    tokio::select! {
                        () = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                        () = tx.closed() => return,
                    }
                    continue;
                }
                // The client went away between SYN and accept (ECONNABORTED and the like).
                Err(e) => {
                    tracing::debug!("accept failed: {e}");
                    continue;
                }
            };
            let Ok(permit) = connections.clone().try_acquire_owned() else {
                Closed::MaxConnections.record(peer, None);
                drop(tcp);
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let Ok(local) = tcp.local_addr() else {
                continue;
            };
            let handshake = handshake(tcp, peer);
            let tx = tx.clone();
            tokio::spawn(async move {
                match handshake.await {
                    Ok(io) => {
                        let conn = Conn::new(io, peer, local, permit, limits);
                        let _ = tx.send(Ok(conn)).await;
                    }
                    Err(refused) => refused.reason.record(
                        peer,
                        refused.detail.as_ref().map(|e| e as &dyn std::fmt::Display),
                    ),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

fn is_out_of_resources(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// A connection within its bounds: holds its place among `transport.max_connections`, closes itself
/// when silent or idle too long, and tells tonic its [`ConnInfo`].
pub struct Conn<T> {
    io: T,
    info: ConnInfo,
    /// How much of the first request has arrived.
    first: FirstRequest,
    /// The first request's deadline until it has come, then the idle deadline.
    deadline: Pin<Box<Sleep>>,
    idle_timeout: Duration,
    _permit: OwnedSemaphorePermit,
}

impl<T: Transport> Conn<T> {
    fn new(
        io: T,
        peer: SocketAddr,
        local: SocketAddr,
        permit: OwnedSemaphorePermit,
        limits: ConnectionLimits,
    ) -> Self {
        let now = Instant::now();
        Conn {
            info: ConnInfo {
                peer,
                local,
                certs: io.peer_certs(),
                activity: Arc::new(Activity {
                    open: AtomicUsize::new(0),
                    streams: AtomicUsize::new(0),
                    start: now,
                    last_end: AtomicU64::new(0),
                }),
            },
            io,
            first: FirstRequest::Start,
            deadline: Box::pin(tokio::time::sleep_until(now + limits.preface_timeout)),
            idle_timeout: limits.idle_timeout,
            _permit: permit,
        }
    }

    /// What its requests know of it.
    pub fn info(&self) -> &ConnInfo {
        &self.info
    }

    fn first_request_timed_out(&self) -> io::Error {
        Closed::PrefaceTimeout.record(self.info.peer, None);
        io::Error::new(
            io::ErrorKind::TimedOut,
            "no request within transport.preface_timeout",
        )
    }

    /// With nothing to read: whether the connection has been without a call for `idle_timeout`. Else
    /// the deadline is moved to when it will have been, and the task is woken then.
    fn idle(&mut self, cx: &mut Context<'_>) -> bool {
        while self.deadline.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            let next = match self.info.activity.idle_since() {
                Some(since) if now >= since + self.idle_timeout => return true,
                Some(since) => since + self.idle_timeout,
                None => now + self.idle_timeout,
            };
            self.deadline.as_mut().reset(next);
        }
        false
    }
}

impl<T: Transport> AsyncRead for Conn<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if !this.first.arrived() {
                    let read = &buf.filled()[before..];
                    // End of stream: nothing more is coming, the connection ends either way.
                    if read.is_empty() || this.first.feed(read) {
                        this.first = FirstRequest::Arrived;
                        let idle_at = Instant::now() + this.idle_timeout;
                        this.deadline.as_mut().reset(idle_at);
                    } else if this.deadline.as_mut().poll(cx).is_ready() {
                        // Bytes keep coming, but never a request (PINGs, SETTINGS, a head without end).
                        return Poll::Ready(Err(this.first_request_timed_out()));
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending if !this.first.arrived() => {
                if this.deadline.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(this.first_request_timed_out()));
                }
                Poll::Pending
            }
            Poll::Pending => {
                if this.idle(cx) {
                    Closed::Idle.record(this.info.peer, None);
                    // End of stream: hyper closes the connection; no call was open on it.
                    return Poll::Ready(Ok(()));
                }
                Poll::Pending
            }
            ready @ Poll::Ready(Err(_)) => ready,
        }
    }
}

impl<T: Transport> AsyncWrite for Conn<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl<T: Transport> Connected for Conn<T> {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

#[cfg(test)]
mod tests;
