//! A client cannot grow the server's log by repeating itself: a flood of `Bye`s or of
//! identical `Hello`s over a real quinn connection gives one log line per session and kind.
//! (Alone in its test binary: the log subscriber is global to the process.)

#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use control_protocol::{ByeReason, ClientId, Message, SUPPORTED_VERSIONS};
use swrapper::{MigratableServer, ServerOptions};
use wrapper_support::Identity;

/// Where the server's log lines go.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<u8>>>);

impl Write for Log {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Log {
    fn lines(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .lines()
            .map(str::to_owned)
            .collect()
    }
    fn count(&self, needle: &str) -> usize {
        self.lines().iter().filter(|l| l.contains(needle)).count()
    }
}

const FLOOD: usize = 10_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_of_byes_and_hellos_give_one_log_line_each() {
    let log = Log::default();
    let writer = log.clone();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("swrapper=debug"))
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();
    tokio::time::timeout(Duration::from_secs(60), async {
        let (identity, _) = Identity::self_signed(&["localhost".to_owned()]).unwrap();
        let roots = identity.certs.clone();
        let opts = ServerOptions::new(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            identity,
            vec![demo_echo::ALPN.to_vec()],
        );
        let server = MigratableServer::bind(opts).unwrap();
        let handle = server.handle();
        let addr = server.local_addr();
        tokio::spawn(async move { while server.accept().await.is_some() {} });
        let transport = wrapper_support::tls::transport_config(Duration::from_secs(10)).unwrap();
        let cfg =
            wrapper_support::tls::client_config(&roots, &[demo_echo::ALPN], transport).unwrap();
        let mut ep = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
        ep.set_default_client_config(cfg);

        let hello = |name: &str| {
            let mut b = Vec::new();
            control_protocol::encode(
                &Message::Hello {
                    client_id: ClientId::new(name).unwrap(),
                    supported: SUPPORTED_VERSIONS,
                },
                &mut b,
            )
            .unwrap();
            b
        };
        let mut bye = Vec::new();
        control_protocol::encode(
            &Message::Bye {
                reason: ByeReason::new("bye").unwrap(),
            },
            &mut bye,
        )
        .unwrap();

        // One client says Hello, then Bye FLOOD times; another says the same Hello FLOOD + 1
        // times.
        let byes = ep.connect(addr, "localhost").unwrap().await.unwrap();
        let (mut s1, _r1) = byes.open_bi().await.unwrap();
        let mut bytes = hello("byes");
        for _ in 0..FLOOD {
            bytes.extend_from_slice(&bye);
        }
        s1.write_all(&bytes).await.unwrap();
        let hellos = ep.connect(addr, "localhost").unwrap().await.unwrap();
        let (mut s2, _r2) = hellos.open_bi().await.unwrap();
        let one = hello("hellos");
        let mut bytes = Vec::with_capacity(one.len() * (FLOOD + 1));
        for _ in 0..=FLOOD {
            bytes.extend_from_slice(&one);
        }
        s2.write_all(&bytes).await.unwrap();

        let expected = 2 * (FLOOD as u64 - 1);
        for _ in 0..1000 {
            if handle.repeats() == expected {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(handle.repeats(), expected);
        // Give the server a moment to log whatever it would log.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let lines = log.lines();
        assert_eq!(log.count("client said bye"), 1, "{lines:#?}");
        assert_eq!(log.count("kind: Hello"), 1, "{lines:#?}");
        // Whatever else is logged (registrations, the one repeat event of each kind), the
        // log does not grow with the flood.
        assert!(lines.len() < 20, "{} lines: {lines:#?}", lines.len());
        assert!(byes.close_reason().is_none() && hellos.close_reason().is_none());
    })
    .await
    .unwrap();
}
