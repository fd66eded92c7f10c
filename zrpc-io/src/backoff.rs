//! The reconnection backoff of zrpc, and the random numbers it and the
//! instance ids need. The clients, the service library and `zrpc monitor`
//! all reconnect with it.

use std::time::Duration;

/// Default first reconnection delay.
pub const DEFAULT_MIN: Duration = Duration::from_millis(10);

/// Default cap of the reconnection delay.
pub const DEFAULT_MAX: Duration = Duration::from_secs(1);

/// Capped exponential backoff with ±25% jitter: the delay before attempt
/// `n` (counting from 0) is `min(min * 2^n, max)`, multiplied by a random
/// factor in `[0.75, 1.25]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The first delay.
    pub min: Duration,
    /// The largest delay.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff {
            min: DEFAULT_MIN,
            max: DEFAULT_MAX,
        }
    }
}

impl Backoff {
    /// A backoff from `min` to `max`; `min` is at least 1 ms and `max` at
    /// least `min`.
    pub fn new(min: Duration, max: Duration) -> Backoff {
        let min = min.max(Duration::from_millis(1));
        Backoff {
            min,
            max: max.max(min),
        }
    }

    /// The un-jittered delay before attempt `attempt`.
    pub fn base(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.min.saturating_mul(factor).min(self.max)
    }

    /// The jittered delay before attempt `attempt`.
    pub fn delay(&self, attempt: u32) -> Duration {
        // A factor in [0.75, 1.25], in 1/1024 steps.
        let r = random_u64() % 513;
        self.base(attempt).mul_f64((768 + r) as f64 / 1024.0)
    }
}

/// Where a reconnecting peer is in its backoff sequence.
#[derive(Debug, Default, Clone, Copy)]
pub struct Retry {
    /// Attempts made since the sequence started.
    pub attempt: u32,
}

impl Retry {
    /// The delay before the next attempt; counts the attempt.
    pub fn next_delay(&mut self, b: &Backoff) -> Duration {
        let d = b.delay(self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        d
    }

    /// Starts the sequence over.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// A connection that stayed up for `up` ended: start the sequence over
    /// if it lasted at least the backoff cap (so that a broker accepting and
    /// dropping connections at once is not hammered).
    pub fn connection_ended(&mut self, b: &Backoff, up: Duration) {
        if up >= b.max {
            self.reset();
        }
    }
}

/// A random non-zero id: std's `RandomState` is seeded from the OS's random
/// source; the time, pid and a counter make ids differ even within one
/// process. Used for the `instance` of `Hello`.
pub fn random_id() -> u64 {
    use std::hash::{BuildHasher, Hash, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
        .hash(&mut h);
    std::process::id().hash(&mut h);
    COUNTER.fetch_add(1, Ordering::Relaxed).hash(&mut h);
    match h.finish() {
        0 => 1,
        v => v,
    }
}

/// A cheap random number (xorshift64*, seeded from [`random_id`]); only
/// used for jitter.
fn random_u64() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static STATE: AtomicU64 = AtomicU64::new(0);
    let mut x = STATE.load(Ordering::Relaxed);
    if x == 0 {
        x = random_id();
    }
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    STATE.store(x, Ordering::Relaxed);
    x.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_with_bounded_jitter() {
        let b = Backoff::new(Duration::from_millis(10), Duration::from_millis(100));
        assert_eq!(b.base(0), Duration::from_millis(10));
        assert_eq!(b.base(3), Duration::from_millis(80));
        assert_eq!(b.base(4), Duration::from_millis(100));
        assert_eq!(b.base(u32::MAX), Duration::from_millis(100));
        for a in 0..10 {
            let d = b.delay(a);
            assert!(d >= b.base(a).mul_f64(0.75) && d <= b.base(a).mul_f64(1.25));
        }
        let mut r = Retry::default();
        r.next_delay(&b);
        r.next_delay(&b);
        assert_eq!(r.attempt, 2);
        r.connection_ended(&b, Duration::from_millis(5));
        assert_eq!(r.attempt, 2);
        r.connection_ended(&b, Duration::from_millis(100));
        assert_eq!(r.attempt, 0);
    }

    #[test]
    fn ids_are_nonzero_and_differ() {
        let a = random_id();
        let b = random_id();
        assert!(a != 0 && b != 0 && a != b);
    }
}
