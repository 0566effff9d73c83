//! The simulated hosts of `cargo xtask e2e-multihost` (issue 10, "across hosts").

pub(crate) mod scenario;
pub(crate) mod topology;
