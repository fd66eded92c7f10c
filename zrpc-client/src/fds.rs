//! Payloads in descriptors, for both clients: which call frames go with
//! their payload in a sealed memfd, how such a frame is queued, and how a
//! payload that came in a descriptor is verified and mapped (docs/protocol.md,
//! "Payloads in descriptors"). The descriptor passing itself is
//! [`zrpc_io::fdpass`].

use std::collections::VecDeque;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use zrpc_io::fdpass::{FdQueue, SealedFd, FD_PAYLOAD_MIN};
use zrpc_io::OutQueue;
use zrpc_proto::{Batch, ErrorCode, HEADER_LEN};

use crate::common::{Dead, OutFrame, LARGE_FRAME};

impl OutFrame {
    /// Whether the frame goes with its payload in a sealed memfd on a
    /// connection that negotiated it (`fds`): its payload is at least
    /// [`FD_PAYLOAD_MIN`] bytes.
    pub(crate) fn fd_sized(&self, fds: bool) -> bool {
        fds && self.payload_len().is_some_and(|n| n >= FD_PAYLOAD_MIN)
    }

    /// The same frame with its payload in a sealed memfd: the head to
    /// send (header with [`zrpc_proto::FD_PAYLOAD_FLAG`], envelope) and
    /// the descriptor. A payload that is a whole mapped sealed memfd (encoded
    /// into one by `call_frame`, or received) is sent as that descriptor;
    /// any other is copied into a new one. The frame keeps its payload
    /// either way, so a call resubmitted to another broker (which may not
    /// take descriptors) still has it.
    pub(crate) fn to_fd_form(&self) -> std::io::Result<(Bytes, Arc<SealedFd>)> {
        let head = self.head();
        let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "corrupt frame");
        let env_len = u32::from_be_bytes(
            head.get(4..8)
                .ok_or_else(bad)?
                .try_into()
                .map_err(|_| bad())?,
        ) as usize;
        let env_end = HEADER_LEN + env_len;
        let envelope = head.get(HEADER_LEN..env_end).ok_or_else(bad)?;
        let payload = if self.tail.is_empty() {
            &head[env_end..]
        } else if env_end == head.len() {
            &self.tail[..]
        } else {
            return Err(bad());
        };
        let fd = match zrpc_io::mapped::sealed_whole(payload) {
            Some(fd) => fd,
            None => Arc::new(SealedFd::create(payload)?),
        };
        let mut out = BytesMut::with_capacity(HEADER_LEN + env_len);
        out.extend_from_slice(&(env_len as u32).to_be_bytes());
        out.extend_from_slice(&(env_len as u32 | zrpc_proto::FD_PAYLOAD_FLAG).to_be_bytes());
        out.extend_from_slice(envelope);
        Ok((out.freeze(), fd))
    }
}

/// Appends a frame whose payload travels in `fd` to `q` (`head`: its
/// header and envelope, as [`OutFrame::to_fd_form`] made them).
pub(crate) fn queue_fd_frame(q: &mut OutQueue, head: &[u8], fd: Arc<SealedFd>) {
    q.push_fd(fd);
    q.push_copy(head);
}

/// Appends `frame` to `q`: with its payload in a sealed memfd if `fds`
/// and it is large ([`OutFrame::fd_sized`]; inline if the memfd cannot be
/// made), else both parts (a large part by reference).
pub(crate) fn queue_frame(q: &mut OutQueue, frame: &OutFrame, fds: bool) {
    if frame.fd_sized(fds) {
        match frame.to_fd_form() {
            Ok((head, fd)) => return queue_fd_frame(q, &head, fd),
            Err(e) => {
                tracing::debug!(error = %e, "zrpc-client: cannot put a payload in a memfd; sending it inline");
            }
        }
    }
    let head = frame.head();
    if head.len() < LARGE_FRAME {
        q.push_copy(head);
    } else {
        q.push_shared(frame.head_from(0));
    }
    q.push(&frame.tail, LARGE_FRAME);
}

/// The next received descriptor as a payload: verified to be a sealed
/// memfd of at most `max` bytes before it is mapped read-only. A missing or
/// refused descriptor ends the connection (the broker broke the protocol).
fn map_fd_payload(fds: &mut FdQueue, max: u32) -> Result<Bytes, Dead> {
    let bad = |m: String| Dead::Fatal(ErrorCode::Protocol, m);
    let fd = fds.pop_front().ok_or_else(|| {
        bad("a frame from the broker announced a descriptor that did not come".into())
    })?;
    let sealed = SealedFd::verify(fd, max as usize)
        .map_err(|e| bad(format!("bad payload descriptor from the broker: {e}")))?;
    sealed
        .into_bytes()
        .map_err(|e| Dead::Disconnected(format!("cannot map a payload descriptor: {e}")))
}

/// The payloads of the frames of `batch` that came in descriptors, in
/// frame order: each takes the next descriptor of `fds`, through
/// [`map_fd_payload`] (done outside the client's lock, before the batch
/// is dispatched).
pub(crate) fn map_fd_payloads(
    batch: &Batch,
    fds: &mut FdQueue,
    max: u32,
) -> Result<VecDeque<Bytes>, Dead> {
    let mut mapped = VecDeque::new();
    let mut frames = batch.frames();
    while let Some((_, _, has_fd)) = frames.next_with_fd() {
        if has_fd {
            mapped.push_back(map_fd_payload(fds, max)?);
        }
    }
    Ok(mapped)
}

/// What a blocking reader keeps of a connection between reads: the bytes
/// of partial frames, and the descriptors that came ahead of their frames.
#[derive(Debug, Default)]
pub(crate) struct Incoming {
    /// Bytes read and not yet taken as frames.
    pub(crate) buf: BytesMut,
    /// Descriptors read and not yet given to a frame.
    pub(crate) fds: FdQueue,
}

impl Incoming {
    /// One read of the blocking socket `sock` into the spare room of
    /// `buf`, taking the descriptors sent with the bytes too if the
    /// connection passes them (`fds`). Errors are the syscall's.
    pub(crate) fn read(&mut self, sock: &UnixStream, fds: bool) -> std::io::Result<usize> {
        if fds {
            zrpc_io::fdpass::read_spare_fds(sock, &mut self.buf, &mut self.fds)
        } else {
            zrpc_io::read_spare(sock, &mut self.buf)
        }
    }

    /// Forgets everything (the connection ended; its descriptors close).
    pub(crate) fn clear(&mut self) {
        self.buf.clear();
        self.fds.clear();
    }
}
