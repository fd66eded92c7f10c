//! At most once across resubmissions. A caller whose broker restarted
//! resubmits its call (same instance, same call id, docs/reliability.md);
//! its host's new bridge sends it again with the same `Zrpc-Origin` and
//! `Zrpc-Caller`. The exporting bridge remembers which local call id it
//! used for each (name, origin, caller) key: a resubmission of a call still
//! running here waits for that call's answer; one of a finished call is
//! sent again with the same local call id, so that the service's reply
//! cache (keyed by the bridge's instance, that call id and the bridge's
//! uid) answers it instead of running it again.

use std::collections::VecDeque;

use rustc_hash::FxHashMap;
use tokio::sync::oneshot;

use super::link::Answer;

/// How many keys are remembered (the oldest are forgotten first); as many
/// as a service's reply cache keeps by default.
const MAX_KEYS: usize = 10_000;

/// (exported name, origin host, `<uid>.<instance>.<call>`). The name is
/// part of it: a request to one name never joins, nor is sent again with
/// the local id of, a call to another, whose answer it would receive.
pub(super) type Key = (String, String, String);

/// What to do with an incoming request.
pub(super) enum Plan {
    /// The same call runs here: wait for its answer.
    Join(oneshot::Receiver<Answer>),
    /// The same call ran here: call again with this local id.
    Resend(u64),
    /// A new call.
    New,
}

/// The remembered keys and the local calls in flight.
#[derive(Default)]
pub(super) struct Dedupe {
    ids: FxHashMap<Key, u64>,
    order: VecDeque<Key>,
    running: FxHashMap<u64, Vec<oneshot::Sender<Answer>>>,
}

impl Dedupe {
    /// What to do with a request with `key`.
    pub(super) fn plan(&mut self, key: &Key) -> Plan {
        let Some(&id) = self.ids.get(key) else {
            return Plan::New;
        };
        match self.running.get_mut(&id) {
            Some(waiters) => {
                let (tx, rx) = oneshot::channel();
                waiters.push(tx);
                Plan::Join(rx)
            }
            None => Plan::Resend(id),
        }
    }

    /// Local call `id` was sent for `key`.
    pub(super) fn started(&mut self, key: Key, id: u64) {
        self.running.insert(id, Vec::new());
        if self.ids.insert(key.clone(), id).is_none() {
            self.order.push_back(key);
            if self.order.len() > MAX_KEYS {
                if let Some(old) = self.order.pop_front() {
                    self.ids.remove(&old);
                }
            }
        }
    }

    /// Local call `id` ended (None: without an answer); those who joined
    /// it get the same answer.
    pub(super) fn finished(&mut self, id: u64, answer: Option<&Answer>) {
        for tx in self.running.remove(&id).unwrap_or_default() {
            if let Some(a) = answer {
                let _ = tx.send(a.clone());
            }
        }
    }
}
