//! The one place the domain stacks are composed: the tower services between the gRPC handlers and the
//! issuer (CreateChatToken) or moderator (ModerationService), and the choice of issuer from configuration.
//!
//! Both stacks share one policy engine, one limiter store and one moderation store, so a ban made through
//! the moderation stack is what the token stack's ban check reads.
//!
//! Everything here works from a loaded [`Config`], whose values are already typed and checked; what can
//! still fail is what lives outside it: policy and key files, the Redis URL's client.

use std::{ops::ControlFlow, path::PathBuf, sync::Arc};

use tower::{ServiceBuilder, util::BoxCloneSyncService};

use crate::config::{Config, IssuerKind};
use crate::error::Error;
use crate::issuer::{
    Issuer, IssuerService,
    ivs::{CallBounds, IvsIssuer, Routes},
    local::{KeyError, KeySource, LiveKeys, LocalIssuer},
};
use crate::moderation::{
    BanCheckLayer, ModerationOutcome, ModerationRequest, ModerationService, ModerationStores,
    Moderator, local::LocalModerator, store::MemoryModeration, store::SharedModeration,
};
use crate::policy::{PolicyEngine, PolicyError, PolicyLayer, PolicySource};
use crate::ratelimit::{
    DISCONNECT_QUOTA_LIMIT_NAME, FallbackStore, IVS_QUOTA_LIMIT_NAME, Limit, LimitKey, MemoryStore,
    RateLimitLayer, RedisStore, Store,
};
use crate::reload::{self, Reload, Trigger};
use crate::request::{IssuedToken, TokenRequest};
use crate::scope::{ScopeLayer, ServedRooms};

/// The domain stack as the handler sees it: a validated request in, a token or a domain error out.
pub type TokenStack = BoxCloneSyncService<TokenRequest, IssuedToken, Error>;

/// The moderation stack as its handler sees it.
pub type ModerationStack = BoxCloneSyncService<ModerationRequest, ModerationOutcome, Error>;

/// What the server serves: the token stack, and the moderation service when there is a moderator.
pub struct Stacks {
    /// CreateChatToken.
    pub tokens: TokenStack,
    /// ModerationService; `None` for a stack composed around an embedder's own issuer.
    pub moderation: Option<Moderation>,
}

/// The moderation stack and what its handler needs besides.
pub struct Moderation {
    /// DisconnectUser, BanUser, UnbanUser, ListBans, VerifyChatToken.
    pub stack: ModerationStack,
    /// The local issuer's keys (as they are now: they reload), which open tokens for VerifyChatToken;
    /// `None` with the ivs issuer.
    pub verifier: Option<LiveKeys>,
}

impl From<TokenStack> for Stacks {
    fn from(tokens: TokenStack) -> Self {
        Stacks {
            tokens,
            moderation: None,
        }
    }
}

/// Why the stacks could not be built from a valid configuration: a file it names, or the Redis client.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The policy files or the entities file do not load (`policy.files`, `policy.entities_file`).
    #[error("policy.files: {0}")]
    Policy(#[from] PolicyError),
    /// The local issuer's keys do not load (`local_issuer.keys_file` or `local_issuer.key`).
    #[error("local issuer keys: {0}")]
    Keys(#[from] KeyError),
    /// The Redis client cannot be made from `limiter.redis_url`. redis-rs' errors describe the URL's
    /// problem without echoing it, password included.
    #[error("limiter.redis_url: {0}")]
    Redis(#[from] redis::RedisError),
}

/// Builds the stacks `config` describes around `store`, the process's one limiter store (from
/// [`limiter_store`]). Starts policy and key reloading, so call it inside a tokio runtime.
pub async fn from_config(config: &Config, store: Store) -> Result<Stacks, StartError> {
    let policy = load_policy(config)?;
    let moderation_store = moderation_store(config, &store);
    match config.issuer {
        IssuerKind::Ivs => {
            let issuer = IvsIssuer::from_environment(
                ivs_call_bounds(config),
                ivs_routes(config),
                // The DisconnectUser guard shares the rate limits' store, so a shared store shares the
                // IVS budget.
                store.clone(),
                ivs_disconnect_quota(config),
            )
            .await;
            tracing::info!(
                endpoint = ?config.ivs.endpoint_url,
                regions = ?config.ivs.allowed_regions,
                "IVS Chat issuer ready"
            );
            Ok(compose_moderated(
                config,
                &policy,
                store,
                moderation_store,
                Arc::new(issuer),
            ))
        }
        IssuerKind::Local => {
            let keys = local_keys(config)?;
            let moderator = LocalModerator::new(
                moderation_store.clone(),
                config.local_issuer.token_ttl,
                config.moderation.single_use_tokens,
            );
            Ok(Stacks {
                tokens: compose_parts(
                    config,
                    &policy,
                    store.clone(),
                    moderation_store.clone(),
                    LocalIssuer::new(keys.clone(), config.local_issuer.token_ttl),
                ),
                moderation: Some(Moderation {
                    stack: moderation(config, &policy, store, moderation_store, moderator),
                    verifier: Some(keys),
                }),
            })
        }
    }
}

/// How the IVS issuer bounds each call, as `config` says.
pub fn ivs_call_bounds(config: &Config) -> CallBounds {
    let settings = &config.ivs;
    CallBounds {
        connect_timeout: settings.connect_timeout,
        read_timeout: settings.read_timeout,
        attempt_timeout: settings.attempt_timeout,
        operation_timeout: settings.operation_timeout,
        max_attempts: settings.max_attempts,
        initial_backoff: settings.initial_backoff,
    }
}

/// The rooms the IVS issuer serves, as `config` says.
pub fn ivs_served_rooms(config: &Config) -> ServedRooms {
    ServedRooms::new(
        config.ivs.allowed_regions.clone(),
        config.ivs.allowed_accounts.clone(),
    )
}

/// Where the IVS issuer sends calls, as `config` says.
pub fn ivs_routes(config: &Config) -> Routes {
    Routes {
        served: ivs_served_rooms(config),
        assume_roles: config.ivs.assume_roles.clone(),
        endpoint_url: config.ivs.endpoint_url.clone(),
    }
}

/// The built-in limit that keeps CreateChatToken calls under IVS Chat's quota, as `config` says.
pub fn ivs_quota(config: &Config) -> Limit {
    Limit {
        name: IVS_QUOTA_LIMIT_NAME.into(),
        key: LimitKey::AccountRegion,
        rate: config.ivs.quota,
        burst: config.ivs.quota_burst,
        shadow: false,
    }
}

/// The DisconnectUser quota guard of the IVS issuer, as `config` says.
pub fn ivs_disconnect_quota(config: &Config) -> Limit {
    Limit {
        name: DISCONNECT_QUOTA_LIMIT_NAME.into(),
        key: LimitKey::AccountRegion,
        rate: config.ivs.disconnect_quota,
        burst: config.ivs.disconnect_quota_burst,
        shadow: false,
    }
}

/// Where the local issuer's keys come from, as `config` says.
pub fn key_source(config: &Config) -> KeySource<'_> {
    let settings = &config.local_issuer;
    match (&settings.keys_file, &settings.key) {
        (Some(path), _) => KeySource::File(path),
        (None, Some(key)) => KeySource::Single(key.expose()),
        (None, None) => KeySource::Ephemeral,
    }
}

/// Loads the local issuer's keys and, from a key set file, keeps them current: reloaded when the file
/// changes and on SIGHUP. Call inside a tokio runtime.
pub fn local_keys(config: &Config) -> Result<LiveKeys, KeyError> {
    let source = key_source(config);
    let keys = LiveKeys::new(source.load()?);
    let active = keys.current();
    match source {
        KeySource::Ephemeral => tracing::warn!(
            key_id = active.active_key_id(),
            "no local issuer key configured (local_issuer.keys_file or CTS_LOCAL_ISSUER__KEY): \
             generated an ephemeral key; tokens minted now cannot be verified after a restart"
        ),
        KeySource::Single(_) => tracing::info!(
            key_id = active.active_key_id(),
            "local issuer key loaded (local_issuer.key)"
        ),
        KeySource::File(path) => {
            tracing::info!(
                key_id = active.active_key_id(),
                keys = active.key_ids().count(),
                "local issuer keys loaded (local_issuer.keys_file)"
            );
            watch_keys(&keys, path.to_owned(), config);
        }
    }
    Ok(keys)
}

/// Reloads `keys` from `path` when the file changes and on SIGHUP, for as long as anything holds them.
fn watch_keys(keys: &LiveKeys, path: PathBuf, config: &Config) {
    let weak = keys.downgrade();
    let paths = vec![path.clone()];
    reload::spawn(
        paths,
        config.reload_interval,
        true,
        move |trigger: Trigger| {
            let Some(keys) = weak.upgrade() else {
                return ControlFlow::Break(());
            };
            ControlFlow::Continue(match keys.reload(&path) {
                Ok(set) => {
                    tracing::info!(
                        ?trigger,
                        key_id = set.active_key_id(),
                        keys = set.key_ids().count(),
                        "local issuer keys reloaded"
                    );
                    Reload::Applied
                }
                Err(e) => Reload::Refused(format!(
                    "local issuer key reload refused, the previous keys stay in force: {e}"
                )),
            })
        },
    );
}

/// Both stacks around an issuer that is its own moderator (the ivs issuer, or an embedder's), sharing one
/// policy engine, `store` and the moderation store next to it. VerifyChatToken is not served: only the
/// local issuer's tokens can be verified here.
pub fn stacks_with<I: Issuer + Moderator>(
    config: &Config,
    store: Store,
    issuer: Arc<I>,
) -> Result<Stacks, StartError> {
    let bans = moderation_store(config, &store);
    Ok(compose_moderated(
        config,
        &load_policy(config)?,
        store,
        bans,
        issuer,
    ))
}

fn compose_moderated<I: Issuer + Moderator>(
    config: &Config,
    policy: &Arc<PolicyEngine>,
    store: Store,
    bans: ModerationStores,
    issuer: Arc<I>,
) -> Stacks {
    Stacks {
        tokens: compose_parts(config, policy, store.clone(), bans.clone(), issuer.clone()),
        moderation: Some(Moderation {
            stack: moderation(config, policy, store, bans, issuer),
            verifier: None,
        }),
    }
}

/// The moderation store next to `store`: in process beside an in-process limiter, in the same Redis (with
/// its timeout and failure mode) beside a Redis limiter. Call it once per process, like [`limiter_store`].
pub fn moderation_store(config: &Config, store: &Store) -> ModerationStores {
    let capacity = config.limiter.max_tracked_keys;
    match store {
        Store::Memory(_) => ModerationStores::Memory(MemoryModeration::new(capacity)),
        Store::Redis(shared) => {
            ModerationStores::Redis(SharedModeration::new(shared.clone(), capacity))
        }
    }
}

/// The limiter store `config.limiter` chooses. Call it once per process and hand clones to everything that
/// limits: clones share one budget. With the Redis backend it starts the Redis probe, so call it inside a
/// tokio runtime; Redis need not be up yet.
pub fn limiter_store(config: &Config) -> Result<Store, StartError> {
    let settings = &config.limiter;
    let local = MemoryStore::new(settings.max_tracked_keys);
    let Some(url) = settings.redis_url() else {
        return Ok(Store::Memory(local));
    };
    let redis = RedisStore::open(url.expose(), settings.redis_cluster, &settings.key_prefix)?;
    tracing::info!(
        cluster = settings.redis_cluster,
        timeout = ?settings.redis_timeout,
        failure_mode = ?settings.failure_mode,
        "rate limits shared through Redis"
    );
    Ok(Store::Redis(FallbackStore::new(
        redis,
        local,
        settings.redis_timeout,
        settings.failure_mode,
    )))
}

/// Wraps `issuer` in the domain layers `config` describes. Any [`Issuer`] fits, which is how tests and
/// embedders plug in their own.
///
/// Each call makes its own limiter store and policy watcher: call it once per process, so every connection
/// shares one budget. To choose the store, use [`limiter_store`] and [`compose_with`].
pub fn compose<I: Issuer>(config: &Config, issuer: I) -> Result<TokenStack, StartError> {
    compose_with(config, limiter_store(config)?, issuer)
}

/// [`compose`] with the limiter store given.
pub fn compose_with<I: Issuer>(
    config: &Config,
    store: Store,
    issuer: I,
) -> Result<TokenStack, StartError> {
    let bans = moderation_store(config, &store);
    Ok(compose_parts(
        config,
        &load_policy(config)?,
        store,
        bans,
        issuer,
    ))
}

fn compose_parts<I: Issuer>(
    config: &Config,
    policy: &Arc<PolicyEngine>,
    store: Store,
    bans: ModerationStores,
    issuer: I,
) -> TokenStack {
    let (scope, limits) = match config.issuer {
        IssuerKind::Ivs => (
            Some(ScopeLayer::new(ivs_served_rooms(config))),
            config
                .rate_limits
                .iter()
                .cloned()
                .chain([ivs_quota(config)])
                .collect(),
        ),
        IssuerKind::Local => (None, config.rate_limits.clone()),
    };
    // With a single Redis node the ban lookup rides in the rate-limit script call: one round trip per
    // request. Otherwise (in process, or a cluster, where the ban record and the limits live in different
    // slots) the ban check is a layer of its own.
    let (ban_check, shared_bans) = match (&bans, &store) {
        (ModerationStores::Redis(shared), Store::Redis(_)) if !config.limiter.redis_cluster => {
            (None, Some(shared.clone()))
        }
        _ => (Some(BanCheckLayer::new(bans)), None),
    };
    let mut rate_limits = RateLimitLayer::new(limits, store);
    if let Some(shared) = shared_bans {
        rate_limits = rate_limits.with_bans(shared);
    }
    let stack = ServiceBuilder::new()
        // Policy first: Cedar answers in microseconds, and a caller it denies must consume no rate-limit
        // budget or upstream quota, nor learn whether a user is banned.
        .layer(PolicyLayer::new(policy.clone(), config.policy.shadow))
        // Then the rooms the upstream serves (ivs): a room in a region or account not served is refused
        // before it costs a store round trip or spends any budget, and before it can make the issuer hold
        // anything for its region.
        .option_layer(scope)
        // Then bans: a banned user's requests consume no budget either (here, or in the limits' call).
        .option_layer(ban_check)
        // Then every rate limit, the IVS quota included (ivs), in one store call: a request refused by
        // any of them consumes from none, and only requests about to be issued spend the upstream quota.
        .layer(rate_limits)
        .service(IssuerService::new(issuer));
    BoxCloneSyncService::new(stack)
}

/// The moderation stack: the same policy engine and limits as the token stack, over `moderator` and the
/// ban store.
pub fn moderation<M: Moderator>(
    config: &Config,
    policy: &Arc<PolicyEngine>,
    store: Store,
    bans: ModerationStores,
    moderator: M,
) -> ModerationStack {
    let stack = ServiceBuilder::new()
        // Policy first, for the same reasons as for tokens: the production policy gives these actions to
        // moderators (and VerifyChatToken to chat servers) only.
        .layer(PolicyLayer::new(policy.clone(), config.policy.shadow))
        // The configured limits count moderation calls in budgets of their own (see `Limited::scope`).
        .layer(RateLimitLayer::new(config.rate_limits.clone(), store))
        .service(ModerationService::new(moderator, bans));
    BoxCloneSyncService::new(stack)
}

/// Loads the configured policies and keeps them current: reloaded when a file changes and on SIGHUP.
fn load_policy(config: &Config) -> Result<Arc<PolicyEngine>, PolicyError> {
    let source = config.policy.source();
    let engine = Arc::new(PolicyEngine::load(source.clone())?);
    match source {
        PolicySource::Development => tracing::warn!(
            "no policy files configured (policy.files): the embedded development policy permits every \
             valid request from any caller; serving on loopback only"
        ),
        PolicySource::Files { policies, entities } => {
            tracing::info!(files = ?policies, entities = ?entities, shadow = config.policy.shadow, "policies loaded");
            let weak = Arc::downgrade(&engine);
            let paths = policies.into_iter().chain(entities).collect();
            reload::spawn(
                paths,
                config.reload_interval,
                true,
                move |trigger: Trigger| {
                    let Some(engine) = weak.upgrade() else {
                        return ControlFlow::Break(());
                    };
                    ControlFlow::Continue(match engine.reload() {
                        Ok(()) => {
                            tracing::info!(?trigger, "policies reloaded");
                            Reload::Applied
                        }
                        Err(e) => Reload::Refused(format!(
                            "policy reload refused ({} so far), the previous policies stay in force: {e}",
                            engine.refused_reloads()
                        )),
                    })
                },
            );
        }
    }
    Ok(engine)
}
