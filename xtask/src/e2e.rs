//! `cargo xtask e2e-migrate`: the whole flow for real: release binaries, set-up, podman
//! containers A and B, the demo client, CRIU migrations A -> B -> A, and a scenario whose
//! restore is made to fail so that the rollback is proven.
//!
//! xtask prepares and tears down; `control run` drives each scenario and checks what it can see
//! (its report lists problems); this file adds the cross-scenario checks, prints the summary,
//! writes the JSON report and, on failure, the diagnostics.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

const BEGIN: &str = "<!-- xtask e2e-migrate: generated section begins -->";
const END: &str = "<!-- xtask e2e-migrate: generated section ends -->";

/// The container-name prefixes of the two scenarios (`control --name`).
const NAMES: [&str; 2] = ["qlm-e2e", "qlm-e2e-rb"];
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
    for name in NAMES {
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

struct Scenario<'a> {
    title: &'a str,
    name: &'a str,
    args: Vec<String>,
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

    let mut scenarios = vec![Scenario {
        title: "migrate A -> B -> A",
        name: NAMES[0],
        args: vec!["--moves".into(), opts.moves.to_string()],
    }];
    if !opts.no_rollback {
        scenarios.push(Scenario {
            title: "image sets sealed through migration-wire; restore fails in B (rollback: \
                    restored in A again), dump fails (rollback: A goes on), then moves on",
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
            ]
            .map(String::from)
            .to_vec(),
        });
    }

    let mut results = Vec::new();
    let mut failures = Vec::new();
    for (i, sc) in scenarios.iter().enumerate() {
        println!("\ne2e: scenario {}: {}", i + 1, sc.title);
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
        let report: Value = std::fs::read_to_string(&report_path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(Value::Null);
        let mut problems = check(sc, &report);
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
        results.push(json!({ "title": sc.title, "report": report, "problems": problems }));
        if !failures.is_empty() {
            break;
        }
    }

    let combined = json!({
        "machine": crate::bench::machine(),
        "elapsed_s": started.elapsed().as_secs_f64(),
        "scenarios": results,
        "failures": failures,
    });
    let report_path = out_dir.join("e2e-report.json");
    std::fs::write(&report_path, serde_json::to_string_pretty(&combined)?)?;
    let summary = render(&combined);
    println!("\n{summary}");
    println!("e2e: report written to {}", report_path.display());
    if opts.write_benchmarks && failures.is_empty() {
        let path = root.join("BENCHMARKS.md");
        let old = std::fs::read_to_string(&path).unwrap_or_default();
        std::fs::write(
            &path,
            crate::bench::splice_between(&old, BEGIN, END, &summary),
        )?;
        println!("e2e: wrote the figures into {}", path.display());
    }
    if !failures.is_empty() {
        bail!("e2e-migrate failed:\n{}", failures.join("\n"));
    }
    println!(
        "e2e-migrate: all checks passed in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// What the scenario must show, beyond the problems `control run` found itself.
fn check(sc: &Scenario<'_>, report: &Value) -> Vec<String> {
    let mut problems: Vec<String> = report["problems"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p.as_str().map(str::to_owned))
        .collect();
    if report.is_null() {
        problems.push("control run wrote no report".to_owned());
        return problems;
    }
    let rows = report["summary"]["rows"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let expected: usize = sc
        .args
        .windows(2)
        .find(|w| w[0] == "--moves")
        .and_then(|w| w[1].parse().ok())
        .unwrap_or(0);
    if rows.len() != expected {
        problems.push(format!(
            "{} migrations reported, expected {expected}",
            rows.len()
        ));
    }
    let rolled_back = rows.iter().filter(|r| r["result"] == "rolled_back").count();
    let wants_rollback = sc
        .args
        .iter()
        .filter(|a| a.as_str() == "--fail-restore-at" || a.as_str() == "--fail-dump-at")
        .count();
    if rolled_back != wants_rollback {
        problems.push(format!(
            "{rolled_back} migrations rolled back, expected {wants_rollback}"
        ));
    }
    // Both directions were exercised by completed moves, the second from a restored process.
    let dirs: Vec<(String, String)> = rows
        .iter()
        .filter(|r| r["result"] == "completed")
        .map(|r| (r["from"].to_string(), r["to"].to_string()))
        .collect();
    if dirs.len() >= 2 && dirs[0].0 != dirs[1].1 {
        problems.push(format!("the moves did not go there and back: {dirs:?}"));
    }
    let client = &report["client"];
    if client["connections"] != 1 {
        problems.push(format!(
            "the client made {} connections",
            client["connections"]
        ));
    }
    if client["echoes"].as_u64().unwrap_or(0) < 50 {
        problems.push(format!("only {} echoes", client["echoes"]));
    }
    problems.sort();
    problems.dedup();
    problems
}

fn render(combined: &Value) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "End-to-end migration (`cargo xtask e2e-migrate`)\n");
    let _ = writeln!(
        s,
        "Machine: {}\n",
        combined["machine"].as_str().unwrap_or("?")
    );
    let f = |v: &Value| v.as_f64().map_or("-".to_owned(), |x| format!("{x:.1}"));
    for sc in combined["scenarios"].as_array().into_iter().flatten() {
        let sum = &sc["report"]["summary"];
        let _ = writeln!(s, "Scenario: {}\n", sc["title"].as_str().unwrap_or("?"));
        let _ = writeln!(
            s,
            "| # | from | to | result | freeze ms | dump ms (criu start-up) | restore ms (criu start-up) | image KiB | client downtime ms |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|");
        for (i, r) in sum["rows"].as_array().into_iter().flatten().enumerate() {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} ({}) | {} ({}) | {} | {} |",
                i + 1,
                r["from"].as_str().unwrap_or("?"),
                r["to"].as_str().unwrap_or("?"),
                r["result"].as_str().unwrap_or("?"),
                f(&r["freeze_ms"]),
                f(&r["dump_ms"]),
                f(&r["dump_criu_startup_ms"]),
                f(&r["restore_ms"]),
                f(&r["restore_criu_startup_ms"]),
                r["image_bytes"]
                    .as_u64()
                    .map_or("-".into(), |b| (b / 1024).to_string()),
                f(&r["client_downtime_ms"]),
            );
        }
        let _ = writeln!(
            s,
            "\nMedians over completed moves: client downtime {} ms, freeze {} ms (dump {} ms, \
             restore {} ms; criu start-up {} ms + {} ms). Client: {} echoes, verified: {}.\n",
            f(&sum["client_downtime_median_ms"]),
            f(&sum["freeze_median_ms"]),
            f(&sum["dump_median_ms"]),
            f(&sum["restore_median_ms"]),
            f(&sum["dump_criu_startup_median_ms"]),
            f(&sum["restore_criu_startup_median_ms"]),
            sum["echoes"],
            sum["client_verified"],
        );
        for p in sc["problems"].as_array().into_iter().flatten() {
            let _ = writeln!(s, "- PROBLEM: {}", p.as_str().unwrap_or("?"));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sc(args: &[&str]) -> Scenario<'static> {
        Scenario {
            title: "t",
            name: "n",
            args: args.iter().map(|a| a.to_string()).collect(),
        }
    }

    fn row(from: &str, to: &str, result: &str) -> Value {
        json!({ "from": from, "to": to, "result": result, "client_downtime_ms": 100.0 })
    }

    #[test]
    fn a_good_report_passes_and_a_bad_one_says_why() {
        let good = json!({
            "problems": [],
            "summary": { "rows": [row("a", "b", "completed"), row("b", "a", "completed")] },
            "client": { "connections": 1, "echoes": 300 },
        });
        assert_eq!(check(&sc(&["--moves", "2"]), &good), Vec::<String>::new());
        let bad = json!({
            "problems": ["the client's checks failed: gap"],
            "summary": { "rows": [row("a", "b", "completed"), row("a", "b", "completed")] },
            "client": { "connections": 2, "echoes": 3 },
        });
        let p = check(&sc(&["--moves", "3", "--fail-restore-at", "2"]), &bad);
        let text = p.join("\n");
        for needle in [
            "gap",
            "2 migrations reported, expected 3",
            "0 migrations rolled back",
            "there and back",
            "2 connections",
            "only 3 echoes",
        ] {
            assert!(text.contains(needle), "missing {needle}: {text}");
        }
        assert_eq!(
            check(&sc(&[]), &Value::Null),
            vec!["control run wrote no report"]
        );
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
            (o.moves, o.preserve, o.write_benchmarks, o.no_rollback),
            (2, false, false, false)
        );
        let o = options("--write-benchmarks --no-rollback").unwrap();
        assert!(o.write_benchmarks && o.no_rollback);
        for bad in ["--moves 1", "--moves", "--moves x", "--bogus", "extra"] {
            let err = options(bad).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{bad}: {err}");
        }
    }

    #[test]
    fn render_shows_the_rows_and_medians() {
        let combined = json!({
            "machine": "m",
            "scenarios": [{ "title": "t", "problems": [], "report": { "summary": {
                "rows": [{ "from": "qlm-a", "to": "qlm-b", "result": "completed", "freeze_ms": 96.4,
                           "dump_ms": 52.1, "dump_criu_startup_ms": 37.6, "restore_ms": 43.3,
                           "restore_criu_startup_ms": 30.2, "image_bytes": 779264, "client_downtime_ms": 100.9 }],
                "client_downtime_median_ms": 100.9, "freeze_median_ms": 96.4, "echoes": 10, "client_verified": true,
            }}}],
        });
        let s = render(&combined);
        assert!(
            s.contains(
                "| 1 | qlm-a | qlm-b | completed | 96.4 | 52.1 (37.6) | 43.3 (30.2) | 761 | 100.9 |"
            ),
            "{s}"
        );
        assert!(s.contains("client downtime 100.9 ms"), "{s}");
    }
}
