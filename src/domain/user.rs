//! [`UserId`]: the application's id for an end user, as IVS Chat bounds it.

use std::fmt;

/// Longest user id IVS Chat accepts, in characters (not bytes).
pub const MAX_USER_ID_CHARS: usize = 128;

/// The application's id for an end user: 1 to 128 characters of any UTF-8 text. Personal data.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct UserId(String);

impl UserId {
    /// Counts characters, not bytes, as IVS Chat does.
    pub fn parse(user_id: String) -> Result<Self, String> {
        let chars = user_id.chars().count();
        match chars {
            0 => Err("is required".into()),
            1..=MAX_USER_ID_CHARS => Ok(UserId(user_id)),
            _ => Err(format!(
                "must be at most {MAX_USER_ID_CHARS} characters, got {chars}"
            )),
        }
    }

    /// The id itself. Do not log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "UserId(<{} chars>)", self.0.chars().count())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_id_debug_hides_the_id() {
        let user = UserId::parse("alice@example.com".into()).unwrap();
        assert_eq!(format!("{user:?}"), "UserId(<17 chars>)");
    }
}
