//! The access log as a file of its own (`[node] access_log_file`): JSON lines, shaped
//! as the JSON log's access lines, written by a thread of its own from a bounded queue
//! (16,384 lines, 16 MiB),
//! so that a slow disk never holds a request up: past the queue a line is dropped and
//! counted (`fedport_access_log_lines_dropped_total`). SIGUSR1 reopens the file (after
//! logrotate renamed it): every line queued before is written to the old file or the
//! new, once. The file is opened for appending, so that a copytruncate rotation leaves
//! no hole.

use prometheus_client::metrics::counter::Counter;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Duration;

/// Lines queued for the writer at most, and their bytes at most (a line may be long:
/// what the caller sent, up to its header list's limit).
const QUEUE: usize = 16 * 1024;
const QUEUE_BYTES: usize = 16 << 20;

pub struct AccessFile {
    pub path: PathBuf,
    tx: SyncSender<String>,
    reopen: Arc<AtomicBool>,
    dropped: Counter,
    /// Bytes of the lines queued now.
    queued: Arc<std::sync::atomic::AtomicUsize>,
}

fn open(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
}

impl AccessFile {
    /// Opens (or creates) the file and starts its writer.
    pub fn start(path: &Path, metrics: &crate::telemetry::Metrics) -> std::io::Result<Arc<Self>> {
        let file = open(path)?;
        let (tx, rx) = sync_channel(QUEUE);
        let reopen = Arc::new(AtomicBool::new(false));
        let queued = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (p, flag, written, q) = (
            path.to_owned(),
            reopen.clone(),
            metrics.access_log_lines.clone(),
            queued.clone(),
        );
        std::thread::Builder::new()
            .name("fedport-access-log".into())
            .spawn(move || write_lines(rx, file, &p, &flag, (&written, &q)))?;
        Ok(Arc::new(Self {
            path: path.to_owned(),
            tx,
            reopen,
            dropped: metrics.access_log_dropped.clone(),
            queued,
        }))
    }

    /// Queues a line; never waits: with the queue full the line is dropped and counted.
    pub fn write(&self, line: String) {
        let n = line.len();
        if self.queued.fetch_add(n, Ordering::Relaxed) + n > QUEUE_BYTES {
            self.queued.fetch_sub(n, Ordering::Relaxed);
            self.dropped.inc();
            return;
        }
        match self.tx.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.queued.fetch_sub(n, Ordering::Relaxed);
                self.dropped.inc();
            }
        }
    }

    /// The file is opened anew before the next line is written (SIGUSR1).
    pub fn reopen(&self) {
        self.reopen.store(true, Ordering::Relaxed);
    }
}

/// The writer: lines as they come, flushed whenever the queue runs dry; the file opened
/// anew when asked, between two lines.
fn write_lines(
    rx: Receiver<String>,
    file: std::fs::File,
    path: &Path,
    reopen: &AtomicBool,
    (written, queued): (&Counter, &std::sync::atomic::AtomicUsize),
) {
    let mut out = std::io::BufWriter::with_capacity(64 << 10, file);
    loop {
        let mut next = match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(l) => Some(l),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => {
                let _ = out.flush();
                return;
            }
        };
        loop {
            if reopen.swap(false, Ordering::Relaxed) {
                let _ = out.flush();
                match open(path) {
                    Ok(f) => out = std::io::BufWriter::with_capacity(64 << 10, f),
                    Err(e) => {
                        tracing::error!(path = %path.display(), error = %e, "cannot reopen the access log; writing on to the old file")
                    }
                }
            }
            let Some(mut line) = next.take() else {
                break;
            };
            queued.fetch_sub(line.len(), Ordering::Relaxed);
            line.push('\n');
            if out.write_all(line.as_bytes()).is_ok() {
                written.inc();
            }
            next = rx.try_recv().ok();
        }
        let _ = out.flush();
    }
}

/// An access line as the JSON log writes it: its time, level, target and fields.
pub fn line(fields: serde_json::Map<String, serde_json::Value>) -> String {
    let now = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    serde_json::json!({
        "timestamp": now,
        "level": "INFO",
        "fields": fields,
        "target": "fedport::access",
    })
    .to_string()
}
