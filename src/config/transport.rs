//! `[transport]`, `[tls]` and `[http_api]`: the listener, its connections and its protocols.

use std::{
    num::{NonZeroU32, NonZeroUsize},
    path::PathBuf,
    time::Duration,
};

use serde::{Deserialize, Serialize};

use super::{ConfigError, at_least};

/// Per-connection limits and timeouts, so one client or a few cannot hold what every caller needs.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TransportConfig {
    /// HTTP/2 streams one connection may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS). Well below
    /// `max_concurrent_calls`, so no single connection can take every call slot; gRPC clients open more
    /// connections when they need more. Default `128`.
    pub max_concurrent_streams: NonZeroU32,

    /// Largest header block a client may send, in bytes (SETTINGS_MAX_HEADER_LIST_SIZE). Identity
    /// headers, trace context and grpc-timeout fit in a few KiB. Default `16384`.
    pub max_header_list_bytes: NonZeroU32,

    /// How often an HTTP/2 PING checks that a connection's peer is still there. Default `30s`.
    #[serde(with = "humantime_serde")]
    pub keepalive_interval: Duration,

    /// How long a PING may go unanswered before the connection is closed: a silent peer's connection is
    /// not held forever. Default `10s`.
    #[serde(with = "humantime_serde")]
    pub keepalive_timeout: Duration,

    /// How long a connection may live before the server sends GOAWAY, so clients reconnect and spread
    /// over replicas added since (gRPC's MAX_CONNECTION_AGE). Default `30m`.
    #[serde(with = "humantime_serde")]
    pub max_connection_age: Duration,

    /// After that GOAWAY, how long calls still open on the connection may take before it is closed.
    /// Default `30s`.
    #[serde(with = "humantime_serde")]
    pub max_connection_age_grace: Duration,

    /// The longest any call may take, including receiving its request message: applies when the client
    /// sends no `grpc-timeout` or a longer one, so a stream that never sends its body is ended. Default
    /// `30s`; at least `1s`.
    #[serde(with = "humantime_serde")]
    pub max_call_duration: Duration,

    /// Connections open at once on this replica, TLS handshakes included; one more is accepted and
    /// closed at once, so its client tries another replica. Each open connection costs a file
    /// descriptor and some tens of KiB of buffers. Default `4096`.
    pub max_connections: NonZeroUsize,

    /// How long a new connection may stay silent: its first request bytes (the HTTP/2 preface, or an
    /// HTTP/1.1 request line) must arrive this soon after it is accepted, or after its TLS handshake.
    /// Clients send them at once. Default `5s`; at least `100ms`.
    #[serde(with = "humantime_serde")]
    pub preface_timeout: Duration,

    /// A connection without a call open for this long is closed (gRPC's MAX_CONNECTION_IDLE): HTTP/2
    /// PINGs keep a connection alive only while calls are open. Clients reconnect on their next call.
    /// Default `5m`; at least `1s`.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            max_concurrent_streams: NonZeroU32::new(128).expect("128 is not zero"),
            max_header_list_bytes: NonZeroU32::new(16 * 1024).expect("16384 is not zero"),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            max_connection_age: Duration::from_secs(30 * 60),
            max_connection_age_grace: Duration::from_secs(30),
            max_call_duration: Duration::from_secs(30),
            max_connections: NonZeroUsize::new(4096).expect("4096 is not zero"),
            preface_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(5 * 60),
        }
    }
}

impl TransportConfig {
    /// The rules of this section that its types do not hold.
    pub(super) fn check(&self) -> Result<(), ConfigError> {
        for (setting, value, min) in [
            (
                "transport.max_call_duration",
                self.max_call_duration,
                Duration::from_secs(1),
            ),
            (
                "transport.preface_timeout",
                self.preface_timeout,
                Duration::from_millis(100),
            ),
            (
                "transport.idle_timeout",
                self.idle_timeout,
                Duration::from_secs(1),
            ),
        ] {
            at_least(setting, value, min)?;
        }
        Ok(())
    }
}

/// Settings of the IVS Chat REST-JSON API.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpApiConfig {
    /// Whether the listener also answers IVS Chat's REST-JSON API over HTTP/1.1 and HTTP/2, so
    /// `aws ivschat create-chat-token --endpoint-url …` and every AWS SDK work unchanged. Off: only gRPC is
    /// served. Default `true`.
    pub enabled: bool,

    /// Largest request body accepted, in bytes; larger ones are refused with 413 before they are parsed.
    /// The largest valid request is under 8 KiB even with every character of its attributes escaped.
    /// Default `16384`; between `8192` and `1048576`.
    pub max_body_bytes: usize,
}

impl Default for HttpApiConfig {
    fn default() -> Self {
        HttpApiConfig {
            enabled: true,
            max_body_bytes: 16 * 1024,
        }
    }
}

impl HttpApiConfig {
    /// The rules of this section that its types do not hold.
    pub(super) fn check(&self) -> Result<(), ConfigError> {
        if !(8192..=1024 * 1024).contains(&self.max_body_bytes) {
            return Err(ConfigError::Invalid {
                setting: "http_api.max_body_bytes".into(),
                reason: format!(
                    "must be between 8192 and 1048576, got {}",
                    self.max_body_bytes
                ),
            });
        }
        Ok(())
    }
}

/// TLS settings. Files are re-read when they change (every `reload_interval`), so certificates rotated
/// by cert-manager or SPIRE take effect without a restart; connections already open keep their session.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The server's certificate chain, PEM, leaf first. Required.
    pub cert_file: PathBuf,
    /// The server's private key, PEM (PKCS#8, PKCS#1 or SEC1). Required.
    pub key_file: PathBuf,
    /// CA certificates, PEM, that client certificates must chain to. When set, every client must present
    /// a valid certificate (mutual TLS) or the handshake fails; needed by the `mtls` identity source.
    pub client_ca_file: Option<PathBuf>,
    /// How long a client may take to complete the TLS handshake. Default `10s`.
    #[serde(default = "default_handshake_timeout", with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// TLS handshakes in progress at once; a connection arriving while this many are is closed at once.
    /// A handshake costs a signature (about a millisecond of CPU), so this bounds what a burst of new
    /// connections can take from calls in flight. Default `128`.
    #[serde(default = "default_max_concurrent_handshakes")]
    pub max_concurrent_handshakes: NonZeroUsize,
}

pub(super) fn default_handshake_timeout() -> Duration {
    Duration::from_secs(10)
}

pub(super) fn default_max_concurrent_handshakes() -> NonZeroUsize {
    NonZeroUsize::new(128).expect("128 is not zero")
}
