//! PASETO `v4.local` encryption, the minting half only: decryption stays with pasetors
//! ([`super::token`]), which also checks every token this module makes in the tests below.
//!
//! Why not pasetors' `LocalToken::encrypt`: it encodes in constant-time base64, a large share of a
//! CreateChatToken call (BENCHMARKS.md has the profile). The bytes encoded here — nonce, ciphertext, tag
//! and the public footer — are all sent in the clear, so encoding them in constant time protects nothing;
//! the `base64` crate does it in a fraction of the time (on AVX2 where the CPU has it). The rest is the same
//! construction, with the pre-authentication encoding fed to BLAKE2b piece by piece instead of copied
//! into a buffer, the plaintext encrypted in place, the nonce from the thread-local CSPRNG instead of a
//! `getrandom` system call per token, and what is the same for every token of a key done once
//! ([`Sealer`]).
//!
//! The primitives are RustCrypto's `chacha20` and `blake2b_simd`, which pick AVX2 or SSE at run time,
//! not orion's portable ones (pasetors'): the encryption was 35,600 instructions of a 154,000-instruction
//! call with orion (docs/dev/optimisations.md "Token encryption"). The official test vectors below and
//! pasetors' decryption check the result.
//!
//! The construction ([PASETO v4.local]):
//! 1. `n`: 32 random bytes.
//! 2. `Ek || n2 = BLAKE2b-448(key = k, "paseto-encryption-key" || n)`,
//!    `Ak = BLAKE2b-256(key = k, "paseto-auth-key-for-aead" || n)`.
//! 3. `c = XChaCha20(key = Ek, nonce = n2, m)`.
//! 4. `t = BLAKE2b-256(key = Ak, PAE("v4.local.", n, c, f, i))`.
//! 5. `"v4.local." || base64url(n || c || t)`, then `"." || base64url(f)` when there is a footer.
//!
//! [PASETO v4.local]: https://github.com/paseto-standard/paseto-spec/blob/master/docs/01-Protocol-Versions/Version4.md

use std::sync::LazyLock;

use base64::{
    Engine,
    engine::{GeneralPurposeConfig, Simd},
};
use blake2b_simd::{Params, State};
use chacha20::{
    XChaCha20,
    cipher::{KeyIvInit, StreamCipher},
};

const HEADER: &str = "v4.local.";
const NONCE_LEN: usize = 32;
const TAG_LEN: usize = 32;
const KEY_LEN: usize = 32;

/// base64url without padding, on AVX2 (or NEON) when the CPU has it: the encoding was a sixth of the
/// encryption in the portable engine.
static BASE64URL: LazyLock<Simd> =
    LazyLock::new(|| Simd::url_safe(GeneralPurposeConfig::new().with_encode_padding(false)));

/// The key is not 32 bytes long, v4.local's key length.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct WrongKeyLength;

/// One key's v4.local encryption with its footer, ready to seal tokens: what does not depend on the
/// token is done once. Both key-splitting hashes are keyed with the key and start with a constant
/// ("paseto-encryption-key", "paseto-auth-key-for-aead"), so their states after the key block and that
/// constant are kept and cloned per token (two BLAKE2b compressions saved a token), and the footer is
/// base64-encoded once.
///
/// The kept states are derived from the key and, like the key itself, live as long as the key set;
/// unlike pasetors' key they are not zeroed when dropped (blake2b_simd's `State` cannot be).
pub(super) struct Sealer {
    split: State,
    auth: State,
    footer: Vec<u8>,
    /// `"." || base64url(footer)`, or nothing without a footer.
    encoded_footer: String,
}

impl Sealer {
    /// A sealer for the 32-byte `key`; `footer` is authenticated and sent in the clear with every token.
    pub(super) fn new(key: &[u8], footer: &[u8]) -> Result<Self, WrongKeyLength> {
        if key.len() != KEY_LEN {
            return Err(WrongKeyLength);
        }
        let keyed = |hash_length: usize, constant: &[u8]| {
            let mut state = Params::new().hash_length(hash_length).key(key).to_state();
            // The key block is compressed once more input follows it: with the constant, here.
            state.update(constant);
            state
        };
        let encoded_footer = if footer.is_empty() {
            String::new()
        } else {
            let mut encoded = String::from(".");
            BASE64URL.encode_string(footer, &mut encoded);
            encoded
        };
        Ok(Sealer {
            split: keyed(56, b"paseto-encryption-key"),
            auth: keyed(KEY_LEN, b"paseto-auth-key-for-aead"),
            footer: footer.to_vec(),
            encoded_footer,
        })
    }

    /// Encrypts `message` with a fresh random nonce; `implicit` is authenticated and not sent.
    pub(super) fn seal(&self, message: &[u8], implicit: &[u8]) -> String {
        let mut nonce = [0u8; NONCE_LEN];
        rand::fill(&mut nonce);
        self.seal_with_nonce(&nonce, message, implicit)
    }

    fn seal_with_nonce(&self, nonce: &[u8; NONCE_LEN], message: &[u8], implicit: &[u8]) -> String {
        // Key splitting: an encryption key and nonce, and an authentication key, all bound to this nonce.
        let split = self.split.clone().update(nonce).finalize();
        let (enc_key, enc_nonce) = split.as_bytes().split_at(KEY_LEN);
        let auth_key = self.auth.clone().update(nonce).finalize();

        // n || c || t, encrypted in place.
        let mut body = Vec::with_capacity(NONCE_LEN + message.len() + TAG_LEN);
        body.extend_from_slice(nonce);
        body.extend_from_slice(message);
        XChaCha20::new_from_slices(enc_key, enc_nonce)
            .expect("BLAKE2b-448 splits into a 32-byte key and a 24-byte nonce")
            .apply_keystream(&mut body[NONCE_LEN..]);

        // The tag over PAE(h, n, c, f, i): the piece count, then each piece's length and bytes, lengths
        // as 64-bit little-endian with the top bit clear.
        let mut tag = Params::new()
            .hash_length(TAG_LEN)
            .key(auth_key.as_bytes())
            .to_state();
        let ciphertext = &body[NONCE_LEN..];
        let pieces: [&[u8]; 5] = [HEADER.as_bytes(), nonce, ciphertext, &self.footer, implicit];
        tag.update(&le64(pieces.len()));
        for piece in pieces {
            tag.update(&le64(piece.len()));
            tag.update(piece);
        }
        let tag = tag.finalize();
        body.extend_from_slice(tag.as_bytes());

        // Encoded straight into the token's buffer, sized exactly.
        let encoded_len = base64::encoded_len(body.len(), false).expect("a token's length fits");
        let mut token = Vec::with_capacity(HEADER.len() + encoded_len + self.encoded_footer.len());
        token.extend_from_slice(HEADER.as_bytes());
        token.resize(HEADER.len() + encoded_len, 0);
        let written = BASE64URL
            .encode_slice(&body, &mut token[HEADER.len()..])
            .expect("the buffer is sized for the encoding");
        debug_assert_eq!(written, encoded_len);
        token.extend_from_slice(self.encoded_footer.as_bytes());
        String::from_utf8(token).expect("the header and base64url are ASCII")
    }
}

fn le64(n: usize) -> [u8; 8] {
    (n as u64 & (u64::MAX >> 1)).to_le_bytes()
}

#[cfg(test)]
mod tests {
    use pasetors::{
        Local,
        keys::SymmetricKey,
        token::UntrustedToken,
        version4::{LocalToken, V4},
    };

    use super::*;

    fn hex(text: &str) -> Vec<u8> {
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
            .collect()
    }

    /// name, nonce (hex), message, footer, implicit assertion, token.
    type Vector<'a> = (&'a str, &'a str, &'a [u8], &'a [u8], &'a [u8], &'a str);

    const KEY: &str = "707172737475767778797a7b7c7d7e7f808182838485868788898a8b8c8d8e8f";
    const NONCE: &str = "df654812bac492663825520ba2f6e67cf5ca5bdc13d4e7507a98cc4c2fcc3ad8";

    /// The official v4.local vectors (paseto-standard/test-vectors, v4.json) that cover each shape: no
    /// footer, JSON footer, footer with implicit assertion, non-JSON footer.
    #[test]
    fn matches_the_official_test_vectors() {
        let secret = br#"{"data":"this is a secret message","exp":"2022-01-01T00:00:00+00:00"}"#;
        let hidden = br#"{"data":"this is a hidden message","exp":"2022-01-01T00:00:00+00:00"}"#;
        let kid = br#"{"kid":"zVhMiPBP9fRf2snEcT7gFTioeA9COcNy9DfgL1W60haN"}"#;
        let vectors: [Vector; 5] = [
            (
                "4-E-1",
                "0000000000000000000000000000000000000000000000000000000000000000",
                secret,
                b"",
                b"",
                "v4.local.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAQAr68PS4AXe7If_ZgesdkUMvSwscFlAl1pk5HC0e8kApeaqMfGo_7OpBnwJOAbY9V7WU6abu74MmcUE8YWAiaArVI8XJ5hOb_4v9RmDkneN0S92dx0OW4pgy7omxgf3S8c3LlQg",
            ),
            (
                "4-E-4",
                NONCE,
                hidden,
                b"",
                b"",
                "v4.local.32VIErrEkmY4JVILovbmfPXKW9wT1OdQepjMTC_MOtjA4kiqw7_tcaOM5GNEcnTxl60WiA8rd3wgFSNb_UdJPXjpzm0KW9ojM5f4O2mRvE2IcweP-PRdoHjd5-RHCiExR1IK6t4gt6TiLm55vIH8c_lGxxZpE3AWlH4WTR0v45nsWoU3gQ",
            ),
            (
                "4-E-5",
                NONCE,
                secret,
                kid,
                b"",
                "v4.local.32VIErrEkmY4JVILovbmfPXKW9wT1OdQepjMTC_MOtjA4kiqw7_tcaOM5GNEcnTxl60WkwMsYXw6FSNb_UdJPXjpzm0KW9ojM5f4O2mRvE2IcweP-PRdoHjd5-RHCiExR1IK6t4x-RMNXtQNbz7FvFZ_G-lFpk5RG3EOrwDL6CgDqcerSQ.eyJraWQiOiJ6VmhNaVBCUDlmUmYyc25FY1Q3Z0ZUaW9lQTlDT2NOeTlEZmdMMVc2MGhhTiJ9",
            ),
            (
                "4-E-7",
                NONCE,
                secret,
                kid,
                br#"{"test-vector":"4-E-7"}"#,
                "v4.local.32VIErrEkmY4JVILovbmfPXKW9wT1OdQepjMTC_MOtjA4kiqw7_tcaOM5GNEcnTxl60WkwMsYXw6FSNb_UdJPXjpzm0KW9ojM5f4O2mRvE2IcweP-PRdoHjd5-RHCiExR1IK6t40KCCWLA7GYL9KFHzKlwY9_RnIfRrMQpueydLEAZGGcA.eyJraWQiOiJ6VmhNaVBCUDlmUmYyc25FY1Q3Z0ZUaW9lQTlDT2NOeTlEZmdMMVc2MGhhTiJ9",
            ),
            (
                "4-E-9",
                NONCE,
                hidden,
                b"arbitrary-string-that-isn't-json",
                br#"{"test-vector":"4-E-9"}"#,
                "v4.local.32VIErrEkmY4JVILovbmfPXKW9wT1OdQepjMTC_MOtjA4kiqw7_tcaOM5GNEcnTxl60WiA8rd3wgFSNb_UdJPXjpzm0KW9ojM5f4O2mRvE2IcweP-PRdoHjd5-RHCiExR1IK6t6tybdlmnMwcDMw0YxA_gFSE_IUWl78aMtOepFYSWYfQA.YXJiaXRyYXJ5LXN0cmluZy10aGF0LWlzbid0LWpzb24",
            ),
        ];
        for (name, nonce, message, footer, implicit, expected) in vectors {
            let nonce: [u8; 32] = hex(nonce).try_into().unwrap();
            let sealer = Sealer::new(&hex(KEY), footer).unwrap();
            // Twice from one sealer: sealing leaves its kept states as they were.
            for _ in 0..2 {
                let token = sealer.seal_with_nonce(&nonce, message, implicit);
                assert_eq!(token, expected, "{name}");
            }
        }
    }

    /// Random nonces, every length of message around base64's 3-byte groups, with and without footer:
    /// pasetors decrypts each to the same message, and refuses it under another implicit assertion.
    #[test]
    fn pasetors_decrypts_what_it_encrypts() {
        let key = hex(KEY);
        let pasetors_key = SymmetricKey::<V4>::from(&key).unwrap();
        for len in 1..=64 {
            let message: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
            for footer in [&b""[..], br#"{"kid":"k4.lid.x"}"#] {
                let token = Sealer::new(&key, footer)
                    .unwrap()
                    .seal(&message, b"purpose");
                let untrusted = UntrustedToken::<Local, V4>::try_from(&token).unwrap();
                let expected_footer = (!footer.is_empty()).then_some(footer);
                let trusted = LocalToken::decrypt(
                    &pasetors_key,
                    &untrusted,
                    expected_footer,
                    Some(b"purpose"),
                )
                .unwrap();
                assert_eq!(trusted.payload().as_bytes(), message);
                assert!(
                    LocalToken::decrypt(&pasetors_key, &untrusted, None, Some(b"other")).is_err()
                );
            }
        }
    }

    #[test]
    fn every_token_has_its_own_nonce() {
        let sealer = Sealer::new(&hex(KEY), b"").unwrap();
        let a = sealer.seal(b"same", b"");
        let b = sealer.seal(b"same", b"");
        assert_ne!(a, b);
        assert_eq!(a.len(), b.len());
    }

    #[test]
    fn a_key_of_the_wrong_length_is_an_error() {
        assert!(matches!(Sealer::new(&[0; 31], b""), Err(WrongKeyLength)));
        assert!(matches!(Sealer::new(&[0; 33], b""), Err(WrongKeyLength)));
        assert!(Sealer::new(&[0; 32], b"").is_ok());
    }
}
