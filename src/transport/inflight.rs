//! Calls in flight: counted, so a draining server can stop as soon as the last call finishes, and bounded,
//! so an overloaded server sheds calls at once instead of queueing them or buffering without end.
//!
//! After GOAWAY, hyper's graceful shutdown can keep waiting on connections that are idle but still
//! open (pooled clients, sidecars; hyperium/hyper#4170), which would stretch every shutdown to the full
//! grace period. Calls are what must not be lost, so [`server::run`](crate::server::run) waits for
//! [`Calls::idle`] instead; idle connections close when the process exits.
//!
//! A call counts from the moment its request headers reach the service until its response body
//! (message and trailers) has been sent or dropped. It also keeps its connection from being closed as
//! idle ([`super::listener::ConnInfo::call`]). Three bounds apply, each answered at once with
//! [`Error::Overloaded`] (UNAVAILABLE, HTTP 503: clients and meshes retry on another replica):
//!
//! - **Calls:** every call but health checks and reflection takes a place under `max_concurrent_calls`,
//!   once its whole request message has arrived (the HTTP API's door takes its place once it has read the
//!   body). Streams that send headers and never a body (or send it slowly) cannot fill the cap and shut
//!   other callers out; they hold only an HTTP/2 stream of their own connection, and only for
//!   `transport.max_call_duration`. Health checks are never shed, so probes keep answering under load.
//! - **Request bytes:** every call but a health check reserves its request head's size (as HTTP/2
//!   counts it: name, value and 32 bytes a header) from `transport.max_request_bytes_in_flight` when it
//!   arrives, and its message's size as soon as that is known (gRPC's 5-byte length prefix; HTTP's
//!   `Content-Length`, or the HTTP API's largest body when there is none), and holds both until it ends.
//!   What clients can make the server hold for their calls is bounded before they are even identified.
//! - **Streaming calls:** health `Watch` and reflection streams, at most
//!   `transport.max_streaming_calls_per_connection` on a connection and `transport.max_streaming_calls`
//!   in total.
//!
//! ```
//! use chat_token_service::transport::inflight::{CallLimits, Calls, InFlightLayer};
//! let calls = Calls::new(CallLimits::default());
//! let layer = InFlightLayer::new(calls.clone()); // a tower layer over the HTTP service
//! assert_eq!(calls.in_flight(), 0);
//! ```

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll, ready},
};

use bytes::{Buf, Bytes};
use http_body_util::{Either, Full};
use pin_project_lite::pin_project;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use super::listener::{ConnInfo, OpenCall, StreamingCall};
use crate::domain::{Error, Overload};
use crate::rescue::rescue;

/// When a call reached the server, as a request extension: the handler measures the caller's deadline from
/// here, the moment the transport's own deadline starts, not from whenever the handler first runs.
#[derive(Clone, Copy, Debug)]
pub struct CallStarted(pub tokio::time::Instant);

/// What kind of call a request is, by its path and content type: what it counts against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallKind {
    /// `grpc.health.v1.Health/Check`: never shed.
    HealthCheck,
    /// `grpc.health.v1.Health/Watch`: a stream.
    HealthWatch,
    /// gRPC server reflection (v1 or v1alpha): a stream.
    Reflection,
    /// Any other gRPC call.
    Grpc,
    /// The IVS HTTP API (anything that is not gRPC).
    Http,
}

impl CallKind {
    /// The kind of `request`.
    pub fn of<B>(request: &http::Request<B>) -> Self {
        let path = request.uri().path();
        if let Some(method) = path.strip_prefix("/grpc.health.v1.Health/") {
            return if method == "Watch" {
                CallKind::HealthWatch
            } else {
                CallKind::HealthCheck
            };
        }
        if path.starts_with("/grpc.reflection.") {
            return CallKind::Reflection;
        }
        let grpc = request
            .headers()
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        if grpc { CallKind::Grpc } else { CallKind::Http }
    }

    /// Whether it takes a place under `max_concurrent_calls`.
    fn capped(self) -> bool {
        matches!(self, CallKind::Grpc | CallKind::Http)
    }

    /// Whether it is a stream that may stay open (and so counts against the streaming bounds).
    pub fn streaming(self) -> bool {
        matches!(self, CallKind::HealthWatch | CallKind::Reflection)
    }
}

/// The bounds of [`Calls`], from the configuration.
#[derive(Clone, Copy, Debug)]
pub struct CallLimits {
    /// Calls holding a place at once (`max_concurrent_calls`).
    pub max_calls: usize,
    /// Request bytes held at once (`transport.max_request_bytes_in_flight`).
    pub request_bytes: usize,
    /// What an HTTP request without `Content-Length` reserves: the HTTP API's largest body
    /// (`http_api.max_body_bytes`).
    pub max_http_body: usize,
    /// Streaming calls open at once (`transport.max_streaming_calls`).
    pub max_streams: usize,
    /// Streaming calls open at once on one connection (`transport.max_streaming_calls_per_connection`).
    pub max_streams_per_connection: usize,
}

impl Default for CallLimits {
    /// The configuration's defaults.
    fn default() -> Self {
        CallLimits {
            max_calls: 1024,
            request_bytes: 16 * 1024 * 1024,
            max_http_body: 16 * 1024,
            max_streams: 256,
            max_streams_per_connection: 4,
        }
    }
}

/// The shared count of calls in flight, and their bounds. Clones share everything.
#[derive(Clone)]
pub struct Calls(Arc<Counter>);

struct Counter {
    /// Every call in flight, for draining.
    in_flight: AtomicUsize,
    /// Woken when `in_flight` drops to zero.
    idle: Notify,
    /// Places under `max_concurrent_calls`.
    places: Arc<Semaphore>,
    /// Request bytes, one permit a byte.
    bytes: Arc<Semaphore>,
    /// Streaming calls in total.
    streams: Arc<Semaphore>,
    limits: CallLimits,
}

impl Calls {
    /// Counts calls within `limits`.
    pub fn new(limits: CallLimits) -> Self {
        Calls(Arc::new(Counter {
            in_flight: AtomicUsize::new(0),
            idle: Notify::new(),
            places: Arc::new(Semaphore::new(limits.max_calls)),
            bytes: Arc::new(Semaphore::new(limits.request_bytes)),
            streams: Arc::new(Semaphore::new(limits.max_streams)),
            limits,
        }))
    }

    /// How many calls are in flight now.
    pub fn in_flight(&self) -> usize {
        self.0.in_flight.load(Ordering::Acquire)
    }

    /// How many calls hold a place under the cap now.
    pub fn capped(&self) -> usize {
        self.0.limits.max_calls - self.0.places.available_permits()
    }

    /// How many request bytes are held now.
    pub fn request_bytes(&self) -> usize {
        self.0.limits.request_bytes - self.0.bytes.available_permits()
    }

    /// How many places there are.
    pub fn max(&self) -> usize {
        self.0.limits.max_calls
    }

    /// Completes once no call is in flight (at once if none is).
    pub async fn idle(&self) {
        loop {
            let notified = self.0.idle.notified();
            let mut notified = std::pin::pin!(notified);
            // Register before checking, so a call ending in between is not missed.
            notified.as_mut().enable();
            if self.in_flight() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Counts a new call.
    fn enter(&self) -> CallGuard {
        self.0.in_flight.fetch_add(1, Ordering::AcqRel);
        CallGuard {
            counter: self.0.clone(),
            held: Held::default(),
            _open: None,
        }
    }

    /// A place under the cap for a call whose request has arrived, held until it is dropped.
    pub fn admit(&self) -> Result<Place, Error> {
        self.0
            .places
            .clone()
            .try_acquire_owned()
            .map(Place)
            .map_err(|_| {
                Error::Overloaded(Overload::Calls {
                    max_calls: self.0.limits.max_calls,
                })
            })
    }

    /// `bytes` of the request budget, held until dropped.
    fn reserve(&self, bytes: usize) -> Result<OwnedSemaphorePermit, Error> {
        let refused = || {
            Error::Overloaded(Overload::RequestBytes {
                budget: self.0.limits.request_bytes,
            })
        };
        let bytes = u32::try_from(bytes).map_err(|_| refused())?;
        self.0
            .bytes
            .clone()
            .try_acquire_many_owned(bytes)
            .map_err(|_| refused())
    }
}

/// A call's place under the cap (see [`Calls::admit`]); given back when dropped.
pub struct Place(#[allow(dead_code, reason = "held for its drop")] OwnedSemaphorePermit);

/// What a call holds until it ends, shared by its request body (which takes places and bytes as its
/// message arrives) and its guard (which gives them back when the answer has been sent).
type Held = Arc<Mutex<Holding>>;

#[derive(Default)]
struct Holding {
    place: Option<Place>,
    /// The request head's bytes.
    head: Option<OwnedSemaphorePermit>,
    /// The request message's bytes.
    bytes: Option<OwnedSemaphorePermit>,
    stream: Option<(OwnedSemaphorePermit, StreamingCall)>,
}

fn hold(held: &Held) -> std::sync::MutexGuard<'_, Holding> {
    // A panic while holding the lock cannot leave a half-written permit behind.
    held.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Holds one call's place in the counts until dropped.
struct CallGuard {
    counter: Arc<Counter>,
    held: Held,
    /// Keeps the connection from being closed as idle.
    _open: Option<OpenCall>,
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        if self.counter.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.counter.idle.notify_waiters();
        }
    }
}

/// Wraps an HTTP service so each call is counted in [`Calls`] and kept within its bounds.
#[derive(Clone)]
pub struct InFlightLayer {
    calls: Calls,
}

impl InFlightLayer {
    /// Counts into `calls`, within its bounds.
    pub fn new(calls: Calls) -> Self {
        InFlightLayer { calls }
    }
}

impl<S> tower::Layer<S> for InFlightLayer {
    type Service = InFlight<S>;

    fn layer(&self, inner: S) -> InFlight<S> {
        InFlight {
            inner,
            layer: self.clone(),
        }
    }
}

/// See [`InFlightLayer`].
#[derive(Clone)]
pub struct InFlight<S> {
    inner: S,
    layer: InFlightLayer,
}

/// A response of [`InFlight`]: the inner service's, or a refusal made here.
pub type InFlightBody<B> = CountedBody<Either<B, Full<Bytes>>>;

impl<S, ResBody> tower::Service<http::Request<tonic::body::Body>> for InFlight<S>
where
    S: tower::Service<http::Request<tonic::body::Body>, Response = http::Response<ResBody>>,
{
    type Response = http::Response<InFlightBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<tonic::body::Body>) -> Self::Future {
        request
            .extensions_mut()
            .insert(CallStarted(tokio::time::Instant::now()));
        let calls = &self.layer.calls;
        let mut guard = calls.enter();
        let conn = request.extensions().get::<ConnInfo>().cloned();
        guard._open = conn.as_ref().map(ConnInfo::call);
        let kind = CallKind::of(&request);
        // Health checks are never shed, so probes answer under any load; everything else holds its head.
        let head = match kind {
            CallKind::HealthCheck => Ok(()),
            _ => calls
                .reserve(head_bytes(request.headers()))
                .map(|permit| hold(&guard.held).head = Some(permit)),
        };
        let admitted = head.and_then(|()| match kind {
            // The HTTP API's door takes the call's place once it has read the body; the bytes are
            // reserved here, from the head, before anything is read.
            CallKind::Http => {
                let declared = request
                    .headers()
                    .get(http::header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
                let bytes = declared.map_or(calls.0.limits.max_http_body, |length| {
                    length.min(calls.0.limits.max_http_body)
                });
                calls.reserve(bytes).map(|permit| {
                    hold(&guard.held).bytes = Some(permit);
                })
            }
            CallKind::HealthWatch | CallKind::Reflection => {
                open_stream(calls, conn.as_ref()).map(|stream| {
                    hold(&guard.held).stream = Some(stream);
                })
            }
            CallKind::HealthCheck | CallKind::Grpc => Ok(()),
        });
        if let Err(error) = admitted {
            tracing::info!(target: "audit", outcome = error.outcome(), "call refused");
            return ResponseFuture {
                state: State::Refused {
                    response: Some(refusal(kind, error)),
                },
                guard: Some(guard),
            };
        }
        if kind != CallKind::Http {
            let held = guard.held.clone();
            let calls = calls.clone();
            request = request.map(|body| {
                tonic::body::Body::new(GatedBody {
                    inner: body,
                    calls,
                    held,
                    capped: kind.capped(),
                    message: MessageProgress::default(),
                })
            });
        }
        ResponseFuture {
            state: State::Called {
                future: self.inner.call(request),
            },
            guard: Some(guard),
        }
    }
}

/// A request head's size as HTTP/2 counts it against SETTINGS_MAX_HEADER_LIST_SIZE: each header's name
/// and value, plus 32 bytes.
fn head_bytes(headers: &http::HeaderMap) -> usize {
    headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 32)
        .sum()
}

/// A streaming call's places: one of the connection's and one of the replica's.
fn open_stream(
    calls: &Calls,
    conn: Option<&ConnInfo>,
) -> Result<(OwnedSemaphorePermit, StreamingCall), Error> {
    let limits = calls.0.limits;
    let per_connection = conn
        .and_then(|conn| conn.stream(limits.max_streams_per_connection))
        .ok_or(Error::Overloaded(Overload::StreamsOnConnection {
            max_streams: limits.max_streams_per_connection,
        }))?;
    let total = calls.0.streams.clone().try_acquire_owned().map_err(|_| {
        Error::Overloaded(Overload::Streams {
            max_streams: limits.max_streams,
        })
    })?;
    Ok((total, per_connection))
}

/// `error` answered before the call ran, as its protocol answers errors.
fn refusal<B>(kind: CallKind, error: Error) -> http::Response<Either<B, Full<Bytes>>> {
    let rescued = rescue(error);
    if kind == CallKind::Http {
        return rescued
            .into_ivs()
            .to_http()
            .map(|body| Either::Right(Full::new(body)));
    }
    let (parts, ()) = rescued.into_status().into_http::<()>().into_parts();
    http::Response::from_parts(parts, Either::Right(Full::default()))
}

/// How much of a gRPC request's first message has arrived: its 5-byte prefix, then its length.
#[derive(Default)]
struct MessageProgress {
    /// Bytes received so far (of the first message).
    received: u64,
    /// The prefix, as it arrives.
    prefix: [u8; 5],
    /// Prefix plus message length, once the prefix is complete.
    needed: Option<u64>,
}

impl MessageProgress {
    /// Counts `data`; `true` once the whole first message has arrived.
    fn feed(&mut self, mut data: impl Buf) -> bool {
        while self.needed.is_none() && data.has_remaining() {
            self.prefix[self.received as usize] = data.get_u8();
            self.received += 1;
            if self.received == 5 {
                let length = u32::from_be_bytes([
                    self.prefix[1],
                    self.prefix[2],
                    self.prefix[3],
                    self.prefix[4],
                ]);
                self.needed = Some(5 + u64::from(length));
            }
        }
        self.received += data.remaining() as u64;
        self.needed.is_some_and(|needed| self.received >= needed)
    }

    /// The first message's length, once its prefix has arrived.
    fn length(&self) -> Option<u64> {
        self.needed.map(|needed| needed - 5)
    }
}

pin_project! {
    /// A gRPC call's request body: reserves the request bytes as soon as the first message's length is
    /// known, and takes the call's place under the cap (when it is capped) once the whole message has
    /// arrived; or ends the call with UNAVAILABLE when either is spent.
    struct GatedBody {
        #[pin]
        inner: tonic::body::Body,
        calls: Calls,
        held: Held,
        capped: bool,
        message: MessageProgress,
    }
}

impl http_body::Body for GatedBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        if let Some(Ok(frame)) = &frame
            && let Some(data) = frame.data_ref()
            && this
                .message
                .needed
                .is_none_or(|n| this.message.received < n)
        {
            let had_length = this.message.length().is_some();
            let whole = this.message.feed(data.clone());
            let mut admitted = Ok(());
            if !had_length && let Some(length) = this.message.length() {
                admitted = this
                    .calls
                    .reserve(usize::try_from(length).unwrap_or(usize::MAX))
                    .map(|permit| hold(this.held).bytes = Some(permit));
            }
            if admitted.is_ok() && whole && *this.capped {
                admitted = this
                    .calls
                    .admit()
                    .map(|place| hold(this.held).place = Some(place));
            }
            if let Err(error) = admitted {
                // Shed before decoding or identity: the audit knows only that a call was refused.
                tracing::info!(target: "audit", outcome = error.outcome(), "call refused");
                return Poll::Ready(Some(Err(rescue(error).into_status())));
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

pin_project! {
    /// The inner call, or a refusal made before it; hands the call's guard to the response body.
    pub struct ResponseFuture<F> {
        #[pin]
        state: State<F>,
        guard: Option<CallGuard>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Called { #[pin] future: F },
        Refused { response: Option<http::Response<Either<Never, Full<Bytes>>>> },
    }
}

/// The inner body type of a refusal, which never is the inner service's.
enum Never {}

impl<F, ResBody, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<http::Response<ResBody>, E>>,
{
    type Output = Result<http::Response<InFlightBody<ResBody>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = match this.state.project() {
            StateProj::Called { future } => ready!(future.poll(cx))?.map(Either::Left),
            StateProj::Refused { response } => response
                .take()
                .expect("a refusal is answered once")
                .map(|body| match body {
                    Either::Right(full) => Either::Right(full),
                    Either::Left(never) => match never {},
                }),
        };
        let guard = this.guard.take();
        Poll::Ready(Ok(response.map(|inner| CountedBody {
            inner,
            _guard: guard,
        })))
    }
}

pin_project! {
    /// A response body that keeps its call counted, and its places held, until it is dropped.
    pub struct CountedBody<B> {
        #[pin]
        inner: B,
        _guard: Option<CallGuard>,
    }
}

impl<B: http_body::Body> http_body::Body for CountedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests;
