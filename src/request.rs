//! Moved to [`crate::domain`]; the proto conversions stay here until the gRPC door takes them.

pub use crate::domain::caller::{Caller, CallerSource};
pub use crate::domain::room::{MAX_ROOM_ARN_CHARS, RoomArn};
pub use crate::domain::token::*;

use crate::error::Error;
use crate::proto::ivschat::v1 as pb;

impl TokenRequest {
    /// Validates `request` from `caller`, reporting every bad field at once.
    pub fn from_proto(caller: Caller, request: pb::CreateChatTokenRequest) -> Result<Self, Error> {
        let unchecked = UncheckedRequest {
            capabilities: capabilities_from_proto(&request.capabilities),
            room_identifier: request.room_identifier,
            user_id: request.user_id,
            session_duration_in_minutes: request.session_duration_in_minutes.map(i64::from),
            attributes: request.attributes.into_iter().collect(),
        };
        Self::validate(caller, unchecked, &FieldNames::PROTO)
    }
}

/// Refuses UNSPECIFIED and numbers the proto does not define. The reason counts the bad entries and
/// names only the first few, so it stays short however many a request sends.
pub fn capabilities_from_proto(values: &[i32]) -> Result<Capabilities, String> {
    const NAMED: usize = 3;
    let mut set = Vec::new();
    let mut bad = 0usize;
    let mut named = Vec::with_capacity(NAMED);
    for (index, &value) in values.iter().enumerate() {
        match pb::ChatTokenCapability::try_from(value) {
            Ok(pb::ChatTokenCapability::SendMessage) => set.push(Capability::SendMessage),
            Ok(pb::ChatTokenCapability::DisconnectUser) => set.push(Capability::DisconnectUser),
            Ok(pb::ChatTokenCapability::DeleteMessage) => set.push(Capability::DeleteMessage),
            Ok(pb::ChatTokenCapability::Unspecified) | Err(_) => {
                bad += 1;
                if named.len() < NAMED {
                    named.push(format!("[{index}]={value}"));
                }
            }
        }
    }
    if bad == 0 {
        return Ok(Capabilities::new(set));
    }
    let more = if bad > named.len() {
        format!(" and {} more", bad - named.len())
    } else {
        String::new()
    };
    Err(format!(
        "each capability must be SEND_MESSAGE, DISCONNECT_USER or DELETE_MESSAGE; {bad} invalid: {}{more}",
        named.join(", ")
    ))
}

/// The set as proto enum values.
pub fn capabilities_to_proto(capabilities: &Capabilities) -> Vec<i32> {
    capabilities
        .iter()
        .map(|c| match c {
            Capability::SendMessage => pb::ChatTokenCapability::SendMessage,
            Capability::DisconnectUser => pb::ChatTokenCapability::DisconnectUser,
            Capability::DeleteMessage => pb::ChatTokenCapability::DeleteMessage,
        } as i32)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_capabilities_are_counted_not_listed() {
        let reason = capabilities_from_proto(&[1, 0, 7]).unwrap_err();
        assert!(reason.ends_with("2 invalid: [1]=0, [2]=7"), "{reason}");
        let three = capabilities_from_proto(&[9, 9, 9]).unwrap_err();
        assert!(three.ends_with("3 invalid: [0]=9, [1]=9, [2]=9"), "{three}");
        let many = capabilities_from_proto(&vec![42; 30_000]).unwrap_err();
        assert!(
            many.ends_with("30000 invalid: [0]=42, [1]=42, [2]=42 and 29997 more"),
            "{many}"
        );
        assert!(many.len() < 200, "{} bytes", many.len());
    }
}
