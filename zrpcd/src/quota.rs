//! Per-user quotas: what the connections of one uid may hold together, so
//! that one local user cannot exhaust the broker-wide limits for the others
//! (the way dbus-broker accounts per user). Root is exempt (it is trusted,
//! and the system's services must not be starved by their own quota).
//!
//! Each connection keeps a handle on its user's [`Usage`], so the call path
//! counts without a table lookup.

use std::cell::Cell;
use std::rc::Rc;
use std::time::Instant;

use rustc_hash::FxHashMap;
use serde::Deserialize;

use crate::rate::{Gcra, Rate};

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
    /// Payload descriptors (sealed memfds) the broker holds for the
    /// user's connections, with the other descriptors the user sent that
    /// wait for their close ([`crate::closer`]).
    pub fds: usize,
    /// Names registered (a name held by several of its connections, shared,
    /// counts once for each).
    pub names: usize,
    /// Rows of per-name statistics in `zrpcd.stats` for the names the
    /// user registered (a quarter of `--max-stats-names` by default, see
    /// [`crate::stats::Stats::registered`]).
    pub stats_names: usize,
    /// Calls to the introspection methods whose answers grow with the
    /// broker (`zrpcd.list`, `zrpcd.peers`, `zrpcd.stats`) per second, at
    /// most that many at once after a pause; 0: no limit (see
    /// [`Users::introspect`]).
    pub introspection_per_second: u32,
    /// `--max-queued-total`: not a quota of one user, but what all users'
    /// queues may hold together before those holding more than their
    /// share are pushed back ([`Users::over_share`]).
    pub queued_total: usize,
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
    /// Payload descriptors held for one uid's connections.
    pub fds: Option<usize>,
    /// Names registered by one uid's connections.
    pub names: Option<usize>,
    /// Rows of per-name statistics for one uid's names.
    pub stats_names: Option<usize>,
    /// Calls to `zrpcd.list`, `zrpcd.peers` and `zrpcd.stats` per second
    /// by one uid (0: no limit).
    pub introspection_per_second: Option<u32>,
}

/// The default of [`Quota::introspection_per_second`]: far more than a
/// person or a monitoring system asks (`zrpc list` makes two such calls),
/// far less than the 10,000-15,000 `zrpcd.stats` answers a second one
/// user could have the broker encode and write, 100 KB each.
pub const DEFAULT_INTROSPECTION_PER_SECOND: u32 = 100;

/// The broker-wide limits a quota's defaults are shares of (from the
/// [`crate::Config`], [`crate::Config::quota_limits`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// `--max-connections`.
    pub max_connections: usize,
    /// `--max-pending-total`.
    pub max_pending_total: usize,
    /// `--max-pending-bytes`.
    pub max_pending_bytes: usize,
    /// `--max-partial-bytes`.
    pub max_partial_bytes: usize,
    /// `--max-queued-bytes` (per connection).
    pub max_queued_bytes: usize,
    /// `--max-fds`.
    pub max_fds: usize,
    /// `--max-names`.
    pub max_names: usize,
    /// `--max-queued-total`.
    pub max_queued_total: usize,
    /// `--max-stats-names`.
    pub max_stats_names: usize,
}

impl Quota {
    /// The quota from the broker-wide limits (a quarter of each, at least
    /// one) and the policy file's overrides.
    pub fn new(limits: Limits, overrides: QuotaOverrides) -> Quota {
        let quarter = |n: usize| (n / 4).max(1);
        Quota {
            connections: overrides
                .connections
                .unwrap_or(quarter(limits.max_connections)),
            pending_calls: overrides
                .pending_calls
                .unwrap_or(quarter(limits.max_pending_total)),
            pending_bytes: overrides
                .pending_bytes
                .unwrap_or(quarter(limits.max_pending_bytes)),
            partial_bytes: overrides
                .partial_bytes
                .unwrap_or(quarter(limits.max_partial_bytes)),
            // No broker-wide limit to take a share of: four connections'
            // worth (--max-queued-bytes each).
            queued_bytes: overrides
                .queued_bytes
                .unwrap_or(limits.max_queued_bytes.saturating_mul(4)),
            fds: overrides.fds.unwrap_or(quarter(limits.max_fds)),
            names: overrides.names.unwrap_or(quarter(limits.max_names)),
            stats_names: overrides.stats_names.unwrap_or(quarter(
                limits.max_stats_names.min(crate::stats::MAX_STATS_NAMES),
            )),
            introspection_per_second: overrides
                .introspection_per_second
                .unwrap_or(DEFAULT_INTROSPECTION_PER_SECOND),
            queued_total: limits.max_queued_total,
        }
    }
}

/// What the queues of all users hold together: bytes queued unread, and
/// how many users have any. Per-user quotas bound each uid, not all of
/// them: N uids (one user's subordinate uids, say) would hold N quotas.
/// Past `--max-queued-total`, the users holding more than the fair level
/// (max-min fair: the level at which the users' holdings, each capped at
/// it, add up to the bound) are pushed back as if past their own quota
/// ([`Users::over_share`]); the users under it are not, however many small
/// holders (uids) another user brings in.
#[derive(Debug, Default)]
pub struct QueuedTotal {
    bytes: Cell<usize>,
    holders: Cell<usize>,
    /// Sockets the broker holds open for all users (see
    /// [`Usage::connections`]).
    connections: Cell<usize>,
}

/// What one uid's connections hold now. The counters change only in
/// pairs (charge and release), through the methods below, called by the
/// peers table ([`crate::peers`]) and the peers' outbound queues
/// ([`crate::queue`]).
#[derive(Debug, Default)]
pub struct Usage {
    uid: u32,
    /// Sockets the broker holds open for the user: its live connections,
    /// and the closed ones still flushing their last frames
    /// (`--close-flush-timeout`) or waiting for their peer to take the
    /// descriptors sent to it. Charged and released by the connection's
    /// outbound queue ([`crate::queue`]), which lives as long as its socket.
    connections: Cell<usize>,
    /// Calls pending.
    pending_calls: Cell<usize>,
    /// Argument bytes of pending calls.
    pending_bytes: Cell<usize>,
    /// Partial-frame bytes.
    partial_bytes: Cell<usize>,
    /// Bytes queued towards its connections and not yet written.
    queued_bytes: Cell<usize>,
    /// Payload descriptors held for its connections.
    fds: Cell<usize>,
    /// Payload descriptors queued towards its connections and not yet
    /// written.
    queued_fds: Cell<usize>,
    /// Names registered by its connections.
    names: Cell<usize>,
    /// Its work in the current round of the broker's thread
    /// ([`crate::fair`]).
    share: Rc<crate::fair::Share>,
    /// All users' queued bytes (shared by every user's `Usage`).
    total: Rc<QueuedTotal>,
}

fn add(c: &Cell<usize>, n: usize) {
    c.set(c.get() + n);
}

/// Takes back `n` of what [`add`] counted: never more than was counted
/// (the pairs above see to it; debug builds check). Saturating all the
/// same: a release build must not wrap a user's account past zero (the
/// user would be over quota until the broker restarts).
fn sub(c: &Cell<usize>, n: usize) {
    debug_assert!(c.get() >= n, "a user's account released more than it held");
    c.set(c.get().saturating_sub(n));
}

impl Usage {
    /// The uid.
    pub fn uid(&self) -> u32 {
        self.uid
    }

    /// Its work in the current round of the broker's thread.
    pub fn share(&self) -> &Rc<crate::fair::Share> {
        &self.share
    }

    /// Whether quotas apply to this user (not to root).
    pub fn limited(&self) -> bool {
        self.uid != 0
    }

    /// Sockets the broker holds open for the user (live connections and
    /// closing ones).
    pub fn connections(&self) -> usize {
        self.connections.get()
    }

    /// Calls pending.
    pub fn pending_calls(&self) -> usize {
        self.pending_calls.get()
    }

    /// Argument bytes of pending calls.
    pub fn pending_bytes(&self) -> usize {
        self.pending_bytes.get()
    }

    /// Read buffer held for partly received frames.
    pub fn partial_bytes(&self) -> usize {
        self.partial_bytes.get()
    }

    /// Bytes queued towards its connections and not yet written.
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes.get()
    }

    /// Whether all users' queues together hold more than `max` bytes (then
    /// [`Users::over_share`] says who is pushed back).
    pub fn total_over(&self, max: usize) -> bool {
        self.total.bytes.get() > max
    }

    /// Payload descriptors held for its connections.
    pub fn fds(&self) -> usize {
        self.fds.get()
    }

    /// Names registered by its connections.
    pub fn names(&self) -> usize {
        self.names.get()
    }

    /// One of its connections registered (`true`) or let go of (`false`)
    /// a name ([`crate::peers::Peers::add_name`]).
    pub(crate) fn hold_name(&self, held: bool) {
        if held {
            add(&self.names, 1);
        } else {
            sub(&self.names, 1);
        }
    }

    /// The broker took (`true`) or let go of (`false`) one payload
    /// descriptor of this user ([`crate::payload::FdHold`]).
    pub(crate) fn hold_fd(&self, held: bool) {
        if held {
            add(&self.fds, 1);
        } else {
            sub(&self.fds, 1);
        }
    }

    /// The broker holds a socket of this user's (a connection accepted).
    pub(crate) fn charge_connection(&self) {
        add(&self.connections, 1);
        add(&self.total.connections, 1);
    }

    /// A socket charged by [`Usage::charge_connection`] is closed.
    pub(crate) fn release_connection(&self) {
        sub(&self.connections, 1);
        sub(&self.total.connections, 1);
    }

    /// A connection of this user went away, with `calls` pending calls of
    /// `call_bytes` argument bytes, `partial` bytes of partial frame and
    /// `names` names (its socket counts until it is closed,
    /// [`Usage::release_connection`]).
    pub(crate) fn release_peer(
        &self,
        calls: usize,
        call_bytes: usize,
        partial: usize,
        names: usize,
    ) {
        sub(&self.names, names);
        sub(&self.pending_calls, calls);
        sub(&self.pending_bytes, call_bytes);
        sub(&self.partial_bytes, partial);
    }

    /// A call with `size` argument bytes is pending.
    pub(crate) fn charge_call(&self, size: usize) {
        add(&self.pending_calls, 1);
        add(&self.pending_bytes, size);
    }

    /// A call charged by [`Usage::charge_call`] ended.
    pub(crate) fn release_call(&self, size: usize) {
        sub(&self.pending_calls, 1);
        sub(&self.pending_bytes, size);
    }

    /// A connection's partial frame went from `before` to `after` bytes.
    pub(crate) fn hold_partial(&self, before: usize, after: usize) {
        sub(&self.partial_bytes, before);
        add(&self.partial_bytes, after);
    }

    /// A queue's unwritten bytes went from `before` to `after`.
    pub(crate) fn requeue(&self, before: usize, after: usize) {
        let old = self.queued_bytes.get();
        sub(&self.queued_bytes, before);
        add(&self.queued_bytes, after);
        let new = self.queued_bytes.get();
        let t = &self.total;
        t.bytes.set(t.bytes.get().saturating_sub(old) + new);
        if (old == 0) != (new == 0) {
            if new == 0 {
                sub(&t.holders, 1);
            } else {
                add(&t.holders, 1);
            }
        }
    }

    /// Payload descriptors queued towards its connections and not yet
    /// written (counted in its `fds` quota beside [`Usage::fds`]).
    pub fn queued_fds(&self) -> usize {
        self.queued_fds.get()
    }

    /// A queue's unwritten descriptors went from `before` to `after`.
    pub(crate) fn requeue_fds(&self, before: usize, after: usize) {
        sub(&self.queued_fds, before);
        add(&self.queued_fds, after);
    }
}

/// The max-min fair level of `max` among holdings: the largest `l` such
/// that the holdings, each capped at `l`, add up to at most `max` (all of
/// `max` for the largest holder if it holds it alone).
fn fair_level(holdings: impl Iterator<Item = usize>, max: usize) -> usize {
    let mut h: Vec<usize> = holdings.filter(|&q| q > 0).collect();
    h.sort_unstable();
    let mut left = max;
    let mut n = h.len();
    for q in h {
        if q.saturating_mul(n) <= left {
            left -= q;
            n -= 1;
        } else {
            return left / n;
        }
    }
    max
}

/// Bytes of an introspection answer that count as one call
/// ([`Users::charge_introspection`]).
pub const INTROSPECTION_UNIT: usize = 64 * 1024;

/// Every user with a live connection (or a closing one), and the recent
/// introspection rates of users with or without one.
#[derive(Debug, Default)]
pub struct Users {
    map: FxHashMap<u32, Rc<Usage>>,
    /// What all of them have queued.
    total: Rc<QueuedTotal>,
    /// The last fair level computed ([`Users::over_share`]), and the total
    /// it was computed at.
    level: Cell<(usize, usize)>,
    /// Each uid's rate of introspection calls ([`Users::introspect`]),
    /// kept apart from its usage: a user must not get a fresh allowance by
    /// closing all its connections and coming back. Forgotten once idle.
    introspection: FxHashMap<u32, Gcra>,
    /// Each uid's rate of name events logged at info
    /// ([`Users::log_name_event`]), kept apart from its usage likewise,
    /// with how many of its events were logged at debug only since its
    /// last one at info.
    name_logs: FxHashMap<u32, (Gcra, u64)>,
}

impl Users {
    /// The usage of `uid` (created with its first connection).
    pub fn get(&mut self, uid: u32) -> Rc<Usage> {
        self.map
            .entry(uid)
            .or_insert_with(|| {
                Rc::new(Usage {
                    uid,
                    total: self.total.clone(),
                    ..Usage::default()
                })
            })
            .clone()
    }

    /// Bytes queued unread towards all users' connections.
    pub fn queued_total(&self) -> usize {
        self.total.bytes.get()
    }

    /// Whether all users' queues together hold more than `max` bytes and
    /// `user` more than the fair level (see [`QueuedTotal`]): then it is
    /// pushed back as past its own quota. Returns the total and the level.
    /// The level is computed again (a sort of the users' holdings) only
    /// when the total moved by more than `max / 256` since the last time:
    /// the total passes `max` only under pressure.
    pub fn over_share(&self, user: &Usage, max: usize) -> Option<(usize, usize)> {
        let total = self.total.bytes.get();
        if total <= max {
            return None;
        }
        let (at, cached) = self.level.get();
        let level = if at != 0 && at.abs_diff(total) <= max / 256 {
            cached
        } else {
            let level = fair_level(self.map.values().map(|u| u.queued_bytes()), max);
            self.level.set((total, level));
            level
        };
        (user.queued_bytes() > level).then_some((total, level))
    }

    /// Sockets the broker holds open for `uid` now (live connections and
    /// closing ones).
    pub fn connections(&self, uid: u32) -> usize {
        self.map.get(&uid).map_or(0, |u| u.connections())
    }

    /// Sockets the broker holds open for all users (`--max-connections`
    /// bounds them).
    pub fn open_connections(&self) -> usize {
        self.total.connections.get()
    }

    /// Whether `uid` may make a call to an introspection method whose
    /// answer grows with the broker (`zrpcd.list`, `zrpcd.peers`,
    /// `zrpcd.stats`) at `now`, at most `per_second` a second (0: no
    /// limit); an allowed call is counted. Root is not limited.
    ///
    /// Such an answer costs the broker's only thread far more than routing
    /// a call (a `zrpcd.stats` answer is some 100 KB with a few hundred
    /// names registered): without a bound, one user calling them in a loop
    /// took a large part of the broker's CPU from everyone else.
    pub fn introspect(&mut self, uid: u32, now: Instant, per_second: u32) -> bool {
        match Rate::per_second(per_second) {
            Some(rate) if uid != 0 => self.introspection.entry(uid).or_default().allow(now, rate),
            _ => true,
        }
    }

    /// An introspection call of `uid` that [`Users::introspect`] allowed
    /// answered `bytes`: each [`INTROSPECTION_UNIT`] bytes of it past the
    /// first count as one call more (at `per_second`, as there), at most
    /// ten seconds' worth (so that one answer keeps its user refused for
    /// ten seconds at most, whatever `--max-message-size` allows). So a
    /// user's introspection answers cost the broker at most about
    /// `per_second` units a second however large the broker grew: a user
    /// holding 16,000 names on 4,000 connections made each `zrpcd.peers`
    /// answer 3.6 MB (7.6 ms of the broker's thread), and 64 of them a
    /// second took half of it.
    pub fn charge_introspection(&mut self, uid: u32, bytes: usize, per_second: u32) {
        let units = u32::try_from(bytes / INTROSPECTION_UNIT)
            .unwrap_or(u32::MAX)
            .min(per_second.saturating_mul(10));
        match Rate::per_second(per_second) {
            Some(rate) if uid != 0 && units > 0 => {
                if let Some(g) = self.introspection.get_mut(&uid) {
                    g.charge(rate, units);
                }
            }
            _ => {}
        }
    }

    /// Whether an event of `uid` at `now` that changes who holds a name (a
    /// name registered or unregistered, names released by a connection
    /// that closed) is logged at info: at most `per_second` of them a
    /// second, ten seconds' worth at once (0: no limit), the rest at debug.
    /// `Some(n)`: at info, and `n` of the user's events were logged at
    /// debug only since its last one there. Root is not limited.
    ///
    /// Any user can cause such events at will: registering and
    /// unregistering a name in a loop wrote a million lines (206 MB) in
    /// 3 s from the broker's only thread, past journald's rate limit,
    /// which then drops the broker's other lines too.
    pub fn log_name_event(&mut self, uid: u32, now: Instant, per_second: u32) -> Option<u64> {
        let Some(rate) = Rate::per_second(per_second).filter(|_| uid != 0) else {
            return Some(0);
        };
        let rate = Rate {
            burst: rate.burst.saturating_mul(10),
            ..rate
        };
        let (gcra, quiet) = self.name_logs.entry(uid).or_default();
        if gcra.allow(now, rate) {
            Some(std::mem::take(quiet))
        } else {
            *quiet += 1;
            None
        }
    }

    /// Forgets the users nothing refers to any more: no connection, and no
    /// closing connection's queue still holding unsent frames (those keep
    /// counting against their user until they are dropped, so that a user
    /// cannot shed its account by reconnecting); and the rates of
    /// introspection calls and name events that are back to a full
    /// allowance (saying how many of a user's name events were logged at
    /// debug only, if any).
    pub fn collect(&mut self, now: Instant) {
        self.map.retain(|_, u| Rc::strong_count(u) > 1);
        self.introspection.retain(|_, g| !g.is_idle(now));
        self.name_logs.retain(|&uid, (g, quiet)| {
            let idle = g.is_idle(now);
            if idle && *quiet > 0 {
                tracing::info!(
                    uid,
                    "{quiet} more name events of this user were logged at debug level only (--name-logs-per-second)"
                );
            }
            !idle
        });
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn an_introspection_answer_is_charged_by_size_for_ten_seconds_at_most() {
        let mut users = Users::default();
        let now = Instant::now();
        assert!(users.introspect(1000, now, 10));
        // 1 GiB: 16,384 units, charged as 100 (ten seconds at 10 a second).
        users.charge_introspection(1000, 1 << 30, 10);
        assert!(!users.introspect(1000, now + Duration::from_secs(9), 10));
        assert!(users.introspect(1000, now + Duration::from_secs(11), 10));
        // Under one unit: the call alone.
        let later = now + Duration::from_secs(100);
        assert!(users.introspect(1001, later, 1));
        users.charge_introspection(1001, INTROSPECTION_UNIT - 1, 1);
        assert!(users.introspect(1001, later + Duration::from_secs(1), 1));
        // Root is not charged.
        users.charge_introspection(0, 1 << 30, 10);
        assert!(users.introspect(0, now, 10));
    }

    #[test]
    fn name_events_are_logged_at_info_within_a_rate_per_uid() {
        let mut users = Users::default();
        let now = Instant::now();
        let at_info = |users: &mut Users, uid, at| users.log_name_event(uid, at, 2);
        // Ten seconds' worth at once, then the rest at debug, counted.
        for _ in 0..20 {
            assert_eq!(at_info(&mut users, 1000, now), Some(0));
        }
        for _ in 0..7 {
            assert_eq!(at_info(&mut users, 1000, now), None);
        }
        // Another uid has its own allowance; root is not limited.
        assert_eq!(at_info(&mut users, 1001, now), Some(0));
        for _ in 0..100 {
            assert_eq!(at_info(&mut users, 0, now), Some(0));
        }
        // Half a second later: one more, saying how many were not.
        let later = now + Duration::from_millis(500);
        assert_eq!(at_info(&mut users, 1000, later), Some(7));
        assert_eq!(at_info(&mut users, 1000, later), None);
        // Kept until back to a full allowance.
        users.collect(now + Duration::from_secs(5));
        assert!(users.name_logs.contains_key(&1000));
        users.collect(now + Duration::from_secs(11));
        assert!(users.name_logs.is_empty());
        assert_eq!(users.log_name_event(1000, now, 0), Some(0), "0: no limit");
    }

    #[test]
    fn the_names_quota_is_a_quarter_of_max_names_unless_set() {
        let limits = crate::Config::new(None).quota_limits();
        assert_eq!(limits.max_names, crate::config::DEFAULT_MAX_NAMES);
        let q = Quota::new(limits, QuotaOverrides::default());
        assert_eq!(q.names, crate::config::DEFAULT_MAX_NAMES / 4);
        let set = QuotaOverrides {
            names: Some(3),
            ..QuotaOverrides::default()
        };
        assert_eq!(Quota::new(limits, set).names, 3);
        let q = Quota::new(limits, QuotaOverrides::default());
        assert_eq!(
            q.stats_names,
            crate::config::DEFAULT_MAX_STATS_NAMES as usize / 4
        );
        let set = QuotaOverrides {
            stats_names: Some(7),
            ..QuotaOverrides::default()
        };
        assert_eq!(Quota::new(limits, set).stats_names, 7);
        let u = Usage::default();
        u.charge_connection();
        u.hold_name(true);
        u.hold_name(true);
        u.hold_name(false);
        assert_eq!(u.names(), 1);
        u.release_peer(0, 0, 0, 1);
        assert_eq!(u.names(), 0);
    }

    #[test]
    fn introspection_is_metered_per_uid_and_kept_until_idle() {
        let mut users = Users::default();
        let now = Instant::now();
        let allowed = |users: &mut Users, uid: u32, at: Instant, n: u32| {
            (0..50).filter(|_| users.introspect(uid, at, n)).count()
        };
        assert_eq!(allowed(&mut users, 1000, now, 10), 10, "one second's worth");
        assert_eq!(allowed(&mut users, 1001, now, 10), 10, "each uid its own");
        assert_eq!(allowed(&mut users, 0, now, 10), 50, "root is not metered");
        assert_eq!(allowed(&mut users, 1002, now, 0), 50, "0: no limit");
        // No connection holds uid 1000 (never did here): its rate is kept
        // all the same until it is back to a full allowance, so that
        // coming back on a new connection does not refill it.
        users.collect(now);
        assert_eq!(allowed(&mut users, 1000, now, 10), 0);
        assert_eq!(
            allowed(&mut users, 1000, now + Duration::from_millis(200), 10),
            2
        );
        // Calls paid for are forgotten (1003's by now + 100 ms; 1000's not
        // before now + 1.2 s).
        assert!(users.introspect(1003, now, 10));
        users.collect(now + Duration::from_millis(500));
        assert!(users.introspection.contains_key(&1000));
        assert!(!users.introspection.contains_key(&1003));
        let q = Quota::new(
            crate::Config::new(None).quota_limits(),
            QuotaOverrides::default(),
        );
        assert_eq!(q.introspection_per_second, DEFAULT_INTROSPECTION_PER_SECOND);
    }

    #[test]
    fn past_the_total_only_users_over_their_share_are_pushed_back() {
        let mut users = Users::default();
        let (a, b) = (users.get(1000), users.get(1001));
        a.requeue(0, 700);
        b.requeue(0, 100);
        assert_eq!(users.queued_total(), 800);
        // Under the total: nobody.
        assert_eq!(users.over_share(&a, 1000), None);
        // Past it (600: b's 100 fits, a's level is the other 500): a, not
        // b.
        assert_eq!(users.over_share(&a, 600), Some((800, 500)));
        assert_eq!(users.over_share(&b, 600), None);
        // b's queue drains: one holder left, the whole bound its level.
        b.requeue(100, 0);
        assert_eq!(users.queued_total(), 700);
        assert_eq!(users.over_share(&a, 600), Some((700, 600)));
        a.requeue(700, 0);
        assert_eq!(users.queued_total(), 0);
        assert_eq!(users.total.holders.get(), 0);
    }

    #[test]
    fn the_fair_level_is_not_shrunk_by_many_small_holders() {
        // 100 small holders and one large: the level stays where the large
        // ones are cut, not at max / 102 (a user briefly holding 12 MB
        // among 100 uids of 400 KB was pushed back by a plain share).
        let mut h = vec![400_000; 100];
        h.push(12_000_000);
        h.push(5_000_000_000);
        let level = fair_level(h.iter().copied(), 1 << 30);
        assert!(level > 12_000_000, "{level}");
        assert_eq!(fair_level([100, 700].into_iter(), 600), 500);
        assert_eq!(fair_level([300, 300].into_iter(), 600), 600);
        assert_eq!(fair_level(std::iter::empty(), 600), 600);
    }
}
