//! `cargo xtask e2e-migrate`: the whole flow for real: release binaries, set-up, podman
//! containers A and B, the demo client, CRIU migrations A -> B -> A driven from one process
//! and by hand (separate `control` commands), and a scenario whose restore and dump are made
//! to fail so that both rollbacks are proven.
//!
//! xtask prepares and tears down; `control run` drives each scenario and checks what it can see
//! (its report lists problems); this file adds the cross-scenario checks, prints the summary,
//! writes the JSON report and, on failure, the diagnostics.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use admin_api::{MoveResult, RunReport};
use anyhow::{Context, Result, bail};

const BEGIN: &str = "<!-- xtask e2e-migrate: generated section begins -->";
const END: &str = "<!-- xtask e2e-migrate: generated section ends -->";

/// The container-name prefixes of the two scenarios (`control --name`).
const NAMES: [&str; 4] = ["qlm-e2e", "qlm-e2e-rb", "qlm-e2e-hand", "qlm-e2e-int"];
/// A scenario takes about a minute; one that has not ended after this is hung.
const SCENARIO_LIMIT: Duration = Duration::from_secs(15 * 60);
/// `control logs` and `control down`.
const HOUSEKEEPING_LIMIT: Duration = Duration::from_secs(3 * 60);

/// Where e2e-migrate keeps its binaries, reports, state and images.
struct Paths {
    bin: PathBuf,
    out_dir: PathBuf,
    state: PathBuf,
    images: PathBuf,
}

impl Paths {
    fn new(root: &Path) -> Self {
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"));
        let out_dir = target.join("e2e");
        Paths {
            bin: target.join("release"),
            state: out_dir.join("state"),
            out_dir,
            images: PathBuf::from("/dev/shm/quic-live-migrate-e2e"),
        }
    }

    fn control(&self, name: &str) -> Command {
        control_cmd(&self.bin, &self.state, &self.images, name)
    }
}

/// After e2e-migrate was stopped at its time limit (by `cargo xtask ci`): removes the
/// containers and state of both scenarios, best effort, saying what it does.
pub(crate) fn clean_up_after_a_kill(root: &Path) {
    let paths = Paths::new(root);
    if !paths.bin.join("control").exists() {
        return;
    }
    for name in NAMES.iter().chain(&[
        crate::front_e2e::NAME,
        crate::front_e2e::PLAIN_NAME,
        crate::front_e2e::AIOQUIC_NAME,
        crate::front_e2e::H3_NAME,
    ]) {
        println!("e2e: cleaning up after the stop: control down --name {name}");
        let res = crate::limit::status(
            paths.control(name).arg("down"),
            "control down",
            HOUSEKEEPING_LIMIT,
        );
        if !res.as_ref().is_ok_and(|s| s.success()) {
            println!("e2e: control down --name {name} did not succeed: {res:?}");
        }
    }
    crate::front_e2e::clean_up_after_a_kill();
}

/// The options of `cargo xtask e2e-migrate`.
#[derive(Debug, clap::Args)]
pub(crate) struct Options {
    /// Keep the last scenario's containers, state and logs (for debugging).
    #[arg(long)]
    preserve: bool,
    /// Moves in the main scenario (at least 2: A -> B -> A).
    #[arg(long, value_name = "N", default_value_t = 2,
          value_parser = clap::value_parser!(u32).range(2..))]
    moves: u32,
    /// Put the figures into the generated section of BENCHMARKS.md.
    #[arg(long)]
    write_benchmarks: bool,
    /// Skip the rollback scenario.
    #[arg(long)]
    no_rollback: bool,
    /// Skip the by-hand scenario (control up, then each control migrate as its own process).
    #[arg(long)]
    no_by_hand: bool,
    /// Skip the interrupt scenario (control killed at each phase boundary, then recovered).
    #[arg(long)]
    no_interrupt: bool,
    /// Skip the stable-address scenario (`control up --front`: a client in its own network
    /// namespace, the server moved behind one front address, with and without holding).
    #[arg(long)]
    no_front: bool,
    /// Moves in each stable-address scenario (alternately with and without holding; their
    /// medians go into the comparison by mode).
    #[arg(long, value_name = "N", default_value_t = 6,
          value_parser = clap::value_parser!(u32).range(2..))]
    front_moves: u32,
    /// Fail when the client pauses longer than this for any migration (completed or rolled
    /// back), or when a figure is missing. The default is generous (about ten times a typical
    /// pause here, for a shared and noisy machine) yet below the ~1.5 s a dumped server used
    /// to wait for init to reap it.
    #[arg(long, value_name = "MS", default_value_t = 1500,
          value_parser = clap::value_parser!(u64).range(1..))]
    max_pause_ms: u64,
}

fn control_cmd(bin: &Path, state: &Path, images: &Path, name: &str) -> Command {
    let mut c = Command::new(bin.join("control"));
    c.arg("--state-dir")
        .arg(state)
        .arg("--images-dir")
        .arg(images)
        .args(["--name", name])
        .args(["--log", "warn"]);
    c
}

/// What a scenario runs and what it must show.
struct Scenario<'a> {
    title: &'a str,
    name: &'a str,
    args: Vec<String>,
    /// Migrations reported.
    moves: usize,
    /// Of them rolled back.
    rollbacks: usize,
}

/// The scenarios, in the order they run.
fn scenarios(opts: &Options) -> Vec<Scenario<'static>> {
    let pause = opts.max_pause_ms.to_string();
    let mut v = vec![Scenario {
        title: "migrate A -> B -> A (control run: one process)",
        name: NAMES[0],
        args: vec![
            "--moves".into(),
            opts.moves.to_string(),
            "--max-pause-ms".into(),
            pause.clone(),
        ],
        moves: opts.moves as usize,
        rollbacks: 0,
    }];
    if !opts.no_by_hand {
        v.push(Scenario {
            title: "migrate A -> B -> A by hand (control up, then each control migrate as its \
                    own process)",
            name: NAMES[2],
            args: vec![
                "--moves".into(),
                "2".into(),
                "--route".into(),
                "by-hand".into(),
                "--max-pause-ms".into(),
                pause.clone(),
            ],
            moves: 2,
            rollbacks: 0,
        });
    }
    if !opts.no_interrupt {
        v.push(Scenario {
            title: "interrupted by hand, A -> B each time: control migrate killed (SIGKILL) after \
                    the announce, during the dump, after the dump (each rolled back by control \
                    recover: the server serves in A again), during the restore (recovered \
                    forward: the server serves in B); then B -> A with SIGTERM after the \
                    announce (rolled back: B goes on), then B -> A",
            name: NAMES[3],
            args: vec![
                "--moves".into(),
                "6".into(),
                "--route".into(),
                "by-hand".into(),
                "--kill-at".into(),
                "announce,dump,dumped,restore,sigterm-announce,-".into(),
                "--max-pause-ms".into(),
                pause.clone(),
            ],
            moves: 6,
            rollbacks: 4,
        });
    }
    if !opts.no_rollback {
        v.push(Scenario {
            title: "image sets sealed through migration-wire: A -> B; B -> A with the restore \
                    failing in A (rolled back: restored in B again); B -> A with the dump \
                    failing (rolled back: B goes on); B -> A",
            name: NAMES[1],
            args: [
                "--moves",
                "4",
                "--fail-restore-at",
                "2",
                "--fail-dump-at",
                "3",
                "--transfer",
                "sealed",
                "--max-pause-ms",
                &pause,
            ]
            .map(String::from)
            .to_vec(),
            moves: 4,
            rollbacks: 2,
        });
    }
    v
}

/// One scenario's outcome, as written into e2e-report.json.
#[derive(Debug, serde::Serialize)]
struct ScenarioResult {
    title: String,
    report: Option<RunReport>,
    problems: Vec<String>,
}

/// The whole run, as written into e2e-report.json.
#[derive(Debug, serde::Serialize)]
struct E2eReport {
    machine: String,
    elapsed_s: f64,
    max_pause_ms: u64,
    scenarios: Vec<ScenarioResult>,
    /// The stable-address scenario.
    front: Option<crate::front_e2e::FrontSummary>,
    /// The unmodified server and client behind a front.
    plain: Option<crate::front_e2e::FrontSummary>,
    /// The same with aioquic's echo server.
    aioquic_server: Option<crate::front_e2e::FrontSummary>,
    /// aioquic's HTTP/3 download from the example file server, behind a front.
    h3: Option<crate::front_e2e::H3Summary>,
    failures: Vec<String>,
}

pub(crate) fn run(root: &Path, opts: &Options) -> Result<()> {
    let started = Instant::now();
    if !crate::setup::is_root() {
        bail!("e2e-migrate needs root (podman rootful, criu, network namespaces)");
    }
    println!("e2e: building release binaries (swrapper, cwrapper, control)...");
    let status = Command::new(crate::cargo())
        .args([
            "build",
            "--release",
            "-p",
            "swrapper",
            "-p",
            "cwrapper",
            "-p",
            "control",
            "-p",
            "plain-quic",
            // The HTTP/3 file server of the stable-address scenario. With a target selection
            // (`--example`), cargo builds only what is selected: `--bins` keeps the binaries.
            "-p",
            "app-examples",
            "--bins",
            "--example",
            "h3_file_server",
        ])
        .current_dir(root)
        .status()
        .context("starting cargo build")?;
    if !status.success() {
        bail!("building the release binaries failed");
    }
    println!("e2e: checking podman, runc and CRIU (installing what is missing)...");
    crate::setup::ensure(root)?;

    let paths = Paths::new(root);
    let out_dir = &paths.out_dir;
    std::fs::create_dir_all(out_dir)?;

    let scenarios = scenarios(opts);
    let mut results = Vec::new();
    let mut failures = Vec::new();
    for (i, sc) in scenarios.iter().enumerate() {
        println!(
            "\ne2e: scenario {} of {}: {} (about a minute)",
            i + 1,
            scenarios.len(),
            sc.title
        );
        let report_path = out_dir.join(format!("scenario-{}.json", i + 1));
        let _ = std::fs::remove_file(&report_path);
        let status = crate::limit::status(
            paths
                .control(sc.name)
                .arg("run")
                .args(&sc.args)
                .arg("--preserve")
                .arg("--run-report")
                .arg(&report_path),
            "control run",
            SCENARIO_LIMIT,
        );
        let report: Option<RunReport> = std::fs::read_to_string(&report_path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
        let mut problems = check(sc, report.as_ref());
        match &status {
            Ok(status) if !status.success() && problems.is_empty() => {
                problems.push(format!("control run exited with {status}"));
            }
            Ok(_) => {}
            Err(e) => problems.insert(0, format!("{e:#}")),
        }
        if !problems.is_empty() {
            println!("\ne2e: scenario {} FAILED:", i + 1);
            for p in &problems {
                println!("  - {p}");
            }
            println!("\ne2e: diagnostics:");
            let _ = crate::limit::status(
                paths.control(sc.name).arg("logs"),
                "control logs",
                HOUSEKEEPING_LIMIT,
            );
            failures.push(format!("scenario {}: {}", i + 1, problems.join("; ")));
        }
        let keep = opts.preserve && i + 1 == scenarios.len();
        if keep {
            println!(
                "e2e: --preserve: kept containers and state in {}",
                paths.state.display()
            );
        } else {
            let down = crate::limit::status(
                paths.control(sc.name).arg("down"),
                "control down",
                HOUSEKEEPING_LIMIT,
            );
            if !down.is_ok_and(|s| s.success()) {
                failures.push(format!("scenario {}: control down failed", i + 1));
            }
        }
        results.push(ScenarioResult {
            title: sc.title.to_owned(),
            report,
            problems,
        });
        if !failures.is_empty() {
            break;
        }
    }

    let mut front = None;
    if failures.is_empty() && !opts.no_front {
        println!(
            "\ne2e: stable-address scenario: a client in its own namespace, the server moved \
             {} times behind one front address (control up --front), alternately holding the \
             datagrams of the freeze and not",
            opts.front_moves
        );
        let control = || paths.control(crate::front_e2e::NAME);
        match crate::front_e2e::run_scenario(
            &control,
            &paths.bin,
            &paths.state,
            out_dir,
            opts.front_moves,
        ) {
            Ok(s) => {
                for (i, m) in s.moves.iter().enumerate() {
                    println!(
                        "e2e: front move {}: {} hold, freeze {} ms, client pause {} ms",
                        i + 1,
                        if m.hold { "with" } else { "without" },
                        m.freeze_ms.map_or("-".into(), |v| format!("{v:.1}")),
                        m.pause_ms.map_or("-".into(), |v| format!("{v:.1}")),
                    );
                }
                front = Some(s);
            }
            Err(e) => {
                println!("\ne2e: the stable-address scenario FAILED: {e:#}");
                let _ = crate::limit::status(
                    paths.control(crate::front_e2e::NAME).arg("logs"),
                    "control logs",
                    HOUSEKEEPING_LIMIT,
                );
                failures.push(format!("stable-address scenario: {e:#}"));
            }
        }
    }
    let mut plain = None;
    let mut aioquic_server = None;
    for (server, name, what, slot) in [
        (
            crate::front_e2e::PlainServer::Quinn,
            crate::front_e2e::PLAIN_NAME,
            "plain-echo-server (plain quinn)",
            &mut plain,
        ),
        (
            crate::front_e2e::PlainServer::Aioquic,
            crate::front_e2e::AIOQUIC_NAME,
            "aioquic's echo server (Python, another QUIC stack)",
            &mut aioquic_server,
        ),
    ] {
        if !failures.is_empty() || opts.no_front {
            break;
        }
        println!(
            "\ne2e: unmodified server and clients: {what} started by control up --front ... -- \
             COMMAND; plain-echo-client (quinn, no shim) and aioquic's echo client in their own \
             namespace; {} moves, alternately holding and not",
            opts.front_moves
        );
        let control = || paths.control(name);
        match crate::front_e2e::run_plain_scenario(
            root,
            &control,
            (&paths.bin, &paths.state, out_dir),
            opts.front_moves,
            server,
        ) {
            Ok(s) => {
                for (i, m) in s.moves.iter().enumerate() {
                    println!(
                        "e2e: unmodified move {}: {} hold, freeze {} ms, client pause {} ms \
                         (quinn), {} ms (aioquic)",
                        i + 1,
                        if m.hold { "with" } else { "without" },
                        m.freeze_ms.map_or("-".into(), |v| format!("{v:.1}")),
                        m.pause_ms.map_or("-".into(), |v| format!("{v:.1}")),
                        s.aioquic_pauses_ms
                            .get(i)
                            .copied()
                            .flatten()
                            .map_or("-".into(), |v| format!("{v:.1}")),
                    );
                }
                *slot = Some(s);
            }
            Err(e) => {
                println!("\ne2e: the unmodified-server scenario ({what}) FAILED: {e:#}");
                let _ = crate::limit::status(
                    paths.control(name).arg("logs"),
                    "control logs",
                    HOUSEKEEPING_LIMIT,
                );
                failures.push(format!("unmodified-server scenario ({what}): {e:#}"));
            }
        }
    }
    let mut h3 = None;
    if failures.is_empty() && !opts.no_front {
        println!(
            "\ne2e: HTTP/3: the example file server (h3 + h3-quinn on the swrapper library) \
             started by control up --front ... -- COMMAND; aioquic's HTTP/3 client downloads a \
             {} MiB file while the server moves A -> B -> A",
            crate::front_e2e::H3_FILE_MIB
        );
        let control = || paths.control(crate::front_e2e::H3_NAME);
        match crate::front_e2e::run_h3_scenario(root, &control, &paths.bin, &paths.state, out_dir) {
            Ok(s) => {
                for (i, m) in s.moves.iter().enumerate() {
                    println!(
                        "e2e: HTTP/3 move {}: freeze {} ms, longest gap in the body {} ms",
                        i + 1,
                        m.freeze_ms.map_or("-".into(), |v| format!("{v:.1}")),
                        m.pause_ms.map_or("-".into(), |v| format!("{v:.1}")),
                    );
                }
                println!(
                    "e2e: HTTP/3: {} bytes in {:.1} s, digest verified, {} handshake (client), \
                     {} (server)",
                    s.bytes, s.seconds, s.client_handshakes, s.server_handshakes
                );
                h3 = Some(s);
            }
            Err(e) => {
                println!("\ne2e: the HTTP/3 scenario FAILED: {e:#}");
                let _ = crate::limit::status(
                    paths.control(crate::front_e2e::H3_NAME).arg("logs"),
                    "control logs",
                    HOUSEKEEPING_LIMIT,
                );
                failures.push(format!("HTTP/3 scenario: {e:#}"));
            }
        }
    }
    let combined = E2eReport {
        machine: crate::bench::machine(),
        elapsed_s: started.elapsed().as_secs_f64(),
        max_pause_ms: opts.max_pause_ms,
        scenarios: results,
        front,
        plain,
        aioquic_server,
        h3,
        failures,
    };
    let report_path = out_dir.join("e2e-report.json");
    std::fs::write(&report_path, serde_json::to_string_pretty(&combined)?)?;
    let summary = render(&combined);
    println!("\n{summary}");
    println!("e2e: report written to {}", report_path.display());
    if opts.write_benchmarks && combined.failures.is_empty() {
        let path = root.join("BENCHMARKS.md");
        let old = std::fs::read_to_string(&path).unwrap_or_default();
        std::fs::write(
            &path,
            crate::bench::splice_between(&old, BEGIN, END, &summary),
        )?;
        println!("e2e: wrote the figures into {}", path.display());
    }
    if !combined.failures.is_empty() {
        bail!("e2e-migrate failed:\n{}", combined.failures.join("\n"));
    }
    println!(
        "e2e-migrate: all checks passed in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// What the scenario must show, beyond the problems `control run` found itself (the client's
/// real peer after each move, handshakes and connections on both sides, pauses within the
/// bound, every figure present; see control's report.rs).
fn check(sc: &Scenario<'_>, report: Option<&RunReport>) -> Vec<String> {
    let Some(report) = report else {
        return vec!["control run wrote no report".to_owned()];
    };
    let mut problems = report.problems.clone();
    let rows = &report.summary.rows;
    if rows.len() != sc.moves {
        problems.push(format!(
            "{} migrations reported, expected {}",
            rows.len(),
            sc.moves
        ));
    }
    let rolled_back = rows
        .iter()
        .filter(|r| r.result == MoveResult::RolledBack)
        .count();
    if rolled_back != sc.rollbacks {
        problems.push(format!(
            "{rolled_back} migrations rolled back, expected {}",
            sc.rollbacks
        ));
    }
    // There and back, as observed: the restored process's network namespace and the address
    // the client last heard the server from both changed between consecutive completed moves.
    let completed: Vec<_> = report
        .migrations
        .iter()
        .filter(|m| m.result == MoveResult::Completed)
        .collect();
    for pair in completed.windows(2) {
        let ns = |m: &admin_api::MoveReport| m.placement.as_ref().map(|p| p.netns_inode);
        if ns(pair[0]).is_none() || ns(pair[0]) == ns(pair[1]) {
            problems.push(format!(
                "migrations {} and {} restored the server into the same network namespace \
                 ({:?})",
                pair[0].migration_id,
                pair[1].migration_id,
                ns(pair[0])
            ));
        }
    }
    let peers: Vec<Option<std::net::SocketAddr>> = rows
        .iter()
        .filter(|r| r.result == MoveResult::Completed)
        .map(|r| r.client_peer_after)
        .collect();
    for pair in peers.windows(2) {
        if pair[0].is_none() || pair[0] == pair[1] {
            problems.push(format!(
                "the client heard the server from {:?} after two consecutive moves: not there \
                 and back",
                pair[0]
            ));
        }
    }
    match &report.client {
        None => problems.push("the client wrote no report".to_owned()),
        Some(c) => {
            if c.echoes < 50 {
                problems.push(format!("only {} echoes", c.echoes));
            }
        }
    }
    problems.sort();
    problems.dedup();
    problems
}

fn render_front(s: &mut String, title: &str, front: &crate::front_e2e::FrontSummary) {
    let f = |v: Option<f64>| v.map_or("-".to_owned(), |x| format!("{x:.1}"));
    let _ = writeln!(s, "{title}\n");
    let _ = writeln!(s, "| # | hold | freeze ms | client pause ms |");
    let _ = writeln!(s, "|---|---|---|---|");
    for (i, m) in front.moves.iter().enumerate() {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} |",
            i + 1,
            if m.hold { "yes" } else { "no" },
            f(m.freeze_ms),
            f(m.pause_ms)
        );
    }
    let over = |hold: bool| {
        crate::front_e2e::median(
            front
                .moves
                .iter()
                .filter(|m| m.hold == hold)
                .filter_map(|m| Some(m.pause_ms? - m.freeze_ms?))
                .collect(),
        )
    };
    let _ = writeln!(
        s,
        "\nMedian recovery overhead (client pause minus freeze): {} ms with holding, {} ms \
         without. Client: {} handshake, {} echoes.\n",
        f(over(true)),
        f(over(false)),
        front.client_handshakes,
        front.echoes
    );
    if !front.aioquic_pauses_ms.is_empty() {
        let pauses: Vec<String> = front.aioquic_pauses_ms.iter().map(|p| f(*p)).collect();
        let _ = writeln!(
            s,
            "An aioquic client (Python, another QUIC stack) echoed through the same front at \
             the same time: pauses {} ms at the moves, one connection, {} echoes.\n",
            pauses.join(" / "),
            front.aioquic_echoes
        );
    }
}

/// The target of the stable-address mode: with holding, the median of (client pause - freeze)
/// at most this.
const HOLD_OVERHEAD_TARGET_MS: f64 = 5.0;

/// One line of the comparison: a client, a mode, and its (freeze, pause) per move.
struct OverheadRow {
    client: &'static str,
    mode: &'static str,
    moves: Vec<(f64, f64)>,
    target: bool,
}

/// The client's pause against the freeze by mode, in the same run: the unmodified clients
/// behind a front with and without holding, cwrapper behind a front, and cwrapper in the
/// announce mode (the first scenario).
fn render_overheads(s: &mut String, combined: &E2eReport) {
    use crate::front_e2e::median;
    let mut rows = Vec::new();
    // The target is the unmodified clients' (cwrapper behind a front is shown beside them).
    let front_rows = |client: &'static str, summary: &crate::front_e2e::FrontSummary, aioquic| {
        let unmodified = client != "cwrapper";
        [(true, "front, holding"), (false, "front, no holding")].map(|(hold, mode)| {
            let moves = summary
                .moves
                .iter()
                .enumerate()
                .filter(|(_, m)| m.hold == hold)
                .filter_map(|(i, m)| {
                    let pause = if aioquic {
                        summary.aioquic_pauses_ms.get(i).copied().flatten()
                    } else {
                        m.pause_ms
                    };
                    Some((m.freeze_ms?, pause?))
                })
                .collect();
            OverheadRow {
                client,
                mode,
                moves,
                target: hold && unmodified,
            }
        })
    };
    if let Some(plain) = &combined.plain {
        rows.extend(front_rows("plain quinn (unmodified)", plain, false));
        rows.extend(front_rows("aioquic echo (unmodified)", plain, true));
    }
    if let Some(aioquic) = &combined.aioquic_server {
        rows.extend(front_rows("plain quinn -> aioquic server", aioquic, false));
        rows.extend(front_rows("aioquic echo -> aioquic server", aioquic, true));
    }
    if let Some(h3) = &combined.h3 {
        rows.push(OverheadRow {
            client: "aioquic HTTP/3 download (unmodified)",
            // The body comes in 64 KiB steps every 7.8 ms: a gap may hold one step more.
            mode: "front, holding (paced body: the gap may include one 7.8 ms step)",
            moves: h3
                .moves
                .iter()
                .filter_map(|m| Some((m.freeze_ms?, m.pause_ms?)))
                .collect(),
            target: false,
        });
    }
    if let Some(front) = &combined.front {
        rows.extend(front_rows("cwrapper", front, false));
    }
    if let Some(r) = combined.scenarios.first().and_then(|sc| sc.report.as_ref()) {
        rows.push(OverheadRow {
            client: "cwrapper",
            mode: "announce (its shim swaps the address)",
            moves: r
                .summary
                .rows
                .iter()
                .filter(|row| row.result == admin_api::report::MoveResult::Completed)
                .filter_map(|row| Some((row.freeze_ms?, row.client_downtime_ms?)))
                .collect(),
            target: false,
        });
    }
    if rows.is_empty() {
        return;
    }
    let f = |v: Option<f64>| v.map_or("-".to_owned(), |x| format!("{x:.1}"));
    let _ = writeln!(
        s,
        "Client pause against the freeze, by client and mode (this run; medians over its \
         moves; recovery overhead = pause - freeze, per move; target with holding: <= \
         {HOLD_OVERHEAD_TARGET_MS} ms)\n"
    );
    let _ = writeln!(
        s,
        "| client | mode | moves | freeze ms | pause ms | overhead ms | target |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|");
    for row in rows {
        let overhead = median(row.moves.iter().map(|(fr, p)| p - fr).collect());
        let verdict = match (row.target, overhead) {
            (false, _) => "as measured".to_owned(),
            (true, None) => "no figure".to_owned(),
            (true, Some(o)) if o <= HOLD_OVERHEAD_TARGET_MS => "MET".to_owned(),
            (true, Some(_)) => "MISSED".to_owned(),
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {verdict} |",
            row.client,
            row.mode,
            row.moves.len(),
            f(median(row.moves.iter().map(|m| m.0).collect())),
            f(median(row.moves.iter().map(|m| m.1).collect())),
            f(overhead),
        );
    }
    let _ = writeln!(s);
}

fn render(combined: &E2eReport) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "End-to-end migration (`cargo xtask e2e-migrate`)\n");
    let _ = writeln!(s, "Machine: {}\n", combined.machine);
    let f = |v: Option<f64>| v.map_or("-".to_owned(), |x| format!("{x:.1}"));
    for sc in &combined.scenarios {
        let _ = writeln!(s, "Scenario: {}\n", sc.title);
        let Some(r) = &sc.report else {
            let _ = writeln!(s, "(no report)\n");
            continue;
        };
        let sum = &r.summary;
        let _ = writeln!(
            s,
            "| # | from | to | result | freeze ms | dump ms (criu start-up) | restore ms (criu start-up) | image KiB | client pause ms |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|");
        for (i, row) in sum.rows.iter().enumerate() {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} ({}) | {} ({}) | {} | {} |",
                i + 1,
                row.from,
                row.to,
                row.result,
                f(row.freeze_ms),
                f(row.dump_ms),
                f(row.dump_criu_startup_ms),
                f(row.restore_ms),
                f(row.restore_criu_startup_ms),
                row.image_bytes
                    .map_or("-".into(), |b| (b / 1024).to_string()),
                f(row.client_downtime_ms),
            );
        }
        let _ = writeln!(
            s,
            "\nMedians over completed moves: client pause {} ms, freeze {} ms (dump {} ms, \
             restore {} ms; criu start-up {} ms + {} ms). Client: {} echoes, verified: {}.\n",
            f(sum.client_downtime_median_ms),
            f(sum.freeze_median_ms),
            f(sum.dump_median_ms),
            f(sum.restore_median_ms),
            f(sum.dump_criu_startup_median_ms),
            f(sum.restore_criu_startup_median_ms),
            sum.echoes,
            sum.client_verified,
        );
        for p in &sc.problems {
            let _ = writeln!(s, "- PROBLEM: {p}");
        }
    }
    if let Some(front) = &combined.front {
        render_front(
            &mut s,
            "Scenario: stable service address (`control up --front`): a client (cwrapper) in \
             its own network namespace keeps one connection to one front address while the \
             server moves behind it, alternately with and without holding the datagrams that \
             arrive during the freeze",
            front,
        );
    }
    if let Some(plain) = &combined.plain {
        render_front(
            &mut s,
            "Scenario: unmodified server and client behind a front (`control up --front ... -- \
             plain-echo-server`, plain quinn on both sides, no shim, no control stream): \
             echoes every 5 ms over one connection, alternately with and without holding",
            plain,
        );
    }
    if let Some(aioquic) = &combined.aioquic_server {
        render_front(
            &mut s,
            "Scenario: aioquic's echo server (Python, unmodified) behind a front (`control up \
             --front ... -- python aioquic_echo_server.py`), the same two unmodified clients",
            aioquic,
        );
    }
    render_overheads(&mut s, combined);
    if let Some(h3) = &combined.h3 {
        let gaps: Vec<String> = h3.moves.iter().map(|m| f(m.pause_ms)).collect();
        let freezes: Vec<String> = h3.moves.iter().map(|m| f(m.freeze_ms)).collect();
        let _ = writeln!(
            s,
            "Scenario: HTTP/3 download behind a front (`control up --front ... -- \
             h3_file_server`, the example h3 + h3-quinn server on the swrapper library; \
             aioquic's HTTP/3 client, unmodified): {} MiB paced at 8 MiB/s, the server moved A \
             -> B -> A with holding during it. Freeze {} ms; longest gap in the body {} ms; \
             {:.1} s in all; digest verified; handshakes: {} (client), {} (server).\n",
            h3.bytes >> 20,
            freezes.join(" / "),
            gaps.join(" / "),
            h3.seconds,
            h3.client_handshakes,
            h3.server_handshakes
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sc(moves: usize, rollbacks: usize) -> Scenario<'static> {
        Scenario {
            title: "t",
            name: "n",
            args: vec![],
            moves,
            rollbacks,
        }
    }

    /// A migration report as control writes it: the restored process in namespace `ns`.
    fn migration(n: u8, result: &str, ns: u64) -> serde_json::Value {
        let id = format!("{n:02x}").repeat(16);
        json!({
            "migration_id": id, "from": "qlm-a", "to": "qlm-b",
            "target_addr": "127.0.0.1:5243", "source_addr": "127.0.0.1:5242",
            "result": result, "dirty_tracking": false, "predump_rounds": [],
            "placement": { "pid": 7, "netns_inode": ns, "expected_netns_inode": ns,
                           "expected_container": "qlm-b" },
            "wall_ms": 200.0,
            "timeline": { "migration_id": id, "final_phase": "completed",
                          "created_at": 0, "phases": [] },
        })
    }

    fn row(n: u8, result: &str, peer: &str) -> serde_json::Value {
        json!({ "id": format!("{n:02x}").repeat(16), "from": "qlm-a", "to": "qlm-b",
                "result": result, "freeze_ms": 96.4, "dump_ms": 52.1,
                "dump_criu_startup_ms": 37.6, "restore_ms": 43.3,
                "restore_criu_startup_ms": 30.2, "image_bytes": 779264,
                "client_downtime_ms": 100.9, "server_handshakes": 1,
                "client_peer_after": peer, "expected_peer": peer })
    }

    fn report(migrations: Vec<serde_json::Value>, rows: Vec<serde_json::Value>) -> RunReport {
        let v = json!({
            "route": "run",
            "summary": { "rows": rows, "completed": 2, "client_downtime_median_ms": 100.9,
                         "freeze_median_ms": 96.4, "dump_median_ms": null,
                         "restore_median_ms": null, "dump_criu_startup_median_ms": null,
                         "restore_criu_startup_median_ms": null, "echoes": 300,
                         "client_verified": true },
            "migrations": migrations,
            "client": { "target": "127.0.0.1:5242", "stable_id": 1, "connections": 1,
                        "handshakes": 1, "echoes": 300, "failed_attempts": 0, "migrations": [],
                        "control": "open", "foreign_datagrams_dropped": 0, "verified": true,
                        "error": null },
            "client_exit": 0,
            "problems": [],
        });
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn a_good_report_passes() {
        let r = report(
            vec![migration(1, "completed", 11), migration(2, "completed", 12)],
            vec![
                row(1, "completed", "127.0.0.1:5243"),
                row(2, "completed", "127.0.0.1:5242"),
            ],
        );
        assert_eq!(check(&sc(2, 0), Some(&r)), Vec::<String>::new());
    }

    #[test]
    fn a_restore_into_the_same_namespace_is_not_there_and_back() {
        // Both moves came back in one namespace and the client heard the server from one
        // address: the labels may say A -> B -> A, the world says otherwise.
        let r = report(
            vec![migration(1, "completed", 11), migration(2, "completed", 11)],
            vec![
                row(1, "completed", "127.0.0.1:5242"),
                row(2, "completed", "127.0.0.1:5242"),
            ],
        );
        let p = check(&sc(2, 0), Some(&r)).join("\n");
        assert!(p.contains("same network namespace"), "{p}");
        assert!(p.contains("not there and back"), "{p}");
    }

    #[test]
    fn counts_problems_and_a_missing_report_are_reported() {
        let mut r = report(
            vec![migration(1, "completed", 11)],
            vec![row(1, "completed", "127.0.0.1:5243")],
        );
        r.problems
            .push("the client made 2 handshakes, expected 1".into());
        if let Some(c) = &mut r.client {
            c.echoes = 3;
        }
        let p = check(&sc(3, 1), Some(&r)).join("\n");
        for needle in [
            "2 handshakes",
            "1 migrations reported, expected 3",
            "0 migrations rolled back, expected 1",
            "only 3 echoes",
        ] {
            assert!(p.contains(needle), "missing {needle}: {p}");
        }
        assert_eq!(check(&sc(2, 0), None), vec!["control run wrote no report"]);
    }

    fn options(args: &str) -> Result<Options, clap::Error> {
        #[derive(Debug, clap::Parser)]
        struct Cli {
            #[command(flatten)]
            o: Options,
        }
        <Cli as clap::Parser>::try_parse_from(std::iter::once("e2e").chain(args.split_whitespace()))
            .map(|c| c.o)
    }

    #[test]
    fn options_parse_and_refuse() {
        let o = options("--moves 4 --preserve").unwrap();
        assert_eq!((o.moves, o.preserve), (4, true));
        let o = options("").unwrap();
        assert_eq!(
            (
                o.moves,
                o.preserve,
                o.write_benchmarks,
                o.no_rollback,
                o.no_by_hand
            ),
            (2, false, false, false, false)
        );
        assert_eq!(o.max_pause_ms, 1500);
        assert_eq!(scenarios(&o).len(), 4);
        let o = options(
            "--write-benchmarks --no-rollback --no-by-hand --no-interrupt --max-pause-ms 300",
        )
        .unwrap();
        assert!(o.write_benchmarks && o.no_rollback && o.no_by_hand && o.no_interrupt);
        let sc = scenarios(&o);
        assert_eq!(sc.len(), 1);
        assert!(
            sc[0]
                .args
                .windows(2)
                .any(|w| w == ["--max-pause-ms", "300"])
        );
        for bad in [
            "--moves 1",
            "--moves",
            "--moves x",
            "--bogus",
            "extra",
            "--max-pause-ms 0",
            "--max-pause-ms x",
        ] {
            let err = options(bad).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{bad}: {err}");
        }
    }

    #[test]
    fn the_rollback_title_says_the_direction_it_takes() {
        let o = options("").unwrap();
        let rb = scenarios(&o)
            .into_iter()
            .find(|s| s.name == NAMES[1])
            .unwrap();
        assert!(
            rb.title.contains("B -> A with the restore failing in A"),
            "{}",
            rb.title
        );
        assert!(rb.title.contains("restored in B again"), "{}", rb.title);
    }

    #[test]
    fn render_shows_the_rows_and_medians() {
        let combined = E2eReport {
            machine: "m".into(),
            elapsed_s: 1.0,
            max_pause_ms: 1000,
            scenarios: vec![ScenarioResult {
                title: "t".into(),
                report: Some(report(
                    vec![migration(1, "completed", 11)],
                    vec![row(1, "completed", "127.0.0.1:5243")],
                )),
                problems: vec![],
            }],
            front: Some(crate::front_e2e::FrontSummary {
                moves: vec![
                    crate::front_e2e::FrontMove {
                        hold: true,
                        freeze_ms: Some(70.0),
                        pause_ms: Some(75.5),
                        handshakes: Some(1),
                    },
                    crate::front_e2e::FrontMove {
                        hold: false,
                        freeze_ms: Some(60.0),
                        pause_ms: Some(170.0),
                        handshakes: Some(1),
                    },
                ],
                client_handshakes: 1,
                echoes: 10,
                aioquic_pauses_ms: Vec::new(),
                aioquic_echoes: 0,
            }),
            plain: Some(crate::front_e2e::FrontSummary {
                moves: vec![crate::front_e2e::FrontMove {
                    hold: true,
                    freeze_ms: Some(50.0),
                    pause_ms: Some(49.0),
                    handshakes: Some(2),
                }],
                client_handshakes: 1,
                echoes: 10,
                aioquic_pauses_ms: vec![Some(58.0)],
                aioquic_echoes: 9,
            }),
            aioquic_server: None,
            h3: Some(crate::front_e2e::H3Summary {
                moves: vec![crate::front_e2e::FrontMove {
                    hold: true,
                    freeze_ms: Some(80.0),
                    pause_ms: Some(91.25),
                    handshakes: Some(1),
                }],
                bytes: 64 << 20,
                seconds: 8.3,
                server_handshakes: 1,
                client_handshakes: 1,
            }),
            failures: vec![],
        };
        let s = render(&combined);
        assert!(
            s.contains("64 MiB paced at 8 MiB/s") && s.contains("longest gap in the body 91.2 ms"),
            "{s}"
        );
        // The target is judged for the unmodified clients with holding: met at -1 ms, missed
        // at 8 ms.
        assert!(
            s.contains(
                "| plain quinn (unmodified) | front, holding | 1 | 50.0 | 49.0 | -1.0 | MET |"
            ),
            "{s}"
        );
        assert!(
            s.contains(
                "| aioquic echo (unmodified) | front, holding | 1 | 50.0 | 58.0 | 8.0 | MISSED |"
            ),
            "{s}"
        );
        // The comparison: cwrapper behind the front (not an unmodified client: as measured),
        // without holding as measured, the HTTP/3 download as measured (its body is paced).
        assert!(
            s.contains("| cwrapper | front, holding | 1 | 70.0 | 75.5 | 5.5 | as measured |"),
            "{s}"
        );
        assert!(
            s.contains("| cwrapper | front, no holding | 1 | 60.0 | 170.0 | 110.0 | as measured |"),
            "{s}"
        );
        assert!(
            s.contains("step) | 1 | 80.0 | 91.2 | 11.2 | as measured |"),
            "{s}"
        );
        assert!(
            s.contains(
                "| 1 | qlm-a | qlm-b | completed | 96.4 | 52.1 (37.6) | 43.3 (30.2) | 761 | 100.9 |"
            ),
            "{s}"
        );
        assert!(s.contains("client pause 100.9 ms"), "{s}");
        assert!(s.contains("| 2 | no | 60.0 | 170.0 |"), "{s}");
        assert!(s.contains("5.5 ms with holding, 110.0 ms without"), "{s}");
    }
}
