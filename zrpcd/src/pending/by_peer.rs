//! Each connection's pending calls, as two intrusive lists threaded
//! through the table's slots: the calls it made (as a caller) and the calls
//! delivered to it (as a service). A departing connection's calls are
//! found by walking its own lists, at a cost proportional to its calls, not
//! to everyone's (docs/security.md).
//!
//! The links live in the slots ([`Links`], 16 bytes per call); the heads
//! live here, one entry per connection that ever had a call, dropped when
//! the connection leaves ([`PeerLists::forget`]).

use rustc_hash::FxHashMap;

use crate::peers::PeerId;

/// No slot.
const NONE: u32 = u32::MAX;

/// Which of a connection's two lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum List {
    /// The calls the connection made.
    Made = 0,
    /// The calls delivered to the connection.
    Delivered = 1,
}

/// A call's neighbours in its two lists (by slot index, [`NONE`] for none).
#[derive(Debug, Clone, Copy)]
pub(super) struct Links {
    prev: [u32; 2],
    next: [u32; 2],
}

impl Default for Links {
    fn default() -> Self {
        Links {
            prev: [NONE; 2],
            next: [NONE; 2],
        }
    }
}

/// Where the links of each slot are (the table's slab).
pub(super) trait LinkStore {
    /// The links of slot `idx` (a slot that exists).
    fn links(&self, idx: u32) -> &Links;
    /// The links of slot `idx`, to change.
    fn links_mut(&mut self, idx: u32) -> &mut Links;
}

/// The heads of every connection's two lists.
#[derive(Debug, Default)]
pub(super) struct PeerLists {
    heads: FxHashMap<PeerId, [u32; 2]>,
}

impl PeerLists {
    /// Puts slot `idx` (in no list of this kind) at the head of `peer`'s
    /// `list`.
    pub(super) fn push(&mut self, s: &mut impl LinkStore, list: List, peer: PeerId, idx: u32) {
        let l = list as usize;
        let head = &mut self.heads.entry(peer).or_insert([NONE; 2])[l];
        let old = std::mem::replace(head, idx);
        let me = s.links_mut(idx);
        me.prev[l] = NONE;
        me.next[l] = old;
        if old != NONE {
            s.links_mut(old).prev[l] = idx;
        }
    }

    /// Takes slot `idx` out of `peer`'s `list` (it must be in it).
    pub(super) fn unlink(&mut self, s: &mut impl LinkStore, list: List, peer: PeerId, idx: u32) {
        let l = list as usize;
        let me = s.links_mut(idx);
        let (prev, next) = (me.prev[l], me.next[l]);
        me.prev[l] = NONE;
        me.next[l] = NONE;
        if next != NONE {
            s.links_mut(next).prev[l] = prev;
        }
        if prev != NONE {
            s.links_mut(prev).next[l] = next;
        } else if let Some(h) = self.heads.get_mut(&peer) {
            debug_assert_eq!(
                h[l], idx,
                "peer {peer}: a call unlinked from a list it is not in"
            );
            h[l] = next;
        }
    }

    /// The slots in `peer`'s `list`, oldest first.
    pub(super) fn slots(&self, s: &impl LinkStore, list: List, peer: PeerId) -> Vec<u32> {
        let l = list as usize;
        let mut out = Vec::new();
        let mut at = self.heads.get(&peer).map_or(NONE, |h| h[l]);
        while at != NONE {
            out.push(at);
            at = s.links(at).next[l];
        }
        out.reverse();
        out
    }

    /// Drops `peer`'s heads (it left, its lists are empty).
    pub(super) fn forget(&mut self, peer: PeerId) {
        let heads = self.heads.remove(&peer);
        debug_assert!(
            heads.is_none_or(|h| h == [NONE; 2]),
            "peer {peer} forgotten with calls in its lists"
        );
    }

    /// Connections with an entry (so tests can check entries do not leak).
    pub(super) fn len(&self) -> usize {
        self.heads.len()
    }
}
