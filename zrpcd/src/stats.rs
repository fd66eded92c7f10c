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

/// Broker-wide counters.
#[derive(Debug, Default)]
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
    /// Per service name, in order of first use; a slot number never
    /// changes, so the broker keeps it with the call's interned route and
    /// finds the entry without a name lookup per call.
    pub services: Vec<(String, ServiceStats)>,
    /// Slot in `services` by name (hashbrown for `entry_ref`: a key
    /// allocated only for a new name).
    slots: hashbrown::HashMap<String, u32, FxBuildHasher>,
}

impl Stats {
    /// Counts an error outcome.
    pub fn error(&mut self, code: ErrorCode) {
        *self.errors.entry(code.to_u16()).or_default() += 1;
        if code == ErrorCode::Timeout {
            self.timeouts += 1;
        }
    }

    /// Per-service entry.
    pub fn service(&mut self, name: &str) -> &mut ServiceStats {
        let slot = self.service_slot(name);
        self.service_at(slot)
    }

    /// The slot of `name`'s entry (created if needed).
    pub fn service_slot(&mut self, name: &str) -> u32 {
        let next = self.services.len() as u32;
        let slot = *self.slots.entry_ref(name).or_insert(next);
        if slot == next {
            self.services
                .push((name.to_owned(), ServiceStats::default()));
        }
        slot
    }

    /// The entry in slot `slot` (from [`Stats::service_slot`]).
    pub fn service_at(&mut self, slot: u32) -> &mut ServiceStats {
        &mut self.services[slot as usize].1
    }

    /// The entry in `slot` if known, else `name`'s.
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
