//! The latency histogram of one service (since start, or one slot of the
//! recent window).

use std::time::Duration;

/// Upper bounds (inclusive, microseconds) of the buckets exported to
/// monitoring systems (`zrpc stats --format openmetrics`), from 10 µs to
/// 60 s; a last bucket (`+Inf`) holds the rest. Fixed, so that a scraper
/// sees the same buckets every time.
pub const EXPORT_BOUNDS_US: [u64; 21] = [
    10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000,
    500_000, 1_000_000, 2_500_000, 5_000_000, 10_000_000, 30_000_000, 60_000_000,
];

/// Fine buckets per power of two of microseconds.
const SUB: u32 = 8;
/// Fine buckets in all (every `u64` of microseconds has one).
const FINE: usize = (64 * SUB) as usize;

/// A latency histogram with two sets of buckets:
///
/// - fine, log-scale buckets (8 per power of two of microseconds, each
///   1/8 of an octave wide) for quantiles, which are interpolated linearly
///   within the bucket holding the rank: the figure is within one bucket
///   width (at most 12.5 %) of the true sample, and exact below 8 µs;
/// - the fixed [`EXPORT_BOUNDS_US`] buckets, with the sum and count, for
///   export as an OpenMetrics histogram.
///
/// The fine buckets (4 KiB) are allocated at the first sample.
#[derive(Debug, Clone, Default)]
pub struct Histogram {
    fine: Vec<u64>,
    export: [u64; EXPORT_BOUNDS_US.len() + 1],
    count: u64,
    sum_us: u64,
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

    /// Smallest value (µs) of fine bucket `idx`.
    fn lower_bound(idx: usize) -> u64 {
        let idx = idx as u64;
        if idx < SUB as u64 {
            return idx;
        }
        let exp = idx / SUB as u64 + 2;
        let mantissa = idx % SUB as u64;
        (SUB as u64 + mantissa) << (exp - 3)
    }

    /// One past the largest value (µs) of fine bucket `idx`.
    fn upper_bound(idx: usize) -> f64 {
        if idx + 1 < FINE {
            Self::lower_bound(idx + 1) as f64
        } else {
            u64::MAX as f64
        }
    }

    /// Records one sample.
    pub fn record(&mut self, d: Duration) {
        let us = d.as_micros().min(u64::MAX as u128) as u64;
        if self.fine.is_empty() {
            self.fine = vec![0; FINE];
        }
        self.fine[Self::index(us)] += 1;
        self.export[EXPORT_BOUNDS_US.partition_point(|&b| b < us)] += 1;
        self.count += 1;
        self.sum_us = self.sum_us.saturating_add(us);
    }

    /// Forgets every sample (keeps the fine buckets' allocation).
    pub fn clear(&mut self) {
        self.fine.fill(0);
        self.export = Default::default();
        self.count = 0;
        self.sum_us = 0;
    }

    /// Number of samples.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Sum of the samples, in microseconds.
    pub fn sum_us(&self) -> u64 {
        self.sum_us
    }

    /// Cumulative counts of the export buckets: for each bound of
    /// [`EXPORT_BOUNDS_US`], the samples at most that long (the `+Inf`
    /// bucket is [`Histogram::count`]).
    pub fn cumulative_export(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        EXPORT_BOUNDS_US
            .iter()
            .zip(self.export.iter().scan(0, |acc, n| {
                *acc += n;
                Some(*acc)
            }))
            .map(|(&b, n)| (b, n))
    }

    /// Adds `other`'s samples to these.
    pub fn merge(&mut self, other: &Histogram) {
        if other.count == 0 {
            return;
        }
        if self.fine.is_empty() {
            self.fine = vec![0; FINE];
        }
        for (a, b) in self.fine.iter_mut().zip(&other.fine) {
            *a += b;
        }
        for (a, b) in self.export.iter_mut().zip(&other.export) {
            *a += b;
        }
        self.count += other.count;
        self.sum_us = self.sum_us.saturating_add(other.sum_us);
    }

    /// The `q`-quantile (0.0..=1.0) in microseconds, 0 with no samples:
    /// the value below which a fraction `q` of the samples fall, found in
    /// the fine bucket that holds rank `q * count` and interpolated
    /// linearly between that bucket's bounds (samples taken as spread
    /// evenly within it).
    pub fn quantile_us(&self, q: f64) -> f64 {
        if self.count == 0 {
            return 0.0;
        }
        let rank = (q.clamp(0.0, 1.0) * self.count as f64).max(f64::MIN_POSITIVE);
        let mut seen = 0u64;
        for (i, &n) in self.fine.iter().enumerate() {
            if n == 0 {
                continue;
            }
            if (seen + n) as f64 >= rank {
                let lo = Self::lower_bound(i) as f64;
                let within = (rank - seen as f64) / n as f64;
                return lo + (Self::upper_bound(i) - lo) * within;
            }
            seen += n;
        }
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_interpolated() {
        let mut h = Histogram::default();
        for us in 1..=1000u64 {
            h.record(Duration::from_micros(us));
        }
        let p50 = h.quantile_us(0.5);
        let p99 = h.quantile_us(0.99);
        // Uniform samples: interpolation lands close to the truth, not at
        // a bucket's lower bound (which was up to 12 % low).
        assert!((p50 - 500.0).abs() < 10.0, "{p50}");
        // Within its bucket [960, 1024) µs, which holds 960..=1000.
        assert!((p99 - 990.0).abs() < 990.0 * 0.02, "{p99}");
        assert_eq!(Histogram::default().quantile_us(0.5), 0.0);
        for i in 0..200 {
            assert!(Histogram::lower_bound(i) <= Histogram::lower_bound(i + 1));
            assert_eq!(Histogram::index(Histogram::lower_bound(i)), i);
        }
        assert_eq!(h.count(), 1000);
        assert_eq!(h.sum_us(), 500_500);
    }

    #[test]
    fn a_single_value_is_within_its_bucket() {
        let mut h = Histogram::default();
        for _ in 0..10 {
            h.record(Duration::from_micros(3_000));
        }
        let (lo, hi) = (3_000.0 * 0.875, 3_000.0 * 1.125);
        for q in [0.01, 0.5, 0.99, 1.0] {
            let v = h.quantile_us(q);
            assert!(lo <= v && v <= hi, "q{q}: {v}");
        }
    }

    #[test]
    fn export_buckets_are_cumulative_with_inclusive_bounds() {
        let mut h = Histogram::default();
        for us in [5, 10, 11, 1_000, 70_000_000] {
            h.record(Duration::from_micros(us));
        }
        let cum: Vec<_> = h.cumulative_export().collect();
        assert_eq!(cum[0], (10, 2), "le=10µs holds 5 and 10");
        assert_eq!(cum[1], (25, 3));
        assert_eq!(cum[6], (1_000, 4));
        assert_eq!(cum.last(), Some(&(60_000_000, 4)), "70 s only in +Inf");
        let mut m = Histogram::default();
        m.merge(&h);
        m.merge(&h);
        assert_eq!(m.count(), 10);
        assert_eq!(m.cumulative_export().nth(1), Some((25, 6)));
        assert_eq!(m.quantile_us(0.5), h.quantile_us(0.5));
    }
}
