//! A connection's life in the broker: its start (accept-time quotas,
//! `Hello`), the ways it ends (`Fatal`, a backlog nobody reads, a silent
//! service, shutdown) and what its end releases.

use std::rc::Rc;
use std::time::Instant;

use zrpc_proto::{flags, Envelope, ErrorCode, PROTOCOL_VERSION};

use super::{Broker, Fatal, Outcome};
use crate::payload::Payload;
use crate::peers::{Creds, PeerId};
use crate::pending::Stage;
use crate::queue::PeerIo;
use crate::quota::Quota;

impl Broker {
    /// Registers a new connection.
    pub fn add_peer(&mut self, io: Rc<PeerIo>, creds: Creds) -> PeerId {
        self.admit_peer(io, creds, Box::default())
    }

    /// Registers a new connection with its supplementary groups (from
    /// `SO_PEERGROUPS`), counted in its user's account.
    pub fn admit_peer(&mut self, io: Rc<PeerIo>, creds: Creds, groups: Box<[u32]>) -> PeerId {
        self.stats.connections_total += 1;
        let user = self.users.get(creds.uid);
        io.queue.borrow_mut().set_user(user.clone());
        io.queue
            .borrow_mut()
            .set_fd_accounts(self.fd_accounts.clone());
        self.peers.insert(io, creds, groups, user)
    }

    /// Why a new connection of `uid` is refused, if the broker is at its
    /// connection limit, or the user at its connection quota or with
    /// descriptors waiting for their close past its `fds` quota
    /// ([`Broker::over_closing_limits`]).
    pub fn refuse_connection(&self, uid: u32) -> Option<String> {
        let max = self.config.max_connections;
        if self.users.open_connections() >= max {
            return Some(format!(
                "zrpcd already has {max} connections (closing ones included), the limit (--max-connections)"
            ));
        }
        self.over_connection_quota(uid)
            .or_else(|| self.over_closing_limits(uid))
    }

    /// Why a new connection of `uid` is refused, if its user is at the
    /// per-user connection quota.
    pub fn over_connection_quota(&self, uid: u32) -> Option<String> {
        let max = self.quota.connections;
        let n = self.users.connections(uid);
        (uid != 0 && n >= max).then(|| {
            format!("uid {uid} already has {n} connections to zrpcd, its per-user quota (connections in [quota] of the policy)")
        })
    }

    pub(crate) fn on_hello(
        &mut self,
        peer: PeerId,
        version: u32,
        instance: u64,
        agent: &str,
        caps: u32,
    ) -> Result<(), Fatal> {
        if version != PROTOCOL_VERSION {
            return Err(Fatal {
                code: ErrorCode::VersionMismatch,
                message: format!(
                    "zrpcd speaks zrpc protocol version {PROTOCOL_VERSION}, the peer sent version {version}"
                ),
            });
        }
        let conn_id = peer;
        let max_message_size = self.config.max_message_size;
        // Payloads in descriptors, if the peer offers them and the broker
        // passes descriptors at all (`--max-fds-per-conn` 0: never).
        let accepted = if self.config.max_fds_per_conn > 0 {
            caps & zrpc_proto::caps::FD_PAYLOADS
        } else {
            0
        };
        if let Some(p) = self.peers.get_mut(peer) {
            p.io()
                .fds
                .set(accepted & zrpc_proto::caps::FD_PAYLOADS != 0);
            // The instance id is what the peer claims; it identifies a call
            // to services only together with the caller's uid, which the
            // broker sends from the kernel (every Request carries both, and
            // the reply caches key on both): presenting another user's
            // instance id reaches nothing of theirs. (Refusing it instead
            // would let a user who learnt an id block its owner's
            // reconnection.)
            p.greet(instance, agent);
            tracing::debug!(peer, pid = p.creds().pid, agent = ?p.agent(), "peer connected");
        }
        let welcome = Envelope::Welcome {
            version: PROTOCOL_VERSION,
            conn_id,
            max_message_size,
            caps: accepted,
        };
        self.send(peer, &welcome, Payload::EMPTY);
        Ok(())
    }

    /// After a frame was queued to `peer`: disconnects it if it does not
    /// read what it is sent. Its queue may hold `limit` bytes; and it is
    /// also closed once its user's unread bytes (or descriptors) pass the
    /// per-user quota, or its share of `--max-queued-total`. A service's
    /// connection too: the requests other users send it cannot put its
    /// user past these (`route` refuses them there instead, so nobody can
    /// get another user's services disconnected), so what does is what the
    /// user's own connections caused and do not read (acks, results,
    /// answers; a connection holding a name was exempt, and one user
    /// registering a name on each connection then held 1.1 GB of
    /// unanswered `Unregister` acks).
    pub(crate) fn check_backlog(&mut self, peer: PeerId, limit: usize) {
        let Some(p) = self.peers.get(peer) else {
            return;
        };
        if p.io().closed.get() {
            return;
        }
        let queued = p.io().queue.borrow().len_bytes();
        let queued_fds = p.io().queue.borrow().fds_queued();
        // `route` checks a request's payload against the quota, not its
        // header: a service's user may pass the quota by the headers of the
        // requests queued to it, which is no fault of its own.
        let slack = if p.is_serving() {
            self.config.max_queued_bytes
        } else {
            0
        };
        let user_bytes = p.user().queued_bytes().saturating_sub(slack);
        let message = if queued_fds > self.config.max_fds_per_conn {
            format!(
                "{queued_fds} payload descriptors for this connection are queued or sent and unread (limit --max-fds-per-conn); disconnecting"
            )
        } else if queued > limit {
            format!(
                "{queued} bytes of frames for this connection (results, events, answers) are queued unread (limit --max-queued-bytes); disconnecting"
            )
        } else if p.user().limited() && p.user().queued_fds() > self.quota.fds {
            format!(
                "uid {} has {} payload descriptors queued or sent and unread on its connections, more than its per-user quota of {} (fds in [quota] of the policy); disconnecting",
                p.creds().uid,
                p.user().queued_fds(),
                self.quota.fds
            )
        } else if p.user().limited() && user_bytes > self.quota.queued_bytes {
            format!(
                "uid {} has {} bytes queued unread on its connections, more than its per-user quota of {} (queued_bytes in [quota] of the policy); disconnecting",
                p.creds().uid,
                p.user().queued_bytes(),
                self.quota.queued_bytes
            )
        } else if let Some((total, share)) = p
            .user()
            .limited()
            .then(|| self.users.over_share(p.user(), self.quota.queued_total))
            .flatten()
            .filter(|&(_, share)| user_bytes > share)
        {
            format!(
                "zrpcd holds {total} bytes queued unread for all users together, more than --max-queued-total; uid {} has {} of them on its connections, more than its share of {share}; disconnecting",
                p.creds().uid,
                p.user().queued_bytes(),
            )
        } else {
            return;
        };
        let fatal = Fatal {
            code: ErrorCode::LimitExceeded,
            message,
        };
        self.fatal(peer, &fatal);
    }

    /// Sends `Fatal` and closes the connection once it is flushed. The
    /// peer's state is released when its reader ends ([`Broker::remove_peer`]).
    pub fn fatal(&mut self, peer: PeerId, fatal: &Fatal) {
        if fatal.code == ErrorCode::Protocol {
            self.stats.protocol_errors += 1;
        }
        if let Some(p) = self.peers.get(peer) {
            if fatal.code == ErrorCode::Shutdown {
                tracing::debug!(peer, pid = p.creds().pid, "closing connection for shutdown");
            } else {
                let pid = p.creds().pid;
                let (code, message) = (&fatal.code, &fatal.message);
                match self.closings.warn_now(Instant::now()) {
                    Some(0) => {
                        tracing::warn!(peer, pid, code = %code, message = %message, "closing connection")
                    }
                    Some(quiet) => tracing::warn!(
                        peer, pid, code = %code, message = %message,
                        "closing connection ({quiet} more closed since the last such warning, logged at debug level)"
                    ),
                    None => {
                        tracing::debug!(peer, pid, code = %code, message = %message, "closing connection")
                    }
                }
            }
        }
        let env = Envelope::Fatal {
            code: fatal.code,
            message: &fatal.message,
        };
        // Queued without the backlog check of `send` (which ends here).
        if let Some(p) = self.peers.get(peer) {
            self.out.enqueue(p.io(), &env, Payload::EMPTY);
            p.io().close();
        }
    }

    /// Releases everything a closed connection held: its names (at once),
    /// the calls it was serving (re-delivered or failed) and the calls it
    /// made (cancelled at their services).
    pub fn remove_peer(&mut self, peer: PeerId) {
        // Its calls are finished below without finding it: the removal
        // releases their share of the user's account, once.
        let Some(p) = self.peers.remove(peer) else {
            return;
        };
        // The bridge's imported names are not kept for it, nor its calls
        // pinned to its uid.
        let is_bridge = self.is_bridge(peer);
        // Calls to imported names park from now on (or fail, with
        // NO_WAIT), instead of being routed to a bridge that is gone.
        #[cfg(feature = "nats")]
        if self.bridge_peer() == Some(peer) {
            self.bridge = None;
        }
        let now = Instant::now();
        p.io().close();
        self.monitors.remove(peer);
        let (uid, limited) = (p.creds().uid, p.user().limited());
        for name in p.names() {
            self.names.unregister(name, peer);
            if !self.names.is_held(name) {
                self.stats.unregistered(name);
                if !is_bridge {
                    self.keep_name_for(name, uid, limited, now);
                }
                self.no_instance_left(name, now);
            }
        }
        if !p.names().is_empty() {
            // A connection may hold hundreds of names: a few are shown.
            let (count, shown) = (p.names().len(), &p.names()[..p.names().len().min(8)]);
            if self.name_event_of_uid_at_info(uid) {
                tracing::info!(peer, count, names = ?shown, "service disconnected, names released");
            } else {
                tracing::debug!(peer, count, names = ?shown, "service disconnected, names released");
            }
        }
        // The calls it made end first (nobody to answer), so that none of
        // them is re-delivered below on behalf of a caller that is gone.
        // Its calls still waiting go first: ending a delivered one frees a
        // place in its service's window, which must not go to a call of
        // this caller, gone.
        let mut calls = self.pending.made_by(peer);
        calls.sort_by_key(|&bid| {
            self.pending
                .get(bid)
                .is_some_and(|c| matches!(c.stage(), Stage::Delivered(_)))
        });
        let grace = self.config.caller_grace;
        // Services whose window got a place back (orphans given up).
        let mut freed = Vec::new();
        // Its calls left running count against its user's quota as its
        // pending calls did (crate::orphans).
        let bounds = crate::orphans::Bounds {
            per_uid: p.user().limited().then_some(self.quota.pending_calls),
            total: self.config.max_pending_total,
        };
        for bid in calls {
            self.stats.cancelled += 1;
            // A delivered call keeps running at its service for the
            // caller's grace (capped by its deadline): the caller may come
            // back and resubmit it, to be answered by the service's reply
            // cache. Then it is cancelled there (crate::orphans).
            // A call parked again after its instance disconnected is
            // remembered too (running nowhere): its resubmission must not
            // be answered as if it never ran.
            // With the user whose instance had it: a resubmission goes to
            // no other user's instance.
            let delivered = self.pending.get(bid).and_then(|c| match c.stage() {
                Stage::Delivered(svc) => {
                    // A call it made to its own name, delivered to itself
                    // (removed from the table above).
                    let svc_uid = if svc == peer {
                        (!is_bridge).then_some(uid)
                    } else if self.is_bridge(svc) {
                        None
                    } else {
                        // Live (a departing service's calls are parked
                        // again as it leaves); if not, pinned to no one.
                        let uid = self.peers.get(svc).map(|s| s.creds().uid);
                        Some(uid.unwrap_or(crate::pending::NOBODY))
                    };
                    Some(((svc, svc_uid), c.caller_call))
                }
                Stage::Parked if c.was_delivered() => {
                    Some(((crate::orphans::NO_SERVICE, c.pinned_to()), c.caller_call))
                }
                Stage::Parked => None,
            });
            let until = self
                .pending
                .deadline(bid)
                .map_or(now + grace, |d| d.min(now + grace));
            let outcome = match delivered {
                Some(_) if until <= now => Outcome::CallerGone,
                Some((svc, call)) => {
                    let caller = (p.creds().uid, p.instance(), call);
                    for o in self.orphans.add(caller, svc, bid, until, bounds) {
                        tracing::debug!(
                            service = o.service,
                            request = o.request,
                            uid = caller.0,
                            "too many calls whose caller left; cancelling the oldest at its service"
                        );
                        self.cancel_orphan(&o);
                        freed.push(o.service);
                    }
                    Outcome::CallerLeft
                }
                None => Outcome::CallerLeft,
            };
            self.finish(bid, outcome, now);
        }
        // A service that leaves has no orphans left to cancel (they are
        // remembered as delivered until their grace ends).
        self.orphans.service_gone(peer);
        // Each connection's calls are listed apart in the table: a
        // departure costs in proportion to its own calls, not everyone's.
        let delivered = self.pending.delivered_to(peer);
        for bid in delivered {
            let no_retry = self
                .pending
                .get(bid)
                .is_some_and(|c| c.call_flags() & flags::NO_RETRY != 0);
            if no_retry {
                let msg = "the service instance handling the call disconnected".to_string();
                self.finish(bid, Outcome::Error(ErrorCode::ServiceGone, msg), now);
            } else {
                // To another instance of the same user only (see
                // `Pending::pinned_to`).
                self.stats.redelivered += 1;
                self.pending.repark(bid, (!is_bridge).then_some(uid));
                self.dispatch(bid, now);
            }
        }
        self.pending.forget_peer(peer);
        freed.sort_unstable();
        freed.dedup();
        for svc in freed {
            if self.names.waiting() > 0 && self.peers.get(svc).is_some() {
                self.pull_waiting(svc, now);
            }
        }
    }

    /// Pings services and disconnects the ones that stayed silent longer
    /// than the heartbeat timeout (a stopped process keeps its socket open
    /// but answers nothing). Their calls are then re-delivered or failed by
    /// [`Broker::remove_peer`]. Plain clients are not pinged.
    pub fn heartbeat(&mut self) {
        let now = Instant::now();
        if self.reserved.prune(now) {
            self.names_changed = true;
        }
        self.save_names(false);
        let timeout = self.config.heartbeat_timeout;
        let mut dead = Vec::new();
        let mut ping = Vec::new();
        for p in self.peers.iter() {
            if !p.is_ready() || !p.is_serving() {
                continue;
            }
            if now.duration_since(p.last_seen()) > timeout {
                dead.push((p.id(), p.creds().pid));
            } else {
                ping.push(p.id());
            }
        }
        self.ping_nonce += 1;
        let nonce = self.ping_nonce;
        for id in ping {
            self.send(id, &Envelope::Ping { nonce }, Payload::EMPTY);
        }
        for (id, pid) in dead {
            // At debug: the `Fatal` below is logged at warn, at most once
            // per --warn-interval (a user can make any number of services
            // go silent).
            tracing::debug!(
                peer = id,
                pid,
                ?timeout,
                "service stopped responding; disconnecting it"
            );
            self.stats.heartbeat_timeouts += 1;
            let fatal = Fatal {
                code: ErrorCode::Timeout,
                message: format!("no sign of life for more than {timeout:?} (heartbeat timeout)"),
            };
            self.fatal(id, &fatal);
        }
    }

    /// First step of a graceful shutdown: refuse new calls and fail the
    /// parked ones with `Shutdown`; calls already delivered may still finish.
    pub fn begin_shutdown(&mut self) {
        self.shutting_down = true;
        let now = Instant::now();
        for bid in self.pending.ids_where(|c| c.stage() == Stage::Parked) {
            let msg = "zrpcd is shutting down".to_string();
            self.finish(bid, Outcome::Error(ErrorCode::Shutdown, msg), now);
        }
        self.flush();
    }

    /// Last step of shutdown: every call still pending is answered with
    /// `Shutdown`, every peer gets `Fatal{Shutdown}` and is closed once
    /// flushed.
    pub fn shutdown(&mut self) {
        self.shutting_down = true;
        // Before the connections go: the names they hold.
        self.save_names(true);
        let now = Instant::now();
        for bid in self.pending.ids_where(|_| true) {
            let msg = "zrpcd is shutting down".to_string();
            self.finish(bid, Outcome::Error(ErrorCode::Shutdown, msg), now);
        }
        let ids: Vec<PeerId> = self.peers.iter().map(|p| p.id()).collect();
        let fatal = Fatal {
            code: ErrorCode::Shutdown,
            message: "zrpcd is shutting down".into(),
        };
        for id in ids {
            self.fatal(id, &fatal);
        }
        self.flush();
    }
}

/// Whether `p`'s queue (or its user's queues) may hold more than they
/// should (`limit` bytes for the queue, `quota` for the user's): then
/// [`Broker::check_backlog`] looks closer. Descriptors count per user
/// here, not per connection: a burst of results routed in one wake-up may
/// queue more than `--max-fds-per-conn` towards a client that reads them
/// all right after. A function of the peer and the quota only, so that the
/// call path tests it without a second lookup of the peer.
pub(crate) fn over_backlog(p: &crate::peers::Peer, limit: usize, quota: &Quota) -> bool {
    let user = p.user();
    p.io().queue.borrow().len_bytes() > limit
        || (user.limited()
            && (user.queued_bytes() > quota.queued_bytes
                || user.queued_fds() > quota.fds
                || user.total_over(quota.queued_total)))
}
