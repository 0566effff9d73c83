//! Network namespaces joined to the root namespace by a veth pair, for tests that move a
//! socket (or a process) between namespaces. Creating one needs root (`ip netns`, veth).
//!
//! ```text
//!   root namespace                         namespace `name` (/var/run/netns/name)
//!   veth_root  root_ip/30  ◀──── veth ────▶  veth_inner  inner_ip/30, lo up
//! ```
//!
//! Every command goes through [`run`], which holds [`no_fork`]'s lock while the child runs.

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    process::Command,
    sync::{
        Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU32, Ordering},
    },
};

/// Linux's limit on interface names (`IFNAMSIZ` - 1).
const MAX_IFNAME: usize = 15;

/// The /30 subnets handed out: 10.203.0.0/16 holds 16384 of them.
const SUBNETS: u32 = 1 << 14;

/// Subnets tried, from the one derived from pid and counter, before giving up.
const SUBNET_TRIES: u32 = 64;

static FORK_LOCK: Mutex<()> = Mutex::new(());

/// Namespaces created by this process so far: makes names and subnets unique in it.
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Takes the process-wide fork lock.
///
/// Between `fork` and `exec` a child process holds a copy of every descriptor of its parent
/// (`O_CLOEXEC` closes them only at `exec`). A socket this process just closed can therefore
/// stay bound for a moment while another thread spawns a command, and a test asserting "the
/// old port is free" (by binding it) fails at random. [`run`] holds this lock while its child
/// runs; hold it too around such an assertion, and around any other spawn in a test that
/// checks ports. Do not call [`run`] while holding it: the lock is not reentrant.
///
/// A poisoned lock (a test panicked while holding it) is taken anyway.
pub fn no_fork() -> MutexGuard<'static, ()> {
    FORK_LOCK.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Whether the process runs as root (effective user id 0): creating a [`Netns`] needs it.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Runs `args[0]` with the other arguments, holding [`no_fork`], and waits for it. The error
/// names the command and carries its standard error, or says why it could not start.
pub fn run(args: &[&str]) -> Result<(), String> {
    output(args).map(drop)
}

/// Like [`run`], returning the command's standard output.
fn output(args: &[&str]) -> Result<String, String> {
    let Some((program, rest)) = args.split_first() else {
        return Err("run: empty command".to_owned());
    };
    let shown = args.join(" ");
    let result = {
        let _forking = no_fork();
        Command::new(program).args(rest).output()
    };
    let output = result.map_err(|e| format!("{shown}: {e}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "{shown}: {} ({})",
            String::from_utf8_lossy(&output.stderr).trim(),
            output.status
        ))
    }
}

/// A network namespace joined to the root namespace by a veth pair; dropping it deletes both.
///
/// Names come from the prefix, the process id and a process-wide counter, so that tests
/// running in parallel, in one process or several, do not collide. The /30 subnet in
/// 10.203.0.0/16 is derived from the process id and the counter, skipping subnets already
/// configured in the root namespace.
#[derive(Debug)]
pub struct Netns {
    /// The namespace's name (`ip netns`; see [`Netns::path`]).
    pub name: String,
    /// The address of the veth end in the root namespace.
    pub root_ip: Ipv4Addr,
    /// The address of the veth end inside the namespace.
    pub inner_ip: Ipv4Addr,
    veth_root: String,
    veth_inner: String,
}

impl Netns {
    /// Creates the namespace `{prefix}{pid}-{counter}`, a veth pair between it and the root
    /// namespace with a /30 subnet, and brings both ends and the namespace's loopback up.
    ///
    /// Returns why it could not (not root, `ip` missing, ...): callers usually skip the test
    /// then. Whatever was created before a failure is deleted.
    pub fn create(prefix: &str) -> Result<Self, String> {
        let pid = std::process::id();
        let counter = COUNTER.fetch_add(1, Ordering::Relaxed);
        let (name, veth_root, veth_inner) = names(prefix, pid, counter)?;
        let used = output(&["ip", "-4", "-o", "addr", "show"])?;
        let (root_ip, inner_ip) = (0..SUBNET_TRIES)
            .map(|step| subnet(first_subnet(pid, counter) + step))
            .find(|(root, inner)| {
                !used.contains(&format!("inet {root}/"))
                    && !used.contains(&format!("inet {inner}/"))
            })
            .ok_or_else(|| format!("no free /30 subnet in 10.203.0.0/16 for {name}"))?;
        // From here `netns` is a guard: a failure below still deletes what was made.
        let netns = Self {
            name,
            root_ip,
            inner_ip,
            veth_root,
            veth_inner,
        };
        let (n, va, vb) = (&netns.name, &netns.veth_root, &netns.veth_inner);
        let root_cidr = format!("{root_ip}/30");
        let inner_cidr = format!("{inner_ip}/30");
        run(&["ip", "netns", "add", n])?;
        run(&["ip", "link", "add", va, "type", "veth", "peer", "name", vb])?;
        run(&["ip", "link", "set", vb, "netns", n])?;
        run(&["ip", "addr", "add", &root_cidr, "dev", va])?;
        run(&["ip", "link", "set", va, "up"])?;
        run(&["ip", "-n", n, "addr", "add", &inner_cidr, "dev", vb])?;
        run(&["ip", "-n", n, "link", "set", vb, "up"])?;
        run(&["ip", "-n", n, "link", "set", "lo", "up"])?;
        Ok(netns)
    }

    /// The namespace's file, `/var/run/netns/{name}`: give it to `setns` (e.g.
    /// `udp_shim_server::bind_in_netns`) or `nsenter --net=`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/var/run/netns/{}", self.name))
    }

    /// The veth end in the root namespace (at most 15 characters).
    pub fn veth_root(&self) -> &str {
        &self.veth_root
    }

    /// The veth end inside the namespace (at most 15 characters).
    pub fn veth_inner(&self) -> &str {
        &self.veth_inner
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting one end of a veth pair deletes both; deleting the namespace would too, but
        // only once no process is left in it. Errors: nothing more to do in a drop.
        let _ = run(&["ip", "link", "del", &self.veth_root]);
        let _ = run(&["ip", "netns", "del", &self.name]);
    }
}

/// The namespace name and the two interface names for `prefix`, `pid` and `counter`.
///
/// Interfaces are `{letters}{pid}-{counter}a` / `b`, where `letters` is up to the first 3
/// ASCII letters of the prefix (lowercased; `t` when it has none): letters then digits keep
/// names of different prefixes and pids apart within 15 characters.
fn names(prefix: &str, pid: u32, counter: u32) -> Result<(String, String, String), String> {
    let clean: String = prefix
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .collect();
    let mut letters: String = prefix
        .chars()
        .filter(char::is_ascii_alphabetic)
        .take(3)
        .map(|c| c.to_ascii_lowercase())
        .collect();
    if letters.is_empty() {
        letters.push('t');
    }
    let stem = format!("{letters}{pid}-{counter}");
    if stem.len() + 1 > MAX_IFNAME {
        return Err(format!(
            "interface name {stem}a longer than {MAX_IFNAME} characters"
        ));
    }
    Ok((
        format!("{clean}{pid}-{counter}"),
        format!("{stem}a"),
        format!("{stem}b"),
    ))
}

/// The index of the first /30 subnet to try for `pid` and `counter`: 256 pid buckets of 64
/// counters each.
fn first_subnet(pid: u32, counter: u32) -> u32 {
    ((pid % 256) * 64 + counter % 64) % SUBNETS
}

/// The root-side and inner addresses of /30 subnet number `index` (mod 16384) of
/// 10.203.0.0/16.
fn subnet(index: u32) -> (Ipv4Addr, Ipv4Addr) {
    let base = u32::from(Ipv4Addr::new(10, 203, 0, 0)) + (index % SUBNETS) * 4;
    (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn empty_command_is_an_error() {
        assert_eq!(run(&[]).unwrap_err(), "run: empty command");
    }

    #[test]
    fn failing_command_is_an_error_naming_it() {
        let err = run(&["sh", "-c", "echo oops >&2; exit 3"]).unwrap_err();
        assert!(err.starts_with("sh -c echo oops"), "{err}");
        assert!(err.contains("oops"), "{err}");
        assert!(err.contains('3'), "{err}");
    }

    #[test]
    fn missing_program_is_an_error() {
        let err = run(&["/nonexistent/program"]).unwrap_err();
        assert!(err.starts_with("/nonexistent/program: "), "{err}");
    }

    #[test]
    fn succeeding_command_is_ok() {
        run(&["true"]).unwrap();
        assert_eq!(output(&["echo", "hi"]).unwrap(), "hi\n");
    }

    #[test]
    fn names_fit_and_differ() {
        let max_pid = 4_194_304; // pid_max's upper limit on 64-bit Linux
        let (name, a, b) = names("udp-shim server", max_pid, 999).unwrap();
        assert_eq!(name, "udp-shimserver4194304-999");
        assert_eq!(
            (a.as_str(), b.as_str()),
            ("udp4194304-999a", "udp4194304-999b")
        );
        assert!(a.len() <= MAX_IFNAME);
        let (_, first, _) = names("x", 7, 0).unwrap();
        let (_, second, _) = names("x", 7, 1).unwrap();
        assert_ne!(first, second);
        let (_, digits_only, _) = names("123", 7, 0).unwrap();
        assert_eq!(digits_only, "t7-0a");
    }

    #[test]
    fn too_long_interface_name_is_an_error() {
        let err = names("udp", 4_194_304, 1000).unwrap_err();
        assert!(err.contains("longer than 15"), "{err}");
    }

    #[test]
    fn subnets_are_aligned_30s_in_10_203() {
        assert_eq!(
            subnet(0),
            (Ipv4Addr::new(10, 203, 0, 1), Ipv4Addr::new(10, 203, 0, 2))
        );
        assert_eq!(
            subnet(SUBNETS - 1),
            (
                Ipv4Addr::new(10, 203, 255, 253),
                Ipv4Addr::new(10, 203, 255, 254)
            )
        );
        assert_eq!(subnet(SUBNETS), subnet(0));
        let firsts: HashSet<u32> = (0..64).map(|c| first_subnet(12345, c)).collect();
        assert_eq!(firsts.len(), 64, "one process's namespaces share a subnet");
    }

    #[test]
    fn two_namespaces_in_one_process_coexist_and_are_deleted() {
        if !crate::require("needs root (ip netns, veth)", is_root()) {
            return;
        }
        let Some(first) =
            crate::require_ok("creating a network namespace", Netns::create("tsupport"))
        else {
            return;
        };
        let second = Netns::create("tsupport").unwrap();
        assert_ne!(first.name, second.name);
        assert_ne!(first.veth_root(), second.veth_root());
        assert_ne!(first.root_ip, second.root_ip);
        for netns in [&first, &second] {
            assert!(netns.path().exists(), "{} missing", netns.path().display());
            let inside = output(&["ip", "-n", &netns.name, "-4", "-o", "addr", "show"]).unwrap();
            assert!(
                inside.contains(&format!("inet {}/30", netns.inner_ip)),
                "{inside}"
            );
        }
        let (path, veth) = (first.path(), first.veth_root().to_owned());
        drop(first);
        assert!(!path.exists(), "{} left behind", path.display());
        run(&["ip", "link", "show", &veth]).unwrap_err();
        drop(second);
    }
}
