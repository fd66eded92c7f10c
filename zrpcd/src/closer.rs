//! Closing, off the event loop, descriptors a peer sent that are not
//! memfds.
//!
//! A payload descriptor must be a sealed memfd (docs/protocol.md), and
//! closing a memfd never waits. Closing other files can: the last close of
//! a TCP socket with `SO_LINGER` and unacknowledged data waits up to the
//! linger time, a file on a FUSE mount waits for its daemon. A peer that
//! passes the broker such a descriptor and then closes its own copy would
//! make the broker's close the last one, on its only thread: every user's
//! calls would stop. So every received descriptor that is not a memfd is
//! handed, as soon as it is read, to a thread of its own that closes it,
//! a socket's linger turned off first (an abortive close, which does not
//! wait). The connection that sent it gets `Fatal{Protocol}` if it
//! negotiated descriptors (and its descriptors are closed unread if not).

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Mutex, OnceLock};

use zrpc_io::fdpass::FdQueue;

/// Whether `fd` is a memfd (`F_GET_SEALS` fails on anything else).
fn is_memfd(fd: &OwnedFd) -> bool {
    // SAFETY: fcntl(F_GET_SEALS) on an open descriptor only reads its
    // seals.
    unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) >= 0 }
}

/// Moves every descriptor of `fds[from..]` that is not a memfd to the
/// closing thread, keeping the others in order; returns how many it moved.
pub fn sort_out(fds: &mut FdQueue, from: usize) -> usize {
    if fds.len() <= from || fds.iter().skip(from).all(is_memfd) {
        return 0;
    }
    let fresh: Vec<OwnedFd> = fds.drain(from..).collect();
    let mut moved = 0;
    for fd in fresh {
        if is_memfd(&fd) {
            fds.push_back(fd);
        } else {
            close_later(fd);
            moved += 1;
        }
    }
    moved
}

/// Closes `fd` on the closing thread (or here, its linger turned off, if
/// that thread cannot be started).
pub fn close_later(fd: OwnedFd) {
    static TX: OnceLock<Option<Mutex<Sender<OwnedFd>>>> = OnceLock::new();
    let tx = TX.get_or_init(|| {
        let (tx, rx) = channel::<OwnedFd>();
        let started = std::thread::Builder::new()
            .name("zrpcd-closer".into())
            .spawn(move || {
                for fd in rx {
                    close_now(fd);
                }
            });
        match started {
            Ok(_) => Some(Mutex::new(tx)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the descriptor-closing thread");
                None
            }
        }
    });
    let fd = match tx {
        Some(tx) => match tx.lock().unwrap_or_else(|e| e.into_inner()).send(fd) {
            Ok(()) => return,
            Err(e) => e.0,
        },
        None => fd,
    };
    close_now(fd);
}

/// Closes `fd`, a socket's linger turned off first.
fn close_now(fd: OwnedFd) {
    let off = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt reads `size_of::<linger>()` bytes of `off`; on a
    // descriptor that is not a socket it fails with ENOTSOCK and changes
    // nothing.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&off as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    drop(fd);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn only_memfds_stay() {
        let memfd = || -> OwnedFd {
            // SAFETY: memfd_create with a NUL-terminated name; the new
            // descriptor is owned by the OwnedFd alone.
            unsafe {
                let fd = libc::memfd_create(c"t".as_ptr(), 0);
                assert!(fd >= 0, "memfd_create");
                std::os::fd::FromRawFd::from_raw_fd(fd)
            }
        };
        let (a, b) = UnixStream::pair().expect("pair");
        let mut fds: FdQueue = [memfd(), OwnedFd::from(a), memfd(), OwnedFd::from(b)]
            .into_iter()
            .collect();
        // Only from index 1 on: the first is kept whatever it is.
        assert_eq!(sort_out(&mut fds, 1), 2);
        assert_eq!(fds.len(), 2);
        assert!(fds.iter().all(is_memfd));
        assert_eq!(sort_out(&mut fds, 0), 0);
    }
}
