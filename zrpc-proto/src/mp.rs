//! A minimal MessagePack reader and writer for envelopes.
//!
//! Envelopes use only a handful of MessagePack types (arrays, unsigned
//! integers, strings, booleans, nil). Writing them by hand keeps the hot path
//! free of allocation and of generic serde machinery, and makes the decoder
//! small enough to fuzz exhaustively. Payloads never pass through here.

use bytes::buf::UninitSlice;

use crate::ProtoError;

/// Why an envelope could not be read: a static message, behind a thin
/// pointer so that every `Result` of the reader fits in two registers
/// (with `ProtoError` they were returned through memory, field by field).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Malformed(&'static Why);

/// The message of a [`Malformed`].
#[derive(PartialEq, Eq)]
pub struct Why(&'static str);

impl Malformed {
    /// What was wrong.
    pub fn message(self) -> &'static str {
        self.0 .0
    }
}

impl std::fmt::Debug for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Malformed({:?})", self.message())
    }
}

impl From<Malformed> for ProtoError {
    fn from(m: Malformed) -> ProtoError {
        ProtoError::Envelope(m.message())
    }
}

/// A [`Malformed`] with a literal message.
macro_rules! bad {
    ($m:literal) => {
        Malformed(&Why($m))
    };
}

/// Maximum nesting depth accepted when skipping unknown values.
const MAX_SKIP_DEPTH: u32 = 32;

/// Writes MessagePack values into memory reserved for them: the caller
/// reserves an upper bound of what it writes (see
/// [`Envelope::max_encoded_len`](crate::Envelope::max_encoded_len)), so
/// no write checks or grows capacity, and a small integer costs one store.
pub struct Writer<'a> {
    dst: &'a mut UninitSlice,
    len: usize,
}

impl<'a> Writer<'a> {
    /// A writer that fills `dst` from its start.
    pub fn new(dst: &'a mut UninitSlice) -> Self {
        Writer { dst, len: 0 }
    }

    /// Bytes written so far (all of `dst[..len]` is initialised).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing was written yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Writes raw bytes. Panics if they do not fit (a wrong bound).
    #[inline(always)]
    pub fn bytes(&mut self, s: &[u8]) {
        self.dst[self.len..self.len + s.len()].copy_from_slice(s);
        self.len += s.len();
    }

    #[inline(always)]
    fn byte(&mut self, b: u8) {
        self.dst.write_byte(self.len, b);
        self.len += 1;
    }

    /// Writes an array header for `len` elements.
    #[inline(always)]
    pub fn array_len(&mut self, len: u32) {
        if len < 16 {
            self.byte(0x90 | len as u8);
        } else if len <= u16::MAX as u32 {
            let b = (len as u16).to_be_bytes();
            self.bytes(&[0xdc, b[0], b[1]]);
        } else {
            let b = len.to_be_bytes();
            self.bytes(&[0xdd, b[0], b[1], b[2], b[3]]);
        }
    }

    /// Writes an unsigned integer in its most compact form.
    #[inline(always)]
    pub fn uint(&mut self, v: u64) {
        if v < 128 {
            self.byte(v as u8);
        } else if v <= u8::MAX as u64 {
            self.bytes(&[0xcc, v as u8]);
        } else if v <= u16::MAX as u64 {
            let b = (v as u16).to_be_bytes();
            self.bytes(&[0xcd, b[0], b[1]]);
        } else if v <= u32::MAX as u64 {
            let b = (v as u32).to_be_bytes();
            self.bytes(&[0xce, b[0], b[1], b[2], b[3]]);
        } else {
            let b = v.to_be_bytes();
            self.bytes(&[0xcf, b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
        }
    }

    /// Writes a UTF-8 string.
    #[inline(always)]
    pub fn str(&mut self, s: &str) {
        let len = s.len();
        if len < 32 {
            self.byte(0xa0 | len as u8);
        } else if len <= u8::MAX as usize {
            self.bytes(&[0xd9, len as u8]);
        } else if len <= u16::MAX as usize {
            let b = (len as u16).to_be_bytes();
            self.bytes(&[0xda, b[0], b[1]]);
        } else {
            let b = (len as u32).to_be_bytes();
            self.bytes(&[0xdb, b[0], b[1], b[2], b[3]]);
        }
        self.bytes(s.as_bytes());
    }

    /// Writes nil.
    #[inline(always)]
    pub fn nil(&mut self) {
        self.byte(0xc0);
    }

    /// Writes a boolean.
    #[inline(always)]
    pub fn bool(&mut self, v: bool) {
        self.byte(if v { 0xc3 } else { 0xc2 });
    }

    /// Writes `Some(v)` as an unsigned integer and `None` as nil.
    #[inline(always)]
    pub fn opt_uint(&mut self, v: Option<u64>) {
        match v {
            Some(v) => self.uint(v),
            None => self.nil(),
        }
    }
}

/// Most bytes [`Writer::uint`] writes.
pub const MAX_UINT_LEN: usize = 9;

/// Most bytes [`Writer::str`] writes for `s`.
pub fn max_str_len(s: &str) -> usize {
    5 + s.len()
}

/// A cursor over an envelope's bytes.
///
/// The common encodings (fixints, fixstrs, the unsigned integer forms) are
/// read inline; the rest (signed integers, long array and string headers)
/// goes through out-of-line functions, so the reader costs a few
/// instructions per field of a typical envelope.
#[derive(Debug)]
pub struct Reader<'a> {
    /// The bytes not yet consumed.
    rest: &'a [u8],
}

const TRUNCATED: Malformed = bad!("truncated envelope");

impl<'a> Reader<'a> {
    /// Starts reading at the beginning of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { rest: buf }
    }

    /// Bytes not yet consumed.
    pub fn remaining(&self) -> usize {
        self.rest.len()
    }

    #[inline(always)]
    fn byte(&mut self) -> Result<u8, Malformed> {
        let (&b, rest) = self.rest.split_first().ok_or(TRUNCATED)?;
        self.rest = rest;
        Ok(b)
    }

    #[inline(always)]
    fn take(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        if n > self.rest.len() {
            return Err(TRUNCATED);
        }
        let (s, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(s)
    }

    #[inline(always)]
    fn array<const N: usize>(&mut self) -> Result<[u8; N], Malformed> {
        let s = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn be(&mut self, n: usize) -> Result<u64, Malformed> {
        Ok(match n {
            1 => u8::from_be_bytes(self.array()?) as u64,
            2 => u16::from_be_bytes(self.array()?) as u64,
            4 => u32::from_be_bytes(self.array()?) as u64,
            _ => u64::from_be_bytes(self.array()?),
        })
    }

    /// Reads an array header and returns its length.
    #[inline(always)]
    pub fn array_len(&mut self) -> Result<u32, Malformed> {
        match self.byte()? {
            b @ 0x90..=0x9f => Ok((b & 0x0f) as u32),
            b => self.array_len_long(b),
        }
    }

    #[cold]
    fn array_len_long(&mut self, b: u8) -> Result<u32, Malformed> {
        match b {
            0xdc => Ok(self.be(2)? as u32),
            0xdd => Ok(self.be(4)? as u32),
            _ => Err(bad!("envelope is not a MessagePack array")),
        }
    }

    /// Reads a non-negative integer (any MessagePack integer encoding).
    #[inline(always)]
    pub fn uint(&mut self) -> Result<u64, Malformed> {
        match self.byte()? {
            b @ 0x00..=0x7f => Ok(b as u64),
            b => self.uint_long(b),
        }
    }

    /// The unsigned integer encodings after a first byte that is not a
    /// fixint (ids and counters soon outgrow the fixints).
    #[inline(always)]
    fn uint_long(&mut self, b: u8) -> Result<u64, Malformed> {
        match b {
            0xcc => Ok(u8::from_be_bytes(self.array()?) as u64),
            0xcd => Ok(u16::from_be_bytes(self.array()?) as u64),
            0xce => Ok(u32::from_be_bytes(self.array()?) as u64),
            0xcf => Ok(u64::from_be_bytes(self.array()?)),
            b => self.int_signed(b),
        }
    }

    /// A signed integer encoding, accepted when the value is not negative.
    fn int_signed(&mut self, b: u8) -> Result<u64, Malformed> {
        match b {
            0xd0..=0xd3 => {
                let n = 1usize << (b - 0xd0);
                let raw = self.be(n)?;
                let shift = 64 - 8 * n as u32;
                let v = ((raw << shift) as i64) >> shift;
                u64::try_from(v).map_err(|_| bad!("expected a non-negative integer"))
            }
            _ => Err(bad!("expected an integer")),
        }
    }

    /// Reads an integer that must fit in a `u32`.
    #[inline(always)]
    pub fn u32(&mut self) -> Result<u32, Malformed> {
        u32::try_from(self.uint()?).map_err(|_| bad!("integer out of range"))
    }

    /// Reads an integer that must fit in a `u16`.
    #[inline(always)]
    pub fn u16(&mut self) -> Result<u16, Malformed> {
        u16::try_from(self.uint()?).map_err(|_| bad!("integer out of range"))
    }

    /// Reads nil as `None`, or an integer as `Some`.
    #[inline(always)]
    pub fn opt_uint(&mut self) -> Result<Option<u64>, Malformed> {
        match self.byte()? {
            0xc0 => Ok(None),
            b @ 0x00..=0x7f => Ok(Some(b as u64)),
            b => self.uint_long(b).map(Some),
        }
    }

    /// Reads a boolean.
    #[inline]
    pub fn bool(&mut self) -> Result<bool, Malformed> {
        match self.byte()? {
            0xc2 => Ok(false),
            0xc3 => Ok(true),
            _ => Err(bad!("expected a boolean")),
        }
    }

    /// Reads a UTF-8 string, borrowed from the envelope.
    #[inline(always)]
    pub fn str(&mut self) -> Result<&'a str, Malformed> {
        let len = match self.byte()? {
            b @ 0xa0..=0xbf => (b & 0x1f) as usize,
            b => self.str_len_long(b)?,
        };
        let raw = self.take(len)?;
        // Names are ASCII in practice; checking that word by word is
        // several times cheaper than full UTF-8 validation of a short string.
        if raw.is_empty() || raw.is_ascii() {
            // SAFETY: every ASCII byte sequence is valid UTF-8.
            return Ok(unsafe { std::str::from_utf8_unchecked(raw) });
        }
        std::str::from_utf8(raw).map_err(|_| bad!("string is not valid UTF-8"))
    }

    fn str_len_long(&mut self, b: u8) -> Result<usize, Malformed> {
        match b {
            0xd9 => Ok(self.be(1)? as usize),
            0xda => Ok(self.be(2)? as usize),
            0xdb => Ok(self.be(4)? as usize),
            _ => Err(bad!("expected a string")),
        }
    }

    /// Skips one complete value of any type.
    pub fn skip(&mut self) -> Result<(), Malformed> {
        self.skip_depth(0)
    }

    fn skip_depth(&mut self, depth: u32) -> Result<(), Malformed> {
        if depth > MAX_SKIP_DEPTH {
            return Err(bad!("envelope nested too deeply"));
        }
        for _ in 0..self.header()? {
            self.skip_depth(depth + 1)?;
        }
        Ok(())
    }

    /// Skips one complete value of any type and any depth (no recursion),
    /// counting the values in it: itself, the elements of its arrays, the
    /// keys and values of its maps. Fails past `most` values, before the
    /// rest is read: a caller about to build the value in memory (each
    /// taking tens of bytes however short its encoding) can refuse one
    /// that would not fit.
    pub fn count_values(&mut self, most: u64) -> Result<u64, Malformed> {
        let (mut left, mut seen) = (1u64, 0u64);
        while left > 0 {
            left -= 1;
            seen += 1;
            if seen > most {
                return Err(bad!("more values than allowed"));
            }
            left += self.header()?;
        }
        Ok(seen)
    }

    /// Reads a value's header and the bytes of a scalar; returns how many
    /// values (elements, keys and values) follow it as its children.
    fn header(&mut self) -> Result<u64, Malformed> {
        let b = self.byte()?;
        let (skip_bytes, children): (usize, u64) = match b {
            0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => (0, 0),
            0x80..=0x8f => (0, 2 * (b & 0x0f) as u64),
            0x90..=0x9f => (0, (b & 0x0f) as u64),
            0xa0..=0xbf => ((b & 0x1f) as usize, 0),
            0xc1 => return Err(bad!("invalid MessagePack byte 0xc1")),
            0xc4 | 0xd9 => (self.be(1)? as usize, 0),
            0xc5 | 0xda => (self.be(2)? as usize, 0),
            0xc6 | 0xdb => (self.be(4)? as usize, 0),
            0xc7 => (self.be(1)? as usize + 1, 0),
            0xc8 => (self.be(2)? as usize + 1, 0),
            0xc9 => (self.be(4)? as usize + 1, 0),
            0xca => (4, 0),
            0xcb => (8, 0),
            0xcc | 0xd0 => (1, 0),
            0xcd | 0xd1 => (2, 0),
            0xce | 0xd2 => (4, 0),
            0xcf | 0xd3 => (8, 0),
            0xd4 => (2, 0),
            0xd5 => (3, 0),
            0xd6 => (5, 0),
            0xd7 => (9, 0),
            0xd8 => (17, 0),
            0xdc => (0, self.be(2)?),
            0xdd => (0, self.be(4)?),
            0xde => (0, 2 * self.be(2)?),
            0xdf => (0, 2 * self.be(4)?),
        };
        self.take(skip_bytes)?;
        // Every child needs at least one byte: reject absurd counts early.
        if children > self.remaining() as u64 {
            return Err(bad!("truncated envelope"));
        }
        Ok(children)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_counted_at_any_depth_and_bounded() {
        // [1, {"a": [nil]}, "x"]: the array, 1, the map, "a", [nil], nil, "x".
        let v = [0x93, 0x01, 0x81, 0xa1, b'a', 0x91, 0xc0, 0xa1, b'x'];
        assert_eq!(Reader::new(&v).count_values(100), Ok(7));
        assert!(Reader::new(&v).count_values(6).is_err());
        // 100,000 nested arrays: no recursion.
        let mut deep = vec![0x91; 100_000];
        deep.push(0xc0);
        assert_eq!(Reader::new(&deep).count_values(u64::MAX), Ok(100_001));
        // Truncated or invalid.
        assert!(Reader::new(&[0x92, 0x01]).count_values(100).is_err());
        assert!(Reader::new(&[0xc1]).count_values(100).is_err());
    }

    fn read_str(s: &[u8]) -> Result<String, Malformed> {
        let mut buf = vec![0xa0 | s.len() as u8];
        buf.extend_from_slice(s);
        Reader::new(&buf).str().map(str::to_owned)
    }

    #[test]
    fn strings_ascii_multibyte_and_invalid() {
        assert_eq!(read_str(b"echo").ok().as_deref(), Some("echo"));
        assert_eq!(read_str(b"").ok().as_deref(), Some(""));
        // Not ASCII, valid UTF-8: takes the full validation path.
        let s = "gr\u{fc}\u{df}e \u{1f600}";
        assert_eq!(read_str(s.as_bytes()).ok().as_deref(), Some(s));
        for bad in [
            &[0xff, 0xfe][..],
            b"ab\xc3",
            b"\xed\xa0\x80",
            b"abcdefgh\x80",
        ] {
            assert!(read_str(bad).is_err(), "{bad:x?}");
        }
    }
}
