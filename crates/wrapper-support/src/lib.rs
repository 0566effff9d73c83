//! What the server wrapper (swrapper) and the client wrapper (cwrapper) share.
//!
//! ```text
//!  Identity ──server_config / client_config──► quinn configs (TLS 1.3, ALPN, idle timeout)
//!  quinn bi stream ──ControlReader / ControlWriter──► control_protocol::Message
//!  MonotonicClock::now() ──► migration_core::Timestamp (the wrappers' clock for the registry)
//! ```

pub mod control;
pub mod tls;

pub use control::{ControlReader, ControlStreamError, ControlWriter};
pub use tls::{GeneratedPem, Identity, TlsError};

use std::time::Instant;

use migration_core::Timestamp;

/// The wrappers' clock: microseconds since the clock was made, on the monotonic clock.
///
/// After a CRIU restore the monotonic clock continues where it stopped (CRIU restores it
/// through a time namespace), so deadlines computed before the freeze stay meaningful.
#[derive(Debug, Clone, Copy)]
pub struct MonotonicClock {
    origin: Instant,
}

impl Default for MonotonicClock {
    fn default() -> Self {
        Self::new()
    }
}

impl MonotonicClock {
    /// A clock whose epoch is now.
    pub fn new() -> Self {
        Self {
            origin: Instant::now(),
        }
    }

    /// The current time.
    pub fn now(&self) -> Timestamp {
        let micros = u64::try_from(self.origin.elapsed().as_micros()).unwrap_or(u64::MAX);
        Timestamp::from_micros(micros)
    }

    /// The instant `t` stands for.
    pub fn instant(&self, t: Timestamp) -> Instant {
        self.origin + std::time::Duration::from_micros(t.as_micros())
    }
}
