//! Migration policy: deadlines, pre-dump rounds and what to do when a phase fails.
//!
//! Pure decisions only: [`PreDumpPolicy::next_step`] says whether to take another CRIU pre-dump
//! round, [`MigrationPolicy::on_failure`] what to do when a phase fails.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::machine::{Event, Phase};
use crate::time::micros;

/// Upper bound on [`PreDumpPolicy::max_rounds`] accepted by `validate`.
pub const MAX_PREDUMP_ROUNDS: u32 = 64;

/// How one migration is run. Serialized with durations in microseconds (`*_us`); missing
/// fields take their [`Default`] values.
///
/// Deliberately exhaustive (public fields) so callers can build it with struct-update syntax.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MigrationPolicy {
    /// How long clients have to ack the migration notice.
    #[serde(rename = "ack_deadline_us", with = "micros")]
    pub ack_deadline: Duration,
    /// Whether to ask clients to stop sending before the dump (`Quiescing` phase).
    pub quiesce: bool,
    /// How long clients have to confirm quiescing (ignored when `quiesce` is false).
    #[serde(rename = "quiesce_deadline_us", with = "micros")]
    pub quiesce_deadline: Duration,
    /// Iterative pre-copy.
    pub predump: PreDumpPolicy,
    /// Whether a failed phase is rolled back (see [`MigrationPolicy::on_failure`]).
    pub rollback_on_failure: bool,
}

impl Default for MigrationPolicy {
    /// 2 s to ack, quiesce with 1 s to confirm, default pre-dump policy, roll back on failure.
    fn default() -> Self {
        Self {
            ack_deadline: Duration::from_secs(2),
            quiesce: true,
            quiesce_deadline: Duration::from_secs(1),
            predump: PreDumpPolicy::default(),
            rollback_on_failure: true,
        }
    }
}

/// When to stop CRIU pre-dump rounds and take the final (freezing) dump.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PreDumpPolicy {
    /// Most pre-dump rounds before the final dump; 0 disables pre-dump.
    pub max_rounds: u32,
    /// Stop once a round writes at most this many bytes.
    pub converge_below_bytes: u64,
    /// Stop unless each round shrinks by at least this fraction of the previous one
    /// (`1 - last/prev >= min_shrink_ratio`), in `0.0..=1.0`.
    pub min_shrink_ratio: f64,
}

impl Default for PreDumpPolicy {
    /// At most 3 rounds, converged below 1 MiB, each round at least 25 % smaller.
    fn default() -> Self {
        Self {
            max_rounds: 3,
            converge_below_bytes: 1 << 20,
            min_shrink_ratio: 0.25,
        }
    }
}

/// A policy value that cannot work.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// `ack_deadline` is zero: no client could ever ack.
    #[error("ack deadline must be greater than zero")]
    ZeroAckDeadline,
    /// `quiesce` is on and `quiesce_deadline` is zero.
    #[error("quiesce deadline must be greater than zero when quiescing")]
    ZeroQuiesceDeadline,
    /// `min_shrink_ratio` is NaN, infinite or outside `0.0..=1.0`.
    #[error("min shrink ratio must be within 0.0..=1.0, got {0}")]
    InvalidShrinkRatio(f64),
    /// `max_rounds` is above [`MAX_PREDUMP_ROUNDS`].
    #[error("at most {limit} pre-dump rounds are allowed, got {max_rounds}")]
    TooManyRounds {
        /// The configured value.
        max_rounds: u32,
        /// [`MAX_PREDUMP_ROUNDS`].
        limit: u32,
    },
}

impl MigrationPolicy {
    /// Checks the policy.
    ///
    /// # Errors
    /// The first problem found, as a [`PolicyError`].
    pub fn validate(&self) -> Result<(), PolicyError> {
        if self.ack_deadline.is_zero() {
            return Err(PolicyError::ZeroAckDeadline);
        }
        if self.quiesce && self.quiesce_deadline.is_zero() {
            return Err(PolicyError::ZeroQuiesceDeadline);
        }
        self.predump.validate()
    }

    /// What the orchestrator should do when `phase` fails.
    ///
    /// | failed phase                      | recovery                                   |
    /// |-----------------------------------|--------------------------------------------|
    /// | Idle, Preparing, Quiescing, Dumping | `ResumeSource`: the source process still runs (a failed CRIU dump leaves it running); tell clients to carry on |
    /// | Transferring, Restoring           | `RestoreOnSource`: the source was dumped; restore the images on the source |
    /// | Resuming                          | `Abort`: the restored process runs on the target; undoing it would be another migration |
    /// | RollingBack, Completed, Failed    | `Abort`: nothing left to undo              |
    ///
    /// With `rollback_on_failure == false` every phase gives `Abort`.
    pub fn on_failure(&self, phase: Phase) -> Recovery {
        if !self.rollback_on_failure {
            return Recovery::Abort;
        }
        match phase {
            Phase::Idle | Phase::Preparing | Phase::Quiescing | Phase::Dumping => {
                Recovery::ResumeSource
            }
            Phase::Transferring | Phase::Restoring => Recovery::RestoreOnSource,
            Phase::Resuming | Phase::RollingBack | Phase::Completed | Phase::Failed => {
                Recovery::Abort
            }
        }
    }
}

impl PreDumpPolicy {
    /// Checks the pre-dump settings.
    ///
    /// # Errors
    /// [`PolicyError::InvalidShrinkRatio`], [`PolicyError::TooManyRounds`].
    pub fn validate(&self) -> Result<(), PolicyError> {
        if !(0.0..=1.0).contains(&self.min_shrink_ratio) {
            // Also catches NaN: `contains` is false for it.
            return Err(PolicyError::InvalidShrinkRatio(self.min_shrink_ratio));
        }
        if self.max_rounds > MAX_PREDUMP_ROUNDS {
            return Err(PolicyError::TooManyRounds {
                max_rounds: self.max_rounds,
                limit: MAX_PREDUMP_ROUNDS,
            });
        }
        Ok(())
    }

    /// Whether to take another pre-dump round, given `rounds_done` so far and the sizes of the
    /// last two rounds. Checked in this order: pre-dump disabled (`max_rounds == 0`), no dirty
    /// memory tracking on this kernel (CRIU's pre-dump cannot work, see notes/criu-podman.md),
    /// converged, not shrinking, round limit reached.
    pub fn next_step(
        &self,
        rounds_done: u32,
        last_round_bytes: Option<u64>,
        prev_round_bytes: Option<u64>,
        dirty_tracking_supported: bool,
    ) -> PreDumpDecision {
        use FinalDumpReason as R;
        if self.max_rounds == 0 {
            return PreDumpDecision::FinalDump(R::Disabled);
        }
        if !dirty_tracking_supported {
            return PreDumpDecision::FinalDump(R::NoDirtyTracking);
        }
        if let Some(last) = last_round_bytes {
            if last <= self.converge_below_bytes {
                return PreDumpDecision::FinalDump(R::Converged);
            }
            if let Some(prev) = prev_round_bytes {
                // last > converge_below_bytes >= 0 here, so last > 0.
                let shrink = if prev == 0 {
                    f64::NEG_INFINITY
                } else {
                    1.0 - last as f64 / prev as f64
                };
                if shrink < self.min_shrink_ratio {
                    return PreDumpDecision::FinalDump(R::NotShrinking);
                }
            }
        }
        if rounds_done >= self.max_rounds {
            return PreDumpDecision::FinalDump(R::MaxRounds);
        }
        PreDumpDecision::Another
    }
}

/// The answer of [`PreDumpPolicy::next_step`].
///
/// Deliberately exhaustive: there are exactly two things to do next.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PreDumpDecision {
    /// Take another pre-dump round (the process keeps running).
    Another,
    /// Take the final dump now.
    FinalDump(FinalDumpReason),
}

/// Why pre-dumping stops.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum FinalDumpReason {
    /// `max_rounds` is 0.
    Disabled,
    /// The kernel does not track dirty memory, so CRIU cannot pre-dump.
    NoDirtyTracking,
    /// The last round wrote at most `converge_below_bytes`.
    Converged,
    /// The last round did not shrink by `min_shrink_ratio`.
    NotShrinking,
    /// `max_rounds` rounds done.
    MaxRounds,
}

/// What the orchestrator should do after a phase failed (see [`MigrationPolicy::on_failure`]).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Recovery {
    /// The source process still runs: tell clients to carry on with it.
    ResumeSource,
    /// The source was dumped: restore its images on the source host.
    RestoreOnSource,
    /// Stop and report; nothing is undone.
    Abort,
}

impl Recovery {
    /// The event to feed the state machine for this recovery: [`Event::Fail`] for `Abort`,
    /// [`Event::RollBack`] otherwise.
    pub fn failure_event(self, reason: impl Into<String>) -> Event {
        let reason = reason.into();
        match self {
            Self::Abort => Event::Fail { reason },
            Self::ResumeSource | Self::RestoreOnSource => Event::RollBack { reason },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MIB: u64 = 1 << 20;

    fn policy() -> PreDumpPolicy {
        PreDumpPolicy {
            max_rounds: 3,
            converge_below_bytes: MIB,
            min_shrink_ratio: 0.25,
        }
    }

    #[test]
    fn default_is_valid() {
        assert_eq!(MigrationPolicy::default().validate(), Ok(()));
    }

    #[test]
    fn zero_ack_deadline_is_invalid() {
        let p = MigrationPolicy {
            ack_deadline: Duration::ZERO,
            ..MigrationPolicy::default()
        };
        assert_eq!(p.validate(), Err(PolicyError::ZeroAckDeadline));
    }

    #[test]
    fn zero_quiesce_deadline_is_invalid_only_when_quiescing() {
        let p = MigrationPolicy {
            quiesce_deadline: Duration::ZERO,
            ..MigrationPolicy::default()
        };
        assert_eq!(p.validate(), Err(PolicyError::ZeroQuiesceDeadline));
        let p = MigrationPolicy {
            quiesce: false,
            ..p
        };
        assert_eq!(p.validate(), Ok(()));
    }

    #[test]
    fn shrink_ratio_out_of_range_is_invalid() {
        for bad in [-0.1, 1.5, f64::INFINITY] {
            let p = PreDumpPolicy {
                min_shrink_ratio: bad,
                ..policy()
            };
            assert_eq!(p.validate(), Err(PolicyError::InvalidShrinkRatio(bad)));
        }
    }

    #[test]
    fn nan_shrink_ratio_is_invalid() {
        let p = MigrationPolicy {
            predump: PreDumpPolicy {
                min_shrink_ratio: f64::NAN,
                ..policy()
            },
            ..MigrationPolicy::default()
        };
        assert!(matches!(
            p.validate(),
            Err(PolicyError::InvalidShrinkRatio(r)) if r.is_nan()
        ));
    }

    #[test]
    fn too_many_rounds_is_invalid() {
        let p = PreDumpPolicy {
            max_rounds: MAX_PREDUMP_ROUNDS + 1,
            ..policy()
        };
        assert_eq!(
            p.validate(),
            Err(PolicyError::TooManyRounds {
                max_rounds: 65,
                limit: 64
            })
        );
    }

    #[test]
    fn next_step_disabled() {
        let p = PreDumpPolicy {
            max_rounds: 0,
            ..policy()
        };
        assert_eq!(
            p.next_step(0, None, None, true),
            PreDumpDecision::FinalDump(FinalDumpReason::Disabled)
        );
    }

    #[test]
    fn next_step_without_dirty_tracking() {
        assert_eq!(
            policy().next_step(0, None, None, false),
            PreDumpDecision::FinalDump(FinalDumpReason::NoDirtyTracking)
        );
    }

    #[test]
    fn next_step_first_round() {
        assert_eq!(
            policy().next_step(0, None, None, true),
            PreDumpDecision::Another
        );
    }

    #[test]
    fn next_step_converged() {
        assert_eq!(
            policy().next_step(1, Some(MIB), None, true),
            PreDumpDecision::FinalDump(FinalDumpReason::Converged)
        );
    }

    #[test]
    fn next_step_not_shrinking() {
        // 100 -> 80 MiB is a 20 % shrink, below 25 %.
        assert_eq!(
            policy().next_step(2, Some(80 * MIB), Some(100 * MIB), true),
            PreDumpDecision::FinalDump(FinalDumpReason::NotShrinking)
        );
        // Growth from zero is not shrinking either.
        assert_eq!(
            policy().next_step(2, Some(80 * MIB), Some(0), true),
            PreDumpDecision::FinalDump(FinalDumpReason::NotShrinking)
        );
    }

    #[test]
    fn next_step_shrinking_continues() {
        assert_eq!(
            policy().next_step(2, Some(50 * MIB), Some(100 * MIB), true),
            PreDumpDecision::Another
        );
    }

    #[test]
    fn next_step_max_rounds() {
        assert_eq!(
            policy().next_step(3, Some(50 * MIB), Some(100 * MIB), true),
            PreDumpDecision::FinalDump(FinalDumpReason::MaxRounds)
        );
    }

    #[test]
    fn on_failure_table() {
        let p = MigrationPolicy::default();
        let expect = [
            (Phase::Idle, Recovery::ResumeSource),
            (Phase::Preparing, Recovery::ResumeSource),
            (Phase::Quiescing, Recovery::ResumeSource),
            (Phase::Dumping, Recovery::ResumeSource),
            (Phase::Transferring, Recovery::RestoreOnSource),
            (Phase::Restoring, Recovery::RestoreOnSource),
            (Phase::Resuming, Recovery::Abort),
            (Phase::Completed, Recovery::Abort),
            (Phase::RollingBack, Recovery::Abort),
            (Phase::Failed, Recovery::Abort),
        ];
        for (phase, recovery) in expect {
            assert_eq!(p.on_failure(phase), recovery, "{phase}");
        }
        let no_rollback = MigrationPolicy {
            rollback_on_failure: false,
            ..p
        };
        for phase in Phase::ALL {
            assert_eq!(no_rollback.on_failure(phase), Recovery::Abort);
        }
    }

    #[test]
    fn recovery_event_is_accepted_by_the_machine() {
        use crate::machine::{Migration, next_phase};
        let p = MigrationPolicy::default();
        for phase in Phase::ALL.into_iter().filter(|p| p.is_in_flight()) {
            let event = p.on_failure(phase).failure_event("boom");
            assert!(next_phase(phase, event.kind()).is_some(), "{phase}");
        }
        let mut m = Migration::new(crate::MigrationId::from_bytes([0; 16]), Default::default());
        m.on_event(Event::Start, Default::default()).unwrap();
        assert_eq!(
            m.on_event(Recovery::Abort.failure_event("x"), Default::default()),
            Ok(Phase::Failed)
        );
    }

    #[test]
    fn policy_json_uses_microseconds_and_defaults() {
        let p: MigrationPolicy =
            serde_json::from_str(r#"{"ack_deadline_us": 500000, "quiesce": false}"#).unwrap();
        assert_eq!(p.ack_deadline, Duration::from_millis(500));
        assert!(!p.quiesce);
        assert_eq!(p.predump, PreDumpPolicy::default());
        assert!(p.rollback_on_failure);
        assert!(serde_json::from_str::<MigrationPolicy>(r#"{"quiesce": 3}"#).is_err());
    }

    fn arb_policy() -> impl Strategy<Value = MigrationPolicy> {
        (
            any::<u64>(),
            any::<bool>(),
            any::<u64>(),
            any::<u32>(),
            any::<u64>(),
            0.0f64..=1.0,
            any::<bool>(),
        )
            .prop_map(
                |(ack, quiesce, qd, rounds, conv, ratio, rb)| MigrationPolicy {
                    ack_deadline: Duration::from_micros(ack),
                    quiesce,
                    quiesce_deadline: Duration::from_micros(qd),
                    predump: PreDumpPolicy {
                        max_rounds: rounds,
                        converge_below_bytes: conv,
                        min_shrink_ratio: ratio,
                    },
                    rollback_on_failure: rb,
                },
            )
    }

    proptest! {
        #[test]
        fn policy_json_round_trip(p in arb_policy()) {
            let back: MigrationPolicy = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
            prop_assert_eq!(back, p);
        }

        #[test]
        fn policy_decoder_never_panics(s in any::<String>()) {
            if let Ok(p) = serde_json::from_str::<MigrationPolicy>(&s) {
                // Whatever parsed must validate or fail with a typed error, without panicking.
                let _ = p.validate();
            }
        }

        #[test]
        fn next_step_respects_max_rounds(
            rounds in 0u32..10,
            last in proptest::option::of(any::<u64>()),
            prev in proptest::option::of(any::<u64>()),
            dirty in any::<bool>(),
        ) {
            let p = policy();
            if p.next_step(rounds, last, prev, dirty) == PreDumpDecision::Another {
                prop_assert!(dirty);
                prop_assert!(rounds < p.max_rounds);
                prop_assert!(last.is_none_or(|l| l > p.converge_below_bytes));
            }
        }
    }
}
