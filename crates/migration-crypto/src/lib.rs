//! Cryptography for live QUIC server migration: sealing checkpoint data,
//! per-migration key agreement, migration tokens, replay protection, rate
//! limiting and key files.
//!
//! ```text
//!   key file ──load_key_file──▶ Key ──┬──▶ Sealer::seal(aad, plaintext) ──▶ sealed record ──┐
//!   (32 raw bytes, 0600)              │                                                     │ network / disk
//!                                     └──▶ Opener::open(aad, sealed) ◀──────────────────────┘
//!                                                  │
//!                                                  ▼ plaintext (or OpenError)
//!
//!   TokenKey ──issue_token(claims)──▶ MigrationToken ──▶ TokenVerifier::verify(token, source, target, now)
//!                                                          parse → MAC → binding → time → ReplayCache
//!                                                                                        │
//!                                                                                        ▼ TokenClaims
//!   RateLimiter::try_acquire(now) ──▶ Ok(()) | RateLimited { retry_after }
//!   sha256(data) / Sha256::update..finish ──▶ Digest
//!
//!   source agent                                         target agent
//!   KeyAgreement::generate ──public_key──▶ (mTLS) ◀──public_key── KeyAgreement::generate
//!        └──agree(peer's, context)──▶ Key  ==  Key ◀──agree(peer's, context)──┘
//! ```
//!
//! ```
//! use migration_crypto::{Key, Opener, Sealer, SEAL_OVERHEAD};
//!
//! let key = Key::generate()?;
//! let mut sealer = Sealer::new(&key)?; // fresh random stream salt
//! let mut record = Vec::new();
//! sealer.seal(b"conn-42", b"checkpoint chunk", &mut record)?;
//! assert_eq!(record.len(), b"checkpoint chunk".len() + SEAL_OVERHEAD);
//!
//! let mut plaintext = Vec::new();
//! Opener::new(&key).open(b"conn-42", &record, &mut plaintext)?;
//! assert_eq!(plaintext, b"checkpoint chunk");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! This is the only crate of the workspace that uses `ring`; every other
//! crate goes through the types here. The library never reads a clock:
//! every time-dependent call takes `now` as an argument, so tests run in
//! virtual time.
//!
//! # Sealing and the nonce scheme
//!
//! Records are sealed with AES-256-GCM. An AES-GCM nonce must never repeat
//! under one key, neither within a long stream nor across process restarts
//! (a process restored from a checkpoint, or a second [`Sealer`] built from
//! the same [`Key`]). The scheme:
//!
//! 1. Each [`Sealer`] draws a fresh random 16-byte *stream salt* from
//!    `ring::rand::SystemRandom` when it is created.
//! 2. It derives a per-stream subkey
//!    `HKDF-SHA256(ikm = key, salt = stream salt, info = "migration-crypto seal v1")`.
//! 3. The 96-bit nonce of record *n* of the stream is
//!    `0x00000000 || n as u64 big-endian`; the counter starts at 0, is never
//!    reused, and a stream that would need counter 2^64 fails with
//!    [`SealError::CounterExhausted`] instead of wrapping.
//!
//! Within a stream, nonces are unique because the counter is. Across
//! streams, (subkey, nonce) pairs are unique because the subkeys differ,
//! which rests on the **random salt alone**: no state is persisted, so a
//! restored process simply draws a new salt. Two streams collide only if
//! their 128-bit salts are equal, probability 2^-128 for a pair (about
//! 2^-65 after 2^32 streams under one key). A checkpointed [`Sealer`] that is
//! restored *twice* would continue the same stream twice; callers must
//! create a fresh `Sealer` after a restore rather than reuse one that lived
//! in the checkpointed memory image.
//!
//! Record format (all integers big-endian):
//!
//! ```text
//! version u8 (=1) | key_id [8] | salt [16] | counter u64 | ciphertext | tag [16]
//! └──────────────── header (33 bytes) ──────────────────┘
//! ```
//!
//! The AEAD associated data is `header || caller aad`, so any change to the
//! header, the ciphertext, the tag or the caller's aad makes
//! [`Opener::open`] fail with [`OpenError::Tampered`]. The key id lets the
//! opener report [`OpenError::WrongKey`] instead of a bare authentication
//! failure. [`SEAL_OVERHEAD`] is the number of bytes a record adds to its
//! plaintext. A bulk caller need not copy its data: [`Sealer::begin_record`]
//! and [`Sealer::seal_record`] seal a plaintext written straight into the
//! output buffer (by a compressor, say), and [`Opener::open_in_place`]
//! decrypts a record where it lies; the records and plaintexts are those of
//! `seal` and `open`. The [`Opener`] caches the subkey of the last salt it
//! saw, so key derivation happens once per stream, not once per record. The
//! opener does not enforce counter order; [`RecordHeader::parse`] exposes the salt
//! and counter for callers that want to.
//!
//! # Per-migration keys
//!
//! Two agents that move a server between hosts agree on a fresh sealing [`Key`] for each
//! migration instead of sharing a long-lived one: each side generates a [`KeyAgreement`] (an
//! ephemeral X25519 key pair from `ring::agreement`), sends its
//! [`public_key`](KeyAgreement::public_key) over the agents' mutually authenticated TLS
//! connection, and calls [`KeyAgreement::agree`] with the peer's public key and a `context`
//! both sides know (the migration id and the two hosts' names). The key is
//!
//! ```text
//! HKDF-SHA256(salt = "migration-crypto agreement v1",
//!             ikm  = X25519 shared secret || lower public key || higher public key,
//!             info = context)                                   → 32 bytes → Key
//! ```
//!
//! The two public keys go in byte order, so both sides build the same input whichever calls
//! first; binding them ties the key to this exchange, and the context ties it to this
//! migration (another context gives another key, which [`Opener::open`] refuses as
//! [`OpenError::WrongKey`]). [`AgreementError`] refuses a peer key of the wrong length, a point
//! of small order (X25519's all-zero secret, all zeros among them) and our own public key
//! reflected back; no input panics. The private key is used once (`agree` consumes it). The
//! agreement authenticates nobody by itself: the public keys must travel over the
//! authenticated channel. The copies of the shared secret this crate makes (the HKDF input, the
//! derived bytes) are zeroized; ring's own private key and its stack copy of the secret are
//! not (see "Key material").
//!
//! # Tokens
//!
//! A [`MigrationToken`] is a canonical encoding of [`TokenClaims`] followed by
//! an HMAC-SHA256 tag under a [`TokenKey`]. [`TokenVerifier::verify`] checks,
//! in order: structure ([`TokenError::Malformed`]), the tag in constant time
//! ([`TokenError::Forged`]), the source/target binding
//! ([`TokenError::WrongBinding`]), validity time with a clock-skew leeway
//! ([`TokenError::NotYetValid`], [`TokenError::Expired`]) and finally the
//! bounded [`ReplayCache`] ([`TokenError::Replayed`],
//! [`TokenError::ReplayCacheFull`]).
//!
//! # Key material
//!
//! [`Key`] and [`TokenKey`] zeroize their bytes on drop and their `Debug`
//! output shows only a key id. Keys expanded inside `ring` (AES round keys,
//! HMAC pads, the X25519 private key of a [`KeyAgreement`] and the shared
//! secret on ring's stack) are outside this crate's control and are not
//! zeroized.

mod agreement;
mod digest;
mod hex;
mod key;
mod rate;
mod seal;
mod token;

pub use crate::agreement::{AGREEMENT_PUBLIC_KEY_LEN, AgreementError, KeyAgreement};
pub use crate::digest::{Digest, Sha256, sha256};
pub use crate::key::{
    CryptoError, Key, KeyError, KeyFileError, KeyId, load_key_file, load_token_key_file,
    write_key_file, write_token_key_file,
};
pub use crate::rate::{RateLimited, RateLimiter};
pub use crate::seal::{
    OpenError, Opener, RecordHeader, RecordStart, SALT_LEN, SEAL_HEADER_LEN, SEAL_OVERHEAD,
    SEAL_TAG_LEN, SEAL_VERSION, SealError, Sealer,
};
pub use crate::token::{
    MAX_FIELD_LEN, MAX_TOKEN_LEN, MigrationToken, ReplayCache, TOKEN_TAG_LEN, TOKEN_VERSION,
    TokenClaims, TokenError, TokenField, TokenKey, TokenVerifier, issue_token,
};
