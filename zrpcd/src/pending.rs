//! The pending-calls table: every call the broker has accepted and not yet
//! answered, with its single deadline timer.

use std::task::{Context, Poll};
use std::time::Instant;

use rustc_hash::FxHashMap;
use tokio_util::time::{delay_queue, DelayQueue};
use zrpc_proto::Frame;

use crate::peers::PeerId;

/// Where a pending call is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Waiting for its service name to get an instance.
    Parked,
    /// Delivered to this service connection.
    Delivered(PeerId),
}

/// One call in flight through the broker. Kept small (120 bytes): there
/// can be a million of them. The deadline lives in the timer wheel only.
#[derive(Debug)]
pub struct Pending {
    /// The calling connection.
    pub caller: PeerId,
    /// The caller's own id for the call.
    pub caller_call: u64,
    /// The original `Call` frame: envelope (re-decoded when needed, so no
    /// strings are copied per call) and payload (forwarded as is).
    pub frame: Frame,
    /// The timer entry, if the call has a deadline.
    pub timer: Option<delay_queue::Key>,
    /// The service connection it was delivered to; 0 while parked.
    target: PeerId,
    /// When the broker accepted it, in microseconds since the table was
    /// created.
    started_us: u64,
    /// Call flags.
    pub flags: u32,
}

impl Pending {
    /// A new call, parked until routed.
    pub fn new(caller: PeerId, caller_call: u64, frame: Frame, flags: u32) -> Self {
        Pending {
            caller,
            caller_call,
            frame,
            timer: None,
            target: 0,
            started_us: 0,
            flags,
        }
    }

    /// Where the call is.
    pub fn stage(&self) -> Stage {
        match self.target {
            0 => Stage::Parked,
            t => Stage::Delivered(t),
        }
    }

    /// Moves the call (peer ids start at 1, so 0 can mean parked).
    pub fn set_stage(&mut self, stage: Stage) {
        self.target = match stage {
            Stage::Parked => 0,
            Stage::Delivered(t) => t,
        };
    }
}

/// All pending calls, keyed by broker call id, and their timers.
#[derive(Debug)]
pub struct PendingCalls {
    base: Instant,
    map: FxHashMap<u64, Pending>,
    by_caller: FxHashMap<(PeerId, u64), u64>,
    timers: DelayQueue<u64>,
    next_id: u64,
}

impl Default for PendingCalls {
    fn default() -> Self {
        PendingCalls {
            base: Instant::now(),
            map: FxHashMap::default(),
            by_caller: FxHashMap::default(),
            timers: DelayQueue::new(),
            next_id: 0,
        }
    }
}

impl PendingCalls {
    /// Stores a call accepted at `now`, arming its deadline, and returns its
    /// broker id.
    pub fn insert(&mut self, mut p: Pending, now: Instant, deadline: Option<Instant>) -> u64 {
        self.next_id += 1;
        let id = self.next_id;
        if let Some(d) = deadline {
            p.timer = Some(self.timers.insert_at(id, d.into()));
        }
        p.started_us = now.saturating_duration_since(self.base).as_micros() as u64;
        self.by_caller.insert((p.caller, p.caller_call), id);
        self.map.insert(id, p);
        id
    }

    /// The deadline of call `id`, if it has one.
    pub fn deadline(&self, id: u64) -> Option<Instant> {
        let key = self.map.get(&id)?.timer.as_ref()?;
        Some(self.timers.deadline(key).into_std())
    }

    /// How long ago call `p` was accepted.
    pub fn elapsed(&self, p: &Pending) -> std::time::Duration {
        let started = std::time::Duration::from_micros(p.started_us);
        self.base.elapsed().saturating_sub(started)
    }

    /// The broker id of `caller`'s call `caller_call`, if pending.
    pub fn find_by_caller(&self, caller: PeerId, caller_call: u64) -> Option<u64> {
        self.by_caller.get(&(caller, caller_call)).copied()
    }

    /// Looks up a call.
    pub fn get(&self, id: u64) -> Option<&Pending> {
        self.map.get(&id)
    }

    /// Looks up a call mutably.
    pub fn get_mut(&mut self, id: u64) -> Option<&mut Pending> {
        self.map.get_mut(&id)
    }

    /// Removes a call and disarms its timer. This is the only way a call
    /// leaves the table.
    pub fn remove(&mut self, id: u64) -> Option<Pending> {
        let p = self.map.remove(&id)?;
        self.by_caller.remove(&(p.caller, p.caller_call));
        if let Some(key) = &p.timer {
            self.timers.remove(key);
        }
        Some(p)
    }

    /// Polls for the next call whose deadline passed. The returned id's
    /// timer is already consumed; the call itself is still in the table.
    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<u64> {
        match self.timers.poll_expired(cx) {
            Poll::Ready(Some(exp)) => {
                let id = exp.into_inner();
                if let Some(p) = self.map.get_mut(&id) {
                    p.timer = None;
                }
                Poll::Ready(id)
            }
            // Empty queue: the waker is kept and woken by the next insert.
            Poll::Ready(None) | Poll::Pending => Poll::Pending,
        }
    }

    /// Ids of calls matching a predicate.
    pub fn ids_where(&self, f: impl Fn(&Pending) -> bool) -> Vec<u64> {
        self.map
            .iter()
            .filter(|(_, p)| f(p))
            .map(|(id, _)| *id)
            .collect()
    }

    /// Number of pending calls.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True if nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Number of armed timers (equals the number of pending calls with a
    /// deadline; exposed so tests can check nothing leaks).
    pub fn timers_len(&self) -> usize {
        self.timers.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_entries_stay_small() {
        // The broker's memory per pending call (target: 256 bytes including
        // the table's overhead) depends on this.
        assert!(
            std::mem::size_of::<Pending>() <= 120,
            "{}",
            std::mem::size_of::<Pending>()
        );
    }

    #[test]
    fn stage_round_trips() {
        let mut buf = bytes::BytesMut::new();
        zrpc_proto::encode_frame(&mut buf, &zrpc_proto::Envelope::Cancel { id: 1 }, b"");
        let frame = zrpc_proto::FrameDecoder::new(1024)
            .decode(&mut buf)
            .expect("valid")
            .expect("complete");
        let mut p = Pending::new(3, 4, frame, 0);
        assert_eq!(p.stage(), Stage::Parked);
        p.set_stage(Stage::Delivered(9));
        assert_eq!(p.stage(), Stage::Delivered(9));
        p.set_stage(Stage::Parked);
        assert_eq!(p.stage(), Stage::Parked);
    }
}
