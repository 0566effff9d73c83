//! The command line of the agent's commands: `agent`, `fleet-init`, `service`, `drain`, and
//! `migrate --to` / `status --fleet` (which talk to the agent of this host).

use std::path::{Path, PathBuf};
use std::time::Duration;

use admin_api::Phases;
use agent_protocol::{
    Drain, HostStatus, LocalReply, LocalRequest, MigrateService, MoveFault, MoveSummary, Name,
    StartService, TargetFault,
};
use anyhow::{Result, bail};
use clap::{Args, Subcommand};

use super::config::{self, FleetInit, HostArg};
use super::daemon::{self, AgentOptions};
use super::local;

/// `control agent`.
#[derive(Debug, Args)]
pub(crate) struct AgentArgs {
    /// The agent's configuration (`agent.json`, as `control fleet-init` writes it).
    #[arg(long)]
    config: PathBuf,
    /// The agent's private storage: services' folders, image sets, keys, its socket. The
    /// same path on every host (a restored server reopens its files by path).
    #[arg(long, default_value = config::DEFAULT_STORAGE)]
    storage: PathBuf,
    /// Run in a mount namespace of its own with a fresh private tmpfs at --storage (without
    /// it, --storage must be a private folder already, e.g. in a mount namespace the caller
    /// made).
    #[arg(long)]
    private_storage: bool,
    /// Inject the faults other agents ask for (tests and the multi-host scenario only).
    #[arg(long, hide = true)]
    allow_faults: bool,
    /// The server binary services run (default: swrapper beside this control).
    #[arg(long)]
    swrapper: Option<PathBuf>,
}

/// `control fleet-init`.
#[derive(Debug, Args)]
pub(crate) struct FleetInitArgs {
    /// The folder to create (must not exist).
    #[arg(long)]
    out: PathBuf,
    /// A host, as NAME=ADDRESS (e.g. a=10.233.0.11); at least two.
    #[arg(long = "host", required = true)]
    hosts: Vec<HostArg>,
    /// Host UDP ports for services, FIRST-LAST.
    #[arg(long, default_value = "4300-4399", value_parser = parse_range)]
    service_ports: (u16, u16),
    /// Most services per host.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1000))]
    max_services: u32,
    /// Local TCP port of each agent's metrics and health endpoint.
    #[arg(long, default_value_t = 9464)]
    metrics_port: u16,
    /// Seconds a target waits for the next request of a move whose source went quiet (its
    /// agent died) before it gives its half of the move up.
    #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(5..=86_400))]
    inbound_stale_s: u64,
}

fn parse_range(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?}: expected FIRST-LAST, e.g. 4300-4399"))?;
    let a: u16 = a.parse().map_err(|e| format!("{a:?}: {e}"))?;
    let b: u16 = b.parse().map_err(|e| format!("{b:?}: {e}"))?;
    if a == 0 || a > b {
        return Err(format!("{s:?}: not a range of ports"));
    }
    Ok((a, b))
}

/// Where the command line finds its host's agent.
#[derive(Debug, Args, Clone)]
pub(crate) struct AgentSocket {
    /// The agent's unix socket.
    #[arg(long, env = "QLM_AGENT_SOCKET", default_value_os_t = default_socket())]
    agent_socket: PathBuf,
}

fn default_socket() -> PathBuf {
    Path::new(config::DEFAULT_STORAGE).join(daemon::SOCKET)
}

/// `control service`.
#[derive(Debug, Args)]
pub(crate) struct ServiceArgs {
    #[command(flatten)]
    socket: AgentSocket,
    #[command(subcommand)]
    cmd: ServiceCmd,
}

#[derive(Debug, Subcommand)]
enum ServiceCmd {
    /// Start a service (the demo server) on this host.
    Start {
        /// Its name, the same on every host it moves to.
        #[arg(value_name = "NAME")]
        service: Name,
        /// The host port clients reach it at (default: the first free one of the host's
        /// service ports).
        #[arg(long, default_value_t = 0)]
        port: u16,
        /// The account the server runs as.
        #[arg(long, default_value = "qlm-server")]
        server_user: String,
        /// Start the server as PID 1 of its own pid namespace, which `migrate --to HOST
        /// --memory post-copy` needs (cold moves work too). Needs `--server-user root`, as
        /// `control up --pid-namespace`: criu dumps a process in its own pid namespace only
        /// if that process may mount a /proc for it.
        #[arg(long)]
        pid_namespace: bool,
        /// Extra arguments for the server (e.g. `-- --ballast-mib 64`).
        #[arg(last = true)]
        server_args: Vec<String>,
    },
    /// Stop a service of this host.
    Stop {
        /// Its name.
        #[arg(value_name = "NAME")]
        service: Name,
    },
}

/// `control drain`.
#[derive(Debug, Args)]
pub(crate) struct DrainArgs {
    #[command(flatten)]
    socket: AgentSocket,
    /// The host to drain: this one (the command talks to its agent).
    host: Name,
    /// Send the services here only (repeat for several; default: every allowed host, the one
    /// with the most free slots first).
    #[arg(long = "to")]
    to: Vec<Name>,
    /// Moves in flight at once.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    concurrency: u32,
    /// One- or two-phase moves.
    #[arg(long, default_value = "one")]
    phases: Phases,
    /// Print the moves as JSON.
    #[arg(long)]
    json: bool,
}

/// `control migrate --to HOST` (the agent's move; the single-host options do not apply).
#[derive(Debug, Args, Clone)]
pub(crate) struct CrossMoveArgs {
    /// Move a service of this host to the agent of HOST (talks to this host's agent).
    #[arg(long)]
    pub(crate) to: Option<Name>,
    /// The service to move (with --to).
    #[arg(long, requires = "to")]
    pub(crate) service: Option<Name>,
    #[command(flatten)]
    socket: AgentSocket,
    /// Fault injection (needs agents started with --allow-faults): cut-link,
    /// corrupt-chunk, forged-token, target-dies-before-restore, target-dies-during-restore,
    /// restore-fails, source-dies-after-dump.
    #[arg(long, hide = true, requires = "to", value_parser = parse_fault)]
    fault: Option<MoveFault>,
    /// Write the move's JSON report here.
    #[arg(long, requires = "to")]
    cross_report: Option<PathBuf>,
    /// After a completed move, copy the same image set plainly (no compression, no sealing)
    /// to the target over the same link and report its time: the sealed transfer's baseline
    /// (benchmarks; outside the freeze).
    #[arg(long, hide = true, requires = "to")]
    plain_copy_after: bool,
}

fn parse_fault(s: &str) -> Result<MoveFault, String> {
    Ok(match s {
        "cut-link" => MoveFault::CutLinkDuringTransfer,
        "corrupt-chunk" => MoveFault::CorruptChunk,
        "forged-token" => MoveFault::ForgedToken,
        "target-dies-before-restore" => MoveFault::Target(TargetFault::DieBeforeRestore),
        "target-dies-during-restore" => MoveFault::Target(TargetFault::DieDuringRestore),
        "restore-fails" => MoveFault::Target(TargetFault::RestoreFails),
        "source-dies-after-dump" => MoveFault::SourceDiesAfterDump,
        other => return Err(format!("unknown fault {other:?}")),
    })
}

/// `control status --fleet`.
#[derive(Debug, Args, Clone)]
pub(crate) struct FleetStatusArgs {
    /// Show every host of the fleet, from this host's agent (instead of the single-host
    /// deployment).
    #[arg(long)]
    pub(crate) fleet: bool,
    /// As JSON, for scripts.
    #[arg(long, requires = "fleet")]
    json: bool,
    #[command(flatten)]
    socket: AgentSocket,
}

pub(crate) fn agent(a: &AgentArgs) -> Result<()> {
    let swrapper = match &a.swrapper {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .map(|d| d.join("swrapper"))
            .unwrap_or_else(|| PathBuf::from("swrapper")),
    };
    if !swrapper.is_file() {
        bail!("no server binary at {} (--swrapper)", swrapper.display());
    }
    daemon::run(&AgentOptions {
        config: a.config.clone(),
        storage: a.storage.clone(),
        private_storage: a.private_storage,
        allow_faults: a.allow_faults,
        swrapper,
    })
}

pub(crate) fn fleet_init(a: &FleetInitArgs) -> Result<()> {
    config::fleet_init(&FleetInit {
        out: a.out.clone(),
        hosts: a.hosts.clone(),
        service_ports: a.service_ports,
        max_services: a.max_services,
        metrics_port: a.metrics_port,
        inbound_stale_s: a.inbound_stale_s,
    })?;
    println!(
        "fleet written to {}: ca.pem (clients trust it), and per host <host>/agent.json for \
         `control agent --config`",
        a.out.display()
    );
    Ok(())
}

fn ask(socket: &AgentSocket, request: &LocalRequest, limit: Duration) -> Result<LocalReply> {
    match local::request(&socket.agent_socket, request, limit)? {
        LocalReply::Error(e) => bail!("{e}"),
        reply => Ok(reply),
    }
}

pub(crate) fn service(a: &ServiceArgs) -> Result<()> {
    match &a.cmd {
        ServiceCmd::Start {
            service: name,
            port,
            server_user,
            pid_namespace,
            server_args,
        } => {
            // As `control up`: root only with its own pid namespace, and the other way round.
            if *pid_namespace != (server_user == "root") {
                bail!(
                    "--pid-namespace goes with --server-user root (criu dumps a server in its \
                     own pid namespace only if it may mount /proc), and root only with it"
                );
            }
            let user = (server_user != "root").then(|| server_user.clone());
            match ask(
                &a.socket,
                &LocalRequest::Start(StartService {
                    name: name.clone(),
                    port: *port,
                    server_user: user,
                    server_args: server_args.clone(),
                    pid_namespace: *pid_namespace,
                }),
                Duration::from_secs(60),
            )? {
                LocalReply::Started(s) => {
                    println!("service {} runs at {} (PID {})", s.name, s.address, s.pid);
                    Ok(())
                }
                other => bail!("the agent answered {other:?}"),
            }
        }
        ServiceCmd::Stop { service: name } => {
            ask(
                &a.socket,
                &LocalRequest::Stop {
                    service: name.clone(),
                },
                Duration::from_secs(30),
            )?;
            println!("service {name} stopped");
            Ok(())
        }
    }
}

/// `control migrate --to HOST`: `memory` is `--memory` (post-copy: the server runs at the
/// target before its memory arrived, the pages relayed by the agents).
pub(crate) fn migrate(
    a: &CrossMoveArgs,
    phases: Phases,
    memory: crate::postcopy::Memory,
) -> Result<()> {
    let (Some(to), Some(service)) = (&a.to, &a.service) else {
        bail!("--to needs --service NAME");
    };
    let reply = ask(
        &a.socket,
        &LocalRequest::Migrate(MigrateService {
            service: service.clone(),
            to: to.clone(),
            phases,
            fault: a.fault,
            plain_copy_after: a.plain_copy_after,
            memory: match memory {
                crate::postcopy::Memory::Cold => agent_protocol::Memory::Cold,
                crate::postcopy::Memory::PostCopy => agent_protocol::Memory::PostCopy,
            },
        }),
        Duration::from_secs(600),
    )?;
    let LocalReply::Moved {
        summary,
        report_json,
    } = reply
    else {
        bail!("the agent answered {reply:?}");
    };
    if let Some(path) = &a.cross_report {
        crate::secure::write_private(path, report_json.as_bytes())?;
    }
    print_moves(std::slice::from_ref(&summary));
    if let Some(line) = post_copy_line(&report_json) {
        println!("{line}");
    }
    if summary.outcome != agent_protocol::Outcome::Completed {
        bail!(
            "migration {}: {}",
            summary.outcome,
            summary.failed.map_or_else(
                || "see the report".to_owned(),
                |(p, h)| format!("{p} failed at {h}")
            )
        );
    }
    Ok(())
}

/// The parts of a move's report (`outbound::CrossReport`, JSON) a post-copy line needs.
#[derive(Debug, serde::Deserialize)]
struct PostCopyView {
    cross_host: CrossView,
    report: ReportView,
}

#[derive(Debug, serde::Deserialize)]
struct CrossView {
    #[serde(default)]
    memory: String,
    page_bytes_to_target: Option<u64>,
}

#[derive(Debug, serde::Deserialize)]
struct ReportView {
    image_bytes: Option<u64>,
    post_copy: Option<admin_api::PostCopyReport>,
}

/// A post-copy move's figures in a line (None for a cold move): the image set without the
/// memory, the pages relayed inside the agents' connection, resident after, or the failure.
fn post_copy_line(report_json: &str) -> Option<String> {
    let v: PostCopyView = serde_json::from_str(report_json).ok()?;
    if v.cross_host.memory != "post-copy" {
        return None;
    }
    let bytes = |x: Option<u64>| x.map_or_else(|| "-".to_owned(), |b| b.to_string());
    let mut line = format!(
        "post-copy: image set {} B, {} B of pages relayed over the agents' connection",
        bytes(v.report.image_bytes),
        bytes(v.cross_host.page_bytes_to_target),
    );
    let pc = v.report.post_copy.unwrap_or_default();
    match (pc.resident_after_ms, pc.error) {
        (_, Some(e)) => line.push_str(&format!(", PAGE TRANSFER FAILED: {e}")),
        (Some(ms), None) => line.push_str(&format!(", resident after {ms:.0} ms")),
        (None, None) => line.push_str(", not resident"),
    }
    Some(line)
}

pub(crate) fn drain(a: &DrainArgs) -> Result<()> {
    let reply = ask(
        &a.socket,
        &LocalRequest::Status { all: false },
        Duration::from_secs(10),
    )?;
    if let LocalReply::Status(hosts) = &reply
        && let Some(Ok(me)) = hosts.first()
        && me.host != a.host
    {
        bail!(
            "this host's agent is {}, not {}: run `control drain {}` on {}",
            me.host,
            a.host,
            a.host,
            a.host
        );
    }
    let reply = ask(
        &a.socket,
        &LocalRequest::Drain(Drain {
            targets: (!a.to.is_empty()).then(|| a.to.clone()),
            concurrency: a.concurrency,
            phases: a.phases,
        }),
        Duration::from_secs(3600),
    )?;
    let LocalReply::Drained(moves) = reply else {
        bail!("the agent answered {reply:?}");
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&moves)?);
    } else {
        print_moves(&moves);
    }
    let failed = moves
        .iter()
        .filter(|m| m.outcome != agent_protocol::Outcome::Completed)
        .count();
    if failed > 0 {
        bail!("{failed} of {} moves did not complete", moves.len());
    }
    Ok(())
}

fn print_moves(moves: &[MoveSummary]) {
    println!(
        "{:<12} {:<6} {:<6} {:<12} {:>9}  failed",
        "service", "from", "to", "outcome", "freeze"
    );
    for m in moves {
        println!(
            "{:<12} {:<6} {:<6} {:<12} {:>9}  {}",
            m.service.as_str(),
            m.from.as_str(),
            m.to.as_str(),
            m.outcome.to_string(),
            m.freeze_ms
                .map_or_else(|| "-".to_owned(), |f| format!("{f:.1} ms")),
            m.failed
                .as_ref()
                .map_or_else(String::new, |(p, h)| format!("{p} at {h}")),
        );
    }
}

pub(crate) fn status(a: &FleetStatusArgs) -> Result<()> {
    let reply = ask(
        &a.socket,
        &LocalRequest::Status { all: true },
        Duration::from_secs(30),
    )?;
    let LocalReply::Status(hosts) = reply else {
        bail!("the agent answered {reply:?}");
    };
    if a.json {
        let fleet = agent_protocol::FleetStatus {
            hosts: hosts
                .iter()
                .filter_map(|h| h.as_ref().ok().cloned())
                .collect(),
            unreachable: hosts
                .iter()
                .filter_map(|h| h.as_ref().err().cloned())
                .collect(),
        };
        println!("{}", serde_json::to_string_pretty(&fleet)?);
        return Ok(());
    }
    println!(
        "{:<6} {:<12} {:<22} {:>8} {:>8} {:>6}",
        "host", "service", "address", "pid", "clients", "moves"
    );
    for h in &hosts {
        match h {
            Err(e) => println!("{e}"),
            Ok(h) => {
                if h.services.is_empty() {
                    println!(
                        "{:<6} {:<12} (free slots: {})",
                        h.host.as_str(),
                        "-",
                        h.free_slots
                    );
                }
                for s in &h.services {
                    println!(
                        "{:<6} {:<12} {:<22} {:>8} {:>8} {:>6}",
                        h.host.as_str(),
                        s.name.as_str(),
                        s.address.to_string(),
                        s.pid,
                        s.clients.map_or_else(|| "-".to_owned(), |c| c.to_string()),
                        s.migrations
                    );
                }
            }
        }
    }
    let recent: Vec<MoveSummary> = hosts
        .iter()
        .filter_map(|h| h.as_ref().ok())
        .flat_map(|h: &HostStatus| h.recent.iter().cloned())
        .collect();
    if !recent.is_empty() {
        println!("\nlast migrations:");
        print_moves(&recent);
    }
    Ok(())
}

#[cfg(test)]
mod post_copy_tests {
    use super::post_copy_line;

    #[test]
    fn a_post_copy_moves_figures_are_printed_and_a_cold_moves_are_not() {
        let cold = r#"{"cross_host":{"memory":"cold"},"report":{"image_bytes":7}}"#;
        assert_eq!(post_copy_line(cold), None);
        assert_eq!(post_copy_line("not json"), None);
        let done = r#"{"cross_host":{"memory":"post-copy","page_bytes_to_target":67200000},
            "report":{"image_bytes":900000,"post_copy":{"transport":"agents-quic-stream",
            "resident_after_ms":412.4,"pages_transferred":null,"bytes_transferred":null,
            "error":null}}}"#;
        let line = post_copy_line(done).unwrap();
        assert!(line.contains("image set 900000 B"), "{line}");
        assert!(line.contains("67200000 B of pages"), "{line}");
        assert!(line.contains("resident after 412 ms"), "{line}");
        let failed = r#"{"cross_host":{"memory":"post-copy"},
            "report":{"image_bytes":null,"post_copy":{"transport":"agents-quic-stream",
            "resident_after_ms":null,"pages_transferred":null,"bytes_transferred":null,
            "error":"daemon exit 1"}}}"#;
        let line = post_copy_line(failed).unwrap();
        assert!(
            line.contains("PAGE TRANSFER FAILED: daemon exit 1"),
            "{line}"
        );
    }
}
