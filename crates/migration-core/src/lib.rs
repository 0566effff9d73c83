//! Sans-I/O migration logic: identifiers, the migration state machine, the session registry
//! and the policy that drives them.
//!
//! ```text
//!  orchestrator (control)                           server wrapper
//!  ──────────────────────                           ──────────────
//!  MigrationPolicy ─validate()                      SessionRegistry
//!    │ predump.next_step() ─► Another | FinalDump     insert / remove        ◄── connections
//!    │ on_failure(phase)   ─► Recovery ─► Event       tell_all(id, now, dl)  ──► who to notify
//!    ▼                                                ack / quiesced / resumed ◄── client msgs
//!  Event + now ──► Migration::on_event ──► Phase      expire(now)            ──► who timed out
//!                      │  (TRANSITIONS table)         next_deadline()        ──► when to wake
//!                      ▼                              reset()                ◄── migration over
//!                  Timeline ──► MigrationReport ──serde──► JSON
//! ```
//!
//! The crate does no I/O and reads no clock: every time-dependent input takes a [`Timestamp`]
//! supplied by the caller (`clippy.toml` bans `Instant::now` and `SystemTime::now` here). It
//! has no random number generator either: a [`MigrationId`] is built from caller-supplied bytes.
//!
//! The state machine is a table ([`TRANSITIONS`]); [`transition_table_dot`] renders it as a
//! Graphviz graph, checked in as `tests/snapshots/transitions.dot`. After changing the table,
//! regenerate it with `UPDATE_SNAPSHOTS=1 cargo test -p migration-core --test snapshot`.

pub mod id;
pub mod machine;
pub mod policy;
pub mod registry;
pub mod report;
pub mod time;

pub use id::{MigrationId, ParseMigrationIdError, SessionId};
pub use machine::{
    Event, EventKind, FailureReason, Migration, Phase, RollbackOutcome, TRANSITIONS,
    TransitionError, next_phase, transition_table_dot,
};
pub use policy::{
    FinalDumpReason, MAX_PREDUMP_ROUNDS, MigrationPolicy, PolicyError, PreDumpDecision,
    PreDumpPolicy, Recovery,
};
pub use registry::{Awaited, RegistryError, Session, SessionRegistry, SessionState};
pub use report::{
    MigrationReport, PhaseSpan, PreDumpRecord, SessionDowntime, Timeline, TransitionRecord,
};
pub use time::Timestamp;
