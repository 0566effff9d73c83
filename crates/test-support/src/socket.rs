//! Driving a quinn socket the way quinn's endpoint does, for unit tests of the shims.

use std::io;
use std::sync::Arc;

use quinn::AsyncUdpSocket;
use quinn::udp::Transmit;

/// Sends `transmit` as quinn does: wait for writability through the socket's poller, retry on
/// `WouldBlock`. Any other error is what a shim must never return: it is returned here for the
/// test to fail on.
pub async fn send_as_quinn<S: AsyncUdpSocket>(
    socket: &Arc<S>,
    transmit: &Transmit<'_>,
) -> io::Result<()> {
    let mut poller = socket.clone().create_io_poller();
    loop {
        std::future::poll_fn(|cx| poller.as_mut().poll_writable(cx)).await?;
        match socket.try_send(transmit) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}
