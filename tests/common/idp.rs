//! A test identity provider on a loopback port: OpenID Connect discovery and a JWK set, with signing keys
//! made in the test (RSA by `openssl genpkey`, P-256 and Ed25519 by ring), and a way to take it down.

use std::{
    net::SocketAddr,
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use axum::{Json, Router, extract::State, http::StatusCode, routing::get};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use ring::{
    rand::SystemRandom,
    signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair},
};
use serde_json::{Value, json};

/// A key the provider signs with.
pub struct TestKey {
    pub kid: String,
    pub alg: &'static str,
    pair: Pair,
}

enum Pair {
    Rsa(RsaKeyPair),
    Es256(EcdsaKeyPair),
    Ed25519(Ed25519KeyPair),
}

impl TestKey {
    /// A 2048-bit RSA key (RS256), made by the openssl command line tool (ring makes no RSA keys), in
    /// its PKCS#1 DER output.
    pub fn rsa(kid: &str) -> Self {
        let output = Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-outform",
                "DER",
            ])
            .output()
            .expect("openssl (tests/run.sh installs it)");
        assert!(output.status.success(), "openssl genpkey failed");
        TestKey {
            kid: kid.into(),
            alg: "RS256",
            pair: Pair::Rsa(RsaKeyPair::from_der(&output.stdout).unwrap()),
        }
    }

    /// A P-256 key (ES256).
    pub fn es256(kid: &str) -> Self {
        let rng = SystemRandom::new();
        let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
        TestKey {
            kid: kid.into(),
            alg: "ES256",
            pair: Pair::Es256(EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).unwrap()),
        }
    }

    /// An Ed25519 key (EdDSA).
    pub fn ed25519(kid: &str) -> Self {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        TestKey {
            kid: kid.into(),
            alg: "EdDSA",
            pair: Pair::Ed25519(Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap()),
        }
    }

    /// The public key as a JWK.
    pub fn jwk(&self) -> Value {
        let b64 = |bytes: &[u8]| URL_SAFE_NO_PAD.encode(bytes);
        match &self.pair {
            Pair::Rsa(pair) => {
                let public = signature::RsaPublicKeyComponents::<Vec<u8>>::from(pair.public());
                json!({
                    "kty": "RSA", "use": "sig", "alg": "RS256", "kid": self.kid,
                    "n": b64(&public.n), "e": b64(&public.e),
                })
            }
            Pair::Es256(pair) => {
                let point = pair.public_key().as_ref();
                json!({
                    "kty": "EC", "crv": "P-256", "use": "sig", "kid": self.kid,
                    "x": b64(&point[1..33]), "y": b64(&point[33..65]),
                })
            }
            Pair::Ed25519(pair) => json!({
                "kty": "OKP", "crv": "Ed25519", "kid": self.kid,
                "x": b64(pair.public_key().as_ref()),
            }),
        }
    }

    /// The public key's bytes (DER for RSA): what an algorithm-confusion attack uses as an HMAC secret.
    pub fn public_bytes(&self) -> Vec<u8> {
        match &self.pair {
            Pair::Rsa(pair) => pair.public().as_ref().to_vec(),
            Pair::Es256(pair) => pair.public_key().as_ref().to_vec(),
            Pair::Ed25519(pair) => pair.public_key().as_ref().to_vec(),
        }
    }

    /// A compact JWS of `claims`, signed by this key with its `alg` and `kid`.
    pub fn sign(&self, claims: &Value) -> String {
        let header = json!({"alg": self.alg, "kid": self.kid, "typ": "JWT"});
        let message = signing_input(&header, claims);
        let rng = SystemRandom::new();
        let signature = match &self.pair {
            Pair::Rsa(pair) => {
                let mut signature = vec![0; pair.public().modulus_len()];
                pair.sign(
                    &signature::RSA_PKCS1_SHA256,
                    &rng,
                    message.as_bytes(),
                    &mut signature,
                )
                .unwrap();
                signature
            }
            Pair::Es256(pair) => pair
                .sign(&rng, message.as_bytes())
                .unwrap()
                .as_ref()
                .to_vec(),
            Pair::Ed25519(pair) => pair.sign(message.as_bytes()).as_ref().to_vec(),
        };
        format!("{message}.{}", URL_SAFE_NO_PAD.encode(signature))
    }
}

/// `base64url(header).base64url(claims)`.
pub fn signing_input(header: &Value, claims: &Value) -> String {
    format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    )
}

/// Seconds since the epoch.
pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// ID-token claims for `sub` from `issuer` to `audience`, issued now, valid for five minutes.
pub fn claims(issuer: &str, audience: &str, sub: &str) -> Value {
    let now = now();
    json!({"iss": issuer, "aud": audience, "sub": sub, "iat": now, "nbf": now - 1, "exp": now + 300})
}

struct Published {
    issuer: String,
    keys: Mutex<Vec<Value>>,
    up: AtomicBool,
    jwks_fetches: AtomicUsize,
}

/// The provider: `issuer` serves `/.well-known/openid-configuration` and `/jwks`.
pub struct Idp {
    pub issuer: String,
    published: Arc<Published>,
    server: tokio::task::JoinHandle<()>,
}

impl Idp {
    /// A provider publishing `keys`, up.
    pub async fn start(keys: &[&TestKey]) -> Idp {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let issuer = format!("http://{addr}");
        let published = Arc::new(Published {
            issuer: issuer.clone(),
            keys: Mutex::new(keys.iter().map(|key| key.jwk()).collect()),
            up: AtomicBool::new(true),
            jwks_fetches: AtomicUsize::new(0),
        });
        let router = Router::new()
            .route("/.well-known/openid-configuration", get(discovery))
            .route("/jwks", get(jwks))
            .with_state(published.clone());
        let server = tokio::spawn(async move {
            axum::serve(listener, router).await.unwrap();
        });
        Idp {
            issuer,
            published,
            server,
        }
    }

    /// Publishes `keys` from now on (a key rotation).
    pub fn publish(&self, keys: &[&TestKey]) {
        *self.published.keys.lock().unwrap() = keys.iter().map(|key| key.jwk()).collect();
    }

    /// Takes the provider down (503 to everything) or brings it back.
    pub fn set_up(&self, up: bool) {
        self.published.up.store(up, Ordering::SeqCst);
    }

    /// How many times the JWK set was asked for, answered or not.
    pub fn jwks_fetches(&self) -> usize {
        self.published.jwks_fetches.load(Ordering::SeqCst)
    }
}

impl Drop for Idp {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn discovery(State(published): State<Arc<Published>>) -> Result<Json<Value>, StatusCode> {
    if !published.up.load(Ordering::SeqCst) {
        return Err(StatusCode::SERVICE_UNAVAILABLE);
    }
    Ok(Json(json!({
        "issuer": published.issuer,
        "jwks_uri": format!("{}/jwks", published.issuer),
        "id_token_signing_alg_values_supported": ["RS256", "ES256", "EdDSA"],
    })))
}

async fn jwks(State(published): State<Arc<Published>>) -> Result<Json<Value>, StatusCode> {
    published.jwks_fetches.fetch_add(1, Ordering::SeqCst);
    if !published.up.load(Ordering::SeqCst) {
        return Err(StatusCode::SERVICE_UNAVAILABLE);
    }
    Ok(Json(json!({ "keys": *published.keys.lock().unwrap() })))
}
