//! Pieces shared by the async and the blocking client: frame building,
//! handshake parsing, outcome mapping.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use serde::de::DeserializeOwned;
use serde::Serialize;
use zrpc_proto::{encode_frame, encode_header, Envelope, ErrorCode, Frame, HEADER_LEN};

use crate::{CallOptions, Error, Result};

/// How long past the call's own timeout the client waits for the broker's
/// answer before giving up locally.
pub(crate) const SAFETY_MARGIN: Duration = Duration::from_secs(2);

/// How long `connect` waits for the broker's `Welcome`.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest frame accepted during the handshake.
pub(crate) const HANDSHAKE_MAX_BODY: u32 = 64 * 1024;

/// Slack added to the broker's announced limit for incoming frames: a
/// `Result` envelope may be a few bytes longer than the `Reply` it forwards.
pub(crate) const INCOMING_SLACK: u32 = 4096;

/// Frames at least this large are queued as their own chunk instead of being
/// copied into the shared write buffer.
pub(crate) const LARGE_FRAME: usize = 64 * 1024;

/// Minimum free space kept in the read buffer before each read.
pub(crate) const READ_CHUNK: usize = 64 * 1024;

/// Settings of a client, shared by its reconnects.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub socket_dir: PathBuf,
    pub agent: String,
    pub instance: u64,
}

impl Settings {
    pub(crate) fn new(socket_dir: Option<&Path>, agent: Option<String>) -> Settings {
        Settings {
            socket_dir: zrpc_proto::resolve_socket_dir(socket_dir),
            agent: agent.unwrap_or_else(default_agent),
            instance: new_instance_id(),
        }
    }

    pub(crate) fn socket_path(&self) -> PathBuf {
        zrpc_proto::socket_path(&self.socket_dir)
    }

    pub(crate) fn connect_error(&self, source: std::io::Error) -> Error {
        Error::Connect {
            path: self.socket_path(),
            source,
        }
    }

    /// The `Hello` frame of this client.
    pub(crate) fn hello(&self) -> BytesMut {
        let mut out = BytesMut::with_capacity(64 + self.agent.len());
        encode_frame(
            &mut out,
            &Envelope::Hello {
                version: zrpc_proto::PROTOCOL_VERSION,
                instance: self.instance,
                agent: &self.agent,
            },
            &[],
        );
        out
    }
}

/// `zrpc-client/<version>`.
pub(crate) fn default_agent() -> String {
    concat!("zrpc-client/", env!("CARGO_PKG_VERSION")).to_owned()
}

/// A random instance id: std's `RandomState` is seeded from the OS's random
/// source; the time, pid and a counter make ids differ even within one
/// process.
pub(crate) fn new_instance_id() -> u64 {
    use std::hash::{BuildHasher, Hash, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
        .hash(&mut h);
    std::process::id().hash(&mut h);
    COUNTER.fetch_add(1, Ordering::Relaxed).hash(&mut h);
    match h.finish() {
        0 => 1,
        v => v,
    }
}

/// What the broker told us in `Welcome`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Welcome {
    #[allow(dead_code)]
    pub conn_id: u64,
    pub max_message_size: u32,
}

impl Welcome {
    /// Decoder limit for frames coming from the broker.
    pub(crate) fn incoming_limit(&self) -> u32 {
        self.max_message_size.saturating_add(INCOMING_SLACK)
    }
}

/// Interprets the first frame the broker sends.
pub(crate) fn parse_handshake(frame: &Frame) -> Result<Welcome> {
    match frame.decode() {
        Ok(Envelope::Welcome {
            version,
            conn_id,
            max_message_size,
        }) => {
            if version != zrpc_proto::PROTOCOL_VERSION {
                return Err(Error::VersionMismatch(format!(
                    "the broker speaks protocol version {version}, this client version {}",
                    zrpc_proto::PROTOCOL_VERSION
                )));
            }
            Ok(Welcome {
                conn_id,
                max_message_size,
            })
        }
        Ok(Envelope::Fatal { code, message }) => Err(Error::from_fatal(code, message.to_owned())),
        Ok(other) => Err(Error::Protocol(format!(
            "expected Welcome from the broker, got {:?}",
            other.kind()
        ))),
        Err(e) => Err(Error::Protocol(format!("bad handshake frame: {e}"))),
    }
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
    pub(crate) fn to_error(&self) -> Error {
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
    /// `Result` with an error code.
    Failed(ErrorCode, String),
    /// The connection died.
    Dead(Dead),
}

impl Outcome {
    /// The outcome of a `Result` frame.
    pub(crate) fn from_result(code: Option<ErrorCode>, message: &str, payload: Bytes) -> Outcome {
        match code {
            None => Outcome::Ok(payload),
            Some(code) => Outcome::Failed(code, message.to_owned()),
        }
    }

    pub(crate) fn into_result(self, service: &str, method: &str) -> Result<Bytes> {
        match self {
            Outcome::Ok(b) => Ok(b),
            Outcome::Failed(code, message) => Err(Error::from_call(code, message, service, method)),
            Outcome::Dead(d) => Err(d.to_error()),
        }
    }
}

/// A local `Timeout` error.
pub(crate) fn timeout_error(service: &str, method: &str) -> Error {
    Error::Timeout {
        service: service.to_owned(),
        method: method.to_owned(),
    }
}

/// The local safety deadline of a call started `now`.
pub(crate) fn local_deadline(opts: &CallOptions, now: Instant) -> Option<Instant> {
    opts.timeout
        .and_then(|t| t.checked_add(SAFETY_MARGIN))
        .and_then(|t| now.checked_add(t))
}

/// The payload of a call, before framing.
pub(crate) enum Payload<'a, P: ?Sized> {
    /// Serialise this value with `rmp_serde` (structs as maps).
    Serde(&'a P),
    /// Already-encoded MessagePack bytes (empty means nil).
    Raw(&'a [u8]),
}

/// Builds a complete `Call` frame, encoding the payload straight into it.
pub(crate) fn call_frame<P: Serialize + ?Sized>(
    id: u64,
    service: &str,
    method: &str,
    opts: &CallOptions,
    payload: Payload<'_, P>,
    max_message_size: u32,
) -> Result<Bytes> {
    let env = Envelope::Call {
        id,
        service,
        method,
        timeout_ms: opts.timeout_ms(),
        flags: opts.flags(),
    };
    let mut out;
    match payload {
        Payload::Raw(raw) => {
            let raw = if raw.is_empty() {
                zrpc_proto::NIL_PAYLOAD
            } else {
                raw
            };
            check_size(
                32 + service.len() + method.len() + raw.len(),
                max_message_size,
            )?;
            out =
                BytesMut::with_capacity(HEADER_LEN + 40 + service.len() + method.len() + raw.len());
            encode_frame(&mut out, &env, raw);
        }
        Payload::Serde(v) => {
            out = BytesMut::with_capacity(128 + service.len() + method.len());
            encode_header(&mut out, &env, 0);
            rmp_serde::encode::write_named(&mut (&mut out).writer(), v)?;
            patch_body_len(&mut out);
        }
    }
    check_size(out.len() - HEADER_LEN, max_message_size)?;
    Ok(out.freeze())
}

/// Fixes `body_len` of a frame whose payload was appended after
/// `encode_header(.., 0)`.
fn patch_body_len(frame: &mut BytesMut) {
    let body = (frame.len() - HEADER_LEN) as u64;
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

/// Decodes a result payload; an empty payload means nil.
pub(crate) fn decode_payload<R: DeserializeOwned>(payload: &[u8]) -> Result<R> {
    let payload = if payload.is_empty() {
        zrpc_proto::NIL_PAYLOAD
    } else {
        payload
    };
    Ok(rmp_serde::from_slice(payload)?)
}
