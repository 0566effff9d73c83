//! The migration state machine, written as a transition table.
//!
//! [`TRANSITIONS`] is the whole truth: a row `(from, event, to)` says that in phase `from` an
//! event of kind `event` moves the machine to `to`. [`Migration::on_event`] looks the pair up;
//! a pair that is not in the table is rejected with [`TransitionError::Invalid`] and changes
//! nothing. The table also renders as a Graphviz graph ([`transition_table_dot`]).
//!
//! ```text
//! Idle ─start─► Preparing ─begin_quiesce─► Quiescing ─begin_dump─► Dumping ◄─┐ pre_dump_round
//!                  └──────────────begin_dump───────────────────────►   │ └───┘
//!                                                              dump_done
//!   Completed ◄─resume_done─ Resuming ◄─restore_done─ Restoring ◄─transfer_done─ Transferring
//!
//! every in-flight phase (Preparing..=Resuming) ─fail─► Failed
//!                                              ─roll_back─► RollingBack ─rollback_succeeded─► Failed
//!                                                                       ─rollback_failed───► Failed
//! ```

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::id::{MigrationId, SessionId};
use crate::report::{MigrationReport, PreDumpRecord, Timeline, TransitionRecord};
use crate::time::Timestamp;

/// Where a migration is.
///
/// Deliberately exhaustive: the phases are the state machine's contract with the orchestrator
/// and the server wrapper, and a new phase should break their `match`es at compile time.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Created, nothing done yet.
    Idle,
    /// Telling clients a migration is coming and collecting their acknowledgements.
    Preparing,
    /// Waiting for clients to stop sending (optional, see `MigrationPolicy::quiesce`).
    Quiescing,
    /// CRIU pre-dump rounds (process keeps running) then the final dump (process frozen).
    Dumping,
    /// Moving the image set to the target host.
    Transferring,
    /// CRIU restore on the target.
    Restoring,
    /// The restored process runs; waiting for clients to resume.
    Resuming,
    /// Terminal: the migration succeeded.
    Completed,
    /// Undoing a failed migration (see `Recovery`).
    RollingBack,
    /// Terminal: the migration failed; [`Migration::failure`] says where and why.
    Failed,
}

impl Phase {
    /// Every phase, in table order.
    pub const ALL: [Self; 10] = [
        Self::Idle,
        Self::Preparing,
        Self::Quiescing,
        Self::Dumping,
        Self::Transferring,
        Self::Restoring,
        Self::Resuming,
        Self::Completed,
        Self::RollingBack,
        Self::Failed,
    ];

    /// `Completed` or `Failed`: no event is accepted any more.
    pub const fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed)
    }

    /// `Preparing..=Resuming`: the phases from which `fail` and `roll_back` are accepted.
    pub const fn is_in_flight(self) -> bool {
        matches!(
            self,
            Self::Preparing
                | Self::Quiescing
                | Self::Dumping
                | Self::Transferring
                | Self::Restoring
                | Self::Resuming
        )
    }

    /// The snake_case name, as in JSON and in the DOT graph.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Preparing => "preparing",
            Self::Quiescing => "quiescing",
            Self::Dumping => "dumping",
            Self::Transferring => "transferring",
            Self::Restoring => "restoring",
            Self::Resuming => "resuming",
            Self::Completed => "completed",
            Self::RollingBack => "rolling_back",
            Self::Failed => "failed",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The kind of an [`Event`], without its data: the key of the transition table.
///
/// Deliberately exhaustive, like [`Phase`].
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// See [`Event::Start`].
    Start,
    /// See [`Event::BeginQuiesce`].
    BeginQuiesce,
    /// See [`Event::BeginDump`].
    BeginDump,
    /// See [`Event::PreDumpRound`].
    PreDumpRound,
    /// See [`Event::DumpDone`].
    DumpDone,
    /// See [`Event::TransferDone`].
    TransferDone,
    /// See [`Event::RestoreDone`].
    RestoreDone,
    /// See [`Event::ResumeDone`].
    ResumeDone,
    /// See [`Event::Fail`].
    Fail,
    /// See [`Event::RollBack`].
    RollBack,
    /// See [`Event::RollbackSucceeded`].
    RollbackSucceeded,
    /// See [`Event::RollbackFailed`].
    RollbackFailed,
}

impl EventKind {
    /// Every event kind.
    pub const ALL: [Self; 12] = [
        Self::Start,
        Self::BeginQuiesce,
        Self::BeginDump,
        Self::PreDumpRound,
        Self::DumpDone,
        Self::TransferDone,
        Self::RestoreDone,
        Self::ResumeDone,
        Self::Fail,
        Self::RollBack,
        Self::RollbackSucceeded,
        Self::RollbackFailed,
    ];

    /// The snake_case name, as in JSON and in the DOT graph.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Start => "start",
            Self::BeginQuiesce => "begin_quiesce",
            Self::BeginDump => "begin_dump",
            Self::PreDumpRound => "pre_dump_round",
            Self::DumpDone => "dump_done",
            Self::TransferDone => "transfer_done",
            Self::RestoreDone => "restore_done",
            Self::ResumeDone => "resume_done",
            Self::Fail => "fail",
            Self::RollBack => "roll_back",
            Self::RollbackSucceeded => "rollback_succeeded",
            Self::RollbackFailed => "rollback_failed",
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Something that happened to a migration, reported by the orchestrator.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// The orchestrator starts the migration (clients are about to be told).
    Start,
    /// Every client acked (or timed out); clients are asked to quiesce.
    BeginQuiesce,
    /// Checkpointing starts: from `Preparing` when the policy has no quiesce phase, else from
    /// `Quiescing`.
    BeginDump,
    /// A CRIU pre-dump round finished; the process kept running. Stays in `Dumping`.
    /// The final (freezing) dump is taken to start right after the last round.
    PreDumpRound {
        /// Bytes written by this round.
        image_bytes: u64,
    },
    /// The final dump finished; the process is frozen (or gone) on the source.
    DumpDone {
        /// Size of the final image set, if measured.
        image_bytes: Option<u64>,
    },
    /// The image set is on the target host.
    TransferDone,
    /// CRIU restore returned; the process runs on the target.
    RestoreDone,
    /// Clients resumed (or the resume deadline passed).
    ResumeDone,
    /// A phase failed and nothing will be undone (`Recovery::Abort`).
    Fail {
        /// Human-readable cause.
        reason: String,
    },
    /// A phase failed and the orchestrator starts undoing it.
    RollBack {
        /// Human-readable cause of the failure being rolled back.
        reason: String,
    },
    /// The rollback finished: the service runs where it ran before.
    RollbackSucceeded,
    /// The rollback itself failed.
    RollbackFailed {
        /// Human-readable cause of the rollback failure.
        reason: String,
    },
}

impl Event {
    /// The table key of this event.
    pub const fn kind(&self) -> EventKind {
        match self {
            Self::Start => EventKind::Start,
            Self::BeginQuiesce => EventKind::BeginQuiesce,
            Self::BeginDump => EventKind::BeginDump,
            Self::PreDumpRound { .. } => EventKind::PreDumpRound,
            Self::DumpDone { .. } => EventKind::DumpDone,
            Self::TransferDone => EventKind::TransferDone,
            Self::RestoreDone => EventKind::RestoreDone,
            Self::ResumeDone => EventKind::ResumeDone,
            Self::Fail { .. } => EventKind::Fail,
            Self::RollBack { .. } => EventKind::RollBack,
            Self::RollbackSucceeded => EventKind::RollbackSucceeded,
            Self::RollbackFailed { .. } => EventKind::RollbackFailed,
        }
    }
}

/// The transition table: `(from, event, to)`. At most one row per `(from, event)` pair.
pub const TRANSITIONS: &[(Phase, EventKind, Phase)] = {
    use EventKind as E;
    use Phase::*;
    &[
        // The happy path.
        (Idle, E::Start, Preparing),
        (Preparing, E::BeginQuiesce, Quiescing),
        (Preparing, E::BeginDump, Dumping), // policy without a quiesce phase
        (Quiescing, E::BeginDump, Dumping),
        (Dumping, E::PreDumpRound, Dumping),
        (Dumping, E::DumpDone, Transferring),
        (Transferring, E::TransferDone, Restoring),
        (Restoring, E::RestoreDone, Resuming),
        (Resuming, E::ResumeDone, Completed),
        // Failure without rollback, from every in-flight phase.
        (Preparing, E::Fail, Failed),
        (Quiescing, E::Fail, Failed),
        (Dumping, E::Fail, Failed),
        (Transferring, E::Fail, Failed),
        (Restoring, E::Fail, Failed),
        (Resuming, E::Fail, Failed),
        // Failure with rollback, from every in-flight phase.
        (Preparing, E::RollBack, RollingBack),
        (Quiescing, E::RollBack, RollingBack),
        (Dumping, E::RollBack, RollingBack),
        (Transferring, E::RollBack, RollingBack),
        (Restoring, E::RollBack, RollingBack),
        (Resuming, E::RollBack, RollingBack),
        // End of a rollback.
        (RollingBack, E::RollbackSucceeded, Failed),
        (RollingBack, E::RollbackFailed, Failed),
    ]
};

/// The phase `event` leads to from `from`, or `None` if the table has no such row.
pub fn next_phase(from: Phase, event: EventKind) -> Option<Phase> {
    TRANSITIONS
        .iter()
        .find(|(f, e, _)| *f == from && *e == event)
        .map(|(_, _, to)| *to)
}

/// Renders [`TRANSITIONS`] as a Graphviz DOT graph (deterministic: rows in table order).
///
/// The checked-in copy is `tests/snapshots/transitions.dot`; `UPDATE_SNAPSHOTS=1 cargo test -p
/// migration-core --test snapshot` rewrites it.
pub fn transition_table_dot() -> String {
    let mut out = String::new();
    out.push_str("// Generated by migration_core::transition_table_dot(); do not edit.\n");
    out.push_str(
        "// Regenerate: UPDATE_SNAPSHOTS=1 cargo test -p migration-core --test snapshot\n",
    );
    out.push_str("digraph migration {\n");
    out.push_str("    rankdir=LR;\n");
    out.push_str("    node [shape=box, style=rounded];\n");
    for phase in Phase::ALL {
        let attrs = if phase.is_terminal() {
            " [shape=doublecircle, style=solid]"
        } else if phase == Phase::Idle {
            " [shape=circle, style=solid]"
        } else {
            ""
        };
        // Writing to a String cannot fail.
        let _ = writeln!(out, "    {phase}{attrs};");
    }
    for (from, event, to) in TRANSITIONS {
        let style = match event {
            EventKind::Fail | EventKind::RollBack | EventKind::RollbackFailed => ", color=red",
            EventKind::RollbackSucceeded => ", color=orange",
            _ => "",
        };
        let _ = writeln!(out, "    {from} -> {to} [label=\"{event}\"{style}];");
    }
    out.push_str("}\n");
    out
}

/// An event the table does not allow in the current phase.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TransitionError {
    /// No row `(phase, event, _)` in [`TRANSITIONS`]; the machine is unchanged.
    #[error("event `{event}` is not allowed in phase `{phase}`")]
    Invalid {
        /// The phase the machine was (and still is) in.
        phase: Phase,
        /// The rejected event's kind.
        event: EventKind,
    },
}

/// What happened to the rollback of a failed migration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
#[non_exhaustive]
pub enum RollbackOutcome {
    /// The migration failed via [`Event::Fail`]; nothing was undone.
    NotAttempted,
    /// The rollback finished; the service runs where it ran before.
    Succeeded,
    /// The rollback failed too.
    Failed {
        /// Why the rollback failed.
        message: String,
    },
}

/// Why a migration ended in [`Phase::Failed`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct FailureReason {
    /// The in-flight phase that failed (never `RollingBack`).
    pub phase: Phase,
    /// Why it failed (from [`Event::Fail`] or [`Event::RollBack`]).
    pub message: String,
    /// Whether a rollback was attempted and how it went.
    pub rollback: RollbackOutcome,
}

impl FailureReason {
    /// `true` if a rollback was attempted and succeeded.
    pub fn rolled_back(&self) -> bool {
        self.rollback == RollbackOutcome::Succeeded
    }
}

/// One migration, driven by the orchestrator's events.
///
/// Never reads a clock: every event comes with `now`. A `now` earlier than the previous event's
/// is clamped to it (a wall clock may step back), so the timeline never goes backwards.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Migration {
    id: MigrationId,
    phase: Phase,
    timeline: Timeline,
    predump_rounds: Vec<PreDumpRecord>,
    image_bytes: Option<u64>,
    /// Set while `RollingBack`: the phase that failed and why.
    rollback_cause: Option<(Phase, String)>,
    failure: Option<FailureReason>,
    downtime: BTreeMap<SessionId, Duration>,
}

impl Migration {
    /// A new migration in [`Phase::Idle`], created at `now`.
    pub fn new(id: MigrationId, now: Timestamp) -> Self {
        Self {
            id,
            phase: Phase::Idle,
            timeline: Timeline::new(now),
            predump_rounds: Vec::new(),
            image_bytes: None,
            rollback_cause: None,
            failure: None,
            downtime: BTreeMap::new(),
        }
    }

    /// This migration's id.
    pub fn id(&self) -> MigrationId {
        self.id
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// `true` once `Completed` or `Failed`.
    pub fn is_terminal(&self) -> bool {
        self.phase.is_terminal()
    }

    /// Whether `event` would be accepted now.
    pub fn accepts(&self, event: EventKind) -> bool {
        next_phase(self.phase, event).is_some()
    }

    /// Why the migration failed; `Some` exactly when the phase is `Failed`.
    pub fn failure(&self) -> Option<&FailureReason> {
        self.failure.as_ref()
    }

    /// Every transition so far.
    pub fn timeline(&self) -> &Timeline {
        &self.timeline
    }

    /// Pre-dump rounds recorded so far.
    pub fn predump_rounds(&self) -> &[PreDumpRecord] {
        &self.predump_rounds
    }

    /// Size of the final image set, if reported with [`Event::DumpDone`].
    pub fn image_bytes(&self) -> Option<u64> {
        self.image_bytes
    }

    /// Client-observed downtimes reported so far.
    pub fn downtimes(&self) -> &BTreeMap<SessionId, Duration> {
        &self.downtime
    }

    /// Applies `event` at `now` and returns the new phase.
    ///
    /// # Errors
    /// [`TransitionError::Invalid`] if the table has no row for (current phase, event kind);
    /// the machine is then left exactly as it was.
    pub fn on_event(&mut self, event: Event, now: Timestamp) -> Result<Phase, TransitionError> {
        let from = self.phase;
        let kind = event.kind();
        let to = next_phase(from, kind).ok_or(TransitionError::Invalid {
            phase: from,
            event: kind,
        })?;
        let at = now.max(self.timeline.last_at());
        match event {
            Event::PreDumpRound { image_bytes } => {
                let round = u32::try_from(self.predump_rounds.len())
                    .unwrap_or(u32::MAX)
                    .saturating_add(1);
                self.predump_rounds.push(PreDumpRecord {
                    round,
                    image_bytes,
                    at,
                });
            }
            Event::DumpDone { image_bytes } => self.image_bytes = image_bytes,
            Event::Fail { reason } => {
                self.failure = Some(FailureReason {
                    phase: from,
                    message: reason,
                    rollback: RollbackOutcome::NotAttempted,
                });
            }
            Event::RollBack { reason } => self.rollback_cause = Some((from, reason)),
            Event::RollbackSucceeded => self.finish_rollback(RollbackOutcome::Succeeded),
            Event::RollbackFailed { reason } => {
                self.finish_rollback(RollbackOutcome::Failed { message: reason });
            }
            Event::Start
            | Event::BeginQuiesce
            | Event::BeginDump
            | Event::TransferDone
            | Event::RestoreDone
            | Event::ResumeDone => {}
        }
        self.timeline.push(TransitionRecord {
            from,
            to,
            event: kind,
            at,
        });
        self.phase = to;
        Ok(to)
    }

    fn finish_rollback(&mut self, rollback: RollbackOutcome) {
        // The table only reaches RollingBack through `RollBack`, which sets the cause; the
        // fallback keeps this total without a panic.
        let (phase, message) = self
            .rollback_cause
            .take()
            .unwrap_or((Phase::RollingBack, String::new()));
        self.failure = Some(FailureReason {
            phase,
            message,
            rollback,
        });
    }

    /// Records the downtime a client observed (last reply before -> first reply after).
    /// Accepted in any phase (clients report after the fact); returns the value it replaces.
    pub fn report_downtime(&mut self, session: SessionId, downtime: Duration) -> Option<Duration> {
        self.downtime.insert(session, downtime)
    }

    /// The report so far (fields not yet measured are `None`).
    pub fn report(&self) -> MigrationReport {
        MigrationReport::new(
            self.id,
            self.phase,
            self.failure.clone(),
            &self.timeline,
            &self.predump_rounds,
            self.image_bytes,
            &self.downtime,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeSet, VecDeque};

    fn id() -> MigrationId {
        MigrationId::from_bytes([7; 16])
    }

    fn t(ms: u64) -> Timestamp {
        Timestamp::from_millis(ms)
    }

    /// An event of `kind` with some payload.
    fn event_of(kind: EventKind, n: u64) -> Event {
        match kind {
            EventKind::Start => Event::Start,
            EventKind::BeginQuiesce => Event::BeginQuiesce,
            EventKind::BeginDump => Event::BeginDump,
            EventKind::PreDumpRound => Event::PreDumpRound { image_bytes: n },
            EventKind::DumpDone => Event::DumpDone {
                image_bytes: Some(n),
            },
            EventKind::TransferDone => Event::TransferDone,
            EventKind::RestoreDone => Event::RestoreDone,
            EventKind::ResumeDone => Event::ResumeDone,
            EventKind::Fail => Event::Fail {
                reason: format!("fail {n}"),
            },
            EventKind::RollBack => Event::RollBack {
                reason: format!("rb {n}"),
            },
            EventKind::RollbackSucceeded => Event::RollbackSucceeded,
            EventKind::RollbackFailed => Event::RollbackFailed {
                reason: format!("rbf {n}"),
            },
        }
    }

    #[test]
    fn table_is_deterministic() {
        let mut seen = BTreeSet::new();
        for (from, event, _) in TRANSITIONS {
            assert!(seen.insert((*from, *event)), "duplicate row {from} {event}");
        }
    }

    #[test]
    fn nothing_leaves_a_terminal_phase() {
        assert!(TRANSITIONS.iter().all(|(from, _, _)| !from.is_terminal()));
    }

    #[test]
    fn fail_and_rollback_from_every_in_flight_phase() {
        for phase in Phase::ALL.into_iter().filter(|p| p.is_in_flight()) {
            assert_eq!(next_phase(phase, EventKind::Fail), Some(Phase::Failed));
            assert_eq!(
                next_phase(phase, EventKind::RollBack),
                Some(Phase::RollingBack)
            );
        }
        for phase in Phase::ALL.into_iter().filter(|p| !p.is_in_flight()) {
            assert_eq!(next_phase(phase, EventKind::Fail), None, "{phase}");
            assert_eq!(next_phase(phase, EventKind::RollBack), None, "{phase}");
        }
    }

    #[test]
    fn every_phase_reachable_and_every_kind_used() {
        let mut reached = BTreeSet::from([Phase::Idle]);
        let mut queue = VecDeque::from([Phase::Idle]);
        while let Some(p) = queue.pop_front() {
            for (_, _, to) in TRANSITIONS.iter().filter(|(f, _, _)| *f == p) {
                if reached.insert(*to) {
                    queue.push_back(*to);
                }
            }
        }
        assert_eq!(reached.len(), Phase::ALL.len());
        for kind in EventKind::ALL {
            assert!(TRANSITIONS.iter().any(|(_, e, _)| *e == kind), "{kind}");
        }
    }

    #[test]
    fn every_non_terminal_phase_can_terminate() {
        for start in Phase::ALL {
            let mut reached = BTreeSet::from([start]);
            let mut queue = VecDeque::from([start]);
            while let Some(p) = queue.pop_front() {
                for (_, _, to) in TRANSITIONS.iter().filter(|(f, _, _)| *f == p) {
                    if reached.insert(*to) {
                        queue.push_back(*to);
                    }
                }
            }
            assert!(reached.iter().any(|p| p.is_terminal()), "{start}");
        }
    }

    #[test]
    fn happy_path_with_quiesce() {
        let mut m = Migration::new(id(), t(0));
        let steps = [
            (Event::Start, Phase::Preparing),
            (Event::BeginQuiesce, Phase::Quiescing),
            (Event::BeginDump, Phase::Dumping),
            (Event::DumpDone { image_bytes: None }, Phase::Transferring),
            (Event::TransferDone, Phase::Restoring),
            (Event::RestoreDone, Phase::Resuming),
            (Event::ResumeDone, Phase::Completed),
        ];
        for (i, (event, expect)) in steps.into_iter().enumerate() {
            assert_eq!(m.on_event(event, t(i as u64 * 10)), Ok(expect));
        }
        assert!(m.is_terminal());
        assert_eq!(m.failure(), None);
        assert_eq!(m.timeline().records().len(), 7);
    }

    #[test]
    fn preparing_may_skip_quiesce() {
        let mut m = Migration::new(id(), t(0));
        m.on_event(Event::Start, t(1)).unwrap();
        assert_eq!(m.on_event(Event::BeginDump, t(2)), Ok(Phase::Dumping));
    }

    #[test]
    fn predump_rounds_stay_in_dumping_and_are_recorded() {
        let mut m = Migration::new(id(), t(0));
        m.on_event(Event::Start, t(1)).unwrap();
        m.on_event(Event::BeginDump, t(2)).unwrap();
        assert_eq!(
            m.on_event(Event::PreDumpRound { image_bytes: 100 }, t(3)),
            Ok(Phase::Dumping)
        );
        assert_eq!(
            m.on_event(Event::PreDumpRound { image_bytes: 40 }, t(4)),
            Ok(Phase::Dumping)
        );
        m.on_event(
            Event::DumpDone {
                image_bytes: Some(500),
            },
            t(5),
        )
        .unwrap();
        let rounds: Vec<_> = m
            .predump_rounds()
            .iter()
            .map(|r| (r.round, r.image_bytes, r.at))
            .collect();
        assert_eq!(rounds, vec![(1, 100, t(3)), (2, 40, t(4))]);
        assert_eq!(m.image_bytes(), Some(500));
    }

    #[test]
    fn invalid_event_names_phase_and_event_and_changes_nothing() {
        let mut m = Migration::new(id(), t(0));
        m.on_event(Event::Start, t(1)).unwrap();
        let before = m.clone();
        let err = m
            .on_event(Event::DumpDone { image_bytes: None }, t(2))
            .unwrap_err();
        assert_eq!(
            err,
            TransitionError::Invalid {
                phase: Phase::Preparing,
                event: EventKind::DumpDone
            }
        );
        assert_eq!(
            err.to_string(),
            "event `dump_done` is not allowed in phase `preparing`"
        );
        assert_eq!(m, before);
    }

    #[test]
    fn fail_from_idle_is_invalid() {
        let mut m = Migration::new(id(), t(0));
        assert_eq!(
            m.on_event(Event::Fail { reason: "x".into() }, t(1)),
            Err(TransitionError::Invalid {
                phase: Phase::Idle,
                event: EventKind::Fail
            })
        );
    }

    #[test]
    fn nothing_accepted_after_completed() {
        let mut m = Migration::new(id(), t(0));
        for e in [
            Event::Start,
            Event::BeginDump,
            Event::DumpDone { image_bytes: None },
            Event::TransferDone,
            Event::RestoreDone,
            Event::ResumeDone,
        ] {
            m.on_event(e, t(1)).unwrap();
        }
        for kind in EventKind::ALL {
            assert_eq!(
                m.on_event(event_of(kind, 1), t(2)),
                Err(TransitionError::Invalid {
                    phase: Phase::Completed,
                    event: kind
                })
            );
        }
    }

    #[test]
    fn fail_records_reason_without_rollback() {
        let mut m = Migration::new(id(), t(0));
        m.on_event(Event::Start, t(1)).unwrap();
        m.on_event(Event::BeginDump, t(2)).unwrap();
        m.on_event(
            Event::Fail {
                reason: "criu dump: exit 1".into(),
            },
            t(3),
        )
        .unwrap();
        let f = m.failure().unwrap();
        assert_eq!(f.phase, Phase::Dumping);
        assert_eq!(f.message, "criu dump: exit 1");
        assert_eq!(f.rollback, RollbackOutcome::NotAttempted);
        assert!(!f.rolled_back());
    }

    #[test]
    fn rollback_success_records_failed_phase() {
        let mut m = Migration::new(id(), t(0));
        for e in [
            Event::Start,
            Event::BeginDump,
            Event::DumpDone { image_bytes: None },
            Event::TransferDone,
        ] {
            m.on_event(e, t(1)).unwrap();
        }
        m.on_event(
            Event::RollBack {
                reason: "restore failed".into(),
            },
            t(2),
        )
        .unwrap();
        assert_eq!(m.phase(), Phase::RollingBack);
        assert_eq!(m.failure(), None);
        assert_eq!(
            m.on_event(Event::RollbackSucceeded, t(3)),
            Ok(Phase::Failed)
        );
        let f = m.failure().unwrap();
        assert_eq!(f.phase, Phase::Restoring);
        assert_eq!(f.message, "restore failed");
        assert!(f.rolled_back());
    }

    #[test]
    fn rollback_failure_is_recorded() {
        let mut m = Migration::new(id(), t(0));
        m.on_event(Event::Start, t(1)).unwrap();
        m.on_event(
            Event::RollBack {
                reason: "no ack".into(),
            },
            t(2),
        )
        .unwrap();
        m.on_event(
            Event::RollbackFailed {
                reason: "source gone".into(),
            },
            t(3),
        )
        .unwrap();
        assert_eq!(
            m.failure(),
            Some(&FailureReason {
                phase: Phase::Preparing,
                message: "no ack".into(),
                rollback: RollbackOutcome::Failed {
                    message: "source gone".into()
                },
            })
        );
    }

    #[test]
    fn clock_stepping_back_is_clamped() {
        let mut m = Migration::new(id(), t(100));
        m.on_event(Event::Start, t(50)).unwrap();
        m.on_event(Event::BeginDump, t(200)).unwrap();
        m.on_event(Event::Fail { reason: "x".into() }, t(150))
            .unwrap();
        let ats: Vec<_> = m.timeline().records().iter().map(|r| r.at).collect();
        assert_eq!(ats, vec![t(100), t(200), t(200)]);
    }

    #[test]
    fn dot_lists_every_row() {
        let dot = transition_table_dot();
        assert!(dot.starts_with("// Generated"));
        assert!(dot.contains("digraph migration {"));
        for (from, event, to) in TRANSITIONS {
            assert!(
                dot.contains(&format!("{from} -> {to} [label=\"{event}\"")),
                "{from} {event} {to}"
            );
        }
        assert_eq!(dot.matches(" -> ").count(), TRANSITIONS.len());
    }

    /// One step of a generated run: either a valid event for the current phase (picked by
    /// `pick` among the table's rows) or an arbitrary one.
    #[derive(Debug, Clone)]
    struct Step {
        valid: bool,
        pick: usize,
        kind: usize,
        payload: u64,
        advance_ms: u64,
    }

    fn steps() -> impl Strategy<Value = Vec<Step>> {
        proptest::collection::vec(
            (
                proptest::bool::weighted(0.7),
                any::<usize>(),
                0..EventKind::ALL.len(),
                any::<u64>(),
                0u64..50,
            )
                .prop_map(|(valid, pick, kind, payload, advance_ms)| Step {
                    valid,
                    pick,
                    kind,
                    payload,
                    advance_ms,
                }),
            0..40,
        )
    }

    fn choose(m: &Migration, s: &Step) -> Event {
        let rows: Vec<_> = TRANSITIONS
            .iter()
            .filter(|(f, _, _)| *f == m.phase())
            .collect();
        let kind = if s.valid && !rows.is_empty() {
            rows[s.pick % rows.len()].1
        } else {
            EventKind::ALL[s.kind]
        };
        event_of(kind, s.payload)
    }

    proptest! {
        #[test]
        fn any_event_sequence_keeps_the_machine_consistent(steps in steps()) {
            let mut now = t(1_000);
            let mut m = Migration::new(id(), now);
            for s in &steps {
                now = now + Duration::from_millis(s.advance_ms);
                let event = choose(&m, s);
                let kind = event.kind();
                let before = m.clone();
                match m.on_event(event, now) {
                    Ok(to) => {
                        prop_assert!(!before.is_terminal(), "accepted {kind} after {}", before.phase());
                        prop_assert!(TRANSITIONS.contains(&(before.phase(), kind, to)));
                        prop_assert_eq!(m.phase(), to);
                        let recs = m.timeline().records();
                        prop_assert_eq!(recs.len(), before.timeline().records().len() + 1);
                        let last = recs.last().unwrap();
                        prop_assert_eq!((last.from, last.event, last.to, last.at), (before.phase(), kind, to, now));
                    }
                    Err(TransitionError::Invalid { phase, event }) => {
                        prop_assert_eq!(phase, before.phase());
                        prop_assert_eq!(event, kind);
                        prop_assert!(next_phase(phase, event).is_none());
                        prop_assert_eq!(&m, &before);
                    }
                }
                prop_assert!(Phase::ALL.contains(&m.phase()));
                prop_assert_eq!(m.failure().is_some(), m.phase() == Phase::Failed);
                let ats: Vec<_> = m.timeline().records().iter().map(|r| r.at).collect();
                prop_assert!(ats.windows(2).all(|w| w[0] <= w[1]));
                prop_assert!(ats.first().is_none_or(|a| *a >= m.timeline().created_at()));
            }
            if m.is_terminal() {
                match m.phase() {
                    Phase::Completed => prop_assert!(m.failure().is_none()),
                    Phase::Failed => {
                        let f = m.failure().unwrap();
                        prop_assert!(f.phase.is_in_flight());
                        prop_assert!(f.message.starts_with("fail") || f.message.starts_with("rb"));
                    }
                    other => prop_assert!(false, "terminal {other}"),
                }
                let report = m.report();
                prop_assert!(report.finished_at.is_some());
                prop_assert!(report.total.is_some());
            }
        }

        #[test]
        fn timeline_never_goes_backwards_even_if_now_does(
            times in proptest::collection::vec(any::<u64>(), 1..20),
            picks in proptest::collection::vec(any::<usize>(), 20),
        ) {
            let mut m = Migration::new(id(), Timestamp::from_micros(times[0]));
            for (i, micros) in times.iter().enumerate() {
                let rows: Vec<_> = TRANSITIONS.iter().filter(|(f, _, _)| *f == m.phase()).collect();
                if rows.is_empty() { break; }
                let kind = rows[picks[i] % rows.len()].1;
                m.on_event(event_of(kind, 1), Timestamp::from_micros(*micros)).unwrap();
            }
            let ats: Vec<_> = m.timeline().records().iter().map(|r| r.at).collect();
            prop_assert!(ats.windows(2).all(|w| w[0] <= w[1]));
        }
    }
}
