//! The deployment's lifecycle: up (image, containers, supervisor, server), down, status, and
//! the diagnostics that explain a failure.

use std::path::{Path, PathBuf};

use std::time::{Duration, Instant};

use admin_api::{AdminDir, Ready};
use anyhow::{Context, Result, bail};
use serde::Serialize;
use tracing::{info, warn};

use crate::state::{Container, FrontState, Side, State};
use crate::supervisor::{self, SupervisorRequest};
use crate::{images, podman, sys};

/// Where a deployment lives and what it is called.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// State, admin directory, logs, reports.
    pub(crate) state_dir: PathBuf,
    /// CRIU image sets.
    pub(crate) images_dir: PathBuf,
    /// Prefix of the containers' and the image's names.
    pub(crate) name: String,
}

impl Settings {
    pub(crate) fn container_name(&self, side: Side) -> String {
        format!("{}-{}", self.name, side.to_string().to_lowercase())
    }

    fn image_tag(&self) -> String {
        format!("localhost/{}-server:latest", self.name)
    }

    /// The name of the deployment's front (`up --front`): `d` and a hash of the deployment's
    /// name, within the 18 characters of `[a-z0-9-]` a front's name may have.
    pub(crate) fn front_name(&self) -> String {
        let hash = self.name.bytes().fold(0x811c_9dc5u32, |h, b| {
            (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
        });
        format!("d{hash:08x}")
    }
}

/// What `up` starts.
#[derive(Debug, Clone)]
pub(crate) struct UpOptions {
    /// Host UDP port mapped to A's port 4242.
    pub(crate) src_port: u16,
    /// Host UDP port mapped to B's port 4242.
    pub(crate) dst_port: u16,
    /// Where swrapper (and cwrapper) are.
    pub(crate) bin_dir: PathBuf,
    /// The account the server runs as.
    pub(crate) server_user: String,
    /// MiB of memory the server holds and touches (swrapper --ballast-mib; 0: none).
    pub(crate) ballast_mib: u32,
    /// MiB per second of it the server rewrites (swrapper --dirty-mib-per-s).
    pub(crate) dirty_mib_per_s: u32,
    /// The server's tokio runtime (swrapper --runtime).
    pub(crate) server_runtime: String,
    /// The server runs as PID 1 of its own pid namespace (post-copy needs it).
    pub(crate) pid_namespace: bool,
    /// A stable service address: clients use it for the service's whole life, a NAT behind
    /// it points at the container the server runs in (switched, with the datagrams held,
    /// during each move).
    pub(crate) front: Option<std::net::SocketAddrV4>,
    /// A server of the user's instead of swrapper (needs `front`): its command line.
    pub(crate) server_command: Vec<std::ffi::OsString>,
}

/// The `--server-user` that keeps the server root: needed in its own pid namespace, where
/// criu's parasite (running as the server) must mount a /proc of that namespace
/// (`parasite.c`, `get_proc_fd`: "can't dump unprivileged task whose /proc doesn't belong to
/// it"). Accepted only with `--pid-namespace`.
pub(crate) const ROOT_SERVER: &str = "root";

/// How long the server has to say it is ready.
const READY_LIMIT: Duration = Duration::from_secs(10);

/// Marks a state folder as control's own: `down` removes no folder without it.
pub(crate) const STATE_MARKER: &str = ".quic-live-migrate-state";

/// Whether `state_dir` is a state folder control made.
pub(crate) fn is_ours(state_dir: &Path) -> bool {
    std::fs::symlink_metadata(state_dir.join(STATE_MARKER)).is_ok_and(|m| m.is_file())
}

/// Creates the state folder (0700, with control's marker), or checks an existing one: a real
/// directory of this user, not writable by others, either control's (marked) or empty.
pub(crate) fn prepare_state_dir(state_dir: &Path) -> Result<()> {
    crate::secure::private_dir(state_dir)?;
    if is_ours(state_dir) {
        return Ok(());
    }
    let mut entries =
        std::fs::read_dir(state_dir).with_context(|| format!("reading {}", state_dir.display()))?;
    if let Some(e) = entries.next() {
        bail!(
            "{} holds files control did not make ({}, ...); refusing to use it as the state \
             folder (choose another --state-dir)",
            state_dir.display(),
            e.map(|e| e.file_name().to_string_lossy().into_owned())
                .unwrap_or_default()
        );
    }
    crate::secure::create_private(&state_dir.join(STATE_MARKER))?;
    Ok(())
}

/// Needs root and the tools.
pub(crate) fn preflight() -> Result<()> {
    sys::require_root()?;
    let hint = "run `cargo xtask setup` (as root) to install it";
    for p in ["podman", "criu", "nsenter", "runc"] {
        sys::require_program(p, hint)?;
    }
    Ok(())
}

/// What refuses an `up` before anything is created: no root or tools, a deployment already
/// up, a port in use, a foreign images folder, no swrapper binary.
pub(crate) fn check_up(settings: &Settings, opts: &UpOptions) -> Result<()> {
    preflight()?;
    if State::exists(&settings.state_dir) {
        bail!(
            "a deployment is already up (state in {}); `control down` first",
            settings.state_dir.display()
        );
    }
    if opts.src_port == opts.dst_port {
        bail!("SRC_PORT and DST_PORT are both {}", opts.src_port);
    }
    for (what, port) in [("SRC_PORT", opts.src_port), ("DST_PORT", opts.dst_port)] {
        if !sys::udp_port_free(port) {
            bail!("host UDP port {port} ({what}) is already in use; nothing was started");
        }
    }
    images::check_dir(&settings.images_dir)?;
    if !opts.server_command.is_empty() {
        check_server_command(opts)?;
    }
    let swrapper = opts.bin_dir.join("swrapper");
    if !swrapper.is_file() {
        bail!(
            "no swrapper binary in {} (build it: cargo build --release -p swrapper, or pass --bin-dir)",
            opts.bin_dir.display()
        );
    }
    // Post-copy hook: a server in its own pid namespace must be root (see `ROOT_SERVER`).
    if opts.pid_namespace && opts.server_user != ROOT_SERVER {
        bail!(
            "--pid-namespace needs `--server-user {ROOT_SERVER}`: criu dumps a process in its \
             own pid namespace only if that process can mount /proc for it (criu's parasite \
             runs with the process's credentials), which an unprivileged server cannot; a \
             server in the host's pid namespace can run as `{}` (cold moves only)",
            opts.server_user
        );
    }
    if !opts.pid_namespace && opts.server_user == ROOT_SERVER {
        bail!(
            "`--server-user {ROOT_SERVER}` is only for --pid-namespace (post-copy); without it \
             the server runs as an unprivileged account"
        );
    }
    if opts.server_user != ROOT_SERVER
        && nix::unistd::User::from_name(&opts.server_user)
            .ok()
            .flatten()
            .is_none()
    {
        bail!(
            "the server's account `{}` does not exist: `cargo xtask setup` creates it (or pass \
             --server-user)",
            opts.server_user
        );
    }
    Ok(())
}

/// What a server of the user's (`up -- COMMAND`) must come with.
fn check_server_command(opts: &UpOptions) -> Result<()> {
    if opts.front.is_none() {
        bail!(
            "a server of your own (`-- COMMAND`) knows nothing of the moves, so its clients \
             cannot be told the new address: give it a stable one with --front IPV4:PORT"
        );
    }
    if opts.ballast_mib > 0 || opts.dirty_mib_per_s > 0 || opts.pid_namespace {
        bail!(
            "--ballast-mib, --dirty-mib-per-s and --pid-namespace are the demo server's; they \
             do not apply to `-- COMMAND`"
        );
    }
    let program = Path::new(&opts.server_command[0]);
    let found = if program.components().count() > 1 {
        program.is_file()
    } else {
        std::env::var_os("PATH")
            .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
    };
    if !found {
        bail!(
            "the server command {} is not an executable file (nor found in PATH)",
            program.display()
        );
    }
    Ok(())
}

/// The name [`sys::process_runs`] knows the server a command line starts by: its program's
/// file name (argv\[0\]'s, as `/proc/PID/cmdline` shows it).
pub(crate) fn comm_of(argv0: &std::ffi::OsStr) -> String {
    Path::new(argv0)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Brings the deployment up (after [`check_up`], and with the state folder prepared and
/// locked); on failure removes whatever was made.
pub(crate) fn up(settings: &Settings, opts: &UpOptions) -> Result<State> {
    let started = Instant::now();
    // check_up ran before the lock was taken; only another up could have changed things
    // since, and it would have left a state.
    if State::exists(&settings.state_dir) {
        bail!(
            "a deployment is already up (state in {}); `control down` first",
            settings.state_dir.display()
        );
    }
    let swrapper = opts.bin_dir.join("swrapper");
    match up_inner(settings, opts, &swrapper) {
        Ok(state) => {
            info!(
                ms = format_args!("{:.0}", started.elapsed().as_secs_f64() * 1e3),
                pid = state.server_pid,
                supervisor = state.supervisor_pid,
                "up: server running in container A"
            );
            Ok(state)
        }
        Err(e) => {
            warn!("up failed, removing what was made: {e:#}");
            if let Err(d) = down(settings) {
                warn!("cleanup after the failed up also failed: {d:#}");
            }
            Err(e)
        }
    }
}

/// Builds `tag` from the release swrapper in `bin_dir` (its entry is given at `podman run`)
/// and writes a self-signed certificate and key for `localhost` into `certs`, which must be a
/// private folder (the key is the server's).
pub(crate) fn pod_image(tag: &str, certs: &Path, bin_dir: &Path) -> Result<()> {
    crate::secure::check_private_dir(certs)?;
    let (_, pem) = wrapper_support::Identity::self_signed(&["localhost".to_owned()])?;
    pem.write_cert(&certs.join("server-cert.pem"))?;
    pem.write_key(&certs.join("server-key.pem"))?;
    let work = certs.join("build");
    crate::secure::private_dir(&work)?;
    let r = podman::build_image(&work, tag, &[bin_dir.join("swrapper")]);
    std::fs::remove_dir_all(&work).ok();
    r
}

fn up_inner(settings: &Settings, opts: &UpOptions, swrapper: &Path) -> Result<State> {
    let state_dir = &settings.state_dir;
    let admin = state_dir.join("admin");
    crate::secure::private_dir(&admin)?;
    crate::secure::private_dir(&state_dir.join("reports"))?;
    images::create(&settings.images_dir)?;
    let (_, pem) = wrapper_support::Identity::self_signed(&["localhost".to_owned()])?;
    let cert = state_dir.join("server-cert.pem");
    let key = state_dir.join("server-key.pem");
    pem.write_cert(&cert)?;
    pem.write_key(&key)?;

    let tag = settings.image_tag();
    podman::build_image(state_dir, &tag, &[swrapper.to_path_buf()])?;
    let mut containers = Vec::new();
    for (side, port) in [(Side::A, opts.src_port), (Side::B, opts.dst_port)] {
        let name = settings.container_name(side);
        podman::start_container(&name, &tag, port)?;
        containers.push(Container {
            netns: podman::netns(&name)?,
            name,
            host_port: port,
        });
    }
    let [a, b]: [Container; 2] = containers
        .try_into()
        .map_err(|_| anyhow::anyhow!("expected two containers"))?;

    let server_log = state_dir.join("server.log");
    let mut argv = vec![
        swrapper.as_os_str().to_owned(),
        "--listen".into(),
        format!("0.0.0.0:{}", podman::CONTAINER_PORT).into(),
        "--cert".into(),
        cert.as_os_str().to_owned(),
        "--key".into(),
        key.as_os_str().to_owned(),
        "--admin-dir".into(),
        admin.as_os_str().to_owned(),
        "--park-after-announce".into(),
        "--log".into(),
        "info".into(),
    ];
    argv.extend(["--runtime".into(), opts.server_runtime.clone().into()]);
    if opts.ballast_mib > 0 {
        argv.extend([
            "--ballast-mib".into(),
            opts.ballast_mib.to_string().into(),
            "--dirty-mib-per-s".into(),
            opts.dirty_mib_per_s.to_string().into(),
        ]);
    }
    // The server touches its ballast before it says it is ready.
    let ready_limit = READY_LIMIT + Duration::from_millis(10 * u64::from(opts.ballast_mib));
    // Post-copy hook: `--server-user root` (only with --pid-namespace, see `check_up`) keeps
    // the server root; every other account is dropped to.
    if opts.server_user != ROOT_SERVER {
        argv.extend(["--user".into(), opts.server_user.clone().into()]);
    }
    if !opts.server_command.is_empty() {
        return up_command(settings, opts, tag, a, b, (cert, admin, server_log));
    }
    let supervisor_pid =
        start_supervisor(state_dir, &a.netns, &server_log, &argv, opts.pid_namespace)?;
    // Until the state is saved, a failure must not leave the supervisor or its server behind
    // (`down` knows them only from the state).
    let guard = SupervisorGuard::new(state_dir, supervisor_pid);
    let admin_dir = AdminDir::open(&admin)?;
    let ready: Ready = admin_dir.wait_event(None, ready_limit).with_context(|| {
        format!(
            "the server did not start; its log ({}):\n{}",
            server_log.display(),
            sys::tail(
                &std::fs::read_to_string(&server_log).unwrap_or_default(),
                10
            )
        )
    })?;
    let pid = i32::try_from(ready.pid).context("PID out of range")?;
    // Post-copy hook: in its own pid namespace the server knows itself as PID 1; the engine
    // needs its host PID, a child of `unshare` (the supervisor's child).
    let pid = if opts.pid_namespace {
        let host = crate::postcopy::server_host_pid(supervisor_pid)?;
        let parent = sys::parent_pid(host);
        if parent.and_then(sys::parent_pid) != Some(supervisor_pid) {
            bail!(
                "the server (PID {host}) is not under the supervisor ({supervisor_pid}): \
                 parent {parent:?}"
            );
        }
        host
    } else {
        pid
    };
    if !opts.pid_namespace && sys::parent_pid(pid) != Some(supervisor_pid) {
        bail!(
            "the server (PID {pid}) is not the supervisor's ({supervisor_pid}) child: parent {:?}",
            sys::parent_pid(pid)
        );
    }
    let front = match opts.front {
        None => None,
        Some(addr) => Some(make_front(settings, addr, &a, &b)?),
    };
    let state = State {
        version: State::new_version(),
        image: tag,
        a,
        b,
        server_pid: pid,
        supervisor_pid,
        side: Side::A,
        cert,
        admin_dir: admin,
        server_log,
        images_dir: settings.images_dir.clone(),
        migrations: 0,
        pid_namespace: opts.pid_namespace,
        front,
        server_command: None,
    };
    state.save(state_dir)?;
    guard.disarm();
    Ok(state)
}

/// Ends a supervisor started by a failing `up`, with what it runs, when dropped armed.
struct SupervisorGuard<'a> {
    state_dir: &'a Path,
    pid: i32,
    armed: bool,
}

impl<'a> SupervisorGuard<'a> {
    fn new(state_dir: &'a Path, pid: i32) -> Self {
        Self {
            state_dir,
            pid,
            armed: true,
        }
    }

    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for SupervisorGuard<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        // Its children first: a supervisor that exits leaves its child running. Only the
        // supervisor's own children, by PID.
        for child in sys::children(self.pid) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        stop_supervisor(self.state_dir, self.pid);
    }
}

/// `up -- COMMAND`: the user's server in A, as `--server-user`, ready once it answers QUIC
/// on its port; behind the front.
fn up_command(
    settings: &Settings,
    opts: &UpOptions,
    tag: String,
    a: Container,
    b: Container,
    (cert, admin, server_log): (PathBuf, PathBuf, PathBuf),
) -> Result<State> {
    let state_dir = &settings.state_dir;
    let mut argv: Vec<std::ffi::OsString> = Vec::new();
    if opts.server_user != ROOT_SERVER {
        let user = nix::unistd::User::from_name(&opts.server_user)?
            .with_context(|| format!("no account {}", opts.server_user))?;
        argv.extend(
            [
                "setpriv".to_owned(),
                format!("--reuid={}", user.uid),
                format!("--regid={}", user.gid),
                "--init-groups".to_owned(),
                "--no-new-privs".to_owned(),
                "--".to_owned(),
            ]
            .map(Into::into),
        );
    }
    argv.extend(opts.server_command.iter().cloned());
    let supervisor_pid = start_supervisor(state_dir, &a.netns, &server_log, &argv, false)?;
    let guard = SupervisorGuard::new(state_dir, supervisor_pid);
    let backend = std::net::SocketAddr::new(
        std::net::IpAddr::V4(podman::ipv4(&a.name)?),
        podman::CONTAINER_PORT,
    );
    let comm = comm_of(&opts.server_command[0]);
    let started = Instant::now();
    let pid = loop {
        let child = sys::children(supervisor_pid)
            .into_iter()
            .find(|p| sys::process_runs(*p, &comm));
        if let Some(pid) = child
            && crate::engine::probe(backend) == admin_api::PortProbe::Answered
        {
            break pid;
        }
        if child.is_none() && started.elapsed() > Duration::from_millis(500) {
            bail!(
                "the server command exited at once (or is not known as {comm}); its log ({}):\n{}",
                server_log.display(),
                sys::tail(
                    &std::fs::read_to_string(&server_log).unwrap_or_default(),
                    10
                )
            );
        }
        if started.elapsed() > READY_LIMIT {
            bail!(
                "the server did not answer QUIC at {backend} (port {} of container A) within \
                 {READY_LIMIT:?}; its log ({}):\n{}",
                podman::CONTAINER_PORT,
                server_log.display(),
                sys::tail(
                    &std::fs::read_to_string(&server_log).unwrap_or_default(),
                    10
                )
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let addr = opts.front.context("a server command needs --front")?;
    let front = make_front(settings, addr, &a, &b)?;
    let state = State {
        version: State::new_version(),
        image: tag,
        a,
        b,
        server_pid: pid,
        supervisor_pid,
        side: Side::A,
        cert,
        admin_dir: admin,
        server_log,
        images_dir: settings.images_dir.clone(),
        migrations: 0,
        pid_namespace: false,
        front: Some(front),
        server_command: Some(
            opts.server_command
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect(),
        ),
    };
    state.save(state_dir)?;
    guard.disarm();
    Ok(state)
}

/// Installs the deployment's front at `addr`, pointing at A, and leaves its rules in place
/// (detached) for the moves.
fn make_front(
    settings: &Settings,
    addr: std::net::SocketAddrV4,
    a: &Container,
    b: &Container,
) -> Result<FrontState> {
    let backend = |c: &Container| -> Result<std::net::SocketAddrV4> {
        Ok(std::net::SocketAddrV4::new(
            podman::ipv4(&c.name)?,
            podman::CONTAINER_PORT,
        ))
    };
    let (backend_a, backend_b) = (backend(a)?, backend(b)?);
    let name = settings.front_name();
    let service = crate::front::service_address_for(&name);
    // Both containers answer at the service address; the host route picks one.
    for c in [a, b] {
        crate::front::add_service_address(&c.netns, service)?;
    }
    let spec = udp_shim_front::FrontSpec::new(
        name,
        addr,
        std::net::SocketAddrV4::new(service, podman::CONTAINER_PORT),
    );
    let record = udp_shim_front::Front::create(spec)
        .and_then(udp_shim_front::Front::detach)
        .with_context(|| format!("setting up the front address {addr}"))?;
    let state = FrontState {
        name: record.name,
        front: addr,
        service,
        a: backend_a,
        b: backend_b,
        raw_table_was_there: record.raw_table_was_there,
    };
    crate::front::route_service(&state, Side::A)?;
    info!(front = %addr, %service, via = %backend_a, name = %state.name, "front address up");
    Ok(state)
}

/// Removes the deployment's front rules (none: nothing to do; without nftables installed
/// there can be none).
fn remove_front(settings: &Settings, state: Option<&State>) -> Result<()> {
    crate::front::remove_service_route(crate::front::service_address_for(&settings.front_name()));
    let tools = udp_shim_front::Tools::default();
    let removed = match state.and_then(|s| s.front.as_ref()) {
        Some(front) => udp_shim_front::Front::remove_detached(&front.record(), &tools),
        None => udp_shim_front::Front::remove_leftovers(&settings.front_name(), None, &tools),
    };
    match removed {
        Ok(()) | Err(udp_shim_front::FrontError::ToolMissing { .. }) => Ok(()),
        Err(e) => Err(e).context("removing the front address's rules"),
    }
}

/// Starts `control supervise` in its own session; it starts the server as its child.
fn start_supervisor(
    state_dir: &Path,
    netns: &Path,
    server_log: &Path,
    argv: &[std::ffi::OsString],
    pid_namespace: bool,
) -> Result<i32> {
    supervisor::spawn(
        &state_dir.join(supervisor::SOCKET),
        netns,
        server_log,
        &state_dir.join("supervisor.log"),
        supervisor::Start::Server {
            argv,
            pid_namespace,
        },
    )
}

/// Removes the deployment, even after a failed step.
pub(crate) fn down(settings: &Settings) -> Result<()> {
    sys::require_root()?;
    let mut problems = Vec::new();
    // What a state folder says (PIDs to stop, containers to remove) is trusted only when the
    // folder is control's and private: nothing planted by another user is acted on.
    let trusted = is_ours(&settings.state_dir)
        && crate::secure::check_private_dir(&settings.state_dir).is_ok();
    let state = if trusted {
        State::load(&settings.state_dir).ok()
    } else {
        None
    };
    if let Some(s) = &state {
        if sys::process_runs(s.server_pid, &s.server_comm()) {
            info!(pid = s.server_pid, "stopping the server");
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(s.server_pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        stop_supervisor(&settings.state_dir, s.supervisor_pid);
    }
    let client_pid = settings.state_dir.join("client.pid");
    if trusted
        && let Ok(text) = std::fs::read_to_string(&client_pid)
        && let Ok(pid) = text.trim().parse::<i32>()
        && sys::process_runs(pid, "cwrapper")
    {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    if let Err(e) = remove_front(settings, state.as_ref()) {
        problems.push(format!("{e:#}"));
    }
    for side in [Side::A, Side::B] {
        let name = state
            .as_ref()
            .map(|s| s.container(side).name.clone())
            .unwrap_or_else(|| settings.container_name(side));
        if let Err(e) = podman::remove_container(&name) {
            problems.push(format!("{e:#}"));
        }
    }
    let tag = state
        .as_ref()
        .map(|s| s.image.clone())
        .unwrap_or_else(|| settings.image_tag());
    if let Err(e) = podman::remove_image(&tag) {
        problems.push(format!("{e:#}"));
    }
    let images = state
        .as_ref()
        .map(|s| s.images_dir.clone())
        .unwrap_or_else(|| settings.images_dir.clone());
    // Only a folder control marked as its own, still a private folder of this user (a marker
    // planted in someone else's folder does not make it removable), is removed.
    if images.join(images::MARKER).exists() {
        match crate::secure::check_private_dir(&images) {
            Ok(()) => {
                if let Err(e) = std::fs::remove_dir_all(&images) {
                    problems.push(format!("removing {}: {e}", images.display()));
                }
            }
            Err(e) => problems.push(format!("{e:#}; left as it is")),
        }
    }
    if is_ours(&settings.state_dir) {
        match crate::secure::check_private_dir(&settings.state_dir) {
            Ok(()) => {
                if let Err(e) = std::fs::remove_dir_all(&settings.state_dir) {
                    problems.push(format!("removing {}: {e}", settings.state_dir.display()));
                }
            }
            Err(e) => problems.push(format!("{e:#}; left as it is")),
        }
    } else if settings.state_dir.exists() {
        problems.push(format!(
            "{} carries no control marker; left as it is",
            settings.state_dir.display()
        ));
    }
    if problems.is_empty() {
        info!("down: containers, image, image sets and state removed");
        Ok(())
    } else {
        bail!("down left things behind:\n{}", problems.join("\n"))
    }
}

/// Asks the supervisor to exit; if it does not answer, ends it by its PID (after checking
/// that PID is still a `control` process).
fn stop_supervisor(state_dir: &Path, pid: i32) {
    let socket = state_dir.join(supervisor::SOCKET);
    if supervisor::ask(&socket, &SupervisorRequest::Exit, Duration::from_secs(5)).is_ok() {
        return;
    }
    if sys::process_runs(pid, "control") {
        warn!(pid, "the supervisor does not answer; terminating it");
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
}

/// What `control status` prints.
#[derive(Debug, Serialize)]
struct Status<'a> {
    server: ServerStatus<'a>,
    supervisor: SupervisorStatus,
    containers: [ContainerStatus<'a>; 2],
    migrations: u32,
    cert: &'a Path,
    server_log: &'a Path,
    state_dir: &'a Path,
}

#[derive(Debug, Serialize)]
struct ServerStatus<'a> {
    pid: i32,
    running: bool,
    side: String,
    container: &'a str,
    /// Observed: the server's network namespace is its container's.
    in_its_container: Option<bool>,
    /// Observed: the server is PID 1 of its own pid namespace (post-copy possible).
    own_pid_namespace: bool,
}

#[derive(Debug, Serialize)]
struct SupervisorStatus {
    pid: i32,
    answers: bool,
}

#[derive(Debug, Serialize)]
struct ContainerStatus<'a> {
    name: &'a str,
    host_port: u16,
    running: bool,
}

/// Prints the deployment as JSON.
pub(crate) fn status(settings: &Settings) -> Result<()> {
    let state = State::load(&settings.state_dir)?;
    let here = state.container(state.side);
    let in_its_container =
        sys::netns_inode(Path::new(&format!("/proc/{}/ns/net", state.server_pid)))
            .ok()
            .zip(sys::netns_inode(&here.netns).ok())
            .map(|(a, b)| a == b);
    let socket = settings.state_dir.join(supervisor::SOCKET);
    let answers =
        supervisor::ask(&socket, &SupervisorRequest::Ping, Duration::from_secs(2)).is_ok();
    fn container(c: &Container) -> ContainerStatus<'_> {
        ContainerStatus {
            name: &c.name,
            host_port: c.host_port,
            running: podman::is_running(&c.name),
        }
    }
    let s = Status {
        server: ServerStatus {
            pid: state.server_pid,
            running: sys::process_runs(state.server_pid, &state.server_comm()),
            side: state.side.to_string(),
            container: &here.name,
            in_its_container,
            own_pid_namespace: crate::postcopy::own_pid_namespace(state.server_pid),
        },
        supervisor: SupervisorStatus {
            pid: state.supervisor_pid,
            answers,
        },
        containers: [container(&state.a), container(&state.b)],
        migrations: state.migrations,
        cert: &state.cert,
        server_log: &state.server_log,
        state_dir: &settings.state_dir,
    };
    println!("{}", serde_json::to_string_pretty(&s)?);
    Ok(())
}

/// Everything that explains a failure, as text.
pub(crate) fn diagnostics(settings: &Settings) -> String {
    let mut out = String::new();
    let mut section = |title: &str, body: String| {
        out.push_str(&format!("==== {title}\n{}\n", body.trim_end()));
    };
    let read_tail = |p: &Path, n: usize| {
        std::fs::read_to_string(p)
            .map(|t| sys::tail(&t, n))
            .unwrap_or_else(|e| format!("(cannot read {}: {e})", p.display()))
    };
    let sd = &settings.state_dir;
    section("server log (tail)", read_tail(&sd.join("server.log"), 40));
    section(
        "supervisor log (tail)",
        read_tail(&sd.join("supervisor.log"), 20),
    );
    section(
        "client stderr (tail)",
        read_tail(&sd.join("client.err"), 30),
    );
    section(
        "client stdout (tail)",
        read_tail(&sd.join("client.out"), 20),
    );
    let mut criu_logs = Vec::new();
    let mut stack = vec![settings.images_dir.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "log") {
                criu_logs.push(p);
            }
        }
    }
    criu_logs.sort();
    for log in criu_logs {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let errors: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("Error") || l.contains("error") || l.contains("Warn"))
            .collect();
        section(
            &format!("criu {} (errors and warnings)", log.display()),
            sys::tail(&errors.join("\n"), 25),
        );
    }
    for side in [Side::A, Side::B] {
        let name = settings.container_name(side);
        section(
            &format!("container {name} log"),
            sys::tail(&podman::logs(&name), 20),
        );
    }
    out
}
