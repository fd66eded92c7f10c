//! Frame codec: splitting a byte stream into frames and writing frames.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::envelope::{write_plain_answer, PLAIN_ANSWER_MAX};
use crate::mp::Writer;
use crate::{Envelope, ProtoError};

/// Length of the fixed frame header: `body_len` and `env_len`, both u32 BE.
pub const HEADER_LEN: usize = 8;

/// Set in `env_len` of a frame whose payload travels in a descriptor (a
/// sealed memfd sent with the frame, see `docs/protocol.md`): such a frame
/// has no payload bytes (`body_len` = `env_len` without the flag). Only a
/// decoder made [`with_fds`](FrameDecoder::with_fds) accepts it; to any
/// other, `env_len` is larger than `body_len`, a malformed frame.
pub const FD_PAYLOAD_FLAG: u32 = 1 << 31;

/// One frame, split into its envelope bytes and its payload bytes. Both are
/// cheap reference-counted slices of the buffer the frame was read into.
#[derive(Debug, Clone)]
pub struct Frame {
    /// The MessagePack envelope.
    pub envelope: Bytes,
    /// The opaque payload (possibly empty).
    pub payload: Bytes,
}

impl Frame {
    /// Decodes the envelope. The result borrows from `self`.
    pub fn decode(&self) -> Result<Envelope<'_>, ProtoError> {
        Envelope::decode(&self.envelope)
    }
}

/// Splits complete frames off the front of a read buffer.
#[derive(Debug, Clone, Copy)]
pub struct FrameDecoder {
    max_body: u32,
    fds: bool,
}

impl FrameDecoder {
    /// A decoder that rejects frames whose body exceeds `max_body` bytes.
    pub fn new(max_body: u32) -> Self {
        FrameDecoder {
            max_body,
            fds: false,
        }
    }

    /// The same decoder, accepting frames with [`FD_PAYLOAD_FLAG`]
    /// (`true`) or refusing them as malformed (`false`, the default).
    pub fn with_fds(self, fds: bool) -> Self {
        FrameDecoder { fds, ..self }
    }

    /// Whether frames with [`FD_PAYLOAD_FLAG`] are accepted.
    pub fn accepts_fds(&self) -> bool {
        self.fds
    }

    /// The configured body limit.
    pub fn max_body(&self) -> u32 {
        self.max_body
    }

    /// If `buf` holds the header of an incomplete frame, the total number of
    /// bytes (header included) that frame needs; callers use it to reserve
    /// the whole frame at once instead of growing the buffer repeatedly.
    pub fn needed(&self, buf: &[u8]) -> Option<usize> {
        if buf.len() < HEADER_LEN {
            return None;
        }
        let body = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
        if body > self.max_body {
            return None;
        }
        let total = HEADER_LEN + body as usize;
        (total > buf.len()).then_some(total)
    }

    /// The sizes of the frame at the front of `buf` if it is complete,
    /// `Ok(None)` if more bytes are needed. Nothing is consumed: a caller
    /// that handles frames in place reads them at
    /// `buf[..size.total()]` and advances past them itself. An error means
    /// the stream is corrupt and the connection must be closed.
    #[inline]
    pub fn complete(&self, buf: &[u8]) -> Result<Option<FrameSize>, ProtoError> {
        let Some(header) = buf.get(..HEADER_LEN) else {
            return Ok(None);
        };
        let body_len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
        let mut env_len = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
        let fd = self.fds && env_len & FD_PAYLOAD_FLAG != 0;
        if fd {
            env_len &= !FD_PAYLOAD_FLAG;
            if env_len != body_len {
                return Err(ProtoError::BadEnvelopeLength { env_len, body_len });
            }
        }
        if body_len > self.max_body {
            return Err(ProtoError::FrameTooLarge {
                len: body_len as u64,
                max: self.max_body,
            });
        }
        if env_len > body_len || env_len == 0 {
            return Err(ProtoError::BadEnvelopeLength { env_len, body_len });
        }
        if buf.len() < HEADER_LEN + body_len as usize {
            return Ok(None);
        }
        Ok(Some(FrameSize {
            env_len: env_len as usize,
            body_len: body_len as usize,
            fd,
        }))
    }

    /// Removes and returns the first complete frame of `buf`, or `Ok(None)`
    /// if more bytes are needed. An error means the stream is corrupt and
    /// the connection must be closed.
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<Frame>, ProtoError> {
        Ok(self.complete(buf)?.map(|size| size.split_off(buf)))
    }

    /// Removes every complete frame at the front of `buf` as one [`Batch`]
    /// (one shared buffer, however many frames), and the error that ended
    /// it if the stream is corrupt after them: the frames before the
    /// corruption are still in the batch, and the connection must be
    /// closed once they are handled.
    #[inline]
    pub fn take_batch(&self, buf: &mut BytesMut) -> (Batch, Option<ProtoError>) {
        let mut total = 0;
        let mut corrupt = None;
        loop {
            match self.complete(&buf[total..]) {
                Ok(Some(size)) => total += size.total(),
                Ok(None) => break,
                Err(e) => {
                    corrupt = Some(e);
                    break;
                }
            }
        }
        let bytes = if total == 0 {
            Bytes::new()
        } else {
            buf.split_to(total).freeze()
        };
        (Batch(bytes), corrupt)
    }
}

/// Complete, valid frames taken off a read buffer together
/// ([`FrameDecoder::take_batch`]), read where they lie: a frame's envelope
/// and payload are slices of the batch, and only what must outlive it (a
/// payload kept as [`Bytes`]) takes a handle on the buffer.
#[derive(Debug, Default)]
pub struct Batch(Bytes);

impl Batch {
    /// The whole buffer, to take handles on slices of it.
    #[inline]
    pub fn bytes(&self) -> &Bytes {
        &self.0
    }

    /// Whether the batch holds no frame.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The frames, in order, as `(envelope, payload)`.
    #[inline]
    pub fn frames(&self) -> BatchFrames<'_> {
        BatchFrames(&self.0)
    }

    /// `payload` (a slice of this batch, as [`Batch::frames`] gives it)
    /// as its own handle; an empty one takes none. Panics if `payload` is
    /// not a slice of this batch.
    #[inline]
    pub fn payload(&self, payload: &[u8]) -> Bytes {
        if payload.is_empty() {
            return Bytes::new();
        }
        let from = (payload.as_ptr() as usize).wrapping_sub(self.0.as_ptr() as usize);
        self.0.slice(from..from + payload.len())
    }
}

/// The frames of a [`Batch`] ([`Batch::frames`]).
#[derive(Debug)]
pub struct BatchFrames<'a>(&'a [u8]);

impl<'a> BatchFrames<'a> {
    /// The next frame as `(envelope, payload, has_fd)`: `has_fd` for a
    /// frame with [`FD_PAYLOAD_FLAG`] (its payload travels in the next
    /// descriptor received; only a decoder made
    /// [`with_fds`](FrameDecoder::with_fds) lets one into a batch).
    #[inline]
    pub fn next_with_fd(&mut self) -> Option<(&'a [u8], &'a [u8], bool)> {
        // The frames were validated when the batch was taken.
        let header = self.0.get(..HEADER_LEN)?;
        let body_len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let raw_env = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
        let fd = raw_env & FD_PAYLOAD_FLAG != 0;
        let env_len = (raw_env & !FD_PAYLOAD_FLAG) as usize;
        let body = self.0.get(HEADER_LEN..HEADER_LEN + body_len)?;
        self.0 = &self.0[HEADER_LEN + body_len..];
        (env_len <= body_len).then(|| {
            let (e, p) = body.split_at(env_len);
            (e, p, fd)
        })
    }
}

impl<'a> Iterator for BatchFrames<'a> {
    type Item = (&'a [u8], &'a [u8]);

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        self.next_with_fd().map(|(e, p, _)| (e, p))
    }
}

/// The sizes of a complete frame, as [`FrameDecoder::complete`] found them
/// valid (only it makes one: `1 <= env_len <= body_len`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameSize {
    env_len: usize,
    body_len: usize,
    fd: bool,
}

impl FrameSize {
    /// Whether the frame's payload travels in the next descriptor received
    /// ([`FD_PAYLOAD_FLAG`]); its payload bytes are then empty.
    #[inline]
    pub fn has_fd(&self) -> bool {
        self.fd
    }

    /// Length of the envelope.
    #[inline]
    pub fn env_len(&self) -> usize {
        self.env_len
    }

    /// Length of the envelope and payload.
    #[inline]
    pub fn body_len(&self) -> usize {
        self.body_len
    }

    /// Length of the whole frame, header included.
    #[inline]
    pub fn total(&self) -> usize {
        HEADER_LEN + self.body_len
    }

    /// Length of the payload.
    #[inline]
    pub fn payload_len(&self) -> usize {
        self.body_len - self.env_len
    }

    /// Removes the frame at the front of `buf` (which holds at least
    /// [`FrameSize::total`] bytes) and returns it as reference-counted
    /// slices of the buffer.
    pub fn split_off(&self, buf: &mut BytesMut) -> Frame {
        buf.advance(HEADER_LEN);
        let mut body = buf.split_to(self.body_len).freeze();
        let envelope = body.split_to(self.env_len);
        Frame {
            envelope,
            payload: body,
        }
    }

    /// The envelope and the payload of the frame at the front of `buf`
    /// (which holds at least [`FrameSize::total`] bytes).
    #[inline]
    pub fn parts<'a>(&self, buf: &'a [u8]) -> (&'a [u8], &'a [u8]) {
        let env_end = HEADER_LEN + self.env_len;
        (&buf[HEADER_LEN..env_end], &buf[env_end..self.total()])
    }
}

/// Appends the header and envelope of a frame whose payload of `payload_len`
/// bytes the caller writes next (or sends as a separate slice of a vectored
/// write).
pub fn encode_header(out: &mut BytesMut, env: &Envelope<'_>, payload_len: usize) {
    if let Some((kind, id)) = env.plain_answer() {
        // The envelope of every answered call: built on the stack and
        // copied as one fixed-size block.
        let mut frame = [0u8; HEADER_LEN + PLAIN_ANSWER_MAX];
        let (head, envelope) = frame.split_at_mut(HEADER_LEN);
        let env_len = write_plain_answer(kind, id, envelope);
        head.copy_from_slice(&header(env_len, payload_len));
        out.reserve(frame.len());
        out.chunk_mut()[..frame.len()].copy_from_slice(&frame);
        // SAFETY: the header and the `env_len` bytes after it were just
        // written (and the rest of `frame` after them, beyond the length).
        unsafe { out.advance_mut(HEADER_LEN + env_len) };
        return;
    }
    out.reserve(HEADER_LEN + env.max_encoded_len());
    let env_len = {
        let mut w = Writer::new(&mut out.chunk_mut()[HEADER_LEN..]);
        env.write(&mut w);
        w.len()
    };
    out.chunk_mut()[..HEADER_LEN].copy_from_slice(&header(env_len, payload_len));
    // SAFETY: the header and the `env_len` bytes after it were just written.
    unsafe { out.advance_mut(HEADER_LEN + env_len) };
}

/// Appends the header and envelope of a frame whose payload travels in a
/// descriptor sent with it ([`FD_PAYLOAD_FLAG`]; no payload bytes follow).
pub fn encode_fd_header(out: &mut BytesMut, env: &Envelope<'_>) {
    let at = out.len();
    encode_header(out, env, 0);
    let env_len = u32::from_be_bytes([out[at + 4], out[at + 5], out[at + 6], out[at + 7]]);
    out[at + 4..at + 8].copy_from_slice(&(env_len | FD_PAYLOAD_FLAG).to_be_bytes());
}

/// The frame header for an envelope and a payload of these lengths.
#[inline]
fn header(env_len: usize, payload_len: usize) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(&((env_len + payload_len) as u32).to_be_bytes());
    h[4..].copy_from_slice(&(env_len as u32).to_be_bytes());
    h
}

/// Appends a complete frame (header, envelope and payload) to `out`.
pub fn encode_frame(out: &mut BytesMut, env: &Envelope<'_>, payload: &[u8]) {
    encode_header(out, env, payload.len());
    out.extend_from_slice(payload);
}
