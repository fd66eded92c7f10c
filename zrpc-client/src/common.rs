//! Pieces shared by the async and the blocking client: frame building,
//! handshake parsing, outcome mapping.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use serde::de::DeserializeOwned;
use serde::Serialize;
use zrpc_io::spill::{Encoded, PayloadWriter};
use zrpc_proto::{encode_frame, encode_header, Envelope, ErrorCode, InlineBytes, HEADER_LEN};

use crate::{CallOptions, Error, Result};

/// How long past the call's own timeout the client waits for the broker's
/// answer before giving up locally.
pub(crate) const SAFETY_MARGIN: Duration = Duration::from_secs(2);

/// Frames at least this large are queued as their own chunk instead of being
/// copied into the shared write buffer.
pub(crate) const LARGE_FRAME: usize = 64 * 1024;

pub(crate) use zrpc_io::{Backoff, Retry, Welcome};

/// Settings of a client, shared by its reconnects.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub socket_dir: PathBuf,
    pub agent: String,
    pub instance: u64,
    pub backoff: Backoff,
    /// How long connecting and the handshake may take
    /// ([`crate::ClientBuilder::connect_timeout`]).
    pub handshake_timeout: std::time::Duration,
}

impl Settings {
    pub(crate) fn new(
        socket_dir: Option<&Path>,
        agent: Option<String>,
        backoff: Backoff,
    ) -> Settings {
        Settings {
            socket_dir: zrpc_proto::resolve_socket_dir(socket_dir),
            agent: agent.unwrap_or_else(default_agent),
            instance: new_instance_id(),
            backoff,
            handshake_timeout: crate::DEFAULT_CONNECT_TIMEOUT,
        }
    }

    pub(crate) fn socket_path(&self) -> PathBuf {
        zrpc_proto::socket_path(&self.socket_dir)
    }

    /// [`Error::Connect`] for this client's socket: setting up a
    /// connection failed after the handshake.
    pub(crate) fn connect_error(&self, source: std::io::Error) -> Error {
        Error::Connect {
            path: self.socket_path(),
            source,
        }
    }

    /// The `Hello` frame of this client (either kind), offering payloads
    /// in descriptors (see [`crate::fds`]).
    pub(crate) fn hello(&self) -> BytesMut {
        zrpc_io::handshake::hello_frame_caps(
            self.instance,
            &self.agent,
            zrpc_proto::caps::FD_PAYLOADS,
        )
    }
}

/// A new connection generation, to tell a call's connection from the
/// current one (unique in the process).
pub(crate) fn next_generation() -> u64 {
    static GENERATION: AtomicU64 = AtomicU64::new(1);
    GENERATION.fetch_add(1, Ordering::Relaxed)
}

/// `zrpc-client/<version>`.
pub(crate) fn default_agent() -> String {
    concat!("zrpc-client/", env!("CARGO_PKG_VERSION")).to_owned()
}

/// A random instance id for `Hello`.
pub(crate) fn new_instance_id() -> u64 {
    zrpc_io::random_id()
}

/// Why a connection is dead.
#[derive(Debug, Clone)]
pub(crate) enum Dead {
    /// Closed, reset or unusable.
    Disconnected(String),
    /// The broker sent `Fatal`.
    Fatal(ErrorCode, String),
}

impl Dead {
    /// The error of a call that was on the lost connection and may not be
    /// resubmitted (`no_retry`): it may or may not have run.
    pub(crate) fn to_error(&self) -> Error {
        match self {
            Dead::Disconnected(m) => Error::Disconnected(m.clone()),
            Dead::Fatal(code, m) => Error::Disconnected(format!(
                "the broker closed the connection with {}: {m}",
                code.as_str()
            )),
        }
    }
}

impl Dead {
    /// A frame from the broker that could not be decoded.
    pub(crate) fn bad_frame(e: zrpc_proto::ProtoError) -> Dead {
        Dead::Fatal(
            ErrorCode::Protocol,
            format!("bad frame from the broker: {e}"),
        )
    }

    /// The error of a connection that ended while nothing could be
    /// resubmitted on it (a monitor's subscription): a `Fatal` keeps its
    /// code (`Shutdown` is [`Error::Shutdown`], a slow monitor's
    /// `LimitExceeded` is [`Error::LimitExceeded`]).
    pub(crate) fn to_lost_error(&self) -> Error {
        match self {
            Dead::Disconnected(m) => Error::Disconnected(m.clone()),
            Dead::Fatal(code, m) => Error::from_fatal(*code, m.clone()),
        }
    }
}

/// The outcome of one call as delivered by the reader.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Success: the result payload.
    Ok(Bytes),
    /// `Result` with an error code: the code, the message and the payload
    /// (a `Remote` error's value; usually empty).
    Failed(ErrorCode, String, Bytes),
    /// The connection died.
    Dead(Dead),
}

impl Outcome {
    pub(crate) fn into_result(self, service: &str, method: &str) -> Result<Bytes> {
        match self {
            Outcome::Ok(b) => Ok(b),
            Outcome::Failed(code, message, value) => {
                Err(Error::from_call(code, message, value, service, method))
            }
            Outcome::Dead(d) => Err(d.to_error()),
        }
    }
}

/// The outcome of a call whose deadline passed while the client was
/// reconnecting (the broker never had it, or lost it).
pub(crate) fn reconnect_timeout() -> Outcome {
    Outcome::Failed(
        ErrorCode::Timeout,
        "the deadline passed while reconnecting to zrpcd".into(),
        Bytes::new(),
    )
}

/// A local `Timeout` error.
pub(crate) fn timeout_error(service: &str, method: &str) -> Error {
    Error::Timeout {
        service: service.to_owned(),
        method: method.to_owned(),
        no_service: false,
    }
}

/// The local safety deadline of a call started `now`.
pub(crate) fn local_deadline(opts: &CallOptions, now: Instant) -> Option<Instant> {
    opts.timeout
        .and_then(|t| t.checked_add(SAFETY_MARGIN))
        .and_then(|t| now.checked_add(t))
}

/// The deadline of a call started `now` (without the safety margin).
pub(crate) fn call_deadline(opts: &CallOptions, now: Instant) -> Option<Instant> {
    opts.timeout.and_then(|t| now.checked_add(t))
}

/// The call's deadline and its local safety deadline for a call starting
/// now; the clock is read only if the call has a timeout.
pub(crate) fn call_deadlines(opts: &CallOptions) -> (Option<Instant>, Option<Instant>) {
    if opts.timeout.is_none() {
        return (None, None);
    }
    let now = Instant::now();
    (call_deadline(opts, now), local_deadline(opts, now))
}

/// Milliseconds of `d`, rounded up (so that a sub-millisecond budget does
/// not become "expire at once").
pub(crate) fn duration_ms(d: Duration) -> u64 {
    let ms = d.as_millis() + u128::from(d.subsec_nanos() % 1_000_000 != 0);
    u64::try_from(ms).unwrap_or(u64::MAX)
}

/// The `Call` frame `frame` again, for a new connection: the envelope is
/// re-encoded with `timeout_ms` set to the remaining budget (`None`: no
/// deadline), the payload bytes are reused as they are (by reference).
pub(crate) fn resubmit_parts(
    frame: &OutFrame,
    remaining: Option<Duration>,
    max_message_size: u32,
) -> Result<OutFrame> {
    let bad = || Error::Protocol("corrupt stored call frame".into());
    let head = frame.head();
    if head.len() < HEADER_LEN {
        return Err(bad());
    }
    let env_len = u32::from_be_bytes([head[4], head[5], head[6], head[7]]) as usize;
    let env_end = HEADER_LEN.checked_add(env_len).ok_or_else(bad)?;
    if env_end > head.len() {
        return Err(bad());
    }
    // The payload is either inline after the envelope or the tail.
    let payload = match (env_end == head.len(), frame.tail.is_empty()) {
        (_, true) => frame.head_from(env_end),
        (true, false) => frame.tail.clone(),
        (false, false) => return Err(bad()),
    };
    let new_head = match Envelope::decode(&head[HEADER_LEN..env_end]) {
        Ok(Envelope::Call {
            id,
            service,
            method,
            flags,
            ..
        }) => {
            let env = Envelope::Call {
                id,
                service,
                method,
                timeout_ms: remaining.map(duration_ms),
                flags,
            };
            let mut out = BytesMut::with_capacity(HEADER_LEN + 40 + service.len() + method.len());
            encode_header(&mut out, &env, payload.len());
            out
        }
        _ => return Err(bad()),
    };
    check_size(
        new_head.len() - HEADER_LEN + payload.len(),
        max_message_size,
    )?;
    Ok(OutFrame {
        head: Head::Shared(new_head.freeze()),
        tail: payload,
    })
}

/// An encoded frame to write: `head` then `tail`, back to back. A large
/// raw payload is the `tail`, kept by reference instead of being copied
/// behind its header; otherwise `tail` is empty.
#[derive(Debug, Clone, Default)]
pub(crate) struct OutFrame {
    /// Header, envelope and (unless `tail` holds it) the payload.
    head: Head,
    /// A payload written after `head` without copying, or empty.
    pub(crate) tail: Bytes,
}

/// The head of an [`OutFrame`]: a small one (most calls) inline, so that a
/// call's frame, kept for resubmission until the call is answered, costs no
/// allocation; a larger one in `Bytes`.
#[derive(Clone)]
enum Head {
    Inline(InlineBytes<INLINE_FRAME>),
    Shared(Bytes),
}

impl Default for Head {
    fn default() -> Self {
        Head::Shared(Bytes::new())
    }
}

impl std::fmt::Debug for Head {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Head::Inline(b) => write!(f, "Inline({} bytes)", b.len()),
            Head::Shared(b) => write!(f, "Shared({} bytes)", b.len()),
        }
    }
}

impl OutFrame {
    /// Total length on the wire.
    pub(crate) fn len(&self) -> usize {
        self.head().len() + self.tail.len()
    }

    /// The head bytes.
    pub(crate) fn head(&self) -> &[u8] {
        match &self.head {
            Head::Inline(b) => b,
            Head::Shared(b) => b,
        }
    }

    /// The head from byte `at` on, as `Bytes` (a view of a shared head, a
    /// copy of an inline one).
    pub(crate) fn head_from(&self, at: usize) -> Bytes {
        match &self.head {
            Head::Inline(b) => Bytes::copy_from_slice(&b[at..]),
            Head::Shared(b) => b.slice(at..),
        }
    }

    /// Length of its payload, if the frame is well formed.
    pub(crate) fn payload_len(&self) -> Option<usize> {
        let head = self.head();
        let body = u32::from_be_bytes(head.get(..4)?.try_into().ok()?) as usize;
        let env = u32::from_be_bytes(head.get(4..8)?.try_into().ok()?) as usize;
        body.checked_sub(env)
    }

    /// The frame as one contiguous buffer (copies if it has a tail).
    #[cfg(test)]
    pub(crate) fn to_vec(&self) -> Vec<u8> {
        [self.head(), &self.tail[..]].concat()
    }

    /// Whether the head is stored inline.
    #[cfg(test)]
    pub(crate) fn is_inline(&self) -> bool {
        matches!(self.head, Head::Inline(_))
    }
}

impl From<Bytes> for OutFrame {
    fn from(head: Bytes) -> Self {
        OutFrame {
            head: Head::Shared(head),
            tail: Bytes::new(),
        }
    }
}

/// The buffer `call_frame` encodes serde payloads into, one per thread.
///
/// A small frame is copied out of it into an allocation of its own (the
/// call keeps its frame until answered, for resubmission, and must not pin
/// the buffer); a large one is split off it (no copy: the allocation is
/// mostly that frame anyway), and the next frame starts over in the same
/// allocation once the large one is gone (`try_reclaim`), instead of a `Vec`
/// grown by doubling and page-faulted for every large payload. A buffer
/// grown beyond [`SCRATCH_KEEP`] is not kept after a large frame.
struct Scratch {
    buf: BytesMut,
    /// Capacity of the allocation as last seen whole.
    full: usize,
}

/// Frames at least this large are split off the encode buffer, not copied.
const SCRATCH_SPLIT: usize = 64 * 1024;

/// Largest encode buffer kept for the next frame.
const SCRATCH_KEEP: usize = 4 * 1024 * 1024;

thread_local! {
    /// Where small raw-payload frames are encoded before `own_frame`.
    static SMALL: std::cell::RefCell<BytesMut> = std::cell::RefCell::new(BytesMut::new());
    static SCRATCH: std::cell::RefCell<Scratch> =
        std::cell::RefCell::new(Scratch { buf: BytesMut::new(), full: 0 });
}

/// Runs `f` on the thread's encode buffer (empty) and returns what it
/// appended as its own `Bytes`, followed by the tail `f` returns (a
/// payload encoded into a memfd). On error nothing is kept.
fn with_scratch(f: impl FnOnce(&mut BytesMut) -> Result<Bytes>) -> Result<OutFrame> {
    SCRATCH.with(|s| {
        let Ok(mut s) = s.try_borrow_mut() else {
            // Re-entered (a `Serialize` impl making a call): a buffer of
            // its own.
            let mut buf = BytesMut::new();
            return f(&mut buf).map(|tail| OutFrame {
                head: Head::Shared(buf.freeze()),
                tail,
            });
        };
        let s = &mut *s;
        s.buf.clear();
        // Back to the start of the allocation if the large frame last split
        // off it is gone (cheap: nothing to copy); else a fresh buffer.
        if !s.buf.try_reclaim(s.full) {
            s.buf = BytesMut::new();
            s.full = 0;
        }
        let r = f(&mut s.buf);
        s.full = s.full.max(s.buf.capacity());
        let out = match r {
            Ok(tail) if s.buf.len() >= SCRATCH_SPLIT => {
                let frame = s.buf.split().freeze();
                if s.full > SCRATCH_KEEP {
                    s.buf = BytesMut::new();
                    s.full = 0;
                }
                Ok(OutFrame {
                    head: Head::Shared(frame),
                    tail,
                })
            }
            Ok(tail) => {
                let mut frame = own_frame(&s.buf);
                frame.tail = tail;
                Ok(frame)
            }
            Err(e) => Err(e),
        };
        s.buf.clear();
        out
    })
}

/// A payload that could not be put into a memfd.
fn spill_error(e: std::io::Error) -> Error {
    Error::Encode(rmp_serde::encode::Error::Syntax(format!(
        "cannot write the payload into a memfd: {e}"
    )))
}

/// Start and capacity of this thread's encode buffer.
#[cfg(test)]
pub(crate) fn scratch_range() -> (usize, usize) {
    SCRATCH.with(|s| {
        let s = s.borrow();
        (s.buf.as_ptr() as usize, s.buf.capacity())
    })
}

/// Frames up to this many bytes are stored inline in their [`OutFrame`]
/// (a call with a payload of about 64 bytes and ordinary names fits).
const INLINE_FRAME: usize = 111;

/// A copy of frame `b` that pins no shared buffer: inline if small (no
/// allocation: every call's frame is kept until the call is answered, for
/// resubmission, and one copy is written), else an allocation of its own.
pub(crate) fn own_frame(b: &[u8]) -> OutFrame {
    let head =
        InlineBytes::new(b).map_or_else(|| Head::Shared(Bytes::copy_from_slice(b)), Head::Inline);
    OutFrame {
        head,
        tail: Bytes::new(),
    }
}

/// The payload of a call, before framing.
pub(crate) enum Payload<'a, P: ?Sized> {
    /// Serialise this value with `rmp_serde` (structs as maps).
    Serde(&'a P),
    /// Already-encoded MessagePack bytes (empty means nil).
    Raw(&'a Bytes),
}

/// Builds a complete `Call` frame. A serde payload is encoded straight
/// into it; a large raw payload becomes the frame's tail, not copied.
pub(crate) fn call_frame<P: Serialize + ?Sized>(
    id: u64,
    service: &str,
    method: &str,
    opts: &CallOptions,
    payload: Payload<'_, P>,
    max_message_size: u32,
    fd_payloads: bool,
) -> Result<OutFrame> {
    let env = Envelope::Call {
        id,
        service,
        method,
        timeout_ms: opts.timeout_ms(),
        flags: opts.flags(),
    };
    match payload {
        Payload::Raw(raw) => {
            let bytes: &[u8] = if raw.is_empty() {
                zrpc_proto::NIL_PAYLOAD
            } else {
                raw
            };
            check_size(
                32 + service.len() + method.len() + bytes.len(),
                max_message_size,
            )?;
            if bytes.len() <= INLINE_FRAME {
                // Small: through a small per-thread buffer into an inline
                // head (not through `with_scratch`: that would give
                // up the large encode buffer while a large frame split off
                // it is still alive).
                // No user code runs while it is borrowed (no re-entry).
                return SMALL.with_borrow_mut(|out| {
                    out.clear();
                    encode_frame(out, &env, bytes);
                    check_size(out.len() - HEADER_LEN, max_message_size).map(|()| own_frame(out))
                });
            }
            let large = raw.len() >= LARGE_FRAME;
            let inline = if large { 0 } else { bytes.len() };
            let mut out =
                BytesMut::with_capacity(HEADER_LEN + 40 + service.len() + method.len() + inline);
            let tail = if large {
                encode_header(&mut out, &env, raw.len());
                raw.clone()
            } else {
                encode_frame(&mut out, &env, bytes);
                Bytes::new()
            };
            check_size(out.len() - HEADER_LEN + tail.len(), max_message_size)?;
            Ok(OutFrame {
                head: Head::Shared(out.freeze()),
                tail,
            })
        }
        Payload::Serde(v) => with_scratch(|out| {
            encode_header(out, &env, 0);
            // A payload reaching FD_PAYLOAD_MIN on a connection that passes
            // descriptors is encoded straight into a memfd (one copy); one
            // that is a received memfd's content is not copied at all.
            let spill = fd_payloads.then_some(zrpc_io::fdpass::FD_PAYLOAD_MIN);
            let mut w = PayloadWriter::new(out, spill);
            rmp_serde::encode::write_named(&mut w, v)?;
            let tail = match w.finish().map_err(spill_error)? {
                Encoded::Inline => Bytes::new(),
                Encoded::Mapped(m) => m,
            };
            patch_body_len(out, tail.len());
            check_size(out.len() - HEADER_LEN + tail.len(), max_message_size)?;
            Ok(tail)
        }),
    }
}

/// Fixes `body_len` of a frame whose payload was appended after
/// `encode_header(.., 0)`, or follows it as a `tail` of that many bytes.
fn patch_body_len(frame: &mut BytesMut, tail: usize) {
    let body = (frame.len() - HEADER_LEN + tail) as u64;
    // Oversized bodies are rejected by `check_size` right after; clamp so the
    // header is never silently truncated.
    let body = u32::try_from(body).unwrap_or(u32::MAX);
    frame[0..4].copy_from_slice(&body.to_be_bytes());
}

fn check_size(body_len: usize, max: u32) -> Result<()> {
    if body_len as u64 > max as u64 {
        return Err(Error::LimitExceeded(format!(
            "the call's message is {body_len} bytes, more than the broker's maximum message size of {max} bytes"
        )));
    }
    Ok(())
}

/// A small control frame (`Cancel`, `Pong`).
pub(crate) fn control_frame(out: &mut BytesMut, env: &Envelope<'_>) {
    encode_frame(out, env, &[]);
}

/// Decodes a call's result: [`Blob`](zrpc_proto::Blob)s in it are views
/// into `payload` (no copy).
pub(crate) fn decode_result<R: DeserializeOwned>(payload: &Bytes) -> Result<R> {
    zrpc_proto::blob::decode_from(payload, |p| decode_payload(p))
}

/// Decodes a result payload: exactly one value; an empty payload means nil.
pub(crate) fn decode_payload<R: DeserializeOwned>(payload: &[u8]) -> Result<R> {
    Ok(zrpc_proto::decode_payload(payload)?)
}

/// Locks a mutex, ignoring poisoning (the protected state stays consistent:
/// every critical section is a few infallible map/buffer operations).
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
