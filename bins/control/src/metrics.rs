//! The agent's metrics, in the OpenMetrics text format (`prometheus-client`).
//!
//! ```text
//!   agent code ── record_migration(&MigrationOutcome) ─┐
//!              ── record_client_downtimes(&[pause]) ───┤   Metrics (Clone: one Arc,
//!              ── record_request(name, outcome) ───────┤   shared by every task)
//!              ── set_services(n) ─────────────────────┘
//!                                                               │ encode()
//!   http::serve ── GET /metrics ◄── OpenMetrics text ◄──────────┘
//! ```
//!
//! The agent passes plain values (durations, byte counts, enums of this module); only this
//! module knows `prometheus-client`. Every metric is named `qlm_agent_*`; the names, labels and
//! help texts are a contract with dashboards and alerts, kept by the snapshot test
//! `help_and_type_lines_stay_as_documented`.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `qlm_agent_migrations_total` | counter | `result` (completed, rolled_back, failed), `role` (source, target) |
//! | `qlm_agent_freeze_seconds` | histogram | |
//! | `qlm_agent_transfer_seconds` | histogram | |
//! | `qlm_agent_client_downtime_seconds` | histogram (one observation per client per move, as the client reported it; by the agent where the server runs afterwards) | |
//! | `qlm_agent_transfer_bytes_total` | counter | `kind` (raw, compressed, sealed) |
//! | `qlm_agent_clients_acked_total`, `qlm_agent_clients_missing_total` | counter | |
//! | `qlm_agent_rollbacks_total` | counter | `phase` (preparing .. resuming) |
//! | `qlm_agent_requests_total` | counter | `request`, `outcome` (ok, refused) |
//! | `qlm_agent_refusals_total` | counter | `reason` (bad_token, .., unknown_service) |
//! | `qlm_agent_services` | gauge | |
//! | `qlm_agent_build_info` | info | `version` |
//!
//! Every label combination known in advance is created at start, so a scrape shows zeros
//! rather than missing series; `requests_total` appears with the first request (its
//! `request` values are the agent's to choose).

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use migration_core::Phase;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

/// The HTTP content type of [`Metrics::encode`]'s text: the OpenMetrics text format 1.0.0,
/// which is what `prometheus_client::encoding::text::encode` writes (`# EOF` included).
pub(crate) const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Every metric's name starts with this (and `_`).
pub(crate) const PREFIX: &str = "qlm_agent";

/// Upper bounds (seconds) of the freeze and client downtime histograms: 1 ms .. 10 s, finest
/// where this project's pauses are (about 20-200 ms).
const PAUSE_BUCKETS: [f64; 19] = [
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
    2.5, 5.0, 10.0,
];

/// Upper bounds (seconds) of the transfer histogram: the pause buckets, then up to a minute
/// (an image set of a GiB or more between hosts).
const TRANSFER_BUCKETS: [f64; 21] = [
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
    2.5, 5.0, 10.0, 30.0, 60.0,
];

/// How a migration ended, from this agent's side.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum MigrationResult {
    /// The service runs at the target and its clients follow it.
    Completed,
    /// The migration failed and the service runs at the source again.
    RolledBack,
    /// The migration failed and was not rolled back (or the rollback failed).
    Failed,
}

impl MigrationResult {
    const ALL: [Self; 3] = [Self::Completed, Self::RolledBack, Self::Failed];

    /// The label value.
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            Self::Completed => "completed",
            Self::RolledBack => "rolled_back",
            Self::Failed => "failed",
        }
    }
}

/// Which end of a migration this agent was.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Role {
    /// The host the service left (dump).
    Source,
    /// The host the service moved to (restore).
    Target,
}

impl Role {
    const ALL: [Self; 2] = [Self::Source, Self::Target];

    /// The label value.
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            Self::Source => "source",
            Self::Target => "target",
        }
    }
}

/// Why the agent refused a request.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Refusal {
    /// The token's signature or MAC did not verify.
    BadToken,
    /// The token or request is past its validity.
    Expired,
    /// A token or nonce already seen.
    Replayed,
    /// The peer is authenticated but not allowed this request.
    NotAllowed,
    /// Too many requests from this peer.
    RateLimited,
    /// The peer's certificate was refused.
    BadCertificate,
    /// The request did not parse.
    Malformed,
    /// The request was larger than allowed.
    Oversized,
    /// The request names a service this agent does not run.
    UnknownService,
}

impl Refusal {
    /// Every reason, in the documented order.
    pub(crate) const ALL: [Self; 9] = [
        Self::BadToken,
        Self::Expired,
        Self::Replayed,
        Self::NotAllowed,
        Self::RateLimited,
        Self::BadCertificate,
        Self::Malformed,
        Self::Oversized,
        Self::UnknownService,
    ];

    /// The label value.
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            Self::BadToken => "bad_token",
            Self::Expired => "expired",
            Self::Replayed => "replayed",
            Self::NotAllowed => "not_allowed",
            Self::RateLimited => "rate_limited",
            Self::BadCertificate => "bad_certificate",
            Self::Malformed => "malformed",
            Self::Oversized => "oversized",
            Self::UnknownService => "unknown_service",
        }
    }
}

/// What became of one request to the agent.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum RequestOutcome {
    /// Accepted (whatever the work it started then gave).
    Ok,
    /// Refused, and why.
    Refused(Refusal),
}

/// Bytes of one image set on the way between hosts.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct TransferBytes {
    /// The image set as CRIU wrote it.
    pub(crate) raw: u64,
    /// After compression.
    pub(crate) compressed: u64,
    /// On the wire: compressed, sealed and framed.
    pub(crate) sealed: u64,
}

/// One migration as this agent saw it. Every figure is optional: record what this side knows
/// (`None`, zero or empty records nothing for that metric).
///
/// Record the shared figures (freeze, transfer, bytes, clients) on one side only, the one that
/// has them all (the source, which holds the timeline), so that a sum over the fleet counts a
/// move once; `migrations_total` is counted on both sides, by `role`. The clients' downtimes
/// come later and elsewhere ([`Metrics::record_client_downtimes`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct MigrationOutcome {
    /// How it ended.
    pub(crate) result: MigrationResult,
    /// Which end this agent was.
    pub(crate) role: Role,
    /// The service's freeze (dump start to restore done), when it was frozen.
    pub(crate) freeze: Option<Duration>,
    /// The image set's transfer, when one took place.
    pub(crate) transfer: Option<Duration>,
    /// The bytes moved (zeros when nothing moved).
    pub(crate) bytes: TransferBytes,
    /// Clients that acknowledged the move.
    pub(crate) clients_acked: u64,
    /// Clients that did not acknowledge it in time.
    pub(crate) clients_missing: u64,
    /// The phase that failed and was rolled back from, if any.
    pub(crate) rollback_phase: Option<Phase>,
}

/// The agent's metrics. Cheap to clone (one `Arc`); share it with every task.
#[derive(Clone, Debug)]
pub(crate) struct Metrics {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    registry: Registry,
    migrations: Family<MigrationLabels, Counter>,
    freeze: Histogram,
    transfer: Histogram,
    client_downtime: Histogram,
    transfer_bytes: Family<KindLabels, Counter>,
    clients_acked: Counter,
    clients_missing: Counter,
    rollbacks: Family<PhaseLabels, Counter>,
    requests: Family<RequestLabels, Counter>,
    refusals: Family<RefusalLabels, Counter>,
    services: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric, at zero.
    pub(crate) fn new() -> Self {
        let mut inner = Inner {
            registry: Registry::with_prefix(PREFIX),
            migrations: Family::default(),
            freeze: Histogram::new(PAUSE_BUCKETS),
            transfer: Histogram::new(TRANSFER_BUCKETS),
            client_downtime: Histogram::new(PAUSE_BUCKETS),
            transfer_bytes: Family::default(),
            clients_acked: Counter::default(),
            clients_missing: Counter::default(),
            rollbacks: Family::default(),
            requests: Family::default(),
            refusals: Family::default(),
            services: Gauge::default(),
        };
        let registry = &mut inner.registry;
        // Counters are registered without `_total`: the encoder appends it.
        registry.register(
            "migrations",
            "Migrations this agent took part in, by result and by its role",
            inner.migrations.clone(),
        );
        registry.register_with_unit(
            "freeze",
            "How long the service was frozen in a migration (dump start to restore done)",
            Unit::Seconds,
            inner.freeze.clone(),
        );
        registry.register_with_unit(
            "transfer",
            "How long an image set took to move between hosts",
            Unit::Seconds,
            inner.transfer.clone(),
        );
        registry.register_with_unit(
            "client_downtime",
            "Each client's pause across a migration, one observation per client",
            Unit::Seconds,
            inner.client_downtime.clone(),
        );
        registry.register_with_unit(
            "transfer",
            "Image set bytes moved: raw (as CRIU wrote them), compressed, sealed (on the wire)",
            Unit::Bytes,
            inner.transfer_bytes.clone(),
        );
        registry.register(
            "clients_acked",
            "Clients that acknowledged a migration",
            inner.clients_acked.clone(),
        );
        registry.register(
            "clients_missing",
            "Clients that did not acknowledge a migration in time",
            inner.clients_missing.clone(),
        );
        registry.register(
            "rollbacks",
            "Migrations rolled back, by the phase that failed",
            inner.rollbacks.clone(),
        );
        registry.register(
            "requests",
            "Requests to this agent, by request and outcome",
            inner.requests.clone(),
        );
        registry.register(
            "refusals",
            "Requests this agent refused, by reason",
            inner.refusals.clone(),
        );
        registry.register(
            "services",
            "Services running on this host",
            inner.services.clone(),
        );
        registry.register(
            "build",
            "This agent's build",
            Info::new([("version", env!("CARGO_PKG_VERSION"))]),
        );

        // `get_or_create` creates the series at zero; the guard it returns is dropped at once.
        for result in MigrationResult::ALL {
            for role in Role::ALL {
                drop(
                    inner
                        .migrations
                        .get_or_create(&MigrationLabels { result, role }),
                );
            }
        }
        for kind in Kind::ALL {
            drop(inner.transfer_bytes.get_or_create(&KindLabels { kind }));
        }
        for phase in Phase::ALL.into_iter().filter(|p| p.is_in_flight()) {
            drop(inner.rollbacks.get_or_create(&PhaseLabels {
                phase: PhaseLabel(phase),
            }));
        }
        for reason in Refusal::ALL {
            drop(inner.refusals.get_or_create(&RefusalLabels { reason }));
        }

        Self {
            inner: Arc::new(inner),
        }
    }

    /// Records one migration: its result, and every figure it carries.
    pub(crate) fn record_migration(&self, m: &MigrationOutcome) {
        let i = &self.inner;
        i.migrations
            .get_or_create(&MigrationLabels {
                result: m.result,
                role: m.role,
            })
            .inc();
        if let Some(d) = m.freeze {
            i.freeze.observe(d.as_secs_f64());
        }
        if let Some(d) = m.transfer {
            i.transfer.observe(d.as_secs_f64());
        }
        for (kind, n) in [
            (Kind::Raw, m.bytes.raw),
            (Kind::Compressed, m.bytes.compressed),
            (Kind::Sealed, m.bytes.sealed),
        ] {
            if n > 0 {
                i.transfer_bytes
                    .get_or_create(&KindLabels { kind })
                    .inc_by(n);
            }
        }
        i.clients_acked.inc_by(m.clients_acked);
        i.clients_missing.inc_by(m.clients_missing);
        if let Some(phase) = m.rollback_phase {
            i.rollbacks
                .get_or_create(&PhaseLabels {
                    phase: PhaseLabel(phase),
                })
                .inc();
        }
    }

    /// Records the pauses the clients reported for one move, one observation per client.
    /// They arrive after the move (each client reports at its first reply after it), at the
    /// host where the server runs then: the target's agent records them after a completed
    /// move, the source's after a rollback, so a move's are counted once over the fleet.
    pub(crate) fn record_client_downtimes(&self, downtimes: &[Duration]) {
        for d in downtimes {
            self.inner.client_downtime.observe(d.as_secs_f64());
        }
    }

    /// Records one request to the agent. `request` is the request's kind as the agent's code
    /// names it (snake_case, e.g. `"migrate"`; `"unknown"` when it did not parse): a
    /// compile-time name, never text from the network, so the label set stays small.
    /// A refusal also counts in `refusals_total{reason}`, so the refused requests and the
    /// refusals always add up to the same number.
    pub(crate) fn record_request(&self, request: &'static str, outcome: RequestOutcome) {
        debug_assert!(
            !request.is_empty()
                && request
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
            "request names are snake_case: {request:?}"
        );
        let i = &self.inner;
        let outcome_label = match outcome {
            RequestOutcome::Ok => Outcome::Ok,
            RequestOutcome::Refused(reason) => {
                i.refusals.get_or_create(&RefusalLabels { reason }).inc();
                Outcome::Refused
            }
        };
        i.requests
            .get_or_create(&RequestLabels {
                request,
                outcome: outcome_label,
            })
            .inc();
    }

    /// Sets how many services run on this host now.
    pub(crate) fn set_services(&self, n: usize) {
        self.inner
            .services
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// The OpenMetrics text of every metric, ending with `# EOF` (serve it as
    /// [`CONTENT_TYPE`]).
    pub(crate) fn encode(&self) -> String {
        let mut text = String::with_capacity(8 * 1024);
        // Writing to a String cannot fail and no label encoder here fails; should that ever
        // change, the text lacks its `# EOF` and scrapers refuse it, which is the right signal.
        if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &self.inner.registry) {
            tracing::error!("encoding the metrics failed: {e}");
        }
        text
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MigrationLabels {
    result: MigrationResult,
    role: Role,
}

#[derive(Copy, Clone, Debug, Hash, PartialEq, Eq)]
enum Kind {
    Raw,
    Compressed,
    Sealed,
}

impl Kind {
    const ALL: [Self; 3] = [Self::Raw, Self::Compressed, Self::Sealed];

    const fn as_str(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::Compressed => "compressed",
            Self::Sealed => "sealed",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: Kind,
}

/// migration-core's phase as a label value (its snake_case name).
#[derive(Copy, Clone, Debug, Hash, PartialEq, Eq)]
struct PhaseLabel(Phase);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: PhaseLabel,
}

#[derive(Copy, Clone, Debug, Hash, PartialEq, Eq)]
enum Outcome {
    Ok,
    Refused,
}

impl Outcome {
    const fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Refused => "refused",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    request: &'static str,
    outcome: Outcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    reason: Refusal,
}

/// `EncodeLabelValue` through each label type's snake_case `as_str`.
macro_rules! label_value {
    ($($t:ty => $f:expr),* $(,)?) => {$(
        impl EncodeLabelValue for $t {
            fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> std::fmt::Result {
                let name: fn(&$t) -> &'static str = $f;
                encoder.write_str(name(self))
            }
        }
    )*};
}

label_value! {
    MigrationResult => |v| v.as_str(),
    Role => |v| v.as_str(),
    Refusal => |v| v.as_str(),
    Kind => |v| v.as_str(),
    Outcome => |v| v.as_str(),
    PhaseLabel => |v| v.0.name(),
}

/// Reading the OpenMetrics text back, for tests: one sample per line.
#[cfg(test)]
pub(crate) mod parse {
    use std::collections::BTreeMap;

    /// One sample line: `name{label="value",...} value`.
    #[derive(Debug, PartialEq)]
    pub(crate) struct Sample {
        pub(crate) name: String,
        pub(crate) labels: BTreeMap<String, String>,
        pub(crate) value: f64,
    }

    /// Every sample of `text`; panics on a line that is not a comment or a sample, and on text
    /// that does not end with `# EOF`.
    pub(crate) fn samples(text: &str) -> Vec<Sample> {
        assert!(text.ends_with("# EOF\n"), "no EOF marker: {text}");
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| sample(l).unwrap_or_else(|| panic!("not a sample line: {l:?}")))
            .collect()
    }

    fn sample(line: &str) -> Option<Sample> {
        let name_end = line.find(['{', ' '])?;
        let name = line[..name_end].to_owned();
        let mut labels = BTreeMap::new();
        let mut rest = &line[name_end..];
        if let Some(mut inner) = rest.strip_prefix('{') {
            loop {
                if let Some(after) = inner.strip_prefix('}') {
                    rest = after;
                    break;
                }
                let (key, after) = inner.split_once("=\"")?;
                let mut value = String::new();
                let mut chars = after.char_indices();
                let end = loop {
                    match chars.next()? {
                        (i, '"') => break i,
                        (_, '\\') => match chars.next()?.1 {
                            'n' => value.push('\n'),
                            c => value.push(c),
                        },
                        (_, c) => value.push(c),
                    }
                };
                labels.insert(key.to_owned(), value);
                inner = &after[end + 1..];
                inner = inner.strip_prefix(',').unwrap_or(inner);
            }
        }
        let value = rest.strip_prefix(' ')?;
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().ok()?,
        };
        Some(Sample {
            name,
            labels,
            value,
        })
    }

    /// The value of the sample called `name` whose labels are exactly `labels`.
    pub(crate) fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let mut found = samples
            .iter()
            .filter(|s| s.name == name && s.labels == want);
        let first = found.next()?;
        assert!(found.next().is_none(), "two samples {name} {labels:?}");
        Some(first.value)
    }

    #[test]
    fn lines_parse() {
        let s = samples(
            "# HELP a b\na_total{x=\"1\",y=\"q\\\"z\"} 3\nb 0.5\nc_bucket{le=\"+Inf\"} 2\n# EOF\n",
        );
        assert_eq!(
            value(&s, "a_total", &[("x", "1"), ("y", "q\"z")]),
            Some(3.0)
        );
        assert_eq!(value(&s, "b", &[]), Some(0.5));
        assert_eq!(value(&s, "c_bucket", &[("le", "+Inf")]), Some(2.0));
        assert_eq!(value(&s, "a_total", &[("x", "1")]), None);
    }
}

#[cfg(test)]
mod tests {
    use super::parse::{samples, value};
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn completed() -> MigrationOutcome {
        MigrationOutcome {
            result: MigrationResult::Completed,
            role: Role::Source,
            freeze: Some(ms(26)),
            transfer: Some(ms(180)),
            bytes: TransferBytes {
                raw: 10_000,
                compressed: 4_000,
                sealed: 4_100,
            },
            clients_acked: 3,
            clients_missing: 0,
            rollback_phase: None,
        }
    }

    /// The HELP, TYPE and UNIT lines: the names, types and help texts dashboards rely on
    /// (the encoder ends every help text with a full stop; a counter's family name has no
    /// `_total`, its samples do). Changing one is changing a contract: update the module's
    /// table and the dashboards too.
    const DOCUMENTED: &str = "\
# HELP qlm_agent_migrations Migrations this agent took part in, by result and by its role.
# TYPE qlm_agent_migrations counter
# HELP qlm_agent_freeze_seconds How long the service was frozen in a migration (dump start to restore done).
# TYPE qlm_agent_freeze_seconds histogram
# UNIT qlm_agent_freeze_seconds seconds
# HELP qlm_agent_transfer_seconds How long an image set took to move between hosts.
# TYPE qlm_agent_transfer_seconds histogram
# UNIT qlm_agent_transfer_seconds seconds
# HELP qlm_agent_client_downtime_seconds Each client's pause across a migration, one observation per client.
# TYPE qlm_agent_client_downtime_seconds histogram
# UNIT qlm_agent_client_downtime_seconds seconds
# HELP qlm_agent_transfer_bytes Image set bytes moved: raw (as CRIU wrote them), compressed, sealed (on the wire).
# TYPE qlm_agent_transfer_bytes counter
# UNIT qlm_agent_transfer_bytes bytes
# HELP qlm_agent_clients_acked Clients that acknowledged a migration.
# TYPE qlm_agent_clients_acked counter
# HELP qlm_agent_clients_missing Clients that did not acknowledge a migration in time.
# TYPE qlm_agent_clients_missing counter
# HELP qlm_agent_rollbacks Migrations rolled back, by the phase that failed.
# TYPE qlm_agent_rollbacks counter
# HELP qlm_agent_requests Requests to this agent, by request and outcome.
# TYPE qlm_agent_requests counter
# HELP qlm_agent_refusals Requests this agent refused, by reason.
# TYPE qlm_agent_refusals counter
# HELP qlm_agent_services Services running on this host.
# TYPE qlm_agent_services gauge
# HELP qlm_agent_build This agent's build.
# TYPE qlm_agent_build info
# EOF
";

    #[test]
    fn help_and_type_lines_stay_as_documented() {
        let m = Metrics::new();
        // The only family without series at start (its `request` values are not known).
        m.record_request("status", RequestOutcome::Ok);
        let text = m.encode();
        let comments: String = text
            .lines()
            .filter(|l| l.starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(comments, DOCUMENTED, "the full text:\n{text}");
    }

    /// The text is OpenMetrics (the `# EOF` marker, `# UNIT` lines, `info` and `_total`
    /// samples that the Prometheus 0.0.4 text format lacks), so it is served as such.
    #[test]
    fn the_content_type_names_the_encoders_format() {
        assert_eq!(
            CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8"
        );
        let text = Metrics::new().encode();
        assert!(text.ends_with("\n# EOF\n"), "{text}");
        assert!(text.contains("\n# UNIT qlm_agent_freeze_seconds seconds\n"));
        assert!(text.contains("\n# TYPE qlm_agent_build info\n"));
    }

    /// The label sets of every series at start: every documented value is there, at zero.
    #[test]
    fn every_documented_label_value_starts_at_zero() {
        let s = samples(&Metrics::new().encode());
        for result in ["completed", "rolled_back", "failed"] {
            for role in ["source", "target"] {
                let labels = [("result", result), ("role", role)];
                assert_eq!(value(&s, "qlm_agent_migrations_total", &labels), Some(0.0));
            }
        }
        for kind in ["raw", "compressed", "sealed"] {
            assert_eq!(
                value(&s, "qlm_agent_transfer_bytes_total", &[("kind", kind)]),
                Some(0.0)
            );
        }
        for phase in [
            "preparing",
            "quiescing",
            "dumping",
            "transferring",
            "restoring",
            "resuming",
        ] {
            assert_eq!(
                value(&s, "qlm_agent_rollbacks_total", &[("phase", phase)]),
                Some(0.0)
            );
        }
        for reason in [
            "bad_token",
            "expired",
            "replayed",
            "not_allowed",
            "rate_limited",
            "bad_certificate",
            "malformed",
            "oversized",
            "unknown_service",
        ] {
            assert_eq!(
                value(&s, "qlm_agent_refusals_total", &[("reason", reason)]),
                Some(0.0)
            );
        }
        assert_eq!(value(&s, "qlm_agent_clients_acked_total", &[]), Some(0.0));
        assert_eq!(value(&s, "qlm_agent_clients_missing_total", &[]), Some(0.0));
        assert_eq!(value(&s, "qlm_agent_services", &[]), Some(0.0));
        assert_eq!(value(&s, "qlm_agent_freeze_seconds_count", &[]), Some(0.0));
        assert_eq!(
            value(
                &s,
                "qlm_agent_build_info",
                &[("version", env!("CARGO_PKG_VERSION"))]
            ),
            Some(1.0)
        );
        // Nothing else: every series is one of the documented names.
        let names = [
            "qlm_agent_migrations_total",
            "qlm_agent_transfer_bytes_total",
            "qlm_agent_rollbacks_total",
            "qlm_agent_refusals_total",
            "qlm_agent_clients_acked_total",
            "qlm_agent_clients_missing_total",
            "qlm_agent_services",
            "qlm_agent_build_info",
        ];
        for sample in &s {
            let histogram = ["freeze", "transfer", "client_downtime"].iter().any(|h| {
                ["_sum", "_count", "_bucket"]
                    .iter()
                    .any(|suffix| sample.name == format!("qlm_agent_{h}_seconds{suffix}"))
            });
            assert!(
                histogram || names.contains(&sample.name.as_str()),
                "undocumented series {sample:?}"
            );
        }
    }

    #[test]
    fn a_migration_counts_in_every_figure() {
        let m = Metrics::new();
        m.record_migration(&completed());
        m.record_client_downtimes(&[ms(32), ms(40), ms(250)]);
        m.record_migration(&MigrationOutcome {
            result: MigrationResult::RolledBack,
            role: Role::Source,
            freeze: None,
            transfer: None,
            bytes: TransferBytes::default(),
            clients_acked: 1,
            clients_missing: 2,
            rollback_phase: Some(Phase::Dumping),
        });
        m.record_client_downtimes(&[ms(5)]);
        let s = samples(&m.encode());
        let v = |name: &str, labels: &[(&str, &str)]| {
            value(&s, name, labels).unwrap_or_else(|| panic!("no {name} {labels:?}"))
        };
        let migrations = "qlm_agent_migrations_total";
        assert_eq!(
            v(migrations, &[("result", "completed"), ("role", "source")]),
            1.0
        );
        assert_eq!(
            v(migrations, &[("result", "rolled_back"), ("role", "source")]),
            1.0
        );
        assert_eq!(
            v(migrations, &[("result", "completed"), ("role", "target")]),
            0.0
        );
        assert_eq!(v("qlm_agent_rollbacks_total", &[("phase", "dumping")]), 1.0);
        assert_eq!(
            v("qlm_agent_rollbacks_total", &[("phase", "restoring")]),
            0.0
        );
        assert_eq!(v("qlm_agent_clients_acked_total", &[]), 4.0);
        assert_eq!(v("qlm_agent_clients_missing_total", &[]), 2.0);
        let bytes = "qlm_agent_transfer_bytes_total";
        assert_eq!(v(bytes, &[("kind", "raw")]), 10_000.0);
        assert_eq!(v(bytes, &[("kind", "compressed")]), 4_000.0);
        assert_eq!(v(bytes, &[("kind", "sealed")]), 4_100.0);

        // Histograms: counts, sums, and cumulative buckets at the right bounds.
        assert_eq!(v("qlm_agent_freeze_seconds_count", &[]), 1.0);
        assert!((v("qlm_agent_freeze_seconds_sum", &[]) - 0.026).abs() < 1e-9);
        assert_eq!(v("qlm_agent_freeze_seconds_bucket", &[("le", "0.02")]), 0.0);
        assert_eq!(v("qlm_agent_freeze_seconds_bucket", &[("le", "0.03")]), 1.0);
        assert_eq!(v("qlm_agent_transfer_seconds_count", &[]), 1.0);
        assert_eq!(
            v("qlm_agent_transfer_seconds_bucket", &[("le", "60.0")]),
            1.0
        );
        let downtime = "qlm_agent_client_downtime_seconds";
        assert_eq!(v(&format!("{downtime}_count"), &[]), 4.0);
        assert!((v(&format!("{downtime}_sum"), &[]) - 0.327).abs() < 1e-9);
        assert_eq!(v(&format!("{downtime}_bucket"), &[("le", "0.001")]), 0.0);
        assert_eq!(v(&format!("{downtime}_bucket"), &[("le", "0.005")]), 1.0);
        assert_eq!(v(&format!("{downtime}_bucket"), &[("le", "0.04")]), 3.0);
        assert_eq!(v(&format!("{downtime}_bucket"), &[("le", "0.2")]), 3.0);
        assert_eq!(v(&format!("{downtime}_bucket"), &[("le", "0.3")]), 4.0);
        assert_eq!(v(&format!("{downtime}_bucket"), &[("le", "10.0")]), 4.0);
        assert_eq!(v(&format!("{downtime}_bucket"), &[("le", "+Inf")]), 4.0);
    }

    #[test]
    fn refused_requests_and_refusals_add_up() {
        let m = Metrics::new();
        m.record_request("migrate", RequestOutcome::Ok);
        m.record_request("migrate", RequestOutcome::Ok);
        m.record_request("migrate", RequestOutcome::Refused(Refusal::Replayed));
        m.record_request("unknown", RequestOutcome::Refused(Refusal::Malformed));
        m.set_services(2);
        let s = samples(&m.encode());
        let requests = "qlm_agent_requests_total";
        assert_eq!(
            value(&s, requests, &[("request", "migrate"), ("outcome", "ok")]),
            Some(2.0)
        );
        assert_eq!(
            value(
                &s,
                requests,
                &[("request", "migrate"), ("outcome", "refused")]
            ),
            Some(1.0)
        );
        assert_eq!(
            value(
                &s,
                requests,
                &[("request", "unknown"), ("outcome", "refused")]
            ),
            Some(1.0)
        );
        let refusals = "qlm_agent_refusals_total";
        assert_eq!(value(&s, refusals, &[("reason", "replayed")]), Some(1.0));
        assert_eq!(value(&s, refusals, &[("reason", "malformed")]), Some(1.0));
        assert_eq!(value(&s, refusals, &[("reason", "bad_token")]), Some(0.0));
        let refused: f64 = s
            .iter()
            .filter(|x| x.name == requests && x.labels["outcome"] == "refused")
            .map(|x| x.value)
            .sum();
        let reasons: f64 = s
            .iter()
            .filter(|x| x.name == refusals)
            .map(|x| x.value)
            .sum();
        assert_eq!(refused, reasons);
        assert_eq!(value(&s, "qlm_agent_services", &[]), Some(2.0));
    }

    #[test]
    fn clones_share_one_registry_across_threads() {
        let m = Metrics::new();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let m = m.clone();
                std::thread::spawn(move || {
                    for _ in 0..100 {
                        m.record_request("status", RequestOutcome::Ok);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("a recording thread panicked");
        }
        let s = samples(&m.encode());
        assert_eq!(
            value(
                &s,
                "qlm_agent_requests_total",
                &[("request", "status"), ("outcome", "ok")]
            ),
            Some(400.0)
        );
    }
}
