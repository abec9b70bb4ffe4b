//! The Generic Cell Rate Algorithm: pure arithmetic on instants, no clocks read, no I/O.
//!
//! A limit of `N` requests per period with burst `B` admits one request every emission interval
//! `T = period / N` on average, and up to `B` at once from a fully recovered state. Its whole state per key is
//! one instant, the *theoretical arrival time* (TAT): when the key would be fully recovered had every
//! admitted request arrived exactly on schedule. A request at `now` moves it to `max(TAT, now) + T` and is
//! admitted iff that lies no more than `B·T` ahead of `now`.
//!
//! Compared with a token bucket this needs no refill bookkeeping, and a denial knows exactly when a retry
//! will succeed: `retry_after = new TAT − now − B·T`, to the nanosecond.
//!
//! ```
//! use std::{num::NonZeroU32, time::Duration};
//! use chat_token_service::{domain::Rate, store::limits::gcra::{Outcome, Quota}};
//! use tokio::time::Instant;
//!
//! let quota = Quota::new(Rate::parse("5/min").unwrap(), NonZeroU32::new(5).unwrap());
//! let now = Instant::now();
//! let mut tat = None;
//! for _ in 0..5 {
//!     let Outcome::Allowed { tat: next } = quota.check(tat, now) else { panic!("burst admits 5") };
//!     tat = Some(next);
//! }
//! assert_eq!(quota.check(tat, now), Outcome::Denied { retry_after: Duration::from_secs(12) });
//! ```

use std::{num::NonZeroU32, time::Duration};

use tokio::time::Instant;

pub use crate::domain::Rate;

/// The two GCRA parameters of one limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quota {
    /// `T`: how far each admitted request pushes the TAT.
    emission_interval: Duration,
    /// `B·T`: how far ahead of now the TAT may run, i.e. how much of a burst is left to absorb.
    tolerance: Duration,
    /// `B`, kept so a store with a coarser clock can recompute `B·T` from its rounded `T`.
    burst: NonZeroU32,
}

/// What GCRA decided for one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Admitted; `tat` is the key's new theoretical arrival time, to be stored.
    Allowed {
        /// The TAT after this request: always later than `now`.
        tat: Instant,
    },
    /// Refused; the stored TAT must stay as it was.
    Denied {
        /// The shortest wait after which the same request is admitted, exact to the nanosecond.
        retry_after: Duration,
    },
}

impl Quota {
    /// The parameters of `limit`.
    pub fn of(limit: &crate::domain::Limit) -> Self {
        Quota::new(limit.rate, limit.burst)
    }

    /// `rate` on average, `burst` at once from a fully recovered state.
    pub fn new(rate: Rate, burst: NonZeroU32) -> Self {
        let emission_interval = rate.emission_interval();
        Quota {
            emission_interval,
            // At most 2³² · 1h, about 490,000 years: far from overflowing a Duration or an Instant.
            tolerance: emission_interval * burst.get(),
            burst,
        }
    }

    /// `T`, for stores that evaluate GCRA themselves (in Redis).
    pub fn emission_interval(&self) -> Duration {
        self.emission_interval
    }

    /// `B`, for stores that evaluate GCRA themselves (in Redis).
    pub fn burst(&self) -> NonZeroU32 {
        self.burst
    }

    /// Decides a request at `now` for a key whose stored TAT is `tat` (`None`: nothing stored, fully
    /// recovered).
    pub fn check(&self, tat: Option<Instant>, now: Instant) -> Outcome {
        let start = tat.map_or(now, |tat| tat.max(now));
        let new_tat = start + self.emission_interval;
        let ahead = new_tat - now;
        if ahead <= self.tolerance {
            Outcome::Allowed { tat: new_tat }
        } else {
            Outcome::Denied {
                retry_after: ahead - self.tolerance,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quota(rate: &str, burst: u32) -> Quota {
        Quota::new(Rate::parse(rate).unwrap(), NonZeroU32::new(burst).unwrap())
    }

    /// Runs one request through `quota`, storing the new TAT when admitted.
    fn request(quota: &Quota, tat: &mut Option<Instant>) -> Outcome {
        let outcome = quota.check(*tat, Instant::now());
        if let Outcome::Allowed { tat: next } = outcome {
            *tat = Some(next);
        }
        outcome
    }

    #[test]
    fn rates_parse_in_every_documented_spelling() {
        for (text, shown, interval) in [
            ("100/s", "100/s", Duration::from_millis(10)),
            ("1/second", "1/s", Duration::from_secs(1)),
            ("2/sec", "2/s", Duration::from_millis(500)),
            ("30/min", "30/min", Duration::from_secs(2)),
            ("5/minute", "5/min", Duration::from_secs(12)),
            ("4/h", "4/h", Duration::from_secs(900)),
            ("1 / hour", "1/h", Duration::from_secs(3600)),
            ("1000000000/s", "1000000000/s", Duration::from_nanos(1)),
        ] {
            let rate = Rate::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(rate.to_string(), shown);
            assert_eq!(rate.emission_interval(), interval, "{text}");
        }
    }

    #[test]
    fn malformed_rates_are_refused_with_the_rule() {
        for bad in [
            "", "100", "/s", "x/s", "-1/s", "1.5/s", "100/d", "100/ms", "100/S", "0/s",
        ] {
            assert!(Rate::parse(bad).is_err(), "{bad:?} should be refused");
        }
        assert!(Rate::parse("0/min").unwrap_err().contains("at least 1"));
        assert!(
            Rate::parse("2000000000/s")
                .unwrap_err()
                .contains("nanosecond")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_is_admitted_at_once_and_then_one_request_per_interval() {
        let quota = quota("10/s", 3);
        let mut tat = None;
        for i in 0..3 {
            assert!(
                matches!(request(&quota, &mut tat), Outcome::Allowed { .. }),
                "burst request {i}"
            );
        }
        assert_eq!(
            request(&quota, &mut tat),
            Outcome::Denied {
                retry_after: Duration::from_millis(100)
            }
        );
        for _ in 0..5 {
            tokio::time::advance(Duration::from_millis(100)).await;
            assert!(matches!(request(&quota, &mut tat), Outcome::Allowed { .. }));
            assert!(matches!(request(&quota, &mut tat), Outcome::Denied { .. }));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_is_exact() {
        let quota = quota("5/min", 5);
        let mut tat = None;
        for _ in 0..5 {
            assert!(matches!(request(&quota, &mut tat), Outcome::Allowed { .. }));
        }
        assert_eq!(
            request(&quota, &mut tat),
            Outcome::Denied {
                retry_after: Duration::from_secs(12)
            }
        );
        tokio::time::advance(Duration::from_millis(11_999)).await;
        assert_eq!(
            request(&quota, &mut tat),
            Outcome::Denied {
                retry_after: Duration::from_millis(1)
            }
        );
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(matches!(request(&quota, &mut tat), Outcome::Allowed { .. }));
    }

    #[tokio::test(start_paused = true)]
    async fn a_denial_does_not_move_the_tat() {
        let quota = quota("1/s", 1);
        let mut tat = None;
        assert!(matches!(request(&quota, &mut tat), Outcome::Allowed { .. }));
        let before = tat;
        for _ in 0..10 {
            assert!(matches!(request(&quota, &mut tat), Outcome::Denied { .. }));
        }
        assert_eq!(
            tat, before,
            "hammering while denied must not push recovery back"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_stale_tat_counts_as_fully_recovered() {
        let quota = quota("1/s", 2);
        let long_ago = Instant::now();
        tokio::time::advance(Duration::from_secs(3600)).await;
        let now = Instant::now();
        assert_eq!(quota.check(Some(long_ago), now), quota.check(None, now));
    }
}
