//! One `control` at a time per state folder.
//!
//! An exclusive `flock` on `<state dir>/control.lock`, held for the whole command and released
//! when the process ends however it ends (the kernel drops the lock with the last descriptor,
//! which no child inherits: std opens files close-on-exec). The holder writes what it is into
//! the file, so a second `control` says who holds the lock instead of interfering.

use std::fs::File;
use std::io::{Read as _, Seek as _, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

use anyhow::{Context, Result, bail};
use nix::fcntl::{Flock, FlockArg};

/// The lock file's name in the state folder.
pub(crate) const FILE: &str = "control.lock";

/// Held while this `control` works on a state folder.
#[derive(Debug)]
pub(crate) struct Lock {
    _flock: Flock<File>,
}

/// Takes the lock of `state_dir` for `what` (e.g. "control migrate"), or says who holds it.
pub(crate) fn acquire(state_dir: &Path, what: &str) -> Result<Lock> {
    let path = state_dir.join(FILE);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&path)
        .with_context(|| format!("opening the lock {}", path.display()))?;
    let mut flock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(l) => l,
        Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            bail!(
                "another control works on {} ({}); wait for it to finish",
                state_dir.display(),
                if holder.is_empty() {
                    "it is starting"
                } else {
                    holder
                }
            );
        }
        Err((_, e)) => return Err(e).with_context(|| format!("locking {}", path.display())),
    };
    let me = format!(
        "held by {what}, PID {}, since {}",
        std::process::id(),
        unix_time()
    );
    flock.set_len(0)?;
    flock.rewind()?;
    flock.write_all(me.as_bytes())?;
    Ok(Lock { _flock: flock })
}

fn unix_time() -> String {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or_else(|_| "?".to_owned(), |d| format!("unix time {}", d.as_secs()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_and_told_who_holds_it() {
        let t = tempfile::tempdir().unwrap();
        let first = acquire(t.path(), "control migrate").unwrap();
        // flock locks belong to the open file description: a second open in this same
        // process conflicts exactly as another process would.
        let err = format!("{:#}", acquire(t.path(), "control status").unwrap_err());
        assert!(err.contains("another control works on"), "{err}");
        assert!(err.contains("held by control migrate"), "{err}");
        assert!(
            err.contains(&format!("PID {}", std::process::id())),
            "{err}"
        );
        drop(first);
        let again = acquire(t.path(), "control status").unwrap();
        drop(again);
    }

    #[test]
    fn a_symlinked_lock_file_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let target = t.path().join("elsewhere");
        std::fs::write(&target, b"keep").unwrap();
        std::os::unix::fs::symlink(&target, t.path().join(FILE)).unwrap();
        assert!(acquire(t.path(), "control up").is_err());
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
    }
}
