//! Streaming a directory of files (a CRIU image set) as ordered, self-verifying chunks.
//!
//! ```text
//!  root/ ──walk (sorted)──► file ──read chunk_size──► sha256 ─┐
//!                                                             ├─► Chunk{seq, path, offset, len,
//!                                   compress ──► seal(aad) ───┘          mode, digest, payload}
//!  Header ─► Chunk 0 ─► Chunk 1 ─► … ─► End{chunks, files, bytes, digest[, seal]}
//! ```
//!
//! A stream is one [`StreamItem::Header`], the chunks of every regular file in a deterministic
//! order (directory entries sorted by name, depth first), then one [`StreamItem::End`]. Each
//! item travels in one [`frame`]. The [`Reassembler`](crate::reassemble::Reassembler) rebuilds
//! the tree on the other side.
//!
//! # Integrity and authenticity
//!
//! * Every chunk carries the SHA-256 of its plaintext; the receiver checks it after decrypting
//!   and decompressing.
//! * When the stream is sealed, the AEAD associated data of a chunk is its *descriptor*
//!   `(seq, path, offset, len, mode, digest, last_of_file)`, so a chunk cannot be moved to
//!   another position, file or offset without failing to open.
//! * The end's digest is the SHA-256 of all descriptors in order (a superset of "a digest over
//!   the chunk digests": it also binds paths and offsets). When sealed, the end carries a sealed
//!   empty record whose associated data binds the header and the summary, so a man in the middle
//!   cannot truncate the stream and forge a matching end.
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

use migration_crypto::{Digest, KeyId, SealError, Sealer, Sha256, sha256};
use serde::{Deserialize, Serialize};

use crate::compress::{Codec, CompressError, Compression};
use crate::frame::{self, FrameError};

/// Version of the stream format carried in [`StreamHeader::version`].
pub const STREAM_VERSION: u16 = 1;
/// Default chunk size: 1 MiB.
pub const DEFAULT_CHUNK_SIZE: usize = 1 << 20;
/// Largest chunk size a [`Chunker`] accepts (8 MiB), so that any chunk fits in a
/// [`frame::DEFAULT_MAX_FRAME`] frame whatever the compression.
pub const MAX_CHUNK_SIZE: usize = 8 << 20;
/// Longest relative path carried in a chunk, in bytes.
pub const MAX_PATH_LEN: usize = 4096;
/// Permission bits a file is recreated with: no setuid, setgid or sticky bit.
pub const MODE_MASK: u32 = 0o777;

const CHUNK_AAD_LABEL: &[u8] = b"migration-wire chunk v1\0";
const END_AAD_LABEL: &[u8] = b"migration-wire end v1\0";

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
    /// Stream format version, [`STREAM_VERSION`].
    pub version: u16,
    /// Compression of every chunk payload.
    pub compression: Compression,
    /// Key the payloads are sealed with, `None` for an unsealed stream.
    pub sealed_with: Option<KeyId>,
    /// Plaintext size of every chunk but the last of each file.
    pub chunk_size: u32,
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
    /// SHA-256 of the plaintext.
    pub digest: Digest,
    /// This is the file's last chunk.
    pub last_of_file: bool,
    /// `seal(compress(plaintext))`, or `compress(plaintext)` in an unsealed stream.
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
            .field("digest", &format_args!("{}", self.digest))
            .field("last_of_file", &self.last_of_file)
            .field("payload_len", &self.payload.len())
            .finish()
    }
}

impl Chunk {
    /// Writes the chunk's descriptor into `out` (cleared first): the sealing AAD and the unit
    /// of the end digest.
    pub(crate) fn descriptor(&self, out: &mut Vec<u8>) {
        descriptor(
            out,
            self.seq,
            &self.path,
            self.offset,
            self.len,
            self.mode,
            &self.digest,
            self.last_of_file,
        );
    }
}

#[allow(clippy::too_many_arguments)]
fn descriptor(
    out: &mut Vec<u8>,
    seq: u64,
    path: &str,
    offset: u64,
    len: u32,
    mode: u32,
    digest: &Digest,
    last_of_file: bool,
) {
    out.clear();
    out.extend_from_slice(CHUNK_AAD_LABEL);
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&mode.to_be_bytes());
    out.push(u8::from(last_of_file));
    out.extend_from_slice(&digest.0);
    // Path last, length-prefixed: the encoding is unambiguous.
    out.extend_from_slice(&(path.len() as u64).to_be_bytes());
    out.extend_from_slice(path.as_bytes());
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
    /// The writer given to [`Chunker::write_to`] failed.
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

/// Turns a directory tree into stream items, one file chunk at a time.
///
/// Memory is bounded by one read buffer of `chunk_size` bytes and one compression scratch
/// buffer (used only when sealing compressed chunks), plus the payload of the item being
/// returned, whatever the size of the files.
pub struct Chunker {
    root: PathBuf,
    chunk_size: usize,
    compression: Compression,
    sealer: Option<Sealer>,
    header: StreamHeader,
    codec: Codec,
    state: State,
    stack: Vec<DirFrame>,
    current: Option<OpenFile>,
    /// Read buffer; its length stays `chunk_size` (initialized once), `filled` says how much
    /// of it holds data.
    buf: Vec<u8>,
    /// Compressed bytes awaiting sealing.
    scratch: Vec<u8>,
    aad: Vec<u8>,
    seq: u64,
    files: u64,
    bytes: u64,
    hasher: Option<Sha256>,
}

impl fmt::Debug for Chunker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Chunker")
            .field("root", &self.root)
            .field("header", &self.header)
            .field("state", &self.state)
            .field("seq", &self.seq)
            .field("files", &self.files)
            .field("bytes", &self.bytes)
            .finish_non_exhaustive()
    }
}

impl Chunker {
    /// Prepares to stream the tree under `root`. Nothing is read until [`Chunker::next_item`].
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
        let header = StreamHeader {
            version: STREAM_VERSION,
            compression,
            sealed_with: sealer.as_ref().map(Sealer::key_id),
            // chunk_size <= MAX_CHUNK_SIZE fits in u32.
            chunk_size: chunk_size as u32,
        };
        Ok(Chunker {
            root: canonical,
            chunk_size,
            compression,
            sealer,
            header,
            codec: Codec::new(),
            state: State::Start,
            stack: Vec::new(),
            current: None,
            buf: Vec::new(),
            scratch: Vec::new(),
            aad: Vec::new(),
            seq: 0,
            files: 0,
            bytes: 0,
            hasher: Some(Sha256::new()),
        })
    }

    /// The header this chunker sends first.
    pub fn header(&self) -> &StreamHeader {
        &self.header
    }

    /// Capacity of the buffers the chunker keeps between items (read buffer and compression
    /// scratch). Stays within about two chunks whatever the size of the files.
    pub fn buffer_capacity(&self) -> usize {
        self.buf.capacity() + self.scratch.capacity()
    }

    /// The next item of the stream, `Ok(None)` after the end. After an error every later call
    /// fails with [`ChunkError::Failed`].
    pub fn next_item(&mut self) -> Result<Option<StreamItem>, ChunkError> {
        match self.state {
            State::Failed => Err(ChunkError::Failed),
            State::Done => Ok(None),
            State::Start => match self.list_dir(String::new()) {
                Ok(frame) => {
                    self.stack.push(frame);
                    self.state = State::Walking;
                    Ok(Some(StreamItem::Header(self.header)))
                }
                Err(e) => {
                    self.state = State::Failed;
                    Err(e)
                }
            },
            State::Walking => match self.walk() {
                Ok(item) => Ok(Some(item)),
                Err(e) => {
                    self.state = State::Failed;
                    self.current = None;
                    Err(e)
                }
            },
        }
    }

    /// Writes the whole stream to `w` as frames, then flushes it; returns the totals sent.
    pub fn write_to<W: Write>(mut self, mut w: W) -> Result<StreamSummary, ChunkError> {
        let mut frame_buf = Vec::new();
        while let Some(item) = self.next_item()? {
            frame_buf.clear();
            frame::encode(&item, frame::DEFAULT_MAX_FRAME, &mut frame_buf)?;
            w.write_all(&frame_buf).map_err(ChunkError::Write)?;
            if let StreamItem::End(end) = item {
                w.flush().map_err(ChunkError::Write)?;
                return Ok(end.summary);
            }
        }
        // next_item returns End before None, so this is only reached if called twice.
        Err(ChunkError::Failed)
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

    fn walk(&mut self) -> Result<StreamItem, ChunkError> {
        loop {
            if self.current.is_some() {
                return self.next_chunk();
            }
            let Some(frame) = self.stack.last_mut() else {
                return self.end();
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

    fn next_chunk(&mut self) -> Result<StreamItem, ChunkError> {
        let Some(cur) = self.current.as_mut() else {
            return Err(ChunkError::Failed);
        };
        if self.buf.len() != self.chunk_size {
            // Once per chunker: the buffer keeps this length (and its contents) from now on.
            self.buf = vec![0; self.chunk_size];
        }
        let mut filled = 0;
        if let Some(b) = cur.peek.take() {
            self.buf[0] = b;
            filled = 1;
        }
        let path_of = |rel: &str| self.root.join(rel);
        while filled < self.chunk_size {
            match cur.file.read(&mut self.buf[filled..]) {
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
        let plain = &self.buf[..filled];
        let digest = sha256(plain);
        // filled <= chunk_size <= MAX_CHUNK_SIZE fits in u32.
        let len = filled as u32;
        let seq = self.seq;
        let offset = cur.offset;
        descriptor(
            &mut self.aad,
            seq,
            &cur.rel,
            offset,
            len,
            cur.mode,
            &digest,
            last_of_file,
        );
        let payload = match self.sealer.as_mut() {
            None => {
                let mut p = Vec::with_capacity(self.compression.max_compressed_len(filled));
                self.codec.compress(self.compression, plain, &mut p)?;
                p
            }
            Some(sealer) => {
                let to_seal = if self.compression == Compression::None {
                    plain
                } else {
                    self.scratch.clear();
                    self.codec
                        .compress(self.compression, plain, &mut self.scratch)?;
                    &self.scratch[..]
                };
                let mut p = Vec::with_capacity(to_seal.len() + migration_crypto::SEAL_OVERHEAD);
                sealer.seal(&self.aad, to_seal, &mut p)?;
                p
            }
        };
        if let Some(h) = self.hasher.as_mut() {
            h.update(&self.aad);
        }
        let chunk = Chunk {
            seq,
            path: if last_of_file {
                std::mem::take(&mut cur.rel)
            } else {
                cur.rel.clone()
            },
            offset,
            len,
            mode: cur.mode,
            digest,
            last_of_file,
            payload,
        };
        cur.offset += u64::from(len);
        self.seq += 1;
        self.bytes += u64::from(len);
        if last_of_file {
            self.files += 1;
            self.current = None;
        }
        Ok(StreamItem::Chunk(chunk))
    }

    fn end(&mut self) -> Result<StreamItem, ChunkError> {
        let digest = self
            .hasher
            .take()
            .map(Sha256::finish)
            .ok_or(ChunkError::Failed)?;
        let summary = StreamSummary {
            chunks: self.seq,
            files: self.files,
            bytes: self.bytes,
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
        self.state = State::Done;
        Ok(StreamItem::End(StreamEnd { summary, seal }))
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
        assert_eq!(cs[6].digest, sha256(b"89"));
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
