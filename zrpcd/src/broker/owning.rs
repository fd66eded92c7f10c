//! Owning names: the broker's side of `Register` and `Unregister`, with
//! the access checks (the policy file's rules, and no taking over or joining
//! another uid's name). The registry itself is [`crate::names`].

use std::time::Instant;

use zrpc_proto::{validate_name, Envelope, ErrorCode};

use super::Broker;
use crate::names::RegisterError;
use crate::payload::Payload;
use crate::peers::PeerId;
use crate::policy::Introspection;

impl Broker {
    pub(crate) fn ack(&mut self, peer: PeerId, req: u64, code: Option<ErrorCode>, message: &str) {
        self.send(peer, &Envelope::Ack { req, code, message }, Payload::EMPTY);
    }

    pub(crate) fn on_register(
        &mut self,
        peer: PeerId,
        req: u64,
        name: &str,
        shared: bool,
        now: Instant,
    ) {
        if let Err(e) = validate_name(name) {
            return self.ack(peer, req, Some(ErrorCode::InvalidName), &e.to_string());
        }
        if name == zrpc_proto::BROKER_SERVICE {
            let msg = format!("the name {name:?} is reserved for the broker");
            return self.ack(peer, req, Some(ErrorCode::NameTaken), &msg);
        }
        #[cfg(feature = "nats")]
        self.yield_imported(peer, name, shared);
        if let Err(msg) = self.may_own(peer, name, shared, now) {
            self.stats.error(ErrorCode::AccessDenied);
            self.log_refusal(peer, &msg);
            return self.ack(peer, req, Some(ErrorCode::AccessDenied), &msg);
        }
        if self.names.is_instance(name, peer) {
            // Held already: nothing more to count.
            return self.ack(peer, req, None, "");
        }
        if let Some(msg) = self.over_name_limits(peer) {
            self.log_refusal(peer, &msg);
            return self.ack(peer, req, Some(ErrorCode::LimitExceeded), &msg);
        }
        match self.names.register(name, peer, shared) {
            Ok(()) => {
                self.reserved.taken(name);
                self.names_changed = true;
                self.peers.add_name(peer, name);
                if self.name_event_at_info(peer) {
                    tracing::info!(peer, name, shared, "name registered");
                } else {
                    tracing::debug!(peer, name, shared, "name registered");
                }
                // Its statistics row (the calls that waited for the name
                // are moved to it as they are delivered).
                let uid = self.peers.get(peer).map_or(u32::MAX, |p| p.creds().uid);
                self.stats.registered(name, uid);
                self.ack(peer, req, None, "");
                self.pull_name(name, now);
            }
            Err(RegisterError::AlreadyHeld) => self.ack(peer, req, None, ""),
            Err(RegisterError::Taken) => {
                let msg = format!(
                    "the name {name:?} is held by another live service; to run several instances, register it as shared from every instance"
                );
                self.ack(peer, req, Some(ErrorCode::NameTaken), &msg);
            }
        }
    }

    /// Why `peer` may not register one more name, if it is at a limit: its
    /// connection's (`--max-names-per-conn`), the broker's (`--max-names`)
    /// or its user's quota (root exempt). The message names no uid but the
    /// caller's own.
    fn over_name_limits(&self, peer: PeerId) -> Option<String> {
        let p = self.peers.get(peer)?;
        let held = p.names().len();
        let total = self.peers.names_total();
        let user = p.user();
        if held >= self.config.max_names_per_conn {
            Some(format!(
                "this connection already holds {held} names, the limit (--max-names-per-conn)"
            ))
        } else if total >= self.config.max_names {
            Some(format!(
                "zrpcd already holds {total} names, the limit (--max-names)"
            ))
        } else if user.limited() && user.names() >= self.quota.names {
            Some(format!(
                "uid {} already holds {} names, its per-user quota (names in [quota] of the policy)",
                user.uid(),
                user.names()
            ))
        } else {
            None
        }
    }

    /// Whether `peer` may own `name`: the policy file's rules, and never a
    /// name that a connection of another uid holds (no taking over or
    /// joining another user's service) or that is kept for another user
    /// after its last instance left (`--name-grace`, [`crate::reserved`]).
    pub(crate) fn may_own(
        &self,
        peer: PeerId,
        name: &str,
        shared: bool,
        now: Instant,
    ) -> Result<(), String> {
        let Some(p) = self.peers.get(peer) else {
            return Ok(());
        };
        let policy = &self.config.policy;
        policy.may_own(&p.identity(), name, shared)?;
        let uid = p.creds().uid;
        // All holders of a name are of one uid (this check is what keeps
        // it so), so the first live one tells: a look at each (one lookup
        // per instance, thousands for a user's widely shared name) on every
        // Register would let a user make the broker's thread pay that at
        // will.
        let holders = self.names.holders(name);
        let uid_of = |h: &PeerId| self.peers.get(*h).map(|h| h.creds().uid);
        let first = holders.iter().find_map(uid_of);
        debug_assert!(
            holders.iter().filter_map(uid_of).all(|u| Some(u) == first),
            "the holders of {name:?} are of several uids"
        );
        let other = first.filter(|&u| u != uid);
        // The holder's uid only for those who may see every connection's
        // uid (`zrpcd.peers` in full): to the others, another user's uid is
        // private.
        let user = |o: u32| {
            if policy.may_introspect(&p.identity(), Introspection::Peers) {
                format!("uid {o}")
            } else {
                "another user".to_owned()
            }
        };
        if let Some(o) = other {
            return Err(format!(
                "the name {name:?} is held by a service of {}; uid {uid} may not take it over or join it",
                user(o)
            ));
        }
        // Free: kept for its last user for a while, unless the policy's
        // rules say who owns it (or it is the broker's own NATS bridge,
        // which takes back its imported names when they are free).
        if first.is_none()
            && !self.reserved.is_empty()
            && !policy.mentions(name)
            && !self.is_bridge(peer)
        {
            if let Some((o, ago)) = self.reserved.kept_for(name, now).filter(|&(o, _)| o != uid) {
                // When another user's service left is as private as its uid.
                let since = if policy.may_introspect(&p.identity(), Introspection::Peers) {
                    format!(" (it left {:.1} s ago)", ago.as_secs_f64())
                } else {
                    String::new()
                };
                return Err(format!(
                    "the name {name:?} is kept for {}{since}: a name stays its user's for --name-grace ({:.1} s) after its last instance leaves; uid {uid} may not take it over until then",
                    user(o),
                    self.config.name_grace.as_secs_f64(),
                ));
            }
        }
        Ok(())
    }

    /// Writes the names held and kept, with their users, for the next
    /// broker (`Config::names_file`, see [`crate::reserved`]), if they
    /// changed since the last time (`force`: whether or not). Names the
    /// NATS bridge holds are left out (it imports them again).
    pub(crate) fn save_names(&mut self, force: bool) {
        let Some(path) = self.config.names_file.clone() else {
            return;
        };
        let now = Instant::now();
        // A user registering and releasing names in a loop must not make
        // the broker's thread write the file more than once a second.
        let recent = self
            .names_saved_at
            .is_some_and(|t| now.duration_since(t) < std::time::Duration::from_secs(1));
        if !force && (!self.names_changed || recent) {
            return;
        }
        self.names_saved_at = Some(now);
        let held = self.names.after(None).filter_map(|(name, holders)| {
            let first = holders.iter().find(|&&h| !self.is_bridge(h))?;
            Some((name, self.peers.get(*first)?.creds().uid))
        });
        let kept = self.reserved.iter(now);
        match crate::reserved::save(&path, held.chain(kept)) {
            // Once until it works again (it is tried on every heartbeat).
            Err(e) if !self.names_unsaved => {
                self.names_unsaved = true;
                tracing::warn!(error = %e, path = %path.display(), "cannot save the names for the next run; a restart will not keep them for their users");
            }
            Err(_) => {}
            Ok(()) => (self.names_changed, self.names_unsaved) = (false, false),
        }
    }

    /// `name` lost its last instance, of user `uid` (`limited`: not root):
    /// kept for that user for `--name-grace`, unless the policy's rules say
    /// who owns it (see [`crate::reserved`]).
    pub(crate) fn keep_name_for(&mut self, name: &str, uid: u32, limited: bool, now: Instant) {
        self.names_changed = true;
        if self.config.name_grace.is_zero() || self.config.policy.mentions(name) {
            return;
        }
        let per_uid = limited.then_some(self.quota.names);
        self.reserved.release(name, uid, now, per_uid);
    }

    pub(crate) fn on_unregister(&mut self, peer: PeerId, req: u64, name: &str) {
        if self.names.unregister(name, peer) {
            self.peers.remove_name(peer, name);
            if !self.names.is_held(name) {
                let now = Instant::now();
                self.stats.unregistered(name);
                if let Some(p) = self.peers.get(peer) {
                    let (uid, limited) = (p.creds().uid, p.user().limited());
                    if !self.is_bridge(peer) {
                        self.keep_name_for(name, uid, limited, now);
                    }
                }
                self.no_instance_left(name, now);
            }
            if self.name_event_at_info(peer) {
                tracing::info!(peer, name, "name unregistered");
            } else {
                tracing::debug!(peer, name, "name unregistered");
            }
            self.ack(peer, req, None, "");
        } else {
            let msg = format!("this connection does not hold the name {name:?}");
            self.ack(peer, req, Some(ErrorCode::NotRegistered), &msg);
        }
    }
}
