//! The swrapper binary's command line: help, and bad flags refused with clear errors.

// Test helpers outside #[test] functions unwrap too: a failure there is a failed test.
#![allow(clippy::unwrap_used)]

use std::process::{Command, Output};

fn swrapper(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_swrapper"))
        .args(args)
        .env_remove("SWRAPPER_LISTEN")
        .env_remove("MIGRATE_TO")
        .env_remove("SWRAPPER_ADMIN_DIR")
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn help_explains_signals_flags_and_environment() {
    let o = swrapper(&["--help"]);
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    for needle in [
        "SIGTERM",
        "SIGUSR2",
        "SIGUSR1",
        "--listen",
        "SWRAPPER_LISTEN",
        "--migrate-to",
        "MIGRATE_TO",
        "--admin-dir",
        "--park-after-announce",
        "--cert-out",
    ] {
        assert!(text.contains(needle), "--help lacks {needle}:\n{text}");
    }
}

#[test]
fn bad_flags_are_refused() {
    let o = swrapper(&["--listen", "nowhere"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--listen"), "{}", stderr(&o));
    let o = swrapper(&["--cert", "/tmp/x.pem"]);
    assert_eq!(o.status.code(), Some(2), "--cert needs --key");
    let o = swrapper(&["--ack-deadline-ms", "0"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--ack-deadline-ms must be at least 1"));
    let o = swrapper(&["--log", "=[=="]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("invalid --log filter"));
    let o = swrapper(&["--runtime", "sideways"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--runtime"), "{}", stderr(&o));
}

#[test]
fn bad_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.pem");
    let m = missing.to_str().unwrap();
    let o = swrapper(&["--cert", m, "--key", m, "--listen", "127.0.0.1:0"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("cannot read"), "{}", stderr(&o));
    let o = swrapper(&[
        "--admin-dir",
        m,
        "--listen",
        "127.0.0.1:0",
        "--cert-out",
        dir.path().join("c.pem").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("is not a directory"), "{}", stderr(&o));
}

#[test]
fn a_port_in_use_is_a_clear_error() {
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let o = swrapper(&[
        "--listen",
        &addr,
        "--cert-out",
        dir.path().join("c.pem").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains(&format!("serving on {addr}")),
        "{}",
        stderr(&o)
    );
}
