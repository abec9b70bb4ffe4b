//! [`StoreError`]: why a store could not decide, and what a caller sees of it.

use std::time::Duration;

use crate::domain::Error;

/// Why a store could not decide.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The shared store cannot be reached and is configured to fail closed: the request is refused rather
    /// than decided without it. The in-process stores never fail this way.
    #[error("store unavailable")]
    Unavailable {
        /// When the store will next be tried, for the caller's retry.
        retry_after: Duration,
    },
    /// The in-process moderation store holds as many entries still in force as it may; rather than forget
    /// one, the new one is refused. Rate-limit checks never fail this way: they forget the keys closest to
    /// recovery.
    #[error("store full: {capacity} entries in force")]
    Full {
        /// The configured bound (`limiter.max_tracked_keys`).
        capacity: usize,
    },
}

impl From<StoreError> for Error {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Unavailable { retry_after } => Error::LimiterUnavailable { retry_after },
            StoreError::Full { capacity } => Error::StoreFull { capacity },
        }
    }
}
