//! The command line's side: requests to the agent of this host over its unix socket, and the
//! agent's handling of them (start, stop, migrate, drain, status).

use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use agent_protocol::{
    Drain, HostStatus, LocalReply, LocalRequest, MAX_LOCAL_REPLY, MigrateService, MoveSummary,
    Name, Outcome, PeerBody, PeerReply, PeerRequest, StartService,
};
use anyhow::{Context, Result, anyhow, bail};
use migration_core::{MigrationId, MigrationPolicy};
use tracing::{info, warn};

use super::daemon::{Agent, lock};
use super::outbound::{self, MoveSpec};
use super::service::{self, Paths, Service};
use crate::slot::SlotSpec;

/// Sends `request` to the agent at `socket` and returns its answer (waits up to `limit`).
pub(crate) fn request(
    socket: &Path,
    request: &LocalRequest,
    limit: Duration,
) -> Result<LocalReply> {
    let mut stream = UnixStream::connect(socket).with_context(|| {
        format!(
            "connecting to the agent at {} (is `control agent` running on this host?)",
            socket.display()
        )
    })?;
    stream.set_read_timeout(Some(limit))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(&agent_protocol::to_frame(request)?)?;
    let mut len = [0u8; 4];
    stream
        .read_exact(&mut len)
        .context("reading the agent's answer")?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_LOCAL_REPLY {
        bail!("the agent's answer of {len} bytes is above the maximum of {MAX_LOCAL_REPLY}");
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body)?;
    Ok(agent_protocol::decode_local_reply(&body)?)
}

/// Handles one request of the command line.
pub(crate) async fn handle(agent: Arc<Agent>, request: LocalRequest) -> LocalReply {
    let result = match request {
        LocalRequest::Status { all } => Ok(status(&agent, all).await),
        LocalRequest::Start(s) => {
            let a = agent.clone();
            blocking(move || start(&a, &s).map(LocalReply::Started)).await
        }
        LocalRequest::Stop { service } => {
            let a = agent.clone();
            blocking(move || stop(&a, &service).map(|()| LocalReply::Stopped)).await
        }
        LocalRequest::Migrate(m) => {
            let a = agent.clone();
            blocking(move || migrate(&a, &m)).await
        }
        LocalRequest::Drain(d) => drain(agent.clone(), d).await.map(LocalReply::Drained),
        _ => Err(anyhow!("a request this agent does not know")),
    };
    result.unwrap_or_else(|e| LocalReply::Error(format!("{e:#}")))
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| anyhow!("the work panicked: {e}"))?
}

async fn status(agent: &Arc<Agent>, all: bool) -> LocalReply {
    let mut hosts: Vec<Result<HostStatus, String>> = vec![Ok(agent.host_status())];
    if all {
        for peer in agent.config.peers.keys() {
            hosts.push(
                peer_status(agent, peer)
                    .await
                    .map_err(|e| format!("{peer}: {e:#}")),
            );
        }
    }
    LocalReply::Status(hosts)
}

async fn peer_status(agent: &Arc<Agent>, peer: &Name) -> Result<HostStatus> {
    let request = PeerRequest {
        token: agent.token_for(crate::engine::random_id()?, peer)?,
        body: PeerBody::Status,
    };
    match agent.ask(peer, &request, Duration::from_secs(5)).await? {
        PeerReply::Status(s) => Ok(s),
        other => bail!("answered {other:?}"),
    }
}

fn start(agent: &Agent, s: &StartService) -> Result<agent_protocol::ServiceStatus> {
    if agent.is_draining() {
        bail!(
            "this host is being drained, or its agent is stopping: start {} elsewhere",
            s.name
        );
    }
    if s.pid_namespace && s.server_user.is_some() {
        bail!(
            "a server in its own pid namespace runs as root (criu dumps it only if it may \
             mount /proc): start it without a server account"
        );
    }
    let here = lock(&agent.services).contains_key(&s.name);
    if here || !agent.claim(&s.name) {
        bail!("a service {} is already here", s.name);
    }
    let started = (|| {
        if agent.free_slots() == 0 {
            bail!("no free slot (max_services {})", agent.config.max_services);
        }
        let port = agent.port_for(s.port)?;
        let made = (|| {
            let slot = service::create_slot(&SlotSpec {
                service: s.name.to_string(),
                host_addr: agent.host_v4()?,
                host_port: port,
                storage: agent.storage.clone(),
            })?;
            let paths = Paths::new(&agent.storage, &s.name);
            let mut server = agent.server.clone();
            server.user.clone_from(&s.server_user);
            server.extra.clone_from(&s.server_args);
            server.pid_namespace = s.pid_namespace;
            service::start(
                &s.name,
                paths.clone(),
                slot.clone(),
                agent.service_address(port),
                &server,
            )
            .and_then(|svc| {
                // Recorded before it counts as this host's: an agent started after this one
                // died takes it over.
                svc.save()?;
                Ok(svc)
            })
            .inspect_err(|_| {
                let _ = service::tear_down(&paths, &slot, None);
            })
        })();
        match made {
            Ok(svc) => {
                lock(&agent.services).insert(s.name.clone(), svc);
                agent.unreserve(port);
                Ok(())
            }
            Err(e) => {
                agent.unreserve(port);
                Err(e)
            }
        }
    })();
    agent.release(&s.name);
    started?;
    agent.count_services();
    lock(&agent.services)
        .get(&s.name)
        .map(Service::status)
        .ok_or_else(|| anyhow!("service {} vanished", s.name))
}

fn stop(agent: &Agent, name: &Name) -> Result<()> {
    if !agent.claim(name) {
        bail!("service {name} is moving; stop it afterwards");
    }
    let svc = lock(&agent.services).remove(name);
    let Some(svc) = svc else {
        agent.release(name);
        bail!("no service {name} on this host");
    };
    agent.count_services();
    // The name stays claimed until its folder and slot are gone: a new service of the same
    // name would use the same paths.
    let torn = service::tear_down(&svc.paths, &svc.slot, Some(svc.server_pid));
    agent.release(name);
    torn?;
    info!(service = %name, "stopped");
    Ok(())
}

fn policy() -> MigrationPolicy {
    MigrationPolicy {
        ack_deadline: Duration::from_secs(2),
        ..MigrationPolicy::default()
    }
}

fn migrate(agent: &Arc<Agent>, m: &MigrateService) -> Result<LocalReply> {
    if m.fault.is_some() && !agent.allow_faults {
        bail!("fault injection needs an agent started with --allow-faults");
    }
    let (summary, report) = outbound::run(
        agent,
        &MoveSpec {
            service: m.service.clone(),
            to: m.to.clone(),
            phases: m.phases,
            fault: m.fault,
            policy: policy(),
            plain_copy_after: m.plain_copy_after,
            memory: m.memory,
        },
    )?;
    Ok(LocalReply::Moved {
        summary,
        report_json: serde_json::to_string(&report)?,
    })
}

/// Moves every service of this host: `concurrency` moves at once, each to the given target
/// or to the allowed peer with the most free slots at the time it starts.
async fn drain(agent: Arc<Agent>, d: Drain) -> Result<Vec<MoveSummary>> {
    if d.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    use std::sync::atomic::Ordering;
    if agent.draining.swap(true, Ordering::SeqCst) {
        bail!("a drain of this host runs already");
    }
    // Over however the drain ends (an error, or its task dropped).
    struct Drained(Arc<Agent>);
    impl Drop for Drained {
        fn drop(&mut self) {
            self.0.draining.store(false, Ordering::SeqCst);
        }
    }
    let _drained = Drained(agent.clone());
    let names: Vec<Name> = lock(&agent.services).keys().cloned().collect();
    let targets: Vec<Name> = match &d.targets {
        Some(t) => t.clone(),
        None => agent.config.allow.clone(),
    };
    if targets.is_empty() {
        bail!("no host to drain to");
    }
    info!(
        services = names.len(),
        concurrency = d.concurrency,
        "draining this host"
    );
    let permits = Arc::new(tokio::sync::Semaphore::new(d.concurrency as usize));
    // Places chosen but not arrived yet, so that moves in flight count against a host.
    let pending: Arc<std::sync::Mutex<std::collections::HashMap<Name, u32>>> = Arc::default();
    let mut tasks = Vec::new();
    for name in names {
        let agent = agent.clone();
        let permits = permits.clone();
        let targets = targets.clone();
        let pending = pending.clone();
        let phases = d.phases;
        tasks.push(tokio::spawn(async move {
            let _permit = permits.acquire_owned().await.ok();
            let to = match choose(&agent, &targets, &pending).await {
                Ok(t) => t,
                Err(e) => {
                    warn!(service = %name, "no target: {e:#}");
                    return MoveSummary {
                        migration: MigrationId::from_bytes([0; 16]),
                        service: name,
                        from: agent.config.host.clone(),
                        to: agent.config.host.clone(),
                        outcome: Outcome::Failed,
                        failed: Some(("placing".into(), format!("{e:#}"))),
                        freeze_ms: None,
                        started_unix: super::daemon::now_unix(),
                    };
                }
            };
            let spec = MoveSpec {
                service: name.clone(),
                to: to.clone(),
                phases,
                fault: None,
                policy: policy(),
                plain_copy_after: false,
                // A drain moves cold: post-copy's failure loses a server, which a drain
                // of many services should not risk unasked.
                memory: agent_protocol::Memory::Cold,
            };
            let a = agent.clone();
            let moved = tokio::task::spawn_blocking(move || outbound::run(&a, &spec)).await;
            if let Some(n) = lock(&pending).get_mut(&to) {
                *n = n.saturating_sub(1);
            }
            match moved {
                Ok(Ok((summary, _))) => summary,
                Ok(Err(e)) => unreachable_summary(&agent, &name, &to, &format!("{e:#}")),
                Err(e) => unreachable_summary(&agent, &name, &to, &e.to_string()),
            }
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        match t.await {
            Ok(s) => out.push(s),
            Err(e) => warn!("a drain task failed: {e}"),
        }
    }
    Ok(out)
}

fn unreachable_summary(agent: &Agent, name: &Name, to: &Name, why: &str) -> MoveSummary {
    MoveSummary {
        migration: MigrationId::from_bytes([0; 16]),
        service: name.clone(),
        from: agent.config.host.clone(),
        to: to.clone(),
        outcome: Outcome::Failed,
        failed: Some(("starting".into(), why.to_owned())),
        freeze_ms: None,
        started_unix: super::daemon::now_unix(),
    }
}

/// The target with the most free slots (less the moves already on their way to it).
async fn choose(
    agent: &Arc<Agent>,
    targets: &[Name],
    pending: &std::sync::Mutex<std::collections::HashMap<Name, u32>>,
) -> Result<Name> {
    let mut best: Option<(i64, Name)> = None;
    for t in targets {
        match peer_status(agent, t).await {
            Ok(s) => {
                let inflight = lock(pending).get(t).copied().unwrap_or(0);
                let free = i64::from(s.free_slots) - i64::from(inflight);
                if free > 0 && best.as_ref().is_none_or(|(f, _)| free > *f) {
                    best = Some((free, t.clone()));
                }
            }
            Err(e) => warn!(host = %t, "status for placement: {e:#}"),
        }
    }
    let (_, to) = best.ok_or_else(|| anyhow!("no host has a free slot"))?;
    *lock(pending).entry(to.clone()).or_default() += 1;
    Ok(to)
}
