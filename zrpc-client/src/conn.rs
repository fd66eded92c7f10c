//! The async client's connection to the broker and its tasks: the
//! supervisor (reads the connection, reconnects when it is lost) and the
//! writer (writes what callers queue while the socket is busy or full).

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::BytesMut;
use tokio::io::Interest;
use tokio::sync::Notify;
use zrpc_io::busy_poll::BusyPoll;
use zrpc_io::reactor::{register, Registered};
use zrpc_io::write::send_vectored;
use zrpc_io::{OutQueue, ReadPolicy};
use zrpc_proto::{Envelope, ErrorCode, FrameDecoder};

use crate::client::{lock, Shared};
use crate::common::{
    control_frame, Dead, OutFrame, Retry, Settings, Welcome, HANDSHAKE_TIMEOUT, LARGE_FRAME,
};
use crate::core::Dispatched;
use crate::{Error, Result};

/// Connection generations, to tell a call's connection from the current
/// one.
static GENERATION: AtomicU64 = AtomicU64::new(1);

/// Owns the connection life cycle: reads the live connection, and when it
/// is lost reconnects (with backoff) and resubmits the pending calls. Runs
/// until the client is closed.
pub(crate) async fn supervise(shared: Arc<Shared>, mut first: Option<(Arc<Conn>, BytesMut)>) {
    let guard = SupervisorGuard(shared);
    let shared = &guard.0;
    let mut retry = Retry::default();
    loop {
        let (conn, buf) = match first.take() {
            Some(c) => c,
            None => match reconnect(shared, &mut retry).await {
                Some(c) => c,
                None => return,
            },
        };
        let up = Instant::now();
        let why = read_loop(shared, &conn, buf).await;
        retry.connection_ended(&shared.settings.backoff, up.elapsed());
        if !shared.connection_lost(&conn, why) {
            return;
        }
    }
}

/// Connects again, after the backoff delay, while calls are waiting.
/// `None`: the client was closed.
async fn reconnect(shared: &Arc<Shared>, retry: &mut Retry) -> Option<(Arc<Conn>, BytesMut)> {
    loop {
        // An idle client reconnects when it is next used.
        loop {
            {
                let st = lock(&shared.state);
                if st.core.is_closed() {
                    return None;
                }
                if st.core.has_unanswered() {
                    break;
                }
            }
            shared.wake.notified().await;
        }
        let delay = retry.next_delay(&shared.settings.backoff);
        shared.unless_closed(tokio::time::sleep(delay)).await?;
        match shared.unless_closed(Conn::open(&shared.settings)).await? {
            Ok((conn, buf)) => {
                conn.start_writer();
                if !shared.install(&conn) {
                    conn.kill(Dead::Disconnected("the client was closed".into()));
                    return None;
                }
                return Some((conn, buf));
            }
            Err(e) => {
                tracing::debug!(error = %e, attempt = retry.attempt, "zrpc-client: reconnect failed");
            }
        }
    }
}

/// Fails the pending calls if the supervisor ends for any reason, including
/// being dropped by a runtime that shuts down; the next call starts a new
/// supervisor.
struct SupervisorGuard(Arc<Shared>);

impl Drop for SupervisorGuard {
    fn drop(&mut self) {
        let why = Dead::Disconnected(
            "the client's connection task stopped (was its runtime shut down?)".into(),
        );
        let conn = {
            let mut st = lock(&self.0.state);
            st.supervised = false;
            st.core.fail_all(&why);
            st.conn.take()
        };
        if let Some(c) = conn {
            c.kill(why);
        }
    }
}

/// What the callers and the writer task share of a connection's write
/// side.
#[derive(Default)]
struct Outgoing {
    /// Frames to write.
    queue: OutQueue,
    /// Someone (the writer task, or a caller writing its frame directly
    /// because nothing was queued) is writing to the socket; everyone else
    /// appends to the queue.
    writing: bool,
    /// No more writes: the writer flushes what is queued and ends.
    closed: bool,
}

impl Outgoing {
    /// Appends both parts of a frame (a large part by reference); returns
    /// whether the writer task must be woken.
    fn push_frame(&mut self, frame: &OutFrame) -> bool {
        let wake = self.queue.is_empty() && !self.writing;
        let head = frame.head();
        if head.len() < LARGE_FRAME {
            self.queue.push_copy(head);
        } else {
            self.queue.push_shared(frame.head_from(0));
        }
        self.queue.push(&frame.tail, LARGE_FRAME);
        wake
    }
}

/// One connection to the broker. The supervisor reads it; the writer task
/// writes what callers queue.
///
/// The socket is registered with the reactor for readability only: tokio's
/// own `UnixStream` registers for READABLE|WRITABLE, edge-triggered, and
/// then every time the broker reads what we wrote, `EPOLLOUT` wakes the
/// process for nothing. Writes go straight to the socket (one fd per
/// connection); only while it is full does the writer task register a
/// duplicate for writability.
pub(crate) struct Conn {
    pub(crate) gen: u64,
    pub(crate) welcome: Welcome,
    dead: AtomicBool,
    /// Why the connection was killed (by a write error or `close`), for the
    /// reader.
    why: Mutex<Option<Dead>>,
    out: Mutex<Outgoing>,
    /// The socket, non-blocking, registered for readability (the
    /// supervisor reads through it) and written to directly through
    /// `io.get_ref()`.
    io: Registered,
    writer_wake: Notify,
    reader_stop: Notify,
    /// Several results were handed out at once: their callers' next calls
    /// go through the writer task (one write) until it has written.
    burst: AtomicBool,
    /// The busy poller watching the socket (`BusyPoll::id`), if any: reads
    /// feed only that poller's rule, whichever thread reads.
    poller: Option<u64>,
}

impl Conn {
    /// Connects and performs the handshake.
    /// Must be called inside the runtime that will read the connection.
    pub(crate) async fn open(settings: &Settings) -> Result<(Arc<Conn>, BytesMut)> {
        let c = zrpc_io::handshake::connect(
            &settings.socket_path(),
            &settings.hello(),
            HANDSHAKE_TIMEOUT,
        )
        .await?;
        let connect_error = |source| Error::Connect {
            path: settings.socket_path(),
            source,
        };
        // From here on: a non-blocking std socket, registered for
        // readability only (see `Conn`).
        let io = register(c.sock, Interest::READABLE).map_err(connect_error)?;
        let (welcome, buf) = (c.welcome, c.leftover);
        // Polled when the runtime runs out of work (`crate::busy_poll`).
        let poller = BusyPoll::current()
            .filter(|bp| bp.watch_or_log(io.get_ref().as_raw_fd()))
            .map(|bp| bp.id());
        let conn = Arc::new(Conn {
            gen: GENERATION.fetch_add(1, Ordering::Relaxed),
            welcome,
            dead: AtomicBool::new(false),
            why: Mutex::new(None),
            out: Mutex::new(Outgoing::default()),
            io,
            writer_wake: Notify::new(),
            reader_stop: Notify::new(),
            burst: AtomicBool::new(false),
            poller,
        });
        Ok((conn, buf))
    }

    /// Whether the connection was killed.
    pub(crate) fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    /// Whether several results were just handed out at once (their callers'
    /// next calls go through the writer task, see [`Conn::send_unless_failed`]).
    pub(crate) fn in_burst(&self) -> bool {
        self.burst.load(Ordering::Relaxed)
    }

    /// Starts the writer task (on the current runtime).
    pub(crate) fn start_writer(self: &Arc<Self>) {
        tokio::spawn(writer_task(self.clone()));
    }

    /// Queues the frames `fill` hands out, in order, before anything queued
    /// later, and wakes the writer. Returns what `fill` returned.
    pub(crate) fn queue_all<T>(&self, fill: impl FnOnce(&mut dyn FnMut(&OutFrame)) -> T) -> T {
        let t = {
            let mut q = lock(&self.out);
            fill(&mut |f: &OutFrame| {
                q.push_frame(f);
            })
        };
        self.writer_wake.notify_one();
        t
    }

    /// Ends the connection: the writer flushes what is queued (best effort)
    /// and exits, the reader stops. Idempotent: the first reason wins.
    pub(crate) fn kill(&self, why: Dead) {
        lock(&self.why).get_or_insert(why);
        self.dead.store(true, Ordering::Release);
        lock(&self.out).closed = true;
        self.writer_wake.notify_one();
        self.reader_stop.notify_one();
    }

    pub(crate) fn send_cancel(&self, id: u64) {
        if !self.dead.load(Ordering::Acquire) {
            let mut f = BytesMut::with_capacity(16);
            control_frame(&mut f, &Envelope::Cancel { id });
            self.send(f.freeze().into(), false);
        }
    }

    /// Sends a control frame (see [`send_unless_failed`](Conn::send_unless_failed)).
    fn send(&self, frame: OutFrame, direct: bool) {
        if let Some(why) = self.send_unless_failed(frame, direct) {
            self.kill(why);
        }
    }

    /// Sends a frame. With `direct`, and if nothing else is being written,
    /// the caller writes it itself (saving a task hop); otherwise it is
    /// queued for the writer task, which writes everything queued with as few
    /// syscalls as it can.
    ///
    /// `Some` means the caller's own write failed before any byte of the
    /// frame was written: the frame was certainly not sent, and the caller
    /// must [`kill`](Conn::kill) the connection with the reason given.
    #[must_use]
    pub(crate) fn send_unless_failed(&self, frame: OutFrame, direct: bool) -> Option<Dead> {
        {
            let mut q = lock(&self.out);
            if q.closed {
                return None;
            }
            if !direct || q.writing || !q.queue.is_empty() {
                let wake = q.push_frame(&frame);
                drop(q);
                if wake {
                    self.writer_wake.notify_one();
                }
                return None;
            }
            q.writing = true;
        }
        let result = send_vectored(self.io.get_ref().as_raw_fd(), &[frame.head(), &frame.tail]);
        let written = match result {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                0
            }
            Err(e) => {
                lock(&self.out).writing = false;
                return Some(Dead::Disconnected(format!("write error: {e}")));
            }
        };
        let wake = {
            let mut q = lock(&self.out);
            q.writing = false;
            // The rest goes before anything queued meanwhile.
            let head = frame.head().len();
            if written < head {
                q.queue.push_front(frame.tail.clone());
                q.queue.push_front(frame.head_from(written));
            } else if written < frame.len() {
                q.queue.push_front(frame.tail.slice(written - head..));
            }
            !q.queue.is_empty() || q.closed
        };
        if wake {
            self.writer_wake.notify_one();
        }
        None
    }
}

/// Handles every complete frame in `buf`. Returns why the connection must
/// end, if it must.
fn dispatch(shared: &Shared, conn: &Conn, dec: &FrameDecoder, buf: &mut BytesMut) -> Option<Dead> {
    // The complete frames at the front of `buf`, taken off as one shared
    // buffer and read where they lie: only a result payload takes a handle
    // on it (no envelope or per-frame split to take and drop).
    let (batch, corrupt) = dec.take_batch(buf);
    let d = if batch.is_empty() {
        Dispatched::default()
    } else {
        lock(&shared.state).core.dispatch(&batch, None)
    };
    if d.delivered > 1 {
        conn.burst.store(true, Ordering::Relaxed);
    }
    if let Some(pongs) = d.pongs {
        conn.send(pongs.freeze().into(), false);
    }
    d.end.or_else(|| {
        corrupt.map(|e| {
            Dead::Fatal(
                ErrorCode::Protocol,
                format!("bad frame from the broker: {e}"),
            )
        })
    })
}

/// Reads `conn` until it ends; returns why.
async fn read_loop(shared: &Shared, conn: &Conn, mut buf: BytesMut) -> Dead {
    let dec = FrameDecoder::new(conn.welcome.incoming_limit());
    loop {
        let before = buf.len();
        if let Some(why) = dispatch(shared, conn, &dec, &mut buf) {
            return why;
        }
        if before - buf.len() >= LARGE_FRAME {
            // Large frames were handed out: let the callers take (and drop)
            // them before making room for the next read, so that the read
            // buffer can reuse their memory (see `make_room`). Small ones
            // are not worth the extra `epoll_wait` this costs.
            // `yield_now`, not a plain self-wake: it defers our wake-up until
            // the runtime has polled its I/O driver, and by then a caller
            // running as the runtime's `block_on` future (not a spawned
            // task) has been polled too; a self-wake would run us again
            // before it, with its reply still alive (measured: ~500 page
            // faults per 1 MiB call).
            tokio::task::yield_now().await;
        }
        tokio::select! {
            biased;
            _ = conn.reader_stop.notified() => {
                return lock(&conn.why)
                    .clone()
                    .unwrap_or_else(|| Dead::Disconnected("the connection was closed".into()));
            }
            r = read_some(&conn.io, &dec, &mut buf, conn.poller) => match r {
                Ok(0) => return Dead::Disconnected("the broker closed the connection".into()),
                Ok(_) => {}
                Err(e) => return Dead::Disconnected(format!("read error: {e}")),
            }
        }
    }
}

/// Reads what is available into `buf`, after making room for it
/// ([`ReadPolicy::CLIENT`]). Cancel-safe (see [`zrpc_io::read::read_some`]).
async fn read_some(
    rd: &Registered,
    dec: &FrameDecoder,
    buf: &mut BytesMut,
    poller: Option<u64>,
) -> io::Result<usize> {
    // Room is made only once readable: the callers woken by the last batch
    // have usually dropped their replies by then (see `make_room`).
    let n = zrpc_io::read::read_some(rd, buf, |b| ReadPolicy::CLIENT.make_room(dec, b)).await?;
    if let Some(id) = poller {
        BusyPoll::with_current(|bp| {
            if bp.id() == id {
                bp.batch(Instant::now(), n);
            }
        });
    }
    Ok(n)
}

enum WriterStep {
    Wait,
    Write,
    Exit,
}

/// Writes what callers queue, with as few syscalls as it can: everything
/// queued at once, vectored. While the socket is full it waits for
/// writability through a registration of its own (see
/// [`zrpc_io::write::flush`]).
async fn writer_task(conn: Arc<Conn>) {
    // The queue being written, swapped with the shared one: callers keep
    // appending to the other while this one is written.
    let mut writing = OutQueue::with_capacity(64 * 1024);
    loop {
        let step = {
            let mut q = lock(&conn.out);
            if q.writing {
                // A caller is writing directly; it wakes us if needed.
                WriterStep::Wait
            } else if q.queue.is_empty() {
                if q.closed {
                    WriterStep::Exit
                } else {
                    WriterStep::Wait
                }
            } else {
                std::mem::swap(&mut q.queue, &mut writing);
                q.writing = true;
                WriterStep::Write
            }
        };
        match step {
            WriterStep::Exit => break,
            WriterStep::Wait => conn.writer_wake.notified().await,
            WriterStep::Write => {
                conn.burst.store(false, Ordering::Relaxed);
                let mut wait = None;
                let result =
                    zrpc_io::write::flush(&mut writing, conn.io.get_ref(), &mut wait).await;
                drop(wait);
                lock(&conn.out).writing = false;
                if let Err(e) = result {
                    conn.kill(Dead::Disconnected(format!("write error: {e}")));
                    break;
                }
            }
        }
    }
}
