//! The images directory: where CRIU image sets are written, one directory per migration.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// Marks an images directory as control's own.
pub(crate) const MARKER: &str = ".quic-live-migrate-images";

/// Prefix of image sets kept for inspection.
pub(crate) const KEPT_PREFIX: &str = "kept-";

/// Refuses an images directory that holds anything but control's marker: files of someone
/// else (foreign), or image sets left by an earlier run (stale).
pub(crate) fn check_dir(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let entries: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let ours = entries.iter().any(|e| e == MARKER);
    // Image sets kept on purpose (a failed or rolled-back migration, --keep-images) are
    // renamed `kept-<id>`; anything else is a leftover of a migration that never finished.
    let others: Vec<&String> = entries
        .iter()
        .filter(|e| *e != MARKER && !(ours && e.starts_with(KEPT_PREFIX)))
        .collect();
    if others.is_empty() {
        return Ok(());
    }
    let listing = others
        .iter()
        .take(5)
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    if ours {
        bail!(
            "images directory {} holds stale image sets from an earlier run ({listing}); \
             `control down` removes them",
            dir.display()
        )
    }
    bail!(
        "images directory {} holds files control did not make ({listing}); refusing to use it \
         (choose another --images-dir)",
        dir.display()
    )
}

/// Creates the images directory with control's marker.
pub(crate) fn create(dir: &Path) -> Result<()> {
    crate::secure::private_dir(dir)?;
    let marker = dir.join(MARKER);
    if !marker.exists() {
        crate::secure::create_private(&marker)?;
    }
    Ok(())
}

/// Disposes of a migration's image set: removed, or with `keep` renamed `kept-<id>` (still
/// 0700). Returns where it was kept.
pub(crate) fn dispose(images: &Path, keep: bool) -> Option<PathBuf> {
    if keep {
        return self::keep(images);
    }
    if let Err(e) = std::fs::remove_dir_all(images)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!("removing {}: {e}", images.display());
    }
    None
}

/// Keeps an image set for inspection under a name that later migrations accept.
pub(crate) fn keep(images: &Path) -> Option<PathBuf> {
    let name = images.file_name()?.to_string_lossy().into_owned();
    let kept = images.with_file_name(format!("{KEPT_PREFIX}{name}"));
    std::fs::rename(images, &kept).ok().map(|()| kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_directories_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join("images");
        // Missing or empty: fine.
        check_dir(&images).unwrap();
        std::fs::create_dir(&images).unwrap();
        check_dir(&images).unwrap();
        // Someone else's files: refused.
        std::fs::write(images.join("core-1.img"), b"x").unwrap();
        let err = format!("{:#}", check_dir(&images).unwrap_err());
        assert!(err.contains("did not make"), "{err}");
        // Ours, with a leftover image set: stale, refused.
        std::fs::remove_file(images.join("core-1.img")).unwrap();
        std::fs::write(images.join(MARKER), b"").unwrap();
        std::fs::create_dir(images.join("0123abcd")).unwrap();
        let err = format!("{:#}", check_dir(&images).unwrap_err());
        assert!(err.contains("stale"), "{err}");
        // Kept on purpose: accepted.
        let kept = keep(&images.join("0123abcd")).unwrap();
        assert!(kept.ends_with("kept-0123abcd"));
        check_dir(&images).unwrap();
    }

    #[test]
    fn an_image_set_is_removed_unless_kept() {
        let dir = tempfile::tempdir().unwrap();
        let set = dir.path().join("0123");
        std::fs::create_dir_all(set.join("final")).unwrap();
        assert_eq!(dispose(&set, false), None);
        assert!(!set.exists());
        std::fs::create_dir_all(set.join("final")).unwrap();
        let kept = dispose(&set, true).unwrap();
        assert!(kept.ends_with("kept-0123") && kept.join("final").is_dir());
        // Already gone: nothing to do, no error.
        assert_eq!(dispose(&set, false), None);
    }
}
