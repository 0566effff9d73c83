//! Encoding messages into frames and decoding them back, with the checks that make a decoded
//! [`Message`] trustworthy (version, kind, direction, bounds, no trailing bytes).
//!
//! ```text
//!  +-------------+--------------+-----------+------------------------------+
//!  | len u32 BE  | version u16 BE | kind u8 | postcard payload of the kind |
//!  +-------------+--------------+-----------+------------------------------+
//!   (wire_frame)              \______________ frame body ________________/
//! ```
//!
//! The header's version is the one that introduced the frame's kind
//! ([`MessageKind::since`]): every version 1 kind is written with version 1, so a version 1
//! peer reads everything a session it negotiated carries, byte for byte as before; only
//! `Downtime` is written with version 2, and a client sends it only to a server that chose
//! version 2 in its `Welcome`.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use wire_frame::{self as frame, FrameDecoder, FrameError};

use crate::close::CloseCode;
use crate::message::{Message, MessageKind};
use crate::types::{
    ByeReason, ClientId, DowntimeTooLong, InvalidVersionRange, LengthError, MigrationId,
    ObservedDowntime, Role, Token, VersionRange,
};

/// The newest protocol version this crate speaks. Version 2 added `Downtime` (client to
/// server) and nothing else; every other message is the same in both versions. A frame's
/// header carries the version that introduced its kind, not this one (see the module doc).
pub const PROTOCOL_VERSION: u16 = 2;

/// The versions this crate decodes (and offers in its `Hello`): 1 and 2.
pub const SUPPORTED_VERSIONS: VersionRange = match VersionRange::new(1, PROTOCOL_VERSION) {
    Ok(r) => r,
    // Unreachable: PROTOCOL_VERSION is at least 1.
    Err(_) => VersionRange::single(PROTOCOL_VERSION),
};

/// Largest frame body on the control stream. The largest message (a `Migrate` with a full
/// token) is under 600 bytes; the rest is headroom for later versions.
pub const MAX_CONTROL_FRAME: usize = 4096;

/// Bytes of the body header: version (2) and kind (1).
const HEADER_LEN: usize = 3;

/// Errors of [`encode`]. With the bounded field types these cannot happen for version 1
/// messages; they exist so that a future, larger message fails cleanly instead of panicking.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// postcard could not serialize the payload.
    #[error("control message payload does not serialize: {0}")]
    Serialize(#[source] postcard::Error),
    /// The frame would exceed [`MAX_CONTROL_FRAME`]; nothing was written.
    #[error("control message does not fit a frame: {0}")]
    Frame(#[source] FrameError),
}

/// Errors of [`ControlDecoder`]. After one of them the stream is unusable: close it with
/// [`DecodeError::close_code`].
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Framing failed: a frame larger than [`MAX_CONTROL_FRAME`] was announced, or the stream
    /// ended inside a frame (from [`ControlDecoder::finish`]).
    #[error("control stream framing: {0}")]
    Frame(#[source] Arc<FrameError>),
    /// A frame body shorter than the 3-byte version and kind header.
    #[error("control frame body of {len} bytes is shorter than its 3-byte header")]
    HeaderTooShort {
        /// Length of the body received.
        len: usize,
    },
    /// The frame names a protocol version this side does not speak.
    #[error("control protocol version {got} is not supported (supported: {supported})")]
    UnsupportedVersion {
        /// The version in the frame header.
        got: u16,
        /// The versions this side decodes.
        supported: VersionRange,
    },
    /// The kind byte names no message.
    #[error("unknown control message kind {0}")]
    UnknownKind(u8),
    /// A message this side must never receive: the decoder's own role sends it.
    #[error("{kind} must not be sent in this direction")]
    WrongDirection {
        /// The kind received.
        kind: MessageKind,
    },
    /// The payload is not a valid postcard encoding of the kind's fields.
    #[error("malformed {kind} payload: {source}")]
    Malformed {
        /// The kind whose payload failed.
        kind: MessageKind,
        /// What postcard reported.
        #[source]
        source: postcard::Error,
    },
    /// The payload decoded, but bytes were left over.
    #[error("{count} trailing bytes after a {kind} payload")]
    TrailingBytes {
        /// The kind decoded.
        kind: MessageKind,
        /// How many bytes were left.
        count: usize,
    },
    /// A string or token is longer than the protocol allows.
    #[error(transparent)]
    TooLong(#[from] LengthError),
    /// A `Hello` offers an empty version range.
    #[error("hello offers an invalid version range: {0}")]
    InvalidVersionRange(#[source] InvalidVersionRange),
    /// A `Downtime` above the protocol's bound (an hour).
    #[error("downtime report: {0}")]
    DowntimeTooLong(#[from] DowntimeTooLong),
}

impl DecodeError {
    /// The QUIC application error code to reset or stop the control stream with.
    pub fn close_code(&self) -> CloseCode {
        match self {
            DecodeError::Frame(f) => match **f {
                FrameError::TooLarge { .. } => CloseCode::FrameTooLarge,
                _ => CloseCode::ProtocolViolation,
            },
            DecodeError::UnsupportedVersion { .. } => CloseCode::UnsupportedVersion,
            DecodeError::WrongDirection { .. } => CloseCode::UnexpectedMessage,
            DecodeError::HeaderTooShort { .. }
            | DecodeError::UnknownKind(_)
            | DecodeError::Malformed { .. }
            | DecodeError::TrailingBytes { .. }
            | DecodeError::TooLong(_)
            | DecodeError::InvalidVersionRange(_)
            | DecodeError::DowntimeTooLong(_) => CloseCode::ProtocolViolation,
        }
    }
}

// ---- wire layout of the payloads (postcard). Field order is the wire order: never reorder. ----

/// A byte string written with postcard's `bytes` encoding (varint length, raw bytes) and read
/// back without copying.
#[derive(Debug, Clone, Copy)]
struct Bytes<'a>(&'a [u8]);

impl Serialize for Bytes<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Bytes<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = &'de [u8];
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("borrowed bytes")
            }
            fn visit_borrowed_bytes<E: serde::de::Error>(
                self,
                v: &'de [u8],
            ) -> Result<Self::Value, E> {
                Ok(v)
            }
        }
        d.deserialize_bytes(V).map(Bytes)
    }
}

/// A socket address without IPv6 flow info and scope id, which mean nothing on another host.
#[derive(Debug, Serialize, Deserialize)]
enum WireAddr {
    V4([u8; 4], u16),
    V6([u8; 16], u16),
}

impl From<SocketAddr> for WireAddr {
    fn from(a: SocketAddr) -> Self {
        match a {
            SocketAddr::V4(a) => WireAddr::V4(a.ip().octets(), a.port()),
            SocketAddr::V6(a) => WireAddr::V6(a.ip().octets(), a.port()),
        }
    }
}

impl From<WireAddr> for SocketAddr {
    fn from(a: WireAddr) -> Self {
        match a {
            WireAddr::V4(ip, port) => SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(ip), port)),
            WireAddr::V6(ip, port) => {
                SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::from(ip), port, 0, 0))
            }
        }
    }
}

#[derive(Serialize, Deserialize)]
struct HelloWire<'a> {
    client_id: &'a str,
    min_version: u16,
    max_version: u16,
}

#[derive(Serialize, Deserialize)]
struct WelcomeWire {
    version: u16,
    session_id: u64,
}

#[derive(Serialize, Deserialize)]
struct MigrateWire<'a> {
    migration_id: [u8; 16],
    new_addr: WireAddr,
    deadline_ms: u32,
    #[serde(borrow)]
    token: Option<Bytes<'a>>,
}

/// Payload of `Ack`, `Quiesced` and `Resumed`.
#[derive(Serialize, Deserialize)]
struct IdWire {
    migration_id: [u8; 16],
}

#[derive(Serialize, Deserialize)]
struct QuiesceWire {
    migration_id: [u8; 16],
    deadline_ms: u32,
}

#[derive(Serialize, Deserialize)]
struct AbortWire {
    migration_id: [u8; 16],
    fallback_addr: WireAddr,
}

#[derive(Serialize, Deserialize)]
struct DowntimeWire {
    migration_id: [u8; 16],
    /// Checked against [`crate::MAX_DOWNTIME_US`] when decoded.
    downtime_us: u64,
}

#[derive(Serialize, Deserialize)]
struct ByeWire<'a> {
    reason: &'a str,
}

fn put<T: Serialize>(payload: &T, body: Vec<u8>) -> Result<Vec<u8>, EncodeError> {
    postcard::to_extend(payload, body).map_err(EncodeError::Serialize)
}

/// Appends one frame holding `msg` to `out`. On error `out` is left as it was.
pub fn encode(msg: &Message, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    let mut body = Vec::with_capacity(64);
    body.extend_from_slice(&msg.kind().since().to_be_bytes());
    body.push(msg.kind().as_u8());
    let id = |m: &MigrationId| *m.as_bytes();
    let body = match msg {
        Message::Hello {
            client_id,
            supported,
        } => put(
            &HelloWire {
                client_id: client_id.as_str(),
                min_version: supported.min(),
                max_version: supported.max(),
            },
            body,
        )?,
        Message::Welcome {
            version,
            session_id,
        } => put(
            &WelcomeWire {
                version: *version,
                session_id: *session_id,
            },
            body,
        )?,
        Message::Migrate {
            migration_id,
            new_addr,
            deadline_ms,
            token,
        } => put(
            &MigrateWire {
                migration_id: id(migration_id),
                new_addr: (*new_addr).into(),
                deadline_ms: *deadline_ms,
                token: token.as_ref().map(|t| Bytes(t.as_bytes())),
            },
            body,
        )?,
        Message::Ack { migration_id }
        | Message::Quiesced { migration_id }
        | Message::Resumed { migration_id } => put(
            &IdWire {
                migration_id: id(migration_id),
            },
            body,
        )?,
        Message::Quiesce {
            migration_id,
            deadline_ms,
        } => put(
            &QuiesceWire {
                migration_id: id(migration_id),
                deadline_ms: *deadline_ms,
            },
            body,
        )?,
        Message::MigrateAborted {
            migration_id,
            fallback_addr,
        } => put(
            &AbortWire {
                migration_id: id(migration_id),
                fallback_addr: (*fallback_addr).into(),
            },
            body,
        )?,
        Message::Downtime {
            migration_id,
            downtime,
        } => put(
            &DowntimeWire {
                migration_id: id(migration_id),
                downtime_us: downtime.as_micros(),
            },
            body,
        )?,
        Message::Bye { reason } => put(
            &ByeWire {
                reason: reason.as_str(),
            },
            body,
        )?,
    };
    frame::encode_raw(&body, MAX_CONTROL_FRAME, out).map_err(EncodeError::Frame)
}

/// Reads the payload of `kind`, refusing bytes left over.
fn take<'a, T: Deserialize<'a>>(kind: MessageKind, payload: &'a [u8]) -> Result<T, DecodeError> {
    let (value, rest) = postcard::take_from_bytes(payload)
        .map_err(|source| DecodeError::Malformed { kind, source })?;
    if !rest.is_empty() {
        return Err(DecodeError::TrailingBytes {
            kind,
            count: rest.len(),
        });
    }
    Ok(value)
}

/// Decodes one frame body received by `role`.
fn decode_body(role: Role, body: &[u8]) -> Result<Message, DecodeError> {
    let Some((&[v0, v1, kind_byte], payload)) = body.split_first_chunk::<HEADER_LEN>() else {
        return Err(DecodeError::HeaderTooShort { len: body.len() });
    };
    let version = u16::from_be_bytes([v0, v1]);
    if !SUPPORTED_VERSIONS.contains(version) {
        return Err(DecodeError::UnsupportedVersion {
            got: version,
            supported: SUPPORTED_VERSIONS,
        });
    }
    let kind = MessageKind::from_u8(kind_byte)
        // A kind newer than the frame's version is unknown in that version.
        .filter(|k| k.since() <= version)
        .ok_or(DecodeError::UnknownKind(kind_byte))?;
    if !kind.sent_by(role.peer()) {
        return Err(DecodeError::WrongDirection { kind });
    }
    let msg = match kind {
        MessageKind::Hello => {
            let w: HelloWire<'_> = take(kind, payload)?;
            Message::Hello {
                client_id: ClientId::new(w.client_id)?,
                supported: VersionRange::new(w.min_version, w.max_version)
                    .map_err(DecodeError::InvalidVersionRange)?,
            }
        }
        MessageKind::Welcome => {
            let w: WelcomeWire = take(kind, payload)?;
            Message::Welcome {
                version: w.version,
                session_id: w.session_id,
            }
        }
        MessageKind::Migrate => {
            let w: MigrateWire<'_> = take(kind, payload)?;
            Message::Migrate {
                migration_id: MigrationId::from_bytes(w.migration_id),
                new_addr: w.new_addr.into(),
                deadline_ms: w.deadline_ms,
                token: w.token.map(|b| Token::new(b.0)).transpose()?,
            }
        }
        MessageKind::Ack | MessageKind::Quiesced | MessageKind::Resumed => {
            let w: IdWire = take(kind, payload)?;
            let migration_id = MigrationId::from_bytes(w.migration_id);
            match kind {
                MessageKind::Ack => Message::Ack { migration_id },
                MessageKind::Quiesced => Message::Quiesced { migration_id },
                _ => Message::Resumed { migration_id },
            }
        }
        MessageKind::Quiesce => {
            let w: QuiesceWire = take(kind, payload)?;
            Message::Quiesce {
                migration_id: MigrationId::from_bytes(w.migration_id),
                deadline_ms: w.deadline_ms,
            }
        }
        MessageKind::MigrateAborted => {
            let w: AbortWire = take(kind, payload)?;
            Message::MigrateAborted {
                migration_id: MigrationId::from_bytes(w.migration_id),
                fallback_addr: w.fallback_addr.into(),
            }
        }
        MessageKind::Downtime => {
            let w: DowntimeWire = take(kind, payload)?;
            Message::Downtime {
                migration_id: MigrationId::from_bytes(w.migration_id),
                downtime: ObservedDowntime::from_micros(w.downtime_us)?,
            }
        }
        MessageKind::Bye => {
            let w: ByeWire<'_> = take(kind, payload)?;
            Message::Bye {
                reason: ByeReason::new(w.reason)?,
            }
        }
    };
    Ok(msg)
}

/// Incremental decoder for one direction of the control stream.
///
/// Push bytes as they arrive and take messages out with [`ControlDecoder::next`]. The first
/// error is final: the decoder keeps returning it (and drops further input), because the
/// stream can no longer be trusted; the wrapper closes it with [`DecodeError::close_code`].
#[derive(Debug)]
pub struct ControlDecoder {
    role: Role,
    frames: FrameDecoder,
    failed: Option<DecodeError>,
}

impl ControlDecoder {
    /// A decoder for the side `role`: it accepts only what the other side may send.
    pub fn new(role: Role) -> Self {
        Self {
            role,
            frames: FrameDecoder::new(MAX_CONTROL_FRAME),
            failed: None,
        }
    }

    /// The side this decoder belongs to.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Appends bytes received on the stream. Ignored once the decoder has failed.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.failed.is_none() {
            self.frames.push(bytes);
        }
    }

    /// Bytes received but not yet returned as messages.
    pub fn buffered(&self) -> usize {
        self.frames.buffered()
    }

    /// The next complete message; `Ok(None)` when more bytes are needed.
    #[allow(clippy::should_implement_trait)] // Fallible and resumable: not an Iterator.
    pub fn next(&mut self) -> Result<Option<Message>, DecodeError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let result = match self.frames.next_frame() {
            Ok(None) => return Ok(None),
            Ok(Some(body)) => decode_body(self.role, body),
            Err(e) => Err(DecodeError::Frame(Arc::new(e))),
        };
        result
            .map(Some)
            .inspect_err(|e| self.failed = Some(e.clone()))
    }

    /// Call when the peer finished its side of the stream: an error if a message was cut off
    /// (or if the decoder had already failed).
    pub fn finish(&mut self) -> Result<(), DecodeError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        self.frames
            .finish()
            .map_err(|e| DecodeError::Frame(Arc::new(e)))
            .inspect_err(|e| self.failed = Some(e.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{Field, MAX_BYE_REASON, MAX_CLIENT_ID, MAX_DOWNTIME_US, MAX_TOKEN};
    use proptest::prelude::*;

    fn id(n: u8) -> MigrationId {
        MigrationId::from_bytes([n; 16])
    }

    fn enc(msg: &Message) -> Vec<u8> {
        let mut out = Vec::new();
        encode(msg, &mut out).unwrap();
        out
    }

    /// A frame with an arbitrary header and payload.
    fn raw(version: u16, kind: u8, payload: &[u8]) -> Vec<u8> {
        let mut body = version.to_be_bytes().to_vec();
        body.push(kind);
        body.extend_from_slice(payload);
        let mut out = Vec::new();
        frame::encode_raw(&body, usize::MAX, &mut out).unwrap();
        out
    }

    /// Decodes all of `wire` with a fresh decoder for `role`, returning the first error.
    fn decode_err(role: Role, wire: &[u8]) -> DecodeError {
        let mut d = ControlDecoder::new(role);
        d.push(wire);
        loop {
            match d.next() {
                Ok(Some(_)) => {}
                Ok(None) => return d.finish().unwrap_err(),
                Err(e) => return e,
            }
        }
    }

    fn decode_one(role: Role, wire: &[u8]) -> Message {
        let mut d = ControlDecoder::new(role);
        d.push(wire);
        let m = d.next().unwrap().unwrap();
        assert!(d.next().unwrap().is_none());
        d.finish().unwrap();
        m
    }

    fn migrate() -> Message {
        Message::Migrate {
            migration_id: MigrationId::from_bytes(*b"0123456789abcdef"),
            new_addr: "10.0.0.2:4433".parse().unwrap(),
            deadline_ms: 1500,
            token: Some(Token::new(vec![0xde, 0xad]).unwrap()),
        }
    }

    #[test]
    fn golden_hello() {
        let hello = Message::Hello {
            client_id: ClientId::new("car-7").unwrap(),
            supported: VersionRange::new(1, 1).unwrap(),
        };
        let wire = enc(&hello);
        #[rustfmt::skip]
        let expected = [
            0, 0, 0, 11,        // frame length
            0, 1,               // version 1
            1,                  // kind Hello
            5, b'c', b'a', b'r', b'-', b'7', // client_id
            1, 1,               // min, max version
        ];
        assert_eq!(wire, expected);
        assert_eq!(decode_one(Role::Server, &wire), hello);
    }

    #[test]
    fn golden_migrate() {
        let wire = enc(&migrate());
        let mut expected = vec![0, 0, 0, 32, 0, 1, 3];
        expected.extend_from_slice(b"0123456789abcdef"); // migration_id
        expected.extend_from_slice(&[0, 10, 0, 0, 2, 0xd1, 0x22]); // V4, ip, port 4433 varint
        expected.extend_from_slice(&[0xdc, 0x0b]); // deadline 1500 varint
        expected.extend_from_slice(&[1, 2, 0xde, 0xad]); // Some, len 2, bytes
        assert_eq!(wire, expected);
        assert_eq!(decode_one(Role::Client, &wire), migrate());
    }

    fn downtime(us: u64) -> Message {
        Message::Downtime {
            migration_id: MigrationId::from_bytes(*b"0123456789abcdef"),
            downtime: ObservedDowntime::from_micros(us).unwrap(),
        }
    }

    #[test]
    fn golden_downtime_is_a_version_2_frame() {
        let wire = enc(&downtime(123_456));
        let mut expected = vec![0, 0, 0, 22, 0, 2, 10]; // length, version 2, kind Downtime
        expected.extend_from_slice(b"0123456789abcdef"); // migration_id
        expected.extend_from_slice(&[0xc0, 0xc4, 0x07]); // 123456 us, varint
        assert_eq!(wire, expected);
        assert_eq!(decode_one(Role::Server, &wire), downtime(123_456));
    }

    #[test]
    fn version_1_messages_keep_their_version_1_header() {
        // What a version 1 peer reads: every kind but Downtime is written as before.
        for m in [
            migrate(),
            Message::Ack {
                migration_id: id(1),
            },
            Message::Bye {
                reason: ByeReason::new("x").unwrap(),
            },
        ] {
            assert_eq!(&enc(&m)[4..6], &[0, 1], "{m:?}");
        }
    }

    #[test]
    fn downtime_in_a_version_1_frame_is_an_unknown_kind() {
        let mut p = vec![7; 16];
        p.push(5);
        let e = decode_err(Role::Server, &raw(1, 10, &p));
        assert!(matches!(e, DecodeError::UnknownKind(10)), "{e:?}");
        assert_eq!(e.close_code(), CloseCode::ProtocolViolation);
        // The same payload in a version 2 frame is fine.
        assert!(matches!(
            decode_one(Role::Server, &raw(2, 10, &p)),
            Message::Downtime { downtime, .. } if downtime.as_micros() == 5
        ));
    }

    #[test]
    fn downtime_bad_input() {
        // Above the bound: refused as malformed, the stream is closed.
        let mut p = vec![7; 16];
        p.extend_from_slice(&postcard::to_stdvec(&(MAX_DOWNTIME_US + 1)).unwrap());
        let e = decode_err(Role::Server, &raw(2, 10, &p));
        assert!(
            matches!(e, DecodeError::DowntimeTooLong(DowntimeTooLong { micros }) if micros == MAX_DOWNTIME_US + 1),
            "{e:?}"
        );
        assert_eq!(e.close_code(), CloseCode::ProtocolViolation);
        // The bound itself is fine.
        let mut p = vec![7; 16];
        p.extend_from_slice(&postcard::to_stdvec(&MAX_DOWNTIME_US).unwrap());
        decode_one(Role::Server, &raw(2, 10, &p));
        // u64::MAX, and a varint longer than a u64 holds.
        let mut p = vec![7; 16];
        p.extend_from_slice(&postcard::to_stdvec(&u64::MAX).unwrap());
        assert!(matches!(
            decode_err(Role::Server, &raw(2, 10, &p)),
            DecodeError::DowntimeTooLong(_)
        ));
        let mut p = vec![7; 16];
        p.extend_from_slice(&[0xff; 11]);
        assert!(matches!(
            decode_err(Role::Server, &raw(2, 10, &p)),
            DecodeError::Malformed {
                kind: MessageKind::Downtime,
                ..
            }
        ));
        // Truncated: the id cut short, the value missing.
        for p in [&[7u8; 9][..], &[7u8; 16][..]] {
            let e = decode_err(Role::Server, &raw(2, 10, p));
            assert!(
                matches!(
                    e,
                    DecodeError::Malformed {
                        kind: MessageKind::Downtime,
                        source: postcard::Error::DeserializeUnexpectedEnd
                    }
                ),
                "{e:?}"
            );
        }
        // A frame cut off by the end of the stream.
        let wire = enc(&downtime(1));
        assert!(matches!(
            decode_err(Role::Server, &wire[..wire.len() - 1]),
            DecodeError::Frame(_)
        ));
        // Trailing bytes.
        let mut p = vec![7; 16];
        p.extend_from_slice(&[1, 0]);
        assert!(matches!(
            decode_err(Role::Server, &raw(2, 10, &p)),
            DecodeError::TrailingBytes {
                kind: MessageKind::Downtime,
                count: 1
            }
        ));
        // Garbage: a payload of the wrong shape.
        assert!(matches!(
            decode_err(Role::Server, &raw(2, 10, b"garbage")),
            DecodeError::Malformed {
                kind: MessageKind::Downtime,
                ..
            }
        ));
        // Wrong direction: only a client sends it.
        let e = decode_err(Role::Client, &enc(&downtime(1)));
        assert!(
            matches!(
                e,
                DecodeError::WrongDirection {
                    kind: MessageKind::Downtime
                }
            ),
            "{e:?}"
        );
        assert_eq!(e.close_code(), CloseCode::UnexpectedMessage);
    }

    #[test]
    fn several_messages_in_one_push() {
        let msgs = [
            Message::Ack {
                migration_id: id(1),
            },
            Message::Quiesced {
                migration_id: id(2),
            },
            Message::Bye {
                reason: ByeReason::new("done").unwrap(),
            },
        ];
        let mut wire = Vec::new();
        for m in &msgs {
            encode(m, &mut wire).unwrap();
        }
        let mut d = ControlDecoder::new(Role::Server);
        d.push(&wire);
        for m in &msgs {
            assert_eq!(d.next().unwrap().as_ref(), Some(m));
        }
        assert!(d.next().unwrap().is_none());
        assert_eq!(d.buffered(), 0);
        d.finish().unwrap();
    }

    #[test]
    fn ipv6_scope_and_flow_info_are_not_carried() {
        let addr = SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::LOCALHOST, 9, 7, 3));
        let msg = Message::MigrateAborted {
            migration_id: id(4),
            fallback_addr: addr,
        };
        let Message::MigrateAborted { fallback_addr, .. } = decode_one(Role::Client, &enc(&msg))
        else {
            panic!("wrong kind")
        };
        assert_eq!(
            fallback_addr,
            SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::LOCALHOST, 9, 0, 0))
        );
    }

    #[test]
    fn oversize_frame_is_the_frame_error_and_poisons() {
        let mut d = ControlDecoder::new(Role::Client);
        d.push(&((MAX_CONTROL_FRAME as u32) + 1).to_be_bytes());
        let e = d.next().unwrap_err();
        assert!(
            matches!(&e, DecodeError::Frame(f) if matches!(**f, FrameError::TooLarge { len, max: MAX_CONTROL_FRAME } if len == MAX_CONTROL_FRAME as u64 + 1)),
            "{e:?}"
        );
        assert_eq!(e.close_code(), CloseCode::FrameTooLarge);
        d.push(&enc(&migrate()));
        assert!(matches!(d.next(), Err(DecodeError::Frame(_))));
        assert!(matches!(d.finish(), Err(DecodeError::Frame(_))));
        assert_eq!(d.buffered(), 4, "input after the failure is dropped");
    }

    #[test]
    fn stream_ending_inside_a_frame_is_truncated() {
        let wire = enc(&migrate());
        let e = decode_err(Role::Client, &wire[..wire.len() - 3]);
        assert!(
            matches!(&e, DecodeError::Frame(f) if matches!(**f, FrameError::Truncated { missing: 3 })),
            "{e:?}"
        );
        assert_eq!(e.close_code(), CloseCode::ProtocolViolation);
    }

    #[test]
    fn body_shorter_than_header() {
        let mut wire = Vec::new();
        frame::encode_raw(&[0, 1], MAX_CONTROL_FRAME, &mut wire).unwrap();
        let e = decode_err(Role::Client, &wire);
        assert!(matches!(e, DecodeError::HeaderTooShort { len: 2 }), "{e:?}");
        assert_eq!(e.close_code(), CloseCode::ProtocolViolation);
        let mut empty = Vec::new();
        frame::encode_raw(&[], MAX_CONTROL_FRAME, &mut empty).unwrap();
        assert!(matches!(
            decode_err(Role::Client, &empty),
            DecodeError::HeaderTooShort { len: 0 }
        ));
    }

    #[test]
    fn unsupported_version() {
        for v in [0, 3, u16::MAX] {
            let e = decode_err(Role::Server, &raw(v, 4, &[0; 16]));
            assert!(
                matches!(e, DecodeError::UnsupportedVersion { got, supported } if got == v && supported == SUPPORTED_VERSIONS),
                "{e:?}"
            );
            assert_eq!(e.close_code(), CloseCode::UnsupportedVersion);
        }
    }

    #[test]
    fn unknown_kind() {
        for k in [0, 11, 255] {
            let e = decode_err(Role::Server, &raw(1, k, &[]));
            assert!(
                matches!(e, DecodeError::UnknownKind(got) if got == k),
                "{e:?}"
            );
            assert_eq!(e.close_code(), CloseCode::ProtocolViolation);
        }
    }

    #[test]
    fn wrong_direction_both_ways() {
        // The server's decoder refuses what only a server sends.
        let e = decode_err(Role::Server, &enc(&migrate()));
        assert!(
            matches!(
                e,
                DecodeError::WrongDirection {
                    kind: MessageKind::Migrate
                }
            ),
            "{e:?}"
        );
        assert_eq!(e.close_code(), CloseCode::UnexpectedMessage);
        // The client's decoder refuses what only a client sends.
        let ack = enc(&Message::Ack {
            migration_id: id(1),
        });
        assert!(matches!(
            decode_err(Role::Client, &ack),
            DecodeError::WrongDirection {
                kind: MessageKind::Ack
            }
        ));
        // Bye goes both ways.
        let bye = enc(&Message::Bye {
            reason: ByeReason::new("").unwrap(),
        });
        decode_one(Role::Client, &bye);
        decode_one(Role::Server, &bye);
    }

    #[test]
    fn malformed_payloads() {
        // Hello cut inside the client id.
        let e = decode_err(Role::Server, &raw(1, 1, &[5, b'a']));
        assert!(
            matches!(
                e,
                DecodeError::Malformed {
                    kind: MessageKind::Hello,
                    source: postcard::Error::DeserializeUnexpectedEnd
                }
            ),
            "{e:?}"
        );
        assert_eq!(e.close_code(), CloseCode::ProtocolViolation);
        // Client id that is not UTF-8.
        let e = decode_err(Role::Server, &raw(1, 1, &[1, 0xff, 1, 1]));
        assert!(
            matches!(
                e,
                DecodeError::Malformed {
                    kind: MessageKind::Hello,
                    source: postcard::Error::DeserializeBadUtf8
                }
            ),
            "{e:?}"
        );
        // Address family 2 does not exist.
        let mut p = vec![7; 16];
        p.extend_from_slice(&[2, 0, 0]);
        let e = decode_err(Role::Client, &raw(1, 8, &p));
        assert!(
            matches!(
                e,
                DecodeError::Malformed {
                    kind: MessageKind::MigrateAborted,
                    ..
                }
            ),
            "{e:?}"
        );
        // Option tag 2 for the token.
        let mut p = vec![7; 16];
        p.extend_from_slice(&[0, 1, 2, 3, 4, 80, 0, 2]);
        let e = decode_err(Role::Client, &raw(1, 3, &p));
        assert!(
            matches!(
                e,
                DecodeError::Malformed {
                    kind: MessageKind::Migrate,
                    ..
                }
            ),
            "{e:?}"
        );
    }

    #[test]
    fn trailing_bytes() {
        let e = decode_err(Role::Server, &raw(1, 4, &[9; 17]));
        assert!(
            matches!(
                e,
                DecodeError::TrailingBytes {
                    kind: MessageKind::Ack,
                    count: 1
                }
            ),
            "{e:?}"
        );
        assert_eq!(e.close_code(), CloseCode::ProtocolViolation);
    }

    fn postcard_str(len: usize) -> Vec<u8> {
        postcard::to_stdvec(&"x".repeat(len)).unwrap()
    }

    #[test]
    fn over_long_client_id() {
        let mut p = postcard_str(MAX_CLIENT_ID + 1);
        p.extend_from_slice(&[1, 1]);
        let e = decode_err(Role::Server, &raw(1, 1, &p));
        assert!(
            matches!(
                e,
                DecodeError::TooLong(LengthError {
                    field: Field::ClientId,
                    len: 129,
                    max: MAX_CLIENT_ID
                })
            ),
            "{e:?}"
        );
        assert_eq!(e.close_code(), CloseCode::ProtocolViolation);
    }

    #[test]
    fn over_long_token() {
        let mut p = vec![7; 16];
        p.extend_from_slice(&[0, 1, 2, 3, 4, 80, 0, 1]);
        p.extend_from_slice(&postcard_str(MAX_TOKEN + 1));
        let e = decode_err(Role::Client, &raw(1, 3, &p));
        assert!(
            matches!(
                e,
                DecodeError::TooLong(LengthError {
                    field: Field::Token,
                    len: 513,
                    max: MAX_TOKEN
                })
            ),
            "{e:?}"
        );
    }

    #[test]
    fn over_long_bye_reason() {
        let p = postcard_str(MAX_BYE_REASON + 1);
        let e = decode_err(Role::Client, &raw(1, 9, &p));
        assert!(
            matches!(
                e,
                DecodeError::TooLong(LengthError {
                    field: Field::ByeReason,
                    len: 257,
                    max: MAX_BYE_REASON
                })
            ),
            "{e:?}"
        );
    }

    #[test]
    fn hello_with_empty_version_range() {
        let e = decode_err(Role::Server, &raw(1, 1, &[0, 3, 2]));
        assert!(
            matches!(
                e,
                DecodeError::InvalidVersionRange(InvalidVersionRange { min: 3, max: 2 })
            ),
            "{e:?}"
        );
        assert_eq!(e.close_code(), CloseCode::ProtocolViolation);
    }

    #[test]
    fn error_repeats_after_failure() {
        let mut d = ControlDecoder::new(Role::Server);
        d.push(&raw(1, 77, &[]));
        d.push(&enc(&Message::Ack {
            migration_id: id(1),
        }));
        assert!(matches!(d.next(), Err(DecodeError::UnknownKind(77))));
        assert!(matches!(d.next(), Err(DecodeError::UnknownKind(77))));
        assert!(matches!(d.finish(), Err(DecodeError::UnknownKind(77))));
    }

    // ---- property tests ----

    fn arb_id() -> impl Strategy<Value = MigrationId> {
        any::<[u8; 16]>().prop_map(MigrationId::from_bytes)
    }

    fn arb_addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>())
                .prop_map(|(ip, p)| SocketAddr::V4(SocketAddrV4::new(ip.into(), p))),
            (any::<[u8; 16]>(), any::<u16>())
                .prop_map(|(ip, p)| SocketAddr::V6(SocketAddrV6::new(ip.into(), p, 0, 0))),
        ]
    }

    /// Strings of at most `max` bytes, including ones of exactly `max`.
    fn arb_str(max: usize) -> impl Strategy<Value = String> {
        prop_oneof![
            ".{0,16}".prop_map(move |s| s.chars().take(max / 4).collect()),
            Just("é".repeat(max / 2)),
        ]
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        prop_oneof![
            (arb_str(MAX_CLIENT_ID), any::<u16>(), any::<u16>()).prop_map(|(c, a, b)| {
                Message::Hello {
                    client_id: ClientId::new(c).unwrap(),
                    supported: VersionRange::new(a.min(b), a.max(b)).unwrap(),
                }
            }),
            (any::<u16>(), any::<u64>()).prop_map(|(version, session_id)| Message::Welcome {
                version,
                session_id
            }),
            (
                arb_id(),
                arb_addr(),
                any::<u32>(),
                proptest::option::of(proptest::collection::vec(any::<u8>(), 0..=MAX_TOKEN))
            )
                .prop_map(|(migration_id, new_addr, deadline_ms, token)| {
                    Message::Migrate {
                        migration_id,
                        new_addr,
                        deadline_ms,
                        token: token.map(|t| Token::new(t).unwrap()),
                    }
                }),
            arb_id().prop_map(|migration_id| Message::Ack { migration_id }),
            (arb_id(), any::<u32>()).prop_map(|(migration_id, deadline_ms)| Message::Quiesce {
                migration_id,
                deadline_ms
            }),
            arb_id().prop_map(|migration_id| Message::Quiesced { migration_id }),
            arb_id().prop_map(|migration_id| Message::Resumed { migration_id }),
            (arb_id(), arb_addr()).prop_map(|(migration_id, fallback_addr)| {
                Message::MigrateAborted {
                    migration_id,
                    fallback_addr,
                }
            }),
            arb_str(MAX_BYE_REASON).prop_map(|r| Message::Bye {
                reason: ByeReason::new(r).unwrap()
            }),
            (
                arb_id(),
                prop_oneof![0..=MAX_DOWNTIME_US, Just(MAX_DOWNTIME_US)]
            )
                .prop_map(|(migration_id, us)| Message::Downtime {
                    migration_id,
                    downtime: ObservedDowntime::from_micros(us).unwrap(),
                }),
        ]
    }

    proptest! {
        #[test]
        fn round_trip_with_random_splits(
            msgs in proptest::collection::vec(arb_message(), 0..12),
            splits in proptest::collection::vec(1usize..40, 1..8),
        ) {
            for role in [Role::Client, Role::Server] {
                let sent: Vec<&Message> =
                    msgs.iter().filter(|m| m.kind().sent_by(role.peer())).collect();
                let mut wire = Vec::new();
                for m in &sent {
                    encode(m, &mut wire).unwrap();
                }
                let mut d = ControlDecoder::new(role);
                let mut got = Vec::new();
                let mut rest = &wire[..];
                let mut i = 0;
                while !rest.is_empty() {
                    let n = splits[i % splits.len()].min(rest.len());
                    i += 1;
                    d.push(&rest[..n]);
                    rest = &rest[n..];
                    while let Some(m) = d.next().unwrap() {
                        got.push(m);
                    }
                }
                d.finish().unwrap();
                prop_assert_eq!(got.len(), sent.len());
                for (g, s) in got.iter().zip(&sent) {
                    prop_assert_eq!(g, *s);
                }
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            for role in [Role::Client, Role::Server] {
                let mut d = ControlDecoder::new(role);
                d.push(&bytes);
                for _ in 0..=bytes.len() {
                    match d.next() {
                        Ok(Some(_)) => {}
                        Ok(None) => { let _ = d.finish(); break; }
                        Err(e) => {
                            // Failed for good, with a code to close with.
                            let _ = e.close_code();
                            prop_assert!(d.next().is_err());
                            break;
                        }
                    }
                }
            }
        }

        /// Valid header, random kind and payload: reaches the payload decoders.
        #[test]
        fn arbitrary_payloads_never_panic(
            kind in 1u8..=10,
            version in 1u16..=PROTOCOL_VERSION,
            payload in proptest::collection::vec(any::<u8>(), 0..600),
        ) {
            let wire = raw(version, kind, &payload);
            for role in [Role::Client, Role::Server] {
                let mut d = ControlDecoder::new(role);
                d.push(&wire);
                match d.next() {
                    Ok(Some(m)) => {
                        prop_assert_eq!(m.kind().as_u8(), kind);
                        prop_assert!(m.kind().sent_by(role.peer()));
                        prop_assert!(m.kind().since() <= version);
                    }
                    Ok(None) => prop_assert!(false, "a whole frame was pushed"),
                    Err(_) => {}
                }
            }
        }
    }
}
