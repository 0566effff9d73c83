//! TLS identities and the quinn configurations built from them.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use quinn::rustls::pki_types::pem::PemObject;
use quinn::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use quinn::rustls::{self, RootCertStore};

/// Largest PEM file read (a certificate chain is a few KiB).
const MAX_PEM: u64 = 1024 * 1024;

/// Errors of loading or building a TLS identity or configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A PEM file is larger than any certificate or key could be.
    #[error("{path} is {len} bytes, more than the {MAX_PEM} a PEM certificate or key may have")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        len: u64,
    },
    /// A certificate file holds no certificate, or an unparsable one.
    #[error("{path} holds no valid PEM certificate: {reason}")]
    BadCertificate {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        reason: String,
    },
    /// A key file holds no private key, or an unparsable one.
    #[error("{path} holds no valid PEM private key: {reason}")]
    BadKey {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        reason: String,
    },
    /// The private key path is a symbolic link: a key is never read or written through one.
    #[error("private key {path} is a symlink; give the file itself")]
    KeySymlink {
        /// The path given.
        path: PathBuf,
    },
    /// The private key path is not a regular file (a directory, a FIFO, ...).
    #[error("private key {path} is not a regular file")]
    KeyNotAFile {
        /// The path given.
        path: PathBuf,
    },
    /// The private key belongs to another user than the caller (its effective uid).
    #[error("private key {path} is owned by uid {owner}, not by you (uid {caller})")]
    KeyNotOwned {
        /// The path given.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// The caller's effective uid.
        caller: u32,
    },
    /// The private key grants some permission to its group or to others (mode `& 0o077`).
    #[error("private key {path} has mode {mode:04o}: accessible by {}; run chmod 600", open_to(*mode))]
    KeyTooOpen {
        /// The path given.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// [`GeneratedPem::write_key`] refuses to replace an existing file.
    #[error("private key {path} already exists; refusing to overwrite it")]
    KeyExists {
        /// The path given.
        path: PathBuf,
    },
    /// Generating a self-signed certificate failed.
    #[cfg(feature = "self-signed")]
    #[error("generating a self-signed certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the certificate, key or roots.
    #[error("TLS configuration refused: {0}")]
    Rustls(#[from] rustls::Error),
    /// The rustls configuration does not suit QUIC (no TLS 1.3 cipher suite).
    #[error("TLS configuration unusable for QUIC: {0}")]
    Quic(String),
    /// An application ALPN cannot carry the control marker (empty, too long, or already
    /// marked).
    #[error("ALPN: {0}")]
    Alpn(#[from] control_protocol::AlpnError),
}

/// A certificate chain and its private key.
#[derive(Debug)]
pub struct Identity {
    /// The chain, leaf first.
    pub certs: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub key: PrivateKeyDer<'static>,
}

impl Identity {
    /// A fresh self-signed certificate for `names` (DNS names or IP addresses), with its PEM
    /// encoding so that it can be handed to clients as their trusted root (feature
    /// `self-signed`, on by default).
    #[cfg(feature = "self-signed")]
    pub fn self_signed(names: &[String]) -> Result<(Self, GeneratedPem), TlsError> {
        let ck = rcgen::generate_simple_self_signed(names.to_vec())?;
        let pem = GeneratedPem {
            cert: ck.cert.pem(),
            key: ck.signing_key.serialize_pem(),
        };
        let key = PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
        let id = Self {
            certs: vec![ck.cert.der().clone()],
            key,
        };
        Ok((id, pem))
    }

    /// Loads a PEM certificate chain and a PEM private key.
    ///
    /// The key file is refused unless it is a regular file (not a symbolic link: checked on
    /// the path and opened with `O_NOFOLLOW`), owned by the caller's effective uid, with no
    /// group or other permission bit (mode `& 0o077 == 0`); each refusal is its own
    /// [`TlsError`]. The checks are made on the opened file, so they and the read see the
    /// same file.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let certs = load_certs(cert)?;
        let key_pem = read_private_pem(key)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::BadKey {
            path: key.to_path_buf(),
            reason: e.to_string(),
        })?;
        Ok(Self { certs, key })
    }
}

/// The PEM text of a generated identity.
#[derive(Debug, Clone)]
pub struct GeneratedPem {
    /// The certificate (what a client trusts).
    pub cert: String,
    /// The private key.
    pub key: String,
}

impl GeneratedPem {
    /// Writes the certificate, readable by all: it is public.
    pub fn write_cert(&self, path: &Path) -> Result<(), TlsError> {
        fs::write(path, &self.cert).map_err(|source| TlsError::Write {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Writes the private key to a new file, readable by the owner only (0600).
    ///
    /// The file is created exclusively (`O_CREAT | O_EXCL | O_NOFOLLOW`): an existing path
    /// ([`TlsError::KeyExists`]) or a symbolic link, dangling or not ([`TlsError::KeySymlink`]),
    /// is refused and nothing is written through it.
    pub fn write_key(&self, path: &Path) -> Result<(), TlsError> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        if fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(TlsError::KeySymlink {
                path: path.to_path_buf(),
            });
        }
        let write_err = |source: std::io::Error| match source.kind() {
            std::io::ErrorKind::AlreadyExists => TlsError::KeyExists {
                path: path.to_path_buf(),
            },
            _ if source.raw_os_error() == Some(nix::libc::ELOOP) => TlsError::KeySymlink {
                path: path.to_path_buf(),
            },
            _ => TlsError::Write {
                path: path.to_path_buf(),
                source,
            },
        };
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
            .open(path)
            .map_err(write_err)?;
        f.write_all(self.key.as_bytes()).map_err(write_err)
    }
}

/// Says who, besides the owner, may use a file of mode `mode` ("group", "others",
/// "group and others").
fn open_to(mode: u32) -> &'static str {
    match (mode & 0o070 != 0, mode & 0o007 != 0) {
        (true, true) => "group and others",
        (true, false) => "group",
        _ => "others",
    }
}

/// Reads a private key PEM file after the checks of [`Identity::load`].
fn read_private_pem(path: &Path) -> Result<Vec<u8>, TlsError> {
    use std::io::Read as _;
    use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
    let p = || path.to_path_buf();
    let read_err = |source: std::io::Error| {
        if source.raw_os_error() == Some(nix::libc::ELOOP) {
            TlsError::KeySymlink { path: p() }
        } else {
            TlsError::Read { path: p(), source }
        }
    };
    if fs::symlink_metadata(path)
        .map_err(read_err)?
        .file_type()
        .is_symlink()
    {
        return Err(TlsError::KeySymlink { path: p() });
    }
    // O_NONBLOCK: a FIFO put in the key's place must not block the open.
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK | nix::libc::O_CLOEXEC)
        .open(path)
        .map_err(read_err)?;
    let meta = f.metadata().map_err(read_err)?;
    if !meta.is_file() {
        return Err(TlsError::KeyNotAFile { path: p() });
    }
    let caller = nix::unistd::geteuid().as_raw();
    if meta.uid() != caller {
        return Err(TlsError::KeyNotOwned {
            path: p(),
            owner: meta.uid(),
            caller,
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(TlsError::KeyTooOpen { path: p(), mode });
    }
    if meta.len() > MAX_PEM {
        return Err(TlsError::TooLarge {
            path: p(),
            len: meta.len(),
        });
    }
    let mut bytes = Vec::new();
    f.take(MAX_PEM + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    Ok(bytes)
}

fn read_pem(path: &Path) -> Result<Vec<u8>, TlsError> {
    let read_err = |source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    };
    let len = fs::metadata(path).map_err(read_err)?.len();
    if len > MAX_PEM {
        return Err(TlsError::TooLarge {
            path: path.to_path_buf(),
            len,
        });
    }
    fs::read(path).map_err(read_err)
}

/// Loads every certificate of a PEM file; at least one.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_pem(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadCertificate {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::BadCertificate {
            path: path.to_path_buf(),
            reason: "no CERTIFICATE block".to_owned(),
        });
    }
    Ok(certs)
}

/// Transport settings shared by both wrappers.
///
/// The idle timeout must outlast the longest freeze a migration can cause, with margin: a
/// checkpoint that takes seconds must not close the connection.
pub fn transport_config(idle_timeout: Duration) -> Result<quinn::TransportConfig, TlsError> {
    let mut t = quinn::TransportConfig::default();
    let idle = quinn::IdleTimeout::try_from(idle_timeout)
        .map_err(|e| TlsError::Quic(format!("idle timeout {idle_timeout:?}: {e}")))?;
    t.max_idle_timeout(Some(idle));
    Ok(t)
}

/// The ALPN the handshake of `conn` settled on, if any.
pub fn negotiated_alpn(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()?
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()?
        .protocol
}

/// The application's ALPN negotiated on `conn`, the control marker stripped (see
/// [`control_protocol::alpn`]); `None` when no ALPN was negotiated. What an application that
/// checks its ALPN should look at instead of the raw handshake data.
pub fn app_alpn(conn: &quinn::Connection) -> Option<Vec<u8>> {
    let alpn = negotiated_alpn(conn)?;
    Some(control_protocol::alpn::split(&alpn).app.to_vec())
}

/// Whether the peer of `conn` negotiated the control marker: a wrapper-aware peer (cwrapper,
/// swrapper) that speaks the control protocol on the connection's first bidirectional stream.
pub fn speaks_control(conn: &quinn::Connection) -> bool {
    negotiated_alpn(conn).is_some_and(|a| control_protocol::alpn::split(&a).aware)
}

/// A quinn server configuration for `identity`, offering `alpn` and its marked forms
/// ([`control_protocol::alpn::with_control`]: the marked ones first, so a wrapper-aware
/// client negotiates the marked form and a plain client the plain one).
pub fn server_config(
    identity: Identity,
    alpn: &[&[u8]],
    transport: quinn::TransportConfig,
) -> Result<quinn::ServerConfig, TlsError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])?
    .with_no_client_auth()
    .with_single_cert(identity.certs, identity.key)?;
    tls.alpn_protocols = control_protocol::alpn::with_control(alpn)?;
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
    cfg.transport_config(Arc::new(transport));
    Ok(cfg)
}

/// A quinn client configuration trusting `roots` only, offering `alpn` and its marked forms
/// first ([`control_protocol::alpn::with_control`]): the client wrapper's, which opens the
/// control stream. A swrapper server negotiates the marked form; a plain server (which lists
/// no marked form) the plain one, which cwrapper then refuses.
pub fn client_config(
    roots: &[CertificateDer<'static>],
    alpn: &[&[u8]],
    transport: quinn::TransportConfig,
) -> Result<quinn::ClientConfig, TlsError> {
    let mut store = RootCertStore::empty();
    for r in roots {
        store.add(r.clone())?;
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])?
    .with_root_certificates(store)
    .with_no_client_auth();
    tls.alpn_protocols = control_protocol::alpn::with_control(alpn)?;
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(Arc::new(transport));
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_round_trip_through_files() {
        let dir = tempfile::tempdir().unwrap();
        let (id, pem) = Identity::self_signed(&["localhost".to_owned()]).unwrap();
        let (c, k) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        pem.write_cert(&c).unwrap();
        pem.write_key(&k).unwrap();
        let back = Identity::load(&c, &k).unwrap();
        assert_eq!(back.certs, id.certs);
        assert_eq!(back.key.secret_der(), id.key.secret_der());
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            fs::metadata(&k).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // Both configurations build from it.
        let t = || transport_config(Duration::from_secs(30)).unwrap();
        client_config(&back.certs, &[b"x"], t()).unwrap();
        server_config(back, &[b"x"], t()).unwrap();
    }

    /// A client with its own rustls configuration offering exactly `offer`.
    fn raw_client(roots: &[CertificateDer<'static>], offer: &[&[u8]]) -> quinn::ClientConfig {
        let mut store = RootCertStore::empty();
        for r in roots {
            store.add(r.clone()).unwrap();
        }
        let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(store)
        .with_no_client_auth();
        tls.alpn_protocols = offer.iter().map(|a| a.to_vec()).collect();
        quinn::ClientConfig::new(Arc::new(
            quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
        ))
    }

    /// The design rests on rustls' choice: a server picks the first protocol of its own list
    /// that the client offered, whatever the client's order. Checked by real handshakes.
    #[tokio::test]
    async fn the_server_list_decides_marked_for_aware_clients_plain_for_the_others() {
        let (id, _) = Identity::self_signed(&["localhost".to_owned()]).unwrap();
        let roots = id.certs.clone();
        let t = || transport_config(Duration::from_secs(30)).unwrap();
        let server = quinn::Endpoint::server(
            server_config(id, &[b"app/1", b"app/0"], t()).unwrap(),
            "127.0.0.1:0".parse().unwrap(),
        )
        .unwrap();
        let addr = server.local_addr().unwrap();
        let accepting = tokio::spawn(async move {
            while let Some(i) = server.accept().await {
                if let Ok(c) = i.await {
                    tokio::spawn(async move { c.closed().await });
                }
            }
        });
        let cases: Vec<(quinn::ClientConfig, &[u8], bool)> = vec![
            // The wrapper's own client config: the marked form of the first app ALPN.
            (
                client_config(&roots, &[b"app/1"], t()).unwrap(),
                b"app/1",
                true,
            ),
            // A plain client: the plain form.
            (raw_client(&roots, &[b"app/1"]), b"app/1", false),
            (raw_client(&roots, &[b"app/0"]), b"app/0", false),
            // The client's order does not matter: the server's does.
            (
                raw_client(&roots, &[b"app/1", b"qlm1+app/1"]),
                b"app/1",
                true,
            ),
            (
                raw_client(&roots, &[b"app/0", b"qlm1+app/1"]),
                b"app/1",
                true,
            ),
        ];
        for (cfg, app, aware) in cases {
            let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
            ep.set_default_client_config(cfg);
            let conn = ep.connect(addr, "localhost").unwrap().await.unwrap();
            assert_eq!(app_alpn(&conn).as_deref(), Some(app));
            assert_eq!(speaks_control(&conn), aware, "{:?}", negotiated_alpn(&conn));
            conn.close(0u32.into(), b"");
            ep.wait_idle().await;
        }
        accepting.abort();
    }

    #[test]
    fn an_unmarkable_alpn_is_a_typed_error() {
        let (id, _) = Identity::self_signed(&["localhost".to_owned()]).unwrap();
        let t = || transport_config(Duration::from_secs(30)).unwrap();
        assert!(matches!(
            client_config(&id.certs, &[b""], t()),
            Err(TlsError::Alpn(_))
        ));
        assert!(matches!(
            server_config(id, &[&[b'a'; 251][..]], t()),
            Err(TlsError::Alpn(_))
        ));
    }

    #[test]
    fn bad_files_are_typed_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        assert!(matches!(load_certs(&missing), Err(TlsError::Read { .. })));
        let empty = dir.path().join("empty.pem");
        fs::write(&empty, "").unwrap();
        assert!(matches!(
            load_certs(&empty),
            Err(TlsError::BadCertificate { .. })
        ));
        let garbage = dir.path().join("garbage.pem");
        fs::write(
            &garbage,
            "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        assert!(matches!(
            load_certs(&garbage),
            Err(TlsError::BadCertificate { .. })
        ));
        let (_, pem) = Identity::self_signed(&["localhost".to_owned()]).unwrap();
        let cert = dir.path().join("c.pem");
        pem.write_cert(&cert).unwrap();
        // A certificate file given where the key belongs (private enough, but no key).
        use std::os::unix::fs::PermissionsExt as _;
        fs::set_permissions(&cert, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            Identity::load(&cert, &cert),
            Err(TlsError::BadKey { .. })
        ));
        let huge = dir.path().join("huge.pem");
        let f = fs::File::create(&huge).unwrap();
        f.set_len(MAX_PEM + 1).unwrap();
        assert!(matches!(load_certs(&huge), Err(TlsError::TooLarge { .. })));
        // A zero idle timeout is fine for quinn (no timeout), an absurd one is not.
        assert!(matches!(
            transport_config(Duration::from_secs(u64::MAX)),
            Err(TlsError::Quic(_))
        ));
    }

    /// A generated identity's files in a fresh directory: (dir, cert, key).
    fn files() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let (_, pem) = Identity::self_signed(&["localhost".to_owned()]).unwrap();
        let (c, k) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        pem.write_cert(&c).unwrap();
        pem.write_key(&k).unwrap();
        (dir, c, k)
    }

    #[test]
    fn a_symlinked_key_is_refused() {
        let (dir, c, k) = files();
        let link = dir.path().join("link.pem");
        std::os::unix::fs::symlink(&k, &link).unwrap();
        let err = Identity::load(&c, &link).unwrap_err();
        assert!(
            matches!(&err, TlsError::KeySymlink { path } if *path == link),
            "{err:?}"
        );
        assert!(err.to_string().contains("is a symlink"), "{err}");
    }

    #[test]
    fn a_group_or_world_accessible_key_is_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let (_dir, c, k) = files();
        for (mode, who) in [
            (0o640, "group"),
            (0o604, "others"),
            (0o660, "group"),
            (0o646, "group and others"),
        ] {
            fs::set_permissions(&k, fs::Permissions::from_mode(mode)).unwrap();
            let err = Identity::load(&c, &k).unwrap_err();
            assert!(
                matches!(err, TlsError::KeyTooOpen { mode: m, .. } if m == mode),
                "{err:?}"
            );
            let text = err.to_string();
            assert!(
                text.contains(&format!("mode {mode:04o}: accessible by {who}")),
                "{text}"
            );
            assert!(text.contains("chmod 600"), "{text}");
        }
    }

    #[test]
    fn a_key_owned_by_another_user_is_refused() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIP a_key_owned_by_another_user_is_refused: needs root (chown)");
            return;
        }
        let (_dir, c, k) = files();
        std::os::unix::fs::chown(&k, Some(65534), Some(65534)).unwrap();
        let err = Identity::load(&c, &k).unwrap_err();
        assert!(
            matches!(
                err,
                TlsError::KeyNotOwned {
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
    fn a_directory_as_key_is_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let (dir, c, _k) = files();
        let d = dir.path().join("d");
        fs::create_dir(&d).unwrap();
        fs::set_permissions(&d, fs::Permissions::from_mode(0o700)).unwrap();
        let err = Identity::load(&c, &d).unwrap_err();
        assert!(matches!(err, TlsError::KeyNotAFile { .. }), "{err:?}");
    }

    #[test]
    fn the_key_writer_refuses_an_existing_path_or_a_symlink() {
        let (dir, _c, k) = files();
        let (_, pem) = Identity::self_signed(&["localhost".to_owned()]).unwrap();
        let before = fs::read(&k).unwrap();
        let err = pem.write_key(&k).unwrap_err();
        assert!(
            matches!(&err, TlsError::KeyExists { path } if *path == k),
            "{err:?}"
        );
        assert_eq!(
            fs::read(&k).unwrap(),
            before,
            "the existing key was changed"
        );
        let link = dir.path().join("link.pem");
        std::os::unix::fs::symlink(&k, &link).unwrap();
        let dangling = dir.path().join("dangling.pem");
        let nowhere = dir.path().join("nowhere.pem");
        std::os::unix::fs::symlink(&nowhere, &dangling).unwrap();
        for l in [&link, &dangling] {
            let err = pem.write_key(l).unwrap_err();
            assert!(matches!(err, TlsError::KeySymlink { .. }), "{err:?}");
        }
        assert_eq!(fs::read(&k).unwrap(), before);
        assert!(!nowhere.exists(), "written through a dangling symlink");
    }
}
