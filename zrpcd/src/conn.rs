//! One connection: its admission ([`admit`]: credentials, limits), a
//! reader that feeds every complete frame to the broker, one read batch at
//! a time, and a writer task that takes over flushing the peer's queue
//! when its socket is full (ordinary writes are made by the broker's
//! flusher, see [`crate::outbox`]) and flushes what is left at close. The
//! connection talks to the broker through its methods only
//! (`begin_read_batch`, `on_frame_parts`, `note_partial`,
//! `end_read_batch`, `close_with`, `remove_peer`).

use std::cell::RefCell;
use std::os::fd::AsRawFd;
use std::rc::Rc;

use bytes::{Buf, BytesMut};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::net::UnixStream;
use tokio::time::Instant;
use zrpc_io::fdpass::{FdQueue, MAX_FDS_PER_MSG};
use zrpc_io::reactor::{register, register_dup};
use zrpc_io::ReadPolicy;
use zrpc_proto::{ErrorCode, FrameDecoder, ProtoError};

use crate::broker::{Broker, Fatal};
use crate::payload::Payload;
use crate::peers::{Creds, PeerId};
use crate::queue::PeerIo;

/// Frames with payloads up to this size are handled in place in the read
/// buffer: their payload is copied wherever it goes (a pending slot, or an
/// allocation of its own kept by a pending call; a peer's queue copies
/// payloads under `queue::ZERO_COPY_MIN` anyway); larger ones are split
/// off as `Bytes` and forwarded by reference, or copied into an allocation
/// of their own when that would pin a buffer mostly taken by frames handled
/// in place (see `read_loop`).
const IN_PLACE_MAX: usize = crate::queue::ZERO_COPY_MIN - 1;

/// How long a connection's task may go on reading and handling frames, read
/// after read without its socket running dry, before it lets the other
/// connections' tasks run: this long, or [`TURN_FRAMES`] frames, whichever
/// comes first.
///
/// The broker has one thread, and tokio lets a task go on while its socket
/// stays readable for up to 128 reads (its cooperative budget): up to 128
/// chunks of 8 KiB, some 35,000 small frames, tens of milliseconds in which
/// no other connection is served. A peer that keeps its socket full delayed
/// everyone else's calls that long. A connection whose socket runs dry
/// (most traffic: a batch is read, then the socket is empty) never reaches
/// a turn's end: 300,000 calls with 64 in flight on one connection
/// (`bench/scripts/run.sh multi|current 64 64 300000`) made no yield at
/// all. The bound in time covers what frames do not count: costly frames,
/// and large ones read in many chunks.
const TURN: std::time::Duration = std::time::Duration::from_micros(250);

/// See [`TURN`]: 256 small frames take a few hundred microseconds in a
/// debug build, less in a release one.
const TURN_FRAMES: u32 = 256;

/// A connection the broker took on: registered with the runtime and in the
/// broker, counted in its user's account.
pub struct Admitted {
    id: PeerId,
    creds: Creds,
    io: Rc<PeerIo>,
    rd: Rc<AsyncFd<std::os::unix::net::UnixStream>>,
    decoder: FrameDecoder,
    handshake: std::time::Duration,
    /// `--close-flush-timeout`.
    close_flush: std::time::Duration,
}

/// Why [`admit`] did not take a connection.
pub enum Refused {
    /// A limit or quota: tell the peer (`message`) before closing.
    Limit(UnixStream, String),
    /// The connection cannot be served (no credentials, no registration);
    /// already logged.
    Broken,
}

/// Takes on an accepted connection, synchronously in the accept loop: its
/// credentials (from the kernel, or it is not served: a default would be
/// uid 0, root's rights and no quota), the connection limit and its
/// user's quota, and its place in the broker. Counting it here, before
/// its task runs, keeps a burst of connections from passing the limits.
pub fn admit(broker: &RefCell<Broker>, stream: UnixStream) -> Result<Admitted, Refused> {
    let creds = match stream.peer_cred() {
        Ok(c) => Creds {
            pid: c.pid().unwrap_or(0),
            uid: c.uid(),
            gid: c.gid(),
        },
        Err(e) => {
            tracing::warn!(error = %e, "cannot read a connection's credentials; closing it");
            return Err(Refused::Broken);
        }
    };
    admit_as(broker, stream, creds, None)
}

/// [`admit`] with credentials the broker chose itself instead of
/// `SO_PEERCRED`'s, and the given supplementary groups (None: read
/// `SO_PEERGROUPS`): for a connection made inside the broker's process,
/// such as the NATS bridge's (docs/bridge.md), whose kernel credentials
/// would be the broker's own.
pub fn admit_as(
    broker: &RefCell<Broker>,
    stream: UnixStream,
    creds: Creds,
    groups: Option<Box<[u32]>>,
) -> Result<Admitted, Refused> {
    let refused = broker.borrow().refuse_connection(creds.uid);
    if let Some(msg) = refused {
        return Err(Refused::Limit(stream, msg));
    }
    // Registered for readability only (see `PeerIo::sock`); one fd per
    // connection.
    let rd = match stream
        .into_std()
        .and_then(|sock| register(sock, Interest::READABLE))
    {
        Ok(rd) => Rc::new(rd),
        Err(e) => {
            tracing::warn!(error = %e, "cannot register a connection");
            return Err(Refused::Broken);
        }
    };
    let io = Rc::new(PeerIo::new(rd.clone()));
    let groups = groups.unwrap_or_else(|| crate::peers::peer_groups(rd.as_raw_fd()));
    let mut b = broker.borrow_mut();
    let id = b.admit_peer(io.clone(), creds, groups);
    if let Some(bp) = b.busy_poll() {
        bp.watch_or_log(rd.as_raw_fd());
    }
    Ok(Admitted {
        id,
        creds,
        io,
        rd,
        decoder: FrameDecoder::new(b.config.max_message_size),
        handshake: b.config.handshake_timeout,
        close_flush: b.config.close_flush_timeout,
    })
}

impl Admitted {
    /// The connection's id in the broker.
    pub fn id(&self) -> PeerId {
        self.id
    }
}

/// Serves an admitted connection until it closes.
pub async fn serve(broker: Rc<RefCell<Broker>>, conn: Admitted) {
    let Admitted {
        id,
        creds,
        io,
        rd,
        decoder,
        handshake,
        close_flush,
    } = conn;
    // From here on, however this task ends, the connection is released.
    let teardown = Teardown {
        broker: &broker,
        io: &io,
        id,
    };
    let writer = tokio::task::spawn_local(write_loop(io.clone(), close_flush));
    let reason = read_loop(
        &broker,
        &io,
        id,
        creds.uid,
        rd,
        decoder,
        Instant::now() + handshake,
    )
    .await;
    tracing::debug!(peer = id, pid = creds.pid, %reason, "connection closed");
    drop(teardown);
    let _ = writer.await;
    // Its peer may not have received every descriptor sent to it: those
    // stay counted until it has (`Broker::linger`).
    if io.queue.borrow().fds_in_flight() > 0 {
        broker.borrow_mut().linger(io);
    }
}

/// Releases what a connection holds in the broker (names, calls, its slot)
/// when its task ends, however it ends: at the end of the read loop, or
/// while unwinding from a panic (which tokio catches, so the process stays
/// up): a broken connection is torn down by the same path as a disconnect.
struct Teardown<'a> {
    broker: &'a RefCell<Broker>,
    io: &'a PeerIo,
    id: PeerId,
}

impl Drop for Teardown<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            tracing::error!(
                peer = self.id,
                "a connection task panicked (a bug in zrpcd); tearing the connection down"
            );
        }
        // A borrow held by the panicking code was released while unwinding
        // (borrows end before this guard, which was created first).
        match self.broker.try_borrow_mut() {
            Ok(mut b) => {
                b.remove_peer(self.id);
                b.flush();
            }
            Err(_) => tracing::error!(peer = self.id, "cannot release a connection: broker busy"),
        }
        self.io.close();
    }
}

async fn read_loop(
    broker: &RefCell<Broker>,
    io: &PeerIo,
    id: PeerId,
    uid: u32,
    rd: Rc<AsyncFd<std::os::unix::net::UnixStream>>,
    mut decoder: FrameDecoder,
    hello_deadline: Instant,
) -> String {
    let mut buf = BytesMut::new();
    // Descriptors received and not yet claimed by their frames, in order,
    // and their counts in the broker's limits between two reads
    // (`Broker::charge_unclaimed`).
    let mut fds = FdQueue::new();
    let mut unclaimed = Vec::new();
    let mut ready = false;
    // Read buffer held for a partly received frame, as last reported to the
    // broker (`Broker::note_partial`).
    let mut held = 0;
    // Bytes of the read buffer's allocation taken by frames handled in
    // place, since it was allocated (or its data moved: `at`, where its
    // data started at the end of the last batch).
    let (mut waste, mut at) = (0usize, std::ptr::null::<u8>());
    // When this turn began (the first batch read since the socket last ran
    // dry, see `TURN`) and the frames handled in it, and whether the last
    // read had to wait.
    let mut turn: Option<(std::time::Instant, u32)> = None;
    let mut turn_over = false;
    let waited = std::cell::Cell::new(false);
    // Turns share the thread by connection; rounds share it by user
    // (`crate::fair`): with data to read and its user's quantum used in
    // this round, a connection waits for its turn in the next.
    let (rounds, share) = broker.borrow().rounds_for(id);
    if let Some(s) = &share {
        rounds.charge(s, crate::fair::CONNECT_UNITS, 0);
    }
    loop {
        if std::mem::take(&mut turn_over) {
            turn = None;
            tokio::task::yield_now().await;
        }
        let had_fds = fds.len();
        // No room for descriptors once the sender's waiting for their
        // close fill its quota, or all users' fill --max-fds (asked at
        // each read: another connection may have filled them meanwhile):
        // any it sends then fail the read and are dropped by the kernel,
        // never installed here. So at most one message's worth passes.
        let fd_room = || {
            if broker.borrow().refuses_fds_from(uid).is_some() {
                0
            } else {
                MAX_FDS_PER_MSG
            }
        };
        let (read, my_turn) = tokio::select! {
            r = noting_a_wait(
                read_some(&rd, &mut buf, &mut fds, &decoder, fd_room, &rounds, share.as_ref()),
                &waited,
            ) => r,
            _ = io.kill.notified() => return "closed by the broker".into(),
            _ = tokio::time::sleep_until(hello_deadline), if !ready => {
                let fatal = Fatal {
                    code: ErrorCode::Protocol,
                    message: "no Hello within the handshake timeout".into(),
                };
                broker.borrow_mut().close_with(id, &fatal);
                return "handshake timeout".into();
            }
        };
        // Anything but a memfd is closed off this thread, whatever the
        // read's outcome: its close may block (see `crate::closer`). The
        // descriptors left here are memfds, which may be dropped anywhere.
        let foreign = crate::closer::sort_out(&mut fds, had_fds, uid);
        let read_bytes = match read {
            Ok(0) => return "end of stream".into(),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                // Descriptors lost to truncation: the rest cannot be
                // matched to their frames. Either the user may send no
                // more (see `fd_room`), or there were too many at once.
                let message = broker
                    .borrow()
                    .refuses_fds_from(uid)
                    .unwrap_or_else(|| format!("{e}; send at most {MAX_FDS_PER_MSG} at once"));
                let fatal = Fatal {
                    code: ErrorCode::LimitExceeded,
                    message,
                };
                broker.borrow_mut().close_with(id, &fatal);
                return fatal.message;
            }
            Err(e) => return format!("read error: {e}"),
        };
        // Descriptors waiting for their close (some closes block) count
        // against their sender: past its quota, it is disconnected, and
        // refused at accept until they are closed (`admit`).
        let over = (foreign > 0)
            .then(|| broker.borrow().over_closing_limits(uid))
            .flatten();
        if let Some(message) = over {
            let fatal = Fatal {
                code: ErrorCode::LimitExceeded,
                message,
            };
            broker.borrow_mut().close_with(id, &fatal);
            return fatal.message;
        }
        if foreign > 0 && decoder.accepts_fds() {
            let fatal = Fatal::protocol("a payload descriptor that is not a memfd");
            broker.borrow_mut().close_with(id, &fatal);
            return fatal.message;
        }
        let mut b = broker.borrow_mut();
        if !fds.is_empty() && !decoder.accepts_fds() {
            // Not negotiated: descriptors sent anyway are closed unread.
            tracing::debug!(
                peer = id,
                n = fds.len(),
                "closing descriptors sent without negotiating them"
            );
            fds.clear();
        }
        // The frames below claim their descriptors with holds of their own.
        unclaimed.clear();
        // One clock read per read batch, for every frame of it.
        let now = std::time::Instant::now();
        // Every peer that got frames is written once this wake-up's other
        // reads are routed too (`Outbox`); one that got
        // `queue::FLUSH_EVERY_FRAMES` of them from this read is written at
        // once, so that it starts on them while the rest is routed.
        if !b.begin_read_batch(id, now) {
            return "closed by the broker".into();
        }
        // Bytes at the front of `buf` already handled in place; advanced
        // past once, at the end of the batch.
        let mut done = 0;
        if buf.as_ptr() != at {
            waste = 0;
        }
        // Frames completed in this batch.
        let mut frames = 0u32;
        loop {
            let size = match decoder.complete(&buf[done..]) {
                Ok(Some(size)) => size,
                Ok(None) => break,
                Err(e) => {
                    let code = match e {
                        ProtoError::FrameTooLarge { .. } => ErrorCode::LimitExceeded,
                        _ => ErrorCode::Protocol,
                    };
                    let fatal = Fatal {
                        code,
                        message: e.to_string(),
                    };
                    b.close_with(id, &fatal);
                    return fatal.message;
                }
            };
            frames += 1;
            let handled = if size.has_fd() {
                let (env, _) = size.parts(&buf[done..]);
                done += size.total();
                waste += size.total();
                match fds.pop_front() {
                    Some(fd) => b.on_fd_frame(id, env, fd, now),
                    None => Err(Fatal::protocol(
                        "a frame announced a payload descriptor that was not sent with it",
                    )),
                }
            } else if size.payload_len() <= IN_PLACE_MAX {
                // A small payload is copied wherever it goes (the
                // recipient's output buffer, the pending slot): the frame
                // is handled where it lies, with no reference-counted
                // handles to split off and drop.
                let (env, payload) = size.parts(&buf[done..]);
                done += size.total();
                waste += size.total();
                b.on_frame_parts(id, env, Payload::Borrowed(payload), now)
            } else if waste > size.total().max(ReadPolicy::BROKER.max_read) {
                // Kept by reference, a payload keeps its whole read buffer
                // allocated with it, counted as its own size: behind a
                // large frame handled in place, an 8 KiB one pinned
                // megabytes. Then it is copied into an allocation of its
                // own. Otherwise what it pins is what it and the frames
                // read with it count, and what a read may bring besides
                // (`ReadPolicy::max_read`).
                let (env, payload) = size.parts(&buf[done..]);
                let payload = bytes::Bytes::copy_from_slice(payload);
                done += size.total();
                b.on_frame_parts(id, env, Payload::Shared(&payload), now)
            } else {
                // A large payload is split off and forwarded by reference.
                buf.advance(std::mem::take(&mut done));
                let frame = size.split_off(&mut buf);
                b.on_frame_at(id, frame, now)
            };
            if let Err(fatal) = handled {
                b.close_with(id, &fatal);
                return fatal.message;
            }
        }
        buf.advance(done);
        // Descriptors left once this read's frames took theirs came ahead
        // of their frames: counted like held ones until claimed (at most
        // one message's worth, `MAX_FDS_PER_MSG`, is ever held past the
        // limits). Counted after the frames, not before: one `sendmsg` may
        // carry the descriptors of several calls, each of which is then
        // answered `LimitExceeded` on its own if past the limits.
        if !fds.is_empty() {
            match b.charge_unclaimed(id, fds.len()) {
                Ok(holds) => unclaimed = holds,
                Err(fatal) => {
                    b.close_with(id, &fatal);
                    return fatal.message;
                }
            }
        }
        // The rest of a frame left behind frames handled from the same
        // buffer moves to a buffer of its own size: the bytes advanced past
        // stay allocated with a `BytesMut` but leave its `capacity()`, so a
        // connection could hold megabytes counted as the few bytes of a
        // partial frame (one user held 3.5 GB against a 64 MiB quota). A
        // byte is copied once at most (it is then at the front, and its
        // frame is handled where it lies), and a read takes at most
        // `ReadPolicy::BROKER.max_read` past a partial frame, so at most
        // that much is copied. The buffer then starts at its allocation, and
        // its capacity is what it holds.
        if frames > 0 && !buf.is_empty() {
            // With the room the next read wants: not moved again then.
            let room = ReadPolicy::BROKER
                .wanted(&decoder, &buf)
                .max(ReadPolicy::BROKER.chunk);
            let mut rest = BytesMut::with_capacity(buf.len() + room);
            rest.extend_from_slice(&buf);
            buf = rest;
            waste = 0;
        }
        let now_held = if buf.is_empty() { 0 } else { buf.capacity() };
        if now_held != held || (held != 0 && frames > 0) {
            held = now_held;
            if let Err(fatal) = b.note_partial(id, held, frames > 0, now) {
                b.close_with(id, &fatal);
                return fatal.message;
            }
        }
        b.end_read_batch(now, read_bytes);
        if let Some(s) = &share {
            rounds.charge(s, frames, read_bytes);
        }
        // The user's next connection may take its turn.
        drop(my_turn);
        if !ready && b.is_ready(id) {
            ready = true;
            // Frames after `Hello` may carry descriptors if it offered them
            // and the broker accepted (its `Welcome` said so).
            decoder = decoder.with_fds(b.takes_fds(id));
        }
        drop(b);
        // An idle connection keeps no read buffer.
        if buf.is_empty() {
            buf = BytesMut::new();
            waste = 0;
        }
        at = buf.as_ptr();
        if waited.replace(false) {
            turn = None;
        }
        let (began, handled) = turn.get_or_insert((now, 0));
        *handled = handled.saturating_add(frames);
        turn_over = *handled >= TURN_FRAMES || now.saturating_duration_since(*began) >= TURN;
    }
}

/// Runs `f`, setting `waited` if it had to wait (it returned `Pending`
/// once at least: the task was suspended and others ran).
async fn noting_a_wait<F: std::future::Future>(f: F, waited: &std::cell::Cell<bool>) -> F::Output {
    let mut f = std::pin::pin!(f);
    std::future::poll_fn(|cx| {
        let p = f.as_mut().poll(cx);
        if p.is_pending() {
            waited.set(true);
        }
        p
    })
    .await
}

/// Waits until the socket is readable, then reads what is available into
/// the spare capacity of `buf`, reserved only then: an idle connection
/// holds no read buffer at all. [`ReadPolicy::BROKER`]: a large
/// frame is reserved at once up to a bound, so a peer that sends only a
/// header announcing a huge frame cannot make the broker reserve
/// `--max-message-size` of memory per connection).
///
/// Descriptors sent with the bytes are appended to `fds` (every
/// connection is read this way: descriptors a peer sends without having
/// negotiated them are taken off the socket and closed by the caller), at
/// most `max_fds()` of them, asked just before the read (more fail it,
/// `InvalidData`).
///
/// Once data is there to read, and before the read, the connection waits
/// for its turn in its user's round (`share`; `None`: root or the NATS
/// bridge, not held to rounds; see [`crate::fair`]): checked with data
/// there, not before the wait for it, so that a connection sending a batch
/// only once its socket was drained does not read it past its user's
/// quantum. The turn is returned, to be dropped once the batch is handled
/// and charged (it is passed on then); it is never held while the read
/// waits.
async fn read_some<'a>(
    rd: &AsyncFd<std::os::unix::net::UnixStream>,
    buf: &mut BytesMut,
    fds: &mut FdQueue,
    decoder: &FrameDecoder,
    max_fds: impl FnMut() -> usize,
    rounds: &'a crate::fair::Rounds,
    share: Option<&'a Rc<crate::fair::Share>>,
) -> (std::io::Result<usize>, Option<crate::fair::Turn<'a>>) {
    let turn = || async move {
        match share {
            Some(s) => Some(rounds.wait_turn(s).await),
            None => None,
        }
    };
    match zrpc_io::fdpass::read_some_fds_at_most(
        rd,
        buf,
        fds,
        |b| ReadPolicy::BROKER.make_room(decoder, b),
        max_fds,
        turn,
    )
    .await
    {
        Ok((n, turn)) => (Ok(n), turn),
        Err(e) => (Err(e), None),
    }
}

/// Takes over flushing when the socket is full (waits until it is
/// writable, through a registration of its own that exists only while the
/// socket is full), and on close flushes what is left and shuts the write
/// side down.
async fn write_loop(io: Rc<PeerIo>, close_flush: std::time::Duration) {
    let mut waiter: Option<AsyncFd<std::os::unix::net::UnixStream>> = None;
    // Once the connection is closing, one deadline for all that is left: a
    // peer that reads a little now and then must not keep it alive.
    let mut close_deadline: Option<Instant> = None;
    loop {
        if io.queue.borrow().is_empty() {
            io.writer_busy.set(false);
            waiter = None;
            if io.closed.get() {
                break;
            }
            io.notify.notified().await;
            continue;
        }
        io.writer_busy.set(true);
        if waiter.is_none() {
            match register_dup(io.sock.get_ref(), Interest::WRITABLE) {
                Ok(w) => waiter = Some(w),
                Err(e) => {
                    tracing::debug!(error = %e, "cannot wait for writability");
                    break;
                }
            }
        }
        let Some(w) = waiter.as_ref() else {
            break;
        };
        // Wait for room in the socket; once the connection is closing, only
        // for a bounded time: a peer that never reads must not keep its
        // socket and its queued frames alive forever.
        let closing = io.closed.get();
        if closing && close_deadline.is_none() {
            // (Bounded by `Config`'s users too: an `Instant` overflows.)
            let bound =
                close_flush.min(std::time::Duration::from_millis(zrpc_proto::MAX_TIMEOUT_MS));
            close_deadline = Some(Instant::now() + bound);
        }
        let deadline = close_deadline.unwrap_or_else(Instant::now);
        let ready = tokio::select! {
            r = w.writable() => r,
            _ = io.notify.notified(), if !closing => continue,
            _ = tokio::time::sleep_until(deadline), if closing => {
                tracing::debug!("peer does not read; dropping its unsent frames");
                break;
            }
        };
        let Ok(mut guard) = ready else {
            break;
        };
        match io.queue.borrow_mut().write_now(io.sock.get_ref()) {
            Ok(true) => {}
            Ok(false) => guard.clear_ready(),
            Err(e) => {
                tracing::debug!(error = %e, "write failed");
                // Also stops the reader: nothing can be sent to this peer.
                io.close();
                break;
            }
        }
    }
    io.writer_busy.set(false);
    io.shutdown_write();
}

#[cfg(test)]
mod tests {
    use super::*;
    use zrpc_proto::{Envelope, PROTOCOL_VERSION};

    fn frame(env: &Envelope<'_>) -> zrpc_proto::Frame {
        let mut out = BytesMut::new();
        zrpc_proto::encode_frame(&mut out, env, b"");
        FrameDecoder::new(u32::MAX)
            .decode(&mut out)
            .expect("valid frame")
            .expect("complete frame")
    }

    /// A connection task that panics is torn down like a disconnect: its
    /// slot, its names and its pending calls are released.
    #[test]
    fn a_panicking_connection_task_releases_everything() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, async {
            let broker = Rc::new(RefCell::new(Broker::new(crate::Config::new(None))));
            let (a, _b) = std::os::unix::net::UnixStream::pair().expect("pair");
            a.set_nonblocking(true).expect("nonblocking");
            let rd = Rc::new(register(a, Interest::READABLE).expect("register"));
            let io = Rc::new(PeerIo::new(rd));
            let id = broker.borrow_mut().add_peer(io.clone(), Creds::default());
            {
                let mut b = broker.borrow_mut();
                let hello = Envelope::Hello {
                    version: PROTOCOL_VERSION,
                    instance: 1,
                    agent: "t",
                    caps: 0,
                };
                b.on_frame(id, frame(&hello)).expect("hello");
                let reg = Envelope::Register {
                    req: 1,
                    name: "held",
                    shared: false,
                };
                b.on_frame(id, frame(&reg)).expect("register");
                let call = Envelope::Call {
                    id: 1,
                    service: "nobody",
                    method: "m",
                    timeout_ms: None,
                    flags: 0,
                };
                b.on_frame(id, frame(&call)).expect("call");
                assert!(b.names().is_held("held"));
                assert_eq!(b.pending.len(), 1);
            }
            let (broker2, io2) = (broker.clone(), io.clone());
            let task = tokio::task::spawn_local(async move {
                let _teardown = Teardown {
                    broker: &broker2,
                    io: &io2,
                    id,
                };
                // A bug, with the broker borrowed, as in `read_loop`.
                let _b = broker2.borrow_mut();
                panic!("deliberate panic in a connection task");
            });
            let err = task.await.expect_err("the task panicked");
            assert!(err.is_panic());
            let b = broker.borrow();
            assert!(b.peers().get(id).is_none(), "connection slot released");
            assert!(!b.names().is_held("held"), "names released");
            assert_eq!(b.pending.len(), 0, "calls released");
            assert!(io.closed.get(), "connection closed");
        });
    }
}
