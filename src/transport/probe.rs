//! The `health` command's client: a gRPC health check of this replica's own server, for Docker and
//! compose `HEALTHCHECK`s (the distroless image has no shell, curl or grpc_health_probe).
//!
//! It reads the same configuration as the server and dials `listen_addr` on loopback (an unspecified
//! address, `0.0.0.0` or `::`, becomes `127.0.0.1` or `::1`). With `[tls]` it speaks TLS and trusts
//! exactly the server's own certificate (the first in `tls.cert_file`, within its validity period) rather
//! than a CA and a host name: the server is found by address, and whatever CA signed its certificate, it
//! is the one this process can read. With `tls.client_ca_file` (mutual TLS) it presents `tls.cert_file`
//! and `tls.key_file` as its client certificate, so that certificate must also be valid for client
//! authentication under that CA (cert-manager's usages `server auth` and `client auth`).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use hyper_util::rt::TokioIo;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::net::TcpStream;
use tokio_rustls::{
    TlsConnector,
    rustls::{
        ClientConfig, DigitallySignedStruct, Error as RustlsError, RootCertStore, SignatureScheme,
        client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        crypto::{WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature},
    },
};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::config::Config;
use crate::pem::{self, ClientIdentity, PemError};

/// A health check of the server a configuration describes.
pub struct Probe {
    /// Where the server listens, as seen from this host.
    addr: SocketAddr,
    /// `None`: plaintext.
    tls: Option<Arc<ClientConfig>>,
}

/// Why the check did not find the service serving.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// Nothing answered, the handshake failed, or the call failed.
    #[error("cannot reach {addr}: {reason}")]
    Unreachable {
        /// Where it dialled.
        addr: SocketAddr,
        /// What went wrong, with its causes.
        reason: String,
    },
    /// The server answered with a status other than SERVING.
    #[error("{service} on {addr} is {status}")]
    NotServing {
        /// Where it dialled.
        addr: SocketAddr,
        /// The health-checked service.
        service: String,
        /// NOT_SERVING, SERVICE_UNKNOWN or UNKNOWN.
        status: &'static str,
    },
    /// No answer within the timeout.
    #[error("no answer from {addr} within {}", humantime::format_duration(*.timeout))]
    TimedOut {
        /// Where it dialled.
        addr: SocketAddr,
        /// The bound.
        timeout: Duration,
    },
}

impl Probe {
    /// The check of the server `config` describes; reads its TLS files (a configuration error when they
    /// cannot be used, as for the server).
    pub fn new(config: &Config) -> Result<Self, PemError> {
        let listen = config.listen_addr;
        let ip = match listen.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        let tls = match &config.tls {
            None => None,
            Some(settings) => {
                let pinned = pem::certificates(&settings.cert_file, "tls.cert_file")?.remove(0);
                let identity = settings.client_ca_file.as_ref().map(|_| ClientIdentity {
                    cert: (&settings.cert_file, "tls.cert_file"),
                    key: (&settings.key_file, "tls.key_file"),
                });
                let mut client = pem::client_config(RootCertStore::empty(), identity)?;
                let algorithms = client.crypto_provider().signature_verification_algorithms;
                client
                    .dangerous()
                    .set_certificate_verifier(Arc::new(OwnCertificate {
                        certificate: pinned,
                        algorithms,
                    }));
                client.alpn_protocols = vec![b"h2".to_vec()];
                Some(Arc::new(client))
            }
        };
        Ok(Probe {
            addr: SocketAddr::new(ip, listen.port()),
            tls,
        })
    }

    /// Where the check dials.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Asks grpc.health.v1.Health/Check for `service` (`""`: the server as a whole); `Ok` when it is
    /// SERVING. Connecting, the handshake and the call together take at most `timeout`.
    pub async fn check(&self, service: &str, timeout: Duration) -> Result<(), ProbeError> {
        let addr = self.addr;
        let call = async {
            let channel = self.connect(timeout).await?;
            HealthClient::new(channel)
                .check(HealthCheckRequest {
                    service: service.to_owned(),
                })
                .await
                .map_err(|status| ProbeError::Unreachable {
                    addr,
                    reason: format!("{}: {}", status.code(), status.message()),
                })
        };
        let response = tokio::time::timeout(timeout, call)
            .await
            .map_err(|_| ProbeError::TimedOut { addr, timeout })??;
        match ServingStatus::try_from(response.into_inner().status) {
            Ok(ServingStatus::Serving) => Ok(()),
            status => Err(ProbeError::NotServing {
                addr,
                service: service.to_owned(),
                status: status.unwrap_or(ServingStatus::Unknown).as_str_name(),
            }),
        }
    }

    async fn connect(&self, timeout: Duration) -> Result<Channel, ProbeError> {
        let addr = self.addr;
        let unreachable = |error: tonic::transport::Error| ProbeError::Unreachable {
            addr,
            reason: causes(&error),
        };
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .expect("a socket address makes a valid URI")
            .connect_timeout(timeout);
        let Some(tls) = &self.tls else {
            return endpoint.connect().await.map_err(unreachable);
        };
        let connector = TlsConnector::from(tls.clone());
        endpoint
            .connect_with_connector(tower::service_fn(move |_| {
                let connector = connector.clone();
                async move {
                    let tcp = TcpStream::connect(addr).await?;
                    let tls = connector
                        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
                        .await?;
                    Ok::<_, std::io::Error>(TokioIo::new(tls))
                }
            }))
            .await
            .map_err(unreachable)
    }
}

/// An error and its causes, one line.
fn causes(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        // Wrappers often repeat their cause's words: say them once.
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Trusts exactly one certificate, the server's own, while it is valid; checks the handshake's signatures
/// as any verifier does.
#[derive(Debug)]
struct OwnCertificate {
    certificate: CertificateDer<'static>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for OwnCertificate {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, RustlsError> {
        use tokio_rustls::rustls::CertificateError;
        if end_entity.as_ref() != self.certificate.as_ref() {
            return Err(RustlsError::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ));
        }
        let (_, certificate) = x509_parser::parse_x509_certificate(end_entity)
            .map_err(|_| RustlsError::InvalidCertificate(CertificateError::BadEncoding))?;
        let validity = certificate.validity();
        let now = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
        if now < validity.not_before.timestamp() {
            return Err(RustlsError::InvalidCertificate(
                CertificateError::NotValidYet,
            ));
        }
        if now > validity.not_after.timestamp() {
            return Err(RustlsError::InvalidCertificate(CertificateError::Expired));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, RustlsError> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, RustlsError> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
