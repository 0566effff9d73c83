//! The lifecycle of a move, in one process: a server and a client of it, one move that
//! completes and one that fails and is rolled back, on one QUIC connection with one
//! handshake.
//!
//! The rule: **every announce ends with `resumed()` or `abort()`**. Until then the migration
//! is in progress and another announce is refused (`ServerError::MigrationInProgress`).
//!
//! ```text
//!  announce(id, to) ── every client acks (or the deadline) ──► park()      socket closed
//!       (checkpoint, transfer and restore happen here: CRIU in a real move, a sleep here)
//!  success: unpark(Some(to)) ──► resumed()     clients confirm the new address
//!  failure: unpark(None)     ──► abort(back)   clients swap back to the old address
//! ```
//!
//! ```sh
//! cargo run -p app-examples --example in_process_move
//! ```

use std::error::Error;
use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use cwrapper::{ClientOptions, MigratingClient};
use swrapper::{
    AppConnection, Identity, MigratableServer, MigrationHandle, ServerError, ServerOptions,
};

/// The application's protocol: one request per stream, answered in upper case.
pub const ALPN: &[u8] = b"upper/1";

/// How long clients have to acknowledge an announce or an abort.
const ACK_DEADLINE: Duration = Duration::from_secs(2);

/// How long the server is "frozen" between park and unpark.
const FREEZE: Duration = Duration::from_millis(100);

/// What the run observed.
#[derive(Debug)]
pub struct Outcome {
    /// Where the server started.
    pub first: SocketAddr,
    /// Where the first move took it.
    pub moved_to: SocketAddr,
    /// The address the client sent to after the first move.
    pub peer_after_move: SocketAddr,
    /// The address the client sent to after the aborted second move.
    pub peer_after_abort: SocketAddr,
    /// The answers to the client's requests: before, after the move, after the abort.
    pub answers: Vec<String>,
    /// Whether a second announce during the first move was refused.
    pub second_announce_refused: bool,
    /// Handshakes the server completed (1: the connection was never re-established).
    pub handshakes: u64,
    /// Whether the client's QUIC connection is the one it opened.
    pub same_connection: bool,
    /// What the client saw, in order: each `Migrate`'s address, and `MigrateAborted`'s
    /// fallback (with `true`).
    pub seen: Vec<(SocketAddr, bool)>,
}

/// Runs both moves and reports what it saw.
pub async fn run() -> Result<Outcome, Box<dyn Error>> {
    let (identity, _) = Identity::self_signed(&["localhost".to_owned()])?;
    let roots = identity.certs.clone();
    let opts = ServerOptions::new(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        identity,
        vec![ALPN.to_vec()],
    );
    let server = MigratableServer::bind(opts)?;
    let handle = server.handle();
    let first = handle.local_addr();
    tokio::spawn(serve(server));

    let client = MigratingClient::connect(ClientOptions::new(
        first,
        "localhost",
        roots,
        vec![ALPN.to_vec()],
        "move-example",
    ))
    .await?;
    let connection = client.connection().stable_id();
    let mut answers = vec![request(&client, "before").await?];

    // Move 1: it works.
    let to = free_address()?;
    let id = swrapper::random_migration_id()?;
    let report = handle.announce(id, to, ACK_DEADLINE).await?;
    if !report.missing.is_empty() {
        // Clients that did not ack will lose what they send during the freeze; the move goes on.
        eprintln!("not acknowledged by {:?}", report.missing);
    }
    if !report.cannot_follow.is_empty() {
        // Plain QUIC clients (no marker ALPN): never told; without a front they are cut off.
        eprintln!(
            "plain clients that cannot follow: {:?}",
            report.cannot_follow
        );
    }
    // The rule in action: this migration is in progress until resumed() or abort().
    let second = handle
        .announce(swrapper::random_migration_id()?, to, ACK_DEADLINE)
        .await;
    let second_announce_refused = matches!(second, Err(ServerError::MigrationInProgress { .. }));
    handle.park().await?;
    tokio::time::sleep(FREEZE).await;
    if let Err(e) = handle.unpark(Some(to)) {
        // Could not come up at the new address: come back where we were, send clients back.
        roll_back(&handle, first).await?;
        return Err(e.into());
    }
    handle.resumed()?;
    answers.push(request(&client, "after the move").await?);
    let peer_after_move = client.peer();

    // Move 2: the "restore" fails after the freeze; abort() sends the clients back.
    let nowhere = free_address()?;
    handle
        .announce(swrapper::random_migration_id()?, nowhere, ACK_DEADLINE)
        .await?;
    handle.park().await?;
    tokio::time::sleep(FREEZE).await;
    roll_back(&handle, to).await?;
    answers.push(request(&client, "after the abort").await?);
    let peer_after_abort = client.peer();

    let outcome = Outcome {
        first,
        moved_to: to,
        peer_after_move,
        peer_after_abort,
        answers,
        second_announce_refused,
        handshakes: handle.handshakes(),
        same_connection: client.connection().stable_id() == connection,
        seen: client
            .status()
            .migrations
            .iter()
            .map(|m| (m.new_addr, m.aborted))
            .collect(),
    };
    client.close("done").await;
    Ok(outcome)
}

/// A failed move's end: run again at the current address, then tell the clients to swap
/// back to `back` (where the server runs now) and wait for their acks.
async fn roll_back(handle: &MigrationHandle, back: SocketAddr) -> Result<(), ServerError> {
    if handle.is_parked() {
        handle.unpark(None)?;
    }
    let report = handle.abort(back, ACK_DEADLINE).await?;
    if !report.missing.is_empty() {
        eprintln!("abort not acknowledged by {:?}", report.missing);
    }
    Ok(())
}

/// A loopback address with a port free right now.
fn free_address() -> std::io::Result<SocketAddr> {
    UdpSocket::bind((std::net::Ipv4Addr::LOCALHOST, 0))?.local_addr()
}

async fn serve(server: MigratableServer) {
    while let Some(app) = server.accept().await {
        tokio::spawn(serve_connection(app));
    }
}

async fn serve_connection(app: AppConnection) {
    while let Ok((mut send, mut recv)) = app.connection.accept_bi().await {
        tokio::spawn(async move {
            let Ok(request) = recv.read_to_end(64 * 1024).await else {
                return;
            };
            if send.write_all(&request.to_ascii_uppercase()).await.is_ok() {
                let _ = send.finish();
            }
        });
    }
}

async fn request(client: &MigratingClient, text: &str) -> Result<String, Box<dyn Error>> {
    let (mut send, mut recv) = client.connection().open_bi().await?;
    send.write_all(text.as_bytes()).await?;
    send.finish()?;
    Ok(String::from_utf8(recv.read_to_end(64 * 1024).await?)?)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let outcome = run().await?;
    println!("{outcome:#?}");
    Ok(())
}
