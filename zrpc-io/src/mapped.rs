//! Payloads held in sealed memfds, as [`Bytes`] that remember their
//! descriptor: the way a large payload travels more than once without
//! being copied.
//!
//! [`SealedFd::into_bytes`] maps a sealed memfd (received, or made by
//! [`crate::spill`]) read-only and registers the mapping here for as long
//! as it lives. Whoever later holds bytes at exactly that address range
//! holds exactly the descriptor's content ([`sealed_whole`]): the mapping
//! is read-only and the memfd is sealed against writes and resizing, so
//! the bytes there can never differ from the descriptor's, and while the
//! mapping is alive no other memory can occupy its addresses. A payload
//! that is a whole mapping is sent again as the same descriptor (a service
//! echoing its request's payload, a client resubmitting or forwarding one)
//! instead of being copied into a new memfd; bytes that lie inside a
//! mapping are found with [`containing`] (an encoder seeing a slice of a
//! received payload, see [`crate::spill::PayloadWriter`]).

use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;

use crate::fdpass::SealedFd;

/// A live read-only mapping of a sealed memfd, registered in [`LIVE`].
struct Mapping {
    map: memmap2::Mmap,
    fd: Arc<SealedFd>,
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // Runs before `map` is unmapped: the address range leaves the
        // registry before anything else can be mapped there.
        let me: *const Mapping = self;
        let mut live = lock();
        if let Some(i) = live.iter().position(|e| std::ptr::eq(e.map.as_ptr(), me)) {
            live.swap_remove(i);
        }
    }
}

/// The owner of the [`Bytes`] handed out for a mapping.
struct Owner(Arc<Mapping>);

impl AsRef<[u8]> for Owner {
    fn as_ref(&self) -> &[u8] {
        &self.0.map
    }
}

/// One registered mapping: its address range and a weak reference (a
/// mapping being dropped no longer upgrades, and is ignored).
struct Entry {
    base: usize,
    len: usize,
    map: Weak<Mapping>,
}

/// The live mappings of this process (a few: one per payload in use).
static LIVE: Mutex<Vec<Entry>> = Mutex::new(Vec::new());

fn lock() -> std::sync::MutexGuard<'static, Vec<Entry>> {
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

/// The live mapping whose range holds `bytes` entirely.
fn find(bytes: &[u8]) -> Option<Arc<Mapping>> {
    let (start, len) = (bytes.as_ptr() as usize, bytes.len());
    let end = start.checked_add(len)?;
    lock()
        .iter()
        .filter(|e| e.base <= start && end <= e.base + e.len)
        .find_map(|e| e.map.upgrade())
}

impl SealedFd {
    /// The payload through a read-only shared mapping, as [`Bytes`] that
    /// keep the mapping (and the descriptor) alive and are recognised by
    /// [`sealed_whole`] and [`containing`]. Not prefaulted: pages are
    /// mapped as they are read, and a payload passed on without being read
    /// (an echo) costs no page faults at all.
    pub fn into_bytes(self) -> io::Result<Bytes> {
        // SAFETY: as in `SealedFd::map`: read-only, and the memfd carries
        // F_SEAL_WRITE, F_SEAL_SHRINK and F_SEAL_SEAL, so the mapped bytes
        // never change and never fault (SIGBUS) for `len` bytes.
        let map = unsafe {
            memmap2::MmapOptions::new()
                .len(self.len())
                .map(self.as_raw_fd())?
        };
        let mapping = Arc::new(Mapping {
            map,
            fd: Arc::new(self),
        });
        lock().push(Entry {
            base: mapping.map.as_ptr() as usize,
            len: mapping.map.len(),
            map: Arc::downgrade(&mapping),
        });
        Ok(Bytes::from_owner(Owner(mapping)))
    }
}

/// The sealed memfd whose whole content `bytes` are, if they are exactly a
/// live mapping made by [`SealedFd::into_bytes`] (same start, same length).
pub fn sealed_whole(bytes: &[u8]) -> Option<Arc<SealedFd>> {
    let m = find(bytes)?;
    (m.map.as_ptr() == bytes.as_ptr() && m.map.len() == bytes.len()).then(|| m.fd.clone())
}

/// If `bytes` lie inside a live mapping made by [`SealedFd::into_bytes`]:
/// the whole mapping, and the offset of `bytes` in it.
pub fn containing(bytes: &[u8]) -> Option<(Bytes, usize)> {
    let m = find(bytes)?;
    let off = bytes.as_ptr() as usize - m.map.as_ptr() as usize;
    Some((Bytes::from_owner(Owner(m)), off))
}

/// Number of live registered mappings (for tests).
pub fn live() -> usize {
    lock().iter().filter(|e| e.map.strong_count() > 0).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_whole_mapping_is_recognised_and_a_part_or_a_copy_is_not() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 241) as u8).collect();
        let b = SealedFd::create(&data)
            .expect("create")
            .into_bytes()
            .expect("map");
        assert_eq!(&b[..], &data[..]);
        let fd = sealed_whole(&b).expect("the whole mapping");
        assert_eq!(fd.len(), data.len());
        assert!(sealed_whole(&b[1..]).is_none(), "not from its start");
        assert!(sealed_whole(&b[..b.len() - 1]).is_none(), "not to its end");
        assert!(sealed_whole(&data).is_none(), "a copy");
        let (whole, off) = containing(&b[10..20]).expect("inside");
        assert_eq!(
            (whole.as_ptr(), whole.len(), off),
            (b.as_ptr(), b.len(), 10)
        );
        assert!(containing(&data[..]).is_none());
        // Gone with the last view: the range leaves the registry.
        let base = b.as_ptr() as usize;
        let half = b.slice(..10);
        drop((b, whole));
        assert!(lock().iter().any(|e| e.base == base), "kept by any view");
        drop(half);
        assert!(!lock().iter().any(|e| e.base == base));
        // The descriptor outlives its mapping.
        assert_eq!(&fd.map().expect("map again")[..], &data[..]);
    }
}
