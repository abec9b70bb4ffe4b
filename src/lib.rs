//! chat-token-service: a gRPC service that mints Amazon IVS Chat tokens for internal callers.
//!
//! Callers ask `ivschat.v1.TokenService/CreateChatToken` for a token for one user in one room; the request
//! and response mirror IVS Chat's own CreateChatToken API field for field and enforce the same limits.
//! `ivschat.v1.ModerationService` disconnects, bans and verifies; `ivschat.v1.MessagingService` sends events
//! and deletes messages (IVS Chat's SendEvent and DeleteMessage); IVS Chat's own REST-JSON API is served on
//! the same port for the AWS CLI and SDKs.
//!
//! # Layout
//! Every module has a layer and imports only from lower layers, or from within its own folder without
//! cycles; `.ci/layers.py` checks this (CI runs it) from the same table.
//! ```text
//! L9  server          run(listener, App, shutdown): routes, health, reflection, the drain
//! L8  app             THE composition root: Config → stores, policy, keys, issuers, identity, TLS,
//!                     file watchers, stacks, doors; `check` (--check-config) loads the same files
//! L7  door            the front doors, thin: identity → validation → stack within the deadline → audit,
//!                     shared by grpc (proto ⇄ domain) and rest (IVS JSON ⇄ domain)
//! L6  stack           the one place the layers are composed, one why-comment per layer
//! L5  moderation      the innermost moderation service (moderator + ban store)
//! L4  identity policy scope ban_check ratelimit issuer transport
//!                     the building blocks: tower layers, issuers and moderators, the connection layer
//! L3  store           state backends: one Backend (memory | redis), the limit and moderation stores,
//!                     one shared Redis connection with its timeout, failure mode and probe
//! L2  config          data only: the settings, parsed into typed values at load
//! L1  rescue          THE error table: one classification, rendered as a gRPC status or an IVS error
//!     telemetry key reload secret_file
//! L0  domain          the vocabulary (caller, room, token, moderation, action, limit, error, secret);
//!     proto           the generated wire types, for door, transport and server only
//!     pem             certificates and keys for rustls, read naming their setting (a leaf)
//! ```
//!
//! # Request flow
//! ```text
//! client ──TCP──▶ transport::listener   connection cap, TLS handshake cap and timeout, preface and idle
//!                                       timeouts, accept backoff
//!   ──HTTP/2 or HTTP/1.1 (TLS / mTLS)──▶ tonic server (health, reflection, 64 KiB message cap)
//!   ▶ transport::trace              the call's span and duration; W3C trace context in
//!   ▶ transport::inflight           counts calls (graceful drain); a token call whose message has arrived
//!                                   while the cap is full is shed: UNAVAILABLE
//!   ▶ door::grpc / door::rest       proto or IVS JSON ⇄ domain, through the shared door:
//!                                   identity::Resolver → Caller, or UNAUTHENTICATED
//!                                   validation → domain::TokenRequest, or INVALID_ARGUMENT
//!                                   identity::end_user: the end user's own token (x-end-user-token), when
//!                                   forwarded, verified and bound: user_id must be its user
//!                                   (UNAUTHENTICATED / PERMISSION_DENIED / UNAVAILABLE otherwise)
//!                                   the caller's deadline → DEADLINE_EXCEEDED; one audit event
//!   ▶ stack::tokens                 tower::Service<TokenRequest, Response = IssuedToken>
//!       ▶ policy::PolicyLayer         Cedar; deny → PERMISSION_DENIED
//!       ▶ scope::ScopeLayer           (ivs) room outside the allowed regions / accounts → INVALID_ARGUMENT
//!       ▶ ban_check::BanCheckLayer    banned user → PERMISSION_DENIED, ErrorInfo USER_BANNED (single Redis
//!                                     node: looked up inside the rate-limit script call instead)
//!       ▶ ratelimit::RateLimitLayer   GCRA per caller / user / room …, and (ivs) the IVS quota per account
//!                                     and region, in ONE store call; over → RESOURCE_EXHAUSTED; Redis down
//!                                     + fail_closed → UNAVAILABLE
//!       ▶ issuer                      local (PASETO v4.local) or ivs (aws-sdk-ivschat)
//!   ◀ IssuedToken → proto or IVS JSON; domain::Error → rescue → gRPC status or IVS error shape
//!
//! ModerationService takes the same path through door::ModerationDoor and stack::moderation: identity,
//! validation, PolicyLayer, RateLimitLayer, then moderation::ModerationService (the issuer's moderator: IVS
//! DisconnectUser, or local revocation; and the ban store).
//!
//! MessagingService takes it through door::MessagingDoor and stack::messaging: identity, validation,
//! PolicyLayer, ScopeLayer (ivs), a RateLimitLayer per action (the configured limits and, with ivs, that
//! action's IVS quota guard), then issuer::MessengerService (IVS SendEvent / DeleteMessage, or the local
//! issuer's signed webhook); with the local issuer and no webhook the door refuses at once
//! (FAILED_PRECONDITION).
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
pub mod pem;
pub mod policy;
pub mod proto;
pub mod ratelimit;
pub mod reload;
pub mod rescue;
pub mod scope;
mod secret_file;
pub mod server;
pub mod stack;
pub mod store;
pub mod telemetry;
pub mod transport;
