//! swrapper started as root with `--user nobody`: it opens its files, gives the admin
//! directory to nobody (inside a root-only 0700 parent), and drops to nobody with
//! no_new_privs; the admin round trip (SIGTERM with a migrate request, announce event) still
//! works through the directory it opened. Needs root.

#![allow(clippy::unwrap_used)]

use std::net::{SocketAddr, UdpSocket};
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use admin_api::{AdminDir, Announced, MigrateRequest, Ready};
use cwrapper::{ClientOptions, MigratingClient};
use migration_core::MigrationId;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const NOBODY: u32 = 65534;

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `(real, effective, saved, fs)` of the `Uid:` or `Gid:` line, and NoNewPrivs, of `pid`.
fn status(pid: u32) -> (Vec<u32>, Vec<u32>, String, u32) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_default()
            .trim()
            .to_owned()
    };
    let ids = |name: &str| {
        field(name)
            .split_whitespace()
            .map(|x| x.parse().unwrap())
            .collect()
    };
    (
        ids("Uid:"),
        ids("Gid:"),
        field("Groups:"),
        field("NoNewPrivs:").parse().unwrap(),
    )
}

fn owner_mode(p: &Path) -> (u32, u32) {
    let m = std::fs::metadata(p).unwrap();
    (m.uid(), m.mode() & 0o7777)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_runs_as_nobody_with_no_new_privs_and_still_answers_control() {
    if !test_support::require(
        "needs root (swrapper --user drops from root)",
        test_support::is_root(),
    ) {
        return;
    }
    let bin = test_support::workspace_bin("swrapper", "swrapper").unwrap();
    tokio::time::timeout(Duration::from_secs(60), async {
        // Root's, mode 0700: the parent that keeps other users out.
        let state = tempfile::tempdir().unwrap();
        std::fs::set_permissions(state.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        assert_eq!(owner_mode(state.path()), (0, 0o700));
        let dir = state.path().join("admin");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let addr = UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let cert = state.path().join("cert.pem");
        let server = Server(
            Command::new(&bin)
                .args([
                    "--listen",
                    &addr.to_string(),
                    "--log",
                    "warn",
                    "--user",
                    "nobody",
                ])
                .arg("--cert-out")
                .arg(&cert)
                .arg("--admin-dir")
                .arg(&dir)
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap(),
        );
        let pid = server.0.id();
        let admin = AdminDir::open(&dir).unwrap();
        // ready.json is written by the server as nobody: 0600, nobody's.
        let ready_path = dir.join("ready.json");
        for _ in 0..1000 {
            if ready_path.exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(owner_mode(&ready_path), (NOBODY, 0o600));
        let ready: Ready = admin.wait_event(None, Duration::from_secs(10)).unwrap();
        assert_eq!(ready.pid, pid);
        // The admin directory was handed to nobody, mode 0700, inside root's 0700 parent.
        assert_eq!(owner_mode(&dir), (NOBODY, 0o700));
        assert_eq!(owner_mode(state.path()), (0, 0o700));

        let (uid, gid, groups, no_new_privs) = status(pid);
        assert_eq!(uid, [NOBODY; 4], "Uid: {uid:?}");
        assert_eq!(gid, [NOBODY; 4], "Gid: {gid:?}");
        assert_eq!(groups, "", "supplementary groups left");
        assert_eq!(no_new_privs, 1);

        // A client, then the admin round trip: root's request, nobody's answer.
        let roots = wrapper_support::tls::load_certs(&cert).unwrap();
        let opts = ClientOptions::new(
            addr,
            "localhost",
            roots,
            vec![demo_echo::ALPN.to_vec()],
            "unprivileged-test",
        );
        let client = MigratingClient::connect(opts).await.unwrap();
        // Let its Hello be registered (as in signals.rs).
        tokio::time::sleep(Duration::from_millis(200)).await;
        let id = MigrationId::from_bytes([7; 16]);
        admin
            .send_request(&MigrateRequest {
                migration_id: id,
                new_addr: addr,
                deadline_ms: 2000,
                phases: admin_api::Phases::One,
                quiesce_deadline_ms: None,
            })
            .unwrap();
        // Control's request (written by root) was given to the directory's owner.
        assert_eq!(owner_mode(&dir.join("migrate.json")), (NOBODY, 0o600));
        kill(Pid::from_raw(i32::try_from(pid).unwrap()), Signal::SIGTERM).unwrap();
        let announce = dir.join("announce.json");
        for _ in 0..1000 {
            if announce.exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(owner_mode(&announce), (NOBODY, 0o600));
        let e: Announced = admin.wait_event(Some(id), Duration::from_secs(10)).unwrap();
        assert_eq!(e.outcome.acked.len(), 1, "{e:?}");
        assert!(
            !dir.join("migrate.json").exists(),
            "the request was not consumed"
        );
        assert!(client.connection().close_reason().is_none());
    })
    .await
    .unwrap();
}

#[test]
fn user_is_refused_when_the_admin_dirs_parent_lets_others_in() {
    if !test_support::require(
        "needs root (swrapper --user drops from root)",
        test_support::is_root(),
    ) {
        return;
    }
    let bin = test_support::workspace_bin("swrapper", "swrapper").unwrap();
    let state = tempfile::tempdir().unwrap();
    std::fs::set_permissions(state.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let dir = state.path().join("admin");
    std::fs::create_dir(&dir).unwrap();
    let addr = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let run = |user: &str| {
        Command::new(&bin)
            .args(["--listen", &addr.to_string(), "--user", user])
            .arg("--cert-out")
            .arg(state.path().join("cert.pem"))
            .arg("--admin-dir")
            .arg(&dir)
            .output()
            .unwrap()
    };
    let out = run("nobody");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("must be owned by root with mode 0700"),
        "{err}"
    );
    assert!(err.contains("0755"), "{err}");
    // Nothing was handed over.
    assert_eq!(owner_mode(&dir).0, 0);
    let out = run("no-such-user-here");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("no such user"), "{err}");
    let _: SocketAddr = addr;
}
