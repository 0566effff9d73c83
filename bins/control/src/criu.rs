//! CRIU: dump a process in its network namespace, restore it in another one.
//!
//! criu runs inside the process's network namespace (`nsenter --net=`, not `ip netns exec`,
//! which would make a new mount namespace that criu refuses to dump): a process in another
//! network namespace than criu's own would be dumped together with its namespace.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use admin_api::CriuTiming;
use anyhow::{Context, Result, bail};

use crate::sys::{run_unchecked, tail};

/// Where the task's own work starts in a dump log.
pub(crate) const DUMP_TASK_MARKERS: &[&str] = &["Seizing", "seize", "Freezing"];
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

fn criu_in(netns: &Path) -> Command {
    criu_as(netns, None)
}

/// criu in `netns`, as `user` when given (also used by `postcopy`).
pub(crate) fn criu_as(netns: &Path, user: Option<DumpAs>) -> Command {
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
pub(crate) fn dirty_tracking_supported() -> Result<bool> {
    let r = run_unchecked(
        "criu check mem_dirty_track",
        Command::new("criu").args(["check", "--feature", "mem_dirty_track"]),
    )?;
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
) -> Result<CriuTiming> {
    let log = dir.join("pre-dump.log");
    let mut cmd = criu_in(netns);
    cmd.args(["pre-dump", "--track-mem", "-t", &pid.to_string(), "-v4"])
        .arg("-D")
        .arg(dir)
        .arg("-o")
        .arg(&log);
    if let Some(p) = parent {
        cmd.args(["--prev-images-dir", p]);
    }
    let r = run_unchecked("criu pre-dump", &mut cmd)?;
    check(&r.output, "criu pre-dump", &log)?;
    Ok(timing(r.took, &log, DUMP_TASK_MARKERS))
}

/// The command of the final dump (see [`dump`]).
pub(crate) fn dump_command(
    pid: i32,
    netns: &Path,
    dir: &Path,
    parent: Option<&str>,
    user: Option<DumpAs>,
) -> Command {
    let log = dir.join("dump.log");
    let mut cmd = criu_as(netns, user);
    cmd.args(["dump", "-t", &pid.to_string(), "-v4"]);
    if user.is_some() {
        cmd.arg("--unprivileged");
    }
    cmd.arg("-D").arg(dir).arg("-o").arg(&log);
    if let Some(p) = parent {
        cmd.args(["--track-mem", "--prev-images-dir", p]);
    }
    cmd
}

/// The final `criu dump` of `pid` into `dir`; on success the process is gone.
pub(crate) fn dump(
    pid: i32,
    netns: &Path,
    dir: &Path,
    parent: Option<&str>,
    user: Option<DumpAs>,
) -> Result<CriuTiming> {
    let log = dir.join("dump.log");
    let mut cmd = dump_command(pid, netns, dir, parent, user);
    let r = run_unchecked("criu dump", &mut cmd)?;
    check(&r.output, "criu dump", &log)?;
    Ok(timing(r.took, &log, DUMP_TASK_MARKERS))
}

/// `criu restore --restore-detached` of the image set in `dir`, inside `netns`. Returns the
/// restored PID (from criu's pidfile) and the timing.
pub(crate) fn restore(netns: &Path, dir: &Path, log_name: &str) -> Result<(i32, CriuTiming)> {
    let log = dir.join(log_name);
    let pidfile = dir.join(format!("{log_name}.pid"));
    let _ = std::fs::remove_file(&pidfile);
    let mut cmd = criu_in(netns);
    cmd.args(["restore", "--restore-detached", "-v4"])
        .arg("-D")
        .arg(dir)
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

/// A failed criu's error, with its log's error lines (also used by `postcopy`).
pub(crate) fn check(output: &std::process::Output, what: &str, log: &Path) -> Result<()> {
    if output.status.success() {
        return Ok(());
    }
    let log_text = std::fs::read_to_string(log).unwrap_or_default();
    let errors: Vec<&str> = log_text
        .lines()
        .filter(|l| l.contains("Error") || l.contains("error"))
        .collect();
    bail!(
        "{what} failed ({}); log {}:\n{}\n{}",
        output.status,
        log.display(),
        tail(&errors.join("\n"), 12),
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
