//! The pending-calls table: every call the broker has accepted and not yet
//! answered. This file owns the calls themselves and their two ways in:
//! the broker call id and the caller's own id. The parts each call refers
//! to are in the submodules: [`routes`] (interned service and method
//! names), `timers` (deadlines and the table's clock) and [`kept`] (the
//! payload kept for re-delivery).
//!
//! Memory per call matters (there can be a million of them), so:
//! - calls live in a slab of fixed-size pages (no hash-table slack, no
//!   reallocation of one huge table); a broker call id is the slot index
//!   plus the slot's generation, so a stale id never matches a reused slot;
//! - the `(caller, caller call id)` index stores only a 4-byte slot index
//!   per call (hashing and comparing through the slab);
//! - the service and method names are interned once per distinct pair
//!   ([`RouteId`]) instead of keeping each call's envelope bytes alive;
//! - a small payload is kept inline in the call's slot ([`KeptPayload`]);
//! - each connection's calls are two lists through the slots (`by_peer`),
//!   so that a departure walks its own calls only.

mod by_peer;
pub mod kept;
pub mod routes;
mod timers;

use std::hash::BuildHasher;

use crate::hashing::PeerKeyState;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hashbrown::HashTable;

use crate::peers::PeerId;
use by_peer::{LinkStore, Links, List, PeerLists};
pub use kept::{KeptPayload, INLINE_PAYLOAD, SMALL_PAYLOAD_COPY};
pub use routes::RouteId;
use routes::Routes;
use timers::{TimerKey, Timers};

/// Slots per slab page.
const PAGE: usize = 1024;

/// The bit of `Pending::target` that marks a call parked again after a
/// delivery (the instance that had it disconnected). Peer ids count up
/// from 1 and never reach it.
const PARKED_AFTER_DELIVERY: PeerId = 1 << 63;

/// With [`PARKED_AFTER_DELIVERY`]: the call is pinned to a user, whose uid
/// is in the low 32 bits of `Pending::target` (see [`Pending::pinned_to`]).
/// Alone: a call never delivered, held back for the user whose service
/// held its name when it came (see [`Pending::hold_for`]).
const PINNED: PeerId = 1 << 62;

/// The uid a call parked again is pinned to when no way back to `Parked`
/// named its user (not reached: [`PendingCalls::repark`] and
/// [`Pending::delivered_before`] always say): it matches no instance, so
/// such a call fails rather than reach anyone.
pub const NOBODY: u32 = u32::MAX;

/// `Pending::target` of a call parked again after a delivery, pinned to
/// `uid` or not.
fn parked_after_delivery(uid: Option<u32>) -> PeerId {
    match uid {
        Some(uid) => PARKED_AFTER_DELIVERY | PINNED | u64::from(uid),
        None => PARKED_AFTER_DELIVERY,
    }
}

/// The broker's own bit of `Pending::flags`, never a caller's (cleared when
/// a call is stored): the call's current delivery is a re-delivery, after
/// the instance that had it disconnected. No field of its own either.
const REDELIVERED: u32 = 1 << 31;

/// Where a pending call is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Waiting for its service name to get an instance.
    Parked,
    /// Delivered to this service connection.
    Delivered(PeerId),
}

/// One call in flight through the broker. Kept small (128 bytes, 70 of them
/// for a small payload kept inline): there
/// can be a million of them. The deadline lives in the timer wheel only.
#[derive(Debug)]
pub struct Pending {
    /// The calling connection.
    pub caller: PeerId,
    /// The caller's own id for the call.
    pub caller_call: u64,
    /// The payload, kept for re-delivery (see [`KeptPayload`]).
    pub payload: KeptPayload,
    /// The timer entry, if the call has a deadline.
    timer: Option<TimerKey>,
    /// The service connection it was delivered to; while parked, 0 if it
    /// was never delivered, else [`PARKED_AFTER_DELIVERY`] with, if it is
    /// pinned, [`PINNED`] and the uid of the user whose instance had it (no
    /// field of its own: the slot would grow by 8 bytes).
    target: PeerId,
    /// When the broker accepted it, in microseconds since the table was
    /// created.
    started_us: u64,
    /// The caller's flags ([`zrpc_proto::flags`]) and [`REDELIVERED`].
    flags: u32,
    /// Service and method.
    pub route: RouteId,
}

impl Pending {
    /// The caller's flags ([`zrpc_proto::flags`]).
    pub fn call_flags(&self) -> u32 {
        self.flags & !REDELIVERED
    }

    /// Marks the call's current delivery as a re-delivery (see
    /// [`was_redelivered`](Self::was_redelivered)).
    pub fn mark_redelivered(&mut self) {
        self.flags |= REDELIVERED;
    }

    /// Whether the instance that has the call now got it as a re-delivery:
    /// an instance had it before and disconnected, so it may have run,
    /// whatever the instance that has it now (the NATS bridge, say)
    /// answers.
    pub fn was_redelivered(&self) -> bool {
        self.flags & REDELIVERED != 0
    }

    /// Where the call is.
    pub fn stage(&self) -> Stage {
        match self.target {
            0 => Stage::Parked,
            t if t & (PARKED_AFTER_DELIVERY | PINNED) != 0 => Stage::Parked,
            t => Stage::Delivered(t),
        }
    }

    /// Moves the call (peer ids start at 1, so 0 can mean parked). The
    /// table's [`PendingCalls::set_stage`] is the way in: it keeps the
    /// per-connection lists in step. A delivered call parked this way is
    /// pinned to [`NOBODY`] (it fails rather than reach anyone): the
    /// broker's ways back to `Parked` name its user with
    /// [`PendingCalls::repark`].
    fn set_stage(&mut self, stage: Stage) {
        self.target = match stage {
            Stage::Parked if self.stage() == Stage::Parked => self.target,
            Stage::Parked => parked_after_delivery(Some(NOBODY)),
            Stage::Delivered(t) => t,
        };
    }

    /// The call was delivered before this entry existed (to an instance of
    /// user `uid`, `None` for the NATS bridge): it resubmits a call whose
    /// caller left while an instance had it (an orphan it adopted, see
    /// `crate::orphans`). It counts as delivered (see
    /// [`was_delivered`](Self::was_delivered)): that instance may have run
    /// it, or still runs it; and it goes to no other user's instance
    /// ([`pinned_to`](Self::pinned_to)).
    pub fn delivered_before(&mut self, uid: Option<u32>) {
        if self.target == 0 {
            self.target = parked_after_delivery(uid);
        }
    }

    /// The uid of the user whose instance had the call, while it waits to
    /// be delivered again (that instance disconnected, or gave up the name
    /// while its caller was away): its arguments were given to that user's
    /// service, and a re-delivery goes to that user's services only, never
    /// to whoever registers the name next. `None` while it is delivered,
    /// if it was never delivered, or if it was the NATS bridge that had it
    /// (it forwards for the broker itself).
    pub fn pinned_to(&self) -> Option<u32> {
        (self.target & PINNED != 0).then_some(self.target as u32)
    }

    /// The call, never delivered, waits because every instance of its name
    /// had its window full (`--max-delivered-per-conn`), and they are
    /// `uid`'s: it was made to that user's service, and goes to that
    /// user's services only ([`pinned_to`](Self::pinned_to)), not to
    /// another user's that registers the name after they left (which was
    /// given the calls waiting, their arguments included). A call parked
    /// again after the NATS bridge had it (not pinned) is pinned the same
    /// way, and stays one that may have run.
    pub fn hold_for(&mut self, uid: u32) {
        if self.stage() == Stage::Parked && self.target & PINNED == 0 {
            self.target |= PINNED | u64::from(uid);
        }
    }

    /// Whether the call was ever delivered to a service, also if it is
    /// parked again now (the instance that had it disconnected): it may
    /// then have run, and must not be answered with a code that says it
    /// never did (`NoSuchService`, `TimeoutNoService`).
    pub fn was_delivered(&self) -> bool {
        self.target & PARKED_AFTER_DELIVERY != 0 || matches!(self.stage(), Stage::Delivered(_))
    }
}

/// A call to store, as [`PendingCalls::insert`] takes it.
#[derive(Debug)]
pub struct NewCall<'a> {
    /// The calling connection.
    pub caller: PeerId,
    /// The caller's own id for the call.
    pub caller_call: u64,
    /// Target service name (already validated).
    pub service: &'a str,
    /// Target method name (already validated).
    pub method: &'a str,
    /// The route of `service` and `method` if [`PendingCalls::find_route`]
    /// found it (saves a second lookup).
    pub route: Option<RouteId>,
    /// The payload, as [`KeptPayload::new`] keeps it.
    pub payload: KeptPayload,
    /// Call flags.
    pub flags: u32,
}

/// A call taken out of the table, with its names.
#[derive(Debug)]
pub struct Removed {
    /// The call.
    pub call: Pending,
    /// Its service name.
    pub service: Rc<str>,
    /// Its method name.
    pub method: Rc<str>,
    /// The tag of its route ([`PendingCalls::set_route_tag`]), if set.
    pub route_tag: Option<u32>,
}

#[derive(Debug)]
struct Slot {
    /// Bumped each time the slot is freed; part of the broker call id.
    gen: u32,
    /// Next free slot while this one is free (`u32::MAX`: none).
    next_free: u32,
    /// The call's place in its connections' lists (`by_peer`).
    links: Links,
    call: Option<Pending>,
}

/// The slab, as the per-connection lists see it.
type Pages = Vec<Box<[Slot]>>;

impl LinkStore for Pages {
    fn links(&self, idx: u32) -> &Links {
        let i = idx as usize;
        &self[i / PAGE][i % PAGE].links
    }

    fn links_mut(&mut self, idx: u32) -> &mut Links {
        let i = idx as usize;
        &mut self[i / PAGE][i % PAGE].links
    }
}

/// All pending calls, keyed by broker call id, and their timers.
#[derive(Debug)]
pub struct PendingCalls {
    pages: Pages,
    /// Slots handed out so far (used or on the free list).
    slots: usize,
    /// The free list, first in first out (`u32::MAX`: empty): a freed slot
    /// is reused after every other free one, so no slot's generation runs
    /// through its 2^32 values quickly (with a last-in-first-out list, one
    /// call in flight at a time reused the same slot for every call).
    free_head: u32,
    free_tail: u32,
    len: usize,
    /// Payload bytes kept by all pending calls (`--max-pending-bytes`).
    payload_bytes: usize,
    by_caller: HashTable<u32>,
    /// The hash of `by_caller`'s keys, which callers choose (their call
    /// ids): see [`crate::hashing`].
    caller_hasher: PeerKeyState,
    by_peer: PeerLists,
    routes: Routes,
    timers: Timers,
}

impl Default for PendingCalls {
    fn default() -> Self {
        PendingCalls {
            pages: Vec::new(),
            slots: 0,
            free_head: u32::MAX,
            free_tail: u32::MAX,
            len: 0,
            payload_bytes: 0,
            by_caller: HashTable::new(),
            caller_hasher: PeerKeyState::default(),
            by_peer: PeerLists::default(),
            routes: Routes::default(),
            timers: Timers::default(),
        }
    }
}

fn caller_hash(hasher: &PeerKeyState, caller: PeerId, caller_call: u64) -> u64 {
    hasher.hash_one((caller, caller_call))
}

/// Splits a broker call id into slot index and generation.
fn split_id(id: u64) -> (usize, u32) {
    ((id & 0xffff_ffff) as usize, (id >> 32) as u32)
}

impl PendingCalls {
    fn slot(&self, idx: usize) -> &Slot {
        &self.pages[idx / PAGE][idx % PAGE]
    }

    fn slot_mut(&mut self, idx: usize) -> &mut Slot {
        &mut self.pages[idx / PAGE][idx % PAGE]
    }

    /// The id of the call in slot `idx`.
    fn id_of(&self, idx: usize) -> u64 {
        (u64::from(self.slot(idx).gen) << 32) | idx as u64
    }

    /// A free slot (taken off the free list, or a new one).
    fn alloc_slot(&mut self) -> usize {
        if self.free_head != u32::MAX {
            let idx = self.free_head as usize;
            self.free_head = self.slot(idx).next_free;
            if self.free_head == u32::MAX {
                self.free_tail = u32::MAX;
            }
            return idx;
        }
        let idx = self.slots;
        assert!(idx < u32::MAX as usize, "more than 2^32 - 1 pending calls");
        if idx / PAGE == self.pages.len() {
            let page: Box<[Slot]> = (0..PAGE)
                .map(|_| Slot {
                    gen: 1,
                    next_free: u32::MAX,
                    links: Links::default(),
                    call: None,
                })
                .collect();
            self.pages.push(page);
        }
        self.slots += 1;
        idx
    }

    /// The route of `service` and `method` if some pending call (or a recent
    /// one) used it. A route is only created for validated names, so a hit
    /// means the names are valid.
    pub fn find_route(&self, service: &str, method: &str) -> Option<RouteId> {
        self.routes.find(service, method)
    }

    /// Stores a call accepted at `now`, arming its deadline, and returns its
    /// broker id. The caller must have checked that the caller's call id is
    /// not pending already ([`PendingCalls::find_by_caller`]).
    pub fn insert(&mut self, call: NewCall<'_>, now: Instant, deadline: Option<Instant>) -> u64 {
        let route = self.routes.acquire(call.service, call.method, call.route);
        let idx = self.alloc_slot();
        let id = self.id_of(idx);
        let timer = deadline.map(|d| self.timers.arm(id, d));
        let started_us = self.timers.micros(now);
        self.payload_bytes += call.payload.len();
        self.slot_mut(idx).call = Some(Pending {
            caller: call.caller,
            caller_call: call.caller_call,
            payload: call.payload,
            timer,
            target: 0,
            started_us,
            flags: call.flags & !REDELIVERED,
            route,
        });
        let hasher = &self.caller_hasher;
        let hash = caller_hash(hasher, call.caller, call.caller_call);
        let pages = &self.pages;
        self.by_caller.insert_unique(hash, idx as u32, |&i| {
            let i = i as usize;
            pages[i / PAGE][i % PAGE]
                .call
                .as_ref()
                .map_or(0, |p| caller_hash(hasher, p.caller, p.caller_call))
        });
        self.by_peer
            .push(&mut self.pages, List::Made, call.caller, idx as u32);
        self.len += 1;
        id
    }

    /// See [`Pending::hold_for`].
    pub fn hold_for(&mut self, id: u64, uid: u32) {
        if let Some(p) = self.get_mut(id) {
            p.hold_for(uid);
        }
    }

    /// Parks call `id` again after the instance that had it disconnected:
    /// pinned to the user of that instance, `uid` (`None`: not pinned, it
    /// was the NATS bridge; see [`Pending::pinned_to`]).
    pub fn repark(&mut self, id: u64, uid: Option<u32>) {
        self.set_stage(id, Stage::Parked);
        if let Some(p) = self.get_mut(id) {
            p.target = parked_after_delivery(uid);
        }
    }

    /// Moves call `id` (see [`Pending::stage`]), keeping the list of the
    /// calls delivered to each connection in step.
    pub fn set_stage(&mut self, id: u64, stage: Stage) {
        let (idx, _) = split_id(id);
        let Some(p) = self.get_mut(id) else {
            return;
        };
        let old = p.stage();
        p.set_stage(stage);
        if old == stage {
            return;
        }
        if let Stage::Delivered(t) = old {
            self.by_peer
                .unlink(&mut self.pages, List::Delivered, t, idx as u32);
        }
        if let Stage::Delivered(t) = stage {
            self.by_peer
                .push(&mut self.pages, List::Delivered, t, idx as u32);
        }
    }

    /// The calls `peer` made, oldest first.
    pub fn made_by(&self, peer: PeerId) -> Vec<u64> {
        self.ids_of(List::Made, peer)
    }

    /// The calls delivered to `peer`, oldest delivery first.
    pub fn delivered_to(&self, peer: PeerId) -> Vec<u64> {
        self.ids_of(List::Delivered, peer)
    }

    fn ids_of(&self, list: List, peer: PeerId) -> Vec<u64> {
        let ids: Vec<u64> = self
            .by_peer
            .slots(&self.pages, list, peer)
            .into_iter()
            .map(|i| self.id_of(i as usize))
            .collect();
        #[cfg(debug_assertions)]
        {
            // The lists are an index: they must find what a scan finds.
            let mut sorted = ids.clone();
            sorted.sort_unstable_by_key(|id| split_id(*id).0);
            let scan = self.ids_where(|c| match list {
                List::Made => c.caller == peer,
                List::Delivered => c.stage() == Stage::Delivered(peer),
            });
            debug_assert_eq!(sorted, scan, "peer {peer}: {list:?} list out of step");
        }
        ids
    }

    /// Drops what the table keeps for `peer`, which left (its calls must
    /// be gone from the table, or moved, first).
    pub fn forget_peer(&mut self, peer: PeerId) {
        self.by_peer.forget(peer);
    }

    /// The deadline of call `id`, if it has one.
    pub fn deadline(&self, id: u64) -> Option<Instant> {
        let key = self.get(id)?.timer.as_ref()?;
        Some(self.timers.deadline(key))
    }

    /// How long before `now` call `p` was accepted.
    pub fn elapsed_at(&self, p: &Pending, now: Instant) -> Duration {
        Duration::from_micros(self.timers.micros(now).saturating_sub(p.started_us))
    }

    /// The broker id of `caller`'s call `caller_call`, if pending.
    pub fn find_by_caller(&self, caller: PeerId, caller_call: u64) -> Option<u64> {
        let hash = caller_hash(&self.caller_hasher, caller, caller_call);
        let idx = *self.by_caller.find(hash, |&i| {
            self.slot(i as usize)
                .call
                .as_ref()
                .is_some_and(|p| p.caller == caller && p.caller_call == caller_call)
        })?;
        Some(self.id_of(idx as usize))
    }

    /// Looks up a call.
    pub fn get(&self, id: u64) -> Option<&Pending> {
        let (idx, gen) = split_id(id);
        let slot = self.pages.get(idx / PAGE)?.get(idx % PAGE)?;
        if slot.gen != gen {
            return None;
        }
        slot.call.as_ref()
    }

    /// Looks up a call mutably.
    pub fn get_mut(&mut self, id: u64) -> Option<&mut Pending> {
        let (idx, gen) = split_id(id);
        let slot = self.pages.get_mut(idx / PAGE)?.get_mut(idx % PAGE)?;
        if slot.gen != gen {
            return None;
        }
        slot.call.as_mut()
    }

    /// The service and method names of a call.
    pub fn names(&self, p: &Pending) -> (&str, &str) {
        let (s, m) = self.routes.names(p.route);
        (s, m)
    }

    /// The tag kept with route `route`, if set.
    pub fn route_tag(&self, route: RouteId) -> Option<u32> {
        self.routes.tag(route)
    }

    /// Keeps `tag` with route `route` (for as long as the route lives).
    pub fn set_route_tag(&mut self, route: RouteId, tag: u32) {
        self.routes.set_tag(route, tag);
    }

    /// The service and method names of a call, as shared strings that stay
    /// valid while the table changes.
    pub fn names_rc(&self, p: &Pending) -> (Rc<str>, Rc<str>) {
        let (s, m) = self.routes.names(p.route);
        (s.clone(), m.clone())
    }

    /// Removes a call and disarms its timer. This is the only way a call
    /// leaves the table.
    pub fn remove(&mut self, id: u64) -> Option<Removed> {
        let (idx, gen) = split_id(id);
        let slot = self.pages.get_mut(idx / PAGE)?.get_mut(idx % PAGE)?;
        if slot.gen != gen {
            return None;
        }
        let p = slot.call.take()?;
        slot.gen = slot.gen.checked_add(1).unwrap_or(1);
        slot.next_free = u32::MAX;
        if self.free_tail == u32::MAX {
            self.free_head = idx as u32;
        } else {
            let tail = self.free_tail as usize;
            self.slot_mut(tail).next_free = idx as u32;
        }
        self.free_tail = idx as u32;
        self.len -= 1;
        self.payload_bytes -= p.payload.len();
        let hash = caller_hash(&self.caller_hasher, p.caller, p.caller_call);
        if let Ok(e) = self.by_caller.find_entry(hash, |&i| i as usize == idx) {
            e.remove();
        }
        self.by_peer
            .unlink(&mut self.pages, List::Made, p.caller, idx as u32);
        if let Stage::Delivered(t) = p.stage() {
            self.by_peer
                .unlink(&mut self.pages, List::Delivered, t, idx as u32);
        }
        if let Some(key) = &p.timer {
            self.timers.disarm(key);
        }
        let (service, method) = self.names_rc(&p);
        let route_tag = self.route_tag(p.route);
        self.routes.release(p.route);
        Some(Removed {
            call: p,
            service,
            method,
            route_tag,
        })
    }

    /// Polls for the next call whose deadline passed. The returned id's
    /// timer is already consumed; the call itself is still in the table.
    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<u64> {
        let id = std::task::ready!(self.timers.poll_expired(cx));
        if let Some(p) = self.get_mut(id) {
            p.timer = None;
        }
        Poll::Ready(id)
    }

    /// Ids of calls matching a predicate, in slot order.
    pub fn ids_where(&self, f: impl Fn(&Pending) -> bool) -> Vec<u64> {
        let mut ids = Vec::new();
        for (pi, page) in self.pages.iter().enumerate() {
            for (si, slot) in page.iter().enumerate() {
                if slot.call.as_ref().is_some_and(&f) {
                    ids.push((u64::from(slot.gen) << 32) | (pi * PAGE + si) as u64);
                }
            }
        }
        ids
    }

    /// Number of pending calls.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Payload bytes kept by all pending calls.
    pub fn payload_bytes(&self) -> usize {
        self.payload_bytes
    }

    /// True if nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of armed timers (equals the number of pending calls with a
    /// deadline; exposed so tests can check nothing leaks).
    pub fn timers_len(&self) -> usize {
        self.timers.len()
    }

    /// Connections the table keeps list heads for (exposed so tests can
    /// check they do not leak).
    pub fn peers_len(&self) -> usize {
        self.by_peer.len()
    }

    /// Number of interned `(service, method)` pairs, used or idle (exposed
    /// so tests can check they stay bounded).
    pub fn routes_len(&self) -> usize {
        self.routes.len()
    }
}

#[cfg(test)]
mod tests;
