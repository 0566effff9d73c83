//! control: moves the demo QUIC server between two podman containers with CRIU.

mod agent;
mod criu;
#[cfg(test)]
mod criu_real_tests;
mod criu_rpc;
mod deploy;
mod engine;
mod front;
mod http;
mod image_stream;
mod images;
mod interrupt;
mod journal;
mod kdat;
mod lock;
mod metrics;
mod podman;
mod postcopy;
mod recover;
mod report;
mod restart;
mod run;
mod secure;
mod slot;
mod state;
mod supervisor;
mod sys;
mod transfer;

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use admin_api::Phases;
use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use migration_core::{MigrationPolicy, PreDumpPolicy};

use crate::deploy::{Settings, UpOptions};
use crate::engine::{Fault, Transfer};
use crate::postcopy::Memory;
use crate::run::{Route, RunOptions};

/// Orchestrates the live migration of the demo QUIC server (swrapper) between two podman
/// containers with CRIU, while its clients keep their QUIC connection.
///
/// Containers A and B provide network namespaces and host port maps (host UDP SRC_PORT ->
/// A:4242, DST_PORT -> B:4242). The server runs in the network namespace of one of them while
/// it stays in the host's pid and mount namespaces; `migrate` checkpoints it there with
/// `criu dump` and restores it in the other container's namespace with `criu restore`.
///
/// Needs root, podman, runc, criu >= 4.2, nsenter and busybox-static (`cargo xtask setup`
/// installs them).
#[derive(Debug, Parser)]
#[command(version, verbatim_doc_comment)]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Args)]
struct Common {
    /// Where control keeps the deployment's state, the server's admin directory, logs and
    /// reports.
    #[arg(
        long,
        global = true,
        env = "QLM_STATE_DIR",
        default_value = "/var/tmp/quic-live-migrate"
    )]
    state_dir: PathBuf,
    /// Where CRIU image sets are written (tmpfs keeps dump and restore fast).
    #[arg(
        long,
        global = true,
        env = "QLM_IMAGES_DIR",
        default_value = "/dev/shm/quic-live-migrate"
    )]
    images_dir: PathBuf,
    /// Prefix of the containers' and the image's names.
    #[arg(long, global = true, env = "QLM_NAME", default_value = "qlm")]
    name: String,
    /// Log filter (tracing's EnvFilter syntax); every step logs its duration at `info`.
    #[arg(long, global = true, env = "CONTROL_LOG", default_value = "info")]
    log: String,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Build the image, start containers A and B, start the server in A's network namespace.
    Up(UpCmd),
    /// Move the server to the other container: announce, dump, restore, renew its socket.
    Migrate(MigrateArgs),
    /// Remove containers, image, image sets and state, even after a failed step. Only folders
    /// that carry control's marker are removed.
    Down,
    /// Finish or undo a migration whose control was killed (the journal in the state folder
    /// says which): the server ends up serving, at the source or the target, with its clients
    /// pointed at it. `migrate` and `status` run it first when needed.
    Recover(RecoverArgs),
    /// Show the deployment: where the server runs, its PID, the containers (with --fleet:
    /// every host's services and the last migrations, from this host's agent).
    Status(agent::cli::FleetStatusArgs),
    /// Print what explains a failure: the server's and the client's logs, CRIU's errors, the
    /// containers' logs.
    Logs,
    /// up, start the demo client, migrate A -> B and B -> A, stop the client, report, down.
    Run(RunArgs),
    /// The agent of this host: runs its services, moves them to other hosts' agents (mutual
    /// TLS QUIC, migration tokens, sealed image streams) and receives theirs; the command
    /// line talks to it (`service`, `migrate --to`, `drain`, `status --fleet`).
    Agent(agent::cli::AgentArgs),
    /// Write a fleet's certificates, token key and agent configurations (one folder per host).
    FleetInit(agent::cli::FleetInitArgs),
    /// Start or stop a service on this host (through its agent).
    Service(agent::cli::ServiceArgs),
    /// Move every service of this host to other hosts, a few at a time, and report.
    Drain(agent::cli::DrainArgs),
    /// The server's parent, started by `up` (not for direct use): reaps the dumped server at
    /// once and runs criu restore so that the restored server is its child again.
    #[command(hide = true)]
    Supervise(SuperviseArgs),
    /// For benchmarks (`cargo xtask bench-migrate`): the reconnect baseline. End the server
    /// and start a fresh one in the other container (clients lose their connections).
    #[command(hide = true)]
    RestartElsewhere(RestartArgs),
    /// For benchmarks (`cargo xtask bench-migrate`): build an image whose entry can be the
    /// server itself (for podman's own checkpoint/restore) and a certificate and key for it.
    #[command(hide = true)]
    PodImage(PodImageArgs),
}

#[derive(Debug, Args)]
struct RestartArgs {
    /// Write the JSON report here (default: <state-dir>/reports/restart-<n>.json).
    #[arg(long)]
    report: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct PodImageArgs {
    /// The image's tag.
    #[arg(long)]
    tag: String,
    /// A private folder (0700) where `server-cert.pem` and `server-key.pem` are written.
    #[arg(long)]
    certs: PathBuf,
    /// Directory holding the release swrapper (default: this control's directory).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct RecoverArgs {
    /// Write the recovery's JSON report here (default: <state-dir>/reports/<id>.json).
    #[arg(long)]
    report: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct SuperviseArgs {
    /// The unix socket to answer requests on.
    #[arg(long)]
    socket: PathBuf,
    /// The network namespace the server starts in.
    #[arg(long)]
    netns: PathBuf,
    /// The server's log.
    #[arg(long)]
    server_log: PathBuf,
    /// Start the server as PID 1 of its own pid namespace.
    #[arg(long)]
    pid_namespace: bool,
    /// Start no server: wait for a restore (the target of a cross-host move).
    #[arg(long)]
    idle: bool,
    /// The server's command line.
    #[arg(last = true, required_unless_present = "idle")]
    server: Vec<OsString>,
}

#[derive(Debug, Args, Clone)]
struct UpCmd {
    #[command(flatten)]
    up: UpArgs,
    /// Run this server instead of the demo server (swrapper): any UDP server that listens on
    /// port 4242 of the wildcard address and keeps no resources outside its network namespace
    /// (files by path are fine), e.g. `-- /usr/bin/my-quic-server --port 4242`. It knows
    /// nothing of the moves, so it needs --front: its clients keep the front address while
    /// the NAT behind it follows the server. It runs as --server-user (setpriv,
    /// no_new_privs).
    #[arg(last = true, value_name = "COMMAND")]
    server: Vec<OsString>,
}

#[derive(Debug, Args, Clone)]
struct UpArgs {
    /// Host UDP port mapped to container A's port 4242 (where clients dial first).
    #[arg(long, env = "SRC_PORT", default_value_t = 5242)]
    src_port: u16,
    /// Host UDP port mapped to container B's port 4242.
    #[arg(long, env = "DST_PORT", default_value_t = 5243)]
    dst_port: u16,
    /// Directory holding the release binaries swrapper and cwrapper (default: the directory
    /// of this control binary).
    #[arg(long, env = "QLM_BIN_DIR")]
    bin_dir: Option<PathBuf>,
    /// The unprivileged account the server runs as (with no_new_privs); `cargo xtask setup`
    /// creates the default one. `root` (keep the server root) is accepted only with
    /// `--pid-namespace`, and required there.
    #[arg(long, env = "QLM_SERVER_USER", default_value = "qlm-server")]
    server_user: String,
    /// The demo server's tokio runtime (swrapper --runtime): `current-thread` (everything on
    /// one thread, which CRIU seizes and dumps faster: a shorter freeze) or `multi-thread`.
    #[arg(long, env = "QLM_SERVER_RUNTIME", default_value = "current-thread",
          value_parser = ["current-thread", "multi-thread"])]
    server_runtime: String,
    /// MiB of memory the demo server holds, every page touched before it is ready (to
    /// measure moves of bigger services; swrapper --ballast-mib).
    #[arg(long, default_value_t = 0)]
    ballast_mib: u32,
    /// MiB per second of its ballast the demo server rewrites while it runs (needs
    /// --ballast-mib; swrapper --dirty-mib-per-s).
    #[arg(long, default_value_t = 0)]
    dirty_mib_per_s: u32,
    /// Start the server as PID 1 of its own pid namespace (`unshare --pid --fork`), which
    /// `--memory post-copy` moves need (cold moves work in it too). Needs `--server-user
    /// root`: criu can dump a process in its own pid namespace only if that process may mount
    /// a /proc for it.
    #[arg(long, env = "QLM_PID_NAMESPACE")]
    pid_namespace: bool,
    /// A stable service address, IPv4:PORT of this host (not loopback: clients reach it from
    /// other hosts or namespaces): clients use it for the service's whole life while a NAT
    /// behind it (nftables) points at the container the server runs in; each move switches it
    /// at the freeze and holds the datagrams that arrive meanwhile until the restored server
    /// runs, so that even clients without cwrapper keep their connection. Needs nftables and
    /// iptables-nft, and IPv4 forwarding on.
    #[arg(long, env = "QLM_FRONT", value_parser = parse_front)]
    front: Option<std::net::SocketAddrV4>,
}

fn parse_front(s: &str) -> Result<std::net::SocketAddrV4, String> {
    let addr: std::net::SocketAddrV4 = s
        .parse()
        .map_err(|e| format!("{s:?} is not IPV4:PORT (e.g. 10.235.0.1:5300): {e}"))?;
    if addr.ip().is_loopback() || addr.ip().is_unspecified() || addr.port() == 0 {
        return Err(format!(
            "{addr}: a front address is a host address clients reach from outside (not \
             loopback, not 0.0.0.0) with a port"
        ));
    }
    Ok(addr)
}

#[derive(Debug, Args, Clone)]
struct MigrateArgs {
    /// How long the server waits for every client's ack before it is checkpointed anyway.
    #[arg(long, env = "QLM_ACK_DEADLINE_MS", default_value_t = 2000,
          value_parser = clap::value_parser!(u64).range(1..))]
    ack_deadline_ms: u64,
    /// How the server prepares its clients: `one` (the seed's: Migrate and the acks only;
    /// clients keep sending into the freeze and retry what was lost) or `two` (Quiesce first:
    /// every client finishes its in-flight requests and stops, then Migrate and the acks;
    /// after the restore, Resumed releases them at once, so nothing is lost in the freeze
    /// and no client waits for a deadline or a QUIC probe timer, at the price of one more
    /// round before the freeze). A client that ignores Quiesce is reported missing and the
    /// move goes on. In two phases the server may take up to twice --ack-deadline-ms before
    /// it parks.
    #[arg(long, env = "QLM_PHASES", default_value = "one")]
    phases: Phases,
    /// Two phases: how long the server waits for every client's Quiesced, and then for the
    /// acks of Migrate (capped at --ack-deadline-ms). Clients that did quiesce are held until
    /// the slowest answers or this passes, so it is short; a client that has not answered by
    /// then is still told the new address, reported missing, and the move goes on.
    #[arg(long, env = "QLM_QUIESCE_DEADLINE_MS", default_value_t = 250,
          value_parser = clap::value_parser!(u64).range(1..))]
    quiesce_deadline_ms: u64,
    /// Rounds of `criu pre-dump --track-mem` at most, when the kernel tracks dirty memory.
    #[arg(long, env = "QLM_PREDUMP_ROUNDS", default_value_t = 3)]
    predump_rounds: u32,
    /// How the image set reaches the target: `local` (same host: restore from where it was
    /// dumped) or `sealed` (streamed through migration-wire: chunked, zstd, AES-256-GCM, and
    /// reassembled into a new directory, as between two hosts).
    #[arg(long, env = "QLM_TRANSFER", default_value = "local")]
    transfer: Transfer,
    /// How the server's memory moves: `cold` (all of it while the server is frozen, about
    /// 1 ms per MiB) or `post-copy` (the server runs at the target first, its pages follow
    /// from the frozen source; needs `up --pid-namespace`, fs.pipe-max-size >= 4 MiB and
    /// `--transfer local`; if the page transfer fails after the restore, the server is lost).
    #[arg(long, env = "QLM_MEMORY", value_enum, default_value = "cold")]
    memory: Memory,
    /// Write the migration's JSON report here (default: <state-dir>/reports/<id>.json).
    #[arg(long)]
    report: Option<PathBuf>,
    /// Keep the image set after a successful migration.
    #[arg(long)]
    keep_images: bool,
    /// Behind a front (`up --front`): switch it at the freeze without holding the datagrams
    /// that arrive meanwhile (they are lost, as without a front; for measuring what the hold
    /// buys).
    #[arg(long)]
    front_no_hold: bool,
    /// Fault injection for testing the rollback: make the restore in the target fail (its
    /// pstree image is hidden from it), so the server must be restored in the source again.
    #[arg(long)]
    fail_restore: bool,
    /// Fault injection for testing the rollback: make the final dump fail (its image directory
    /// is not a directory), so the server must go on serving in the source.
    #[arg(long, conflicts_with = "fail_restore")]
    fail_dump: bool,
    /// Fault injection for testing the checks: restore the server into the source's network
    /// namespace instead of the target's; the move must be reported failed.
    #[arg(long, hide = true, conflicts_with_all = ["fail_restore", "fail_dump"])]
    fault_restore_in_source: bool,
    #[command(flatten)]
    cross: agent::cli::CrossMoveArgs,
}

#[derive(Debug, Args)]
struct RunArgs {
    #[command(flatten)]
    up: UpArgs,
    #[command(flatten)]
    migrate: MigrateArgs,
    /// Migrations to do (A -> B, B -> A, ...).
    #[arg(long, default_value_t = 2)]
    moves: u32,
    /// Pause between migrations, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pause_ms: u64,
    /// Pause between echoes of the demo client, in milliseconds.
    #[arg(long, default_value_t = 5)]
    client_interval_ms: u64,
    /// Make the restore of this migration (1-based) fail, expecting a rollback (the server is
    /// restored in the source again, the client swaps back and keeps its connection).
    #[arg(long)]
    fail_restore_at: Option<u32>,
    /// Make the dump of this migration (1-based) fail, expecting a rollback (the server goes on
    /// in the source, the client swaps back and keeps its connection).
    #[arg(long)]
    fail_dump_at: Option<u32>,
    /// Keep everything (containers, state, logs) at the end, for debugging.
    #[arg(long)]
    preserve: bool,
    /// Write the combined report (migrations and the client's view) here (default:
    /// <state-dir>/run-report.json).
    #[arg(long)]
    run_report: Option<PathBuf>,
    /// How the migrations are driven: `run` (all from this process) or `by-hand` (`control
    /// up` and each `control migrate` as separate processes, as at a terminal).
    #[arg(long, value_enum, default_value = "run")]
    route: Route,
    /// Fault injection for the recovery tests (by-hand route only): a comma-separated list,
    /// one entry per migration from the first: `-` (none), `announce`, `dump`, `dumped` or
    /// `restore` (that `control migrate` is killed with SIGKILL there, then `control recover`
    /// runs), or `sigterm-announce` (it gets SIGTERM after the announce and rolls back).
    #[arg(long, hide = true, value_delimiter = ',')]
    kill_at: Vec<String>,
    /// The run fails when the client pauses longer than this for any migration.
    #[arg(long, default_value_t = 1500, value_parser = clap::value_parser!(u64).range(1..))]
    max_pause_ms: u64,
}

fn main() {
    let cli = Cli::parse();
    let filter = match tracing_subscriber::EnvFilter::try_new(&cli.common.log) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("control: invalid --log filter `{}`: {e}", cli.common.log);
            std::process::exit(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // Whatever control and its children (criu, the supervisor) create is private: image
    // files hold the server's memory, state files its keys' paths and reports.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    if let Err(e) = dispatch(&cli) {
        eprintln!("control: {e:#}");
        std::process::exit(1);
    }
}

fn dispatch(cli: &Cli) -> Result<()> {
    let settings = Settings {
        state_dir: cli.common.state_dir.clone(),
        images_dir: cli.common.images_dir.clone(),
        name: cli.common.name.clone(),
    };
    let state_dir = &settings.state_dir;
    match &cli.cmd {
        Cmd::Up(a) => {
            let mut opts = up_options(&a.up)?;
            opts.server_command.clone_from(&a.server);
            // Refusals first: nothing is created when one applies.
            deploy::check_up(&settings, &opts)?;
            deploy::prepare_state_dir(state_dir)?;
            let _lock = lock::acquire(state_dir, "control up")?;
            deploy::up(&settings, &opts).map(|_| ())
        }
        Cmd::Migrate(a) if a.cross.to.is_some() => {
            agent::cli::migrate(&a.cross, a.phases, a.memory)
        }
        Cmd::Migrate(a) => {
            interrupt::install()?;
            let _lock = locked_existing(state_dir, "control migrate")?;
            recover_if_needed(&settings)?;
            let report =
                run::migrate_and_report(&settings, &engine_options(a), a.report.as_deref())?;
            if report.result != admin_api::MoveResult::Completed {
                bail!(
                    "migration {}: {}",
                    report.result,
                    report.failure.as_deref().unwrap_or("see the report")
                );
            }
            Ok(())
        }
        Cmd::Recover(a) => {
            interrupt::install()?;
            let _lock = locked_existing(state_dir, "control recover")?;
            match run::recover_and_report(&settings, a.report.as_deref(), false)? {
                Some(r) if r.result == admin_api::MoveResult::Failed => bail!(
                    "recovery failed: {}",
                    r.failure.as_deref().unwrap_or("see the report")
                ),
                Some(_) => Ok(()),
                None => {
                    println!("nothing to recover: no migration was interrupted");
                    Ok(())
                }
            }
        }
        Cmd::Down => {
            let _lock =
                if deploy::is_ours(state_dir) && secure::check_private_dir(state_dir).is_ok() {
                    Some(lock::acquire(state_dir, "control down")?)
                } else {
                    None
                };
            deploy::down(&settings)
        }
        Cmd::Status(a) if a.fleet => agent::cli::status(a),
        Cmd::Status(_) => {
            let _lock = locked_existing(state_dir, "control status")?;
            recover_if_needed(&settings)?;
            deploy::status(&settings)
        }
        Cmd::Logs => {
            print!("{}", deploy::diagnostics(&settings));
            Ok(())
        }
        Cmd::Run(a) => {
            interrupt::install()?;
            // By hand, each `control` the run starts takes the lock itself.
            let _lock = if a.route == Route::Run {
                deploy::check_up(&settings, &up_options(&a.up)?)?;
                deploy::prepare_state_dir(state_dir)?;
                Some(lock::acquire(state_dir, "control run")?)
            } else {
                None
            };
            run::run(
                &settings,
                &RunOptions {
                    up: up_options(&a.up)?,
                    engine: engine_options(&a.migrate),
                    moves: a.moves,
                    pause: Duration::from_millis(a.pause_ms),
                    client_interval_ms: a.client_interval_ms,
                    fail_restore_at: a.fail_restore_at,
                    fail_dump_at: a.fail_dump_at,
                    kill_at: a.kill_at.clone(),
                    preserve: a.preserve,
                    run_report: a.run_report.clone(),
                    route: a.route,
                    bounds: report::Bounds {
                        max_pause_ms: a.max_pause_ms as f64,
                    },
                    log: cli.common.log.clone(),
                },
            )
        }
        Cmd::RestartElsewhere(a) => {
            let _lock = locked_existing(state_dir, "control restart-elsewhere")?;
            recover_if_needed(&settings)?;
            restart::restart_elsewhere(&settings, a.report.as_deref()).map(|_| ())
        }
        Cmd::PodImage(a) => deploy::pod_image(&a.tag, &a.certs, &bin_dir(a.bin_dir.as_ref())?),
        Cmd::Agent(a) => agent::cli::agent(a),
        Cmd::FleetInit(a) => agent::cli::fleet_init(a),
        Cmd::Service(a) => agent::cli::service(a),
        Cmd::Drain(a) => agent::cli::drain(a),
        Cmd::Supervise(a) => supervisor::serve(
            &a.socket,
            &supervisor::ServerCommand {
                netns: a.netns.clone(),
                argv: a.server.clone(),
                log: a.server_log.clone(),
                pid_namespace: a.pid_namespace,
                idle: a.idle,
            },
        ),
    }
}

/// The lock of an existing deployment's state folder (a clear error when nothing is up).
fn locked_existing(state_dir: &std::path::Path, what: &str) -> Result<lock::Lock> {
    if !deploy::is_ours(state_dir) {
        bail!(
            "nothing is up: {} is not a state folder of control (run `control up` first)",
            state_dir.display()
        );
    }
    secure::check_private_dir(state_dir)?;
    lock::acquire(state_dir, what)
}

/// Recovers an interrupted migration first, when the journal names one (saying so on stderr).
fn recover_if_needed(settings: &Settings) -> Result<()> {
    if let Some(r) = run::recover_and_report(settings, None, true)?
        && r.result == admin_api::MoveResult::Failed
    {
        bail!(
            "an interrupted migration could not be recovered: {}",
            r.failure.as_deref().unwrap_or("see the report")
        );
    }
    Ok(())
}

/// `--bin-dir`, or the directory of this control binary.
fn bin_dir(given: Option<&PathBuf>) -> Result<PathBuf> {
    match given {
        Some(d) => Ok(d.clone()),
        None => std::env::current_exe()
            .context("locating this executable")?
            .parent()
            .map(std::path::Path::to_path_buf)
            .context("this executable has no directory"),
    }
}

fn up_options(a: &UpArgs) -> Result<UpOptions> {
    if a.dirty_mib_per_s > 0 && a.ballast_mib == 0 {
        bail!("--dirty-mib-per-s needs --ballast-mib (there is nothing to rewrite)");
    }
    let bin_dir = bin_dir(a.bin_dir.as_ref())?;
    Ok(UpOptions {
        src_port: a.src_port,
        dst_port: a.dst_port,
        bin_dir,
        server_user: a.server_user.clone(),
        ballast_mib: a.ballast_mib,
        dirty_mib_per_s: a.dirty_mib_per_s,
        server_runtime: a.server_runtime.clone(),
        pid_namespace: a.pid_namespace,
        front: a.front,
        server_command: Vec::new(),
    })
}

fn engine_options(a: &MigrateArgs) -> engine::Options {
    engine::Options {
        policy: MigrationPolicy {
            ack_deadline: Duration::from_millis(a.ack_deadline_ms),
            // Whether the server asks its clients to quiesce (two phases); either way it
            // parks its socket after the acks (swrapper --park-after-announce).
            quiesce: a.phases == Phases::Two,
            predump: PreDumpPolicy {
                max_rounds: a.predump_rounds,
                ..PreDumpPolicy::default()
            },
            ..MigrationPolicy::default()
        },
        phases: a.phases,
        quiesce_deadline: Duration::from_millis(a.quiesce_deadline_ms),
        transfer: a.transfer,
        memory: a.memory,
        keep_images: a.keep_images,
        front_hold: !a.front_no_hold,
        fault: if a.fail_dump {
            Some(Fault::Dump)
        } else if a.fail_restore {
            Some(Fault::Restore)
        } else if a.fault_restore_in_source {
            Some(Fault::RestoreInSource)
        } else {
            None
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory as _;
        Cli::command().debug_assert();
    }

    #[test]
    fn migrate_flags_become_the_engine_options() {
        let cli = Cli::try_parse_from([
            "control",
            "migrate",
            "--ack-deadline-ms",
            "300",
            "--predump-rounds",
            "0",
            "--transfer",
            "sealed",
            "--fail-restore",
            "--memory",
            "post-copy",
        ])
        .unwrap();
        let Cmd::Migrate(a) = &cli.cmd else {
            panic!("not migrate: {cli:?}")
        };
        let o = engine_options(a);
        assert_eq!(o.policy.ack_deadline, Duration::from_millis(300));
        assert_eq!(o.policy.predump.max_rounds, 0);
        assert_eq!(o.transfer, Transfer::Sealed);
        assert_eq!(o.fault, Some(Fault::Restore));
        assert_eq!(o.phases, Phases::One, "the seed's single phase by default");
        assert_eq!(o.memory, Memory::PostCopy);
        assert!(o.policy.validate().is_ok());
        let two = Cli::try_parse_from(["control", "run", "--phases", "two"]).unwrap();
        let Cmd::Run(r) = &two.cmd else {
            panic!("not run: {two:?}")
        };
        assert_eq!(engine_options(&r.migrate).phases, Phases::Two);
        assert!(engine_options(&r.migrate).policy.quiesce);
        // Refused: a zero ack deadline, both faults, an unknown transfer or route.
        for bad in [
            &["control", "migrate", "--ack-deadline-ms", "0"][..],
            &["control", "migrate", "--fail-dump", "--fail-restore"],
            &["control", "migrate", "--transfer", "carrier-pigeon"],
            &["control", "migrate", "--phases", "three"],
            &["control", "run", "--phases", ""],
            &["control", "run", "--route", "teleport"],
            &["control", "migrate", "--memory", "warm"],
            &["control", "run", "--memory", ""],
            &["control", "run", "--max-pause-ms", "0"],
            &[
                "control",
                "supervise",
                "--socket",
                "s",
                "--netns",
                "n",
                "--server-log",
                "l",
            ],
        ] {
            assert!(Cli::try_parse_from(bad).is_err(), "{bad:?}");
        }
    }
}
