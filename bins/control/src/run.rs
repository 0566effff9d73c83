//! `control run`: up, the demo client, several migrations there and back, the checks, down.
//!
//! Two routes: `run` drives every migration from this process; `by-hand` runs `control up`
//! and each `control migrate` as separate processes, as a person at a terminal would, so the
//! figures of both can be compared.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use admin_api::{ClientReport, MoveReport, MoveResult, RunReport};
use anyhow::{Context, Result, bail};
use tracing::{info, warn};

use crate::deploy::{self, Settings, UpOptions};
use crate::engine::{self, Fault, Transfer};
use crate::report::{self, Bounds};
use crate::state::State;
use crate::{journal, recover, secure};

/// How the migrations are driven.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Route {
    /// Every migration from this one process.
    Run,
    /// `control up` and each `control migrate` as separate processes.
    ByHand,
}

impl Route {
    fn name(self) -> &'static str {
        match self {
            Route::Run => "run",
            Route::ByHand => "by-hand",
        }
    }
}

/// What `control run` does.
#[derive(Debug, Clone)]
pub(crate) struct RunOptions {
    pub(crate) up: UpOptions,
    pub(crate) engine: engine::Options,
    pub(crate) moves: u32,
    pub(crate) pause: Duration,
    pub(crate) client_interval_ms: u64,
    pub(crate) fail_restore_at: Option<u32>,
    pub(crate) fail_dump_at: Option<u32>,
    /// Per migration (by hand): where its `control migrate` is killed, then recovered.
    pub(crate) kill_at: Vec<String>,
    pub(crate) preserve: bool,
    pub(crate) run_report: Option<PathBuf>,
    pub(crate) route: Route,
    pub(crate) bounds: Bounds,
    /// Log filter passed to the separate processes of the by-hand route.
    pub(crate) log: String,
}

/// Runs everything, prints diagnostics on failure, and removes the deployment unless asked
/// to keep it.
pub(crate) fn run(settings: &Settings, opts: &RunOptions) -> Result<()> {
    let result = run_inner(settings, opts);
    if result.is_err() {
        eprint!("{}", deploy::diagnostics(settings));
    }
    if opts.preserve {
        info!(
            "--preserve: keeping containers, state and logs in {}",
            settings.state_dir.display()
        );
    } else if let Err(e) = deploy::down(settings) {
        warn!("down after run: {e:#}");
    }
    result
}

fn run_inner(settings: &Settings, opts: &RunOptions) -> Result<()> {
    let state = match opts.route {
        Route::Run => deploy::up(settings, &opts.up)?,
        Route::ByHand => {
            let mut cmd = self_command(settings, &opts.log);
            cmd.arg("up")
                .args(["--src-port", &opts.up.src_port.to_string()])
                .args(["--dst-port", &opts.up.dst_port.to_string()])
                .arg("--bin-dir")
                .arg(&opts.up.bin_dir)
                .args(["--server-user", &opts.up.server_user]);
            if opts.up.pid_namespace {
                cmd.arg("--pid-namespace");
            }
            run_self(cmd, "control up")?;
            State::load(&settings.state_dir)?
        }
    };
    let cwrapper = opts.up.bin_dir.join("cwrapper");
    let target = SocketAddr::from(([127, 0, 0, 1], state.a.host_port));
    let client = start_client(
        &settings.state_dir,
        &cwrapper,
        target,
        &state.cert,
        opts.client_interval_ms,
    )?;
    // Let the client connect and settle.
    std::thread::sleep(Duration::from_millis(1000));
    let mut migrations = Vec::new();
    let mut failure = None;
    for n in 1..=opts.moves {
        if n > 1 {
            std::thread::sleep(opts.pause);
        }
        if crate::interrupt::interrupted() {
            failure = Some(format!("interrupted by a signal before migration {n}"));
            break;
        }
        let kill = opts
            .kill_at
            .get(n as usize - 1)
            .filter(|k| k.as_str() != "-")
            .cloned();
        let fault = if opts.fail_restore_at == Some(n) {
            Some(Fault::Restore)
        } else if opts.fail_dump_at == Some(n) {
            Some(Fault::Dump)
        } else {
            opts.engine.fault
        };
        // Killed once the restore was asked for: the recovery finishes the move; killed (or
        // interrupted) earlier: it rolls it back.
        let expected = match kill.as_deref() {
            Some("restore") => MoveResult::Completed,
            Some(_) => MoveResult::RolledBack,
            None if fault.is_some() => MoveResult::RolledBack,
            None => MoveResult::Completed,
        };
        let eopts = engine::Options {
            fault,
            ..opts.engine.clone()
        };
        let report = match (opts.route, kill.as_deref()) {
            (Route::Run, None) => migrate_here(settings, &eopts),
            (Route::Run, Some(_)) => Err(anyhow::anyhow!(
                "--kill-at needs --route by-hand (this process cannot be killed and go on)"
            )),
            (Route::ByHand, _) => migrate_by_hand(settings, &eopts, n, &opts.log, kill.as_deref()),
        };
        match report {
            Ok(r) => {
                let got = r.result;
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
    let client_json = settings.state_dir.join("client.json");
    let client_report: Option<ClientReport> = match report::read_json(&client_json) {
        Ok(c) => Some(c),
        Err(e) => {
            warn!("{e:#}");
            None
        }
    };
    let mut combined = report::summarize(
        opts.route.name(),
        migrations,
        client_report,
        client_status.code(),
        opts.bounds,
    );
    if let Some(f) = failure {
        combined.problems.insert(0, f);
    }
    let path = opts
        .run_report
        .clone()
        .unwrap_or_else(|| settings.state_dir.join("run-report.json"));
    report::write_json(&path, &combined)?;
    report::print_run(&combined);
    println!("run report: {}", path.display());
    finish(&combined)
}

fn finish(r: &RunReport) -> Result<()> {
    if !r.problems.is_empty() {
        bail!("{}", r.problems.join("; "));
    }
    Ok(())
}

/// One migration from this process, its report written and summarised.
pub(crate) fn migrate_here(settings: &Settings, opts: &engine::Options) -> Result<MoveReport> {
    migrate_and_report(settings, opts, None)
}

/// One migration with its report written to `path` (default: the state directory's
/// `reports/<id>.json`) and summarised; `Ok` whatever its result.
pub(crate) fn migrate_and_report(
    settings: &Settings,
    opts: &engine::Options,
    path: Option<&Path>,
) -> Result<MoveReport> {
    deploy::preflight()?;
    let mut state = State::load(&settings.state_dir)?;
    let report = engine::migrate(&settings.state_dir, &mut state, opts)?;
    let path = match path {
        Some(p) => p.to_path_buf(),
        None => {
            let dir = settings.state_dir.join("reports");
            secure::private_dir(&dir)?;
            dir.join(format!("{}.json", report.migration_id))
        }
    };
    report::write_json(&path, &report)?;
    report::print_move(&report);
    println!("report: {}", path.display());
    Ok(report)
}

/// Recovers the interrupted migration the journal names, if any; its report written to `path`
/// (default: the state directory's `reports/<id>.json`) and summarised.
///
/// With `quiet` the summary goes to stderr (`status` keeps stdout for its JSON).
pub(crate) fn recover_and_report(
    settings: &Settings,
    path: Option<&Path>,
    quiet: bool,
) -> Result<Option<MoveReport>> {
    let Some(journal) = journal::load(&settings.state_dir)? else {
        return Ok(None);
    };
    let say = |text: &str| {
        if quiet {
            eprint!("{text}");
        } else {
            print!("{text}");
        }
    };
    say(&format!("{}; recovering\n", recover::describe(&journal)));
    deploy::preflight()?;
    let mut state = State::load(&settings.state_dir)?;
    let report = recover::recover(&settings.state_dir, &mut state, &journal)?;
    let path = match path {
        Some(p) => p.to_path_buf(),
        None => settings
            .state_dir
            .join("reports")
            .join(format!("{}.json", report.migration_id)),
    };
    report::write_json(&path, &report)?;
    say(&report::move_summary(&report));
    say(&format!("report: {}\n", path.display()));
    Ok(Some(report))
}

fn migrate_by_hand(
    settings: &Settings,
    opts: &engine::Options,
    n: u32,
    log: &str,
    kill: Option<&str>,
) -> Result<MoveReport> {
    let dir = settings.state_dir.join("reports");
    secure::private_dir(&dir)?;
    let path = dir.join(format!("by-hand-{n}.json"));
    let mut cmd = self_command(settings, log);
    cmd.arg("migrate")
        .args([
            "--ack-deadline-ms",
            &opts.policy.ack_deadline.as_millis().to_string(),
        ])
        .args([
            "--predump-rounds",
            &opts.policy.predump.max_rounds.to_string(),
        ])
        .args(["--phases", opts.phases.as_str()])
        .args([
            "--quiesce-deadline-ms",
            &opts.quiesce_deadline.as_millis().to_string(),
        ])
        .args([
            "--transfer",
            match opts.transfer {
                Transfer::Local => "local",
                Transfer::Sealed => "sealed",
            },
        ])
        .args([
            "--memory",
            match opts.memory {
                crate::postcopy::Memory::Cold => "cold",
                crate::postcopy::Memory::PostCopy => "post-copy",
            },
        ])
        .arg("--report")
        .arg(&path);
    match opts.fault {
        Some(Fault::Dump) => {
            cmd.arg("--fail-dump");
        }
        Some(Fault::Restore) => {
            cmd.arg("--fail-restore");
        }
        Some(Fault::RestoreInSource) => {
            cmd.arg("--fault-restore-in-source");
        }
        None => {}
    }
    if opts.keep_images {
        cmd.arg("--keep-images");
    }
    match kill {
        Some("sigterm-announce") => {
            cmd.env("QLM_SIGTERM_AT", "announce");
        }
        Some(point) => {
            cmd.env("QLM_KILL_AT", point);
        }
        None => {}
    }
    // `control migrate` exits non-zero when the move did not complete; the report says how
    // it ended, which is what counts here.
    let status = cmd.status().context("running control migrate")?;
    if let (Some(point), None) = (kill, status.code())
        && point != "sigterm-announce"
    {
        // Killed as asked: the next control recovers, as a person would run it.
        info!(point, %status, "control migrate was killed; running control recover");
        let mut rec = self_command(settings, log);
        rec.arg("recover").arg("--report").arg(&path);
        let rstatus = rec.status().context("running control recover")?;
        return match report::read_json::<MoveReport>(&path) {
            Ok(r) => Ok(r),
            Err(e) => bail!("control recover ({rstatus}) wrote no report: {e:#}"),
        };
    }
    if kill.is_some_and(|k| k != "sigterm-announce") {
        bail!("control migrate was to be killed but ended with {status}");
    }
    match report::read_json::<MoveReport>(&path) {
        Ok(r) => Ok(r),
        Err(e) => bail!("control migrate ({status}) wrote no report: {e:#}"),
    }
}

/// This executable with the deployment's settings.
fn self_command(settings: &Settings, log: &str) -> Command {
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("control"));
    let mut c = Command::new(exe);
    c.arg("--state-dir")
        .arg(&settings.state_dir)
        .arg("--images-dir")
        .arg(&settings.images_dir)
        .args(["--name", &settings.name])
        .args(["--log", log]);
    c
}

fn run_self(mut cmd: Command, what: &str) -> Result<()> {
    let started = Instant::now();
    let status = cmd.status().with_context(|| format!("running {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    info!(
        ms = format_args!("{:.0}", started.elapsed().as_secs_f64() * 1e3),
        "{what} done"
    );
    Ok(())
}

fn start_client(
    state_dir: &Path,
    cwrapper: &Path,
    target: SocketAddr,
    cert: &Path,
    interval_ms: u64,
) -> Result<Child> {
    let out = secure::open_log(&state_dir.join("client.out"))?;
    let err = secure::open_log(&state_dir.join("client.err"))?;
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
    secure::write_private(
        &state_dir.join("client.pid"),
        child.id().to_string().as_bytes(),
    )?;
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
