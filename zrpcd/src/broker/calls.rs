//! A call's way through the broker, the hot path: a client's `Call` is
//! checked against the limits, stored ([`crate::pending`]), delivered to
//! the least busy instance of its service (or parked until the name
//! appears), and ended exactly once, by `Broker::finish`: with the
//! service's `Reply`, an error, its deadline, or its caller going away.
//!
//! Every count a call holds is taken when it is accepted or delivered and
//! given back in `finish`: the caller's pending calls and bytes
//! (`Peer::charge_call` and `Peer::release_call`) and the service's
//! outstanding requests (`Peer::deliver` and `Peer::settle`).

use std::time::{Duration, Instant};

use zrpc_proto::{flags, validate_name, Caller, Envelope, ErrorCode, MAX_TIMEOUT_MS};

use super::{Broker, CallIn, Outcome};
use crate::monitor::{self, CallEvent};
use crate::payload::Payload;
use crate::peers::PeerId;
use crate::pending::{KeptPayload, NewCall, Stage};

/// A pending call to deliver, as [`Broker::route`] takes it.
struct RouteCall<'a> {
    bid: u64,
    service: &'a str,
    method: &'a str,
    payload: Payload<'a>,
    /// The budget the service is told.
    timeout_ms: Option<u64>,
    /// The caller's `Hello` instance and kernel identity, if the caller
    /// has them at hand.
    caller_ident: Option<(u64, Caller)>,
    /// The instance to deliver to if it still holds the name: the one
    /// already running this call for a caller that left (an adopted
    /// orphan), so that its reply cache answers it.
    prefer: Option<PeerId>,
}

impl Broker {
    pub(super) fn on_call(
        &mut self,
        peer: PeerId,
        call: CallIn<'_>,
        payload: Payload<'_>,
        now: Instant,
    ) {
        let CallIn {
            id,
            service,
            method,
            timeout_ms,
            flags,
        } = call;
        self.stats.calls += 1;
        if self.shutting_down {
            return self.result_error(peer, id, ErrorCode::Shutdown, "zrpcd is shutting down");
        }
        // A known route was validated when it was created (and is never the
        // broker's own service): names are validated once, not per call.
        let route = self.pending.find_route(service, method);
        if route.is_none() {
            if let Err(e) = validate_name(service).and_then(|_| validate_name(method)) {
                return self.result_error(peer, id, ErrorCode::InvalidName, &e.to_string());
            }
            if service == zrpc_proto::BROKER_SERVICE {
                return match payload.to_bytes() {
                    Ok(p) => self.call_builtin(peer, id, method, &p),
                    Err(e) => {
                        let msg = format!("zrpcd cannot map the call's payload: {e}");
                        self.result_error(peer, id, ErrorCode::LimitExceeded, &msg)
                    }
                };
            }
        }
        if self.pending.find_by_caller(peer, id).is_some() {
            let msg = format!("call id {id} is already in flight on this connection");
            return self.result_error(peer, id, ErrorCode::Protocol, &msg);
        }
        if self.config.policy.guards_calls() {
            let denied = self.peers.get(peer).and_then(|p| {
                self.config
                    .policy
                    .may_call(&p.identity(), service, method)
                    .err()
            });
            if let Some(msg) = denied {
                return self.result_error(peer, id, ErrorCode::AccessDenied, &msg);
            }
        }
        // A deadline already past fails at once, without a timer; one
        // beyond `MAX_TIMEOUT_MS` means no deadline (the timer wheel holds
        // about two years, and nobody can tell a year from forever).
        let timeout_ms = match timeout_ms {
            Some(0) => return self.expired_on_arrival(peer, id, service, flags),
            Some(ms) if ms <= MAX_TIMEOUT_MS => Some(ms),
            _ => None,
        };
        // One lookup of the caller: count the call, check the limits.
        let max_per_conn = self.config.max_pending_per_conn;
        let total = self.pending.len();
        let over_total = total >= self.config.max_pending_total;
        let size = payload.len();
        let total_bytes = self.pending.payload_bytes();
        let over_total_bytes = total_bytes + size > self.config.max_pending_bytes;
        let max_bytes_per_conn = self.config.max_pending_bytes_per_conn;
        let quota = self.quota;
        let caller_ident = match self.peers.get_mut(peer) {
            Some(p) => {
                p.count_call();
                let calling = p.calling() as usize;
                let refused = if calling >= max_per_conn {
                    Some(format!(
                        "this connection has {calling} calls pending, the limit (--max-pending-per-conn)"
                    ))
                } else if over_total {
                    Some(format!(
                        "the broker has {total} calls pending, the limit (--max-pending-total)"
                    ))
                } else if p.calling_bytes() + size > max_bytes_per_conn {
                    Some(format!(
                        "this connection's pending calls hold {} bytes of arguments; {size} more would pass the limit of {max_bytes_per_conn} (--max-pending-bytes-per-conn)",
                        p.calling_bytes()
                    ))
                } else if over_total_bytes {
                    Some(format!(
                        "the broker's pending calls hold {total_bytes} bytes of arguments; {size} more would pass the limit (--max-pending-bytes)"
                    ))
                } else if p.user().limited()
                    && (p.user().pending_calls() >= quota.pending_calls
                        || p.user().pending_bytes() + size > quota.pending_bytes)
                {
                    let user = p.user();
                    Some(format!(
                        "uid {} has {} calls pending holding {} bytes of arguments, at its per-user quota ({} calls, {} bytes: pending_calls and pending_bytes in [quota] of the policy)",
                        user.uid(),
                        user.pending_calls(),
                        user.pending_bytes(),
                        quota.pending_calls,
                        quota.pending_bytes
                    ))
                } else {
                    None
                };
                if let Some(msg) = refused {
                    return self.result_error(peer, id, ErrorCode::LimitExceeded, &msg);
                }
                p.charge_call(size);
                (p.instance(), p.creds().caller())
            }
            None => return,
        };
        // The resubmission of a call its caller left running (accepted:
        // past the policy and the limits): not cancelled at the service,
        // and delivered to that same instance, whose reply cache answers
        // it with the one execution.
        let adopted = if self.orphans.is_empty() {
            None
        } else {
            self.orphans.adopt((caller_ident.1.uid, caller_ident.0, id))
        };
        // The instance running it must still hold the name to take the
        // resubmission; if it gave the name up (stopping), the execution
        // there answers nobody now: it is cancelled, and its place in the
        // window freed.
        let gave_up = adopted.as_ref().filter(|o| {
            o.service != crate::orphans::NO_SERVICE && !self.names.is_instance(service, o.service)
        });
        if let Some(o) = gave_up.cloned() {
            self.cancel_orphan(&o);
            if self.names.waiting() > 0 && self.peers.get(o.service).is_some() {
                self.pull_waiting(o.service, now);
            }
        }
        let prefer = adopted
            .as_ref()
            .map(|o| o.service)
            .filter(|&s| s != crate::orphans::NO_SERVICE && self.names.is_instance(service, s));
        let deadline = timeout_ms.and_then(|ms| now.checked_add(Duration::from_millis(ms)));
        let kept = KeptPayload::new(payload);
        let new = NewCall {
            caller: peer,
            caller_call: id,
            service,
            method,
            route,
            payload: kept,
            flags,
        };
        let bid = self.pending.insert(new, now, deadline);
        if let Some(orphan) = adopted {
            let uid = orphan.service_uid;
            if prefer.is_some() {
                self.orphans.adopted_by(bid, orphan);
            }
            // Delivered before: if its instance gave up the name meanwhile
            // (stopping, still running it) or disconnected, "no service"
            // answers must not say that it never ran, and it goes to no
            // other user's instance.
            if let Some(p) = self.pending.get_mut(bid) {
                p.delivered_before(uid);
            }
        }
        // The call's route keeps the tag of the service's statistics row
        // (registered names only; calls to others count under
        // `stats::OTHER`), so that ending a call needs no name lookup. A
        // route made before its name was registered, or whose row went to
        // another name, is tagged again here.
        if let Some(r) = route.or_else(|| self.pending.get(bid).map(|p| p.route)) {
            if !self.stats.tag_is_current(self.pending.route_tag(r)) {
                if let Some(tag) = self.stats.tag_of(service) {
                    self.pending.set_route_tag(r, tag);
                }
            }
        }
        let call = RouteCall {
            bid,
            service,
            method,
            payload,
            timeout_ms,
            caller_ident: Some(caller_ident),
            prefer,
        };
        self.route(call, now);
    }

    /// Whose services (`target`'s uid's) are over a quota, as `caller` may
    /// be told: another user's uid only to those who may see every
    /// connection's uid (`zrpcd.peers` in full).
    fn services_of(&self, caller: PeerId, target: &crate::peers::Peer) -> String {
        let uid = target.creds().uid;
        let sees = self.peers.get(caller).is_some_and(|p| {
            p.creds().uid == uid
                || self
                    .config
                    .policy
                    .may_introspect(&p.identity(), crate::policy::Introspection::Peers)
        });
        if sees {
            format!("the services of uid {uid}")
        } else {
            "the services of another user".to_owned()
        }
    }

    /// Re-routes a pending call (re-delivery, or its name appeared), with
    /// what is left of its deadline.
    pub(crate) fn dispatch(&mut self, bid: u64, now: Instant) {
        let Some(p) = self.pending.get(bid) else {
            return;
        };
        let (service, method) = self.pending.names_rc(p);
        // A handle (a refcount, or the memfd), not a copy of the bytes.
        let kept = p.payload.clone();
        let timeout_ms = self
            .pending
            .deadline(bid)
            .map(|d| d.saturating_duration_since(now).as_millis() as u64);
        let call = RouteCall {
            bid,
            service: &service,
            method: &method,
            payload: kept.as_payload(),
            timeout_ms,
            caller_ident: None,
            prefer: None,
        };
        self.route(call, now);
    }

    /// Delivers a pending call to the instance of `service` with the fewest
    /// outstanding calls, or parks it until the name appears.
    fn route(&mut self, call: RouteCall<'_>, now: Instant) {
        let RouteCall {
            bid,
            service,
            method,
            payload,
            timeout_ms,
            caller_ident,
            prefer,
        } = call;
        let Some(p) = self.pending.get(bid) else {
            return;
        };
        let (caller, caller_call, call_flags) = (p.caller, p.caller_call, p.call_flags());
        let redelivery = p.was_delivered();
        let pinned = p.pinned_to();
        let (peers, orphans) = (&self.peers, &self.orphans);
        let preferred = prefer.filter(|p| self.names.is_instance(service, *p));
        let window = self.config.max_delivered_per_conn;
        let target = preferred.or_else(|| {
            self.names.pick(
                service,
                |id| super::turns::in_hand(peers, orphans, id),
                window,
            )
        });
        #[cfg(feature = "nats")]
        let target = target.or_else(|| self.bridge_by_pattern(service));
        let Some(target) = target else {
            if call_flags & flags::NO_WAIT != 0 {
                // `NoSuchService` says the call never ran: not so for a call
                // whose instance disconnected while it had it (or gave up
                // the name while its caller was away).
                let (code, msg) = if redelivery {
                    let msg = format!(
                        "the service instance that had the call disconnected or gave up the name, and no other instance holds the name {service:?} (the call may have run)"
                    );
                    (ErrorCode::ServiceGone, msg)
                } else {
                    let msg = format!("no service is registered under the name {service:?}");
                    (ErrorCode::NoSuchService, msg)
                };
                return self.finish(bid, Outcome::Error(code, msg), now);
            }
            return self.park(service, bid, caller, caller_ident);
        };
        let max_queued = self.config.max_queued_bytes;
        let ident = caller_ident.or_else(|| {
            self.peers
                .get(caller)
                .map(|p| (p.instance(), p.creds().caller()))
        });
        // A caller that is gone has its calls ended with it
        // (`Broker::remove_peer`); never deliver one in its name.
        let Some((caller_instance, caller_id)) = ident else {
            return self.finish(bid, Outcome::CallerLeft, now);
        };
        let Some(t) = self.peers.get(target) else {
            // Not reached (targets are live connections), but a call must
            // never be left neither parked nor answered.
            debug_assert!(
                false,
                "call {bid} routed to connection {target}, which is gone"
            );
            return self.park(service, bid, caller, caller_ident);
        };
        // A call whose instance disconnected goes to another instance of
        // the same user, never to another user's service that registered
        // the name since (its arguments were given to the first user, and
        // it may have run). All instances of a name are of one user, so
        // none would do. The NATS bridge forwards for the broker itself.
        if pinned.is_some_and(|u| u != t.creds().uid) && !self.is_bridge(target) {
            let (code, msg) = if redelivery {
                let msg = format!(
                    "the service instance that had the call disconnected, and the name {service:?} is now held by another user's service, which is not given the call (it may have run)"
                );
                (ErrorCode::ServiceGone, msg)
            } else {
                let msg = format!(
                    "the service the call was made to left before taking it, and the name {service:?} is now held by another user's service, which is not given the call (it never ran)"
                );
                (ErrorCode::NoSuchService, msg)
            };
            return self.finish(bid, Outcome::Error(code, msg), now);
        }
        // Every instance has its window of calls in hand (`pick` looks on
        // until it finds one with room, and chose the one with the fewest
        // it saw): the call waits for an answer to free a slot (`Broker::pull_waiting`), in turns with other users' calls.
        // A resubmission goes to the instance running it whatever its load.
        let in_hand = t
            .outstanding()
            .saturating_add(self.orphans.running_on(target));
        if in_hand >= self.config.max_delivered_per_conn
            && preferred.is_none()
            && !self.unwindowed(target)
        {
            // Made to this user's service: held for it (`Pending::hold_for`).
            let holder = t.creds().uid;
            self.pending.hold_for(bid, holder);
            return self.park(service, bid, caller, caller_ident);
        }
        let queued = t.io().queue.borrow().len_bytes();
        let user = t.user();
        if matches!(payload, Payload::Fd(_))
            && user.limited()
            && user.queued_fds() >= self.quota.fds
        {
            // Those in flight counted as of now, before refusing for them
            // (the service may have read since the broker last wrote it).
            let io = t.io();
            io.queue.borrow_mut().release_received(io.sock.get_ref());
        }
        // Refused, not queued, past the limits of what waits for the
        // service (past them a peer is disconnected, see `check_backlog`,
        // and other users' requests must not get a service disconnected).
        let refused = if user.limited()
            && user.queued_bytes() + payload.len() > self.quota.queued_bytes
        {
            Some(format!(
                "{} do not read their requests ({} bytes queued, more than its per-user quota: queued_bytes in [quota] of the policy)",
                self.services_of(caller, t),
                user.queued_bytes()
            ))
        } else if let Some((total, _)) = user
            .limited()
            .then(|| self.users.over_share(user, self.quota.queued_total))
            .flatten()
        {
            Some(format!(
                "{} do not read their requests (more than their share of what zrpcd holds queued for all users: {total} bytes, more than --max-queued-total)",
                self.services_of(caller, t),
            ))
        } else if queued > max_queued {
            Some(format!(
                "service {service:?} is not reading its requests ({queued} bytes queued, limit --max-queued-bytes)"
            ))
        } else if matches!(payload, Payload::Fd(_))
            && t.io().fds.get()
            && user.limited()
            && user.queued_fds() >= self.quota.fds
        {
            // A request whose payload goes as a descriptor.
            Some(format!(
                "{} do not read their requests ({} payload descriptors queued, its per-user quota: fds in [quota] of the policy)",
                self.services_of(caller, t),
                user.queued_fds()
            ))
        } else {
            None
        };
        if let Some(msg) = refused {
            self.log_refusal(target, &msg);
            return self.finish(bid, Outcome::Error(ErrorCode::LimitExceeded, msg), now);
        }
        let Some(t) = self.peers.get_mut(target) else {
            return;
        };
        let env = Envelope::Request {
            id: bid,
            service,
            method,
            timeout_ms,
            caller_instance,
            caller_call,
            caller: Some(caller_id),
        };
        let busy = t.requests_in_hand() >= crate::queue::FLUSH_EVERY_FRAMES;
        t.deliver();
        self.out.enqueue_for(t.io(), &env, payload, busy);
        self.pending.set_stage(bid, Stage::Delivered(target));
        if preferred.is_none() {
            self.names.advance(service);
        }
        if redelivery {
            if let Some(p) = self.pending.get_mut(bid) {
                p.mark_redelivered();
            }
        }
        #[cfg(feature = "nats")]
        self.note_bridged_flags(target, bid, call_flags);
    }

    /// Ends a call: the one place where a pending call is removed.
    pub(crate) fn finish(&mut self, bid: u64, outcome: Outcome<'_>, now: Instant) {
        let Some(removed) = self.pending.remove(bid) else {
            return;
        };
        let p = removed.call;
        let service: &str = &removed.service;
        let stats_slot = removed.route_tag;
        let replied = matches!(outcome, Outcome::Reply { .. });
        // Stop the service's work when the call is really over; not when the
        // caller only lost its connection (it will resubmit) or the broker is
        // shutting down (the next broker gets the call again).
        let cancel_service = match &outcome {
            Outcome::Reply { .. } | Outcome::CallerLeft => false,
            Outcome::Error(code, _) => *code != ErrorCode::Shutdown,
            Outcome::CallerGone => true,
        };
        // The deliveries this call adopted (resubmitted within its caller's
        // grace): their handler runs for this call, cancelled with it.
        let adopted = self.orphans.ended(bid);
        // A slot of this service connection's window is freed: a call
        // waiting for one takes it, once this one is done with.
        let mut pull = None;
        match p.stage() {
            Stage::Delivered(svc) => {
                if self.names.waiting() > 0 {
                    pull = Some(svc);
                }
                let mut cancel = false;
                if let Some(s) = self.peers.get_mut(svc) {
                    s.settle(replied);
                    cancel = !replied && cancel_service;
                }
                if cancel {
                    // Latest first (see `Orphan::requests`).
                    for id in std::iter::once(bid).chain(adopted.into_iter().rev()) {
                        self.send(svc, &Envelope::Cancel { id }, Payload::EMPTY);
                    }
                }
            }
            Stage::Parked => self.names.unpark(service, bid),
        }
        let size = p.payload.len();
        if matches!(outcome, Outcome::CallerGone | Outcome::CallerLeft) {
            // (otherwise `send_result` releases the call, in the same lookup)
            if let Some(c) = self.peers.get_mut(p.caller) {
                c.release_call(size);
            }
        }
        let elapsed = self.pending.elapsed_at(&p, now);
        if !self.monitors.is_empty() {
            let (outcome_name, reply_size) = match &outcome {
                Outcome::Reply { code, payload, .. } => {
                    (code.map_or("ok", |c| c.as_str()), payload.len())
                }
                Outcome::Error(code, _) => (code.as_str(), 0),
                Outcome::CallerGone | Outcome::CallerLeft => ("cancelled", 0),
            };
            #[cfg(feature = "nats")]
            let bridged = self.bridged_mark(p.caller, p.stage());
            #[cfg(not(feature = "nats"))]
            let bridged = None;
            let event = CallEvent {
                caller_pid: self.peers.get(p.caller).map_or(0, |c| c.creds().pid),
                caller: p.caller,
                service,
                method: &removed.method,
                size: p.payload.len(),
                reply_size,
                latency: elapsed,
                outcome: outcome_name,
                bridged,
            };
            self.emit(&event);
        }
        match outcome {
            Outcome::Reply {
                code,
                message,
                payload,
            } => {
                let env = Envelope::Result {
                    id: p.caller_call,
                    code,
                    message,
                };
                self.send_result(p.caller, size, &env, payload);
                match code {
                    None => self.stats.calls_ok += 1,
                    Some(c) => self.stats.error(c),
                }
                self.stats
                    .service_in(stats_slot, service)
                    .answered(elapsed, code.is_some(), now);
            }
            Outcome::Error(code, message) => {
                let env = Envelope::Result {
                    id: p.caller_call,
                    code: Some(code),
                    message: &message,
                };
                self.send_result(p.caller, size, &env, Payload::EMPTY);
                self.stats.error(code);
                self.stats.service_in(stats_slot, service).failed(now);
                tracing::debug!(bid, service, %code, %message, "call failed");
            }
            Outcome::CallerGone | Outcome::CallerLeft => {}
        }
        if let Some(svc) = pull {
            self.pull_waiting(svc, now);
        }
    }

    /// Sends an event to every monitor that wants it.
    fn emit(&mut self, event: &CallEvent<'_>) {
        let payload = monitor::encode(event);
        for (peer, seq) in self.monitors.recipients(event) {
            self.send(peer, &Envelope::Event { seq }, Payload::Shared(&payload));
        }
    }

    /// Queues a `Result` to a caller, counts its call as no longer pending,
    /// and disconnects the caller if its results pile up unread.
    fn send_result(
        &mut self,
        caller: PeerId,
        arg_size: usize,
        env: &Envelope<'_>,
        payload: Payload<'_>,
    ) {
        let Some(c) = self.peers.get_mut(caller) else {
            return;
        };
        c.release_call(arg_size);
        self.out.enqueue(c.io(), env, payload);
        let max = self.config.max_queued_bytes;
        if super::lifecycle::over_backlog(c, max, &self.quota) {
            self.check_backlog(caller, max);
        }
    }

    /// Handles a service's answer.
    pub(super) fn on_reply(
        &mut self,
        peer: PeerId,
        bid: u64,
        code: Option<ErrorCode>,
        message: &str,
        payload: Payload<'_>,
        now: Instant,
    ) {
        match self.pending.get(bid) {
            Some(p) if p.stage() == Stage::Delivered(peer) => {
                // `Shutdown` is the broker's own: a caller takes it for a
                // broker going away and waits for the next connection to
                // send the call again. From a service it would hold the
                // caller until its deadline (or for ever), so it reaches the
                // caller as the service's error it is.
                let (code, message) = match code {
                    Some(ErrorCode::Shutdown) => (
                        Some(ErrorCode::Remote),
                        "the service answered with the broker's own code Shutdown",
                    ),
                    // These two say the call never ran: not so for a call
                    // whose first instance disconnected while it had it,
                    // whatever the instance it was re-delivered to (the
                    // NATS bridge, asking other hosts) found.
                    Some(ErrorCode::NoSuchService) if p.was_redelivered() => (
                        Some(ErrorCode::ServiceGone),
                        "the service instance handling the call disconnected, and where it was re-delivered no service holds the name (the call may have run)",
                    ),
                    Some(ErrorCode::TimeoutNoService) if p.was_redelivered() => (
                        Some(ErrorCode::Timeout),
                        "the service instance handling the call disconnected, and where it was re-delivered no service took it before the deadline (the call may have run)",
                    ),
                    code => (code, message),
                };
                let outcome = Outcome::Reply {
                    code,
                    message,
                    payload,
                };
                self.finish(bid, outcome, now);
            }
            _ => {
                self.stats.late_replies += 1;
                tracing::debug!(peer, bid, "dropped a reply to a call that already ended");
                // The answer to a call whose caller left: a place in the
                // service's window is free.
                if self.orphans.answered(peer, bid) && self.names.waiting() > 0 {
                    self.pull_waiting(peer, now);
                }
            }
        }
    }
}
