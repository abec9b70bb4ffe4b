//! The one place the domain stacks are composed: the tower services between the gRPC handlers and the
//! issuer (CreateChatToken) or moderator (ModerationService), and the choice of issuer from configuration.
//!
//! Both stacks share one policy engine, one limiter store and one moderation store, so a ban made through
//! the moderation stack is what the token stack's ban check reads.

use std::{ops::ControlFlow, sync::Arc};

use tower::{ServiceBuilder, util::BoxCloneSyncService};

use crate::config::{Config, ConfigError, IssuerKind, KeySource};
use crate::error::Error;
use crate::issuer::{
    IssuedToken, Issuer, IssuerService, ivs::IvsIssuer, local::KeySet, local::LocalIssuer,
};
use crate::moderation::{
    BanCheckLayer, ModerationOutcome, ModerationRequest, ModerationService, ModerationStores,
    Moderator, local::LocalModerator, store::MemoryModeration, store::SharedModeration,
};
use crate::policy::{PolicyEngine, PolicyLayer, PolicySource};
use crate::ratelimit::{FallbackStore, MemoryStore, RateLimitLayer, RedisStore, Store};
use crate::reload::{self, Trigger};
use crate::request::TokenRequest;

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
    /// The local issuer's keys, which open tokens for VerifyChatToken; `None` with the ivs issuer.
    pub verifier: Option<Arc<KeySet>>,
}

impl From<TokenStack> for Stacks {
    fn from(tokens: TokenStack) -> Self {
        Stacks {
            tokens,
            moderation: None,
        }
    }
}

/// Builds the stacks `config` describes around `store`, the process's one limiter store (from
/// [`limiter_store`]). Starts policy reloading, so call it inside a tokio runtime.
pub async fn from_config(config: &Config, store: Store) -> Result<Stacks, ConfigError> {
    let policy = load_policy(config)?;
    let moderation_store = moderation_store(config, &store)?;
    match config.issuer {
        IssuerKind::Ivs => {
            // The quota guard shares the rate limits' store, so a shared store shares the IVS budget.
            let issuer = IvsIssuer::from_environment(&config.ivs, store.clone()).await?;
            tracing::info!(endpoint = ?config.ivs.endpoint_url, "IVS Chat issuer ready");
            compose_moderated(config, &policy, store, moderation_store, Arc::new(issuer))
        }
        IssuerKind::Local => {
            let settings = &config.local_issuer;
            let (keys, source) = settings.key_set()?;
            if source == KeySource::Ephemeral {
                tracing::warn!(
                    key_id = keys.active_key_id(),
                    "no local issuer key configured (local_issuer.keys_file or CTS_LOCAL_ISSUER__KEY): \
                     generated an ephemeral key; tokens minted now cannot be verified after a restart"
                );
            } else {
                tracing::info!(
                    key_id = keys.active_key_id(),
                    ?source,
                    "local issuer keys loaded"
                );
            }
            let moderator = LocalModerator::new(
                moderation_store.clone(),
                settings.token_ttl,
                config.moderation.single_use_tokens,
            );
            Ok(Stacks {
                tokens: compose_parts(
                    config,
                    &policy,
                    store.clone(),
                    moderation_store.clone(),
                    LocalIssuer::new(keys.clone(), settings.token_ttl),
                )?,
                moderation: Some(Moderation {
                    stack: moderation(config, &policy, store, moderation_store, moderator)?,
                    verifier: Some(keys),
                }),
            })
        }
    }
}

/// Both stacks around an issuer that is its own moderator (the ivs issuer, or an embedder's), sharing one
/// policy engine, `store` and the moderation store next to it. VerifyChatToken is not served: only the
/// local issuer's tokens can be verified here.
pub fn stacks_with<I: Issuer + Moderator>(
    config: &Config,
    store: Store,
    issuer: Arc<I>,
) -> Result<Stacks, ConfigError> {
    let bans = moderation_store(config, &store)?;
    compose_moderated(config, &load_policy(config)?, store, bans, issuer)
}

fn compose_moderated<I: Issuer + Moderator>(
    config: &Config,
    policy: &Arc<PolicyEngine>,
    store: Store,
    bans: ModerationStores,
    issuer: Arc<I>,
) -> Result<Stacks, ConfigError> {
    Ok(Stacks {
        tokens: compose_parts(config, policy, store.clone(), bans.clone(), issuer.clone())?,
        moderation: Some(Moderation {
            stack: moderation(config, policy, store, bans, issuer)?,
            verifier: None,
        }),
    })
}

/// The moderation store next to `store`: in process beside an in-process limiter, in the same Redis (with
/// its timeout and failure mode) beside a Redis limiter. Call it once per process, like [`limiter_store`].
pub fn moderation_store(config: &Config, store: &Store) -> Result<ModerationStores, ConfigError> {
    let capacity = config.limiter.max_tracked_keys()?;
    Ok(match store {
        Store::Memory(_) => ModerationStores::Memory(MemoryModeration::new(capacity)),
        Store::Redis(shared) => {
            ModerationStores::Redis(SharedModeration::new(shared.clone(), capacity))
        }
    })
}

/// The limiter store `config.limiter` chooses. Call it once per process and hand clones to everything that
/// limits (the rate-limit layer, the IVS quota guard): clones share one budget. With the Redis backend it
/// starts the Redis probe, so call it inside a tokio runtime; Redis need not be up yet.
pub fn limiter_store(config: &Config) -> Result<Store, ConfigError> {
    let settings = &config.limiter;
    let local = MemoryStore::new(settings.max_tracked_keys()?);
    let Some(url) = settings.redis_url()? else {
        return Ok(Store::Memory(local));
    };
    let redis = RedisStore::open(url.expose(), settings.redis_cluster, &settings.key_prefix)
        // redis-rs' errors describe the URL's problem without echoing it, password included.
        .map_err(|e| ConfigError::Invalid {
            setting: "limiter.redis_url".into(),
            reason: e.to_string(),
        })?;
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
/// shares one budget. To share the store with the issuer, use [`limiter_store`] and [`compose_with`].
pub fn compose<I: Issuer>(config: &Config, issuer: I) -> Result<TokenStack, ConfigError> {
    compose_with(config, limiter_store(config)?, issuer)
}

/// [`compose`] with the limiter store given: the one the issuer (its upstream quota guard) uses too.
pub fn compose_with<I: Issuer>(
    config: &Config,
    store: Store,
    issuer: I,
) -> Result<TokenStack, ConfigError> {
    let bans = moderation_store(config, &store)?;
    compose_parts(config, &load_policy(config)?, store, bans, issuer)
}

fn compose_parts<I: Issuer>(
    config: &Config,
    policy: &Arc<PolicyEngine>,
    store: Store,
    bans: ModerationStores,
    issuer: I,
) -> Result<TokenStack, ConfigError> {
    let stack = ServiceBuilder::new()
        // Policy first: Cedar answers in microseconds, and a caller it denies must consume no rate-limit
        // budget or upstream quota, nor learn whether a user is banned.
        .layer(PolicyLayer::new(policy.clone(), config.policy.shadow))
        // Then bans: a banned user's requests consume no budget either.
        .layer(BanCheckLayer::new(bans))
        // Then rate limits, directly over the issuer: only requests that would be issued consume quota.
        .layer(RateLimitLayer::new(config.limits()?, store))
        .service(IssuerService::new(issuer));
    Ok(BoxCloneSyncService::new(stack))
}

/// The moderation stack: the same policy engine and limits as the token stack, over `moderator` and the
/// ban store.
pub fn moderation<M: Moderator>(
    config: &Config,
    policy: &Arc<PolicyEngine>,
    store: Store,
    bans: ModerationStores,
    moderator: M,
) -> Result<ModerationStack, ConfigError> {
    let stack = ServiceBuilder::new()
        // Policy first, for the same reasons as for tokens: the production policy gives these actions to
        // moderators (and VerifyChatToken to chat servers) only.
        .layer(PolicyLayer::new(policy.clone(), config.policy.shadow))
        // The configured limits count moderation calls in budgets of their own (see `Limited::scope`).
        .layer(RateLimitLayer::new(config.limits()?, store))
        .service(ModerationService::new(moderator, bans));
    Ok(BoxCloneSyncService::new(stack))
}

/// Loads the configured policies and keeps them current: reloaded when a file changes and on SIGHUP.
fn load_policy(config: &Config) -> Result<Arc<PolicyEngine>, ConfigError> {
    let source = config.policy.source();
    let engine =
        Arc::new(
            PolicyEngine::load(source.clone()).map_err(|e| ConfigError::Invalid {
                setting: "policy.files".into(),
                reason: e.to_string(),
            })?,
        );
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
                    match engine.reload() {
                        Ok(()) => tracing::info!(?trigger, "policies reloaded"),
                        Err(e) => tracing::error!(
                            ?trigger,
                            refused_reloads = engine.refused_reloads(),
                            "policy reload refused, the previous policies stay in force: {e}"
                        ),
                    }
                    ControlFlow::Continue(())
                },
            );
        }
    }
    Ok(engine)
}
