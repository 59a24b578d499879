//! Upgrading the binary without dropping a connection (SIGUSR2, as nginx does): the
//! node starts the binary now at the path it was started from, with the same
//! arguments, and hands it every listening socket (inherited: `FEDPORT_INHERIT` names
//! each descriptor by listener, `admin` for the admin port). The new process takes
//! them instead of binding, so no connection attempt is refused in between and none
//! waiting in a socket's queue is lost. It says it is ready through a pipe
//! (`FEDPORT_UPGRADE_PIPE`); then the old one tells systemd the new main PID, stops
//! accepting, drains as on SIGTERM and exits 0. A new binary that fails to start, or
//! is not ready within a minute, is stopped, and the old one serves on.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

const INHERIT: &str = "FEDPORT_INHERIT";
const PIPE: &str = "FEDPORT_UPGRADE_PIPE";

/// How long a new binary has to become ready.
const READY_WITHIN: Duration = Duration::from_secs(60);

/// The binary and arguments this process was started with, read at start (before an
/// upgrade replaces the file: `/proc/self/exe` then names the old one, deleted).
pub struct Started {
    exe: std::path::PathBuf,
    args: Vec<std::ffi::OsString>,
}

impl Started {
    pub fn exe(&self) -> &std::path::Path {
        &self.exe
    }

    pub fn now() -> Self {
        let mut args = std::env::args_os();
        let argv0 = args.next().map(std::path::PathBuf::from);
        let exe = std::env::current_exe()
            .ok()
            .or(argv0)
            .unwrap_or_else(|| "fedport".into());
        Self {
            exe,
            args: args.collect(),
        }
    }
}

/// What the process before this one left in the environment: the handed sockets'
/// names and descriptors, and the readiness pipe.
static HANDED: std::sync::OnceLock<(Option<String>, Option<RawFd>)> = std::sync::OnceLock::new();

/// Takes the upgrade's variables out of the environment. Called first thing in `main`,
/// while the process has one thread (removing a variable is sound only then), so that
/// nothing this process starts later inherits them.
pub fn capture_env() {
    let spec = std::env::var_os(INHERIT).map(|v| v.to_string_lossy().into_owned());
    let pipe = std::env::var_os(PIPE).and_then(|v| v.to_string_lossy().parse::<RawFd>().ok());
    // SAFETY: main has started no thread yet
    unsafe {
        std::env::remove_var(INHERIT);
        std::env::remove_var(PIPE);
    }
    let _ = HANDED.set((spec, pipe));
}

/// The sockets the process before this one handed over, by name.
pub fn inherited() -> HashMap<String, Vec<std::net::TcpListener>> {
    let mut out: HashMap<String, Vec<std::net::TcpListener>> = HashMap::new();
    let Some(spec) = HANDED.get().and_then(|(s, _)| s.clone()) else {
        return out;
    };
    for part in spec.split(';') {
        let Some((name, fds)) = part.split_once('=') else {
            continue;
        };
        for fd in fds.split(',').filter_map(|f| f.parse::<RawFd>().ok()) {
            // a descriptor the parent left open for this process: a listening socket
            let mut listening: libc::c_int = 0;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: getsockopt writes an int into `listening` and its size into `len`
            let ok = unsafe {
                libc::getsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_ACCEPTCONN,
                    (&mut listening as *mut libc::c_int).cast(),
                    &mut len,
                )
            } == 0;
            if !ok || listening == 0 {
                continue;
            }
            // SAFETY: the parent passed it for this process to own, and nothing else
            // here holds it
            let s = unsafe { std::net::TcpListener::from_raw_fd(fd) };
            // it is ours now: not to be passed to whatever this process starts
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
            out.entry(name.to_owned()).or_default().push(s);
        }
    }
    out
}

/// Whether this process was started by an upgrade (it tells its parent, not systemd,
/// that it is ready).
pub fn is_upgrade() -> bool {
    HANDED.get().is_some_and(|(_, p)| p.is_some())
}

/// Tells the process that started this one that it is ready (once).
pub fn tell_parent_ready() {
    static TOLD: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let Some(fd) = HANDED.get().and_then(|(_, p)| *p) else {
        return;
    };
    if TOLD.swap(true, std::sync::atomic::Ordering::SeqCst) {
        return;
    }
    // SAFETY: the pipe's write end the parent left for this process, used once
    let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
    use std::io::Write;
    let _ = f.write_all(b"ready\n");
}

/// What [`Pending::ready`] is, boxed: the new process's pid once ready, or why not.
pub type Readiness =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<u32, UpgradeError>> + Send>>;

/// A new process started, not yet ready. Dropped before it was ready (the old process
/// drains meanwhile), it is stopped.
pub struct Pending {
    child: Option<std::process::Child>,
    ready: tokio::net::unix::pipe::Receiver,
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            // reaped off the caller's thread: it is gone at once after SIGKILL
            std::thread::spawn(move || c.wait());
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("cannot make the readiness pipe: {0}")]
    Pipe(std::io::Error),
    #[error("cannot start {0}: {1}")]
    Spawn(String, std::io::Error),
    #[error("the new process exited before it was ready ({0})")]
    Exited(String),
    #[error("the new process was not ready within {0} s; it was stopped")]
    Slow(u64),
}

/// Starts the binary at `started`'s path, with its arguments, handing it `sockets`
/// (listener name, descriptor).
pub fn spawn(started: &Started, sockets: &[(String, RawFd)]) -> Result<Pending, UpgradeError> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two descriptors into the array
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(UpgradeError::Pipe(std::io::Error::last_os_error()));
    }
    // SAFETY: both are new descriptors this function owns
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let mut by_name: Vec<(String, Vec<RawFd>)> = Vec::new();
    for (name, fd) in sockets {
        match by_name.iter_mut().find(|(n, _)| n == name) {
            Some((_, v)) => v.push(*fd),
            None => by_name.push((name.clone(), vec![*fd])),
        }
    }
    let spec = by_name
        .iter()
        .map(|(n, v)| {
            let list: Vec<String> = v.iter().map(|f| f.to_string()).collect();
            format!("{n}={}", list.join(","))
        })
        .collect::<Vec<_>>()
        .join(";");
    let mut keep: Vec<RawFd> = sockets.iter().map(|(_, fd)| *fd).collect();
    keep.push(write.as_raw_fd());
    let mut cmd = std::process::Command::new(&started.exe);
    cmd.args(&started.args)
        .env(INHERIT, spec)
        .env(PIPE, write.as_raw_fd().to_string());
    use std::os::unix::process::CommandExt;
    // SAFETY: between fork and exec only fcntl runs, which is async-signal-safe: the
    // handed descriptors stay open across exec in the child alone
    unsafe {
        cmd.pre_exec(move || {
            for fd in &keep {
                if libc::fcntl(*fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| UpgradeError::Spawn(started.exe.display().to_string(), e))?;
    drop(write);
    let ready =
        tokio::net::unix::pipe::Receiver::from_owned_fd(read).map_err(UpgradeError::Pipe)?;
    Ok(Pending {
        child: Some(child),
        ready,
    })
}

impl Pending {
    /// Waits for the new process to be ready: its pid, or why not (then it is stopped).
    pub async fn ready(mut self) -> Result<u32, UpgradeError> {
        use tokio::io::AsyncReadExt;
        let mut said = Vec::new();
        let read = tokio::time::timeout(READY_WITHIN, async {
            let mut buf = [0u8; 16];
            loop {
                match self.ready.read(&mut buf).await {
                    Ok(0) | Err(_) => return false,
                    Ok(n) => {
                        said.extend_from_slice(&buf[..n]);
                        if said.starts_with(b"ready\n") {
                            return true;
                        }
                    }
                }
            }
        })
        .await;
        match read {
            Ok(true) => {
                // it serves: it is no child of this process's to stop any more (reaped
                // here if it ends first; reparented when this process exits)
                let mut c = self.child.take().expect("taken once");
                let pid = c.id();
                std::thread::spawn(move || c.wait());
                Ok(pid)
            }
            Ok(false) => {
                // the pipe closed unsaid: the process ended, or is ending; it is given a
                // moment to say its status, then stopped
                let mut c = self.child.take().expect("taken once");
                let status = tokio::task::spawn_blocking(move || {
                    for _ in 0..50 {
                        if let Ok(Some(st)) = c.try_wait() {
                            return st.to_string();
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    let _ = c.kill();
                    c.wait().map_or("no status".into(), |s| s.to_string())
                })
                .await
                .unwrap_or_else(|_| "no status".into());
                Err(UpgradeError::Exited(status))
            }
            // dropped: stopped
            Err(_) => Err(UpgradeError::Slow(READY_WITHIN.as_secs())),
        }
    }
}
