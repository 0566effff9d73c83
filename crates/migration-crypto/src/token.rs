//! HMAC-SHA256 migration tokens, their verifier and the replay cache.
//!
//! Token encoding (integers big-endian):
//!
//! ```text
//! version u8 (=1) | migration_id [16] | issued_at u64 | expires_at u64
//!   | source_len u8 | source (UTF-8) | target_len u8 | target (UTF-8) | tag [32]
//! ```
//!
//! `tag = HMAC-SHA256(token key, everything before the tag)`. The encoding is
//! canonical: one set of claims has exactly one encoding, and trailing bytes
//! are rejected.

use std::collections::{BTreeSet, HashSet};
use std::fmt;
use std::time::Duration;

use ring::hmac;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::key::{CryptoError, KeyError, KeyId, derive_id, fill_random};

/// Version byte of the token encoding.
pub const TOKEN_VERSION: u8 = 1;
/// Length of the HMAC-SHA256 tag ending a token.
pub const TOKEN_TAG_LEN: usize = 32;
/// Maximum length in bytes of the `source` and `target` claims.
pub const MAX_FIELD_LEN: usize = 255;
/// Fixed part of the encoding: version, id, two times, two length bytes.
const FIXED_LEN: usize = 1 + 16 + 8 + 8 + 1 + 1;
/// Shortest possible token (empty source and target).
const MIN_TOKEN_LEN: usize = FIXED_LEN + TOKEN_TAG_LEN;
/// Longest possible token.
pub const MAX_TOKEN_LEN: usize = FIXED_LEN + 2 * MAX_FIELD_LEN + TOKEN_TAG_LEN;

/// Label HMAC'd with a token key to derive its id.
const TOKEN_KEY_ID_LABEL: &[u8] = b"migration-crypto token-key-id v1";

/// A claim bound by a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TokenField {
    /// The host the process migrates from.
    Source,
    /// The host the process migrates to.
    Target,
}

impl fmt::Display for TokenField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TokenField::Source => "source",
            TokenField::Target => "target",
        })
    }
}

/// Issuing or verifying a token failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// The bytes are not a well-formed token.
    #[error("malformed migration token: {reason}")]
    Malformed {
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The MAC does not match: the token was forged, altered, or issued
    /// under another key.
    #[error("migration token MAC check failed")]
    Forged,
    /// The token is valid but for another source or target.
    #[error("migration token is bound to another {field}")]
    WrongBinding {
        /// The claim that differs.
        field: TokenField,
    },
    /// `issued_at` is later than `now` plus the clock-skew leeway.
    #[error("migration token not valid before {issued_at} (now {now})")]
    NotYetValid {
        /// The token's `issued_at`.
        issued_at: u64,
        /// The caller's `now`.
        now: u64,
    },
    /// `now` is at or past `expires_at` plus the clock-skew leeway.
    #[error("migration token expired at {expires_at} (now {now})")]
    Expired {
        /// The token's `expires_at`.
        expires_at: u64,
        /// The caller's `now`.
        now: u64,
    },
    /// This token was already accepted once.
    #[error("migration token already used")]
    Replayed,
    /// The replay cache is full of unexpired tokens; the token is refused
    /// rather than forgetting one that could then be replayed.
    #[error("replay cache full ({capacity} unexpired tokens); refusing")]
    ReplayCacheFull {
        /// The cache's capacity.
        capacity: usize,
    },
    /// [`issue_token`]: a claim is longer than [`MAX_FIELD_LEN`] bytes.
    #[error("token {field} is {len} bytes, more than {max}")]
    FieldTooLong {
        /// The claim.
        field: TokenField,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// [`issue_token`]: `expires_at` is not after `issued_at`.
    #[error("token expires_at {expires_at} is not after issued_at {issued_at}")]
    InvalidLifetime {
        /// The claim's `issued_at`.
        issued_at: u64,
        /// The claim's `expires_at`.
        expires_at: u64,
    },
}

/// What a migration token asserts. Times are unix seconds.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct TokenClaims {
    /// Unique id of this migration; make it random so that two tokens
    /// never share a tag (the replay cache keys on the tag).
    pub migration_id: [u8; 16],
    /// The host migrated from (at most [`MAX_FIELD_LEN`] bytes).
    pub source: String,
    /// The host migrated to (at most [`MAX_FIELD_LEN`] bytes).
    pub target: String,
    /// When the token was issued.
    pub issued_at: u64,
    /// When the token stops being valid.
    pub expires_at: u64,
}

/// An HMAC-SHA256 key for tokens, at least 32 bytes. Zeroized on drop;
/// `Debug` shows only an id.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct TokenKey {
    bytes: Vec<u8>,
    #[zeroize(skip)]
    id: KeyId,
}

impl TokenKey {
    /// Minimum key length in bytes.
    pub const MIN_LEN: usize = 32;

    /// Generates a random 32-byte key.
    pub fn generate() -> Result<TokenKey, CryptoError> {
        let mut bytes = Zeroizing::new([0u8; TokenKey::MIN_LEN]);
        fill_random(bytes.as_mut())?;
        Ok(TokenKey::new_unchecked(bytes.as_ref()))
    }

    /// Builds a key from at least [`TokenKey::MIN_LEN`] bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<TokenKey, KeyError> {
        if bytes.len() < TokenKey::MIN_LEN {
            return Err(KeyError::TooShort {
                min: TokenKey::MIN_LEN,
                found: bytes.len(),
            });
        }
        Ok(TokenKey::new_unchecked(bytes))
    }

    fn new_unchecked(bytes: &[u8]) -> TokenKey {
        TokenKey {
            bytes: bytes.to_vec(),
            id: KeyId(derive_id(bytes, TOKEN_KEY_ID_LABEL)),
        }
    }

    /// An id for the key, safe to log.
    pub fn id(&self) -> KeyId {
        self.id
    }

    /// The key's bytes, for writing its file.
    pub(crate) fn secret_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// ring's HMAC key, built per operation so the expanded pads live only
    /// briefly.
    fn hmac_key(&self) -> hmac::Key {
        hmac::Key::new(hmac::HMAC_SHA256, &self.bytes)
    }
}

impl fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenKey")
            .field("id", &format_args!("{}", self.id))
            .finish()
    }
}

/// An encoded, MAC'd token. Treat it as a bearer credential: `Debug`
/// shows only its length.
#[derive(Clone, PartialEq, Eq)]
pub struct MigrationToken(Vec<u8>);

impl MigrationToken {
    /// Wraps received bytes after checking that they are well formed (the
    /// MAC is checked only by [`TokenVerifier::verify`]).
    pub fn from_bytes(bytes: &[u8]) -> Result<MigrationToken, TokenError> {
        parse(bytes)?;
        Ok(MigrationToken(bytes.to_vec()))
    }

    /// The encoded token.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The encoded token, by value.
    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }
}

impl fmt::Debug for MigrationToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MigrationToken")
            .field("len", &self.0.len())
            .finish_non_exhaustive()
    }
}

fn check_field(field: TokenField, value: &str) -> Result<u8, TokenError> {
    u8::try_from(value.len()).map_err(|_| TokenError::FieldTooLong {
        field,
        len: value.len(),
        max: MAX_FIELD_LEN,
    })
}

/// Issues a token for `claims` under `key`.
pub fn issue_token(key: &TokenKey, claims: &TokenClaims) -> Result<MigrationToken, TokenError> {
    let source_len = check_field(TokenField::Source, &claims.source)?;
    let target_len = check_field(TokenField::Target, &claims.target)?;
    if claims.expires_at <= claims.issued_at {
        return Err(TokenError::InvalidLifetime {
            issued_at: claims.issued_at,
            expires_at: claims.expires_at,
        });
    }
    let mut out = Vec::with_capacity(MIN_TOKEN_LEN + claims.source.len() + claims.target.len());
    out.push(TOKEN_VERSION);
    out.extend_from_slice(&claims.migration_id);
    out.extend_from_slice(&claims.issued_at.to_be_bytes());
    out.extend_from_slice(&claims.expires_at.to_be_bytes());
    out.push(source_len);
    out.extend_from_slice(claims.source.as_bytes());
    out.push(target_len);
    out.extend_from_slice(claims.target.as_bytes());
    let tag = hmac::sign(&key.hmac_key(), &out);
    out.extend_from_slice(tag.as_ref());
    Ok(MigrationToken(out))
}

/// A forward-only reader over token bytes.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], TokenError> {
        if self.rest.len() < n {
            return Err(TokenError::Malformed { reason: what });
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], TokenError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }

    fn string(&mut self, what: &'static str) -> Result<String, TokenError> {
        let [len] = self.array::<1>(what)?;
        let bytes = self.take(usize::from(len), what)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| TokenError::Malformed {
                reason: "claim is not UTF-8",
            })
    }
}

/// A structurally valid token: its claims, the MAC'd body and the tag.
struct Parsed<'a> {
    claims: TokenClaims,
    body: &'a [u8],
    tag: &'a [u8; TOKEN_TAG_LEN],
}

fn parse(bytes: &[u8]) -> Result<Parsed<'_>, TokenError> {
    if bytes.len() < MIN_TOKEN_LEN {
        return Err(TokenError::Malformed {
            reason: "too short",
        });
    }
    if bytes.len() > MAX_TOKEN_LEN {
        return Err(TokenError::Malformed { reason: "too long" });
    }
    let (body, tag) = bytes.split_at(bytes.len() - TOKEN_TAG_LEN);
    let tag: &[u8; TOKEN_TAG_LEN] = tag.try_into().map_err(|_| TokenError::Malformed {
        reason: "too short",
    })?;
    let mut r = Reader { rest: body };
    let [version] = r.array::<1>("truncated")?;
    if version != TOKEN_VERSION {
        return Err(TokenError::Malformed {
            reason: "unsupported version",
        });
    }
    let migration_id = r.array::<16>("truncated")?;
    let issued_at = u64::from_be_bytes(r.array::<8>("truncated")?);
    let expires_at = u64::from_be_bytes(r.array::<8>("truncated")?);
    let source = r.string("source length exceeds token")?;
    let target = r.string("target length exceeds token")?;
    if !r.rest.is_empty() {
        return Err(TokenError::Malformed {
            reason: "trailing bytes",
        });
    }
    Ok(Parsed {
        claims: TokenClaims {
            migration_id,
            source,
            target,
            issued_at,
            expires_at,
        },
        body,
        tag,
    })
}

/// Remembers accepted tokens (by tag) until they expire, with a hard
/// capacity. Times are unix seconds.
#[derive(Debug, Clone)]
pub struct ReplayCache {
    capacity: usize,
    seen: HashSet<[u8; TOKEN_TAG_LEN]>,
    /// `(forget_after, tag)`, ordered so expired entries pop first.
    by_expiry: BTreeSet<(u64, [u8; TOKEN_TAG_LEN])>,
}

impl ReplayCache {
    /// An empty cache holding at most `capacity` tokens (0 refuses all).
    pub fn new(capacity: usize) -> ReplayCache {
        ReplayCache {
            capacity,
            seen: HashSet::new(),
            by_expiry: BTreeSet::new(),
        }
    }

    /// Maximum number of remembered tokens.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Number of remembered tokens.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// Whether no token is remembered.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    /// Forgets entries whose `forget_after` is at or before `now`.
    pub fn prune(&mut self, now: u64) {
        while let Some(&(forget_after, tag)) = self.by_expiry.first() {
            if forget_after > now {
                break;
            }
            self.by_expiry.pop_first();
            self.seen.remove(&tag);
        }
    }

    /// Records `tag` until `forget_after`. Fails with
    /// [`TokenError::Replayed`] if it is already recorded, and with
    /// [`TokenError::ReplayCacheFull`] if the cache is full of entries
    /// that are still live at `now`.
    pub fn insert(
        &mut self,
        tag: [u8; TOKEN_TAG_LEN],
        forget_after: u64,
        now: u64,
    ) -> Result<(), TokenError> {
        self.prune(now);
        if self.seen.contains(&tag) {
            return Err(TokenError::Replayed);
        }
        if self.seen.len() >= self.capacity {
            return Err(TokenError::ReplayCacheFull {
                capacity: self.capacity,
            });
        }
        self.seen.insert(tag);
        self.by_expiry.insert((forget_after, tag));
        Ok(())
    }
}

/// Verifies tokens for one token key: MAC, binding, validity time, replay.
#[derive(Debug)]
pub struct TokenVerifier {
    key: TokenKey,
    replay: ReplayCache,
    leeway_secs: u64,
}

impl TokenVerifier {
    /// A verifier with a replay cache of `replay_capacity` tokens that
    /// tolerates `leeway` of clock skew (whole seconds) on both ends of a
    /// token's validity.
    pub fn new(key: TokenKey, replay_capacity: usize, leeway: Duration) -> TokenVerifier {
        TokenVerifier {
            key,
            replay: ReplayCache::new(replay_capacity),
            leeway_secs: leeway.as_secs(),
        }
    }

    /// The replay cache (for inspection).
    pub fn replay_cache(&self) -> &ReplayCache {
        &self.replay
    }

    /// Verifies `token` for a migration from `expected_source` to
    /// `expected_target` at `now_unix` (seconds), and on success records it
    /// so it cannot be used again.
    ///
    /// Checks, in order: structure ([`TokenError::Malformed`]), MAC in
    /// constant time ([`TokenError::Forged`]), binding
    /// ([`TokenError::WrongBinding`]), `issued_at <= now + leeway`
    /// ([`TokenError::NotYetValid`]), `now < expires_at + leeway`
    /// ([`TokenError::Expired`]), then the replay cache
    /// ([`TokenError::Replayed`], [`TokenError::ReplayCacheFull`]).
    pub fn verify(
        &mut self,
        token: &[u8],
        expected_source: &str,
        expected_target: &str,
        now_unix: u64,
    ) -> Result<TokenClaims, TokenError> {
        let (claims, tag, forget_after) =
            self.check_inner(token, expected_source, expected_target, now_unix)?;
        self.replay.insert(tag, forget_after, now_unix)?;
        Ok(claims)
    }

    /// [`verify`](Self::verify) without the replay cache: every check but "used before", and
    /// nothing recorded. For the later requests of a migration whose first request was
    /// verified (and recorded) with `verify`: they carry the same token, bound to the same
    /// migration, over the same authenticated connection.
    pub fn check(
        &self,
        token: &[u8],
        expected_source: &str,
        expected_target: &str,
        now_unix: u64,
    ) -> Result<TokenClaims, TokenError> {
        self.check_inner(token, expected_source, expected_target, now_unix)
            .map(|(claims, _, _)| claims)
    }

    fn check_inner(
        &self,
        token: &[u8],
        expected_source: &str,
        expected_target: &str,
        now_unix: u64,
    ) -> Result<(TokenClaims, [u8; TOKEN_TAG_LEN], u64), TokenError> {
        let parsed = parse(token)?;
        hmac::verify(&self.key.hmac_key(), parsed.body, parsed.tag)
            .map_err(|_| TokenError::Forged)?;
        let claims = parsed.claims;
        if claims.source != expected_source {
            return Err(TokenError::WrongBinding {
                field: TokenField::Source,
            });
        }
        if claims.target != expected_target {
            return Err(TokenError::WrongBinding {
                field: TokenField::Target,
            });
        }
        if claims.issued_at > now_unix.saturating_add(self.leeway_secs) {
            return Err(TokenError::NotYetValid {
                issued_at: claims.issued_at,
                now: now_unix,
            });
        }
        let forget_after = claims.expires_at.saturating_add(self.leeway_secs);
        if now_unix >= forget_after {
            return Err(TokenError::Expired {
                expires_at: claims.expires_at,
                now: now_unix,
            });
        }
        Ok((claims, *parsed.tag, forget_after))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NOW: u64 = 1_700_000_000;

    fn tkey() -> TokenKey {
        TokenKey::from_bytes(&[0x5A; 32]).unwrap()
    }

    fn claims() -> TokenClaims {
        TokenClaims {
            migration_id: [7; 16],
            source: "host-a".into(),
            target: "host-b".into(),
            issued_at: NOW,
            expires_at: NOW + 60,
        }
    }

    fn verifier() -> TokenVerifier {
        TokenVerifier::new(tkey(), 16, Duration::from_secs(5))
    }

    fn token(c: &TokenClaims) -> Vec<u8> {
        issue_token(&tkey(), c).unwrap().into_bytes()
    }

    #[test]
    fn check_verifies_without_recording() {
        let mut v = verifier();
        let t = token(&claims());
        assert_eq!(v.check(&t, "host-a", "host-b", NOW).unwrap(), claims());
        assert_eq!(v.check(&t, "host-a", "host-b", NOW).unwrap(), claims());
        assert!(v.replay_cache().is_empty());
        assert!(matches!(
            v.check(&t, "host-a", "host-c", NOW),
            Err(TokenError::WrongBinding { .. })
        ));
        assert!(matches!(
            v.check(&t, "host-a", "host-b", NOW + 3600),
            Err(TokenError::Expired { .. })
        ));
        let mut forged = t.clone();
        let last = forged.len() - 1;
        forged[last] ^= 1;
        assert!(matches!(
            v.check(&forged, "host-a", "host-b", NOW),
            Err(TokenError::Forged)
        ));
        // verify records it once; check still accepts it afterwards, verify does not.
        v.verify(&t, "host-a", "host-b", NOW).unwrap();
        assert!(v.check(&t, "host-a", "host-b", NOW).is_ok());
        assert!(matches!(
            v.verify(&t, "host-a", "host-b", NOW),
            Err(TokenError::Replayed)
        ));
    }

    #[test]
    fn issue_and_verify() {
        let t = token(&claims());
        assert_eq!(t.len(), MIN_TOKEN_LEN + 12);
        let got = verifier().verify(&t, "host-a", "host-b", NOW + 1).unwrap();
        assert_eq!(got, claims());
        let mt = MigrationToken::from_bytes(&t).unwrap();
        assert_eq!(mt.as_bytes(), &t[..]);
    }

    #[test]
    fn token_key_rules() {
        assert_eq!(
            TokenKey::from_bytes(&[1; 31]).unwrap_err(),
            KeyError::TooShort { min: 32, found: 31 }
        );
        assert!(TokenKey::from_bytes(&[1; 64]).is_ok());
        let (a, b) = (TokenKey::generate().unwrap(), TokenKey::generate().unwrap());
        assert_ne!(a.id(), b.id());
        // A token from another key is forged.
        let t = issue_token(&a, &claims()).unwrap();
        assert_eq!(
            TokenVerifier::new(b, 4, Duration::ZERO).verify(t.as_bytes(), "host-a", "host-b", NOW),
            Err(TokenError::Forged)
        );
    }

    #[test]
    fn debug_does_not_leak() {
        let k = tkey();
        let s = format!("{k:?} {:?}", issue_token(&k, &claims()).unwrap());
        assert!(s.contains(&k.id().to_string()), "{s}");
        assert!(!s.contains("5a5a5a"));
        assert!(!s.contains("90, 90"));
        let v = format!("{:?}", verifier());
        assert!(!v.contains("90, 90"), "{v}");
    }

    #[test]
    fn issue_rejects_bad_claims() {
        let mut c = claims();
        c.source = "s".repeat(256);
        assert_eq!(
            issue_token(&tkey(), &c).unwrap_err(),
            TokenError::FieldTooLong {
                field: TokenField::Source,
                len: 256,
                max: 255
            }
        );
        let mut c = claims();
        c.target = "t".repeat(300);
        assert_eq!(
            issue_token(&tkey(), &c).unwrap_err(),
            TokenError::FieldTooLong {
                field: TokenField::Target,
                len: 300,
                max: 255
            }
        );
        let mut c = claims();
        c.expires_at = c.issued_at;
        assert_eq!(
            issue_token(&tkey(), &c).unwrap_err(),
            TokenError::InvalidLifetime {
                issued_at: NOW,
                expires_at: NOW
            }
        );
        // The longest fields are fine and give the longest token.
        let mut c = claims();
        c.source = "s".repeat(255);
        c.target = "t".repeat(255);
        assert_eq!(
            issue_token(&tkey(), &c).unwrap().as_bytes().len(),
            MAX_TOKEN_LEN
        );
    }

    #[test]
    fn expired_and_not_yet_valid_with_leeway() {
        let t = token(&claims());
        // Leeway 5 s: valid until expires_at + 5 (exclusive).
        assert_eq!(
            verifier().verify(&t, "host-a", "host-b", NOW + 65),
            Err(TokenError::Expired {
                expires_at: NOW + 60,
                now: NOW + 65
            })
        );
        assert!(verifier().verify(&t, "host-a", "host-b", NOW + 64).is_ok());
        // issued_at may be up to 5 s in the future.
        assert_eq!(
            verifier().verify(&t, "host-a", "host-b", NOW - 6),
            Err(TokenError::NotYetValid {
                issued_at: NOW,
                now: NOW - 6
            })
        );
        assert!(verifier().verify(&t, "host-a", "host-b", NOW - 5).is_ok());
    }

    #[test]
    fn wrong_binding() {
        let t = token(&claims());
        let mut v = verifier();
        assert_eq!(
            v.verify(&t, "host-x", "host-b", NOW),
            Err(TokenError::WrongBinding {
                field: TokenField::Source
            })
        );
        assert_eq!(
            v.verify(&t, "host-a", "host-a", NOW),
            Err(TokenError::WrongBinding {
                field: TokenField::Target
            })
        );
        // Swapped direction is refused too.
        assert_eq!(
            v.verify(&t, "host-b", "host-a", NOW),
            Err(TokenError::WrongBinding {
                field: TokenField::Source
            })
        );
        // Failed checks did not consume the token.
        assert!(v.verify(&t, "host-a", "host-b", NOW).is_ok());
    }

    #[test]
    fn replayed() {
        let t = token(&claims());
        let mut v = verifier();
        v.verify(&t, "host-a", "host-b", NOW).unwrap();
        assert_eq!(
            v.verify(&t, "host-a", "host-b", NOW + 1),
            Err(TokenError::Replayed)
        );
        // Another migration id is a different token.
        let mut c = claims();
        c.migration_id[0] ^= 1;
        assert!(v.verify(&token(&c), "host-a", "host-b", NOW + 1).is_ok());
        // Once expired, the replay is reported as expired, never accepted.
        assert!(matches!(
            v.verify(&t, "host-a", "host-b", NOW + 65),
            Err(TokenError::Expired { .. })
        ));
    }

    #[test]
    fn replay_cache_full_then_pruned() {
        let mut v = TokenVerifier::new(tkey(), 3, Duration::ZERO);
        let tokens: Vec<Vec<u8>> = (0..4u8)
            .map(|i| {
                let mut c = claims();
                c.migration_id = [i; 16];
                c.expires_at = NOW + 10 + u64::from(i);
                token(&c)
            })
            .collect();
        for t in &tokens[..3] {
            v.verify(t, "host-a", "host-b", NOW).unwrap();
        }
        assert_eq!(v.replay_cache().len(), 3);
        assert_eq!(
            v.verify(&tokens[3], "host-a", "host-b", NOW),
            Err(TokenError::ReplayCacheFull { capacity: 3 })
        );
        // A replay is still reported as a replay when the cache is full.
        assert_eq!(
            v.verify(&tokens[0], "host-a", "host-b", NOW),
            Err(TokenError::Replayed)
        );
        // After the first token expires (NOW + 10), its slot frees up.
        v.verify(&tokens[3], "host-a", "host-b", NOW + 10).unwrap();
        assert_eq!(v.replay_cache().len(), 3);
        assert_eq!(
            v.verify(&tokens[3], "host-a", "host-b", NOW + 10),
            Err(TokenError::Replayed)
        );
    }

    #[test]
    fn replay_cache_zero_capacity_refuses() {
        let mut v = TokenVerifier::new(tkey(), 0, Duration::ZERO);
        assert_eq!(
            v.verify(&token(&claims()), "host-a", "host-b", NOW),
            Err(TokenError::ReplayCacheFull { capacity: 0 })
        );
    }

    fn malformed(bytes: &[u8]) -> &'static str {
        match verifier().verify(bytes, "host-a", "host-b", NOW) {
            Err(TokenError::Malformed { reason }) => reason,
            other => panic!("expected Malformed, got {other:?}"),
        }
    }

    #[test]
    fn malformed_and_truncated() {
        let t = token(&claims());
        assert_eq!(malformed(&[]), "too short");
        assert_eq!(malformed(&t[..MIN_TOKEN_LEN - 1]), "too short");
        assert_eq!(malformed(&[0u8; MAX_TOKEN_LEN + 1]), "too long");
        let mut v2 = t.clone();
        v2[0] = 2;
        assert_eq!(malformed(&v2), "unsupported version");
        // Dropping a byte anywhere shifts the lengths: never accepted.
        for i in 0..t.len() {
            let mut short = t.clone();
            short.remove(i);
            let r = verifier().verify(&short, "host-a", "host-b", NOW);
            assert!(
                matches!(r, Err(TokenError::Malformed { .. } | TokenError::Forged)),
                "removing byte {i}: {r:?}"
            );
        }
        // Trailing bytes after the claims (tag moved along) are rejected.
        let mut long = t.clone();
        long.insert(t.len() - TOKEN_TAG_LEN, 0);
        assert_eq!(malformed(&long), "trailing bytes");
        // A source length pointing past the end.
        let mut bad = t.clone();
        bad[FIXED_LEN - 2] = 255;
        assert_eq!(malformed(&bad), "source length exceeds token");
        // Invalid UTF-8 in a claim.
        let mut bad = t.clone();
        bad[FIXED_LEN - 1] = 0xff;
        assert_eq!(malformed(&bad), "claim is not UTF-8");
        assert!(matches!(
            MigrationToken::from_bytes(&t[..10]),
            Err(TokenError::Malformed { .. })
        ));
    }

    fn arb_claims() -> impl Strategy<Value = TokenClaims> {
        (
            any::<[u8; 16]>(),
            "\\PC{0,40}",
            "\\PC{0,40}",
            0u64..u64::MAX / 2,
            1u64..1_000_000,
        )
            .prop_map(
                |(migration_id, source, target, issued_at, life)| TokenClaims {
                    migration_id,
                    source,
                    target,
                    issued_at,
                    expires_at: issued_at + life,
                },
            )
    }

    proptest! {
        #[test]
        fn prop_round_trip(c in arb_claims()) {
            let t = issue_token(&tkey(), &c).unwrap();
            let mt = MigrationToken::from_bytes(t.as_bytes()).unwrap();
            prop_assert_eq!(&mt, &t);
            let got = verifier().verify(t.as_bytes(), &c.source, &c.target, c.issued_at).unwrap();
            prop_assert_eq!(got, c);
        }

        /// Flipping any single bit of a valid token never verifies.
        #[test]
        fn prop_bit_flip_forged(c in arb_claims(), bit in any::<usize>()) {
            let mut t = issue_token(&tkey(), &c).unwrap().into_bytes();
            let bit = bit % (t.len() * 8);
            t[bit / 8] ^= 1 << (bit % 8);
            let r = verifier().verify(&t, &c.source, &c.target, c.issued_at);
            prop_assert!(
                matches!(r, Err(TokenError::Forged | TokenError::Malformed { .. })),
                "bit {} gave {:?}", bit, r
            );
            // Outside the length bytes and version, a flip parses and is caught by the MAC.
            let byte = bit / 8;
            let src_len_at = FIXED_LEN - 2;
            let tgt_len_at = src_len_at + 1 + c.source.len();
            let in_text = (src_len_at + 1..tgt_len_at).contains(&byte)
                || (tgt_len_at + 1..t.len() - TOKEN_TAG_LEN).contains(&byte);
            if byte != 0 && byte != src_len_at && byte != tgt_len_at && !in_text {
                prop_assert_eq!(r, Err(TokenError::Forged));
            }
        }

        #[test]
        fn prop_arbitrary_bytes_never_verify(data in proptest::collection::vec(any::<u8>(), 0..700)) {
            let r = verifier().verify(&data, "a", "b", NOW);
            prop_assert!(matches!(r, Err(TokenError::Malformed { .. } | TokenError::Forged)), "{:?}", r);
            let _ = MigrationToken::from_bytes(&data);
        }
    }
}
