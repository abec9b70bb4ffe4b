//! Composite keys made of caller-chosen strings (caller ids, room ARNs, user ids, attribute keys) that no
//! choice of those strings can make collide: every part is written as its length, `:`, then its bytes.
//! The rate-limit store keys and the policy decision cache use it.

/// Appends `part` to `key`, length-prefixed.
pub(crate) fn push_part(key: &mut String, part: &str) {
    key.push_str(itoa::Buffer::new().format(part.len()));
    key.push(':');
    key.push_str(part);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_length_prefixed() {
        let mut key = String::new();
        push_part(&mut key, "a:b");
        push_part(&mut key, "");
        assert_eq!(key, "3:a:b0:");
    }
}
