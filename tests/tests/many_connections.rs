//! Many connections: the real cwrapper binary holding several QUIC connections
//! (`--connections N`) against a real swrapper server in this process; the server moves to
//! another port, once in one phase and once in two, and every connection follows on its own
//! (one handshake each, a downtime per move each), and the process's summary says so. (Here
//! rather than in bins/cwrapper, so that neither wrapper depends on the other.)
//!
//! `announce_round_by_connections` (ignored: a measurement, run with `--ignored
//! --nocapture`) prints how long the server's quiesce and announce rounds take with 1, 25 and
//! 100 connections (`QLM_CONNECTIONS`, `QLM_ROUNDS`).

// Test helpers outside #[test] functions unwrap too: a failure there is a failed test.
#![allow(clippy::unwrap_used)]

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus};
use std::time::Duration;

use admin_api::{ClientsSummary, Phases};
use migration_core::MigrationId;
use serde_json::Value;
use swrapper::{MigratableServer, MigrationHandle, ServerOptions};
use wrapper_support::Identity;

/// Bound on every scenario.
const LIMIT: Duration = Duration::from_secs(120);

/// The acks' deadline of every round.
const DEADLINE: Duration = Duration::from_secs(5);

fn cwrapper_bin() -> PathBuf {
    test_support::workspace_bin("cwrapper", "cwrapper").unwrap()
}

struct Server {
    handle: MigrationHandle,
    cert: PathBuf,
    dir: tempfile::TempDir,
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
    tokio::spawn(async move {
        while let Some(app) = server.accept().await {
            tokio::spawn(swrapper::serve_echo(app));
        }
    });
    Server { handle, cert, dir }
}

/// A cwrapper process this test started. Dropped before [`Client::stop`] (a failed assertion,
/// the time limit), it is killed by its PID and reaped, so that no client outlives the test.
/// Its stdout and stderr go to files: a pipe nobody reads until the end would fill up (one
/// JSON line per connection per move) and block the client.
struct Client {
    child: Option<Child>,
    json: PathBuf,
    stdout: PathBuf,
    stderr: PathBuf,
}

/// How a client ended: its exit status and what it wrote.
struct Output {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Client {
    /// The cwrapper binary with `connections` connections, ids `<name>-<k>`.
    fn start(server: &Server, name: &str, connections: usize, extra: &[&str]) -> Self {
        let json = server.dir.path().join(format!("{name}.json"));
        let stdout = server.dir.path().join(format!("{name}.out"));
        let stderr = server.dir.path().join(format!("{name}.err"));
        let child = Command::new(cwrapper_bin())
            .args(["--target", &server.handle.local_addr().to_string()])
            .arg("--ca")
            .arg(&server.cert)
            .arg("--json")
            .arg(&json)
            .args(["--connections", &connections.to_string()])
            .args(["--client-id", name, "--log", "warn", "--stay-connected"])
            .args(extra)
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        Self {
            child: Some(child),
            json,
            stdout,
            stderr,
        }
    }

    /// Stops the client (SIGINT to the PID this test started) and collects its output and
    /// its `--json` file: a `ClientsSummary` with several connections, a `ClientReport` with
    /// one.
    async fn stop(mut self) -> (Output, Value) {
        let mut child = self.child.take().unwrap();
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
        let waited = tokio::time::timeout(
            Duration::from_secs(30),
            tokio::task::spawn_blocking(move || child.wait()),
        )
        .await;
        let status = match waited {
            Ok(status) => status.unwrap().unwrap(),
            Err(_) => {
                // Its waiting thread owns it now; the PID is not reaped yet, so it is ours.
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                panic!("cwrapper did not exit");
            }
        };
        let out = Output {
            status,
            stdout: std::fs::read_to_string(&self.stdout).unwrap(),
            stderr: std::fs::read_to_string(&self.stderr).unwrap(),
        };
        let text = std::fs::read_to_string(&self.json).unwrap_or_else(|e| {
            panic!(
                "no summary ({e}); stdout:\n{}\nstderr:\n{}",
                out.stdout, out.stderr
            )
        });
        (out, serde_json::from_str(&text).unwrap())
    }

    /// [`Client::stop`] for several connections: the summary, typed.
    async fn stop_many(self) -> (Output, ClientsSummary) {
        let (out, v) = self.stop().await;
        (out, serde_json::from_value(v).unwrap())
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Waits until the server holds `n` sessions with an open control stream.
async fn wait_sessions(handle: &MigrationHandle, n: usize) {
    for _ in 0..3000 {
        if handle.sessions().iter().filter(|s| s.control_open).count() == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "{n} sessions expected after 30 s, {} open",
        handle.sessions().iter().filter(|s| s.control_open).count()
    );
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

/// One move in the given mode: prepare (every client quiesced, if two phases, and acked),
/// freeze (parked), come back at a new address, resume. Returns the (quiesce, announce)
/// rounds' durations in milliseconds.
async fn move_server(h: &MigrationHandle, n: u8, phases: Phases, clients: usize) -> (f64, f64) {
    let to = free_port();
    let p = h.prepare(id(n), to, DEADLINE, phases).await.unwrap();
    if let Some(q) = &p.quiesce {
        assert!(q.complete(), "a client did not quiesce: {q:?}");
        assert_eq!(q.acked.len(), clients);
    }
    assert!(
        p.announce.complete(),
        "a client did not ack: {:?}",
        p.announce
    );
    assert_eq!(p.announce.acked.len(), clients);
    h.park().await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(h.unpark(Some(to)).unwrap(), to);
    assert_eq!(h.resumed().unwrap(), clients);
    (
        p.quiesce.map_or(0.0, |q| q.elapsed_ms),
        p.announce.elapsed_ms,
    )
}

/// The `{"event":"migration", ...}` lines of a multi-connection client: (connection, client
/// id, migration id, downtime).
fn migration_lines(out: &Output) -> Vec<(u64, String, String, f64)> {
    out.stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["event"] == "migration")
        .map(|v| {
            (
                v["connection"].as_u64().unwrap(),
                v["client_id"].as_str().unwrap().to_owned(),
                v["record"]["id"].as_str().unwrap().to_owned(),
                v["record"]["downtime_ms"].as_f64().unwrap(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_connections_in_one_process_follow_two_moves() {
    const N: usize = 20;
    cwrapper_bin();
    tokio::time::timeout(LIMIT, async {
        let server = start_server();
        let h = &server.handle;
        let client = Client::start(
            &server,
            "many",
            N,
            &["--interval-ms", "20", "--stagger-ms", "2"],
        );
        wait_sessions(h, N).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        move_server(h, 1, Phases::One, N).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        move_server(h, 2, Phases::Two, N).await;
        tokio::time::sleep(Duration::from_millis(500)).await;

        let (out, s) = client.stop_many().await;
        let stdout = &out.stdout;
        assert!(out.status.success(), "{s:#?}\nstderr:\n{}", out.stderr);
        // The summary line on stdout is the --json file's summary.
        let last: ClientsSummary = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
        assert_eq!(last, s);
        assert!(s.verified, "{s:#?}");
        assert_eq!(
            (
                s.connections_requested,
                s.connections_started,
                s.connections_alive,
                s.connections_reconnected,
                s.connections_failed,
            ),
            (N as u64, N as u64, N as u64, 0, 0),
            "{s:#?}"
        );
        assert!(s.errors.is_empty(), "{:#?}", s.errors);
        assert_eq!(h.handshakes(), N as u64, "a connection handshook again");
        let [one, two] = &s.migrations[..] else {
            panic!("two migrations expected: {s:#?}")
        };
        for (m, n, quiesced) in [(one, 1, 0), (two, 2, N as u64)] {
            assert_eq!(m.id, id(n).to_string());
            assert!(!m.aborted);
            assert_eq!(
                (m.seen, m.completed, m.quiesced),
                (N as u64, N as u64, quiesced),
                "{m:#?}"
            );
            assert_eq!(m.downtimes_ms.len(), N);
            for d in &m.downtimes_ms {
                assert!(d.is_some_and(|d| d > 0.0 && d < 5000.0), "{m:#?}");
            }
            let stats = m.downtime.unwrap();
            assert!(stats.p50_ms <= stats.p95_ms && stats.p95_ms <= stats.max_ms);
        }
        // One JSON line per connection per move, naming the connection and its client id,
        // with the downtime the summary lists.
        let mut lines = migration_lines(&out);
        assert_eq!(lines.len(), 2 * N, "{stdout}");
        lines.sort_by(|a, b| (&a.2, a.0).cmp(&(&b.2, b.0)));
        for (i, (k, client_id, mid, downtime)) in lines.iter().enumerate() {
            let (m, k_expected) = if i < N { (one, i) } else { (two, i - N) };
            assert_eq!(*k, k_expected as u64);
            assert_eq!(*client_id, format!("many-{k}"));
            assert_eq!(*mid, m.id);
            assert_eq!(Some(*downtime), m.downtimes_ms[k_expected]);
        }
    })
    .await
    .unwrap();
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A measurement, not a check: `cargo test -p integration-tests --test many_connections --
/// --ignored --nocapture` (`QLM_CONNECTIONS`, default `1,25,100`: connections, 25 per
/// cwrapper process; `QLM_ROUNDS`, default 6: moves per mode, interleaved;
/// `QLM_INTERVAL_MS`, default 10: the clients' `--interval-ms`). Prints, per
/// connection count and mode, the median and the largest duration of the server's rounds:
/// from the first `Quiesce` / `Migrate` queued to the last answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; run with --ignored --nocapture"]
async fn announce_round_by_connections() {
    cwrapper_bin();
    let counts: Vec<usize> = std::env::var("QLM_CONNECTIONS")
        .unwrap_or_else(|_| "1,25,100".to_owned())
        .split(',')
        .map(|n| n.trim().parse().unwrap())
        .collect();
    let rounds: u8 = env_or("QLM_ROUNDS", 6);
    let interval_ms: u64 = env_or("QLM_INTERVAL_MS", 10);
    let interval = interval_ms.to_string();
    // Long enough for every connection to echo between two moves (else a move is not
    // "completed" before the next one begins).
    let gap = Duration::from_millis(interval_ms.saturating_add(200).max(300));
    for n in counts {
        let server = start_server();
        let h = &server.handle;
        let clients: Vec<Client> = (0..n.div_ceil(25))
            .map(|p| {
                let here = (n - 25 * p).min(25);
                Client::start(
                    &server,
                    &format!("p{p}"),
                    here,
                    &["--interval-ms", &interval],
                )
            })
            .collect();
        wait_sessions(h, n).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (mut two_q, mut two_a, mut one_a) = (Vec::new(), Vec::new(), Vec::new());
        for r in 0..rounds {
            let (q, a) = move_server(h, r.wrapping_mul(2).wrapping_add(1), Phases::Two, n).await;
            two_q.push(q);
            two_a.push(a);
            tokio::time::sleep(gap).await;
            let (_, a) = move_server(h, r.wrapping_mul(2).wrapping_add(2), Phases::One, n).await;
            one_a.push(a);
            tokio::time::sleep(gap).await;
        }
        let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
        println!(
            "{n} connections, echo interval {interval} ms, {rounds} moves per mode: two-phase quiesce round median {:.2} ms \
             (max {:.2}), announce round median {:.2} ms (max {:.2}); one-phase announce round \
             median {:.2} ms (max {:.2})",
            median(two_q.clone()),
            max(&two_q),
            median(two_a.clone()),
            max(&two_a),
            median(one_a.clone()),
            max(&one_a),
        );
        for c in clients {
            if n == 1 {
                let (_, r) = c.stop().await;
                assert_eq!(r["verified"], true, "{r:#}");
                continue;
            }
            let (_, s) = c.stop_many().await;
            assert!(s.verified, "{s:#?}");
            let worst = s
                .migrations
                .iter()
                .filter_map(|m| m.downtime.map(|d| d.max_ms))
                .fold(0.0, f64::max);
            println!(
                "  client {}: {} connections alive, {} reconnected, worst downtime {worst:.1} ms",
                s.client_id, s.connections_alive, s.connections_reconnected
            );
        }
    }
}
