//! Logs, traces and metrics.
//!
//! - **Logs**: human-readable lines on stderr by default, JSON with `--log-format json` (or `log_format`);
//!   the level comes from `RUST_LOG` (default `info`). Lines written inside a call carry its `trace_id`
//!   (JSON: top-level `trace_id` and, when spans are exported, `span_id`; see [`ids`]).
//! - **Traces**: a server span per RPC (`transport::trace`), children for policy, rate limits, the issuer and the
//!   IVS call (the first three only when traces are exported). W3C `traceparent`/`tracestate` from the caller's metadata make our spans part of its trace.
//! - **Metrics**: see [`metrics`].
//! - **Export**: over OTLP when the standard variables say where (`OTEL_EXPORTER_OTLP_ENDPOINT`, or
//!   the `_TRACES_`/`_METRICS_` variants; `OTEL_SERVICE_NAME`, `OTEL_TRACES_SAMPLER`, … apply): gRPC or
//!   `http/protobuf`, over TLS for `https://` endpoints, with a private CA and client certificates from
//!   the standard variables (see [`otlp`]). Without
//!   them nothing is exported, metric instruments are no-ops and no OpenTelemetry layer is installed (no
//!   span data is built for anyone): the server span still gives logs their trace id, the caller's from
//!   `traceparent` or a fresh random one (`transport::trace`).
//!   Export runs in batches off the request path: a slow or absent collector costs dropped telemetry,
//!   never a slower request.
//! - **Audit**: one `audit` event per decision, written by the front doors (`door`).
//!
//! Log lines are formatted by the thread that logs them, appended to a buffer of at most
//! [`LOG_QUEUE_LINES`] lines and written to stderr in batches by a background thread (`writer`): a call
//! never waits on stderr, and a line reaches it within a few milliseconds. When stderr cannot keep up and
//! the buffer is full, lines are dropped and counted (`cts.log.dropped_lines`); [`Telemetry::shutdown`]
//! writes out what is buffered.

mod ids;
pub mod metrics;
mod otlp;
mod text;
mod writer;

pub(crate) use ids::tag_call;

use std::{
    io::IsTerminal,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use opentelemetry::{global, trace::TracerProvider as _};
use opentelemetry_sdk::{
    Resource, metrics::SdkMeterProvider, propagation::TraceContextPropagator,
    trace::SdkTracerProvider,
};
use serde::{Deserialize, Serialize};
use tracing_subscriber::{
    EnvFilter, Layer, filter::LevelFilter, layer::SubscriberExt, util::SubscriberInitExt,
};

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// One human-readable line per event (colour on a terminal).
    #[default]
    Text,
    /// One JSON object per event, with its spans' fields, and inside a call its `trace_id` (and `span_id`
    /// when spans are exported) as top-level fields: for collectors.
    Json,
}

/// The installed providers and log writer; [`Telemetry::shutdown`] flushes what is still buffered.
pub struct Telemetry {
    /// Dropping it writes out the queued log lines (waiting a bounded time) and ends the writer thread.
    log_writer: writer::WriterGuard,
    /// `None` when no trace exporter is configured: then no OpenTelemetry layer is installed at all.
    tracer_provider: Option<SdkTracerProvider>,
    meter_provider: Option<SdkMeterProvider>,
}

/// Why telemetry could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("telemetry: {0}")]
pub struct TelemetryError(String);

/// How long shutdown may spend flushing telemetry to a collector that may be gone.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// How many log lines may wait for stderr before new ones are dropped: about a second of a busy
/// server's audit lines, a few MB at most.
pub const LOG_QUEUE_LINES: usize = 8192;

/// Whether [`init`] installed the OpenTelemetry layer (a trace exporter is configured).
static EXPORTING_TRACES: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported: the OpenTelemetry layer is installed and spans carry its context.
pub(crate) fn exporting_traces() -> bool {
    EXPORTING_TRACES.load(Ordering::Relaxed)
}

/// A span only traces need (the server span's children: policy, ban check, rate limits, issuer): made by
/// `make` when spans are exported, else no span at all, which costs nothing. Log lines written inside it
/// keep the call's `trace_id` and audit fields from the spans around it.
pub(crate) fn trace_only_span(make: impl FnOnce() -> tracing::Span) -> tracing::Span {
    if exporting_traces() {
        make()
    } else {
        tracing::Span::none()
    }
}

/// Installs logging, tracing and (when configured) metrics export. Call once, inside the tokio runtime
/// (the OTLP exporter's connections live on it).
pub fn init(format: LogFormat) -> Result<Telemetry, TelemetryError> {
    let export_traces = exporting("TRACES");
    let export_metrics = exporting("METRICS");
    global::set_text_map_propagator(TraceContextPropagator::new());
    let resource = resource();

    // Without an exporter, an OpenTelemetry layer would build span data for every span of every call
    // only to drop it: there is none then.
    let tracer_provider = if export_traces {
        let exporter = otlp::span_exporter()?;
        Some(
            SdkTracerProvider::builder()
                .with_resource(resource.clone())
                .with_batch_exporter(exporter)
                .build(),
        )
    } else {
        None
    };

    let meter_provider = if export_metrics {
        let exporter = otlp::metric_exporter()?;
        let provider = SdkMeterProvider::builder()
            .with_resource(resource)
            .with_periodic_exporter(exporter)
            .build();
        global::set_meter_provider(provider.clone());
        Some(provider)
    } else {
        None
    };

    // Spans are for us and the collector; RUST_LOG governs only what is printed.
    let otel = tracer_provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("chat-token-service"))
            .with_filter(LevelFilter::INFO)
    });
    let printed = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (stderr, log_writer) = writer::LogWriter::spawn(std::io::stderr(), LOG_QUEUE_LINES)
        .map_err(|e| TelemetryError(format!("cannot start the log writer thread: {e}")))?;
    let dropped = stderr.clone();
    metrics::observe_dropped_log_lines(move || dropped.dropped_lines());
    let fmt = match format {
        // Colour codes only for people, with tracing-subscriber's own formatters.
        LogFormat::Text if std::io::stderr().is_terminal() => tracing_subscriber::fmt::layer()
            .with_writer(stderr)
            .with_ansi(true)
            .with_filter(printed)
            .boxed(),
        // Log collectors get plain text, the same bytes written by cheaper formatters (see `text`).
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(stderr)
            .with_ansi(false)
            .fmt_fields(text::PlainFields)
            .event_format(text::PlainLine::with_timer(text::UtcMicros))
            .with_filter(printed)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(stderr)
            .with_current_span(true)
            .with_span_list(true)
            .map_event_format(ids::FlatIds)
            .with_filter(printed)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(otel)
        .with(fmt)
        .try_init()
        .map_err(|e| TelemetryError(format!("cannot install the log subscriber: {e}")))?;
    EXPORTING_TRACES.store(tracer_provider.is_some(), Ordering::Relaxed);

    if export_traces || export_metrics {
        let over = |exporting: bool, signal| match exporting {
            true => otlp::describe(signal),
            false => "off".to_owned(),
        };
        tracing::info!(
            traces = %over(export_traces, otlp::Signal::Traces),
            metrics = %over(export_metrics, otlp::Signal::Metrics),
            "exporting telemetry over OTLP"
        );
        for (exporting, signal) in [
            (export_traces, otlp::Signal::Traces),
            (export_metrics, otlp::Signal::Metrics),
        ] {
            if let Some(variable) = otlp::unused_tls(signal).filter(|_| exporting) {
                tracing::warn!(
                    "{variable} is set but the OTLP endpoint is not https://: it is not used, and \
                     {signal:?} go out in plaintext"
                );
            }
        }
    }
    Ok(Telemetry {
        log_writer,
        tracer_provider,
        meter_provider,
    })
}

impl Telemetry {
    /// Flushes buffered spans, metrics and log lines, giving up after a bounded time.
    pub fn shutdown(self) {
        if let Some(tracer_provider) = self.tracer_provider
            && let Err(e) = tracer_provider.shutdown_with_timeout(FLUSH_TIMEOUT)
        {
            tracing::debug!("flushing spans at shutdown: {e}");
        }
        if let Some(meter_provider) = self.meter_provider
            && let Err(e) = meter_provider.shutdown_with_timeout(FLUSH_TIMEOUT)
        {
            tracing::debug!("flushing metrics at shutdown: {e}");
        }
        // Last, so the lines logged above are written too.
        drop(self.log_writer);
    }
}

/// What the standard variables say of export, checked as [`init`] would use them but without exporting
/// (for `check`): for each exported signal its transport (e.g. `grpc, TLS`), or why it cannot be used.
pub fn check_export() -> Vec<(&'static str, Result<String, TelemetryError>)> {
    [
        ("traces", otlp::Signal::Traces),
        ("metrics", otlp::Signal::Metrics),
    ]
    .into_iter()
    .filter(|(name, _)| exporting(&name.to_ascii_uppercase()))
    .map(|(name, signal)| (name, otlp::check(signal).map(|()| otlp::describe(signal))))
    .collect()
}

/// Whether the standard variables ask for `signal` ("TRACES" or "METRICS") to be exported.
fn exporting(signal: &str) -> bool {
    let set = |name: &str| std::env::var_os(name).is_some_and(|v| !v.is_empty());
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"));
    !disabled
        && (set("OTEL_EXPORTER_OTLP_ENDPOINT")
            || set(&format!("OTEL_EXPORTER_OTLP_{signal}_ENDPOINT")))
}

/// `service.name` from `OTEL_SERVICE_NAME` (or `OTEL_RESOURCE_ATTRIBUTES`), else `chat-token-service`.
fn resource() -> Resource {
    let named = std::env::var_os("OTEL_SERVICE_NAME").is_some()
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|v| v.contains("service.name="));
    let builder = Resource::builder();
    if named {
        builder.build()
    } else {
        builder.with_service_name("chat-token-service").build()
    }
}
