//! Broker-wide counters and per-service latency histograms.

use std::time::Duration;

use rustc_hash::{FxBuildHasher, FxHashMap};
use zrpc_proto::ErrorCode;

/// A log-scale latency histogram: 8 buckets per power of two of
/// microseconds, so a percentile is exact to within about 9%.
#[derive(Debug, Clone)]
pub struct Histogram {
    buckets: Vec<u64>,
    count: u64,
}

const SUB: u32 = 8;

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: vec![0; (64 * SUB) as usize],
            count: 0,
        }
    }
}

impl Histogram {
    fn index(us: u64) -> usize {
        if us < SUB as u64 {
            return us as usize;
        }
        let exp = 63 - us.leading_zeros(); // >= 3
        let mantissa = (us >> (exp - 3)) & (SUB as u64 - 1);
        ((exp - 2) * SUB) as usize + mantissa as usize
    }

    fn lower_bound(idx: usize) -> u64 {
        let idx = idx as u64;
        if idx < SUB as u64 {
            return idx;
        }
        let exp = idx / SUB as u64 + 2;
        let mantissa = idx % SUB as u64;
        (SUB as u64 + mantissa) << (exp - 3)
    }

    /// Records one sample.
    pub fn record(&mut self, d: Duration) {
        let us = d.as_micros().min(u64::MAX as u128) as u64;
        let i = Self::index(us).min(self.buckets.len() - 1);
        self.buckets[i] += 1;
        self.count += 1;
    }

    /// Number of samples.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The `q`-quantile (0.0..=1.0) in microseconds, or 0 with no samples.
    pub fn quantile_us(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((q * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Self::lower_bound(i);
            }
        }
        0
    }
}

/// Counters for one service name.
#[derive(Debug, Default, Clone)]
pub struct ServiceStats {
    /// Calls answered by the service (successfully or with its own error).
    pub answered: u64,
    /// Calls that ended in an error of any kind.
    pub errors: u64,
    /// Latency of answered calls, broker-side (accept to reply).
    pub latency: Histogram,
}

/// The row of `zrpcd.stats` that counts calls to names without a row of
/// their own: names never registered (any local program can call made-up
/// names), and registered ones beyond `--max-stats-names`. Not a valid
/// service name, so it cannot clash with one.
pub const OTHER: &str = "(other)";

/// What [`Stats::track`] did for a registered name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tracked {
    /// The name already had its row, in this slot.
    Existing(u32),
    /// A new row was made, in this slot; if it reused the slot of a name no
    /// longer registered (`evicted`), keys kept elsewhere for that slot
    /// (route tags) must be dropped.
    New {
        /// The slot.
        slot: u32,
        /// Whether it held another name's row before.
        evicted: bool,
    },
    /// No row: the table is full of registered names; counted under
    /// [`OTHER`].
    Full,
}

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
    /// Per service name: the broker's own service, [`OTHER`], then names
    /// that are or were registered, at most `max_names` of them. A slot
    /// number is kept with the call's interned route so that ending a call
    /// finds its entry without a name lookup; a slot is reused only by
    /// [`Stats::track`], which says so.
    pub services: Vec<(String, ServiceStats)>,
    /// Slot in `services` by name (hashbrown for `entry_ref`: a key
    /// allocated only for a new name).
    slots: hashbrown::HashMap<String, u32, FxBuildHasher>,
    /// Most rows for registered names.
    max_names: usize,
}

/// Slot of the broker's own service.
const BROKER_SLOT: u32 = 0;
/// Slot of [`OTHER`].
const OTHER_SLOT: u32 = 1;

impl Stats {
    /// Empty counters, with rows for at most `max_names` registered names.
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
            slots: hashbrown::HashMap::default(),
            max_names,
        };
        s.push_row(zrpc_proto::BROKER_SERVICE);
        s.push_row(OTHER);
        s
    }

    fn push_row(&mut self, name: &str) -> u32 {
        let slot = self.services.len() as u32;
        self.services
            .push((name.to_owned(), ServiceStats::default()));
        self.slots.insert(name.to_owned(), slot);
        slot
    }

    /// Counts an error outcome.
    pub fn error(&mut self, code: ErrorCode) {
        *self.errors.entry(code.to_u16()).or_default() += 1;
        if code.is_timeout() {
            self.timeouts += 1;
        }
    }

    /// The entry of `name`, or of [`OTHER`] if it has none.
    pub fn service(&mut self, name: &str) -> &mut ServiceStats {
        let slot = self.slot(name).unwrap_or(OTHER_SLOT);
        self.service_at(slot)
    }

    /// The broker's own service's entry.
    pub fn broker_service(&mut self) -> &mut ServiceStats {
        self.service_at(BROKER_SLOT)
    }

    /// The slot of `name`'s entry, if it has one.
    pub fn slot(&self, name: &str) -> Option<u32> {
        self.slots.get(name).copied()
    }

    /// Gives the registered name `name` a row if it has none: a new one
    /// while there are fewer than `max_names`, else the row of a name that
    /// `is_registered` says is no longer registered (its counts are lost).
    pub fn track(&mut self, name: &str, is_registered: impl Fn(&str) -> bool) -> Tracked {
        if let Some(slot) = self.slot(name) {
            return Tracked::Existing(slot);
        }
        if self.services.len() - 2 < self.max_names {
            let slot = self.push_row(name);
            return Tracked::New {
                slot,
                evicted: false,
            };
        }
        let victim = self
            .services
            .iter()
            .skip(2)
            .position(|(n, _)| !is_registered(n))
            .map(|i| i as u32 + 2);
        let Some(slot) = victim else {
            return Tracked::Full;
        };
        let row = &mut self.services[slot as usize];
        self.slots.remove(&row.0);
        *row = (name.to_owned(), ServiceStats::default());
        self.slots.insert(name.to_owned(), slot);
        Tracked::New {
            slot,
            evicted: true,
        }
    }

    /// The entry in slot `slot` (from [`Stats::slot`] or [`Stats::track`]).
    pub fn service_at(&mut self, slot: u32) -> &mut ServiceStats {
        &mut self.services[slot as usize].1
    }

    /// The entry in `slot` if known, else `name`'s (or [`OTHER`]'s).
    pub fn service_in(&mut self, slot: Option<u32>, name: &str) -> &mut ServiceStats {
        match slot {
            Some(slot) => self.service_at(slot),
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
        assert_eq!(
            s.track("a", |_| true),
            Tracked::New {
                slot: 2,
                evicted: false
            }
        );
        assert_eq!(
            s.track("b", |_| true),
            Tracked::New {
                slot: 3,
                evicted: false
            }
        );
        assert_eq!(s.track("a", |_| true), Tracked::Existing(2));
        // Full of registered names: "c" is counted under OTHER.
        assert_eq!(s.track("c", |_| true), Tracked::Full);
        s.service("c").answered += 1;
        s.service("never-registered").answered += 1;
        assert_eq!(s.services[OTHER_SLOT as usize].1.answered, 2);
        // "a" went away: its row is reused.
        assert_eq!(
            s.track("c", |n| n != "a"),
            Tracked::New {
                slot: 2,
                evicted: true
            }
        );
        assert_eq!(s.slot("a"), None);
        assert_eq!(s.slot("c"), Some(2));
        assert_eq!(s.services.len(), 4);
    }

    #[test]
    fn quantiles_are_close() {
        let mut h = Histogram::default();
        for us in 1..=1000u64 {
            h.record(Duration::from_micros(us));
        }
        let p50 = h.quantile_us(0.5);
        let p99 = h.quantile_us(0.99);
        assert!((450..=500).contains(&p50), "{p50}");
        assert!((900..=990).contains(&p99), "{p99}");
        assert_eq!(Histogram::default().quantile_us(0.5), 0);
        for i in 0..200 {
            assert!(Histogram::lower_bound(i) <= Histogram::lower_bound(i + 1));
            assert_eq!(Histogram::index(Histogram::lower_bound(i)), i);
        }
    }
}
