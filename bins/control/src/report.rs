//! Reports: writing them, summarising them for people, and checking a run against what the
//! client and the server observed.

use std::net::SocketAddr;
use std::path::Path;

use admin_api::{
    ClientReport, MoveReport, MoveResult, PortProbe, RunReport, RunRow, RunSummary, median,
};
use anyhow::{Context, Result};

/// Writes `value` as pretty JSON.
pub(crate) fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value).context("encoding the report")?;
    crate::secure::write_private(path, text.as_bytes())
}

/// Reads a JSON report.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not a valid report", path.display()))
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "?".to_owned(), |x| format!("{x:.1}"))
}

/// Prints the readable summary of one migration on stdout.
pub(crate) fn print_move(r: &MoveReport) {
    print!("{}", move_summary(r));
}

/// The readable summary of one migration.
pub(crate) fn move_summary(r: &MoveReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "migration {} {} -> {}: {}",
        r.migration_id, r.from, r.to, r.result
    );
    if let Some(f) = &r.failure {
        let _ = writeln!(out, "  failure: {f}");
    }
    let _ = writeln!(
        out,
        "  announce {} ms, freeze {} ms (dump {} ms, restore {} ms), image set {} KiB",
        ms(r.announce.as_ref().map(|a| a.outcome.elapsed_ms)),
        ms(r.freeze_ms()),
        ms(r.dump.as_ref().map(|d| d.wall_ms)),
        ms(r.restore.as_ref().map(|d| d.wall_ms)),
        r.image_bytes
            .map_or_else(|| "?".to_owned(), |b| (b / 1024).to_string()),
    );
    if let Some(a) = &r.announce {
        let _ = writeln!(out, "  clients: {}", clients_line(a, r.front));
    }
    if let (Some(a), Some(b)) = (
        r.dump.as_ref().and_then(|d| d.startup_ms),
        r.restore.as_ref().and_then(|d| d.startup_ms),
    ) {
        let _ = writeln!(out, "  criu start-up: dump {a:.1} ms, restore {b:.1} ms");
    }
    if let Some(p) = &r.post_copy {
        match &p.error {
            None => {
                let _ = writeln!(
                    out,
                    "  post-copy ({}): every page resident {} ms after the restore, {} KiB",
                    p.transport,
                    ms(p.resident_after_ms),
                    p.bytes_transferred
                        .map_or_else(|| "?".to_owned(), |b| (b / 1024).to_string()),
                );
            }
            Some(e) => {
                let _ = writeln!(out, "  POST-COPY PAGE TRANSFER FAILED: {e}");
            }
        }
    }
    if let (Some(s), Some(t)) = (r.source_probe, r.target_probe) {
        let _ = writeln!(
            out,
            "  after the move: the source's address {s:?}, the target's {t:?}"
        );
    }
    let t = &r.timeline;
    if let (Some(median), Some(max)) = (t.client_downtime_median, t.client_downtime_max) {
        let _ = writeln!(
            out,
            "  downtime reported by {} clients: median {:.1} ms, max {:.1} ms",
            t.sessions_reporting(),
            median.as_secs_f64() * 1e3,
            max.as_secs_f64() * 1e3,
        );
    }
    out
}

/// Who was told and who could not be: the wrapper-aware clients' acks, and the plain QUIC
/// clients (no control stream), which are lost in the announce mode but kept by a front
/// (`front`: the stable-address mode keeps their 4-tuple).
fn clients_line(a: &admin_api::Announced, front: bool) -> String {
    let o = &a.outcome;
    let mut line = format!("{} acked, {} missing", o.acked.len(), o.missing.len());
    let plain = o.cannot_follow.len();
    if plain > 0 {
        if front {
            line.push_str(&format!("; plain clients: {plain} (kept by the front)"));
        } else {
            line.push_str(&format!(
                "; plain clients: {plain} cannot follow (no control stream; they keep working \
                 only if their address stays, i.e. behind a --front)"
            ));
        }
    }
    line
}

/// What a run is checked against.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bounds {
    /// The longest client pause accepted for any migration.
    pub(crate) max_pause_ms: f64,
}

/// Joins each migration with what the client saw of it, and checks the run: every figure is
/// there, every pause within the bound, one connection and one handshake on both sides, and
/// after each migration the client's real peer is where the server should be.
pub(crate) fn summarize(
    route: &str,
    migrations: Vec<MoveReport>,
    client: Option<ClientReport>,
    client_exit: Option<i32>,
    bounds: Bounds,
) -> RunReport {
    let mut problems = Vec::new();
    let records = client.as_ref().map_or(&[][..], |c| &c.migrations[..]);
    let mut rows = Vec::new();
    for m in &migrations {
        let id = m.migration_id.to_string();
        let mine: Vec<_> = records.iter().filter(|r| r.id == id).collect();
        // The client's record of the Migrate measures the pause; when the move was rolled
        // back, the pause may end in the record of the abort instead: the longest counts.
        let downtime = mine.iter().filter_map(|r| r.downtime_ms).reduce(f64::max);
        // Where the client's datagrams came from at the end of the migration: the last record
        // (the abort's, after a rollback).
        let peer_after = mine.last().and_then(|r| r.peer_after);
        let expected_peer: SocketAddr = match m.result {
            MoveResult::Completed => m.target_addr,
            MoveResult::RolledBack | MoveResult::Failed => m.source_addr,
        };
        let handshakes = m.server_handshakes();
        match downtime {
            None => problems.push(format!("migration {id}: the client reported no pause")),
            Some(d) if d > bounds.max_pause_ms => problems.push(format!(
                "migration {id}: the client paused {d:.1} ms, more than the bound of {:.0} ms",
                bounds.max_pause_ms
            )),
            Some(_) => {}
        }
        if handshakes != Some(1) {
            problems.push(format!(
                "migration {id}: the server counted {handshakes:?} handshakes, expected 1"
            ));
        }
        if peer_after != Some(expected_peer) {
            problems.push(format!(
                "migration {id} ({}): the client's real peer afterwards is {}, expected {expected_peer}",
                m.result,
                peer_after.map_or_else(|| "unknown".to_owned(), |p| p.to_string())
            ));
        }
        if m.result == MoveResult::Completed {
            // A recovered migration's figures died with the control that was killed; what
            // the recovery observed is checked all the same.
            if m.recovered_after.is_none() && m.freeze_ms().is_none() {
                problems.push(format!("migration {id}: no freeze figure"));
            }
            if m.recovered_after.is_none() && (m.dump.is_none() || m.restore.is_none()) {
                problems.push(format!("migration {id}: no dump or restore figure"));
            }
            match &m.placement {
                Some(p) if p.is_right() => {}
                Some(p) => problems.push(format!(
                    "migration {id}: the restored server runs outside {}'s network namespace",
                    p.expected_container
                )),
                None => problems.push(format!("migration {id}: placement not observed")),
            }
            if m.source_probe == Some(PortProbe::Answered) || m.source_probe.is_none() {
                problems.push(format!(
                    "migration {id}: the source's address {:?} after the move",
                    m.source_probe
                ));
            }
            if m.target_probe != Some(PortProbe::Answered) {
                problems.push(format!(
                    "migration {id}: the target's address {:?} after the move",
                    m.target_probe
                ));
            }
        }
        rows.push(RunRow {
            id,
            from: m.from.clone(),
            to: m.to.clone(),
            result: m.result,
            freeze_ms: m.freeze_ms(),
            dump_ms: m.dump.as_ref().map(|d| d.wall_ms),
            dump_criu_startup_ms: m.dump.as_ref().and_then(|d| d.startup_ms),
            restore_ms: m.restore.as_ref().map(|d| d.wall_ms),
            restore_criu_startup_ms: m.restore.as_ref().and_then(|d| d.startup_ms),
            image_bytes: m.image_bytes,
            client_downtime_ms: downtime,
            server_handshakes: handshakes,
            client_peer_after: peer_after,
            expected_peer,
        });
    }
    match &client {
        None => problems.push("the client wrote no report".to_owned()),
        Some(c) => {
            if !c.verified {
                problems.push(format!(
                    "the client's checks failed: {}",
                    c.error.as_deref().unwrap_or("not verified")
                ));
            }
            if c.control != "open" {
                problems.push(format!("the client's control stream: {}", c.control));
            }
            if c.connections != 1 {
                problems.push(format!(
                    "the client's echoes went over {} QUIC connections, expected 1",
                    c.connections
                ));
            }
            if c.handshakes != 1 {
                problems.push(format!(
                    "the client made {} handshakes, expected 1",
                    c.handshakes
                ));
            }
        }
    }
    if client_exit != Some(0) {
        problems.push(format!("the client exited with {client_exit:?}"));
    }
    let completed: Vec<&RunRow> = rows
        .iter()
        .filter(|r| r.result == MoveResult::Completed)
        .collect();
    let pick = |f: fn(&RunRow) -> Option<f64>| -> Option<f64> {
        median(completed.iter().filter_map(|r| f(r)).collect())
    };
    let summary = RunSummary {
        completed: completed.len(),
        client_downtime_median_ms: pick(|r| r.client_downtime_ms),
        freeze_median_ms: pick(|r| r.freeze_ms),
        dump_median_ms: pick(|r| r.dump_ms),
        restore_median_ms: pick(|r| r.restore_ms),
        dump_criu_startup_median_ms: pick(|r| r.dump_criu_startup_ms),
        restore_criu_startup_median_ms: pick(|r| r.restore_criu_startup_ms),
        echoes: client.as_ref().map_or(0, |c| c.echoes),
        client_verified: client.as_ref().is_some_and(|c| c.verified),
        rows,
    };
    RunReport {
        route: route.to_owned(),
        summary,
        migrations,
        client,
        client_exit,
        problems,
    }
}

/// Prints a run's table and problems.
pub(crate) fn print_run(r: &RunReport) {
    let s = &r.summary;
    println!(
        "\n{:<34} {:<10} {:<10} {:>11} {:>9} {:>10} {:>11} {:>10}",
        "migration", "from", "to", "result", "freeze", "dump", "restore", "pause"
    );
    for row in &s.rows {
        println!(
            "{:<34} {:<10} {:<10} {:>11} {:>6} ms {:>7} ms {:>8} ms {:>7} ms",
            row.id,
            row.from,
            row.to,
            row.result.to_string(),
            ms(row.freeze_ms),
            ms(row.dump_ms),
            ms(row.restore_ms),
            ms(row.client_downtime_ms),
        );
    }
    println!(
        "client: {} echoes, verified: {}; medians over completed moves: pause {} ms, freeze {} ms",
        s.echoes,
        s.client_verified,
        ms(s.client_downtime_median_ms),
        ms(s.freeze_median_ms),
    );
    for p in &r.problems {
        println!("PROBLEM: {p}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use admin_api::{ClientMigration, CriuTiming, Placement, Resumed};
    use migration_core::{Event, Migration, MigrationId, Timestamp};

    const SRC: &str = "127.0.0.1:5242";
    const DST: &str = "127.0.0.1:5243";

    fn id(n: u8) -> MigrationId {
        MigrationId::from_bytes([n; 16])
    }

    #[test]
    fn the_move_summary_gives_the_downtime_the_clients_reported() {
        let mut r = completed(1);
        assert!(!move_summary(&r).contains("downtime"), "none reported");
        let mut m = Migration::new(id(1), Timestamp::from_micros(0));
        m.report_downtime(
            migration_core::SessionId(1),
            std::time::Duration::from_millis(30),
        );
        m.report_downtime(
            migration_core::SessionId(2),
            std::time::Duration::from_millis(41),
        );
        let t = m.report();
        r.timeline.client_downtime = t.client_downtime;
        r.timeline.client_downtime_median = t.client_downtime_median;
        r.timeline.client_downtime_max = t.client_downtime_max;
        let text = move_summary(&r);
        assert!(
            text.contains("downtime reported by 2 clients: median 35.5 ms, max 41.0 ms"),
            "{text}"
        );
    }

    fn announced(acked: usize, plain: &[u64]) -> admin_api::Announced {
        let client = |n: usize| admin_api::ClientRef {
            session: n as u64,
            client_id: format!("c{n}"),
        };
        admin_api::Announced {
            phases: admin_api::Phases::One,
            quiesce: None,
            outcome: admin_api::AnnounceOutcome {
                address: DST.parse().unwrap(),
                acked: (0..acked).map(client).collect(),
                missing: vec![],
                cannot_follow: plain.to_vec(),
                elapsed_ms: 1.0,
            },
            parked: true,
            handshakes: 1,
        }
    }

    #[test]
    fn the_move_summary_says_whether_plain_clients_follow() {
        let mut r = completed(1);
        r.announce = Some(announced(2, &[]));
        let text = move_summary(&r);
        assert!(text.contains("clients: 2 acked, 0 missing\n"), "{text}");
        // The announce mode: plain clients are lost, and the line says why.
        r.announce = Some(announced(2, &[7, 8]));
        let text = move_summary(&r);
        assert!(
            text.contains("clients: 2 acked, 0 missing; plain clients: 2 cannot follow"),
            "{text}"
        );
        assert!(text.contains("behind a --front"), "{text}");
        // Behind a front they keep their address: not called lost.
        r.front = true;
        let text = move_summary(&r);
        assert!(
            text.contains("plain clients: 2 (kept by the front)"),
            "{text}"
        );
        assert!(!text.contains("cannot follow"), "{text}");
        // The report still parses as it did, and round-trips with the new fields.
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<MoveReport>(&json).unwrap(), r);
        r.front = false;
        r.announce = Some(announced(1, &[]));
        let json = serde_json::to_string(&r).unwrap();
        assert!(
            !json.contains("front") && !json.contains("cannot_follow"),
            "{json}"
        );
    }

    /// A completed move A -> B as the engine reports it, every observation right.
    fn completed(n: u8) -> MoveReport {
        let mut m = Migration::new(id(n), Timestamp::from_micros(0));
        for (t, e) in [
            (1, Event::Start),
            (2, Event::BeginDump),
            (
                50_000,
                Event::DumpDone {
                    image_bytes: Some(1),
                },
            ),
            (50_001, Event::TransferDone),
            (100_000, Event::RestoreDone),
            (101_000, Event::ResumeDone),
        ] {
            m.on_event(e, Timestamp::from_micros(t)).unwrap();
        }
        MoveReport {
            migration_id: id(n),
            from: "qlm-a".into(),
            to: "qlm-b".into(),
            target_addr: DST.parse().unwrap(),
            source_addr: SRC.parse().unwrap(),
            phases: admin_api::Phases::Two,
            images_dir: None,
            result: MoveResult::Completed,
            failure: None,
            recovery: None,
            announce: None,
            dirty_tracking: false,
            predump_stop: None,
            predump_rounds: vec![],
            dump: Some(CriuTiming::default()),
            image_bytes: Some(1),
            transfer: None,
            restore: Some(CriuTiming::default()),
            rollback_restore: None,
            placement: Some(Placement {
                pid: 9,
                netns_inode: 2,
                expected_netns_inode: 2,
                expected_container: "qlm-b".into(),
            }),
            resumed: Some(Resumed {
                addr: "0.0.0.0:4242".parse().unwrap(),
                told: 1,
                handshakes: 1,
            }),
            aborted: None,
            source_probe: Some(PortProbe::Refused),
            target_probe: Some(PortProbe::Answered),
            wall_ms: 200.0,
            timeline: m.report(),
            recovered_after: None,
            post_copy: None,
            front: false,
        }
    }

    fn record(n: u8, peer: &str, downtime: f64) -> ClientMigration {
        ClientMigration {
            id: id(n).to_string(),
            new_addr: DST.parse().unwrap(),
            aborted: false,
            phases: admin_api::Phases::Two,
            seen_at_ms: 1.0,
            last_echo_before_ms: Some(1.0),
            first_echo_after_ms: Some(2.0),
            downtime_ms: Some(downtime),
            failed_attempts: 0,
            completed: true,
            rolled_back: false,
            peer_after: Some(peer.parse().unwrap()),
        }
    }

    fn client(records: Vec<ClientMigration>) -> ClientReport {
        ClientReport {
            target: SRC.parse().unwrap(),
            stable_id: 1,
            connections: 1,
            handshakes: 1,
            echoes: 500,
            failed_attempts: 0,
            migrations: records,
            control: "open".into(),
            foreign_datagrams_dropped: 0,
            verified: true,
            error: None,
        }
    }

    const BOUNDS: Bounds = Bounds {
        max_pause_ms: 1000.0,
    };

    fn problems(m: MoveReport, c: ClientReport) -> Vec<String> {
        summarize("run", vec![m], Some(c), Some(0), BOUNDS).problems
    }

    #[test]
    fn a_good_run_has_no_problems_and_its_medians() {
        let r = summarize(
            "run",
            vec![completed(1)],
            Some(client(vec![record(1, DST, 120.0)])),
            Some(0),
            BOUNDS,
        );
        assert_eq!(r.problems, Vec::<String>::new());
        assert_eq!(r.summary.client_downtime_median_ms, Some(120.0));
        // Final dump started at 2 us, the restored process ran at 100 ms.
        let freeze = r.summary.freeze_median_ms.unwrap();
        assert!((freeze - 99.998).abs() < 1e-6, "{freeze}");
    }

    fn assert_flags(problems: &[String], needle: &str) {
        assert!(
            problems.iter().any(|p| p.contains(needle)),
            "expected a problem with `{needle}`: {problems:?}"
        );
    }

    #[test]
    fn a_restore_into_the_source_namespace_is_caught() {
        // The server came back where it was: the client still hears it from the source, the
        // namespace is the source's, and the source answers while the target does not.
        let mut m = completed(1);
        if let Some(p) = &mut m.placement {
            p.netns_inode = 1;
        }
        m.source_probe = Some(PortProbe::Answered);
        m.target_probe = Some(PortProbe::Refused);
        let p = problems(m, client(vec![record(1, SRC, 120.0)]));
        assert_flags(
            &p,
            "real peer afterwards is 127.0.0.1:5242, expected 127.0.0.1:5243",
        );
        assert_flags(&p, "outside qlm-b's network namespace");
        assert_flags(&p, "the source's address Some(Answered)");
        assert_flags(&p, "the target's address Some(Refused)");
    }

    #[test]
    fn a_reconnect_is_caught_on_both_sides() {
        let mut m = completed(1);
        if let Some(r) = &mut m.resumed {
            r.handshakes = 2;
        }
        let mut c = client(vec![record(1, DST, 120.0)]);
        c.connections = 2;
        c.handshakes = 2;
        let p = problems(m, c);
        assert_flags(&p, "Some(2) handshakes");
        assert_flags(&p, "2 QUIC connections");
        assert_flags(&p, "the client made 2 handshakes");
    }

    #[test]
    fn a_long_pause_or_a_missing_figure_is_caught() {
        let p = problems(completed(1), client(vec![record(1, DST, 1500.0)]));
        assert_flags(&p, "paused 1500.0 ms, more than the bound of 1000 ms");
        let mut m = completed(1);
        m.timeline.freeze_time = None;
        m.dump = None;
        let mut r = record(1, DST, 100.0);
        r.downtime_ms = None;
        let p = problems(m, client(vec![r]));
        assert_flags(&p, "no freeze figure");
        assert_flags(&p, "no dump or restore figure");
        assert_flags(&p, "reported no pause");
        // No client report at all, and a client that failed.
        let r = summarize("run", vec![completed(1)], None, Some(1), BOUNDS);
        assert_flags(&r.problems, "wrote no report");
        assert_flags(&r.problems, "exited with Some(1)");
    }

    #[test]
    fn a_rollback_must_leave_the_client_at_the_source() {
        let mut m = completed(1);
        m.result = MoveResult::RolledBack;
        let mut back = record(1, SRC, 180.0);
        back.aborted = true;
        let p = problems(m.clone(), client(vec![record(1, DST, 5.0), back]));
        assert_eq!(p, Vec::<String>::new());
        // The client stayed at the target after the abort: caught.
        let p = problems(m, client(vec![record(1, DST, 5.0)]));
        assert_flags(&p, "expected 127.0.0.1:5242");
    }
}
