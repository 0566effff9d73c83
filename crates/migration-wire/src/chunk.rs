//! Streaming a directory of files (a CRIU image set) as ordered, self-verifying chunks.
//!
//! ```text
//!  root/ ──walk (sorted)──► file ──read chunk_size──► sha256 (unsealed only) ──┐
//!                                                                              ├─► Chunk{seq, path,
//!        compress (kept if it saves 1/16, else raw) ──► seal(aad) in place ───┘   offset, len, mode,
//!                                                                     digest?, last_of_file,
//!                                                                     compressed, payload}
//!  Header{version 2, compression, sealed_with, chunk_size, digests}
//!    ─► Chunk 0 ─► Chunk 1 ─► … ─► End{chunks, files, bytes, digest[, seal]}
//! ```
//!
//! A stream is one [`StreamItem::Header`], the chunks of every regular file in a deterministic
//! order (directory entries sorted by name, depth first), then one [`StreamItem::End`]. Each
//! item travels in one [`frame`]. The [`Reassembler`](crate::reassemble::Reassembler) rebuilds
//! the tree on the other side.
//!
//! # Three stages in `write_to`
//!
//! [`Chunker::write_to`] runs the sender as a pipeline joined by bounded channels:
//!
//! ```text
//!  chunk-reader thread         chunk-sealer thread                 calling thread
//!  walk, read[, sha256] ──2──►  compress, seal, frame head ──2──►  sink.put(head, payload)
//!        ▲                          │       ▲                           │
//!        └── plaintext buffer ◄─────┘       └──── frame buffer ◄────────┘
//! ```
//!
//! Compression dominates; giving it a thread of its own, and the writes another, means it
//! neither waits for the disk nor for a slow reader on the other end of `w`. The bytes
//! written are exactly those of framing every [`Chunker::next_item`] in turn: one thread
//! compresses and seals, in sequence order. At most [`READ_BUFFERS`] plaintext buffers and
//! [`FRAME_BUFFERS`] frame buffers exist at once, so memory stays a few chunks whatever the
//! size of the tree. Neither thread outlives the call. [`Chunker::write_frames`] hands each
//! frame to a [`FrameSink`] instead of a `Write`, which may keep the payload's buffer (to give it
//! to a network stack without copying it); the pipeline then allocates another.
//!
//! # Integrity and authenticity
//!
//! * The header says how chunks prove their content ([`ChunkDigests`]). In an unsealed stream
//!   every chunk carries the SHA-256 of its plaintext ([`ChunkDigests::Sha256`]), checked after
//!   decompressing; the receiver refuses an unsealed stream without digests.
//! * When the stream is sealed, the AEAD associated data of a chunk is its *descriptor*
//!   `(seq, path, offset, len, mode, last_of_file, compressed, digest if any)`, so a chunk cannot
//!   be altered, nor moved to another position, file or offset, without failing to open. The
//!   tag therefore already proves the plaintext (decompression is deterministic and the length
//!   is checked), and a sealed stream carries no per-chunk digest ([`ChunkDigests::SealOnly`]):
//!   hashing every byte twice more cost a fifth of the transfer's CPU.
//! * The end's digest is the SHA-256 of all descriptors in order (a superset of "a digest over
//!   the chunk digests": it also binds paths and offsets). When sealed, the end carries a sealed
//!   empty record whose associated data binds the header (its `digests` among it) and the
//!   summary, so a man in the middle can neither truncate the stream and forge a matching end
//!   nor change the header unnoticed; a flipped `digests` is refused earlier still, at the first
//!   chunk, whose digest is then missing or unexpected.
//! * A chunk's payload is compressed only if that saves at least 1/16 of it
//!   ([`Chunk::compressed`]); otherwise it is the plaintext itself, which the receiver does not
//!   decompress. After a chunk that did not compress, only the next one's first 64 KiB are
//!   tried first, so that an incompressible stretch (random or encrypted memory) is not
//!   compressed in vain chunk after chunk.
//!
//! # Format versions
//!
//! [`STREAM_VERSION`] 2 added the header's `digests` and the chunk's `compressed`, made the
//! chunk's digest optional, and changed the descriptor and the end's associated data (labels
//! `v2`). A receiver refuses any other version ([`UnsupportedVersion`]): both agents of a
//! migration run the same build.
//!
//! [`UnsupportedVersion`]: crate::reassemble::ReassembleError::UnsupportedVersion
//!
//! A whole old stream sealed under the same key can still be replayed: freshness belongs to the
//! control protocol (tokens), not to this layer.
//!
//! # Symlinks
//!
//! A symlink whose target resolves inside the root and is a regular file is sent as that file
//! (its content and the target's mode, under the link's own path). A symlink that resolves
//! outside the root fails with [`ChunkError::SymlinkEscapes`]; one to a directory or anything
//! else fails with [`ChunkError::UnsupportedFileType`] (following directory links would allow
//! cycles). CRIU image directories hold no symlinks, so refusing the odd cases costs nothing.
//! Empty directories are not transmitted: only files are.

use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError};
use std::thread;

use migration_crypto::{Digest, KeyId, SEAL_OVERHEAD, SealError, Sealer, Sha256, sha256};
use serde::{Deserialize, Serialize, Serializer};

use crate::compress::{Codec, CompressError, Compression};
use crate::frame::{self, FrameError};

/// Version of the stream format carried in [`StreamHeader::version`] (see "Format versions"
/// in the [module documentation](self)).
pub const STREAM_VERSION: u16 = 2;
/// Default chunk size: 1 MiB.
pub const DEFAULT_CHUNK_SIZE: usize = 1 << 20;
/// Largest chunk size a [`Chunker`] accepts (8 MiB), so that any chunk fits in a
/// [`frame::DEFAULT_MAX_FRAME`] frame whatever the compression.
pub const MAX_CHUNK_SIZE: usize = 8 << 20;
/// Longest relative path carried in a chunk, in bytes.
pub const MAX_PATH_LEN: usize = 4096;
/// Permission bits a file is recreated with: no setuid, setgid or sticky bit.
pub const MODE_MASK: u32 = 0o777;
/// Plaintext buffers of `chunk_size` bytes that [`Chunker::write_to`] keeps at most: one being
/// read, one queued, one being compressed and sealed.
pub const READ_BUFFERS: usize = 3;
/// Frame buffers (each about one chunk) that [`Chunker::write_to`] keeps at most: one being
/// filled, one queued, one being written.
pub const FRAME_BUFFERS: usize = 3;
/// Items queued between two stages of [`Chunker::write_to`].
const QUEUE_DEPTH: usize = 2;

/// A chunk is sent compressed only if that saves at least `len >> MIN_SAVING_SHIFT` bytes (1/16):
/// below that, the receiver's decompression costs more than the bytes saved.
const MIN_SAVING_SHIFT: u32 = 4;
/// After a chunk that did not compress, the next one's first `PROBE_LEN` bytes are compressed
/// first: if they do not compress either, the chunk is sent raw without compressing the rest.
/// A long incompressible stretch (a process's random or encrypted memory) then costs 1/16 of
/// compressing it, not all of it.
const PROBE_LEN: usize = 64 << 10;

const CHUNK_AAD_LABEL: &[u8] = b"migration-wire chunk v2\0";
const END_AAD_LABEL: &[u8] = b"migration-wire end v2\0";
/// Index of [`StreamItem::Chunk`] among the variants, as postcard encodes it.
const CHUNK_VARIANT: u32 = 1;

/// One unit of a stream; each is carried in one frame.
///
/// Deliberately exhaustive: a new kind of item is a new [`STREAM_VERSION`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum StreamItem {
    /// First item: how the chunks are encoded.
    Header(StreamHeader),
    /// A piece of one file.
    Chunk(Chunk),
    /// Last item: totals to check against what was received.
    End(StreamEnd),
}

/// Opens a stream.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamHeader {
    /// Stream format version, [`STREAM_VERSION`]. First, so that a receiver reads it before
    /// the rest, whose layout depends on it.
    pub version: u16,
    /// Compression of the payloads of chunks marked [`Chunk::compressed`].
    pub compression: Compression,
    /// Key the payloads are sealed with, `None` for an unsealed stream.
    pub sealed_with: Option<KeyId>,
    /// Plaintext size of every chunk but the last of each file.
    pub chunk_size: u32,
    /// Whether chunks carry a digest of their plaintext (version 2 on).
    pub digests: ChunkDigests,
}

/// How the chunks of a stream prove their content ([`StreamHeader::digests`]).
///
/// Deliberately exhaustive: another kind is a new [`STREAM_VERSION`].
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkDigests {
    /// Every chunk carries the SHA-256 of its plaintext, which the receiver checks. Required in
    /// an unsealed stream.
    Sha256,
    /// Chunks carry no digest: each is sealed with its descriptor as associated data, so its
    /// AEAD tag proves its content and its place. Valid only in a sealed stream.
    SealOnly,
}

impl ChunkDigests {
    /// What a [`Chunker`] uses: no digests when it seals, SHA-256 otherwise.
    fn for_stream(sealed: bool) -> Self {
        if sealed {
            ChunkDigests::SealOnly
        } else {
            ChunkDigests::Sha256
        }
    }
}

/// A piece of a file.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Position in the stream, from 0, without gaps.
    pub seq: u64,
    /// Path of the file relative to the root, `/`-separated.
    pub path: String,
    /// Offset of this chunk in the file.
    pub offset: u64,
    /// Plaintext length.
    pub len: u32,
    /// Permission bits of the file (masked with [`MODE_MASK`]).
    pub mode: u32,
    /// SHA-256 of the plaintext: present if and only if the header says
    /// [`ChunkDigests::Sha256`].
    pub digest: Option<Digest>,
    /// This is the file's last chunk.
    pub last_of_file: bool,
    /// The payload is compressed with the stream's compression; `false`, it is the plaintext
    /// itself (always in an uncompressed stream; otherwise when compressing saved less than
    /// 1/16, or when, after a chunk that did not compress, a probe of this one's start did
    /// not either).
    pub compressed: bool,
    /// `seal(payload)` in a sealed stream, the payload itself otherwise.
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
}

impl fmt::Debug for Chunk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Chunk")
            .field("seq", &self.seq)
            .field("path", &self.path)
            .field("offset", &self.offset)
            .field("len", &self.len)
            .field("mode", &format_args!("{:o}", self.mode))
            .field("digest", &self.digest.map(|d| d.to_string()))
            .field("last_of_file", &self.last_of_file)
            .field("compressed", &self.compressed)
            .field("payload_len", &self.payload.len())
            .finish()
    }
}

impl Chunk {
    /// Writes the chunk's descriptor into `out` (cleared first): the sealing AAD and the unit
    /// of the end digest.
    #[cfg(test)]
    pub(crate) fn descriptor(&self, out: &mut Vec<u8>) {
        self.fields().descriptor(out);
    }

    /// The chunk's fields but its payload, borrowed, and its payload, mutable (the receiver
    /// opens it in place).
    pub(crate) fn split_mut(&mut self) -> (ChunkFields<'_>, &mut [u8]) {
        let fields = ChunkFields {
            seq: self.seq,
            path: &self.path,
            offset: self.offset,
            len: self.len,
            mode: self.mode,
            digest: self.digest,
            last_of_file: self.last_of_file,
            compressed: self.compressed,
        };
        (fields, &mut self.payload)
    }

    /// The chunk's fields but its payload, borrowed.
    #[cfg(test)]
    pub(crate) fn fields(&self) -> ChunkFields<'_> {
        ChunkFields {
            seq: self.seq,
            path: &self.path,
            offset: self.offset,
            len: self.len,
            mode: self.mode,
            digest: self.digest,
            last_of_file: self.last_of_file,
            compressed: self.compressed,
        }
    }

    /// The chunk's fields, borrowed.
    #[cfg(test)]
    pub(crate) fn borrowed(&self) -> ChunkRef<'_> {
        let f = self.fields();
        ChunkRef {
            seq: f.seq,
            path: f.path,
            offset: f.offset,
            len: f.len,
            mode: f.mode,
            digest: f.digest,
            last_of_file: f.last_of_file,
            compressed: f.compressed,
            payload: &self.payload,
        }
    }
}

/// The fields of a chunk but its payload, borrowed: what its descriptor is made of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ChunkFields<'a> {
    pub(crate) seq: u64,
    pub(crate) path: &'a str,
    pub(crate) offset: u64,
    pub(crate) len: u32,
    pub(crate) mode: u32,
    pub(crate) digest: Option<Digest>,
    pub(crate) last_of_file: bool,
    pub(crate) compressed: bool,
}

impl ChunkFields<'_> {
    /// The same fields with another path (one the caller owns).
    pub(crate) fn with_path<'p>(&self, path: &'p str) -> ChunkFields<'p> {
        ChunkFields {
            seq: self.seq,
            path,
            offset: self.offset,
            len: self.len,
            mode: self.mode,
            digest: self.digest,
            last_of_file: self.last_of_file,
            compressed: self.compressed,
        }
    }

    /// Writes the chunk's descriptor into `out` (cleared first): the sealing AAD and the unit
    /// of the end digest.
    ///
    /// ```text
    /// "migration-wire chunk v2\0" | seq u64 | offset u64 | len u32 | mode u32
    ///   | flags u8 (1: last_of_file, 2: compressed) | 0, or 1 + digest [32]
    ///   | path length u64 | path          (integers big-endian)
    /// ```
    pub(crate) fn descriptor(&self, out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(CHUNK_AAD_LABEL);
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.offset.to_be_bytes());
        out.extend_from_slice(&self.len.to_be_bytes());
        out.extend_from_slice(&self.mode.to_be_bytes());
        out.push(u8::from(self.last_of_file) | (u8::from(self.compressed) << 1));
        match &self.digest {
            None => out.push(0),
            Some(d) => {
                out.push(1);
                out.extend_from_slice(&d.0);
            }
        }
        // Path last, length-prefixed: the encoding is unambiguous.
        out.extend_from_slice(&(self.path.len() as u64).to_be_bytes());
        out.extend_from_slice(self.path.as_bytes());
    }
}

/// A [`Chunk`] borrowing its path and payload from a frame body: the receiver decodes this to
/// avoid copying each payload out of the frame. Same encoding as [`Chunk`].
#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ChunkRef<'a> {
    pub(crate) seq: u64,
    pub(crate) path: &'a str,
    pub(crate) offset: u64,
    pub(crate) len: u32,
    pub(crate) mode: u32,
    pub(crate) digest: Option<Digest>,
    pub(crate) last_of_file: bool,
    pub(crate) compressed: bool,
    pub(crate) payload: &'a [u8],
}

impl<'a> ChunkRef<'a> {
    /// The chunk's fields but its payload.
    pub(crate) fn fields(&self) -> ChunkFields<'a> {
        ChunkFields {
            seq: self.seq,
            path: self.path,
            offset: self.offset,
            len: self.len,
            mode: self.mode,
            digest: self.digest,
            last_of_file: self.last_of_file,
            compressed: self.compressed,
        }
    }
}

/// A [`StreamItem`] whose chunk borrows from the frame body. Same encoding (the variants are in
/// the same order).
#[derive(Deserialize, Debug)]
pub(crate) enum StreamItemRef<'a> {
    /// See [`StreamItem::Header`].
    Header(StreamHeader),
    /// See [`StreamItem::Chunk`].
    #[serde(borrow)]
    Chunk(ChunkRef<'a>),
    /// See [`StreamItem::End`].
    End(StreamEnd),
}

/// Totals of a stream.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamSummary {
    /// Number of chunks.
    pub chunks: u64,
    /// Number of files.
    pub files: u64,
    /// Plaintext bytes over all files.
    pub bytes: u64,
    /// SHA-256 over the descriptors of all chunks, in order.
    pub digest: Digest,
}

/// Closes a stream.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct StreamEnd {
    /// What the sender sent.
    pub summary: StreamSummary,
    /// In a sealed stream, an empty record sealed with the header and summary as AAD.
    #[serde(with = "serde_bytes")]
    pub seal: Option<Vec<u8>>,
}

/// Writes the AAD of the end record into `out` (cleared first).
pub(crate) fn end_aad(
    out: &mut Vec<u8>,
    header: &StreamHeader,
    summary: &StreamSummary,
) -> Result<(), postcard::Error> {
    out.clear();
    out.extend_from_slice(END_AAD_LABEL);
    let taken = std::mem::take(out);
    let mut v = postcard::to_extend(header, taken)?;
    v = postcard::to_extend(summary, v)?;
    *out = v;
    Ok(())
}

/// Whether `path` is a safe relative path: non-empty components separated by single `/`, no
/// `.` or `..`, no NUL, no backslash, not absolute, at most [`MAX_PATH_LEN`] bytes.
pub fn is_safe_relative_path(path: &str) -> bool {
    !path.is_empty()
        && path.len() <= MAX_PATH_LEN
        && !path.contains(['\0', '\\'])
        && path
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
}

/// Configuration of a [`Chunker`].
#[derive(Debug)]
pub struct ChunkerConfig {
    /// Plaintext bytes per chunk, 1 to [`MAX_CHUNK_SIZE`].
    pub chunk_size: usize,
    /// Compression of the payloads.
    pub compression: Compression,
    /// Seal payloads with this sealer (a fresh one per stream).
    pub sealer: Option<Sealer>,
}

impl Default for ChunkerConfig {
    fn default() -> Self {
        Self {
            chunk_size: DEFAULT_CHUNK_SIZE,
            compression: Compression::Zstd {
                level: crate::compress::DEFAULT_ZSTD_LEVEL,
            },
            sealer: None,
        }
    }
}

/// Where [`Chunker::write_frames`] puts a stream, one frame at a time.
pub trait FrameSink {
    /// Takes one frame: `head` (the length prefix and every byte before the payload), then
    /// `payload` (empty for a header or an end). The sink may keep `payload`'s buffer, leaving
    /// an empty one in its place (`std::mem::take`), for instance to hand it to a network
    /// stack without copying it; a buffer left in place is reused for a later frame.
    fn put(&mut self, head: &[u8], payload: &mut Vec<u8>) -> io::Result<()>;

    /// Called once, after the end's frame.
    fn flush(&mut self) -> io::Result<()>;
}

impl<S: FrameSink + ?Sized> FrameSink for &mut S {
    fn put(&mut self, head: &[u8], payload: &mut Vec<u8>) -> io::Result<()> {
        (**self).put(head, payload)
    }

    fn flush(&mut self) -> io::Result<()> {
        (**self).flush()
    }
}

/// The [`FrameSink`] of [`Chunker::write_to`]: writes each frame's bytes to a `Write` and
/// keeps no buffer.
#[derive(Debug)]
pub struct WriteSink<W>(pub W);

impl<W: Write> FrameSink for WriteSink<W> {
    fn put(&mut self, head: &[u8], payload: &mut Vec<u8>) -> io::Result<()> {
        self.0.write_all(head)?;
        self.0.write_all(payload)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// Errors of the [`Chunker`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChunkError {
    /// The chunk size is 0 or above [`MAX_CHUNK_SIZE`].
    #[error("chunk size {size} is not within 1..={max}")]
    InvalidChunkSize {
        /// Requested size.
        size: usize,
        /// Largest accepted size.
        max: usize,
    },
    /// The root is not a directory.
    #[error("{path} is not a directory")]
    NotADirectory {
        /// The root given.
        path: PathBuf,
    },
    /// A filesystem operation failed.
    #[error("{path}: {source}")]
    Io {
        /// File or directory concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A file name is not valid UTF-8 (paths travel as strings).
    #[error("path is not valid UTF-8: {path:?}")]
    NonUtf8Path {
        /// The offending path.
        path: PathBuf,
    },
    /// A path the receiver would refuse (a backslash in a name, or longer than
    /// [`MAX_PATH_LEN`]).
    #[error("path {path:?} cannot be sent safely")]
    UnsupportedName {
        /// The relative path.
        path: String,
    },
    /// A symlink resolves to a location outside the root.
    #[error("symlink {path} resolves outside the root, to {target}")]
    SymlinkEscapes {
        /// The symlink.
        path: PathBuf,
        /// Where it resolves to.
        target: PathBuf,
    },
    /// Not a regular file, a directory or a symlink to a regular file inside the root.
    #[error("{path} is not a regular file, a directory or a symlink to a file in the root")]
    UnsupportedFileType {
        /// The offending entry.
        path: PathBuf,
    },
    /// Compression failed or the level is invalid.
    #[error(transparent)]
    Compress(#[from] CompressError),
    /// Sealing failed.
    #[error("sealing a chunk: {0}")]
    Seal(#[from] SealError),
    /// An item could not be framed.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The writer given to [`Chunker::write_to`] (or the sink given to
    /// [`Chunker::write_frames`]) failed.
    #[error("writing the stream: {0}")]
    Write(#[source] io::Error),
    /// The chunker failed earlier; the stream cannot continue.
    #[error("the chunker failed earlier and cannot continue")]
    Failed,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ChunkError + '_ {
    move |source| ChunkError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A directory being walked: its relative path and its remaining entries, sorted, reversed.
#[derive(Debug)]
struct DirFrame {
    rel: String,
    rest: Vec<String>,
}

#[derive(Debug)]
struct OpenFile {
    file: File,
    rel: String,
    offset: u64,
    mode: u32,
    /// A byte read past a full chunk to learn that the file goes on.
    peek: Option<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Start,
    Walking,
    Done,
    Failed,
}

/// A chunk as read: every field but the payload. Its plaintext is the first `len` bytes of the
/// buffer it was read into.
#[derive(Debug)]
struct ChunkMeta {
    seq: u64,
    path: String,
    offset: u64,
    len: u32,
    mode: u32,
    digest: Option<Digest>,
    last_of_file: bool,
    /// Set by the [`Encoder`] once it knows.
    compressed: bool,
}

/// Counts of a finished walk (the digest is the [`Encoder`]'s).
#[derive(Debug, Clone, Copy)]
struct Totals {
    chunks: u64,
    files: u64,
    bytes: u64,
}

/// What the [`Walker`] produced.
#[derive(Debug)]
enum Walked {
    Header,
    Chunk(ChunkMeta),
    End(Totals),
}

/// The reading half of a chunker: walks the tree, reads and (in an unsealed stream) digests
/// chunks. Runs on the read thread in [`Chunker::write_to`].
#[derive(Debug)]
struct Walker {
    root: PathBuf,
    chunk_size: usize,
    /// Compute each chunk's digest ([`ChunkDigests::Sha256`]).
    digests: bool,
    state: State,
    stack: Vec<DirFrame>,
    current: Option<OpenFile>,
    seq: u64,
    files: u64,
    bytes: u64,
}

/// Where [`Encoder::payload`] left a chunk's payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PayloadAt {
    /// The payload is the plaintext itself (unsealed, uncompressed stream).
    Plain,
    /// The payload was appended to the output buffer.
    Out,
}

/// The encoding half of a chunker: compresses, seals and folds descriptors into the end
/// digest, strictly in sequence order.
struct Encoder {
    header: StreamHeader,
    compression: Compression,
    sealer: Option<Sealer>,
    codec: Codec,
    aad: Vec<u8>,
    /// The last chunk was not worth compressing: probe the next one first.
    incompressible: bool,
    /// Output of a probe.
    probe: Vec<u8>,
    hasher: Option<Sha256>,
    /// Fail to compress the chunk with this sequence number (tests of error paths).
    #[cfg(test)]
    fail_at: Option<u64>,
    /// Chunks sent raw on a probe alone.
    #[cfg(test)]
    probed_raw: u64,
}

impl fmt::Debug for Encoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Encoder")
            .field("header", &self.header)
            .field("sealer", &self.sealer)
            .finish_non_exhaustive()
    }
}

/// Turns a directory tree into stream items, one file chunk at a time.
///
/// Memory is bounded by one read buffer of `chunk_size` bytes, plus the payload of the item
/// being returned, whatever the size of the files. [`Chunker::write_to`] keeps at most
/// [`READ_BUFFERS`] read buffers and [`FRAME_BUFFERS`] frame buffers instead.
pub struct Chunker {
    walker: Walker,
    enc: Encoder,
    /// Read buffer of [`Chunker::next_item`]; its length stays `chunk_size` (initialized
    /// once).
    buf: Vec<u8>,
}

impl fmt::Debug for Chunker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Chunker")
            .field("root", &self.walker.root)
            .field("header", &self.enc.header)
            .field("state", &self.walker.state)
            .field("seq", &self.walker.seq)
            .field("files", &self.walker.files)
            .field("bytes", &self.walker.bytes)
            .finish_non_exhaustive()
    }
}

impl Chunker {
    /// Prepares to stream the tree under `root`. Nothing is read until [`Chunker::next_item`]
    /// or [`Chunker::write_to`].
    pub fn new(root: &Path, config: ChunkerConfig) -> Result<Chunker, ChunkError> {
        let ChunkerConfig {
            chunk_size,
            compression,
            sealer,
        } = config;
        if chunk_size == 0 || chunk_size > MAX_CHUNK_SIZE {
            return Err(ChunkError::InvalidChunkSize {
                size: chunk_size,
                max: MAX_CHUNK_SIZE,
            });
        }
        compression.check_level()?;
        let canonical = fs::canonicalize(root).map_err(io_err(root))?;
        let meta = fs::metadata(&canonical).map_err(io_err(root))?;
        if !meta.is_dir() {
            return Err(ChunkError::NotADirectory {
                path: root.to_owned(),
            });
        }
        let digests = ChunkDigests::for_stream(sealer.is_some());
        let header = StreamHeader {
            version: STREAM_VERSION,
            compression,
            sealed_with: sealer.as_ref().map(Sealer::key_id),
            // chunk_size <= MAX_CHUNK_SIZE fits in u32.
            chunk_size: chunk_size as u32,
            digests,
        };
        Ok(Chunker {
            walker: Walker {
                root: canonical,
                chunk_size,
                digests: digests == ChunkDigests::Sha256,
                state: State::Start,
                stack: Vec::new(),
                current: None,
                seq: 0,
                files: 0,
                bytes: 0,
            },
            enc: Encoder {
                header,
                compression,
                sealer,
                codec: Codec::new(),
                aad: Vec::new(),
                incompressible: false,
                probe: Vec::new(),
                hasher: Some(Sha256::new()),
                #[cfg(test)]
                fail_at: None,
                #[cfg(test)]
                probed_raw: 0,
            },
            buf: Vec::new(),
        })
    }

    /// The header this chunker sends first.
    pub fn header(&self) -> &StreamHeader {
        &self.enc.header
    }

    /// Capacity of the buffers the chunker keeps between items (the read buffer). Stays
    /// within a chunk whatever the size of the files.
    pub fn buffer_capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Makes a sealed stream carry chunk digests anyway (tests of the receiver, which accepts
    /// that).
    #[cfg(test)]
    pub(crate) fn with_digests(mut self) -> Self {
        self.enc.header.digests = ChunkDigests::Sha256;
        self.walker.digests = true;
        self
    }

    /// The next item of the stream, `Ok(None)` after the end. After an error every later call
    /// fails with [`ChunkError::Failed`].
    pub fn next_item(&mut self) -> Result<Option<StreamItem>, ChunkError> {
        let res = match self.walker.next(&mut self.buf)? {
            None => return Ok(None),
            Some(Walked::Header) => Ok(StreamItem::Header(self.enc.header)),
            Some(Walked::Chunk(mut meta)) => {
                let plain = &self.buf[..meta.len as usize];
                let mut payload = Vec::new();
                self.enc.payload(&mut meta, plain, &mut payload).map(|at| {
                    if at == PayloadAt::Plain {
                        payload.extend_from_slice(plain);
                    }
                    StreamItem::Chunk(meta.into_chunk(payload))
                })
            }
            Some(Walked::End(totals)) => self.enc.end(totals).map(StreamItem::End),
        };
        if res.is_err() {
            self.walker.fail();
        }
        res.map(Some)
    }

    /// Writes the whole stream (from where [`Chunker::next_item`] left it, normally the start)
    /// to `w` as frames, then flushes it; returns the totals sent.
    ///
    /// Two threads started for the call walk, read and digest the files, and compress, seal
    /// and frame the chunks, while this one writes the frames (see the
    /// [module documentation](self)); the bytes written are the same as framing each
    /// [`Chunker::next_item`] in turn. An error of any stage is returned as `next_item` or the
    /// writer ([`ChunkError::Write`]) would return it, after the frames of the items before it;
    /// both threads have ended by then. If the threads cannot be started, the stream is written
    /// from this thread alone.
    pub fn write_to<W: Write>(self, w: W) -> Result<StreamSummary, ChunkError> {
        self.write_frames(WriteSink(w))
    }

    /// [`Chunker::write_to`] into a [`FrameSink`], which is given each frame's head and payload
    /// and may keep the payload's buffer instead of copying it; its errors are
    /// [`ChunkError::Write`].
    pub fn write_frames<S: FrameSink>(self, sink: S) -> Result<StreamSummary, ChunkError> {
        self.write_pipelined(sink).0
    }

    /// [`Chunker::write_frames`], also returning what the threads allocated (`None` when it
    /// ran on this thread alone).
    fn write_pipelined<S: FrameSink>(
        self,
        mut w: S,
    ) -> (Result<StreamSummary, ChunkError>, Option<PipeStats>) {
        let Chunker { walker, enc, buf } = self;
        // Each thread waits for its state before doing anything, so that if either cannot be
        // started both states are still here for the sequential fallback.
        let (start_read_tx, start_read_rx) = mpsc::sync_channel::<Walker>(1);
        let (start_seal_tx, start_seal_rx) = mpsc::sync_channel::<Encoder>(1);
        let (items_tx, items_rx) = mpsc::sync_channel::<Piped>(QUEUE_DEPTH);
        let (ready_tx, ready_rx) = mpsc::sync_channel::<Result<Ready, ChunkError>>(QUEUE_DEPTH);
        // Room for every buffer that can exist: returning one never blocks.
        let (free_read_tx, free_read_rx) = mpsc::sync_channel::<Vec<u8>>(READ_BUFFERS);
        let (free_frame_tx, free_frame_rx) = mpsc::sync_channel::<FrameBufs>(FRAME_BUFFERS);
        let free_read_tx2 = free_read_tx.clone();
        // Set by the writing side when it stops early (its writer failed, or an error came
        // through); the other two stop at their next item instead of reading and sealing the
        // rest of the tree.
        let cancel = AtomicBool::new(false);
        let cancel = &cancel;
        thread::scope(|s| {
            let reader = thread::Builder::new()
                .name("chunk-reader".into())
                .spawn_scoped(s, move || {
                    let walker = start_read_rx.recv().ok()?;
                    Some(read_side(walker, &items_tx, &free_read_rx, cancel))
                });
            let sealer = thread::Builder::new()
                .name("chunk-sealer".into())
                .spawn_scoped(s, move || {
                    let enc = start_seal_rx.recv().ok()?;
                    Some(seal_side(
                        enc,
                        items_rx,
                        ready_tx,
                        free_read_tx,
                        free_frame_rx,
                        cancel,
                    ))
                });
            let (Ok(reader), Ok(sealer)) = (reader, sealer) else {
                // Dropping the start senders ends whichever thread was started.
                drop((start_read_tx, start_seal_tx));
                let res = Chunker { walker, enc, buf }.write_sequential(w);
                return (res, None);
            };
            // A thread that is waiting for its start cannot fail: the sends succeed. Were one
            // to fail anyway, the channels close and `write_ready` returns `Failed`.
            let _ = start_read_tx.send(walker);
            let _ = start_seal_tx.send(enc);
            // Consumes this side's channel ends: a thread blocked on one of them wakes up and
            // ends as soon as this returns.
            let res = write_ready(&mut w, ready_rx, free_read_tx2, free_frame_tx, cancel);
            let read_buffers = reader
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            let frames = sealer
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            let stats = PipeStats {
                read_buffers: read_buffers.unwrap_or(0),
                frame_buffers: frames.map_or(0, |f| f.0),
                peak_frame_bytes: frames.map_or(0, |f| f.1),
            };
            (res, Some(stats))
        })
    }

    /// [`Chunker::write_frames`] on this thread alone.
    fn write_sequential<S: FrameSink>(mut self, mut w: S) -> Result<StreamSummary, ChunkError> {
        let mut bufs = FrameBufs::default();
        loop {
            let Some(walked) = self.walker.next(&mut self.buf)? else {
                // `next` returns the end before `None`: the stream was written already.
                return Err(ChunkError::Failed);
            };
            let framed = self.enc.frame(walked, &self.buf, &mut bufs)?;
            if let Some(summary) = write_frame(&mut w, &mut bufs, framed, &mut self.buf)? {
                return Ok(summary);
            }
        }
    }
}

/// What the threads of [`Chunker::write_to`] allocated (read by the tests).
#[derive(Debug, Clone, Copy)]
#[cfg_attr(not(test), allow(dead_code))]
struct PipeStats {
    /// Plaintext buffers of `chunk_size` bytes, at most [`READ_BUFFERS`].
    read_buffers: usize,
    /// Frame buffers, at most [`FRAME_BUFFERS`].
    frame_buffers: usize,
    /// Largest capacity of one frame buffer.
    peak_frame_bytes: usize,
}

/// What the read thread sends: an item of the walk (or its error) and the buffer holding a
/// chunk's plaintext (passed along with every item so that it comes back).
type Piped = (Result<Option<Walked>, ChunkError>, Vec<u8>);

/// A frame ready to be written: its head, then its payload.
#[derive(Debug, Default)]
struct FrameBufs {
    /// Length prefix and everything before the payload.
    head: Vec<u8>,
    /// The payload, unless it is the plaintext itself.
    out: Vec<u8>,
}

/// What [`Encoder::frame`] left in a [`FrameBufs`].
#[derive(Debug, Clone, Copy)]
enum Framed {
    /// `head`, then `out` (empty for the header).
    Out,
    /// `head`, then the first `len` bytes of the plaintext buffer.
    Plain(usize),
    /// `head` is the end item, then the writer is flushed.
    End(StreamSummary),
}

/// What the sealing thread sends to the writing one.
#[derive(Debug)]
struct Ready {
    framed: Framed,
    bufs: FrameBufs,
    /// The plaintext buffer, for [`Framed::Plain`].
    plain: Option<Vec<u8>>,
}

/// The read thread of [`Chunker::write_to`]: walks and reads into buffers taken from `free`
/// (at most [`READ_BUFFERS`] of them ever exist) and sends each item to `items`. Ends after the
/// end item, an error, or as soon as the others are gone. Returns how many buffers it
/// allocated.
fn read_side(
    mut walker: Walker,
    items: &SyncSender<Piped>,
    free: &Receiver<Vec<u8>>,
    cancel: &AtomicBool,
) -> usize {
    let mut allocated = 0;
    loop {
        if cancel.load(Ordering::Acquire) {
            return allocated;
        }
        let mut buf = match free.try_recv() {
            Ok(b) => b,
            Err(TryRecvError::Empty) if allocated < READ_BUFFERS => {
                allocated += 1;
                Vec::new()
            }
            Err(TryRecvError::Empty) => match free.recv() {
                Ok(b) => b,
                Err(_) => return allocated,
            },
            Err(TryRecvError::Disconnected) => return allocated,
        };
        let res = walker.next(&mut buf);
        let last = !matches!(res, Ok(Some(Walked::Header | Walked::Chunk(_))));
        if items.send((res, buf)).is_err() || last {
            return allocated;
        }
    }
}

/// The sealing thread of [`Chunker::write_to`]: compresses, seals and frames each item into
/// buffers taken from `free` (at most [`FRAME_BUFFERS`] exist), returns plaintext buffers to
/// the read thread as soon as they are consumed, and sends frames (or the first error) to
/// `ready`. Returns how many frame buffers it allocated and the largest one's capacity.
fn seal_side(
    mut enc: Encoder,
    items: Receiver<Piped>,
    ready: SyncSender<Result<Ready, ChunkError>>,
    free_read: SyncSender<Vec<u8>>,
    free: Receiver<FrameBufs>,
    cancel: &AtomicBool,
) -> (usize, usize) {
    let mut allocated = 0;
    let mut peak = 0;
    let mut spare: Option<FrameBufs> = None;
    loop {
        // A closed channel means the read thread ended (cancelled, or it died); the writer
        // then sees this one close.
        let Ok((walked, plain)) = items.recv() else {
            return (allocated, peak);
        };
        if cancel.load(Ordering::Acquire) {
            // Hand the buffer back so that a read thread waiting for one wakes up, sees the
            // flag and ends.
            let _ = free_read.send(plain);
            return (allocated, peak);
        }
        let walked = match walked {
            Ok(Some(w)) => w,
            // `next` returns the end before `None`: the stream was written already.
            Ok(None) => {
                let _ = ready.send(Err(ChunkError::Failed));
                return (allocated, peak);
            }
            Err(e) => {
                let _ = ready.send(Err(e));
                return (allocated, peak);
            }
        };
        let mut bufs = match spare.take().map_or_else(|| free.try_recv(), Ok) {
            Ok(b) => b,
            Err(TryRecvError::Empty) if allocated < FRAME_BUFFERS => {
                allocated += 1;
                FrameBufs::default()
            }
            Err(TryRecvError::Empty) => match free.recv() {
                Ok(b) => b,
                Err(_) => return (allocated, peak),
            },
            Err(TryRecvError::Disconnected) => return (allocated, peak),
        };
        let framed = match enc.frame(walked, &plain, &mut bufs) {
            Ok(f) => f,
            Err(e) => {
                let _ = ready.send(Err(e));
                return (allocated, peak);
            }
        };
        peak = peak.max(bufs.head.capacity() + bufs.out.capacity());
        let plain = match framed {
            Framed::Plain(_) => Some(plain),
            Framed::Out | Framed::End(_) => {
                // Consumed: the read thread may refill it while this frame is written. The
                // read thread may be gone already; then the buffer is simply dropped.
                let _ = free_read.send(plain);
                None
            }
        };
        let last = matches!(framed, Framed::End(_));
        let sent = ready.send(Ok(Ready {
            framed,
            bufs,
            plain,
        }));
        if sent.is_err() || last {
            return (allocated, peak);
        }
    }
}

/// The writing side of [`Chunker::write_to`], on the calling thread: writes each frame
/// received and returns its buffers. Consumes its channel ends so that they are closed on
/// return.
///
/// When it stops before the end (the writer failed, or an error came through), it sets
/// `cancel` and then keeps taking frames, without writing them, until the sealing thread has
/// ended, handing every buffer back: the read thread may be waiting for a plaintext buffer
/// that sits in a queued frame, and the sealing thread for an item that the read thread can
/// only send once it has a buffer. Dropping the queue instead would leave both waiting on
/// each other for ever.
fn write_ready<S: FrameSink>(
    w: &mut S,
    ready: Receiver<Result<Ready, ChunkError>>,
    free_read: SyncSender<Vec<u8>>,
    free_frame: SyncSender<FrameBufs>,
    cancel: &AtomicBool,
) -> Result<StreamSummary, ChunkError> {
    let res = write_frames(w, &ready, &free_read, &free_frame);
    if res.is_err() {
        cancel.store(true, Ordering::Release);
        // Ends when the sealing thread has dropped its sender: it checks `cancel` after every
        // item, and the read thread sends at most one more item after the flag is set.
        for ready in ready.iter().flatten() {
            if let Some(p) = ready.plain {
                let _ = free_read.send(p);
            }
            let _ = free_frame.send(ready.bufs);
        }
    }
    res
}

/// The loop of [`write_ready`] until the end frame or the first error.
fn write_frames<S: FrameSink>(
    w: &mut S,
    ready: &Receiver<Result<Ready, ChunkError>>,
    free_read: &SyncSender<Vec<u8>>,
    free_frame: &SyncSender<FrameBufs>,
) -> Result<StreamSummary, ChunkError> {
    let mut no_plain = Vec::new();
    loop {
        // The sealing thread sends an end or an error before it stops, unless it died.
        let Ok(ready) = ready.recv() else {
            return Err(ChunkError::Failed);
        };
        let Ready {
            framed,
            mut bufs,
            mut plain,
        } = ready?;
        let done = write_frame(
            w,
            &mut bufs,
            framed,
            plain.as_mut().unwrap_or(&mut no_plain),
        )?;
        // The other threads may be gone already; then the buffers are simply dropped.
        if let Some(p) = plain {
            let _ = free_read.send(p);
        }
        let _ = free_frame.send(bufs);
        if let Some(summary) = done {
            return Ok(summary);
        }
    }
}

/// Puts one frame into the sink: the head, then the payload (never copied into a frame
/// buffer; the sink may keep it); after the end item, flushes the sink and returns the summary.
/// The plaintext buffer of a [`Framed::Plain`] frame is cut to the payload's length (the read
/// thread restores it).
fn write_frame<S: FrameSink>(
    w: &mut S,
    bufs: &mut FrameBufs,
    framed: Framed,
    plain: &mut Vec<u8>,
) -> Result<Option<StreamSummary>, ChunkError> {
    let payload = match framed {
        Framed::Out | Framed::End(_) => &mut bufs.out,
        Framed::Plain(len) => {
            if plain.len() < len {
                return Err(ChunkError::Failed);
            }
            plain.truncate(len);
            plain
        }
    };
    w.put(&bufs.head, payload).map_err(ChunkError::Write)?;
    if let Framed::End(summary) = framed {
        w.flush().map_err(ChunkError::Write)?;
        return Ok(Some(summary));
    }
    Ok(None)
}

/// The fields of a chunk frame before the payload's bytes. Postcard encodes `serde_bytes` as
/// a varint length then the bytes, and the payload is the last field of the last thing in the
/// frame, so this followed by the payload is exactly the encoding of the [`StreamItem`].
struct ChunkHead<'a> {
    meta: &'a ChunkMeta,
    payload_len: u64,
}

impl Serialize for ChunkHead<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Fields<'a> {
            seq: u64,
            path: &'a str,
            offset: u64,
            len: u32,
            mode: u32,
            digest: &'a Option<Digest>,
            last_of_file: bool,
            compressed: bool,
            payload_len: u64,
        }
        let m = self.meta;
        let fields = Fields {
            seq: m.seq,
            path: &m.path,
            offset: m.offset,
            len: m.len,
            mode: m.mode,
            digest: &m.digest,
            last_of_file: m.last_of_file,
            compressed: m.compressed,
            payload_len: self.payload_len,
        };
        s.serialize_newtype_variant("StreamItem", CHUNK_VARIANT, "Chunk", &fields)
    }
}

/// Appends to `out` the frame prefix and the head of a chunk's frame whose payload, of
/// `payload_len` bytes, is to be written right after it.
fn encode_chunk_head(
    meta: &ChunkMeta,
    payload_len: usize,
    out: &mut Vec<u8>,
) -> Result<(), ChunkError> {
    let start = out.len();
    out.extend_from_slice(&[0; frame::LEN_PREFIX]);
    let head = ChunkHead {
        meta,
        payload_len: payload_len as u64,
    };
    if let Err(e) = postcard::to_io(&head, &mut *out) {
        out.truncate(start);
        return Err(FrameError::Encode(e).into());
    }
    let body = (out.len() - start - frame::LEN_PREFIX) as u64 + payload_len as u64;
    match frame::check_len(body, frame::DEFAULT_MAX_FRAME) {
        Ok(len) => {
            out[start..start + frame::LEN_PREFIX].copy_from_slice(&len.to_be_bytes());
            Ok(())
        }
        Err(e) => {
            out.truncate(start);
            Err(e.into())
        }
    }
}

impl ChunkMeta {
    fn into_chunk(self, payload: Vec<u8>) -> Chunk {
        Chunk {
            seq: self.seq,
            path: self.path,
            offset: self.offset,
            len: self.len,
            mode: self.mode,
            digest: self.digest,
            last_of_file: self.last_of_file,
            compressed: self.compressed,
            payload,
        }
    }

    fn fields(&self) -> ChunkFields<'_> {
        ChunkFields {
            seq: self.seq,
            path: &self.path,
            offset: self.offset,
            len: self.len,
            mode: self.mode,
            digest: self.digest,
            last_of_file: self.last_of_file,
            compressed: self.compressed,
        }
    }
}

/// Appends `plain` compressed under `c` to `out` if that saves at least 1/16 of it (one byte
/// at least), and says whether it did; otherwise `out` is left as it was.
fn compress_if_worth(
    codec: &mut Codec,
    c: Compression,
    plain: &[u8],
    out: &mut Vec<u8>,
) -> Result<bool, CompressError> {
    if c == Compression::None {
        return Ok(false);
    }
    let start = out.len();
    codec.compress(c, plain, out)?;
    let saving = (plain.len() >> MIN_SAVING_SHIFT).max(1);
    let worth = (out.len() - start).saturating_add(saving) <= plain.len();
    if !worth {
        out.truncate(start);
    }
    Ok(worth)
}

impl Encoder {
    /// Frames one item into `bufs` (cleared first), the plaintext of a chunk being in `plain`.
    fn frame(
        &mut self,
        walked: Walked,
        plain: &[u8],
        bufs: &mut FrameBufs,
    ) -> Result<Framed, ChunkError> {
        bufs.head.clear();
        bufs.out.clear();
        match walked {
            Walked::Header => {
                let item = StreamItem::Header(self.header);
                frame::encode(&item, frame::DEFAULT_MAX_FRAME, &mut bufs.head)?;
                Ok(Framed::Out)
            }
            Walked::Chunk(mut meta) => {
                let plain = plain.get(..meta.len as usize).ok_or(ChunkError::Failed)?;
                let (framed, payload_len) = match self.payload(&mut meta, plain, &mut bufs.out)? {
                    PayloadAt::Plain => (Framed::Plain(plain.len()), plain.len()),
                    PayloadAt::Out => (Framed::Out, bufs.out.len()),
                };
                encode_chunk_head(&meta, payload_len, &mut bufs.head)?;
                Ok(framed)
            }
            Walked::End(totals) => {
                let end = self.end(totals)?;
                let summary = end.summary;
                frame::encode(
                    &StreamItem::End(end),
                    frame::DEFAULT_MAX_FRAME,
                    &mut bufs.head,
                )?;
                Ok(Framed::End(summary))
            }
        }
    }

    /// Computes the payload of chunk `meta` whose plaintext is `plain`: appended to `out`, or
    /// `plain` itself ([`PayloadAt::Plain`]); sets `meta.compressed`. Folds the descriptor into
    /// the end digest.
    fn payload(
        &mut self,
        meta: &mut ChunkMeta,
        plain: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<PayloadAt, ChunkError> {
        #[cfg(test)]
        if self.fail_at == Some(meta.seq) {
            return Err(CompressError::Compress(io::Error::other("injected")).into());
        }
        let compression = self.compression_for(plain)?;
        let at = match self.sealer.as_mut() {
            None => {
                meta.compressed = compress_if_worth(&mut self.codec, compression, plain, out)?;
                meta.fields().descriptor(&mut self.aad);
                if meta.compressed {
                    PayloadAt::Out
                } else {
                    PayloadAt::Plain
                }
            }
            Some(sealer) => {
                // Room for the record, whatever the compression gives: nothing reallocates.
                out.reserve(SEAL_OVERHEAD + self.compression.max_compressed_len(plain.len()));
                // The payload is compressed (or copied) straight into the record, then sealed
                // where it lies.
                let record = Sealer::begin_record(out);
                meta.compressed = compress_if_worth(&mut self.codec, compression, plain, out)?;
                if !meta.compressed {
                    out.extend_from_slice(plain);
                }
                meta.fields().descriptor(&mut self.aad);
                sealer.seal_record(&self.aad, out, record)?;
                PayloadAt::Out
            }
        };
        if compression != Compression::None {
            self.incompressible = !meta.compressed;
        }
        if let Some(h) = self.hasher.as_mut() {
            h.update(&self.aad);
        }
        Ok(at)
    }

    /// The compression to try on `plain`: the stream's, unless the chunk before did not
    /// compress and neither does a probe of this one's first [`PROBE_LEN`] bytes.
    fn compression_for(&mut self, plain: &[u8]) -> Result<Compression, CompressError> {
        if !self.incompressible || plain.len() < 2 * PROBE_LEN {
            return Ok(self.compression);
        }
        self.probe.clear();
        let sample = &plain[..PROBE_LEN];
        if compress_if_worth(&mut self.codec, self.compression, sample, &mut self.probe)? {
            Ok(self.compression)
        } else {
            #[cfg(test)]
            {
                self.probed_raw += 1;
            }
            Ok(Compression::None)
        }
    }

    /// The end item for a walk with these totals.
    fn end(&mut self, totals: Totals) -> Result<StreamEnd, ChunkError> {
        let digest = self
            .hasher
            .take()
            .map(Sha256::finish)
            .ok_or(ChunkError::Failed)?;
        let summary = StreamSummary {
            chunks: totals.chunks,
            files: totals.files,
            bytes: totals.bytes,
            digest,
        };
        let seal = match self.sealer.as_mut() {
            None => None,
            Some(sealer) => {
                end_aad(&mut self.aad, &self.header, &summary).map_err(FrameError::Encode)?;
                let mut record = Vec::with_capacity(migration_crypto::SEAL_OVERHEAD);
                sealer.seal(&self.aad, &[], &mut record)?;
                Some(record)
            }
        };
        Ok(StreamEnd { summary, seal })
    }
}

impl Walker {
    /// The next item of the walk, a chunk's plaintext read into `buf` (resized to
    /// `chunk_size` once), `Ok(None)` after the end. After an error every later call fails with
    /// [`ChunkError::Failed`].
    fn next(&mut self, buf: &mut Vec<u8>) -> Result<Option<Walked>, ChunkError> {
        let res = match self.state {
            State::Failed => return Err(ChunkError::Failed),
            State::Done => return Ok(None),
            State::Start => self.list_dir(String::new()).map(|frame| {
                self.stack.push(frame);
                self.state = State::Walking;
                Walked::Header
            }),
            State::Walking => self.walk(buf),
        };
        if res.is_err() {
            self.fail();
        }
        res.map(Some)
    }

    fn fail(&mut self) {
        self.state = State::Failed;
        self.current = None;
    }

    fn list_dir(&self, rel: String) -> Result<DirFrame, ChunkError> {
        let dir = self.root.join(&rel);
        let mut names = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let entry = entry.map_err(io_err(&dir))?;
            let name = entry.file_name();
            match name.into_string() {
                Ok(n) => names.push(n),
                Err(_) => {
                    return Err(ChunkError::NonUtf8Path { path: entry.path() });
                }
            }
        }
        // Byte order of names: the same on every host. Reversed so that pop() yields the first.
        names.sort_unstable_by(|a, b| b.as_bytes().cmp(a.as_bytes()));
        Ok(DirFrame { rel, rest: names })
    }

    fn walk(&mut self, buf: &mut Vec<u8>) -> Result<Walked, ChunkError> {
        loop {
            if self.current.is_some() {
                return self.next_chunk(buf);
            }
            let Some(frame) = self.stack.last_mut() else {
                self.state = State::Done;
                return Ok(Walked::End(Totals {
                    chunks: self.seq,
                    files: self.files,
                    bytes: self.bytes,
                }));
            };
            let Some(name) = frame.rest.pop() else {
                self.stack.pop();
                continue;
            };
            let rel = if frame.rel.is_empty() {
                name
            } else {
                format!("{}/{}", frame.rel, name)
            };
            if !is_safe_relative_path(&rel) {
                return Err(ChunkError::UnsupportedName { path: rel });
            }
            let full = self.root.join(&rel);
            let meta = fs::symlink_metadata(&full).map_err(io_err(&full))?;
            let ft = meta.file_type();
            if ft.is_dir() {
                let frame = self.list_dir(rel)?;
                self.stack.push(frame);
            } else if ft.is_file() {
                let file = File::open(&full).map_err(io_err(&full))?;
                self.open(file, rel, meta.permissions().mode());
            } else if ft.is_symlink() {
                let target = fs::canonicalize(&full).map_err(io_err(&full))?;
                if !target.starts_with(&self.root) {
                    return Err(ChunkError::SymlinkEscapes { path: full, target });
                }
                let tmeta = fs::metadata(&target).map_err(io_err(&target))?;
                if !tmeta.is_file() {
                    return Err(ChunkError::UnsupportedFileType { path: full });
                }
                let file = File::open(&target).map_err(io_err(&target))?;
                self.open(file, rel, tmeta.permissions().mode());
            } else {
                return Err(ChunkError::UnsupportedFileType { path: full });
            }
        }
    }

    fn open(&mut self, file: File, rel: String, mode: u32) {
        self.current = Some(OpenFile {
            file,
            rel,
            offset: 0,
            mode: mode & MODE_MASK,
            peek: None,
        });
    }

    fn next_chunk(&mut self, buf: &mut Vec<u8>) -> Result<Walked, ChunkError> {
        let Some(cur) = self.current.as_mut() else {
            return Err(ChunkError::Failed);
        };
        if buf.len() != self.chunk_size {
            // Once per buffer, and after a sink cut it to a short chunk's payload (or took it):
            // it keeps this length (and its contents) otherwise.
            buf.resize(self.chunk_size, 0);
        }
        let mut filled = 0;
        if let Some(b) = cur.peek.take() {
            buf[0] = b;
            filled = 1;
        }
        let path_of = |rel: &str| self.root.join(rel);
        while filled < self.chunk_size {
            match cur.file.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_err(&path_of(&cur.rel))(e)),
            }
        }
        let last_of_file = if filled == self.chunk_size {
            let mut probe = [0u8; 1];
            loop {
                match cur.file.read(&mut probe) {
                    Ok(0) => break true,
                    Ok(_) => {
                        cur.peek = Some(probe[0]);
                        break false;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(io_err(&path_of(&cur.rel))(e)),
                }
            }
        } else {
            true
        };
        let digest = self.digests.then(|| sha256(&buf[..filled]));
        // filled <= chunk_size <= MAX_CHUNK_SIZE fits in u32.
        let len = filled as u32;
        let meta = ChunkMeta {
            seq: self.seq,
            path: if last_of_file {
                std::mem::take(&mut cur.rel)
            } else {
                cur.rel.clone()
            },
            offset: cur.offset,
            len,
            mode: cur.mode,
            digest,
            last_of_file,
            compressed: false,
        };
        cur.offset += u64::from(len);
        self.seq += 1;
        self.bytes += u64::from(len);
        if last_of_file {
            self.files += 1;
            self.current = None;
        }
        Ok(Walked::Chunk(meta))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;

    fn items(root: &Path, config: ChunkerConfig) -> Vec<StreamItem> {
        let mut c = Chunker::new(root, config).unwrap();
        let mut out = Vec::new();
        while let Some(item) = c.next_item().unwrap() {
            out.push(item);
        }
        out
    }

    fn cfg(chunk_size: usize) -> ChunkerConfig {
        ChunkerConfig {
            chunk_size,
            compression: Compression::None,
            sealer: None,
        }
    }

    fn chunks(items: &[StreamItem]) -> Vec<&Chunk> {
        items
            .iter()
            .filter_map(|i| match i {
                StreamItem::Chunk(c) => Some(c),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn invalid_chunk_size_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        for size in [0, MAX_CHUNK_SIZE + 1] {
            assert!(matches!(
                Chunker::new(dir.path(), cfg(size)),
                Err(ChunkError::InvalidChunkSize { size: s, max: MAX_CHUNK_SIZE }) if s == size
            ));
        }
    }

    #[test]
    fn invalid_level_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let config = ChunkerConfig {
            compression: Compression::Gzip { level: 42 },
            ..cfg(16)
        };
        assert!(matches!(
            Chunker::new(dir.path(), config),
            Err(ChunkError::Compress(CompressError::InvalidLevel(_)))
        ));
    }

    #[test]
    fn root_must_be_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        fs::write(&f, b"x").unwrap();
        assert!(matches!(
            Chunker::new(&f, cfg(16)),
            Err(ChunkError::NotADirectory { .. })
        ));
        assert!(matches!(
            Chunker::new(&dir.path().join("missing"), cfg(16)),
            Err(ChunkError::Io { .. })
        ));
    }

    #[test]
    fn walk_is_sorted_depth_first_and_splits_files() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        fs::create_dir_all(r.join("a/sub")).unwrap();
        fs::write(r.join("a.txt"), b"0123456789").unwrap(); // 10 bytes: 4 + 4 + 2
        fs::write(r.join("a/x"), b"").unwrap();
        fs::write(r.join("a/sub/y"), b"12345678").unwrap(); // exactly 2 chunks
        fs::write(r.join("B"), b"abcd").unwrap(); // exactly 1 chunk
        let all = items(r, cfg(4));
        let cs = chunks(&all);
        let got: Vec<_> = cs
            .iter()
            .map(|c| (c.seq, c.path.as_str(), c.offset, c.len, c.last_of_file))
            .collect();
        assert_eq!(
            got,
            vec![
                (0, "B", 0, 4, true),
                (1, "a/sub/y", 0, 4, false),
                (2, "a/sub/y", 4, 4, true),
                (3, "a/x", 0, 0, true),
                (4, "a.txt", 0, 4, false),
                (5, "a.txt", 4, 4, false),
                (6, "a.txt", 8, 2, true),
            ]
        );
        assert_eq!(cs[6].payload, b"89");
        assert_eq!(cs[6].digest, Some(sha256(b"89")));
        assert!(
            matches!(all[0], StreamItem::Header(h) if h.chunk_size == 4 && h.sealed_with.is_none())
        );
        let StreamItem::End(end) = all.last().unwrap() else {
            panic!("no end")
        };
        assert_eq!(end.summary.chunks, 7);
        assert_eq!(end.summary.files, 4);
        assert_eq!(end.summary.bytes, 22);
        assert!(end.seal.is_none());
        // Deterministic.
        assert_eq!(items(r, cfg(4)), all);
    }

    #[test]
    fn modes_are_masked() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        fs::write(&f, b"x").unwrap();
        fs::set_permissions(&f, fs::Permissions::from_mode(0o4640)).unwrap();
        let all = items(dir.path(), cfg(16));
        assert_eq!(chunks(&all)[0].mode, 0o640);
    }

    #[test]
    fn symlink_outside_root_is_refused() {
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("secret"), b"s").unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), dir.path().join("link")).unwrap();
        let mut c = Chunker::new(dir.path(), cfg(16)).unwrap();
        c.next_item().unwrap();
        assert!(matches!(
            c.next_item(),
            Err(ChunkError::SymlinkEscapes { .. })
        ));
        assert!(matches!(c.next_item(), Err(ChunkError::Failed)));
        // A relative link climbing out is refused the same way.
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("../../../../etc/hostname", dir.path().join("up")).unwrap();
        let mut c = Chunker::new(dir.path(), cfg(16)).unwrap();
        c.next_item().unwrap();
        assert!(matches!(
            c.next_item(),
            Err(ChunkError::SymlinkEscapes { .. } | ChunkError::Io { .. })
        ));
    }

    #[test]
    fn symlink_to_a_file_inside_is_sent_as_the_file() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("real"), b"content").unwrap();
        std::os::unix::fs::symlink("real", dir.path().join("link")).unwrap();
        let all = items(dir.path(), cfg(16));
        let cs = chunks(&all);
        assert_eq!(cs.len(), 2);
        assert_eq!(cs[0].path, "link");
        assert_eq!(cs[0].payload, b"content");
        assert_eq!(cs[1].path, "real");
    }

    #[test]
    fn symlink_to_a_directory_and_sockets_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("d")).unwrap();
        std::os::unix::fs::symlink("d", dir.path().join("link")).unwrap();
        let mut c = Chunker::new(dir.path(), cfg(16)).unwrap();
        c.next_item().unwrap();
        assert!(matches!(
            c.next_item(),
            Err(ChunkError::UnsupportedFileType { path }) if path.ends_with("link")
        ));

        let dir = tempfile::tempdir().unwrap();
        let _sock = std::os::unix::net::UnixListener::bind(dir.path().join("sock")).unwrap();
        let mut c = Chunker::new(dir.path(), cfg(16)).unwrap();
        c.next_item().unwrap();
        assert!(matches!(
            c.next_item(),
            Err(ChunkError::UnsupportedFileType { path }) if path.ends_with("sock")
        ));
    }

    #[test]
    fn names_the_receiver_would_refuse_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a\\b"), b"x").unwrap();
        let mut c = Chunker::new(dir.path(), cfg(16)).unwrap();
        c.next_item().unwrap();
        assert!(matches!(
            c.next_item(),
            Err(ChunkError::UnsupportedName { path }) if path == "a\\b"
        ));

        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join(std::ffi::OsStr::from_bytes(b"bad\xff")),
            b"x",
        )
        .unwrap();
        let mut c = Chunker::new(dir.path(), cfg(16)).unwrap();
        assert!(matches!(c.next_item(), Err(ChunkError::NonUtf8Path { .. })));
    }

    #[test]
    fn safe_paths() {
        for ok in ["a", "a/b", "a.b/c..d", ".hidden", "x/...", "ünïcode"] {
            assert!(is_safe_relative_path(ok), "{ok}");
        }
        let long = "a".repeat(MAX_PATH_LEN + 1);
        for bad in [
            "", "/a", "a/", "a//b", ".", "..", "a/../b", "a/./b", "../a", "a\\b", "..\\a", "a\0b",
            "C:\\x", &long,
        ] {
            assert!(!is_safe_relative_path(bad), "{bad:?}");
        }
    }

    /// Counts bytes and frames written, keeping nothing.
    struct Counting {
        bytes: u64,
    }

    impl Write for Counting {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.bytes += buf.len() as u64;
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn memory_stays_bounded_on_a_large_sparse_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = File::create(dir.path().join("big")).unwrap();
        f.set_len(64 << 20).unwrap();
        drop(f);
        let key = migration_crypto::Key::generate().unwrap();
        let cs = 1 << 20;
        let config = ChunkerConfig {
            chunk_size: cs,
            compression: Compression::Zstd { level: 1 },
            sealer: Some(Sealer::new(&key).unwrap()),
        };
        let mut c = Chunker::new(dir.path(), config).unwrap();
        let mut w = Counting { bytes: 0 };
        let mut frame_buf = Vec::new();
        let mut max_cap = 0;
        let mut n = 0;
        while let Some(item) = c.next_item().unwrap() {
            max_cap = max_cap.max(c.buffer_capacity());
            if let StreamItem::Chunk(ch) = &item {
                assert!(ch.payload.capacity() <= cs + cs / 64 + 1024);
                n += 1;
            }
            frame_buf.clear();
            frame::encode(&item, frame::DEFAULT_MAX_FRAME, &mut frame_buf).unwrap();
            w.write_all(&frame_buf).unwrap();
        }
        assert_eq!(n, 64);
        assert!(max_cap <= 2 * cs + 64 * 1024, "buffers grew to {max_cap}");
        assert!(
            w.bytes > 0 && w.bytes < 1 << 20,
            "zeros compress: {}",
            w.bytes
        );
    }
}

#[cfg(test)]
mod pipeline_tests {
    use super::*;
    use crate::reassemble::{Reassembler, ReassemblerConfig};
    use migration_crypto::{Key, Opener};
    use proptest::prelude::*;
    use std::time::Duration;

    fn cfg(chunk_size: usize, compression: Compression, sealer: Option<Sealer>) -> ChunkerConfig {
        ChunkerConfig {
            chunk_size,
            compression,
            sealer,
        }
    }

    /// A tree with several files and directories, an empty file and a multi-chunk file.
    fn tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        fs::create_dir_all(r.join("a/b")).unwrap();
        fs::write(r.join("a/b/pages.img"), pattern(10_000)).unwrap();
        fs::write(r.join("a/core.img"), b"core").unwrap();
        fs::write(r.join("empty"), b"").unwrap();
        fs::write(r.join("z.img"), pattern(4096)).unwrap();
        dir
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i % 251) as u8 ^ (i / 997) as u8)
            .collect()
    }

    /// The reference: every `next_item` framed with `frame::encode`.
    fn framed_items(c: &mut Chunker) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(item) = c.next_item().unwrap() {
            frame::encode(&item, frame::DEFAULT_MAX_FRAME, &mut out).unwrap();
        }
        out
    }

    fn frames(mut wire: &[u8]) -> Vec<StreamItem> {
        let mut buf = Vec::new();
        let mut items = Vec::new();
        while frame::read_frame(&mut wire, frame::DEFAULT_MAX_FRAME, &mut buf).unwrap() {
            items.push(frame::decode_body(&buf).unwrap());
        }
        items
    }

    /// A writer that fails once `limit` bytes were written (or on flush, with `limit: None`).
    struct FailingWriter {
        written: Vec<u8>,
        limit: Option<usize>,
    }

    impl Write for FailingWriter {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let room = self.limit.map_or(buf.len(), |l| l - self.written.len());
            if room == 0 {
                return Err(io::Error::new(io::ErrorKind::BrokenPipe, "peer gone"));
            }
            let n = room.min(buf.len());
            self.written.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            match self.limit {
                None => Err(io::Error::new(io::ErrorKind::StorageFull, "flush failed")),
                Some(_) => Ok(()),
            }
        }
    }

    #[test]
    fn pipelined_bytes_equal_sequential_and_next_item_bytes() {
        let dir = tree();
        for compression in [
            Compression::None,
            Compression::Zstd { level: 1 },
            Compression::Gzip { level: 1 },
        ] {
            for chunk_size in [1, 1000, 4096, 1 << 20] {
                let reference = framed_items(
                    &mut Chunker::new(dir.path(), cfg(chunk_size, compression, None)).unwrap(),
                );
                let mut piped = Vec::new();
                let (res, stats) = Chunker::new(dir.path(), cfg(chunk_size, compression, None))
                    .unwrap()
                    .write_pipelined(WriteSink(&mut piped));
                let summary = res.unwrap();
                assert!(stats.is_some(), "ran on threads");
                let mut seq = Vec::new();
                let seq_summary = Chunker::new(dir.path(), cfg(chunk_size, compression, None))
                    .unwrap()
                    .write_sequential(WriteSink(&mut seq))
                    .unwrap();
                assert!(
                    piped == reference,
                    "{compression} {chunk_size}: pipelined differs"
                );
                assert!(
                    seq == reference,
                    "{compression} {chunk_size}: sequential differs"
                );
                assert_eq!(summary, seq_summary);
                assert_eq!(summary.files, 4);
                assert_eq!(summary.bytes, 10_000 + 4 + 4096);
            }
        }
    }

    #[test]
    fn pipelined_sealed_stream_reassembles_like_the_sequential_one() {
        let dir = tree();
        let key = Key::generate().unwrap();
        let sealed = || {
            cfg(
                1000,
                Compression::Zstd { level: 1 },
                Some(Sealer::new(&key).unwrap()),
            )
        };
        let reference = framed_items(&mut Chunker::new(dir.path(), sealed()).unwrap());
        let mut piped = Vec::new();
        let sent = Chunker::new(dir.path(), sealed())
            .unwrap()
            .write_to(&mut piped)
            .unwrap();
        // Same items but for the payloads and the end seal, which depend on the random salt.
        let strip = |items: Vec<StreamItem>| -> Vec<StreamItem> {
            items
                .into_iter()
                .map(|i| match i {
                    StreamItem::Chunk(c) => StreamItem::Chunk(Chunk {
                        payload: Vec::new(),
                        ..c
                    }),
                    StreamItem::End(e) => StreamItem::End(StreamEnd { seal: None, ..e }),
                    h => h,
                })
                .collect()
        };
        assert_eq!(strip(frames(&piped)), strip(frames(&reference)));
        let out = tempfile::tempdir().unwrap();
        for (n, wire) in [piped, reference].into_iter().enumerate() {
            let dest = out.path().join(format!("d{n}"));
            let r = Reassembler::new(
                &dest,
                ReassemblerConfig {
                    opener: Some(Opener::new(&key)),
                    max_chunk: 1000,
                    max_total_bytes: None,
                },
            )
            .unwrap();
            assert_eq!(r.read_from(&wire[..]).unwrap(), sent);
            assert_eq!(
                fs::read(dest.join("a/b/pages.img")).unwrap(),
                pattern(10_000)
            );
            assert_eq!(fs::read(dest.join("z.img")).unwrap(), pattern(4096));
        }
    }

    #[test]
    fn write_to_continues_where_next_item_left_off() {
        let dir = tree();
        let reference = framed_items(
            &mut Chunker::new(dir.path(), cfg(1000, Compression::None, None)).unwrap(),
        );
        let mut c = Chunker::new(dir.path(), cfg(1000, Compression::None, None)).unwrap();
        let mut wire = Vec::new();
        for _ in 0..3 {
            let item = c.next_item().unwrap().unwrap();
            frame::encode(&item, frame::DEFAULT_MAX_FRAME, &mut wire).unwrap();
        }
        c.write_to(&mut wire).unwrap();
        assert!(wire == reference);

        // After the end there is nothing left to write.
        let mut c = Chunker::new(dir.path(), cfg(1000, Compression::None, None)).unwrap();
        while c.next_item().unwrap().is_some() {}
        let mut wire = Vec::new();
        assert!(matches!(c.write_to(&mut wire), Err(ChunkError::Failed)));
        assert!(wire.is_empty());
    }

    #[test]
    fn read_thread_error_is_returned_after_the_frames_before_it() {
        let dir = tree();
        // "zz" sorts last: every file before it is sent first.
        let _sock = std::os::unix::net::UnixListener::bind(dir.path().join("zz")).unwrap();
        let mut c =
            Chunker::new(dir.path(), cfg(1000, Compression::Zstd { level: 1 }, None)).unwrap();
        let mut reference = Vec::new();
        let mut n = 0;
        while let Ok(Some(item)) = c.next_item() {
            frame::encode(&item, frame::DEFAULT_MAX_FRAME, &mut reference).unwrap();
            n += 1;
        }
        let mut wire = Vec::new();
        let err = Chunker::new(dir.path(), cfg(1000, Compression::Zstd { level: 1 }, None))
            .unwrap()
            .write_to(&mut wire)
            .unwrap_err();
        assert!(
            matches!(&err, ChunkError::UnsupportedFileType { path } if path.ends_with("zz")),
            "{err:?}"
        );
        assert!(
            wire == reference,
            "complete frames of the items before the error"
        );
        let items = frames(&wire);
        assert_eq!(items.len(), n);
        assert!(!items.iter().any(|i| matches!(i, StreamItem::End(_))));

        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("secret"), b"s").unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), dir.path().join("link")).unwrap();
        let err = Chunker::new(dir.path(), cfg(1000, Compression::None, None))
            .unwrap()
            .write_to(io::sink())
            .unwrap_err();
        assert!(matches!(err, ChunkError::SymlinkEscapes { .. }), "{err:?}");
    }

    #[test]
    fn sealing_thread_error_is_returned_after_the_frames_before_it() {
        let dir = tree();
        let key = Key::generate().unwrap();
        let mut c = Chunker::new(
            dir.path(),
            cfg(
                1000,
                Compression::Zstd { level: 1 },
                Some(Sealer::new(&key).unwrap()),
            ),
        )
        .unwrap();
        c.enc.fail_at = Some(4);
        let mut wire = Vec::new();
        let (res, stats) = c.write_pipelined(WriteSink(&mut wire));
        assert!(stats.is_some());
        assert!(
            matches!(res, Err(ChunkError::Compress(CompressError::Compress(ref e))) if e.to_string() == "injected"),
            "{res:?}"
        );
        let items = frames(&wire);
        // The header and chunks 0 to 3.
        assert_eq!(items.len(), 5);
        assert!(matches!(items.last(), Some(StreamItem::Chunk(c)) if c.seq == 3));
    }

    #[test]
    fn writer_error_is_returned_and_stops_both_threads() {
        // A big file, so that the read thread is blocked with full buffers when the writer fails.
        let dir = tempfile::tempdir().unwrap();
        let f = File::create(dir.path().join("big")).unwrap();
        f.set_len(64 << 20).unwrap();
        drop(f);
        for limit in [0, 3, 100, 5000, 200_000] {
            let mut w = FailingWriter {
                written: Vec::new(),
                limit: Some(limit),
            };
            let c = Chunker::new(dir.path(), cfg(64 << 10, Compression::None, None)).unwrap();
            // A deadlock here once hung CI for 90 minutes: fail in a minute instead.
            let (done_tx, done_rx) = mpsc::channel();
            let dir_path = dir.path().to_owned();
            let watched = thread::spawn(move || {
                let res = c.write_to(&mut w);
                let _ = done_tx.send(());
                (res, w)
            });
            assert!(
                done_rx.recv_timeout(Duration::from_secs(60)).is_ok(),
                "write_to did not return within 60 s after its writer failed at {limit} bytes \
                 ({dir_path:?})"
            );
            let (res, w) = watched.join().unwrap();
            let err = res.unwrap_err();
            assert!(
                matches!(&err, ChunkError::Write(e) if e.kind() == io::ErrorKind::BrokenPipe),
                "{limit}: {err:?}"
            );
            assert_eq!(w.written.len(), limit);
        }
        // A failing flush after the end frame.
        let dir = tree();
        let mut w = FailingWriter {
            written: Vec::new(),
            limit: None,
        };
        let err = Chunker::new(dir.path(), cfg(1000, Compression::None, None))
            .unwrap()
            .write_to(&mut w)
            .unwrap_err();
        assert!(
            matches!(&err, ChunkError::Write(e) if e.kind() == io::ErrorKind::StorageFull),
            "{err:?}"
        );
        assert!(matches!(
            frames(&w.written).last(),
            Some(StreamItem::End(_))
        ));
    }

    #[test]
    fn pipelined_memory_stays_bounded_on_a_large_sparse_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = File::create(dir.path().join("big")).unwrap();
        f.set_len(64 << 20).unwrap();
        drop(f);
        let key = Key::generate().unwrap();
        let cs = 1 << 20;
        let c = Chunker::new(
            dir.path(),
            cfg(
                cs,
                Compression::Zstd { level: 1 },
                Some(Sealer::new(&key).unwrap()),
            ),
        )
        .unwrap();
        let mut wire = Vec::new();
        let (res, stats) = c.write_pipelined(WriteSink(&mut wire));
        let summary = res.unwrap();
        let stats = stats.unwrap();
        assert_eq!(summary.chunks, 64);
        assert!(stats.read_buffers <= READ_BUFFERS, "{stats:?}");
        assert!(stats.frame_buffers <= FRAME_BUFFERS, "{stats:?}");
        assert!(stats.peak_frame_bytes <= 2 * cs + 64 * 1024, "{stats:?}");
        assert!(wire.len() < 1 << 20, "zeros compress: {}", wire.len());
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 32, .. ProptestConfig::default() })]

        #[test]
        fn pipelined_equals_next_item_on_random_trees(
            sizes in proptest::collection::vec(0usize..3000, 0..6),
            chunk_size in 1usize..2000,
            compression in 0usize..3,
        ) {
            let dir = tempfile::tempdir().unwrap();
            for (n, size) in sizes.iter().enumerate() {
                let d = dir.path().join(["", "x", "x/y"][n % 3]);
                fs::create_dir_all(&d).unwrap();
                fs::write(d.join(format!("f{n}")), pattern(*size)).unwrap();
            }
            let compression = [
                Compression::None,
                Compression::Zstd { level: 1 },
                Compression::Gzip { level: 1 },
            ][compression];
            let reference = framed_items(
                &mut Chunker::new(dir.path(), cfg(chunk_size, compression, None)).unwrap(),
            );
            let mut piped = Vec::new();
            Chunker::new(dir.path(), cfg(chunk_size, compression, None))
                .unwrap()
                .write_to(&mut piped)
                .unwrap();
            prop_assert!(piped == reference);
        }

        #[test]
        fn chunk_head_and_payload_encode_like_the_item(
            seq in any::<u64>(), path in "[a-z]{1,8}(/[a-z]{1,8}){0,3}", offset in any::<u64>(),
            len in any::<u32>(), mode in any::<u32>(),
            digest in proptest::option::of(any::<[u8; 32]>()),
            last_of_file in any::<bool>(), compressed in any::<bool>(),
            payload in proptest::collection::vec(any::<u8>(), 0..600),
        ) {
            let digest = digest.map(Digest);
            let meta = ChunkMeta { seq, path, offset, len, mode, digest, last_of_file, compressed };
            let mut split = Vec::new();
            encode_chunk_head(&meta, payload.len(), &mut split).unwrap();
            split.extend_from_slice(&payload);
            let mut whole = Vec::new();
            let item = StreamItem::Chunk(meta.into_chunk(payload));
            frame::encode(&item, frame::DEFAULT_MAX_FRAME, &mut whole).unwrap();
            prop_assert_eq!(split, whole);
        }
    }

    #[test]
    fn incompressible_stretches_are_probed_not_compressed() {
        let cs = 4 * PROBE_LEN;
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut data: Vec<u8> = (0..3 * cs)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        data.extend(pattern(2 * cs));
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("pages.img"), &data).unwrap();
        let key = Key::generate().unwrap();
        for sealed in [false, true] {
            let sealer = || sealed.then(|| Sealer::new(&key).unwrap());
            let mut c = Chunker::new(
                dir.path(),
                cfg(cs, Compression::Zstd { level: 1 }, sealer()),
            )
            .unwrap();
            let mut flags = Vec::new();
            while let Some(item) = c.next_item().unwrap() {
                if let StreamItem::Chunk(c) = item {
                    flags.push(c.compressed);
                }
            }
            // Noise: the first chunk is compressed in full, the next two only probed; the
            // probe of the first patterned chunk compresses, so it is compressed whole.
            assert_eq!(flags, [false, false, false, true, true]);
            assert_eq!(c.enc.probed_raw, 2);
            let mut wire = Vec::new();
            Chunker::new(
                dir.path(),
                cfg(cs, Compression::Zstd { level: 1 }, sealer()),
            )
            .unwrap()
            .write_to(&mut wire)
            .unwrap();
            let out = tempfile::tempdir().unwrap();
            let dest = out.path().join("d");
            Reassembler::new(
                &dest,
                ReassemblerConfig {
                    opener: sealed.then(|| Opener::new(&key)),
                    max_chunk: cs,
                    max_total_bytes: None,
                },
            )
            .unwrap()
            .read_from(&wire[..])
            .unwrap();
            assert!(fs::read(dest.join("pages.img")).unwrap() == data);
        }
    }

    #[test]
    fn chunk_head_refuses_a_payload_the_peer_would_refuse() {
        let meta = ChunkMeta {
            seq: 0,
            path: "f".into(),
            offset: 0,
            len: 0,
            mode: 0,
            digest: Some(Digest([0; 32])),
            last_of_file: true,
            compressed: false,
        };
        let mut head = vec![1, 2];
        let err = encode_chunk_head(&meta, frame::DEFAULT_MAX_FRAME, &mut head).unwrap_err();
        assert!(
            matches!(err, ChunkError::Frame(FrameError::TooLarge { .. })),
            "{err:?}"
        );
        assert_eq!(
            head,
            vec![1, 2],
            "a refused head leaves the output untouched"
        );
    }
}
