//! Loading a policy set: the files read, parsed, validated against the schema, their entities checked, and
//! what every request's slice shares picked once.

use std::{
    collections::{HashMap, HashSet},
    fmt::Write as _,
    path::Path,
    str::FromStr,
    sync::Arc,
};

use cedar_policy::{
    Entities, Entity, EntityId, EntityTypeName, EntityUid, PolicyId, PolicySet,
    RestrictedExpression, Schema, ValidationMode, Validator,
};
use miette::Diagnostic;

use super::cache::{BoundedCache, Digest, DigestBits, Digester};
use super::reads::ContextReads;
use super::{CacheSizes, CachedDecision, DEVELOPMENT_POLICY, PolicyError, PolicySource};
use crate::domain::Action;

/// One loaded, validated policy set and the entities it is evaluated with.
pub(super) struct Loaded {
    pub(super) policies: PolicySet,
    /// Everything in the entities file (and the schema's actions).
    pub(super) entities: Entities,
    /// What every request's slice holds whatever its caller: the entities the policies name, their
    /// ancestors, and the actions.
    pub(super) shared: Vec<Entity>,
    /// Slices already built, by caller id and room ARN: about [`CacheSizes::slices`].
    pub(super) slices: BoundedCache<(String, String), Arc<Entities>>,
    /// The context attributes the policies can read: the only ones each request's context holds.
    pub(super) context_reads: ContextReads,
    /// Decisions already made, by the digest of their decision key: about [`CacheSizes::decisions`].
    pub(super) decisions: BoundedCache<Digest, CachedDecision, DigestBits>,
    /// Digests decision keys with a key of this load's own.
    pub(super) digester: Digester,
    /// Every policy's id, in the order cached decisions number them.
    pub(super) policy_ids: Vec<String>,
    /// The number of each policy, by its id.
    pub(super) policy_numbers: HashMap<PolicyId, u32>,
}

pub(super) fn string(s: &str) -> RestrictedExpression {
    RestrictedExpression::new_string(s.to_owned())
}

pub(super) fn uid(entity_type: &str, id: &str) -> EntityUid {
    EntityUid::from_type_name_and_id(
        EntityTypeName::from_str(entity_type).expect("valid type name"),
        EntityId::new(id),
    )
}

pub(super) fn load(
    source: &PolicySource,
    schema: &Schema,
    cache_sizes: CacheSizes,
) -> Result<Loaded, PolicyError> {
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
    let policy_ids: Vec<String> = policies.policies().map(|p| p.id().to_string()).collect();
    let policy_numbers = policies
        .policies()
        .zip(0..)
        .map(|(policy, number)| (policy.id().clone(), number))
        .collect();
    Ok(Loaded {
        policy_ids,
        policy_numbers,
        context_reads: ContextReads::of(&policies),
        decisions: BoundedCache::with_hasher(cache_sizes.decisions, DigestBits),
        digester: Digester::new(),
        policies,
        entities,
        shared,
        slices: BoundedCache::new(cache_sizes.slices),
    })
}

fn read(path: &Path) -> Result<String, PolicyError> {
    std::fs::read_to_string(path)
        .map_err(|e| PolicyError(format!("cannot read {}: {e}", path.display())))
}

/// `file:line:column: message (help)`, the location taken from the diagnostic's first label.
pub(super) fn located(file: &str, source: &str, error: &(impl Diagnostic + ?Sized)) -> String {
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

/// Calls `visit` with the entity `uid` names and each of its ancestors that `entities` holds.
pub(super) fn with_ancestors(entities: &Entities, uid: &EntityUid, mut visit: impl FnMut(&Entity)) {
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
