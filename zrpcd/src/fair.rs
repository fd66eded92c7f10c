//! The broker's one thread shared out by user, not by connection.
//!
//! Each connection's task reads and handles its frames in turns
//! (`crate::conn`, `TURN`): a connection whose socket stays full lets the
//! others run after 256 frames or 250 µs. That shares the thread by
//! connection, so a user with many connections (up to its `connections`
//! quota, 4,096 by default) got that many turns for each one of another
//! user's: with every one of them kept busy, another user's call waited for
//! a turn of each, up to a second.
//!
//! So the thread's time also goes in rounds. In a round, each user other
//! than root has a quantum of work (`--round-quantum`, default [`QUANTUM`]
//! frames, large reads counting more), however many connections it uses; a connection whose
//! user has had its quantum waits for the next round before it reads
//! again. A round ends once the tasks that were ready when a connection
//! first had to wait have run (the first such connection yields to them,
//! then starts the next round and wakes the others). A user alone on the
//! broker loses nothing but that yield every quantum; a user that floods
//! gets a quantum a round, as one with a single connection does. Root is
//! not held to it (as to quotas).
//!
//! Private state behind a narrow API: [`Rounds::charge`] after each read,
//! [`Rounds::spent`] before each read, [`Rounds::next_round`] to wait.

use std::cell::Cell;

use tokio::sync::Notify;

/// Default `--round-quantum`: frames a user's connections handle in a
/// round before they wait for the next (a read of large frames counts one
/// more for each 64 KiB). With calls of ~1 µs of the broker's time, a round
/// of two busy users is a couple of milliseconds.
pub const QUANTUM: u32 = 1024;

/// Bytes read that count as one frame more (see [`QUANTUM`]).
const BYTES_PER_UNIT: usize = 64 * 1024;

/// One user's work in the current round (in its `crate::quota::Usage`).
#[derive(Debug, Default)]
pub struct Share {
    /// The round `work` was counted in.
    round: Cell<u64>,
    /// Work counted in it.
    work: Cell<u32>,
}

/// The rounds (one per broker).
#[derive(Debug, Default)]
pub struct Rounds {
    /// Work a user may do in a round (0: no rounds).
    quantum: u32,
    /// The current round.
    round: Cell<u64>,
    /// Whether a task is ending the current round (yielding to the tasks
    /// ready before it).
    ending: Cell<bool>,
    /// Wakes the tasks waiting for the next round.
    next: Notify,
    /// Rounds ended early because a connection had used its user's
    /// quantum (for `zrpcd.stats`, and tests).
    waits: Cell<u64>,
}

impl Rounds {
    /// Rounds of `quantum` frames per user (0: none, every connection
    /// reads in its turns only).
    pub fn new(quantum: u32) -> Rounds {
        Rounds {
            quantum,
            ..Rounds::default()
        }
    }

    /// Counts a read of `frames` frames and `bytes` bytes against `share`
    /// (nothing for root: `limited` false).
    #[inline]
    pub fn charge(&self, share: &Share, limited: bool, frames: u32, bytes: usize) {
        if !limited {
            return;
        }
        let round = self.round.get();
        if share.round.get() != round {
            share.round.set(round);
            share.work.set(0);
        }
        let units = (bytes / BYTES_PER_UNIT).min(u32::MAX as usize) as u32;
        let work = frames.max(1).saturating_add(units);
        share.work.set(share.work.get().saturating_add(work));
    }

    /// Whether `share`'s user has had its quantum in the current round.
    #[inline]
    pub fn spent(&self, share: &Share) -> bool {
        self.quantum != 0
            && share.round.get() == self.round.get()
            && share.work.get() >= self.quantum
    }

    /// Waits for the next round. The first task to wait in a round ends it:
    /// it yields, so that the tasks ready before it run, then starts the
    /// next round and wakes the others. Cancelled while ending the round
    /// (its connection closed), it still starts the next one.
    pub async fn next_round(&self) {
        let round = self.round.get();
        if self.ending.replace(true) {
            let next = self.next.notified();
            if self.round.get() == round {
                next.await;
            }
            return;
        }
        self.waits.set(self.waits.get() + 1);
        let ending = Ending(self);
        tokio::task::yield_now().await;
        drop(ending);
    }

    /// Rounds ended early so far (see [`Rounds::next_round`]).
    pub fn waits(&self) -> u64 {
        self.waits.get()
    }

    fn start_next(&self) {
        self.round.set(self.round.get() + 1);
        self.ending.set(false);
        self.next.notify_waiters();
    }
}

/// Starts the next round when dropped: after the yield, or if the task
/// ending the round is cancelled during it.
struct Ending<'a>(&'a Rounds);

impl Drop for Ending<'_> {
    fn drop(&mut self) {
        self.0.start_next();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::rc::Rc;

    #[test]
    fn a_user_has_a_quantum_a_round_and_root_none() {
        let r = Rounds::new(QUANTUM);
        let s = Share::default();
        r.charge(&s, true, QUANTUM - 1, 0);
        assert!(!r.spent(&s));
        r.charge(&s, true, 0, 0);
        assert!(r.spent(&s), "an empty read counts one");
        r.start_next();
        assert!(!r.spent(&s), "a new round");
        r.charge(&s, true, 1, 64 * 1024 * (QUANTUM as usize));
        assert!(r.spent(&s), "large reads count by size");
        let root = Share::default();
        r.charge(&root, false, u32::MAX, usize::MAX);
        assert!(!r.spent(&root));
        let off = Rounds::new(0);
        off.charge(&s, true, u32::MAX, 0);
        assert!(!off.spent(&s), "--round-quantum 0: no rounds");
    }

    #[test]
    fn waiters_resume_in_the_next_round_also_if_the_first_is_cancelled() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, async {
            let r = Rc::new(Rounds::new(QUANTUM));
            // The first waiter ends the round: polled once, it is in its
            // yield.
            let mut first = Box::pin(r.next_round());
            std::future::poll_fn(|cx| {
                assert!(first.as_mut().poll(cx).is_pending());
                std::task::Poll::Ready(())
            })
            .await;
            assert!(r.ending.get());
            // Three more wait for it.
            let others: Vec<_> = (0..3)
                .map(|_| {
                    let r = r.clone();
                    tokio::task::spawn_local(async move {
                        r.next_round().await;
                        r.round.get()
                    })
                })
                .collect();
            tokio::task::yield_now().await;
            assert_eq!(r.round.get(), 0, "nobody ended the round yet");
            // Its connection closes: cancelled mid-yield, it still ends it.
            drop(first);
            for o in others {
                assert_eq!(o.await.expect("woken"), 1);
            }
            assert!(!r.ending.get());
            // And the next round goes as the first, uncancelled.
            r.next_round().await;
            assert_eq!((r.round.get(), r.waits()), (2, 2));
        });
    }
}
