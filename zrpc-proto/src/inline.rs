//! [`InlineBytes`]: a short byte string stored in place.

use std::fmt;
use std::ops::Deref;

/// At most `N` bytes (`N` < 256) stored in place, without an allocation.
///
/// The hot paths keep small copies of frames and payloads (a call's frame
/// for resubmission, a pending call's payload for re-delivery, a cached
/// reply); for the usual sizes this replaces a `malloc` and `free` per call
/// with a copy into memory that is already there.
#[derive(Clone, Copy)]
pub struct InlineBytes<const N: usize> {
    len: u8,
    buf: [u8; N],
}

impl<const N: usize> InlineBytes<N> {
    /// `N` must fit the `u8` length.
    const FITS: () = assert!(N <= u8::MAX as usize, "InlineBytes holds at most 255 bytes");

    /// A copy of `bytes`, or `None` if it is longer than `N`.
    pub fn new(bytes: &[u8]) -> Option<Self> {
        let () = Self::FITS;
        if bytes.len() > N {
            return None;
        }
        let mut buf = [0; N];
        buf[..bytes.len()].copy_from_slice(bytes);
        // `bytes.len() <= N <= 255`.
        Some(InlineBytes {
            len: bytes.len() as u8,
            buf,
        })
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.buf[..usize::from(self.len)]
    }
}

impl<const N: usize> Deref for InlineBytes<N> {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl<const N: usize> fmt::Debug for InlineBytes<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "InlineBytes({} bytes)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::InlineBytes;

    #[test]
    fn holds_up_to_n_bytes() {
        let b = InlineBytes::<4>::new(b"abcd").expect("fits");
        assert_eq!(&*b, b"abcd");
        assert_eq!(InlineBytes::<4>::new(b"").map(|b| b.len()), Some(0));
        assert!(InlineBytes::<4>::new(b"abcde").is_none());
        assert_eq!(std::mem::size_of::<InlineBytes<111>>(), 112);
    }
}
