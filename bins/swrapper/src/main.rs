//! swrapper: the demo echo server, migratable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use admin_api::{
    AbortRequest, Aborted, AdminDir, AnnounceOutcome, Announced, ClientRef, Envelope,
    MigrateRequest, Phases, QuiesceOutcome, Ready, Request, ResumeRequest, Resumed, ServerEvent,
};
use anyhow::{Context, Result, bail};
use clap::Parser;
use migration_core::MigrationId;
use swrapper::{MigratableServer, MigrationHandle, ServerOptions};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};
use wrapper_support::Identity;

mod privileges;

/// The demo echo server on a migratable QUIC socket.
///
/// Every request is echoed with a per-connection counter that must survive a migration; a
/// bulk request (demo-echo's BulkRequest) gets a stream of pattern bytes, for goodput.
///
/// Signals (as the orchestrator uses them):
///   SIGTERM  announce a migration (--migrate-to, or the admin dir's migrate.json, whose
///            "phases" overrides --phases). One phase: send Migrate to every client and wait
///            for their acks (--ack-deadline-ms). Two phases: first Quiesce (clients finish
///            their in-flight requests, open no new ones and answer Quiesced; one that does
///            not within the deadline is reported missing and the move goes on), then
///            Migrate and the acks. With --park-after-announce the socket is then closed,
///            ready for a checkpoint; announce.json names who acked, who quiesced and who is
///            missing.
///   SIGUSR2  after a restore: rebind the socket (or unpark it) in the current network
///            namespace and at once tell the clients that the server runs again (Resumed),
///            which also releases quiesced clients.
///   SIGUSR1  the move failed: unpark the socket if it was parked and tell the clients to
///            swap back to this server's address (MigrateAborted), which also releases
///            quiesced clients.
///   SIGINT   close every connection and exit.
///
/// After a move (or its abort) each client reports the pause it observed (control-protocol's
/// Downtime); the server keeps the reports of its last 8 migrations and writes them to the
/// admin dir's downtime.json, never while a migration is under way.
///
/// With --user (started as root): the certificate, the key and the admin directory are opened
/// first, the admin directory is handed to the user (chown, mode 0700; its parent must be
/// root's and closed to others, mode 0700), then the server drops to the user for good:
/// no supplementary groups, the user's uid and primary gid, and no_new_privs. It refuses to
/// start if any step fails.
#[derive(Debug, Parser)]
#[command(version, verbatim_doc_comment)]
struct Args {
    /// UDP address to serve on.
    #[arg(long, env = "SWRAPPER_LISTEN", default_value = "0.0.0.0:4242")]
    listen: SocketAddr,
    /// PEM certificate chain. Without --cert/--key a self-signed certificate is generated.
    #[arg(long, env = "SWRAPPER_CERT", requires = "key")]
    cert: Option<PathBuf>,
    /// PEM private key of --cert.
    #[arg(long, env = "SWRAPPER_KEY", requires = "cert")]
    key: Option<PathBuf>,
    /// Name the generated certificate is issued for (what clients pass as --server-name).
    #[arg(long, env = "SWRAPPER_NAME", default_value = "localhost")]
    name: String,
    /// Where to write the generated certificate, for clients to trust (cwrapper --ca).
    #[arg(long, env = "SWRAPPER_CERT_OUT", default_value = "swrapper-cert.pem")]
    cert_out: PathBuf,
    /// Address announced to the clients on SIGTERM.
    #[arg(long, env = "MIGRATE_TO")]
    migrate_to: Option<SocketAddr>,
    /// Directory for the orchestrator (admin-api's contract). Requests, each naming its
    /// migration and removed once read: `migrate.json` ({"migration_id": "<32 hex>",
    /// "new_addr": "127.0.0.1:5243", "deadline_ms": 2000}) read on SIGTERM, `resume.json`
    /// ({"migration_id": ...}) on SIGUSR2, `abort.json` ({"migration_id": ..., "fallback_addr":
    /// "127.0.0.1:5242", "deadline_ms": 2000}) on SIGUSR1. Events written back, each in an
    /// envelope {"migration_id": ..., "result": {"Ok": ...} | {"Err": "..."}}: `ready.json` at
    /// start, `announce.json`, `resumed.json`, `aborted.json`. The clients' downtime reports
    /// in `downtime.json` ({"migrations": [{"migration_id": ..., "reports": [{"session": 1,
    /// "client_id": "...", "downtime_us": 31000}]}]}), rewritten as they come, not consumed.
    /// Created 0600.
    #[arg(long, env = "SWRAPPER_ADMIN_DIR")]
    admin_dir: Option<PathBuf>,
    /// How long to wait for the clients' acks after announcing.
    #[arg(long, env = "SWRAPPER_ACK_DEADLINE_MS", default_value_t = 2000)]
    ack_deadline_ms: u64,
    /// Migration mode on SIGTERM when no migrate.json says otherwise: `one` (Migrate, acks)
    /// or `two` (Quiesce and Quiesced first, so that nothing is in flight during the freeze).
    #[arg(long, env = "SWRAPPER_PHASES", default_value = "one")]
    phases: Phases,
    /// Close the socket once the acks are in, so that a checkpoint holds no inet socket.
    #[arg(long, env = "SWRAPPER_PARK_AFTER_ANNOUNCE")]
    park_after_announce: bool,
    /// Connection idle timeout in seconds; must outlast the longest freeze (10 s, the clients'
    /// overlap cap) by 5 s: at least 15 (refused otherwise).
    #[arg(long, env = "SWRAPPER_IDLE_TIMEOUT_S", default_value_t = 30)]
    idle_timeout_s: u64,
    /// Run as this user (name from the passwd database) once the certificate, the key and the
    /// admin directory are open: needs root; the admin directory is given to the user, and
    /// its parent must be owned by root with mode 0700 (so only root and the server reach
    /// it). Ports below 1024 cannot be served then: the socket is bound as the user.
    #[arg(long, env = "SWRAPPER_USER")]
    user: Option<String>,
    /// Resident memory to hold, in MiB (for benchmarks of moves by size): allocated and every
    /// page written with incompressible bytes at start, before the server is ready (before
    /// `ready.json`), so that the process's RSS is this much larger. At most the machine's
    /// memory (MemTotal). 0: none.
    #[arg(long, env = "SWRAPPER_BALLAST_MIB", default_value_t = 0)]
    ballast_mib: u64,
    /// Rewrite this many MiB of the ballast per second, a slice every 10 ms round and round
    /// (memory a live process dirties while it is copied), from a thread of its own. Needs
    /// --ballast-mib; at most 100 x --ballast-mib. 0: none.
    #[arg(long, env = "SWRAPPER_DIRTY_MIB_PER_S", default_value_t = 0)]
    dirty_mib_per_s: u64,
    /// tokio's runtime: `multi-thread` (two workers) or `current-thread` (everything on the
    /// main thread: fewer threads for CRIU to seize and dump, so a shorter freeze).
    #[arg(
        long,
        env = "SWRAPPER_RUNTIME",
        value_enum,
        default_value = "multi-thread"
    )]
    runtime: Runtime,
    /// Log filter (tracing's EnvFilter syntax, e.g. `info`, `swrapper=debug`).
    #[arg(long, env = "SWRAPPER_LOG", default_value = "info")]
    log: String,
}

fn main() -> Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&args.log)
                .with_context(|| format!("invalid --log filter `{}`", args.log))?,
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // Every file this server writes (events, a generated certificate) is private.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    if args.ack_deadline_ms == 0 {
        bail!("--ack-deadline-ms must be at least 1");
    }
    // Refused before anything is opened or allocated.
    swrapper::ballast::check_rate(args.dirty_mib_per_s, args.ballast_mib)?;
    if args.ballast_mib > 0 {
        let total = swrapper::ballast::mem_total()?;
        swrapper::ballast::check_size(args.ballast_mib, total)
            .context("--ballast-mib is larger than this machine's memory")?;
    }
    if args.user.is_some() && !nix::unistd::geteuid().is_root() {
        bail!(
            "--user needs root: swrapper opens its files as root, then drops to that user \
             (running as uid {})",
            nix::unistd::geteuid()
        );
    }
    // Everything the server needs from the file system is opened here, before it drops its
    // privileges (and before any thread exists: no_new_privs is per thread, inherited by the
    // runtime's threads started after it).
    let identity = load_identity(&args)?;
    let admin_dir = match &args.admin_dir {
        Some(d) => Some(AdminDir::open_no_follow(d).with_context(|| {
            format!(
                "--admin-dir {} must be a directory, not a symlink",
                d.display()
            )
        })?),
        None => None,
    };
    if let Some(user) = &args.user {
        privileges::drop_to(user, admin_dir.as_ref())?;
    }
    // After the privileges are dropped: the dirtying thread is started as the user. Held until
    // the server exits; resident before the server is ready.
    let _ballast = ballast(&args)?;
    let rt = match args.runtime {
        Runtime::MultiThread => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(2);
            b
        }
        Runtime::CurrentThread => tokio::runtime::Builder::new_current_thread(),
    }
    .enable_all()
    .build()
    .context("starting the tokio runtime")?;
    rt.block_on(run(args, identity, admin_dir))
}

/// The server's tokio runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Runtime {
    /// Two worker threads.
    MultiThread,
    /// The main thread only.
    CurrentThread,
}

fn ballast(args: &Args) -> Result<Option<swrapper::ballast::Ballast>> {
    if args.ballast_mib == 0 {
        return Ok(None);
    }
    let started = std::time::Instant::now();
    let mut ballast = swrapper::ballast::Ballast::allocate(args.ballast_mib)
        .with_context(|| format!("--ballast-mib {}", args.ballast_mib))?;
    ballast
        .start_dirtying(args.dirty_mib_per_s)
        .with_context(|| format!("--dirty-mib-per-s {}", args.dirty_mib_per_s))?;
    info!(
        mib = args.ballast_mib,
        dirty_mib_per_s = args.dirty_mib_per_s,
        ms = started.elapsed().as_secs_f64() * 1e3,
        "ballast resident"
    );
    Ok(Some(ballast))
}

fn load_identity(args: &Args) -> Result<Identity> {
    Ok(match (&args.cert, &args.key) {
        (Some(c), Some(k)) => Identity::load(c, k)?,
        _ => {
            let (id, pem) = Identity::self_signed(std::slice::from_ref(&args.name))?;
            pem.write_cert(&args.cert_out)?;
            info!(
                cert = %args.cert_out.display(),
                name = %args.name,
                "generated a self-signed certificate; clients pass --ca {}",
                args.cert_out.display()
            );
            id
        }
    })
}

async fn run(args: Args, identity: Identity, admin_dir: Option<AdminDir>) -> Result<()> {
    let config = swrapper::server_config(
        identity,
        &[demo_echo::ALPN],
        Duration::from_secs(args.idle_timeout_s),
    )?;
    let opts = ServerOptions::with_server_config(args.listen, config);
    let server =
        MigratableServer::bind(opts).with_context(|| format!("serving on {}", args.listen))?;
    let handle = server.handle();
    info!(addr = %server.local_addr(), pid = std::process::id(), "echo server ready");
    let mut admin = Admin {
        dir: admin_dir,
        current: None,
    };
    admin.post(
        None,
        Ok(Ready {
            pid: std::process::id(),
            addr: server.local_addr(),
        }),
    );

    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut usr1 = signal(SignalKind::user_defined1()).context("SIGUSR1 handler")?;
    let mut usr2 = signal(SignalKind::user_defined2()).context("SIGUSR2 handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut downtimes = handle.downtime_changes();
    // When the downtime record is written next (reports come in bursts: one per client).
    let mut downtimes_due: Option<tokio::time::Instant> = None;
    loop {
        // Never written while a migration is under way: the process may be frozen at any
        // moment after its announce, and a file being written then would be in its image set.
        // Written here, in the loop that runs the migration steps, so no write is in flight
        // when a step starts.
        let write_downtimes = downtimes_due.filter(|_| admin.current.is_none());
        tokio::select! {
            conn = server.accept() => match conn {
                // Echo and bulk requests (see demo-echo).
                Some(app) => { tokio::spawn(swrapper::serve_echo(app)); }
                None => break,
            },
            Ok(()) = downtimes.changed(), if admin.dir.is_some() => {
                downtimes.borrow_and_update();
                downtimes_due.get_or_insert_with(|| {
                    tokio::time::Instant::now() + DOWNTIME_WRITE_DELAY
                });
            }
            () = sleep_until_opt(write_downtimes), if write_downtimes.is_some() => {
                downtimes_due = None;
                admin.post_downtimes(&handle);
            }
            _ = term.recv() => on_announce(&args, &mut admin, &handle).await,
            _ = usr2.recv() => on_resume(&mut admin, &handle).await,
            _ = usr1.recv() => on_abort(&args, &mut admin, &handle).await,
            _ = int.recv() => {
                info!("SIGINT: closing");
                handle.close("server shutting down");
                break;
            }
        }
    }
    Ok(())
}

/// How long a first downtime report waits for the others before the record is written (each
/// client reports at its first reply after the move: they come together).
const DOWNTIME_WRITE_DELAY: Duration = Duration::from_millis(20);

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at).await;
    }
}

/// The server's side of the admin directory, and the migration it is in.
struct Admin {
    dir: Option<AdminDir>,
    /// The migration announced last and not yet resumed or aborted.
    current: Option<MigrationId>,
}

impl Admin {
    fn post<E: ServerEvent>(&self, migration_id: Option<MigrationId>, result: Result<E, String>) {
        let Some(dir) = &self.dir else {
            return;
        };
        if let Err(e) = dir.post_event(&Envelope {
            migration_id,
            result,
        }) {
            error!("cannot write the {} event: {e}", E::KIND);
        }
    }

    /// Writes the clients' downtime reports (`downtime.json`) for control to collect.
    fn post_downtimes(&self, handle: &MigrationHandle) {
        let Some(dir) = &self.dir else {
            return;
        };
        if let Err(e) = dir.post_downtimes(&handle.downtime_log()) {
            error!("cannot write the downtime record: {e}");
        }
    }

    /// Takes the request of kind `R`; `Ok(None)` when there is none (or no admin directory).
    fn take<R: Request>(&self) -> Result<Option<R>, String> {
        match &self.dir {
            None => Ok(None),
            Some(d) => d.take_request::<R>().map_err(|e| e.to_string()),
        }
    }
}

fn fresh_id() -> MigrationId {
    // Not a secret: unique enough from the pid, the time and a counter.
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&nanos.to_be_bytes());
    b[8..12].copy_from_slice(&std::process::id().to_be_bytes());
    b[12..].copy_from_slice(&(COUNTER.fetch_add(1, Ordering::Relaxed) as u32).to_be_bytes());
    MigrationId::from_bytes(b)
}

async fn on_announce(args: &Args, admin: &mut Admin, handle: &MigrationHandle) {
    let (new_addr, id, deadline_ms, phases, quiesce_ms) =
        match (admin.take::<MigrateRequest>(), args.migrate_to) {
            (Ok(Some(r)), _) => (
                r.new_addr,
                r.migration_id,
                r.deadline_ms,
                r.phases,
                r.quiesce_deadline_ms.unwrap_or(r.deadline_ms),
            ),
            (Err(e), _) => {
                error!("SIGTERM: {e}; not announcing");
                admin.post::<Announced>(None, Err(e));
                return;
            }
            (Ok(None), Some(addr)) => (
                addr,
                fresh_id(),
                args.ack_deadline_ms,
                args.phases,
                args.ack_deadline_ms,
            ),
            (Ok(None), None) => {
                let e = "SIGTERM without a migrate request (admin directory) or --migrate-to: \
                     not announcing";
                error!("{e}");
                admin.post::<Announced>(None, Err(e.to_owned()));
                return;
            }
        };
    if deadline_ms == 0 || quiesce_ms == 0 {
        admin.post::<Announced>(
            Some(id),
            Err("deadline_ms and quiesce_deadline_ms must be at least 1".to_owned()),
        );
        return;
    }
    info!(%id, %new_addr, %phases, "SIGTERM: announcing migration");
    match handle
        .prepare_within(
            id,
            new_addr,
            Duration::from_millis(quiesce_ms),
            Duration::from_millis(deadline_ms),
            phases,
        )
        .await
    {
        Ok(prepared) => {
            admin.current = Some(id);
            if let Some(q) = &prepared.quiesce {
                if q.missing.is_empty() {
                    info!(
                        quiesced = q.acked.len(),
                        ms = q.elapsed_ms,
                        "every client quiesced"
                    );
                } else {
                    warn!(missing = ?q.missing, "some clients did not quiesce; moving anyway");
                }
            }
            let report = prepared.announce;
            if report.missing.is_empty() {
                info!(
                    acked = report.acked.len(),
                    ms = report.elapsed_ms,
                    "every wrapper-aware client acked"
                );
            } else {
                warn!(missing = ?report.missing, "some clients did not ack");
            }
            // Not a reason to stop: they cannot be told whatever we do, and behind a front
            // (which this server cannot see) they follow anyway.
            if !report.cannot_follow.is_empty() {
                warn!(
                    plain = report.cannot_follow.len(),
                    sessions = ?report.cannot_follow,
                    "plain QUIC clients (no control stream) cannot be told of the move: they \
                     keep working only if their address stays, i.e. behind a front"
                );
            }
            if args.park_after_announce
                && let Err(e) = handle.park().await
            {
                error!("parking failed: {e}");
            }
            let event = Announced {
                phases,
                quiesce: prepared.quiesce.as_ref().map(|q| QuiesceOutcome {
                    quiesced: refs(&q.acked),
                    missing: refs(&q.missing),
                    cannot_follow: q.cannot_follow.clone(),
                    elapsed_ms: q.elapsed_ms,
                }),
                outcome: outcome(&report),
                parked: handle.is_parked(),
                handshakes: handle.handshakes(),
            };
            admin.post(Some(id), Ok(event));
        }
        Err(e) => {
            error!("announce failed: {e}");
            // A quiesce round may have started the migration: it is ours to abort (SIGUSR1
            // releases the clients).
            admin.current = handle.active_migration();
            admin.post::<Announced>(Some(id), Err(e.to_string()));
        }
    }
}

fn refs(v: &[(u64, String)]) -> Vec<ClientRef> {
    v.iter()
        .map(|(session, client_id)| ClientRef {
            session: *session,
            client_id: client_id.clone(),
        })
        .collect()
}

fn outcome(report: &swrapper::AnnounceReport) -> AnnounceOutcome {
    AnnounceOutcome {
        address: report.address,
        acked: refs(&report.acked),
        missing: refs(&report.missing),
        cannot_follow: report.cannot_follow.clone(),
        elapsed_ms: report.elapsed_ms,
    }
}

/// The migration a resume or abort request names must be the one in progress.
fn check_current(admin: &Admin, requested: Option<MigrationId>) -> Result<MigrationId, String> {
    match (requested, admin.current) {
        (Some(r), Some(c)) if r == c => Ok(r),
        (Some(r), Some(c)) => Err(format!(
            "request for migration {r}, but migration {c} is in progress"
        )),
        (Some(r), None) => Err(format!(
            "request for migration {r}, but no migration is in progress"
        )),
        (None, Some(c)) => Ok(c),
        (None, None) => Err("no migration is in progress".to_owned()),
    }
}

async fn on_resume(admin: &mut Admin, handle: &MigrationHandle) {
    let requested = match admin.take::<ResumeRequest>() {
        Ok(r) => r.map(|r| r.migration_id),
        Err(e) => {
            error!("SIGUSR2: {e}");
            admin.post::<Resumed>(None, Err(e));
            return;
        }
    };
    let id = match check_current(admin, requested) {
        Ok(id) => id,
        Err(e) => {
            error!("SIGUSR2: {e}");
            admin.post::<Resumed>(requested, Err(e));
            return;
        }
    };
    let result = if handle.is_parked() {
        handle.unpark(None)
    } else {
        handle.rebind(None).await
    };
    match result {
        Ok(addr) => {
            let told = handle.resumed().unwrap_or(0);
            admin.current = None;
            info!(%addr, told, "SIGUSR2: socket renewed, clients told");
            let event = Resumed {
                addr,
                told,
                handshakes: handle.handshakes(),
            };
            admin.post(Some(id), Ok(event));
        }
        Err(e) => {
            error!("SIGUSR2: renewing the socket failed: {e}");
            admin.post::<Resumed>(Some(id), Err(e.to_string()));
        }
    }
}

async fn on_abort(args: &Args, admin: &mut Admin, handle: &MigrationHandle) {
    let request = match admin.take::<AbortRequest>() {
        Ok(r) => r,
        Err(e) => {
            error!("SIGUSR1: {e}");
            admin.post::<Aborted>(None, Err(e));
            return;
        }
    };
    let requested = request.as_ref().map(|r| r.migration_id);
    // Whatever else happens, a parked socket serves again: the source must go on serving.
    if handle.is_parked()
        && let Err(e) = handle.unpark(None)
    {
        error!("SIGUSR1: unparking failed: {e}");
        admin.post::<Aborted>(requested, Err(format!("unparking failed: {e}")));
        return;
    }
    let id = match check_current(admin, requested) {
        Ok(id) => id,
        Err(e) => {
            // Nothing announced (the announce itself failed): nothing to tell the clients.
            warn!("SIGUSR1: {e}; the socket serves, no client to send back");
            let event = Aborted {
                outcome: AnnounceOutcome {
                    address: handle.local_addr(),
                    acked: Vec::new(),
                    missing: Vec::new(),
                    cannot_follow: Vec::new(),
                    elapsed_ms: 0.0,
                },
                handshakes: handle.handshakes(),
            };
            admin.post(requested, Ok(event));
            return;
        }
    };
    let (fallback, deadline_ms) = request.map_or((args.listen, args.ack_deadline_ms), |r| {
        (r.fallback_addr, r.deadline_ms.max(1))
    });
    match handle
        .abort(fallback, Duration::from_millis(deadline_ms))
        .await
    {
        Ok(report) => {
            admin.current = None;
            info!(%fallback, acked = report.acked.len(), missing = report.missing.len(), "SIGUSR1: migration aborted");
            let event = Aborted {
                outcome: outcome(&report),
                handshakes: handle.handshakes(),
            };
            admin.post(Some(id), Ok(event));
        }
        Err(e) => {
            warn!("SIGUSR1: {e}");
            admin.post::<Aborted>(Some(id), Err(e.to_string()));
        }
    }
}
