//! Caller identity end to end, over real sockets: mutual TLS with certificates made in the test, the
//! sidecar's x-forwarded-client-cert header, the development header, and refusal without an identity.
//! The production example policy tells the callers apart, so an allowed or denied call shows who the
//! server thought was calling.

mod common;

use std::{sync::Arc, time::Duration};

use tokio_rustls::rustls::AlertDescription;

use chat_token_service::{
    config::CertificateName,
    config::{Config, TlsConfig},
    identity::IdentitySource,
    proto::ivschat::v1::{CreateChatTokenRequest, token_service_client::TokenServiceClient},
};
use common::{
    ACCOUNT_111_ROOM, LocalKeys, MODERATION, TestServer, WEB,
    pki::{Ca, Leaf, write_server_files},
    production_policy,
};
use tonic::{
    Code, Request,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};
use tonic_types::StatusExt;

/// Asks for a moderator token in account 111: only the moderation service may have one.
fn moderator_token() -> CreateChatTokenRequest {
    CreateChatTokenRequest {
        room_identifier: ACCOUNT_111_ROOM.into(),
        user_id: "mod-1".into(),
        capabilities: vec![2], // DISCONNECT_USER
        ..Default::default()
    }
}

fn config_with(keys: &LocalKeys, sources: Vec<IdentitySource>) -> Config {
    let mut config = keys.config();
    production_policy(&mut config);
    config.identity.sources = sources;
    config.identity.allow_anonymous = false;
    config
}

async fn tls_channel(
    addr: std::net::SocketAddr,
    server_ca: &Ca,
    client: Option<&Leaf>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(server_ca.pem()))
        .domain_name("localhost");
    if let Some(client) = client {
        tls = tls.identity(Identity::from_pem(&client.cert_pem, &client.key_pem));
    }
    Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
}

struct MtlsServer {
    server: TestServer,
    server_ca: Ca,
    client_ca: Ca,
    _dir: tempfile::TempDir,
}

async fn mtls_server(keys: &LocalKeys) -> MtlsServer {
    mtls_server_with(keys, |_| {}).await
}

async fn mtls_server_with(keys: &LocalKeys, tweak: impl FnOnce(&mut Config)) -> MtlsServer {
    let server_ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    let dir = tempfile::tempdir().unwrap();
    let (cert_file, key_file, ca_file) =
        write_server_files(dir.path(), &server_ca.server(), &client_ca);
    let mut config = config_with(keys, vec![IdentitySource::Mtls]);
    config.tls = Some(TlsConfig {
        cert_file,
        key_file,
        client_ca_file: Some(ca_file),
        handshake_timeout: Duration::from_secs(5),
        max_concurrent_handshakes: std::num::NonZeroUsize::new(128).unwrap(),
        max_handshakes_per_peer: std::num::NonZeroUsize::new(16).unwrap(),
    });
    tweak(&mut config);
    MtlsServer {
        server: TestServer::from_config(config).await,
        server_ca,
        client_ca,
        _dir: dir,
    }
}

#[tokio::test]
async fn mtls_identifies_a_trusted_client_by_its_spiffe_uri() {
    let keys = LocalKeys::new();
    let mtls = mtls_server(&keys).await;
    let addr = mtls.server.addr;

    let moderation = mtls.client_ca.client(MODERATION);
    let channel = tls_channel(addr, &mtls.server_ca, Some(&moderation))
        .await
        .unwrap();
    let token = TokenServiceClient::new(channel)
        .create_chat_token(moderator_token())
        .await
        .expect("the moderation service may mint moderator tokens")
        .into_inner()
        .token;
    keys.keys.verify(&token).unwrap();

    let web = mtls.client_ca.client(WEB);
    let channel = tls_channel(addr, &mtls.server_ca, Some(&web))
        .await
        .unwrap();
    let status = TokenServiceClient::new(channel)
        .create_chat_token(moderator_token())
        .await
        .expect_err("the web service may not");
    assert_eq!(status.code(), Code::PermissionDenied);
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "POLICY_DENIED");
    assert_eq!(
        info.metadata["policy_ids"],
        "moderation-only-for-moderators"
    );
}

/// With common names honoured (`identity.certificate_names` includes `cn`), a CN that looks like a
/// SPIFFE id is refused, while a plain CN identifies its caller (the positive control: policy, not
/// identification, refuses it).
#[tokio::test]
async fn a_common_name_claiming_a_spiffe_id_is_unauthenticated() {
    let keys = LocalKeys::new();
    let mtls = mtls_server_with(&keys, |config| {
        config.identity.certificate_names = vec![
            CertificateName::Uri,
            CertificateName::Dns,
            CertificateName::Cn,
        ];
    })
    .await;
    let call = async |leaf: &Leaf| {
        let channel = tls_channel(mtls.server.addr, &mtls.server_ca, Some(leaf))
            .await
            .unwrap();
        TokenServiceClient::new(channel)
            .create_chat_token(moderator_token())
            .await
    };

    // Signed by the trusted CA, so the handshake succeeds; only its CN claims the moderation service.
    let status = call(&mtls.client_ca.client_with_common_name(MODERATION))
        .await
        .expect_err("a CN is not a SPIFFE id");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");

    // A CN without a scheme is a caller: identified, then refused by policy, which does not know it.
    let status = call(&mtls.client_ca.client_with_common_name("moderation"))
        .await
        .expect_err("policy knows no caller \"moderation\"");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(
        status.get_details_error_info().expect("ErrorInfo").reason,
        "POLICY_DENIED"
    );
    // And the URI SAN still comes first.
    call(&mtls.client_ca.client(MODERATION))
        .await
        .expect("the moderation service, by its URI SAN");
}

#[tokio::test]
async fn an_untrusted_client_is_refused_at_the_handshake() {
    let keys = LocalKeys::new();
    let mtls = mtls_server(&keys).await;
    let addr = mtls.server.addr;

    let stranger_ca = Ca::new("some other CA");
    let stranger = stranger_ca.client(MODERATION);
    assert_eq!(
        handshake_alert(addr, &mtls.server_ca, Some(&stranger)).await,
        AlertDescription::UnknownCA,
        "a certificate from an unknown CA"
    );
    assert_eq!(
        handshake_alert(addr, &mtls.server_ca, None).await,
        AlertDescription::CertificateRequired,
        "no client certificate"
    );
    // Positive control: the same server serves a trusted client.
    let channel = tls_channel(
        addr,
        &mtls.server_ca,
        Some(&mtls.client_ca.client(MODERATION)),
    )
    .await
    .unwrap();
    TokenServiceClient::new(channel)
        .create_chat_token(moderator_token())
        .await
        .expect("a trusted client is served");
}

/// The TLS alert the server refuses a TLS 1.3 connection from `client` with. The client's side of the
/// handshake completes before the server has checked its certificate, so the alert arrives on the first
/// read; a connection that carries data instead, or fails otherwise, fails the test.
async fn handshake_alert(
    addr: std::net::SocketAddr,
    server_ca: &Ca,
    client: Option<&Leaf>,
) -> AlertDescription {
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(server_ca.pem().as_bytes()).unwrap())
        .unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots);
    let mut config = match client {
        Some(leaf) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(leaf.cert_pem.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    common::within("the server's TLS alert", async {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let error = match connector
            .connect("localhost".try_into().unwrap(), tcp)
            .await
        {
            Err(error) => error,
            Ok(mut tls) => {
                let _ = tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
                let mut buf = [0u8; 64];
                match tls.read(&mut buf).await {
                    Err(error) => error,
                    Ok(read) => {
                        panic!("the server carried data ({read} bytes) instead of an alert")
                    }
                }
            }
        };
        match error
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            Some(rustls::Error::AlertReceived(alert)) => *alert,
            _ => panic!("expected a TLS alert from the server, got {error:?}"),
        }
    })
    .await
}

#[tokio::test]
async fn xfcc_names_the_caller_behind_a_sidecar() {
    let keys = LocalKeys::new();
    let server = TestServer::from_config(config_with(&keys, vec![IdentitySource::Xfcc])).await;
    let mut client = server.client().await;

    let mut request = Request::new(moderator_token());
    request.metadata_mut().insert(
        "x-forwarded-client-cert",
        format!("By=spiffe://cluster.local/ns/chat/sa/cts;Hash=0a1b;URI={MODERATION}")
            .parse()
            .unwrap(),
    );
    client
        .create_chat_token(request)
        .await
        .expect("moderation via XFCC");

    let status = client
        .create_chat_token(moderator_token())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
}

#[tokio::test]
async fn a_forged_xfcc_is_unauthenticated_never_another_caller() {
    let keys = LocalKeys::new();
    // Even with the header source and anonymous callers behind it, a bad XFCC stops the call.
    let mut config = config_with(&keys, vec![IdentitySource::Xfcc, IdentitySource::Header]);
    config.identity.allow_anonymous = true;
    let server = TestServer::from_config(config).await;
    let mut client = server.client().await;

    // An unbalanced quote: a lenient parser reads the forged URI inside it.
    let mut unbalanced = Request::new(moderator_token());
    unbalanced.metadata_mut().insert(
        "x-forwarded-client-cert",
        format!(r#"Subject="CN=web;URI={WEB},URI={MODERATION}"#)
            .parse()
            .unwrap(),
    );
    unbalanced
        .metadata_mut()
        .insert("x-caller-id", MODERATION.parse().unwrap());
    let status = client.create_chat_token(unbalanced).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("malformed"), "{status:?}");

    // Two header fields: the sidecar's and one the client smuggled past it.
    let mut twice = Request::new(moderator_token());
    twice.metadata_mut().append(
        "x-forwarded-client-cert",
        format!("URI={WEB}").parse().unwrap(),
    );
    twice.metadata_mut().append(
        "x-forwarded-client-cert",
        format!("URI={MODERATION}").parse().unwrap(),
    );
    let status = client.create_chat_token(twice).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("more than once"), "{status:?}");
}

#[tokio::test]
async fn the_dev_header_names_the_caller_and_is_ignored_when_disabled() {
    let keys = LocalKeys::new();
    let with_header = |caller: &str| {
        let mut request = Request::new(moderator_token());
        request
            .metadata_mut()
            .insert("x-caller-id", caller.parse().unwrap());
        request
    };

    let server = TestServer::from_config(config_with(&keys, vec![IdentitySource::Header])).await;
    let mut client = server.client().await;
    client
        .create_chat_token(with_header(MODERATION))
        .await
        .expect("moderation via header");
    let status = client
        .create_chat_token(with_header(WEB))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);

    // Only XFCC enabled: the header is not an identity.
    let strict = TestServer::from_config(config_with(&keys, vec![IdentitySource::Xfcc])).await;
    let status = strict
        .client()
        .await
        .create_chat_token(with_header(MODERATION))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn rotated_certificates_take_effect_without_a_restart() {
    let keys = LocalKeys::new();
    let old_ca = Ca::new("old server CA");
    let client_ca = Ca::new("client CA");
    let dir = tempfile::tempdir().unwrap();
    let (cert_file, key_file, ca_file) =
        write_server_files(dir.path(), &old_ca.server(), &client_ca);
    let mut config = config_with(&keys, vec![IdentitySource::Mtls]);
    config.reload_interval = Duration::from_millis(100);
    config.tls = Some(TlsConfig {
        cert_file,
        key_file,
        client_ca_file: Some(ca_file),
        handshake_timeout: Duration::from_secs(5),
        max_concurrent_handshakes: std::num::NonZeroUsize::new(128).unwrap(),
        max_handshakes_per_peer: std::num::NonZeroUsize::new(16).unwrap(),
    });
    let server = TestServer::from_config(config).await;
    let client = client_ca.client(MODERATION);
    tls_channel(server.addr, &old_ca, Some(&client))
        .await
        .unwrap();

    // cert-manager writes a certificate from a new CA; clients that trust only the new CA get through
    // once the server has picked it up.
    let new_ca = Ca::new("new server CA");
    write_server_files(dir.path(), &new_ca.server(), &client_ca);
    tokio::time::timeout(Duration::from_secs(10), async {
        while tls_channel(server.addr, &new_ca, Some(&client))
            .await
            .is_err()
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the new certificate is served without a restart");
    assert!(
        tls_channel(server.addr, &old_ca, Some(&client))
            .await
            .is_err()
    );
}
