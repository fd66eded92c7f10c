//! File descriptors watched by the service loop (the original's
//! `register(fd, callback)`): what may name one, the private duplicates the
//! loop registers with the runtime, and level-triggered readiness on top of
//! edge-triggered epoll.

use std::future::{poll_fn, Future};
use std::io;
use std::os::unix::io::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::task::Poll;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::error::Error;

/// Duplicates `fd` (close-on-exec). The service loop watches the duplicate,
/// which it owns, so the caller's descriptor is never closed by the library
/// and closing it early cannot make the reactor watch a reused number.
fn dup_fd(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: fcntl(F_DUPFD_CLOEXEC) only reads `fd`; an invalid one yields
    // EBADF.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `new` is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// Something naming a file descriptor to [`Server::register`](crate::Server::register): a raw
/// descriptor (`RawFd`), a reference to anything implementing `AsRawFd`
/// (`&file`, `&stream`), or a `BorrowedFd`. Owned handles are deliberately
/// not accepted: passing one by value would close it.
pub trait FdSource {
    /// The raw descriptor.
    fn raw_fd(&self) -> RawFd;
}

impl FdSource for RawFd {
    fn raw_fd(&self) -> RawFd {
        *self
    }
}

impl<T: AsRawFd + ?Sized> FdSource for &T {
    fn raw_fd(&self) -> RawFd {
        (**self).as_raw_fd()
    }
}

impl FdSource for BorrowedFd<'_> {
    fn raw_fd(&self) -> RawFd {
        self.as_raw_fd()
    }
}

type FdCallback<S> = Box<dyn FnMut(&mut S)>;

/// A watched descriptor and its callback.
pub(crate) struct FdWatch<S> {
    pub(crate) fd: RawFd,
    pub(crate) callback: FdCallback<S>,
    /// A duplicate of `fd`, registered with the reactor; created lazily
    /// inside the runtime.
    pub(crate) async_fd: Option<AsyncFd<OwnedFd>>,
}

/// Registers every descriptor not registered yet with the runtime (from
/// inside it). A descriptor that cannot be watched is removed, and its
/// error returned.
#[inline]
pub(crate) fn watch_all<S>(fds: &mut Vec<FdWatch<S>>) -> Result<(), Error> {
    if fds.iter().all(|w| w.async_fd.is_some()) {
        return Ok(());
    }
    let mut i = 0;
    while i < fds.len() {
        let w = &mut fds[i];
        if w.async_fd.is_none() {
            let registered = dup_fd(w.fd).and_then(|owned| {
                // SAFETY: `owned` is our own descriptor; it stays open
                // for as long as the AsyncFd that owns it.
                unsafe { AsyncFd::register_with_interest(owned, Interest::READABLE) }
                    .map_err(|e| e.into_parts().1)
            });
            match registered {
                Ok(a) => w.async_fd = Some(a),
                Err(source) => {
                    let fd = w.fd;
                    fds.remove(i);
                    return Err(Error::Fd { fd, source });
                }
            }
        }
        i += 1;
    }
    Ok(())
}

/// Waits until one of `fds` is readable, trying them in turn from index
/// `start` (so that a busy descriptor cannot starve the others); returns its
/// index. Pending forever if there are none.
pub(crate) fn ready<S>(
    fds: &[FdWatch<S>],
    start: usize,
) -> impl Future<Output = Result<usize, Error>> + '_ {
    poll_fn(move |cx| {
        let n = fds.len();
        for k in 0..n {
            let idx = (start + k) % n;
            let w = &fds[idx];
            let Some(a) = &w.async_fd else { continue };
            match a.poll_read_ready(cx) {
                // The guard is dropped without clearing: readiness is kept
                // until the callback has run and poll(2) says it is gone.
                Poll::Ready(Ok(_guard)) => return Poll::Ready(Ok(idx)),
                Poll::Ready(Err(source)) => {
                    return Poll::Ready(Err(Error::Fd { fd: w.fd, source }))
                }
                Poll::Pending => {}
            }
        }
        Poll::Pending
    })
}

/// Runs the callback of `w` (readable), then keeps level-triggered
/// semantics on top of edge-triggered epoll: the readiness is cleared only
/// if poll(2) says the descriptor is drained.
pub(crate) async fn run_callback<S>(w: &mut FdWatch<S>, service: &mut S) {
    (w.callback)(service);
    if let Some(a) = &w.async_fd {
        poll_fn(|cx| {
            if let Poll::Ready(Ok(mut g)) = a.poll_read_ready(cx) {
                if !fd_readable(a.as_raw_fd()) {
                    g.clear_ready();
                }
            }
            Poll::Ready(())
        })
        .await;
    }
}

/// Whether `fd` is readable right now (or at end of file / in error, which
/// also makes a level-triggered `select` report it).
fn fd_readable(fd: RawFd) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `p` is a valid pollfd array of length 1 for the whole call.
    let r = unsafe { libc::poll(&mut p, 1, 0) };
    if r < 0 {
        // EINTR and the like: say readable, the next poll decides.
        return io::Error::last_os_error().kind() == io::ErrorKind::Interrupted;
    }
    r > 0 && p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0
}
