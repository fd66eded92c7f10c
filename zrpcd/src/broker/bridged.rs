//! The broker's one concession to the NATS bridge (feature `nats`,
//! docs/bridge.md): local services take precedence over imported names. A
//! name that only the bridge holds (an `[import]` name) is given up to a
//! local service that registers it and may own it; the bridge takes it
//! again when it is free.

use std::cell::{Cell, RefCell};

use rustc_hash::FxHashMap;
use std::rc::Rc;

use super::Broker;
use crate::peers::PeerId;

/// Calls through the bridge, counted by the bridge and shown by
/// `zrpcd.stats` (under `bridge`).
#[derive(Debug, Default)]
pub struct BridgeCounters {
    /// Local calls sent to NATS (to imported names).
    pub imported: Cell<u64>,
    /// Of those, answered with an error (any code).
    pub imported_errors: Cell<u64>,
    /// Calls from NATS run here (on exported names).
    pub exported: Cell<u64>,
    /// Of those, answered with an error (any code).
    pub exported_errors: Cell<u64>,
    /// Cancel messages published (local callers that gave up).
    pub cancels_sent: Cell<u64>,
    /// Cancel messages that cancelled a call here.
    pub cancels_received: Cell<u64>,
    /// New NATS clients made because the previous one died (its
    /// connection task ended: async-nats panicked).
    pub clients_replaced: Cell<u64>,
    /// The flags of calls delivered to the bridge, by broker id (a
    /// `Request` does not carry them), taken by the bridge when the
    /// `Request` arrives.
    pub flags: RefCell<FxHashMap<u64, u32>>,
}

impl BridgeCounters {
    /// Adds one to `counter`.
    pub fn bump(counter: &Cell<u64>) {
        counter.set(counter.get() + 1);
    }
}

impl Broker {
    /// Marks `peer` as the bridge's connection; the counters the bridge
    /// keeps for `zrpcd.stats`.
    pub fn set_bridge_peer(&mut self, peer: PeerId) -> Rc<BridgeCounters> {
        let counters = Rc::new(BridgeCounters::default());
        self.bridge = Some((peer, counters.clone()));
        counters
    }

    /// The bridge's connection, if any.
    pub fn bridge_peer(&self) -> Option<PeerId> {
        self.bridge.as_ref().map(|b| b.0)
    }

    /// After delivering call `bid` to `target`: if that is the bridge,
    /// tells it the call's flags (`NO_WAIT` decides whether it waits for a
    /// remote exporter).
    pub(crate) fn note_bridged_flags(&self, target: PeerId, bid: u64, flags: u32) {
        if let Some((bridge, shared)) = &self.bridge {
            if *bridge == target && flags != 0 {
                shared.flags.borrow_mut().insert(bid, flags);
            }
        }
    }

    /// The bridge, for a call to `service` that nobody holds, if it
    /// matches an `[import]` prefix pattern.
    pub(crate) fn bridge_by_pattern(&self, service: &str) -> Option<PeerId> {
        let config = self.config.bridge.as_ref()?;
        let bridge = self.bridge_peer()?;
        config.imports_by_pattern(service).then_some(bridge)
    }

    /// How `zrpc monitor` marks a call of `caller` at `stage`: from NATS
    /// (the bridge called), to NATS (delivered to the bridge), or neither.
    pub(crate) fn bridged_mark(
        &self,
        caller: PeerId,
        stage: crate::pending::Stage,
    ) -> Option<&'static str> {
        let bridge = self.bridge_peer()?;
        if caller == bridge {
            Some("from NATS")
        } else if matches!(stage, crate::pending::Stage::Delivered(s) if s == bridge) {
            Some("to NATS")
        } else {
            None
        }
    }

    /// Before `peer` registers `name`: if only the bridge holds it and
    /// `peer` (not the bridge) may own it by the policy, the bridge's hold
    /// is released. Calls already delivered to the bridge finish there.
    pub(crate) fn yield_imported(&mut self, peer: PeerId, name: &str, shared: bool) {
        let Some(bridge) = self.bridge_peer() else {
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
            self.peers.remove_name(bridge, name);
            self.stats.unregistered(name);
            tracing::info!(
                peer,
                name,
                "a local service takes the name over from the NATS bridge (local first)"
            );
        }
    }
}
