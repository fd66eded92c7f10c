//! Per-user quotas: what the connections of one uid may hold together, so
//! that one local user cannot exhaust the broker-wide limits for the others
//! (the way dbus-broker accounts per user). Root is exempt (it is trusted,
//! and the system's services must not be starved by their own quota).
//!
//! Each connection keeps a handle on its user's [`Usage`], so the call path
//! counts without a table lookup.

use std::cell::Cell;
use std::rc::Rc;

use rustc_hash::FxHashMap;
use serde::Deserialize;

/// What one uid may hold, all its connections together. `None` in the
/// policy file means the default: a quarter of the broker-wide limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// Connections.
    pub connections: usize,
    /// Calls pending.
    pub pending_calls: usize,
    /// Argument bytes of pending calls.
    pub pending_bytes: usize,
    /// Read buffer held for partly received frames.
    pub partial_bytes: usize,
    /// Bytes queued towards the user's connections, unread.
    pub queued_bytes: usize,
}

/// The `[quota]` section of the policy file.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct QuotaOverrides {
    /// Connections per uid.
    pub connections: Option<usize>,
    /// Pending calls per uid.
    pub pending_calls: Option<usize>,
    /// Argument bytes of pending calls per uid.
    pub pending_bytes: Option<usize>,
    /// Partial-frame bytes per uid.
    pub partial_bytes: Option<usize>,
    /// Bytes queued towards one uid's connections, unread.
    pub queued_bytes: Option<usize>,
}

impl Quota {
    /// The quota from the broker-wide limits (a quarter of each, at least
    /// one) and the policy file's overrides.
    pub fn new(config: &crate::Config, overrides: QuotaOverrides) -> Quota {
        let quarter = |n: usize| (n / 4).max(1);
        Quota {
            connections: overrides
                .connections
                .unwrap_or(quarter(config.max_connections)),
            pending_calls: overrides
                .pending_calls
                .unwrap_or(quarter(config.max_pending_total)),
            pending_bytes: overrides
                .pending_bytes
                .unwrap_or(quarter(config.max_pending_bytes)),
            partial_bytes: overrides
                .partial_bytes
                .unwrap_or(quarter(config.max_partial_bytes)),
            // No broker-wide limit to take a share of: four connections'
            // worth (--max-queued-bytes each).
            queued_bytes: overrides
                .queued_bytes
                .unwrap_or(config.max_queued_bytes.saturating_mul(4)),
        }
    }
}

/// What one uid's connections hold now.
#[derive(Debug, Default)]
pub struct Usage {
    /// The uid.
    pub uid: u32,
    /// Live connections.
    pub connections: Cell<usize>,
    /// Calls pending.
    pub pending_calls: Cell<usize>,
    /// Argument bytes of pending calls.
    pub pending_bytes: Cell<usize>,
    /// Partial-frame bytes.
    pub partial_bytes: Cell<usize>,
    /// Bytes queued towards its connections and not yet written.
    pub queued_bytes: Cell<usize>,
}

impl Usage {
    /// Whether quotas apply to this user (not to root).
    pub fn limited(&self) -> bool {
        self.uid != 0
    }

    /// Adds `n` to a counter.
    pub fn add(c: &Cell<usize>, n: usize) {
        c.set(c.get() + n);
    }

    /// Subtracts `n` from a counter (never below zero).
    pub fn sub(c: &Cell<usize>, n: usize) {
        c.set(c.get().saturating_sub(n));
    }
}

/// Every user with a live connection.
#[derive(Debug, Default)]
pub struct Users {
    map: FxHashMap<u32, Rc<Usage>>,
}

impl Users {
    /// The usage of `uid` (created with its first connection).
    pub fn get(&mut self, uid: u32) -> Rc<Usage> {
        self.map
            .entry(uid)
            .or_insert_with(|| {
                Rc::new(Usage {
                    uid,
                    ..Usage::default()
                })
            })
            .clone()
    }

    /// Connections `uid` has now.
    pub fn connections(&self, uid: u32) -> usize {
        self.map.get(&uid).map_or(0, |u| u.connections.get())
    }

    /// Forgets the users nothing refers to any more: no connection, and no
    /// closing connection's queue still holding unsent frames (those keep
    /// counting against their user until they are dropped, so that a user
    /// cannot shed its account by reconnecting).
    pub fn collect(&mut self) {
        self.map.retain(|_, u| Rc::strong_count(u) > 1);
    }

    /// Users with a live connection.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True without any.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}
