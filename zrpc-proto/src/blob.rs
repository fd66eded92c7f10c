//! [`Blob`]: binary data as MessagePack `bin`, decoded without copying.
//!
//! `serde_bytes::ByteBuf` is the usual way to send bytes as `bin` (a plain
//! `Vec<u8>` becomes an array of integers), but decoding one always
//! allocates and copies. A [`Blob`] is a [`Bytes`]: when it is decoded by
//! zrpc from a received message (a service's arguments, a client's result),
//! a blob of [`MIN_VIEW`] bytes or more is a view into the very buffer the
//! message was read into, so a 1 MiB payload costs no copy and no
//! allocation; keeping it alive keeps that buffer alive. Smaller blobs, and
//! blobs decoded anywhere else (`rmp_serde` called directly, another serde
//! format), are copies, like `ByteBuf`.

use std::cell::RefCell;
use std::fmt;
use std::ops::Deref;

use bytes::Bytes;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// Binary data, encoded as MessagePack `bin`, decoded without a copy when
/// zrpc decodes a received payload (see the [module docs](self)).
///
/// ```
/// use zrpc_proto::Blob;
/// let b = Blob::from(vec![1u8, 2, 3]);
/// let wire = rmp_serde::to_vec(&b).unwrap();
/// assert_eq!(wire, [0xc4, 3, 1, 2, 3]); // bin 8, 3 bytes
/// let back: Blob = zrpc_proto::blob::decode_from(&bytes::Bytes::from(wire), |p| rmp_serde::from_slice(p)).unwrap();
/// assert_eq!(&back[..], &[1, 2, 3]);
/// ```
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Blob(pub Bytes);

impl Blob {
    /// An empty blob.
    pub const fn new() -> Self {
        Blob(Bytes::new())
    }

    /// The bytes, as a cheap-to-clone [`Bytes`].
    pub fn into_bytes(self) -> Bytes {
        self.0
    }
}

impl fmt::Debug for Blob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Blob({} bytes)", self.0.len())
    }
}

impl Deref for Blob {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl AsRef<[u8]> for Blob {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl From<Bytes> for Blob {
    fn from(b: Bytes) -> Self {
        Blob(b)
    }
}

impl From<Vec<u8>> for Blob {
    fn from(v: Vec<u8>) -> Self {
        Blob(Bytes::from(v))
    }
}

impl From<&'static [u8]> for Blob {
    fn from(s: &'static [u8]) -> Self {
        Blob(Bytes::from_static(s))
    }
}

impl From<Blob> for Bytes {
    fn from(b: Blob) -> Self {
        b.0
    }
}

impl Serialize for Blob {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

thread_local! {
    /// The buffer being decoded by [`decode_from`] on this thread, if any.
    static SOURCE: RefCell<Option<Bytes>> = const { RefCell::new(None) };
}

/// Runs `f` (a decode of `source`'s bytes) so that every [`Blob`] decoded
/// from a slice of `source` is a view into it instead of a copy.
pub fn decode_from<T>(source: &Bytes, f: impl FnOnce(&[u8]) -> T) -> T {
    if source.len() < MIN_VIEW {
        // No blob in it can be long enough to become a view (a blob found
        // by an enclosing `decode_from` is shorter than `MIN_VIEW` too, so
        // it is copied whatever the current source): skip the
        // thread-local, a reference-count increment and decrement, per
        // small call and reply.
        return f(source);
    }
    struct Restore(Option<Bytes>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let prev = self.0.take();
            SOURCE.with(|s| *s.borrow_mut() = prev);
        }
    }
    let prev = SOURCE.with(|s| s.borrow_mut().replace(source.clone()));
    let _restore = Restore(prev);
    f(source)
}

/// A decode error as a user reads it: `rmp_serde` names a type mismatch
/// by the msgpack marker found ("wrong msgpack marker FixStr(3)"); this
/// says what kind of value came instead ("got a string (msgpack marker
/// FixStr(3))"). Other errors keep their own text.
pub fn decode_error_text(e: &rmp_serde::decode::Error) -> String {
    use rmp::Marker as M;
    let rmp_serde::decode::Error::TypeMismatch(marker) = e else {
        return e.to_string();
    };
    let kind = match marker {
        M::Null => "nil",
        M::True | M::False => "a boolean",
        M::FixPos(_) | M::FixNeg(_) => "an integer",
        M::U8 | M::U16 | M::U32 | M::U64 | M::I8 | M::I16 | M::I32 | M::I64 => "an integer",
        M::F32 | M::F64 => "a float",
        M::FixStr(_) | M::Str8 | M::Str16 | M::Str32 => "a string",
        M::Bin8 | M::Bin16 | M::Bin32 => "binary data",
        M::FixArray(_) | M::Array16 | M::Array32 => "an array",
        M::FixMap(_) | M::Map16 | M::Map32 => "a map",
        M::FixExt1 | M::FixExt2 | M::FixExt4 | M::FixExt8 | M::FixExt16 => "an extension value",
        M::Ext8 | M::Ext16 | M::Ext32 => "an extension value",
        M::Reserved => "a reserved byte (0xc1), not a value",
    };
    format!("invalid type: got {kind} (msgpack marker {marker:?})")
}

/// Blobs shorter than this are copied even inside [`decode_from`]: a view
/// keeps the whole buffer it points into alive (a read buffer shared with
/// other messages), which a small value kept for long must not do.
pub const MIN_VIEW: usize = 4096;

/// `v` as a view into the current [`decode_from`] source, or a copy.
fn view_or_copy(v: &[u8]) -> Bytes {
    if v.len() < MIN_VIEW {
        return Bytes::copy_from_slice(v);
    }
    SOURCE.with(|s| {
        if let Some(src) = s.borrow().as_ref() {
            let (start, end) = (src.as_ptr() as usize, src.as_ptr() as usize + src.len());
            let p = v.as_ptr() as usize;
            if !v.is_empty() && p >= start && p + v.len() <= end {
                return src.slice_ref(v);
            }
        }
        Bytes::copy_from_slice(v)
    })
}

struct BlobVisitor;

impl<'de> Visitor<'de> for BlobVisitor {
    type Value = Blob;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("binary data (MessagePack bin)")
    }

    fn visit_borrowed_bytes<E: de::Error>(self, v: &'de [u8]) -> Result<Blob, E> {
        Ok(Blob(view_or_copy(v)))
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Blob, E> {
        Ok(Blob(Bytes::copy_from_slice(v)))
    }

    fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Blob, E> {
        Ok(Blob(Bytes::from(v)))
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Blob, E> {
        Ok(Blob(view_or_copy(v.as_bytes())))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Blob, E> {
        Ok(Blob(Bytes::copy_from_slice(v.as_bytes())))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Blob, A::Error> {
        // An array of small integers (what a plain `Vec<u8>` encodes as).
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(b) = seq.next_element::<u8>()? {
            out.push(b);
        }
        Ok(Blob::from(out))
    }
}

impl<'de> Deserialize<'de> for Blob {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Blob, D::Error> {
        d.deserialize_bytes(BlobVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_type_mismatch_says_what_came() {
        let wire = rmp_serde::to_vec("abc").expect("encode");
        let e = rmp_serde::from_slice::<u64>(&wire).expect_err("a string is no u64");
        assert_eq!(
            super::decode_error_text(&e),
            "invalid type: got a string (msgpack marker FixStr(3))"
        );
        let e = rmp_serde::from_slice::<u64>(&[0x91, 0x01]).expect_err("an array is no u64");
        assert!(super::decode_error_text(&e).starts_with("invalid type: got an array"));
        // Other errors keep their text.
        let e = rmp_serde::from_slice::<u64>(&[]).expect_err("nothing");
        assert_eq!(super::decode_error_text(&e), e.to_string());
    }

    #[test]
    fn decodes_as_a_view_inside_decode_from_and_as_a_copy_outside() {
        let big = Blob::from(vec![9u8; 100_000]);
        let wire = Bytes::from(rmp_serde::to_vec(&(1u8, &big, "x")).expect("encode"));
        let (n, b, s): (u8, Blob, String) =
            decode_from(&wire, |p| rmp_serde::from_slice(p)).expect("decode");
        assert_eq!((n, s.as_str()), (1, "x"));
        assert_eq!(b, big);
        let inside = wire.as_ptr_range();
        assert!(inside.contains(&b.as_ptr()), "no copy inside decode_from");
        // Outside decode_from, or from another buffer: a copy.
        let (_, c, _): (u8, Blob, String) = rmp_serde::from_slice(&wire).expect("decode");
        assert_eq!(c, big);
        assert!(!inside.contains(&c.as_ptr()));
        let other = Bytes::from(wire.to_vec());
        let (_, d, _): (u8, Blob, String) =
            decode_from(&wire, |_| rmp_serde::from_slice(&other)).expect("decode");
        assert!(!inside.contains(&d.as_ptr()) && d == big);
        // A small blob is a copy even inside decode_from: it must not keep
        // a shared read buffer alive.
        let small = Blob::from(vec![1u8; MIN_VIEW - 1]);
        let wire = Bytes::from(rmp_serde::to_vec(&small).expect("encode"));
        let s: Blob = decode_from(&wire, |p| rmp_serde::from_slice(p)).expect("decode");
        assert_eq!(s, small);
        assert!(
            !wire.as_ptr_range().contains(&s.as_ptr()),
            "small blobs are copied"
        );
        // The source is restored after a nested decode.
        SOURCE.with(|s| assert!(s.borrow().is_none()));
    }

    #[test]
    fn accepts_what_bytes_are_commonly_encoded_as() {
        let from_str: Blob =
            rmp_serde::from_slice(&rmp_serde::to_vec("ab").expect("e")).expect("d");
        assert_eq!(&from_str[..], b"ab");
        let from_array: Blob =
            rmp_serde::from_slice(&rmp_serde::to_vec(&vec![1u8, 2]).expect("e")).expect("d");
        assert_eq!(&from_array[..], &[1, 2]);
        let empty: Blob = rmp_serde::from_slice(&[0xc4, 0]).expect("d");
        assert!(empty.is_empty());
        assert!(
            rmp_serde::from_slice::<Blob>(&[0x01]).is_err(),
            "an integer is not bytes"
        );
    }
}
