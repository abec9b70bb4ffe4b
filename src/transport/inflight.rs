//! Calls in flight: counted, so a draining server can stop as soon as the last call finishes, and capped,
//! so an overloaded server sheds token calls at once instead of queueing them.
//!
//! After GOAWAY, hyper's graceful shutdown can keep waiting on connections that are idle but still
//! open (pooled clients, sidecars; hyperium/hyper#4170), which would stretch every shutdown to the full
//! grace period. Calls are what must not be lost, so [`server::run`](crate::server::run) waits for
//! [`Calls::idle`] instead; idle connections close when the process exits.
//!
//! A call counts from the moment its request headers reach the service until its response body
//! (message and trailers) has been sent or dropped. It also keeps its connection from being closed as
//! idle ([`super::listener::ConnInfo::call`]).
//!
//! The cap applies to token calls only (the token service's paths): health checks and reflection are
//! never shed, so probes keep answering under load. A token call takes a place under the cap only once
//! its whole request message has arrived, so streams that send headers and never a body (or send it
//! slowly) cannot fill the cap and shut other callers out; they hold only an HTTP/2 stream of their own
//! connection, and only for `transport.max_call_duration`. A token call whose message arrives while the
//! cap is full is answered at once with [`Error::Overloaded`] (UNAVAILABLE, so clients and meshes retry
//! on another replica), before it is decoded and before any identity, policy or issuing work.
//!
//! ```
//! use chat_token_service::transport::inflight::{Calls, InFlightLayer};
//! let calls = Calls::new(1000);
//! let layer = InFlightLayer::new(calls.clone()); // tonic::transport::Server::builder().layer(layer)
//! assert_eq!(calls.in_flight(), 0);
//! ```

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll, ready},
};

use bytes::Buf;
use pin_project_lite::pin_project;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use super::listener::{ConnInfo, OpenCall};
use crate::domain::Error;
use crate::proto::ivschat::v1::token_service_server;
use crate::rescue::rescue;

/// When a call reached the server, as a request extension: the handler measures the caller's deadline from
/// here, the moment tonic's own `grpc-timeout` timer starts, not from whenever the handler first runs.
#[derive(Clone, Copy, Debug)]
pub struct CallStarted(pub tokio::time::Instant);

/// Whether calls to `path` count against the cap: the token service's methods.
fn capped(path: &str) -> bool {
    path.strip_prefix('/')
        .and_then(|path| path.strip_prefix(token_service_server::SERVICE_NAME))
        .is_some_and(|method| method.starts_with('/'))
}

/// The shared count of calls in flight, and the cap on token calls. Clones share both.
#[derive(Clone)]
pub struct Calls(Arc<Counter>);

struct Counter {
    /// Every call in flight, for draining.
    in_flight: AtomicUsize,
    /// Woken when `in_flight` drops to zero.
    idle: Notify,
    /// Places under the cap: a token call holds one from the moment its message has arrived until its
    /// answer has been sent.
    places: Arc<Semaphore>,
    /// How many places there are (`max_concurrent_calls`).
    max: usize,
}

impl Calls {
    /// Counts calls, with `max` places for token calls.
    pub fn new(max: usize) -> Self {
        Calls(Arc::new(Counter {
            in_flight: AtomicUsize::new(0),
            idle: Notify::new(),
            places: Arc::new(Semaphore::new(max)),
            max,
        }))
    }

    /// How many calls are in flight now.
    pub fn in_flight(&self) -> usize {
        self.0.in_flight.load(Ordering::Acquire)
    }

    /// How many token calls hold a place under the cap now.
    pub fn capped(&self) -> usize {
        self.0.max - self.0.places.available_permits()
    }

    /// How many places there are.
    pub fn max(&self) -> usize {
        self.0.max
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
            place: None,
            _open: None,
        }
    }

    /// A place under the cap for a call whose message has arrived, held until it is dropped; `None` when
    /// every place is taken.
    pub fn admit(&self) -> Option<Place> {
        self.0.places.clone().try_acquire_owned().ok().map(Place)
    }
}

/// A token call's place under the cap (see [`Calls::admit`]); given back when dropped.
pub struct Place(#[allow(dead_code, reason = "held for its drop")] OwnedSemaphorePermit);

/// Where a token call's place is kept once its message has arrived: shared by its request body, which
/// takes the place, and its call guard, which holds it until the answer has been sent.
type PlaceSlot = Arc<OnceLock<Place>>;

/// Holds one call's place in the counts until dropped.
struct CallGuard {
    counter: Arc<Counter>,
    /// A token call's place under the cap, once its request body has taken it.
    place: Option<PlaceSlot>,
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

/// Wraps an HTTP service so each call is counted in [`Calls`] and token calls are capped.
#[derive(Clone)]
pub struct InFlightLayer {
    calls: Calls,
}

impl InFlightLayer {
    /// Counts into `calls`; sheds token calls beyond its places.
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

impl<S, ResBody> tower::Service<http::Request<tonic::body::Body>> for InFlight<S>
where
    S: tower::Service<http::Request<tonic::body::Body>, Response = http::Response<ResBody>>,
{
    type Response = http::Response<CountedBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<tonic::body::Body>) -> Self::Future {
        request
            .extensions_mut()
            .insert(CallStarted(tokio::time::Instant::now()));
        let mut guard = self.layer.calls.enter();
        guard._open = request.extensions().get::<ConnInfo>().map(ConnInfo::call);
        if capped(request.uri().path()) {
            let place = PlaceSlot::default();
            guard.place = Some(place.clone());
            let calls = self.layer.calls.clone();
            request = request.map(|body| {
                tonic::body::Body::new(GatedBody {
                    inner: body,
                    calls,
                    place,
                    message: MessageProgress::default(),
                })
            });
        }
        ResponseFuture {
            future: self.inner.call(request),
            guard: Some(guard),
        }
    }
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
}

pin_project! {
    /// A token call's request body: takes the call's place under the cap when the whole message has
    /// arrived, or ends the call with UNAVAILABLE when there is none.
    struct GatedBody {
        #[pin]
        inner: tonic::body::Body,
        calls: Calls,
        place: PlaceSlot,
        message: MessageProgress,
    }
}

impl http_body::Body for GatedBody {
    type Data = bytes::Bytes;
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
            && this.message.feed(data.clone())
        {
            match this.calls.admit() {
                Some(place) => {
                    let _ = this.place.set(place);
                }
                None => {
                    let error = Error::Overloaded {
                        max_calls: this.calls.max(),
                    };
                    // Shed before decoding or identity: the audit knows only that a token call was refused.
                    tracing::info!(target: "audit", outcome = error.outcome(), "token refused");
                    return Poll::Ready(Some(Err(rescue(error).into_status())));
                }
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
    /// The inner call, which hands its guard to the response body.
    pub struct ResponseFuture<F> {
        #[pin]
        future: F,
        guard: Option<CallGuard>,
    }
}

impl<F, ResBody, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<http::Response<ResBody>, E>>,
{
    type Output = Result<http::Response<CountedBody<ResBody>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = ready!(this.future.poll(cx))?;
        let guard = this.guard.take();
        Poll::Ready(Ok(response.map(|inner| CountedBody {
            inner,
            _guard: guard,
        })))
    }
}

pin_project! {
    /// A response body that keeps its call counted until it is dropped.
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
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::convert::Infallible;
    use tower::{Layer, ServiceExt};

    /// A gRPC message frame (prefix and `len` payload bytes).
    fn message(len: usize) -> bytes::Bytes {
        let mut frame = vec![0u8];
        frame.extend_from_slice(&(len as u32).to_be_bytes());
        frame.resize(5 + len, 7);
        frame.into()
    }

    fn token_call(body: tonic::body::Body) -> http::Request<tonic::body::Body> {
        http::Request::builder()
            .uri("/ivschat.v1.TokenService/CreateChatToken")
            .body(body)
            .unwrap()
    }

    fn health_check() -> http::Request<tonic::body::Body> {
        http::Request::builder()
            .uri("/grpc.health.v1.Health/Check")
            .body(tonic::body::Body::empty())
            .unwrap()
    }

    /// Reads the request body as tonic's decoder would, answering with the status it ends in (or OK).
    fn service(
        calls: &Calls,
    ) -> impl tower::Service<
        http::Request<tonic::body::Body>,
        Response = http::Response<CountedBody<String>>,
        Error = Infallible,
    > + Clone {
        InFlightLayer::new(calls.clone()).layer(tower::service_fn(
            |request: http::Request<tonic::body::Body>| async {
                let answer = match request.into_body().collect().await {
                    Ok(_) => "ok".to_string(),
                    Err(status) => format!("{:?}", status.code()),
                };
                Ok::<_, Infallible>(http::Response::new(answer))
            },
        ))
    }

    async fn send<S>(service: &mut S, request: http::Request<tonic::body::Body>) -> S::Response
    where
        S: tower::Service<http::Request<tonic::body::Body>, Error = Infallible>,
    {
        service.ready().await.unwrap().call(request).await.unwrap()
    }

    async fn answer(response: http::Response<CountedBody<String>>) -> String {
        response.into_body().inner
    }

    fn poll_once<F: Future>(future: &mut Pin<&mut F>) -> Poll<F::Output> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        future.as_mut().poll(&mut cx)
    }

    #[tokio::test]
    async fn a_call_counts_until_its_body_is_dropped() {
        let calls = Calls::new(10);
        let mut service = service(&calls);
        let response = send(
            &mut service,
            token_call(tonic::body::Body::new(
                http_body_util::Full::new(message(3)).map_err(|e| match e {}),
            )),
        )
        .await;
        assert_eq!((calls.in_flight(), calls.capped()), (1, 1));

        let idle = calls.idle();
        let mut idle = std::pin::pin!(idle);
        assert!(poll_once(&mut idle).is_pending());
        drop(response);
        assert_eq!((calls.in_flight(), calls.capped()), (0, 0));
        assert!(poll_once(&mut idle).is_ready());
    }

    #[tokio::test]
    async fn token_calls_over_the_cap_are_shed_with_unavailable_but_health_checks_are_not() {
        let calls = Calls::new(2);
        let mut service = service(&calls);
        let full = || {
            token_call(tonic::body::Body::new(
                http_body_util::Full::new(message(10)).map_err(|e| match e {}),
            ))
        };
        let first = send(&mut service, full()).await;
        let _second = send(&mut service, full()).await;

        let shed = send(&mut service, full()).await;
        assert_eq!(calls.capped(), 2, "a shed call takes no place");
        assert_eq!(answer(shed).await, "Unavailable");

        let health = send(&mut service, health_check()).await;
        assert_eq!(answer(health).await, "ok");

        drop(first);
        let admitted = send(&mut service, full()).await;
        assert_eq!(answer(admitted).await, "ok");
    }

    #[tokio::test]
    async fn a_token_call_takes_a_place_only_once_its_whole_message_has_arrived() {
        let calls = Calls::new(1);
        let mut service = service(&calls);
        // A body that sends the prefix and part of the message, then waits.
        let (sender, body) = tokio::sync::mpsc::channel::<bytes::Bytes>(4);
        let whole = message(100);
        let stream = tokio_stream::StreamExt::map(
            tokio_stream::wrappers::ReceiverStream::new(body),
            |data| Ok::<_, tonic::Status>(http_body::Frame::data(data)),
        );
        let mut slow_service = service.clone();
        let slow = async {
            let request = token_call(tonic::body::Body::new(http_body_util::StreamBody::new(
                stream,
            )));
            answer(send(&mut slow_service, request).await).await
        };
        let mut slow = std::pin::pin!(slow);
        sender.send(whole.slice(..3)).await.unwrap();
        sender.send(whole.slice(3..50)).await.unwrap();
        assert!(poll_once(&mut slow).is_pending());
        assert_eq!(calls.capped(), 0, "a partial message takes no place");
        assert_eq!(calls.in_flight(), 1, "but the call is counted for draining");

        // Another call gets the only place meanwhile.
        let other = send(
            &mut service,
            token_call(tonic::body::Body::new(
                http_body_util::Full::new(message(1)).map_err(|e| match e {}),
            )),
        )
        .await;
        assert_eq!(calls.capped(), 1);

        // The slow call's message completes while the place is taken: shed.
        sender.send(whole.slice(50..)).await.unwrap();
        drop(sender);
        let Poll::Ready(slow) = poll_once(&mut slow) else {
            panic!("the whole message has arrived")
        };
        assert_eq!(slow, "Unavailable");
        drop(other);
        assert_eq!((calls.in_flight(), calls.capped()), (0, 0));
    }

    #[test]
    fn message_progress_reads_the_length_across_frames() {
        let whole = message(300);
        let mut progress = MessageProgress::default();
        assert!(!progress.feed(whole.slice(..2)));
        assert!(!progress.feed(whole.slice(2..6)));
        assert!(!progress.feed(whole.slice(6..304)));
        assert!(progress.feed(whole.slice(304..)));
        let mut empty = MessageProgress::default();
        assert!(
            empty.feed(message(0)),
            "an empty message is whole at its prefix"
        );
    }

    #[tokio::test]
    async fn idle_is_immediate_with_nothing_in_flight() {
        let calls = Calls::new(1);
        let idle = calls.idle();
        let mut idle = std::pin::pin!(idle);
        assert!(poll_once(&mut idle).is_ready());
    }
}
