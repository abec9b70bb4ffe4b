//! The server span and duration metric of each RPC, at the HTTP level, in front of everything.
//!
//! The span follows the OpenTelemetry RPC conventions: named `package.Service/Method`, kind server,
//! attributes `rpc.system = "grpc"`, `rpc.service`, `rpc.method`, `rpc.grpc.status_code`, error status when
//! the code is not OK. Its parent is the caller's span from W3C `traceparent`/`tracestate`, and its
//! `trace_id` field puts the trace id on every log line written during the call. Without a trace exporter
//! there is no OpenTelemetry layer and no span data: the trace id is then the caller's (`traceparent`) or a
//! fresh random one. Handlers find it in the request's extensions as [`CallTraceId`].
//!
//! A gRPC status arrives either in the response headers (trailers-only responses: errors) or in the
//! trailers after the body, so the span and the measurement end when the body does. Health checks and
//! reflection are not traced: probes every few seconds would bury the calls that matter.
//!
//! Calls to the IVS Chat HTTP API (paths with one segment such as `/CreateChatToken`)
//! get the same span and metric with `rpc.system = "aws-api"`, `rpc.service = "ivschat"`, and
//! `http.response.status_code` instead of the gRPC code; they end when the response headers are sent.

use std::{
    future::Future,
    pin::Pin,
    sync::LazyLock,
    task::{Context, Poll, ready},
    time::Instant,
};

use opentelemetry::{
    KeyValue, global,
    propagation::Extractor,
    trace::{TraceContextExt, TraceId},
};
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator};
use pin_project_lite::pin_project;
use tracing::{Instrument, Span, field::Empty, instrument::Instrumented};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::domain::{Action, IVS_SIGNING_NAME};
use crate::proto::ivschat::v1::{
    messaging_service_server, moderation_service_server, token_service_server,
};
use crate::telemetry::{exporting_traces, metrics::metrics};

/// The operations this server offers (health and reflection aside: they are not traced), as their spans
/// and metrics name them: each action at its gRPC path, and those of IVS Chat's API at their REST path too.
/// Made once; the names live as long as the process.
static SERVED_OPERATIONS: LazyLock<Vec<Labels>> = LazyLock::new(|| {
    let leak = |name: String| -> &'static str { Box::leak(name.into_boxed_str()) };
    Action::ALL
        .into_iter()
        .flat_map(|action| {
            let service = grpc_service(action);
            let method = action.as_str();
            let grpc = grpc(service, method, leak(format!("{service}/{method}")));
            let rest = action
                .in_ivs_api()
                .then(|| aws_api(method, leak(format!("{IVS_SIGNING_NAME}/{method}"))));
            [Some(grpc), rest]
        })
        .flatten()
        .collect()
});

/// The gRPC service that serves `action`.
fn grpc_service(action: Action) -> &'static str {
    match action {
        Action::CreateChatToken => token_service_server::SERVICE_NAME,
        Action::DisconnectUser
        | Action::BanUser
        | Action::UnbanUser
        | Action::ListBans
        | Action::VerifyChatToken => moderation_service_server::SERVICE_NAME,
        Action::SendEvent | Action::DeleteMessage => messaging_service_server::SERVICE_NAME,
    }
}

/// What any other path is called: callers can send paths without end, but not grow the label sets.
const UNKNOWN_GRPC: Labels = grpc("unknown", "unknown", "unknown/unknown");
const UNKNOWN_AWS_API: Labels = aws_api("unknown", "ivschat/unknown");

/// A call's `rpc.system`, `rpc.service` and `rpc.method`, and its span's name (`otel.name`): static, so
/// no call allocates them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Labels {
    system: &'static str,
    service: &'static str,
    method: &'static str,
    name: &'static str,
}

/// A gRPC method, served at `/{name}`; `name` is `service/method`.
const fn grpc(service: &'static str, method: &'static str, name: &'static str) -> Labels {
    Labels {
        system: "grpc",
        service,
        method,
        name,
    }
}

/// An operation of the IVS Chat HTTP API, served at `/{method}`; `name` is `ivschat/method`.
const fn aws_api(method: &'static str, name: &'static str) -> Labels {
    Labels {
        system: "aws-api",
        service: IVS_SIGNING_NAME,
        method,
        name,
    }
}

impl Labels {
    /// The path this operation is served at, without its leading `/`.
    fn path(&self) -> &'static str {
        if self.system == "grpc" {
            self.name
        } else {
            self.method
        }
    }
}

/// The labels of a call to `path`: its operation's, or "unknown" when this server does not serve it.
fn labels(path: &str) -> Labels {
    let path = path.strip_prefix('/').unwrap_or(path);
    match SERVED_OPERATIONS.iter().find(|op| op.path() == path) {
        Some(served) => *served,
        None if path.contains('/') => UNKNOWN_GRPC,
        None => UNKNOWN_AWS_API,
    }
}

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

    fn call(&mut self, mut request: http::Request<ReqBody>) -> Self::Future {
        let path = request.uri().path();
        if UNTRACED_PREFIXES.iter().any(|p| path.starts_with(p)) {
            return ResponseFuture {
                inner: self.inner.call(request).instrument(Span::none()),
                call: None,
            };
        }
        let (call, trace_id) = Call::start(&request);
        request.extensions_mut().insert(CallTraceId(trace_id));
        let span = call.span.clone();
        ResponseFuture {
            inner: self.inner.call(request).instrument(span),
            call: Some(call),
        }
    }
}

/// The trace id of a call, in its request's extensions: the id its log lines carry (`trace_id`), for
/// handlers that hand it back to the caller (the IVS API's `x-amzn-RequestId`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallTraceId(pub TraceId);

/// One traced call: its span, start and attributes.
struct Call {
    span: Span,
    started: Instant,
    labels: Labels,
}

impl Call {
    fn start<B>(request: &http::Request<B>) -> (Call, TraceId) {
        let labels = labels(request.uri().path());
        let (span, trace_id) = if exporting_traces() {
            let span = tracing::info_span!(
                "grpc.server",
                otel.name = labels.name,
                otel.kind = "server",
                rpc.system = labels.system,
                rpc.service = labels.service,
                rpc.method = labels.method,
                rpc.grpc.status_code = Empty,
                http.response.status_code = Empty,
                otel.status_code = Empty,
                trace_id = Empty,
            );
            // The OpenTelemetry layer gives the span its context: the caller's trace, or a new one.
            let _ = span.set_parent(callers_context(request.headers()));
            let trace_id = span.context().span().span_context().trace_id();
            if trace_id != TraceId::INVALID {
                span.record("trace_id", tracing::field::display(trace_id));
            }
            (span, trace_id)
        } else {
            // No layer, no span data: only the id the logs carry, the caller's or a fresh one.
            let trace_id = Some(request.headers())
                .filter(|headers| headers.contains_key(TRACEPARENT))
                .map(|headers| callers_context(headers).span().span_context().trace_id())
                .filter(|id| *id != TraceId::INVALID)
                .unwrap_or_else(|| RandomIdGenerator::default().new_trace_id());
            // Only the log lines read this span: what a reader needs, not the OpenTelemetry attributes
            // (each field is formatted into every call's context, and the status fields recorded at the
            // end of a call would be formatted for no line at all). The trace id is known already, so it
            // is formatted with the rest rather than recorded afterwards.
            let span = tracing::info_span!(
                "grpc.server",
                rpc.service = labels.service,
                rpc.method = labels.method,
                trace_id = %trace_id,
            );
            (span, trace_id)
        };
        let call = Call {
            span,
            started: Instant::now(),
            labels,
        };
        (call, trace_id)
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
                KeyValue::new("rpc.system", self.labels.system),
                KeyValue::new("rpc.service", self.labels.service),
                KeyValue::new("rpc.method", self.labels.method),
                outcome,
            ],
        );
    }
}

/// The W3C trace-context header.
const TRACEPARENT: &str = "traceparent";

/// The caller's span from `traceparent`/`tracestate`, as the installed propagator reads them.
fn callers_context(headers: &http::HeaderMap) -> opentelemetry::Context {
    global::get_text_map_propagator(|propagator| propagator.extract(&HeaderExtractor(headers)))
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
        if let Some(rest) = call.take_if(|call| call.labels.system != "grpc") {
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
    use super::labels;

    fn of(path: &str) -> (&'static str, &'static str, &'static str, &'static str) {
        let labels = labels(path);
        (labels.system, labels.service, labels.method, labels.name)
    }

    #[test]
    fn only_served_operations_name_their_labels() {
        assert_eq!(
            of("/ivschat.v1.TokenService/CreateChatToken"),
            (
                "grpc",
                "ivschat.v1.TokenService",
                "CreateChatToken",
                "ivschat.v1.TokenService/CreateChatToken"
            )
        );
        assert_eq!(
            of("/DisconnectUser"),
            (
                "aws-api",
                "ivschat",
                "DisconnectUser",
                "ivschat/DisconnectUser"
            )
        );
        // Made-up paths, which a caller can send without end, all fall under one label value.
        assert_eq!(
            of("/ivschat.v1.TokenService/Made-up-1"),
            ("grpc", "unknown", "unknown", "unknown/unknown")
        );
        assert_eq!(
            of("/made-up-2"),
            ("aws-api", "ivschat", "unknown", "ivschat/unknown")
        );
    }

    #[test]
    fn every_served_operation_is_named_service_slash_method() {
        for op in super::SERVED_OPERATIONS
            .iter()
            .chain([&super::UNKNOWN_GRPC, &super::UNKNOWN_AWS_API])
        {
            assert_eq!(op.name, format!("{}/{}", op.service, op.method));
        }
        for action in crate::domain::Action::ALL {
            let rest = labels(&format!("/{action}"));
            assert_eq!(
                rest.method,
                if action.in_ivs_api() {
                    action.as_str()
                } else {
                    "unknown"
                },
                "{action}"
            );
            assert_eq!(
                labels(&format!("/{}/{action}", super::grpc_service(action))).method,
                action.as_str()
            );
        }
    }
}
