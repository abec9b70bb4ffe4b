//! The server span and duration metric of each RPC, at the HTTP level, in front of everything.
//!
//! The span follows the OpenTelemetry RPC conventions: named `package.Service/Method`, kind server,
//! attributes `rpc.system = "grpc"`, `rpc.service`, `rpc.method`, `rpc.grpc.status_code`, error status when
//! the code is not OK. Its parent is the caller's span from W3C `traceparent`/`tracestate`, and its
//! `trace_id` field puts the trace id on every log line written during the call.
//!
//! A gRPC status arrives either in the response headers (trailers-only responses: errors) or in the
//! trailers after the body, so the span and the measurement end when the body does. Health checks and
//! reflection are not traced: probes every few seconds would bury the calls that matter.
//!
//! Calls to the IVS Chat HTTP API ([`crate::rest`], paths with one segment such as `/CreateChatToken`)
//! get the same span and metric with `rpc.system = "aws-api"`, `rpc.service = "ivschat"`, and
//! `http.response.status_code` instead of the gRPC code; they end when the response headers are sent.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll, ready},
    time::Instant,
};

use opentelemetry::{KeyValue, global, propagation::Extractor, trace::TraceContextExt};
use pin_project_lite::pin_project;
use tracing::{Instrument, Span, field::Empty, instrument::Instrumented};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::metrics::metrics;

/// The paths of the operations this server offers (health and reflection aside: they are not traced).
const SERVED_OPERATIONS: &[&str] = &[
    "/ivschat.v1.TokenService/CreateChatToken",
    "/ivschat.v1.ModerationService/DisconnectUser",
    "/ivschat.v1.ModerationService/BanUser",
    "/ivschat.v1.ModerationService/UnbanUser",
    "/ivschat.v1.ModerationService/ListBans",
    "/ivschat.v1.ModerationService/VerifyChatToken",
    crate::rest::CREATE_CHAT_TOKEN,
    crate::rest::DISCONNECT_USER,
];

/// Paths not traced: health checks and reflection.
const UNTRACED_PREFIXES: [&str; 3] = [
    "/grpc.health.v1.",
    "/grpc.reflection.v1.",
    "/grpc.reflection.v1alpha.",
];

/// gRPC's CANCELLED, recorded when the body is dropped before its trailers: the client went away.
const CANCELLED: i64 = 1;

/// Traces and measures every RPC of the service it wraps.
#[derive(Clone, Copy, Debug, Default)]
pub struct RpcTraceLayer;

impl<S> tower::Layer<S> for RpcTraceLayer {
    type Service = RpcTrace<S>;

    fn layer(&self, inner: S) -> RpcTrace<S> {
        RpcTrace { inner }
    }
}

/// See [`RpcTraceLayer`].
#[derive(Clone, Debug)]
pub struct RpcTrace<S> {
    inner: S,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for RpcTrace<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
{
    type Response = http::Response<TracedBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let path = request.uri().path();
        if UNTRACED_PREFIXES.iter().any(|p| path.starts_with(p)) {
            return ResponseFuture {
                inner: self.inner.call(request).instrument(Span::none()),
                call: None,
            };
        }
        let call = Call::start(&request);
        let span = call.span.clone();
        ResponseFuture {
            inner: self.inner.call(request).instrument(span),
            call: Some(call),
        }
    }
}

/// One traced call: its span, start and attributes.
struct Call {
    span: Span,
    started: Instant,
    system: &'static str,
    service: String,
    method: String,
}

impl Call {
    fn start<B>(request: &http::Request<B>) -> Call {
        let path = request.uri().path();
        // Any path can arrive, but only the operations served name spans and label metrics: the others
        // are "unknown", so callers cannot grow the metrics' label sets.
        let served = SERVED_OPERATIONS.contains(&path);
        let name = |part: &str| {
            if served {
                part.to_owned()
            } else {
                "unknown".to_owned()
            }
        };
        let path = path.trim_start_matches('/');
        let (system, service, method) = match path.split_once('/') {
            Some((service, method)) => ("grpc", name(service), name(method)),
            None => ("aws-api", crate::rest::SERVICE.to_owned(), name(path)),
        };
        let span = tracing::info_span!(
            "grpc.server",
            otel.name = %format_args!("{service}/{method}"),
            otel.kind = "server",
            rpc.system = system,
            rpc.service = %service,
            rpc.method = %method,
            rpc.grpc.status_code = Empty,
            http.response.status_code = Empty,
            otel.status_code = Empty,
            trace_id = Empty,
        );
        let parent = global::get_text_map_propagator(|propagator| {
            propagator.extract(&HeaderExtractor(request.headers()))
        });
        // Fails only when no OpenTelemetry layer is installed (library use without telemetry::init).
        let _ = span.set_parent(parent);
        let trace_id = span.context().span().span_context().trace_id();
        if trace_id != opentelemetry::trace::TraceId::INVALID {
            span.record("trace_id", tracing::field::display(trace_id));
        }
        Call {
            span,
            started: Instant::now(),
            system,
            service,
            method,
        }
    }

    fn finish(self, code: i64) {
        self.span.record("rpc.grpc.status_code", code);
        if code != 0 {
            self.span.record("otel.status_code", "ERROR");
        }
        self.record(KeyValue::new("rpc.grpc.status_code", code));
    }

    /// Ends an HTTP API call with its response's `status`; server errors mark the span as failed.
    fn finish_http(self, status: http::StatusCode) {
        let status = i64::from(status.as_u16());
        self.span.record("http.response.status_code", status);
        if status >= 500 {
            self.span.record("otel.status_code", "ERROR");
        }
        self.record(KeyValue::new("http.response.status_code", status));
    }

    fn record(self, outcome: KeyValue) {
        metrics().rpc_duration.record(
            self.started.elapsed().as_secs_f64(),
            &[
                KeyValue::new("rpc.system", self.system),
                KeyValue::new("rpc.service", self.service),
                KeyValue::new("rpc.method", self.method),
                outcome,
            ],
        );
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

fn grpc_status(headers: &http::HeaderMap) -> Option<i64> {
    headers.get("grpc-status")?.to_str().ok()?.parse().ok()
}

pin_project! {
    /// The inner future, run inside the call's span; hands the call over to the response body.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: Instrumented<F>,
        call: Option<Call>,
    }
}

impl<F, ResBody, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<http::Response<ResBody>, E>>,
{
    type Output = Result<http::Response<TracedBody<ResBody>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = ready!(this.inner.poll(cx))?;
        let mut call = this.call.take();
        if let Some(code) = grpc_status(response.headers())
            && let Some(call) = call.take()
        {
            call.finish(code);
        }
        if let Some(rest) = call.take_if(|call| call.system != "grpc") {
            rest.finish_http(response.status());
        }
        Poll::Ready(Ok(response.map(|inner| TracedBody { inner, call })))
    }
}

pin_project! {
    /// A response body that ends its call's span when the trailers carry the status.
    pub struct TracedBody<B> {
        #[pin]
        inner: B,
        call: Option<Call>,
    }

    impl<B> PinnedDrop for TracedBody<B> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(call) = this.project().call.take() {
                call.finish(CANCELLED);
            }
        }
    }
}

impl<B: http_body::Body> http_body::Body for TracedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        if let Some(Ok(frame)) = &frame
            && let Some(trailers) = frame.trailers_ref()
            && let Some(code) = grpc_status(trailers)
            && let Some(call) = this.call.take()
        {
            call.finish(code);
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

#[cfg(test)]
mod tests {
    use super::Call;

    fn labels(path: &str) -> (&'static str, String, String) {
        let call = Call::start(&http::Request::post(path).body(()).unwrap());
        (call.system, call.service, call.method)
    }

    #[test]
    fn only_served_operations_name_their_labels() {
        let owned =
            |system, service: &str, method: &str| (system, service.to_owned(), method.to_owned());
        assert_eq!(
            labels("/ivschat.v1.TokenService/CreateChatToken"),
            owned("grpc", "ivschat.v1.TokenService", "CreateChatToken")
        );
        assert_eq!(
            labels("/DisconnectUser"),
            owned("aws-api", "ivschat", "DisconnectUser")
        );
        // Made-up paths, which a caller can send without end, all fall under one label value.
        assert_eq!(
            labels("/ivschat.v1.TokenService/Made-up-1"),
            owned("grpc", "unknown", "unknown")
        );
        assert_eq!(labels("/made-up-2"), owned("aws-api", "ivschat", "unknown"));
    }
}
