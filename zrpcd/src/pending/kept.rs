//! What a pending call keeps of its payload, for re-delivery: small
//! payloads inline in the call's slot (no allocation), larger ones as a
//! copy of their own or a view into the buffer they arrived in (see
//! [`KeptPayload::new`]).

use std::rc::Rc;

use bytes::Bytes;
use zrpc_proto::InlineBytes;

use crate::payload::{FdPayload, Payload};

/// Payloads up to this many bytes are kept inline in their pending call:
/// the copy kept for re-delivery then costs no allocation (before, one
/// `malloc` and `free` per call, ~390 instructions, the largest single
/// item of the routing path). 70 bytes hold a 64-byte string or binary
/// value with its MessagePack header, and keep a slot at 136 bytes (the
/// issue's budget is 256 bytes per pending call, index and timer included).
pub const INLINE_PAYLOAD: usize = 70;

/// Payloads up to this size are copied out of the read buffer (inline or
/// into an allocation of their own), so that a pending call does not keep
/// the whole read chunk it arrived in (shared with the other frames of
/// that read) alive; larger ones are kept by reference.
pub const SMALL_PAYLOAD_COPY: usize = 256;

/// A pending call's copy of its payload, kept for re-delivery.
#[derive(Clone)]
pub enum KeptPayload {
    /// A small payload, copied in place.
    Inline(InlineBytes<INLINE_PAYLOAD>),
    /// A larger payload: a copy, or a view into the buffer it arrived in.
    Shared(Bytes),
    /// A payload in a sealed memfd: the descriptor, kept open (and counted
    /// against its sender) until the call ends, so that a re-delivery has
    /// it.
    Fd(Rc<FdPayload>),
}

impl KeptPayload {
    /// What a pending call keeps of `payload`.
    pub fn new(payload: Payload<'_>) -> KeptPayload {
        let bytes = match payload {
            Payload::Fd(f) => return KeptPayload::Fd(f.clone()),
            Payload::Shared(b) if b.len() > SMALL_PAYLOAD_COPY => {
                // A view into a large payload's own split-off buffer.
                return KeptPayload::Shared(b.clone());
            }
            Payload::Borrowed(b) => b,
            Payload::Shared(b) => &b[..],
        };
        if let Some(inline) = InlineBytes::new(bytes) {
            KeptPayload::Inline(inline)
        } else {
            KeptPayload::Shared(Bytes::copy_from_slice(bytes))
        }
    }

    /// The payload as the broker forwards it.
    pub fn as_payload(&self) -> Payload<'_> {
        match self {
            KeptPayload::Inline(b) => Payload::Borrowed(b),
            KeptPayload::Shared(b) => Payload::Shared(b),
            KeptPayload::Fd(f) => Payload::Fd(f),
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.as_payload().len()
    }

    /// True for an empty (nil) payload.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The payload as `Bytes` (a copy of an inline one, a mapping of a
    /// memfd).
    #[cfg(test)]
    pub fn to_bytes(&self) -> Bytes {
        self.as_payload().to_bytes().expect("mappable")
    }
}

impl std::fmt::Debug for KeptPayload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeptPayload({} bytes)", self.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_payloads_are_kept_inline_and_large_ones_by_reference() {
        let small = Bytes::from(vec![7u8; INLINE_PAYLOAD]);
        let kept = KeptPayload::new(Payload::Shared(&small));
        assert!(matches!(kept, KeptPayload::Inline(_)));
        assert_eq!(kept.as_payload().bytes(), Some(&small[..]));
        assert_eq!(kept.to_bytes(), small);
        let copied = Bytes::from(vec![8u8; INLINE_PAYLOAD + 1]);
        match KeptPayload::new(Payload::Shared(&copied)) {
            KeptPayload::Shared(b) => {
                assert_eq!(b, copied);
                assert_ne!(b.as_ptr(), copied.as_ptr(), "a copy, not a view");
            }
            KeptPayload::Inline(_) | KeptPayload::Fd(_) => panic!("too large to be inline"),
        }
        let large = Bytes::from(vec![9u8; SMALL_PAYLOAD_COPY + 1]);
        match KeptPayload::new(Payload::Shared(&large)) {
            KeptPayload::Shared(b) => assert_eq!(b.as_ptr(), large.as_ptr(), "a view"),
            KeptPayload::Inline(_) | KeptPayload::Fd(_) => panic!("too large to be inline"),
        }
        // A large payload borrowed from elsewhere is copied.
        match KeptPayload::new(Payload::Borrowed(&large)) {
            KeptPayload::Shared(b) => {
                assert_eq!(b, large);
                assert_ne!(b.as_ptr(), large.as_ptr(), "a copy, not a view");
            }
            KeptPayload::Inline(_) | KeptPayload::Fd(_) => panic!("too large to be inline"),
        }
        assert!(KeptPayload::new(Payload::EMPTY).is_empty());
    }
}
