//! TLS termination with rustls (ring): the server certificate, optionally mutual TLS against a client CA,
//! and reloads when the files change.
//!
//! Each connection is accepted with the configuration current at that moment, so a rotated certificate or
//! CA applies to the next handshake; a bad new file is refused and the last good configuration stays.
//! Handshakes run on their own tasks (see [`super::listener`]), bounded by `handshake_timeout` and at
//! most `max_concurrent_handshakes` at once, so slow or silent clients never hold up the accept loop or
//! take every core. With a client CA, a client without a certificate signed by it is refused at
//! the handshake, before any gRPC is spoken.

use std::{future::Future, path::PathBuf, sync::Arc};

use arc_swap::ArcSwap;
use tokio::{net::TcpStream, sync::Semaphore};
use tokio_rustls::{
    rustls::{ServerConfig, server::WebPkiClientVerifier},
    server::TlsStream,
};

use super::listener::{Closed, HandshakeRefused};
use crate::config::TlsConfig;
use crate::pem::{self, PemError};

/// Why TLS settings cannot be used; names the setting.
#[derive(Debug, thiserror::Error)]
#[error("configuration error: {setting}: {reason}")]
pub struct TlsError {
    /// E.g. `tls.cert_file`.
    pub setting: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

/// The current rustls configuration, swapped on reload.
pub struct Tls {
    settings: TlsConfig,
    current: ArcSwap<ServerConfig>,
    /// Places for handshakes in progress: `max_concurrent_handshakes`.
    handshakes: Arc<Semaphore>,
}

impl Tls {
    /// Reads and checks the files `settings` names.
    pub fn load(settings: &TlsConfig) -> Result<Arc<Self>, TlsError> {
        Ok(Arc::new(Tls {
            current: ArcSwap::from_pointee(build(settings)?),
            handshakes: Arc::new(Semaphore::new(settings.max_concurrent_handshakes.get())),
            settings: settings.clone(),
        }))
    }

    /// Re-reads the files; on error the current configuration stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        self.current.store(Arc::new(build(&self.settings)?));
        Ok(())
    }

    /// The files a reload reads: the certificate chain, its key, and the client CA when set.
    pub fn files(&self) -> Vec<PathBuf> {
        let mut paths = vec![
            self.settings.cert_file.clone(),
            self.settings.key_file.clone(),
        ];
        paths.extend(self.settings.client_ca_file.clone());
        paths
    }

    /// The TLS handshake of `tcp`, with the configuration current now; bounded by `handshake_timeout`
    /// and refused at once while `max_concurrent_handshakes` are in progress (see
    /// [`super::listener::incoming`], which runs it on its own task).
    pub fn handshake(
        &self,
        tcp: TcpStream,
    ) -> impl Future<Output = Result<TlsStream<TcpStream>, HandshakeRefused>> + Send + use<> {
        let permit = self.handshakes.clone().try_acquire_owned();
        let acceptor = tokio_rustls::TlsAcceptor::from(self.current.load_full());
        let timeout = self.settings.handshake_timeout;
        async move {
            let _permit = permit.map_err(|_| HandshakeRefused {
                reason: Closed::MaxHandshakes,
                detail: None,
            })?;
            match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => Ok(stream),
                Ok(Err(e)) => Err(HandshakeRefused {
                    reason: Closed::HandshakeFailed,
                    detail: Some(e),
                }),
                Err(_) => Err(HandshakeRefused {
                    reason: Closed::HandshakeTimeout,
                    detail: None,
                }),
            }
        }
    }
}

fn build(settings: &TlsConfig) -> Result<ServerConfig, TlsError> {
    let provider = pem::provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError {
            setting: "tls",
            reason: e.to_string(),
        })?;
    let builder = match &settings.client_ca_file {
        Some(ca_file) => {
            const SETTING: &str = "tls.client_ca_file";
            let roots = pem::roots(ca_file, SETTING).map_err(|e| refused(SETTING, e))?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsError {
                    setting: SETTING,
                    reason: format!("{}: {e}", ca_file.display()),
                })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let chain = pem::certificates(&settings.cert_file, "tls.cert_file")
        .map_err(|e| refused("tls.cert_file", e))?;
    let key = pem::private_key(&settings.key_file, "tls.key_file")
        .map_err(|e| refused("tls.key_file", e))?;
    let mut config = builder.with_single_cert(chain, key).map_err(|e| TlsError {
        setting: "tls.key_file",
        reason: format!("does not match tls.cert_file: {e}"),
    })?;
    // gRPC is HTTP/2 only; the IVS Chat HTTP API (the AWS CLI, SDKs) also speaks HTTP/1.1. With the HTTP
    // API off, the server speaks HTTP/2 only and HTTP/1.1 connections are closed after the handshake.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

fn refused(setting: &'static str, error: PemError) -> TlsError {
    TlsError {
        setting,
        reason: error.reason,
    }
}
