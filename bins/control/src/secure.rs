//! Folders and files on a shared host: control's own, private, and never adopted from
//! someone else.
//!
//! control runs as root on machines other people use, and its folders hold process memory
//! (CRIU images, with the server's TLS keys in them) and keys. Every folder it uses is created
//! by it with mode 0700, or, when it exists, must be a real directory (not a symlink) owned by
//! control's user and not writable by group or others (it is then tightened to 0700). Every
//! file it writes is created exclusively with mode 0600, through no symlink.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{
    DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _,
};
use std::path::Path;

use anyhow::{Context, Result, bail};

/// Refuses `path` unless it is a directory (not a symlink) owned by this process's user and
/// not writable by group or others; tightens its mode to 0700.
pub(crate) fn check_private_dir(path: &Path) -> Result<()> {
    let meta =
        std::fs::symlink_metadata(path).with_context(|| format!("reading {}", path.display()))?;
    if meta.file_type().is_symlink() {
        bail!(
            "{} is a symlink; refusing to use it (control makes its own folders)",
            path.display()
        );
    }
    if !meta.is_dir() {
        bail!("{} exists and is not a directory", path.display());
    }
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me {
        bail!(
            "{} belongs to uid {}, not to this user (uid {me}); refusing to use it \
             (choose another folder, or remove it)",
            path.display(),
            meta.uid()
        );
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        bail!(
            "{} is writable by group or others (mode {mode:04o}); refusing to use it",
            path.display()
        );
    }
    if mode & 0o077 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("making {} private", path.display()))?;
    }
    Ok(())
}

/// Creates `path` (and any missing parent) with mode 0700, or checks an existing one with
/// [`check_private_dir`].
pub(crate) fn private_dir(path: &Path) -> Result<()> {
    match std::fs::DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => check_private_dir(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .mode(0o700)
                .recursive(true)
                .create(path)
                .with_context(|| format!("creating {}", path.display()))?;
            check_private_dir(path)
        }
        Err(e) => Err(e).with_context(|| format!("creating {}", path.display())),
    }
}

/// Creates a new file, mode 0600, exclusively: an existing file or symlink at `path` is an
/// error, never written through.
pub(crate) fn create_private(path: &Path) -> Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))
}

/// Writes `bytes` to `path` atomically: a temporary file created exclusively with mode 0600
/// (a leftover one is removed first), renamed over `path`.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?;
    let tmp = path.with_file_name(format!(".{}.tmp", name.to_string_lossy()));
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", tmp.display())),
    }
    let mut f = create_private(&tmp)?;
    f.write_all(bytes)
        .with_context(|| format!("writing {}", tmp.display()))?;
    drop(f);
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// Opens a log for appending: created with mode 0600, or an existing regular file of this
/// user (never through a symlink).
pub(crate) fn open_log(path: &Path) -> Result<File> {
    let f = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let meta = f.metadata()?;
    if !meta.is_file() || meta.uid() != nix::unistd::geteuid().as_raw() {
        bail!("{} is not a regular file of this user", path.display());
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn folders_are_created_private_and_tightened() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("a/b/state");
        private_dir(&d).unwrap();
        assert_eq!(mode(&d), 0o700);
        // Ours but readable by others: tightened.
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&d).unwrap();
        assert_eq!(mode(&d), 0o700);
    }

    #[test]
    fn a_symlink_a_file_or_a_writable_folder_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let real = t.path().join("real");
        std::fs::create_dir(&real).unwrap();
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let err = format!("{:#}", private_dir(&link).unwrap_err());
        assert!(err.contains("symlink"), "{err}");
        let file = t.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        let err = format!("{:#}", private_dir(&file).unwrap_err());
        assert!(err.contains("not a directory"), "{err}");
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = format!("{:#}", private_dir(&real).unwrap_err());
        assert!(err.contains("writable by group or others"), "{err}");
        // Refused means untouched.
        assert_eq!(mode(&real), 0o777);
    }

    #[test]
    fn another_users_folder_is_refused() {
        if !test_support::require("needs root (chown)", nix::unistd::geteuid().is_root()) {
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let theirs = t.path().join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
        let err = format!("{:#}", private_dir(&theirs).unwrap_err());
        assert!(err.contains("belongs to uid 65534"), "{err}");
    }

    #[test]
    fn files_are_created_exclusively_and_never_through_a_symlink() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("state.json");
        write_private(&p, b"one").unwrap();
        assert_eq!(mode(&p), 0o600);
        write_private(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        // An existing path is not adopted by create_private.
        assert!(create_private(&p).is_err());
        // A symlink planted where a file will go is not followed.
        let target = t.path().join("elsewhere");
        std::fs::write(&target, b"keep").unwrap();
        let planted = t.path().join("client.out");
        std::os::unix::fs::symlink(&target, &planted).unwrap();
        assert!(create_private(&planted).is_err());
        assert!(open_log(&planted).is_err());
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
        let log = t.path().join("server.log");
        drop(open_log(&log).unwrap());
        assert_eq!(mode(&log), 0o600);
        drop(open_log(&log).unwrap());
    }
}
