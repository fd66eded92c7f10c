//! Names kept for their user for a while after their last instance left.
//!
//! A name the policy file does not reserve is first come, first served.
//! Without more, a service that restarts (crashed, stopped by systemd, or
//! cut off by the heartbeat) leaves its name free for a moment, and
//! another local user who registers it first takes the calls made to it
//! from then on, including the ones waiting for the service to come back.
//! So when a name loses its last instance, the broker keeps it for that
//! instance's user for `--name-grace` (default
//! [`DEFAULT_NAME_GRACE`](crate::config::DEFAULT_NAME_GRACE)): within it,
//! only that user may register it again (`Broker::may_own`). Names the
//! policy file mentions are left to its rules.
//!
//! Kept names are bounded: at most a user's `names` quota of them per user
//! (root: no per-user bound; past it the user's oldest go first) and
//! `--max-names` in all; past that bound, the user keeping the most gives
//! up its oldest, so that users keeping many names (or many uids' worth)
//! cannot push out another user's one. Each release costs O(1) (O(users
//! keeping names) past the bound in all), and what has expired is
//! forgotten on the broker's heartbeat tick ([`Reserved::prune`]).
//!
//! Private state behind a narrow API: [`Reserved::release`] when a name
//! loses its last instance, [`Reserved::kept_for`] when a connection
//! registers one, [`Reserved::taken`] once it did, [`Reserved::prune`]
//! now and then.

use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::hashing::PeerKeyedMap;

/// The names kept for their last user (see the module docs).
#[derive(Debug, Default)]
pub struct Reserved {
    /// How long a name is kept.
    grace: Duration,
    /// Most names kept in all.
    max: usize,
    /// Each kept name: for whom, until when.
    by_name: PeerKeyedMap<Rc<str>, (u32, Instant)>,
    /// Each user's kept names, oldest first. An entry whose name was taken
    /// since (or kept again, later) no longer matches `by_name` and is
    /// skipped when it comes out.
    by_uid: HashMap<u32, VecDeque<(Instant, Rc<str>)>>,
}

impl Reserved {
    /// Names kept for `grace` (zero: none), at most `max` of them.
    pub fn new(grace: Duration, max: usize) -> Reserved {
        Reserved {
            grace,
            max,
            ..Reserved::default()
        }
    }

    /// Names kept now (expired ones not yet pruned included).
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// Whether no name is kept.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// The user `name` is kept for at `now`, and since when it has been.
    pub fn kept_for(&self, name: &str, now: Instant) -> Option<(u32, Duration)> {
        let &(uid, until) = self.by_name.get(name)?;
        (until > now).then(|| (uid, self.grace.saturating_sub(until - now)))
    }

    /// `name` lost its last instance, of user `uid`: kept for that user
    /// until `now` + the grace. `per_uid`: the user's bound (`None`: root).
    pub fn release(&mut self, name: &str, uid: u32, now: Instant, per_uid: Option<usize>) {
        if self.grace.is_zero() || self.max == 0 {
            return;
        }
        let until = now + self.grace;
        let name: Rc<str> = Rc::from(name);
        self.by_name.insert(name.clone(), (uid, until));
        let mine = self.by_uid.entry(uid).or_default();
        mine.push_back((until, name));
        if let Some(max) = per_uid {
            while mine.len() > max {
                let Some(first) = mine.pop_front() else {
                    break;
                };
                forget(&mut self.by_name, uid, first);
            }
        }
        // Past the bound in all, the user keeping the most gives one up.
        while self.by_name.len() > self.max {
            let Some((&most, _)) = self
                .by_uid
                .iter()
                .filter(|(_, q)| !q.is_empty())
                .max_by_key(|(&u, q)| (q.len(), std::cmp::Reverse(u)))
            else {
                break;
            };
            let Some(first) = self.by_uid.get_mut(&most).and_then(|q| q.pop_front()) else {
                break;
            };
            forget(&mut self.by_name, most, first);
        }
        self.by_uid.retain(|_, q| !q.is_empty());
    }

    /// `name` was registered again (by the user it was kept for, or after
    /// its grace): no longer kept.
    pub fn taken(&mut self, name: &str) {
        if !self.by_name.is_empty() {
            self.by_name.remove(name);
        }
    }

    /// Forgets the names whose grace ended at `now`.
    pub fn prune(&mut self, now: Instant) {
        let by_name = &mut self.by_name;
        self.by_uid.retain(|&uid, q| {
            while q.front().is_some_and(|(until, _)| *until <= now) {
                if let Some(first) = q.pop_front() {
                    forget(by_name, uid, first);
                }
            }
            !q.is_empty()
        });
    }
}

/// Removes `name` from `by_name` if it is still kept for `uid` until
/// `until` (not taken since, nor kept again later).
fn forget(
    by_name: &mut PeerKeyedMap<Rc<str>, (u32, Instant)>,
    uid: u32,
    (until, name): (Instant, Rc<str>),
) {
    if by_name.get(&name) == Some(&(uid, until)) {
        by_name.remove(&name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_secs(10);

    #[test]
    fn a_name_is_kept_for_its_user_for_the_grace() {
        let t0 = Instant::now();
        let mut r = Reserved::new(GRACE, 100);
        assert_eq!(r.kept_for("a", t0), None);
        r.release("a", 1000, t0, Some(10));
        let later = t0 + Duration::from_secs(3);
        assert_eq!(r.kept_for("a", later), Some((1000, Duration::from_secs(3))));
        assert_eq!(r.kept_for("a", t0 + GRACE), None, "the grace ended");
        r.prune(t0 + GRACE - Duration::from_millis(1));
        assert_eq!(r.len(), 1, "not yet expired");
        r.prune(t0 + GRACE);
        assert!(r.is_empty());
    }

    #[test]
    fn a_zero_grace_keeps_nothing() {
        let t0 = Instant::now();
        let mut r = Reserved::new(Duration::ZERO, 100);
        r.release("a", 1000, t0, None);
        assert_eq!(r.kept_for("a", t0), None);
        assert!(r.is_empty());
    }

    #[test]
    fn a_name_taken_again_is_no_longer_kept_and_its_old_entry_is_skipped() {
        let t0 = Instant::now();
        let mut r = Reserved::new(GRACE, 100);
        r.release("a", 1000, t0, Some(10));
        r.taken("a");
        assert_eq!(r.kept_for("a", t0), None);
        // Released again later, by another user: the first user's entry,
        // when it expires, does not forget the second's.
        let t1 = t0 + Duration::from_secs(5);
        r.release("a", 2000, t1, Some(10));
        r.prune(t0 + GRACE);
        assert_eq!(
            r.kept_for("a", t0 + GRACE),
            Some((2000, Duration::from_secs(5)))
        );
        r.prune(t1 + GRACE);
        assert!(r.is_empty());
    }

    #[test]
    fn a_user_past_its_bound_gives_up_its_oldest() {
        let t0 = Instant::now();
        let mut r = Reserved::new(GRACE, 100);
        for i in 0..5u32 {
            r.release(
                &format!("n{i}"),
                1000,
                t0 + Duration::from_millis(i.into()),
                Some(3),
            );
        }
        assert_eq!(r.len(), 3);
        assert_eq!(r.kept_for("n1", t0), None);
        assert!(r.kept_for("n2", t0).is_some());
        // Root has no per-user bound.
        for i in 0..5u32 {
            r.release(&format!("r{i}"), 0, t0, None);
        }
        assert_eq!(r.len(), 8);
    }

    #[test]
    fn past_the_bound_in_all_the_user_keeping_most_gives_up_first() {
        let t0 = Instant::now();
        let mut r = Reserved::new(GRACE, 10);
        // A user keeps one name; another fills the rest, and more.
        r.release("victim", 1000, t0, Some(100));
        for i in 0..50u32 {
            let at = t0 + Duration::from_millis(1 + u64::from(i));
            r.release(&format!("x{i}"), 2000 + i % 3, at, Some(100));
        }
        assert_eq!(r.len(), 10);
        assert_eq!(
            r.kept_for("victim", t0).map(|(u, _)| u),
            Some(1000),
            "the user keeping one name keeps it"
        );
        // The three others share the rest evenly, newest kept.
        assert!(r.kept_for("x49", t0).is_some());
        assert_eq!(r.kept_for("x0", t0), None);
    }
}
