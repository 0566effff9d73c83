//! Recovery after a `control` was killed mid-migration (SIGKILL, a crash, a reboot of the
//! shell): the journal says which migration and phase; what happened since is observed.
//!
//! ```text
//!  wait: no criu left working on the image set; the supervisor answers (it finishes a restore
//!        it was asked for before it answers anything else)
//!  server alive, in the target's namespace ──► resume request + SIGUSR2 ──► completed
//!  server alive, in the source's namespace ──► abort request + SIGUSR1 ──► rolled back
//!  server gone, the final dump complete    ──► restore at the source, abort ──► rolled back
//!  server gone, no complete dump           ──► failed (nothing to restore from)
//! ```
//!
//! Either way the service ends up running, at the source or the target, with its clients
//! pointed at it; the state, the report and the image set are settled as after any migration.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use admin_api::{AdminDir, AdminError, MoveReport, MoveResult, PortProbe};
use anyhow::{Context, Result, bail};
use migration_core::{Migration, MigrationPolicy, Recovery};
use tracing::{info, warn};

use crate::engine::{self, ask_abort, ask_resume, observe_placement, probe};
use crate::journal::{self, Journal};
use crate::state::State;
use crate::supervisor::{self, SupervisorRequest};
use crate::{images, sys};

/// How long a criu left running by the killed control may take to finish.
const LEFTOVER_LIMIT: Duration = Duration::from_secs(60);

/// Recovers the migration the journal names; returns its report.
pub(crate) fn recover(
    state_dir: &Path,
    state: &mut State,
    journal: &Journal,
) -> Result<MoveReport> {
    let started = Instant::now();
    let id = journal.migration_id;
    warn!(%id, phase = %journal.phase, "a control was interrupted during this migration; recovering");
    wait_for_leftover_criu(&journal.images)?;
    let socket = state_dir.join(supervisor::SOCKET);
    supervisor::ask(&socket, &SupervisorRequest::Ping, LEFTOVER_LIMIT)
        .context("the supervisor does not answer; the server cannot be restored without it")?;

    let src = state.container(journal.from).clone();
    let dst = state.container(journal.to).clone();
    // Behind a front the probes check the containers' own addresses (see engine::migrate).
    let (source_addr, target_addr) = match &state.front {
        Some(f) => (
            SocketAddr::V4(f.backend(journal.from)),
            SocketAddr::V4(f.backend(journal.to)),
        ),
        None => (
            SocketAddr::from(([127, 0, 0, 1], src.host_port)),
            SocketAddr::from(([127, 0, 0, 1], dst.host_port)),
        ),
    };
    let admin = AdminDir::open(&state.admin_dir)?;
    let policy = MigrationPolicy::default();
    let plain = state.plain_server();
    // A server of the user's is not told anything: its clients keep the front address.
    let send_back = |pid: i32, report: &mut MoveReport| -> Result<MoveResult> {
        if plain {
            return Ok(MoveResult::RolledBack);
        }
        ask_abort(&admin, pid, id, source_addr, policy.ack_deadline)
            .map(|a| {
                report.aborted = Some(a);
                MoveResult::RolledBack
            })
            .context("sending the clients back to the source")
    };
    let mut report = MoveReport::new(
        id,
        (src.name.clone(), dst.name.clone()),
        (source_addr, target_addr),
        Migration::new(id, migration_core::Timestamp::from_micros(0)).report(),
    );
    report.recovered_after = Some(journal.phase);
    let pid = journal.server_pid;
    let alive = sys::process_runs(pid, &state.server_comm());
    let at_target = alive && observe_placement(pid, &dst).is_ok_and(|p| p.is_right());
    let outcome: Result<MoveResult> = if at_target {
        // The restore happened: finish the move.
        info!(
            pid,
            "the server runs in the target's namespace: resuming it there"
        );
        let placement = observe_placement(pid, &dst)?;
        report.placement = Some(placement);
        match ask_resume(&admin, pid, id) {
            _ if plain => {}
            Ok(resumed) => report.resumed = Some(resumed),
            // Resumed already (the killed control got that far): the server says so.
            Err(e) if is_already_resumed(&e) => info!("the server had resumed already"),
            Err(e) => return Err(e).context("resuming the restored server"),
        }
        report.source_probe = Some(probe(source_addr));
        report.target_probe = Some(probe(target_addr));
        if report.source_probe == Some(PortProbe::Answered) {
            bail!("after the recovery the source's address {source_addr} still answers QUIC");
        }
        state.side = journal.to;
        state.migrations += 1;
        Ok(MoveResult::Completed)
    } else if alive {
        info!(
            pid,
            "the server runs at the source: sending its clients back"
        );
        report.recovery = Some(Recovery::ResumeSource);
        send_back(pid, &mut report)
    } else {
        let dump = journal.dump_dir();
        if dump.join("pstree.img").is_file() {
            info!(pid, dump = %dump.display(), "the server was dumped: restoring it at the source");
            report.recovery = Some(Recovery::RestoreOnSource);
            sys::reap(pid, Duration::from_secs(5))?;
            let (new_pid, timing) =
                engine::restore_via_supervisor(&socket, &src.netns, &dump, "recovery-restore.log")?;
            report.rollback_restore = Some(timing);
            let placement = observe_placement(new_pid, &src)?;
            let right = placement.is_right();
            report.placement = Some(placement);
            if !right {
                bail!(
                    "the server restored for the recovery is not in {}'s namespace",
                    src.name
                );
            }
            state.server_pid = new_pid;
            send_back(new_pid, &mut report)
        } else {
            Err(anyhow::anyhow!(
                "the server (PID {pid}) is gone and {} holds no complete image set; \
                 `control down`, then `control up`",
                dump.display()
            ))
        }
    };
    let what = format!("control was interrupted in phase {}", journal.phase);
    match outcome {
        Ok(result) => {
            report.result = result;
            report.failure = (result != MoveResult::Completed).then(|| what.clone());
        }
        Err(e) => {
            report.result = MoveResult::Failed;
            report.failure = Some(format!("{what}; the recovery failed: {e:#}"));
        }
    }
    if report.recovery.is_none() && report.result != MoveResult::Completed {
        report.recovery = Some(Recovery::Abort);
    }
    report.images_dir = images::dispose(&journal.images, journal.keep_images);
    // Behind a front: it points where the server runs now and holds nothing (the killed
    // control may have switched it, or left a hold).
    if let Some(front) = &state.front
        && let Err(e) = crate::front::MovingFront::attach(front, state.side)
    {
        warn!("setting the front after the recovery: {e:#}");
    }
    report.wall_ms = started.elapsed().as_secs_f64() * 1e3;
    state.save(state_dir)?;
    journal::remove(state_dir)?;
    info!(%id, result = %report.result, "recovery done");
    Ok(report)
}

fn is_already_resumed(e: &anyhow::Error) -> bool {
    e.downcast_ref::<AdminError>().is_some_and(|a| {
        matches!(a, AdminError::ServerReported { message, .. } if message.contains("no migration is in progress"))
    })
}

/// Waits until no criu process works on `images` (one started by the killed control goes on
/// after it: a dump may complete, a restore run by the supervisor too).
fn wait_for_leftover_criu(images: &Path) -> Result<()> {
    let needle = images.as_os_str().as_encoded_bytes().to_vec();
    let start = Instant::now();
    loop {
        let busy = criu_processes_on(&needle);
        if busy.is_empty() {
            return Ok(());
        }
        if start.elapsed() > LEFTOVER_LIMIT {
            bail!(
                "criu (PIDs {busy:?}) still works on {} after {LEFTOVER_LIMIT:?}",
                images.display()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// PIDs of processes running criu with `needle` (an image path) in their arguments.
fn criu_processes_on(needle: &[u8]) -> Vec<i32> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        // criu may run as `nsenter ... criu`, through a wrapper script or the dynamic loader
        // (`ld-linux ... /opt/.../criu`): any argument named criu counts.
        let is_criu = cmdline
            .split(|b| *b == 0)
            .any(|a| a.rsplit(|b| *b == b'/').next() == Some(b"criu"));
        if is_criu && cmdline.windows(needle.len().max(1)).any(|w| w == needle) {
            found.push(pid);
        }
    }
    found
}

/// The phase name the journal records, for messages.
pub(crate) fn describe(journal: &Journal) -> String {
    format!(
        "migration {} ({} -> {}) was interrupted in phase {}",
        journal.migration_id, journal.from, journal.to, journal.phase
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leftover_criu_processes_are_found_by_their_image_path() {
        // A process of this test that looks like criu working on a path.
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join("abc123");
        let fake = dir.path().join("criu");
        std::fs::write(&fake, "#!/bin/sh\nsleep 5\n").unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o700)).unwrap();
        let mut child = std::process::Command::new(&fake)
            .arg("-D")
            .arg(images.join("final"))
            .spawn()
            .unwrap();
        let needle = images.as_os_str().as_encoded_bytes().to_vec();
        let pid = i32::try_from(child.id()).unwrap();
        let mut seen = false;
        for _ in 0..200 {
            if criu_processes_on(&needle).contains(&pid) {
                seen = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(seen, "the fake criu was not found");
        assert!(!criu_processes_on(b"/no/such/images/path").contains(&pid));
        wait_for_leftover_criu(&images).unwrap();
    }
}
