//! Caller identity end to end, over real sockets: mutual TLS with certificates made in the test, the
//! sidecar's x-forwarded-client-cert header, the development header, and refusal without an identity.
//! The production example policy tells the callers apart, so an allowed or denied call shows who the
//! server thought was calling.

mod common;

use std::time::Duration;

use chat_token_service::{
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

#[tokio::test]
async fn a_common_name_claiming_a_spiffe_id_is_unauthenticated() {
    let keys = LocalKeys::new();
    let mtls = mtls_server(&keys).await;
    // Signed by the trusted CA, so the handshake succeeds; only its CN claims the moderation service.
    let impostor = mtls.client_ca.client_with_common_name(MODERATION);
    let channel = tls_channel(mtls.server.addr, &mtls.server_ca, Some(&impostor))
        .await
        .unwrap();
    let mut request = Request::new(moderator_token());
    request
        .metadata_mut()
        .insert("x-caller-id", MODERATION.parse().unwrap());
    let status = TokenServiceClient::new(channel)
        .create_chat_token(request)
        .await
        .expect_err("a CN is not a SPIFFE id");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
}

#[tokio::test]
async fn an_untrusted_client_is_refused_at_the_handshake() {
    let keys = LocalKeys::new();
    let mtls = mtls_server(&keys).await;

    let stranger_ca = Ca::new("some other CA");
    let stranger = stranger_ca.client(MODERATION);
    assert_refused_at_handshake(
        tls_channel(mtls.server.addr, &mtls.server_ca, Some(&stranger)).await,
    )
    .await;
    assert_refused_at_handshake(tls_channel(mtls.server.addr, &mtls.server_ca, None).await).await;
}

/// In TLS 1.3 the client's side of the handshake completes before the server has checked the client's
/// certificate, so the server's refusal (a fatal TLS alert) may surface on connect or on the first call.
/// Either way the service itself never sees the call.
async fn assert_refused_at_handshake(connected: Result<Channel, tonic::transport::Error>) {
    let Ok(channel) = connected else { return };
    let status = TokenServiceClient::new(channel)
        .create_chat_token(moderator_token())
        .await
        .expect_err("the connection must not carry calls");
    let detail = format!("{status:?}");
    assert!(
        detail.contains("received fatal alert"),
        "expected a TLS alert from the server: {detail}"
    );
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
