//! The service's metrics, created once from the global meter.
//!
//! | name | kind | unit | attributes |
//! |---|---|---|---|
//! | `rpc.server.call.duration` | histogram | s | `rpc.system.name` (`grpc`), `rpc.method` (`ivschat.v1.TokenService/CreateChatToken`, …, `_OTHER`), `rpc.status_code` (`OK`, `PERMISSION_DENIED`, …), `error.type` (server faults only) |
//! | `http.server.request.duration` | histogram | s | `http.request.method`, `http.route` (`/CreateChatToken`, `/DisconnectUser`; none for other paths), `http.response.status_code`, `url.scheme`, `network.protocol.version`, `error.type` (5xx only) |
//! | `cts.rpc.in_flight` | gauge | {call} | |
//! | `cts.connections.open` | gauge | {connection} | |
//! | `cts.connections.closed` | counter | {connection} | `reason`: `max_connections`, `max_handshakes`, `handshake_failed`, `handshake_timeout`, `preface_timeout`, `idle` (connections the server refused or closed; not those the client closed) |
//! | `cts.tokens.issued` | counter | {token} | `issuer` |
//! | `cts.policy.decisions` | counter | {decision} | `decision` (`allow`, `deny`, `shadow_deny`) |
//! | `cts.policy.reload.refusals` | counter | {reload} | |
//! | `cts.ratelimit.rejections` | counter | {request} | `limit`, `mode` (`enforce`, `shadow`) |
//! | `cts.upstream.duration` | histogram | s | `region`, `outcome` |
//! | `cts.upstream.errors` | counter | {error} | `kind` |
//! | `cts.limiter.store.errors` | counter | {error} | `kind`: `timeout`, `unreachable`, `noscript`, `readonly`, `oom`, `crossslot`, `denied`, `other` (calls and probes) |
//! | `cts.limiter.fallbacks` | counter | {request} | |
//! | `cts.moderation.actions` | counter | {action} | `action` (`DisconnectUser`, `BanUser`, …), `result` (`ok`, `error`) |
//! | `cts.messaging.calls` | counter | {call} | `action` (`SendEvent`, `DeleteMessage`), `backend` (`ivs`, `webhook`), `result` (`ok`, `error`) |
//! | `cts.log.dropped_lines` | counter | {line} | |
//! | `cts.end_user.verifications` | counter | {token} | `issuer` (a configured issuer, or `unknown`), `outcome` (`bound`, or why the token was refused: `expired`, `signature`, …, `keys_unavailable`) |
//! | `cts.end_user.jwks.fetches` | counter | {fetch} | `issuer`, `outcome` (`ok`, `error`) |
//!
//! The two call durations follow the OpenTelemetry semantic conventions (v1.44: docs/rpc/rpc-metrics.md,
//! docs/http/http-metrics.md; see `transport::trace`). Attribute values are names and codes, never keys,
//! user ids or tokens. Without an exporter configured the global meter is a no-op and so is every
//! instrument here.

use std::sync::LazyLock;

use opentelemetry::{
    global,
    metrics::{Counter, Histogram},
};

/// Bucket boundaries, in seconds, for latencies from sub-millisecond to the 5 s upstream timeout. The
/// conventions advise buckets from 5 ms; a local-issuer call takes a fraction of one, so these start at
/// 0.5 ms and end at 10 s as theirs do.
const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The instruments.
pub struct Metrics {
    /// Duration of each gRPC call, until its trailers are sent.
    pub rpc_server_duration: Histogram<f64>,
    /// Duration of each IVS Chat HTTP API call, until its response headers are sent.
    pub http_server_duration: Histogram<f64>,
    /// Tokens minted.
    pub tokens_issued: Counter<u64>,
    /// Policy outcomes.
    pub policy_decisions: Counter<u64>,
    /// Policy reloads refused because the new files were bad.
    pub policy_reload_refusals: Counter<u64>,
    /// Requests a rate limit refused (or, in shadow mode, would have).
    pub ratelimit_rejections: Counter<u64>,
    /// Duration of IVS Chat calls, retries included.
    pub upstream_duration: Histogram<f64>,
    /// IVS Chat failures by kind.
    pub upstream_errors: Counter<u64>,
    /// Failed calls to the shared limiter store (Redis).
    pub limiter_store_errors: Counter<u64>,
    /// Requests decided by the in-process limiter because Redis was down (fail_open).
    pub limiter_fallbacks: Counter<u64>,
    /// Moderation calls that reached the moderator or the ban store, by action and result.
    pub moderation_actions: Counter<u64>,
    /// SendEvent and DeleteMessage calls that reached their chat backend, by action, backend and result.
    pub messaging_calls: Counter<u64>,
    /// Connections the server refused or closed, by reason (see `transport::listener::Closed`).
    pub connections_closed: Counter<u64>,
    /// End-user tokens verified (bound) or refused, by issuer and outcome.
    pub end_user_verifications: Counter<u64>,
    /// Fetches of end-user issuers' JWK sets, by issuer and outcome.
    pub end_user_jwks_fetches: Counter<u64>,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let meter = global::meter("chat-token-service");
    Metrics {
        rpc_server_duration: meter
            .f64_histogram("rpc.server.call.duration")
            .with_unit("s")
            .with_description("Measures the duration of an incoming Remote Procedure Call (RPC)")
            .with_boundaries(LATENCY_BUCKETS.to_vec())
            .build(),
        http_server_duration: meter
            .f64_histogram("http.server.request.duration")
            .with_unit("s")
            .with_description("Duration of HTTP server requests")
            .with_boundaries(LATENCY_BUCKETS.to_vec())
            .build(),
        tokens_issued: meter
            .u64_counter("cts.tokens.issued")
            .with_unit("{token}")
            .with_description("Chat tokens issued, by issuer")
            .build(),
        policy_decisions: meter
            .u64_counter("cts.policy.decisions")
            .with_unit("{decision}")
            .with_description("Policy decisions, by outcome")
            .build(),
        policy_reload_refusals: meter
            .u64_counter("cts.policy.reload.refusals")
            .with_unit("{reload}")
            .with_description("Policy reloads refused because the new policies did not validate")
            .build(),
        ratelimit_rejections: meter
            .u64_counter("cts.ratelimit.rejections")
            .with_unit("{request}")
            .with_description("Requests over a rate limit, by limit and mode")
            .build(),
        upstream_duration: meter
            .f64_histogram("cts.upstream.duration")
            .with_unit("s")
            .with_description("Duration of IVS Chat CreateChatToken calls, retries included")
            .with_boundaries(LATENCY_BUCKETS.to_vec())
            .build(),
        upstream_errors: meter
            .u64_counter("cts.upstream.errors")
            .with_unit("{error}")
            .with_description("IVS Chat failures, by kind")
            .build(),
        limiter_store_errors: meter
            .u64_counter("cts.limiter.store.errors")
            .with_unit("{error}")
            .with_description("Failed calls to the shared rate-limit store, by kind")
            .build(),
        limiter_fallbacks: meter
            .u64_counter("cts.limiter.fallbacks")
            .with_unit("{request}")
            .with_description(
                "Requests limited in-process because the shared store was down (fail_open)",
            )
            .build(),
        moderation_actions: meter
            .u64_counter("cts.moderation.actions")
            .with_unit("{action}")
            .with_description("Moderation calls carried out, by action and result")
            .build(),
        messaging_calls: meter
            .u64_counter("cts.messaging.calls")
            .with_unit("{call}")
            .with_description(
                "SendEvent and DeleteMessage calls sent on, by action, backend and result",
            )
            .build(),
        connections_closed: meter
            .u64_counter("cts.connections.closed")
            .with_unit("{connection}")
            .with_description("Connections the server refused or closed, by reason")
            .build(),
        end_user_verifications: meter
            .u64_counter("cts.end_user.verifications")
            .with_unit("{token}")
            .with_description("End-user tokens verified or refused, by issuer and outcome")
            .build(),
        end_user_jwks_fetches: meter
            .u64_counter("cts.end_user.jwks.fetches")
            .with_unit("{fetch}")
            .with_description("Fetches of end-user issuers' JWK sets, by issuer and outcome")
            .build(),
    }
});

/// The instruments, bound to the global meter provider installed by [`super::init`] (no-ops otherwise).
pub fn metrics() -> &'static Metrics {
    &METRICS
}

/// Reports the number of calls in flight (read from `read` at each collection) as `cts.rpc.in_flight`.
pub fn observe_in_flight(read: impl Fn() -> usize + Send + Sync + 'static) {
    global::meter("chat-token-service")
        .i64_observable_gauge("cts.rpc.in_flight")
        .with_unit("{call}")
        .with_description("RPCs in flight")
        .with_callback(move |observer| observer.observe(read() as i64, &[]))
        .build();
}

/// Reports the number of open connections (read from `read` at each collection) as
/// `cts.connections.open`.
pub fn observe_connections(read: impl Fn() -> usize + Send + Sync + 'static) {
    global::meter("chat-token-service")
        .i64_observable_gauge("cts.connections.open")
        .with_unit("{connection}")
        .with_description("Connections open, TLS handshakes included")
        .with_callback(move |observer| observer.observe(read() as i64, &[]))
        .build();
}

/// Reports the log lines dropped because the log writer's queue was full (read from `read` at each
/// collection) as `cts.log.dropped_lines`.
pub fn observe_dropped_log_lines(read: impl Fn() -> usize + Send + Sync + 'static) {
    global::meter("chat-token-service")
        .u64_observable_counter("cts.log.dropped_lines")
        .with_unit("{line}")
        .with_description("Log lines dropped because stderr could not keep up")
        .with_callback(move |observer| observer.observe(read() as u64, &[]))
        .build();
}
