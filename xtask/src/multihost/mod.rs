//! The simulated hosts of `cargo xtask e2e-multihost` (issue 10, "across hosts").

pub(crate) mod topology;
