//! What the server wrapper (swrapper) and the client wrapper (cwrapper) share.
//!
//! ```text
//!  Identity ──server_config / client_config──► quinn configs (TLS 1.3, ALPN, idle timeout)
//!           (the ALPN list gets the control marker: qlm1+app first, then app)
//!  quinn::Connection ──tls::app_alpn / tls::speaks_control──► the app's ALPN, marked or not
//!  quinn bi stream ──ControlReader / ControlWriter──► control_protocol::Message
//!  MonotonicClock::now() ──► migration_core::Timestamp (the wrappers' clock for the registry)
//!  the app's quinn config ──TransportFacts──► check (idle timeout vs the longest freeze, ...)
//! ```

pub mod control;
pub mod quic;
pub mod tls;

pub use control::{ControlReader, ControlStreamError, ControlWriter};
pub use quic::{ConfigError, DEFAULT_MAX_FREEZE, IDLE_MARGIN, TransportFacts, min_idle_timeout};
pub use tls::{GeneratedPem, Identity, TlsError};

use std::time::Instant;

use migration_core::{MigrationId, Timestamp};

/// A fresh migration id: 16 random bytes from the operating system (`/dev/urandom`).
pub fn random_migration_id() -> std::io::Result<MigrationId> {
    use std::io::Read as _;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(MigrationId::from_bytes(bytes))
}

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

#[cfg(test)]
mod tests {
    #[test]
    fn random_migration_ids_differ() {
        let a = super::random_migration_id().unwrap();
        let b = super::random_migration_id().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.to_string().len(), 32);
    }
}
