//! control's command line and its refusals: each is checked before anything is started or
//! stopped. The refusals that need the real world (podman, criu) run as root only, against
//! containers of their own (own names, ports, state and image directories), and clean up.

// Test helpers outside #[test] functions unwrap too: a failure there is a failed test.
#![allow(clippy::unwrap_used)]

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn control(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_control"))
        .args(args)
        .env_remove("QLM_STATE_DIR")
        .env_remove("QLM_IMAGES_DIR")
        .env_remove("SRC_PORT")
        .env_remove("DST_PORT")
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

#[test]
fn help_of_every_subcommand_explains_flags_and_environment() {
    let top = control(&["--help"]);
    assert!(top.status.success());
    let text = String::from_utf8_lossy(&top.stdout);
    for needle in [
        "up",
        "migrate",
        "down",
        "status",
        "logs",
        "recover",
        "run",
        "QLM_STATE_DIR",
        "cargo xtask setup",
    ] {
        assert!(
            text.contains(needle),
            "control --help lacks {needle}:\n{text}"
        );
    }
    let expect: &[(&str, &[&str])] = &[
        (
            "up",
            &["SRC_PORT", "DST_PORT", "QLM_BIN_DIR", "--images-dir"],
        ),
        (
            "migrate",
            &[
                "QLM_ACK_DEADLINE_MS",
                "--transfer",
                "--fail-restore",
                "--keep-images",
            ],
        ),
        (
            "run",
            &[
                "--moves",
                "--preserve",
                "--fail-restore-at",
                "SRC_PORT",
                "--run-report",
            ],
        ),
        ("down", &["--state-dir"]),
        ("status", &["--state-dir"]),
        ("logs", &["--images-dir"]),
    ];
    for (sub, needles) in expect {
        let o = control(&[sub, "--help"]);
        assert!(o.status.success(), "{sub} --help");
        let text = String::from_utf8_lossy(&o.stdout);
        for n in *needles {
            assert!(text.contains(n), "control {sub} --help lacks {n}:\n{text}");
        }
    }
}

#[test]
fn bad_flags_are_refused_by_the_parser() {
    for args in [
        &["up", "--src-port", "70000"][..],
        &["up", "--src-port", "x"],
        &["up", "--ballast-mib", "-3"],
        &["up", "--server-runtime", "sideways"],
        &["up", "--ballast-mib", "lots"],
        &["restart-elsewhere", "--what"],
        &["pod-image"],
        &["migrate", "--transfer", "carrier-pigeon"],
        &["migrate", "--quiesce-deadline-ms", "0"],
        &["run", "--moves", "-1"],
        &["up", "--front", "127.0.0.1:5300"],
        &["up", "--front", "0.0.0.0:5300"],
        &["up", "--front", "10.0.0.1"],
        &["up", "--front", "10.0.0.1:0"],
        &["up", "--front", "[::1]:5300"],
        &[
            "fleet-init",
            "--out",
            "/nonexistent/x",
            "--host",
            "a=10.0.0.1",
            "--inbound-stale-s",
            "4",
        ],
        &[
            "fleet-init",
            "--out",
            "/nonexistent/x",
            "--host",
            "a=10.0.0.1",
            "--inbound-stale-s",
            "soon",
        ],
        &[
            "fleet-init",
            "--out",
            "/nonexistent/x",
            "--host",
            "a=not-an-ip",
        ],
        &[
            "fleet-init",
            "--out",
            "/nonexistent/x",
            "--host",
            "a=10.0.0.1",
            "--max-services",
            "0",
        ],
        &[
            "migrate",
            "--to",
            "b",
            "--service",
            "edge",
            "--fault",
            "gremlins",
        ],
        &["drain", "a", "--concurrency", "many"],
        &["frobnicate"],
    ] {
        let o = control(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
    }
    let o = control(&["--log", "=[==", "status"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("invalid --log filter"),
        "{}",
        stderr(&o)
    );
}

/// A service in its own pid namespace (post-copy across hosts) runs as root, and root only
/// there: refused before the agent is even asked (no agent runs here).
#[test]
fn an_agent_service_in_its_own_pid_namespace_needs_the_root_server_and_only_it() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    for args in [
        vec!["--pid-namespace"],
        vec!["--server-user", "root"],
        vec!["--pid-namespace", "--server-user", "qlm-server"],
    ] {
        let mut all = vec![
            "service",
            "--agent-socket",
            socket.to_str().unwrap(),
            "start",
            "s1",
        ];
        all.extend(args.iter().copied());
        let o = control(&all);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("--pid-namespace goes with --server-user root"),
            "{args:?}: {}",
            stderr(&o)
        );
    }
}

#[test]
fn dirtying_without_a_ballast_is_refused_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let o = control(&[
        "--state-dir",
        state.to_str().unwrap(),
        "up",
        "--dirty-mib-per-s",
        "5",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("--dirty-mib-per-s needs --ballast-mib"),
        "{}",
        stderr(&o)
    );
    assert!(!state.exists(), "nothing is created");
}

#[test]
fn without_root_nothing_starts() {
    // As root, drop to nobody for this one command (setpriv from util-linux).
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let args = ["--state-dir", state.to_str().unwrap(), "up"];
    let o = if is_root() {
        let found = Command::new("setpriv").arg("--help").output().is_ok();
        if !test_support::require("needs setpriv (util-linux) to drop root", found) {
            return;
        }
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(env!("CARGO_BIN_EXE_control"))
            .args(args)
            .output()
            .unwrap()
    } else {
        control(&args)
    };
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("control must run as root"),
        "{}",
        stderr(&o)
    );
    assert!(!state.exists(), "state was created before the root check");
}

#[test]
fn status_and_migrate_without_a_deployment_say_so() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("nothing");
    let o = control(&["--state-dir", state.to_str().unwrap(), "status"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("nothing is up"), "{}", stderr(&o));
    if test_support::require(
        "the migrate half needs root, podman, criu, runc and nsenter (cargo xtask setup)",
        is_root() && has_tools(),
    ) {
        let o = control(&["--state-dir", state.to_str().unwrap(), "migrate"]);
        assert_eq!(o.status.code(), Some(1));
        assert!(stderr(&o).contains("nothing is up"), "{}", stderr(&o));
    }
}

fn has_tools() -> bool {
    ["podman", "criu", "runc", "nsenter"].iter().all(|t| {
        std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(t).is_file()))
    })
}

/// A deployment of the test's own: names, ports, state and image directories; removed on drop.
struct World {
    dir: tempfile::TempDir,
    images: PathBuf,
    name: String,
    ports: (u16, u16),
}

impl World {
    /// `None` (with a printed reason) when the test cannot run here; a failure instead when
    /// `CI=true` (see `test_support::require`).
    fn new(tag: &str) -> Option<World> {
        if !test_support::require("needs root (podman rootful, criu)", is_root()) {
            return None;
        }
        if !test_support::require(
            "podman, criu, runc or nsenter missing (cargo xtask setup)",
            has_tools(),
        ) {
            return None;
        }
        if !test_support::require(
            "the server's account qlm-server is missing (cargo xtask setup)",
            nix::unistd::User::from_name("qlm-server")
                .ok()
                .flatten()
                .is_some(),
        ) {
            return None;
        }
        // control deploys the swrapper next to its own binary: have cargo build it there.
        let swrapper = test_support::workspace_bin("swrapper", "swrapper").unwrap();
        assert_eq!(
            swrapper.parent(),
            Path::new(env!("CARGO_BIN_EXE_control")).parent(),
            "swrapper must be built next to control"
        );
        let dir = tempfile::tempdir().unwrap();
        let images = PathBuf::from(format!("/dev/shm/qlm-test-{tag}-{}", std::process::id()));
        // Two free ports, different from the defaults and from each other.
        let a = UdpSocket::bind("0.0.0.0:0").unwrap();
        let b = UdpSocket::bind("0.0.0.0:0").unwrap();
        let ports = (
            a.local_addr().unwrap().port(),
            b.local_addr().unwrap().port(),
        );
        Some(World {
            dir,
            images,
            // QLM_TEST_NAME_PREFIX: a session sharing the host with others names its
            // containers apart.
            name: format!(
                "{}{}{tag}",
                std::env::var("QLM_TEST_NAME_PREFIX").unwrap_or_else(|_| "qlmt".to_owned()),
                std::process::id()
            ),
            ports,
        })
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_control"))
            .arg("--state-dir")
            .arg(self.dir.path().join("state"))
            .arg("--images-dir")
            .arg(&self.images)
            .args(["--name", &self.name, "--log", "warn"])
            .args(args)
            .env("SRC_PORT", self.ports.0.to_string())
            .env("DST_PORT", self.ports.1.to_string())
            .output()
            .unwrap()
    }

    fn status(&self) -> serde_json::Value {
        let o = self.run(&["status"]);
        assert!(o.status.success(), "status: {}", stderr(&o));
        serde_json::from_slice(&o.stdout).unwrap()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = self.run(&["down"]);
        let _ = std::fs::remove_dir_all(&self.images);
    }
}

#[test]
fn a_server_command_is_refused_clearly_and_leaves_nothing() {
    let Some(w) = World::new("cmd") else {
        return;
    };
    // Without a front its clients could not follow it.
    let o = w.run(&["up", "--", "/bin/true"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("--front"), "{}", stderr(&o));
    // Not a program.
    let o = w.run(&[
        "up",
        "--front",
        "10.239.0.1:5390",
        "--",
        "/nonexistent/server",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("not an executable"), "{}", stderr(&o));
    // The demo server's flags do not apply.
    let o = w.run(&[
        "up",
        "--front",
        "10.239.0.1:5390",
        "--ballast-mib",
        "8",
        "--",
        "/bin/sleep",
        "60",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("demo server's"), "{}", stderr(&o));
    // A server that exits at once: said so fast, and what up made is gone.
    let started = std::time::Instant::now();
    let o = w.run(&["up", "--front", "10.239.0.1:5390", "--", "/bin/true"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("exited at once"), "{}", stderr(&o));
    assert!(started.elapsed() < std::time::Duration::from_secs(60));
    let o = w.run(&["status"]);
    assert!(stderr(&o).contains("nothing is up"), "{}", stderr(&o));
    // Nor a supervisor of that state folder.
    let socket = w.dir.path().join("state").join("supervisor.sock");
    let left: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains("supervise") && c.contains(socket.to_str().unwrap()))
        .collect();
    assert!(left.is_empty(), "a supervisor was left: {left:?}");
    let tables = Command::new("nft").args(["list", "tables"]).output();
    if let Ok(t) = tables {
        assert!(
            !String::from_utf8_lossy(&t.stdout).contains("qlm_front_"),
            "a front was left"
        );
    }
}

#[test]
fn a_host_port_in_use_is_refused_before_anything_starts() {
    let Some(w) = World::new("port") else {
        return;
    };
    let busy = UdpSocket::bind(("0.0.0.0", w.ports.1)).unwrap();
    let o = w.run(&["up"]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains(&format!(
            "host UDP port {} (DST_PORT) is already in use",
            w.ports.1
        )),
        "{err}"
    );
    assert!(!w.dir.path().join("state").exists(), "state was created");
    drop(busy);
}

#[test]
fn a_foreign_or_stale_images_directory_is_refused() {
    let Some(w) = World::new("img") else {
        return;
    };
    std::fs::create_dir_all(&w.images).unwrap();
    std::fs::write(w.images.join("somebody-elses.img"), b"x").unwrap();
    let o = w.run(&["up"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("did not make"), "{}", stderr(&o));
    // Nothing was started, and the foreign file is untouched.
    assert!(w.images.join("somebody-elses.img").exists());
    assert!(!w.dir.path().join("state").exists());
}

#[test]
fn migrate_while_b_is_down_leaves_a_untouched_and_down_cleans_up() {
    let Some(w) = World::new("bdown") else {
        return;
    };
    let o = w.run(&["up"]);
    assert!(o.status.success(), "up: {}", stderr(&o));
    let before = w.status();
    assert_eq!(before["server"]["running"], true);
    // A stale image set (a migration that never finished) blocks the next migration.
    let stale = w.images.join("0123456789abcdef0123456789abcdef");
    std::fs::create_dir_all(&stale).unwrap();
    let o = w.run(&["migrate"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("stale image sets"), "{}", stderr(&o));
    std::fs::remove_dir_all(&stale).unwrap();
    // Stop container B behind control's back.
    let b = format!("{}-b", w.name);
    let stop = Command::new("podman")
        .args(["--runtime", "runc", "stop", "-t", "0", &b])
        .output()
        .unwrap();
    assert!(
        stop.status.success(),
        "{}",
        String::from_utf8_lossy(&stop.stderr)
    );
    let o = w.run(&["migrate"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("is not running"), "{}", stderr(&o));
    let after = w.status();
    assert_eq!(after["server"]["running"], true, "{after}");
    assert_eq!(after["server"]["pid"], before["server"]["pid"]);
    assert_eq!(after["server"]["side"], "A");
    assert_eq!(after["migrations"], 0);
    // down removes everything, also with B stopped.
    let o = w.run(&["down"]);
    assert!(o.status.success(), "down: {}", stderr(&o));
    assert!(!w.dir.path().join("state").exists());
    assert!(!w.images.exists());
    let pid = before["server"]["pid"].as_i64().unwrap();
    assert!(
        !Path::new(&format!("/proc/{pid}/cmdline")).exists() || {
            // A zombie awaiting init's reaping has an empty cmdline.
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .unwrap_or_default()
                .is_empty()
        }
    );
}

#[test]
fn a_move_is_observed_and_a_restore_into_the_source_namespace_is_caught() {
    let Some(w) = World::new("place") else {
        return;
    };
    let o = w.run(&["up"]);
    assert!(o.status.success(), "up: {}", stderr(&o));
    let up = w.status();
    assert_eq!(up["server"]["in_its_container"], true, "{up}");
    assert_eq!(up["supervisor"]["answers"], true, "{up}");
    let pid = up["server"]["pid"].as_i64().unwrap();
    // The network-facing server runs as the unprivileged account, with no_new_privs.
    let creds = |pid: i64| -> (String, String) {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        };
        (field("Uid:"), field("NoNewPrivs:"))
    };
    let user = nix::unistd::User::from_name("qlm-server").unwrap().unwrap();
    let uid = user.uid.as_raw().to_string();
    let expected = (format!("{uid} {uid} {uid} {uid}"), "1".to_owned());
    assert_eq!(creds(pid), expected, "after up");
    let parent = |pid: i64| -> i64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let (_, rest) = stat.rsplit_once(')').unwrap();
        rest.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    assert_eq!(parent(pid), up["supervisor"]["pid"].as_i64().unwrap());

    // A real move A -> B, by hand: the restored server is observed in B, the supervisor's child.
    let report = w.dir.path().join("good.json");
    let o = w.run(&["migrate", "--report", report.to_str().unwrap()]);
    assert!(o.status.success(), "migrate: {}", stderr(&o));
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(r["result"], "completed", "{r}");
    assert_eq!(
        r["placement"]["netns_inode"], r["placement"]["expected_netns_inode"],
        "{r}"
    );
    assert_ne!(r["source_probe"], "answered", "{r}");
    assert_eq!(r["target_probe"], "answered", "{r}");
    // Both through criu workers started before the freeze (criu_rpc.rs).
    assert_eq!(r["dump"]["route"], "worker", "{r}");
    assert_eq!(r["restore"]["route"], "worker", "{r}");
    let moved = w.status();
    assert_eq!(moved["server"]["side"], "B", "{moved}");
    assert_eq!(moved["server"]["in_its_container"], true, "{moved}");
    assert_eq!(parent(pid), moved["supervisor"]["pid"].as_i64().unwrap());
    // CRIU brought it back as the same account, still without new privileges.
    assert_eq!(creds(pid), expected, "after the move");

    // B -> A, but restored into B's namespace again: the labels would say A, the engine
    // observes B and reports the move failed.
    let report = w.dir.path().join("bad.json");
    let o = w.run(&[
        "migrate",
        "--fault-restore-in-source",
        "--report",
        report.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("is not in") && stderr(&o).contains("network namespace"),
        "{}",
        stderr(&o)
    );
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(r["result"], "failed", "{r}");
    assert_eq!(r["recovery"], "abort", "{r}");
    // The restore worker waited in the target's namespace: the command line restored, and the
    // report says why.
    assert_eq!(r["restore"]["route"], "command_line", "{r}");
    assert!(
        r["restore"]["worker_error"]
            .as_str()
            .is_some_and(|e| e.contains("waits in")),
        "{r}"
    );
    assert_ne!(
        r["placement"]["netns_inode"], r["placement"]["expected_netns_inode"],
        "{r}"
    );
    let after = w.status();
    assert_eq!(after["server"]["side"], "B", "{after}");
    assert_eq!(after["migrations"], 1, "{after}");
}

/// Every file under `dir` is 0600 and every folder 0700; returns how many files there are.
fn assert_private_tree(dir: &Path) -> usize {
    use std::os::unix::fs::MetadataExt as _;
    let mut files = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let m = std::fs::symlink_metadata(&d).unwrap();
        assert_eq!(m.mode() & 0o777, 0o700, "{}", d.display());
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                stack.push(p);
            } else if m.file_type().is_socket() {
                // The supervisor's socket: 0600 as well.
                assert_eq!(m.mode() & 0o777, 0o600, "{}", p.display());
            } else {
                assert!(m.is_file(), "{} is not a regular file", p.display());
                assert_eq!(m.mode() & 0o777, 0o600, "{}", p.display());
                files += 1;
            }
        }
    }
    files
}

use std::os::unix::fs::FileTypeExt as _;

#[test]
fn a_foreign_or_symlinked_state_folder_is_refused() {
    let Some(w) = World::new("foreign") else {
        return;
    };
    let state = w.dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::os::unix::fs::chown(&state, Some(65534), Some(65534)).unwrap();
    let o = w.run(&["up"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("belongs to uid 65534"),
        "{}",
        stderr(&o)
    );
    // Nothing was started or written into it.
    assert_eq!(std::fs::read_dir(&state).unwrap().count(), 0);
    assert!(!w.images.exists());
    std::fs::remove_dir(&state).unwrap();
    // A symlink to a folder elsewhere.
    let elsewhere = w.dir.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &state).unwrap();
    let o = w.run(&["up"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("symlink"), "{}", stderr(&o));
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
    // Another user's folder carrying control's marker is not removed by down either.
    std::fs::remove_file(&state).unwrap();
    std::fs::create_dir(&state).unwrap();
    std::fs::write(state.join(".quic-live-migrate-state"), b"").unwrap();
    std::os::unix::fs::chown(&state, Some(65534), Some(65534)).unwrap();
    let o = w.run(&["down"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("belongs to uid 65534"),
        "{}",
        stderr(&o)
    );
    assert!(state.join(".quic-live-migrate-state").exists());
    std::fs::remove_dir_all(&state).unwrap();
    // A folder of ours that holds someone's files is not adopted (nor removed by down).
    std::fs::create_dir(&state).unwrap();
    std::fs::write(state.join("notes.txt"), b"mine").unwrap();
    let o = w.run(&["up"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("did not make"), "{}", stderr(&o));
    let _ = w.run(&["down"]);
    assert!(state.join("notes.txt").exists());
    std::fs::remove_dir_all(&state).unwrap();
}

#[test]
fn image_files_are_private_during_a_move_and_removed_after_it_however_it_ends() {
    let Some(w) = World::new("modes") else {
        return;
    };
    let o = w.run(&["up"]);
    assert!(o.status.success(), "up: {}", stderr(&o));
    let state = w.dir.path().join("state");
    assert!(assert_private_tree(&state) > 3);
    // control killed right after the dump: the image set is there, private.
    let o = Command::new(env!("CARGO_BIN_EXE_control"))
        .arg("--state-dir")
        .arg(&state)
        .arg("--images-dir")
        .arg(&w.images)
        .args(["--name", &w.name, "--log", "warn", "migrate"])
        .env("QLM_KILL_AT", "dumped")
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        None,
        "control was to be killed: {}",
        stderr(&o)
    );
    let files = assert_private_tree(&w.images);
    assert!(files > 10, "only {files} files: no image set?");
    // The next control recovers (status runs it first): the server serves in A again, the
    // image set is gone.
    let s = w.status();
    assert_eq!(s["server"]["side"], "A", "{s}");
    assert_eq!(s["server"]["running"], true, "{s}");
    assert_eq!(s["server"]["in_its_container"], true, "{s}");
    let left: Vec<_> = std::fs::read_dir(&w.images).unwrap().collect();
    assert_eq!(left.len(), 1, "only the marker should be left: {left:?}");
    // A completed move and a failed one leave no image set either.
    let o = w.run(&["migrate"]);
    assert!(o.status.success(), "migrate: {}", stderr(&o));
    assert_eq!(std::fs::read_dir(&w.images).unwrap().count(), 1);
    let o = w.run(&["migrate", "--fail-dump"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(std::fs::read_dir(&w.images).unwrap().count(), 1);
    // Everything control wrote meanwhile is private too.
    assert_private_tree(&state);
}

#[test]
fn two_migrations_at_once_the_second_is_refused_and_told_who_works() {
    let Some(w) = World::new("twice") else {
        return;
    };
    let o = w.run(&["up"]);
    assert!(o.status.success(), "up: {}", stderr(&o));
    let state = w.dir.path().join("state");
    let first = Command::new(env!("CARGO_BIN_EXE_control"))
        .arg("--state-dir")
        .arg(&state)
        .arg("--images-dir")
        .arg(&w.images)
        .args(["--name", &w.name, "--log", "warn", "migrate"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let holder = format!("held by control migrate, PID {}", first.id());
    let mut held = false;
    for _ in 0..2000 {
        if std::fs::read_to_string(state.join("control.lock")).is_ok_and(|t| t.contains(&holder)) {
            held = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_micros(500));
    }
    let second = w.run(&["migrate"]);
    let out = first.wait_with_output().unwrap();
    assert!(held, "the first migrate never held the lock");
    assert!(out.status.success(), "the first migrate failed");
    assert_eq!(second.status.code(), Some(1));
    let err = stderr(&second);
    assert!(err.contains("another control works on"), "{err}");
    assert!(err.contains(&holder), "{err}");
    // The first one moved the server; the second changed nothing.
    let s = w.status();
    assert_eq!(s["server"]["side"], "B", "{s}");
    assert_eq!(s["migrations"], 1, "{s}");
}

/// The report a `migrate --report <path>` wrote.
fn read_report(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn post_copy_without_a_pid_namespace_is_refused_and_the_server_stays() {
    let Some(w) = World::new("pcno") else {
        return;
    };
    // --pid-namespace needs a root server, and a root server needs --pid-namespace.
    let o = w.run(&["up", "--pid-namespace"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--server-user root"), "{}", stderr(&o));
    let o = w.run(&["up", "--server-user", "root"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("only for --pid-namespace"),
        "{}",
        stderr(&o)
    );
    let o = w.run(&["up"]);
    assert!(o.status.success(), "up: {}", stderr(&o));
    let before = w.status();
    assert_eq!(before["server"]["own_pid_namespace"], false, "{before}");
    let o = w.run(&["migrate", "--memory", "post-copy"]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains("own pid namespace") && err.contains("control up --pid-namespace"),
        "{err}"
    );
    let after = w.status();
    assert_eq!(after["server"], before["server"], "{after}");
    assert_eq!(after["migrations"], 0, "{after}");
    let o = w.run(&["migrate", "--memory", "teleport"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}

#[test]
fn in_its_own_pid_namespace_the_server_moves_post_copy_and_cold_and_rolls_back() {
    let Some(w) = World::new("pcyes") else {
        return;
    };
    if !test_support::require(
        "needs fs.pipe-max-size >= 4 MiB (cargo xtask setup)",
        std::fs::read_to_string("/proc/sys/fs/pipe-max-size")
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok())
            .is_some_and(|v| v >= 4 << 20),
    ) {
        return;
    }
    let o = w.run(&["up", "--pid-namespace", "--server-user", "root"]);
    assert!(o.status.success(), "up: {}", stderr(&o));
    let up = w.status();
    assert_eq!(up["server"]["own_pid_namespace"], true, "{up}");
    assert_eq!(up["server"]["in_its_container"], true, "{up}");
    // Post-copy A -> B: observed at B, every page arrived, figures recorded.
    let report = w.dir.path().join("pc.json");
    let o = w.run(&[
        "migrate",
        "--memory",
        "post-copy",
        "--report",
        report.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "post-copy migrate: {}", stderr(&o));
    let r = read_report(&report);
    assert_eq!(r["result"], "completed", "{r}");
    assert!(r["timeline"]["freeze_time_us"].as_u64().is_some(), "{r}");
    let pc = &r["post_copy"];
    assert!(pc["resident_after_ms"].as_f64().is_some(), "{r}");
    assert!(
        pc["bytes_transferred"].as_u64().is_some_and(|b| b > 0),
        "{r}"
    );
    assert!(pc["error"].is_null(), "{r}");
    let moved = w.status();
    assert_eq!(moved["server"]["side"], "B", "{moved}");
    assert_eq!(moved["server"]["in_its_container"], true, "{moved}");
    assert_eq!(moved["server"]["own_pid_namespace"], true, "{moved}");
    // Cold B -> A in the same layout.
    let report = w.dir.path().join("cold.json");
    let o = w.run(&[
        "migrate",
        "--memory",
        "cold",
        "--report",
        report.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "cold migrate: {}", stderr(&o));
    let r = read_report(&report);
    assert_eq!(r["result"], "completed", "{r}");
    assert!(r["post_copy"].is_null(), "{r}");
    assert_eq!(w.status()["server"]["side"], "A");
    // Post-copy whose restore fails, and one whose dump fails: the source serves again.
    for fault in ["--fail-restore", "--fail-dump"] {
        let report = w.dir.path().join(format!("rb{fault}.json"));
        let o = w.run(&[
            "migrate",
            "--memory",
            "post-copy",
            fault,
            "--report",
            report.to_str().unwrap(),
        ]);
        assert_eq!(o.status.code(), Some(1), "{fault}: {}", stderr(&o));
        let r = read_report(&report);
        assert_eq!(r["result"], "rolled_back", "{fault}: {r}");
        let st = w.status();
        assert_eq!(st["server"]["side"], "A", "{fault}: {st}");
        assert_eq!(st["server"]["running"], true, "{fault}: {st}");
        assert_eq!(st["server"]["in_its_container"], true, "{fault}: {st}");
    }
    // Sealed transfer has no pages to seal: refused before anything is touched.
    let o = w.run(&["migrate", "--memory", "post-copy", "--transfer", "sealed"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--transfer local"), "{}", stderr(&o));
    let o = w.run(&["down"]);
    assert!(o.status.success(), "down: {}", stderr(&o));
}
