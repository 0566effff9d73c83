//! Every client reports its downtime; the server records it; control reads it back.
//!
//! Real quinn connections on loopback, no root, no CRIU: the server's socket is parked for a
//! "freeze" and renewed, as around a checkpoint. (Here rather than in bins/, so that neither
//! wrapper depends on the other.)
//!
//! - The swrapper binary as control drives it (signals and its admin folder): what its clients
//!   report reaches `downtime.json`, which `AdminDir::wait_downtimes` reads back by id.
//! - The cwrapper binary with three connections, against an in-process server that moves to
//!   another port: each connection reports the echo gap it measured, the very figure of its
//!   own JSON report. (The swrapper binary can only move in place, and for a move in place
//!   the demo client's measure closes before the server resumes.)
//! - The libraries: an application that reports, one that does not (the transport's pause is
//!   reported for it after the grace), the first report winning, and an abort.

// Test helpers outside #[test] functions unwrap too: a failure there is a failed test.
#![allow(clippy::unwrap_used)]

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use admin_api::{
    AbortRequest, Aborted, AdminDir, Announced, ClientsSummary, MigrateRequest, Phases,
    ResumeRequest, Resumed, ServerEvent,
};
use control_protocol::DowntimeRefused;
use cwrapper::{ClientOptions, DowntimeError, DowntimeSource, MigratingClient};
use migration_core::MigrationId;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use swrapper::{MigratableServer, MigrationHandle, ServerOptions};
use wrapper_support::Identity;

const LIMIT: Duration = Duration::from_secs(90);

fn id(n: u8) -> MigrationId {
    MigrationId::from_bytes([n; 16])
}

fn free_port() -> SocketAddr {
    UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A process this test started, killed (by its PID) if the test fails midway.
struct Process(Option<Child>);

impl Process {
    fn signal(&self, sig: Signal) {
        let child = self.0.as_ref().unwrap();
        kill(Pid::from_raw(i32::try_from(child.id()).unwrap()), sig).unwrap();
    }

    async fn wait(mut self) -> std::process::Output {
        let child = self.0.take().unwrap();
        tokio::task::spawn_blocking(move || child.wait_with_output())
            .await
            .unwrap()
            .unwrap()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Waits for the server's event of kind `E` answering `id` (consumed when read).
async fn event<E: ServerEvent + Send + 'static>(dir: &Path, id: MigrationId) -> E {
    let admin = AdminDir::open(dir).unwrap();
    tokio::task::spawn_blocking(move || admin.wait_event::<E>(Some(id), Duration::from_secs(10)))
        .await
        .unwrap()
        .unwrap()
}

/// Control's side: the downtimes the clients reported for `id`, read from the admin folder.
async fn collected(dir: &Path, id: MigrationId, n: usize) -> Vec<admin_api::ReportedDowntime> {
    let admin = AdminDir::open(dir).unwrap();
    tokio::task::spawn_blocking(move || admin.wait_downtimes(id, n, Duration::from_secs(10)))
        .await
        .unwrap()
        .unwrap()
}

/// The server's reports for `id` against the client's own figures: same connections, same
/// values (the client sends whole microseconds).
fn assert_same(reports: &[admin_api::ReportedDowntime], client: &[Option<f64>], base: &str) {
    assert_eq!(reports.len(), client.len(), "{reports:?} vs {client:?}");
    for r in reports {
        let k: usize = r
            .client_id
            .strip_prefix(&format!("{base}-"))
            .unwrap()
            .parse()
            .unwrap();
        let ms = client[k].unwrap_or_else(|| panic!("connection {k} measured nothing"));
        let diff = r.downtime_us.abs_diff((ms * 1e3) as u64);
        assert!(diff <= 1, "server {r:?}, client {ms} ms");
    }
}

/// The swrapper binary driven like control drives it (signals and its admin folder), with
/// library clients whose application reports: `downtime.json` gets every report of a move
/// and of an aborted move, read back by migration id; a report that arrives while another
/// migration is under way is recorded but written only once that migration is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_swrapper_binary_writes_what_its_clients_report() {
    let swrapper = test_support::workspace_bin("swrapper", "swrapper").unwrap();
    tokio::time::timeout(LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let addr = free_port();
        // Not parked after the announce, so that a report can arrive during a migration.
        let server = Process(Some(
            Command::new(&swrapper)
                .args(["--listen", &addr.to_string(), "--log", "warn"])
                .arg("--cert-out")
                .arg(dir.path().join("cert.pem"))
                .arg("--admin-dir")
                .arg(dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap(),
        ));
        let admin = AdminDir::open(dir.path()).unwrap();
        let ready = admin.clone();
        tokio::task::spawn_blocking(move || {
            ready.wait_event::<admin_api::Ready>(None, Duration::from_secs(10))
        })
        .await
        .unwrap()
        .unwrap();
        let roots = wrapper_support::tls::load_certs(&dir.path().join("cert.pem")).unwrap();
        let mut clients = Vec::new();
        for name in ["c0", "c1", "late"] {
            let opts = ClientOptions::new(
                addr,
                "localhost",
                roots.clone(),
                vec![demo_echo::ALPN.to_vec()],
                name,
            );
            clients.push(MigratingClient::connect(opts).await.unwrap());
        }
        let [c0, c1, late] = &clients[..] else {
            unreachable!()
        };
        // Registered (welcomed) before the move, so that each is told.
        for c in &clients {
            let mut rx = c.events();
            tokio::time::timeout(
                Duration::from_secs(5),
                rx.wait_for(|s| matches!(s.control, cwrapper::ControlStatus::Open { .. })),
            )
            .await
            .unwrap()
            .unwrap();
        }

        // A move in place (the process stays; its socket is renewed).
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
        let a: Announced = event(dir.path(), id(1)).await;
        assert_eq!(a.outcome.acked.len(), 3, "{a:?}");
        // Not over yet: the client's state machine refuses.
        assert!(matches!(
            c0.report_downtime(&id(1).to_string(), Duration::from_millis(1))
                .await,
            Err(DowntimeError::Refused(DowntimeRefused::NotFinished { .. }))
        ));
        admin
            .send_request(&ResumeRequest {
                migration_id: id(1),
            })
            .unwrap();
        server.signal(Signal::SIGUSR2);
        let r: Resumed = event(dir.path(), id(1)).await;
        assert_eq!(r.told, 3);
        for (c, ms) in [(c0, 40), (c1, 41)] {
            wait_resumed(c, 1).await;
            c.report_downtime(&id(1).to_string(), Duration::from_millis(ms))
                .await
                .unwrap();
        }
        let first = collected(dir.path(), id(1), 2).await;
        let mut got: Vec<(String, u64)> = first
            .iter()
            .map(|d| (d.client_id.clone(), d.downtime_us))
            .collect();
        got.sort();
        assert_eq!(got, [("c0".into(), 40_000), ("c1".into(), 41_000)]);

        // The next migration is under way: a late report of the first one is recorded by the
        // server, but the record is not rewritten until this one is over.
        admin
            .send_request(&MigrateRequest {
                migration_id: id(2),
                new_addr: addr,
                deadline_ms: 2000,
                phases: Phases::One,
                quiesce_deadline_ms: None,
            })
            .unwrap();
        server.signal(Signal::SIGTERM);
        let a: Announced = event(dir.path(), id(2)).await;
        assert_eq!(a.outcome.acked.len(), 3, "{a:?}");
        late.report_downtime(&id(1).to_string(), Duration::from_millis(50))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            admin.downtimes(id(1)).unwrap().len(),
            2,
            "written mid-migration"
        );
        admin
            .send_request(&AbortRequest {
                migration_id: id(2),
                fallback_addr: addr,
                deadline_ms: 2000,
            })
            .unwrap();
        server.signal(Signal::SIGUSR1);
        let ab: Aborted = event(dir.path(), id(2)).await;
        assert_eq!(ab.outcome.acked.len(), 3, "{ab:?}");
        assert_eq!(collected(dir.path(), id(1), 3).await.len(), 3);
        // The aborted move's pauses.
        for c in [c0, c1, late] {
            c.report_downtime(&id(2).to_string(), Duration::from_millis(7))
                .await
                .unwrap();
        }
        assert_eq!(collected(dir.path(), id(2), 3).await.len(), 3);
        // Read, not consumed.
        assert_eq!(admin.downtimes(id(1)).unwrap().len(), 3);
        server.signal(Signal::SIGINT);
        let out = server.wait().await;
        assert!(out.status.success(), "{}", out.status);
    })
    .await
    .unwrap();
}

/// The cwrapper binary with three connections follows a real move (another port) and an
/// aborted one: each connection reports the echo gap it measured, and the server's record
/// holds exactly the client's own figures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cwrapper_binary_reports_each_connections_echo_gap() {
    let cwrapper = test_support::workspace_bin("cwrapper", "cwrapper").unwrap();
    tokio::time::timeout(LIMIT, async {
        let s = start_server();
        let json = s.dir.path().join("clients.json");
        let client = Process(Some(
            Command::new(&cwrapper)
                .args(["--target", &s.handle.local_addr().to_string()])
                .arg("--ca")
                .arg(&s.cert)
                .arg("--json")
                .arg(&json)
                .args(["--connections", "3", "--client-id", "dt"])
                .args(["--interval-ms", "5", "--stay-connected", "--log", "warn"])
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap(),
        ));
        for _ in 0..500 {
            if s.handle
                .sessions()
                .iter()
                .filter(|x| x.control_open)
                .count()
                == 3
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;

        // A move to another port with a 60 ms freeze.
        let to = free_port();
        let r = s
            .handle
            .announce(id(1), to, Duration::from_secs(2))
            .await
            .unwrap();
        assert_eq!(r.acked.len(), 3, "{r:?}");
        s.handle.park().await.unwrap();
        tokio::time::sleep(Duration::from_millis(60)).await;
        s.handle.unpark(Some(to)).unwrap();
        assert_eq!(s.handle.resumed().unwrap(), 3);
        let first = s
            .handle
            .wait_downtime_reports(id(1), 3, Duration::from_secs(5))
            .await;
        assert_eq!(first.len(), 3, "{first:?}");
        for d in &first {
            assert!(
                (30_000..5_000_000).contains(&d.downtime_us),
                "{d:?} for a 60 ms freeze"
            );
        }

        // A move announced to an address where nothing will run, then aborted: the clients
        // go back and report that pause too.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let r = s
            .handle
            .announce(id(2), free_port(), Duration::from_secs(2))
            .await
            .unwrap();
        assert_eq!(r.acked.len(), 3, "{r:?}");
        let ab = s.handle.abort(to, Duration::from_secs(2)).await.unwrap();
        assert_eq!(ab.acked.len(), 3, "{ab:?}");
        let second = s
            .handle
            .wait_downtime_reports(id(2), 3, Duration::from_secs(5))
            .await;
        assert_eq!(second.len(), 3, "{second:?}");

        tokio::time::sleep(Duration::from_millis(100)).await;
        client.signal(Signal::SIGINT);
        let out = client.wait().await;
        assert!(out.status.success(), "{}", out.status);
        let summary: ClientsSummary =
            serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
        assert!(summary.verified, "{summary:?}");
        let measured = |id: MigrationId, aborted: bool| {
            summary
                .migrations
                .iter()
                .find(|m| m.id == id.to_string() && m.aborted == aborted)
                .unwrap_or_else(|| panic!("{id} not in {summary:?}"))
                .downtimes_ms
                .clone()
        };
        assert_same(&first, &measured(id(1), false), "dt");
        assert_same(&second, &measured(id(2), true), "dt");
    })
    .await
    .unwrap();
}

struct Server {
    handle: MigrationHandle,
    roots: Vec<cwrapper::quinn::rustls::pki_types::CertificateDer<'static>>,
    cert: std::path::PathBuf,
    dir: tempfile::TempDir,
}

/// The demo echo server in this process.
fn start_server() -> Server {
    let (identity, pem) = Identity::self_signed(&["localhost".to_owned()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("cert.pem");
    pem.write_cert(&cert).unwrap();
    let roots = wrapper_support::tls::load_certs(&cert).unwrap();
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
    Server {
        handle,
        roots,
        cert,
        dir,
    }
}

async fn connect(s: &Server, name: &str, auto: Option<Duration>) -> MigratingClient {
    let mut opts = ClientOptions::new(
        s.handle.local_addr(),
        "localhost",
        s.roots.clone(),
        vec![demo_echo::ALPN.to_vec()],
        name,
    );
    opts.auto_downtime = auto;
    MigratingClient::connect(opts).await.unwrap()
}

async fn wait_resumed(c: &MigratingClient, n: u64) {
    let mut rx = c.events();
    tokio::time::timeout(
        Duration::from_secs(5),
        rx.wait_for(|s| s.resumed >= n && s.migrations.len() as u64 >= n),
    )
    .await
    .unwrap()
    .unwrap();
}

/// The application's report wins when it comes within the grace; a client whose application
/// reports nothing has the transport's pause reported for it; a second report is refused;
/// an aborted move has no transport pause, only the application's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_libraries_application_first_transport_otherwise() {
    tokio::time::timeout(LIMIT, async {
        let s = start_server();
        let app = connect(&s, "app", None).await;
        let quiet = connect(&s, "quiet", Some(Duration::from_millis(200))).await;
        for _ in 0..500 {
            if s.handle.sessions().len() == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let m1 = id(1).to_string();
        // Nothing to report yet.
        assert!(matches!(
            app.report_downtime(&m1, Duration::from_millis(1)).await,
            Err(DowntimeError::Refused(DowntimeRefused::NotFinished { .. }))
        ));

        // A move to another port: announce, park 80 ms (the freeze), unpark there, resume.
        let to = free_port();
        let r = s
            .handle
            .announce(id(1), to, Duration::from_secs(2))
            .await
            .unwrap();
        assert!(r.complete(), "{r:?}");
        s.handle.park().await.unwrap();
        tokio::time::sleep(Duration::from_millis(80)).await;
        s.handle.unpark(Some(to)).unwrap();
        assert_eq!(s.handle.resumed().unwrap(), 2);
        wait_resumed(&app, 1).await;
        app.report_downtime(&m1, Duration::from_micros(42_123))
            .await
            .unwrap();
        assert!(matches!(
            app.report_downtime(&m1, Duration::from_millis(1)).await,
            Err(DowntimeError::Refused(
                DowntimeRefused::AlreadyReported { .. }
            ))
        ));
        let got = s
            .handle
            .wait_downtime_reports(id(1), 2, Duration::from_secs(5))
            .await;
        assert_eq!(got.len(), 2, "{got:?}");
        let of = |name: &str| got.iter().find(|r| r.client_id == name).unwrap().clone();
        assert_eq!(of("app").downtime_us, 42_123);
        // The quiet one's transport pause: its last datagram from the old port to the
        // confirmation, across the 80 ms park.
        let t = of("quiet").downtime_us;
        assert!((60_000..2_000_000).contains(&t), "{t} us");
        let q = quiet.status().downtime_reports;
        assert_eq!(q.len(), 1);
        assert_eq!(q[0].source, DowntimeSource::Transport);
        assert_eq!(q[0].downtime, Duration::from_micros(t));
        // The application comes too late: the transport's report was the one.
        assert!(matches!(
            quiet.report_downtime(&m1, Duration::from_millis(1)).await,
            Err(DowntimeError::Refused(
                DowntimeRefused::AlreadyReported { .. }
            ))
        ));
        assert_eq!(
            app.status().downtime_reports[0].source,
            DowntimeSource::Application
        );

        // Bad input from the application, refused before anything is sent.
        assert!(matches!(
            app.report_downtime("not-an-id", Duration::from_millis(1))
                .await,
            Err(DowntimeError::MigrationId(_))
        ));
        assert!(matches!(
            app.report_downtime(&m1, Duration::from_secs(2 * 3600))
                .await,
            Err(DowntimeError::TooLong(_))
        ));

        // An aborted move: only the application knows its pause.
        let nowhere = free_port();
        let r = s
            .handle
            .announce(id(2), nowhere, Duration::from_secs(2))
            .await
            .unwrap();
        assert!(r.complete(), "{r:?}");
        let ab = s.handle.abort(to, Duration::from_secs(2)).await.unwrap();
        assert!(ab.complete(), "{ab:?}");
        app.report_downtime(&id(2).to_string(), Duration::from_millis(3))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        let got = s.handle.downtime_reports(id(2));
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].client_id, "app");
        assert_eq!(quiet.status().downtime_reports.len(), 1);
        assert!(app.connection().close_reason().is_none());
        assert!(quiet.connection().close_reason().is_none());
    })
    .await
    .unwrap();
}
