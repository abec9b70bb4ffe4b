//! Keys made of caller-chosen strings (caller ids, room ARNs, user ids, attribute keys, token ids):
//! - [`push_part`]: composite keys no choice of those strings can make collide: every part is written as
//!   its length, `:`, then its bytes. The rate-limit store keys and the policy decision cache use it.
//! - [`digest_hex`]: a 128-bit digest of a key in hex, so a store holds no user id or room ARN in clear and
//!   its keys have a bounded length.

use blake2b_simd::Params;

/// Bytes of BLAKE2b digest: 128 bits, no collision among any number of keys a store can hold.
const DIGEST_BYTES: usize = 16;

/// Appends `part` to `key`, length-prefixed.
pub fn push_part(key: &mut String, part: &str) {
    key.push_str(itoa::Buffer::new().format(part.len()));
    key.push(':');
    key.push_str(part);
}

/// The lowercase hex BLAKE2b-128 digest of `value` (32 characters): how user ids, rooms, token ids and
/// rate-limit keys appear in Redis keys, and the order of ListBans pages in every store.
pub fn digest_hex(value: &str) -> String {
    let mut hex = String::with_capacity(2 * DIGEST_BYTES);
    push_digest_hex(&mut hex, value);
    hex
}

/// Appends [`digest_hex`]`(value)` to `key`, allocating nothing else.
pub fn push_digest_hex(key: &mut String, value: &str) {
    let digest = Params::new()
        .hash_length(DIGEST_BYTES)
        .hash(value.as_bytes());
    let mut hex = [0; 2 * DIGEST_BYTES];
    hex::encode_to_slice(digest.as_bytes(), &mut hex)
        .expect("the buffer holds two digits per byte");
    key.push_str(std::str::from_utf8(&hex).expect("hex digits are ASCII"));
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

    #[test]
    fn digests_are_blake2b_128_in_lowercase_hex() {
        // BLAKE2b-128 of "abc", from the reference implementation.
        assert_eq!(digest_hex("abc"), "cf4ab791c62b8d2b2109c90275287816");
    }
}
