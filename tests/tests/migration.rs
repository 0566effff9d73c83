//! The proof without root and without CRIU: a real swrapper server (in this process) and the
//! real cwrapper binary (a child process) on loopback; the server's socket moves to another
//! port (and, as root, into another network namespace) and the client follows on the same
//! connection. (Here rather than in bins/cwrapper, so that neither wrapper depends on the
//! other, not even for tests.)

// Test helpers outside #[test] functions unwrap too: a failure there is a failed test.
#![allow(clippy::unwrap_used)]

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use migration_core::MigrationId;
use serde_json::Value;
use swrapper::{MigratableServer, MigrationHandle, ServerOptions};
use wrapper_support::Identity;

/// Bound on every scenario.
const LIMIT: Duration = Duration::from_secs(60);

/// The cwrapper binary, built by cargo when missing or stale (see `test_support::bins`). Each test
/// calls it before its time limit starts: the first call may compile.
fn cwrapper_bin() -> std::path::PathBuf {
    test_support::workspace_bin("cwrapper", "cwrapper").unwrap()
}

struct Server {
    handle: MigrationHandle,
    cert: PathBuf,
    dir: tempfile::TempDir,
}

/// A demo echo server on `listen`, its certificate written for the client.
fn start_server(listen: SocketAddr) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let (identity, pem) = Identity::self_signed(&["localhost".to_owned()]).unwrap();
    let cert = dir.path().join("cert.pem");
    pem.write_cert(&cert).unwrap();
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
    Server { handle, cert, dir }
}

/// Starts the cwrapper binary against `target`.
fn start_client(server: &Server, target: SocketAddr, extra: &[&str]) -> (Child, PathBuf) {
    let json = server
        .dir
        .path()
        .join(format!("client-{}.json", target.port()));
    let child = Command::new(cwrapper_bin())
        .args(["--target", &target.to_string()])
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
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    (child, json)
}

/// Asks the client to stop (SIGINT, to the PID this test started) and collects its output.
async fn stop_client(child: Child) -> Output {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap()),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    wait_client(child).await
}

async fn wait_client(child: Child) -> Output {
    let pid = child.id();
    let waited = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::task::spawn_blocking(move || child.wait_with_output()),
    )
    .await;
    match waited {
        Ok(out) => out.unwrap().unwrap(),
        Err(_) => {
            // Do not leave it behind.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
                nix::sys::signal::Signal::SIGKILL,
            );
            panic!("cwrapper did not exit");
        }
    }
}

fn client_report(out: &Output, json: &Path) -> Value {
    let text = std::fs::read_to_string(json).unwrap_or_else(|e| {
        panic!(
            "no report ({e}); stdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    serde_json::from_str(&text).unwrap()
}

/// Waits until the server holds `n` sessions with an open control stream.
async fn wait_sessions(handle: &MigrationHandle, n: usize) {
    for _ in 0..500 {
        if handle.sessions().iter().filter(|s| s.control_open).count() == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no session after 5 s: {:?}", handle.sessions());
}

fn free_port(ip: Ipv4Addr) -> SocketAddr {
    UdpSocket::bind((ip, 0)).unwrap().local_addr().unwrap()
}

fn id(n: u8) -> MigrationId {
    MigrationId::from_bytes([n; 16])
}

/// One move: announce, freeze (parked), come back on the new address, resume.
async fn move_server(handle: &MigrationHandle, n: u8, to: SocketAddr, freeze: Duration) {
    let report = handle
        .announce(id(n), to, Duration::from_secs(2))
        .await
        .unwrap();
    assert!(report.complete(), "a client did not ack: {report:?}");
    assert_eq!(report.acked.len(), 1);
    // The freeze: the process neither sends nor receives (as while CRIU holds it).
    handle.park().await.unwrap();
    tokio::time::sleep(freeze).await;
    assert_eq!(handle.unpark(Some(to)).unwrap(), to);
    assert_eq!(handle.resumed().unwrap(), 1);
}

fn assert_verified(r: &Value, moves: usize, freeze_ms: f64) {
    assert_eq!(r["verified"], true, "report: {r:#}");
    assert_eq!(r["control"], "open", "report: {r:#}");
    let migrations = r["migrations"].as_array().unwrap();
    assert_eq!(migrations.len(), moves, "report: {r:#}");
    let mut downtimes: Vec<f64> = migrations
        .iter()
        .map(|m| {
            assert_eq!(m["completed"], true, "{m:#}");
            let d = m["downtime_ms"].as_f64().unwrap();
            assert!(d > 0.0 && d < 5000.0, "downtime {d}: {m:#}");
            d
        })
        .collect();
    // The server was silent for `freeze_ms` each time. A client descheduled on a loaded
    // machine can see a shorter gap once in a while, so the median is what must show it.
    downtimes.sort_by(f64::total_cmp);
    let median = downtimes[downtimes.len() / 2];
    assert!(
        median >= freeze_ms / 2.0,
        "median downtime {median} ms for a {freeze_ms} ms freeze: {downtimes:?}"
    );
    assert!(
        r["echoes"].as_u64().unwrap() > 10 * moves as u64,
        "report: {r:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_follows_the_server_to_another_port() {
    cwrapper_bin();
    tokio::time::timeout(LIMIT, async {
        let server = start_server(SocketAddr::from(([127, 0, 0, 1], 0)));
        let first = server.handle.local_addr();
        let (child, json) = start_client(&server, first, &["--stay-connected"]);
        wait_sessions(&server.handle, 1).await;
        tokio::time::sleep(Duration::from_millis(200)).await;

        let to = free_port(Ipv4Addr::LOCALHOST);
        move_server(&server.handle, 1, to, Duration::from_millis(50)).await;
        tokio::time::sleep(Duration::from_millis(300)).await;

        let out = stop_client(child).await;
        let r = client_report(&out, &json);
        assert!(out.status.success(), "{r:#}");
        assert_verified(&r, 1, 50.0);
        assert_eq!(server.handle.handshakes(), 1, "a second handshake happened");
        // The human line and the JSON line of the downtime are both on stdout.
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("downtime"), "{stdout}");
        assert!(stdout.contains("\"event\":\"migration\""), "{stdout}");
        // The old port is closed: it can be bound again.
        UdpSocket::bind(first).unwrap();
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_consecutive_moves_on_one_connection() {
    cwrapper_bin();
    tokio::time::timeout(LIMIT, async {
        let server = start_server(SocketAddr::from(([127, 0, 0, 1], 0)));
        let (child, json) =
            start_client(&server, server.handle.local_addr(), &["--stay-connected"]);
        wait_sessions(&server.handle, 1).await;
        for n in 1..=10 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let to = free_port(Ipv4Addr::LOCALHOST);
            move_server(&server.handle, n, to, Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let out = stop_client(child).await;
        let r = client_report(&out, &json);
        assert_verified(&r, 10, 20.0);
        assert_eq!(server.handle.handshakes(), 1);
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_moves_into_another_network_namespace() {
    if !test_support::require("needs root (ip netns, veth)", test_support::is_root()) {
        return;
    }
    let Some(netns) = test_support::require_ok(
        "creating a network namespace",
        test_support::Netns::create("cwmv"),
    ) else {
        return;
    };
    cwrapper_bin();
    tokio::time::timeout(LIMIT, async {
        let server = start_server(SocketAddr::from((netns.root_ip, 0)));
        let (child, json) =
            start_client(&server, server.handle.local_addr(), &["--stay-connected"]);
        wait_sessions(&server.handle, 1).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        // The new socket is made in the other namespace; the client is told its address.
        let inside =
            udp_shim_server::bind_in_netns(&netns.path(), SocketAddr::from((netns.inner_ip, 0)))
                .unwrap();
        let to = inside.local_addr().unwrap();
        let report = server
            .handle
            .announce(id(1), to, Duration::from_secs(2))
            .await
            .unwrap();
        assert!(report.complete(), "{report:?}");
        server.handle.park().await.unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert_eq!(server.handle.rebind_with(inside).unwrap(), to);
        server.handle.resumed().unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let out = stop_client(child).await;
        let r = client_report(&out, &json);
        assert_verified(&r, 1, 30.0);
        assert_eq!(r["migrations"][0]["new_addr"], to.to_string());
        assert_eq!(server.handle.handshakes(), 1);
    })
    .await
    .unwrap();
    drop(netns);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_to_an_unreachable_address_fails_clearly_at_the_deadline() {
    cwrapper_bin();
    tokio::time::timeout(LIMIT, async {
        let server = start_server(SocketAddr::from(([127, 0, 0, 1], 0)));
        let (child, json) = start_client(
            &server,
            server.handle.local_addr(),
            &["--stay-connected", "--recovery-deadline-ms", "800"],
        );
        wait_sessions(&server.handle, 1).await;
        // Nothing will ever listen there.
        let nowhere = free_port(Ipv4Addr::LOCALHOST);
        let report = server
            .handle
            .announce(id(7), nowhere, Duration::from_secs(2))
            .await
            .unwrap();
        assert!(report.complete());
        // The server leaves its old address (as when it is frozen for the checkpoint) and never
        // shows up at the new one.
        server.handle.park().await.unwrap();
        let out = wait_client(child).await;
        assert_eq!(out.status.code(), Some(1), "the client must fail");
        let r = client_report(&out, &json);
        assert_eq!(r["verified"], false);
        let err = r["error"].as_str().unwrap();
        assert!(
            err.contains(&format!("server unreachable at {nowhere}")),
            "unclear error: {err}"
        );
        assert!(r["migrations"][0]["failed_attempts"].as_u64().unwrap() >= 2);
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_stay_connected_a_missed_deadline_ends_the_session() {
    cwrapper_bin();
    tokio::time::timeout(LIMIT, async {
        let server = start_server(SocketAddr::from(([127, 0, 0, 1], 0)));
        let (child, json) = start_client(&server, server.handle.local_addr(), &[]);
        wait_sessions(&server.handle, 1).await;
        let nowhere = free_port(Ipv4Addr::LOCALHOST);
        server
            .handle
            .announce(id(8), nowhere, Duration::from_secs(2))
            .await
            .unwrap();
        server.handle.park().await.unwrap();
        let out = wait_client(child).await;
        assert_eq!(out.status.code(), Some(1));
        let r = client_report(&out, &json);
        let err = r["error"].as_str().unwrap();
        assert!(err.contains("--stay-connected"), "{err}");
    })
    .await
    .unwrap();
}

/// The server announces a move, keeps running where it is and never confirms the move: the
/// client gives the move up at its overlap cap, goes back, and ends with an error naming the
/// address and the cap (not endless duplicate sends).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_never_confirmed_ends_the_client_with_a_clear_error() {
    cwrapper_bin();
    tokio::time::timeout(LIMIT, async {
        let server = start_server(SocketAddr::from(([127, 0, 0, 1], 0)));
        let first = server.handle.local_addr();
        let (child, json) = start_client(
            &server,
            first,
            &["--stay-connected", "--overlap-max-ms", "300"],
        );
        wait_sessions(&server.handle, 1).await;
        let silent = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let nowhere = silent.local_addr().unwrap();
        let report = server
            .handle
            .announce(id(9), nowhere, Duration::from_secs(2))
            .await
            .unwrap();
        assert!(report.complete());
        let out = wait_client(child).await;
        assert_eq!(out.status.code(), Some(1), "the client must fail");
        let r = client_report(&out, &json);
        assert_eq!(r["verified"], false);
        let err = r["error"].as_str().unwrap();
        assert!(
            err.contains(&format!("move to {nowhere} not confirmed within 300ms"))
                && err.contains(&format!("swapped back to {first}")),
            "unclear error: {err}"
        );
        drop(silent);
    })
    .await
    .unwrap();
}
