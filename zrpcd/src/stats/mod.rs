//! Broker-wide counters and per-service latency histograms, since start
//! and over the last minute.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

mod histogram;
mod window;

pub use histogram::{Histogram, EXPORT_BOUNDS_US};
pub use window::{epoch, Recent, Window, SLOT, SLOTS};

use rustc_hash::FxHashMap;
use zrpc_proto::ErrorCode;

/// Counters for one service name.
#[derive(Debug, Default, Clone)]
pub struct ServiceStats {
    /// Calls answered by the service (successfully or with its own error).
    pub answered: u64,
    /// Calls that ended in an error of any kind.
    pub errors: u64,
    /// Latency of answered calls, broker-side (accept to reply).
    pub latency: Histogram,
    /// The same over the last minute.
    pub recent: Window,
}

impl ServiceStats {
    /// Counts a call the service answered after `latency` (`error`: with
    /// an error of its own), at `now`.
    pub fn answered(&mut self, latency: Duration, error: bool, now: Instant) {
        self.answered += 1;
        self.errors += u64::from(error);
        self.latency.record(latency);
        self.recent.answered(epoch(now), latency, error);
    }

    /// Counts a call that ended in an error without an answer, at `now`.
    pub fn failed(&mut self, now: Instant) {
        self.errors += 1;
        self.recent.failed(epoch(now));
    }
}

/// The row of `zrpcd.stats` that counts calls to names without a row of
/// their own: names never registered (any local program can call made-up
/// names), and registered ones beyond `--max-stats-names`. Not a valid
/// service name, so it cannot clash with one.
pub const OTHER: &str = "(other)";

/// Broker-wide counters.
#[derive(Debug)]
pub struct Stats {
    /// Connections accepted since start.
    pub connections_total: u64,
    /// Connections refused (limit).
    pub connections_refused: u64,
    /// Calls accepted since start.
    pub calls: u64,
    /// Calls answered successfully.
    pub calls_ok: u64,
    /// Calls that ended with an error, by code.
    pub errors: FxHashMap<u16, u64>,
    /// Calls whose deadline passed at the broker.
    pub timeouts: u64,
    /// Replies that arrived after their call had ended.
    pub late_replies: u64,
    /// Calls cancelled by their caller (explicitly or by disconnecting).
    pub cancelled: u64,
    /// Calls re-delivered after their service instance went away.
    pub redelivered: u64,
    /// Connections closed for protocol errors.
    pub protocol_errors: u64,
    /// Services disconnected for not answering heartbeats.
    pub heartbeat_timeouts: u64,
    /// Per service name (read it, change it only through the methods
    /// here): the broker's own service, [`OTHER`], then names
    /// that are or were registered, at most `max_names` of them. A call's
    /// interned route keeps the row's [tag](Stats::tag_of) so that ending
    /// the call finds its row without a name lookup; a row given to another
    /// name gets a new generation, so old tags stop matching it.
    pub services: Vec<(String, ServiceStats)>,
    /// Per row: generation, registered now, waiting in `idle`.
    rows: Vec<RowState>,
    /// Rows whose name stopped being registered, oldest first: the next
    /// ones to give to a new name (checked again when taken).
    idle: VecDeque<u32>,
    /// Slot in `services` by name (hashbrown for `entry_ref`: a key
    /// allocated only for a new name).
    slots: hashbrown::HashMap<String, u32, crate::hashing::PeerKeyState>,
    /// Most rows for registered names.
    max_names: usize,
    /// Rows per uid (the uid that registered the row's name when it got
    /// the row), and most a uid other than root may have
    /// ([`Stats::registered`]).
    owned: FxHashMap<u32, usize>,
    max_per_uid: usize,
    /// Moves whenever a row other than the broker's own may have changed:
    /// see [`Stats::version`].
    version: u64,
}

#[derive(Debug, Default, Clone, Copy)]
struct RowState {
    generation: u16,
    registered: bool,
    in_idle: bool,
    /// The uid the row counts against.
    owner: u32,
}

/// Most rows for registered names that `--max-stats-names` may ask for (a
/// row's slot and generation share one 32-bit tag).
pub const MAX_STATS_NAMES: usize = 65_000;

/// Slot of the broker's own service.
const BROKER_SLOT: u32 = 0;
/// Slot of [`OTHER`].
const OTHER_SLOT: u32 = 1;

impl Stats {
    /// Empty counters, with rows for at most `max_names` registered names
    /// (capped at [`MAX_STATS_NAMES`]), a quarter of them per uid other than
    /// root until [`set_max_per_uid`](Self::set_max_per_uid).
    pub fn new(max_names: usize) -> Stats {
        let mut s = Stats {
            connections_total: 0,
            connections_refused: 0,
            calls: 0,
            calls_ok: 0,
            errors: FxHashMap::default(),
            timeouts: 0,
            late_replies: 0,
            cancelled: 0,
            redelivered: 0,
            protocol_errors: 0,
            heartbeat_timeouts: 0,
            services: Vec::new(),
            rows: Vec::new(),
            idle: VecDeque::new(),
            slots: hashbrown::HashMap::default(),
            max_names: max_names.min(MAX_STATS_NAMES),
            owned: FxHashMap::default(),
            max_per_uid: (max_names.min(MAX_STATS_NAMES) / 4).max(1),
            version: 0,
        };
        s.push_row(zrpc_proto::BROKER_SERVICE);
        s.push_row(OTHER);
        s
    }

    fn push_row(&mut self, name: &str) -> u32 {
        let slot = self.services.len() as u32;
        self.services
            .push((name.to_owned(), ServiceStats::default()));
        self.rows.push(RowState::default());
        self.slots.insert(name.to_owned(), slot);
        slot
    }

    fn tag(&self, slot: u32) -> u32 {
        slot | (u32::from(self.rows[slot as usize].generation) << 16)
    }

    /// The slot a tag names, if the row still belongs to the name it was
    /// taken for.
    fn slot_of_tag(&self, tag: u32) -> Option<u32> {
        let slot = tag & 0xffff;
        let row = self.rows.get(slot as usize)?;
        (u32::from(row.generation) == tag >> 16).then_some(slot)
    }

    /// Whether `tag` still names its row (see [`Stats::tag_of`]).
    #[inline]
    pub fn tag_is_current(&self, tag: Option<u32>) -> bool {
        tag.is_some_and(|t| self.slot_of_tag(t).is_some())
    }

    /// Counts an error outcome.
    pub fn error(&mut self, code: ErrorCode) {
        *self.errors.entry(code.to_u16()).or_default() += 1;
        if code.is_timeout() {
            self.timeouts += 1;
        }
    }

    /// A number that moves whenever a row of [`Stats::services`] other than
    /// the broker's own may have changed (its counts, or the name it
    /// belongs to); the rows are only changed through the methods here.
    /// `zrpcd.stats` encodes them again only when it moved
    /// ([`crate::builtin::StatsCache`]).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The entry of `name`, or of [`OTHER`] if it has none.
    pub fn service(&mut self, name: &str) -> &mut ServiceStats {
        self.version += 1;
        let slot = self.slots.get(name).copied().unwrap_or(OTHER_SLOT);
        &mut self.services[slot as usize].1
    }

    /// The broker's own service's entry, to read.
    pub fn broker_row(&self) -> &ServiceStats {
        &self.services[BROKER_SLOT as usize].1
    }

    /// The broker's own service's entry.
    pub fn broker_service(&mut self) -> &mut ServiceStats {
        &mut self.services[BROKER_SLOT as usize].1
    }

    /// Sets the rows a uid other than root may have (the policy's
    /// `stats_names` quota, at least one); rows already held past it stay
    /// until their names are unregistered and their rows reused.
    pub fn set_max_per_uid(&mut self, n: usize) {
        self.max_per_uid = n.max(1);
    }

    /// The tag of `name`'s row, if it has one: kept with a route, it finds
    /// the row without a name lookup ([`Stats::service_in`]).
    pub fn tag_of(&self, name: &str) -> Option<u32> {
        self.slots.get(name).map(|&slot| self.tag(slot))
    }

    /// `name` was registered by a connection of `uid`: gives it a row if
    /// it has none, while there are fewer than `max_names`, else the row
    /// of the name that stopped being registered longest ago (its counts
    /// are dropped). A uid other than root has at most its share of the
    /// rows (the policy's `stats_names` quota, [`Stats::set_max_per_uid`];
    /// without a share one user could fill the table with made-up names and
    /// make every `zrpcd.stats` answer, for everyone, as large as the
    /// table): past it, the name gets the uid's own row
    /// that stopped being registered longest ago. Returns the row's tag;
    /// `None` when no row may be given (the name is then counted under
    /// [`OTHER`]). O(1) amortised; O(`max_names`) when a uid at its share
    /// registers a new name.
    pub fn registered(&mut self, name: &str, uid: u32) -> Option<u32> {
        if let Some(&slot) = self.slots.get(name) {
            self.rows[slot as usize].registered = true;
            return Some(self.tag(slot));
        }
        self.version += 1;
        let owned = self.owned.get(&uid).copied().unwrap_or(0);
        if uid != 0 && owned >= self.max_per_uid {
            // At its share: one of its own idle rows, if it has one.
            let at = self.idle.iter().position(|&slot| {
                let row = &self.rows[slot as usize];
                row.owner == uid && !row.registered
            })?;
            let slot = self.idle.remove(at)?;
            self.rows[slot as usize].in_idle = false;
            return Some(self.give(slot, name, uid));
        }
        if self.services.len() - 2 < self.max_names {
            let slot = self.push_row(name);
            let row = &mut self.rows[slot as usize];
            row.registered = true;
            row.owner = uid;
            *self.owned.entry(uid).or_default() += 1;
            return Some(self.tag(slot));
        }
        while let Some(slot) = self.idle.pop_front() {
            let row = &mut self.rows[slot as usize];
            row.in_idle = false;
            if row.registered {
                continue;
            }
            return Some(self.give(slot, name, uid));
        }
        None
    }

    /// Gives the idle row `slot` to `name`, registered by `uid`, with a
    /// new generation and its counts dropped.
    fn give(&mut self, slot: u32, name: &str, uid: u32) -> u32 {
        let row = &mut self.rows[slot as usize];
        let before = std::mem::replace(&mut row.owner, uid);
        row.registered = true;
        row.generation = row.generation.wrapping_add(1);
        if before != uid {
            if let Some(n) = self.owned.get_mut(&before) {
                *n -= 1;
                if *n == 0 {
                    self.owned.remove(&before);
                }
            }
            *self.owned.entry(uid).or_default() += 1;
        }
        let entry = &mut self.services[slot as usize];
        self.slots.remove(&entry.0);
        *entry = (name.to_owned(), ServiceStats::default());
        self.slots.insert(name.to_owned(), slot);
        self.tag(slot)
    }

    /// No connection holds `name` any more: its row may go to a new name.
    pub fn unregistered(&mut self, name: &str) {
        let Some(&slot) = self.slots.get(name) else {
            return;
        };
        let row = &mut self.rows[slot as usize];
        row.registered = false;
        if slot >= 2 && !row.in_idle {
            row.in_idle = true;
            self.idle.push_back(slot);
        }
    }

    /// The entry a route's tag names if it is current, else `name`'s (or
    /// [`OTHER`]'s).
    pub fn service_in(&mut self, tag: Option<u32>, name: &str) -> &mut ServiceStats {
        self.version += 1;
        match tag.and_then(|t| self.slot_of_tag(t)) {
            Some(slot) => &mut self.services[slot as usize].1,
            None => self.service(name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_bounded_and_reused_only_for_unregistered_names() {
        let mut s = Stats::new(2);
        let a = s.registered("a", 0).expect("row for a");
        let b = s.registered("b", 0).expect("row for b");
        assert_eq!(s.registered("a", 0), Some(a));
        // Full of registered names: "c" is counted under OTHER.
        assert_eq!(s.registered("c", 0), None);
        s.service("c").answered += 1;
        s.service("never-registered").answered += 1;
        assert_eq!(s.services[OTHER_SLOT as usize].1.answered, 2);
        // "a" went away: its row goes to "c", with a new generation.
        s.service_in(Some(a), "a").answered += 5;
        s.unregistered("a");
        let c = s.registered("c", 0).expect("a's row");
        assert_ne!(c, a);
        assert_eq!(c & 0xffff, a & 0xffff);
        assert!(!s.tag_is_current(Some(a)));
        assert!(s.tag_is_current(Some(c)));
        assert_eq!(s.tag_of("a"), None);
        assert_eq!(s.service_in(Some(c), "c").answered, 0, "counts start anew");
        // A stale tag falls back to the name: "a" is now under OTHER.
        s.service_in(Some(a), "a").answered += 1;
        assert_eq!(s.services[OTHER_SLOT as usize].1.answered, 3);
        assert_eq!(s.services.len(), 4);
        // Registered again before its row was taken: it keeps it.
        s.unregistered("b");
        assert_eq!(s.registered("b", 0), Some(b));
        assert_eq!(s.registered("d", 0), None, "b's row is not free any more");
        // Churn does not grow the idle queue.
        for _ in 0..1000 {
            s.unregistered("b");
            s.registered("b", 0);
        }
        assert!(s.idle.len() <= 2, "{}", s.idle.len());
    }

    #[test]
    fn a_uid_has_at_most_its_share_of_the_rows() {
        // 8 rows, 2 per uid other than root.
        let mut s = Stats::new(8);
        assert_eq!(s.max_per_uid, 2, "a quarter of 8");
        let a = s.registered("a1", 1000).expect("row");
        s.registered("a2", 1000).expect("row");
        // Past its share, while its rows are registered: under OTHER.
        assert_eq!(s.registered("a3", 1000), None);
        // Others still get rows; root has no share.
        s.registered("b1", 1001).expect("row");
        for i in 0..4 {
            s.registered(&format!("r{i}"), 0).expect("root's row");
        }
        assert_eq!(s.services.len(), 2 + 7);
        // Its names went away: a new one gets its oldest idle row, not
        // another user's or a free one.
        s.unregistered("b1");
        s.unregistered("a2");
        s.unregistered("a1");
        let a3 = s.registered("a3", 1000).expect("a2's row");
        assert_eq!(s.tag_of("a2"), None);
        assert_eq!(s.tag_of("b1").map(|t| t & 0xffff), Some(4));
        assert_eq!(s.services.len(), 2 + 7, "no new row");
        let a4 = s.registered("a4", 1000).expect("a1's row");
        assert_eq!(a4 & 0xffff, a & 0xffff);
        assert_ne!(a3 & 0xffff, a & 0xffff);
        assert_eq!(s.registered("a5", 1000), None);
        // A row taken from uid 1001 counts against its taker.
        s.registered("c1", 1002).expect("the last free row");
        s.registered("c2", 1002).expect("b1's row, idle");
        assert_eq!(s.tag_of("b1"), None);
        assert_eq!(s.owned.get(&1001), None);
        assert_eq!(s.owned.get(&1002), Some(&2));
        assert_eq!(s.registered("c3", 1002), None);
    }
}
