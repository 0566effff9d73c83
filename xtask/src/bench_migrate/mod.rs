//! `cargo xtask bench-migrate`: the pause a client sees when the server moves, at several
//! resident sizes, in every way a user could move it, in one run.
//!
//! ```text
//!  for each size (MiB of ballast the server holds and touches):
//!    control up --ballast-mib S            (containers A and B, server in A)
//!    for mode in seed, two-phase, post-copy:
//!      latency client (echo every ms) ──► N x control migrate --phases .. --memory ..
//!      bulk client (one stream)       ──► B x control migrate ..
//!    reconnect: latency client with --reconnect ──► N x control restart-elsewhere
//!    control down
//!    podman: the server as a container's own process ──► N x container checkpoint + restore
//!  figures per (mode, size): median / p95 / max of pause, freeze, pause - freeze, image
//!  bytes, time until every page is resident, latency while pages arrive, time until the bulk
//!  stream is back to 90% of its goodput; handshakes
//!  ──► table + JSON + machine + SVG plot (pause against size, a line per mode) into the
//!      output folder and BENCHMARKS.md
//! ```
//!
//! Each move's window comes from control's report (wall-clock timestamps); each client
//! records wall-clock timestamps too, so the two line up.

mod plot;
pub(crate) mod stats;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use admin_api::{MoveReport, MoveResult, RestartReport};
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use stats::{Answered, Bucket, Spread};

const BEGIN: &str = "<!-- xtask bench-migrate: generated section begins -->";
const END: &str = "<!-- xtask bench-migrate: generated section ends -->";

/// The deployment's name prefix, ports and folders: apart from e2e-migrate's.
const NAME: &str = "qlm-bench";
const SRC_PORT: u16 = 5262;
const DST_PORT: u16 = 5263;
const POD_PORT: u16 = 5264;
const POD_CONTAINER: &str = "qlm-bench-pod";
/// Where the image sets go (a tmpfs).
const IMAGES: &str = "/dev/shm/quic-live-migrate-bench";
/// One `control` command (a move, up, down) that has not ended after this is hung.
const STEP_LIMIT: Duration = Duration::from_secs(5 * 60);

/// A way to move the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Mode {
    /// The server restarted in B; the client opens a new connection (new handshake).
    Reconnect,
    /// podman's own `container checkpoint` / `container restore` of the server's container.
    /// The client reconnects when its connection does not survive (it does not here: after
    /// the restore the port map's NAT state is gone and replies come from another address).
    Podman,
    /// The seed's flow: single phase (Migrate, ack, dump), cold (every page in the dump).
    Seed,
    /// Two phases (clients quiesce before the dump, resume at once), cold.
    TwoPhase,
    /// Two phases, post-copy (lazy pages through a page server after the restore).
    PostCopy,
}

impl Mode {
    const ALL: [Mode; 5] = [
        Mode::Reconnect,
        Mode::Podman,
        Mode::Seed,
        Mode::TwoPhase,
        Mode::PostCopy,
    ];

    pub(crate) fn label(self) -> &'static str {
        match self {
            Mode::Reconnect => "reconnect",
            Mode::Podman => "podman checkpoint",
            Mode::Seed => "seed (1 phase, cold)",
            Mode::TwoPhase => "two-phase, cold",
            Mode::PostCopy => "two-phase, post-copy",
        }
    }

    /// `control migrate` arguments of the modes the engine runs.
    fn migrate_args(self) -> Option<&'static [&'static str]> {
        match self {
            // Cold is control's default memory mode.
            Mode::Seed => Some(&["--phases", "one"]),
            Mode::TwoPhase => Some(&["--phases", "two"]),
            Mode::PostCopy => Some(&["--phases", "two", "--memory", "post-copy"]),
            Mode::Reconnect | Mode::Podman => None,
        }
    }
}

/// The options of `cargo xtask bench-migrate`.
#[derive(Debug, clap::Args)]
pub(crate) struct Options {
    /// Resident sizes (MiB of ballast the server holds; 0: the plain demo server).
    #[arg(long, value_delimiter = ',', default_value = "0,16,256,1024")]
    sizes: Vec<u32>,
    /// Moves per mode and size with the latency client (at least 2).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(2..))]
    moves: u32,
    /// Moves per mode at sizes of 1024 MiB and more (each costs seconds there).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(2..))]
    moves_large: u32,
    /// Moves per mode and size with the bulk client (goodput recovery); 0 skips it.
    #[arg(long, default_value_t = 4)]
    bulk_moves: u32,
    /// Which modes to run.
    #[arg(
        long,
        value_delimiter = ',',
        value_enum,
        default_value = "reconnect,podman,seed,two-phase,post-copy"
    )]
    modes: Vec<Mode>,
    /// MiB per second of its ballast the server rewrites while it runs.
    #[arg(long, default_value_t = 20)]
    dirty_mib_per_s: u32,
    /// For CI: sizes 0 and 64, 3 moves per mode, 2 bulk moves.
    #[arg(long)]
    quick: bool,
    /// Where the table, the JSON, the machine description and the plot go (default:
    /// <target>/bench-migrate).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Put the table and the plot into BENCHMARKS.md.
    #[arg(long)]
    write_benchmarks: bool,
}

impl Options {
    fn effective(&self) -> (Vec<u32>, u32, u32, u32) {
        if self.quick {
            (vec![0, 64], 3, 3, 2.min(self.bulk_moves))
        } else {
            (
                self.sizes.clone(),
                self.moves,
                self.moves_large,
                self.bulk_moves,
            )
        }
    }
}

/// The figures of one move.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct MoveFigures {
    pub(crate) pause_ms: Option<f64>,
    pub(crate) freeze_ms: Option<f64>,
    pub(crate) image_bytes: Option<u64>,
    pub(crate) resident_ms: Option<f64>,
    /// Round trips of the requests sent while pages still arrived.
    pub(crate) latency_while_paging_ms: Vec<f64>,
    pub(crate) goodput_back_ms: Option<f64>,
}

/// What one (mode, size) produced.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Cell {
    pub(crate) mode: Mode,
    pub(crate) size_mib: u32,
    pub(crate) moves: Vec<MoveFigures>,
    pub(crate) bulk_moves: Vec<MoveFigures>,
    /// Handshakes the latency client completed in all (1: the connection survived).
    pub(crate) client_handshakes: Option<u64>,
    /// Handshakes the server counted from the end of the first move to the end of the last
    /// (0 when every connection was kept).
    pub(crate) server_handshakes: Option<u64>,
    pub(crate) problems: Vec<String>,
}

/// The medians and spreads of a cell.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Summary {
    pub(crate) mode: Mode,
    pub(crate) size_mib: u32,
    pub(crate) moves: usize,
    pub(crate) pause: Option<Spread>,
    pub(crate) freeze: Option<Spread>,
    pub(crate) overhead: Option<Spread>,
    pub(crate) image_mib: Option<Spread>,
    pub(crate) resident: Option<Spread>,
    pub(crate) latency_while_paging: Option<Spread>,
    pub(crate) goodput_back: Option<Spread>,
    pub(crate) client_handshakes: Option<u64>,
    pub(crate) server_handshakes: Option<u64>,
    pub(crate) problems: Vec<String>,
}

impl Cell {
    fn summary(&self) -> Summary {
        let of = |f: &dyn Fn(&MoveFigures) -> Option<f64>| {
            Spread::of(&self.moves.iter().filter_map(f).collect::<Vec<_>>())
        };
        Summary {
            mode: self.mode,
            size_mib: self.size_mib,
            moves: self.moves.len(),
            pause: of(&|m| m.pause_ms),
            freeze: of(&|m| m.freeze_ms),
            overhead: of(&|m| Some(m.pause_ms? - m.freeze_ms?)),
            image_mib: of(&|m| m.image_bytes.map(|b| b as f64 / (1024.0 * 1024.0))),
            resident: of(&|m| m.resident_ms),
            latency_while_paging: Spread::of(
                &self
                    .moves
                    .iter()
                    .flat_map(|m| m.latency_while_paging_ms.iter().copied())
                    .collect::<Vec<_>>(),
            ),
            goodput_back: Spread::of(
                &self
                    .bulk_moves
                    .iter()
                    .filter_map(|m| m.goodput_back_ms)
                    .collect::<Vec<_>>(),
            ),
            client_handshakes: self.client_handshakes,
            server_handshakes: self.server_handshakes,
            problems: self.problems.clone(),
        }
    }
}

/// The whole run, as written to bench-migrate.json.
#[derive(Debug, Serialize)]
struct BenchReport {
    machine: String,
    elapsed_s: f64,
    quick: bool,
    dirty_mib_per_s: u32,
    summaries: Vec<Summary>,
    targets: Vec<Target>,
    cells: Vec<Cell>,
}

/// One of the issue's targets, judged on this run.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Target {
    pub(crate) what: String,
    pub(crate) measured: String,
    /// `None`: not measured in this run.
    pub(crate) met: Option<bool>,
}

/// Where the bench keeps things.
struct Paths {
    bin: PathBuf,
    out: PathBuf,
    state: PathBuf,
    images: PathBuf,
}

impl Paths {
    fn control(&self) -> Command {
        let mut c = Command::new(self.bin.join("control"));
        c.arg("--state-dir")
            .arg(&self.state)
            .arg("--images-dir")
            .arg(&self.images)
            .args(["--name", NAME, "--log", "warn"]);
        c
    }
}

/// After bench-migrate was stopped at its time limit (by `cargo xtask ci`): removes its
/// deployment and the podman container, best effort.
pub(crate) fn clean_up_after_a_kill(root: &Path) {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let out = target.join("bench-migrate");
    let paths = Paths {
        bin: target.join("release"),
        state: out.join("state"),
        images: PathBuf::from(IMAGES),
        out,
    };
    if paths.bin.join("control").exists() {
        down(&paths);
    }
    let _ = podman(&["rm", "-f", "-t", "0", POD_CONTAINER]);
    let _ = podman(&["rmi", "-f", &pod_image()]);
}

pub(crate) fn run(root: &Path, opts: &Options) -> Result<()> {
    let started = Instant::now();
    if !crate::setup::is_root() {
        bail!("bench-migrate needs root (podman rootful, criu, network namespaces)");
    }
    let (sizes, moves, moves_large, bulk_moves) = opts.effective();
    check_memory(&sizes)?;
    println!("bench-migrate: building release binaries (swrapper, control, bench_client)...");
    let status = Command::new(crate::cargo())
        .args(["build", "--release", "-p", "swrapper", "-p", "control"])
        .args(["-p", "migration-benches", "--bins"])
        .current_dir(root)
        .status()
        .context("starting cargo build")?;
    if !status.success() {
        bail!("building the release binaries failed");
    }
    println!("bench-migrate: checking podman, runc and CRIU (installing what is missing)...");
    crate::setup::ensure(root)?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let out = opts
        .out
        .clone()
        .unwrap_or_else(|| target.join("bench-migrate"));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let paths = Paths {
        bin: target.join("release"),
        state: out.join("state"),
        images: PathBuf::from(IMAGES),
        out,
    };
    // A deployment left by an earlier, killed run.
    let _ = crate::limit::status(paths.control().arg("down"), "control down", STEP_LIMIT);

    let mut cells = Vec::new();
    for &size in &sizes {
        let n = if size >= 1024 { moves_large } else { moves };
        // Two deployments per size: the default layout (an unprivileged server in the
        // host's pid namespace) for the reconnect baseline and the cold moves, and a server
        // in its own pid namespace (what post-copy needs) for post-copy.
        for pid_namespace in [false, true] {
            let modes: Vec<Mode> = opts
                .modes
                .iter()
                .copied()
                .filter(|m| match m {
                    Mode::Podman => false,
                    Mode::PostCopy => pid_namespace,
                    Mode::Reconnect | Mode::Seed | Mode::TwoPhase => !pid_namespace,
                })
                .collect();
            if modes.is_empty() {
                continue;
            }
            println!(
                "\nbench-migrate: {size} MiB: control up{}",
                if pid_namespace {
                    " --pid-namespace"
                } else {
                    ""
                }
            );
            match up(&paths, size, opts.dirty_mib_per_s, pid_namespace) {
                Ok(()) => {
                    let mut port = SRC_PORT;
                    for &mode in &modes {
                        println!(
                            "bench-migrate: {size} MiB, {}: {n} moves{}",
                            mode.label(),
                            if bulk_moves > 0 && mode != Mode::Reconnect {
                                format!(" + {bulk_moves} with a bulk stream")
                            } else {
                                String::new()
                            }
                        );
                        let cell = engine_cell(&paths, mode, size, n, bulk_moves, &mut port);
                        print_cell_line(&cell);
                        cells.push(cell);
                    }
                }
                Err(e) => {
                    for &mode in &modes {
                        cells.push(failed_cell(mode, size, format!("control up: {e:#}")));
                    }
                }
            }
            down(&paths);
        }
        if opts.modes.contains(&Mode::Podman) {
            println!("bench-migrate: {size} MiB, podman checkpoint/restore: {n} moves");
            let cell = podman_cell(&paths, size, n, opts.dirty_mib_per_s);
            print_cell_line(&cell);
            cells.push(cell);
        }
    }

    let summaries: Vec<Summary> = cells.iter().map(Cell::summary).collect();
    let targets = judge(&summaries);
    let report = BenchReport {
        machine: crate::bench::machine(),
        elapsed_s: started.elapsed().as_secs_f64(),
        quick: opts.quick,
        dirty_mib_per_s: opts.dirty_mib_per_s,
        summaries,
        targets,
        cells,
    };
    let json = paths.out.join("bench-migrate.json");
    std::fs::write(&json, serde_json::to_string_pretty(&report)?)?;
    let svg = plot::pause_against_size(&report.summaries)?;
    std::fs::write(paths.out.join("pause-vs-size.svg"), &svg)?;
    std::fs::write(paths.out.join("machine.txt"), &report.machine)?;
    let table = render(&report);
    std::fs::write(paths.out.join("bench-migrate.md"), &table)?;
    println!("\n{table}");
    println!(
        "bench-migrate: JSON {}, plot {}",
        json.display(),
        paths.out.join("pause-vs-size.svg").display()
    );
    if opts.write_benchmarks {
        std::fs::write(root.join("docs/bench-migrate-pause.svg"), &svg)
            .context("writing docs/bench-migrate-pause.svg")?;
        let path = root.join("BENCHMARKS.md");
        let old = std::fs::read_to_string(&path).unwrap_or_default();
        let body = format!(
            "{table}\n![client pause against resident size](docs/bench-migrate-pause.svg)\n"
        );
        std::fs::write(&path, crate::bench::splice_between(&old, BEGIN, END, &body))?;
        println!("bench-migrate: wrote the figures into {}", path.display());
    }
    // What went wrong with the baselines is a finding about them (printed); what went wrong
    // with this project's own moves fails the run.
    let (baseline, ours): (Vec<&Summary>, Vec<&Summary>) = report
        .summaries
        .iter()
        .partition(|s| matches!(s.mode, Mode::Reconnect | Mode::Podman));
    let list = |v: &[&Summary]| -> Vec<String> {
        v.iter()
            .flat_map(|s| {
                s.problems
                    .iter()
                    .map(move |p| format!("{} at {} MiB: {p}", s.mode.label(), s.size_mib))
            })
            .collect()
    };
    for p in list(&baseline) {
        println!("bench-migrate: baseline finding: {p}");
    }
    let broken = list(&ours);
    if !broken.is_empty() {
        bail!("bench-migrate: some moves failed:\n{}", broken.join("\n"));
    }
    Ok(())
}

/// Refuses sizes the machine cannot hold twice (source and target during a move).
fn check_memory(sizes: &[u32]) -> Result<()> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let total_kib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|r| r.split_whitespace().next()?.parse::<u64>().ok());
    if let (Some(total), Some(&max)) = (total_kib, sizes.iter().max()) {
        let need = u64::from(max) * 1024 * 3;
        if need > total {
            bail!(
                "a {max} MiB server needs about {} MiB here (source, images, target); the \
                 machine has {} MiB",
                need / 1024,
                total / 1024
            );
        }
    }
    Ok(())
}

fn failed_cell(mode: Mode, size: u32, problem: String) -> Cell {
    Cell {
        mode,
        size_mib: size,
        moves: Vec::new(),
        bulk_moves: Vec::new(),
        client_handshakes: None,
        server_handshakes: None,
        problems: vec![problem],
    }
}

fn print_cell_line(c: &Cell) {
    let s = c.summary();
    let med = |x: Option<Spread>| x.map_or("-".to_owned(), |s| format!("{:.1}", s.median));
    println!(
        "  {} moves: pause {} ms, freeze {} ms, overhead {} ms{}",
        s.moves,
        med(s.pause),
        med(s.freeze),
        med(s.overhead),
        if s.problems.is_empty() {
            String::new()
        } else {
            format!("; PROBLEMS: {}", s.problems.join("; "))
        }
    );
}

fn up(paths: &Paths, size: u32, dirty: u32, pid_namespace: bool) -> Result<()> {
    let mut cmd = paths.control();
    cmd.arg("up")
        .args(["--src-port", &SRC_PORT.to_string()])
        .args(["--dst-port", &DST_PORT.to_string()])
        .args(["--ballast-mib", &size.to_string()])
        .args([
            "--dirty-mib-per-s",
            &if size == 0 { 0 } else { dirty }.to_string(),
        ]);
    if pid_namespace {
        // criu can dump a process that is PID 1 of its own pid namespace only when it may
        // mount a /proc for it: the post-copy layout's server is root (see control up --help).
        cmd.args(["--pid-namespace", "--server-user", "root"]);
    }
    let status = crate::limit::status(&mut cmd, "control up", STEP_LIMIT)?;
    if !status.success() {
        bail!("control up exited with {status}");
    }
    Ok(())
}

fn down(paths: &Paths) {
    let r = crate::limit::status(paths.control().arg("down"), "control down", STEP_LIMIT);
    if !r.as_ref().is_ok_and(|s| s.success()) {
        println!("bench-migrate: control down did not succeed: {r:?}");
    }
}

/// A bench client running in the background.
struct Client {
    child: Child,
    json: PathBuf,
}

impl Client {
    /// `bench_client --mode kind` against the host port `target`, trusting the certificate
    /// `ca`; its JSON and log are `client-<tag>.*` in the output folder.
    fn start(
        paths: &Paths,
        kind: &str,
        target: u16,
        ca: &Path,
        extra: &[String],
        tag: &str,
    ) -> Result<Self> {
        let json = paths.out.join(format!("client-{tag}.json"));
        let _ = std::fs::remove_file(&json);
        let log = std::fs::File::create(paths.out.join(format!("client-{tag}.log")))?;
        let child = Command::new(paths.bin.join("bench_client"))
            .args(["--mode", kind])
            .args(["--target", &format!("127.0.0.1:{target}")])
            .arg("--ca")
            .arg(ca)
            .arg("--json")
            .arg(&json)
            // Stopped by SIGINT when the series ends; the limit only bounds a forgotten one.
            .args(["--duration-s", "3600"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting bench_client")?;
        Ok(Client { child, json })
    }

    /// Fails (with the end of its log) when the client already ended: it could not connect.
    fn check_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            let log = self.json.with_extension("log");
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().filter(|l| !l.starts_with("  ")).collect();
            bail!(
                "bench_client ended at once ({status}): {}",
                tail[tail.len().saturating_sub(4)..].join(" / ")
            );
        }
        Ok(())
    }

    /// SIGINT, wait (bounded), read its JSON.
    fn stop(mut self) -> Result<ClientResult> {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id())?);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.child.try_wait()?.is_some() {
                break;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!("bench_client did not stop within 20 s of SIGINT");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let text = std::fs::read_to_string(&self.json)
            .with_context(|| format!("bench_client wrote no {}", self.json.display()))?;
        ClientResult::parse(&text)
    }
}

/// What a bench client recorded (the subset the bench reads; `bench_client --json`).
#[derive(Debug, Default, Deserialize)]
pub(crate) struct ClientResult {
    #[serde(default)]
    latency: Option<LatencyPart>,
    #[serde(default)]
    bulk: Option<BulkPart>,
    #[serde(default)]
    handshakes: Option<u64>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct LatencyPart {
    /// Answered echoes: [sent, round trip], microseconds (sent: wall clock).
    echoes: Vec<[u64; 2]>,
}

#[derive(Debug, Default, Deserialize)]
struct BulkPart {
    /// [bucket start (wall clock), bytes], microseconds.
    buckets: Vec<[u64; 2]>,
}

impl ClientResult {
    fn parse(text: &str) -> Result<Self> {
        serde_json::from_str(text).context("bench_client's JSON")
    }
    fn answers(&self) -> Vec<Answered> {
        self.latency.as_ref().map_or_else(Vec::new, |l| {
            l.echoes
                .iter()
                .map(|&[sent_us, rtt_us]| Answered {
                    sent_us,
                    answered_us: sent_us.saturating_add(rtt_us),
                })
                .collect()
        })
    }
    fn buckets(&self) -> Vec<Bucket> {
        self.bulk.as_ref().map_or_else(Vec::new, |b| {
            b.buckets
                .iter()
                .map(|&[t_us, bytes]| Bucket { t_us, bytes })
                .collect()
        })
    }
}

/// One move's window, from control's report or the bench's own clock: when it began, when
/// the server ran again (resume), when it ended, and when every page was resident.
#[derive(Debug, Clone, Copy)]
struct Window {
    start_us: u64,
    resume_us: u64,
    end_us: u64,
    resident_us: Option<u64>,
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// Post-copy: the restore's end -> every page resident.
fn resident_ms(r: &MoveReport) -> Option<f64> {
    r.post_copy.as_ref()?.resident_after_ms
}

fn window_of(r: &MoveReport) -> Window {
    let t = &r.timeline;
    let start_us = t.created_at.as_micros();
    let end_us = t.finished_at.map_or(start_us, |f| f.as_micros());
    let resume_us = t
        .phases
        .iter()
        .find(|p| p.phase == migration_core::Phase::Resuming)
        .map_or(end_us, |p| p.start.as_micros());
    let resident_us = resident_ms(r).map(|ms| resume_us + (ms * 1e3) as u64);
    Window {
        start_us,
        resume_us,
        end_us,
        resident_us,
    }
}

/// Runs `n` moves of one engine mode (or restarts, for the reconnect baseline) under a
/// latency client, then `bulk` more under a bulk client.
/// The other container's host port.
fn other_port(port: u16) -> u16 {
    if port == SRC_PORT { DST_PORT } else { SRC_PORT }
}

/// `port`: where the server runs now (updated after every move).
fn engine_cell(paths: &Paths, mode: Mode, size: u32, n: u32, bulk: u32, port: &mut u16) -> Cell {
    let mut cell = failed_cell(mode, size, String::new());
    cell.problems.clear();
    let tag = format!("{}-{size}", mode_tag(mode));
    let reconnect = mode == Mode::Reconnect;
    let mut extra = vec!["--interval-ms".to_owned(), "1".to_owned()];
    if reconnect {
        // The reconnect baseline at its best: it dials the server's next address first (as
        // if a name were updated at once) and notices a loss after 250 ms without an answer.
        extra.push("--reconnect".to_owned());
        extra.push("--io-timeout-ms".to_owned());
        extra.push(BASELINE_IO_TIMEOUT_MS.to_string());
        extra.push("--reconnect-to".to_owned());
        extra.push(format!(
            "127.0.0.1:{},127.0.0.1:{}",
            other_port(*port),
            *port
        ));
    }
    match moves_under(paths, mode, n, "latency", &extra, &tag, port) {
        Ok((done, client)) => {
            let answers = client.answers();
            for d in &done {
                let w = d.window;
                let latency = match w.resident_us {
                    Some(res) => stats::latencies_ms(&answers, w.resume_us, res),
                    None => Vec::new(),
                };
                cell.moves.push(MoveFigures {
                    pause_ms: stats::pause_ms(&answers, w.start_us, w.end_us),
                    freeze_ms: d.freeze_ms,
                    image_bytes: d.image_bytes,
                    resident_ms: d.resident_ms,
                    latency_while_paging_ms: latency,
                    goodput_back_ms: None,
                });
            }
            cell.client_handshakes = client.handshakes;
            // New handshakes the server counted between the end of the first move and the end
            // of the last (0: every connection survived; the count is the server's life's).
            let counts: Vec<u64> = done.iter().filter_map(|d| d.server_handshakes).collect();
            cell.server_handshakes = match (counts.first(), counts.last()) {
                (Some(a), Some(b)) => Some(b.saturating_sub(*a)),
                _ => None,
            };
            if cell.server_handshakes.is_some_and(|n| n > 0) && !reconnect {
                cell.problems.push(format!(
                    "the server counted {} new handshakes during the moves",
                    cell.server_handshakes.unwrap_or(0)
                ));
            }
            if let Some(e) = client.error {
                cell.problems.push(format!("latency client: {e}"));
            }
            let expected = if reconnect { u64::from(n) + 1 } else { 1 };
            if cell.client_handshakes != Some(expected) {
                cell.problems.push(format!(
                    "the latency client made {:?} handshakes, expected {expected}",
                    cell.client_handshakes
                ));
            }
        }
        Err(e) => cell.problems.push(format!("{e:#}")),
    }
    if bulk > 0 && !reconnect {
        match moves_under(paths, mode, bulk, "bulk", &[], &format!("{tag}-bulk"), port) {
            Ok((done, client)) => {
                let buckets = client.buckets();
                for w in done.iter().map(|d| d.window) {
                    cell.bulk_moves.push(MoveFigures {
                        goodput_back_ms: stats::goodput_back_ms(
                            &buckets,
                            w.start_us,
                            w.resume_us,
                            10_000,
                            500_000,
                            5_000_000,
                        ),
                        ..MoveFigures::default()
                    });
                }
                if let Some(e) = client.error {
                    cell.problems.push(format!("bulk client: {e}"));
                }
            }
            Err(e) => cell.problems.push(format!("bulk: {e:#}")),
        }
    }
    cell
}

fn mode_tag(mode: Mode) -> &'static str {
    match mode {
        Mode::Reconnect => "reconnect",
        Mode::Podman => "podman",
        Mode::Seed => "seed",
        Mode::TwoPhase => "two-phase",
        Mode::PostCopy => "post-copy",
    }
}

/// How long a baseline client waits for an answer before it counts the connection as lost.
const BASELINE_IO_TIMEOUT_MS: u64 = 250;

/// The pause between two moves.
fn settle(mode: Mode) -> Duration {
    match mode {
        Mode::Reconnect | Mode::Podman => Duration::from_millis(1500),
        Mode::Seed | Mode::TwoPhase | Mode::PostCopy => Duration::from_millis(400),
    }
}

/// One move as control reported it.
#[derive(Debug, Clone, Copy)]
struct Done {
    /// The host port the server answers at afterwards.
    target_port: u16,
    window: Window,
    freeze_ms: Option<f64>,
    image_bytes: Option<u64>,
    resident_ms: Option<f64>,
    server_handshakes: Option<u64>,
}

impl Done {
    fn of_move(r: &MoveReport) -> Self {
        Done {
            target_port: r.target_addr.port(),
            window: window_of(r),
            freeze_ms: r.freeze_ms(),
            image_bytes: r.image_bytes,
            resident_ms: resident_ms(r),
            server_handshakes: r.server_handshakes(),
        }
    }

    fn of_restart(r: &RestartReport) -> Self {
        Done {
            target_port: r.target_addr.port(),
            window: Window {
                start_us: r.started_us,
                resume_us: r.ready_us,
                end_us: r.ready_us,
                resident_us: None,
            },
            freeze_ms: Some(r.downtime_ms()),
            image_bytes: None,
            resident_ms: None,
            server_handshakes: None,
        }
    }
}

/// Runs one move (or restart) and reads its report.
fn one_move(paths: &Paths, mode: Mode, report_path: &Path) -> Result<Done> {
    let _ = std::fs::remove_file(report_path);
    let mut cmd = paths.control();
    match mode.migrate_args() {
        Some(args) => cmd.arg("migrate").args(args),
        None => cmd.arg("restart-elsewhere"),
    };
    cmd.arg("--report").arg(report_path);
    let status = crate::limit::status(&mut cmd, "control", STEP_LIMIT)?;
    let text = std::fs::read_to_string(report_path);
    if mode.migrate_args().is_none() {
        if !status.success() {
            bail!("control restart-elsewhere exited with {status}");
        }
        let r: RestartReport = serde_json::from_str(&text.context("no restart report")?)
            .context("the restart report")?;
        return Ok(Done::of_restart(&r));
    }
    let report: Option<MoveReport> = text.ok().and_then(|t| serde_json::from_str(&t).ok());
    match report {
        Some(r) if status.success() && r.result == MoveResult::Completed => Ok(Done::of_move(&r)),
        Some(r) => bail!(
            "{} ({})",
            r.result,
            r.failure.as_deref().unwrap_or("no reason given")
        ),
        None => bail!("control exited with {status}, no report"),
    }
}

/// Starts a client, lets it settle, runs `n` moves, stops the client.
fn moves_under(
    paths: &Paths,
    mode: Mode,
    n: u32,
    kind: &str,
    extra: &[String],
    tag: &str,
    port: &mut u16,
) -> Result<(Vec<Done>, ClientResult)> {
    let ca = paths.state.join("server-cert.pem");
    let mut client = Client::start(paths, kind, *port, &ca, extra, tag)?;
    std::thread::sleep(Duration::from_millis(800));
    client.check_running()?;
    let mut done = Vec::new();
    let mut failure = None;
    for i in 0..n {
        let report_path = paths.out.join(format!("move-{tag}-{i}.json"));
        match one_move(paths, mode, &report_path) {
            Ok(d) => {
                *port = d.target_port;
                done.push(d);
            }
            Err(e) => {
                failure = Some(format!("move {} of {n}: {e:#}", i + 1));
                break;
            }
        }
        // Let pages settle and the client's figures stabilise between moves; a reconnecting
        // client needs its loss timeout and a handshake first.
        std::thread::sleep(settle(mode));
    }
    std::thread::sleep(Duration::from_millis(300));
    let result = client.stop();
    if let Some(f) = failure {
        bail!("{f}");
    }
    Ok((done, result?))
}

/// podman's own checkpoint and restore of a container whose process is the server.
fn podman_cell(paths: &Paths, size: u32, n: u32, dirty: u32) -> Cell {
    let mut cell = failed_cell(Mode::Podman, size, String::new());
    cell.problems.clear();
    let result = podman_moves(paths, size, n, dirty);
    let _ = podman(&["rm", "-f", "-t", "0", POD_CONTAINER]);
    let _ = podman(&["rmi", "-f", &pod_image()]);
    let _ = std::fs::remove_dir_all(paths.out.join("pod-certs"));
    match result {
        Ok((figures, client)) => {
            let answers = client.answers();
            for (w, mut f) in figures {
                f.pause_ms = stats::pause_ms(&answers, w.start_us, w.end_us);
                cell.moves.push(f);
            }
            // Measured here: after podman's restore the port map's NAT state is gone and the
            // old flow's replies arrive from another address, which QUIC discards: the client
            // must reconnect. Its handshakes are reported, not required to be 1.
            cell.client_handshakes = client.handshakes;
            if let Some(e) = client.error {
                cell.problems.push(format!("latency client: {e}"));
            }
        }
        Err(e) => cell.problems.push(format!("{e:#}")),
    }
    cell
}

fn pod_image() -> String {
    format!("localhost/{NAME}-pod:latest")
}

fn podman(args: &[&str]) -> Result<String> {
    let out = Command::new("podman")
        .args(["--runtime", "runc"])
        .args(args)
        .output()
        .with_context(|| format!("starting podman {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "podman {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn podman_moves(
    paths: &Paths,
    size: u32,
    n: u32,
    dirty: u32,
) -> Result<(Vec<(Window, MoveFigures)>, ClientResult)> {
    let _ = podman(&["rm", "-f", "-t", "0", POD_CONTAINER]);
    // The image and a certificate from control's own set-up: `control up` then down, keeping
    // nothing but what is copied here.
    let certs = paths.out.join("pod-certs");
    crate::bench_migrate::private_dir(&certs)?;
    build_pod_image(paths, &certs)?;
    let mount = format!("{}:/certs:ro", certs.display());
    let ballast = size.to_string();
    let dirty = if size == 0 { 0 } else { dirty }.to_string();
    podman(&[
        "run",
        "-d",
        "--name",
        POD_CONTAINER,
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=1000:1000",
        "-p",
        &format!("{POD_PORT}:4242/udp"),
        "-v",
        &mount,
        &pod_image(),
        "/usr/local/bin/swrapper",
        "--listen",
        "0.0.0.0:4242",
        "--cert",
        "/certs/server-cert.pem",
        "--key",
        "/certs/server-key.pem",
        "--ballast-mib",
        &ballast,
        "--dirty-mib-per-s",
        &dirty,
    ])?;
    // The server touches its ballast before it serves.
    std::thread::sleep(Duration::from_millis(500 + u64::from(size) * 2));
    let extra = [
        "--interval-ms".to_owned(),
        "1".to_owned(),
        "--reconnect".to_owned(),
        "--io-timeout-ms".to_owned(),
        BASELINE_IO_TIMEOUT_MS.to_string(),
        "--reconnect-to".to_owned(),
        format!("127.0.0.1:{POD_PORT}"),
    ];
    let mut client = Client::start(
        paths,
        "latency",
        POD_PORT,
        &certs.join("server-cert.pem"),
        &extra,
        &format!("podman-{size}"),
    )?;
    std::thread::sleep(Duration::from_millis(800));
    client.check_running()?;
    let mut figures = Vec::new();
    let mut failure = None;
    for i in 0..n {
        let start_us = now_us();
        let t0 = Instant::now();
        let r = podman(&["container", "checkpoint", POD_CONTAINER])
            .and_then(|_| podman(&["container", "restore", POD_CONTAINER]));
        let freeze = t0.elapsed().as_secs_f64() * 1e3;
        let end_us = now_us();
        if let Err(e) = r {
            failure = Some(format!("move {} of {n}: {e:#}", i + 1));
            break;
        }
        figures.push((
            Window {
                start_us,
                resume_us: end_us,
                end_us,
                resident_us: None,
            },
            MoveFigures {
                freeze_ms: Some(freeze),
                ..MoveFigures::default()
            },
        ));
        std::thread::sleep(settle(Mode::Podman));
    }
    std::thread::sleep(Duration::from_millis(300));
    let result = client.stop();
    if let Some(f) = failure {
        bail!("{f}");
    }
    Ok((figures, result?))
}

/// An image whose entry is the server, with the release swrapper and its libraries, and a
/// certificate and key for it.
fn build_pod_image(paths: &Paths, certs: &Path) -> Result<()> {
    let status = Command::new(paths.bin.join("control"))
        .args(["pod-image", "--tag", &pod_image(), "--certs"])
        .arg(certs)
        .status()
        .context("starting control pod-image")?;
    if !status.success() {
        bail!("control pod-image failed ({status})");
    }
    Ok(())
}

/// A 0700 directory, made fresh.
fn private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    let _ = std::fs::remove_dir_all(dir);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))
}

/// The issue's targets, judged on this run's summaries.
fn judge(s: &[Summary]) -> Vec<Target> {
    let find = |mode: Mode, size: u32| s.iter().find(|x| x.mode == mode && x.size_mib == size);
    let med = |x: Option<Spread>| x.map(|s| s.median);
    let mut t = Vec::new();
    let mut target = |what: &str, measured: Option<f64>, ok: &dyn Fn(f64) -> bool| {
        t.push(Target {
            what: what.to_owned(),
            measured: measured.map_or("-".to_owned(), |m| format!("{m:.1}")),
            met: measured.map(ok),
        });
    };
    let demo = find(Mode::TwoPhase, 0);
    target(
        "demo server, two-phase: client pause median <= 30 ms",
        demo.and_then(|d| med(d.pause)),
        &|m| m <= 30.0,
    );
    target(
        "demo server, two-phase: freeze median <= 20 ms",
        demo.and_then(|d| med(d.freeze)),
        &|m| m <= 20.0,
    );
    target(
        "demo server, two-phase: recovery overhead median <= 5 ms",
        demo.and_then(|d| med(d.overhead)),
        &|m| m <= 5.0,
    );
    let pc_1g = find(Mode::PostCopy, 1024).and_then(|d| med(d.freeze));
    let pc_16 = find(Mode::PostCopy, 16).and_then(|d| med(d.freeze));
    target("post-copy: freeze at 1 GiB <= 100 ms", pc_1g, &|m| {
        m <= 100.0
    });
    target(
        "post-copy: freeze at 1 GiB within 3x of the freeze at 16 MiB (ratio)",
        pc_1g.zip(pc_16).map(|(a, b)| a / b),
        &|r| r <= 3.0,
    );
    target(
        "post-copy: 1 GiB fully resident within 5 s of the restore (ms, median)",
        find(Mode::PostCopy, 1024).and_then(|d| med(d.resident)),
        &|m| m <= 5000.0,
    );
    let goodput = s
        .iter()
        .filter(|x| x.mode == Mode::TwoPhase)
        .filter_map(|x| x.goodput_back.map(|g| g.median))
        .fold(None, |acc: Option<f64>, g| {
            Some(acc.map_or(g, |a| a.max(g)))
        });
    target(
        "two-phase: bulk goodput back to 90% within 50 ms of the resume (worst size's median, ms)",
        goodput,
        &|m| m <= 50.0,
    );
    let extra = s
        .iter()
        .filter(|x| !matches!(x.mode, Mode::Reconnect | Mode::Podman) && x.moves > 0)
        .filter_map(|x| x.client_handshakes)
        .max();
    target(
        "zero second handshakes in the project's modes (most handshakes a client made)",
        extra.map(|h| h as f64),
        &|h| h <= 1.0,
    );
    t
}

fn render(r: &BenchReport) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "### Client pause by mode and resident size (`cargo xtask bench-migrate{}`)\n",
        if r.quick { " --quick" } else { "" }
    );
    let _ = writeln!(o, "Machine: {}\n", r.machine.replace('\n', "; "));
    let _ = writeln!(
        o,
        "Median / p95 / max over the moves; pause as the client saw it (longest gap between \
         answers, 1 ms echo interval; the reconnect and podman clients count a connection as \
         lost after {BASELINE_IO_TIMEOUT_MS} ms without an answer and reconnect at once to \
         the server's new address), freeze from control's phases (podman: checkpoint + \
         restore wall time; reconnect: the server's stop to the new server serving), overhead \
         = pause - freeze; the server rewrites {} MiB/s of its ballast.\n",
        r.dirty_mib_per_s
    );
    let _ = writeln!(
        o,
        "| mode | MiB | moves | pause ms | freeze ms | overhead ms | image MiB | resident ms | latency while paging ms | goodput 90% ms | handshakes: client / server's new |"
    );
    let _ = writeln!(o, "|---|---|---|---|---|---|---|---|---|---|---|");
    let f = |x: Option<Spread>| {
        x.map_or("-".to_owned(), |s| {
            format!("{:.1} / {:.1} / {:.1}", s.median, s.p95, s.max)
        })
    };
    let mut rows: Vec<&Summary> = r.summaries.iter().collect();
    rows.sort_by_key(|s| (s.size_mib, s.mode));
    for s in rows {
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {}/{} |",
            s.mode.label(),
            s.size_mib,
            s.moves,
            f(s.pause),
            f(s.freeze),
            f(s.overhead),
            f(s.image_mib),
            f(s.resident),
            f(s.latency_while_paging),
            f(s.goodput_back),
            s.client_handshakes.map_or("-".into(), |h| h.to_string()),
            s.server_handshakes.map_or("-".into(), |h| h.to_string()),
        );
    }
    let _ = writeln!(o, "\nTargets:\n");
    for t in &r.targets {
        let verdict = match t.met {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "not measured",
        };
        let _ = writeln!(o, "- {}: {} ({verdict})", t.what, t.measured);
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(mode: Mode, size: u32, pause: f64, freeze: f64) -> Summary {
        let one = |v| Spread::of(&[v]);
        Summary {
            mode,
            size_mib: size,
            moves: 1,
            pause: one(pause),
            freeze: one(freeze),
            overhead: one(pause - freeze),
            image_mib: None,
            resident: None,
            latency_while_paging: None,
            goodput_back: None,
            client_handshakes: Some(1),
            server_handshakes: Some(1),
            problems: Vec::new(),
        }
    }

    #[test]
    fn targets_are_judged_and_unmeasured_ones_say_so() {
        let s = vec![
            summary(Mode::TwoPhase, 0, 25.0, 18.0),
            summary(Mode::PostCopy, 16, 40.0, 20.0),
            summary(Mode::PostCopy, 1024, 120.0, 90.0),
        ];
        let t = judge(&s);
        let get = |prefix: &str| t.iter().find(|x| x.what.starts_with(prefix)).unwrap();
        assert_eq!(get("demo server, two-phase: client pause").met, Some(true));
        assert_eq!(get("demo server, two-phase: recovery").met, Some(false));
        assert_eq!(get("post-copy: freeze at 1 GiB <=").met, Some(true));
        assert_eq!(get("post-copy: freeze at 1 GiB within").met, Some(false));
        assert_eq!(get("post-copy: 1 GiB fully").met, None);
        assert_eq!(get("post-copy: 1 GiB fully").measured, "-");
    }

    #[test]
    fn a_second_handshake_outside_reconnect_misses_the_target() {
        let mut s = vec![summary(Mode::Seed, 0, 100.0, 90.0)];
        s[0].client_handshakes = Some(2);
        let mut r = summary(Mode::Reconnect, 0, 300.0, 100.0);
        r.client_handshakes = Some(21);
        s.push(r);
        let t = judge(&s);
        let h = t
            .iter()
            .find(|x| x.what.starts_with("zero second"))
            .unwrap();
        assert_eq!(h.met, Some(false));
        assert_eq!(h.measured, "2.0");
    }

    #[test]
    fn the_table_has_a_row_per_cell_and_the_targets() {
        let r = BenchReport {
            machine: "m".into(),
            elapsed_s: 1.0,
            quick: true,
            dirty_mib_per_s: 20,
            summaries: vec![summary(Mode::Seed, 0, 100.0, 90.0)],
            targets: judge(&[]),
            cells: Vec::new(),
        };
        let t = render(&r);
        assert!(
            t.contains("| seed (1 phase, cold) | 0 | 1 | 100.0 / 100.0 / 100.0 |"),
            "{t}"
        );
        assert!(t.contains("(not measured)"));
    }

    #[test]
    fn client_results_parse_and_garbage_is_an_error() {
        let r = ClientResult::parse(
            r#"{"mode":"latency","handshakes":1,"latency":{"echoes":[[1000,250]],"failures":[]}}"#,
        )
        .unwrap();
        assert_eq!(
            r.answers(),
            vec![Answered {
                sent_us: 1000,
                answered_us: 1250
            }]
        );
        assert_eq!(r.handshakes, Some(1));
        assert!(r.buckets().is_empty());
        assert!(ClientResult::parse("not json").is_err());
        assert!(ClientResult::parse(r#"{"latency":{"echoes":"x"}}"#).is_err());
    }
}
