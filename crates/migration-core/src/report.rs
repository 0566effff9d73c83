//! What a migration recorded: the [`Timeline`] of transitions and the [`MigrationReport`]
//! derived from it (serde, for the orchestrator's JSON output).
//!
//! Durations are serialized as whole microseconds in fields suffixed `_us`; everything not
//! measured is `None` (`null` in JSON).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::id::{MigrationId, SessionId};
use crate::machine::{EventKind, FailureReason, Phase};
use crate::time::{Timestamp, micros};

/// One accepted transition.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransitionRecord {
    /// Phase before the event.
    pub from: Phase,
    /// Phase after the event (equal to `from` for a pre-dump round).
    pub to: Phase,
    /// The event's kind.
    pub event: EventKind,
    /// When it happened (the caller's `now`, clamped to be non-decreasing).
    pub at: Timestamp,
}

/// One CRIU pre-dump round.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreDumpRecord {
    /// 1-based round number.
    pub round: u32,
    /// Bytes written by this round.
    pub image_bytes: u64,
    /// When the round finished.
    pub at: Timestamp,
}

/// Every transition of one migration, in order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timeline {
    created_at: Timestamp,
    records: Vec<TransitionRecord>,
}

impl Timeline {
    pub(crate) fn new(created_at: Timestamp) -> Self {
        Self {
            created_at,
            records: Vec::new(),
        }
    }

    pub(crate) fn push(&mut self, record: TransitionRecord) {
        self.records.push(record);
    }

    /// When the migration was created (entered `Idle`).
    pub fn created_at(&self) -> Timestamp {
        self.created_at
    }

    /// Time of the last transition, or the creation time.
    pub fn last_at(&self) -> Timestamp {
        self.records.last().map_or(self.created_at, |r| r.at)
    }

    /// The transitions, oldest first.
    pub fn records(&self) -> &[TransitionRecord] {
        &self.records
    }

    /// When `phase` was first entered from another phase (`Idle`: the creation time).
    pub fn entered(&self, phase: Phase) -> Option<Timestamp> {
        if phase == Phase::Idle {
            return Some(self.created_at);
        }
        self.records
            .iter()
            .find(|r| r.to == phase && r.from != phase)
            .map(|r| r.at)
    }

    /// The phases visited, with start and end. Self-transitions (pre-dump rounds) do not split
    /// a span. The current phase has `end: None` unless it is terminal, in which case its span
    /// is empty (`end == start`).
    pub fn spans(&self) -> Vec<PhaseSpan> {
        let mut spans = vec![PhaseSpan {
            phase: Phase::Idle,
            start: self.created_at,
            end: None,
        }];
        for r in self.records.iter().filter(|r| r.from != r.to) {
            if let Some(last) = spans.last_mut() {
                last.end = Some(r.at);
            }
            spans.push(PhaseSpan {
                phase: r.to,
                start: r.at,
                end: r.to.is_terminal().then_some(r.at),
            });
        }
        spans
    }
}

/// One visit to a phase.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhaseSpan {
    /// The phase.
    pub phase: Phase,
    /// When it was entered.
    pub start: Timestamp,
    /// When it was left; `None` while it is the current, non-terminal phase.
    pub end: Option<Timestamp>,
}

impl PhaseSpan {
    /// `end - start`, if ended.
    pub fn duration(&self) -> Option<Duration> {
        self.end.map(|e| e.saturating_duration_since(self.start))
    }
}

/// Downtime one client observed.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionDowntime {
    /// The client session.
    pub session: SessionId,
    /// Last reply before the migration -> first reply after it.
    #[serde(rename = "downtime_us", with = "micros")]
    pub downtime: Duration,
}

/// The outcome and timings of one migration, as the orchestrator prints it (JSON via serde).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct MigrationReport {
    /// Which migration.
    pub migration_id: MigrationId,
    /// The phase when the report was taken (`completed` or `failed` once finished).
    pub final_phase: Phase,
    /// Why it failed, when `final_phase` is `failed`.
    #[serde(default)]
    pub failure: Option<FailureReason>,
    /// When the migration was created.
    pub created_at: Timestamp,
    /// When a terminal phase was entered.
    #[serde(default)]
    pub finished_at: Option<Timestamp>,
    /// Every phase visited, in order.
    pub phases: Vec<PhaseSpan>,
    /// Process frozen: start of the final dump (after the last pre-dump round, else entering
    /// `Dumping`) -> entering `Resuming` (restored process running).
    #[serde(rename = "freeze_time_us", with = "micros::option", default)]
    pub freeze_time: Option<Duration>,
    /// Start of the final dump -> entering `Transferring`.
    #[serde(rename = "dump_time_us", with = "micros::option", default)]
    pub dump_time: Option<Duration>,
    /// Entering `Transferring` -> entering `Restoring`.
    #[serde(rename = "transfer_time_us", with = "micros::option", default)]
    pub transfer_time: Option<Duration>,
    /// Entering `Restoring` -> entering `Resuming`.
    #[serde(rename = "restore_time_us", with = "micros::option", default)]
    pub restore_time: Option<Duration>,
    /// Entering `Preparing` -> entering a terminal phase.
    #[serde(rename = "total_us", with = "micros::option", default)]
    pub total: Option<Duration>,
    /// Size of the final image set, if reported.
    #[serde(default)]
    pub image_bytes: Option<u64>,
    /// Pre-dump rounds, in order.
    #[serde(default)]
    pub predump_rounds: Vec<PreDumpRecord>,
    /// Per-client downtime, sorted by session (truncated to whole microseconds).
    #[serde(default)]
    pub client_downtime: Vec<SessionDowntime>,
    /// Median of `client_downtime` (mean of the two middle values for an even count,
    /// truncated to whole microseconds).
    #[serde(rename = "client_downtime_median_us", with = "micros::option", default)]
    pub client_downtime_median: Option<Duration>,
    /// Maximum of `client_downtime`.
    #[serde(rename = "client_downtime_max_us", with = "micros::option", default)]
    pub client_downtime_max: Option<Duration>,
}

impl MigrationReport {
    pub(crate) fn new(
        migration_id: MigrationId,
        final_phase: Phase,
        failure: Option<FailureReason>,
        timeline: &Timeline,
        predump_rounds: &[PreDumpRecord],
        image_bytes: Option<u64>,
        downtime: &BTreeMap<SessionId, Duration>,
    ) -> Self {
        let between =
            |a: Option<Timestamp>, b: Option<Timestamp>| Some(b?.saturating_duration_since(a?));
        let finished_at = timeline
            .records()
            .iter()
            .find(|r| r.to.is_terminal())
            .map(|r| r.at);
        let final_dump_start = predump_rounds
            .last()
            .map(|r| r.at)
            .or_else(|| timeline.entered(Phase::Dumping));
        let transferring = timeline.entered(Phase::Transferring);
        let restoring = timeline.entered(Phase::Restoring);
        let resuming = timeline.entered(Phase::Resuming);
        // The report has microsecond resolution (that is what JSON carries), so a report
        // survives a JSON round trip unchanged.
        let values: Vec<Duration> = downtime.values().map(|d| whole_micros(*d)).collect();
        Self {
            migration_id,
            final_phase,
            failure,
            created_at: timeline.created_at(),
            finished_at,
            phases: timeline.spans(),
            freeze_time: between(final_dump_start, resuming),
            dump_time: between(final_dump_start, transferring),
            transfer_time: between(transferring, restoring),
            restore_time: between(restoring, resuming),
            total: between(timeline.entered(Phase::Preparing), finished_at),
            image_bytes,
            predump_rounds: predump_rounds.to_vec(),
            client_downtime: downtime
                .iter()
                .map(|(s, d)| SessionDowntime {
                    session: *s,
                    downtime: whole_micros(*d),
                })
                .collect(),
            client_downtime_median: median(&values).map(whole_micros),
            client_downtime_max: values.iter().max().copied(),
        }
    }

    /// Number of sessions that reported a downtime.
    pub fn sessions_reporting(&self) -> usize {
        self.client_downtime.len()
    }
}

/// `d` truncated to whole microseconds (saturating).
fn whole_micros(d: Duration) -> Duration {
    Duration::from_micros(crate::time::duration_to_micros(d))
}

/// Median of `values` (mean of the two middle values for an even count); `None` if empty.
pub fn median(values: &[Duration]) -> Option<Duration> {
    let mut v = values.to_vec();
    v.sort_unstable();
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => v.get(n / 2).copied(),
        _ => {
            let (lo, hi) = (*v.get(n / 2 - 1)?, *v.get(n / 2)?);
            // lo <= hi, so neither operation overflows.
            Some(lo + (hi - lo) / 2)
        }
    }
}

/// Maximum of `values`; `None` if empty.
pub fn max(values: &[Duration]) -> Option<Duration> {
    values.iter().max().copied()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::{Event, Migration, RollbackOutcome};
    use proptest::prelude::*;

    fn t(ms: u64) -> Timestamp {
        Timestamp::from_millis(ms)
    }

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    fn id() -> MigrationId {
        MigrationId::from_bytes([0xab; 16])
    }

    /// A completed migration with two pre-dump rounds and two downtime reports.
    fn completed() -> Migration {
        let mut m = Migration::new(id(), t(1_000));
        let events = [
            (Event::Start, 1_010),
            (Event::BeginQuiesce, 1_020),
            (Event::BeginDump, 1_030),
            (Event::PreDumpRound { image_bytes: 900 }, 1_100),
            (Event::PreDumpRound { image_bytes: 300 }, 1_150),
            (
                Event::DumpDone {
                    image_bytes: Some(1_200),
                },
                1_210,
            ),
            (Event::TransferDone, 1_240),
            (Event::RestoreDone, 1_290),
            (Event::ResumeDone, 1_400),
        ];
        for (e, at) in events {
            m.on_event(e, t(at)).unwrap();
        }
        m.report_downtime(SessionId(2), ms(180));
        m.report_downtime(SessionId(1), ms(120));
        m
    }

    #[test]
    fn completed_report_has_all_timings() {
        let r = completed().report();
        assert_eq!(r.final_phase, Phase::Completed);
        assert_eq!(r.finished_at, Some(t(1_400)));
        // Final dump starts after the last pre-dump round (1150), resuming entered at 1290.
        assert_eq!(r.freeze_time, Some(ms(140)));
        assert_eq!(r.dump_time, Some(ms(60)));
        assert_eq!(r.transfer_time, Some(ms(30)));
        assert_eq!(r.restore_time, Some(ms(50)));
        assert_eq!(r.total, Some(ms(390)));
        assert_eq!(r.image_bytes, Some(1_200));
        assert_eq!(r.predump_rounds.len(), 2);
        assert_eq!(
            r.client_downtime,
            vec![
                SessionDowntime {
                    session: SessionId(1),
                    downtime: ms(120)
                },
                SessionDowntime {
                    session: SessionId(2),
                    downtime: ms(180)
                },
            ]
        );
        assert_eq!(r.client_downtime_median, Some(ms(150)));
        assert_eq!(r.client_downtime_max, Some(ms(180)));
        assert_eq!(r.sessions_reporting(), 2);
        let phases: Vec<_> = r.phases.iter().map(|s| s.phase).collect();
        assert_eq!(
            phases,
            vec![
                Phase::Idle,
                Phase::Preparing,
                Phase::Quiescing,
                Phase::Dumping,
                Phase::Transferring,
                Phase::Restoring,
                Phase::Resuming,
                Phase::Completed,
            ]
        );
        let dumping = r.phases[3];
        assert_eq!((dumping.start, dumping.end), (t(1_030), Some(t(1_210))));
        assert_eq!(dumping.duration(), Some(ms(180)));
        assert_eq!(r.phases[7].end, Some(t(1_400)));
    }

    #[test]
    fn freeze_starts_at_dumping_without_predump() {
        let mut m = Migration::new(id(), t(0));
        m.on_event(Event::Start, t(0)).unwrap();
        m.on_event(Event::BeginDump, t(10)).unwrap();
        m.on_event(Event::DumpDone { image_bytes: None }, t(20))
            .unwrap();
        m.on_event(Event::TransferDone, t(25)).unwrap();
        m.on_event(Event::RestoreDone, t(70)).unwrap();
        let r = m.report();
        assert_eq!(r.freeze_time, Some(ms(60)));
        assert_eq!(r.total, None, "not finished");
        assert_eq!(r.finished_at, None);
        assert_eq!(r.phases.last().unwrap().end, None);
    }

    #[test]
    fn unmeasured_fields_are_none() {
        let mut m = Migration::new(id(), t(0));
        m.on_event(Event::Start, t(5)).unwrap();
        m.on_event(
            Event::Fail {
                reason: "no ack".into(),
            },
            t(9),
        )
        .unwrap();
        let r = m.report();
        assert_eq!(r.final_phase, Phase::Failed);
        assert_eq!(r.total, Some(ms(4)));
        assert_eq!(
            (r.freeze_time, r.dump_time, r.transfer_time, r.restore_time),
            (None, None, None, None)
        );
        assert_eq!(r.client_downtime_median, None);
        assert_eq!(r.client_downtime_max, None);
        assert_eq!(r.image_bytes, None);
        assert_eq!(r.failure.unwrap().rollback, RollbackOutcome::NotAttempted);
    }

    #[test]
    fn median_and_max() {
        assert_eq!(median(&[]), None);
        assert_eq!(max(&[]), None);
        assert_eq!(median(&[ms(5)]), Some(ms(5)));
        assert_eq!(median(&[ms(9), ms(1), ms(5)]), Some(ms(5)));
        assert_eq!(median(&[ms(4), ms(1), ms(2), ms(100)]), Some(ms(3)));
        assert_eq!(max(&[ms(4), ms(1), ms(100), ms(2)]), Some(ms(100)));
        assert_eq!(median(&[Duration::MAX, Duration::MAX]), Some(Duration::MAX));
    }

    const REPORT_JSON: &str = r#"{
        "migration_id": "abababababababababababababababab",
        "final_phase": "failed",
        "failure": {
            "phase": "restoring",
            "message": "criu restore: exit 1",
            "rollback": { "outcome": "succeeded" }
        },
        "created_at": 1000000,
        "finished_at": 1300000,
        "phases": [
            { "phase": "idle", "start": 1000000, "end": 1010000 },
            { "phase": "failed", "start": 1300000, "end": 1300000 }
        ],
        "freeze_time_us": null,
        "dump_time_us": 60000,
        "transfer_time_us": 30000,
        "restore_time_us": null,
        "total_us": 290000,
        "image_bytes": 1200,
        "predump_rounds": [ { "round": 1, "image_bytes": 900, "at": 1100000 } ],
        "client_downtime": [ { "session": 3, "downtime_us": 150000 } ],
        "client_downtime_median_us": 150000,
        "client_downtime_max_us": 150000
    }"#;

    #[test]
    fn report_deserializes_from_json_text() {
        let r: MigrationReport = serde_json::from_str(REPORT_JSON).unwrap();
        assert_eq!(r.migration_id, id());
        assert_eq!(r.final_phase, Phase::Failed);
        let f = r.failure.as_ref().unwrap();
        assert_eq!(f.phase, Phase::Restoring);
        assert_eq!(f.message, "criu restore: exit 1");
        assert!(f.rolled_back());
        assert_eq!(r.created_at, t(1_000));
        assert_eq!(r.finished_at, Some(t(1_300)));
        assert_eq!(
            r.phases[0],
            PhaseSpan {
                phase: Phase::Idle,
                start: t(1_000),
                end: Some(t(1_010))
            }
        );
        assert_eq!(r.freeze_time, None);
        assert_eq!(r.dump_time, Some(ms(60)));
        assert_eq!(r.transfer_time, Some(ms(30)));
        assert_eq!(r.total, Some(ms(290)));
        assert_eq!(r.image_bytes, Some(1_200));
        assert_eq!(
            r.predump_rounds,
            vec![PreDumpRecord {
                round: 1,
                image_bytes: 900,
                at: t(1_100)
            }]
        );
        assert_eq!(
            r.client_downtime,
            vec![SessionDowntime {
                session: SessionId(3),
                downtime: ms(150)
            }]
        );
        assert_eq!(r.client_downtime_median, Some(ms(150)));
        // And it serializes back to the same JSON value.
        let back: serde_json::Value = serde_json::to_value(&r).unwrap();
        let orig: serde_json::Value = serde_json::from_str(REPORT_JSON).unwrap();
        assert_eq!(back, orig);
    }

    #[test]
    fn report_json_round_trip() {
        let r = completed().report();
        let json = serde_json::to_string_pretty(&r).unwrap();
        assert!(json.contains("\"freeze_time_us\": 140000"), "{json}");
        let back: MigrationReport = serde_json::from_str(&json).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn report_json_with_bad_phase_is_an_error() {
        let bad = REPORT_JSON.replace("\"final_phase\": \"failed\"", "\"final_phase\": \"gone\"");
        assert!(serde_json::from_str::<MigrationReport>(&bad).is_err());
    }

    proptest! {
        #[test]
        fn report_decoder_never_panics_on_arbitrary_text(s in any::<String>()) {
            prop_assert!(serde_json::from_str::<MigrationReport>(&s).is_err());
        }

        #[test]
        fn report_decoder_never_panics_on_mangled_json(cut in 0usize..REPORT_JSON.len(), byte in any::<u8>()) {
            let mut bytes = REPORT_JSON.as_bytes().to_vec();
            bytes[cut] = byte;
            // Ok or Err are both fine; the point is no panic. A successful parse must
            // serialize again.
            if let Ok(r) = serde_json::from_slice::<MigrationReport>(&bytes) {
                prop_assert!(serde_json::to_string(&r).is_ok());
            }
        }

        #[test]
        fn median_lies_between_min_and_max(v in proptest::collection::vec(0u64..1_000_000, 1..20)) {
            let d: Vec<_> = v.iter().map(|x| Duration::from_micros(*x)).collect();
            let m = median(&d).unwrap();
            prop_assert!(m >= *d.iter().min().unwrap() && m <= max(&d).unwrap());
        }

        #[test]
        fn generated_reports_round_trip(
            kinds in proptest::collection::vec(any::<usize>(), 0..15),
            downtimes in proptest::collection::btree_map(any::<u64>(), 0u64..10_000_000, 0..5),
        ) {
            let mut m = Migration::new(id(), t(0));
            for (i, pick) in kinds.iter().enumerate() {
                let rows: Vec<_> = crate::TRANSITIONS.iter().filter(|(f, _, _)| *f == m.phase()).collect();
                if rows.is_empty() { break; }
                let event = match rows[pick % rows.len()].1 {
                    EventKind::Start => Event::Start,
                    EventKind::BeginQuiesce => Event::BeginQuiesce,
                    EventKind::BeginDump => Event::BeginDump,
                    EventKind::PreDumpRound => Event::PreDumpRound { image_bytes: *pick as u64 },
                    EventKind::DumpDone => Event::DumpDone { image_bytes: Some(*pick as u64) },
                    EventKind::TransferDone => Event::TransferDone,
                    EventKind::RestoreDone => Event::RestoreDone,
                    EventKind::ResumeDone => Event::ResumeDone,
                    EventKind::Fail => Event::Fail { reason: format!("f{pick}") },
                    EventKind::RollBack => Event::RollBack { reason: "r\"\n".into() },
                    EventKind::RollbackSucceeded => Event::RollbackSucceeded,
                    EventKind::RollbackFailed => Event::RollbackFailed { reason: "é".into() },
                };
                m.on_event(event, t(i as u64 * 7)).unwrap();
            }
            for (s, d) in downtimes {
                m.report_downtime(SessionId(s), Duration::from_micros(d));
            }
            let r = m.report();
            let back: MigrationReport = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
            prop_assert_eq!(back, r);
        }
    }
}
