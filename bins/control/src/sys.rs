//! Running commands, with their duration logged; small facts about the host.

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tracing::{debug, info};

/// A command that ran: its output and how long it took.
#[derive(Debug)]
pub(crate) struct Ran {
    pub(crate) output: Output,
    pub(crate) took: Duration,
}

impl Ran {
    pub(crate) fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout)
            .trim()
            .to_owned()
    }
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// The last `n` lines of `text`, for error messages.
pub(crate) fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Runs `cmd` to completion; an error (with its stderr) if it fails.
pub(crate) fn run(what: &str, cmd: &mut Command) -> Result<Ran> {
    let ran = run_unchecked(what, cmd)?;
    if !ran.output.status.success() {
        bail!(
            "{what} failed ({}): {}\n{}",
            ran.output.status,
            describe(cmd),
            tail(&String::from_utf8_lossy(&ran.output.stderr), 15)
        );
    }
    Ok(ran)
}

/// Runs `cmd` to completion, whatever its exit status.
pub(crate) fn run_unchecked(what: &str, cmd: &mut Command) -> Result<Ran> {
    let line = describe(cmd);
    debug!("{what}: {line}");
    let start = Instant::now();
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("{what}: cannot start `{line}`"))?;
    let took = start.elapsed();
    info!(
        step = what,
        ms = format_args!("{:.1}", took.as_secs_f64() * 1e3),
        ok = output.status.success(),
        "step done"
    );
    Ok(Ran { output, took })
}

/// Refuses to go on unless running as root.
pub(crate) fn require_root() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "control must run as root: it drives podman (rootful), criu and nsenter. \
             Nothing was started."
        );
    }
    Ok(())
}

/// Refuses to go on unless `program` is on PATH.
pub(crate) fn require_program(program: &str, hint: &str) -> Result<()> {
    let found = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join(program).is_file()));
    if !found {
        bail!("`{program}` is not on PATH: {hint}");
    }
    Ok(())
}

/// Whether a UDP port on the host is free (binding it succeeds).
pub(crate) fn udp_port_free(port: u16) -> bool {
    UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], port))).is_ok()
}

/// Whether a process with this PID exists and runs `name` (so a recycled PID is not mistaken
/// for the server).
pub(crate) fn process_runs(pid: i32, name: &str) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let argv0 = cmdline.split(|b| *b == 0).next().unwrap_or_default();
    let alive = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !stat_state_is_zombie(&s))
        .unwrap_or(false);
    alive
        && Path::new(&*String::from_utf8_lossy(argv0))
            .file_name()
            .is_some_and(|f| f == name)
}

fn stat_state_is_zombie(stat: &str) -> bool {
    // The state follows the parenthesised command name: "pid (comm) S ...".
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .is_some_and(|state| state == "Z" || state == "X")
}

/// Waits until the process `pid` (which has exited or is exiting) is gone from the process
/// table, so that its PID is free again. Reaps it when it is a child of this process (directly,
/// or adopted because this process is a child subreaper); otherwise waits for its parent (init)
/// to reap it, which some inits do only every second or so.
pub(crate) fn reap(pid: i32, limit: Duration) -> Result<()> {
    use nix::sys::wait::{WaitPidFlag, waitpid};
    let start = Instant::now();
    let proc_dir = format!("/proc/{pid}");
    let mut adopted = true;
    while Path::new(&proc_dir).exists() {
        if adopted {
            match waitpid(nix::unistd::Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
                Ok(_) => {}
                // Not our child: someone else reaps it.
                Err(_) => adopted = false,
            }
        }
        if start.elapsed() > limit {
            bail!("process {pid} still holds its PID after {limit:?} (a zombie nobody reaps?)");
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    let waited = start.elapsed();
    if waited > Duration::from_millis(50) {
        tracing::warn!(
            pid,
            ms = format_args!("{:.0}", waited.as_secs_f64() * 1e3),
            "waited for the dumped process to be reaped (its parent should be the supervisor, \
             which reaps at once)"
        );
    }
    Ok(())
}

/// The inode of a network namespace file (`/proc/<pid>/ns/net`, or podman's bind mount of
/// one): two equal inodes are the same namespace.
pub(crate) fn netns_inode(path: &Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(path)
        .map(|m| m.ino())
        .with_context(|| format!("reading the network namespace {}", path.display()))
}

/// The real uid and gid of `pid`, from `/proc/<pid>/status`.
pub(crate) fn process_ids(pid: i32) -> Option<(u32, u32)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let first = |name: &str| -> Option<u32> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    Some((first("Uid:")?, first("Gid:")?))
}

/// The parent PID of `pid`, from `/proc/<pid>/stat`.
pub(crate) fn parent_pid(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ...": the command name may hold spaces and parentheses.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Total size of the regular files under `dir`.
pub(crate) fn dir_size(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(e.path()),
                Ok(t) if t.is_file() => total += e.metadata().map_or(0, |m| m.len()),
                _ => {}
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zombie_states_are_recognised() {
        assert!(stat_state_is_zombie("42 (swrapper) Z 1 42 42"));
        assert!(stat_state_is_zombie("42 (a) b) X 1"));
        assert!(!stat_state_is_zombie("42 (swrapper) S 1 42 42"));
        assert!(!stat_state_is_zombie("garbage"));
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("a\nb\nc\nd", 2), "c\nd");
        assert_eq!(tail("a", 5), "a");
        assert_eq!(tail("", 5), "");
    }

    #[test]
    fn a_failing_command_reports_its_stderr() {
        let err = run(
            "probe",
            Command::new("sh").args(["-c", "echo doomed >&2; exit 3"]),
        )
        .unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("probe failed"), "{msg}");
        assert!(msg.contains("doomed"), "{msg}");
        let err = run("probe", &mut Command::new("/nonexistent/program")).unwrap_err();
        assert!(format!("{err:#}").contains("cannot start"));
    }

    #[test]
    fn this_process_is_seen_and_a_wrong_name_is_not() {
        let me = i32::try_from(std::process::id()).unwrap();
        let exe = std::env::current_exe().unwrap();
        let name = exe.file_name().unwrap().to_str().unwrap();
        assert!(process_runs(me, name));
        assert!(!process_runs(me, "swrapper"));
        assert!(!process_runs(i32::MAX, name));
    }

    #[test]
    fn namespaces_and_parents_are_read_from_proc() {
        let me = i32::try_from(std::process::id()).unwrap();
        let mine = netns_inode(Path::new("/proc/self/ns/net")).unwrap();
        assert_eq!(
            netns_inode(Path::new(&format!("/proc/{me}/ns/net"))).unwrap(),
            mine
        );
        assert!(netns_inode(Path::new("/nonexistent/ns")).is_err());
        let ids = process_ids(me).unwrap();
        assert_eq!(ids.0, nix::unistd::getuid().as_raw());
        assert_eq!(ids.1, nix::unistd::getgid().as_raw());
        assert_eq!(process_ids(i32::MAX), None);
        let parent = parent_pid(me).unwrap();
        assert_eq!(parent, nix::unistd::getppid().as_raw());
        assert_eq!(parent_pid(i32::MAX), None);
    }

    #[test]
    fn a_bound_port_is_not_free() {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        assert!(!udp_port_free(s.local_addr().unwrap().port()));
    }
}

/// The resident memory of `pid` (`VmRSS`), bytes; None when it cannot be read.
pub(crate) fn resident_bytes(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_vm_rss(&status)
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line
        .trim_start_matches("VmRSS:")
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    kib.checked_mul(1024)
}

/// Room to keep beside an image set in an agent's storage.
pub(crate) const STORAGE_MARGIN: u64 = 64 << 20;

/// Fails when the file system of `dir` has less than `need` bytes (plus
/// [`STORAGE_MARGIN`]) free for `what`.
pub(crate) fn check_room(dir: &Path, need: u64, what: &str) -> Result<()> {
    let st = nix::sys::statvfs::statvfs(dir)
        .with_context(|| format!("reading the free space of {}", dir.display()))?;
    let free = st.blocks_available().saturating_mul(st.fragment_size());
    if free < need.saturating_add(STORAGE_MARGIN) {
        bail!(
            "{} has {} MiB free; {what} needs about {} MiB (and {} MiB to spare)",
            dir.display(),
            free >> 20,
            need.div_ceil(1 << 20),
            STORAGE_MARGIN >> 20
        );
    }
    Ok(())
}

#[cfg(test)]
mod room_tests {
    use super::*;

    #[test]
    fn vm_rss_is_parsed_and_bad_lines_are_none() {
        assert_eq!(
            parse_vm_rss("Name:\tx\nVmRSS:\t    5120 kB\n"),
            Some(5120 * 1024)
        );
        assert_eq!(parse_vm_rss("VmRSS:\t12 MB\n"), None);
        assert_eq!(parse_vm_rss("VmRSS:\tlots kB\n"), None);
        assert_eq!(parse_vm_rss("VmRSS:\t99999999999999999999 kB\n"), None);
        assert_eq!(parse_vm_rss("VmSize:\t1 kB\n"), None);
        assert!(resident_bytes(std::process::id() as i32).is_some_and(|b| b > 0));
        assert_eq!(resident_bytes(-1), None);
    }

    #[test]
    fn room_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        check_room(dir.path(), 1 << 20, "a tiny set").unwrap();
        let e = check_room(dir.path(), u64::MAX / 2, "an absurd set").unwrap_err();
        assert!(
            format!("{e:#}").contains("an absurd set needs about"),
            "{e:#}"
        );
        assert!(check_room(&dir.path().join("absent"), 1, "x").is_err());
    }
}

/// The children of `pid` (every thread's), from `/proc`; none when it is gone.
pub(crate) fn children(pid: i32) -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut all: Vec<i32> = tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|text| {
            text.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect();
    all.sort_unstable();
    all.dedup();
    all
}

#[cfg(test)]
mod children_tests {
    #[test]
    fn a_childs_pid_is_listed_and_a_gone_process_has_none() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let me = std::process::id() as i32;
        let pid = child.id() as i32;
        assert!(super::children(me).contains(&pid));
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!super::children(me).contains(&pid));
        assert!(super::children(-1).is_empty());
    }
}
