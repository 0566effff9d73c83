//! Dropping root for an unprivileged user, for good (`--user`).
//!
//! ```text
//!  root: identity + admin dir open ──► admin dir: parent root's 0700? ──► fchown(user), 0700
//!       ──► setgroups([]) ──► setgid(gid) ──► setuid(uid) ──► no_new_privs ──► checked
//! ```
//!
//! Runs before any thread exists: `setuid` and `no_new_privs` then hold for every thread the
//! process will have.

use std::os::unix::fs::MetadataExt as _;

use admin_api::AdminDir;
use anyhow::{Context, Result, bail};
use nix::sys::stat::{Mode, fchmod};
use nix::unistd::{Gid, Uid, User};
use tracing::info;

/// Becomes `name` (uid, primary gid, no supplementary group, no_new_privs), after handing the
/// admin directory to it. Every step is checked; any failure is an error (the caller exits).
pub(crate) fn drop_to(name: &str, admin: Option<&AdminDir>) -> Result<()> {
    let user = User::from_name(name)
        .with_context(|| format!("--user {name}: looking the user up"))?
        .with_context(|| format!("--user {name}: no such user"))?;
    if user.uid.is_root() {
        bail!("--user {name} is root (uid 0): nothing would be dropped");
    }
    if let Some(admin) = admin {
        hand_over(admin, user.uid, user.gid)?;
    }
    nix::unistd::setgroups(&[]).context("--user: setgroups([])")?;
    nix::unistd::setgid(user.gid).with_context(|| format!("--user: setgid({})", user.gid))?;
    nix::unistd::setuid(user.uid).with_context(|| format!("--user: setuid({})", user.uid))?;
    nix::sys::prctl::set_no_new_privs().context("--user: prctl(PR_SET_NO_NEW_PRIVS)")?;
    // Trust, but verify: every id is the user's, and root cannot be had back.
    let ids = (
        nix::unistd::getuid(),
        nix::unistd::geteuid(),
        nix::unistd::getgid(),
        nix::unistd::getegid(),
    );
    if ids != (user.uid, user.uid, user.gid, user.gid)
        || nix::unistd::setuid(Uid::from_raw(0)).is_ok()
        || !nix::sys::prctl::get_no_new_privs().unwrap_or(false)
    {
        bail!("--user {name}: privileges were not dropped as asked ({ids:?})");
    }
    info!(user = name, uid = %user.uid, gid = %user.gid, "dropped privileges (no_new_privs)");
    Ok(())
}

/// Gives the admin directory to the server's user, mode 0700, after checking that its parent
/// keeps everybody else out (root's, mode 0700): once the server is that user, nobody but
/// root and the server reaches the directory.
fn hand_over(admin: &AdminDir, uid: Uid, gid: Gid) -> Result<()> {
    let dir = admin.path();
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let meta = std::fs::metadata(parent)
        .with_context(|| format!("--user: the admin directory's parent {}", parent.display()))?;
    let mode = meta.mode() & 0o7777;
    if meta.uid() != 0 || mode & 0o077 != 0 {
        bail!(
            "--user: the admin directory's parent {} must be owned by root with mode 0700 (it \
             is owned by uid {}, mode {mode:04o}): the admin directory is given to the server's \
             user, and its parent is what keeps other users out",
            parent.display(),
            meta.uid()
        );
    }
    nix::unistd::fchown(admin.dir_fd(), Some(uid), Some(gid))
        .with_context(|| format!("--user: chown {} to {uid}:{gid}", dir.display()))?;
    fchmod(admin.dir_fd(), Mode::from_bits_truncate(0o700))
        .with_context(|| format!("--user: chmod 700 {}", dir.display()))?;
    Ok(())
}
