//! The server wrapper's side of the control flow, without I/O: the mirror of
//! [`ClientControl`](crate::ClientControl).
//!
//! ```text
//!  wrapper (I/O)                        ServerControl                         wrapper (I/O)
//!  ─────────────                        ─────────────                         ─────────────
//!  connection up  ──on_connect(now)──► SessionId, hello deadline  (Err(Full): close it)
//!  plain client   ──on_connect_plain(now)──► SessionId, no deadline (Err(Full): close it)
//!  stream bytes   ──on_bytes(s, b, now)──► ControlDecoder(Role::Server) per session
//!  stream end     ──on_stream_finished / on_stream_error / on_disconnect
//!  operator       ──quiesce / announce / abort / resumed (now)
//!  timer          ──handle_timeout(now)      poll_timeout() ──► when to call it
//!                                            poll_output() ──► Transmit{session, bytes}
//!                                                           ──► Close{session, CloseCode}
//!                                                           ──► Finish{session}
//!                                                           ──► Event(ServerEvent)
//! ```
//!
//! One session per connection:
//!
//! ```text
//!  on_connect ──connections < max_sessions──► AwaitingHello
//!             └─otherwise──────────────────► Err(Refusal::Full): the wrapper closes it
//!  on_connect_plain ──connections < max_sessions──► Plain (no deadline, no stream, no
//!             │                                    message; until on_disconnect)
//!             └─otherwise──────────────────► Err(Refusal::Full): the wrapper closes it
//!  AwaitingHello ──Hello (common version, room)──► Open ──Bye──► ByeReceived
//!       │  ├─Hello (no common version)──► Bye + Close(UnsupportedVersion)
//!       │  ├─Hello (registry full)──────► Bye + Close(Internal), Event Refused{Full}
//!       │  └─anything else──────────────► Close(UnexpectedMessage)
//!       └─hello deadline (handle_timeout)► Close(ProtocolViolation), Event HelloTimeout
//!                                          (the wrapper closes the connection)
//!  any state ──bytes that do not decode──► Close(DecodeError::close_code())
//!  Open ──client finished its side──► Finish
//! ```
//!
//! A migration is a sequence of *rounds*; each round sends one message to every session that
//! can hear it and waits for every answer or its deadline, then reports who answered and who
//! is missing ([`RoundReport`]), and which plain sessions could not be told at all:
//!
//! ```text
//!  idle ──quiesce(id)──► Quiesce round ──► (QuiesceComplete) ──announce(id)──┐
//!  idle ──announce(id)──────────────────────────────────────────────────────┴► Announce round
//!       ──► (AnnounceComplete) ──resumed()──► Resumed to every told session ──► idle
//!  any point of a migration ──abort(fallback)──► Abort round ──► (AbortComplete) ──► idle
//!  afterwards, each told session ──Downtime{id}──► (DowntimeReported), once per migration
//!  every round: Plain sessions (alive at its start or joining during it) ──► cannot_follow,
//!               never waited for; a report with any is not complete()
//! ```
//!
//! Decisions worth knowing:
//! - **Every connection takes a slot, from `on_connect` until `on_disconnect`.** The limit
//!   `max_sessions` bounds connections, not only registered sessions: a connection that has
//!   not said `Hello` (yet, or ever) counts, so that silent connections cannot hold the
//!   server's memory while the registry looks empty. `on_connect` beyond the limit is refused
//!   ([`Refusal::Full`]) and nothing is kept for it. A connection that misses its hello
//!   deadline keeps its slot until the wrapper closes it and reports `on_disconnect`, which
//!   is what a wrapper must do on [`ServerEvent::HelloTimeout`].
//! - **A plain session is a slot and nothing else.** A plain QUIC client (one that did not
//!   negotiate the marker ALPN, see [`crate::alpn`]) has no control stream: the wrapper
//!   reports it with [`ServerControl::on_connect_plain`] and hands it to the application at
//!   once. It counts against `max_sessions` like any connection (else plain clients would be
//!   an unbounded side door), has no hello deadline (it will never say `Hello`: closing it
//!   would cut off a legitimate client), and bytes or stream events reported for it are
//!   ignored. It cannot be told of a move, so every round lists it in
//!   [`RoundReport::cannot_follow`] instead of waiting for it: it keeps working after a move
//!   only if its address stays (a front keeps the 4-tuple), which this crate cannot know.
//! - **Only sessions that can hear are waited for.** A session whose control stream is closed
//!   (garbage, a client `Bye`, a finished stream) is reported missing at once, so a round never
//!   waits for someone who cannot answer; one that disconnects during a round is dropped from
//!   the round (its connection did not survive anyway).
//! - **A client that connects during a migration is told at once.** Its connection lives in
//!   the process that is about to move, so it must learn the new address like the others:
//!   once registered it gets `Quiesce` (during the quiesce phase) or `Migrate` (once
//!   announced). While the announce round still waits, it joins the round with the round's
//!   original deadline (not extended), so the report stays "everyone who was here and
//!   reachable acked", and a joiner too late to ack is reported missing. During an abort a new
//!   client is told nothing: it never heard of the migration.
//! - **Acks are never a reason to close.** A duplicate, late or timed-out ack, and an ack that
//!   names another migration than the active one (for example a repeat of an earlier, finished
//!   migration) are ignored: they do not count for the current migration, so the session stays
//!   missing unless it sends the right ack in time.
//! - **The abort counts acks.** An `Ack` names only the migration, so an ack of `Migrate` and
//!   an ack of `MigrateAborted` look alike. A session told `Migrate` whose ack has not arrived
//!   when the abort starts owes two acks (the stream is ordered: the `Migrate` ack comes
//!   first); every other told session owes one. A client that swaps back before confirming the
//!   first swap sends only one and is reported missing: the safe direction.
//! - **Messages that carry nothing new are rate limited.** A repeated `Hello` (identical to the
//!   first), a repeated `Bye`, and ignored acks or `Quiesced`s produce at most one event per
//!   session, per kind and per migration; the rest only increment counters
//!   ([`ServerControl::repeats`], [`SessionView::repeats`]). Nothing is answered. A client
//!   therefore cannot grow the server's log, output queue or memory by repeating itself.
//! - **Downtime reports come after the outcome, once.** A session may report the pause it
//!   observed (`Downtime`, version 2) for a migration whose outcome is decided and that it
//!   was told about: from `resumed` for the sessions sent `Resumed`, from `abort` for the
//!   sessions sent `MigrateAborted`. The first report of each (session, migration) becomes a
//!   [`ServerEvent::DowntimeReported`]; a repeat, a report for the migration still under way
//!   ([`Ignored::NotFinished`]) or for one the session was not told about or that is too old
//!   ([`Ignored::WrongMigration`]; the last 8 are remembered per session) is ignored like a
//!   stray ack, never a close. A value above an hour does not decode: that closes the stream.
//! - Time is a [`Timestamp`] passed in; a deadline has passed when `now >= deadline`, as in
//!   [`SessionRegistry`].

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use migration_core::{
    MigrationId, RegistryError, SessionId, SessionRegistry, SessionState, Timestamp,
};

use crate::close::CloseCode;
use crate::codec::{ControlDecoder, DecodeError, EncodeError, SUPPORTED_VERSIONS, encode};
use crate::message::{Message, MessageKind};
use crate::types::{ByeReason, ClientId, ObservedDowntime, Role, VersionRange};

/// How many finished migrations each session may still report a downtime for.
const REPORTABLE: usize = 8;

/// How a [`ServerControl`] is set up.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServerConfig {
    /// Most connections at once, registered or still to say `Hello`; a connection beyond it
    /// is refused by [`ServerControl::on_connect`].
    pub max_sessions: usize,
    /// How long a new connection has to say `Hello` (from [`ServerControl::on_connect`]).
    pub hello_timeout: Duration,
    /// The protocol versions this server speaks.
    pub supported: VersionRange,
}

impl ServerConfig {
    /// A configuration speaking [`SUPPORTED_VERSIONS`].
    pub fn new(max_sessions: usize, hello_timeout: Duration) -> Self {
        Self {
            max_sessions,
            hello_timeout,
            supported: SUPPORTED_VERSIONS,
        }
    }
}

/// What a round asks of the clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RoundKind {
    /// `Quiesce`, answered by `Quiesced`.
    Quiesce,
    /// `Migrate`, answered by `Ack`.
    Announce,
    /// `MigrateAborted`, answered by `Ack`.
    Abort,
}

impl fmt::Display for RoundKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// The outcome of one round: who answered, who did not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoundReport {
    /// What was asked.
    pub kind: RoundKind,
    /// The migration.
    pub migration_id: MigrationId,
    /// Sessions that answered in time, by session id.
    pub acked: Vec<(SessionId, ClientId)>,
    /// Sessions that did not (could not be told, closed their control stream, or missed the
    /// deadline), by session id.
    pub missing: Vec<(SessionId, ClientId)>,
    /// When the round started.
    pub started: Timestamp,
    /// When it ended.
    pub ended: Timestamp,
    /// Whether it ended because its deadline passed (rather than every answer being in, or
    /// being cut short by an abort or `resumed`).
    pub deadline_passed: bool,
    /// Plain sessions (no control stream) that were connected at the round's start or
    /// connected during it and were still connected at its end: they were not told and not
    /// waited for. They follow a move only if their address stays (behind a front).
    pub cannot_follow: Vec<SessionId>,
}

impl RoundReport {
    /// Every session answered: none missing, and no plain session that could not be told.
    pub fn complete(&self) -> bool {
        self.missing.is_empty() && self.cannot_follow.is_empty()
    }
}

/// Why a connection ([`ServerControl::on_connect`]) or a `Hello` was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// The client offers no version this server speaks.
    NoCommonVersion {
        /// What the client offered.
        offered: VersionRange,
    },
    /// The server holds its maximum of connections (registered or not); the wrapper should
    /// close the connection.
    Full {
        /// The configured maximum.
        max: usize,
    },
}

/// Why a message from a client was ignored (and not answered, not closed over).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Ignored {
    /// It names another migration than the active one.
    WrongMigration {
        /// The active migration, if any.
        active: Option<MigrationId>,
        /// The id in the message.
        got: MigrationId,
    },
    /// Nothing is being asked of this session that the message could answer.
    NotAsked,
    /// The registry refused it (duplicate, late, timed out ...).
    Registry(RegistryError),
    /// The session already said `Bye`.
    AfterBye,
    /// A downtime report for the migration under way, whose outcome is not decided yet.
    NotFinished,
}

/// Why a control stream was closed by the server.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum CloseCause {
    /// The bytes did not decode.
    Decode(DecodeError),
    /// A valid message that is not allowed at this point.
    Unexpected {
        /// The kind received.
        kind: MessageKind,
    },
    /// No `Hello` before the hello deadline.
    HelloTimeout,
    /// The `Hello` was refused.
    Refused(Refusal),
    /// The wrapper reported the stream broken ([`ServerControl::on_stream_error`]).
    StreamError,
    /// A message to this session could not be encoded (a bug; the text says which).
    Encode(String),
}

/// What the wrapper should know (log, report, act on).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum ServerEvent {
    /// A `Hello` was accepted and answered with `Welcome`: the session is registered.
    Registered {
        /// The session.
        session: SessionId,
        /// The client's name for itself.
        client_id: ClientId,
        /// The version chosen.
        version: u16,
    },
    /// A session registered during a migration and was told at once.
    JoinedMigration {
        /// The session.
        session: SessionId,
        /// The migration.
        migration_id: MigrationId,
        /// What it was told (`Quiesce` or `Migrate`).
        told: MessageKind,
    },
    /// A `Hello` was refused (a `Bye` and a close follow in the outputs).
    Refused {
        /// The session.
        session: SessionId,
        /// Why.
        refusal: Refusal,
    },
    /// The connection said nothing (or no `Hello`) before the hello deadline.
    HelloTimeout {
        /// The session.
        session: SessionId,
    },
    /// The server closed the session's control stream; its connection is untouched.
    ControlClosed {
        /// The session.
        session: SessionId,
        /// The code the stream was closed with.
        code: CloseCode,
        /// Why.
        cause: CloseCause,
    },
    /// The client finished its side of the control stream cleanly.
    ClientFinished {
        /// The session.
        session: SessionId,
    },
    /// The client said `Bye` (first time only).
    ClientBye {
        /// The session.
        session: SessionId,
        /// Its reason.
        reason: ByeReason,
    },
    /// An answer counted for the current round.
    Answered {
        /// The session.
        session: SessionId,
        /// `Ack` or `Quiesced`.
        kind: MessageKind,
        /// The migration.
        migration_id: MigrationId,
    },
    /// The first repeat of a message that carries nothing new (this session, this kind, this
    /// migration); later ones are only counted.
    Repeated {
        /// The session.
        session: SessionId,
        /// The kind repeated.
        kind: MessageKind,
    },
    /// The first ignored message of this kind (this session, this migration); later ones are
    /// only counted.
    Ignored {
        /// The session.
        session: SessionId,
        /// The kind ignored.
        kind: MessageKind,
        /// Why.
        why: Ignored,
    },
    /// A client reported the pause it observed across a finished migration (first report of
    /// this session and migration; repeats are only counted).
    DowntimeReported {
        /// The session.
        session: SessionId,
        /// The client's name for itself.
        client_id: ClientId,
        /// The migration.
        migration_id: MigrationId,
        /// Its pause: last reply before the move to first reply after it.
        downtime: ObservedDowntime,
    },
    /// The quiesce round is over.
    QuiesceComplete(RoundReport),
    /// The announce round is over.
    AnnounceComplete(RoundReport),
    /// The abort round is over; the migration has ended.
    AbortComplete(RoundReport),
}

/// What the wrapper must do, in order.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum ServerOutput {
    /// Write these bytes on the session's control stream.
    Transmit {
        /// The session.
        session: SessionId,
        /// Encoded frames.
        bytes: Vec<u8>,
    },
    /// Reset the send half and stop the receive half of the session's control stream with
    /// `code`; leave the connection and the application alone. Nothing more will be written.
    Close {
        /// The session.
        session: SessionId,
        /// The code.
        code: CloseCode,
    },
    /// Finish the send half cleanly (the client finished its side).
    Finish {
        /// The session.
        session: SessionId,
    },
    /// Something to log, report or act on.
    Event(ServerEvent),
}

/// A refused [`ServerControl`] operation; nothing changed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// Another migration is active.
    #[error("migration {active} is in progress; {requested} refused")]
    MigrationInProgress {
        /// The migration under way.
        active: MigrationId,
        /// The one refused.
        requested: MigrationId,
    },
    /// No migration is active (nothing to abort or resume).
    #[error("no migration is in progress")]
    NoMigration,
    /// A round is still waiting for answers.
    #[error("the {kind} round of migration {migration_id} is still waiting for answers")]
    RoundInProgress {
        /// The round under way.
        kind: RoundKind,
        /// Its migration.
        migration_id: MigrationId,
    },
    /// `resumed` for a migration that was never announced (only quiesced).
    #[error("migration {0} was not announced")]
    NotAnnounced(MigrationId),
    /// A message could not be encoded.
    #[error(transparent)]
    Encode(#[from] EncodeError),
}

/// One session as the server sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionView {
    /// The session.
    pub session: SessionId,
    /// The client's name for itself.
    pub client_id: ClientId,
    /// Where it is in the current migration.
    pub state: SessionState,
    /// Whether its control stream can still carry messages.
    pub control_open: bool,
    /// Messages from it that were repeated or ignored without an event.
    pub repeats: u64,
    /// A plain session ([`ServerControl::on_connect_plain`]): no control stream, an empty
    /// `client_id`, always [`SessionState::Connected`].
    pub plain: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// A plain client: no control stream, ever.
    Plain,
    AwaitingHello {
        deadline: Timestamp,
    },
    Open,
    ByeReceived,
    Finished,
    Closed,
}

#[derive(Debug)]
struct Conn {
    decoder: ControlDecoder,
    phase: Phase,
    hello: Option<(ClientId, VersionRange)>,
    /// Kind bytes already reported by a `Repeated` or `Ignored` event in this migration.
    noted: u32,
    repeats: u64,
    /// What this session was told in the current migration.
    told: Option<MessageKind>,
    /// An ack naming the current migration arrived (whether the registry took it or not).
    migrate_acked: bool,
    /// Finished migrations this session was told about, and whether it reported their
    /// downtime; the last [`REPORTABLE`].
    reportable: VecDeque<(MigrationId, bool)>,
}

impl Conn {
    fn client_id(&self) -> Option<&ClientId> {
        self.hello.as_ref().map(|(c, _)| c)
    }

    /// This session may report its downtime for `id` from now on.
    fn may_report(&mut self, id: MigrationId) {
        if self.reportable.iter().any(|(m, _)| *m == id) {
            return;
        }
        if self.reportable.len() == REPORTABLE {
            self.reportable.pop_front();
        }
        self.reportable.push_back((id, false));
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Quiesce,
    Announced { new_addr: SocketAddr },
    Aborting,
}

#[derive(Debug, Clone, Copy)]
struct Migration {
    id: MigrationId,
    step: Step,
    /// The announce round's ack deadline (for joiners), once announced.
    ack_deadline: Option<Timestamp>,
    /// The patience given with `Migrate`, for joiners after the round.
    patience: Duration,
}

#[derive(Debug)]
struct Round {
    kind: RoundKind,
    migration_id: MigrationId,
    started: Timestamp,
    deadline: Timestamp,
    /// Session → answers still owed.
    waiting: BTreeMap<SessionId, u8>,
    acked: Vec<(SessionId, ClientId)>,
    missing: Vec<(SessionId, ClientId)>,
    cannot_follow: Vec<SessionId>,
}

/// The server's control-stream state machine for every connection: feed it connections,
/// bytes and time; take outputs with [`ServerControl::poll_output`].
///
/// It owns the [`SessionRegistry`] and one [`ControlDecoder`] per connection. It does no I/O
/// and reads no clock.
#[derive(Debug)]
pub struct ServerControl {
    config: ServerConfig,
    registry: SessionRegistry,
    conns: BTreeMap<SessionId, Conn>,
    hello_deadlines: BTreeSet<(Timestamp, SessionId)>,
    next_session: u64,
    migration: Option<Migration>,
    round: Option<Round>,
    outputs: VecDeque<ServerOutput>,
    repeats: u64,
}

fn kind_bit(kind: MessageKind) -> u32 {
    1u32 << (kind.as_u8() & 31)
}

fn millis(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

impl ServerControl {
    /// A server with no connection.
    pub fn new(config: ServerConfig) -> Self {
        Self {
            registry: SessionRegistry::new(config.max_sessions),
            config,
            conns: BTreeMap::new(),
            hello_deadlines: BTreeSet::new(),
            next_session: 1,
            migration: None,
            round: None,
            outputs: VecDeque::new(),
            repeats: 0,
        }
    }

    // ---- inspection ----

    /// The session registry (registered sessions and their migration states).
    pub fn registry(&self) -> &SessionRegistry {
        &self.registry
    }

    /// The active migration, from `quiesce` or `announce` until `resumed` or the end of an
    /// abort.
    pub fn active_migration(&self) -> Option<MigrationId> {
        self.migration.map(|m| m.id)
    }

    /// The round waiting for answers, if any.
    pub fn round(&self) -> Option<(RoundKind, MigrationId)> {
        self.round.as_ref().map(|r| (r.kind, r.migration_id))
    }

    /// Connections known, registered or not: the slots taken out of `max_sessions`.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Messages repeated or ignored without an event, over every session.
    pub fn repeats(&self) -> u64 {
        self.repeats
    }

    /// Every registered session and every plain session, by session id.
    pub fn sessions(&self) -> Vec<SessionView> {
        self.conns
            .keys()
            .filter_map(|id| self.session(*id))
            .collect()
    }

    /// One registered or plain session.
    pub fn session(&self, session: SessionId) -> Option<SessionView> {
        let c = self.conns.get(&session)?;
        if c.phase == Phase::Plain {
            return Some(SessionView {
                session,
                // Empty is a valid id (the bound is on the length only).
                client_id: ClientId::new("").ok()?,
                state: SessionState::Connected,
                control_open: false,
                repeats: 0,
                plain: true,
            });
        }
        let s = self.registry.get(session)?;
        Some(SessionView {
            session,
            client_id: c.client_id()?.clone(),
            state: s.state(),
            control_open: c.phase == Phase::Open,
            repeats: c.repeats,
            plain: false,
        })
    }

    /// Plain sessions connected now.
    pub fn plain_sessions(&self) -> usize {
        self.conns
            .values()
            .filter(|c| c.phase == Phase::Plain)
            .count()
    }

    // ---- outputs and time ----

    /// The next thing to do, in order; `None` when there is nothing.
    pub fn poll_output(&mut self) -> Option<ServerOutput> {
        self.outputs.pop_front()
    }

    /// When [`ServerControl::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        let hello = self.hello_deadlines.first().map(|(t, _)| *t);
        let round = self.round.as_ref().map(|r| r.deadline);
        [hello, round, self.registry.next_deadline()]
            .into_iter()
            .flatten()
            .min()
    }

    /// Applies every deadline that has passed at `now`: hello deadlines close their stream,
    /// a round past its deadline ends and reports who is missing.
    pub fn handle_timeout(&mut self, now: Timestamp) {
        while let Some(&(deadline, session)) = self.hello_deadlines.first() {
            if deadline > now {
                break;
            }
            self.hello_deadlines.remove(&(deadline, session));
            self.push_event(ServerEvent::HelloTimeout { session });
            self.close(
                session,
                CloseCode::ProtocolViolation,
                CloseCause::HelloTimeout,
            );
        }
        self.registry.expire(now);
        if self.round.as_ref().is_some_and(|r| r.deadline <= now) {
            self.finish_round(now, true);
        }
    }

    fn push_event(&mut self, ev: ServerEvent) {
        self.outputs.push_back(ServerOutput::Event(ev));
    }

    fn transmit(&mut self, session: SessionId, msg: &Message) -> Result<(), EncodeError> {
        let mut bytes = Vec::new();
        encode(msg, &mut bytes)?;
        if let Some(ServerOutput::Transmit {
            session: s,
            bytes: b,
        }) = self.outputs.back_mut()
            && *s == session
        {
            b.extend_from_slice(&bytes);
            return Ok(());
        }
        self.outputs
            .push_back(ServerOutput::Transmit { session, bytes });
        Ok(())
    }

    // ---- connections ----

    /// A connection is up (handshake done): returns its session id and starts its hello
    /// deadline. The connection takes one of the `max_sessions` slots until
    /// [`ServerControl::on_disconnect`], whether it ever says `Hello` or not.
    ///
    /// # Errors
    /// [`Refusal::Full`] when every slot is taken: nothing is kept, and the wrapper closes the
    /// connection.
    pub fn on_connect(&mut self, now: Timestamp) -> Result<SessionId, Refusal> {
        let deadline = now + self.config.hello_timeout;
        let session = self.take_slot(Phase::AwaitingHello { deadline })?;
        self.hello_deadlines.insert((deadline, session));
        Ok(session)
    }

    /// A plain QUIC client is up (handshake done, no marker ALPN): it takes one of the
    /// `max_sessions` slots until [`ServerControl::on_disconnect`], like
    /// [`ServerControl::on_connect`], but has no hello deadline and no control stream
    /// (bytes or stream events reported for it are ignored). A round under way lists it in
    /// its [`RoundReport::cannot_follow`]; it is never told anything.
    ///
    /// `now` is taken for symmetry with `on_connect`; nothing about a plain session expires.
    ///
    /// # Errors
    /// [`Refusal::Full`] when every slot is taken: nothing is kept, and the wrapper closes the
    /// connection.
    pub fn on_connect_plain(&mut self, now: Timestamp) -> Result<SessionId, Refusal> {
        let _ = now;
        let session = self.take_slot(Phase::Plain)?;
        if let Some(r) = &mut self.round {
            r.cannot_follow.push(session);
        }
        Ok(session)
    }

    fn take_slot(&mut self, phase: Phase) -> Result<SessionId, Refusal> {
        if self.conns.len() >= self.config.max_sessions {
            return Err(Refusal::Full {
                max: self.config.max_sessions,
            });
        }
        let session = SessionId(self.next_session);
        self.next_session = self.next_session.saturating_add(1);
        self.conns.insert(
            session,
            Conn {
                decoder: ControlDecoder::new(Role::Server),
                phase,
                hello: None,
                noted: 0,
                repeats: 0,
                told: None,
                migrate_acked: false,
                reportable: VecDeque::new(),
            },
        );
        Ok(session)
    }

    /// The connection is gone: the session is forgotten (and dropped from any round).
    pub fn on_disconnect(&mut self, session: SessionId, now: Timestamp) {
        if let Some(c) = self.conns.remove(&session)
            && let Phase::AwaitingHello { deadline } = c.phase
        {
            self.hello_deadlines.remove(&(deadline, session));
        }
        self.registry.remove(session);
        if let Some(r) = &mut self.round {
            r.waiting.remove(&session);
            r.acked.retain(|(s, _)| *s != session);
            r.missing.retain(|(s, _)| *s != session);
            r.cannot_follow.retain(|s| *s != session);
        }
        self.check_round(now);
    }

    /// The client finished its side of the control stream.
    pub fn on_stream_finished(&mut self, session: SessionId, now: Timestamp) {
        let Some(c) = self.conns.get_mut(&session) else {
            return;
        };
        if matches!(c.phase, Phase::Closed | Phase::Finished | Phase::Plain) {
            return;
        }
        if let Err(e) = c.decoder.finish() {
            let code = e.close_code();
            self.close(session, code, CloseCause::Decode(e));
        } else {
            self.unhook_hello(session);
            if let Some(c) = self.conns.get_mut(&session) {
                c.phase = Phase::Finished;
            }
            self.outputs.push_back(ServerOutput::Finish { session });
            self.push_event(ServerEvent::ClientFinished { session });
            self.unreachable(session);
        }
        self.check_round(now);
    }

    /// The control stream broke under the wrapper (reset by the peer, a failed write): it is
    /// closed with [`CloseCode::Internal`].
    pub fn on_stream_error(&mut self, session: SessionId, now: Timestamp) {
        if self.is_plain(session) {
            return;
        }
        self.close(session, CloseCode::Internal, CloseCause::StreamError);
        self.check_round(now);
    }

    /// Bytes received on the session's control stream.
    pub fn on_bytes(&mut self, session: SessionId, bytes: &[u8], now: Timestamp) {
        let Some(c) = self.conns.get_mut(&session) else {
            return;
        };
        if matches!(c.phase, Phase::Closed | Phase::Finished | Phase::Plain) {
            return;
        }
        c.decoder.push(bytes);
        // Everything pushed is decoded now, so the decoder holds at most one partial frame.
        while let Some(c) = self
            .conns
            .get_mut(&session)
            .filter(|c| !matches!(c.phase, Phase::Closed | Phase::Finished))
        {
            match c.decoder.next() {
                Ok(Some(msg)) => self.on_message(session, msg, now),
                Ok(None) => break,
                Err(e) => {
                    let code = e.close_code();
                    self.close(session, code, CloseCause::Decode(e));
                    break;
                }
            }
        }
        self.check_round(now);
    }

    fn is_plain(&self, session: SessionId) -> bool {
        self.conns
            .get(&session)
            .is_some_and(|c| c.phase == Phase::Plain)
    }

    fn unhook_hello(&mut self, session: SessionId) {
        if let Some(c) = self.conns.get(&session)
            && let Phase::AwaitingHello { deadline } = c.phase
        {
            self.hello_deadlines.remove(&(deadline, session));
        }
    }

    /// Closes the session's control stream (once) and takes it out of the waiting list.
    fn close(&mut self, session: SessionId, code: CloseCode, cause: CloseCause) {
        self.unhook_hello(session);
        let Some(c) = self.conns.get_mut(&session) else {
            return;
        };
        // A plain session has no stream to close.
        if matches!(c.phase, Phase::Closed | Phase::Plain) {
            return;
        }
        c.phase = Phase::Closed;
        self.outputs
            .push_back(ServerOutput::Close { session, code });
        self.push_event(ServerEvent::ControlClosed {
            session,
            code,
            cause,
        });
        self.unreachable(session);
    }

    /// The session can no longer answer: a round stops waiting for it and reports it missing.
    fn unreachable(&mut self, session: SessionId) {
        let Some(r) = &mut self.round else {
            return;
        };
        if r.waiting.remove(&session).is_some()
            && let Some(name) = self.conns.get(&session).and_then(Conn::client_id)
        {
            r.missing.push((session, name.clone()));
        }
    }

    /// Counts a message that carries nothing new; the first of its kind (per session and
    /// migration) becomes `ev`.
    fn note(&mut self, session: SessionId, kind: MessageKind, ev: ServerEvent) {
        let Some(c) = self.conns.get_mut(&session) else {
            return;
        };
        let bit = kind_bit(kind);
        if c.noted & bit == 0 {
            c.noted |= bit;
            self.push_event(ev);
        } else {
            c.repeats = c.repeats.saturating_add(1);
            self.repeats = self.repeats.saturating_add(1);
        }
    }

    fn ignore(&mut self, session: SessionId, kind: MessageKind, why: Ignored) {
        self.note(session, kind, ServerEvent::Ignored { session, kind, why });
    }

    fn on_message(&mut self, session: SessionId, msg: Message, now: Timestamp) {
        let Some(c) = self.conns.get(&session) else {
            return;
        };
        let kind = msg.kind();
        match (c.phase, msg) {
            (
                Phase::AwaitingHello { .. },
                Message::Hello {
                    client_id,
                    supported,
                },
            ) => {
                self.on_hello(session, client_id, supported, now);
            }
            (Phase::AwaitingHello { .. }, _) => {
                self.close(
                    session,
                    CloseCode::UnexpectedMessage,
                    CloseCause::Unexpected { kind },
                );
            }
            (Phase::ByeReceived, Message::Bye { .. }) => {
                self.note(session, kind, ServerEvent::Repeated { session, kind });
            }
            (Phase::ByeReceived, _) => self.ignore(session, kind, Ignored::AfterBye),
            (
                Phase::Open,
                Message::Hello {
                    client_id,
                    supported,
                },
            ) => {
                if c.hello.as_ref() == Some(&(client_id, supported)) {
                    self.note(session, kind, ServerEvent::Repeated { session, kind });
                } else {
                    self.close(
                        session,
                        CloseCode::UnexpectedMessage,
                        CloseCause::Unexpected { kind },
                    );
                }
            }
            (Phase::Open, Message::Bye { reason }) => {
                if let Some(c) = self.conns.get_mut(&session) {
                    c.phase = Phase::ByeReceived;
                    c.noted |= kind_bit(kind);
                }
                self.push_event(ServerEvent::ClientBye { session, reason });
                self.unreachable(session);
            }
            (Phase::Open, Message::Ack { migration_id }) => self.on_ack(session, migration_id, now),
            (Phase::Open, Message::Quiesced { migration_id }) => {
                self.on_quiesced(session, migration_id);
            }
            (
                Phase::Open,
                Message::Downtime {
                    migration_id,
                    downtime,
                },
            ) => self.on_downtime(session, migration_id, downtime),
            (Phase::Open, _) => {
                // The decoder refuses server-to-client kinds; nothing else is left, but a new
                // kind must not be silently accepted.
                self.close(
                    session,
                    CloseCode::UnexpectedMessage,
                    CloseCause::Unexpected { kind },
                );
            }
            (Phase::Finished | Phase::Closed | Phase::Plain, _) => {}
        }
    }

    fn on_hello(
        &mut self,
        session: SessionId,
        client_id: ClientId,
        supported: VersionRange,
        now: Timestamp,
    ) {
        let refuse = |this: &mut Self, refusal: Refusal, code: CloseCode, text: &str| {
            // An encoding failure only loses the courtesy Bye; the close still happens.
            let _ = this.transmit(
                session,
                &Message::Bye {
                    reason: ByeReason::truncating(text),
                },
            );
            this.push_event(ServerEvent::Refused {
                session,
                refusal: refusal.clone(),
            });
            this.close(session, code, CloseCause::Refused(refusal));
        };
        let Some(version) = supported.highest_common(&self.config.supported) else {
            refuse(
                self,
                Refusal::NoCommonVersion { offered: supported },
                CloseCode::UnsupportedVersion,
                "no common protocol version",
            );
            return;
        };
        if let Err(e) = self.registry.insert(session, client_id.as_str()) {
            let refusal = match e {
                RegistryError::Full { max } => Refusal::Full { max },
                // Session ids are never reused, so a duplicate cannot happen; refuse anyway.
                _ => Refusal::Full {
                    max: self.registry.max_sessions(),
                },
            };
            refuse(self, refusal, CloseCode::Internal, &e.to_string());
            return;
        }
        self.unhook_hello(session);
        if let Some(c) = self.conns.get_mut(&session) {
            c.phase = Phase::Open;
            c.hello = Some((client_id.clone(), supported));
        }
        let welcome = Message::Welcome {
            version,
            session_id: session.0,
        };
        if let Err(e) = self.transmit(session, &welcome) {
            self.registry.remove(session);
            self.close(
                session,
                CloseCode::Internal,
                CloseCause::Encode(e.to_string()),
            );
            return;
        }
        self.push_event(ServerEvent::Registered {
            session,
            client_id,
            version,
        });
        self.join_migration(session, now);
    }

    /// Tells a session that registered during a migration what the others were told.
    fn join_migration(&mut self, session: SessionId, now: Timestamp) {
        let Some(m) = self.migration else {
            return;
        };
        let (msg, kind, deadline) = match m.step {
            Step::Aborting => return,
            Step::Quiesce => {
                let deadline = self
                    .round
                    .as_ref()
                    .filter(|r| r.kind == RoundKind::Quiesce)
                    .map(|r| r.deadline);
                let ms = deadline.map_or(millis(m.patience), |d| {
                    millis(d.saturating_duration_since(now))
                });
                (
                    Message::Quiesce {
                        migration_id: m.id,
                        deadline_ms: ms,
                    },
                    MessageKind::Quiesce,
                    deadline,
                )
            }
            Step::Announced { new_addr } => {
                // While the announce round waits: its own deadline. After: the same patience
                // from now (nobody reports on it, but the client gets a sensible deadline).
                let deadline = m.ack_deadline.filter(|_| {
                    self.round
                        .as_ref()
                        .is_some_and(|r| r.kind == RoundKind::Announce)
                });
                let patience = deadline.map_or(m.patience, |d| d.saturating_duration_since(now));
                if self.registry.tell_all(m.id, now, patience).is_err() {
                    return;
                }
                (
                    Message::Migrate {
                        migration_id: m.id,
                        new_addr,
                        deadline_ms: millis(patience),
                        token: None,
                    },
                    MessageKind::Migrate,
                    deadline,
                )
            }
        };
        if self.transmit(session, &msg).is_err() {
            return;
        }
        if let Some(c) = self.conns.get_mut(&session) {
            c.told = Some(kind);
        }
        self.push_event(ServerEvent::JoinedMigration {
            session,
            migration_id: m.id,
            told: kind,
        });
        if let Some(r) = &mut self.round
            && deadline.is_some()
        {
            r.waiting.insert(session, 1);
        }
    }

    fn on_ack(&mut self, session: SessionId, id: MigrationId, now: Timestamp) {
        let kind = MessageKind::Ack;
        let active = self.migration.map(|m| m.id);
        if active != Some(id) {
            self.ignore(session, kind, Ignored::WrongMigration { active, got: id });
            return;
        }
        if let Some(c) = self.conns.get_mut(&session) {
            c.migrate_acked = true;
        }
        if let Some(r) = &mut self.round
            && r.kind == RoundKind::Abort
        {
            match r.waiting.get_mut(&session) {
                Some(owed) if *owed > 1 => *owed -= 1,
                Some(_) => {
                    r.waiting.remove(&session);
                    self.answered(session, kind, id);
                }
                None => self.ignore(session, kind, Ignored::NotAsked),
            }
            return;
        }
        let told_migrate = self
            .conns
            .get(&session)
            .is_some_and(|c| c.told == Some(MessageKind::Migrate));
        if !told_migrate {
            self.ignore(session, kind, Ignored::NotAsked);
            return;
        }
        match self.registry.ack(session, id, now) {
            Ok(()) => {
                let counted = self
                    .round
                    .as_mut()
                    .filter(|r| r.kind == RoundKind::Announce)
                    .is_some_and(|r| r.waiting.remove(&session).is_some());
                if counted {
                    self.answered(session, kind, id);
                } else {
                    // Acked after its round ended (a joiner): recorded, not reported.
                    self.push_event(ServerEvent::Answered {
                        session,
                        kind,
                        migration_id: id,
                    });
                }
            }
            Err(e) => self.ignore(session, kind, Ignored::Registry(e)),
        }
    }

    fn on_quiesced(&mut self, session: SessionId, id: MigrationId) {
        let kind = MessageKind::Quiesced;
        let active = self.migration.map(|m| m.id);
        if active != Some(id) {
            self.ignore(session, kind, Ignored::WrongMigration { active, got: id });
            return;
        }
        let counted = self
            .round
            .as_mut()
            .filter(|r| r.kind == RoundKind::Quiesce)
            .is_some_and(|r| r.waiting.remove(&session).is_some());
        if counted {
            self.answered(session, kind, id);
        } else {
            self.ignore(session, kind, Ignored::NotAsked);
        }
    }

    fn on_downtime(&mut self, session: SessionId, id: MigrationId, downtime: ObservedDowntime) {
        let kind = MessageKind::Downtime;
        let Some(c) = self.conns.get_mut(&session) else {
            return;
        };
        match c.reportable.iter_mut().find(|(m, _)| *m == id) {
            Some((_, true)) => {
                self.note(session, kind, ServerEvent::Repeated { session, kind });
            }
            Some((_, reported)) => {
                *reported = true;
                let Some(client_id) = c.client_id().cloned() else {
                    return;
                };
                self.push_event(ServerEvent::DowntimeReported {
                    session,
                    client_id,
                    migration_id: id,
                    downtime,
                });
            }
            None => {
                let active = self.migration.map(|m| m.id);
                let why = if active == Some(id) {
                    Ignored::NotFinished
                } else {
                    Ignored::WrongMigration { active, got: id }
                };
                self.ignore(session, kind, why);
            }
        }
    }

    fn answered(&mut self, session: SessionId, kind: MessageKind, id: MigrationId) {
        if let Some(r) = &mut self.round
            && let Some(name) = self.conns.get(&session).and_then(Conn::client_id)
        {
            r.acked.push((session, name.clone()));
        }
        self.push_event(ServerEvent::Answered {
            session,
            kind,
            migration_id: id,
        });
    }

    // ---- rounds ----

    fn check_round(&mut self, now: Timestamp) {
        if self.round.as_ref().is_some_and(|r| r.waiting.is_empty()) {
            self.finish_round(now, false);
        }
    }

    fn finish_round(&mut self, now: Timestamp, deadline_passed: bool) {
        let Some(mut r) = self.round.take() else {
            return;
        };
        for (session, _) in std::mem::take(&mut r.waiting) {
            if let Some(name) = self.conns.get(&session).and_then(Conn::client_id) {
                r.missing.push((session, name.clone()));
            }
        }
        r.acked.sort_by_key(|(s, _)| *s);
        r.missing.sort_by_key(|(s, _)| *s);
        r.cannot_follow.sort();
        let report = RoundReport {
            kind: r.kind,
            migration_id: r.migration_id,
            acked: r.acked,
            missing: r.missing,
            started: r.started,
            ended: now,
            deadline_passed,
            cannot_follow: r.cannot_follow,
        };
        let ev = match r.kind {
            RoundKind::Quiesce => ServerEvent::QuiesceComplete(report),
            RoundKind::Announce => ServerEvent::AnnounceComplete(report),
            RoundKind::Abort => {
                self.end_migration();
                ServerEvent::AbortComplete(report)
            }
        };
        self.push_event(ev);
    }

    fn end_migration(&mut self) {
        self.migration = None;
        self.registry.reset();
        for c in self.conns.values_mut() {
            c.told = None;
            c.migrate_acked = false;
            c.noted = 0;
        }
    }

    /// Sends `msg(session)` to every registered session that can hear it; the others are
    /// returned as missing. Nothing is sent if encoding fails.
    fn start_round(
        &mut self,
        kind: RoundKind,
        migration_id: MigrationId,
        deadline: Duration,
        now: Timestamp,
        targets: Vec<(SessionId, u8)>,
        msg: &Message,
    ) -> Result<Vec<SessionId>, ServerError> {
        let mut probe = Vec::new();
        encode(msg, &mut probe)?;
        let mut round = Round {
            kind,
            migration_id,
            started: now,
            deadline: now + deadline,
            waiting: BTreeMap::new(),
            acked: Vec::new(),
            missing: Vec::new(),
            // Every plain session: none can be told, whatever the round asks.
            cannot_follow: self
                .conns
                .iter()
                .filter(|(_, c)| c.phase == Phase::Plain)
                .map(|(s, _)| *s)
                .collect(),
        };
        let mut told = Vec::new();
        for (session, owed) in targets {
            let Some(c) = self.conns.get(&session) else {
                continue;
            };
            let Some(name) = c.client_id().cloned() else {
                continue;
            };
            if c.phase != Phase::Open {
                round.missing.push((session, name));
                continue;
            }
            self.transmit(session, msg)?;
            if let Some(c) = self.conns.get_mut(&session) {
                c.told = Some(msg.kind());
            }
            round.waiting.insert(session, owed);
            told.push(session);
        }
        self.round = Some(round);
        self.check_round(now);
        Ok(told)
    }

    fn refuse_if_round(&self) -> Result<(), ServerError> {
        match &self.round {
            Some(r) => Err(ServerError::RoundInProgress {
                kind: r.kind,
                migration_id: r.migration_id,
            }),
            None => Ok(()),
        }
    }

    /// Opens the optional first phase: `Quiesce` to every reachable session, answered by
    /// `Quiesced` within `deadline`. Returns the sessions told. Its end is a
    /// [`ServerEvent::QuiesceComplete`].
    ///
    /// # Errors
    /// [`ServerError::MigrationInProgress`], [`ServerError::Encode`].
    pub fn quiesce(
        &mut self,
        migration_id: MigrationId,
        deadline: Duration,
        now: Timestamp,
    ) -> Result<Vec<SessionId>, ServerError> {
        if let Some(m) = self.migration {
            return Err(ServerError::MigrationInProgress {
                active: m.id,
                requested: migration_id,
            });
        }
        let msg = Message::Quiesce {
            migration_id,
            deadline_ms: millis(deadline),
        };
        let targets = self.registry.iter().map(|(s, _)| (s, 1)).collect();
        let told = self.start_round(
            RoundKind::Quiesce,
            migration_id,
            deadline,
            now,
            targets,
            &msg,
        )?;
        self.migration = Some(Migration {
            id: migration_id,
            step: Step::Quiesce,
            ack_deadline: None,
            patience: deadline,
        });
        Ok(told)
    }

    /// Tells every reachable session that the server moves to `new_addr` (`Migrate`) and waits
    /// for their acks until `now + deadline`. Returns the sessions told; the end is a
    /// [`ServerEvent::AnnounceComplete`] (at once when nobody can be told). Allowed when idle
    /// or after the quiesce round of the same migration.
    ///
    /// # Errors
    /// [`ServerError::MigrationInProgress`], [`ServerError::RoundInProgress`] (the quiesce
    /// round still waits), [`ServerError::Encode`].
    pub fn announce(
        &mut self,
        migration_id: MigrationId,
        new_addr: SocketAddr,
        deadline: Duration,
        now: Timestamp,
    ) -> Result<Vec<SessionId>, ServerError> {
        match self.migration {
            Some(m) if m.id != migration_id || m.step != Step::Quiesce => {
                return Err(ServerError::MigrationInProgress {
                    active: m.id,
                    requested: migration_id,
                });
            }
            _ => {}
        }
        self.refuse_if_round()?;
        let msg = Message::Migrate {
            migration_id,
            new_addr,
            deadline_ms: millis(deadline),
            token: None,
        };
        let mut probe = Vec::new();
        encode(&msg, &mut probe)?;
        let registered = self
            .registry
            .tell_all(migration_id, now, deadline)
            .map_err(|_| ServerError::MigrationInProgress {
                active: self.registry.active_migration().unwrap_or(migration_id),
                requested: migration_id,
            })?;
        let targets = registered.into_iter().map(|s| (s, 1)).collect();
        self.migration = Some(Migration {
            id: migration_id,
            step: Step::Announced { new_addr },
            ack_deadline: Some(now + deadline),
            patience: deadline,
        });
        self.start_round(
            RoundKind::Announce,
            migration_id,
            deadline,
            now,
            targets,
            &msg,
        )
    }

    /// The move failed: tells every session that was told about the migration to swap back
    /// to `fallback_addr` (`MigrateAborted`) and waits for their acks until `now + deadline`.
    /// A quiesce or announce round still waiting ends first (its report is emitted). The
    /// migration ends with [`ServerEvent::AbortComplete`]. Returns the sessions told.
    ///
    /// # Errors
    /// [`ServerError::NoMigration`], [`ServerError::RoundInProgress`] (already aborting),
    /// [`ServerError::Encode`].
    pub fn abort(
        &mut self,
        fallback_addr: SocketAddr,
        deadline: Duration,
        now: Timestamp,
    ) -> Result<Vec<SessionId>, ServerError> {
        let m = self.migration.ok_or(ServerError::NoMigration)?;
        if m.step == Step::Aborting {
            return Err(ServerError::RoundInProgress {
                kind: RoundKind::Abort,
                migration_id: m.id,
            });
        }
        let msg = Message::MigrateAborted {
            migration_id: m.id,
            fallback_addr,
        };
        let mut probe = Vec::new();
        encode(&msg, &mut probe)?;
        self.finish_round(now, false);
        let targets = self
            .registry
            .iter()
            .filter_map(|(s, _)| {
                let c = self.conns.get(&s)?;
                let owed = match c.told? {
                    MessageKind::Migrate if !c.migrate_acked => 2,
                    _ => 1,
                };
                Some((s, owed))
            })
            .collect();
        self.migration = Some(Migration {
            step: Step::Aborting,
            ..m
        });
        let told = self.start_round(RoundKind::Abort, m.id, deadline, now, targets, &msg)?;
        // The outcome is decided: whoever hears it may report its pause.
        for s in &told {
            if let Some(c) = self.conns.get_mut(s) {
                c.may_report(m.id);
            }
        }
        Ok(told)
    }

    /// The server runs at its new address: `Resumed` to every reachable session that was told
    /// `Migrate`, and the migration ends. An announce round still waiting ends first (its
    /// report is emitted). Returns how many sessions were told.
    ///
    /// # Errors
    /// [`ServerError::NoMigration`], [`ServerError::NotAnnounced`] (only quiesced),
    /// [`ServerError::RoundInProgress`] (aborting), [`ServerError::Encode`].
    pub fn resumed(&mut self, now: Timestamp) -> Result<usize, ServerError> {
        let m = self.migration.ok_or(ServerError::NoMigration)?;
        match m.step {
            Step::Quiesce => return Err(ServerError::NotAnnounced(m.id)),
            Step::Aborting => {
                return Err(ServerError::RoundInProgress {
                    kind: RoundKind::Abort,
                    migration_id: m.id,
                });
            }
            Step::Announced { .. } => {}
        }
        let msg = Message::Resumed { migration_id: m.id };
        let mut probe = Vec::new();
        encode(&msg, &mut probe)?;
        self.finish_round(now, false);
        let sessions: Vec<SessionId> = self.registry.iter().map(|(s, _)| s).collect();
        let mut told = 0;
        for s in sessions {
            let hears = self
                .conns
                .get(&s)
                .is_some_and(|c| c.phase == Phase::Open && c.told == Some(MessageKind::Migrate));
            if hears {
                self.transmit(s, &msg)?;
                told += 1;
                if let Some(c) = self.conns.get_mut(&s) {
                    c.may_report(m.id);
                }
            }
            // Every session's connection moved with the process, told or not.
            let _ = self.registry.resumed(s, now);
        }
        self.end_migration();
        Ok(told)
    }
}
