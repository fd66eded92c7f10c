//! The route interner: each distinct `(service, method)` pair a pending
//! call uses is stored once ([`RouteId`]), reference-counted by the calls,
//! instead of keeping each call's envelope bytes alive. A route also keeps
//! one value for the broker, its tag: the broker stores the route's
//! statistics row there ([`crate::stats::Stats::tag_of`]), so ending a call
//! finds its row without a name lookup. Up to [`IDLE_ROUTES`] routes that
//! no call uses are kept for the next call to the same method.

use std::hash::{BuildHasher, Hasher};
use std::rc::Rc;

use hashbrown::HashTable;

use crate::hashing::PeerKeyState;

/// Index of an interned `(service, method)` pair.
pub type RouteId = u32;

/// Interned routes nobody uses are kept (for the next call to the same
/// method) up to this many; beyond it they are freed at once, so calls to
/// ever new names cannot grow the table.
pub const IDLE_ROUTES: usize = 1024;

#[derive(Debug)]
struct Route {
    service: Rc<str>,
    method: Rc<str>,
    hash: u64,
    /// Pending calls using this route.
    refs: u32,
    /// A value the broker keeps with the route (its per-service statistics
    /// slot), `u32::MAX` while unset.
    tag: u32,
}

/// Interned `(service, method)` pairs, reference-counted by the calls.
#[derive(Debug, Default)]
pub(super) struct Routes {
    entries: Vec<Option<Route>>,
    free: Vec<RouteId>,
    index: HashTable<RouteId>,
    /// The hash of `index`, whose keys callers choose (see
    /// [`crate::hashing`]).
    hasher: PeerKeyState,
    idle: usize,
}

fn route_hash(hasher: &PeerKeyState, service: &str, method: &str) -> u64 {
    let mut h = hasher.build_hasher();
    h.write(service.as_bytes());
    h.write_u8(0xff);
    h.write(method.as_bytes());
    h.finish()
}

impl Routes {
    pub(super) fn find(&self, service: &str, method: &str) -> Option<RouteId> {
        let hash = route_hash(&self.hasher, service, method);
        let entries = &self.entries;
        self.index
            .find(hash, |&id| {
                entries[id as usize]
                    .as_ref()
                    .is_some_and(|r| &*r.service == service && &*r.method == method)
            })
            .copied()
    }

    /// Takes a reference to the route of `service` and `method`, creating it
    /// if needed; `hint` is its id if the caller already looked it up.
    pub(super) fn acquire(
        &mut self,
        service: &str,
        method: &str,
        hint: Option<RouteId>,
    ) -> RouteId {
        let id = match hint.or_else(|| self.find(service, method)) {
            Some(id) => id,
            None => self.create(service, method),
        };
        if let Some(r) = self.entries[id as usize].as_mut() {
            if r.refs == 0 {
                self.idle -= 1;
            }
            r.refs += 1;
        }
        id
    }

    fn create(&mut self, service: &str, method: &str) -> RouteId {
        let hash = route_hash(&self.hasher, service, method);
        let route = Route {
            service: service.into(),
            method: method.into(),
            hash,
            refs: 0,
            tag: u32::MAX,
        };
        let id = match self.free.pop() {
            Some(id) => {
                self.entries[id as usize] = Some(route);
                id
            }
            None => {
                self.entries.push(Some(route));
                (self.entries.len() - 1) as RouteId
            }
        };
        self.idle += 1;
        let entries = &self.entries;
        self.index.insert_unique(hash, id, |&i| {
            entries[i as usize].as_ref().map_or(0, |r| r.hash)
        });
        id
    }

    /// Drops a call's reference to route `id`.
    pub(super) fn release(&mut self, id: RouteId) {
        let Some(r) = self.entries[id as usize].as_mut() else {
            return;
        };
        r.refs -= 1;
        if r.refs > 0 {
            return;
        }
        if self.idle < IDLE_ROUTES {
            self.idle += 1;
            return;
        }
        let hash = r.hash;
        if let Ok(e) = self.index.find_entry(hash, |&i| i == id) {
            e.remove();
        }
        self.entries[id as usize] = None;
        self.free.push(id);
    }

    pub(super) fn names(&self, id: RouteId) -> (&Rc<str>, &Rc<str>) {
        match &self.entries[id as usize] {
            Some(r) => (&r.service, &r.method),
            None => unreachable!("a pending call's route is alive"),
        }
    }

    /// The tag kept with route `id`, if set.
    pub(super) fn tag(&self, id: RouteId) -> Option<u32> {
        let r = self.entries.get(id as usize)?.as_ref()?;
        (r.tag != u32::MAX).then_some(r.tag)
    }

    /// Keeps `tag` with route `id` (for as long as the route lives).
    pub(super) fn set_tag(&mut self, id: RouteId, tag: u32) {
        if let Some(Some(r)) = self.entries.get_mut(id as usize) {
            r.tag = tag;
        }
    }

    /// Routes alive, used or idle.
    pub(super) fn len(&self) -> usize {
        self.entries.len() - self.free.len()
    }
}
