//! The reply cache: recent outcomes by call identity, so that a call re-sent
//! after a reconnect (of the client, of this service, or a broker restart)
//! is answered again instead of running twice.

use std::collections::VecDeque;
use std::hash::{Hash, Hasher};

use bytes::Bytes;
use rustc_hash::{FxHashMap, FxHasher};
use zrpc_proto::ErrorCode;

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

struct Entry {
    /// Hash of (service, method): a re-sent call must address the same
    /// method to be answered from the cache.
    target: u64,
    outcome: Outcome,
    cost: usize,
}

/// A bounded map from call identity to outcome; the oldest entry is evicted
/// first (insertion order).
pub(crate) struct ReplyCache {
    max_entries: usize,
    max_bytes: usize,
    map: FxHashMap<CallKey, Entry>,
    order: VecDeque<CallKey>,
    bytes: usize,
}

impl ReplyCache {
    pub(crate) fn new(max_entries: usize, max_bytes: usize) -> Self {
        ReplyCache {
            max_entries,
            max_bytes,
            map: FxHashMap::default(),
            order: VecDeque::new(),
            bytes: 0,
        }
    }

    /// Whether the cache is in use (both bounds non-zero).
    pub(crate) fn enabled(&self) -> bool {
        self.max_entries > 0 && self.max_bytes > 0
    }

    /// Changes the bounds, evicting as needed.
    pub(crate) fn set_bounds(&mut self, max_entries: usize, max_bytes: usize) {
        self.max_entries = max_entries;
        self.max_bytes = max_bytes;
        if !self.enabled() {
            self.map.clear();
            self.order.clear();
            self.bytes = 0;
        } else {
            self.evict(0);
        }
    }

    /// The key under which a request is cached, if it has an identity (a
    /// caller instance of 0 means none: the broker sends 0 when the caller
    /// is unknown) and the cache is on.
    pub(crate) fn key(&self, caller_instance: u64, caller_call: u64) -> Option<CallKey> {
        (self.enabled() && caller_instance != 0).then_some((caller_instance, caller_call))
    }

    /// The cached outcome of call `key` if it addressed the same
    /// service and method.
    pub(crate) fn get(&self, key: CallKey, service: &str, method: &str) -> Option<&Outcome> {
        let e = self.map.get(&key)?;
        if e.target != target(service, method) {
            tracing::warn!(
                caller_instance = key.0,
                caller_call = key.1,
                service,
                method,
                "a call re-uses the identity of an earlier call to another method; running it"
            );
            return None;
        }
        Some(&e.outcome)
    }

    /// Remembers the outcome of call `key`. An outcome larger than the byte
    /// bound is not kept.
    ///
    /// A successful payload is kept by reference (no copy) when `owned`
    /// says the `Bytes` is the sole handle to a buffer of its own (e.g. the
    /// `Vec` a handler encoded its return value into); otherwise it may be
    /// a view into a larger buffer the cache must not pin (the read buffer
    /// a request arrived in, a user's shared buffer), and it is copied.
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
        // Moved in, not cloned: cloning a `Bytes` made from a `Vec` would
        // allocate its shared header.
        let outcome = match outcome {
            Ok(p) if !owned => Ok(Bytes::copy_from_slice(&p)),
            other => other,
        };
        let entry = Entry {
            target: target(service, method),
            outcome,
            cost,
        };
        // Room first (assuming a new key: at worst one entry too many goes),
        // then one hash operation for the insert itself.
        self.evict(cost);
        self.bytes += cost;
        match self.map.entry(key) {
            std::collections::hash_map::Entry::Occupied(mut o) => {
                // The same call again (a re-run after a cache miss): the
                // newest outcome wins and moves to the back.
                let old = std::mem::replace(o.get_mut(), entry);
                self.bytes -= old.cost;
                self.order.retain(|k| *k != key);
            }
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(entry);
            }
        }
        self.order.push_back(key);
    }

    /// Evicts the oldest entries until one more entry of `cost` bytes fits
    /// (`cost` 0: until the bounds hold).
    fn evict(&mut self, cost: usize) {
        let extra = usize::from(cost > 0);
        while !self.order.is_empty()
            && (self.map.len() + extra > self.max_entries || self.bytes + cost > self.max_bytes)
        {
            if let Some(k) = self.order.pop_front() {
                if let Some(e) = self.map.remove(&k) {
                    self.bytes -= e.cost;
                }
            }
        }
    }

    /// Number of cached replies.
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// Bytes of cached replies.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }
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
