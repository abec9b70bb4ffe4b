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

    /// How long a new connection may go without a request: its first request (over HTTP/2 the preface and
    /// the first call's headers; over HTTP/1.1 each whole request head) must arrive this soon after it is
    /// accepted, or after its TLS handshake; over TLS its first bytes (the ClientHello) must arrive this
    /// soon after it is accepted. Clients send them at once. Default `5s`; at least `100ms`.
    #[serde(with = "humantime_serde")]
    pub preface_timeout: Duration,

    /// A connection without a call open for this long is closed (gRPC's MAX_CONNECTION_IDLE): HTTP/2
    /// PINGs keep a connection alive only while calls are open. Clients reconnect on their next call.
    /// Default `5m`; at least `1s`.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,

    /// Bytes of request messages the replica holds at once, over every call and connection: taken when a
    /// message's length is known (gRPC's length prefix, HTTP's `Content-Length`) and given back when its
    /// call ends; a call that would pass it is shed with UNAVAILABLE (HTTP 503). It bounds what clients
    /// can make the server hold before they are identified. Default `16777216` (16 MiB: every call place
    /// with a full-size message); at least `max_request_bytes`.
    pub max_request_bytes_in_flight: NonZeroUsize,

    /// Streaming calls (health `Watch`, reflection) open at once on this replica; one more is refused
    /// with UNAVAILABLE. Default `256`.
    pub max_streaming_calls: NonZeroUsize,

    /// Streaming calls one connection may have open at once. Default `4`.
    pub max_streaming_calls_per_connection: NonZeroUsize,

    /// The longest a health `Watch` stream lives; it then ends with UNAVAILABLE and the client watches
    /// again (reflection streams end at `max_call_duration`). Default `30m`; at least `1s`.
    #[serde(with = "humantime_serde")]
    pub max_stream_age: Duration,

    /// The memory this replica may use, in bytes (for example its container's limit, given by the
    /// Downward API as `CTS_TRANSPORT__MEMORY_LIMIT_BYTES`): start-up warns when the connection and
    /// request bounds above could use more than three quarters of it. Default: none (no check).
    pub memory_limit_bytes: Option<u64>,
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
            max_request_bytes_in_flight: NonZeroUsize::new(16 * 1024 * 1024).expect("not zero"),
            max_streaming_calls: NonZeroUsize::new(256).expect("256 is not zero"),
            max_streaming_calls_per_connection: NonZeroUsize::new(4).expect("4 is not zero"),
            max_stream_age: Duration::from_secs(30 * 60),
            memory_limit_bytes: None,
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
            (
                "transport.max_stream_age",
                self.max_stream_age,
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

    /// Web origins (`https://app.example.com`) whose pages may call this API from a browser. A request
    /// carrying an `Origin` header, or `Sec-Fetch-Site: cross-site`, from any other origin is refused
    /// with 403: AWS SDKs and the CLI send neither, and a web page a developer visits must not be able to
    /// drive a local service (no CORS is served either way). Default `[]`: no browser.
    pub allowed_origins: Vec<String>,
}

impl Default for HttpApiConfig {
    fn default() -> Self {
        HttpApiConfig {
            enabled: true,
            max_body_bytes: 16 * 1024,
            allowed_origins: Vec::new(),
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
    /// How long a client may take to complete the TLS handshake, from its first bytes. Default `10s`.
    #[serde(default = "default_handshake_timeout", with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// TLS handshakes in progress at once; a connection whose first bytes arrive while this many are is
    /// closed at once. A handshake costs a signature (about a millisecond of CPU), so this bounds what a
    /// burst of new connections can take from calls in flight. A connection takes a place only once its
    /// ClientHello has started to arrive, so sockets that say nothing hold none. Default `128`.
    #[serde(default = "default_max_concurrent_handshakes")]
    pub max_concurrent_handshakes: NonZeroUsize,
    /// TLS handshakes in progress at once from one client address, so one host cannot hold every place
    /// by starting handshakes it never finishes. Default `16`.
    #[serde(default = "default_max_handshakes_per_peer")]
    pub max_handshakes_per_peer: NonZeroUsize,
}

pub(super) fn default_handshake_timeout() -> Duration {
    Duration::from_secs(10)
}

pub(super) fn default_max_handshakes_per_peer() -> NonZeroUsize {
    NonZeroUsize::new(16).expect("16 is not zero")
}

pub(super) fn default_max_concurrent_handshakes() -> NonZeroUsize {
    NonZeroUsize::new(128).expect("128 is not zero")
}
