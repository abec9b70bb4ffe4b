//! jsonwebtoken's signature checks on ring: the three algorithms end-user tokens may use, verification only.
//!
//! jsonwebtoken leaves its cryptography to a `CryptoProvider`; its own two are aws-lc-rs (refused in this
//! tree) and RustCrypto (a second set of RSA and elliptic-curve crates). ring, which rustls already
//! compiles in, verifies the same signatures. Everything else (parsing, JWKs, claim checks) stays
//! jsonwebtoken's.

use jsonwebtoken::{
    Algorithm, AlgorithmFamily, DecodingKey, DecodingKeyKind, EncodingKey,
    crypto::{CryptoProvider, JwtSigner, JwtVerifier, KeyUtils},
    errors::{Error, ErrorKind},
    jwk::{EllipticCurve, ThumbprintHash},
    signature,
};
use ring::signature::{
    ECDSA_P256_SHA256_FIXED, ED25519, RSA_PKCS1_2048_8192_SHA256, RsaPublicKeyComponents,
    UnparsedPublicKey, VerificationAlgorithm,
};

/// The provider: RS256, ES256 and EdDSA verifiers; nothing signs.
pub(super) static RING: CryptoProvider = CryptoProvider {
    signer_factory: no_signer,
    verifier_factory: verifier,
    key_utils: KeyUtils {
        rsa_pub_components_from_private_key: |_| {
            Err(ErrorKind::InvalidRsaKey(NO_KEYS.into()).into())
        },
        rsa_pub_components_from_public_key: |_| Err(ErrorKind::InvalidRsaKey(NO_KEYS.into()).into()),
        ec_pub_components_from_private_key: |_, _| Err(ErrorKind::InvalidEcdsaKey.into()),
        ed_pub_components_from_private_key: |_, _: &EllipticCurve| {
            Err(ErrorKind::InvalidEddsaKey.into())
        },
        compute_digest,
    },
};

const NO_KEYS: &str = "this service only verifies end-user tokens";

/// Makes [`RING`] jsonwebtoken's provider for this process. True when it is (installed now or before);
/// false when something else installed another first.
pub(super) fn install() -> bool {
    let _ = RING.install_default();
    CryptoProvider::try_get_default().is_some_and(|installed| std::ptr::eq(installed, &RING))
}

fn no_signer(_: &Algorithm, _: &EncodingKey) -> Result<Box<dyn JwtSigner>, Error> {
    Err(ErrorKind::InvalidAlgorithm.into())
}

fn compute_digest(data: &[u8], hash: ThumbprintHash) -> Result<Vec<u8>, Error> {
    let algorithm = match hash {
        ThumbprintHash::SHA256 => &ring::digest::SHA256,
        ThumbprintHash::SHA384 => &ring::digest::SHA384,
        ThumbprintHash::SHA512 => &ring::digest::SHA512,
        _ => return Err(ErrorKind::InvalidAlgorithm.into()),
    };
    Ok(ring::digest::digest(algorithm, data).as_ref().to_vec())
}

/// A verifier for `algorithm` with `key`, when the key is of the algorithm's family; HMAC, `none` and
/// every other algorithm are refused here whatever the validation allows.
fn verifier(algorithm: &Algorithm, key: &DecodingKey) -> Result<Box<dyn JwtVerifier>, Error> {
    let (family, ring_algorithm): (_, &'static dyn VerificationAlgorithm) = match algorithm {
        Algorithm::RS256 => (AlgorithmFamily::Rsa, &RSA_PKCS1_2048_8192_SHA256),
        Algorithm::ES256 => (AlgorithmFamily::Ec, &ECDSA_P256_SHA256_FIXED),
        Algorithm::EdDSA => (AlgorithmFamily::Ed, &ED25519),
        _ => return Err(ErrorKind::InvalidAlgorithm.into()),
    };
    if key.family() != family {
        return Err(ErrorKind::InvalidKeyFormat.into());
    }
    Ok(Box::new(RingVerifier {
        algorithm: *algorithm,
        ring_algorithm,
        key: key.clone(),
    }))
}

struct RingVerifier {
    algorithm: Algorithm,
    ring_algorithm: &'static dyn VerificationAlgorithm,
    key: DecodingKey,
}

impl signature::Verifier<Vec<u8>> for RingVerifier {
    fn verify(&self, message: &[u8], signature: &Vec<u8>) -> Result<(), signature::Error> {
        let verified = match (self.key.kind(), self.algorithm) {
            (DecodingKeyKind::RsaModulusExponent { n, e }, Algorithm::RS256) => {
                RsaPublicKeyComponents { n, e }.verify(
                    &RSA_PKCS1_2048_8192_SHA256,
                    message,
                    signature,
                )
            }
            // An EC key from a JWK is the uncompressed point; an Ed25519 key the 32 public bytes.
            (DecodingKeyKind::SecretOrDer(bytes), _) => {
                UnparsedPublicKey::new(self.ring_algorithm, bytes).verify(message, signature)
            }
            _ => return Err(signature::Error::new()),
        };
        verified.map_err(|_| signature::Error::new())
    }
}

impl JwtVerifier for RingVerifier {
    fn algorithm(&self) -> Algorithm {
        self.algorithm
    }
}
