//! Encoding a payload with as few copies as its size allows.
//!
//! [`PayloadWriter`] is the `io::Write` the MessagePack encoders of the
//! client and the service write a payload into. A small payload stays in
//! the caller's buffer. Two things happen to large ones:
//!
//! - **A received payload passed on.** When the bytes written so far are
//!   exactly the start of a live mapping of a sealed memfd
//!   ([`crate::mapped`]) and a large write is the rest of it to its end
//!   (a service returning the `Blob` it was given: the `bin` header it
//!   writes is the request's own), the payload *is* that descriptor's
//!   content: nothing is copied, and [`Encoded::Mapped`] hands out the
//!   mapping (sent again as the same descriptor). The comparison is on
//!   addresses and on the few header bytes, never a guess: any further
//!   write turns the payload back into ordinary bytes.
//! - **Spilling** (with a threshold, on connections that pass payloads in
//!   descriptors): once the payload reaches the threshold, what was
//!   buffered and the large slice are written into a new memfd with one
//!   `writev` (the bytes are copied once, user memory to the memfd's
//!   pages, instead of into a buffer and then into the memfd); later
//!   writes are buffered in chunks and appended. [`Encoded::Mapped`] then
//!   hands out the sealed memfd mapped read-only, which the sender passes
//!   as is and keeps (immutable) for a resubmission.

use std::fs::File;
use std::io::{self, IoSlice, Write};
#[cfg(test)]
use std::os::fd::AsFd;

use bytes::{Bytes, BytesMut};

use crate::fdpass::SealedFd;
use crate::prefill::take;

/// Writes shorter than this are not looked up in [`crate::mapped`].
const LOOKUP_MIN: usize = 16 * 1024;

/// Bytes buffered after spilling before they are appended to the memfd.
const SPILL_CHUNK: usize = 64 * 1024;

/// An encoded payload, as [`PayloadWriter::finish`] leaves it.
#[derive(Debug)]
pub enum Encoded {
    /// In the caller's buffer, after where the writer started.
    Inline,
    /// In a sealed memfd, mapped ([`SealedFd::into_bytes`]); nothing of it
    /// is left in the caller's buffer.
    Mapped(Bytes),
}

/// An `io::Write` for one payload, appended to a caller's buffer (see the
/// module documentation).
pub struct PayloadWriter<'a> {
    buf: &'a mut BytesMut,
    /// Where the payload starts in `buf`.
    start: usize,
    /// Spill into a memfd once the payload reaches this many bytes.
    spill_at: Option<usize>,
    /// The payload so far ends with `.0[.1..]`, not copied: `buf[start..]`
    /// is `.0[...1]`, and `.0` a whole mapped sealed memfd.
    whole: Option<(Bytes, usize)>,
    /// Spilled: the payload so far is this memfd's content followed by
    /// `buf[start..]`.
    file: Option<File>,
    /// Bytes allocated ahead in `file` ([`crate::prefill`]).
    cap: usize,
    /// Payload bytes written so far.
    len: usize,
}

impl<'a> PayloadWriter<'a> {
    /// A writer appending a payload to `buf`; with `spill_at`, one that
    /// reaches that many bytes goes into a memfd instead.
    pub fn new(buf: &'a mut BytesMut, spill_at: Option<usize>) -> PayloadWriter<'a> {
        PayloadWriter {
            start: buf.len(),
            buf,
            spill_at,
            whole: None,
            file: None,
            cap: 0,
            len: 0,
        }
    }

    /// Payload bytes written so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Ends the payload: see [`Encoded`].
    pub fn finish(mut self) -> io::Result<Encoded> {
        if let Some((whole, _)) = self.whole.take() {
            self.buf.truncate(self.start);
            return Ok(Encoded::Mapped(whole));
        }
        let Some(mut file) = self.file.take() else {
            return Ok(Encoded::Inline);
        };
        file.write_all(&self.buf[self.start..])?;
        self.buf.truncate(self.start);
        SealedFd::seal(file, self.len, self.cap)?
            .into_bytes()
            .map(Encoded::Mapped)
    }

    /// Whether `data`, written now, completes the payload as exactly a
    /// whole mapped sealed memfd (see the module documentation).
    fn completes_mapping(&self, data: &[u8]) -> Option<Bytes> {
        if self.file.is_some() || data.len() < LOOKUP_MIN {
            return None;
        }
        let (whole, off) = crate::mapped::containing(data)?;
        let head = &self.buf[self.start..];
        (off == head.len() && off + data.len() == whole.len() && whole[..off] == *head)
            .then_some(whole)
    }

    /// Appends `data` (buffered, or to the memfd).
    fn put(&mut self, data: &[u8]) -> io::Result<()> {
        let buffered = self.buf.len() - self.start;
        if self.file.is_none() {
            match self.spill_at {
                Some(min) if self.len + data.len() >= min => match take(self.len + data.len()) {
                    Ok((f, cap)) => (self.file, self.cap) = (Some(f), cap),
                    Err(e) => {
                        // Out of descriptors or memory: inline, as for a
                        // peer without descriptors.
                        tracing::debug!(error = %e, "zrpc: cannot create a memfd; the payload stays inline");
                        self.spill_at = None;
                        return self.put(data);
                    }
                },
                _ => {
                    self.buf.extend_from_slice(data);
                    self.len += data.len();
                    return Ok(());
                }
            }
        }
        if buffered + data.len() < SPILL_CHUNK {
            self.buf.extend_from_slice(data);
        } else if let Some(file) = &mut self.file {
            write_both(file, &self.buf[self.start..], data)?;
            self.buf.truncate(self.start);
        }
        self.len += data.len();
        Ok(())
    }
}

/// Writes `a` then `b` to `file`, vectored (one `writev` unless it is
/// short).
fn write_both(file: &mut File, a: &[u8], b: &[u8]) -> io::Result<()> {
    let mut parts = [IoSlice::new(a), IoSlice::new(b)];
    let mut parts = &mut parts[..];
    while !parts.is_empty() {
        match file.write_vectored(parts) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut parts, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl Write for PayloadWriter<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if let Some((whole, off)) = self.whole.take() {
            // More after a mapping's end: the payload is not that memfd;
            // its bytes are copied after all.
            self.len = off;
            self.put(&whole[off..])?;
        } else if let Some(whole) = self.completes_mapping(data) {
            self.whole = Some((whole, self.len));
            self.len += data.len();
            return Ok(data.len());
        }
        self.put(data)?;
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u8) -> Vec<u8> {
        (0..n).map(|i| (i % 251) as u8 ^ seed).collect()
    }

    /// Writes `parts` through a writer over a buffer holding `b"head"`;
    /// returns the payload and whether it was mapped.
    fn encode(parts: &[&[u8]], spill_at: Option<usize>) -> (Vec<u8>, Option<Bytes>) {
        let mut buf = BytesMut::from(&b"head"[..]);
        let mut w = PayloadWriter::new(&mut buf, spill_at);
        for p in parts {
            w.write_all(p).expect("write");
        }
        let total = w.len();
        let r = w.finish().expect("finish");
        match r {
            Encoded::Inline => {
                assert_eq!(&buf[..4], b"head");
                assert_eq!(buf.len() - 4, total);
                (buf[4..].to_vec(), None)
            }
            Encoded::Mapped(m) => {
                assert_eq!(
                    &buf[..],
                    b"head",
                    "nothing of a mapped payload is left behind"
                );
                assert_eq!(m.len(), total);
                (m.to_vec(), Some(m))
            }
        }
    }

    #[test]
    fn small_payloads_stay_in_the_buffer_and_large_ones_spill_sealed() {
        let big = data(300_000, 1);
        let (out, mapped) = encode(&[b"\xc6", &big[..10], &big[10..]], None);
        assert_eq!(out, [&b"\xc6"[..], &big].concat());
        assert!(mapped.is_none(), "no threshold: inline");
        let (out, mapped) = encode(&[b"\xc6", &big[..10], &big[10..]], Some(1 << 20));
        assert_eq!(out, [&b"\xc6"[..], &big].concat());
        assert!(mapped.is_none(), "below the threshold");
        // Many small writes past the threshold, then a large one, then
        // small ones again: all in the memfd, in order.
        let small: Vec<&[u8]> = big.chunks(1000).collect();
        let mut parts = small.clone();
        parts.push(&big);
        parts.extend(small.iter().take(5));
        let expect: Vec<u8> = parts.concat();
        let (out, mapped) = encode(&parts, Some(100_000));
        assert_eq!(out, expect);
        let m = mapped.expect("spilled");
        let fd = crate::mapped::sealed_whole(&m).expect("a registered sealed memfd");
        assert_eq!(fd.len(), expect.len());
        let v = SealedFd::verify(fd.as_fd().try_clone_to_owned().expect("dup"), 1 << 24);
        assert_eq!(v.expect("sealed").len(), expect.len());
    }

    #[test]
    fn a_payload_that_is_a_whole_received_memfd_is_not_copied() {
        let content = [&b"\xc6\x00\x04\x93\xe0"[..], &data(300_000, 7)].concat();
        let received = SealedFd::create(&content)
            .expect("create")
            .into_bytes()
            .expect("map");
        let body = received.slice(5..);
        // The header the encoder writes again, then the received bytes.
        let (out, mapped) = encode(&[&content[..1], &content[1..5], &body], None);
        let m = mapped.expect("the same mapping");
        assert_eq!((m.as_ptr(), m.len()), (received.as_ptr(), received.len()));
        assert_eq!(out, content);
        // A different header: the same bytes, copied.
        let (out, mapped) = encode(&[b"\xc6\x00\x04\x93\xe1", &body], None);
        assert!(mapped.is_none());
        assert_eq!(out, [&b"\xc6\x00\x04\x93\xe1"[..], &body].concat());
        // Something after it: copied, in order (spilled into a new memfd).
        let (out, mapped) = encode(&[&content[..5], &body, b"x"], Some(100_000));
        let m = mapped.expect("spilled");
        assert_ne!(m.as_ptr(), received.as_ptr());
        assert_eq!(out, [&content[..], b"x"].concat());
        // Not to its end: copied.
        let (out, mapped) = encode(&[&content[..5], &body[..body.len() - 1]], None);
        assert!(mapped.is_none());
        assert_eq!(out, content[..content.len() - 1]);
    }
}
