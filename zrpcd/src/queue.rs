//! Per-peer outbound queue. Frames are appended by the routing code; the
//! queue is written with one vectored write, straight to the non-blocking
//! socket, by whoever flushes it: the broker's flusher task once per
//! wake-up, or the routing code at once for a burst or a large payload (see
//! [`crate::outbox`] for when). Only when a socket is full does the peer's
//! writer task ([`crate::conn`]) take over and wait for it to become
//! writable.

use std::cell::{Cell, RefCell};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::rc::Rc;

use bytes::Bytes;

use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;
use zrpc_proto::{encode_fd_header, encode_header, Envelope};

use crate::payload::{Inline, Payload};

/// Payloads at least this large are queued as their own slice (forwarded as
/// the very bytes they arrived in) instead of being copied.
pub const ZERO_COPY_MIN: usize = 8 * 1024;

/// A peer is written as soon as one read batch has queued this many frames
/// to it, without waiting for the end of the broker's wake-up: the peer
/// starts on the first frames of a burst while the broker routes the rest.
/// Frames that arrive in smaller numbers per read batch (16 clients with a
/// few calls each) are written once per wake-up, after every connection
/// that was readable has been read (one write, so one wake-up of the peer,
/// per wake-up of the broker). 8, 24, 32 and 64 were measured; 16 was best
/// (docs/performance.md).
pub const FLUSH_EVERY_FRAMES: u32 = 16;

/// Frames waiting to be written to one peer: a [`zrpc_io::OutQueue`]
/// (small frames copied into one buffer, large payloads by reference), with
/// the broker's bookkeeping around it: how many frames each read batch
/// queued (for [`FLUSH_EVERY_FRAMES`]), and the bytes queued counted in the
/// peer's user's account.
#[derive(Debug, Default)]
pub struct OutQueue {
    q: zrpc_io::OutQueue,
    /// Bytes as last counted in the user's account.
    bytes: usize,
    /// Frames pushed by read batch `batch` since the queue was last
    /// written out completely.
    frames: u32,
    /// The read batch that pushed the last frame (`Broker::begin_batch`).
    batch: u32,
    /// Frames pushed since the queue was last written out completely.
    queued: u32,
    /// The peer's user, whose `queued_bytes` this queue's bytes count in.
    user: Option<Rc<crate::quota::Usage>>,
    /// Descriptors queued or in flight, as last counted in the accounts.
    fds: usize,
    /// Descriptors in flight, as last counted in the accounts.
    in_flight: usize,
    /// The broker's counts of payload descriptors, which the descriptors
    /// queued here, and those sent and not yet received, count in.
    accounts: Option<Rc<FdAccounts>>,
}

/// The broker's counts and limits of payload descriptors, shared with
/// every outbound queue.
///
/// A descriptor the broker has sent stays in the peer's socket until the
/// peer reads the bytes it came with (or closes its end), and the kernel
/// charges it meanwhile to the broker's uid: past its `RLIMIT_NOFILE`
/// of them, every `sendmsg` with descriptors fails (`ETOOMANYREFS`). So
/// descriptors in flight count like queued ones: in the connection's
/// count (`--max-fds-per-conn`), its user's (`fds` of the quota) and the
/// total (`--max-fds`), until the peer has read them
/// ([`OutQueue::release_received`]), even after the connection closed
/// (`crate::broker::Broker::linger`).
#[derive(Debug, Default)]
pub struct FdAccounts {
    /// Payload descriptors the broker holds, queued and in flight ones
    /// included (`--max-fds` bounds it).
    pub total: Rc<Cell<usize>>,
    /// Of those, sent and not yet received.
    pub in_flight: Cell<usize>,
    /// `--max-fds-per-conn`.
    pub per_conn: usize,
    /// `fds` of the quota (the policy's, reloaded with it).
    pub per_user: Cell<usize>,
    /// `--max-fds`.
    pub max_total: usize,
}

impl Drop for OutQueue {
    fn drop(&mut self) {
        // Frames never written (a closed connection) leave the account,
        // and so does the socket (the queue lives as long as it).
        self.set_bytes(0);
        self.fds = self.set_fds(0);
        self.set_in_flight(0);
        if let Some(u) = &self.user {
            u.release_connection();
        }
    }
}

impl OutQueue {
    /// Appends a frame. Small payloads are copied next to their header so a
    /// burst of small frames becomes one contiguous buffer; large payloads
    /// are queued by reference.
    ///
    /// A payload in a memfd goes as the descriptor if the peer takes
    /// descriptors (`fds`: its socket), within the limits
    /// ([`FdAccounts`]), else inline, through a read-only mapping of
    /// it (the broker still copies nothing itself). A memfd that cannot be
    /// mapped is an error (nothing is queued).
    pub fn push(
        &mut self,
        env: &Envelope<'_>,
        payload: Payload<'_>,
        batch: u32,
        fds: Option<&UnixStream>,
    ) -> std::io::Result<()> {
        let payload = match payload {
            Payload::Fd(f) if fds.is_some_and(|sock| self.fd_room(sock)) => {
                self.q.push_fd(f.fd.clone());
                encode_fd_header(self.q.tail(), env);
                self.count_frame(batch);
                self.set_bytes(self.q.len());
                self.recount();
                return Ok(());
            }
            Payload::Fd(f) => {
                // Its bytes, inline (see `inline_bytes`: a mapping is kept
                // only for a large payload, and only so many of them).
                let inline = crate::payload::inline_bytes(&f.fd)?;
                self.count_frame(batch);
                encode_header(self.q.tail(), env, f.fd.len());
                match inline {
                    Inline::Kept(b) => self.q.push_shared(b),
                    Inline::Copy(b) => self.q.push_copy(&b),
                }
                self.set_bytes(self.q.len());
                return Ok(());
            }
            other => other,
        };
        self.count_frame(batch);
        encode_header(self.q.tail(), env, payload.len());
        match payload {
            Payload::Shared(b) if b.len() >= ZERO_COPY_MIN => self.q.push_shared(b.clone()),
            Payload::Shared(b) => self.q.push_copy(b),
            Payload::Borrowed(b) => self.q.push_copy(b),
            Payload::Fd(_) => unreachable!("queued above"),
        }
        self.set_bytes(self.q.len());
        Ok(())
    }

    /// One more frame queued by read batch `batch`.
    fn count_frame(&mut self, batch: u32) {
        if self.batch != batch {
            self.batch = batch;
            self.frames = 0;
        }
        self.frames += 1;
        self.queued += 1;
    }

    /// Counts this queue's descriptors in the broker's `accounts` from now
    /// on, those in flight included.
    pub fn set_fd_accounts(&mut self, accounts: Rc<FdAccounts>) {
        self.q.track_sent_fds();
        self.accounts = Some(accounts);
    }

    /// Whether one more descriptor may be queued here: within
    /// `--max-fds-per-conn` for this connection, the `fds` quota of its
    /// user and `--max-fds`, descriptors queued and in flight counted.
    /// Past them, a payload in a memfd goes inline (any peer takes that):
    /// a peer that does not read cannot make the broker hold more
    /// descriptors in its socket than its share.
    /// Those in flight are counted as of now, through `sock` (the peer
    /// may have read since the last write).
    fn fd_room(&mut self, sock: &UnixStream) -> bool {
        self.release_received(sock);
        let Some(a) = &self.accounts else {
            return true;
        };
        if self.fds >= a.per_conn || a.total.get() > a.max_total {
            return false;
        }
        match &self.user {
            Some(u) if u.limited() => u.queued_fds() < a.per_user.get(),
            _ => true,
        }
    }

    /// Moves the count of queued descriptors in the broker's total and the
    /// peer's user's account from `self.fds` to `n`; returns `n`.
    fn set_fds(&self, n: usize) -> usize {
        if let Some(a) = &self.accounts {
            let t = &a.total;
            t.set(t.get().saturating_sub(self.fds) + n);
        }
        if let Some(u) = &self.user {
            u.requeue_fds(self.fds, n);
        }
        n
    }

    /// Moves the count of descriptors in flight in the broker's accounts
    /// from `self.in_flight` to `n`.
    fn set_in_flight(&mut self, n: usize) {
        if let Some(a) = &self.accounts {
            let f = &a.in_flight;
            f.set(f.get().saturating_sub(self.in_flight) + n);
        }
        self.in_flight = n;
    }

    /// Counts again the descriptors queued and in flight.
    fn recount(&mut self) {
        self.fds = self.set_fds(self.q.fds_queued() + self.q.fds_in_flight());
        self.set_in_flight(self.q.fds_in_flight());
    }

    /// Descriptors queued and not yet sent, or sent and not yet received
    /// by the peer (as last seen).
    pub fn fds_queued(&self) -> usize {
        self.fds
    }

    /// Descriptors sent and not yet received by the peer (as last seen).
    pub fn fds_in_flight(&self) -> usize {
        self.in_flight
    }

    /// Asks the kernel what the peer has read of what was sent on `wr`
    /// and stops counting the descriptors it has received (or that were
    /// discarded with its end of the socket). Costs a system call, only
    /// while descriptors are in flight.
    pub fn release_received(&mut self, wr: &UnixStream) {
        if self.q.fds_in_flight() == 0 {
            return;
        }
        // A socket that cannot say (it cannot fail on an open socket)
        // keeps its count: never released early.
        if let Ok(unread) = zrpc_io::fdpass::unread_sent(wr.as_raw_fd()) {
            self.q.release_received(unread);
            self.recount();
        }
    }

    /// Drops the frames not written (the connection is closed); the
    /// descriptors in flight stay counted.
    pub fn clear_unsent(&mut self) {
        self.q.clear_unsent();
        self.written_out();
        self.recount();
    }

    /// Counts this queue's bytes, and its socket, in `user`'s account from
    /// now on (once per queue).
    pub fn set_user(&mut self, user: Rc<crate::quota::Usage>) {
        debug_assert!(self.user.is_none(), "a queue's user set twice");
        user.charge_connection();
        user.requeue(0, self.bytes);
        user.requeue_fds(0, self.fds);
        self.user = Some(user);
    }

    fn set_bytes(&mut self, bytes: usize) {
        if let Some(u) = &self.user {
            u.requeue(self.bytes, bytes);
        }
        self.bytes = bytes;
    }

    /// Bytes queued and not yet handed to the writer.
    pub fn len_bytes(&self) -> usize {
        self.bytes
    }

    /// Takes everything queued, in order, into `out` (what a write would
    /// send); used by benchmarks and tests that have no socket.
    pub fn take_into(&mut self, out: &mut Vec<Bytes>) {
        self.q.take_into(out);
        self.written_out();
    }

    /// Frames queued and not written yet.
    pub fn queued_frames(&self) -> u32 {
        self.queued
    }

    /// True if nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.q.is_empty()
    }

    /// Writes as much as the socket accepts without blocking. Returns
    /// `Ok(true)` once everything is written, `Ok(false)` if the socket is
    /// full.
    pub fn write_now(&mut self, wr: &UnixStream) -> std::io::Result<bool> {
        let mut done = self.q.write_now(wr.as_raw_fd());
        if matches!(&done, Err(e) if e.raw_os_error() == Some(libc::ETOOMANYREFS)) {
            // The broker's uid has too many descriptors in flight in all
            // (its RLIMIT_NOFILE): not this peer's doing, which must not
            // lose its connection for it. Its payloads go inline instead.
            done = match self.q.inline_fds() {
                Ok(n) => {
                    warn_too_many_refs(n);
                    self.q.write_now(wr.as_raw_fd())
                }
                Err(e) => Err(e),
            };
        }
        if self.q.fds_in_flight() > 0 {
            if let Ok(unread) = zrpc_io::fdpass::unread_sent(wr.as_raw_fd()) {
                self.q.release_received(unread);
            }
            self.recount();
        } else if self.fds != self.q.fds_queued() {
            self.recount();
        }
        if let Ok(true) = done {
            self.written_out();
            // Give back memory from a burst (small idle connections).
            self.q.shrink(256 * 1024);
        } else {
            self.set_bytes(self.q.len());
        }
        done
    }

    /// Everything queued was handed on.
    fn written_out(&mut self) {
        self.set_bytes(0);
        self.frames = 0;
        self.queued = 0;
    }
}

/// The part of a peer its writer task shares with the routing code.
#[derive(Debug)]
pub struct PeerIo {
    /// Frames to write.
    pub queue: RefCell<OutQueue>,
    /// The socket, non-blocking, written to directly. It is not registered
    /// with the event loop for writability: edge-triggered `EPOLLOUT` would
    /// wake the broker each time a peer reads, for nothing. Only when the
    /// socket is full does the writer task wait for writability (through a
    /// registration of its own).
    pub sock: Rc<AsyncFd<UnixStream>>,
    /// Wakes the writer task (socket full, or closing).
    pub notify: Notify,
    /// Set while the writer task owns the flushing (the socket was full).
    pub writer_busy: Cell<bool>,
    /// Set when the connection is to be closed once the queue is flushed.
    pub closed: Cell<bool>,
    /// Set while the peer is on the broker's list of writers to flush.
    pub dirty: Cell<bool>,
    /// Wakes the reader to make it stop (the broker dropped the peer).
    pub kill: Notify,
    /// The peer takes payloads in descriptors (negotiated in `Hello`).
    pub fds: Cell<bool>,
}

impl PeerIo {
    /// Shared state around a connection's write half.
    pub fn new(sock: Rc<AsyncFd<UnixStream>>) -> Self {
        PeerIo {
            queue: RefCell::default(),
            sock,
            notify: Notify::new(),
            writer_busy: Cell::new(false),
            closed: Cell::new(false),
            dirty: Cell::new(false),
            kill: Notify::new(),
            fds: Cell::new(false),
        }
    }

    /// Queues a frame for read batch `batch` (the broker flushes it at the
    /// end of its wake-up). Returns true once that batch has queued
    /// [`FLUSH_EVERY_FRAMES`] frames: time to write them out. A payload
    /// in a memfd that cannot be mapped for a peer that takes no
    /// descriptors closes the connection (it cannot be given the frame).
    ///
    /// Nothing is queued once the connection is closing: its `Fatal` went
    /// last, and frames routed to it until it is torn down (a peer that
    /// keeps answering its calls meanwhile) would only hold the broker's
    /// memory and descriptors.
    pub fn push(&self, env: &Envelope<'_>, payload: Payload<'_>, batch: u32) -> bool {
        if self.closed.get() {
            return false;
        }
        let mut q = self.queue.borrow_mut();
        let fds = self.fds.get().then(|| self.sock.get_ref());
        if let Err(e) = q.push(env, payload, batch, fds) {
            warn_unmappable(&e);
            drop(q);
            self.close();
            return false;
        }
        q.frames >= FLUSH_EVERY_FRAMES
    }

    /// Writes what is queued now if the socket takes it; otherwise hands
    /// the rest to the writer task.
    pub fn flush(&self) {
        if self.writer_busy.get() || self.closed.get() {
            // The writer task is waiting for the socket, or the connection
            // is closing and the writer task writes what is left (bounded):
            // either way it flushes, not us. (A peer whose writes fail is
            // closed, so routing to it costs no failing write per frame.)
            return;
        }
        let result = self.queue.borrow_mut().write_now(self.sock.get_ref());
        match result {
            Ok(true) => {}
            Ok(false) => {
                self.writer_busy.set(true);
                self.notify.notify_one();
            }
            Err(e) => {
                tracing::debug!(error = %e, "write failed");
                self.close();
            }
        }
    }

    /// Shuts down the write side: the peer sees end of stream.
    pub fn shutdown_write(&self) {
        let fd = self.sock.get_ref().as_raw_fd();
        // SAFETY: shutdown(2) on a socket this struct keeps open.
        unsafe {
            libc::shutdown(fd, libc::SHUT_WR);
        }
    }

    /// Asks the writer to flush what is queued and close, and the reader to
    /// stop reading.
    pub fn close(&self) {
        if !self.closed.replace(true) {
            self.notify.notify_one();
            self.kill.notify_one();
        }
    }
}

thread_local! {
    /// When `ETOOMANYREFS` was last logged at warn, and how many times it
    /// was logged at debug only since.
    static TOO_MANY_REFS: RefCell<crate::log::RefusalLog> =
        RefCell::new(crate::log::RefusalLog::default());
}

thread_local! {
    /// The same for payload memfds that could not be mapped for a peer.
    static UNMAPPABLE: RefCell<crate::log::RefusalLog> =
        RefCell::new(crate::log::RefusalLog::default());
}

/// Logs that a payload memfd could not be mapped for a peer that takes no
/// descriptors (which is closed), at warn at most once per
/// `--warn-interval`: a peer could cause it again and again.
fn warn_unmappable(e: &dyn std::fmt::Display) {
    let warn = UNMAPPABLE.with(|log| log.borrow_mut().warn_now(std::time::Instant::now()));
    match warn {
        None => {
            tracing::debug!(error = %e, "cannot map a payload memfd for a peer without descriptor passing; closing it")
        }
        Some(quiet) => tracing::warn!(
            error = %e,
            since_last_warning = quiet,
            "cannot map a payload memfd for a peer without descriptor passing; closing it (later occurrences within --warn-interval at debug level)"
        ),
    }
}

/// Logs that `n` payloads went inline because the kernel refused to pass
/// more descriptors (`ETOOMANYREFS`), at warn at most once per
/// `--warn-interval`.
fn warn_too_many_refs(n: usize) {
    let warn = TOO_MANY_REFS.with(|log| log.borrow_mut().warn_now(std::time::Instant::now()));
    match warn {
        None => {
            tracing::debug!(
                frames = n,
                "cannot pass descriptors (ETOOMANYREFS); sending their payloads inline"
            );
        }
        Some(quiet) => {
            tracing::warn!(
                frames = n,
                since_last_warning = quiet,
                "cannot pass descriptors: the kernel counts too many sent by zrpcd's uid and not yet received (ETOOMANYREFS, RLIMIT_NOFILE); sending their payloads inline (later occurrences within --warn-interval at debug level)"
            );
        }
    }
}
