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

    proptest! {
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
        }
    }
}
