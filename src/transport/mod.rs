//! The transport: what sits between a TCP socket and the front doors.
//!
//! - [`listener`]: the accept loop and each connection's bounds (how many, silent, idle, out of file
//!   descriptors), and the [`listener::ConnInfo`] every request sees.
//! - [`serve`]: HTTP/2 and HTTP/1.1 on those connections, every bound set.
//! - [`tls`]: rustls termination, mutual TLS, certificates swapped on reload.
//! - [`trace`]: the server span and duration metric of every call, W3C trace context in.
//! - [`inflight`]: counts calls in flight (shutdown ends when the last one does) and keeps them within
//!   the cap on calls, the request byte budget and the streaming bounds.
//! - [`deadline`]: every call's deadline, the caller's within the server's limits, and its end there.
//! - [`decode_errors`]: ends a reflection stream with the error its request failed to decode with (an
//!   oversized message: OUT_OF_RANGE), not with OK.
//! - [`end_on_drain`]: ends health `Watch` streams when shutdown starts.
//! - [`probe`]: the `health` command's client, a gRPC health check of this replica's own listener.
//! - [`unknown_method`]: answers gRPC calls to methods not served, with ErrorInfo.

pub mod deadline;
pub mod decode_errors;
pub mod end_on_drain;
pub mod inflight;
pub mod listener;
pub mod probe;
pub mod serve;
pub mod tls;
pub mod trace;
pub mod unknown_method;
