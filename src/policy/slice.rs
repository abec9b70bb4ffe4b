//! The entities a decision can reach: the caller's entity and its ancestors, the entities the policies name
//! and the actions (picked once per load), and the request's `Room`, made from its ARN.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use cedar_policy::{Entities, Entity, EntityId, EntityUid};

use super::PolicyEngine;
use super::load::{Loaded, string, with_ancestors};
use crate::domain::{Error, RoomArn};

impl PolicyEngine {
    /// [`Self::slice`], built once per caller and room while `loaded` is in force.
    pub(super) fn cached_slice(
        &self,
        loaded: &Loaded,
        principal: &EntityUid,
        caller: &str,
        room: &RoomArn,
    ) -> Result<Arc<Entities>, Error> {
        let key = (caller.to_owned(), room.as_str().to_owned());
        loaded
            .slices
            .get_or_try_insert(&key, || self.slice(loaded, principal, room).map(Arc::new))
    }

    /// The entities a decision about `principal` and `room` can reach (see the module docs): a lookup per
    /// ancestor of the caller, whatever the size of the entities file.
    pub(super) fn slice(
        &self,
        loaded: &Loaded,
        principal: &EntityUid,
        room: &RoomArn,
    ) -> Result<Entities, Error> {
        let mut seen: HashSet<EntityUid> = loaded.shared.iter().map(Entity::uid).collect();
        let mut slice = loaded.shared.clone();
        with_ancestors(&loaded.entities, principal, |entity| {
            if seen.insert(entity.uid()) {
                slice.push(entity.clone());
            }
        });
        slice.push(self.room_entity(room));
        Entities::from_entities(slice, None)
            .map_err(|e| Error::Internal(format!("policy entities: {e}")))
    }

    /// The request's `Room`, its attributes parsed from the ARN.
    fn room_entity(&self, room: &RoomArn) -> Entity {
        Entity::new(
            EntityUid::from_type_name_and_id(self.room_type.clone(), EntityId::new(room.as_str())),
            HashMap::from([
                ("region".into(), string(room.region())),
                ("account".into(), string(room.account())),
                ("roomId".into(), string(room.room_id())),
            ]),
            HashSet::new(),
        )
        .expect("string attributes are always valid")
    }
}
