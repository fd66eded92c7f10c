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

use async_nats::HeaderMap;
use rustc_hash::FxHashMap;

use super::{header, H_EPOCH, H_ORIGIN, H_REQUEST};

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
    /// `Zrpc-Origin` or a numeric `Zrpc-Request`.
    pub(super) fn new(name: &str, headers: Option<&HeaderMap>) -> Option<Key> {
        Some(Key {
            name: name.to_owned(),
            origin: header(headers, H_ORIGIN)?.to_owned(),
            epoch: header(headers, H_EPOCH).unwrap_or_default().to_owned(),
            request: header(headers, H_REQUEST)?.parse().ok()?,
        })
    }
}

/// The running exported calls, by the key their cancel names.
#[derive(Default)]
pub(super) struct Cancels {
    running: FxHashMap<Key, u64>,
}

impl Cancels {
    /// A cancel message for `key` arrived: the local call id to cancel,
    /// if a call is filed under it.
    pub(super) fn cancel(&mut self, key: &Key) -> Option<u64> {
        self.running.get(key).copied()
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
