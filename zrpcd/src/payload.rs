//! A frame's payload as the broker passes it along.

use bytes::Bytes;

/// A payload on its way through the broker: borrowed from the read buffer
/// it arrived in, or a shared handle to it.
///
/// Frames with small payloads are handled in place in the connection's
/// read buffer (see [`crate::conn`]): their payload is copied into the
/// recipient's output buffer and, if the call stays pending, into the
/// pending slot, so it never needs a reference-counted handle of its own.
/// Large payloads arrive split off as [`Bytes`] and are forwarded by
/// reference, without a copy.
#[derive(Debug, Clone, Copy)]
pub enum Payload<'a> {
    /// Bytes the caller keeps (a read buffer, a pending slot).
    Borrowed(&'a [u8]),
    /// A shared handle (a large payload split off the read buffer, an
    /// encoded event).
    Shared(&'a Bytes),
}

impl<'a> Payload<'a> {
    /// No payload.
    pub const EMPTY: Payload<'static> = Payload::Borrowed(&[]);

    /// The payload bytes.
    pub fn as_slice(&self) -> &'a [u8] {
        match *self {
            Payload::Borrowed(b) => b,
            Payload::Shared(b) => b,
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.as_slice().len()
    }

    /// True for an empty payload.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// An owned handle: the same buffer for a shared payload, a copy of a
    /// borrowed one.
    pub fn to_bytes(&self) -> Bytes {
        match *self {
            Payload::Borrowed(b) => Bytes::copy_from_slice(b),
            Payload::Shared(b) => b.clone(),
        }
    }
}

impl<'a> From<&'a Bytes> for Payload<'a> {
    fn from(b: &'a Bytes) -> Self {
        Payload::Shared(b)
    }
}
