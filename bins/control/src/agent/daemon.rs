//! The agent daemon: its QUIC endpoint (mutual TLS with the other hosts' agents), its unix
//! socket for the command line of its host, and what it knows of its services and of the
//! migrations in flight.
//!
//! ```text
//!  peer agent ──QUIC (mTLS, ALPN qlm-agent/1)──► accept: peer named by its certificate,
//!     bidi stream: PeerRequest frame ──► Gate (allowlist, rate, token) ──► inbound::handle
//!                                          └─ refused: Refusal answered, logged, counted
//!  control (this host) ──unix socket──► LocalRequest ──► start / stop / migrate / drain /
//!                                                        status
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use agent_protocol::{
    HostStatus, LocalReply, LocalRequest, MAX_MESSAGE, MoveSummary, Name, PeerBody, PeerReply,
    PeerRequest, Refusal,
};
use anyhow::{Context, Result, anyhow, bail};
use migration_core::MigrationId;
use migration_crypto::TokenKey;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tracing::{info, warn};

use super::config::Config;
use super::gate::{self, Gate};
use super::inbound::Inbound;
use super::service::{self, ServerSpec, Service};
use super::tls;

/// How long one request may take to arrive.
const REQUEST_READ_LIMIT: Duration = Duration::from_secs(10);
/// How long connecting to another agent may take (a host that is down must not hold a
/// rollback for QUIC's whole idle timeout).
const CONNECT_LIMIT: Duration = Duration::from_secs(2);
/// How long a stopping agent waits for the moves in flight.
const STOP_WAIT: Duration = Duration::from_secs(120);
/// How many migrations of the recent past `status` shows.
const RECENT: usize = 32;
/// The local socket's name in the storage.
pub(crate) const SOCKET: &str = "agent.sock";

/// An agent.
#[derive(Debug)]
pub(crate) struct Agent {
    pub(crate) config: Config,
    pub(crate) storage: PathBuf,
    pub(crate) token_key: TokenKey,
    pub(crate) gate: Mutex<Gate>,
    pub(crate) endpoint: quinn::Endpoint,
    pub(crate) started: Instant,
    pub(crate) services: Mutex<BTreeMap<Name, Service>>,
    /// Services in the middle of a move (out or in): not startable, stoppable or movable.
    pub(crate) busy: Mutex<BTreeSet<Name>>,
    /// Host ports handed out for slots not registered yet (moves prepared at once).
    pub(crate) reserved_ports: Mutex<BTreeSet<u16>>,
    pub(crate) inbound: Mutex<HashMap<MigrationId, Inbound>>,
    pub(crate) recent: Mutex<VecDeque<MoveSummary>>,
    pub(crate) conns: tokio::sync::Mutex<HashMap<Name, quinn::Connection>>,
    pub(crate) server: ServerSpec,
    /// Faults asked for by peers are injected (tests and the scenario only).
    pub(crate) allow_faults: bool,
    /// A drain of this host runs: no service may arrive or start here meanwhile.
    pub(crate) draining: std::sync::atomic::AtomicBool,
    /// The agent is stopping: it takes no new work (moves in flight finish).
    pub(crate) stopping: std::sync::atomic::AtomicBool,
    pub(crate) runtime: tokio::runtime::Handle,
    pub(crate) metrics: crate::metrics::Metrics,
    /// Starts a post-copy target's lazy-pages daemon on its page socket (`postcopy::
    /// start_daemon`; a stand-in in tests, which have no criu).
    pub(crate) lazy_pages: LazyPagesLauncher,
}

/// How a target agent starts `criu lazy-pages --page-server` on the received image set and
/// its end of the page socket pair.
pub(crate) type LazyPagesLauncher =
    fn(&Path, std::os::unix::net::UnixStream) -> Result<std::process::Child>;

/// `control agent`'s options.
#[derive(Debug, Clone)]
pub(crate) struct AgentOptions {
    pub(crate) config: PathBuf,
    pub(crate) storage: PathBuf,
    /// Run in a mount namespace of its own with a private tmpfs at `storage`.
    pub(crate) private_storage: bool,
    pub(crate) allow_faults: bool,
    pub(crate) swrapper: PathBuf,
}

pub(crate) fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Runs the agent until SIGTERM or SIGINT; then stops its services and exits.
pub(crate) fn run(opts: &AgentOptions) -> Result<()> {
    crate::sys::require_root()?;
    // Nothing this agent inherited reaches its services: a restored server must hold only
    // files of this host (criu cannot dump a descriptor of another mount namespace).
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets flags on this process's
    // descriptors from 3 up; std's own descriptors are already close-on-exec.
    let marked =
        unsafe { nix::libc::close_range(3, u32::MAX, nix::libc::CLOSE_RANGE_CLOEXEC as i32) };
    if marked != 0 {
        warn!(
            "could not mark inherited descriptors close-on-exec: {}",
            std::io::Error::last_os_error()
        );
    }
    let config = Config::load(&opts.config)?;
    if opts.private_storage {
        // Before any thread exists: unshare(CLONE_NEWNS) applies to the calling thread only.
        private_mount_namespace(&opts.storage)?;
    } else {
        crate::secure::private_dir(&opts.storage)?;
    }
    // Key material is copied into the private storage and read from there from now on.
    let keys = opts.storage.join("keys");
    crate::secure::private_dir(&keys)?;
    let copy = |from: &Path, name: &str| -> Result<PathBuf> {
        let to = keys.join(name);
        let bytes = std::fs::read(from).with_context(|| format!("reading {}", from.display()))?;
        crate::secure::write_private(&to, &bytes)?;
        Ok(to)
    };
    let server = ServerSpec {
        swrapper: opts.swrapper.clone(),
        cert: copy(&config.service_cert, "service-cert.pem")?,
        key: copy(&config.service_key, "service-key.pem")?,
        user: None,
        extra: Vec::new(),
        pid_namespace: false,
    };
    let token_key = migration_crypto::load_token_key_file(&config.token_key)
        .context("loading the fleet's token key")?;
    service::load_freed_ports(&opts.storage);
    let kept = clean_after_an_earlier_agent(&opts.storage);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let storage = opts.storage.clone();
    let allow_faults = opts.allow_faults;
    runtime.block_on(async move {
        // A socket with large buffers, so that image transfers are not dropped in the kernel.
        let (socket, granted) = crate::image_stream::bulk_socket(config.listen())
            .with_context(|| format!("binding the agent's endpoint on {}", config.listen()))?;
        let (server_cfg, client_cfg) = tls::configs(&config, granted)?;
        let mut endpoint = quinn::Endpoint::new(
            crate::image_stream::bulk_endpoint_config(),
            Some(server_cfg),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .with_context(|| format!("starting the agent's endpoint on {}", config.listen()))?;
        endpoint.set_default_client_config(client_cfg);
        let gate = Gate::new(
            config.host.clone(),
            config.allow.iter().cloned(),
            token_key.clone(),
            config.peer_rate,
            Duration::from_secs(config.token_lifetime_s),
        );
        let agent = Arc::new(Agent {
            config,
            storage,
            token_key,
            gate: Mutex::new(gate),
            endpoint,
            started: Instant::now(),
            services: Mutex::new(BTreeMap::new()),
            busy: Mutex::new(BTreeSet::new()),
            reserved_ports: Mutex::new(BTreeSet::new()),
            inbound: Mutex::new(HashMap::new()),
            recent: Mutex::new(VecDeque::new()),
            conns: tokio::sync::Mutex::new(HashMap::new()),
            server,
            allow_faults,
            draining: std::sync::atomic::AtomicBool::new(false),
            stopping: std::sync::atomic::AtomicBool::new(false),
            runtime: tokio::runtime::Handle::current(),
            metrics: crate::metrics::Metrics::new(),
            lazy_pages: crate::postcopy::start_daemon,
        });
        for journal in kept.inbound {
            match super::inbound::adopt(&agent, journal) {
                Ok(migration) => {
                    info!(%migration, "adopted a restored server waiting for its resume")
                }
                Err(e) => warn!("adopting an inbound migration: {e:#}"),
            }
        }
        {
            let mut services = lock(&agent.services);
            for svc in kept.services {
                services.insert(svc.name.clone(), svc);
            }
        }
        agent.count_services();
        if !kept.moves.is_empty() {
            for (_, svc) in &kept.moves {
                agent.claim(&svc.name);
                // Registered at once: its slot and port count as taken while it is recovered
                // (and stay visible, for `service stop`, if the recovery fails).
                lock(&agent.services).insert(svc.name.clone(), svc.clone());
            }
            let a = agent.clone();
            tokio::task::spawn_blocking(move || super::recovery::recover_all(&a, kept.moves));
        }
        serve(agent).await
    })
}

/// An agent for in-process tests: `config`'s identity, an endpoint on 127.0.0.1 port 0 (its
/// address is the second value), nothing started; call within a tokio runtime.
#[cfg(test)]
pub(crate) fn test_agent(
    config: Config,
    storage: &Path,
    lazy_pages: LazyPagesLauncher,
) -> (Arc<Agent>, SocketAddr) {
    let (server_cfg, client_cfg) = tls::configs(&config, 1 << 20).unwrap();
    let mut endpoint = quinn::Endpoint::server(server_cfg, "127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(client_cfg);
    let addr = endpoint.local_addr().unwrap();
    let token_key = migration_crypto::load_token_key_file(&config.token_key).unwrap();
    let gate = Gate::new(
        config.host.clone(),
        config.allow.iter().cloned(),
        token_key.clone(),
        config.peer_rate,
        Duration::from_secs(config.token_lifetime_s),
    );
    let agent = Arc::new(Agent {
        config,
        storage: storage.to_path_buf(),
        token_key,
        gate: Mutex::new(gate),
        endpoint,
        started: Instant::now(),
        services: Mutex::new(BTreeMap::new()),
        busy: Mutex::new(BTreeSet::new()),
        reserved_ports: Mutex::new(BTreeSet::new()),
        inbound: Mutex::new(HashMap::new()),
        recent: Mutex::new(VecDeque::new()),
        conns: tokio::sync::Mutex::new(HashMap::new()),
        server: ServerSpec {
            swrapper: PathBuf::from("/nonexistent/swrapper"),
            cert: PathBuf::new(),
            key: PathBuf::new(),
            user: None,
            extra: Vec::new(),
            pid_namespace: false,
        },
        allow_faults: false,
        draining: std::sync::atomic::AtomicBool::new(false),
        stopping: std::sync::atomic::AtomicBool::new(false),
        runtime: tokio::runtime::Handle::current(),
        metrics: crate::metrics::Metrics::new(),
        lazy_pages,
    });
    (agent, addr)
}

/// What an agent started after another died on this host takes over.
#[derive(Debug, Default)]
pub(crate) struct Kept {
    /// Inbound migrations whose server was restored here and waits for its resume.
    pub(crate) inbound: Vec<super::inbound::Journal>,
    /// Services whose server still runs under its supervisor.
    pub(crate) services: Vec<Service>,
    /// Moves out of this host that were in flight: finished or undone by
    /// [`super::recovery::recover`] once the agent runs.
    pub(crate) moves: Vec<(super::outbound::MoveJournal, Service)>,
}

/// What an earlier agent of this host left (it was killed, or stopped half-way): the services
/// whose server still runs under its supervisor are taken over (their record says what they
/// are), and so are the moves that were in flight (their journal) and the inbound migrations
/// whose server was restored here. Everything else goes: supervisors told to exit, what runs
/// in their slots removed with the slots, folders (service state, image sets) wiped.
fn clean_after_an_earlier_agent(storage: &Path) -> Kept {
    let mut kept = Kept {
        inbound: super::inbound::adoptable(storage),
        ..Kept::default()
    };
    let slots = match crate::slot::Slot::list(storage) {
        Ok(slots) => slots,
        Err(e) => {
            warn!("listing leftover slots: {e:#}");
            Vec::new()
        }
    };
    let journals = super::outbound::MoveJournal::list(storage);
    let services = storage.join("services");
    if let Ok(entries) = std::fs::read_dir(&services) {
        for e in entries.flatten() {
            let folder = e.file_name().to_string_lossy().into_owned();
            if kept
                .inbound
                .iter()
                .any(|j| j.service.name.as_str() == folder)
            {
                continue;
            }
            let journal = journals
                .iter()
                .find(|j| j.service.as_str() == folder)
                .cloned();
            let taken = service::load_record(&e.path())
                .and_then(|r| Service::from_record(storage, r, &slots))
                .and_then(|svc| match journal {
                    // A move out was in flight: its server runs (parked) or was dumped.
                    Some(j) if svc.server_runs() || j.dumped || j.dumping => {
                        info!(service = %svc.name, migration = %j.migration,
                              "taking over a move an earlier agent left");
                        kept.moves.push((j, svc));
                        Ok(())
                    }
                    _ if svc.server_runs() => {
                        info!(service = %svc.name, pid = svc.server_pid,
                              "taking over a service an earlier agent left");
                        kept.services.push(svc);
                        Ok(())
                    }
                    _ => Err(service::NotAdoptable::ServerGone(svc.server_pid)),
                });
            let Err(why) = taken else { continue };
            let socket = e.path().join(crate::supervisor::SOCKET);
            // Its server goes too (a supervisor that exits leaves its child running).
            let killed = service::kill_servers_of(&socket);
            if killed > 0 {
                warn!(folder = %e.path().display(), killed, "ended servers an earlier agent left");
            }
            if socket.exists() {
                let _ = crate::supervisor::ask(
                    &socket,
                    &crate::supervisor::SupervisorRequest::Exit,
                    Duration::from_secs(2),
                );
            }
            warn!(folder = %e.path().display(), "removing what an earlier agent left ({why})");
            if let Err(err) = service::wipe_dir(&e.path()) {
                warn!("{err:#}");
            }
        }
    }
    for slot in &slots {
        let in_use = kept.inbound.iter().any(|j| j.slot_name == slot.name)
            || kept.services.iter().any(|s| s.slot.name == slot.name)
            || kept.moves.iter().any(|(_, s)| s.slot.name == slot.name);
        if in_use {
            continue;
        }
        warn!(slot = %slot.name, "removing a slot an earlier agent left");
        if let Err(e) = service::remove_slot(slot) {
            warn!("{e:#}");
        }
    }
    let inbound = storage.join("inbound");
    if let Ok(entries) = std::fs::read_dir(&inbound) {
        for e in entries.flatten() {
            if kept
                .inbound
                .iter()
                .any(|j| j.migration.to_string() == e.file_name().to_string_lossy())
            {
                continue;
            }
            if let Err(err) = service::wipe_dir(&e.path()) {
                warn!("{err:#}");
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(storage.join("moves")) {
        for e in entries.flatten() {
            if kept
                .moves
                .iter()
                .any(|(j, _)| j.migration.to_string() == e.file_name().to_string_lossy())
            {
                continue;
            }
            warn!(folder = %e.path().display(), "wiping a move an earlier agent left");
            if let Err(err) = service::wipe_dir(&e.path()) {
                warn!("{err:#}");
            }
        }
    }
    if kept.inbound.is_empty() && kept.services.is_empty() && kept.moves.is_empty() {
        match service::remove_orphans(storage) {
            Ok(0) => {}
            Ok(n) => warn!(n, "removed orphaned slot processes of an earlier agent"),
            Err(e) => warn!("removing orphaned slots: {e:#}"),
        }
    }
    kept
}

fn private_mount_namespace(storage: &Path) -> Result<()> {
    use nix::mount::{MsFlags, mount};
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .context("unsharing the mount namespace")?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .context("making the mounts private")?;
    std::fs::create_dir_all(storage)
        .with_context(|| format!("creating the mount point {}", storage.display()))?;
    mount(
        Some("tmpfs"),
        storage,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0700"),
    )
    .with_context(|| format!("mounting a private tmpfs on {}", storage.display()))?;
    info!(storage = %storage.display(), "private storage: a tmpfs in this agent's own mount namespace");
    Ok(())
}

async fn serve(agent: Arc<Agent>) -> Result<()> {
    let socket = agent.storage.join(SOCKET);
    let _ = std::fs::remove_file(&socket);
    let listener = tokio::net::UnixListener::bind(&socket)
        .with_context(|| format!("binding {}", socket.display()))?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))?;
    }
    info!(
        host = %agent.config.host,
        listen = %agent.config.listen(),
        socket = %socket.display(),
        "agent ready"
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let metrics_listener = tokio::net::TcpListener::bind(agent.config.metrics)
        .await
        .with_context(|| format!("binding the metrics endpoint {}", agent.config.metrics))?;
    let (stop_http, http_stopped) = tokio::sync::oneshot::channel::<()>();
    let health_agent = agent.clone();
    let http = tokio::spawn(crate::http::serve(
        metrics_listener,
        agent.metrics.clone(),
        move || {
            // Healthy while every service's server runs (a moving one is skipped).
            let (n, dead): (usize, Vec<String>) = {
                let services = lock(&health_agent.services);
                let busy = lock(&health_agent.busy).clone();
                let dead = services
                    .values()
                    .filter(|s| !busy.contains(&s.name))
                    .filter(|s| !crate::sys::process_runs(s.server_pid, "swrapper"))
                    .map(|s| s.name.to_string())
                    .collect();
                (services.len(), dead)
            };
            if dead.is_empty() {
                crate::http::Health::ok(format!(
                    "host {}, {n} services, {} free slots",
                    health_agent.config.host,
                    health_agent.free_slots()
                ))
            } else {
                crate::http::Health::failing(format!("servers not running: {}", dead.join(", ")))
            }
        },
        async move {
            let _ = http_stopped.await;
        },
    ));
    // Inbound migrations whose source went quiet for good are given up.
    let sweeper_agent = agent.clone();
    let sweeper = tokio::spawn(async move {
        let stale = Duration::from_secs(sweeper_agent.config.inbound_stale_s);
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            let a = sweeper_agent.clone();
            let _ =
                tokio::task::spawn_blocking(move || super::inbound::give_up_stale(&a, stale)).await;
        }
    });
    let peers = tokio::spawn(accept_peers(agent.clone()));
    let local = tokio::spawn(accept_local(agent.clone(), listener));
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: stopping"),
        _ = int.recv() => info!("SIGINT: stopping"),
    }
    // No new work from here on; what runs (moves out and in) ends first, within a bound: a
    // service stopped mid-move would be lost between two hosts.
    agent
        .stopping
        .store(true, std::sync::atomic::Ordering::SeqCst);
    local.abort();
    let waited = Instant::now();
    loop {
        let busy = lock(&agent.busy).len();
        // Between two moves of a drain nothing is busy, yet the drain goes on: wait for it.
        if busy == 0 && !agent.draining.load(std::sync::atomic::Ordering::SeqCst) {
            break;
        }
        if waited.elapsed() > STOP_WAIT {
            warn!(
                busy,
                "stopping with moves still running after {STOP_WAIT:?}"
            );
            break;
        }
        if waited.elapsed().as_millis() % 5000 < 100 {
            info!(busy, "stopping: waiting for the moves in flight");
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = term.recv() => { warn!("second signal: stopping now"); break; }
            _ = int.recv() => { warn!("second signal: stopping now"); break; }
        }
    }
    peers.abort();
    sweeper.abort();
    let _ = stop_http.send(());
    let _ = http.await;
    agent
        .endpoint
        .close(quinn::VarInt::from_u32(0), b"agent stopping");
    let a = agent.clone();
    tokio::task::spawn_blocking(move || a.stop_everything())
        .await
        .map_err(|e| anyhow!("stopping: {e}"))?;
    let _ = std::fs::remove_file(&socket);
    Ok(())
}

impl Agent {
    /// Stops every service and gives up every inbound migration (the agent is stopping).
    fn stop_everything(&self) {
        let services = std::mem::take(&mut *lock(&self.services));
        for (name, s) in services {
            if let Err(e) = service::tear_down(&s.paths, &s.slot, Some(s.server_pid)) {
                warn!(service = %name, "stopping: {e:#}");
            }
        }
        let inbound: Vec<Inbound> = lock(&self.inbound).drain().map(|(_, v)| v).collect();
        for i in inbound {
            i.give_up();
        }
    }

    /// The services' host address for `port`.
    pub(crate) fn service_address(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.config.address, port)
    }

    /// This host's address as the slots need it (IPv4).
    pub(crate) fn host_v4(&self) -> Result<std::net::Ipv4Addr> {
        match self.config.address {
            std::net::IpAddr::V4(a) => Ok(a),
            std::net::IpAddr::V6(a) => bail!("slots need an IPv4 host address, not {a}"),
        }
    }

    /// A free host port for a new slot, reserved until [`Agent::unreserve`] (called once the
    /// slot is registered, or was not made): two moves prepared at once get two ports.
    pub(crate) fn free_port(&self) -> Result<u16> {
        let mut used: BTreeSet<u16> = lock(&self.services)
            .values()
            .map(|s| s.slot.host_port)
            .collect();
        used.extend(lock(&self.inbound).values().map(|i| i.slot.host_port));
        let mut reserved = lock(&self.reserved_ports);
        let (first, last) = self.config.service_ports;
        let port = (first..=last)
            .find(|p| !used.contains(p) && !reserved.contains(p) && !service::port_resting(*p))
            .ok_or_else(|| {
                anyhow!(
                    "no free service port in {first}-{last} (ports freed less than {:?} ago \
                     rest: their NAT entries may still catch clients)",
                    service::PORT_QUARANTINE
                )
            })?;
        reserved.insert(port);
        Ok(port)
    }

    /// Ends a reservation of [`Agent::free_port`].
    pub(crate) fn unreserve(&self, port: u16) {
        lock(&self.reserved_ports).remove(&port);
    }

    /// [`Agent::free_port`], or `wanted` when it is in range and not taken, reserved alike.
    pub(crate) fn port_for(&self, wanted: u16) -> Result<u16> {
        if wanted == 0 {
            return self.free_port();
        }
        let (first, last) = self.config.service_ports;
        if !(first..=last).contains(&wanted) {
            bail!("port {wanted} is outside this host's service ports {first}-{last}");
        }
        let taken = lock(&self.services)
            .values()
            .any(|s| s.slot.host_port == wanted)
            || lock(&self.inbound)
                .values()
                .any(|i| i.slot.host_port == wanted);
        if taken || !lock(&self.reserved_ports).insert(wanted) {
            bail!("port {wanted} is taken on this host");
        }
        if service::port_resting(wanted) {
            self.unreserve(wanted);
            bail!(
                "port {wanted} was freed less than {:?} ago; it rests while the kernel's NAT \
                 entries of its old slot may still catch clients",
                service::PORT_QUARANTINE
            );
        }
        Ok(wanted)
    }

    /// How many more services fit.
    pub(crate) fn free_slots(&self) -> u32 {
        let services = lock(&self.services).len();
        let n = services + lock(&self.inbound).len();
        self.config
            .max_services
            .saturating_sub(u32::try_from(n).unwrap_or(u32::MAX))
    }

    pub(crate) fn host_status(&self) -> HostStatus {
        // One lock at a time: a guard in a struct literal lives to the end of the statement.
        let services: Vec<_> = lock(&self.services).values().map(Service::status).collect();
        let free_slots = self.free_slots();
        let migrations_in_flight = u32::try_from(lock(&self.busy).len()).unwrap_or(u32::MAX);
        let recent = lock(&self.recent).iter().cloned().collect();
        HostStatus {
            host: self.config.host.clone(),
            services,
            free_slots,
            migrations_in_flight,
            recent,
        }
    }

    /// The services gauge, after a change.
    pub(crate) fn count_services(&self) {
        let n = lock(&self.services).len();
        self.metrics.set_services(n);
    }

    pub(crate) fn record(&self, summary: MoveSummary) {
        let mut r = lock(&self.recent);
        r.push_back(summary);
        while r.len() > RECENT {
            r.pop_front();
        }
    }

    /// Whether a drain of this host runs, or the agent stops: either way no service may
    /// arrive or start.
    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::SeqCst)
            || self.stopping.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Marks `name` busy; false when it already is.
    pub(crate) fn claim(&self, name: &Name) -> bool {
        lock(&self.busy).insert(name.clone())
    }

    pub(crate) fn release(&self, name: &Name) {
        lock(&self.busy).remove(name);
    }

    /// The connection to `peer`, made when there is none.
    pub(crate) async fn connection(&self, peer: &Name) -> Result<quinn::Connection> {
        let mut conns = self.conns.lock().await;
        if let Some(c) = conns.get(peer)
            && c.close_reason().is_none()
        {
            return Ok(c.clone());
        }
        let addr = *self
            .config
            .peers
            .get(peer)
            .ok_or_else(|| anyhow!("no host {peer} in this agent's configuration"))?;
        let connecting = self.endpoint.connect(addr, &tls::server_name(peer))?;
        let conn = tokio::time::timeout(CONNECT_LIMIT, connecting)
            .await
            .map_err(|_| {
                anyhow!("the agent of {peer} at {addr} did not answer within {CONNECT_LIMIT:?}")
            })?
            .with_context(|| format!("connecting to the agent of {peer} at {addr}"))?;
        // Its certificate must name it: rustls checked the name we dialled.
        conns.insert(peer.clone(), conn.clone());
        Ok(conn)
    }

    /// Drops the cached connection to `peer` (after a failure on it).
    pub(crate) async fn forget(&self, peer: &Name) {
        self.conns.lock().await.remove(peer);
    }

    /// One request to `peer` and its answer.
    pub(crate) async fn ask(
        &self,
        peer: &Name,
        request: &PeerRequest,
        limit: Duration,
    ) -> Result<PeerReply> {
        let conn = self.connection(peer).await?;
        let asked = async {
            let (mut send, mut recv) = conn.open_bi().await?;
            write_frame(&mut send, request).await?;
            send.finish()?;
            read_reply(&mut recv).await
        };
        match tokio::time::timeout(limit, asked).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(e)) => {
                self.forget(peer).await;
                Err(e.context(format!("asking the agent of {peer}")))
            }
            Err(_) => bail!("the agent of {peer} did not answer within {limit:?}"),
        }
    }

    /// A fresh token for `migration` from this host to `target`.
    pub(crate) fn token_for(&self, migration: MigrationId, target: &Name) -> Result<Vec<u8>> {
        Ok(gate::issue(
            &self.token_key,
            migration,
            &self.config.host,
            target,
            now_unix(),
            Duration::from_secs(self.config.token_lifetime_s),
        )?
        .into_bytes())
    }
}

/// After a move's result is known, off its path: collects the downtimes the `expected`
/// clients of migration `id` report to the server (its admin folder, on this host) for up to
/// [`crate::engine::DOWNTIME_WAIT`], and observes each in the client downtime histogram. Called
/// by the agent where the server runs afterwards: the target's after a completed move, the
/// source's after a rollback.
pub(crate) fn record_downtimes_later(
    metrics: crate::metrics::Metrics,
    admin: admin_api::AdminDir,
    id: MigrationId,
    expected: usize,
) {
    if expected == 0 {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("downtimes".to_owned())
        .spawn(move || {
            let got = crate::engine::collect_downtimes(&admin, id, expected);
            let pauses: Vec<Duration> = got
                .iter()
                .map(admin_api::ReportedDowntime::downtime)
                .collect();
            metrics.record_client_downtimes(&pauses);
        });
    if let Err(e) = spawned {
        warn!(%id, "no thread to collect the clients' downtimes: {e}");
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panicked holder leaves plain data behind; going on is better than stopping the agent.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub(crate) async fn write_frame<T: serde::Serialize>(
    send: &mut quinn::SendStream,
    msg: &T,
) -> Result<()> {
    let frame = agent_protocol::to_frame(msg)?;
    send.write_all(&frame).await?;
    Ok(())
}

/// Reads one frame's body, refusing a length above [`MAX_MESSAGE`] before reading it.
pub(crate) async fn read_body(recv: &mut quinn::RecvStream) -> Result<Vec<u8>, FrameRead> {
    let mut len = [0u8; 4];
    recv.read_exact(&mut len)
        .await
        .map_err(|e| FrameRead::Io(e.to_string()))?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_MESSAGE {
        return Err(FrameRead::Oversized(len));
    }
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body)
        .await
        .map_err(|e| FrameRead::Io(e.to_string()))?;
    Ok(body)
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FrameRead {
    /// The stream failed or ended early.
    #[error("reading the request: {0}")]
    Io(String),
    /// The length prefix is above the maximum.
    #[error("a frame of {0} bytes, above the maximum")]
    Oversized(usize),
}

async fn read_reply(recv: &mut quinn::RecvStream) -> Result<PeerReply> {
    let body = read_body(recv).await?;
    Ok(agent_protocol::decode(&body)?)
}

pub(crate) async fn accept_peers(agent: Arc<Agent>) {
    while let Some(incoming) = agent.endpoint.accept().await {
        let agent = agent.clone();
        if !incoming.remote_address_validated() {
            // A stateless Retry first: a peer proves it receives at its address before the
            // handshake costs anything.
            if let Err(e) = incoming.retry() {
                tracing::debug!("retry refused: {e}");
            }
            continue;
        }
        tokio::spawn(async move {
            let from = incoming.remote_address();
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    // A peer without a certificate of the fleet CA ends here.
                    warn!(%from, "REFUSED connection: handshake failed: {e}");
                    agent.metrics.record_request(
                        "connect",
                        crate::metrics::RequestOutcome::Refused(
                            crate::metrics::Refusal::BadCertificate,
                        ),
                    );
                    return;
                }
            };
            let Some(peer) = tls::peer_host(&conn, agent.config.peers.keys()) else {
                warn!(%from, "REFUSED connection: its certificate names no known host");
                agent.metrics.record_request(
                    "connect",
                    crate::metrics::RequestOutcome::Refused(
                        crate::metrics::Refusal::BadCertificate,
                    ),
                );
                conn.close(quinn::VarInt::from_u32(1), b"unknown host");
                return;
            };
            if !lock(&agent.gate).allows(&peer) {
                warn!(%from, %peer, "REFUSED connection: host not on the allowlist");
                agent.metrics.record_request(
                    "connect",
                    crate::metrics::RequestOutcome::Refused(crate::metrics::Refusal::NotAllowed),
                );
                conn.close(quinn::VarInt::from_u32(2), b"not allowed");
                return;
            }
            info!(%from, %peer, "peer connected");
            loop {
                match conn.accept_bi().await {
                    Ok((send, recv)) => {
                        tokio::spawn(handle_stream(agent.clone(), peer.clone(), send, recv));
                    }
                    Err(e) => {
                        info!(%peer, "peer connection ended: {e}");
                        return;
                    }
                }
            }
        });
    }
}

async fn handle_stream(
    agent: Arc<Agent>,
    peer: Name,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let reply = match tokio::time::timeout(REQUEST_READ_LIMIT, read_body(&mut recv)).await {
        Err(_) => Some(refuse(
            &agent,
            &peer,
            "unknown",
            Refusal::Malformed("no request in time".into()),
        )),
        Ok(Err(FrameRead::Oversized(n))) => {
            warn!(%peer, len = n, "oversized request");
            Some(refuse(&agent, &peer, "unknown", Refusal::Oversized))
        }
        Ok(Err(FrameRead::Io(e))) => Some(refuse(&agent, &peer, "unknown", Refusal::Malformed(e))),
        Ok(Ok(body)) => match agent_protocol::decode::<PeerRequest>(&body) {
            Err(e) => Some(refuse(
                &agent,
                &peer,
                "unknown",
                Refusal::Malformed(e.to_string()),
            )),
            Ok(request) => {
                let kind = kind_of(&request.body);
                let admitted =
                    lock(&agent.gate).admit(&peer, &request, now_unix(), agent.started.elapsed());
                match admitted {
                    Err(refusal) => Some(refuse(&agent, &peer, kind, refusal)),
                    Ok(claims) => {
                        agent
                            .metrics
                            .record_request(kind, crate::metrics::RequestOutcome::Ok);
                        tracing::debug!(%peer, request = kind, expires = claims.expires_at, "admitted");
                        super::inbound::handle(
                            agent.clone(),
                            peer.clone(),
                            request,
                            &mut send,
                            recv,
                        )
                        .await
                    }
                }
            }
        },
    };
    if let Some(reply) = reply {
        if let Err(e) = write_frame(&mut send, &reply).await {
            warn!(%peer, "answering: {e:#}");
        }
        let _ = send.finish();
    }
    // The stream's end is the peer's to read; keep the send side alive until then.
    let _ = send.stopped().await;
}

pub(crate) fn kind_of(body: &PeerBody) -> &'static str {
    match body {
        PeerBody::Prepare(_) => "prepare",
        PeerBody::Receive { .. } => "receive",
        PeerBody::Restore { .. } => "restore",
        PeerBody::Resume { .. } => "resume",
        PeerBody::Abort { .. } => "abort",
        PeerBody::Status => "status",
        PeerBody::PlainCopy { .. } => "plain_copy",
        PeerBody::PreparePostCopy(_) => "prepare_post_copy",
        PeerBody::Pages { .. } => "pages",
        _ => "unknown",
    }
}

/// Logs a refusal, counts it, and makes its answer.
pub(crate) fn refuse(
    agent: &Agent,
    peer: &Name,
    kind: &'static str,
    refusal: Refusal,
) -> PeerReply {
    warn!(%peer, request = kind, "REFUSED request: {refusal}");
    agent.metrics.record_request(
        kind,
        crate::metrics::RequestOutcome::Refused(metric_reason(&refusal)),
    );
    PeerReply::Refused(refusal)
}

/// The metrics' name for a refusal.
fn metric_reason(r: &Refusal) -> crate::metrics::Refusal {
    use crate::metrics::Refusal as M;
    use agent_protocol::TokenRefusal;
    match r {
        Refusal::Token(TokenRefusal::Expired | TokenRefusal::NotYetValid) => M::Expired,
        Refusal::Token(TokenRefusal::Replayed) => M::Replayed,
        Refusal::Token(_) => M::BadToken,
        Refusal::NotAllowed { .. } => M::NotAllowed,
        Refusal::RateLimited => M::RateLimited,
        Refusal::UnknownService(_) | Refusal::UnknownMigration(_) => M::UnknownService,
        Refusal::Oversized => M::Oversized,
        _ => M::Malformed,
    }
}

async fn accept_local(agent: Arc<Agent>, listener: tokio::net::UnixListener) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                warn!("local socket: {e}");
                continue;
            }
        };
        let agent = agent.clone();
        tokio::spawn(async move {
            let mut stream = stream;
            let reply = match read_local(&mut stream).await {
                Ok(request) => super::local::handle(agent, request).await,
                Err(e) => LocalReply::Error(format!("{e:#}")),
            };
            let frame = agent_protocol::local_reply_frame(&reply).or_else(|e| {
                warn!("local answer not sent: {e}");
                // The command line learns why instead of finding the socket closed.
                agent_protocol::local_reply_frame(&LocalReply::Error(format!(
                    "the agent's answer could not be sent: {e}"
                )))
            });
            if let Ok(frame) = frame {
                let _ = stream.write_all(&frame).await;
            }
        });
    }
}

async fn read_local(stream: &mut tokio::net::UnixStream) -> Result<LocalRequest> {
    let read = async {
        let mut len = [0u8; 4];
        stream.read_exact(&mut len).await?;
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_MESSAGE {
            bail!("request of {len} bytes, above the maximum");
        }
        let mut body = vec![0u8; len];
        stream.read_exact(&mut body).await?;
        Ok(agent_protocol::decode::<LocalRequest>(&body)?)
    };
    tokio::time::timeout(REQUEST_READ_LIMIT, read)
        .await
        .map_err(|_| anyhow!("no request in time"))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::parse::{samples, value};
    use admin_api::{AdminDir, DowntimeLog, MigrationDowntimeReports, ReportedDowntime};

    #[test]
    fn the_reported_downtimes_reach_the_histogram_in_the_background() {
        let t = tempfile::tempdir().unwrap();
        let admin = AdminDir::open(t.path()).unwrap();
        let id = MigrationId::from_bytes([4; 16]);
        let metrics = crate::metrics::Metrics::new();
        let count = |m: &crate::metrics::Metrics| {
            value(
                &samples(&m.encode()),
                "qlm_agent_client_downtime_seconds_count",
                &[],
            )
        };
        // Nobody was told: nothing to wait for.
        record_downtimes_later(metrics.clone(), admin.clone(), id, 0);
        record_downtimes_later(metrics.clone(), admin.clone(), id, 2);
        // The clients report while the collector waits (it returns at once afterwards).
        admin
            .post_downtimes(&DowntimeLog {
                migrations: vec![MigrationDowntimeReports {
                    migration_id: id,
                    reports: [(1, 30_000), (2, 250_000)]
                        .map(|(session, downtime_us)| ReportedDowntime {
                            session,
                            client_id: format!("c{session}"),
                            downtime_us,
                        })
                        .to_vec(),
                }],
            })
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while count(&metrics) != Some(2.0) {
            assert!(Instant::now() < deadline, "{}", metrics.encode());
            std::thread::sleep(Duration::from_millis(10));
        }
        let s = samples(&metrics.encode());
        let bucket = |le| {
            value(
                &s,
                "qlm_agent_client_downtime_seconds_bucket",
                &[("le", le)],
            )
            .unwrap()
        };
        assert_eq!(
            (bucket("0.03"), bucket("0.2"), bucket("0.3")),
            (1.0, 1.0, 2.0)
        );
    }
}
