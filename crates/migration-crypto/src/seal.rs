//! AES-256-GCM sealed records with per-stream HKDF subkeys.
//!
//! See the crate documentation for the nonce scheme and the record format.

use std::fmt;

use ring::aead::{self, AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::hkdf;

use crate::key::{CryptoError, Key, KeyId, fill_random};

/// Version byte of the record format.
pub const SEAL_VERSION: u8 = 1;
/// Length of the random per-stream salt.
pub const SALT_LEN: usize = 16;
/// Length of the AES-GCM tag at the end of a record.
pub const SEAL_TAG_LEN: usize = 16;
/// Length of the record header: version, key id, salt, counter.
pub const SEAL_HEADER_LEN: usize = 1 + 8 + SALT_LEN + 8;
/// Bytes a sealed record adds to its plaintext (header + tag).
pub const SEAL_OVERHEAD: usize = SEAL_HEADER_LEN + SEAL_TAG_LEN;

/// HKDF info string for per-stream subkeys.
const SEAL_INFO: &[u8] = b"migration-crypto seal v1";

/// Largest plaintext AES-GCM (and ring) accepts in one record: 2^36 - 32 bytes.
const MAX_PLAINTEXT_LEN: u64 = (1 << 36) - 32;

/// Sealing failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SealError {
    /// The system RNG could not produce a stream salt.
    #[error(transparent)]
    Random(#[from] CryptoError),
    /// The stream sealed 2^64 records; counters are never reused, so
    /// create a new [`Sealer`].
    #[error("record counter exhausted; create a new Sealer")]
    CounterExhausted,
    /// The plaintext exceeds what AES-GCM can seal in one record.
    #[error("plaintext of {len} bytes exceeds the {max}-byte record limit")]
    PlaintextTooLong {
        /// Plaintext length.
        len: usize,
        /// Maximum plaintext length.
        max: u64,
    },
    /// The buffer given to [`Sealer::seal_record`] no longer holds the room for the record's
    /// header that [`Sealer::begin_record`] made.
    #[error("the buffer no longer holds the record begun in it")]
    BufferShrunk,
}

/// Opening a sealed record failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The record is shorter than a header plus a tag.
    #[error("sealed record of {len} bytes is shorter than the minimum {min}")]
    Truncated {
        /// Length received.
        len: usize,
        /// Minimum length of a record (header + tag).
        min: usize,
    },
    /// The record's version byte is not [`SEAL_VERSION`].
    #[error("unsupported sealed record version {0}")]
    UnsupportedVersion(u8),
    /// The record was sealed under another key.
    #[error("record sealed with key {found}, expected key {expected}")]
    WrongKey {
        /// Id of the opener's key.
        expected: KeyId,
        /// Id in the record header.
        found: KeyId,
    },
    /// Authentication failed: the ciphertext, tag, header or aad changed.
    #[error("sealed record failed authentication (tampered or wrong aad)")]
    Tampered,
}

/// The parsed header of a sealed record. Parsing does not authenticate:
/// trust the fields only after [`Opener::open`] succeeded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RecordHeader {
    /// Format version ([`SEAL_VERSION`]).
    pub version: u8,
    /// Id of the key the record claims to be sealed with.
    pub key_id: KeyId,
    /// The sealing stream's random salt.
    pub salt: [u8; SALT_LEN],
    /// The record's counter within its stream.
    pub counter: u64,
}

impl RecordHeader {
    /// Parses the header of `sealed`, checking the minimum length and the
    /// version.
    pub fn parse(sealed: &[u8]) -> Result<RecordHeader, OpenError> {
        if sealed.len() < SEAL_OVERHEAD {
            return Err(OpenError::Truncated {
                len: sealed.len(),
                min: SEAL_OVERHEAD,
            });
        }
        let version = sealed[0];
        if version != SEAL_VERSION {
            return Err(OpenError::UnsupportedVersion(version));
        }
        let mut key_id = [0u8; 8];
        key_id.copy_from_slice(&sealed[1..9]);
        let mut salt = [0u8; SALT_LEN];
        salt.copy_from_slice(&sealed[9..9 + SALT_LEN]);
        let mut counter = [0u8; 8];
        counter.copy_from_slice(&sealed[9 + SALT_LEN..SEAL_HEADER_LEN]);
        Ok(RecordHeader {
            version,
            key_id: KeyId(key_id),
            salt,
            counter: u64::from_be_bytes(counter),
        })
    }

    fn encode(&self) -> [u8; SEAL_HEADER_LEN] {
        let mut h = [0u8; SEAL_HEADER_LEN];
        h[0] = self.version;
        h[1..9].copy_from_slice(&self.key_id.0);
        h[9..9 + SALT_LEN].copy_from_slice(&self.salt);
        h[9 + SALT_LEN..].copy_from_slice(&self.counter.to_be_bytes());
        h
    }
}

/// Derives the per-stream AES-256-GCM subkey for `salt`.
fn derive_subkey(key: &Key, salt: &[u8; SALT_LEN]) -> LessSafeKey {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(key.as_bytes());
    // expand only fails if the requested length exceeds 255 * 32 bytes;
    // AES-256 needs 32.
    #[allow(clippy::expect_used)]
    let okm = prk
        .expand(&[SEAL_INFO], &AES_256_GCM)
        .expect("HKDF-SHA256 can always produce 32 bytes");
    LessSafeKey::new(UnboundKey::from(okm))
}

fn nonce_for(counter: u64) -> Nonce {
    let mut n = [0u8; aead::NONCE_LEN];
    n[4..].copy_from_slice(&counter.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

/// Writes `header || aad` into `scratch` (reused to avoid allocations).
fn full_aad<'a>(scratch: &'a mut Vec<u8>, header: &[u8], aad: &[u8]) -> &'a [u8] {
    scratch.clear();
    scratch.extend_from_slice(header);
    scratch.extend_from_slice(aad);
    scratch
}

/// Where a record begun by [`Sealer::begin_record`] starts in its buffer; consumed by
/// [`Sealer::seal_record`].
#[derive(Debug)]
#[must_use = "a begun record is sealed with Sealer::seal_record"]
pub struct RecordStart {
    at: usize,
}

/// One sealing stream: a random salt, its derived subkey and a record
/// counter. Create a new one per stream and after every restore.
pub struct Sealer {
    subkey: LessSafeKey,
    key_id: KeyId,
    salt: [u8; SALT_LEN],
    /// Counter of the next record; `None` once 2^64 records were sealed.
    next: Option<u64>,
    aad_scratch: Vec<u8>,
}

impl Sealer {
    /// Starts a stream under `key` with a fresh random salt.
    pub fn new(key: &Key) -> Result<Sealer, SealError> {
        let mut salt = [0u8; SALT_LEN];
        fill_random(&mut salt)?;
        Ok(Sealer {
            subkey: derive_subkey(key, &salt),
            key_id: key.id(),
            salt,
            next: Some(0),
            aad_scratch: Vec::new(),
        })
    }

    /// The stream's salt.
    pub fn salt(&self) -> [u8; SALT_LEN] {
        self.salt
    }

    /// Id of the key the stream seals with.
    pub fn key_id(&self) -> KeyId {
        self.key_id
    }

    /// Appends one sealed record (header + ciphertext + tag) for
    /// `plaintext`, authenticated with `aad`, to `out`. On error `out` is
    /// left as it was.
    pub fn seal(
        &mut self,
        aad: &[u8],
        plaintext: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), SealError> {
        if plaintext.len() as u64 > MAX_PLAINTEXT_LEN {
            return Err(SealError::PlaintextTooLong {
                len: plaintext.len(),
                max: MAX_PLAINTEXT_LEN,
            });
        }
        out.reserve(SEAL_OVERHEAD + plaintext.len());
        let start = Sealer::begin_record(out);
        out.extend_from_slice(plaintext);
        self.seal_record(aad, out, start)
    }

    /// Starts a record at the end of `out`, to be sealed where it lies: appends room for its
    /// header and returns where it starts. Append the plaintext to `out` (a compressor can
    /// write straight into it), then call [`Sealer::seal_record`]: the record is the one
    /// [`Sealer::seal`] gives for that plaintext, without copying it.
    pub fn begin_record(out: &mut Vec<u8>) -> RecordStart {
        let at = out.len();
        out.extend_from_slice(&[0; SEAL_HEADER_LEN]);
        RecordStart { at }
    }

    /// Seals, in place, the record [`Sealer::begin_record`] started in `out`: its plaintext is
    /// everything after the header's room; writes the header (with the next counter: records
    /// begun together still get distinct nonces) and appends the tag.
    ///
    /// On error `out` is cut back to where the record started and no counter is used;
    /// [`SealError::BufferShrunk`] if `out` no longer holds the header's room.
    pub fn seal_record(
        &mut self,
        aad: &[u8],
        out: &mut Vec<u8>,
        start: RecordStart,
    ) -> Result<(), SealError> {
        let start = start.at;
        let body = start + SEAL_HEADER_LEN;
        if out.len() < body {
            out.truncate(start);
            return Err(SealError::BufferShrunk);
        }
        let len = out.len() - body;
        let too_long = SealError::PlaintextTooLong {
            len,
            max: MAX_PLAINTEXT_LEN,
        };
        if len as u64 > MAX_PLAINTEXT_LEN {
            out.truncate(start);
            return Err(too_long);
        }
        let Some(counter) = self.next else {
            out.truncate(start);
            return Err(SealError::CounterExhausted);
        };
        let header = RecordHeader {
            version: SEAL_VERSION,
            key_id: self.key_id,
            salt: self.salt,
            counter,
        }
        .encode();
        out[start..body].copy_from_slice(&header);
        let aad = full_aad(&mut self.aad_scratch, &header, aad);
        match self.subkey.seal_in_place_separate_tag(
            nonce_for(counter),
            Aad::from(aad),
            &mut out[body..],
        ) {
            Ok(tag) => {
                out.extend_from_slice(tag.as_ref());
                // Consume the counter only once the record exists; a
                // failed seal used no nonce.
                self.next = counter.checked_add(1);
                Ok(())
            }
            Err(_) => {
                out.truncate(start);
                Err(too_long)
            }
        }
    }

    #[cfg(test)]
    fn set_next_counter(&mut self, next: Option<u64>) {
        self.next = next;
    }
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealer")
            .field("key_id", &format_args!("{}", self.key_id))
            .field("next_counter", &self.next)
            .finish_non_exhaustive()
    }
}

/// Opens records sealed under one [`Key`], from any number of streams.
/// Caches the subkey of the last stream salt seen.
pub struct Opener {
    key: Key,
    cached: Option<([u8; SALT_LEN], LessSafeKey)>,
    aad_scratch: Vec<u8>,
}

impl Opener {
    /// An opener for records sealed under `key`.
    pub fn new(key: &Key) -> Opener {
        Opener {
            key: key.clone(),
            cached: None,
            aad_scratch: Vec::new(),
        }
    }

    /// Id of the key this opener expects.
    pub fn key_id(&self) -> KeyId {
        self.key.id()
    }

    /// Appends the plaintext of one sealed record to `out`; `out` is left
    /// as it was on error.
    pub fn open(&mut self, aad: &[u8], sealed: &[u8], out: &mut Vec<u8>) -> Result<(), OpenError> {
        let header = self.check_header(sealed)?;
        let tag_at = sealed.len() - SEAL_TAG_LEN;
        let start = out.len();
        out.extend_from_slice(&sealed[SEAL_HEADER_LEN..tag_at]);
        let res = self.open_body(
            &header,
            &sealed[..SEAL_HEADER_LEN],
            aad,
            &sealed[tag_at..],
            &mut out[start..],
        );
        if res.is_err() {
            out.truncate(start);
        }
        res
    }

    /// Opens one sealed record where it lies: decrypts the ciphertext inside `sealed` and
    /// returns the plaintext, a part of `sealed` (no copy). On error the ciphertext's bytes
    /// are zeroed (nothing unauthenticated is left) and the rest is untouched.
    pub fn open_in_place<'a>(
        &mut self,
        aad: &[u8],
        sealed: &'a mut [u8],
    ) -> Result<&'a mut [u8], OpenError> {
        let header = self.check_header(sealed)?;
        let tag_at = sealed.len() - SEAL_TAG_LEN;
        let (head, rest) = sealed.split_at_mut(SEAL_HEADER_LEN);
        let (body, tag) = rest.split_at_mut(tag_at - SEAL_HEADER_LEN);
        self.open_body(&header, head, aad, tag, body)?;
        Ok(body)
    }

    /// Parses `sealed`'s header and checks its key: [`OpenError::Truncated`],
    /// [`OpenError::UnsupportedVersion`], [`OpenError::WrongKey`].
    fn check_header(&self, sealed: &[u8]) -> Result<RecordHeader, OpenError> {
        let header = RecordHeader::parse(sealed)?;
        if header.key_id != self.key.id() {
            return Err(OpenError::WrongKey {
                expected: self.key.id(),
                found: header.key_id,
            });
        }
        Ok(header)
    }

    /// Decrypts `body` in place, authenticated by `tag` over `head || aad`; zeroes `body` when
    /// authentication fails.
    fn open_body(
        &mut self,
        header: &RecordHeader,
        head: &[u8],
        aad: &[u8],
        tag: &[u8],
        body: &mut [u8],
    ) -> Result<(), OpenError> {
        let subkey = match &mut self.cached {
            Some((salt, subkey)) if *salt == header.salt => subkey,
            slot => {
                &slot
                    .insert((header.salt, derive_subkey(&self.key, &header.salt)))
                    .1
            }
        };
        let tag = <[u8; SEAL_TAG_LEN]>::try_from(tag).map_err(|_| OpenError::Tampered)?;
        let aad = full_aad(&mut self.aad_scratch, head, aad);
        match subkey.open_in_place_separate_tag(
            nonce_for(header.counter),
            Aad::from(aad),
            aead::Tag::from(tag),
            body,
            0..,
        ) {
            Ok(_) => Ok(()),
            Err(_) => {
                // Do not leave unauthenticated plaintext behind.
                body.fill(0);
                Err(OpenError::Tampered)
            }
        }
    }
}

impl fmt::Debug for Opener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Opener")
            .field("key_id", &format_args!("{}", self.key.id()))
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    fn key(b: u8) -> Key {
        Key::from_bytes(&[b; 32]).unwrap()
    }

    fn sealed(key: &Key, aad: &[u8], pt: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        Sealer::new(key).unwrap().seal(aad, pt, &mut out).unwrap();
        out
    }

    #[test]
    fn round_trip_and_overhead() {
        let k = key(1);
        let mut s = Sealer::new(&k).unwrap();
        let mut o = Opener::new(&k);
        let mut out = b"prefix".to_vec();
        s.seal(b"aad", b"hello", &mut out).unwrap();
        assert_eq!(out.len(), 6 + 5 + SEAL_OVERHEAD);
        assert_eq!(&out[..6], b"prefix");
        let mut pt = b"keep".to_vec();
        o.open(b"aad", &out[6..], &mut pt).unwrap();
        assert_eq!(pt, b"keephello");
        // Empty plaintext and empty aad are fine.
        let rec = sealed(&k, b"", b"");
        assert_eq!(rec.len(), SEAL_OVERHEAD);
        let mut pt = Vec::new();
        o.open(b"", &rec, &mut pt).unwrap();
        assert!(pt.is_empty());
    }

    /// Decrypts with ring directly from the documented scheme, so the crate
    /// doc (HKDF parameters, nonce layout, AAD = header || aad) is checked.
    #[test]
    fn matches_documented_scheme() {
        let k = key(9);
        let mut s = Sealer::new(&k).unwrap();
        let mut rec = Vec::new();
        s.seal(b"x", b"first", &mut rec).unwrap();
        rec.clear();
        s.seal(b"ctx", b"second record", &mut rec).unwrap();

        assert_eq!(rec[0], 1);
        assert_eq!(&rec[1..9], &k.id().0);
        assert_eq!(&rec[9..25], &s.salt());
        assert_eq!(&rec[25..33], &1u64.to_be_bytes());

        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &rec[9..25]).extract(&[9u8; 32]);
        let okm = prk
            .expand(&[b"migration-crypto seal v1"], &AES_256_GCM)
            .unwrap();
        let subkey = LessSafeKey::new(UnboundKey::from(okm));
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&1u64.to_be_bytes());
        let mut aad = rec[..33].to_vec();
        aad.extend_from_slice(b"ctx");
        let mut body = rec[33..].to_vec();
        let pt = subkey
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut body,
            )
            .unwrap();
        assert_eq!(pt, b"second record");
    }

    #[test]
    fn truncated_at_every_short_length() {
        let k = key(1);
        let rec = sealed(&k, b"", b"");
        let mut o = Opener::new(&k);
        for len in 0..SEAL_OVERHEAD {
            let mut out = vec![42];
            assert_eq!(
                o.open(b"", &rec[..len], &mut out),
                Err(OpenError::Truncated {
                    len,
                    min: SEAL_OVERHEAD
                })
            );
            assert_eq!(out, [42]);
        }
    }

    #[test]
    fn unsupported_version() {
        let k = key(1);
        let mut rec = sealed(&k, b"", b"data");
        for v in [0u8, 2, 0xff] {
            rec[0] = v;
            let mut out = Vec::new();
            assert_eq!(
                Opener::new(&k).open(b"", &rec, &mut out),
                Err(OpenError::UnsupportedVersion(v))
            );
            assert!(out.is_empty());
        }
    }

    #[test]
    fn wrong_key() {
        let (a, b) = (key(1), key(2));
        let rec = sealed(&a, b"", b"data");
        let mut out = Vec::new();
        assert_eq!(
            Opener::new(&b).open(b"", &rec, &mut out),
            Err(OpenError::WrongKey {
                expected: b.id(),
                found: a.id()
            })
        );
        assert!(out.is_empty());
    }

    #[test]
    fn tampered_aad_ciphertext_tag_header() {
        let k = key(1);
        let rec = sealed(&k, b"aad", b"some plaintext");
        let mut o = Opener::new(&k);
        let mut out = b"x".to_vec();
        assert_eq!(o.open(b"aae", &rec, &mut out), Err(OpenError::Tampered));
        assert_eq!(o.open(b"", &rec, &mut out), Err(OpenError::Tampered));
        // counter byte, salt byte, ciphertext byte, tag byte
        for i in [SEAL_HEADER_LEN - 1, 9, SEAL_HEADER_LEN, rec.len() - 1] {
            let mut bad = rec.clone();
            bad[i] ^= 0x01;
            assert_eq!(
                o.open(b"aad", &bad, &mut out),
                Err(OpenError::Tampered),
                "byte {i}"
            );
        }
        // Truncating the ciphertext (still long enough) is tampering too.
        assert_eq!(
            o.open(b"aad", &rec[..rec.len() - 1], &mut out),
            Err(OpenError::Tampered)
        );
        assert_eq!(out, b"x");
        o.open(b"aad", &rec, &mut out).unwrap();
        assert_eq!(out, b"xsome plaintext");
    }

    #[test]
    fn counter_exhausted() {
        let k = key(1);
        let mut s = Sealer::new(&k).unwrap();
        s.set_next_counter(Some(u64::MAX));
        let mut out = Vec::new();
        s.seal(b"", b"last", &mut out).unwrap();
        assert_eq!(RecordHeader::parse(&out).unwrap().counter, u64::MAX);
        let len = out.len();
        assert!(matches!(
            s.seal(b"", b"more", &mut out),
            Err(SealError::CounterExhausted)
        ));
        assert_eq!(out.len(), len);
        let mut pt = Vec::new();
        Opener::new(&k).open(b"", &out, &mut pt).unwrap();
        assert_eq!(pt, b"last");
    }

    /// (a) One long stream: every record gets a distinct (salt, counter) nonce.
    #[test]
    fn nonces_unique_within_long_stream() {
        let k = key(3);
        let mut s = Sealer::new(&k).unwrap();
        let mut seen = HashSet::with_capacity(200_000);
        let mut rec = Vec::with_capacity(64);
        for i in 0..200_000u64 {
            rec.clear();
            s.seal(b"", &i.to_le_bytes(), &mut rec).unwrap();
            let h = RecordHeader::parse(&rec).unwrap();
            assert_eq!(h.counter, i);
            assert!(seen.insert((h.salt, h.counter)), "nonce reused at {i}");
        }
        assert_eq!(seen.len(), 200_000);
    }

    /// (b) Restarts: many Sealers under the same key draw distinct salts,
    /// and a record moved to another stream's salt does not open.
    #[test]
    fn streams_unique_across_restarts() {
        let k = key(4);
        let mut salts = HashSet::with_capacity(10_000);
        let mut records = Vec::new();
        for i in 0..10_000u32 {
            let mut s = Sealer::new(&k).unwrap();
            assert!(salts.insert(s.salt()), "salt repeated at sealer {i}");
            if i < 4 {
                let mut rec = Vec::new();
                s.seal(b"", b"same plaintext, counter 0", &mut rec).unwrap();
                records.push((s.salt(), rec));
            }
        }
        let mut o = Opener::new(&k);
        let mut out = Vec::new();
        for (i, (_, rec)) in records.iter().enumerate() {
            // Same key, same counter, same plaintext: different ciphertexts.
            for (_, other) in &records[i + 1..] {
                assert_ne!(rec[SEAL_HEADER_LEN..], other[SEAL_HEADER_LEN..]);
            }
            let (other_salt, _) = records[(i + 1) % records.len()];
            let mut moved = rec.clone();
            moved[9..9 + SALT_LEN].copy_from_slice(&other_salt);
            assert_eq!(o.open(b"", &moved, &mut out), Err(OpenError::Tampered));
            o.open(b"", rec, &mut out).unwrap();
        }
    }

    #[test]
    fn opener_handles_interleaved_streams() {
        let k = key(5);
        let mut a = Sealer::new(&k).unwrap();
        let mut b = Sealer::new(&k).unwrap();
        let mut o = Opener::new(&k);
        for i in 0..5u8 {
            for s in [&mut a, &mut b] {
                let mut rec = Vec::new();
                s.seal(&[i], &[i; 3], &mut rec).unwrap();
                let mut pt = Vec::new();
                o.open(&[i], &rec, &mut pt).unwrap();
                assert_eq!(pt, [i; 3]);
            }
        }
    }

    #[test]
    fn debug_does_not_leak_key() {
        let k = key(0xAB);
        let s = format!("{:?} {:?}", Sealer::new(&k).unwrap(), Opener::new(&k));
        assert!(s.contains(&k.id().to_string()));
        assert!(!s.contains("abababab"));
        assert!(!s.contains("171, 171"));
    }

    /// A sealer with a chosen salt, so that two of them produce the same records.
    fn sealer_with_salt(key: &Key, salt: [u8; SALT_LEN]) -> Sealer {
        Sealer {
            subkey: derive_subkey(key, &salt),
            key_id: key.id(),
            salt,
            next: Some(0),
            aad_scratch: Vec::new(),
        }
    }

    #[test]
    fn a_record_sealed_in_place_is_the_record_of_seal() {
        let k = key(10);
        let (mut a, mut b) = (sealer_with_salt(&k, [3; 16]), sealer_with_salt(&k, [3; 16]));
        for (aad, pt) in [
            (&b"one"[..], &b"first record"[..]),
            (b"", b""),
            (b"x", b"third"),
        ] {
            let mut sealed = b"prefix".to_vec();
            a.seal(aad, pt, &mut sealed).unwrap();
            let mut in_place = b"prefix".to_vec();
            let start = Sealer::begin_record(&mut in_place);
            in_place.extend_from_slice(pt);
            b.seal_record(aad, &mut in_place, start).unwrap();
            assert_eq!(in_place, sealed);
            let mut pt2 = Vec::new();
            Opener::new(&k).open(aad, &sealed[6..], &mut pt2).unwrap();
            assert_eq!(pt2, pt);
        }
    }

    #[test]
    fn records_begun_together_get_their_own_counters() {
        let k = key(11);
        let mut s = sealer_with_salt(&k, [4; 16]);
        let (mut one, mut two) = (Vec::new(), Vec::new());
        let (a, b) = (
            Sealer::begin_record(&mut one),
            Sealer::begin_record(&mut two),
        );
        one.extend_from_slice(b"one");
        two.extend_from_slice(b"two");
        s.seal_record(b"", &mut two, b).unwrap();
        s.seal_record(b"", &mut one, a).unwrap();
        assert_eq!(RecordHeader::parse(&two).unwrap().counter, 0);
        assert_eq!(RecordHeader::parse(&one).unwrap().counter, 1);
        let mut o = Opener::new(&k);
        assert_eq!(o.open_in_place(b"", &mut one).unwrap(), b"one");
        assert_eq!(o.open_in_place(b"", &mut two).unwrap(), b"two");
    }

    #[test]
    fn sealing_in_place_fails_cleanly() {
        let k = key(11);
        let mut s = sealer_with_salt(&k, [4; 16]);
        // The header's room cut into.
        let mut out = b"keep".to_vec();
        let start = Sealer::begin_record(&mut out);
        out.truncate(10);
        assert!(matches!(
            s.seal_record(b"", &mut out, start),
            Err(SealError::BufferShrunk)
        ));
        assert_eq!(out, b"keep");
        // Bytes scribbled over the header's room do not matter: it is written at sealing.
        let start = Sealer::begin_record(&mut out);
        out[5] ^= 0xff;
        out.extend_from_slice(b"data");
        s.seal_record(b"", &mut out, start).unwrap();
        let mut expected = b"keep".to_vec();
        sealer_with_salt(&k, [4; 16])
            .seal(b"", b"data", &mut expected)
            .unwrap();
        assert_eq!(out, expected);
        // Exhausted: nothing is left of the record.
        s.set_next_counter(None);
        let before = out.clone();
        let start = Sealer::begin_record(&mut out);
        out.extend_from_slice(b"more");
        assert!(matches!(
            s.seal_record(b"", &mut out, start),
            Err(SealError::CounterExhausted)
        ));
        assert_eq!(out, before);
    }

    #[test]
    fn open_in_place_returns_the_plaintext_inside_the_record() {
        let k = key(12);
        let mut rec = sealed(&k, b"aad", b"in place");
        let mut o = Opener::new(&k);
        let pt = o.open_in_place(b"aad", &mut rec).unwrap();
        assert_eq!(pt, b"in place");
        assert_eq!(
            &rec[SEAL_HEADER_LEN..SEAL_HEADER_LEN + 8],
            b"in place",
            "decrypted where it was"
        );
        // Wrong aad: the ciphertext is zeroed, header and tag are kept.
        let mut rec = sealed(&k, b"aad", b"secret data");
        let before = rec.clone();
        assert_eq!(
            o.open_in_place(b"other", &mut rec),
            Err(OpenError::Tampered)
        );
        let body = SEAL_HEADER_LEN..rec.len() - SEAL_TAG_LEN;
        assert!(rec[body.clone()].iter().all(|b| *b == 0));
        assert_eq!(rec[..body.start], before[..body.start]);
        assert_eq!(rec[body.end..], before[body.end..]);
        // Header errors touch nothing.
        let mut short = before[..SEAL_OVERHEAD - 1].to_vec();
        assert!(matches!(
            o.open_in_place(b"aad", &mut short),
            Err(OpenError::Truncated { .. })
        ));
        let mut other = before.clone();
        assert!(matches!(
            Opener::new(&key(13)).open_in_place(b"aad", &mut other),
            Err(OpenError::WrongKey { .. })
        ));
        assert_eq!(other, before);
    }

    proptest! {
        #[test]
        fn prop_round_trip(aad in proptest::collection::vec(any::<u8>(), 0..64),
                           records in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..512), 1..6)) {
            let k = key(7);
            let mut s = Sealer::new(&k).unwrap();
            let mut o = Opener::new(&k);
            for (i, pt) in records.iter().enumerate() {
                let mut rec = Vec::new();
                s.seal(&aad, pt, &mut rec).unwrap();
                prop_assert_eq!(rec.len(), pt.len() + SEAL_OVERHEAD);
                prop_assert_eq!(RecordHeader::parse(&rec).unwrap().counter, i as u64);
                let mut out = Vec::new();
                o.open(&aad, &rec, &mut out).unwrap();
                prop_assert_eq!(&out, pt);
            }
        }

        /// Flipping any bit gives a typed error and leaves `out` untouched.
        #[test]
        fn prop_any_bit_flip_rejected(pt in proptest::collection::vec(any::<u8>(), 0..64), bit in any::<usize>()) {
            let k = key(8);
            let rec = sealed(&k, b"aad", &pt);
            let bit = bit % (rec.len() * 8);
            let mut bad = rec.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            let mut out = b"keep".to_vec();
            let err = Opener::new(&k).open(b"aad", &bad, &mut out).unwrap_err();
            let expected_kind = match bit / 8 {
                0 => matches!(err, OpenError::UnsupportedVersion(_)),
                1..=8 => matches!(err, OpenError::WrongKey { .. }),
                _ => err == OpenError::Tampered,
            };
            prop_assert!(expected_kind, "bit {} gave {:?}", bit, err);
            prop_assert_eq!(out, b"keep");
        }

        /// Opening in place and opening into a buffer agree on every input, flipped or not.
        #[test]
        fn prop_open_in_place_agrees_with_open(pt in proptest::collection::vec(any::<u8>(), 0..300),
                                               flip in proptest::option::of(any::<usize>())) {
            let k = key(14);
            let mut rec = sealed(&k, b"aad", &pt);
            if let Some(bit) = flip {
                let bit = bit % (rec.len() * 8);
                rec[bit / 8] ^= 1 << (bit % 8);
            }
            let mut o = Opener::new(&k);
            let mut out = Vec::new();
            let copied = o.open(b"aad", &rec, &mut out).map(|()| out);
            let in_place = o.open_in_place(b"aad", &mut rec).map(|p| p.to_vec());
            prop_assert_eq!(&copied, &in_place);
            if flip.is_none() {
                prop_assert_eq!(copied, Ok(pt));
            }
        }

        #[test]
        fn prop_arbitrary_bytes_never_open(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let k = key(6);
            let mut o = Opener::new(&k);
            let mut out = b"keep".to_vec();
            prop_assert!(o.open(b"", &data, &mut out).is_err());
            prop_assert_eq!(&out, b"keep");
            // Same bytes behind a valid version and key id reach the AEAD.
            let mut framed = vec![SEAL_VERSION];
            framed.extend_from_slice(&k.id().0);
            framed.extend_from_slice(&data);
            let r = o.open(b"", &framed, &mut out);
            if framed.len() < SEAL_OVERHEAD {
                prop_assert_eq!(r, Err(OpenError::Truncated { len: framed.len(), min: SEAL_OVERHEAD }));
            } else {
                prop_assert_eq!(r, Err(OpenError::Tampered));
            }
            prop_assert_eq!(&out, b"keep");
        }
    }
}
