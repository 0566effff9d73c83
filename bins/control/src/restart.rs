//! `control restart-elsewhere` (hidden; for `cargo xtask bench-migrate`): the reconnect
//! baseline. The supervisor ends the server where it runs and starts a fresh one in the other
//! container; clients lose their connections and reconnect with a new handshake. This is
//! what a user without live migration does, and what the benchmark compares the moves with.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use admin_api::{AdminDir, Ready, RestartReport};
use anyhow::{Context, Result, bail};
use tracing::info;

use crate::deploy::Settings;
use crate::state::State;
use crate::supervisor::{self, SupervisorReply, SupervisorRequest};

/// How long the new server may take to say it is ready (it touches its ballast first).
const READY_LIMIT: Duration = Duration::from_secs(120);

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// Restarts the server in the other container and writes the report to `report` (default:
/// `<state dir>/reports/restart-<n>.json`).
pub(crate) fn restart_elsewhere(
    settings: &Settings,
    report: Option<&Path>,
) -> Result<RestartReport> {
    let state_dir = &settings.state_dir;
    let mut state = State::load(state_dir)?;
    let (from, to) = (
        state.container(state.side).clone(),
        state.container(state.side.other()).clone(),
    );
    let admin = AdminDir::open(&state.admin_dir)?;
    admin.clear()?;
    let started_us = now_us();
    let reply = supervisor::ask(
        &state_dir.join(supervisor::SOCKET),
        &SupervisorRequest::Restart {
            pid: state.server_pid,
            netns: to.netns.clone(),
        },
        READY_LIMIT,
    )?;
    let pid = match reply {
        SupervisorReply::Started { pid } => pid,
        SupervisorReply::Failed { error } => {
            bail!("the supervisor could not restart the server: {error}")
        }
        other => bail!("unexpected answer from the supervisor: {other:?}"),
    };
    // The server is gone from the source now: whatever happens next, the state says so.
    state.side = state.side.other();
    state.server_pid = pid;
    state.save(state_dir)?;
    let ready: Ready = admin
        .wait_event(None, READY_LIMIT)
        .context("the restarted server did not say it is ready")?;
    let ready_us = now_us();
    if i32::try_from(ready.pid).ok() != Some(pid) {
        info!(
            ready = ready.pid,
            started = pid,
            "the server's own PID differs from the started one (a wrapper in between)"
        );
    }
    let r = RestartReport {
        from: from.name,
        to: to.name,
        target_addr: std::net::SocketAddr::from(([127, 0, 0, 1], to.host_port)),
        started_us,
        ready_us,
        pid,
    };
    state.migrations += 1;
    state.save(state_dir)?;
    let path = report.map_or_else(
        || {
            state_dir
                .join("reports")
                .join(format!("restart-{}.json", state.migrations))
        },
        Path::to_path_buf,
    );
    crate::report::write_json(&path, &r)?;
    info!(
        ms = format_args!("{:.1}", r.downtime_ms()),
        to = %r.to,
        "restart: the new server is ready"
    );
    Ok(r)
}
