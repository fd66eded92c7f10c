//! The outbound queue of one socket: the one writer of zrpc.
//!
//! Frames are appended in order: small ones are copied into a contiguous
//! tail (a burst of small frames becomes one buffer), large payloads are
//! queued by reference (forwarded as the very bytes they arrived in). The
//! queue is written with vectored, non-blocking `sendmsg` calls that may
//! write part of it; what is written leaves the queue, the rest stays in
//! order. [`flush`] writes a queue out on a socket registered with tokio,
//! waiting for writability (through a registration of its own) only while
//! the socket is full; [`write_all_blocking`] does the same on a blocking
//! socket.
//!
//! Writes use `MSG_NOSIGNAL`: a peer gone away is an error, never a
//! `SIGPIPE`, even in a host process that does not ignore the signal.

use std::collections::VecDeque;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::Interest;

use crate::fdpass::{send_with_fds, SealedFd, MAX_FDS_PER_MSG};
use crate::reactor::{register_dup, Registered};

/// Most slices handed to one `sendmsg`.
pub const MAX_IOVECS: usize = 64;

/// Bytes waiting to be written to one socket, in order: `chunks` first,
/// then `tail`.
#[derive(Debug, Default)]
pub struct OutQueue {
    /// Written first: earlier tails and large payloads, by reference.
    chunks: VecDeque<Bytes>,
    /// Bytes in `chunks`.
    chunk_bytes: usize,
    /// Small frames, appended in order after `chunks`.
    tail: BytesMut,
    /// Descriptors to send, each with the stream position (see `written`)
    /// of the first byte of its frame: it is attached to the `sendmsg`
    /// that starts at or before that byte ([`crate::fdpass`]).
    fds: VecDeque<(u64, Arc<SealedFd>)>,
    /// Stream position of the first queued byte (wrapping; positions are
    /// compared as offsets from it).
    written: u64,
    /// Descriptors sent that the peer may not have received yet, oldest
    /// first: the stream position of the first byte of the `sendmsg` that
    /// carried them, and how many it carried. Kept only once
    /// [`OutQueue::track_sent_fds`] was called.
    sent_fds: VecDeque<(u64, usize)>,
    /// Descriptors in `sent_fds`.
    in_flight: usize,
    /// Whether `sent_fds` is kept.
    track: bool,
    /// Bytes written off the front chunk, and off the tail, since each
    /// was last allocated: they stay allocated with it until it goes (see
    /// [`COMPACT_MIN`]).
    chunk_written: usize,
    tail_written: usize,
}

/// A chunk the queue alone holds, or the tail, whose written front has
/// passed both this and three times what is left of it is moved into an
/// allocation of its own size: the written bytes of a `Bytes` or
/// `BytesMut` stay allocated with the rest, and a peer that reads all but
/// a little of a large backlog made the broker keep megabytes per
/// connection while its queued bytes (what quotas count) were a few KiB.
/// So what a queue keeps allocated is at most four times what it counts,
/// plus this. A move copies a third of what was written since the last
/// one at most (a large payload written in many partial writes is copied
/// about a quarter over); a chunk someone else also holds (a payload a
/// pending call keeps for re-delivery, a caller's own `Bytes`) is not
/// moved: that would free nothing.
pub const COMPACT_MIN: usize = 16 * 1024;

/// Whether a buffer of which `written` bytes are written and `left` are
/// not is to be moved (see [`COMPACT_MIN`]).
fn worth_moving(written: usize, left: usize) -> bool {
    written > COMPACT_MIN && written / 3 > left
}

impl OutQueue {
    /// An empty queue whose tail starts with `capacity` bytes.
    pub fn with_capacity(capacity: usize) -> OutQueue {
        OutQueue {
            tail: BytesMut::with_capacity(capacity),
            ..OutQueue::default()
        }
    }

    /// Bytes queued.
    pub fn len(&self) -> usize {
        self.chunk_bytes + self.tail.len()
    }

    /// True if nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.chunk_bytes == 0 && self.tail.is_empty()
    }

    /// The tail, to encode small frames straight into (they are written
    /// after everything queued before).
    pub fn tail(&mut self) -> &mut BytesMut {
        &mut self.tail
    }

    /// Appends `b` by copying it into the tail.
    #[inline]
    pub fn push_copy(&mut self, b: &[u8]) {
        self.tail.extend_from_slice(b);
    }

    /// Appends `b` by reference (no copy): what the tail holds so far is
    /// sealed into a chunk first, to keep the order.
    pub fn push_shared(&mut self, b: Bytes) {
        if b.is_empty() {
            return;
        }
        self.seal();
        self.chunk_bytes += b.len();
        self.chunks.push_back(b);
    }

    /// Appends `b`: by reference if it is at least `share_min` bytes long,
    /// else by copy.
    #[inline]
    pub fn push(&mut self, b: &Bytes, share_min: usize) {
        if b.is_empty() {
            return;
        }
        if b.len() >= share_min {
            self.push_shared(b.clone());
        } else {
            self.push_copy(b);
        }
    }

    /// Attaches `fd` to the frame whose first byte is queued next: call it
    /// right before queuing that frame's header. The queue keeps `fd` open
    /// until it is sent.
    pub fn push_fd(&mut self, fd: Arc<SealedFd>) {
        let at = self.written.wrapping_add(self.len() as u64);
        self.fds.push_back((at, fd));
    }

    /// Descriptors queued and not yet sent.
    pub fn fds_queued(&self) -> usize {
        self.fds.len()
    }

    /// Keeps count, from now on, of the descriptors sent and not yet
    /// received ([`OutQueue::fds_in_flight`], released by
    /// [`OutQueue::release_received`]).
    pub fn track_sent_fds(&mut self) {
        self.track = true;
    }

    /// Descriptors sent that the peer may not have received yet (if
    /// [`OutQueue::track_sent_fds`] was called): they stay in the socket,
    /// charged to the sender's user by the kernel, until the peer reads
    /// the bytes they came with or closes its end.
    pub fn fds_in_flight(&self) -> usize {
        self.in_flight
    }

    /// Forgets the descriptors sent that the peer has received, given
    /// `unread`, at least as many bytes as the peer has not read yet (for a
    /// Unix socket, `SIOCOUTQ`: the memory of the messages not read whole,
    /// which is never less than their unread bytes). A message is read
    /// (its descriptors received, or discarded by the kernel) once fewer
    /// than the bytes from its start to the end of what was written are
    /// unread. Returns how many were forgotten.
    pub fn release_received(&mut self, unread: usize) -> usize {
        let mut released = 0;
        while let Some(&(at, n)) = self.sent_fds.front() {
            let since = self.written.wrapping_sub(at);
            if unread as u64 >= since {
                break;
            }
            self.sent_fds.pop_front();
            released += n;
        }
        self.in_flight -= released;
        released
    }

    /// Drops everything queued and not yet written (the connection is
    /// closed), keeping the count of the descriptors in flight.
    pub fn clear_unsent(&mut self) {
        self.chunks.clear();
        self.chunk_bytes = 0;
        self.tail = BytesMut::new();
        self.fds.clear();
        (self.chunk_written, self.tail_written) = (0, 0);
    }

    /// Rewrites the frames of every queued descriptor to carry its payload
    /// inline instead (read through a read-only mapping of the memfd), and
    /// closes the queue's copies of the descriptors: for when descriptors
    /// cannot be sent (`ETOOMANYREFS`). Any peer takes inline payloads.
    /// Returns how many frames were rewritten; a memfd that cannot be
    /// mapped is an error, and then nothing changed.
    pub fn inline_fds(&mut self) -> io::Result<usize> {
        if self.fds.is_empty() {
            return Ok(0);
        }
        let payloads = self
            .fds
            .iter()
            .map(|(_, f)| f.map())
            .collect::<io::Result<Vec<Bytes>>>()?;
        self.seal();
        let mut old = std::mem::take(&mut self.chunks);
        let mut out = VecDeque::with_capacity(old.len() + 3 * payloads.len());
        // Moves the next `n` bytes of `old` to `out`, as they are.
        let take = |old: &mut VecDeque<Bytes>, out: &mut VecDeque<Bytes>, mut n: usize| {
            while n > 0 {
                let Some(c) = old.front_mut() else { return };
                if c.len() <= n {
                    n -= c.len();
                    out.extend(old.pop_front());
                } else {
                    out.push_back(c.split_to(n));
                    n = 0;
                }
            }
        };
        let mut pos = 0usize;
        let count = payloads.len();
        for ((at, _), payload) in self.fds.drain(..).zip(payloads) {
            let start = at.wrapping_sub(self.written) as usize;
            take(&mut old, &mut out, start - pos);
            // The frame's header: body length (= envelope length) and
            // envelope length with the descriptor flag.
            let mut h = [0u8; 8];
            let mut got = 0;
            while got < 8 {
                let Some(c) = old.front_mut() else { break };
                let k = (8 - got).min(c.len());
                h[got..got + k].copy_from_slice(&c[..k]);
                c.advance(k);
                if c.is_empty() {
                    old.pop_front();
                }
                got += k;
            }
            let env_len =
                u32::from_be_bytes([h[4], h[5], h[6], h[7]]) & !zrpc_proto::FD_PAYLOAD_FLAG;
            let body = env_len as usize + payload.len();
            let mut header = BytesMut::with_capacity(8);
            header.extend_from_slice(&(body as u32).to_be_bytes());
            header.extend_from_slice(&env_len.to_be_bytes());
            out.push_back(header.freeze());
            take(&mut old, &mut out, env_len as usize);
            out.push_back(payload);
            pos = start + 8 + env_len as usize;
        }
        out.extend(old);
        self.chunk_bytes = out.iter().map(|c| c.len()).sum();
        self.chunks = out;
        self.chunk_written = 0;
        Ok(count)
    }

    /// Puts `b` before everything queued (the unwritten rest of a frame
    /// written directly, outside the queue).
    pub fn push_front(&mut self, b: Bytes) {
        if !b.is_empty() {
            self.written = self.written.wrapping_sub(b.len() as u64);
            self.chunk_bytes += b.len();
            self.chunks.push_front(b);
            self.chunk_written = 0;
        }
    }

    /// Moves the tail into `chunks`. A large one takes its allocation with
    /// it, and the next small frame starts a new tail (split off it, the
    /// tail's spare room would keep the whole allocation alive however
    /// much of the chunk is written); a small one is split off, keeping
    /// the rest of its room for the next frames. A tail mostly written
    /// already is moved first.
    fn seal(&mut self) {
        if !self.tail.is_empty() {
            self.compact_tail();
            let t = if self.tail.capacity() <= COMPACT_MIN {
                self.tail.split().freeze()
            } else {
                std::mem::take(&mut self.tail).freeze()
            };
            self.tail_written = 0;
            if self.chunks.is_empty() {
                self.chunk_written = 0;
            }
            self.chunk_bytes += t.len();
            self.chunks.push_back(t);
        }
    }

    /// Moves what is left of the tail into an allocation of its own size
    /// if most of it is written (see [`COMPACT_MIN`]).
    fn compact_tail(&mut self) {
        if worth_moving(self.tail_written, self.tail.len()) {
            self.tail = BytesMut::from(&self.tail[..]);
            self.tail_written = 0;
        }
    }

    /// Takes everything queued, in order, into `out` (what a write would
    /// send); for code that has no socket (benchmarks, tests).
    pub fn take_into(&mut self, out: &mut Vec<Bytes>) {
        self.seal();
        self.written = self.written.wrapping_add(self.chunk_bytes as u64);
        self.fds.clear();
        out.extend(self.chunks.drain(..));
        self.chunk_bytes = 0;
        self.chunk_written = 0;
    }

    /// Gives back the tail's memory if it grew beyond `keep` bytes (after a
    /// burst) and nothing is queued.
    pub fn shrink(&mut self, keep: usize) {
        if self.is_empty() && self.tail.capacity() > keep {
            self.tail = BytesMut::new();
            self.tail_written = 0;
        }
    }

    /// Removes the first `n` bytes (written).
    fn consume(&mut self, mut n: usize) {
        self.written = self.written.wrapping_add(n as u64);
        while n > 0 {
            let Some(c) = self.chunks.front_mut() else {
                self.tail.advance(n);
                self.tail_written += n;
                if self.tail.is_empty() {
                    // Written whole: its room is reused (or given back by
                    // `shrink`), nothing written is kept for something
                    // left.
                    self.tail_written = 0;
                } else {
                    self.compact_tail();
                }
                return;
            };
            if n < c.len() {
                c.advance(n);
                self.chunk_bytes -= n;
                self.chunk_written += n;
                if worth_moving(self.chunk_written, c.len()) && c.is_unique() {
                    *c = Bytes::copy_from_slice(c);
                    self.chunk_written = 0;
                }
                return;
            }
            n -= c.len();
            self.chunk_bytes -= c.len();
            self.chunks.pop_front();
            self.chunk_written = 0;
        }
    }

    /// One `sendmsg` of the front of the queue (up to [`MAX_IOVECS`]
    /// slices); what was written leaves the queue. Errors are the
    /// syscall's, `WouldBlock` included.
    pub fn write_once(&mut self, fd: RawFd) -> io::Result<usize> {
        if !self.fds.is_empty() {
            return self.write_once_with_fds(fd);
        }
        let parts = self
            .chunks
            .iter()
            .map(|c| &c[..])
            .chain(std::iter::once(&self.tail[..]));
        let n = send_parts(fd, parts)?;
        self.consume(n);
        Ok(n)
    }

    /// [`OutQueue::write_once`] with the first queued descriptors attached
    /// (sent early is fine: the receiver queues them in order); the bytes
    /// offered stop before the frame of the first descriptor that does not
    /// fit in this message, so that no descriptor arrives after its frame.
    fn write_once_with_fds(&mut self, fd: RawFd) -> io::Result<usize> {
        let attach = self.fds.len().min(MAX_FDS_PER_MSG);
        let mut limit = self
            .fds
            .get(attach)
            .map_or(usize::MAX, |(at, _)| at.wrapping_sub(self.written) as usize);
        let mut parts: Vec<&[u8]> = Vec::with_capacity(MAX_IOVECS);
        for c in self
            .chunks
            .iter()
            .map(|c| &c[..])
            .chain(std::iter::once(&self.tail[..]))
            .filter(|c| !c.is_empty())
            .take(MAX_IOVECS)
        {
            if limit == 0 {
                break;
            }
            let c = &c[..c.len().min(limit)];
            limit -= c.len();
            parts.push(c);
        }
        let raw: Vec<RawFd> = self
            .fds
            .iter()
            .take(attach)
            .map(|(_, f)| f.as_raw_fd())
            .collect();
        let n = send_with_fds(fd, &parts, &raw)?;
        if n > 0 {
            // Sent with the first byte: the queue's copies can be closed.
            self.fds.drain(..attach);
            if self.track {
                self.sent_fds.push_back((self.written, attach));
                self.in_flight += attach;
            }
        }
        self.consume(n);
        Ok(n)
    }

    /// Writes as much as the socket takes without blocking. `Ok(true)`:
    /// everything is written; `Ok(false)`: the socket is full.
    pub fn write_now(&mut self, fd: RawFd) -> io::Result<bool> {
        while !self.is_empty() {
            match self.write_once(fd) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }
}

/// One `sendmsg(2)` of `parts`, in order, with `MSG_NOSIGNAL`; returns how
/// many bytes were written (possibly fewer than all).
pub fn send_vectored(fd: RawFd, parts: &[&[u8]]) -> io::Result<usize> {
    send_parts(fd, parts.iter().copied())
}

/// [`send_vectored`] of the first [`MAX_IOVECS`] non-empty parts `parts`
/// yields. A single part is sent with `send(2)` (no message header to
/// build: the common case of small frames copied into one buffer).
fn send_parts<'a>(fd: RawFd, parts: impl Iterator<Item = &'a [u8]>) -> io::Result<usize> {
    let mut iov = [const { MaybeUninit::<libc::iovec>::uninit() }; MAX_IOVECS];
    let mut n = 0;
    let mut first: &[u8] = &[];
    for p in parts.filter(|p| !p.is_empty()).take(MAX_IOVECS) {
        if n == 0 {
            first = p;
        }
        iov[n].write(libc::iovec {
            iov_base: p.as_ptr() as *mut libc::c_void,
            iov_len: p.len(),
        });
        n += 1;
    }
    let r = if n <= 1 {
        // SAFETY: `first` is readable memory of `first.len()` bytes for the
        // duration of the call; send only reads it.
        unsafe { libc::send(fd, first.as_ptr().cast(), first.len(), libc::MSG_NOSIGNAL) }
    } else {
        // SAFETY: a zeroed msghdr is valid (no name, no control data).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_mut_ptr().cast();
        msg.msg_iovlen = n as _;
        // SAFETY: `msg` points to the first `n` entries of `iov`, all
        // initialised above, each describing readable memory borrowed from
        // `parts` for the duration of the call; sendmsg only reads them.
        unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) }
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as usize)
}

/// Writes all of `parts` on a blocking socket. On failure, the error comes
/// with how many bytes were written (so a caller can tell a frame that was
/// certainly not sent). The socket's send timeout, if any, bounds how long
/// the write may go without progress, signals or not (see `SendBound` in this file).
pub fn write_all_blocking(sock: &UnixStream, parts: &[&[u8]]) -> Result<(), (usize, io::Error)> {
    let fd = sock.as_raw_fd();
    if let [one, rest @ ..] = parts {
        if rest.iter().all(|p| p.is_empty()) {
            // The common case (a frame without a separate payload): no
            // vector to build.
            return write_blocking(sock, one.len(), |done| {
                send_parts(fd, std::iter::once(&one[done..]))
            });
        }
    }
    let total: usize = parts.iter().map(|p| p.len()).sum();
    write_blocking(sock, total, |done| {
        // The parts not yet written, the first one from where it stopped.
        let mut skip = done;
        let rest = parts.iter().filter_map(move |p| {
            if skip >= p.len() {
                skip -= p.len();
                None
            } else {
                let r = &p[skip..];
                skip = 0;
                Some(r)
            }
        });
        send_parts(fd, rest)
    })
}

/// Writes all of `q` on a blocking socket, with the descriptors queued in
/// it ([`OutQueue::push_fd`]). On failure, the error comes with how many
/// bytes were written, as from [`write_all_blocking`].
pub fn write_queue_blocking(sock: &UnixStream, q: &mut OutQueue) -> Result<(), (usize, io::Error)> {
    let fd = sock.as_raw_fd();
    write_blocking(sock, q.len(), |_| q.write_once(fd))
}

/// The loop of the blocking writes: `send(done)` writes some of what is
/// left after the first `done` bytes of `total`, until all is written.
/// A send interrupted by a signal is retried within what is left of the
/// socket's send timeout (`SendBound`).
fn write_blocking(
    sock: &UnixStream,
    total: usize,
    mut send: impl FnMut(usize) -> io::Result<usize>,
) -> Result<(), (usize, io::Error)> {
    let mut done = 0;
    let mut bound = SendBound::new(sock);
    let r = loop {
        if done >= total {
            break Ok(());
        }
        match send(done) {
            Ok(0) => break Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                done += n;
                if done < total {
                    bound.progress();
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                if let Err(e) = bound.interrupted() {
                    break Err(e);
                }
            }
            Err(e) => break Err(e),
        }
    };
    bound.restore();
    r.map_err(|e| (done, e))
}

/// The send timeout (`SO_SNDTIMEO`) of one blocking write, kept a bound on
/// the time the write goes without progress however many signals
/// interrupt it. The timeout bounds one `send`; a send interrupted by a
/// signal fails with `EINTR` (even under `SA_RESTART`, as the socket has a
/// timeout), and retried as it was it would wait the whole timeout again:
/// a signal faster than the timeout (a profiler's `SIGPROF`, an interval
/// timer) would keep a write to a peer that stopped reading blocked for as
/// long as the signals come. So an interrupted send is retried with what
/// is left of the timeout, counted from the write's last progress (or its
/// first interruption, the start of a write that never made progress: the
/// send before it waited less than the timeout), and once nothing is left
/// the write fails with `TimedOut`. The socket gets its timeout back when
/// the write ends. Nothing of this costs a write that is not interrupted.
struct SendBound<'a> {
    sock: &'a UnixStream,
    /// The socket's send timeout, read at the first interruption (`None`
    /// inside: the socket has none, and a send is retried as it was).
    full: Option<Option<Duration>>,
    /// When the write last made progress, once that matters (after a
    /// partial send or an interruption).
    since: Option<Instant>,
    /// The socket's timeout is shorter than `full` (it must be put back).
    shrunk: bool,
}

impl<'a> SendBound<'a> {
    fn new(sock: &'a UnixStream) -> SendBound<'a> {
        SendBound {
            sock,
            full: None,
            since: None,
            shrunk: false,
        }
    }

    /// A send wrote part of what was left: the bound starts again.
    fn progress(&mut self) {
        self.since = Some(Instant::now());
        self.restore();
    }

    /// A send was interrupted: sets the socket's timeout to what is left
    /// of the bound, or fails with `TimedOut` if nothing is.
    fn interrupted(&mut self) -> io::Result<()> {
        let full = match self.full {
            Some(full) => full,
            None => *self.full.insert(self.sock.write_timeout()?),
        };
        let Some(full) = full else {
            return Ok(());
        };
        let now = Instant::now();
        let since = *self.since.get_or_insert(now);
        let left = full.saturating_sub(now.saturating_duration_since(since));
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the peer read nothing for {full:?} (the send timeout)"),
            ));
        }
        self.sock.set_write_timeout(Some(left))?;
        self.shrunk = true;
        Ok(())
    }

    /// Puts the socket's own timeout back, if it was shrunk.
    fn restore(&mut self) {
        if self.shrunk {
            self.shrunk = false;
            // Cannot fail on an open socket with a valid timeout (the one
            // read from it); if it did, the next write would only give up
            // sooner.
            let _ = self.sock.set_write_timeout(self.full.flatten());
        }
    }
}

/// Writes `q` out on `sock` (non-blocking, registered with tokio for
/// readability only). While the socket is full, waits for writability
/// through `wait`, a duplicate registered for that alone: created on the
/// first `WouldBlock` and kept by the caller while it flushes (drop it once
/// the queue is empty, so that an idle socket costs no `EPOLLOUT` wake-ups).
///
/// Cancel-safe: bytes leave `q` only once written.
pub async fn flush(
    q: &mut OutQueue,
    sock: &UnixStream,
    wait: &mut Option<Registered>,
) -> io::Result<()> {
    loop {
        let r = match wait.as_ref() {
            None => q.write_now(sock.as_raw_fd()),
            Some(w) => {
                let mut guard = w.writable().await?;
                let r = q.write_now(sock.as_raw_fd());
                if matches!(r, Ok(false)) {
                    guard.clear_ready();
                }
                r
            }
        };
        match r? {
            true => return Ok(()),
            false => {
                if wait.is_none() {
                    *wait = Some(register_dup(sock, Interest::WRITABLE)?);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn order_is_kept_across_copies_references_and_partial_writes() {
        let (a, mut b) = UnixStream::pair().expect("pair");
        a.set_nonblocking(true).expect("nonblocking");
        let mut q = OutQueue::default();
        q.push_copy(b"ab");
        q.push_shared(Bytes::from_static(b"CDE"));
        q.push_copy(b"fg");
        q.push_front(Bytes::from_static(b"0"));
        q.push(&Bytes::from_static(b"hi"), 1024);
        assert_eq!(q.len(), 10);
        assert!(q.write_now(a.as_raw_fd()).expect("write"));
        assert!(q.is_empty());
        let mut got = [0u8; 10];
        b.read_exact(&mut got).expect("read");
        assert_eq!(&got, b"0abCDEfghi");
    }

    /// What is left of a chunk or of the tail once most of it is written
    /// is moved into an allocation of its own size: the written bytes of a
    /// `Bytes`/`BytesMut` stay allocated with the rest (red-team pass 4: a
    /// peer reading all but a little of a large backlog made the broker
    /// keep megabytes per connection, counted as the little).
    #[test]
    fn the_written_front_of_a_queue_does_not_stay_allocated() {
        let big = || Bytes::from(vec![7u8; 1 << 20]);
        let within = |b: &[u8], (start, len): (usize, usize)| {
            let p = b.as_ptr() as usize;
            p >= start && p < start + len
        };
        // A chunk only the queue holds: moved once most of it is written.
        let b = big();
        let alloc = (b.as_ptr() as usize, b.len());
        let mut q = OutQueue::default();
        q.push_shared(b);
        q.consume(600 * 1024);
        assert!(within(&q.chunks[0], alloc), "half written: kept as is");
        q.consume((1 << 20) - 600 * 1024 - 10);
        assert_eq!(q.len(), 10);
        assert!(!within(&q.chunks[0], alloc), "moved");
        assert_eq!(&q.chunks[0][..], &[7u8; 10]);
        // One someone else holds too: moving it would free nothing.
        let b = big();
        let mut q = OutQueue::default();
        q.push_shared(b.clone());
        q.consume((1 << 20) - 10);
        assert!(within(&q.chunks[0], (b.as_ptr() as usize, b.len())));
        // The tail: 1 MiB of small frames, all but 10 bytes written.
        let mut q = OutQueue::default();
        for _ in 0..1024 {
            q.push_copy(&[1u8; 1024]);
        }
        assert!(q.tail.capacity() >= 1 << 20);
        q.consume((1 << 20) - 10);
        assert_eq!(q.len(), 10);
        assert!(q.tail.capacity() < COMPACT_MIN, "{}", q.tail.capacity());
        // A large tail is sealed with its allocation: its spare room does
        // not keep the chunk's allocation alive once the chunk is written.
        let mut q = OutQueue::default();
        q.push_copy(&[1u8; 64 * 1024]);
        q.push_shared(big());
        assert_eq!(q.tail.capacity(), 0);
        // Order kept through the moves.
        q.consume(50);
        q.push_copy(b"end");
        let mut rest = Vec::new();
        q.take_into(&mut rest);
        let all: Vec<u8> = rest.iter().flat_map(|b| b.iter().copied()).collect();
        assert_eq!(all.len(), 64 * 1024 - 50 + (1 << 20) + 3);
        assert_eq!(&all[..50], &[1u8; 50]);
        assert_eq!(&all[all.len() - 3..], b"end");
    }

    #[test]
    fn a_full_socket_keeps_the_rest_in_order() {
        let (a, mut b) = UnixStream::pair().expect("pair");
        a.set_nonblocking(true).expect("nonblocking");
        let mut q = OutQueue::default();
        let big: Vec<u8> = (0..4 * 1024 * 1024u32).map(|i| i as u8).collect();
        q.push_shared(Bytes::from(big.clone()));
        q.push_copy(b"end");
        assert!(!q.write_now(a.as_raw_fd()).expect("write"), "socket full");
        let left = q.len();
        assert!(left > 0 && left < big.len() + 3);
        let reader = std::thread::spawn(move || {
            let mut all = Vec::new();
            b.read_to_end(&mut all).expect("read");
            all
        });
        a.set_nonblocking(false).expect("blocking");
        let mut rest = Vec::new();
        q.take_into(&mut rest);
        let parts: Vec<&[u8]> = rest.iter().map(|b| &b[..]).collect();
        write_all_blocking(&a, &parts).expect("write rest");
        drop(a);
        let all = reader.join().expect("reader");
        assert_eq!(&all[..big.len()], &big[..]);
        assert_eq!(&all[big.len()..], b"end");
    }

    #[test]
    fn descriptors_travel_no_later_than_their_frames() {
        use crate::fdpass::{read_spare_fds, FdQueue};
        let (a, b) = UnixStream::pair().expect("pair");
        a.set_nonblocking(true).expect("nonblocking");
        let mut q = OutQueue::default();
        q.push_copy(b"before");
        // More descriptors than one message carries, one per 4-byte frame.
        let n = MAX_FDS_PER_MSG + 3;
        for i in 0..n {
            let f = SealedFd::create(&[i as u8 + 1; 3]).expect("memfd");
            q.push_fd(Arc::new(f));
            q.push_copy(&(i as u32).to_be_bytes());
        }
        assert_eq!(q.fds_queued(), n);
        let first = q.write_once(a.as_raw_fd()).expect("write");
        assert_eq!(
            first,
            6 + 4 * MAX_FDS_PER_MSG,
            "stops before an unsent fd's frame"
        );
        assert!(q.write_now(a.as_raw_fd()).expect("write"));
        assert_eq!(q.fds_queued(), 0);
        let mut buf = BytesMut::with_capacity(1024);
        let mut fds = FdQueue::new();
        while buf.len() < 6 + 4 * n {
            read_spare_fds(&b, &mut buf, &mut fds).expect("read");
        }
        assert_eq!(fds.len(), n);
        for (i, fd) in fds.into_iter().enumerate() {
            let s = SealedFd::verify(fd, 10).expect("sealed");
            assert_eq!(&s.map().expect("map")[..], &[i as u8 + 1; 3]);
        }
    }

    /// Frames whose descriptors cannot be sent are rewritten to carry
    /// their payloads inline, in place, the frames around them unchanged.
    #[test]
    fn descriptor_frames_can_be_rewritten_inline() {
        use zrpc_proto::{encode_fd_header, encode_frame, Envelope, FrameDecoder};
        let mut q = OutQueue::default();
        let ping = |nonce| Envelope::Ping { nonce };
        encode_frame(q.tail(), &ping(1), b"ab");
        let fd = Arc::new(SealedFd::create(b"payload one").expect("memfd"));
        q.push_fd(fd);
        encode_fd_header(q.tail(), &ping(2));
        encode_frame(q.tail(), &ping(3), &[9u8; 10]);
        let fd = Arc::new(SealedFd::create(&[5u8; 30_000]).expect("memfd"));
        q.push_fd(fd);
        encode_fd_header(q.tail(), &ping(4));
        assert_eq!(q.inline_fds().expect("mapped"), 2);
        assert_eq!(q.fds_queued(), 0);
        let mut out = Vec::new();
        q.take_into(&mut out);
        let mut buf = BytesMut::new();
        for b in out {
            buf.extend_from_slice(&b);
        }
        let d = FrameDecoder::new(u32::MAX);
        let mut got = Vec::new();
        while let Some(f) = d.decode(&mut buf).expect("valid frame") {
            let Ok(Envelope::Ping { nonce }) = f.decode() else {
                panic!("not a ping");
            };
            got.push((nonce, f.payload.to_vec()));
        }
        assert_eq!(
            got,
            vec![
                (1, b"ab".to_vec()),
                (2, b"payload one".to_vec()),
                (3, vec![9u8; 10]),
                (4, vec![5u8; 30_000]),
            ]
        );
    }

    /// Descriptors sent count as in flight until the bytes sent with them
    /// are read.
    #[test]
    fn sent_descriptors_are_in_flight_until_read() {
        use zrpc_proto::{encode_fd_header, encode_frame, Envelope};
        let (a, b) = UnixStream::pair().expect("pair");
        a.set_nonblocking(true).expect("nonblocking");
        let mut q = OutQueue::default();
        q.track_sent_fds();
        let fd = Arc::new(SealedFd::create(b"x").expect("memfd"));
        q.push_fd(fd);
        encode_fd_header(q.tail(), &Envelope::Ping { nonce: 1 });
        assert!(q.write_now(a.as_raw_fd()).expect("written"));
        encode_frame(q.tail(), &Envelope::Ping { nonce: 2 }, b"");
        assert!(q.write_now(a.as_raw_fd()).expect("written"));
        assert_eq!(q.fds_in_flight(), 1);
        let unread = crate::fdpass::unread_sent(a.as_raw_fd()).expect("SIOCOUTQ");
        assert!(unread > 0);
        assert_eq!(q.release_received(unread), 0);
        let mut fds = crate::fdpass::FdQueue::new();
        let mut bm = BytesMut::new();
        while crate::fdpass::unread_sent(a.as_raw_fd()).expect("SIOCOUTQ") > 0 {
            bm.clear();
            bm.reserve(4096);
            crate::fdpass::read_spare_fds(&b, &mut bm, &mut fds).expect("read");
        }
        assert_eq!(fds.len(), 1);
        assert_eq!(q.release_received(0), 1);
        assert_eq!(q.fds_in_flight(), 0);
    }

    #[test]
    fn a_queue_with_descriptors_is_written_whole_on_a_blocking_socket() {
        use crate::fdpass::{read_spare_fds, FdQueue};
        let (a, b) = UnixStream::pair().expect("pair");
        let mut q = OutQueue::default();
        q.push_copy(b"first");
        q.push_fd(Arc::new(SealedFd::create(b"payload").expect("memfd")));
        q.push_copy(b"second");
        write_queue_blocking(&a, &mut q).expect("written");
        assert!(q.is_empty() && q.fds_queued() == 0);
        let mut buf = BytesMut::with_capacity(64);
        let mut fds = FdQueue::new();
        while buf.len() < 11 {
            read_spare_fds(&b, &mut buf, &mut fds).expect("read");
        }
        assert_eq!(&buf[..], b"firstsecond");
        let fd = fds.pop_front().expect("the descriptor came");
        let s = SealedFd::verify(fd, 100).expect("sealed");
        assert_eq!(&s.map().expect("map")[..], b"payload");
        // Nothing written to a peer gone away: the count says so.
        drop(b);
        q.push_copy(b"more");
        let err = write_queue_blocking(&a, &mut q).expect_err("peer gone");
        assert_eq!((err.0, err.1.kind()), (0, io::ErrorKind::BrokenPipe));
    }

    /// Signals handled by [`count_signal`].
    static HANDLED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    extern "C" fn count_signal(_: libc::c_int) {
        HANDLED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Runs `write` in a thread of its own, which gets `SIGUSR2` (handled
    /// without `SA_RESTART`) every millisecond until `write` returns, at
    /// most 3000 times; returns what `write` returned and how long it took.
    fn under_signals<T: Send + 'static>(
        write: impl FnOnce() -> T + Send + 'static,
    ) -> (T, std::time::Duration) {
        // SAFETY: a zeroed sigaction is valid (empty mask, no flags); the
        // handler only touches an atomic (async-signal-safe).
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = count_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            libc::sigemptyset(&mut sa.sa_mask);
            assert_eq!(libc::sigaction(libc::SIGUSR2, &sa, std::ptr::null_mut()), 0);
        }
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let writer = std::thread::spawn(move || {
            // SAFETY: pthread_self has no preconditions.
            let _ = tid_tx.send(unsafe { libc::pthread_self() });
            let started = Instant::now();
            let r = write();
            let _ = done_tx.send((r, started.elapsed()));
            // Not ended (so never signalled after its end) until told.
            let _ = release_rx.recv();
        });
        let tid = tid_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the writer started");
        let mut got = None;
        for _ in 0..3000 {
            if let Ok(r) = done_rx.try_recv() {
                got = Some(r);
                break;
            }
            // SAFETY: the writer has not ended: it waits for `release`.
            assert_eq!(unsafe { libc::pthread_kill(tid, libc::SIGUSR2) }, 0);
            std::thread::sleep(Duration::from_millis(1));
        }
        let got = got.or_else(|| done_rx.recv_timeout(Duration::from_secs(10)).ok());
        drop(release_tx);
        let _ = writer.join();
        got.expect("the write never ended")
    }

    /// A blocking write to a peer that reads nothing fails by its socket's
    /// send timeout (twice it at most: the send that fills the buffer, then
    /// the rest) however often signals interrupt it, with the count of
    /// what it wrote, and the socket keeps its timeout. Each interruption
    /// used to restart the timeout: the writes below ended only once the
    /// signals stopped (3 s and more).
    #[test]
    fn signals_do_not_restart_a_blocking_writes_send_timeout() {
        let timeout = Duration::from_millis(300);
        let (a, _b) = UnixStream::pair().expect("pair");
        a.set_write_timeout(Some(timeout)).expect("timeout");
        let a = Arc::new(a);
        let before = HANDLED.load(std::sync::atomic::Ordering::Relaxed);
        let w = a.clone();
        let (r, took) = under_signals(move || {
            let big = vec![7u8; 4 << 20];
            write_all_blocking(&w, &[&big[..1 << 20], &big[1 << 20..]])
                .map_err(|(n, e)| (n, e.kind()))
        });
        let (written, kind) = r.expect_err("nothing reads");
        assert!(written > 0 && written < 4 << 20, "{written}");
        assert!(
            matches!(kind, io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut),
            "{kind:?}"
        );
        assert!(took < 2 * timeout + Duration::from_millis(500), "{took:?}");
        assert_eq!(a.write_timeout().expect("timeout"), Some(timeout));

        // The socket is full now: the queue's write is interrupted at once.
        let w = a.clone();
        let (r, took) = under_signals(move || {
            let mut q = OutQueue::default();
            q.push_copy(&[1u8; 64 * 1024]);
            write_queue_blocking(&w, &mut q).map_err(|(n, e)| (n, e.kind()))
        });
        // Timed out by the kernel (its timeout shrunk to what was left) or
        // found out of time before a retry.
        let (written, kind) = r.expect_err("nothing reads");
        assert_eq!(written, 0);
        assert!(
            matches!(kind, io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut),
            "{kind:?}"
        );
        assert!(took < 2 * timeout + Duration::from_millis(500), "{took:?}");
        assert_eq!(a.write_timeout().expect("timeout"), Some(timeout));
        let handled = HANDLED.load(std::sync::atomic::Ordering::Relaxed) - before;
        assert!(
            handled >= 50,
            "only {handled} signals: the writes were hardly interrupted"
        );
    }

    #[test]
    fn a_closed_peer_is_an_error_not_a_signal() {
        let (a, b) = UnixStream::pair().expect("pair");
        drop(b);
        let err = write_all_blocking(&a, &[b"x"]).expect_err("peer gone");
        assert_eq!(err.0, 0);
        assert_eq!(err.1.kind(), io::ErrorKind::BrokenPipe);
    }
}
