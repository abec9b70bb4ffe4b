//! The one place the domain stack is composed: the tower services between the gRPC handler and the
//! issuer, and the choice of issuer from configuration.

use tower::{ServiceBuilder, util::BoxCloneSyncService};

use crate::config::{Config, ConfigError, IssuerKind, KeySource};
use crate::error::Error;
use crate::issuer::{IssuedToken, Issuer, IssuerService, local::LocalIssuer};
use crate::ratelimit::{MemoryStore, RateLimitLayer};
use crate::request::TokenRequest;

/// The domain stack as the handler sees it: a validated request in, a token or a domain error out.
pub type TokenStack = BoxCloneSyncService<TokenRequest, IssuedToken, Error>;

/// Builds the stack `config` describes.
pub fn from_config(config: &Config) -> Result<TokenStack, ConfigError> {
    match config.issuer {
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
            compose(config, LocalIssuer::new(keys, settings.token_ttl))
        }
    }
}

/// Wraps `issuer` in the domain layers `config` describes. Any [`Issuer`] fits, which is how tests and
/// embedders plug in their own.
///
/// Each call makes its own limiter store: call it once per process, so every connection shares one budget.
pub fn compose<I: Issuer>(config: &Config, issuer: I) -> Result<TokenStack, ConfigError> {
    let rate_limits = RateLimitLayer::new(
        config.limits()?,
        MemoryStore::new(config.limiter.max_tracked_keys()?),
    );
    let stack = ServiceBuilder::new()
        // Directly over the issuer, so only requests that would be issued consume quota; policy goes above
        // it, so callers policy denies consume none.
        .layer(rate_limits)
        .service(IssuerService::new(issuer));
    Ok(BoxCloneSyncService::new(stack))
}
