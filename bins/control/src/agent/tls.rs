//! The agents' mutual TLS: both ends present a certificate of the fleet CA; the server side
//! then names its peer by the certificate (the DNS name `<host>.agents.qlm` it is valid for),
//! never by what the peer says.

use std::sync::Arc;
use std::time::Duration;

use agent_protocol::{Name, PEER_ALPN};
use anyhow::{Context, Result, anyhow};
use quinn::rustls;
use rustls::pki_types::{CertificateDer, ServerName};

use super::config::{Config, agent_dns};

/// How long an agents' connection may be silent: short, since a peer agent that died (killed,
/// its host gone) is noticed only by this silence, and a move waits on it. Keep-alives are
/// sent well within it, so a live but busy peer (a long restore) never reaches it.
const IDLE: Duration = Duration::from_secs(5);
const KEEP_ALIVE: Duration = Duration::from_secs(1);

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The agents' transport: windows (and MTU discovery) for image transfers at a few hundred
/// MB/s, sized to the socket's granted receive buffer (`image_stream::tune_for_bulk`).
pub(crate) fn transport(receive_buffer: usize) -> Result<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(Some(quinn::IdleTimeout::try_from(IDLE)?));
    t.keep_alive_interval(Some(KEEP_ALIVE));
    crate::image_stream::tune_for_bulk(&mut t, receive_buffer);
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(64));
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    Ok(t)
}

/// The fleet CA's roots.
pub(crate) fn roots(config: &Config) -> Result<rustls::RootCertStore> {
    let mut store = rustls::RootCertStore::empty();
    for c in wrapper_support::tls::load_certs(&config.ca)? {
        store
            .add(c)
            .with_context(|| format!("{} holds an unusable CA certificate", config.ca.display()))?;
    }
    Ok(store)
}

/// Server and client configurations of an agent's endpoint.
pub(crate) fn configs(
    config: &Config,
    receive_buffer: usize,
) -> Result<(quinn::ServerConfig, quinn::ClientConfig)> {
    let identity = wrapper_support::tls::Identity::load(&config.cert, &config.key)
        .context("loading the agent's certificate and key")?;
    let roots = Arc::new(roots(config)?);
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .context("building the client certificate verifier")?;
    let mut server = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.certs.clone(), identity.key.clone_key())?;
    server.alpn_protocols = vec![PEER_ALPN.to_vec()];
    let server = quinn::crypto::rustls::QuicServerConfig::try_from(server)
        .map_err(|e| anyhow!("TLS unusable for QUIC: {e}"))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(server));
    server.transport_config(Arc::new(transport(receive_buffer)?));
    // A peer must prove its address before the handshake costs the agent anything.
    server.retry_token_lifetime(Duration::from_secs(15));

    let mut client = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(identity.certs, identity.key)?;
    client.alpn_protocols = vec![PEER_ALPN.to_vec()];
    let client = quinn::crypto::rustls::QuicClientConfig::try_from(client)
        .map_err(|e| anyhow!("TLS unusable for QUIC: {e}"))?;
    let mut client = quinn::ClientConfig::new(Arc::new(client));
    client.transport_config(Arc::new(transport(receive_buffer)?));
    Ok((server, client))
}

/// Which of `candidates` the peer's certificate (already verified against the fleet CA by
/// rustls) was issued to; `None` when it is none of them.
pub(crate) fn peer_host<'a>(
    conn: &quinn::Connection,
    candidates: impl IntoIterator<Item = &'a Name>,
) -> Option<Name> {
    let identity = conn.peer_identity()?;
    let chain = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    let leaf = chain.first()?;
    host_of(leaf, candidates)
}

/// Which of `candidates` the certificate `leaf` is valid for.
pub(crate) fn host_of<'a>(
    leaf: &CertificateDer<'_>,
    candidates: impl IntoIterator<Item = &'a Name>,
) -> Option<Name> {
    let parsed = rustls::server::ParsedCertificate::try_from(leaf).ok()?;
    candidates.into_iter().find_map(|host| {
        let name = ServerName::try_from(agent_dns(host)).ok()?;
        rustls::client::verify_server_name(&parsed, &name)
            .ok()
            .map(|()| host.clone())
    })
}

/// The server name to connect to `host` with.
pub(crate) fn server_name(host: &Name) -> String {
    agent_dns(host)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::agent::config::{Config, FleetInit, HostArg, fleet_init};

    /// A fleet's configurations (`fleet_init`) for `hosts` (name, address) under `dir`.
    pub(crate) fn fleet(dir: &std::path::Path, hosts: &[(&str, &str)]) -> Vec<Config> {
        fleet_init(&FleetInit {
            out: dir.to_path_buf(),
            hosts: hosts
                .iter()
                .map(|(n, a)| format!("{n}={a}").parse::<HostArg>().unwrap())
                .collect(),
            service_ports: (4300, 4310),
            max_services: 4,
            metrics_port: 0,
            inbound_stale_s: 120,
        })
        .unwrap();
        hosts
            .iter()
            .map(|(n, _)| Config::load(&dir.join(n).join("agent.json")).unwrap())
            .collect()
    }

    #[test]
    fn fleet_init_writes_private_keys_and_loadable_configs() {
        use std::os::unix::fs::PermissionsExt as _;
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("fleet");
        let configs = fleet(&out, &[("a", "127.0.0.1"), ("b", "127.0.0.2")]);
        assert_eq!(configs[0].host.as_str(), "a");
        assert_eq!(configs[0].allow, vec![Name::new("b").unwrap()]);
        for f in ["agent-key.pem", "token.key", "service-key.pem"] {
            let mode = std::fs::metadata(out.join("a").join(f))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "{f} is open to others: {mode:o}");
        }
        let mode = std::fs::metadata(&out).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0);
        // The same token key on every host.
        assert_eq!(
            std::fs::read(out.join("a/token.key")).unwrap(),
            std::fs::read(out.join("b/token.key")).unwrap()
        );
        // A second fleet-init into the same folder is refused.
        let again = fleet_init(&FleetInit {
            out: out.clone(),
            hosts: vec![
                "a=127.0.0.1".parse().unwrap(),
                "b=127.0.0.2".parse().unwrap(),
            ],
            service_ports: (4300, 4310),
            max_services: 4,
            metrics_port: 0,
            inbound_stale_s: 120,
        });
        assert!(again.unwrap_err().to_string().contains("exists"));
    }

    #[test]
    fn bad_fleet_arguments_and_configs_are_refused() {
        assert!("a".parse::<HostArg>().is_err());
        assert!("A=1.2.3.4".parse::<HostArg>().is_err());
        assert!("a=not-an-ip".parse::<HostArg>().is_err());
        let tmp = tempfile::tempdir().unwrap();
        let one = fleet_init(&FleetInit {
            out: tmp.path().join("f"),
            hosts: vec!["a=127.0.0.1".parse().unwrap()],
            service_ports: (4300, 4310),
            max_services: 4,
            metrics_port: 0,
            inbound_stale_s: 120,
        });
        assert!(one.unwrap_err().to_string().contains("at least two"));
        let configs = fleet(
            &tmp.path().join("g"),
            &[("a", "127.0.0.1"), ("b", "127.0.0.2")],
        );
        let mut c = configs[0].clone();
        c.allow.push(Name::new("zz").unwrap());
        assert!(
            c.check()
                .unwrap_err()
                .to_string()
                .contains("not among the peers")
        );
        let mut c = configs[0].clone();
        c.service_ports = (10, 5);
        assert!(c.check().is_err());
        let path = tmp.path().join("bad.json");
        std::fs::write(&path, b"{\"host\": \"a\"}").unwrap();
        assert!(
            Config::load(&path)
                .unwrap_err()
                .to_string()
                .contains("not an agent configuration")
        );
        std::fs::write(&path, b"\xff\xfe garbage").unwrap();
        assert!(Config::load(&path).is_err());
        assert!(Config::load(&tmp.path().join("missing.json")).is_err());
    }

    /// Real quinn connections on loopback: a fleet member is named by its certificate; a
    /// certificate of another fleet's CA, or none, does not get through the handshake.
    #[test]
    fn mutual_tls_names_members_and_refuses_strangers() {
        let tmp = tempfile::tempdir().unwrap();
        let ours = fleet(
            &tmp.path().join("ours"),
            &[("a", "127.0.0.1"), ("b", "127.0.0.1")],
        );
        let theirs = fleet(
            &tmp.path().join("theirs"),
            &[("a", "127.0.0.1"), ("b", "127.0.0.1")],
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (server_cfg, _) = configs(&ours[1], 1 << 20).unwrap();
            let server =
                quinn::Endpoint::server(server_cfg, "127.0.0.1:0".parse().unwrap()).unwrap();
            let addr = server.local_addr().unwrap();
            let peers: Vec<Name> = vec![Name::new("a").unwrap(), Name::new("c").unwrap()];
            let accept = {
                let server = server.clone();
                tokio::spawn(async move {
                    let mut named = Vec::new();
                    for _ in 0..3 {
                        let Some(incoming) = server.accept().await else {
                            break;
                        };
                        match incoming.await {
                            Ok(conn) => named.push(Some(peer_host(&conn, &peers))),
                            Err(_) => named.push(None),
                        }
                    }
                    named
                })
            };
            // A member of the fleet.
            let (_, client_cfg) = configs(&ours[0], 1 << 20).unwrap();
            let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
            client.set_default_client_config(client_cfg);
            let conn = client
                .connect(addr, &server_name(&Name::new("b").unwrap()))
                .unwrap()
                .await
                .expect("a member connects");
            // Dialling the wrong host name fails on the client side (b's certificate does not
            // name c).
            let wrong = client
                .connect(addr, &server_name(&Name::new("c").unwrap()))
                .unwrap()
                .await;
            assert!(wrong.is_err());
            // Another fleet's certificate.
            let (_, stranger_cfg) = configs(&theirs[0], 1 << 20).unwrap();
            let mut stranger = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
            stranger.set_default_client_config(stranger_cfg);
            let refused = tokio::time::timeout(
                Duration::from_secs(5),
                stranger
                    .connect(addr, &server_name(&Name::new("b").unwrap()))
                    .unwrap(),
            )
            .await;
            // Ours does not trust their CA, so the stranger's handshake cannot complete.
            assert!(!matches!(refused, Ok(Ok(_))), "a stranger got through");
            let named = tokio::time::timeout(Duration::from_secs(10), accept)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(named[0], Some(Some(Name::new("a").unwrap())));
            assert!(named[1..].iter().all(|n| n.is_none()), "{named:?}");
            drop(conn);
        });
    }
}
