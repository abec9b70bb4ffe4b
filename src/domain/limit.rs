//! Rate limits as rules: what a limit counts by, how fast it refills, how large a burst it admits. The
//! arithmetic that applies them lives with the stores that keep their state.

use std::{fmt, num::NonZeroU32, time::Duration};

use serde::{Deserialize, Serialize};

/// The name of the built-in limit that keeps CreateChatToken calls under IVS Chat's own quota (per AWS
/// account and region), added when the issuer is `ivs`.
pub const IVS_QUOTA_LIMIT_NAME: &str = "ivs-quota";
/// The name of the IVS issuer's DisconnectUser quota guard (per AWS account and region).
pub const DISCONNECT_QUOTA_LIMIT_NAME: &str = "ivs-disconnect-quota";
/// The name of the IVS issuer's SendEvent quota guard (per AWS account and region).
pub const SEND_EVENT_QUOTA_LIMIT_NAME: &str = "ivs-send-event-quota";
/// The name of the IVS issuer's DeleteMessage quota guard (per AWS account and region).
pub const DELETE_MESSAGE_QUOTA_LIMIT_NAME: &str = "ivs-delete-message-quota";

/// One limit, as configured in a `[[rate_limits]]` entry.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Limit {
    /// Names the limit in errors (`google.rpc.QuotaFailure` subject `limit:NAME`) and logs, and keeps its
    /// keys apart from every other limit's. Unique among the configured limits and not empty; renaming a
    /// limit starts its budgets afresh.
    pub name: String,
    /// What the limit counts by: `"caller"` (the calling service), `"user"` (one user in one room),
    /// `"room"`, `"caller_room"` (one caller in one room), `"account_region"` (one AWS account in one
    /// region) or `"global"` (all requests together).
    pub key: LimitKey,
    /// The sustained rate: `"N/s"`, `"N/min"` or `"N/h"` (also `second`, `minute`, `hour`), `N` at least 1.
    pub rate: Rate,
    /// How many requests are admitted at once from a fully recovered state; at least 1.
    pub burst: NonZeroU32,
    /// Evaluate the limit and log and count the requests it would refuse, but refuse none: for trying a
    /// limit on real traffic before enforcing it. Default `false`.
    #[serde(default)]
    pub shadow: bool,
}

impl Limit {
    /// What the limit limits, e.g. `100/s per caller, burst 200`, for callers who hit it. Describes the
    /// rule, never a key value.
    pub fn description(&self) -> String {
        format!("{} {}, burst {}", self.rate, self.key.scope(), self.burst)
    }
}

/// What a limit counts requests by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitKey {
    /// The calling service: caps what one internal service can mint.
    Caller,
    /// One user in one room (room ARN + user id): caps reconnect storms of a single user.
    User,
    /// The room: caps a stampede into one room.
    Room,
    /// One caller in one room.
    CallerRoom,
    /// The AWS account and region that own the room: what IVS Chat's own quotas count by.
    AccountRegion,
    /// Every request together: caps the service as a whole, e.g. below an upstream quota.
    Global,
}

impl LimitKey {
    /// The setting's spelling, also part of every store key so a limit whose key kind changes starts afresh.
    pub fn as_str(self) -> &'static str {
        match self {
            LimitKey::Caller => "caller",
            LimitKey::User => "user",
            LimitKey::Room => "room",
            LimitKey::CallerRoom => "caller_room",
            LimitKey::AccountRegion => "account_region",
            LimitKey::Global => "global",
        }
    }

    fn scope(self) -> &'static str {
        match self {
            LimitKey::Caller => "per caller",
            LimitKey::User => "per user per room",
            LimitKey::Room => "per room",
            LimitKey::CallerRoom => "per caller per room",
            LimitKey::AccountRegion => "per AWS account and region",
            LimitKey::Global => "in total",
        }
    }
}

impl fmt::Display for LimitKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The period a [`Rate`] counts over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Period {
    /// `s`, `sec`, `second`.
    Second,
    /// `min`, `minute`.
    Minute,
    /// `h`, `hour`.
    Hour,
}

impl Period {
    fn duration(self) -> Duration {
        match self {
            Period::Second => Duration::from_secs(1),
            Period::Minute => Duration::from_secs(60),
            Period::Hour => Duration::from_secs(3600),
        }
    }

    fn parse(unit: &str) -> Option<Self> {
        match unit {
            "s" | "sec" | "second" => Some(Period::Second),
            "min" | "minute" => Some(Period::Minute),
            "h" | "hour" => Some(Period::Hour),
            _ => None,
        }
    }

    fn symbol(self) -> &'static str {
        match self {
            Period::Second => "s",
            Period::Minute => "min",
            Period::Hour => "h",
        }
    }
}

/// A sustained rate as configured, e.g. `100/s`: kept as written so errors and descriptions show what the
/// operator wrote rather than a rounded interval. Deserialises from its text, so a configuration holds only
/// valid rates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct Rate {
    count: NonZeroU32,
    period: Period,
}

impl Rate {
    /// Accepts `N/s`, `N/min` or `N/h` (also `second`, `sec`, `minute`, `hour`), with `N` at least 1 and at
    /// most one request per nanosecond.
    pub fn parse(rate: &str) -> Result<Self, String> {
        let malformed =
            || format!("must look like \"100/s\", \"30/min\" or \"500/h\", got {rate:?}");
        let (count, unit) = rate.split_once('/').ok_or_else(malformed)?;
        let period = Period::parse(unit.trim()).ok_or_else(malformed)?;
        let count: u32 = count.trim().parse().map_err(|_| malformed())?;
        let count = NonZeroU32::new(count)
            .ok_or_else(|| format!("must allow at least 1 request per period, got {rate:?}"))?;
        let rate = Rate { count, period };
        if rate.emission_interval().is_zero() {
            return Err(format!(
                "must allow at most one request per nanosecond, got {rate:?}"
            ));
        }
        Ok(rate)
    }

    /// `T`: the average time between two admitted requests, `period / N`, truncated to whole nanoseconds
    /// (so `3/s` admits 3.000000003 per second; nobody can tell).
    pub fn emission_interval(self) -> Duration {
        self.period.duration() / self.count.get()
    }
}

impl TryFrom<String> for Rate {
    type Error = String;

    fn try_from(rate: String) -> Result<Self, String> {
        Rate::parse(&rate)
    }
}

impl From<Rate> for String {
    fn from(rate: Rate) -> String {
        rate.to_string()
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.count, self.period.symbol())
    }
}
