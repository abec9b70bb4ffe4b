//! The one place the domain stacks are composed: the tower services between the front doors and the
//! issuer (CreateChatToken), the moderator (ModerationService) or the messenger (MessagingService), one
//! comment per layer on why it sits where it does.
//!
//! Both stacks share one policy engine and one backend's stores, so a ban made through the moderation
//! stack is what the token stack's ban check reads, and every limit spends one budget. Everything here is
//! already built ([`crate::app`] builds it from the configuration); composing cannot fail.

use std::{
    sync::Arc,
    task::{Context, Poll},
};

use tower::{
    Layer, Service, ServiceBuilder, ServiceExt,
    util::{BoxCloneSyncService, Oneshot},
};

use crate::ban_check::BanCheckLayer;
use crate::domain::{
    Error, IssuedToken, Limit, MessagingAction, MessagingOutcome, MessagingRequest,
    ModerationOutcome, ModerationRequest, ServedRooms, TokenRequest,
};
use crate::issuer::{Issuer, IssuerService, Messenger, MessengerService, Moderator};
use crate::moderation::ModerationService;
use crate::policy::{PolicyEngine, PolicyLayer};
use crate::ratelimit::RateLimitLayer;
use crate::scope::ScopeLayer;
use crate::store::{LimiterStore, ModerationStore, Stores};

/// The token stack as a front door sees it: a validated request in, a token or a domain error out.
pub type TokenStack = BoxCloneSyncService<TokenRequest, IssuedToken, Error>;

/// The moderation stack as a front door sees it.
pub type ModerationStack = BoxCloneSyncService<ModerationRequest, ModerationOutcome, Error>;

/// The messaging stack (SendEvent, DeleteMessage) as a front door sees it.
pub type MessagingStack = BoxCloneSyncService<MessagingRequest, MessagingOutcome, Error>;

/// What the stacks are made of, besides their innermost service.
pub struct Parts<L, M> {
    /// Decides who may do what; shared, so a reload applies to both stacks.
    pub policy: Arc<PolicyEngine>,
    /// Evaluate policies and log denials, but deny nothing (`policy.shadow`).
    pub policy_shadow: bool,
    /// The configured rate limits (`rate_limits`).
    pub limits: Vec<Limit>,
    /// Where limits, bans, revocations and used token ids live.
    pub stores: Stores<L, M>,
}

/// What an upstream issuer asks of the token stack in front of it.
#[derive(Clone, Debug, Default)]
pub struct Upstream {
    /// The rooms it serves: others are refused before any budget is spent.
    pub served: Option<ServedRooms>,
    /// Its own quota (IVS's per account and region), checked with the other limits in one store call.
    pub quota: Option<Limit>,
}

/// The CreateChatToken stack around `issuer`.
pub fn tokens<L, M, I>(parts: &Parts<L, M>, upstream: Upstream, issuer: I) -> TokenStack
where
    L: LimiterStore + Clone,
    M: ModerationStore + Clone,
    I: Issuer,
{
    let limits = parts.limits.iter().cloned().chain(upstream.quota).collect();
    let mut rate_limits = RateLimitLayer::new(limits, parts.stores.limits.clone());
    // With a single Redis node the ban lookup rides in the rate-limit script call: one round trip per
    // request. Otherwise (in process, or a cluster, where the ban record and the limits live in different
    // slots) the ban check is a layer of its own.
    let ban_check = match &parts.stores.ban_gate {
        Some(gate) => {
            rate_limits = rate_limits.with_ban_gate(gate.clone());
            None
        }
        None => Some(BanCheckLayer::new(parts.stores.moderation.clone())),
    };
    let stack = ServiceBuilder::new()
        // Policy first: Cedar answers in microseconds, and a caller it denies must consume no rate-limit
        // budget or upstream quota, nor learn whether a user is banned.
        .layer(PolicyLayer::new(parts.policy.clone(), parts.policy_shadow))
        // Then the rooms the upstream serves (ivs): a room in a region or account not served is refused
        // before it costs a store round trip or spends any budget, and before it can make the issuer hold
        // anything for its region.
        .option_layer(upstream.served.map(ScopeLayer::new))
        // Then bans: a banned user's requests consume no budget either (here, or in the limits' call).
        .option_layer(ban_check)
        // Then every rate limit, the upstream quota included, in one store call: a request refused by any
        // of them consumes from none, and only requests about to be issued spend the upstream quota.
        .layer(rate_limits)
        .service(IssuerService::new(issuer));
    BoxCloneSyncService::new(stack)
}

/// The moderation stack: the same policy engine and limits as the token stack, over `moderator` and the
/// moderation store; rooms outside `served` (the upstream issuer's) are refused.
pub fn moderation<L, M, Mo>(
    parts: &Parts<L, M>,
    served: Option<ServedRooms>,
    moderator: Mo,
) -> ModerationStack
where
    L: LimiterStore + Clone,
    M: ModerationStore + Clone,
    Mo: Moderator,
{
    let stack = ServiceBuilder::new()
        // Policy first, for the same reasons as for tokens: the production policy gives these actions to
        // moderators (and VerifyChatToken to chat servers) only.
        .layer(PolicyLayer::new(parts.policy.clone(), parts.policy_shadow))
        // Then the rooms the upstream serves, as for tokens: a ban for a room it does not serve could never
        // be enforced, so it is refused before anything is stored or spent.
        .option_layer(served.map(ScopeLayer::new))
        // The configured limits count moderation calls in budgets of their own (see `Limited::scope`).
        .layer(RateLimitLayer::new(
            parts.limits.clone(),
            parts.stores.limits.clone(),
        ))
        .service(ModerationService::new(
            moderator,
            parts.stores.moderation.clone(),
        ));
    BoxCloneSyncService::new(stack)
}

/// What an upstream messenger (IVS Chat) asks of the messaging stack in front of it.
#[derive(Clone, Debug, Default)]
pub struct MessagingUpstream {
    /// The rooms it serves: others are refused before any budget is spent.
    pub served: Option<ServedRooms>,
    /// Its SendEvent quota (IVS's per account and region).
    pub send_event_quota: Option<Limit>,
    /// Its DeleteMessage quota (IVS's per account and region).
    pub delete_message_quota: Option<Limit>,
}

/// The SendEvent and DeleteMessage stack around `messenger`: the same policy engine, limits and stores as
/// the other stacks.
pub fn messaging<L, M, Ms>(
    parts: &Parts<L, M>,
    upstream: MessagingUpstream,
    messenger: Ms,
) -> MessagingStack
where
    L: LimiterStore + Clone,
    M: ModerationStore + Clone,
    Ms: Messenger,
{
    let messenger = MessengerService::new(messenger);
    // Each action spends its own upstream quota, so each gets a rate-limit layer of its own: the
    // configured limits (which count each action in budgets of its own, see `Limited::scope`) and its
    // quota, in one store call. A request refused by any of them consumes from none, and only requests
    // about to be sent spend the quota.
    let limited = |quota: Option<Limit>| -> MessagingStack {
        let limits = parts.limits.iter().cloned().chain(quota).collect();
        BoxCloneSyncService::new(
            RateLimitLayer::new(limits, parts.stores.limits.clone()).layer(messenger.clone()),
        )
    };
    let by_action = ByAction {
        send_event: limited(upstream.send_event_quota),
        delete_message: limited(upstream.delete_message_quota),
    };
    let stack = ServiceBuilder::new()
        // Policy first, as everywhere: a denied caller spends no budget and no quota.
        .layer(PolicyLayer::new(parts.policy.clone(), parts.policy_shadow))
        // Then the rooms the upstream serves (ivs), before any budget is spent or any client is made.
        .option_layer(upstream.served.map(ScopeLayer::new))
        .service(by_action);
    BoxCloneSyncService::new(stack)
}

/// Sends each messaging request on to the stack of its action.
#[derive(Clone)]
struct ByAction {
    send_event: MessagingStack,
    delete_message: MessagingStack,
}

impl Service<MessagingRequest> for ByAction {
    type Response = MessagingOutcome;
    type Error = Error;
    type Future = Oneshot<MessagingStack, MessagingRequest>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Error>> {
        // Which stack a request needs is known only in `call`; that one is readied there.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: MessagingRequest) -> Self::Future {
        let stack = match request.action {
            MessagingAction::SendEvent { .. } => &self.send_event,
            MessagingAction::DeleteMessage { .. } => &self.delete_message,
        };
        stack.clone().oneshot(request)
    }
}
