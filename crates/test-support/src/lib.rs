//! What the tests of several crates share. A dev-dependency only: nothing here is for
//! production code.
//!
//! ```text
//!   tls::configs(alpn) ──▶ (quinn::ServerConfig, quinn::ClientConfig)   self-signed "localhost"
//!   quinn::Endpoint ──echo::spawn_echo_server──▶ Accepted (the connections it accepted)
//!   quinn::Connection ──echo::Echo::open──▶ Echo ──rounds(n)──▶ n numbered echoes, checked
//!   netns::Netns::create(prefix) ──▶ netns + veth pair, 10.203.x.y/30 ──drop──▶ deleted
//!   netns::run(["ip", ..]) ──holds no_fork()──▶ Ok / Err(command: stderr)
//!   wait::eventually(what, done) ──▶ Ok once done() holds / Err(TimedOut) after 5 s
//!   require::require(what, available) ──▶ true / false + "SKIP" / panic when CI=true
//!   bins::workspace_bin(package, name) ──cargo build once──▶ target/<profile>/<name>
//! ```
//!
//! Helpers return typed errors rather than panicking, so a test can assert on a failure
//! (`unwrap` them in tests). [`netns`] needs root (`ip netns`, veth); tests check
//! [`netns::is_root`] through [`require()`] first: without root they skip, saying so, or fail
//! when `CI=true`.

pub mod bins;
pub mod echo;
pub mod netns;
pub mod require;
pub mod socket;
pub mod tls;
pub mod wait;

pub use bins::{BinError, workspace_bin};
pub use echo::{Accepted, Echo, EchoError, spawn_echo_server};
pub use netns::{Netns, is_root, no_fork, run};
pub use require::{in_ci, require, require_ok};
pub use socket::send_as_quinn;
pub use tls::{TlsError, configs};
pub use wait::{TEST_LIMIT, TimedOut, eventually, eventually_within};
