//! Tests that need the real world (root, network namespaces, podman, CRIU): skipped with a
//! message on a developer's machine, a failure in CI.
//!
//! ```text
//!   require(what, available)
//!     available ──────────────────────────────▶ true   (run the test)
//!     missing, CI unset ──"SKIP <test>: <what>"─▶ false  (the test returns early)
//!     missing, CI=true ───────────────────────▶ panic  (CI must not pass a test it did not run)
//! ```
//!
//! Every such gate goes through [`require`], so that `CI=true cargo test` (what `cargo xtask
//! ci` runs in CI, after installing podman and CRIU) cannot go green on tests that never ran.

/// What to do about a test whose requirement holds or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Gate {
    /// The requirement holds: run the test.
    Run,
    /// It does not, outside CI: skip the test, saying so.
    Skip,
    /// It does not, in CI: fail the test.
    Fail,
}

/// The decision, as a pure function of whether this is CI and whether the requirement holds.
pub fn gate(ci: bool, available: bool) -> Gate {
    match (available, ci) {
        (true, _) => Gate::Run,
        (false, false) => Gate::Skip,
        (false, true) => Gate::Fail,
    }
}

/// Whether the environment says this is CI: `CI` is `true` or `1` (as `cargo xtask ci` reads
/// it).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| ci_value(&v))
}

fn ci_value(v: &str) -> bool {
    v == "true" || v == "1"
}

/// `true` when the test may go on. When `available` is false: prints `SKIP <test>: <what>` and
/// returns `false` (the test returns early), or, in CI, panics with the same text.
///
/// `what` says what is missing and how to get it, e.g. "needs root (ip netns, veth)". The test
/// is named from the current thread, which the test harness names after the test.
///
/// ```no_run
/// if !test_support::require("needs root (ip netns, veth)", test_support::is_root()) {
///     return;
/// }
/// ```
#[track_caller]
pub fn require(what: &str, available: bool) -> bool {
    require_in(in_ci(), what, available)
}

/// [`require`] with CI given rather than read from the environment.
#[track_caller]
fn require_in(ci: bool, what: &str, available: bool) -> bool {
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("this test");
    match gate(ci, available) {
        Gate::Run => true,
        Gate::Skip => {
            eprintln!("SKIP {test}: {what}");
            false
        }
        Gate::Fail => panic!(
            "{test}: {what}; CI=true, so this is a failure, not a skip (`cargo xtask setup` \
             installs podman and CRIU; the tests that need root must run as root)"
        ),
    }
}

/// [`require`] for a fallible set-up step (e.g. creating a network namespace): `Some(value)`
/// on success; on error prints `SKIP` (or panics in CI) with `what` and the error.
#[track_caller]
pub fn require_ok<T, E: std::fmt::Display>(what: &str, res: Result<T, E>) -> Option<T> {
    match res {
        Ok(v) => Some(v),
        Err(e) => {
            require(&format!("{what}: {e}"), false);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gate_skips_outside_ci_and_fails_in_ci() {
        assert_eq!(gate(false, true), Gate::Run);
        assert_eq!(gate(true, true), Gate::Run);
        assert_eq!(gate(false, false), Gate::Skip);
        assert_eq!(gate(true, false), Gate::Fail);
    }

    #[test]
    fn ci_is_true_or_1() {
        assert!(ci_value("true"));
        assert!(ci_value("1"));
        assert!(!ci_value("false"));
        assert!(!ci_value(""));
        assert!(!ci_value("TRUE "));
    }

    #[test]
    fn an_available_requirement_runs_whatever_ci_says() {
        assert!(require("nothing missing", true));
        assert_eq!(require_ok("set-up", Ok::<_, String>(7)), Some(7));
    }

    #[test]
    fn a_missing_requirement_skips_outside_ci() {
        assert!(!require_in(false, "a missing thing", false));
        assert!(require_in(false, "nothing missing", true));
    }

    #[test]
    fn a_missing_requirement_fails_in_ci() {
        assert!(require_in(true, "nothing missing", true));
        let res = std::panic::catch_unwind(|| require_in(true, "a missing thing", false));
        let payload = res.unwrap_err();
        let msg = payload
            .downcast_ref::<String>()
            .cloned()
            .unwrap_or_default();
        assert!(msg.contains("a missing thing"), "{msg}");
        assert!(msg.contains("CI=true"), "{msg}");
        assert!(msg.contains("a_missing_requirement_fails_in_ci"), "{msg}");
    }

    #[test]
    fn require_ok_passes_the_value_or_skips() {
        if in_ci() {
            return; // the Err branch would panic; covered by the two tests above
        }
        assert_eq!(require_ok("set-up", Err::<(), _>("no veth")), None);
    }
}
