//! Unit tests of the pending-calls table.

use super::routes::IDLE_ROUTES;
use super::*;
use crate::payload::Payload;

/// A runtime to enter, for the timer wheel (DelayQueue) of the table.
fn timer_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime")
}

fn call<'a>(caller: PeerId, caller_call: u64, service: &'a str) -> NewCall<'a> {
    NewCall {
        caller,
        caller_call,
        service,
        method: "m",
        route: None,
        payload: KeptPayload::new(Payload::EMPTY),
        flags: 0,
    }
}

#[test]
fn pending_entries_stay_small() {
    // The broker's memory per pending call (target: 256 bytes including
    // the table's overhead) depends on this.
    assert!(
        std::mem::size_of::<Slot>() <= 152,
        "{}",
        std::mem::size_of::<Slot>()
    );
}

#[test]
fn stage_round_trips() {
    let rt = timer_runtime();
    let _g = rt.enter();
    let mut t = PendingCalls::default();
    let id = t.insert(call(3, 4, "s"), Instant::now(), None);
    let p = t.get_mut(id).expect("pending");
    assert_eq!(p.stage(), Stage::Parked);
    p.set_stage(Stage::Parked);
    assert!(!p.was_delivered());
    p.set_stage(Stage::Delivered(9));
    assert_eq!(p.stage(), Stage::Delivered(9));
    assert!(p.was_delivered());
    assert_eq!(p.pinned_to(), None, "delivered: no pin");
    p.set_stage(Stage::Parked);
    assert_eq!(p.stage(), Stage::Parked);
    assert!(p.was_delivered(), "parked again after a delivery");
    assert_eq!(p.pinned_to(), Some(NOBODY), "no user named: nobody's");
    p.set_stage(Stage::Delivered(3));
    assert_eq!(p.stage(), Stage::Delivered(3));
    p.set_stage(Stage::Parked);
    assert_eq!(p.stage(), Stage::Parked);
    assert!(p.was_delivered());
    // Parked again by the table for a user: pinned to it, and it stays so
    // while parked (the table's moves only, to keep its lists in step).
    let id = t.insert(call(3, 7, "s"), Instant::now(), None);
    t.set_stage(id, Stage::Delivered(3));
    t.repark(id, Some(1000));
    let p = t.get_mut(id).expect("pending");
    assert_eq!((p.stage(), p.pinned_to()), (Stage::Parked, Some(1000)));
    t.set_stage(id, Stage::Parked);
    assert_eq!(t.get(id).and_then(Pending::pinned_to), Some(1000));
    t.set_stage(id, Stage::Delivered(4));
    let p = t.get(id).expect("pending");
    assert_eq!((p.stage(), p.pinned_to()), (Stage::Delivered(4), None));
    // The largest uid and the largest peer id keep apart.
    t.repark(id, Some(u32::MAX - 1));
    let p = t.get(id).expect("pending");
    assert_eq!(
        (p.stage(), p.pinned_to()),
        (Stage::Parked, Some(u32::MAX - 1))
    );
    // Parked again after the NATS bridge had it: delivered before, not
    // pinned.
    t.set_stage(id, Stage::Delivered(5));
    t.repark(id, None);
    let p = t.get(id).expect("pending");
    assert_eq!((p.stage(), p.pinned_to()), (Stage::Parked, None));
    assert!(p.was_delivered());
    assert!(t.delivered_to(5).is_empty() && t.delivered_to(4).is_empty());
    // A resubmission adopting an orphan: parked, delivered before.
    let id = t.insert(call(3, 5, "s"), Instant::now(), None);
    let p = t.get_mut(id).expect("pending");
    assert_eq!(p.pinned_to(), None, "never delivered: no pin");
    p.delivered_before(Some(0));
    assert_eq!(p.stage(), Stage::Parked);
    assert!(p.was_delivered());
    assert_eq!(p.pinned_to(), Some(0));
    p.set_stage(Stage::Parked);
    assert!(p.was_delivered(), "still, once parked");
    p.set_stage(Stage::Delivered(9));
    p.delivered_before(Some(7));
    assert_eq!(p.stage(), Stage::Delivered(9), "a delivered call stays so");
    let id = t.insert(call(3, 6, "s"), Instant::now(), None);
    let p = t.get_mut(id).expect("pending");
    p.delivered_before(None);
    assert_eq!((p.stage(), p.pinned_to()), (Stage::Parked, None));
    assert!(p.was_delivered());
    // Held back for the holder's user, never delivered: pinned, parked,
    // not delivered; parking again keeps it; delivered, it is a delivery.
    let id = t.insert(call(3, 7, "s"), Instant::now(), None);
    let p = t.get_mut(id).expect("pending");
    p.hold_for(1000);
    assert_eq!((p.stage(), p.pinned_to()), (Stage::Parked, Some(1000)));
    assert!(!p.was_delivered());
    p.set_stage(Stage::Parked);
    assert_eq!(p.pinned_to(), Some(1000));
    p.hold_for(1001);
    assert_eq!(p.pinned_to(), Some(1000), "held for the first holder");
    p.set_stage(Stage::Delivered(9));
    assert_eq!((p.stage(), p.pinned_to()), (Stage::Delivered(9), None));
    assert!(p.was_delivered());
    p.hold_for(1002);
    assert_eq!(
        p.stage(),
        Stage::Delivered(9),
        "a delivered call is not held"
    );
    // Parked again after the NATS bridge had it (not pinned): held, and
    // still one that may have run.
    let id = t.insert(call(3, 8, "s"), Instant::now(), None);
    let p = t.get_mut(id).expect("pending");
    p.delivered_before(None);
    p.hold_for(1000);
    assert_eq!((p.stage(), p.pinned_to()), (Stage::Parked, Some(1000)));
    assert!(p.was_delivered());
}

#[test]
fn ids_are_not_reused() {
    let rt = timer_runtime();
    let _g = rt.enter();
    let mut t = PendingCalls::default();
    let now = Instant::now();
    let a = t.insert(call(1, 1, "s"), now, Some(now + Duration::from_secs(9)));
    assert_eq!(t.find_by_caller(1, 1), Some(a));
    let r = t.remove(a).expect("pending");
    assert_eq!((&*r.service, &*r.method), ("s", "m"));
    assert!(t.remove(a).is_none());
    assert_eq!(t.timers_len(), 0);
    assert!(t.made_by(1).is_empty());
    // The slot is reused, the id is not.
    let b = t.insert(call(1, 1, "s"), now, None);
    assert_ne!(a, b);
    assert!(t.get(a).is_none());
    assert!(t.get(b).is_some());
    assert_eq!(t.find_by_caller(1, 1), Some(b));
    assert_eq!(t.find_by_caller(1, 2), None);
    assert_eq!(t.len(), 1);
    // Many calls, over several pages, all found again.
    let ids: Vec<u64> = (0..3000)
        .map(|i| t.insert(call(2, i, "s"), now, None))
        .collect();
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(t.find_by_caller(2, i as u64), Some(*id));
    }
    assert_eq!(t.ids_where(|p| p.caller == 2).len(), 3000);
    assert_eq!(t.made_by(2), ids, "the caller's list, oldest first");
    for id in &ids {
        t.remove(*id).expect("pending");
    }
    assert_eq!(t.len(), 1);
    assert_eq!(t.ids_where(|_| true), vec![b]);
}

#[test]
fn each_connections_calls_are_listed() {
    let rt = timer_runtime();
    let _g = rt.enter();
    let mut t = PendingCalls::default();
    let now = Instant::now();
    // Callers 1 and 2, services 8 and 9, calls interleaved.
    let ids: Vec<u64> = (0..40)
        .map(|i| t.insert(call(1 + i % 2, i, "s"), now, None))
        .collect();
    for (i, id) in ids.iter().enumerate() {
        if i % 3 != 0 {
            t.set_stage(*id, Stage::Delivered(8 + (i as PeerId % 3) % 2));
        }
    }
    let of = |caller: PeerId| -> Vec<u64> {
        ids.iter()
            .enumerate()
            .filter(|(i, _)| 1 + *i as PeerId % 2 == caller)
            .map(|(_, id)| *id)
            .collect()
    };
    assert_eq!(t.made_by(1), of(1));
    assert_eq!(t.made_by(2), of(2));
    assert_eq!(t.made_by(3), Vec::<u64>::new());
    let at = |t: &PendingCalls, svc: PeerId| -> Vec<u64> {
        t.ids_where(|c| c.stage() == Stage::Delivered(svc))
    };
    let mut d8 = t.delivered_to(8);
    d8.sort_unstable();
    let mut s8 = at(&t, 8);
    s8.sort_unstable();
    assert_eq!(d8, s8);
    assert!(!d8.is_empty());
    // Moving calls: parked again, delivered elsewhere, removed from
    // the middle, the head and the tail of the lists.
    for (i, id) in ids.iter().enumerate() {
        match i % 5 {
            0 => t.set_stage(*id, Stage::Parked),
            1 => t.set_stage(*id, Stage::Delivered(9)),
            2 => {
                t.remove(*id).expect("pending");
            }
            _ => {}
        }
    }
    for svc in [8, 9] {
        let mut d = t.delivered_to(svc);
        d.sort_unstable();
        let mut s = at(&t, svc);
        s.sort_unstable();
        assert_eq!(d, s, "service {svc}");
    }
    assert_eq!(t.made_by(1).len() + t.made_by(2).len(), t.len());
    // Everything ends: nothing is left listed, and departed
    // connections leave no entry behind.
    for id in t.ids_where(|_| true) {
        t.remove(id).expect("pending");
    }
    for peer in [1, 2, 8, 9] {
        assert!(t.made_by(peer).is_empty() && t.delivered_to(peer).is_empty());
        t.forget_peer(peer);
    }
    assert_eq!(t.peers_len(), 0);
}

#[test]
fn freed_slots_are_reused_first_in_first_out() {
    let rt = timer_runtime();
    let _g = rt.enter();
    let mut t = PendingCalls::default();
    let now = Instant::now();
    let ids: Vec<u64> = (0..3)
        .map(|i| t.insert(call(1, i, "s"), now, None))
        .collect();
    t.remove(ids[0]).expect("pending");
    t.remove(ids[1]).expect("pending");
    let a = t.insert(call(1, 10, "s"), now, None);
    let b = t.insert(call(1, 11, "s"), now, None);
    assert_eq!(
        split_id(a).0,
        split_id(ids[0]).0,
        "the first freed slot first"
    );
    assert_eq!(split_id(b).0, split_id(ids[1]).0);
    assert_ne!(a, ids[0]);
    // One call at a time: the slots take turns.
    t.remove(a).expect("pending");
    t.remove(b).expect("pending");
    let mut seen = std::collections::HashSet::new();
    for i in 0..4 {
        let id = t.insert(call(1, 20 + i, "s"), now, None);
        seen.insert(split_id(id).0);
        t.remove(id).expect("pending");
    }
    assert_eq!(seen.len(), 2, "both free slots are used in turn");
}

#[test]
fn routes_are_shared_and_bounded() {
    let rt = timer_runtime();
    let _g = rt.enter();
    let mut t = PendingCalls::default();
    let now = Instant::now();
    let a = t.insert(call(1, 1, "s"), now, None);
    let b = t.insert(call(1, 2, "s"), now, None);
    assert_eq!(t.routes_len(), 1);
    let route = t.find_route("s", "m").expect("interned");
    assert_eq!(t.get(a).map(|p| p.route), Some(route));
    assert_eq!(t.find_route("s", "x"), None);
    t.remove(a);
    t.remove(b);
    // Kept idle for the next call.
    assert_eq!(t.find_route("s", "m"), Some(route));
    // Calls to ever new names: the idle routes stay bounded.
    for i in 0..(IDLE_ROUTES as u64 + 500) {
        let name = format!("n{i}");
        let id = t.insert(call(1, i, &name), now, None);
        t.remove(id);
    }
    assert!(t.routes_len() <= IDLE_ROUTES, "{}", t.routes_len());
    // Used routes are never freed.
    let c = t.insert(call(1, 1, "s"), now, None);
    for i in 0..(IDLE_ROUTES as u64 + 10) {
        let name = format!("o{i}");
        let id = t.insert(call(1, 100_000 + i, &name), now, None);
        t.remove(id);
    }
    assert_eq!(t.names(t.get(c).expect("pending")), ("s", "m"));
}

/// Call ids crafted to collide under FxHash (the table's hash before):
/// FxHash of `(peer, call)` is `rotl((peer * K + call) * K, 26)`, so ids
/// whose product differs only in its low 31 bits share the bucket bits and
/// the 7-bit tag of every table smaller than 2^26 slots, and every lookup
/// among them compared them all. The table's hash is seeded at random
/// (`crate::hashing`): the same ids spread over the buckets.
#[test]
fn call_ids_crafted_to_collide_do_not_collide() {
    use std::hash::BuildHasher;
    const K: u64 = 0xf135_7aea_2e62_a9c5;
    // K's inverse modulo 2^64 (Newton's iteration: K is odd).
    let mut kinv = K;
    for _ in 0..6 {
        kinv = kinv.wrapping_mul(2u64.wrapping_sub(K.wrapping_mul(kinv)));
    }
    assert_eq!(K.wrapping_mul(kinv), 1);
    let peer: PeerId = 7;
    let ids: Vec<u64> = (0..4096u64)
        .map(|j| {
            (0x1234_5678_0000_0000u64 + j)
                .wrapping_mul(kinv)
                .wrapping_sub(peer.wrapping_mul(K))
        })
        .collect();
    // Bucket bits of a 4,096-slot table, and hashbrown's tag.
    let slot_and_tag = |h: u64| (h & 0xfff, h >> 57);
    let fx: std::collections::HashSet<_> = ids
        .iter()
        .map(|&c| slot_and_tag(rustc_hash::FxBuildHasher.hash_one((peer, c))))
        .collect();
    assert_eq!(fx.len(), 1, "the crafted ids collide under FxHash");
    let rt = timer_runtime();
    let _g = rt.enter();
    let mut t = PendingCalls::default();
    let spread: std::collections::HashSet<_> = ids
        .iter()
        .map(|&c| caller_hash(&t.caller_hasher, peer, c) & 0xfff)
        .collect();
    // 4,096 random values fill about 63% of 4,096 buckets.
    assert!(spread.len() > 2_000, "{} buckets of 4,096", spread.len());
    let now = Instant::now();
    let made: Vec<u64> = ids
        .iter()
        .map(|&c| t.insert(call(peer, c, "s"), now, None))
        .collect();
    for (c, id) in ids.iter().zip(&made) {
        assert_eq!(t.find_by_caller(peer, *c), Some(*id));
    }
}
