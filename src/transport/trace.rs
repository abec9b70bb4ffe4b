//! The server span and duration metric of each call, at the HTTP level, in front of everything.
//!
//! gRPC calls follow the OpenTelemetry RPC semantic conventions for gRPC servers (semantic-conventions
//! v1.44, docs/rpc/grpc.md "Server" and docs/rpc/rpc-metrics.md `rpc.server.call.duration`): the span is
//! named by `rpc.method`, the fully qualified `package.Service/Method` (`_OTHER` for a method this server
//! does not serve, whose span is named `grpc`, with `rpc.method_original`); attributes `rpc.system.name =
//! "grpc"`, `rpc.method`, `rpc.status_code` (the status code's name, e.g. `OK`, `PERMISSION_DENIED`) and,
//! for the codes the conventions count as the server's failure (UNKNOWN, DEADLINE_EXCEEDED,
//! UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS), `error.type` (the code's name) and an error span
//! status. A refusal the caller caused (INVALID_ARGUMENT, PERMISSION_DENIED, RESOURCE_EXHAUSTED, …) is
//! not a server error: it neither marks the span nor counts as an error.
//!
//! Calls to the IVS Chat HTTP API follow the HTTP server conventions instead (docs/http/http-spans.md and
//! http-metrics.md `http.server.request.duration`): span `POST /CreateChatToken` (the method alone for
//! a path the API does not serve), attributes `http.request.method` (`_OTHER` for unknown methods, with
//! `http.request.method_original`), `http.route`, `url.scheme`, `url.path`, `network.protocol.version`,
//! `http.response.status_code`, and `error.type` with an error status for 5xx only. They end when the
//! response headers are sent.
//!
//! The span's parent is the caller's span from W3C `traceparent`/`tracestate`; its `trace_id` field
//! (and, when spans are exported, `span_id`) puts the ids on every log line written during the call, as
//! flat fields of JSON lines too (`telemetry::tag_call`). Without a trace exporter there is no
//! OpenTelemetry layer and no span data: the trace id is then the caller's (`traceparent`) or a fresh
//! random one. Handlers find it in the request's extensions as [`CallTraceId`].
//!
//! A gRPC status arrives either in the response headers (trailers-only responses: errors) or in the
//! trailers after the body, so the span and the measurement end when the body does. Health checks and
//! reflection are not traced: probes every few seconds would bury the calls that matter.
//!
//! Attribute values are bounded: methods and routes come from the services served (anything else is
//! `_OTHER` or no route), codes from gRPC's and HTTP's; what a caller sent for an unknown method or path
//! is kept on its span only, cut to [`MAX_ORIGINAL_BYTES`].

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
    trace::{SpanId, TraceContextExt, TraceId},
};
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator};
use pin_project_lite::pin_project;
use tracing::{Instrument, Span, field::Empty, instrument::Instrumented};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::domain::Action;
use crate::proto::ivschat::v1::{
    messaging_service_server, moderation_service_server, token_service_server,
};
use crate::telemetry::{exporting_traces, metrics::metrics, tag_call};

/// The gRPC methods this server serves (health and reflection aside: they are not traced), fully
/// qualified as `rpc.method` names them. Made once; the names live as long as the process.
static GRPC_METHODS: LazyLock<Vec<&'static str>> = LazyLock::new(|| {
    Action::ALL
        .into_iter()
        .map(|action| leak(format!("{}/{action}", grpc_service(action))))
        .collect()
});

/// The routes of IVS Chat's HTTP API this server serves, as `http.route` names them.
static HTTP_ROUTES: LazyLock<Vec<&'static str>> = LazyLock::new(|| {
    Action::ALL
        .into_iter()
        .filter(|action| action.in_ivs_api())
        .map(|action| leak(format!("/{action}")))
        .collect()
});

fn leak(name: String) -> &'static str {
    Box::leak(name.into_boxed_str())
}

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

/// `rpc.method` and `http.request.method` of what this server does not know: callers can send methods
/// and paths without end, but not grow the label sets.
const OTHER: &str = "_OTHER";

/// The longest `rpc.method_original`, `http.request.method_original` or unknown `url.path` a span keeps.
pub const MAX_ORIGINAL_BYTES: usize = 128;

/// What a call is, as its span and measurement name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Operation {
    /// A gRPC call: `rpc.method`, fully qualified, or [`OTHER`].
    Grpc { method: &'static str },
    /// An HTTP API call: its `http.route`, or `None` for a path the API does not serve.
    Http { route: Option<&'static str> },
}

/// The operation of a request for `path`: a served gRPC method or HTTP route by its path; otherwise
/// gRPC when the content type says so (an unknown method), else HTTP (an unknown path).
fn operation(path: &str, headers: &http::HeaderMap) -> Operation {
    let method = path.strip_prefix('/').unwrap_or(path);
    if let Some(method) = GRPC_METHODS.iter().find(|known| **known == method) {
        return Operation::Grpc { method };
    }
    if let Some(route) = HTTP_ROUTES.iter().find(|known| **known == path) {
        return Operation::Http { route: Some(route) };
    }
    let grpc = headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if grpc {
        Operation::Grpc { method: OTHER }
    } else {
        Operation::Http { route: None }
    }
}

/// Whether a request is a gRPC call to a method this server does not serve (health and reflection
/// aside, which their own services answer).
pub(super) fn is_unknown_grpc_method(path: &str, headers: &http::HeaderMap) -> bool {
    !UNTRACED_PREFIXES
        .iter()
        .any(|prefix| path.starts_with(prefix))
        && operation(path, headers) == (Operation::Grpc { method: OTHER })
}

/// `http.request.method`: the method's name when it is one of RFC 9110's, PATCH or QUERY, else
/// [`OTHER`] (semantic conventions: "known" methods).
fn known_method(method: &http::Method) -> &'static str {
    use http::Method as M;
    const KNOWN: [(M, &str); 9] = [
        (M::GET, "GET"),
        (M::HEAD, "HEAD"),
        (M::POST, "POST"),
        (M::PUT, "PUT"),
        (M::DELETE, "DELETE"),
        (M::CONNECT, "CONNECT"),
        (M::OPTIONS, "OPTIONS"),
        (M::TRACE, "TRACE"),
        (M::PATCH, "PATCH"),
    ];
    match KNOWN.iter().find(|(known, _)| known == method) {
        Some((_, name)) => name,
        None if method.as_str() == "QUERY" => "QUERY",
        None => OTHER,
    }
}

/// `network.protocol.version` of a request.
fn protocol_version(version: http::Version) -> &'static str {
    match version {
        http::Version::HTTP_09 => "0.9",
        http::Version::HTTP_10 => "1.0",
        http::Version::HTTP_2 => "2",
        http::Version::HTTP_3 => "3",
        _ => "1.1",
    }
}

/// The names of gRPC's status codes, by number: `rpc.status_code`.
const GRPC_CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// The name of gRPC status `code`; a number outside gRPC's is UNKNOWN, as gRPC reads it.
fn grpc_code_name(code: i64) -> &'static str {
    usize::try_from(code)
        .ok()
        .and_then(|code| GRPC_CODES.get(code))
        .copied()
        .unwrap_or("UNKNOWN")
}

/// Whether a gRPC server that answered `code` failed, as the conventions count it (docs/rpc/grpc.md,
/// server span, note on `rpc.status_code`): the server's faults, not the caller's refusals.
fn is_server_error(code: &str) -> bool {
    matches!(
        code,
        "UNKNOWN"
            | "DEADLINE_EXCEEDED"
            | "UNIMPLEMENTED"
            | "INTERNAL"
            | "UNAVAILABLE"
            | "DATA_LOSS"
    )
}

/// Paths not traced: health checks and reflection.
const UNTRACED_PREFIXES: [&str; 3] = [
    "/grpc.health.v1.",
    "/grpc.reflection.v1.",
    "/grpc.reflection.v1alpha.",
];

/// gRPC's CANCELLED, recorded when the body is dropped before its trailers: the client went away.
const CANCELLED: i64 = 1;

/// Traces and measures every call of the service it wraps.
#[derive(Clone, Copy, Debug)]
pub struct RpcTraceLayer {
    /// `url.scheme` of HTTP API calls: `https` when the listener terminates TLS.
    scheme: &'static str,
}

impl RpcTraceLayer {
    /// Traces the calls of a listener with TLS (`tls`) or without.
    pub fn new(tls: bool) -> Self {
        RpcTraceLayer {
            scheme: if tls { "https" } else { "http" },
        }
    }
}

impl<S> tower::Layer<S> for RpcTraceLayer {
    type Service = RpcTrace<S>;

    fn layer(&self, inner: S) -> RpcTrace<S> {
        RpcTrace {
            inner,
            scheme: self.scheme,
        }
    }
}

/// See [`RpcTraceLayer`].
#[derive(Clone, Debug)]
pub struct RpcTrace<S> {
    inner: S,
    scheme: &'static str,
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
        let (call, trace_id) = Call::start(&request, self.scheme);
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

/// One traced call: its span, start and what its measurement is labelled with.
struct Call {
    span: Span,
    started: Instant,
    kind: Kind,
}

/// What a call's measurement needs besides its outcome.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Grpc {
        method: &'static str,
    },
    Http {
        method: &'static str,
        route: Option<&'static str>,
        scheme: &'static str,
        version: &'static str,
    },
}

impl Call {
    fn start<B>(request: &http::Request<B>, scheme: &'static str) -> (Call, TraceId) {
        let path = request.uri().path();
        let kind = match operation(path, request.headers()) {
            Operation::Grpc { method } => Kind::Grpc { method },
            Operation::Http { route } => Kind::Http {
                method: known_method(request.method()),
                route,
                scheme,
                version: protocol_version(request.version()),
            },
        };
        let (span, trace_id) = if exporting_traces() {
            let span = exported_span(kind, request);
            // The OpenTelemetry layer gives the span its context: the caller's trace, or a new one.
            let _ = span.set_parent(callers_context(request.headers()));
            let context = span.context();
            let otel_span = context.span();
            let span_context = otel_span.span_context();
            let (trace_id, span_id) = (span_context.trace_id(), span_context.span_id());
            if trace_id != TraceId::INVALID {
                span.record("trace_id", tracing::field::display(trace_id));
                span.record("span_id", tracing::field::display(span_id));
                tag_call(
                    &span,
                    trace_id,
                    Some(span_id).filter(|id| *id != SpanId::INVALID),
                );
            }
            (span, trace_id)
        } else {
            // No layer, no span data: only the id the logs carry, the caller's or a fresh one.
            let trace_id = Some(request.headers())
                .filter(|headers| headers.contains_key(TRACEPARENT))
                .map(|headers| callers_context(headers).span().span_context().trace_id())
                .filter(|id| *id != TraceId::INVALID)
                .unwrap_or_else(|| RandomIdGenerator::default().new_trace_id());
            let span = logged_span(kind, trace_id);
            tag_call(&span, trace_id, None);
            (span, trace_id)
        };
        let call = Call {
            span,
            started: Instant::now(),
            kind,
        };
        (call, trace_id)
    }

    /// Ends a gRPC call with status `code`.
    fn finish(self, code: i64) {
        let status = grpc_code_name(code);
        let error = is_server_error(status).then_some(status);
        self.span.record("rpc.status_code", status);
        if let Some(error) = error {
            self.span.record("error.type", error);
            self.span.record("otel.status_code", "ERROR");
        }
        let Kind::Grpc { method } = self.kind else {
            debug_assert!(false, "only gRPC calls end with a gRPC status");
            return;
        };
        // On the stack, the error type last and left out when there is none: no allocation per call.
        let attributes = [
            KeyValue::new("rpc.system.name", "grpc"),
            KeyValue::new("rpc.method", method),
            KeyValue::new("rpc.status_code", status),
            KeyValue::new("error.type", error.unwrap_or_default()),
        ];
        let attributes = &attributes[..if error.is_some() { 4 } else { 3 }];
        metrics()
            .rpc_server_duration
            .record(self.started.elapsed().as_secs_f64(), attributes);
    }

    /// Ends an HTTP API call with its response's `status`; server errors (5xx) mark the span as failed.
    fn finish_http(self, status: http::StatusCode) {
        let Kind::Http {
            method,
            route,
            scheme,
            version,
        } = self.kind
        else {
            debug_assert!(false, "only HTTP API calls end with an HTTP status");
            return;
        };
        let code = i64::from(status.as_u16());
        let error = status.is_server_error().then(|| status.as_str().to_owned());
        self.span.record("http.response.status_code", code);
        if let Some(error) = &error {
            self.span.record("error.type", error.as_str());
            self.span.record("otel.status_code", "ERROR");
        }
        // On the stack, as for gRPC: the route and the error type follow when there are any.
        let mut attributes = [
            KeyValue::new("http.request.method", method),
            KeyValue::new("url.scheme", scheme),
            KeyValue::new("network.protocol.version", version),
            KeyValue::new("http.response.status_code", code),
            KeyValue::new("http.route", ""),
            KeyValue::new("error.type", ""),
        ];
        let mut len = 4;
        if let Some(route) = route {
            attributes[len] = KeyValue::new("http.route", route);
            len += 1;
        }
        if let Some(error) = error {
            attributes[len] = KeyValue::new("error.type", error);
            len += 1;
        }
        metrics()
            .http_server_duration
            .record(self.started.elapsed().as_secs_f64(), &attributes[..len]);
    }

    fn is_grpc(&self) -> bool {
        matches!(self.kind, Kind::Grpc { .. })
    }
}

/// The span of a call whose spans are exported: every attribute the conventions ask for.
fn exported_span<B>(kind: Kind, request: &http::Request<B>) -> Span {
    let path = request.uri().path();
    match kind {
        Kind::Grpc { method } => {
            let span = tracing::info_span!(
                "grpc.server",
                otel.name = if method == OTHER { "grpc" } else { method },
                otel.kind = "server",
                rpc.system.name = "grpc",
                rpc.method = method,
                rpc.method_original = Empty,
                rpc.status_code = Empty,
                "error.type" = Empty,
                otel.status_code = Empty,
                trace_id = Empty,
                span_id = Empty,
            );
            if method == OTHER {
                let original = path.strip_prefix('/').unwrap_or(path);
                span.record("rpc.method_original", bounded(original));
            }
            span
        }
        Kind::Http {
            method,
            route,
            scheme,
            version,
        } => {
            let name = match (method, route) {
                (OTHER, Some(route)) => format!("HTTP {route}"),
                (OTHER, None) => "HTTP".to_owned(),
                (method, Some(route)) => format!("{method} {route}"),
                (method, None) => method.to_owned(),
            };
            let span = tracing::info_span!(
                "http.server",
                otel.name = name,
                otel.kind = "server",
                http.request.method = method,
                http.request.method_original = Empty,
                http.route = Empty,
                url.scheme = scheme,
                url.path = bounded(path),
                network.protocol.version = version,
                http.response.status_code = Empty,
                "error.type" = Empty,
                otel.status_code = Empty,
                trace_id = Empty,
                span_id = Empty,
            );
            if let Some(route) = route {
                span.record("http.route", route);
            }
            if method == OTHER {
                span.record(
                    "http.request.method_original",
                    bounded(request.method().as_str()),
                );
            }
            span
        }
    }
}

/// The span of a call whose spans are not exported: only what a reader of its log lines needs (each
/// field is formatted into every call's context), the trace id already known.
fn logged_span(kind: Kind, trace_id: TraceId) -> Span {
    match kind {
        Kind::Grpc { method } => {
            tracing::info_span!("grpc.server", rpc.method = method, trace_id = %trace_id)
        }
        Kind::Http { method, route, .. } => tracing::info_span!(
            "http.server",
            http.request.method = method,
            http.route = route.unwrap_or(OTHER),
            trace_id = %trace_id,
        ),
    }
}

/// `text` cut to [`MAX_ORIGINAL_BYTES`] on a character boundary.
fn bounded(text: &str) -> &str {
    if text.len() <= MAX_ORIGINAL_BYTES {
        return text;
    }
    let mut end = MAX_ORIGINAL_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
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
        if let Some(rest) = call.take_if(|call| !call.is_grpc()) {
            rest.finish_http(response.status());
        } else if let Some(code) = grpc_status(response.headers())
            && let Some(call) = call.take()
        {
            call.finish(code);
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
mod tests;
