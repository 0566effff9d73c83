//! The typed contracts between this project's processes.
//!
//! ```text
//!  control ──request file──► <admin dir>/migrate.json ──SIGTERM──► swrapper
//!          ◄──event file──── <admin dir>/announce.json ◄──────────  (takes the request: removed)
//!          (takes the event: removed; a stale or foreign migration id is refused)
//!          ◄──record──────── <admin dir>/downtime.json ◄──────────  (rewritten as clients
//!          (read by migration id, not removed)                         report their downtime)
//!
//!  control ──► <state dir>/reports/<id>.json (MoveReport), run-report.json (RunReport) ──► xtask
//!  cwrapper ──► client.json (ClientReport) ──► control
//! ```
//!
//! [`admin`]: the requests control writes into the server's admin directory
//! ([`MigrateRequest`], [`AbortRequest`], [`ResumeRequest`]) and the events the server writes
//! back ([`Ready`], [`Announced`], [`Resumed`], [`Aborted`]), each in an [`Envelope`] that
//! names the migration it belongs to, and the server's record of its clients' downtime
//! reports ([`DowntimeLog`], read by migration id). Files are written atomically (a private temporary file,
//! mode 0600, renamed) and consumed (removed) when read, so a later signal can never act on an
//! old request and a reader never mistakes an old answer for a new one.
//!
//! [`report`]: the JSON reports: one per migration ([`MoveReport`]), one per run of several
//! migrations with the demo client ([`RunReport`]), and the demo client's own ([`ClientReport`];
//! with several connections in one process, [`ClientsSummary`]).
//!
//! Free-form JSON (`serde_json::Value`) appears nowhere in these types.

pub mod admin;
pub mod report;

pub use admin::{
    AbortRequest, Aborted, AdminDir, AdminError, AnnounceOutcome, Announced, ClientRef,
    DowntimeLog, Envelope, MigrateRequest, MigrationDowntimeReports, Phases, QuiesceOutcome, Ready,
    ReportedDowntime, Request, ResumeRequest, Resumed, ServerEvent, UnknownPhases,
};
pub use report::{
    ClientMigration, ClientReport, ClientsSummary, ConnectionError, CriuRoute, CriuTiming,
    MigrationDowntimes, MoveReport, MoveResult, Percentiles, Placement, PortProbe, PostCopyReport,
    RestartReport, RunReport, RunRow, RunSummary, TransferStats, median, percentile,
};
