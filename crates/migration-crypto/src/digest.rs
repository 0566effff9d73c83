//! SHA-256 digests.

use std::fmt;

use ring::digest;

/// A SHA-256 digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, serde::Serialize, serde::Deserialize)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// Length of a digest in bytes.
    pub const LEN: usize = 32;
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        crate::hex::write_hex(f, &self.0)
    }
}

impl AsRef<[u8]> for Digest {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

fn to_digest(d: &digest::Digest) -> Digest {
    let mut out = [0u8; 32];
    // SHA-256 output is always 32 bytes.
    out.copy_from_slice(d.as_ref());
    Digest(out)
}

/// SHA-256 of `data` in one call.
pub fn sha256(data: &[u8]) -> Digest {
    to_digest(&digest::digest(&digest::SHA256, data))
}

/// Incremental SHA-256: [`Sha256::new`], any number of [`Sha256::update`],
/// then [`Sha256::finish`].
#[derive(Clone)]
pub struct Sha256 {
    ctx: digest::Context,
}

impl Sha256 {
    /// Starts a new hash.
    pub fn new() -> Self {
        Self {
            ctx: digest::Context::new(&digest::SHA256),
        }
    }

    /// Feeds `data` into the hash.
    pub fn update(&mut self, data: &[u8]) {
        self.ctx.update(data);
    }

    /// Consumes the hasher and returns the digest.
    pub fn finish(self) -> Digest {
        to_digest(&self.ctx.finish())
    }
}

impl Default for Sha256 {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sha256").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_answer_empty_and_abc() {
        assert_eq!(
            sha256(b"").to_string(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            sha256(b"abc").to_string(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    proptest! {
        #[test]
        fn incremental_matches_one_shot(data in proptest::collection::vec(any::<u8>(), 0..2048), split in 0usize..2048) {
            let split = split.min(data.len());
            let mut h = Sha256::new();
            h.update(&data[..split]);
            h.update(&data[split..]);
            prop_assert_eq!(h.finish(), sha256(&data));
        }
    }
}
