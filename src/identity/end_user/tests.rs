use std::{collections::BTreeMap, io::Write as _, time::Duration};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use ring::{
    rand::SystemRandom,
    signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair},
};
use serde_json::{Value, json};

use super::jwks::KeySet;
use super::*;

const ISSUER: &str = "https://id.example.com";

/// A P-256 key pair and its JWK with id `kid`.
fn es256(kid: &str) -> (EcdsaKeyPair, Value) {
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    let pair =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap();
    let point = pair.public_key().as_ref();
    let jwk = json!({
        "kty": "EC", "crv": "P-256", "kid": kid,
        "x": URL_SAFE_NO_PAD.encode(&point[1..33]), "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
    });
    (pair, jwk)
}

fn sign(pair: &EcdsaKeyPair, kid: &str, claims: &Value) -> String {
    let header = json!({"alg": "ES256", "kid": kid});
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let signature = pair.sign(&SystemRandom::new(), input.as_bytes()).unwrap();
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature.as_ref()))
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn claims(extra: Value) -> Value {
    let mut claims =
        json!({"iss": ISSUER, "aud": "app", "sub": "alice", "iat": now(), "exp": now() + 300});
    for (name, value) in extra.as_object().unwrap() {
        claims[name] = value.clone();
    }
    claims
}

/// A verifier trusting ISSUER with the keys of `jwks` in a file (kept alive by the returned guard).
fn verifier(
    jwks: &Value,
    tweak: impl FnOnce(&mut EndUserConfig),
) -> (Verifier, tempfile::NamedTempFile) {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(jwks.to_string().as_bytes()).unwrap();
    let mut settings = EndUserConfig {
        issuers: vec![issuer(file.path(), JwtAlgorithm::ES256)],
        ..EndUserConfig::default()
    };
    settings.issuers[0].algorithms = vec![
        JwtAlgorithm::RS256,
        JwtAlgorithm::ES256,
        JwtAlgorithm::EdDSA,
    ];
    tweak(&mut settings);
    (Verifier::new(&settings).unwrap(), file)
}

/// ISSUER, its keys in `jwks_file`, accepting `algorithm`.
fn issuer(jwks_file: &std::path::Path, algorithm: JwtAlgorithm) -> EndUserIssuer {
    EndUserIssuer {
        issuer: ISSUER.into(),
        audiences: vec!["app".into()],
        jwks_url: None,
        jwks_file: Some(jwks_file.to_owned()),
        algorithms: vec![algorithm],
        user_id_claim: "sub".into(),
        user_id_template: None,
        max_token_age: None,
        attributes: BTreeMap::new(),
    }
}

fn headers(token: &str) -> http::HeaderMap {
    let mut headers = http::HeaderMap::new();
    headers.insert("x-end-user-token", token.parse().unwrap());
    headers
}

async fn refused(verifier: &Verifier, token: &str) -> EndUserRejection {
    match verifier.resolve(&headers(token)).await {
        Err(Error::EndUserInvalid(why)) => why,
        other => panic!("expected END_USER_TOKEN_INVALID, got {other:?}"),
    }
}

#[tokio::test]
async fn no_header_is_no_end_user_and_a_good_token_is_its_user_with_the_claims_policy_sees() {
    let (pair, jwk) = es256("k1");
    let (verifier, _file) = verifier(&json!({"keys": [jwk]}), |settings| {
        settings.claims = vec!["groups".into(), "tier".into(), "verified".into()];
        settings.issuers[0].attributes = BTreeMap::from([("displayName".into(), "name".into())]);
    });
    assert_eq!(
        verifier.resolve(&http::HeaderMap::new()).await.unwrap(),
        None
    );
    let token = sign(
        &pair,
        "k1",
        &claims(
            json!({"groups": ["a", "b"], "tier": "gold", "verified": true, "name": "Alice", "other": 1}),
        ),
    );
    let user = verifier.resolve(&headers(&token)).await.unwrap().unwrap();
    assert_eq!(user.issuer, ISSUER);
    assert_eq!(user.subject, "alice");
    assert_eq!(user.user_id.expose(), "alice");
    assert_eq!(
        user.claims,
        vec![
            ("groups".into(), vec!["a".into(), "b".into()]),
            ("tier".into(), vec!["gold".into()]),
            ("verified".into(), vec!["true".into()]),
        ]
    );
    assert_eq!(
        user.attributes,
        vec![("displayName".into(), "Alice".into())]
    );
}

#[tokio::test]
async fn exposed_claims_are_bounded_at_their_edges() {
    let (pair, jwk) = es256("k1");
    let (verifier, _file) = verifier(&json!({"keys": [jwk]}), |_| {});
    let many = |n: usize| json!({"groups": (0..n).map(|i| i.to_string()).collect::<Vec<_>>()});
    assert!(
        verifier
            .resolve(&headers(&sign(
                &pair,
                "k1",
                &claims(many(MAX_CLAIM_VALUES))
            )))
            .await
            .is_ok()
    );
    assert_eq!(
        refused(
            &verifier,
            &sign(&pair, "k1", &claims(many(MAX_CLAIM_VALUES + 1)))
        )
        .await,
        EndUserRejection::Claim
    );
    let long = |n: usize| json!({"groups": ["g".repeat(n)]});
    assert!(
        verifier
            .resolve(&headers(&sign(
                &pair,
                "k1",
                &claims(long(MAX_CLAIM_VALUE_BYTES))
            )))
            .await
            .is_ok()
    );
    assert_eq!(
        refused(
            &verifier,
            &sign(&pair, "k1", &claims(long(MAX_CLAIM_VALUE_BYTES + 1)))
        )
        .await,
        EndUserRejection::Claim
    );
    assert_eq!(
        refused(
            &verifier,
            &sign(&pair, "k1", &claims(json!({"groups": {"a": 1}})))
        )
        .await,
        EndUserRejection::Claim
    );
}

#[tokio::test]
async fn the_token_length_is_bounded_at_its_edge() {
    let (_, jwk) = es256("k1");
    let (verifier, _file) = verifier(&json!({"keys": [jwk]}), |_| {});
    // Both well-formed-looking but unsigned by any trusted key: the longest allowed is looked at (its
    // issuer is refused), one byte more is not parsed at all.
    let padded = |len: usize| {
        let head = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"ES256"}"#),
            URL_SAFE_NO_PAD.encode(r#"{"iss":"x"}"#)
        );
        format!("{head}{}", "A".repeat(len - head.len()))
    };
    assert_eq!(
        refused(&verifier, &padded(MAX_TOKEN_BYTES)).await,
        EndUserRejection::Issuer
    );
    assert_eq!(
        refused(&verifier, &padded(MAX_TOKEN_BYTES + 1)).await,
        EndUserRejection::Malformed
    );
}

#[tokio::test]
async fn max_token_age_requires_a_recent_iat_and_iat_is_never_in_the_future() {
    let (pair, jwk) = es256("k1");
    let (verifier, _file) = verifier(&json!({"keys": [jwk]}), |settings| {
        settings.leeway = Duration::ZERO;
        settings.issuers[0].max_token_age = Some(Duration::from_secs(600));
    });
    let token = |extra| sign(&pair, "k1", &claims(extra));
    assert!(
        verifier
            .resolve(&headers(&token(json!({"iat": now() - 590}))))
            .await
            .is_ok()
    );
    assert_eq!(
        refused(&verifier, &token(json!({"iat": now() - 700}))).await,
        EndUserRejection::TooOld
    );
    let mut without = claims(json!({}));
    without.as_object_mut().unwrap().remove("iat");
    assert_eq!(
        refused(&verifier, &sign(&pair, "k1", &without)).await,
        EndUserRejection::TooOld
    );
    assert_eq!(
        refused(&verifier, &token(json!({"iat": now() + 60}))).await,
        EndUserRejection::NotYetValid
    );
}

#[tokio::test]
async fn a_key_of_another_algorithm_than_the_tokens_is_refused() {
    // The token says ES256 but names the Ed25519 key's id: no confusion of the two.
    let ed = Ed25519KeyPair::from_pkcs8(
        Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .unwrap()
            .as_ref(),
    )
    .unwrap();
    let ed_jwk = json!({"kty": "OKP", "crv": "Ed25519", "kid": "ed",
        "x": URL_SAFE_NO_PAD.encode(ed.public_key().as_ref())});
    let (pair, jwk) = es256("ec");
    let (verifier, _file) = verifier(&json!({"keys": [jwk, ed_jwk]}), |_| {});
    assert_eq!(
        refused(&verifier, &sign(&pair, "ed", &claims(json!({})))).await,
        EndUserRejection::Algorithm
    );
    assert!(
        verifier
            .resolve(&headers(&sign(&pair, "ec", &claims(json!({})))))
            .await
            .is_ok()
    );
}

#[test]
fn a_jwk_set_keeps_only_signature_keys_of_allowed_algorithms_up_to_max_keys() {
    let (_, ec) = es256("ec");
    let mut encryption = ec.clone();
    encryption["kid"] = "enc".into();
    encryption["use"] = "enc".into();
    let mut p384 = ec.clone();
    p384["kid"] = "p384".into();
    p384["crv"] = "P-384".into();
    let mut mislabelled = ec.clone();
    mislabelled["kid"] = "rs-label".into();
    mislabelled["alg"] = "RS256".into();
    let hmac = json!({"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"});
    let set = json!({"keys": [ec, encryption, p384, mislabelled, hmac, {"kty": "nonsense"}]});
    let all = [
        JwtAlgorithm::RS256,
        JwtAlgorithm::ES256,
        JwtAlgorithm::EdDSA,
    ];
    let parsed = KeySet::parse(set.to_string().as_bytes(), &all, 16).unwrap();
    assert_eq!(parsed.len(), 1, "only the P-256 signature key");
    assert!(
        KeySet::parse(set.to_string().as_bytes(), &[JwtAlgorithm::RS256], 16)
            .unwrap()
            .is_empty()
    );

    let keys: Vec<Value> = (0..5).map(|i| es256(&format!("k{i}")).1).collect();
    let five = json!({"keys": keys}).to_string();
    assert_eq!(KeySet::parse(five.as_bytes(), &all, 5).unwrap().len(), 5);
    assert_eq!(KeySet::parse(five.as_bytes(), &all, 4).unwrap().len(), 4);
    assert!(KeySet::parse(b"[]", &all, 4).is_err());
}

#[test]
fn a_jwk_set_file_without_a_usable_key_or_over_the_size_bound_does_not_load() {
    let (_, jwk) = es256("k1");
    let set = json!({"keys": [jwk]}).to_string();
    let load = |set: &str, max_bytes: usize| {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(set.as_bytes()).unwrap();
        let settings = EndUserConfig {
            max_jwks_bytes: max_bytes,
            issuers: vec![issuer(file.path(), JwtAlgorithm::ES256)],
            ..EndUserConfig::default()
        };
        Verifier::new(&settings).map(|_| ())
    };
    assert!(load(&set, set.len()).is_ok());
    let err = load(&set, set.len() - 1).unwrap_err().to_string();
    assert!(
        err.contains("end_user.issuers[0].jwks_file") && err.contains("max_jwks_bytes"),
        "{err}"
    );
    let err = load(r#"{"keys": []}"#, 1024).unwrap_err().to_string();
    assert!(err.contains("no usable key"), "{err}");
}

#[tokio::test]
async fn a_fetch_is_bounded_in_size_and_time() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A server that answers `body` with a Content-Length, or never answers when `body` is None.
    async fn serve(body: Option<String>) -> http::Uri {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                let body = body.clone();
                tokio::spawn(async move {
                    let mut request = [0; 1024];
                    let _ = socket.read(&mut request).await;
                    match body {
                        Some(body) => {
                            let head = format!(
                                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n",
                                body.len()
                            );
                            let _ = socket.write_all(head.as_bytes()).await;
                            let _ = socket.write_all(body.as_bytes()).await;
                        }
                        None => std::future::pending::<()>().await,
                    }
                });
            }
        });
        format!("http://{addr}/jwks").parse().unwrap()
    }
    let fetcher = Fetcher::new(Duration::from_millis(300), 1024).unwrap();
    let exactly = serve(Some("x".repeat(1024))).await;
    assert_eq!(fetcher.get(&exactly).await.unwrap().len(), 1024);
    let over = serve(Some("x".repeat(1025))).await;
    assert!(matches!(
        fetcher.get(&over).await,
        Err(FetchError::TooLarge(1024))
    ));
    let hung = serve(None).await;
    assert!(matches!(
        fetcher.get(&hung).await,
        Err(FetchError::Timeout(_))
    ));
}
