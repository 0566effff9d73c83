//! The server wrapper: any quinn server application, made migratable. It is the I/O around
//! control-protocol's sans-I/O [`ServerControl`].
//!
//! ```text
//!  MigratableUdp (rebind / park / unpark)
//!        │
//!  quinn::Endpoint ──accept──► handshake ──ALPN qlm1+app──► ServerControl::on_connect ──► id
//!        │                              └─ALPN app (plain)─► on_connect_plain ──► at once ─┐
//!        │            first bi stream ──stream task──► on_bytes / on_stream_finished         │
//!        │                                  ▲                 │
//!        │                  Transmit / Close / Finish   Mutex<Core>: ServerControl
//!        │                                  └──── dispatch ◄──┤ poll_output()
//!        │                                timer task ─────────┤ poll_timeout / handle_timeout
//!        └──► AppConnection { connection, session, client_id, plain } ◄────────────────────┘
//!                 ──► your application
//!
//!  MigrationHandle: announce / quiesce / abort / resumed ──► ServerControl round
//!                   ──► waits for the round's report (RoundReport ──► AnnounceReport);
//!                   rebind / park / unpark the socket.
//!  DowntimeReported events ──► the downtime log (last 8 migrations) ──► downtime_reports(id),
//!                   downtime_changes() (the binary writes it to the admin directory)
//! ```
//!
//! # Use it in your own app
//!
//! Bind with your own quinn `ServerConfig` (TLS, ALPN, `TransportConfig`: the wrapper adds
//! nothing to it), accept connections as with quinn, and drive moves with the
//! [`MigrationHandle`]. Depend on `swrapper` with `default-features = false` (the `demo`
//! feature is the demo binary's) and on quinn; everything the API names is re-exported here.
//!
//! ```no_run
//! # async fn app(config: quinn::ServerConfig) -> Result<(), swrapper::ServerError> {
//! use swrapper::{IncomingAction, MigratableServer, ServerOptions};
//!
//! let opts = ServerOptions::with_server_config("0.0.0.0:4433".parse().unwrap(), config)
//!     // Optional: see every connection before its handshake (refuse, retry, ignore).
//!     .filter_incoming(|incoming| if incoming.remote_address_validated() {
//!         IncomingAction::Accept
//!     } else {
//!         IncomingAction::Retry
//!     });
//! let server = MigratableServer::bind(opts)?; // checks the config: see below
//! let handle = server.handle(); // moves: announce, park/unpark or rebind, resumed or abort
//! while let Some(app) = server.accept().await {
//!     // app.connection is a quinn::Connection. From a cwrapper client (app.plain false)
//!     // its first bi stream is the wrapper's; from a plain client every stream is yours.
//!     tokio::spawn(async move { let _ = app.connection.accept_bi().await; });
//! }
//! # Ok(()) }
//! ```
//!
//! **What a move needs from the configuration** (checked by [`MigratableServer::bind`], a
//! typed [`ConfigError`] otherwise): an idle timeout of at least the longest freeze
//! ([`ServerOptions::max_freeze`], by default the clients' 10 s overlap cap) plus
//! [`IDLE_MARGIN`] (5 s), or none; keep-alive does not matter (nothing answers while the
//! server is frozen; without keep-alive an idle connection lives as long as the idle timeout
//! allows); and at least one bidirectional stream per client (`max_concurrent_bidi_streams`
//! of 1 or more): the control stream takes one, so allow one more than the application needs.
//!
//! **The marker ALPN, and plain QUIC clients.** A wrapper-aware client (cwrapper) offers each
//! application ALPN `x` also as `qlm1+x` (see [`control_protocol::alpn`]); the server must
//! list the marked forms first: [`server_config`] does, and an application that builds its
//! own rustls config sets `alpn_protocols = swrapper::alpn_with_control(&[b"h3"])?`. rustls
//! then negotiates `qlm1+x` with cwrapper clients and `x` with any other QUIC client. The
//! marked form means "the first bidirectional stream is the control stream"; an application
//! that checks its ALPN reads it with [`app_alpn`] (the marker stripped). A client that
//! negotiated no marker (a stock quinn client, aioquic's HTTP/3 client) is a *plain
//! client*: it gets the application at once with all its streams (its first stream is the
//! application's), takes one of the `max_sessions` slots, has no hello deadline, and is
//! never told of a move. An announce lists it as `cannot_follow` in the report (which is then
//! not complete): it keeps working after a move only if its address stays, i.e. behind a
//! front (`control up --front`); in the announce mode it is cut off by the move. A server
//! whose config lists no marked form treats every client as plain.
//!
//! **The lifecycle of a move.** Every [`MigrationHandle::announce`] (or
//! [`MigrationHandle::prepare`]) ends with [`MigrationHandle::resumed`] (the server runs at
//! its new address: after [`MigrationHandle::unpark`] or [`MigrationHandle::rebind`]) or
//! [`MigrationHandle::abort`] (the move failed: clients swap back); a
//! [`MigrationHandle::quiesce`] not followed by an announce ends with `abort`. Until then
//! the migration is in progress and a new one is refused
//! ([`ServerError::MigrationInProgress`]).
//!
//! ```text
//!  announce(id, new_addr) ──► park() ──► (freeze: checkpoint, transfer, restore)
//!        │                                ──► unpark(Some(new_addr)) / rebind(..) ──► resumed()
//!        └── any failure ──► unpark(None) if parked ──► abort(old_addr, deadline)
//! ```
//!
//! Every protocol decision (Hello and version negotiation, the session limit, the hello
//! deadline, who is told what, which ack counts, when a round ends) is `ServerControl`'s and
//! is tested there in virtual time. This crate only moves bytes between the quinn streams and
//! `ServerControl` (`Shared::with_core`: one short lock, then the outputs are executed), arms a
//! timer from `poll_timeout`, and turns reports into [`AnnounceReport`]s.
//!
//! The first bidirectional stream of every wrapper-aware connection (marker ALPN) is the
//! control stream. The wrapper
//! accepts it (QUIC hands peer-opened streams out in stream-id order, so the first accepted
//! bi stream is stream 0) and waits for the outcome of `Hello` before the connection reaches
//! the application, which then accepts the connection's other streams as usual. A control
//! stream that carries garbage is closed with an error code; the connection and the
//! application carry on, but that client cannot be told about a move (it shows up as "no ack"
//! in the announce report).
//!
//! Bounded work per client: every connection takes one of `max_sessions` slots from its
//! handshake until it closes, whether it says Hello or not (`ServerControl::on_connect`), and
//! a plain client too (`ServerControl::on_connect_plain`, no hello deadline); one beyond the
//! limit is closed at once ("server full", code 1), and a wrapper-aware one that says no Hello
//! within `hello_timeout` is closed ("no Hello in time", code 2), which frees its slot.
//! Repeated messages are counted, not logged (one line per session and kind); refused
//! connections are logged at the 1st, 2nd, 4th, 8th, ... refusal.

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

pub use admin_api::Phases;
pub use admin_api::{DowntimeLog, MigrationDowntimeReports, ReportedDowntime};
use control_protocol::{
    ClientId, CloseCode, Refusal, RoundKind, RoundReport, ServerConfig, ServerControl, ServerEvent,
    ServerOutput,
};
use migration_core::Timestamp;
use serde::Serialize;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tracing::{debug, info, warn};
use udp_shim_server::MigratableUdp;
use wrapper_support::MonotonicClock;

// Everything the public API names, so that an application depends on swrapper and quinn only.
pub use control_protocol::AlpnError;
pub use control_protocol::ServerError as ControlError;
pub use migration_core::{MigrationId, ParseMigrationIdError, SessionId, SessionState};
pub use quinn;
pub use udp_shim_server::ShimError;
pub use wrapper_support::quic::Side;
pub use wrapper_support::tls::app_alpn;
pub use wrapper_support::{
    ConfigError, DEFAULT_MAX_FREEZE, GeneratedPem, IDLE_MARGIN, Identity, TlsError, TransportFacts,
    min_idle_timeout, random_migration_id,
};

#[cfg(feature = "demo")]
pub mod ballast;
#[cfg(feature = "demo")]
mod demo;
mod options;

#[cfg(feature = "demo")]
pub use demo::serve_echo;
pub use options::{IncomingAction, IncomingFilter, ServerOptions, ServerQuic};

/// How long a park or a re-creation waits for the old descriptor to close.
const RETIRE_WAIT: Duration = Duration::from_secs(1);

/// Largest chunk read from a control stream at once.
const READ_CHUNK: usize = 4096;

/// How many migrations' downtime reports the server keeps (as many as a session may report).
const DOWNTIME_MIGRATIONS: usize = 8;

/// Most downtime reports kept per migration. Each session reports once per migration it was
/// told about, so this is only reached with thousands of clients; beyond it reports are
/// dropped (and counted in the log).
const MAX_DOWNTIME_REPORTS: usize = 4096;

/// Application close code of a connection refused because every slot is taken.
pub const CONN_FULL: quinn::VarInt = quinn::VarInt::from_u32(1);

/// Application close code of a connection that said no Hello within the hello timeout.
pub const CONN_NO_HELLO: quinn::VarInt = quinn::VarInt::from_u32(2);

/// The quinn server configuration [`ServerOptions::new`] builds (TLS 1.3 with `identity`,
/// offering `alpn`, quinn's default transport but for `idle_timeout`): a starting point for an
/// application that adjusts it and passes it to [`ServerOptions::with_server_config`].
pub fn server_config(
    identity: Identity,
    alpn: &[&[u8]],
    idle_timeout: Duration,
) -> Result<quinn::ServerConfig, TlsError> {
    let transport = wrapper_support::tls::transport_config(idle_timeout)?;
    wrapper_support::tls::server_config(identity, alpn, transport)
}

/// The ALPN list for an application that builds its own rustls `ServerConfig`: each of
/// `app_alpns` marked (`qlm1+x`, first, so that cwrapper clients negotiate it) then plain (for
/// plain QUIC clients). Set it as the config's `alpn_protocols`.
///
/// # Errors
/// [`AlpnError`] for an empty entry, one too long to mark (over 250 bytes), or one already
/// starting with the marker.
pub fn alpn_with_control(app_alpns: &[&[u8]]) -> Result<Vec<Vec<u8>>, AlpnError> {
    control_protocol::alpn::with_control(app_alpns)
}

/// Errors of the server wrapper.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The TLS configuration could not be built.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The quinn configuration cannot carry a move (idle timeout too short, no stream for
    /// the control stream, ...): the message says what to set.
    #[error("quinn configuration: {0}")]
    Config(#[from] ConfigError),
    /// The socket could not be bound, rebound or unparked.
    #[error("socket: {0}")]
    Socket(#[from] udp_shim_server::ShimError),
    /// quinn refused the endpoint or the socket swap.
    #[error("endpoint: {0}")]
    Endpoint(#[source] io::Error),
    /// A migration is already being announced.
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
    /// The control core refused the operation for another reason (a round still waiting,
    /// resuming a migration that was only quiesced, ...).
    #[error(transparent)]
    Control(ControlError),
    /// The round's report never came (the server is shutting down).
    #[error("the control core dropped the request")]
    Interrupted,
}

/// A connection handed to the application, its control stream already running.
#[derive(Debug, Clone)]
pub struct AppConnection {
    /// The QUIC connection. Accept its bidirectional streams: for a wrapper-aware client the
    /// control stream is taken; for a plain client none is.
    pub connection: quinn::Connection,
    /// The wrapper's identifier of the session.
    pub session: SessionId,
    /// What the client called itself in Hello, when its control stream worked.
    pub client_id: Option<String>,
    /// A plain QUIC client (no marker ALPN): no control stream, cannot be told of a move.
    pub plain: bool,
}

/// The outcome of announcing a migration (or an abort) to every client.
#[derive(Debug, Clone, Serialize)]
pub struct AnnounceReport {
    /// The migration.
    pub migration_id: String,
    /// Where the clients were sent.
    pub address: SocketAddr,
    /// Clients that acknowledged in time: (session, client id).
    pub acked: Vec<(u64, String)>,
    /// Clients that did not: (session, client id).
    pub missing: Vec<(u64, String)>,
    /// Plain QUIC clients (no control stream), by session: not told, not waited for. They
    /// keep working only if their address stays, i.e. behind a front.
    pub cannot_follow: Vec<u64>,
    /// Time from the announcement to the last ack (or the deadline).
    pub elapsed_ms: f64,
}

impl AnnounceReport {
    /// Every client acknowledged: none missing, and no plain client that could not be told.
    pub fn complete(&self) -> bool {
        self.missing.is_empty() && self.cannot_follow.is_empty()
    }
}

/// The outcome of [`MigrationHandle::prepare`].
#[derive(Debug, Clone, Serialize)]
pub struct Prepared {
    /// The mode run.
    pub phases: Phases,
    /// Two-phase only: the quiesce round (`acked` are the clients that answered
    /// `Quiesced`).
    pub quiesce: Option<AnnounceReport>,
    /// The announce round.
    pub announce: AnnounceReport,
}

/// A session as the wrapper sees it.
#[derive(Debug, Clone, Serialize)]
pub struct SessionInfo {
    /// The wrapper's identifier.
    pub session: u64,
    /// The client's name for itself.
    pub client_id: String,
    /// Where it is in the current migration.
    pub state: SessionState,
    /// Whether its control stream is open.
    pub control_open: bool,
    /// Messages from it that repeated or were ignored without a log line.
    pub repeats: u64,
    /// A plain QUIC client: no control stream, an empty `client_id`.
    pub plain: bool,
}

/// What a connection's stream task must do with its control stream.
#[derive(Debug)]
enum StreamCmd {
    Write(Vec<u8>),
    Close(CloseCode),
    Finish,
}

/// How a connection's control setup ended, for the task that hands it to the application.
#[derive(Debug)]
enum Setup {
    /// Hello accepted.
    Registered(ClientId),
    /// No usable control stream (garbage, no Hello in time, no common version).
    NoControl,
    /// Refused because the server is full: close the connection.
    Full,
    /// No Hello before the hello deadline: close the connection (it frees its slot).
    NoHello,
}

/// `ServerControl` and where its outputs go. Only ever locked briefly, never across an await.
#[derive(Debug)]
struct Core {
    control: ServerControl,
    /// Each connection's stream task (created at connect, so nothing is lost before the
    /// control stream is accepted).
    streams: BTreeMap<SessionId, mpsc::UnboundedSender<StreamCmd>>,
    /// Connections waiting for the outcome of their Hello.
    setups: BTreeMap<SessionId, oneshot::Sender<Setup>>,
    /// `announce` / `abort` / `quiesce` callers waiting for their round's report.
    waiters: Vec<(RoundKind, oneshot::Sender<RoundReport>)>,
    /// The clients' downtime reports of the last [`DOWNTIME_MIGRATIONS`] migrations, oldest
    /// first.
    downtimes: VecDeque<MigrationDowntimeReports>,
    /// Bumped at each downtime report.
    downtime_changes: watch::Sender<u64>,
}

impl Core {
    /// Executes every output of the `ServerControl`: bytes and closes to the stream tasks,
    /// events to logs and waiters.
    fn dispatch(&mut self) {
        while let Some(out) = self.control.poll_output() {
            match out {
                ServerOutput::Transmit { session, bytes } => {
                    self.stream(session, StreamCmd::Write(bytes))
                }
                ServerOutput::Close { session, code } => {
                    self.stream(session, StreamCmd::Close(code))
                }
                ServerOutput::Finish { session } => self.stream(session, StreamCmd::Finish),
                ServerOutput::Event(e) => self.on_event(e),
                other => warn!(?other, "unknown control output"),
            }
        }
    }

    fn stream(&mut self, session: SessionId, cmd: StreamCmd) {
        if let Some(tx) = self.streams.get(&session) {
            // Err only when the stream task has ended; the stream is gone anyway.
            let _ = tx.send(cmd);
        }
    }

    fn setup(&mut self, session: SessionId, outcome: Setup) {
        if let Some(tx) = self.setups.remove(&session) {
            let _ = tx.send(outcome);
        }
    }

    fn on_event(&mut self, e: ServerEvent) {
        match e {
            ServerEvent::Registered {
                session,
                client_id,
                version,
            } => {
                info!(
                    ?session,
                    client = client_id.as_str(),
                    version,
                    "client registered"
                );
                self.setup(session, Setup::Registered(client_id));
            }
            ServerEvent::Refused { session, refusal } => {
                warn!(?session, ?refusal, "refusing session");
                let outcome = match refusal {
                    Refusal::Full { .. } => Setup::Full,
                    _ => Setup::NoControl,
                };
                self.setup(session, outcome);
            }
            ServerEvent::HelloTimeout { session } => {
                warn!(?session, "no Hello in time; closing the connection");
                self.setup(session, Setup::NoHello);
            }
            ServerEvent::ControlClosed {
                session,
                code,
                cause,
            } => {
                warn!(?session, %code, ?cause, "control stream closed");
                self.setup(session, Setup::NoControl);
            }
            ServerEvent::QuiesceComplete(r)
            | ServerEvent::AnnounceComplete(r)
            | ServerEvent::AbortComplete(r) => {
                info!(kind = %r.kind, id = %r.migration_id, acked = r.acked.len(), missing = r.missing.len(), cannot_follow = r.cannot_follow.len(), deadline_passed = r.deadline_passed, "round complete");
                let waiters = std::mem::take(&mut self.waiters);
                for (kind, tx) in waiters {
                    if kind == r.kind {
                        let _ = tx.send(r.clone());
                    } else {
                        self.waiters.push((kind, tx));
                    }
                }
            }
            ServerEvent::ClientBye { session, reason } => {
                info!(?session, reason = reason.as_str(), "client said bye");
            }
            ServerEvent::DowntimeReported {
                session,
                client_id,
                migration_id,
                downtime,
            } => {
                info!(?session, client = client_id.as_str(), id = %migration_id, %downtime, "client reported its downtime");
                self.record_downtime(
                    migration_id,
                    ReportedDowntime {
                        session: session.0,
                        client_id: client_id.as_str().to_owned(),
                        downtime_us: downtime.as_micros(),
                    },
                );
            }
            other => debug!(?other, "control event"),
        }
    }

    fn record_downtime(&mut self, id: MigrationId, report: ReportedDowntime) {
        let i = match self.downtimes.iter().position(|m| m.migration_id == id) {
            Some(i) => i,
            None => {
                if self.downtimes.len() == DOWNTIME_MIGRATIONS {
                    self.downtimes.pop_front();
                }
                self.downtimes.push_back(MigrationDowntimeReports {
                    migration_id: id,
                    reports: Vec::new(),
                });
                self.downtimes.len() - 1
            }
        };
        let Some(m) = self.downtimes.get_mut(i) else {
            return;
        };
        if m.reports.len() >= MAX_DOWNTIME_REPORTS {
            debug!(%id, "downtime report dropped: {MAX_DOWNTIME_REPORTS} kept already");
            return;
        }
        m.reports.push(report);
        self.downtime_changes
            .send_modify(|n| *n = n.wrapping_add(1));
    }
}

#[derive(Debug)]
struct Shared {
    socket: Arc<MigratableUdp>,
    endpoint: quinn::Endpoint,
    clock: MonotonicClock,
    core: Mutex<Core>,
    /// Wakes the timer task when `poll_timeout` may have changed.
    timer: Arc<Notify>,
    handshakes: AtomicU64,
    /// Connections refused because every slot was taken.
    refused: AtomicU64,
}

impl Shared {
    fn core(&self) -> MutexGuard<'_, Core> {
        // A panic while holding the lock cannot leave the state half-updated in a way that
        // matters more than stopping the server would; keep serving.
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The one place the wrapper touches `ServerControl`: runs `f` at the current time, then
    /// executes the outputs and re-arms the timer.
    fn with_core<R>(&self, f: impl FnOnce(&mut Core, Timestamp) -> R) -> R {
        let now = self.clock.now();
        let mut core = self.core();
        let r = f(&mut core, now);
        core.dispatch();
        drop(core);
        self.timer.notify_one();
        r
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Lets the timer task see that the server is gone.
        self.timer.notify_one();
    }
}

/// Calls `handle_timeout` when `poll_timeout` says so. Ends with the server.
async fn timer_loop(shared: Weak<Shared>, wake: Arc<Notify>) {
    loop {
        let next = {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            let next = shared.core().control.poll_timeout();
            next.map(|t| tokio::time::Instant::from_std(shared.clock.instant(t)))
        };
        match next {
            Some(at) => {
                tokio::select! {
                    () = tokio::time::sleep_until(at) => {
                        let Some(shared) = shared.upgrade() else {
                            return;
                        };
                        shared.with_core(|core, now| core.control.handle_timeout(now));
                    }
                    () = wake.notified() => {}
                }
            }
            None => wake.notified().await,
        }
    }
}

fn control_error(e: ControlError) -> ServerError {
    match e {
        ControlError::MigrationInProgress { active, requested } => {
            ServerError::MigrationInProgress { active, requested }
        }
        ControlError::NoMigration => ServerError::NoMigration,
        other => ServerError::Control(other),
    }
}

/// A quinn server on a migratable socket.
#[derive(Debug)]
pub struct MigratableServer {
    shared: Arc<Shared>,
    incoming: tokio::sync::Mutex<mpsc::Receiver<AppConnection>>,
}

impl MigratableServer {
    /// Checks the quinn configuration ([`ServerOptions::check`]: a [`ServerError::Config`]
    /// says what a move needs), binds the socket and starts accepting connections. Call
    /// inside a tokio runtime.
    pub fn bind(opts: ServerOptions) -> Result<Self, ServerError> {
        let facts = opts.check()?;
        debug!(?facts, "quinn transport checked");
        let server_config = opts.quic.into_config()?;
        let socket = Arc::new(MigratableUdp::bind(opts.listen)?);
        // The shim is the endpoint's socket, as in `udp_shim_server::server_endpoint`, with
        // the application's endpoint configuration.
        let endpoint = quinn::Endpoint::new_with_abstract_socket(
            opts.endpoint_config,
            Some(server_config),
            socket.clone(),
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(ServerError::Endpoint)?;
        let timer = Arc::new(Notify::new());
        let shared = Arc::new(Shared {
            socket,
            endpoint,
            clock: MonotonicClock::new(),
            core: Mutex::new(Core {
                control: ServerControl::new(ServerConfig::new(
                    opts.max_sessions,
                    opts.hello_timeout,
                )),
                streams: BTreeMap::new(),
                setups: BTreeMap::new(),
                waiters: Vec::new(),
                downtimes: VecDeque::new(),
                downtime_changes: watch::Sender::new(0),
            }),
            timer: timer.clone(),
            handshakes: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        });
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(timer_loop(Arc::downgrade(&shared), timer));
        tokio::spawn(accept_loop(shared.clone(), tx, opts.incoming_filter));
        Ok(Self {
            shared,
            incoming: tokio::sync::Mutex::new(rx),
        })
    }

    /// The socket's current local address.
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.socket.local_addr()
    }

    /// The next connection for the application; `None` once the endpoint is closed.
    pub async fn accept(&self) -> Option<AppConnection> {
        self.incoming.lock().await.recv().await
    }

    /// The quinn endpoint, for what the wrapper does not wrap: its statistics, open
    /// connections' count, `set_server_config` (not checked: keep what a move needs), `close`,
    /// `wait_idle`. Do not call its `accept` (the wrapper's accept task takes every incoming
    /// connection: use [`ServerOptions::filter_incoming`] to see them first) nor its `rebind`
    /// (use [`MigrationHandle::rebind`], which keeps the migratable socket).
    pub fn endpoint(&self) -> &quinn::Endpoint {
        &self.shared.endpoint
    }

    /// A handle to migrate, rebind, park and inspect; cheap to clone.
    pub fn handle(&self) -> MigrationHandle {
        MigrationHandle {
            shared: self.shared.clone(),
        }
    }
}

/// Drives migrations of a [`MigratableServer`].
#[derive(Debug, Clone)]
pub struct MigrationHandle {
    shared: Arc<Shared>,
}

impl MigrationHandle {
    /// The quinn endpoint (see [`MigratableServer::endpoint`]).
    pub fn endpoint(&self) -> &quinn::Endpoint {
        &self.shared.endpoint
    }

    /// Handshakes completed since the server started (a migration must not add any).
    pub fn handshakes(&self) -> u64 {
        self.shared.handshakes.load(Ordering::Relaxed)
    }

    /// The sessions the server holds.
    pub fn sessions(&self) -> Vec<SessionInfo> {
        self.shared
            .core()
            .control
            .sessions()
            .into_iter()
            .map(|v| SessionInfo {
                session: v.session.0,
                client_id: v.client_id.as_str().to_owned(),
                state: v.state,
                control_open: v.control_open,
                repeats: v.repeats,
                plain: v.plain,
            })
            .collect()
    }

    /// Connections closed at once because every one of `max_sessions` slots was taken.
    pub fn refused_connections(&self) -> u64 {
        self.shared.refused.load(Ordering::Relaxed)
    }

    /// Connections the server holds, registered or still to say Hello (each takes a slot).
    pub fn connections(&self) -> usize {
        self.shared.core().control.connections()
    }

    /// Client messages that repeated or were ignored without a log line, over every session
    /// (see [`ServerControl`]'s rate limiting).
    pub fn repeats(&self) -> u64 {
        self.shared.core().control.repeats()
    }

    /// The socket's current local address.
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.socket.local_addr()
    }

    /// The migration under way (from its first round until `resumed` or the end of its
    /// abort).
    pub fn active_migration(&self) -> Option<MigrationId> {
        self.shared.core().control.active_migration()
    }

    /// The downtimes the clients reported for migration `id` so far (in the order they came;
    /// the last 8 migrations are kept).
    pub fn downtime_reports(&self, id: MigrationId) -> Vec<ReportedDowntime> {
        self.shared
            .core()
            .downtimes
            .iter()
            .find(|m| m.migration_id == id)
            .map(|m| m.reports.clone())
            .unwrap_or_default()
    }

    /// Every kept migration's downtime reports, oldest first: what the binary writes to the
    /// admin directory (`downtime.json`).
    pub fn downtime_log(&self) -> DowntimeLog {
        DowntimeLog {
            migrations: self.shared.core().downtimes.iter().cloned().collect(),
        }
    }

    /// Changes at each downtime report.
    pub fn downtime_changes(&self) -> watch::Receiver<u64> {
        self.shared.core().downtime_changes.subscribe()
    }

    /// Waits up to `limit` until at least `expected` clients reported their downtime for
    /// migration `id`; returns the reports there are then.
    pub async fn wait_downtime_reports(
        &self,
        id: MigrationId,
        expected: usize,
        limit: Duration,
    ) -> Vec<ReportedDowntime> {
        let mut changes = self.downtime_changes();
        let enough = async {
            loop {
                if self.downtime_reports(id).len() >= expected {
                    return;
                }
                if changes.changed().await.is_err() {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(limit, enough).await;
        self.downtime_reports(id)
    }

    /// Starts a round in the `ServerControl` and waits for its report.
    async fn round(
        &self,
        kind: RoundKind,
        address: SocketAddr,
        start: impl FnOnce(&mut ServerControl, Timestamp) -> Result<MigrationId, ControlError>,
    ) -> Result<AnnounceReport, ServerError> {
        let (tx, rx) = oneshot::channel();
        let id = self.shared.with_core(|core, now| {
            let id = start(&mut core.control, now).map_err(control_error)?;
            // Registered before the outputs run, so a round that ends at once is not missed.
            core.waiters.push((kind, tx));
            Ok::<_, ServerError>(id)
        })?;
        info!(%kind, %id, %address, "round started");
        let r = rx.await.map_err(|_| ServerError::Interrupted)?;
        let names = |list: Vec<(SessionId, ClientId)>| {
            list.into_iter()
                .map(|(s, c)| (s.0, c.as_str().to_owned()))
                .collect()
        };
        Ok(AnnounceReport {
            migration_id: r.migration_id.to_string(),
            address,
            acked: names(r.acked),
            missing: names(r.missing),
            cannot_follow: r.cannot_follow.iter().map(|s| s.0).collect(),
            elapsed_ms: r.ended.saturating_duration_since(r.started).as_secs_f64() * 1e3,
        })
    }

    /// Tells every client that the server moves to `new_addr` and waits until every client
    /// has acknowledged or `deadline` has passed. Clients whose control stream is closed
    /// cannot be told and are reported missing at once; a client that connects meanwhile is
    /// told too and waited for (see [`ServerControl`]).
    pub async fn announce(
        &self,
        migration_id: MigrationId,
        new_addr: SocketAddr,
        deadline: Duration,
    ) -> Result<AnnounceReport, ServerError> {
        self.round(RoundKind::Announce, new_addr, |c, now| {
            c.announce(migration_id, new_addr, deadline, now)
                .map(|_| migration_id)
        })
        .await
    }

    /// The optional first phase: asks every client to stop sending (`Quiesce`) and waits for
    /// their `Quiesced` until `deadline`. Follow with [`MigrationHandle::announce`] of the same
    /// migration. The report's `address` is the server's current one.
    pub async fn quiesce(
        &self,
        migration_id: MigrationId,
        deadline: Duration,
    ) -> Result<AnnounceReport, ServerError> {
        self.round(RoundKind::Quiesce, self.local_addr(), |c, now| {
            c.quiesce(migration_id, deadline, now).map(|_| migration_id)
        })
        .await
    }

    /// Prepares the clients for a move, in the mode asked for, and returns the rounds'
    /// reports. [`Phases::One`]: the announce round alone (the seed's). [`Phases::Two`]: the
    /// quiesce round (every client finishes its in-flight requests, opens no new one and
    /// answers `Quiesced`, or is reported missing at `deadline`), then the announce round
    /// (`Migrate`, acks, at most `deadline` again). Park the socket afterwards; after the
    /// restore, [`MigrationHandle::unpark`] (or `rebind`) then [`MigrationHandle::resumed`]
    /// releases the clients, and [`MigrationHandle::abort`] releases them too.
    ///
    /// Why two rounds in sequence rather than `Migrate` and `Quiesce` back to back: the
    /// announce round after the quiesce round costs one more round trip on the control
    /// stream while the clients are already silent (1.2 ms median in-process, debug build,
    /// loaded machine: `tests/tests/two_phase.rs`), and keeps the protocol's ordering (a client learns the new address
    /// after it has stopped, and its `Ack` still means only "swapped"), with no change to
    /// either state machine.
    pub async fn prepare(
        &self,
        migration_id: MigrationId,
        new_addr: SocketAddr,
        deadline: Duration,
        phases: Phases,
    ) -> Result<Prepared, ServerError> {
        self.prepare_within(migration_id, new_addr, deadline, deadline, phases)
            .await
    }

    /// [`prepare`](Self::prepare) with a deadline of its own for the quiesce round (at most
    /// `deadline`): every client that quiesced is held until the slowest answers or
    /// `quiesce_deadline` passes, so it is usually much shorter than the acks' `deadline`. In two phases the announce
    /// round that follows holds them too, so it waits at most `quiesce_deadline` as well: a
    /// client that answered `Quiesced` acks `Migrate` within a round trip, and one that did
    /// not is told the address all the same but not waited for (it is reported missing).
    pub async fn prepare_within(
        &self,
        migration_id: MigrationId,
        new_addr: SocketAddr,
        quiesce_deadline: Duration,
        deadline: Duration,
        phases: Phases,
    ) -> Result<Prepared, ServerError> {
        let (quiesce, deadline) = match phases {
            Phases::One => (None, deadline),
            Phases::Two => {
                // Never longer than the acks' deadline: the orchestrator waits for the
                // announce by that deadline.
                let quiesce_deadline = quiesce_deadline.min(deadline);
                (
                    Some(self.quiesce(migration_id, quiesce_deadline).await?),
                    quiesce_deadline,
                )
            }
        };
        let announce = self.announce(migration_id, new_addr, deadline).await?;
        Ok(Prepared {
            phases,
            quiesce,
            announce,
        })
    }

    /// The move failed: tell every client that was told about it to swap back to
    /// `fallback_addr`, wait for their acks until `deadline`, and end the migration.
    pub async fn abort(
        &self,
        fallback_addr: SocketAddr,
        deadline: Duration,
    ) -> Result<AnnounceReport, ServerError> {
        self.round(RoundKind::Abort, fallback_addr, |c, now| {
            let id = c.active_migration().ok_or(ControlError::NoMigration)?;
            c.abort(fallback_addr, deadline, now).map(|_| id)
        })
        .await
    }

    /// The server runs at its new address: tell every client (`Resumed`) and end the
    /// migration. Returns how many clients were told.
    pub fn resumed(&self) -> Result<usize, ServerError> {
        self.shared
            .with_core(|core, now| core.control.resumed(now))
            .map_err(control_error)
    }

    /// Replaces the socket with a fresh one in the process's current network namespace, then
    /// has quinn send a PING on every connection from it. With `addr`, the new socket is bound
    /// there (it must be free); without, it is re-created on the address it has now (the old
    /// descriptor is closed first: what a process restored by CRIU needs, since the restored
    /// socket holds the port and lost some socket options).
    pub async fn rebind(&self, addr: Option<SocketAddr>) -> Result<SocketAddr, ServerError> {
        let local = match addr {
            Some(a) => self.shared.socket.rebind(a)?,
            None => self.shared.socket.recreate(RETIRE_WAIT).await?,
        };
        self.refresh()?;
        info!(%local, "rebound");
        Ok(local)
    }

    /// Swaps in a socket made elsewhere (for example by
    /// [`udp_shim_server::bind_in_netns`] in another network namespace).
    pub fn rebind_with(&self, socket: std::net::UdpSocket) -> Result<SocketAddr, ServerError> {
        let local = self.shared.socket.rebind_with(socket)?;
        self.refresh()?;
        info!(%local, "rebound to a given socket");
        Ok(local)
    }

    /// Closes the socket so that a checkpoint holds no inet socket, and waits until its
    /// descriptor is really closed; sends are dropped and nothing is received until
    /// [`MigrationHandle::unpark`].
    pub async fn park(&self) -> Result<(), ServerError> {
        self.shared.socket.park();
        self.shared.socket.wait_retired_closed(RETIRE_WAIT).await?;
        info!("socket parked");
        Ok(())
    }

    /// Binds again (by default the address it had; the same port on the unspecified address
    /// when that IP does not exist here) in whatever network namespace the process lives in
    /// now, and has quinn send a PING on every connection.
    pub fn unpark(&self, addr: Option<SocketAddr>) -> Result<SocketAddr, ServerError> {
        let local = match addr {
            Some(a) => self.shared.socket.unpark_at(a)?,
            None => self.shared.socket.unpark()?,
        };
        self.refresh()?;
        info!(%local, "unparked");
        Ok(local)
    }

    fn refresh(&self) -> Result<(), ServerError> {
        udp_shim_server::refresh_endpoint(&self.shared.endpoint, &self.shared.socket)
            .map_err(ServerError::Endpoint)
    }

    /// Whether the socket is parked.
    pub fn is_parked(&self) -> bool {
        self.shared.socket.is_parked()
    }

    /// Closes every connection and the endpoint.
    pub fn close(&self, reason: &str) {
        self.shared
            .endpoint
            .close(quinn::VarInt::from_u32(0), reason.as_bytes());
    }
}

async fn accept_loop(
    shared: Arc<Shared>,
    tx: mpsc::Sender<AppConnection>,
    filter: Option<IncomingFilter>,
) {
    while let Some(incoming) = shared.endpoint.accept().await {
        let Some(incoming) = filter_incoming(filter.as_ref(), incoming) else {
            continue;
        };
        let shared = shared.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            match incoming.await {
                Ok(conn) => {
                    shared.handshakes.fetch_add(1, Ordering::Relaxed);
                    if let Some(app) = setup_connection(shared, conn).await {
                        let _ = tx.send(app).await;
                    }
                }
                Err(e) => debug!(%remote, "handshake failed: {e}"),
            }
        });
    }
}

/// The application's say on an incoming connection: `Some` to accept it.
fn filter_incoming(
    filter: Option<&IncomingFilter>,
    incoming: quinn::Incoming,
) -> Option<quinn::Incoming> {
    let Some(filter) = filter else {
        return Some(incoming);
    };
    let remote = incoming.remote_address();
    match (filter.0)(&incoming) {
        IncomingAction::Accept => Some(incoming),
        IncomingAction::Refuse => {
            debug!(%remote, "incoming connection refused by the application");
            incoming.refuse();
            None
        }
        IncomingAction::Retry if incoming.may_retry() => {
            debug!(%remote, "incoming connection: address validation (Retry)");
            // `may_retry` was checked: an Err here gives the connection back, accept it then.
            incoming.retry().err().map(|e| e.into_incoming())
        }
        // The address is validated already: a Retry is not possible and not needed.
        IncomingAction::Retry => Some(incoming),
        IncomingAction::Ignore => {
            debug!(%remote, "incoming connection ignored by the application");
            incoming.ignore();
            None
        }
    }
}

/// Closes a connection refused because every slot is taken, logging floods sparsely.
fn refuse_full(shared: &Shared, conn: &quinn::Connection, refusal: &Refusal) {
    let n = shared.refused.fetch_add(1, Ordering::Relaxed) + 1;
    // A flood of connections is logged at the 1st, 2nd, 4th, 8th ... refusal.
    if n.is_power_of_two() {
        warn!(?refusal, refused = n, remote = %conn.remote_address(), "refusing connection");
    }
    conn.close(CONN_FULL, b"server full");
}

/// Frees the session's slot once its connection is gone.
fn watch_disconnect(shared: Arc<Shared>, conn: quinn::Connection, session: SessionId) {
    tokio::spawn(async move {
        let reason = conn.closed().await;
        info!(?session, "connection closed: {reason}");
        shared.with_core(|core, now| {
            core.control.on_disconnect(session, now);
            core.streams.remove(&session);
            core.setups.remove(&session);
        });
    });
}

/// Sets a connection up: a wrapper-aware client (marker ALPN) through its control stream
/// ([`setup_control`]); any other as a plain session, handed to the application at once.
///
/// The ALPN decides, not the streams: an application such as h3-quinn reads the raw
/// connection, so the wrapper must not take (or peek into) a plain client's first stream.
async fn setup_connection(shared: Arc<Shared>, conn: quinn::Connection) -> Option<AppConnection> {
    if wrapper_support::tls::speaks_control(&conn) {
        return setup_control(shared, conn).await;
    }
    let session = shared.with_core(|core, now| core.control.on_connect_plain(now));
    let session = match session {
        Ok(s) => s,
        Err(refusal) => {
            refuse_full(&shared, &conn, &refusal);
            return None;
        }
    };
    watch_disconnect(shared, conn.clone(), session);
    info!(
        ?session,
        remote = %conn.remote_address(),
        alpn = %String::from_utf8_lossy(&wrapper_support::tls::negotiated_alpn(&conn).unwrap_or_default()),
        "plain QUIC client (no control marker): served at once, cannot be told of a move"
    );
    Some(AppConnection {
        connection: conn,
        session,
        client_id: None,
        plain: true,
    })
}

/// Registers a wrapper-aware connection with `ServerControl`, accepts its control stream and
/// waits for the outcome of its Hello. A connection whose control stream fails still goes to
/// the application.
async fn setup_control(shared: Arc<Shared>, conn: quinn::Connection) -> Option<AppConnection> {
    let (setup_tx, mut setup_rx) = oneshot::channel();
    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
    let session = shared.with_core(|core, now| {
        let session = core.control.on_connect(now)?;
        core.streams.insert(session, cmd_tx);
        core.setups.insert(session, setup_tx);
        Ok::<_, Refusal>(session)
    });
    let session = match session {
        Ok(s) => s,
        Err(refusal) => {
            refuse_full(&shared, &conn, &refusal);
            return None;
        }
    };
    watch_disconnect(shared.clone(), conn.clone(), session);
    let app = |client_id: Option<String>| AppConnection {
        connection: conn.clone(),
        session,
        client_id,
        plain: false,
    };
    let stream = tokio::select! {
        bi = conn.accept_bi() => match bi {
            Ok((send, recv)) => {
                tokio::spawn(stream_task(shared.clone(), session, send, recv, cmd_rx))
            }
            Err(e) => {
                debug!(?session, "connection ended before its control stream: {e}");
                return None;
            }
        },
        // The hello deadline passed before the client even opened the stream.
        outcome = &mut setup_rx => {
            if let Ok(Setup::NoHello) = outcome {
                conn.close(CONN_NO_HELLO, b"no Hello in time");
                return None;
            }
            return outcome.ok().map(|_| app(None));
        }
    };
    match setup_rx.await {
        Ok(Setup::Registered(client_id)) => {
            info!(?session, client = client_id.as_str(), remote = %conn.remote_address(), "client connected");
            Some(app(Some(client_id.as_str().to_owned())))
        }
        Ok(Setup::NoControl) => Some(app(None)),
        Ok(Setup::Full) => {
            // The stream task writes the Bye, then closes the stream; then the connection goes.
            let _ = stream.await;
            conn.close(CONN_FULL, b"server full");
            None
        }
        Ok(Setup::NoHello) => {
            let _ = stream.await;
            conn.close(CONN_NO_HELLO, b"no Hello in time");
            None
        }
        // The connection closed before its Hello was answered.
        Err(_) => None,
    }
}

/// Moves bytes between one control stream and `ServerControl`, and executes the stream
/// commands `ServerControl`'s outputs became.
async fn stream_task(
    shared: Arc<Shared>,
    session: SessionId,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    mut cmds: mpsc::UnboundedReceiver<StreamCmd>,
) {
    let mut reading = true;
    loop {
        tokio::select! {
            chunk = recv.read_chunk(READ_CHUNK, true), if reading => match chunk {
                Ok(Some(chunk)) => shared.with_core(|core, now| {
                    core.control.on_bytes(session, &chunk.bytes, now);
                }),
                Ok(None) => {
                    reading = false;
                    debug!(?session, "client finished its control stream");
                    shared.with_core(|core, now| core.control.on_stream_finished(session, now));
                }
                Err(e) => {
                    reading = false;
                    debug!(?session, "control stream read failed: {e}");
                    shared.with_core(|core, now| core.control.on_stream_error(session, now));
                }
            },
            cmd = cmds.recv() => match cmd {
                Some(StreamCmd::Write(bytes)) => {
                    if let Err(e) = send.write_all(&bytes).await {
                        warn!(?session, "control send failed: {e}");
                        shared.with_core(|core, now| core.control.on_stream_error(session, now));
                    }
                }
                Some(StreamCmd::Close(code)) => {
                    let code = quinn::VarInt::from_u32(code.as_u32());
                    // Err only if already reset, finished or stopped: nothing left to do.
                    let _ = send.reset(code);
                    let _ = recv.stop(code);
                    break;
                }
                Some(StreamCmd::Finish) => {
                    let _ = send.finish();
                    break;
                }
                None => break,
            },
        }
    }
}
