//! One user's reply cache: recent outcomes by call identity, in a ring in
//! insertion order ([`UserCache`]). [`super::ReplyCache`] keeps one per
//! caller uid and shares the bounds among them.
//!
//! Every request passes through here (one lookup, one insert, one eviction
//! once the cache is full), so its layout is chosen for that path:
//!
//! - Slots live in a ring in insertion order. The slot an insert writes is
//!   the one the eviction just freed, or the next one, so a full cache walks
//!   its memory sequentially instead of touching a random hash bucket and a
//!   random heap block per request.
//! - A slot is split in two rings: 32 bytes of metadata (the call's key,
//!   the method's hash, the reply's length or where it is kept), and the
//!   bytes of a small successful reply (at most [`INLINE`] bytes: most
//!   replies). An eviction reads only the metadata (320 KB for 10,000
//!   entries, which stays in a core's cache); the reply bytes are only
//!   written, and read again for a re-sent call. Larger replies and errors
//!   are kept in a side table.
//! - The index is a hash table of 4-byte slot numbers (`hashbrown`'s
//!   `HashTable`): ~80 KB for 10,000 entries, small enough to stay in cache.
//!   The per-entry heap blocks and the 1.4 MB `HashMap<CallKey, Entry>` of
//!   the first design cost the echo benchmark about a sixth of its
//!   throughput at 64 calls in flight (docs/performance.md).
//! - The ring shrinks by half when a quarter of it is in use, so a user
//!   whose entries were evicted for others does not keep the room.

use std::hash::{BuildHasher, Hash, Hasher};

use bytes::Bytes;
use hashbrown::HashTable;
use rustc_hash::FxHasher;
use zrpc_proto::ErrorCode;

use super::{CallKey, Outcome};

/// The interval between two warnings of a call re-using another call's
/// identity: a caller chooses its identity, so it could make every call
/// one (red-team pass 9: 20,000 warn lines in 0.9 s, past journald's rate
/// limit, after which the service's own lines are dropped).
const REUSE_WARN_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Logs a call that re-uses the identity of an earlier call to another
/// method: at warn at most once per [`REUSE_WARN_EVERY`] (with how many
/// were not), the others at debug.
fn reused_identity(key: CallKey, service: &str, method: &str) {
    static LOG: std::sync::Mutex<zrpc_io::ratelog::RateLog> =
        std::sync::Mutex::new(zrpc_io::ratelog::RateLog::new());
    let warn = LOG
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .warn_now(std::time::Instant::now(), REUSE_WARN_EVERY);
    let (caller_instance, caller_call, caller_uid) = key;
    match warn {
        Some(quiet) => tracing::warn!(
            caller_instance,
            caller_call,
            caller_uid,
            service,
            method,
            not_logged_since = quiet,
            "a call re-uses the identity of an earlier call to another method; running it"
        ),
        None => tracing::debug!(
            caller_instance,
            caller_call,
            caller_uid,
            service,
            method,
            "a call re-uses the identity of an earlier call to another method; running it"
        ),
    }
}

/// Successful replies up to this many bytes are copied into the ring of
/// reply bytes.
pub(super) const INLINE: usize = 96;

/// What a slot holds.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A small successful reply, in the slot's cell of reply bytes.
    Inline,
    /// A larger reply or an error, in the side table.
    Side,
    /// Nothing: superseded by a newer outcome of the same call (waits for
    /// eviction), or never written.
    Dead,
}

/// A slot's metadata: all that an eviction of a small reply reads.
#[derive(Clone, Copy)]
#[repr(align(32))]
struct Meta {
    instance: u64,
    call: u64,
    uid: u32,
    /// Hash of (service, method): a re-sent call must address the same
    /// method to be answered from the cache.
    target: u32,
    /// `Inline`: the reply's length; `Side`: its place in the side table.
    aux: u32,
    kind: Kind,
}

impl Meta {
    fn key(&self) -> CallKey {
        (self.instance, self.call, self.uid)
    }
}

const EMPTY: Meta = Meta {
    instance: 0,
    call: 0,
    uid: 0,
    target: 0,
    aux: 0,
    kind: Kind::Dead,
};

/// An outcome kept outside the rings.
enum Side {
    /// A larger successful reply, by reference.
    Shared(Bytes),
    /// An error reply: code, message, the error's value (may be empty).
    Failed(ErrorCode, String, Bytes),
}

impl Side {
    /// Bytes counted against the byte bound.
    fn cost(&self) -> usize {
        match self {
            Side::Shared(p) => p.len(),
            Side::Failed(_, msg, value) => msg.len() + value.len(),
        }
    }
}

/// A bounded map from call identity to outcome; the oldest entry is evicted
/// first (insertion order).
pub(super) struct UserCache {
    max_entries: usize,
    max_bytes: usize,
    /// The ring of slot metadata; its length is the ring's capacity.
    meta: Vec<Meta>,
    /// The ring of reply bytes, one cell per slot.
    cells: Vec<[u8; INLINE]>,
    /// Position of the oldest slot.
    head: usize,
    /// Slots in use, live and dead, from `head` on.
    count: usize,
    /// Sequence number of the oldest slot; the slot `i` places after it has
    /// number `first + i` (wrapping; the ring never holds 2^32 slots).
    first: u32,
    /// Larger replies and errors (`Kind::Side`), and the free places in it.
    side: Vec<Option<Side>>,
    free: Vec<u32>,
    /// Sequence numbers of the live slots, by hash of their key.
    index: HashTable<u32>,
    /// The hash of `index`: the keys are call ids the callers choose, so
    /// it is seeded at random (foldhash); with FxHash a caller could pick
    /// ids that all collide and make every lookup walk its entries.
    hasher: foldhash::fast::RandomState,
    /// Cost of the live slots.
    bytes: usize,
}

impl UserCache {
    pub(super) fn new(max_entries: usize, max_bytes: usize) -> Self {
        UserCache {
            max_entries,
            max_bytes,
            meta: Vec::new(),
            cells: Vec::new(),
            head: 0,
            count: 0,
            first: 0,
            side: Vec::new(),
            free: Vec::new(),
            index: HashTable::new(),
            hasher: foldhash::fast::RandomState::default(),
            bytes: 0,
        }
    }

    /// Changes the bounds (non-zero: [`super::ReplyCache`] keeps no user
    /// cache while it is disabled), evicting as needed.
    pub(super) fn set_bounds(&mut self, max_entries: usize, max_bytes: usize) {
        self.max_entries = max_entries;
        self.max_bytes = max_bytes;
        self.evict(None);
        if self.meta.len() > self.max_entries {
            self.resize(self.max_entries);
        }
    }

    /// Ring position of sequence number `seq`.
    fn pos(&self, seq: u32) -> usize {
        ring_pos(self.head, self.first, self.meta.len(), seq)
    }

    /// The cached outcome of call `key` if it addressed the same
    /// service and method (a copy: this is the rare path of a re-sent call).
    pub(super) fn get(&self, key: CallKey, service: &str, method: &str) -> Option<Outcome> {
        let seq = *self.index.find(hash(&self.hasher, key), |&s| {
            self.meta[self.pos(s)].key() == key
        })?;
        let p = self.pos(seq);
        let m = self.meta[p];
        if m.target != target(service, method) {
            reused_identity(key, service, method);
            return None;
        }
        match m.kind {
            Kind::Inline => Some(Ok(Bytes::copy_from_slice(&self.cells[p][..m.aux as usize]))),
            Kind::Side => match self.side.get(m.aux as usize)? {
                Some(Side::Shared(b)) => Some(Ok(b.clone())),
                Some(Side::Failed(code, msg, value)) => {
                    Some(Err((*code, msg.clone(), value.clone())))
                }
                None => None,
            },
            Kind::Dead => None,
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
    pub(super) fn insert(
        &mut self,
        key: CallKey,
        service: &str,
        method: &str,
        outcome: Outcome,
        owned: bool,
    ) {
        let Some(cost) = super::cacheable_cost(&outcome, self.max_bytes) else {
            return;
        };
        let h = hash(&self.hasher, key);
        let (index, ring) = self.index_and_ring();
        if let Ok(old) = index.find_entry(h, |&s| ring.key(s) == key) {
            // The same call again (a re-run after a cache miss): the
            // newest outcome wins and moves to the back.
            let (seq, _) = old.remove();
            let p = self.pos(seq);
            self.kill(p);
        }
        self.evict(Some(cost));
        if self.count == self.meta.len() {
            // Grow by doubling up to the entry bound, not beyond it.
            let cap = self.meta.len();
            self.resize((cap * 2).max(8).min(self.max_entries.max(cap + 1)));
        }
        let p = self.pos(self.first.wrapping_add(self.count as u32));
        let (kind, aux) = match outcome {
            Ok(b) if b.len() <= INLINE => {
                self.cells[p][..b.len()].copy_from_slice(&b);
                (Kind::Inline, b.len() as u32)
            }
            Ok(b) if !owned => (
                Kind::Side,
                self.keep(Side::Shared(Bytes::copy_from_slice(&b))),
            ),
            Ok(b) => (Kind::Side, self.keep(Side::Shared(b))),
            Err((code, msg, value)) => {
                // The value may be a view into a larger buffer (the
                // per-thread reply pool): keep a copy of its own.
                let value = Bytes::copy_from_slice(&value);
                (Kind::Side, self.keep(Side::Failed(code, msg, value)))
            }
        };
        self.meta[p] = Meta {
            instance: key.0,
            call: key.1,
            uid: key.2,
            target: target(service, method),
            aux,
            kind,
        };
        self.count += 1;
        self.bytes += cost;
        let seq = self.first.wrapping_add((self.count - 1) as u32);
        let hasher = self.hasher.clone();
        let (index, ring) = self.index_and_ring();
        index.insert_unique(h, seq, |&s| hash(&hasher, ring.key(s)));
    }

    /// The index, and the ring its entries point into, borrowed apart.
    fn index_and_ring(&mut self) -> (&mut HashTable<u32>, Ring<'_>) {
        let ring = Ring {
            meta: &self.meta,
            head: self.head,
            first: self.first,
        };
        (&mut self.index, ring)
    }

    /// Puts an outcome in the side table; returns its place.
    fn keep(&mut self, s: Side) -> u32 {
        match self.free.pop() {
            Some(i) => {
                self.side[i as usize] = Some(s);
                i
            }
            None => {
                self.side.push(Some(s));
                (self.side.len() - 1) as u32
            }
        }
    }

    /// Empties the slot at ring position `p` (its index entry is already
    /// gone), releasing what it holds and its cost.
    fn kill(&mut self, p: usize) {
        let m = &mut self.meta[p];
        match m.kind {
            Kind::Inline => self.bytes -= m.aux as usize,
            Kind::Side => {
                if let Some(s) = self.side.get_mut(m.aux as usize).and_then(Option::take) {
                    self.bytes -= s.cost();
                    self.free.push(m.aux);
                }
            }
            Kind::Dead => {}
        }
        m.kind = Kind::Dead;
    }

    /// Moves the slots to rings of `cap` places (at least `count`), oldest
    /// first.
    fn resize(&mut self, cap: usize) {
        let cap = cap.max(self.count);
        let mut meta = vec![EMPTY; cap];
        let mut cells = vec![[0u8; INLINE]; cap];
        for i in 0..self.count {
            let p = self.pos(self.first.wrapping_add(i as u32));
            meta[i] = self.meta[p];
            if self.meta[p].kind == Kind::Inline {
                cells[i] = self.cells[p];
            }
        }
        self.meta = meta;
        self.cells = cells;
        self.head = 0;
    }

    /// Evicts the oldest entries until one more entry of `incoming` bytes
    /// fits (`None`: until the bounds hold).
    fn evict(&mut self, incoming: Option<usize>) {
        let (extra, cost) = incoming.map_or((0, 0), |c| (1, c));
        while self.count + extra > self.max_entries || self.bytes + cost > self.max_bytes {
            if self.count == 0 {
                break;
            }
            self.pop_oldest();
        }
    }

    /// Frees the oldest slot; true if it held an entry (not a dead slot).
    fn pop_oldest(&mut self) -> bool {
        let p = self.head;
        let m = self.meta[p];
        let seq = self.first;
        self.head = if p + 1 == self.meta.len() { 0 } else { p + 1 };
        self.count -= 1;
        self.first = self.first.wrapping_add(1);
        if m.kind == Kind::Dead {
            return false;
        }
        self.kill(p);
        if let Ok(e) = self
            .index
            .find_entry(hash(&self.hasher, m.key()), |&s| s == seq)
        {
            e.remove();
        }
        true
    }

    /// Frees the oldest slot, an entry or a dead slot (for another user's
    /// entry, see [`super::ReplyCache`]). The ring shrinks by half once a
    /// quarter of it is in use.
    pub(super) fn pop_slot(&mut self) {
        if self.count == 0 {
            return;
        }
        self.pop_oldest();
        let cap = self.meta.len();
        if cap > 8 && self.count * 4 <= cap {
            self.resize(cap / 2);
        }
    }

    /// Slots in use: entries, and the dead slots of superseded outcomes
    /// not yet evicted (what the entry bound counts).
    pub(super) fn slots(&self) -> usize {
        self.count
    }

    /// Number of cached replies.
    pub(super) fn len(&self) -> usize {
        self.index.len()
    }

    /// Bytes of cached replies.
    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }
}

/// The metadata ring, as the index's lookups see it.
struct Ring<'a> {
    meta: &'a [Meta],
    head: usize,
    first: u32,
}

impl Ring<'_> {
    /// The key of the slot with sequence number `seq`.
    fn key(&self, seq: u32) -> CallKey {
        self.meta[ring_pos(self.head, self.first, self.meta.len(), seq)].key()
    }
}

/// Position in a ring of `cap` places whose oldest slot, at `head`, has
/// sequence number `first`, of the slot with sequence number `seq`.
fn ring_pos(head: usize, first: u32, cap: usize, seq: u32) -> usize {
    let p = head + seq.wrapping_sub(first) as usize;
    if p >= cap {
        p - cap
    } else {
        p
    }
}

fn hash(hasher: &foldhash::fast::RandomState, key: CallKey) -> u64 {
    hasher.hash_one(key)
}

fn target(service: &str, method: &str) -> u32 {
    let mut h = FxHasher::default();
    service.hash(&mut h);
    method.hash(&mut h);
    // The upper half: FxHash mixes its input into the high bits.
    (h.finish() >> 32) as u32
}

#[cfg(test)]
mod tests {
    use super::super::tests::ok;
    use super::*;
    use std::collections::VecDeque;

    #[test]
    fn slot_metadata_is_half_a_cache_line() {
        assert_eq!(std::mem::size_of::<Meta>(), 32);
        assert_eq!(std::mem::align_of::<Meta>(), 32);
    }

    /// The ring and its index against a plain model (a list in insertion
    /// order), through sequence numbers that wrap, re-inserted keys, small
    /// and large payloads, errors and both bounds.
    #[test]
    fn matches_a_model_through_wrapping_sequence_numbers() {
        let mut next = super::super::tests::rng(0x2545_f491_4f6c_dd1d_u64);
        for (max_entries, max_bytes) in [(1, 1000), (7, 300), (50, 100_000), (64, 2_000)] {
            let mut c = UserCache::new(max_entries, max_bytes);
            c.first = u32::MAX - 20;
            // (key, outcome, cost); `None` once superseded.
            let mut model: VecDeque<(CallKey, Option<Outcome>, usize)> = VecDeque::new();
            for _ in 0..3_000 {
                let key = (1 + next(2), next(40), next(2) as u32);
                let outcome = match next(10) {
                    0 => Err((
                        ErrorCode::Remote,
                        "e".repeat(next(30) as usize),
                        Bytes::new(),
                    )),
                    1 => ok(INLINE + 1 + next(200) as usize),
                    _ => ok(next(INLINE as u64 + 1) as usize),
                };
                let cost = match &outcome {
                    Ok(p) => p.len(),
                    Err((_, m, v)) => m.len() + v.len(),
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
                    c.count
                );
                assert_eq!(c.bytes(), live.iter().map(|e| e.2).sum::<usize>());
                for k in
                    (1..3).flat_map(|i| (0..40).flat_map(move |j| (0..2).map(move |u| (i, j, u))))
                {
                    let want = live.iter().find(|e| e.0 == k).and_then(|e| e.1.clone());
                    assert_eq!(c.get(k, "s", "m"), want, "key {k:?}");
                }
            }
        }
    }

    /// Call ids crafted to collide under FxHash (the index's hash before):
    /// FxHash of `(instance, call, uid)` is `rotl(((instance * K + call) *
    /// K + uid) * K, 26)`, so ids whose last product differs only in its
    /// low 31 bits share the bucket bits and the 7-bit tag of every table
    /// smaller than 2^26 slots, and a lookup among them compared them all.
    /// The index is seeded at random now: the same ids spread.
    #[test]
    fn call_ids_crafted_to_collide_do_not_collide() {
        const K: u64 = 0xf135_7aea_2e62_a9c5;
        let mut kinv = K;
        for _ in 0..6 {
            kinv = kinv.wrapping_mul(2u64.wrapping_sub(K.wrapping_mul(kinv)));
        }
        let (instance, uid) = (1u64, 1000u32);
        let keys: Vec<CallKey> = (0..4096u64)
            .map(|j| {
                let h2 = (0x1234_5678_0000_0000u64 + j)
                    .wrapping_mul(kinv)
                    .wrapping_sub(u64::from(uid));
                let call = h2.wrapping_mul(kinv).wrapping_sub(instance.wrapping_mul(K));
                (instance, call, uid)
            })
            .collect();
        let slot_and_tag = |h: u64| (h & 0xfff, h >> 57);
        let fx: std::collections::HashSet<_> = keys
            .iter()
            .map(|k| {
                let mut h = FxHasher::default();
                k.hash(&mut h);
                slot_and_tag(h.finish())
            })
            .collect();
        assert_eq!(fx.len(), 1, "the crafted ids collide under FxHash");
        let mut c = UserCache::new(10_000, 1 << 30);
        let spread: std::collections::HashSet<_> =
            keys.iter().map(|&k| hash(&c.hasher, k) & 0xfff).collect();
        assert!(spread.len() > 2_000, "{} buckets of 4,096", spread.len());
        for &k in &keys {
            c.insert(k, "s", "m", ok(1), true);
        }
        assert!(keys.iter().all(|&k| c.get(k, "s", "m").is_some()));
    }

    #[test]
    fn evicts_oldest_by_count() {
        let mut c = UserCache::new(2, 1000);
        c.insert((1, 1, 0), "s", "m", ok(1), true);
        c.insert((1, 2, 0), "s", "m", ok(1), true);
        c.insert((1, 3, 0), "s", "m", ok(1), true);
        assert!(c.get((1, 1, 0), "s", "m").is_none());
        assert!(c.get((1, 2, 0), "s", "m").is_some());
        assert!(c.get((1, 3, 0), "s", "m").is_some());
        assert_eq!((c.len(), c.bytes()), (2, 2));
    }

    #[test]
    fn another_uid_never_reaches_an_entry() {
        let mut c = UserCache::new(10, 1000);
        c.insert((7, 1, 0), "s", "m", ok(3), true);
        // Same instance and call id from uid 1001: a miss, run as its own
        // call; its outcome does not replace root's.
        assert!(c.get((7, 1, 1001), "s", "m").is_none());
        c.insert((7, 1, 1001), "s", "m", ok(5), true);
        assert_eq!(c.get((7, 1, 0), "s", "m"), Some(ok(3)));
        assert_eq!(c.get((7, 1, 1001), "s", "m"), Some(ok(5)));
    }

    /// What a caller chooses cannot flood the service's log: a call
    /// re-using another method's identity is logged at warn at most once
    /// per interval, the rest at debug (red-team pass 9).
    #[test]
    fn identities_reused_for_another_method_are_logged_at_warn_rarely() {
        #[derive(Clone, Default)]
        struct Lines(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Lines {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().expect("lines").extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let lines = Lines::default();
        let sink = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || sink.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let mut c = UserCache::new(10, 1000);
            c.insert((7, 1, 0), "s", "m", ok(3), true);
            for _ in 0..100 {
                assert!(
                    c.get((7, 1, 0), "s", "other").is_none(),
                    "run, not answered"
                );
            }
        });
        let text = String::from_utf8(lines.0.lock().expect("lines").clone()).expect("utf-8");
        let reused = |level: &str| {
            text.lines()
                .filter(|l| l.contains(level) && l.contains("re-uses the identity"))
                .count()
        };
        // Other tests of this process may have had the one warning of this
        // interval (the rate is per process): at most one here.
        assert!(reused("WARN") <= 1, "{text}");
        assert_eq!(reused("WARN") + reused("DEBUG"), 100, "{text}");
    }

    #[test]
    fn evicts_oldest_by_bytes() {
        let mut c = UserCache::new(100, 10);
        c.insert((1, 1, 0), "s", "m", ok(4), true);
        c.insert((1, 2, 0), "s", "m", ok(4), true);
        c.insert((1, 3, 0), "s", "m", ok(4), true);
        assert!(c.get((1, 1, 0), "s", "m").is_none());
        assert_eq!((c.len(), c.bytes()), (2, 8));
        // Too large for the cache at all: not kept, nothing evicted.
        c.insert((1, 4, 0), "s", "m", ok(11), true);
        assert!(c.get((1, 4, 0), "s", "m").is_none());
        assert_eq!(c.len(), 2);
        // Errors count their message.
        c.insert(
            (1, 5, 0),
            "s",
            "m",
            Err((ErrorCode::Remote, "0123456789".into(), Bytes::new())),
            false,
        );
        assert_eq!((c.len(), c.bytes()), (1, 10));
    }

    #[test]
    fn evicting_for_others_takes_the_oldest_and_gives_back_the_room() {
        let mut c = UserCache::new(1000, 1_000_000);
        for i in 0..600 {
            c.insert((1, i, 0), "s", "m", ok(200), true);
        }
        // A superseded entry leaves a dead slot, counted until popped.
        c.insert((1, 0, 0), "s", "other", ok(1), true);
        assert_eq!((c.len(), c.slots()), (600, 601));
        let cap = c.meta.len();
        assert!(cap >= 601, "{cap}");
        c.pop_slot();
        assert_eq!((c.len(), c.slots()), (600, 600), "the dead slot went");
        c.pop_slot();
        assert!(
            c.get((1, 0, 0), "s", "other").is_some(),
            "re-inserted: newest"
        );
        assert!(
            c.get((1, 1, 0), "s", "m").is_none(),
            "the oldest live entry"
        );
        assert_eq!(c.len(), 599);
        while c.slots() > 0 {
            c.pop_slot();
        }
        assert_eq!((c.len(), c.bytes()), (0, 0));
        assert!(c.meta.len() <= 8, "the ring shrank: {}", c.meta.len());
        c.pop_slot();
        // Still usable.
        c.insert((1, 7, 0), "s", "m", ok(3), true);
        assert_eq!(c.get((1, 7, 0), "s", "m"), Some(ok(3)));
    }

    #[test]
    fn other_method_is_a_miss_and_shrinking_evicts() {
        let mut c = UserCache::new(10, 1000);
        c.insert((1, 1, 0), "s", "m", ok(1), true);
        assert!(c.get((1, 1, 0), "s", "other").is_none());
        assert!(c.get((1, 1, 0), "s", "m").is_some());
        c.insert((1, 2, 0), "s", "m", ok(1), true);
        c.set_bounds(1, 1000);
        assert!(c.get((1, 1, 0), "s", "m").is_none());
        assert_eq!(c.len(), 1);
    }
}
