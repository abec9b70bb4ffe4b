//! Smoke test with an independent client: `buf curl` (from npm, driven through npx) talks to the real
//! binary using nothing but server reflection — no proto files — as a person testing by hand would.
//! Needs `npx` on PATH; the test fails, rather than skips, without it.

mod common;

use std::process::{Command, Output};

use common::{Binary, ROOM_ARN};

/// Runs `buf curl` against `url` with `args` before it.
fn buf_curl(args: &[&str], url: String) -> Output {
    Command::new("npx")
        .args([
            "-y",
            "@bufbuild/buf",
            "curl",
            "--protocol",
            "grpc",
            "--http2-prior-knowledge",
        ])
        .args(args)
        .arg(url)
        .output()
        .expect("npx must be on PATH (Node.js) to run the buf curl smoke test")
}

fn buf_call(addr: std::net::SocketAddr, method: &str, body: &str) -> Output {
    buf_curl(&["-d", body], format!("http://{addr}/{method}"))
}

fn json(output: &Output) -> serde_json::Value {
    assert!(
        output.status.success(),
        "buf curl failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("buf curl prints JSON")
}

#[test]
fn buf_curl_lists_calls_and_health_checks_through_reflection() {
    let binary = Binary::start(&[]);
    let addr = binary.addr;

    let methods = buf_curl(&["--list-methods"], format!("http://{addr}"));
    let methods = String::from_utf8_lossy(&methods.stdout);
    assert!(
        methods.contains("ivschat.v1.TokenService/CreateChatToken"),
        "{methods}"
    );
    assert!(methods.contains("grpc.health.v1.Health/Check"), "{methods}");

    let body = serde_json::json!({
        "roomIdentifier": ROOM_ARN,
        "userId": "smoke-user",
        "capabilities": ["CHAT_TOKEN_CAPABILITY_SEND_MESSAGE"],
        "sessionDurationInMinutes": 30,
        "attributes": {"displayName": "Smoke"}
    })
    .to_string();
    let token = json(&buf_call(
        addr,
        "ivschat.v1.TokenService/CreateChatToken",
        &body,
    ));
    assert!(
        token["token"].as_str().unwrap().starts_with("v4.local."),
        "{token}"
    );
    assert!(token["tokenExpirationTime"].is_string(), "{token}");
    assert!(token["sessionExpirationTime"].is_string(), "{token}");

    let health = json(&buf_call(
        addr,
        "grpc.health.v1.Health/Check",
        r#"{"service":"ivschat.v1.TokenService"}"#,
    ));
    assert_eq!(health["status"], "SERVING");

    let refused = buf_call(
        addr,
        "ivschat.v1.TokenService/CreateChatToken",
        r#"{"roomIdentifier":"room-1","userId":"u"}"#,
    );
    assert!(!refused.status.success());
    let error: serde_json::Value = serde_json::from_slice(&refused.stderr).expect("JSON error");
    assert_eq!(error["code"], "invalid_argument");
    // ErrorInfo on every error (AIP-193), then the field violations.
    assert_eq!(error["details"][0]["type"], "google.rpc.ErrorInfo");
    assert_eq!(error["details"][1]["type"], "google.rpc.BadRequest");

    binary.signal("-TERM");
    assert_eq!(binary.wait().0.code(), Some(0));
}
