//! The async (tokio) client.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rustc_hash::FxHashMap;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{oneshot, Notify};
use zrpc_proto::{Envelope, ErrorCode, FrameDecoder};

use crate::common::{
    call_frame, control_frame, decode_payload, local_deadline, parse_handshake, timeout_error,
    Dead, Outcome, Payload, Settings, Welcome, HANDSHAKE_MAX_BODY, HANDSHAKE_TIMEOUT, LARGE_FRAME,
    READ_CHUNK,
};
use crate::{BlockingClient, CallOptions, Error, Result};

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
}

impl ClientBuilder {
    /// Uses this socket directory instead of `$ZRPC_SOCKET_DIR` or
    /// `/tmp/zrpc_sockets`.
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

    pub(crate) fn settings(self) -> Settings {
        Settings::new(self.socket_dir.as_deref(), self.agent)
    }

    /// Connects an async [`Client`]. Must be called inside a tokio runtime
    /// (with timers enabled); the connection's tasks run on that runtime.
    pub async fn connect(self) -> Result<Client> {
        let settings = self.settings();
        let conn = Conn::connect(&settings).await?;
        Ok(Client {
            inner: Arc::new(Inner {
                settings,
                next_id: AtomicU64::new(1),
                conn: Mutex::new(Some(conn)),
                reconnect: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// Connects a [`BlockingClient`].
    pub fn connect_blocking(self) -> Result<BlockingClient> {
        BlockingClient::from_settings(self.settings())
    }
}

/// An async zrpc client.
///
/// Cheap to clone: clones share one connection to the broker and multiplex
/// their calls over it, so many calls may be in flight at once (from one
/// task with `join!`, or from many tasks). The connection's reader and
/// writer tasks run on the runtime that connected; they end, and the socket
/// closes, when the last clone is dropped. If the connection is lost,
/// pending calls fail with [`Error::Disconnected`] and the next call
/// reconnects.
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
            .field("socket_dir", &self.inner.settings.socket_dir)
            .field("instance", &self.inner.settings.instance)
            .finish_non_exhaustive()
    }
}

struct Inner {
    settings: Settings,
    next_id: AtomicU64,
    conn: Mutex<Option<Arc<Conn>>>,
    reconnect: tokio::sync::Mutex<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(conn) = lock(&self.conn).take() {
            conn.close();
        }
    }
}

impl Inner {
    fn current(&self) -> Option<Arc<Conn>> {
        lock(&self.conn)
            .as_ref()
            .filter(|c| !c.dead.load(Ordering::Acquire))
            .cloned()
    }

    /// The live connection, reconnecting once if the current one is dead.
    async fn live_conn(&self) -> Result<Arc<Conn>> {
        if let Some(c) = self.current() {
            return Ok(c);
        }
        let _serialise = self.reconnect.lock().await;
        if let Some(c) = self.current() {
            return Ok(c);
        }
        let conn = Conn::connect(&self.settings).await?;
        if let Some(old) = lock(&self.conn).replace(conn.clone()) {
            old.close();
        }
        Ok(conn)
    }
}

impl Client {
    /// Connects to the broker in `$ZRPC_SOCKET_DIR`, or `/tmp/zrpc_sockets`.
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
        decode_payload(&bytes)
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
        let conn = self.inner.live_conn().await?;
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = call_frame(
            id,
            service,
            method,
            &opts,
            payload,
            conn.welcome.max_message_size,
        )?;
        let deadline = local_deadline(&opts, Instant::now());
        let (tx, rx) = oneshot::channel();
        let in_flight = conn.register(
            id,
            Pending {
                tx,
                frame: frame.clone(),
                deadline,
            },
        )?;
        let mut guard = CancelGuard {
            conn: &conn,
            id,
            armed: true,
        };
        // A lone call is written at once by the caller (one task hop less);
        // concurrent calls are batched by the writer task (one syscall for
        // many frames).
        conn.send(frame, in_flight == 1);
        let received = match deadline {
            None => rx.await,
            Some(d) => match tokio::time::timeout_at(d.into(), rx).await {
                Ok(r) => r,
                // The guard removes the call and sends `Cancel`.
                Err(_) => return Err(timeout_error(service, method)),
            },
        };
        guard.armed = false;
        match received {
            Ok(outcome) => outcome.into_result(service, method),
            Err(_) => Err(conn.dead_error()),
        }
    }
}

/// Sends `Cancel` for a call whose future is dropped (or times out locally)
/// before its result arrived.
struct CancelGuard<'a> {
    conn: &'a Conn,
    id: u64,
    armed: bool,
}

impl Drop for CancelGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.conn.cancel(self.id);
        }
    }
}

/// A call waiting for its result. `frame` and `deadline` are kept so that a
/// future version can resubmit pending calls after a reconnect.
struct Pending {
    tx: oneshot::Sender<Outcome>,
    #[allow(dead_code)]
    frame: Bytes,
    #[allow(dead_code)]
    deadline: Option<Instant>,
}

#[derive(Default)]
struct ConnState {
    pending: FxHashMap<u64, Pending>,
    dead: Option<Dead>,
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

/// One connection to the broker and its two tasks.
struct Conn {
    welcome: Welcome,
    state: Mutex<ConnState>,
    dead: AtomicBool,
    wq: Mutex<WriteQueue>,
    wr: OwnedWriteHalf,
    writer_wake: Notify,
    reader_stop: Notify,
}

impl Conn {
    async fn connect(settings: &Settings) -> Result<Arc<Conn>> {
        let stream = UnixStream::connect(settings.socket_path())
            .await
            .map_err(|e| settings.connect_error(e))?;
        let (mut rd, mut wr) = stream.into_split();
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        let handshake = async {
            wr.write_all(&settings.hello())
                .await
                .map_err(|e| settings.connect_error(e))?;
            let dec = FrameDecoder::new(HANDSHAKE_MAX_BODY);
            loop {
                match dec.decode(&mut buf) {
                    Ok(Some(frame)) => return parse_handshake(&frame),
                    Ok(None) => {}
                    Err(e) => return Err(Error::Protocol(format!("bad handshake frame: {e}"))),
                }
                let n = rd
                    .read_buf(&mut buf)
                    .await
                    .map_err(|e| settings.connect_error(e))?;
                if n == 0 {
                    return Err(settings.connect_error(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the broker closed the connection during the handshake",
                    )));
                }
            }
        };
        let welcome = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(settings.connect_error(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer to Hello within {HANDSHAKE_TIMEOUT:?}"),
                )))
            }
        };
        let conn = Arc::new(Conn {
            welcome,
            state: Mutex::new(ConnState::default()),
            dead: AtomicBool::new(false),
            wq: Mutex::new(WriteQueue::default()),
            wr,
            writer_wake: Notify::new(),
            reader_stop: Notify::new(),
        });
        tokio::spawn(reader_task(conn.clone(), rd, buf));
        tokio::spawn(writer_task(conn.clone()));
        Ok(conn)
    }

    fn dead_error(&self) -> Error {
        match &lock(&self.state).dead {
            Some(d) => d.to_error(),
            None => Error::Disconnected("the connection closed".into()),
        }
    }

    /// Adds a pending call; returns how many calls are now pending.
    fn register(&self, id: u64, p: Pending) -> Result<usize> {
        let mut st = lock(&self.state);
        if let Some(d) = &st.dead {
            return Err(d.to_error());
        }
        st.pending.insert(id, p);
        Ok(st.pending.len())
    }

    /// Abandons call `id`: forgets it and tells the broker if it was still
    /// pending.
    fn cancel(&self, id: u64) {
        let was_pending = lock(&self.state).pending.remove(&id).is_some();
        if was_pending && !self.dead.load(Ordering::Acquire) {
            let mut f = BytesMut::with_capacity(16);
            control_frame(&mut f, &Envelope::Cancel { id });
            self.send(f.freeze(), false);
        }
    }

    /// Sends a frame. With `direct`, and if nothing else is being written,
    /// the caller writes it itself (saving a task hop); otherwise it is
    /// queued for the writer task, which writes everything queued with as few
    /// syscalls as it can.
    fn send(&self, frame: Bytes, direct: bool) {
        {
            let mut q = lock(&self.wq);
            if q.closed {
                return;
            }
            if !direct || q.writing || !q.is_empty() {
                let wake = q.push(&frame);
                drop(q);
                if wake {
                    self.writer_wake.notify_one();
                }
                return;
            }
            q.writing = true;
        }
        let written = match self.wr.try_write(&frame) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
            Err(e) => {
                lock(&self.wq).writing = false;
                self.fail_all(Dead::Disconnected(format!("write error: {e}")));
                self.reader_stop.notify_one();
                return;
            }
        };
        let wake = {
            let mut q = lock(&self.wq);
            q.writing = false;
            if written < frame.len() {
                // Goes before anything queued meanwhile.
                q.chunks.push_front(frame.slice(written..));
            }
            !q.is_empty() || q.closed
        };
        if wake {
            self.writer_wake.notify_one();
        }
    }

    /// Marks the connection dead, fails every pending call, and lets the
    /// writer end. Idempotent: the first reason wins.
    fn fail_all(&self, why: Dead) {
        {
            let mut st = lock(&self.state);
            let why = st.dead.get_or_insert(why).clone();
            self.dead.store(true, Ordering::Release);
            for (_, p) in st.pending.drain() {
                let _ = p.tx.send(Outcome::Dead(why.clone()));
            }
        }
        lock(&self.wq).closed = true;
        self.writer_wake.notify_one();
    }

    /// The client was dropped (or replaced): end both tasks.
    fn close(&self) {
        self.fail_all(Dead::Disconnected("the client was closed".into()));
        self.reader_stop.notify_one();
    }

    /// Handles every complete frame in `buf`. Returns why the connection
    /// must end, if it must.
    fn dispatch(&self, dec: &FrameDecoder, buf: &mut BytesMut) -> Option<Dead> {
        let mut st: Option<MutexGuard<'_, ConnState>> = None;
        let mut pongs = Vec::new();
        let mut end = None;
        loop {
            let frame = match dec.decode(buf) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    end = Some(Dead::Fatal(
                        ErrorCode::Protocol,
                        format!("bad frame from the broker: {e}"),
                    ));
                    break;
                }
            };
            match frame.decode() {
                Ok(Envelope::Result { id, code, message }) => {
                    let st = st.get_or_insert_with(|| lock(&self.state));
                    if let Some(p) = st.pending.remove(&id) {
                        let _ =
                            p.tx.send(Outcome::from_result(code, message, frame.payload.clone()));
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
        if !pongs.is_empty() {
            let mut f = BytesMut::with_capacity(16 * pongs.len());
            for nonce in pongs {
                control_frame(&mut f, &Envelope::Pong { nonce });
            }
            self.send(f.freeze(), false);
        }
        end
    }
}

/// Fails the connection if the reader task ends for any reason, including
/// being dropped by a runtime that shuts down.
struct FailOnDrop(Arc<Conn>);

impl Drop for FailOnDrop {
    fn drop(&mut self) {
        self.0.fail_all(Dead::Disconnected(
            "the connection's reader task stopped (was its runtime shut down?)".into(),
        ));
    }
}

async fn reader_task(conn: Arc<Conn>, mut rd: OwnedReadHalf, mut buf: BytesMut) {
    let guard = FailOnDrop(conn);
    let conn = &guard.0;
    let dec = FrameDecoder::new(conn.welcome.incoming_limit());
    let why = loop {
        if let Some(why) = conn.dispatch(&dec, &mut buf) {
            break why;
        }
        match dec.needed(&buf) {
            Some(total) => buf.reserve(total - buf.len()),
            None => {
                if buf.capacity() - buf.len() < READ_CHUNK / 4 {
                    buf.reserve(READ_CHUNK);
                }
            }
        }
        tokio::select! {
            biased;
            _ = conn.reader_stop.notified() => {
                break Dead::Disconnected("the client was closed".into());
            }
            r = rd.read_buf(&mut buf) => match r {
                Ok(0) => break Dead::Disconnected("the broker closed the connection".into()),
                Ok(_) => {}
                Err(e) => break Dead::Disconnected(format!("read error: {e}")),
            }
        }
    };
    conn.fail_all(why);
}

enum WriterStep {
    Wait,
    Write,
    Exit,
}

/// Writes all of `buf` through the shared write half.
async fn write_all(wr: &OwnedWriteHalf, mut buf: &[u8]) -> std::io::Result<()> {
    while !buf.is_empty() {
        match wr.try_write(buf) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => wr.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

async fn writer_task(conn: Arc<Conn>) {
    let mut chunks = VecDeque::new();
    let mut spare = BytesMut::with_capacity(READ_CHUNK);
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
                let mut result = Ok(());
                for c in chunks.drain(..) {
                    result = write_all(&conn.wr, &c).await;
                    if result.is_err() {
                        break;
                    }
                }
                if result.is_ok() && !spare.is_empty() {
                    result = write_all(&conn.wr, &spare).await;
                }
                spare.clear();
                lock(&conn.wq).writing = false;
                if let Err(e) = result {
                    conn.fail_all(Dead::Disconnected(format!("write error: {e}")));
                    conn.reader_stop.notify_one();
                    break;
                }
            }
        }
    }
}
