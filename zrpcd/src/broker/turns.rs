//! Calls that wait on a service name: for an instance to register, or for
//! room in one (every instance has `--max-delivered-per-conn` calls in
//! hand). They wait in the name's [`crate::waiting::Waiting`], in turns by
//! caller uid, and are delivered as instances register or answer.

use std::time::Instant;

use zrpc_proto::{flags, Caller, ErrorCode};

use super::{Broker, Outcome};
use crate::peers::PeerId;
use crate::pending::Stage;

impl Broker {
    /// Parks a call on `service` until an instance with room for it takes
    /// it (see [`crate::waiting`]: in turns by the caller's uid).
    pub(crate) fn park(
        &mut self,
        service: &str,
        bid: u64,
        caller: PeerId,
        caller_ident: Option<(u64, Caller)>,
    ) {
        let uid = caller_ident
            .map(|(_, c)| c.uid)
            .or_else(|| self.peers.get(caller).map(|p| p.creds().uid))
            .unwrap_or(0);
        let no_wait = self
            .pending
            .get(bid)
            .is_some_and(|p| p.call_flags() & flags::NO_WAIT != 0);
        self.names.park(service, bid, uid, no_wait);
        self.pending.set_stage(bid, Stage::Parked);
    }

    /// Whether `peer` takes calls without a window: the NATS bridge, which
    /// forwards them and bounds what it has in flight itself.
    pub(crate) fn unwindowed(&self, peer: PeerId) -> bool {
        self.is_bridge(peer)
    }

    /// Whether `peer` is the broker's own NATS bridge.
    pub(crate) fn is_bridge(&self, peer: PeerId) -> bool {
        #[cfg(feature = "nats")]
        return self.bridge_peer() == Some(peer);
        #[cfg(not(feature = "nats"))]
        {
            let _ = peer;
            false
        }
    }

    /// Delivers calls waiting on the names `svc` holds (an answer of `svc`
    /// just freed a slot): one call per name in turn, starting from a name
    /// that moves on at each pull, so that one name's flood does not take
    /// every slot of a connection serving several; until `svc` has no room
    /// left, or a round of its names delivered nothing.
    ///
    /// It stops as soon as `svc` is full: an answer frees one slot, and
    /// this runs on every answer while calls wait anywhere, so it must not
    /// cost a look at every name `svc` holds (up to
    /// `--max-names-per-conn`) and an instance pick for each, twice, as it
    /// did (a user's service with 256 names and calls waiting on them made
    /// each of its answers cost thousands of lookups).
    pub(crate) fn pull_waiting(&mut self, svc: PeerId, now: Instant) {
        let window = self.config.max_delivered_per_conn;
        if self.names.waiting() == 0 {
            return;
        }
        let Some(p) = self.peers.get(svc) else {
            return;
        };
        // `svc`'s names with calls waiting, found from the shorter side
        // (its names, or the names with calls waiting).
        let mut names: Vec<Box<str>> = if p.names().len() <= self.names.waiting_names_len() {
            p.names()
                .iter()
                .filter(|n| self.names.has_waiting(n))
                .cloned()
                .collect()
        } else {
            self.names
                .waiting_names()
                .filter(|n| self.names.is_instance(n, svc))
                .map(Box::from)
                .collect()
        };
        if names.is_empty() {
            return;
        }
        names.sort_unstable();
        self.pull_turn = self.pull_turn.wrapping_add(1);
        let first = self.pull_turn % names.len();
        // Names in a row that delivered nothing.
        let mut idle = 0;
        let mut i = first;
        while idle < names.len() {
            let (peers, orphans) = (&self.peers, &self.orphans);
            if !self.unwindowed(svc) && in_hand(peers, orphans, svc) >= window {
                return;
            }
            if self.pull_one(&names[i % names.len()], now) {
                idle = 0;
            } else {
                idle += 1;
            }
            i += 1;
        }
    }

    /// Delivers calls waiting on `name`, in turns by caller uid, while an
    /// instance of it has room (after a registration).
    pub(crate) fn pull_name(&mut self, name: &str, now: Instant) {
        while self.pull_one(name, now) {}
    }

    /// Delivers the next call waiting on `name` (in turns by caller uid)
    /// if an instance of it has room; returns whether it did.
    fn pull_one(&mut self, name: &str, now: Instant) -> bool {
        let window = self.config.max_delivered_per_conn;
        let (peers, orphans) = (&self.peers, &self.orphans);
        let room = self
            .names
            .pick(name, |id| in_hand(peers, orphans, id), window)
            .is_some_and(|t| {
                // (u32::MAX for a connection that is gone: no room.)
                self.unwindowed(t) || in_hand(peers, orphans, t) < window
            });
        if !room {
            return false;
        }
        let Some(bid) = self.names.pop_waiting(name) else {
            return false;
        };
        if let Some(route) = self.pending.get(bid).map(|p| p.route) {
            // Parked before the name was registered: its statistics row.
            if let Some(tag) = self.stats.tag_of(name) {
                if self.pending.route_tag(route) != Some(tag) {
                    self.pending.set_route_tag(route, tag);
                }
            }
            self.dispatch(bid, now);
        }
        true
    }

    /// `name` lost its last instance: its waiting calls with `NO_WAIT`
    /// (held back by a full window while it had instances) fail now, as
    /// they would have on arrival: `NoSuchService`, or `ServiceGone` for a
    /// call delivered before (it may have run).
    pub(crate) fn no_instance_left(&mut self, name: &str, now: Instant) {
        if !self.names.has_waiting(name) {
            return;
        }
        for bid in self.names.take_no_wait(name) {
            let Some(p) = self.pending.get(bid) else {
                continue;
            };
            if p.call_flags() & flags::NO_WAIT == 0 {
                continue;
            }
            let (code, msg) = if p.was_delivered() {
                let msg = format!(
                    "the service instance that had the call disconnected or gave up the name, and no other instance holds the name {name:?} (the call may have run)"
                );
                (ErrorCode::ServiceGone, msg)
            } else {
                let msg = format!("no service is registered under the name {name:?}");
                (ErrorCode::NoSuchService, msg)
            };
            self.finish(bid, Outcome::Error(code, msg), now);
        }
    }
}

/// The calls service connection `peer` has in hand: delivered and not
/// answered, its own callers' and those whose caller left
/// ([`crate::orphans::Orphans::running_on`]); `u32::MAX` for a connection
/// that is gone. Its window (`--max-delivered-per-conn`) bounds them, and
/// instances are picked by the fewest. From the two tables it reads, for
/// closures that borrow them apart.
pub(crate) fn in_hand(
    peers: &crate::peers::Peers,
    orphans: &crate::orphans::Orphans,
    peer: PeerId,
) -> u32 {
    peers.get(peer).map_or(u32::MAX, |p| {
        p.outstanding().saturating_add(orphans.running_on(peer))
    })
}
