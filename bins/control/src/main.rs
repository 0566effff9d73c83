//! control: moves the demo QUIC server between two podman containers with CRIU.

mod criu;
mod migrate;
mod podman;
mod state;
mod sys;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use serde_json::{Value, json};
use tracing::{info, warn};

use crate::state::{Container, Side, State};

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
    Up(UpArgs),
    /// Move the server to the other container: announce, dump, restore, renew its socket.
    Migrate(MigrateArgs),
    /// Remove containers, image, image sets and state, even after a failed step.
    Down,
    /// Show the deployment: where the server runs, its PID, the containers.
    Status,
    /// Print what explains a failure: the server's and the client's logs, CRIU's errors, the
    /// containers' logs.
    Logs,
    /// up, start the demo client, migrate A -> B and B -> A, stop the client, report, down.
    Run(RunArgs),
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
}

#[derive(Debug, Args, Clone)]
struct MigrateArgs {
    /// How long the server waits for every client's ack before it is checkpointed anyway.
    #[arg(long, env = "QLM_ACK_DEADLINE_MS", default_value_t = 2000)]
    ack_deadline_ms: u64,
    /// Rounds of `criu pre-dump --track-mem` at most, when the kernel tracks dirty memory.
    #[arg(long, env = "QLM_PREDUMP_ROUNDS", default_value_t = 3)]
    predump_rounds: u32,
    /// How the image set reaches the target: `local` (same host: restore from where it was
    /// dumped) or `sealed` (streamed through migration-wire: chunked, zstd, AES-256-GCM, and
    /// reassembled into a new directory, as between two hosts).
    #[arg(long, env = "QLM_TRANSFER", default_value = "local")]
    transfer: migrate::Transfer,
    /// Write the migration's JSON report here (default: <state-dir>/reports/<id>.json).
    #[arg(long)]
    report: Option<PathBuf>,
    /// Keep the image set after a successful migration.
    #[arg(long)]
    keep_images: bool,
    /// Fault injection for testing the rollback: make the restore in the target fail (its
    /// pstree image is hidden from it), so the server must be restored in the source again.
    #[arg(long)]
    fail_restore: bool,
    /// Fault injection for testing the rollback: make the final dump fail (its image directory
    /// is not a directory), so the server must go on serving in the source.
    #[arg(long, conflicts_with = "fail_restore")]
    fail_dump: bool,
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
    // Orphans of this process's children (the server, once criu restore --restore-detached
    // exits) are adopted by it rather than by init, so that `control run` reaps a dumped server
    // at once and its PID is free for the restore.
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        warn!("cannot become a child subreaper: {e}");
    }
    let result = match &cli.cmd {
        Cmd::Up(a) => up(&cli.common, a).map(|_| ()),
        Cmd::Migrate(a) => migrate_cmd(&cli.common, a).map(|_| ()),
        Cmd::Down => down(&cli.common),
        Cmd::Status => status(&cli.common),
        Cmd::Logs => {
            print!("{}", diagnostics(&cli.common));
            Ok(())
        }
        Cmd::Run(a) => run_all(&cli.common, a),
    };
    if let Err(e) = result {
        eprintln!("control: {e:#}");
        std::process::exit(1);
    }
}

fn container_name(common: &Common, side: Side) -> String {
    format!("{}-{}", common.name, side.to_string().to_lowercase())
}

fn image_tag(common: &Common) -> String {
    format!("localhost/{}-server:latest", common.name)
}

fn bin_dir(args: &UpArgs) -> Result<PathBuf> {
    match &args.bin_dir {
        Some(d) => Ok(d.clone()),
        None => std::env::current_exe()
            .context("locating this executable")?
            .parent()
            .map(Path::to_path_buf)
            .context("this executable has no directory"),
    }
}

fn preflight() -> Result<()> {
    sys::require_root()?;
    let hint = "run `cargo xtask setup` (as root) to install it";
    for p in ["podman", "criu", "nsenter", "runc"] {
        sys::require_program(p, hint)?;
    }
    Ok(())
}

/// Marks an images directory as control's own.
const IMAGES_MARKER: &str = ".quic-live-migrate-images";

/// Prefix of image sets kept for inspection.
pub(crate) const KEPT_PREFIX: &str = "kept-";

/// Refuses an images directory that holds anything but control's marker: files of someone
/// else (foreign), or image sets left by an earlier run (stale).
fn check_images_dir(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let entries: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let ours = entries.iter().any(|e| e == IMAGES_MARKER);
    // Image sets kept on purpose (a failed or rolled-back migration, --keep-images) are
    // renamed `kept-<id>`; anything else is a leftover of a migration that never finished.
    let others: Vec<&String> = entries
        .iter()
        .filter(|e| *e != IMAGES_MARKER && !(ours && e.starts_with(KEPT_PREFIX)))
        .collect();
    if others.is_empty() {
        return Ok(());
    }
    let listing = others
        .iter()
        .take(5)
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    if ours {
        bail!(
            "images directory {} holds stale image sets from an earlier run ({listing}); \
             `control down` removes them",
            dir.display()
        )
    }
    bail!(
        "images directory {} holds files control did not make ({listing}); refusing to use it \
         (choose another --images-dir)",
        dir.display()
    )
}

fn wait_event(admin: &Path, name: &str, limit: Duration) -> Result<Value> {
    let path = admin.join(format!("{name}.json"));
    let start = Instant::now();
    loop {
        if let Ok(text) = std::fs::read_to_string(&path) {
            std::fs::remove_file(&path).ok();
            return serde_json::from_str(&text)
                .with_context(|| format!("server wrote a bad {}", path.display()));
        }
        if start.elapsed() > limit {
            bail!("the server wrote no {name}.json within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn up(common: &Common, args: &UpArgs) -> Result<State> {
    preflight()?;
    let started = Instant::now();
    if State::exists(&common.state_dir) {
        bail!(
            "a deployment is already up (state in {}); `control down` first",
            common.state_dir.display()
        );
    }
    if args.src_port == args.dst_port {
        bail!("SRC_PORT and DST_PORT are both {}", args.src_port);
    }
    for (what, port) in [("SRC_PORT", args.src_port), ("DST_PORT", args.dst_port)] {
        if !sys::udp_port_free(port) {
            bail!("host UDP port {port} ({what}) is already in use; nothing was started");
        }
    }
    check_images_dir(&common.images_dir)?;
    let bins = bin_dir(args)?;
    let swrapper = bins.join("swrapper");
    if !swrapper.is_file() {
        bail!(
            "no swrapper binary in {} (build it: cargo build --release -p swrapper, or pass --bin-dir)",
            bins.display()
        );
    }
    // From here on, a failure removes whatever was made.
    let result = up_inner(common, args, &swrapper);
    match result {
        Ok(state) => {
            info!(
                ms = format_args!("{:.0}", started.elapsed().as_secs_f64() * 1e3),
                pid = state.server_pid,
                "up: server running in container A"
            );
            Ok(state)
        }
        Err(e) => {
            warn!("up failed, removing what was made: {e:#}");
            if let Err(d) = down(common) {
                warn!("cleanup after the failed up also failed: {d:#}");
            }
            Err(e)
        }
    }
}

fn up_inner(common: &Common, args: &UpArgs, swrapper: &Path) -> Result<State> {
    let state_dir = &common.state_dir;
    let admin = state_dir.join("admin");
    std::fs::create_dir_all(&admin).with_context(|| format!("creating {}", admin.display()))?;
    std::fs::create_dir_all(&common.images_dir)?;
    std::fs::write(common.images_dir.join(IMAGES_MARKER), "")?;
    let (_, pem) = wrapper_support::Identity::self_signed(&["localhost".to_owned()])?;
    let cert = state_dir.join("server-cert.pem");
    let key = state_dir.join("server-key.pem");
    pem.write_cert(&cert)?;
    pem.write_key(&key)?;

    let tag = image_tag(common);
    podman::build_image(state_dir, &tag, &[swrapper.to_path_buf()])?;
    let mut containers = Vec::new();
    for (side, port) in [(Side::A, args.src_port), (Side::B, args.dst_port)] {
        let name = container_name(common, side);
        podman::start_container(&name, &tag, port)?;
        containers.push(Container {
            netns: podman::netns(&name)?,
            name,
            host_port: port,
        });
    }
    let [a, b]: [Container; 2] = containers
        .try_into()
        .map_err(|_| anyhow::anyhow!("expected two containers"))?;

    let server_log = state_dir.join("server.log");
    let pid = start_server(swrapper, &a.netns, &cert, &key, &admin, &server_log)?;
    let state = State {
        version: State::new_version(),
        image: tag,
        a,
        b,
        server_pid: pid,
        side: Side::A,
        cert,
        admin_dir: admin,
        server_log,
        images_dir: common.images_dir.clone(),
        migrations: 0,
    };
    state.save(state_dir)?;
    Ok(state)
}

/// Starts swrapper in `netns` (host pid and mount namespaces), as its own session leader so
/// that CRIU can dump it alone, and waits until it serves.
fn start_server(
    swrapper: &Path,
    netns: &Path,
    cert: &Path,
    key: &Path,
    admin: &Path,
    log: &Path,
) -> Result<i32> {
    use std::os::unix::process::CommandExt as _;
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", netns.display()))
        .arg("--")
        .arg(swrapper)
        .args(["--listen", &format!("0.0.0.0:{}", podman::CONTAINER_PORT)])
        .arg("--cert")
        .arg(cert)
        .arg("--key")
        .arg(key)
        .arg("--admin-dir")
        .arg(admin)
        .args(["--park-after-announce", "--log", "info"])
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    // SAFETY: setsid is async-signal-safe and touches no memory of this process.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid()
                .map(|_| ())
                .map_err(std::io::Error::from)
        });
    }
    let child = cmd.spawn().context("starting swrapper")?;
    // nsenter execs swrapper: the child's PID is the server's. Reap it if it dies early; a
    // thread waits so that it never stays a zombie while control runs.
    let pid = i32::try_from(child.id()).context("PID out of range")?;
    std::thread::spawn(move || {
        let mut child = child;
        let _ = child.wait();
    });
    let ready = wait_event(admin, "ready", Duration::from_secs(10)).with_context(|| {
        format!(
            "the server did not start; its log ({}):\n{}",
            log.display(),
            sys::tail(&std::fs::read_to_string(log).unwrap_or_default(), 10)
        )
    })?;
    if ready["pid"].as_i64() != Some(i64::from(pid)) {
        bail!("ready.json names PID {}, expected {pid}", ready["pid"]);
    }
    Ok(pid)
}

/// One migration with its report written and summarised; `Ok` whatever its result.
fn migrate_once(common: &Common, args: &MigrateArgs) -> Result<Value> {
    preflight()?;
    let mut state = State::load(&common.state_dir)?;
    let report = migrate::migrate(&common.state_dir, &mut state, args)?;
    let path = match &args.report {
        Some(p) => p.clone(),
        None => {
            let dir = common.state_dir.join("reports");
            std::fs::create_dir_all(&dir)?;
            dir.join(format!(
                "{}.json",
                report["migration_id"].as_str().unwrap_or("migration")
            ))
        }
    };
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", path.display()))?;
    migrate::print_summary(&report);
    println!("report: {}", path.display());
    Ok(report)
}

fn migrate_cmd(common: &Common, args: &MigrateArgs) -> Result<Value> {
    let report = migrate_once(common, args)?;
    if report["result"] != "completed" {
        bail!(
            "migration {}: {}",
            report["result"].as_str().unwrap_or("?"),
            report["failure"].as_str().unwrap_or("see the report")
        );
    }
    Ok(report)
}

fn down(common: &Common) -> Result<()> {
    sys::require_root()?;
    let mut problems = Vec::new();
    let state = State::load(&common.state_dir).ok();
    if let Some(s) = &state
        && sys::process_runs(s.server_pid, "swrapper")
    {
        info!(pid = s.server_pid, "stopping the server");
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(s.server_pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let client_pid = common.state_dir.join("client.pid");
    if let Ok(text) = std::fs::read_to_string(&client_pid)
        && let Ok(pid) = text.trim().parse::<i32>()
        && sys::process_runs(pid, "cwrapper")
    {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    for side in [Side::A, Side::B] {
        let name = state
            .as_ref()
            .map(|s| s.container(side).name.clone())
            .unwrap_or_else(|| container_name(common, side));
        if let Err(e) = podman::remove_container(&name) {
            problems.push(format!("{e:#}"));
        }
    }
    let tag = state
        .as_ref()
        .map(|s| s.image.clone())
        .unwrap_or_else(|| image_tag(common));
    if let Err(e) = podman::remove_image(&tag) {
        problems.push(format!("{e:#}"));
    }
    let images = state
        .as_ref()
        .map(|s| s.images_dir.clone())
        .unwrap_or_else(|| common.images_dir.clone());
    // Only a directory control marked as its own is removed.
    if images.join(IMAGES_MARKER).exists()
        && let Err(e) = std::fs::remove_dir_all(&images)
    {
        problems.push(format!("removing {}: {e}", images.display()));
    }
    if common.state_dir.exists()
        && let Err(e) = std::fs::remove_dir_all(&common.state_dir)
    {
        problems.push(format!("removing {}: {e}", common.state_dir.display()));
    }
    if problems.is_empty() {
        info!("down: containers, image, image sets and state removed");
        Ok(())
    } else {
        bail!("down left things behind:\n{}", problems.join("\n"))
    }
}

fn status(common: &Common) -> Result<()> {
    let state = State::load(&common.state_dir)?;
    let v = json!({
        "server": {
            "pid": state.server_pid,
            "running": sys::process_runs(state.server_pid, "swrapper"),
            "side": state.side.to_string(),
            "container": state.container(state.side).name,
        },
        "containers": [
            { "name": state.a.name, "host_port": state.a.host_port, "running": podman::is_running(&state.a.name) },
            { "name": state.b.name, "host_port": state.b.host_port, "running": podman::is_running(&state.b.name) },
        ],
        "migrations": state.migrations,
        "cert": state.cert,
        "server_log": state.server_log,
        "state_dir": common.state_dir,
    });
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}

fn start_client(
    state_dir: &Path,
    cwrapper: &Path,
    target: SocketAddr,
    cert: &Path,
    interval_ms: u64,
) -> Result<Child> {
    let out = std::fs::File::create(state_dir.join("client.out"))?;
    let err = std::fs::File::create(state_dir.join("client.err"))?;
    let child = Command::new(cwrapper)
        .args(["--target", &target.to_string(), "--stay-connected"])
        .arg("--ca")
        .arg(cert)
        .arg("--json")
        .arg(state_dir.join("client.json"))
        .args(["--interval-ms", &interval_ms.to_string(), "--log", "info"])
        .args(["--client-id", "demo-car"])
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("starting {}", cwrapper.display()))?;
    std::fs::write(state_dir.join("client.pid"), child.id().to_string())?;
    Ok(child)
}

fn stop_client(mut child: Child) -> Result<std::process::ExitStatus> {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).context("PID out of range")?);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if start.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            bail!("the client did not stop within 10 s after SIGINT (killed)");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Everything that explains a failure, as text.
fn diagnostics(common: &Common) -> String {
    let mut out = String::new();
    let mut section = |title: &str, body: String| {
        out.push_str(&format!("==== {title}\n{}\n", body.trim_end()));
    };
    let read_tail = |p: &Path, n: usize| {
        std::fs::read_to_string(p)
            .map(|t| sys::tail(&t, n))
            .unwrap_or_else(|e| format!("(cannot read {}: {e})", p.display()))
    };
    let sd = &common.state_dir;
    section("server log (tail)", read_tail(&sd.join("server.log"), 40));
    section(
        "client stderr (tail)",
        read_tail(&sd.join("client.err"), 30),
    );
    section(
        "client stdout (tail)",
        read_tail(&sd.join("client.out"), 20),
    );
    let mut criu_logs = Vec::new();
    let mut stack = vec![common.images_dir.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "log") {
                criu_logs.push(p);
            }
        }
    }
    criu_logs.sort();
    for log in criu_logs {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let errors: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("Error") || l.contains("error") || l.contains("Warn"))
            .collect();
        section(
            &format!("criu {} (errors and warnings)", log.display()),
            sys::tail(&errors.join("\n"), 25),
        );
    }
    for side in [Side::A, Side::B] {
        let name = container_name(common, side);
        section(
            &format!("container {name} log"),
            sys::tail(&podman::logs(&name), 20),
        );
    }
    out
}

fn run_all(common: &Common, args: &RunArgs) -> Result<()> {
    let result = run_inner(common, args);
    if result.is_err() {
        eprint!("{}", diagnostics(common));
    }
    if args.preserve {
        info!(
            "--preserve: keeping containers, state and logs in {}",
            common.state_dir.display()
        );
    } else if let Err(e) = down(common) {
        warn!("down after run: {e:#}");
    }
    result
}

fn run_inner(common: &Common, args: &RunArgs) -> Result<()> {
    let state = up(common, &args.up)?;
    let cwrapper = bin_dir(&args.up)?.join("cwrapper");
    let target = SocketAddr::from(([127, 0, 0, 1], state.a.host_port));
    let client = start_client(
        &common.state_dir,
        &cwrapper,
        target,
        &state.cert,
        args.client_interval_ms,
    )?;
    // Let the client connect and settle.
    std::thread::sleep(Duration::from_millis(1000));
    let mut migrations = Vec::new();
    let mut failure = None;
    for n in 1..=args.moves {
        if n > 1 {
            std::thread::sleep(Duration::from_millis(args.pause_ms));
        }
        let margs = MigrateArgs {
            fail_restore: args.migrate.fail_restore || args.fail_restore_at == Some(n),
            fail_dump: args.migrate.fail_dump || args.fail_dump_at == Some(n),
            report: None,
            ..args.migrate.clone()
        };
        let expected = if margs.fail_restore || margs.fail_dump {
            "rolled_back"
        } else {
            "completed"
        };
        match migrate_once(common, &margs) {
            Ok(r) => {
                let got = r["result"].as_str().unwrap_or("?").to_owned();
                migrations.push(r);
                if got != expected {
                    failure = Some(format!("migration {n}: {got}, expected {expected}"));
                    break;
                }
            }
            Err(e) => {
                failure = Some(format!("migration {n}: {e:#}"));
                break;
            }
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let client_status = stop_client(client)?;
    let client_report: Value = std::fs::read_to_string(common.state_dir.join("client.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null);
    let summary = summarize(&migrations, &client_report, client_status.code());
    let mut problems: Vec<String> = summary["problems"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p.as_str().map(str::to_owned))
        .collect();
    if let Some(f) = &failure {
        problems.insert(0, f.clone());
    }
    let combined = json!({
        "summary": summary,
        "migrations": migrations,
        "client": client_report,
        "client_exit": client_status.code(),
        "problems": problems,
    });
    let path = args
        .run_report
        .clone()
        .unwrap_or_else(|| common.state_dir.join("run-report.json"));
    std::fs::write(&path, serde_json::to_string_pretty(&combined)?)
        .with_context(|| format!("writing {}", path.display()))?;
    print_run_summary(&combined);
    println!("run report: {}", path.display());
    if !problems.is_empty() {
        bail!("{}", problems.join("; "));
    }
    Ok(())
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

/// Joins each migration with what the client saw of it, and checks the run.
fn summarize(migrations: &[Value], client: &Value, client_exit: Option<i32>) -> Value {
    let mut problems = Vec::new();
    let records = client["migrations"].as_array().cloned().unwrap_or_default();
    let mut rows = Vec::new();
    for m in migrations {
        let id = m["migration_id"].as_str().unwrap_or_default();
        let result = m["result"].as_str().unwrap_or("?");
        // The client's record of the Migrate measures the pause; when the move was rolled back,
        // the pause may end in the record of the abort instead: the longest of them counts.
        let downtime = records
            .iter()
            .filter(|r| r["id"] == id)
            .filter_map(|r| r["downtime_ms"].as_f64())
            .reduce(f64::max);
        let handshakes = m["resumed"]["handshakes"]
            .as_u64()
            .or_else(|| m["aborted"]["handshakes"].as_u64());
        if downtime.is_none() {
            problems.push(format!("migration {id}: the client reported no downtime"));
        }
        if handshakes != Some(1) {
            problems.push(format!(
                "migration {id}: the server counted {handshakes:?} handshakes, expected 1"
            ));
        }
        rows.push(json!({
            "id": id,
            "from": m["from"],
            "to": m["to"],
            "result": result,
            "freeze_ms": m["timeline"]["freeze_time_us"].as_u64().map(|u| u as f64 / 1e3),
            "dump_ms": m["dump"]["wall_ms"],
            "dump_criu_startup_ms": m["dump"]["startup_ms"],
            "restore_ms": m["restore"]["wall_ms"],
            "restore_criu_startup_ms": m["restore"]["startup_ms"],
            "image_bytes": m["image_bytes"],
            "client_downtime_ms": downtime,
            "server_handshakes": handshakes,
        }));
    }
    if client.is_null() {
        problems.push("the client wrote no report".to_owned());
    } else {
        if client["verified"] != true {
            problems.push(format!(
                "the client's checks failed: {}",
                client["error"].as_str().unwrap_or("not verified")
            ));
        }
        if client["control"] != "open" {
            problems.push(format!(
                "the client's control stream: {}",
                client["control"]
            ));
        }
    }
    if client_exit != Some(0) {
        problems.push(format!("the client exited with {client_exit:?}"));
    }
    let completed: Vec<&Value> = rows.iter().filter(|r| r["result"] == "completed").collect();
    let pick =
        |key: &str| -> Vec<f64> { completed.iter().filter_map(|r| r[key].as_f64()).collect() };
    json!({
        "rows": rows,
        "completed": completed.len(),
        "client_downtime_median_ms": median(pick("client_downtime_ms")),
        "freeze_median_ms": median(pick("freeze_ms")),
        "dump_median_ms": median(pick("dump_ms")),
        "restore_median_ms": median(pick("restore_ms")),
        "dump_criu_startup_median_ms": median(pick("dump_criu_startup_ms")),
        "restore_criu_startup_median_ms": median(pick("restore_criu_startup_ms")),
        "echoes": client["echoes"],
        "client_verified": client["verified"],
        "problems": problems,
    })
}

fn print_run_summary(combined: &Value) {
    let s = &combined["summary"];
    let f = |v: &Value| v.as_f64().map_or("-".to_owned(), |x| format!("{x:.1}"));
    println!(
        "\n{:<34} {:<7} {:<7} {:>11} {:>9} {:>10} {:>11} {:>10}",
        "migration", "from", "to", "result", "freeze", "dump", "restore", "downtime"
    );
    for r in s["rows"].as_array().into_iter().flatten() {
        println!(
            "{:<34} {:<7} {:<7} {:>11} {:>6} ms {:>7} ms {:>8} ms {:>7} ms",
            r["id"].as_str().unwrap_or("?"),
            r["from"].as_str().unwrap_or("?"),
            r["to"].as_str().unwrap_or("?"),
            r["result"].as_str().unwrap_or("?"),
            f(&r["freeze_ms"]),
            f(&r["dump_ms"]),
            f(&r["restore_ms"]),
            f(&r["client_downtime_ms"]),
        );
    }
    println!(
        "client: {} echoes, verified: {}; medians over completed moves: downtime {} ms, freeze {} ms",
        s["echoes"],
        s["client_verified"],
        f(&s["client_downtime_median_ms"]),
        f(&s["freeze_median_ms"]),
    );
    for p in combined["problems"].as_array().into_iter().flatten() {
        println!("PROBLEM: {}", p.as_str().unwrap_or("?"));
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
    fn images_directories_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join("images");
        // Missing or empty: fine.
        check_images_dir(&images).unwrap();
        std::fs::create_dir(&images).unwrap();
        check_images_dir(&images).unwrap();
        // Someone else's files: refused.
        std::fs::write(images.join("core-1.img"), b"x").unwrap();
        let err = format!("{:#}", check_images_dir(&images).unwrap_err());
        assert!(err.contains("did not make"), "{err}");
        // Ours, with a leftover image set: stale, refused.
        std::fs::remove_file(images.join("core-1.img")).unwrap();
        std::fs::write(images.join(IMAGES_MARKER), b"").unwrap();
        std::fs::create_dir(images.join("0123abcd")).unwrap();
        let err = format!("{:#}", check_images_dir(&images).unwrap_err());
        assert!(err.contains("stale"), "{err}");
        // Kept on purpose: accepted.
        std::fs::rename(images.join("0123abcd"), images.join("kept-0123abcd")).unwrap();
        check_images_dir(&images).unwrap();
    }

    #[test]
    fn the_run_summary_flags_what_went_wrong() {
        let migration = |id: &str, result: &str, handshakes: u64| {
            json!({ "migration_id": id, "result": result, "from": "a", "to": "b",
                    "resumed": { "handshakes": handshakes },
                    "timeline": { "freeze_time_us": 100_000 } })
        };
        let client = json!({
            "verified": true, "control": "open", "echoes": 100,
            "migrations": [ { "id": "m1", "aborted": false, "downtime_ms": 120.0 } ],
        });
        let s = summarize(&[migration("m1", "completed", 1)], &client, Some(0));
        assert_eq!(s["problems"], json!([]));
        assert_eq!(s["client_downtime_median_ms"], 120.0);
        assert_eq!(s["freeze_median_ms"], 100.0);
        let bad_client =
            json!({ "verified": false, "error": "gap", "control": "closed: x", "migrations": [] });
        let s = summarize(&[migration("m1", "completed", 2)], &bad_client, Some(1));
        let problems = s["problems"].to_string();
        for needle in ["no downtime", "2", "gap", "control stream", "exited"] {
            assert!(problems.contains(needle), "{needle}: {problems}");
        }
        // A rolled-back move whose pause ended in the abort's record.
        let rolled = json!({
            "verified": true, "control": "open", "echoes": 100,
            "migrations": [ { "id": "m2", "aborted": false, "downtime_ms": 7.5 },
                            { "id": "m2", "aborted": true, "downtime_ms": 185.0 },
                            { "id": "m3", "aborted": false, "downtime_ms": null },
                            { "id": "m3", "aborted": true, "downtime_ms": 12.0 } ],
        });
        let mut m2 = migration("m2", "rolled_back", 1);
        m2["aborted"] = json!({ "handshakes": 1 });
        let s = summarize(&[m2, migration("m3", "rolled_back", 1)], &rolled, Some(0));
        assert_eq!(s["rows"][0]["client_downtime_ms"], 185.0);
        assert_eq!(s["rows"][1]["client_downtime_ms"], 12.0);
        assert_eq!(s["problems"], json!([]));
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
    }
}
