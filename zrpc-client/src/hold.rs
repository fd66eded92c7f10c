//! When the writer task holds its queue back for the callers of a batch.
//!
//! One read hands out many outcomes at once (64 calls in flight, say); on
//! a multi-thread runtime their callers then run on several workers and
//! queue their next calls one by one, and the writer, woken by the first of
//! them, would write a few frames per `sendto`. Holding the queue until
//! every outcome handed out has been taken ([`Handout::all_taken`]) makes
//! one write carry them all (`strace -c`, 64 in flight, 50,000 calls: 5,198
//! `sendto` without the hold, 814 with it; 0.53-0.56M calls/s before,
//! 0.61-0.65M after, `bench/scripts/run.sh multi 64 64 200000`).
//!
//! A hold must not make anyone wait for long, though: a caller may keep an
//! answered call without taking its outcome (a future polled once, then
//! left aside in a `select!` loop), and a task may even wait for its own
//! next call before it takes an outcome of its own (it took one of two,
//! then called again). So a hold lasts at most [`MAX_HOLD`], and one that
//! ran out turns holding off for a while: until every outcome handed out
//! has been taken again a number of times ([`Handout::clears`]) that
//! doubles with each hold in a row that ran out, and halves back with each
//! hold that did not. A client whose pattern defeats the hold pays
//! [`MAX_HOLD`] a logarithmic number of times, not once per batch.

use std::pin::Pin;
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use crate::core::Handout;

/// The longest the writer holds queued calls back (see the module docs); a
/// normal hold ends within microseconds. Holds share one timer, re-armed
/// only once its deadline has passed (arming a timer can wake the runtime's
/// driver, a syscall, too dear for every hold), so a hold may end sooner.
pub(crate) const MAX_HOLD: Duration = Duration::from_millis(5);

/// The most doublings of the time off after holds that ran out: then a
/// hold is tried once per 4,096 batches.
const MAX_STRIKES: u32 = 12;

/// How a hold ended (see [`Hold::wait`]).
pub(crate) enum Ended {
    /// Every outcome handed out was taken: write now.
    Taken,
    /// The holder was woken for another reason (the connection was killed);
    /// it looks at its queue again.
    Woken,
    /// The hold ran out.
    RanOut,
}

/// The writer's hold policy and its timer.
pub(crate) struct Hold {
    max: Duration,
    /// The bound of the holds, shared by all of them.
    bound: Pin<Box<Sleep>>,
    /// Holding is off until the count of clears has moved this far from
    /// where it was (the hold that ran out, the span).
    off: Option<(usize, usize)>,
    /// Holds that ran out, less those that did not (at least 0).
    strikes: u32,
}

impl Hold {
    /// A policy whose holds last at most `max`.
    pub(crate) fn new(max: Duration) -> Hold {
        Hold {
            max,
            bound: Box::pin(tokio::time::sleep(max)),
            off: None,
            strikes: 0,
        }
    }

    /// Whether to hold now: some outcome handed out has not been taken, and
    /// holding is not off.
    pub(crate) fn wanted(&mut self, handout: &Handout) -> bool {
        if let Some((at, span)) = self.off {
            if handout.clears().wrapping_sub(at) < span {
                return false;
            }
            self.off = None;
        }
        !handout.is_clear()
    }

    /// Holds until every outcome handed out is taken, `woken` completes or
    /// the bound passes, whichever is first, and learns from how it ended.
    pub(crate) async fn wait(
        &mut self,
        handout: &Handout,
        woken: impl std::future::Future<Output = ()>,
    ) -> Ended {
        // A sleep that was never polled does not count as elapsed: compare
        // the deadline, or the first hold of a connection would end at once.
        if self.bound.deadline() <= Instant::now() {
            self.bound.as_mut().reset(Instant::now() + self.max);
        }
        let ended = tokio::select! {
            biased;
            _ = handout.all_taken() => Ended::Taken,
            _ = woken => Ended::Woken,
            _ = self.bound.as_mut() => Ended::RanOut,
        };
        match ended {
            Ended::Taken => self.strikes = self.strikes.saturating_sub(1),
            Ended::Woken => {}
            Ended::RanOut => {
                self.off = Some((handout.clears(), 1 << self.strikes));
                self.strikes = (self.strikes + 1).min(MAX_STRIKES);
            }
        }
        ended
    }
}
