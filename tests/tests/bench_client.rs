//! The `bench_client` program (benches/) against a real swrapper server in this process, on
//! loopback: latency and bulk across a socket move (the server parks, then serves from another
//! port, as in `migration.rs`), and the reconnect baseline against a server that is stopped
//! and started again on another port.

// Test helpers outside #[test] functions unwrap too: a failure there is a failed test.
#![allow(clippy::unwrap_used)]

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use migration_core::MigrationId;
use serde_json::Value;
use swrapper::{MigratableServer, MigrationHandle, ServerOptions};
use wrapper_support::Identity;

/// Bound on every scenario.
const LIMIT: Duration = Duration::from_secs(90);

/// Built by cargo when missing or stale; called before the time limit starts.
fn bench_client_bin() -> PathBuf {
    test_support::workspace_bin("migration-benches", "bench_client").unwrap()
}

/// A demo server (echo and bulk) on `listen` with `identity`.
fn serve(listen: SocketAddr, identity: Identity) -> MigrationHandle {
    let server = MigratableServer::bind(ServerOptions::new(
        listen,
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
    handle
}

fn copy(id: &Identity) -> Identity {
    Identity {
        certs: id.certs.clone(),
        key: id.key.clone_key(),
    }
}

/// A self-signed identity for "localhost", its certificate written to `dir/cert.pem`.
fn identity(dir: &Path) -> (Identity, PathBuf) {
    let (identity, pem) = Identity::self_signed(&["localhost".to_owned()]).unwrap();
    let cert = dir.join("cert.pem");
    pem.write_cert(&cert).unwrap();
    (identity, cert)
}

/// The client process; killed (by the PID this test started) if the test fails midway.
struct Client(Option<Child>);

impl Drop for Client {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn start_client(cert: &Path, json: &Path, target: SocketAddr, extra: &[&str]) -> Client {
    let child = Command::new(bench_client_bin())
        .args(["--target", &target.to_string()])
        .arg("--ca")
        .arg(cert)
        .arg("--json")
        .arg(json)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    Client(Some(child))
}

/// Waits for the client to exit on its own (--duration-s) and reads its result.
async fn finish(mut client: Client, json: &Path) -> Value {
    let child = client.0.take().unwrap();
    let pid = child.id();
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::task::spawn_blocking(move || child.wait_with_output()),
    )
    .await;
    let out = match out {
        Ok(out) => out.unwrap().unwrap(),
        Err(_) => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
                nix::sys::signal::Signal::SIGKILL,
            );
            panic!("bench_client did not exit");
        }
    };
    let text = std::fs::read_to_string(json).unwrap_or_else(|e| {
        panic!(
            "no result ({e}); stdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let r: Value = serde_json::from_str(&text).unwrap();
    assert!(
        out.status.success(),
        "bench_client failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        r["error"]
    );
    r
}

async fn wait_sessions(handle: &MigrationHandle, n: usize) {
    test_support::eventually("the client's session", || {
        handle.sessions().iter().filter(|s| s.control_open).count() == n
    })
    .await
    .unwrap();
}

fn free_port() -> SocketAddr {
    UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
}

/// One move: announce, park for `freeze`, serve from `to`, resume.
async fn move_server(handle: &MigrationHandle, to: SocketAddr, freeze: Duration) {
    let report = handle
        .announce(MigrationId::from_bytes([7; 16]), to, Duration::from_secs(2))
        .await
        .unwrap();
    assert!(report.complete(), "{report:?}");
    handle.park().await.unwrap();
    tokio::time::sleep(freeze).await;
    handle.unpark(Some(to)).unwrap();
    assert_eq!(handle.resumed().unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_shows_the_pause_of_a_move() {
    bench_client_bin();
    tokio::time::timeout(LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let (id, cert) = identity(dir.path());
        let handle = serve(SocketAddr::from(([127, 0, 0, 1], 0)), id);
        let json = dir.path().join("latency.json");
        let client = start_client(
            &cert,
            &json,
            handle.local_addr(),
            &["--mode", "latency", "--duration-s", "3"],
        );
        wait_sessions(&handle, 1).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        move_server(&handle, free_port(), Duration::from_millis(200)).await;
        let r = finish(client, &json).await;
        assert_eq!(r["verified"], true, "{r:#}");
        assert_eq!(r["handshakes"], 1, "a move must not cost a handshake");
        let m = &r["migrations"].as_array().unwrap()[..];
        assert_eq!(m.len(), 1, "{:#}", r["migrations"]);
        let seen = m[0]["seen_unix_us"].as_u64().unwrap();
        let resumed = m[0]["resumed_unix_us"].as_u64().unwrap();
        // Wall-clock microseconds of today, in order.
        assert!(seen > 1_600_000_000_000_000 && resumed > seen, "{:#}", m[0]);
        let lat = &r["latency"];
        let echoes = lat["echoes"].as_array().unwrap();
        assert!(echoes.len() > 100, "{} echoes", echoes.len());
        let pauses = lat["pauses"].as_array().unwrap();
        assert_eq!(pauses.len(), 1, "{pauses:?}");
        let pause = pauses[0]["pause_ms"].as_f64().unwrap();
        // The server was parked for 200 ms (on a loaded machine the client may see less of
        // it, but not less than half).
        assert!((100.0..5000.0).contains(&pause), "pause {pause} ms");
        // And the pause is the longest gap of the whole run: elsewhere echoes flow.
        let done: Vec<u64> = echoes
            .iter()
            .map(|e| e[0].as_u64().unwrap() + e[1].as_u64().unwrap())
            .collect();
        let before: Vec<u64> = done.iter().copied().filter(|&d| d < seen).collect();
        let widest = before.windows(2).map(|w| w[1] - w[0]).max().unwrap();
        assert!(
            (widest as f64) < pause * 1e3,
            "a gap of {widest} µs before the move, pause {pause} ms"
        );
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_is_verified_across_a_move() {
    bench_client_bin();
    tokio::time::timeout(LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let (id, cert) = identity(dir.path());
        let handle = serve(SocketAddr::from(([127, 0, 0, 1], 0)), id);
        let json = dir.path().join("bulk.json");
        let client = start_client(
            &cert,
            &json,
            handle.local_addr(),
            &["--mode", "bulk", "--duration-s", "3"],
        );
        wait_sessions(&handle, 1).await;
        tokio::time::sleep(Duration::from_millis(1000)).await;
        move_server(&handle, free_port(), Duration::from_millis(100)).await;
        let r = finish(client, &json).await;
        assert_eq!(r["verified"], true, "{:#}", r["error"]);
        assert_eq!(r["handshakes"], 1);
        let bulk = &r["bulk"];
        assert_eq!(bulk["streams"], 1, "the stream survived the move");
        let steady = bulk["steady_goodput_bps"].as_f64().unwrap();
        assert!(steady > 0.0, "{bulk:#}");
        let resumed = r["migrations"][0]["resumed_unix_us"].as_u64().unwrap();
        let buckets = bulk["buckets"].as_array().unwrap();
        let after: u64 = buckets
            .iter()
            .filter(|b| b[0].as_u64().unwrap() > resumed)
            .map(|b| b[1].as_u64().unwrap())
            .sum();
        assert!(after > 0, "no bytes after the move");
        let total: u64 = buckets.iter().map(|b| b[1].as_u64().unwrap()).sum();
        assert_eq!(total, bulk["verified_bytes"].as_u64().unwrap());
        let rec = &bulk["recoveries"].as_array().unwrap()[..];
        assert_eq!(rec.len(), 1);
        assert_eq!(rec[0]["from"], "resumed");
        eprintln!(
            "bulk: steady {:.1} MB/s, recovery {} ms, {} MB verified",
            steady / 1e6,
            rec[0]["recovery_ms"],
            total / 1_000_000
        );
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_makes_a_new_connection_to_the_restarted_server() {
    bench_client_bin();
    tokio::time::timeout(LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let (id, cert) = identity(dir.path());
        let first = serve(SocketAddr::from(([127, 0, 0, 1], 0)), copy(&id));
        let second_addr = free_port();
        let json = dir.path().join("reconnect.json");
        let client = start_client(
            &cert,
            &json,
            first.local_addr(),
            &[
                "--mode",
                "latency",
                "--duration-s",
                "4",
                "--reconnect",
                "--reconnect-to",
                &second_addr.to_string(),
                "--io-timeout-ms",
                "200",
                "--connect-timeout-ms",
                "200",
            ],
        );
        // The reconnect client says Hello (see bench_client's doc), so it shows as a session.
        wait_sessions(&first, 1).await;
        tokio::time::sleep(Duration::from_millis(700)).await;
        first.close("stopped");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let second = serve(second_addr, id);
        let r = finish(client, &json).await;
        assert_eq!(r["verified"], true, "{:#}", r["error"]);
        assert_eq!(r["handshakes"], 2, "{r:#}");
        assert_eq!(second.handshakes(), 1);
        let rec = &r["reconnects"].as_array().unwrap()[..];
        assert_eq!(rec.len(), 1, "{rec:?}");
        assert_eq!(rec[0]["addr"], second_addr.to_string());
        let pause = rec[0]["pause_ms"].as_f64().unwrap();
        assert!((300.0..5000.0).contains(&pause), "pause {pause} ms");
        assert!(rec[0]["attempts"].as_u64().unwrap() >= 1);
        let pauses = r["latency"]["pauses"].as_array().unwrap();
        assert_eq!(pauses[0]["event"], "reconnect");
    })
    .await
    .unwrap();
}
