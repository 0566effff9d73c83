//! Bytes on the move: framing, compression, and the chunker that streams a CRIU image set.
//!
//! ```text
//!  sender                                                   receiver
//!  ──────                                                   ────────
//!  root/ ──Chunker──► StreamItem ──frame::encode──► bytes ──read_frame──► StreamItem
//!          (walk sorted, read chunk,                                        │
//!           sha256, compress, seal)                              Reassembler::push
//!                                                                           │
//!   Header, Chunk{seq, path, offset, len, digest, payload}…, End           ▼
//!                                                 dest.partial-* ──verified End──► dest
//!                                                 (removed on any error)
//! ```
//!
//! * [`frame`]: length-delimited frames with a bound checked before allocating (the leaf crate
//!   `wire-frame`, re-exported).
//! * [`compress`]: per-stream [`Compression`] with reusable contexts ([`Codec`]) and a
//!   decompression bound enforced while decompressing.
//! * [`chunk`]: the stream items and the [`Chunker`] that produces them from a directory.
//! * [`reassemble`]: the [`Reassembler`] that verifies them and rebuilds the directory
//!   atomically.
//!
//! `Chunker::write_to` and `Reassembler::read_from` run the whole pipeline over any
//! `Write`/`Read` pair; `write_to` runs the sender's stages on threads of its own (reading,
//! compressing and sealing, writing), with the same output as framing each `next_item`.
//! `next_item` and `push` give a caller the items one at a time.

pub mod chunk;
pub mod compress;
pub mod reassemble;

/// Length-delimited framing: the leaf crate `wire-frame`, re-exported under its old path.
pub use wire_frame as frame;

pub use chunk::{
    Chunk, ChunkError, Chunker, ChunkerConfig, DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE, STREAM_VERSION,
    StreamEnd, StreamHeader, StreamItem, StreamSummary,
};
pub use compress::{Codec, CompressError, Compression, ParseCompressionError};
pub use frame::{FrameDecoder, FrameError, ReadFrameError};
pub use reassemble::{ReassembleError, Reassembler, ReassemblerConfig};
