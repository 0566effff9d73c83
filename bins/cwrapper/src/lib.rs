//! The client wrapper: a quinn client connection that follows its server when it moves.
//!
//! ```text
//!  app ──connection()──► quinn::Connection ──► SwappableUdp ──► real peer (swappable)
//!                                              (quinn sees one fixed fake peer)
//!  control task: first bi stream ── Hello ──►
//!                                 ◄── Welcome / Migrate / MigrateAborted / Resumed / Bye
//!    Migrate(id, addr): set_peer(addr) (old and new peer overlap), publish "migration
//!                       seen", Ack
//!    Resumed(id):       confirm_peer(addr of id): the overlap ends (authenticated: stream
//!                       data quinn decrypted, naming the migration)
//!    MigrateAborted:    set_peer(fallback) (and confirm_peer(fallback) if still overlapping)
//!    overlap cap:       the shim swaps back; the failure is published (failed_moves)
//!    Quiesce(id):       publish the hold (status.quiesce); the app answers with
//!                       confirm_quiesced() ──► Quiesced; Resumed or MigrateAborted release it
//!  app ──events()──► watch::Receiver<ClientStatus> (migration seen, resumed, failed moves,
//!                    quiesce hold, downtimes reported, control state)
//!  app ──report_downtime(id, pause)──► Downtime (once per migration, version 2 servers)
//!    no report within ClientOptions::auto_downtime after Resumed: the shim's pause instead
//! ```
//!
//! # Use it in your own app
//!
//! Dial with your own quinn `ClientConfig` (roots, ALPN, `TransportConfig` with keep-alive:
//! the wrapper adds nothing to it) through [`MigratingClient::connect`] instead of
//! `Endpoint::connect`, then use [`MigratingClient::connection`] as the quinn connection it
//! is. Depend on `cwrapper` with `default-features = false` (the `demo` feature is the demo
//! binary's) and on quinn; everything the API names is re-exported here.
//!
//! ```no_run
//! # async fn app(config: quinn::ClientConfig) -> Result<(), cwrapper::ClientError> {
//! use cwrapper::{ClientOptions, MigratingClient};
//!
//! let server = "203.0.113.7:4433".parse().unwrap();
//! let opts = ClientOptions::with_client_config(server, "example.org", config, "client-1");
//! let client = MigratingClient::connect(opts).await?; // checks the config: see below
//! let (mut send, _recv) = client.connection().open_bi().await?; // stream 0 is the wrapper's
//! # let _ = send.write_all(b"x").await;
//! # Ok(()) }
//! ```
//!
//! **What a move needs from the configuration** (checked by `connect`, a typed
//! [`ConfigError`] otherwise): an idle timeout of at least the overlap's time cap
//! ([`ClientOptions::overlap_limits`], 10 s: the longest freeze this client waits for) plus
//! [`IDLE_MARGIN`] (5 s), or none. Keep-alive is up to the application: it keeps an idle
//! connection open between moves but cannot carry it through a freeze (nothing answers); a
//! connection without it lives as long as its idle timeout while idle. The server's idle
//! timeout counts too (QUIC uses the smaller): swrapper checks its own side.
//!
//! **The marker ALPN.** The client offers each application ALPN `x` also as `qlm1+x`, first
//! (see [`control_protocol::alpn`]): [`client_config`] does, and an application with its own
//! rustls config sets `alpn_protocols = cwrapper::alpn_with_control(&[b"x"])?`. A swrapper
//! server negotiates the marked form, which says the connection's first bidirectional stream
//! is the control stream; [`app_alpn`] gives the application's ALPN with the marker stripped.
//! A server that negotiates the plain form (or none) does not speak the control protocol:
//! `connect` closes the connection and returns [`ClientError::ServerWithoutControl`] rather
//! than open a stream the server would take for a request.
//!
//! **Confirmation.** The shim never ends a move's overlap on a datagram's source address (a
//! spoofer controls it). The control task vouches for the new address when the server says,
//! on the control stream, that it runs there: `Resumed` naming the migration whose `Migrate`
//! named the address. That message is stream data in a 1-RTT packet quinn decrypted, so only
//! the server holding the connection's keys can have sent it, and it cannot be replayed
//! (packet numbers). A move the server never vouches for ends at the overlap's cap
//! ([`ClientOptions::overlap_limits`]) in a swap back, reported in
//! [`ClientStatus::failed_moves`] with the shim's [`MoveError`].
//!
//! **Two-phase migrations: the application's part.** A server that moves in two phases first
//! sends `Quiesce`: it wants nothing in flight while it is frozen, so that nothing is lost and
//! no client waits for a deadline or QUIC's probe timer after the restore. The control task
//! publishes the request; the application does the rest:
//!
//! ```text
//!  Quiesce ──► status.quiesce = Requested   app: quiesce_requested() / quiesce_wanted()
//!              open no new request, let the in-flight ones finish
//!              app: confirm_quiesced() ──► Quiesced ──► status.quiesce = Confirmed
//!              (Migrate, Ack as usual; the server is frozen, moved, restored)
//!  Resumed ──► status.quiesce = Off          app: wait_released() ──► Some(Release::Resumed)
//!              send again at once
//!  or MigrateAborted (swap back) ──►          wait_released() ──► Some(Release::Aborted)
//!  or the control stream closes ──►           wait_released() ──► Some(Release::ControlClosed)
//! ```
//!
//! `quiesce_wanted()` is cancel-safe, for a `select!` with the application's idle waits; a
//! confirmation that comes after the server went on without it (its quiesce deadline passed)
//! is dropped, and the application still holds until `wait_released()`. An application that
//! ignores all this keeps working: the server reports it missing from the quiesce round and
//! moves anyway (what it sends during the freeze is then lost and retried, as in one phase).
//!
//! **Downtime reports.** Once a move is over for the client (`Resumed`, or the swap back of an
//! abort), the application reports the pause it observed, from its last reply before the move
//! to its first reply after it: [`MigratingClient::report_downtime`], once per migration. The
//! server records it for the orchestrator's metrics and report. An application that reports
//! nothing within [`ClientOptions::auto_downtime`] (default 1 s) of `Resumed` has the
//! transport's pause reported for it: the shim's last datagram from the old address to the
//! move's confirmation ([`udp_shim_client::SwappableUdp::last_move_gap`]). The first report
//! wins (the protocol takes one per migration): the application's when it comes within the
//! grace, which is the seed's definition of downtime; a later one is refused
//! ([`DowntimeError::Refused`]). An aborted move has no transport pause (the server never
//! left its address): only the application can report it. A server of protocol version 1
//! gets no report.
//!
//! The control stream is opened and `Hello` written before [`MigratingClient::connect`]
//! returns, so it is stream 0 and the server takes it as the control stream whatever streams
//! the application opens afterwards.
//!
//! A process may hold many `MigratingClient`s: each has its own socket, endpoint, connection
//! and control task, and follows moves on its own (the demo binary's `--connections N`;
//! [`summary`] turns their reports into one per process).

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use control_protocol::{
    ByeReason, ClientControl, ClientEvent, ClientId, ClientState, CloseCode, MigrationId,
    ObservedDowntime, Role, SUPPORTED_VERSIONS,
};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};
use udp_shim_client::{Confirmation, MoveOutcome};
use wrapper_support::control::ControlReader;

// Everything the public API names, so that an application depends on cwrapper and quinn only.
pub use control_protocol::AlpnError;
pub use control_protocol::{DowntimeRefused, DowntimeTooLong, EncodeError, LengthError};
pub use migration_core::ParseMigrationIdError;
pub use quinn;
pub use udp_shim_client::{MoveError, MoveGap, OverlapLimits, ShimError, ShimStats, SwappableUdp};
pub use wrapper_support::quic::Side;
pub use wrapper_support::tls::{app_alpn, load_certs};
pub use wrapper_support::{
    ConfigError, ControlStreamError, DEFAULT_MAX_FREEZE, IDLE_MARGIN, TlsError, TransportFacts,
    min_idle_timeout,
};

#[cfg(feature = "demo")]
mod demo;
mod options;
#[cfg(feature = "demo")]
pub mod summary;

#[cfg(feature = "demo")]
pub use demo::{EchoError, echo_once};
pub use options::{ClientOptions, ClientQuic};

/// The quinn client configuration [`ClientOptions::new`] builds (TLS 1.3 trusting `roots`
/// only, offering `alpn`, quinn's default transport but for `idle_timeout`): a starting point
/// for an application that adjusts it (`transport_config`) and passes it to
/// [`ClientOptions::with_client_config`].
pub fn client_config(
    roots: &[quinn::rustls::pki_types::CertificateDer<'static>],
    alpn: &[&[u8]],
    idle_timeout: Duration,
) -> Result<quinn::ClientConfig, TlsError> {
    let transport = wrapper_support::tls::transport_config(idle_timeout)?;
    wrapper_support::tls::client_config(roots, alpn, transport)
}

/// The ALPN list for an application that builds its own rustls `ClientConfig`: each of
/// `app_alpns` marked (`qlm1+x`) first, then plain. Set it as the config's `alpn_protocols`.
///
/// # Errors
/// [`AlpnError`] for an empty entry, one too long to mark (over 250 bytes), or one already
/// starting with the marker.
pub fn alpn_with_control(app_alpns: &[&[u8]]) -> Result<Vec<Vec<u8>>, AlpnError> {
    control_protocol::alpn::with_control(app_alpns)
}

/// Application close code of a connection to a server that does not speak the control
/// protocol ([`ClientError::ServerWithoutControl`]).
pub const CONN_NO_CONTROL: quinn::VarInt = quinn::VarInt::from_u32(3);

/// How long `connect` waits for the close of a refused connection to be sent.
const CLOSE_WAIT: Duration = Duration::from_millis(200);

/// Errors of the client wrapper.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The TLS configuration could not be built.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The quinn configuration cannot carry a move (an idle timeout shorter than the longest
    /// freeze): the message says what to set.
    #[error("quinn configuration: {0}")]
    Config(#[from] ConfigError),
    /// The client id is longer than the protocol allows.
    #[error("client id: {0}")]
    ClientId(#[from] control_protocol::LengthError),
    /// The local socket could not be set up.
    #[error("socket: {0}")]
    Socket(#[from] udp_shim_client::ShimError),
    /// The endpoint could not be created.
    #[error("endpoint: {0}")]
    Endpoint(#[source] io::Error),
    /// quinn refused to start the connection.
    #[error("connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The handshake failed.
    #[error("handshake: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// The handshake did not finish in time.
    #[error("no handshake with {server} within {timeout:?}")]
    ConnectTimeout {
        /// The server dialled.
        server: SocketAddr,
        /// The limit.
        timeout: Duration,
    },
    /// The control stream could not be opened or written.
    #[error("control stream: {0}")]
    Control(#[from] ControlStreamError),
    /// Writing on the control stream failed.
    #[error("control stream write: {0}")]
    ControlWrite(#[from] quinn::WriteError),
    /// Encoding a control message failed.
    #[error("control message: {0}")]
    Encode(#[from] control_protocol::EncodeError),
    /// The server did not negotiate the control marker ALPN: it is not a swrapper server (or
    /// its config lists no `qlm1+` form), so it would take the control stream for a request.
    /// The connection was closed.
    #[error(
        "the server does not speak the control protocol: it negotiated ALPN {} instead of a \
         qlm1+ form (a server built with swrapper offers it; one with its own rustls config \
         must list swrapper::alpn_with_control(..))",
        negotiated.as_deref().map_or_else(|| "none".to_owned(), |a| format!("{:?}", String::from_utf8_lossy(a)))
    )]
    ServerWithoutControl {
        /// The ALPN the handshake settled on, if any.
        negotiated: Option<Vec<u8>>,
    },
}

/// Why [`MigratingClient::report_downtime`] reported nothing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DowntimeError {
    /// The migration id is not 32 hex digits.
    #[error("migration id: {0}")]
    MigrationId(#[from] migration_core::ParseMigrationIdError),
    /// The pause is above the protocol's bound (an hour).
    #[error(transparent)]
    TooLong(#[from] control_protocol::DowntimeTooLong),
    /// The protocol refused it: the migration is not over for this client, its downtime was
    /// reported already (perhaps the transport's, after the grace), or the server speaks
    /// version 1.
    #[error(transparent)]
    Refused(#[from] DowntimeRefused),
    /// The control stream is closed.
    #[error("the control stream is closed")]
    ControlClosed,
}

/// Who measured a reported downtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DowntimeSource {
    /// The application ([`MigratingClient::report_downtime`]): its last reply before the move
    /// to its first reply after it.
    Application,
    /// The socket: the last datagram from the old address to the move's confirmation, sent
    /// because the application reported nothing in time.
    Transport,
}

/// A downtime this client reported to the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DowntimeReport {
    /// The migration (hex).
    pub migration_id: String,
    /// The pause reported (whole microseconds).
    pub downtime: Duration,
    /// Who measured it.
    pub source: DowntimeSource,
}

/// One migration as the client saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationSeen {
    /// The migration's identifier, hex.
    pub id: String,
    /// Where the server goes.
    pub new_addr: SocketAddr,
    /// When the `Migrate` arrived.
    pub at: Instant,
    /// Whether this was a swap back after an aborted move.
    pub aborted: bool,
    /// Whether the server asked this client to quiesce for this migration (two-phase).
    pub quiesced: bool,
    /// `Resumed` messages received before this one was seen.
    pub resumed_before: u64,
}

/// A move the client gave up: the server never confirmed it runs at the new address before
/// the overlap's cap, so the client swapped back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedMove {
    /// The migration that announced the move (hex), if the client still knew it.
    pub migration_id: Option<String>,
    /// What the shim reported: the cap reached, the address given up, where it went back.
    pub error: MoveError,
}

/// The state of the control stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlStatus {
    /// Hello sent, no Welcome yet.
    Connecting,
    /// Working: negotiated version and the server's session id.
    Open {
        /// Negotiated control protocol version.
        version: u16,
        /// The server's identifier of this session.
        session_id: u64,
    },
    /// Closed: why. The connection itself may still be fine.
    Closed {
        /// What happened.
        reason: String,
    },
}

/// Where the application stands in a two-phase migration (see the crate doc).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Quiesce {
    /// Nothing asked: send freely.
    Off,
    /// The server asked the application to stop: open no new request, let the in-flight ones
    /// finish, then call [`MigratingClient::confirm_quiesced`].
    Requested {
        /// The migration being prepared (hex).
        migration_id: String,
    },
    /// `Quiesced` was sent: hold until [`MigratingClient::wait_released`] returns.
    Confirmed {
        /// The migration being prepared (hex).
        migration_id: String,
    },
}

impl Quiesce {
    /// Whether the application must not open new requests (requested or confirmed).
    pub fn holds(&self) -> bool {
        !matches!(self, Quiesce::Off)
    }
}

/// How a quiesce ended: the application may send again.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Release {
    /// The server runs at its new address (`Resumed`).
    Resumed {
        /// The migration (hex).
        migration_id: String,
    },
    /// The move was abandoned and the client swapped back (`MigrateAborted`).
    Aborted {
        /// The migration (hex).
        migration_id: String,
    },
    /// The control stream closed: the server can no longer release the client, so it does
    /// not hold any longer.
    ControlClosed {
        /// Why it closed.
        reason: String,
    },
}

/// What the application can watch.
#[derive(Debug, Clone)]
pub struct ClientStatus {
    /// Migrations seen so far (`Migrate` or `MigrateAborted`), in order.
    pub migrations: Vec<MigrationSeen>,
    /// `Resumed` messages received (the server runs at its new address).
    pub resumed: u64,
    /// Moves given up at the overlap's cap (a swap back), in order.
    pub failed_moves: Vec<FailedMove>,
    /// The two-phase hold: whether the server asked the application to stop sending, and
    /// whether it answered.
    pub quiesce: Quiesce,
    /// How the last hold ended, if one did.
    pub last_release: Option<Release>,
    /// Downtimes reported to the server, in order (one per migration at most).
    pub downtime_reports: Vec<DowntimeReport>,
    /// The control stream.
    pub control: ControlStatus,
}

impl ClientStatus {
    /// Whether the server asked the application to stop sending (two-phase migration) and
    /// has not released it yet.
    pub fn quiesce_requested(&self) -> bool {
        self.quiesce.holds()
    }
}

/// Requests from the application to the control task.
#[derive(Debug)]
enum Request {
    Quiesced,
    Downtime {
        migration_id: MigrationId,
        downtime: ObservedDowntime,
        reply: oneshot::Sender<Result<(), DowntimeError>>,
    },
    Bye(String),
}

/// A client connection whose server may move.
#[derive(Debug)]
pub struct MigratingClient {
    endpoint: quinn::Endpoint,
    connection: quinn::Connection,
    shim: Arc<SwappableUdp>,
    status: watch::Receiver<ClientStatus>,
    requests: mpsc::UnboundedSender<Request>,
}

impl MigratingClient {
    /// Checks the quinn configuration ([`ClientOptions::check`]: a [`ClientError::Config`]
    /// says what a move needs), connects, opens the control stream and sends Hello. Call
    /// inside a tokio runtime.
    pub async fn connect(opts: ClientOptions) -> Result<Self, ClientError> {
        let facts = opts.check()?;
        debug!(?facts, "quinn transport checked");
        let client_id = ClientId::new(opts.client_id.clone())?;
        let config = opts.quic.into_config()?;
        let bind = opts.bind.unwrap_or(match opts.server {
            SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
            SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
        });
        let shim = Arc::new(SwappableUdp::bind(bind, opts.server)?);
        shim.set_overlap_limits(opts.overlap_limits);
        // The shim is the endpoint's socket, as in `udp_shim_client::client_endpoint`, with
        // the application's endpoint configuration.
        let mut endpoint = quinn::Endpoint::new_with_abstract_socket(
            opts.endpoint_config,
            None,
            shim.clone(),
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(ClientError::Endpoint)?;
        endpoint.set_default_client_config(config);
        let connecting = endpoint.connect(shim.fake_peer(), &opts.server_name)?;
        let connection = tokio::time::timeout(opts.connect_timeout, connecting)
            .await
            .map_err(|_| ClientError::ConnectTimeout {
                server: opts.server,
                timeout: opts.connect_timeout,
            })??;
        if !wrapper_support::tls::speaks_control(&connection) {
            let negotiated = wrapper_support::tls::negotiated_alpn(&connection);
            connection.close(CONN_NO_CONTROL, b"server without control stream");
            // Lets the close reach the server before the endpoint is dropped.
            let _ = tokio::time::timeout(CLOSE_WAIT, endpoint.wait_idle()).await;
            return Err(ClientError::ServerWithoutControl { negotiated });
        }
        let (mut send, recv) = connection.open_bi().await?;
        let mut out = Vec::new();
        let control = ClientControl::new(client_id, SUPPORTED_VERSIONS, &mut out)?;
        send.write_all(&out).await?;
        let (status_tx, status) = watch::channel(ClientStatus {
            migrations: Vec::new(),
            resumed: 0,
            failed_moves: Vec::new(),
            quiesce: Quiesce::Off,
            last_release: None,
            downtime_reports: Vec::new(),
            control: ControlStatus::Connecting,
        });
        let (requests, rx) = mpsc::unbounded_channel();
        tokio::spawn(control_task(ControlTask {
            control,
            reader: ControlReader::new(recv, Role::Client),
            send,
            shim: shim.clone(),
            status: status_tx,
            requests: rx,
            quiesce_id: None,
            pending_move: None,
            auto_downtime: opts.auto_downtime,
            auto_reports: VecDeque::new(),
        }));
        info!(server = %opts.server, id = connection.stable_id(), "connected");
        Ok(Self {
            endpoint,
            connection,
            shim,
            status,
            requests,
        })
    }

    /// The QUIC connection. Open application streams on it; the control stream is taken.
    pub fn connection(&self) -> &quinn::Connection {
        &self.connection
    }

    /// The quinn endpoint, for what the wrapper does not wrap (statistics, `wait_idle`). Do
    /// not `rebind` it: the migratable socket would be gone. A second connection from it
    /// (`connect`) would not have the wrapper's control stream: make another
    /// `MigratingClient` instead.
    pub fn endpoint(&self) -> &quinn::Endpoint {
        &self.endpoint
    }

    /// The socket shim (its statistics, its current real peer).
    pub fn shim(&self) -> &Arc<SwappableUdp> {
        &self.shim
    }

    /// The real address the client sends to now.
    pub fn peer(&self) -> SocketAddr {
        self.shim.peer()
    }

    /// A receiver of status changes (migrations seen, resumed, control stream state).
    pub fn events(&self) -> watch::Receiver<ClientStatus> {
        self.status.clone()
    }

    /// The current status.
    pub fn status(&self) -> ClientStatus {
        self.status.borrow().clone()
    }

    /// Resolves when the `n`-th migration (counting from 1) has been seen; at once if it has.
    /// `None` if the control stream closed first.
    pub async fn migration_seen(&self, n: usize) -> Option<MigrationSeen> {
        let mut rx = self.status.clone();
        let result = rx
            .wait_for(|s| {
                s.migrations.len() >= n || matches!(s.control, ControlStatus::Closed { .. })
            })
            .await;
        result
            .ok()
            .and_then(|s| s.migrations.get(n.checked_sub(1)?).cloned())
    }

    /// Whether the application must hold its new requests now (a quiesce was requested or
    /// confirmed and not yet released). Check it before opening each request.
    pub fn quiesce_requested(&self) -> bool {
        self.status.borrow().quiesce.holds()
    }

    /// Resolves when the server asks the application to stop sending (at once if it has and
    /// the hold is not over). Cancel-safe: use it in a `select!` with the application's own
    /// waits (an idle pause between requests, for example), so that an idle application
    /// answers at once.
    pub async fn quiesce_wanted(&self) {
        let mut rx = self.status.clone();
        // Err only when the control task is gone; then nothing will ever be asked.
        if rx
            .wait_for(|s| matches!(s.quiesce, Quiesce::Requested { .. }))
            .await
            .is_err()
        {
            std::future::pending::<()>().await;
        }
    }

    /// The application stopped sending after a quiesce request (no new request opened, every
    /// in-flight one finished): tell the server (`Quiesced`). Nothing happens when no quiesce
    /// is pending (already confirmed, released, or the server went on to `Migrate` before the
    /// answer: still hold until [`MigratingClient::wait_released`]).
    pub fn confirm_quiesced(&self) {
        let _ = self.requests.send(Request::Quiesced);
    }

    /// Resolves when the hold is over: at once with `None` when nothing holds the
    /// application, else with how it ended: `Resumed` (the server runs at its new address;
    /// send at once, nothing was lost), `Aborted` (the move was abandoned; the client is back
    /// at the old address) or `ControlClosed`.
    pub async fn wait_released(&self) -> Option<Release> {
        let mut rx = self.status.clone();
        let held = rx.borrow().quiesce.holds();
        if !held {
            return None;
        }
        match rx
            .wait_for(|s| !s.quiesce.holds() || matches!(s.control, ControlStatus::Closed { .. }))
            .await
        {
            Ok(s) => s.last_release.clone().or_else(|| match &s.control {
                ControlStatus::Closed { reason } => Some(Release::ControlClosed {
                    reason: reason.clone(),
                }),
                _ => None,
            }),
            Err(_) => Some(Release::ControlClosed {
                reason: "the control task ended".to_owned(),
            }),
        }
    }

    /// Reports the pause the application observed across migration `migration_id` (hex, as in
    /// [`MigrationSeen::id`]): its last reply before the move to its first reply after it.
    /// Once per migration, once the move is over for this client (after `Resumed`, or after
    /// the swap back of an abort); see the crate doc for the transport's report that stands
    /// in when the application does not report within [`ClientOptions::auto_downtime`].
    ///
    /// # Errors
    /// [`DowntimeError`]: nothing was sent.
    pub async fn report_downtime(
        &self,
        migration_id: &str,
        downtime: Duration,
    ) -> Result<(), DowntimeError> {
        let migration_id: MigrationId = migration_id.parse()?;
        let downtime = ObservedDowntime::new(downtime)?;
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(Request::Downtime {
                migration_id,
                downtime,
                reply,
            })
            .map_err(|_| DowntimeError::ControlClosed)?;
        answer.await.map_err(|_| DowntimeError::ControlClosed)?
    }

    /// Sends Bye on the control stream, closes the connection and waits for the endpoint to
    /// finish (bounded).
    pub async fn close(self, reason: &str) {
        let _ = self.requests.send(Request::Bye(reason.to_owned()));
        tokio::time::sleep(Duration::from_millis(5)).await;
        self.connection
            .close(quinn::VarInt::from_u32(0), reason.as_bytes());
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}

struct ControlTask {
    control: ClientControl,
    reader: ControlReader,
    send: quinn::SendStream,
    shim: Arc<SwappableUdp>,
    status: watch::Sender<ClientStatus>,
    requests: mpsc::UnboundedReceiver<Request>,
    /// The migration whose quiesce request awaits the application's confirmation.
    quiesce_id: Option<control_protocol::MigrationId>,
    /// The move whose overlap awaits the server's `Resumed`: the migration, its address and
    /// when the peer was swapped.
    pending_move: Option<(MigrationId, SocketAddr, Instant)>,
    /// The grace the application has to report a downtime before the transport's is sent.
    auto_downtime: Option<Duration>,
    /// Resumed moves whose downtime the application has not reported yet, oldest first.
    auto_reports: VecDeque<AutoReport>,
}

/// A completed move whose transport pause is reported at `due` unless the application
/// reports first.
#[derive(Debug, Clone, Copy)]
struct AutoReport {
    migration_id: MigrationId,
    addr: SocketAddr,
    swapped_at: Instant,
    due: Instant,
}

/// At most this many moves wait for their downtime report (the protocol remembers 8).
const AUTO_REPORTS: usize = 8;

async fn control_task(mut t: ControlTask) {
    let mut out = Vec::new();
    let mut outcomes = t.shim.move_outcomes();
    let reason = loop {
        out.clear();
        // Without traffic nothing else enforces the overlap's time cap.
        let cap_deadline = t.shim.overlap_deadline();
        let auto_due = t.auto_reports.front().map(|a| a.due);
        let step = tokio::select! {
            () = sleep_until_opt(cap_deadline), if cap_deadline.is_some() => {
                t.shim.check_overlap();
                Ok(())
            }
            () = sleep_until_opt(auto_due), if auto_due.is_some() => {
                on_auto_report_due(&mut t, &mut out);
                Ok(())
            }
            Ok(()) = outcomes.changed() => {
                let outcome = outcomes.borrow_and_update().clone();
                on_move_outcome(&mut t, outcome);
                Ok(())
            }
            msg = t.reader.next() => match msg {
                Ok(Some(msg)) => on_server_message(&mut t, msg, &mut out),
                Ok(None) => break "server finished the control stream".to_owned(),
                Err(e) => {
                    let code = e.close_code();
                    close_stream(&mut t, code);
                    break format!("control stream error: {e}");
                }
            },
            req = t.requests.recv() => match req {
                Some(Request::Quiesced) => on_quiesced(&mut t, &mut out),
                Some(Request::Downtime { migration_id, downtime, reply }) => {
                    let r = report(&mut t, migration_id, downtime, DowntimeSource::Application, &mut out);
                    let _ = reply.send(r.map_err(DowntimeError::from));
                    Ok(())
                }
                Some(Request::Bye(reason)) => {
                    let _ = t.control.bye(ByeReason::truncating(&reason), &mut out);
                    let _ = t.send.write_all(&out).await;
                    let _ = t.send.finish();
                    break format!("closed by the application: {reason}");
                }
                None => break "client dropped".to_owned(),
            },
        };
        if let Err((code, why)) = step {
            close_stream(&mut t, code);
            break why;
        }
        if !out.is_empty()
            && let Err(e) = t.send.write_all(&out).await
        {
            break format!("control stream write failed: {e}");
        }
    };
    warn!("control stream closed: {reason}");
    t.status.send_modify(|s| {
        // Nobody can release a held application any more.
        if s.quiesce.holds() {
            s.quiesce = Quiesce::Off;
            s.last_release = Some(Release::ControlClosed {
                reason: reason.clone(),
            });
        }
        s.control = ControlStatus::Closed { reason };
    });
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    if let Some(d) = deadline {
        tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await;
    }
}

/// The shim ended an overlap; only an abandoned one is news (the task caused the others).
fn on_move_outcome(t: &mut ControlTask, outcome: MoveOutcome) {
    let MoveOutcome::Abandoned(error) = outcome else {
        return;
    };
    let migration_id = match t.pending_move {
        Some((id, addr, _)) if addr == error.new_peer() => {
            t.pending_move = None;
            Some(id.to_string())
        }
        _ => None,
    };
    warn!(id = ?migration_id, "move given up: {error}");
    t.status.send_modify(|s| {
        s.failed_moves.push(FailedMove {
            migration_id,
            error,
        });
    });
}

/// The server vouched, in an authenticated control message, that it runs at `addr`.
fn confirm(t: &ControlTask, addr: SocketAddr) {
    match t.shim.confirm_peer(addr) {
        Ok(Confirmation::Confirmed) => info!(%addr, "move confirmed by the server"),
        Ok(Confirmation::AwaitingDatagram) => {
            info!(%addr, "move vouched for by the server; confirmed at its first datagram");
        }
        Ok(other) => debug!(%addr, ?other, "nothing to confirm"),
        Err(e) => warn!(%addr, "move not confirmed: {e}"),
    }
}

/// Sends a downtime report (the application's, or the transport's in its place) and
/// publishes it; the first report of a migration wins.
fn report(
    t: &mut ControlTask,
    migration_id: MigrationId,
    downtime: ObservedDowntime,
    source: DowntimeSource,
    out: &mut Vec<u8>,
) -> Result<(), DowntimeRefused> {
    t.control.report_downtime(migration_id, downtime, out)?;
    t.auto_reports.retain(|a| a.migration_id != migration_id);
    info!(id = %migration_id, %downtime, ?source, "downtime reported");
    t.status.send_modify(|s| {
        s.downtime_reports.push(DowntimeReport {
            migration_id: migration_id.to_string(),
            downtime: downtime.as_duration(),
            source,
        });
    });
    Ok(())
}

/// The application did not report the oldest resumed move's downtime in time: the transport's
/// pause is reported instead, if the shim confirmed that move.
fn on_auto_report_due(t: &mut ControlTask, out: &mut Vec<u8>) {
    let Some(a) = t.auto_reports.pop_front() else {
        return;
    };
    let gap = t
        .shim
        .last_move_gap()
        .filter(|g| g.peer == a.addr && g.confirmed_at >= a.swapped_at);
    let Some(gap) = gap else {
        debug!(id = %a.migration_id, "no transport pause for this move: no downtime reported");
        return;
    };
    match ObservedDowntime::new(gap.gap) {
        Ok(d) => {
            if let Err(e) = report(t, a.migration_id, d, DowntimeSource::Transport, out) {
                debug!(id = %a.migration_id, "transport downtime not reported: {e}");
            }
        }
        Err(e) => debug!(id = %a.migration_id, "transport downtime not reported: {e}"),
    }
}

fn close_stream(t: &mut ControlTask, code: CloseCode) {
    let v = quinn::VarInt::from_u32(code.as_u32());
    let _ = t.send.reset(v);
    t.reader.stop(code);
}

fn on_quiesced(t: &mut ControlTask, out: &mut Vec<u8>) -> Result<(), (CloseCode, String)> {
    let Some(id) = t.quiesce_id.take() else {
        debug!("quiesced confirmation with no quiesce pending: ignored");
        return Ok(());
    };
    // The server may have gone on (its quiesce deadline passed: Migrate, or an abort) before
    // the application answered; the answer is then moot, not an error.
    if t.control.state() != ClientState::Quiescing {
        debug!(id = %id, state = %t.control.state(), "quiesced confirmation too late: ignored");
        return Ok(());
    }
    t.control
        .quiesced(id, out)
        .map_err(|e| (e.close_code(), e.to_string()))?;
    let migration_id = id.to_string();
    t.status.send_modify(|s| {
        if s.quiesce.holds() {
            s.quiesce = Quiesce::Confirmed { migration_id };
        }
    });
    info!(id = %id, "quiesced sent");
    Ok(())
}

/// Whether the application holds for `id` (asked to quiesce for that migration).
fn holds_for(s: &ClientStatus, id: &str) -> bool {
    match &s.quiesce {
        Quiesce::Requested { migration_id } | Quiesce::Confirmed { migration_id } => {
            migration_id == id
        }
        Quiesce::Off => false,
    }
}

fn on_server_message(
    t: &mut ControlTask,
    msg: control_protocol::Message,
    out: &mut Vec<u8>,
) -> Result<(), (CloseCode, String)> {
    let event = t
        .control
        .on_message(msg, out)
        .map_err(|e| (e.close_code(), format!("control protocol: {e}")))?;
    match event {
        ClientEvent::Welcomed {
            version,
            session_id,
        } => {
            info!(version, session_id, "control stream open");
            t.status.send_modify(|s| {
                s.control = ControlStatus::Open {
                    version,
                    session_id,
                }
            });
        }
        ClientEvent::SwapPeer {
            migration_id,
            new_addr,
            ..
        } => {
            let at = Instant::now();
            // Swap, then publish: whoever sees the migration also sees the new peer.
            swap(t, new_addr);
            t.pending_move = Some((migration_id, new_addr, at));
            t.status.send_modify(|s| {
                let id = migration_id.to_string();
                let quiesced = holds_for(s, &id);
                s.migrations.push(MigrationSeen {
                    id,
                    new_addr,
                    at,
                    aborted: false,
                    quiesced,
                    resumed_before: s.resumed,
                });
            });
            t.control
                .swapped(migration_id, out)
                .map_err(|e| (e.close_code(), e.to_string()))?;
            info!(id = %migration_id, %new_addr, "migration seen: peer swapped, ack sent");
        }
        ClientEvent::SwapBack {
            migration_id,
            fallback_addr,
        } => {
            let at = Instant::now();
            swap(t, fallback_addr);
            t.pending_move = None;
            // Usually the fallback is the peer the overlap kept, and the swap ended it. If not,
            // MigrateAborted is itself the server's authenticated word that it runs there.
            if t.shim.previous_peer().is_some() {
                confirm(t, fallback_addr);
            }
            t.quiesce_id = None;
            t.status.send_modify(|s| {
                let id = migration_id.to_string();
                let quiesced = holds_for(s, &id);
                s.migrations.push(MigrationSeen {
                    id: id.clone(),
                    new_addr: fallback_addr,
                    at,
                    aborted: true,
                    quiesced,
                    resumed_before: s.resumed,
                });
                if s.quiesce.holds() {
                    s.quiesce = Quiesce::Off;
                    s.last_release = Some(Release::Aborted { migration_id: id });
                }
            });
            t.control
                .swapped(migration_id, out)
                .map_err(|e| (e.close_code(), e.to_string()))?;
            info!(id = %migration_id, %fallback_addr, "migration aborted: swapped back, ack sent");
        }
        ClientEvent::Quiesce { migration_id, .. } => {
            info!(id = %migration_id, "quiesce requested");
            t.quiesce_id = Some(migration_id);
            t.status.send_modify(|s| {
                s.quiesce = Quiesce::Requested {
                    migration_id: migration_id.to_string(),
                };
            });
        }
        ClientEvent::Resumed { migration_id } => {
            info!(id = %migration_id, "server resumed");
            if let Some((id, addr, swapped_at)) = t.pending_move
                && id == migration_id
            {
                t.pending_move = None;
                confirm(t, addr);
                if let Some(grace) = t.auto_downtime {
                    if t.auto_reports.len() == AUTO_REPORTS {
                        t.auto_reports.pop_front();
                    }
                    t.auto_reports.push_back(AutoReport {
                        migration_id,
                        addr,
                        swapped_at,
                        due: Instant::now() + grace,
                    });
                }
            }
            t.quiesce_id = None;
            // Published at once: a held application sends its next request on this change.
            t.status.send_modify(|s| {
                s.resumed += 1;
                if s.quiesce.holds() {
                    s.quiesce = Quiesce::Off;
                    s.last_release = Some(Release::Resumed {
                        migration_id: migration_id.to_string(),
                    });
                }
            });
        }
        ClientEvent::Bye { reason } => {
            info!(reason = reason.as_str(), "server said bye");
        }
        ClientEvent::Repeated { kind, migration_id } => {
            debug!(?kind, id = %migration_id, "repeated control message");
        }
        other => debug!(?other, "control event"),
    }
    Ok(())
}

fn swap(t: &ControlTask, addr: SocketAddr) {
    if let Err(e) = t.shim.set_peer(addr) {
        warn!(%addr, "peer swap refused: {e}");
    }
}
