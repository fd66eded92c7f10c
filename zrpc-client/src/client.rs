//! The async (tokio) client: its builder, its handles and the call path.
//! The calls themselves live in the [`Core`](crate::core::Core); the
//! connection and its tasks are [`crate::conn`].

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::Notify;

use crate::common::{
    call_deadlines, call_frame, decode_result, lock, timeout_error, Backoff, Payload, Settings,
};
use crate::conn::Conn;
use crate::core::{Core, Waiter};
use crate::supervisor::{supervise, Shared, State};
use crate::{BlockingClient, CallOptions, Error, Monitor, Result};

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
    /// See [`ClientBuilder::connect_timeout`].
    connect_timeout: Option<Duration>,
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

    /// How long connecting to the broker and the handshake may take, for
    /// the first connection and every reconnection (default 10 s; at least
    /// 1 ms). A broker that does not accept within it (stopped, wedged, or
    /// with its listen backlog full) or does not answer `Hello` gives
    /// [`Error::Connect`] at [`connect`](Self::connect) and
    /// [`connect_blocking`](Self::connect_blocking); a `BlockingClient`'s
    /// reconnection within a call is bounded by the call's deadline too.
    pub fn connect_timeout(mut self, timeout: Duration) -> ClientBuilder {
        self.connect_timeout = Some(timeout.max(Duration::from_millis(1)));
        self
    }

    /// The reconnection backoff set with
    /// [`reconnect_backoff`](Self::reconnect_backoff).
    pub(crate) fn backoff(&self) -> Backoff {
        self.backoff
    }

    pub(crate) fn settings(self) -> Settings {
        let mut s = Settings::new(self.socket_dir.as_deref(), self.agent, self.backoff);
        if let Some(t) = self.connect_timeout {
            s.handshake_timeout = t;
        }
        s
    }

    /// Connects an async [`Client`]. Must be called inside a tokio runtime
    /// (with timers enabled); the connection's tasks run on that runtime.
    ///
    /// Fails with [`Error::Connect`] if the broker cannot be reached now
    /// (at once if its listen backlog is full: a broker stopped, wedged or
    /// overloaded), or does not complete the handshake within the
    /// [connect timeout](Self::connect_timeout) (10 s by default); once
    /// connected, the client reconnects by itself (see [`Client`]).
    pub async fn connect(self) -> Result<Client> {
        let settings = self.settings();
        let (conn, buf) = Conn::open(&settings).await?;
        let shared = Arc::new(Shared {
            settings,
            next_id: AtomicU64::new(1),
            max_message_size: AtomicU32::new(conn.welcome.max_message_size),
            fd_payloads: AtomicBool::new(conn.fd_payloads),
            state: Mutex::new(State {
                core: Core::default(),
                conn: Some(conn.clone()),
                supervised: true,
            }),
            wake: Notify::new(),
        });
        conn.start_writer();
        tokio::spawn(supervise(shared.clone(), Some((conn, buf))));
        Ok(Client {
            inner: Arc::new(Inner { shared }),
        })
    }

    /// Connects a [`BlockingClient`].
    ///
    /// Fails with [`Error::Connect`] if the broker cannot be reached now,
    /// or does not complete the handshake within the
    /// [connect timeout](Self::connect_timeout) (10 s by default: a broker that is
    /// stopped or wedged, its listen backlog full, say);
    /// once connected, the client reconnects by itself (see
    /// [`BlockingClient`]).
    pub fn connect_blocking(self) -> Result<BlockingClient> {
        BlockingClient::from_settings(self.settings())
    }

    /// Connects a [`Monitor`]: a blocking connection of its own, subscribed
    /// to the broker's events for `services` (every service if empty). The
    /// access policy decides who may watch (see docs/security.md).
    pub fn monitor(self, services: &[String]) -> Result<Monitor> {
        Monitor::start(self, services)
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
            shared.fd_payloads.load(Ordering::Relaxed),
        )?;
        let (deadline, local) = call_deadlines(&opts);
        // The caller's waker goes into the entry with the call: the first
        // wait below is in this same poll, so it need not look the entry
        // up again to register it.
        let waker = std::future::poll_fn(|cx| Poll::Ready(cx.waker().clone())).await;
        let (conn, in_flight) =
            shared.submit(id, &frame, deadline, opts.no_retry, Waiter::Task(waker))?;
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
            let lone = in_flight == 1 && !conn.in_burst();
            if let Some(why) = conn.send_unless_failed(frame, lone) {
                // Not sent: the call waits for the next connection, even
                // with `no_retry`.
                lock(&shared.state).core.unsend(id, conn.gen);
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
                    if lock(&shared.state).core.expire_unsent(id) {
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
            .is_some_and(|c| !c.is_dead())
    }

    /// How many calls are pending (answered ones whose callers have not
    /// taken the outcome included).
    pub(crate) fn pending(&self) -> usize {
        lock(&self.inner.shared.state).core.len()
    }

    /// How many answered calls wait for their callers.
    pub(crate) fn answered(&self) -> usize {
        lock(&self.inner.shared.state).core.answered()
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
