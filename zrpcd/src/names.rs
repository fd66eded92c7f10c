//! The name registry: service name -> instances, and calls waiting for a
//! name to appear.

use std::collections::{BTreeSet, VecDeque};
use std::ops::Bound;

use rustc_hash::{FxHashMap, FxHashSet};

use crate::peers::PeerId;

/// One service name.
#[derive(Debug, Default)]
pub struct NameEntry {
    /// Connections holding the name (more than one only if shared).
    pub instances: Vec<PeerId>,
    /// Whether the instances registered as shared.
    pub shared: bool,
    /// Broker call ids parked until an instance registers.
    waiting: Waiting,
}

/// The calls parked on a name, oldest first.
///
/// A parked call can end in any order (its deadline, its caller's cancel
/// or departure), and there may be hundreds of thousands: finding it in
/// the queue to take it out would cost a search of the queue per call, on
/// the broker's event loop (cancelling 40,000 newest first took seconds).
/// So an ended call leaves the set of live ids at once and the queue
/// lazily: from either end as soon as it gets there, the rest when the
/// queue is more than twice as long as the live set (amortised constant
/// time per call) or when it is taken.
#[derive(Debug, Default)]
struct Waiting {
    /// Ids in parking order, some of them ended.
    queue: VecDeque<u64>,
    /// The ids still parked.
    live: FxHashSet<u64>,
}

impl Waiting {
    fn push(&mut self, call: u64) {
        if self.live.insert(call) {
            self.queue.push_back(call);
        }
    }

    /// Takes `call` out (nothing if it is not parked here).
    fn remove(&mut self, call: u64) {
        if !self.live.remove(&call) {
            return;
        }
        if self.live.is_empty() {
            self.queue.clear();
            return;
        }
        while self.queue.back().is_some_and(|c| !self.live.contains(c)) {
            self.queue.pop_back();
        }
        while self.queue.front().is_some_and(|c| !self.live.contains(c)) {
            self.queue.pop_front();
        }
        if self.queue.len() > 2 * self.live.len() + 16 {
            let live = &self.live;
            self.queue.retain(|c| live.contains(c));
        }
    }

    fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    /// Takes the parked ids, oldest first, each once.
    fn take(&mut self) -> VecDeque<u64> {
        let mut live = std::mem::take(&mut self.live);
        std::mem::take(&mut self.queue)
            .into_iter()
            .filter(|c| live.remove(c))
            .collect()
    }
}

/// Why a registration was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum RegisterError {
    /// Held by another connection, and not both shared.
    Taken,
    /// This connection already holds it.
    AlreadyHeld,
}

/// All names.
#[derive(Debug, Default)]
pub struct Names {
    map: FxHashMap<Box<str>, NameEntry>,
    /// The names with at least one instance, in order (for paging through
    /// `zrpcd.list`; the call path reads only `map`).
    held: BTreeSet<Box<str>>,
}

impl Names {
    /// Registers `peer` under `name`.
    pub fn register(
        &mut self,
        name: &str,
        peer: PeerId,
        shared: bool,
    ) -> Result<(), RegisterError> {
        let entry = match self.map.get_mut(name) {
            Some(e) => e,
            None => self.map.entry(name.into()).or_default(),
        };
        if entry.instances.contains(&peer) {
            return Err(RegisterError::AlreadyHeld);
        }
        let joinable = entry.instances.is_empty() || (entry.shared && shared);
        if !joinable {
            return Err(RegisterError::Taken);
        }
        entry.shared = shared;
        entry.instances.push(peer);
        if entry.instances.len() == 1 {
            self.held.insert(name.into());
        }
        Ok(())
    }

    /// Removes `peer` from `name`. Returns false if it did not hold it.
    pub fn unregister(&mut self, name: &str, peer: PeerId) -> bool {
        let Some(entry) = self.map.get_mut(name) else {
            return false;
        };
        let Some(pos) = entry.instances.iter().position(|p| *p == peer) else {
            return false;
        };
        entry.instances.swap_remove(pos);
        if entry.instances.is_empty() {
            self.held.remove(name);
            if entry.waiting.is_empty() {
                self.map.remove(name);
            }
        }
        true
    }

    /// The connections holding `name`.
    pub fn holders(&self, name: &str) -> &[PeerId] {
        self.map.get(name).map_or(&[], |e| e.instances.as_slice())
    }

    /// Whether `name`'s holders registered it as shared.
    pub fn is_shared(&self, name: &str) -> bool {
        self.map.get(name).is_some_and(|e| e.shared)
    }

    /// Whether at least one connection holds `name`.
    pub fn is_held(&self, name: &str) -> bool {
        self.map.get(name).is_some_and(|e| !e.instances.is_empty())
    }

    /// Whether `peer` holds `name`.
    pub fn is_instance(&self, name: &str, peer: PeerId) -> bool {
        self.map
            .get(name)
            .is_some_and(|e| e.instances.contains(&peer))
    }

    /// Picks the instance of `name` with the fewest outstanding calls.
    pub fn pick(&self, name: &str, outstanding: impl Fn(PeerId) -> u32) -> Option<PeerId> {
        let entry = self.map.get(name)?;
        match entry.instances.as_slice() {
            [] => None,
            [one] => Some(*one),
            many => many.iter().copied().min_by_key(|p| outstanding(*p)),
        }
    }

    /// Parks a call until `name` gets an instance.
    pub fn park(&mut self, name: &str, call: u64) {
        match self.map.get_mut(name) {
            Some(e) => e.waiting.push(call),
            None => self.map.entry(name.into()).or_default().waiting.push(call),
        }
    }

    /// Removes a parked call (on timeout or cancel).
    pub fn unpark(&mut self, name: &str, call: u64) {
        if let Some(entry) = self.map.get_mut(name) {
            entry.waiting.remove(call);
            if entry.instances.is_empty() && entry.waiting.is_empty() {
                self.map.remove(name);
            }
        }
    }

    /// Takes the calls parked on `name` (after it gained an instance).
    pub fn take_waiting(&mut self, name: &str) -> VecDeque<u64> {
        self.map
            .get_mut(name)
            .map(|e| e.waiting.take())
            .unwrap_or_default()
    }

    /// Number of names with at least one instance.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// True if no name has an instance.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// The names with an instance that sort after `after` (all with
    /// `None`), in order, with their instances.
    pub fn after<'a>(
        &'a self,
        after: Option<&str>,
    ) -> impl Iterator<Item = (&'a str, &'a [PeerId])> + 'a {
        let from = match after {
            Some(a) => Bound::Excluded(a),
            None => Bound::Unbounded,
        };
        self.held
            .range::<str, _>((from, Bound::Unbounded))
            .filter_map(|k| {
                let e = self.map.get(k)?;
                Some((&**k, e.instances.as_slice()))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclusive_and_shared() {
        let mut n = Names::default();
        assert_eq!(n.register("a", 1, false), Ok(()));
        assert_eq!(n.register("a", 2, false), Err(RegisterError::Taken));
        assert_eq!(n.register("a", 2, true), Err(RegisterError::Taken));
        assert_eq!(n.register("a", 1, false), Err(RegisterError::AlreadyHeld));
        assert!(n.unregister("a", 1));
        assert!(!n.unregister("a", 1));
        assert_eq!(n.register("a", 2, true), Ok(()));
        assert_eq!(n.register("a", 3, true), Ok(()));
        assert_eq!(n.register("a", 4, false), Err(RegisterError::Taken));
        let out = |p| if p == 2 { 5 } else { 1 };
        assert_eq!(n.pick("a", out), Some(3));
        assert_eq!(n.len(), 1);
    }

    #[test]
    fn parking() {
        let mut n = Names::default();
        n.park("b", 10);
        n.park("b", 11);
        n.unpark("b", 10);
        assert_eq!(n.pick("b", |_| 0), None);
        n.register("b", 1, false).expect("free");
        assert_eq!(n.take_waiting("b"), VecDeque::from(vec![11]));
        n.unregister("b", 1);
        assert!(n.is_empty());
        assert!(n.map.is_empty(), "entry freed");
    }

    #[test]
    fn parked_calls_end_in_any_order_without_a_search() {
        let mut n = Names::default();
        for c in 0..1000 {
            n.park("x", c);
        }
        // Newest first, then nine in ten of the rest from the middle: the
        // queue stays within twice the live calls (plus a little).
        for c in (900..1000).rev() {
            n.unpark("x", c);
        }
        for c in (0..900).filter(|c| c % 10 != 0) {
            n.unpark("x", c);
        }
        let w = &n.map["x"].waiting;
        assert_eq!(w.live.len(), 90);
        assert!(w.queue.len() <= 2 * 90 + 16, "{}", w.queue.len());
        // An id not parked here (taken already, or another name's) changes
        // nothing.
        n.unpark("x", 5000);
        n.unpark("x", 1);
        assert_eq!(n.map["x"].waiting.live.len(), 90);
        let taken = n.take_waiting("x");
        assert_eq!(taken, (0..900).step_by(10).collect::<VecDeque<u64>>());
        assert!(n.take_waiting("x").is_empty());
        // All ended: the entry goes.
        n.park("y", 1);
        n.park("y", 2);
        n.unpark("y", 1);
        n.unpark("y", 2);
        assert!(!n.map.contains_key("y"));
    }

    #[test]
    fn in_order_after_a_name() {
        let mut n = Names::default();
        for (name, peer) in [("c", 3), ("a", 1), ("b", 2)] {
            n.register(name, peer, true).expect("free");
        }
        n.register("b", 4, true).expect("shared");
        n.park("waiting", 9);
        let all: Vec<_> = n.after(None).map(|(k, _)| k).collect();
        assert_eq!(
            all,
            ["a", "b", "c"],
            "a name with only waiting calls is not listed"
        );
        let rest: Vec<_> = n.after(Some("a")).collect();
        assert_eq!(rest, [("b", &[2, 4][..]), ("c", &[3][..])]);
        assert_eq!(n.after(Some("c")).count(), 0);
        assert_eq!(n.after(Some("bb")).count(), 1, "after a name nobody holds");
        n.unregister("b", 2);
        assert_eq!(n.after(Some("a")).count(), 2, "b still has an instance");
        n.unregister("b", 4);
        assert_eq!(n.after(Some("a")).count(), 1);
        assert_eq!(n.len(), 2);
    }
}
