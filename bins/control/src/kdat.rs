//! criu's kernel feature cache (`criu.kdat`): a private folder on a tmpfs per uid that runs
//! criu, so that criu probes the kernel once (~28 ms) instead of on every call.
//!
//! ```text
//!  criu --unprivileged, env XDG_RUNTIME_DIR=/dev/shm/qlm-criu-kdat-<uid>/
//!    reads  <dir>/criu.kdat            (probes the kernel and writes it when missing)
//!    writes <dir>/criu.kdat.tmp, O_EXCL, then renames it: kept only on a tmpfs
//! ```
//!
//! Without `--unprivileged` criu keeps the cache at `/run/criu.kdat`, which it keeps only when
//! `/run` is a tmpfs (it is not on these hosts); with it, criu uses `$XDG_RUNTIME_DIR`. So every
//! criu call control makes runs with `--unprivileged` and `XDG_RUNTIME_DIR` pointing here: the
//! dump as the server's account, the restore as root. As root with every capability,
//! `--unprivileged` changes what criu does in three ways that matter here: it skips cgroups
//! (dump and restore), the `iptables -L` probe, and the time namespace at restore, so the
//! restored server's monotonic clock shows the freeze (its timers run through it) instead of
//! hiding it.
//!
//! The cache is not secret, but a planted one could mislead criu: the folder must be a real
//! directory (no symlink), owned by the account criu runs as, with no access for group or
//! others, on a tmpfs. One that is not is refused (criu then runs without the cache, and says
//! why in a warning). criu never deletes its `.tmp` when the rename did not happen; a stale one
//! (older than [`STALE_TMP`]) in our folder is removed, since it would block every later write.

use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::{info, warn};

/// Where the cache folders go: a tmpfs on every host this runs on.
pub(crate) const BASE: &str = "/dev/shm";
/// The cache file's name, criu's `KERNDAT_CACHE_NAME`.
pub(crate) const FILE: &str = "criu.kdat";
/// A `.tmp` older than this was left by a criu that died between writing and renaming it.
pub(crate) const STALE_TMP: Duration = Duration::from_secs(10);

/// Why a cache folder cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum KdatError {
    /// A file system call failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was done.
        what: &'static str,
        /// On what.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The path is a symlink or not a directory.
    #[error("{path} is not a directory (a symlink or a file): refused")]
    NotADirectory {
        /// The path.
        path: PathBuf,
    },
    /// The folder belongs to another account.
    #[error("{path} belongs to uid {owner}, not to uid {expected} that runs criu: refused")]
    NotOurs {
        /// The path.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// Who should own it.
        expected: u32,
    },
    /// Group or others may use the folder.
    #[error("{path} has mode {mode:o}: group or others may use it: refused")]
    NotPrivate {
        /// The path.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// criu would not keep its cache there.
    #[error("{path} is not on a tmpfs (criu keeps its cache only on one)")]
    NotTmpfs {
        /// The path.
        path: PathBuf,
    },
}

/// The cache folder for criu run as `uid` under `base` (its name: `qlm-criu-kdat-<uid>`).
pub(crate) fn dir_for(base: &Path, uid: u32) -> PathBuf {
    base.join(format!("qlm-criu-kdat-{uid}"))
}

/// Makes (when missing) and checks the cache folder of `uid` under `base`, removes a stale
/// `criu.kdat.tmp` from it, and returns it.
pub(crate) fn prepare(base: &Path, uid: u32, gid: u32) -> Result<PathBuf, KdatError> {
    let dir = dir_for(base, uid);
    let io = |what, source| KdatError::Io {
        what,
        path: dir.clone(),
        source,
    };
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {
            // Made by us (root): handed to the account that runs criu before anything is
            // put in it.
            if nix::unistd::geteuid().as_raw() != uid {
                nix::unistd::chown(
                    &dir,
                    Some(nix::unistd::Uid::from_raw(uid)),
                    Some(nix::unistd::Gid::from_raw(gid)),
                )
                .map_err(|e| io("handing over", e.into()))?;
            }
            info!(dir = %dir.display(), uid, "made criu's kdat cache folder");
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io("creating", e)),
    }
    check(&dir, uid)?;
    remove_stale_tmp(&dir, STALE_TMP)?;
    Ok(dir)
}

/// Refuses a folder that is not a private directory of `uid` on a tmpfs.
pub(crate) fn check(dir: &Path, uid: u32) -> Result<(), KdatError> {
    let m = std::fs::symlink_metadata(dir).map_err(|source| KdatError::Io {
        what: "reading",
        path: dir.to_path_buf(),
        source,
    })?;
    if !m.file_type().is_dir() {
        return Err(KdatError::NotADirectory {
            path: dir.to_path_buf(),
        });
    }
    if m.uid() != uid {
        return Err(KdatError::NotOurs {
            path: dir.to_path_buf(),
            owner: m.uid(),
            expected: uid,
        });
    }
    let mode = m.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KdatError::NotPrivate {
            path: dir.to_path_buf(),
            mode,
        });
    }
    let fs = nix::sys::statfs::statfs(dir).map_err(|e| KdatError::Io {
        what: "statfs of",
        path: dir.to_path_buf(),
        source: e.into(),
    })?;
    if fs.filesystem_type() != nix::sys::statfs::TMPFS_MAGIC {
        return Err(KdatError::NotTmpfs {
            path: dir.to_path_buf(),
        });
    }
    Ok(())
}

/// Removes `criu.kdat.tmp` from our folder when it is older than `age` (criu writes and
/// renames it within a millisecond; an older one was left by a criu that died, and blocks
/// every later write, since criu creates it with O_EXCL). Returns whether one was removed.
pub(crate) fn remove_stale_tmp(dir: &Path, age: Duration) -> Result<bool, KdatError> {
    use nix::fcntl::{AtFlags, OFlag};
    use nix::sys::stat::Mode;
    let tmp = dir.join(format!("{FILE}.tmp"));
    let name = format!("{FILE}.tmp");
    let io = |what: &'static str| {
        let tmp = tmp.clone();
        move |e: nix::errno::Errno| KdatError::Io {
            what,
            path: tmp,
            source: e.into(),
        }
    };
    // Through the folder's descriptor, opened without following a symbolic link: the folder
    // may belong to the server's account, which could swap it for a link between the checks
    // and the removal; relative to the descriptor, only an entry of that very folder goes.
    let fd = nix::fcntl::open(
        dir,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(io("opening"))?;
    let Ok(st) = nix::sys::stat::fstatat(&fd, name.as_str(), AtFlags::AT_SYMLINK_NOFOLLOW) else {
        return Ok(false);
    };
    let modified = UNIX_EPOCH + Duration::from_secs(u64::try_from(st.st_mtime).unwrap_or(0));
    let old = SystemTime::now()
        .duration_since(modified)
        .is_ok_and(|d| d >= age);
    if !old {
        return Ok(false);
    }
    nix::unistd::unlinkat(&fd, name.as_str(), nix::unistd::UnlinkatFlags::NoRemoveDir)
        .map_err(io("removing"))?;
    warn!(
        file = %tmp.display(),
        "removed a stale criu kdat .tmp (left by a criu that died; it blocked the cache)"
    );
    Ok(true)
}

/// The cache folder for criu run as `uid`/`gid`, or `None` (with a warning naming why) when
/// there is none to use: criu then probes the kernel on every call.
pub(crate) fn for_account(uid: u32, gid: u32) -> Option<PathBuf> {
    match prepare(Path::new(BASE), uid, gid) {
        Ok(d) => Some(d),
        Err(e) => {
            warn!("criu runs without its kdat cache (slower start-up): {e}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shm_base() -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix("qlmh-criu-kdat-test-")
            .tempdir_in(BASE)
            .expect("a folder on /dev/shm")
    }

    fn me() -> u32 {
        nix::unistd::geteuid().as_raw()
    }

    #[test]
    fn a_folder_is_made_private_and_accepted_again() {
        let base = shm_base();
        let uid = me();
        let gid = nix::unistd::getegid().as_raw();
        let dir = prepare(base.path(), uid, gid).unwrap();
        assert_eq!(dir, dir_for(base.path(), uid));
        let m = std::fs::metadata(&dir).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o700);
        assert_eq!(m.uid(), uid);
        // Made once, accepted the next time.
        assert_eq!(prepare(base.path(), uid, gid).unwrap(), dir);
    }

    #[test]
    fn a_folder_open_to_others_a_symlink_or_another_owner_is_refused() {
        let base = shm_base();
        let uid = me();
        let dir = dir_for(base.path(), uid);
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = prepare(base.path(), uid, 0).unwrap_err();
        assert!(
            matches!(e, KdatError::NotPrivate { mode: 0o755, .. }),
            "{e}"
        );
        std::fs::remove_dir(&dir).unwrap();
        // A symlink to a private folder is still refused.
        let real = base.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::symlink(&real, &dir).unwrap();
        let e = prepare(base.path(), uid, 0).unwrap_err();
        assert!(matches!(e, KdatError::NotADirectory { .. }), "{e}");
        // A folder of another account.
        let e = check(&real, uid + 1).unwrap_err();
        assert!(matches!(e, KdatError::NotOurs { .. }), "{e}");
        assert!(e.to_string().contains("refused"), "{e}");
    }

    #[test]
    fn a_folder_off_tmpfs_is_refused() {
        let d = tempfile::Builder::new()
            .prefix("qlmh-criu-kdat-test-")
            .tempdir_in(env!("CARGO_MANIFEST_DIR"))
            .unwrap();
        // The work tree is not on a tmpfs here; where it is, the test says so (and fails in
        // CI, where it must run).
        let on_tmpfs = nix::sys::statfs::statfs(d.path())
            .map(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
            .unwrap_or(true);
        if test_support::require("a work tree that is not on a tmpfs", !on_tmpfs) {
            let e = prepare(d.path(), me(), 0).unwrap_err();
            assert!(matches!(e, KdatError::NotTmpfs { .. }), "{e}");
        }
    }

    #[test]
    fn a_stale_tmp_is_removed_and_a_fresh_one_kept() {
        let base = shm_base();
        let tmp = base.path().join("criu.kdat.tmp");
        std::fs::write(&tmp, b"").unwrap();
        // Fresh: a criu may be writing it.
        assert!(!remove_stale_tmp(base.path(), Duration::from_secs(60)).unwrap());
        assert!(tmp.exists());
        // Old enough: removed.
        assert!(remove_stale_tmp(base.path(), Duration::ZERO).unwrap());
        assert!(!tmp.exists());
        assert!(!remove_stale_tmp(base.path(), Duration::ZERO).unwrap());
    }
}
