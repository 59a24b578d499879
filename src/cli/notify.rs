//! systemd's readiness protocol (sd_notify): `READY=1` once every port listens,
//! `RELOADING=1` (with `MONOTONIC_USEC`) and `READY=1` around a reload, `STOPPING=1`
//! when the node drains. A datagram to `$NOTIFY_SOCKET` (a path, or `@` for Linux's
//! abstract namespace); without it, nothing. The protocol is one send of a line; the
//! sd-notify crate would add a dependency for these few lines.

use std::os::unix::net::UnixDatagram;

/// Sends `state` to the service manager, if one listens; failures are logged, never
/// fatal.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent =
        UnixDatagram::unbound().and_then(|s| match path.as_encoded_bytes().strip_prefix(b"@") {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                s.send_to_addr(state.as_bytes(), &addr)
            }
            None => s.send_to(state.as_bytes(), std::path::Path::new(&path)),
        });
    if let Err(e) = sent {
        tracing::warn!(error = %e, "cannot tell the service manager {state:?} (NOTIFY_SOCKET)");
    }
}

/// `RELOADING=1` with the monotonic clock, as `Type=notify` and `notify-reload` ask.
pub fn reloading() {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let usec = ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000;
    notify(&format!("RELOADING=1\nMONOTONIC_USEC={usec}"));
}
