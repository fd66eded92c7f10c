//! The broker's one concession to the NATS bridge (feature `nats`,
//! docs/bridge.md): local services take precedence over imported names. A
//! name that only the bridge holds (an `[import]` name) is given up to a
//! local service that registers it and may own it; the bridge takes it
//! again when it is free.

use super::Broker;
use crate::peers::PeerId;

impl Broker {
    /// Marks `peer` as the bridge's connection.
    pub fn set_bridge_peer(&mut self, peer: PeerId) {
        self.bridge_peer = Some(peer);
    }

    /// The bridge's connection, if any.
    pub fn bridge_peer(&self) -> Option<PeerId> {
        self.bridge_peer
    }

    /// Before `peer` registers `name`: if only the bridge holds it and
    /// `peer` (not the bridge) may own it by the policy, the bridge's hold
    /// is released. Calls already delivered to the bridge finish there.
    pub(crate) fn yield_imported(&mut self, peer: PeerId, name: &str, shared: bool) {
        let Some(bridge) = self.bridge_peer else {
            return;
        };
        if peer == bridge || self.names.holders(name) != [bridge] {
            return;
        }
        let allowed = self.peers.get(peer).is_some_and(|p| {
            self.config
                .policy
                .may_own(&p.identity(), name, shared)
                .is_ok()
        });
        if allowed && self.names.unregister(name, bridge) {
            if let Some(b) = self.peers.get_mut(bridge) {
                b.remove_name(name);
            }
            self.stats.unregistered(name);
            tracing::info!(
                peer,
                name,
                "a local service takes the name over from the NATS bridge (local first)"
            );
        }
    }
}
