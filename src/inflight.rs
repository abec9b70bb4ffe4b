//! Calls in flight: counted, so a draining server can stop as soon as the last call finishes, and capped,
//! so an overloaded server sheds token calls at once instead of queueing them.
//!
//! After GOAWAY, hyper's graceful shutdown can keep waiting on connections that are idle but still
//! open (pooled clients, sidecars; hyperium/hyper#4170), which would stretch every shutdown to the full
//! grace period. Calls are what must not be lost, so [`server::run`](crate::server::run) waits for
//! [`Calls::idle`] instead; idle connections close when the process exits.
//!
//! A call counts from the moment its request reaches the service until its response body (message and
//! trailers) has been sent or dropped.
//!
//! The cap applies to token calls only (paths under [`CAPPED_PREFIX`]): health checks and reflection are
//! never shed, so probes keep answering under load. A token call over the cap is answered at once with
//! [`Error::Overloaded`] (UNAVAILABLE, so clients and meshes retry on another replica).
//!
//! ```
//! use chat_token_service::inflight::{Calls, InFlightLayer};
//! let calls = Calls::default();
//! let layer = InFlightLayer::new(calls.clone(), 1000); // tonic::transport::Server::builder().layer(layer)
//! assert_eq!(calls.in_flight(), 0);
//! ```

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll, ready},
};

use pin_project_lite::pin_project;
use tokio::sync::Notify;

use crate::error::Error;

/// When a call reached the server, as a request extension: the handler measures the caller's deadline from
/// here, the moment tonic's own `grpc-timeout` timer starts, not from whenever the handler first runs.
#[derive(Clone, Copy, Debug)]
pub struct CallStarted(pub tokio::time::Instant);

/// Paths whose calls count against the cap: the token service's methods.
pub const CAPPED_PREFIX: &str = "/ivschat.v1.TokenService/";

/// The shared count of calls in flight.
#[derive(Clone, Default)]
pub struct Calls(Arc<Counter>);

#[derive(Default)]
struct Counter {
    /// Every call in flight, for draining.
    in_flight: AtomicUsize,
    /// Token calls in flight, for the cap.
    capped: AtomicUsize,
    /// Woken when `in_flight` drops to zero.
    idle: Notify,
}

impl Calls {
    /// How many calls are in flight now.
    pub fn in_flight(&self) -> usize {
        self.0.in_flight.load(Ordering::Acquire)
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

    /// Counts a new call; `None` when it is a token call and `max_capped` token calls are in flight.
    fn enter(&self, capped: bool, max_capped: usize) -> Option<CallGuard> {
        if capped {
            let admitted = self
                .0
                .capped
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < max_capped).then_some(n + 1)
                })
                .is_ok();
            if !admitted {
                return None;
            }
        }
        self.0.in_flight.fetch_add(1, Ordering::AcqRel);
        Some(CallGuard {
            counter: self.0.clone(),
            capped,
        })
    }
}

/// Holds one call's place in the counts until dropped.
struct CallGuard {
    counter: Arc<Counter>,
    capped: bool,
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        if self.capped {
            self.counter.capped.fetch_sub(1, Ordering::AcqRel);
        }
        if self.counter.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.counter.idle.notify_waiters();
        }
    }
}

/// Wraps an HTTP service so each call is counted in [`Calls`] and token calls are capped.
#[derive(Clone)]
pub struct InFlightLayer {
    calls: Calls,
    max_token_calls: usize,
}

impl InFlightLayer {
    /// Counts into `calls`; sheds token calls beyond `max_token_calls` in flight.
    pub fn new(calls: Calls, max_token_calls: usize) -> Self {
        InFlightLayer {
            calls,
            max_token_calls,
        }
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

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for InFlight<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    ResBody: Default,
{
    type Response = http::Response<CountedBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<ReqBody>) -> Self::Future {
        request
            .extensions_mut()
            .insert(CallStarted(tokio::time::Instant::now()));
        let capped = request.uri().path().starts_with(CAPPED_PREFIX);
        let state = match self.layer.calls.enter(capped, self.layer.max_token_calls) {
            Some(guard) => State::Called {
                future: self.inner.call(request),
                guard: Some(guard),
            },
            None => State::Shed {
                max: self.layer.max_token_calls,
            },
        };
        ResponseFuture { state }
    }
}

pin_project! {
    /// The inner call, which hands its guard to the response body, or an immediate UNAVAILABLE.
    pub struct ResponseFuture<F> {
        #[pin]
        state: State<F>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Called { #[pin] future: F, guard: Option<CallGuard> },
        Shed { max: usize },
    }
}

impl<F, ResBody, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<http::Response<ResBody>, E>>,
    ResBody: Default,
{
    type Output = Result<http::Response<CountedBody<ResBody>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Called { future, guard } => {
                let response = ready!(future.poll(cx))?;
                let guard = guard.take();
                Poll::Ready(Ok(response.map(|inner| CountedBody {
                    inner,
                    _guard: guard,
                })))
            }
            StateProj::Shed { max } => {
                let error = Error::Overloaded { max_calls: *max };
                // Shed before identity or decoding: the audit knows only that a token call was refused.
                tracing::info!(target: "audit", outcome = error.outcome(), "token refused");
                let status = tonic::Status::from(error);
                Poll::Ready(Ok(status.into_http::<ResBody>().map(|inner| CountedBody {
                    inner,
                    _guard: None,
                })))
            }
        }
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
    use std::convert::Infallible;
    use tower::{Layer, ServiceExt};

    fn token_call() -> http::Request<()> {
        http::Request::builder()
            .uri("/ivschat.v1.TokenService/CreateChatToken")
            .body(())
            .unwrap()
    }

    fn health_check() -> http::Request<()> {
        http::Request::builder()
            .uri("/grpc.health.v1.Health/Check")
            .body(())
            .unwrap()
    }

    fn service(
        calls: &Calls,
        max: usize,
    ) -> impl tower::Service<
        http::Request<()>,
        Response = http::Response<CountedBody<String>>,
        Error = Infallible,
    > {
        InFlightLayer::new(calls.clone(), max).layer(tower::service_fn(
            |_: http::Request<()>| async {
                Ok::<_, Infallible>(http::Response::new("body".to_string()))
            },
        ))
    }

    /// Waits for `service` to be ready and sends it `request`.
    async fn send<S>(service: &mut S, request: http::Request<()>) -> S::Response
    where
        S: tower::Service<http::Request<()>, Error = Infallible>,
    {
        service.ready().await.unwrap().call(request).await.unwrap()
    }

    fn poll_once<F: Future>(future: &mut Pin<&mut F>) -> Poll<F::Output> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        future.as_mut().poll(&mut cx)
    }

    #[tokio::test]
    async fn a_call_counts_until_its_body_is_dropped() {
        let calls = Calls::default();
        let mut service = service(&calls, 10);
        let response = send(&mut service, token_call()).await;
        assert_eq!(calls.in_flight(), 1);

        let idle = calls.idle();
        let mut idle = std::pin::pin!(idle);
        assert!(poll_once(&mut idle).is_pending());
        drop(response);
        assert_eq!(calls.in_flight(), 0);
        assert!(poll_once(&mut idle).is_ready());
    }

    #[tokio::test]
    async fn token_calls_over_the_cap_are_shed_with_unavailable_but_health_checks_are_not() {
        let calls = Calls::default();
        let mut service = service(&calls, 2);
        let first = send(&mut service, token_call()).await;
        let _second = send(&mut service, token_call()).await;

        let shed = send(&mut service, token_call()).await;
        let status = tonic::Status::from_header_map(shed.headers()).expect("grpc-status header");
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert_eq!(calls.in_flight(), 2, "a shed call is not counted");

        let health = send(&mut service, health_check()).await;
        assert!(tonic::Status::from_header_map(health.headers()).is_none());
        assert_eq!(calls.in_flight(), 3);

        drop(first);
        let admitted = send(&mut service, token_call()).await;
        assert!(tonic::Status::from_header_map(admitted.headers()).is_none());
    }

    #[tokio::test]
    async fn idle_is_immediate_with_nothing_in_flight() {
        let calls = Calls::default();
        let idle = calls.idle();
        let mut idle = std::pin::pin!(idle);
        assert!(poll_once(&mut idle).is_ready());
    }
}
