//! A gRPC stream's framing, followed as it passes: each message held until it is
//! whole, inflated if compressed, and checked against its type; valid messages leave
//! byte for byte as they came, nothing after a refused one does. Inflation goes a slice
//! at a time, within a share of the worker's time, so that a stream of small gzip
//! bombs neither holds a worker nor takes more than its share of it.

use super::ProtoCheck;
use crate::memory::{Held, Over};
use bytes::{Bytes, BytesMut};
use std::cell::Cell;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Why a gRPC message was refused.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// Its length prefix, or its decompressed size, passes the limit.
    TooLarge(u64),
    /// It does not decode as its type (or is compressed in a way that cannot be read).
    Invalid(String),
    /// Holding it whole would pass a memory budget.
    Memory(Over),
}

/// Inflated bytes per turn: about a third of a millisecond of work.
const SLICE: u64 = 256 * 1024;
/// Compressed bytes read per turn: bounds a turn whose input inflates to little.
const IN_SLICE: usize = 16 * 1024;

/// A compressed message, read at most `allowance` bytes a turn (then `WouldBlock`,
/// which the gzip decoder passes up without losing its place).
struct Paced {
    data: Bytes,
    at: usize,
    allowance: usize,
}

impl std::io::Read for Paced {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.data.len() - self.at;
        if left == 0 {
            return Ok(0);
        }
        if self.allowance == 0 {
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        let n = buf.len().min(left).min(self.allowance);
        buf[..n].copy_from_slice(&self.data[self.at..self.at + n]);
        self.at += n;
        self.allowance -= n;
        Ok(n)
    }
}
/// A worker inflates for at most `SHARE` of every `WINDOW`; past it, inflation waits for
/// the next window while everything else on the worker goes on.
const WINDOW: Duration = Duration::from_millis(100);
const SHARE: Duration = Duration::from_millis(50);

thread_local! {
    /// This worker's inflation time: the window it is in, and what it used of it.
    static SPENT: Cell<(u64, Duration)> = const { Cell::new((0, Duration::ZERO)) };
}

fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// When the worker may inflate again, if its share of this window is spent.
fn share_spent(now: Instant) -> Option<Instant> {
    let since = now.duration_since(epoch());
    let window = (since.as_nanos() / WINDOW.as_nanos()) as u64;
    SPENT.with(|s| {
        let (w, used) = s.get();
        if w != window {
            s.set((window, Duration::ZERO));
            return None;
        }
        (used >= SHARE).then(|| epoch() + WINDOW * (window as u32 + 1))
    })
}

fn share_use(d: Duration) {
    SPENT.with(|s| {
        let (w, used) = s.get();
        s.set((w, used + d));
    });
}

/// What to do after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum More {
    /// Nothing left to do until more bytes come.
    No,
    /// Inflation goes on: yield to the worker's other tasks, then [`Framer::resume`].
    Now,
    /// The worker's inflation share is spent: [`Framer::resume`] at this instant.
    At(Instant),
}

/// What a step of the framer gives.
#[derive(Debug)]
pub struct Step {
    /// Whole, valid messages ready to go on.
    pub out: Option<Bytes>,
    /// The refusal that stopped the stream, if one did.
    pub refusal: Option<Refusal>,
    pub more: More,
}

impl Step {
    fn done(out: Option<Bytes>, refusal: Option<Refusal>) -> Self {
        Self {
            out,
            refusal,
            more: More::No,
        }
    }
}

/// A compressed message at the start of `pending`, being inflated.
struct Inflation {
    /// Where the message ends in `pending`.
    end: usize,
    decoder: flate2::read::MultiGzDecoder<Paced>,
    plain: Vec<u8>,
    compressed: usize,
}

impl std::fmt::Debug for Inflation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Inflation({} of {} bytes)", self.plain.len(), self.end)
    }
}

/// How a walk over whole messages stopped.
enum Stop {
    Refused(Refusal),
    /// At a compressed message, to inflate before it can be checked.
    Inflate,
}

/// Follows a gRPC stream's framing (see the module docs).
#[derive(Debug)]
pub struct Framer {
    check: ProtoCheck,
    max: u64,
    /// The stream's `grpc-encoding` is gzip.
    gzip: bool,
    pending: BytesMut,
    inflating: Option<Inflation>,
    /// What is held for the stream against the caller's connection's memory budget.
    held: Option<Held>,
}

impl Framer {
    pub fn new(check: ProtoCheck, max: u64, gzip: bool) -> Self {
        Self {
            check,
            max,
            gzip,
            pending: BytesMut::new(),
            inflating: None,
            held: None,
        }
    }

    /// What is held for an unfinished (or inflating) message counts against `budget`.
    pub fn within(mut self, budget: Arc<crate::memory::Connection>) -> Self {
        self.held = Some(Held::new(budget));
        self
    }

    /// A message is being inflated: [`Framer::resume`] before taking more bytes.
    pub fn busy(&self) -> bool {
        self.inflating.is_some()
    }

    /// Bytes of an unfinished message are left: the stream ended inside it.
    pub fn unfinished(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Takes the next bytes of the stream. A length prefix over the limit is refused
    /// before any of its message is held.
    pub fn push(&mut self, data: Bytes) -> Step {
        if self.pending.is_empty() && self.inflating.is_none() {
            // the usual case, whole messages in one frame: checked where they lie and
            // passed on without a copy; only an unfinished tail is held
            let (ready, stop) = self.scan(&data);
            let out = (ready > 0).then(|| data.slice(..ready));
            return match stop {
                Some(Stop::Refused(r)) => Step::done(out, Some(r)),
                stop => {
                    if ready < data.len() {
                        self.pending.extend_from_slice(&data[ready..]);
                    }
                    self.settle(out, stop)
                }
            };
        }
        self.pending.extend_from_slice(&data);
        self.resume()
    }

    /// Goes on: a slice of the inflation under way, then the messages after it.
    pub fn resume(&mut self) -> Step {
        let mut ready = 0;
        if let Some(inf) = self.inflating.as_mut() {
            let now = Instant::now();
            if let Some(at) = share_spent(now) {
                return Step {
                    out: None,
                    refusal: None,
                    more: More::At(at),
                };
            }
            use std::io::Read;
            // bounded by what a turn reads as well as by what it makes: a message that
            // inflates to little (empty deflate blocks) costs CPU per byte read
            inf.decoder.get_mut().allowance = IN_SLICE;
            let read = (&mut inf.decoder).take(SLICE).read_to_end(&mut inf.plain);
            share_use(now.elapsed());
            let k = match read {
                Ok(k) => k,
                // this turn's input read: go on at the next
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => SLICE as usize,
                Err(e) => {
                    let r = Refusal::Invalid(format!("gzip message does not decompress: {e}"));
                    return self.refuse(None, r);
                }
            };
            if inf.plain.len() as u64 > self.max {
                let n = inf.plain.len() as u64;
                return self.refuse(None, Refusal::TooLarge(n));
            }
            if let Err(r) = self.hold() {
                return self.refuse(None, r);
            }
            let inf = self.inflating.as_mut().expect("inflating");
            if k as u64 == SLICE {
                return Step {
                    out: None,
                    refusal: None,
                    more: More::Now,
                };
            }
            if let Err(e) = self.check.check(&inf.plain) {
                return self.refuse(None, Refusal::Invalid(e));
            }
            ready = inf.end;
            self.inflating = None;
        }
        let (n, stop) = self.scan(&self.pending[ready..]);
        ready += n;
        let out = (ready > 0).then(|| self.pending.split_to(ready).freeze());
        match stop {
            Some(Stop::Refused(r)) => self.refuse(out, r),
            stop => self.settle(out, stop),
        }
    }

    /// After a scan that refused nothing: starts inflating the message it stopped at,
    /// if any, and charges what is now held.
    fn settle(&mut self, out: Option<Bytes>, stop: Option<Stop>) -> Step {
        if matches!(stop, Some(Stop::Inflate)) {
            if let Err(r) = self.start_inflating() {
                return self.refuse(out, r);
            }
        }
        let more = if self.inflating.is_some() {
            More::Now
        } else {
            More::No
        };
        match self.hold() {
            Err(r) => self.refuse(out, r),
            Ok(()) => Step {
                out,
                refusal: None,
                more,
            },
        }
    }

    /// Ends the stream at a refusal: nothing more is held.
    fn refuse(&mut self, out: Option<Bytes>, r: Refusal) -> Step {
        self.pending = BytesMut::new();
        self.inflating = None;
        if let Some(h) = self.held.as_mut() {
            let _ = h.set(0);
        }
        Step::done(out, Some(r))
    }

    /// Starts inflating the compressed message at the start of `pending`.
    fn start_inflating(&mut self) -> Result<(), Refusal> {
        let p = &self.pending;
        let end = 5 + u32::from_be_bytes([p[1], p[2], p[3], p[4]]) as usize;
        let compressed = Bytes::copy_from_slice(&p[5..end]);
        self.inflating = Some(Inflation {
            end,
            compressed: compressed.len(),
            decoder: flate2::read::MultiGzDecoder::new(Paced {
                data: compressed,
                at: 0,
                allowance: 0,
            }),
            plain: Vec::new(),
        });
        Ok(())
    }

    /// Charges what the stream holds now, as allocated. An unfinished message gets its
    /// whole declared size at once, and is charged for it: grown by doubling instead,
    /// the old and new buffers of each step would both be live, and the allocator keeps
    /// what is freed (RSS rose half again over what was held); charged only for what
    /// has arrived, calls refused late would have touched and freed their pages first
    /// (RSS rose by two thirds). A caller that declares much and sends little is bounded
    /// by its share of the node's budget (see `limits::memory`).
    fn hold(&mut self) -> Result<(), Refusal> {
        if self.pending.len() >= 5 && self.inflating.is_none() {
            let p = &self.pending;
            let whole = 5 + u32::from_be_bytes([p[1], p[2], p[3], p[4]]) as usize;
            if whole > self.pending.capacity() {
                self.pending.reserve(whole - self.pending.len());
            }
        }
        let Some(held) = self.held.as_mut() else {
            return Ok(());
        };
        let inflating = self
            .inflating
            .as_ref()
            .map_or(0, |i| i.plain.capacity() + i.compressed);
        held.set((self.pending.capacity() + inflating) as u64)
            .map_err(Refusal::Memory)
    }

    /// Walks whole messages from the start of `b`: how many bytes of them are valid,
    /// and what stopped the walk, if something did.
    fn scan(&self, b: &[u8]) -> (usize, Option<Stop>) {
        let mut ready = 0;
        while b.len() - ready >= 5 {
            let p = &b[ready..ready + 5];
            let len = u32::from_be_bytes([p[1], p[2], p[3], p[4]]) as u64;
            if len > self.max {
                return (ready, Some(Stop::Refused(Refusal::TooLarge(len))));
            }
            let end = ready + 5 + len as usize;
            if b.len() < end {
                break;
            }
            let verdict = match b[ready] {
                0 => self
                    .check
                    .check(&b[ready + 5..end])
                    .map_err(Refusal::Invalid),
                1 if self.gzip => return (ready, Some(Stop::Inflate)),
                1 => Err(Refusal::Invalid(
                    "message is marked compressed but the call's grpc-encoding is not gzip".into(),
                )),
                f => Err(Refusal::Invalid(format!(
                    "message flag {f} is neither 0 (plain) nor 1 (compressed)"
                ))),
            };
            if let Err(r) = verdict {
                return (ready, Some(Stop::Refused(r)));
            }
            ready = end;
        }
        (ready, None)
    }
}
