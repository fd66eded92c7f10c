//! Reading a socket into a frame buffer: the one read of zrpc.
//!
//! Every reader (the broker's connections, the service's connection, the
//! async client's and the blocking client's) keeps one [`BytesMut`] per
//! connection, decodes complete frames off its front with
//! [`zrpc_proto::FrameDecoder`], and before each read makes room with
//! [`ReadPolicy::make_room`], then reads with [`read_spare`] (one sound
//! `read(2)` into the spare capacity, no zero-filling). The async readers
//! wait for readability with [`read_some`].

use std::io;
use std::os::fd::AsRawFd;

use bytes::{BufMut, BytesMut};
use zrpc_proto::FrameDecoder;

use crate::reactor::Registered;

/// How a reader sizes its buffer. One rule with per-role sizes: a broker
/// holds a buffer for each of thousands of connections and reads small
/// frames from most of them; a client reads large replies on one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadPolicy {
    /// Room reserved when the buffer runs short between frames.
    pub chunk: usize,
    /// A read is made with at least this much free room (else `chunk` more
    /// is reserved first).
    pub min_free: usize,
    /// Most room reserved at once for a frame whose header announced more
    /// than this: beyond it, at most four times what has arrived, so that a
    /// peer sending only a header announcing a huge frame cannot make the
    /// reader reserve the whole maximum message size.
    pub upfront: usize,
    /// Most bytes one read takes, unless the rest of the partial frame at
    /// the front of the buffer is more (the read then takes that rest and
    /// no more). A reader whose frames from one read are handled as one
    /// batch, on a thread other peers share, bounds how long that batch
    /// may be: however large its buffer grew, a read does not take all
    /// that the socket holds.
    pub max_read: usize,
}

impl ReadPolicy {
    /// The broker's connections: 8 KiB chunks (memory per connection),
    /// large frames reserved up to 4 MiB at once.
    pub const BROKER: ReadPolicy = ReadPolicy {
        chunk: 8 * 1024,
        min_free: 8 * 1024,
        upfront: 4 * 1024 * 1024,
        max_read: 64 * 1024,
    };

    /// A client's connection: 64 KiB chunks (one connection carries every
    /// call of the process), a large reply reserved whole as soon as its
    /// header arrives (read straight into place, no growing copies): the
    /// broker was checked to be one this process trusts
    /// ([`crate::trust`]), and the frame decoder bounds what it may
    /// announce by its `Welcome`'s maximum message size.
    pub const CLIENT: ReadPolicy = ReadPolicy {
        chunk: 64 * 1024,
        min_free: 16 * 1024,
        upfront: usize::MAX,
        max_read: usize::MAX,
    };

    /// A service's connection: 16 KiB chunks (requests are read in
    /// batches; large ones go to an allocation of their own, see
    /// `zrpc-service`).
    pub const SERVICE: ReadPolicy = ReadPolicy {
        chunk: 16 * 1024,
        min_free: 16 * 1024,
        upfront: 4 * 1024 * 1024,
        max_read: usize::MAX,
    };

    /// How much free room the next read wants: the rest of the partial
    /// frame at the front of `buf` (bounded by [`upfront`](Self::upfront)),
    /// or `min_free`.
    pub fn wanted(&self, dec: &FrameDecoder, buf: &BytesMut) -> usize {
        match dec.needed(buf) {
            Some(total) => total
                .saturating_sub(buf.len())
                .min(self.upfront.max(buf.len().saturating_mul(4))),
            None => self.min_free,
        }
    }

    /// Makes room in `buf` for the next read: the rest of the partial frame
    /// at its front (whole, up to `upfront`, so a large frame is read
    /// straight into place), or a chunk.
    ///
    /// Call it right before reading, after the frames handed out have been
    /// consumed: frames split off `buf` share its allocation, and once their
    /// holders have dropped them `reserve` reuses that allocation instead of
    /// taking a fresh one (for a 1 MiB reply a fresh buffer costs ~256 page
    /// faults).
    ///
    /// Returns the most the next read is to take (see
    /// [`max_read`](Self::max_read)).
    pub fn make_room(&self, dec: &FrameDecoder, buf: &mut BytesMut) -> usize {
        let want = self.wanted(dec, buf);
        if buf.capacity() - buf.len() < want {
            buf.reserve(want.max(self.chunk));
        }
        want.max(self.max_read)
    }
}

/// Reads what `sock` has into the spare capacity of `buf` (one `read(2)`,
/// at most the spare capacity) and extends `buf` by what was read. The one
/// way zrpc reads a socket into a buffer without initialising its spare
/// capacity first: no `&mut [u8]` to uninitialised memory is ever made.
/// Errors (`WouldBlock` included) are `read(2)`'s.
pub fn read_spare(sock: &impl AsRawFd, buf: &mut BytesMut) -> io::Result<usize> {
    read_spare_at_most(sock, buf, usize::MAX)
}

/// [`read_spare`] taking at most `max_len` bytes.
pub fn read_spare_at_most(
    sock: &impl AsRawFd,
    buf: &mut BytesMut,
    max_len: usize,
) -> io::Result<usize> {
    let spare = buf.chunk_mut();
    let (ptr, cap) = (spare.as_mut_ptr(), spare.len().min(max_len));
    // SAFETY: `ptr` points to `cap` bytes of `buf`'s spare capacity, valid
    // for writes while `buf` is borrowed here; read(2) writes at most `cap`
    // bytes there and nothing else, through a raw pointer (no reference to
    // uninitialised bytes is created).
    let n = unsafe { libc::read(sock.as_raw_fd(), ptr.cast(), cap) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    // SAFETY: the kernel initialised the first `n <= cap` spare bytes.
    unsafe { buf.advance_mut(n) };
    Ok(n)
}

/// Whether `e` is a read timing out on a blocking socket with
/// `SO_RCVTIMEO` (`EAGAIN`, reported as `WouldBlock`, or `TimedOut`).
pub fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Waits until `rd` is readable, calls `room` to size `buf` (only then: the
/// holders of frames handed out by the last read have usually dropped them
/// by now, see [`ReadPolicy::make_room`]) and reads once into it, at most
/// what `room` returned. Returns what `read(2)` returned; `Ok(0)` is the
/// end of the stream.
///
/// Cancel-safe: bytes land in `buf` only when read, and the read itself is
/// not interrupted. A short read is taken to have drained the socket: the
/// next call waits for the next edge instead of paying a read that would
/// block.
pub async fn read_some(
    rd: &Registered,
    buf: &mut BytesMut,
    room: impl FnMut(&mut BytesMut) -> usize,
) -> io::Result<usize> {
    let read = |sock: &std::os::unix::net::UnixStream, buf: &mut BytesMut, max: usize| {
        Ok((read_spare_at_most(sock, buf, max)?, false))
    };
    let (n, ()) = read_with(rd, buf, room, read, || std::future::ready(())).await?;
    Ok(n)
}

/// The loop of [`read_some`], with the read itself as `read`: it returns
/// the bytes read and whether the read may have ended early with data left
/// (the kernel ends a read at a message carrying descriptors, see
/// [`crate::fdpass::read_some_fds`]), in which case readiness is kept.
///
/// Once the socket is readable, and before each read, `gate()` is
/// awaited: its value is returned with what was read, and dropped if the
/// read would block after all (readiness kept from a read that filled the
/// buffer, or took descriptors, with nothing left). The broker waits there
/// for the connection's turn in its user's round (`zrpcd`'s `fair`), so
/// that a turn is taken only with data to read and never held while the
/// read waits.
pub(crate) async fn read_with<G, Gate: std::future::Future<Output = G>>(
    rd: &Registered,
    buf: &mut BytesMut,
    mut room: impl FnMut(&mut BytesMut) -> usize,
    mut read: impl FnMut(
        &std::os::unix::net::UnixStream,
        &mut BytesMut,
        usize,
    ) -> io::Result<(usize, bool)>,
    mut gate: impl FnMut() -> Gate,
) -> io::Result<(usize, G)> {
    loop {
        let mut guard = rd.readable().await?;
        let passed = gate().await;
        // At least a byte: a read of none would look like the end.
        let max = room(buf).max(1);
        // A read that took all it could may have left more.
        let cap = (buf.capacity() - buf.len()).min(max);
        match read(rd.get_ref(), buf, max) {
            Ok((n, ended_early)) => {
                if n > 0 && n < cap && !ended_early {
                    guard.clear_ready();
                }
                return Ok((n, passed));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => guard.clear_ready(),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A gate value passed before a read that would block after all
    /// (readiness kept with nothing left) is dropped before the read waits
    /// for more: the broker must not hold a connection's turn while its
    /// read waits.
    #[tokio::test(flavor = "current_thread")]
    async fn a_gate_passed_before_a_read_that_would_block_is_dropped() {
        use std::cell::Cell;
        use std::io::Write;
        use std::rc::Rc;
        struct Pass(Rc<Cell<u32>>);
        impl Drop for Pass {
            fn drop(&mut self) {
                self.0.set(self.0.get() + 1);
            }
        }
        let (a, mut b) = std::os::unix::net::UnixStream::pair().expect("pair");
        a.set_nonblocking(true).expect("nonblocking");
        let rd = crate::reactor::register(a, tokio::io::Interest::READABLE).expect("register");
        b.write_all(b"x").expect("write");
        let (passed, dropped) = (Rc::new(Cell::new(0)), Rc::new(Cell::new(0)));
        let mut first = true;
        // The first read says it would block (as after readiness kept from
        // a read that filled the buffer); the peer then sends more, for a
        // new edge.
        let read = |sock: &std::os::unix::net::UnixStream, buf: &mut BytesMut, _max: usize| {
            if std::mem::take(&mut first) {
                assert_eq!(dropped.get(), 0, "dropped too early");
                b.write_all(b"y").expect("write");
                return Err(io::ErrorKind::WouldBlock.into());
            }
            assert_eq!(dropped.get(), 1, "the first pass was still held");
            Ok((read_spare(sock, buf)?, false))
        };
        let gate = || {
            passed.set(passed.get() + 1);
            std::future::ready(Pass(dropped.clone()))
        };
        let mut buf = BytesMut::with_capacity(64);
        let (n, pass) = read_with(&rd, &mut buf, |_| usize::MAX, read, gate)
            .await
            .expect("read");
        assert_eq!((n, &buf[..]), (2, &b"xy"[..]));
        assert_eq!((passed.get(), dropped.get()), (2, 1));
        drop(pass);
        assert_eq!(dropped.get(), 2);
    }

    #[test]
    fn a_partial_frame_is_reserved_whole_up_to_the_bound() {
        let dec = FrameDecoder::new(64 * 1024 * 1024);
        let p = ReadPolicy::CLIENT;
        // A header announcing a 1 MiB body: the whole frame.
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&(1024 * 1024u32).to_be_bytes());
        buf.extend_from_slice(&[0, 0, 0, 1]);
        assert_eq!(p.wanted(&dec, &buf), 1024 * 1024);
        p.make_room(&dec, &mut buf);
        assert!(buf.capacity() - buf.len() >= 1024 * 1024);
        // 60 MiB announced by 8 bytes: the whole frame for the trusted
        // broker, only the bound from a peer of the broker.
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&(60 * 1024 * 1024u32).to_be_bytes());
        buf.extend_from_slice(&[0, 0, 0, 1]);
        assert_eq!(p.wanted(&dec, &buf), 60 * 1024 * 1024);
        assert_eq!(ReadPolicy::BROKER.wanted(&dec, &buf), 4 * 1024 * 1024);
        // Between frames: the chunk.
        let mut buf = BytesMut::new();
        p.make_room(&dec, &mut buf);
        assert!(buf.capacity() >= p.chunk);
    }

    /// However large a broker's buffer grew, one read takes at most
    /// `max_read` (the frames of a read are one batch on the broker's
    /// shared thread), or the rest of a larger partial frame and no more.
    #[tokio::test(flavor = "current_thread")]
    async fn a_brokers_read_takes_a_bounded_batch() {
        use std::io::Write;
        use std::os::fd::AsRawFd;
        let p = ReadPolicy::BROKER;
        let dec = FrameDecoder::new(16 * 1024 * 1024);
        let (a, mut b) = std::os::unix::net::UnixStream::pair().expect("pair");
        a.set_nonblocking(true).expect("nonblocking");
        let rd = crate::reactor::register(a, tokio::io::Interest::READABLE).expect("register");
        // Room for all that is written below before it is read (the
        // kernel doubles what is asked, up to twice `wmem_max`, 2 x 208 KiB
        // by default).
        let size: libc::c_int = 1 << 20;
        // SAFETY: setsockopt with a pointer to a live c_int and its size.
        let r = unsafe {
            libc::setsockopt(
                b.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0, "SO_SNDBUF");
        // A large frame's first 8 KiB, then 200 KiB more: the rest of it
        // (100 KiB in all) and 108 KiB of whatever follows.
        let frame = 100 * 1024u32;
        let mut first = Vec::new();
        first.extend_from_slice(&(frame - 8).to_be_bytes());
        first.extend_from_slice(&[0, 0, 0, 1]);
        first.resize(8 * 1024, 0);
        b.write_all(&first).expect("write");
        let mut buf = BytesMut::with_capacity(16 * 1024 * 1024);
        let room = |b: &mut BytesMut| p.make_room(&dec, b);
        let n = read_some(&rd, &mut buf, room).await.expect("read");
        assert_eq!(n, 8 * 1024);
        b.write_all(&vec![0; 200 * 1024]).expect("write");
        let n = read_some(&rd, &mut buf, room).await.expect("read");
        assert_eq!(n, (frame - 8 * 1024) as usize, "the rest of the frame only");
        // Between frames: at most `max_read`, with a 16 MiB buffer.
        buf.clear();
        let n = read_some(&rd, &mut buf, room).await.expect("read");
        assert_eq!(n, p.max_read);
        // A client's read takes what its buffer has room for.
        let mut buf = BytesMut::with_capacity(1024 * 1024);
        let client = |b: &mut BytesMut| ReadPolicy::CLIENT.make_room(&dec, b);
        let n = read_some(&rd, &mut buf, client).await.expect("read");
        assert_eq!(n, 200 * 1024 - (frame as usize - 8 * 1024) - p.max_read);
    }

    #[test]
    fn read_spare_reads_into_spare_capacity() {
        use std::io::Write;
        let (mut a, b) = std::os::unix::net::UnixStream::pair().expect("pair");
        a.write_all(b"hello").expect("write");
        let mut buf = BytesMut::with_capacity(3);
        buf.extend_from_slice(b"x");
        let n = read_spare(&b, &mut buf).expect("read");
        assert_eq!(&buf[..], &b"xhello"[..1 + n]);
    }
}
