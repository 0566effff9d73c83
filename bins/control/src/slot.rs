//! Slots: where a service runs on a simulated host. A slot is a network namespace behind the
//! host's address with a host UDP port mapped to the service's port 4242 in it; the server is
//! started into it (`nsenter --net=<slot.netns>`) or restored into it by CRIU.
//!
//! ```text
//!   host's network namespace (the agent's)                slot qlm-mh-<service>
//!   host_addr:host_port/udp ── DNAT (netavark) ──▶ podman0 ──▶ 10.88.x.y:4242  (server)
//!   agent's private mount namespace:
//!     <storage>/podman/{root,runroot,tmp,networks}  podman's own state, on the agent's tmpfs
//!     <storage>/podman/ipam   bound on /run/containers/networks (netavark's IPAM database)
//!     <storage>/podman/netns  bound on /run/netns (the slots' namespace files)
//! ```
//!
//! Each host runs its own rootful podman, inside the host's network namespace and the
//! agent's private mount namespace: `--root`, `--runroot`, `--tmpdir` and a network config
//! folder under the agent's storage, and a `containers.conf` of its own (`CONTAINERS_CONF`:
//! runc, cgroupfs, file events, file locks in its tmpdir rather than `/dev/shm/libpod_lock`,
//! netavark). Its bridge, the container's veth and the port map (netavark's iptables DNAT)
//! therefore live in the host's namespace, and the container holds nothing but `sleep`: its
//! network namespace is the slot.
//!
//! Verified here (2026-11-27, podman 4.3.1, netavark 1.4.0, runc, kernel 6.18, three hosts
//! and a client site as network namespaces on a bridge): a UDP echo started with `nsenter
//! --net=<SandboxKey>` answered a client namespace at host_addr:host_port, from that
//! address; two and three hosts ran podman at once with the same container names, the same
//! host ports and the same 10.88.0.0/16 subnet. What it takes:
//! - rootful podman 4.3 keeps netavark's IPAM database in `/run/containers/networks`,
//!   hard-coded (shared by every rootful podman of the machine) and its namespace files in
//!   `/run/netns`; without the two bind mounts the hosts share one `ipam.db` (addresses
//!   10.88.2.60, .61 ... across hosts) and the namespace files appear, empty, in the
//!   machine's `/run/netns`, while their mounts exist only in the agent's mount namespace
//!   (`nsenter --net=` on them from outside: `reassociate to namespace 'ns/net' failed:
//!   Invalid argument`). So a slot's `netns` path is valid inside the agent's mount namespace
//!   only, and [`Slot::create`] refuses to run in the machine's own mount or network
//!   namespace.
//! - `podman run -d` of a slot took 0.26-0.41 s (0.7 s with two hosts starting at once on 2
//!   cores), `podman rm -f -t 0` 0.27 s; a slot costs about 2 MiB (conmon ~1.7 MiB and the
//!   container's `sleep` ~0.25 MiB of charged memory), a host's storage about 2 MiB of tmpfs
//!   (the busybox image). The fallback (a bare namespace, a veth and an iptables DNAT, no
//!   podman) took 0.03 s and works too (in-kernel conntrack NAT works; its netlink interface
//!   does not).
//! - A host port already in use: podman refuses (`cannot listen on the UDP port: listen udp4
//!   :5601: bind: address already in use`, it holds the port with conmon) and leaves the
//!   container behind in state Created; [`Slot::create`] checks the port first and removes a
//!   half-made container.
//! - After the last container of a host is removed, netavark removes the bridge but leaves its
//!   empty NETAVARK-HOSTPORT-* chains (in the host's namespace, which goes with the host).
//!
//! Containers run under the cgroup parent `/qlm-mh-<host netns inode>-<hash of the storage
//! path>`, so that what a killed agent left (its podman state went with its tmpfs, its
//! conmons and containers live on) is found by [`Slot::remove_orphans`].

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::podman::CONTAINER_PORT;
use crate::sys::{run, run_unchecked};

/// The prefix of every slot's container name, the image and the cgroup parent.
pub(crate) const PREFIX: &str = "qlm-mh-";

/// The slots' image: busybox's `sleep`, imported into each host's podman.
const IMAGE: &str = "localhost/qlm-mh-slot:latest";

/// The longest service name (the container is `qlm-mh-<service>`).
const MAX_SERVICE: usize = 48;

/// What a slot is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub(crate) enum SlotKind {
    /// A container of the host's own podman: its network namespace, port map and bridge.
    Podman,
}

/// What to make.
#[derive(Debug, Clone)]
pub(crate) struct SlotSpec {
    /// The service's name: the slot is `qlm-mh-<service>`.
    pub(crate) service: String,
    /// The host's own address on the scenario network (or any local address).
    pub(crate) host_addr: Ipv4Addr,
    /// The host UDP port mapped to the service's port 4242 in the slot.
    pub(crate) host_port: u16,
    /// The agent's private storage root (its tmpfs); podman's state goes under
    /// `<storage>/podman`.
    pub(crate) storage: PathBuf,
}

/// A slot that exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Slot {
    /// The container's name, `qlm-mh-<service>`.
    pub(crate) name: String,
    /// The slot's network namespace: for `nsenter --net=` and `setns`, inside the agent's
    /// mount namespace.
    pub(crate) netns: PathBuf,
    pub(crate) host_port: u16,
    pub(crate) kind: SlotKind,
    storage: PathBuf,
}

impl Slot {
    /// A slot record for tests that never touch it (no namespace, no container).
    #[cfg(test)]
    pub(crate) fn for_test(name: &str, storage: &std::path::Path) -> Slot {
        Slot {
            name: name.to_owned(),
            netns: storage.join("no-netns"),
            host_port: 0,
            kind: SlotKind::Podman,
            storage: storage.to_path_buf(),
        }
    }

    /// Makes the slot: the host's podman (prepared on first use), the image (imported on
    /// first use), the container with its port map. Must run in the host's network namespace
    /// and the agent's private mount namespace (on the calling thread: commands inherit the
    /// thread's namespaces). A host port already in use, or a service that has a slot
    /// already, is an error that names it; a failure leaves no container behind.
    pub(crate) fn create(spec: &SlotSpec) -> Result<Slot> {
        check_service(&spec.service)?;
        let host = HostPodman::prepare(&spec.storage)?;
        let name = format!("{PREFIX}{}", spec.service);
        if host.exists(&name)? {
            bail!(
                "service {} has a slot already ({name}); remove it first",
                spec.service
            );
        }
        port_free(spec.host_addr, spec.host_port)
            .with_context(|| format!("no slot made for {}", spec.service))?;
        host.ensure_image()?;
        let started = Instant::now();
        let publish = format!("{}:{}:{CONTAINER_PORT}/udp", spec.host_addr, spec.host_port);
        let res = run_unchecked(
            &format!("start slot {name}"),
            host.podman()
                .args(["run", "-d", "--name", &name])
                .args(["--cgroup-parent", &host.cgroup_parent])
                .args([
                    "--ulimit",
                    "nofile=1024:1024",
                    "--ulimit",
                    "nproc=1000:1000",
                ])
                .args(["-p", &publish])
                .arg(IMAGE),
        )?;
        if !res.output.status.success() {
            let err = String::from_utf8_lossy(&res.output.stderr)
                .trim()
                .to_owned();
            // podman leaves a container it could not start in state Created.
            host.remove(&name).ok();
            if err.contains("address already in use") {
                bail!(
                    "host port {}:{}/udp is already taken (podman: {err}); no slot made for {}",
                    spec.host_addr,
                    spec.host_port,
                    spec.service
                );
            }
            bail!("starting the slot {name} failed: {err}");
        }
        let netns = match host.sandbox_key(&name) {
            Ok(p) => p,
            Err(e) => {
                host.remove(&name).ok();
                return Err(e);
            }
        };
        tracing::info!(
            slot = %name,
            ms = format_args!("{:.1}", started.elapsed().as_secs_f64() * 1e3),
            netns = %netns.display(),
            "slot created"
        );
        Ok(Slot {
            name,
            netns,
            host_port: spec.host_port,
            kind: SlotKind::Podman,
            storage: spec.storage.clone(),
        })
    }

    /// Removes the container (its namespace, veth and port map go with it). Removing a slot
    /// that is gone already is fine. When it was the host's last, what netavark and podman
    /// keep beyond their containers goes too: the cgroup parent, netavark's empty
    /// NETAVARK-* chains and the bridge. Not concurrently with [`Slot::create`] on the same
    /// host (the agent makes and removes its slots one at a time).
    pub(crate) fn remove(&self) -> Result<()> {
        let host = HostPodman::prepare(&self.storage)?;
        host.remove(&self.name)?;
        if host.slots()?.is_empty() {
            host_leftovers(&host.cgroup_parent, Duration::from_secs(2))?;
        }
        Ok(())
    }

    /// The slots this host's podman knows (containers named `qlm-mh-*`), e.g. those an agent
    /// finds after it restarted in the same mount namespace.
    /// The agent's storage the slot's podman state is under.
    pub(crate) fn storage(&self) -> &Path {
        &self.storage
    }

    pub(crate) fn list(storage: &Path) -> Result<Vec<Slot>> {
        let host = HostPodman::prepare(storage)?;
        host.slots()?
            .into_iter()
            .map(|(name, host_port)| {
                Ok(Slot {
                    netns: host.sandbox_key(&name)?,
                    name,
                    host_port,
                    kind: SlotKind::Podman,
                    storage: storage.to_owned(),
                })
            })
            .collect()
    }

    /// After an agent was killed: its podman state went with its mount namespace, while its
    /// conmons and containers may live on in this host's cgroup parent, and netavark's port
    /// maps in this host's namespace. When this host's podman knows no slot, kills those
    /// processes (by PID, from the cgroup parent's `cgroup.procs`), removes the cgroups,
    /// netavark's iptables chains and the `podman0` bridge of this namespace. Returns how
    /// many processes it ended. Refuses in the machine's own network namespace.
    pub(crate) fn remove_orphans(storage: &Path) -> Result<usize> {
        let host = HostPodman::prepare(storage)?;
        if !host.slots()?.is_empty() {
            return Ok(0);
        }
        let mut ended = 0;
        for pid in cgroup_pids(&host.cgroup_parent) {
            let pid = nix::unistd::Pid::from_raw(pid);
            if nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).is_ok() {
                ended += 1;
            }
        }
        host_leftovers(&host.cgroup_parent, Duration::from_secs(5))?;
        Ok(ended)
    }
}

/// What a host's podman keeps when it has no container: the cgroup parent (removed once its
/// processes have exited, waiting up to `wait`), netavark's chains, the bridge.
fn host_leftovers(cgroup_parent: &str, wait: Duration) -> Result<()> {
    remove_cgroups(cgroup_parent, wait);
    remove_netavark_rules()?;
    let bridge = Path::new("/sys/class/net/podman0");
    if bridge.exists() {
        run_unchecked(
            "remove podman0",
            Command::new("ip").args(["link", "del", "podman0"]),
        )?;
    }
    Ok(())
}

/// A service name: 1 to 48 of a-z, 0-9 and `-`.
fn check_service(s: &str) -> Result<()> {
    let ok = !s.is_empty()
        && s.len() <= MAX_SERVICE
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !ok {
        bail!("service name `{s}`: use 1 to {MAX_SERVICE} of a-z, 0-9 and -");
    }
    Ok(())
}

/// Checks that `addr:port` (and the wildcard) can be bound in the calling thread's network
/// namespace: a taken port and an address that is not this host's are errors that say so.
fn port_free(addr: Ipv4Addr, port: u16) -> Result<()> {
    for a in [Ipv4Addr::UNSPECIFIED, addr] {
        match UdpSocket::bind(SocketAddrV4::new(a, port)) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => bail!(
                "host port {addr}:{port}/udp is already taken in this host's network namespace \
                 (by another slot or process)"
            ),
            Err(e) => bail!("{addr}:{port}/udp cannot be bound in this host's namespace: {e}"),
        }
    }
    Ok(())
}

/// The namespace inode (`kind`: net, mnt) of the calling thread and of the machine's own
/// namespace. The machine's is read from kthreadd (PID 2, a kernel thread, always in the
/// initial namespaces; PID 1's namespaces are not readable here, `Permission denied`), or
/// PID 1 where PID 2 is not kthreadd.
fn ns_inodes(kind: &str) -> Result<(u64, u64)> {
    let ino = |p: String| {
        std::fs::metadata(&p)
            .map(|m| m.ino())
            .with_context(|| format!("reading {p}"))
    };
    let kthreadd = std::fs::read_to_string("/proc/2/comm").is_ok_and(|c| c.trim() == "kthreadd");
    let init = if kthreadd { 2 } else { 1 };
    Ok((
        ino(format!("/proc/thread-self/ns/{kind}"))?,
        ino(format!("/proc/{init}/ns/{kind}"))?,
    ))
}

/// A host's podman: its folders, its configuration, its cgroup parent.
struct HostPodman {
    dir: PathBuf,
    cgroup_parent: String,
}

impl HostPodman {
    /// Checks the namespaces, makes the folders and the configuration, and binds the IPAM and
    /// namespace folders over podman's hard-coded paths in this mount namespace (once).
    fn prepare(storage: &Path) -> Result<Self> {
        let (net, init_net) = ns_inodes("net")?;
        if net == init_net {
            bail!(
                "slots live in a simulated host's network namespace; this thread is in the \
                 machine's own, whose podman state is not ours: refusing"
            );
        }
        let (mnt, init_mnt) = ns_inodes("mnt")?;
        if mnt == init_mnt {
            bail!(
                "slots need the agent's private mount namespace (`unshare --mount \
                 --propagation private`): the host's podman binds its own folders over \
                 /run/containers/networks and /run/netns, which must not happen in the \
                 machine's"
            );
        }
        let storage = storage
            .canonicalize()
            .with_context(|| format!("the agent's storage folder {}", storage.display()))?;
        let dir = storage.join("podman");
        for sub in ["root", "runroot", "tmp", "networks", "ipam", "netns"] {
            crate::secure::private_dir(&dir.join(sub))?;
        }
        let conf = dir.join("containers.conf");
        let text = containers_conf(&dir);
        if std::fs::read_to_string(&conf).ok().as_deref() != Some(text.as_str()) {
            crate::secure::write_private(&conf, text.as_bytes())?;
        }
        bind_once(&dir.join("ipam"), Path::new("/run/containers/networks"))?;
        bind_once(&dir.join("netns"), Path::new("/run/netns"))?;
        Ok(HostPodman {
            cgroup_parent: format!("/{PREFIX}{net}-{:016x}", fnv1a(storage.as_os_str())),
            dir,
        })
    }

    fn podman(&self) -> Command {
        let d = |s: &str| self.dir.join(s);
        let mut c = Command::new("podman");
        c.env("CONTAINERS_CONF", d("containers.conf"))
            .arg("--root")
            .arg(d("root"))
            .arg("--runroot")
            .arg(d("runroot"))
            .arg("--tmpdir")
            .arg(d("tmp"))
            .arg("--network-config-dir")
            .arg(d("networks"))
            .args(["--storage-driver", "overlay", "--runtime", "runc"])
            .args(["--cgroup-manager", "cgroupfs", "--events-backend", "file"]);
        c
    }

    fn exists(&self, name: &str) -> Result<bool> {
        let r = run_unchecked(
            &format!("check slot {name}"),
            self.podman().args(["container", "exists", name]),
        )?;
        Ok(r.output.status.success())
    }

    /// Imports the busybox image unless this host has it.
    fn ensure_image(&self) -> Result<()> {
        let has = run_unchecked(
            "check the slot image",
            self.podman().args(["image", "exists", IMAGE]),
        )?;
        if has.output.status.success() {
            return Ok(());
        }
        let build = self.dir.join("tmp").join("slot-image");
        if build.exists() {
            std::fs::remove_dir_all(&build)?;
        }
        let rootfs = build.join("rootfs");
        std::fs::create_dir_all(rootfs.join("bin"))?;
        let busybox = crate::podman::busybox()?;
        std::fs::copy(&busybox, rootfs.join("bin/busybox"))
            .with_context(|| format!("copying {}", busybox.display()))?;
        std::os::unix::fs::symlink("busybox", rootfs.join("bin/sleep"))?;
        let tar = build.join("rootfs.tar");
        run(
            "pack the slot image",
            Command::new("tar")
                .arg("-C")
                .arg(&rootfs)
                .arg("-cf")
                .arg(&tar)
                .arg("."),
        )?;
        run(
            "import the slot image",
            self.podman()
                .args(["import", "--change", r#"CMD ["/bin/sleep", "2147483647"]"#])
                .arg(&tar)
                .arg(IMAGE),
        )?;
        std::fs::remove_dir_all(&build).ok();
        Ok(())
    }

    fn sandbox_key(&self, name: &str) -> Result<PathBuf> {
        let out = run(
            &format!("inspect slot {name}"),
            self.podman()
                .args(["inspect", "-f", "{{.NetworkSettings.SandboxKey}}", name]),
        )?;
        let path = PathBuf::from(out.stdout());
        if !path.is_absolute() || !path.exists() {
            bail!(
                "slot {name} has no network namespace (SandboxKey `{}`)",
                path.display()
            );
        }
        Ok(path)
    }

    fn remove(&self, name: &str) -> Result<()> {
        run(
            &format!("remove slot {name}"),
            self.podman()
                .args(["rm", "--force", "--ignore", "--time", "0", name]),
        )?;
        Ok(())
    }

    /// The slots' names and host ports.
    fn slots(&self) -> Result<Vec<(String, u16)>> {
        let out = run(
            "list slots",
            self.podman().args([
                "ps",
                "--all",
                "--filter",
                &format!("name=^{PREFIX}"),
                "--format",
                "{{.Names}} {{.Ports}}",
            ]),
        )?;
        Ok(out
            .stdout()
            .lines()
            .filter_map(|l| {
                let (name, ports) = l.split_once(' ').unwrap_or((l, ""));
                let name = name.trim();
                (!name.is_empty()).then(|| (name.to_owned(), host_port(ports).unwrap_or(0)))
            })
            .collect())
    }
}

fn containers_conf(dir: &Path) -> String {
    format!(
        "# Written by control (slot.rs): this host's own podman.\n\
         [engine]\n\
         runtime = \"runc\"\n\
         cgroup_manager = \"cgroupfs\"\n\
         events_logger = \"file\"\n\
         lock_type = \"file\"\n\
         tmp_dir = \"{tmp}\"\n\
         [network]\n\
         network_backend = \"netavark\"\n\
         network_config_dir = \"{net}\"\n",
        tmp = dir.join("tmp").display(),
        net = dir.join("networks").display(),
    )
}

/// Binds `src` over `target` in this mount namespace unless it is there already.
fn bind_once(src: &Path, target: &Path) -> Result<()> {
    let same = |a: &Path, b: &Path| -> bool {
        match (std::fs::metadata(a), std::fs::metadata(b)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        }
    };
    if same(src, target) {
        return Ok(());
    }
    std::fs::create_dir_all(target).with_context(|| format!("creating {}", target.display()))?;
    run(
        &format!("bind {} on {}", src.display(), target.display()),
        Command::new("mount").arg("--bind").arg(src).arg(target),
    )?;
    Ok(())
}

/// FNV-1a (64 bits) of a path: a stable short name for it.
fn fnv1a(s: &std::ffi::OsStr) -> u64 {
    use std::os::unix::ffi::OsStrExt as _;
    s.as_bytes().iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The cgroup folders of `parent` in every hierarchy (v1: one per controller; v2: one).
fn cgroup_dirs(parent: &str) -> Vec<PathBuf> {
    let rel = parent.trim_start_matches('/');
    let mut v: Vec<PathBuf> = std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .filter_map(|e| Some(e.ok()?.path().join(rel)))
        .chain([Path::new("/sys/fs/cgroup").join(rel)])
        .filter(|p| p.is_dir())
        .collect();
    v.sort();
    v.dedup();
    v
}

/// Every PID in `parent`'s cgroups and their descendants.
fn cgroup_pids(parent: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    let mut stack = cgroup_dirs(parent);
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                stack.push(e.path());
            }
        }
        if let Ok(text) = std::fs::read_to_string(d.join("cgroup.procs")) {
            pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
        }
    }
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// Removes `parent`'s cgroups, deepest first, once they are empty (waiting up to `wait`
/// for exiting processes); what cannot be removed then stays, with a warning.
fn remove_cgroups(parent: &str, wait: Duration) {
    let deadline = Instant::now() + wait;
    while !cgroup_pids(parent).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    for top in cgroup_dirs(parent) {
        let mut dirs = vec![top.clone()];
        let mut i = 0;
        while i < dirs.len() {
            let d = dirs[i].clone();
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                if e.path().is_dir() {
                    dirs.push(e.path());
                }
            }
            i += 1;
        }
        for d in dirs.iter().rev() {
            if let Err(e) = std::fs::remove_dir(d) {
                tracing::warn!("cannot remove the cgroup {}: {e}", d.display());
            }
        }
    }
}

/// Deletes netavark's iptables rules and chains (`NETAVARK*`) in this namespace: the jumps to
/// them from the built-in chains (by rule number, so that quoted comments need no parsing),
/// then the chains.
fn remove_netavark_rules() -> Result<()> {
    for table in ["nat", "filter"] {
        let list = |chain: Option<&str>| -> Result<String> {
            let mut cmd = Command::new("iptables");
            cmd.args(["-t", table, "-S"]);
            cmd.args(chain);
            Ok(run(&format!("list iptables {table}"), &mut cmd)?.stdout())
        };
        let text = list(None)?;
        let builtin: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("-P "))
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        for chain in builtin {
            let rules = list(Some(chain))?;
            let numbers: Vec<usize> = rules
                .lines()
                .filter(|l| l.starts_with("-A "))
                .enumerate()
                .filter(|(_, l)| l.contains("NETAVARK"))
                .map(|(i, _)| i + 1)
                .collect();
            for n in numbers.into_iter().rev() {
                run(
                    "remove a jump to netavark's chains",
                    Command::new("iptables").args(["-t", table, "-D", chain, &n.to_string()]),
                )?;
            }
        }
        let chains: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("-N "))
            .filter(|c| c.starts_with("NETAVARK"))
            .collect();
        for c in &chains {
            run(
                "flush a netavark chain",
                Command::new("iptables").args(["-t", table, "-F", c]),
            )?;
        }
        for c in &chains {
            run(
                "delete a netavark chain",
                Command::new("iptables").args(["-t", table, "-X", c]),
            )?;
        }
    }
    Ok(())
}

/// The host port of a `podman ps` port column, `10.233.0.11:5301->4242/udp`.
fn host_port(ports: &str) -> Option<u16> {
    let (host, _) = ports.split_once("->")?;
    host.rsplit(':').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::net::SocketAddr;

    use nix::sched::{CloneFlags, setns, unshare};

    use super::*;

    #[test]
    fn host_ports_are_read_from_podman_ps() {
        assert_eq!(host_port("10.233.0.11:5301->4242/udp"), Some(5301));
        assert_eq!(host_port("0.0.0.0:7->4242/udp"), Some(7));
        assert_eq!(host_port(""), None);
    }

    #[test]
    fn service_names_are_checked() {
        for ok in ["a", "echo-1", &"x".repeat(MAX_SERVICE)] {
            check_service(ok).unwrap();
        }
        for bad in ["", "Echo", "a/b", "a b", &"x".repeat(MAX_SERVICE + 1)] {
            assert!(check_service(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn not_in_the_machines_own_namespaces() {
        if !test_support::require("needs root (/proc/2/ns)", test_support::is_root()) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let spec = SlotSpec {
            service: "x".into(),
            host_addr: Ipv4Addr::LOCALHOST,
            host_port: 1,
            storage: dir.path().to_owned(),
        };
        let e = format!("{:#}", Slot::create(&spec).unwrap_err());
        assert!(e.contains("machine's own"), "{e}");
        assert!(!dir.path().join("podman").exists(), "nothing made");
    }

    fn ready() -> bool {
        let podman = Command::new("podman")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        test_support::require("needs root (ip netns, podman)", test_support::is_root())
            && test_support::require("needs podman and runc (cargo xtask setup)", podman)
            && test_support::require(
                "needs busybox-static (cargo xtask setup)",
                crate::podman::busybox().is_ok(),
            )
    }

    /// A host (a namespace of its own) and a client site joined by a veth pair, and a
    /// folder for the agent's tmpfs; removed when dropped.
    struct World {
        host: String,
        client: String,
        storage: PathBuf,
    }

    const HOST_ADDR: Ipv4Addr = Ipv4Addr::new(10, 233, 200, 1);
    const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 233, 200, 2);

    impl World {
        fn new(test: &str) -> World {
            let base = format!("{PREFIX}t{}-{test}", std::process::id());
            let w = World {
                host: format!("{base}-h"),
                client: format!("{base}-c"),
                storage: std::env::temp_dir().join(&base),
            };
            std::fs::create_dir_all(&w.storage).unwrap();
            let ip = |args: &[&str]| test_support::netns::run(&[&["ip"], args].concat()).unwrap();
            ip(&["netns", "add", &w.host]);
            ip(&["netns", "add", &w.client]);
            ip(&[
                "-n",
                &w.host,
                "link",
                "add",
                "qlm-mh-eth",
                "type",
                "veth",
                "peer",
                "name",
                "qlm-mh-eth",
                "netns",
                &w.client,
            ]);
            for (ns, addr) in [(&w.host, HOST_ADDR), (&w.client, CLIENT_ADDR)] {
                ip(&[
                    "-n",
                    ns,
                    "addr",
                    "add",
                    &format!("{addr}/24"),
                    "dev",
                    "qlm-mh-eth",
                ]);
                ip(&["-n", ns, "link", "set", "qlm-mh-eth", "up"]);
                ip(&["-n", ns, "link", "set", "lo", "up"]);
            }
            w
        }

        fn open(ns: &str) -> File {
            File::open(Path::new("/run/netns").join(ns)).unwrap()
        }

        /// Runs `f` on a thread standing in for the host's agent: a private mount namespace
        /// with a tmpfs at the storage folder, inside the host's network namespace. Commands
        /// it runs inherit both.
        fn as_agent<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
            let host = Self::open(&self.host);
            let storage = self.storage.clone();
            let res = std::thread::spawn(move || {
                unshare(CloneFlags::CLONE_NEWNS).unwrap();
                run(
                    "private mounts",
                    Command::new("mount").args(["--make-rprivate", "/"]),
                )
                .unwrap();
                run(
                    "the agent's tmpfs",
                    Command::new("mount")
                        .args(["-t", "tmpfs", "-o", "mode=0700,size=256m", "qlm-mh-test"])
                        .arg(&storage),
                )
                .unwrap();
                setns(host, CloneFlags::CLONE_NEWNET).unwrap();
                f()
            })
            .join();
            match res {
                Ok(v) => v,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }

        fn iptables_nat(&self) -> String {
            let out = Command::new("ip")
                .args(["netns", "exec", &self.host, "iptables", "-t", "nat", "-S"])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        }

        fn links(&self) -> String {
            let out = Command::new("ip")
                .args(["-n", &self.host, "-o", "link"])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        }
    }

    impl Drop for World {
        fn drop(&mut self) {
            for ns in [&self.host, &self.client] {
                test_support::netns::run(&["ip", "netns", "del", ns]).ok();
            }
            std::fs::remove_dir(&self.storage).ok();
        }
    }

    /// Removes the slots it holds when dropped, on the agent's thread (also when a test
    /// panics there).
    struct Made(Vec<Slot>);

    impl Drop for Made {
        fn drop(&mut self) {
            for s in &self.0 {
                if let Err(e) = s.remove() {
                    eprintln!("removing {}: {e:#}", s.name);
                }
            }
        }
    }

    fn spec(w: &World, service: &str, port: u16) -> SlotSpec {
        SlotSpec {
            service: service.into(),
            host_addr: HOST_ADDR,
            host_port: port,
            storage: w.storage.clone(),
        }
    }

    /// A UDP echo of one datagram in the namespace `netns`, on a thread of its own.
    fn echo_once(netns: File) -> std::thread::JoinHandle<SocketAddr> {
        let (tx, rx) = std::sync::mpsc::channel();
        let h = std::thread::spawn(move || {
            setns(netns, CloneFlags::CLONE_NEWNET).unwrap();
            let s =
                UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, CONTAINER_PORT)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            tx.send(()).unwrap();
            let mut buf = [0u8; 64];
            let (n, peer) = s.recv_from(&mut buf).unwrap();
            s.send_to(&buf[..n], peer).unwrap();
            peer
        });
        rx.recv().unwrap();
        h
    }

    /// Sends from the client site to HOST_ADDR:port; the answer must come from there.
    fn ask(client: File, port: u16, msg: &str) -> String {
        let msg = msg.to_owned();
        std::thread::spawn(move || {
            setns(client, CloneFlags::CLONE_NEWNET).unwrap();
            let s = UdpSocket::bind(SocketAddrV4::new(CLIENT_ADDR, 0)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let to = SocketAddrV4::new(HOST_ADDR, port);
            s.send_to(msg.as_bytes(), to).unwrap();
            let mut buf = [0u8; 64];
            let (n, from) = s.recv_from(&mut buf).unwrap();
            assert_eq!(
                from,
                SocketAddr::V4(to),
                "the answer leaves from the host's address"
            );
            String::from_utf8_lossy(&buf[..n]).into_owned()
        })
        .join()
        .unwrap()
    }

    #[test]
    fn two_slots_answer_at_the_hosts_address_and_leave_nothing() {
        if !ready() {
            return;
        }
        let w = World::new("two");
        let (client_a, client_b) = (World::open(&w.client), World::open(&w.client));
        let (sa, sb) = (spec(&w, "echo-a", 5301), spec(&w, "echo-b", 5302));
        let (taken_slot, taken_sock, keys, parent) = w.as_agent(move || {
            let mut made = Made(Vec::new());
            made.0.push(Slot::create(&sa).unwrap());
            made.0.push(Slot::create(&sb).unwrap());
            let (a, b) = (&made.0[0], &made.0[1]);
            assert_eq!((a.name.as_str(), a.host_port), ("qlm-mh-echo-a", 5301));
            assert_eq!(b.kind, SlotKind::Podman);
            assert_ne!(
                sys_ino(&a.netns),
                sys_ino(&b.netns),
                "each slot its own namespace"
            );
            let ea = echo_once(File::open(&a.netns).unwrap());
            let eb = echo_once(File::open(&b.netns).unwrap());
            assert_eq!(ask(client_a, 5301, "to a"), "to a");
            assert_eq!(ask(client_b, 5302, "to b"), "to b");
            // The slot sees the client's own address (no masquerade on the way in).
            assert_eq!(ea.join().unwrap().ip(), std::net::IpAddr::V4(CLIENT_ADDR));
            assert_eq!(eb.join().unwrap().ip(), std::net::IpAddr::V4(CLIENT_ADDR));

            // A host port in use, by a slot or by a process, is a clear error.
            let mut again = sa.clone();
            again.service = "echo-c".into();
            let taken_slot = format!("{:#}", Slot::create(&again).unwrap_err());
            let sock = UdpSocket::bind(SocketAddrV4::new(HOST_ADDR, 5303)).unwrap();
            again.host_port = 5303;
            let taken_sock = format!("{:#}", Slot::create(&again).unwrap_err());
            drop(sock);
            let mut foreign = again.clone();
            foreign.host_addr = Ipv4Addr::new(10, 233, 201, 1);
            let e = format!("{:#}", Slot::create(&foreign).unwrap_err());
            assert!(
                e.contains("cannot be bound in this host's namespace"),
                "{e}"
            );
            let slots = Slot::list(&sa.storage).unwrap();
            assert_eq!(slots.len(), 2, "{slots:?}");

            let keys: Vec<PathBuf> = made.0.iter().map(|s| s.netns.clone()).collect();
            let parent = HostPodman::prepare(&sa.storage).unwrap().cgroup_parent;
            assert!(
                cgroup_pids(&parent).len() >= 4,
                "two conmons and two containers under {parent}"
            );
            for s in std::mem::take(&mut made.0) {
                s.remove().unwrap();
                s.remove().unwrap(); // twice is fine
            }
            assert_eq!(Slot::list(&sa.storage).unwrap(), Vec::new());
            assert!(
                cgroup_dirs(&parent).is_empty(),
                "{:?}",
                cgroup_dirs(&parent)
            );
            (taken_slot, taken_sock, keys, parent)
        });
        assert!(
            taken_slot.contains("5301/udp is already taken"),
            "{taken_slot}"
        );
        assert!(
            taken_sock.contains("5303/udp is already taken"),
            "{taken_sock}"
        );
        let nat = w.iptables_nat();
        assert!(!nat.contains("NETAVARK"), "{nat}");
        assert!(!w.links().contains("podman0"), "{}", w.links());
        assert!(cgroup_dirs(&parent).is_empty());
        for k in keys {
            let name = k.file_name().unwrap();
            assert!(
                !Path::new("/run/netns").join(name).exists(),
                "{} leaked into the machine's /run/netns",
                k.display()
            );
        }
    }

    fn sys_ino(p: &Path) -> u64 {
        std::fs::metadata(p).unwrap().ino()
    }

    #[test]
    fn a_killed_agents_slots_are_removed_by_the_next() {
        if !ready() {
            return;
        }
        let w = World::new("orph");
        let s = spec(&w, "lost", 5311);
        // The first agent makes a slot and "dies": its thread ends, its podman state stays
        // on its tmpfs, reachable by nobody, its conmon and container run on.
        let s1 = s.clone();
        w.as_agent(move || {
            Slot::create(&s1).unwrap();
        });
        assert!(w.iptables_nat().contains("5311"));
        let s2 = s.clone();
        let (ended, parent, again) = w.as_agent(move || {
            // A fresh tmpfs: this podman knows nothing of the first one's slot.
            assert_eq!(Slot::list(&s2.storage).unwrap(), Vec::new());
            let parent = HostPodman::prepare(&s2.storage).unwrap().cgroup_parent;
            let ended = Slot::remove_orphans(&s2.storage).unwrap();
            // The port is free again: a new slot takes it, and goes.
            let again = Slot::create(&s2).map(|slot| slot.remove());
            (ended, parent, again.is_ok_and(|r| r.is_ok()))
        });
        assert!(ended >= 2, "conmon and the container's sleep: {ended}");
        assert!(again, "the port is free again");
        assert!(cgroup_pids(&parent).is_empty());
        assert!(
            cgroup_dirs(&parent).is_empty(),
            "{:?}",
            cgroup_dirs(&parent)
        );
        let nat = w.iptables_nat();
        assert!(!nat.contains("NETAVARK"), "{nat}");
        assert!(!w.links().contains("podman0"));
    }
}
