//! One issuer's signing keys: a JWK set read from a file, or fetched (from `jwks_url`, or the discovery
//! document's `jwks_uri`) and cached.
//!
//! A fetched set is used for `jwks_max_age`, then fetched again; a token naming a `kid` the set lacks
//! (the issuer rotated its keys) fetches it again at once. Fetches of one issuer are one at a time and at
//! most one per `jwks_min_refresh_interval`, whatever asks for them, so made-up key ids cannot hammer the
//! identity provider. When a fetch fails, the keys fetched before keep working; with none, a token can be
//! neither accepted nor refused ([`Lookup::Unavailable`]): never a bypass.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use arc_swap::ArcSwapOption;
use jsonwebtoken::{
    Algorithm, DecodingKey,
    jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, KeyOperations, PublicKeyUse},
};
use opentelemetry::KeyValue;
use serde::Deserialize;
use tokio::time::Instant;

use super::fetch::{FetchError, Fetcher};
use crate::config::{FetchUrl, JwtAlgorithm};
use crate::telemetry::metrics::metrics;

/// A key that verifies one algorithm.
pub struct Key {
    /// The only algorithm this key verifies (the JWK's `alg`, or its type's one algorithm).
    pub algorithm: Algorithm,
    /// The public key.
    pub key: DecodingKey,
}

/// The usable keys of a JWK set, by `kid`.
pub struct KeySet {
    by_id: HashMap<String, Arc<Key>>,
    /// Keys without a `kid`: used only by tokens without one, when exactly one has their algorithm.
    unnamed: Vec<Arc<Key>>,
    /// When the set was fetched or read.
    loaded_at: Instant,
}

impl KeySet {
    /// The usable keys of `json`: signature keys of `allowed` algorithms, at most `max_keys`. Keys of other
    /// types, uses or algorithms, and ones that do not parse, are left out; a document that is not a JWK
    /// set at all is refused.
    pub fn parse(json: &[u8], allowed: &[JwtAlgorithm], max_keys: usize) -> Result<Self, String> {
        #[derive(Deserialize)]
        struct Document {
            keys: Vec<serde_json::Value>,
        }
        let document: Document = serde_json::from_slice(json)
            .map_err(|e| format!("not a JWK set (an object with \"keys\"): {e}"))?;
        let mut set = KeySet {
            by_id: HashMap::new(),
            unnamed: Vec::new(),
            loaded_at: Instant::now(),
        };
        let (mut unusable, mut over) = (0usize, 0usize);
        for entry in document.keys {
            let Some((id, key)) = serde_json::from_value::<Jwk>(entry)
                .ok()
                .and_then(|jwk| usable(&jwk, allowed))
            else {
                unusable += 1;
                continue;
            };
            if set.len() == max_keys {
                over += 1;
                continue;
            }
            match id {
                Some(id) => {
                    set.by_id.entry(id).or_insert(Arc::new(key));
                }
                None => set.unnamed.push(Arc::new(key)),
            }
        }
        if over > 0 {
            tracing::warn!(
                kept = max_keys,
                left_out = over,
                "a JWK set has more usable keys than end_user.max_keys; the first are kept"
            );
        }
        if unusable > 0 {
            tracing::debug!(
                left_out = unusable,
                "JWK set entries of other types, uses or algorithms left out"
            );
        }
        Ok(set)
    }

    /// How many keys the set holds.
    pub fn len(&self) -> usize {
        self.by_id.len() + self.unnamed.len()
    }

    /// Whether the set holds no key.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The key a token with `kid` and `algorithm` names: by id, or without one the only key of its
    /// algorithm.
    fn find(&self, kid: Option<&str>, algorithm: Algorithm) -> Option<Arc<Key>> {
        match kid {
            Some(kid) => self.by_id.get(kid).cloned(),
            None => {
                let mut candidates = self
                    .by_id
                    .values()
                    .chain(&self.unnamed)
                    .filter(|key| key.algorithm == algorithm);
                match (candidates.next(), candidates.next()) {
                    (Some(key), None) => Some(key.clone()),
                    _ => None,
                }
            }
        }
    }
}

/// `jwk` as a key for one of `allowed`, with its id; `None` when it cannot verify such tokens.
fn usable(jwk: &Jwk, allowed: &[JwtAlgorithm]) -> Option<(Option<String>, Key)> {
    let common = &jwk.common;
    if common
        .public_key_use
        .as_ref()
        .is_some_and(|used| *used != PublicKeyUse::Signature)
    {
        return None;
    }
    if common
        .key_operations
        .as_ref()
        .is_some_and(|ops| !ops.contains(&KeyOperations::Verify))
    {
        return None;
    }
    // The algorithm the key's type implies; a declared `alg` must be that one.
    let (implied, algorithm) = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => (JwtAlgorithm::RS256, Algorithm::RS256),
        AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => {
            (JwtAlgorithm::ES256, Algorithm::ES256)
        }
        AlgorithmParameters::OctetKeyPair(okp) if okp.curve == EllipticCurve::Ed25519 => {
            (JwtAlgorithm::EdDSA, Algorithm::EdDSA)
        }
        _ => return None,
    };
    let declared_matches = match common.key_algorithm {
        None => true,
        Some(KeyAlgorithm::RS256) => implied == JwtAlgorithm::RS256,
        Some(KeyAlgorithm::ES256) => implied == JwtAlgorithm::ES256,
        Some(KeyAlgorithm::EdDSA) => implied == JwtAlgorithm::EdDSA,
        Some(_) => false,
    };
    if !declared_matches || !allowed.contains(&implied) {
        return None;
    }
    let key = DecodingKey::from_jwk(jwk).ok()?;
    Some((common.key_id.clone(), Key { algorithm, key }))
}

/// Where an issuer's keys come from.
pub enum Source {
    /// A JWK set file; reloaded by the file watcher (see `crate::app`).
    File(PathBuf),
    /// A JWK set URL.
    Url(FetchUrl),
    /// The discovery document at this URL names the JWK set's.
    Discovery(FetchUrl),
}

/// What looking a key up found.
pub enum Lookup {
    /// The key the token names.
    Found(Arc<Key>),
    /// The issuer's keys (fetched now if need be) have no such key.
    Unknown,
    /// There are no keys: none could be fetched yet. Try again after this long.
    Unavailable(Duration),
}

/// How an issuer's keys are fetched and kept.
pub struct FetchSettings {
    /// Fetches discovery documents and JWK sets; `None` when every issuer's keys come from a file.
    pub fetcher: Option<Fetcher>,
    /// Largest JWK set (or discovery document) read.
    pub max_bytes: usize,
    /// Refetch after this long.
    pub max_age: Duration,
    /// At most one fetch per this long.
    pub min_interval: Duration,
    /// Keys kept per issuer.
    pub max_keys: usize,
}

/// One issuer's keys and their fetching.
pub struct IssuerKeys {
    /// The issuer, as its tokens name it: for discovery's check and for logs.
    issuer: String,
    source: Source,
    allowed: Vec<JwtAlgorithm>,
    settings: Arc<FetchSettings>,
    keys: ArcSwapOption<KeySet>,
    /// When the last fetch started; held while a fetch runs, so fetches are one at a time.
    last_fetch: tokio::sync::Mutex<Option<Instant>>,
}

impl IssuerKeys {
    /// `issuer`'s keys from `source`, accepting keys of `allowed` algorithms; a file is read now.
    pub fn new(
        issuer: String,
        source: Source,
        allowed: Vec<JwtAlgorithm>,
        settings: Arc<FetchSettings>,
    ) -> Result<Self, String> {
        let keys = IssuerKeys {
            issuer,
            source,
            allowed,
            settings,
            keys: ArcSwapOption::empty(),
            last_fetch: tokio::sync::Mutex::new(None),
        };
        if let Source::File(path) = &keys.source {
            keys.keys.store(Some(Arc::new(keys.read(path)?)));
        }
        Ok(keys)
    }

    /// The JWK set file, when the keys come from one.
    pub fn file(&self) -> Option<&Path> {
        match &self.source {
            Source::File(path) => Some(path),
            _ => None,
        }
    }

    /// Re-reads the JWK set file: on success its keys verify the next token and their count is returned;
    /// a file that no longer parses is refused and the keys read before stay in force.
    pub fn reload(&self) -> Result<usize, String> {
        let Some(path) = self.file() else {
            return Ok(0);
        };
        let set = self.read(path)?;
        let count = set.len();
        self.keys.store(Some(Arc::new(set)));
        Ok(count)
    }

    fn read(&self, path: &Path) -> Result<KeySet, String> {
        let json =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if json.len() > self.settings.max_bytes {
            return Err(format!(
                "{}: larger than end_user.max_jwks_bytes ({} bytes)",
                path.display(),
                self.settings.max_bytes
            ));
        }
        let set = KeySet::parse(&json, &self.allowed, self.settings.max_keys)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if set.is_empty() {
            return Err(format!(
                "{}: no usable key (RS256, ES256 or EdDSA signature keys of the issuer's algorithms)",
                path.display()
            ));
        }
        Ok(set)
    }

    /// The key for a token with `kid` and `algorithm`, fetching the issuer's keys first when there are
    /// none yet, when they are older than `jwks_max_age`, or when they lack `kid`, each within the fetch
    /// rate limit.
    pub async fn lookup(self: &Arc<Self>, kid: Option<&str>, algorithm: Algorithm) -> Lookup {
        let fetched = matches!(self.source, Source::Url(_) | Source::Discovery(_));
        if let Some(set) = self.keys.load_full() {
            let stale = fetched && set.loaded_at.elapsed() >= self.settings.max_age;
            if let Some(key) = set.find(kid, algorithm) {
                if stale {
                    // Known keys answer now; the refresh runs beside the call.
                    let keys = self.clone();
                    tokio::spawn(async move { keys.refresh().await });
                }
                return Lookup::Found(key);
            }
            if !fetched {
                return Lookup::Unknown;
            }
        }
        self.refresh().await;
        match self.keys.load_full() {
            Some(set) => set
                .find(kid, algorithm)
                .map_or(Lookup::Unknown, Lookup::Found),
            None => Lookup::Unavailable(self.next_fetch_in().await),
        }
    }

    /// Fetches the keys when there are none yet.
    pub async fn prefetch(&self) {
        if self.keys.load().is_none() {
            self.refresh().await;
        }
    }

    /// How long until the next fetch may start.
    async fn next_fetch_in(&self) -> Duration {
        let last = *self.last_fetch.lock().await;
        last.map_or(Duration::ZERO, |at| {
            self.settings.min_interval.saturating_sub(at.elapsed())
        })
        .max(Duration::from_secs(1))
    }

    /// Fetches the keys, unless a fetch ran less than `jwks_min_refresh_interval` ago (or is running: its
    /// result is waited for instead).
    async fn refresh(&self) {
        let mut last = self.last_fetch.lock().await;
        if last.is_some_and(|at| at.elapsed() < self.settings.min_interval) {
            return;
        }
        *last = Some(Instant::now());
        let outcome = self.fetch().await;
        metrics().end_user_jwks_fetches.add(
            1,
            &[
                KeyValue::new("issuer", self.issuer.clone()),
                KeyValue::new("outcome", if outcome.is_ok() { "ok" } else { "error" }),
            ],
        );
        match outcome {
            Ok(set) => {
                tracing::info!(issuer = %self.issuer, keys = set.len(), "end-user issuer keys fetched");
                self.keys.store(Some(Arc::new(set)));
            }
            Err(e) => {
                let kept = self.keys.load().as_ref().map_or(0, |set| set.len());
                tracing::warn!(
                    issuer = %self.issuer,
                    kept,
                    "cannot fetch the end-user issuer's keys ({e}); {}",
                    if kept > 0 { "the keys fetched before stay in use" } else { "its tokens cannot be verified until a fetch succeeds" }
                );
            }
        }
    }

    async fn fetch(&self) -> Result<KeySet, String> {
        let fetcher = self
            .settings
            .fetcher
            .as_ref()
            .ok_or("no HTTPS client was made for this issuer")?;
        let failed = |what: &str, e: FetchError| format!("{what}: {e}");
        let jwks_url = match &self.source {
            Source::File(_) => return Err("keys come from a file".into()),
            Source::Url(url) => url.clone(),
            Source::Discovery(url) => {
                #[derive(Deserialize)]
                struct Discovery {
                    issuer: String,
                    jwks_uri: String,
                }
                let body = fetcher
                    .get(url.uri())
                    .await
                    .map_err(|e| failed("discovery document", e))?;
                let discovery: Discovery = serde_json::from_slice(&body).map_err(|e| {
                    format!("the discovery document is not OpenID Connect discovery JSON: {e}")
                })?;
                // OpenID Connect Discovery 1.0, 4.3: the document must name the issuer it was fetched for.
                if discovery.issuer != self.issuer {
                    return Err("the discovery document names another issuer".into());
                }
                FetchUrl::parse(&discovery.jwks_uri)
                    .map_err(|e| format!("the discovery document's jwks_uri: {e}"))?
            }
        };
        let body = fetcher
            .get(jwks_url.uri())
            .await
            .map_err(|e| failed("JWK set", e))?;
        let set = KeySet::parse(&body, &self.allowed, self.settings.max_keys)?;
        if set.is_empty() {
            return Err("the JWK set has no usable key".into());
        }
        Ok(set)
    }
}
