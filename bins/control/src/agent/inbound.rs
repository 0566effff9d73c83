//! The target's side of a cross-host move: what this agent does when another host's agent
//! (already admitted by the gate) asks.
//!
//! ```text
//!  Prepare  ──► slot (netns + host port), service folders, idle supervisor with a criu
//!               restore worker, key agreement          ──► Prepared { public key, address }
//!  Receive  ──► the rest of the stream: sealed image set ──► <storage>/inbound/<id>/set
//!                                                        ──► Received { bytes ... }
//!  Restore  ──► the server's log into place, criu restore by the supervisor, placement
//!               observed, images wiped                   ──► Restored { pid, timing }
//!  Resume   ──► resume request + SIGUSR2, the service is this host's ──► Resumed
//!               (then, off the move's path: the clients' downtime reports into the metrics)
//!  Abort    ──► kill what was restored, supervisor, slot, folders, images ──► Aborted
//! ```
//!
//! A post-copy move (`PreparePostCopy`) adds a page stream and waits for the memory:
//!
//! ```text
//!  Pages    ──► criu lazy-pages --page-server on the received image set, its --ps-socket a
//!               socket pair whose other end this agent relays (agent::page_relay) to the
//!               rest of the stream: the source's lazy dump ──► PagesReady, then raw bytes
//!  Restore  ──► criu restore --lazy-pages (the server runs, its memory arrives on faults and
//!               in the background)
//!  Resume   ──► as above, then the lazy-pages daemon's exit: 0 ──► ResumedResident; else the
//!               restored server is killed (its memory is incomplete) ──► Failed, loudly
//! ```

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use admin_api::AdminDir;
use agent_protocol::{
    Memory, Name, PeerBody, PeerReply, PeerRequest, Prepare, Refusal, ServiceSpec, TargetFault,
    TransferFigures,
};
use anyhow::{Context, Result, anyhow, bail};
use migration_core::MigrationId;
use migration_crypto::Key;
use tracing::{info, warn};

use super::daemon::{Agent, kind_of, lock, refuse};
use super::service::{self, Paths, Service};
use crate::slot::{Slot, SlotSpec};
use crate::supervisor::{self, SupervisorReply, SupervisorRequest};

/// Largest image set accepted.
const MAX_IMAGE_SET: u64 = 16 << 30;

/// A migration arriving here.
#[derive(Debug)]
pub(crate) struct Inbound {
    pub(crate) migration: MigrationId,
    pub(crate) source: Name,
    pub(crate) service: ServiceSpec,
    /// The agreed sealing key (None once the images were received by an earlier agent).
    pub(crate) key: Option<Key>,
    pub(crate) slot: Slot,
    pub(crate) paths: Paths,
    /// `<storage>/inbound/<id>`.
    pub(crate) dir: PathBuf,
    pub(crate) received: bool,
    pub(crate) restored_pid: Option<i32>,
    pub(crate) fault: Option<TargetFault>,
    /// The source's last request (a migration left alone too long is given up).
    pub(crate) touched: Instant,
    /// A step (receive, restore) runs: an abort waits for its end.
    pub(crate) step_running: bool,
    /// An abort came while a step ran: the migration is given up when the step ends.
    pub(crate) abandoned: bool,
    /// How the memory arrives (post-copy: over a [`PeerBody::Pages`] stream after the
    /// restore).
    pub(crate) memory: Memory,
    /// Post-copy: the lazy-pages daemon, from the Pages request until the resume waits for it.
    pub(crate) page_daemon: Option<std::process::Child>,
    /// Post-copy: when the restore ended (the start of "resident after").
    pub(crate) restored_at: Option<Instant>,
}

impl Inbound {
    /// Undoes everything of this migration here.
    pub(crate) fn give_up(mut self) -> String {
        let mut undone = Vec::new();
        if let Some(mut d) = self.page_daemon.take() {
            // Its socket closes: the source's dump sees its page server's peer gone.
            let _ = d.kill();
            let _ = d.wait();
            undone.push("stopped the lazy-pages daemon".to_owned());
        }
        if let Some(pid) = self.restored_pid {
            undone.push(format!("killed the restored server (PID {pid})"));
        }
        if let Err(e) = service::tear_down(&self.paths, &self.slot, self.restored_pid) {
            warn!(migration = %self.migration, "giving up: {e:#}");
        }
        undone.push("removed the slot and the service's folder".to_owned());
        if let Err(e) = service::wipe_dir(&self.dir) {
            warn!(migration = %self.migration, "wiping the received images: {e:#}");
        } else {
            undone.push("wiped the received images".to_owned());
        }
        undone.join(", ")
    }
}

fn failed(agent: &Agent, phase: &str, e: &anyhow::Error) -> PeerReply {
    PeerReply::Refused(Refusal::Failed {
        phase: phase.to_owned(),
        host: agent.config.host.to_string(),
        message: format!("{e:#}"),
    })
}

/// Answers an admitted request; `None` when the answer was already written.
pub(crate) async fn handle(
    agent: Arc<Agent>,
    peer: Name,
    request: PeerRequest,
    send: &mut quinn::SendStream,
    recv: quinn::RecvStream,
) -> Option<PeerReply> {
    let kind = kind_of(&request.body);
    let memory = match &request.body {
        PeerBody::PreparePostCopy(_) => Memory::PostCopy,
        _ => Memory::Cold,
    };
    // Checked before anything is prepared: a target that cannot run criu's lazy-pages daemon
    // says so at once (the source then moves nothing).
    let post_copy_refused = (memory == Memory::PostCopy)
        .then(|| {
            post_copy_refusal(
                &agent.config.host,
                std::path::Path::new(crate::postcopy::PIPE_MAX_SIZE),
            )
            .err()
        })
        .flatten();
    let reply = match request.body {
        PeerBody::Status => PeerReply::Status(agent.host_status()),
        // A benchmark's baseline: only between agents that run for tests and benchmarks.
        PeerBody::PlainCopy { .. } if !agent.allow_faults => refuse(
            &agent,
            &peer,
            kind,
            Refusal::Malformed("plain copies are for benchmark agents (--allow-faults)".into()),
        ),
        PeerBody::PlainCopy { migration } => match plain_copy(&agent, migration, recv).await {
            Ok(figures) => PeerReply::Received(figures),
            Err(e) => failed(&agent, "plain copy", &e),
        },
        PeerBody::PreparePostCopy(_) if post_copy_refused.is_some() => {
            let r = post_copy_refused.unwrap_or_else(|| Refusal::Malformed("post-copy".into()));
            refuse(&agent, &peer, kind, r)
        }
        PeerBody::Prepare(p) | PeerBody::PreparePostCopy(p) => {
            let a = agent.clone();
            let from = peer.clone();
            match tokio::task::spawn_blocking(move || prepare(&a, &from, p, memory)).await {
                Ok(Ok(reply)) => reply,
                Ok(Err(refusal)) => refuse(&agent, &peer, kind, refusal),
                Err(e) => failed(&agent, "preparing", &anyhow!("{e}")),
            }
        }
        PeerBody::Pages { migration } => {
            return pages(agent, peer, kind, migration, send, recv).await;
        }
        PeerBody::Receive { migration } => {
            match stepped_receive(&agent, &peer, migration, recv).await {
                Ok(figures) => PeerReply::Received(figures),
                Err(Rejected::Refused(r)) => refuse(&agent, &peer, kind, r),
                Err(Rejected::Failed(e)) => {
                    warn!(%peer, %migration, "receiving the image set failed: {e:#}");
                    failed(&agent, "transferring", &e)
                }
            }
        }
        PeerBody::Restore { migration } => {
            let a = agent.clone();
            let from = peer.clone();
            let stepped = move || {
                begin_step(&a, &from, migration)?;
                let restored = restore(&a, &from, migration);
                end_step(&a, migration);
                restored
            };
            match tokio::task::spawn_blocking(stepped).await {
                Ok(Ok(reply)) => reply,
                Ok(Err(Rejected::Refused(r))) => refuse(&agent, &peer, kind, r),
                Ok(Err(Rejected::Failed(e))) => {
                    warn!(%peer, %migration, "restore failed: {e:#}");
                    failed(&agent, "restoring", &e)
                }
                Err(e) => failed(&agent, "restoring", &anyhow!("{e}")),
            }
        }
        PeerBody::Resume { migration } => {
            let a = agent.clone();
            let from = peer.clone();
            // A step too: an abort or the stale sweep must not take a migration whose server
            // is being resumed (a resumed server is the service's only copy).
            let stepped = move || {
                begin_step(&a, &from, migration)?;
                let resumed = resume(&a, &from, migration);
                end_step(&a, migration);
                resumed
            };
            match tokio::task::spawn_blocking(stepped).await {
                Ok(Ok(reply)) => reply,
                Ok(Err(Rejected::Refused(r))) => refuse(&agent, &peer, kind, r),
                Ok(Err(Rejected::Failed(e))) => {
                    warn!(%peer, %migration, "resume failed: {e:#}");
                    failed(&agent, "resuming", &e)
                }
                Err(e) => failed(&agent, "resuming", &anyhow!("{e}")),
            }
        }
        PeerBody::Abort { migration } => {
            enum Taken {
                Unknown,
                /// A step runs: it gives the migration up when it ends.
                Later,
                Now(Box<Inbound>),
            }
            let taken = {
                let mut inbound = lock(&agent.inbound);
                match inbound.get_mut(&migration) {
                    Some(i) if i.source == peer && i.step_running => {
                        i.abandoned = true;
                        Taken::Later
                    }
                    Some(i) if i.source == peer => inbound
                        .remove(&migration)
                        .map_or(Taken::Unknown, |i| Taken::Now(Box::new(i))),
                    _ => Taken::Unknown,
                }
            };
            match taken {
                Taken::Unknown => refuse(
                    &agent,
                    &peer,
                    kind,
                    Refusal::UnknownMigration(migration.to_string()),
                ),
                Taken::Later => {
                    info!(%peer, %migration, "abort: given up when its running step ends");
                    PeerReply::Aborted {
                        undone: "a step was running: everything of the migration is undone \
                                 when it ends"
                            .to_owned(),
                    }
                }
                Taken::Now(i) => {
                    let a = agent.clone();
                    let undone = tokio::task::spawn_blocking(move || give_up(&a, *i))
                        .await
                        .unwrap_or_else(|e| format!("giving up panicked: {e}"));
                    info!(%peer, %migration, "inbound migration given up: {undone}");
                    PeerReply::Aborted { undone }
                }
            }
        }
        _ => refuse(
            &agent,
            &peer,
            kind,
            Refusal::Malformed("unknown request".into()),
        ),
    };
    Some(reply)
}

/// Gives `i` up (taken out of the agent's inbound migrations by the caller): undone here,
/// its service name free again, counted as rolled back.
fn give_up(agent: &Agent, i: Inbound) -> String {
    let name = i.service.name.clone();
    let undone = i.give_up();
    agent.release(&name);
    agent
        .metrics
        .record_migration(&target_outcome(crate::metrics::MigrationResult::RolledBack));
    undone
}

/// Gives up every inbound migration whose source has not asked anything for `stale` (and
/// whose step, if one runs, ended): its source's agent died and did not come back for it.
pub(crate) fn give_up_stale(agent: &Agent, stale: Duration) {
    let gone: Vec<Inbound> = {
        let mut inbound = lock(&agent.inbound);
        let ids: Vec<MigrationId> = inbound
            .values()
            .filter(|i| !i.step_running && i.touched.elapsed() > stale)
            .map(|i| i.migration)
            .collect();
        ids.iter().filter_map(|id| inbound.remove(id)).collect()
    };
    for i in gone {
        let (migration, source) = (i.migration, i.source.clone());
        let undone = give_up(agent, i);
        warn!(%migration, %source, "no request from the source for {stale:?}: given up ({undone})");
    }
}

/// Marks a step of `migration` as running (an abort then waits for its end).
fn begin_step(agent: &Agent, peer: &Name, migration: MigrationId) -> Result<(), Rejected> {
    with_inbound(agent, peer, migration, |i| {
        if i.step_running {
            return Err(Rejected::Refused(Refusal::Busy(
                "another step of this migration runs".into(),
            )));
        }
        i.step_running = true;
        Ok(())
    })?
}

/// Ends a step of [`begin_step`]; gives the migration up when an abort came meanwhile.
fn end_step(agent: &Agent, migration: MigrationId) {
    let abandoned = {
        let mut inbound = lock(&agent.inbound);
        match inbound.get_mut(&migration) {
            Some(i) => {
                i.step_running = false;
                i.touched = Instant::now();
                if i.abandoned {
                    inbound.remove(&migration)
                } else {
                    None
                }
            }
            None => None,
        }
    };
    if let Some(i) = abandoned {
        let undone = give_up(agent, i);
        info!(%migration, "inbound migration given up after its step: {undone}");
    }
}

/// A migration as the target counts it (the figures are the source's to record).
fn target_outcome(result: crate::metrics::MigrationResult) -> crate::metrics::MigrationOutcome {
    crate::metrics::MigrationOutcome {
        result,
        role: crate::metrics::Role::Target,
        freeze: None,
        transfer: None,
        bytes: crate::metrics::TransferBytes::default(),
        clients_acked: 0,
        clients_missing: 0,
        rollback_phase: None,
    }
}

/// Why a request of a known kind was not done.
enum Rejected {
    Refused(Refusal),
    Failed(anyhow::Error),
}

impl From<anyhow::Error> for Rejected {
    fn from(e: anyhow::Error) -> Rejected {
        Rejected::Failed(e)
    }
}

/// Why this host cannot be the target of a post-copy move (`pipe_max_size`: the sysctl's
/// file). Of `postcopy::refusal`'s checks, only `fs.pipe-max-size` applies here: the pid
/// namespace is the source's server's, checked by the source.
pub(crate) fn post_copy_refusal(
    host: &Name,
    pipe_max_size: &std::path::Path,
) -> Result<(), Refusal> {
    crate::postcopy::check_pipe_max_size(pipe_max_size)
        .map(|_| ())
        .map_err(|e| Refusal::PostCopy {
            host: host.to_string(),
            reason: e.to_string(),
        })
}

fn prepare(agent: &Agent, peer: &Name, p: Prepare, memory: Memory) -> Result<PeerReply, Refusal> {
    let name = p.service.name.clone();
    if p.fault.is_some() && !agent.allow_faults {
        return Err(Refusal::Malformed(
            "fault injection asked of an agent that does not allow it".into(),
        ));
    }
    if agent.is_draining() {
        return Err(Refusal::Busy(format!(
            "host {} is being drained, or its agent is stopping",
            agent.config.host
        )));
    }
    let here = lock(&agent.services).contains_key(&name);
    if here || !agent.claim(&name) {
        return Err(Refusal::Busy(format!("a service {name} is already here")));
    }
    let prepared = lock(&agent.inbound).contains_key(&p.migration);
    if prepared {
        agent.release(&name);
        return Err(Refusal::Busy(format!(
            "migration {} is already prepared",
            p.migration
        )));
    }
    match prepare_inner(agent, peer, &p, memory) {
        Ok((inbound, reply)) => {
            let port = inbound.slot.host_port;
            lock(&agent.inbound).insert(p.migration, inbound);
            agent.unreserve(port);
            info!(%peer, migration = %p.migration, service = %name, "inbound migration prepared");
            Ok(reply)
        }
        Err(e) => {
            agent.release(&name);
            warn!(%peer, migration = %p.migration, "preparing failed: {e:#}");
            Err(Refusal::Failed {
                phase: "preparing".into(),
                host: agent.config.host.to_string(),
                message: format!("{e:#}"),
            })
        }
    }
}

fn prepare_inner(
    agent: &Agent,
    peer: &Name,
    p: &Prepare,
    memory: Memory,
) -> Result<(Inbound, PeerReply)> {
    if agent.free_slots() == 0 {
        bail!("no free slot (max_services {})", agent.config.max_services);
    }
    // The image set arrives into this host's storage.
    crate::secure::private_dir(&agent.storage.join("inbound"))?;
    crate::sys::check_room(
        &agent.storage.join("inbound"),
        p.image_estimate,
        "the image set",
    )?;
    let port = agent.free_port()?;
    let prepared = prepare_with_port(agent, peer, p, port, memory);
    if prepared.is_err() {
        agent.unreserve(port);
    }
    prepared
}

fn prepare_with_port(
    agent: &Agent,
    peer: &Name,
    p: &Prepare,
    port: u16,
    memory: Memory,
) -> Result<(Inbound, PeerReply)> {
    let agreement = migration_crypto::KeyAgreement::generate()?;
    let public = agreement.public_key();
    let key = agreement
        .agree(
            &p.seal_public,
            &seal_context(p.migration, peer, &agent.config.host),
        )
        .map_err(|e| anyhow!("key agreement: {e}"))?;
    let slot = service::create_slot(&SlotSpec {
        service: p.service.name.to_string(),
        host_addr: agent.host_v4()?,
        host_port: port,
        storage: agent.storage.clone(),
    })?;
    let paths = Paths::new(&agent.storage, &p.service.name);
    let dir = agent.storage.join("inbound").join(p.migration.to_string());
    let made = (|| -> Result<i32> {
        crate::secure::private_dir(&agent.storage.join("inbound"))?;
        crate::secure::private_dir(&dir)?;
        service::make_folders(&paths, p.service.server_user.as_deref())?;
        let supervisor_pid = service::start_supervisor(&paths, &slot, None)?;
        // A restore worker waits in the slot's namespace: criu's start-up is not in the freeze.
        // Post-copy's lazy restore is a criu of its own (postcopy::restore): no worker.
        if memory == Memory::PostCopy {
            return Ok(supervisor_pid);
        }
        match supervisor::ask(
            &paths.socket,
            &SupervisorRequest::PrepareRestore {
                netns: slot.netns.clone(),
            },
            Duration::from_secs(5),
        ) {
            Ok(SupervisorReply::Prepared { pid }) => info!(pid, "criu restore worker waits"),
            Ok(other) => warn!("no criu restore worker: {other:?}"),
            Err(e) => warn!("no criu restore worker: {e:#}"),
        }
        Ok(supervisor_pid)
    })();
    let supervisor_pid = match made {
        Ok(pid) => pid,
        Err(e) => {
            let _ = service::tear_down(&paths, &slot, None);
            let _ = service::wipe_dir(&dir);
            return Err(e);
        }
    };
    let address = agent.service_address(port);
    let journal = Journal {
        migration: p.migration,
        source: peer.clone(),
        service: p.service.clone(),
        slot_name: slot.name.clone(),
        server_pid: p.server_pid,
        supervisor_pid,
        memory,
    };
    if let Err(e) = journal.write(&dir) {
        let _ = service::tear_down(&paths, &slot, None);
        let _ = service::wipe_dir(&dir);
        return Err(e);
    }
    let inbound = Inbound {
        migration: p.migration,
        source: peer.clone(),
        service: p.service.clone(),
        key: Some(key),
        slot,
        paths,
        dir,
        received: false,
        restored_pid: None,
        fault: p.fault,
        touched: Instant::now(),
        step_running: false,
        abandoned: false,
        memory,
        page_daemon: None,
        restored_at: None,
    };
    Ok((
        inbound,
        PeerReply::Prepared {
            seal_public: public,
            address,
        },
    ))
}

/// What a target agent writes of an inbound migration (`<storage>/inbound/<id>/journal.json`),
/// so that an agent started after it died can answer for a server restored meanwhile.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct Journal {
    pub(crate) migration: MigrationId,
    pub(crate) source: Name,
    pub(crate) service: ServiceSpec,
    pub(crate) slot_name: String,
    /// The PID the restored server will have (its PID at the source).
    pub(crate) server_pid: i32,
    /// The idle supervisor that restores it (its parent once restored).
    pub(crate) supervisor_pid: i32,
    /// Post-copy: a server restored here is not adoptable by a later agent (its memory came
    /// through this agent's relay, which died with it). Absent in older journals: cold.
    #[serde(default)]
    pub(crate) memory: Memory,
}

impl Journal {
    fn write(&self, dir: &std::path::Path) -> Result<()> {
        crate::secure::write_private(&dir.join("journal.json"), &serde_json::to_vec(self)?)
    }
}

/// The journals of inbound migrations whose server runs here, restored and parked, under
/// the supervisor that restored it.
pub(crate) fn adoptable(storage: &std::path::Path) -> Vec<Journal> {
    let Ok(entries) = std::fs::read_dir(storage.join("inbound")) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let bytes = std::fs::read(e.path().join("journal.json")).ok()?;
            let j: Journal = serde_json::from_slice(&bytes).ok()?;
            // A supervisor still restoring answers once its restore is over: wait for it, so
            // that a restore in progress is neither taken for nothing nor cut short.
            if crate::sys::process_runs(j.supervisor_pid, "control") {
                let socket = Paths::new(storage, &j.service.name).socket;
                let _ = supervisor::ask(
                    &socket,
                    &SupervisorRequest::Ping,
                    Duration::from_secs(2 * crate::criu::WORKER_LIMIT.as_secs() + 30),
                );
            }
            let ours = crate::sys::parent_pid(j.server_pid) == Some(j.supervisor_pid);
            // A post-copy server restored before the agent died may miss pages for good (the
            // relay that brought them died with the agent): killed like a half-restored one.
            if ours
                && j.memory == Memory::Cold
                && crate::sys::process_runs(j.server_pid, "swrapper")
            {
                return Some(j);
            }
            if ours {
                // Half restored (criu died with the agent): it holds the PID the source
                // needs to restore its own copy.
                warn!(
                    pid = j.server_pid,
                    "killing a half-restored server an earlier agent left"
                );
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(j.server_pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            None
        })
        .collect()
}

/// Takes an adoptable migration over: its source may ask for the restore (answered with the
/// running server) and the resume.
pub(crate) fn adopt(agent: &Agent, j: Journal) -> Result<MigrationId> {
    let slot = crate::slot::Slot::list(&agent.storage)?
        .into_iter()
        .find(|s| s.name == j.slot_name)
        .with_context(|| format!("the slot {} is gone", j.slot_name))?;
    let name = j.service.name.clone();
    if !agent.claim(&name) {
        bail!("service {name} is busy");
    }
    lock(&agent.inbound).insert(
        j.migration,
        Inbound {
            migration: j.migration,
            source: j.source,
            paths: Paths::new(&agent.storage, &name),
            dir: agent.storage.join("inbound").join(j.migration.to_string()),
            service: j.service,
            key: None,
            slot,
            received: true,
            restored_pid: Some(j.server_pid),
            fault: None,
            touched: Instant::now(),
            step_running: false,
            abandoned: false,
            memory: Memory::Cold,
            page_daemon: None,
            restored_at: None,
        },
    );
    Ok(j.migration)
}

/// What both agents bind into the migration's sealing key.
pub(crate) fn seal_context(migration: MigrationId, source: &Name, target: &Name) -> Vec<u8> {
    format!("quic-live-migrate image set v1|{migration}|{source}|{target}").into_bytes()
}

/// The inbound migration `migration` of `peer`, for a step.
fn with_inbound<R>(
    agent: &Agent,
    peer: &Name,
    migration: MigrationId,
    f: impl FnOnce(&mut Inbound) -> R,
) -> Result<R, Rejected> {
    let mut inbound = lock(&agent.inbound);
    match inbound.get_mut(&migration) {
        Some(i) if &i.source == peer => {
            i.touched = Instant::now();
            Ok(f(i))
        }
        _ => Err(Rejected::Refused(Refusal::UnknownMigration(
            migration.to_string(),
        ))),
    }
}

/// [`receive`] as a step: an abort meanwhile takes effect when it ends.
async fn stepped_receive(
    agent: &Arc<Agent>,
    peer: &Name,
    migration: MigrationId,
    recv: quinn::RecvStream,
) -> Result<TransferFigures, Rejected> {
    begin_step(agent, peer, migration)?;
    let received = receive(agent, peer, migration, recv).await;
    let a = agent.clone();
    let _ = tokio::task::spawn_blocking(move || end_step(&a, migration)).await;
    received
}

async fn receive(
    agent: &Agent,
    peer: &Name,
    migration: MigrationId,
    recv: quinn::RecvStream,
) -> Result<TransferFigures, Rejected> {
    let (key, dest, already) = with_inbound(agent, peer, migration, |i| {
        (i.key.clone(), i.dir.join("set"), i.received)
    })?;
    let Some(key) = key else {
        return Err(Rejected::Refused(Refusal::Busy(
            "this agent restarted after the images arrived".into(),
        )));
    };
    if already {
        return Err(Rejected::Refused(Refusal::Busy(
            "the image set was already received".into(),
        )));
    }
    let started = Instant::now();
    let cfg = crate::image_stream::StreamConfig {
        max_total_bytes: MAX_IMAGE_SET,
        ..Default::default()
    };
    let stats = crate::image_stream::receive_image_set(recv, &key, &dest, &cfg)
        .await
        .map_err(|e| Rejected::Failed(anyhow!(e)))?;
    with_inbound(agent, peer, migration, |i| i.received = true)?;
    info!(
        %peer, %migration,
        bytes = stats.raw_bytes,
        ms = format_args!("{:.1}", started.elapsed().as_secs_f64() * 1e3),
        "image set received and verified"
    );
    Ok(TransferFigures {
        raw_bytes: stats.raw_bytes,
        compressed_bytes: stats.compressed_bytes,
        sealed_bytes: stats.wire_bytes,
        files: stats.files,
        ms: started.elapsed().as_secs_f64() * 1e3,
    })
}

/// [`PeerBody::PlainCopy`]: the bytes into scratch storage, timed, wiped.
async fn plain_copy(
    agent: &Agent,
    migration: MigrationId,
    recv: quinn::RecvStream,
) -> Result<TransferFigures> {
    let scratch = agent.storage.join("bench");
    crate::secure::private_dir(&scratch)?;
    let dest = scratch.join(migration.to_string());
    let started = Instant::now();
    let got = crate::image_stream::measure::plain_receive(recv, &dest, MAX_IMAGE_SET).await;
    let ms = started.elapsed().as_secs_f64() * 1e3;
    if let Err(e) = service::wipe_dir(&dest) {
        warn!("wiping the plain copy: {e:#}");
    }
    let stats = got.map_err(|e| anyhow!(e))?;
    Ok(TransferFigures {
        raw_bytes: stats.raw_bytes,
        compressed_bytes: stats.raw_bytes,
        sealed_bytes: stats.wire_bytes,
        files: stats.files,
        ms,
    })
}

/// [`PeerBody::Pages`]: starts the lazy-pages daemon, answers `PagesReady`, then relays the
/// rest of the stream to and from the daemon until both ends are done. `None`: answered.
///
/// Not a step: the relay lasts until every page arrived, while the restore and the resume
/// run. An abort meanwhile kills the daemon, which ends the relay.
async fn pages(
    agent: Arc<Agent>,
    peer: Name,
    kind: &'static str,
    migration: MigrationId,
    send: &mut quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> Option<PeerReply> {
    let a = agent.clone();
    let from = peer.clone();
    let started = tokio::task::spawn_blocking(move || start_pages(&a, &from, migration)).await;
    let (local, daemon_pid) = match started {
        Ok(Ok(x)) => x,
        Ok(Err(Rejected::Refused(r))) => return Some(refuse(&agent, &peer, kind, r)),
        Ok(Err(Rejected::Failed(e))) => {
            warn!(%peer, %migration, "starting the lazy-pages daemon failed: {e:#}");
            return Some(failed(&agent, "pages", &e));
        }
        Err(e) => return Some(failed(&agent, "pages", &anyhow!("{e}"))),
    };
    let mut local = match local
        .set_nonblocking(true)
        .and_then(|()| tokio::net::UnixStream::from_std(local))
    {
        Ok(l) => l,
        Err(e) => return Some(failed(&agent, "pages", &anyhow!("the page socket: {e}"))),
    };
    if let Err(e) = super::daemon::write_frame(send, &PeerReply::PagesReady).await {
        // The daemon sees its socket close and fails; the resume reports it.
        warn!(%peer, %migration, "answering the page stream: {e:#}");
        return None;
    }
    info!(%peer, %migration, "post-copy: the lazy-pages daemon waits; relaying its pages");
    let ended_well = daemon_ended_well(daemon_pid);
    match super::page_relay::relay_gated(&mut local, send, &mut recv, ended_well).await {
        Ok(f) => info!(
            %peer, %migration,
            from_source = f.from_peer,
            to_source = f.to_peer,
            "post-copy page stream ended"
        ),
        // The daemon's memory source is gone: the resume finds it failed and kills the
        // restored server; before the restore, the source's rollback aborts this migration.
        Err(e) => tracing::error!(%peer, %migration, "POST-COPY PAGE RELAY FAILED: {e}"),
    }
    None
}

/// Why a Pages request for a migration found here is refused: only a migration prepared for
/// post-copy (`PreparePostCopy`), whose image set arrived (the daemon reads it), gets one page
/// stream.
fn pages_refusal(
    host: &Name,
    migration: MigrationId,
    memory: Memory,
    received: bool,
    has_daemon: bool,
) -> Option<Refusal> {
    if memory != Memory::PostCopy {
        return Some(Refusal::PostCopy {
            host: host.to_string(),
            reason: format!("migration {migration} was prepared for a cold move"),
        });
    }
    if !received {
        return Some(Refusal::Busy(
            "no image set was received for this migration".into(),
        ));
    }
    if has_daemon {
        return Some(Refusal::Busy(
            "this migration has its page stream already".into(),
        ));
    }
    None
}

/// The blocking part of [`pages`]: checks the migration, starts the daemon on the received
/// image set, keeps it in the migration; returns this agent's end of the daemon's socket.
fn start_pages(
    agent: &Agent,
    peer: &Name,
    migration: MigrationId,
) -> Result<(std::os::unix::net::UnixStream, i32), Rejected> {
    let (memory, received, has_daemon, dir) = with_inbound(agent, peer, migration, |i| {
        (
            i.memory,
            i.received,
            i.page_daemon.is_some(),
            i.dir.join("set").join("criu"),
        )
    })?;
    if let Some(r) = pages_refusal(&agent.config.host, migration, memory, received, has_daemon) {
        return Err(Rejected::Refused(r));
    }
    let (ours, daemons) =
        std::os::unix::net::UnixStream::pair().context("creating the page socket pair")?;
    let started = (agent.lazy_pages)(&dir, daemons)?;
    let pid = i32::try_from(started.id()).context("the daemon's PID")?;
    let mut daemon = Some(started);
    {
        let mut inbound = lock(&agent.inbound);
        match inbound.get_mut(&migration) {
            Some(i) if &i.source == peer && i.page_daemon.is_none() => {
                i.page_daemon = daemon.take();
            }
            _ => {}
        }
    }
    if let Some(mut daemon) = daemon {
        // Aborted (or given a stream) meanwhile.
        let _ = daemon.kill();
        let _ = daemon.wait();
        return Err(Rejected::Refused(Refusal::UnknownMigration(
            migration.to_string(),
        )));
    }
    Ok((ours, pid))
}

/// How long the lazy-pages daemon may take to exit once its page socket closed.
const DAEMON_END_LIMIT: Duration = Duration::from_secs(5);

/// The lazy-pages daemons' ends as the resume judged them when it reaped them (by PID; read
/// once by [`daemon_ended_well`]): the relay and the resume race to see the daemon's exit,
/// and a daemon the resume reaped first must not read as a good end when it failed.
static DAEMON_ENDS: std::sync::Mutex<Vec<(i32, bool)>> = std::sync::Mutex::new(Vec::new());

/// Records how the daemon `pid` ended, once the resume reaped it.
fn record_daemon_end(pid: i32, well: bool) {
    let mut ends = lock(&DAEMON_ENDS);
    ends.retain(|(p, _)| *p != pid);
    ends.push((pid, well));
}

/// How the resume judged the daemon `pid`, if it did (the record is taken).
fn take_daemon_end(pid: i32) -> Option<bool> {
    let mut ends = lock(&DAEMON_ENDS);
    let at = ends.iter().position(|(p, _)| *p == pid)?;
    Some(ends.swap_remove(at).1)
}

/// Whether the lazy-pages daemon `pid` ended well, asked when its page socket reads EOF (the
/// relay passes the end on to the source only then, see `page_relay::relay_gated`): its exit
/// status, read without reaping it (`WNOWAIT`). Reaped already by the resume: what the resume
/// recorded ([`record_daemon_end`]), waited for up to [`DAEMON_END_LIMIT`]; nothing recorded
/// by then (killed by an abort the source asked for after stopping its dump, or not ours):
/// not a good end, the stream is reset. Still running after the limit: passed on.
async fn daemon_ended_well(pid: i32) -> bool {
    use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};
    tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + DAEMON_END_LIMIT;
        let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
        loop {
            match waitid(Id::Pid(nix::unistd::Pid::from_raw(pid)), flags) {
                Ok(WaitStatus::Exited(_, code)) => return code == 0,
                Ok(WaitStatus::Signaled(..)) => return false,
                Ok(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Ok(_) => return true,
                // Reaped already: the resume says how it ended.
                Err(_) => loop {
                    if let Some(well) = take_daemon_end(pid) {
                        return well;
                    }
                    if Instant::now() >= deadline {
                        return false;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                },
            }
        }
    })
    .await
    .unwrap_or(false)
}

/// Exits this agent at once, as if killed (the scenario's "target agent killed" cases).
fn die(why: &str) -> ! {
    warn!("FAULT INJECTION: the agent dies {why}");
    let _ = nix::sys::signal::kill(nix::unistd::getpid(), nix::sys::signal::Signal::SIGKILL);
    std::process::abort()
}

fn restore(agent: &Agent, peer: &Name, migration: MigrationId) -> Result<PeerReply, Rejected> {
    let (received, dir, paths, slot, fault, name, memory, paging) =
        with_inbound(agent, peer, migration, |i| {
            (
                i.received,
                i.dir.join("set"),
                i.paths.clone(),
                i.slot.clone(),
                i.fault,
                i.service.name.clone(),
                i.memory,
                i.page_daemon.is_some(),
            )
        })?;
    if let Some(pid) = with_inbound(agent, peer, migration, |i| i.restored_pid)? {
        // Restored before (by this agent's predecessor, which died before answering).
        info!(%peer, %migration, pid, "already restored: answering again");
        return Ok(PeerReply::Restored {
            pid,
            restore: admin_api::CriuTiming::default(),
            placement_checked: true,
        });
    }
    if !received {
        return Err(Rejected::Refused(Refusal::Busy(
            "no image set was received for this migration".into(),
        )));
    }
    if memory == Memory::PostCopy && !paging {
        return Err(Rejected::Refused(Refusal::Busy(
            "post-copy: no page stream yet (the lazy restore needs the lazy-pages daemon)".into(),
        )));
    }
    if fault == Some(TargetFault::DieBeforeRestore) {
        die("before the restore");
    }
    // The server's log, as it was at the dump: criu reopens it by path and checks its size.
    let log = dir.join("files").join("server.log");
    std::fs::copy(&log, &paths.log)
        .with_context(|| format!("putting the server's log in place from {}", log.display()))?;
    let criu_dir = dir.join("criu");
    let hidden = if fault == Some(TargetFault::RestoreFails) {
        warn!("FAULT INJECTION: the restore will fail (pstree.img hidden)");
        std::fs::rename(
            criu_dir.join("pstree.img"),
            criu_dir.join("pstree.img.hidden"),
        )
        .context("hiding pstree.img")?;
        true
    } else {
        false
    };
    if fault == Some(TargetFault::DieDuringRestore) {
        std::thread::spawn(|| {
            std::thread::sleep(Duration::from_millis(2));
            die("during the restore");
        });
    }
    let restored = match memory {
        Memory::Cold => crate::engine::restore_via_supervisor(
            &paths.socket,
            &slot.netns,
            &criu_dir,
            "restore.log",
        ),
        Memory::PostCopy => crate::engine::restore_lazy_via_supervisor(
            &paths.socket,
            &slot.netns,
            &criu_dir,
            "restore.log",
        ),
    };
    if hidden {
        let _ = std::fs::rename(
            criu_dir.join("pstree.img.hidden"),
            criu_dir.join("pstree.img"),
        );
    }
    let (pid, timing) = restored.context("criu restore at the target")?;
    with_inbound(agent, peer, migration, |i| {
        i.restored_pid = Some(pid);
        i.restored_at = Some(Instant::now());
    })?;
    let placement = crate::engine::observe_placement(pid, &service::container_of(&name, &slot))?;
    if !placement.is_right() {
        return Err(Rejected::Failed(anyhow!(
            "the restored server (PID {pid}) is not in the slot's network namespace"
        )));
    }
    // The images hold the process's memory and keys; the process runs now. Post-copy: the
    // lazy-pages daemon works in them until every page arrived (the resume wipes them).
    if memory == Memory::Cold
        && let Err(e) = service::wipe_dir(&dir)
    {
        warn!("wiping the received images: {e:#}");
    }
    info!(%peer, %migration, pid, "restored");
    Ok(PeerReply::Restored {
        pid,
        restore: timing,
        placement_checked: true,
    })
}

fn resume(agent: &Agent, peer: &Name, migration: MigrationId) -> Result<PeerReply, Rejected> {
    let (pid, paths) = with_inbound(agent, peer, migration, |i| {
        (i.restored_pid, i.paths.clone())
    })?;
    let Some(pid) = pid else {
        return Err(Rejected::Refused(Refusal::Busy(
            "nothing was restored".into(),
        )));
    };
    let admin = AdminDir::open(&paths.admin).context("opening the service's admin folder")?;
    let resumed = crate::engine::ask_resume(&admin, pid, migration)?;
    let clients = u32::try_from(resumed.told).unwrap_or(u32::MAX);
    let resident = wait_resident(agent, peer, migration, pid)?;
    let service = with_inbound(agent, peer, migration, |i| Service {
        name: i.service.name.clone(),
        address: agent.service_address(i.slot.host_port),
        paths: i.paths.clone(),
        slot: i.slot.clone(),
        server_pid: pid,
        migrations: i.service.moves.saturating_add(1),
        server_user: i.service.server_user.clone(),
        clients: Some(clients),
    })?;
    let name = service.name.clone();
    let journal_dir = agent.storage.join("inbound").join(migration.to_string());
    // Recorded before the journal goes: an agent started after this one died takes it over.
    if let Err(e) = service.save() {
        warn!(service = %name, "recording the service: {e:#}");
    }
    // The service is this host's before the migration stops being one in flight: a status
    // asked in between lists it, never neither.
    lock(&agent.services).insert(name.clone(), service);
    lock(&agent.inbound).remove(&migration);
    agent.release(&name);
    // The migration is over here: its journal must not make a later agent adopt the server.
    if let Err(e) = service::wipe_dir(&journal_dir) {
        warn!("removing the inbound journal: {e:#}");
    }
    agent.count_services();
    agent
        .metrics
        .record_migration(&target_outcome(crate::metrics::MigrationResult::Completed));
    // The server runs here now: its clients' downtime reports come to this host.
    super::daemon::record_downtimes_later(agent.metrics.clone(), admin, migration, resumed.told);
    info!(%peer, %migration, service = %name, pid, "resumed: the service runs here");
    Ok(match resident {
        None => PeerReply::Resumed {
            clients,
            handshakes: resumed.handshakes,
        },
        Some(r) => PeerReply::ResumedResident {
            clients,
            handshakes: resumed.handshakes,
            resident_after_ms: r.resident_after_ms.unwrap_or_default(),
            pages: r.pages_transferred,
        },
    })
}

/// Post-copy: waits until the lazy-pages daemon exited (every page resident) and wipes the
/// images; `None` for a cold move. A daemon that failed leaves the restored server `pid`
/// with incomplete memory (a missing page would read as zeros): it is killed and the resume
/// fails, loudly; the source's rollback then aborts the migration here.
fn wait_resident(
    agent: &Agent,
    peer: &Name,
    migration: MigrationId,
    pid: i32,
) -> Result<Option<admin_api::PostCopyReport>, Rejected> {
    let (memory, daemon, restored_at, dir) = with_inbound(agent, peer, migration, |i| {
        (
            i.memory,
            i.page_daemon.take(),
            i.restored_at,
            i.dir.join("set"),
        )
    })?;
    if memory == Memory::Cold {
        return Ok(None);
    }
    let daemon = daemon.context("post-copy: the lazy-pages daemon is gone")?;
    let daemon_pid = i32::try_from(daemon.id()).unwrap_or(0);
    let report = crate::postcopy::PageFlow::target_half(daemon, &dir.join("criu"))
        .wait_resident(restored_at.unwrap_or_else(Instant::now));
    // The relay may be asking how the daemon ended, which it can no longer read itself.
    record_daemon_end(daemon_pid, report.error.is_none());
    if let Some(error) = &report.error {
        tracing::error!(
            %peer, %migration,
            "POST-COPY PAGE TRANSFER FAILED after the restore: the restored server's memory is \
             incomplete; killing it (PID {pid}). {error}"
        );
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        return Err(Rejected::Failed(anyhow!(
            "post-copy page transfer failed after the restore; the restored server (PID {pid}) \
             was killed, its memory being incomplete: {error}"
        )));
    }
    if let Err(e) = service::wipe_dir(&dir) {
        warn!("wiping the received images: {e:#}");
    }
    info!(
        %peer, %migration,
        resident_after_ms = report.resident_after_ms,
        pages = report.pages_transferred,
        "post-copy: every page is resident"
    );
    Ok(Some(report))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A target whose fs.pipe-max-size is too low (or unreadable) refuses a post-copy move
    /// with a typed refusal that names the host and the fix; one with enough passes.
    #[test]
    fn a_target_without_room_in_its_pipes_refuses_post_copy() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pipe-max-size");
        let host = Name::new("b").unwrap();
        std::fs::write(&f, "1048576\n").unwrap();
        let r = post_copy_refusal(&host, &f).unwrap_err();
        let Refusal::PostCopy { host: h, reason } = &r else {
            panic!("{r:?}")
        };
        assert_eq!(h, "b");
        assert!(reason.contains("fs.pipe-max-size"), "{reason}");
        assert!(r.to_string().contains("post-copy refused at b"), "{r}");
        assert!(matches!(
            post_copy_refusal(&host, &dir.path().join("none")),
            Err(Refusal::PostCopy { .. })
        ));
        std::fs::write(&f, "4194304\n").unwrap();
        assert_eq!(post_copy_refusal(&host, &f), Ok(()));
    }

    /// A page stream is accepted only for a migration prepared for post-copy, once its image
    /// set arrived, and only once.
    #[test]
    fn a_page_stream_needs_a_post_copy_migration_with_its_images_and_no_stream_yet() {
        let host = Name::new("b").unwrap();
        let m = MigrationId::from_bytes([3; 16]);
        let cold = pages_refusal(&host, m, Memory::Cold, true, false);
        assert!(
            matches!(&cold, Some(Refusal::PostCopy { reason, .. }) if reason.contains("cold")),
            "{cold:?}"
        );
        assert!(matches!(
            pages_refusal(&host, m, Memory::PostCopy, false, false),
            Some(Refusal::Busy(_))
        ));
        assert!(matches!(
            pages_refusal(&host, m, Memory::PostCopy, true, true),
            Some(Refusal::Busy(_))
        ));
        assert_eq!(pages_refusal(&host, m, Memory::PostCopy, true, false), None);
    }

    /// The daemon's end is judged by its exit status, without reaping it (the resume does):
    /// 0 is a good end, anything else or a signal is not, an unknown child is passed on.
    #[test]
    fn a_daemons_end_is_judged_by_its_exit_status_and_left_to_be_reaped() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        for (script, well) in [("exit 0", true), ("exit 3", false), ("kill -9 $$", false)] {
            let mut child = std::process::Command::new("sh")
                .args(["-c", script])
                .spawn()
                .unwrap();
            let pid = i32::try_from(child.id()).unwrap();
            assert_eq!(rt.block_on(daemon_ended_well(pid)), well, "{script}");
            // Still there to be reaped, with the same status.
            assert_eq!(child.wait().unwrap().success(), well, "{script}");
        }
        // Reaped already (or not ours) and nothing recorded: not a good end.
        assert!(!rt.block_on(daemon_ended_well(i32::MAX - 7)));
        // Reaped by the resume, which recorded how it ended: that decides, both ways.
        for well in [true, false] {
            let mut child = std::process::Command::new("sh")
                .args(["-c", if well { "exit 0" } else { "exit 3" }])
                .spawn()
                .unwrap();
            let pid = i32::try_from(child.id()).unwrap();
            assert_eq!(child.wait().unwrap().success(), well);
            record_daemon_end(pid, well);
            assert_eq!(rt.block_on(daemon_ended_well(pid)), well);
            assert_eq!(take_daemon_end(pid), None, "the record is taken once");
        }
    }

    /// Over two in-process agents' real mutual-TLS connection: a page stream passes the gate
    /// with its migration's token and is refused with a frame (no raw bytes, no criu) unless
    /// the migration was prepared for post-copy here and its images arrived; a token of
    /// another migration is refused by the gate.
    #[test]
    fn a_page_stream_between_two_agents_is_refused_unless_prepared_for_post_copy() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let fleet = crate::agent::tls::tests::fleet(
            &dir.path().join("fleet"),
            &[("a", "127.0.0.1"), ("b", "127.0.0.1")],
        );
        let (a_name, b_name) = (Name::new("a").unwrap(), Name::new("b").unwrap());
        rt.block_on(async {
            let (b, b_addr) = crate::agent::daemon::test_agent(
                fleet[1].clone(),
                &dir.path().join("b"),
                crate::postcopy::start_daemon,
            );
            tokio::spawn(crate::agent::daemon::accept_peers(b.clone()));
            let mut a_config = fleet[0].clone();
            a_config.peers.insert(b_name.clone(), b_addr);
            let (a, _) = crate::agent::daemon::test_agent(
                a_config,
                &dir.path().join("a"),
                crate::postcopy::start_daemon,
            );
            let m = MigrationId::from_bytes([9; 16]);
            let storage = dir.path().join("b");
            let service = ServiceSpec {
                name: Name::new("s").unwrap(),
                server_user: None,
                moves: 0,
            };
            lock(&b.inbound).insert(
                m,
                Inbound {
                    migration: m,
                    source: a_name.clone(),
                    paths: Paths::new(&storage, &service.name),
                    service,
                    key: None,
                    slot: crate::slot::Slot::for_test("qlm-mh-s", &storage),
                    dir: storage.join("inbound").join(m.to_string()),
                    received: true,
                    restored_pid: None,
                    fault: None,
                    touched: Instant::now(),
                    step_running: false,
                    abandoned: false,
                    memory: Memory::Cold,
                    page_daemon: None,
                    restored_at: None,
                },
            );
            let pages = |migration| PeerRequest {
                token: a.token_for(m, &b_name).unwrap(),
                body: PeerBody::Pages { migration },
            };
            let limit = Duration::from_secs(10);
            let reply = a.ask(&b_name, &pages(m), limit).await.unwrap();
            assert!(
                matches!(&reply, PeerReply::Refused(Refusal::PostCopy { host, reason })
                    if host == "b" && reason.contains("cold")),
                "{reply:?}"
            );
            if let Some(i) = lock(&b.inbound).get_mut(&m) {
                i.memory = Memory::PostCopy;
                i.received = false;
            }
            let reply = a.ask(&b_name, &pages(m), limit).await.unwrap();
            assert!(
                matches!(&reply, PeerReply::Refused(Refusal::Busy(r)) if r.contains("image set")),
                "{reply:?}"
            );
            let other = MigrationId::from_bytes([8; 16]);
            let reply = a.ask(&b_name, &pages(other), limit).await.unwrap();
            assert_eq!(
                reply,
                PeerReply::Refused(Refusal::Token(agent_protocol::TokenRefusal::WrongMigration))
            );
            // A migration this target does not hold, with its own token.
            let unknown = PeerRequest {
                token: a.token_for(other, &b_name).unwrap(),
                body: PeerBody::Pages { migration: other },
            };
            let reply = a.ask(&b_name, &unknown, limit).await.unwrap();
            assert!(
                matches!(reply, PeerReply::Refused(Refusal::UnknownMigration(_))),
                "{reply:?}"
            );
            a.endpoint.close(quinn::VarInt::from_u32(0), b"done");
            b.endpoint.close(quinn::VarInt::from_u32(0), b"done");
        });
    }

    /// A stand-in for `criu lazy-pages` with the page socket as stdin and stdout: asks for
    /// pages (`REQ`), writes what it gets to `<dir>/got` until the end, exits with the code in
    /// `<dir>/code`.
    fn fake_lazy_pages(
        dir: &std::path::Path,
        ps: std::os::unix::net::UnixStream,
    ) -> Result<std::process::Child> {
        use std::process::{Command, Stdio};
        let input = ps.try_clone()?;
        Ok(Command::new("sh")
            .args([
                "-c",
                "printf REQ; cat > \"$1/got\"; exit $(cat \"$1/code\")",
                "sh",
            ])
            .arg(dir)
            .stdin(Stdio::from(std::os::fd::OwnedFd::from(input)))
            .stdout(Stdio::from(std::os::fd::OwnedFd::from(ps)))
            .spawn()?)
    }

    /// The whole page path between two in-process agents, criu replaced at both ends: the
    /// source's relay (as `outbound::open_pages` runs it) and the target's real Pages handler
    /// with a stand-in daemon. Its bytes cross intact both ways, `PagesReady` comes first as
    /// a frame; a daemon that exits 0 ends the stream cleanly at the source's socket, one
    /// that fails resets it (the source's socket stays open, its dump not told an end).
    #[test]
    fn pages_cross_between_two_agents_and_a_failed_daemon_is_no_clean_end() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let fleet = crate::agent::tls::tests::fleet(
            &dir.path().join("fleet"),
            &[("a", "127.0.0.1"), ("b", "127.0.0.1")],
        );
        let (a_name, b_name) = (Name::new("a").unwrap(), Name::new("b").unwrap());
        let storage = dir.path().join("b");
        let limit = Duration::from_secs(30);
        rt.block_on(async {
            let (b, b_addr) =
                crate::agent::daemon::test_agent(fleet[1].clone(), &storage, fake_lazy_pages);
            tokio::spawn(crate::agent::daemon::accept_peers(b.clone()));
            let mut a_config = fleet[0].clone();
            a_config.peers.insert(b_name.clone(), b_addr);
            let (a, _) =
                crate::agent::daemon::test_agent(a_config, &dir.path().join("a"), fake_lazy_pages);
            for (i, code) in [0u8, 3].into_iter().enumerate() {
                let m = MigrationId::from_bytes([20 + code; 16]);
                let inbound_dir = storage.join("inbound").join(m.to_string());
                let criu_dir = inbound_dir.join("set").join("criu");
                std::fs::create_dir_all(&criu_dir).unwrap();
                std::fs::write(criu_dir.join("code"), code.to_string()).unwrap();
                let service = ServiceSpec {
                    name: Name::new(&format!("s{i}")).unwrap(),
                    server_user: None,
                    moves: 0,
                };
                lock(&b.inbound).insert(
                    m,
                    Inbound {
                        migration: m,
                        source: a_name.clone(),
                        paths: Paths::new(&storage, &service.name),
                        service,
                        key: None,
                        slot: crate::slot::Slot::for_test("qlm-mh-s", &storage),
                        dir: inbound_dir,
                        received: true,
                        restored_pid: None,
                        fault: None,
                        touched: Instant::now(),
                        step_running: false,
                        abandoned: false,
                        memory: Memory::PostCopy,
                        page_daemon: None,
                        restored_at: None,
                    },
                );
                // The source agent's side, as open_pages runs it.
                let request = PeerRequest {
                    token: a.token_for(m, &b_name).unwrap(),
                    body: PeerBody::Pages { migration: m },
                };
                let conn = a.connection(&b_name).await.unwrap();
                let (mut send, mut recv) = conn.open_bi().await.unwrap();
                crate::agent::daemon::write_frame(&mut send, &request)
                    .await
                    .unwrap();
                let body = tokio::time::timeout(limit, crate::agent::daemon::read_body(&mut recv))
                    .await
                    .unwrap()
                    .unwrap();
                let reply: PeerReply = agent_protocol::decode(&body).unwrap();
                assert_eq!(reply, PeerReply::PagesReady);
                let (dump, mut ours) = tokio::net::UnixStream::pair().unwrap();
                let relay = tokio::spawn(async move {
                    let r = crate::agent::page_relay::relay(&mut ours, &mut send, &mut recv).await;
                    (r, ours)
                });
                // The stand-in dump: answers the request with its pages, then ends its side.
                let (mut dump_r, mut dump_w) = dump.into_split();
                let mut req = [0u8; 3];
                tokio::time::timeout(limit, dump_r.read_exact(&mut req))
                    .await
                    .unwrap()
                    .unwrap();
                assert_eq!(&req, b"REQ");
                let pages: Vec<u8> = (0..(2u32 << 20))
                    .map(|x| (x.wrapping_mul(7) ^ (x >> 12)) as u8)
                    .collect();
                dump_w.write_all(&pages).await.unwrap();
                dump_w.shutdown().await.unwrap();
                let (relayed, _ours) = tokio::time::timeout(limit, relay).await.unwrap().unwrap();
                let daemon = lock(&b.inbound)
                    .get_mut(&m)
                    .and_then(|i| i.page_daemon.take());
                let status = daemon.expect("the target keeps its daemon").wait().unwrap();
                assert_eq!(status.code(), Some(i32::from(code)));
                assert!(std::fs::read(criu_dir.join("got")).unwrap() == pages);
                if code == 0 {
                    let f = relayed.unwrap();
                    assert_eq!((f.to_peer, f.from_peer), (2 << 20, 3));
                    let mut rest = Vec::new();
                    tokio::time::timeout(limit, dump_r.read_to_end(&mut rest))
                        .await
                        .unwrap()
                        .unwrap();
                    assert!(rest.is_empty(), "the end came as an end");
                } else {
                    assert!(
                        matches!(
                            relayed,
                            Err(crate::agent::page_relay::RelayError::PeerRead(
                                quinn::ReadError::Reset(_)
                            ))
                        ),
                        "{relayed:?}"
                    );
                }
            }
            a.endpoint.close(quinn::VarInt::from_u32(0), b"done");
            b.endpoint.close(quinn::VarInt::from_u32(0), b"done");
        });
    }

    /// An inbound journal written before post-copy (no `memory`) reads as a cold move's,
    /// and a post-copy one keeps its mode (a later agent must not adopt its server).
    #[test]
    fn an_older_journal_reads_as_cold() {
        let j = Journal {
            migration: MigrationId::from_bytes([1; 16]),
            source: Name::new("a").unwrap(),
            service: ServiceSpec {
                name: Name::new("s").unwrap(),
                server_user: None,
                moves: 0,
            },
            slot_name: "x".into(),
            server_pid: 7,
            supervisor_pid: 6,
            memory: Memory::PostCopy,
        };
        let mut v = serde_json::to_value(&j).unwrap();
        let back: Journal = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(back.memory, Memory::PostCopy);
        v.as_object_mut().unwrap().remove("memory");
        let old: Journal = serde_json::from_value(v).unwrap();
        assert_eq!(old.memory, Memory::Cold);
    }
}
