//! The deployment's front during one command (`up --front`): taken over from its record for a
//! move, and left in place (detached, never removed) however the command ends; only `down`
//! removes it.
//!
//! ```text
//!  migrate: attach (points at the server's side) ─► announce ─► hold + switch(target) ─► dump
//!           ─► restore ─► resume ─► release (held datagrams to the restored server) ─► detach
//!  rollback: switch(source) + release, after the source runs again
//! ```

use std::net::SocketAddrV4;

use anyhow::{Context, Result};
use tracing::{info, warn};
use udp_shim_front::{Front, HoldLimits, HoldStats, Tools};

use crate::state::{FrontState, Side};

/// A front taken over for one move; detached when dropped.
#[derive(Debug)]
pub(crate) struct MovingFront {
    front: Option<Front>,
    state: FrontState,
}

impl MovingFront {
    /// Takes the deployment's front over and points it at `side` (where the server runs).
    pub(crate) fn attach(state: &FrontState, side: Side) -> Result<Self> {
        let mut front = Front::attach(state.record(side), HoldLimits::default(), Tools::default())
            .with_context(|| format!("taking the front {} over", state.front))?;
        // What the kernel points at may differ after an interrupted move: set it.
        front
            .switch(state.backend(side))
            .context("pointing the front at the server's side")?;
        Ok(Self {
            front: Some(front),
            state: state.clone(),
        })
    }

    /// The address clients use.
    pub(crate) fn address(&self) -> SocketAddrV4 {
        self.state.front
    }

    fn front(&mut self) -> Result<&mut Front> {
        self.front.as_mut().context("the front was detached")
    }

    /// At the freeze: datagrams to the front are held from now on (`hold`), and the NAT
    /// points at `side` (they reach it at the release).
    pub(crate) fn freeze_to(&mut self, side: Side, hold: bool) -> Result<()> {
        let backend = self.state.backend(side);
        let front = self.front()?;
        if hold {
            front.hold().context("holding the front's datagrams")?;
        }
        front
            .switch(backend)
            .with_context(|| format!("switching the front to {backend}"))?;
        Ok(())
    }

    /// Points the front at `side` and delivers what was held (nothing held: just the
    /// switch).
    pub(crate) fn settle_at(&mut self, side: Side) -> Result<Option<HoldStats>> {
        let backend = self.state.backend(side);
        let front = self.front()?;
        if front.backend() != backend {
            front
                .switch(backend)
                .with_context(|| format!("switching the front to {backend}"))?;
        }
        if !front.is_holding() {
            return Ok(None);
        }
        let stats = front.release().context("releasing the held datagrams")?;
        info!(
            held = stats.held,
            delivered = stats.delivered,
            dropped = stats.dropped_bytes_bound
                + stats.dropped_datagrams_bound
                + stats.dropped_time_bound,
            held_ms = format_args!("{:.1}", stats.held_for.as_secs_f64() * 1e3),
            "front: held datagrams delivered"
        );
        Ok(Some(stats))
    }
}

impl Drop for MovingFront {
    fn drop(&mut self) {
        if let Some(front) = self.front.take()
            && let Err(e) = front.detach()
        {
            warn!("leaving the front in place: {e}");
        }
    }
}
