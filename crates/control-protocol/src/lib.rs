//! The control stream between the server wrapper and the client wrapper, without I/O.
//!
//! ```text
//!  sender                                             receiver
//!  Message ──encode()──► bytes ══ first bidi QUIC stream ══► ControlDecoder::push()
//!                                                            ControlDecoder::next()
//!                                                              ├─► Ok(Some(Message))
//!                                                              └─► Err(DecodeError)
//!                                                                   └─close_code()─► reset/stop
//!  client:  Message ──ClientControl::on_message()──► ClientEvent  (+ answers in `out`)
//!           app's pause ──ClientControl::report_downtime()──► Downtime in `out` (version 2)
//!  server:  bytes + now ──ServerControl::on_bytes()──► (a ControlDecoder per session)
//!           operator + now ──announce / abort / resumed / quiesce──┐
//!           timer ──handle_timeout(now)   poll_timeout() ◄────────┤
//!           poll_output() ──► Transmit{session, bytes} | Close{session, CloseCode}
//!                            | Finish{session} | Event(ServerEvent: registered, round reports,
//!                                                        DowntimeReported)
//! ```
//!
//! The control stream is the first bidirectional stream of every QUIC connection between the
//! client wrapper (cwrapper) and the server wrapper (swrapper, inside the process that is
//! checkpointed and restored elsewhere). On it the server announces a migration (`Migrate`,
//! optionally preceded by `Quiesce`), the client swaps its real UDP peer and acknowledges
//! (`Ack`), and the server says `Resumed` once it runs again, or `MigrateAborted` to send the
//! client back; afterwards the client reports the pause it observed (`Downtime`, version 2).
//! See [`Message`] for the sequences.
//!
//! Each message is one [`wire_frame`] frame whose body is
//! `version: u16 BE | kind: u8 | postcard payload`. This crate only turns messages into bytes
//! and back: the wrappers own the streams, the clock and the sockets.
//!
//! Every decoded message has been checked: a supported version, a known kind, the right
//! direction for the decoding side, a payload with no bytes left over, and strings and tokens
//! within their bounds. Nothing here panics on input; every failure is a typed error that maps
//! to a QUIC application error code ([`CloseCode`]).
//!
//! Both ends have a sans-I/O state machine: [`ClientControl`] for the client wrapper, fed
//! decoded messages, and [`ServerControl`] for the server wrapper, which owns every session
//! (a decoder per connection, the [`migration_core::SessionRegistry`], the rounds of a
//! migration and their deadlines) and is fed raw bytes and time. Neither reads a clock:
//! time is a [`migration_core::Timestamp`] passed in, so both are tested in virtual time.
//!
//! Which connections have a control stream at all is told by the ALPN ([`alpn::with_control`],
//! [`alpn::split`]): a wrapper-aware client offers the marked form `qlm1+<app ALPN>`, and the
//! server's list puts the marked forms first, so a plain QUIC client negotiates the plain form
//! and is served as a *plain session* ([`ServerControl::on_connect_plain`]): it takes a slot,
//! is never told of a move, and is listed as `cannot_follow` in a round's report.

pub mod alpn;
mod client;
mod close;
mod codec;
mod message;
mod server;
mod types;

pub use alpn::{AlpnError, Negotiated};
pub use client::{ClientControl, ClientError, ClientEvent, ClientState, DowntimeRefused};
pub use close::{CloseCode, UnknownCloseCode};
pub use codec::{
    ControlDecoder, DecodeError, EncodeError, MAX_CONTROL_FRAME, PROTOCOL_VERSION,
    SUPPORTED_VERSIONS, encode,
};
pub use message::{Message, MessageKind};
pub use server::{
    CloseCause, Ignored, Refusal, RoundKind, RoundReport, ServerConfig, ServerControl, ServerError,
    ServerEvent, ServerOutput, SessionView,
};
pub use types::{
    ByeReason, ClientId, DowntimeTooLong, Field, InvalidVersionRange, LengthError, MAX_BYE_REASON,
    MAX_CLIENT_ID, MAX_DOWNTIME_US, MAX_TOKEN, MigrationId, ObservedDowntime, Role, Token,
    VersionRange,
};
