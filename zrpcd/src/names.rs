//! The name registry: service name -> instances, and calls waiting for a
//! name to appear.

use std::collections::BTreeSet;
use std::ops::Bound;

use crate::hashing::{PeerKeyedMap, PeerKeyedSet};

use crate::peers::PeerId;
use crate::waiting::Waiting;

/// One service name.
#[derive(Debug, Default)]
pub struct NameEntry {
    /// Connections holding the name (more than one only if shared).
    pub instances: Vec<PeerId>,
    /// Whether the instances registered as shared.
    pub shared: bool,
    /// Broker call ids waiting for an instance, or for room in one
    /// (see [`crate::waiting`]).
    waiting: Waiting,
    /// Where the next [`Names::pick`] among many instances starts.
    next: std::cell::Cell<usize>,
}

/// The most instances [`Names::pick`] compares for one call. Each costs a
/// lookup; a user can give a shared name of its own thousands of instances
/// (one per connection), and comparing them all made every call to it cost
/// the broker's only thread that many lookups.
pub const PICK_AMONG: usize = 16;

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
    map: PeerKeyedMap<Box<str>, NameEntry>,
    /// The names with at least one instance, in order (for paging through
    /// `zrpcd.list`; the call path reads only `map`).
    held: BTreeSet<Box<str>>,
    /// Calls waiting on all names together (a look at it tells whether
    /// there is any to take, see [`Names::pop_waiting`]).
    waiting: usize,
    /// The names with calls waiting (so that a freed slot looks only at
    /// them, not at every name of its connection).
    waiting_names: PeerKeyedSet<Box<str>>,
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

    /// Picks the instance of `name` with the fewest outstanding calls: of
    /// all of them when there are at most [`PICK_AMONG`]; else of the
    /// `PICK_AMONG` from where the name's window stands, or, if the best
    /// of those has no room (`room`: fewer outstanding calls than that),
    /// of as many more windows as it takes to find one with room (all of
    /// them only when every instance is full). Looking does not move the
    /// window ([`Names::advance`] does, once a call is delivered), so two
    /// picks in a row with nothing delivered in between agree.
    pub fn pick(
        &self,
        name: &str,
        outstanding: impl Fn(PeerId) -> u32,
        room: u32,
    ) -> Option<PeerId> {
        let entry = self.map.get(name)?;
        match entry.instances.as_slice() {
            [] => None,
            [one] => Some(*one),
            few if few.len() <= PICK_AMONG => few.iter().copied().min_by_key(|p| outstanding(*p)),
            many => {
                let start = entry.next.get() % many.len();
                let mut best: Option<(u32, PeerId)> = None;
                for i in 0..many.len() {
                    let p = many[(start + i) % many.len()];
                    let o = outstanding(p);
                    if best.is_none_or(|(b, _)| o < b) {
                        best = Some((o, p));
                    }
                    // A window looked at whole, and its best has room.
                    if (i + 1) % PICK_AMONG == 0 && best.is_some_and(|(b, _)| b < room) {
                        break;
                    }
                }
                best.map(|(_, p)| p)
            }
        }
    }

    /// A call was delivered to an instance [`Names::pick`] chose: the
    /// window of `name` moves on, so that every instance comes up and idle
    /// ones share the calls.
    pub fn advance(&self, name: &str) {
        if let Some(e) = self.map.get(name) {
            if e.instances.len() > PICK_AMONG {
                e.next.set(e.next.get().wrapping_add(PICK_AMONG));
            }
        }
    }

    /// Parks a call of a caller of uid `uid` (made with `NO_WAIT` if
    /// `no_wait`) until `name` has an instance with room for it.
    pub fn park(&mut self, name: &str, call: u64, uid: u32, no_wait: bool) {
        let entry = match self.map.get_mut(name) {
            Some(e) => e,
            None => self.map.entry(name.into()).or_default(),
        };
        let before = entry.waiting.len();
        entry.waiting.push(call, uid, no_wait);
        self.waiting += entry.waiting.len() - before;
        if before == 0 && !entry.waiting.is_empty() {
            self.waiting_names.insert(name.into());
        }
    }

    /// Removes a parked call (on timeout or cancel).
    pub fn unpark(&mut self, name: &str, call: u64) {
        if let Some(entry) = self.map.get_mut(name) {
            let before = entry.waiting.len();
            entry.waiting.remove(call);
            self.waiting -= before - entry.waiting.len();
            if entry.waiting.is_empty() {
                if before > 0 {
                    self.waiting_names.remove(name);
                }
                if entry.instances.is_empty() {
                    self.map.remove(name);
                }
            }
        }
    }

    /// Takes the next call parked on `name`, in turns by caller uid (see
    /// [`crate::waiting`]).
    pub fn pop_waiting(&mut self, name: &str) -> Option<u64> {
        let entry = self.map.get_mut(name)?;
        let call = entry.waiting.pop()?;
        self.waiting -= 1;
        if entry.waiting.is_empty() {
            self.waiting_names.remove(name);
            if entry.instances.is_empty() {
                self.map.remove(name);
            }
        }
        Some(call)
    }

    /// The names with calls waiting.
    pub fn waiting_names(&self) -> impl Iterator<Item = &str> + '_ {
        self.waiting_names.iter().map(|n| &**n)
    }

    /// How many names have calls waiting.
    pub fn waiting_names_len(&self) -> usize {
        self.waiting_names.len()
    }

    /// Whether calls wait on `name`.
    pub fn has_waiting(&self, name: &str) -> bool {
        self.waiting_names.contains(name)
    }

    /// The calls made with `NO_WAIT` waiting on `name` (see
    /// [`Waiting::take_no_wait`]).
    pub fn take_no_wait(&mut self, name: &str) -> Vec<u64> {
        self.map
            .get_mut(name)
            .map_or_else(Vec::new, |e| e.waiting.take_no_wait())
    }

    /// Calls parked on all names together.
    pub fn waiting(&self) -> usize {
        self.waiting
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
        // Held already with another flag: nothing changes, the name stays
        // exclusive (docs/protocol.md).
        assert_eq!(n.register("a", 1, true), Err(RegisterError::AlreadyHeld));
        assert_eq!(n.register("a", 2, true), Err(RegisterError::Taken));
        assert!(n.unregister("a", 1));
        assert!(!n.unregister("a", 1));
        assert_eq!(n.register("a", 2, true), Ok(()));
        assert_eq!(n.register("a", 3, true), Ok(()));
        assert_eq!(n.register("a", 4, false), Err(RegisterError::Taken));
        let out = |p| if p == 2 { 5 } else { 1 };
        assert_eq!(n.pick("a", out, u32::MAX), Some(3));
        assert_eq!(n.len(), 1);
    }

    #[test]
    fn a_pick_among_many_instances_looks_at_a_few_and_every_one_comes_up() {
        let mut n = Names::default();
        let count = 1000u64;
        for p in 0..count {
            n.register("wide", p, true).expect("shared");
        }
        let looked = std::cell::Cell::new(0);
        let idle = |_| {
            looked.set(looked.get() + 1);
            0
        };
        // Looking does not move the window: two picks agree.
        assert_eq!(n.pick("wide", idle, 1), n.pick("wide", idle, 1));
        looked.set(0);
        // All idle: a window of 16 is looked at, and each delivery moves
        // the window on, so that the calls go round the instances.
        let rounds = count.div_ceil(PICK_AMONG as u64);
        let mut picked = std::collections::HashSet::new();
        for _ in 0..rounds {
            picked.insert(n.pick("wide", idle, 1).expect("an instance"));
            n.advance("wide");
        }
        assert_eq!(looked.get() as u64, rounds * PICK_AMONG as u64);
        assert_eq!(picked.len() as u64, rounds);
        // Each pick is the least busy of the window it looks at.
        let busy = |p: PeerId| if p % 7 == 3 { 0 } else { 10 };
        for _ in 0..200 {
            let p = n.pick("wide", busy, 1).expect("an instance");
            assert_eq!(p % 7, 3, "picked {p}, not an idle instance of its window");
            n.advance("wide");
        }
        // Every instance full but one, far from the window: the pick goes
        // on until it finds it (a full window must not make a call wait
        // while an instance has room).
        let full_but_700 = |p: PeerId| if p == 700 { 0 } else { 5 };
        assert_eq!(n.pick("wide", full_but_700, 5), Some(700));
        // All full: the least busy of all, which the caller finds full.
        assert_eq!(n.pick("wide", |p| 5 + u32::from(p != 42), 5), Some(42));
        // A few instances: all compared, as before.
        for p in 0..PICK_AMONG as u64 {
            n.register("few", p, true).expect("shared");
        }
        let last = PICK_AMONG as u64 - 1;
        for _ in 0..50 {
            assert_eq!(
                n.pick("few", |p| u32::from(p != last), u32::MAX),
                Some(last)
            );
        }
    }

    #[test]
    fn parking() {
        let mut n = Names::default();
        n.park("b", 10, 1000, false);
        n.park("b", 11, 1000, false);
        n.unpark("b", 10);
        assert_eq!(n.waiting(), 1);
        assert_eq!(n.pick("b", |_| 0, 1), None);
        n.register("b", 1, false).expect("free");
        assert_eq!(n.pop_waiting("b"), Some(11));
        assert_eq!(n.pop_waiting("b"), None);
        assert_eq!(n.waiting(), 0);
        n.unregister("b", 1);
        assert!(n.is_empty());
        assert!(n.map.is_empty(), "entry freed");
    }

    #[test]
    fn in_order_after_a_name() {
        let mut n = Names::default();
        for (name, peer) in [("c", 3), ("a", 1), ("b", 2)] {
            n.register(name, peer, true).expect("free");
        }
        n.register("b", 4, true).expect("shared");
        n.park("waiting", 9, 1000, false);
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
