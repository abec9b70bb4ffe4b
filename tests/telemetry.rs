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
use tonic::{Request, Response, Status};

/// What the collector received.
#[derive(Default)]
struct Received {
    spans: Vec<Span>,
    /// Every metric of every export, in arrival order (cumulative: the last one of a name is the total).
    metrics: Vec<Metric>,
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
        tokio::time::sleep(self.stall).await;
        let spans = request
            .into_inner()
            .resource_spans
            .into_iter()
            .flat_map(|r| r.scope_spans)
            .flat_map(|s| s.spans);
        self.received.lock().unwrap().spans.extend(spans);
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Collector {
    async fn export(
        &self,
        request: Request<ExportMetricsServiceRequest>,
    ) -> Result<Response<ExportMetricsServiceResponse>, Status> {
        tokio::time::sleep(self.stall).await;
        let metrics = request
            .into_inner()
            .resource_metrics
            .into_iter()
            .flat_map(|r| r.scope_metrics)
            .flat_map(|s| s.metrics);
        self.received.lock().unwrap().metrics.extend(metrics);
        Ok(Response::new(ExportMetricsServiceResponse::default()))
    }
}

impl Collector {
    async fn start(stall: Duration) -> (Collector, SocketAddr) {
        let collector = Collector {
            stall,
            ..Collector::default()
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .add_service(MetricsServiceServer::new(collector.clone()));
        tokio::spawn(
            router.serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
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
    let endpoint = format!("http://{collector}");
    let mut envs = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
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
        let attrs = attributes(&server.attributes);
        assert_eq!(attrs["rpc.system"], "grpc");
        assert_eq!(attrs["rpc.service"], "ivschat.v1.TokenService");
        assert_eq!(attrs["rpc.method"], "CreateChatToken");
        assert_eq!(attrs["rpc.grpc.status_code"], "0");
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

    // A refused call: its span carries the code and an error status.
    let status = client
        .create_chat_token(CreateChatTokenRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    collector
        .until("the refused call's span", |r| {
            r.spans.iter().any(|s| {
                s.name == name
                    && attributes(&s.attributes)
                        .get("rpc.grpc.status_code")
                        .map(String::as_str)
                        == Some("3")
            })
        })
        .await;
    {
        let received = collector.received.lock().unwrap();
        let refused = received
            .spans
            .iter()
            .find(|s| s.name == name && attributes(&s.attributes)["rpc.grpc.status_code"] == "3")
            .unwrap();
        assert_eq!(
            refused.status.as_ref().unwrap().code,
            StatusCode::Error as i32
        );
    }

    binary.signal("-TERM");
    let (status, log) = binary.wait();
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
    let (status, log) = binary.wait();
    assert_eq!(status.code(), Some(0));
    let trace_ids: Vec<String> = log
        .iter()
        .filter(|l| l.contains("token issued"))
        .map(|l| {
            let audit: serde_json::Value = serde_json::from_str(l).expect("JSON log lines");
            audit["spans"][0]["trace_id"]
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

/// POST /CreateChatToken over h2c with the caller's `traceparent`; returns the response's x-amzn-RequestId.
async fn rest_create_chat_token(addr: SocketAddr, trace_id: &str) -> String {
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
    let json = serde_json::json!({ "roomIdentifier": ROOM_ARN, "userId": "user-1" });
    body.send_data(json.to_string().into(), true).unwrap();
    let response = response.await.unwrap();
    assert_eq!(response.status(), 200);
    response.headers()["x-amzn-requestid"]
        .to_str()
        .unwrap()
        .to_owned()
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
    client.create_chat_token(valid_request()).await.unwrap_err(); // rate limited
    client
        .create_chat_token(CreateChatTokenRequest {
            capabilities: vec![3],
            user_id: "another".into(),
            room_identifier: ROOM_ARN.into(),
            ..Default::default()
        })
        .await
        .unwrap_err(); // denied by policy
    client
        .create_chat_token(CreateChatTokenRequest::default())
        .await
        .unwrap_err(); // invalid

    collector
        .until("every expected count", |r| {
            let rpc = points(r, "rpc.server.call.duration");
            value_where(&points(r, "cts.tokens.issued"), "issuer", "local") == 2.0
                && value_where(&rpc, "rpc.grpc.status_code", "0") == 2.0
                && value_where(&rpc, "rpc.grpc.status_code", "8") == 1.0
                && value_where(&rpc, "rpc.grpc.status_code", "7") == 1.0
                && value_where(&rpc, "rpc.grpc.status_code", "3") == 1.0
                && value_where(&points(r, "cts.policy.decisions"), "decision", "deny") == 1.0
                && value_where(&points(r, "cts.policy.decisions"), "decision", "allow") == 3.0
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
        let rpc = points(&received, "rpc.server.call.duration");
        assert!(rpc.iter().all(|(attrs, _)| attrs["rpc.system"] == "grpc"
            && attrs["rpc.service"] == "ivschat.v1.TokenService"
            && attrs["rpc.method"] == "CreateChatToken"));
    }
    binary.signal("-TERM");
    assert_eq!(binary.wait().0.code(), Some(0));
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
    assert_eq!(binary.wait().0.code(), Some(0));

    let (_collector, stalled) = Collector::start(Duration::from_secs(60)).await;
    let binary = exporting_binary(stalled, &[]);
    calls_succeed_promptly(&binary).await;
    binary.signal("-TERM");
    let (status, _) = binary.wait();
    assert_eq!(
        status.code(),
        Some(0),
        "shutdown gives up flushing to a stalled collector"
    );
}

#[tokio::test]
async fn no_token_user_id_or_attribute_value_reaches_logs_or_spans() {
    let (collector, addr) = Collector::start(Duration::ZERO).await;
    let binary = exporting_binary(addr, &[("RUST_LOG", "debug"), ("CTS_LOG_FORMAT", "json")]);
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
    client
        .create_chat_token(CreateChatTokenRequest {
            session_duration_in_minutes: Some(0),
            ..request
        })
        .await
        .unwrap_err();

    collector
        .until("the spans of both calls", |r| {
            r.spans
                .iter()
                .filter(|s| s.name == "ivschat.v1.TokenService/CreateChatToken")
                .count()
                >= 2
        })
        .await;
    binary.signal("-TERM");
    let (_, log) = binary.wait();
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
    let trace_id = audit["spans"][0]["trace_id"]
        .as_str()
        .expect("the call's trace id");
    assert_eq!(trace_id.len(), 32, "{audit}");

    let received = collector.received.lock().unwrap();
    let spans = format!("{:?}", received.spans);
    for (what, secret) in [
        ("token", token.as_str()),
        ("user id", user_id),
        ("attribute value", attribute_value),
    ] {
        assert!(!log.contains(secret), "the {what} leaked into the logs");
        assert!(!spans.contains(secret), "the {what} leaked into a span");
    }
}
