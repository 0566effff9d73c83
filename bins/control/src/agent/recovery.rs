//! A move out of this host that was in flight when this host's agent died: the agent started
//! after it finishes or undoes it from the move's journal (`<storage>/moves/<id>/journal.json`,
//! written by [`super::outbound`]).
//!
//! ```text
//!  journal: resume asked? ──yes──► target's status names the service? ──yes──► completed:
//!     │                                  │ no                                 the slot here goes
//!     │                                  │ target unreachable ──► kept for the next start
//!     no ──────────────────────────────► abort at the target (best effort), then here:
//!                                          server runs (parked)  ──► clients sent back
//!                                          dumped ──► restore from the image set, placement
//!                                                     observed, clients sent back
//!  then: the image set wiped, the move recorded (status, metrics) as rolled back or completed
//! ```
//!
//! The target cannot have resumed the service unless this host asked it to (the journal says
//! so before the request leaves), so without that mark the source restores its own copy even
//! when the target cannot be reached: the target's agent gives its half up on its own
//! ([`super::inbound`]'s stale limit) or when told to abort.

use std::sync::Arc;
use std::time::{Duration, Instant};

use admin_api::AdminDir;
use agent_protocol::{MoveSummary, Outcome, PeerBody, PeerReply, PeerRequest};
use anyhow::{Context, Result, anyhow, bail};
use migration_core::{MigrationPolicy, Phase};
use tracing::{info, warn};

use super::daemon::{Agent, lock, now_unix};
use super::outbound::MoveJournal;
use super::service::{self, Service};
use crate::supervisor::{self, SupervisorReply, SupervisorRequest};
use crate::{engine, sys};

/// How long the target is asked whether it runs the service before the answer counts as
/// unknown.
const TARGET_LIMIT: Duration = Duration::from_secs(30);
/// How long one request to the target may take.
const ASK_LIMIT: Duration = Duration::from_secs(5);
const REAP_LIMIT: Duration = Duration::from_secs(5);
/// How long a dump an earlier agent started is waited for.
const TRACE_LIMIT: Duration = Duration::from_secs(60);

/// Finishes or undoes every move an earlier agent left (claimed and registered as services by
/// the caller), one after the other.
pub(crate) fn recover_all(agent: &Arc<Agent>, moves: Vec<(MoveJournal, Service)>) {
    for (journal, svc) in moves {
        let name = svc.name.clone();
        let migration = journal.migration;
        match recover(agent, &journal, svc) {
            Ok(outcome) => info!(%migration, service = %name, ?outcome,
                                 "the move an earlier agent left is over"),
            Err(e) => warn!(%migration, service = %name,
                            "the move an earlier agent left could not be finished: {e:#}"),
        }
        agent.release(&name);
        agent.count_services();
    }
}

fn ask(agent: &Agent, j: &MoveJournal, body: PeerBody) -> Result<PeerReply> {
    let request = PeerRequest {
        token: agent.token_for(j.migration, &j.to)?,
        body,
    };
    agent
        .runtime
        .block_on(agent.ask(&j.to, &request, ASK_LIMIT))
}

/// Whether the target runs the service; None when it could not be asked within
/// [`TARGET_LIMIT`].
fn target_runs_it(agent: &Agent, j: &MoveJournal) -> Option<bool> {
    let deadline = Instant::now() + TARGET_LIMIT;
    loop {
        match ask(agent, j, PeerBody::Status) {
            Ok(PeerReply::Status(s)) => {
                return Some(s.services.iter().any(|x| x.name == j.service));
            }
            Ok(other) => warn!(to = %j.to, "status answered {other:?}"),
            Err(e) => warn!(to = %j.to, "asking the target whether it runs the service: {e:#}"),
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn recover(agent: &Arc<Agent>, j: &MoveJournal, mut svc: Service) -> Result<Outcome> {
    let move_dir = agent.storage.join("moves").join(j.migration.to_string());
    let here = agent.config.host.to_string();
    if j.resume_asked {
        match target_runs_it(agent, j) {
            Some(true) => {
                // The move completed: the service is the target's; what is left here goes.
                lock(&agent.services).remove(&j.service);
                service::tear_down(&svc.paths, &svc.slot, None)?;
                service::wipe_dir(&move_dir)?;
                finish(agent, j, Outcome::Completed, None);
                return Ok(Outcome::Completed);
            }
            Some(false) => {}
            None => bail!(
                "the resume was asked of {} and it cannot be reached: whether the service \
                 runs there is unknown; the image set is kept for the next start",
                j.to
            ),
        }
    }
    // The target first: no second copy may run there once this one runs again.
    match ask(
        agent,
        j,
        PeerBody::Abort {
            migration: j.migration,
        },
    ) {
        Ok(PeerReply::Aborted { undone }) => info!(to = %j.to, "the target undid: {undone}"),
        Ok(other) => {
            info!(to = %j.to, "the target answered the abort: {other:?}");
            // It knows the migration no more: finished in between (its resume completed)?
            if j.resume_asked && target_runs_it(agent, j) == Some(true) {
                lock(&agent.services).remove(&j.service);
                service::tear_down(&svc.paths, &svc.slot, None)?;
                service::wipe_dir(&move_dir)?;
                finish(agent, j, Outcome::Completed, None);
                return Ok(Outcome::Completed);
            }
        }
        Err(e) => warn!(to = %j.to, "the target could not be told to abort: {e:#}"),
    }
    let policy = MigrationPolicy::default();
    // A dump the earlier agent started may still run (its criu worker outlives it): its end
    // decides whether the server runs on or was dumped.
    wait_untraced(j.server_pid);
    let dumped = j.dumped || move_dir.join("set/criu/pstree.img").is_file();
    if !svc.server_runs() {
        if j.post_copy {
            // Its image set holds no memory; the pages were in the dump that died with the
            // agent (criu ended the source when its page server lost its peer).
            bail!(
                "post-copy: the server (PID {}) is gone and its image set holds no memory: \
                 the service is lost",
                j.server_pid
            );
        }
        if !dumped {
            bail!(
                "the server (PID {}) is gone and no complete image set is here",
                j.server_pid
            );
        }
        svc.server_pid = restore_here(j, &svc, &move_dir)?;
    }
    let admin = AdminDir::open(&svc.paths.admin).context("opening the service's admin folder")?;
    match engine::ask_abort(
        &admin,
        svc.server_pid,
        j.migration,
        j.source_addr,
        policy.ack_deadline,
    ) {
        Ok(aborted) => info!(
            acked = aborted.outcome.acked.len(),
            missing = aborted.outcome.missing.len(),
            "the clients were sent back"
        ),
        // The server runs; clients that were not told come back when their own limits end.
        Err(e) => warn!("sending the clients back: {e:#}"),
    }
    svc.save()?;
    lock(&agent.services).insert(svc.name.clone(), svc);
    service::wipe_dir(&move_dir)?;
    let phase = if dumped {
        Phase::Dumping
    } else {
        Phase::Preparing
    };
    finish(
        agent,
        j,
        Outcome::RolledBack,
        Some((format!("{phase} (the agent restarted)"), here)),
    );
    Ok(Outcome::RolledBack)
}

/// Restores the dumped server from the move's image set, under the service's supervisor (a
/// new idle one when the old one is gone); its PID.
fn restore_here(j: &MoveJournal, svc: &Service, move_dir: &std::path::Path) -> Result<i32> {
    let set = move_dir.join("set");
    sys::reap(j.server_pid, REAP_LIMIT)?;
    let alive = matches!(
        supervisor::ask(&svc.paths.socket, &SupervisorRequest::Ping, ASK_LIMIT),
        Ok(SupervisorReply::Pong { .. })
    );
    if !alive {
        warn!(service = %svc.name, "the service's supervisor is gone: starting an idle one");
        service::start_supervisor(&svc.paths, &svc.slot, None)?;
    }
    // criu reopens the server's log by path and checks its size: the one of the dump (when
    // the earlier agent died before copying it, the log here is that one: nothing wrote it
    // since the server was dumped).
    let kept_log = set.join("files").join("server.log");
    if kept_log.is_file() {
        std::fs::copy(&kept_log, &svc.paths.log)
            .context("putting the server's log of the dump in place")?;
    }
    let (pid, _timing) = engine::restore_via_supervisor(
        &svc.paths.socket,
        &svc.slot.netns,
        &set.join("criu"),
        "recovery-restore.log",
    )
    .context("restoring the server from the image set the earlier agent dumped")?;
    let placement = engine::observe_placement(pid, &svc.container())?;
    if !placement.is_right() {
        return Err(anyhow!(
            "the restored server (PID {pid}) is not in the service's slot"
        ));
    }
    info!(service = %svc.name, pid, "restored here from the earlier agent's dump");
    Ok(pid)
}

/// Waits (at most [`TRACE_LIMIT`]) while a process traces `pid` (criu seizes the processes it
/// dumps).
fn wait_untraced(pid: i32) {
    let deadline = Instant::now() + TRACE_LIMIT;
    while Instant::now() < deadline && traced(pid) {
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether `pid` is traced (`TracerPid` of its status is not 0).
fn traced(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("TracerPid:"))
            .is_some_and(|v| v.trim() != "0")
    })
}

fn finish(agent: &Agent, j: &MoveJournal, outcome: Outcome, failed: Option<(String, String)>) {
    agent.record(MoveSummary {
        migration: j.migration,
        service: j.service.clone(),
        from: agent.config.host.clone(),
        to: j.to.clone(),
        outcome,
        failed,
        freeze_ms: None,
        started_unix: now_unix(),
    });
    agent
        .metrics
        .record_migration(&crate::metrics::MigrationOutcome {
            result: match outcome {
                Outcome::Completed => crate::metrics::MigrationResult::Completed,
                Outcome::RolledBack => crate::metrics::MigrationResult::RolledBack,
                _ => crate::metrics::MigrationResult::Failed,
            },
            role: crate::metrics::Role::Source,
            freeze: None,
            transfer: None,
            bytes: crate::metrics::TransferBytes::default(),
            clients_acked: 0,
            clients_missing: 0,
            rollback_phase: (outcome == Outcome::RolledBack).then_some(if j.dumped {
                Phase::Dumping
            } else {
                Phase::Preparing
            }),
        });
}
