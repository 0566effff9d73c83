//! Two-phase migration, end to end without root or CRIU: a real swrapper server (in this
//! process, its echo service counting the requests it receives) and the real cwrapper binary;
//! the server's socket moves to another port. In two phases the client must send nothing
//! between its `Quiesced` and the `Resumed`, and its first echo after `Resumed` must succeed
//! at once (no failed attempt, no deadline, no probe timer); single-phase moves still work;
//! a client that ignores `Quiesce` is reported missing and the move completes.
//!
//! `pause_overhead_two_phase_vs_one_phase` (ignored: a measurement, run with `--ignored
//! --nocapture`) moves the server `QLM_MOVES` times in each mode, interleaved, and prints
//! the median of the client's pause minus the server's parked -> unparked time.

// Test helpers outside #[test] functions unwrap too: a failure there is a failed test.
#![allow(clippy::unwrap_used)]

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use admin_api::{ClientReport, Phases};
use cwrapper::{ClientOptions, MigratingClient, Quiesce, Release};
use migration_core::MigrationId;
use swrapper::{AppConnection, MigratableServer, MigrationHandle, ServerOptions};
use wrapper_support::Identity;

/// Bound on every scenario.
const LIMIT: Duration = Duration::from_secs(120);

fn cwrapper_bin() -> PathBuf {
    test_support::workspace_bin("cwrapper", "cwrapper").unwrap()
}

/// When the server's echo service accepted each request stream.
type Arrivals = Arc<Mutex<Vec<Instant>>>;

struct Server {
    handle: MigrationHandle,
    cert: PathBuf,
    arrivals: Arrivals,
    dir: tempfile::TempDir,
}

/// The demo echo service (as `swrapper::serve_echo`), noting when each request arrives.
async fn counting_echo(app: AppConnection, arrivals: Arrivals) {
    let state = Arc::new(Mutex::new(demo_echo::EchoState::default()));
    while let Ok((mut send, mut recv)) = app.connection.accept_bi().await {
        arrivals.lock().unwrap().push(Instant::now());
        let state = state.clone();
        tokio::spawn(async move {
            let Ok(bytes) = recv.read_to_end(demo_echo::MAX_FRAME).await else {
                return;
            };
            let reply = demo_echo::EchoRequest::decode(&bytes)
                .and_then(|req| state.lock().unwrap().handle(req))
                .and_then(|r| r.encode());
            if let Ok(out) = reply
                && send.write_all(&out).await.is_ok()
            {
                let _ = send.finish();
            }
        });
    }
}

fn start_server() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let (identity, pem) = Identity::self_signed(&["localhost".to_owned()]).unwrap();
    let cert = dir.path().join("cert.pem");
    pem.write_cert(&cert).unwrap();
    let server = MigratableServer::bind(ServerOptions::new(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        identity,
        vec![demo_echo::ALPN.to_vec()],
    ))
    .unwrap();
    let handle = server.handle();
    let arrivals = Arrivals::default();
    let a = arrivals.clone();
    tokio::spawn(async move {
        while let Some(app) = server.accept().await {
            tokio::spawn(counting_echo(app, a.clone()));
        }
    });
    Server {
        handle,
        cert,
        arrivals,
        dir,
    }
}

impl Server {
    fn arrived_between(&self, from: Instant, to: Instant) -> usize {
        let a = self.arrivals.lock().unwrap();
        a.iter().filter(|t| **t >= from && **t <= to).count()
    }

    fn arrived_after(&self, from: Instant) -> usize {
        let a = self.arrivals.lock().unwrap();
        a.iter().filter(|t| **t > from).count()
    }
}

/// The cwrapper binary against the server (every echo retried on a new stream when lost).
fn start_client(server: &Server, extra: &[&str]) -> (Child, PathBuf) {
    let json = server.dir.path().join("client.json");
    let child = Command::new(cwrapper_bin())
        .args(["--target", &server.handle.local_addr().to_string()])
        .arg("--ca")
        .arg(&server.cert)
        .arg("--json")
        .arg(&json)
        .args([
            "--interval-ms",
            "5",
            "--client-id",
            "test-car",
            "--log",
            "warn",
            "--stay-connected",
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    (child, json)
}

/// Stops the client (SIGINT to the PID this test started) and reads its report.
async fn stop_client(child: Child, json: &Path) -> (Output, ClientReport) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let waited = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::task::spawn_blocking(move || child.wait_with_output()),
    )
    .await;
    let out = match waited {
        Ok(out) => out.unwrap().unwrap(),
        Err(_) => {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            panic!("cwrapper did not exit");
        }
    };
    let text = std::fs::read_to_string(json).unwrap_or_else(|e| {
        panic!(
            "no report ({e}); stderr:\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let report = serde_json::from_str(&text).unwrap();
    (out, report)
}

async fn wait_sessions(handle: &MigrationHandle, n: usize) {
    for _ in 0..500 {
        if handle.sessions().iter().filter(|s| s.control_open).count() == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("sessions after 5 s: {:?}", handle.sessions());
}

fn free_port() -> SocketAddr {
    UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
}

fn id(n: u8) -> MigrationId {
    MigrationId::from_bytes([n; 16])
}

const DEADLINE: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_phase_move_sends_nothing_between_quiesced_and_resumed() {
    cwrapper_bin();
    tokio::time::timeout(LIMIT, async {
        let server = start_server();
        let h = &server.handle;
        let (child, json) = start_client(&server, &[]);
        wait_sessions(h, 1).await;
        tokio::time::sleep(Duration::from_millis(200)).await;

        // Two phases, the steps apart so that a client still sending would be seen: after
        // the Quiesced the server keeps serving for 100 ms (a client at a 5 ms interval would
        // send about 20 echoes), then announces, parks for 50 ms and comes back elsewhere.
        let q = h.quiesce(id(1), DEADLINE).await.unwrap();
        let quiesced_at = Instant::now();
        assert!(q.complete(), "{q:?}");
        assert_eq!(q.acked.len(), 1);
        assert!(
            server.arrived_between(quiesced_at - Duration::from_millis(500), quiesced_at) > 10,
            "the client was echoing before the quiesce"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        let to = free_port();
        assert!(h.announce(id(1), to, DEADLINE).await.unwrap().complete());
        h.park().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(h.unpark(Some(to)).unwrap(), to);
        let resumed_at = Instant::now();
        assert_eq!(h.resumed().unwrap(), 1);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            server.arrived_between(quiesced_at, resumed_at),
            0,
            "the client sent echoes between its Quiesced and the Resumed"
        );
        let after_two = Instant::now();
        assert!(server.arrived_after(resumed_at) > 10, "echoes resumed");

        // The same move in one phase, on the same connection.
        let to = free_port();
        let r = h.announce(id(2), to, DEADLINE).await.unwrap();
        assert!(r.complete(), "{r:?}");
        h.park().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(h.unpark(Some(to)).unwrap(), to);
        assert_eq!(h.resumed().unwrap(), 1);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(server.arrived_after(after_two) > 10);

        let (out, r) = stop_client(child, &json).await;
        assert!(out.status.success(), "{r:#?}");
        assert!(r.verified, "{r:#?}");
        assert_eq!((r.connections, r.handshakes), (1, 1), "{r:#?}");
        assert_eq!(h.handshakes(), 1, "a second handshake happened");
        let [two, one] = &r.migrations[..] else {
            panic!("two migrations expected: {r:#?}")
        };
        assert_eq!((two.phases, one.phases), (Phases::Two, Phases::One));
        assert!(two.completed && one.completed, "{r:#?}");
        assert_eq!(
            two.failed_attempts, 0,
            "the first echo after Resumed must succeed at once: {two:#?}"
        );
        // The pause spans the quiesce's 100 ms and the 50 ms freeze, and little more.
        let pause = two.downtime_ms.unwrap();
        assert!((140.0..1000.0).contains(&pause), "{two:#?}");
        // One phase: the echo in flight during the freeze was lost and retried.
        assert!(one.downtime_ms.unwrap() >= 40.0, "{one:#?}");
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_ignores_quiesce_is_missing_and_the_move_completes() {
    cwrapper_bin();
    tokio::time::timeout(LIMIT, async {
        let server = start_server();
        let h = &server.handle;
        let (child, json) = start_client(&server, &[]);
        // A second client, in process, whose application never answers the quiesce request
        // (its control task still acks Migrate).
        let roots = wrapper_support::tls::load_certs(&server.cert).unwrap();
        let lazy = MigratingClient::connect(ClientOptions::new(
            h.local_addr(),
            "localhost",
            roots,
            vec![demo_echo::ALPN.to_vec()],
            "lazy",
        ))
        .await
        .unwrap();
        wait_sessions(h, 2).await;
        tokio::time::sleep(Duration::from_millis(100)).await;

        let to = free_port();
        let started = Instant::now();
        let p = h
            .prepare(id(3), to, Duration::from_millis(300), Phases::Two)
            .await
            .unwrap();
        let q = p.quiesce.as_ref().unwrap();
        let names = |v: &[(u64, String)]| v.iter().map(|(_, c)| c.clone()).collect::<Vec<_>>();
        assert_eq!(names(&q.acked), ["test-car"], "{q:?}");
        assert_eq!(names(&q.missing), ["lazy"], "{q:?}");
        assert!(
            started.elapsed() >= Duration::from_millis(300),
            "the quiesce round waited for its deadline"
        );
        assert!(p.announce.complete(), "both ack Migrate: {:?}", p.announce);
        // The lazy client was asked to hold and still is.
        assert!(matches!(lazy.status().quiesce, Quiesce::Requested { .. }));
        h.park().await.unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
        h.unpark(Some(to)).unwrap();
        assert_eq!(h.resumed().unwrap(), 2);
        // Resumed releases it too.
        let released = tokio::time::timeout(Duration::from_secs(2), lazy.wait_released())
            .await
            .unwrap();
        assert!(
            matches!(&released, Some(Release::Resumed { migration_id }) if *migration_id == id(3).to_string()),
            "{released:?}"
        );
        assert_eq!(lazy.wait_released().await, None, "nothing holds it any more");
        let reply = cwrapper::echo_once(
            lazy.connection(),
            &demo_echo::EchoChecker::default().request(vec![1]),
        )
        .await
        .unwrap();
        assert_eq!(reply.seq, 0);
        assert_eq!(lazy.peer(), to);
        tokio::time::sleep(Duration::from_millis(200)).await;

        let (out, r) = stop_client(child, &json).await;
        assert!(out.status.success(), "{r:#?}");
        assert!(r.verified, "{r:#?}");
        assert_eq!(r.migrations.len(), 1);
        assert_eq!(r.migrations[0].phases, Phases::Two);
        assert_eq!(r.migrations[0].failed_attempts, 0, "{r:#?}");
        assert_eq!(h.handshakes(), 2);
        lazy.close("done").await;
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_after_the_quiesce_releases_the_client() {
    cwrapper_bin();
    tokio::time::timeout(LIMIT, async {
        let server = start_server();
        let h = &server.handle;
        let first = h.local_addr();
        let (child, json) = start_client(&server, &[]);
        wait_sessions(h, 1).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let p = h
            .prepare(id(4), free_port(), DEADLINE, Phases::Two)
            .await
            .unwrap();
        assert!(p.quiesce.as_ref().unwrap().complete() && p.announce.complete());
        let quiesced_at = Instant::now();
        h.park().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        // The move fails: the source serves again and sends the client back.
        h.unpark(None).unwrap();
        let aborted_at = Instant::now();
        assert!(h.abort(first, DEADLINE).await.unwrap().complete());
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(server.arrived_between(quiesced_at, aborted_at), 0);
        assert!(
            server.arrived_after(aborted_at) > 10,
            "the abort released it"
        );
        let (out, r) = stop_client(child, &json).await;
        assert!(out.status.success(), "{r:#?}");
        let [moved, back] = &r.migrations[..] else {
            panic!("{r:#?}")
        };
        assert!(
            moved.rolled_back && back.aborted && back.completed,
            "{r:#?}"
        );
        assert_eq!(back.phases, Phases::Two);
        assert_eq!(back.failed_attempts, 0, "{r:#?}");
        assert_eq!((r.connections, r.handshakes), (1, 1));
    })
    .await
    .unwrap();
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A measurement, not a check: `cargo test -p integration-tests --test two_phase --
/// --ignored --nocapture` (`QLM_MOVES`, default 30, moves per mode; `QLM_FREEZE_MS`, default
/// 100, the time the socket stays parked).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; run with --ignored --nocapture"]
async fn pause_overhead_two_phase_vs_one_phase() {
    cwrapper_bin();
    let moves: u8 = std::env::var("QLM_MOVES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    // About a real CRIU freeze here (dump + restore, see ARCHITECTURE.md).
    let freeze = Duration::from_millis(
        std::env::var("QLM_FREEZE_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(100),
    );
    let server = start_server();
    let h = &server.handle;
    let (child, json) = start_client(&server, &[]);
    wait_sessions(h, 1).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    // (mode, parked -> unparked ms, quiesce round ms, announce round ms, server-side steps),
    // in move order.
    let mut moved = Vec::new();
    let ms = |a: Instant, b: Instant| b.saturating_duration_since(a).as_secs_f64() * 1e3;
    for n in 0..moves.saturating_mul(2) {
        let phases = if n % 2 == 0 { Phases::Two } else { Phases::One };
        let start = Instant::now();
        let last_before = *server.arrivals.lock().unwrap().last().unwrap();
        let p = h
            .prepare(id(n.wrapping_add(10)), free_port(), DEADLINE, phases)
            .await
            .unwrap();
        let prepared = Instant::now();
        let to = p.announce.address;
        h.park().await.unwrap();
        let parked = Instant::now();
        tokio::time::sleep(freeze).await;
        h.unpark(Some(to)).unwrap();
        let unparked = Instant::now();
        h.resumed().unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
        // Server side: the last request before the move began, the first after the unpark.
        let (before, after) = {
            let a = server.arrivals.lock().unwrap();
            let before = a
                .iter()
                .copied()
                .filter(|t| *t <= parked)
                .max()
                .unwrap_or(last_before);
            let after = a
                .iter()
                .copied()
                .find(|t| *t > unparked)
                .unwrap_or(unparked);
            (before, after)
        };
        moved.push((
            phases,
            ms(parked, unparked),
            p.quiesce.map_or(0.0, |q| q.elapsed_ms),
            p.announce.elapsed_ms,
            [
                ms(start, prepared),
                ms(prepared, parked),
                ms(unparked, after),
                ms(before.max(start), start),
            ],
        ));
    }
    let (_, r) = stop_client(child, &json).await;
    assert_eq!(r.migrations.len(), moved.len(), "{r:#?}");
    for mode in [Phases::Two, Phases::One] {
        let rows: Vec<_> = r
            .migrations
            .iter()
            .zip(&moved)
            .filter(|(_, m)| m.0 == mode)
            .collect();
        for (c, m) in &rows {
            assert_eq!(c.phases, m.0);
        }
        let overhead = median(
            rows.iter()
                .map(|(c, m)| c.downtime_ms.unwrap() - m.1)
                .collect(),
        );
        let pause = median(rows.iter().map(|(c, _)| c.downtime_ms.unwrap()).collect());
        let parked = median(rows.iter().map(|(_, m)| m.1).collect());
        let failed: u64 = rows.iter().map(|(c, _)| c.failed_attempts).sum();
        println!(
            "{mode}-phase: {} moves, median pause {pause:.2} ms, median parked->unparked \
             {parked:.2} ms, median overhead (pause - parked) {overhead:.2} ms, failed attempts \
             {failed}, quiesce round median {:.3} ms, announce round median {:.3} ms",
            rows.len(),
            median(rows.iter().map(|(_, m)| m.2).collect()),
            median(rows.iter().map(|(_, m)| m.3).collect()),
        );
        let step = |i: usize| median(rows.iter().map(|(_, m)| m.4[i]).collect());
        println!(
            "  server side, medians: prepare (rounds) {:.3} ms, park {:.3} ms, unpark -> first \
             request {:.3} ms",
            step(0),
            step(1),
            step(2),
        );
    }
}
