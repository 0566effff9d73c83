//! A service on this host: its slot (network namespace and host port), its private folder,
//! its supervisor (the server's parent) and its server.
//!
//! ```text
//!  <storage>/services/<name>/        0700 root (the same path on every host: a restored
//!     admin/                         server reopens its admin folder and its log by path)
//!     server.log                     the server's stdout and stderr
//!     supervisor.sock, supervisor.log
//!     service.json                   its record: a restarted agent adopts the service when
//!                                    the recorded server still runs under its supervisor
//! ```

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use std::time::Duration;

use admin_api::{AdminDir, Ready};
use agent_protocol::{Name, ServiceStatus};
use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tracing::{info, warn};

use crate::slot::Slot;
use crate::supervisor::{self, SupervisorReply, SupervisorRequest};
use crate::{secure, sys};

/// How long a new server may take to say it is ready.
const READY_LIMIT: Duration = Duration::from_secs(20);
/// How long a supervisor may take to answer.
const ASK_LIMIT: Duration = Duration::from_secs(5);
/// The port services listen on inside their slot.
pub(crate) const SERVICE_PORT: u16 = 4242;

/// The files of one service.
#[derive(Debug, Clone)]
pub(crate) struct Paths {
    pub(crate) dir: PathBuf,
    pub(crate) admin: PathBuf,
    pub(crate) log: PathBuf,
    pub(crate) socket: PathBuf,
    pub(crate) supervisor_log: PathBuf,
}

impl Paths {
    pub(crate) fn new(storage: &Path, name: &Name) -> Paths {
        let dir = storage.join("services").join(name.as_str());
        Paths {
            admin: dir.join("admin"),
            log: dir.join("server.log"),
            socket: dir.join(supervisor::SOCKET),
            supervisor_log: dir.join("supervisor.log"),
            dir,
        }
    }
}

/// What `<storage>/services/<name>/service.json` records of a service, so that an agent
/// started after this one died takes over the services that still run.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Record {
    pub(crate) name: Name,
    pub(crate) slot_name: String,
    pub(crate) address: SocketAddr,
    pub(crate) server_pid: i32,
    pub(crate) server_user: Option<String>,
    pub(crate) migrations: u32,
}

/// The record's file name in the service's folder.
const RECORD: &str = "service.json";

/// A service running here.
#[derive(Debug, Clone)]
pub(crate) struct Service {
    pub(crate) name: Name,
    pub(crate) paths: Paths,
    pub(crate) slot: Slot,
    pub(crate) address: SocketAddr,
    pub(crate) server_pid: i32,
    pub(crate) server_user: Option<String>,
    pub(crate) migrations: u32,
    pub(crate) clients: Option<u32>,
}

impl Service {
    pub(crate) fn status(&self) -> ServiceStatus {
        ServiceStatus {
            name: self.name.clone(),
            address: self.address,
            pid: self.server_pid,
            clients: self.clients,
            migrations: self.migrations,
        }
    }

    /// The slot as the engine's helpers know it.
    pub(crate) fn container(&self) -> crate::state::Container {
        container_of(&self.name, &self.slot)
    }

    pub(crate) fn record(&self) -> Record {
        Record {
            name: self.name.clone(),
            slot_name: self.slot.name.clone(),
            address: self.address,
            server_pid: self.server_pid,
            server_user: self.server_user.clone(),
            migrations: self.migrations,
        }
    }

    /// Writes the service's record (after a start, an arrival, a rollback that changed it).
    pub(crate) fn save(&self) -> Result<()> {
        secure::write_private(
            &self.paths.dir.join(RECORD),
            &serde_json::to_vec(&self.record())?,
        )
    }
}

/// Why a service's folder cannot be taken over.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum NotAdoptable {
    #[error("no readable record: {0}")]
    NoRecord(String),
    #[error("the record names {found}, its folder is {folder}")]
    WrongFolder { folder: String, found: String },
    #[error("its server (PID {0}) does not run under the service's supervisor")]
    ServerGone(i32),
    #[error("its slot {0} is gone")]
    SlotGone(String),
}

/// The record in the service folder `dir` (its name must be the folder's).
pub(crate) fn load_record(dir: &Path) -> Result<Record, NotAdoptable> {
    let bytes =
        std::fs::read(dir.join(RECORD)).map_err(|e| NotAdoptable::NoRecord(e.to_string()))?;
    let r: Record =
        serde_json::from_slice(&bytes).map_err(|e| NotAdoptable::NoRecord(e.to_string()))?;
    let folder = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if r.name.as_str() != folder {
        return Err(NotAdoptable::WrongFolder {
            folder,
            found: r.name.to_string(),
        });
    }
    Ok(r)
}

impl Service {
    /// The service `r` records, in its slot among `slots`.
    pub(crate) fn from_record(
        storage: &Path,
        r: Record,
        slots: &[Slot],
    ) -> Result<Service, NotAdoptable> {
        let slot = slots
            .iter()
            .find(|s| s.name == r.slot_name)
            .cloned()
            .ok_or_else(|| NotAdoptable::SlotGone(r.slot_name.clone()))?;
        Ok(Service {
            paths: Paths::new(storage, &r.name),
            name: r.name,
            slot,
            address: r.address,
            server_pid: r.server_pid,
            server_user: r.server_user,
            migrations: r.migrations,
            clients: None,
        })
    }

    /// Whether its server runs, under the service's supervisor.
    pub(crate) fn server_runs(&self) -> bool {
        sys::process_runs(self.server_pid, "swrapper")
            && supervised_here(self.server_pid, &self.paths)
    }
}

pub(crate) fn container_of(name: &Name, slot: &Slot) -> crate::state::Container {
    crate::state::Container {
        name: format!("{name}@slot"),
        netns: slot.netns.clone(),
        host_port: slot.host_port,
    }
}

/// What starts a service's server.
#[derive(Debug, Clone)]
pub(crate) struct ServerSpec {
    pub(crate) swrapper: PathBuf,
    pub(crate) cert: PathBuf,
    pub(crate) key: PathBuf,
    pub(crate) user: Option<String>,
    pub(crate) extra: Vec<String>,
    /// PID 1 of its own pid namespace (`unshare --pid --fork`): post-copy moves need it.
    pub(crate) pid_namespace: bool,
}

/// Creates the service's folders (refusing an existing one), 0700; the admin folder is
/// given to the server's account.
pub(crate) fn make_folders(paths: &Paths, user: Option<&str>) -> Result<()> {
    if paths.dir.exists() {
        bail!(
            "{} exists: a service of that name is (or was) here",
            paths.dir.display()
        );
    }
    secure::private_dir(&paths.dir)?;
    secure::private_dir(&paths.admin)?;
    if let Some(user) = user {
        let u = nix::unistd::User::from_name(user)
            .with_context(|| format!("looking up the account {user}"))?
            .with_context(|| format!("no account {user} (cargo xtask setup creates qlm-server)"))?;
        nix::unistd::chown(&paths.admin, Some(u.uid), Some(u.gid))
            .with_context(|| format!("giving {} to {user}", paths.admin.display()))?;
    }
    Ok(())
}

/// The demo server's command line for a service.
fn server_argv(s: &ServerSpec, admin: &Path) -> Vec<OsString> {
    let mut argv: Vec<OsString> = vec![
        s.swrapper.clone().into(),
        "--listen".into(),
        format!("0.0.0.0:{SERVICE_PORT}").into(),
        "--admin-dir".into(),
        admin.into(),
        "--cert".into(),
        s.cert.clone().into(),
        "--key".into(),
        s.key.clone().into(),
        "--park-after-announce".into(),
        "--log".into(),
        "info".into(),
        "--runtime".into(),
        "current-thread".into(),
    ];
    if let Some(u) = &s.user {
        argv.extend(["--user".into(), u.into()]);
    }
    argv.extend(s.extra.iter().map(OsString::from));
    argv
}

/// Starts `control supervise` for the service, as this agent's child (reaped by a thread);
/// `server` None: an idle supervisor that waits for a restore.
pub(crate) fn start_supervisor(
    paths: &Paths,
    slot: &Slot,
    server: Option<&ServerSpec>,
) -> Result<i32> {
    let argv: Vec<OsString> = server
        .map(|s| server_argv(s, &paths.admin))
        .unwrap_or_default();
    let start = match server {
        None => supervisor::Start::Idle,
        Some(s) => supervisor::Start::Server {
            argv: &argv,
            pid_namespace: s.pid_namespace,
        },
    };
    let pid = supervisor::spawn(
        &paths.socket,
        &slot.netns,
        &paths.log,
        &paths.supervisor_log,
        start,
    )?;
    // The supervisor answers once its socket is bound.
    let deadline = std::time::Instant::now() + ASK_LIMIT;
    loop {
        match supervisor::ask(&paths.socket, &SupervisorRequest::Ping, ASK_LIMIT) {
            Ok(SupervisorReply::Pong { .. }) => break,
            _ if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(other) => bail!("the supervisor answered {other:?} to a ping"),
            Err(e) => return Err(e).context("the supervisor did not come up"),
        }
    }
    Ok(pid)
}

/// Starts a new service's server in `slot` and waits until it is ready.
pub(crate) fn start(
    name: &Name,
    paths: Paths,
    slot: Slot,
    address: SocketAddr,
    server: &ServerSpec,
) -> Result<Service> {
    make_folders(&paths, server.user.as_deref())?;
    let supervisor_pid = start_supervisor(&paths, &slot, Some(server))?;
    let admin = AdminDir::open(&paths.admin)?;
    let ready: Ready = admin.wait_event(None, READY_LIMIT).with_context(|| {
        format!(
            "the server did not start; its log:\n{}",
            sys::tail(&std::fs::read_to_string(&paths.log).unwrap_or_default(), 10)
        )
    })?;
    let server_pid = i32::try_from(ready.pid).context("PID out of range")?;
    // In its own pid namespace the server knows itself as PID 1; its host PID is unshare's
    // child (the supervisor's grandchild).
    let server_pid = if server.pid_namespace {
        crate::postcopy::server_host_pid(supervisor_pid)?
    } else {
        server_pid
    };
    if !supervised_here_by(server_pid, supervisor_pid) {
        bail!("the server (PID {server_pid}) is not under the supervisor ({supervisor_pid})");
    }
    info!(service = %name, pid = server_pid, %address, "service started");
    Ok(Service {
        name: name.clone(),
        paths,
        slot,
        address,
        server_pid,
        server_user: server.user.clone(),
        migrations: 0,
        clients: None,
    })
}

/// Slot operations of one host never overlap (the last removal deletes podman's bridge and
/// netavark's chains, which a creation at the same time would need).
static SLOT_OPS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// [`Slot::create`], one at a time.
pub(crate) fn create_slot(spec: &crate::slot::SlotSpec) -> Result<Slot> {
    let _one = SLOT_OPS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    Slot::create(spec)
}

/// [`Slot::remove`], one at a time. The slot's host port is not handed out again for
/// [`PORT_QUARANTINE`].
pub(crate) fn remove_slot(slot: &Slot) -> Result<()> {
    let _one = SLOT_OPS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    {
        let mut freed = FREED_PORTS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        freed.insert(slot.host_port, std::time::Instant::now());
        save_freed_ports(slot.storage(), &freed);
    }
    slot.remove()
}

/// The file that keeps the resting ports across agents (a restarted agent must not hand out
/// a port its predecessor freed a minute ago): `{port: unix seconds freed}`.
const FREED_PORTS_FILE: &str = "freed-ports.json";

fn save_freed_ports(storage: &Path, freed: &std::collections::BTreeMap<u16, std::time::Instant>) {
    let now_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let by_time: std::collections::BTreeMap<u16, u64> = freed
        .iter()
        .map(|(p, at)| (*p, now_unix.saturating_sub(at.elapsed().as_secs())))
        .collect();
    let written = serde_json::to_vec(&by_time)
        .map_err(anyhow::Error::from)
        .and_then(|bytes| secure::write_private(&storage.join(FREED_PORTS_FILE), &bytes));
    if let Err(e) = written {
        warn!("recording the resting ports: {e:#}");
    }
}

/// Loads the ports an earlier agent freed less than [`PORT_QUARANTINE`] ago (a missing or
/// unreadable file: none; said in the log).
pub(crate) fn load_freed_ports(storage: &Path) {
    let bytes = match std::fs::read(storage.join(FREED_PORTS_FILE)) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => {
            warn!("reading the resting ports: {e}");
            return;
        }
    };
    let by_time: std::collections::BTreeMap<u16, u64> = match serde_json::from_slice(&bytes) {
        Ok(m) => m,
        Err(e) => {
            warn!("the resting ports' file is not readable ({e}); ignored");
            return;
        }
    };
    let now_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut freed = FREED_PORTS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for (port, at) in by_time {
        let ago = Duration::from_secs(now_unix.saturating_sub(at));
        if ago < PORT_QUARANTINE
            && let Some(instant) = std::time::Instant::now().checked_sub(ago)
        {
            freed.insert(port, instant);
        }
    }
}

/// How long a freed host port is not given to another slot. The kernel's connection tracking
/// keeps the old slot's NAT entry of every client flow for up to its UDP stream timeout (120 s
/// by default); a client of a service that comes back to this host on the same port would
/// have its datagrams sent to the old slot's (gone) address. This kernel has no conntrack
/// netlink interface to delete those entries, so the port rests instead.
pub(crate) const PORT_QUARANTINE: Duration = Duration::from_secs(180);

static FREED_PORTS: std::sync::Mutex<std::collections::BTreeMap<u16, std::time::Instant>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

/// Whether `port` was freed less than [`PORT_QUARANTINE`] ago.
pub(crate) fn port_resting(port: u16) -> bool {
    let mut freed = FREED_PORTS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    freed.retain(|_, at| at.elapsed() < PORT_QUARANTINE);
    freed.contains_key(&port)
}

/// What a killed agent left on this host (slots whose podman state went with it): removed.
pub(crate) fn remove_orphans(storage: &Path) -> Result<usize> {
    let _one = SLOT_OPS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    Slot::remove_orphans(storage)
}

/// Stops what runs of a service and removes its folder and slot (each step tried, the first
/// failure returned).
pub(crate) fn tear_down(paths: &Paths, slot: &Slot, server_pid: Option<i32>) -> Result<()> {
    let mut first: Option<anyhow::Error> = None;
    // Only this service's server: a swrapper whose parent is this service's supervisor (a PID
    // recorded earlier may be another process's by now, or, with one pid namespace for
    // several simulated hosts, another host's restored copy).
    if let Some(pid) = server_pid
        && pid > 0
        && sys::process_runs(pid, "swrapper")
        && supervised_here(pid, paths)
    {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    match supervisor::ask(&paths.socket, &SupervisorRequest::Exit, ASK_LIMIT) {
        Ok(_) => {}
        Err(e) if paths.socket.exists() => warn!("stopping the supervisor: {e:#}"),
        Err(_) => {}
    }
    if let Err(e) = remove_slot(slot) {
        first.get_or_insert(e);
    }
    if let Err(e) = wipe_dir(&paths.dir) {
        first.get_or_insert(e);
    }
    first.map_or(Ok(()), Err)
}

/// Ends (SIGKILL) every `swrapper` whose parent is the supervisor answering at `socket`
/// (found by its command line); returns how many.
pub(crate) fn kill_servers_of(socket: &Path) -> usize {
    let want = socket.as_os_str().as_encoded_bytes();
    let is_supervisor = |pid: i32| {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| c.split(|b| *b == 0).any(|arg| arg == want))
    };
    let mut n = 0;
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if sys::process_runs(pid, "swrapper") && sys::parent_pid(pid).is_some_and(is_supervisor) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            n += 1;
        }
    }
    n
}

/// Whether `pid`'s parent is the supervisor of the service at `paths`.
pub(crate) fn supervised_here(pid: i32, paths: &Paths) -> bool {
    let socket = paths.socket.as_os_str().as_encoded_bytes();
    let by_this_supervisor = |parent: i32| {
        std::fs::read(format!("/proc/{parent}/cmdline"))
            .is_ok_and(|cmdline| cmdline.split(|b| *b == 0).any(|arg| arg == socket))
    };
    let Some(parent) = sys::parent_pid(pid) else {
        return false;
    };
    // A server started in its own pid namespace is unshare's child, unshare the
    // supervisor's (a restored one is the supervisor's own child).
    by_this_supervisor(parent)
        || (crate::postcopy::own_pid_namespace(pid)
            && sys::parent_pid(parent).is_some_and(by_this_supervisor))
}

/// Whether `pid` is `supervisor`'s child, or, PID 1 of its own pid namespace, its grandchild
/// (through `unshare`).
fn supervised_here_by(pid: i32, supervisor: i32) -> bool {
    let parent = sys::parent_pid(pid);
    parent == Some(supervisor)
        || (crate::postcopy::own_pid_namespace(pid)
            && parent.and_then(sys::parent_pid) == Some(supervisor))
}

/// Overwrites every regular file under `dir` with zeros, then removes it: image sets hold a
/// process's memory and keys.
pub(crate) fn wipe_dir(dir: &Path) -> Result<()> {
    fn zero_all(dir: &Path) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let Ok(t) = e.file_type() else { continue };
            if t.is_dir() {
                zero_all(&e.path());
            } else if t.is_file() {
                zero_file(&e.path());
            }
        }
    }
    fn zero_file(path: &Path) {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let Ok(mut f) = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(path)
        else {
            return;
        };
        let Ok(len) = f.metadata().map(|m| m.len()) else {
            return;
        };
        let zeros = vec![0u8; 1 << 20];
        let mut left = len;
        while left > 0 {
            let n = usize::try_from(left.min(zeros.len() as u64)).unwrap_or(zeros.len());
            if f.write_all(&zeros[..n]).is_err() {
                return;
            }
            left -= n as u64;
        }
        let _ = f.sync_data();
    }
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("inspecting {}", dir.display())),
        Ok(m) if !m.is_dir() => bail!("{} is not a folder", dir.display()),
        Ok(_) => {}
    }
    zero_all(dir);
    std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wipe_zeroes_then_removes_and_tolerates_absence() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("set");
        std::fs::create_dir_all(d.join("sub")).unwrap();
        std::fs::write(d.join("pages-1.img"), vec![0xAB; 3 << 20]).unwrap();
        std::fs::write(d.join("sub/x"), b"secret").unwrap();
        // A link inside is not followed out of the folder.
        let outside = tmp.path().join("outside");
        std::fs::write(&outside, b"keep me").unwrap();
        std::os::unix::fs::symlink(&outside, d.join("link")).unwrap();
        wipe_dir(&d).unwrap();
        assert!(!d.exists());
        assert_eq!(std::fs::read(&outside).unwrap(), b"keep me");
        wipe_dir(&d).unwrap();
        std::fs::write(tmp.path().join("file"), b"x").unwrap();
        assert!(wipe_dir(&tmp.path().join("file")).is_err());
    }

    #[test]
    fn records_are_read_back_and_bad_ones_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("services").join("edge");
        std::fs::create_dir_all(&dir).unwrap();
        assert!(matches!(load_record(&dir), Err(NotAdoptable::NoRecord(_))));
        std::fs::write(dir.join(RECORD), b"{\"name\": 7").unwrap();
        assert!(matches!(load_record(&dir), Err(NotAdoptable::NoRecord(_))));
        let record = Record {
            name: Name::new("edge").unwrap(),
            slot_name: "qlm-mh-edge".into(),
            address: "10.0.0.1:4300".parse().unwrap(),
            server_pid: 4242,
            server_user: Some("qlm-server".into()),
            migrations: 3,
        };
        std::fs::write(dir.join(RECORD), serde_json::to_vec(&record).unwrap()).unwrap();
        assert_eq!(load_record(&dir).unwrap(), record);
        // A record copied into another service's folder is not that service.
        let other = tmp.path().join("services").join("other");
        std::fs::create_dir_all(&other).unwrap();
        std::fs::copy(dir.join(RECORD), other.join(RECORD)).unwrap();
        assert_eq!(
            load_record(&other),
            Err(NotAdoptable::WrongFolder {
                folder: "other".into(),
                found: "edge".into()
            })
        );
        // Without its slot there is nothing to take over.
        assert_eq!(
            Service::from_record(tmp.path(), record, &[]).unwrap_err(),
            NotAdoptable::SlotGone("qlm-mh-edge".into())
        );
    }

    #[test]
    fn resting_ports_outlive_their_agent_and_bad_files_are_ignored() {
        let tmp = tempfile::tempdir().unwrap();
        load_freed_ports(tmp.path());
        std::fs::write(tmp.path().join(FREED_PORTS_FILE), b"{\"61001\": \"x\"").unwrap();
        load_freed_ports(tmp.path());
        assert!(!port_resting(61001));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let old = now - PORT_QUARANTINE.as_secs() - 5;
        let file = format!(
            "{{\"61001\": {now}, \"61002\": {old}, \"61003\": {}}}",
            now + 99
        );
        std::fs::write(tmp.path().join(FREED_PORTS_FILE), file).unwrap();
        load_freed_ports(tmp.path());
        assert!(port_resting(61001));
        assert!(!port_resting(61002), "freed long ago");
        // A time in the future counts as now: resting.
        assert!(port_resting(61003));
        let freed = FREED_PORTS.lock().unwrap().clone();
        save_freed_ports(tmp.path(), &freed);
        let back: std::collections::BTreeMap<u16, u64> =
            serde_json::from_slice(&std::fs::read(tmp.path().join(FREED_PORTS_FILE)).unwrap())
                .unwrap();
        assert!(back.contains_key(&61001) && !back.contains_key(&61002));
    }

    #[test]
    fn paths_are_under_the_storage() {
        let p = Paths::new(Path::new("/s"), &Name::new("edge").unwrap());
        assert_eq!(p.dir, Path::new("/s/services/edge"));
        assert_eq!(p.admin, Path::new("/s/services/edge/admin"));
        assert_eq!(p.log, Path::new("/s/services/edge/server.log"));
    }
}
