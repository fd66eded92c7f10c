//! Calls that wait on a service name: for an instance to register, or for
//! room in one (every instance has `--max-delivered-per-conn` calls in
//! hand). They wait in the name's [`crate::waiting::Waiting`], in turns by
//! caller uid, and are delivered as instances register or answer.

use std::time::Instant;

use zrpc_proto::Caller;

use super::Broker;
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
        self.names.park(service, bid, uid);
        if let Some(p) = self.pending.get_mut(bid) {
            p.set_stage(Stage::Parked);
        }
    }

    /// Whether `peer` takes calls without a window: the NATS bridge, which
    /// forwards them and bounds what it has in flight itself.
    pub(crate) fn unwindowed(&self, peer: PeerId) -> bool {
        #[cfg(feature = "nats")]
        return self.bridge_peer() == Some(peer);
        #[cfg(not(feature = "nats"))]
        {
            let _ = peer;
            false
        }
    }

    /// Delivers calls waiting on the names `svc` holds while an instance
    /// has room for them (an answer of `svc` just freed a slot).
    pub(crate) fn pull_waiting(&mut self, svc: PeerId, now: Instant) {
        let Some(names) = self.peers.get(svc).map(|p| p.names().to_vec()) else {
            return;
        };
        for name in names {
            if self.names.waiting() == 0 {
                break;
            }
            self.pull_name(&name, now);
        }
    }

    /// Delivers calls waiting on `name`, in turns by caller uid, while an
    /// instance of it has room (after an answer, or a registration).
    pub(crate) fn pull_name(&mut self, name: &str, now: Instant) {
        let window = self.config.max_delivered_per_conn;
        loop {
            let peers = &self.peers;
            let room = self
                .names
                .pick(name, |id| {
                    peers.get(id).map_or(u32::MAX, |p| p.outstanding())
                })
                .is_some_and(|t| {
                    self.unwindowed(t) || peers.get(t).is_some_and(|p| p.outstanding() < window)
                });
            if !room {
                return;
            }
            let Some(bid) = self.names.pop_waiting(name) else {
                return;
            };
            let Some(route) = self.pending.get(bid).map(|p| p.route) else {
                continue;
            };
            // Parked before the name was registered: its statistics row.
            if let Some(tag) = self.stats.tag_of(name) {
                if self.pending.route_tag(route) != Some(tag) {
                    self.pending.set_route_tag(route, tag);
                }
            }
            self.dispatch(bid, now);
        }
    }
}
