//! PEM files for rustls (ring): certificate chains, private keys, trust anchors and the client
//! configurations made of them, read with errors that name the setting (or environment variable) the file
//! came from. The listener's TLS, the Redis client, the OTLP exporter and the `health` command all read
//! their files here.

use std::{path::Path, sync::Arc};

use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio_rustls::rustls::{ClientConfig, RootCertStore, crypto::CryptoProvider};

/// Why a file cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("configuration error: {setting}: {reason}")]
pub struct PemError {
    /// The setting or environment variable that names the file, e.g. `limiter.redis_ca_file`.
    pub setting: String,
    /// What is wrong, with the file's path.
    pub reason: String,
}

impl PemError {
    fn new(setting: &str, path: &Path, reason: impl std::fmt::Display) -> Self {
        PemError {
            setting: setting.to_owned(),
            reason: format!("{}: {reason}", path.display()),
        }
    }
}

/// The one cryptography provider: ring, as everywhere in this service.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(tokio_rustls::rustls::crypto::ring::default_provider())
}

/// The certificates in `path` (PEM), in order; at least one.
pub fn certificates(path: &Path, setting: &str) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| PemError::new(setting, path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PemError::new(setting, path, e))?;
    if certs.is_empty() {
        return Err(PemError::new(setting, path, "no PEM certificates"));
    }
    Ok(certs)
}

/// The private key in `path` (PEM: PKCS#8, PKCS#1 or SEC1).
pub fn private_key(path: &Path, setting: &str) -> Result<PrivateKeyDer<'static>, PemError> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| PemError::new(setting, path, format!("no usable PEM private key: {e}")))
}

/// The certificates in `path` as trust anchors.
pub fn roots(path: &Path, setting: &str) -> Result<RootCertStore, PemError> {
    let mut roots = RootCertStore::empty();
    for ca in certificates(path, setting)? {
        roots.add(ca).map_err(|e| PemError::new(setting, path, e))?;
    }
    Ok(roots)
}

/// A client certificate chain and its key, from the files the two settings name.
pub struct ClientIdentity<'a> {
    /// The chain's file and the setting that names it.
    pub cert: (&'a Path, &'a str),
    /// The key's file and the setting that names it.
    pub key: (&'a Path, &'a str),
}

/// A TLS client configuration trusting `roots`, presenting `identity` when given (refused when the key
/// does not match the certificate).
pub fn client_config(
    roots: RootCertStore,
    identity: Option<ClientIdentity<'_>>,
) -> Result<ClientConfig, PemError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(roots);
    match identity {
        None => Ok(builder.with_no_client_auth()),
        Some(ClientIdentity { cert, key }) => {
            let chain = certificates(cert.0, cert.1)?;
            let private_key = private_key(key.0, key.1)?;
            builder
                .with_client_auth_cert(chain, private_key)
                .map_err(|e| PemError::new(key.1, key.0, format!("does not match {}: {e}", cert.1)))
        }
    }
}
