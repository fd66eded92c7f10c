//! The async client's connection to the broker: its socket (registered for
//! readability only), its outbound queue and the writer task that writes
//! what callers queue while the socket is busy or full. Reading it is the
//! supervisor's job ([`crate::supervisor`]).

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::BytesMut;
use tokio::io::Interest;
use tokio::sync::Notify;
use zrpc_io::busy_poll::BusyPoll;
use zrpc_io::fdpass::FdQueue;
use zrpc_io::reactor::{register, Registered};
use zrpc_io::write::send_vectored;
use zrpc_io::{OutQueue, ReadPolicy};
use zrpc_proto::{Envelope, FrameDecoder};

use crate::common::{control_frame, lock, next_generation, Dead, OutFrame, Settings, Welcome};
use crate::fds::{queue_fd_frame, queue_frame};
use crate::Result;

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
    /// Whether the writer task must be woken for what is appended now.
    fn needs_wake(&self) -> bool {
        self.queue.is_empty() && !self.writing
    }

    /// Appends a frame whose payload travels in `fd` (`head`: its header
    /// and envelope); returns whether the writer task must be woken.
    fn push_fd_frame(&mut self, head: &[u8], fd: Arc<zrpc_io::fdpass::SealedFd>) -> bool {
        let wake = self.needs_wake();
        queue_fd_frame(&mut self.queue, head, fd);
        wake
    }

    /// Appends a frame, its payload in a sealed memfd if `fds` and it is
    /// large (see [`queue_frame`]); returns whether the writer task must be
    /// woken.
    fn push_frame_fds(&mut self, frame: &OutFrame, fds: bool) -> bool {
        let wake = self.needs_wake();
        queue_frame(&mut self.queue, frame, fds);
        wake
    }

    /// Appends both parts of a frame (a large part by reference); returns
    /// whether the writer task must be woken.
    fn push_frame(&mut self, frame: &OutFrame) -> bool {
        self.push_frame_fds(frame, false)
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
    /// The broker accepted payloads in descriptors on this connection.
    pub(crate) fd_payloads: bool,
    /// Descriptors read with the `Welcome`, for the reader to take.
    leftover_fds: Mutex<FdQueue>,
}

impl Conn {
    /// Connects and performs the handshake.
    /// Must be called inside the runtime that will read the connection.
    pub(crate) async fn open(settings: &Settings) -> Result<(Arc<Conn>, BytesMut)> {
        let c = zrpc_io::handshake::connect(
            &settings.socket_path(),
            &settings.hello(),
            settings.handshake_timeout,
        )
        .await?;
        // From here on: a non-blocking std socket, registered for
        // readability only (see `Conn`).
        let io = register(c.sock, Interest::READABLE).map_err(|e| settings.connect_error(e))?;
        let (welcome, buf, fds) = (c.welcome, c.leftover, c.leftover_fds);
        // Polled when the runtime runs out of work (`crate::busy_poll`).
        let poller = BusyPoll::current()
            .filter(|bp| bp.watch_or_log(io.get_ref().as_raw_fd()))
            .map(|bp| bp.id());
        let conn = Arc::new(Conn {
            gen: next_generation(),
            dead: AtomicBool::new(false),
            why: Mutex::new(None),
            out: Mutex::new(Outgoing::default()),
            io,
            writer_wake: Notify::new(),
            reader_stop: Notify::new(),
            burst: AtomicBool::new(false),
            poller,
            fd_payloads: welcome.fd_payloads(),
            leftover_fds: Mutex::new(fds),
            welcome,
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

    /// Several results were handed out at once: their callers' next calls
    /// go through the writer task (see [`Conn::send_unless_failed`]).
    pub(crate) fn mark_burst(&self) {
        self.burst.store(true, Ordering::Relaxed);
    }

    /// Reads what the broker sent into `buf`, and the descriptors sent
    /// with it into `fds` (see [`read_some`]).
    pub(crate) async fn read(
        &self,
        dec: &FrameDecoder,
        buf: &mut BytesMut,
        fds: &mut FdQueue,
    ) -> io::Result<usize> {
        let fds = self.fd_payloads.then_some(fds);
        read_some(&self.io, dec, buf, fds, self.poller).await
    }

    /// The descriptors read with the `Welcome` (once).
    pub(crate) fn take_leftover_fds(&self) -> FdQueue {
        std::mem::take(&mut *lock(&self.leftover_fds))
    }

    /// Waits until the connection is killed; returns why.
    pub(crate) async fn stopped(&self) -> Dead {
        self.reader_stop.notified().await;
        lock(&self.why)
            .clone()
            .unwrap_or_else(|| Dead::Disconnected("the connection was closed".into()))
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
                q.push_frame_fds(f, self.fd_payloads);
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
    pub(crate) fn send(&self, frame: OutFrame, direct: bool) {
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
        if frame.fd_sized(self.fd_payloads) {
            // Made before taking the lock (a copy of the payload into the
            // memfd); the frame and its descriptor go through the queue.
            match frame.to_fd_form() {
                Ok((head, fd)) => {
                    let wake = {
                        let mut q = lock(&self.out);
                        if q.closed {
                            return None;
                        }
                        q.push_fd_frame(&head, fd)
                    };
                    if wake {
                        self.writer_wake.notify_one();
                    }
                    return None;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "zrpc-client: cannot put a payload in a memfd; sending it inline");
                }
            }
        }
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

/// Reads what is available into `buf`, after making room for it
/// ([`ReadPolicy::CLIENT`]). Cancel-safe (see [`zrpc_io::read::read_some`]).
async fn read_some(
    rd: &Registered,
    dec: &FrameDecoder,
    buf: &mut BytesMut,
    fds: Option<&mut FdQueue>,
    poller: Option<u64>,
) -> io::Result<usize> {
    // Room is made only once readable: the callers woken by the last batch
    // have usually dropped their replies by then (see `ReadPolicy::make_room`).
    let room = |b: &mut BytesMut| ReadPolicy::CLIENT.make_room(dec, b);
    let n = match fds {
        Some(fds) => zrpc_io::fdpass::read_some_fds(rd, buf, fds, room).await?,
        None => zrpc_io::read::read_some(rd, buf, room).await?,
    };
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
///
/// Woken, it first yields once: the callers woken by the same read (a
/// batch of results hands out many outcomes at once) run before it and
/// queue their next calls, so that one write carries what they queued on
/// this worker. It does not wait for callers that another worker runs:
/// their frames leave in a write of their own, which keeps the broker and
/// the service busy meanwhile. (Waiting for every caller of the batch, the
/// "hold" this replaced, made a quarter fewer calls per second at 64 in
/// flight on the multi-thread runtime: docs/performance.md, "Fifteenth
/// pass".)
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
            WriterStep::Wait => {
                conn.writer_wake.notified().await;
                tokio::task::yield_now().await;
            }
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
