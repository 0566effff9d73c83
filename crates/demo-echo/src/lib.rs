//! The demo echo service: the application that the migration must keep alive.
//!
//! ```text
//!  client                                   server (per connection)
//!  EchoRequest { seq, payload } ──stream──► EchoState::handle
//!                                            served += 1 for a new seq,
//!                                            the cached reply for a retried seq
//!  EchoChecker::check ◄──────────stream──── EchoReply { seq, served, payload }
//! ```
//!
//! Each request travels on its own bidirectional stream, one frame each way. The server counts
//! the distinct requests it served on the connection (`served`); that counter lives in the
//! server process's memory, so it survives a migration only if the process and the connection
//! do. The client checks every reply: sequence numbers arrive in order with no gap and no
//! duplicate, and `served` grows by exactly one per request. A request retried after a timeout
//! (same `seq`) gets the cached reply and does not count twice, so retries never break the check.
//!
//! Bulk: a stream that opens with [`BULK_MAGIC`] is a [`BulkRequest`] instead. The server
//! answers on that stream with `len` bytes (or until the client stops the stream) of a
//! deterministic pattern, [`bulk_fill`], that the client checks byte for byte with
//! [`bulk_check`]; no counter, no state. An echo stream opens with its frame's length prefix,
//! whose first byte is always 0 (`MAX_FRAME` < 2^24), so the two kinds never collide and the
//! echo bytes are what they were before bulk existed. [`DemoRequest::decode`] tells them apart.
//!
//! ```text
//!  client                                          server
//!  "QLMB" + BulkRequest { len } ──stream, FIN──►   DemoRequest::Bulk
//!  bulk_check(offset, chunk) ◄───stream─────────   bulk_fill(offset, chunk) ... (FIN after len)
//! ```
//!
//! Sans-I/O: the wrappers own the streams; this crate encodes, decodes and keeps the state.

use serde::{Deserialize, Serialize};
use wire_frame::{self as frame, FrameError};

/// The ALPN protocol identifier of the demo echo service.
pub const ALPN: &[u8] = b"qlm-echo/1";

/// Largest echo payload accepted (the demo sends a few bytes).
pub const MAX_PAYLOAD: usize = 64 * 1024;

/// Largest frame of either message: payload plus headroom for the header fields.
pub const MAX_FRAME: usize = MAX_PAYLOAD + 64;

/// A client's request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EchoRequest {
    /// Request number on this connection, starting at 0.
    pub seq: u64,
    /// Bytes to echo.
    pub payload: Vec<u8>,
}

/// The server's reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EchoReply {
    /// The request's number.
    pub seq: u64,
    /// Distinct requests this connection has had served, this one included.
    pub served: u64,
    /// The request's bytes.
    pub payload: Vec<u8>,
}

/// Errors of the echo codec and state.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EchoError {
    /// The message does not frame or decode.
    #[error("malformed echo message: {0}")]
    Frame(#[from] FrameError),
    /// The payload is larger than [`MAX_PAYLOAD`].
    #[error("echo payload of {len} bytes exceeds {MAX_PAYLOAD}")]
    PayloadTooLarge {
        /// Payload length.
        len: usize,
    },
    /// The server got a request number that is neither the next one nor a retry of the last.
    #[error("request {got} out of order: expected {expected} (or a retry of the last)")]
    OutOfOrder {
        /// The next request number the server expects.
        expected: u64,
        /// The request number received.
        got: u64,
    },
    /// The client got a reply for another request than the one outstanding.
    #[error("reply for request {got}, expected {expected}")]
    WrongSeq {
        /// Outstanding request number.
        expected: u64,
        /// Request number in the reply.
        got: u64,
    },
    /// The server's counter did not advance by exactly one: a request was lost or counted twice,
    /// or the server's state was lost (a new process, a new connection).
    #[error("server counter is {got}, expected {expected}: the connection's state did not survive")]
    CounterBroken {
        /// Counter value the client expected.
        expected: u64,
        /// Counter value the server sent.
        got: u64,
    },
    /// The reply carries other bytes than the request.
    #[error("reply payload differs from the request's")]
    PayloadMismatch,
    /// A bulk request does not open with [`BULK_MAGIC`].
    #[error("not a bulk request: it does not open with the bulk magic")]
    NotBulk,
    /// A bulk stream carries another byte than the pattern's.
    #[error("bulk byte at offset {offset} is {got:#04x}, expected {expected:#04x}")]
    BulkMismatch {
        /// Offset of the first wrong byte in the stream.
        offset: u64,
        /// The pattern's byte there.
        expected: u8,
        /// The byte received.
        got: u8,
    },
}

fn encode<T: Serialize>(msg: &T, payload_len: usize) -> Result<Vec<u8>, EchoError> {
    if payload_len > MAX_PAYLOAD {
        return Err(EchoError::PayloadTooLarge { len: payload_len });
    }
    let mut out = Vec::with_capacity(payload_len + 32);
    frame::encode(msg, MAX_FRAME, &mut out)?;
    Ok(out)
}

fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, EchoError> {
    let mut d = frame::FrameDecoder::new(MAX_FRAME);
    d.push(bytes);
    let Some(msg) = d.next_message()? else {
        d.finish()?;
        // Nothing at all was received.
        return Err(EchoError::Frame(FrameError::Truncated {
            missing: frame::LEN_PREFIX,
        }));
    };
    let rest = d.buffered();
    if rest > 0 {
        return Err(EchoError::Frame(FrameError::TrailingBytes(rest)));
    }
    Ok(msg)
}

impl EchoRequest {
    /// The bytes a client writes on the request's stream.
    pub fn encode(&self) -> Result<Vec<u8>, EchoError> {
        encode(self, self.payload.len())
    }

    /// Decodes a whole request stream.
    pub fn decode(bytes: &[u8]) -> Result<Self, EchoError> {
        let req: Self = decode(bytes)?;
        if req.payload.len() > MAX_PAYLOAD {
            return Err(EchoError::PayloadTooLarge {
                len: req.payload.len(),
            });
        }
        Ok(req)
    }
}

impl EchoReply {
    /// The bytes a server writes on the request's stream.
    pub fn encode(&self) -> Result<Vec<u8>, EchoError> {
        encode(self, self.payload.len())
    }

    /// Decodes a whole reply stream.
    pub fn decode(bytes: &[u8]) -> Result<Self, EchoError> {
        decode(bytes)
    }
}

/// The four bytes that open a bulk request stream (an echo stream opens with a 0 byte).
pub const BULK_MAGIC: [u8; 4] = *b"QLMB";

/// A client's request for a stream of pattern bytes ([`bulk_fill`]) on the request's stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BulkRequest {
    /// Bytes to send, then finish the stream; `None`: send until the client stops the stream.
    pub len: Option<u64>,
}

impl BulkRequest {
    /// The bytes a client writes on the request's stream: [`BULK_MAGIC`], then one frame.
    pub fn encode(&self) -> Result<Vec<u8>, EchoError> {
        let mut out = BULK_MAGIC.to_vec();
        frame::encode(self, MAX_FRAME, &mut out)?;
        Ok(out)
    }

    /// Decodes a whole bulk request stream.
    pub fn decode(bytes: &[u8]) -> Result<Self, EchoError> {
        let body = bytes.strip_prefix(&BULK_MAGIC).ok_or(EchoError::NotBulk)?;
        decode(body)
    }
}

/// What a request stream asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DemoRequest {
    /// One echo.
    Echo(EchoRequest),
    /// A stream of pattern bytes.
    Bulk(BulkRequest),
}

impl DemoRequest {
    /// Decodes a whole request stream of either kind (told apart by [`BULK_MAGIC`]).
    pub fn decode(bytes: &[u8]) -> Result<Self, EchoError> {
        if bytes.starts_with(&BULK_MAGIC) {
            BulkRequest::decode(bytes).map(Self::Bulk)
        } else {
            EchoRequest::decode(bytes).map(Self::Echo)
        }
    }
}

/// The pattern's word `w` (splitmix64's output function): bytes `8w .. 8w + 8` of a bulk
/// stream are its little-endian bytes. Any lost, repeated or reordered run of bytes shows.
fn pattern_word(w: u64) -> u64 {
    let mut z = w.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Byte `i` of every bulk stream.
pub fn bulk_byte(i: u64) -> u8 {
    pattern_word(i / 8).to_le_bytes()[(i % 8) as usize]
}

/// Fills `buf` with the bulk stream's bytes from `offset` on.
pub fn bulk_fill(offset: u64, buf: &mut [u8]) {
    // Byte by byte up to a word boundary, then whole words, then the tail byte by byte.
    let head = ((8 - offset % 8) % 8).min(buf.len() as u64) as usize;
    let (first, rest) = buf.split_at_mut(head);
    for (k, b) in first.iter_mut().enumerate() {
        *b = bulk_byte(offset + k as u64);
    }
    let mut i = offset + head as u64;
    let mut words = rest.chunks_exact_mut(8);
    for c in &mut words {
        c.copy_from_slice(&pattern_word(i / 8).to_le_bytes());
        i += 8;
    }
    for b in words.into_remainder() {
        *b = bulk_byte(i);
        i += 1;
    }
}

/// Checks that `buf` holds the bulk stream's bytes from `offset` on; the error names the first
/// wrong byte.
pub fn bulk_check(offset: u64, buf: &[u8]) -> Result<(), EchoError> {
    let mismatch = |at: u64, got: u8| EchoError::BulkMismatch {
        offset: at,
        expected: bulk_byte(at),
        got,
    };
    let head = ((8 - offset % 8) % 8).min(buf.len() as u64) as usize;
    let (first, rest) = buf.split_at(head);
    for (k, &b) in first.iter().enumerate() {
        let at = offset + k as u64;
        if b != bulk_byte(at) {
            return Err(mismatch(at, b));
        }
    }
    let mut i = offset + head as u64;
    let mut words = rest.chunks_exact(8);
    for c in &mut words {
        if c != pattern_word(i / 8).to_le_bytes() {
            // The first wrong byte of the word.
            for (k, &b) in c.iter().enumerate() {
                if b != bulk_byte(i + k as u64) {
                    return Err(mismatch(i + k as u64, b));
                }
            }
        }
        i += 8;
    }
    for &b in words.remainder() {
        if b != bulk_byte(i) {
            return Err(mismatch(i, b));
        }
        i += 1;
    }
    Ok(())
}

/// The server's state for one connection.
#[derive(Debug, Default)]
pub struct EchoState {
    served: u64,
    last: Option<EchoReply>,
}

impl EchoState {
    /// Distinct requests served so far.
    pub fn served(&self) -> u64 {
        self.served
    }

    /// Serves one request: a new one counts, a retry of the last gets the same reply again.
    pub fn handle(&mut self, req: EchoRequest) -> Result<EchoReply, EchoError> {
        let expected = self.last.as_ref().map_or(0, |l| l.seq + 1);
        match &self.last {
            Some(last) if last.seq == req.seq => return Ok(last.clone()),
            _ => {}
        }
        if req.seq != expected {
            return Err(EchoError::OutOfOrder {
                expected,
                got: req.seq,
            });
        }
        self.served += 1;
        let reply = EchoReply {
            seq: req.seq,
            served: self.served,
            payload: req.payload,
        };
        self.last = Some(reply.clone());
        Ok(reply)
    }
}

/// The client's check of the replies: in order, no gap, no duplicate, counter continuous.
#[derive(Debug, Default)]
pub struct EchoChecker {
    next_seq: u64,
}

impl EchoChecker {
    /// The number of the next request to send (also the count of verified replies).
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The request to send next.
    pub fn request(&self, payload: Vec<u8>) -> EchoRequest {
        EchoRequest {
            seq: self.next_seq,
            payload,
        }
    }

    /// Verifies the reply to `req` (the outstanding request) and advances.
    pub fn check(&mut self, req: &EchoRequest, reply: &EchoReply) -> Result<(), EchoError> {
        if reply.seq != self.next_seq || req.seq != self.next_seq {
            return Err(EchoError::WrongSeq {
                expected: self.next_seq,
                got: reply.seq,
            });
        }
        if reply.served != self.next_seq + 1 {
            return Err(EchoError::CounterBroken {
                expected: self.next_seq + 1,
                got: reply.served,
            });
        }
        if reply.payload != req.payload {
            return Err(EchoError::PayloadMismatch);
        }
        self.next_seq += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn retries_are_idempotent_and_the_counter_continues() {
        let mut server = EchoState::default();
        let mut client = EchoChecker::default();
        for _ in 0..3 {
            let req = client.request(b"ping".to_vec());
            let reply = server.handle(req.clone()).unwrap();
            // A retry of the same request (its first reply was lost) is answered identically.
            let again = server.handle(req.clone()).unwrap();
            assert_eq!(reply, again);
            client.check(&req, &reply).unwrap();
        }
        assert_eq!(server.served(), 3);
        assert_eq!(client.next_seq(), 3);
    }

    #[test]
    fn a_gap_or_a_replay_is_refused_by_the_server() {
        let mut server = EchoState::default();
        let err = server
            .handle(EchoRequest {
                seq: 1,
                payload: vec![],
            })
            .unwrap_err();
        assert!(matches!(
            err,
            EchoError::OutOfOrder {
                expected: 0,
                got: 1
            }
        ));
        for seq in 0..3 {
            server
                .handle(EchoRequest {
                    seq,
                    payload: vec![],
                })
                .unwrap();
        }
        let err = server
            .handle(EchoRequest {
                seq: 0,
                payload: vec![],
            })
            .unwrap_err();
        assert!(matches!(
            err,
            EchoError::OutOfOrder {
                expected: 3,
                got: 0
            }
        ));
    }

    #[test]
    fn the_checker_detects_a_lost_server_state() {
        let mut client = EchoChecker::default();
        let mut server = EchoState::default();
        let req = client.request(vec![1]);
        client
            .check(&req, &server.handle(req.clone()).unwrap())
            .unwrap();
        // A fresh server process (state lost) answers the next request with served = 1.
        let mut fresh = EchoState::default();
        let req = client.request(vec![2]);
        let reply = EchoReply {
            seq: req.seq,
            served: 1,
            payload: req.payload.clone(),
        };
        assert!(matches!(
            client.check(&req, &reply),
            Err(EchoError::CounterBroken {
                expected: 2,
                got: 1
            })
        ));
        assert!(matches!(
            fresh.handle(req.clone()),
            Err(EchoError::OutOfOrder {
                expected: 0,
                got: 1
            })
        ));
        let wrong = EchoReply {
            seq: 5,
            served: 2,
            payload: req.payload.clone(),
        };
        assert!(matches!(
            client.check(&req, &wrong),
            Err(EchoError::WrongSeq {
                expected: 1,
                got: 5
            })
        ));
        let changed = EchoReply {
            seq: 1,
            served: 2,
            payload: vec![9],
        };
        assert!(matches!(
            client.check(&req, &changed),
            Err(EchoError::PayloadMismatch)
        ));
    }

    #[test]
    fn bad_bytes_are_typed_errors() {
        assert!(matches!(
            EchoRequest::decode(&[]),
            Err(EchoError::Frame(FrameError::Truncated { .. }))
        ));
        assert!(matches!(
            EchoRequest::decode(&u32::MAX.to_be_bytes()),
            Err(EchoError::Frame(FrameError::TooLarge { .. }))
        ));
        let mut two = EchoRequest {
            seq: 1,
            payload: vec![1],
        }
        .encode()
        .unwrap();
        two.extend_from_slice(&two.clone());
        assert!(matches!(
            EchoRequest::decode(&two),
            Err(EchoError::Frame(FrameError::TrailingBytes(_)))
        ));
        let big = EchoRequest {
            seq: 0,
            payload: vec![0; MAX_PAYLOAD + 1],
        };
        assert!(matches!(
            big.encode(),
            Err(EchoError::PayloadTooLarge { .. })
        ));
    }

    #[test]
    fn golden_bytes() {
        // The echo bytes are those of before bulk existed; the first byte is 0 (a length prefix).
        let echo = EchoRequest {
            seq: 1,
            payload: b"hi".to_vec(),
        };
        assert_eq!(echo.encode().unwrap(), [0, 0, 0, 4, 1, 2, b'h', b'i']);
        let bulk = BulkRequest { len: Some(1000) };
        assert_eq!(
            bulk.encode().unwrap(),
            [b'Q', b'L', b'M', b'B', 0, 0, 0, 3, 1, 0xE8, 0x07]
        );
        let unbounded = BulkRequest { len: None };
        assert_eq!(
            unbounded.encode().unwrap(),
            [b'Q', b'L', b'M', b'B', 0, 0, 0, 1, 0]
        );
        assert_eq!(
            DemoRequest::decode(&bulk.encode().unwrap()).unwrap(),
            DemoRequest::Bulk(bulk)
        );
        assert_eq!(
            DemoRequest::decode(&echo.encode().unwrap()).unwrap(),
            DemoRequest::Echo(echo)
        );
        // The pattern is pinned too: a client and a server of different builds agree.
        let mut first = [0u8; 10];
        bulk_fill(0, &mut first);
        assert_eq!(first[..8], pattern_word(0).to_le_bytes());
        assert_eq!(bulk_byte(9), pattern_word(1).to_le_bytes()[1]);
        assert_eq!(pattern_word(0), 0xE220_A839_7B1D_CDAF);
    }

    #[test]
    fn bad_bulk_bytes_are_typed_errors() {
        assert!(matches!(
            BulkRequest::decode(b"QLM"),
            Err(EchoError::NotBulk)
        ));
        assert!(matches!(
            BulkRequest::decode(b"QLMB"),
            Err(EchoError::Frame(FrameError::Truncated { .. }))
        ));
        // Some(len) cut short, and a frame followed by more bytes.
        assert!(matches!(
            BulkRequest::decode(&[b'Q', b'L', b'M', b'B', 0, 0, 0, 2, 1, 0xE8]),
            Err(EchoError::Frame(_))
        ));
        let mut trailing = BulkRequest { len: None }.encode().unwrap();
        trailing.push(0);
        assert!(matches!(
            DemoRequest::decode(&trailing),
            Err(EchoError::Frame(FrameError::TrailingBytes(1)))
        ));
        // A huge length prefix after the magic is refused before allocating.
        let mut huge = BULK_MAGIC.to_vec();
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            DemoRequest::decode(&huge),
            Err(EchoError::Frame(FrameError::TooLarge { .. }))
        ));
    }

    #[test]
    fn the_check_finds_the_first_wrong_byte() {
        let mut buf = vec![0u8; 100];
        bulk_fill(13, &mut buf);
        bulk_check(13, &buf).unwrap();
        // The same bytes one position later are wrong (a lost byte shows).
        assert!(bulk_check(14, &buf).is_err());
        buf[40] ^= 1;
        let err = bulk_check(13, &buf).unwrap_err();
        assert!(
            matches!(err, EchoError::BulkMismatch { offset: 53, .. }),
            "{err}"
        );
    }

    proptest! {
        #[test]
        fn fill_agrees_with_the_byte_function(offset in 0u64..1 << 40, len in 0usize..64) {
            let mut buf = vec![0u8; len];
            bulk_fill(offset, &mut buf);
            for (k, b) in buf.iter().enumerate() {
                prop_assert_eq!(*b, bulk_byte(offset + k as u64));
            }
            prop_assert!(bulk_check(offset, &buf).is_ok());
            if len > 0 {
                let at = offset as usize % len;
                buf[at] = buf[at].wrapping_add(1);
                let err = bulk_check(offset, &buf).unwrap_err();
                let is_mismatch_at = matches!(err, EchoError::BulkMismatch { offset: o, .. } if o == offset + at as u64);
                prop_assert!(is_mismatch_at);
            }
        }

        #[test]
        fn bulk_round_trip(len: Option<u64>) {
            let req = BulkRequest { len };
            prop_assert_eq!(BulkRequest::decode(&req.encode().unwrap()).unwrap(), req);
            prop_assert_eq!(DemoRequest::decode(&req.encode().unwrap()).unwrap(), DemoRequest::Bulk(req));
        }

        #[test]
        fn round_trip(seq: u64, served: u64, payload in proptest::collection::vec(any::<u8>(), 0..512)) {
            let req = EchoRequest { seq, payload: payload.clone() };
            prop_assert_eq!(EchoRequest::decode(&req.encode().unwrap()).unwrap(), req);
            let reply = EchoReply { seq, served, payload };
            prop_assert_eq!(EchoReply::decode(&reply.encode().unwrap()).unwrap(), reply);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = EchoRequest::decode(&bytes);
            let _ = EchoReply::decode(&bytes);
            let _ = DemoRequest::decode(&bytes);
            let _ = BulkRequest::decode(&bytes);
            let mut magic = BULK_MAGIC.to_vec();
            magic.extend_from_slice(&bytes);
            let _ = DemoRequest::decode(&magic);
        }
    }
}
