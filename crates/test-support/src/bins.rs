//! The workspace's binaries for tests outside their own package.
//!
//! `env!("CARGO_BIN_EXE_<name>")` exists only in the tests of the package that owns the binary.
//! A test elsewhere (the `integration-tests` package, or `control`'s tests, which need
//! `swrapper` next to `control`) calls [`workspace_bin`]: it finds the target directory and
//! profile from the test executable's own path (`<target>/<profile>/deps/<test>-<hash>`), has
//! cargo bring `<target>/<profile>/<name>` up to date once per process (`cargo build -p
//! <package> --bin <name>`, a no-op when it is fresh, so a test never runs a stale binary),
//! and returns its path.
//!
//! ```text
//!   current_exe: target/debug/deps/signals-1a2b ──▶ target dir "target", profile "debug"
//!   cargo build --quiet -p swrapper --bin swrapper (CARGO_TARGET_DIR=target) ──▶ target/debug/swrapper
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, PoisonError};

/// Why a workspace binary cannot be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BinError {
    /// The test executable's path does not say where the target directory is.
    #[error("cannot tell the target directory from the test executable {exe}: {why}")]
    NoTargetDir {
        /// The test executable.
        exe: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// cargo could not be started, and the binary is not there either.
    #[error("`{command}` could not start ({why}) and {path} does not exist; build it first")]
    NoCargo {
        /// The build command.
        command: String,
        /// The error of starting it.
        why: String,
        /// Where the binary was looked for.
        path: PathBuf,
    },
    /// cargo failed to build the binary.
    #[error("`{command}` failed: {stderr}")]
    BuildFailed {
        /// The build command.
        command: String,
        /// What cargo printed on standard error.
        stderr: String,
    },
    /// cargo succeeded, yet the binary is not where it should be.
    #[error("`{command}` succeeded but {path} does not exist (a --target build?)")]
    Missing {
        /// The build command.
        command: String,
        /// Where the binary was expected.
        path: PathBuf,
    },
}

/// Where cargo puts the binaries of this test's build: the target directory and the profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildDir {
    /// The target directory (`CARGO_TARGET_DIR`, by default `<workspace>/target`).
    pub target_dir: PathBuf,
    /// The profile's directory name: `debug`, `release` or a custom profile's name.
    pub profile: String,
}

impl BuildDir {
    /// From a test executable's path: `<target>/<profile>/deps/<test>-<hash>`.
    pub fn from_test_exe(exe: &Path) -> Result<Self, BinError> {
        let err = |why: &str| BinError::NoTargetDir {
            exe: exe.to_path_buf(),
            why: why.to_owned(),
        };
        let mut dir = exe.parent().ok_or_else(|| err("no parent directory"))?;
        if dir.file_name().is_some_and(|n| n == "deps") {
            dir = dir.parent().ok_or_else(|| err("deps/ has no parent"))?;
        }
        let profile = dir
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| err("no profile directory"))?
            .to_owned();
        let target_dir = dir
            .parent()
            .ok_or_else(|| err("the profile directory has no parent"))?
            .to_path_buf();
        Ok(Self {
            target_dir,
            profile,
        })
    }

    /// The path of binary `name` in this build.
    pub fn bin(&self, name: &str) -> PathBuf {
        self.target_dir
            .join(&self.profile)
            .join(format!("{name}{}", std::env::consts::EXE_SUFFIX))
    }

    /// The cargo arguments that build binary `name` of `package` with this profile.
    pub fn build_args(&self, package: &str, name: &str) -> Vec<String> {
        let mut args: Vec<String> = ["build", "--quiet", "-p", package, "--bin", name]
            .map(String::from)
            .to_vec();
        match self.profile.as_str() {
            "debug" => {}
            "release" => args.push("--release".to_owned()),
            other => args.extend(["--profile".to_owned(), other.to_owned()]),
        }
        args
    }
}

/// Paths already built by this process, by `package/name` (an error is kept too: one try).
static BUILT: Mutex<Option<HashMap<String, Result<PathBuf, BinError>>>> = Mutex::new(None);

/// The path of binary `name` of workspace package `package`, up to date.
///
/// The first call for a binary runs `cargo build -p <package> --bin <name>` (same target
/// directory and profile as the running test); later calls return the same answer. If cargo
/// cannot be started at all (a test executable run by hand without cargo on `PATH`), an
/// existing binary is used as it is, with a warning.
pub fn workspace_bin(package: &str, name: &str) -> Result<PathBuf, BinError> {
    let mut built = BUILT.lock().unwrap_or_else(PoisonError::into_inner);
    let key = format!("{package}/{name}");
    if let Some(res) = built.get_or_insert_with(HashMap::new).get(&key) {
        return res.clone();
    }
    let res = build(package, name);
    built
        .get_or_insert_with(HashMap::new)
        .insert(key, res.clone());
    res
}

fn build(package: &str, name: &str) -> Result<PathBuf, BinError> {
    let exe = std::env::current_exe().map_err(|e| BinError::NoTargetDir {
        exe: PathBuf::new(),
        why: e.to_string(),
    })?;
    let dir = BuildDir::from_test_exe(&exe)?;
    let path = dir.bin(name);
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let args = dir.build_args(package, name);
    let command = format!("{cargo} {}", args.join(" "));
    // This crate's manifest sits two levels below the workspace root (crates/test-support).
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .unwrap_or(Path::new("."));
    let out = Command::new(&cargo)
        .args(&args)
        .env("CARGO_TARGET_DIR", &dir.target_dir)
        .current_dir(workspace)
        .output();
    match out {
        Err(e) if path.is_file() => {
            eprintln!(
                "test-support: `{command}` could not start ({e}); using {} as it is",
                path.display()
            );
            Ok(path)
        }
        Err(e) => Err(BinError::NoCargo {
            command,
            why: e.to_string(),
            path,
        }),
        Ok(out) if !out.status.success() => Err(BinError::BuildFailed {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }),
        Ok(_) if !path.is_file() => Err(BinError::Missing { command, path }),
        Ok(_) => Ok(path),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_build_dir_comes_from_the_test_executable() {
        let d =
            BuildDir::from_test_exe(Path::new("/w/target/debug/deps/signals-0123abcd")).unwrap();
        assert_eq!(
            d,
            BuildDir {
                target_dir: PathBuf::from("/w/target"),
                profile: "debug".to_owned()
            }
        );
        assert_eq!(d.bin("swrapper"), PathBuf::from("/w/target/debug/swrapper"));
        assert_eq!(
            d.build_args("swrapper", "swrapper"),
            ["build", "--quiet", "-p", "swrapper", "--bin", "swrapper"]
        );
        let r = BuildDir::from_test_exe(Path::new("/t/release/deps/x-1")).unwrap();
        assert_eq!(r.build_args("p", "b").last().unwrap(), "--release");
        let c = BuildDir::from_test_exe(Path::new("/t/fast/deps/x-1")).unwrap();
        assert!(
            c.build_args("p", "b")
                .ends_with(&["--profile".into(), "fast".into()])
        );
        assert!(BuildDir::from_test_exe(Path::new("x")).is_err());
    }

    #[test]
    fn this_crates_own_test_executable_gives_a_target_dir() {
        let exe = std::env::current_exe().unwrap();
        let d = BuildDir::from_test_exe(&exe).unwrap();
        assert!(d.target_dir.join(&d.profile).is_dir(), "{d:?}");
    }
}
