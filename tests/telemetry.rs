//! Telemetry end to end: the real binary exports over OTLP to a collector running in this test (a tonic
//! server for the OTLP trace and metrics services, with the opentelemetry-proto types).

mod common;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use chat_token_service::proto::ivschat::v1::CreateChatTokenRequest;
use common::{Binary, ROOM_ARN, valid_request};
use opentelemetry_proto::tonic::{
    collector::{
        metrics::v1::{
            ExportMetricsServiceRequest, ExportMetricsServiceResponse,
            metrics_service_server::{MetricsService, MetricsServiceServer},
        },
        trace::v1::{
            ExportTraceServiceRequest, ExportTraceServiceResponse,
            trace_service_server::{TraceService, TraceServiceServer},
        },
    },
    common::v1::{KeyValue, any_value::Value},
    metrics::v1::{Metric, metric::Data},
    trace::v1::{Span, span::SpanKind, status::StatusCode},
};
use prost::Message;
use tonic::{
    Request, Response, Status,
    transport::{Certificate, Identity, ServerTlsConfig},
};

/// An OTLP/HTTP response: protobuf, as the exporter expects.
fn protobuf(message: impl Message) -> ([(http::HeaderName, &'static str); 1], Vec<u8>) {
    (
        [(http::header::CONTENT_TYPE, "application/x-protobuf")],
        message.encode_to_vec(),
    )
}

/// What the collector received.
#[derive(Default)]
struct Received {
    spans: Vec<Span>,
    /// Every metric of every export, in arrival order (cumulative: the last one of a name is the total).
    metrics: Vec<Metric>,
    /// Exports that came over OTLP/HTTP (protobuf) rather than gRPC.
    http_exports: usize,
}

#[derive(Clone, Default)]
struct Collector {
    received: Arc<Mutex<Received>>,
    /// How long each export takes to answer: a slow collector.
    stall: Duration,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let spans = request.into_inner().resource_spans.into_iter();
        let spans = spans.flat_map(|r| r.scope_spans).flat_map(|s| s.spans);
        self.keep(spans, |received| &mut received.spans).await;
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Collector {
    async fn export(
        &self,
        request: Request<ExportMetricsServiceRequest>,
    ) -> Result<Response<ExportMetricsServiceResponse>, Status> {
        let metrics = request.into_inner().resource_metrics.into_iter();
        let metrics = metrics
            .flat_map(|r| r.scope_metrics)
            .flat_map(|s| s.metrics);
        self.keep(metrics, |received| &mut received.metrics).await;
        Ok(Response::new(ExportMetricsServiceResponse::default()))
    }
}

/// TLS for the collector: its certificate (from a private CA) and, for mutual TLS, the CA its clients'
/// certificates must chain to.
struct CollectorTls {
    cert_pem: String,
    key_pem: String,
    client_ca_pem: Option<String>,
}

impl Collector {
    /// Answers an export after the stall, keeping its `items` in the list `into` picks.
    async fn keep<T>(
        &self,
        items: impl Iterator<Item = T>,
        into: impl FnOnce(&mut Received) -> &mut Vec<T>,
    ) {
        tokio::time::sleep(self.stall).await;
        into(&mut self.received.lock().unwrap()).extend(items);
    }

    async fn start(stall: Duration) -> (Collector, SocketAddr) {
        Self::start_with(stall, None).await
    }

    /// A collector receiving OTLP over gRPC and over HTTP (`POST /v1/traces`, `/v1/metrics` in
    /// protobuf) on one port, over `tls` when given.
    async fn start_with(stall: Duration, tls: Option<CollectorTls>) -> (Collector, SocketAddr) {
        let collector = Collector {
            stall,
            ..Collector::default()
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let http = axum::Router::new()
            .route(
                "/v1/traces",
                axum::routing::post({
                    let collector = collector.clone();
                    move |body: bytes::Bytes| async move {
                        collector.received.lock().unwrap().http_exports += 1;
                        let request = ExportTraceServiceRequest::decode(body).unwrap();
                        TraceService::export(&collector, Request::new(request))
                            .await
                            .unwrap();
                        protobuf(ExportTraceServiceResponse::default())
                    }
                }),
            )
            .route(
                "/v1/metrics",
                axum::routing::post({
                    let collector = collector.clone();
                    move |body: bytes::Bytes| async move {
                        collector.received.lock().unwrap().http_exports += 1;
                        let request = ExportMetricsServiceRequest::decode(body).unwrap();
                        MetricsService::export(&collector, Request::new(request))
                            .await
                            .unwrap();
                        protobuf(ExportMetricsServiceResponse::default())
                    }
                }),
            );
        let routes = tonic::service::Routes::new(TraceServiceServer::new(collector.clone()))
            .add_service(MetricsServiceServer::new(collector.clone()))
            .into_axum_router()
            .merge(http);
        let mut server = tonic::transport::Server::builder().accept_http1(true);
        if let Some(tls) = tls {
            let mut config =
                ServerTlsConfig::new().identity(Identity::from_pem(tls.cert_pem, tls.key_pem));
            if let Some(ca) = tls.client_ca_pem {
                config = config.client_ca_root(Certificate::from_pem(ca));
            }
            server = server.tls_config(config).unwrap();
        }
        tokio::spawn(
            server
                .add_routes(tonic::service::Routes::from(routes))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        (collector, addr)
    }

    /// Waits (bounded) until `ready` holds for what was received.
    async fn until(&self, what: &str, ready: impl Fn(&Received) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !ready(&self.received.lock().unwrap()) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the collector never received {what}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The binary exporting to `collector` quickly, so the test need not wait long.
fn exporting_binary(collector: SocketAddr, extra: &[(&str, &str)]) -> Binary {
    exporting_to(&format!("http://{collector}"), extra)
}

/// The binary exporting to `endpoint` quickly, with `extra` variables.
fn exporting_to(endpoint: &str, extra: &[(&str, &str)]) -> Binary {
    let mut envs = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
        ("OTEL_SERVICE_NAME", "cts-under-test"),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ("OTEL_METRIC_EXPORT_INTERVAL", "200"),
    ];
    envs.extend_from_slice(extra);
    Binary::start(&envs)
}

fn attributes(attributes: &[KeyValue]) -> HashMap<String, String> {
    attributes
        .iter()
        .map(|kv| {
            let value = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(Value::StringValue(s)) => s.clone(),
                Some(Value::IntValue(i)) => i.to_string(),
                Some(Value::BoolValue(b)) => b.to_string(),
                Some(Value::DoubleValue(d)) => d.to_string(),
                other => format!("{other:?}"),
            };
            (kv.key.clone(), value)
        })
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN_ID: &str = "00f067aa0ba902b7";

#[tokio::test]
async fn the_callers_trace_continues_through_our_server_span_and_its_children() {
    let (collector, addr) = Collector::start(Duration::ZERO).await;
    let binary = exporting_binary(addr, &[]);
    let mut client = binary.client().await;

    let mut request = Request::new(valid_request());
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE_ID}-{CALLER_SPAN_ID}-01")
            .parse()
            .unwrap(),
    );
    client.create_chat_token(request).await.unwrap();

    let name = "ivschat.v1.TokenService/CreateChatToken";
    collector
        .until("the server span and its children", |r| {
            ["policy.evaluate", "ratelimit.check", "issuer.issue", name]
                .iter()
                .all(|n| {
                    r.spans
                        .iter()
                        .any(|s| s.name == *n && hex(&s.trace_id) == TRACE_ID)
                })
        })
        .await;
    {
        let received = collector.received.lock().unwrap();
        let span = |name: &str| {
            received
                .spans
                .iter()
                .find(|s| s.name == name && hex(&s.trace_id) == TRACE_ID)
                .unwrap()
        };

        let server = span(name);
        assert_eq!(
            hex(&server.parent_span_id),
            CALLER_SPAN_ID,
            "the caller's span is our parent"
        );
        assert_eq!(server.kind, SpanKind::Server as i32);
        // The RPC semantic conventions (v1.44, docs/rpc/grpc.md): exactly these attributes.
        let attrs = attributes(&server.attributes);
        assert_eq!(attrs["rpc.system.name"], "grpc");
        assert_eq!(attrs["rpc.method"], name);
        assert_eq!(attrs["rpc.status_code"], "OK");
        for old in [
            "rpc.system",
            "rpc.service",
            "rpc.grpc.status_code",
            "error.type",
        ] {
            assert!(!attrs.contains_key(old), "{old} in {attrs:?}");
        }
        assert_eq!(hex(&server.span_id).len(), 16);
        assert_ne!(
            server.status.as_ref().map(|s| s.code),
            Some(StatusCode::Error as i32)
        );

        for child in ["policy.evaluate", "ratelimit.check", "issuer.issue"] {
            let child = span(child);
            assert_eq!(
                child.parent_span_id, server.span_id,
                "{} is a child of the server span",
                child.name
            );
            assert_ne!(
                child.status.as_ref().map(|s| s.code),
                Some(StatusCode::Error as i32)
            );
        }
        assert_eq!(
            attributes(&span("policy.evaluate").attributes)["policy.decision"],
            "allow"
        );
        assert_eq!(
            attributes(&span("issuer.issue").attributes)["issuer"],
            "local"
        );
    }

    // A refused call: the caller's mistake, not the server's. Its span carries the code's name and no
    // error status.
    let status = client
        .create_chat_token(CreateChatTokenRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    // A method this server does not serve: UNIMPLEMENTED, which the conventions count as the server's
    // failure; named `grpc`, its method `_OTHER`, what the caller asked for kept as rpc.method_original.
    let unknown = unknown_method(binary.addr, "/ivschat.v1.TokenService/Nope").await;
    assert_eq!(unknown.code(), tonic::Code::Unimplemented);
    assert_eq!(
        tonic_types::StatusExt::get_details_error_info(&unknown)
            .unwrap()
            .reason,
        "UNKNOWN_METHOD"
    );
    collector
        .until("the refused and unknown calls' spans", |r| {
            let with_status = |code: &str| {
                r.spans.iter().any(|s| {
                    attributes(&s.attributes)
                        .get("rpc.status_code")
                        .map(String::as_str)
                        == Some(code)
                })
            };
            with_status("INVALID_ARGUMENT") && with_status("UNIMPLEMENTED")
        })
        .await;
    {
        let received = collector.received.lock().unwrap();
        let with_status = |code: &str| {
            received
                .spans
                .iter()
                .find(|s| {
                    attributes(&s.attributes)
                        .get("rpc.status_code")
                        .map(String::as_str)
                        == Some(code)
                })
                .unwrap()
        };
        let refused = with_status("INVALID_ARGUMENT");
        assert_eq!(refused.name, name);
        assert_ne!(
            refused.status.as_ref().map(|s| s.code),
            Some(StatusCode::Error as i32),
            "a refusal is not a server error"
        );
        assert!(!attributes(&refused.attributes).contains_key("error.type"));

        let unknown = with_status("UNIMPLEMENTED");
        assert_eq!(unknown.name, "grpc");
        let attrs = attributes(&unknown.attributes);
        assert_eq!(attrs["rpc.method"], "_OTHER");
        assert_eq!(attrs["rpc.method_original"], "ivschat.v1.TokenService/Nope");
        assert_eq!(attrs["error.type"], "UNIMPLEMENTED");
        assert_eq!(
            unknown.status.as_ref().unwrap().code,
            StatusCode::Error as i32
        );
    }

    // The IVS Chat HTTP API: the HTTP server conventions (docs/http/http-spans.md).
    rest_create_chat_token(binary.addr, "0af7651916cd43dd8448eb211c80319c").await;
    let route = "POST /CreateChatToken";
    collector
        .until("the HTTP API call's span", |r| {
            r.spans.iter().any(|s| s.name == route)
        })
        .await;
    {
        let received = collector.received.lock().unwrap();
        let rest = received.spans.iter().find(|s| s.name == route).unwrap();
        assert_eq!(rest.kind, SpanKind::Server as i32);
        let attrs = attributes(&rest.attributes);
        for (key, value) in [
            ("http.request.method", "POST"),
            ("http.route", "/CreateChatToken"),
            ("http.response.status_code", "200"),
            ("url.scheme", "http"),
            ("url.path", "/CreateChatToken"),
            ("network.protocol.version", "2"),
        ] {
            assert_eq!(attrs[key], value, "{key}");
        }
        assert!(!attrs.contains_key("rpc.method"), "{attrs:?}");
    }

    binary.signal("-TERM");
    let (status, log) = binary.exit().await;
    assert_eq!(status.code(), Some(0));
    let audit = log
        .iter()
        .find(|l| l.contains("token issued"))
        .expect("an audit line for the issued token");
    assert!(
        audit.contains(TRACE_ID),
        "log lines carry the trace id: {audit}"
    );
}

#[tokio::test]
async fn without_an_exporter_log_lines_still_carry_the_callers_trace_id_or_a_fresh_one() {
    // No OTEL_* variables: no OpenTelemetry layer, nothing exported.
    let binary = Binary::start(&[("CTS_LOG_FORMAT", "json")]);
    let mut client = binary.client().await;
    let mut request = Request::new(valid_request());
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE_ID}-{CALLER_SPAN_ID}-01")
            .parse()
            .unwrap(),
    );
    client.create_chat_token(request).await.unwrap();
    client.create_chat_token(valid_request()).await.unwrap();
    // The IVS API's x-amzn-RequestId is the trace id of the call's log lines.
    let rest_trace_id = "0af7651916cd43dd8448eb211c80319c";
    let request_id = rest_create_chat_token(binary.addr, rest_trace_id).await;
    assert_eq!(request_id, rest_trace_id);

    binary.signal("-TERM");
    let (status, log) = binary.exit().await;
    assert_eq!(status.code(), Some(0));
    let trace_ids: Vec<String> = log
        .iter()
        .filter(|l| l.contains("token issued"))
        .map(|l| {
            let audit: serde_json::Value = serde_json::from_str(l).expect("JSON log lines");
            // Flat, where collectors look; still in the call's span too. No span id: no span exists.
            assert_eq!(audit["trace_id"], audit["spans"][0]["trace_id"], "{l}");
            assert!(audit.get("span_id").is_none(), "{l}");
            audit["trace_id"]
                .as_str()
                .expect("the call's trace id")
                .to_owned()
        })
        .collect();
    assert_eq!(trace_ids.len(), 3, "{log:?}");
    assert_eq!(trace_ids[2], rest_trace_id);
    assert_eq!(trace_ids[0], TRACE_ID, "the caller's trace continues");
    assert_eq!(trace_ids[1].len(), 32, "a fresh trace id: {}", trace_ids[1]);
    assert!(
        trace_ids[1].bytes().all(|b| b.is_ascii_hexdigit()) && trace_ids[1] != TRACE_ID,
        "{}",
        trace_ids[1]
    );
}

/// A gRPC call to `path`, a method the server does not serve.
async fn unknown_method(addr: SocketAddr, path: &'static str) -> tonic::Status {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let codec =
        tonic_prost::ProstCodec::<CreateChatTokenRequest, CreateChatTokenRequest>::default();
    grpc.unary(
        Request::new(valid_request()),
        http::uri::PathAndQuery::from_static(path),
        codec,
    )
    .await
    .unwrap_err()
}

/// POST /CreateChatToken over h2c with the caller's `traceparent`; returns the response's x-amzn-RequestId.
async fn rest_create_chat_token(addr: SocketAddr, trace_id: &str) -> String {
    rest_call(addr, trace_id, "user-1").await
}

/// [`rest_create_chat_token`] for `user`, with a fresh trace.
async fn rest_create_chat_token_as(addr: SocketAddr, user: &str) -> String {
    rest_call(addr, "5bf92f3577b34da6a3ce929d0e0e4736", user).await
}

async fn rest_call(addr: SocketAddr, trace_id: &str, user: &str) -> String {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (send, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut send = send.ready().await.unwrap();
    let request = http::Request::post(format!("http://{addr}/CreateChatToken"))
        .header("content-type", "application/json")
        .header("traceparent", format!("00-{trace_id}-{CALLER_SPAN_ID}-01"))
        .body(())
        .unwrap();
    let (response, mut body) = send.send_request(request, false).unwrap();
    let json = serde_json::json!({ "roomIdentifier": ROOM_ARN, "userId": user });
    body.send_data(json.to_string().into(), true).unwrap();
    let response = response.await.unwrap();
    assert_eq!(response.status(), 200);
    response.headers()["x-amzn-requestid"]
        .to_str()
        .unwrap()
        .to_owned()
}

/// POST /CreateChatToken with a body naming `user` that does not decode (a number for the room); the
/// status and the JSON reply.
async fn rest_unreadable(addr: SocketAddr, user: &str) -> (u16, serde_json::Value) {
    let connection = common::raw::RawConnection::open(addr).await;
    let request = http::Request::post(format!("http://{addr}/CreateChatToken"))
        .header("content-type", "application/json")
        .body(())
        .unwrap();
    let (response, mut body) = connection
        .send
        .clone()
        .ready()
        .await
        .unwrap()
        .send_request(request, false)
        .unwrap();
    let json = serde_json::json!({ "roomIdentifier": 7, "userId": user });
    body.send_data(json.to_string().into(), true).unwrap();
    common::within("the reply", async {
        let response = response.await.unwrap();
        let status = response.status().as_u16();
        let mut body = response.into_body();
        let mut bytes = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.unwrap();
            let _ = body.flow_control().release_capacity(chunk.len());
            bytes.extend_from_slice(&chunk);
        }
        (status, serde_json::from_slice(&bytes).unwrap())
    })
    .await
}

/// The last exported data of metric `name`, with each data point's attributes.
fn points(received: &Received, name: &str) -> Vec<(HashMap<String, String>, f64)> {
    let Some(metric) = received.metrics.iter().rev().find(|m| m.name == name) else {
        return Vec::new();
    };
    match metric.data.as_ref() {
        Some(Data::Sum(sum)) => sum
            .data_points
            .iter()
            .map(|p| {
                let value = match p.value {
                    Some(
                        opentelemetry_proto::tonic::metrics::v1::number_data_point::Value::AsInt(i),
                    ) => i as f64,
                    Some(
                        opentelemetry_proto::tonic::metrics::v1::number_data_point::Value::AsDouble(
                            d,
                        ),
                    ) => d,
                    None => 0.0,
                };
                (attributes(&p.attributes), value)
            })
            .collect(),
        Some(Data::Histogram(histogram)) => histogram
            .data_points
            .iter()
            .map(|p| (attributes(&p.attributes), p.count as f64))
            .collect(),
        Some(Data::Gauge(gauge)) => gauge
            .data_points
            .iter()
            .map(|p| (attributes(&p.attributes), 0.0))
            .collect(),
        _ => Vec::new(),
    }
}

fn value_where(points: &[(HashMap<String, String>, f64)], key: &str, value: &str) -> f64 {
    points
        .iter()
        .filter(|(attrs, _)| attrs.get(key).map(String::as_str) == Some(value))
        .map(|(_, v)| v)
        .sum()
}

#[tokio::test]
async fn metrics_arrive_with_their_names_attributes_and_counts() {
    let (collector, addr) = Collector::start(Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.cedar");
    std::fs::write(
        &policy,
        r#"@id("no-moderators") permit (principal, action == Action::"CreateChatToken", resource) unless { context.capabilities.contains("DELETE_MESSAGE") };"#,
    )
    .unwrap();
    let policy_files = format!("[\"{}\"]", policy.display());
    let binary = exporting_binary(
        addr,
        &[
            ("CTS_POLICY__FILES", &policy_files),
            (
                "CTS_RATE_LIMITS",
                r#"[{name="per-user",key="user",rate="1/min",burst=2}]"#,
            ),
        ],
    );
    let mut client = binary.client().await;
    for _ in 0..2 {
        client.create_chat_token(valid_request()).await.unwrap(); // issued
    }
    let limited = client.create_chat_token(valid_request()).await.unwrap_err();
    assert_eq!(
        limited.code(),
        tonic::Code::ResourceExhausted,
        "{limited:?}"
    );
    let denied = client
        .create_chat_token(CreateChatTokenRequest {
            capabilities: vec![3],
            user_id: "another".into(),
            room_identifier: ROOM_ARN.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    let invalid = client
        .create_chat_token(CreateChatTokenRequest::default())
        .await
        .unwrap_err();
    assert_eq!(invalid.code(), tonic::Code::InvalidArgument, "{invalid:?}");
    // Through the IVS Chat HTTP API: measured on the HTTP histogram, not the RPC one.
    rest_create_chat_token_as(binary.addr, "another-user").await;

    collector
        .until("every expected count", |r| {
            let rpc = points(r, "rpc.server.call.duration");
            let http = points(r, "http.server.request.duration");
            value_where(&points(r, "cts.tokens.issued"), "issuer", "local") == 3.0
                && value_where(&rpc, "rpc.status_code", "OK") == 2.0
                && value_where(&rpc, "rpc.status_code", "RESOURCE_EXHAUSTED") == 1.0
                && value_where(&rpc, "rpc.status_code", "PERMISSION_DENIED") == 1.0
                && value_where(&rpc, "rpc.status_code", "INVALID_ARGUMENT") == 1.0
                && value_where(&http, "http.response.status_code", "200") == 1.0
                && value_where(&points(r, "cts.policy.decisions"), "decision", "deny") == 1.0
                && value_where(&points(r, "cts.policy.decisions"), "decision", "allow") == 4.0
                && value_where(&points(r, "cts.ratelimit.rejections"), "limit", "per-user") == 1.0
                && !points(r, "cts.rpc.in_flight").is_empty()
                && !points(r, "cts.log.dropped_lines").is_empty()
        })
        .await;
    {
        let received = collector.received.lock().unwrap();
        let duration = received
            .metrics
            .iter()
            .find(|m| m.name == "rpc.server.call.duration")
            .unwrap();
        assert_eq!(duration.unit, "s");
        // The conventions' attributes, and no others: refusals the caller caused have no error.type.
        let rpc = points(&received, "rpc.server.call.duration");
        assert_eq!(rpc.len(), 4, "{rpc:?}");
        for (attrs, _) in &rpc {
            let mut keys: Vec<_> = attrs.keys().map(String::as_str).collect();
            keys.sort_unstable();
            assert_eq!(
                keys,
                ["rpc.method", "rpc.status_code", "rpc.system.name"],
                "{attrs:?}"
            );
            assert_eq!(attrs["rpc.system.name"], "grpc");
            assert_eq!(
                attrs["rpc.method"],
                "ivschat.v1.TokenService/CreateChatToken"
            );
        }
        let http = received
            .metrics
            .iter()
            .find(|m| m.name == "http.server.request.duration")
            .unwrap();
        assert_eq!(http.unit, "s");
        let http = points(&received, "http.server.request.duration");
        assert_eq!(http.len(), 1, "{http:?}");
        let (attrs, _) = &http[0];
        let mut keys: Vec<_> = attrs.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "http.request.method",
                "http.response.status_code",
                "http.route",
                "network.protocol.version",
                "url.scheme"
            ]
        );
        assert_eq!(attrs["http.route"], "/CreateChatToken");
        assert_eq!(attrs["http.request.method"], "POST");
        assert_eq!(attrs["url.scheme"], "http");
    }
    binary.signal("-TERM");
    assert_eq!(binary.exit().await.0.code(), Some(0));
}

async fn calls_succeed_promptly(binary: &Binary) {
    let mut client = binary.client().await;
    for _ in 0..20 {
        let mut request = Request::new(valid_request());
        // Far below the collector's stall: a call waiting on export would blow it.
        request.set_timeout(Duration::from_secs(5));
        client
            .create_chat_token(request)
            .await
            .expect("calls never wait for telemetry");
    }
}

#[tokio::test]
async fn an_absent_or_stalled_collector_neither_fails_nor_slows_calls() {
    // Nobody listens here.
    let absent = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let binary = exporting_binary(absent, &[]);
    calls_succeed_promptly(&binary).await;
    binary.signal("-TERM");
    assert_eq!(binary.exit().await.0.code(), Some(0));

    let (_collector, stalled) = Collector::start(Duration::from_secs(60)).await;
    let binary = exporting_binary(stalled, &[]);
    calls_succeed_promptly(&binary).await;
    binary.signal("-TERM");
    let signalled = tokio::time::Instant::now();
    let (status, _) = binary.exit().await;
    let took = signalled.elapsed();
    assert_eq!(
        status.code(),
        Some(0),
        "shutdown gives up flushing to a stalled collector"
    );
    // Two flushes (traces, metrics) of at most FLUSH_TIMEOUT (2 s) each, and what exports already in
    // flight add (about 7 s in all on an idle machine): below the collector's 60 s stall and the two
    // flushes' 20 s at the exporter's own 10 s timeout.
    assert!(
        took < Duration::from_secs(12),
        "shutdown waited {took:?} on a stalled collector"
    );
}

#[tokio::test]
async fn no_token_key_user_id_or_attribute_value_reaches_logs_spans_or_metrics() {
    let (collector, addr) = Collector::start(Duration::ZERO).await;
    let key = chat_token_service::issuer::local::generate_key();
    let binary = exporting_binary(
        addr,
        &[
            ("RUST_LOG", "debug"),
            ("CTS_LOG_FORMAT", "json"),
            ("CTS_LOCAL_ISSUER__KEY", &key),
        ],
    );
    let mut client = binary.client().await;
    let user_id = "user-SECRET-7f3a";
    let attribute_value = "attr-SECRET-9b2c";
    let request = CreateChatTokenRequest {
        room_identifier: ROOM_ARN.into(),
        user_id: user_id.into(),
        capabilities: vec![1],
        session_duration_in_minutes: Some(30),
        attributes: [("displayName".to_string(), attribute_value.to_string())].into(),
    };
    let token = client
        .create_chat_token(request.clone())
        .await
        .unwrap()
        .into_inner()
        .token;
    // A refusal too: errors are where secrets like to leak.
    let invalid = client
        .create_chat_token(CreateChatTokenRequest {
            session_duration_in_minutes: Some(0),
            ..request
        })
        .await
        .unwrap_err();
    assert_eq!(invalid.code(), tonic::Code::InvalidArgument, "{invalid:?}");
    // And through the IVS HTTP API: a token, and a body it cannot read, naming the user.
    let rest_user_id = "rest-user-SECRET-5d1e";
    rest_create_chat_token_as(binary.addr, rest_user_id).await;
    let (status, reply) = rest_unreadable(binary.addr, rest_user_id).await;
    assert_eq!(status, 400, "{reply}");
    assert_eq!(reply["reason"], "OTHER", "{reply}");
    assert!(
        !reply.to_string().contains(rest_user_id),
        "the reply echoes the user id: {reply}"
    );

    collector
        .until("the spans and metrics of every call", |r| {
            let spans = r
                .spans
                .iter()
                .filter(|s| s.name == "ivschat.v1.TokenService/CreateChatToken")
                .count();
            let issued = points(r, "cts.tokens.issued")
                .iter()
                .map(|(_, n)| n)
                .sum::<f64>();
            let http = points(r, "http.server.request.duration").len();
            spans >= 2 && issued >= 2.0 && http >= 1
        })
        .await;
    binary.signal("-TERM");
    let (_, log) = binary.exit().await;
    let log = log.join("\n");
    assert!(
        log.contains("token issued"),
        "the audit line is there: {log}"
    );
    assert!(log.contains("token_id_hash"), "{log}");
    let audit: serde_json::Value =
        serde_json::from_str(log.lines().find(|l| l.contains("token issued")).unwrap())
            .expect("JSON log lines");
    assert_eq!(audit["target"], "audit");
    assert_eq!(audit["fields"]["outcome"], "issued");
    assert_eq!(audit["span"]["room"], ROOM_ARN);
    assert_eq!(audit["span"]["session_minutes"], 30);
    let trace_id = audit["trace_id"]
        .as_str()
        .expect("the call's trace id, flat");
    assert_eq!(trace_id.len(), 32, "{audit}");
    let span_id = audit["span_id"]
        .as_str()
        .expect("the server span's id, flat");
    assert_eq!(span_id.len(), 16, "{audit}");

    let received = collector.received.lock().unwrap();
    // The log line's ids are those of the exported server span.
    assert!(
        received
            .spans
            .iter()
            .any(|s| hex(&s.trace_id) == trace_id && hex(&s.span_id) == span_id),
        "no exported span {trace_id}/{span_id}"
    );
    let spans = format!("{:?}", received.spans);
    // Every metric exported, names, attributes and all, as text.
    let metrics = format!("{:?}", received.metrics);
    assert!(
        metrics.contains("cts.tokens.issued") && metrics.contains("local"),
        "the positive control: the metrics are there, with their attributes: {metrics}"
    );
    for (what, secret) in [
        ("token", token.as_str()),
        ("user id", user_id),
        ("REST user id", rest_user_id),
        ("attribute value", attribute_value),
        ("issuer key", key.as_str()),
    ] {
        assert!(!log.contains(secret), "the {what} leaked into the logs");
        assert!(!spans.contains(secret), "the {what} leaked into a span");
        assert!(!metrics.contains(secret), "the {what} leaked into a metric");
    }
}

/// A collector's TLS files and a client's, from one throwaway CA: PEM strings and files in `dir`.
struct OtlpPki {
    ca: String,
    client_cert: String,
    client_key: String,
    collector: common::pki::Leaf,
    ca_pem: String,
}

impl OtlpPki {
    fn new(dir: &std::path::Path) -> Self {
        let ca = common::pki::Ca::new("collector-ca");
        let client = ca.client("spiffe://cluster.local/ns/chat/sa/chat-token-service");
        let path = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            path.display().to_string()
        };
        OtlpPki {
            ca: path("ca.crt", &ca.pem()),
            client_cert: path("client.crt", &client.cert_pem),
            client_key: path("client.key", &client.key_pem),
            collector: ca.server(),
            ca_pem: ca.pem(),
        }
    }

    /// The collector's TLS: its certificate for `localhost`, client certificates from the same CA required.
    fn collector_tls(&self) -> CollectorTls {
        CollectorTls {
            cert_pem: self.collector.cert_pem.clone(),
            key_pem: self.collector.key_pem.clone(),
            client_ca_pem: Some(self.ca_pem.clone()),
        }
    }
}

/// One traced call with trace id `trace_id` through a binary started with `env`, then SIGTERM (which
/// flushes what is left): how many spans of that trace the collector holds once the binary has exited.
async fn spans_of_one_call(
    collector: &Collector,
    endpoint: &str,
    env: &[(&str, &str)],
    trace_id: &str,
) -> usize {
    let binary = exporting_to(endpoint, env);
    traced_call(&binary, trace_id).await;
    binary.signal("-TERM");
    // The binary's last flush needs the collector, which runs on this test's runtime: exit() awaits.
    let status = binary.exit().await.0;
    assert_eq!(status.code(), Some(0));
    let received = collector.received.lock().unwrap();
    received
        .spans
        .iter()
        .filter(|s| hex(&s.trace_id) == trace_id)
        .count()
}

/// One token call to `binary`, in the caller's trace `trace_id`.
async fn traced_call(binary: &Binary, trace_id: &str) {
    let mut request = Request::new(valid_request());
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{CALLER_SPAN_ID}-01")
            .parse()
            .unwrap(),
    );
    binary
        .client()
        .await
        .create_chat_token(request)
        .await
        .unwrap();
}

#[tokio::test]
async fn otlp_over_https_with_a_private_ca_and_a_client_certificate_over_grpc_and_http_protobuf() {
    let dir = tempfile::tempdir().unwrap();
    let pki = OtlpPki::new(dir.path());
    let (collector, addr) = Collector::start_with(Duration::ZERO, Some(pki.collector_tls())).await;
    let endpoint = format!("https://localhost:{}", addr.port());
    let tls = [
        ("OTEL_EXPORTER_OTLP_CERTIFICATE", pki.ca.as_str()),
        (
            "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
            pki.client_cert.as_str(),
        ),
        ("OTEL_EXPORTER_OTLP_CLIENT_KEY", pki.client_key.as_str()),
    ];

    for (protocol, trace_id) in [
        ("grpc", "11111111111111111111111111111111"),
        ("http/protobuf", "22222222222222222222222222222222"),
    ] {
        let http_exports = collector.received.lock().unwrap().http_exports;
        collector.received.lock().unwrap().metrics.clear();
        let mut env = tls.to_vec();
        env.push(("OTEL_EXPORTER_OTLP_PROTOCOL", protocol));
        let binary = exporting_to(&endpoint, &env);
        traced_call(&binary, trace_id).await;
        collector
            .until(&format!("spans and metrics over {protocol}"), |r| {
                r.spans.iter().any(|s| {
                    hex(&s.trace_id) == trace_id
                        && s.name == "ivschat.v1.TokenService/CreateChatToken"
                }) && !points(r, "rpc.server.call.duration").is_empty()
            })
            .await;
        let over_http = collector.received.lock().unwrap().http_exports > http_exports;
        assert_eq!(over_http, protocol == "http/protobuf", "{protocol}");
        binary.signal("-TERM");
        let (status, log) = binary.exit().await;
        assert_eq!(status.code(), Some(0));
        let started = log
            .iter()
            .find(|l| l.contains("exporting telemetry over OTLP"))
            .unwrap();
        assert!(started.contains(&format!("{protocol}, TLS")), "{started}");
    }

    // Without the CA the collector's certificate is not trusted; without the client certificate the
    // collector refuses the handshake. Either way nothing arrives, while the same call with both does.
    assert!(
        spans_of_one_call(
            &collector,
            &endpoint,
            &tls,
            "33333333333333333333333333333333"
        )
        .await
            > 0
    );
    for (protocol, trace_id, env) in [
        ("grpc", "44444444444444444444444444444444", &tls[1..]),
        (
            "http/protobuf",
            "55555555555555555555555555555555",
            &tls[1..],
        ),
        ("grpc", "66666666666666666666666666666666", &tls[..1]),
        (
            "http/protobuf",
            "77777777777777777777777777777777",
            &tls[..1],
        ),
    ] {
        let mut env = env.to_vec();
        env.push(("OTEL_EXPORTER_OTLP_PROTOCOL", protocol));
        assert_eq!(
            spans_of_one_call(&collector, &endpoint, &env, trace_id).await,
            0,
            "{protocol} with {env:?}"
        );
    }
}

#[tokio::test]
async fn otlp_http_protobuf_in_plaintext_sends_traces_and_metrics_to_v1_paths() {
    let (collector, addr) = Collector::start(Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let pki = OtlpPki::new(dir.path());
    let binary = exporting_binary(
        addr,
        &[
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf"),
            ("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "http/protobuf"),
            // Of no use to an http:// endpoint: start-up says so.
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", pki.ca.as_str()),
        ],
    );
    binary
        .client()
        .await
        .create_chat_token(valid_request())
        .await
        .unwrap();
    collector
        .until("spans and metrics over OTLP/HTTP", |r| {
            r.http_exports >= 2
                && r.spans
                    .iter()
                    .any(|s| s.name == "ivschat.v1.TokenService/CreateChatToken")
                && !points(r, "rpc.server.call.duration").is_empty()
        })
        .await;
    binary.signal("-TERM");
    let (status, log) = binary.exit().await;
    assert_eq!(status.code(), Some(0));
    assert!(
        log.iter().any(|l| l.contains("http/protobuf, plaintext")),
        "{log:?}"
    );
    assert!(
        log.iter().any(|l| l.contains(
            "OTEL_EXPORTER_OTLP_CERTIFICATE is set but the OTLP endpoint is not https://"
        )),
        "{log:?}"
    );
}

#[test]
fn unsupported_otlp_settings_stop_start_up_saying_why() {
    let dir = tempfile::tempdir().unwrap();
    let pki = OtlpPki::new(dir.path());
    let start = |env: &[(&str, &str)]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_chat-token-service"))
            .env_clear()
            .env("CTS_LISTEN_ADDR", "127.0.0.1:0")
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", "https://localhost:4317")
            .envs(env.iter().copied())
            .output()
            .unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    for (env, says) in [
        (
            vec![("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")],
            "OTEL_EXPORTER_OTLP_PROTOCOL=\"http/json\" is not supported: use \"grpc\" or \"http/protobuf\"",
        ),
        (
            vec![("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "thrift")],
            "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL=\"thrift\" is not supported",
        ),
        (
            vec![(
                "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
                pki.client_cert.as_str(),
            )],
            "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE needs its pair",
        ),
        (
            vec![("OTEL_EXPORTER_OTLP_CERTIFICATE", "/nonexistent/ca.crt")],
            "OTEL_EXPORTER_OTLP_CERTIFICATE: /nonexistent/ca.crt",
        ),
        (
            vec![
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
                (
                    "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
                    pki.client_cert.as_str(),
                ),
                ("OTEL_EXPORTER_OTLP_CLIENT_KEY", pki.ca.as_str()),
            ],
            "OTEL_EXPORTER_OTLP_CLIENT_KEY",
        ),
    ] {
        let (code, stderr) = start(&env);
        assert_eq!(code, Some(1), "{env:?}: {stderr}");
        assert!(stderr.contains(says), "{env:?}: {stderr}");
        // `check` finds the same problem without starting anything.
        let checked = std::process::Command::new(env!("CARGO_BIN_EXE_chat-token-service"))
            .env_clear()
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", "https://localhost:4317")
            .envs(env.iter().copied())
            .arg("check")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&checked.stderr);
        assert_eq!(checked.status.code(), Some(1), "check {env:?}: {stderr}");
        assert!(stderr.contains(says), "check {env:?}: {stderr}");
    }
}
