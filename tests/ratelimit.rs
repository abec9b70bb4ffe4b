//! Rate limits end to end: a real server on a loopback port, a real tonic client, the refusal as a gRPC
//! client sees it, and recovery after the advised delay.

mod common;

use std::time::Duration;

use chat_token_service::{config::Config, proto::ivschat::v1::CreateChatTokenRequest};
use common::{LocalKeys, ROOM_ARN, TestServer};
use tonic::Code;
use tonic_types::StatusExt;

fn for_user(user: &str) -> CreateChatTokenRequest {
    CreateChatTokenRequest {
        room_identifier: ROOM_ARN.into(),
        user_id: user.into(),
        ..Default::default()
    }
}

/// The server's config, from a TOML file as an operator would write it.
fn config_with_limits(keys: &LocalKeys, limits: &str) -> Config {
    let path = keys.dir.path().join("config.toml");
    let keys_file = keys.path.display();
    std::fs::write(
        &path,
        format!("[local_issuer]\nkeys_file = \"{keys_file}\"\n\n{limits}"),
    )
    .unwrap();
    Config::load(Some(&path)).expect("valid config")
}

#[tokio::test]
async fn a_user_over_the_limit_gets_resource_exhausted_with_retry_info_and_recovers_after_the_delay()
 {
    let keys = LocalKeys::new();
    let config = config_with_limits(
        &keys,
        r#"
        [[rate_limits]]
        name = "per-user"
        key = "user"
        rate = "1/s"
        burst = 2
        "#,
    );
    let server = TestServer::from_config(config).await;
    let mut client = server.client().await;

    for _ in 0..2 {
        client.create_chat_token(for_user("ann")).await.unwrap();
    }
    let status = client.create_chat_token(for_user("ann")).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(status.message(), "rate limit exceeded: per-user");

    let delay = status
        .get_details_retry_info()
        .expect("google.rpc.RetryInfo")
        .retry_delay
        .expect("a retry delay");
    assert!(
        Duration::ZERO < delay && delay <= Duration::from_secs(1),
        "{delay:?}"
    );
    let quota = status
        .get_details_quota_failure()
        .expect("google.rpc.QuotaFailure");
    assert_eq!(quota.violations.len(), 1);
    assert_eq!(quota.violations[0].subject, "limit:per-user");
    assert_eq!(
        quota.violations[0].description,
        "1/s per user per room, burst 2"
    );
    assert_eq!(status.metadata().get("retry-after").unwrap(), "1");

    client
        .create_chat_token(for_user("bob"))
        .await
        .expect("another user has a budget of their own");

    // The one real wait in the suite: the advised delay is the thing under test.
    tokio::time::sleep(delay).await;
    client
        .create_chat_token(for_user("ann"))
        .await
        .expect("retrying after the advised delay succeeds");

    server.shutdown().await.unwrap();
}
