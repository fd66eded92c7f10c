//! The blocking client: no background thread; callers take turns as the
//! reader of the shared connection.

use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::Thread;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rustc_hash::FxHashMap;
use serde::de::DeserializeOwned;
use serde::Serialize;
use zrpc_proto::{Envelope, ErrorCode, FrameDecoder};

use crate::client::lock;
use crate::common::{
    call_frame, control_frame, decode_payload, local_deadline, parse_handshake, timeout_error,
    Dead, Outcome, Payload, Settings, Welcome, HANDSHAKE_MAX_BODY, HANDSHAKE_TIMEOUT, READ_CHUNK,
};
use crate::{CallOptions, ClientBuilder, Error, Result};

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
/// Pings from the broker are answered while some thread is inside a call;
/// an idle client does not read the socket (the broker's liveness checks,
/// if any, must tolerate that).
#[derive(Clone)]
pub struct BlockingClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for BlockingClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockingClient")
            .field("socket_dir", &self.inner.settings.socket_dir)
            .field("instance", &self.inner.settings.instance)
            .finish_non_exhaustive()
    }
}

struct Inner {
    settings: Settings,
    next_id: AtomicU64,
    conn: Mutex<Option<Arc<Conn>>>,
    reconnect: Mutex<()>,
}

impl Inner {
    fn current(&self) -> Option<Arc<Conn>> {
        lock(&self.conn)
            .as_ref()
            .filter(|c| !c.dead.load(Ordering::Acquire))
            .cloned()
    }

    fn live_conn(&self) -> Result<Arc<Conn>> {
        if let Some(c) = self.current() {
            return Ok(c);
        }
        let _serialise = lock(&self.reconnect);
        if let Some(c) = self.current() {
            return Ok(c);
        }
        let conn = Conn::connect(&self.settings)?;
        *lock(&self.conn) = Some(conn.clone());
        Ok(conn)
    }
}

impl BlockingClient {
    /// Connects to the broker in `$ZRPC_SOCKET_DIR`, or `/tmp/zrpc_sockets`.
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
        let conn = Conn::connect(&settings)?;
        Ok(BlockingClient {
            inner: Arc::new(Inner {
                settings,
                next_id: AtomicU64::new(1),
                conn: Mutex::new(Some(conn)),
                reconnect: Mutex::new(()),
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
        decode_payload(&bytes)
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
        let conn = self.inner.live_conn()?;
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
        conn.register(id, frame.clone(), deadline)?;
        conn.write(&frame);
        match conn.wait(id, deadline) {
            Some(outcome) => outcome.into_result(service, method),
            None => Err(timeout_error(service, method)),
        }
    }
}

enum SlotState {
    /// The caller thread waiting for the result.
    Waiting(Thread),
    /// The result, to be taken by the caller.
    Done(Outcome),
}

/// A call in flight. `frame` and `deadline` are kept so that a future
/// version can resubmit pending calls after a reconnect.
struct Slot {
    state: SlotState,
    #[allow(dead_code)]
    frame: Bytes,
    #[allow(dead_code)]
    deadline: Option<Instant>,
}

struct State {
    /// Some thread holds the reader role (and the read buffer).
    reading: bool,
    /// The read buffer; partial frames stay here between readers.
    buf: BytesMut,
    slots: FxHashMap<u64, Slot>,
    dead: Option<Dead>,
}

/// `SO_RCVTIMEO` currently set, in nanoseconds; `u64::MAX` means none.
const NO_TIMEOUT: u64 = u64::MAX;

/// Tolerated lateness of the local safety deadline, to avoid a `setsockopt`
/// per call.
const TIMEOUT_SLACK: Duration = Duration::from_millis(50);

struct Conn {
    welcome: Welcome,
    dec: FrameDecoder,
    writer: Mutex<UnixStream>,
    reader: UnixStream,
    rcv_timeout: AtomicU64,
    state: Mutex<State>,
    dead: AtomicBool,
}

impl Conn {
    fn connect(settings: &Settings) -> Result<Arc<Conn>> {
        let err = |e| settings.connect_error(e);
        let stream = UnixStream::connect(settings.socket_path()).map_err(err)?;
        stream
            .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
            .map_err(err)?;
        (&stream).write_all(&settings.hello()).map_err(err)?;
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        let dec = FrameDecoder::new(HANDSHAKE_MAX_BODY);
        let welcome = loop {
            match dec.decode(&mut buf) {
                Ok(Some(frame)) => break parse_handshake(&frame)?,
                Ok(None) => {}
                Err(e) => return Err(Error::Protocol(format!("bad handshake frame: {e}"))),
            }
            match read_into(&stream, &mut buf) {
                Ok(0) => {
                    return Err(err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the broker closed the connection during the handshake",
                    )))
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => {
                    return Err(err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no answer to Hello within {HANDSHAKE_TIMEOUT:?}"),
                    )))
                }
                Err(e) => return Err(err(e)),
            }
        };
        stream.set_read_timeout(None).map_err(err)?;
        let writer = stream.try_clone().map_err(err)?;
        Ok(Arc::new(Conn {
            welcome,
            dec: FrameDecoder::new(welcome.incoming_limit()),
            writer: Mutex::new(writer),
            reader: stream,
            rcv_timeout: AtomicU64::new(NO_TIMEOUT),
            state: Mutex::new(State {
                reading: false,
                buf,
                slots: FxHashMap::default(),
                dead: None,
            }),
            dead: AtomicBool::new(false),
        }))
    }

    fn register(&self, id: u64, frame: Bytes, deadline: Option<Instant>) -> Result<()> {
        let mut st = lock(&self.state);
        if let Some(d) = &st.dead {
            return Err(d.to_error());
        }
        st.slots.insert(
            id,
            Slot {
                state: SlotState::Waiting(std::thread::current()),
                frame,
                deadline,
            },
        );
        Ok(())
    }

    /// Writes a frame; a failure kills the connection (and so fails every
    /// pending call, including the caller's).
    fn write(&self, frame: &[u8]) {
        let r = {
            let w = lock(&self.writer);
            (&*w).write_all(frame)
        };
        if let Err(e) = r {
            self.fail_all(Dead::Disconnected(format!("write error: {e}")));
        }
    }

    /// Marks the connection dead and fails every pending call. Idempotent:
    /// the first reason wins.
    fn fail_all(&self, why: Dead) {
        let mut st = lock(&self.state);
        let why = st.dead.get_or_insert(why).clone();
        self.dead.store(true, Ordering::Release);
        for slot in st.slots.values_mut() {
            if let SlotState::Waiting(t) =
                std::mem::replace(&mut slot.state, SlotState::Done(Outcome::Dead(why.clone())))
            {
                t.unpark();
            }
        }
        drop(st);
        let _ = self.reader.shutdown(std::net::Shutdown::Both);
    }

    /// Waits for the outcome of call `id`, reading the connection when no
    /// other thread does. `None` means the local deadline passed.
    fn wait(&self, id: u64, deadline: Option<Instant>) -> Option<Outcome> {
        let mut st = lock(&self.state);
        let result = loop {
            match st.slots.get(&id).map(|s| &s.state) {
                Some(SlotState::Done(_)) => match st.slots.remove(&id) {
                    Some(Slot {
                        state: SlotState::Done(o),
                        ..
                    }) => break Some(o),
                    _ => unreachable!("slot checked above"),
                },
                Some(SlotState::Waiting(_)) => {}
                None => {
                    // Only `wait` removes slots; be defensive anyway.
                    let why = st
                        .dead
                        .clone()
                        .unwrap_or_else(|| Dead::Disconnected("the call was lost".into()));
                    break Some(Outcome::Dead(why));
                }
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                st.slots.remove(&id);
                drop(st);
                self.send_cancel(id);
                st = lock(&self.state);
                break None;
            }
            if !st.reading {
                st.reading = true;
                let mut buf = std::mem::take(&mut st.buf);
                drop(st);
                self.read_until(id, deadline, &mut buf);
                st = lock(&self.state);
                st.buf = buf;
                st.reading = false;
                continue;
            }
            drop(st);
            match deadline {
                None => std::thread::park(),
                Some(d) => std::thread::park_timeout(d.saturating_duration_since(now)),
            }
            st = lock(&self.state);
        };
        // Hand the reader role on to a thread still waiting.
        if !st.reading {
            if let Some(t) = st.slots.values().find_map(|s| match &s.state {
                SlotState::Waiting(t) => Some(t),
                SlotState::Done(_) => None,
            }) {
                t.unpark();
            }
        }
        result
    }

    fn send_cancel(&self, id: u64) {
        if self.dead.load(Ordering::Acquire) {
            return;
        }
        let mut f = BytesMut::with_capacity(16);
        control_frame(&mut f, &Envelope::Cancel { id });
        self.write(&f);
    }

    /// The reader role: reads and dispatches frames until call `id` has its
    /// outcome, the connection dies, or `deadline` passes.
    fn read_until(&self, id: u64, deadline: Option<Instant>, buf: &mut BytesMut) {
        loop {
            let (mine, end) = self.dispatch(id, buf);
            if let Some(why) = end {
                self.fail_all(why);
                return;
            }
            if mine {
                return;
            }
            if let Err(e) = self.set_timeout(deadline) {
                self.fail_all(Dead::Disconnected(format!(
                    "cannot set a read timeout: {e}"
                )));
                return;
            }
            match self.dec.needed(buf) {
                Some(total) => buf.reserve(total - buf.len()),
                None => {
                    if buf.capacity() - buf.len() < READ_CHUNK / 4 {
                        buf.reserve(READ_CHUNK);
                    }
                }
            }
            match read_into(&self.reader, buf) {
                Ok(0) => {
                    self.fail_all(Dead::Disconnected(
                        "the broker closed the connection".into(),
                    ));
                    return;
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => {
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return;
                    }
                }
                Err(e) => {
                    self.fail_all(Dead::Disconnected(format!("read error: {e}")));
                    return;
                }
            }
        }
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

    /// Handles every complete frame in `buf`. Returns whether call `my_id`
    /// got its outcome, and why the connection must end, if it must.
    fn dispatch(&self, my_id: u64, buf: &mut BytesMut) -> (bool, Option<Dead>) {
        let mut st: Option<MutexGuard<'_, State>> = None;
        let mut pongs = Vec::new();
        let mut mine = false;
        let mut end = None;
        loop {
            let frame = match self.dec.decode(buf) {
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
                    if let Some(slot) = st.slots.get_mut(&id) {
                        let outcome = Outcome::from_result(code, message, frame.payload.clone());
                        if let SlotState::Waiting(t) =
                            std::mem::replace(&mut slot.state, SlotState::Done(outcome))
                        {
                            if id == my_id {
                                mine = true;
                            } else {
                                t.unpark();
                            }
                        }
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
        if !pongs.is_empty() && end.is_none() {
            let mut f = BytesMut::with_capacity(16 * pongs.len());
            for nonce in pongs {
                control_frame(&mut f, &Envelope::Pong { nonce });
            }
            self.write(&f);
        }
        (mine, end)
    }
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// One `read(2)` into the spare capacity of `buf` (no zero-filling).
fn read_into(stream: &UnixStream, buf: &mut BytesMut) -> std::io::Result<usize> {
    if buf.capacity() == buf.len() {
        buf.reserve(READ_CHUNK);
    }
    let spare = buf.spare_capacity_mut();
    // SAFETY: `spare` is valid writable memory of `spare.len()` bytes owned
    // by `buf`; read(2) writes at most that many bytes into it.
    let n = unsafe {
        libc::read(
            stream.as_raw_fd(),
            spare.as_mut_ptr().cast::<libc::c_void>(),
            spare.len(),
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let n = n as usize;
    // SAFETY: read(2) initialised the first `n` bytes of the spare capacity.
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}
