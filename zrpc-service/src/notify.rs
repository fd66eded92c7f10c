//! Minimal systemd readiness notification (`sd_notify(3)`).

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;

/// Environment variable naming systemd's notification socket.
const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Sends `READY=1` to `$NOTIFY_SOCKET` if it is set. Failures are logged,
/// never fatal.
pub(crate) fn notify_ready() {
    let Some(path) = std::env::var_os(NOTIFY_SOCKET) else {
        return;
    };
    if path.is_empty() {
        return;
    }
    match send(&path, b"READY=1") {
        Ok(()) => tracing::debug!("sent READY=1 to {:?}", path),
        Err(e) => tracing::warn!("cannot notify systemd at {:?}: {}", path, e),
    }
}

/// Sends one datagram to a notification socket; a leading `@` names a Linux
/// abstract socket.
pub(crate) fn send(path: &OsStr, msg: &[u8]) -> io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    let bytes = path.as_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        send_abstract(&sock, name, msg)
    } else {
        sock.send_to(msg, path).map(|_| ())
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn send_abstract(sock: &UnixDatagram, name: &[u8], msg: &[u8]) -> io::Result<()> {
    #[cfg(target_os = "android")]
    use std::os::android::net::SocketAddrExt;
    #[cfg(target_os = "linux")]
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
    sock.send_to_addr(msg, &addr).map(|_| ())
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn send_abstract(_: &UnixDatagram, _: &[u8], _: &[u8]) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract notification sockets are only supported on Linux",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_ready_to_path_and_abstract() {
        let dir = std::env::temp_dir().join(format!("zrpc-notify-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let path = dir.join("notify.sock");
        let rx = UnixDatagram::bind(&path).expect("bind");
        rx.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .expect("timeout");
        send(path.as_os_str(), b"READY=1").expect("send");
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"READY=1");
        let _ = std::fs::remove_dir_all(&dir);

        #[cfg(target_os = "linux")]
        {
            use std::os::linux::net::SocketAddrExt;
            let name = format!("zrpc-notify-test-{}", std::process::id());
            let addr =
                std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).expect("addr");
            let rx = UnixDatagram::bind_addr(&addr).expect("bind abstract");
            rx.set_read_timeout(Some(std::time::Duration::from_secs(5)))
                .expect("timeout");
            send(OsStr::new(&format!("@{name}")), b"READY=1").expect("send abstract");
            let n = rx.recv(&mut buf).expect("recv");
            assert_eq!(&buf[..n], b"READY=1");
        }
    }
}
