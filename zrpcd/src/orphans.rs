//! Calls whose caller disconnected while a service was running them.
//!
//! The broker does not cancel such a call at once: the caller may be a
//! client that lost its connection and comes back to resubmit the call
//! (same instance, same call id), and the service's reply cache then
//! answers the resubmission without a second execution. So the call is
//! remembered here, as an orphan, for the caller's grace
//! (`--caller-grace`, capped by the call's own deadline). A resubmission
//! within it adopts the orphan (nothing is cancelled); when the grace runs
//! out, the service is sent `Cancel` for the delivery and drops the
//! handler.
//!
//! A call its caller left while no instance ran it any more (its instance
//! had disconnected), or whose instance disconnects during the grace, is
//! remembered the same way, with nothing to cancel ([`NO_SERVICE`]): its
//! resubmission is then known as a call delivered before, which may have
//! run.
//!
//! Orphans are bounded like the pending calls they were: at most a uid's
//! `pending_calls` quota of them per uid (root: no per-uid bound) and
//! `--max-pending-total` in all. Past a bound, an orphan whose grace ends
//! first is given up at once, as if its grace had ended (its call is
//! cancelled at the service): the uid's own past its quota, and past the
//! bound in all, one of the uid holding the most (an O(uids) walk, only
//! then). So a user that calls, leaves and calls again cannot keep more
//! work going at services than its quota allows, nor have another user's
//! orphans given up while it holds more of them.
//!
//! An orphan its service still runs takes a place in that service
//! connection's window (`--max-delivered-per-conn`, [`Orphans::running_on`])
//! until the service answers it ([`Orphans::answered`]), its grace ends or
//! it is adopted: a user that calls and leaves in a loop gets no more of a
//! service's attention than one that stays.
//!
//! Private state behind a narrow API: [`Orphans::add`] when a caller
//! leaves, [`Orphans::adopt`] when a call arrives, [`Orphans::expired`]
//! when the timer fires, [`Orphans::answered`] when a service answers one,
//! [`Orphans::service_gone`] when a service leaves.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::rc::Rc;
use std::time::Instant;

use tokio::sync::Notify;

use crate::peers::PeerId;

/// Who made a call, across connections: the caller's uid, its instance id
/// (from `Hello`, kept across reconnects) and its call id.
pub type CallerKey = (u32, u64, u64);

/// [`Orphan::service`] of a call no instance runs now: its instance
/// disconnected, or its caller left while it waited for a new instance
/// after the first disconnected. It is kept for the caller's grace all the
/// same, with nothing to cancel, so that a resubmission is known as a call
/// delivered before (it may have run: no "never ran" answer for it).
/// Peer ids start at 1.
pub const NO_SERVICE: PeerId = 0;

/// A delivered call whose caller is gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Orphan {
    /// The service connection running it ([`NO_SERVICE`]: none).
    pub service: PeerId,
    /// The uid of the user whose instance had it (kept when that instance
    /// disconnects): a resubmission goes to no other user's instance
    /// (`Pending::pinned_to`). `None`: the NATS bridge had it.
    pub service_uid: Option<u32>,
    /// The broker's request id of the delivery (what `Cancel` names).
    pub request: u64,
    /// The earlier deliveries of the same call to that service, adopted by
    /// this one (a caller that came back, resubmitted, and left again):
    /// the first of them is the one whose handler runs (the later ones
    /// wait for its outcome at the service), so a `Cancel` names them all.
    pub earlier: Vec<u64>,
}

impl Orphan {
    /// Every request id a `Cancel` must name: the delivery and the
    /// deliveries it adopted, latest first (the copies waiting at the
    /// service go before the execution they wait for, which would
    /// otherwise leave them to run again).
    pub fn requests(&self) -> impl Iterator<Item = u64> + '_ {
        std::iter::once(self.request).chain(self.earlier.iter().rev().copied())
    }
}

/// How many orphans [`Orphans::add`] may keep.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Of the caller's uid (`None`: no bound, root's).
    pub per_uid: Option<usize>,
    /// In all.
    pub total: usize,
}

/// The orphans, by caller and by the time their grace ends (in all and
/// per uid).
#[derive(Debug, Default)]
pub struct Orphans {
    by_caller: HashMap<CallerKey, (Orphan, Instant)>,
    by_time: BTreeMap<(Instant, CallerKey), ()>,
    /// Each uid's orphans (the first element of [`CallerKey`]), for its
    /// bound; no entry for a uid without any.
    by_uid: HashMap<u32, BTreeSet<(Instant, CallerKey)>>,
    /// The orphans delivered to each service connection (none for
    /// [`NO_SERVICE`]), so that a connection leaving walks its own, not all
    /// of them (all users' orphans, up to `--max-pending-total`).
    per_service: HashMap<PeerId, HashSet<CallerKey>>,
    /// The deliveries of orphans their service has not answered yet (by
    /// request id), and those of each service connection: its window
    /// counts them.
    running: HashMap<u64, PeerId>,
    running_per_service: HashMap<PeerId, HashSet<u64>>,
    /// The deliveries adopted by a pending call (its request id): while it
    /// lives, and moved into its orphan if its caller leaves again.
    adopted: HashMap<u64, Vec<u64>>,
    /// Wakes the timer task when an earlier end of grace is added.
    wake: Rc<Notify>,
}

impl Orphans {
    /// Whether there are none (checked before any lookup on the call path).
    pub fn is_empty(&self) -> bool {
        self.by_caller.is_empty()
    }

    /// Number of orphans.
    pub fn len(&self) -> usize {
        self.by_caller.len()
    }

    /// The notifier of the timer task (see `server::orphan_loop`).
    pub fn waker(&self) -> Rc<Notify> {
        self.wake.clone()
    }

    /// When the next grace ends.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.by_time.keys().next().map(|(t, _)| *t)
    }

    /// Remembers the delivery `request` to `service` (of user
    /// `service_uid`), made by `caller`, as
    /// an orphan until `until` (with the deliveries it adopted). Returns
    /// the orphans given up to stay within `bounds` (see the module docs),
    /// whose calls are to be cancelled now, as when their grace ends; in
    /// the usual case none.
    pub fn add(
        &mut self,
        caller: CallerKey,
        (service, service_uid): (PeerId, Option<u32>),
        request: u64,
        until: Instant,
        bounds: Bounds,
    ) -> Vec<Orphan> {
        let orphan = Orphan {
            service,
            service_uid,
            request,
            earlier: self.adopted.remove(&request).unwrap_or_default(),
        };
        let mut given_up = Vec::new();
        if let Some((old, old_until)) = self.by_caller.insert(caller, (orphan, until)) {
            // The same call left running twice (one instance id on several
            // connections): the older is given up (cancelled), not left to
            // run outside the window.
            self.count(old.service, caller, false);
            self.stop_running(old.request);
            self.unindex(old_until, caller);
            given_up.push(old);
        }
        self.count(service, caller, true);
        self.start_running(request, service);
        let earliest = self.next_deadline().is_none_or(|t| until < t);
        self.by_time.insert((until, caller), ());
        self.by_uid
            .entry(caller.0)
            .or_default()
            .insert((until, caller));
        if earliest {
            self.wake.notify_one();
        }
        if let Some(max) = bounds.per_uid {
            while let Some(first) = self
                .by_uid
                .get(&caller.0)
                .filter(|set| set.len() > max)
                .and_then(|set| set.first().copied())
            {
                given_up.extend(self.give_up(first));
            }
        }
        // Past the bound in all, the uid holding the most orphans gives up
        // its first-ending one: users under their share keep theirs.
        while self.by_caller.len() > bounds.total {
            let Some(first) = self
                .by_uid
                .values()
                .max_by(|a, b| {
                    // Ties: the one whose first orphan's grace ends first.
                    a.len()
                        .cmp(&b.len())
                        .then_with(|| b.first().cmp(&a.first()))
                })
                .and_then(|set| set.first().copied())
            else {
                break;
            };
            given_up.extend(self.give_up(first));
        }
        given_up
    }

    /// Forgets the orphan of `caller` whose grace ends at `until`; returns
    /// it.
    fn give_up(&mut self, (until, caller): (Instant, CallerKey)) -> Option<Orphan> {
        self.unindex(until, caller);
        let (orphan, _) = self.by_caller.remove(&caller)?;
        self.count(orphan.service, caller, false);
        self.stop_running(orphan.request);
        Some(orphan)
    }

    /// Counts delivery `request` as running at `service` (not answered).
    fn start_running(&mut self, request: u64, service: PeerId) {
        if service == NO_SERVICE {
            return;
        }
        self.running.insert(request, service);
        self.running_per_service
            .entry(service)
            .or_default()
            .insert(request);
    }

    /// Delivery `request` no longer runs at its service (answered, cancelled
    /// or adopted); returns the service, if it was counted.
    fn stop_running(&mut self, request: u64) -> Option<PeerId> {
        let service = self.running.remove(&request)?;
        if let Some(set) = self.running_per_service.get_mut(&service) {
            set.remove(&request);
            if set.is_empty() {
                self.running_per_service.remove(&service);
            }
        }
        Some(service)
    }

    /// The orphans `service` runs and has not answered: they take places
    /// in its window, like the calls delivered to it.
    pub fn running_on(&self, service: PeerId) -> u32 {
        if self.running_per_service.is_empty() {
            return 0;
        }
        self.running_per_service
            .get(&service)
            .map_or(0, |set| u32::try_from(set.len()).unwrap_or(u32::MAX))
    }

    /// `service` answered delivery `request` (a call whose caller left): if
    /// it is an orphan's, it no longer takes a place in the service's
    /// window (the orphan stays for its grace, for a resubmission to be
    /// answered from the service's reply cache). True if it was.
    pub fn answered(&mut self, service: PeerId, request: u64) -> bool {
        match self.running.get(&request) {
            Some(&s) if s == service => self.stop_running(request).is_some(),
            _ => false,
        }
    }

    /// Lists the orphan of `caller` under its service (`true`), or takes
    /// it off the list.
    fn count(&mut self, service: PeerId, caller: CallerKey, add: bool) {
        if service == NO_SERVICE {
            return;
        }
        if add {
            self.per_service.entry(service).or_default().insert(caller);
        } else if let Some(set) = self.per_service.get_mut(&service) {
            set.remove(&caller);
            if set.is_empty() {
                self.per_service.remove(&service);
            }
        }
    }

    /// Removes the time indexes' entries of an orphan.
    fn unindex(&mut self, until: Instant, caller: CallerKey) {
        self.by_time.remove(&(until, caller));
        if let Some(set) = self.by_uid.get_mut(&caller.0) {
            set.remove(&(until, caller));
            if set.is_empty() {
                self.by_uid.remove(&caller.0);
            }
        }
    }

    /// A call from `caller` arrived: if it is the resubmission of an
    /// orphan, the orphan is no longer one (its service is not cancelled).
    /// Give the new call's request id to [`Orphans::adopted_by`].
    pub fn adopt(&mut self, caller: CallerKey) -> Option<Orphan> {
        let (orphan, until) = self.by_caller.remove(&caller)?;
        self.unindex(until, caller);
        self.count(orphan.service, caller, false);
        self.stop_running(orphan.request);
        Some(orphan)
    }

    /// The pending call `request` adopted `orphan` (see
    /// [`Orphans::adopt`]): if it is cancelled at the service, or orphaned
    /// and not adopted in turn, the adopted deliveries are cancelled too.
    pub fn adopted_by(&mut self, request: u64, orphan: Orphan) {
        let mut earlier = orphan.earlier;
        earlier.push(orphan.request);
        self.adopted.insert(request, earlier);
    }

    /// The pending call `request` ended: the deliveries it adopted, if any,
    /// to cancel at the service with it (empty at once in the usual case).
    pub fn ended(&mut self, request: u64) -> Vec<u64> {
        if self.adopted.is_empty() {
            return Vec::new();
        }
        self.adopted.remove(&request).unwrap_or_default()
    }

    /// Takes up to `max` of the orphans whose grace ended at `now`, the
    /// first-ending first.
    pub fn expired(&mut self, now: Instant, max: usize) -> Vec<Orphan> {
        let mut out = Vec::new();
        while out.len() < max {
            let Some(&first) = self.by_time.keys().next() else {
                break;
            };
            if first.0 > now {
                break;
            }
            out.extend(self.give_up(first));
        }
        out
    }

    /// The orphans running on `service` run nowhere now (it disconnected:
    /// nothing to cancel); they stay until their grace ends, as calls
    /// delivered before ([`NO_SERVICE`]).
    pub fn service_gone(&mut self, service: PeerId) {
        let Some(callers) = self.per_service.remove(&service) else {
            return;
        };
        for request in self
            .running_per_service
            .remove(&service)
            .unwrap_or_default()
        {
            self.running.remove(&request);
        }
        for caller in callers {
            if let Some((o, _)) = self.by_caller.get_mut(&caller) {
                *o = Orphan {
                    service: NO_SERVICE,
                    service_uid: o.service_uid,
                    request: o.request,
                    earlier: Vec::new(),
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// No bound.
    const FREE: Bounds = Bounds {
        per_uid: None,
        total: usize::MAX,
    };

    #[test]
    fn adopt_expire_and_service_gone() {
        let mut o = Orphans::default();
        let t0 = Instant::now();
        let orphan = |service, request| Orphan {
            service,
            service_uid: Some(1),
            request,
            earlier: Vec::new(),
        };
        o.add(
            (1000, 1, 1),
            (7, Some(1)),
            1,
            t0 + Duration::from_secs(1),
            FREE,
        );
        o.add(
            (1000, 1, 2),
            (8, Some(1)),
            2,
            t0 + Duration::from_secs(2),
            FREE,
        );
        o.add(
            (1000, 2, 1),
            (7, Some(1)),
            3,
            t0 + Duration::from_secs(3),
            FREE,
        );
        assert_eq!(o.next_deadline(), Some(t0 + Duration::from_secs(1)));
        // The resubmission of call 2 adopts it: never expires.
        assert_eq!(o.adopt((1000, 1, 2)), Some(orphan(8, 2)));
        assert_eq!(o.adopt((1000, 1, 2)), None);
        assert!(o.expired(t0, usize::MAX).is_empty());
        assert_eq!(
            o.expired(t0 + Duration::from_secs(2), usize::MAX),
            vec![orphan(7, 1)]
        );
        // Only service 7 has an orphan left (call 3): another connection
        // leaving changes nothing.
        assert_eq!(o.per_service.get(&7).map(HashSet::len), Some(1));
        assert_eq!(o.per_service.len(), 1);
        o.service_gone(8);
        assert_eq!(o.per_service.get(&7).map(HashSet::len), Some(1));
        // Its service gone, call 3 is still known until its grace ends, as
        // a call that runs nowhere.
        o.service_gone(7);
        assert!(o.per_service.is_empty());
        assert_eq!(o.len(), 1);
        assert_eq!(o.next_deadline(), Some(t0 + Duration::from_secs(3)));
        assert_eq!(
            o.expired(t0 + Duration::from_secs(9), usize::MAX),
            vec![orphan(NO_SERVICE, 3)]
        );
        assert!(o.is_empty());
    }

    /// The broker ends orphans due together a batch at a time
    /// (`server::orphan_loop`): a bounded take leaves the rest, in order.
    #[test]
    fn orphans_due_together_are_taken_at_most_max_at_a_time() {
        let mut o = Orphans::default();
        let t0 = Instant::now();
        for call in 1..=5 {
            o.add(
                (1000, 1, call),
                (7, Some(1)),
                call,
                t0 + Duration::from_millis(call),
                FREE,
            );
        }
        let requests = |v: Vec<Orphan>| v.iter().map(|o| o.request).collect::<Vec<_>>();
        let later = t0 + Duration::from_secs(1);
        assert_eq!(requests(o.expired(later, 2)), vec![1, 2]);
        assert_eq!(requests(o.expired(later, 2)), vec![3, 4]);
        assert_eq!(requests(o.expired(later, 2)), vec![5]);
        assert!(o.is_empty());
    }

    #[test]
    fn a_service_leaving_changes_only_its_own_orphans() {
        let mut o = Orphans::default();
        let until = Instant::now() + Duration::from_secs(5);
        for (service, request) in [(1, 10), (2, 20), (2, 21), (3, 30)] {
            o.add(
                (1000, request, request),
                (service, Some(1)),
                request,
                until,
                FREE,
            );
        }
        assert_eq!(
            (o.running_on(1), o.running_on(2), o.running_on(3)),
            (1, 2, 1)
        );
        o.service_gone(2);
        assert_eq!(
            (o.running_on(1), o.running_on(2), o.running_on(3)),
            (1, 0, 1)
        );
        assert!(!o.per_service.contains_key(&2));
        let services = |o: &Orphans| {
            let mut s: Vec<_> = o
                .by_caller
                .values()
                .map(|(x, _)| (x.request, x.service))
                .collect();
            s.sort_unstable();
            s
        };
        assert_eq!(
            services(&o),
            vec![(10, 1), (20, NO_SERVICE), (21, NO_SERVICE), (30, 3)]
        );
        // Service 1 answers; service 3 leaves: nothing of 1's is touched.
        assert!(o.answered(1, 10));
        o.service_gone(3);
        assert_eq!(o.running_on(1), 0);
        assert_eq!(services(&o)[0], (10, 1));
        assert!(o.running.is_empty() && o.running_per_service.is_empty());
    }

    #[test]
    fn an_adopted_delivery_is_cancelled_with_the_one_that_adopted_it() {
        let mut o = Orphans::default();
        let t0 = Instant::now();
        let caller = (1000, 1, 7);
        // Delivery 1 orphaned, adopted by delivery 2, orphaned again,
        // adopted by 3, orphaned again: its expiry names all three.
        o.add(caller, (5, Some(1)), 1, t0, FREE);
        let adopted = o.adopt(caller).expect("orphan 1");
        o.adopted_by(2, adopted);
        o.add(caller, (5, Some(1)), 2, t0, FREE);
        let adopted = o.adopt(caller).expect("orphan 2");
        o.adopted_by(3, adopted);
        o.add(caller, (5, Some(1)), 3, t0, FREE);
        let gone = o.expired(t0, usize::MAX);
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].requests().collect::<Vec<_>>(), vec![3, 2, 1]);
        // A call that adopted one and then ended otherwise hands it over
        // once, and nothing stays behind.
        o.add(caller, (5, Some(1)), 4, t0, FREE);
        let adopted = o.adopt(caller).expect("orphan 4");
        o.adopted_by(5, adopted);
        assert_eq!(o.ended(5), vec![4]);
        assert!(o.ended(5).is_empty());
        assert!(o.adopted.is_empty() && o.is_empty());
    }

    #[test]
    fn past_a_bound_the_largest_holders_first_ending_orphans_are_given_up() {
        let mut o = Orphans::default();
        let t0 = Instant::now();
        let at = |s| t0 + Duration::from_secs(s);
        let two_each = Bounds {
            per_uid: Some(2),
            total: 3,
        };
        // uid 1000: its third orphan gives up its first-ending one.
        assert!(o
            .add((1000, 1, 1), (7, Some(1)), 1, at(5), two_each)
            .is_empty());
        assert!(o
            .add((1000, 1, 2), (7, Some(1)), 2, at(3), two_each)
            .is_empty());
        let gone = o.add((1000, 1, 3), (7, Some(1)), 3, at(4), two_each);
        assert_eq!(gone.iter().map(|g| g.request).collect::<Vec<_>>(), vec![2]);
        assert_eq!(
            o.adopt((1000, 1, 2)),
            None,
            "a given-up orphan is forgotten"
        );
        // Root (no per-uid bound) is held by the total only: past it, the
        // uid holding the most gives up its first-ending orphan (a tie: the
        // one whose first ends first), so uid 1000 keeps one.
        assert!(o.add((0, 9, 1), (8, Some(1)), 4, at(9), FREE).is_empty());
        let gone = o.add((0, 9, 2), (8, Some(1)), 5, at(8), two_each_root(2));
        assert_eq!(
            gone.iter().map(|g| g.request).collect::<Vec<_>>(),
            vec![3, 5]
        );
        assert_eq!(o.len(), 2);
        // Root floods on: it gives up its own, never uid 1000's last one.
        for call in 3..50 {
            let gone = o.add(
                (0, 9, call),
                (8, Some(1)),
                100 + call,
                at(10 + call),
                two_each_root(2),
            );
            assert_eq!(gone.len(), 1);
            assert_eq!(gone[0].service, 8, "root's own");
        }
        assert!(o.by_uid.contains_key(&1000));
        // The indexes follow.
        assert_eq!(o.by_time.len(), 2);
        assert_eq!(o.next_deadline(), Some(at(5)));
        // Adoption and expiry leave nothing behind either.
        assert!(o.adopt((1000, 1, 1)).is_some());
        assert_eq!(o.expired(at(600), usize::MAX).len(), 1);
        assert!(o.is_empty() && o.by_time.is_empty() && o.by_uid.is_empty());
        assert!(o.per_service.is_empty());
        assert!(o.running.is_empty() && o.running_per_service.is_empty());
    }

    #[test]
    fn running_orphans_are_counted_until_answered_cancelled_adopted_or_gone() {
        let mut o = Orphans::default();
        let t0 = Instant::now();
        let at = |s| t0 + Duration::from_secs(s);
        o.add((1000, 1, 1), (7, Some(1)), 1, at(1), FREE);
        o.add((1000, 1, 2), (7, Some(1)), 2, at(2), FREE);
        o.add((1000, 1, 3), (7, Some(1)), 3, at(3), FREE);
        o.add((1000, 1, 4), (8, Some(1)), 4, at(4), FREE);
        o.add((1000, 1, 5), (NO_SERVICE, Some(1)), 5, at(5), FREE);
        assert_eq!((o.running_on(7), o.running_on(8)), (3, 1));
        assert_eq!(o.running_on(NO_SERVICE), 0);
        // Answered: no longer in the window, still an orphan.
        assert!(!o.answered(8, 1), "another service's request");
        assert!(o.answered(7, 1));
        assert!(!o.answered(7, 1), "once");
        assert_eq!(o.running_on(7), 2);
        assert_eq!(o.len(), 5);
        // Its grace ends: nothing more to free.
        assert_eq!(o.expired(at(1), usize::MAX).len(), 1);
        assert_eq!(o.running_on(7), 2);
        // Expired unanswered, adopted: freed.
        assert_eq!(o.expired(at(2), usize::MAX).len(), 1);
        assert_eq!(o.running_on(7), 1);
        assert!(o.adopt((1000, 1, 3)).is_some());
        assert_eq!(o.running_on(7), 0);
        // Its service gone: freed.
        o.service_gone(8);
        assert_eq!(o.running_on(8), 0);
        assert!(o.running.is_empty() && o.running_per_service.is_empty());
        // The same caller's call orphaned again replaces the first, which
        // is given up (cancelled), not left running outside the window.
        assert!(o
            .add((1000, 2, 1), (9, Some(1)), 10, at(9), FREE)
            .is_empty());
        let gone = o.add((1000, 2, 1), (9, Some(1)), 11, at(9), FREE);
        assert_eq!(gone.iter().map(|g| g.request).collect::<Vec<_>>(), vec![10]);
        assert_eq!(o.running_on(9), 1);
        assert!(o.answered(9, 11));
        assert!(o.running.is_empty() && o.running_per_service.is_empty());
    }

    /// Root's bounds with `total` in all.
    fn two_each_root(total: usize) -> Bounds {
        Bounds {
            per_uid: None,
            total,
        }
    }
}
