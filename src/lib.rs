//! chat-token-service: a gRPC service that mints Amazon IVS Chat tokens for internal callers.
//!
//! Callers ask `ivschat.v1.TokenService/CreateChatToken` for a token for one user in one room; the request
//! and response mirror IVS Chat's own CreateChatToken API field for field and enforce the same limits.
//!
//! # Layout
//! - [`config`]: the one [`config::Config`], from defaults, a TOML file and `CTS_*` environment variables.
//! - [`server`]: [`server::prepare`] builds what the config describes, [`server::serve`] / [`server::run`]
//!   serve the token service, gRPC health and reflection, and drain on shutdown.
//! - [`listener`]: the accept loop and each connection's bounds (how many, silent, idle, out of file
//!   descriptors), and the [`listener::ConnInfo`] every request sees.
//! - [`inflight`]: counts calls in flight (shutdown ends when the last one does) and caps token calls once
//!   their request message has arrived.
//! - [`service`]: the gRPC handler, proto ⇄ domain, and the [`service::Door`] both front doors share
//!   (identity, domain stack, audit trail).
//! - [`rest`]: IVS Chat's own REST-JSON API on the same port (`POST /CreateChatToken`), JSON ⇄ domain, for
//!   the AWS CLI and SDKs.
//! - [`identity`]: who is calling (mTLS SAN, x-forwarded-client-cert, SigV4 signature ([`identity::sigv4`]),
//!   dev header, anonymous).
//! - [`policy`]: Cedar policy engine (schema-validated, reloadable) and its tower layer.
//! - [`request`]: validated domain types ([`request::TokenRequest`], [`request::RoomArn`], …) and the
//!   answer, [`request::IssuedToken`].
//! - [`scope`]: which rooms the IVS issuer serves (allowed regions and accounts), checked before any budget.
//! - [`stack`]: the one place the domain stack (layers + issuer) is composed, around the process's one
//!   limiter store ([`stack::limiter_store`]), which everything that limits shares.
//! - [`ratelimit`]: the rate-limit layer, GCRA, and the limiter stores: in memory, or shared through Redis
//!   with a timeout and a fail_open / fail_closed fallback.
//! - [`issuer`]: the [`issuer::Issuer`] seam, the [`issuer::ivs`] issuer and the [`issuer::local`] PASETO
//!   issuer (its [`issuer::local::keys`], reloadable, and [`issuer::local::token`] format, with verification).
//! - [`moderation`]: `ivschat.v1.ModerationService` (disconnect, ban, unban, list bans, verify a token), the
//!   ban check in the token stack, and the moderation state kept in the limiter store's backend.
//! - [`error`]: the single table from domain errors to gRPC codes and `google.rpc` details, and to IVS
//!   Chat's error shapes ([`error::IvsError`]) for the HTTP API.
//! - [`tls`]: rustls termination, mutual TLS, certificate reload; [`reload`]: the file watcher it, the
//!   policies and the local keys use (on change and on SIGHUP, off the runtime's workers).
//! - [`telemetry`]: logs (text or JSON), OpenTelemetry traces and metrics over OTLP, the RPC span layer.
//!
//! # Request flow
//! ```text
//! client ──TCP──▶ listener::incoming   connection cap, TLS handshake cap and timeout, preface and idle timeouts
//!   ──HTTP/2 or HTTP/1.1 (TLS / mTLS)──▶ tonic server (health, reflection, 64 KiB message cap)
//!   ▶ inflight::InFlightLayer   counts calls (graceful drain); a token call whose message has arrived
//!                               while the cap is full is shed: UNAVAILABLE
//!   ▶ service::TokenService     identity::Resolver → Caller, or UNAUTHENTICATED
//!     (gRPC)                    decode + validate → request::TokenRequest, or INVALID_ARGUMENT
//!                               the caller's deadline → DEADLINE_EXCEEDED
//!   ▶ rest (POST                the same through service::Door: body read (size cap), identity (plus
//!     /CreateChatToken)         SigV4), JSON → request::TokenRequest; errors as error::IvsError
//!   ▶ stack::TokenStack         tower::Service<TokenRequest, Response = IssuedToken>
//!       ▶ policy::PolicyLayer         Cedar; deny → PERMISSION_DENIED
//!       ▶ scope::ScopeLayer           (ivs) room outside the allowed regions / accounts → INVALID_ARGUMENT
//!       ▶ moderation::BanCheckLayer   banned user → PERMISSION_DENIED, ErrorInfo USER_BANNED (single Redis
//!                                     node: looked up inside the rate-limit script call instead)
//!       ▶ ratelimit::RateLimitLayer   GCRA per caller / user / room …, and (ivs) the IVS quota per account
//!                                     and region, in ONE store call, in memory or Redis; over →
//!                                     RESOURCE_EXHAUSTED; Redis down + fail_closed → UNAVAILABLE
//!       ▶ issuer                      local (PASETO v4.local) or ivs (aws-sdk-ivschat)
//!   ◀ IssuedToken → CreateChatTokenResponse / IVS JSON, or error::Error → tonic::Status / IvsError (one table)
//!
//! ModerationService takes the same path through its own handler (moderation::ModerationGrpc) and
//! stack::ModerationStack: identity, validation, PolicyLayer, RateLimitLayer, then the moderator (IVS
//! DisconnectUser, or local revocation) and the ban store.
//! ```

pub mod app;
pub mod ban_check;
pub mod config;
pub mod domain;
pub mod door;
pub mod identity;
pub mod issuer;
mod key;
pub mod moderation;
pub mod policy;
pub mod proto;
pub mod ratelimit;
pub mod reload;
pub mod rescue;
pub mod scope;
pub mod server;
pub mod stack;
pub mod store;
pub mod telemetry;
pub mod transport;
