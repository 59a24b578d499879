//! When an HTTP/2 connection fedport opened counts as gone: nothing received for the
//! keepalive's interval and timeout together, as Envoy's `connection_keepalive` judges
//! it. hyper's own keepalive closes a connection whose PING answer is late even while
//! frames still arrive, and on a lossy link that answer waits behind a retransmission
//! (head-of-line blocking): a connection that is receiving is alive, so its requests in
//! flight are not failed for it. A connection that receives nothing (a blackholed link)
//! still ends as soon as an unanswered PING would have ended it.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// hyper's own PING timeout, left so long it never fires: [`Watched`] judges instead.
pub const PING_TIMEOUT_UNUSED: Duration = Duration::from_secs(24 * 3600);

/// A connection's byte stream that fails its read once nothing has been received for
/// `limit`. hyper PINGs a connection that received nothing for the keepalive interval,
/// so a live one always receives within interval + RTT.
pub struct Watched<T> {
    io: T,
    limit: Duration,
    last_read: Instant,
    /// Fires at `last_read + limit` as it was when last set; moved on, not reset, by
    /// each read, so a busy connection touches the timer once per `limit` at most.
    timer: Pin<Box<Sleep>>,
}

impl<T> Watched<T> {
    /// `keepalive`: the PING interval and the time its answer may take.
    pub fn new(io: T, keepalive: (Duration, Duration)) -> Self {
        let limit = keepalive.0 + keepalive.1;
        let now = Instant::now();
        Watched {
            io,
            limit,
            last_read: now,
            timer: Box::pin(tokio::time::sleep_until(now + limit)),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Pending => {}
            ready => {
                if buf.filled().len() > before {
                    this.last_read = Instant::now();
                }
                return ready;
            }
        }
        // nothing to read: woken when the limit passes, and gone if nothing came since
        while this.timer.as_mut().poll(cx).is_ready() {
            let due = this.last_read + this.limit;
            if Instant::now() >= due {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "nothing received for {} ms (keepalive PING interval and timeout)",
                        this.limit.as_millis()
                    ),
                )));
            }
            this.timer.as_mut().reset(due);
        }
        Poll::Pending
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const KEEPALIVE: (Duration, Duration) =
        (Duration::from_millis(200), Duration::from_millis(500));

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_keeps_receiving_lives_past_the_limit() {
        let (near, mut far) = tokio::io::duplex(64);
        let mut w = Watched::new(near, KEEPALIVE);
        let began = Instant::now();
        let mut buf = [0u8; 8];
        // a byte every 600 ms for 6 s: each read is within the 700 ms limit
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(600)).await;
            far.write_all(b"x").await.unwrap();
            assert_eq!(w.read(&mut buf).await.unwrap(), 1);
        }
        assert!(began.elapsed() >= Duration::from_secs(6));
        // then silence: gone 700 ms after the last byte, not before
        let silent = Instant::now();
        let e = w.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        let t = silent.elapsed();
        assert!(
            t >= Duration::from_millis(700) && t < Duration::from_millis(710),
            "{t:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_receives_nothing_is_gone_after_interval_and_timeout() {
        let (near, _far) = tokio::io::duplex(64);
        let mut w = Watched::new(near, KEEPALIVE);
        let began = Instant::now();
        let e = w.read(&mut [0u8; 8]).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        let t = began.elapsed();
        assert!(
            t >= Duration::from_millis(700) && t < Duration::from_millis(710),
            "{t:?}"
        );
    }
}
