//! The broker connection of a service: its socket, read buffer and
//! outbound queue, the requests received and not yet handled, and what each
//! frame from the broker means (requests queued, pings answered, cancels of
//! queued requests applied). Setting it up and getting it back after a loss
//! is [`crate::link`]'s job.

use std::collections::VecDeque;
use std::io;
use std::os::unix::io::AsRawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::Interest;
use zrpc_io::busy_poll::BusyPoll;
use zrpc_io::fdpass::{FdQueue, SealedFd, FD_PAYLOAD_MIN};
use zrpc_io::reactor::{register, Registered};
use zrpc_io::{OutQueue, ReadPolicy};
use zrpc_proto::{
    encode_fd_header, encode_frame, encode_header, Envelope, ErrorCode, Frame, FrameDecoder,
    DEFAULT_MAX_MESSAGE_SIZE,
};

use crate::cache::Outcome;
use crate::context::Name;
use crate::error::Error;
use crate::{Caller, HandlerError};

/// Longest error message sent in a `Reply`; longer ones are truncated.
const MAX_ERROR_MESSAGE: usize = 64 * 1024;

/// Upper bound of the size of a `Reply` envelope with an empty message.
const REPLY_ENVELOPE_MAX: usize = 16;

/// Batched replies are written out at the latest when this many bytes are
/// pending.
const FLUSH_THRESHOLD: usize = 256 * 1024;

/// Batched replies are written out at the latest after this many: with a
/// burst of requests queued, the broker forwards the first replies (and the
/// callers send their next calls) while the rest are handled, instead of
/// every process waiting for the whole burst.
const FLUSH_REPLIES: usize = 16;

/// Reply payloads of at least this many bytes are not copied into the
/// outbound queue: they are queued by reference and written with one
/// `sendmsg` together with the bytes around them.
const LARGE_PAYLOAD: usize = 8 * 1024;

/// Frames at least this large are read into an allocation of their own
/// (see `Conn::read_more`).
const OWN_BUFFER_FRAME: usize = 64 * 1024;

/// Batched replies are written out at the latest this long after the last
/// write, even while requests are still queued (a burst of slow synchronous
/// handlers must not hold back earlier replies, nor pongs, for long).
const FLUSH_INTERVAL: Duration = Duration::from_millis(2);

/// A request received and not yet handled.
pub(crate) struct Pending {
    pub(crate) id: u64,
    pub(crate) service: Name,
    pub(crate) method: Name,
    pub(crate) deadline: Option<std::time::Instant>,
    pub(crate) caller_instance: u64,
    pub(crate) caller_call: u64,
    pub(crate) caller: Option<Caller>,
    pub(crate) payload: Bytes,
    /// The frame was read into an allocation of its own (see
    /// [`Conn::read_more`]): keeping a view of it pins nothing else.
    pub(crate) own_buffer: bool,
}

/// What a frame asks the connection owner to do besides the bookkeeping
/// [`Conn::handle_frame`] does itself.
pub(crate) enum FrameAction {
    None,
    /// A `Welcome` after the handshake (a protocol error).
    Welcome,
    Ack {
        req: u64,
        code: Option<ErrorCode>,
        message: String,
    },
}

/// The broker connection: socket, buffers, and requests received but not
/// yet handled. Reading is cancel-safe (bytes land in `rbuf`), writing is
/// batched in `out` (a [`zrpc_io::OutQueue`]).
///
/// The socket is registered with the reactor for readability only: tokio's
/// own `UnixStream` registers for READABLE|WRITABLE, edge-triggered, and
/// then every time the broker reads what we wrote, `EPOLLOUT` wakes the
/// process for nothing. Writes go straight to the socket; only while the socket
/// is full is a duplicate registered for writability (`wr_wait`).
pub(crate) struct Conn {
    /// The socket, non-blocking, registered for readability; written to
    /// directly through `rd.get_ref()`. One fd per connection.
    rd: Registered,
    /// A duplicate of `sock` registered for writability, only while a flush
    /// found the socket full.
    wr_wait: Option<Registered>,
    /// The read buffer, kept for the life of the connection: once the
    /// frames split off it are dropped, `reserve` reuses its allocation.
    rbuf: BytesMut,
    /// Replies and pongs to write: small ones copied, large reply payloads
    /// by reference.
    out: OutQueue,
    decoder: FrameDecoder,
    pub(crate) max_message_size: u32,
    /// Requests received and not yet handled.
    pub(crate) queue: VecDeque<Pending>,
    /// Ids of `Cancel`s for requests not in `queue` (running ones, or
    /// unknown), for the server loop to apply.
    pub(crate) cancels: Vec<u64>,
    /// A `Pong` waits in `out`: write it out before the next handler.
    pong_pending: bool,
    /// When `out` was last written out completely.
    pub(crate) last_flush: std::time::Instant,
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
    /// `Ack`s of a drain's `Unregister`s not yet taken ([`crate::stop`]).
    unregistered: usize,
    /// The busy poller watching this connection, under `run`/`run_once`.
    busy_poll: Option<Rc<BusyPoll>>,
    /// Descriptors received and not yet claimed by their frames.
    fds: FdQueue,
    /// The broker accepted payloads in descriptors (`Welcome`): large
    /// replies go as sealed memfds, requests may come as them.
    fd_payloads: bool,
    /// When the broker's last `Ping` arrived, and the time between its last
    /// two: how often to send a sign of life while not reading (see
    /// [`Conn::keepalive_every`]).
    last_ping: Option<std::time::Instant>,
    ping_every: Option<std::time::Duration>,
}

/// How often a connection that does not read (its request queue full)
/// sends a sign of life before it has seen the broker ping twice; after
/// that, as often as the broker pings, at most every [`KEEPALIVE_MAX`].
const KEEPALIVE_FIRST: std::time::Duration = std::time::Duration::from_millis(250);

/// The longest interval between two signs of life of a connection that
/// does not read.
const KEEPALIVE_MAX: std::time::Duration = std::time::Duration::from_secs(1);

impl Conn {
    /// Takes over a connected socket; must be called inside the runtime.
    pub(crate) fn new(sock: std::os::unix::net::UnixStream) -> io::Result<Self> {
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
            out: OutQueue::with_capacity(64 * 1024),
            decoder: FrameDecoder::new(DEFAULT_MAX_MESSAGE_SIZE),
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            queue: VecDeque::new(),
            cancels: Vec::new(),
            pong_pending: false,
            last_flush: now,
            flush_due: now + FLUSH_INTERVAL,
            parked: None,
            frame_own_buffer: false,
            unflushed: 0,
            unregistered: 0,
            fds: FdQueue::new(),
            fd_payloads: false,
            last_ping: None,
            ping_every: None,
        })
    }

    /// How often to send a sign of life while the connection does not read
    /// its socket (its request queue is full, so the broker's pings are not
    /// read either): the broker cuts off a service it hears nothing from
    /// for its `--heartbeat-timeout`, and a busy service is not a dead one.
    /// As often as the broker pings (the interval between its last two
    /// pings), at most every second; 250 ms before two pings came.
    pub(crate) fn keepalive_every(&self) -> std::time::Duration {
        self.ping_every.map_or(KEEPALIVE_FIRST, |d| {
            d.clamp(std::time::Duration::from_millis(10), KEEPALIVE_MAX)
        })
    }

    /// Queues a sign of life: a `Pong` nobody asked for (nonce 0), which
    /// the broker takes as one without answering.
    pub(crate) fn queue_keepalive(&mut self) {
        encode_frame(self.out.tail(), &Envelope::Pong { nonce: 0 }, &[]);
    }

    /// Takes the broker's `Welcome` and the bytes read after it.
    pub(crate) fn welcomed(
        &mut self,
        welcome: zrpc_io::Welcome,
        leftover: BytesMut,
        leftover_fds: FdQueue,
    ) {
        self.max_message_size = welcome.max_message_size;
        self.fd_payloads = welcome.fd_payloads();
        self.decoder = FrameDecoder::new(welcome.incoming_limit()).with_fds(self.fd_payloads);
        self.rbuf.extend_from_slice(&leftover);
        self.fds = leftover_fds;
    }

    /// The payload of a frame that came in a descriptor: the next one
    /// received, verified (a sealed memfd no larger than a message) before
    /// it is mapped read-only.
    fn fd_payload(&mut self) -> Result<Bytes, Error> {
        let fd = self.fds.pop_front().ok_or_else(|| {
            Error::FdPayload("a frame announced a descriptor that was not sent with it".into())
        })?;
        let sealed = SealedFd::verify(fd, self.max_message_size as usize)
            .map_err(|e| Error::FdPayload(e.to_string()))?;
        sealed
            .into_bytes()
            .map_err(|e| Error::FdPayload(format!("cannot map it: {e}")))
    }

    /// Queues a control frame (no payload) for the next flush.
    pub(crate) fn send(&mut self, env: &Envelope<'_>) {
        encode_frame(self.out.tail(), env, &[]);
    }

    /// Reads more bytes into `rbuf`. Cancel-safe.
    ///
    /// A large frame (>= [`OWN_BUFFER_FRAME`]) is read into an allocation of
    /// exactly its size: its payload may be returned by the handler as is
    /// (a [`Blob`](crate::Blob) argument is a view into it) and kept by the
    /// reply cache, which must then not pin a read buffer holding other
    /// frames, nor copy the payload.
    pub(crate) async fn read_more(&mut self) -> Result<(), Error> {
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
        if self.parked.is_none() {
            ReadPolicy::SERVICE.make_room(&self.decoder, &mut self.rbuf);
        } else if let Some(total) = needed {
            // Exactly the frame: no byte of the next one in its allocation.
            self.rbuf.reserve(total - self.rbuf.len());
        }
        let read = if self.fd_payloads {
            zrpc_io::fdpass::read_some_fds(&self.rd, &mut self.rbuf, &mut self.fds, |_| usize::MAX)
                .await
        } else {
            zrpc_io::read::read_some(&self.rd, &mut self.rbuf, |_| usize::MAX).await
        };
        if self.fds.len() > zrpc_io::fdpass::MAX_FDS_PER_MSG * 4 {
            return Err(Error::FdPayload(format!(
                "{} descriptors received ahead of their frames",
                self.fds.len()
            )));
        }
        match read {
            Ok(0) => Err(Error::Disconnected),
            Ok(n) => {
                if let Some(bp) = &self.busy_poll {
                    bp.batch(std::time::Instant::now(), n);
                }
                Ok(())
            }
            Err(e) => Err(Error::from_io(e)),
        }
    }

    pub(crate) fn next_frame(&mut self) -> Result<Option<Frame>, Error> {
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

    /// Whether anything waits to be written.
    pub(crate) fn has_output(&self) -> bool {
        !self.out.is_empty()
    }

    /// Bytes waiting to be written.
    #[cfg(test)]
    pub(crate) fn pending_write(&self) -> usize {
        self.out.len()
    }

    /// Whether the replies batched so far are to be written out now: no
    /// request is left to handle, or enough bytes or replies are waiting, or
    /// a pong, or the flush interval has passed since the last write.
    #[inline(always)]
    pub(crate) fn should_flush(&self, now: std::time::Instant) -> bool {
        self.queue.is_empty()
            || self.out.len() >= FLUSH_THRESHOLD
            || self.unflushed >= FLUSH_REPLIES
            || self.pong_pending
            || now >= self.flush_due
    }

    /// Writes out everything queued. Cancel-safe: bytes leave the queue only
    /// once written.
    pub(crate) async fn flush(&mut self) -> Result<(), Error> {
        if !self.out.is_empty() {
            let r =
                zrpc_io::write::flush(&mut self.out, self.rd.get_ref(), &mut self.wr_wait).await;
            // Drop the writability registration once the queue is empty.
            self.wr_wait = None;
            r.map_err(Error::from_io)?;
        }
        self.pong_pending = false;
        self.unflushed = 0;
        self.last_flush = std::time::Instant::now();
        self.flush_due = self.last_flush + FLUSH_INTERVAL;
        Ok(())
    }

    /// Handles one frame: queues requests, answers pings, applies cancels
    /// of queued requests; reports what the caller must handle.
    pub(crate) fn handle_frame(&mut self, frame: &Frame) -> Result<FrameAction, Error> {
        self.handle_parts(&frame.envelope, &frame.envelope, || frame.payload.clone())
    }

    /// [`Conn::handle_frame`] for a frame given as its envelope bytes, a
    /// buffer that holds them (names are kept as views into it) and its
    /// payload, made only for a request.
    pub(crate) fn handle_parts(
        &mut self,
        holder: &Bytes,
        envelope: &[u8],
        payload: impl FnOnce() -> Bytes,
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
                let before = self.queue.len();
                self.queue.retain(|p| p.id != id);
                if self.queue.len() == before {
                    // Running, or already answered: the server loop looks.
                    self.cancels.push(id);
                }
                Ok(FrameAction::None)
            }
            Envelope::Ping { nonce } => {
                let now = std::time::Instant::now();
                if let Some(last) = self.last_ping.replace(now) {
                    self.ping_every = Some(now.saturating_duration_since(last));
                }
                encode_frame(self.out.tail(), &Envelope::Pong { nonce }, &[]);
                self.pong_pending = true;
                Ok(FrameAction::None)
            }
            Envelope::Pong { .. } => Ok(FrameAction::None),
            Envelope::Welcome { .. } => Ok(FrameAction::Welcome),
            Envelope::Ack { req, .. } if req >= crate::stop::UNREGISTER_REQ => {
                // A drain's `Unregister` (see `crate::stop`).
                self.unregistered += 1;
                Ok(FrameAction::None)
            }
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

    /// Handles every complete frame in `rbuf`; cancels of requests that are
    /// not queued are left in `cancels`. A connection error in the same
    /// batch wins over a cancel (the connection and its `cancels` are
    /// dropped): zrpcd's shutdown cancels delivered calls right before
    /// `Fatal{Shutdown}`, and the clients resubmit them, so the handler had
    /// better finish and leave its outcome in the reply cache. An `Ack`
    /// (unexpected once registered) is ignored; a drain's are counted.
    pub(crate) fn process(&mut self) -> Result<(), Error> {
        self.process_acks(|req, code, message| {
            tracing::debug!(req, ?code, message, "unexpected Ack ignored");
            Ok(())
        })
    }

    /// The drain's `Unregister`s acknowledged since the last call.
    pub(crate) fn take_unregistered(&mut self) -> usize {
        std::mem::take(&mut self.unregistered)
    }

    /// [`Conn::process`], giving each `Ack` to `ack` (registration: requests
    /// may come right behind the first `Ack`, their descriptors with them).
    pub(crate) fn process_acks(
        &mut self,
        mut ack: impl FnMut(u64, Option<ErrorCode>, String) -> Result<(), Error>,
    ) -> Result<(), Error> {
        let mut after = |action| match action {
            FrameAction::None => Ok(()),
            FrameAction::Ack { req, code, message } => ack(req, code, message),
            FrameAction::Welcome => Err(Error::Unexpected("a second Welcome".to_string())),
        };
        while self.parked.is_some() {
            // A large frame read into an allocation of its own: taken as
            // it is (`next_frame` then returns to the regular buffer).
            let Some(frame) = self.next_frame()? else {
                return Ok(());
            };
            after(self.handle_frame(&frame)?)?;
        }
        // Every complete frame in `rbuf`, taken off as one shared buffer and
        // read where it lies: a request's payload and names are slices of
        // it, nothing else takes a handle.
        let (batch, corrupt) = self.decoder.take_batch(&mut self.rbuf);
        if !batch.is_empty() {
            self.frame_own_buffer = false;
        }
        let mut frames = batch.frames();
        while let Some((envelope, payload, has_fd)) = frames.next_with_fd() {
            let action = if has_fd {
                let mapped = self.fd_payload()?;
                // The mapping is an allocation of its own: the reply
                // cache may keep a view of it.
                self.frame_own_buffer = true;
                let a = self.handle_parts(batch.bytes(), envelope, || mapped);
                self.frame_own_buffer = false;
                a?
            } else {
                self.handle_parts(batch.bytes(), envelope, || batch.payload(payload))?
            };
            after(action)?;
        }
        match corrupt {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }

    /// Appends the reply to request `id`.
    pub(crate) fn write_outcome(&mut self, id: u64, outcome: &Outcome) {
        self.unflushed += 1;
        match outcome {
            Ok(payload) if self.fd_payloads && payload.len() >= FD_PAYLOAD_MIN => {
                let reply = Envelope::Reply {
                    id,
                    code: None,
                    message: "",
                };
                // A reply that is exactly a payload received in a memfd (an
                // echo) goes back as that same sealed descriptor.
                let fd = zrpc_io::mapped::sealed_whole(payload)
                    .map_or_else(|| SealedFd::create(payload).map(Arc::new), Ok);
                match fd {
                    Ok(fd) => {
                        self.out.push_fd(fd);
                        encode_fd_header(self.out.tail(), &reply);
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot put a reply in a memfd; sending it inline");
                        encode_header(self.out.tail(), &reply, payload.len());
                        self.out.push_shared(payload.clone());
                    }
                }
            }
            Ok(payload) if payload.len() >= LARGE_PAYLOAD => {
                encode_header(
                    self.out.tail(),
                    &Envelope::Reply {
                        id,
                        code: None,
                        message: "",
                    },
                    payload.len(),
                );
                self.out.push_shared(payload.clone());
            }
            Ok(payload) => encode_frame(
                self.out.tail(),
                &Envelope::Reply {
                    id,
                    code: None,
                    message: "",
                },
                payload,
            ),
            Err((code, message, value)) => encode_frame(
                self.out.tail(),
                &Envelope::Reply {
                    id,
                    code: Some(*code),
                    message: truncate(message, MAX_ERROR_MESSAGE),
                },
                value,
            ),
        }
    }
}

/// What is sent for a handler's result: see [`fit_outcome`]; long error
/// messages are truncated.
pub(crate) fn wire_outcome(result: Result<Bytes, HandlerError>, max_message_size: u32) -> Outcome {
    let outcome = result.map_err(|e| {
        let message = truncate(e.message(), MAX_ERROR_MESSAGE).to_string();
        (e.code(), message, e.value().cloned().unwrap_or_default())
    });
    fit_outcome(outcome, max_message_size)
}

/// `outcome` within a broker's max message size: an oversized value becomes
/// a `LimitExceeded` error, an error's value that does not fit beside its
/// message is left out (the message cut to fit). Also for an outcome from
/// the reply cache, made under another broker's limit.
pub(crate) fn fit_outcome(outcome: Outcome, max_message_size: u32) -> Outcome {
    let room = (max_message_size as usize).saturating_sub(REPLY_ENVELOPE_MAX);
    match outcome {
        Ok(p) if p.len() > room => Err((
            ErrorCode::LimitExceeded,
            format!(
                "the reply of {} bytes exceeds zrpcd's max message size of {max_message_size} bytes",
                p.len()
            ),
            Bytes::new(),
        )),
        Err((code, message, value)) if value.len() + message.len() > room => {
            let message = truncate(&message, room).to_string();
            let value = Some(value).filter(|v| v.len() + message.len() <= room);
            let value = value.unwrap_or_default();
            Err((code, message, value))
        }
        other => other,
    }
}

/// Whether the reply cache may keep a successful reply payload by reference
/// (`true`) or must copy it: only a payload that is the sole handle to an
/// allocation of its own, not much larger than itself, or a view into a
/// request that was read into an allocation of its own (`request.2`); not a
/// view into a request in the shared read buffer (which holds other frames).
/// Returns the payload (same bytes, same allocation) for sending.
pub(crate) fn own_reply(outcome: Outcome, request: (usize, usize, bool)) -> (Outcome, bool) {
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

#[cfg(test)]
mod tests;
