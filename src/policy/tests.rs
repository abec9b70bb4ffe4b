use std::{
    collections::HashSet,
    path::{Path, PathBuf},
};

use cedar_policy::Context;

use super::load::uid;
use super::request::cedar_context;
use super::*;
use crate::domain::token::test_request;
use crate::domain::{Caller, ModerationAction, ModerationRequest, RoomArn, TokenRequest};
use crate::domain::{Capability, UserId};

fn request(
    caller: &str,
    room: &str,
    capabilities: &[Capability],
    minutes: Option<i64>,
) -> TokenRequest {
    let request = test_request()
        .caller(caller)
        .room(room)
        .capabilities(capabilities);
    match minutes {
        Some(minutes) => request.session_minutes(minutes),
        None => request,
    }
    .build()
}

const ROOM_111: &str = "arn:aws:ivschat:us-west-2:111111111111:room/abc";

fn files(dir: &Path, policy: &str) -> PolicySource {
    let path = dir.join("p.cedar");
    std::fs::write(&path, policy).unwrap();
    PolicySource::Files {
        policies: vec![path],
        entities: None,
    }
}

#[test]
fn the_development_policy_permits_every_valid_request() {
    let engine = PolicyEngine::load(PolicySource::Development).unwrap();
    let decision = engine
        .evaluate(&request(
            "anyone",
            ROOM_111,
            &[
                Capability::SendMessage,
                Capability::DisconnectUser,
                Capability::DeleteMessage,
            ],
            Some(180),
        ))
        .unwrap();
    assert!(decision.allowed);
    assert_eq!(decision.policy_ids, ["development-permit-all"]);
}

#[test]
fn the_production_example_validates_against_the_schema() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/policy");
    PolicyEngine::load(PolicySource::Files {
        policies: vec![root.join("production.cedar")],
        entities: Some(root.join("production.entities.json")),
    })
    .unwrap();
}

#[test]
fn a_syntax_error_names_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let err = PolicyEngine::load(files(
        dir.path(),
        "permit (principal,\n  action, resource) when { ;",
    ))
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("p.cedar:2:"), "{err}");
}

#[test]
fn a_policy_that_does_not_match_the_schema_is_refused_with_cedars_reason() {
    let dir = tempfile::tempdir().unwrap();
    let err = PolicyEngine::load(files(
        dir.path(),
        "permit (principal, action, resource)\nwhen { context.sessionMinutes > 5 };",
    ))
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("p.cedar:2:"), "{err}");
    assert!(err.contains("sessionMinutes"), "{err}");
}

#[test]
fn a_bad_reload_keeps_the_last_good_policy_and_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    let source = files(
        dir.path(),
        r#"@id("only-send") permit (principal, action == Action::"CreateChatToken", resource) unless { context.capabilities.contains("DELETE_MESSAGE") };"#,
    );
    let engine = PolicyEngine::load(source).unwrap();
    let deleting = request("c", ROOM_111, &[Capability::DeleteMessage], None);
    assert!(!engine.evaluate(&deleting).unwrap().allowed);

    std::fs::write(
        dir.path().join("p.cedar"),
        "permit (principal, action, resource) when {",
    )
    .unwrap();
    assert!(engine.reload().is_err());
    assert_eq!(engine.refused_reloads(), 1);
    assert!(
        !engine.evaluate(&deleting).unwrap().allowed,
        "old policy still in force"
    );

    std::fs::write(
        dir.path().join("p.cedar"),
        r#"@id("all") permit (principal, action, resource);"#,
    )
    .unwrap();
    engine.reload().unwrap();
    let decision = engine.evaluate(&deleting).unwrap();
    assert!(decision.allowed);
    assert_eq!(decision.policy_ids, ["all"]);
}

#[test]
fn decisions_are_cached_by_what_the_policies_read() {
    let dir = tempfile::tempdir().unwrap();
    let engine = PolicyEngine::load(files(
        dir.path(),
        r#"@id("all") permit (principal, action, resource);
           @id("no-long-sessions") forbid (principal, action == Action::"CreateChatToken", resource) when { context.sessionDurationInMinutes > 60 };"#,
    ))
    .unwrap();
    let token = |user: &str, minutes| {
        test_request()
            .caller("c")
            .room(ROOM_111)
            .user(user)
            .session_minutes(minutes)
            .build()
    };
    for round in 0..2 {
        assert!(engine.evaluate(&token("ann", 60)).unwrap().allowed);
        // The user id is not read by any policy: the same decision.
        assert!(engine.evaluate(&token("bob", 60)).unwrap().allowed);
        let denied = engine.evaluate(&token("ann", 61)).unwrap();
        assert!(!denied.allowed, "round {round}");
        assert_eq!(denied.policy_ids, ["no-long-sessions"], "round {round}");
        assert_eq!(engine.cached_decisions(), 2, "round {round}");
    }
    // Another caller or room is another decision.
    let other_caller = test_request().caller("d").room(ROOM_111).build();
    assert!(engine.evaluate(&other_caller).unwrap().allowed);
    assert_eq!(engine.cached_decisions(), 3);
    // Allowed decisions name their policies only when asked, cached or not.
    assert!(
        engine
            .decide(&token("ann", 60), false)
            .unwrap()
            .policy_ids
            .is_empty()
    );
    assert_eq!(
        engine.decide(&token("ann", 60), true).unwrap().policy_ids,
        ["all"]
    );
}

#[test]
fn a_policy_that_reads_the_user_id_is_decided_per_user() {
    let dir = tempfile::tempdir().unwrap();
    let engine = PolicyEngine::load(files(
        dir.path(),
        r#"@id("all") permit (principal, action, resource);
           @id("not-mallory") forbid (principal, action == Action::"CreateChatToken", resource) when { context.userId == "mallory" };"#,
    ))
    .unwrap();
    for _ in 0..2 {
        for (user, allowed) in [("ann", true), ("mallory", false), ("bob", true)] {
            let request = test_request().caller("c").room(ROOM_111).user(user).build();
            assert_eq!(
                engine.evaluate(&request).unwrap().allowed,
                allowed,
                "{user}"
            );
        }
    }
    assert_eq!(engine.cached_decisions(), 3);
}

/// The development policy with caches of `decisions` and `slices` entries.
fn with_cache_sizes(decisions: usize, slices: usize) -> PolicyEngine {
    PolicyEngine::load_with_claims(
        PolicySource::Development,
        &DEFAULT_POLICY_CLAIMS.map(str::to_owned),
        CacheSizes { decisions, slices },
    )
    .unwrap()
}

#[test]
fn the_decision_cache_is_bounded_and_keeps_the_pairs_that_come_back() {
    let engine = with_cache_sizes(64, 64);
    let hot = request("c", ROOM_111, &[], None);
    assert!(engine.evaluate(&hot).unwrap().allowed);
    for i in 0..1000 {
        let room = format!("arn:aws:ivschat:us-west-2:111111111111:room/r{i}");
        assert!(
            engine
                .evaluate(&request("c", &room, &[], None))
                .unwrap()
                .allowed
        );
        assert!(engine.evaluate(&hot).unwrap().allowed);
        assert!(engine.cached_decisions() <= 64);
    }
    let kept = engine.cached_decisions();
    assert!(engine.evaluate(&hot).unwrap().allowed);
    assert_eq!(engine.cached_decisions(), kept, "the hot pair was kept");
}

#[test]
fn the_default_caches_hold_the_configured_defaults() {
    let config = crate::config::PolicyConfig::default();
    assert_eq!(
        CacheSizes::default(),
        CacheSizes {
            decisions: config.decision_cache_entries,
            slices: config.slice_cache_entries
        }
    );
    assert_eq!(CacheSizes::default().decisions, 16384);
    assert_eq!(CacheSizes::default().slices, 1024);
}

#[test]
fn decision_keys_are_unambiguous() {
    use ContextValue::{Bool, Long, Record, String as Str, Strings};
    let contexts: Vec<Vec<(&'static str, ContextValue)>> = vec![
        vec![("a", Bool(true))],
        vec![("a", Bool(false))],
        vec![("a", Record(vec![]))],
        vec![("a", Record(vec![("b", Bool(true))]))],
        vec![("a", Record(vec![("b", Bool(true)), ("c", Str(""))]))],
        vec![("a", Record(vec![("b", Record(vec![]))]))],
        vec![("a", Record(vec![("b", Record(vec![("c", Str(""))]))]))],
        vec![("a", Record(vec![("b", Record(vec![]))])), ("c", Str(""))],
        vec![],
        vec![("a", Str(""))],
        vec![("a", Str("1"))],
        vec![("a", Long(1))],
        vec![("a", Strings(vec![]))],
        vec![("a", Strings(vec!["1"]))],
        vec![("a", Strings(vec!["1", "2"]))],
        vec![("a", Strings(vec!["12"]))],
        vec![("a", Strings(vec!["1"])), ("b", Strings(vec![]))],
        vec![("a", Str("1:b"))],
        vec![("b", Str("1"))],
    ];
    let mut keys = HashSet::new();
    for (caller, action, room) in [
        ("c", "A", "r"),
        ("c:", "A", "r"),
        ("c", "A:", "r"),
        ("c", "A", "r2"),
    ] {
        for context in &contexts {
            assert!(
                keys.insert(decision_key(
                    caller,
                    action,
                    room,
                    context.iter(),
                    &super::reads::ContextReads::All
                )),
                "{caller} {action} {room} {context:?}"
            );
        }
    }
}

#[test]
fn a_deny_cites_the_forbidding_policies() {
    let dir = tempfile::tempdir().unwrap();
    let engine = PolicyEngine::load(files(
        dir.path(),
        r#"@id("all") permit (principal, action, resource);
           @id("no-long-sessions") forbid (principal, action == Action::"CreateChatToken", resource) when { context.sessionDurationInMinutes > 60 };
           @id("room-account") forbid (principal, action, resource) unless { resource.account == "111111111111" };"#,
    ))
    .unwrap();
    assert!(
        engine
            .evaluate(&request("c", ROOM_111, &[], Some(60)))
            .unwrap()
            .allowed
    );
    let decision = engine
        .evaluate(&request(
            "c",
            "arn:aws:ivschat:us-east-1:999999999999:room/x",
            &[],
            Some(61),
        ))
        .unwrap();
    assert!(!decision.allowed);
    let mut ids = decision.policy_ids;
    ids.sort();
    assert_eq!(ids, ["no-long-sessions", "room-account"]);
}

/// An entities file: the `web` caller in group `web`, its group, and `extra` other callers.
fn entities_file(dir: &Path, extra: usize) -> PathBuf {
    let mut entities = vec![
        serde_json::json!({"uid": {"type": "Caller", "id": "web"}, "attrs": {"accounts": ["111111111111"]}, "parents": [{"type": "Group", "id": "web"}]}),
        serde_json::json!({"uid": {"type": "Group", "id": "web"}, "attrs": {}, "parents": []}),
    ];
    entities.extend((0..extra).map(|i| {
        serde_json::json!({"uid": {"type": "Caller", "id": format!("caller-{i}")}, "attrs": {"accounts": ["222222222222"]}, "parents": [{"type": "Group", "id": "others"}]})
    }));
    let path = dir.join(format!("entities-{extra}.json"));
    std::fs::write(&path, serde_json::Value::Array(entities).to_string()).unwrap();
    path
}

const ACCOUNTS_POLICY: &str = r#"@id("own-accounts") permit (principal in Group::"web", action, resource) when { principal has accounts && principal.accounts.contains(resource.account) };"#;

#[test]
fn a_decision_reaches_as_many_entities_with_20000_in_the_file_as_with_4() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("p.cedar");
    std::fs::write(&policy, ACCOUNTS_POLICY).unwrap();
    let engine = |extra| {
        PolicyEngine::load(PolicySource::Files {
            policies: vec![policy.clone()],
            entities: Some(entities_file(dir.path(), extra)),
        })
        .unwrap()
    };
    let small = engine(2);
    let large = engine(19_998);
    // The schema's actions come with the file's entities.
    assert_eq!(small.current.load().entities.len(), 4 + Action::ALL.len());
    assert_eq!(
        large.current.load().entities.len(),
        20_000 + Action::ALL.len()
    );

    let web = request("web", ROOM_111, &[], None);
    let stranger = request("caller-7", ROOM_111, &[], None);
    // Twice: the second time from the cached slices.
    for engine in [&small, &large, &small, &large] {
        assert!(engine.evaluate(&web).unwrap().allowed);
        assert!(!engine.evaluate(&stranger).unwrap().allowed);
    }
    // What a decision costs follows the entities it is evaluated against: the same few for both.
    let sliced = |engine: &PolicyEngine, caller: &str| {
        let principal = uid("Caller", caller);
        let room = RoomArn::parse(ROOM_111).unwrap();
        engine
            .slice(&engine.current.load(), &principal, &room)
            .unwrap()
            .len()
    };
    assert_eq!(sliced(&small, "web"), sliced(&large, "web"));
    assert_eq!(sliced(&small, "caller-1"), sliced(&large, "caller-1"));
    // The caller, its group (which the policy names too), the actions, the room.
    assert_eq!(sliced(&large, "web"), 1 + 1 + Action::ALL.len() + 1);
}

#[test]
fn slices_are_kept_per_caller_and_room_within_the_bound() {
    let engine = with_cache_sizes(64, 64);
    let kept = |engine: &PolicyEngine| engine.current.load().slices.len();
    for _ in 0..3 {
        assert!(
            engine
                .evaluate(&request("web", ROOM_111, &[], None))
                .unwrap()
                .allowed
        );
    }
    assert_eq!(kept(&engine), 1);
    for i in 0..64 + 10 {
        let caller = format!("caller-{i}");
        assert!(
            engine
                .evaluate(&request(&caller, ROOM_111, &[], None))
                .unwrap()
                .allowed
        );
        assert!(kept(&engine) <= 64);
    }
}

#[test]
fn an_entities_file_defining_a_room_is_refused_at_load_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("p.cedar");
    std::fs::write(&policy, ACCOUNTS_POLICY).unwrap();
    let entities = dir.path().join("entities.json");
    std::fs::write(
        &entities,
        serde_json::json!([{"uid": {"type": "Room", "id": ROOM_111}, "attrs": {"region": "us-west-2", "account": "111111111111", "roomId": "abc"}, "parents": []}]).to_string(),
    )
    .unwrap();
    let err = PolicyEngine::load(PolicySource::Files {
        policies: vec![policy],
        entities: Some(entities),
    })
    .err()
    .expect("a Room entity is refused")
    .to_string();
    assert!(err.contains(&format!("Room::\"{ROOM_111}\"")), "{err}");
    assert!(err.contains("entities.json"), "{err}");
}

#[test]
fn every_actions_request_matches_the_schema() {
    // Requests are built without the schema per call; this is where their shape is checked.
    let engine = PolicyEngine::load(PolicySource::Development).unwrap();
    let token = test_request()
        .capabilities(&[Capability::SendMessage])
        .attribute("k", "v")
        .build();
    let user = UserId::parse("u".into()).unwrap();
    let room = RoomArn::parse(ROOM_111).unwrap();
    let reason = crate::domain::Reason::parse("r".into()).unwrap();
    let now = std::time::SystemTime::now();
    let actions = [
        ModerationAction::Disconnect {
            user_id: user.clone(),
            reason: reason.clone(),
        },
        ModerationAction::Ban {
            user_id: user.clone(),
            duration: Some(std::time::Duration::from_secs(60)),
            reason,
        },
        ModerationAction::Unban {
            user_id: user.clone(),
        },
        ModerationAction::ListBans {
            page_size: 10,
            after: None,
        },
        ModerationAction::Verify {
            opened: Ok(Box::new(crate::domain::TokenClaims {
                token_id: "t".into(),
                room: room.clone(),
                user_id: user,
                capabilities: Default::default(),
                attributes: Default::default(),
                issued_at: now,
                token_expires_at: now,
                session_expires_at: now,
            })),
        },
    ];
    let moderation = actions.into_iter().map(|action| ModerationRequest {
        caller: Caller::new("c"),
        room: room.clone(),
        action,
    });
    let check = |request: &dyn Fn() -> (String, Action, Context)| {
        let (room, action, context) = request();
        Request::new(
            uid("Caller", "c"),
            engine.actions[&action].clone(),
            uid("Room", &room),
            context,
            Some(&engine.schema),
        )
        .unwrap_or_else(|e| panic!("{action}: {e}"));
    };
    let bound = test_request()
        .user("oidc|alice")
        .build()
        .bind(
            end_user("alice", &["moderators"]),
            &crate::domain::FieldNames::PROTO,
        )
        .unwrap();
    for token in [&token, &bound] {
        check(&|| {
            (
                token.room.as_str().to_owned(),
                token.action(),
                cedar_context(&token.context()).unwrap(),
            )
        });
    }
    let mut seen = vec![token.action().as_str()];
    let messaging = [
        crate::domain::MessagingAction::SendEvent {
            event_name: crate::domain::EventName::parse("score".into()).unwrap(),
            attributes: crate::domain::Attributes::parse([("home".into(), "3".into())]).unwrap(),
        },
        crate::domain::MessagingAction::DeleteMessage {
            message_id: crate::domain::MessageId::parse("AbCdEf123456").unwrap(),
            reason: None,
        },
    ];
    for action in messaging {
        let request = crate::domain::MessagingRequest {
            caller: Caller::new("c"),
            room: room.clone(),
            action,
        };
        check(&|| {
            (
                request.room.as_str().to_owned(),
                request.action(),
                cedar_context(&request.context()).unwrap(),
            )
        });
        seen.push(request.action().as_str());
    }
    for request in moderation {
        check(&|| {
            (
                request.room.as_str().to_owned(),
                request.action(),
                cedar_context(&request.context()).unwrap(),
            )
        });
        seen.push(request.action().as_str());
    }
    seen.sort();
    let mut all: Vec<_> = Action::ALL.iter().map(|a| a.as_str()).collect();
    all.sort();
    assert_eq!(seen, all, "every action of the schema is checked");
}

/// An end user of issuer `https://id.example.com` with subject `subject`, user id `oidc|{subject}`, in
/// `groups`.
fn end_user(subject: &str, groups: &[&str]) -> crate::domain::EndUser {
    crate::domain::EndUser {
        issuer: "https://id.example.com".into(),
        subject: subject.into(),
        user_id: UserId::parse(format!("oidc|{subject}")).unwrap(),
        claims: vec![(
            "groups".into(),
            groups.iter().map(|g| (*g).to_owned()).collect(),
        )],
        attributes: Vec::new(),
    }
}

#[test]
fn end_user_policies_decide_on_what_they_read_and_the_key_holds_only_that() {
    let dir = tempfile::tempdir().unwrap();
    let engine = PolicyEngine::load(files(
        dir.path(),
        r#"permit (principal, action == Action::"CreateChatToken", resource)
           when { context.end_user.verified };
           forbid (principal, action == Action::"CreateChatToken", resource)
           when { context.capabilities.contains("DELETE_MESSAGE") }
           unless { context.end_user.claims has groups && context.end_user.claims.groups.contains("moderators") };"#,
    ))
    .unwrap();
    let bound = |subject: &str, groups: &[&str], capabilities: &[Capability]| {
        test_request()
            .user(&format!("oidc|{subject}"))
            .capabilities(capabilities)
            .build()
            .bind(end_user(subject, groups), &crate::domain::FieldNames::PROTO)
            .unwrap()
    };
    assert!(
        !engine.evaluate(&test_request().build()).unwrap().allowed,
        "unbound"
    );
    assert!(engine.evaluate(&bound("alice", &[], &[])).unwrap().allowed);
    let delete = [Capability::DeleteMessage];
    assert!(
        !engine
            .evaluate(&bound("alice", &["viewers"], &delete))
            .unwrap()
            .allowed
    );
    assert!(
        engine
            .evaluate(&bound("alice", &["moderators"], &delete))
            .unwrap()
            .allowed
    );

    // Subjects and user ids are not read: many users, one decision each way.
    let before = engine.cached_decisions();
    for subject in ["bob", "carol", "dave"] {
        assert!(
            engine
                .evaluate(&bound(subject, &["moderators"], &delete))
                .unwrap()
                .allowed
        );
    }
    assert_eq!(engine.cached_decisions(), before, "decided from the cache");
    // The groups are read: another set is another decision.
    assert!(
        !engine
            .evaluate(&bound("bob", &["moderators-not"], &delete))
            .unwrap()
            .allowed
    );
}
