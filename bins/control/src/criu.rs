//! CRIU: dump a process in its network namespace, restore it in another one.
//!
//! criu runs inside the process's network namespace (`nsenter --net=`, not `ip netns exec`,
//! which would make a new mount namespace that criu refuses to dump): a process in another
//! network namespace than criu's own would be dumped together with its namespace.
//!
//! Every call runs with criu's kdat cache when there is one (`kdat.rs`: `--unprivileged` and
//! `XDG_RUNTIME_DIR`). The final dump and the restore run in a `criu swrk` worker
//! (`criu_rpc.rs`) started before the freeze when one could be started; when none could, or it
//! died before answering, the command line runs instead (a warning names why, and the
//! timing's `route` and `worker_error` say so). A failure that criu itself reports is not
//! retried.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use admin_api::{CriuRoute, CriuTiming};
use anyhow::{Context, Result, anyhow, bail};
use tracing::warn;

use crate::criu_rpc::{self, DumpRequest, RestoreRequest, Worker};
use crate::sys::{run_unchecked, tail};

/// How long a worker may take to answer a dump or a restore.
pub(crate) const WORKER_LIMIT: Duration = Duration::from_secs(60);

/// Where the task's own work starts in a dump log.
pub(crate) const DUMP_TASK_MARKERS: &[&str] = &["Seizing", "seize", "Seized", "Freezing"];
/// Where the task's own work starts in a restore log.
pub(crate) const RESTORE_TASK_MARKERS: &[&str] = &["Restoring processes", "Forking task", "fork"];

/// Parses criu's "(SS.UUUUUU) message" log lines: the time of the first line whose message
/// contains one of `markers`, and of the last line.
fn log_times(log: &str, markers: &[&str]) -> (Option<f64>, Option<f64>) {
    let mut first = None;
    let mut last = None;
    for line in log.lines() {
        let Some(rest) = line.trim_start().strip_prefix('(') else {
            continue;
        };
        let Some((stamp, msg)) = rest.split_once(')') else {
            continue;
        };
        let Ok(t) = stamp.trim().parse::<f64>() else {
            continue;
        };
        last = Some(t);
        if first.is_none() && markers.iter().any(|m| msg.contains(m)) {
            first = Some(t);
        }
    }
    (first, last)
}

/// criu's timing from its log (also used by `postcopy`).
pub(crate) fn timing(wall: Duration, log: &Path, markers: &[&str]) -> CriuTiming {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let (first, last) = log_times(&text, markers);
    CriuTiming {
        wall_ms: wall.as_secs_f64() * 1e3,
        startup_ms: first.map(|t| t * 1e3),
        work_ms: first.zip(last).map(|(f, l)| (l - f) * 1e3),
        route: Some(CriuRoute::CommandLine),
        worker_error: None,
    }
}

/// Whom a dump runs as: the server's own account, so that criu may read the server's
/// resource limits (`prlimit` of another user's process needs CAP_SYS_RESOURCE, which root
/// lacks on some hosts, this one among them), with the capabilities a dump needs as ambient
/// capabilities and `--unprivileged`. The restore runs as root (the supervisor) and brings
/// the process back with its own credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DumpAs {
    /// The server's uid.
    pub(crate) uid: u32,
    /// The server's gid.
    pub(crate) gid: u32,
}

/// The capabilities criu needs for an unprivileged dump of a process in a network namespace.
const DUMP_CAPS: &str = "-all,+checkpoint_restore,+sys_ptrace,+sys_admin,+net_admin,\
                         +dac_override,+dac_read_search,+fowner,+kill";

/// The command prefix every criu call starts with: `nsenter --net=<netns> -- [setpriv <user,
/// caps>] criu`, with `XDG_RUNTIME_DIR=<kdat>` when there is a kdat cache folder.
pub(crate) fn criu_as(netns: &Path, user: Option<DumpAs>, kdat: Option<&Path>) -> Command {
    use std::os::unix::process::CommandExt as _;
    let mut c = Command::new("nsenter");
    c.arg(format!("--net={}", netns.display())).arg("--");
    if let Some(u) = user {
        c.arg("setpriv")
            .arg(format!("--reuid={}", u.uid))
            .arg(format!("--regid={}", u.gid))
            .arg("--clear-groups")
            .arg(format!("--inh-caps={DUMP_CAPS}"))
            .arg(format!("--ambient-caps={DUMP_CAPS}"));
    }
    // Without a cache folder of ours, none inherited either (an XDG_RUNTIME_DIR of control's
    // user is not the dumping account's).
    match kdat {
        Some(dir) => c.env("XDG_RUNTIME_DIR", dir),
        None => c.env_remove("XDG_RUNTIME_DIR"),
    };
    c.arg("criu");
    // Run by the supervisor, which blocks SIGCHLD: criu needs its signals delivered. Image
    // files hold the server's memory: umask 077, so criu writes them 0600 (never readable by
    // other users). Its own process group: a Ctrl-C at control's terminal reaches control
    // (which rolls back at the next phase boundary), not criu in the middle of a dump.
    // SAFETY: pthread_sigmask and umask are async-signal-safe and touch no memory of this
    // process.
    unsafe {
        c.pre_exec(|| {
            crate::supervisor::unblock_all_signals()?;
            nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
            Ok(())
        });
    }
    c.process_group(0);
    c
}

/// Whether the kernel tracks dirty memory for `criu pre-dump --track-mem`.
pub(crate) fn dirty_tracking_supported(kdat: Option<&Path>) -> Result<bool> {
    let mut cmd = Command::new("criu");
    cmd.args(["check", "--feature", "mem_dirty_track"]);
    if let Some(dir) = kdat {
        cmd.arg("--unprivileged").env("XDG_RUNTIME_DIR", dir);
    }
    let r = run_unchecked("criu check mem_dirty_track", &mut cmd)?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&r.output.stdout),
        String::from_utf8_lossy(&r.output.stderr)
    );
    Ok(r.output.status.success() && !text.contains("OFF"))
}

/// `criu pre-dump --track-mem` of `pid` into `dir` (the process keeps running); `parent`
/// is the previous round's directory, relative to `dir`.
pub(crate) fn pre_dump(
    pid: i32,
    netns: &Path,
    dir: &Path,
    parent: Option<&str>,
    kdat: Option<&Path>,
) -> Result<CriuTiming> {
    let log = dir.join("pre-dump.log");
    let mut cmd = criu_as(netns, None, kdat);
    cmd.args(["pre-dump", "--track-mem", "-t", &pid.to_string(), "-v4"]);
    if kdat.is_some() {
        cmd.arg("--unprivileged");
    }
    cmd.arg("-D").arg(dir).arg("-o").arg(&log);
    if let Some(p) = parent {
        cmd.args(["--prev-images-dir", p]);
    }
    let r = run_unchecked("criu pre-dump", &mut cmd)?;
    check(&r.output, "criu pre-dump", &log)?;
    Ok(timing(r.took, &log, DUMP_TASK_MARKERS))
}

/// What the final dump needs.
#[derive(Debug, Clone)]
pub(crate) struct DumpArgs {
    /// The task.
    pub(crate) pid: i32,
    /// Its network namespace (criu runs there).
    pub(crate) netns: PathBuf,
    /// The image directory.
    pub(crate) dir: PathBuf,
    /// The previous images, relative to `dir`.
    pub(crate) parent: Option<String>,
    /// Whom criu runs as (`None`: root).
    pub(crate) user: Option<DumpAs>,
    /// The kdat cache folder of that account.
    pub(crate) kdat: Option<PathBuf>,
}

impl DumpArgs {
    fn unprivileged(&self) -> bool {
        self.user.is_some() || self.kdat.is_some()
    }

    fn log(&self) -> PathBuf {
        self.dir.join(DUMP_LOG)
    }
}

/// The final dump's log file name.
const DUMP_LOG: &str = "dump.log";

/// The command of the final dump (see [`dump`]).
pub(crate) fn dump_command(a: &DumpArgs) -> Command {
    let mut cmd = criu_as(&a.netns, a.user, a.kdat.as_deref());
    cmd.args(["dump", "-t", &a.pid.to_string(), "-v4"]);
    if a.unprivileged() {
        cmd.arg("--unprivileged");
    }
    cmd.arg("-D").arg(&a.dir).arg("-o").arg(a.log());
    if let Some(p) = &a.parent {
        cmd.args(["--track-mem", "--prev-images-dir", p]);
    }
    cmd
}

/// The final `criu dump` from the command line; on success the process is gone.
pub(crate) fn dump(a: &DumpArgs) -> Result<CriuTiming> {
    let log = a.log();
    let r = run_unchecked("criu dump", &mut dump_command(a))?;
    check(&r.output, "criu dump", &log)?;
    Ok(timing(r.took, &log, DUMP_TASK_MARKERS))
}

/// A worker for the final dump, started in the task's namespace as the dumping account.
pub(crate) fn dump_worker(
    netns: &Path,
    user: Option<DumpAs>,
    kdat: Option<&Path>,
) -> Result<Worker, criu_rpc::RpcError> {
    Worker::spawn(criu_as(netns, user, kdat))
}

/// The final dump through `worker` (started before the freeze), or from the command line when
/// there is no worker (`Err` says why) or it died before answering.
#[cfg(test)]
pub(crate) fn dump_via(worker: Result<Worker, String>, a: &DumpArgs) -> Result<CriuTiming> {
    dump_via_deferred(worker, a).map(|(t, _spent)| t)
}

/// [`dump_via`], handing back the worker that answered instead of waiting for its exit: its
/// exit (criu's clean-up) is not on the freeze's path. Dropping it reaps it.
pub(crate) fn dump_via_deferred(
    worker: Result<Worker, String>,
    a: &DumpArgs,
) -> Result<(CriuTiming, Option<Worker>)> {
    let why = match worker {
        Ok(mut w) => {
            let start = Instant::now();
            let req = DumpRequest {
                pid: a.pid,
                dir: a.dir.clone(),
                log_name: DUMP_LOG.to_owned(),
                parent: a.parent.clone(),
                unprivileged: a.unprivileged(),
            };
            let done = w.dump(&req, WORKER_LIMIT);
            let wall = start.elapsed();
            match done {
                Ok(()) => {
                    let mut t = timing(wall, &a.log(), DUMP_TASK_MARKERS);
                    t.route = Some(CriuRoute::Worker);
                    return Ok((t, Some(w)));
                }
                Err(e) if e.worker_unusable() => e.to_string(),
                Err(e) => return Err(worker_failure(&e, &a.log())),
            }
        }
        Err(why) => why,
    };
    warn!("criu dump runs from the command line: {why}");
    let mut t = dump(a)?;
    t.worker_error = Some(why);
    Ok((t, None))
}

/// What a restore needs.
#[derive(Debug, Clone)]
pub(crate) struct RestoreArgs {
    /// The network namespace to restore into (criu runs there).
    pub(crate) netns: PathBuf,
    /// The image set.
    pub(crate) dir: PathBuf,
    /// criu's log file name inside `dir`.
    pub(crate) log_name: String,
    /// root's kdat cache folder.
    pub(crate) kdat: Option<PathBuf>,
}

/// `criu restore --restore-detached` of the image set from the command line. Returns the
/// restored PID (from criu's pidfile) and the timing.
pub(crate) fn restore(a: &RestoreArgs) -> Result<(i32, CriuTiming)> {
    let log = a.dir.join(&a.log_name);
    let pidfile = a.dir.join(format!("{}.pid", a.log_name));
    let _ = std::fs::remove_file(&pidfile);
    let mut cmd = criu_as(&a.netns, None, a.kdat.as_deref());
    cmd.args(["restore", "--restore-detached", "-v4"]);
    if a.kdat.is_some() {
        cmd.arg("--unprivileged");
    }
    cmd.arg("-D")
        .arg(&a.dir)
        .arg("-o")
        .arg(&log)
        .arg("--pidfile")
        .arg(&pidfile);
    let r = run_unchecked("criu restore", &mut cmd)?;
    check(&r.output, "criu restore", &log)?;
    let pid = std::fs::read_to_string(&pidfile)
        .with_context(|| format!("criu restore wrote no pidfile {}", pidfile.display()))?
        .trim()
        .parse::<i32>()
        .with_context(|| format!("bad pidfile {}", pidfile.display()))?;
    Ok((pid, timing(r.took, &log, RESTORE_TASK_MARKERS)))
}

/// A worker for a restore into `netns`, as root.
pub(crate) fn restore_worker(
    netns: &Path,
    kdat: Option<&Path>,
) -> Result<Worker, criu_rpc::RpcError> {
    Worker::spawn(criu_as(netns, None, kdat))
}

/// A restore through `worker`, or from the command line when there is none (`Err` says why)
/// or it died before answering. The worker restores the task as its sibling: the worker's
/// parent (the supervisor) gets it as its own child.
#[cfg(test)]
pub(crate) fn restore_via(
    worker: Result<Worker, String>,
    a: &RestoreArgs,
) -> Result<(i32, CriuTiming)> {
    restore_via_deferred(worker, a).map(|(pid, t, _spent)| (pid, t))
}

/// [`restore_via`], handing back the worker that answered instead of waiting for its exit
/// (criu's clean-up is not on the freeze's path). Dropping it reaps it.
pub(crate) fn restore_via_deferred(
    worker: Result<Worker, String>,
    a: &RestoreArgs,
) -> Result<(i32, CriuTiming, Option<Worker>)> {
    let log = a.dir.join(&a.log_name);
    let why = match worker {
        Ok(mut w) => {
            let start = Instant::now();
            let req = RestoreRequest {
                dir: a.dir.clone(),
                log_name: a.log_name.clone(),
                unprivileged: a.kdat.is_some(),
                sibling: true,
            };
            let done = w.restore(&req, WORKER_LIMIT);
            let wall = start.elapsed();
            match done {
                Ok(pid) => {
                    let mut t = timing(wall, &log, RESTORE_TASK_MARKERS);
                    t.route = Some(CriuRoute::Worker);
                    return Ok((pid, t, Some(w)));
                }
                Err(e) if e.worker_unusable() => e.to_string(),
                Err(e) => return Err(worker_failure(&e, &log)),
            }
        }
        Err(why) => why,
    };
    warn!("criu restore runs from the command line: {why}");
    let (pid, mut t) = restore(a)?;
    t.worker_error = Some(why);
    Ok((pid, t, None))
}

/// A worker's failure, with the error lines of criu's log.
fn worker_failure(e: &criu_rpc::RpcError, log: &Path) -> anyhow::Error {
    anyhow!("{e}:\n{}", log_errors(log))
}

/// The last error lines of a criu log.
fn log_errors(log: &Path) -> String {
    let log_text = std::fs::read_to_string(log).unwrap_or_default();
    let errors: Vec<&str> = log_text
        .lines()
        .filter(|l| l.contains("Error") || l.contains("error"))
        .collect();
    tail(&errors.join("\n"), 12)
}

/// A failed criu's error, with its log's error lines (also used by `postcopy`).
pub(crate) fn check(output: &std::process::Output, what: &str, log: &Path) -> Result<()> {
    if output.status.success() {
        return Ok(());
    }
    bail!(
        "{what} failed ({}); log {}:\n{}\n{}",
        output.status,
        log.display(),
        log_errors(log),
        tail(&String::from_utf8_lossy(&output.stderr), 5)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_timestamps_and_markers() {
        let log = "(00.000010) Version: 4.2.1\n\
                   (00.031000) Running on host\n\
                   garbage line\n\
                   (00.035500) Seizing 1234 task\n\
                   (not a stamp) x\n\
                   (00.049000) Dumping finished successfully\n";
        let (first, last) = log_times(log, DUMP_TASK_MARKERS);
        assert_eq!(first, Some(0.0355));
        assert_eq!(last, Some(0.049));
        assert_eq!(log_times("", DUMP_TASK_MARKERS), (None, None));
        assert_eq!(log_times("(x) y\n()\n(", DUMP_TASK_MARKERS), (None, None));
    }

    #[test]
    fn timing_of_a_missing_log_has_only_the_wall_time() {
        let t = timing(
            Duration::from_millis(7),
            Path::new("/nonexistent/log"),
            &["x"],
        );
        assert_eq!(t.wall_ms, 7.0);
        assert_eq!(t.startup_ms, None);
        assert_eq!(t.work_ms, None);
    }
}
