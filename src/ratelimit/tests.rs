use crate::store::StoreError;
use std::{
    collections::HashSet,
    num::{NonZeroU32, NonZeroUsize},
    time::SystemTime,
};

use tonic_types::StatusExt;
use tower::ServiceExt;
use tower_test::mock;

use super::*;
use crate::domain::token::test_request;
use crate::domain::{IssuedToken, Rate};
use crate::store::limits::MemoryStore;

const ROOM: &str = "arn:aws:ivschat:us-west-2:123456789012:room/g1H2I3j4k5L6";
const OTHER_ROOM: &str = "arn:aws:ivschat:us-west-2:123456789012:room/other";

fn limit(name: &str, key: LimitKey, rate: &str, burst: u32) -> Limit {
    Limit {
        name: name.into(),
        key,
        rate: Rate::parse(rate).unwrap(),
        burst: NonZeroU32::new(burst).unwrap(),
        shadow: false,
    }
}

fn shadow(limit: Limit) -> Limit {
    Limit {
        shadow: true,
        ..limit
    }
}

fn request(caller: &str, room: &str, user: &str) -> TokenRequest {
    test_request().caller(caller).room(room).user(user).build()
}

fn user(user: &str) -> TokenRequest {
    request("web", ROOM, user)
}

fn token() -> IssuedToken {
    IssuedToken {
        token_id: None,
        token: "t".into(),
        token_expires_at: SystemTime::UNIX_EPOCH,
        session_expires_at: SystemTime::UNIX_EPOCH,
        chat_endpoint: None,
    }
}

/// What the mock issuer fails with (tower-test does not export a name for it).
type MockError = Box<dyn std::error::Error + Send + Sync>;

fn mock_error(error: MockError) -> Error {
    Error::Internal(error.to_string())
}

type Inner = tower::util::MapErr<mock::Mock<TokenRequest, IssuedToken>, fn(MockError) -> Error>;

/// A rate-limited mock issuer that answers every request that reaches it.
struct Harness<St> {
    service: RateLimit<Inner, St>,
    issuer: mock::Handle<TokenRequest, IssuedToken>,
}

impl Harness<MemoryStore> {
    fn new(limits: Vec<Limit>) -> Self {
        Self::with_store(limits, MemoryStore::new(NonZeroUsize::new(1_000).unwrap()))
    }
}

impl<St: LimiterStore + Clone> Harness<St> {
    fn with_store(limits: Vec<Limit>, store: St) -> Self {
        let (issuer, handle) = mock::pair();
        let issuer: Inner = issuer.map_err(mock_error as fn(_) -> _);
        Harness {
            service: RateLimitLayer::new(limits, store).layer(issuer),
            issuer: handle,
        }
    }

    async fn call(&mut self, request: TokenRequest) -> Result<IssuedToken, Error> {
        let response = self.service.ready().await?.call(request);
        tokio::pin!(response);
        tokio::select! {
            result = &mut response => {
                assert!(
                    self.issuer.poll_request().is_pending(),
                    "a refused request must not reach the issuer"
                );
                result
            }
            Some((_, respond)) = self.issuer.next_request() => {
                respond.send_response(token());
                response.await
            }
        }
    }

    async fn admitted(&mut self, request: TokenRequest) -> bool {
        match self.call(request).await {
            Ok(_) => true,
            Err(Error::RateLimited { .. }) => false,
            Err(other) => panic!("unexpected error {other:?}"),
        }
    }
}

fn refusal(result: Result<IssuedToken, Error>) -> (Vec<ExceededLimit>, Duration) {
    match result {
        Err(Error::RateLimited {
            limits,
            retry_after,
        }) => (limits, retry_after),
        other => panic!("expected a rate-limit refusal, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn admits_within_the_limit_and_refuses_beyond_it_without_calling_the_issuer() {
    let mut harness = Harness::new(vec![limit("per-user", LimitKey::User, "1/s", 2)]);
    assert!(harness.admitted(user("ann")).await);
    assert!(harness.admitted(user("ann")).await);
    let (limits, retry_after) = refusal(harness.call(user("ann")).await);
    assert_eq!(
        limits,
        [ExceededLimit {
            name: "per-user".into(),
            description: "1/s per user per room, burst 2".into(),
        }]
    );
    assert_eq!(retry_after, Duration::from_secs(1));
    assert_eq!(
        harness.service.stats(),
        Stats {
            enforced_rejections: 1,
            shadow_rejections: 0
        }
    );
}

#[tokio::test(start_paused = true)]
async fn shadow_limits_count_would_be_refusals_but_never_refuse() {
    let mut harness = Harness::new(vec![shadow(limit("trial", LimitKey::Caller, "1/s", 1))]);
    for _ in 0..3 {
        assert!(harness.admitted(user("ann")).await);
    }
    assert_eq!(
        harness.service.stats(),
        Stats {
            enforced_rejections: 0,
            shadow_rejections: 2
        }
    );
}

#[tokio::test(start_paused = true)]
async fn a_burst_then_one_request_per_emission_interval() {
    let mut harness = Harness::new(vec![limit("per-caller", LimitKey::Caller, "10/s", 3)]);
    for _ in 0..3 {
        assert!(harness.admitted(user("ann")).await);
    }
    assert!(!harness.admitted(user("ann")).await);
    for _ in 0..5 {
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(harness.admitted(user("ann")).await);
        assert!(!harness.admitted(user("ann")).await);
    }
}

#[tokio::test(start_paused = true)]
async fn retry_info_gives_the_delay_to_the_millisecond() {
    let mut harness = Harness::new(vec![limit("per-user", LimitKey::User, "5/min", 5)]);
    for _ in 0..5 {
        assert!(harness.admitted(user("ann")).await);
    }
    let status = crate::rescue::rescue(harness.call(user("ann")).await.unwrap_err()).into_status();
    let retry = status.get_details_retry_info().expect("RetryInfo");
    assert_eq!(retry.retry_delay, Some(Duration::from_secs(12)));
    assert_eq!(status.metadata().get("retry-after").unwrap(), "12");

    tokio::time::advance(Duration::from_millis(11_999)).await;
    let status = crate::rescue::rescue(harness.call(user("ann")).await.unwrap_err()).into_status();
    let retry = status.get_details_retry_info().expect("RetryInfo");
    assert_eq!(retry.retry_delay, Some(Duration::from_millis(1)));
    assert_eq!(status.metadata().get("retry-after").unwrap(), "1");

    tokio::time::advance(Duration::from_millis(1)).await;
    assert!(harness.admitted(user("ann")).await);
}

#[tokio::test(start_paused = true)]
async fn a_refusal_names_every_exhausted_limit_and_the_longest_wait() {
    let mut harness = Harness::new(vec![
        limit("per-user", LimitKey::User, "1/s", 1),
        limit("per-room", LimitKey::Room, "1/min", 1),
        shadow(limit("trial", LimitKey::Global, "1/h", 1)),
    ]);
    assert!(harness.admitted(user("ann")).await);
    let (limits, retry_after) = refusal(harness.call(user("ann")).await);
    let names: Vec<_> = limits.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(
        names,
        ["per-user", "per-room"],
        "shadow limits never refuse"
    );
    assert_eq!(retry_after, Duration::from_secs(60));
}

#[tokio::test(start_paused = true)]
async fn users_do_not_share_a_per_user_limit() {
    let mut harness = Harness::new(vec![limit("per-user", LimitKey::User, "1/min", 1)]);
    assert!(harness.admitted(user("ann")).await);
    assert!(!harness.admitted(user("ann")).await);
    assert!(harness.admitted(user("bob")).await, "another user");
    assert!(
        harness.admitted(request("web", OTHER_ROOM, "ann")).await,
        "the same user in another room"
    );
}

#[tokio::test(start_paused = true)]
async fn a_refusal_by_one_limit_consumes_nothing_from_another() {
    let mut harness = Harness::new(vec![
        limit("per-caller", LimitKey::Caller, "1/min", 10),
        limit("per-user", LimitKey::User, "1/min", 1),
    ]);
    assert!(harness.admitted(user("ann")).await);
    for _ in 0..20 {
        let (limits, _) = refusal(harness.call(user("ann")).await);
        assert_eq!(limits[0].name, "per-user");
    }
    // The caller spent one of its ten on ann; her twenty refusals cost it nothing.
    for other in 1..10 {
        assert!(harness.admitted(user(&format!("user-{other}"))).await);
    }
    let (limits, _) = refusal(harness.call(user("user-10")).await);
    assert_eq!(limits[0].name, "per-caller");
}

#[tokio::test(start_paused = true)]
async fn limits_with_the_same_key_kind_never_share_state() {
    let mut harness = Harness::new(vec![
        limit("a", LimitKey::Caller, "1/min", 1),
        limit("b", LimitKey::Caller, "1/min", 2),
    ]);
    assert!(harness.admitted(user("ann")).await);
    let (limits, _) = refusal(harness.call(user("ann")).await);
    let names: Vec<_> = limits.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, ["a"], "b has spent one of its two, not two");
}

#[tokio::test(start_paused = true)]
async fn eviction_only_makes_the_limiter_more_lenient() {
    // Room for one key (at most one per shard): tracking bob forgets ann.
    let store = MemoryStore::new(NonZeroUsize::new(1).unwrap());
    let mut harness = Harness::with_store(
        vec![limit("per-user", LimitKey::User, "1/min", 1)],
        store.clone(),
    );
    assert!(harness.admitted(user("ann")).await);
    assert!(!harness.admitted(user("ann")).await);
    assert!(harness.admitted(user("bob")).await);
    assert_eq!(store.len(), 1);
    assert!(
        harness.admitted(user("ann")).await,
        "ann was evicted, so she starts afresh"
    );
}

#[test]
fn store_keys_are_unambiguous() {
    let limits = [
        limit("a", LimitKey::CallerRoom, "1/s", 1),
        limit("a:", LimitKey::CallerRoom, "1/s", 1),
        limit("a", LimitKey::User, "1/s", 1),
        limit("a", LimitKey::Caller, "1/s", 1),
        limit("a", LimitKey::Global, "1/s", 1),
    ];
    let requests = [
        request("x", ROOM, "u"),
        request("x:", ROOM, "u"),
        request("1:x", ROOM, "u"),
        request("x\u{1f}", ROOM, "u"),
        request(&format!("x{}:{ROOM}", ROOM.len()), ROOM, "u"),
        request("x", OTHER_ROOM, "u"),
        request("x", ROOM, "1:u"),
        request("x", ROOM, "u:"),
    ];
    let mut seen = HashSet::new();
    let mut distinct = 0;
    for limit in &limits {
        let keys: HashSet<_> = requests.iter().map(|r| store_key(limit, r)).collect();
        distinct += keys.len();
        seen.extend(keys);
    }
    assert_eq!(seen.len(), distinct, "no two limits share a key");
    let caller_room: HashSet<_> = requests.iter().map(|r| store_key(&limits[0], r)).collect();
    assert_eq!(
        caller_room.len(),
        6,
        "every caller/room pair has its own key"
    );
    let per_user: HashSet<_> = requests.iter().map(|r| store_key(&limits[2], r)).collect();
    assert_eq!(per_user.len(), 4, "every room/user pair has its own key");
}

/// A store that always answers the same.
#[derive(Clone)]
struct FixedStore(fn() -> Result<Vec<Verdict>, StoreError>);

impl LimiterStore for FixedStore {
    async fn check(&self, _: &[Check]) -> Result<Vec<Verdict>, StoreError> {
        (self.0)()
    }
}

#[tokio::test]
async fn an_unavailable_store_refuses_the_request_as_unavailable() {
    let down = FixedStore(|| {
        Err(StoreError::Unavailable {
            retry_after: Duration::from_secs(1),
        })
    });
    let mut harness = Harness::with_store(vec![limit("l", LimitKey::Global, "1/s", 1)], down);
    let Err(Error::LimiterUnavailable { retry_after }) = harness.call(user("ann")).await else {
        panic!("expected the limiter to be unavailable");
    };
    assert_eq!(retry_after, Duration::from_secs(1));

    let confused = FixedStore(|| Ok(Vec::new()));
    let mut harness = Harness::with_store(vec![limit("l", LimitKey::Global, "1/s", 1)], confused);
    assert!(matches!(
        harness.call(user("ann")).await,
        Err(Error::Internal(_))
    ));
}
