//! Message envelopes: the small MessagePack header in front of every payload.

use bytes::buf::UninitSlice;
use bytes::{BufMut, BytesMut};

use crate::mp::{self, Reader, Writer};
use crate::{ErrorCode, ProtoError};

pub use crate::bits::{caps, flags, Caller};

/// Numeric message kinds (the first element of every envelope array).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Peer to broker, first frame on a connection.
    Hello = 1,
    /// Broker to peer, answer to `Hello`.
    Welcome = 2,
    /// Service to broker: take a name.
    Register = 3,
    /// Service to broker: release a name.
    Unregister = 4,
    /// Broker to service: outcome of `Register`/`Unregister`.
    Ack = 5,
    /// Client to broker: a call.
    Call = 6,
    /// Broker to service: a call routed to it.
    Request = 7,
    /// Service to broker: the outcome of a `Request`.
    Reply = 8,
    /// Broker to client: the outcome of a `Call`.
    Result = 9,
    /// Either direction: abandon a call.
    Cancel = 10,
    /// Either direction: liveness probe.
    Ping = 11,
    /// Either direction: answer to `Ping`.
    Pong = 12,
    /// Broker to peer: connection-level error; the broker closes afterwards.
    Fatal = 13,
    /// Broker to a monitoring peer: one call that passed through.
    Event = 14,
}

/// A decoded envelope. String fields borrow from the frame they came from,
/// so decoding allocates nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Envelope<'a> {
    /// `[1, version, instance, agent]`: opens a connection. `instance` is a
    /// random id chosen once per client/service object; it survives
    /// reconnects and, with a call id, identifies a call for de-duplication.
    Hello {
        /// Protocol version spoken by the peer.
        version: u32,
        /// Random instance id of the peer object.
        instance: u64,
        /// Free-form description of the peer software, for logs.
        agent: &'a str,
        /// Capabilities the peer offers ([`caps`] bits; 0, and not sent,
        /// when none: the 5th element, absent from older peers).
        caps: u32,
    },
    /// `[2, version, conn_id, max_message_size]`.
    Welcome {
        /// Protocol version spoken by the broker.
        version: u32,
        /// Broker-assigned connection id.
        conn_id: u64,
        /// Largest `body_len` the broker accepts.
        max_message_size: u32,
        /// Capabilities of the peer's `Hello` that the broker accepts on
        /// this connection ([`caps`] bits; 0, and not sent, when none).
        caps: u32,
    },
    /// `[3, req, name, shared]`: take `name`. With `shared`, join the
    /// instances already holding it (they must all be shared).
    Register {
        /// Request id echoed in the `Ack`.
        req: u64,
        /// Name to take.
        name: &'a str,
        /// Join as an additional instance.
        shared: bool,
    },
    /// `[4, req, name]`: release `name`.
    Unregister {
        /// Request id echoed in the `Ack`.
        req: u64,
        /// Name to release.
        name: &'a str,
    },
    /// `[5, req, code, message]`: outcome of `Register`/`Unregister`.
    Ack {
        /// Request id.
        req: u64,
        /// `None` on success.
        code: Option<ErrorCode>,
        /// Human-readable reason (empty on success).
        message: &'a str,
    },
    /// `[6, id, service, method, timeout_ms, flags]` + payload.
    Call {
        /// Caller-chosen call id, unique per connection.
        id: u64,
        /// Target service name.
        service: &'a str,
        /// Target method name.
        method: &'a str,
        /// Remaining budget in milliseconds; `None` waits forever.
        timeout_ms: Option<u64>,
        /// See [`flags`].
        flags: u32,
    },
    /// `[7, id, service, method, timeout_ms, caller_instance, caller_call,
    /// caller_uid, caller_gid, caller_pid]` + payload (the last three since
    /// the security model; a `Request` without them decodes with `caller`
    /// `None`).
    Request {
        /// Broker-assigned id; echo it in the `Reply`.
        id: u64,
        /// The name the call was addressed to.
        service: &'a str,
        /// Method to run.
        method: &'a str,
        /// Remaining budget in milliseconds; `None` means no deadline.
        timeout_ms: Option<u64>,
        /// `instance` from the caller's `Hello`.
        caller_instance: u64,
        /// The caller's own call id. With `caller_instance` it identifies the
        /// call across reconnects.
        caller_call: u64,
        /// Who the caller is, as the kernel told the broker (`SO_PEERCRED`
        /// of the caller's connection), never what the caller claims.
        caller: Option<Caller>,
    },
    /// `[8, id, code, message]` + payload (the return value on success).
    Reply {
        /// The `Request` id.
        id: u64,
        /// `None` on success.
        code: Option<ErrorCode>,
        /// Error message (empty on success).
        message: &'a str,
    },
    /// `[9, id, code, message]` + payload (the return value on success).
    Result {
        /// The `Call` id.
        id: u64,
        /// `None` on success.
        code: Option<ErrorCode>,
        /// Error message (empty on success).
        message: &'a str,
    },
    /// `[10, id]`: the caller abandons its call `id` (client to broker), or
    /// the broker abandons request `id` (broker to service).
    Cancel {
        /// Call or request id.
        id: u64,
    },
    /// `[11, nonce]`.
    Ping {
        /// Echoed in the `Pong`.
        nonce: u64,
    },
    /// `[12, nonce]`.
    Pong {
        /// The `Ping`'s nonce.
        nonce: u64,
    },
    /// `[14, seq]` + payload (a MessagePack map describing one finished
    /// call): sent to connections that subscribed with `zrpcd.monitor`.
    Event {
        /// Sequence number of the event on this connection, from 1.
        seq: u64,
    },
    /// `[13, code, message]`: fatal connection error; the connection closes.
    Fatal {
        /// Why.
        code: ErrorCode,
        /// Human-readable reason.
        message: &'a str,
    },
}

fn code_value(code: Option<ErrorCode>) -> u64 {
    code.map_or(0, |c| c.to_u16()) as u64
}

impl<'a> Envelope<'a> {
    /// The message kind.
    pub fn kind(&self) -> Kind {
        match self {
            Envelope::Hello { .. } => Kind::Hello,
            Envelope::Welcome { .. } => Kind::Welcome,
            Envelope::Register { .. } => Kind::Register,
            Envelope::Unregister { .. } => Kind::Unregister,
            Envelope::Ack { .. } => Kind::Ack,
            Envelope::Call { .. } => Kind::Call,
            Envelope::Request { .. } => Kind::Request,
            Envelope::Reply { .. } => Kind::Reply,
            Envelope::Result { .. } => Kind::Result,
            Envelope::Cancel { .. } => Kind::Cancel,
            Envelope::Ping { .. } => Kind::Ping,
            Envelope::Pong { .. } => Kind::Pong,
            Envelope::Fatal { .. } => Kind::Fatal,
            Envelope::Event { .. } => Kind::Event,
        }
    }

    /// Appends the MessagePack encoding of the envelope to `out`.
    ///
    /// The hot paths use [`encode_header`](crate::encode_header), which
    /// writes straight into the spare capacity of a `BytesMut`; this generic
    /// form goes through a temporary buffer.
    pub fn encode(&self, out: &mut impl BufMut) {
        let mut tmp = BytesMut::with_capacity(self.max_encoded_len());
        self.encode_into(&mut tmp);
        out.put_slice(&tmp);
    }

    /// Appends the encoding to `out`, reserving room for it first.
    pub fn encode_into(&self, out: &mut BytesMut) {
        out.reserve(self.max_encoded_len());
        let n = {
            let mut w = Writer::new(out.chunk_mut());
            self.write(&mut w);
            w.len()
        };
        // SAFETY: `write` initialised the first `n` bytes of the spare
        // capacity (`Writer` writes contiguously from its start).
        unsafe { out.advance_mut(n) };
    }

    /// The most bytes [`Envelope::write`] can write for this envelope.
    pub fn max_encoded_len(&self) -> usize {
        const U: usize = mp::MAX_UINT_LEN;
        // Array header and kind.
        2 + match *self {
            Envelope::Hello { agent, .. } => 3 * U + mp::max_str_len(agent),
            Envelope::Welcome { .. } => 4 * U,
            Envelope::Register { name, .. } => U + mp::max_str_len(name) + 1,
            Envelope::Unregister { name, .. } => U + mp::max_str_len(name),
            Envelope::Ack { message, .. }
            | Envelope::Reply { message, .. }
            | Envelope::Result { message, .. } => 2 * U + mp::max_str_len(message),
            Envelope::Call {
                service, method, ..
            } => 3 * U + mp::max_str_len(service) + mp::max_str_len(method),
            Envelope::Request {
                service, method, ..
            } => 7 * U + mp::max_str_len(service) + mp::max_str_len(method),
            Envelope::Cancel { .. }
            | Envelope::Ping { .. }
            | Envelope::Pong { .. }
            | Envelope::Event { .. } => U,
            Envelope::Fatal { message, .. } => U + mp::max_str_len(message),
        }
    }

    /// `(kind, id)` of a successful `Reply` or `Result` with an empty
    /// message: the envelope of every answered call, twice per call (the
    /// service's `Reply`, the broker's `Result`), encoded and decoded by a
    /// short path of its own ([`write_plain_answer`],
    /// [`Envelope::decode`]).
    #[inline]
    pub(crate) fn plain_answer(&self) -> Option<(u8, u64)> {
        match *self {
            Envelope::Reply {
                id,
                code: None,
                message: "",
            } => Some((Kind::Reply as u8, id)),
            Envelope::Result {
                id,
                code: None,
                message: "",
            } => Some((Kind::Result as u8, id)),
            _ => None,
        }
    }

    /// `[8 or 9, id, 0, ""]`, the canonical and the non-canonical unsigned
    /// forms of `id` included, exactly filling `buf`; `None` for anything
    /// else (the general decoder then reads it, or rejects it).
    #[inline]
    pub(crate) fn decode_plain_answer(buf: &'a [u8]) -> Option<Envelope<'a>> {
        let n = buf.len();
        if n < 5 || buf[0] != 0x94 || buf[n - 2] != 0x00 || buf[n - 1] != 0xa0 {
            return None;
        }
        let id = match buf[2..n - 2] {
            [b] if b < 0x80 => b as u64,
            [0xcc, b] => b as u64,
            [0xcd, a, b] => u16::from_be_bytes([a, b]) as u64,
            [0xce, a, b, c, d] => u32::from_be_bytes([a, b, c, d]) as u64,
            [0xcf, a, b, c, d, e, f, g, h] => u64::from_be_bytes([a, b, c, d, e, f, g, h]),
            _ => return None,
        };
        match buf[1] {
            8 => Some(Envelope::Reply {
                id,
                code: None,
                message: "",
            }),
            9 => Some(Envelope::Result {
                id,
                code: None,
                message: "",
            }),
            _ => None,
        }
    }

    /// Writes the encoding through `out`, which must have room for
    /// [`Envelope::max_encoded_len`] bytes.
    #[inline]
    pub fn write(&self, out: &mut Writer<'_>) {
        let kind = self.kind() as u64;
        match *self {
            Envelope::Hello {
                version,
                instance,
                agent,
                caps,
            } => {
                out.array_len(if caps == 0 { 4 } else { 5 });
                out.uint(kind);
                out.uint(version as u64);
                out.uint(instance);
                out.str(agent);
                if caps != 0 {
                    out.uint(caps as u64);
                }
            }
            Envelope::Welcome {
                version,
                conn_id,
                max_message_size,
                caps,
            } => {
                out.array_len(if caps == 0 { 4 } else { 5 });
                out.uint(kind);
                out.uint(version as u64);
                out.uint(conn_id);
                out.uint(max_message_size as u64);
                if caps != 0 {
                    out.uint(caps as u64);
                }
            }
            Envelope::Register { req, name, shared } => {
                out.array_len(4);
                out.uint(kind);
                out.uint(req);
                out.str(name);
                out.bool(shared);
            }
            Envelope::Unregister { req, name } => {
                out.array_len(3);
                out.uint(kind);
                out.uint(req);
                out.str(name);
            }
            Envelope::Ack { req, code, message }
            | Envelope::Reply {
                id: req,
                code,
                message,
            }
            | Envelope::Result {
                id: req,
                code,
                message,
            } => {
                out.array_len(4);
                out.uint(kind);
                out.uint(req);
                out.uint(code_value(code));
                out.str(message);
            }
            Envelope::Call {
                id,
                service,
                method,
                timeout_ms,
                flags,
            } => {
                out.array_len(6);
                out.uint(kind);
                out.uint(id);
                out.str(service);
                out.str(method);
                out.opt_uint(timeout_ms);
                out.uint(flags as u64);
            }
            Envelope::Request {
                id,
                service,
                method,
                timeout_ms,
                caller_instance,
                caller_call,
                caller,
            } => {
                out.array_len(if caller.is_some() { 10 } else { 7 });
                out.uint(kind);
                out.uint(id);
                out.str(service);
                out.str(method);
                out.opt_uint(timeout_ms);
                out.uint(caller_instance);
                out.uint(caller_call);
                if let Some(c) = caller {
                    out.uint(u64::from(c.uid));
                    out.uint(u64::from(c.gid));
                    out.uint(u64::from(c.pid));
                }
            }
            Envelope::Cancel { id: n }
            | Envelope::Ping { nonce: n }
            | Envelope::Pong { nonce: n }
            | Envelope::Event { seq: n } => {
                out.array_len(2);
                out.uint(kind);
                out.uint(n);
            }
            Envelope::Fatal { code, message } => {
                out.array_len(3);
                out.uint(kind);
                out.uint(code_value(Some(code)));
                out.str(message);
            }
        }
    }

    /// Decodes an envelope. Array elements beyond the ones this version knows
    /// are skipped (they are reserved for extensions), but they must still be
    /// well-formed, and the envelope must contain nothing after the array.
    pub fn decode(buf: &'a [u8]) -> Result<Envelope<'a>, ProtoError> {
        if let Some(env) = Self::decode_plain_answer(buf) {
            return Ok(env);
        }
        if let Some(env) = Self::decode_call_or_request(buf) {
            return Ok(env);
        }
        Self::decode_general(buf)
    }

    /// A `Call` or `Request` with its exact number of fields, names of at
    /// most 31 bytes of ASCII and unsigned integers: every call's envelope
    /// in practice (the broker decodes the `Call`, the service the
    /// `Request`). `None` for anything else, which the general decoder then
    /// reads (or rejects) the same way as before.
    #[inline]
    pub(crate) fn decode_call_or_request(buf: &'a [u8]) -> Option<Envelope<'a>> {
        let mut c = Cursor(buf.get(2..)?);
        let env = match (buf[0], buf[1]) {
            (0x96, 6) => Envelope::Call {
                id: c.uint()?,
                service: c.name()?,
                method: c.name()?,
                timeout_ms: c.opt_uint()?,
                flags: u32::try_from(c.uint()?).ok()?,
            },
            (0x9a, 7) => Envelope::Request {
                id: c.uint()?,
                service: c.name()?,
                method: c.name()?,
                timeout_ms: c.opt_uint()?,
                caller_instance: c.uint()?,
                caller_call: c.uint()?,
                caller: Some(Caller {
                    uid: u32::try_from(c.uint()?).ok()?,
                    gid: u32::try_from(c.uint()?).ok()?,
                    pid: u32::try_from(c.uint()?).ok()?,
                }),
            },
            _ => return None,
        };
        c.0.is_empty().then_some(env)
    }

    /// [`Envelope::decode`] without its short paths (the plain answer, the
    /// short call), which must agree with it: see the tests.
    #[inline]
    pub(crate) fn decode_general(buf: &'a [u8]) -> Result<Envelope<'a>, ProtoError> {
        let mut r = Reader::new(buf);
        let len = r.array_len()?;
        if len == 0 {
            return Err(ProtoError::Envelope("empty envelope array"));
        }
        let kind = r.uint()?;
        let need = |n: u32| {
            if len < n {
                Err(ProtoError::Envelope("envelope has too few fields"))
            } else {
                Ok(())
            }
        };
        #[inline(always)]
        fn code(r: &mut Reader<'_>) -> Result<Option<ErrorCode>, ProtoError> {
            Ok(ErrorCode::from_u16(r.u16()?))
        }
        let (env, used) = match kind {
            1 => {
                need(4)?;
                let env = Envelope::Hello {
                    version: r.u32()?,
                    instance: r.uint()?,
                    agent: r.str()?,
                    caps: if len >= 5 { r.u32()? } else { 0 },
                };
                (env, 4 + u32::from(len >= 5))
            }
            2 => {
                need(4)?;
                let env = Envelope::Welcome {
                    version: r.u32()?,
                    conn_id: r.uint()?,
                    max_message_size: r.u32()?,
                    caps: if len >= 5 { r.u32()? } else { 0 },
                };
                (env, 4 + u32::from(len >= 5))
            }
            3 => {
                need(4)?;
                let env = Envelope::Register {
                    req: r.uint()?,
                    name: r.str()?,
                    shared: r.bool()?,
                };
                (env, 4)
            }
            4 => {
                need(3)?;
                let env = Envelope::Unregister {
                    req: r.uint()?,
                    name: r.str()?,
                };
                (env, 3)
            }
            5 | 8 | 9 => {
                need(4)?;
                let id = r.uint()?;
                let code = code(&mut r)?;
                let message = r.str()?;
                let env = match kind {
                    5 => Envelope::Ack {
                        req: id,
                        code,
                        message,
                    },
                    8 => Envelope::Reply { id, code, message },
                    _ => Envelope::Result { id, code, message },
                };
                (env, 4)
            }
            6 => {
                need(6)?;
                let env = Envelope::Call {
                    id: r.uint()?,
                    service: r.str()?,
                    method: r.str()?,
                    timeout_ms: r.opt_uint()?,
                    flags: r.u32()?,
                };
                (env, 6)
            }
            7 => {
                need(7)?;
                let (id, service, method) = (r.uint()?, r.str()?, r.str()?);
                let (timeout_ms, caller_instance, caller_call) =
                    (r.opt_uint()?, r.uint()?, r.uint()?);
                let caller = if len >= 10 {
                    Some(Caller {
                        uid: r.u32()?,
                        gid: r.u32()?,
                        pid: r.u32()?,
                    })
                } else {
                    None
                };
                let env = Envelope::Request {
                    id,
                    service,
                    method,
                    timeout_ms,
                    caller_instance,
                    caller_call,
                    caller,
                };
                (env, if caller.is_some() { 10 } else { 7 })
            }
            10..=12 | 14 => {
                need(2)?;
                let n = r.uint()?;
                let env = match kind {
                    10 => Envelope::Cancel { id: n },
                    11 => Envelope::Ping { nonce: n },
                    12 => Envelope::Pong { nonce: n },
                    _ => Envelope::Event { seq: n },
                };
                (env, 2)
            }
            13 => {
                need(3)?;
                let code = code(&mut r)?.unwrap_or(ErrorCode::Unknown(0));
                let env = Envelope::Fatal {
                    code,
                    message: r.str()?,
                };
                (env, 3)
            }
            other => return Err(ProtoError::UnknownKind(other)),
        };
        for _ in used..len {
            r.skip()?;
        }
        if r.remaining() != 0 {
            return Err(ProtoError::Envelope("trailing bytes after envelope"));
        }
        Ok(env)
    }
}

/// Most bytes of a plain answer's envelope (see [`write_plain_answer`]).
pub(crate) const PLAIN_ANSWER_MAX: usize = 4 + mp::MAX_UINT_LEN;

/// Writes `[kind, id, 0, ""]` (the envelope [`Envelope::plain_answer`]
/// describes) at the start of `out`, which holds at least
/// [`PLAIN_ANSWER_MAX`] bytes; returns its length.
#[inline]
pub(crate) fn write_plain_answer(kind: u8, id: u64, out: &mut [u8]) -> usize {
    let mut w = Writer::new(UninitSlice::new(out));
    w.bytes(&[0x94, kind]);
    w.uint(id);
    // code 0 (success), message "".
    w.bytes(&[0x00, 0xa0]);
    w.len()
}

/// The reader of [`Envelope::decode_call_or_request`]: the common forms
/// only, `None` for anything else.
///
/// A narrower copy of what [`Reader`] reads, kept because it is measurably
/// cheaper on every call: with `Reader` (and `.ok()?`) decoding a `Call`
/// cost 272 instructions instead of 238, a `Request` 319 instead of 273.
/// The agreement test in `tests.rs` holds the two readers together.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    #[inline(always)]
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }

    #[inline(always)]
    fn uint(&mut self) -> Option<u64> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(match b {
            0x00..=0x7f => b as u64,
            0xcc => u8::from_be_bytes(self.take(1)?.try_into().ok()?) as u64,
            0xcd => u16::from_be_bytes(self.take(2)?.try_into().ok()?) as u64,
            0xce => u32::from_be_bytes(self.take(4)?.try_into().ok()?) as u64,
            0xcf => u64::from_be_bytes(self.take(8)?.try_into().ok()?),
            _ => return None,
        })
    }

    #[inline(always)]
    fn opt_uint(&mut self) -> Option<Option<u64>> {
        if self.0.first() == Some(&0xc0) {
            self.0 = &self.0[1..];
            return Some(None);
        }
        self.uint().map(Some)
    }

    #[inline(always)]
    fn name(&mut self) -> Option<&'a str> {
        let (&b, rest) = self.0.split_first()?;
        if b & 0xe0 != 0xa0 {
            return None;
        }
        self.0 = rest;
        let raw = self.take((b & 0x1f) as usize)?;
        if !raw.is_ascii() {
            return None;
        }
        // SAFETY: every ASCII byte sequence is valid UTF-8.
        Some(unsafe { std::str::from_utf8_unchecked(raw) })
    }
}
