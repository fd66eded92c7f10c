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
//! Private state behind a narrow API: [`Orphans::add`] when a caller
//! leaves, [`Orphans::adopt`] when a call arrives, [`Orphans::expired`]
//! when the timer fires, [`Orphans::service_gone`] when a service leaves.

use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::time::Instant;

use tokio::sync::Notify;

use crate::peers::PeerId;

/// Who made a call, across connections: the caller's uid, its instance id
/// (from `Hello`, kept across reconnects) and its call id.
pub type CallerKey = (u32, u64, u64);

/// A delivered call whose caller is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Orphan {
    /// The service connection running it.
    pub service: PeerId,
    /// The broker's request id of the delivery (what `Cancel` names).
    pub request: u64,
}

/// The orphans, by caller and by the time their grace ends.
#[derive(Debug, Default)]
pub struct Orphans {
    by_caller: HashMap<CallerKey, (Orphan, Instant)>,
    by_time: BTreeMap<(Instant, CallerKey), ()>,
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

    /// Remembers `orphan`, made by `caller`, until `until`.
    pub fn add(&mut self, caller: CallerKey, orphan: Orphan, until: Instant) {
        if let Some((_, old)) = self.by_caller.insert(caller, (orphan, until)) {
            self.by_time.remove(&(old, caller));
        }
        let earliest = self.next_deadline().is_none_or(|t| until < t);
        self.by_time.insert((until, caller), ());
        if earliest {
            self.wake.notify_one();
        }
    }

    /// A call from `caller` arrived: if it is the resubmission of an
    /// orphan, the orphan is no longer one (its service is not cancelled).
    pub fn adopt(&mut self, caller: CallerKey) -> Option<Orphan> {
        let (orphan, until) = self.by_caller.remove(&caller)?;
        self.by_time.remove(&(until, caller));
        Some(orphan)
    }

    /// Takes the orphans whose grace ended at `now`.
    pub fn expired(&mut self, now: Instant) -> Vec<Orphan> {
        let mut out = Vec::new();
        while let Some(entry) = self.by_time.first_entry() {
            let (until, caller) = *entry.key();
            if until > now {
                break;
            }
            entry.remove();
            if let Some((orphan, _)) = self.by_caller.remove(&caller) {
                out.push(orphan);
            }
        }
        out
    }

    /// Forgets the orphans running on `service` (it disconnected: nothing
    /// to cancel).
    pub fn service_gone(&mut self, service: PeerId) {
        if self.is_empty() {
            return;
        }
        let by_time = &mut self.by_time;
        self.by_caller.retain(|caller, (o, until)| {
            let keep = o.service != service;
            if !keep {
                by_time.remove(&(*until, *caller));
            }
            keep
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn adopt_expire_and_service_gone() {
        let mut o = Orphans::default();
        let t0 = Instant::now();
        let a = Orphan {
            service: 7,
            request: 1,
        };
        let b = Orphan {
            service: 8,
            request: 2,
        };
        let c = Orphan {
            service: 7,
            request: 3,
        };
        o.add((1000, 1, 1), a, t0 + Duration::from_secs(1));
        o.add((1000, 1, 2), b, t0 + Duration::from_secs(2));
        o.add((1000, 2, 1), c, t0 + Duration::from_secs(3));
        assert_eq!(o.next_deadline(), Some(t0 + Duration::from_secs(1)));
        // The resubmission of call 2 adopts it: never expires.
        assert_eq!(o.adopt((1000, 1, 2)), Some(b));
        assert_eq!(o.adopt((1000, 1, 2)), None);
        assert!(o.expired(t0).is_empty());
        assert_eq!(o.expired(t0 + Duration::from_secs(2)), vec![a]);
        o.service_gone(7);
        assert!(o.is_empty());
        assert_eq!(o.next_deadline(), None);
        assert!(o.expired(t0 + Duration::from_secs(9)).is_empty());
    }
}
