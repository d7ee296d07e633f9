//! Writes that let the tasks ready to run go first, so that answers finished together leave
//! in one write.
//!
//! An HTTP/2 connection's task writes the answers its streams have finished each time it runs,
//! and a stream that finishes wakes it at once (tokio runs the task a task wakes next). Under
//! load, nearly every answer cost a `writev` of its own, and the client a read: 0.86 writes a
//! call with 64 calls open over 8 connections (h2load). Stepping aside once before each write,
//! to the back of the worker's queue, lets the streams ready behind it finish first and their
//! answers join the write: 0.17 writes a call, and 1.3 to 1.7 times the calls a second on 2
//! cores (about 1.15 to 1.25 times with the benches' tonic client, which pays for its own
//! writes). Netty's flush consolidation and grpc-go's writer, which drains its queue before it
//! flushes, do the same. A connection with one call open pays one more poll of its task, which
//! latency does not show.
//!
//! Only what a write hands to the socket waits: reads, flushes and shutdowns pass through. Under
//! TLS, rustls takes an answer's bytes before the socket does, and the write steps aside for
//! nothing; the gRPC listener coalesces only plain connections.

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A connection whose writes each step aside once before reaching it (with `coalescing`).
#[derive(Debug)]
pub struct CoalescedWrites<S> {
    inner: S,
    coalescing: bool,
    /// Whether the write about to be made has stepped aside already.
    stepped_aside: bool,
}

impl<S> CoalescedWrites<S> {
    /// `inner`, its writes coalesced if `coalescing`, passed straight through otherwise.
    pub fn new(inner: S, coalescing: bool) -> CoalescedWrites<S> {
        CoalescedWrites {
            inner,
            coalescing,
            stepped_aside: false,
        }
    }

    /// Pending, with the task woken to run again after the tasks ready before it, once in two
    /// calls: the write that follows goes through.
    fn step_aside(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if !self.coalescing {
            return Poll::Ready(());
        }
        self.stepped_aside = !self.stepped_aside;
        if self.stepped_aside {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        Poll::Ready(())
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for CoalescedWrites<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for CoalescedWrites<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        std::task::ready!(self.step_aside(cx));
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        std::task::ready!(self.step_aside(cx));
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected for CoalescedWrites<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Wake, Waker};

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// Counts its wakes.
    #[derive(Default)]
    struct Wakes(AtomicUsize);

    impl Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn a_write_steps_aside_once_then_goes_through() {
        let (near, mut far) = tokio::io::duplex(64);
        let mut coalesced = CoalescedWrites::new(near, true);
        let wakes = Arc::new(Wakes::default());
        let waker = Waker::from(Arc::clone(&wakes));
        let mut cx = Context::from_waker(&waker);

        let first = Pin::new(&mut coalesced).poll_write(&mut cx, b"one");
        assert!(first.is_pending(), "the first write steps aside");
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1, "and wakes its task to come back");
        let again = Pin::new(&mut coalesced).poll_write(&mut cx, b"one");
        assert!(matches!(again, Poll::Ready(Ok(3))), "the next goes through: {again:?}");
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);

        // The next burst steps aside again, vectored or not.
        let slices = [std::io::IoSlice::new(b"two")];
        assert!(
            Pin::new(&mut coalesced)
                .poll_write_vectored(&mut cx, &slices)
                .is_pending()
        );
        assert_eq!(wakes.0.load(Ordering::SeqCst), 2);
        assert!(matches!(
            Pin::new(&mut coalesced).poll_write_vectored(&mut cx, &slices),
            Poll::Ready(Ok(3))
        ));

        let mut read = [0u8; 6];
        far.read_exact(&mut read).await.unwrap();
        assert_eq!(&read, b"onetwo", "every byte arrives, in order");
    }

    #[tokio::test]
    async fn awaited_writes_and_reads_arrive_whole() {
        let (near, mut far) = tokio::io::duplex(16);
        let mut coalesced = CoalescedWrites::new(near, true);
        let message: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let expected = message.clone();
        // Through a pipe smaller than the message, so that writes also wait for room.
        let writer = tokio::spawn(async move {
            coalesced.write_all(&message).await.unwrap();
            coalesced.flush().await.unwrap();
            let mut answer = [0u8; 2];
            coalesced.read_exact(&mut answer).await.unwrap();
            coalesced.shutdown().await.unwrap();
            answer
        });
        let mut received = vec![0u8; expected.len()];
        far.read_exact(&mut received).await.unwrap();
        assert_eq!(received, expected);
        far.write_all(b"ok").await.unwrap();
        assert_eq!(&writer.await.unwrap(), b"ok");
        let mut rest = Vec::new();
        far.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "the shutdown ends the stream");
    }

    #[test]
    fn without_coalescing_writes_go_straight_through() {
        let (near, _far) = tokio::io::duplex(64);
        let mut plain = CoalescedWrites::new(near, false);
        let wakes = Arc::new(Wakes::default());
        let waker = Waker::from(Arc::clone(&wakes));
        let mut cx = Context::from_waker(&waker);
        assert!(matches!(
            Pin::new(&mut plain).poll_write(&mut cx, b"one"),
            Poll::Ready(Ok(3))
        ));
        assert_eq!(wakes.0.load(Ordering::SeqCst), 0);
    }
}
