//! The migration journal: what the engine is about to do, written to the state folder before
//! each phase starts, so that a `control` killed mid-migration can be recovered from by the
//! next one (`control recover`, also run by `migrate` and `status`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use migration_core::{MigrationId, Phase};
use serde::{Deserialize, Serialize};

use crate::secure;
use crate::state::Side;

/// The journal's name in the state folder.
pub(crate) const FILE: &str = "journal.json";

/// A migration in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Journal {
    /// The migration.
    pub(crate) migration_id: MigrationId,
    /// The phase about to start (`rolling_back` once a recovery runs).
    pub(crate) phase: Phase,
    /// Where the server was.
    pub(crate) from: Side,
    /// Where it goes.
    pub(crate) to: Side,
    /// The server's PID (the same after a restore).
    pub(crate) server_pid: i32,
    /// This migration's image folder.
    pub(crate) images: PathBuf,
    /// Keep the image set afterwards.
    pub(crate) keep_images: bool,
}

impl Journal {
    /// Where the final dump is written.
    pub(crate) fn dump_dir(&self) -> PathBuf {
        self.images.join("final")
    }
}

/// Writes the journal (atomically, 0600).
pub(crate) fn write(state_dir: &Path, journal: &Journal) -> Result<()> {
    let text = serde_json::to_vec_pretty(journal).context("encoding the journal")?;
    secure::write_private(&state_dir.join(FILE), &text)
}

/// The journal of an interrupted migration, if there is one.
pub(crate) fn load(state_dir: &Path) -> Result<Option<Journal>> {
    let path = state_dir.join(FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    serde_json::from_str(&text).map(Some).with_context(|| {
        format!(
            "{} is damaged; the deployment cannot be recovered automatically \
             (`control down`, then `control up`)",
            path.display()
        )
    })
}

/// Removes the journal: the migration is over.
pub(crate) fn remove(state_dir: &Path) -> Result<()> {
    let path = state_dir.join(FILE);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_loaded_removed_and_damage_is_a_clear_error() {
        let t = tempfile::tempdir().unwrap();
        assert_eq!(load(t.path()).unwrap(), None);
        let j = Journal {
            migration_id: MigrationId::from_bytes([1; 16]),
            phase: Phase::Dumping,
            from: Side::A,
            to: Side::B,
            server_pid: 42,
            images: t.path().join("img"),
            keep_images: false,
        };
        write(t.path(), &j).unwrap();
        assert_eq!(load(t.path()).unwrap(), Some(j.clone()));
        assert!(j.dump_dir().ends_with("img/final"));
        remove(t.path()).unwrap();
        assert_eq!(load(t.path()).unwrap(), None);
        remove(t.path()).unwrap();
        for bad in ["{", "{\"phase\":\"dumping\"}", "\u{0}"] {
            std::fs::write(t.path().join(FILE), bad).unwrap();
            let err = format!("{:#}", load(t.path()).unwrap_err());
            assert!(err.contains("damaged"), "{err}");
        }
    }
}
