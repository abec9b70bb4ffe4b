//! The gRPC handler: proto in, domain stack, proto out. No business rules live here.

use std::{fmt, time::Duration};

use tonic::{Request, Response, Status, metadata::MetadataMap};
use tower::ServiceExt;

use crate::domain::{Caller, CallerSource, Error, IssuedToken, TokenRequest};
use crate::identity::Resolver;
use crate::proto::ivschat::v1::{
    CreateChatTokenRequest, CreateChatTokenResponse, token_service_server,
};
use crate::stack::TokenStack;
use crate::transport::{inflight::CallStarted, listener::peer_certs};

/// What both front doors (gRPC here, the IVS Chat HTTP API in [`crate::rest`]) share: one identity
/// resolver, one domain stack, one audit trail. A request gets the same decision and the same audit event
/// whichever protocol carried it.
#[derive(Clone)]
pub struct Door {
    identity: Resolver,
    /// The issuer's name, for audit events.
    issuer: &'static str,
    stack: TokenStack,
}

impl Door {
    /// A door that identifies callers with `identity` and sends every valid request through `stack`,
    /// whose issuer is called `issuer` in audit events.
    pub fn new(identity: Resolver, issuer: &'static str, stack: TokenStack) -> Self {
        Door {
            identity,
            issuer,
            stack,
        }
    }

    /// Who is calling.
    pub fn identity(&self) -> &Resolver {
        &self.identity
    }

    /// Records the refusal of a request that never became a [`TokenRequest`] (no identity, or invalid),
    /// and hands the error back.
    pub fn refuse(&self, caller: Option<&Caller>, error: Error) -> Error {
        match caller {
            Some(caller) => {
                tracing::info!(target: "audit", caller = %caller, outcome = error.outcome(), "token refused")
            }
            None => tracing::info!(target: "audit", outcome = error.outcome(), "token refused"),
        }
        error
    }

    /// Sends `request` through the domain stack and records the decision. With a `deadline`, gives up at
    /// that instant with [`Error::DeadlineExceeded`], cancelling any upstream call in flight.
    pub async fn issue(
        &self,
        request: TokenRequest,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<IssuedToken, Error> {
        // What the decision was about: never the user id or attribute values.
        let audit = tracing::info_span!(
            target: "audit",
            "audit",
            caller = %request.caller,
            caller_source = request.caller.source().map(CallerSource::name),
            room = %request.room,
            capabilities = ?request.capabilities.ivs_names(),
            session_minutes = request.session_duration().minutes(),
            issuer = self.issuer,
        );
        let issuing = self.stack.clone().oneshot(request);
        let issued = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, issuing)
                .await
                .unwrap_or(Err(Error::DeadlineExceeded)),
            None => issuing.await,
        };
        audit.in_scope(|| match &issued {
            Ok(token) => tracing::info!(
                target: "audit",
                outcome = "issued",
                token_id_hash = %short_hash(token.token_id.as_deref().unwrap_or(&token.token)),
                "token issued"
            ),
            Err(error) => {
                tracing::info!(target: "audit", outcome = error.outcome(), "token refused")
            }
        });
        issued
    }
}

/// Serves `ivschat.v1.TokenService` on top of the domain stack.
#[derive(Clone)]
pub struct TokenService {
    door: Door,
}

impl TokenService {
    /// A handler that passes every call through `door`.
    pub fn new(door: Door) -> Self {
        TokenService { door }
    }
}

#[tonic::async_trait]
impl token_service_server::TokenService for TokenService {
    async fn create_chat_token(
        &self,
        request: Request<CreateChatTokenRequest>,
    ) -> Result<Response<CreateChatTokenResponse>, Status> {
        let door = &self.door;
        let caller = door
            .identity()
            .resolve(
                request.metadata().as_ref(),
                peer_certs(request.extensions()),
            )
            .map_err(|error| door.refuse(None, error))?;
        // Answer DEADLINE_EXCEEDED just before tonic's own timer (started when the call arrived) would
        // answer CANCELLED.
        let deadline = grpc_timeout(request.metadata()).map(|timeout| {
            let started = request
                .extensions()
                .get::<CallStarted>()
                .map_or_else(tokio::time::Instant::now, |started| started.0);
            started + timeout.saturating_sub(DEADLINE_MARGIN)
        });
        let request = TokenRequest::from_proto(caller.clone(), request.into_inner())
            .map_err(|error| door.refuse(Some(&caller), error))?;
        let issued = door.issue(request, deadline).await?;
        Ok(Response::new(to_proto(issued)))
    }
}

/// The first 12 hex digits of SHA-256: enough to correlate a token across logs, useless to a thief.
pub(crate) fn short_hash(value: &str) -> ShortHash {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = ring::digest::digest(&ring::digest::SHA256, value.as_bytes());
    let mut digits = [0; 12];
    for (pair, byte) in digits.chunks_exact_mut(2).zip(digest.as_ref()) {
        pair[0] = HEX[usize::from(byte >> 4)];
        pair[1] = HEX[usize::from(byte & 0xf)];
    }
    ShortHash(digits)
}

/// See [`short_hash`]: its digits, displayed without allocating.
pub(crate) struct ShortHash([u8; 12]);

impl fmt::Display for ShortHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(std::str::from_utf8(&self.0).expect("hex digits are ASCII"))
    }
}

/// How much earlier than the caller's deadline we give up, so our DEADLINE_EXCEEDED is certain to come
/// before tonic's CANCELLED. (tonic polls the call before its timer, so equal deadlines would do; the
/// margin absorbs the microseconds between its timer starting and [`CallStarted`] being taken.)
pub(crate) const DEADLINE_MARGIN: Duration = Duration::from_millis(5);

/// The caller's deadline from `grpc-timeout`: up to 8 digits and a unit (H, M, S, m, u, n), as the gRPC
/// HTTP/2 protocol defines it. Malformed values are ignored, as tonic ignores them.
pub(crate) fn grpc_timeout(metadata: &MetadataMap) -> Option<Duration> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

fn to_proto(issued: IssuedToken) -> CreateChatTokenResponse {
    CreateChatTokenResponse {
        token: issued.token,
        token_expiration_time: Some(issued.token_expires_at.into()),
        session_expiration_time: Some(issued.session_expires_at.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::issuer::Issuer;
    use crate::proto::ivschat::v1::token_service_server::TokenService as _;

    /// An issuer that never answers: a hung upstream.
    struct Hung;

    impl Issuer for Hung {
        const NAME: &'static str = "hung";

        async fn issue(&self, _: TokenRequest) -> Result<IssuedToken, Error> {
            std::future::pending().await
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_past_the_callers_deadline_is_answered_deadline_exceeded_before_it() {
        let app = crate::app::build_around(&Config::default(), Hung)
            .await
            .unwrap();
        let service = TokenService::new(app.door);
        let mut request = Request::new(CreateChatTokenRequest {
            room_identifier: "arn:aws:ivschat:us-west-2:123456789012:room/abc".into(),
            user_id: "u".into(),
            ..Default::default()
        });
        request
            .metadata_mut()
            .insert("grpc-timeout", "300m".parse().unwrap());
        let arrived = tokio::time::Instant::now();
        request.extensions_mut().insert(CallStarted(arrived));

        let status = service.create_chat_token(request).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
        // Answered before tonic's own timer (at 300 ms) would answer CANCELLED.
        assert_eq!(
            arrived.elapsed(),
            Duration::from_millis(300) - DEADLINE_MARGIN
        );
    }

    fn timeout(value: &str) -> Option<Duration> {
        let mut metadata = MetadataMap::new();
        metadata.insert("grpc-timeout", value.parse().unwrap());
        grpc_timeout(&metadata)
    }

    #[test]
    fn short_hash_is_the_first_12_hex_digits_of_sha_256() {
        // SHA-256("abc") = ba7816bf8f01cfea…
        assert_eq!(short_hash("abc").to_string(), "ba7816bf8f01");
    }

    #[test]
    fn grpc_timeout_units() {
        assert_eq!(timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(timeout("3M"), Some(Duration::from_secs(180)));
        assert_eq!(timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(
            timeout("99999999u"),
            Some(Duration::from_micros(99_999_999))
        );
        assert_eq!(timeout("7n"), Some(Duration::from_nanos(7)));
    }

    #[test]
    fn malformed_grpc_timeouts_are_ignored() {
        for bad in ["", "S", "123456789S", "5s", "-5S", "5", "x5S"] {
            assert_eq!(timeout(bad), None, "{bad:?}");
        }
        assert_eq!(grpc_timeout(&MetadataMap::new()), None);
    }
}
