//! The local issuer's keys: a [`KeySet`] (one active key encrypts, every key verifies), where it comes
//! from ([`KeySource`]), and [`LiveKeys`], the set in force, replaced when its file changes.
//!
//! Rotation without a restart: add the new key to the key set file as `active = true` and keep the old
//! one listed (without `active`). Within `reload_interval` (or at once on SIGHUP) new tokens use the new
//! key while tokens of the old one still verify; remove the old key once its tokens have expired.

use std::{fmt, path::Path, sync::Arc};

use arc_swap::ArcSwap;
use pasetors::{
    footer::Footer,
    keys::{Generate, SymmetricKey},
    paserk::{FormatAsPaserk, Id},
    version4::V4,
};
use serde::Deserialize;

use super::paseto::Sealer;

/// One symmetric key and its PASERK id.
pub(super) struct LocalKey {
    /// `k4.lid.…`, derived from the key itself, so it can never name the wrong key.
    pub(super) id: String,
    pub(super) key: SymmetricKey<V4>,
    /// Its v4.local encryption with the footer of the tokens it encrypts, `{"kid":"k4.lid.…"}`: the same
    /// for every token, so built once.
    pub(super) sealer: Sealer,
}

impl LocalKey {
    fn new(key: SymmetricKey<V4>) -> Self {
        let id = Id::from(&key);
        let mut footer = Footer::new();
        footer.key_id(&id);
        let footer = footer
            .to_string()
            .expect("a footer of one string claim serialises");
        let mut paserk_id = String::new();
        id.fmt(&mut paserk_id)
            .expect("formatting a PASERK id into a String cannot fail");
        let sealer =
            Sealer::new(key.as_bytes(), footer.as_bytes()).expect("a v4 symmetric key is 32 bytes");
        LocalKey {
            id: paserk_id,
            key,
            sealer,
        }
    }
}

/// The keys of the local issuer: one active key encrypts new tokens; every key verifies.
pub struct KeySet {
    /// Index into `keys` of the key that encrypts new tokens.
    active: usize,
    keys: Vec<LocalKey>,
}

impl fmt::Debug for KeySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeySet")
            .field("active", &self.active_key_id())
            .field(
                "ids",
                &self.keys.iter().map(|k| k.id.as_str()).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// Why a key or key set could not be loaded. Never contains key material.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key file could not be read.
    #[error("cannot read key set file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// The key file is not valid TOML of the expected shape.
    #[error("key set file {path} is not valid: {reason}")]
    Format { path: String, reason: String },
    /// A key is not a PASERK `k4.local.` string.
    #[error(
        "{location}: not a PASERK k4.local key (generate one with `chat-token-service generate-key`)"
    )]
    NotAKey { location: String },
    /// The file does not mark exactly one key active.
    #[error("key set file {path}: exactly one key must have `active = true`, found {found}")]
    Active { path: String, found: usize },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    keys: Vec<KeyEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    key: String,
    #[serde(default)]
    active: bool,
}

impl KeySet {
    /// A set of one fresh random key. Tokens it mints cannot be verified after a restart.
    pub fn ephemeral() -> Self {
        let key = SymmetricKey::<V4>::generate().expect("the OS random number generator failed");
        KeySet {
            active: 0,
            keys: vec![LocalKey::new(key)],
        }
    }

    /// A set of one key given as a PASERK `k4.local.` string.
    pub fn from_paserk(paserk: &str) -> Result<Self, KeyError> {
        Ok(KeySet {
            active: 0,
            keys: vec![parse_key(paserk.trim(), "local_issuer.key")?],
        })
    }

    /// Reads a key set file, warning when people other than its owner may read it:
    ///
    /// ```toml
    /// [[keys]]
    /// key = "k4.local.…"   # encrypts new tokens
    /// active = true
    ///
    /// [[keys]]
    /// key = "k4.local.…"   # an older key: its tokens are still accepted
    /// ```
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let shown = path.display().to_string();
        let read = |source| KeyError::Read {
            path: shown.clone(),
            source,
        };
        let text = std::fs::read_to_string(path).map_err(read)?;
        crate::secret_file::warn_if_shared(path, "the local issuer's key set file");
        Self::from_toml(&text, &shown)
    }

    /// Parses the contents of a key set file; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, KeyError> {
        let file: KeyFile = toml::from_str(text).map_err(|e| KeyError::Format {
            path: origin.to_owned(),
            // toml's message quotes the offending line, which may be a key: keep only the reason.
            reason: e.message().to_owned(),
        })?;
        let keys = file
            .keys
            .iter()
            .enumerate()
            .map(|(i, entry)| parse_key(&entry.key, &format!("{origin}: keys[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        let active: Vec<usize> = file
            .keys
            .iter()
            .enumerate()
            .filter(|(_, e)| e.active)
            .map(|(i, _)| i)
            .collect();
        match active[..] {
            [active] => Ok(KeySet { active, keys }),
            _ => Err(KeyError::Active {
                path: origin.to_owned(),
                found: active.len(),
            }),
        }
    }

    /// The PASERK id of the key that encrypts new tokens.
    pub fn active_key_id(&self) -> &str {
        &self.keys[self.active].id
    }

    /// The PASERK ids of every key, the active one included.
    pub fn key_ids(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|k| k.id.as_str())
    }

    /// The key that encrypts new tokens.
    pub(super) fn active(&self) -> &LocalKey {
        &self.keys[self.active]
    }

    /// The key whose PASERK id is `id`, if this set holds it.
    pub(super) fn find(&self, id: &str) -> Option<&LocalKey> {
        self.keys.iter().find(|k| k.id == id)
    }
}

fn parse_key(paserk: &str, location: &str) -> Result<LocalKey, KeyError> {
    SymmetricKey::<V4>::try_from(paserk)
        .map(LocalKey::new)
        .map_err(|_| KeyError::NotAKey {
            location: location.to_owned(),
        })
}

/// A fresh random key as a PASERK `k4.local.` string, for a key set file or `CTS_LOCAL_ISSUER__KEY`.
pub fn generate_key() -> String {
    let key = SymmetricKey::<V4>::generate().expect("the OS random number generator failed");
    let mut paserk = String::new();
    key.fmt(&mut paserk)
        .expect("formatting a PASERK key into a String cannot fail");
    paserk
}

/// Where the local issuer's keys come from.
#[derive(Clone, Debug)]
pub enum KeySource<'a> {
    /// A key set file (`local_issuer.keys_file`): reloaded when it changes.
    File(&'a Path),
    /// One PASERK key (`local_issuer.key`).
    Single(&'a str),
    /// A key generated at start-up; lost on restart.
    Ephemeral,
}

impl KeySource<'_> {
    /// Loads the keys this source names.
    pub fn load(&self) -> Result<KeySet, KeyError> {
        match self {
            KeySource::File(path) => KeySet::load(path),
            KeySource::Single(paserk) => KeySet::from_paserk(paserk),
            KeySource::Ephemeral => Ok(KeySet::ephemeral()),
        }
    }
}

/// The key set in force, shared by the issuer and whatever verifies; [`LiveKeys::reload`] swaps in a new
/// one atomically, so a call sees either the old set or the new one, never a mix.
#[derive(Clone, Debug)]
pub struct LiveKeys(Arc<ArcSwap<KeySet>>);

impl LiveKeys {
    /// Starts with `keys`.
    pub fn new(keys: KeySet) -> Self {
        LiveKeys(Arc::new(ArcSwap::from_pointee(keys)))
    }

    /// A handle that does not keep the keys alive: for the reload task, which ends when they are gone.
    pub fn downgrade(&self) -> WeakKeys {
        WeakKeys(Arc::downgrade(&self.0))
    }

    /// The set in force now.
    pub fn current(&self) -> Arc<KeySet> {
        self.0.load_full()
    }

    /// Re-reads the key set file at `path`. On success the new set is in force for the next token and
    /// the next verification; on failure the current set stays and the error says why.
    pub fn reload(&self, path: &Path) -> Result<Arc<KeySet>, KeyError> {
        let keys = Arc::new(KeySet::load(path)?);
        self.0.store(keys.clone());
        Ok(keys)
    }
}

/// See [`LiveKeys::downgrade`].
#[derive(Clone, Debug)]
pub struct WeakKeys(std::sync::Weak<ArcSwap<KeySet>>);

impl WeakKeys {
    /// The keys, while anything else still holds them.
    pub fn upgrade(&self) -> Option<LiveKeys> {
        self.0.upgrade().map(LiveKeys)
    }
}

impl From<KeySet> for LiveKeys {
    fn from(keys: KeySet) -> Self {
        LiveKeys::new(keys)
    }
}

impl From<Arc<KeySet>> for LiveKeys {
    fn from(keys: Arc<KeySet>) -> Self {
        LiveKeys(Arc::new(ArcSwap::new(keys)))
    }
}
