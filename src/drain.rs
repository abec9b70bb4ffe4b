//! Counts gRPC calls in flight so a draining server can stop as soon as the last call finishes.
//!
//! After GOAWAY, hyper's graceful shutdown can keep waiting on connections that are idle but still
//! open (pooled clients, sidecars; hyperium/hyper#4170), which would stretch every shutdown to the full
//! grace period. Calls are what must not be lost, so [`server::run`](crate::server::run) waits for
//! [`Calls::idle`] instead; idle connections close when the process exits.
//!
//! A call counts from the moment its request reaches the service until its response body (message and
//! trailers) has been sent or dropped.
//!
//! ```
//! use chat_token_service::drain::{Calls, CountCallsLayer};
//! let calls = Calls::default();
//! let layer = CountCallsLayer::new(calls.clone()); // tonic::transport::Server::builder().layer(layer)
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

/// The shared count of calls in flight.
#[derive(Clone, Default)]
pub struct Calls(Arc<Counter>);

#[derive(Default)]
struct Counter {
    in_flight: AtomicUsize,
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

    fn enter(&self) -> CallGuard {
        self.0.in_flight.fetch_add(1, Ordering::AcqRel);
        CallGuard(self.0.clone())
    }
}

/// Holds one call's place in the count until dropped.
struct CallGuard(Arc<Counter>);

impl Drop for CallGuard {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Wraps an HTTP service so each request is counted in [`Calls`].
#[derive(Clone)]
pub struct CountCallsLayer {
    calls: Calls,
}

impl CountCallsLayer {
    /// Counts into `calls`.
    pub fn new(calls: Calls) -> Self {
        CountCallsLayer { calls }
    }
}

impl<S> tower::Layer<S> for CountCallsLayer {
    type Service = CountCalls<S>;

    fn layer(&self, inner: S) -> CountCalls<S> {
        CountCalls {
            inner,
            calls: self.calls.clone(),
        }
    }
}

/// See [`CountCallsLayer`].
#[derive(Clone)]
pub struct CountCalls<S> {
    inner: S,
    calls: Calls,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for CountCalls<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
{
    type Response = http::Response<CountedBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        ResponseFuture {
            guard: Some(self.calls.enter()),
            inner: self.inner.call(request),
        }
    }
}

pin_project! {
    /// Moves the call's guard from the response future into the response body.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
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
        let response = ready!(this.inner.poll(cx))?;
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
    use std::convert::Infallible;
    use tower::{Layer, Service, ServiceExt};

    #[tokio::test]
    async fn a_call_counts_until_its_body_is_dropped() {
        let calls = Calls::default();
        let mut service = CountCallsLayer::new(calls.clone()).layer(tower::service_fn(
            |_: http::Request<()>| async { Ok::<_, Infallible>(http::Response::new("body")) },
        ));
        let response = service
            .ready()
            .await
            .unwrap()
            .call(http::Request::new(()))
            .await
            .unwrap();
        assert_eq!(calls.in_flight(), 1);

        let idle = calls.idle();
        let mut idle = std::pin::pin!(idle);
        assert!(futures_poll(&mut idle).is_pending());
        drop(response);
        assert_eq!(calls.in_flight(), 0);
        assert!(futures_poll(&mut idle).is_ready());
    }

    #[tokio::test]
    async fn idle_is_immediate_with_nothing_in_flight() {
        Calls::default().idle().await;
    }

    fn futures_poll<F: Future>(future: &mut Pin<&mut F>) -> Poll<F::Output> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        future.as_mut().poll(&mut cx)
    }
}
