//! The JSON reports: per migration (control), per run (control run, read by xtask), and the
//! demo client's (cwrapper, read by control).

use std::net::SocketAddr;
use std::path::PathBuf;

use migration_core::{FinalDumpReason, MigrationId, Recovery};
use serde::{Deserialize, Serialize};

use crate::admin::{Aborted, Announced, Phases, Resumed};

/// How one criu run spent its time, read from its log.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CriuTiming {
    /// Wall time of the whole command, as control saw it.
    pub wall_ms: f64,
    /// From criu's start to the first line about the task itself (paid on every run).
    pub startup_ms: Option<f64>,
    /// From that line to the end of criu's log.
    pub work_ms: Option<f64>,
    /// How criu was run (absent in reports written before workers existed).
    #[serde(default)]
    pub route: Option<CriuRoute>,
    /// Why a prepared worker was not used, when the command line ran instead of it.
    #[serde(default)]
    pub worker_error: Option<String>,
}

/// How a criu call ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum CriuRoute {
    /// `criu dump` / `criu restore` started for this call (its start-up paid in the freeze).
    CommandLine,
    /// A `criu swrk` worker started before the freeze, asked over criu's RPC.
    Worker,
}

/// A post-copy move's memory: what reached the restored process after the freeze.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostCopyReport {
    /// How the pages travelled (`unix-socket-pair` on one host).
    pub transport: String,
    /// Restore done -> the source's page server and the lazy-pages daemon both exited
    /// successfully (every page resident), in milliseconds; `None` when the transfer failed.
    pub resident_after_ms: Option<f64>,
    /// Pages the lazy-pages daemon copied into the process (from its log).
    pub pages_transferred: Option<u64>,
    /// The same, in bytes.
    pub bytes_transferred: Option<u64>,
    /// Why the transfer failed after the restore: the restored server's memory was
    /// incomplete (post-copy's known risk).
    pub error: Option<String>,
}

/// The sealed transfer of an image set through migration-wire.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransferStats {
    /// Bytes of the image files.
    pub bytes: u64,
    /// Bytes on the wire (compressed, sealed, framed).
    pub wire_bytes: u64,
    /// Files sent.
    pub files: u64,
    /// Wall time.
    pub ms: f64,
    /// Bytes of the compressed chunk payloads, without their sealing overhead (measured by the
    /// receiver; absent in older reports and on the sending side).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compressed_bytes: Option<u64>,
    /// Chunks of the stream (absent in older reports).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunks: Option<u64>,
    /// Start of the transfer -> its first byte sent or received, in milliseconds (absent in
    /// older reports and where not measured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_byte_ms: Option<f64>,
}

impl TransferStats {
    /// Image bytes per second over the wall time, in MB/s (10^6 bytes); 0 for a zero time.
    pub fn mb_per_s(&self) -> f64 {
        if self.ms > 0.0 {
            self.bytes as f64 / (self.ms / 1e3) / 1e6
        } else {
            0.0
        }
    }
}

/// How a migration ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MoveResult {
    /// The server runs at the target.
    Completed,
    /// A phase failed and the server runs at the source again.
    RolledBack,
    /// A phase failed and the recovery failed too, or the policy said give up.
    Failed,
}

impl std::fmt::Display for MoveResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Completed => "completed",
            Self::RolledBack => "rolled_back",
            Self::Failed => "failed",
        })
    }
}

/// Where the server process was found after a restore: observed from `/proc`, not assumed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Placement {
    /// The restored process.
    pub pid: i32,
    /// Inode of its network namespace (`/proc/<pid>/ns/net`).
    pub netns_inode: u64,
    /// Inode of the network namespace it should be in.
    pub expected_netns_inode: u64,
    /// The name of the container whose namespace that is.
    pub expected_container: String,
}

impl Placement {
    /// Whether the process is where it should be.
    pub fn is_right(&self) -> bool {
        self.netns_inode == self.expected_netns_inode
    }
}

/// What answered a QUIC probe (a long-header packet of an unknown version, to which a QUIC
/// endpoint must answer with Version Negotiation) sent to an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PortProbe {
    /// A QUIC endpoint answered.
    Answered,
    /// The port is closed (ICMP port unreachable).
    Refused,
    /// Nothing answered in time.
    Silent,
}

/// One migration, as control ran it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoveReport {
    /// The migration.
    pub migration_id: MigrationId,
    /// The source container.
    pub from: String,
    /// The target container.
    pub to: String,
    /// The address the clients were sent to.
    pub target_addr: SocketAddr,
    /// The address they came from (and go back to after a rollback).
    pub source_addr: SocketAddr,
    /// Single- or two-phase (one in reports written before the mode existed).
    #[serde(default)]
    pub phases: Phases,
    /// The image set, when kept.
    pub images_dir: Option<PathBuf>,
    /// How it ended.
    pub result: MoveResult,
    /// What failed, and how the recovery went.
    pub failure: Option<String>,
    /// The recovery the policy chose, when a phase failed.
    pub recovery: Option<Recovery>,
    /// The server's announce report.
    pub announce: Option<Announced>,
    /// Whether the kernel tracks dirty memory (pre-dump possible).
    pub dirty_tracking: bool,
    /// Why pre-dumping stopped.
    pub predump_stop: Option<FinalDumpReason>,
    /// The pre-dump rounds: bytes written and criu's timing.
    pub predump_rounds: Vec<(u64, CriuTiming)>,
    /// The final dump.
    pub dump: Option<CriuTiming>,
    /// Size of the final image set.
    pub image_bytes: Option<u64>,
    /// The sealed transfer, when one was made.
    pub transfer: Option<TransferStats>,
    /// The restore at the target.
    pub restore: Option<CriuTiming>,
    /// The restore at the source during a rollback.
    pub rollback_restore: Option<CriuTiming>,
    /// Where the restored process was found.
    pub placement: Option<Placement>,
    /// The server's resumed event.
    pub resumed: Option<Resumed>,
    /// The server's aborted event.
    pub aborted: Option<Aborted>,
    /// After a completed move: what the source's address answers (nothing, for a real move).
    pub source_probe: Option<PortProbe>,
    /// After a completed move: what the target's address answers (the server).
    pub target_probe: Option<PortProbe>,
    /// Wall time of the whole migration.
    pub wall_ms: f64,
    /// migration-core's timeline (phases, freeze).
    pub timeline: migration_core::MigrationReport,
    /// Set when this migration's `control` was killed and a later one recovered it: the phase
    /// the journal said was running. The figures of the phases before are then unknown.
    #[serde(default)]
    pub recovered_after: Option<migration_core::Phase>,
    /// A post-copy move's memory transfer (`control migrate --memory post-copy`); `None` for
    /// a cold move (all memory in the freeze).
    #[serde(default)]
    pub post_copy: Option<PostCopyReport>,
    /// The stable-address mode (`control up --front`): the clients' address was a front's,
    /// which keeps every client's 4-tuple, so plain QUIC clients (the announce's
    /// `cannot_follow`) follow the move too. Omitted when false (older readers' JSON).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub front: bool,
}

impl MoveReport {
    /// A report with nothing observed yet (result `Failed` until told otherwise).
    pub fn new(
        migration_id: MigrationId,
        (from, to): (String, String),
        (source_addr, target_addr): (SocketAddr, SocketAddr),
        timeline: migration_core::MigrationReport,
    ) -> Self {
        Self {
            migration_id,
            from,
            to,
            target_addr,
            source_addr,
            phases: Phases::One,
            images_dir: None,
            result: MoveResult::Failed,
            failure: None,
            recovery: None,
            announce: None,
            dirty_tracking: false,
            predump_stop: None,
            predump_rounds: Vec::new(),
            dump: None,
            image_bytes: None,
            transfer: None,
            restore: None,
            rollback_restore: None,
            placement: None,
            resumed: None,
            aborted: None,
            source_probe: None,
            target_probe: None,
            wall_ms: 0.0,
            timeline,
            recovered_after: None,
            post_copy: None,
            front: false,
        }
    }

    /// The freeze (final dump start -> restored process running), in milliseconds.
    pub fn freeze_ms(&self) -> Option<f64> {
        self.timeline.freeze_time.map(|d| d.as_secs_f64() * 1e3)
    }

    /// Handshakes the server counted at the end of the move (from `resumed` or `aborted`).
    pub fn server_handshakes(&self) -> Option<u64> {
        self.resumed
            .as_ref()
            .map(|r| r.handshakes)
            .or_else(|| self.aborted.as_ref().map(|a| a.handshakes))
    }
}

/// One migration as the demo client saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientMigration {
    /// The migration.
    pub id: String,
    /// Where the server said it moves (or, for an abort, where the client goes back).
    pub new_addr: SocketAddr,
    /// This record is the abort of a migration.
    pub aborted: bool,
    /// The mode the server used, as the client saw it: two when it was asked to quiesce for
    /// this migration (one in reports written before the mode existed).
    #[serde(default)]
    pub phases: Phases,
    /// Milliseconds since the client started.
    pub seen_at_ms: f64,
    /// The last echo before the pause.
    pub last_echo_before_ms: Option<f64>,
    /// The first echo after it.
    pub first_echo_after_ms: Option<f64>,
    /// The longest pause between two echoes during the migration.
    pub downtime_ms: Option<f64>,
    /// Echo attempts that missed their deadline or failed meanwhile.
    pub failed_attempts: u64,
    /// An echo succeeded after the move (or the swap back).
    pub completed: bool,
    /// The server aborted this migration (a record with `aborted` follows).
    pub rolled_back: bool,
    /// The address the client's datagrams were last accepted from when the migration ended
    /// (its real peer), observed by the client's socket.
    pub peer_after: Option<SocketAddr>,
}

/// The reconnect baseline of the benchmarks (`control restart-elsewhere`): the server ended
/// where it ran and a fresh one started in the other container. Its clients lose their
/// connections and must reconnect (a new handshake).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestartReport {
    /// The container the server ran in.
    pub from: String,
    /// The container the new server runs in.
    pub to: String,
    /// The new server's address (host port).
    pub target_addr: SocketAddr,
    /// When the restart was asked for (wall clock, microseconds since the epoch).
    pub started_us: u64,
    /// When the new server said it is ready (wall clock, microseconds since the epoch).
    pub ready_us: u64,
    /// The new server's PID.
    pub pid: i32,
}

impl RestartReport {
    /// Asked -> ready, in milliseconds: the baseline's counterpart of a freeze.
    pub fn downtime_ms(&self) -> f64 {
        self.ready_us.saturating_sub(self.started_us) as f64 / 1e3
    }
}

/// The demo client's report (cwrapper `--json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientReport {
    /// The address it dialled.
    pub target: SocketAddr,
    /// quinn's stable id of the connection used last.
    pub stable_id: u64,
    /// Distinct QUIC connections the echoes went over (quinn's stable ids): 1 when the
    /// connection survived every move.
    pub connections: u64,
    /// Handshakes the client completed: its QUIC connections that the server confirmed
    /// (HANDSHAKE_DONE received; a retransmitted copy of that frame is not a second one).
    pub handshakes: u64,
    /// Echoes answered.
    pub echoes: u64,
    /// Echo attempts that failed.
    pub failed_attempts: u64,
    /// Migrations seen.
    pub migrations: Vec<ClientMigration>,
    /// The control stream's state at the end.
    pub control: String,
    /// Datagrams from unknown sources that the client's socket dropped.
    pub foreign_datagrams_dropped: u64,
    /// The echo sequence and the server's counter were contiguous.
    pub verified: bool,
    /// What went wrong, if anything.
    pub error: Option<String>,
}

/// The demo client's summary when it holds several connections (cwrapper `--connections N`,
/// N > 1): one per process, its last line on stdout and its `--json` file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientsSummary {
    /// The address every connection dialled.
    pub target: SocketAddr,
    /// The process's client id; connection `k` calls itself `<client_id>-<k>`.
    pub client_id: String,
    /// Connections asked for (`--connections`).
    pub connections_requested: u64,
    /// Connections whose handshake and `Hello` went through.
    pub connections_started: u64,
    /// Connections that ran until the client stopped (signal, `--count`, `--duration-s`)
    /// with their QUIC connection still open: none lost, none ended by a failed check.
    pub connections_alive: u64,
    /// Connections whose echoes went over more than one QUIC connection or that completed
    /// more than one handshake: 0 when every connection survived every move.
    pub connections_reconnected: u64,
    /// Connections whose own report is not verified (a failed check, a lost server, a
    /// migration never completed), or that never started.
    pub connections_failed: u64,
    /// Echoes answered, over every connection.
    pub echoes: u64,
    /// Echo attempts that failed, over every connection.
    pub failed_attempts: u64,
    /// Every migration (or abort) some connection saw, in the order first seen.
    pub migrations: Vec<MigrationDowntimes>,
    /// What went wrong, per connection.
    pub errors: Vec<ConnectionError>,
    /// Every connection started, stayed alive, never reconnected and passed its checks.
    pub verified: bool,
}

/// One migration (or abort) across the connections of a process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationDowntimes {
    /// The migration.
    pub id: String,
    /// Where the server said it moves (for an abort, where the clients go back).
    pub new_addr: SocketAddr,
    /// This is the abort of a migration.
    pub aborted: bool,
    /// Connections that saw it.
    pub seen: u64,
    /// Connections that were asked to quiesce for it (two phases).
    pub quiesced: u64,
    /// Connections whose echoes resumed after it (`completed` in their record).
    pub completed: u64,
    /// Each connection's downtime in milliseconds, by connection index (`null`: that
    /// connection measured none: it did not see the migration, or did not start).
    pub downtimes_ms: Vec<Option<f64>>,
    /// p50, p95 and max of the downtimes measured; `None` when none was.
    pub downtime: Option<Percentiles>,
}

/// A connection's failure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectionError {
    /// The connection's index (0-based).
    pub connection: u64,
    /// Its client id.
    pub client_id: String,
    /// What went wrong.
    pub error: String,
}

/// The 50th and 95th percentiles and the maximum of a list (see [`percentile`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Percentiles {
    /// The median (nearest rank: the lower middle value of an even count).
    pub p50_ms: f64,
    /// The 95th percentile (nearest rank).
    pub p95_ms: f64,
    /// The largest value.
    pub max_ms: f64,
}

impl Percentiles {
    /// p50, p95 and max of `values`; `None` when empty.
    pub fn of(values: &[f64]) -> Option<Self> {
        Some(Self {
            p50_ms: percentile(values, 50)?,
            p95_ms: percentile(values, 95)?,
            max_ms: percentile(values, 100)?,
        })
    }
}

/// The `p`-th percentile of `values` by the **nearest-rank** method, without interpolation:
/// the value at 1-based rank `⌈p·n/100⌉` of the sorted list (rank 1 for `p` = 0), so always
/// one of the values. For `n` values: p100 is the maximum; p50 is the middle value of an odd
/// count and the lower of the two middle values of an even one; p95 is the maximum whenever
/// `n` < 20, and for `n` = 100 it is the 95th smallest (at least 95 % of the values are at
/// or below it, and at most 5 are above). `None` when `values` is empty; `p` above 100 counts
/// as 100. Values are ordered by `f64::total_cmp`.
pub fn percentile(values: &[f64], p: u32) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len() as u64;
    let p = u64::from(p.min(100));
    // ⌈p·n/100⌉ in integers: exact, no rounding of 0.95·n.
    let rank = (p * n).div_ceil(100).max(1);
    let index = usize::try_from(rank - 1).ok()?;
    sorted.get(index).copied()
}

/// One migration of a run, joined with what the client saw.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunRow {
    /// The migration.
    pub id: String,
    /// Source container.
    pub from: String,
    /// Target container.
    pub to: String,
    /// How it ended.
    pub result: MoveResult,
    /// Freeze (dump start -> restored process running).
    pub freeze_ms: Option<f64>,
    /// criu dump wall time.
    pub dump_ms: Option<f64>,
    /// criu dump start-up.
    pub dump_criu_startup_ms: Option<f64>,
    /// criu restore wall time.
    pub restore_ms: Option<f64>,
    /// criu restore start-up.
    pub restore_criu_startup_ms: Option<f64>,
    /// Image set size.
    pub image_bytes: Option<u64>,
    /// The client's pause.
    pub client_downtime_ms: Option<f64>,
    /// Handshakes the server counted after this migration.
    pub server_handshakes: Option<u64>,
    /// The client's real peer after the migration.
    pub client_peer_after: Option<SocketAddr>,
    /// Where it should be: the target's address after a completed move, the source's after a
    /// rollback.
    pub expected_peer: SocketAddr,
}

/// Medians and checks of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSummary {
    /// One row per migration.
    pub rows: Vec<RunRow>,
    /// Completed migrations.
    pub completed: usize,
    /// Median client pause over completed moves.
    pub client_downtime_median_ms: Option<f64>,
    /// Median freeze over completed moves.
    pub freeze_median_ms: Option<f64>,
    /// Median dump wall time.
    pub dump_median_ms: Option<f64>,
    /// Median restore wall time.
    pub restore_median_ms: Option<f64>,
    /// Median criu start-up of dumps.
    pub dump_criu_startup_median_ms: Option<f64>,
    /// Median criu start-up of restores.
    pub restore_criu_startup_median_ms: Option<f64>,
    /// Echoes answered.
    pub echoes: u64,
    /// The client's own checks passed.
    pub client_verified: bool,
}

/// A run of several migrations with the demo client (`control run`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunReport {
    /// How the run was driven: `run` (one control process) or `by-hand` (separate commands).
    pub route: String,
    /// Medians and rows.
    pub summary: RunSummary,
    /// Every migration's report.
    pub migrations: Vec<MoveReport>,
    /// The client's report, if it wrote one.
    pub client: Option<ClientReport>,
    /// The client's exit code.
    pub client_exit: Option<i32>,
    /// Every check that failed.
    pub problems: Vec<String>,
}

/// The median of `v` (the upper one of an even count); `None` when empty.
pub fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transfer_stats_of_older_reports_still_parse() {
        let old = r#"{"bytes":1000000,"wire_bytes":400000,"files":3,"ms":2.0}"#;
        let t: TransferStats = serde_json::from_str(old).unwrap();
        assert_eq!(t.compressed_bytes, None);
        assert_eq!(t.chunks, None);
        assert_eq!(t.first_byte_ms, None);
        assert_eq!(t.mb_per_s(), 500.0);
        // Absent fields stay absent when written back.
        assert_eq!(serde_json::to_string(&t).unwrap(), old);
        let new = TransferStats {
            compressed_bytes: Some(350_000),
            chunks: Some(2),
            first_byte_ms: Some(0.5),
            ..t
        };
        let back: TransferStats =
            serde_json::from_str(&serde_json::to_string(&new).unwrap()).unwrap();
        assert_eq!(back, new);
        assert_eq!(TransferStats::default().mb_per_s(), 0.0);
    }

    #[test]
    fn medians() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0]), Some(4.0));
    }

    #[test]
    fn percentile_of_an_empty_list_is_none() {
        assert_eq!(percentile(&[], 50), None);
        assert_eq!(Percentiles::of(&[]), None);
    }

    #[test]
    fn percentile_of_one_value_is_that_value() {
        for p in [0, 1, 50, 95, 100, 200] {
            assert_eq!(percentile(&[7.5], p), Some(7.5), "p{p}");
        }
    }

    #[test]
    fn percentile_of_odd_and_even_counts_by_nearest_rank() {
        // Odd: the middle value; unsorted input.
        assert_eq!(percentile(&[3.0, 1.0, 2.0], 50), Some(2.0));
        // Even: the lower of the two middle values.
        assert_eq!(percentile(&[4.0, 1.0, 3.0, 2.0], 50), Some(2.0));
        // Fewer than 20 values: p95 is the maximum.
        let v: Vec<f64> = (1..=19).map(f64::from).collect();
        assert_eq!(percentile(&v, 95), Some(19.0));
        // 20 values: rank ⌈0.95·20⌉ = 19.
        let v: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(percentile(&v, 95), Some(19.0));
        assert_eq!(percentile(&v, 50), Some(10.0));
        // 100 values, reversed: the 95th smallest; p0 and p1 are the minimum.
        let v: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(percentile(&v, 95), Some(95.0));
        assert_eq!(percentile(&v, 100), Some(100.0));
        assert_eq!(percentile(&v, 0), Some(1.0));
        assert_eq!(percentile(&v, 1), Some(1.0));
        // 101 values: rank ⌈95.95⌉ = 96.
        let v: Vec<f64> = (1..=101).map(f64::from).collect();
        assert_eq!(percentile(&v, 95), Some(96.0));
        assert_eq!(
            Percentiles::of(&[5.0, 1.0, 9.0, 3.0]),
            Some(Percentiles {
                p50_ms: 3.0,
                p95_ms: 9.0,
                max_ms: 9.0
            })
        );
    }

    #[test]
    fn a_client_report_with_an_unknown_or_missing_field_is_refused() {
        let good = r#"{"target":"127.0.0.1:5242","stable_id":1,"connections":1,"handshakes":1,
            "echoes":3,"failed_attempts":0,"migrations":[],"control":"open",
            "foreign_datagrams_dropped":0,"verified":true,"error":null}"#;
        let r: ClientReport = serde_json::from_str(good).unwrap();
        assert_eq!(r.connections, 1);
        let extra = good.replace("\"error\":null", "\"error\":null,\"surprise\":1");
        assert!(serde_json::from_str::<ClientReport>(&extra).is_err());
        let missing = good.replace("\"connections\":1,", "");
        assert!(serde_json::from_str::<ClientReport>(&missing).is_err());
    }

    #[test]
    fn a_criu_timing_without_a_route_still_parses_and_a_bad_route_is_refused() {
        let old = r#"{"wall_ms":40.5,"startup_ms":15.0,"work_ms":20.0}"#;
        let t: CriuTiming = serde_json::from_str(old).unwrap();
        assert_eq!(t.route, None);
        assert_eq!(t.worker_error, None);
        let new = r#"{"wall_ms":4.5,"startup_ms":1.0,"work_ms":3.0,"route":"worker"}"#;
        let t: CriuTiming = serde_json::from_str(new).unwrap();
        assert_eq!(t.route, Some(CriuRoute::Worker));
        let text = serde_json::to_string(&CriuTiming {
            route: Some(CriuRoute::CommandLine),
            worker_error: Some("the worker died".into()),
            ..CriuTiming::default()
        })
        .unwrap();
        assert!(text.contains("\"route\":\"command_line\""), "{text}");
        let bad = r#"{"wall_ms":1.0,"startup_ms":null,"work_ms":null,"route":"carrier_pigeon"}"#;
        assert!(serde_json::from_str::<CriuTiming>(bad).is_err());
    }

    #[test]
    fn placement_compares_namespaces() {
        let mut p = Placement {
            pid: 1,
            netns_inode: 7,
            expected_netns_inode: 7,
            expected_container: "b".into(),
        };
        assert!(p.is_right());
        p.netns_inode = 8;
        assert!(!p.is_right());
    }
}
