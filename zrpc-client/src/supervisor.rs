//! The async client's shared state and its supervisor task: the calls in
//! flight ([`Core`]) next to the live connection, the reading of that
//! connection (results handed to their callers), and reconnecting with
//! backoff when it is lost. The connection itself is [`crate::conn`]; the
//! handles and the call path are [`crate::client`].

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Instant;

use bytes::BytesMut;
use tokio::sync::Notify;
use zrpc_io::fdpass::FdQueue;
use zrpc_proto::FrameDecoder;

use crate::common::{lock, Dead, OutFrame, Outcome, Retry, Settings, LARGE_FRAME};
use crate::conn::Conn;
use crate::core::{Core, Dispatched, Waiter};
use crate::fds::map_fd_payloads;
use crate::Result;

/// State shared by the client handles, the supervisor task and the
/// connection tasks.
pub(crate) struct Shared {
    pub(crate) settings: Settings,
    pub(crate) next_id: AtomicU64,
    /// The broker's limit, from the latest `Welcome`.
    pub(crate) max_message_size: AtomicU32,
    /// Whether the latest connection passes payloads in descriptors (large
    /// payloads are then encoded straight into memfds).
    pub(crate) fd_payloads: AtomicBool,
    pub(crate) state: Mutex<State>,
    /// Wakes the supervisor: a call was queued while disconnected, or the
    /// client was closed.
    pub(crate) wake: Notify,
}

pub(crate) struct State {
    /// Every call whose caller has not taken its outcome yet.
    pub(crate) core: Core,
    /// The live connection; `None` while reconnecting.
    pub(crate) conn: Option<Arc<Conn>>,
    /// A supervisor task is running (it is restarted by the next call if
    /// its runtime shut down).
    pub(crate) supervised: bool,
}

impl Shared {
    /// Registers a call. Returns the connection to send it on (`None`: it
    /// is queued and sent once connected) and the number of calls pending.
    #[inline]
    pub(crate) fn submit(
        self: &Arc<Self>,
        id: u64,
        frame: &OutFrame,
        deadline: Option<Instant>,
        no_retry: bool,
        waiter: Waiter,
    ) -> Result<(Option<Arc<Conn>>, usize)> {
        let mut st = lock(&self.state);
        let conn = st.conn.clone().filter(|c| !c.is_dead());
        let on = conn.as_ref().map(|c| c.gen);
        let n = st.core.submit(id, frame, deadline, no_retry, waiter, on)?;
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

    /// The outcome of call `id` if it is known, else remembers the caller's
    /// waker (see [`Core::poll`]).
    pub(crate) fn poll_outcome(
        &self,
        id: u64,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Option<Outcome>> {
        lock(&self.state).core.poll(id, cx.waker())
    }

    /// Abandons call `id`: forgets it, and tells the broker if it was sent
    /// on the current connection.
    pub(crate) fn cancel(&self, id: u64) {
        let conn = {
            let mut st = lock(&self.state);
            match (st.core.cancel(id), &st.conn) {
                (Some(g), Some(c)) if c.gen == g => Some(c.clone()),
                _ => None,
            }
        };
        if let Some(c) = conn {
            c.send_cancel(id);
        }
    }

    /// The last handle was dropped: fail what is left, end the tasks.
    pub(crate) fn close(&self) {
        let why = Dead::Disconnected("the client was closed".into());
        let conn = {
            let mut st = lock(&self.state);
            st.core.close(&why);
            st.conn.take()
        };
        if let Some(c) = conn {
            c.kill(why);
        }
        self.wake.notify_one();
    }

    /// `conn` ended for `why` (see [`Core::lost`]). Returns false if the
    /// client is closed.
    pub(crate) fn connection_lost(&self, conn: &Arc<Conn>, why: Dead) -> bool {
        conn.kill(why.clone());
        let mut st = lock(&self.state);
        if st.conn.as_ref().is_some_and(|c| Arc::ptr_eq(c, conn)) {
            st.conn = None;
        }
        if st.core.is_closed() {
            return false;
        }
        let waiting = st.core.lost(conn.gen, &why, Instant::now());
        drop(st);
        tracing::debug!(
            reason = ?why,
            waiting,
            "zrpc-client: connection to zrpcd lost; reconnecting"
        );
        true
    }

    /// Makes `conn` the live connection and resubmits every pending call on
    /// it (see [`Core::install`]). Returns false if the client is closed.
    pub(crate) fn install(&self, conn: &Arc<Conn>) -> bool {
        let mut st = lock(&self.state);
        if st.core.is_closed() {
            return false;
        }
        let max = conn.welcome.max_message_size;
        self.max_message_size.store(max, Ordering::Relaxed);
        self.fd_payloads.store(conn.fd_payloads, Ordering::Relaxed);
        let resent = conn.queue_all(|push| st.core.install(conn.gen, max, Instant::now(), push));
        st.conn = Some(conn.clone());
        drop(st);
        tracing::debug!(resent, "zrpc-client: reconnected to zrpcd");
        true
    }

    /// Whether the client was closed.
    pub(crate) fn is_closed(&self) -> bool {
        lock(&self.state).core.is_closed()
    }

    /// Runs `fut` unless the client is closed first (`None`).
    pub(crate) async fn unless_closed<F: std::future::Future>(&self, fut: F) -> Option<F::Output> {
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

/// Handles every complete frame in `buf`. Returns why the connection must
/// end, if it must.
fn dispatch(
    shared: &Shared,
    conn: &Conn,
    dec: &FrameDecoder,
    buf: &mut BytesMut,
    fds: &mut FdQueue,
) -> Option<Dead> {
    // The complete frames at the front of `buf`, taken off as one shared
    // buffer and read where they lie: only a result payload takes a handle
    // on it (no envelope or per-frame split to take and drop).
    let (batch, corrupt) = dec.take_batch(buf);
    // Payloads that came in descriptors: verified and mapped here, outside
    // the lock, in frame order.
    let mut mapped = match map_fd_payloads(&batch, fds, conn.welcome.max_message_size) {
        Ok(m) => m,
        Err(why) => return Some(why),
    };
    let d = if batch.is_empty() {
        Dispatched::default()
    } else {
        lock(&shared.state).core.dispatch(&batch, None, &mut mapped)
    };
    if d.delivered > 1 {
        conn.mark_burst();
    }
    if let Some(pongs) = d.pongs {
        conn.send(pongs.freeze().into(), false);
    }
    d.end.or_else(|| corrupt.map(Dead::bad_frame))
}

/// Reads `conn` until it ends; returns why.
async fn read_loop(shared: &Shared, conn: &Conn, mut buf: BytesMut) -> Dead {
    let dec = FrameDecoder::new(conn.welcome.incoming_limit()).with_fds(conn.fd_payloads);
    let mut fds = conn.take_leftover_fds();
    loop {
        let before = buf.len();
        if let Some(why) = dispatch(shared, conn, &dec, &mut buf, &mut fds) {
            return why;
        }
        if before - buf.len() >= LARGE_FRAME {
            // Large frames were handed out: let the callers take (and drop)
            // them before making room for the next read, so that the read
            // buffer can reuse their memory (see `ReadPolicy::make_room`). Small ones
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
            why = conn.stopped() => return why,
            r = conn.read(&dec, &mut buf, &mut fds) => match r {
                Ok(0) => return Dead::Disconnected("the broker closed the connection".into()),
                Ok(_) => {}
                Err(e) => return Dead::Disconnected(format!("read error: {e}")),
            }
        }
    }
}
