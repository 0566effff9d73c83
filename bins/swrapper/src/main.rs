//! swrapper: the demo echo server, migratable.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use migration_core::MigrationId;
use serde::Deserialize;
use swrapper::{MigratableServer, MigrationHandle, ServerOptions};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};
use wrapper_support::Identity;

/// The demo echo server on a migratable QUIC socket.
///
/// Every request is echoed with a per-connection counter that must survive a migration.
///
/// Signals (as the orchestrator uses them):
///   SIGTERM  announce a migration: send Migrate(--migrate-to, or the admin dir's migrate.json)
///            to every client and wait for their acks (--ack-deadline-ms); with
///            --park-after-announce the socket is then closed, ready for a checkpoint.
///   SIGUSR2  after a restore: rebind the socket (or unpark it) in the current network
///            namespace and tell the clients that the server runs again (Resumed).
///   SIGUSR1  the move failed: tell the clients to swap back to this server's address and
///            unpark the socket if it was parked.
///   SIGINT   close every connection and exit.
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
    /// Directory for the orchestrator: SIGTERM reads `migrate.json` from it
    /// ({"new_addr": "127.0.0.1:5243", "migration_id": "<32 hex>"?, "deadline_ms": 2000?}) and writes
    /// `announce.json` (the acks) into it; other events are written as `<event>.json`:
    /// `ready` at start, `resumed` after SIGUSR2, `aborted` after SIGUSR1 (which reads the
    /// clients' fallback address from `abort.json`: {"fallback_addr": "127.0.0.1:5242"}).
    #[arg(long, env = "SWRAPPER_ADMIN_DIR")]
    admin_dir: Option<PathBuf>,
    /// How long to wait for the clients' acks after announcing.
    #[arg(long, env = "SWRAPPER_ACK_DEADLINE_MS", default_value_t = 2000)]
    ack_deadline_ms: u64,
    /// Close the socket once the acks are in, so that a checkpoint holds no inet socket.
    #[arg(long, env = "SWRAPPER_PARK_AFTER_ANNOUNCE")]
    park_after_announce: bool,
    /// Connection idle timeout in seconds; must outlast the longest freeze.
    #[arg(long, env = "SWRAPPER_IDLE_TIMEOUT_S", default_value_t = 30)]
    idle_timeout_s: u64,
    /// Log filter (tracing's EnvFilter syntax, e.g. `info`, `swrapper=debug`).
    #[arg(long, env = "SWRAPPER_LOG", default_value = "info")]
    log: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MigrateRequest {
    new_addr: SocketAddr,
    migration_id: Option<MigrationId>,
    deadline_ms: Option<u64>,
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
    if args.ack_deadline_ms == 0 {
        bail!("--ack-deadline-ms must be at least 1");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> Result<()> {
    let identity = match (&args.cert, &args.key) {
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
    };
    if let Some(dir) = &args.admin_dir
        && !dir.is_dir()
    {
        bail!("--admin-dir {} is not a directory", dir.display());
    }
    let mut opts = ServerOptions::new(args.listen, identity, vec![demo_echo::ALPN.to_vec()]);
    opts.idle_timeout = Duration::from_secs(args.idle_timeout_s);
    let server =
        MigratableServer::bind(opts).with_context(|| format!("serving on {}", args.listen))?;
    let handle = server.handle();
    info!(addr = %server.local_addr(), pid = std::process::id(), "echo server ready");
    write_event(
        &args,
        "ready",
        &serde_json::json!({ "pid": std::process::id(), "addr": server.local_addr() }),
    );

    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut usr1 = signal(SignalKind::user_defined1()).context("SIGUSR1 handler")?;
    let mut usr2 = signal(SignalKind::user_defined2()).context("SIGUSR2 handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    loop {
        tokio::select! {
            conn = server.accept() => match conn {
                Some(app) => { tokio::spawn(swrapper::serve_echo(app)); }
                None => break,
            },
            _ = term.recv() => on_announce(&args, &handle).await,
            _ = usr2.recv() => on_resume(&args, &handle).await,
            _ = usr1.recv() => on_abort(&args, &handle).await,
            _ = int.recv() => {
                info!("SIGINT: closing");
                handle.close("server shutting down");
                break;
            }
        }
    }
    Ok(())
}

fn write_event(args: &Args, name: &str, value: &serde_json::Value) {
    let Some(dir) = &args.admin_dir else {
        return;
    };
    let path = dir.join(format!("{name}.json"));
    let tmp = dir.join(format!(".{name}.json.tmp"));
    let text = serde_json::to_string_pretty(value).unwrap_or_else(|_| "{}".to_owned());
    // Written then renamed, so a reader never sees half a file.
    if let Err(e) = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, &path)) {
        error!(path = %path.display(), "cannot write event file: {e}");
    }
}

fn read_request(dir: &Path) -> Result<MigrateRequest> {
    let path = dir.join("migrate.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
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

async fn on_announce(args: &Args, handle: &MigrationHandle) {
    let (new_addr, id, deadline_ms) = match (&args.admin_dir, args.migrate_to) {
        (Some(dir), _) if dir.join("migrate.json").exists() => match read_request(dir) {
            Ok(r) => (
                r.new_addr,
                r.migration_id.unwrap_or_else(fresh_id),
                r.deadline_ms.unwrap_or(args.ack_deadline_ms),
            ),
            Err(e) => {
                error!("SIGTERM: {e:#}; not announcing");
                write_event(
                    args,
                    "announce",
                    &serde_json::json!({ "error": format!("{e:#}") }),
                );
                return;
            }
        },
        (_, Some(addr)) => (addr, fresh_id(), args.ack_deadline_ms),
        _ => {
            error!("SIGTERM: no --migrate-to and no migrate.json in --admin-dir; not announcing");
            write_event(
                args,
                "announce",
                &serde_json::json!({ "error": "no target address" }),
            );
            return;
        }
    };
    info!(%id, %new_addr, "SIGTERM: announcing migration");
    match handle
        .announce(id, new_addr, Duration::from_millis(deadline_ms.max(1)))
        .await
    {
        Ok(report) => {
            if report.complete() {
                info!(
                    acked = report.acked.len(),
                    ms = report.elapsed_ms,
                    "every client acked"
                );
            } else {
                warn!(missing = ?report.missing, "some clients did not ack");
            }
            if args.park_after_announce
                && let Err(e) = handle.park().await
            {
                error!("parking failed: {e}");
            }
            let mut v = serde_json::to_value(&report).unwrap_or_default();
            v["parked"] = serde_json::json!(handle.is_parked());
            v["handshakes"] = serde_json::json!(handle.handshakes());
            write_event(args, "announce", &v);
        }
        Err(e) => {
            error!("announce failed: {e}");
            write_event(
                args,
                "announce",
                &serde_json::json!({ "error": e.to_string() }),
            );
        }
    }
}

async fn on_resume(args: &Args, handle: &MigrationHandle) {
    let result = if handle.is_parked() {
        handle.unpark(None)
    } else {
        handle.rebind(None).await
    };
    match result {
        Ok(addr) => {
            let told = handle.resumed().unwrap_or(0);
            info!(%addr, told, "SIGUSR2: socket renewed, clients told");
            write_event(
                args,
                "resumed",
                &serde_json::json!({ "addr": addr, "told": told, "handshakes": handle.handshakes() }),
            );
        }
        Err(e) => {
            error!("SIGUSR2: renewing the socket failed: {e}");
            write_event(
                args,
                "resumed",
                &serde_json::json!({ "error": e.to_string() }),
            );
        }
    }
}

async fn on_abort(args: &Args, handle: &MigrationHandle) {
    let renewed = if handle.is_parked() {
        handle.unpark(None)
    } else {
        Ok(handle.local_addr())
    };
    if let Err(e) = renewed {
        error!("SIGUSR1: unparking failed: {e}");
        write_event(
            args,
            "aborted",
            &serde_json::json!({ "error": e.to_string() }),
        );
        return;
    }
    let fallback = fallback_addr(args);
    match handle
        .abort(fallback, Duration::from_millis(args.ack_deadline_ms))
        .await
    {
        Ok(report) => {
            info!(%fallback, acked = report.acked.len(), missing = report.missing.len(), "SIGUSR1: migration aborted");
            let mut v = serde_json::to_value(&report).unwrap_or_default();
            v["handshakes"] = serde_json::json!(handle.handshakes());
            write_event(args, "aborted", &v);
        }
        Err(e) => {
            warn!("SIGUSR1: {e}");
            write_event(
                args,
                "aborted",
                &serde_json::json!({ "error": e.to_string() }),
            );
        }
    }
}

/// Where clients should swap back to: the admin dir's `fallback_addr` file, else the address
/// the clients first dialled is unknown to the server, so the orchestrator must provide it.
fn fallback_addr(args: &Args) -> SocketAddr {
    #[derive(Deserialize)]
    struct Fallback {
        fallback_addr: SocketAddr,
    }
    args.admin_dir
        .as_ref()
        .and_then(|d| std::fs::read_to_string(d.join("abort.json")).ok())
        .and_then(|t| serde_json::from_str::<Fallback>(&t).ok())
        .map(|f| f.fallback_addr)
        .unwrap_or(args.listen)
}
