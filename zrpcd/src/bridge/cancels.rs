//! Cancel messages for exported calls (`<prefix>.cancel.<name>`). A
//! cancel names its request by `Zrpc-Origin`, `Zrpc-Epoch` and
//! `Zrpc-Request`, and by the name whose cancel subject it came on; the
//! exporting bridge files each running call under that [`Key`] with its
//! local call id.
//!
//! The epoch is a random number per importing bridge process: request
//! numbers start again at 1 when the calling host's zrpcd restarts, so
//! without it a cancel of a new call could name an older call still
//! running here (docs/bridge.md, *Cancellation*).
//!
//! A cancel can be handled before the request it names has been filed:
//! they come on two subscriptions, and the task answering the request
//! files it only when it first runs. Such a cancel is remembered (at most
//! [`MAX_EARLY`], for [`EARLY_TTL`]), and the request finding it is
//! answered `Cancelled` without a local call. Only cancels with an epoch
//! are remembered (see [`Cancels::cancel`]), and keys with an origin or
//! epoch longer than [`MAX_ID_LEN`] are not made at all.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use rustc_hash::FxHashMap;

use super::{header, H_EPOCH, H_ORIGIN, H_REQUEST, MAX_ID_LEN};

/// What a cancel message names: (name, origin, epoch, request number).
/// The epoch is empty for a bridge that sends none (before the header
/// existed).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct Key {
    name: String,
    origin: String,
    epoch: String,
    request: u64,
}

impl Key {
    /// The key of a request or cancel message for `name`; None without
    /// `Zrpc-Origin` or a numeric `Zrpc-Request`, or with an origin or
    /// epoch longer than [`MAX_ID_LEN`].
    pub(super) fn new(name: &str, headers: Option<&HeaderMap>) -> Option<Key> {
        let origin = header(headers, H_ORIGIN)?;
        let epoch = header(headers, H_EPOCH).unwrap_or_default();
        if origin.len() > MAX_ID_LEN || epoch.len() > MAX_ID_LEN {
            return None;
        }
        Some(Key {
            name: name.to_owned(),
            origin: origin.to_owned(),
            epoch: epoch.to_owned(),
            request: header(headers, H_REQUEST)?.parse().ok()?,
        })
    }
}

/// How many cancels that named no running call are remembered at most
/// (the oldest are forgotten first).
pub(super) const MAX_EARLY: usize = 1_024;

/// How long a cancel that named no running call is remembered. Its
/// request, if it comes at all, is filed within a turn of the bridge's
/// tasks; the bound keeps a stale cancel from reaching a later request
/// that reuses its key (a restarted bridge sending no `Zrpc-Epoch`).
pub(super) const EARLY_TTL: Duration = Duration::from_secs(10);

/// The running exported calls, by the key their cancel names, and the
/// cancels that came before their request was filed.
#[derive(Default)]
pub(super) struct Cancels {
    running: FxHashMap<Key, u64>,
    /// Cancels that named no running call, with when they came.
    early: FxHashMap<Key, Instant>,
    /// The same, oldest first (an entry whose time differs from
    /// `early`'s was consumed or replaced).
    order: VecDeque<(Key, Instant)>,
}

impl Cancels {
    /// A cancel message for `key` arrived at `now`: the local call id to
    /// cancel, if a call is filed under it; else the cancel is remembered
    /// for its request ([`Cancels::cancelled_early`]), unless it has no
    /// epoch: such a bridge numbers its requests from 1 again when it
    /// restarts, so a cancel that came after its call ended (the caller
    /// gave up as the reply crossed) would cancel the next process's
    /// request of that number.
    pub(super) fn cancel(&mut self, key: &Key, now: Instant) -> Option<u64> {
        if let Some(&id) = self.running.get(key) {
            return Some(id);
        }
        if key.epoch.is_empty() {
            return None;
        }
        while let Some((old, at)) = self.order.front() {
            if self.order.len() < MAX_EARLY && now.duration_since(*at) <= EARLY_TTL {
                break;
            }
            if self.early.get(old) == Some(at) {
                self.early.remove(old);
            }
            self.order.pop_front();
        }
        if !self.early.contains_key(key) {
            self.early.insert(key.clone(), now);
            self.order.push_back((key.clone(), now));
        }
        None
    }

    /// Whether a cancel for `key` came (within [`EARLY_TTL`] of `now`)
    /// before its request was filed; it is forgotten then.
    pub(super) fn cancelled_early(&mut self, key: &Key, now: Instant) -> bool {
        self.early
            .remove(key)
            .is_some_and(|at| now.duration_since(at) <= EARLY_TTL)
    }

    /// Files local call `id` under `key`.
    pub(super) fn file(&mut self, key: Key, id: u64) {
        self.running.insert(key, id);
    }

    /// Local call `id` ended: its entry goes, unless `key` now names
    /// another call (a peer reused it).
    pub(super) fn unfile(&mut self, key: &Key, id: u64) {
        if self.running.get(key) == Some(&id) {
            self.running.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(request: u64) -> Key {
        Key {
            name: "echo".into(),
            origin: "host-b".into(),
            epoch: "e".into(),
            request,
        }
    }

    #[test]
    fn an_early_cancel_is_found_once_and_only_while_fresh() {
        let mut c = Cancels::default();
        let t0 = Instant::now();
        assert_eq!(c.cancel(&key(1), t0), None);
        assert!(c.cancelled_early(&key(1), t0));
        assert!(!c.cancelled_early(&key(1), t0), "found twice");
        assert_eq!(c.cancel(&key(2), t0), None);
        assert!(!c.cancelled_early(&key(2), t0 + EARLY_TTL + Duration::from_secs(1)));
        // A filed call is cancelled, not remembered.
        c.file(key(3), 42);
        assert_eq!(c.cancel(&key(3), t0), Some(42));
        assert!(!c.cancelled_early(&key(3), t0));
        // Without an epoch, a cancel finds a filed call only.
        let bare = Key {
            epoch: String::new(),
            ..key(4)
        };
        assert_eq!(c.cancel(&bare, t0), None);
        assert!(!c.cancelled_early(&bare, t0));
        c.file(bare.clone(), 43);
        assert_eq!(c.cancel(&bare, t0), Some(43));
    }

    #[test]
    fn over_long_identities_make_no_key() {
        let mut h = HeaderMap::new();
        h.insert(H_REQUEST, "1");
        h.insert(H_EPOCH, "e");
        h.insert(H_ORIGIN, "o".repeat(MAX_ID_LEN).as_str());
        assert!(Key::new("echo", Some(&h)).is_some());
        h.insert(H_ORIGIN, "o".repeat(MAX_ID_LEN + 1).as_str());
        assert!(Key::new("echo", Some(&h)).is_none());
        h.insert(H_ORIGIN, "o");
        h.insert(H_EPOCH, "e".repeat(MAX_ID_LEN + 1).as_str());
        assert!(Key::new("echo", Some(&h)).is_none());
    }

    #[test]
    fn early_cancels_stay_bounded() {
        let mut c = Cancels::default();
        let t0 = Instant::now();
        for i in 0..(3 * MAX_EARLY as u64) {
            c.cancel(&key(i), t0);
            // Consumed ones leave their place in the order behind.
            if i % 2 == 0 {
                c.cancelled_early(&key(i), t0);
            }
        }
        assert!(c.early.len() <= MAX_EARLY && c.order.len() <= MAX_EARLY);
        // The newest are still there, the oldest forgotten.
        let last = 3 * MAX_EARLY as u64 - 1;
        assert!(c.cancelled_early(&key(last), t0));
        assert!(!c.cancelled_early(&key(1), t0));
        // Stale ones go when the next comes.
        c.cancel(&key(u64::MAX), t0 + EARLY_TTL + Duration::from_secs(1));
        assert_eq!(c.early.len(), 1);
    }
}
