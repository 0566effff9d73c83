//! Bytes on the move: framing, compression, and the chunker that streams a CRIU image set.
//!
//! ```text
//!  directory ──Chunker──► Chunk{path, offset, seq, digest, payload} ──frame──► transport
//!                          (payload = seal(compress(bytes)))
//!  transport ──FrameDecoder──► Chunk ──Reassembler──► directory (atomically, or nothing)
//! ```

pub mod frame;

pub use frame::{FrameDecoder, FrameError};
