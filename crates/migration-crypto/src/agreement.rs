//! Per-migration key agreement: ephemeral X25519, then HKDF-SHA256 into a sealing [`Key`].
//!
//! See the crate documentation ("Per-migration keys") for the derivation.

use std::fmt;

use ring::agreement::{self, EphemeralPrivateKey, UnparsedPublicKey, X25519};
use ring::hkdf;
use ring::rand::SystemRandom;
use zeroize::Zeroizing;

use crate::key::{CryptoError, Key};

/// HKDF salt of the agreement: names the scheme and its version.
const AGREEMENT_SALT: &[u8] = b"migration-crypto agreement v1";

/// Length of an X25519 public key, and of the shared secret.
pub const AGREEMENT_PUBLIC_KEY_LEN: usize = 32;

/// Agreeing on a key with a peer's public key failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AgreementError {
    /// The peer's public key does not have [`AGREEMENT_PUBLIC_KEY_LEN`] bytes.
    #[error("peer public key must be {expected} bytes, found {found}")]
    WrongLength {
        /// Required length in bytes.
        expected: usize,
        /// Length given.
        found: usize,
    },
    /// X25519 refused the peer's public key: a point of small order (all zeros among them),
    /// whose shared secret would be all zeros whatever our private key.
    #[error("peer public key rejected by X25519 (a point of small order)")]
    RejectedPublicKey,
    /// The peer's public key is our own: a reflected handshake, not a peer.
    #[error("peer public key is our own public key (reflected)")]
    Reflected,
}

/// One side of a per-migration key agreement: an ephemeral X25519 key pair.
///
/// Each side calls [`KeyAgreement::generate`], sends [`KeyAgreement::public_key`] to the other
/// (over an authenticated channel: mutual TLS between the agents), and calls
/// [`KeyAgreement::agree`] with the peer's public key and the same `context`. Both derive the
/// same [`Key`], whichever side calls first. The private key is used once: `agree` consumes it.
///
/// ```
/// use migration_crypto::KeyAgreement;
///
/// let (source, target) = (KeyAgreement::generate()?, KeyAgreement::generate()?);
/// let (source_public, target_public) = (source.public_key(), target.public_key());
/// let context = b"migration 7f3a: host-a -> host-b";
/// let at_source = source.agree(&target_public, context)?;
/// let at_target = target.agree(&source_public, context)?;
/// assert_eq!(at_source.id(), at_target.id());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct KeyAgreement {
    private: EphemeralPrivateKey,
    public: [u8; AGREEMENT_PUBLIC_KEY_LEN],
}

impl KeyAgreement {
    /// A fresh ephemeral X25519 key pair from the system random number generator.
    pub fn generate() -> Result<KeyAgreement, CryptoError> {
        let rng = SystemRandom::new();
        let private =
            EphemeralPrivateKey::generate(&X25519, &rng).map_err(|_| CryptoError::Random)?;
        let computed = private
            .compute_public_key()
            .map_err(|_| CryptoError::PublicKey)?;
        let public: [u8; AGREEMENT_PUBLIC_KEY_LEN] = computed
            .as_ref()
            .try_into()
            .map_err(|_| CryptoError::PublicKey)?;
        Ok(KeyAgreement { private, public })
    }

    /// Our public key, to send to the peer.
    pub fn public_key(&self) -> [u8; AGREEMENT_PUBLIC_KEY_LEN] {
        self.public
    }

    /// Derives the shared [`Key`] from the peer's public key, binding both public keys and
    /// `context` (the migration id and the two hosts' names, say).
    ///
    /// `HKDF-SHA256(salt = "migration-crypto agreement v1",
    /// ikm = X25519 secret || lower public key || higher public key, info = context)`, the two
    /// public keys in byte order so that both sides build the same input. Refuses a key of the
    /// wrong length, a point of small order (X25519 gives the all-zero secret) and our own
    /// public key, each with its own [`AgreementError`]; never panics on any input.
    pub fn agree(self, peer_public: &[u8], context: &[u8]) -> Result<Key, AgreementError> {
        let peer: &[u8; AGREEMENT_PUBLIC_KEY_LEN] =
            peer_public
                .try_into()
                .map_err(|_| AgreementError::WrongLength {
                    expected: AGREEMENT_PUBLIC_KEY_LEN,
                    found: peer_public.len(),
                })?;
        if *peer == self.public {
            return Err(AgreementError::Reflected);
        }
        let (low, high) = if self.public < *peer {
            (&self.public, peer)
        } else {
            (peer, &self.public)
        };
        let okm = agreement::agree_ephemeral(
            self.private,
            &UnparsedPublicKey::new(&X25519, peer),
            |secret| derive(secret, low, high, context),
        )
        .map_err(|_| AgreementError::RejectedPublicKey)?;
        Ok(Key::from_array(&okm))
    }
}

/// HKDF over the shared secret and both public keys; every copy of secret bytes is zeroized.
fn derive(
    secret: &[u8],
    low: &[u8; AGREEMENT_PUBLIC_KEY_LEN],
    high: &[u8; AGREEMENT_PUBLIC_KEY_LEN],
    context: &[u8],
) -> Zeroizing<[u8; Key::LEN]> {
    let mut ikm = Zeroizing::new(Vec::with_capacity(
        secret.len() + 2 * AGREEMENT_PUBLIC_KEY_LEN,
    ));
    ikm.extend_from_slice(secret);
    ikm.extend_from_slice(low);
    ikm.extend_from_slice(high);
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, AGREEMENT_SALT).extract(&ikm);
    let mut okm = Zeroizing::new([0u8; Key::LEN]);
    // expand and fill only fail if the requested length exceeds 255 * 32 bytes; a key is 32.
    #[allow(clippy::expect_used)]
    prk.expand(&[context], hkdf::HKDF_SHA256)
        .and_then(|o| o.fill(okm.as_mut()))
        .expect("HKDF-SHA256 can always produce 32 bytes");
    okm
}

impl fmt::Debug for KeyAgreement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut public = String::with_capacity(2 * AGREEMENT_PUBLIC_KEY_LEN);
        for b in self.public {
            public.push_str(&format!("{b:02x}"));
        }
        f.debug_struct("KeyAgreement")
            .field("public", &public)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seal::{OpenError, Opener, Sealer};
    use proptest::prelude::*;

    const CTX: &[u8] = b"migration 42: host-a -> host-b";

    fn pair(ctx_a: &[u8], ctx_b: &[u8]) -> (Key, Key) {
        let a = KeyAgreement::generate().unwrap();
        let b = KeyAgreement::generate().unwrap();
        let (pa, pb) = (a.public_key(), b.public_key());
        (a.agree(&pb, ctx_a).unwrap(), b.agree(&pa, ctx_b).unwrap())
    }

    fn seal(key: &Key, pt: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        Sealer::new(key)
            .unwrap()
            .seal(b"aad", pt, &mut out)
            .unwrap();
        out
    }

    #[test]
    fn both_sides_derive_the_same_key_and_can_seal_and_open() {
        for _ in 0..8 {
            let (ka, kb) = pair(CTX, CTX);
            assert_eq!(ka.as_bytes(), kb.as_bytes());
            assert_eq!(ka.id(), kb.id());
            // a seals, b opens, and the reverse.
            let mut pt = Vec::new();
            Opener::new(&kb)
                .open(b"aad", &seal(&ka, b"pages"), &mut pt)
                .unwrap();
            assert_eq!(pt, b"pages");
            pt.clear();
            Opener::new(&ka)
                .open(b"aad", &seal(&kb, b"back"), &mut pt)
                .unwrap();
            assert_eq!(pt, b"back");
        }
    }

    #[test]
    fn matches_the_documented_derivation() {
        // Rebuild the key from the scheme in the docs with ring's primitives directly.
        let a = KeyAgreement::generate().unwrap();
        let b = KeyAgreement::generate().unwrap();
        let (pa, pb) = (a.public_key(), b.public_key());
        let (low, high) = if pa < pb { (pa, pb) } else { (pb, pa) };
        let key = a.agree(&pb, CTX).unwrap();
        // b's secret, computed through ring, then the documented HKDF.
        let expected = agreement::agree_ephemeral(
            b.private,
            &UnparsedPublicKey::new(&X25519, &pa),
            |secret| {
                let mut ikm = secret.to_vec();
                ikm.extend_from_slice(&low);
                ikm.extend_from_slice(&high);
                let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"migration-crypto agreement v1")
                    .extract(&ikm);
                let mut okm = [0u8; 32];
                prk.expand(&[CTX], hkdf::HKDF_SHA256)
                    .unwrap()
                    .fill(&mut okm)
                    .unwrap();
                okm
            },
        )
        .unwrap();
        assert_eq!(key.as_bytes(), &expected);
    }

    #[test]
    fn another_context_gives_another_key() {
        let (ka, kb) = pair(b"migration 42: a -> b", b"migration 43: a -> b");
        assert_ne!(ka.as_bytes(), kb.as_bytes());
        let mut pt = Vec::new();
        let err = Opener::new(&kb)
            .open(b"aad", &seal(&ka, b"pages"), &mut pt)
            .unwrap_err();
        assert!(matches!(err, OpenError::WrongKey { .. }), "{err:?}");
        assert!(pt.is_empty());
        // The empty context is a context like any other.
        let (ka, kb) = pair(b"", b"");
        assert_eq!(ka.as_bytes(), kb.as_bytes());
    }

    #[test]
    fn a_third_partys_key_gives_another_key() {
        let a = KeyAgreement::generate().unwrap();
        let b = KeyAgreement::generate().unwrap();
        let mallory = KeyAgreement::generate().unwrap();
        let (pa, pb, pm) = (a.public_key(), b.public_key(), mallory.public_key());
        // a was given mallory's key instead of b's; b agrees with a's real key.
        let ka = a.agree(&pm, CTX).unwrap();
        let kb = b.agree(&pa, CTX).unwrap();
        let km = mallory.agree(&pb, CTX).unwrap();
        assert_ne!(ka.as_bytes(), kb.as_bytes());
        assert_ne!(km.as_bytes(), kb.as_bytes());
        let mut pt = Vec::new();
        let err = Opener::new(&kb)
            .open(b"aad", &seal(&ka, b"pages"), &mut pt)
            .unwrap_err();
        assert!(matches!(err, OpenError::WrongKey { .. }), "{err:?}");
        let err = Opener::new(&kb)
            .open(b"aad", &seal(&km, b"pages"), &mut pt)
            .unwrap_err();
        assert!(matches!(err, OpenError::WrongKey { .. }), "{err:?}");
    }

    #[test]
    fn public_keys_are_fresh() {
        let a = KeyAgreement::generate().unwrap();
        let b = KeyAgreement::generate().unwrap();
        assert_ne!(a.public_key(), b.public_key());
        assert_ne!(a.public_key(), [0u8; 32]);
    }

    #[test]
    fn bad_public_keys_are_typed_errors() {
        for len in [0usize, 1, 31, 33, 64] {
            let err = KeyAgreement::generate()
                .unwrap()
                .agree(&vec![9u8; len], CTX)
                .unwrap_err();
            assert_eq!(
                err,
                AgreementError::WrongLength {
                    expected: 32,
                    found: len
                }
            );
        }
        // Points of small order (RFC 7748 §6.1 asks to refuse the all-zero output they give):
        // 0, 1, a point of order 8, and p (which reduces to 0) and p + 1 (to 1).
        let mut small_order: Vec<[u8; 32]> = vec![[0u8; 32]];
        let mut one = [0u8; 32];
        one[0] = 1;
        small_order.push(one);
        small_order.push([
            0xe0, 0xeb, 0x7a, 0x7c, 0x3b, 0x41, 0xb8, 0xae, 0x16, 0x56, 0xe3, 0xfa, 0xf1, 0x9f,
            0xc4, 0x6a, 0xda, 0x09, 0x8d, 0xeb, 0x9c, 0x32, 0xb1, 0xfd, 0x86, 0x62, 0x05, 0x16,
            0x5f, 0x49, 0xb8, 0x00,
        ]);
        let mut p = [0xffu8; 32];
        p[0] = 0xed;
        p[31] = 0x7f;
        small_order.push(p);
        let mut p1 = p;
        p1[0] = 0xee;
        small_order.push(p1);
        for point in small_order {
            let err = KeyAgreement::generate()
                .unwrap()
                .agree(&point, CTX)
                .unwrap_err();
            assert_eq!(err, AgreementError::RejectedPublicKey, "{point:02x?}");
        }
    }

    #[test]
    fn our_own_public_key_is_refused() {
        let a = KeyAgreement::generate().unwrap();
        let own = a.public_key();
        assert_eq!(a.agree(&own, CTX).unwrap_err(), AgreementError::Reflected);
    }

    #[test]
    fn debug_shows_only_the_public_key() {
        let a = KeyAgreement::generate().unwrap();
        let dbg = format!("{a:?}");
        let hex: String = a.public_key().iter().map(|b| format!("{b:02x}")).collect();
        assert!(dbg.contains(&hex), "{dbg}");
        assert!(dbg.starts_with("KeyAgreement"), "{dbg}");
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let e = AgreementError::WrongLength {
            expected: 32,
            found: 31,
        };
        assert_eq!(e.to_string(), "peer public key must be 32 bytes, found 31");
        assert!(
            AgreementError::RejectedPublicKey
                .to_string()
                .contains("small order")
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn prop_arbitrary_peer_keys_never_panic(
            peer in proptest::collection::vec(any::<u8>(), 0..80),
            ctx in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let a = KeyAgreement::generate().unwrap();
            match a.agree(&peer, &ctx) {
                Ok(_) => prop_assert_eq!(peer.len(), 32),
                Err(AgreementError::WrongLength { found, .. }) => {
                    prop_assert_ne!(peer.len(), 32);
                    prop_assert_eq!(found, peer.len());
                }
                Err(AgreementError::RejectedPublicKey | AgreementError::Reflected) => {
                    prop_assert_eq!(peer.len(), 32)
                }
            }
        }

        #[test]
        fn prop_arbitrary_32_byte_keys_agree_or_are_refused(peer in any::<[u8; 32]>()) {
            let a = KeyAgreement::generate().unwrap();
            match a.agree(&peer, CTX) {
                Ok(_) | Err(AgreementError::RejectedPublicKey) => {}
                Err(e) => prop_assert!(false, "unexpected {e:?}"),
            }
        }
    }
}
