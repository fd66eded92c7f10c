//! The pending calls' deadlines, one timer structure for all of them (a
//! hierarchical timer wheel: arming and disarming cost O(1), whatever the
//! number of calls), and the table's clock: call start times are kept as
//! microseconds since the table was created, 8 bytes per call instead of
//! an `Instant`'s 16.

use std::cell::Cell;
use std::task::{Context, Poll};
use std::time::Instant;

use tokio_util::time::{delay_queue, DelayQueue};

/// A call's armed deadline.
pub(super) type TimerKey = delay_queue::Key;

/// Deadlines of pending calls (by broker call id), and the clock.
#[derive(Debug)]
pub(super) struct Timers {
    queue: DelayQueue<u64>,
    base: Instant,
    /// The last `now` turned into microseconds since `base`: a read batch
    /// gives all its frames the same `now`, so each call's two conversions
    /// (at insert and at the end) are mostly a comparison.
    last_now: Cell<(Instant, u64)>,
}

impl Default for Timers {
    fn default() -> Self {
        let base = Instant::now();
        Timers {
            queue: DelayQueue::new(),
            base,
            last_now: Cell::new((base, 0)),
        }
    }
}

impl Timers {
    /// Arms a deadline for call `id`. Needs a tokio time driver in context.
    pub(super) fn arm(&mut self, id: u64, deadline: Instant) -> TimerKey {
        self.queue.insert_at(id, deadline.into())
    }

    /// Disarms a deadline that has not expired.
    pub(super) fn disarm(&mut self, key: &TimerKey) {
        self.queue.remove(key);
    }

    /// When an armed deadline passes.
    pub(super) fn deadline(&self, key: &TimerKey) -> Instant {
        self.queue.deadline(key).into_std()
    }

    /// Polls for the next call whose deadline passed (its timer is then
    /// consumed). With no timer armed, the waker is kept and woken by the
    /// next `arm`.
    pub(super) fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<u64> {
        match self.queue.poll_expired(cx) {
            Poll::Ready(Some(exp)) => Poll::Ready(exp.into_inner()),
            Poll::Ready(None) | Poll::Pending => Poll::Pending,
        }
    }

    /// Microseconds from the table's creation to `now` (0 before it).
    pub(super) fn micros(&self, now: Instant) -> u64 {
        let (last, us) = self.last_now.get();
        if now == last {
            return us;
        }
        let us = now.saturating_duration_since(self.base).as_micros() as u64;
        self.last_now.set((now, us));
        us
    }

    /// Armed deadlines.
    pub(super) fn len(&self) -> usize {
        self.queue.len()
    }
}
