//! [`EndUser`]: the person behind a request, as their own identity token proves them.
//!
//! Why such a token is refused is [`EndUserRejection`](super::EndUserRejection), beside the other
//! errors.
//!
//! An internal service may forward its end user's identity token (an OpenID Connect ID token, or any JWT
//! from a configured issuer) with a token request. When the token verifies, the request is bound to the
//! user it names: the request's `user_id` must be that user's ([`TokenRequest::bind`]), and policy sees the
//! issuer, the subject and the claims it is configured to see.
//!
//! The subject and claim values are personal data: `Debug` shows the issuer and claim names only.
//!
//! [`TokenRequest::bind`]: super::TokenRequest::bind

use std::fmt;

use super::user::UserId;

/// Most claims a deployment can expose to policy (`end_user.claims`).
pub const MAX_POLICY_CLAIMS: usize = 16;
/// Most values one exposed claim may hold; a token with more is refused, not cut (a policy deciding on
/// group membership must see every group).
pub const MAX_CLAIM_VALUES: usize = 64;
/// Longest value of an exposed claim, in bytes.
pub const MAX_CLAIM_VALUE_BYTES: usize = 128;
/// The claims policies see when the configuration names none.
pub const DEFAULT_POLICY_CLAIMS: [&str; 1] = ["groups"];

/// An end user proven by a verified identity token.
#[derive(Clone, PartialEq, Eq)]
pub struct EndUser {
    /// The token's issuer (`iss`), as configured: not personal, named in audit events and metrics.
    pub issuer: String,
    /// The token's subject (`sub`). Personal: never logged.
    pub subject: String,
    /// The user id the token maps to (its configured claim, through the configured template): the only
    /// `user_id` a request bound to this user may name.
    pub user_id: UserId,
    /// The claims policies may read (`end_user.claims`), each as a set of strings; claims the token does
    /// not carry are absent. Values are personal: never logged.
    pub claims: Vec<(String, Vec<String>)>,
    /// Token attributes taken from claims (`attributes` of the issuer), set on the token over what the
    /// caller sent for the same keys.
    pub attributes: Vec<(String, String)>,
}

impl fmt::Debug for EndUser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EndUser")
            .field("issuer", &self.issuer)
            .field("user_id", &self.user_id)
            .field(
                "claims",
                &self.claims.iter().map(|(name, _)| name).collect::<Vec<_>>(),
            )
            .field(
                "attributes",
                &self
                    .attributes
                    .iter()
                    .map(|(key, _)| key)
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_shows_the_issuer_and_names_never_values() {
        let user = EndUser {
            issuer: "https://id.example.com".into(),
            subject: "secret-subject".into(),
            user_id: UserId::parse("oidc|secret-subject".into()).unwrap(),
            claims: vec![("groups".into(), vec!["secret-group".into()])],
            attributes: vec![("displayName".into(), "Secret Name".into())],
        };
        let shown = format!("{user:?}");
        assert!(shown.contains("https://id.example.com"), "{shown}");
        assert!(
            shown.contains("groups") && shown.contains("displayName"),
            "{shown}"
        );
        assert!(
            !shown.contains("secret") && !shown.contains("Secret"),
            "{shown}"
        );
    }
}
