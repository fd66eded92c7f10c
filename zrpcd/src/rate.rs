//! Rate limits, as a generic cell rate algorithm (GCRA): one instant of
//! state per limited thing, no timer. An event is allowed while the time
//! by which the allowed events so far would be paid for, at one per
//! [`Rate::every`], is at most `burst - 1` intervals ahead of now.
//!
//! Used for what the broker does for anyone who asks and which costs it
//! more than routing a call: encoding `zrpcd.stats`' rows again
//! ([`crate::builtin::StatsCache`]) and answering one uid's calls to the
//! introspection methods ([`crate::quota::Users::introspect`]).

use std::time::{Duration, Instant};

/// A rate: at most `burst` events at once, then one per `every`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// The interval one event pays for.
    pub every: Duration,
    /// Events allowed at once after a pause (at least 1).
    pub burst: u32,
}

impl Rate {
    /// `n` events a second, at most `n` of them at once (`None` for 0:
    /// no limit). Past 1,000,000,000 a second, one per nanosecond.
    pub fn per_second(n: u32) -> Option<Rate> {
        (n > 0).then(|| Rate {
            every: (Duration::from_secs(1) / n).max(Duration::from_nanos(1)),
            burst: n,
        })
    }
}

/// The state of one rate limit (see the module documentation).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Gcra {
    /// When the events allowed so far are paid for; `None` before the
    /// first.
    paid_until: Option<Instant>,
}

impl Gcra {
    /// Whether an event at `now` is within `rate`; an allowed event is
    /// counted.
    pub fn allow(&mut self, now: Instant, rate: Rate) -> bool {
        if let Some(paid) = self.paid_until {
            let ahead = paid.saturating_duration_since(now);
            if ahead > rate.every.saturating_mul(rate.burst.saturating_sub(1)) {
                return false;
            }
        }
        let from = self.paid_until.map_or(now, |p| p.max(now));
        // An `every` so long that the instant overflows: at most one event.
        self.paid_until = Some(from.checked_add(rate.every).unwrap_or(from));
        true
    }

    /// Counts `n` more events at `rate` after one was allowed (an event
    /// found to weigh more once done): the events after it are refused
    /// until they are paid for.
    pub fn charge(&mut self, rate: Rate, n: u32) {
        if let Some(paid) = self.paid_until {
            let more = rate.every.saturating_mul(n);
            self.paid_until = Some(paid.checked_add(more).unwrap_or(paid));
        }
    }

    /// Whether an event was ever allowed.
    pub fn started(&self) -> bool {
        self.paid_until.is_some()
    }

    /// Whether everything allowed is paid for at `now`: a fresh state
    /// would behave the same, so this one need not be kept.
    pub fn is_idle(&self, now: Instant) -> bool {
        self.paid_until.is_none_or(|p| p <= now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_one_per_interval() {
        let rate = Rate {
            every: Duration::from_millis(100),
            burst: 3,
        };
        let t0 = Instant::now();
        let mut g = Gcra::default();
        assert!(!g.started() && g.is_idle(t0));
        let allowed = (0..10).filter(|_| g.allow(t0, rate)).count();
        assert_eq!(allowed, 3, "the burst");
        assert!(!g.is_idle(t0));
        // One interval later, one more; not two.
        let t1 = t0 + Duration::from_millis(100);
        assert!(g.allow(t1, rate));
        assert!(!g.allow(t1, rate));
        // Paid for by t0 + 400 ms: idle from then on, and a full burst again.
        let t2 = t0 + Duration::from_millis(400);
        assert!(g.is_idle(t2));
        assert_eq!((0..10).filter(|_| g.allow(t2, rate)).count(), 3);
    }

    #[test]
    fn an_event_charged_more_is_paid_for_before_the_next() {
        let rate = Rate {
            every: Duration::from_millis(100),
            burst: 3,
        };
        let t0 = Instant::now();
        let mut g = Gcra::default();
        g.charge(rate, 5);
        assert!(!g.started(), "nothing to charge before an event");
        assert!(g.allow(t0, rate));
        g.charge(rate, 4);
        // Paid until t0 + 500 ms: refused until 300 ms (two intervals of
        // slack for a burst of three).
        assert!(!g.allow(t0 + Duration::from_millis(250), rate));
        assert!(g.allow(t0 + Duration::from_millis(300), rate));
        assert!(g.is_idle(t0 + Duration::from_millis(600)));
    }

    #[test]
    fn per_second_spreads_the_interval_and_zero_is_no_limit() {
        assert_eq!(Rate::per_second(0), None);
        let r = Rate::per_second(100).expect("a rate");
        assert_eq!((r.every, r.burst), (Duration::from_millis(10), 100));
    }
}
