//! Every call's deadline: the caller's `grpc-timeout` when it sends one, and never later than the
//! server's own limit, `transport.max_call_duration` (health `Watch` streams: `transport.max_stream_age`).
//!
//! The deadline is put in the request's extensions as a [`CallDeadline`], so the front doors give up a
//! moment before it and answer (and audit) as they answer any error. This layer is the backstop that holds
//! for every call, whatever serves it:
//! - a call with no response by its deadline is answered in its protocol's shape: gRPC
//!   DEADLINE_EXCEEDED, trailers only; the HTTP API IVS's `RequestTimeoutException` (HTTP 504), never a
//!   200. The handler is dropped, cancelling whatever it waited on.
//! - a streaming response (health `Watch`, reflection) still open at its deadline is ended with trailers:
//!   DEADLINE_EXCEEDED, or UNAVAILABLE when a `Watch` reached its maximum age (the client watches again).

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::Bytes;
use http::HeaderMap;
use http_body_util::{Either, Full};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use super::inflight::{CallKind, CallStarted};
use crate::domain::{Error, TimeLimit};
use crate::rescue::rescue;

/// A call's deadline, in its request's extensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallDeadline {
    /// When the call must have been answered.
    pub at: Instant,
    /// Whose deadline it is: `None` for the caller's own (`grpc-timeout`), else the server's limit.
    pub limit: Option<TimeLimit>,
}

impl CallDeadline {
    /// The error a call ended at this deadline answers with.
    pub fn error(&self) -> Error {
        match self.limit {
            None => Error::DeadlineExceeded,
            Some(limit) => Error::TimeLimit(limit),
        }
    }

    /// The deadline of a call of `kind` that reached the server at `started` with `headers`, within
    /// `limits`.
    pub fn of(kind: CallKind, headers: &HeaderMap, started: Instant, limits: Limits) -> Self {
        let limit = match kind {
            CallKind::HealthWatch => TimeLimit::StreamAge(limits.max_stream_age),
            _ => TimeLimit::CallDuration(limits.max_call_duration),
        };
        let server = match limit {
            TimeLimit::CallDuration(d) | TimeLimit::StreamAge(d) => d,
        };
        match grpc_timeout(headers) {
            Some(caller) if caller < server => CallDeadline {
                at: started + caller,
                limit: None,
            },
            _ => CallDeadline {
                at: started + server,
                limit: Some(limit),
            },
        }
    }
}

/// The caller's deadline from `grpc-timeout`: up to 8 digits and a unit (H, M, S, m, u, n), as the gRPC
/// HTTP/2 protocol defines it. Malformed values are ignored, as tonic ignores them.
pub fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// The server's time limits, from `[transport]`.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// `transport.max_call_duration`.
    pub max_call_duration: Duration,
    /// `transport.max_stream_age`.
    pub max_stream_age: Duration,
}

/// Gives every call its [`CallDeadline`] and holds it to it; see the module docs.
#[derive(Clone, Copy, Debug)]
pub struct DeadlineLayer {
    limits: Limits,
}

impl DeadlineLayer {
    /// Deadlines within `limits`.
    pub fn new(limits: Limits) -> Self {
        DeadlineLayer { limits }
    }
}

impl<S> tower::Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;

    fn layer(&self, inner: S) -> Deadline<S> {
        Deadline {
            inner,
            limits: self.limits,
        }
    }
}

/// See [`DeadlineLayer`].
#[derive(Clone, Debug)]
pub struct Deadline<S> {
    inner: S,
    limits: Limits,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for Deadline<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
{
    type Response = http::Response<DeadlineBody<ResBody>>;
    type Error = S::Error;
    type Future = DeadlineFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<ReqBody>) -> Self::Future {
        let kind = CallKind::of(&request);
        let started = request
            .extensions()
            .get::<CallStarted>()
            .map_or_else(Instant::now, |started| started.0);
        let deadline = CallDeadline::of(kind, request.headers(), started, self.limits);
        request.extensions_mut().insert(deadline);
        DeadlineFuture {
            inner: self.inner.call(request),
            sleep: tokio::time::sleep_until(deadline.at),
            deadline,
            kind,
        }
    }
}

pin_project! {
    /// The call's answer, or its protocol's timeout answer at the deadline.
    pub struct DeadlineFuture<F> {
        #[pin]
        inner: F,
        #[pin]
        sleep: Sleep,
        deadline: CallDeadline,
        kind: CallKind,
    }
}

impl<F, ResBody, E> Future for DeadlineFuture<F>
where
    F: Future<Output = Result<http::Response<ResBody>, E>>,
{
    type Output = Result<http::Response<DeadlineBody<ResBody>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(response) = this.inner.poll(cx) {
            let response = response?;
            let kind = *this.kind;
            let deadline = *this.deadline;
            // Only gRPC streams outlive their response head; an HTTP API body is whole by now.
            let grpc = kind != CallKind::Http;
            return Poll::Ready(Ok(response.map(|inner| DeadlineBody {
                inner: Either::Left(inner),
                sleep: grpc.then(|| tokio::time::sleep_until(deadline.at)),
                deadline,
                ended: false,
            })));
        }
        ready!(this.sleep.poll(cx));
        let error = this.deadline.error();
        tracing::info!(target: "audit", outcome = error.outcome(), "call ended at its deadline");
        let rescued = rescue(error);
        let response = if *this.kind == CallKind::Http {
            rescued
                .into_ivs()
                .to_http()
                .map(|body| Either::Right(Full::new(body)))
        } else {
            let (parts, ()) = rescued.into_status().into_http::<()>().into_parts();
            http::Response::from_parts(parts, Either::Right(Full::default()))
        };
        Poll::Ready(Ok(response.map(|inner| DeadlineBody {
            inner,
            sleep: None,
            deadline: *this.deadline,
            ended: false,
        })))
    }
}

pin_project! {
    /// A response body that ends with a gRPC status in its trailers if it is still open at the deadline.
    pub struct DeadlineBody<B> {
        #[pin]
        inner: Either<B, Full<Bytes>>,
        #[pin]
        sleep: Option<Sleep>,
        deadline: CallDeadline,
        ended: bool,
    }
}

impl<B> http_body::Body for DeadlineBody<B>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let mut this = self.project();
        if *this.ended {
            return Poll::Ready(None);
        }
        if let Poll::Ready(frame) = this.inner.poll_frame(cx) {
            return Poll::Ready(frame);
        }
        if let Some(sleep) = this.sleep.as_mut().as_pin_mut() {
            ready!(sleep.poll(cx));
            *this.ended = true;
            this.sleep.set(None);
            let status = rescue(this.deadline.error()).into_status();
            let mut trailers = HeaderMap::new();
            // A status made by the rescue table always fits in headers.
            let _ = status.add_header(&mut trailers);
            return Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(timeout: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("grpc-timeout", timeout.parse().unwrap());
        headers
    }

    #[test]
    fn grpc_timeout_reads_every_unit_and_ignores_what_is_malformed() {
        for (value, expected) in [
            ("1H", Duration::from_secs(3600)),
            ("2M", Duration::from_secs(120)),
            ("3S", Duration::from_secs(3)),
            ("300m", Duration::from_millis(300)),
            ("7u", Duration::from_micros(7)),
            ("99999999n", Duration::from_nanos(99_999_999)),
        ] {
            assert_eq!(grpc_timeout(&headers(value)), Some(expected), "{value}");
        }
        for value in ["", "S", "100", "123456789S", "1s", "-1S", "+1S", "1.5S"] {
            assert_eq!(grpc_timeout(&headers(value)), None, "{value:?}");
        }
    }

    #[test]
    fn the_deadline_is_the_callers_when_sooner_else_the_servers_limit() {
        let limits = Limits {
            max_call_duration: Duration::from_secs(30),
            max_stream_age: Duration::from_secs(600),
        };
        let now = Instant::now();
        let caller = CallDeadline::of(CallKind::Grpc, &headers("29S"), now, limits);
        assert_eq!(
            (caller.at, caller.limit),
            (now + Duration::from_secs(29), None)
        );
        let server = CallDeadline::of(CallKind::Grpc, &headers("30S"), now, limits);
        let limit = TimeLimit::CallDuration(Duration::from_secs(30));
        assert_eq!(
            (server.at, server.limit),
            (now + Duration::from_secs(30), Some(limit))
        );
        let none = CallDeadline::of(CallKind::Http, &HeaderMap::new(), now, limits);
        assert_eq!(none.limit, Some(limit));
        let watch = CallDeadline::of(CallKind::HealthWatch, &headers("1H"), now, limits);
        assert_eq!(
            (watch.at, watch.limit),
            (
                now + Duration::from_secs(600),
                Some(TimeLimit::StreamAge(Duration::from_secs(600)))
            )
        );
    }
}
