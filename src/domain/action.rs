//! [`Action`]: the one spelling of every operation this service performs. The same word is the Cedar
//! action (`Action::"BanUser"`), the `action` of audit events and metrics, the gRPC method name, the path
//! of IVS Chat's REST-JSON operation (`POST /DisconnectUser`) and the scope that keeps each kind of call's
//! rate-limit budgets apart.

use std::fmt;

/// IVS Chat's service name: the SigV4 signing name of its API, and `rpc.service` of its operations.
pub const IVS_SIGNING_NAME: &str = "ivschat";

/// An operation a caller can ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Mint a chat token for a user in a room.
    CreateChatToken,
    /// Close a user's connections to a room (IVS), or revoke their tokens issued so far (local).
    DisconnectUser,
    /// Disconnect a user and refuse their tokens for a while, or until unbanned.
    BanUser,
    /// Lift a ban.
    UnbanUser,
    /// List a room's bans.
    ListBans,
    /// Check a local issuer token for a chat server.
    VerifyChatToken,
    /// Send an application event to a room's clients (IVS Chat's SendEvent).
    SendEvent,
    /// Tell a room's clients to delete a message (IVS Chat's DeleteMessage).
    DeleteMessage,
}

impl Action {
    /// Every operation, in the order the API lists them.
    pub const ALL: [Action; 8] = [
        Action::CreateChatToken,
        Action::DisconnectUser,
        Action::BanUser,
        Action::UnbanUser,
        Action::ListBans,
        Action::VerifyChatToken,
        Action::SendEvent,
        Action::DeleteMessage,
    ];

    /// The operation's name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Action::CreateChatToken => "CreateChatToken",
            Action::DisconnectUser => "DisconnectUser",
            Action::BanUser => "BanUser",
            Action::UnbanUser => "UnbanUser",
            Action::ListBans => "ListBans",
            Action::VerifyChatToken => "VerifyChatToken",
            Action::SendEvent => "SendEvent",
            Action::DeleteMessage => "DeleteMessage",
        }
    }

    /// Whether IVS Chat's own REST-JSON API has this operation, so this service offers it at
    /// `POST /{name}` for the AWS CLI and SDKs. The others exist only in this service's gRPC API.
    pub const fn in_ivs_api(self) -> bool {
        matches!(
            self,
            Action::CreateChatToken
                | Action::DisconnectUser
                | Action::SendEvent
                | Action::DeleteMessage
        )
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_action_has_its_own_name() {
        let mut names: Vec<_> = Action::ALL.iter().map(|a| a.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Action::ALL.len());
    }
}
