//! The systemd notification protocol (`sd_notify(3)`), shared by the broker
//! and the service library. Without `NOTIFY_SOCKET` every call is a no-op, so
//! programs behave exactly the same when not run by systemd.

use std::os::unix::net::UnixDatagram;

/// Sends `state` (for example `"READY=1"` or `"STATUS=..."`) to the socket
/// named by `$NOTIFY_SOCKET`. Returns `Ok(false)` when the variable is not
/// set. Abstract socket names (starting with `@`) are supported.
pub fn sd_notify(state: &str) -> std::io::Result<bool> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let sock = UnixDatagram::unbound()?;
    let bytes = path.as_encoded_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        sock.send_to_addr(state.as_bytes(), &addr)?;
    } else {
        sock.send_to(state.as_bytes(), &path)?;
    }
    Ok(true)
}

/// The watchdog interval requested by systemd (`$WATCHDOG_USEC`, for this
/// process per `$WATCHDOG_PID`), if any.
pub fn watchdog_interval() -> Option<std::time::Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| std::time::Duration::from_micros(usec))
}
