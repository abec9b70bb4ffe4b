use super::*;
use aws_sigv4::http_request::SignableBody;

const KEY_ID: &str = "CTSTEST000000000001";
const SECRET: &str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";
const BODY: &[u8] =
    br#"{"roomIdentifier":"arn:aws:ivschat:us-west-2:123456789012:room/abc","userId":"u"}"#;

fn verifier(regions: &[&str]) -> (tempfile::TempDir, Verifier) {
    verifier_for(regions, &[])
}

fn verifier_for(regions: &[&str], hosts: &[&str]) -> (tempfile::TempDir, Verifier) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("credentials.toml");
    std::fs::write(
        &path,
        format!(
            "[[keys]]\naccess_key_id = \"{KEY_ID}\"\nsecret_access_key = \"{SECRET}\"\nprincipal = \"web\"\n"
        ),
    )
    .unwrap();
    let settings = Sigv4Config {
        regions: regions.iter().map(|r| Region::parse(r).unwrap()).collect(),
        hosts: hosts.iter().map(|h| h.to_string()).collect(),
        ..Sigv4Config::default()
    };
    let verifier = Verifier::load(&path, &settings).unwrap();
    (dir, verifier)
}

/// A request signed the way an SDK signs it, with `secret`, for `region` and `service`, at `at`.
fn signed(
    secret: &str,
    region: &str,
    service: &str,
    at: SystemTime,
    body: &[u8],
) -> http::request::Parts {
    let identity =
        aws_credential_types::Credentials::new(KEY_ID, secret, None, None, "test").into();
    let params = aws_sigv4::sign::v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name(service)
        .time(at)
        .settings(SigningSettings::default())
        .build()
        .unwrap()
        .into();
    let headers = [
        ("host", "127.0.0.1:50051"),
        ("content-type", "application/json"),
    ];
    let signable = SignableRequest::new(
        "POST",
        "http://127.0.0.1:50051/CreateChatToken",
        headers.into_iter(),
        SignableBody::Bytes(body),
    )
    .unwrap();
    let (instructions, _) = sign(signable, &params).unwrap().into_parts();
    let mut request = http::Request::post("/CreateChatToken")
        .header("host", "127.0.0.1:50051")
        .header("content-type", "application/json")
        .body(())
        .unwrap();
    instructions.apply_to_request_http1x(&mut request);
    request.into_parts().0
}

#[test]
fn a_request_signed_with_the_right_key_yields_its_principal() {
    let (_dir, verifier) = verifier(&[]);
    let now = SystemTime::now();
    let parts = signed(SECRET, "us-west-2", IVS_SIGNING_NAME, now, BODY);
    assert_eq!(
        verifier.verify(&parts, BODY, now),
        Verdict::Verified(Caller::with_source("web", CallerSource::Sigv4))
    );
}

#[test]
fn wrong_secret_tampered_body_wrong_service_or_region_are_refused() {
    let (_dir, verifier) = verifier(&["us-west-2"]);
    let now = SystemTime::now();
    let wrong_secret = signed(
        "not-the-secret-at-all-0000000000",
        "us-west-2",
        IVS_SIGNING_NAME,
        now,
        BODY,
    );
    assert_eq!(
        verifier.verify(&wrong_secret, BODY, now),
        Verdict::Refused {
            reason: SIGNATURE_REFUSED,
            detail: "the signature does not match"
        }
    );
    let good = signed(SECRET, "us-west-2", IVS_SIGNING_NAME, now, BODY);
    assert_eq!(
        verifier.verify(&good, b"{}", now),
        Verdict::Refused {
            reason: SIGNATURE_REFUSED,
            detail: "the signature does not match"
        }
    );
    let other_service = signed(SECRET, "us-west-2", "ivs", now, BODY);
    assert!(matches!(
        verifier.verify(&other_service, BODY, now),
        Verdict::Refused { .. }
    ));
    let other_region = signed(SECRET, "eu-west-1", IVS_SIGNING_NAME, now, BODY);
    assert_eq!(
        verifier.verify(&other_region, BODY, now),
        Verdict::malformed("the credential scope names a region that is not allowed")
    );
}

#[test]
fn the_signed_host_must_be_a_served_name_and_every_signature_failure_gets_one_answer() {
    let now = SystemTime::now();
    let parts = signed(SECRET, "us-west-2", IVS_SIGNING_NAME, now, BODY);
    let web = Verdict::Verified(Caller::with_source("web", CallerSource::Sigv4));
    for (hosts, admitted) in [
        (&[][..], true),
        (&["127.0.0.1"][..], true),
        (&["chat-token.internal", "127.0.0.1:50051"][..], true),
        (&["127.0.0.1:50052"][..], false),
        (&["chat-token.internal"][..], false),
    ] {
        let (_dir, verifier) = verifier_for(&[], hosts);
        let verdict = verifier.verify(&parts, BODY, now);
        if admitted {
            assert_eq!(verdict, web, "{hosts:?}");
        } else {
            assert_eq!(
                verdict,
                Verdict::Refused {
                    reason: SIGNATURE_REFUSED,
                    detail: "the signed host is not one of identity.sigv4.hosts"
                },
                "{hosts:?}"
            );
        }
    }
    // An unknown access key id is answered as a wrong secret is; only the log tells them apart.
    let (_dir, verifier) = verifier(&[]);
    let mut unknown = parts.clone();
    let authorization = unknown.headers[http::header::AUTHORIZATION]
        .to_str()
        .unwrap()
        .replace(KEY_ID, "CTSUNKNOWN000000001");
    unknown
        .headers
        .insert(http::header::AUTHORIZATION, authorization.parse().unwrap());
    assert_eq!(
        verifier.verify(&unknown, BODY, now),
        Verdict::Refused {
            reason: SIGNATURE_REFUSED,
            detail: "the access key id is not known"
        }
    );
}

#[test]
fn clock_skew_is_allowed_up_to_the_limit_and_not_one_second_past() {
    let (_dir, verifier) = verifier(&[]);
    let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let parts = signed(SECRET, "us-west-2", IVS_SIGNING_NAME, at, BODY);
    let limit = Sigv4Config::default().max_clock_skew;
    for now in [at + limit, at - limit] {
        assert!(matches!(
            verifier.verify(&parts, BODY, now),
            Verdict::Verified(_)
        ));
    }
    for now in [
        at + limit + Duration::from_secs(1),
        at - limit - Duration::from_secs(1),
    ] {
        assert_eq!(
            verifier.verify(&parts, BODY, now),
            Verdict::malformed("x-amz-date is too far from the server's time")
        );
    }
}

#[test]
fn a_declared_payload_hash_must_match_the_body() {
    let (_dir, verifier) = verifier(&[]);
    let now = SystemTime::now();
    let mut parts = signed(SECRET, "us-west-2", IVS_SIGNING_NAME, now, BODY);
    parts.headers.insert(
        "x-amz-content-sha256",
        hex::encode([0; 32]).parse().unwrap(),
    );
    assert_eq!(
        verifier.verify(&parts, BODY, now),
        Verdict::malformed("x-amz-content-sha256 does not match the body")
    );
}

#[test]
fn unsigned_and_other_schemes_fall_through_but_other_aws4_algorithms_do_not() {
    let (_dir, verifier) = verifier(&[]);
    let now = SystemTime::now();
    let request = |auth: Option<&str>| {
        let mut builder = http::Request::post("/CreateChatToken");
        if let Some(auth) = auth {
            builder = builder.header("authorization", auth);
        }
        builder.body(()).unwrap().into_parts().0
    };
    assert_eq!(
        verifier.verify(&request(None), BODY, now),
        Verdict::Unsigned
    );
    assert_eq!(
        verifier.verify(&request(Some("Bearer abc")), BODY, now),
        Verdict::Unsigned
    );
    assert!(matches!(
        verifier.verify(
            &request(Some("AWS4-ECDSA-P256-SHA256 Credential=x")),
            BODY,
            now
        ),
        Verdict::Refused { .. }
    ));
    assert_eq!(
        verifier.verify(&request(Some("AWS4-HMAC-SHA256 garbage")), BODY, now),
        Verdict::malformed("malformed SigV4 Authorization header")
    );
}

#[test]
fn credentials_file_errors_never_show_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("credentials.toml");
    std::fs::write(&path, "[[keys]]\naccess_key_id = \"short\"\nsecret_access_key = \"topsecret-value-000000\"\nprincipal = \"p\"\n").unwrap();
    let error = Verifier::load(&path, &Sigv4Config::default())
        .unwrap_err()
        .to_string();
    assert!(error.contains("access_key_id"), "{error}");
    std::fs::write(&path, "[[keys]]\nsecret_access_key = topsecret-value\n").unwrap();
    let error = Verifier::load(&path, &Sigv4Config::default())
        .unwrap_err()
        .to_string();
    assert!(!error.contains("topsecret"), "{error}");
}

#[test]
fn amz_dates() {
    assert_eq!(
        parse_amz_date("20260101T000000Z"),
        Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600))
    );
    for bad in [
        "",
        "20260101T000000",
        "20260101X000000Z",
        "20261301T000000Z",
        "20260101T250000Z",
        "2026-1-1T000000Z",
    ] {
        assert_eq!(parse_amz_date(bad), None, "{bad:?}");
    }
}
