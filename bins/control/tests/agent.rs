//! A real `control agent` (root: it mounts its private tmpfs) and a peer that is not one:
//! every kind of bad request gets a typed refusal and a log line, and the agent goes on
//! serving. The test speaks as host `b` of the fleet (its certificate and token key), over
//! real quinn connections with mutual TLS, to the agent of host `a` on 127.0.0.1.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_protocol::{
    MAX_MESSAGE, Name, PeerBody, PeerReply, PeerRequest, Prepare, Refusal, ServiceSpec,
    TokenRefusal,
};
use migration_core::MigrationId;
use migration_crypto::{TokenClaims, TokenKey};
use quinn::rustls;

const LIMIT: Duration = Duration::from_secs(20);

struct Agent {
    child: Child,
    log: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_udp() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn free_tcp() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// fleet-init for hosts a and b on 127.0.0.1, a's ports made free ones.
fn fleet(dir: &Path) -> (SocketAddr, SocketAddr) {
    let out = Command::new(env!("CARGO_BIN_EXE_control"))
        .args([
            "fleet-init",
            "--host",
            "a=127.0.0.1",
            "--host",
            "b=127.0.0.1",
            "--out",
        ])
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = dir.join("a/agent.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let (port, metrics) = (free_udp(), free_tcp());
    v["agent_port"] = port.into();
    v["metrics"] = format!("127.0.0.1:{metrics}").into();
    // Many requests in a burst: the rate limit is tested on its own below.
    v["peer_rate"] = serde_json::json!([1000, 1000]);
    std::fs::remove_file(&path).unwrap();
    std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
    (
        SocketAddr::from(([127, 0, 0, 1], port)),
        SocketAddr::from(([127, 0, 0, 1], metrics)),
    )
}

fn start_agent(dir: &Path, fleet: &Path, storage: &Path) -> Agent {
    let log = dir.join("agent.log");
    let file = std::fs::File::create(&log).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_control"))
        .args(["--log", "info", "agent", "--private-storage", "--config"])
        .arg(fleet.join("a/agent.json"))
        .arg("--storage")
        .arg(storage)
        .arg("--swrapper")
        .arg("/bin/true")
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap();
    let mut agent = Agent { child, log };
    let start = Instant::now();
    while !std::fs::read_to_string(&agent.log)
        .unwrap_or_default()
        .contains("agent ready")
    {
        if let Ok(Some(st)) = agent.child.try_wait() {
            panic!("the agent exited ({st}): {}", log_of(&agent));
        }
        assert!(
            start.elapsed() < LIMIT,
            "the agent did not start: {}",
            log_of(&agent)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    agent
}

fn log_of(agent: &Agent) -> String {
    std::fs::read_to_string(&agent.log).unwrap_or_default()
}

fn pem_certs(path: &Path) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject as _;
    rustls::pki_types::CertificateDer::pem_file_iter(path)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// A quinn client speaking as host `b` (or with another fleet's identity).
fn client(fleet: &Path, host_dir: &Path) -> quinn::Endpoint {
    use rustls::pki_types::pem::PemObject as _;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in pem_certs(&fleet.join("ca.pem")) {
        roots.add(c).unwrap();
    }
    let key =
        rustls::pki_types::PrivateKeyDer::from_pem_file(host_dir.join("agent-key.pem")).unwrap();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(pem_certs(&host_dir.join("agent-cert.pem")), key)
        .unwrap();
    tls.alpn_protocols = vec![agent_protocol::PEER_ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    ep
}

async fn raw(conn: &quinn::Connection, bytes: &[u8]) -> PeerReply {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    let _ = send.finish();
    let body = recv.read_to_end(MAX_MESSAGE + 4).await.unwrap();
    agent_protocol::decode(&body[4..]).unwrap()
}

async fn ask(conn: &quinn::Connection, r: &PeerRequest) -> PeerReply {
    raw(conn, &agent_protocol::to_frame(r).unwrap()).await
}

fn token(key: &TokenKey, m: MigrationId, src: &str, dst: &str, issued: u64, life: u64) -> Vec<u8> {
    migration_crypto::issue_token(
        key,
        &TokenClaims {
            migration_id: *m.as_bytes(),
            source: src.into(),
            target: dst.into(),
            issued_at: issued,
            expires_at: issued + life,
        },
    )
    .unwrap()
    .into_bytes()
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn prepare(m: MigrationId) -> PeerBody {
    PeerBody::Prepare(Prepare {
        migration: m,
        service: ServiceSpec {
            name: Name::new("edge").unwrap(),
            server_user: None,
            moves: 0,
        },
        seal_public: [7; 32],
        server_pid: 1,
        phases: admin_api::Phases::One,
        fault: None,
        image_estimate: 0,
    })
}

#[test]
fn every_bad_request_is_refused_typed_logged_and_the_agent_serves_on() {
    if !test_support::require(
        "root (the agent mounts its private tmpfs)",
        nix::unistd::geteuid().is_root(),
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let fleet_dir = tmp.path().join("fleet");
    let (addr, metrics) = fleet(&fleet_dir);
    let other = tmp.path().join("other");
    fleet(&other);
    let storage = tmp.path().join("storage");
    let agent = start_agent(tmp.path(), &fleet_dir, &storage);
    let key = migration_crypto::load_token_key_file(&fleet_dir.join("b/token.key")).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let ep = client(&fleet_dir, &fleet_dir.join("b"));
        let conn = tokio::time::timeout(LIMIT, ep.connect(addr, "a.agents.qlm").unwrap())
            .await
            .unwrap()
            .unwrap();
        let status = |t: Vec<u8>| PeerRequest {
            token: t,
            body: PeerBody::Status,
        };
        let fresh = || MigrationId::from_bytes(rand16());

        // Garbage, a length above the maximum, a wrong version.
        assert!(matches!(
            raw(&conn, b"\x00\x00\x00\x05hello").await,
            PeerReply::Refused(Refusal::Malformed(_))
        ));
        let huge = ((MAX_MESSAGE + 1) as u32).to_be_bytes();
        assert_eq!(
            raw(&conn, &huge).await,
            PeerReply::Refused(Refusal::Oversized)
        );
        assert!(matches!(
            raw(&conn, b"\x00\x00\x00\x02\xff\x7f").await,
            PeerReply::Refused(Refusal::Malformed(_))
        ));
        // Tokens: forged, expired, bound to another target, replayed.
        let other_key = migration_crypto::load_token_key_file(&other.join("b/token.key")).unwrap();
        let m = fresh();
        assert_eq!(
            ask(&conn, &status(token(&other_key, m, "b", "a", now(), 60))).await,
            PeerReply::Refused(Refusal::Token(TokenRefusal::Forged))
        );
        assert_eq!(
            ask(&conn, &status(token(&key, m, "b", "a", now() - 3600, 60))).await,
            PeerReply::Refused(Refusal::Token(TokenRefusal::Expired))
        );
        assert_eq!(
            ask(&conn, &status(token(&key, m, "b", "c", now(), 60))).await,
            PeerReply::Refused(Refusal::Token(TokenRefusal::WrongBinding))
        );
        let t = token(&key, m, "b", "a", now(), 60);
        assert!(matches!(
            ask(&conn, &status(t.clone())).await,
            PeerReply::Status(_)
        ));
        // A status request spends nothing (a replay does no harm); the replay cache is for
        // Prepare (below).
        assert!(matches!(ask(&conn, &status(t)).await, PeerReply::Status(_)));
        // A token living longer than the fleet issues them is refused.
        assert_eq!(
            ask(
                &conn,
                &status(token(&key, fresh(), "b", "a", now(), 86_400))
            )
            .await,
            PeerReply::Refused(Refusal::Token(TokenRefusal::Malformed))
        );
        // A token for one migration shown for another; an unknown migration.
        let m2 = fresh();
        let t2 = token(&key, m2, "b", "a", now(), 60);
        assert_eq!(
            ask(
                &conn,
                &PeerRequest {
                    token: t2.clone(),
                    body: PeerBody::Restore { migration: fresh() }
                }
            )
            .await,
            PeerReply::Refused(Refusal::Token(TokenRefusal::WrongMigration))
        );
        assert!(matches!(
            ask(
                &conn,
                &PeerRequest {
                    token: t2.clone(),
                    body: PeerBody::Restore { migration: m2 }
                }
            )
            .await,
            PeerReply::Refused(Refusal::UnknownMigration(_))
        ));
        // A page stream for a migration that is not prepared here: refused before any
        // criu starts, with a frame (not raw bytes).
        assert!(matches!(
            ask(
                &conn,
                &PeerRequest {
                    token: t2.clone(),
                    body: PeerBody::Pages { migration: m2 }
                }
            )
            .await,
            PeerReply::Refused(Refusal::UnknownMigration(_))
        ));
        assert!(matches!(
            ask(
                &conn,
                &PeerRequest {
                    token: t2,
                    body: PeerBody::Abort { migration: m2 }
                }
            )
            .await,
            PeerReply::Refused(Refusal::UnknownMigration(_))
        ));
        // A Prepare whose token is replayed (the first one fails its work here: no slot can be
        // made in the machine's own namespaces; the token is spent all the same).
        let m3 = fresh();
        let t3 = token(&key, m3, "b", "a", now(), 60);
        let first = ask(
            &conn,
            &PeerRequest {
                token: t3.clone(),
                body: prepare(m3),
            },
        )
        .await;
        assert!(
            matches!(
                first,
                PeerReply::Refused(Refusal::Failed { .. } | Refusal::Busy(_))
            ),
            "{first:?}"
        );
        assert_eq!(
            ask(
                &conn,
                &PeerRequest {
                    token: t3,
                    body: prepare(m3)
                }
            )
            .await,
            PeerReply::Refused(Refusal::Token(TokenRefusal::Replayed))
        );
        // Still serving.
        let ok = ask(&conn, &status(token(&key, fresh(), "b", "a", now(), 60))).await;
        let PeerReply::Status(s) = ok else {
            panic!("{ok:?}")
        };
        assert_eq!(s.host.as_str(), "a");

        // Another fleet's certificate does not get through the handshake.
        let stranger = client(&other, &other.join("b"));
        let refused =
            tokio::time::timeout(LIMIT, stranger.connect(addr, "a.agents.qlm").unwrap()).await;
        assert!(!matches!(refused, Ok(Ok(_))), "a stranger got in");
        // The command line: a move to a host off the allowlist is refused. (The agent's socket
        // is in its private mount namespace: the command joins it.)
        let moved = Command::new("nsenter")
            .arg("-t")
            .arg(agent.child.id().to_string())
            .args(["-m", "--"])
            .arg(env!("CARGO_BIN_EXE_control"))
            .args([
                "migrate",
                "--to",
                "zz",
                "--service",
                "edge",
                "--agent-socket",
            ])
            .arg(storage.join("agent.sock"))
            .output()
            .unwrap();
        assert!(!moved.status.success());
        let said = String::from_utf8_lossy(&moved.stderr);
        assert!(said.contains("not on this host's allowlist"), "{said}");
    });
    // Every refusal was logged, and counted.
    let log = log_of(&agent);
    for needle in [
        "REFUSED request: malformed",
        "REFUSED request: request too large",
        "token refused: forged",
        "token refused: expired",
        "token refused: replayed",
        "token refused: bound to other hosts",
        "no migration",
        "REFUSED connection",
    ] {
        assert!(log.contains(needle), "no log line with {needle:?}:\n{log}");
    }
    let text = http_get(metrics, "/metrics");
    for (reason, at_least) in [
        ("bad_token", 3.0),
        ("expired", 1.0),
        ("replayed", 1.0),
        ("malformed", 2.0),
        ("oversized", 1.0),
        ("unknown_service", 2.0),
        ("bad_certificate", 1.0),
    ] {
        let line = text
            .lines()
            .find(|l| {
                l.starts_with("qlm_agent_refusals_total")
                    && l.contains(&format!("reason=\"{reason}\""))
            })
            .unwrap_or_else(|| panic!("no refusals_total for {reason}:\n{text}"));
        let n: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(n >= at_least, "{reason}: {n} < {at_least}");
    }
    assert!(http_get(metrics, "/healthz").starts_with("HTTP/1.1 200"));
    drop(agent);
}

fn rand16() -> [u8; 16] {
    use std::io::Read as _;
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut b)
        .unwrap();
    b
}

fn http_get(addr: SocketAddr, path: &str) -> String {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect_timeout(&addr, LIMIT).unwrap();
    s.set_read_timeout(Some(LIMIT)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}
