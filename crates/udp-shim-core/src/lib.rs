//! The replaceable, quinn-ready UDP socket that both shims are built on.
//!
//! ```text
//!   std UdpSocket ──Slot::new──▶ Slot (generation 0, Caps fixed from this first socket)
//!   std UdpSocket ──Slot::prepare──▶ PreparedSocket ──Slot::swap(Some)──▶ generation N+1
//!                                                    Slot::swap(None) ──▶ parked
//!
//!   shim's AsyncUdpSocket           Slot                                kernel
//!   ─────────────────────   ─────────────────────────────────────   ──────────────
//!   try_send(t, dest) ────▶ src_ip cleared, family fixed ─────────▶ current socket
//!   poll_recv(.., keep) ◀── keep(meta) filters / rewrites ◀──────── current socket
//!   create_io_poller ─────▶ SlotPoller: writable OR swapped
//!   stats() ◀────────────── SlotStats (datagrams, not transmits)
//! ```
//!
//! This crate is part of the two shims, `udp-shim-client` (`SwappableUdp`) and
//! `udp-shim-server` (`MigratableUdp`): it holds the machinery they share, and nothing else
//! should use it directly. The shims decide *what* to swap and when; the [`Slot`] makes the
//! swap safe for quinn:
//!
//! - [`Slot::try_send`] returns only `Ok` or `WouldBlock`: a datagram that cannot be sent
//!   (parked, kernel error, unreachable address family) is dropped and counted, as quinn
//!   requires of a custom socket.
//! - [`Slot::poll_recv`] never returns an error: transient errors (`ECONNREFUSED` after an ICMP
//!   port unreachable) are swallowed and counted; it stays `Pending` while parked and follows
//!   swaps.
//! - The capabilities quinn reads once ([`Caps`]) are fixed from the first socket; later
//!   sockets get UDP GRO turned off if quinn's buffers could not hold a full kernel batch.
//! - A swap bumps a generation counter, wakes the receive task and every [`SlotPoller`], so
//!   no task stays registered on a retired socket. A retired socket's descriptor closes as
//!   soon as the last call in flight drops it ([`Slot::open_retired`]).
//!
//! The [`addr`] module converts between the address forms of an IPv4 or IPv6 socket and of
//! quinn's endpoint (IPv4-mapped IPv6 addresses).

use std::io;

pub mod addr;
mod poller;
mod slot;

pub use poller::SlotPoller;
pub use slot::{Caps, PreparedSocket, Slot, SlotStats};

/// Errors from wrapping a socket in a [`Slot`].
///
/// Deliberately exhaustive: each shim maps every variant onto its own `ShimError` variant of
/// the same name, and a new variant here must make that mapping fail to compile.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    /// Called outside a Tokio runtime: the socket must be registered with its reactor.
    #[error("a Tokio runtime with I/O enabled is required")]
    NoRuntime,
    /// Preparing a socket for quinn failed (socket options, local address, non-blocking mode,
    /// registration with the reactor).
    #[error("cannot prepare UDP socket for quinn: {source}")]
    Setup {
        /// The underlying error.
        source: io::Error,
    },
}
