//! Snapshot test of the transition table's DOT rendering.
//!
//! The expected output is `tests/snapshots/transitions.dot`. After an intended change to the
//! table, regenerate it with:
//!
//! ```sh
//! UPDATE_SNAPSHOTS=1 cargo test -p migration-core --test snapshot
//! ```

use std::path::PathBuf;

fn snapshot_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/snapshots/transitions.dot")
}

#[test]
fn transition_table_dot_matches_snapshot() {
    let actual = migration_core::transition_table_dot();
    let path = snapshot_path();
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some_and(|v| v == "1") {
        std::fs::write(&path, &actual).unwrap();
        eprintln!("UPDATE_SNAPSHOTS=1: rewrote {}", path.display());
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read {}: {e}; run with UPDATE_SNAPSHOTS=1 to create it",
            path.display()
        )
    });
    assert_eq!(
        expected,
        actual,
        "transition table DOT differs from {}; if the change is intended, rerun with \
         UPDATE_SNAPSHOTS=1 and review the diff",
        path.display()
    );
}
