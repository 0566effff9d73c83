//! The cwrapper binary's command line: help, and bad flags refused with clear errors before
//! anything starts.

// Test helpers outside #[test] functions unwrap too: a failure there is a failed test.
#![allow(clippy::unwrap_used)]

use std::process::{Command, Output};

fn cwrapper(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cwrapper"))
        .args(args)
        .env_remove("TARGET_ADDR")
        .env_remove("TRANSPARENT")
        .env_remove("CWRAPPER_CA")
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn help_explains_flags_and_environment() {
    let o = cwrapper(&["--help"]);
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    for needle in [
        "--target",
        "TARGET_ADDR",
        "--stay-connected",
        "TRANSPARENT=1",
        "--ca",
        "--migrated-io-timeout-ms",
        "--recovery-deadline-ms",
        "downtime",
        "Exit status",
    ] {
        assert!(text.contains(needle), "--help lacks {needle}:\n{text}");
    }
}

#[test]
fn a_missing_ca_is_refused() {
    let o = cwrapper(&[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--ca"), "{}", stderr(&o));
}

#[test]
fn a_bad_target_is_refused() {
    let o = cwrapper(&["--ca", "/nonexistent", "--target", "not-an-address"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--target"), "{}", stderr(&o));
}

#[test]
fn zero_timeouts_are_refused() {
    for flag in [
        "--io-timeout-ms",
        "--migrated-io-timeout-ms",
        "--recovery-deadline-ms",
    ] {
        let o = cwrapper(&["--ca", "/nonexistent", flag, "0"]);
        assert_eq!(o.status.code(), Some(1), "{flag}");
        assert!(
            stderr(&o).contains(&format!("{flag} must be at least 1")),
            "{}",
            stderr(&o)
        );
    }
    let o = cwrapper(&["--ca", "/nonexistent", "--interval-ms", "-5"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn an_unreadable_or_bad_ca_file_is_a_clear_error() {
    let o = cwrapper(&["--ca", "/nonexistent/ca.pem"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("cannot read /nonexistent/ca.pem"),
        "{}",
        stderr(&o)
    );
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.pem");
    std::fs::write(&bad, "not a certificate").unwrap();
    let o = cwrapper(&["--ca", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("holds no valid PEM certificate"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_bad_log_filter_is_refused() {
    let o = cwrapper(&["--ca", "/nonexistent", "--log", "=[=="]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("invalid --log filter"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn no_server_is_a_clear_connect_error() {
    let dir = tempfile::tempdir().unwrap();
    let (_, pem) = wrapper_support::Identity::self_signed(&["localhost".to_owned()]).unwrap();
    let ca = dir.path().join("ca.pem");
    pem.write_cert(&ca).unwrap();
    // A port nobody serves.
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let target = format!("127.0.0.1:{port}");
    let started = std::time::Instant::now();
    let o = Command::new(env!("CARGO_BIN_EXE_cwrapper"))
        .args(["--ca", ca.to_str().unwrap(), "--target", &target])
        .env("CWRAPPER_CONNECT_TIMEOUT_MS", "1000")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains(&format!("connecting to {target}")),
        "{}",
        stderr(&o)
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
}

#[test]
fn a_bad_connection_count_is_a_usage_error() {
    for bad in ["0", "1001", "many", "-3", ""] {
        let o = cwrapper(&["--ca", "/nonexistent", "--connections", bad]);
        assert_eq!(
            o.status.code(),
            Some(2),
            "--connections {bad:?}: {}",
            stderr(&o)
        );
        let err = stderr(&o);
        assert!(
            err.contains("invalid value")
                && err.contains("--connections")
                && err.contains("try '--help'"),
            "--connections {bad:?}: {err}"
        );
    }
    // The limits are named.
    let o = cwrapper(&["--ca", "/nonexistent", "--connections", "0"]);
    assert!(stderr(&o).contains("1..=1000"), "{}", stderr(&o));
    // In range, the flag is accepted (the missing CA is the next error, exit 1).
    let o = cwrapper(&["--ca", "/nonexistent", "--connections", "1000"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
}

#[test]
fn help_explains_several_connections() {
    let o = cwrapper(&["--help"]);
    let text = String::from_utf8_lossy(&o.stdout);
    for needle in ["--connections", "--stagger-ms", "<client-id>-<k>", "p95"] {
        assert!(text.contains(needle), "--help lacks {needle}:\n{text}");
    }
}
