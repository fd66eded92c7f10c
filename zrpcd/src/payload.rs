//! A frame's payload as the broker passes it along.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use zrpc_io::fdpass::{SealedFd, FD_PAYLOAD_MIN};

use crate::quota::Usage;

/// A payload on its way through the broker: borrowed from the read buffer
/// it arrived in, a shared handle to it, or a sealed memfd.
///
/// Frames with small payloads are handled in place in the connection's
/// read buffer (see [`crate::conn`]): their payload is copied into the
/// recipient's output buffer and, if the call stays pending, into the
/// pending slot, so it never needs a reference-counted handle of its own.
/// Large payloads arrive split off as [`Bytes`] and are forwarded by
/// reference, without a copy; or, from a peer that negotiated it, as a
/// sealed memfd ([`FdPayload`]) forwarded without the broker touching the
/// bytes.
#[derive(Debug, Clone, Copy)]
pub enum Payload<'a> {
    /// Bytes the caller keeps (a read buffer, a pending slot).
    Borrowed(&'a [u8]),
    /// A shared handle (a large payload split off the read buffer, an
    /// encoded event).
    Shared(&'a Bytes),
    /// A payload in a sealed memfd.
    Fd(&'a Rc<FdPayload>),
}

impl<'a> Payload<'a> {
    /// No payload.
    pub const EMPTY: Payload<'static> = Payload::Borrowed(&[]);

    /// The payload bytes, if they are in memory (not for [`Payload::Fd`],
    /// whose bytes the broker does not map unless a recipient needs them
    /// inline: see [`Payload::to_bytes`]).
    pub fn bytes(&self) -> Option<&'a [u8]> {
        match *self {
            Payload::Borrowed(b) => Some(b),
            Payload::Shared(b) => Some(b),
            Payload::Fd(_) => None,
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        match *self {
            Payload::Borrowed(b) => b.len(),
            Payload::Shared(b) => b.len(),
            Payload::Fd(f) => f.fd.len(),
        }
    }

    /// True for an empty payload.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// An owned handle: the same buffer for a shared payload, a copy of a
    /// borrowed one, a read-only mapping of a memfd (for a recipient that
    /// takes no descriptors, or the broker's own service). A memfd that
    /// cannot be mapped (the broker out of memory or address space) is an
    /// error.
    pub fn to_bytes(&self) -> std::io::Result<Bytes> {
        match *self {
            Payload::Borrowed(b) => Ok(Bytes::copy_from_slice(b)),
            Payload::Shared(b) => Ok(b.clone()),
            Payload::Fd(f) => f.fd.map(),
        }
    }
}

/// Payload mappings kept in outbound queues now (see [`inline_bytes`]).
static KEPT_MAPPINGS: AtomicUsize = AtomicUsize::new(0);

/// At most how many (`--max-fds`, set by [`set_max_kept_mappings`]).
static MAX_KEPT_MAPPINGS: AtomicUsize = AtomicUsize::new(4096);

/// Sets the most payload mappings kept in outbound queues at once.
pub fn set_max_kept_mappings(n: usize) {
    MAX_KEPT_MAPPINGS.store(n, Ordering::Relaxed);
}

/// How many payload mappings are kept in outbound queues now.
pub fn kept_mappings() -> usize {
    KEPT_MAPPINGS.load(Ordering::Relaxed)
}

/// A memfd payload's bytes for a peer that takes no descriptors.
pub enum Inline {
    /// A read-only mapping, to queue as it is (no copy) and unmap once
    /// written; counted in [`kept_mappings`].
    Kept(Bytes),
    /// A mapping to copy the bytes out of at once (it is unmapped when
    /// dropped).
    Copy(Bytes),
}

/// A kept mapping: counted until dropped.
struct Counted(Bytes);

impl AsRef<[u8]> for Counted {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        KEPT_MAPPINGS.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The bytes of `fd` for a peer that takes no descriptors. A mapping is
/// kept in the peer's queue (the bytes go to the socket without a copy)
/// only for a payload of [`FD_PAYLOAD_MIN`] bytes or more (no honest
/// sender puts less in a memfd) and while fewer than the most mappings are
/// kept; every other payload is copied into the queue and unmapped at once.
/// Mappings escape the descriptor accounting (a mapping outlives its
/// descriptor), and the kernel allows a process about 65,530 of them, past
/// which even the allocator fails: uncounted, a few users answering with
/// small memfds to peers that never read made the broker abort.
pub fn inline_bytes(fd: &SealedFd) -> std::io::Result<Inline> {
    if fd.len() >= FD_PAYLOAD_MIN {
        let max = MAX_KEPT_MAPPINGS.load(Ordering::Relaxed);
        if KEPT_MAPPINGS.fetch_add(1, Ordering::Relaxed) < max {
            return match fd.map() {
                Ok(m) => Ok(Inline::Kept(Bytes::from_owner(Counted(m)))),
                Err(e) => {
                    KEPT_MAPPINGS.fetch_sub(1, Ordering::Relaxed);
                    Err(e)
                }
            };
        }
        KEPT_MAPPINGS.fetch_sub(1, Ordering::Relaxed);
    }
    fd.map().map(Inline::Copy)
}

impl<'a> From<&'a Bytes> for Payload<'a> {
    fn from(b: &'a Bytes) -> Self {
        Payload::Shared(b)
    }
}

/// A payload received in a sealed memfd (verified: see
/// [`SealedFd::verify`]), counted against its sender's connection, its
/// sender's user and the broker-wide limit for as long as the broker holds
/// it (a pending call keeps it for re-delivery).
#[derive(Debug)]
pub struct FdPayload {
    /// The descriptor, shared with the outbound queues it is sent from.
    pub fd: Arc<SealedFd>,
    _hold: FdHold,
}

impl FdPayload {
    /// Takes `fd` under `hold`.
    pub fn new(fd: SealedFd, hold: FdHold) -> FdPayload {
        FdPayload {
            fd: Arc::new(fd),
            _hold: hold,
        }
    }
}

/// One descriptor counted in the counters it was charged to; released when
/// dropped.
#[derive(Debug)]
pub struct FdHold {
    conn: Rc<Cell<usize>>,
    user: Rc<Usage>,
    total: Rc<Cell<usize>>,
}

impl FdHold {
    /// Counts one descriptor in each counter.
    pub fn new(conn: Rc<Cell<usize>>, user: Rc<Usage>, total: Rc<Cell<usize>>) -> FdHold {
        conn.set(conn.get() + 1);
        user.hold_fd(true);
        total.set(total.get() + 1);
        FdHold { conn, user, total }
    }
}

impl Drop for FdHold {
    fn drop(&mut self) {
        self.conn.set(self.conn.get().saturating_sub(1));
        self.user.hold_fd(false);
        self.total.set(self.total.get().saturating_sub(1));
    }
}
