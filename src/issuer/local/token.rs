//! The token format: PASETO `v4.local` with the claims of IVS Chat's CreateChatToken, the key's PASERK
//! id in the footer, and an implicit assertion binding it to this purpose. Encrypting and verifying
//! live here; which key encrypts is [`super::keys`]' business.

use std::{
    collections::BTreeMap,
    time::{Duration, SystemTime},
};

use pasetors::{
    Local,
    footer::Footer,
    token::UntrustedToken,
    version4::{LocalToken, V4},
};
use serde::{Deserialize, Serialize, Serializer};
use time::OffsetDateTime;

use super::keys::KeySet;
use crate::domain::{
    Attributes, Capabilities, Capability, RoomArn, TokenClaims, TokenRejection, UserId,
};

/// Bound into every token's authentication tag, so a v4.local token minted by another system with the
/// same key can never pass as a chat token. Verifiers must supply the same bytes; [`KeySet::verify`] does.
pub const IMPLICIT_ASSERTION: &[u8] = b"ivschat.v1.ChatToken";

/// How far a verifier's clock may be off the issuer's: a token is accepted from this long before its
/// `nbf` (its issue time) until this long after its `exp`. Without it a verifier whose clock runs a second
/// behind would refuse tokens minted that very second.
pub const VERIFY_LEEWAY: Duration = Duration::from_secs(5);

impl KeySet {
    /// Decrypts and authenticates `token`, checks it is within its validity period (give or take
    /// [`VERIFY_LEEWAY`]), and returns what it grants.
    pub fn verify(&self, token: &str) -> Result<TokenClaims, VerifyError> {
        self.verify_at(token, OffsetDateTime::now_utc())
    }

    pub(super) fn verify_at(
        &self,
        token: &str,
        now: OffsetDateTime,
    ) -> Result<TokenClaims, VerifyError> {
        let claims = self.open(token)?;
        check_times(&claims, now.into())?;
        Ok(claims)
    }

    /// Decrypts and authenticates `token` and returns its claims, whatever their times: VerifyChatToken
    /// checks those ([`check_times`]) only once policy has allowed the caller to learn them.
    pub fn open(&self, token: &str) -> Result<TokenClaims, VerifyError> {
        let untrusted =
            UntrustedToken::<Local, V4>::try_from(token).map_err(|_| VerifyError::Malformed)?;
        let mut footer = Footer::new();
        footer
            .parse_bytes(untrusted.untrusted_footer())
            .map_err(|_| VerifyError::Malformed)?;
        let kid = footer
            .get_claim("kid")
            .and_then(|v| v.as_str())
            .ok_or(VerifyError::Malformed)?;
        let key = self.find(kid).ok_or(VerifyError::UnknownKey)?;

        // The lower-level decrypt: it authenticates and decrypts but checks no claims (pasetors' own
        // check of `exp` reads the real clock and allows no leeway); validity is checked by
        // `check_times`, with our leeway.
        let trusted = LocalToken::decrypt(&key.key, &untrusted, None, Some(IMPLICIT_ASSERTION))
            .map_err(|_| VerifyError::Forged)?;
        let payload: Payload =
            serde_json::from_str(trusted.payload()).map_err(|_| VerifyError::Claims)?;
        // This issuer writes `nbf` as `iat` truncated to the second, which `check_times` relies on.
        if Ok(payload.nbf) != payload.iat.replace_nanosecond(0) {
            return Err(VerifyError::Claims);
        }
        payload.into_claims()
    }

    /// Encrypts `claims` with the active key, naming the key in the footer.
    ///
    /// The claims are serialised once, straight into the payload (pasetors' `Claims` would parse them
    /// into a map of JSON values and serialise them again); the footer is the key's, built with it. The
    /// encryption is [`super::paseto`]'s; pasetors decrypts.
    pub(super) fn encrypt(
        &self,
        claims: &NewClaims<'_>,
    ) -> Result<String, pasetors::errors::Error> {
        // Sized for the claims of a typical token, so the buffer is not grown while writing them.
        let mut payload = Vec::with_capacity(PAYLOAD_CAPACITY);
        serde_json::to_writer(&mut payload, claims)
            .map_err(|_| pasetors::errors::Error::InvalidClaim)?;
        Ok(self.active().sealer.seal(&payload, IMPLICIT_ASSERTION))
    }
}

/// Whether authentic `claims` are valid at `now`: from [`VERIFY_LEEWAY`] before their `nbf` (which this
/// issuer writes as `iat` truncated to the second)
/// until [`VERIFY_LEEWAY`] after their expiry, that instant excluded. The last instant a token verifies is
/// just before `token_expires_at + VERIFY_LEEWAY`; whatever must outlive a token (a used-token record, a
/// revocation) must be kept until then.
pub fn check_times(claims: &TokenClaims, now: SystemTime) -> Result<(), VerifyError> {
    let since_epoch = claims
        .issued_at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let not_before = SystemTime::UNIX_EPOCH + Duration::from_secs(since_epoch.as_secs());
    if now + VERIFY_LEEWAY < not_before {
        return Err(VerifyError::NotYetValid);
    }
    if now >= claims.token_expires_at + VERIFY_LEEWAY {
        return Err(VerifyError::Expired);
    }
    Ok(())
}

/// Why a token was refused. Deliberately coarse: a verifier should not help a forger.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// Not a v4.local token with a `kid` footer.
    #[error("not a well-formed v4.local chat token")]
    Malformed,
    /// The `kid` names no key of this key set.
    #[error("token was encrypted with a key this key set does not hold")]
    UnknownKey,
    /// Decryption or authentication failed: wrong key, tampering or wrong purpose.
    #[error("token failed authentication")]
    Forged,
    /// Authentic, but the claims are not what this issuer writes.
    #[error("token claims are not valid chat token claims")]
    Claims,
    /// The token's `nbf` is further in the future than the leeway allows.
    #[error("token is not valid yet")]
    NotYetValid,
    /// The token's `exp` has passed, by more than the leeway.
    #[error("token has expired")]
    Expired,
}

impl From<VerifyError> for TokenRejection {
    fn from(error: VerifyError) -> Self {
        match error {
            VerifyError::Malformed => TokenRejection::Malformed,
            VerifyError::UnknownKey => TokenRejection::UnknownKey,
            VerifyError::Forged | VerifyError::Claims => TokenRejection::Tampered,
            VerifyError::NotYetValid => TokenRejection::NotYetValid,
            VerifyError::Expired => TokenRejection::Expired,
        }
    }
}

/// The claims of a token being minted, borrowed from its request: the [`Payload`] a verifier reads.
#[derive(Serialize)]
pub(super) struct NewClaims<'a> {
    pub(super) jti: &'a str,
    #[serde(serialize_with = "rfc3339")]
    pub(super) iat: OffsetDateTime,
    #[serde(serialize_with = "rfc3339")]
    pub(super) nbf: OffsetDateTime,
    #[serde(serialize_with = "rfc3339")]
    pub(super) exp: OffsetDateTime,
    #[serde(rename = "roomArn")]
    pub(super) room_arn: &'a str,
    #[serde(rename = "userId")]
    pub(super) user_id: &'a str,
    #[serde(serialize_with = "ivs_names")]
    pub(super) capabilities: &'a Capabilities,
    pub(super) attributes: &'a BTreeMap<String, String>,
    #[serde(rename = "sessionExpirationTime", serialize_with = "rfc3339")]
    pub(super) session_expiration_time: OffsetDateTime,
}

/// What the claims' JSON is written into: room for a token's fixed claims, an ARN and a user id with a
/// few attributes; larger claims grow it.
const PAYLOAD_CAPACITY: usize = 512;

/// An instant as RFC 3339, byte for byte as `time::serde::rfc3339` writes it in UTC (`Z`, the fraction of
/// a second without trailing zeros, none when whole), without its formatting machinery and allocation.
/// Anything else (another offset, a year outside 0–9999) goes to `time`'s own, which refuses such years.
fn rfc3339<S: Serializer>(at: &OffsetDateTime, serializer: S) -> Result<S::Ok, S::Error> {
    let mut text = [0u8; RFC3339_MAX];
    match write_rfc3339(*at, &mut text) {
        Some(len) => serializer
            .serialize_str(std::str::from_utf8(&text[..len]).expect("RFC 3339 digits are ASCII")),
        None => time::serde::rfc3339::serialize(at, serializer),
    }
}

/// `YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ`, the longest [`write_rfc3339`] writes.
const RFC3339_MAX: usize = 30;

/// Writes `at` into `text` as [`rfc3339`] describes and returns its length; `None` when `at` is not in
/// UTC or its year is outside 0–9999.
fn write_rfc3339(at: OffsetDateTime, text: &mut [u8; RFC3339_MAX]) -> Option<usize> {
    let year = at.year();
    if !at.offset().is_utc() || !(0..10_000).contains(&year) {
        return None;
    }
    let two_digits = |text: &mut [u8; RFC3339_MAX], at: usize, n: u32| {
        text[at] = b'0' + (n / 10) as u8;
        text[at + 1] = b'0' + (n % 10) as u8;
    };
    let year = year.unsigned_abs();
    let (hour, minute, second, nanos) = at.to_hms_nano();
    two_digits(text, 0, year / 100);
    two_digits(text, 2, year % 100);
    text[4] = b'-';
    two_digits(text, 5, u8::from(at.month()).into());
    text[7] = b'-';
    two_digits(text, 8, at.day().into());
    text[10] = b'T';
    two_digits(text, 11, hour.into());
    text[13] = b':';
    two_digits(text, 14, minute.into());
    text[16] = b':';
    two_digits(text, 17, second.into());
    let mut len = 19;
    if nanos != 0 {
        text[len] = b'.';
        let mut digits = [0u8; 9];
        let mut rest = nanos;
        for digit in digits.iter_mut().rev() {
            *digit = b'0' + (rest % 10) as u8;
            rest /= 10;
        }
        let trailing_zeros = digits.iter().rev().take_while(|&&d| d == b'0').count();
        let kept = digits.len() - trailing_zeros;
        text[len + 1..len + 1 + kept].copy_from_slice(&digits[..kept]);
        len += 1 + kept;
    }
    text[len] = b'Z';
    Some(len + 1)
}

/// Capabilities as IVS Chat names them, `["SEND_MESSAGE", …]`.
fn ivs_names<S: Serializer>(
    capabilities: &&Capabilities,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_seq(capabilities.iter().map(Capability::ivs_name))
}

/// The token's claims as they appear in the PASETO payload. Names follow IVS Chat's API.
#[derive(Deserialize)]
pub(super) struct Payload {
    pub(super) jti: String,
    #[serde(with = "time::serde::rfc3339")]
    pub(super) iat: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub(super) nbf: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub(super) exp: OffsetDateTime,
    #[serde(rename = "roomArn")]
    pub(super) room_arn: String,
    #[serde(rename = "userId")]
    pub(super) user_id: String,
    pub(super) capabilities: Vec<String>,
    pub(super) attributes: BTreeMap<String, String>,
    #[serde(rename = "sessionExpirationTime", with = "time::serde::rfc3339")]
    pub(super) session_expiration_time: OffsetDateTime,
}

impl Payload {
    fn into_claims(self) -> Result<TokenClaims, VerifyError> {
        let capabilities = self
            .capabilities
            .iter()
            .map(|name| Capability::from_ivs_name(name).ok_or(VerifyError::Claims))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(TokenClaims {
            token_id: self.jti,
            room: RoomArn::parse(&self.room_arn).map_err(|_| VerifyError::Claims)?,
            user_id: UserId::parse(self.user_id).map_err(|_| VerifyError::Claims)?,
            capabilities: Capabilities::new(capabilities),
            attributes: Attributes::parse(self.attributes).map_err(|_| VerifyError::Claims)?,
            issued_at: self.iat.into(),
            token_expires_at: self.exp.into(),
            session_expires_at: self.session_expiration_time.into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Claims issued at `issued_at`, their token living `ttl`.
    fn claims(issued_at: SystemTime, ttl: Duration) -> TokenClaims {
        TokenClaims {
            token_id: "t".into(),
            room: RoomArn::parse("arn:aws:ivschat:us-west-2:123456789012:room/r").unwrap(),
            user_id: UserId::parse("u".into()).unwrap(),
            capabilities: Default::default(),
            attributes: Default::default(),
            issued_at,
            token_expires_at: issued_at + ttl,
            session_expires_at: issued_at + ttl,
        }
    }

    const ONE_NS: Duration = Duration::from_nanos(1);

    #[test]
    fn a_token_verifies_from_leeway_before_nbf_until_leeway_after_exp_that_instant_excluded() {
        // Issued 0.7 s into a second: `nbf` is that whole second.
        let nbf = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let issued_at = nbf + Duration::from_millis(700);
        let claims = claims(issued_at, Duration::from_secs(60));
        let exp = claims.token_expires_at;

        let at = |now| check_times(&claims, now);
        assert_eq!(
            at(nbf - VERIFY_LEEWAY - ONE_NS),
            Err(VerifyError::NotYetValid)
        );
        assert_eq!(at(nbf - VERIFY_LEEWAY), Ok(()));
        assert_eq!(at(issued_at), Ok(()));
        assert_eq!(at(exp), Ok(()));
        assert_eq!(at(exp + VERIFY_LEEWAY - ONE_NS), Ok(()));
        assert_eq!(at(exp + VERIFY_LEEWAY), Err(VerifyError::Expired));
        assert_eq!(at(exp + VERIFY_LEEWAY + ONE_NS), Err(VerifyError::Expired));
    }

    /// `rfc3339` writes exactly what `time::serde::rfc3339` writes: at the ends of its year range, across
    /// leap days and month ends, every count of trailing zeros in the fraction, and 10,000 instants spread
    /// over 1970–2300; years it cannot write and other offsets go to `time` itself.
    #[test]
    fn rfc3339_writes_what_time_writes() {
        let ours = |at: OffsetDateTime| {
            let mut out = Vec::new();
            rfc3339(&at, &mut serde_json::Serializer::new(&mut out)).map(|()| out)
        };
        let times = |at: OffsetDateTime| {
            let mut out = Vec::new();
            time::serde::rfc3339::serialize(&at, &mut serde_json::Serializer::new(&mut out))
                .map(|()| out)
        };
        let same = |at: OffsetDateTime| {
            let expected = times(at).unwrap();
            assert_eq!(
                String::from_utf8(ours(at).unwrap()).unwrap(),
                String::from_utf8(expected).unwrap(),
                "{at:?}"
            );
        };
        let utc = |seconds: i64, nanos: u32| {
            OffsetDateTime::from_unix_timestamp(seconds).unwrap()
                + time::Duration::nanoseconds(nanos.into())
        };
        // 0000-01-01T00:00:00Z and 9999-12-31T23:59:59.999999999Z, the ends of RFC 3339's years.
        same(utc(-62_167_219_200, 0));
        same(utc(253_402_300_799, 999_999_999));
        // 2000-02-29, 2100-02-28/03-01 (no leap day), 2024-12-31/2025-01-01, one second either side.
        for midnight in [951_782_400, 4_107_542_400, 1_735_689_600] {
            for offset in [-1, 0, 1] {
                same(utc(midnight + offset, 0));
            }
        }
        let mut nanos = 123_456_789;
        for _ in 0..10 {
            same(utc(1_800_000_000, nanos));
            nanos /= 10;
        }
        for nanos in [1, 10, 100_000_000, 120_000_000, 999_999_990] {
            same(utc(1_800_000_000, nanos));
        }
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        for _ in 0..10_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let seconds = (seed % 10_413_792_000) as i64; // 1970 to 2300
            same(utc(seconds, (seed >> 34) as u32 % 1_000_000_000));
        }

        // -0001-12-31T23:59:59Z: a year RFC 3339 cannot write, refused by both.
        let year_minus_1 = utc(-62_167_219_201, 0);
        assert!(times(year_minus_1).is_err() && ours(year_minus_1).is_err());
        let east = utc(1_800_000_000, 5).to_offset(time::macros::offset!(+05:30));
        assert_eq!(ours(east).unwrap(), times(east).unwrap());
        assert!(
            String::from_utf8(ours(east).unwrap())
                .unwrap()
                .ends_with("+05:30\"")
        );
    }
}
