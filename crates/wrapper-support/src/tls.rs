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
    /// Generating a self-signed certificate failed.
    #[error("generating a self-signed certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the certificate, key or roots.
    #[error("TLS configuration refused: {0}")]
    Rustls(#[from] rustls::Error),
    /// The rustls configuration does not suit QUIC (no TLS 1.3 cipher suite).
    #[error("TLS configuration unusable for QUIC: {0}")]
    Quic(String),
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
    /// encoding so that it can be handed to clients as their trusted root.
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
    pub fn load(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let certs = load_certs(cert)?;
        let key_pem = read_pem(key)?;
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

    /// Writes the private key, readable by the owner only.
    pub fn write_key(&self, path: &Path) -> Result<(), TlsError> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .and_then(|mut f| f.write_all(self.key.as_bytes()))
            .map_err(|source| TlsError::Write {
                path: path.to_path_buf(),
                source,
            })
    }
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

/// A quinn server configuration for `identity`, offering `alpn`.
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
    tls.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
    cfg.transport_config(Arc::new(transport));
    Ok(cfg)
}

/// A quinn client configuration trusting `roots` only, offering `alpn`.
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
    tls.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
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
        // A certificate file given where the key belongs.
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
}
