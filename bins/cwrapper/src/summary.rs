//! The summary of a client process that holds several connections (the demo binary's
//! `--connections N`, N > 1): pure, over the connections' own reports.
//!
//! ```text
//!  connection 0 ──► ClientReport, alive ─┐
//!  connection 1 ──► ClientReport, alive ─┼─► summarize ──► ClientsSummary (counts, errors,
//!  connection 2 ──► never started: why ──┘                 per migration: each connection's
//!                                                          downtime, p50 / p95 / max)
//! ```

use std::net::SocketAddr;

use admin_api::{
    ClientReport, ClientsSummary, ConnectionError, MigrationDowntimes, Percentiles, Phases,
};

/// How one connection of the process ended.
#[derive(Debug, Clone, PartialEq)]
pub struct ConnectionResult {
    /// Its index (0-based): its client id is `<client id>-<index>`.
    pub index: usize,
    /// Its client id.
    pub client_id: String,
    /// What happened to it.
    pub outcome: ConnectionOutcome,
}

/// Whether a connection ran, and how it ended.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ConnectionOutcome {
    /// It never connected (handshake, `Hello`, or the client stopped first): why.
    NotStarted(String),
    /// It ran.
    Ran {
        /// Its report, as a single-connection client writes it.
        report: Box<ClientReport>,
        /// It ran until the client stopped, its QUIC connection still open (not ended by a
        /// failed check or a lost server).
        alive: bool,
    },
}

/// Whether the connection's echoes went over more than one QUIC connection, or it completed
/// more than one handshake (it did not survive a move as the same connection).
fn reconnected(r: &ClientReport) -> bool {
    r.connections > 1 || r.handshakes > 1
}

/// Summarizes the connections of one process. `requested` is `--connections`; `results`
/// holds at most one entry per index below it (a missing index counts as never started).
pub fn summarize(
    target: SocketAddr,
    client_id: &str,
    requested: usize,
    results: &[ConnectionResult],
) -> ClientsSummary {
    let mut s = ClientsSummary {
        target,
        client_id: client_id.to_owned(),
        connections_requested: requested as u64,
        connections_started: 0,
        connections_alive: 0,
        connections_reconnected: 0,
        connections_failed: 0,
        echoes: 0,
        failed_attempts: 0,
        migrations: Vec::new(),
        errors: Vec::new(),
        verified: false,
    };
    let mut failed = 0u64;
    let error = |s: &mut ClientsSummary, r: &ConnectionResult, what: String| {
        s.errors.push(ConnectionError {
            connection: r.index as u64,
            client_id: r.client_id.clone(),
            error: what,
        });
    };
    for r in results {
        let (report, alive) = match &r.outcome {
            ConnectionOutcome::NotStarted(why) => {
                failed += 1;
                error(&mut s, r, format!("not started: {why}"));
                continue;
            }
            ConnectionOutcome::Ran { report, alive } => (report, *alive),
        };
        s.connections_started += 1;
        s.echoes += report.echoes;
        s.failed_attempts += report.failed_attempts;
        let mut ok = report.verified;
        if let Some(e) = &report.error {
            error(&mut s, r, e.clone());
        } else if !report.verified {
            error(&mut s, r, "not verified".to_owned());
        }
        if alive {
            s.connections_alive += 1;
        } else {
            ok = false;
            if report.error.is_none() {
                error(&mut s, r, "connection lost before the end".to_owned());
            }
        }
        if reconnected(report) {
            ok = false;
            s.connections_reconnected += 1;
            error(
                &mut s,
                r,
                format!(
                    "reconnected: {} QUIC connections, {} handshakes",
                    report.connections, report.handshakes
                ),
            );
        }
        if !ok {
            failed += 1;
        }
        for m in &report.migrations {
            let i = match s
                .migrations
                .iter()
                .position(|g| g.id == m.id && g.aborted == m.aborted)
            {
                Some(i) => i,
                None => {
                    s.migrations.push(MigrationDowntimes {
                        id: m.id.clone(),
                        new_addr: m.new_addr,
                        aborted: m.aborted,
                        seen: 0,
                        quiesced: 0,
                        completed: 0,
                        downtimes_ms: vec![None; requested],
                        downtime: None,
                    });
                    s.migrations.len() - 1
                }
            };
            let g = &mut s.migrations[i];
            g.seen += 1;
            g.quiesced += u64::from(m.phases == Phases::Two);
            g.completed += u64::from(m.completed);
            if let Some(slot) = g.downtimes_ms.get_mut(r.index) {
                *slot = m.downtime_ms;
            }
        }
    }
    // Indexes with no result at all never started either.
    let missing = requested.saturating_sub(results.len()) as u64;
    failed += missing;
    s.connections_failed = failed;
    for g in &mut s.migrations {
        let measured: Vec<f64> = g.downtimes_ms.iter().flatten().copied().collect();
        g.downtime = Percentiles::of(&measured);
    }
    s.verified = requested > 0
        && failed == 0
        && s.connections_started == requested as u64
        && s.connections_alive == s.connections_started
        && s.connections_reconnected == 0;
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use admin_api::ClientMigration;

    fn record(id: &str, downtime: Option<f64>, phases: Phases) -> ClientMigration {
        ClientMigration {
            id: id.to_owned(),
            new_addr: "127.0.0.1:9".parse().unwrap(),
            aborted: false,
            phases,
            seen_at_ms: 1.0,
            last_echo_before_ms: None,
            first_echo_after_ms: None,
            downtime_ms: downtime,
            failed_attempts: 0,
            completed: downtime.is_some(),
            rolled_back: false,
            peer_after: None,
        }
    }

    fn ran(index: usize, migrations: Vec<ClientMigration>) -> ConnectionResult {
        let verified = migrations.iter().all(|m| m.completed);
        ConnectionResult {
            index,
            client_id: format!("c-{index}"),
            outcome: ConnectionOutcome::Ran {
                report: Box::new(ClientReport {
                    target: "127.0.0.1:8".parse().unwrap(),
                    stable_id: 1,
                    connections: 1,
                    handshakes: 1,
                    echoes: 10,
                    failed_attempts: 1,
                    migrations,
                    control: "open".to_owned(),
                    foreign_datagrams_dropped: 0,
                    verified,
                    error: None,
                }),
                alive: true,
            },
        }
    }

    fn target() -> SocketAddr {
        "127.0.0.1:8".parse().unwrap()
    }

    #[test]
    fn every_connection_fine_is_verified_with_percentiles_per_migration() {
        let results: Vec<_> = (0..4)
            .map(|k| {
                ran(
                    k,
                    vec![
                        record("a", Some(10.0 * (k + 1) as f64), Phases::One),
                        record("b", Some(1.0 + k as f64), Phases::Two),
                    ],
                )
            })
            .collect();
        let s = summarize(target(), "c", 4, &results);
        assert!(s.verified, "{s:#?}");
        assert_eq!(
            (
                s.connections_started,
                s.connections_alive,
                s.connections_reconnected,
                s.connections_failed
            ),
            (4, 4, 0, 0)
        );
        assert_eq!((s.echoes, s.failed_attempts), (40, 4));
        assert!(s.errors.is_empty());
        let [a, b] = &s.migrations[..] else {
            panic!("{s:#?}")
        };
        assert_eq!(
            a.downtimes_ms,
            [Some(10.0), Some(20.0), Some(30.0), Some(40.0)]
        );
        assert_eq!((a.seen, a.quiesced, a.completed), (4, 0, 4));
        assert_eq!(
            a.downtime,
            Some(Percentiles {
                p50_ms: 20.0,
                p95_ms: 40.0,
                max_ms: 40.0
            })
        );
        assert_eq!((b.id.as_str(), b.quiesced), ("b", 4));
    }

    #[test]
    fn a_lost_a_reconnected_and_a_never_started_connection_fail_the_summary() {
        let mut lost = ran(1, vec![record("a", None, Phases::One)]);
        if let ConnectionOutcome::Ran { report, alive } = &mut lost.outcome {
            report.error = Some("server unreachable".to_owned());
            report.verified = false;
            *alive = false;
        }
        let mut again = ran(2, vec![record("a", Some(5.0), Phases::One)]);
        if let ConnectionOutcome::Ran { report, .. } = &mut again.outcome {
            report.handshakes = 2;
        }
        let never = ConnectionResult {
            index: 3,
            client_id: "c-3".to_owned(),
            outcome: ConnectionOutcome::NotStarted("no handshake".to_owned()),
        };
        let results = vec![
            ran(0, vec![record("a", Some(7.0), Phases::One)]),
            lost,
            again,
            never,
        ];
        // Index 4 has no result at all.
        let s = summarize(target(), "c", 5, &results);
        assert!(!s.verified);
        assert_eq!(
            (
                s.connections_started,
                s.connections_alive,
                s.connections_reconnected,
                s.connections_failed
            ),
            (3, 2, 1, 4)
        );
        let who: Vec<u64> = s.errors.iter().map(|e| e.connection).collect();
        assert_eq!(who, [1, 2, 3], "{:#?}", s.errors);
        assert!(s.errors[0].error.contains("server unreachable"));
        assert!(s.errors[1].error.contains("2 handshakes"));
        assert!(s.errors[2].error.contains("not started: no handshake"));
        let a = &s.migrations[0];
        assert_eq!(a.downtimes_ms, [Some(7.0), None, Some(5.0), None, None]);
        assert_eq!((a.seen, a.completed), (3, 2));
        assert_eq!(a.downtime.map(|d| d.max_ms), Some(7.0));
    }

    #[test]
    fn an_abort_is_its_own_entry_and_no_measure_gives_no_percentiles() {
        let mut abort = record("a", None, Phases::One);
        abort.aborted = true;
        let s = summarize(
            target(),
            "c",
            1,
            &[ran(0, vec![record("a", None, Phases::One), abort])],
        );
        assert_eq!(s.migrations.len(), 2);
        assert!(s.migrations[1].aborted);
        assert_eq!(s.migrations[0].downtime, None);
        // Neither record completed: the connection's own report is not verified.
        assert!(!s.verified);
        assert!(!summarize(target(), "c", 0, &[]).verified);
    }
}
