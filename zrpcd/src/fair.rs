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
//! than root (and the broker's own NATS bridge) has a quantum of work
//! (`--round-quantum`, default [`QUANTUM`] frames, as many as one turn;
//! large reads count more; a new connection counts [`CONNECT_UNITS`]),
//! however many connections it uses. A connection with data to read whose
//! user has had its quantum waits for the next round, in line behind the
//! user's connections that waited before it. A round ends once the tasks
//! that were ready when a connection first had to wait have run: that
//! connection yields to them, then starts the next round. Each user with
//! waiting connections then has its oldest woken, and each turn a
//! connection takes passes it on when it ends (however it ends: a batch
//! handled, the connection closed): to the user's next waiting connection
//! while quantum is left, else to whichever of them ends the round next.
//! A round costs O(users waiting), not O(connections waiting). A turn is
//! taken only once data is there to read (the gate of `zrpc_io`'s read
//! loop) and is never held while a read waits.
//! So a user that floods on many connections gets about one turn's worth a
//! round, as one with a single connection whose socket stays full does,
//! and a user alone on the broker loses only a yield every quantum.
//!
//! Private state behind a narrow API: [`Rounds::wait_turn`] before each
//! read (once data is there to read), [`Rounds::charge`] after it, then
//! the [`Turn`] dropped.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use tokio::sync::Notify;

/// Default `--round-quantum`: frames a user's connections handle in a
/// round before they wait for the next (a read of large frames counts one
/// more for each 64 KiB), as many as a connection handles in one turn
/// (`crate::conn`, `TURN_FRAMES`).
pub const QUANTUM: u32 = 256;

/// What a new connection costs its user's quantum (its accept, admission
/// and handshake), so that connecting in a loop is not free.
pub const CONNECT_UNITS: u32 = 16;

/// Bytes read that count as one frame more (see [`QUANTUM`]).
const BYTES_PER_UNIT: usize = 64 * 1024;

/// One user's place in the rounds (in its `crate::quota::Usage`).
#[derive(Debug, Default)]
pub struct Share {
    /// The round `work` was last counted in.
    round: Cell<u64>,
    /// Work counted up to then and not yet paid for: each round pays one
    /// quantum of it. A batch larger than what was left of the quantum
    /// (one read is handled whole) is paid for in the rounds after it, so
    /// over time no user gets more than its quantum a round, however its
    /// frames fall into reads.
    work: Cell<u64>,
    /// Its connections waiting for a turn.
    waiting: Cell<u32>,
    /// Wakes one of them at a time.
    turn: Notify,
    /// Whether it is on the list of users to wake when the next round
    /// starts.
    listed: Cell<bool>,
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
    /// Users with connections waiting for the next round.
    listed: RefCell<Vec<Rc<Share>>>,
    /// Rounds ended early because a user had had its quantum (for
    /// `zrpcd.stats`).
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

    /// Counts `frames` frames and `bytes` bytes against `share` (a read
    /// counts one frame at least).
    #[inline]
    pub fn charge(&self, share: &Share, frames: u32, bytes: usize) {
        let owed = self.owed(share);
        share.round.set(self.round.get());
        let units = (bytes / BYTES_PER_UNIT) as u64;
        let work = u64::from(frames.max(1)).saturating_add(units);
        share.work.set(owed.saturating_add(work));
    }

    /// Work of `share`'s user not yet paid for in the current round: what
    /// was counted, less a quantum for each round since.
    #[inline]
    fn owed(&self, share: &Share) -> u64 {
        let rounds = self.round.get().saturating_sub(share.round.get());
        let paid = rounds.saturating_mul(u64::from(self.quantum));
        share.work.get().saturating_sub(paid)
    }

    /// Whether `share`'s user has had its quantum in the current round.
    #[inline]
    pub fn spent(&self, share: &Share) -> bool {
        self.quantum != 0 && self.owed(share) >= u64::from(self.quantum)
    }

    /// Before a read with data waiting: returns at once while `share`'s
    /// user has quantum left in this round, else waits for its turn in the
    /// next. The first connection to wait in a round ends it: it yields,
    /// so that the tasks ready before it run, then starts the next round.
    /// The turn is passed on when the [`Turn`] is dropped.
    pub async fn wait_turn<'a>(&'a self, share: &'a Rc<Share>) -> Turn<'a> {
        self.wait(share).await;
        Turn {
            rounds: self,
            share,
        }
    }

    async fn wait(&self, share: &Rc<Share>) {
        while self.spent(share) {
            // In line with the user's other waiting connections, oldest
            // first (the one that ends the round too: it must not go
            // ahead of connections that waited longer).
            share.waiting.set(share.waiting.get() + 1);
            let _waiting = Waiting(share);
            self.list(share);
            let turn = share.turn.notified();
            tokio::pin!(turn);
            turn.as_mut().enable();
            if !self.ending.replace(true) {
                self.waits.set(self.waits.get() + 1);
                let mut ending = Ending {
                    rounds: self,
                    done: false,
                };
                tokio::task::yield_now().await;
                ending.done = true;
            }
            turn.await;
        }
    }

    /// Rounds ended early so far (see [`Rounds::wait_turn`]).
    pub fn waits(&self) -> u64 {
        self.waits.get()
    }

    /// A turn of `share`'s user ended: its next waiting connection takes
    /// one while quantum is left; else the user waits for the next round,
    /// which one of them ends if no one is ending it.
    fn pass_on(&self, share: &Rc<Share>) {
        if share.waiting.get() == 0 {
            return;
        }
        if self.spent(share) {
            self.list(share);
            if self.ending.get() {
                return;
            }
        }
        share.turn.notify_one();
    }

    fn list(&self, share: &Rc<Share>) {
        if !share.listed.replace(true) {
            self.listed.borrow_mut().push(share.clone());
        }
    }

    /// Starts the next round: one waiting connection of each listed user
    /// is woken (the rest follow as it handles its batches).
    fn start_next(&self) {
        self.round.set(self.round.get() + 1);
        self.ending.set(false);
        self.wake_listed(true);
    }

    /// Wakes one waiting connection of each listed user, forgetting the
    /// list if `forget`.
    fn wake_listed(&self, forget: bool) {
        let listed = if forget {
            std::mem::take(&mut *self.listed.borrow_mut())
        } else {
            self.listed.borrow().clone()
        };
        for share in listed {
            if forget {
                share.listed.set(false);
            }
            share.turn.notify_one();
        }
    }
}

/// A connection's turn to read and handle a batch (see
/// [`Rounds::wait_turn`]); passed on when dropped.
pub struct Turn<'a> {
    rounds: &'a Rounds,
    share: &'a Rc<Share>,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.rounds.pass_on(self.share);
    }
}

/// Counts a connection as waiting for its turn while it lives.
struct Waiting<'a>(&'a Share);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.set(self.0.waiting.get().saturating_sub(1));
    }
}

/// Starts the next round when dropped after the yield. Dropped during it
/// (its connection closed), it leaves the round running and wakes a
/// waiting connection of each listed user (its own user is listed), one
/// of which then ends it.
struct Ending<'a> {
    rounds: &'a Rounds,
    done: bool,
}

impl Drop for Ending<'_> {
    fn drop(&mut self) {
        if self.done {
            self.rounds.start_next();
        } else {
            self.rounds.ending.set(false);
            self.rounds.wake_listed(false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;

    #[test]
    fn a_user_has_a_quantum_a_round() {
        let r = Rounds::new(QUANTUM);
        let s = Rc::new(Share::default());
        r.charge(&s, QUANTUM - 1, 0);
        assert!(!r.spent(&s));
        r.charge(&s, 0, 0);
        assert!(r.spent(&s), "an empty read counts one");
        r.start_next();
        assert!(!r.spent(&s), "a new round");
        r.charge(&s, 1, BYTES_PER_UNIT * (QUANTUM as usize));
        assert!(r.spent(&s), "large reads count by size");
        let off = Rounds::new(0);
        off.charge(&s, u32::MAX, 0);
        assert!(!off.spent(&s), "--round-quantum 0: no rounds");
    }

    /// One read is handled whole, however many frames it brings: what
    /// passes the quantum is paid for in the rounds after it.
    #[test]
    fn a_batch_past_the_quantum_is_paid_for_in_the_next_rounds() {
        let r = Rounds::new(QUANTUM);
        let s = Rc::new(Share::default());
        r.charge(&s, QUANTUM * 3 + 10, 0);
        for round in 1..=2 {
            r.start_next();
            assert!(r.spent(&s), "round {round} after it: still paying");
        }
        r.start_next();
        assert!(!r.spent(&s), "paid for but 10");
        r.charge(&s, QUANTUM - 11, 0);
        assert!(!r.spent(&s), "what was left of the quantum");
        r.charge(&s, 1, 0);
        assert!(r.spent(&s));
        // A user idle for rounds owes nothing and has one quantum, no more.
        let t = Rc::new(Share::default());
        r.charge(&t, 1, 0);
        for _ in 0..10 {
            r.start_next();
        }
        r.charge(&t, QUANTUM - 1, 0);
        assert!(!r.spent(&t));
        r.charge(&t, 1, 0);
        assert!(r.spent(&t));
    }

    #[test]
    fn waiting_connections_get_their_turn_also_if_the_round_ender_is_cancelled() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, async {
            let r = Rc::new(Rounds::new(2));
            let (a, b) = (Rc::new(Share::default()), Rc::new(Share::default()));
            r.charge(&a, 2, 0);
            r.charge(&b, 2, 0);
            // A connection of user a ends the round: polled once, it is in
            // its yield.
            let mut ender = Box::pin(r.wait_turn(&a));
            std::future::poll_fn(|cx| {
                assert!(ender.as_mut().poll(cx).is_pending());
                std::task::Poll::Ready(())
            })
            .await;
            assert!(r.ending.get());
            // Two more of a's and one of b's wait for their turn.
            let wait = |s: &Rc<Share>| {
                let (r, s) = (r.clone(), s.clone());
                tokio::task::spawn_local(async move {
                    r.wait_turn(&s).await;
                    r.round.get()
                })
            };
            let waiters = [wait(&a), wait(&a), wait(&b)];
            tokio::task::yield_now().await;
            assert_eq!(
                (a.waiting.get(), b.waiting.get()),
                (3, 1),
                "the ender waits in line too"
            );
            assert_eq!(r.listed.borrow().len(), 2, "each user listed once");
            assert_eq!(r.round.get(), 0, "nobody ended the round yet");
            // Its connection closes mid-yield: another ends the round.
            drop(ender);
            for w in waiters {
                assert_eq!(w.await.expect("woken"), 1);
            }
            assert_eq!((a.waiting.get(), b.waiting.get()), (0, 0));
            assert!(!r.ending.get() && r.listed.borrow().is_empty());
            assert_eq!(r.waits(), 2, "the cancelled ender and the next");
            // With quantum left, no wait at all.
            r.wait_turn(&a).await;
            assert_eq!(r.round.get(), 1);
        });
    }
}
