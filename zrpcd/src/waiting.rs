//! The calls waiting on one service name: parked until an instance
//! registers, or held back while every instance has its window of calls in
//! hand (`--max-delivered-per-conn`). They are taken in turns by caller
//! uid, oldest first within a uid, so that one user's thousands of waiting
//! calls do not stand in front of another user's one (docs/security.md).
//!
//! A waiting call can end in any order (its deadline, its caller's cancel
//! or departure), and there may be hundreds of thousands: finding it in a
//! queue to take it out would cost a search per call on the broker's event
//! loop (cancelling 40,000 parked calls newest first took seconds). So an
//! ended call leaves the map of live calls at once and its uid's queue
//! lazily: from either end as soon as it gets there, the rest when the
//! queue is more than twice as long as its live calls (amortised constant
//! time per call) or when its turn comes.

use std::collections::VecDeque;

use rustc_hash::FxHashMap;

/// One uid's waiting calls.
#[derive(Debug, Default)]
struct UidQueue {
    /// Its calls in arrival order, some of them ended.
    queue: VecDeque<u64>,
    /// How many of them are still waiting.
    live: usize,
}

/// The calls waiting on a name (see the module docs).
#[derive(Debug, Default)]
pub struct Waiting {
    /// Each waiting call's caller uid.
    live: FxHashMap<u64, u32>,
    /// The uids with an entry in `turns`, and their queues.
    by_uid: FxHashMap<u32, UidQueue>,
    /// Whose turn is next: each uid of `by_uid` once.
    turns: VecDeque<u32>,
    /// The waiting calls made with `NO_WAIT` (some of them no longer
    /// waiting): they fail when the name loses its last instance
    /// ([`Waiting::take_no_wait`]), which then looks at them only, not at
    /// every waiting call (a user could keep as many waiting as its quota
    /// of pending calls, and register and unregister the name in a loop).
    no_wait: Vec<u64>,
}

impl Waiting {
    /// Adds `call`, made by `uid` (with `NO_WAIT` if `no_wait`), behind
    /// that uid's other waiting calls.
    pub fn push(&mut self, call: u64, uid: u32, no_wait: bool) {
        if self.live.insert(call, uid).is_some() {
            return;
        }
        if no_wait {
            if self.no_wait.len() > 2 * self.live.len() + 16 {
                let live = &self.live;
                self.no_wait.retain(|c| live.contains_key(c));
            }
            self.no_wait.push(call);
        }
        let q = self.by_uid.entry(uid).or_insert_with(|| {
            self.turns.push_back(uid);
            UidQueue::default()
        });
        q.live += 1;
        q.queue.push_back(call);
    }

    /// Takes `call` out (nothing if it is not waiting here).
    pub fn remove(&mut self, call: u64) {
        let Some(uid) = self.live.remove(&call) else {
            return;
        };
        let Some(q) = self.by_uid.get_mut(&uid) else {
            return;
        };
        q.live = q.live.saturating_sub(1);
        if q.live == 0 {
            // Its entry in `turns` goes when the turn comes.
            q.queue.clear();
            return;
        }
        let live = &self.live;
        let ended = |c: &u64| !live.contains_key(c);
        while q.queue.back().is_some_and(ended) {
            q.queue.pop_back();
        }
        while q.queue.front().is_some_and(ended) {
            q.queue.pop_front();
        }
        if q.queue.len() > 2 * q.live + 16 {
            q.queue.retain(|c| live.contains_key(c));
        }
    }

    /// Takes the next call: the oldest of the uid whose turn it is.
    pub fn pop(&mut self) -> Option<u64> {
        while let Some(uid) = self.turns.pop_front() {
            let Some(q) = self.by_uid.get_mut(&uid) else {
                continue;
            };
            while let Some(call) = q.queue.pop_front() {
                if self.live.get(&call) == Some(&uid) {
                    self.live.remove(&call);
                    q.live -= 1;
                    if q.live > 0 {
                        self.turns.push_back(uid);
                    } else {
                        self.by_uid.remove(&uid);
                    }
                    return Some(call);
                }
            }
            self.by_uid.remove(&uid);
        }
        None
    }

    /// The waiting calls made with `NO_WAIT`, forgotten here (they are
    /// about to end); the calls stay waiting until taken out.
    pub fn take_no_wait(&mut self) -> Vec<u64> {
        let mut calls = std::mem::take(&mut self.no_wait);
        calls.retain(|c| self.live.contains_key(c));
        calls
    }

    /// How many calls wait.
    pub fn len(&self) -> usize {
        self.live.len()
    }

    /// Whether none waits.
    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(w: &mut Waiting) -> Vec<u64> {
        std::iter::from_fn(|| w.pop()).collect()
    }

    #[test]
    fn uids_take_turns_oldest_first_within_a_uid() {
        let mut w = Waiting::default();
        // uid 1 has five calls waiting before uid 2's two and uid 3's one.
        for c in 1..=5 {
            w.push(c, 1, false);
        }
        w.push(20, 2, false);
        w.push(21, 2, false);
        w.push(30, 3, false);
        w.push(20, 2, false); // already waiting: nothing changes
        assert_eq!(w.len(), 8);
        assert_eq!(drain(&mut w), vec![1, 20, 30, 2, 21, 3, 4, 5]);
        assert!(w.is_empty() && w.by_uid.is_empty() && w.turns.is_empty());
    }

    #[test]
    fn calls_end_in_any_order_without_a_search() {
        let mut w = Waiting::default();
        for c in 0..1000 {
            w.push(c, 7, false);
        }
        // Newest first, then nine in ten of the rest from the middle: the
        // queue stays within twice the live calls (plus a little).
        for c in (900..1000).rev() {
            w.remove(c);
        }
        for c in (0..900).filter(|c| c % 10 != 0) {
            w.remove(c);
        }
        assert_eq!(w.len(), 90);
        let q = &w.by_uid[&7];
        assert!(q.queue.len() <= 2 * 90 + 16, "{}", q.queue.len());
        // An id not waiting here changes nothing.
        w.remove(5000);
        w.remove(1);
        assert_eq!(w.len(), 90);
        assert_eq!(drain(&mut w), (0..900).step_by(10).collect::<Vec<u64>>());
    }

    #[test]
    fn a_uid_whose_calls_all_ended_loses_its_turn_and_gets_one_again() {
        let mut w = Waiting::default();
        w.push(1, 1, false);
        w.push(2, 2, false);
        w.remove(1);
        assert_eq!(w.len(), 1);
        // uid 1 comes back: one turn, not two (its old entry is reused).
        w.push(3, 1, false);
        w.push(4, 1, false);
        assert_eq!(w.turns.len(), 2);
        assert_eq!(drain(&mut w), vec![3, 2, 4]);
        // Leaving and coming back in a loop does not grow the turns.
        for c in 10..1000 {
            w.push(c, 9, false);
            w.remove(c);
        }
        assert!(w.turns.len() <= 1, "{}", w.turns.len());
        assert!(w.is_empty());
    }

    #[test]
    fn no_wait_calls_are_listed_apart_and_the_list_stays_small() {
        let mut w = Waiting::default();
        w.push(1, 1, true);
        w.push(2, 1, false);
        w.push(3, 2, true);
        w.remove(3);
        assert_eq!(w.take_no_wait(), vec![1], "the NO_WAIT calls still waiting");
        assert!(w.take_no_wait().is_empty(), "taken");
        assert_eq!(w.len(), 2, "they stay waiting until taken out");
        // NO_WAIT calls that come and go (delivered as slots free) do not
        // pile up in the list.
        for c in 100..10_100u64 {
            w.push(c, 3, true);
            w.remove(c);
        }
        assert!(w.no_wait.len() <= 2 * w.len() + 17, "{}", w.no_wait.len());
    }
}
