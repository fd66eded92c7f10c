//! The recent window of a service's statistics: the last minute, kept as
//! six 10-second slots that are reused in turn.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::histogram::Histogram;

/// Length of one slot.
pub const SLOT: Duration = Duration::from_secs(10);
/// Slots kept: the window covers the last `SLOTS * SLOT` (60 s) at most,
/// and at least `(SLOTS - 1) * SLOT` (50 s) of completed time plus the
/// current slot.
pub const SLOTS: usize = 6;

/// The number of the slot period `now` falls in, counted from the first
/// time this is asked.
pub fn epoch(now: Instant) -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    let origin = *ORIGIN.get_or_init(|| now);
    now.saturating_duration_since(origin).as_secs() / SLOT.as_secs()
}

#[derive(Debug, Clone, Default)]
struct Slot {
    epoch: u64,
    latency: Histogram,
    errors: u64,
}

/// Answered calls, errors and latencies of the last minute.
#[derive(Debug, Clone, Default)]
pub struct Window {
    slots: [Slot; SLOTS],
}

/// What [`Window::view`] adds up.
#[derive(Debug, Default)]
pub struct Recent {
    /// Latencies of the calls answered in the window (its count is the
    /// number of answered calls).
    pub latency: Histogram,
    /// Calls that ended in an error in the window.
    pub errors: u64,
}

impl Window {
    fn slot(&mut self, epoch: u64) -> &mut Slot {
        let s = &mut self.slots[(epoch % SLOTS as u64) as usize];
        if s.epoch != epoch {
            s.epoch = epoch;
            s.latency.clear();
            s.errors = 0;
        }
        s
    }

    /// Counts an answered call in slot period `epoch`.
    pub fn answered(&mut self, epoch: u64, latency: Duration, error: bool) {
        let s = self.slot(epoch);
        s.latency.record(latency);
        s.errors += u64::from(error);
    }

    /// Counts a call that ended in an error without an answer.
    pub fn failed(&mut self, epoch: u64) {
        self.slot(epoch).errors += 1;
    }

    /// The last minute as seen in slot period `now_epoch`.
    pub fn view(&self, now_epoch: u64) -> Recent {
        let mut r = Recent::default();
        for s in &self.slots {
            if s.epoch + (SLOTS as u64) > now_epoch && s.epoch <= now_epoch {
                r.latency.merge(&s.latency);
                r.errors += s.errors;
            }
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_slots_leave_the_window() {
        let mut w = Window::default();
        w.answered(0, Duration::from_micros(100), false);
        w.answered(3, Duration::from_micros(200), true);
        w.failed(5);
        let r = w.view(5);
        assert_eq!(r.latency.count(), 2);
        assert_eq!(r.errors, 2);
        // Six periods on, slot 0 is out; slot 3 still in.
        let r = w.view(6);
        assert_eq!(r.latency.count(), 1);
        // Slot 0 reused for period 6: the old counts are gone.
        w.answered(6, Duration::from_micros(300), false);
        let r = w.view(6);
        assert_eq!(r.latency.count(), 2);
        assert_eq!(r.latency.sum_us(), 500);
        assert_eq!(w.view(20).latency.count(), 0, "all old");
    }
}
