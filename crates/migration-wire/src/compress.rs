//! Per-stream compression: none, zstd or gzip.
//!
//! ```text
//!  plaintext ──Codec::compress(c)──► compressed ──Codec::decompress(c, max_output)──► plaintext
//!                                                     (stops at max_output bytes: bombs fail early)
//! ```
//!
//! A [`Codec`] keeps the zstd compression and decompression contexts alive between calls, so a
//! pipeline that compresses many 1 MiB chunks allocates them once. Gzip goes through `flate2`'s
//! encoder and decoder, built per call (gzip is the slow, interoperable choice anyway).
//!
//! Decompression enforces `max_output` while it runs: output is written into a buffer that never
//! grows past the bound, and one extra byte of output is enough to fail with
//! [`CompressError::OutputTooLarge`].

use std::fmt;
use std::io::{self, Read, Write};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use zstd::zstd_safe::{
    self, CCtx, CParameter, DCtx, DParameter, InBuffer, OutBuffer, ResetDirective,
};

/// Default zstd level of `"zstd"` without a level: 1, the fastest, because migration downtime
/// matters more than bytes on a LAN.
pub const DEFAULT_ZSTD_LEVEL: i32 = 1;
/// Default gzip level of `"gzip"` without a level (gzip's own default).
pub const DEFAULT_GZIP_LEVEL: u32 = 6;
/// Highest gzip level.
pub const MAX_GZIP_LEVEL: u32 = 9;

/// Largest zstd window the decoder accepts, as a power of two (16 MiB). Our encoder never needs
/// more for chunks of up to 8 MiB; a hostile frame asking for more fails instead of making the
/// decoder allocate a huge window.
const ZSTD_WINDOW_LOG_MAX: u32 = 24;

/// First output reservation when the decompressed size is unknown.
const INITIAL_OUTPUT: usize = 64 * 1024;

/// Compression algorithm of a stream, chosen once per stream.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Compression {
    /// Bytes are carried as they are.
    None,
    /// Zstandard at the given level (negative levels are the fast modes).
    Zstd {
        /// Compression level; only used when compressing.
        level: i32,
    },
    /// Gzip (RFC 1952, one member) at the given level, 0 to 9.
    Gzip {
        /// Compression level; only used when compressing.
        level: u32,
    },
}

impl Compression {
    /// Upper bound of the compressed size of `len` input bytes, for buffer reservations.
    pub fn max_compressed_len(self, len: usize) -> usize {
        match self {
            Compression::None => len,
            Compression::Zstd { .. } => zstd_safe::compress_bound(len),
            // Stored deflate blocks: 5 bytes per 16 KiB block at worst, plus the gzip header
            // and trailer (18 bytes), with margin.
            Compression::Gzip { .. } => len + len / 1024 + 64,
        }
    }

    /// Fails with [`CompressError::InvalidLevel`] when the level is outside the algorithm's range.
    pub(crate) fn check_level(self) -> Result<(), CompressError> {
        match self {
            Compression::None => Ok(()),
            Compression::Zstd { level } => {
                if zstd::compression_level_range().contains(&level) {
                    Ok(())
                } else {
                    Err(CompressError::InvalidLevel(self))
                }
            }
            Compression::Gzip { level } => {
                if level <= MAX_GZIP_LEVEL {
                    Ok(())
                } else {
                    Err(CompressError::InvalidLevel(self))
                }
            }
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Compression::None => f.write_str("none"),
            Compression::Zstd { level } => write!(f, "zstd:{level}"),
            Compression::Gzip { level } => write!(f, "gzip:{level}"),
        }
    }
}

/// A compression name that [`Compression::from_str`] does not accept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseCompressionError {
    /// The algorithm is not `none`, `zstd` or `gzip`.
    #[error("unknown compression {0:?}: expected none, zstd[:LEVEL] or gzip[:LEVEL]")]
    UnknownAlgorithm(String),
    /// The level is not an integer.
    #[error("compression level {0:?} is not an integer")]
    BadLevel(String),
    /// The level is an integer outside the algorithm's range.
    #[error("compression level out of range: {0}")]
    LevelOutOfRange(Compression),
    /// `none` was given a level.
    #[error("compression none takes no level")]
    LevelForNone,
}

impl FromStr for Compression {
    type Err = ParseCompressionError;

    /// Parses `none`, `zstd`, `zstd:LEVEL`, `gzip` or `gzip:LEVEL` (ASCII case-insensitive).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, level) = match s.split_once(':') {
            Some((name, level)) => (name, Some(level)),
            None => (s, None),
        };
        let c = match (name.to_ascii_lowercase().as_str(), level) {
            ("none", None) => Compression::None,
            ("none", Some(_)) => return Err(ParseCompressionError::LevelForNone),
            ("zstd", None) => Compression::Zstd {
                level: DEFAULT_ZSTD_LEVEL,
            },
            ("zstd", Some(l)) => Compression::Zstd {
                level: l
                    .parse()
                    .map_err(|_| ParseCompressionError::BadLevel(l.to_owned()))?,
            },
            ("gzip", None) => Compression::Gzip {
                level: DEFAULT_GZIP_LEVEL,
            },
            ("gzip", Some(l)) => Compression::Gzip {
                level: l
                    .parse()
                    .map_err(|_| ParseCompressionError::BadLevel(l.to_owned()))?,
            },
            _ => return Err(ParseCompressionError::UnknownAlgorithm(s.to_owned())),
        };
        c.check_level()
            .map_err(|_| ParseCompressionError::LevelOutOfRange(c))?;
        Ok(c)
    }
}

/// Compression or decompression failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CompressError {
    /// Decompressing would produce more than the allowed number of bytes.
    #[error("decompressed data exceeds the limit of {max} bytes")]
    OutputTooLarge {
        /// The limit that was reached.
        max: usize,
    },
    /// The compressed input is malformed, truncated or followed by garbage.
    #[error("corrupt compressed data: {0}")]
    Corrupt(#[source] io::Error),
    /// The compression level is outside the algorithm's range.
    #[error("invalid compression level: {0}")]
    InvalidLevel(Compression),
    /// The compressor itself failed (out of memory in the C library, for instance).
    #[error("compression failed: {0}")]
    Compress(#[source] io::Error),
}

fn zstd_error(code: usize) -> io::Error {
    io::Error::other(zstd_safe::get_error_name(code))
}

fn corrupt(msg: &'static str) -> CompressError {
    CompressError::Corrupt(io::Error::new(io::ErrorKind::InvalidData, msg))
}

/// Reusable compression contexts. One per thread; cheap to create, contexts are allocated on
/// first use.
#[derive(Default)]
pub struct Codec {
    cctx: Option<(CCtx<'static>, i32)>,
    dctx: Option<DCtx<'static>>,
}

impl fmt::Debug for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Codec")
            .field("zstd_level", &self.cctx.as_ref().map(|(_, l)| *l))
            .field("zstd_decoder", &self.dctx.is_some())
            .finish()
    }
}

impl Codec {
    /// A codec with no context allocated yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends the compression of `input` under `c` to `out`.
    ///
    /// On error `out` is left as it was.
    pub fn compress(
        &mut self,
        c: Compression,
        input: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), CompressError> {
        c.check_level()?;
        let start = out.len();
        let res = match c {
            Compression::None => {
                out.extend_from_slice(input);
                Ok(())
            }
            Compression::Zstd { level } => self.zstd_compress(level, input, out),
            Compression::Gzip { level } => gzip_compress(level, input, out),
        };
        if res.is_err() {
            out.truncate(start);
        }
        res
    }

    /// Appends the decompression of `input` under `c` to `out`, failing with
    /// [`CompressError::OutputTooLarge`] as soon as more than `max_output` bytes would be
    /// produced. `out` never grows by more than `max_output` bytes (plus whatever capacity it
    /// already had). On error `out` is left at its original length.
    pub fn decompress(
        &mut self,
        c: Compression,
        input: &[u8],
        max_output: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), CompressError> {
        let start = out.len();
        let res = match c {
            Compression::None => {
                if input.len() > max_output {
                    Err(CompressError::OutputTooLarge { max: max_output })
                } else {
                    out.extend_from_slice(input);
                    Ok(())
                }
            }
            Compression::Zstd { .. } => self.zstd_decompress(input, max_output, out),
            Compression::Gzip { .. } => gzip_decompress(input, max_output, out),
        };
        if res.is_err() {
            out.truncate(start);
        }
        res
    }

    fn zstd_compress(
        &mut self,
        level: i32,
        input: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), CompressError> {
        let (cctx, current) = self.cctx.get_or_insert_with(|| (CCtx::create(), i32::MIN));
        cctx.reset(ResetDirective::SessionOnly)
            .map_err(|c| CompressError::Compress(zstd_error(c)))?;
        if *current != level {
            cctx.set_parameter(CParameter::CompressionLevel(level))
                .map_err(|c| CompressError::Compress(zstd_error(c)))?;
            *current = level;
        }
        // With the whole input and a compress_bound output, one call with e_end finishes the
        // frame (and records the content size in the frame header).
        out.reserve(zstd_safe::compress_bound(input.len()));
        let mut inb = InBuffer::around(input);
        loop {
            if out.len() == out.capacity() {
                out.reserve(INITIAL_OUTPUT);
            }
            let pos = out.len();
            let mut outb = OutBuffer::around_pos(out, pos);
            let remaining = cctx
                .compress_stream2(
                    &mut outb,
                    &mut inb,
                    zstd_safe::zstd_sys::ZSTD_EndDirective::ZSTD_e_end,
                )
                .map_err(|c| CompressError::Compress(zstd_error(c)))?;
            if remaining == 0 {
                return Ok(());
            }
        }
    }

    fn zstd_decompress(
        &mut self,
        input: &[u8],
        max: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), CompressError> {
        if self.dctx.is_none() {
            let mut d = DCtx::create();
            d.set_parameter(DParameter::WindowLogMax(ZSTD_WINDOW_LOG_MAX))
                .map_err(|c| CompressError::Compress(zstd_error(c)))?;
            self.dctx = Some(d);
        }
        let Some(dctx) = self.dctx.as_mut() else {
            return Err(CompressError::Compress(io::Error::other(
                "zstd decoder missing",
            )));
        };
        dctx.reset(ResetDirective::SessionOnly)
            .map_err(|c| CompressError::Compress(zstd_error(c)))?;
        let start = out.len();
        // A frame that announces more than the bound fails before any work.
        let first = match zstd_safe::get_frame_content_size(input) {
            Ok(Some(n)) if n > max as u64 => return Err(CompressError::OutputTooLarge { max }),
            Ok(Some(n)) => n as usize,
            _ => INITIAL_OUTPUT.min(max),
        };
        reserve_within(out, start, max, first);
        let mut inb = InBuffer::around(input);
        loop {
            let produced = out.len() - start;
            if out.len() >= out.capacity() {
                if produced >= max {
                    // At the bound: one more byte of output means the data is too large.
                    let mut probe = [0u8; 1];
                    let mut pb = OutBuffer::around(&mut probe[..]);
                    let in_before = inb.pos();
                    let hint = dctx
                        .decompress_stream(&mut pb, &mut inb)
                        .map_err(|c| CompressError::Corrupt(zstd_error(c)))?;
                    if pb.pos() > 0 {
                        return Err(CompressError::OutputTooLarge { max });
                    }
                    if inb.pos() == input.len() {
                        return if hint == 0 {
                            Ok(())
                        } else {
                            Err(corrupt("truncated zstd frame"))
                        };
                    }
                    if inb.pos() == in_before {
                        return Err(corrupt("zstd decoder made no progress"));
                    }
                    continue;
                }
                let grow = produced.max(INITIAL_OUTPUT);
                reserve_within(out, start, max, produced + grow);
            }
            let in_before = inb.pos();
            let out_before = out.len();
            let pos = out.len();
            let hint = {
                let mut outb = OutBuffer::around_pos(out, pos);
                dctx.decompress_stream(&mut outb, &mut inb)
                    .map_err(|c| CompressError::Corrupt(zstd_error(c)))?
            };
            if out.len() - start > max {
                // The allocator handed out more capacity than asked for and zstd used it.
                return Err(CompressError::OutputTooLarge { max });
            }
            if inb.pos() == input.len() && hint == 0 {
                // Every frame is complete and flushed.
                return Ok(());
            }
            let full = out.len() >= out.capacity();
            if inb.pos() == input.len() && !full {
                // Output had room, so the decoder is waiting for input that will never come.
                return Err(corrupt("truncated zstd frame"));
            }
            if !full && inb.pos() == in_before && out.len() == out_before {
                return Err(corrupt("zstd decoder made no progress"));
            }
        }
    }
}

/// Grows `out`'s capacity so that it can hold `want` bytes after `start`, never more than
/// `max` bytes after `start`.
fn reserve_within(out: &mut Vec<u8>, start: usize, max: usize, want: usize) {
    let target = start + want.min(max);
    if target > out.capacity() {
        out.reserve_exact(target - out.len());
    }
}

fn gzip_compress(level: u32, input: &[u8], out: &mut Vec<u8>) -> Result<(), CompressError> {
    out.reserve(Compression::Gzip { level }.max_compressed_len(input.len()));
    let mut enc = flate2::write::GzEncoder::new(out, flate2::Compression::new(level));
    enc.write_all(input).map_err(CompressError::Compress)?;
    enc.finish().map_err(CompressError::Compress)?;
    Ok(())
}

fn gzip_decompress(input: &[u8], max: usize, out: &mut Vec<u8>) -> Result<(), CompressError> {
    let start = out.len();
    let mut dec = flate2::bufread::GzDecoder::new(input);
    let mut filled = start;
    let mut want = INITIAL_OUTPUT.min(max).max(1);
    loop {
        if filled == out.len() {
            let produced = filled - start;
            if produced >= max {
                let mut probe = [0u8; 1];
                let n = read_retrying(&mut dec, &mut probe)?;
                if n > 0 {
                    out.truncate(filled);
                    return Err(CompressError::OutputTooLarge { max });
                }
                break;
            }
            want = want.max(produced).min(max - produced);
            // reserve_exact first: a plain resize could double the capacity past the bound.
            out.reserve_exact(want);
            out.resize(filled + want, 0);
        }
        let n = read_retrying(&mut dec, &mut out[filled..])?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    out.truncate(filled);
    if !dec.into_inner().is_empty() {
        return Err(corrupt("trailing bytes after the gzip member"));
    }
    Ok(())
}

fn read_retrying<R: Read>(r: &mut R, buf: &mut [u8]) -> Result<usize, CompressError> {
    loop {
        match r.read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(CompressError::Corrupt(e)),
        }
    }
}

/// Appends the compression of `input` to `out` with a one-off [`Codec`].
pub fn compress(c: Compression, input: &[u8], out: &mut Vec<u8>) -> Result<(), CompressError> {
    Codec::new().compress(c, input, out)
}

/// Appends the decompression of `input` to `out` with a one-off [`Codec`]; see
/// [`Codec::decompress`].
pub fn decompress(
    c: Compression,
    input: &[u8],
    max_output: usize,
    out: &mut Vec<u8>,
) -> Result<(), CompressError> {
    Codec::new().decompress(c, input, max_output, out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ALL: [Compression; 5] = [
        Compression::None,
        Compression::Zstd { level: 1 },
        Compression::Zstd { level: -3 },
        Compression::Gzip { level: 1 },
        Compression::Gzip { level: 6 },
    ];

    fn compressible(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i / 7 % 13) as u8).collect()
    }

    #[test]
    fn parses_cli_names() {
        assert_eq!("none".parse(), Ok(Compression::None));
        assert_eq!("zstd".parse(), Ok(Compression::Zstd { level: 1 }));
        assert_eq!("zstd:3".parse(), Ok(Compression::Zstd { level: 3 }));
        assert_eq!("ZSTD:-5".parse(), Ok(Compression::Zstd { level: -5 }));
        assert_eq!("gzip".parse(), Ok(Compression::Gzip { level: 6 }));
        assert_eq!("gzip:9".parse(), Ok(Compression::Gzip { level: 9 }));
    }

    #[test]
    fn refuses_bad_cli_names() {
        assert!(matches!(
            "lz4".parse::<Compression>(),
            Err(ParseCompressionError::UnknownAlgorithm(s)) if s == "lz4"
        ));
        assert!(matches!(
            "zstd:fast".parse::<Compression>(),
            Err(ParseCompressionError::BadLevel(s)) if s == "fast"
        ));
        assert!(matches!(
            "gzip:-1".parse::<Compression>(),
            Err(ParseCompressionError::BadLevel(_))
        ));
        assert_eq!(
            "gzip:10".parse::<Compression>(),
            Err(ParseCompressionError::LevelOutOfRange(Compression::Gzip {
                level: 10
            }))
        );
        assert_eq!(
            "zstd:99".parse::<Compression>(),
            Err(ParseCompressionError::LevelOutOfRange(Compression::Zstd {
                level: 99
            }))
        );
        assert_eq!(
            "none:1".parse::<Compression>(),
            Err(ParseCompressionError::LevelForNone)
        );
        assert!(matches!(
            "".parse::<Compression>(),
            Err(ParseCompressionError::UnknownAlgorithm(_))
        ));
    }

    #[test]
    fn compress_refuses_out_of_range_levels() {
        let mut out = vec![1];
        for c in [
            Compression::Gzip { level: 10 },
            Compression::Zstd { level: 1000 },
        ] {
            assert!(matches!(
                compress(c, b"abc", &mut out),
                Err(CompressError::InvalidLevel(got)) if got == c
            ));
        }
        assert_eq!(out, vec![1]);
    }

    #[test]
    fn round_trip_appends_and_compresses() {
        let data = compressible(300_000);
        let mut codec = Codec::new();
        for c in ALL {
            let mut packed = vec![9, 9];
            codec.compress(c, &data, &mut packed).unwrap();
            assert_eq!(&packed[..2], &[9, 9]);
            if c != Compression::None {
                assert!(packed.len() < data.len() / 4, "{c} did not compress");
            }
            let mut back = vec![7];
            codec
                .decompress(c, &packed[2..], data.len(), &mut back)
                .unwrap();
            assert_eq!(back[0], 7);
            assert_eq!(&back[1..], &data[..], "{c}");
        }
    }

    #[test]
    fn empty_input_round_trips() {
        for c in ALL {
            let mut packed = Vec::new();
            compress(c, &[], &mut packed).unwrap();
            let mut back = Vec::new();
            decompress(c, &packed, 0, &mut back).unwrap();
            assert!(back.is_empty());
        }
    }

    #[test]
    fn bomb_stops_at_the_bound_without_allocating_past_it() {
        // 64 MiB of zeros compresses to a few KiB.
        let zeros = vec![0u8; 64 << 20];
        for c in [
            Compression::Zstd { level: 1 },
            Compression::Gzip { level: 1 },
        ] {
            let mut packed = Vec::new();
            compress(c, &zeros, &mut packed).unwrap();
            assert!(packed.len() < 1 << 20);
            let mut out = Vec::new();
            let err = decompress(c, &packed, 1 << 20, &mut out).unwrap_err();
            assert!(matches!(err, CompressError::OutputTooLarge { max } if max == 1 << 20));
            assert!(out.is_empty());
            assert!(
                out.capacity() <= 1 << 20,
                "{c}: capacity {}",
                out.capacity()
            );
        }
    }

    #[test]
    fn zstd_bomb_without_content_size_stops_at_the_bound() {
        // A streamed frame does not record its content size, so the decoder must stop by itself.
        let mut enc = zstd::stream::Encoder::new(Vec::new(), 1).unwrap();
        enc.include_contentsize(false).unwrap();
        enc.write_all(&vec![0u8; 8 << 20]).unwrap();
        let packed = enc.finish().unwrap();
        assert!(matches!(
            zstd_safe::get_frame_content_size(&packed),
            Ok(None)
        ));
        let mut out = Vec::new();
        let err =
            decompress(Compression::Zstd { level: 1 }, &packed, 100_000, &mut out).unwrap_err();
        assert!(matches!(
            err,
            CompressError::OutputTooLarge { max: 100_000 }
        ));
        assert!(out.capacity() <= 100_000);
        // Exactly at the bound is fine.
        decompress(Compression::Zstd { level: 1 }, &packed, 8 << 20, &mut out).unwrap();
        assert_eq!(out.len(), 8 << 20);
    }

    #[test]
    fn exact_bound_is_accepted_and_one_less_is_not() {
        let data = compressible(10_000);
        let mut codec = Codec::new();
        for c in ALL {
            let mut packed = Vec::new();
            codec.compress(c, &data, &mut packed).unwrap();
            let mut out = Vec::new();
            codec.decompress(c, &packed, 10_000, &mut out).unwrap();
            assert_eq!(out, data);
            out.clear();
            assert!(matches!(
                codec.decompress(c, &packed, 9_999, &mut out),
                Err(CompressError::OutputTooLarge { max: 9_999 })
            ));
            assert!(out.is_empty());
        }
    }

    #[test]
    fn corrupt_input_is_reported() {
        let data = compressible(50_000);
        let mut codec = Codec::new();
        for c in [
            Compression::Zstd { level: 1 },
            Compression::Gzip { level: 6 },
        ] {
            let mut packed = Vec::new();
            codec.compress(c, &data, &mut packed).unwrap();
            let mut out = vec![5];
            // Truncated.
            let err = codec
                .decompress(c, &packed[..packed.len() - 3], 1 << 20, &mut out)
                .unwrap_err();
            assert!(matches!(err, CompressError::Corrupt(_)), "{c}: {err}");
            assert_eq!(out, vec![5]);
            // Trailing garbage.
            let mut long = packed.clone();
            long.extend_from_slice(b"garbage!");
            let err = codec.decompress(c, &long, 1 << 20, &mut out).unwrap_err();
            assert!(matches!(err, CompressError::Corrupt(_)), "{c}: {err}");
            // Not compressed at all.
            let err = codec
                .decompress(c, b"plain text", 1 << 20, &mut out)
                .unwrap_err();
            assert!(matches!(err, CompressError::Corrupt(_)), "{c}: {err}");
            // Empty.
            let err = codec.decompress(c, b"", 1 << 20, &mut out).unwrap_err();
            assert!(matches!(err, CompressError::Corrupt(_)), "{c}: {err}");
            assert_eq!(out, vec![5]);
            // The codec still works after errors.
            codec.decompress(c, &packed, 1 << 20, &mut out).unwrap();
            assert_eq!(&out[1..], &data[..]);
            out.truncate(1);
        }
    }

    #[test]
    fn none_enforces_the_bound() {
        let mut out = Vec::new();
        assert!(matches!(
            decompress(Compression::None, &[1, 2, 3], 2, &mut out),
            Err(CompressError::OutputTooLarge { max: 2 })
        ));
    }

    proptest! {
        #[test]
        fn round_trip(data in proptest::collection::vec(any::<u8>(), 0..4096),
                      which in 0usize..ALL.len(), repeat in 1usize..8) {
            let c = ALL[which];
            let data: Vec<u8> = data.iter().copied().cycle().take(data.len() * repeat).collect();
            let mut codec = Codec::new();
            let mut packed = Vec::new();
            codec.compress(c, &data, &mut packed).unwrap();
            prop_assert!(packed.len() <= c.max_compressed_len(data.len()));
            let mut back = Vec::new();
            codec.decompress(c, &packed, data.len(), &mut back).unwrap();
            prop_assert_eq!(back, data);
        }

        #[test]
        fn arbitrary_input_never_panics(data in proptest::collection::vec(any::<u8>(), 0..1024),
                                        which in 0usize..ALL.len(), max in 0usize..4096) {
            let mut codec = Codec::new();
            let mut out = Vec::new();
            match codec.decompress(ALL[which], &data, max, &mut out) {
                Ok(()) => prop_assert!(out.len() <= max),
                Err(_) => prop_assert!(out.is_empty()),
            }
        }

        #[test]
        fn arbitrary_zstd_frames_never_panic(tail in proptest::collection::vec(any::<u8>(), 0..256)) {
            // Start with a valid magic number so the fuzzing reaches the frame parser.
            let mut data = vec![0x28, 0xb5, 0x2f, 0xfd];
            data.extend_from_slice(&tail);
            let mut out = Vec::new();
            match decompress(Compression::Zstd { level: 1 }, &data, 1 << 16, &mut out) {
                Ok(()) => prop_assert!(out.len() <= 1 << 16),
                Err(_) => prop_assert!(out.is_empty()),
            }
        }

        #[test]
        fn display_parses_back(level in -7i32..=22, glevel in 0u32..=9) {
            for c in [Compression::None, Compression::Zstd { level }, Compression::Gzip { level: glevel }] {
                prop_assert_eq!(c.to_string().parse::<Compression>(), Ok(c));
            }
        }
    }
}
