//! `cargo xtask e2e-multihost`: three hosts and a client site on a scenario network, an agent
//! per host, a service with 100 clients moved A -> B -> C -> A, every failure case of a
//! cross-host move, a host drained, and the figures.
//!
//! ```text
//!  client site ── 4 cwrapper processes x 25 connections ──► host address:port of the service
//!  host a: holder (own mount ns, private tmpfs) ─ agent a ─ slots ─ services
//!  host b: ...                                    agent b ◄──mTLS QUIC──► agent a, c
//! ```
//!
//! A host is a network namespace (`topology`) plus a *holder*: a process in a mount namespace
//! of its own with a private tmpfs at the agents' storage path, standing for the host's disk.
//! The agent runs inside both (`nsenter -t <holder> -m -n`), so that killing an agent (a
//! failure case) loses no more than a real agent crash would, and a new agent can be started
//! on the same host. Every `control` command of a host runs there too.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use admin_api::ClientsSummary;
use anyhow::{Context, Result, bail};
use serde::Serialize;

use super::topology::{Node, Spec, Topology};

/// The agents' storage, the same path on every host (a private tmpfs in each).
const STORAGE: &str = "/var/lib/quic-live-migrate/agent";
/// The scenario's tag (namespace names).
const TAG: &str = "e2e";
/// The service moved around.
const SERVICE: &str = "edge";
const BEGIN: &str = "<!-- xtask e2e-multihost: generated section begins -->";
const END: &str = "<!-- xtask e2e-multihost: generated section ends -->";

/// The options of `cargo xtask e2e-multihost`.
#[derive(Debug, clap::Args)]
pub(crate) struct Options {
    /// The CI version: the same cases, the 256 MiB transfer measured once instead of three
    /// times.
    #[arg(long)]
    quick: bool,
    /// Client connections in all (spread over --client-processes processes).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1000))]
    clients: u32,
    /// Client processes.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=32))]
    client_processes: u32,
    /// Hosts (at least 3).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(3..=8))]
    hosts: u32,
    /// The MTU of the links between the hosts: 9000 (jumbo frames, as between hosts of one
    /// data centre) lets the agents' QUIC connection carry ~6.5 KB datagrams (its MTU
    /// discovery's ceiling); 1500 is an ordinary Ethernet link.
    #[arg(long, default_value_t = 9000, value_parser = clap::value_parser!(u16).range(1280..=9000))]
    mtu: u16,
    /// Put the figures into the generated section of BENCHMARKS.md.
    #[arg(long)]
    write_benchmarks: bool,
    /// Leave everything up at the end (for debugging; `--cleanup-only` removes it).
    #[arg(long)]
    keep: bool,
    /// Only remove what an earlier (killed or --keep) run left, then exit.
    #[arg(long)]
    cleanup_only: bool,
    /// Also move a service post-copy (`control migrate --to HOST --memory post-copy`: the
    /// server runs at the target before its memory arrived, the pages relayed inside the
    /// agents' QUIC connection): a ballast service started in its own pid namespace as root,
    /// with one client connection that must live through the move; and a post-copy move of a
    /// service that is not in its own pid namespace, refused at the source with the service
    /// left where it runs. Needs fs.pipe-max-size >= 4 MiB (`cargo xtask setup`). CI runs it
    /// (`cargo xtask ci`: `--quick --post-copy`).
    #[arg(long)]
    post_copy: bool,
}

/// Where the run keeps binaries, logs and reports.
struct Paths {
    bin: PathBuf,
    out: PathBuf,
    fleet: PathBuf,
}

impl Paths {
    fn new(root: &Path) -> Paths {
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"));
        let out = target.join("e2e-multihost");
        Paths {
            bin: target.join("release"),
            fleet: out.join("fleet"),
            out,
        }
    }
}

/// A simulated host: its namespace, its holder, its agent.
struct Host {
    node: Node,
    holder: Child,
    agent: Option<Child>,
    config: PathBuf,
    log: PathBuf,
}

impl Host {
    fn holder_pid(&self) -> u32 {
        self.holder.id()
    }

    /// A command run on this host (its network and mount namespaces).
    fn cmd(&self, program: &Path) -> Command {
        let mut c = Command::new("nsenter");
        c.arg("-t")
            .arg(self.holder_pid().to_string())
            .args(["-m", "-n", "--"])
            .arg(program);
        c
    }
}

/// Everything the run started, removed by [`World::tear_down`] (also when a step failed).
struct World {
    topology: Option<Topology>,
    hosts: Vec<Host>,
    clients: Vec<Child>,
}

impl World {
    fn host(&self, name: &str) -> Result<&Host> {
        self.hosts
            .iter()
            .find(|h| h.node.name == name)
            .with_context(|| format!("no host {name}"))
    }

    fn host_mut(&mut self, name: &str) -> Result<&mut Host> {
        self.hosts
            .iter_mut()
            .find(|h| h.node.name == name)
            .with_context(|| format!("no host {name}"))
    }

    fn tear_down(&mut self) {
        for c in &mut self.clients {
            end(c, Duration::from_secs(5));
        }
        // Agents stop their services on SIGTERM.
        for h in &mut self.hosts {
            if let Some(a) = &mut h.agent {
                end(a, Duration::from_secs(30));
            }
        }
        for h in &mut self.hosts {
            let _ = h.holder.kill();
            let _ = h.holder.wait();
        }
        if let Some(t) = self.topology.take() {
            // Whatever still runs in the scenario's namespaces (and below it) goes first.
            let _ = kill_in_namespaces(t.spec_ref());
            if let Err(e) = t.destroy() {
                println!("e2e-multihost: removing the scenario network: {e:#}");
            }
        }
    }
}

/// Ends (SIGKILL, by PID) every process in one of `spec`'s network namespaces and every
/// descendant of one (the containers of the hosts' podman live in namespaces of their own),
/// then removes the slots' empty cgroups. For what a killed run left behind, and as the last
/// step of the tear-down. Returns how many processes it ended.
fn kill_in_namespaces(spec: &Spec) -> usize {
    use std::collections::{BTreeMap, BTreeSet};
    use std::os::unix::fs::MetadataExt as _;
    let ours: BTreeSet<u64> = spec
        .netns_names()
        .iter()
        .filter_map(|n| std::fs::metadata(Path::new("/run/netns").join(n)).ok())
        .map(|m| m.ino())
        .collect();
    if ours.is_empty() {
        return 0;
    }
    let me = std::process::id();
    let mut parent: BTreeMap<u32, u32> = BTreeMap::new();
    let mut marked: BTreeSet<u32> = BTreeSet::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        if let Ok(stat) = std::fs::read_to_string(e.path().join("stat"))
            && let Some((_, rest)) = stat.rsplit_once(')')
            && let Some(ppid) = rest.split_whitespace().nth(1).and_then(|p| p.parse().ok())
        {
            parent.insert(pid, ppid);
        }
        if std::fs::metadata(e.path().join("ns/net")).is_ok_and(|m| ours.contains(&m.ino())) {
            marked.insert(pid);
        }
    }
    // Descendants of marked processes.
    loop {
        let more: Vec<u32> = parent
            .iter()
            .filter(|(pid, ppid)| marked.contains(ppid) && !marked.contains(pid))
            .map(|(pid, _)| *pid)
            .collect();
        if more.is_empty() {
            break;
        }
        marked.extend(more);
    }
    for pid in &marked {
        if let Ok(p) = i32::try_from(*pid) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    if !marked.is_empty() {
        std::thread::sleep(Duration::from_millis(300));
    }
    // The slots' cgroup parents, named qlm-mh-*, now empty.
    for root in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
        remove_cgroups(Path::new(root), 0);
    }
    marked.len()
}

fn remove_cgroups(dir: &Path, depth: u32) {
    if depth > 3 {
        return;
    }
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let name = e.file_name();
        if name.to_string_lossy().starts_with(super::topology::PREFIX) {
            let _ = std::fs::remove_dir(e.path());
        } else if depth == 0 {
            remove_cgroups(&e.path(), depth + 1);
        }
    }
}

/// SIGTERM, then SIGKILL after `grace`.
fn end(child: &mut Child, grace: Duration) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    let start = Instant::now();
    while start.elapsed() < grace {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn spec(hosts: u32) -> Result<Spec> {
    Spec::new(TAG, hosts as usize)
}

/// Runs the scenario.
pub(crate) fn run(root: &Path, opts: &Options) -> Result<()> {
    if !crate::setup::is_root() {
        bail!("e2e-multihost needs root (network namespaces, podman, CRIU)");
    }
    let paths = Paths::new(root);
    let mut spec = spec(opts.hosts)?;
    spec.link.mtu = Some(opts.mtu);
    let killed = kill_in_namespaces(&spec);
    if killed > 0 {
        println!("e2e-multihost: ended {killed} processes an earlier run left in its namespaces");
    }
    let stale = Topology::cleanup_stale(&spec)?;
    if !stale.is_empty() {
        println!("e2e-multihost: removed leftovers of an earlier run: {stale:?}");
    }
    if opts.cleanup_only {
        return Ok(());
    }
    println!("e2e-multihost: building the release binaries");
    let status = Command::new(crate::cargo())
        .current_dir(root)
        .args([
            "build",
            "--release",
            "-p",
            "control",
            "-p",
            "swrapper",
            "-p",
            "cwrapper",
        ])
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("cargo build --release failed");
    }
    if paths.out.exists() {
        std::fs::remove_dir_all(&paths.out)
            .with_context(|| format!("removing {}", paths.out.display()))?;
    }
    std::fs::create_dir_all(&paths.out)?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&paths.out, std::fs::Permissions::from_mode(0o700))?;
    }
    std::fs::create_dir_all(STORAGE).with_context(|| format!("creating {STORAGE}"))?;
    let started = Instant::now();
    let mut world = World {
        topology: None,
        hosts: Vec::new(),
        clients: Vec::new(),
    };
    let result = scenario(&paths, opts, &spec, &mut world);
    if opts.keep && result.is_ok() {
        println!(
            "e2e-multihost: --keep: everything stays up; `cargo xtask e2e-multihost --cleanup-only` removes it"
        );
        std::mem::forget(world);
    } else {
        if result.is_err() {
            print_logs(&paths);
        }
        world.tear_down();
        // The fleet's keys go with the run: zeroed, then removed.
        wipe(&paths.fleet);
    }
    let summary = result?;
    println!(
        "e2e-multihost: passed in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    if opts.write_benchmarks {
        write_benchmarks(root, &summary)?;
    }
    Ok(())
}

/// Overwrites every regular file under `dir` with zeros, then removes the folder.
fn wipe(dir: &Path) {
    fn zero(dir: &Path) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let Ok(t) = e.file_type() else { continue };
            if t.is_dir() {
                zero(&e.path());
            } else if t.is_file()
                && let Ok(len) = e.metadata().map(|m| m.len())
            {
                let _ = std::fs::write(e.path(), vec![0u8; usize::try_from(len).unwrap_or(0)]);
            }
        }
    }
    zero(dir);
    let _ = std::fs::remove_dir_all(dir);
}

fn print_logs(paths: &Paths) {
    let Ok(entries) = std::fs::read_dir(paths.out.join("logs")) else {
        return;
    };
    for e in entries.flatten() {
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(25).collect();
        println!("---- {} (last lines)", e.path().display());
        for l in tail.iter().rev() {
            println!("{l}");
        }
    }
}

/// What the run measured.
#[derive(Debug, Default, Serialize)]
struct Summary {
    moves: Vec<MoveFigures>,
    failures: Vec<FailureCase>,
    drain: Vec<DrainMove>,
    transfer: Option<TransferFigures>,
    downtime_100: Option<admin_api::Percentiles>,
    downtime_1: Option<admin_api::Percentiles>,
    connections: u64,
    connections_alive: u64,
    reconnected: u64,
    /// The links' MTU.
    mtu: u16,
    /// `--post-copy`: the post-copy move.
    post_copy: Option<PostCopyFigures>,
}

/// The post-copy move of `--post-copy`.
#[derive(Debug, Serialize)]
struct PostCopyFigures {
    from: String,
    to: String,
    ballast_mib: u32,
    freeze_ms: Option<f64>,
    /// The image set without the memory.
    image_bytes: u64,
    /// criu's page traffic the agents relayed to the target.
    page_bytes_to_target: Option<u64>,
    /// From the restore until every page was resident at the target.
    resident_after_ms: Option<f64>,
    pages: Option<u64>,
    downtime_ms: Option<f64>,
}

#[derive(Debug, Serialize)]
struct MoveFigures {
    from: String,
    to: String,
    freeze_ms: Option<f64>,
    phases_ms: BTreeMap<String, f64>,
    raw_bytes: u64,
    compressed_bytes: u64,
    sealed_bytes: u64,
    transfer_ms: Option<f64>,
    downtime: Option<admin_api::Percentiles>,
}

#[derive(Debug, Serialize)]
struct DrainMove {
    service: String,
    to: String,
    freeze_ms: Option<f64>,
}

#[derive(Debug, Serialize)]
struct FailureCase {
    fault: String,
    outcome: String,
    failed_phase: Option<String>,
    failed_host: Option<String>,
    service_at: String,
}

#[derive(Debug, Serialize)]
struct TransferFigures {
    image_mib: f64,
    plain_mb_per_s: Option<f64>,
    sealed_mb_per_s: f64,
    raw_bytes: u64,
    compressed_bytes: u64,
    sealed_bytes: u64,
}

fn scenario(paths: &Paths, opts: &Options, spec: &Spec, world: &mut World) -> Result<Summary> {
    let mut summary = Summary {
        mtu: opts.mtu,
        ..Summary::default()
    };
    println!(
        "e2e-multihost: building the network ({} hosts, a client site)",
        spec.hosts.len()
    );
    world.topology = Some(Topology::build(spec)?);
    let topo = world.topology.as_ref().context("no topology")?;
    let hosts: Vec<Node> = topo.hosts().to_vec();
    let client_site = topo.client().clone();
    // The fleet: CA, certificates, token key, one configuration per host.
    let mut init = Command::new(paths.bin.join("control"));
    init.arg("fleet-init").arg("--out").arg(&paths.fleet);
    // Short, so that the source-dies case sees a target give up a move left alone.
    init.args(["--inbound-stale-s", &INBOUND_STALE_S.to_string()]);
    for h in &hosts {
        init.arg("--host").arg(format!("{}={}", h.name, h.addr));
    }
    run_ok(&mut init, "control fleet-init")?;
    let logs = paths.out.join("logs");
    std::fs::create_dir_all(&logs)?;
    for node in &hosts {
        let holder = start_holder(node)?;
        world.hosts.push(Host {
            node: node.clone(),
            holder,
            agent: None,
            config: paths.fleet.join(&node.name).join("agent.json"),
            log: logs.join(format!("agent-{}.log", node.name)),
        });
    }
    for h in &mut world.hosts {
        start_agent(paths, h)?;
    }
    let names: Vec<String> = hosts.iter().map(|h| h.name.clone()).collect();
    let (a, b, c) = (names[0].clone(), names[1].clone(), names[2].clone());
    let route = [
        (a.clone(), b.clone()),
        (b.clone(), c.clone()),
        (c.clone(), a.clone()),
    ];

    // A target off the allowlist is refused before anything moves.
    let refused = world
        .host(&a)?
        .cmd(&paths.bin.join("control"))
        .args([
            "--log",
            "error",
            "migrate",
            "--to",
            "zz",
            "--service",
            SERVICE,
        ])
        .output()?;
    if refused.status.success() {
        bail!("a move to a host that is not a peer was not refused");
    }

    // The same moves with one client connection first: the baseline for the 100.
    let solo_addr = start_service(paths, world.host(&a)?, "solo", &[])?;
    let solo_json = paths.out.join("clients-solo.json");
    let mut solo = start_clients(paths, &client_site, &solo_addr, 1, 99, &solo_json)?;
    std::thread::sleep(Duration::from_secs(2));
    let mut solo_ids = Vec::new();
    for (i, (from, to)) in route.iter().enumerate() {
        let r = migrate(
            paths,
            world.host(from)?,
            to,
            "solo",
            &[],
            &paths.out.join(format!("solo-{i}.json")),
        )?;
        if r.outcome != "completed" {
            bail!("solo move {from} -> {to}: {}", r.outcome);
        }
        solo_ids.push(r.id);
    }
    end(&mut solo, Duration::from_secs(20));
    // One connection writes the single client's report.
    let solo_report: admin_api::ClientReport = serde_json::from_slice(
        &std::fs::read(&solo_json).with_context(|| format!("reading {}", solo_json.display()))?,
    )
    .with_context(|| format!("{} is not a client report", solo_json.display()))?;
    if solo_report.connections != 1 || solo_report.handshakes != 1 {
        bail!(
            "the single client made {} connections and {} handshakes",
            solo_report.connections,
            solo_report.handshakes
        );
    }
    for id in &solo_ids {
        if !solo_report
            .migrations
            .iter()
            .any(|m| &m.id == id && !m.aborted && m.completed)
        {
            bail!("the single client did not see move {id} through");
        }
    }
    let solo_downtimes: Vec<f64> = solo_report
        .migrations
        .iter()
        .filter(|m| !m.aborted && solo_ids.contains(&m.id))
        .filter_map(|m| m.downtime_ms)
        .collect();
    summary.downtime_1 = admin_api::Percentiles::of(&solo_downtimes);
    run_ok(
        world
            .host(&a)?
            .cmd(&paths.bin.join("control"))
            .args(["--log", "warn", "service", "stop", "solo"]),
        "control service stop",
    )?;
    println!(
        "e2e-multihost: one client: downtime {}",
        fmt_pct(summary.downtime_1.as_ref())
    );

    // One service, 100 clients in several processes.
    let addr = start_service(paths, world.host(&a)?, SERVICE, &[])?;
    println!("e2e-multihost: service {SERVICE} runs on {a} at {addr}");
    let per = opts.clients.div_ceil(opts.client_processes);
    let mut jsons = Vec::new();
    let mut left = opts.clients;
    for p in 0..opts.client_processes {
        let n = per.min(left);
        if n == 0 {
            break;
        }
        left -= n;
        let json = paths.out.join(format!("clients-{p}.json"));
        jsons.push(json.clone());
        world
            .clients
            .push(start_clients(paths, &client_site, &addr, n, p, &json)?);
    }
    wait_clients_up(world, Duration::from_secs(30))?;
    std::thread::sleep(Duration::from_millis(u64::from(opts.clients) * 10));
    println!(
        "e2e-multihost: {} client connections in {} processes",
        opts.clients,
        world.clients.len()
    );

    // A -> B -> C -> A, two phases, all clients at once.
    let mut move_ids = Vec::new();
    for (i, (from, to)) in route.iter().enumerate() {
        let report = paths.out.join(format!("move-{i}.json"));
        let r = migrate(paths, world.host(from)?, to, SERVICE, &[], &report)?;
        if r.outcome != "completed" {
            bail!("move {from} -> {to}: {}", r.outcome);
        }
        println!(
            "e2e-multihost: {SERVICE} {from} -> {to}: freeze {} ms, phases {:?}, {} B raw / {} B compressed / {} B sealed in {} ms",
            fmt_ms(r.figures.freeze_ms),
            r.figures.phases_ms,
            r.figures.raw_bytes,
            r.figures.compressed_bytes,
            r.figures.sealed_bytes,
            fmt_ms(r.figures.transfer_ms)
        );
        move_ids.push(r.id.clone());
        summary.moves.push(r.figures);
    }

    // Every failure case of a cross-host move, the service at a and its clients on it.
    let cases: [(&str, &String); 7] = [
        ("cut-link", &b),
        ("corrupt-chunk", &b),
        ("forged-token", &b),
        ("restore-fails", &b),
        ("target-dies-before-restore", &b),
        ("source-dies-after-dump", &b),
        // Last: it ends with the service at c.
        ("target-dies-during-restore", &c),
    ];
    for (fault, to) in cases {
        let report = paths.out.join(format!("fault-{fault}.json"));
        let dies = fault.starts_with("target-dies");
        let r = if dies {
            migrate_while_restarting(paths, world, &a, to, fault, &report)?
        } else if fault.starts_with("source-dies") {
            migrate_source_dies(paths, world, &a, to, fault)?
        } else {
            migrate(
                paths,
                world.host(&a)?,
                to,
                SERVICE,
                &["--fault", fault],
                &report,
            )?
        };
        let case = FailureCase {
            fault: fault.to_owned(),
            outcome: r.outcome.clone(),
            failed_phase: r.failed.as_ref().map(|f| f.0.clone()),
            failed_host: r.failed.as_ref().map(|f| f.1.clone()),
            service_at: where_is(paths, world.host(&a)?, SERVICE)?,
        };
        println!(
            "e2e-multihost: fault {fault}: {} ({} at {}), service at {}",
            case.outcome,
            case.failed_phase.as_deref().unwrap_or("-"),
            case.failed_host.as_deref().unwrap_or("-"),
            case.service_at
        );
        // The service runs at the source, or at the target when it already ran there (the
        // target's agent died after its restore: its successor finishes the move).
        let ok = (case.outcome == "rolled back" && case.service_at == a)
            || (fault == "target-dies-during-restore"
                && case.outcome == "completed"
                && case.service_at == *to);
        if !ok {
            bail!(
                "fault {fault}: expected the service up at {a} (or at {to} after its restore), got {case:?}"
            );
        }
        // The target kept nothing of a move that rolled back: no migration in flight, no
        // slot taken (its free slots are what its services leave). An abort that came during
        // a running step is answered at once and applied when the step ends: within
        // ABORT_APPLIED, not necessarily by the time the source reports the rollback (seen
        // under load for target-dies-during-restore: one migration still in flight).
        if case.outcome == "rolled back" {
            let since = Instant::now();
            while let Err(e) = check_target_clean(paths, world.host(to)?, to) {
                if since.elapsed() > ABORT_APPLIED {
                    return Err(e);
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        summary.failures.push(case);
    }

    // The clients: every connection survived everything, with one handshake.
    for c in &mut world.clients {
        end(c, Duration::from_secs(20));
    }
    let mut summaries = Vec::new();
    for json in &jsons {
        summaries.push(read_summary(json)?);
    }
    for s in &summaries {
        summary.connections += s.connections_started;
        summary.connections_alive += s.connections_alive;
        summary.reconnected += s.connections_reconnected;
        if !s.verified {
            bail!("clients {}: not verified: {:?}", s.client_id, s.errors);
        }
    }
    if summary.connections != u64::from(opts.clients)
        || summary.connections_alive != summary.connections
        || summary.reconnected != 0
    {
        bail!(
            "connections: {} started, {} alive, {} reconnected (of {})",
            summary.connections,
            summary.connections_alive,
            summary.reconnected,
            opts.clients
        );
    }
    // Every connection saw every move through (its echoes went on after it).
    for s in &summaries {
        for id in &move_ids {
            let seen = s.migrations.iter().find(|m| &m.id == id && !m.aborted);
            match seen {
                Some(m) if m.completed == s.connections_started => {}
                Some(m) => bail!(
                    "clients {}: move {id} completed for {} of {} connections",
                    s.client_id,
                    m.completed,
                    s.connections_started
                ),
                None => bail!("clients {}: move {id} was never seen", s.client_id),
            }
        }
    }
    for (m, id) in summary.moves.iter_mut().zip(&move_ids) {
        m.downtime =
            admin_api::Percentiles::of(&downtimes_of(&summaries, std::slice::from_ref(id)));
    }
    summary.downtime_100 = admin_api::Percentiles::of(&downtimes_of(&summaries, &move_ids));
    println!(
        "e2e-multihost: {} connections survived {} moves and {} failure cases, one handshake \
         each; downtime over all clients and moves: {}",
        summary.connections,
        summary.moves.len(),
        summary.failures.len(),
        fmt_pct(summary.downtime_100.as_ref())
    );

    // Drain a host with three services.
    let service_at = where_is(paths, world.host(&a)?, SERVICE)?;
    let drained = if service_at == c {
        b.clone()
    } else {
        c.clone()
    };
    for i in 0..3 {
        start_service(paths, world.host(&drained)?, &format!("d{i}"), &[])?;
    }
    // Its agent is killed and started again: the new one takes the running services over
    // (same servers, same PIDs) instead of ending them.
    let before = services_of(paths, world.host(&drained)?)?;
    {
        let host = world.host_mut(&drained)?;
        if let Some(mut agent) = host.agent.take() {
            agent.kill()?;
            agent.wait()?;
        }
        start_agent(paths, host)?;
    }
    let after = services_of(paths, world.host(&drained)?)?;
    if before != after || before.len() != 3 {
        bail!(
            "{drained}'s restarted agent did not take its services over: {before:?} -> {after:?}"
        );
    }
    println!("e2e-multihost: {drained}'s agent killed and restarted: it took over {after:?}");
    let out = run_ok(
        world.host(&drained)?.cmd(&paths.bin.join("control")).args([
            "--log",
            "warn",
            "drain",
            &drained,
            "--concurrency",
            "2",
            "--json",
        ]),
        "control drain",
    )?;
    let moves: Vec<agent_protocol::MoveSummary> =
        serde_json::from_str(&out).context("control drain --json")?;
    if moves.len() != 3
        || moves
            .iter()
            .any(|m| m.outcome != agent_protocol::Outcome::Completed)
    {
        bail!("drain of {drained}: {out}");
    }
    println!(
        "e2e-multihost: drained {drained}: {}",
        moves
            .iter()
            .map(|m| format!(
                "{} -> {} (freeze {} ms)",
                m.service,
                m.to,
                fmt_ms(m.freeze_ms)
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    summary.drain = moves
        .iter()
        .map(|m| DrainMove {
            service: m.service.to_string(),
            to: m.to.to_string(),
            freeze_ms: m.freeze_ms,
        })
        .collect();

    // The transfer of a big image set.
    let mib = if opts.quick { 64 } else { 256 };
    let from = service_host_for_big(&a, &b, &c, &service_at);
    start_service(
        paths,
        world.host(&from.0)?,
        "big",
        &["--ballast-mib", &mib.to_string()],
    )?;
    let big_report = paths.out.join("big.json");
    let r = migrate(
        paths,
        world.host(&from.0)?,
        &from.1,
        "big",
        &["--plain-copy-after"],
        &big_report,
    )?;
    let plain: serde_json::Value = serde_json::from_slice(&std::fs::read(&big_report)?)?;
    let plain_ms = plain["cross_host"]["plain_copy_ms"].as_f64();
    if r.outcome != "completed" {
        bail!("the {mib} MiB move: {}", r.outcome);
    }
    let mb_s = r
        .figures
        .transfer_ms
        .map_or(0.0, |ms| r.figures.raw_bytes as f64 / 1e6 / (ms / 1e3));
    println!(
        "e2e-multihost: {mib} MiB service {} -> {}: {:.1} MiB image set, sealed transfer {:.0} MB/s \
         ({} B compressed, {} B sealed), freeze {} ms",
        from.0,
        from.1,
        r.figures.raw_bytes as f64 / (1 << 20) as f64,
        mb_s,
        r.figures.compressed_bytes,
        r.figures.sealed_bytes,
        fmt_ms(r.figures.freeze_ms)
    );
    let plain_mb_s = plain_ms.map(|ms| r.figures.raw_bytes as f64 / 1e6 / (ms / 1e3));
    println!(
        "e2e-multihost: the same image set copied plainly over the same link: {} MB/s; sealed / \
         plain {}",
        plain_mb_s.map_or_else(|| "-".to_owned(), |v| format!("{v:.0}")),
        plain_mb_s.map_or_else(|| "-".to_owned(), |p| format!("{:.2}", mb_s / p))
    );
    summary.transfer = Some(TransferFigures {
        image_mib: r.figures.raw_bytes as f64 / (1 << 20) as f64,
        plain_mb_per_s: plain_mb_s,
        sealed_mb_per_s: mb_s,
        raw_bytes: r.figures.raw_bytes,
        compressed_bytes: r.figures.compressed_bytes,
        sealed_bytes: r.figures.sealed_bytes,
    });
    if opts.post_copy {
        summary.post_copy = Some(post_copy_moves(
            paths,
            world,
            &client_site,
            (&from.0, &from.1),
            mib,
        )?);
    }
    std::fs::write(
        paths.out.join("report.json"),
        serde_json::to_vec_pretty(&summary)?,
    )?;
    Ok(summary)
}

/// `--post-copy`: the big service (in the host's pid namespace, at `big_at.1`) may not move
/// post-copy (refused at its host before anything moves, and it stays); a ballast service in
/// its own pid namespace moves post-copy from `big_at.0` to `big_at.1` with one client
/// connection that lives through it, its memory relayed by the agents.
fn post_copy_moves(
    paths: &Paths,
    world: &World,
    client_site: &Node,
    big_at: (&str, &str),
    mib: u32,
) -> Result<PostCopyFigures> {
    let (from, to) = (big_at.0.to_owned(), big_at.1.to_owned());
    // Refused before anything is touched: the big service shares its host's pid namespace.
    let refused = migrate_cmd(paths, world.host(&to)?, &from, "big")
        .args(["--memory", "post-copy"])
        .output()
        .context("running control migrate --to --memory post-copy")?;
    let said = String::from_utf8_lossy(&refused.stderr);
    if refused.status.success() || !said.contains("own pid namespace") {
        bail!(
            "a post-copy move of a server outside its own pid namespace was not refused as \
             such ({}): {said}",
            refused.status
        );
    }
    let big_where = where_is(paths, world.host(&to)?, "big")?;
    if big_where != to {
        bail!("after the refused post-copy move, big runs at {big_where}, not {to}");
    }
    println!(
        "e2e-multihost: a post-copy move of a server in the host's pid namespace: refused, it stays at {to}"
    );

    // The post-copy move: root server, PID 1 of its own pid namespace.
    let mut cmd = world.host(&from)?.cmd(&paths.bin.join("control"));
    cmd.args(["--log", "warn", "service", "start", "lazy"])
        .args(["--pid-namespace", "--server-user", "root"])
        .args(["--", "--ballast-mib", &mib.to_string()]);
    let out = run_ok(&mut cmd, "control service start --pid-namespace")?;
    let addr = out
        .split_whitespace()
        .nth(4)
        .map(str::to_owned)
        .with_context(|| format!("unexpected answer: {out}"))?;
    let json = paths.out.join("clients-lazy.json");
    let mut client = start_clients(paths, client_site, &addr, 1, 98, &json)?;
    std::thread::sleep(Duration::from_secs(2));
    let report = paths.out.join("post-copy.json");
    let r = migrate(
        paths,
        world.host(&from)?,
        &to,
        "lazy",
        &["--memory", "post-copy"],
        &report,
    );
    // The client's report is read whatever the move's result (it says what it saw).
    std::thread::sleep(Duration::from_secs(2));
    end(&mut client, Duration::from_secs(20));
    let r = r?;
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&report)?)?;
    if r.outcome != "completed" {
        bail!(
            "the post-copy move {from} -> {to}: {} at {:?}; post_copy: {}",
            r.outcome,
            r.failed,
            v["report"]["post_copy"]
        );
    }
    let cross = &v["cross_host"];
    let pc = &v["report"]["post_copy"];
    if cross["memory"].as_str() != Some("post-copy") || pc["transport"] != "agents-quic-stream" {
        bail!("the move's report does not say post-copy over the agents' stream: {cross} {pc}");
    }
    let resident_after_ms = pc["resident_after_ms"].as_f64();
    let page_bytes = cross["page_bytes_to_target"].as_u64();
    if resident_after_ms.is_none() {
        bail!("no resident-after figure: {pc}");
    }
    // The ballast crossed as pages, not in the image set.
    let ballast = u64::from(mib) << 20;
    if page_bytes.unwrap_or(0) < ballast {
        bail!("only {page_bytes:?} bytes of pages were relayed for a {mib} MiB ballast");
    }
    if r.figures.raw_bytes >= ballast {
        bail!(
            "the post-copy image set holds {} bytes, the ballast with it",
            r.figures.raw_bytes
        );
    }
    let lazy_where = where_is(paths, world.host(&from)?, "lazy")?;
    if lazy_where != to {
        bail!("after the post-copy move, lazy runs at {lazy_where}, not {to}");
    }
    let client_report: admin_api::ClientReport = serde_json::from_slice(
        &std::fs::read(&json).with_context(|| format!("reading {}", json.display()))?,
    )
    .with_context(|| format!("{} is not a client report", json.display()))?;
    if client_report.connections != 1 || client_report.handshakes != 1 {
        bail!(
            "the post-copy move's client made {} connections and {} handshakes",
            client_report.connections,
            client_report.handshakes
        );
    }
    let seen = client_report
        .migrations
        .iter()
        .find(|m| m.id == r.id && !m.aborted && m.completed);
    let Some(seen) = seen else {
        bail!("the client did not see the post-copy move {} through", r.id);
    };
    let figures = PostCopyFigures {
        from: from.clone(),
        to: to.clone(),
        ballast_mib: mib,
        freeze_ms: r.figures.freeze_ms,
        image_bytes: r.figures.raw_bytes,
        page_bytes_to_target: page_bytes,
        resident_after_ms,
        pages: pc["pages_transferred"].as_u64(),
        downtime_ms: seen.downtime_ms,
    };
    println!(
        "e2e-multihost: post-copy {mib} MiB service {from} -> {to}: freeze {} ms, image set {} B, \
         {} B of pages relayed over the agents' QUIC connection, resident after {} ms, client \
         downtime {} ms",
        fmt_ms(figures.freeze_ms),
        figures.image_bytes,
        page_bytes.unwrap_or(0),
        fmt_ms(resident_after_ms),
        fmt_ms(figures.downtime_ms)
    );
    run_ok(
        world
            .host(&to)?
            .cmd(&paths.bin.join("control"))
            .args(["--log", "warn", "service", "stop", "lazy"]),
        "control service stop",
    )?;
    Ok(figures)
}

/// A host pair for the big move that leaves the drained services where they are.
fn service_host_for_big(a: &str, b: &str, _c: &str, _edge_at: &str) -> (String, String) {
    (a.to_owned(), b.to_owned())
}

fn read_summary(json: &Path) -> Result<ClientsSummary> {
    serde_json::from_slice(
        &std::fs::read(json).with_context(|| format!("reading {}", json.display()))?,
    )
    .with_context(|| format!("{} is not a clients summary", json.display()))
}

/// Every connection's downtime in the migrations `ids`.
fn downtimes_of(summaries: &[ClientsSummary], ids: &[String]) -> Vec<f64> {
    summaries
        .iter()
        .flat_map(|s| s.migrations.iter())
        .filter(|m| !m.aborted && ids.contains(&m.id))
        .flat_map(|m| m.downtimes_ms.iter().flatten().copied())
        .collect()
}

/// A move whose target agent dies (fault injection): the agent is started again on its
/// host as soon as it is gone, as a host's service manager would, while the move goes on.
fn migrate_while_restarting(
    paths: &Paths,
    world: &mut World,
    from: &str,
    to: &str,
    fault: &str,
    report: &Path,
) -> Result<Moved> {
    let mut child = migrate_cmd(paths, world.host(from)?, to, SERVICE)
        .args(["--fault", fault])
        .arg("--cross-report")
        .arg(report)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let start = Instant::now();
    let host = world.host_mut(to)?;
    let mut restarted = false;
    loop {
        if !restarted
            && let Some(agent) = &mut host.agent
            && let Ok(Some(_)) = agent.try_wait()
        {
            host.agent = None;
            start_agent(paths, host)?;
            restarted = true;
        }
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        if start.elapsed() > Duration::from_secs(180) {
            let _ = child.kill();
            bail!("the move with {fault} did not end within 180 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if !restarted {
        bail!("fault {fault}: the target's agent did not die");
    }
    read_move(report, from, to)
}

/// How long a target keeps a move whose source went quiet, in the scenario.
const INBOUND_STALE_S: u64 = 5;

/// A move whose source agent dies after the dump (fault injection): the target, left alone,
/// gives its half up after [`INBOUND_STALE_S`]; then the source's agent is started again, as
/// a host's service manager would, and finishes the move from its journal (here: rolls it
/// back, restoring the service from its own image set). The command line's answer is lost
/// with the agent; the move's outcome is read from the new agent's status.
fn migrate_source_dies(
    paths: &Paths,
    world: &mut World,
    from: &str,
    to: &str,
    fault: &str,
) -> Result<Moved> {
    let mut child = migrate_cmd(paths, world.host(from)?, to, SERVICE)
        .args(["--fault", fault])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let start = Instant::now();
    loop {
        let host = world.host_mut(from)?;
        if let Some(agent) = &mut host.agent
            && let Ok(Some(_)) = agent.try_wait()
        {
            host.agent = None;
            break;
        }
        if start.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            let _ = child.wait();
            bail!("fault {fault}: the source's agent did not die within 120 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // The command line loses its agent and says so.
    let cli = child.wait()?;
    if cli.success() {
        bail!("fault {fault}: `control migrate` succeeded although its agent died");
    }
    // The target, left alone, gives its half up by itself (agent.json's inbound_stale_s)...
    let alone = Instant::now();
    loop {
        match check_target_clean(paths, world.host(to)?, to) {
            Ok(()) => break,
            Err(e) if alone.elapsed() > Duration::from_secs(INBOUND_STALE_S + 20) => {
                bail!("fault {fault}: the target kept the abandoned move: {e:#}");
            }
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }
    println!(
        "e2e-multihost: fault {fault}: {to} gave the abandoned move up after {:.1} s",
        alone.elapsed().as_secs_f64()
    );
    // ...and the source's agent, started again, takes the move over from its journal.
    start_agent(paths, world.host_mut(from)?)?;
    let host = world.host(from)?;
    loop {
        let fleet = fleet_status(paths, host)?;
        // The new agent's first migration is the one it took over.
        let done = fleet
            .hosts
            .first()
            .and_then(|me| me.recent.iter().find(|m| m.service.as_str() == SERVICE))
            .cloned();
        if let Some(m) = done {
            println!(
                "e2e-multihost: fault {fault}: the restarted agent took the move over after {:.1} s",
                start.elapsed().as_secs_f64()
            );
            return Ok(Moved {
                id: m.migration.to_string(),
                outcome: m.outcome.to_string(),
                failed: m.failed.clone(),
                figures: MoveFigures {
                    from: from.to_owned(),
                    to: to.to_owned(),
                    freeze_ms: None,
                    phases_ms: BTreeMap::new(),
                    raw_bytes: 0,
                    compressed_bytes: 0,
                    sealed_bytes: 0,
                    transfer_ms: None,
                    downtime: None,
                },
            });
        }
        if start.elapsed() > Duration::from_secs(180) {
            bail!(
                "fault {fault}: the restarted agent did not finish the move within 180 s (log {})",
                host.log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn fmt_ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"))
}

fn fmt_pct(p: Option<&admin_api::Percentiles>) -> String {
    p.map_or_else(
        || "none measured".to_owned(),
        |p| {
            format!(
                "p50 {:.1} ms, p95 {:.1} ms, max {:.1} ms",
                p.p50_ms, p.p95_ms, p.max_ms
            )
        },
    )
}

fn run_ok(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A process in `node`'s network namespace and a mount namespace of its own with a private
/// tmpfs at the agents' storage path: the host's disk, for as long as it lives.
fn start_holder(node: &Node) -> Result<Child> {
    let script = format!(
        "mount -t tmpfs -o mode=0700,nosuid,nodev tmpfs {STORAGE} && echo up && exec sleep 86400"
    );
    // unshare first, then only the network namespace: `ip netns exec` would remount /sys and
    // hide the cgroup mounts podman needs.
    let mut child = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--", "nsenter"])
        .arg(format!("--net={}", node.netns_path().display()))
        .args(["--", "sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting a host's holder")?;
    let mut out = child.stdout.take().context("holder stdout")?;
    let mut buf = [0u8; 3];
    use std::io::Read as _;
    out.read_exact(&mut buf)
        .with_context(|| format!("host {}'s holder did not come up", node.name))?;
    Ok(child)
}

fn start_agent(paths: &Paths, host: &mut Host) -> Result<()> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&host.log)?;
    let child = host
        .cmd(&paths.bin.join("control"))
        .args([
            "--log",
            "info",
            "agent",
            "--allow-faults",
            "--storage",
            STORAGE,
        ])
        .arg("--config")
        .arg(&host.config)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting an agent")?;
    host.agent = Some(child);
    // Ready once its socket answers.
    let start = Instant::now();
    loop {
        let ok = host
            .cmd(&paths.bin.join("control"))
            .args(["--log", "error", "status", "--fleet", "--json"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Ok(());
        }
        if let Some(a) = &mut host.agent
            && let Ok(Some(st)) = a.try_wait()
        {
            bail!(
                "the agent of {} exited: {st} (log {})",
                host.node.name,
                host.log.display()
            );
        }
        if start.elapsed() > Duration::from_secs(20) {
            bail!("the agent of {} did not answer within 20 s", host.node.name);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn start_service(paths: &Paths, host: &Host, name: &str, extra: &[&str]) -> Result<String> {
    let mut cmd = host.cmd(&paths.bin.join("control"));
    cmd.args(["--log", "warn", "service", "start", name]);
    if !extra.is_empty() {
        cmd.arg("--").args(extra);
    }
    let out = run_ok(&mut cmd, "control service start")?;
    // "service edge runs at 10.233.0.11:4300 (PID n)"
    out.split_whitespace()
        .nth(4)
        .map(str::to_owned)
        .with_context(|| format!("unexpected answer: {out}"))
}

fn start_clients(
    paths: &Paths,
    site: &Node,
    addr: &str,
    n: u32,
    p: u32,
    json: &Path,
) -> Result<Child> {
    let ip = addr.split(':').next().unwrap_or(addr);
    let log = std::fs::File::create(paths.out.join("logs").join(format!("clients-{p}.log")))?;
    Command::new("ip")
        .args(["netns", "exec", &site.netns])
        .arg(paths.bin.join("cwrapper"))
        .args(["--target", addr, "--server-name", ip, "--stay-connected"])
        .arg("--ca")
        .arg(paths.fleet.join("ca.pem"))
        .args([
            "--connections",
            &n.to_string(),
            "--client-id",
            &format!("c{p}"),
        ])
        .args([
            "--interval-ms",
            "20",
            "--overlap-max-ms",
            "30000",
            "--recovery-deadline-ms",
            "30000",
            // cwrapper refuses an idle timeout that does not outlast its overlap cap by 5 s
            // (the connection would die before the cap); the server's 30 s still bounds the
            // negotiated timeout, as before.
            "--idle-timeout-s",
            "40",
        ])
        .arg("--json")
        .arg(json)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting clients")
}

fn wait_clients_up(world: &mut World, limit: Duration) -> Result<()> {
    // The clients print nothing until a move; give them time to connect, and check that
    // none exited.
    let start = Instant::now();
    while start.elapsed() < limit.min(Duration::from_secs(3)) {
        for c in &mut world.clients {
            if let Ok(Some(st)) = c.try_wait() {
                bail!("a client process exited at start: {st}");
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

struct Moved {
    id: String,
    outcome: String,
    failed: Option<(String, String)>,
    figures: MoveFigures,
}

/// `control migrate --phases two --to TO --service SERVICE` on `host`.
fn migrate_cmd(paths: &Paths, host: &Host, to: &str, service: &str) -> Command {
    let mut cmd = host.cmd(&paths.bin.join("control"));
    cmd.args(["--log", "warn", "migrate", "--phases", "two", "--to", to])
        .args(["--service", service]);
    cmd
}

/// A move with `extra` arguments (`--fault F`, `--plain-copy-after`), and its report.
fn migrate(
    paths: &Paths,
    host: &Host,
    to: &str,
    service: &str,
    extra: &[&str],
    report: &Path,
) -> Result<Moved> {
    let out = migrate_cmd(paths, host, to, service)
        .args(extra)
        .arg("--cross-report")
        .arg(report)
        .output()
        .context("running control migrate --to")?;
    if !report.exists() {
        bail!(
            "no report from control migrate --to {to}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    read_move(report, &host.node.name, to)
}

fn read_move(report: &Path, from: &str, to: &str) -> Result<Moved> {
    let text =
        std::fs::read_to_string(report).with_context(|| format!("reading {}", report.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    let cross = &v["cross_host"];
    let r = &v["report"];
    let outcome = match r["result"].as_str() {
        Some("completed") => "completed",
        Some("rolled_back") => "rolled back",
        _ => "failed",
    }
    .to_owned();
    let failed = cross["failed"].as_array().and_then(|a| {
        Some((
            a.first()?.as_str()?.to_owned(),
            a.get(1)?.as_str()?.to_owned(),
        ))
    });
    let mut phases_ms = BTreeMap::new();
    if let Some(obj) = r["timeline"].as_object() {
        for (k, v) in obj {
            if let (Some(name), Some(us)) = (k.strip_suffix("_time_us"), v.as_u64()) {
                phases_ms.insert(name.to_owned(), us as f64 / 1e3);
            }
        }
    }
    let figures = MoveFigures {
        from: from.to_owned(),
        to: to.to_owned(),
        freeze_ms: phases_ms.get("freeze").copied(),
        phases_ms,
        raw_bytes: cross["raw_bytes"].as_u64().unwrap_or(0),
        compressed_bytes: cross["compressed_bytes"].as_u64().unwrap_or(0),
        sealed_bytes: cross["sealed_bytes"].as_u64().unwrap_or(0),
        transfer_ms: cross["transfer_ms"].as_f64(),
        downtime: None,
    };
    Ok(Moved {
        id: r["migration_id"].as_str().unwrap_or_default().to_owned(),
        outcome,
        failed,
        figures,
    })
}

/// The fleet as `host`'s agent sees it (`control status --fleet --json`; `host` first).
fn fleet_status(paths: &Paths, host: &Host) -> Result<agent_protocol::FleetStatus> {
    let out = run_ok(
        host.cmd(&paths.bin.join("control"))
            .args(["--log", "error", "status", "--fleet", "--json"]),
        "control status --fleet",
    )?;
    serde_json::from_str(&out).context("control status --fleet --json")
}

/// `host`'s agent holds no migration in flight and no slot beyond its services'.
/// How long a target may take to apply an abort that came during a running step.
const ABORT_APPLIED: Duration = Duration::from_secs(15);

fn check_target_clean(paths: &Paths, host: &Host, name: &str) -> Result<()> {
    let fleet = fleet_status(paths, host)?;
    let me = fleet
        .hosts
        .first()
        .with_context(|| format!("{name}'s agent did not describe itself"))?;
    // fleet-init's default: 8 services per host.
    let expected_free = 8u32.saturating_sub(u32::try_from(me.services.len()).unwrap_or(u32::MAX));
    if me.migrations_in_flight != 0 || me.free_slots != expected_free {
        bail!(
            "{name} kept something of a rolled-back move: {} migrations in flight, {} free slots \
             with {} services (expected {expected_free})",
            me.migrations_in_flight,
            me.free_slots,
            me.services.len()
        );
    }
    Ok(())
}

/// The services `host`'s agent runs, with their servers' PIDs.
fn services_of(paths: &Paths, host: &Host) -> Result<Vec<(String, i32)>> {
    let fleet = fleet_status(paths, host)?;
    let me = fleet
        .hosts
        .first()
        .context("the agent did not describe itself")?;
    Ok(me
        .services
        .iter()
        .map(|s| (s.name.to_string(), s.pid))
        .collect())
}

/// Which host runs `service`, from `host`'s agent's view of the fleet.
fn where_is(paths: &Paths, host: &Host, service: &str) -> Result<String> {
    let fleet = fleet_status(paths, host)?;
    if !fleet.unreachable.is_empty() {
        bail!("hosts unreachable: {:?}", fleet.unreachable);
    }
    let at: Vec<String> = fleet
        .hosts
        .iter()
        .filter(|h| h.services.iter().any(|s| s.name.as_str() == service))
        .map(|h| h.host.to_string())
        .collect();
    match at.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!("service {service} runs nowhere"),
        many => bail!("service {service} runs on several hosts: {many:?}"),
    }
}

fn write_benchmarks(root: &Path, summary: &Summary) -> Result<()> {
    let mut s = String::new();
    writeln!(s, "{BEGIN}")?;
    writeln!(
        s,
        "\n### Across hosts (`cargo xtask e2e-multihost --write-benchmarks`)\n"
    )?;
    writeln!(
        s,
        "Three hosts and a client site as network namespaces on one 2-core machine (veth links \
         through a bridge, MTU {}), an agent per host, the demo server on one thread, two-phase \
         moves, {} client connections in 4 processes, release build.\n",
        summary.mtu, summary.connections
    )?;
    writeln!(
        s,
        "| move | freeze ms | dump ms | transfer ms | restore ms | raw B | compressed B | sealed B | client downtime p50 / p95 / max ms |"
    )?;
    writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|---|")?;
    for m in &summary.moves {
        let ph = |k: &str| fmt_ms(m.phases_ms.get(k).copied());
        writeln!(
            s,
            "| {} -> {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            m.from,
            m.to,
            fmt_ms(m.freeze_ms),
            ph("dump"),
            ph("transfer"),
            ph("restore"),
            m.raw_bytes,
            m.compressed_bytes,
            m.sealed_bytes,
            m.downtime.as_ref().map_or_else(
                || "-".to_owned(),
                |p| format!("{:.1} / {:.1} / {:.1}", p.p50_ms, p.p95_ms, p.max_ms)
            )
        )?;
    }
    let (one, many) = (summary.downtime_1.as_ref(), summary.downtime_100.as_ref());
    writeln!(
        s,
        "\nClient downtime over the three moves: one client {}; {} clients {}.",
        fmt_pct(one),
        summary.connections,
        fmt_pct(many)
    )?;
    if let (Some(o), Some(m)) = (one, many) {
        writeln!(
            s,
            "Targets: p95 / p50 across the clients {:.2} (target <= 1.5); p50 with {} clients / p50 with one {:.2} (target <= 1.3).",
            m.p95_ms / m.p50_ms,
            summary.connections,
            m.p50_ms / o.p50_ms
        )?;
    }
    if let Some(t) = &summary.transfer {
        writeln!(
            s,
            "\n{:.0} MiB service (incompressible ballast): sealed transfer {:.0} MB/s (target >= 400), the same set copied plainly over the same link afterwards {} MB/s (sealed / plain {}); {} B raw, {} B compressed, {} B sealed.",
            t.image_mib,
            t.sealed_mb_per_s,
            t.plain_mb_per_s
                .map_or_else(|| "-".to_owned(), |v| format!("{v:.0}")),
            t.plain_mb_per_s.map_or_else(
                || "-".to_owned(),
                |p| format!("{:.2}", t.sealed_mb_per_s / p)
            ),
            t.raw_bytes,
            t.compressed_bytes,
            t.sealed_bytes
        )?;
    }
    writeln!(
        s,
        "\n| failure case | outcome | failed phase at host | service afterwards at |"
    )?;
    writeln!(s, "|---|---|---|---|")?;
    for f in &summary.failures {
        writeln!(
            s,
            "| {} | {} | {} | {} |",
            f.fault,
            f.outcome,
            match (&f.failed_phase, &f.failed_host) {
                (Some(p), Some(h)) => format!("{p} at {h}"),
                _ => "-".to_owned(),
            },
            f.service_at
        )?;
    }
    writeln!(
        s,
        "\nEvery connection survived with one handshake ({} of {} alive, {} reconnected). Drain of 3 services (concurrency 2): {}.\n",
        summary.connections_alive,
        summary.connections,
        summary.reconnected,
        summary
            .drain
            .iter()
            .map(|d| format!("{} -> {} ({} ms)", d.service, d.to, fmt_ms(d.freeze_ms)))
            .collect::<Vec<_>>()
            .join(", ")
    )?;
    if let Some(pc) = &summary.post_copy {
        writeln!(
            s,
            "Post-copy between hosts (`--post-copy`): a {} MiB service {} -> {}, freeze {} ms, \
             image set {} B without the memory, {} B of pages relayed over the agents' QUIC \
             connection, every page resident {} ms after the restore, client downtime {} ms.\n",
            pc.ballast_mib,
            pc.from,
            pc.to,
            fmt_ms(pc.freeze_ms),
            pc.image_bytes,
            pc.page_bytes_to_target
                .map_or("-".to_owned(), |b| b.to_string()),
            fmt_ms(pc.resident_after_ms),
            fmt_ms(pc.downtime_ms),
        )?;
    }
    writeln!(s, "{END}")?;
    let path = root.join("BENCHMARKS.md");
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    let new = match (text.find(BEGIN), text.find(END)) {
        (Some(b), Some(e)) if e > b => {
            format!("{}{}{}", &text[..b], s.trim_end(), &text[e + END.len()..])
        }
        _ => format!("{}\n\n{}", text.trim_end(), s),
    };
    std::fs::write(&path, new)?;
    Ok(())
}
