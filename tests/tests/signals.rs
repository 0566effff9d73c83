//! The swrapper binary driven by signals and its admin directory, as the orchestrator drives it:
//! SIGTERM announces (and parks), SIGUSR2 renews the socket and resumes, SIGUSR1 aborts.
//! The client is the cwrapper library, in this process. (Here rather than in bins/swrapper, so
//! that neither wrapper depends on the other, not even for tests.)

// Test helpers outside #[test] functions unwrap too: a failure there is a failed test.
#![allow(clippy::unwrap_used)]

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use admin_api::{
    AbortRequest, Aborted, AdminDir, AdminError, Announced, MigrateRequest, Phases, ResumeRequest,
    Resumed, ServerEvent,
};
use cwrapper::{ClientOptions, MigratingClient};
use demo_echo::EchoChecker;
use migration_core::MigrationId;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const LIMIT: Duration = Duration::from_secs(60);

/// The swrapper binary, built by cargo when missing or stale (see `test_support::bins`). Each test
/// calls it before its time limit starts: the first call may compile.
fn swrapper_bin() -> std::path::PathBuf {
    test_support::workspace_bin("swrapper", "swrapper").unwrap()
}

/// Kills the server (by the PID this test started) if the test fails midway.
struct ServerProcess(Option<Child>);

impl ServerProcess {
    fn signal(&self, sig: Signal) {
        let child = self.0.as_ref().unwrap();
        kill(Pid::from_raw(i32::try_from(child.id()).unwrap()), sig).unwrap();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn start(dir: &Path, addr: SocketAddr) -> ServerProcess {
    start_with(dir, addr, "multi-thread")
}

/// The server with tokio's runtime `runtime` (swrapper --runtime).
fn start_with(dir: &Path, addr: SocketAddr, runtime: &str) -> ServerProcess {
    let child = Command::new(swrapper_bin())
        .args(["--listen", &addr.to_string(), "--log", "warn"])
        .args(["--runtime", runtime])
        .arg("--cert-out")
        .arg(dir.join("cert.pem"))
        .arg("--admin-dir")
        .arg(dir)
        .arg("--park-after-announce")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    ServerProcess(Some(child))
}

/// Waits for the server's event of kind `E` answering `id` (consumed when read).
async fn event<E: ServerEvent + Send + 'static>(
    dir: &Path,
    id: Option<MigrationId>,
) -> Result<E, AdminError> {
    let admin = AdminDir::open(dir).unwrap();
    tokio::task::spawn_blocking(move || admin.wait_event::<E>(id, Duration::from_secs(10)))
        .await
        .unwrap()
}

fn id(n: u8) -> MigrationId {
    MigrationId::from_bytes([n; 16])
}

async fn connect(dir: &Path, addr: SocketAddr) -> MigratingClient {
    let cert = dir.join("cert.pem");
    for _ in 0..500 {
        if cert.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let roots = wrapper_support::tls::load_certs(&cert).unwrap();
    let opts = ClientOptions::new(
        addr,
        "localhost",
        roots,
        vec![demo_echo::ALPN.to_vec()],
        "signal-test",
    );
    MigratingClient::connect(opts).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_announce_park_resume_and_abort() {
    announce_park_resume_and_abort("multi-thread").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_with_a_current_thread_server() {
    announce_park_resume_and_abort("current-thread").await;
}

async fn announce_park_resume_and_abort(runtime: &str) {
    swrapper_bin();
    tokio::time::timeout(LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let addr = UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let server = start_with(dir.path(), addr, runtime);
        let client = Arc::new(connect(dir.path(), addr).await);

        // The application: echoes in a loop, retrying a missed deadline on a new stream.
        let stop = Arc::new(AtomicBool::new(false));
        let echoes = Arc::new(AtomicU64::new(0));
        let app = {
            let (client, stop, echoes) = (client.clone(), stop.clone(), echoes.clone());
            tokio::spawn(async move {
                let mut checker = EchoChecker::default();
                while !stop.load(Ordering::Relaxed) {
                    let req = checker.request(vec![1, 2, 3]);
                    let got = tokio::time::timeout(
                        Duration::from_millis(100),
                        cwrapper::echo_once(client.connection(), &req),
                    )
                    .await;
                    if let Ok(Ok(reply)) = got {
                        checker.check(&req, &reply).unwrap();
                        echoes.fetch_add(1, Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                checker.next_seq()
            })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;

        let admin = AdminDir::open(dir.path()).unwrap();
        // SIGTERM without a request: a clear error in announce.json, nothing else happens.
        server.signal(Signal::SIGTERM);
        let e = event::<Announced>(dir.path(), Some(id(1)))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("without a migrate request"), "{e}");

        // A move "in place" (same address: the process stays, the socket is renewed).
        admin
            .send_request(&MigrateRequest {
                migration_id: id(1),
                new_addr: addr,
                deadline_ms: 2000,
                phases: Phases::One,
                quiesce_deadline_ms: None,
            })
            .unwrap();
        server.signal(Signal::SIGTERM);
        let e: Announced = event(dir.path(), Some(id(1))).await.unwrap();
        assert_eq!(e.outcome.acked.len(), 1, "{e:?}");
        assert!(e.outcome.missing.is_empty(), "{e:?}");
        assert!(e.parked, "{e:?}");
        assert_eq!(e.phases, Phases::One);
        assert!(e.quiesce.is_none(), "{e:?}");
        // The request was consumed: a stray SIGTERM now announces nothing.
        assert!(!dir.path().join("migrate.json").exists());
        // Parked: the port is free, as a checkpoint needs.
        drop(UdpSocket::bind(addr).unwrap());
        let before = echoes.load(Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(100)).await;
        // A resume for another migration is refused, and nothing resumes.
        admin
            .send_request(&ResumeRequest {
                migration_id: id(9),
            })
            .unwrap();
        server.signal(Signal::SIGUSR2);
        let e = event::<Resumed>(dir.path(), Some(id(9))).await.unwrap_err();
        assert!(e.to_string().contains("is in progress"), "{e}");
        admin
            .send_request(&ResumeRequest {
                migration_id: id(1),
            })
            .unwrap();
        server.signal(Signal::SIGUSR2);
        let e: Resumed = event(dir.path(), Some(id(1))).await.unwrap();
        assert_eq!(e.told, 1, "{e:?}");
        assert_eq!(e.handshakes, 1, "{e:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            echoes.load(Ordering::Relaxed) > before,
            "echoes did not resume"
        );
        let status = client.status();
        assert_eq!(status.migrations.len(), 1);
        assert_eq!(status.resumed, 1);

        // A stray SIGTERM after the move: no old move is announced again.
        server.signal(Signal::SIGTERM);
        let e = event::<Announced>(dir.path(), Some(id(1)))
            .await
            .unwrap_err();
        assert!(matches!(e, AdminError::ServerReported { .. }), "{e}");
        assert_eq!(client.status().migrations.len(), 1);

        // An aborted two-phase move: this client's application ignores Quiesce, so it is
        // reported missing from the quiesce round and the move goes on (its control task acks
        // Migrate); then SIGUSR1 sends it back (abort.json) and releases it.
        admin
            .send_request(&MigrateRequest {
                migration_id: id(2),
                new_addr: addr,
                deadline_ms: 300,
                phases: Phases::Two,
                quiesce_deadline_ms: None,
            })
            .unwrap();
        server.signal(Signal::SIGTERM);
        let e: Announced = event(dir.path(), Some(id(2))).await.unwrap();
        assert_eq!(e.phases, Phases::Two);
        let q = e.quiesce.as_ref().unwrap();
        assert!(q.quiesced.is_empty(), "{e:?}");
        assert_eq!(q.missing.len(), 1, "{e:?}");
        assert!(
            q.elapsed_ms >= 300.0,
            "waited for the quiesce deadline: {e:?}"
        );
        assert_eq!(e.outcome.acked.len(), 1, "{e:?}");
        assert!(client.status().quiesce_requested(), "asked to hold");
        admin
            .send_request(&AbortRequest {
                migration_id: id(2),
                fallback_addr: addr,
                deadline_ms: 2000,
            })
            .unwrap();
        server.signal(Signal::SIGUSR1);
        let e: Aborted = event(dir.path(), Some(id(2))).await.unwrap();
        assert_eq!(e.outcome.acked.len(), 1, "{e:?}");
        assert_eq!(e.outcome.address, addr);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let status = client.status();
        // The second Migrate, then its abort.
        assert_eq!(status.migrations.len(), 3);
        assert!(!status.migrations[1].aborted);
        assert!(status.migrations[2].aborted);
        assert!(status.migrations[2].quiesced, "a two-phase migration");
        assert!(!status.quiesce_requested(), "the abort released it");
        assert!(matches!(
            status.last_release,
            Some(cwrapper::Release::Aborted { .. })
        ));
        // Unparked by the abort: echoes go on.
        let before = echoes.load(Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            echoes.load(Ordering::Relaxed) > before,
            "echoes did not resume"
        );

        stop.store(true, Ordering::Relaxed);
        let served = app.await.unwrap();
        assert!(served > 20, "only {served} echoes");
        assert!(client.connection().close_reason().is_none());

        // SIGINT ends the server cleanly.
        server.signal(Signal::SIGINT);
        let mut server = server;
        let mut child = server.0.take().unwrap();
        let status = tokio::task::spawn_blocking(move || child.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(status.success(), "{status}");
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_bad_migrate_json_is_reported_not_fatal() {
    swrapper_bin();
    tokio::time::timeout(LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let addr = UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let server = start(dir.path(), addr);
        let _client = connect(dir.path(), addr).await;
        for bad in [
            "not json",
            r#"{"new_addr": "nowhere"}"#,
            r#"{"migration_id": "01010101010101010101010101010101", "new_addr": "127.0.0.1:1", "deadline_ms": 5, "surprise": 1}"#,
            r#"{"new_addr": "127.0.0.1:1", "migration_id": "xyz", "deadline_ms": 5}"#,
        ] {
            std::fs::write(dir.path().join("migrate.json"), bad).unwrap();
            server.signal(Signal::SIGTERM);
            let e = event::<Announced>(dir.path(), Some(id(1))).await.unwrap_err();
            assert!(e.to_string().contains("migrate.json"), "{bad}: {e}");
            // Consumed even though it was bad.
            assert!(!dir.path().join("migrate.json").exists());
        }
        // Still serving: a client connects.
        let again = connect(dir.path(), addr).await;
        assert!(again.connection().close_reason().is_none());
    })
    .await
    .unwrap();
}
