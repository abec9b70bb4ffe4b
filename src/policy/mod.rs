//! Cedar policy: may this caller grant these capabilities for this room, or moderate it?
//!
//! A request ([`Authorize`]) is put to Cedar as
//! - principal `Caller::"<caller id>"` (with groups and attributes from the optional entities file),
//! - action `Action::"CreateChatToken"`, a moderation action: `DisconnectUser`, `BanUser`, `UnbanUser`,
//!   `ListBans`, `VerifyChatToken`, or a messaging action: `SendEvent`, `DeleteMessage`,
//! - resource `Room::"<room ARN>"` with attributes `region`, `account`, `roomId` parsed from the ARN,
//! - context, for CreateChatToken: `capabilities` (IVS names), `sessionDurationInMinutes` (60 when absent),
//!   `userId`, `attributeKeys` and `attributesBytes`; for moderation actions about a user: `userId`, and
//!   for BanUser `durationSeconds` (0: until unbanned); for SendEvent `eventName`, `attributeKeys` and
//!   `attributesBytes`; for DeleteMessage `reasonLength` (0: no reason). Only the attributes some policy reads are put in
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
//! room, so up to [`CacheSizes::slices`] slices are kept with the policy set they were made from (a
//! reload starts afresh). Requests are not checked
//! against the schema per call: their shape is fixed by this module, and a unit test checks every action's
//! context against the schema.
//!
//! Decisions themselves are kept too: while a policy set is loaded, a decision depends only on the caller,
//! the action, the room and the context attributes the policies read (`reads`), so up to
//! [`CacheSizes::decisions`] are kept by exactly those (`decision_key`, every part length-prefixed; the
//! cache holds the key's secret-keyed 128-bit digest, `cache::Digest`, compared in place). Calls
//! that differ only in attributes no policy reads, the user id with the production policy for one, are
//! decided once. Both caches are bounded, sharded and evict with S3-FIFO (`cache`): with more live
//! (caller, room) pairs than they hold, the pairs that come back stay and the one-off ones go, instead
//! of the whole cache emptying at once.

mod cache;
pub mod layer;
mod load;
mod reads;
mod request;
mod slice;

use std::{
    collections::HashMap,
    path::PathBuf,
    str::FromStr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use arc_swap::ArcSwap;
use cedar_policy::{
    Authorizer, Decision, EntityId, EntityTypeName, EntityUid, Request, Schema, SchemaFragment,
};
use smallvec::SmallVec;

use crate::config::PolicyConfig;
use crate::domain::{Action, Error, end_user::DEFAULT_POLICY_CLAIMS};
use load::{Loaded, load, located, uid};
use reads::{ContextReads, Read};
use request::cedar_context;

pub use layer::PolicyLayer;
pub use request::{Authorize, ContextValue};

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
pub struct PolicyError(pub(super) String);

/// How many entries the engine's caches hold (`policy.decision_cache_entries`,
/// `policy.slice_cache_entries`): a decision key holds what callers send (room ARN, capabilities,
/// attribute keys), so the bounds cap the memory whatever they send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheSizes {
    /// Decisions kept (a few hundred bytes each).
    pub decisions: usize,
    /// (caller, room) entity slices kept (a few KB each).
    pub slices: usize,
}

impl From<&PolicyConfig> for CacheSizes {
    fn from(config: &PolicyConfig) -> Self {
        CacheSizes {
            decisions: config.decision_cache_entries,
            slices: config.slice_cache_entries,
        }
    }
}

impl Default for CacheSizes {
    /// The configuration's defaults.
    fn default() -> Self {
        (&PolicyConfig::default()).into()
    }
}

/// A decision as Cedar made it, with the policies that determined it by number (`Loaded::policy_ids`):
/// kept inline, so a hit copies a few bytes and touches no count shared with other threads.
#[derive(Clone, Debug)]
struct CachedDecision {
    allowed: bool,
    policies: SmallVec<[u32; 3]>,
}

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

/// Evaluates requests against the current policy set; reloadable.
pub struct PolicyEngine {
    source: PolicySource,
    schema: Schema,
    current: ArcSwap<Loaded>,
    /// The schema's actions, made once.
    actions: HashMap<Action, EntityUid>,
    caller_type: EntityTypeName,
    room_type: EntityTypeName,
    /// The bounds of each loaded set's caches.
    cache_sizes: CacheSizes,
    /// Reloads refused because the new files did not parse or validate.
    refused_reloads: AtomicU64,
}

impl PolicyEngine {
    /// Loads and validates the policies of `source`, with the end-user claims policies see by default
    /// ([`DEFAULT_POLICY_CLAIMS`]) and the default cache sizes; any error stops here.
    pub fn load(source: PolicySource) -> Result<Self, PolicyError> {
        Self::load_with_claims(
            source,
            &DEFAULT_POLICY_CLAIMS.map(str::to_owned),
            CacheSizes::default(),
        )
    }

    /// Loads and validates the policies of `source`, against the schema with `end_user_claims`
    /// (`end_user.claims`) declared as the end user's claims, caching as `cache_sizes` says; any error
    /// stops here.
    pub fn load_with_claims(
        source: PolicySource,
        end_user_claims: &[String],
        cache_sizes: CacheSizes,
    ) -> Result<Self, PolicyError> {
        let schema = schema(end_user_claims)?;
        let loaded = load(&source, &schema, cache_sizes)?;
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
            cache_sizes,
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
        match load(&self.source, &self.schema, self.cache_sizes) {
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
            &loaded.context_reads,
        );
        let decision = loaded
            .decisions
            .get_or_try_insert(&loaded.digester.digest(&key), || {
                self.ask_cedar(&loaded, request, read())
            })?;
        Ok(PolicyDecision {
            allowed: decision.allowed,
            policy_ids: if decision.allowed && !ids_when_allowed {
                Vec::new()
            } else {
                decision
                    .policies
                    .iter()
                    .map(|&number| loaded.policy_ids[number as usize].clone())
                    .collect()
            },
        })
    }

    /// How many decisions are cached now.
    pub fn cached_decisions(&self) -> usize {
        self.current.load().decisions.len()
    }
}

/// The embedded schema, with `EndUserClaims` declared from the configured claim names: each an optional
/// set of strings.
fn schema(end_user_claims: &[String]) -> Result<Schema, PolicyError> {
    let (base, _) = SchemaFragment::from_cedarschema_str(SCHEMA)
        .map_err(|e| PolicyError(located("schema.cedarschema", SCHEMA, &e)))?;
    // Names are checked at load (no quote, no backslash), so each is a valid quoted attribute name.
    let claims: String = end_user_claims
        .iter()
        .map(|name| format!("\"{name}\"?: Set<String>, "))
        .collect();
    let declared = format!("type EndUserClaims = {{ {claims}}};");
    let (claims, _) = SchemaFragment::from_cedarschema_str(&declared)
        .map_err(|e| PolicyError(located("end_user.claims", &declared, &e)))?;
    Schema::from_schema_fragments([base, claims]).map_err(|e| PolicyError(format!("schema: {e}")))
}

/// The decision cache's key: everything a decision can depend on while a policy set is loaded. The
/// caller's id and the room ARN (they pick the principal, its ancestors and attributes, and the room's
/// attributes), the action, and the context the policies can read (`reads`), by name and value: of a
/// record only the attributes they read (`context.end_user.verified` reads the one attribute, not the
/// end user's subject). Every part is length-prefixed and every value tagged with its shape, records with
/// how many attributes follow, so no two requests that could be decided differently share a key.
fn decision_key<'a>(
    caller: &str,
    action: &str,
    room: &str,
    context: impl Iterator<Item = &'a (&'static str, ContextValue<'a>)>,
    reads: &ContextReads,
) -> String {
    let mut key = String::with_capacity(256);
    crate::key::push_part(&mut key, caller);
    crate::key::push_part(&mut key, action);
    crate::key::push_part(&mut key, room);
    let mut path = Vec::with_capacity(4);
    for (name, value) in context {
        crate::key::push_part(&mut key, name);
        path.push(*name);
        push_value(&mut key, value, &mut path, reads);
        path.pop();
    }
    key
}

/// Appends `value`, found at `path`, as far as `reads` says the policies can observe it.
fn push_value<'a>(
    key: &mut String,
    value: &'a ContextValue<'a>,
    path: &mut Vec<&'a str>,
    reads: &ContextReads,
) {
    let mut part = |part: &str| crate::key::push_part(key, part);
    match value {
        ContextValue::String(s) => {
            part("s");
            part(s);
        }
        ContextValue::Long(n) => {
            part("l");
            part(itoa::Buffer::new().format(*n));
        }
        ContextValue::Bool(b) => part(if *b { "t" } else { "f" }),
        ContextValue::Strings(items) => {
            part("S");
            part(itoa::Buffer::new().format(items.len()));
            for item in items {
                part(item);
            }
        }
        ContextValue::Record(fields) => {
            let whole = reads.read(path) == Read::Whole;
            let mut read = Vec::with_capacity(fields.len());
            for (name, field) in fields {
                path.push(name);
                if whole || reads.read(path) != Read::Nothing {
                    read.push((*name, field));
                }
                path.pop();
            }
            part("r");
            part(itoa::Buffer::new().format(read.len()));
            for (name, field) in read {
                crate::key::push_part(key, name);
                path.push(name);
                push_value(key, field, path, reads);
                path.pop();
            }
        }
    }
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
            policies: response
                .diagnostics()
                .reason()
                .map(|id| {
                    loaded.policy_numbers.get(id).copied().ok_or_else(|| {
                        Error::Internal(format!("policy: {id} is not in the loaded set"))
                    })
                })
                .collect::<Result<_, _>>()?,
        })
    }
}

#[cfg(test)]
mod tests;
