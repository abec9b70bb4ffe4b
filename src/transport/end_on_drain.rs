//! Ends long-lived response streams (health `Watch`) when the server starts draining.
//!
//! A `Watch` never ends by itself, and tonic's graceful shutdown waits for every stream of a connection,
//! so one open watcher would hold the process for the whole grace period. [`EndOnDrain`] wraps a
//! service so each response body, once the drain starts and the body has nothing more ready (the
//! NOT_SERVING update written just before is still delivered), ends with `grpc-status` UNAVAILABLE:
//! the client learns to reconnect elsewhere.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll, ready},
};

use http::{HeaderMap, HeaderValue, Request, Response};
use http_body::{Body as HttpBody, Frame};
use tokio::sync::watch;
use tonic::{body::Body, codegen::Bytes, server::NamedService};
use tower::Service;

/// A service whose response bodies end with UNAVAILABLE once `draining` turns `true`.
#[derive(Clone)]
pub struct EndOnDrain<S> {
    inner: S,
    draining: watch::Receiver<bool>,
}

impl<S> EndOnDrain<S> {
    pub fn new(inner: S, draining: watch::Receiver<bool>) -> Self {
        EndOnDrain { inner, draining }
    }
}

impl<S: NamedService> NamedService for EndOnDrain<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<Request<B>> for EndOnDrain<S>
where
    S: Service<Request<B>, Response = Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let response = self.inner.call(request);
        let draining = self.draining.clone();
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|body| {
                Body::new(EndOnDrainBody {
                    inner: body,
                    drain: Some(Box::pin(drain_started(draining))),
                })
            }))
        })
    }
}

async fn drain_started(mut draining: watch::Receiver<bool>) {
    // A dropped sender means the server is gone: end too.
    let _ = draining.wait_for(|draining| *draining).await;
}

struct EndOnDrainBody {
    inner: Body,
    /// `None` once the UNAVAILABLE trailers have been sent.
    drain: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl HttpBody for EndOnDrainBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let Some(drain) = this.drain.as_mut() else {
            return Poll::Ready(None);
        };
        // The inner body first, so what it has ready (the NOT_SERVING update) still goes out.
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            if frame.is_none() {
                this.drain = None;
            }
            return Poll::Ready(frame);
        }
        ready!(drain.as_mut().poll(cx));
        this.drain = None;
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("14"));
        trailers.insert(
            "grpc-message",
            HeaderValue::from_static("the server is shutting down"),
        );
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.drain.is_none() || self.inner.is_end_stream()
    }
}
