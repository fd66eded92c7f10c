//! Large payloads as sealed memfds passed with `SCM_RIGHTS`: the one
//! descriptor-passing path of zrpc, used by the broker, the service and
//! both clients alike.
//!
//! A sender puts a payload of [`FD_PAYLOAD_MIN`] bytes or more into a
//! `memfd`, seals it against every change ([`SEALS`]: no write, no shrink,
//! no grow, no further sealing) and sends the descriptor with the frame
//! ([`crate::write::OutQueue::push_fd`]); the bytes never cross a socket. A
//! receiver takes descriptors off the socket with [`read_spare_fds`] (in
//! arrival order, into an [`FdQueue`]), checks each with
//! [`SealedFd::verify`] before anything else (a memfd, sealed with all of
//! [`SEALS`], of a bounded size: a descriptor that is not is never mapped)
//! and reads the payload through a read-only mapping ([`SealedFd::map`]).
//!
//! Ordering: a descriptor is attached to a `sendmsg` whose bytes start at or
//! before the first byte of its frame, so the receiver always has it by the
//! time it has decoded the frame; descriptors are assigned to frames that
//! carry one in order.

use std::collections::VecDeque;
use std::fmt;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use bytes::{BufMut, Bytes, BytesMut};
use rustix::fs::{MemfdFlags, SealFlags};

use crate::reactor::Registered;

/// Payloads at least this large travel as a sealed memfd between peers that
/// negotiated it. A sealed memfd is single-use (a seal cannot be removed):
/// each new payload is copied once into a fresh memfd (encoded straight
/// into it by the client, [`crate::spill`]) whose pages were allocated
/// ahead of need by a background thread ([`crate::prefill`]); a payload
/// that is already a received memfd's whole content goes on as that
/// descriptor ([`crate::mapped`]: an echo costs no copy), and receivers map
/// lazily. Allocating shmem pages is the expensive part on the project's
/// 2-core VM: a fresh 1 MiB memfd costs about 440 us to fill, writing into
/// allocated pages about 70 us.
///
/// Measured (`bench/scripts/run.sh`-like, one client, 150-300 calls,
/// memfd vs the same binaries with `--max-fds-per-conn 0`, p50 of the
/// round trip, two alternating runs): an echo of the request's `Blob`
/// wins clearly from 1 MiB (390-468 vs 872-1,114 us; 2 MiB 638-710 vs
/// 1,446-2,347 us; at 256 KiB 217-365 vs 169-261 us, a tie); a service
/// that decodes the payload into a new buffer and returns a new one
/// (`serde_bytes::ByteBuf`: every page of the mapping is faulted in, one
/// fresh memfd each way) loses at 1 MiB (1,088-1,206 vs 881-899 us) and
/// at 2 MiB (2,306-2,758 vs 1,945-2,531 us), as it did with the previous
/// 2 MiB threshold. From 1 MiB on: the zero-copy case halves, the broker
/// stops copying (13-16 CPU ticks per 300 calls of 1 MiB to 0-2). See
/// docs/performance.md, "Payloads in descriptors".
pub const FD_PAYLOAD_MIN: usize = 1024 * 1024;

/// Most descriptors attached to one `sendmsg`, and taken by one `recvmsg`.
pub const MAX_FDS_PER_MSG: usize = 32;

/// The seals a payload descriptor must carry: its size and bytes can never
/// change again, and no seal can be removed.
pub const SEALS: SealFlags = SealFlags::WRITE
    .union(SealFlags::SHRINK)
    .union(SealFlags::GROW)
    .union(SealFlags::SEAL);

/// Descriptors received and not yet assigned to a frame, in arrival order.
pub type FdQueue = VecDeque<OwnedFd>;

/// Why a received descriptor was refused.
#[derive(Debug, thiserror::Error)]
pub enum FdError {
    /// Not a memfd (`F_GET_SEALS` fails on anything else) or not a regular
    /// file.
    #[error("the descriptor sent with a payload is not a memfd; send payloads in sealed memfds (memfd_create with MFD_ALLOW_SEALING)")]
    NotMemfd,
    /// A memfd missing some of [`SEALS`].
    #[error("the payload memfd is not sealed (seals {0:?}); seal it with F_SEAL_WRITE|F_SEAL_SHRINK|F_SEAL_GROW|F_SEAL_SEAL before sending")]
    NotSealed(SealFlags),
    /// Larger than the receiver accepts, or empty.
    #[error("the payload memfd holds {len} bytes; accepted: 1 to {max}")]
    BadSize {
        /// Its size.
        len: u64,
        /// The largest size accepted.
        max: usize,
    },
    /// A memfd of another file system than shmem: one created with
    /// `MFD_HUGETLB` may not be mappable by its receiver (with no huge
    /// pages reserved, mapping it fails), so it could not be passed on.
    #[error("the payload memfd is not a plain shared-memory memfd (one made with MFD_HUGETLB?); create payload memfds without MFD_HUGETLB")]
    NotShmem,
    /// `fstat` failed.
    #[error("cannot inspect the payload descriptor: {0}")]
    Io(#[from] io::Error),
}

/// `statfs`' `f_type` of shmem, where plain memfds live.
const TMPFS_MAGIC: u64 = 0x0102_1994;

/// A payload in a sealed memfd: created here ([`SealedFd::create`]) or
/// received and verified ([`SealedFd::verify`]). Its bytes cannot change.
pub struct SealedFd {
    fd: OwnedFd,
    len: usize,
}

impl fmt::Debug for SealedFd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "SealedFd(fd {}, {} bytes)",
            self.fd.as_raw_fd(),
            self.len
        )
    }
}

impl SealedFd {
    /// A new memfd holding a copy of `bytes`, sealed with [`SEALS`].
    pub fn create(bytes: &[u8]) -> io::Result<SealedFd> {
        let (mut file, cap) = crate::prefill::take(bytes.len())?;
        file.write_all(bytes)?;
        SealedFd::seal(file, bytes.len(), cap)
    }

    /// Seals `file`, a fresh memfd ([`new_memfd`], or one of `cap`
    /// allocated bytes from [`crate::prefill::take`]) into which the caller
    /// wrote `len` bytes from its start, with [`SEALS`], after trimming it
    /// to those bytes.
    pub(crate) fn seal(file: File, len: usize, cap: usize) -> io::Result<SealedFd> {
        if cap > len {
            file.set_len(len as u64)?;
        }
        let fd = OwnedFd::from(file);
        rustix::fs::fcntl_add_seals(&fd, SEALS)?;
        Ok(SealedFd { fd, len })
    }

    /// Checks a received descriptor before anything else is done with it:
    /// a memfd sealed with all of [`SEALS`], a regular file of 1 to
    /// `max_len` bytes. Refused descriptors are closed (dropped).
    pub fn verify(fd: OwnedFd, max_len: usize) -> Result<SealedFd, FdError> {
        // F_GET_SEALS fails with EINVAL on anything but a memfd (or another
        // shmem file, which cannot carry these seals: only memfds created
        // with MFD_ALLOW_SEALING can be sealed further).
        let seals = rustix::fs::fcntl_get_seals(&fd).map_err(|_| FdError::NotMemfd)?;
        if !seals.contains(SEALS) {
            return Err(FdError::NotSealed(seals));
        }
        let st = rustix::fs::fstat(&fd).map_err(io::Error::from)?;
        if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
            return Err(FdError::NotMemfd);
        }
        // Plain memfds live on the kernel's internal shmem mount; a
        // hugetlbfs one (MFD_HUGETLB) may fail to map for the broker or a
        // receiver that is handed it (a call whose payload no one could
        // map closed every instance of the service it was delivered to).
        let fs = rustix::fs::fstatfs(&fd).map_err(io::Error::from)?;
        // (`f_type`'s type differs by architecture; the magic numbers are
        // 32 bits.)
        if fs.f_type as u64 & 0xffff_ffff != TMPFS_MAGIC {
            return Err(FdError::NotShmem);
        }
        let len = u64::try_from(st.st_size).unwrap_or(0);
        match usize::try_from(len) {
            Ok(l) if l > 0 && l <= max_len => Ok(SealedFd { fd, len: l }),
            _ => Err(FdError::BadSize { len, max: max_len }),
        }
    }

    /// Payload length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: an empty payload never travels in a descriptor.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The payload through a read-only shared mapping (prefaulted: it is
    /// about to be read whole), as [`Bytes`] that keep the mapping alive.
    pub fn map(&self) -> io::Result<Bytes> {
        // SAFETY: the mapping is read-only and the file is a memfd carrying
        // F_SEAL_WRITE, F_SEAL_SHRINK and F_SEAL_SEAL (checked by `verify`,
        // or set by `create`): its bytes cannot change and it cannot
        // shrink for as long as it exists, so the slice the mapping hands
        // out is immutable and never faults (SIGBUS) for `len` bytes.
        let map = unsafe {
            memmap2::MmapOptions::new()
                .len(self.len)
                .populate()
                .map(self.fd.as_raw_fd())?
        };
        Ok(Bytes::from_owner(map))
    }
}

/// A new, empty memfd that can be sealed (close-on-exec).
pub(crate) fn new_memfd() -> io::Result<File> {
    let fd = rustix::fs::memfd_create(
        "zrpc-payload",
        MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
    )?;
    Ok(File::from(fd))
}

impl AsRawFd for SealedFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for SealedFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Control-message room for [`MAX_FDS_PER_MSG`] descriptors (generously
/// sized and 8-byte aligned, as `cmsghdr` wants).
#[repr(C, align(8))]
struct CmsgBuf([u8; 512]);

/// Bytes of a control message holding `n` descriptors, without the
/// padding after it.
fn cmsg_len(n: usize) -> usize {
    // SAFETY: CMSG_LEN is arithmetic on its argument only.
    unsafe { libc::CMSG_LEN((n * std::mem::size_of::<RawFd>()) as u32) as usize }
}

/// Bytes of control data needed for `n` descriptors.
fn cmsg_space(n: usize) -> usize {
    // SAFETY: CMSG_SPACE is arithmetic on its argument only.
    unsafe { libc::CMSG_SPACE((n * std::mem::size_of::<RawFd>()) as u32) as usize }
}

/// [`crate::read::read_spare`] that also takes the descriptors sent with
/// the bytes (`SCM_RIGHTS`, close-on-exec) and appends them to `fds`.
///
/// A control message truncated by the kernel (more descriptors than room,
/// or this process out of descriptors: those are closed by the kernel) is
/// an error of kind `InvalidData`: the stream's descriptors can no longer
/// be matched to its frames.
pub fn read_spare_fds(
    sock: &impl AsRawFd,
    buf: &mut BytesMut,
    fds: &mut FdQueue,
) -> io::Result<usize> {
    read_spare_fds_at_most(sock, buf, fds, MAX_FDS_PER_MSG, usize::MAX)
}

/// [`read_spare_fds`] with room for `max` descriptors (at most
/// [`MAX_FDS_PER_MSG`]; 0: none) and taking at most `max_len` bytes: a
/// message that carries more descriptors is an `InvalidData` error, its
/// descriptors past `max` never installed in this process (the kernel drops
/// them, as it drops those of a socket closed unread: no close(2) of them
/// here).
pub fn read_spare_fds_at_most(
    sock: &impl AsRawFd,
    buf: &mut BytesMut,
    fds: &mut FdQueue,
    max: usize,
    max_len: usize,
) -> io::Result<usize> {
    let max = max.min(MAX_FDS_PER_MSG);
    let spare = buf.chunk_mut();
    let mut iov = libc::iovec {
        iov_base: spare.as_mut_ptr().cast(),
        iov_len: spare.len().min(max_len),
    };
    let mut cbuf = CmsgBuf([0; 512]);
    debug_assert!(cmsg_space(MAX_FDS_PER_MSG) <= cbuf.0.len());
    // SAFETY: a zeroed msghdr is valid (no name, no data, no control).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.0.as_mut_ptr().cast();
    // Room for exactly `max` (the kernel installs at most
    // `(msg_controllen - sizeof(cmsghdr)) / sizeof(int)`, none when that is
    // 0, and flags the rest MSG_CTRUNC).
    msg.msg_controllen = cmsg_len(max) as _;
    // SAFETY: `iov` points to the spare capacity of `buf` (valid for
    // writes of `iov_len` bytes while `buf` is borrowed here) and
    // `msg_control` to `msg_controllen` bytes of `cbuf`; recvmsg writes
    // only there, through raw pointers (no reference to uninitialised
    // bytes is made).
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    // SAFETY: the kernel initialised the first `n <= iov_len` spare bytes.
    unsafe { buf.advance_mut(n) };
    // SAFETY: `msg` was filled by recvmsg: CMSG_FIRSTHDR/NXTHDR walk the
    // `msg_controllen` bytes of `cbuf` it reported, and each header they
    // return lies inside it.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        // SAFETY: `cmsg` is a non-null header inside `cbuf` (see above);
        // read unaligned-safe by value.
        let hdr = unsafe { std::ptr::read_unaligned(cmsg) };
        if hdr.cmsg_level == libc::SOL_SOCKET && hdr.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: CMSG_LEN is arithmetic; CMSG_DATA points inside the
            // header's own `cmsg_len` bytes within `cbuf`.
            let (data, len) = unsafe { (libc::CMSG_DATA(cmsg), libc::CMSG_LEN(0) as usize) };
            let count = (hdr.cmsg_len as usize).saturating_sub(len) / std::mem::size_of::<RawFd>();
            for i in 0..count {
                // SAFETY: `count` descriptors follow CMSG_DATA within the
                // message; read by value without alignment assumptions.
                let raw = unsafe { std::ptr::read_unaligned(data.cast::<RawFd>().add(i)) };
                // SAFETY: the kernel just installed `raw` in this process
                // for us alone (SCM_RIGHTS); nothing else owns it.
                fds.push_back(unsafe { OwnedFd::from_raw_fd(raw) });
            }
        }
        // SAFETY: as for CMSG_FIRSTHDR above.
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "descriptors sent with the data were truncated (too many at once, or out of descriptors)",
        ));
    }
    Ok(n)
}

/// [`crate::read::read_some`] that also takes descriptors
/// ([`read_spare_fds`]).
///
/// The kernel ends a read at a message that carries descriptors, so a
/// short read that took descriptors does not mean the socket is drained:
/// readiness is kept and the next call reads on without waiting.
pub async fn read_some_fds(
    rd: &Registered,
    buf: &mut BytesMut,
    fds: &mut FdQueue,
    room: impl FnMut(&mut BytesMut) -> usize,
) -> io::Result<usize> {
    let gate = || std::future::ready(());
    let (n, ()) = read_some_fds_at_most(rd, buf, fds, room, || MAX_FDS_PER_MSG, gate).await?;
    Ok(n)
}

/// [`read_some_fds`] taking at most `max()` descriptors
/// ([`read_spare_fds_at_most`]), `max` asked when the socket is readable,
/// just before the read; and awaiting `gate()` before each read, once the
/// socket is readable, its value returned with the bytes read (see
/// `read::read_with`).
pub async fn read_some_fds_at_most<G, Gate: std::future::Future<Output = G>>(
    rd: &Registered,
    buf: &mut BytesMut,
    fds: &mut FdQueue,
    room: impl FnMut(&mut BytesMut) -> usize,
    mut max: impl FnMut() -> usize,
    gate: impl FnMut() -> Gate,
) -> io::Result<(usize, G)> {
    let read = |sock: &std::os::unix::net::UnixStream, buf: &mut BytesMut, max_len: usize| {
        let before = fds.len();
        let n = read_spare_fds_at_most(sock, buf, fds, max(), max_len)?;
        Ok((n, fds.len() != before))
    };
    crate::read::read_with(rd, buf, room, read, gate).await
}

/// What the peer of the Unix stream socket `fd` has not read yet of what
/// was sent on it, at least (`SIOCOUTQ`: the kernel's memory of the
/// messages sent and not read whole, counting each message's overhead, so
/// never less than their unread bytes; 0 once everything sent was read, or
/// the peer closed its end, which discards what it had not read).
pub fn unread_sent(fd: RawFd) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (TIOCOUTQ) writes one int to the pointer given,
    // which points at `n`, alive for the call.
    let r = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut n as *mut libc::c_int) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n.max(0) as usize)
}

/// One `sendmsg(2)` of `parts` with `fds` attached (`SCM_RIGHTS`),
/// `MSG_NOSIGNAL`. The descriptors are sent if any byte is (`Ok(n > 0)`).
/// From 1 to [`MAX_FDS_PER_MSG`] descriptors: others are `InvalidInput`
/// (the control buffer holds no more, and receivers take no more).
pub fn send_with_fds(fd: RawFd, parts: &[&[u8]], fds: &[RawFd]) -> io::Result<usize> {
    if fds.is_empty() || fds.len() > MAX_FDS_PER_MSG {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} descriptors for one message (1 to {MAX_FDS_PER_MSG})",
                fds.len()
            ),
        ));
    }
    let iov: Vec<libc::iovec> = parts
        .iter()
        .filter(|p| !p.is_empty())
        .map(|p| libc::iovec {
            iov_base: p.as_ptr() as *mut libc::c_void,
            iov_len: p.len(),
        })
        .collect();
    let mut cbuf = CmsgBuf([0; 512]);
    let space = cmsg_space(fds.len());
    // SAFETY: a zeroed msghdr is valid (no name, no data, no control).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = iov.len() as _;
    msg.msg_control = cbuf.0.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: `msg_control` points to `space <= 512` zeroed bytes of
    // `cbuf` (at most `MAX_FDS_PER_MSG` descriptors, checked above, and the
    // `cbuf_holds_the_most_descriptors` test), aligned for cmsghdr:
    // CMSG_FIRSTHDR returns its start, and the header plus `fds.len()`
    // descriptors fit in `space` bytes.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of_val(fds) as u32) as _;
        std::ptr::copy_nonoverlapping(
            fds.as_ptr().cast::<u8>(),
            libc::CMSG_DATA(cmsg),
            std::mem::size_of_val(fds),
        );
    }
    // SAFETY: `msg` points to `iov` (each entry readable memory borrowed
    // from `parts` for the call) and to the control data built above;
    // sendmsg only reads them. The descriptors are open (owned by the
    // caller's queue).
    let r = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn cbuf_holds_the_most_descriptors() {
        assert!(cmsg_space(MAX_FDS_PER_MSG) <= std::mem::size_of::<CmsgBuf>());
    }

    #[test]
    fn too_many_descriptors_for_one_message_are_refused() {
        let (a, _b) = UnixStream::pair().expect("pair");
        let s = SealedFd::create(b"x").expect("create");
        let fds = vec![s.fd.as_raw_fd(); 200];
        for n in [0, MAX_FDS_PER_MSG + 1, 200] {
            let e = send_with_fds(a.as_raw_fd(), &[b"frame"], &fds[..n]).expect_err("refused");
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{n}: {e}");
        }
        let n = send_with_fds(a.as_raw_fd(), &[b"frame"], &fds[..MAX_FDS_PER_MSG]).expect("sent");
        assert_eq!(n, 5);
    }

    #[test]
    fn a_created_payload_is_sealed_and_maps_back_exactly() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let s = SealedFd::create(&data).expect("create");
        assert_eq!(s.len(), data.len());
        let dup = s.fd.try_clone().expect("dup");
        let v = SealedFd::verify(dup, 1 << 20).expect("sealed memfd");
        assert_eq!(&v.map().expect("map")[..], &data[..]);
        // Sealed: no write, no resize.
        let mut f = File::from(s.fd.try_clone().expect("dup"));
        assert!(f.write_all(b"x").is_err(), "write sealed");
        assert!(f.set_len(1).is_err(), "shrink sealed");
        // Too large for the receiver.
        let dup = s.fd.try_clone().expect("dup");
        assert!(matches!(
            SealedFd::verify(dup, 1000),
            Err(FdError::BadSize {
                len: 200_000,
                max: 1000
            })
        ));
    }

    /// A sealed memfd made with `MFD_HUGETLB` (sized, never written) passed
    /// every check, and with no huge pages reserved no one could map it:
    /// the broker closed each instance of the service it was delivered to
    /// (red-team pass 4). Only plain shmem memfds are taken.
    #[test]
    fn huge_page_memfds_are_refused() {
        let flags = MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING | MemfdFlags::HUGETLB;
        let fd = match rustix::fs::memfd_create("zrpc-test", flags) {
            Ok(fd) => fd,
            Err(e) => {
                eprintln!("SKIPPED huge_page_memfds_are_refused: no hugetlbfs memfds here ({e})");
                return;
            }
        };
        rustix::fs::ftruncate(&fd, 2 << 20).expect("size");
        rustix::fs::fcntl_add_seals(&fd, SEALS).expect("seal");
        assert!(rustix::fs::fcntl_get_seals(&fd)
            .expect("seals")
            .contains(SealFlags::SEAL));
        assert!(matches!(
            SealedFd::verify(fd, 16 << 20),
            Err(FdError::NotShmem)
        ));
    }

    #[test]
    fn unsealed_memfds_and_other_files_are_refused() {
        let fd = rustix::fs::memfd_create("t", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)
            .expect("memfd");
        File::from(fd.try_clone().expect("dup"))
            .write_all(b"abc")
            .expect("write");
        assert!(matches!(
            SealedFd::verify(fd.try_clone().expect("dup"), 100),
            Err(FdError::NotSealed(_))
        ));
        // Sealed against writes only: still refused (it could grow).
        rustix::fs::fcntl_add_seals(&fd, SealFlags::WRITE).expect("seal");
        assert!(matches!(
            SealedFd::verify(fd, 100),
            Err(FdError::NotSealed(_))
        ));
        let (a, _b) = UnixStream::pair().expect("pair");
        assert!(matches!(
            SealedFd::verify(OwnedFd::from(a), 100),
            Err(FdError::NotMemfd)
        ));
        let file = File::open("/proc/self/status").expect("open");
        assert!(matches!(
            SealedFd::verify(OwnedFd::from(file), 1 << 20),
            Err(FdError::NotMemfd)
        ));
    }

    #[test]
    fn descriptors_arrive_with_the_bytes_they_were_sent_with() {
        let (a, b) = UnixStream::pair().expect("pair");
        let one = SealedFd::create(b"payload one").expect("create");
        let two = SealedFd::create(b"payload two!").expect("create");
        let n = send_with_fds(
            a.as_raw_fd(),
            &[b"head", b"tail"],
            &[one.as_raw_fd(), two.as_raw_fd()],
        )
        .expect("send");
        assert_eq!(n, 8);
        let mut buf = BytesMut::with_capacity(64);
        let mut fds = FdQueue::new();
        let got = read_spare_fds(&b, &mut buf, &mut fds).expect("recv");
        assert_eq!(&buf[..got], b"headtail");
        assert_eq!(fds.len(), 2);
        let lens: Vec<usize> = fds
            .drain(..)
            .map(|fd| SealedFd::verify(fd, 100).expect("verify").len())
            .collect();
        assert_eq!(lens, [11, 12]);
    }

    #[test]
    fn descriptors_past_the_room_given_are_never_installed() {
        let (a, b) = UnixStream::pair().expect("pair");
        let one = SealedFd::create(b"1").expect("create");
        let two = SealedFd::create(b"2").expect("create");
        let both = [one.as_raw_fd(), two.as_raw_fd()];
        for (max, installed) in [(0, 0), (1, 1), (2, 2)] {
            send_with_fds(a.as_raw_fd(), &[b"x"], &both).expect("send");
            let mut buf = BytesMut::with_capacity(64);
            let mut fds = FdQueue::new();
            let got = read_spare_fds_at_most(&b, &mut buf, &mut fds, max, usize::MAX);
            assert_eq!(fds.len(), installed, "room for {max}");
            if max < 2 {
                let e = got.expect_err("truncated");
                assert_eq!(e.kind(), io::ErrorKind::InvalidData, "room for {max}");
            } else {
                assert_eq!(got.expect("recv"), 1);
            }
        }
        // Bytes alone are read with no room at all.
        std::io::Write::write_all(&mut &a, b"plain").expect("write");
        let mut buf = BytesMut::with_capacity(64);
        let mut fds = FdQueue::new();
        assert_eq!(
            read_spare_fds_at_most(&b, &mut buf, &mut fds, 0, usize::MAX).expect("recv"),
            5
        );
    }
}
