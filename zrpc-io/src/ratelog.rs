//! One kind of warning, rate-limited: logged at warn at most once per
//! interval, the occurrences in between counted (and logged at debug by
//! the caller), so that a peer repeating what causes it cannot flood the
//! log. Used by the broker (its refusals, `--warn-interval`) and by
//! services (a caller re-using a call's identity).

use std::time::{Duration, Instant};

/// When a kind of warning was last logged at warn, and how many were not
/// since.
#[derive(Debug, Default)]
pub struct RateLog {
    last_warn: Option<Instant>,
    quiet: u64,
}

impl RateLog {
    /// None logged yet.
    pub const fn new() -> RateLog {
        RateLog {
            last_warn: None,
            quiet: 0,
        }
    }

    /// Whether an occurrence at `now` is logged at warn (at most one per
    /// `every`); if so, also how many were not since the last one.
    pub fn warn_now(&mut self, now: Instant, every: Duration) -> Option<u64> {
        match self.last_warn {
            Some(t) if now.saturating_duration_since(t) < every => {
                self.quiet += 1;
                None
            }
            _ => {
                self.last_warn = Some(now);
                Some(std::mem::take(&mut self.quiet))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warnings_are_logged_at_most_once_per_interval() {
        let mut log = RateLog::new();
        let every = Duration::from_secs(10);
        let t0 = Instant::now();
        assert_eq!(log.warn_now(t0, every), Some(0));
        for i in 1..=5 {
            assert_eq!(log.warn_now(t0 + Duration::from_millis(i), every), None);
        }
        let later = t0 + every;
        assert_eq!(log.warn_now(later, every), Some(5));
        assert_eq!(log.warn_now(later + Duration::from_millis(1), every), None);
        assert_eq!(log.warn_now(later + every, every), Some(1));
    }
}
