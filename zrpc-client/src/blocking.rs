//! The blocking client: no background thread; callers take turns as the
//! reader of the shared connection.

use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use serde::de::DeserializeOwned;
use serde::Serialize;
use zrpc_proto::{Envelope, FrameDecoder};

use crate::common::{
    call_deadlines, call_frame, control_frame, decode_result, lock, next_generation,
    reconnect_timeout, timeout_error, Dead, OutFrame, Outcome, Payload, Retry, Settings, Welcome,
    SAFETY_MARGIN,
};
use crate::core::{Core, Dispatched, Stand, Waiter};
use crate::fds::{map_fd_payloads, queue_frame, Incoming};
use crate::{CallOptions, ClientBuilder, Error, Result};
use zrpc_io::write::{write_all_blocking, write_queue_blocking};
use zrpc_io::{OutQueue, ReadPolicy};

/// What a write returns: on failure, how many bytes were written too.
type WriteResult = std::result::Result<(), (usize, std::io::Error)>;

/// A blocking zrpc client.
///
/// `Clone + Send + Sync`: clones share one connection, and any number of
/// threads may call at once. There is no background thread: a caller writes
/// its request and, if no other thread is reading, reads the connection
/// itself until its own result arrives, handing other threads' results to
/// them; otherwise it sleeps until a reader hands it its result or the
/// reader role is free. A single-threaded caller therefore costs no more
/// than a raw socket round trip.
///
/// If the connection to the broker is lost, pending calls do not fail: the
/// thread acting as reader reconnects (with backoff, bounded by its own
/// call's deadline) and resubmits every pending call, holding the write lock
/// so that calls made meanwhile are written after them; the other threads
/// keep waiting for their results. See the
/// [crate documentation](crate#restarts-and-reconnection) for the exact
/// rules, and [`CallOptions::no_retry`] for at-most-once calls.
///
/// Pings from the broker are answered while some thread is inside a call;
/// an idle client does not read the socket, so it answers late (see
/// [heartbeats](crate#heartbeats)).
#[derive(Clone)]
pub struct BlockingClient {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for BlockingClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockingClient")
            .field("socket_dir", &self.inner.settings.socket_dir)
            .field("instance", &self.inner.settings.instance)
            .finish_non_exhaustive()
    }
}

pub(crate) struct Inner {
    settings: Settings,
    next_id: AtomicU64,
    /// The broker's limit, from the latest `Welcome`.
    max_message_size: AtomicU32,
    /// Whether the latest connection passes payloads in descriptors (large
    /// payloads are then encoded straight into memfds).
    fd_payloads: AtomicBool,
    state: Mutex<State>,
}

impl BlockingClient {
    /// Connects to the broker in `$ZRPC_SOCKET_DIR`, or the default directory (`/run/zrpc`, see
    /// `zrpc_proto::default_socket_dir`).
    pub fn connect() -> Result<BlockingClient> {
        ClientBuilder::default().connect_blocking()
    }

    /// Connects to the broker whose socket is in `socket_dir`.
    pub fn connect_to(socket_dir: impl AsRef<std::path::Path>) -> Result<BlockingClient> {
        ClientBuilder::default()
            .socket_dir(socket_dir.as_ref())
            .connect_blocking()
    }

    /// A builder for clients with non-default settings (finish it with
    /// [`ClientBuilder::connect_blocking`]).
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    pub(crate) fn from_settings(settings: Settings) -> Result<BlockingClient> {
        let (conn, incoming) = Conn::open(&settings, settings.handshake_timeout)?;
        Ok(BlockingClient {
            inner: Arc::new(Inner {
                settings,
                next_id: AtomicU64::new(1),
                max_message_size: AtomicU32::new(conn.welcome.max_message_size),
                fd_payloads: AtomicBool::new(conn.fd_payloads),
                state: Mutex::new(State {
                    reading: false,
                    incoming,
                    core: Core::default(),
                    conn: Some(Arc::new(conn)),
                    retry: Retry::default(),
                    next_attempt: None,
                    lost: None,
                }),
            }),
        })
    }

    /// Calls `service.method(payload)` and decodes the result as `R`.
    /// `timeout` `None` waits forever.
    pub fn call<P, R>(
        &self,
        service: &str,
        method: &str,
        payload: &P,
        timeout: Option<Duration>,
    ) -> Result<R>
    where
        P: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        self.call_with(service, method, payload, CallOptions::from(timeout))
    }

    /// Like [`call`](BlockingClient::call), with all [`CallOptions`].
    pub fn call_with<P, R>(
        &self,
        service: &str,
        method: &str,
        payload: &P,
        opts: CallOptions,
    ) -> Result<R>
    where
        P: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        let bytes = self.call_payload(service, method, Payload::Serde(payload), opts)?;
        decode_result(&bytes)
    }

    /// Calls with an already-encoded payload (exactly one MessagePack value;
    /// empty means nil) and returns the result payload as received (empty
    /// means nil).
    pub fn call_raw(
        &self,
        service: &str,
        method: &str,
        payload: Bytes,
        opts: CallOptions,
    ) -> Result<Bytes> {
        self.call_payload::<()>(service, method, Payload::Raw(&payload), opts)
    }

    fn call_payload<P: Serialize + ?Sized>(
        &self,
        service: &str,
        method: &str,
        payload: Payload<'_, P>,
        opts: CallOptions,
    ) -> Result<Bytes> {
        let inner = &*self.inner;
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = call_frame(
            id,
            service,
            method,
            &opts,
            payload,
            inner.max_message_size.load(Ordering::Relaxed),
            inner.fd_payloads.load(Ordering::Relaxed),
        )?;
        let (deadline, local) = call_deadlines(&opts);
        if let Some(conn) = inner.register(id, &frame, deadline, opts.no_retry)? {
            inner.write_call(&conn, id, &frame);
        }
        match inner.wait(id, deadline, local) {
            Some(outcome) => outcome.into_result(service, method),
            None => Err(timeout_error(service, method)),
        }
    }
}

#[cfg(test)]
impl BlockingClient {
    /// Whether a live connection is installed.
    pub(crate) fn connected(&self) -> bool {
        lock(&self.inner.state).conn.is_some()
    }

    /// How many calls are pending.
    pub(crate) fn pending(&self) -> usize {
        lock(&self.inner.state).core.len()
    }
}

struct State {
    /// Some thread holds the reader role (and the read buffer).
    reading: bool,
    /// What is read of the current connection and not dispatched yet
    /// (partial frames, descriptors ahead of their frames), between readers.
    incoming: Incoming,
    /// The calls in flight (see [`Core`]).
    core: Core,
    /// The live connection; `None` while reconnecting.
    conn: Option<Arc<Conn>>,
    /// Backoff position.
    retry: Retry,
    /// When the next reconnection attempt may start.
    next_attempt: Option<Instant>,
    /// Why the last connection ended, until the next one is installed (a
    /// monitor reports it, even when a call's reader saw it first).
    lost: Option<Dead>,
}

/// `SO_RCVTIMEO` currently set, in nanoseconds; `u64::MAX` means none.
const NO_TIMEOUT: u64 = u64::MAX;

/// Tolerated lateness of the local safety deadline, to avoid a `setsockopt`
/// per call.
const TIMEOUT_SLACK: Duration = Duration::from_millis(50);

/// How long one blocking send may wait for the broker to read: half the
/// safety margin, as a frame's write may wait twice (the send that fills
/// the socket buffer returns what it wrote when the time is up, the next
/// one fails). Signals do not stretch it: a send they interrupt is retried
/// with what is left (`zrpc_io::write::write_all_blocking`).
const WRITE_STALL: Duration = Duration::from_secs(SAFETY_MARGIN.as_secs() / 2);

/// Shortest handshake timeout of a reconnection attempt made by a reader
/// whose own call is about to expire.
const MIN_HANDSHAKE_TIMEOUT: Duration = Duration::from_millis(50);

/// One connection to the broker.
struct Conn {
    gen: u64,
    /// When the handshake completed.
    since: Instant,
    welcome: Welcome,
    /// The broker accepted payloads in descriptors on this connection.
    fd_payloads: bool,
    dec: FrameDecoder,
    /// Held for every write, so that frames never interleave (and, while
    /// the pending calls are resubmitted, no new call overtakes them).
    writer: Mutex<UnixStream>,
    reader: UnixStream,
    rcv_timeout: AtomicU64,
}

impl Inner {
    /// Registers a call; returns the connection to write it to (`None`:
    /// it is sent once reconnected).
    fn register(
        &self,
        id: u64,
        frame: &OutFrame,
        deadline: Option<Instant>,
        no_retry: bool,
    ) -> Result<Option<Arc<Conn>>> {
        let mut st = lock(&self.state);
        let conn = st.conn.clone();
        let on = conn.as_ref().map(|c| c.gen);
        let waiter = Waiter::Thread(std::thread::current());
        st.core.submit(id, frame, deadline, no_retry, waiter, on)?;
        Ok(conn)
    }

    /// Writes call `id`'s frame. If nothing at all could be written, the
    /// call is known not to have been sent and waits for the next
    /// connection (even with `no_retry`).
    fn write_call(&self, conn: &Conn, id: u64, frame: &OutFrame) {
        if let Err((0, _)) = conn.write_frame(frame) {
            lock(&self.state).core.unsend(id, conn.gen);
        }
    }

    /// Waits for the outcome of call `id`, reading the connection (and
    /// reconnecting) when no other thread does. `None` means the local
    /// safety deadline passed.
    fn wait(&self, id: u64, deadline: Option<Instant>, local: Option<Instant>) -> Option<Outcome> {
        let mut st = lock(&self.state);
        let result = loop {
            let now = Instant::now();
            let until = match st.core.stand(id) {
                Stand::Done(o) => break Some(o),
                Stand::Waiting { sent: false } => {
                    // Not on the broker: nobody else will time it out.
                    if deadline.is_some_and(|d| now >= d) && st.core.expire_unsent(id) {
                        break Some(reconnect_timeout());
                    }
                    deadline
                }
                Stand::Waiting { sent: true } => {
                    if local.is_some_and(|d| now >= d) {
                        let sent_on = st.core.cancel(id);
                        let conn = st.conn.clone().filter(|c| Some(c.gen) == sent_on);
                        drop(st);
                        if let Some(c) = conn {
                            c.send_cancel(id);
                        }
                        st = lock(&self.state);
                        break None;
                    }
                    local
                }
                Stand::Gone => {
                    // Only `wait` removes calls; be defensive anyway.
                    break Some(Outcome::Dead(Dead::Disconnected(
                        "the call was lost".into(),
                    )));
                }
            };
            if !st.reading {
                st.reading = true;
                let mut inc = std::mem::take(&mut st.incoming);
                drop(st);
                self.reader_role(id, deadline, local, &mut inc);
                st = lock(&self.state);
                st.incoming = inc;
                st.reading = false;
                continue;
            }
            drop(st);
            match until {
                None => std::thread::park(),
                Some(u) => std::thread::park_timeout(u.saturating_duration_since(now)),
            }
            st = lock(&self.state);
        };
        // Hand the reader role on to a thread still waiting.
        if !st.reading {
            st.core.wake_one();
        }
        result
    }

    /// The next monitor event: reads the connection (taking the reader
    /// role) until the broker sends one. An error means the connection was
    /// lost, and the subscription with it; the next call reconnects.
    pub(crate) fn next_event(&self) -> Result<Bytes> {
        loop {
            let (conn, mut inc) = {
                let mut st = lock(&self.state);
                if let Some(ev) = st.core.pop_event() {
                    return Ok(ev);
                }
                if st.reading {
                    return Err(Error::Protocol(
                        "a monitor's client is read by another thread".into(),
                    ));
                }
                let Some(conn) = st.conn.clone() else {
                    return Err(st.lost.as_ref().map_or_else(
                        || Error::Disconnected("not connected to zrpcd".into()),
                        Dead::to_lost_error,
                    ));
                };
                st.reading = true;
                (conn, std::mem::take(&mut st.incoming))
            };
            let lost = self.read_conn(&conn, None, None, &mut inc);
            if let Some(why) = &lost {
                self.connection_lost(&conn, why.clone(), &mut inc);
            }
            let mut st = lock(&self.state);
            st.incoming = inc;
            st.reading = false;
            drop(st);
            if let Some(why) = lost {
                return Err(why.to_lost_error());
            }
        }
    }

    /// Keeps the broker's `Event` frames from now on (a monitor's client).
    pub(crate) fn watch_events(&self) {
        lock(&self.state).core.watch_events();
    }

    /// The oldest monitor event not taken yet.
    pub(crate) fn pop_event(&self) -> Option<Bytes> {
        lock(&self.state).core.pop_event()
    }

    /// The reader role: reads and dispatches frames, and reconnects when the
    /// connection is lost, until call `id` has its outcome or its deadline
    /// passes (the call's own deadline while it is not on the broker, the
    /// local safety deadline while it is).
    fn reader_role(
        &self,
        id: u64,
        deadline: Option<Instant>,
        local: Option<Instant>,
        inc: &mut Incoming,
    ) {
        loop {
            let (conn, until) = {
                let st = lock(&self.state);
                let Some(sent) = st.core.waiting(id) else {
                    return;
                };
                let until = if sent { local } else { deadline };
                if until.is_some_and(|u| Instant::now() >= u) {
                    return;
                }
                (st.conn.clone(), until)
            };
            match conn {
                Some(conn) => {
                    if let Some(why) = self.read_conn(&conn, Some(id), until, inc) {
                        self.connection_lost(&conn, why, inc);
                    }
                }
                None => self.reconnect_step(until, inc),
            }
        }
    }

    /// Reads `conn` until call `my_id` has its outcome or was requeued (or,
    /// without a call, until a monitor event is queued), or `until` passes
    /// (`None`), or the connection must end (`Some`).
    fn read_conn(
        &self,
        conn: &Conn,
        my_id: Option<u64>,
        until: Option<Instant>,
        inc: &mut Incoming,
    ) -> Option<Dead> {
        loop {
            let d = self.dispatch(conn, my_id, inc);
            if d.end.is_some() {
                return d.end;
            }
            if d.watched || (my_id.is_none() && d.events > 0) {
                return None;
            }
            if let Err(e) = conn.set_timeout(until) {
                return Some(Dead::Disconnected(format!(
                    "cannot set a read timeout: {e}"
                )));
            }
            ReadPolicy::CLIENT.make_room(&conn.dec, &mut inc.buf);
            match inc.read(&conn.reader, conn.fd_payloads) {
                Ok(0) => {
                    return Some(Dead::Disconnected(
                        "the broker closed the connection".into(),
                    ))
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if zrpc_io::read::is_timeout(&e) => {
                    if until.is_some_and(|d| Instant::now() >= d) {
                        return None;
                    }
                }
                Err(e) => return Some(Dead::Disconnected(format!("read error: {e}"))),
            }
        }
    }

    /// `conn` ended for `why`: calls sent on it with `no_retry` fail, calls
    /// whose deadline passed time out, the rest wait for the next
    /// connection (their threads are woken to re-arm their timers).
    fn connection_lost(&self, conn: &Conn, why: Dead, inc: &mut Incoming) {
        let _ = conn.reader.shutdown(std::net::Shutdown::Both);
        let backoff = self.settings.backoff;
        let mut st = lock(&self.state);
        if st.conn.as_ref().is_some_and(|c| c.gen == conn.gen) {
            st.conn = None;
            inc.clear();
        }
        st.retry.connection_ended(&backoff, conn.since.elapsed());
        let now = Instant::now();
        st.next_attempt = Some(now + st.retry.next_delay(&backoff));
        st.core.lost(conn.gen, &why, now);
        st.lost = Some(why.clone());
        let waiting = st.core.len();
        drop(st);
        tracing::debug!(
            reason = ?why,
            waiting,
            "zrpc-client: connection to zrpcd lost; reconnecting"
        );
    }

    /// While disconnected: waits for the next attempt (at most until
    /// `until`), or makes the attempt.
    fn reconnect_step(&self, until: Option<Instant>, inc: &mut Incoming) {
        let now = Instant::now();
        let next = lock(&self.state).next_attempt.unwrap_or(now);
        if now < next {
            let wake = until.map_or(next, |u| u.min(next));
            std::thread::sleep(wake.saturating_duration_since(now));
            return;
        }
        let most = self.settings.handshake_timeout;
        let handshake_timeout = until.map_or(most, |u| {
            u.saturating_duration_since(now)
                .clamp(MIN_HANDSHAKE_TIMEOUT.min(most), most)
        });
        match Conn::open(&self.settings, handshake_timeout) {
            Ok((conn, leftover)) => {
                *inc = leftover;
                self.install(conn);
            }
            Err(e) => {
                let backoff = self.settings.backoff;
                let mut st = lock(&self.state);
                let attempt = st.retry.attempt;
                st.next_attempt = Some(Instant::now() + st.retry.next_delay(&backoff));
                drop(st);
                tracing::debug!(error = %e, attempt, "zrpc-client: reconnect failed");
            }
        }
    }

    /// Makes `conn` the live connection and resubmits every waiting call on
    /// it (same id, remaining budget), holding the writer lock throughout so
    /// that calls made meanwhile are written after the resubmissions.
    fn install(&self, conn: Conn) {
        let conn = Arc::new(conn);
        let max = conn.welcome.max_message_size;
        let w = lock(&conn.writer);
        let mut out = OutQueue::default();
        let resent = {
            let mut st = lock(&self.state);
            self.max_message_size.store(max, Ordering::Relaxed);
            self.fd_payloads.store(conn.fd_payloads, Ordering::Relaxed);
            let resent = st.core.install(conn.gen, max, Instant::now(), |f| {
                queue_frame(&mut out, f, conn.fd_payloads);
            });
            st.conn = Some(conn.clone());
            st.next_attempt = None;
            st.lost = None;
            resent
        };
        // A failure shuts the socket down; the reader then sees the
        // connection end and starts over.
        if let Err((_, e)) = write_queue_blocking(&w, &mut out) {
            tracing::debug!(error = %e, "zrpc-client: resubmitting failed");
            let _ = conn.reader.shutdown(std::net::Shutdown::Both);
        }
        drop(w);
        tracing::debug!(resent, "zrpc-client: reconnected to zrpcd");
    }

    /// Handles every complete frame in `inc`.
    fn dispatch(&self, conn: &Conn, my_id: Option<u64>, inc: &mut Incoming) -> Dispatched {
        if inc.buf.len() < zrpc_proto::HEADER_LEN {
            // Nothing to take (the pass before the first read of a turn).
            return Dispatched::default();
        }
        let (batch, corrupt) = conn.dec.take_batch(&mut inc.buf);
        // Payloads that came in descriptors: verified and mapped outside
        // the lock, in frame order.
        let max = conn.welcome.max_message_size;
        let mut d = match map_fd_payloads(&batch, &mut inc.fds, max) {
            Err(why) => Dispatched::ended(why),
            Ok(_) if batch.is_empty() => Dispatched::default(),
            Ok(mut mapped) => lock(&self.state).core.dispatch(&batch, my_id, &mut mapped),
        };
        if d.end.is_none() {
            d.end = corrupt.map(Dead::bad_frame);
        }
        if let Some(pongs) = d.pongs.take().filter(|_| d.end.is_none()) {
            let _ = conn.write(&pongs);
        }
        d
    }
}

impl Conn {
    /// Connects and performs the handshake, offering payloads in
    /// descriptors; returns the connection and what was read after
    /// `Welcome` (bytes and descriptors).
    fn open(settings: &Settings, handshake_timeout: Duration) -> Result<(Conn, Incoming)> {
        let c = zrpc_io::handshake::connect_blocking(
            &settings.socket_path(),
            &settings.hello(),
            handshake_timeout,
        )?;
        let (stream, welcome) = (c.sock, c.welcome);
        // A broker that stops reading (stopped, wedged) must not hold a
        // writer, and every caller queued behind its lock, past the local
        // safety deadline: a blocking send that waits `WRITE_STALL` fails,
        // and the connection is shut down.
        stream
            .set_write_timeout(Some(WRITE_STALL))
            .map_err(|e| settings.connect_error(e))?;
        let writer = stream.try_clone().map_err(|e| settings.connect_error(e))?;
        let fd_payloads = welcome.fd_payloads();
        let conn = Conn {
            gen: next_generation(),
            since: Instant::now(),
            welcome,
            fd_payloads,
            dec: FrameDecoder::new(welcome.incoming_limit()).with_fds(fd_payloads),
            writer: Mutex::new(writer),
            reader: stream,
            rcv_timeout: AtomicU64::new(NO_TIMEOUT),
        };
        let incoming = Incoming {
            buf: c.leftover,
            fds: c.leftover_fds,
        };
        Ok((conn, incoming))
    }

    /// Writes a frame. A failure shuts the socket down, so that the reader
    /// notices and reconnects; the error carries how many bytes were
    /// written.
    fn write(&self, frame: &[u8]) -> WriteResult {
        self.shut_on_error(write_all_blocking(&lock(&self.writer), &[frame]))
    }

    /// Writes `frame` (see [`write`](Conn::write)): with its payload in a
    /// sealed memfd if it is large and the connection passes descriptors,
    /// else both parts.
    fn write_frame(&self, frame: &OutFrame) -> WriteResult {
        let r = if frame.fd_sized(self.fd_payloads) {
            // Queued (the payload copied into a memfd unless it is one
            // already) before the lock is taken.
            let mut q = OutQueue::default();
            queue_frame(&mut q, frame, true);
            write_queue_blocking(&lock(&self.writer), &mut q)
        } else {
            write_all_blocking(&lock(&self.writer), &[frame.head(), &frame.tail])
        };
        self.shut_on_error(r)
    }

    /// `r`, the result of a write; a failure shuts the socket down.
    fn shut_on_error(&self, r: WriteResult) -> WriteResult {
        r.inspect_err(|_| {
            let _ = self.reader.shutdown(std::net::Shutdown::Both);
        })
    }

    /// Sends `Cancel` for a call past its local safety deadline, unless
    /// another thread is writing: the broker has not answered in time
    /// (stopped, or its socket full), and the caller must not wait behind
    /// that write (the broker ends the call at its own deadline anyway).
    fn send_cancel(&self, id: u64) {
        let Ok(writer) = self.writer.try_lock() else {
            return;
        };
        let mut f = BytesMut::with_capacity(16);
        control_frame(&mut f, &Envelope::Cancel { id });
        let _ = self.shut_on_error(write_all_blocking(&writer, &[&f]));
    }

    /// Sets `SO_RCVTIMEO` for the reader's deadline, skipping the syscall
    /// when the current setting is close enough.
    fn set_timeout(&self, deadline: Option<Instant>) -> std::io::Result<()> {
        let cur = self.rcv_timeout.load(Ordering::Relaxed);
        let want = deadline.map(|d| {
            d.saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1))
        });
        let set = match want {
            None => cur != NO_TIMEOUT,
            Some(w) => {
                cur == NO_TIMEOUT || {
                    let c = Duration::from_nanos(cur);
                    c > w + TIMEOUT_SLACK || c < w / 2
                }
            }
        };
        if set {
            self.reader.set_read_timeout(want)?;
            let nanos = want.map_or(NO_TIMEOUT, |w| {
                u64::try_from(w.as_nanos()).unwrap_or(NO_TIMEOUT - 1)
            });
            self.rcv_timeout.store(nanos, Ordering::Relaxed);
        }
        Ok(())
    }
}
