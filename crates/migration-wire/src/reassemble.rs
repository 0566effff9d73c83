//! Rebuilding a directory from a chunk stream, atomically.
//!
//! ```text
//!  frame body ──push_frame──► checks (order, path, sizes, digest present iff the header says so)
//!    ──► open in place (sealed) ──► decompress (if compressed) ──► sha256 (if a digest) ──► write
//!                                                                            into dest.partial-*
//!  End ──push──► totals + digest (+ sealed end) verified ──finish──► rename dest.partial-* → dest
//!  any error, or drop without finish ──► dest.partial-* removed
//! ```
//!
//! [`Reassembler::read_until_end`] (and [`Reassembler::read_from`]) split that over two threads,
//! so that verifying a chunk overlaps with writing the one before:
//!
//! ```text
//!  calling thread                                          reassembly-writer thread
//!  read frame, decode, check, open, decompress ──2──►  create file, write, set mode, close
//!        ▲                                                  │
//!        └──── frame / plaintext buffer (4 at most, reused) ◄┘
//! ```
//!
//! The [`Reassembler`] writes into a fresh staging directory next to the destination and renames
//! it to the destination only once the end of the stream has been verified. Every check failure
//! is a typed [`ReassembleError`], after which the staging directory is already gone: nothing
//! partial is ever left behind. Nothing touches the file system before its chunk verified.

use std::fmt;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::ops::Range;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError};
use std::thread;

use migration_crypto::{OpenError, Opener, Sha256, sha256};

use crate::chunk::{
    ChunkDigests, ChunkFields, MODE_MASK, STREAM_VERSION, StreamEnd, StreamHeader, StreamItem,
    StreamItemRef, StreamSummary, end_aad, is_safe_relative_path,
};
use crate::compress::{Codec, CompressError, Compression};
use crate::frame::{self, FrameError, ReadFrameError};

/// Configuration of a [`Reassembler`].
#[derive(Debug)]
pub struct ReassemblerConfig {
    /// Expect a stream sealed under this opener's key; `None` expects an unsealed stream.
    pub opener: Option<Opener>,
    /// Largest plaintext length accepted for one chunk.
    pub max_chunk: usize,
    /// Largest total of plaintext bytes accepted, `None` for no limit.
    pub max_total_bytes: Option<u64>,
}

/// Errors of the [`Reassembler`]. When one is returned the staging directory has been removed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReassembleError {
    /// The destination already exists.
    #[error("destination {path} already exists")]
    DestinationExists {
        /// The destination.
        path: PathBuf,
    },
    /// A directory above the destination is a symlink.
    #[error("{path}, above the destination, is a symlink")]
    SymlinkInDestination {
        /// The symlink.
        path: PathBuf,
    },
    /// A filesystem operation on the destination side failed.
    #[error("{path}: {source}")]
    Io {
        /// File or directory concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The reader given to [`Reassembler::read_from`] failed.
    #[error("reading the stream: {0}")]
    Read(#[source] io::Error),
    /// A frame is oversized or its body is not a stream item.
    #[error(transparent)]
    Frame(FrameError),
    /// The first item is not a header.
    #[error("the stream does not start with a header")]
    MissingHeader,
    /// A second header arrived.
    #[error("a header arrived in the middle of the stream")]
    UnexpectedHeader,
    /// The header's format version is not [`STREAM_VERSION`].
    #[error("unsupported stream version {got}")]
    UnsupportedVersion {
        /// Version received.
        got: u16,
    },
    /// A sealed stream was expected but this one (or its end) is not sealed.
    #[error("the stream is not sealed but the receiver requires sealing")]
    Unsealed,
    /// The stream (or its end) is sealed but the receiver has no key.
    #[error("the stream is sealed but the receiver has no key to open it")]
    UnexpectedlySealed,
    /// The header of an unsealed stream says its chunks carry no digest
    /// ([`ChunkDigests::SealOnly`]): nothing would prove their content.
    #[error("the stream is not sealed and its chunks carry no digest")]
    DigestsRequired,
    /// A chunk carries no digest in a stream whose header says every chunk does.
    #[error("chunk {seq} carries no digest")]
    MissingDigest {
        /// Sequence number.
        seq: u64,
    },
    /// A chunk carries a digest in a stream whose header says no chunk does.
    #[error("chunk {seq} carries a digest the header does not announce")]
    UnexpectedDigest {
        /// Sequence number.
        seq: u64,
    },
    /// A chunk says its payload is compressed in a stream without compression.
    #[error("chunk {seq} is marked compressed in an uncompressed stream")]
    UnexpectedCompression {
        /// Sequence number.
        seq: u64,
    },
    /// A sealed payload or end failed to open: tampered, or sealed under another key.
    #[error("opening sealed data: {0}")]
    Open(#[source] OpenError),
    /// A chunk path is unsafe: absolute, `..`, `.`, empty component, NUL, backslash, too long.
    #[error("unsafe path {path:?} in the stream")]
    PathTraversal {
        /// The path received.
        path: String,
    },
    /// A chunk path needs a directory where a file was written, or the reverse.
    #[error("path {path:?} conflicts with a file already received")]
    PathConflict {
        /// The path received.
        path: String,
    },
    /// A chunk arrived twice: its sequence number was already seen, or its file already exists.
    #[error("duplicate chunk {seq}")]
    Duplicate {
        /// Sequence number of the duplicate.
        seq: u64,
    },
    /// Chunks are missing before this one.
    #[error("chunk {got} arrived where chunk {expected} was expected")]
    Gap {
        /// The sequence number expected.
        expected: u64,
        /// The one received.
        got: u64,
    },
    /// A chunk does not continue its file where the previous one ended.
    #[error("chunk of {path:?} at offset {got}, expected offset {expected}")]
    OffsetMismatch {
        /// The file.
        path: String,
        /// The offset expected.
        expected: u64,
        /// The offset received.
        got: u64,
    },
    /// A chunk of another file arrived before the last chunk of this one.
    #[error("file {path:?} was left unfinished")]
    UnfinishedFile {
        /// The unfinished file.
        path: String,
    },
    /// A chunk that is not the last of its file is empty (the sender never does this).
    #[error("chunk {seq} is empty but not the last of its file")]
    EmptyChunk {
        /// Sequence number.
        seq: u64,
    },
    /// A chunk announces more plaintext than `max_chunk`.
    #[error("chunk {seq} of {len} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// Sequence number.
        seq: u64,
        /// Announced plaintext length.
        len: u32,
        /// Configured maximum.
        max: usize,
    },
    /// The stream carries more plaintext than `max_total_bytes`.
    #[error("the stream exceeds the maximum of {max} bytes")]
    TotalTooLarge {
        /// Configured maximum.
        max: u64,
    },
    /// A payload decompresses to more or fewer bytes than its announced length.
    #[error("chunk {seq} does not decompress to its announced {expected} bytes")]
    LengthMismatch {
        /// Sequence number.
        seq: u64,
        /// Announced plaintext length.
        expected: u32,
    },
    /// A payload does not decompress.
    #[error("chunk {seq} does not decompress: {source}")]
    Decompress {
        /// Sequence number.
        seq: u64,
        /// The decompression error.
        #[source]
        source: CompressError,
    },
    /// A chunk's plaintext does not match its digest.
    #[error("digest mismatch in {path:?} at offset {offset}")]
    DigestMismatch {
        /// The file.
        path: String,
        /// Offset of the chunk.
        offset: u64,
    },
    /// The end's totals or digest differ from what was received.
    #[error("end of stream mismatch: received {computed:?}, sender claims {claimed:?}")]
    EndMismatch {
        /// Totals of what was received.
        computed: StreamSummary,
        /// Totals the sender claims.
        claimed: StreamSummary,
    },
    /// An item arrived after the end.
    #[error("an item arrived after the end of the stream")]
    AfterEnd,
    /// The input ended before the end of the stream.
    #[error("the stream ended before its end item")]
    Truncated,
    /// The reassembler failed earlier and cannot continue.
    #[error("the reassembler failed earlier and cannot continue")]
    Failed,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ReassembleError + '_ {
    move |source| ReassembleError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Bytes a frame may need beyond the plaintext of a `max_chunk` chunk: compression expansion of
/// incompressible data, sealing overhead and the chunk's fields (path included).
pub fn max_frame_for(max_chunk: usize) -> usize {
    max_chunk
        .saturating_add(max_chunk / 64)
        .saturating_add(64 * 1024)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    ExpectHeader,
    Chunks,
    Ended,
    Done,
    Failed,
}

/// The file being received: where its next chunk must start.
#[derive(Debug)]
struct WritingFile {
    path: String,
    next_offset: u64,
}

/// Buffers of about a chunk that [`Reassembler::read_until_end`] keeps besides the frame being
/// read: queued for the writing thread or being written.
pub const WRITE_BUFFERS: usize = 3;
/// Writes queued for the writing thread of [`Reassembler::read_until_end`].
const WRITE_QUEUE: usize = 2;

/// Writes a chunk stream into a new directory, atomically.
pub struct Reassembler {
    dest: PathBuf,
    staging: Option<PathBuf>,
    opener: Option<Opener>,
    max_chunk: usize,
    max_total: Option<u64>,
    state: State,
    header: Option<StreamHeader>,
    next_seq: u64,
    files: u64,
    bytes: u64,
    hasher: Option<Sha256>,
    current: Option<WritingFile>,
    /// The current file, when written on this thread ([`Reassembler::push`],
    /// [`Reassembler::push_frame`]).
    file: Option<File>,
    codec: Codec,
    plain: Vec<u8>,
    aad: Vec<u8>,
    /// The path of the chunk being pushed by [`Reassembler::push_frame`], copied out of the
    /// frame so that its payload can be opened in place.
    path: String,
    summary: Option<StreamSummary>,
    /// Set while [`Reassembler::read_until_end`]'s writing thread runs: an error then leaves
    /// the staging directory for the caller to remove once that thread has ended (removing it
    /// earlier races the thread, which may create files and directories in it meanwhile).
    writer_running: bool,
}

impl fmt::Debug for Reassembler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reassembler")
            .field("dest", &self.dest)
            .field("staging", &self.staging)
            .field("state", &self.state)
            .field("next_seq", &self.next_seq)
            .field("files", &self.files)
            .field("bytes", &self.bytes)
            .finish_non_exhaustive()
    }
}

static STAGING_COUNTER: AtomicU64 = AtomicU64::new(0);

impl Reassembler {
    /// Creates the staging directory `<dest>.partial-<pid>-<n>` next to `dest`.
    ///
    /// Fails if `dest` exists ([`ReassembleError::DestinationExists`]) or if a directory above
    /// it is a symlink ([`ReassembleError::SymlinkInDestination`]).
    pub fn new(dest: &Path, config: ReassemblerConfig) -> Result<Reassembler, ReassembleError> {
        match fs::symlink_metadata(dest) {
            Ok(_) => {
                return Err(ReassembleError::DestinationExists {
                    path: dest.to_owned(),
                });
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(dest)(e)),
        }
        for ancestor in dest.ancestors().skip(1) {
            if ancestor.as_os_str().is_empty() {
                continue;
            }
            match fs::symlink_metadata(ancestor) {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(ReassembleError::SymlinkInDestination {
                        path: ancestor.to_owned(),
                    });
                }
                Ok(_) => {}
                Err(e) => return Err(io_err(ancestor)(e)),
            }
        }
        let Some(name) = dest.file_name() else {
            return Err(io_err(dest)(io::Error::new(
                io::ErrorKind::InvalidInput,
                "destination has no file name",
            )));
        };
        let parent = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        let staging = create_staging(&parent, name)?;
        let ReassemblerConfig {
            opener,
            max_chunk,
            max_total_bytes,
        } = config;
        Ok(Reassembler {
            dest: dest.to_owned(),
            staging: Some(staging),
            opener,
            max_chunk,
            max_total: max_total_bytes,
            state: State::ExpectHeader,
            header: None,
            next_seq: 0,
            files: 0,
            bytes: 0,
            hasher: Some(Sha256::new()),
            current: None,
            file: None,
            codec: Codec::new(),
            plain: Vec::new(),
            aad: Vec::new(),
            path: String::new(),
            summary: None,
            writer_running: false,
        })
    }

    /// The staging directory, while it exists.
    pub fn staging_dir(&self) -> Option<&Path> {
        self.staging.as_deref()
    }

    /// Takes one item. On error the staging directory is removed and every later call fails
    /// with [`ReassembleError::Failed`].
    pub fn push(&mut self, item: StreamItem) -> Result<(), ReassembleError> {
        match item {
            StreamItem::Header(h) => self.push_item(Item::Header(h)),
            StreamItem::Chunk(mut c) => {
                let (fields, payload) = c.split_mut();
                self.push_item(Item::Chunk(fields, payload))
            }
            StreamItem::End(e) => self.push_item(Item::End(e)),
        }
    }

    /// Takes one frame body (as [`frame::read_frame_into`] reads it) holding a stream item and
    /// pushes it without copying: a chunk's payload is opened (decrypted where it lies, so
    /// `body` is scribbled over), decompressed, verified and written straight from `body`.
    /// Returns the payload's length (compressed and sealed, as carried) for a chunk, `None`
    /// for a header or an end.
    ///
    /// A body that is not a stream item is [`ReassembleError::Frame`] (or
    /// [`ReassembleError::UnsupportedVersion`] for the header of another format version); on
    /// any error the staging directory is removed and every later call fails, as with
    /// [`push`](Self::push).
    pub fn push_frame(&mut self, body: &mut [u8]) -> Result<Option<usize>, ReassembleError> {
        if matches!(self.state, State::Failed | State::Done) {
            return Err(ReassembleError::Failed);
        }
        let (fields, at) = match self.decode_frame(body) {
            Ok(Decoded::Header(h)) => return self.push_item(Item::Header(h)).map(|()| None),
            Ok(Decoded::End(e)) => return self.push_item(Item::End(e)).map(|()| None),
            Ok(Decoded::Chunk(fields, at)) => (fields, at),
            Err(e) => {
                self.abort();
                return Err(e);
            }
        };
        let path = std::mem::take(&mut self.path);
        let payload = &mut body[at..];
        let payload_len = payload.len();
        let res = self.push_item(Item::Chunk(fields.with_path(&path), payload));
        self.path = path;
        res.map(|()| Some(payload_len))
    }

    /// Decodes a frame body. A chunk's path is copied into `self.path` (its fields keep an
    /// empty one) and its payload is `body[at..]`, so that it can be opened in place.
    fn decode_frame(&mut self, body: &[u8]) -> Result<Decoded, ReassembleError> {
        let item = match frame::decode_body_borrowed::<StreamItemRef<'_>>(body) {
            Ok(item) => item,
            Err(e) => {
                return Err(match header_version(body) {
                    Some(got) if self.state == State::ExpectHeader && got != STREAM_VERSION => {
                        ReassembleError::UnsupportedVersion { got }
                    }
                    _ => ReassembleError::Frame(e),
                });
            }
        };
        let c = match item {
            StreamItemRef::Header(h) => return Ok(Decoded::Header(h)),
            StreamItemRef::End(e) => return Ok(Decoded::End(e)),
            StreamItemRef::Chunk(c) => c,
        };
        // The payload is the body's tail: it is the last field of the only thing in the frame,
        // and decoding refuses trailing bytes. Checked rather than assumed.
        let at = body.len() - c.payload.len().min(body.len());
        if !std::ptr::eq(body[at..].as_ptr(), c.payload.as_ptr()) {
            return Err(ReassembleError::Failed);
        }
        self.path.clear();
        self.path.push_str(c.path);
        Ok(Decoded::Chunk(c.fields().with_path(""), at))
    }

    /// The state machine over items; aborts on error.
    fn push_item(&mut self, item: Item<'_>) -> Result<(), ReassembleError> {
        let res = match self.state {
            State::Failed | State::Done => return Err(ReassembleError::Failed),
            State::Ended => Err(ReassembleError::AfterEnd),
            State::ExpectHeader => match item {
                Item::Header(h) => self.on_header(h),
                _ => Err(ReassembleError::MissingHeader),
            },
            State::Chunks => match item {
                Item::Header(_) => Err(ReassembleError::UnexpectedHeader),
                Item::Chunk(c, payload) => self.on_chunk(c, payload),
                Item::End(e) => self.on_end(e),
            },
        };
        if res.is_err() {
            self.abort();
        }
        res
    }

    /// Whether the end of the stream has been received and verified.
    pub fn is_ended(&self) -> bool {
        self.state == State::Ended
    }

    /// Renames the staging directory to the destination, once the end was verified.
    ///
    /// Fails with [`ReassembleError::Truncated`] if the end has not been received.
    pub fn finish(mut self) -> Result<StreamSummary, ReassembleError> {
        let summary = match (self.state, self.summary) {
            (State::Ended, Some(s)) => s,
            (State::Failed, _) => return Err(ReassembleError::Failed),
            _ => return Err(ReassembleError::Truncated),
        };
        let Some(staging) = self.staging.clone() else {
            return Err(ReassembleError::Failed);
        };
        // rename(2) would silently replace an empty directory created meanwhile.
        if fs::symlink_metadata(&self.dest).is_ok() {
            return Err(ReassembleError::DestinationExists {
                path: self.dest.clone(),
            });
        }
        fs::rename(&staging, &self.dest).map_err(io_err(&self.dest))?;
        self.staging = None;
        self.state = State::Done;
        Ok(summary)
    }

    /// Reads frames from `r` until the end item, then [`finish`](Self::finish)es. Bytes after
    /// the end's frame are left unread. See [`read_until_end`](Self::read_until_end).
    pub fn read_from<R: Read>(mut self, r: R) -> Result<StreamSummary, ReassembleError> {
        self.read_until_end(r, |_| {})?;
        self.finish()
    }

    /// Reads frames from `r` until the end item is verified and every file written, leaving
    /// bytes after the end's frame unread; `on_chunk` is given each chunk's payload length (as
    /// [`push_frame`](Self::push_frame) returns it). Then [`finish`](Self::finish) renames the
    /// directory into place.
    ///
    /// Two threads share the work: this one reads, opens, decompresses and verifies each chunk
    /// straight from its frame buffer, while a thread started for the call creates and writes
    /// the files, fed through a queue of [`WRITE_BUFFERS`] recycled buffers (a raw chunk's
    /// frame buffer itself, or the buffer it was decompressed into: nothing is copied). Errors
    /// are those of `push_frame`, in stream order: a write that failed before a later chunk
    /// failed to verify is the error returned. If the thread cannot be started, everything
    /// runs on this one. On any error the staging directory is removed, after the writing
    /// thread has ended.
    pub fn read_until_end<R: Read>(
        &mut self,
        mut r: R,
        mut on_chunk: impl FnMut(usize),
    ) -> Result<(), ReassembleError> {
        if matches!(self.state, State::Failed | State::Done) {
            return Err(ReassembleError::Failed);
        }
        let Some(staging) = self.staging.clone() else {
            return Err(ReassembleError::Failed);
        };
        let (ops_tx, ops_rx) = mpsc::sync_channel::<WriteOp>(WRITE_QUEUE);
        // Room for every buffer: handing one back never blocks.
        let (free_tx, free_rx) = mpsc::sync_channel::<Vec<u8>>(WRITE_BUFFERS + 1);
        let res = thread::scope(|s| {
            let writer = thread::Builder::new()
                .name("reassembly-writer".into())
                .spawn_scoped(s, move || write_side(&staging, ops_rx, free_tx));
            let Ok(writer) = writer else {
                return self.read_here(&mut r, &mut on_chunk);
            };
            self.writer_running = true;
            // A file left open by an earlier push goes on on the writing thread.
            let adopt = match (self.file.take(), &self.current) {
                (Some(file), Some(cur)) => Some(WriteOp::Adopt {
                    file,
                    path: cur.path.clone(),
                }),
                _ => None,
            };
            let adopted = adopt.map_or(Ok(()), |op| ops_tx.send(op));
            let verified = match adopted {
                Ok(()) => self.verify_frames(&mut r, &mut on_chunk, &ops_tx, &free_rx),
                Err(_) => Err(ReassembleError::Failed),
            };
            // The writing thread ends once it has done every write queued.
            drop(ops_tx);
            let written = writer.join();
            self.writer_running = false;
            let written = written.unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            // A write error is about an earlier chunk than any error of this thread (which
            // may be no more than a consequence: the queue closed).
            written.and(verified)
        });
        if res.is_err() {
            self.abort();
        }
        res
    }

    /// [`read_until_end`](Self::read_until_end) on this thread alone.
    fn read_here(
        &mut self,
        r: &mut impl Read,
        on_chunk: &mut impl FnMut(usize),
    ) -> Result<(), ReassembleError> {
        let max = max_frame_for(self.max_chunk);
        let mut buf = Vec::new();
        while !self.is_ended() {
            let len = read_frame(r, max, &mut buf)?;
            if let Some(payload) = self.push_frame(&mut buf[..len])? {
                on_chunk(payload);
            }
        }
        Ok(())
    }

    /// The verifying side of [`read_until_end`](Self::read_until_end): reads frames, runs the
    /// state machine and verifies chunks, and queues their writes to `ops`; buffers come back
    /// through `free` (at most [`WRITE_BUFFERS`] are ever taken from it).
    fn verify_frames(
        &mut self,
        r: &mut impl Read,
        on_chunk: &mut impl FnMut(usize),
        ops: &SyncSender<WriteOp>,
        free: &Receiver<Vec<u8>>,
    ) -> Result<(), ReassembleError> {
        let max = max_frame_for(self.max_chunk);
        let mut pool = Pool { free, allocated: 0 };
        let mut frame_buf = Vec::new();
        let send = |op| ops.send(op).map_err(|_| ReassembleError::Failed);
        while !self.is_ended() {
            let len = read_frame(r, max, &mut frame_buf)?;
            let (fields, at) = match self.decode_frame(&frame_buf[..len])? {
                Decoded::Header(h) => {
                    self.push_item(Item::Header(h))?;
                    continue;
                }
                Decoded::End(e) => {
                    self.push_item(Item::End(e))?;
                    continue;
                }
                Decoded::Chunk(fields, at) => (fields, at),
            };
            if self.state != State::Chunks {
                // Refused by the state machine (a chunk before the header).
                let payload = &mut frame_buf[at..len];
                self.push_item(Item::Chunk(fields, payload))?;
                continue;
            }
            let path = std::mem::take(&mut self.path);
            let fields = fields.with_path(&path);
            let mut plain = if fields.compressed {
                pool.take()?
            } else {
                Vec::new()
            };
            let verified = self.verify_chunk(fields, &mut frame_buf[at..len], &mut plain);
            let v = match verified {
                Ok(v) => v,
                Err(e) => {
                    self.path = path;
                    return Err(e);
                }
            };
            if v.create {
                send(WriteOp::Create {
                    path: path.clone(),
                    seq: fields.seq,
                })?;
            }
            self.path = path;
            match v.plain {
                PlainAt::Buffer => {
                    let range = 0..plain.len();
                    send(WriteOp::Write { buf: plain, range })?;
                }
                PlainAt::Payload(range) => {
                    let range = at + range.start..at + range.end;
                    let buf = std::mem::replace(&mut frame_buf, pool.take()?);
                    send(WriteOp::Write { buf, range })?;
                }
            }
            if let Some(mode) = v.close {
                send(WriteOp::Close { mode })?;
            }
            on_chunk(len - at);
        }
        Ok(())
    }

    fn abort(&mut self) {
        self.state = State::Failed;
        self.current = None;
        self.file = None;
        if self.writer_running {
            // `read_until_end` aborts again once the writing thread has ended.
            return;
        }
        if let Some(staging) = self.staging.take() {
            // Best effort: nothing better to do with an error while already failing.
            let _ = fs::remove_dir_all(staging);
        }
    }

    fn on_header(&mut self, h: StreamHeader) -> Result<(), ReassembleError> {
        if h.version != STREAM_VERSION {
            return Err(ReassembleError::UnsupportedVersion { got: h.version });
        }
        match (h.sealed_with, &self.opener) {
            (None, None) => {}
            (Some(found), Some(opener)) => {
                let expected = opener.key_id();
                if found != expected {
                    return Err(ReassembleError::Open(OpenError::WrongKey {
                        expected,
                        found,
                    }));
                }
            }
            (None, Some(_)) => return Err(ReassembleError::Unsealed),
            (Some(_), None) => return Err(ReassembleError::UnexpectedlySealed),
        }
        // Sealed, a stream may go without digests, or keep them (they are then checked too).
        if h.sealed_with.is_none() && h.digests == ChunkDigests::SealOnly {
            return Err(ReassembleError::DigestsRequired);
        }
        self.header = Some(h);
        self.state = State::Chunks;
        Ok(())
    }

    /// A chunk pushed on this thread: verified, then written.
    fn on_chunk(&mut self, c: ChunkFields<'_>, payload: &mut [u8]) -> Result<(), ReassembleError> {
        let mut plain = std::mem::take(&mut self.plain);
        let res = self
            .verify_chunk(c, payload, &mut plain)
            .and_then(|v| self.write_chunk(c, &v, payload, &plain));
        self.plain = plain;
        res
    }

    /// Writes a verified chunk on this thread.
    fn write_chunk(
        &mut self,
        c: ChunkFields<'_>,
        v: &Verified,
        payload: &[u8],
        plain: &[u8],
    ) -> Result<(), ReassembleError> {
        let staging = self.staging.as_deref().ok_or(ReassembleError::Failed)?;
        if v.create {
            self.file = Some(create_file(staging, c.path, c.seq)?);
        }
        let data = match &v.plain {
            PlainAt::Payload(range) => payload.get(range.clone()).ok_or(ReassembleError::Failed)?,
            PlainAt::Buffer => plain,
        };
        let file = self.file.as_mut().ok_or(ReassembleError::Failed)?;
        file.write_all(data)
            .map_err(|e| io_err(&staging.join(c.path))(e))?;
        if let Some(mode) = v.close {
            file.set_permissions(fs::Permissions::from_mode(mode))
                .map_err(|e| io_err(&staging.join(c.path))(e))?;
            self.file = None;
        }
        Ok(())
    }

    /// Checks chunk `c` against the stream so far, opens its payload in place, decompresses it
    /// into `plain` if it is compressed, and checks its length and digest; then counts it.
    /// Touches no file: says what to write.
    fn verify_chunk(
        &mut self,
        c: ChunkFields<'_>,
        payload: &mut [u8],
        plain: &mut Vec<u8>,
    ) -> Result<Verified, ReassembleError> {
        let Some(header) = self.header else {
            return Err(ReassembleError::MissingHeader);
        };
        match (header.digests, c.digest) {
            (ChunkDigests::Sha256, None) => {
                return Err(ReassembleError::MissingDigest { seq: c.seq });
            }
            (ChunkDigests::SealOnly, Some(_)) => {
                return Err(ReassembleError::UnexpectedDigest { seq: c.seq });
            }
            (ChunkDigests::Sha256, Some(_)) | (ChunkDigests::SealOnly, None) => {}
        }
        if c.compressed && header.compression == Compression::None {
            return Err(ReassembleError::UnexpectedCompression { seq: c.seq });
        }
        if c.seq < self.next_seq {
            return Err(ReassembleError::Duplicate { seq: c.seq });
        }
        if c.seq > self.next_seq {
            return Err(ReassembleError::Gap {
                expected: self.next_seq,
                got: c.seq,
            });
        }
        if c.len as usize > self.max_chunk {
            return Err(ReassembleError::TooLarge {
                seq: c.seq,
                len: c.len,
                max: self.max_chunk,
            });
        }
        let total = self.bytes.saturating_add(u64::from(c.len));
        if let Some(max) = self.max_total
            && total > max
        {
            return Err(ReassembleError::TotalTooLarge { max });
        }
        if !is_safe_relative_path(c.path) {
            return Err(ReassembleError::PathTraversal {
                path: c.path.to_owned(),
            });
        }
        if c.len == 0 && !c.last_of_file {
            return Err(ReassembleError::EmptyChunk { seq: c.seq });
        }
        let create = match &self.current {
            Some(cur) if cur.path.as_str() != c.path => {
                return Err(ReassembleError::UnfinishedFile {
                    path: cur.path.clone(),
                });
            }
            Some(cur) if cur.next_offset != c.offset => {
                return Err(ReassembleError::OffsetMismatch {
                    path: c.path.to_owned(),
                    expected: cur.next_offset,
                    got: c.offset,
                });
            }
            Some(_) => false,
            None if c.offset != 0 => {
                return Err(ReassembleError::OffsetMismatch {
                    path: c.path.to_owned(),
                    expected: 0,
                    got: c.offset,
                });
            }
            None => true,
        };

        c.descriptor(&mut self.aad);
        let payload_at = payload.as_ptr() as usize;
        let data: &[u8] = match self.opener.as_mut() {
            Some(opener) => opener
                .open_in_place(&self.aad, payload)
                .map_err(ReassembleError::Open)?,
            None => payload,
        };
        let len = c.len as usize;
        let at = if c.compressed {
            plain.clear();
            plain.reserve(len);
            match self.codec.decompress(header.compression, data, len, plain) {
                Ok(()) => {}
                Err(CompressError::OutputTooLarge { .. }) => {
                    return Err(ReassembleError::LengthMismatch {
                        seq: c.seq,
                        expected: c.len,
                    });
                }
                Err(source) => {
                    return Err(ReassembleError::Decompress { seq: c.seq, source });
                }
            }
            PlainAt::Buffer
        } else {
            // Where the opened plaintext lies in the payload (after the record's header).
            let start = (data.as_ptr() as usize).wrapping_sub(payload_at);
            PlainAt::Payload(start..start.saturating_add(data.len()))
        };
        let plain: &[u8] = match &at {
            PlainAt::Buffer => plain,
            PlainAt::Payload(_) => data,
        };
        if plain.len() != len {
            return Err(ReassembleError::LengthMismatch {
                seq: c.seq,
                expected: c.len,
            });
        }
        if let Some(digest) = c.digest
            && sha256(plain) != digest
        {
            return Err(ReassembleError::DigestMismatch {
                path: c.path.to_owned(),
                offset: c.offset,
            });
        }
        // Verified: count it.
        if let Some(h) = self.hasher.as_mut() {
            h.update(&self.aad);
        }
        self.next_seq += 1;
        self.bytes = total;
        let close = if c.last_of_file {
            self.current = None;
            self.files += 1;
            Some(c.mode & MODE_MASK)
        } else {
            let next_offset = c.offset + u64::from(c.len);
            match &mut self.current {
                Some(cur) => cur.next_offset = next_offset,
                None => {
                    self.current = Some(WritingFile {
                        path: c.path.to_owned(),
                        next_offset,
                    });
                }
            }
            None
        };
        Ok(Verified {
            create,
            plain: at,
            close,
        })
    }

    fn on_end(&mut self, end: StreamEnd) -> Result<(), ReassembleError> {
        let Some(header) = self.header else {
            return Err(ReassembleError::MissingHeader);
        };
        if let Some(cur) = &self.current {
            return Err(ReassembleError::UnfinishedFile {
                path: cur.path.clone(),
            });
        }
        let digest = self
            .hasher
            .take()
            .map(Sha256::finish)
            .ok_or(ReassembleError::Failed)?;
        let computed = StreamSummary {
            chunks: self.next_seq,
            files: self.files,
            bytes: self.bytes,
            digest,
        };
        if computed != end.summary {
            return Err(ReassembleError::EndMismatch {
                computed,
                claimed: end.summary,
            });
        }
        match (self.opener.as_mut(), end.seal) {
            (None, None) => {}
            (Some(_), None) => return Err(ReassembleError::Unsealed),
            (None, Some(_)) => return Err(ReassembleError::UnexpectedlySealed),
            (Some(opener), Some(mut record)) => {
                end_aad(&mut self.aad, &header, &end.summary)
                    .map_err(FrameError::Encode)
                    .map_err(ReassembleError::Frame)?;
                let opened = opener
                    .open_in_place(&self.aad, &mut record)
                    .map_err(ReassembleError::Open)?;
                if !opened.is_empty() {
                    return Err(ReassembleError::Open(OpenError::Tampered));
                }
            }
        }
        self.summary = Some(computed);
        self.state = State::Ended;
        Ok(())
    }
}

impl Drop for Reassembler {
    fn drop(&mut self) {
        if let Some(staging) = self.staging.take() {
            let _ = fs::remove_dir_all(staging);
        }
    }
}

/// What [`Reassembler::verify_chunk`] found a chunk asks of the files.
#[derive(Debug)]
struct Verified {
    /// The chunk starts its file: create it first.
    create: bool,
    /// Where the plaintext is.
    plain: PlainAt,
    /// The chunk ends its file: give it this mode and close it.
    close: Option<u32>,
}

/// Where a verified chunk's plaintext is.
#[derive(Debug)]
enum PlainAt {
    /// In its payload (opened in place), at this range.
    Payload(Range<usize>),
    /// In the buffer it was decompressed into.
    Buffer,
}

/// A frame body decoded by [`Reassembler::decode_frame`].
enum Decoded {
    Header(StreamHeader),
    /// A chunk's fields (its path in `Reassembler::path`) and where its payload starts.
    Chunk(ChunkFields<'static>, usize),
    End(StreamEnd),
}

/// What the verifying side of [`Reassembler::read_until_end`] asks the writing side.
enum WriteOp {
    /// Go on writing this file, opened by an earlier push.
    Adopt { file: File, path: String },
    /// Create the file of chunk `seq` (and the directories above it).
    Create { path: String, seq: u64 },
    /// Append `buf[range]` to the file; then hand `buf` back.
    Write { buf: Vec<u8>, range: Range<usize> },
    /// The file is complete: give it `mode` and close it.
    Close { mode: u32 },
}

/// The writing thread of [`Reassembler::read_until_end`]: does each operation in order,
/// handing buffers back to `free`, until the queue closes or an operation fails.
fn write_side(
    staging: &Path,
    ops: Receiver<WriteOp>,
    free: SyncSender<Vec<u8>>,
) -> Result<(), ReassembleError> {
    let mut current: Option<(File, String)> = None;
    for op in ops {
        #[cfg(test)]
        tests::writer_lag(staging);
        match op {
            WriteOp::Adopt { file, path } => current = Some((file, path)),
            WriteOp::Create { path, seq } => {
                current = Some((create_file(staging, &path, seq)?, path));
            }
            WriteOp::Write { buf, range } => {
                let (file, path) = current.as_mut().ok_or(ReassembleError::Failed)?;
                let data = buf.get(range).ok_or(ReassembleError::Failed)?;
                file.write_all(data)
                    .map_err(|e| io_err(&staging.join(&*path))(e))?;
                // The verifying side may be gone already; then the buffer is simply dropped.
                let _ = free.try_send(buf);
            }
            WriteOp::Close { mode } => {
                let (file, path) = current.take().ok_or(ReassembleError::Failed)?;
                file.set_permissions(fs::Permissions::from_mode(mode))
                    .map_err(|e| io_err(&staging.join(&path))(e))?;
            }
        }
    }
    Ok(())
}

/// The buffers of [`Reassembler::verify_frames`]: those handed back by the writing thread, or
/// new ones while fewer than [`WRITE_BUFFERS`] exist.
struct Pool<'a> {
    free: &'a Receiver<Vec<u8>>,
    allocated: usize,
}

impl Pool<'_> {
    /// A buffer; waits for one to come back when all exist. Fails when the writing thread is
    /// gone (its error explains why).
    fn take(&mut self) -> Result<Vec<u8>, ReassembleError> {
        match self.free.try_recv() {
            Ok(b) => Ok(b),
            Err(TryRecvError::Empty) if self.allocated < WRITE_BUFFERS => {
                self.allocated += 1;
                Ok(Vec::new())
            }
            Err(TryRecvError::Empty) => self.free.recv().map_err(|_| ReassembleError::Failed),
            Err(TryRecvError::Disconnected) => Err(ReassembleError::Failed),
        }
    }
}

/// Reads one frame into `buf` (grown as needed, never shrunk); returns its length.
fn read_frame(r: &mut impl Read, max: usize, buf: &mut Vec<u8>) -> Result<usize, ReassembleError> {
    match frame::read_frame_into(r, max, buf) {
        Ok(Some(len)) => Ok(len),
        Ok(None) | Err(ReadFrameError::Frame(FrameError::Truncated { .. })) => {
            Err(ReassembleError::Truncated)
        }
        Err(ReadFrameError::Frame(e)) => Err(ReassembleError::Frame(e)),
        Err(ReadFrameError::Io(e)) => Err(ReassembleError::Read(e)),
        // `ReadFrameError` is non-exhaustive (it lives in wire-frame): a later kind of read
        // failure is a read failure.
        Err(e) => Err(ReassembleError::Read(io::Error::other(e))),
    }
}

/// Creates the file of chunk `seq` at `path` under `staging`, and the directories above it.
fn create_file(staging: &Path, path: &str, seq: u64) -> Result<File, ReassembleError> {
    let full = staging.join(path);
    let conflict = || ReassembleError::PathConflict {
        path: path.to_owned(),
    };
    if let Some((dirs, _)) = path.rsplit_once('/') {
        let mut builder = DirBuilder::new();
        builder.recursive(true).mode(0o755);
        builder.create(staging.join(dirs)).map_err(|e| {
            if matches!(
                e.kind(),
                io::ErrorKind::AlreadyExists | io::ErrorKind::NotADirectory
            ) {
                conflict()
            } else {
                io_err(&full)(e)
            }
        })?;
    }
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&full)
        .map_err(|e| match e.kind() {
            io::ErrorKind::AlreadyExists => match fs::symlink_metadata(&full) {
                Ok(m) if m.is_dir() => conflict(),
                _ => ReassembleError::Duplicate { seq },
            },
            io::ErrorKind::NotADirectory => conflict(),
            _ => io_err(&full)(e),
        })
}

/// An item as [`Reassembler::push_item`] takes it: a chunk's fields borrowed, its payload
/// mutable (it is opened in place).
enum Item<'a> {
    Header(StreamHeader),
    Chunk(ChunkFields<'a>, &'a mut [u8]),
    End(StreamEnd),
}

/// The version of a frame body that starts as a header does in every format version (the
/// variant's index 0, then the version), even if the rest does not decode in this one.
fn header_version(body: &[u8]) -> Option<u16> {
    match postcard::take_from_bytes::<(u8, u16)>(body) {
        Ok(((0, version), _)) => Some(version),
        _ => None,
    }
}

fn create_staging(parent: &Path, name: &std::ffi::OsStr) -> Result<PathBuf, ReassembleError> {
    let pid = std::process::id();
    let mut last_err = None;
    for _ in 0..64 {
        let n = STAGING_COUNTER.fetch_add(1, Ordering::Relaxed);
        let mut file_name = name.to_owned();
        file_name.push(format!(".partial-{pid}-{n}"));
        let path = parent.join(file_name);
        match DirBuilder::new().mode(0o700).create(&path) {
            Ok(()) => return Ok(path),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last_err = Some(e),
            Err(e) => return Err(io_err(&path)(e)),
        }
    }
    Err(io_err(parent)(last_err.unwrap_or_else(|| {
        io::Error::new(io::ErrorKind::AlreadyExists, "no free staging name")
    })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::{Chunk, Chunker, ChunkerConfig};
    use migration_crypto::{Key, Sealer};
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    const CS: usize = 8;

    /// Writing threads whose staging directory is under this directory pause before each
    /// operation: lets a test make the writer fall behind the verifying side.
    static LAGGING_UNDER: std::sync::Mutex<Option<PathBuf>> = std::sync::Mutex::new(None);

    pub(super) fn writer_lag(staging: &Path) {
        let lagging = LAGGING_UNDER
            .lock()
            .is_ok_and(|g| g.as_deref().is_some_and(|d| staging.starts_with(d)));
        if lagging {
            thread::sleep(std::time::Duration::from_millis(30));
        }
    }

    /// A source tree, the chunk size to send it with and the key to seal with.
    struct Fixture {
        src: tempfile::TempDir,
        out: tempfile::TempDir,
        key: Key,
        cs: usize,
    }

    fn fixture() -> Fixture {
        let src = tempfile::tempdir().unwrap();
        let r = src.path();
        fs::create_dir_all(r.join("d/e")).unwrap();
        fs::write(r.join("a"), b"hello world, this is a").unwrap();
        fs::write(r.join("d/e/f"), vec![7u8; 2 * CS]).unwrap();
        fs::write(r.join("empty"), b"").unwrap();
        fs::set_permissions(r.join("a"), fs::Permissions::from_mode(0o640)).unwrap();
        Fixture {
            src,
            out: tempfile::tempdir().unwrap(),
            key: Key::generate().unwrap(),
            cs: CS,
        }
    }

    /// Chunks of 256 bytes that compress (text) and that do not (noise), so that both kinds of
    /// payload travel: [`fixture`]'s chunks are too small for compression to pay.
    fn compressible_fixture() -> Fixture {
        let src = tempfile::tempdir().unwrap();
        let r = src.path();
        fs::write(r.join("pages.img"), b"page ".repeat(200)).unwrap();
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let noise: Vec<u8> = (0..300)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        fs::write(r.join("random.img"), noise).unwrap();
        fs::write(r.join("zero.img"), b"").unwrap();
        Fixture {
            src,
            out: tempfile::tempdir().unwrap(),
            key: Key::generate().unwrap(),
            cs: 256,
        }
    }

    impl Fixture {
        fn items(&self, compression: Compression, sealed: bool) -> Vec<StreamItem> {
            self.items_of(self.chunker(compression, sealed))
        }

        fn chunker(&self, compression: Compression, sealed: bool) -> Chunker {
            Chunker::new(
                self.src.path(),
                ChunkerConfig {
                    chunk_size: self.cs,
                    compression,
                    sealer: sealed.then(|| Sealer::new(&self.key).unwrap()),
                },
            )
            .unwrap()
        }

        fn items_of(&self, mut c: Chunker) -> Vec<StreamItem> {
            let mut v = Vec::new();
            while let Some(i) = c.next_item().unwrap() {
                v.push(i);
            }
            v
        }

        fn dest(&self) -> PathBuf {
            self.out.path().join("dest")
        }

        fn reassembler(&self, sealed: bool) -> Reassembler {
            Reassembler::new(&self.dest(), self.config(sealed)).unwrap()
        }

        fn config(&self, sealed: bool) -> ReassemblerConfig {
            ReassemblerConfig {
                opener: sealed.then(|| Opener::new(&self.key)),
                max_chunk: self.cs,
                max_total_bytes: None,
            }
        }

        /// Pushes all items into a fresh reassembler and finishes; on error checks that nothing
        /// is left in the output directory.
        fn run(
            &self,
            items: Vec<StreamItem>,
            sealed: bool,
        ) -> Result<StreamSummary, ReassembleError> {
            self.run_with(items, self.config(sealed))
        }

        fn run_with(
            &self,
            items: Vec<StreamItem>,
            config: ReassemblerConfig,
        ) -> Result<StreamSummary, ReassembleError> {
            let mut r = Reassembler::new(&self.dest(), config).unwrap();
            let staging = r.staging_dir().unwrap().to_owned();
            assert!(staging.is_dir());
            let res = items
                .into_iter()
                .try_for_each(|i| r.push(i))
                .and_then(|()| r.finish());
            if res.is_err() {
                assert!(!staging.exists(), "staging left behind");
                self.assert_clean();
            }
            res
        }

        fn assert_clean(&self) {
            let left: Vec<_> = fs::read_dir(self.out.path()).unwrap().collect();
            assert!(left.is_empty(), "left behind: {left:?}");
        }
    }

    fn chunk_mut(items: &mut [StreamItem], seq: u64) -> &mut Chunk {
        items
            .iter_mut()
            .find_map(|i| match i {
                StreamItem::Chunk(c) if c.seq == seq => Some(c),
                _ => None,
            })
            .unwrap()
    }

    fn end_mut(items: &mut [StreamItem]) -> &mut StreamEnd {
        match items.last_mut().unwrap() {
            StreamItem::End(e) => e,
            _ => panic!("no end"),
        }
    }

    /// Reads a directory tree into path -> (mode, bytes).
    fn read_tree(root: &Path) -> BTreeMap<String, (u32, Vec<u8>)> {
        fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, (u32, Vec<u8>)>) {
            for e in fs::read_dir(dir).unwrap() {
                let p = e.unwrap().path();
                let m = fs::symlink_metadata(&p).unwrap();
                if m.is_dir() {
                    walk(root, &p, out);
                } else {
                    let rel = p.strip_prefix(root).unwrap().to_str().unwrap().to_owned();
                    out.insert(rel, (m.permissions().mode() & 0o777, fs::read(&p).unwrap()));
                }
            }
        }
        let mut out = BTreeMap::new();
        walk(root, root, &mut out);
        out
    }

    #[test]
    fn round_trip_every_mode() {
        for compression in [
            Compression::None,
            Compression::Zstd { level: 3 },
            Compression::Gzip { level: 6 },
        ] {
            for sealed in [false, true] {
                let f = fixture();
                let items = f.items(compression, sealed);
                let summary = f.run(items, sealed).unwrap();
                assert_eq!(summary.files, 3);
                assert_eq!(summary.bytes, 22 + 16);
                assert_eq!(read_tree(&f.dest()), read_tree(f.src.path()));
                assert_eq!(read_tree(&f.dest())["a"].0, 0o640);
                // Only dest remains: the staging directory was renamed.
                assert_eq!(fs::read_dir(f.out.path()).unwrap().count(), 1);
            }
        }
    }

    #[test]
    fn write_to_and_read_from_round_trip() {
        let f = fixture();
        let chunker = Chunker::new(
            f.src.path(),
            ChunkerConfig {
                chunk_size: CS,
                compression: Compression::Zstd { level: 1 },
                sealer: Some(Sealer::new(&f.key).unwrap()),
            },
        )
        .unwrap();
        let mut wire = Vec::new();
        let sent = chunker.write_to(&mut wire).unwrap();
        wire.extend_from_slice(b"after the end");
        let mut reader: &[u8] = &wire;
        let got = f.reassembler(true).read_from(&mut reader).unwrap();
        assert_eq!(got, sent);
        assert_eq!(
            reader, b"after the end",
            "bytes after the end are left unread"
        );
        assert_eq!(read_tree(&f.dest()), read_tree(f.src.path()));
    }

    #[test]
    fn push_frame_takes_frame_bodies_and_reports_payload_lengths() {
        let f = fixture();
        let items = f.items(Compression::Zstd { level: 1 }, true);
        let mut r = f.reassembler(true);
        let mut payloads = 0;
        for item in &items {
            let mut framed = Vec::new();
            frame::encode(item, frame::DEFAULT_MAX_FRAME, &mut framed).unwrap();
            let got = r.push_frame(&mut framed[frame::LEN_PREFIX..]).unwrap();
            match item {
                StreamItem::Chunk(c) => {
                    assert_eq!(got, Some(c.payload.len()));
                    payloads += 1;
                }
                _ => assert_eq!(got, None),
            }
        }
        assert!(payloads >= 3, "{payloads}");
        r.finish().unwrap();
        assert_eq!(read_tree(f.src.path()), read_tree(&f.dest()));
    }

    #[test]
    fn push_frame_refuses_a_body_that_is_no_item_and_cleans_up() {
        let f = fixture();
        let mut r = f.reassembler(false);
        let staging = r.staging_dir().unwrap().to_owned();
        assert!(matches!(
            r.push_frame(&mut [0xff, 0xff, 0xff]),
            Err(ReassembleError::Frame(_))
        ));
        assert!(!staging.exists());
        assert!(matches!(
            r.push_frame(&mut []),
            Err(ReassembleError::Failed)
        ));
        f.assert_clean();
    }

    #[test]
    fn destination_exists() {
        let f = fixture();
        fs::create_dir(f.dest()).unwrap();
        assert!(matches!(
            Reassembler::new(&f.dest(), f.config(false)),
            Err(ReassembleError::DestinationExists { .. })
        ));
        // Also when it appears while streaming.
        fs::remove_dir(f.dest()).unwrap();
        let mut r = f.reassembler(false);
        let staging = r.staging_dir().unwrap().to_owned();
        for i in f.items(Compression::None, false) {
            r.push(i).unwrap();
        }
        fs::create_dir(f.dest()).unwrap();
        assert!(matches!(
            r.finish(),
            Err(ReassembleError::DestinationExists { .. })
        ));
        assert!(!staging.exists());
    }

    #[test]
    fn symlink_in_destination_ancestry() {
        let f = fixture();
        fs::create_dir(f.out.path().join("real")).unwrap();
        std::os::unix::fs::symlink("real", f.out.path().join("link")).unwrap();
        assert!(matches!(
            Reassembler::new(&f.out.path().join("link/dest"), f.config(false)),
            Err(ReassembleError::SymlinkInDestination { path }) if path.ends_with("link")
        ));
        assert_eq!(fs::read_dir(f.out.path().join("real")).unwrap().count(), 0);
    }

    #[test]
    fn an_error_while_the_writer_is_behind_leaves_nothing() {
        // The stream's last file is a nested one of one chunk, "z/y/x": its three operations
        // (create, write, close) are what the lagging writing thread still has to do when the
        // end item fails its check and the state machine aborts (the queue holds two, the
        // thread one). Removing the staging
        // directory at the abort, rather than after that thread ended, let the thread recreate
        // it ("z/y" is created recursively) and left it behind.
        let f = fixture();
        fs::create_dir_all(f.src.path().join("z/y")).unwrap();
        fs::write(f.src.path().join("z/y/x"), b"last").unwrap();
        let mut items = f.items(Compression::None, false);
        match items.last_mut() {
            Some(StreamItem::End(e)) => e.summary.bytes += 1,
            other => panic!("not the end: {other:?}"),
        }
        let mut wire = Vec::new();
        for i in &items {
            frame::encode(i, frame::DEFAULT_MAX_FRAME, &mut wire).unwrap();
        }
        *LAGGING_UNDER.lock().unwrap() = Some(f.out.path().to_owned());
        let res = f.reassembler(false).read_from(&wire[..]);
        *LAGGING_UNDER.lock().unwrap() = None;
        assert!(
            matches!(res, Err(ReassembleError::EndMismatch { .. })),
            "{res:?}"
        );
        f.assert_clean();
    }

    #[test]
    fn drop_without_finish_removes_staging() {
        let f = fixture();
        let mut r = f.reassembler(false);
        let staging = r.staging_dir().unwrap().to_owned();
        let mut items = f.items(Compression::None, false);
        items.pop();
        for i in items {
            r.push(i).unwrap();
        }
        assert!(staging.join("a").is_file());
        drop(r);
        f.assert_clean();
    }

    #[test]
    fn path_traversal() {
        for bad in [
            "../x",
            "/etc/passwd",
            "a//b",
            "a/./b",
            "",
            "a\0b",
            "..\\x",
            "a/b/..",
            "x/",
        ] {
            let f = fixture();
            let mut items = f.items(Compression::None, false);
            chunk_mut(&mut items, 0).path = bad.to_owned();
            assert!(
                matches!(f.run(items, false), Err(ReassembleError::PathTraversal { path }) if path == bad),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn duplicate_seq() {
        let f = fixture();
        let mut items = f.items(Compression::None, false);
        let again = items[2].clone();
        items.insert(3, again);
        assert!(matches!(
            f.run(items, false),
            Err(ReassembleError::Duplicate { seq: 1 })
        ));
    }

    #[test]
    fn duplicate_file() {
        let f = fixture();
        let mut items = f.items(Compression::None, false);
        // Resend "a"'s chunks (seq 0..=2) renumbered after them.
        let a: Vec<Chunk> = (0..3).map(|s| chunk_mut(&mut items, s).clone()).collect();
        let mut rebuilt = vec![items[0].clone()];
        for (n, c) in a.iter().chain(a.iter()).enumerate() {
            let mut c = c.clone();
            c.seq = n as u64;
            rebuilt.push(StreamItem::Chunk(c));
        }
        assert!(matches!(
            f.run(rebuilt, false),
            Err(ReassembleError::Duplicate { seq: 3 })
        ));
    }

    #[test]
    fn gap() {
        let f = fixture();
        let mut items = f.items(Compression::None, false);
        items.remove(2);
        assert!(matches!(
            f.run(items, false),
            Err(ReassembleError::Gap {
                expected: 1,
                got: 2
            })
        ));
    }

    #[test]
    fn offset_mismatch() {
        let f = fixture();
        let mut items = f.items(Compression::None, false);
        chunk_mut(&mut items, 1).offset = 9;
        assert!(matches!(
            f.run(items, false),
            Err(ReassembleError::OffsetMismatch {
                expected: 8,
                got: 9,
                ..
            })
        ));
        let mut items = f.items(Compression::None, false);
        chunk_mut(&mut items, 0).offset = 8;
        assert!(matches!(
            f.run(items, false),
            Err(ReassembleError::OffsetMismatch {
                expected: 0,
                got: 8,
                ..
            })
        ));
    }

    #[test]
    fn unfinished_file() {
        let f = fixture();
        let mut items = f.items(Compression::None, false);
        chunk_mut(&mut items, 1).path = "other".into();
        assert!(matches!(
            f.run(items, false),
            Err(ReassembleError::UnfinishedFile { path }) if path == "a"
        ));
        let mut items = f.items(Compression::None, false);
        let n = items.len();
        // The last chunk of "d/e/f" (seq 4) loses its flag; "empty" follows.
        chunk_mut(&mut items, n as u64 - 4).last_of_file = false;
        assert!(matches!(
            f.run(items, false),
            Err(ReassembleError::UnfinishedFile { path }) if path == "d/e/f"
        ));
        // The stream's last chunk loses its flag: the end finds the file open.
        let mut items = f.items(Compression::None, false);
        let n = items.len();
        items.remove(n - 2); // "empty"
        chunk_mut(&mut items, 4).last_of_file = false;
        assert!(matches!(
            f.run(items, false),
            Err(ReassembleError::UnfinishedFile { .. })
        ));
    }

    #[test]
    fn empty_chunk_that_is_not_last() {
        let f = fixture();
        let mut items = f.items(Compression::None, false);
        let empty = items
            .iter()
            .find_map(|i| match i {
                StreamItem::Chunk(c) if c.len == 0 => Some(c.seq),
                _ => None,
            })
            .unwrap();
        chunk_mut(&mut items, empty).last_of_file = false;
        assert!(matches!(
            f.run(items, false),
            Err(ReassembleError::EmptyChunk { seq }) if seq == empty
        ));
    }

    #[test]
    fn path_conflict() {
        let f = fixture();
        let mut items = f.items(Compression::None, false);
        // "d/e/f" becomes "a/f": "a" is already a file.
        for c in items.iter_mut().filter_map(|i| match i {
            StreamItem::Chunk(c) if c.path == "d/e/f" => Some(c),
            _ => None,
        }) {
            c.path = "a/f".into();
        }
        assert!(matches!(
            f.run(items, false),
            Err(ReassembleError::PathConflict { path }) if path == "a/f"
        ));
        let mut items = f.items(Compression::None, false);
        // "empty" becomes "d": a directory already.
        let seq = items.len() as u64 - 3;
        chunk_mut(&mut items, seq).path = "d".into();
        assert!(matches!(
            f.run(items, false),
            Err(ReassembleError::PathConflict { path }) if path == "d"
        ));
    }

    #[test]
    fn digest_mismatch() {
        for compression in [Compression::None, Compression::Zstd { level: 1 }] {
            let f = fixture();
            let mut items = f.items(compression, false);
            chunk_mut(&mut items, 1).digest.as_mut().unwrap().0[0] ^= 1;
            assert!(matches!(
                f.run(items, false),
                Err(ReassembleError::DigestMismatch { path, offset: 8 }) if path == "a"
            ));
        }
        // Unsealed, a changed payload of the same length is caught by the digest.
        let f = fixture();
        let mut items = f.items(Compression::None, false);
        chunk_mut(&mut items, 0).payload[0] ^= 1;
        assert!(matches!(
            f.run(items, false),
            Err(ReassembleError::DigestMismatch { offset: 0, .. })
        ));
    }

    #[test]
    fn tampered_sealed_payload() {
        let f = fixture();
        let mut items = f.items(Compression::Zstd { level: 1 }, true);
        let p = &mut chunk_mut(&mut items, 1).payload;
        let n = p.len();
        p[n - 1] ^= 1;
        assert!(matches!(
            f.run(items, true),
            Err(ReassembleError::Open(OpenError::Tampered))
        ));
    }

    #[test]
    fn moved_sealed_chunk_fails_to_open() {
        // Same content and digest under another path: only the AAD catches it.
        let f = fixture();
        let mut items = f.items(Compression::None, true);
        let seq = items.len() as u64 - 3; // "empty"
        chunk_mut(&mut items, seq).path = "renamed".into();
        assert!(matches!(
            f.run(items, true),
            Err(ReassembleError::Open(OpenError::Tampered))
        ));
    }

    #[test]
    fn wrong_key() {
        let f = fixture();
        let items = f.items(Compression::None, true);
        let other = Key::generate().unwrap();
        let config = ReassemblerConfig {
            opener: Some(Opener::new(&other)),
            ..f.config(false)
        };
        assert!(matches!(
            f.run_with(items.clone(), config),
            Err(ReassembleError::Open(OpenError::WrongKey { .. }))
        ));
        // Even if the header lies about the key.
        let mut items = items;
        let StreamItem::Header(h) = &mut items[0] else {
            panic!()
        };
        h.sealed_with = Some(other.id());
        let config = ReassemblerConfig {
            opener: Some(Opener::new(&other)),
            ..f.config(false)
        };
        assert!(matches!(
            f.run_with(items, config),
            Err(ReassembleError::Open(OpenError::WrongKey { .. }))
        ));
    }

    #[test]
    fn missing_and_unexpected_header() {
        let f = fixture();
        let mut items = f.items(Compression::None, false);
        items.remove(0);
        assert!(matches!(
            f.run(items, false),
            Err(ReassembleError::MissingHeader)
        ));
        let mut items = f.items(Compression::None, false);
        let end = items.pop().unwrap();
        assert!(matches!(
            f.run(vec![end], false),
            Err(ReassembleError::MissingHeader)
        ));
        let h = items[0].clone();
        items.insert(2, h);
        assert!(matches!(
            f.run(items, false),
            Err(ReassembleError::UnexpectedHeader)
        ));
    }

    #[test]
    fn unsupported_version() {
        let f = fixture();
        let mut items = f.items(Compression::None, false);
        let StreamItem::Header(h) = &mut items[0] else {
            panic!()
        };
        h.version = 3;
        assert!(matches!(
            f.run(items, false),
            Err(ReassembleError::UnsupportedVersion { got: 3 })
        ));
        // Version 1's header has no `digests`: it does not decode as this version's, and is
        // still refused for its version, not as garbage.
        #[derive(serde::Serialize)]
        struct HeaderV1 {
            version: u16,
            compression: Compression,
            sealed_with: Option<migration_crypto::KeyId>,
            chunk_size: u32,
        }
        #[derive(serde::Serialize)]
        enum ItemV1 {
            Header(HeaderV1),
        }
        let mut wire = Vec::new();
        let v1 = ItemV1::Header(HeaderV1 {
            version: 1,
            compression: Compression::Zstd { level: 1 },
            sealed_with: None,
            chunk_size: CS as u32,
        });
        frame::encode(&v1, frame::DEFAULT_MAX_FRAME, &mut wire).unwrap();
        assert!(matches!(
            f.reassembler(false).read_from(&wire[..]),
            Err(ReassembleError::UnsupportedVersion { got: 1 })
        ));
        f.assert_clean();
    }

    #[test]
    fn sealing_expectations() {
        let f = fixture();
        assert!(matches!(
            f.run(f.items(Compression::None, false), true),
            Err(ReassembleError::Unsealed)
        ));
        assert!(matches!(
            f.run(f.items(Compression::None, true), false),
            Err(ReassembleError::UnexpectedlySealed)
        ));
        // The end's seal stripped.
        let mut items = f.items(Compression::None, true);
        end_mut(&mut items).seal = None;
        assert!(matches!(f.run(items, true), Err(ReassembleError::Unsealed)));
        // An unsealed stream whose end claims a seal.
        let mut items = f.items(Compression::None, false);
        end_mut(&mut items).seal = Some(vec![0; 49]);
        assert!(matches!(
            f.run(items, false),
            Err(ReassembleError::UnexpectedlySealed)
        ));
    }

    #[test]
    fn sealed_streams_carry_no_chunk_digests_and_unsealed_ones_do() {
        let f = compressible_fixture();
        for sealed in [false, true] {
            let items = f.items(Compression::Zstd { level: 1 }, sealed);
            let StreamItem::Header(h) = &items[0] else {
                panic!("no header")
            };
            let expected = if sealed {
                ChunkDigests::SealOnly
            } else {
                ChunkDigests::Sha256
            };
            assert_eq!(h.digests, expected);
            assert_eq!(h.version, STREAM_VERSION);
            let chunks: Vec<&Chunk> = items
                .iter()
                .filter_map(|i| match i {
                    StreamItem::Chunk(c) => Some(c),
                    _ => None,
                })
                .collect();
            assert!(chunks.iter().all(|c| c.digest.is_some() != sealed));
            f.run(items, sealed).unwrap();
            fs::remove_dir_all(f.dest()).unwrap();
        }
    }

    #[test]
    fn chunks_that_compress_badly_travel_raw() {
        let f = compressible_fixture();
        for sealed in [false, true] {
            let items = f.items(Compression::Zstd { level: 1 }, sealed);
            let flags: Vec<(&str, bool)> = items
                .iter()
                .filter_map(|i| match i {
                    StreamItem::Chunk(c) => Some((c.path.as_str(), c.compressed)),
                    _ => None,
                })
                .collect();
            assert_eq!(
                flags,
                [
                    ("pages.img", true),
                    ("pages.img", true),
                    ("pages.img", true),
                    ("pages.img", true),
                    ("random.img", false),
                    ("random.img", false),
                    ("zero.img", false),
                ]
            );
            // A raw payload is the plaintext (sealed: plus the record's overhead).
            let overhead = if sealed {
                migration_crypto::SEAL_OVERHEAD
            } else {
                0
            };
            for c in items.iter().filter_map(|i| match i {
                StreamItem::Chunk(c) if !c.compressed => Some(c),
                _ => None,
            }) {
                assert_eq!(c.payload.len(), c.len as usize + overhead);
            }
            f.run(items, sealed).unwrap();
            assert_eq!(read_tree(&f.dest()), read_tree(f.src.path()));
            fs::remove_dir_all(f.dest()).unwrap();
        }
        // Uncompressed streams never mark a chunk compressed, and refuse one that says so.
        let f = fixture();
        let items = f.items(Compression::None, false);
        assert!(
            items
                .iter()
                .all(|i| !matches!(i, StreamItem::Chunk(c) if c.compressed))
        );
        let mut items = items;
        chunk_mut(&mut items, 1).compressed = true;
        assert!(matches!(
            f.run(items, false),
            Err(ReassembleError::UnexpectedCompression { seq: 1 })
        ));
    }

    #[test]
    fn an_unsealed_stream_without_digests_is_refused() {
        let f = fixture();
        // The header alone claiming it, or the chunks following it.
        for strip_chunks in [false, true] {
            let mut items = f.items(Compression::Zstd { level: 1 }, false);
            let StreamItem::Header(h) = &mut items[0] else {
                panic!("no header")
            };
            h.digests = ChunkDigests::SealOnly;
            if strip_chunks {
                for i in &mut items {
                    if let StreamItem::Chunk(c) = i {
                        c.digest = None;
                    }
                }
            }
            assert!(matches!(
                f.run(items, false),
                Err(ReassembleError::DigestsRequired)
            ));
        }
        // Or a chunk dropping its digest in a stream that announces them.
        let mut items = f.items(Compression::None, false);
        chunk_mut(&mut items, 2).digest = None;
        assert!(matches!(
            f.run(items, false),
            Err(ReassembleError::MissingDigest { seq: 2 })
        ));
    }

    #[test]
    fn chunk_digests_must_be_what_the_sealed_header_says() {
        let f = compressible_fixture();
        let z = Compression::Zstd { level: 1 };
        // The flag flipped to "digests": the first chunk has none.
        let mut items = f.items(z, true);
        let StreamItem::Header(h) = &mut items[0] else {
            panic!("no header")
        };
        h.digests = ChunkDigests::Sha256;
        assert!(matches!(
            f.run(items, true),
            Err(ReassembleError::MissingDigest { seq: 0 })
        ));
        // A digest slipped into a stream without: refused before the chunk is opened.
        let mut items = f.items(z, true);
        chunk_mut(&mut items, 3).digest = Some(sha256(b"anything"));
        assert!(matches!(
            f.run(items, true),
            Err(ReassembleError::UnexpectedDigest { seq: 3 })
        ));
        // A sealed stream may keep its digests: they are checked too.
        let items = f.items_of(f.chunker(z, true).with_digests());
        assert!(matches!(&items[0], StreamItem::Header(h) if h.digests == ChunkDigests::Sha256));
        f.run(items.clone(), true).unwrap();
        assert_eq!(read_tree(&f.dest()), read_tree(f.src.path()));
        fs::remove_dir_all(f.dest()).unwrap();
        let mut items = items;
        chunk_mut(&mut items, 1).digest = Some(sha256(b"other"));
        // The digest is part of the descriptor, so the record no longer opens.
        assert!(matches!(
            f.run(items, true),
            Err(ReassembleError::Open(OpenError::Tampered))
        ));
    }

    /// The sealed, digest-free wire of `f`, and where its header frame's `digests` byte is.
    fn sealed_wire(f: &Fixture) -> (Vec<u8>, usize) {
        let mut wire = Vec::new();
        f.chunker(Compression::Zstd { level: 1 }, true)
            .write_to(&mut wire)
            .unwrap();
        let header_len = u32::from_be_bytes(wire[..4].try_into().unwrap()) as usize;
        // `digests` is the header's last field: a one-byte variant index.
        let at = frame::LEN_PREFIX + header_len - 1;
        assert_eq!(wire[at], 1, "SealOnly");
        (wire, at)
    }

    #[test]
    fn a_digests_flag_flipped_in_transit_is_refused() {
        let f = compressible_fixture();
        let (wire, at) = sealed_wire(&f);
        let mut flipped = wire.clone();
        flipped[at] = 0;
        assert!(matches!(
            f.reassembler(true).read_from(&flipped[..]),
            Err(ReassembleError::MissingDigest { seq: 0 })
        ));
        f.assert_clean();
        for byte in [2, 0x80, 0xff] {
            let mut flipped = wire.clone();
            flipped[at] = byte;
            assert!(
                matches!(
                    f.reassembler(true).read_from(&flipped[..]),
                    Err(ReassembleError::Frame(_))
                ),
                "{byte}"
            );
            f.assert_clean();
        }
        f.reassembler(true).read_from(&wire[..]).unwrap();
    }

    #[test]
    fn a_truncated_sealed_stream_without_digests_is_refused_at_every_length() {
        let f = compressible_fixture();
        let (wire, _) = sealed_wire(&f);
        for cut in 0..wire.len() {
            let res = f.reassembler(true).read_from(&wire[..cut]);
            assert!(
                matches!(res, Err(ReassembleError::Truncated)),
                "{cut}: {res:?}"
            );
            f.assert_clean();
        }
    }

    /// The format's bytes, so that a change to them is deliberate (and a new
    /// [`STREAM_VERSION`]).
    #[test]
    fn golden_bytes() {
        let header = StreamItem::Header(StreamHeader {
            version: STREAM_VERSION,
            compression: Compression::Zstd { level: 1 },
            sealed_with: Some(migration_crypto::KeyId([1, 2, 3, 4, 5, 6, 7, 8])),
            chunk_size: 1 << 20,
            digests: ChunkDigests::SealOnly,
        });
        let mut framed = Vec::new();
        frame::encode(&header, frame::DEFAULT_MAX_FRAME, &mut framed).unwrap();
        assert_eq!(
            framed,
            [
                0, 0, 0, 17, // length
                0, 2, // Header, version 2
                1, 2, // Zstd, level 1 (zigzag)
                1, 1, 2, 3, 4, 5, 6, 7, 8, // sealed with this key id
                0x80, 0x80, 0x40, // chunk size 2^20 (varint)
                1,    // SealOnly
            ]
        );
        let chunk = Chunk {
            seq: 5,
            path: "d/f".into(),
            offset: 300,
            len: 4,
            mode: 0o640,
            digest: None,
            last_of_file: true,
            compressed: false,
            payload: b"abcd".to_vec(),
        };
        let mut framed = Vec::new();
        frame::encode(&StreamItem::Chunk(chunk.clone()), 1024, &mut framed).unwrap();
        assert_eq!(
            framed,
            [
                0, 0, 0, 19, // length
                1, 5, // Chunk, seq 5
                3, b'd', b'/', b'f', // path
                0xac, 0x02, // offset 300
                4,    // len
                0xa0, 0x03, // mode 0o640
                0,    // no digest
                1, 0, // last of file, not compressed
                4, b'a', b'b', b'c', b'd', // payload
            ]
        );
        let mut d = Vec::new();
        chunk.descriptor(&mut d);
        let mut expected = b"migration-wire chunk v2\0".to_vec();
        expected.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 5]); // seq
        expected.extend_from_slice(&[0, 0, 0, 0, 0, 0, 1, 44]); // offset
        expected.extend_from_slice(&[0, 0, 0, 4, 0, 0, 1, 0xa0]); // len, mode
        expected.extend_from_slice(&[1, 0]); // flags: last of file; no digest
        expected.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 3]);
        expected.extend_from_slice(b"d/f");
        assert_eq!(d, expected);
        let digested = Chunk {
            digest: Some(migration_crypto::Digest([9; 32])),
            compressed: true,
            last_of_file: false,
            ..chunk
        };
        digested.descriptor(&mut d);
        assert_eq!(d[48], 2, "flags: compressed");
        assert_eq!(d[49], 1, "a digest follows");
        assert_eq!(d[50..82], [9; 32]);
    }

    #[test]
    fn end_mismatch() {
        let f = fixture();
        for tweak in 0..4 {
            let mut items = f.items(Compression::None, false);
            let s = &mut end_mut(&mut items).summary;
            match tweak {
                0 => s.chunks += 1,
                1 => s.files -= 1,
                2 => s.bytes += 1,
                _ => s.digest.0[31] ^= 1,
            }
            assert!(
                matches!(
                    f.run(items, false),
                    Err(ReassembleError::EndMismatch { .. })
                ),
                "{tweak}"
            );
        }
        // An unsealed mode change is caught by the end digest over the descriptors.
        let mut items = f.items(Compression::None, false);
        chunk_mut(&mut items, 2).mode = 0o777;
        assert!(matches!(
            f.run(items, false),
            Err(ReassembleError::EndMismatch { .. })
        ));
    }

    #[test]
    fn truncated_sealed_stream_with_forged_end_fails() {
        // Drop the last file and recompute a plausible end: the sealed end record catches it.
        let f = fixture();
        let mut items = f.items(Compression::None, true);
        let end = items.pop().unwrap();
        let StreamItem::End(mut end) = end else {
            panic!()
        };
        let last = items.pop().unwrap();
        let StreamItem::Chunk(last) = last else {
            panic!()
        };
        let mut h = Sha256::new();
        let mut d = Vec::new();
        for i in &items {
            if let StreamItem::Chunk(c) = i {
                c.descriptor(&mut d);
                h.update(&d);
            }
        }
        end.summary.chunks -= 1;
        end.summary.files -= 1;
        end.summary.bytes -= u64::from(last.len);
        end.summary.digest = h.finish();
        items.push(StreamItem::End(end));
        assert!(matches!(
            f.run(items, true),
            Err(ReassembleError::Open(OpenError::Tampered))
        ));
    }

    #[test]
    fn truncated() {
        let f = fixture();
        let mut items = f.items(Compression::None, false);
        items.pop();
        assert!(matches!(
            f.run(items, false),
            Err(ReassembleError::Truncated)
        ));
        // read_from: input cut at every frame boundary and inside frames.
        let chunker = Chunker::new(
            f.src.path(),
            ChunkerConfig {
                chunk_size: CS,
                compression: Compression::None,
                sealer: None,
            },
        )
        .unwrap();
        let mut wire = Vec::new();
        chunker.write_to(&mut wire).unwrap();
        for cut in [0, 3, 10, wire.len() / 2, wire.len() - 1] {
            let r = f.reassembler(false);
            assert!(
                matches!(r.read_from(&wire[..cut]), Err(ReassembleError::Truncated)),
                "{cut}"
            );
            f.assert_clean();
        }
    }

    #[test]
    fn decompress_error() {
        let f = fixture();
        let mut items = f.items(Compression::Zstd { level: 1 }, false);
        let c = chunk_mut(&mut items, 0);
        c.payload = b"not zstd".to_vec();
        c.compressed = true;
        assert!(matches!(
            f.run(items, false),
            Err(ReassembleError::Decompress {
                seq: 0,
                source: CompressError::Corrupt(_)
            })
        ));
    }

    #[test]
    fn too_large_and_length_mismatch() {
        let f = fixture();
        let mut items = f.items(Compression::None, false);
        chunk_mut(&mut items, 0).len = CS as u32 + 1;
        assert!(matches!(
            f.run(items, false),
            Err(ReassembleError::TooLarge {
                seq: 0,
                len: 9,
                max: CS
            })
        ));
        for compression in [Compression::None, Compression::Zstd { level: 1 }] {
            // Announced shorter than the payload decompresses to.
            let mut items = f.items(compression, false);
            chunk_mut(&mut items, 0).len = 7;
            assert!(matches!(
                f.run(items, false),
                Err(ReassembleError::LengthMismatch {
                    seq: 0,
                    expected: 7
                })
            ));
            // Announced longer.
            let mut items = f.items(compression, false);
            chunk_mut(&mut items, 2).len = 8;
            assert!(matches!(
                f.run(items, false),
                Err(ReassembleError::LengthMismatch {
                    seq: 2,
                    expected: 8
                })
            ));
        }
    }

    #[test]
    fn total_too_large() {
        let f = fixture();
        let config = ReassemblerConfig {
            max_total_bytes: Some(37),
            ..f.config(false)
        };
        assert!(matches!(
            f.run_with(f.items(Compression::None, false), config),
            Err(ReassembleError::TotalTooLarge { max: 37 })
        ));
        let config = ReassemblerConfig {
            max_total_bytes: Some(38),
            ..f.config(false)
        };
        f.run_with(f.items(Compression::None, false), config)
            .unwrap();
    }

    #[test]
    fn after_end_and_after_failure() {
        let f = fixture();
        let mut items = f.items(Compression::None, false);
        let extra = items[1].clone();
        items.push(extra.clone());
        assert!(matches!(
            f.run(items, false),
            Err(ReassembleError::AfterEnd)
        ));

        let mut r = f.reassembler(false);
        assert!(matches!(
            r.push(extra.clone()),
            Err(ReassembleError::MissingHeader)
        ));
        assert!(r.staging_dir().is_none());
        assert!(matches!(r.push(extra), Err(ReassembleError::Failed)));
        assert!(matches!(r.finish(), Err(ReassembleError::Failed)));
        f.assert_clean();
    }

    #[test]
    fn oversized_frame() {
        let f = fixture();
        let mut wire = Vec::new();
        wire.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            f.reassembler(false).read_from(&wire[..]),
            Err(ReassembleError::Frame(FrameError::TooLarge { .. }))
        ));
        f.assert_clean();
        let mut wire = Vec::new();
        frame::encode_raw(b"\xff\xff garbage", 1024, &mut wire).unwrap();
        assert!(matches!(
            f.reassembler(false).read_from(&wire[..]),
            Err(ReassembleError::Frame(FrameError::Decode(_)))
        ));
        f.assert_clean();
    }

    #[test]
    fn io_error_from_reader() {
        struct Failing;
        impl Read for Failing {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::other("boom"))
            }
        }
        let f = fixture();
        assert!(matches!(
            f.reassembler(false).read_from(Failing),
            Err(ReassembleError::Read(_))
        ));
        f.assert_clean();
    }

    fn encode_items(items: &[StreamItem]) -> Vec<u8> {
        let mut wire = Vec::new();
        for i in items {
            frame::encode(i, frame::DEFAULT_MAX_FRAME, &mut wire).unwrap();
        }
        wire
    }

    #[test]
    fn the_writing_thread_reports_what_it_refuses() {
        // Found only when the file is created: on the writing thread of `read_from`.
        let f = fixture();
        let mut items = f.items(Compression::None, false);
        for c in items.iter_mut().filter_map(|i| match i {
            StreamItem::Chunk(c) if c.path == "d/e/f" => Some(c),
            _ => None,
        }) {
            c.path = "a/f".into();
        }
        let wire = encode_items(&items);
        assert!(matches!(
            f.reassembler(false).read_from(&wire[..]),
            Err(ReassembleError::PathConflict { path }) if path == "a/f"
        ));
        f.assert_clean();
        // A later chunk that fails to verify does not hide it: errors come in stream order.
        let n = items.len();
        chunk_mut(&mut items, n as u64 - 3)
            .digest
            .as_mut()
            .unwrap()
            .0[0] ^= 1;
        let wire = encode_items(&items);
        assert!(matches!(
            f.reassembler(false).read_from(&wire[..]),
            Err(ReassembleError::PathConflict { .. })
        ));
        f.assert_clean();
        // The same file twice.
        let mut items = f.items(Compression::None, false);
        let a: Vec<Chunk> = (0..3).map(|s| chunk_mut(&mut items, s).clone()).collect();
        let mut rebuilt = vec![items[0].clone()];
        for (n, c) in a.iter().chain(a.iter()).enumerate() {
            let mut c = c.clone();
            c.seq = n as u64;
            rebuilt.push(StreamItem::Chunk(c));
        }
        let wire = encode_items(&rebuilt);
        assert!(matches!(
            f.reassembler(false).read_from(&wire[..]),
            Err(ReassembleError::Duplicate { seq: 3 })
        ));
        f.assert_clean();
    }

    #[test]
    fn read_until_end_counts_chunks_and_leaves_the_rest_unread() {
        let f = compressible_fixture();
        let items = f.items(Compression::Zstd { level: 1 }, true);
        let mut wire = encode_items(&items);
        wire.extend_from_slice(b"after");
        let mut r = f.reassembler(true);
        let mut payloads = Vec::new();
        let mut reader = &wire[..];
        r.read_until_end(&mut reader, |p| payloads.push(p)).unwrap();
        assert_eq!(reader, b"after");
        let expected: Vec<usize> = items
            .iter()
            .filter_map(|i| match i {
                StreamItem::Chunk(c) => Some(c.payload.len()),
                _ => None,
            })
            .collect();
        assert_eq!(payloads, expected);
        r.finish().unwrap();
        assert_eq!(read_tree(&f.dest()), read_tree(f.src.path()));
    }

    #[test]
    fn read_until_end_goes_on_with_a_file_pushed_half_way() {
        let f = compressible_fixture();
        for sealed in [false, true] {
            let items = f.items(Compression::Zstd { level: 1 }, sealed);
            let mut r = f.reassembler(sealed);
            // The header and the first two of "pages.img"'s four chunks.
            let (pushed, rest) = items.split_at(3);
            for i in pushed {
                r.push(i.clone()).unwrap();
            }
            let wire = encode_items(rest);
            r.read_until_end(&wire[..], |_| {}).unwrap();
            r.finish().unwrap();
            assert_eq!(read_tree(&f.dest()), read_tree(f.src.path()));
            fs::remove_dir_all(f.dest()).unwrap();
        }
    }

    fn wire(f: &Fixture, compression: Compression, sealed: bool) -> Vec<u8> {
        let mut wire = Vec::new();
        for i in f.items(compression, sealed) {
            frame::encode(&i, frame::DEFAULT_MAX_FRAME, &mut wire).unwrap();
        }
        wire
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

        #[test]
        fn round_trip_random_trees(
            files in proptest::collection::vec((0usize..4, 0usize..4, any::<u8>()), 0..7),
            chunk_size in 1usize..40,
            compression in 0usize..3,
            sealed in any::<bool>(),
        ) {
            let dirs = ["", "d1", "d1/d2", "e"];
            let src = tempfile::tempdir().unwrap();
            for (n, (dir, size_kind, byte)) in files.iter().enumerate() {
                let size = match size_kind {
                    0 => 0,
                    1 => chunk_size,
                    2 => 3 * chunk_size,
                    _ => (*byte as usize * 7) % (4 * chunk_size) + 1,
                };
                let d = src.path().join(dirs[*dir]);
                fs::create_dir_all(&d).unwrap();
                let data: Vec<u8> = (0..size).map(|i| (i as u8).wrapping_mul(*byte)).collect();
                fs::write(d.join(format!("f{n}.img")), data).unwrap();
            }
            let compression = [
                Compression::None,
                Compression::Zstd { level: 1 },
                Compression::Gzip { level: 1 },
            ][compression];
            let key = Key::generate().unwrap();
            let chunker = Chunker::new(src.path(), ChunkerConfig {
                chunk_size,
                compression,
                sealer: sealed.then(|| Sealer::new(&key).unwrap()),
            }).unwrap();
            let mut wire = Vec::new();
            let sent = chunker.write_to(&mut wire).unwrap();
            let out = tempfile::tempdir().unwrap();
            let dest = out.path().join("dest");
            let r = Reassembler::new(&dest, ReassemblerConfig {
                opener: sealed.then(|| Opener::new(&key)),
                max_chunk: chunk_size,
                max_total_bytes: None,
            }).unwrap();
            let got = r.read_from(&wire[..]).unwrap();
            prop_assert_eq!(got, sent);
            prop_assert_eq!(sent.files, files.len() as u64);
            prop_assert_eq!(read_tree(&dest), read_tree(src.path()));
        }

        #[test]
        fn item_codec_round_trips(seq in any::<u64>(), path in "[a-z]{1,8}(/[a-z]{1,8}){0,3}",
                                  offset in any::<u64>(), len in any::<u32>(), mode in 0u32..0o1000,
                                  digest in proptest::option::of(any::<[u8; 32]>()),
                                  last in any::<bool>(), compressed in any::<bool>(),
                                  payload in proptest::collection::vec(any::<u8>(), 0..300),
                                  seal in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..64))) {
            let items = vec![
                StreamItem::Header(StreamHeader {
                    version: STREAM_VERSION,
                    compression: Compression::Zstd { level: mode as i32 - 200 },
                    sealed_with: last.then_some(migration_crypto::KeyId([mode as u8; 8])),
                    chunk_size: len,
                    digests: if compressed { ChunkDigests::SealOnly } else { ChunkDigests::Sha256 },
                }),
                StreamItem::Chunk(Chunk { seq, path, offset, len, mode,
                    digest: digest.map(migration_crypto::Digest), last_of_file: last, compressed,
                    payload }),
                StreamItem::End(StreamEnd {
                    summary: StreamSummary { chunks: seq, files: offset, bytes: u64::from(len),
                        digest: migration_crypto::Digest(digest.unwrap_or([7; 32])) },
                    seal,
                }),
            ];
            for item in items {
                let mut buf = Vec::new();
                frame::encode(&item, frame::DEFAULT_MAX_FRAME, &mut buf).unwrap();
                let body = &buf[frame::LEN_PREFIX..];
                let borrowed: StreamItemRef<'_> = frame::decode_body_borrowed(body).unwrap();
                match (&borrowed, &item) {
                    (StreamItemRef::Header(a), StreamItem::Header(b)) => prop_assert_eq!(a, b),
                    (StreamItemRef::Chunk(a), StreamItem::Chunk(b)) => {
                        prop_assert_eq!(*a, b.borrowed());
                    }
                    (StreamItemRef::End(a), StreamItem::End(b)) => prop_assert_eq!(a, b),
                    _ => prop_assert!(false, "variant mismatch: {:?}", borrowed),
                }
                let back: StreamItem = frame::decode_body(body).unwrap();
                prop_assert_eq!(back, item);
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic_and_leave_nothing(
            bytes in proptest::collection::vec(any::<u8>(), 0..512),
            with_header in any::<bool>(),
        ) {
            let f = fixture();
            let mut input = Vec::new();
            if with_header {
                let header = f.items(Compression::Zstd { level: 1 }, false).swap_remove(0);
                frame::encode(&header, 1024, &mut input).unwrap();
            }
            input.extend_from_slice(&bytes);
            let res = f.reassembler(false).read_from(&input[..]);
            prop_assert!(res.is_err());
            f.assert_clean();
        }

        #[test]
        fn any_flipped_bit_in_a_sealed_stream_is_rejected(pos in any::<prop::sample::Index>(), bit in 0u8..8) {
            // Sealed, hence without chunk digests; compressed and raw payloads.
            let f = compressible_fixture();
            let mut w = wire(&f, Compression::Zstd { level: 1 }, true);
            let i = pos.index(w.len());
            w[i] ^= 1 << bit;
            let res = f.reassembler(true).read_from(&w[..]);
            prop_assert!(res.is_err(), "flip at {} accepted", i);
            f.assert_clean();
        }
    }
}
