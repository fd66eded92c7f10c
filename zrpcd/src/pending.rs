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

/// One call in flight through the broker.
#[derive(Debug)]
pub struct Pending {
    /// The calling connection.
    pub caller: PeerId,
    /// The caller's instance id (from its `Hello`).
    pub caller_instance: u64,
    /// The caller's own id for the call.
    pub caller_call: u64,
    /// The original `Call` frame: envelope (re-decoded when needed, so no
    /// strings are copied per call) and payload (forwarded as is).
    pub frame: Frame,
    /// Call flags.
    pub flags: u32,
    /// Absolute deadline.
    pub deadline: Option<Instant>,
    /// The timer entry, if any.
    pub timer: Option<delay_queue::Key>,
    /// Where the call is.
    pub stage: Stage,
    /// When the broker accepted it.
    pub started: Instant,
}

/// All pending calls, keyed by broker call id, and their timers.
#[derive(Debug, Default)]
pub struct PendingCalls {
    map: FxHashMap<u64, Pending>,
    by_caller: FxHashMap<(PeerId, u64), u64>,
    timers: DelayQueue<u64>,
    next_id: u64,
}

impl PendingCalls {
    /// Stores a call, arming its deadline, and returns its broker id.
    pub fn insert(&mut self, mut p: Pending) -> u64 {
        self.next_id += 1;
        let id = self.next_id;
        if let Some(d) = p.deadline {
            p.timer = Some(self.timers.insert_at(id, d.into()));
        }
        self.by_caller.insert((p.caller, p.caller_call), id);
        self.map.insert(id, p);
        id
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
