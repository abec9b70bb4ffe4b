//! Ends a streaming call with the status its request stream failed to decode with (reflection).
//!
//! tonic-reflection's `ServerReflectionInfo` ends its reply stream, with `grpc-status` 0, at the first
//! request it cannot decode (it drops the error): a message over the server's decoding bound
//! (OUT_OF_RANGE), a compressed message without an encoding or a malformed one (INTERNAL) was answered
//! "OK, nothing". The crate
//! hides its service behind the generated server, so [`ReportDecodeErrors`] wraps that server instead:
//! it decodes the request stream itself, under the same bound, and hands the inner service each message
//! it decoded, re-encoded, in order. At the first error the inner service's request stream ends (so it
//! answers everything before it, then ends its reply), and the reply's trailers carry that error instead
//! of OK. Nothing over the bound is buffered: tonic refuses a message from its length prefix.

use std::{
    convert::Infallible,
    future::Future,
    marker::PhantomData,
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll, ready},
};

use bytes::BytesMut;
use http::{HeaderMap, Request, Response, header::CONTENT_LENGTH};
use http_body::{Body as HttpBody, Frame};
use prost::Message;
use tokio_stream::Stream;
use tonic::{Status, Streaming, body::Body, codec::Codec, codegen::Bytes, server::NamedService};
use tower::Service;

/// The first decoding error of one call's request stream, shared by its request and response bodies.
type Failure = Arc<Mutex<Option<Status>>>;

/// A streaming gRPC service whose request messages (`M`) are decoded here first, so a message that cannot
/// be decoded ends the reply with that error rather than with whatever the inner service makes of it.
pub struct ReportDecodeErrors<S, M> {
    inner: S,
    max_message_bytes: usize,
    message: PhantomData<fn() -> M>,
}

impl<S, M> ReportDecodeErrors<S, M> {
    /// Wraps `inner`, refusing request messages over `max_message_bytes` (OUT_OF_RANGE).
    pub fn new(inner: S, max_message_bytes: usize) -> Self {
        ReportDecodeErrors {
            inner,
            max_message_bytes,
            message: PhantomData,
        }
    }
}

impl<S: Clone, M> Clone for ReportDecodeErrors<S, M> {
    fn clone(&self) -> Self {
        ReportDecodeErrors {
            inner: self.inner.clone(),
            max_message_bytes: self.max_message_bytes,
            message: PhantomData,
        }
    }
}

impl<S: NamedService, M> NamedService for ReportDecodeErrors<S, M> {
    const NAME: &'static str = S::NAME;
}

impl<S, M> Service<Request<Body>> for ReportDecodeErrors<S, M>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
    M: Message + Default + Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let (mut parts, body) = request.into_parts();
        // The body the inner service reads is re-encoded: its length is not the client's.
        parts.headers.remove(CONTENT_LENGTH);
        let failure = Failure::default();
        let decoded = Streaming::<M>::new_request(
            tonic_prost::ProstCodec::<M, M>::default().decoder(),
            body,
            None,
            Some(self.max_message_bytes),
        );
        let body = Body::new(Reencoded {
            decoded: Some(decoded),
            failure: failure.clone(),
        });
        let response = self.inner.call(Request::from_parts(parts, body));
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|body| {
                Body::new(Reported {
                    inner: body,
                    failure,
                })
            }))
        })
    }
}

/// The request body the inner service reads: the messages decoded so far, one gRPC frame each; it ends
/// at the first error, which it leaves in `failure`.
struct Reencoded<M> {
    /// `None` once ended.
    decoded: Option<Streaming<M>>,
    failure: Failure,
}

impl<M: Message> HttpBody for Reencoded<M> {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        let Some(decoded) = this.decoded.as_mut() else {
            return Poll::Ready(None);
        };
        match ready!(Pin::new(decoded).poll_next(cx)) {
            Some(Ok(message)) => {
                let len = message.encoded_len();
                let mut frame = BytesMut::with_capacity(5 + len);
                frame.extend_from_slice(&[0]);
                // Within the decoding bound, so within u32.
                frame.extend_from_slice(&(len as u32).to_be_bytes());
                message
                    .encode(&mut frame)
                    .expect("the buffer has room for the message");
                Poll::Ready(Some(Ok(Frame::data(frame.freeze()))))
            }
            Some(Err(status)) => {
                *this.failure.lock().unwrap_or_else(PoisonError::into_inner) = Some(status);
                this.decoded = None;
                Poll::Ready(None)
            }
            None => {
                this.decoded = None;
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.decoded.is_none()
    }
}

/// The inner service's reply, whose OK trailers become the request stream's error when it failed.
struct Reported {
    inner: Body,
    failure: Failure,
}

impl HttpBody for Reported {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        let Some(Ok(frame)) = frame else {
            return Poll::Ready(frame);
        };
        let frame = match frame.into_trailers() {
            Ok(trailers) => Frame::trailers(self.report(trailers)),
            Err(frame) => frame,
        };
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Reported {
    /// The trailers to send: the request stream's error in place of an OK status; any other unchanged
    /// (the inner service's own refusal stands).
    fn report(&self, trailers: HeaderMap) -> HeaderMap {
        let ok = trailers
            .get("grpc-status")
            .is_none_or(|status| status == "0");
        let failure = self
            .failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        match failure {
            Some(status) if ok => {
                let mut reported = HeaderMap::new();
                if status.add_header(&mut reported).is_err() {
                    // Only a message that cannot be a header value; the code alone then.
                    reported = HeaderMap::new();
                    reported.insert("grpc-status", (status.code() as i32).into());
                }
                reported
            }
            _ => trailers,
        }
    }
}
