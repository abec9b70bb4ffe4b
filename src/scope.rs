//! [`ScopeLayer`]: refuses rooms outside the regions and AWS accounts this deployment serves, before any
//! rate-limit budget is spent and before the issuer sees them.
//!
//! It is also what bounds the issuer's state: the IVS issuer holds one SDK client per allowed region, and
//! the region is a metric label, so a request naming a made-up region must stop here.
//!
//! ```
//! use chat_token_service::{domain::{Region, ServedRooms}, scope::ScopeLayer};
//! let rooms = ServedRooms::new(vec![Region::parse("us-west-2").unwrap()], Vec::new()); // any account
//! let layer = ScopeLayer::new(rooms);
//! ```

use std::{
    future::{Ready, ready},
    task::{Context, Poll},
};

use futures_util::future::Either;

use crate::domain::{
    Error, MessagingRequest, ModerationRequest, RoomArn, ServedRooms, TokenRequest,
};

/// A request about one room, which [`Scope`] checks.
pub trait InRoom {
    /// The room.
    fn room(&self) -> &RoomArn;
}

impl InRoom for TokenRequest {
    fn room(&self) -> &RoomArn {
        &self.room
    }
}

/// Moderation too: a ban for a room the issuer does not serve is refused before it is stored (it could
/// never be enforced, and would be listed as if it were).
impl InRoom for ModerationRequest {
    fn room(&self) -> &RoomArn {
        &self.room
    }
}

impl InRoom for MessagingRequest {
    fn room(&self) -> &RoomArn {
        &self.room
    }
}

/// Wraps a service in [`Scope`].
#[derive(Clone, Debug)]
pub struct ScopeLayer {
    rooms: ServedRooms,
}

impl ScopeLayer {
    /// Refuses rooms outside `rooms`.
    pub fn new(rooms: ServedRooms) -> Self {
        ScopeLayer { rooms }
    }
}

impl<S> tower::Layer<S> for ScopeLayer {
    type Service = Scope<S>;

    fn layer(&self, inner: S) -> Scope<S> {
        Scope {
            inner,
            rooms: self.rooms.clone(),
        }
    }
}

/// See [`ScopeLayer`].
#[derive(Clone, Debug)]
pub struct Scope<S> {
    inner: S,
    rooms: ServedRooms,
}

impl<S, R> tower::Service<R> for Scope<S>
where
    R: InRoom,
    S: tower::Service<R, Error = Error>,
{
    type Response = S::Response;
    type Error = Error;
    type Future = Either<S::Future, Ready<Result<S::Response, Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: R) -> Self::Future {
        match self.rooms.check(request.room()) {
            Ok(()) => Either::Left(self.inner.call(request)),
            Err(error) => Either::Right(ready(Err(error))),
        }
    }
}

#[cfg(test)]
mod tests {
    use tower::{Layer, ServiceExt};

    use super::*;
    use crate::domain::token::test_request;
    use crate::domain::{AccountId, Region, RoomArn};

    fn scope(regions: &[&str], accounts: &[&str]) -> ServedRooms {
        ServedRooms::new(
            regions.iter().map(|r| Region::parse(r).unwrap()).collect(),
            accounts
                .iter()
                .map(|a| AccountId::parse(a).unwrap())
                .collect(),
        )
    }

    fn room(arn: &str) -> RoomArn {
        RoomArn::parse(arn).unwrap()
    }

    #[test]
    fn rooms_outside_the_served_regions_and_accounts_are_refused_naming_the_field() {
        let rooms = scope(&["us-west-2"], &["111111111111"]);
        rooms
            .check(&room("arn:aws:ivschat:us-west-2:111111111111:room/a"))
            .unwrap();
        for arn in [
            "arn:aws:ivschat:eu-west-1:111111111111:room/a",
            "arn:aws:ivschat:us-west-2:222222222222:room/a",
        ] {
            let Err(Error::InvalidArgument(violations)) = rooms.check(&room(arn)) else {
                panic!("{arn} should be refused");
            };
            assert_eq!(violations[0].field, "room_identifier");
        }
        scope(&["us-west-2"], &[])
            .check(&room("arn:aws:ivschat:us-west-2:999999999999:room/a"))
            .unwrap();
    }

    #[tokio::test]
    async fn a_refused_room_never_reaches_the_inner_service() {
        let inner = tower::service_fn(|_: TokenRequest| async {
            Err::<(), _>(Error::Internal("reached the inner service".into()))
        });
        let service = ScopeLayer::new(scope(&["us-west-2"], &[])).layer(inner);
        let request = test_request()
            .room("arn:aws:ivschat:mars-north-1:111111111111:room/a")
            .build();
        assert!(matches!(
            service.oneshot(request).await,
            Err(Error::InvalidArgument(_))
        ));
    }
}
