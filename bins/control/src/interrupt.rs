//! SIGINT and SIGTERM during a migration: noted, and acted on at the next phase boundary (the
//! engine rolls the migration back), never in the middle of a criu run. Also the fault
//! injection that kills control at a phase boundary, for the recovery tests.

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn note(_: nix::libc::c_int) {
    // Only an atomic store: async-signal-safe.
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// From now on SIGINT and SIGTERM are noted instead of ending the process.
pub(crate) fn install() -> Result<()> {
    let action = SigAction::new(
        SigHandler::Handler(note),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { sigaction(sig, &action) }.with_context(|| format!("handling {sig}"))?;
    }
    Ok(())
}

/// Whether SIGINT or SIGTERM arrived.
pub(crate) fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Where the fault injection of the recovery tests acts (`QLM_KILL_AT`: control is killed with
/// SIGKILL there; `QLM_SIGTERM_AT`: control sends itself SIGTERM there).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Point {
    /// The clients were told and the server parked.
    Announced,
    /// `criu dump` was started, not waited for.
    Dumping,
    /// The dump completed.
    Dumped,
    /// The restore was asked of the supervisor, not waited for.
    Restoring,
}

impl Point {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Point::Announced => "announce",
            Point::Dumping => "dump",
            Point::Dumped => "dumped",
            Point::Restoring => "restore",
        }
    }
}

fn armed(var: &str, at: Point) -> bool {
    std::env::var(var).is_ok_and(|v| v == at.name())
}

/// Whether `QLM_KILL_AT` names `at`.
pub(crate) fn kill_armed(at: Point) -> bool {
    armed("QLM_KILL_AT", at)
}

/// Fault injection: SIGKILL to this process when `QLM_KILL_AT` names `at`; SIGTERM when
/// `QLM_SIGTERM_AT` does.
pub(crate) fn fault(at: Point) {
    let me = nix::unistd::getpid();
    if kill_armed(at) {
        tracing::warn!("fault injection: control is killed {}", at.name());
        let _ = nix::sys::signal::kill(me, Signal::SIGKILL);
    }
    if armed("QLM_SIGTERM_AT", at) {
        tracing::warn!("fault injection: control gets SIGTERM {}", at.name());
        let _ = nix::sys::signal::kill(me, Signal::SIGTERM);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signal_is_noted_not_fatal() {
        install().unwrap();
        assert!(!interrupted());
        nix::sys::signal::kill(nix::unistd::getpid(), Signal::SIGTERM).unwrap();
        // Delivered to this thread or another: wait briefly for the store.
        for _ in 0..100 {
            if interrupted() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(interrupted());
    }
}
