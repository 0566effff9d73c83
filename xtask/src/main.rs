//! Project automation, run as `cargo xtask <command>` (alias in `.cargo/config.toml`).
//!
//! xtask prepares and checks; the assertions of scenarios live in test binaries. It finds the
//! repository root from `CARGO_MANIFEST_DIR`, keeps few dependencies, and its checks also run as
//! `#[test]`s (see `tidy.rs`).

mod bench;
mod e2e;
mod limit;
mod setup;
mod shim_cost;
mod tidy;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

const HELP: &str = "\
cargo xtask <command>

Commands:
  ci        What CI runs (the README's test command): formatting check, clippy with
            -D warnings on all targets, the layering checks, every test of the workspace, then
            (as root) e2e-migrate. Not root: e2e-migrate is skipped with a message, unless
            CI=true, where it is required. Each step has a time limit (formatting 5 min, clippy,
            tests and e2e-migrate 30 min each, 80 min in all); a step that overruns is stopped
            with everything it started, and ci fails naming it.
  e2e-migrate
            The main job: builds the release binaries, runs `setup` when something is
            missing, brings podman containers A and B up, starts the demo client, migrates the
            server A -> B -> A with CRIU, and then runs a scenario whose restore is made to fail
            (rollback to A, then a successful move). Checks: one handshake, no echo lost or
            repeated, the server's counter continued, each migration's downtime. Prints a
            summary, writes target/e2e/e2e-report.json, exits non-zero when a check fails,
            prints diagnostics (server, client, criu and container logs) on failure, and always
            cleans up.
            --moves N (default 2) moves in the main scenario; --preserve keeps the last
            scenario's containers and logs; --no-rollback skips the rollback scenario;
            --write-benchmarks puts the figures into BENCHMARKS.md.
  tidy      Only the layering and documentation checks (fast; no compilation).
  bench     Runs the criterion benchmarks (package migration-benches) and rewrites the
            generated section of BENCHMARKS.md with the medians and the machine they came from.
            Extra arguments after `--` go to criterion, e.g. `cargo xtask bench -- seal`.
  shim-cost What the UDP shims cost against quinn's stock socket, in instructions (callgrind:
            repeatable where time is not on this noisy machine). Builds the release binary
            shim_cost (package migration-benches) and runs each variant (stock, shims,
            client_shim, server_shim) under `valgrind --tool=callgrind` with a small and a big
            count of 32-byte round trips (200, 1200) and of 256 KiB transfers (20, 120); the
            difference per operation cancels the set-up. Prints the table and the ratios
            against stock. Needs valgrind.
            --repeat N (default 2) runs of each count, to show the spread; --mode rtt|bulk
            only one workload; --write-benchmarks puts the table into BENCHMARKS.md.
  setup     Installs what the end-to-end migration needs (as root, on Debian-like systems):
            podman, runc, netavark, iptables, iproute2, nsenter, busybox-static and CRIU >= 4.2
            (from Debian sid with its own glibc, in /opt/quic-live-migrate/criu behind the
            wrapper /usr/local/sbin/criu; the mirror is read from the system's apt sources).
            Skips what is present, then verifies each part and runs a podman smoke container
            from a locally imported busybox image (no registry).
            `--check` only reports what is missing; `--if-needed` installs only when something
            is missing and skips the verification; `--reinstall-criu` fetches CRIU again.
  help      This text.

Environment:
  CI=true   Set by CI; `ci` then also refuses a dirty Cargo.lock (`--locked`).
";

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let cmd = args.next().unwrap_or_else(|| "help".to_owned());
    let rest: Vec<String> = args.collect();
    let root = project_root();
    match cmd.as_str() {
        "ci" => {
            no_extra_args(&cmd, &rest)?;
            ci(&root)
        }
        "tidy" => {
            no_extra_args(&cmd, &rest)?;
            tidy::run_all(&root)
        }
        "bench" => {
            let filter: Vec<String> = rest.into_iter().skip_while(|a| a == "--").collect();
            bench::run(&root, &filter)
        }
        "e2e-migrate" => e2e::run(&root, &e2e::Options::from_args(&rest)?),
        "shim-cost" => shim_cost::run(&root, &shim_cost::Options::from_args(&rest)?),
        "setup" if rest.iter().any(|a| a == "--if-needed") => {
            if rest.len() > 1 {
                bail!("`--if-needed` takes no other option (see `cargo xtask help`)");
            }
            setup::ensure(&root)
        }
        "setup" => setup::run(&root, &setup::Options::from_args(&rest)?),
        "help" | "--help" | "-h" => {
            print!("{HELP}");
            Ok(())
        }
        other => {
            eprint!("{HELP}");
            bail!("unknown command `{other}`")
        }
    }
}

fn no_extra_args(cmd: &str, rest: &[String]) -> Result<()> {
    if let Some(first) = rest.first() {
        bail!("`cargo xtask {cmd}` takes no arguments, got `{first}` (see `cargo xtask help`)");
    }
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

fn ci(root: &Path) -> Result<()> {
    let started = Instant::now();
    let deadline = started + CI_BUDGET;
    let locked = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    // (name, cargo arguments, the step's own limit)
    let mut steps: Vec<(&str, Vec<&str>, u64)> = vec![
        ("formatting", vec!["fmt", "--all", "--", "--check"], 5),
        (
            "clippy",
            vec![
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ],
            30,
        ),
        // Unit, integration and doc tests; benches are compiled by clippy above.
        ("tests", vec!["test", "--workspace"], 30),
    ];
    if locked {
        for (_, args, _) in &mut steps {
            if args[0] != "fmt" {
                args.insert(1, "--locked");
            }
        }
    }
    tidy::run_all(root).context("layering checks failed")?;
    println!("xtask ci: layering checks passed");
    for (name, args, minutes) in steps {
        let step_started = Instant::now();
        let limit = step_limit(deadline, minutes);
        println!(
            "xtask ci: {name}: cargo {} (limit {} s)",
            args.join(" "),
            limit.as_secs()
        );
        let status = limit::status(
            Command::new(cargo()).args(&args).current_dir(root),
            name,
            limit,
        )?;
        if !status.success() {
            bail!("{name} failed ({status}): cargo {}", args.join(" "));
        }
        println!(
            "xtask ci: {name} passed in {:.1} s",
            step_started.elapsed().as_secs_f64()
        );
    }
    if setup::is_root() {
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
            Command::new(exe).arg("e2e-migrate").current_dir(root),
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
    } else if locked {
        bail!("CI=true but not root: the end-to-end migration (podman, criu) needs root");
    } else {
        println!("xtask ci: SKIPPED e2e-migrate: it needs root (podman rootful, criu, netns)");
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
