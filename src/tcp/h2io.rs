//! One HTTP/2 stream as a byte stream: the far end of a CONNECT tunnel, served with
//! the `h2` crate directly (hyper's own adapter serves only connections hyper serves).
//! Reads hand DATA on and give its flow-control capacity back as it is read, so the
//! peer has at most a stream window outstanding; writes wait for the peer's window;
//! shutdown sends END_STREAM. Dropped before the stream ended both ways, the stream is
//! reset (h2 cancels a stream nobody holds), as a reset socket would be.

use bytes::Bytes;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub struct H2Io {
    send: h2::SendStream<Bytes>,
    recv: h2::RecvStream,
    /// What was received and not yet read.
    buf: Bytes,
    /// END_STREAM was received.
    eof: bool,
    /// END_STREAM was sent.
    ended: bool,
}

impl H2Io {
    pub fn new(send: h2::SendStream<Bytes>, recv: h2::RecvStream) -> Self {
        Self {
            send,
            recv,
            buf: Bytes::new(),
            eof: false,
            ended: false,
        }
    }
}

impl H2Io {
    /// Resets the stream as a TCP reset is carried (RFC 9113 §8.5).
    pub fn reset_connect_error(mut self) {
        self.send.send_reset(h2::Reason::CONNECT_ERROR);
    }
}

fn io_error(e: h2::Error) -> std::io::Error {
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| std::io::ErrorKind::Other.into());
    }
    std::io::Error::new(std::io::ErrorKind::ConnectionReset, e)
}

impl AsyncRead for H2Io {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        loop {
            if !self.buf.is_empty() {
                let n = self.buf.len().min(buf.remaining());
                let chunk = self.buf.split_to(n);
                buf.put_slice(&chunk);
                return Poll::Ready(Ok(()));
            }
            if self.eof {
                return Poll::Ready(Ok(()));
            }
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(d)) => {
                    let _ = self.recv.flow_control().release_capacity(d.len());
                    self.buf = d;
                }
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
                None => self.eof = true,
            }
        }
    }
}

impl AsyncWrite for H2Io {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        self.send.reserve_capacity(data.len());
        loop {
            return match ready!(self.send.poll_capacity(cx)) {
                Some(Ok(0)) => continue,
                Some(Ok(n)) => {
                    let n = n.min(data.len());
                    self.send
                        .send_data(Bytes::copy_from_slice(&data[..n]), false)
                        .map_err(io_error)?;
                    Poll::Ready(Ok(n))
                }
                Some(Err(e)) => Poll::Ready(Err(io_error(e))),
                None => Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into())),
            };
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if !self.ended {
            self.ended = true;
            self.send.reserve_capacity(0);
            self.send.send_data(Bytes::new(), true).map_err(io_error)?;
        }
        Poll::Ready(Ok(()))
    }
}
