//! [`SlotPoller`]: quinn's writability poller for a [`Slot`].

use std::{
    fmt,
    future::Future,
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use crate::Slot;

/// A [`quinn::UdpPoller`] that follows swaps: it waits for the current socket to become
/// writable, or for a swap, whichever comes first, and never reports an error. While parked
/// it is ready at once (sends are dropped anyway).
///
/// Return it, boxed, from `AsyncUdpSocket::create_io_poller`.
pub struct SlotPoller {
    slot: Arc<Slot>,
    waiting: Option<Pin<Box<dyn Future<Output = ()> + Send + Sync>>>,
}

impl SlotPoller {
    /// A poller on `slot`.
    pub fn new(slot: Arc<Slot>) -> Self {
        Self {
            slot,
            waiting: None,
        }
    }
}

impl fmt::Debug for SlotPoller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SlotPoller")
            .field("waiting", &self.waiting.is_some())
            .finish_non_exhaustive()
    }
}

impl quinn::UdpPoller for SlotPoller {
    fn poll_writable(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let slot = &this.slot;
        let waiting = this
            .waiting
            .get_or_insert_with(|| Box::pin(writable_or_swapped(slot.clone())));
        match waiting.as_mut().poll(cx) {
            Poll::Ready(()) => {
                // Drop the future now: it holds the socket it waited on.
                this.waiting = None;
                Poll::Ready(Ok(()))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

async fn writable_or_swapped(slot: Arc<Slot>) {
    let Some(sock) = slot.current() else {
        // Parked: sends are dropped, so "writable" at once.
        return;
    };
    let mut swapped = std::pin::pin!(slot.swapped.notified());
    swapped.as_mut().enable();
    if slot.generation() != sock.generation {
        return;
    }
    tokio::select! {
        biased;
        () = &mut swapped => {}
        ready = sock.io.writable() => {
            if let Err(error) = ready {
                tracing::debug!(%error, "UDP writability failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quinn::UdpPoller;
    use std::{net::Ipv4Addr, time::Duration};

    fn poll_once(poller: &mut SlotPoller) -> Poll<io::Result<()>> {
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        Pin::new(poller).poll_writable(&mut cx)
    }

    #[tokio::test]
    async fn parked_poller_is_ready_at_once() {
        let socket = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let slot = Arc::new(Slot::new(socket).unwrap());
        slot.swap(None);
        let mut poller = SlotPoller::new(slot);
        assert!(matches!(poll_once(&mut poller), Poll::Ready(Ok(()))));
    }

    #[tokio::test]
    async fn poller_reports_writable_and_releases_the_socket() {
        let socket = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let slot = Arc::new(Slot::new(socket).unwrap());
        let mut poller = SlotPoller::new(slot.clone());
        let ready = tokio::time::timeout(
            Duration::from_secs(5),
            std::future::poll_fn(|cx| Pin::new(&mut poller).poll_writable(cx)),
        )
        .await
        .unwrap();
        assert!(ready.is_ok());
        assert!(poller.waiting.is_none(), "poller kept its future");
        slot.swap(None);
        assert_eq!(slot.open_retired(), 0, "poller held the retired socket");
    }
}
