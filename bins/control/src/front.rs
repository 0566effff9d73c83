//! The deployment's front during one command (`up --front`): taken over from its record for a
//! move, and left in place (detached, never removed) however the command ends; only `down`
//! removes it.
//!
//! ```text
//!  client ─► F:P ─ front (nftables, udp-shim-front): F:P := S:4242 ─► host route S/32 via A|B
//!                                                                      ─► container (S on lo)
//!  migrate: attach, route to the server's side ─► announce ─► hold + route to the target
//!           ─► dump ─► restore ─► resume ─► release (held datagrams to the restored server)
//!           ─► detach
//!  rollback: route to the source + release, after the source runs again
//! ```
//!
//! The move switches the host route of the service address S, not the NAT: the server sees
//! datagrams to S before and after a move, so a QUIC stack that keeps a connection's local
//! address (quinn sends from the address a connection was accepted on) is not disturbed.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::Command;

use anyhow::{Context, Result};
use tracing::{info, warn};
use udp_shim_front::{Front, HoldLimits, HoldStats, Tools};

use crate::state::{FrontState, Side};
use crate::sys;

/// A front taken over for one move; detached when dropped.
#[derive(Debug)]
pub(crate) struct MovingFront {
    front: Option<Front>,
    state: FrontState,
    /// The side the service address routes to now.
    routed: Side,
}

impl MovingFront {
    /// Takes the deployment's front over and routes the service address to `side` (where
    /// the server runs).
    pub(crate) fn attach(state: &FrontState, side: Side) -> Result<Self> {
        let front = Front::attach(state.record(), HoldLimits::default(), Tools::default())
            .with_context(|| format!("taking the front {} over", state.front))?;
        // Owned by a MovingFront from here on: whatever fails next, it is detached (never
        // removed) when dropped.
        let moving = Self {
            front: Some(front),
            state: state.clone(),
            routed: side,
        };
        // What the kernel points at may differ after an interrupted move: set it.
        route_service(state, side)?;
        Ok(moving)
    }

    /// The address clients use.
    pub(crate) fn address(&self) -> SocketAddrV4 {
        self.state.front
    }

    fn front(&mut self) -> Result<&mut Front> {
        self.front.as_mut().context("the front was detached")
    }

    /// At the freeze: datagrams to the front are held from now on (`hold`), and the service
    /// address routes to `side` (they reach it at the release).
    pub(crate) fn freeze_to(&mut self, side: Side, hold: bool) -> Result<()> {
        if hold {
            self.front()?
                .hold()
                .context("holding the front's datagrams")?;
        }
        route_service(&self.state, side)?;
        self.routed = side;
        Ok(())
    }

    /// Routes the service address to `side` and delivers what was held (nothing held: just
    /// the route).
    pub(crate) fn settle_at(&mut self, side: Side) -> Result<Option<HoldStats>> {
        if self.routed != side {
            route_service(&self.state, side)?;
            self.routed = side;
        }
        let front = self.front()?;
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

/// `ip route replace S/32 via <side's container>`: one netlink request, atomic.
pub(crate) fn route_service(state: &FrontState, side: Side) -> Result<()> {
    let via = state.backend(side);
    sys::run(
        "route the service address",
        Command::new("ip").args([
            "route",
            "replace",
            &format!("{}/32", state.service),
            "via",
            &via.ip().to_string(),
        ]),
    )
    .map(drop)
}

/// Gives the container at `netns` the service address (on its loopback) and makes it the
/// source of what leaves by its default route: a server that does not pick its replies'
/// source (no `IP_PKTINFO`) answers the front's clients from the service address too, which
/// the front rewrites to the front address.
pub(crate) fn add_service_address(netns: &std::path::Path, service: Ipv4Addr) -> Result<()> {
    let ip = |args: &[&str]| {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", netns.display()))
            .arg("ip")
            .args(args);
        c
    };
    sys::run(
        "give a container the service address",
        &mut ip(&["addr", "add", &format!("{service}/32"), "dev", "lo"]),
    )?;
    let shown = sys::run(
        "read a container's default route",
        &mut ip(&["-4", "route", "show", "default"]),
    )?;
    let (via, dev) = default_route(&shown.stdout())
        .with_context(|| format!("no default route in {}", netns.display()))?;
    sys::run(
        "make the service address a container's source address",
        &mut ip(&[
            "route",
            "replace",
            "default",
            "via",
            &via,
            "dev",
            &dev,
            "src",
            &service.to_string(),
        ]),
    )
    .map(drop)
}

/// The gateway and device of `ip -4 route show default`'s first line.
fn default_route(shown: &str) -> Option<(String, String)> {
    let words: Vec<&str> = shown.lines().next()?.split_whitespace().collect();
    let after = |key: &str| {
        words
            .iter()
            .position(|w| *w == key)
            .and_then(|i| words.get(i + 1))
            .map(|w| (*w).to_owned())
    };
    Some((after("via")?, after("dev")?))
}

/// Removes the host route of the service address (best effort: none is fine).
pub(crate) fn remove_service_route(service: Ipv4Addr) {
    let _ = Command::new("ip")
        .args(["route", "del", &format!("{service}/32")])
        .stderr(std::process::Stdio::null())
        .status();
}

/// The service address of a deployment whose front is named `name`: in 10.236.0.0/16, from a
/// hash of the name (so that `down` finds it without a state).
pub(crate) fn service_address_for(name: &str) -> Ipv4Addr {
    let hash = name.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    let [_, _, x, y] = hash.to_be_bytes();
    // Not .0 and not .255: no network or broadcast look-alikes.
    Ipv4Addr::new(10, 236, x, y.clamp(1, 254))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_route_is_read_and_odd_output_is_none() {
        assert_eq!(
            default_route("default via 10.88.0.1 dev eth0 proto static metric 100 \n"),
            Some(("10.88.0.1".into(), "eth0".into()))
        );
        assert_eq!(default_route(""), None);
        assert_eq!(default_route("default dev wg0 scope link"), None);
        assert_eq!(default_route("default via"), None);
    }

    #[test]
    fn the_service_address_is_stable_per_name_and_in_its_range() {
        let a = service_address_for("d0badcafe");
        assert_eq!(a, service_address_for("d0badcafe"));
        assert_ne!(a, service_address_for("d0badcaff"));
        for name in ["", "x", "d12345678", "dffffffff"] {
            let [p, q, _, y] = service_address_for(name).octets();
            assert_eq!((p, q), (10, 236));
            assert!((1..=254).contains(&y));
        }
    }
}
