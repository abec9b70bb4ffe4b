//! End-user binding end to end: a test identity provider on loopback (discovery and a JWK set, keys made
//! here), the server on a real socket, a real tonic client forwarding the end user's token in
//! `x-end-user-token`. Every refusal is checked for its code, its ErrorInfo reason and cause, with a
//! positive control beside it.

mod common;

use std::{collections::BTreeMap, time::Duration};

use chat_token_service::{
    config::{Config, EndUserIssuer, JwtAlgorithm},
    proto::ivschat::v1::{CreateChatTokenRequest, CreateChatTokenResponse},
};
use common::{
    ACCOUNT_111_ROOM, LocalKeys, TestServer, WEB_GATEWAY,
    idp::{Idp, TestKey, claims, now, signing_input},
    production_policy,
};
use serde_json::{Value, json};
use tonic::{Code, Request, Status};
use tonic_types::StatusExt;

const AUDIENCE: &str = "chat-app";
const HEADER: &str = "x-end-user-token";

/// The issuer of `idp` as the service trusts it: ID tokens for `chat-app`, user ids `oidc|{sub}`, the
/// `name` claim as the `displayName` attribute.
fn trusted(issuer: &str) -> EndUserIssuer {
    EndUserIssuer {
        issuer: issuer.into(),
        audiences: vec![AUDIENCE.into()],
        jwks_url: None,
        jwks_file: None,
        algorithms: vec![
            JwtAlgorithm::RS256,
            JwtAlgorithm::ES256,
            JwtAlgorithm::EdDSA,
        ],
        user_id_claim: "sub".into(),
        user_id_template: Some("oidc|{sub}".into()),
        max_token_age: None,
        attributes: BTreeMap::from([("displayName".into(), "name".into())]),
    }
}

/// The local issuer, trusting `idp`, fetching at most once a second.
fn config(keys: &LocalKeys, idp: &Idp) -> Config {
    let mut config = keys.config();
    config.end_user.issuers = vec![trusted(&idp.issuer)];
    config.end_user.jwks_min_refresh_interval = Duration::from_secs(1);
    config
}

/// A CreateChatToken call for `user` in account 111's room, from `caller`, forwarding `token`.
fn call(
    caller: &str,
    user: &str,
    capabilities: Vec<i32>,
    token: Option<&str>,
) -> Request<CreateChatTokenRequest> {
    let mut request = Request::new(CreateChatTokenRequest {
        room_identifier: ACCOUNT_111_ROOM.into(),
        user_id: user.into(),
        capabilities,
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("x-caller-id", caller.parse().unwrap());
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert(HEADER, token.parse().unwrap());
    }
    request
}

async fn mint(
    server: &TestServer,
    request: Request<CreateChatTokenRequest>,
) -> Result<CreateChatTokenResponse, Status> {
    server
        .client()
        .await
        .create_chat_token(request)
        .await
        .map(|r| r.into_inner())
}

/// Asserts `status` is `code` with ErrorInfo `reason`, and, when given, metadata `cause`.
fn assert_refused(status: &Status, code: Code, reason: &str, cause: Option<&str>) {
    assert_eq!(status.code(), code, "{status:?}");
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, reason, "{status:?}");
    assert_eq!(
        info.metadata.get("cause").map(String::as_str),
        cause,
        "{status:?}"
    );
}

fn invalid(status: &Status, cause: &str) {
    assert_refused(
        status,
        Code::Unauthenticated,
        "END_USER_TOKEN_INVALID",
        Some(cause),
    );
}

/// `claims` with `changes` applied.
fn with(mut claims: Value, changes: Value) -> Value {
    for (name, value) in changes.as_object().unwrap() {
        claims[name] = value.clone();
    }
    claims
}

#[tokio::test]
async fn a_valid_token_binds_the_user_and_every_bad_one_is_refused_with_its_cause() {
    let rsa = TestKey::rsa("rsa-1");
    let idp = Idp::start(&[&rsa]).await;
    let keys = LocalKeys::new();
    let server = TestServer::from_config(config(&keys, &idp)).await;
    let alice = with(
        claims(&idp.issuer, AUDIENCE, "alice"),
        json!({"name": "Alice"}),
    );

    // Binds: the token's user, its name as the display name, whatever the caller sent for it.
    let mut request = call("web", "oidc|alice", vec![], Some(&rsa.sign(&alice)));
    request
        .get_mut()
        .attributes
        .insert("displayName".into(), "Mallory".into());
    let minted = mint(&server, request).await.expect("a valid token binds");
    let granted = keys.keys.verify(&minted.token).unwrap();
    assert_eq!(granted.user_id.expose(), "oidc|alice");
    assert_eq!(granted.attributes.expose()["displayName"], "Alice");

    // A user id other than the token's.
    let status = mint(
        &server,
        call("web", "oidc|bob", vec![], Some(&rsa.sign(&alice))),
    )
    .await
    .unwrap_err();
    assert_refused(&status, Code::PermissionDenied, "END_USER_MISMATCH", None);

    let t = now();
    for (cause, token) in [
        (
            "audience",
            rsa.sign(&with(alice.clone(), json!({"aud": "another-app"}))),
        ),
        (
            "issuer",
            rsa.sign(&with(alice.clone(), json!({"iss": "https://evil.example"}))),
        ),
        // Past the 30 s leeway either way.
        (
            "expired",
            rsa.sign(&with(alice.clone(), json!({"exp": t - 60}))),
        ),
        (
            "not_yet_valid",
            rsa.sign(&with(alice.clone(), json!({"nbf": t + 120}))),
        ),
        (
            "not_yet_valid",
            rsa.sign(&with(alice.clone(), json!({"iat": t + 120}))),
        ),
        // `alg: none`, signed by nothing.
        (
            "algorithm",
            format!(
                "{}.",
                signing_input(&json!({"alg": "none", "kid": "rsa-1"}), &alice)
            ),
        ),
        // HS256 with the RSA public key as the HMAC secret: algorithm confusion.
        ("algorithm", {
            let input = signing_input(&json!({"alg": "HS256", "kid": "rsa-1"}), &alice);
            let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &rsa.public_bytes());
            let mac = ring::hmac::sign(&key, input.as_bytes());
            format!("{input}.{}", b64(mac.as_ref()))
        }),
        // The payload changed after signing: Alice's signature on Mallory's claims.
        ("signature", {
            let genuine = rsa.sign(&alice);
            let signature = genuine.rsplit('.').next().unwrap();
            let forged = signing_input(
                &json!({"alg": "RS256", "kid": "rsa-1", "typ": "JWT"}),
                &with(alice.clone(), json!({"sub": "mallory"})),
            );
            format!("{forged}.{signature}")
        }),
        ("malformed", "not-a-jwt".into()),
        (
            "claim",
            rsa.sign(&with(alice.clone(), json!({"sub": "x".repeat(130)}))),
        ),
    ] {
        let status = mint(&server, call("web", "oidc|alice", vec![], Some(&token)))
            .await
            .unwrap_err();
        invalid(&status, cause);
    }

    // The header twice: which one counts is not guessed.
    let mut twice = call("web", "oidc|alice", vec![], Some(&rsa.sign(&alice)));
    twice
        .metadata_mut()
        .append(HEADER, rsa.sign(&alice).parse().unwrap());
    invalid(&mint(&server, twice).await.unwrap_err(), "repeated");

    // Without the header, the request is not bound (policy decides; here the development policy).
    let unbound = mint(&server, call("web", "oidc|bob", vec![], None)).await;
    assert!(unbound.is_ok(), "{unbound:?}");
}

#[tokio::test]
async fn es256_and_eddsa_tokens_bind_and_the_chat_endpoint_comes_with_the_token() {
    let (es, ed) = (TestKey::es256("ec-1"), TestKey::ed25519("ed-1"));
    let idp = Idp::start(&[&es, &ed]).await;
    let keys = LocalKeys::new();
    let mut config = config(&keys, &idp);
    config.local_issuer.chat_endpoint =
        Some(chat_token_service::config::ChatEndpoint::parse("wss://chat.example.com/ws").unwrap());
    let server = TestServer::from_config(config).await;
    for key in [&es, &ed] {
        let token = key.sign(&claims(&idp.issuer, AUDIENCE, "carol"));
        let minted = mint(&server, call("web", "oidc|carol", vec![], Some(&token)))
            .await
            .unwrap_or_else(|e| panic!("{}: {e:?}", key.alg));
        assert_eq!(minted.chat_endpoint, "wss://chat.example.com/ws");
    }
    // An issuer restricted to RS256 refuses the others' algorithms.
    let mut only_rsa = config_for_algorithms(&keys, &idp, vec![JwtAlgorithm::RS256]);
    only_rsa.local_issuer.chat_endpoint = None;
    let server = TestServer::from_config(only_rsa).await;
    let token = es.sign(&claims(&idp.issuer, AUDIENCE, "carol"));
    invalid(
        &mint(&server, call("web", "oidc|carol", vec![], Some(&token)))
            .await
            .unwrap_err(),
        "algorithm",
    );
}

fn config_for_algorithms(keys: &LocalKeys, idp: &Idp, algorithms: Vec<JwtAlgorithm>) -> Config {
    let mut config = config(keys, idp);
    config.end_user.issuers[0].algorithms = algorithms;
    config
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Calls until `request()` succeeds, for at most 10 s.
async fn eventually_minted(
    server: &TestServer,
    request: impl Fn() -> Request<CreateChatTokenRequest>,
) -> CreateChatTokenResponse {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match mint(server, request()).await {
            Ok(minted) => return minted,
            Err(status) if tokio::time::Instant::now() < deadline => {
                invalid(&status, "unknown_key");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(status) => panic!("still refused after 10 s: {status:?}"),
        }
    }
}

#[tokio::test]
async fn an_unknown_key_is_refetched_at_most_once_a_second_and_found_after_rotation() {
    let (old, new) = (TestKey::es256("2024"), TestKey::es256("2025"));
    let idp = Idp::start(&[&old]).await;
    let keys = LocalKeys::new();
    let server = TestServer::from_config(config(&keys, &idp)).await;
    let dave = claims(&idp.issuer, AUDIENCE, "dave");
    mint(
        &server,
        call("web", "oidc|dave", vec![], Some(&old.sign(&dave))),
    )
    .await
    .expect("the published key verifies");
    let fetched = idp.jwks_fetches();
    assert_eq!(fetched, 1, "fetched once, for the first token");

    // A flood of made-up key ids: refused, and the provider is asked at most once per interval (1 s).
    let flood = std::time::Instant::now();
    for i in 0..20 {
        let stranger = TestKey::es256(&format!("made-up-{i}"));
        invalid(
            &mint(
                &server,
                call("web", "oidc|dave", vec![], Some(&stranger.sign(&dave))),
            )
            .await
            .unwrap_err(),
            "unknown_key",
        );
    }
    let allowed = 1 + flood.elapsed().as_secs() as usize;
    assert!(
        idp.jwks_fetches() - fetched <= allowed,
        "{} fetches for 20 unknown keys in {:?}",
        idp.jwks_fetches() - fetched,
        flood.elapsed()
    );

    // The provider rotates: the new key is found once the interval has passed.
    idp.publish(&[&old, &new]);
    let token = new.sign(&dave);
    eventually_minted(&server, || call("web", "oidc|dave", vec![], Some(&token))).await;

    // The provider goes down: the keys already fetched keep working.
    idp.set_up(false);
    mint(
        &server,
        call("web", "oidc|dave", vec![], Some(&old.sign(&dave))),
    )
    .await
    .expect("cached keys verify while the provider is down");
}

#[tokio::test]
async fn without_keys_a_token_is_unavailable_never_accepted() {
    let rsa = TestKey::es256("k");
    let idp = Idp::start(&[&rsa]).await;
    idp.set_up(false);
    let keys = LocalKeys::new();
    let server = TestServer::from_config(config(&keys, &idp)).await;
    let token = rsa.sign(&claims(&idp.issuer, AUDIENCE, "erin"));
    let status = mint(&server, call("web", "oidc|erin", vec![], Some(&token)))
        .await
        .unwrap_err();
    assert_refused(
        &status,
        Code::Unavailable,
        "END_USER_KEYS_UNAVAILABLE",
        None,
    );
    assert!(status.get_details_retry_info().is_some(), "{status:?}");

    // Back up: the next fetch (at most a second later) lets the token through.
    idp.set_up(true);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match mint(&server, call("web", "oidc|erin", vec![], Some(&token))).await {
            Ok(_) => break,
            Err(status) if tokio::time::Instant::now() < deadline => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(status) => panic!("still refused after 10 s: {status:?}"),
        }
    }
}

#[tokio::test]
async fn the_production_policy_requires_binding_for_end_user_facing_callers() {
    let rsa = TestKey::rsa("rsa-1");
    let idp = Idp::start(&[&rsa]).await;
    let keys = LocalKeys::new();
    let mut config = config(&keys, &idp);
    production_policy(&mut config);
    let server = TestServer::from_config(config).await;
    let frank = claims(&idp.issuer, AUDIENCE, "frank");

    // No end-user token: refused by policy.
    let status = mint(&server, call(WEB_GATEWAY, "oidc|frank", vec![], None))
        .await
        .unwrap_err();
    assert_refused(&status, Code::PermissionDenied, "POLICY_DENIED", None);
    assert_eq!(
        status.get_details_error_info().unwrap().metadata["policy_ids"],
        "end-user-facing-requires-binding"
    );
    // Bound: allowed.
    mint(
        &server,
        call(WEB_GATEWAY, "oidc|frank", vec![1], Some(&rsa.sign(&frank))),
    )
    .await
    .expect("a bound request from the gateway");

    // DELETE_MESSAGE (3) only for end users in the identity provider's moderators group.
    let status = mint(
        &server,
        call(WEB_GATEWAY, "oidc|frank", vec![3], Some(&rsa.sign(&frank))),
    )
    .await
    .unwrap_err();
    assert_eq!(
        status.get_details_error_info().unwrap().metadata["policy_ids"],
        "end-user-moderation-only-for-idp-moderators"
    );
    let moderator = with(frank.clone(), json!({"groups": ["viewers", "moderators"]}));
    mint(
        &server,
        call(
            WEB_GATEWAY,
            "oidc|frank",
            vec![3],
            Some(&rsa.sign(&moderator)),
        ),
    )
    .await
    .expect("an end user in the moderators group");
    // A group claim of the wrong shape is refused, not dropped.
    let odd = with(frank, json!({"groups": [{"name": "moderators"}]}));
    invalid(
        &mint(
            &server,
            call(WEB_GATEWAY, "oidc|frank", vec![3], Some(&rsa.sign(&odd))),
        )
        .await
        .unwrap_err(),
        "claim",
    );
}

#[tokio::test]
async fn a_jwk_set_file_is_reloaded_when_it_changes() {
    let (old, new) = (TestKey::ed25519("old"), TestKey::ed25519("new"));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("jwks.json");
    let write = |keys: &[&TestKey]| {
        let jwks = json!({"keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>()});
        std::fs::write(&file, jwks.to_string()).unwrap();
    };
    write(&[&old]);
    let keys = LocalKeys::new();
    let mut config = keys.config();
    config.reload_interval = Duration::from_millis(100);
    let mut issuer = trusted("https://id.example.com");
    issuer.jwks_file = Some(file.clone());
    config.end_user.issuers = vec![issuer];
    let server = TestServer::from_config(config).await;
    let grace = claims("https://id.example.com", AUDIENCE, "grace");
    mint(
        &server,
        call("web", "oidc|grace", vec![], Some(&old.sign(&grace))),
    )
    .await
    .expect("the file's key verifies");
    let token = new.sign(&grace);
    invalid(
        &mint(&server, call("web", "oidc|grace", vec![], Some(&token)))
            .await
            .unwrap_err(),
        "unknown_key",
    );
    write(&[&old, &new]);
    eventually_minted(&server, || call("web", "oidc|grace", vec![], Some(&token))).await;
}

/// CreateChatToken through boto3 against `server`'s IVS HTTP API, unsigned, with `headers` added by an
/// event hook before signing: what `tests/aws/boto3_call.py` reports.
fn boto3(server: &TestServer, request: Value, headers: &[(&str, &str)]) -> Value {
    let venv = std::env::var_os("AWS_CLIENTS_VENV")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/venv"));
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/aws/boto3_call.py");
    let mut command = std::process::Command::new(venv.join("bin/python"));
    command
        .env_clear()
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_DEFAULT_REGION", "us-west-2")
        .env("AWS_MAX_ATTEMPTS", "1")
        .arg(script)
        .arg(format!("http://{}", server.addr))
        .arg(request.to_string())
        .arg("--unsigned");
    for (name, value) in headers {
        command.arg("--header").arg(format!("{name}={value}"));
    }
    let output = command
        .output()
        .expect("boto3 in target/venv (tests/run.sh installs it)");
    assert!(
        output.status.success(),
        "boto3: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

#[tokio::test]
async fn the_ivs_http_api_binds_through_boto3_with_the_header_added_by_an_event_hook() {
    let rsa = TestKey::rsa("rsa-1");
    let idp = Idp::start(&[&rsa]).await;
    let keys = LocalKeys::new();
    let mut config = config(&keys, &idp);
    production_policy(&mut config);
    let server = TestServer::from_config(config).await;
    let henry = claims(&idp.issuer, AUDIENCE, "henry");
    let request = |user: &str| json!({"roomIdentifier": ACCOUNT_111_ROOM, "userId": user});
    let server = std::sync::Arc::new(server);
    // boto3 runs as a process: off the runtime, which serves the call meanwhile.
    let call = |request: Value, token: Option<String>| {
        let server = server.clone();
        tokio::task::spawn_blocking(move || {
            let mut headers = vec![("x-caller-id", WEB_GATEWAY)];
            headers.extend(token.as_deref().map(|token| (HEADER, token)));
            boto3(&server, request, &headers)
        })
    };
    let token = rsa.sign(&henry);
    let bound = call(request("oidc|henry"), Some(token.clone()))
        .await
        .unwrap();
    let minted = bound["token"].as_str().expect("a token");
    assert_eq!(
        keys.keys.verify(minted).unwrap().user_id.expose(),
        "oidc|henry"
    );

    let expired = rsa.sign(&with(henry.clone(), json!({"exp": now() - 60})));
    for (user, token, message) in [
        // Another user than the token's.
        (
            "oidc|ivy",
            Some(token),
            "not the one the end-user token proves",
        ),
        (
            "oidc|henry",
            Some(expired),
            "the end-user token has expired",
        ),
        // No token from an end-user-facing caller: the policy refuses.
        ("oidc|henry", None, "policy does not allow"),
    ] {
        let refused = call(request(user), token).await.unwrap();
        assert_eq!(refused["exception"], "AccessDeniedException", "{refused}");
        assert_eq!(refused["status"], 403, "{refused}");
        let said = refused["error"]["Message"].as_str().unwrap();
        assert!(said.contains(message), "{said}");
    }
}
