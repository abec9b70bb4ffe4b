//! Where bans, revocations and used token ids live, behind the small [`ModerationStore`] trait, a sibling
//! of the rate limits' [`LimiterStore`](super::limits::LimiterStore) implemented by the same backends:
//! - [`MemoryModeration`]: in process, for one replica, bounded.
//! - [`RedisModeration`]: in Redis, shared by every replica; every entry lives exactly as long as it
//!   matters (the ban's end, the longest token lifetime, the token's expiry) through Redis TTLs.

pub mod memory;
pub mod redis;

use std::{
    future::Future,
    time::{Duration, SystemTime},
};

use super::StoreError;
use crate::domain::{Ban, BanPage, PageToken, RoomArn, UserId};

pub use memory::MemoryModeration;
pub use redis::{BanGate, Gated, RedisModeration};

/// Where bans, revocations and used token ids are kept.
pub trait ModerationStore: Send + Sync + 'static {
    /// Puts `ban` in force, replacing any ban of the same user in the same room.
    fn ban(&self, ban: &Ban) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Lifts the ban of `user_id` in `room`; `true` when one was in force.
    fn unban(
        &self,
        room: &RoomArn,
        user_id: &UserId,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// The ban of `user_id` in `room`, if one is in force.
    fn ban_of(
        &self,
        room: &RoomArn,
        user_id: &UserId,
    ) -> impl Future<Output = Result<Option<Ban>, StoreError>> + Send;

    /// Up to `limit` bans in force in `room`, after `after`.
    fn list_bans(
        &self,
        room: &RoomArn,
        after: Option<&PageToken>,
        limit: usize,
    ) -> impl Future<Output = Result<BanPage, StoreError>> + Send;

    /// Records that tokens of `user_id` for `room` issued before `at` are revoked, unless a later
    /// revocation is kept (revocations only move forward); the record is kept for `keep_for` (the
    /// longest a token can verify), after which every such token has stopped verifying anyway.
    fn revoke(
        &self,
        room: &RoomArn,
        user_id: &UserId,
        at: SystemTime,
        keep_for: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The latest revocation of `user_id`'s tokens for `room` still kept.
    fn revoked_at(
        &self,
        room: &RoomArn,
        user_id: &UserId,
    ) -> impl Future<Output = Result<Option<SystemTime>, StoreError>> + Send;

    /// Marks `token_id` used until at least `until` (the last instant it can verify); `true` when this
    /// is its first use.
    fn first_use(
        &self,
        token_id: &str,
        until: SystemTime,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
}
