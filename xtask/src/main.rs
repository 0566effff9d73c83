//! Project automation, run as `cargo xtask <command>` (alias in `.cargo/config.toml`).
//!
//! xtask prepares and checks; the assertions of scenarios live in test binaries. It finds the
//! repository root from `CARGO_MANIFEST_DIR`, keeps few dependencies, and its checks also run as
//! `#[test]`s (see `tidy.rs`). Every command answers `--help`; an unknown command or option is a
//! usage error (exit code 2), as in the project's binaries (clap).

mod bench;
mod bench_migrate;
mod e2e;
mod front_e2e;
mod limit;
mod multihost;
mod setup;
mod shim_cost;
mod tidy;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{CommandFactory, Parser, Subcommand};

/// `cargo xtask`: the project's automation.
#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "The project's automation: checks, benchmarks, set-up and the end-to-end migration.",
    long_about = "The project's automation: checks, benchmarks, set-up and the end-to-end \
                  migration. `cargo xtask <command> --help` explains a command and its options.",
    after_help = "Environment:\n  CI=true   Set by CI; `ci` then also refuses a dirty Cargo.lock \
                  (`--locked`) and requires root, and a test that needs root, podman or CRIU \
                  fails instead of skipping.",
    disable_help_subcommand = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// What CI runs (the README's test command): layering checks, formatting, clippy, as root
    /// the set-up, every test, and as root the end-to-end migration and the small migration
    /// benchmark.
    ///
    /// In order: the layering checks (`tidy`), the formatting check, clippy with -D warnings
    /// on all targets, as root the set-up (`setup --if-needed`: installs podman, runc and CRIU
    /// when missing, so that the tests that need them run), every test of the workspace, and
    /// as root e2e-migrate and bench-migrate --quick. Not root: the set-up, e2e-migrate and
    /// bench-migrate are skipped with a message
    /// (and the tests that need root skip theirs), unless CI=true, where root is required and
    /// ci fails at once. Each step has a time limit (formatting 5 min, set-up 20 min, clippy,
    /// tests and e2e-migrate 30 min each, bench-migrate --quick 20 min, 80 min in all); a step
    /// that overruns is stopped with everything it started, and ci fails naming it.
    Ci,
    /// The main job: release binaries, podman containers A and B, the demo client, CRIU
    /// migrations A -> B -> A from one process and by hand, an interrupt scenario and a
    /// rollback scenario (as root).
    ///
    /// Builds the release binaries, runs `setup` when something is missing, brings podman
    /// containers A and B up, starts the demo client, and runs four scenarios, each with its
    /// own containers: A -> B -> A from one `control run`; the same by hand (`control up`, then
    /// each `control migrate` as its own process); control killed at each phase boundary
    /// (after the announce, during the dump, after it, during the restore) and recovered by
    /// `control recover`, and SIGTERM after the announce; and image sets sealed through
    /// migration-wire with a restore and a dump made to fail (rollbacks). Checks what it can
    /// observe: the restored server's network namespace, which host port answers QUIC, the
    /// client's real peer after every move, one connection and one handshake on both sides,
    /// no echo lost or repeated, every figure present and every pause within --max-pause-ms.
    /// Prints a summary, writes target/e2e/e2e-report.json, exits non-zero when a check
    /// fails, prints diagnostics (server, client, criu and container logs) on failure, and
    /// always cleans up. Needs root.
    E2eMigrate(e2e::Options),
    /// The migration across hosts: three hosts and a client site as network namespaces on a
    /// scenario network, each host with its own agent (`control agent`, mutual-TLS QUIC
    /// between them), private storage and podman; a service with 100 client connections
    /// (several client processes) moved A -> B -> C -> A with sealed image streams; every
    /// failure case of a cross-host move (link cut, corrupted chunk, forged token, restore
    /// failing, target agent killed before and during the restore); a host drained; the
    /// 256 MiB transfer. Prints per-phase timings, bytes (raw, compressed, sealed) and
    /// client downtime percentiles, writes target/e2e-multihost/report.json, always cleans
    /// up. Needs root.
    E2eMultihost(multihost::scenario::Options),
    /// Only the layering and documentation checks (fast; no compilation).
    ///
    /// Reads `cargo metadata` (the manifests and the resolved dependency graph) and the
    /// sources: which crate may depend on what (also through other crates), which text a
    /// crate's sources must not contain, and whether README.md and ARCHITECTURE.md describe
    /// every crate. The same checks run as tests of xtask.
    Tidy,
    /// Runs the criterion benchmarks and writes their medians into BENCHMARKS.md.
    ///
    /// Runs the criterion benchmarks (package migration-benches; this takes several minutes)
    /// and rewrites the generated section of BENCHMARKS.md with the medians and the machine
    /// they came from.
    Bench {
        /// Arguments for criterion, after `--`: e.g. `cargo xtask bench -- seal` runs only
        /// the benchmarks whose name contains `seal`.
        #[arg(last = true, value_name = "CRITERION_ARGS")]
        criterion_args: Vec<String>,
    },
    /// The client's pause at several resident sizes, in every way to move the server, in one
    /// run: figures, targets, JSON and a plot (as root).
    ///
    /// For each resident size (--sizes, MiB of ballast the server holds; 0 is the plain demo
    /// server) and mode: the reconnect baseline (the server restarted in B, a new handshake),
    /// podman's own container checkpoint/restore, the seed's single-phase cold move, two-phase
    /// cold, two-phase post-copy. --moves moves each with a latency client (an echo every ms)
    /// and --bulk-moves more with a bulk stream. Reports median, p95 and max of the client's
    /// pause, the freeze, pause minus freeze, image size, time until every page is resident,
    /// latency while pages arrive and time until the bulk stream is back to 90% of its
    /// goodput, plus handshakes; judges the targets of the issue; writes
    /// bench-migrate.json, bench-migrate.md, machine.txt and pause-vs-size.svg into --out
    /// and, with --write-benchmarks, BENCHMARKS.md. --quick runs a small subset for CI.
    BenchMigrate(bench_migrate::Options),
    /// What the UDP shims cost against quinn's stock socket, in instructions (callgrind).
    ///
    /// Instructions are repeatable where time is not on this noisy machine. Builds the release
    /// binary shim_cost (package migration-benches) and runs each variant (stock, shims,
    /// client_shim, server_shim) under `valgrind --tool=callgrind` with a small and a big
    /// count of 32-byte round trips (200, 1200) and of 256 KiB transfers (20, 120); the
    /// difference per operation cancels the set-up. Prints the table and the ratios against
    /// stock. Needs valgrind.
    ShimCost(shim_cost::Options),
    /// Installs what the end-to-end migration needs: podman, runc, CRIU >= 4.2 (as root).
    ///
    /// On Debian-like systems, as root: podman, runc, netavark, iptables, nftables, iproute2,
    /// nsenter, busybox-static and CRIU >= 4.2 (from Debian sid with its own glibc, in
    /// /opt/quic-live-migrate/criu behind the wrapper /usr/local/sbin/criu; the mirror is read
    /// from the system's apt sources). Skips what is present, then verifies each part and runs
    /// a podman smoke container from a locally imported busybox image (no registry).
    Setup(setup::Options),
    /// Prints this help, or the help of a command.
    Help {
        /// The command to explain.
        command: Option<String>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = project_root();
    match cli.command {
        None | Some(Cmd::Help { command: None }) => {
            Cli::command().print_long_help()?;
            Ok(())
        }
        Some(Cmd::Help {
            command: Some(name),
        }) => command_help(&name),
        Some(Cmd::Ci) => ci(&root),
        Some(Cmd::Tidy) => {
            println!("xtask tidy: layering and documentation checks (cargo metadata, sources)...");
            tidy::run_all(&root)?;
            println!("xtask tidy: all checks passed");
            Ok(())
        }
        Some(Cmd::Bench { criterion_args }) => bench::run(&root, &criterion_args),
        Some(Cmd::E2eMigrate(opts)) => e2e::run(&root, &opts),
        Some(Cmd::E2eMultihost(opts)) => multihost::scenario::run(&root, &opts),
        Some(Cmd::BenchMigrate(opts)) => bench_migrate::run(&root, &opts),
        Some(Cmd::ShimCost(opts)) => shim_cost::run(&root, &opts),
        Some(Cmd::Setup(opts)) if opts.if_needed => setup::ensure(&root),
        Some(Cmd::Setup(opts)) => setup::run(&root, &opts),
    }
}

/// `cargo xtask help <command>`: the long help of one command; an unknown one is a usage
/// error.
fn command_help(name: &str) -> Result<()> {
    let mut cli = Cli::command();
    cli.build();
    let Some(sub) = cli.find_subcommand(name) else {
        cli.error(
            clap::error::ErrorKind::InvalidSubcommand,
            format!("unknown command `{name}`"),
        )
        .exit()
    };
    sub.clone().print_long_help()?;
    Ok(())
}

/// The repository root: xtask lives one level below it.
pub(crate) fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Everything `ci` runs must end within this, well inside CI's own 90 minutes, so that a hang
/// fails with a message naming the step instead of a silent timeout.
const CI_BUDGET: Duration = Duration::from_secs(80 * 60);

/// One step of `ci`: a child process with a time limit.
struct Step {
    name: &'static str,
    /// What the step runs, as printed.
    shown: String,
    cmd: Command,
    minutes: u64,
}

impl Step {
    fn cargo(name: &'static str, args: &[&str], locked: bool, minutes: u64) -> Self {
        let mut args: Vec<&str> = args.to_vec();
        if locked && args[0] != "fmt" {
            args.insert(1, "--locked");
        }
        let mut cmd = Command::new(cargo());
        cmd.args(&args);
        Step {
            name,
            shown: format!("cargo {}", args.join(" ")),
            cmd,
            minutes,
        }
    }
}

fn ci(root: &Path) -> Result<()> {
    let started = Instant::now();
    let deadline = started + CI_BUDGET;
    let locked = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    let root_user = setup::is_root();
    if locked && !root_user {
        bail!(
            "CI=true but not root: CI runs every test, including those that need root, podman \
             and CRIU, and the end-to-end migration; run `cargo xtask ci` as root"
        );
    }
    let mut steps = vec![
        Step::cargo("formatting", &["fmt", "--all", "--", "--check"], locked, 5),
        Step::cargo(
            "clippy",
            &[
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ],
            locked,
            30,
        ),
    ];
    if root_user {
        // Before the tests, so that the tests that need podman and CRIU run (and, with
        // CI=true, fail rather than skip if something is still missing).
        let exe = std::env::current_exe().context("locating the xtask binary")?;
        let mut cmd = Command::new(exe);
        cmd.args(["setup", "--if-needed"]);
        steps.push(Step {
            name: "set-up",
            shown: "cargo xtask setup --if-needed (podman, runc and CRIU, installed when \
                    missing)"
                .to_owned(),
            cmd,
            minutes: 20,
        });
    } else {
        println!(
            "xtask ci: not root: no set-up; the tests that need root, podman or CRIU will skip \
             (they fail with CI=true)"
        );
    }
    // Unit, integration and doc tests; benches are compiled by clippy above.
    steps.push(Step::cargo("tests", &["test", "--workspace"], locked, 30));

    println!("xtask ci: layering checks (cargo xtask tidy)...");
    tidy::run_all(root).context("layering checks failed")?;
    println!("xtask ci: layering checks passed");
    for mut step in steps {
        let step_started = Instant::now();
        let limit = step_limit(deadline, step.minutes);
        println!(
            "xtask ci: {}: {} (limit {} s)",
            step.name,
            step.shown,
            limit.as_secs()
        );
        let status = limit::status(step.cmd.current_dir(root), step.name, limit)?;
        if !status.success() {
            bail!("{} failed ({status}): {}", step.name, step.shown);
        }
        println!(
            "xtask ci: {} passed in {:.1} s",
            step.name,
            step_started.elapsed().as_secs_f64()
        );
    }
    if root_user {
        let step_started = Instant::now();
        let limit = step_limit(deadline, 30);
        println!(
            "xtask ci: end-to-end migration (cargo xtask e2e-migrate, limit {} s)",
            limit.as_secs()
        );
        // A child process, so that a hang anywhere in it (build, set-up, a scenario) is
        // stopped at the limit with everything it started; then the containers are removed.
        let exe = std::env::current_exe().context("locating the xtask binary")?;
        let res = limit::status(
            Command::new(&exe).arg("e2e-migrate").current_dir(root),
            "e2e-migrate",
            limit,
        );
        let ok = res.as_ref().is_ok_and(|s| s.success());
        if res.is_err() {
            e2e::clean_up_after_a_kill(root);
        }
        if !ok {
            return Err(res
                .err()
                .unwrap_or_else(|| anyhow::anyhow!("e2e-migrate failed")));
        }
        println!(
            "xtask ci: e2e-migrate passed in {:.1} s",
            step_started.elapsed().as_secs_f64()
        );
        let step_started = Instant::now();
        let limit = step_limit(deadline, 20);
        println!(
            "xtask ci: the migration benchmark, small (cargo xtask bench-migrate --quick, \
             limit {} s)",
            limit.as_secs()
        );
        let res = limit::status(
            Command::new(&exe)
                .args(["bench-migrate", "--quick"])
                .current_dir(root),
            "bench-migrate",
            limit,
        );
        if res.is_err() {
            bench_migrate::clean_up_after_a_kill(root);
        }
        if !res.as_ref().is_ok_and(|s| s.success()) {
            return Err(res
                .err()
                .unwrap_or_else(|| anyhow::anyhow!("bench-migrate --quick failed")));
        }
        println!(
            "xtask ci: bench-migrate --quick passed in {:.1} s",
            step_started.elapsed().as_secs_f64()
        );
        let step_started = Instant::now();
        let limit = step_limit(deadline, 20);
        println!(
            "xtask ci: the migration across hosts (cargo xtask e2e-multihost --quick --post-copy, \
             limit {} s)",
            limit.as_secs()
        );
        let res = limit::status(
            Command::new(&exe)
                // Post-copy between hosts included: the page traffic through the agents' relay.
                .args(["e2e-multihost", "--quick", "--post-copy"])
                .current_dir(root),
            "e2e-multihost",
            limit,
        );
        if res.is_err() {
            // Killed at its limit: what it left (namespaces, holders and what runs in them).
            let _ = limit::status(
                Command::new(&exe)
                    .args(["e2e-multihost", "--cleanup-only"])
                    .current_dir(root),
                "e2e-multihost --cleanup-only",
                Duration::from_secs(120),
            );
        }
        if !res.as_ref().is_ok_and(|s| s.success()) {
            return Err(res
                .err()
                .unwrap_or_else(|| anyhow::anyhow!("e2e-multihost --quick --post-copy failed")));
        }
        println!(
            "xtask ci: e2e-multihost --quick passed in {:.1} s",
            step_started.elapsed().as_secs_f64()
        );
    } else {
        println!(
            "xtask ci: SKIPPED e2e-migrate, bench-migrate --quick and e2e-multihost --quick: \
             they need root (podman rootful, criu, netns)"
        );
    }
    println!(
        "xtask ci: all checks passed in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// A step's limit: its own, or what is left of the whole budget if that is less (at least a
/// minute, so that a step that is about to start is not refused outright).
fn step_limit(deadline: Instant, minutes: u64) -> Duration {
    let left = deadline.saturating_duration_since(Instant::now());
    Duration::from_secs(minutes * 60)
        .min(left)
        .max(Duration::from_secs(60))
}

pub(crate) fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &str) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("xtask").chain(args.split_whitespace()))
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_command_answers_help() {
        for cmd in [
            "ci",
            "e2e-migrate",
            "tidy",
            "bench",
            "shim-cost",
            "setup",
            "help",
        ] {
            let err = parse(&format!("{cmd} --help")).unwrap_err();
            assert_eq!(err.kind(), clap::error::ErrorKind::DisplayHelp, "{cmd}");
            assert_eq!(err.exit_code(), 0, "{cmd}");
        }
        let err = parse("--help").unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::DisplayHelp);
        let text = err.to_string();
        for cmd in ["ci", "e2e-migrate", "tidy", "bench", "shim-cost", "setup"] {
            assert!(text.contains(cmd), "--help lacks {cmd}: {text}");
        }
        // The detailed texts are kept in the commands' long help.
        let long = parse("e2e-migrate --help").unwrap_err().to_string();
        assert!(long.contains("e2e-report.json"), "{long}");
        assert!(long.contains("--moves"), "{long}");
    }

    #[test]
    fn unknown_commands_and_flags_are_usage_errors() {
        for bad in [
            "frobnicate",
            "ci --fast",
            "tidy extra",
            "e2e-migrate --bogus",
            "shim-cost --bogus",
            "setup --bogus",
            "bench --bogus",
            "bench seal",
        ] {
            let err = parse(bad).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{bad}: {err}");
            assert!(err.to_string().contains("Usage:"), "{bad}: {err}");
        }
    }

    #[test]
    fn commands_parse() {
        assert!(parse("").unwrap().command.is_none());
        assert!(matches!(parse("ci").unwrap().command, Some(Cmd::Ci)));
        assert!(matches!(parse("tidy").unwrap().command, Some(Cmd::Tidy)));
        match parse("bench -- seal --sample-size 10").unwrap().command {
            Some(Cmd::Bench { criterion_args }) => {
                assert_eq!(criterion_args, ["seal", "--sample-size", "10"]);
            }
            other => panic!("{other:?}"),
        }
        match parse("bench").unwrap().command {
            Some(Cmd::Bench { criterion_args }) => assert!(criterion_args.is_empty()),
            other => panic!("{other:?}"),
        }
        match parse("help setup").unwrap().command {
            Some(Cmd::Help { command }) => assert_eq!(command.as_deref(), Some("setup")),
            other => panic!("{other:?}"),
        }
    }
}
