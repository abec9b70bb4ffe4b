//! TLS termination with rustls (ring): the server certificate, optionally mutual TLS against a client CA,
//! and reloads when the files change.
//!
//! Each connection is accepted with the configuration current at that moment, so a rotated certificate or
//! CA applies to the next handshake; a bad new file is refused and the last good configuration stays.
//! Handshakes run on their own tasks (see [`super::listener`]). A connection takes one of the
//! `max_concurrent_handshakes` places only once its ClientHello has started to arrive (within
//! `transport.preface_timeout`), and holds it at most `handshake_timeout`; at most
//! `max_handshakes_per_peer` connections from one address wait or handshake at once. So sockets that
//! never speak hold no handshake place, one host cannot take them all, and slow or silent clients never
//! hold up the accept loop or take every core. With a client CA, a client without a certificate signed by it is refused at
//! the handshake, before any gRPC is spoken.

use std::{
    collections::HashMap,
    future::Future,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

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
    /// Connections waiting for their ClientHello or in handshake, by client address.
    peers: Arc<Peers>,
}

/// Connections in handshake by client address; an address is removed when its last one is done, so the
/// map never holds more entries than there are connections.
#[derive(Default)]
struct Peers(Mutex<HashMap<IpAddr, usize>>);

/// One connection's place among its address's handshakes; given back when dropped.
struct PeerPlace {
    peers: Arc<Peers>,
    ip: IpAddr,
}

impl Peers {
    fn enter(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<PeerPlace> {
        let mut peers = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let open = peers.entry(ip).or_default();
        if *open >= max {
            return None;
        }
        *open += 1;
        Some(PeerPlace {
            peers: self.clone(),
            ip,
        })
    }
}

impl Drop for PeerPlace {
    fn drop(&mut self) {
        let mut peers = self.peers.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(open) = peers.get_mut(&self.ip) {
            *open -= 1;
            if *open == 0 {
                peers.remove(&self.ip);
            }
        }
    }
}

impl Tls {
    /// Reads and checks the files `settings` names.
    pub fn load(settings: &TlsConfig) -> Result<Arc<Self>, TlsError> {
        Ok(Arc::new(Tls {
            current: ArcSwap::from_pointee(build(settings)?),
            handshakes: Arc::new(Semaphore::new(settings.max_concurrent_handshakes.get())),
            peers: Arc::default(),
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

    /// The TLS handshake of `tcp` from `peer`, with the configuration current when its ClientHello
    /// starts: refused at once while `max_handshakes_per_peer` are in progress from its address; closed
    /// if nothing arrives within `first_bytes_timeout`; refused when its first bytes arrive while
    /// `max_concurrent_handshakes` are in progress; bounded by `handshake_timeout` from there (see
    /// [`super::listener::incoming`], which runs it on its own task).
    pub fn handshake(
        self: &Arc<Self>,
        tcp: TcpStream,
        peer: SocketAddr,
        first_bytes_timeout: Duration,
    ) -> impl Future<Output = Result<TlsStream<TcpStream>, HandshakeRefused>> + Send + use<> {
        let refused = |reason| HandshakeRefused {
            reason,
            detail: None,
        };
        let peer_place = self
            .peers
            .enter(peer.ip(), self.settings.max_handshakes_per_peer.get());
        let tls = self.clone();
        async move {
            let _peer_place = peer_place.ok_or(refused(Closed::MaxHandshakesPerPeer))?;
            let mut first = [0u8; 1];
            match tokio::time::timeout(first_bytes_timeout, tcp.peek(&mut first)).await {
                Ok(Ok(1..)) => {}
                Ok(Ok(0)) => {
                    return Err(HandshakeRefused {
                        reason: Closed::HandshakeFailed,
                        detail: Some(std::io::ErrorKind::UnexpectedEof.into()),
                    });
                }
                Ok(Err(e)) => {
                    return Err(HandshakeRefused {
                        reason: Closed::HandshakeFailed,
                        detail: Some(e),
                    });
                }
                Err(_) => return Err(refused(Closed::PrefaceTimeout)),
            }
            let _permit = tls
                .handshakes
                .clone()
                .try_acquire_owned()
                .map_err(|_| refused(Closed::MaxHandshakes))?;
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.current.load_full());
            match tokio::time::timeout(tls.settings.handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => Ok(stream),
                Ok(Err(e)) => Err(HandshakeRefused {
                    reason: Closed::HandshakeFailed,
                    detail: Some(e),
                }),
                Err(_) => Err(refused(Closed::HandshakeTimeout)),
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
