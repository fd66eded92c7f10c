//! The reply cache: recent outcomes by call identity, so that a call re-sent
//! after a reconnect (of the client, of this service, or a broker restart)
//! is answered again instead of running twice.
//!
//! Every request passes through here (one lookup, one insert, one eviction
//! once the cache is full), so its layout is chosen for that path:
//!
//! - Outcomes live in a ring of slots in insertion order (a `VecDeque`).
//!   The slot an insert writes is the one the eviction just freed, or the
//!   next one, so a full cache walks its memory sequentially instead of
//!   touching a random hash bucket and a random heap block per request.
//! - A small successful reply (at most [`INLINE`] bytes: most replies) is
//!   copied into its slot; the handler's buffer is freed at once, while it is
//!   still in the CPU cache.
//! - The index is a hash table of 4-byte slot numbers (`hashbrown`'s
//!   `HashTable`): ~80 KB for 10,000 entries, small enough to stay in cache.
//!   The per-entry heap blocks and the 1.4 MB `HashMap<CallKey, Entry>` of
//!   the first design cost the echo benchmark about a sixth of its
//!   throughput at 64 calls in flight (docs/performance.md).

use std::collections::VecDeque;
use std::hash::{Hash, Hasher};

use bytes::Bytes;
use hashbrown::HashTable;
use rustc_hash::FxHasher;
use zrpc_proto::{ErrorCode, InlineBytes};

/// What was (or will be) sent in a `Reply`: the return value, or an error
/// code and message.
pub(crate) type Outcome = Result<Bytes, (ErrorCode, String)>;

/// The identity of a call that survives reconnects and re-deliveries:
/// `(caller_instance, caller_call)` from the `Request`.
pub(crate) type CallKey = (u64, u64);

/// Default bound on the number of cached replies.
pub(crate) const DEFAULT_MAX_ENTRIES: usize = 10_000;

/// Default bound on the bytes of cached replies (payloads and error
/// messages).
pub(crate) const DEFAULT_MAX_BYTES: usize = 16 * 1024 * 1024;

/// Successful replies up to this many bytes are stored in their slot (a
/// slot is then 128 bytes).
pub(crate) const INLINE: usize = 102;

/// A cached outcome.
enum Stored {
    /// A small successful reply, copied.
    Inline(InlineBytes<INLINE>),
    /// A larger successful reply, by reference.
    Shared(Bytes),
    /// An error reply.
    Failed(ErrorCode, String),
    /// Superseded by a newer outcome of the same call; waits for eviction.
    Dead,
}

struct Slot {
    key: CallKey,
    /// Hash of (service, method): a re-sent call must address the same
    /// method to be answered from the cache.
    target: u64,
    stored: Stored,
}

impl Slot {
    /// Bytes counted against the byte bound.
    fn cost(&self) -> usize {
        match &self.stored {
            Stored::Inline(b) => b.len(),
            Stored::Shared(p) => p.len(),
            Stored::Failed(_, msg) => msg.len(),
            Stored::Dead => 0,
        }
    }
}

/// A bounded map from call identity to outcome; the oldest entry is evicted
/// first (insertion order).
pub(crate) struct ReplyCache {
    max_entries: usize,
    max_bytes: usize,
    /// Slots in insertion order, oldest first; live and dead ones.
    slots: VecDeque<Slot>,
    /// Sequence number of `slots[0]`; slot `i` has number `first + i`
    /// (wrapping; the ring never holds 2^32 slots).
    first: u32,
    /// Sequence numbers of the live slots, by hash of their key.
    index: HashTable<u32>,
    /// Cost of the live slots.
    bytes: usize,
}

impl ReplyCache {
    pub(crate) fn new(max_entries: usize, max_bytes: usize) -> Self {
        ReplyCache {
            max_entries: max_entries.min(u32::MAX as usize / 2),
            max_bytes,
            slots: VecDeque::new(),
            first: 0,
            index: HashTable::new(),
            bytes: 0,
        }
    }

    /// Whether the cache is in use (both bounds non-zero).
    pub(crate) fn enabled(&self) -> bool {
        self.max_entries > 0 && self.max_bytes > 0
    }

    /// Changes the bounds, evicting as needed.
    pub(crate) fn set_bounds(&mut self, max_entries: usize, max_bytes: usize) {
        self.max_entries = max_entries.min(u32::MAX as usize / 2);
        self.max_bytes = max_bytes;
        if !self.enabled() {
            self.slots = VecDeque::new();
            self.index = HashTable::new();
            self.bytes = 0;
        } else {
            self.evict(None);
            self.slots.shrink_to(self.max_entries);
        }
    }

    /// The key under which a request is cached, if it has an identity (a
    /// caller instance of 0 means none: the broker sends 0 when the caller
    /// is unknown) and the cache is on.
    pub(crate) fn key(&self, caller_instance: u64, caller_call: u64) -> Option<CallKey> {
        (self.enabled() && caller_instance != 0).then_some((caller_instance, caller_call))
    }

    /// Whether [`insert`](Self::insert) copies this outcome into its slot
    /// whatever its ownership (so the caller need not work that out).
    pub(crate) fn stores_inline(outcome: &Outcome) -> bool {
        matches!(outcome, Ok(p) if p.len() <= INLINE)
    }

    /// Position in `slots` of sequence number `seq`.
    fn pos(first: u32, seq: u32) -> usize {
        seq.wrapping_sub(first) as usize
    }

    /// The cached outcome of call `key` if it addressed the same
    /// service and method (a copy: this is the rare path of a re-sent call).
    pub(crate) fn get(&self, key: CallKey, service: &str, method: &str) -> Option<Outcome> {
        let (slots, first) = (&self.slots, self.first);
        let seq = *self
            .index
            .find(hash(key), |&s| slots[Self::pos(first, s)].key == key)?;
        let slot = &slots[Self::pos(first, seq)];
        if slot.target != target(service, method) {
            tracing::warn!(
                caller_instance = key.0,
                caller_call = key.1,
                service,
                method,
                "a call re-uses the identity of an earlier call to another method; running it"
            );
            return None;
        }
        match &slot.stored {
            Stored::Inline(b) => Some(Ok(Bytes::copy_from_slice(b))),
            Stored::Shared(p) => Some(Ok(p.clone())),
            Stored::Failed(code, msg) => Some(Err((*code, msg.clone()))),
            Stored::Dead => None,
        }
    }

    /// Remembers the outcome of call `key`. An outcome larger than the byte
    /// bound is not kept.
    ///
    /// A small successful payload is copied into the cache. A larger one is
    /// kept by reference (no copy) when `owned` says the `Bytes` is the sole
    /// handle to a buffer of its own (e.g. the `Vec` a handler encoded its
    /// return value into); otherwise it may be a view into a larger buffer
    /// the cache must not pin (the read buffer a request arrived in, a
    /// user's shared buffer), and it is copied.
    pub(crate) fn insert(
        &mut self,
        key: CallKey,
        service: &str,
        method: &str,
        outcome: Outcome,
        owned: bool,
    ) {
        if !self.enabled() {
            return;
        }
        let cost = match &outcome {
            Ok(p) => p.len(),
            Err((_, msg)) => msg.len(),
        };
        if cost > self.max_bytes {
            tracing::debug!(
                cost,
                max_bytes = self.max_bytes,
                "reply too large for the reply cache; not cached"
            );
            return;
        }
        let stored = match outcome {
            Ok(p) => match InlineBytes::new(&p) {
                Some(b) => Stored::Inline(b),
                None if !owned => Stored::Shared(Bytes::copy_from_slice(&p)),
                None => Stored::Shared(p),
            },
            Err((code, msg)) => Stored::Failed(code, msg),
        };
        let slot = Slot {
            key,
            target: target(service, method),
            stored,
        };
        debug_assert_eq!(cost, slot.cost());
        let h = hash(key);
        let Self {
            slots,
            first,
            index,
            bytes,
            ..
        } = self;
        if let Ok(old) = index.find_entry(h, |&s| slots[Self::pos(*first, s)].key == key) {
            // The same call again (a re-run after a cache miss): the
            // newest outcome wins and moves to the back.
            let (seq, _) = old.remove();
            let old = &mut slots[Self::pos(*first, seq)];
            *bytes -= old.cost();
            old.stored = Stored::Dead;
        }
        self.evict(Some(cost));
        if self.slots.len() == self.slots.capacity() {
            // Grow by doubling up to the entry bound, not beyond it.
            let len = self.slots.len();
            self.slots
                .reserve_exact(len.max(8).min(self.max_entries.saturating_sub(len).max(1)));
        }
        self.slots.push_back(slot);
        self.bytes += cost;
        let seq = self.first.wrapping_add((self.slots.len() - 1) as u32);
        let (slots, first) = (&self.slots, self.first);
        self.index
            .insert_unique(h, seq, |&s| hash(slots[Self::pos(first, s)].key));
    }

    /// Evicts the oldest entries until one more entry of `incoming` bytes
    /// fits (`None`: until the bounds hold).
    fn evict(&mut self, incoming: Option<usize>) {
        let (extra, cost) = incoming.map_or((0, 0), |c| (1, c));
        while self.slots.len() + extra > self.max_entries || self.bytes + cost > self.max_bytes {
            let Some(slot) = self.slots.pop_front() else {
                break;
            };
            let seq = self.first;
            self.first = self.first.wrapping_add(1);
            if matches!(slot.stored, Stored::Dead) {
                continue;
            }
            self.bytes -= slot.cost();
            if let Ok(e) = self.index.find_entry(hash(slot.key), |&s| s == seq) {
                e.remove();
            }
        }
    }

    /// Number of cached replies.
    pub(crate) fn len(&self) -> usize {
        self.index.len()
    }

    /// Bytes of cached replies.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }
}

fn hash(key: CallKey) -> u64 {
    let mut h = FxHasher::default();
    key.hash(&mut h);
    h.finish()
}

fn target(service: &str, method: &str) -> u64 {
    let mut h = FxHasher::default();
    service.hash(&mut h);
    method.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(n: usize) -> Outcome {
        Ok(Bytes::from(vec![0u8; n]))
    }

    #[test]
    fn a_slot_is_two_cache_lines() {
        assert!(
            std::mem::size_of::<Slot>() <= 128,
            "{}",
            std::mem::size_of::<Slot>()
        );
    }

    /// The ring and its index against a plain model (a list in insertion
    /// order), through sequence numbers that wrap, re-inserted keys, small
    /// and large payloads, errors and both bounds.
    #[test]
    fn matches_a_model_through_wrapping_sequence_numbers() {
        let mut rng = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        for (max_entries, max_bytes) in [(1, 1000), (7, 300), (50, 100_000), (64, 2_000)] {
            let mut c = ReplyCache::new(max_entries, max_bytes);
            c.first = u32::MAX - 20;
            // (key, outcome, cost); `None` once superseded.
            let mut model: VecDeque<(CallKey, Option<Outcome>, usize)> = VecDeque::new();
            for _ in 0..3_000 {
                let key = (1 + next(2), next(40));
                let outcome = match next(10) {
                    0 => Err((ErrorCode::Remote, "e".repeat(next(30) as usize))),
                    1 => ok(INLINE + 1 + next(200) as usize),
                    _ => ok(next(INLINE as u64 + 1) as usize),
                };
                let cost = match &outcome {
                    Ok(p) => p.len(),
                    Err((_, m)) => m.len(),
                };
                c.insert(key, "s", "m", outcome.clone(), next(2) == 0);
                if cost <= max_bytes {
                    for e in model.iter_mut().filter(|e| e.0 == key) {
                        e.1 = None;
                    }
                    let live = |m: &VecDeque<(CallKey, Option<Outcome>, usize)>| {
                        m.iter()
                            .filter(|e| e.1.is_some())
                            .map(|e| e.2)
                            .sum::<usize>()
                    };
                    while model.len() + 1 > max_entries || live(&model) + cost > max_bytes {
                        model.pop_front();
                    }
                    model.push_back((key, Some(outcome), cost));
                }
                let live: Vec<_> = model.iter().filter(|e| e.1.is_some()).collect();
                assert_eq!(
                    c.len(),
                    live.len(),
                    "bounds {max_entries} {max_bytes} key {key:?} cost {cost} slots {}",
                    c.slots.len()
                );
                assert_eq!(c.bytes(), live.iter().map(|e| e.2).sum::<usize>());
                for k in (1..3).flat_map(|i| (0..40).map(move |j| (i, j))) {
                    let want = live.iter().find(|e| e.0 == k).and_then(|e| e.1.clone());
                    assert_eq!(c.get(k, "s", "m"), want, "key {k:?}");
                }
            }
        }
    }

    #[test]
    fn evicts_oldest_by_count() {
        let mut c = ReplyCache::new(2, 1000);
        c.insert((1, 1), "s", "m", ok(1), true);
        c.insert((1, 2), "s", "m", ok(1), true);
        c.insert((1, 3), "s", "m", ok(1), true);
        assert!(c.get((1, 1), "s", "m").is_none());
        assert!(c.get((1, 2), "s", "m").is_some());
        assert!(c.get((1, 3), "s", "m").is_some());
        assert_eq!((c.len(), c.bytes()), (2, 2));
    }

    #[test]
    fn evicts_oldest_by_bytes() {
        let mut c = ReplyCache::new(100, 10);
        c.insert((1, 1), "s", "m", ok(4), true);
        c.insert((1, 2), "s", "m", ok(4), true);
        c.insert((1, 3), "s", "m", ok(4), true);
        assert!(c.get((1, 1), "s", "m").is_none());
        assert_eq!((c.len(), c.bytes()), (2, 8));
        // Too large for the cache at all: not kept, nothing evicted.
        c.insert((1, 4), "s", "m", ok(11), true);
        assert!(c.get((1, 4), "s", "m").is_none());
        assert_eq!(c.len(), 2);
        // Errors count their message.
        c.insert(
            (1, 5),
            "s",
            "m",
            Err((ErrorCode::Remote, "0123456789".into())),
            false,
        );
        assert_eq!((c.len(), c.bytes()), (1, 10));
    }

    #[test]
    fn disabled_and_identityless() {
        let mut c = ReplyCache::new(0, 1000);
        assert!(c.key(1, 1).is_none());
        c.insert((1, 1), "s", "m", ok(1), true);
        assert_eq!(c.len(), 0);
        let c = ReplyCache::new(10, 1000);
        assert!(c.key(0, 1).is_none());
        assert_eq!(c.key(3, 1), Some((3, 1)));
    }

    #[test]
    fn other_method_is_a_miss_and_shrinking_evicts() {
        let mut c = ReplyCache::new(10, 1000);
        c.insert((1, 1), "s", "m", ok(1), true);
        assert!(c.get((1, 1), "s", "other").is_none());
        assert!(c.get((1, 1), "s", "m").is_some());
        c.insert((1, 2), "s", "m", ok(1), true);
        c.set_bounds(1, 1000);
        assert!(c.get((1, 1), "s", "m").is_none());
        assert_eq!(c.len(), 1);
        c.set_bounds(0, 0);
        assert_eq!(c.len(), 0);
    }
}
