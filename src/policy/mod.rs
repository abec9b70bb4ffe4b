//! Cedar policy: may this caller grant these capabilities for this room, or moderate it?
//!
//! A request ([`Authorize`]) is put to Cedar as
//! - principal `Caller::"<caller id>"` (with groups and attributes from the optional entities file),
//! - action `Action::"CreateChatToken"`, or a moderation action: `DisconnectUser`, `BanUser`, `UnbanUser`,
//!   `ListBans`, `VerifyChatToken`,
//! - resource `Room::"<room ARN>"` with attributes `region`, `account`, `roomId` parsed from the ARN,
//! - context, for CreateChatToken: `capabilities` (IVS names), `sessionDurationInMinutes` (60 when absent),
//!   `userId`, `attributeKeys` and `attributesBytes`; for moderation actions about a user: `userId`, and
//!   for BanUser `durationSeconds` (0: until unbanned).
//!
//! The schema (`src/policy/schema.cedarschema`) is embedded; every policy set is validated against it
//! when loaded, and a set that does not validate is refused with Cedar's own message and the file, line
//! and column. Policies are parsed once per load, never per request; [`PolicyEngine::reload`] swaps in a
//! new set atomically and keeps the last good one when the new one is bad. [`layer`] applies decisions
//! to the domain stack.

pub mod layer;

use std::{
    collections::{HashMap, HashSet},
    fmt::Write as _,
    path::{Path, PathBuf},
    str::FromStr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use arc_swap::ArcSwap;
use cedar_policy::{
    Authorizer, Context, Decision, Entities, Entity, EntityId, EntityTypeName, EntityUid, PolicyId,
    PolicySet, Request, RestrictedExpression, Schema, ValidationMode, Validator,
};
use miette::Diagnostic;

use crate::error::Error;
use crate::moderation::{ModerationAction, ModerationRequest};
use crate::request::{Caller, RoomArn, TokenRequest};

pub use layer::PolicyLayer;

/// The schema every policy set is validated against.
pub const SCHEMA: &str = include_str!("schema.cedarschema");
/// The policy used when none is configured: permits every valid request.
pub const DEVELOPMENT_POLICY: &str = include_str!("dev.cedar");

/// Where policies come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PolicySource {
    /// The embedded development policy, which permits everything.
    Development,
    /// Policy files (all concatenated into one set) and an optional Cedar entities JSON file.
    Files {
        /// `.cedar` files; policy ids must be unique across them.
        policies: Vec<PathBuf>,
        /// Callers' groups and attributes.
        entities: Option<PathBuf>,
    },
}

/// Why a policy set was refused. The message carries Cedar's reason and where it is.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PolicyError(String);

/// One loaded, validated policy set and the entities it is evaluated with.
struct Loaded {
    policies: PolicySet,
    entities: Entities,
}

/// What the engine decided for one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyDecision {
    /// Whether the request is allowed.
    pub allowed: bool,
    /// The policies that determined the decision: the permits that allowed it, or the forbids that denied
    /// it (empty when nothing permitted it).
    pub policy_ids: Vec<String>,
}

/// Every action in the schema.
const ACTIONS: [&str; 6] = [
    "CreateChatToken",
    "DisconnectUser",
    "BanUser",
    "UnbanUser",
    "ListBans",
    "VerifyChatToken",
];

/// A request Cedar can decide: who asks to do what to which room, and the action's context.
pub trait Authorize {
    /// The principal.
    fn caller(&self) -> &Caller;
    /// The resource.
    fn room(&self) -> &RoomArn;
    /// The action's name, one of the schema's actions.
    fn action(&self) -> &'static str;
    /// The action's context, as the schema declares it.
    fn context(&self) -> Vec<(String, RestrictedExpression)>;
}

impl Authorize for TokenRequest {
    fn caller(&self) -> &Caller {
        &self.caller
    }

    fn room(&self) -> &RoomArn {
        &self.room
    }

    fn action(&self) -> &'static str {
        "CreateChatToken"
    }

    fn context(&self) -> Vec<(String, RestrictedExpression)> {
        vec![
            (
                "capabilities".into(),
                RestrictedExpression::new_set(
                    self.capabilities.iter().map(|c| string(c.ivs_name())),
                ),
            ),
            (
                "sessionDurationInMinutes".into(),
                RestrictedExpression::new_long(self.session_duration().minutes().into()),
            ),
            ("userId".into(), string(self.user_id.expose())),
            (
                "attributeKeys".into(),
                RestrictedExpression::new_set(self.attributes.keys().map(string)),
            ),
            (
                "attributesBytes".into(),
                RestrictedExpression::new_long(self.attributes.byte_size() as i64),
            ),
        ]
    }
}

impl Authorize for ModerationRequest {
    fn caller(&self) -> &Caller {
        &self.caller
    }

    fn room(&self) -> &RoomArn {
        &self.room
    }

    fn action(&self) -> &'static str {
        self.action.name()
    }

    fn context(&self) -> Vec<(String, RestrictedExpression)> {
        let mut context: Vec<(String, RestrictedExpression)> = self
            .action
            .user_id()
            .map(|user| ("userId".into(), string(user.expose())))
            .into_iter()
            .collect();
        if let ModerationAction::Ban { duration, .. } = &self.action {
            let seconds = duration.map_or(0, |d| d.as_secs());
            context.push((
                "durationSeconds".into(),
                RestrictedExpression::new_long(i64::try_from(seconds).unwrap_or(i64::MAX)),
            ));
        }
        context
    }
}

/// Evaluates requests against the current policy set; reloadable.
pub struct PolicyEngine {
    source: PolicySource,
    schema: Schema,
    current: ArcSwap<Loaded>,
    /// The schema's actions, made once.
    actions: HashMap<&'static str, EntityUid>,
    caller_type: EntityTypeName,
    room_type: EntityTypeName,
    /// Reloads refused because the new files did not parse or validate.
    refused_reloads: AtomicU64,
}

impl PolicyEngine {
    /// Loads and validates the policies of `source`; any error stops here.
    pub fn load(source: PolicySource) -> Result<Self, PolicyError> {
        let (schema, _) = Schema::from_cedarschema_str(SCHEMA)
            .map_err(|e| PolicyError(located("schema.cedarschema", SCHEMA, &e)))?;
        let loaded = load(&source, &schema)?;
        Ok(PolicyEngine {
            source,
            schema,
            current: ArcSwap::from_pointee(loaded),
            actions: ACTIONS
                .into_iter()
                .map(|action| (action, uid("Action", action)))
                .collect(),
            caller_type: EntityTypeName::from_str("Caller").expect("valid type name"),
            room_type: EntityTypeName::from_str("Room").expect("valid type name"),
            refused_reloads: AtomicU64::new(0),
        })
    }

    /// Where the engine's policies come from.
    pub fn source(&self) -> &PolicySource {
        &self.source
    }

    /// Re-reads the files. On success the new set takes effect for the next request; on failure the
    /// current set stays in force, the refusal is counted, and the error says why.
    pub fn reload(&self) -> Result<(), PolicyError> {
        match load(&self.source, &self.schema) {
            Ok(loaded) => {
                self.current.store(Arc::new(loaded));
                Ok(())
            }
            Err(e) => {
                self.refused_reloads.fetch_add(1, Ordering::Relaxed);
                crate::telemetry::metrics::metrics()
                    .policy_reload_refusals
                    .add(1, &[]);
                Err(e)
            }
        }
    }

    /// How many reloads were refused since start-up.
    pub fn refused_reloads(&self) -> u64 {
        self.refused_reloads.load(Ordering::Relaxed)
    }

    /// Asks Cedar about `request`.
    pub fn evaluate(&self, request: &impl Authorize) -> Result<PolicyDecision, Error> {
        let internal =
            |what: &str, e: &dyn std::fmt::Display| Error::Internal(format!("policy {what}: {e}"));
        let principal = EntityUid::from_type_name_and_id(
            self.caller_type.clone(),
            EntityId::new(request.caller().id()),
        );
        let room_arn = request.room();
        let resource = EntityUid::from_type_name_and_id(
            self.room_type.clone(),
            EntityId::new(room_arn.as_str()),
        );
        let room = Entity::new(
            resource.clone(),
            HashMap::from([
                ("region".into(), string(room_arn.region())),
                ("account".into(), string(room_arn.account())),
                ("roomId".into(), string(room_arn.room_id())),
            ]),
            HashSet::new(),
        )
        .map_err(|e| internal("room entity", &e))?;
        let context =
            Context::from_pairs(request.context()).map_err(|e| internal("context", &e))?;
        let action = self
            .actions
            .get(request.action())
            .ok_or_else(|| Error::Internal(format!("policy: no action {}", request.action())))?;
        let cedar_request = Request::new(
            principal,
            action.clone(),
            resource,
            context,
            Some(&self.schema),
        )
        .map_err(|e| internal("request", &e))?;

        let loaded = self.current.load();
        let entities = loaded
            .entities
            .clone()
            .add_entities([room], None)
            .map_err(|e| internal("entities", &e))?;
        let response = Authorizer::new().is_authorized(&cedar_request, &loaded.policies, &entities);
        for cedar_policy::AuthorizationError::PolicyEvaluationError(error) in
            response.diagnostics().errors()
        {
            // Cedar skips a policy that errors. Its message names entities and attributes; values that
            // could be personal (user id, attribute values) cannot appear: strict validation rules out type
            // errors and no extension functions are compiled in.
            tracing::warn!(policy_id = %error.policy_id(), "policy evaluation error: {}", error.inner());
        }
        Ok(PolicyDecision {
            allowed: response.decision() == Decision::Allow,
            policy_ids: response
                .diagnostics()
                .reason()
                .map(PolicyId::to_string)
                .collect(),
        })
    }
}

fn string(s: &str) -> RestrictedExpression {
    RestrictedExpression::new_string(s.to_owned())
}

fn uid(entity_type: &str, id: &str) -> EntityUid {
    EntityUid::from_type_name_and_id(
        EntityTypeName::from_str(entity_type).expect("valid type name"),
        EntityId::new(id),
    )
}

fn load(source: &PolicySource, schema: &Schema) -> Result<Loaded, PolicyError> {
    let (files, entities_file): (Vec<(String, String)>, _) = match source {
        PolicySource::Development => (
            vec![(
                "embedded development policy".into(),
                DEVELOPMENT_POLICY.into(),
            )],
            None,
        ),
        PolicySource::Files { policies, entities } => (
            policies
                .iter()
                .map(|p| Ok((p.display().to_string(), read(p)?)))
                .collect::<Result<_, PolicyError>>()?,
            entities.as_deref(),
        ),
    };

    let mut policies = PolicySet::new();
    for (name, text) in &files {
        let parsed = PolicySet::from_str(text).map_err(|e| PolicyError(located(name, text, &e)))?;
        let validation = Validator::new(schema.clone()).validate(&parsed, ValidationMode::Strict);
        if !validation.validation_passed() {
            let mut message = String::new();
            for error in validation.validation_errors() {
                let _ = writeln!(message, "{}", located(name, text, error));
            }
            return Err(PolicyError(message.trim_end().to_owned()));
        }
        for policy in parsed.policies() {
            // Name policies by their @id annotation, so decisions and denials cite readable ids.
            let id = policy
                .annotation("id")
                .map(str::to_owned)
                .unwrap_or_else(|| format!("{name}#{}", policy.id()));
            policies
                .add(policy.new_id(PolicyId::new(&id)))
                .map_err(|e| PolicyError(format!("{name}: policy {id}: {e}")))?;
        }
    }

    let entities = match entities_file {
        None => Entities::empty(),
        Some(path) => {
            let text = read(path)?;
            Entities::from_json_str(&text, Some(schema))
                .map_err(|e| PolicyError(located(&path.display().to_string(), &text, &e)))?
        }
    };
    Ok(Loaded { policies, entities })
}

fn read(path: &Path) -> Result<String, PolicyError> {
    std::fs::read_to_string(path)
        .map_err(|e| PolicyError(format!("cannot read {}: {e}", path.display())))
}

/// `file:line:column: message (help)`, the location taken from the diagnostic's first label.
fn located(file: &str, source: &str, error: &(impl Diagnostic + ?Sized)) -> String {
    let position = error
        .labels()
        .and_then(|mut labels| labels.next())
        .map(|label| {
            let before = &source[..label.offset().min(source.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("{file}:{line}:{column}")
        })
        .unwrap_or_else(|| file.to_owned());
    match error.help() {
        Some(help) => format!("{position}: {error} ({help})"),
        None => format!("{position}: {error}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::{Capability, test_request};

    fn request(
        caller: &str,
        room: &str,
        capabilities: &[Capability],
        minutes: Option<i32>,
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
}
