//! The async (tokio) client.

use std::collections::hash_map::Entry;
use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rustc_hash::FxHashMap;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::Interest;
use tokio::sync::Notify;
use zrpc_io::busy_poll::BusyPoll;
use zrpc_io::reactor::{register, register_dup, Registered};
use zrpc_proto::{Envelope, ErrorCode, FrameDecoder};

use crate::common::{
    call_deadlines, call_frame, control_frame, decode_result, reconnect_timeout, resubmit_parts,
    timeout_error, Backoff, Dead, OutFrame, Outcome, Payload, Retry, Settings, Welcome,
    HANDSHAKE_TIMEOUT, LARGE_FRAME,
};
use crate::{BlockingClient, CallOptions, Error, Result};
use zrpc_io::ReadPolicy;

/// Locks a mutex, ignoring poisoning (the protected state stays consistent:
/// every critical section is a few infallible map/buffer operations).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Builder for [`Client`] and [`BlockingClient`].
///
/// ```no_run
/// # async fn f() -> zrpc_client::Result<()> {
/// let client = zrpc_client::Client::builder()
///     .socket_dir("/run/zrpc")
///     .agent("my-tool/1.0")
///     .connect()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Default)]
pub struct ClientBuilder {
    socket_dir: Option<PathBuf>,
    agent: Option<String>,
    backoff: Backoff,
}

impl ClientBuilder {
    /// Uses this socket directory instead of `$ZRPC_SOCKET_DIR` or the
    /// default ([`zrpc_proto::default_socket_dir`]).
    pub fn socket_dir(mut self, dir: impl Into<PathBuf>) -> ClientBuilder {
        self.socket_dir = Some(dir.into());
        self
    }

    /// Sets the free-form agent string sent in `Hello` (shown in the broker's
    /// logs); the default is `zrpc-client/<version>`.
    pub fn agent(mut self, agent: impl Into<String>) -> ClientBuilder {
        self.agent = Some(agent.into());
        self
    }

    /// Sets the delays between reconnection attempts after the connection
    /// to the broker is lost: the first attempt waits `min`, each further
    /// one twice as long as the previous, up to `max`; every delay is then
    /// multiplied by a random factor between 0.75 and 1.25 (jitter, so that
    /// many clients do not all reconnect at the same instant). The defaults
    /// are 10 ms and 1 s. `min` is at least 1 ms, and `max` at least `min`.
    ///
    /// The sequence starts over once a connection has stayed up for at least
    /// `max`.
    pub fn reconnect_backoff(mut self, min: Duration, max: Duration) -> ClientBuilder {
        self.backoff = Backoff::new(min, max);
        self
    }

    pub(crate) fn settings(self) -> Settings {
        Settings::new(self.socket_dir.as_deref(), self.agent, self.backoff)
    }

    /// Connects an async [`Client`]. Must be called inside a tokio runtime
    /// (with timers enabled); the connection's tasks run on that runtime.
    ///
    /// Fails with [`Error::Connect`] if the broker cannot be reached now;
    /// once connected, the client reconnects by itself (see [`Client`]).
    pub async fn connect(self) -> Result<Client> {
        let settings = self.settings();
        let (conn, buf) = Conn::open(&settings).await?;
        let shared = Arc::new(Shared {
            settings,
            next_id: AtomicU64::new(1),
            max_message_size: AtomicU32::new(conn.welcome.max_message_size),
            state: Mutex::new(State {
                pending: FxHashMap::default(),
                conn: Some(conn.clone()),
                closed: false,
                supervised: true,
            }),
            wake: Notify::new(),
        });
        tokio::spawn(writer_task(conn.clone()));
        tokio::spawn(supervise(shared.clone(), Some((conn, buf))));
        Ok(Client {
            inner: Arc::new(Inner { shared }),
        })
    }

    /// Connects a [`BlockingClient`].
    ///
    /// Fails with [`Error::Connect`] if the broker cannot be reached now;
    /// once connected, the client reconnects by itself (see
    /// [`BlockingClient`]).
    pub fn connect_blocking(self) -> Result<BlockingClient> {
        BlockingClient::from_settings(self.settings())
    }
}

/// An async zrpc client.
///
/// Cheap to clone: clones share one connection to the broker and multiplex
/// their calls over it, so many calls may be in flight at once (from one
/// task with `join!`, or from many tasks). The connection's tasks run on the
/// runtime that connected; they end, and the socket closes, when the last
/// clone is dropped.
///
/// If the connection to the broker is lost (the broker restarted, crashed
/// or closed it), calls in flight do not fail: the client reconnects and
/// resubmits them, so callers see only extra latency. See the
/// [crate documentation](crate#restarts-and-reconnection) for the exact
/// rules, and [`CallOptions::no_retry`] for at-most-once calls.
///
/// Payloads are MessagePack: arguments are encoded with
/// `rmp_serde::encode::to_vec_named` semantics (structs as maps), results
/// decoded with `rmp_serde::from_slice`. Use `serde_bytes` for binary data,
/// and [`Value`](crate::Value) for dynamic values (every MessagePack type,
/// including `f32`, `bin` and `ext`, survives a round trip).
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("socket_dir", &self.inner.shared.settings.socket_dir)
            .field("instance", &self.inner.shared.settings.instance)
            .finish_non_exhaustive()
    }
}

/// Held by the `Client` clones only: dropping the last one closes the
/// client.
struct Inner {
    shared: Arc<Shared>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shared.close();
    }
}

/// State shared by the client handles, the supervisor task and the
/// connection tasks.
struct Shared {
    settings: Settings,
    next_id: AtomicU64,
    /// The broker's limit, from the latest `Welcome`.
    max_message_size: AtomicU32,
    state: Mutex<State>,
    /// Wakes the supervisor: a call was queued while disconnected, or the
    /// client was closed.
    wake: Notify,
}

struct State {
    /// Every call whose caller has not taken its outcome yet: sent, waiting
    /// to be (re)sent, or answered ([`Pending::done`]). Calls survive
    /// connections: unanswered ones are resubmitted after a reconnect.
    pending: FxHashMap<u64, Pending>,
    /// The live connection; `None` while reconnecting.
    conn: Option<Arc<Conn>>,
    /// The last `Client` handle was dropped.
    closed: bool,
    /// A supervisor task is running (it is restarted by the next call if
    /// its runtime shut down).
    supervised: bool,
}

/// A call waiting for its result.
///
/// The outcome is left in the entry for the caller to take (see
/// [`Shared::poll_outcome`]), with the caller's waker next to it: this
/// replaces a `oneshot` channel per call (an allocation and its atomic
/// operations) with the state lock the call takes anyway.
struct Pending {
    /// The outcome, once known; the entry is then only waiting for its
    /// caller, and is skipped by everything else.
    done: Option<Outcome>,
    /// The caller's waker: stored by `submit` with the call, replaced by
    /// a later poll from another context.
    waker: Option<Waker>,
    /// The encoded `Call` frame, for resubmission.
    frame: OutFrame,
    /// The call's deadline (without the local safety margin).
    deadline: Option<Instant>,
    no_retry: bool,
    /// Generation of the connection the call was sent on; `None` while it
    /// waits for the next connection (queued while disconnected, or
    /// answered `Shutdown` by a broker that is going away).
    sent_on: Option<u64>,
}

/// Connection generations, to tell a call's connection from the current
/// one.
static GENERATION: AtomicU64 = AtomicU64::new(1);

impl Pending {
    /// Hands the call its outcome and wakes its caller. The call is then
    /// no longer on any connection (nothing to cancel or resend).
    fn finish(&mut self, outcome: Outcome) {
        self.done = Some(outcome);
        self.sent_on = None;
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    fn answered(&self) -> bool {
        self.done.is_some()
    }
}

impl Shared {
    /// The outcome of call `id` if it is known (the entry is removed);
    /// otherwise remembers the caller's waker. `Ready(None)`: the call is
    /// neither pending nor done, i.e. the client's tasks stopped and
    /// dropped it.
    fn poll_outcome(&self, id: u64, cx: &mut std::task::Context<'_>) -> Poll<Option<Outcome>> {
        let mut st = lock(&self.state);
        match st.pending.entry(id) {
            Entry::Occupied(e) if e.get().answered() => Poll::Ready(e.remove().done),
            Entry::Occupied(mut e) => {
                let p = e.get_mut();
                if !p.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    p.waker = Some(cx.waker().clone());
                }
                Poll::Pending
            }
            Entry::Vacant(_) => Poll::Ready(None),
        }
    }

    /// Registers a call. Returns the connection to send it on (`None`: it
    /// is queued and sent once connected) and the number of calls pending.
    fn submit(self: &Arc<Self>, id: u64, mut p: Pending) -> Result<(Option<Arc<Conn>>, usize)> {
        let mut st = lock(&self.state);
        if st.closed {
            return Err(Error::Disconnected("the client was closed".into()));
        }
        let conn = st.conn.clone().filter(|c| !c.dead.load(Ordering::Acquire));
        p.sent_on = conn.as_ref().map(|c| c.gen);
        st.pending.insert(id, p);
        let n = st.pending.len();
        let spawn = !st.supervised;
        st.supervised = true;
        drop(st);
        if spawn {
            // The previous supervisor's runtime is gone; reconnect on ours.
            tokio::spawn(supervise(self.clone(), None));
        } else if conn.is_none() {
            self.wake.notify_one();
        }
        Ok((conn, n))
    }

    /// Call `id` was certainly not written to connection `gen`: it waits
    /// for the next connection.
    fn unsend(&self, id: u64, gen: u64) {
        let mut st = lock(&self.state);
        if let Some(p) = st.pending.get_mut(&id) {
            if p.sent_on == Some(gen) {
                p.sent_on = None;
            }
        }
    }

    /// The call's own deadline passed: if it is not on the broker (waiting
    /// for a reconnect), forget it and return true; nobody else would
    /// answer it.
    fn expire_unsent(&self, id: u64) -> bool {
        let mut st = lock(&self.state);
        match st.pending.get(&id) {
            Some(p) if p.sent_on.is_none() && !p.answered() => {
                st.pending.remove(&id);
                true
            }
            _ => false,
        }
    }

    /// Abandons call `id`: forgets it, and tells the broker if it was sent
    /// on the current connection.
    fn cancel(&self, id: u64) {
        let conn = {
            let mut st = lock(&self.state);
            // An answered call has `sent_on` `None`: nothing to cancel.
            match (st.pending.remove(&id).and_then(|p| p.sent_on), &st.conn) {
                (Some(g), Some(c)) if c.gen == g => Some(c.clone()),
                _ => None,
            }
        };
        if let Some(c) = conn {
            c.send_cancel(id);
        }
    }

    /// The last handle was dropped: fail what is left, end the tasks.
    fn close(&self) {
        let why = Dead::Disconnected("the client was closed".into());
        let conn = {
            let mut st = lock(&self.state);
            st.closed = true;
            for p in st.pending.values_mut().filter(|p| !p.answered()) {
                p.finish(Outcome::Dead(why.clone()));
            }
            st.conn.take()
        };
        if let Some(c) = conn {
            c.kill(why);
        }
        self.wake.notify_one();
    }

    /// `conn` ended for `why`: calls sent on it with `no_retry` fail, calls
    /// whose deadline passed time out, the rest wait for the next
    /// connection. Returns false if the client is closed.
    fn connection_lost(&self, conn: &Arc<Conn>, why: Dead) -> bool {
        conn.kill(why.clone());
        let mut st = lock(&self.state);
        if st.conn.as_ref().is_some_and(|c| Arc::ptr_eq(c, conn)) {
            st.conn = None;
        }
        if st.closed {
            return false;
        }
        let now = Instant::now();
        let mut waiting = 0usize;
        for p in st.pending.values_mut().filter(|p| !p.answered()) {
            if p.deadline.is_some_and(|d| now >= d) {
                p.finish(reconnect_timeout());
            } else if p.sent_on == Some(conn.gen) && p.no_retry {
                p.finish(Outcome::Dead(why.clone()));
            } else {
                if p.sent_on == Some(conn.gen) {
                    p.sent_on = None;
                }
                waiting += 1;
            }
        }
        drop(st);
        tracing::debug!(
            reason = ?why,
            waiting,
            "zrpc-client: connection to zrpcd lost; reconnecting"
        );
        true
    }

    /// Makes `conn` the live connection and resubmits every pending call on
    /// it (same id, remaining budget). Returns false if the client is
    /// closed.
    fn install(&self, conn: &Arc<Conn>) -> bool {
        let mut st = lock(&self.state);
        if st.closed {
            return false;
        }
        let max = conn.welcome.max_message_size;
        self.max_message_size.store(max, Ordering::Relaxed);
        let now = Instant::now();
        let mut resent = 0usize;
        {
            let mut q = lock(&conn.wq);
            for p in st.pending.values_mut().filter(|p| !p.answered()) {
                let remaining = match p.deadline {
                    None => None,
                    Some(d) => match d.checked_duration_since(now) {
                        Some(r) if !r.is_zero() => Some(r),
                        _ => {
                            p.finish(reconnect_timeout());
                            continue;
                        }
                    },
                };
                match resubmit_parts(&p.frame, remaining, max) {
                    Ok(frame) => {
                        q.push_frame(&frame);
                        p.sent_on = Some(conn.gen);
                        resent += 1;
                    }
                    Err(e) => p.finish(Outcome::Failed(
                        e.code().unwrap_or(ErrorCode::Protocol),
                        e.to_string(),
                    )),
                }
            }
        }
        st.conn = Some(conn.clone());
        drop(st);
        conn.writer_wake.notify_one();
        tracing::debug!(resent, "zrpc-client: reconnected to zrpcd");
        true
    }

    /// Whether the client was closed.
    fn is_closed(&self) -> bool {
        lock(&self.state).closed
    }

    /// Runs `fut` unless the client is closed first (`None`).
    async fn unless_closed<F: std::future::Future>(&self, fut: F) -> Option<F::Output> {
        tokio::pin!(fut);
        loop {
            if self.is_closed() {
                return None;
            }
            tokio::select! {
                r = &mut fut => return Some(r),
                _ = self.wake.notified() => {}
            }
        }
    }
}

impl Client {
    /// Connects to the broker in `$ZRPC_SOCKET_DIR`, or the default directory (`/run/zrpc`, see
    /// `zrpc_proto::default_socket_dir`).
    pub async fn connect() -> Result<Client> {
        ClientBuilder::default().connect().await
    }

    /// Connects to the broker whose socket is in `socket_dir`.
    pub async fn connect_to(socket_dir: impl AsRef<std::path::Path>) -> Result<Client> {
        ClientBuilder::default()
            .socket_dir(socket_dir.as_ref())
            .connect()
            .await
    }

    /// A builder for clients with non-default settings.
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// Calls `service.method(payload)` and decodes the result as `R`.
    /// `timeout` `None` waits forever.
    pub async fn call<P, R>(
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
            .await
    }

    /// Like [`call`](Client::call), with all [`CallOptions`].
    pub async fn call_with<P, R>(
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
        let bytes = self
            .call_payload(service, method, Payload::Serde(payload), opts)
            .await?;
        decode_result(&bytes)
    }

    /// Calls with an already-encoded payload (exactly one MessagePack value;
    /// empty means nil) and returns the result payload as received (empty
    /// means nil).
    pub async fn call_raw(
        &self,
        service: &str,
        method: &str,
        payload: Bytes,
        opts: CallOptions,
    ) -> Result<Bytes> {
        self.call_payload::<()>(service, method, Payload::Raw(&payload), opts)
            .await
    }

    async fn call_payload<P: Serialize + ?Sized>(
        &self,
        service: &str,
        method: &str,
        payload: Payload<'_, P>,
        opts: CallOptions,
    ) -> Result<Bytes> {
        let shared = &self.inner.shared;
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = call_frame(
            id,
            service,
            method,
            &opts,
            payload,
            shared.max_message_size.load(Ordering::Relaxed),
        )?;
        let (deadline, local) = call_deadlines(&opts);
        // The caller's waker goes into the entry with the call: the first
        // wait below is in this same poll, so it need not look the entry
        // up again to register it.
        let waker = std::future::poll_fn(|cx| Poll::Ready(cx.waker().clone())).await;
        let (conn, in_flight) = shared.submit(
            id,
            Pending {
                done: None,
                waker: Some(waker),
                frame: frame.clone(),
                deadline,
                no_retry: opts.no_retry,
                sent_on: None,
            },
        )?;
        let mut guard = CancelGuard {
            shared,
            id,
            armed: true,
        };
        // A lone call is written at once by the caller (one task hop less);
        // concurrent calls are batched by the writer task (one syscall for
        // many frames), also right after a batch of results woke several
        // callers, when each sees itself alone for a moment.
        if let Some(conn) = conn {
            let lone = in_flight == 1 && !conn.burst.load(Ordering::Relaxed);
            if let Some(why) = conn.send_unless_failed(frame, lone) {
                // Not sent: the call waits for the next connection, even
                // with `no_retry`.
                shared.unsend(id, conn.gen);
                conn.kill(why);
            }
        }
        // Wait for the result; at the call's deadline, a call that is not on
        // the broker (the client is reconnecting) times out at once; one
        // that is gets until the local safety deadline.
        let mut past_deadline = false;
        let mut registered = true;
        let received = loop {
            let wake_at = if past_deadline { local } else { deadline };
            let outcome = std::future::poll_fn(|cx| {
                if std::mem::take(&mut registered) {
                    // Still the poll that submitted the call with this
                    // context's waker: an outcome that arrives wakes it.
                    return Poll::Pending;
                }
                shared.poll_outcome(id, cx)
            });
            let Some(at) = wake_at else {
                break outcome.await;
            };
            match tokio::time::timeout_at(at.into(), outcome).await {
                Ok(r) => break r,
                Err(_) if !past_deadline => {
                    past_deadline = true;
                    if shared.expire_unsent(id) {
                        guard.armed = false;
                        return Err(timeout_error(service, method));
                    }
                }
                // The guard removes the call and sends `Cancel`.
                Err(_) => return Err(timeout_error(service, method)),
            }
        };
        guard.armed = false;
        match received {
            Some(outcome) => outcome.into_result(service, method),
            None => Err(Error::Disconnected(
                "the client's connection task stopped".into(),
            )),
        }
    }
}

#[cfg(test)]
impl Client {
    /// Whether a live connection is installed.
    pub(crate) fn connected(&self) -> bool {
        lock(&self.inner.shared.state)
            .conn
            .as_ref()
            .is_some_and(|c| !c.dead.load(Ordering::Acquire))
    }

    /// How many calls are pending (answered ones whose callers have not
    /// taken the outcome included).
    pub(crate) fn pending(&self) -> usize {
        lock(&self.inner.shared.state).pending.len()
    }

    /// How many answered calls wait for their callers.
    pub(crate) fn answered(&self) -> usize {
        lock(&self.inner.shared.state)
            .pending
            .values()
            .filter(|p| p.answered())
            .count()
    }
}

/// Sends `Cancel` for a call whose future is dropped (or times out locally)
/// before its result arrived.
struct CancelGuard<'a> {
    shared: &'a Shared,
    id: u64,
    armed: bool,
}

impl Drop for CancelGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.shared.cancel(self.id);
        }
    }
}

/// Owns the connection life cycle: reads the live connection, and when it
/// is lost reconnects (with backoff) and resubmits the pending calls. Runs
/// until the client is closed.
async fn supervise(shared: Arc<Shared>, mut first: Option<(Arc<Conn>, BytesMut)>) {
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
                if st.closed {
                    return None;
                }
                if st.pending.values().any(|p| !p.answered()) {
                    break;
                }
            }
            shared.wake.notified().await;
        }
        let delay = retry.next_delay(&shared.settings.backoff);
        shared.unless_closed(tokio::time::sleep(delay)).await?;
        match shared.unless_closed(Conn::open(&shared.settings)).await? {
            Ok((conn, buf)) => {
                tokio::spawn(writer_task(conn.clone()));
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
            for p in st.pending.values_mut().filter(|p| !p.answered()) {
                p.finish(Outcome::Dead(why.clone()));
            }
            st.conn.take()
        };
        if let Some(c) = conn {
            c.kill(why);
        }
    }
}

#[derive(Default)]
struct WriteQueue {
    /// Frames to write before `tail` (large frames, not copied).
    chunks: VecDeque<Bytes>,
    /// Small frames, appended in order.
    tail: BytesMut,
    /// Someone (the writer task, or a caller writing its frame directly
    /// because nothing was queued) is writing to the socket; everyone else
    /// appends to the queue.
    writing: bool,
    /// No more writes: the writer flushes what is queued and ends.
    closed: bool,
}

impl WriteQueue {
    fn is_empty(&self) -> bool {
        self.chunks.is_empty() && self.tail.is_empty()
    }

    /// Appends both parts of a frame; returns whether the writer task must
    /// be woken.
    fn push_frame(&mut self, frame: &OutFrame) -> bool {
        let wake = self.is_empty() && !self.writing;
        let head = frame.head();
        if head.len() < LARGE_FRAME {
            self.tail.extend_from_slice(head);
        } else {
            self.push(&frame.head_from(0));
        }
        if !frame.tail.is_empty() {
            self.push(&frame.tail);
        }
        wake
    }

    /// Appends a frame; returns whether the writer task must be woken.
    fn push(&mut self, frame: &Bytes) -> bool {
        let wake = self.is_empty() && !self.writing;
        if frame.len() < LARGE_FRAME {
            self.tail.extend_from_slice(frame);
        } else {
            if !self.tail.is_empty() {
                let t = self.tail.split().freeze();
                self.chunks.push_back(t);
            }
            self.chunks.push_back(frame.clone());
        }
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
struct Conn {
    gen: u64,
    welcome: Welcome,
    dead: AtomicBool,
    /// Why the connection was killed (by a write error or `close`), for the
    /// reader.
    why: Mutex<Option<Dead>>,
    wq: Mutex<WriteQueue>,
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
    async fn open(settings: &Settings) -> Result<(Arc<Conn>, BytesMut)> {
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
            wq: Mutex::new(WriteQueue::default()),
            io,
            writer_wake: Notify::new(),
            reader_stop: Notify::new(),
            burst: AtomicBool::new(false),
            poller,
        });
        Ok((conn, buf))
    }

    /// Ends the connection: the writer flushes what is queued (best effort)
    /// and exits, the reader stops. Idempotent: the first reason wins.
    fn kill(&self, why: Dead) {
        lock(&self.why).get_or_insert(why);
        self.dead.store(true, Ordering::Release);
        lock(&self.wq).closed = true;
        self.writer_wake.notify_one();
        self.reader_stop.notify_one();
    }

    fn send_cancel(&self, id: u64) {
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
    fn send_unless_failed(&self, frame: OutFrame, direct: bool) -> Option<Dead> {
        {
            let mut q = lock(&self.wq);
            if q.closed {
                return None;
            }
            if !direct || q.writing || !q.is_empty() {
                let wake = q.push_frame(&frame);
                drop(q);
                if wake {
                    self.writer_wake.notify_one();
                }
                return None;
            }
            q.writing = true;
        }
        let result = if frame.tail.is_empty() {
            self.io.get_ref().write(frame.head())
        } else {
            self.io.get_ref().write_vectored(&[
                io::IoSlice::new(frame.head()),
                io::IoSlice::new(&frame.tail),
            ])
        };
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
                lock(&self.wq).writing = false;
                return Some(Dead::Disconnected(format!("write error: {e}")));
            }
        };
        let wake = {
            let mut q = lock(&self.wq);
            q.writing = false;
            // The rest goes before anything queued meanwhile.
            let head = frame.head().len();
            if written < head {
                let rest = frame.head_from(written);
                if !frame.tail.is_empty() {
                    q.chunks.push_front(frame.tail);
                }
                q.chunks.push_front(rest);
            } else if written < frame.len() {
                q.chunks.push_front(frame.tail.slice(written - head..));
            }
            !q.is_empty() || q.closed
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
    let mut end = corrupt.map(|e| {
        Dead::Fatal(
            ErrorCode::Protocol,
            format!("bad frame from the broker: {e}"),
        )
    });
    let mut st: Option<MutexGuard<'_, State>> = None;
    let mut pongs = Vec::new();
    let mut delivered = 0usize;
    for (envelope, payload) in batch.frames() {
        match Envelope::decode(envelope) {
            Ok(Envelope::Result { id, code, message }) => {
                let st = st.get_or_insert_with(|| lock(&shared.state));
                if code == Some(ErrorCode::Shutdown) {
                    // The broker is going away without having run the call:
                    // send it again to the next broker.
                    if let Some(p) = st
                        .pending
                        .get_mut(&id)
                        .filter(|p| !p.no_retry && !p.answered())
                    {
                        p.sent_on = None;
                        continue;
                    }
                }
                if let Some(p) = st.pending.get_mut(&id).filter(|p| !p.answered()) {
                    let outcome = match code {
                        Some(code) => Outcome::Failed(code, message.to_owned()),
                        None => Outcome::Ok(batch.payload(payload)),
                    };
                    p.finish(outcome);
                    delivered += 1;
                }
            }
            Ok(Envelope::Ping { nonce }) => pongs.push(nonce),
            Ok(Envelope::Pong { .. }) => {}
            Ok(Envelope::Fatal { code, message }) => {
                end = Some(Dead::Fatal(code, message.to_owned()));
                break;
            }
            Ok(other) => {
                tracing::debug!(kind = ?other.kind(), "zrpc-client: ignoring unexpected frame");
            }
            Err(e) => {
                end = Some(Dead::Fatal(
                    ErrorCode::Protocol,
                    format!("bad envelope from the broker: {e}"),
                ));
                break;
            }
        }
    }
    drop(st);
    if delivered > 1 {
        conn.burst.store(true, Ordering::Relaxed);
    }
    if !pongs.is_empty() {
        let mut f = BytesMut::with_capacity(16 * pongs.len());
        for nonce in pongs {
            control_frame(&mut f, &Envelope::Pong { nonce });
        }
        conn.send(f.freeze().into(), false);
    }
    end
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

/// Writes all of `buf` to `sock`. While the socket is full, waits through
/// `wait`, a duplicate registered for writability (created on the first
/// `WouldBlock`; the caller drops it once its batch is written).
async fn write_all(
    sock: &std::os::unix::net::UnixStream,
    wait: &mut Option<Registered>,
    mut buf: &[u8],
) -> io::Result<()> {
    while !buf.is_empty() {
        let r = match wait.as_ref() {
            None => (&*sock).write(buf),
            Some(w) => {
                let mut guard = w.writable().await?;
                let r = (&*sock).write(buf);
                if matches!(&r, Err(e) if e.kind() == io::ErrorKind::WouldBlock) {
                    guard.clear_ready();
                }
                r
            }
        };
        match r {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if wait.is_none() {
                    *wait = Some(register_dup(sock, Interest::WRITABLE)?);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

async fn writer_task(conn: Arc<Conn>) {
    let mut chunks = VecDeque::new();
    let mut spare = BytesMut::with_capacity(64 * 1024);
    loop {
        let step = {
            let mut q = lock(&conn.wq);
            if q.writing {
                // A caller is writing directly; it wakes us if needed.
                WriterStep::Wait
            } else if q.is_empty() {
                if q.closed {
                    WriterStep::Exit
                } else {
                    WriterStep::Wait
                }
            } else {
                std::mem::swap(&mut q.chunks, &mut chunks);
                std::mem::swap(&mut q.tail, &mut spare);
                q.writing = true;
                WriterStep::Write
            }
        };
        match step {
            WriterStep::Exit => break,
            WriterStep::Wait => conn.writer_wake.notified().await,
            WriterStep::Write => {
                conn.burst.store(false, Ordering::Relaxed);
                let mut result = Ok(());
                let mut wait = None;
                for c in chunks.drain(..) {
                    result = write_all(conn.io.get_ref(), &mut wait, &c).await;
                    if result.is_err() {
                        break;
                    }
                }
                if result.is_ok() && !spare.is_empty() {
                    result = write_all(conn.io.get_ref(), &mut wait, &spare).await;
                }
                drop(wait);
                spare.clear();
                lock(&conn.wq).writing = false;
                if let Err(e) = result {
                    conn.kill(Dead::Disconnected(format!("write error: {e}")));
                    break;
                }
            }
        }
    }
}
