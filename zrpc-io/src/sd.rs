//! The systemd notification protocol (`sd_notify(3)`), shared by the broker
//! and the service library, on top of the `sd-notify` crate. Without
//! `NOTIFY_SOCKET` every call is a no-op, so programs behave exactly the same
//! when not run by systemd.

use std::os::unix::net::UnixDatagram;

/// Sends `state` (for example `"READY=1"` or `"STATUS=..."`, one or more
/// `KEY=VALUE` lines) to the socket named by `$NOTIFY_SOCKET`. Returns
/// `Ok(false)` when the variable is not set. Abstract socket names (starting
/// with `@`) are supported.
pub fn sd_notify(state: &str) -> std::io::Result<bool> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    match path.as_encoded_bytes().strip_prefix(b"@") {
        // sd-notify 0.5 connects to `$NOTIFY_SOCKET` as a file path, so an
        // abstract name (systemd in some containers, `systemd-run --user`
        // on older versions) is sent to here, as sd_notify(3) does.
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &addr)?;
        }
        None => sd_notify::notify(&[sd_notify::NotifyState::Custom(state)])?,
    }
    Ok(true)
}

/// The watchdog interval requested by systemd (`$WATCHDOG_USEC`, for this
/// process per `$WATCHDOG_PID`), if any.
pub fn watchdog_interval() -> Option<std::time::Duration> {
    sd_notify::watchdog_enabled().filter(|d| !d.is_zero())
}
