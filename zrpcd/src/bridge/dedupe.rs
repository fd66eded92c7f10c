//! At most once across resubmissions. A caller whose broker restarted
//! resubmits its call (same instance, same call id, docs/reliability.md);
//! its host's new bridge sends it again with the same `Zrpc-Origin` and
//! `Zrpc-Caller`. The exporting bridge remembers which local call id it
//! used for each (name, origin, caller) key: a resubmission of a call still
//! running here waits for that call's answer; one of a finished call is
//! sent again with the same local call id, so that the service's reply
//! cache (keyed by the bridge's instance, that call id and the bridge's
//! uid) answers it instead of running it again.
//!
//! A request that joins a running call makes no local call, so the
//! broker's limits do not count it: at most `[export] max_joins` wait at
//! once (in all), each until the call answers or its own deadline passes;
//! beyond, a request is refused ([`Plan::Full`]).

use std::cell::Cell;
use std::collections::VecDeque;
use std::rc::Rc;

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
    Join(Joined),
    /// The same call runs here, and `max_joins` (this) requests wait
    /// already: refuse.
    Full(usize),
    /// The same call ran here: call again with this local id.
    Resend(u64),
    /// A new call.
    New,
}

/// A request waiting for the answer of the running call it repeats; it
/// holds one of the `max_joins` places until dropped.
pub(super) struct Joined {
    /// Where the call's answer arrives.
    pub(super) answer: oneshot::Receiver<Answer>,
    _place: Place,
}

/// One place among the `max_joins`, given back when dropped.
struct Place(Rc<Cell<usize>>);

impl Drop for Place {
    fn drop(&mut self) {
        self.0.set(self.0.get().saturating_sub(1));
    }
}

/// The remembered keys and the local calls in flight.
pub(super) struct Dedupe {
    ids: FxHashMap<Key, u64>,
    order: VecDeque<Key>,
    running: FxHashMap<u64, Vec<oneshot::Sender<Answer>>>,
    /// How many requests may wait for running calls at once.
    max_joins: usize,
    /// How many do (the [`Place`]s alive).
    joined: Rc<Cell<usize>>,
}

impl Dedupe {
    /// No keys yet; at most `max_joins` requests joining running calls at
    /// once.
    pub(super) fn new(max_joins: usize) -> Dedupe {
        Dedupe {
            ids: FxHashMap::default(),
            order: VecDeque::new(),
            running: FxHashMap::default(),
            max_joins,
            joined: Rc::default(),
        }
    }

    /// What to do with a request with `key`.
    pub(super) fn plan(&mut self, key: &Key) -> Plan {
        let Some(&id) = self.ids.get(key) else {
            return Plan::New;
        };
        match self.running.get_mut(&id) {
            Some(_) if self.joined.get() >= self.max_joins => Plan::Full(self.max_joins),
            Some(waiters) => {
                // Those that gave up (their deadline passed) go, so that
                // the list stays within max_joins.
                waiters.retain(|tx| !tx.is_closed());
                let (tx, rx) = oneshot::channel();
                waiters.push(tx);
                self.joined.set(self.joined.get() + 1);
                Plan::Join(Joined {
                    answer: rx,
                    _place: Place(self.joined.clone()),
                })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn key(caller: &str) -> Key {
        ("echo".into(), "host-b".into(), caller.into())
    }

    fn answer() -> Answer {
        Answer {
            code: None,
            message: String::new(),
            payload: bytes::Bytes::new(),
        }
    }

    #[test]
    fn joins_are_bounded_and_their_places_come_back() {
        let mut d = Dedupe::new(2);
        assert!(matches!(d.plan(&key("1")), Plan::New));
        d.started(key("1"), 7);
        let Plan::Join(a) = d.plan(&key("1")) else {
            panic!("not joined")
        };
        let Plan::Join(b) = d.plan(&key("1")) else {
            panic!("not joined")
        };
        assert!(matches!(d.plan(&key("1")), Plan::Full(2)));
        // One gives up (its deadline): its place comes back, and its
        // sender goes from the call's list at the next join.
        drop(a);
        let Plan::Join(c) = d.plan(&key("1")) else {
            panic!("not joined")
        };
        assert_eq!(d.running.get(&7).map(Vec::len), Some(2));
        d.finished(7, Some(&answer()));
        let answered = |j: Joined| j.answer.blocking_recv().is_ok();
        assert!(answered(b) && answered(c));
        assert_eq!(d.joined.get(), 0);
        assert!(matches!(d.plan(&key("1")), Plan::Resend(7)));
        // The name is part of the key.
        let other = ("calc".to_owned(), "host-b".to_owned(), "1".to_owned());
        assert!(matches!(d.plan(&other), Plan::New));
    }
}
