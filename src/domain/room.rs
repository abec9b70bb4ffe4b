//! Rooms: an IVS Chat room's ARN, its region and account, and which rooms a deployment serves.

use std::{fmt, sync::Arc};

use serde::{Deserialize, Serialize};

use super::error::{Error, FieldViolation};

/// Longest room ARN IVS Chat accepts, in characters.
pub const MAX_ROOM_ARN_CHARS: usize = 128;

/// An IVS Chat room ARN, `arn:aws:ivschat:REGION:ACCOUNT:room/ROOM_ID`, with its parts located once.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct RoomArn {
    arn: String,
    /// Byte ranges of region, account and room id inside `arn`, so accessors need not re-parse.
    region: (usize, usize),
    account: (usize, usize),
    room_id: usize,
}

impl RoomArn {
    const PREFIX: &'static str = "arn:aws:ivschat:";
    const ROOM: &'static str = ":room/";

    /// Accepts exactly what IVS Chat's pattern
    /// `^arn:aws:ivschat:[a-z0-9-]+:[0-9]+:room/[a-zA-Z0-9-]+$` accepts, at most 128 characters.
    pub fn parse(arn: &str) -> Result<Self, String> {
        if arn.is_empty() {
            return Err("is required".into());
        }
        let chars = arn.chars().count();
        if chars > MAX_ROOM_ARN_CHARS {
            return Err(format!(
                "must be at most {MAX_ROOM_ARN_CHARS} characters, got {chars}"
            ));
        }
        let malformed = || {
            "must be an IVS Chat room ARN matching \
             ^arn:aws:ivschat:[a-z0-9-]+:[0-9]+:room/[a-zA-Z0-9-]+$"
                .to_string()
        };
        let rest = arn.strip_prefix(Self::PREFIX).ok_or_else(malformed)?;
        let (region, rest) = rest.split_once(':').ok_or_else(malformed)?;
        let (account, room_id) = rest.split_once(Self::ROOM).ok_or_else(malformed)?;
        let region_ok = !region.is_empty()
            && region
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        let account_ok = !account.is_empty() && account.bytes().all(|b| b.is_ascii_digit());
        let room_ok = !room_id.is_empty()
            && room_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !(region_ok && account_ok && room_ok) {
            return Err(malformed());
        }
        let region_start = Self::PREFIX.len();
        let account_start = region_start + region.len() + 1;
        Ok(RoomArn {
            arn: arn.to_owned(),
            region: (region_start, region_start + region.len()),
            account: (account_start, account_start + account.len()),
            room_id: account_start + account.len() + Self::ROOM.len(),
        })
    }

    /// What policy is asked about when VerifyChatToken is given a token that does not open (malformed,
    /// tampered, or under a key this service does not hold): such a token names no room, and the caller
    /// learns why it was refused only if policy lets it verify tokens of this room. The production
    /// policy, which ties chat servers to their own accounts, does not: they see PERMISSION_DENIED.
    pub const UNOPENED_TOKEN: &'static str =
        "arn:aws:ivschat:none:000000000000:room/unopened-token";

    /// [`Self::UNOPENED_TOKEN`], parsed.
    pub fn unopened_token() -> Self {
        RoomArn::parse(Self::UNOPENED_TOKEN).expect("a valid room ARN")
    }

    /// The whole ARN.
    pub fn as_str(&self) -> &str {
        &self.arn
    }

    /// The AWS region the room lives in, e.g. `us-west-2`.
    pub fn region(&self) -> &str {
        &self.arn[self.region.0..self.region.1]
    }

    /// The AWS account that owns the room.
    pub fn account(&self) -> &str {
        &self.arn[self.account.0..self.account.1]
    }

    /// The room's own id, the part after `room/`.
    pub fn room_id(&self) -> &str {
        &self.arn[self.room_id..]
    }
}

impl fmt::Debug for RoomArn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.arn)
    }
}

impl fmt::Display for RoomArn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.arn)
    }
}

/// An AWS region name such as `us-west-2`: what a room ARN's region may hold (lowercase letters, digits
/// and dashes).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct Region(String);

impl Region {
    /// Accepts what IVS Chat's room ARN pattern accepts as a region: `[a-z0-9-]+`.
    pub fn parse(region: &str) -> Result<Self, String> {
        let valid = !region.is_empty()
            && region
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if valid {
            Ok(Region(region.to_owned()))
        } else {
            Err(format!("{region:?} is not an AWS region name"))
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Region {
    type Error = String;

    fn try_from(region: String) -> Result<Self, String> {
        Region::parse(&region)
    }
}

impl From<Region> for String {
    fn from(region: Region) -> String {
        region.0
    }
}

impl fmt::Display for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An AWS account id: the digits a room ARN's account holds.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct AccountId(String);

impl AccountId {
    /// Accepts what IVS Chat's room ARN pattern accepts as an account: `[0-9]+`.
    pub fn parse(account: &str) -> Result<Self, String> {
        if !account.is_empty() && account.bytes().all(|b| b.is_ascii_digit()) {
            Ok(AccountId(account.to_owned()))
        } else {
            Err(format!("{account:?} is not an AWS account id"))
        }
    }

    /// The digits.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for AccountId {
    type Error = String;

    fn try_from(account: String) -> Result<Self, String> {
        AccountId::parse(&account)
    }
}

impl From<AccountId> for String {
    fn from(account: AccountId) -> String {
        account.0
    }
}

impl fmt::Display for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which rooms are served: their regions, and optionally their accounts. Clones share one list.
#[derive(Clone, Debug)]
pub struct ServedRooms(Arc<Served>);

#[derive(Debug)]
struct Served {
    /// Rooms of other regions are refused.
    regions: Vec<Region>,
    /// Rooms of other accounts are refused; empty: any account.
    accounts: Vec<AccountId>,
}

impl ServedRooms {
    /// Rooms in `regions` owned by `accounts` (empty: any account).
    pub fn new(regions: Vec<Region>, accounts: Vec<AccountId>) -> Self {
        ServedRooms(Arc::new(Served { regions, accounts }))
    }

    /// The regions served.
    pub fn regions(&self) -> &[Region] {
        &self.0.regions
    }

    /// Refuses `room` with INVALID_ARGUMENT (field `room_identifier`) unless it is served.
    pub fn check(&self, room: &RoomArn) -> Result<(), Error> {
        let Served { regions, accounts } = &*self.0;
        // The message names the room's region or account (from the caller's own request) and what is
        // served, so the caller can tell a typo from a deployment that does not serve it.
        let refuse = |what: &str, value: &str, allowed: Vec<&str>| {
            Err(Error::InvalidArgument(vec![FieldViolation::new(
                "room_identifier",
                format!(
                    "{what} {value} is not served here (served: {})",
                    allowed.join(", ")
                ),
            )]))
        };
        if !regions.iter().any(|r| r.as_str() == room.region()) {
            return refuse(
                "region",
                room.region(),
                regions.iter().map(Region::as_str).collect(),
            );
        }
        if !accounts.is_empty() && !accounts.iter().any(|a| a.as_str() == room.account()) {
            return refuse(
                "account",
                room.account(),
                accounts.iter().map(AccountId::as_str).collect(),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ARN: &str = "arn:aws:ivschat:us-west-2:123456789012:room/g1H2I3j4k5L6";

    #[test]
    fn room_arn_exposes_its_parts() {
        let arn = RoomArn::parse(ARN).unwrap();
        assert_eq!(arn.region(), "us-west-2");
        assert_eq!(arn.account(), "123456789012");
        assert_eq!(arn.room_id(), "g1H2I3j4k5L6");
        assert_eq!(arn.as_str(), ARN);
    }

    #[test]
    fn room_arn_rejects_what_the_ivs_pattern_rejects() {
        for bad in [
            "",
            "arn:aws:ivschat:us-west-2:123456789012:room/",
            "arn:aws:ivschat::123456789012:room/abc",
            "arn:aws:ivschat:US-WEST-2:123456789012:room/abc",
            "arn:aws:ivschat:us-west-2:12345678901a:room/abc",
            "arn:aws:ivschat:us-west-2::room/abc",
            "arn:aws:ivs:us-west-2:123456789012:room/abc",
            "arn:aws:ivschat:us-west-2:123456789012:channel/abc",
            "arn:aws:ivschat:us-west-2:123456789012:room/ab_c",
            "arn:aws:ivschat:us-west-2:123456789012:room/abc/def",
            "arn:aws:ivschat:us-west-2:123:456:room/abc",
            " arn:aws:ivschat:us-west-2:123456789012:room/abc",
        ] {
            assert!(RoomArn::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn regions_and_accounts_accept_what_a_room_arn_can_hold() {
        assert_eq!(Region::parse("us-west-2").unwrap().as_str(), "us-west-2");
        for bad in ["", "US-WEST-2", "us_west_2", "eu west"] {
            assert!(Region::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(AccountId::parse("0123").unwrap().as_str(), "0123");
        for bad in ["", "12a", " 1"] {
            assert!(AccountId::parse(bad).is_err(), "{bad:?}");
        }
    }
}
