//! The IVS Chat HTTP API driven by the real AWS clients: the AWS CLI and boto3 (PyPI `awscli`, `boto3`,
//! installed into `target/venv` by tests/run.sh), against the real binary on a loopback port.
//!
//! These tests fail, not skip, when the clients are missing: run `tests/run.sh`, or point
//! `AWS_CLIENTS_VENV` at a virtualenv that has both.

mod common;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use common::{ACCOUNT_111_ROOM, Binary, MODERATION, ROOM_ARN, WEB, ivs_stub::IvsStub};
use serde_json::{Value, json};

const WEB_KEY_ID: &str = "CTSWEB0000000000001";
const WEB_SECRET: &str = "webSecretAccessKey0000000000000000000000";
/// A key of a caller the production policy gives no accounts to.
const STRANGER_KEY_ID: &str = "CTSSTRANGER00000001";
const STRANGER_SECRET: &str = "strangerSecretAccessKey00000000000000000";
/// The production entities' game server (SendEvent) and moderation tool (DeleteMessage).
const GAME_SERVER: &str = "spiffe://cluster.local/ns/games/sa/game-server";
const GAME_KEY: (&str, &str) = (
    "CTSGAMESERVER000001",
    "gameServerSecretAccessKey000000000000000",
);
const MODERATION_KEY: (&str, &str) = (
    "CTSMODERATION000001",
    "moderationSecretAccessKey000000000000000",
);

/// The virtualenv holding `aws` and `boto3`.
fn venv() -> PathBuf {
    let venv = std::env::var_os("AWS_CLIENTS_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/venv"));
    assert!(
        venv.join("bin/aws").exists() && venv.join("bin/python").exists(),
        "the AWS CLI and boto3 are needed in {}: run tests/run.sh (it installs them), or set AWS_CLIENTS_VENV",
        venv.display()
    );
    venv
}

/// An AWS client process with a clean, offline AWS environment: no config files, no instance metadata,
/// the standard retry mode with 3 attempts.
fn aws_client(program: &str, key: Option<(&str, &str)>) -> Command {
    let venv = venv();
    let mut command = Command::new(venv.join("bin").join(program));
    let (id, secret) = key.unwrap_or(("AKIDNOTUSED000000000", "not-used-secret-0000000000000000"));
    command
        .env_clear()
        .env("PATH", venv.join("bin"))
        .env("HOME", std::env::temp_dir())
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_DEFAULT_REGION", "us-west-2")
        .env("AWS_RETRY_MODE", "standard")
        .env("AWS_MAX_ATTEMPTS", "3")
        .env("AWS_PAGER", "")
        .env("AWS_ACCESS_KEY_ID", id)
        .env("AWS_SECRET_ACCESS_KEY", secret);
    command
}

/// `aws ivschat OPERATION --endpoint-url … ARGS`; `key: None` signs nothing.
fn aws_ivschat(
    operation: &str,
    addr: SocketAddr,
    key: Option<(&str, &str)>,
    args: &[&str],
) -> Output {
    let mut command = aws_client("aws", key);
    command.args([
        "ivschat",
        operation,
        "--endpoint-url",
        &format!("http://{addr}"),
    ]);
    if key.is_none() {
        command.arg("--no-sign-request");
    }
    command.args(args).output().unwrap()
}

/// `aws ivschat create-chat-token --endpoint-url … ARGS`.
fn cli(addr: SocketAddr, key: Option<(&str, &str)>, args: &[&str]) -> Output {
    aws_ivschat("create-chat-token", addr, key, args)
}

/// `aws ivschat disconnect-user --endpoint-url … ARGS`.
fn disconnect_cli(addr: SocketAddr, key: Option<(&str, &str)>, args: &[&str]) -> Output {
    aws_ivschat("disconnect-user", addr, key, args)
}

/// CreateChatToken through boto3: what happened, as `tests/aws/boto3_call.py` reports it.
fn boto3(addr: SocketAddr, key: Option<(&str, &str)>, request: Value) -> Value {
    boto3_operation("create_chat_token", addr, key, request)
}

/// `operation` (boto3's method name) through boto3: what happened, as `tests/aws/boto3_call.py` reports it.
fn boto3_operation(
    operation: &str,
    addr: SocketAddr,
    key: Option<(&str, &str)>,
    request: Value,
) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/aws/boto3_call.py");
    let mut command = aws_client("python", key);
    command.args([
        script.to_str().unwrap(),
        &format!("http://{addr}"),
        &request.to_string(),
        "--operation",
        operation,
    ]);
    if key.is_none() {
        command.arg("--unsigned");
    }
    let output = command.output().unwrap();
    assert!(output.status.success(), "boto3: {}", text(&output.stderr));
    serde_json::from_slice(&output.stdout).unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The exit code the AWS CLI gives for an error the service returned: 255 in version 1, 254 in version 2.
/// Read off the version of the `awscli` package installed in the venv (its `.dist-info` directory), not by
/// running `aws --version`: that is about a second of Python start-up, in every test process.
fn service_error_exit_code() -> i32 {
    let lib = venv().join("lib");
    let site_packages = std::fs::read_dir(&lib)
        .unwrap_or_else(|e| panic!("{}: {e}", lib.display()))
        .map(|python| python.unwrap().path().join("site-packages"));
    for dir in site_packages.filter(|dir| dir.is_dir()) {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            if let Some(version) = name
                .strip_prefix("awscli-")
                .and_then(|rest| rest.strip_suffix(".dist-info"))
            {
                return if version.starts_with("1.") { 255 } else { 254 };
            }
        }
    }
    panic!(
        "no awscli package in {}: run tests/run.sh, which installs it",
        lib.display()
    )
}

fn config_file(dir: &Path, toml: &str) -> String {
    let path = dir.join("config.toml");
    std::fs::write(&path, toml).unwrap();
    path.to_str().unwrap().to_owned()
}

/// Callers sign with SigV4 (keys for WEB and a stranger) or, on gRPC, name themselves in x-caller-id;
/// anonymous callers are refused; the production policy decides.
fn signed_callers_config(dir: &Path, extra: &str) -> String {
    let credentials = dir.join("credentials.toml");
    std::fs::write(
        &credentials,
        format!(
            "[[keys]]\naccess_key_id = \"{WEB_KEY_ID}\"\nsecret_access_key = \"{WEB_SECRET}\"\nprincipal = \"{WEB}\"\n\n\
             [[keys]]\naccess_key_id = \"{STRANGER_KEY_ID}\"\nsecret_access_key = \"{STRANGER_SECRET}\"\nprincipal = \"stranger\"\n\n\
             [[keys]]\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\nprincipal = \"{GAME_SERVER}\"\n\n\
             [[keys]]\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\nprincipal = \"{MODERATION}\"\n",
            GAME_KEY.0, GAME_KEY.1, MODERATION_KEY.0, MODERATION_KEY.1,
        ),
    )
    .unwrap();
    let policy = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/policy");
    config_file(
        dir,
        &format!(
            "{extra}\n\
             [identity]\nsources = [\"sigv4\", \"header\"]\nallow_anonymous = false\n\
             [identity.sigv4]\ncredentials_file = \"{}\"\nregions = [\"us-west-2\"]\n\
             [policy]\nfiles = [\"{}\"]\nentities_file = \"{}\"\n",
            credentials.display(),
            policy.join("production.cedar").display(),
            policy.join("production.entities.json").display(),
        ),
    )
}

/// Stops the binary; everything it logged.
fn stop(binary: Binary) -> Vec<String> {
    binary.signal("-TERM");
    let (status, log) = binary.wait();
    assert_eq!(status.code(), Some(0));
    log
}

/// The seed page's example, `--output text --query token`, `--cli-input-json`, and an out-of-range
/// session, on the embedded defaults (local issuer, anonymous callers, unsigned requests).
#[test]
fn the_aws_cli_works_with_the_reference_pages_options() {
    let binary = Binary::start(&[]);

    // The reference page's example (its typos fixed: option names, a 12-digit account).
    let output = cli(
        binary.addr,
        None,
        &[
            "--room-identifier",
            ROOM_ARN,
            "--user-id",
            "11231234",
            "--capabilities",
            "SEND_MESSAGE",
            "--session-duration-in-minutes",
            "30",
        ],
    );
    assert!(output.status.success(), "{}", text(&output.stderr));
    let printed: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert!(printed["token"].as_str().unwrap().starts_with("v4.local."));
    for field in ["tokenExpirationTime", "sessionExpirationTime"] {
        let time = printed[field].as_str().unwrap();
        // As the page prints them: 2022-03-16T04:44:09+00:00
        assert_eq!(time.len(), 25, "{time}");
        assert!(time.ends_with("+00:00"), "{time}");
    }

    let output = cli(
        binary.addr,
        None,
        &[
            "--room-identifier",
            ROOM_ARN,
            "--user-id",
            "u",
            "--output",
            "text",
            "--query",
            "token",
        ],
    );
    assert!(output.status.success(), "{}", text(&output.stderr));
    let token = text(&output.stdout);
    assert!(
        token.starts_with("v4.local.") && token.trim_end().lines().count() == 1,
        "{token}"
    );

    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input.json");
    std::fs::write(
        &input,
        json!({
            "roomIdentifier": ROOM_ARN, "userId": "11231234",
            "capabilities": ["SEND_MESSAGE", "DELETE_MESSAGE"], "sessionDurationInMinutes": 180,
            "attributes": {"displayName": "Ann"},
        })
        .to_string(),
    )
    .unwrap();
    let output = cli(
        binary.addr,
        None,
        &["--cli-input-json", &format!("file://{}", input.display())],
    );
    assert!(output.status.success(), "{}", text(&output.stderr));

    let output = cli(
        binary.addr,
        None,
        &[
            "--room-identifier",
            ROOM_ARN,
            "--user-id",
            "u",
            "--session-duration-in-minutes",
            "181",
        ],
    );
    assert_eq!(output.status.code(), Some(service_error_exit_code()));
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains(
            "An error occurred (ValidationException) when calling the CreateChatToken operation"
        ) && stderr.contains("sessionDurationInMinutes must be between 1 and 180 minutes, got 181"),
        "{stderr}"
    );

    // boto3 raises the modeled exception, with IVS's reason and field list.
    let result = boto3(
        binary.addr,
        None,
        json!({"roomIdentifier": "arn:aws:ivschat:us-west-2:123:room/ok", "userId": "u", "sessionDurationInMinutes": 181}),
    );
    assert_eq!(result["exception"], "ValidationException", "{result}");
    assert_eq!(result["reason"], "FIELD_VALIDATION_FAILED", "{result}");
    assert_eq!(
        result["fieldList"],
        json!([{"name": "sessionDurationInMinutes", "message": "must be between 1 and 180 minutes, got 181"}])
    );
    // The call's trace id.
    assert_eq!(result["requestId"].as_str().unwrap().len(), 32, "{result}");
    stop(binary);
}

/// Under TLS the CLI negotiates HTTP/1.1 by ALPN beside gRPC's h2.
#[test]
fn the_aws_cli_works_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let ca = common::pki::Ca::new("test CA");
    let (cert, key, _) = common::pki::write_server_files(dir.path(), &ca.server(), &ca);
    let ca_file = dir.path().join("ca.crt");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let config = config_file(
        dir.path(),
        &format!(
            "[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            cert.display(),
            key.display()
        ),
    );
    let binary = Binary::start(&[("CTS_CONFIG", &config)]);
    let output = aws_client("aws", None)
        .args([
            "ivschat",
            "create-chat-token",
            "--no-sign-request",
            "--endpoint-url",
        ])
        .arg(format!("https://localhost:{}", binary.addr.port()))
        .arg("--ca-bundle")
        .arg(&ca_file)
        .args([
            "--room-identifier",
            ROOM_ARN,
            "--user-id",
            "u",
            "--output",
            "text",
            "--query",
            "token",
        ])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(text(&output.stdout).starts_with("v4.local."));
    stop(binary);
}

/// SigV4 callers: a good signature is the key's principal; a bad one, an unsigned call with anonymous
/// callers off, and a policy refusal are all AccessDeniedException.
#[test]
fn signed_callers_are_identified_and_refusals_are_access_denied() {
    let dir = tempfile::tempdir().unwrap();
    let config = signed_callers_config(dir.path(), "");
    let binary = Binary::start(&[("CTS_CONFIG", &config)]);
    let web = Some((WEB_KEY_ID, WEB_SECRET));
    let room = format!("--room-identifier={ACCOUNT_111_ROOM}");

    let output = cli(
        binary.addr,
        web,
        &[
            &room,
            "--user-id",
            "u",
            "--output",
            "text",
            "--query",
            "token",
        ],
    );
    assert!(output.status.success(), "{}", text(&output.stderr));

    let denied = |output: Output, why: &str| {
        assert_eq!(output.status.code(), Some(service_error_exit_code()));
        let stderr = text(&output.stderr);
        assert!(
            stderr.contains("An error occurred (AccessDeniedException)") && stderr.contains(why),
            "{stderr}"
        );
    };
    denied(
        cli(
            binary.addr,
            Some((WEB_KEY_ID, "a-wrong-secret-key-000000000000000000000")),
            &[&room, "--user-id", "u"],
        ),
        "the request signature is not valid for this service",
    );
    denied(
        cli(
            binary.addr,
            Some(("CTSUNKNOWN000000001", WEB_SECRET)),
            &[&room, "--user-id", "u"],
        ),
        "the request signature is not valid for this service",
    );
    denied(
        cli(binary.addr, None, &[&room, "--user-id", "u"]),
        "none of the configured identity sources identified the caller",
    );
    // Production policy: web sessions last at most 60 minutes.
    denied(
        cli(
            binary.addr,
            web,
            &[
                &room,
                "--user-id",
                "u",
                "--session-duration-in-minutes",
                "90",
            ],
        ),
        "policy does not allow",
    );
    denied(
        cli(
            binary.addr,
            Some((STRANGER_KEY_ID, STRANGER_SECRET)),
            &[&room, "--user-id", "u"],
        ),
        "policy does not allow",
    );

    // Production policy: only moderators disconnect users; a web caller cannot.
    denied(
        disconnect_cli(binary.addr, web, &[&room, "--user-id=u", "--reason=spam"]),
        "policy does not allow",
    );

    // A signature for a region not on the allow-list.
    let mut command = aws_client("aws", web);
    command.env("AWS_DEFAULT_REGION", "eu-west-1").args([
        "ivschat",
        "create-chat-token",
        "--endpoint-url",
        &format!("http://{}", binary.addr),
        &room,
        "--user-id",
        "u",
    ]);
    denied(command.output().unwrap(), "region that is not allowed");

    // Secrets never reach the log: all of it, once the binary has exited.
    let log = stop(binary).join("\n");
    assert!(
        log.contains("audit"),
        "the positive control: calls were logged"
    );
    assert!(
        !log.contains(WEB_SECRET) && !log.contains("a-wrong-secret"),
        "{log}"
    );
}

/// A rate limit refuses with ThrottlingException and Retry-After, after the SDK's own retries: the service
/// saw every attempt.
/// The signed Host must be a name callers reach the service by (`identity.sigv4.hosts`): a signature made
/// for another name (a request relayed from elsewhere) gets the answer any bad signature gets, and the log
/// says which check refused it; with the name among the hosts the same call is served.
#[test]
fn a_signature_for_a_host_outside_identity_sigv4_hosts_is_refused_like_any_bad_signature() {
    let dir = tempfile::tempdir().unwrap();
    let config = signed_callers_config(dir.path(), "");
    let room = format!("--room-identifier={ACCOUNT_111_ROOM}");
    let web = Some((WEB_KEY_ID, WEB_SECRET));

    // Served as chat.internal only: the CLI signs for 127.0.0.1:PORT.
    let binary = Binary::start(&[
        ("CTS_CONFIG", &config),
        ("CTS_IDENTITY__SIGV4__HOSTS", r#"["chat.internal"]"#),
    ]);
    let output = cli(binary.addr, web, &[&room, "--user-id", "u"]);
    assert_eq!(
        output.status.code(),
        Some(service_error_exit_code()),
        "{}",
        text(&output.stderr)
    );
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("An error occurred (AccessDeniedException)")
            && stderr.contains("the request signature is not valid for this service"),
        "{stderr}"
    );
    let log = stop(binary);
    assert!(
        log.iter()
            .any(|l| l.contains("the signed host is not one of identity.sigv4.hosts")),
        "{log:?}"
    );

    // Positive control: the same call, with the name it is signed for among the hosts.
    let binary = Binary::start(&[
        ("CTS_CONFIG", &config),
        (
            "CTS_IDENTITY__SIGV4__HOSTS",
            r#"["chat.internal", "127.0.0.1"]"#,
        ),
    ]);
    let output = cli(
        binary.addr,
        web,
        &[
            &room,
            "--user-id",
            "u",
            "--output",
            "text",
            "--query",
            "token",
        ],
    );
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(text(&output.stdout).starts_with("v4.local."));
    stop(binary);
}

#[test]
fn rate_limited_calls_are_throttling_exceptions_after_the_sdks_retries() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(
        dir.path(),
        "[[rate_limits]]\nname = \"per-user\"\nkey = \"user\"\nrate = \"1/h\"\nburst = 1\n",
    );
    let binary = Binary::start(&[("CTS_CONFIG", &config)]);
    let request = json!({"roomIdentifier": ROOM_ARN, "userId": "busy-user"});
    let first = boto3(binary.addr, None, request.clone());
    assert!(first["token"].is_string(), "{first}");

    let throttled = boto3(binary.addr, None, request);
    assert_eq!(throttled["exception"], "ThrottlingException", "{throttled}");
    assert_eq!(throttled["status"], 429);
    assert_eq!(
        throttled["retryAttempts"], 2,
        "AWS_MAX_ATTEMPTS=3: {throttled}"
    );
    let retry_after: u64 = throttled["retryAfter"].as_str().unwrap().parse().unwrap();
    assert!((3000..=3600).contains(&retry_after), "{throttled}");
    assert_eq!(
        throttled["error"]["Message"],
        "rate limit exceeded: per-user"
    );

    let refusals = stop(binary)
        .into_iter()
        .filter(|line| line.contains("outcome=\"rate_limited\""))
        .count();
    assert_eq!(
        refusals, 3,
        "the first attempt and two retries reached the service"
    );
}

/// With the IVS issuer: CLI → service → IVS (the stub) and back with IVS's token; IVS's errors come
/// back as IVS's own shapes.
#[tokio::test(flavor = "multi_thread")]
async fn the_cli_reaches_ivs_through_the_service() {
    let stub = IvsStub::start().await;
    let endpoint = stub.endpoint();
    let binary = Binary::start(&[
        ("CTS_ISSUER", "ivs"),
        ("CTS_IVS__ENDPOINT_URL", &endpoint),
        ("CTS_IVS__MAX_ATTEMPTS", "1"),
        ("AWS_ACCESS_KEY_ID", "AKIDOFTHESERVICE0000"),
        ("AWS_SECRET_ACCESS_KEY", "service-secret"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ]);
    let room = format!("--room-identifier={ACCOUNT_111_ROOM}");
    let output = tokio::task::spawn_blocking({
        let args = [
            room.clone(),
            "--user-id=11231234".into(),
            "--capabilities=SEND_MESSAGE".into(),
        ];
        let addr = binary.addr;
        move || {
            let mut command = aws_client("aws", None);
            command
                .args([
                    "ivschat",
                    "create-chat-token",
                    "--no-sign-request",
                    "--endpoint-url",
                ])
                .arg(format!("http://{addr}"))
                .args(args);
            command.output().unwrap()
        }
    })
    .await
    .unwrap();
    assert!(output.status.success(), "{}", text(&output.stderr));
    let printed: Value = serde_json::from_slice(&output.stdout).unwrap();
    let calls = stub.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].operation, "CreateChatToken");
    assert_eq!(calls[0].body["userId"], "11231234");
    assert_eq!(
        printed["token"],
        calls[0].response.as_ref().unwrap()["token"]
    );

    let (not_found, pending) = tokio::task::spawn_blocking({
        let addr = binary.addr;
        move || {
            let call = |room: &str| {
                let mut command = aws_client("aws", None);
                command
                    .args([
                        "ivschat",
                        "create-chat-token",
                        "--no-sign-request",
                        "--endpoint-url",
                    ])
                    .arg(format!("http://{addr}"))
                    .arg(format!(
                        "--room-identifier=arn:aws:ivschat:us-west-2:111111111111:room/{room}"
                    ))
                    .arg("--user-id=u");
                text(&command.output().unwrap().stderr)
            };
            (call("notfound"), call("pending"))
        }
    })
    .await
    .unwrap();
    assert!(
        not_found.contains("(ResourceNotFoundException)"),
        "{not_found}"
    );
    assert!(pending.contains("(PendingVerification)"), "{pending}");

    let output = tokio::task::spawn_blocking({
        let addr = binary.addr;
        move || disconnect_cli(addr, None, &[&room, "--user-id=11231234", "--reason=spam"])
    })
    .await
    .unwrap();
    assert!(output.status.success(), "{}", text(&output.stderr));
    let calls = stub.calls();
    let disconnect = calls.last().unwrap();
    assert_eq!(disconnect.operation, "DisconnectUser");
    assert_eq!(disconnect.body["userId"], "11231234");
    assert_eq!(disconnect.body["reason"], "spam");
    stop(binary);
}

/// The same requests over gRPC and over the HTTP API: the same decisions and the same audit events.
#[tokio::test(flavor = "multi_thread")]
async fn grpc_and_http_give_the_same_decision_and_audit_event() {
    use chat_token_service::proto::ivschat::v1::CreateChatTokenRequest;

    let dir = tempfile::tempdir().unwrap();
    let config = signed_callers_config(dir.path(), "log_format = \"json\"");
    let binary = Binary::start(&[("CTS_CONFIG", &config)]);
    let mut client = binary.client().await;

    let cases = [
        // Issued.
        json!({"roomIdentifier": ACCOUNT_111_ROOM, "userId": "u1", "capabilities": ["SEND_MESSAGE"], "sessionDurationInMinutes": 45}),
        // Denied by policy: web sessions last at most 60 minutes.
        json!({"roomIdentifier": ACCOUNT_111_ROOM, "userId": "u2", "sessionDurationInMinutes": 90}),
        // Denied by policy: an account web does not serve.
        json!({"roomIdentifier": common::ACCOUNT_222_ROOM, "userId": "u3"}),
        // Invalid.
        json!({"roomIdentifier": ACCOUNT_111_ROOM, "userId": "u4", "sessionDurationInMinutes": 181}),
    ];
    for case in cases {
        let mut request = tonic::Request::new(CreateChatTokenRequest {
            room_identifier: case["roomIdentifier"].as_str().unwrap().into(),
            user_id: case["userId"].as_str().unwrap().into(),
            capabilities: case["capabilities"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|_| 1)
                .collect(),
            session_duration_in_minutes: case["sessionDurationInMinutes"]
                .as_i64()
                .map(|m| m as i32),
            attributes: Default::default(),
        });
        request
            .metadata_mut()
            .insert("x-caller-id", WEB.parse().unwrap());
        let grpc = client.create_chat_token(request).await;
        let grpc_audit = audit_event(&binary);

        let http = tokio::task::spawn_blocking({
            let (addr, case) = (binary.addr, case.clone());
            move || boto3(addr, Some((WEB_KEY_ID, WEB_SECRET)), case)
        })
        .await
        .unwrap();
        let http_audit = audit_event(&binary);

        let decision = match (&grpc, http["exception"].as_str()) {
            (Ok(_), None) => "issued",
            (Err(status), Some("AccessDeniedException"))
                if status.code() == tonic::Code::PermissionDenied =>
            {
                "denied"
            }
            (Err(status), Some("ValidationException"))
                if status.code() == tonic::Code::InvalidArgument =>
            {
                "invalid"
            }
            _ => panic!("the doors disagree on {case}: gRPC {grpc:?}, HTTP {http}"),
        };
        assert_eq!(grpc_audit, http_audit, "{decision}: {case}");
    }
    stop(binary);
}

/// The audit event of the next refusal or issue: its fields and its audit span's fields, without the
/// per-call parts (time, token id hash, trace id).
fn audit_event(binary: &Binary) -> Value {
    loop {
        let line = binary
            .log
            .recv_timeout(Duration::from_secs(10))
            .expect("an audit event");
        let Ok(event) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        if event["target"] != "audit" {
            continue;
        }
        let mut fields = event["fields"].clone();
        fields.as_object_mut().unwrap().remove("token_id_hash");
        // The id IVS (the stub) made for a delivered event differs per call.
        fields.as_object_mut().unwrap().remove("id_hash");
        // Refusals before a request is valid have no audit span; the transport's span differs by door.
        let span = &event["span"];
        let audit = if span["name"] == "audit" {
            let mut audit = span.clone();
            // The same caller, identified by each door's own source (header here, sigv4 there).
            let source = audit.as_object_mut().unwrap().remove("caller_source");
            assert!(
                matches!(
                    source.as_ref().and_then(Value::as_str),
                    Some("header" | "sigv4")
                ),
                "{event}"
            );
            audit
        } else {
            Value::Null
        };
        return json!({"fields": fields, "audit": audit});
    }
}

/// `aws ivschat disconnect-user` against the local issuer: the user's tokens minted before it stop
/// verifying, and the reason is held to IVS's 1–256 characters, reported by IVS's field name.
#[tokio::test(flavor = "multi_thread")]
async fn the_aws_cli_disconnects_a_user() {
    use chat_token_service::proto::ivschat::v1::{
        CreateChatTokenRequest, VerifyChatTokenRequest,
        moderation_service_client::ModerationServiceClient,
    };

    let binary = Binary::start(&[]);
    let minted = binary
        .client()
        .await
        .create_chat_token(CreateChatTokenRequest {
            room_identifier: ROOM_ARN.into(),
            user_id: "troll".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let disconnect = |reason: String| {
        let reason = format!("--reason={reason}");
        disconnect_cli(
            binary.addr,
            None,
            &[
                &format!("--room-identifier={ROOM_ARN}"),
                "--user-id=troll",
                &reason,
            ],
        )
    };

    let output = disconnect("r".repeat(257));
    assert_eq!(
        output.status.code(),
        Some(service_error_exit_code()),
        "{}",
        text(&output.stderr)
    );
    let stderr = text(&output.stderr);
    assert!(stderr.contains("ValidationException"), "{stderr}");
    assert!(stderr.contains("reason"), "{stderr}");

    let output = disconnect("r".repeat(256));
    assert!(output.status.success(), "{}", text(&output.stderr));

    let mut moderation = ModerationServiceClient::connect(format!("http://{}", binary.addr))
        .await
        .unwrap();
    let refused = moderation
        .verify_chat_token(VerifyChatTokenRequest { token: minted })
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert!(
        String::from_utf8_lossy(refused.details()).contains("TOKEN_REVOKED"),
        "{refused:?}"
    );
    stop(binary);
}

/// The IVS issuer against the stub, callers signing with SigV4 under the production policy, and the
/// SendEvent quota guard at 2 calls: the configuration of the messaging tests below.
fn messaging_binary(dir: &Path, stub: &IvsStub, extra: &str) -> Binary {
    let config = signed_callers_config(
        dir,
        &format!(
            "issuer = \"ivs\"\n{extra}\n\
             [ivs]\nendpoint_url = \"{}\"\nmax_attempts = 1\nsend_event_quota = \"1/h\"\nsend_event_quota_burst = 2\n",
            stub.endpoint()
        ),
    );
    Binary::start(&[
        ("CTS_CONFIG", &config),
        ("AWS_ACCESS_KEY_ID", "AKIDOFTHESERVICE0000"),
        ("AWS_SECRET_ACCESS_KEY", "service-secret"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ])
}

/// `aws ivschat send-event` and `delete-message` reach IVS (the stub) with IVS's bodies and print IVS's
/// ids; boto3 gets AccessDeniedException for a caller the policy refuses and ThrottlingException past the
/// quota guard, neither reaching IVS; IVS's limits are enforced at their edges, by IVS's field names.
#[tokio::test(flavor = "multi_thread")]
async fn the_aws_cli_and_boto3_send_events_and_delete_messages_through_ivs() {
    let stub = IvsStub::start().await;
    let dir = tempfile::tempdir().unwrap();
    let binary = messaging_binary(dir.path(), &stub, "");
    let addr = binary.addr;
    let room = format!("--room-identifier={ACCOUNT_111_ROOM}");
    let blocking = |f: Box<dyn FnOnce() -> Output + Send>| tokio::task::spawn_blocking(f);

    let output = blocking(Box::new({
        let room = room.clone();
        move || {
            aws_ivschat(
                "send-event",
                addr,
                Some(GAME_KEY),
                &[
                    &room,
                    "--event-name=game:score",
                    "--attributes",
                    "home=3,away=1",
                ],
            )
        }
    }))
    .await
    .unwrap();
    assert!(output.status.success(), "{}", text(&output.stderr));
    let printed: Value = serde_json::from_slice(&output.stdout).unwrap();
    let calls = stub.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].operation, "SendEvent");
    assert_eq!(
        calls[0].body,
        json!({"roomIdentifier": ACCOUNT_111_ROOM, "eventName": "game:score", "attributes": {"home": "3", "away": "1"}})
    );
    assert_eq!(
        printed,
        json!({"id": calls[0].response.as_ref().unwrap()["id"]})
    );
    let event_id = printed["id"].as_str().unwrap().to_owned();

    let output = blocking(Box::new({
        let (room, id) = (room.clone(), format!("--id={event_id}"));
        move || {
            aws_ivschat(
                "delete-message",
                addr,
                Some(MODERATION_KEY),
                &[&room, &id, "--reason=spoiler"],
            )
        }
    }))
    .await
    .unwrap();
    assert!(output.status.success(), "{}", text(&output.stderr));
    let printed: Value = serde_json::from_slice(&output.stdout).unwrap();
    let calls = stub.calls();
    assert_eq!(calls[1].operation, "DeleteMessage");
    assert_eq!(
        calls[1].body,
        json!({"roomIdentifier": ACCOUNT_111_ROOM, "id": event_id, "reason": "spoiler"})
    );
    assert_eq!(
        printed,
        json!({"id": calls[1].response.as_ref().unwrap()["id"]})
    );

    let (denied, second, throttled, edges) = tokio::task::spawn_blocking(move || {
        let send = |key, name: &str| {
            boto3_operation(
                "send_event",
                addr,
                Some(key),
                json!({"roomIdentifier": ACCOUNT_111_ROOM, "eventName": name}),
            )
        };
        let denied = send((WEB_KEY_ID, WEB_SECRET), "game:score");
        let second = send(GAME_KEY, "stream:start");
        let throttled = send(GAME_KEY, "stream:start");
        let edges = [
            send(GAME_KEY, &"e".repeat(100)),
            send(GAME_KEY, &"e".repeat(101)),
            boto3_operation(
                "send_event",
                addr,
                Some(GAME_KEY),
                json!({"roomIdentifier": ACCOUNT_111_ROOM, "eventName": "game:score", "attributes": {"k": "v".repeat(1024)}}),
            ),
            boto3_operation(
                "delete_message",
                addr,
                Some(MODERATION_KEY),
                json!({"roomIdentifier": ACCOUNT_111_ROOM, "id": "AbCdEf123456", "reason": "r".repeat(257)}),
            ),
            boto3_operation(
                "delete_message",
                addr,
                Some(MODERATION_KEY),
                json!({"roomIdentifier": ACCOUNT_111_ROOM, "id": "AbCdEf1234567", "reason": "r".repeat(256)}),
            ),
        ];
        (denied, second, throttled, edges)
    })
    .await
    .unwrap();
    assert_eq!(denied["exception"], "AccessDeniedException", "{denied}");
    assert!(second["id"].is_string(), "{second}");
    assert_eq!(throttled["exception"], "ThrottlingException", "{throttled}");
    assert_eq!(
        throttled["error"]["Message"],
        "rate limit exceeded: ivs-send-event-quota"
    );
    assert_eq!(
        throttled["retryAttempts"], 2,
        "AWS_MAX_ATTEMPTS=3: {throttled}"
    );
    // The first edge (100 characters) is valid, and refused by policy: not a name our clients handle.
    assert_eq!(
        edges[0]["exception"], "AccessDeniedException",
        "{}",
        edges[0]
    );
    for (edge, field) in edges[1..]
        .iter()
        .zip(["eventName", "attributes", "reason", "id"])
    {
        assert_eq!(edge["exception"], "ValidationException", "{edge}");
        assert_eq!(edge["fieldList"][0]["name"], field, "{edge}");
    }
    let sent: Vec<_> = stub
        .calls()
        .into_iter()
        .filter(|call| call.operation == "SendEvent")
        .collect();
    assert_eq!(
        sent.len(),
        2,
        "neither the refused caller, the throttled calls nor the invalid ones reached IVS"
    );
    stop(binary);
}

/// The same messaging calls over gRPC and over the HTTP API: the same decisions and the same audit events.
#[tokio::test(flavor = "multi_thread")]
async fn grpc_and_http_give_the_same_messaging_decisions_and_audit_events() {
    use chat_token_service::proto::ivschat::v1::{
        DeleteMessageRequest, SendEventRequest, messaging_service_client::MessagingServiceClient,
    };

    let stub = IvsStub::start().await;
    let dir = tempfile::tempdir().unwrap();
    let binary = messaging_binary(dir.path(), &stub, "log_format = \"json\"");
    let mut client = MessagingServiceClient::connect(format!("http://{}", binary.addr))
        .await
        .unwrap();

    let cases = [
        // Sent.
        (
            GAME_SERVER,
            GAME_KEY,
            "send_event",
            json!({"roomIdentifier": ACCOUNT_111_ROOM, "eventName": "game:score", "attributes": {"home": "3"}}),
        ),
        // Denied by policy: web front ends send no events.
        (
            WEB,
            (WEB_KEY_ID, WEB_SECRET),
            "send_event",
            json!({"roomIdentifier": ACCOUNT_111_ROOM, "eventName": "game:score"}),
        ),
        // Invalid.
        (
            GAME_SERVER,
            GAME_KEY,
            "send_event",
            json!({"roomIdentifier": ACCOUNT_111_ROOM, "eventName": "e".repeat(101)}),
        ),
        // Deleted.
        (
            MODERATION,
            MODERATION_KEY,
            "delete_message",
            json!({"roomIdentifier": ACCOUNT_111_ROOM, "id": "AbCdEf123456", "reason": "spam"}),
        ),
        // Denied by policy: no reason.
        (
            MODERATION,
            MODERATION_KEY,
            "delete_message",
            json!({"roomIdentifier": ACCOUNT_111_ROOM, "id": "AbCdEf123456"}),
        ),
    ];
    for (caller, key, operation, case) in cases {
        let field = |name: &str| case[name].as_str().unwrap_or_default().to_owned();
        let grpc = match operation {
            "send_event" => {
                let mut request = tonic::Request::new(SendEventRequest {
                    room_identifier: field("roomIdentifier"),
                    event_name: field("eventName"),
                    attributes: serde_json::from_value(case["attributes"].clone())
                        .unwrap_or_default(),
                });
                request
                    .metadata_mut()
                    .insert("x-caller-id", caller.parse().unwrap());
                client.send_event(request).await.map(|r| r.into_inner().id)
            }
            _ => {
                let mut request = tonic::Request::new(DeleteMessageRequest {
                    room_identifier: field("roomIdentifier"),
                    id: field("id"),
                    reason: field("reason"),
                });
                request
                    .metadata_mut()
                    .insert("x-caller-id", caller.parse().unwrap());
                client
                    .delete_message(request)
                    .await
                    .map(|r| r.into_inner().id)
            }
        };
        let grpc_audit = audit_event(&binary);
        let http = tokio::task::spawn_blocking({
            let (addr, case) = (binary.addr, case.clone());
            move || boto3_operation(operation, addr, Some(key), case)
        })
        .await
        .unwrap();
        let http_audit = audit_event(&binary);

        let decision = match (&grpc, http["exception"].as_str()) {
            (Ok(_), None) => "done",
            (Err(status), Some("AccessDeniedException"))
                if status.code() == tonic::Code::PermissionDenied =>
            {
                "denied"
            }
            (Err(status), Some("ValidationException"))
                if status.code() == tonic::Code::InvalidArgument =>
            {
                "invalid"
            }
            _ => panic!("the doors disagree on {case}: gRPC {grpc:?}, HTTP {http}"),
        };
        assert_eq!(grpc_audit, http_audit, "{decision}: {case}");
        if operation == "delete_message" && decision == "done" {
            // A short hash of the message id: the first 12 hex digits of its SHA-256.
            let digest = ring::digest::digest(&ring::digest::SHA256, b"AbCdEf123456");
            assert_eq!(
                grpc_audit["audit"]["message_hash"],
                hex::encode(&digest.as_ref()[..6]),
                "{grpc_audit}"
            );
        }
        let audit = grpc_audit.to_string();
        assert!(
            !audit.contains("\"3\"") && !audit.contains("spam") && !audit.contains("AbCdEf123456"),
            "no attribute value, reason or message id in the audit event: {audit}"
        );
    }
    assert_eq!(
        stub.calls().len(),
        4,
        "two sent and two deleted, one of each per door"
    );
    stop(binary);
}

/// With the local issuer and no webhook, `aws ivschat send-event` is told what to configure.
#[test]
fn the_aws_cli_is_told_how_to_enable_messaging_with_the_local_issuer() {
    let binary = Binary::start(&[]);
    let output = aws_ivschat(
        "send-event",
        binary.addr,
        None,
        &[
            &format!("--room-identifier={ROOM_ARN}"),
            "--event-name=game:score",
        ],
    );
    assert_eq!(output.status.code(), Some(service_error_exit_code()));
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains(
            "An error occurred (ValidationException) when calling the SendEvent operation"
        ) && stderr.contains("messaging.webhook_url"),
        "{stderr}"
    );
    stop(binary);
}
