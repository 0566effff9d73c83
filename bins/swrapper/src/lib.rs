//! The server wrapper: any quinn server application, made migratable.
//!
//! ```text
//!  MigratableUdp (rebind / park / unpark)
//!        │
//!  quinn::Endpoint ──accept──► handshake ──first bi stream──► control task (Hello, Welcome,
//!        │                                                   Migrate/Ack, Resumed, Bye)
//!        │                                                        │ SessionRegistry
//!        └──► AppConnection { connection, session, client_id } ──► your application
//!
//!  MigrationHandle: announce(new address) → Migrate to every client, wait for every Ack;
//!                   rebind / park / unpark the socket; resumed; abort (swap clients back).
//! ```
//!
//! The first bidirectional stream of every connection is the control stream. The wrapper
//! accepts it (QUIC hands peer-opened streams out in stream-id order, so the first accepted
//! bi stream is stream 0) and reads `Hello` before the connection reaches the application,
//! which then accepts the connection's other streams as usual. A control stream that carries
//! garbage is closed with an error code; the connection and the application carry on, but that
//! client cannot be told about a move (it shows up as "no ack" in the announce report).

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use control_protocol::{ByeReason, ClientId, CloseCode, Message, Role};
use migration_core::{MigrationId, SessionId, SessionRegistry, SessionState};
use serde::Serialize;
use tokio::sync::{Notify, mpsc};
use tracing::{debug, info, warn};
use udp_shim_server::MigratableUdp;
use wrapper_support::control::{self, ControlReader, ControlWriter};
use wrapper_support::{Identity, MonotonicClock, TlsError};

/// How long a park or a re-creation waits for the old descriptor to close.
const RETIRE_WAIT: Duration = Duration::from_secs(1);

/// How the server is set up.
#[derive(Debug)]
pub struct ServerOptions {
    /// Where to listen.
    pub listen: SocketAddr,
    /// Certificate chain and key.
    pub identity: Identity,
    /// ALPN protocols offered.
    pub alpn: Vec<Vec<u8>>,
    /// Connection idle timeout; must outlast the longest freeze.
    pub idle_timeout: Duration,
    /// Most client sessions held at once.
    pub max_sessions: usize,
    /// How long a new connection has to open its control stream and say Hello.
    pub hello_timeout: Duration,
}

impl ServerOptions {
    /// Options with the defaults of the demo: 30 s idle timeout, 1024 sessions, 5 s for Hello.
    pub fn new(listen: SocketAddr, identity: Identity, alpn: Vec<Vec<u8>>) -> Self {
        Self {
            listen,
            identity,
            alpn,
            idle_timeout: Duration::from_secs(30),
            max_sessions: 1024,
            hello_timeout: Duration::from_secs(5),
        }
    }
}

/// Errors of the server wrapper.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The TLS configuration could not be built.
    #[error(transparent)]
    Tls(#[from] TlsError),
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
}

/// A connection handed to the application, its control stream already running.
#[derive(Debug, Clone)]
pub struct AppConnection {
    /// The QUIC connection. Accept its bidirectional streams: the control stream is taken.
    pub connection: quinn::Connection,
    /// The wrapper's identifier of the session.
    pub session: SessionId,
    /// What the client called itself in Hello, when its control stream worked.
    pub client_id: Option<String>,
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
    /// Time from the announcement to the last ack (or the deadline).
    pub elapsed_ms: f64,
}

impl AnnounceReport {
    /// Every client acknowledged.
    pub fn complete(&self) -> bool {
        self.missing.is_empty()
    }
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
}

/// Commands to a connection's control task.
#[derive(Debug)]
enum Command {
    Send(Message),
}

#[derive(Debug)]
struct State {
    registry: SessionRegistry,
    controls: BTreeMap<SessionId, mpsc::UnboundedSender<Command>>,
    /// Sessions that still owe an Ack for a `MigrateAborted`.
    abort_pending: BTreeSet<SessionId>,
    next_session: u64,
}

#[derive(Debug)]
struct Shared {
    socket: Arc<MigratableUdp>,
    endpoint: quinn::Endpoint,
    clock: MonotonicClock,
    state: Mutex<State>,
    changed: Notify,
    handshakes: AtomicU64,
    hello_timeout: Duration,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the registry half-updated in a way that
        // matters more than stopping the server would; keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A quinn server on a migratable socket.
#[derive(Debug)]
pub struct MigratableServer {
    shared: Arc<Shared>,
    incoming: tokio::sync::Mutex<mpsc::Receiver<AppConnection>>,
}

impl MigratableServer {
    /// Binds the socket and starts accepting connections. Call inside a tokio runtime.
    pub fn bind(opts: ServerOptions) -> Result<Self, ServerError> {
        let transport = wrapper_support::tls::transport_config(opts.idle_timeout)?;
        let alpn: Vec<&[u8]> = opts.alpn.iter().map(Vec::as_slice).collect();
        let server_config = wrapper_support::tls::server_config(opts.identity, &alpn, transport)?;
        let socket = Arc::new(MigratableUdp::bind(opts.listen)?);
        let endpoint = udp_shim_server::server_endpoint(socket.clone(), server_config)
            .map_err(ServerError::Endpoint)?;
        let shared = Arc::new(Shared {
            socket,
            endpoint,
            clock: MonotonicClock::new(),
            state: Mutex::new(State {
                registry: SessionRegistry::new(opts.max_sessions),
                controls: BTreeMap::new(),
                abort_pending: BTreeSet::new(),
                next_session: 1,
            }),
            changed: Notify::new(),
            handshakes: AtomicU64::new(0),
            hello_timeout: opts.hello_timeout,
        });
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(accept_loop(shared.clone(), tx));
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
    /// Handshakes completed since the server started (a migration must not add any).
    pub fn handshakes(&self) -> u64 {
        self.shared.handshakes.load(Ordering::Relaxed)
    }

    /// The sessions the server holds.
    pub fn sessions(&self) -> Vec<SessionInfo> {
        let st = self.shared.state();
        st.registry
            .iter()
            .map(|(id, s)| SessionInfo {
                session: id.0,
                client_id: s.client_id().to_owned(),
                state: s.state(),
                control_open: st.controls.contains_key(&id),
            })
            .collect()
    }

    /// The socket's current local address.
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.socket.local_addr()
    }

    /// Tells every client that the server moves to `new_addr` and waits until every client
    /// has acknowledged or `deadline` has passed. Clients whose control stream is closed
    /// cannot be told and are reported missing.
    pub async fn announce(
        &self,
        migration_id: MigrationId,
        new_addr: SocketAddr,
        deadline: Duration,
    ) -> Result<AnnounceReport, ServerError> {
        let start = self.shared.clock.now();
        let (told, reachable) = {
            let mut st = self.shared.state();
            let told = st
                .registry
                .tell_all(migration_id, start, deadline)
                .map_err(|_| ServerError::MigrationInProgress {
                    active: st.registry.active_migration().unwrap_or(migration_id),
                    requested: migration_id,
                })?;
            let msg = Message::Migrate {
                migration_id,
                new_addr,
                deadline_ms: u32::try_from(deadline.as_millis()).unwrap_or(u32::MAX),
                token: None,
            };
            // Only sessions whose control stream is open can answer; the others are reported
            // missing without being waited for.
            let reachable: Vec<SessionId> = told
                .iter()
                .copied()
                .filter(|s| {
                    st.controls
                        .get(s)
                        .is_some_and(|tx| tx.send(Command::Send(msg.clone())).is_ok())
                })
                .collect();
            (told, reachable)
        };
        info!(%migration_id, %new_addr, clients = told.len(), reachable = reachable.len(), "announced migration");
        let end = tokio::time::Instant::now() + deadline;
        loop {
            // Registered before the check, so a change in between is not missed.
            let notified = self.shared.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let waiting = {
                let st = self.shared.state();
                reachable
                    .iter()
                    .filter(|s| {
                        st.registry
                            .get(**s)
                            .is_some_and(|x| matches!(x.state(), SessionState::Told { .. }))
                    })
                    .count()
            };
            if waiting == 0 {
                break;
            }
            if tokio::time::timeout_at(end, notified).await.is_err() {
                let now = self.shared.clock.now();
                let expired = self.shared.state().registry.expire(now);
                warn!(%migration_id, missing = expired.len(), "ack deadline passed");
                break;
            }
        }
        let elapsed = self.shared.clock.now().saturating_duration_since(start);
        let st = self.shared.state();
        let mut report = AnnounceReport {
            migration_id: migration_id.to_string(),
            address: new_addr,
            acked: Vec::new(),
            missing: Vec::new(),
            elapsed_ms: elapsed.as_secs_f64() * 1e3,
        };
        for s in &told {
            let Some(sess) = st.registry.get(*s) else {
                continue; // The connection closed meanwhile.
            };
            let entry = (s.0, sess.client_id().to_owned());
            match sess.state() {
                SessionState::Acked { .. }
                | SessionState::Quiesced { .. }
                | SessionState::Resumed { .. } => report.acked.push(entry),
                _ => report.missing.push(entry),
            }
        }
        Ok(report)
    }

    /// The move failed: tell every client to swap back to `fallback_addr`, wait for their acks
    /// until `deadline`, and end the migration.
    pub async fn abort(
        &self,
        fallback_addr: SocketAddr,
        deadline: Duration,
    ) -> Result<AnnounceReport, ServerError> {
        let start = self.shared.clock.now();
        let (migration_id, told) = {
            let mut st = self.shared.state();
            let id = st
                .registry
                .active_migration()
                .ok_or(ServerError::NoMigration)?;
            let msg = Message::MigrateAborted {
                migration_id: id,
                fallback_addr,
            };
            let sessions: Vec<SessionId> = st.registry.iter().map(|(s, _)| s).collect();
            let mut told = Vec::new();
            for s in sessions {
                if let Some(tx) = st.controls.get(&s)
                    && tx.send(Command::Send(msg.clone())).is_ok()
                {
                    told.push(s);
                }
            }
            st.abort_pending = told.iter().copied().collect();
            (id, told)
        };
        info!(%migration_id, %fallback_addr, clients = told.len(), "aborted migration");
        let end = tokio::time::Instant::now() + deadline;
        loop {
            // Registered before the check, so a change in between is not missed.
            let notified = self.shared.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.shared.state().abort_pending.is_empty() {
                break;
            }
            if tokio::time::timeout_at(end, notified).await.is_err() {
                break;
            }
        }
        let elapsed = self.shared.clock.now().saturating_duration_since(start);
        let mut st = self.shared.state();
        let mut report = AnnounceReport {
            migration_id: migration_id.to_string(),
            address: fallback_addr,
            acked: Vec::new(),
            missing: Vec::new(),
            elapsed_ms: elapsed.as_secs_f64() * 1e3,
        };
        for s in &told {
            let name = st
                .registry
                .get(*s)
                .map(|x| x.client_id().to_owned())
                .unwrap_or_default();
            if st.abort_pending.contains(s) {
                report.missing.push((s.0, name));
            } else {
                report.acked.push((s.0, name));
            }
        }
        st.abort_pending.clear();
        st.registry.reset();
        Ok(report)
    }

    /// The server runs at its new address: tell every client (`Resumed`) and end the
    /// migration. Returns how many clients were told.
    pub fn resumed(&self) -> Result<usize, ServerError> {
        let now = self.shared.clock.now();
        let mut st = self.shared.state();
        let id = st
            .registry
            .active_migration()
            .ok_or(ServerError::NoMigration)?;
        let msg = Message::Resumed { migration_id: id };
        let sessions: Vec<SessionId> = st.registry.iter().map(|(s, _)| s).collect();
        let mut told = 0;
        for s in sessions {
            if let Some(tx) = st.controls.get(&s)
                && tx.send(Command::Send(msg.clone())).is_ok()
            {
                told += 1;
            }
            let _ = st.registry.resumed(s, now);
        }
        st.registry.reset();
        Ok(told)
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

async fn accept_loop(shared: Arc<Shared>, tx: mpsc::Sender<AppConnection>) {
    while let Some(incoming) = shared.endpoint.accept().await {
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

/// Accepts the control stream and reads Hello; registers the session and spawns its control
/// task. A connection whose control stream fails still goes to the application.
async fn setup_connection(shared: Arc<Shared>, conn: quinn::Connection) -> Option<AppConnection> {
    let session = {
        let mut st = shared.state();
        let s = SessionId(st.next_session);
        st.next_session += 1;
        s
    };
    let hello = tokio::time::timeout(shared.hello_timeout, async {
        let (send, recv) = conn.accept_bi().await?;
        let mut reader = ControlReader::new(recv, Role::Server);
        let writer = ControlWriter::new(send);
        let first = reader.next().await;
        Ok::<_, quinn::ConnectionError>((reader, writer, first))
    })
    .await;
    let (mut reader, mut writer, first) = match hello {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            debug!(?session, "connection ended before its control stream: {e}");
            return None;
        }
        Err(_) => {
            warn!(
                ?session,
                "no control stream within {:?}", shared.hello_timeout
            );
            return Some(AppConnection {
                connection: conn,
                session,
                client_id: None,
            });
        }
    };
    let (client_id, version) = match first {
        Ok(Some(Message::Hello {
            client_id,
            supported,
        })) => match supported.highest_common(&control_protocol::SUPPORTED_VERSIONS) {
            Some(v) => (client_id, v),
            None => {
                warn!(?session, %supported, "client speaks no common control protocol version");
                let _ = writer
                    .send(&Message::Bye {
                        reason: ByeReason::truncating("no common protocol version"),
                    })
                    .await;
                control::close(&mut writer, &mut reader, CloseCode::UnsupportedVersion);
                return Some(AppConnection {
                    connection: conn,
                    session,
                    client_id: None,
                });
            }
        },
        other => {
            let code = match &other {
                Err(e) => e.close_code(),
                Ok(_) => CloseCode::UnexpectedMessage,
            };
            warn!(
                ?session,
                ?code,
                "bad first control message: {other:?}; closing the control stream"
            );
            control::close(&mut writer, &mut reader, code);
            return Some(AppConnection {
                connection: conn,
                session,
                client_id: None,
            });
        }
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let inserted = {
        let mut st = shared.state();
        let r = st.registry.insert(session, client_id.as_str());
        if r.is_ok() {
            st.controls.insert(session, tx);
        }
        r
    };
    if let Err(e) = inserted {
        warn!(?session, "refusing session: {e}");
        let _ = writer
            .send(&Message::Bye {
                reason: ByeReason::truncating(&e.to_string()),
            })
            .await;
        control::close(&mut writer, &mut reader, CloseCode::Internal);
        conn.close(quinn::VarInt::from_u32(1), b"server full");
        return None;
    }
    if let Err(e) = writer
        .send(&Message::Welcome {
            version,
            session_id: session.0,
        })
        .await
    {
        debug!(?session, "welcome failed: {e}");
    }
    info!(?session, client = client_id.as_str(), remote = %conn.remote_address(), "client connected");
    tokio::spawn(control_task(shared.clone(), session, reader, writer, rx));
    let watch_conn = conn.clone();
    let watch_shared = shared.clone();
    tokio::spawn(async move {
        let reason = watch_conn.closed().await;
        info!(?session, "connection closed: {reason}");
        let mut st = watch_shared.state();
        st.registry.remove(session);
        st.controls.remove(&session);
        st.abort_pending.remove(&session);
        drop(st);
        watch_shared.changed.notify_waiters();
    });
    Some(AppConnection {
        connection: conn,
        session,
        client_id: Some(ClientId::as_str(&client_id).to_owned()),
    })
}

async fn control_task(
    shared: Arc<Shared>,
    session: SessionId,
    mut reader: ControlReader,
    mut writer: ControlWriter,
    mut rx: mpsc::UnboundedReceiver<Command>,
) {
    loop {
        tokio::select! {
            msg = reader.next() => match msg {
                Ok(Some(msg)) => {
                    if let Err(code) = on_client_message(&shared, session, msg) {
                        control::close(&mut writer, &mut reader, code);
                        break;
                    }
                }
                Ok(None) => {
                    debug!(?session, "client finished its control stream");
                    writer.finish();
                    break;
                }
                Err(e) => {
                    let code = e.close_code();
                    warn!(?session, %code, "control stream error: {e}; closing it");
                    control::close(&mut writer, &mut reader, code);
                    break;
                }
            },
            cmd = rx.recv() => match cmd {
                Some(Command::Send(msg)) => {
                    if let Err(e) = writer.send(&msg).await {
                        warn!(?session, "control send failed: {e}");
                        break;
                    }
                }
                None => break,
            },
        }
    }
    shared.state().controls.remove(&session);
    shared.changed.notify_waiters();
}

/// Applies one client message; `Err(code)` closes the control stream.
fn on_client_message(shared: &Shared, session: SessionId, msg: Message) -> Result<(), CloseCode> {
    let now = shared.clock.now();
    let mut st = shared.state();
    match msg {
        Message::Ack { migration_id } => {
            let id = migration_id;
            if st.abort_pending.remove(&session) {
                debug!(?session, %id, "abort acknowledged");
            } else if let Err(e) = st.registry.ack(session, id, now) {
                // A late or duplicate ack is not worth closing the stream over.
                debug!(?session, %id, "ack not recorded: {e}");
            } else {
                debug!(?session, %id, "ack");
            }
        }
        Message::Quiesced { migration_id } => {
            if let Err(e) = st.registry.quiesced(session, now) {
                debug!(?session, id = %migration_id, "quiesced not recorded: {e}");
            }
        }
        Message::Bye { reason } => {
            info!(?session, reason = reason.as_str(), "client said bye");
        }
        other => {
            warn!(?session, kind = ?other.kind(), "unexpected control message");
            return Err(CloseCode::UnexpectedMessage);
        }
    }
    drop(st);
    shared.changed.notify_waiters();
    Ok(())
}

/// The demo echo service on one connection: every bidirectional stream the client opens is
/// one request, answered with the connection's counter (see [`demo_echo`]).
pub async fn serve_echo(app: AppConnection) {
    let state = Arc::new(Mutex::new(demo_echo::EchoState::default()));
    let conn = app.connection;
    loop {
        let (mut send, mut recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => {
                info!(session = app.session.0, "echo connection ended: {e}");
                return;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let bytes = match recv.read_to_end(demo_echo::MAX_FRAME).await {
                Ok(b) => b,
                Err(e) => {
                    warn!("echo request unreadable: {e}");
                    let _ = send.reset(quinn::VarInt::from_u32(1));
                    return;
                }
            };
            let reply = demo_echo::EchoRequest::decode(&bytes)
                .and_then(|req| state.lock().unwrap_or_else(|p| p.into_inner()).handle(req));
            match reply.and_then(|r| r.encode()) {
                Ok(out) => {
                    if send.write_all(&out).await.is_ok() {
                        let _ = send.finish();
                    }
                }
                Err(e) => {
                    warn!("bad echo request: {e}");
                    let _ = send.reset(quinn::VarInt::from_u32(2));
                }
            }
        });
    }
}
