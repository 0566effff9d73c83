//! Sealing keys, key ids and key files.

use std::fmt;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// Label HMAC'd with the key to derive its [`KeyId`].
const KEY_ID_LABEL: &[u8] = b"migration-crypto key-id v1";

/// Generating key material failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CryptoError {
    /// `ring::rand::SystemRandom` could not produce random bytes.
    #[error("the system random number generator failed")]
    Random,
    /// `ring` could not compute the public key of a freshly generated key pair.
    #[error("computing the public key of a fresh key pair failed")]
    PublicKey,
}

/// A key given as bytes was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The key must have exactly `expected` bytes.
    #[error("key must be {expected} bytes, found {found}")]
    WrongLength {
        /// Required length in bytes.
        expected: usize,
        /// Length given.
        found: usize,
    },
    /// The key must have at least `min` bytes.
    #[error("key must be at least {min} bytes, found {found}")]
    TooShort {
        /// Minimum length in bytes.
        min: usize,
        /// Length given.
        found: usize,
    },
}

/// Reading or writing a key file failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyFileError {
    /// The key file does not exist.
    #[error("key file {} not found", path.display())]
    NotFound {
        /// The file asked for.
        path: PathBuf,
    },
    /// The path exists but is not a regular file (a directory, a socket, ...).
    #[error("key file {} is not a regular file", path.display())]
    NotAFile {
        /// The file asked for.
        path: PathBuf,
    },
    /// The path is a symbolic link: key files are never read or written through one.
    #[error("key file {} is a symlink; give the file itself", path.display())]
    Symlink {
        /// The file asked for.
        path: PathBuf,
    },
    /// The key file belongs to another user than the caller (its effective uid).
    #[error("key file {} is owned by uid {owner}, not by you (uid {caller})", path.display())]
    NotOwned {
        /// The file asked for.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// The caller's effective uid.
        caller: u32,
    },
    /// The key file grants some permission to its group or to others (mode `& 0o077` is not
    /// 0); fix with `chmod 600`.
    #[error("key file {} has mode {mode:04o}: {}; run chmod 600", path.display(), open_to(*mode))]
    TooOpen {
        /// The file asked for.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The key file does not hold exactly [`Key::LEN`] bytes.
    #[error("key file {} holds {found} bytes, expected {}", path.display(), Key::LEN)]
    WrongLength {
        /// The file asked for.
        path: PathBuf,
        /// Its length in bytes (from its metadata when longer than a key;
        /// at least `Key::LEN + 1` then).
        found: u64,
    },
    /// [`write_key_file`] refuses to replace an existing file.
    #[error("key file {} already exists; refusing to overwrite", path.display())]
    AlreadyExists {
        /// The file asked for.
        path: PathBuf,
    },
    /// Any other I/O error.
    #[error("key file {}: {source}", path.display())]
    Io {
        /// The file asked for.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// Identifies a [`Key`] without revealing it: the first 8 bytes of
/// `HMAC-SHA256(key, "migration-crypto key-id v1")`. Displays as hex.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct KeyId(pub [u8; 8]);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        crate::hex::write_hex(f, &self.0)
    }
}

/// Derives an 8-byte id for `key` under `label`.
pub(crate) fn derive_id(key: &[u8], label: &[u8]) -> [u8; 8] {
    let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), label);
    let mut id = [0u8; 8];
    // HMAC-SHA256 tags are 32 bytes, so the first 8 always exist.
    id.copy_from_slice(&tag.as_ref()[..8]);
    id
}

/// Fills `buf` from the system RNG.
pub(crate) fn fill_random(buf: &mut [u8]) -> Result<(), CryptoError> {
    SystemRandom::new()
        .fill(buf)
        .map_err(|_| CryptoError::Random)
}

/// A 32-byte AES-256-GCM sealing key. Zeroized on drop; `Debug` shows only
/// its [`KeyId`].
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct Key {
    bytes: [u8; Key::LEN],
    #[zeroize(skip)]
    id: KeyId,
}

impl Key {
    /// Length of a key in bytes.
    pub const LEN: usize = 32;

    /// Generates a new random key.
    pub fn generate() -> Result<Key, CryptoError> {
        let mut bytes = Zeroizing::new([0u8; Key::LEN]);
        fill_random(bytes.as_mut())?;
        Ok(Key::from_array(&bytes))
    }

    /// Builds a key from exactly [`Key::LEN`] bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Key, KeyError> {
        let array: &[u8; Key::LEN] = bytes.try_into().map_err(|_| KeyError::WrongLength {
            expected: Key::LEN,
            found: bytes.len(),
        })?;
        Ok(Key::from_array(array))
    }

    pub(crate) fn from_array(bytes: &[u8; Key::LEN]) -> Key {
        Key {
            bytes: *bytes,
            id: KeyId(derive_id(bytes, KEY_ID_LABEL)),
        }
    }

    /// The key's id, safe to log and to put in record headers.
    pub fn id(&self) -> KeyId {
        self.id
    }

    /// The raw key bytes (crate-internal: HKDF input and key files).
    pub(crate) fn as_bytes(&self) -> &[u8; Key::LEN] {
        &self.bytes
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Key")
            .field("id", &format_args!("{}", self.id))
            .finish()
    }
}

fn io_error(path: &Path, source: io::Error) -> KeyFileError {
    if source.kind() == io::ErrorKind::NotFound {
        KeyFileError::NotFound {
            path: path.to_path_buf(),
        }
    } else {
        KeyFileError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Says who, besides the owner, may read or write a file of mode `mode` ("readable by group",
/// "readable and writable by others", ...).
fn open_to(mode: u32) -> String {
    let part = |bits: u32, who: &str| -> Option<String> {
        let what = match (bits & 0o4 != 0, bits & 0o2 != 0) {
            (true, true) => "readable and writable",
            (true, false) => "readable",
            (false, true) => "writable",
            (false, false) if bits & 0o1 != 0 => "executable",
            (false, false) => return None,
        };
        Some(format!("{what} by {who}"))
    };
    [part((mode >> 3) & 0o7, "group"), part(mode & 0o7, "others")]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(", ")
}

fn not_followed(path: &Path, e: io::Error) -> KeyFileError {
    // O_NOFOLLOW on a symlink fails with ELOOP.
    if e.raw_os_error() == Some(libc::ELOOP) {
        KeyFileError::Symlink {
            path: path.to_path_buf(),
        }
    } else {
        io_error(path, e)
    }
}

/// Loads a key file holding exactly [`Key::LEN`] raw bytes.
///
/// Refuses, each with its own [`KeyFileError`]: a symbolic link (checked on the path, and
/// opened with `O_NOFOLLOW` so that a link swapped in meanwhile is refused too), anything but
/// a regular file, a file owned by another user than the caller's effective uid, and a file
/// with any group or other permission bit (mode `& 0o077`). The checks are made on the opened
/// file (`fstat`), so they and the read see the same file. Never reads more than
/// `Key::LEN + 1` bytes, so pointing it at a huge file is harmless.
pub fn load_key_file(path: &Path) -> Result<Key, KeyFileError> {
    use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
    let link = std::fs::symlink_metadata(path).map_err(|e| io_error(path, e))?;
    if link.file_type().is_symlink() {
        return Err(KeyFileError::Symlink {
            path: path.to_path_buf(),
        });
    }
    // O_NONBLOCK: a FIFO put in the key's place must not block the open.
    let file = File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| not_followed(path, e))?;
    let meta = file.metadata().map_err(|e| io_error(path, e))?;
    if !meta.is_file() {
        return Err(KeyFileError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let caller = unsafe { libc::geteuid() };
    if meta.uid() != caller {
        return Err(KeyFileError::NotOwned {
            path: path.to_path_buf(),
            owner: meta.uid(),
            caller,
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KeyFileError::TooOpen {
            path: path.to_path_buf(),
            mode,
        });
    }
    let mut buf = Zeroizing::new([0u8; Key::LEN + 1]);
    let mut filled = 0;
    let mut limited = file.take((Key::LEN + 1) as u64);
    loop {
        match limited.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => {
                filled += n;
                if filled == buf.len() {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_error(path, e)),
        }
    }
    if filled != Key::LEN {
        let found = if filled > Key::LEN {
            meta.len().max(filled as u64)
        } else {
            filled as u64
        };
        return Err(KeyFileError::WrongLength {
            path: path.to_path_buf(),
            found,
        });
    }
    let key = Key::from_bytes(&buf[..Key::LEN]).map_err(|_| KeyFileError::WrongLength {
        path: path.to_path_buf(),
        found: filled as u64,
    })?;
    Ok(key)
}

/// Writes `key` to a new file at `path` with mode 0600.
///
/// The file is created exclusively (`O_CREAT | O_EXCL | O_NOFOLLOW`): an existing path,
/// including a symbolic link (dangling or not), is refused ([`KeyFileError::AlreadyExists`],
/// [`KeyFileError::Symlink`]) and nothing is written through it. A partially written file is
/// removed on failure.
pub fn write_key_file(path: &Path, key: &Key) -> Result<(), KeyFileError> {
    write_secret_file(path, key.as_bytes())
}

/// Loads a token key file: the same file rules and length as [`load_key_file`] (exactly 32
/// raw bytes, the caller's, 0600, no link).
pub fn load_token_key_file(path: &Path) -> Result<crate::TokenKey, KeyFileError> {
    let key = load_key_file(path)?;
    crate::TokenKey::from_bytes(key.as_bytes()).map_err(|_| KeyFileError::WrongLength {
        path: path.to_path_buf(),
        found: Key::LEN as u64,
    })
}

/// Writes a token key as [`write_key_file`] writes a key. A token key longer than
/// [`Key::LEN`] is refused (the file format holds exactly 32 bytes).
pub fn write_token_key_file(path: &Path, key: &crate::TokenKey) -> Result<(), KeyFileError> {
    let bytes = key.secret_bytes();
    if bytes.len() != Key::LEN {
        return Err(KeyFileError::WrongLength {
            path: path.to_path_buf(),
            found: bytes.len() as u64,
        });
    }
    write_secret_file(path, bytes)
}

fn write_secret_file(path: &Path, secret: &[u8]) -> Result<(), KeyFileError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let is_link = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
    if is_link {
        return Err(KeyFileError::Symlink {
            path: path.to_path_buf(),
        });
    }
    let mut file = File::options()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                KeyFileError::AlreadyExists {
                    path: path.to_path_buf(),
                }
            } else {
                not_followed(path, e)
            }
        })?;
    let result = file.write_all(secret).and_then(|()| file.sync_all());
    if let Err(e) = result {
        drop(file);
        // Best effort: do not leave a truncated key behind.
        let _ = std::fs::remove_file(path);
        return Err(io_error(path, e));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn key_bytes() -> [u8; 32] {
        let mut b = [0u8; 32];
        for (i, x) in b.iter_mut().enumerate() {
            *x = 0xA0 ^ i as u8;
        }
        b
    }

    fn write_raw(dir: &Path, name: &str, data: &[u8], mode: u32) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, data).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn token_key_files_round_trip_and_refuse_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let key = crate::TokenKey::generate().unwrap();
        let path = dir.path().join("token.key");
        write_token_key_file(&path, &key).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(load_token_key_file(&path).unwrap().id(), key.id());
        assert!(matches!(
            write_token_key_file(&path, &key),
            Err(KeyFileError::AlreadyExists { .. })
        ));
        let long = crate::TokenKey::from_bytes(&[1u8; 40]).unwrap();
        assert!(matches!(
            write_token_key_file(&dir.path().join("long.key"), &long),
            Err(KeyFileError::WrongLength { found: 40, .. })
        ));
        let short = write_raw(dir.path(), "short.key", &[1u8; 31], 0o600);
        assert!(matches!(
            load_token_key_file(&short),
            Err(KeyFileError::WrongLength { found: 31, .. })
        ));
        let open = write_raw(dir.path(), "open.key", &key_bytes(), 0o644);
        assert!(matches!(
            load_token_key_file(&open),
            Err(KeyFileError::TooOpen { .. })
        ));
    }

    #[test]
    fn from_bytes_exact_length_only() {
        assert!(Key::from_bytes(&[7u8; 32]).is_ok());
        assert_eq!(
            Key::from_bytes(&[7u8; 31]).unwrap_err(),
            KeyError::WrongLength {
                expected: 32,
                found: 31
            }
        );
        assert_eq!(
            Key::from_bytes(&[7u8; 33]).unwrap_err(),
            KeyError::WrongLength {
                expected: 32,
                found: 33
            }
        );
        assert_eq!(
            Key::from_bytes(&[]).unwrap_err(),
            KeyError::WrongLength {
                expected: 32,
                found: 0
            }
        );
    }

    #[test]
    fn key_id_is_hmac_prefix_and_stable() {
        let k = Key::from_bytes(&key_bytes()).unwrap();
        let tag = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, &key_bytes()),
            b"migration-crypto key-id v1",
        );
        assert_eq!(&k.id().0[..], &tag.as_ref()[..8]);
        assert_eq!(k.id(), k.clone().id());
        let other = Key::from_bytes(&[1u8; 32]).unwrap();
        assert_ne!(k.id(), other.id());
        assert_eq!(k.id().to_string().len(), 16);
        assert_eq!(
            KeyId([0, 1, 2, 0xab, 0xcd, 0xef, 0x10, 0xff]).to_string(),
            "000102abcdef10ff"
        );
    }

    #[test]
    fn generate_gives_distinct_keys() {
        let a = Key::generate().unwrap();
        let b = Key::generate().unwrap();
        assert_ne!(a.as_bytes(), b.as_bytes());
        assert_ne!(a.id(), b.id());
    }

    #[test]
    fn debug_does_not_leak_key_bytes() {
        let k = Key::from_bytes(&key_bytes()).unwrap();
        let dbg = format!("{k:?}");
        assert!(dbg.contains(&k.id().to_string()), "{dbg}");
        let mut hex_key = String::new();
        for b in key_bytes() {
            hex_key.push_str(&format!("{b:02x}"));
        }
        assert!(!dbg.contains(&hex_key));
        assert!(!dbg.contains(&format!("{:?}", key_bytes())));
    }

    #[test]
    fn zeroize_clears_bytes() {
        let mut k = Key::from_bytes(&key_bytes()).unwrap();
        k.zeroize();
        assert_eq!(k.as_bytes(), &[0u8; 32]);
    }

    #[test]
    fn write_then_load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let k = Key::generate().unwrap();
        write_key_file(&path, &k).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let loaded = load_key_file(&path).unwrap();
        assert_eq!(loaded.as_bytes(), k.as_bytes());
        assert_eq!(loaded.id(), k.id());
    }

    #[test]
    fn write_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_raw(dir.path(), "k", b"old", 0o600);
        let err = write_key_file(&path, &Key::generate().unwrap()).unwrap_err();
        assert!(
            matches!(err, KeyFileError::AlreadyExists { path: ref p } if *p == path),
            "{err:?}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
    }

    #[test]
    fn load_good_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_raw(dir.path(), "k", &key_bytes(), 0o600);
        let k = load_key_file(&path).unwrap();
        assert_eq!(k.as_bytes(), &key_bytes());
    }

    #[test]
    fn load_refuses_any_group_or_other_bit() {
        let dir = tempfile::tempdir().unwrap();
        for (mode, says) in [
            (0o640, "mode 0640: readable by group; run chmod 600"),
            (0o644, "readable by group, readable by others"),
            (0o604, "mode 0604: readable by others"),
            (0o620, "writable by group"),
            (0o602, "writable by others"),
            (0o610, "executable by group"),
        ] {
            let path = write_raw(dir.path(), &format!("k{mode:o}"), &key_bytes(), mode);
            let err = load_key_file(&path).unwrap_err();
            assert!(
                matches!(&err, KeyFileError::TooOpen { path: p, mode: m } if *p == path && *m == mode),
                "{mode:o}: {err:?}"
            );
            assert!(err.to_string().contains(says), "{err}");
        }
    }

    #[test]
    fn load_refuses_a_symlink_even_to_a_good_key() {
        let dir = tempfile::tempdir().unwrap();
        let target = write_raw(dir.path(), "k", &key_bytes(), 0o600);
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let err = load_key_file(&link).unwrap_err();
        assert!(
            matches!(&err, KeyFileError::Symlink { path } if *path == link),
            "{err:?}"
        );
        assert!(err.to_string().contains("is a symlink"), "{err}");
    }

    #[test]
    fn load_refuses_a_file_owned_by_another_user() {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIP load_refuses_a_file_owned_by_another_user: needs root (chown)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = write_raw(dir.path(), "k", &key_bytes(), 0o600);
        std::os::unix::fs::chown(&path, Some(65534), Some(65534)).unwrap();
        let err = load_key_file(&path).unwrap_err();
        assert!(
            matches!(
                err,
                KeyFileError::NotOwned {
                    owner: 65534,
                    caller: 0,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(
            err.to_string()
                .contains("owned by uid 65534, not by you (uid 0)"),
            "{err}"
        );
    }

    #[test]
    fn write_refuses_a_symlink_dangling_or_not() {
        let dir = tempfile::tempdir().unwrap();
        let target = write_raw(dir.path(), "victim", b"keep", 0o600);
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let dangling = dir.path().join("dangling");
        let nowhere = dir.path().join("nowhere");
        std::os::unix::fs::symlink(&nowhere, &dangling).unwrap();
        for l in [&link, &dangling] {
            let err = write_key_file(l, &Key::generate().unwrap()).unwrap_err();
            assert!(matches!(err, KeyFileError::Symlink { .. }), "{err:?}");
        }
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
        assert!(!nowhere.exists());
    }

    #[test]
    fn load_short_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_raw(dir.path(), "k", &[1u8; 31], 0o600);
        assert!(matches!(
            load_key_file(&path).unwrap_err(),
            KeyFileError::WrongLength { found: 31, .. }
        ));
        let path = write_raw(dir.path(), "empty", &[], 0o600);
        assert!(matches!(
            load_key_file(&path).unwrap_err(),
            KeyFileError::WrongLength { found: 0, .. }
        ));
    }

    #[test]
    fn load_long_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_raw(dir.path(), "k", &[1u8; 33], 0o600);
        assert!(matches!(
            load_key_file(&path).unwrap_err(),
            KeyFileError::WrongLength { found: 33, .. }
        ));
        // A big file is reported with its real size but never slurped.
        let path = dir.path().join("big");
        let f = File::create(&path).unwrap();
        f.set_len(1 << 40).unwrap(); // sparse 1 TiB
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            load_key_file(&path).unwrap_err(),
            KeyFileError::WrongLength { found, .. } if found == 1 << 40
        ));
    }

    #[test]
    fn load_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nope");
        match load_key_file(&path).unwrap_err() {
            KeyFileError::NotFound { path: p } => assert_eq!(p, path),
            e => panic!("unexpected {e:?}"),
        }
    }

    #[test]
    fn load_directory_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        match load_key_file(dir.path()).unwrap_err() {
            KeyFileError::NotAFile { path: p } => assert_eq!(p, dir.path()),
            e => panic!("unexpected {e:?}"),
        }
    }

    #[test]
    fn errors_display_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nope");
        let msg = load_key_file(&path).unwrap_err().to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
    }
}
