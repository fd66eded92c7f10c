//! Closing, off the event loop, descriptors a peer sent that are not
//! memfds.
//!
//! A payload descriptor must be a sealed memfd (docs/protocol.md), and
//! closing a memfd never waits. Closing other files can: the last close of
//! a TCP socket with `SO_LINGER` and unacknowledged data waits up to the
//! linger time, and every close of a file on a FUSE mount waits for its
//! daemon's answer to `FLUSH` (forever, if a hostile user's daemon never
//! answers: the wait cannot be interrupted). A peer that passes the broker
//! such a descriptor would stall its only thread: every user's calls would
//! stop. So every received descriptor that is not a memfd is handed, as
//! soon as it is read, to a closing thread, which closes it, a socket's
//! linger turned off first (an abortive close, which does not wait). The
//! connection that sent it gets `Fatal{Protocol}` if it negotiated
//! descriptors (and its descriptors are closed unread if not).
//!
//! A close that never returns keeps its descriptor, and every one queued
//! behind it, open in the broker. So each uid has a closing thread of its
//! own, started when it has descriptors to close and ending when it has
//! none (one user's stuck close delays no other user's), and the
//! descriptors waiting for their close are counted per uid and in all
//! ([`waiting`]): the broker counts them in the sender's `fds` quota and
//! in `--max-fds`, and refuses a user whose waiting descriptors fill its
//! quota (`crate::broker::Broker::over_closing_limits`). The threads are as
//! many as the uids with descriptors waiting, each of which counts in
//! `--max-fds`. A thread that cannot be started (no task left to zrpcd) is
//! tried again with the uid's next descriptor and periodically
//! ([`start_stalled`]), its descriptors queued and counted meanwhile.

use std::collections::{BTreeMap, VecDeque};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Mutex, MutexGuard};

use zrpc_io::fdpass::FdQueue;

/// Stack of a closing thread: it only calls setsockopt and close.
const CLOSER_STACK: usize = 64 * 1024;

/// One uid's descriptors waiting for their close.
#[derive(Debug, Default)]
struct Queue {
    /// Not yet taken by the uid's closing thread.
    fds: VecDeque<OwnedFd>,
    /// `fds` and the one being closed, if any.
    waiting: usize,
    /// Whether the uid's closing thread runs (it takes every descriptor
    /// pushed while it does).
    running: bool,
    /// Whether starting that thread failed, and no try since succeeded
    /// (logged once).
    stalled: bool,
}

/// Every uid's queue (a uid is in the map while it has descriptors
/// waiting), and their total.
#[derive(Debug)]
struct Closing {
    by_uid: BTreeMap<u32, Queue>,
    total: usize,
}

static CLOSING: Mutex<Closing> = Mutex::new(Closing {
    by_uid: BTreeMap::new(),
    total: 0,
});

/// The closing state (held briefly, never across a close).
fn closing() -> MutexGuard<'static, Closing> {
    CLOSING.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether `fd` is a memfd (`F_GET_SEALS` fails on anything else).
fn is_memfd(fd: &OwnedFd) -> bool {
    // SAFETY: fcntl(F_GET_SEALS) on an open descriptor only reads its
    // seals.
    unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) >= 0 }
}

/// Moves every descriptor of `fds[from..]` that is not a memfd to the
/// closing thread of `uid`, the uid that sent them, keeping the others in
/// order; returns how many it moved.
pub fn sort_out(fds: &mut FdQueue, from: usize, uid: u32) -> usize {
    if fds.len() <= from || fds.iter().skip(from).all(is_memfd) {
        return 0;
    }
    let fresh: Vec<OwnedFd> = fds.drain(from..).collect();
    let mut moved = 0;
    for fd in fresh {
        if is_memfd(&fd) {
            fds.push_back(fd);
        } else {
            close_later(uid, fd);
            moved += 1;
        }
    }
    moved
}

/// Descriptors sent by `uid` that wait for their close (queued or being
/// closed), and those of every uid: `(uid's, all)`.
pub fn waiting(uid: u32) -> (usize, usize) {
    let c = closing();
    (c.by_uid.get(&uid).map_or(0, |q| q.waiting), c.total)
}

/// Closes `fd`, sent by `uid`, on the closing thread of `uid` (started if
/// it is not running). Never closes it here: if no thread can be started,
/// it waits, counted, for the next try ([`start_stalled`], or the uid's
/// next descriptor).
pub fn close_later(uid: u32, fd: OwnedFd) {
    let mut c = closing();
    c.total += 1;
    let q = c.by_uid.entry(uid).or_default();
    q.waiting += 1;
    q.fds.push_back(fd);
    start(uid, q);
}

/// Tries again to start the closing threads that could not be started
/// (the broker calls it periodically): their descriptors are closed, and
/// their count released, once threads can start again, whether or not
/// their users send more (one refused at its quota cannot).
pub fn start_stalled() {
    let mut c = closing();
    for (uid, q) in c.by_uid.iter_mut() {
        start(*uid, q);
    }
}

/// Starts the closing thread of `uid`, whose queue is `q`, unless it runs
/// or has nothing to close; called with the closing state locked (the
/// thread waits for it).
fn start(uid: u32, q: &mut Queue) {
    if q.running || q.fds.is_empty() {
        return;
    }
    let started = std::thread::Builder::new()
        .name(format!("zrpcd-closer-{uid}"))
        .stack_size(CLOSER_STACK)
        .spawn(move || close_all(uid));
    match started {
        Ok(_) => {
            if std::mem::take(&mut q.stalled) {
                tracing::info!(
                    uid,
                    waiting = q.waiting,
                    "a descriptor-closing thread started at last"
                );
            }
            q.running = true;
        }
        Err(e) => {
            if !std::mem::replace(&mut q.stalled, true) {
                tracing::warn!(
                    uid,
                    error = %e,
                    waiting = q.waiting,
                    "cannot start a descriptor-closing thread; its descriptors wait, counted, for the next try"
                );
            }
        }
    }
}

/// The closing thread of `uid`: closes its descriptors in order until
/// none is left, then ends (the uid leaves the map under the same lock,
/// so a descriptor pushed later starts a new thread).
fn close_all(uid: u32) {
    let mut c = closing();
    loop {
        let next = c.by_uid.get_mut(&uid).and_then(|q| q.fds.pop_front());
        let Some(fd) = next else {
            c.by_uid.remove(&uid);
            return;
        };
        drop(c);
        close_now(fd);
        c = closing();
        c.total -= 1;
        if let Some(q) = c.by_uid.get_mut(&uid) {
            q.waiting -= 1;
        }
    }
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

    /// A uid no other test of this process uses (the closing state is
    /// process-wide).
    const UID: u32 = 4_000_000_001;

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
        assert_eq!(sort_out(&mut fds, 1, UID), 2);
        assert_eq!(fds.len(), 2);
        assert!(fds.iter().all(is_memfd));
        assert_eq!(sort_out(&mut fds, 0, UID), 0);
        // Both closed, on the uid's thread, which then ends: nothing of
        // the uid is left waiting.
        let start = std::time::Instant::now();
        while waiting(UID).0 != 0 || closing().by_uid.contains_key(&UID) {
            assert!(
                start.elapsed() < std::time::Duration::from_secs(20),
                "descriptors still waiting for their close"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}
