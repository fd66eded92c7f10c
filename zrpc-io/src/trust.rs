//! Which broker a client or a service may talk to.
//!
//! A process sends nothing to a broker before it has checked, with
//! `SO_PEERCRED` on the connected socket, that the broker runs as root, as
//! the process's own uid, or as the uid named in `$ZRPC_BROKER_UID`: a
//! broker started by another user in a socket directory that user took
//! first (`/tmp/...`) is refused with [`UntrustedBroker`], which says what
//! was found.

use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

/// Environment variable naming one more uid whose broker is trusted (for a
/// system broker that runs as a dedicated user).
pub const BROKER_UID_ENV: &str = "ZRPC_BROKER_UID";

/// The broker at the end of a socket is not one this process trusts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "refusing the zrpcd at {}: it runs as uid {uid}, but this process (uid {own}) trusts only root, itself{}; another user may have taken the socket directory first (set {BROKER_UID_ENV}=<uid> to trust a broker that runs as that user)",
    path.display(),
    expected.map_or(String::new(), |u| format!(" and uid {u} (${BROKER_UID_ENV})"))
)]
pub struct UntrustedBroker {
    /// The socket.
    pub path: PathBuf,
    /// The uid the broker runs as (from `SO_PEERCRED`).
    pub uid: u32,
    /// This process's effective uid.
    pub own: u32,
    /// The uid from `$ZRPC_BROKER_UID`, if set.
    pub expected: Option<u32>,
}

/// The uid of the process at the other end of `fd` (`SO_PEERCRED`).
pub fn peer_uid(fd: RawFd) -> std::io::Result<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, a local of
    // exactly that size.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// Checks that the broker at the other end of `sock` (connected to `path`)
/// runs as root, as this process's uid, or as `$ZRPC_BROKER_UID`.
pub fn check_broker(sock: &impl AsRawFd, path: &Path) -> Result<(), UntrustedBroker> {
    // SAFETY: geteuid has no preconditions.
    let own = unsafe { libc::geteuid() };
    let expected = std::env::var(BROKER_UID_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<u32>().ok());
    // A socket whose peer cannot be read is not a broker we know.
    let uid = peer_uid(sock.as_raw_fd()).unwrap_or(u32::MAX);
    if uid == 0 || uid == own || Some(uid) == expected {
        return Ok(());
    }
    Err(UntrustedBroker {
        path: path.to_path_buf(),
        uid,
        own,
        expected,
    })
}

/// What to check when connecting to the broker's socket failed with `e`,
/// as a parenthesised hint to append to the error message: whether zrpcd
/// runs (no socket, connection refused), or whether this user may open its
/// socket (permission denied).
pub fn connect_hint(e: &std::io::Error) -> &'static str {
    use std::io::ErrorKind;
    match e.kind() {
        ErrorKind::PermissionDenied => {
            " (a permission problem, not a missing broker: this user may not open zrpcd's socket or its directory; check their owner and mode, see zrpcd --socket-mode)"
        }
        ErrorKind::NotFound | ErrorKind::ConnectionRefused => {
            " (is zrpcd running? is the socket directory right? see --socket-dir and $ZRPC_SOCKET_DIR)"
        }
        _ => "",
    }
}
