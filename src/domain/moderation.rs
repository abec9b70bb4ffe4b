//! Moderation's vocabulary: the validated form of every moderation call, bans and their pages, and why a
//! token is refused.
//!
//! IVS Chat's own guidance is to implement bans by disconnecting the user *and* no longer creating tokens
//! for them; a [`ModerationRequest`] carries either half, or a lookup.

use std::{
    fmt,
    time::{Duration, SystemTime},
};

use super::action::Action;
use super::caller::Caller;
use super::error::TokenRejection;
use super::room::RoomArn;
use super::token::{TokenClaims, UserId};

/// Shortest reason IVS Chat's DisconnectUser accepts, in characters; bans use the same bounds.
pub const MIN_REASON_CHARS: usize = 1;
/// Longest reason IVS Chat's DisconnectUser accepts, in characters; bans use the same bounds.
pub const MAX_REASON_CHARS: usize = 256;
/// Shortest ban: one second (bans are kept with millisecond precision, given in whole seconds).
pub const MIN_BAN: Duration = Duration::from_secs(1);
/// ListBans page size when the request names none.
pub const DEFAULT_PAGE_SIZE: usize = 50;
/// Largest ListBans page.
pub const MAX_PAGE_SIZE: usize = 1000;
/// Why VerifyChatToken is refused with the ivs issuer.
pub const VERIFY_NEEDS_LOCAL_ISSUER: &str =
    "VerifyChatToken verifies tokens of the local issuer; Amazon IVS Chat verifies its own tokens";
/// Longest token VerifyChatToken reads, in bytes: a token with the largest attributes is under 3 KiB.
pub const MAX_TOKEN_BYTES: usize = 8192;

/// A moderation call that passed validation, from an identified caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModerationRequest {
    /// The internal service asking (a moderation tool, a chat server).
    pub caller: Caller,
    /// The room the action is about.
    pub room: RoomArn,
    /// What to do.
    pub action: ModerationAction,
}

/// What a moderation call asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModerationAction {
    /// Close the user's connections (IVS) or revoke their tokens issued so far (local).
    Disconnect {
        /// Who.
        user_id: UserId,
        /// Why, passed on to IVS Chat.
        reason: Reason,
    },
    /// Disconnect, and refuse the user's tokens until `duration` has passed (or until unbanned).
    Ban {
        /// Who.
        user_id: UserId,
        /// How long; `None` until unbanned.
        duration: Option<Duration>,
        /// Why, for moderators.
        reason: Reason,
    },
    /// Lift a ban.
    Unban {
        /// Who.
        user_id: UserId,
    },
    /// One page of the room's bans.
    ListBans {
        /// Most bans to return, 1 to [`MAX_PAGE_SIZE`].
        page_size: usize,
        /// Where the previous page ended.
        after: Option<PageToken>,
    },
    /// Check a local token. The room is the one the token names, known once it is opened (by the front
    /// door), or [`RoomArn::UNOPENED_TOKEN`] when it does not open: policy decides first whether the
    /// caller may verify tokens of that room, so a caller it denies learns nothing about the token.
    Verify {
        /// The token's authentic claims, whatever their times (validity, bans, revocation and single use
        /// are checked innermost, after policy and rate limits); or why it did not open.
        opened: Result<Box<TokenClaims>, TokenRejection>,
    },
}

impl ModerationAction {
    /// The operation: the Cedar action and the audit / metric name of the call.
    pub fn action(&self) -> Action {
        match self {
            ModerationAction::Disconnect { .. } => Action::DisconnectUser,
            ModerationAction::Ban { .. } => Action::BanUser,
            ModerationAction::Unban { .. } => Action::UnbanUser,
            ModerationAction::ListBans { .. } => Action::ListBans,
            ModerationAction::Verify { .. } => Action::VerifyChatToken,
        }
    }

    /// The user the action is about, if it is about one.
    pub fn user_id(&self) -> Option<&UserId> {
        match self {
            ModerationAction::Disconnect { user_id, .. }
            | ModerationAction::Ban { user_id, .. }
            | ModerationAction::Unban { user_id } => Some(user_id),
            ModerationAction::Verify { opened } => {
                opened.as_ref().ok().map(|claims| &claims.user_id)
            }
            ModerationAction::ListBans { .. } => None,
        }
    }
}

/// Why a user is disconnected or banned: 1 to 256 characters, as IVS Chat's DisconnectUser requires.
/// Moderators' words, possibly naming the user: never logged, never shown to the banned user.
#[derive(Clone, PartialEq, Eq)]
pub struct Reason(String);

impl Reason {
    /// Counts characters, not bytes.
    pub fn parse(reason: String) -> Result<Self, String> {
        let chars = reason.chars().count();
        if (MIN_REASON_CHARS..=MAX_REASON_CHARS).contains(&chars) {
            Ok(Reason(reason))
        } else {
            Err(format!(
                "must be {MIN_REASON_CHARS} to {MAX_REASON_CHARS} characters, got {chars}"
            ))
        }
    }

    /// The text. Do not log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Reason(<{} chars>)", self.0.chars().count())
    }
}

/// Where a ListBans page ended: the store's order key of the last ban listed (a digest, not a user id).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageToken(String);

impl PageToken {
    /// Accepts what [`PageToken::as_str`] produced: 32 lowercase hex digits.
    pub fn parse(token: &str) -> Result<Self, String> {
        if token.len() == 32
            && token
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            Ok(PageToken(token.to_owned()))
        } else {
            Err("is not a page token this service returned".into())
        }
    }

    /// A token from a store's order key.
    pub(crate) fn from_key(key: String) -> Self {
        PageToken(key)
    }

    /// The token as sent to callers.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A ban in force.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ban {
    /// The room the user is banned from.
    pub room: RoomArn,
    /// The banned user.
    pub user_id: UserId,
    /// Who banned them.
    pub banned_by: Caller,
    /// When, to the millisecond.
    pub created_at: SystemTime,
    /// When it ends, to the millisecond; `None`: when unbanned.
    pub expires_at: Option<SystemTime>,
    /// Why.
    pub reason: Reason,
}

impl Ban {
    /// Whether the ban is still in force at `now`.
    pub fn in_force(&self, now: SystemTime) -> bool {
        self.expires_at.is_none_or(|end| now < end)
    }
}

/// What a moderation call did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModerationOutcome {
    /// The user was disconnected.
    Disconnected,
    /// The ban now in force.
    Banned(Ban),
    /// Whether there was a ban to lift.
    Unbanned {
        /// `false`: there was no ban in force.
        was_banned: bool,
    },
    /// One page of bans.
    Bans(BanPage),
    /// The token is good; what it grants.
    Verified(Box<TokenClaims>),
}

/// One page of a room's bans, in the order of their users' digests: stable across pages and replicas.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BanPage {
    /// The bans in force.
    pub bans: Vec<Ban>,
    /// Where the next page starts; `None` on the last page.
    pub next: Option<PageToken>,
}

/// `at` truncated to whole milliseconds: what every store keeps, so a ban reads back exactly as made.
pub fn whole_millis(at: SystemTime) -> SystemTime {
    let since_epoch = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    SystemTime::UNIX_EPOCH + Duration::from_millis(since_epoch.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ban(expires_at: Option<SystemTime>) -> Ban {
        Ban {
            room: RoomArn::parse("arn:aws:ivschat:us-west-2:123456789012:room/r").unwrap(),
            user_id: UserId::parse("u".into()).unwrap(),
            banned_by: Caller::new("moderator"),
            created_at: SystemTime::UNIX_EPOCH,
            expires_at,
            reason: Reason::parse("r".into()).unwrap(),
        }
    }

    #[test]
    fn a_ban_is_in_force_until_its_end_that_instant_excluded() {
        let end = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let ban = ban(Some(end));
        assert!(ban.in_force(end - Duration::from_secs(3600)));
        assert!(ban.in_force(end - Duration::from_nanos(1)));
        assert!(!ban.in_force(end));
        assert!(!ban.in_force(end + Duration::from_nanos(1)));
    }

    #[test]
    fn a_ban_without_an_end_is_in_force_until_lifted() {
        let ban = ban(None);
        assert!(ban.in_force(SystemTime::UNIX_EPOCH));
        assert!(ban.in_force(SystemTime::UNIX_EPOCH + Duration::from_secs(u32::MAX.into())));
    }
}
