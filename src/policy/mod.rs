//! Cedar policy: may this caller grant these capabilities for this room, or moderate it?
//!
//! A request ([`Authorize`]) is put to Cedar as
//! - principal `Caller::"<caller id>"` (with groups and attributes from the optional entities file),
//! - action `Action::"CreateChatToken"`, or a moderation action: `DisconnectUser`, `BanUser`, `UnbanUser`,
//!   `ListBans`, `VerifyChatToken`,
//! - resource `Room::"<room ARN>"` with attributes `region`, `account`, `roomId` parsed from the ARN,
//! - context, for CreateChatToken: `capabilities` (IVS names), `sessionDurationInMinutes` (60 when absent),
//!   `userId`, `attributeKeys` and `attributesBytes`; for moderation actions about a user: `userId`, and
//!   for BanUser `durationSeconds` (0: until unbanned). Only the attributes some policy reads are put in
//!   the request's context (`reads`: an attribute no policy names cannot change a decision).
//!
//! The schema (`src/policy/schema.cedarschema`) is embedded; every policy set is validated against it
//! when loaded, and a set that does not validate is refused with Cedar's own message and the file, line
//! and column. Policies are parsed once per load, never per request; [`PolicyEngine::reload`] swaps in a
//! new set atomically and keeps the last good one when the new one is bad. [`layer`] applies decisions
//! to the domain stack.
//!
//! # Cost per request
//! What a decision costs does not depend on how many entities the entities file holds. Each request is
//! decided against a slice of them: the caller's entity and its ancestors, the entities the policies name
//! (and their ancestors) and the actions, all picked at load or by lookup, plus the request's `Room`. That
//! slice is all a policy can reach: the schema gives entities no entity-typed attributes, so nothing else
//! is reachable from the principal, the resource or a literal. The `Room` is made per request from its
//! ARN, so the entities file may not define one (refused at load, naming it). Building a slice costs more
//! than the decision (Cedar computes its transitive closure), and it depends only on the caller and the
//! room, so the last [`SLICE_CACHE_ENTRIES`] slices are kept with the policy set they were made from (a
//! reload starts afresh). Requests are not checked
//! against the schema per call: their shape is fixed by this module, and a unit test checks every action's
//! context against the schema.
//!
//! Decisions themselves are kept too: while a policy set is loaded, a decision depends only on the caller,
//! the action, the room and the context attributes the policies read (`reads`), so the last
//! [`DECISION_CACHE_ENTRIES`] are kept by exactly those (`decision_key`, every part length-prefixed). Calls
//! that differ only in attributes no policy reads, the user id with the production policy for one, are
//! decided once.

mod cache;
pub mod layer;
mod reads;

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

use crate::domain::{
    Action, Caller, Capability, Error, ModerationAction, ModerationRequest, RoomArn, TokenRequest,
};
use cache::BoundedCache;
use reads::ContextReads;

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
    /// Everything in the entities file (and the schema's actions).
    entities: Entities,
    /// What every request's slice holds whatever its caller: the entities the policies name, their
    /// ancestors, and the actions.
    shared: Vec<Entity>,
    /// Slices already built, by caller id and room ARN: at most [`SLICE_CACHE_ENTRIES`].
    slices: BoundedCache<(String, String), Entities>,
    /// The context attributes the policies can read: the only ones each request's context holds.
    context_reads: ContextReads,
    /// Decisions already made, by [`decision_key`]: at most [`DECISION_CACHE_ENTRIES`].
    decisions: BoundedCache<String, CachedDecision>,
}

/// How many decisions are kept. When full, the cache starts afresh: a key holds what callers send (room
/// ARN, capabilities, attribute keys), so this bounds its memory (a few hundred bytes an entry) whatever
/// they send.
pub const DECISION_CACHE_ENTRIES: usize = 1024;

/// A decision as Cedar made it, with every policy id.
#[derive(Debug)]
struct CachedDecision {
    allowed: bool,
    policy_ids: Vec<String>,
}

/// How many (caller, room) slices are kept. When full, the cache starts afresh: callers choose room
/// ARNs, so this bounds the memory (a slice is a few KB), and the hot rooms come back at once.
pub const SLICE_CACHE_ENTRIES: usize = 256;

/// What the engine decided for one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyDecision {
    /// Whether the request is allowed.
    pub allowed: bool,
    /// The policies that determined the decision: the permits that allowed it, or the forbids that denied
    /// it (empty when nothing permitted it). Empty for an allowed request when
    /// [`PolicyEngine::decide`] was not asked for them.
    pub policy_ids: Vec<String>,
}

/// A request Cedar can decide: who asks to do what to which room, and the action's context.
pub trait Authorize {
    /// The principal.
    fn caller(&self) -> &Caller;
    /// The resource.
    fn room(&self) -> &RoomArn;
    /// The action, one of the schema's actions.
    fn action(&self) -> Action;
    /// The action's context, as the schema declares it: one list both for Cedar and for the decision
    /// cache's key, so the two cannot disagree about what a decision depends on.
    fn context(&self) -> Vec<(&'static str, ContextValue<'_>)>;
}

/// A value in a request's context, in the shapes the schema uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ContextValue<'a> {
    String(&'a str),
    Long(i64),
    /// A set of strings.
    Strings(Vec<&'a str>),
}

impl ContextValue<'_> {
    fn to_cedar(&self) -> RestrictedExpression {
        match self {
            ContextValue::String(s) => string(s),
            ContextValue::Long(n) => RestrictedExpression::new_long(*n),
            ContextValue::Strings(items) => {
                RestrictedExpression::new_set(items.iter().map(|s| string(s)))
            }
        }
    }
}

/// `pairs` as a Cedar context.
fn cedar_context<'a>(
    pairs: impl IntoIterator<Item = &'a (&'static str, ContextValue<'a>)>,
) -> Result<Context, Error> {
    Context::from_pairs(
        pairs
            .into_iter()
            .map(|(name, value)| ((*name).to_owned(), value.to_cedar())),
    )
    .map_err(|e| Error::Internal(format!("policy context: {e}")))
}

impl Authorize for TokenRequest {
    fn caller(&self) -> &Caller {
        &self.caller
    }

    fn room(&self) -> &RoomArn {
        &self.room
    }

    fn action(&self) -> Action {
        Action::CreateChatToken
    }

    fn context(&self) -> Vec<(&'static str, ContextValue<'_>)> {
        vec![
            (
                "capabilities",
                ContextValue::Strings(self.capabilities.iter().map(Capability::ivs_name).collect()),
            ),
            (
                "sessionDurationInMinutes",
                ContextValue::Long(self.session_duration().minutes().into()),
            ),
            ("userId", ContextValue::String(self.user_id.expose())),
            (
                "attributeKeys",
                ContextValue::Strings(self.attributes.keys().collect()),
            ),
            (
                "attributesBytes",
                ContextValue::Long(self.attributes.byte_size() as i64),
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

    fn action(&self) -> Action {
        self.action.action()
    }

    fn context(&self) -> Vec<(&'static str, ContextValue<'_>)> {
        let mut context: Vec<(&'static str, ContextValue<'_>)> = self
            .action
            .user_id()
            .map(|user| ("userId", ContextValue::String(user.expose())))
            .into_iter()
            .collect();
        if let ModerationAction::Ban { duration, .. } = &self.action {
            let seconds = duration.map_or(0, |d| d.as_secs());
            context.push((
                "durationSeconds",
                ContextValue::Long(i64::try_from(seconds).unwrap_or(i64::MAX)),
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
    actions: HashMap<Action, EntityUid>,
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
            actions: Action::ALL
                .into_iter()
                .map(|action| (action, uid("Action", action.as_str())))
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
        self.decide(request, true)
    }

    /// [`Self::evaluate`]; the ids of the policies that permitted an allowed request are only listed when
    /// `ids_when_allowed` (a denial always lists its own), as naming them costs a string per policy.
    pub fn decide(
        &self,
        request: &impl Authorize,
        ids_when_allowed: bool,
    ) -> Result<PolicyDecision, Error> {
        let loaded = self.current.load();
        let pairs = request.context();
        let read = || {
            pairs
                .iter()
                .filter(|(name, _)| loaded.context_reads.wants(name))
        };
        let key = decision_key(
            request.caller().id(),
            request.action().as_str(),
            request.room().as_str(),
            read(),
        );
        let decision = loaded
            .decisions
            .get_or_try_insert(key, || self.ask_cedar(&loaded, request, read()))?;
        Ok(PolicyDecision {
            allowed: decision.allowed,
            policy_ids: if decision.allowed && !ids_when_allowed {
                Vec::new()
            } else {
                decision.policy_ids.clone()
            },
        })
    }

    /// How many decisions are cached now.
    pub fn cached_decisions(&self) -> usize {
        self.current.load().decisions.len()
    }
}

/// The decision cache's key: everything a decision can depend on while a policy set is loaded. The
/// caller's id and the room ARN (they pick the principal, its ancestors and attributes, and the room's
/// attributes), the action, and the context attributes the policies read, by name and value. Every part
/// is length-prefixed and every value tagged with its shape, so no two requests that could be decided
/// differently share a key.
fn decision_key<'a>(
    caller: &str,
    action: &str,
    room: &str,
    context: impl Iterator<Item = &'a (&'static str, ContextValue<'a>)>,
) -> String {
    let mut key = String::with_capacity(256);
    let mut part = |part: &str| crate::key::push_part(&mut key, part);
    part(caller);
    part(action);
    part(room);
    for (name, value) in context {
        part(name);
        match value {
            ContextValue::String(s) => {
                part("s");
                part(s);
            }
            ContextValue::Long(n) => {
                part("l");
                part(itoa::Buffer::new().format(*n));
            }
            ContextValue::Strings(items) => {
                part("S");
                part(itoa::Buffer::new().format(items.len()));
                for item in items {
                    part(item);
                }
            }
        }
    }
    key
}

impl PolicyEngine {
    /// Cedar's decision on `request`, with `context` as its context. Evaluation errors are logged here,
    /// so once per cached decision.
    fn ask_cedar<'a>(
        &self,
        loaded: &Loaded,
        request: &impl Authorize,
        context: impl Iterator<Item = &'a (&'static str, ContextValue<'a>)>,
    ) -> Result<CachedDecision, Error> {
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
        let context = cedar_context(context)?;
        let action = self
            .actions
            .get(&request.action())
            .ok_or_else(|| Error::Internal(format!("policy: no action {}", request.action())))?;
        // No schema here: the request's shape is this module's, checked against the schema by a unit test;
        // validating it per call would cost more than the decision.
        let cedar_request =
            Request::new(principal.clone(), action.clone(), resource, context, None)
                .map_err(|e| internal("request", &e))?;

        let entities = self.cached_slice(loaded, &principal, request.caller().id(), room_arn)?;
        let response = Authorizer::new().is_authorized(&cedar_request, &loaded.policies, &entities);
        for cedar_policy::AuthorizationError::PolicyEvaluationError(error) in
            response.diagnostics().errors()
        {
            // Cedar skips a policy that errors. Its message names entities and attributes; values that
            // could be personal (user id, attribute values) cannot appear: strict validation rules out type
            // errors and no extension functions are compiled in.
            tracing::warn!(policy_id = %error.policy_id(), "policy evaluation error: {}", error.inner());
        }
        Ok(CachedDecision {
            allowed: response.decision() == Decision::Allow,
            policy_ids: response
                .diagnostics()
                .reason()
                .map(PolicyId::to_string)
                .collect(),
        })
    }
}

impl PolicyEngine {
    /// [`Self::slice`], built once per caller and room while `loaded` is in force.
    fn cached_slice(
        &self,
        loaded: &Loaded,
        principal: &EntityUid,
        caller: &str,
        room: &RoomArn,
    ) -> Result<Arc<Entities>, Error> {
        let key = (caller.to_owned(), room.as_str().to_owned());
        loaded
            .slices
            .get_or_try_insert(key, || self.slice(loaded, principal, room))
    }

    /// The entities a decision about `principal` and `room` can reach (see the module docs): a lookup per
    /// ancestor of the caller, whatever the size of the entities file.
    fn slice(
        &self,
        loaded: &Loaded,
        principal: &EntityUid,
        room: &RoomArn,
    ) -> Result<Entities, Error> {
        let mut seen: HashSet<EntityUid> = loaded.shared.iter().map(Entity::uid).collect();
        let mut slice = loaded.shared.clone();
        with_ancestors(&loaded.entities, principal, |entity| {
            if seen.insert(entity.uid()) {
                slice.push(entity.clone());
            }
        });
        slice.push(self.room_entity(room));
        Entities::from_entities(slice, None)
            .map_err(|e| Error::Internal(format!("policy entities: {e}")))
    }

    /// The request's `Room`, its attributes parsed from the ARN.
    fn room_entity(&self, room: &RoomArn) -> Entity {
        Entity::new(
            EntityUid::from_type_name_and_id(self.room_type.clone(), EntityId::new(room.as_str())),
            HashMap::from([
                ("region".into(), string(room.region())),
                ("account".into(), string(room.account())),
                ("roomId".into(), string(room.room_id())),
            ]),
            HashSet::new(),
        )
        .expect("string attributes are always valid")
    }
}

/// Calls `visit` with the entity `uid` names and each of its ancestors that `entities` holds.
fn with_ancestors(entities: &Entities, uid: &EntityUid, mut visit: impl FnMut(&Entity)) {
    if let Some(entity) = entities.get(uid) {
        visit(entity);
    }
    if let Some(ancestors) = entities.ancestors(uid) {
        for ancestor in ancestors {
            if let Some(entity) = entities.get(ancestor) {
                visit(entity);
            }
        }
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
            let entities = Entities::from_json_str(&text, Some(schema))
                .map_err(|e| PolicyError(located(&path.display().to_string(), &text, &e)))?;
            if let Some(room) = entities
                .iter()
                .find(|e| e.uid().type_name().to_string() == "Room")
            {
                return Err(PolicyError(format!(
                    "{}: defines {}, but rooms are made per request from the room ARN (region, account, \
                     roomId); remove it",
                    path.display(),
                    room.uid()
                )));
            }
            entities
        }
    };
    let mut shared = Vec::new();
    let mut seen = HashSet::new();
    let named = policies
        .policies()
        .flat_map(|policy| policy.entity_literals());
    let actions = Action::ALL
        .into_iter()
        .map(|action| uid("Action", action.as_str()));
    for literal in named.chain(actions) {
        with_ancestors(&entities, &literal, |entity| {
            if seen.insert(entity.uid()) {
                shared.push(entity.clone());
            }
        });
    }
    Ok(Loaded {
        context_reads: ContextReads::of(&policies),
        decisions: BoundedCache::new(DECISION_CACHE_ENTRIES),
        policies,
        entities,
        shared,
        slices: BoundedCache::new(SLICE_CACHE_ENTRIES),
    })
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
    use crate::domain::token::test_request;
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

    #[test]
    fn the_decision_cache_is_bounded() {
        let engine = PolicyEngine::load(PolicySource::Development).unwrap();
        for i in 0..=DECISION_CACHE_ENTRIES {
            let room = format!("arn:aws:ivschat:us-west-2:111111111111:room/r{i}");
            assert!(
                engine
                    .evaluate(&request("c", &room, &[], None))
                    .unwrap()
                    .allowed
            );
        }
        assert_eq!(engine.cached_decisions(), 1, "started afresh when full");
    }

    #[test]
    fn decision_keys_are_unambiguous() {
        use ContextValue::{Long, String as Str, Strings};
        let contexts: Vec<Vec<(&'static str, ContextValue)>> = vec![
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
                    keys.insert(decision_key(caller, action, room, context.iter())),
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
        let engine = PolicyEngine::load(PolicySource::Development).unwrap();
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
        for i in 0..SLICE_CACHE_ENTRIES + 10 {
            let caller = format!("caller-{i}");
            assert!(
                engine
                    .evaluate(&request(&caller, ROOM_111, &[], None))
                    .unwrap()
                    .allowed
            );
            assert!(kept(&engine) <= SLICE_CACHE_ENTRIES);
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
                claims: Box::new(crate::domain::TokenClaims {
                    token_id: "t".into(),
                    room: room.clone(),
                    user_id: user,
                    capabilities: Default::default(),
                    attributes: Default::default(),
                    issued_at: now,
                    token_expires_at: now,
                    session_expires_at: now,
                }),
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
        check(&|| {
            (
                token.room.as_str().to_owned(),
                token.action(),
                cedar_context(&token.context()).unwrap(),
            )
        });
        let mut seen = vec![token.action().as_str()];
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
}
