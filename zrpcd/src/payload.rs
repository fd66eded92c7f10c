//! A frame's payload as the broker passes it along.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;
use zrpc_io::fdpass::SealedFd;

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
