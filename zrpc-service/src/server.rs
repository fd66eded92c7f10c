//! The service loop: connection to the broker, request dispatch, file
//! descriptor callbacks.

use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::io::{self, Write};
use std::os::unix::io::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::time::Instant;
use zrpc_proto::reactor::{register, register_dup, Registered};
use zrpc_proto::{
    encode_frame, encode_header, socket_path, validate_name, Envelope, ErrorCode, Frame,
    FrameDecoder, ProtoError, DEFAULT_MAX_MESSAGE_SIZE, PROTOCOL_VERSION,
};

use crate::cache::{Outcome, ReplyCache, DEFAULT_MAX_BYTES, DEFAULT_MAX_ENTRIES};
use crate::context::Name;
use crate::unwind::{panicked, CatchUnwind};
use crate::{Caller, Context, HandlerError, MethodInfo, Service, DESCRIBE_METHOD};
use std::rc::Rc;
use zrpc_proto::busy_poll::BusyPoll;

/// How long connecting, the handshake and name registration may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest error message sent in a `Reply`; longer ones are truncated.
const MAX_ERROR_MESSAGE: usize = 64 * 1024;

/// Upper bound of the size of a `Reply` envelope with an empty message.
const REPLY_ENVELOPE_MAX: usize = 16;

/// Batched replies are written out at the latest when this many bytes are
/// pending.
const FLUSH_THRESHOLD: usize = 256 * 1024;

/// `serve` lets other tasks run after this many steps (see `block_on`).
const YIELD_EVERY_STEPS: u32 = 512;

/// Batched replies are written out at the latest after this many: with a
/// burst of requests queued, the broker forwards the first replies (and the
/// callers send their next calls) while the rest are handled, instead of
/// every process waiting for the whole burst.
const FLUSH_REPLIES: usize = 16;

/// Reply payloads of at least this many bytes are not copied into `wbuf`:
/// they are queued by reference and written with one `writev` together with
/// the bytes around them.
const LARGE_PAYLOAD: usize = 8 * 1024;

/// Frames at least this large are read into an allocation of their own
/// (see `Conn::read_more`).
const OWN_BUFFER_FRAME: usize = 64 * 1024;

/// Most slices handed to one `writev`.
const MAX_IOVECS: usize = 64;

/// Batched replies are written out at the latest this long after the last
/// write, even while requests are still queued (a burst of slow synchronous
/// handlers must not hold back earlier replies, nor pongs, for long).
const FLUSH_INTERVAL: Duration = Duration::from_millis(2);

/// Default shortest delay before a reconnection attempt.
const DEFAULT_BACKOFF_MIN: Duration = Duration::from_millis(10);

/// Default longest delay between reconnection attempts.
const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The `agent` string sent in `Hello`.
const AGENT: &str = concat!("zrpc-service/", env!("CARGO_PKG_VERSION"));

/// Errors of the service loop.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The broker socket could not be connected.
    #[error("cannot connect to zrpcd at {}: {source}{}", path.display(), zrpc_proto::connect_hint(source))]
    Connect {
        /// The socket path tried.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The broker at the socket runs as a user this process does not trust
    /// (not root, not itself, not `$ZRPC_BROKER_UID`): nothing was sent to
    /// it, and no name registered.
    #[error(transparent)]
    UntrustedBroker(#[from] zrpc_proto::UntrustedBroker),
    /// Reading from or writing to the broker connection failed.
    #[error("I/O error on the zrpcd connection: {0}")]
    Io(#[source] io::Error),
    /// The broker closed the connection.
    #[error("zrpcd closed the connection")]
    Disconnected,
    /// The broker sent a frame or envelope that does not decode.
    #[error("protocol error from zrpcd: {0}")]
    Protocol(#[from] ProtoError),
    /// The broker sent a message this library does not expect.
    #[error("unexpected message from zrpcd: {0}")]
    Unexpected(String),
    /// The broker reported a fatal error and closed the connection.
    #[error("zrpcd reported a fatal error ({code}): {message}")]
    Fatal {
        /// The error code.
        code: ErrorCode,
        /// The broker's explanation.
        message: String,
    },
    /// The handshake or the registration of the names took too long.
    #[error("zrpcd did not complete the handshake within {0:?}")]
    HandshakeTimeout(Duration),
    /// Another live service holds the name exclusively (or this server is
    /// not shared while the holders are, or the other way round).
    #[error("service name {name:?} is already taken (use .shared(true) on every instance to run several)")]
    NameTaken {
        /// The name.
        name: String,
    },
    /// The broker's access policy does not let this user own the name (it
    /// is reserved for another user, or held by another user's service).
    #[error("not allowed to register service name {name:?}: {message}")]
    AccessDenied {
        /// The name.
        name: String,
        /// The broker's explanation (which rule, which uid).
        message: String,
    },
    /// The service name breaks the naming rules.
    #[error("invalid service name {name:?}: {message}")]
    InvalidName {
        /// The name.
        name: String,
        /// Why.
        message: String,
    },
    /// Registering a name failed for another reason (e.g. a limit).
    #[error("cannot register service name {name:?} ({code}): {message}")]
    Register {
        /// The name.
        name: String,
        /// The broker's error code.
        code: ErrorCode,
        /// The broker's explanation.
        message: String,
    },
    /// The server has no name to register.
    #[error("the server has no service name to register")]
    NoName,
    /// A registered file descriptor cannot be watched (e.g. it is closed or
    /// is a regular file, which epoll does not support). The registration
    /// is removed.
    #[error("cannot watch file descriptor {fd}: {source}")]
    Fd {
        /// The descriptor.
        fd: RawFd,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The internal tokio runtime could not be created.
    #[error("cannot create the tokio runtime: {0}")]
    Runtime(#[source] io::Error),
    /// `run`/`run_once` was called from inside a tokio runtime.
    #[error("Server::run/run_once cannot be called from within a tokio runtime; use `serve().await` or `serve_once().await`")]
    NestedRuntime,
}

impl Error {
    fn from_io(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::UnexpectedEof => Error::Disconnected,
            _ => Error::Io(e),
        }
    }

    /// Whether the error ends the broker connection (the next call of a run
    /// method reconnects and registers the names again).
    pub fn is_connection_error(&self) -> bool {
        !matches!(
            self,
            Error::Fd { .. } | Error::Runtime(_) | Error::NestedRuntime
        )
    }

    /// Whether a lost connection with this error is worth reconnecting:
    /// I/O errors, end of stream, handshake timeouts, undecodable frames
    /// and `Fatal` of any code except `VersionMismatch` (retrying cannot
    /// help there). Registration refusals (`NameTaken`, `InvalidName`,
    /// other `Ack` errors) are not.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Connect { .. }
            | Error::Io(_)
            | Error::Disconnected
            | Error::Protocol(_)
            | Error::Unexpected(_)
            | Error::HandshakeTimeout(_) => true,
            Error::Fatal { code, .. } => *code != ErrorCode::VersionMismatch,
            _ => false,
        }
    }
}

/// What one step of the service loop did ([`Server::run_once`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A request was handled and answered (successfully or with an error).
    /// If the connection it came on was lost while its handler ran, the
    /// answer could not be sent; it is in the reply cache for the re-sent
    /// call.
    Request {
        /// The called method.
        method: String,
    },
    /// The broker cancelled the running request; its handler was dropped and
    /// no reply was sent.
    Cancelled {
        /// The method whose handler was dropped.
        method: String,
    },
    /// A re-sent request (same `(caller_instance, caller_call)` as one
    /// already handled) was answered from the reply cache; the handler did
    /// not run and the request counter did not change.
    Replayed {
        /// The called method.
        method: String,
    },
    /// The callback of a registered file descriptor ran.
    Fd(RawFd),
}

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

/// Something naming a file descriptor to [`Server::register`]: a raw
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

struct FdWatch<S> {
    fd: RawFd,
    callback: FdCallback<S>,
    /// A duplicate of `fd`, registered with the reactor; created lazily
    /// inside the runtime.
    async_fd: Option<AsyncFd<OwnedFd>>,
}

/// A request received and not yet handled.
struct Pending {
    id: u64,
    service: Name,
    method: Name,
    deadline: Option<std::time::Instant>,
    caller_instance: u64,
    caller_call: u64,
    caller: Option<Caller>,
    payload: Bytes,
    /// The frame was read into an allocation of its own (see
    /// [`Conn::read_more`]): keeping a view of it pins nothing else.
    own_buffer: bool,
}

/// What a frame asks the connection owner to do besides the bookkeeping
/// [`Conn::handle_frame`] does itself.
enum FrameAction {
    None,
    Welcome {
        max_message_size: u32,
    },
    Ack {
        req: u64,
        code: Option<ErrorCode>,
        message: String,
    },
    CancelRunning,
}

/// The broker connection: socket, buffers, and requests received but not
/// yet handled. Reading is cancel-safe (bytes land in `rbuf`), writing is
/// batched: `chunks` (written first) then `wbuf`.
///
/// The socket is registered with the reactor for readability only: tokio's
/// own `UnixStream` registers for READABLE|WRITABLE, edge-triggered, and
/// then every time the broker reads what we wrote, `EPOLLOUT` wakes the
/// process for nothing. Writes go straight to the socket; only while the socket
/// is full is a duplicate registered for writability (`wr_wait`).
struct Conn {
    /// The socket, non-blocking, registered for readability; written to
    /// directly through `rd.get_ref()`. One fd per connection.
    rd: Registered,
    /// A duplicate of `sock` registered for writability, only while a flush
    /// found the socket full.
    wr_wait: Option<Registered>,
    /// The read buffer, kept for the life of the connection: once the
    /// frames split off it are dropped, `reserve` reuses its allocation.
    rbuf: BytesMut,
    /// Bytes to write before `wbuf`: earlier `wbuf` contents and large reply
    /// payloads queued by reference.
    chunks: VecDeque<Bytes>,
    /// Bytes in `chunks`.
    chunk_bytes: usize,
    wbuf: BytesMut,
    decoder: FrameDecoder,
    max_message_size: u32,
    queue: VecDeque<Pending>,
    /// A `Pong` waits in `wbuf`: write it out before the next handler.
    pong_pending: bool,
    /// When `wbuf` was last written out completely.
    last_flush: std::time::Instant,
    /// `last_flush + FLUSH_INTERVAL`, so that the per-request check is a
    /// comparison, not a subtraction.
    flush_due: std::time::Instant,
    /// The regular read buffer, parked while a large frame is read into an
    /// allocation of its own.
    parked: Option<BytesMut>,
    /// The frame last returned by `next_frame` had an allocation of its own.
    frame_own_buffer: bool,
    /// Replies appended since the last complete flush.
    unflushed: usize,
    /// The busy poller watching this connection, under `run`/`run_once`.
    busy_poll: Option<Rc<BusyPoll>>,
}

impl Conn {
    /// Takes over a connected socket; must be called inside the runtime.
    fn new(sock: std::os::unix::net::UnixStream) -> io::Result<Self> {
        sock.set_nonblocking(true)?;
        let rd = register(sock, Interest::READABLE)?;
        // Only inside `run`/`run_once` (the server's own runtime).
        let busy_poll = BusyPoll::current();
        if let Some(bp) = &busy_poll {
            bp.watch_or_log(rd.as_raw_fd());
        }
        let now = std::time::Instant::now();
        Ok(Conn {
            busy_poll,
            rd,
            wr_wait: None,
            rbuf: BytesMut::with_capacity(64 * 1024),
            chunks: VecDeque::new(),
            chunk_bytes: 0,
            wbuf: BytesMut::with_capacity(64 * 1024),
            decoder: FrameDecoder::new(DEFAULT_MAX_MESSAGE_SIZE),
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            queue: VecDeque::new(),
            pong_pending: false,
            last_flush: now,
            flush_due: now + FLUSH_INTERVAL,
            parked: None,
            frame_own_buffer: false,
            unflushed: 0,
        })
    }

    /// Reads more bytes into `rbuf`. Cancel-safe.
    ///
    /// A large frame (>= [`OWN_BUFFER_FRAME`]) is read into an allocation of
    /// exactly its size: its payload may be returned by the handler as is
    /// (a [`Blob`](crate::Blob) argument is a view into it) and kept by the
    /// reply cache, which must then not pin a read buffer holding other
    /// frames, nor copy the payload.
    async fn read_more(&mut self) -> Result<(), Error> {
        let needed = self.decoder.needed(&self.rbuf);
        if let Some(total) = needed {
            // `needed` is `Some` only for an incomplete first frame, and
            // complete frames are consumed before reading: `rbuf` holds
            // just the beginning of this frame.
            if total >= OWN_BUFFER_FRAME && self.parked.is_none() {
                let mut own = BytesMut::with_capacity(total);
                own.extend_from_slice(&self.rbuf);
                self.rbuf.clear();
                self.parked = Some(std::mem::replace(&mut self.rbuf, own));
            }
        }
        let want = needed.map_or(16 * 1024, |total| total - self.rbuf.len());
        if self.parked.is_none() {
            self.rbuf.reserve(want.max(4096));
        } else {
            // Exactly the frame: no byte of the next one in its allocation.
            self.rbuf.reserve(want);
        }
        loop {
            let mut guard = self.rd.readable().await.map_err(Error::from_io)?;
            let cap = self.rbuf.capacity() - self.rbuf.len();
            match zrpc_proto::read_spare(self.rd.get_ref(), &mut self.rbuf) {
                Ok(0) => return Err(Error::Disconnected),
                Ok(n) => {
                    if let Some(bp) = &self.busy_poll {
                        bp.batch(std::time::Instant::now(), n);
                    }
                    if n < cap {
                        // A short read drained the socket: wait for the next
                        // edge instead of paying a read that would block.
                        guard.clear_ready();
                    }
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => guard.clear_ready(),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::from_io(e)),
            }
        }
    }

    /// Removes `n` written bytes from the front of `chunks`, then `wbuf`.
    fn consume(&mut self, mut n: usize) {
        while n > 0 {
            let Some(c) = self.chunks.front_mut() else {
                self.wbuf.advance(n);
                return;
            };
            if n < c.len() {
                c.advance(n);
                self.chunk_bytes -= n;
                return;
            }
            n -= c.len();
            self.chunk_bytes -= c.len();
            self.chunks.pop_front();
        }
    }

    fn next_frame(&mut self) -> Result<Option<Frame>, Error> {
        let frame = self.decoder.decode(&mut self.rbuf)?;
        self.frame_own_buffer = false;
        if frame.is_some() {
            if let Some(mut regular) = self.parked.take() {
                // The large frame is complete; `rbuf` is empty (exactly the
                // frame was read), so the regular buffer takes over again.
                regular.extend_from_slice(&self.rbuf);
                self.rbuf = regular;
                self.frame_own_buffer = true;
            }
        }
        Ok(frame)
    }

    /// Bytes waiting to be written.
    fn pending_write(&self) -> usize {
        self.chunk_bytes + self.wbuf.len()
    }

    /// One non-blocking write of the front of `chunks` then `wbuf`.
    fn try_write(&self) -> io::Result<usize> {
        if self.chunks.is_empty() {
            return self.rd.get_ref().write(&self.wbuf);
        }
        let mut iov = [io::IoSlice::new(&[]); MAX_IOVECS];
        let mut k = 0;
        for c in self.chunks.iter().take(MAX_IOVECS - 1) {
            iov[k] = io::IoSlice::new(c);
            k += 1;
        }
        if k < MAX_IOVECS && k == self.chunks.len() && !self.wbuf.is_empty() {
            iov[k] = io::IoSlice::new(&self.wbuf);
            k += 1;
        }
        self.rd.get_ref().write_vectored(&iov[..k])
    }

    /// Writes out `chunks` and `wbuf`. Cancel-safe: bytes are removed only
    /// once written.
    async fn flush(&mut self) -> Result<(), Error> {
        while self.pending_write() > 0 {
            let r = match self.wr_wait.as_ref() {
                None => self.try_write(),
                Some(w) => {
                    let mut guard = w.writable().await.map_err(Error::from_io)?;
                    let r = self.try_write();
                    if matches!(&r, Err(e) if e.kind() == io::ErrorKind::WouldBlock) {
                        guard.clear_ready();
                    }
                    r
                }
            };
            match r {
                Ok(0) => return Err(Error::Disconnected),
                Ok(n) => self.consume(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // The socket is full: wait for writability through a
                    // registration of its own, kept until the flush is done.
                    if self.wr_wait.is_none() {
                        self.wr_wait = Some(
                            register_dup(self.rd.get_ref(), Interest::WRITABLE)
                                .map_err(Error::from_io)?,
                        );
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::from_io(e)),
            }
        }
        self.wr_wait = None;
        self.pong_pending = false;
        self.unflushed = 0;
        self.last_flush = std::time::Instant::now();
        self.flush_due = self.last_flush + FLUSH_INTERVAL;
        Ok(())
    }

    /// Handles one frame: queues requests, answers pings, applies cancels
    /// of queued requests; reports what the caller must handle.
    fn handle_frame(&mut self, frame: &Frame, running: Option<u64>) -> Result<FrameAction, Error> {
        self.handle_parts(
            &frame.envelope,
            &frame.envelope,
            || frame.payload.clone(),
            running,
        )
    }

    /// [`Conn::handle_frame`] for a frame given as its envelope bytes, a
    /// buffer that holds them (names are kept as views into it) and its
    /// payload, made only for a request.
    fn handle_parts(
        &mut self,
        holder: &Bytes,
        envelope: &[u8],
        payload: impl FnOnce() -> Bytes,
        running: Option<u64>,
    ) -> Result<FrameAction, Error> {
        match Envelope::decode(envelope)? {
            Envelope::Request {
                id,
                service,
                method,
                timeout_ms,
                caller_instance,
                caller_call,
                caller,
            } => {
                let deadline = timeout_ms.and_then(|ms| {
                    std::time::Instant::now().checked_add(Duration::from_millis(ms))
                });
                self.queue.push_back(Pending {
                    id,
                    service: Name::within(holder, service),
                    method: Name::within(holder, method),
                    deadline,
                    caller_instance,
                    caller_call,
                    caller,
                    payload: payload(),
                    own_buffer: self.frame_own_buffer,
                });
                Ok(FrameAction::None)
            }
            Envelope::Cancel { id } => {
                if running == Some(id) {
                    return Ok(FrameAction::CancelRunning);
                }
                let before = self.queue.len();
                self.queue.retain(|p| p.id != id);
                if self.queue.len() == before {
                    tracing::trace!(id, "cancel of a request that is not pending");
                }
                Ok(FrameAction::None)
            }
            Envelope::Ping { nonce } => {
                encode_frame(&mut self.wbuf, &Envelope::Pong { nonce }, &[]);
                self.pong_pending = true;
                Ok(FrameAction::None)
            }
            Envelope::Pong { .. } => Ok(FrameAction::None),
            Envelope::Welcome {
                max_message_size, ..
            } => Ok(FrameAction::Welcome { max_message_size }),
            Envelope::Ack { req, code, message } => Ok(FrameAction::Ack {
                req,
                code,
                message: message.to_string(),
            }),
            Envelope::Fatal { code, message } => Err(Error::Fatal {
                code,
                message: message.to_string(),
            }),
            other => Err(Error::Unexpected(format!("{:?} message", other.kind()))),
        }
    }

    /// Handles every complete frame in `rbuf`. Returns whether the running
    /// request (`running`) was cancelled. A connection error in the same
    /// batch wins over a cancel: zrpcd's shutdown cancels delivered calls
    /// right before `Fatal{Shutdown}`, and the clients resubmit them, so the
    /// handler had better finish and leave its outcome in the reply cache.
    fn process(&mut self, running: Option<u64>) -> Result<bool, Error> {
        let mut cancelled = false;
        while self.parked.is_some() {
            // A large frame read into an allocation of its own: taken as
            // it is (`next_frame` then returns to the regular buffer).
            let Some(frame) = self.next_frame()? else {
                return Ok(cancelled);
            };
            let action = self.handle_frame(&frame, running)?;
            cancelled |= Self::after(action)?;
        }
        // Every complete frame in `rbuf`, taken off as one shared buffer and
        // read where it lies: a request's payload and names are slices of
        // it, nothing else takes a handle.
        let (batch, corrupt) = self.decoder.take_batch(&mut self.rbuf);
        if !batch.is_empty() {
            self.frame_own_buffer = false;
        }
        for (envelope, payload) in batch.frames() {
            let action =
                self.handle_parts(batch.bytes(), envelope, || batch.payload(payload), running)?;
            cancelled |= Self::after(action)?;
        }
        match corrupt {
            Some(e) => Err(e.into()),
            None => Ok(cancelled),
        }
    }

    /// What [`Conn::process`] does with a frame's action: whether it
    /// cancelled the running request.
    fn after(action: FrameAction) -> Result<bool, Error> {
        match action {
            FrameAction::None => Ok(false),
            FrameAction::CancelRunning => Ok(true),
            FrameAction::Ack { req, code, message } => {
                tracing::debug!(req, ?code, message, "unexpected Ack ignored");
                Ok(false)
            }
            FrameAction::Welcome { .. } => Err(Error::Unexpected("a second Welcome".to_string())),
        }
    }

    /// Appends the reply to request `id`.
    fn write_outcome(&mut self, id: u64, outcome: &Outcome) {
        self.unflushed += 1;
        match outcome {
            Ok(payload) if payload.len() >= LARGE_PAYLOAD => {
                encode_header(
                    &mut self.wbuf,
                    &Envelope::Reply {
                        id,
                        code: None,
                        message: "",
                    },
                    payload.len(),
                );
                let head = self.wbuf.split().freeze();
                self.chunk_bytes += head.len() + payload.len();
                self.chunks.push_back(head);
                self.chunks.push_back(payload.clone());
            }
            Ok(payload) => encode_frame(
                &mut self.wbuf,
                &Envelope::Reply {
                    id,
                    code: None,
                    message: "",
                },
                payload,
            ),
            Err((code, message)) => encode_frame(
                &mut self.wbuf,
                &Envelope::Reply {
                    id,
                    code: Some(*code),
                    message: truncate(message, MAX_ERROR_MESSAGE),
                },
                &[],
            ),
        }
    }
}

/// What is sent for a handler's result: an oversized return value becomes a
/// `LimitExceeded` error, long error messages are truncated.
fn wire_outcome(result: Result<Bytes, HandlerError>, max_message_size: u32) -> Outcome {
    match result {
        Ok(p) if p.len() + REPLY_ENVELOPE_MAX > max_message_size as usize => Err((
            ErrorCode::LimitExceeded,
            format!(
                "the reply of {} bytes exceeds zrpcd's max message size of {} bytes",
                p.len(),
                max_message_size
            ),
        )),
        Ok(p) => Ok(p),
        Err(e) => Err((
            e.code(),
            truncate(e.message(), MAX_ERROR_MESSAGE).to_string(),
        )),
    }
}

/// Whether the reply cache may keep a successful reply payload by reference
/// (`true`) or must copy it: only a payload that is the sole handle to an
/// allocation of its own, not much larger than itself, or a view into a
/// request that was read into an allocation of its own (`request.2`); not a
/// view into a request in the shared read buffer (which holds other frames).
/// Returns the payload (same bytes, same allocation) for sending.
fn own_reply(outcome: Outcome, request: (usize, usize, bool)) -> (Outcome, bool) {
    let p = match outcome {
        Ok(p) if !p.is_empty() => p,
        other => return (other, false),
    };
    let start = p.as_ptr() as usize;
    if start >= request.0 && start <= request.1 {
        return (Ok(p), request.2);
    }
    match p.try_into_mut() {
        Ok(m) => {
            // `capacity` counts the spare room after the bytes: a `Vec`
            // grown by doubling has less than its length.
            let owned = m.capacity() - m.len() <= m.len();
            (Ok(m.freeze()), owned)
        }
        Err(p) => (Ok(p), false),
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// What a connection is set up with.
#[derive(Debug, Clone)]
struct Setup {
    names: Vec<String>,
    shared: bool,
    socket_dir: Option<PathBuf>,
    instance: u64,
}

type ConnectFuture = Pin<Box<dyn Future<Output = Result<Conn, Error>>>>;

impl Setup {
    /// A connection attempt (connect, handshake, register every name),
    /// bounded by [`HANDSHAKE_TIMEOUT`]. The future owns its inputs, so it
    /// can be kept across `select!` iterations.
    fn attempt(&self) -> Result<ConnectFuture, Error> {
        if self.names.is_empty() {
            return Err(Error::NoName);
        }
        for name in &self.names {
            if let Err(e) = validate_name(name) {
                return Err(Error::InvalidName {
                    name: name.clone(),
                    message: e.to_string(),
                });
            }
        }
        let dir = zrpc_proto::resolve_socket_dir(self.socket_dir.as_deref());
        let path = socket_path(&dir);
        tracing::debug!(path = %path.display(), names = ?self.names, "connecting to zrpcd");
        let names = self.names.clone();
        let (instance, shared) = (self.instance, self.shared);
        Ok(Box::pin(async move {
            tokio::time::timeout(HANDSHAKE_TIMEOUT, connect(path, instance, &names, shared))
                .await
                .map_err(|_| Error::HandshakeTimeout(HANDSHAKE_TIMEOUT))?
        }))
    }
}

/// What [`Link::work`] did.
enum Work {
    /// Frames were read and handled, or a reconnection attempt failed.
    Progress,
    /// The broker cancelled the running request.
    CancelledRunning,
}

/// The broker connection plus everything needed to get it back when it is
/// lost: the reconnection policy and its state.
struct Link {
    conn: Option<Conn>,
    /// Incremented for every new connection: request ids are only
    /// meaningful on the connection they arrived on.
    generation: u64,
    /// The reconnection attempt in progress, kept across wake-ups.
    connecting: Option<ConnectFuture>,
    /// No reconnection attempt before this instant (backoff).
    retry_at: Option<Instant>,
    /// The delay before the next attempt (before jitter).
    backoff: Duration,
    /// Failed attempts since the connection was lost.
    attempts: u32,
    /// Whether a connection was ever set up (the first one fails fast).
    ever_connected: bool,
    /// Whether READY=1 was sent to systemd.
    notified: bool,
    /// The max message size of the latest connection.
    max_message_size: u32,
    /// A hard error met while a handler was running, returned once the
    /// handler has finished.
    deferred: Option<Error>,
    reconnect: bool,
    backoff_min: Duration,
    backoff_max: Duration,
}

impl Link {
    fn new() -> Self {
        Link {
            conn: None,
            generation: 0,
            connecting: None,
            retry_at: None,
            backoff: DEFAULT_BACKOFF_MIN,
            attempts: 0,
            ever_connected: false,
            notified: false,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            deferred: None,
            reconnect: true,
            backoff_min: DEFAULT_BACKOFF_MIN,
            backoff_max: DEFAULT_BACKOFF_MAX,
        }
    }

    /// Whether a lost connection is re-established by the loop itself.
    fn reconnecting(&self) -> bool {
        self.reconnect && self.ever_connected
    }

    /// Takes a freshly registered connection into use.
    fn install(&mut self, conn: Conn) {
        self.generation += 1;
        self.max_message_size = conn.max_message_size;
        self.conn = Some(conn);
        self.connecting = None;
        self.retry_at = None;
        self.backoff = self.backoff_min;
        if self.ever_connected {
            tracing::info!(
                attempts = self.attempts + 1,
                "reconnected to zrpcd; names registered again"
            );
        }
        self.attempts = 0;
        self.ever_connected = true;
        let state = if self.notified {
            "STATUS=serving"
        } else {
            self.notified = true;
            "READY=1\nSTATUS=serving"
        };
        notify(state);
    }

    /// Forgets the connection (e.g. its runtime is gone).
    fn reset(&mut self) {
        self.conn = None;
        self.connecting = None;
    }

    /// The connection failed with `e`. Returns `Ok` if the loop reconnects
    /// by itself, else the error.
    fn lost(&mut self, e: Error) -> Result<(), Error> {
        self.conn = None;
        self.connecting = None;
        if !(self.reconnecting() && e.is_transient()) {
            tracing::debug!("dropping the zrpcd connection: {e}");
            return Err(e);
        }
        tracing::warn!("lost the connection to zrpcd ({e}); reconnecting");
        notify("STATUS=reconnecting to zrpcd");
        self.backoff = self.backoff_min;
        self.attempts = 0;
        self.schedule_retry();
        Ok(())
    }

    /// Sets the time of the next attempt: the current backoff with +-25 %
    /// jitter; the backoff then doubles up to its cap.
    fn schedule_retry(&mut self) {
        let factor = 0.75 + (random_u64() % 10_001) as f64 / 20_000.0;
        let delay = self.backoff.mul_f64(factor);
        self.retry_at = Instant::now().checked_add(delay);
        self.backoff = self.backoff.saturating_mul(2).min(self.backoff_max);
    }

    /// One unit of connection work; cancel-safe (all progress is kept in
    /// `self`). Connected: reads what is available, handles the frames
    /// (queues requests, answers pings, applies cancels; `running` is the
    /// running request's connection generation and id) and flushes.
    /// Disconnected (and reconnecting): waits for the backoff, then drives a
    /// connection attempt to its end.
    async fn work(&mut self, setup: &Setup, running: Option<(u64, u64)>) -> Result<Work, Error> {
        let generation = self.generation;
        if let Some(conn) = self.conn.as_mut() {
            let running = running.filter(|(g, _)| *g == generation).map(|(_, id)| id);
            let r = async {
                conn.read_more().await?;
                let cancelled = conn.process(running)?;
                conn.flush().await?;
                Ok(cancelled)
            }
            .await;
            return match r {
                Ok(true) => Ok(Work::CancelledRunning),
                Ok(false) => Ok(Work::Progress),
                Err(e) => self.lost(e).map(|()| Work::Progress),
            };
        }
        if !self.reconnecting() {
            return Err(Error::Disconnected);
        }
        if self.connecting.is_none() {
            if let Some(t) = self.retry_at {
                tokio::time::sleep_until(t).await;
                self.retry_at = None;
            }
            self.connecting = Some(setup.attempt()?);
        }
        let Some(attempt) = self.connecting.as_mut() else {
            return Ok(Work::Progress);
        };
        let r = attempt.await;
        self.connecting = None;
        match r {
            Ok(conn) => {
                self.install(conn);
                Ok(Work::Progress)
            }
            Err(e) if e.is_transient() => {
                self.attempts = self.attempts.saturating_add(1);
                if self.attempts == 10 || self.attempts.checked_rem(100) == Some(0) {
                    tracing::warn!(attempts = self.attempts, "still reconnecting to zrpcd: {e}");
                } else {
                    tracing::debug!("reconnection attempt failed: {e}");
                }
                self.schedule_retry();
                Ok(Work::Progress)
            }
            Err(e) => {
                tracing::error!("cannot register again after reconnecting: {e}");
                Err(e)
            }
        }
    }
}

/// Sends `state` to systemd if `$NOTIFY_SOCKET` is set.
fn notify(state: &str) {
    match zrpc_proto::sd_notify(state) {
        Ok(true) => tracing::debug!(state, "notified systemd"),
        Ok(false) => {}
        Err(e) => tracing::warn!(error = %e, "cannot notify systemd"),
    }
}

/// Connects to the broker, says hello and registers `names`. This is the
/// single place a connection is set up (a reconnect calls it again).
async fn connect(
    path: PathBuf,
    instance: u64,
    names: &[String],
    shared: bool,
) -> Result<Conn, Error> {
    let stream = tokio::net::UnixStream::connect(&path)
        .await
        .and_then(|s| s.into_std())
        .map_err(|source| Error::Connect {
            path: path.clone(),
            source,
        })?;
    zrpc_proto::check_broker(&stream, &path)?;
    let mut conn = Conn::new(stream).map_err(Error::from_io)?;
    encode_frame(
        &mut conn.wbuf,
        &Envelope::Hello {
            version: PROTOCOL_VERSION,
            instance,
            agent: AGENT,
        },
        &[],
    );
    conn.flush().await?;

    // Welcome.
    'welcome: loop {
        while let Some(frame) = conn.next_frame()? {
            match conn.handle_frame(&frame, None)? {
                FrameAction::Welcome { max_message_size } => {
                    conn.max_message_size = max_message_size;
                    conn.decoder = FrameDecoder::new(
                        max_message_size.saturating_add(zrpc_proto::INCOMING_SLACK),
                    );
                    break 'welcome;
                }
                FrameAction::None => {}
                _ => return Err(Error::Unexpected("message before Welcome".to_string())),
            }
        }
        conn.flush().await?;
        conn.read_more().await?;
    }

    // Register every name; requests may arrive as soon as the first Ack.
    for (i, name) in names.iter().enumerate() {
        encode_frame(
            &mut conn.wbuf,
            &Envelope::Register {
                req: i as u64 + 1,
                name,
                shared,
            },
            &[],
        );
    }
    let mut acked = vec![false; names.len()];
    while acked.iter().any(|a| !a) {
        conn.flush().await?;
        conn.read_more().await?;
        while let Some(frame) = conn.next_frame()? {
            match conn.handle_frame(&frame, None)? {
                FrameAction::Ack { req, code, message } => {
                    let idx = req
                        .checked_sub(1)
                        .and_then(|i| usize::try_from(i).ok())
                        .filter(|&i| i < names.len())
                        .ok_or_else(|| {
                            Error::Unexpected(format!("Ack for unknown request {req}"))
                        })?;
                    let name = names[idx].clone();
                    match code {
                        None => {
                            tracing::debug!(name, "registered");
                            acked[idx] = true;
                        }
                        Some(ErrorCode::NameTaken) => return Err(Error::NameTaken { name }),
                        Some(ErrorCode::AccessDenied) => {
                            return Err(Error::AccessDenied { name, message })
                        }
                        Some(ErrorCode::InvalidName) => {
                            return Err(Error::InvalidName { name, message })
                        }
                        Some(code) => {
                            return Err(Error::Register {
                                name,
                                code,
                                message,
                            })
                        }
                    }
                }
                FrameAction::None => {}
                FrameAction::CancelRunning => {}
                FrameAction::Welcome { .. } => {
                    return Err(Error::Unexpected("a second Welcome".to_string()))
                }
            }
        }
    }
    conn.flush().await?;
    Ok(conn)
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

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    h.write_u128(now);
    h.write_u32(std::process::id());
    h.finish()
}

#[derive(serde::Serialize)]
struct Describe<'a> {
    service: &'a str,
    methods: Vec<MethodInfo>,
}

fn describe<S: Service>(service: &S, ctx: &Context) -> Result<Bytes, HandlerError> {
    let methods =
        catch_unwind(AssertUnwindSafe(|| service.methods())).map_err(|p| panicked(&*p))?;
    crate::encode_value(&Describe {
        service: ctx.service(),
        methods,
    })
}

/// Runs one handler to completion while still serving the connection:
/// pings are answered, new requests queued, a lost connection is
/// re-established (when reconnecting), and a `Cancel` of this request drops
/// the handler (`None`). A handler is never dropped because the connection
/// is lost: it runs to its end, and a hard error met meanwhile is kept in
/// [`Link::deferred`].
async fn run_handler<S: Service>(
    service: &mut S,
    link: &mut Link,
    setup: &Setup,
    ctx: &Context,
    payload: Bytes,
) -> Option<Result<Bytes, HandlerError>> {
    if ctx.method() == DESCRIBE_METHOD {
        return Some(describe(service, ctx));
    }
    // A synchronous method runs here, without a boxed future.
    match catch_unwind(AssertUnwindSafe(|| {
        service.handle_now(ctx, ctx.method(), &payload)
    })) {
        Ok(Some(r)) => return Some(r),
        Ok(None) => {}
        Err(p) => return Some(Err(panicked(&*p))),
    }
    let fut = match catch_unwind(AssertUnwindSafe(|| {
        service.handle(ctx, ctx.method(), payload)
    })) {
        Ok(f) => f,
        Err(p) => return Some(Err(panicked(&*p))),
    };
    let mut fut = CatchUnwind::new(fut);
    // Synchronous handlers finish in their first poll; only flush the
    // replies batched so far when this one has to wait.
    if let Poll::Ready(r) = poll_fn(|cx| Poll::Ready(Pin::new(&mut fut).poll(cx))).await {
        return Some(r);
    }
    if let Some(conn) = link.conn.as_mut() {
        if let Err(e) = conn.flush().await {
            if let Err(e) = link.lost(e) {
                link.deferred = Some(e);
            }
        }
    }
    let running = Some((link.generation, ctx.request_id()));
    while link.deferred.is_none() {
        tokio::select! {
            biased;
            r = &mut fut => return Some(r),
            w = link.work(setup, running) => match w {
                Ok(Work::CancelledRunning) => return None,
                Ok(Work::Progress) => {}
                Err(e) => link.deferred = Some(e),
            }
        }
    }
    // The connection is gone for good: finish the handler anyway, so that
    // its outcome is cached.
    Some(fut.await)
}

/// A zrpc server: connects a [`Service`] to the broker under one or more
/// names and serves its requests, one at a time, plus callbacks for
/// registered file descriptors.
///
/// The connection is made lazily by the first [`run`](Self::run),
/// [`run_once`](Self::run_once), [`serve`](Self::serve) or
/// [`serve_once`](Self::serve_once). Use either the blocking methods (which
/// drive a private current-thread tokio runtime, kept between calls) or the
/// async ones under your own runtime, not both: the connection and the
/// watched descriptors belong to the runtime that created them.
///
/// If the first connection fails, the run methods return the error. Once
/// connected, a lost connection is re-established by the loop itself (see
/// [`reconnect`](Self::reconnect) and the crate documentation); with
/// `reconnect(false)` the run methods return the error instead, and calling
/// one again reconnects and registers the names again.
pub struct Server<S: Service> {
    service: S,
    setup: Setup,
    counter: u64,
    fds: Vec<FdWatch<S>>,
    next_fd: usize,
    cache: ReplyCache,
    link: Link,
    /// Busy-poll window of `run`/`run_once`, and the poller once made.
    busy_poll_window: Duration,
    busy_poll: Option<Rc<BusyPoll>>,
    // Declared last: dropped after everything registered with it.
    rt: Option<tokio::runtime::Runtime>,
}

impl<S: Service> std::fmt::Debug for Server<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("names", &self.setup.names)
            .field("shared", &self.setup.shared)
            .field("socket_dir", &self.setup.socket_dir)
            .field("instance", &self.setup.instance)
            .field("counter", &self.counter)
            .field("fds", &self.fds.iter().map(|w| w.fd).collect::<Vec<_>>())
            .field("connected", &self.link.conn.is_some())
            .field("reconnect", &self.link.reconnect)
            .field("cached_replies", &self.cache.len())
            .finish()
    }
}

impl<S: Service> Server<S> {
    /// A server for `service`, named [`Service::service_name`] (the type
    /// name in snake_case for macro services), using the default socket
    /// directory (`$ZRPC_SOCKET_DIR`, else the default, `/run/zrpc`).
    pub fn new(service: S) -> Self {
        let name = service.service_name();
        Server {
            service,
            setup: Setup {
                names: vec![name],
                shared: false,
                socket_dir: None,
                instance: random_u64(),
            },
            counter: 0,
            fds: Vec::new(),
            next_fd: 0,
            cache: ReplyCache::new(DEFAULT_MAX_ENTRIES, DEFAULT_MAX_BYTES),
            link: Link::new(),
            busy_poll_window: BusyPoll::window_from_env(zrpc_proto::busy_poll::DEFAULT_WINDOW_US),
            busy_poll: None,
            rt: None,
        }
    }

    /// Registers the service under `name` instead of its default name
    /// (replaces all names set so far).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.setup.names = vec![name.into()];
        self
    }

    /// Registers the service under an additional name.
    pub fn add_name(mut self, name: impl Into<String>) -> Self {
        let name = name.into();
        if !self.setup.names.contains(&name) {
            self.setup.names.push(name);
        }
        self
    }

    /// The names the service registers.
    pub fn names(&self) -> &[String] {
        &self.setup.names
    }

    /// With `true`, join other instances of the same name (all of which must
    /// be shared) instead of requiring the name exclusively; the broker
    /// spreads calls over the instances.
    pub fn shared(mut self, yes: bool) -> Self {
        self.setup.shared = yes;
        self
    }

    /// The directory holding the broker socket `zrpcd.sock` (the original's
    /// `socket_dir`). It must match the broker's.
    pub fn socket_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.setup.socket_dir = Some(dir.into());
        self
    }

    /// With `true` (the default), a lost broker connection (end of stream,
    /// I/O error, `Fatal` from the broker, e.g. `Shutdown`) is re-established
    /// by the run methods themselves: they log a warning, reconnect with
    /// capped exponential backoff ([`reconnect_backoff`](Self::reconnect_backoff)),
    /// register every name again and only then take calls again; they do
    /// not return. With `false`, they return the error (the behaviour before
    /// reconnection existed). The very first connection fails fast either
    /// way.
    pub fn reconnect(mut self, yes: bool) -> Self {
        self.link.reconnect = yes;
        self
    }

    /// The reconnection backoff: the first attempt after a loss waits `min`
    /// (default 10 ms), each failed attempt doubles the wait up to `max`
    /// (default 1 s); every wait is randomised by +-25 % so that many
    /// services do not reconnect in lock-step. `min` is at least 1 ms and
    /// `max` at least `min`.
    pub fn reconnect_backoff(mut self, min: Duration, max: Duration) -> Self {
        let min = min.max(Duration::from_millis(1));
        self.link.backoff_min = min;
        self.link.backoff_max = max.max(min);
        self.link.backoff = min;
        self
    }

    /// How long [`run`](Server::run) and [`run_once`](Server::run_once) keep
    /// polling the broker connection, when requests have been arriving less
    /// than this apart, before the thread sleeps until the next one (default
    /// 50 us, or `$ZRPC_BUSY_POLL_US`; zero turns it off; at most 1 ms;
    /// always off on a single CPU and under [`serve`](Server::serve)).
    ///
    /// Polling saves the wake-up of a sleeping process per request under
    /// load (on a VM the costliest part of a call: at 64 calls in flight
    /// ~1.2x the requests per second, one call at a time about half the
    /// latency, docs/performance.md), at the price of CPU while requests
    /// flow that fast: a process whose requests arrive back to back polls
    /// instead of sleeping between them, up to one CPU. It polls only while
    /// at least three in four recent requests arrived within a window of
    /// the process running out of work: never when idle, nor for a request
    /// every 100 us or more. The broker connection is polled, and so is the
    /// connection of a `zrpc_client::Client` that a handler connects on
    /// this runtime (its replies are watched too); the readiness of file
    /// descriptors added with [`register`](Server::register) and timers
    /// are seen at the end of a poll, at most one window late. Set it
    /// before the first `run`/`run_once`. How it works:
    /// `zrpc_proto::busy_poll`.
    pub fn busy_poll(mut self, window: Duration) -> Self {
        self.busy_poll_window = window;
        self
    }

    /// Bounds of the reply cache (defaults: 10,000 entries and 16 MiB of
    /// reply payloads and error messages); the oldest entry is evicted
    /// first. Either bound 0 disables the cache, and with it the
    /// de-duplication of re-sent calls. See the crate documentation.
    ///
    /// The cache must hold the replies sent shortly before a connection
    /// broke, until their calls are re-sent after the reconnect; while the
    /// broker is away no new calls arrive, so the byte bound only needs to
    /// cover the replies of the calls in flight then (16 MiB: sixteen
    /// 1 MiB replies). Raise it for services with many large concurrent
    /// calls.
    pub fn reply_cache(mut self, max_entries: usize, max_bytes: usize) -> Self {
        self.cache.set_bounds(max_entries, max_bytes);
        self
    }

    /// Number of replies in the reply cache.
    pub fn cached_replies(&self) -> usize {
        self.cache.len()
    }

    /// Bytes of reply payloads and error messages in the reply cache.
    pub fn cached_reply_bytes(&self) -> usize {
        self.cache.bytes()
    }

    /// Whether the server is connected to the broker right now.
    pub fn is_connected(&self) -> bool {
        self.link.conn.is_some()
    }

    /// The random instance id sent in `Hello` (kept across reconnects).
    pub fn instance(&self) -> u64 {
        self.setup.instance
    }

    /// Calls `callback` inside the service loop whenever `fd` is ready to be
    /// read (the original `register(fd, callback)`).
    ///
    /// The library never reads from, and never closes, the descriptor:
    /// reading is the callback's job. As with the original's `select`, the
    /// callback runs again as long as the descriptor stays readable
    /// (level-triggered). Pass a raw descriptor or a reference to anything
    /// implementing `AsRawFd` (`&file`; see [`FdSource`]). The loop watches a private
    /// duplicate of the descriptor, so [`unregister`](Self::unregister) it
    /// before closing it (otherwise the duplicate keeps the file open).
    /// Registering a descriptor again replaces its callback. The descriptor
    /// must be pollable by epoll (pipes, sockets, terminals, eventfds; not
    /// regular files), otherwise the run methods return [`Error::Fd`].
    ///
    /// Callbacks keep running while the loop reconnects to the broker.
    /// Like synchronous handlers, a callback blocks the loop (and the
    /// answers to the broker's pings) while it runs.
    ///
    /// ```no_run
    /// # use zrpc_service::{Server, ServiceBuilder};
    /// let stdin = std::io::stdin();
    /// let mut server = Server::new(ServiceBuilder::new("reader").build());
    /// server.register(&stdin, |_svc| {
    ///     let mut line = String::new();
    ///     let _ = std::io::stdin().read_line(&mut line);
    ///     println!("got {line:?}");
    /// });
    /// ```
    pub fn register(&mut self, fd: impl FdSource, callback: impl FnMut(&mut S) + 'static) {
        let fd = fd.raw_fd();
        if let Some(w) = self.fds.iter_mut().find(|w| w.fd == fd) {
            w.callback = Box::new(callback);
        } else {
            self.fds.push(FdWatch {
                fd,
                callback: Box::new(callback),
                async_fd: None,
            });
        }
    }

    /// Stops watching `fd` (the original `unregister(fd)`). Unknown
    /// descriptors are ignored.
    pub fn unregister(&mut self, fd: impl FdSource) {
        let fd = fd.raw_fd();
        self.fds.retain(|w| w.fd != fd);
    }

    /// Number of requests received so far (the original `self.counter`).
    /// Requests answered from the reply cache do not count: only those
    /// whose handler ran.
    pub fn counter(&self) -> u64 {
        self.counter
    }

    /// The service.
    pub fn service(&self) -> &S {
        &self.service
    }

    /// The service, mutably.
    pub fn service_mut(&mut self) -> &mut S {
        &mut self.service
    }

    /// Consumes the server and returns the service.
    pub fn into_service(self) -> S {
        self.service
    }

    /// Serves forever on a private tokio runtime. Returns only on a hard
    /// error: the first connection failing, [`Error::NameTaken`] when
    /// registering again after a reconnect, or (with
    /// [`reconnect(false)`](Self::reconnect)) any connection error.
    pub fn run(&mut self) -> Result<(), Error> {
        self.block_on(|s| Box::pin(s.serve()))?
    }

    /// Waits for one event, handles it and returns it: a request answered,
    /// a re-sent request answered from the reply cache, a request cancelled
    /// while running, or one file descriptor callback run. Returns
    /// `Ok(None)` if nothing happened within `timeout` (`None` waits
    /// forever). Connection and buffers persist between calls. The timeout
    /// bounds the wait for an event, not the handler once started.
    ///
    /// A lost connection is re-established within the same budget: if
    /// `timeout` runs out while reconnecting, `run_once` returns `Ok(None)`
    /// and the next call carries on where it stopped (same backoff).
    pub fn run_once(&mut self, timeout: Option<Duration>) -> Result<Option<Event>, Error> {
        self.block_on(move |s| Box::pin(s.serve_once(timeout)))?
    }

    /// Serves forever; the async form of [`run`](Self::run) for use under
    /// an existing tokio runtime (any flavour; the future is not `Send`, so
    /// use `block_on`, a `LocalSet` or `spawn_local`). Dropping the future
    /// abandons the request being handled (the broker re-delivers it to
    /// another instance, or the caller times out).
    pub async fn serve(&mut self) -> Result<(), Error> {
        let mut steps = 0u32;
        loop {
            // Replies are written out whenever the loop would wait, so a
            // burst of requests is answered with one write.
            self.step(None, false).await?;
            steps = steps.wrapping_add(1);
            if steps.is_multiple_of(YIELD_EVERY_STEPS) {
                // Under `run()` the loop is exempt from tokio's cooperative
                // budget; let other tasks on the runtime (spawned by
                // handlers) run now and then under sustained load.
                tokio::task::yield_now().await;
            }
        }
    }

    /// The async form of [`run_once`](Self::run_once).
    pub async fn serve_once(&mut self, timeout: Option<Duration>) -> Result<Option<Event>, Error> {
        self.step(timeout, true).await
    }

    /// One event; with `flush_reply` the reply is written before returning.
    async fn step(
        &mut self,
        timeout: Option<Duration>,
        flush_reply: bool,
    ) -> Result<Option<Event>, Error> {
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        if let Some(e) = self.link.deferred.take() {
            return Err(e);
        }
        if self.link.conn.is_none() && !self.link.reconnecting() {
            // The first connection (or any, without reconnect): fail fast.
            let attempt = self.setup.attempt()?;
            let conn = attempt.await?;
            self.link.install(conn);
        }
        let result = self.next_event(deadline, flush_reply).await;
        if let Err(e) = &result {
            if e.is_connection_error() && self.link.conn.is_some() {
                tracing::debug!("dropping the zrpcd connection: {e}");
                self.link.reset();
            }
        }
        result
    }

    fn block_on<T>(
        &mut self,
        f: impl for<'a> FnOnce(&'a mut Self) -> std::pin::Pin<Box<dyn Future<Output = T> + 'a>>,
    ) -> Result<T, Error> {
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err(Error::NestedRuntime);
        }
        let rt = match self.rt.take() {
            Some(rt) => rt,
            None => {
                // A previous runtime (if any) is gone, e.g. after a panic in
                // a callback: drop everything registered with it.
                self.link.reset();
                for w in &mut self.fds {
                    w.async_fd = None;
                }
                // The busy poller lives as long as the runtime (and the
                // connections it watches): made once here, not per call.
                self.busy_poll = BusyPoll::new_or_off(self.busy_poll_window);
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .on_thread_park(zrpc_proto::busy_poll::before_park)
                    .build()
                    .map_err(Error::Runtime)?
            }
        };
        // Installed on this thread for this call only (the park hook and a
        // new connection find it there), also if it unwinds.
        let installed = BusyPoll::scoped(self.busy_poll.clone());
        // Exempt from tokio's cooperative budget: the service loop is this
        // private runtime's main work, and running out of budget in the
        // middle of a burst of requests forced a yield and an extra
        // `epoll_wait` every ~50 requests (3,536 epoll_waits for 1,606 reads
        // at 64 in flight; 2,338 for 2,305 without). `serve` yields on its
        // own every YIELD_EVERY_STEPS steps instead.
        let out = rt.block_on(tokio::task::unconstrained(f(self)));
        drop(installed);
        self.rt = Some(rt);
        Ok(out)
    }

    async fn next_event(
        &mut self,
        deadline: Option<Instant>,
        flush_reply: bool,
    ) -> Result<Option<Event>, Error> {
        // Watch the registered descriptors from inside the runtime.
        let mut i = 0;
        while i < self.fds.len() {
            let w = &mut self.fds[i];
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
                        self.fds.remove(i);
                        return Err(Error::Fd { fd, source });
                    }
                }
            }
            i += 1;
        }

        let Server {
            service,
            setup,
            link,
            cache,
            fds,
            counter,
            next_fd,
            ..
        } = self;
        loop {
            // One clock read per request, for the flush interval and the
            // request's deadline (read again after a flush that had to wait
            // for a full socket).
            let mut now = std::time::Instant::now();
            if let Some(conn) = link.conn.as_mut() {
                let r = async {
                    conn.process(None)?;
                    if conn.queue.is_empty()
                        || conn.pending_write() >= FLUSH_THRESHOLD
                        || conn.unflushed >= FLUSH_REPLIES
                        || conn.pong_pending
                        || now >= conn.flush_due
                    {
                        conn.flush().await?;
                        // `flush` stamped `last_flush` when it finished.
                        now = now.max(conn.last_flush);
                    }
                    Ok(())
                }
                .await;
                if let Err(e) = r {
                    link.lost(e)?;
                    continue;
                }
            }
            while let Some(req) = link.conn.as_mut().and_then(|c| c.queue.pop_front()) {
                if req.deadline.is_some_and(|d| now > d) {
                    // The broker has already answered the caller with Timeout.
                    tracing::debug!(id = req.id, method = %req.method, "skipping expired request");
                    continue;
                }
                let key = if req.method.as_str() == DESCRIBE_METHOD {
                    None
                } else {
                    // A broker without the security model sends no caller:
                    // uid 0 then (the key as before it).
                    cache.key(
                        req.caller_instance,
                        req.caller_call,
                        req.caller.map_or(0, |c| c.uid),
                    )
                };
                if let Some(key) = key {
                    if let Some(outcome) = cache.get(key, req.service.as_str(), req.method.as_str())
                    {
                        tracing::debug!(
                            id = req.id,
                            method = %req.method,
                            caller_instance = req.caller_instance,
                            caller_call = req.caller_call,
                            "re-sent request answered from the reply cache"
                        );
                        if let Some(conn) = link.conn.as_mut() {
                            conn.write_outcome(req.id, &outcome);
                            if flush_reply {
                                if let Err(e) = conn.flush().await {
                                    link.lost(e)?;
                                }
                            }
                        }
                        return Ok(Some(Event::Replayed {
                            method: req.method.as_str().to_owned(),
                        }));
                    }
                }
                *counter += 1;
                let ctx = Context {
                    counter: *counter,
                    request_id: req.id,
                    service: req.service,
                    method: req.method,
                    caller_instance: req.caller_instance,
                    caller_call: req.caller_call,
                    caller: req.caller,
                    deadline: req.deadline,
                };
                let generation = link.generation;
                let request = req.payload.as_ptr_range();
                let request = (request.start as usize, request.end as usize, req.own_buffer);
                // Kept alive until `own_reply` has compared addresses: freed
                // earlier, its memory could be reused by an unrelated
                // buffer the reply points into.
                let request_alive = req.payload.clone();
                let outcome = run_handler(service, link, setup, &ctx, req.payload).await;
                let method = ctx.method.as_str();
                let Some(result) = outcome else {
                    tracing::debug!(id = req.id, method, "request cancelled");
                    return Ok(Some(Event::Cancelled {
                        method: method.to_owned(),
                    }));
                };
                if let Err(e) = &result {
                    tracing::debug!(method, code = %e.code(), "request failed: {e}");
                }
                let mut outcome = wire_outcome(result, link.max_message_size);
                let mut owned = false;
                if key.is_some() && !ReplyCache::stores_inline(&outcome) {
                    (outcome, owned) = own_reply(outcome, request);
                }
                drop(request_alive);
                // Written first (a small reply is copied into the write
                // buffer), then moved into the cache: no clone of it.
                let sent = match link.conn.as_mut() {
                    Some(conn) if link.generation == generation => {
                        conn.write_outcome(req.id, &outcome);
                        true
                    }
                    _ => {
                        tracing::debug!(
                            id = req.id,
                            method,
                            cached = key.is_some(),
                            "the connection the request came on is gone; reply not sent"
                        );
                        false
                    }
                };
                if let Some(key) = key {
                    cache.insert(key, ctx.service.as_str(), method, outcome, owned);
                }
                if sent && flush_reply {
                    if let Some(conn) = link.conn.as_mut() {
                        if let Err(e) = conn.flush().await {
                            if let Err(e) = link.lost(e) {
                                link.deferred = Some(e);
                            }
                        }
                    }
                }
                // `serve` drops its events: no copy of the name for it.
                let method = if flush_reply {
                    method.to_owned()
                } else {
                    String::new()
                };
                return Ok(Some(Event::Request { method }));
            }

            enum Wake {
                Link(Result<Work, Error>),
                Fd(Result<usize, Error>),
                Timeout,
            }
            let start = *next_fd;
            let fds_ref = &*fds;
            let wake = tokio::select! {
                r = link.work(setup, None) => Wake::Link(r),
                r = poll_fn(|cx| {
                    let n = fds_ref.len();
                    for k in 0..n {
                        let idx = (start + k) % n;
                        let w = &fds_ref[idx];
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
                }), if !fds.is_empty() => Wake::Fd(r),
                _ = sleep_until_opt(deadline) => Wake::Timeout,
            };
            match wake {
                Wake::Link(r) => {
                    r?;
                }
                Wake::Timeout => return Ok(None),
                Wake::Fd(r) => {
                    let idx = r?;
                    *next_fd = idx + 1;
                    let w = &mut fds[idx];
                    let fd = w.fd;
                    (w.callback)(service);
                    if let Some(a) = &w.async_fd {
                        // Level-triggered semantics on top of edge-triggered
                        // epoll: take the readiness guard first, then ask
                        // poll(2); only clear if the fd is really drained.
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
                    return Ok(Some(Event::Fd(fd)));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn range(b: &Bytes) -> (usize, usize, bool) {
        let r = b.as_ptr_range();
        (r.start as usize, r.end as usize, false)
    }

    /// Small replies, large ones queued by reference and control frames
    /// come out whole and in order, also when the socket takes them in
    /// pieces.
    #[test]
    fn large_replies_are_written_in_order() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (a, mut b) = tokio::net::UnixStream::pair().unwrap();
            let mut conn = Conn::new(a.into_std().unwrap()).unwrap();
            let big = |n: usize, v: u8| -> Outcome { Ok(Bytes::from(vec![v; n])) };
            let sent: Vec<(u64, Outcome)> = vec![
                (1, Ok(Bytes::from_static(b"\xa1x"))),
                (2, big(LARGE_PAYLOAD, 2)),
                (3, big(3 * 1024 * 1024, 3)),
                (4, Err((ErrorCode::Remote, "no".into()))),
                (5, big(100_000, 5)),
                (6, big(10, 6)),
            ];
            for (id, o) in &sent {
                conn.write_outcome(*id, o);
            }
            encode_frame(&mut conn.wbuf, &Envelope::Pong { nonce: 9 }, &[]);
            let reader = async move {
                let mut buf = BytesMut::new();
                let dec = FrameDecoder::new(DEFAULT_MAX_MESSAGE_SIZE);
                let mut frames = Vec::new();
                while frames.len() < 7 {
                    while let Some(f) = dec.decode(&mut buf).unwrap() {
                        frames.push(f);
                    }
                    if frames.len() < 7 {
                        buf.reserve(64 * 1024);
                        assert!(b.read_buf(&mut buf).await.unwrap() > 0);
                    }
                }
                frames
            };
            let (w, frames) = tokio::join!(conn.flush(), reader);
            w.unwrap();
            assert_eq!(conn.pending_write(), 0);
            assert!(conn.chunks.is_empty());
            for ((id, o), f) in sent.iter().zip(&frames) {
                match (f.decode().unwrap(), o) {
                    (
                        Envelope::Reply {
                            id: got,
                            code: None,
                            ..
                        },
                        Ok(p),
                    ) => {
                        assert_eq!(got, *id);
                        assert_eq!(&f.payload, p);
                    }
                    (
                        Envelope::Reply {
                            id: got,
                            code: Some(c),
                            message,
                        },
                        Err((code, msg)),
                    ) => {
                        assert_eq!((got, c, message), (*id, *code, msg.as_str()));
                    }
                    (e, _) => panic!("unexpected {e:?} for {id}"),
                }
            }
            assert!(matches!(
                frames[6].decode().unwrap(),
                Envelope::Pong { nonce: 9 }
            ));
        });
    }

    #[test]
    fn own_reply_keeps_only_private_buffers() {
        let none = (0, 0, false);
        // An encoded value: its own exact allocation, kept by reference.
        let p = Bytes::from(vec![7u8; 1000]);
        let ptr = p.as_ptr();
        let (o, owned) = own_reply(Ok(p), none);
        assert!(owned);
        assert_eq!(o.as_ref().unwrap().as_ptr(), ptr);
        assert_eq!(o.unwrap(), vec![7u8; 1000]);
        // A view of the request, shared or not: copied.
        let req = Bytes::from(vec![1u8; 100]);
        let (_, owned) = own_reply(Ok(req.slice(10..20)), range(&req));
        assert!(!owned);
        // Shared with another handle, or static: copied.
        let (_, owned) = own_reply(Ok(req.clone()), none);
        assert!(!owned);
        // The sole handle left to the request's buffer: still copied.
        let r = range(&req);
        let view = req.slice(10..20);
        drop(req);
        assert!(view.is_unique());
        let (_, owned) = own_reply(Ok(view.clone()), r);
        assert!(!owned);
        // A view of a request read into an allocation of its own: kept.
        let (o, owned) = own_reply(Ok(view.clone()), (r.0, r.1, true));
        assert!(owned);
        assert_eq!(o.unwrap().as_ptr(), view.as_ptr());
        let (_, owned) = own_reply(Ok(Bytes::from_static(b"abc")), none);
        assert!(!owned);
        // A small value in a large allocation: copied.
        let mut v = Vec::with_capacity(64 * 1024);
        v.extend_from_slice(b"small");
        let (o, owned) = own_reply(Ok(Bytes::from(v)), none);
        assert!(!owned);
        assert_eq!(o.unwrap(), &b"small"[..]);
        // Errors and empty payloads are not payloads to keep.
        let (_, owned) = own_reply(Err((ErrorCode::Remote, "x".into())), none);
        assert!(!owned);
    }
}
