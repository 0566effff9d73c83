//! Length-delimited framing: a leaf crate (serde, postcard and thiserror only), so that the
//! codecs that frame their messages (control-protocol, demo-echo) need neither compression nor
//! cryptography. migration-wire re-exports it as `migration_wire::frame`.
//!
//! A frame is a 4-byte big-endian body length followed by the body. The decoder refuses a
//! length prefix above its configured maximum as soon as the 4 bytes are seen, before it
//! buffers or allocates anything for the body, so a peer cannot make it reserve memory by
//! announcing a huge frame.
//!
//! ```text
//!  +----------------+---------------------------+
//!  | len: u32 (BE)  | body: len bytes           |
//!  +----------------+---------------------------+
//! ```

use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// Size of the length prefix.
pub const LEN_PREFIX: usize = 4;

/// Default maximum body size: 16 MiB, enough for a 1 MiB chunk with any header and room to spare.
pub const DEFAULT_MAX_FRAME: usize = 16 * 1024 * 1024;

/// Errors of framing and of the typed messages carried in frames.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The length prefix announces a body larger than the configured maximum.
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    TooLarge {
        /// Announced body length.
        len: u64,
        /// Configured maximum.
        max: usize,
    },
    /// The input ended in the middle of a frame.
    #[error("input ended inside a frame: {missing} more bytes were expected")]
    Truncated {
        /// Bytes still missing to complete the frame.
        missing: usize,
    },
    /// The body is not a valid postcard encoding of the expected message type.
    #[error("frame body does not decode: {0}")]
    Decode(#[source] postcard::Error),
    /// A message could not be encoded (for example a sequence longer than postcard allows).
    #[error("message does not encode: {0}")]
    Encode(#[source] postcard::Error),
    /// The body decoded, but bytes were left over after the message.
    #[error("{0} trailing bytes after the message in a frame")]
    TrailingBytes(usize),
}

/// Appends one frame holding `body` to `out`.
///
/// Fails with [`FrameError::TooLarge`] when `body` is longer than `max`, so that a sender never
/// emits a frame its peer would refuse.
pub fn encode_raw(body: &[u8], max: usize, out: &mut Vec<u8>) -> Result<(), FrameError> {
    let len = check_len(body.len() as u64, max)?;
    out.reserve(LEN_PREFIX + body.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(body);
    Ok(())
}

/// Appends one frame holding the postcard encoding of `msg` to `out`.
pub fn encode<T: Serialize + ?Sized>(
    msg: &T,
    max: usize,
    out: &mut Vec<u8>,
) -> Result<(), FrameError> {
    let start = out.len();
    out.extend_from_slice(&[0; LEN_PREFIX]);
    // Serialize through `&mut Vec` so that a failure cannot lose what `out` held before.
    if let Err(e) = postcard::to_io(msg, &mut *out) {
        out.truncate(start);
        return Err(FrameError::Encode(e));
    }
    let body_len = out.len() - start - LEN_PREFIX;
    match check_len(body_len as u64, max) {
        Ok(len) => {
            out[start..start + LEN_PREFIX].copy_from_slice(&len.to_be_bytes());
            Ok(())
        }
        Err(e) => {
            out.truncate(start);
            Err(e)
        }
    }
}

/// Decodes one message from a complete frame body, refusing trailing bytes.
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    decode_body_borrowed(body)
}

/// [`decode_body`] for a message that may borrow from the body (a payload as `&[u8]`).
pub fn decode_body_borrowed<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, FrameError> {
    let (msg, rest) = postcard::take_from_bytes(body).map_err(FrameError::Decode)?;
    if !rest.is_empty() {
        return Err(FrameError::TrailingBytes(rest.len()));
    }
    Ok(msg)
}

/// The length prefix of a body of `len` bytes, or [`FrameError::TooLarge`] above `max`.
///
/// For a writer that assembles a frame in pieces (a header now, a payload later) and fills in
/// the prefix itself.
pub fn check_len(len: u64, max: usize) -> Result<u32, FrameError> {
    match u32::try_from(len) {
        Ok(l) if len <= max as u64 => Ok(l),
        _ => Err(FrameError::TooLarge { len, max }),
    }
}

/// Incremental frame decoder: feed it bytes as they arrive, take complete frames out.
///
/// Memory stays bounded by one maximum-size frame plus whatever the caller pushes before
/// draining: after a [`FrameError::TooLarge`] the decoder is poisoned and every later call
/// returns the same error, because the stream has lost its framing.
#[derive(Debug)]
pub struct FrameDecoder {
    max: usize,
    buf: Vec<u8>,
    /// Read position in `buf`; consumed bytes are dropped lazily.
    pos: usize,
    poisoned: Option<(u64, usize)>,
}

impl FrameDecoder {
    /// A decoder that accepts bodies of at most `max` bytes.
    pub fn new(max: usize) -> Self {
        Self {
            max,
            buf: Vec::new(),
            pos: 0,
            poisoned: None,
        }
    }

    /// The configured maximum body size.
    pub fn max_frame(&self) -> usize {
        self.max
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        // Drop consumed bytes before growing; frames returned earlier are no longer borrowed.
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes buffered but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Returns the next complete frame body, `Ok(None)` when more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<&[u8]>, FrameError> {
        if let Some((len, max)) = self.poisoned {
            return Err(FrameError::TooLarge { len, max });
        }
        let avail = &self.buf[self.pos..];
        let Some(prefix) = avail.get(..LEN_PREFIX) else {
            return Ok(None);
        };
        let mut len_bytes = [0u8; LEN_PREFIX];
        len_bytes.copy_from_slice(prefix);
        let len = u32::from_be_bytes(len_bytes) as u64;
        if len > self.max as u64 {
            self.poisoned = Some((len, self.max));
            return Err(FrameError::TooLarge { len, max: self.max });
        }
        // Bounded by `max` above, so the cast cannot truncate.
        let len = len as usize;
        if avail.len() < LEN_PREFIX + len {
            return Ok(None);
        }
        let start = self.pos + LEN_PREFIX;
        self.pos = start + len;
        Ok(Some(&self.buf[start..start + len]))
    }

    /// Decodes the next complete frame as a `T`, `Ok(None)` when more bytes are needed.
    pub fn next_message<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        match self.next_frame()? {
            Some(body) => decode_body(body).map(Some),
            None => Ok(None),
        }
    }

    /// Called when the input has ended: an error if a partial frame is still buffered.
    pub fn finish(&self) -> Result<(), FrameError> {
        let avail = self.buf.len() - self.pos;
        if avail == 0 {
            return Ok(());
        }
        let missing = if avail < LEN_PREFIX {
            LEN_PREFIX - avail
        } else {
            let mut len_bytes = [0u8; LEN_PREFIX];
            len_bytes.copy_from_slice(&self.buf[self.pos..self.pos + LEN_PREFIX]);
            (u32::from_be_bytes(len_bytes) as usize).saturating_sub(avail - LEN_PREFIX)
        };
        Err(FrameError::Truncated { missing })
    }
}

/// Reads one frame body from a blocking reader into `buf` (cleared first).
///
/// Returns `Ok(false)` on a clean end of input before any byte of a new frame. Reusing one
/// `buf` across calls avoids allocating, and zero-fills only what a body needs beyond the
/// length of the previous one.
pub fn read_frame<R: std::io::Read>(
    reader: &mut R,
    max: usize,
    buf: &mut Vec<u8>,
) -> Result<bool, ReadFrameError> {
    match read_frame_into(reader, max, buf)? {
        Some(len) => {
            buf.truncate(len);
            Ok(true)
        }
        None => Ok(false),
    }
}

/// Reads one frame body into `buf[..len]` and returns `Some(len)`, `None` on a clean end of
/// input before any byte of a new frame. `buf` only grows (zero-filled once up to the largest
/// body seen) and bytes past `len` are stale: reading a frame costs no zero-filling once the
/// buffer has reached the stream's largest frame.
pub fn read_frame_into<R: std::io::Read>(
    reader: &mut R,
    max: usize,
    buf: &mut Vec<u8>,
) -> Result<Option<usize>, ReadFrameError> {
    let mut prefix = [0u8; LEN_PREFIX];
    let mut got = 0;
    while got < LEN_PREFIX {
        match reader.read(&mut prefix[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => {
                return Err(ReadFrameError::Frame(FrameError::Truncated {
                    missing: LEN_PREFIX - got,
                }));
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ReadFrameError::Io(e)),
        }
    }
    let len = u32::from_be_bytes(prefix) as u64;
    if len > max as u64 {
        return Err(ReadFrameError::Frame(FrameError::TooLarge { len, max }));
    }
    let len = len as usize;
    if buf.len() < len {
        // Bounded by `max` above.
        buf.resize(len, 0);
    }
    let mut filled = 0;
    while filled < len {
        match reader.read(&mut buf[filled..len]) {
            Ok(0) => {
                return Err(ReadFrameError::Frame(FrameError::Truncated {
                    missing: len - filled,
                }));
            }
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ReadFrameError::Io(e)),
        }
    }
    Ok(Some(len))
}

/// Errors of [`read_frame`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadFrameError {
    /// The reader failed.
    #[error("reading a frame: {0}")]
    Io(#[source] std::io::Error),
    /// The bytes read do not form a valid frame.
    #[error(transparent)]
    Frame(FrameError),
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn oversized_prefix_is_refused_before_the_body_arrives() {
        let mut d = FrameDecoder::new(1024);
        d.push(&(1025u32).to_be_bytes());
        assert!(matches!(
            d.next_frame(),
            Err(FrameError::TooLarge {
                len: 1025,
                max: 1024
            })
        ));
        // Poisoned: the stream lost its framing.
        d.push(&[0; 16]);
        assert!(matches!(d.next_frame(), Err(FrameError::TooLarge { .. })));
        // Nothing was reserved for the announced body.
        assert!(d.buf.capacity() < 1024);
    }

    #[test]
    fn max_u32_prefix_is_refused_by_read_frame_without_allocating() {
        let mut input: &[u8] = &u32::MAX.to_be_bytes();
        let mut buf = Vec::new();
        let err = read_frame(&mut input, DEFAULT_MAX_FRAME, &mut buf).unwrap_err();
        assert!(matches!(
            err,
            ReadFrameError::Frame(FrameError::TooLarge { .. })
        ));
        assert_eq!(buf.capacity(), 0);
    }

    #[test]
    fn encoder_refuses_what_the_decoder_would_refuse() {
        let mut out = vec![7];
        let err = encode_raw(&[0; 11], 10, &mut out).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { len: 11, max: 10 }));
        let err = encode(&vec![1u8; 11], 10, &mut out).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { .. }));
        assert_eq!(
            out,
            vec![7],
            "a refused message leaves the output untouched"
        );
    }

    #[test]
    fn encode_failure_keeps_earlier_frames() {
        /// A sequence of unknown length, which postcard cannot encode.
        struct UnknownLen;
        impl Serialize for UnknownLen {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_seq([1u8, 2, 3].iter().filter(|_| true))
            }
        }
        let mut out = Vec::new();
        encode(&7u8, 64, &mut out).unwrap();
        let before = out.clone();
        let err = encode(&UnknownLen, 64, &mut out).unwrap_err();
        assert!(matches!(err, FrameError::Encode(_)));
        assert_eq!(
            out, before,
            "a failed encode leaves earlier frames in place"
        );
    }

    #[test]
    fn truncated_input_is_reported_by_finish_and_read_frame() {
        let mut out = Vec::new();
        encode_raw(b"hello", 64, &mut out).unwrap();
        let mut d = FrameDecoder::new(64);
        d.push(&out[..6]);
        assert!(d.next_frame().unwrap().is_none());
        assert!(matches!(
            d.finish(),
            Err(FrameError::Truncated { missing: 3 })
        ));
        let mut r: &[u8] = &out[..6];
        let mut buf = Vec::new();
        assert!(matches!(
            read_frame(&mut r, 64, &mut buf),
            Err(ReadFrameError::Frame(FrameError::Truncated { missing: 3 }))
        ));
        let mut r: &[u8] = &out[..2];
        assert!(matches!(
            read_frame(&mut r, 64, &mut buf),
            Err(ReadFrameError::Frame(FrameError::Truncated { missing: 2 }))
        ));
        let mut empty: &[u8] = &[];
        assert!(!read_frame(&mut empty, 64, &mut buf).unwrap());
    }

    #[test]
    fn read_frame_into_only_grows_its_buffer() {
        let mut wire = Vec::new();
        for body in [&b"a longer body"[..], b"", b"abc", b"a body longer still"] {
            encode_raw(body, 64, &mut wire).unwrap();
        }
        let mut r: &[u8] = &wire;
        let mut buf = Vec::new();
        let mut got = Vec::new();
        let mut lens = Vec::new();
        while let Some(len) = read_frame_into(&mut r, 64, &mut buf).unwrap() {
            got.push(buf[..len].to_vec());
            lens.push(buf.len());
        }
        assert_eq!(
            got,
            vec![
                b"a longer body".to_vec(),
                vec![],
                b"abc".to_vec(),
                b"a body longer still".to_vec()
            ]
        );
        assert_eq!(lens, vec![13, 13, 13, 19], "never shrinks");
        // read_frame presents exactly the body, even after a longer one.
        let mut r: &[u8] = &wire;
        let mut buf = Vec::new();
        assert!(read_frame(&mut r, 64, &mut buf).unwrap());
        assert!(read_frame(&mut r, 64, &mut buf).unwrap());
        assert!(read_frame(&mut r, 64, &mut buf).unwrap());
        assert_eq!(buf, b"abc");
    }

    #[test]
    fn trailing_bytes_in_a_body_are_refused() {
        let mut body = postcard::to_stdvec(&42u32).unwrap();
        body.push(0);
        assert!(matches!(
            decode_body::<u32>(&body),
            Err(FrameError::TrailingBytes(1))
        ));
    }

    proptest! {
        #[test]
        fn round_trip_any_split(msgs in proptest::collection::vec(
            (any::<u64>(), any::<String>(), proptest::collection::vec(any::<u8>(), 0..300)), 0..20),
            split in 1usize..64,
        ) {
            let mut wire = Vec::new();
            for m in &msgs {
                encode(m, DEFAULT_MAX_FRAME, &mut wire).unwrap();
            }
            let mut d = FrameDecoder::new(DEFAULT_MAX_FRAME);
            let mut got: Vec<(u64, String, Vec<u8>)> = Vec::new();
            for piece in wire.chunks(split) {
                d.push(piece);
                while let Some(m) = d.next_message().unwrap() {
                    got.push(m);
                }
            }
            d.finish().unwrap();
            prop_assert_eq!(got, msgs.clone());

            let mut r: &[u8] = &wire;
            let mut buf = Vec::new();
            let mut n = 0;
            while read_frame(&mut r, DEFAULT_MAX_FRAME, &mut buf).unwrap() {
                let m: (u64, String, Vec<u8>) = decode_body(&buf).unwrap();
                prop_assert_eq!(&m, &msgs[n]);
                n += 1;
            }
            prop_assert_eq!(n, msgs.len());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut d = FrameDecoder::new(256);
            d.push(&bytes);
            for _ in 0..bytes.len() + 1 {
                match d.next_message::<(u32, String)>() {
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
            let mut r: &[u8] = &bytes;
            let mut buf = Vec::new();
            let _ = read_frame(&mut r, 256, &mut buf);
        }
    }
}
