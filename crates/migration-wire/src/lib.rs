//! Bytes on the move: framing, compression, and the chunker that streams a CRIU image set.
//!
//! ```text
//!  sender                                                   receiver
//!  ──────                                                   ────────
//!  root/ ──Chunker──► StreamItem ──frame::encode──► bytes ──read_frame──► frame body
//!          (walk sorted, read chunk,                                        │
//!           sha256 if unsealed, compress                     Reassembler::push_frame
//!           if it pays, seal in place)                       (open in place, decompress,
//!                                                             sha256 if unsealed)
//!   Header{.., digests}, Chunk{seq, path, offset, len,                     ▼
//!   digest?, compressed, payload}…, End        dest.partial-* ──verified End──► dest
//!                                                 (removed on any error)
//! ```
//!
//! * [`frame`]: length-delimited frames with a bound checked before allocating (the leaf crate
//!   `wire-frame`, re-exported).
//! * [`compress`]: per-stream [`Compression`] with reusable contexts ([`Codec`]) and a
//!   decompression bound enforced while decompressing.
//! * [`chunk`]: the stream items and the [`Chunker`] that produces them from a directory; the
//!   format, its version and what proves each chunk ([`ChunkDigests`]).
//! * [`reassemble`]: the [`Reassembler`] that verifies them and rebuilds the directory
//!   atomically.
//!
//! `Chunker::write_to` and `Reassembler::read_from` run the whole pipeline over any
//! `Write`/`Read` pair; `write_to` runs the sender's stages on threads of its own (reading,
//! compressing and sealing, writing), with the same output as framing each `next_item`.
//! `Chunker::write_frames` does the same into a [`FrameSink`], which may keep each payload's
//! buffer instead of copying it. `next_item` and `push` give a caller the items one at a time.

pub mod chunk;
pub mod compress;
pub mod reassemble;

/// Length-delimited framing: the leaf crate `wire-frame`, re-exported under its old path.
pub use wire_frame as frame;

pub use chunk::{
    Chunk, ChunkDigests, ChunkError, Chunker, ChunkerConfig, DEFAULT_CHUNK_SIZE, FrameSink,
    MAX_CHUNK_SIZE, STREAM_VERSION, StreamEnd, StreamHeader, StreamItem, StreamSummary, WriteSink,
};
pub use compress::{Codec, CompressError, Compression, ParseCompressionError};
pub use frame::{FrameDecoder, FrameError, ReadFrameError};
pub use reassemble::{ReassembleError, Reassembler, ReassemblerConfig};
