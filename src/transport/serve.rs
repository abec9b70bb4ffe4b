//! Serving HTTP on the guarded connections of [`super::listener::incoming`]: hyper's HTTP/2, and HTTP/1.1
//! when the IVS HTTP API is on, with every bound set here rather than left at a default.
//!
//! This is what tonic's own server loop does, in the open: tonic exposes neither HTTP/1.1's head limits
//! nor its read timeout, which leaves a head of ~400 KiB and 30 s per request to anyone who connects. Here:
//! - HTTP/2: `transport.max_concurrent_streams`, `transport.max_header_list_bytes`, keepalive PINGs, the
//!   reset-flood guards, and a stream flow-control window of one request message, so a stream cannot make
//!   the server buffer more than its message may hold (the connection keeps HTTP/2's 64 KiB).
//! - HTTP/1.1: a request head at most `transport.max_header_list_bytes` (and 100 headers), read within
//!   `transport.preface_timeout`.
//! - `transport.max_connection_age`: GOAWAY, then `max_connection_age_grace` for the calls still open.
//! - Shutdown: the listener closes at once, every connection gets GOAWAY (HTTP/2) or closes after its
//!   current response (HTTP/1.1), and the returned future completes once they have all closed.

use std::{convert::Infallible, future::Future, pin::pin, sync::Arc, time::Duration};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto::Builder,
    service::TowerToHyperService,
};
use tokio::sync::watch;
use tokio_stream::StreamExt;
use tower::{Service, ServiceExt};

use super::listener::{Conn, Transport};
use crate::config::TransportConfig;

/// Streams a client may open and reset before the server accepts them, per connection (hyper's default),
/// set explicitly so it cannot silently change with a dependency (CVE-2023-44487 "rapid reset").
const MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;
/// Streams the server may reset for a client's protocol errors before closing its connection (hyper's
/// default; CVE-2025-8671 "MadeYouReset").
const MAX_LOCAL_ERROR_RESET_STREAMS: usize = 1024;
/// HTTP/1.1 headers per request head: hyper's default, named here with the other bounds.
const MAX_HTTP1_HEADERS: usize = 100;
/// HTTP/2's largest flow-control window.
const MAX_WINDOW: u32 = (1 << 31) - 1;
/// hyper's smallest HTTP/1.1 read buffer.
const MIN_HTTP1_BUFFER: usize = 8192;

/// How the connections are served.
#[derive(Clone, Debug)]
pub struct HttpSettings {
    /// Per-connection limits and timeouts.
    pub transport: TransportConfig,
    /// The largest request message: each HTTP/2 stream's flow-control window, so a client cannot push
    /// more than one message's worth into the server before it is read.
    pub max_request_bytes: usize,
    /// Whether HTTP/1.1 is served (the IVS HTTP API), besides HTTP/2.
    pub http1: bool,
}

/// Serves `service` on every connection `incoming` yields until `shutdown` completes, then drains: the
/// listener is closed (by dropping `incoming`), every connection is asked to finish, and the future
/// completes once they all have.
pub async fn serve<T, I, S, B>(
    incoming: I,
    service: S,
    settings: HttpSettings,
    shutdown: impl Future<Output = ()>,
) where
    T: Transport,
    I: tokio_stream::Stream<Item = std::io::Result<Conn<T>>>,
    S: Service<Request<tonic::body::Body>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let builder = Arc::new(builder(&settings));
    let transport = &settings.transport;
    let (drain_tx, drain_rx) = watch::channel(());
    {
        // Scoped, so `incoming` (and with it the listener) is dropped as soon as accepting stops.
        let mut incoming = pin!(incoming);
        let mut shutdown = pin!(shutdown);
        loop {
            let conn = tokio::select! {
                () = &mut shutdown => break,
                conn = incoming.next() => conn,
            };
            let conn = match conn {
                Some(Ok(conn)) => conn,
                Some(Err(e)) => {
                    tracing::debug!("accept failed: {e}");
                    continue;
                }
                None => break,
            };
            tokio::spawn(serve_connection(
                conn,
                service.clone(),
                builder.clone(),
                drain_rx.clone(),
                transport.max_connection_age,
                transport.max_connection_age_grace,
            ));
        }
    }
    let _ = drain_tx.send(());
    drop(drain_rx);
    // Every connection task holds a receiver until it ends.
    drain_tx.closed().await;
}

fn builder(settings: &HttpSettings) -> Builder<TokioExecutor> {
    let transport = &settings.transport;
    let mut builder = Builder::new(TokioExecutor::new());
    if !settings.http1 {
        builder = builder.http2_only();
    }
    // A stream may send one message (and its 5-byte prefix) before the server reads it; the connection
    // as a whole keeps HTTP/2's initial 64 KiB window.
    let stream_window = u32::try_from(settings.max_request_bytes.saturating_add(5))
        .unwrap_or(u32::MAX)
        .min(MAX_WINDOW);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(transport.max_concurrent_streams.get())
        .max_header_list_size(transport.max_header_list_bytes.get())
        .initial_stream_window_size(stream_window)
        .keep_alive_interval(transport.keepalive_interval)
        .keep_alive_timeout(transport.keepalive_timeout)
        .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESET_STREAMS)
        .max_local_error_reset_streams(MAX_LOCAL_ERROR_RESET_STREAMS);
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(transport.preface_timeout)
        .max_buf_size(
            usize::try_from(transport.max_header_list_bytes.get())
                .unwrap_or(usize::MAX)
                .max(MIN_HTTP1_BUFFER),
        )
        .max_headers(MAX_HTTP1_HEADERS);
    builder
}

/// Serves one connection until it ends, is shut down with the server, or reaches its maximum age.
async fn serve_connection<T, S, B>(
    conn: Conn<T>,
    service: S,
    builder: Arc<Builder<TokioExecutor>>,
    mut drain: watch::Receiver<()>,
    max_age: Duration,
    max_age_grace: Duration,
) where
    T: Transport,
    S: Service<Request<tonic::body::Body>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let info = conn.info().clone();
    // Every request learns its connection (peer, client certificates, activity), as tonic would tell it.
    let service = service.map_request(move |request: Request<Incoming>| {
        let mut request = request.map(tonic::body::Body::new);
        request.extensions_mut().insert(info.clone());
        request
    });
    let connection =
        builder.serve_connection(TokioIo::new(conn), TowerToHyperService::new(service));
    let mut connection = pin!(connection);
    let age = tokio::time::sleep(max_age);
    let mut age = pin!(age);
    let mut draining = false;
    let mut grace: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
    loop {
        tokio::select! {
            served = &mut connection => {
                if let Err(e) = served {
                    tracing::debug!("connection ended: {e}");
                }
                return;
            }
            () = &mut age, if grace.is_none() => {
                connection.as_mut().graceful_shutdown();
                grace = Some(Box::pin(tokio::time::sleep(max_age_grace)));
            }
            () = async { grace.as_mut().expect("armed").await }, if grace.is_some() => {
                tracing::debug!("connection closed: max_connection_age_grace elapsed");
                return;
            }
            changed = drain.changed(), if !draining => {
                let _ = changed;
                draining = true;
                connection.as_mut().graceful_shutdown();
            }
        }
    }
}
