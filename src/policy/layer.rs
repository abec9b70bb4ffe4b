//! The policy layer: asks the [`PolicyEngine`] about each request before the inner service sees it.
//!
//! A denied request is answered at once with [`Error::PolicyDenied`] and never reaches the rate limiter or
//! the issuer. In shadow mode the decision is logged and counted, and the request goes on anyway: the way
//! to try a new policy on live traffic.
//!
//! ```
//! use std::sync::Arc;
//! use chat_token_service::policy::{PolicyEngine, PolicyLayer, PolicySource};
//! let engine = Arc::new(PolicyEngine::load(PolicySource::Development).unwrap());
//! let layer = PolicyLayer::new(engine, false); // tower::ServiceBuilder::new().layer(layer).service(issuer)
//! ```

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
};

use opentelemetry::KeyValue;
use pin_project_lite::pin_project;

use super::{Authorize, PolicyEngine};
use crate::domain::Error;
use crate::telemetry::{metrics::metrics, trace_only_span};

/// Applies policy decisions to the service it wraps.
#[derive(Clone)]
pub struct PolicyLayer {
    engine: Arc<PolicyEngine>,
    shadow: bool,
    stats: Arc<PolicyStats>,
}

/// This layer's decision counts since start-up, readable in-process (tests, embedders); the process-wide
/// view is the `cts.policy.decisions` metric.
#[derive(Debug, Default)]
pub struct PolicyStats {
    /// Requests denied (and refused).
    pub denied: AtomicU64,
    /// Requests that would have been denied, let through by shadow mode.
    pub shadow_denied: AtomicU64,
}

impl PolicyLayer {
    /// Enforces `engine`'s decisions, or with `shadow` only logs and counts denials.
    pub fn new(engine: Arc<PolicyEngine>, shadow: bool) -> Self {
        PolicyLayer {
            engine,
            shadow,
            stats: Arc::default(),
        }
    }

    /// The counts of this layer's decisions.
    pub fn stats(&self) -> Arc<PolicyStats> {
        self.stats.clone()
    }
}

impl<S> tower::Layer<S> for PolicyLayer {
    type Service = Policy<S>;

    fn layer(&self, inner: S) -> Policy<S> {
        Policy {
            inner,
            layer: self.clone(),
        }
    }
}

/// See [`PolicyLayer`].
#[derive(Clone)]
pub struct Policy<S> {
    inner: S,
    layer: PolicyLayer,
}

impl<S, R> tower::Service<R> for Policy<S>
where
    R: Authorize,
    S: tower::Service<R, Error = Error>,
{
    type Response = S::Response;
    type Error = Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: R) -> Self::Future {
        let span = trace_only_span(|| {
            tracing::info_span!(
                "policy.evaluate",
                policy.action = request.action().as_str(),
                policy.decision = tracing::field::Empty,
                policy.ids = tracing::field::Empty,
            )
        });
        let evaluated = span.in_scope(|| self.layer.engine.decide(&request, !span.is_disabled()));
        let decision = match evaluated {
            Ok(decision) => decision,
            Err(error) => return ResponseFuture::rejected(error),
        };
        let outcome = match (decision.allowed, self.layer.shadow) {
            (true, _) => "allow",
            (false, true) => "shadow_deny",
            (false, false) => "deny",
        };
        if !span.is_disabled() {
            span.record("policy.decision", outcome);
            span.record("policy.ids", decision.policy_ids.join(",").as_str());
        }
        metrics()
            .policy_decisions
            .add(1, &[KeyValue::new("decision", outcome)]);
        if !decision.allowed {
            if self.layer.shadow {
                self.layer
                    .stats
                    .shadow_denied
                    .fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    caller = %request.caller(),
                    room = %request.room(),
                    action = request.action().as_str(),
                    policy_ids = ?decision.policy_ids,
                    "policy would deny (shadow mode): allowed"
                );
            } else {
                self.layer.stats.denied.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    caller = %request.caller(),
                    room = %request.room(),
                    action = request.action().as_str(),
                    policy_ids = ?decision.policy_ids,
                    "policy denied"
                );
                return ResponseFuture::rejected(Error::PolicyDenied {
                    policy_ids: decision.policy_ids,
                });
            }
        }
        ResponseFuture {
            state: State::Called {
                future: self.inner.call(request),
            },
        }
    }
}

pin_project! {
    /// Either the inner service's future or an immediate rejection.
    pub struct ResponseFuture<F> {
        #[pin]
        state: State<F>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Called { #[pin] future: F },
        Rejected { error: Option<Error> },
    }
}

impl<F> ResponseFuture<F> {
    fn rejected(error: Error) -> Self {
        ResponseFuture {
            state: State::Rejected { error: Some(error) },
        }
    }
}

impl<F, T> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, Error>>,
{
    type Output = Result<T, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Called { future } => future.poll(cx),
            StateProj::Rejected { error } => {
                Poll::Ready(Err(error.take().expect("polled after completion")))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::TokenRequest;
    use crate::domain::token::test_request;
    use crate::policy::PolicySource;
    use tower::{Layer, ServiceExt};
    use tower_test::{assert_request_eq, mock};

    const POLICY: &str =
        r#"@id("permit-web") permit (principal == Caller::"web", action, resource);"#;

    fn engine() -> (tempfile::TempDir, Arc<PolicyEngine>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.cedar");
        std::fs::write(&path, POLICY).unwrap();
        let engine = PolicyEngine::load(PolicySource::Files {
            policies: vec![path],
            entities: None,
        })
        .unwrap();
        (dir, Arc::new(engine))
    }

    fn request(caller: &str) -> TokenRequest {
        test_request().caller(caller).build()
    }

    type MockIssuer = tower::util::MapErr<
        mock::Mock<TokenRequest, &'static str>,
        fn(Box<dyn std::error::Error + Send + Sync>) -> Error,
    >;

    /// The layer over a mock inner service, and the mock's handle.
    fn layered(
        shadow: bool,
    ) -> (
        tempfile::TempDir,
        Arc<PolicyStats>,
        Policy<MockIssuer>,
        mock::Handle<TokenRequest, &'static str>,
    ) {
        let (dir, engine) = engine();
        let (inner, mut handle) = mock::pair::<TokenRequest, &'static str>();
        handle.allow(1);
        let layer = PolicyLayer::new(engine, shadow);
        let inner: MockIssuer = inner.map_err(|e| Error::Internal(e.to_string()));
        (dir, layer.stats(), layer.layer(inner), handle)
    }

    #[tokio::test]
    async fn allowed_requests_reach_the_inner_service() {
        let (_dir, stats, service, mut handle) = layered(false);
        let call = tokio::spawn(service.oneshot(request("web")));
        assert_request_eq!(handle, request("web")).send_response("issued");
        assert_eq!(call.await.unwrap().unwrap(), "issued");
        assert_eq!(stats.denied.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn denied_requests_never_reach_the_inner_service() {
        let (_dir, stats, service, mut handle) = layered(false);
        let result = service.oneshot(request("intruder")).await;
        let Err(Error::PolicyDenied { policy_ids }) = result else {
            panic!("expected a policy denial, got {result:?}");
        };
        assert!(
            policy_ids.is_empty(),
            "nothing permitted it: {policy_ids:?}"
        );
        assert_eq!(stats.denied.load(Ordering::Relaxed), 1);
        // The service is gone; had it forwarded anything, the mock would hold it.
        assert!(handle.next_request().await.is_none());
    }

    #[tokio::test]
    async fn shadow_mode_counts_the_denial_and_lets_the_request_through() {
        let (_dir, stats, service, mut handle) = layered(true);
        let call = tokio::spawn(service.oneshot(request("intruder")));
        assert_request_eq!(handle, request("intruder")).send_response("issued");
        assert_eq!(call.await.unwrap().unwrap(), "issued");
        assert_eq!(stats.shadow_denied.load(Ordering::Relaxed), 1);
        assert_eq!(stats.denied.load(Ordering::Relaxed), 0);
    }
}
