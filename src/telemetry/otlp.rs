//! The OTLP exporters, as the standard variables describe them (OpenTelemetry specification, "OTLP
//! Exporter Configuration"), each per signal (`OTEL_EXPORTER_OTLP_TRACES_*`, `…_METRICS_*`) before the
//! general one:
//!
//! - `OTEL_EXPORTER_OTLP_PROTOCOL`: `grpc` (the default here, as before: collectors listen on 4317) or
//!   `http/protobuf` (4318, paths `/v1/traces` and `/v1/metrics`). `http/json` and anything else stop
//!   start-up with an error that says so: nothing is left unexported silently.
//! - `https://` endpoints speak TLS (rustls, ring): the server's certificate must chain to
//!   `OTEL_EXPORTER_OTLP_CERTIFICATE` (PEM) when set, else to the system's trusted roots;
//!   `OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE` and `OTEL_EXPORTER_OTLP_CLIENT_KEY` (PEM, both or neither)
//!   make it mutual TLS. The files are read once, at start-up; a bad one stops it.
//! - Endpoints, headers, timeouts, compression and `…_INSECURE` are read by opentelemetry-otlp itself.
//!
//! gRPC goes through tonic, HTTP through hyper with hyper-rustls: both already serve the service, so
//! export adds no second HTTP or TLS stack.

use std::{future::Future, path::PathBuf, pin::Pin, sync::Arc, time::Duration};

use bytes::Bytes;
use opentelemetry_http::{HttpClient, HttpError, Request, Response, hyper::HyperClient};
use opentelemetry_otlp::{
    MetricExporter, Protocol, SpanExporter, WithExportConfig, WithHttpConfig, WithTonicConfig,
    tonic_types::transport::{Certificate, ClientTlsConfig, Identity},
};
use tokio_rustls::rustls::RootCertStore;

use super::TelemetryError;
use crate::pem::{self, ClientIdentity};

/// A kind of telemetry, as the variables name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Signal {
    Traces,
    Metrics,
}

impl Signal {
    fn name(self) -> &'static str {
        match self {
            Signal::Traces => "TRACES",
            Signal::Metrics => "METRICS",
        }
    }
}

/// The transports this service exports over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Transport {
    Grpc,
    HttpProtobuf,
}

/// The variable `OTEL_EXPORTER_OTLP_{SIGNAL}_{setting}` when set and not empty, else
/// `OTEL_EXPORTER_OTLP_{setting}`: its name and value.
fn variable(signal: Signal, setting: &str) -> Option<(String, String)> {
    [
        format!("OTEL_EXPORTER_OTLP_{}_{setting}", signal.name()),
        format!("OTEL_EXPORTER_OTLP_{setting}"),
    ]
    .into_iter()
    .find_map(|name| {
        let value = std::env::var(&name).ok().filter(|v| !v.trim().is_empty())?;
        Some((name, value.trim().to_owned()))
    })
}

fn transport(signal: Signal) -> Result<Transport, TelemetryError> {
    match variable(signal, "PROTOCOL") {
        None => Ok(Transport::Grpc),
        Some((_, value)) if value == "grpc" => Ok(Transport::Grpc),
        Some((_, value)) if value == "http/protobuf" => Ok(Transport::HttpProtobuf),
        Some((name, value)) => Err(TelemetryError(format!(
            "{name}={value:?} is not supported: use \"grpc\" or \"http/protobuf\""
        ))),
    }
}

/// Whether the signal's endpoint asks for TLS: `https://`, or no scheme and not `…_INSECURE=true`.
fn is_https(signal: Signal) -> bool {
    match variable(signal, "ENDPOINT") {
        Some((_, endpoint)) if endpoint.contains("://") => endpoint.starts_with("https://"),
        Some(_) => {
            !variable(signal, "INSECURE").is_some_and(|(_, v)| v.eq_ignore_ascii_case("true"))
        }
        None => false,
    }
}

/// A file a variable names: the variable's name and the path.
type Named = (String, PathBuf);

/// The TLS files the variables name for `signal`: the CA, and the client certificate and key.
struct TlsFiles {
    ca: Option<Named>,
    client: Option<(Named, Named)>,
}

impl TlsFiles {
    fn of(signal: Signal) -> Result<Self, TelemetryError> {
        let file = |setting| variable(signal, setting).map(|(name, path)| (name, path.into()));
        let client = match (file("CLIENT_CERTIFICATE"), file("CLIENT_KEY")) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            (Some((name, _)), None) | (None, Some((name, _))) => {
                return Err(TelemetryError(format!(
                    "{name} needs its pair: set OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE and \
                     OTEL_EXPORTER_OTLP_CLIENT_KEY together (or their {} forms)",
                    signal.name()
                )));
            }
        };
        Ok(TlsFiles {
            ca: file("CERTIFICATE"),
            client,
        })
    }

    fn is_set(&self) -> bool {
        self.ca.is_some() || self.client.is_some()
    }

    /// tonic's TLS settings: the CA or the system's roots, and the client identity.
    fn tonic(&self) -> Result<ClientTlsConfig, TelemetryError> {
        let mut config = ClientTlsConfig::new();
        config = match &self.ca {
            Some((name, path)) => {
                // Read through pem so a bad file is named now, not at the first export.
                pem::certificates(path, name)?;
                config.ca_certificate(Certificate::from_pem(read(name, path)?))
            }
            None => config.with_native_roots(),
        };
        if let Some(((cert_name, cert), (key_name, key))) = &self.client {
            // Checked as a pair (the key matches the certificate) the way every client here checks it.
            pem::client_config(RootCertStore::empty(), identity(&self.client))?;
            config = config.identity(Identity::from_pem(
                read(cert_name, cert)?,
                read(key_name, key)?,
            ));
        }
        Ok(config)
    }

    /// hyper's TLS settings, through rustls: the same trust and identity.
    fn rustls(&self) -> Result<tokio_rustls::rustls::ClientConfig, TelemetryError> {
        let roots = match &self.ca {
            Some((name, path)) => pem::roots(path, name)?,
            None => native_roots()?,
        };
        Ok(pem::client_config(roots, identity(&self.client))?)
    }
}

/// The client identity `client` names, for [`pem::client_config`].
fn identity(client: &Option<(Named, Named)>) -> Option<ClientIdentity<'_>> {
    client
        .as_ref()
        .map(|((cert_name, cert), (key_name, key))| ClientIdentity {
            cert: (cert.as_path(), cert_name.as_str()),
            key: (key.as_path(), key_name.as_str()),
        })
}

fn read(name: &str, path: &PathBuf) -> Result<Vec<u8>, TelemetryError> {
    std::fs::read(path).map_err(|e| TelemetryError(format!("{name}: {}: {e}", path.display())))
}

/// The system's trusted roots, as tonic's `with_native_roots` reads them.
fn native_roots() -> Result<RootCertStore, TelemetryError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        return Err(TelemetryError(format!(
            "no trusted root certificates found on this system for an https:// OTLP endpoint ({}); \
             set OTEL_EXPORTER_OTLP_CERTIFICATE",
            found
                .errors
                .first()
                .map_or_else(|| "none installed".to_owned(), ToString::to_string)
        )));
    }
    Ok(roots)
}

impl From<pem::PemError> for TelemetryError {
    fn from(error: pem::PemError) -> Self {
        TelemetryError(format!("{}: {}", error.setting, error.reason))
    }
}

/// The HTTP client of `http/protobuf` export: hyper over rustls, bounded by the signal's timeout.
fn http_client(signal: Signal, tls: &TlsFiles) -> Result<OnRuntime, TelemetryError> {
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls.rustls()?)
        .https_or_http()
        // Offered in the TLS handshake (ALPN) both ways: collectors speak either.
        .enable_all_versions()
        .build();
    let timeout = variable(signal, "TIMEOUT")
        .and_then(|(_, ms)| ms.parse().ok())
        .map_or(DEFAULT_TIMEOUT, Duration::from_millis);
    Ok(OnRuntime {
        client: Arc::new(HyperClient::new(connector, timeout, None)),
        runtime: tokio::runtime::Handle::current(),
    })
}

/// The specification's default export timeout.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// An HTTP client whose requests run on the service's tokio runtime: the SDK exports from threads of its
/// own, where hyper (its connection tasks, its timer) has no runtime to run on.
#[derive(Debug)]
struct OnRuntime {
    client: Arc<dyn HttpClient>,
    runtime: tokio::runtime::Handle,
}

impl HttpClient for OnRuntime {
    fn send_bytes<'a, 'b>(
        &'a self,
        request: Request<Bytes>,
    ) -> Pin<Box<dyn Future<Output = Result<Response<Bytes>, HttpError>> + Send + 'b>>
    where
        'a: 'b,
        Self: 'b,
    {
        let client = self.client.clone();
        let export = self
            .runtime
            .spawn(async move { client.send_bytes(request).await });
        Box::pin(async move { export.await? })
    }
}

/// The span exporter the variables describe.
pub(super) fn span_exporter() -> Result<SpanExporter, TelemetryError> {
    let signal = Signal::Traces;
    let tls = TlsFiles::of(signal)?;
    let built = match transport(signal)? {
        Transport::Grpc => {
            let builder = SpanExporter::builder().with_tonic();
            match tonic_tls(signal, &tls)? {
                Some(config) => builder.with_tls_config(config).build(),
                None => builder.build(),
            }
        }
        Transport::HttpProtobuf => SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_http_client(http_client(signal, &tls)?)
            .build(),
    };
    built.map_err(|e| TelemetryError(format!("OTLP span exporter: {e}")))
}

/// The metric exporter the variables describe.
pub(super) fn metric_exporter() -> Result<MetricExporter, TelemetryError> {
    let signal = Signal::Metrics;
    let tls = TlsFiles::of(signal)?;
    let built = match transport(signal)? {
        Transport::Grpc => {
            let builder = MetricExporter::builder().with_tonic();
            match tonic_tls(signal, &tls)? {
                Some(config) => builder.with_tls_config(config).build(),
                None => builder.build(),
            }
        }
        Transport::HttpProtobuf => MetricExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_http_client(http_client(signal, &tls)?)
            .build(),
    };
    built.map_err(|e| TelemetryError(format!("OTLP metric exporter: {e}")))
}

/// tonic's TLS settings for the signal: for an `https://` endpoint, or whenever TLS files are named (so a
/// bad file is refused either way; tonic uses them for `https://` only).
fn tonic_tls(signal: Signal, tls: &TlsFiles) -> Result<Option<ClientTlsConfig>, TelemetryError> {
    if is_https(signal) || tls.is_set() {
        tls.tonic().map(Some)
    } else {
        Ok(None)
    }
}

/// Checks what the variables say of `signal` without building an exporter (no runtime, no connection):
/// the protocol, and the TLS files an https endpoint or the TLS variables name.
pub(super) fn check(signal: Signal) -> Result<(), TelemetryError> {
    transport(signal)?;
    let tls = TlsFiles::of(signal)?;
    if is_https(signal) || tls.is_set() {
        tls.rustls()?;
    }
    Ok(())
}

/// The TLS variable set for `signal` whose endpoint is not `https://`: its files are not used (the
/// export is in plaintext), which start-up says rather than leave unnoticed.
pub(super) fn unused_tls(signal: Signal) -> Option<String> {
    if is_https(signal) {
        return None;
    }
    ["CERTIFICATE", "CLIENT_CERTIFICATE", "CLIENT_KEY"]
        .into_iter()
        .find_map(|setting| variable(signal, setting))
        .map(|(name, _)| name)
}

/// What the variables say of `signal`'s transport, for the start-up log.
pub(super) fn describe(signal: Signal) -> String {
    let transport = match transport(signal) {
        Ok(Transport::HttpProtobuf) => "http/protobuf",
        _ => "grpc",
    };
    let security = if is_https(signal) { "TLS" } else { "plaintext" };
    format!("{transport}, {security}")
}
