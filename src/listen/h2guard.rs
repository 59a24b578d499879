//! HTTP/2 abuse limits under the codec. The guard sits between the (TLS) stream and
//! hyper, reads the frame headers of what a client sends and of what fedport sends back
//! as the bytes pass — no copy, no buffering — and cuts a connection that floods PING,
//! SETTINGS, PRIORITY, window
//! updates or empty frames, sends a header block too large, in too many CONTINUATION
//! frames, or too slowly (a header block, or any frame header, left incomplete longer
//! than the header timeout). The offending frame never reaches the codec (at most the
//! first bytes of its header, when they came in an earlier read); fedport writes
//! GOAWAY(ENHANCE_YOUR_CALM) at the next frame boundary, with the reason as debug data,
//! and closes. What the `h2` crate already refuses (window overflow, malformed frames,
//! resets of streams not yet accepted) it refuses itself; the listener counts both.
//! Resets are judged by what they cost, not here: `h2conn` counts the streams reset
//! after fedport started work on them (CVE-2023-44487, and the server-provoked form,
//! CVE-2025-8671), which padding with cheap streams cannot dilute.

use crate::reason::Reason;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const ENHANCE_YOUR_CALM: u32 = 0xb;
const IO: &str = "the stream is present until the guard is dropped";
/// After GOAWAY, what the client still sends is read and dropped for this long (at
/// most `LINGER_BYTES`), so that closing with unread input does not reset the
/// connection before the client has read the GOAWAY.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 256 * 1024;

/// What a guard can wrap: a connection's byte stream.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// The limits one listener applies to each HTTP/2 connection. Counts are per window
/// (10 s); the allowances grow with legitimate work, so that a busy client is never
/// taken for a flood (a PING per DATA frame sent is what gRPC's BDP probing does).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// HPACK-encoded bytes of one header block (HEADERS + CONTINUATION).
    pub max_header_block: usize,
    /// CONTINUATION frames in one header block.
    pub max_continuations: u32,
    /// How long a header block (or the connection preface) may stay incomplete.
    pub header_timeout: Duration,
    pub window: Duration,
    /// PING, WINDOW_UPDATE, PRIORITY and unknown frames allowed per window on top of
    /// what the connection's traffic earns.
    pub control_floor: u32,
    /// SETTINGS frames (not acknowledgements) per window.
    pub max_settings: u32,
    /// Empty DATA/HEADERS/CONTINUATION frames in a row that end nothing.
    pub max_empty_in_row: u32,
}

impl Limits {
    pub fn new(max_header_block: usize, header_timeout: Duration) -> Self {
        Self {
            max_header_block,
            max_continuations: 5,
            header_timeout,
            window: Duration::from_secs(10),
            control_floor: 200,
            max_settings: 32,
            max_empty_in_row: 32,
        }
    }
}

/// What the connection task and the guard share: why the connection was cut, a wake-up
/// for the task, and what the task's timer needs to spot a slow header block.
pub struct Trip {
    reason: OnceLock<Reason>,
    pub notify: tokio::sync::Notify,
    reader: Mutex<Option<Waker>>,
    epoch: Instant,
    /// Milliseconds since `epoch` + 1 when the open header block (or the preface)
    /// started; 0 when none is open.
    open_since: AtomicU64,
    limits: Limits,
    /// Bumped whenever bytes pass either way: an HTTP/1.1 connection with a request in
    /// flight and nothing moving is a stalled stream.
    moved: AtomicU64,
}

impl Trip {
    /// Why the connection was cut, once it was.
    pub fn reason(&self) -> Option<Reason> {
        self.reason.get().copied()
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// Cuts the connection for `why` (the first reason given wins).
    pub fn trip(&self, why: Reason) {
        if self.reason.set(why).is_ok() {
            self.notify.notify_one();
            if let Some(w) = self.reader.lock().ok().and_then(|mut g| g.take()) {
                w.wake();
            }
        }
    }

    /// The count of reads and writes that moved bytes.
    pub fn moved(&self) -> u64 {
        self.moved.load(Ordering::Relaxed)
    }

    /// Called by the connection's timer: cuts a header block (or preface) left open
    /// longer than the header timeout.
    pub fn check_slow(&self) {
        let since = self.open_since.load(Ordering::Relaxed);
        if since != 0
            && self.now_ms().saturating_sub(since) > self.limits.header_timeout.as_millis() as u64
        {
            self.trip(Reason::SlowHeaders);
        }
    }
}

/// Tracks frame boundaries in one direction of a connection.
#[derive(Default)]
struct Cursor {
    head: [u8; 9],
    have: usize,
    /// Payload bytes of the current frame still to pass.
    left: usize,
}

#[derive(Clone, Copy)]
struct Head {
    len: usize,
    kind: u8,
    flags: u8,
    stream: u32,
}

impl Cursor {
    fn at_boundary(&self) -> bool {
        self.have == 0 && self.left == 0
    }

    /// Walks `b`; for each frame header completed calls `f(head, start)` where `start`
    /// is the frame's first byte in `b` (0 if it began in an earlier chunk). Stops and
    /// returns that start when `f` refuses the frame.
    fn feed(
        &mut self,
        b: &[u8],
        mut f: impl FnMut(Head) -> Result<(), Reason>,
    ) -> Option<(usize, Reason)> {
        let mut i = 0;
        while i < b.len() {
            if self.left > 0 {
                let n = self.left.min(b.len() - i);
                self.left -= n;
                i += n;
                continue;
            }
            let start = if self.have > 0 { 0 } else { i };
            let n = (9 - self.have).min(b.len() - i);
            self.head[self.have..self.have + n].copy_from_slice(&b[i..i + n]);
            self.have += n;
            i += n;
            if self.have < 9 {
                break;
            }
            self.have = 0;
            let h = &self.head;
            let head = Head {
                len: (h[0] as usize) << 16 | (h[1] as usize) << 8 | h[2] as usize,
                kind: h[3],
                flags: h[4],
                stream: u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff,
            };
            if let Err(why) = f(head) {
                return Some((start, why));
            }
            self.left = head.len;
        }
        None
    }

    /// Bytes to the end of the current frame, if `next` holds enough to tell.
    fn to_boundary(&self, next: &[u8]) -> Option<usize> {
        if self.have == 0 {
            return Some(self.left);
        }
        let need = 9 - self.have;
        if next.len() < need {
            return Some(next.len());
        }
        let mut h = self.head;
        h[self.have..].copy_from_slice(&next[..need]);
        let len = (h[0] as usize) << 16 | (h[1] as usize) << 8 | h[2] as usize;
        Some(need + len)
    }
}

#[derive(Default)]
struct Window {
    start: Option<Instant>,
    streams: u32,
    control: u32,
    settings: u32,
    data_sent: u32,
}

enum Mode {
    /// Reading the client preface; `bool`: known to be HTTP/2 (ALPN).
    Preface(usize, bool),
    H2,
    /// HTTP/1.1 or the guard is done: bytes pass untouched.
    Pass,
}

/// A stream with the HTTP/2 guard in front of it.
pub struct Guarded<T: Io> {
    /// `None` only once dropped.
    io: Option<T>,
    trip: Arc<Trip>,
    mode: Mode,
    read: Cursor,
    write: Cursor,
    win: Window,
    last_stream: u32,
    /// A header block is open (HEADERS seen, its END_HEADERS frame not yet passed).
    block_open: bool,
    /// The frame passing now carries END_HEADERS: the block ends with its payload.
    block_final: bool,
    /// PINGs fedport sent that the client has not acknowledged.
    pings_out: u32,
    block_bytes: usize,
    block_frames: u32,
    empty_in_row: u32,
    /// GOAWAY bytes still to write, then flush and close.
    goaway: Option<(Vec<u8>, usize)>,
    closed: bool,
    /// A GOAWAY went out (fedport's or the codec's): close lingering.
    linger: bool,
}

impl<T: Io> Guarded<T> {
    /// `alpn_h2`: TLS negotiated h2, so the connection is HTTP/2 from its first byte;
    /// otherwise (cleartext) the preface decides, and HTTP/1.1 passes untouched.
    pub fn new(io: T, limits: Limits, alpn_h2: bool) -> Self {
        let trip = Arc::new(Trip {
            reason: OnceLock::new(),
            notify: tokio::sync::Notify::new(),
            reader: Mutex::new(None),
            epoch: Instant::now(),
            open_since: AtomicU64::new(1),
            limits,
            moved: AtomicU64::new(0),
        });
        Self {
            io: Some(io),
            trip,
            mode: Mode::Preface(0, alpn_h2),
            read: Cursor::default(),
            write: Cursor::default(),
            win: Window::default(),
            last_stream: 0,
            block_open: false,
            block_final: false,
            pings_out: 0,
            block_bytes: 0,
            block_frames: 0,
            empty_in_row: 0,
            goaway: None,
            closed: false,
            linger: false,
        }
    }

    pub fn trip(&self) -> Arc<Trip> {
        self.trip.clone()
    }

    /// Checks the bytes just read; returns how many may reach the codec.
    fn inspect(&mut self, b: &[u8]) -> usize {
        let mut off = 0;
        if let Mode::Preface(seen, known) = self.mode {
            let n = (PREFACE.len() - seen).min(b.len());
            if b[..n] != PREFACE[seen..seen + n] {
                // HTTP/1.1 on a cleartext port; or a bad preface, which hyper answers
                self.mode = Mode::Pass;
                self.trip.open_since.store(0, Ordering::Relaxed);
                return b.len();
            }
            if seen + n < PREFACE.len() {
                self.mode = Mode::Preface(seen + n, known);
                return b.len();
            }
            self.mode = Mode::H2;
            self.trip.open_since.store(0, Ordering::Relaxed);
            off = n;
        }
        if !matches!(self.mode, Mode::H2) {
            return b.len();
        }
        let now = Instant::now();
        let l = self.trip.limits;
        if self
            .win
            .start
            .is_none_or(|s| now.duration_since(s) >= l.window)
        {
            let sent = self.win.data_sent;
            self.win = Window {
                start: Some(now),
                ..Window::default()
            };
            // data sent at the end of the last window still earns its replies
            self.win.data_sent = sent / 2;
        }
        let mut cursor = std::mem::take(&mut self.read);
        let trip = self.trip.clone();
        let cut = cursor.feed(&b[off..], |h| self.frame(h, &trip));
        self.read = cursor;
        if self.block_final && self.read.at_boundary() {
            self.block_open = false;
            self.block_final = false;
        }
        // a header block, or a frame header, still incomplete: the slow-header clock
        // runs from when it was first seen so (a trickled header is cut too)
        if !(self.block_open || self.read.have > 0) {
            trip.open_since.store(0, Ordering::Relaxed);
        } else if trip.open_since.load(Ordering::Relaxed) == 0 {
            trip.open_since.store(trip.now_ms(), Ordering::Relaxed);
        }
        match cut {
            None => b.len(),
            Some((start, why)) => {
                self.trip.trip(why);
                off + start
            }
        }
    }

    /// One frame header from the client: counts it, refuses it past a limit.
    fn frame(&mut self, h: Head, trip: &Trip) -> Result<(), Reason> {
        let l = trip.limits;
        if self.block_final {
            // the frame before this one ended its header block
            self.block_open = false;
            self.block_final = false;
        }
        if !self.block_open {
            // a whole frame header arrived and no block is open: nothing is stalled
            trip.open_since.store(0, Ordering::Relaxed);
        }
        let w = &mut self.win;
        let empty = h.len == 0;
        match h.kind {
            // DATA
            0x0 => {
                if empty && h.flags & 0x1 == 0 {
                    self.empty_in_row += 1;
                } else {
                    self.empty_in_row = 0;
                }
            }
            // HEADERS
            0x1 => {
                if h.len > l.max_header_block {
                    return Err(Reason::H2OversizedHeaders);
                }
                if h.stream > self.last_stream {
                    self.last_stream = h.stream;
                    w.streams += 1;
                }
                self.block_open = true;
                self.block_final = h.flags & 0x4 != 0;
                trip.open_since.store(trip.now_ms(), Ordering::Relaxed);
                if h.flags & 0x4 == 0 {
                    self.block_bytes = h.len;
                    self.block_frames = 0;
                }
                self.empty_in_row = if empty && h.flags & 0x5 == 0 {
                    self.empty_in_row + 1
                } else {
                    0
                };
            }
            // PRIORITY, PING, WINDOW_UPDATE, and frame types this codec ignores
            0x2 | 0x8 => w.control += 1,
            0x6 if h.flags & 0x1 == 0 => w.control += 1,
            // a PING acknowledgement fedport did not ask for (the codec logs each)
            0x6 => match self.pings_out.checked_sub(1) {
                Some(n) => self.pings_out = n,
                None => w.control += 1,
            },
            // GOAWAY: a client says it once or twice, not in a stream
            0x7 => w.control += 1,
            // RST_STREAM: judged by its cost, in h2conn
            0x3 => {}
            // SETTINGS
            0x4 if h.flags & 0x1 == 0 => {
                w.settings += 1;
                if w.settings > l.max_settings {
                    return Err(Reason::H2SettingsFlood);
                }
            }
            // CONTINUATION
            0x9 => {
                self.block_bytes += h.len;
                self.block_frames += 1;
                if self.block_bytes > l.max_header_block {
                    return Err(Reason::H2OversizedHeaders);
                }
                if self.block_frames > l.max_continuations {
                    return Err(Reason::H2ContinuationFlood);
                }
                self.block_final = h.flags & 0x4 != 0;
                self.empty_in_row = if empty && h.flags & 0x4 == 0 {
                    self.empty_in_row + 1
                } else {
                    0
                };
            }
            // SETTINGS acknowledgements, PUSH_PROMISE: the codec refuses what is wrong
            0x4 | 0x5 => {}
            _ => w.control += 1,
        }
        if self.empty_in_row > l.max_empty_in_row {
            return Err(Reason::H2EmptyFrames);
        }
        // A PING or window update per DATA frame sent is what a reading client does.
        if w.control > l.control_floor + 2 * w.streams + 4 * w.data_sent {
            return Err(match h.kind {
                0x6 => Reason::H2PingFlood,
                0x8 => Reason::H2WindowUpdateFlood,
                0x2 => Reason::H2PriorityFlood,
                _ => Reason::H2UnknownFrameFlood,
            });
        }
        Ok(())
    }

    fn note_written(&mut self, b: &[u8]) {
        if matches!(self.mode, Mode::Pass) {
            return;
        }
        let w = &mut self.win;
        let linger = &mut self.linger;
        let pings_out = &mut self.pings_out;
        self.write.feed(b, |h| {
            if h.kind == 0x0 && h.len > 0 {
                w.data_sent += 1;
            } else if h.kind == 0x6 && h.flags & 0x1 == 0 {
                *pings_out = pings_out.saturating_add(1);
            } else if h.kind == 0x7 {
                *linger = true;
            }
            Ok(())
        });
    }
}

impl<T: Io> Guarded<T> {
    /// Writes GOAWAY, flushes and closes. Ready once the connection is closed.
    fn poll_goaway(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.closed {
            return Poll::Ready(Ok(()));
        }
        let why = self.trip.reason().unwrap_or(Reason::H2Abuse).as_str();
        let last = self.last_stream;
        let h2 = matches!(self.mode, Mode::H2);
        let (frame, pos) = self.goaway.get_or_insert_with(|| {
            if !h2 {
                // not (yet) speaking HTTP/2: nothing to say, just close
                return (Vec::new(), 0);
            }
            let mut f = Vec::with_capacity(17 + why.len());
            f.extend_from_slice(&((8 + why.len()) as u32).to_be_bytes()[1..]);
            f.extend_from_slice(&[0x7, 0, 0, 0, 0, 0]);
            f.extend_from_slice(&last.to_be_bytes());
            f.extend_from_slice(&ENHANCE_YOUR_CALM.to_be_bytes());
            f.extend_from_slice(why.as_bytes());
            (f, 0)
        });
        while *pos < frame.len() {
            match Pin::new(self.io.as_mut().expect(IO)).poll_write(cx, &frame[*pos..]) {
                Poll::Ready(Ok(0)) => break,
                Poll::Ready(Ok(n)) => *pos += n,
                Poll::Ready(Err(_)) => break,
                Poll::Pending => return Poll::Pending,
            }
        }
        self.linger = true;
        let _ = std::task::ready!(Pin::new(self.io.as_mut().expect(IO)).poll_flush(cx));
        let _ = std::task::ready!(Pin::new(self.io.as_mut().expect(IO)).poll_shutdown(cx));
        self.closed = true;
        Poll::Ready(Ok(()))
    }
}

impl<T: Io> AsyncRead for Guarded<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.trip.reason().is_none() {
            let before = buf.filled().len();
            match Pin::new(this.io.as_mut().expect(IO)).poll_read(cx, buf) {
                Poll::Ready(Ok(())) => {}
                Poll::Pending => {
                    if let Ok(mut g) = this.trip.reader.lock() {
                        if !g.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                            *g = Some(cx.waker().clone());
                        }
                    }
                    // tripped from outside (slow headers) while we were registering
                    if this.trip.reason().is_none() {
                        return Poll::Pending;
                    }
                }
                other => return other,
            }
            if buf.filled().len() > before {
                this.trip.moved.fetch_add(1, Ordering::Relaxed);
            }
            if this.trip.reason().is_none() {
                let keep = this.inspect(&buf.filled()[before..]);
                buf.set_filled(before + keep);
                if this.trip.reason().is_none() || keep > 0 {
                    return Poll::Ready(Ok(()));
                }
            }
        }
        // Cut: once fedport's own frame in progress is out, GOAWAY, close, and EOF.
        if !this.write.at_boundary() {
            if let Ok(mut g) = this.trip.reader.lock() {
                *g = Some(cx.waker().clone());
            }
            return Poll::Pending;
        }
        std::task::ready!(this.poll_goaway(cx))?;
        Poll::Ready(Ok(()))
    }
}

impl<T: Io> AsyncWrite for Guarded<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.trip.reason().is_some() && !matches!(this.mode, Mode::Pass) {
            if this.write.at_boundary() {
                std::task::ready!(this.poll_goaway(cx))?;
                // the codec's further frames go nowhere; the read side ends it
                return Poll::Ready(Ok(buf.len()));
            }
            let cap = this
                .write
                .to_boundary(buf)
                .unwrap_or(buf.len())
                .min(buf.len());
            let n = std::task::ready!(
                Pin::new(this.io.as_mut().expect(IO)).poll_write(cx, &buf[..cap])
            )?;
            this.note_written(&buf[..n]);
            if this.write.at_boundary() {
                if let Some(w) = this.trip.reader.lock().ok().and_then(|mut g| g.take()) {
                    w.wake();
                }
            }
            return Poll::Ready(Ok(n));
        }
        let n = std::task::ready!(Pin::new(this.io.as_mut().expect(IO)).poll_write(cx, buf))?;
        this.trip.moved.fetch_add(1, Ordering::Relaxed);
        this.note_written(&buf[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.trip.reason().is_some() && !matches!(this.mode, Mode::Pass) {
            let first = bufs.iter().find(|b| !b.is_empty()).map_or(&[][..], |b| b);
            return Pin::new(this).poll_write(cx, first);
        }
        let n =
            std::task::ready!(Pin::new(this.io.as_mut().expect(IO)).poll_write_vectored(cx, bufs))?;
        this.trip.moved.fetch_add(1, Ordering::Relaxed);
        let mut left = n;
        for b in bufs {
            if left == 0 {
                break;
            }
            let k = left.min(b.len());
            this.note_written(&b[..k]);
            left -= k;
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.as_ref().is_some_and(|io| io.is_write_vectored())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.closed {
            return Poll::Ready(Ok(()));
        }
        Pin::new(self.io.as_mut().expect(IO)).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.closed {
            return Poll::Ready(Ok(()));
        }
        Pin::new(self.io.as_mut().expect(IO)).poll_shutdown(cx)
    }
}

impl<T: Io> Drop for Guarded<T> {
    fn drop(&mut self) {
        let Some(mut io) = self.io.take() else { return };
        if !self.linger {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        rt.spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let _ = tokio::time::timeout(LINGER, async {
                let _ = io.shutdown().await;
                let mut buf = [0u8; 8192];
                let mut total = 0;
                while total < LINGER_BYTES {
                    match io.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => total += n,
                    }
                }
            })
            .await;
        });
    }
}

/// For property tests and fuzzing: feeds `chunks` (what a client sends, cut as the
/// reads would cut it) to a guard on a connection that is HTTP/2 by ALPN (or not);
/// returns how many bytes of each chunk would reach the codec, and why the connection
/// was cut, if it was.
#[doc(hidden)]
pub fn inspect_chunks(alpn_h2: bool, chunks: &[&[u8]]) -> (Vec<usize>, Option<Reason>) {
    let (a, _b) = tokio::io::duplex(64);
    let mut g = Guarded::new(a, Limits::new(64 * 1024, Duration::from_secs(10)), alpn_h2);
    let mut kept = Vec::with_capacity(chunks.len());
    for c in chunks {
        if g.trip.reason().is_some() {
            kept.push(0);
            continue;
        }
        kept.push(g.inspect(c));
    }
    (kept, g.trip.reason())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, len: usize) -> Vec<u8> {
        let mut f = (len as u32).to_be_bytes()[1..].to_vec();
        f.extend_from_slice(&[kind, flags]);
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend(std::iter::repeat_n(0u8, len));
        f
    }

    fn guard() -> Guarded<tokio::io::DuplexStream> {
        let (a, _b) = tokio::io::duplex(64);
        Guarded::new(a, Limits::new(64 * 1024, Duration::from_secs(10)), true)
    }

    #[test]
    fn frames_split_anywhere_are_counted_once() {
        let mut g = guard();
        let mut bytes = PREFACE.to_vec();
        for i in 0..50u32 {
            bytes.extend(frame(0x1, 0x5, 2 * i + 1, 7));
        }
        for chunk in bytes.chunks(5) {
            assert_eq!(g.inspect(chunk), chunk.len());
        }
        assert_eq!(g.win.streams, 50);
        assert_eq!(g.last_stream, 99);
        assert!(g.trip.reason().is_none());
    }

    #[test]
    fn the_offending_frame_is_held_back() {
        let mut g = guard();
        assert_eq!(g.inspect(PREFACE), 24);
        let mut bytes = Vec::new();
        for i in 0..33 {
            bytes.extend(frame(0x4, 0, 0, 6 * (i % 2)));
        }
        let keep = g.inspect(&bytes);
        assert_eq!(g.trip.reason(), Some(Reason::H2SettingsFlood));
        // 32 SETTINGS frames pass, the 33rd does not
        let lens: usize = (0..32).map(|i| 9 + 6 * (i % 2)).sum();
        assert_eq!(keep, lens);
    }

    #[test]
    fn pings_are_allowed_in_step_with_data_sent() {
        let mut g = guard();
        g.inspect(PREFACE);
        for _ in 0..1000 {
            g.note_written(&frame(0x0, 0, 1, 100));
        }
        let pings: Vec<u8> = (0..2000).flat_map(|_| frame(0x6, 0, 0, 8)).collect();
        assert_eq!(g.inspect(&pings), pings.len());
        assert!(g.trip.reason().is_none());
        let flood: Vec<u8> = (0..5000).flat_map(|_| frame(0x6, 0, 0, 8)).collect();
        g.inspect(&flood);
        assert_eq!(g.trip.reason(), Some(Reason::H2PingFlood));
    }

    #[test]
    fn continuation_floods_and_big_blocks_trip() {
        let mut g = guard();
        g.inspect(PREFACE);
        let mut b = frame(0x1, 0x0, 1, 10);
        for _ in 0..40 {
            b.extend(frame(0x9, 0, 1, 10));
        }
        g.inspect(&b);
        assert_eq!(g.trip.reason(), Some(Reason::H2ContinuationFlood));

        let mut g = guard();
        g.inspect(PREFACE);
        let mut b = frame(0x1, 0x0, 1, 16384);
        for _ in 0..4 {
            b.extend(frame(0x9, 0, 1, 16384));
        }
        g.inspect(&b);
        assert_eq!(g.trip.reason(), Some(Reason::H2OversizedHeaders));
    }

    #[test]
    fn ping_acks_count_only_when_fedport_did_not_ask() {
        let mut g = guard();
        g.inspect(PREFACE);
        for _ in 0..300 {
            g.note_written(&frame(0x6, 0, 0, 8));
        }
        let answers: Vec<u8> = (0..300).flat_map(|_| frame(0x6, 0x1, 0, 8)).collect();
        assert_eq!(g.inspect(&answers), answers.len());
        assert!(g.trip.reason().is_none());
        assert_eq!(g.win.control, 0);
        let unasked: Vec<u8> = (0..1000).flat_map(|_| frame(0x6, 0x1, 0, 8)).collect();
        g.inspect(&unasked);
        assert_eq!(g.trip.reason(), Some(Reason::H2PingFlood));
    }

    fn slow_guard() -> Guarded<tokio::io::DuplexStream> {
        let (a, _b) = tokio::io::duplex(64);
        let mut g = Guarded::new(a, Limits::new(64 * 1024, Duration::from_millis(5)), true);
        g.inspect(PREFACE);
        assert_eq!(g.trip.open_since.load(Ordering::Relaxed), 0);
        g
    }

    fn stall(g: &Guarded<tokio::io::DuplexStream>) -> Option<Reason> {
        std::thread::sleep(Duration::from_millis(30));
        g.trip.check_slow();
        g.trip.reason()
    }

    #[test]
    fn a_header_block_trickled_in_is_cut_whichever_part_is_slow() {
        // the payload of a single HEADERS frame that ends the block
        let mut g = slow_guard();
        let f = frame(0x1, 0x5, 1, 100);
        g.inspect(&f[..20]);
        assert_eq!(stall(&g), Some(Reason::SlowHeaders));
        // the payload of the last CONTINUATION
        let mut g = slow_guard();
        let mut b = frame(0x1, 0x1, 1, 10);
        b.extend(frame(0x9, 0x4, 1, 100));
        g.inspect(&b[..40]);
        assert_eq!(stall(&g), Some(Reason::SlowHeaders));
        // a frame header, of any frame, sent a byte at a time
        let mut g = slow_guard();
        g.inspect(&frame(0x0, 0, 1, 0)[..3]);
        assert_eq!(stall(&g), Some(Reason::SlowHeaders));
        // a block sent whole, then silence: nothing is open, nothing is cut
        let mut g = slow_guard();
        g.inspect(&f);
        assert_eq!(g.trip.open_since.load(Ordering::Relaxed), 0);
        assert_eq!(stall(&g), None);
    }

    #[test]
    fn a_busy_connection_whose_reads_end_mid_frame_is_never_stale() {
        let mut g = slow_guard();
        let mut bytes = Vec::new();
        for i in 0..200u32 {
            bytes.extend(frame(0x1, 0x5, 2 * i + 1, 20));
            bytes.extend(frame(0x0, 0x1, 2 * i + 1, 50));
        }
        // every read but the last ends inside a frame header
        for chunk in bytes.chunks(83) {
            let before = g.trip.now_ms();
            g.inspect(chunk);
            let since = g.trip.open_since.load(Ordering::Relaxed);
            assert!(since == 0 || since >= before, "{since} < {before}");
        }
        assert!(g.trip.reason().is_none());
    }

    #[test]
    fn http1_passes_untouched() {
        let (a, _b) = tokio::io::duplex(64);
        let mut g = Guarded::new(a, Limits::new(1024, Duration::from_secs(1)), false);
        let req = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n".repeat(100);
        assert_eq!(g.inspect(&req), req.len());
        assert!(matches!(g.mode, Mode::Pass));
        assert!(g.trip.reason().is_none());
    }
}
