//! Running a child command with a time limit, so that one hung test or scenario fails its step
//! with a message instead of eating the whole CI budget.
//!
//! On expiry the child and every process below it (found through `/proc`, by parent PID) get
//! SIGTERM, then SIGKILL after a grace period. Only descendants of the child are signalled,
//! each by its PID.

use std::collections::{HashMap, HashSet};
use std::process::{Command, ExitStatus};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// How long the children get between SIGTERM and SIGKILL.
const GRACE: Duration = Duration::from_secs(5);

/// Runs `cmd` to completion, or stops it and its descendants once `limit` has passed and
/// returns an error naming `what`.
pub(crate) fn status(cmd: &mut Command, what: &str, limit: Duration) -> Result<ExitStatus> {
    let mut child = cmd
        .spawn()
        .with_context(|| format!("could not start {what}"))?;
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() >= deadline {
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    let pid = child.id();
    println!(
        "xtask: {what} is still running after {} s (its limit); stopping it (PID {pid}) and \
         everything it started",
        limit.as_secs()
    );
    stop_tree(pid);
    let _ = child.wait();
    bail!("{what} did not finish within {} s", limit.as_secs())
}

/// SIGTERM to `root` and all its descendants, then SIGKILL to whatever is left of them after
/// [`GRACE`].
fn stop_tree(root: u32) {
    let mut seen = HashSet::new();
    signal_tree(root, Signal::SIGTERM, &mut seen);
    let end = Instant::now() + GRACE;
    while Instant::now() < end {
        let alive = seen.iter().any(|&p| is_alive(p));
        if !alive {
            return;
        }
        thread::sleep(Duration::from_millis(100));
    }
    // Descendants started since, and those that ignored SIGTERM.
    signal_tree(root, Signal::SIGKILL, &mut seen);
    for &p in &seen {
        if is_alive(p) {
            let _ = kill(pid(p), Signal::SIGKILL);
        }
    }
}

fn signal_tree(root: u32, sig: Signal, seen: &mut HashSet<u32>) {
    let tree = descendants(root, &parents());
    for p in std::iter::once(root).chain(tree) {
        seen.insert(p);
        let _ = kill(pid(p), sig);
    }
}

fn pid(p: u32) -> Pid {
    Pid::from_raw(i32::try_from(p).unwrap_or(i32::MAX))
}

fn is_alive(p: u32) -> bool {
    // A zombie is dead for our purpose: it holds no resources but its PID.
    match std::fs::read_to_string(format!("/proc/{p}/stat")) {
        Ok(stat) => parse_stat(&stat).is_some_and(|(state, _)| state != 'Z'),
        Err(_) => false,
    }
}

/// Every process's parent, from `/proc/<pid>/stat`.
fn parents() -> HashMap<u32, u32> {
    let mut map = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return map;
    };
    for entry in dir.flatten() {
        let Some(p) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if let Ok(stat) = std::fs::read_to_string(entry.path().join("stat"))
            && let Some((_, ppid)) = parse_stat(&stat)
        {
            map.insert(p, ppid);
        }
    }
    map
}

/// The state letter and the parent PID of a `/proc/<pid>/stat` line. The command name, in
/// parentheses, may itself hold spaces and parentheses: the fields start after the last `)`.
fn parse_stat(stat: &str) -> Option<(char, u32)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// The descendants of `root` in `parents`, parents before their children.
fn descendants(root: u32, parents: &HashMap<u32, u32>) -> Vec<u32> {
    let mut out = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for (&child, &parent) in parents {
            if parent == p && child != root && !out.contains(&child) {
                out.push(child);
                frontier.push(child);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_parse_even_with_odd_names() {
        assert_eq!(
            parse_stat("42 (cargo) S 7 42 42 0 -1 4194560"),
            Some(('S', 7))
        );
        assert_eq!(parse_stat("43 (a (b) c) R 42 43 42 0 -1"), Some(('R', 42)));
        assert_eq!(parse_stat("44 (x) Z 1"), Some(('Z', 1)));
        for bad in [
            "",
            "44",
            "44 (x)",
            "44 (x) S",
            "44 (x) S notanumber",
            "44 x S 1",
        ] {
            assert_eq!(parse_stat(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn descendants_follow_the_tree_and_nothing_else() {
        let parents: HashMap<u32, u32> =
            [(10, 1), (11, 10), (12, 11), (13, 10), (20, 1), (21, 20)].into();
        let mut d = descendants(10, &parents);
        d.sort_unstable();
        assert_eq!(d, vec![11, 12, 13]);
        assert!(descendants(12, &parents).is_empty());
        // A cycle (PIDs reused while reading /proc) does not loop for ever.
        let cyclic: HashMap<u32, u32> = [(1, 2), (2, 1)].into();
        assert_eq!(descendants(1, &cyclic), vec![2]);
    }

    #[test]
    fn a_finished_command_returns_its_status() {
        let ok = status(&mut Command::new("true"), "true", Duration::from_secs(30)).unwrap();
        assert!(ok.success());
        let bad = status(&mut Command::new("false"), "false", Duration::from_secs(30)).unwrap();
        assert_eq!(bad.code(), Some(1));
        let err = status(
            &mut Command::new("/nonexistent/xtask-test"),
            "the missing command",
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("could not start the missing command"));
    }

    #[test]
    fn a_hung_command_and_its_children_are_stopped_at_the_limit() {
        // A shell that starts a grandchild ignoring SIGTERM, then waits for ever.
        let dir = tempdir();
        let pidfile = dir.join("grandchild.pid");
        let script = format!(
            "sh -c 'trap \"\" TERM; echo $$ > {}; exec sleep 600' & wait",
            pidfile.display()
        );
        let started = Instant::now();
        let err = status(
            Command::new("sh").args(["-c", &script]),
            "the hung shell",
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(
            format!("{err:#}").contains("the hung shell did not finish within 1 s"),
            "{err:#}"
        );
        let grandchild: u32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // Bounded: SIGKILL comes after the grace period.
        let end = Instant::now() + Duration::from_secs(20);
        while is_alive(grandchild) && Instant::now() < end {
            thread::sleep(Duration::from_millis(50));
        }
        assert!(
            !is_alive(grandchild),
            "the grandchild {grandchild} survived"
        );
        assert!(started.elapsed() < Duration::from_secs(20));
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn tempdir() -> std::path::PathBuf {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("xtask-limit-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
