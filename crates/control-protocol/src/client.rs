//! The client wrapper's side of the control flow, without I/O.
//!
//! ```text
//!  AwaitingWelcome ──Welcome──► Idle ──Quiesce──► Quiescing ──quiesced()──► Quiesced
//!                                 │                                          │
//!                                 └────────────Migrate───────► Swapping ◄─Migrate
//!                                                                │ swapped()
//!                               Idle ◄──────Resumed──────────  Swapped
//!  any migration step ──MigrateAborted──► SwappingBack ──swapped()──► Idle
//!  any state ──Bye──► Closed
//!  a finished migration (Resumed, or aborted and swapped back), version 2 sessions:
//!    report_downtime(id, pause) ──► Downtime{id, pause}, once per migration
//! ```
//!
//! A repeated message for a step already taken is answered again (the `Ack` or `Quiesced` is
//! re-sent) but reported as [`ClientEvent::Repeated`], so the wrapper never swaps twice.
//!
//! [`ClientControl::report_downtime`] is the application's word, not the server's: a refusal
//! ([`DowntimeRefused`]) sends nothing and leaves the session as it was, so the wrapper never
//! closes the stream over it.

use std::collections::VecDeque;
use std::fmt;
use std::net::SocketAddr;

use crate::close::CloseCode;
use crate::codec::{EncodeError, encode};
use crate::message::{Message, MessageKind};
use crate::types::{ByeReason, ClientId, MigrationId, ObservedDowntime, Token, VersionRange};

/// How many finished migrations are remembered to recognise a late repeat (and to report
/// their downtime).
const REMEMBERED: usize = 8;

/// Where the client stands; named in [`ClientError`]s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClientState {
    /// `Hello` sent, no `Welcome` yet.
    AwaitingWelcome,
    /// Welcomed, no migration under way.
    Idle,
    /// Told to quiesce; application data must stop and drain.
    Quiescing,
    /// `Quiesced` sent; waiting for `Migrate`.
    Quiesced,
    /// Told to migrate; the wrapper is swapping its peer.
    Swapping,
    /// Peer swapped and `Ack` sent; waiting for `Resumed`.
    Swapped,
    /// Told the migration was aborted; the wrapper is swapping back.
    SwappingBack,
    /// `Bye` sent or received.
    Closed,
}

impl fmt::Display for ClientState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// What the wrapper must do after a message from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClientEvent {
    /// The session is set up.
    Welcomed {
        /// The version the server chose.
        version: u16,
        /// The server's session id.
        session_id: u64,
    },
    /// Stop sending application data; once in-flight data is drained call
    /// [`ClientControl::quiesced`].
    Quiesce {
        /// The migration being prepared.
        migration_id: MigrationId,
        /// The server's patience, in milliseconds from now.
        deadline_ms: u32,
    },
    /// Swap the real UDP peer to `new_addr`, then call [`ClientControl::swapped`] (which sends
    /// the `Ack`).
    SwapPeer {
        /// The migration.
        migration_id: MigrationId,
        /// The server's next address.
        new_addr: SocketAddr,
        /// The server's patience for the `Ack`, in milliseconds from now.
        deadline_ms: u32,
        /// Opaque bytes from the server, if any.
        token: Option<Token>,
    },
    /// The migration failed: swap the peer back to `fallback_addr`, resume application data,
    /// then call [`ClientControl::swapped`].
    SwapBack {
        /// The migration rolled back.
        migration_id: MigrationId,
        /// The server's address again.
        fallback_addr: SocketAddr,
    },
    /// The server runs again at its new address: application data may flow.
    Resumed {
        /// The migration that completed.
        migration_id: MigrationId,
    },
    /// The server is closing the control stream.
    Bye {
        /// Why.
        reason: ByeReason,
    },
    /// A repeat of a message already handled; any answer was re-sent into `out`. Do nothing.
    Repeated {
        /// The kind repeated.
        kind: MessageKind,
        /// The migration it names.
        migration_id: MigrationId,
    },
}

/// Errors of [`ClientControl`]. The wrapper closes the stream with [`ClientError::close_code`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// A message that is not valid in the current state.
    #[error("unexpected {kind} (migration {migration_id:?}) in state {state}")]
    Unexpected {
        /// The state when it arrived.
        state: ClientState,
        /// The kind received.
        kind: MessageKind,
        /// The migration it named, if any.
        migration_id: Option<MigrationId>,
    },
    /// The server chose a version the client did not offer.
    #[error("server chose version {got}, outside the offered {supported}")]
    UnsupportedVersion {
        /// The version in the `Welcome`.
        got: u16,
        /// What the client offered.
        supported: VersionRange,
    },
    /// [`ClientControl::quiesced`] or [`ClientControl::swapped`] was called for a step that is
    /// not pending (a bug in the wrapper).
    #[error("nothing to confirm for migration {migration_id} in state {state}")]
    NothingToConfirm {
        /// The state at the call.
        state: ClientState,
        /// The migration named in the call.
        migration_id: MigrationId,
    },
    /// The answer could not be encoded.
    #[error(transparent)]
    Encode(#[from] EncodeError),
}

/// Why [`ClientControl::report_downtime`] sent nothing. None of these is a reason to close
/// the control stream.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DowntimeRefused {
    /// The server chose a version without `Downtime` (a version 1 server would close the
    /// stream over it).
    #[error("the session's control protocol version ({version:?}) has no downtime report")]
    NotNegotiated {
        /// The version the server chose (`None` before its `Welcome`).
        version: Option<u16>,
    },
    /// The migration is not over for this client (still under way), never happened, or is
    /// too old to be remembered.
    #[error("migration {migration_id} is not a finished migration of this session")]
    NotFinished {
        /// The migration named.
        migration_id: MigrationId,
    },
    /// This migration's downtime was reported already (at most once per migration).
    #[error("the downtime of migration {migration_id} was reported already")]
    AlreadyReported {
        /// The migration named.
        migration_id: MigrationId,
    },
    /// The control stream is closed.
    #[error("the control stream is closed")]
    Closed,
    /// The report could not be encoded.
    #[error(transparent)]
    Encode(#[from] EncodeError),
}

impl ClientError {
    /// The QUIC application error code to close the control stream with.
    pub fn close_code(&self) -> CloseCode {
        match self {
            ClientError::Unexpected { .. } => CloseCode::UnexpectedMessage,
            ClientError::UnsupportedVersion { .. } => CloseCode::UnsupportedVersion,
            ClientError::NothingToConfirm { .. } | ClientError::Encode(_) => CloseCode::Internal,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Quiescing,
    Quiesced,
    Swapping,
    Swapped,
    SwappingBack,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Resumed,
    Aborted,
}

/// A migration that is over for this client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Finished {
    id: MigrationId,
    outcome: Outcome,
    /// Its downtime was reported.
    reported: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AwaitingWelcome,
    Ready,
    Closed,
}

/// The client's control-stream state machine: feed it decoded server messages, send what it
/// appends to `out` on the control stream.
///
/// It does not poison itself on error; the wrapper is expected to close the stream.
#[derive(Debug)]
pub struct ClientControl {
    supported: VersionRange,
    phase: Phase,
    session: Option<(u16, u64)>,
    current: Option<(MigrationId, Step)>,
    finished: VecDeque<Finished>,
}

impl ClientControl {
    /// Starts a session: appends the `Hello` to `out`.
    pub fn new(
        client_id: ClientId,
        supported: VersionRange,
        out: &mut Vec<u8>,
    ) -> Result<Self, EncodeError> {
        encode(
            &Message::Hello {
                client_id,
                supported,
            },
            out,
        )?;
        Ok(Self {
            supported,
            phase: Phase::AwaitingWelcome,
            session: None,
            current: None,
            finished: VecDeque::new(),
        })
    }

    /// The current state.
    pub fn state(&self) -> ClientState {
        match (self.phase, self.current) {
            (Phase::AwaitingWelcome, _) => ClientState::AwaitingWelcome,
            (Phase::Closed, _) => ClientState::Closed,
            (Phase::Ready, None) => ClientState::Idle,
            (Phase::Ready, Some((_, step))) => match step {
                Step::Quiescing => ClientState::Quiescing,
                Step::Quiesced => ClientState::Quiesced,
                Step::Swapping => ClientState::Swapping,
                Step::Swapped => ClientState::Swapped,
                Step::SwappingBack => ClientState::SwappingBack,
            },
        }
    }

    /// The negotiated version and the server's session id, once welcomed.
    pub fn session(&self) -> Option<(u16, u64)> {
        self.session
    }

    fn outcome(&self, id: MigrationId) -> Option<Outcome> {
        self.finished.iter().find(|f| f.id == id).map(|f| f.outcome)
    }

    fn finish(&mut self, id: MigrationId, outcome: Outcome) {
        self.current = None;
        if self.finished.len() == REMEMBERED {
            self.finished.pop_front();
        }
        self.finished.push_back(Finished {
            id,
            outcome,
            reported: false,
        });
    }

    fn unexpected(&self, msg: &Message) -> ClientError {
        ClientError::Unexpected {
            state: self.state(),
            kind: msg.kind(),
            migration_id: msg.migration_id(),
        }
    }

    /// Handles one message from the server, appending any answer to `out`.
    pub fn on_message(
        &mut self,
        msg: Message,
        out: &mut Vec<u8>,
    ) -> Result<ClientEvent, ClientError> {
        let repeated = |kind, migration_id| ClientEvent::Repeated { kind, migration_id };
        match self.phase {
            Phase::Closed => return Err(self.unexpected(&msg)),
            Phase::AwaitingWelcome => {
                return match msg {
                    Message::Welcome {
                        version,
                        session_id,
                    } => {
                        if !self.supported.contains(version) {
                            return Err(ClientError::UnsupportedVersion {
                                got: version,
                                supported: self.supported,
                            });
                        }
                        self.phase = Phase::Ready;
                        self.session = Some((version, session_id));
                        Ok(ClientEvent::Welcomed {
                            version,
                            session_id,
                        })
                    }
                    Message::Bye { reason } => {
                        self.phase = Phase::Closed;
                        Ok(ClientEvent::Bye { reason })
                    }
                    _ => Err(self.unexpected(&msg)),
                };
            }
            Phase::Ready => {}
        }
        let cur = self.current;
        let same = |id: MigrationId| cur.filter(|(c, _)| *c == id).map(|(_, s)| s);
        match msg {
            Message::Quiesce {
                migration_id: id,
                deadline_ms,
            } => match (cur, same(id)) {
                (None, _) if self.outcome(id).is_none() => {
                    self.current = Some((id, Step::Quiescing));
                    Ok(ClientEvent::Quiesce {
                        migration_id: id,
                        deadline_ms,
                    })
                }
                (_, Some(Step::Quiescing)) => Ok(repeated(MessageKind::Quiesce, id)),
                (_, Some(Step::Quiesced)) => {
                    encode(&Message::Quiesced { migration_id: id }, out)?;
                    Ok(repeated(MessageKind::Quiesce, id))
                }
                // As for `Migrate`: a new migration ends one that still awaited `Resumed`.
                (Some((old, Step::Swapped)), None) if self.outcome(id).is_none() => {
                    self.finish(old, Outcome::Resumed);
                    self.current = Some((id, Step::Quiescing));
                    Ok(ClientEvent::Quiesce {
                        migration_id: id,
                        deadline_ms,
                    })
                }
                _ => Err(self.unexpected(&msg)),
            },
            Message::Migrate {
                migration_id: id,
                new_addr,
                deadline_ms,
                ref token,
            } => match (cur, same(id)) {
                // A late repeat of a finished migration, whatever is under way now.
                (_, None) if self.outcome(id) == Some(Outcome::Resumed) => {
                    encode(&Message::Ack { migration_id: id }, out)?;
                    Ok(repeated(MessageKind::Migrate, id))
                }
                (None, _) if self.outcome(id).is_none() => {
                    self.start_swap(id, new_addr, deadline_ms, token)
                }
                (_, Some(Step::Quiescing | Step::Quiesced)) => {
                    self.start_swap(id, new_addr, deadline_ms, token)
                }
                (_, Some(Step::Swapping)) => Ok(repeated(MessageKind::Migrate, id)),
                (_, Some(Step::Swapped)) => {
                    encode(&Message::Ack { migration_id: id }, out)?;
                    Ok(repeated(MessageKind::Migrate, id))
                }
                // A new migration while the previous one awaits `Resumed`: the server evidently
                // runs (it is sending), so the previous one is over; `Resumed` may have been
                // skipped by an orchestrator that renewed the socket without it.
                (Some((old, Step::Swapped)), None) if self.outcome(id).is_none() => {
                    self.finish(old, Outcome::Resumed);
                    self.start_swap(id, new_addr, deadline_ms, token)
                }
                _ => Err(self.unexpected(&msg)),
            },
            Message::MigrateAborted {
                migration_id: id,
                fallback_addr,
            } => match (cur, same(id)) {
                (_, Some(Step::SwappingBack)) => Ok(repeated(MessageKind::MigrateAborted, id)),
                (_, Some(_)) => {
                    self.current = Some((id, Step::SwappingBack));
                    Ok(ClientEvent::SwapBack {
                        migration_id: id,
                        fallback_addr,
                    })
                }
                (None, _) if self.outcome(id) == Some(Outcome::Aborted) => {
                    encode(&Message::Ack { migration_id: id }, out)?;
                    Ok(repeated(MessageKind::MigrateAborted, id))
                }
                _ => Err(self.unexpected(&msg)),
            },
            Message::Resumed { migration_id: id } => match (cur, same(id)) {
                (_, Some(Step::Swapped)) => {
                    self.finish(id, Outcome::Resumed);
                    Ok(ClientEvent::Resumed { migration_id: id })
                }
                (None, _) if self.outcome(id) == Some(Outcome::Resumed) => {
                    Ok(repeated(MessageKind::Resumed, id))
                }
                _ => Err(self.unexpected(&msg)),
            },
            Message::Bye { reason } => {
                self.phase = Phase::Closed;
                Ok(ClientEvent::Bye { reason })
            }
            Message::Hello { .. }
            | Message::Welcome { .. }
            | Message::Ack { .. }
            | Message::Quiesced { .. }
            | Message::Downtime { .. } => Err(self.unexpected(&msg)),
        }
    }

    fn start_swap(
        &mut self,
        id: MigrationId,
        new_addr: SocketAddr,
        deadline_ms: u32,
        token: &Option<Token>,
    ) -> Result<ClientEvent, ClientError> {
        self.current = Some((id, Step::Swapping));
        Ok(ClientEvent::SwapPeer {
            migration_id: id,
            new_addr,
            deadline_ms,
            token: token.clone(),
        })
    }

    fn nothing(&self, migration_id: MigrationId) -> ClientError {
        ClientError::NothingToConfirm {
            state: self.state(),
            migration_id,
        }
    }

    /// Application data is stopped and drained: appends `Quiesced` to `out`.
    pub fn quiesced(
        &mut self,
        migration_id: MigrationId,
        out: &mut Vec<u8>,
    ) -> Result<(), ClientError> {
        if self.phase != Phase::Ready || self.current != Some((migration_id, Step::Quiescing)) {
            return Err(self.nothing(migration_id));
        }
        encode(&Message::Quiesced { migration_id }, out)?;
        self.current = Some((migration_id, Step::Quiesced));
        Ok(())
    }

    /// The peer swap asked for by [`ClientEvent::SwapPeer`] or [`ClientEvent::SwapBack`] is
    /// done: appends the `Ack` to `out`.
    pub fn swapped(
        &mut self,
        migration_id: MigrationId,
        out: &mut Vec<u8>,
    ) -> Result<(), ClientError> {
        let step = match self.current {
            Some((id, step)) if id == migration_id && self.phase == Phase::Ready => step,
            _ => return Err(self.nothing(migration_id)),
        };
        match step {
            Step::Swapping => {
                encode(&Message::Ack { migration_id }, out)?;
                self.current = Some((migration_id, Step::Swapped));
            }
            Step::SwappingBack => {
                encode(&Message::Ack { migration_id }, out)?;
                self.finish(migration_id, Outcome::Aborted);
            }
            Step::Quiescing | Step::Quiesced | Step::Swapped => {
                return Err(self.nothing(migration_id));
            }
        }
        Ok(())
    }

    /// The pause this client observed across `migration_id` (its last reply before the move
    /// to its first reply after it): appends `Downtime` to `out`. Allowed once per migration,
    /// once it is over for this client (`Resumed`, or the swap back of an abort confirmed with
    /// [`ClientControl::swapped`]), in a session whose server chose version 2 or later.
    ///
    /// # Errors
    /// [`DowntimeRefused`]; nothing is sent and nothing changes.
    pub fn report_downtime(
        &mut self,
        migration_id: MigrationId,
        downtime: ObservedDowntime,
        out: &mut Vec<u8>,
    ) -> Result<(), DowntimeRefused> {
        match self.phase {
            Phase::Closed => return Err(DowntimeRefused::Closed),
            Phase::AwaitingWelcome => {
                return Err(DowntimeRefused::NotNegotiated { version: None });
            }
            Phase::Ready => {}
        }
        let version = self.session.map(|(v, _)| v);
        if version.is_none_or(|v| v < MessageKind::Downtime.since()) {
            return Err(DowntimeRefused::NotNegotiated { version });
        }
        let Some(f) = self.finished.iter_mut().find(|f| f.id == migration_id) else {
            return Err(DowntimeRefused::NotFinished { migration_id });
        };
        if f.reported {
            return Err(DowntimeRefused::AlreadyReported { migration_id });
        }
        encode(
            &Message::Downtime {
                migration_id,
                downtime,
            },
            out,
        )?;
        f.reported = true;
        Ok(())
    }

    /// Closes the session from the client's side: appends `Bye` to `out`.
    pub fn bye(&mut self, reason: ByeReason, out: &mut Vec<u8>) -> Result<(), ClientError> {
        encode(&Message::Bye { reason }, out)?;
        self.phase = Phase::Closed;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{ControlDecoder, SUPPORTED_VERSIONS};
    use crate::types::Role;
    use proptest::prelude::*;

    const ID: MigrationId = MigrationId::from_bytes([1; 16]);
    const OTHER: MigrationId = MigrationId::from_bytes([2; 16]);

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    /// What the server would read from `out` (which is drained).
    fn sent(out: &mut Vec<u8>) -> Vec<Message> {
        let mut d = ControlDecoder::new(Role::Server);
        d.push(out);
        out.clear();
        let mut msgs = Vec::new();
        while let Some(m) = d.next().unwrap() {
            msgs.push(m);
        }
        d.finish().unwrap();
        msgs
    }

    fn welcomed(out: &mut Vec<u8>) -> ClientControl {
        welcomed_with(out, 1)
    }

    /// A session whose server chose `version`.
    fn welcomed_with(out: &mut Vec<u8>, version: u16) -> ClientControl {
        let mut c =
            ClientControl::new(ClientId::new("car").unwrap(), SUPPORTED_VERSIONS, out).unwrap();
        assert!(matches!(&sent(out)[..], [Message::Hello { .. }]));
        let ev = c
            .on_message(
                Message::Welcome {
                    version,
                    session_id: 42,
                },
                out,
            )
            .unwrap();
        assert_eq!(
            ev,
            ClientEvent::Welcomed {
                version,
                session_id: 42
            }
        );
        assert_eq!(c.session(), Some((version, 42)));
        assert_eq!(c.state(), ClientState::Idle);
        c
    }

    fn pause(ms: u64) -> ObservedDowntime {
        ObservedDowntime::new(std::time::Duration::from_millis(ms)).unwrap()
    }

    #[test]
    fn downtime_once_a_migration_is_resumed_and_only_once() {
        let mut out = Vec::new();
        let mut c = welcomed_with(&mut out, 2);
        // Nothing happened yet.
        assert!(matches!(
            c.report_downtime(ID, pause(5), &mut out),
            Err(DowntimeRefused::NotFinished { migration_id: ID })
        ));
        c.on_message(migrate(ID), &mut out).unwrap();
        c.swapped(ID, &mut out).unwrap();
        sent(&mut out);
        // Still under way: the server has not said Resumed.
        assert!(matches!(
            c.report_downtime(ID, pause(5), &mut out),
            Err(DowntimeRefused::NotFinished { .. })
        ));
        assert!(out.is_empty());
        c.on_message(Message::Resumed { migration_id: ID }, &mut out)
            .unwrap();
        c.report_downtime(ID, pause(42), &mut out).unwrap();
        assert_eq!(
            sent(&mut out),
            [Message::Downtime {
                migration_id: ID,
                downtime: pause(42)
            }]
        );
        assert!(matches!(
            c.report_downtime(ID, pause(43), &mut out),
            Err(DowntimeRefused::AlreadyReported { migration_id: ID })
        ));
        // Another migration, never seen.
        assert!(matches!(
            c.report_downtime(OTHER, pause(1), &mut out),
            Err(DowntimeRefused::NotFinished {
                migration_id: OTHER
            })
        ));
        assert!(out.is_empty(), "a refusal sends nothing");
        assert_eq!(c.state(), ClientState::Idle, "and changes nothing");
    }

    #[test]
    fn downtime_of_an_aborted_migration_after_the_swap_back() {
        let mut out = Vec::new();
        let mut c = welcomed_with(&mut out, 2);
        c.on_message(migrate(ID), &mut out).unwrap();
        c.swapped(ID, &mut out).unwrap();
        c.on_message(
            Message::MigrateAborted {
                migration_id: ID,
                fallback_addr: addr(1),
            },
            &mut out,
        )
        .unwrap();
        sent(&mut out);
        assert!(matches!(
            c.report_downtime(ID, pause(5), &mut out),
            Err(DowntimeRefused::NotFinished { .. })
        ));
        c.swapped(ID, &mut out).unwrap();
        sent(&mut out);
        c.report_downtime(ID, pause(7), &mut out).unwrap();
        assert!(matches!(&sent(&mut out)[..], [Message::Downtime { .. }]));
        // A migration that ended because the next one started counts as resumed.
        c.on_message(migrate(OTHER), &mut out).unwrap();
        c.swapped(OTHER, &mut out).unwrap();
        let third = MigrationId::from_bytes([3; 16]);
        c.on_message(migrate(third), &mut out).unwrap();
        sent(&mut out);
        c.report_downtime(OTHER, pause(9), &mut out).unwrap();
        assert!(matches!(&sent(&mut out)[..], [Message::Downtime { .. }]));
    }

    #[test]
    fn downtime_needs_a_version_2_session() {
        let mut out = Vec::new();
        let mut c =
            ClientControl::new(ClientId::new("c").unwrap(), SUPPORTED_VERSIONS, &mut out).unwrap();
        sent(&mut out);
        assert!(matches!(
            c.report_downtime(ID, pause(1), &mut out),
            Err(DowntimeRefused::NotNegotiated { version: None })
        ));
        // A version 1 server: the report would close its stream, so it is never sent.
        let mut c = welcomed_with(&mut out, 1);
        c.on_message(migrate(ID), &mut out).unwrap();
        c.swapped(ID, &mut out).unwrap();
        c.on_message(Message::Resumed { migration_id: ID }, &mut out)
            .unwrap();
        sent(&mut out);
        assert!(matches!(
            c.report_downtime(ID, pause(1), &mut out),
            Err(DowntimeRefused::NotNegotiated { version: Some(1) })
        ));
        assert!(out.is_empty());
        // Closed.
        let mut c = welcomed_with(&mut out, 2);
        c.bye(ByeReason::new("done").unwrap(), &mut out).unwrap();
        sent(&mut out);
        assert!(matches!(
            c.report_downtime(ID, pause(1), &mut out),
            Err(DowntimeRefused::Closed)
        ));
        // A server never sends one.
        let mut c = welcomed_with(&mut out, 2);
        assert!(matches!(
            c.on_message(
                Message::Downtime {
                    migration_id: ID,
                    downtime: pause(1)
                },
                &mut out
            ),
            Err(ClientError::Unexpected {
                kind: MessageKind::Downtime,
                ..
            })
        ));
    }

    fn migrate(id: MigrationId) -> Message {
        Message::Migrate {
            migration_id: id,
            new_addr: addr(2),
            deadline_ms: 100,
            token: None,
        }
    }

    fn ack(id: MigrationId) -> Message {
        Message::Ack { migration_id: id }
    }

    #[test]
    fn two_phase_migration() {
        let mut out = Vec::new();
        let mut c = welcomed(&mut out);
        let q = Message::Quiesce {
            migration_id: ID,
            deadline_ms: 50,
        };
        assert_eq!(
            c.on_message(q.clone(), &mut out).unwrap(),
            ClientEvent::Quiesce {
                migration_id: ID,
                deadline_ms: 50
            }
        );
        // Repeated before quiesced(): nothing to re-send yet.
        assert_eq!(
            c.on_message(q.clone(), &mut out).unwrap(),
            ClientEvent::Repeated {
                kind: MessageKind::Quiesce,
                migration_id: ID
            }
        );
        assert!(out.is_empty());
        c.quiesced(ID, &mut out).unwrap();
        assert_eq!(sent(&mut out), [Message::Quiesced { migration_id: ID }]);
        assert_eq!(c.state(), ClientState::Quiesced);
        // Repeated after quiesced(): the answer is re-sent.
        c.on_message(q, &mut out).unwrap();
        assert_eq!(sent(&mut out), [Message::Quiesced { migration_id: ID }]);

        assert!(matches!(
            c.on_message(migrate(ID), &mut out).unwrap(),
            ClientEvent::SwapPeer { migration_id: ID, new_addr, .. } if new_addr == addr(2)
        ));
        assert!(out.is_empty(), "no ack before the swap is done");
        c.swapped(ID, &mut out).unwrap();
        assert_eq!(sent(&mut out), [ack(ID)]);
        assert_eq!(c.state(), ClientState::Swapped);
        assert_eq!(
            c.on_message(Message::Resumed { migration_id: ID }, &mut out)
                .unwrap(),
            ClientEvent::Resumed { migration_id: ID }
        );
        assert_eq!(c.state(), ClientState::Idle);
        // A late repeat of Resumed is harmless.
        assert!(matches!(
            c.on_message(Message::Resumed { migration_id: ID }, &mut out),
            Ok(ClientEvent::Repeated {
                kind: MessageKind::Resumed,
                ..
            })
        ));
    }

    #[test]
    fn repeated_migrate_resends_the_ack_but_does_not_swap_again() {
        let mut out = Vec::new();
        let mut c = welcomed(&mut out);
        assert!(matches!(
            c.on_message(migrate(ID), &mut out).unwrap(),
            ClientEvent::SwapPeer { .. }
        ));
        // Before swapped(): a repeat is ignored, the ack comes with swapped().
        assert!(matches!(
            c.on_message(migrate(ID), &mut out).unwrap(),
            ClientEvent::Repeated { .. }
        ));
        assert!(out.is_empty());
        c.swapped(ID, &mut out).unwrap();
        assert_eq!(sent(&mut out), [ack(ID)]);
        // After: the ack is re-sent.
        assert_eq!(
            c.on_message(migrate(ID), &mut out).unwrap(),
            ClientEvent::Repeated {
                kind: MessageKind::Migrate,
                migration_id: ID
            }
        );
        assert_eq!(sent(&mut out), [ack(ID)]);
        // Even after Resumed.
        c.on_message(Message::Resumed { migration_id: ID }, &mut out)
            .unwrap();
        assert!(matches!(
            c.on_message(migrate(ID), &mut out).unwrap(),
            ClientEvent::Repeated { .. }
        ));
        assert_eq!(sent(&mut out), [ack(ID)]);
        // A new migration starts normally.
        assert!(matches!(
            c.on_message(migrate(OTHER), &mut out).unwrap(),
            ClientEvent::SwapPeer {
                migration_id: OTHER,
                ..
            }
        ));
    }

    #[test]
    fn aborted_migration_swaps_back_and_acks() {
        let mut out = Vec::new();
        let mut c = welcomed(&mut out);
        c.on_message(migrate(ID), &mut out).unwrap();
        c.swapped(ID, &mut out).unwrap();
        sent(&mut out);
        let abort = Message::MigrateAborted {
            migration_id: ID,
            fallback_addr: addr(1),
        };
        assert_eq!(
            c.on_message(abort.clone(), &mut out).unwrap(),
            ClientEvent::SwapBack {
                migration_id: ID,
                fallback_addr: addr(1)
            }
        );
        assert_eq!(c.state(), ClientState::SwappingBack);
        assert!(matches!(
            c.on_message(abort.clone(), &mut out).unwrap(),
            ClientEvent::Repeated { .. }
        ));
        assert!(out.is_empty());
        c.swapped(ID, &mut out).unwrap();
        assert_eq!(sent(&mut out), [ack(ID)]);
        assert_eq!(c.state(), ClientState::Idle);
        // Repeat after the abort finished: ack re-sent.
        assert!(matches!(
            c.on_message(abort, &mut out).unwrap(),
            ClientEvent::Repeated {
                kind: MessageKind::MigrateAborted,
                ..
            }
        ));
        assert_eq!(sent(&mut out), [ack(ID)]);
        // The aborted migration cannot be revived.
        assert!(matches!(
            c.on_message(migrate(ID), &mut out),
            Err(ClientError::Unexpected {
                kind: MessageKind::Migrate,
                ..
            })
        ));
    }

    #[test]
    fn a_new_migration_ends_one_that_awaited_resumed() {
        let mut out = Vec::new();
        let mut c = welcomed(&mut out);
        assert!(matches!(
            c.on_message(migrate(ID), &mut out).unwrap(),
            ClientEvent::SwapPeer { .. }
        ));
        c.swapped(ID, &mut out).unwrap();
        assert_eq!(c.state(), ClientState::Swapped);
        out.clear();
        // No Resumed for ID, but the server announces the next move.
        assert!(matches!(
            c.on_message(migrate(OTHER), &mut out).unwrap(),
            ClientEvent::SwapPeer { migration_id, .. } if migration_id == OTHER
        ));
        c.swapped(OTHER, &mut out).unwrap();
        assert!(
            matches!(&sent(&mut out)[..], [Message::Ack { migration_id }] if *migration_id == OTHER)
        );
        // ID is remembered as finished: a late repeat is answered, not acted on.
        assert!(matches!(
            c.on_message(migrate(ID), &mut out).unwrap(),
            ClientEvent::Repeated { .. }
        ));
        // The same holds for a Quiesce opening the next migration.
        let third = MigrationId::from_bytes([3; 16]);
        assert!(matches!(
            c.on_message(
                Message::Quiesce {
                    migration_id: third,
                    deadline_ms: 10
                },
                &mut out
            )
            .unwrap(),
            ClientEvent::Quiesce { .. }
        ));
        assert_eq!(c.state(), ClientState::Quiescing);
    }

    #[test]
    fn welcome_with_a_version_not_offered() {
        let mut out = Vec::new();
        let mut c =
            ClientControl::new(ClientId::new("c").unwrap(), SUPPORTED_VERSIONS, &mut out).unwrap();
        let e = c
            .on_message(
                Message::Welcome {
                    version: 9,
                    session_id: 1,
                },
                &mut out,
            )
            .unwrap_err();
        assert!(matches!(
            e,
            ClientError::UnsupportedVersion { got: 9, supported } if supported == SUPPORTED_VERSIONS
        ));
        assert_eq!(e.close_code(), CloseCode::UnsupportedVersion);
    }

    #[test]
    fn out_of_order_messages_are_unexpected() {
        let mut out = Vec::new();
        let mut c =
            ClientControl::new(ClientId::new("c").unwrap(), SUPPORTED_VERSIONS, &mut out).unwrap();
        let e = c.on_message(migrate(ID), &mut out).unwrap_err();
        assert!(matches!(
            e,
            ClientError::Unexpected {
                state: ClientState::AwaitingWelcome,
                kind: MessageKind::Migrate,
                migration_id: Some(ID)
            }
        ));
        assert_eq!(e.close_code(), CloseCode::UnexpectedMessage);
        assert_eq!(sent(&mut out).len(), 1, "only the hello was sent");

        let mut c = welcomed(&mut out);
        let again = Message::Welcome {
            version: 1,
            session_id: 1,
        };
        assert!(matches!(
            c.on_message(again, &mut out),
            Err(ClientError::Unexpected {
                state: ClientState::Idle,
                kind: MessageKind::Welcome,
                ..
            })
        ));
        assert!(matches!(
            c.on_message(Message::Resumed { migration_id: ID }, &mut out),
            Err(ClientError::Unexpected {
                kind: MessageKind::Resumed,
                ..
            })
        ));
        c.on_message(migrate(ID), &mut out).unwrap();
        // Resumed before the swap was confirmed, and a second migration meanwhile.
        assert!(matches!(
            c.on_message(Message::Resumed { migration_id: ID }, &mut out),
            Err(ClientError::Unexpected {
                state: ClientState::Swapping,
                ..
            })
        ));
        assert!(matches!(
            c.on_message(migrate(OTHER), &mut out),
            Err(ClientError::Unexpected {
                migration_id: Some(OTHER),
                ..
            })
        ));
        // Messages only a client sends.
        assert!(matches!(
            c.on_message(ack(ID), &mut out),
            Err(ClientError::Unexpected {
                kind: MessageKind::Ack,
                ..
            })
        ));
        assert!(out.is_empty());
    }

    #[test]
    fn confirming_nothing_is_an_error() {
        let mut out = Vec::new();
        let mut c = welcomed(&mut out);
        let e = c.swapped(ID, &mut out).unwrap_err();
        assert!(matches!(
            e,
            ClientError::NothingToConfirm {
                state: ClientState::Idle,
                migration_id: ID
            }
        ));
        assert_eq!(e.close_code(), CloseCode::Internal);
        c.on_message(migrate(ID), &mut out).unwrap();
        assert!(matches!(
            c.quiesced(ID, &mut out),
            Err(ClientError::NothingToConfirm {
                state: ClientState::Swapping,
                ..
            })
        ));
        assert!(matches!(
            c.swapped(OTHER, &mut out),
            Err(ClientError::NothingToConfirm { .. })
        ));
        c.swapped(ID, &mut out).unwrap();
        assert!(matches!(
            c.swapped(ID, &mut out),
            Err(ClientError::NothingToConfirm {
                state: ClientState::Swapped,
                ..
            })
        ));
    }

    #[test]
    fn bye_closes_both_ways() {
        let mut out = Vec::new();
        let mut c = welcomed(&mut out);
        let reason = ByeReason::new("shutting down").unwrap();
        assert_eq!(
            c.on_message(
                Message::Bye {
                    reason: reason.clone()
                },
                &mut out
            )
            .unwrap(),
            ClientEvent::Bye { reason }
        );
        assert_eq!(c.state(), ClientState::Closed);
        assert!(matches!(
            c.on_message(migrate(ID), &mut out),
            Err(ClientError::Unexpected {
                state: ClientState::Closed,
                ..
            })
        ));

        let mut c = welcomed(&mut out);
        c.bye(ByeReason::new("user quit").unwrap(), &mut out)
            .unwrap();
        assert!(
            matches!(&sent(&mut out)[..], [Message::Bye { reason }] if reason.as_str() == "user quit")
        );
        assert_eq!(c.state(), ClientState::Closed);
    }

    #[test]
    fn only_recent_migrations_are_remembered() {
        let mut out = Vec::new();
        let mut c = welcomed(&mut out);
        for n in 0..=REMEMBERED as u8 {
            let id = MigrationId::from_bytes([n + 10; 16]);
            c.on_message(migrate(id), &mut out).unwrap();
            c.swapped(id, &mut out).unwrap();
            c.on_message(Message::Resumed { migration_id: id }, &mut out)
                .unwrap();
        }
        assert_eq!(c.finished.len(), REMEMBERED);
        // The oldest was forgotten: its repeat looks like a new migration.
        assert!(matches!(
            c.on_message(migrate(MigrationId::from_bytes([10; 16])), &mut out)
                .unwrap(),
            ClientEvent::SwapPeer { .. }
        ));
    }

    fn arb_server_msg() -> impl Strategy<Value = Message> {
        let id = prop_oneof![Just(ID), Just(OTHER)];
        prop_oneof![
            (0u16..3).prop_map(|version| Message::Welcome {
                version,
                session_id: 7
            }),
            id.clone().prop_map(migrate),
            id.clone().prop_map(|migration_id| Message::Quiesce {
                migration_id,
                deadline_ms: 1
            }),
            id.clone()
                .prop_map(|migration_id| Message::Resumed { migration_id }),
            id.prop_map(|migration_id| Message::MigrateAborted {
                migration_id,
                fallback_addr: addr(1)
            }),
        ]
    }

    proptest! {
        /// Any sequence of server messages and wrapper confirmations: no panic, and whatever
        /// the client sends is something a server decoder accepts.
        #[test]
        fn random_sequences_keep_the_output_valid(
            steps in proptest::collection::vec((arb_server_msg(), 0u8..4), 0..40)
        ) {
            let mut out = Vec::new();
            let mut c = ClientControl::new(ClientId::new("p").unwrap(), SUPPORTED_VERSIONS, &mut out)
                .unwrap();
            for (msg, confirm) in steps {
                let id = msg.migration_id();
                let swaps_before = c.state();
                let ev = c.on_message(msg, &mut out);
                if let Ok(ClientEvent::Repeated { .. }) = ev {
                    prop_assert_eq!(c.state(), swaps_before, "a repeat changes nothing");
                }
                if let Some(id) = id {
                    match confirm {
                        1 => { let _ = c.quiesced(id, &mut out); }
                        2 => { let _ = c.swapped(id, &mut out); }
                        3 => {
                            let before = out.len();
                            if c.report_downtime(id, pause(1), &mut out).is_err() {
                                prop_assert_eq!(out.len(), before, "a refusal sends nothing");
                            }
                        }
                        _ => {}
                    }
                }
            }
            sent(&mut out);
        }
    }
}
