//! The composition root: the only place a [`Config`] becomes running parts. It builds the state backend,
//! the policy engine, the local issuer's keys, the IVS issuer, the identity resolver, the TLS settings and
//! the file watchers that keep them current, composes the stacks ([`crate::stack`]) and the front doors,
//! and hands the result to [`crate::server::run`].
//!
//! The binary builds through [`build`], and so does every test, so tests exercise the binary's start-up.
//! `--check-config` ([`check`]) loads the same files with the same functions, without serving, watching or
//! connecting anywhere.

mod check;

use std::{num::NonZeroUsize, ops::ControlFlow, path::PathBuf, sync::Arc, time::Duration};

use tokio::sync::watch;

pub use check::check;

use crate::config::{
    Config, HttpApiConfig, IdentityConfig, IssuerKind, LocalIssuerConfig, MessagingConfig,
    PolicyConfig, ReflectionConfig, TransportConfig,
};
use crate::domain::{
    DELETE_MESSAGE_QUOTA_LIMIT_NAME, DISCONNECT_QUOTA_LIMIT_NAME, IVS_QUOTA_LIMIT_NAME, Limit,
    LimitKey, Rate, SEND_EVENT_QUOTA_LIMIT_NAME, ServedRooms,
};
use crate::door::{Door, MessagingDoor, ModerationDoor};
use crate::identity::{
    Resolver,
    end_user::{self, VerifierError},
    sigv4::{CredentialsError, Verifier},
};
use crate::issuer::{
    Issuer, Messenger, Moderator,
    ivs::{CallBounds, IvsIssuer, Routes},
    local::{KeyError, KeySource, LiveKeys, LocalIssuer, LocalModerator},
    webhook::{SecretError, SigningSecret, Webhook, WebhookError},
};
use crate::pem::PemError;
use crate::policy::{PolicyEngine, PolicyError, PolicySource};
use crate::reload::{self, Reload, Trigger};
use crate::stack::{
    self, MessagingStack, MessagingUpstream, ModerationStack, Parts, TokenStack, Upstream,
};
use crate::store::{Backend, LimiterStore, ModerationStore, Stores};
use crate::transport::tls::{Tls, TlsError};

/// Everything the server serves, built from a configuration.
pub struct App {
    /// CreateChatToken, for the gRPC service and the IVS HTTP API alike.
    pub door: Door,
    /// ModerationService (and the HTTP API's DisconnectUser); `None` around an embedder's own issuer.
    pub moderation: Option<ModerationDoor>,
    /// MessagingService (and the HTTP API's SendEvent and DeleteMessage); `None` around an embedder's own
    /// issuer.
    pub messaging: Option<MessagingDoor>,
    /// What the token service's health follows, if anything: Redis' reachability in fail_closed mode.
    pub readiness: Option<watch::Receiver<bool>>,
    /// TLS termination, its files watched; `None`: plaintext.
    pub tls: Option<Arc<Tls>>,
    /// The state backend the stacks use (clones share its state): for observing it, e.g. Redis' outages.
    pub backend: Backend,
    /// What the server itself needs of the configuration.
    pub serving: Serving,
}

/// The settings the server applies itself: limits and timeouts of the listener, the protocols, shutdown.
#[derive(Clone, Debug)]
pub struct Serving {
    /// The issuer's name, for the start-up log.
    pub issuer: &'static str,
    /// Largest request message (`max_request_bytes`).
    pub max_request_bytes: usize,
    /// Token calls in flight at once (`max_concurrent_calls`).
    pub max_concurrent_calls: NonZeroUsize,
    /// NOT_SERVING before the listener closes (`shutdown_drain_delay`).
    pub shutdown_drain_delay: Duration,
    /// How long calls in flight may take after that (`shutdown_grace_period`).
    pub shutdown_grace_period: Duration,
    /// Per-connection limits and timeouts.
    pub transport: TransportConfig,
    /// The IVS REST-JSON API.
    pub http_api: HttpApiConfig,
    /// gRPC server reflection.
    pub reflection: ReflectionConfig,
}

impl Serving {
    fn of(config: &Config, issuer: &'static str) -> Self {
        Serving {
            issuer,
            max_request_bytes: config.max_request_bytes,
            max_concurrent_calls: config.max_concurrent_calls,
            shutdown_drain_delay: config.shutdown_drain_delay,
            shutdown_grace_period: config.shutdown_grace_period,
            transport: config.transport.clone(),
            http_api: config.http_api.clone(),
            reflection: config.reflection.clone(),
        }
    }
}

/// Why the service could not start from a valid configuration: a file it names could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The policy files or the entities file do not load (`policy.files`, `policy.entities_file`).
    #[error("configuration error: policy.files: {0}")]
    Policy(#[from] PolicyError),
    /// The local issuer's keys do not load (`local_issuer.keys_file` or `local_issuer.key`).
    #[error("configuration error: local issuer keys: {0}")]
    Keys(#[from] KeyError),
    /// The SigV4 credentials file does not load (`identity.sigv4.credentials_file`).
    #[error("configuration error: identity.sigv4.credentials_file: {0}")]
    Sigv4(#[from] CredentialsError),
    /// The end-user verifier cannot be built: a JWK set file does not load, or no HTTPS client.
    #[error("configuration error: {0}")]
    EndUser(#[from] VerifierError),
    /// The TLS files do not load.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The Redis TLS files do not load (`limiter.redis_ca_file`, `limiter.redis_client_*_file`).
    #[error(transparent)]
    RedisTls(#[from] PemError),
    /// The webhook's signing secret does not load (`messaging.signing_secret_file`).
    #[error("configuration error: messaging.signing_secret_file: {0}")]
    SigningSecret(#[from] SecretError),
    /// The webhook's HTTPS client cannot be made.
    #[error("configuration error: {0}")]
    Webhook(#[from] WebhookError),
}

/// What a test or an embedder supplies instead of what the configuration would build.
#[derive(Default)]
pub struct Overrides {
    /// The AWS settings (credentials, HTTP client) the ivs issuer builds on, instead of the environment's
    /// default chain.
    pub aws_sdk: Option<aws_config::SdkConfig>,
}

/// Builds what `config` describes and starts its file watchers and the Redis probe: call it once, inside
/// a tokio runtime.
pub async fn build(config: &Config) -> Result<App, StartError> {
    build_with(config, Overrides::default()).await
}

/// [`build`], with `overrides` in place of what the configuration would build.
pub async fn build_with(config: &Config, overrides: Overrides) -> Result<App, StartError> {
    let backend = Backend::new(&config.limiter)?;
    let policy = policy(config)?;
    let (tokens, moderation, messaging) = match backend.clone() {
        Backend::Memory(stores) => stacks(config, overrides, policy, stores).await?,
        Backend::Redis(stores) => stacks(config, overrides, policy, stores).await?,
    };
    finish(
        config,
        config.issuer.name(),
        tokens,
        moderation,
        Some(messaging),
        backend,
    )
}

/// The service around an embedder's (or a test's) own `issuer`, with everything else as `config`
/// describes. Such an issuer is not a moderator or a messenger: ModerationService and MessagingService are
/// not served.
pub async fn build_around<I: Issuer>(config: &Config, issuer: I) -> Result<App, StartError> {
    let backend = Backend::new(&config.limiter)?;
    let policy = policy(config)?;
    let tokens = match backend.clone() {
        Backend::Memory(stores) => {
            stack::tokens(&parts(config, policy, stores), Upstream::default(), issuer)
        }
        Backend::Redis(stores) => {
            stack::tokens(&parts(config, policy, stores), Upstream::default(), issuer)
        }
    };
    finish(config, I::NAME, tokens, None, None, backend)
}

/// The moderation stack and what its door needs besides.
struct Moderation {
    stack: ModerationStack,
    /// The local issuer's keys, which open tokens for VerifyChatToken; `None` with the ivs issuer.
    verifier: Option<LiveKeys>,
}

/// The stacks over `stores`, around the issuer `config` chooses: tokens, moderation, and messaging when
/// something can deliver it (IVS Chat, or the local issuer's webhook).
async fn stacks<L, M>(
    config: &Config,
    overrides: Overrides,
    policy: Arc<PolicyEngine>,
    stores: Stores<L, M>,
) -> Result<(TokenStack, Option<Moderation>, Option<MessagingStack>), StartError>
where
    L: LimiterStore + Clone,
    M: ModerationStore + Clone,
{
    let parts = parts(config, policy, stores);
    match config.issuer {
        IssuerKind::Ivs => {
            let issuer = Arc::new(ivs_issuer(config, overrides, parts.stores.limits.clone()).await);
            let messaging =
                stack::messaging(&parts, ivs_messaging_upstream(config), issuer.clone());
            let (tokens, moderation) = moderated(&parts, ivs_upstream(config), issuer);
            Ok((tokens, moderation, Some(messaging)))
        }
        IssuerKind::Local => {
            let keys = local_keys(&config.local_issuer, config.reload_interval)?;
            let settings = &config.local_issuer;
            let moderator = LocalModerator::new(
                parts.stores.moderation.clone(),
                settings.token_ttl,
                config.moderation.single_use_tokens,
            );
            let tokens = stack::tokens(
                &parts,
                Upstream::default(),
                LocalIssuer::new(keys.clone(), settings.token_ttl).with_chat_endpoint(
                    settings
                        .chat_endpoint
                        .as_ref()
                        .map(|endpoint| endpoint.as_str().to_owned()),
                ),
            );
            let moderation = Moderation {
                stack: stack::moderation(&parts, None, moderator),
                verifier: Some(keys),
            };
            let messaging = webhook(&config.messaging, config.reload_interval)?
                .map(|webhook| stack::messaging(&parts, MessagingUpstream::default(), webhook));
            Ok((tokens, Some(moderation), messaging))
        }
    }
}

/// Both stacks around an issuer that is its own moderator (the ivs issuer). VerifyChatToken is not
/// served: only the local issuer's tokens can be verified here.
fn moderated<L, M, I>(
    parts: &Parts<L, M>,
    upstream: Upstream,
    issuer: Arc<I>,
) -> (TokenStack, Option<Moderation>)
where
    L: LimiterStore + Clone,
    M: ModerationStore + Clone,
    I: Issuer + Moderator,
{
    let served = upstream.served.clone();
    let tokens = stack::tokens(parts, upstream, issuer.clone());
    let moderation = Moderation {
        stack: stack::moderation(parts, served, issuer),
        verifier: None,
    };
    (tokens, Some(moderation))
}

fn parts<L, M>(config: &Config, policy: Arc<PolicyEngine>, stores: Stores<L, M>) -> Parts<L, M> {
    Parts {
        policy,
        policy_shadow: config.policy.shadow,
        limits: config.rate_limits.clone(),
        stores,
    }
}

/// The doors around the stacks, the identity resolver and TLS: the rest of what `config` describes.
/// `messaging`: `None` when MessagingService is not served, `Some(None)` when it is served but nothing can
/// deliver its calls.
fn finish(
    config: &Config,
    issuer: &'static str,
    tokens: TokenStack,
    moderation: Option<Moderation>,
    messaging: Option<Option<MessagingStack>>,
    backend: Backend,
) -> Result<App, StartError> {
    let identity = identity(&config.identity, config.reload_interval)?;
    let end_user = end_user_verifier(config)?;
    let moderation = moderation.map(|moderation| {
        ModerationDoor::new(
            identity.clone(),
            issuer,
            moderation.stack,
            moderation.verifier,
            config.moderation.max_ban_duration,
        )
    });
    let messaging = messaging.map(|stack| MessagingDoor::new(identity.clone(), issuer, stack));
    Ok(App {
        door: Door::new(identity, end_user, issuer, tokens),
        moderation,
        messaging,
        readiness: backend.readiness(),
        tls: tls(config)?,
        backend,
        serving: Serving::of(config, issuer),
    })
}

/// Reloads what `upgrade` hands back with `reload` whenever one of `paths` changes (checked every
/// `interval`) and on SIGHUP, for as long as anything else holds it.
fn watch<T>(
    paths: Vec<PathBuf>,
    interval: Duration,
    upgrade: impl Fn() -> Option<T> + Send + 'static,
    reload: impl Fn(&T, Trigger) -> Reload + Send + 'static,
) {
    reload::spawn(paths, interval, true, move |trigger| match upgrade() {
        Some(target) => ControlFlow::Continue(reload(&target, trigger)),
        None => ControlFlow::Break(()),
    });
}

/// What SIGHUP reloads in `config`, as the start-up log names it: every file [`build`] watches.
pub fn reloaded_on_hangup(config: &Config) -> Vec<&'static str> {
    [
        (!config.policy.files.is_empty(), "policies"),
        (config.tls.is_some(), "TLS certificates"),
        (
            config.issuer == IssuerKind::Local && config.local_issuer.keys_file.is_some(),
            "local issuer keys",
        ),
        (
            config.identity.sigv4_credentials().is_some(),
            "SigV4 credentials",
        ),
        (
            config.issuer == IssuerKind::Local && config.messaging.signing_secret_file.is_some(),
            "the webhook's signing secret",
        ),
        (
            config
                .end_user
                .issuers
                .iter()
                .any(|issuer| issuer.jwks_file.is_some()),
            "end-user JWK sets",
        ),
    ]
    .into_iter()
    .filter_map(|(watched, what)| watched.then_some(what))
    .collect()
}

/// Where the policies `settings` name come from.
pub fn policy_source(settings: &PolicyConfig) -> PolicySource {
    if settings.files.is_empty() {
        PolicySource::Development
    } else {
        PolicySource::Files {
            policies: settings.files.clone(),
            entities: settings.entities_file.clone(),
        }
    }
}

/// Loads the configured policies and keeps them current: reloaded when a file changes and on SIGHUP.
fn policy(config: &Config) -> Result<Arc<PolicyEngine>, PolicyError> {
    let source = policy_source(&config.policy);
    let engine = Arc::new(PolicyEngine::load_with_claims(
        source.clone(),
        &config.end_user.claims,
        (&config.policy).into(),
    )?);
    match source {
        // Off loopback only in development mode: the configuration's load refuses it otherwise.
        PolicySource::Development if config.listen_addr.ip().is_loopback() => tracing::warn!(
            "no policy files configured (policy.files): the embedded development policy permits every \
             valid request from any caller; serving on loopback only"
        ),
        PolicySource::Development => tracing::warn!(
            "no policy files configured (policy.files): the embedded development policy permits every \
             valid request from any caller, on {} (development mode)",
            config.listen_addr
        ),
        PolicySource::Files { policies, entities } => {
            tracing::info!(files = ?policies, entities = ?entities, shadow = config.policy.shadow, "policies loaded");
            let weak = Arc::downgrade(&engine);
            watch(
                policies.into_iter().chain(entities).collect(),
                config.reload_interval,
                move || weak.upgrade(),
                |engine: &Arc<PolicyEngine>, trigger| match engine.reload() {
                    Ok(()) => {
                        tracing::info!(?trigger, "policies reloaded");
                        Reload::Applied
                    }
                    Err(e) => Reload::Refused(format!(
                        "policy reload refused ({} so far), the previous policies stay in force: {e}",
                        engine.refused_reloads()
                    )),
                },
            );
        }
    }
    Ok(engine)
}

/// Where the local issuer's keys come from, as `settings` say.
pub fn key_source(settings: &LocalIssuerConfig) -> KeySource<'_> {
    match (&settings.keys_file, &settings.key) {
        (Some(path), _) => KeySource::File(path),
        (None, Some(key)) => KeySource::Single(key.expose()),
        (None, None) => KeySource::Ephemeral,
    }
}

/// Loads the local issuer's keys and, from a key set file, keeps them current: reloaded when the file
/// changes and on SIGHUP.
fn local_keys(settings: &LocalIssuerConfig, interval: Duration) -> Result<LiveKeys, KeyError> {
    let source = key_source(settings);
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
            let weak = keys.downgrade();
            let file = path.to_owned();
            watch(
                vec![file.clone()],
                interval,
                move || weak.upgrade(),
                move |keys: &LiveKeys, trigger| match keys.reload(&file) {
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
                },
            );
        }
    }
    Ok(keys)
}

/// The resolver `settings` describe. With the `sigv4` source it loads the credentials file and keeps it
/// current.
fn identity(settings: &IdentityConfig, interval: Duration) -> Result<Resolver, CredentialsError> {
    let resolver = Resolver::new(
        settings.sources.clone(),
        settings.header.clone(),
        settings.certificate_names.clone(),
        settings
            .allow_anonymous
            .then(|| settings.anonymous_principal.clone()),
    );
    let Some(file) = settings.sigv4_credentials() else {
        return Ok(resolver);
    };
    let verifier = Arc::new(Verifier::load(file, &settings.sigv4)?);
    let weak = Arc::downgrade(&verifier);
    watch(
        vec![file.to_owned()],
        interval,
        move || weak.upgrade(),
        |verifier: &Arc<Verifier>, trigger| match verifier.reload() {
            Ok(keys) => {
                tracing::info!(?trigger, keys, "SigV4 credentials reloaded");
                Reload::Applied
            }
            Err(e) => Reload::Refused(format!(
                "SigV4 credentials reload refused, the previous keys stay in force: {e}"
            )),
        },
    );
    Ok(resolver.with_sigv4(verifier))
}

/// The end-user token verifier `config.end_user` describes: its JWK set files re-read when they change
/// and on SIGHUP, its fetched keys fetched now in the background (an identity provider that is down must
/// not stop the service from starting).
fn end_user_verifier(config: &Config) -> Result<Arc<end_user::Verifier>, VerifierError> {
    let verifier = Arc::new(end_user::Verifier::new(&config.end_user)?);
    for (path, keys) in verifier.files() {
        let file = path.clone();
        watch(
            vec![path],
            config.reload_interval,
            move || keys.upgrade(),
            move |keys: &Arc<end_user::jwks::IssuerKeys>, trigger| match keys.reload() {
                Ok(count) => {
                    tracing::info!(?trigger, file = %file.display(), keys = count, "end-user JWK set reloaded");
                    Reload::Applied
                }
                Err(e) => Reload::Refused(format!(
                    "end-user JWK set reload refused, the previous keys stay in force: {e}"
                )),
            },
        );
    }
    verifier.prefetch();
    Ok(verifier)
}

/// TLS as `config.tls` describes it, its files re-read when they change and on SIGHUP.
fn tls(config: &Config) -> Result<Option<Arc<Tls>>, TlsError> {
    let Some(settings) = &config.tls else {
        return Ok(None);
    };
    let tls = Tls::load(settings)?;
    let weak = Arc::downgrade(&tls);
    watch(
        tls.files(),
        config.reload_interval,
        move || weak.upgrade(),
        |tls: &Arc<Tls>, trigger| match tls.reload() {
            Ok(()) => {
                tracing::info!(?trigger, "TLS certificates reloaded");
                Reload::Applied
            }
            Err(e) => Reload::Refused(format!(
                "TLS reload refused, keeping the current certificates: {e}"
            )),
        },
    );
    Ok(Some(tls))
}

/// The IVS issuer `config.ivs` describes, on `overrides.aws_sdk` or the environment's AWS settings; its
/// DisconnectUser quota guard keeps its state in `limits`, so a shared store shares the IVS budget.
pub async fn ivs_issuer<L: LimiterStore>(
    config: &Config,
    overrides: Overrides,
    limits: L,
) -> IvsIssuer<L> {
    let settings = &config.ivs;
    let bounds = CallBounds {
        connect_timeout: settings.connect_timeout,
        read_timeout: settings.read_timeout,
        attempt_timeout: settings.attempt_timeout,
        operation_timeout: settings.operation_timeout,
        max_attempts: settings.max_attempts,
        initial_backoff: settings.initial_backoff,
    };
    let routes = Routes {
        served: served_rooms(config),
        assume_roles: settings.assume_roles.clone(),
        endpoint_url: settings.endpoint_url.clone(),
    };
    let disconnect_quota = ivs_quota(
        DISCONNECT_QUOTA_LIMIT_NAME,
        settings.disconnect_quota,
        settings.disconnect_quota_burst,
    );
    let issuer = match overrides.aws_sdk {
        Some(base) => IvsIssuer::new(base, bounds, routes, limits, disconnect_quota),
        None => IvsIssuer::from_environment(bounds, routes, limits, disconnect_quota).await,
    };
    tracing::info!(
        endpoint = ?settings.endpoint_url,
        regions = ?settings.allowed_regions,
        "IVS Chat issuer ready"
    );
    issuer
}

fn served_rooms(config: &Config) -> ServedRooms {
    ServedRooms::new(
        config.ivs.allowed_regions.clone(),
        config.ivs.allowed_accounts.clone(),
    )
}

/// What the ivs issuer asks of the token stack: its served rooms, and IVS's CreateChatToken quota.
fn ivs_upstream(config: &Config) -> Upstream {
    Upstream {
        served: Some(served_rooms(config)),
        quota: Some(ivs_quota(
            IVS_QUOTA_LIMIT_NAME,
            config.ivs.quota,
            config.ivs.quota_burst,
        )),
    }
}

/// What the ivs issuer asks of the messaging stack: its served rooms, and IVS's SendEvent and
/// DeleteMessage quotas.
fn ivs_messaging_upstream(config: &Config) -> MessagingUpstream {
    let ivs = &config.ivs;
    MessagingUpstream {
        served: Some(served_rooms(config)),
        send_event_quota: Some(ivs_quota(
            SEND_EVENT_QUOTA_LIMIT_NAME,
            ivs.send_event_quota,
            ivs.send_event_quota_burst,
        )),
        delete_message_quota: Some(ivs_quota(
            DELETE_MESSAGE_QUOTA_LIMIT_NAME,
            ivs.delete_message_quota,
            ivs.delete_message_quota_burst,
        )),
    }
}

/// A built-in guard of one of IVS's quotas, per account and region.
fn ivs_quota(name: &str, rate: Rate, burst: std::num::NonZeroU32) -> Limit {
    Limit {
        name: name.into(),
        key: LimitKey::AccountRegion,
        rate,
        burst,
        shadow: false,
    }
}

/// The local issuer's chat backend, when `settings` name one: the webhook, its signing secret loaded and
/// re-read when its file changes and on SIGHUP.
fn webhook(
    settings: &MessagingConfig,
    interval: Duration,
) -> Result<Option<impl Messenger>, StartError> {
    let (Some(url), Some(file)) = (&settings.webhook_url, &settings.signing_secret_file) else {
        tracing::info!(
            "no chat backend (messaging.webhook_url): SendEvent and DeleteMessage answer \
             FAILED_PRECONDITION"
        );
        return Ok(None);
    };
    let secret = Arc::new(SigningSecret::load(file)?);
    let weak = Arc::downgrade(&secret);
    watch(
        vec![file.clone()],
        interval,
        move || weak.upgrade(),
        |secret: &Arc<SigningSecret>, trigger| match secret.reload() {
            Ok(()) => {
                tracing::info!(?trigger, "webhook signing secret reloaded");
                Reload::Applied
            }
            Err(e) => Reload::Refused(format!(
                "webhook signing secret reload refused, the previous secret stays in force: {e}"
            )),
        },
    );
    let webhook = Webhook::new(url, secret, settings.timeout)?;
    tracing::info!(url = url.as_str(), timeout = ?settings.timeout, "chat backend webhook ready");
    Ok(Some(webhook))
}
