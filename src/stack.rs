//! The one place the domain stack is composed: the tower services between the gRPC handler and the
//! issuer, and the choice of issuer from configuration.

use tower::util::BoxCloneSyncService;

use crate::config::{Config, ConfigError, IssuerKind, KeySource};
use crate::error::Error;
use crate::issuer::{IssuedToken, Issuer, IssuerService, local::LocalIssuer};
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
            Ok(with_issuer(LocalIssuer::new(keys, settings.token_ttl)))
        }
    }
}

/// Wraps `issuer` in the domain layers. Any [`Issuer`] fits, which is how tests and embedders plug in
/// their own.
pub fn with_issuer<I: Issuer>(issuer: I) -> TokenStack {
    BoxCloneSyncService::new(IssuerService::new(issuer))
}
