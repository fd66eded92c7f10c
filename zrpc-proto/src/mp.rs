//! A minimal MessagePack reader and writer for envelopes.
//!
//! Envelopes use only a handful of MessagePack types (arrays, unsigned
//! integers, strings, booleans, nil). Writing them by hand keeps the hot path
//! free of allocation and of generic serde machinery, and makes the decoder
//! small enough to fuzz exhaustively. Payloads never pass through here.

use bytes::BufMut;

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

/// Writes an array header for `len` elements.
pub fn write_array_len(out: &mut impl BufMut, len: u32) {
    if len < 16 {
        out.put_u8(0x90 | len as u8);
    } else if len <= u16::MAX as u32 {
        out.put_u8(0xdc);
        out.put_u16(len as u16);
    } else {
        out.put_u8(0xdd);
        out.put_u32(len);
    }
}

/// Writes an unsigned integer in its most compact form.
pub fn write_uint(out: &mut impl BufMut, v: u64) {
    if v < 128 {
        out.put_u8(v as u8);
    } else if v <= u8::MAX as u64 {
        out.put_u8(0xcc);
        out.put_u8(v as u8);
    } else if v <= u16::MAX as u64 {
        out.put_u8(0xcd);
        out.put_u16(v as u16);
    } else if v <= u32::MAX as u64 {
        out.put_u8(0xce);
        out.put_u32(v as u32);
    } else {
        out.put_u8(0xcf);
        out.put_u64(v);
    }
}

/// Writes a UTF-8 string.
pub fn write_str(out: &mut impl BufMut, s: &str) {
    let len = s.len();
    if len < 32 {
        out.put_u8(0xa0 | len as u8);
    } else if len <= u8::MAX as usize {
        out.put_u8(0xd9);
        out.put_u8(len as u8);
    } else if len <= u16::MAX as usize {
        out.put_u8(0xda);
        out.put_u16(len as u16);
    } else {
        out.put_u8(0xdb);
        out.put_u32(len as u32);
    }
    out.put_slice(s.as_bytes());
}

/// Writes nil.
pub fn write_nil(out: &mut impl BufMut) {
    out.put_u8(0xc0);
}

/// Writes a boolean.
pub fn write_bool(out: &mut impl BufMut, v: bool) {
    out.put_u8(if v { 0xc3 } else { 0xc2 });
}

/// Writes `Some(v)` as an unsigned integer and `None` as nil.
pub fn write_opt_uint(out: &mut impl BufMut, v: Option<u64>) {
    match v {
        Some(v) => write_uint(out, v),
        None => write_nil(out),
    }
}

/// A cursor over an envelope's bytes.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// Starts reading at the beginning of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    /// Bytes not yet consumed.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn byte(&mut self) -> Result<u8, Malformed> {
        let b = *self.buf.get(self.pos).ok_or(bad!("truncated envelope"))?;
        self.pos += 1;
        Ok(b)
    }

    fn peek(&self) -> Result<u8, Malformed> {
        self.buf
            .get(self.pos)
            .copied()
            .ok_or(bad!("truncated envelope"))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or(bad!("truncated envelope"))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn be(&mut self, n: usize) -> Result<u64, Malformed> {
        let s = self.take(n)?;
        Ok(s.iter().fold(0u64, |acc, &b| (acc << 8) | b as u64))
    }

    /// Reads an array header and returns its length.
    pub fn array_len(&mut self) -> Result<u32, Malformed> {
        match self.byte()? {
            b @ 0x90..=0x9f => Ok((b & 0x0f) as u32),
            0xdc => Ok(self.be(2)? as u32),
            0xdd => Ok(self.be(4)? as u32),
            _ => Err(bad!("envelope is not a MessagePack array")),
        }
    }

    /// Reads a non-negative integer (any MessagePack integer encoding).
    pub fn uint(&mut self) -> Result<u64, Malformed> {
        let b = self.byte()?;
        match b {
            0x00..=0x7f => Ok(b as u64),
            0xcc => self.be(1),
            0xcd => self.be(2),
            0xce => self.be(4),
            0xcf => self.be(8),
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
    pub fn u32(&mut self) -> Result<u32, Malformed> {
        u32::try_from(self.uint()?).map_err(|_| bad!("integer out of range"))
    }

    /// Reads an integer that must fit in a `u16`.
    pub fn u16(&mut self) -> Result<u16, Malformed> {
        u16::try_from(self.uint()?).map_err(|_| bad!("integer out of range"))
    }

    /// Reads nil as `None`, or an integer as `Some`.
    pub fn opt_uint(&mut self) -> Result<Option<u64>, Malformed> {
        if self.peek()? == 0xc0 {
            self.pos += 1;
            Ok(None)
        } else {
            self.uint().map(Some)
        }
    }

    /// Reads a boolean.
    pub fn bool(&mut self) -> Result<bool, Malformed> {
        match self.byte()? {
            0xc2 => Ok(false),
            0xc3 => Ok(true),
            _ => Err(bad!("expected a boolean")),
        }
    }

    /// Reads a UTF-8 string, borrowed from the envelope.
    pub fn str(&mut self) -> Result<&'a str, Malformed> {
        let b = self.byte()?;
        let len = match b {
            0xa0..=0xbf => (b & 0x1f) as usize,
            0xd9 => self.be(1)? as usize,
            0xda => self.be(2)? as usize,
            0xdb => self.be(4)? as usize,
            _ => return Err(bad!("expected a string")),
        };
        let raw = self.take(len)?;
        // Names are ASCII in practice; checking that word by word is
        // several times cheaper than full UTF-8 validation of a short string.
        if raw.is_ascii() {
            // SAFETY: every ASCII byte sequence is valid UTF-8.
            return Ok(unsafe { std::str::from_utf8_unchecked(raw) });
        }
        std::str::from_utf8(raw).map_err(|_| bad!("string is not valid UTF-8"))
    }

    /// Skips one complete value of any type.
    pub fn skip(&mut self) -> Result<(), Malformed> {
        self.skip_depth(0)
    }

    fn skip_depth(&mut self, depth: u32) -> Result<(), Malformed> {
        if depth > MAX_SKIP_DEPTH {
            return Err(bad!("envelope nested too deeply"));
        }
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
        for _ in 0..children {
            self.skip_depth(depth + 1)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
