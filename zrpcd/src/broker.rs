//! The broker's state and its routing logic. Everything here is synchronous:
//! connection tasks call in with a decoded frame, and frames to send are
//! queued on the destination peers, whose writers are woken once per batch.

use std::rc::Rc;
use std::time::{Duration, Instant};

use zrpc_proto::{flags, validate_name, Caller, Envelope, ErrorCode, Frame, MAX_TIMEOUT_MS};

use crate::config::Config;
use crate::monitor::{self, CallEvent, Monitor};
use crate::names::Names;
use crate::outbox::Outbox;
use crate::payload::Payload;
use crate::peers::{PeerId, Peers};
use crate::pending::{KeptPayload, NewCall, PendingCalls, Stage};
use crate::quota::Usage;
use crate::stats::Stats;
use zrpc_io::busy_poll::BusyPoll;

/// A connection-level error: the peer gets a `Fatal` frame and is closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fatal {
    /// Error code sent to the peer.
    pub code: ErrorCode,
    /// Message sent to the peer and logged.
    pub message: String,
}

impl Fatal {
    pub(crate) fn protocol(message: impl Into<String>) -> Fatal {
        Fatal {
            code: ErrorCode::Protocol,
            message: message.into(),
        }
    }
}

/// How a call ended.
pub(crate) enum Outcome<'a> {
    /// The service answered (successfully or with its own error).
    Reply {
        code: Option<ErrorCode>,
        message: &'a str,
        payload: Payload<'a>,
    },
    /// The broker ends the call with an error.
    Error(ErrorCode, String),
    /// The caller cancelled the call: nobody to answer, and the service is
    /// told to stop.
    CallerGone,
    /// The caller disconnected: nobody to answer. The service is *not* told
    /// to stop: the client may reconnect and resubmit the call, and the
    /// service's reply cache can then answer it without a second execution.
    CallerLeft,
}

/// The fields of a `Call` envelope that `on_call` needs.
struct CallIn<'a> {
    id: u64,
    service: &'a str,
    method: &'a str,
    timeout_ms: Option<u64>,
    flags: u32,
}

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
}

/// The whole broker state: peers, names, pending calls, statistics.
#[derive(Debug)]
pub struct Broker {
    /// Limits and settings.
    pub config: Config,
    /// Live connections.
    pub peers: Peers,
    /// Service names.
    pub names: Names,
    /// Calls in flight.
    pub pending: PendingCalls,
    /// Counters.
    pub stats: Stats,
    /// When the broker started.
    pub started: Instant,
    /// Set once shutdown began: new calls are refused.
    pub shutting_down: bool,
    /// Connections watching calls (`zrpc monitor`).
    pub monitors: Vec<Monitor>,
    pub(crate) ping_nonce: u64,
    /// Peers with frames queued, written once per wake-up (see [`Outbox`]).
    pub out: Outbox,
    /// Adaptive busy polling (None: off); read batches are reported here.
    pub busy_poll: Option<Rc<BusyPoll>>,
    /// Read buffer bytes held for partly received frames, all connections
    /// together (see [`crate::partial`]).
    pub partial_total: usize,
    /// Payload bytes of all pending calls (`--max-pending-bytes`).
    pub pending_bytes: usize,
    /// Users with live connections, and what each holds.
    pub users: crate::quota::Users,
    /// What one user may hold (see [`crate::quota`]).
    pub quota: crate::quota::Quota,
}

impl Broker {
    /// An empty broker.
    pub fn new(config: Config) -> Self {
        let max_stats_names = config.max_stats_names;
        let quota = crate::quota::Quota::new(&config, config.policy.quota());
        Broker {
            busy_poll: BusyPoll::new_or_off(config.busy_poll),
            config,
            peers: Peers::default(),
            names: Names::default(),
            pending: PendingCalls::default(),
            stats: Stats::new(max_stats_names),
            started: Instant::now(),
            shutting_down: false,
            monitors: Vec::new(),
            ping_nonce: 0,
            out: Outbox::default(),
            partial_total: 0,
            pending_bytes: 0,
            users: Default::default(),
            quota,
        }
    }

    /// Queues a frame to `peer`; returns false if the peer is gone. A peer
    /// that does not read what it is sent (pongs, acks, errors, monitor
    /// events, built-in answers) is disconnected once its queue passes
    /// `--max-queued-bytes`; a service (which may be busy with a burst of
    /// requests, refused past that limit) only at twice that.
    pub(crate) fn send(&mut self, peer: PeerId, env: &Envelope<'_>, payload: Payload<'_>) -> bool {
        let Some(p) = self.peers.get(peer) else {
            return false;
        };
        self.out.enqueue(&p.io, env, payload);
        let max = self.config.max_queued_bytes;
        let limit = if p.names.is_empty() && p.outstanding == 0 {
            max
        } else {
            max.saturating_mul(2)
        };
        if p.io.queue.borrow().len_bytes() > limit
            || (p.user.limited() && p.user.queued_bytes.get() > self.quota.queued_bytes)
        {
            self.check_backlog(peer, limit);
        }
        true
    }

    /// Writes out every peer that got frames since the last flush: one
    /// vectored write per peer per batch, directly from this task.
    pub fn flush(&mut self) {
        self.out.flush();
    }

    /// Handles one frame from `peer`. An error closes the connection.
    pub fn on_frame(&mut self, peer: PeerId, frame: Frame) -> Result<(), Fatal> {
        self.on_frame_at(peer, frame, Instant::now())
    }

    /// [`Broker::on_frame`] with the current time given by the caller (the
    /// connection reads the clock once per read batch, not per frame).
    pub fn on_frame_at(&mut self, peer: PeerId, frame: Frame, now: Instant) -> Result<(), Fatal> {
        self.on_frame_parts(peer, &frame.envelope, Payload::Shared(&frame.payload), now)
    }

    /// [`Broker::on_frame_at`] for a frame given as its envelope bytes and
    /// its payload, which may be borrowed from the read buffer (the
    /// connection handles frames with small payloads in place).
    pub fn on_frame_parts(
        &mut self,
        peer: PeerId,
        envelope: &[u8],
        payload: Payload<'_>,
        now: Instant,
    ) -> Result<(), Fatal> {
        let env = Envelope::decode(envelope).map_err(|e| Fatal::protocol(e.to_string()))?;
        let ready = self.peers.get(peer).is_some_and(|p| p.ready);
        if !ready {
            return match env {
                Envelope::Hello {
                    version,
                    instance,
                    agent,
                } => self.on_hello(peer, version, instance, agent),
                _ => Err(Fatal::protocol("expected Hello as the first frame")),
            };
        }
        match env {
            Envelope::Call {
                id,
                service,
                method,
                timeout_ms,
                flags,
            } => {
                let call = CallIn {
                    id,
                    service,
                    method,
                    timeout_ms,
                    flags,
                };
                self.on_call(peer, call, payload, now);
                Ok(())
            }
            Envelope::Reply { id, code, message } => {
                self.on_reply(peer, id, code, message, payload, now);
                Ok(())
            }
            Envelope::Register { req, name, shared } => {
                self.on_register(peer, req, name, shared, now);
                Ok(())
            }
            Envelope::Unregister { req, name } => {
                self.on_unregister(peer, req, name);
                Ok(())
            }
            Envelope::Cancel { id } => {
                if let Some(bid) = self.pending.find_by_caller(peer, id) {
                    self.stats.cancelled += 1;
                    self.finish(bid, Outcome::CallerGone, now);
                }
                Ok(())
            }
            Envelope::Ping { nonce } => {
                self.send(peer, &Envelope::Pong { nonce }, Payload::EMPTY);
                Ok(())
            }
            Envelope::Pong { .. } => Ok(()),
            Envelope::Hello { .. } => Err(Fatal::protocol("Hello sent twice")),
            other => Err(Fatal::protocol(format!(
                "message kind {:?} is not accepted from peers",
                other.kind()
            ))),
        }
    }

    /// Logs a limit hit or an access denied to `peer`: at warn level the
    /// first time per connection, at debug level after that (a flood must
    /// not flood logs).
    pub(crate) fn log_refusal(&mut self, peer: PeerId, message: &str) {
        let Some(p) = self.peers.get_mut(peer) else {
            return;
        };
        let (uid, pid) = (p.creds.uid, p.creds.pid);
        if p.limit_logged {
            tracing::debug!(peer, uid, pid, message, "refused");
        } else {
            p.limit_logged = true;
            tracing::warn!(
                peer,
                uid,
                pid,
                message,
                "refused (further refusals on this connection are logged at debug level)"
            );
        }
    }

    fn result_error(&mut self, peer: PeerId, id: u64, code: ErrorCode, message: &str) {
        if matches!(code, ErrorCode::LimitExceeded | ErrorCode::AccessDenied) {
            self.log_refusal(peer, message);
        }
        self.stats.error(code);
        let env = Envelope::Result {
            id,
            code: Some(code),
            message,
        };
        self.send(peer, &env, Payload::EMPTY);
    }

    fn on_call(&mut self, peer: PeerId, call: CallIn<'_>, payload: Payload<'_>, now: Instant) {
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
                return self.call_builtin(peer, id, method, payload.as_slice());
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
        let total_bytes = self.pending_bytes;
        let over_total_bytes = total_bytes + size > self.config.max_pending_bytes;
        let max_bytes_per_conn = self.config.max_pending_bytes_per_conn;
        let quota = self.quota;
        let caller_ident = match self.peers.get_mut(peer) {
            Some(p) => {
                p.calls_made += 1;
                let calling = p.calling as usize;
                let refused = if calling >= max_per_conn {
                    Some(format!(
                        "this connection has {calling} calls pending, the limit (--max-pending-per-conn)"
                    ))
                } else if over_total {
                    Some(format!(
                        "the broker has {total} calls pending, the limit (--max-pending-total)"
                    ))
                } else if p.calling_bytes + size > max_bytes_per_conn {
                    Some(format!(
                        "this connection's pending calls hold {} bytes of arguments; {size} more would pass the limit of {max_bytes_per_conn} (--max-pending-bytes-per-conn)",
                        p.calling_bytes
                    ))
                } else if over_total_bytes {
                    Some(format!(
                        "the broker's pending calls hold {total_bytes} bytes of arguments; {size} more would pass the limit (--max-pending-bytes)"
                    ))
                } else if p.user.limited()
                    && (p.user.pending_calls.get() >= quota.pending_calls
                        || p.user.pending_bytes.get() + size > quota.pending_bytes)
                {
                    Some(format!(
                        "uid {} has {} calls pending holding {} bytes of arguments, at its per-user quota ({} calls, {} bytes: pending_calls and pending_bytes in [quota] of the policy)",
                        p.user.uid,
                        p.user.pending_calls.get(),
                        p.user.pending_bytes.get(),
                        quota.pending_calls,
                        quota.pending_bytes
                    ))
                } else {
                    None
                };
                if let Some(msg) = refused {
                    return self.result_error(peer, id, ErrorCode::LimitExceeded, &msg);
                }
                p.calling += 1;
                p.calling_bytes += size;
                Usage::add(&p.user.pending_calls, 1);
                Usage::add(&p.user.pending_bytes, size);
                (p.instance, p.creds.caller())
            }
            None => return,
        };
        self.pending_bytes += size;
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
        };
        self.route(call, now);
    }

    /// Answers a call that arrived with a deadline already past (timeout
    /// 0): `NoSuchService` if it may not wait and nobody holds the name,
    /// else a timeout that says whether a service held the name.
    fn expired_on_arrival(&mut self, peer: PeerId, id: u64, service: &str, call_flags: u32) {
        if self.names.is_held(service) {
            let msg = format!(
                "the call to {service:?} arrived with its deadline already passed (timeout 0)"
            );
            return self.result_error(peer, id, ErrorCode::Timeout, &msg);
        }
        let (code, msg) = if call_flags & flags::NO_WAIT != 0 {
            let msg = format!("no service is registered under the name {service:?}");
            (ErrorCode::NoSuchService, msg)
        } else {
            let msg = format!(
                "no service registered the name {service:?} before the deadline (timeout 0)"
            );
            (ErrorCode::TimeoutNoService, msg)
        };
        self.result_error(peer, id, code, &msg);
    }

    /// A call to the broker's own service, answered at once.
    fn call_builtin(&mut self, peer: PeerId, id: u64, method: &str, payload: &[u8]) {
        if let Some(p) = self.peers.get_mut(peer) {
            p.calls_made += 1;
        }
        let started = Instant::now();
        let (mut code, mut message, mut payload) =
            crate::builtin::handle(self, peer, method, payload);
        // An answer the caller could not receive (a list of every name of
        // thousands of connections) is refused instead.
        let max = self.config.max_message_size as usize;
        if payload.len() + message.len() + 64 > max {
            code = Some(ErrorCode::LimitExceeded);
            message = format!(
                "the answer of zrpcd.{method} ({} bytes) exceeds --max-message-size ({max})",
                payload.len()
            );
            payload = bytes::Bytes::new();
        }
        if code == Some(ErrorCode::AccessDenied) {
            self.log_refusal(peer, &message);
        }
        let env = Envelope::Result {
            id,
            code,
            message: &message,
        };
        self.send(peer, &env, Payload::Shared(&payload));
        match code {
            None => self.stats.calls_ok += 1,
            Some(c) => self.stats.error(c),
        }
        let s = self.stats.broker_service();
        s.answered += 1;
        s.latency.record(started.elapsed());
    }

    /// Re-routes a pending call (re-delivery, or its name appeared), with
    /// what is left of its deadline.
    pub(crate) fn dispatch(&mut self, bid: u64, now: Instant) {
        let Some(p) = self.pending.get(bid) else {
            return;
        };
        let (service, method) = self.pending.names_rc(p);
        let payload = p.payload.to_bytes();
        let timeout_ms = self
            .pending
            .deadline(bid)
            .map(|d| d.saturating_duration_since(now).as_millis() as u64);
        let call = RouteCall {
            bid,
            service: &service,
            method: &method,
            payload: Payload::Shared(&payload),
            timeout_ms,
            caller_ident: None,
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
        } = call;
        let Some(p) = self.pending.get(bid) else {
            return;
        };
        let (caller, caller_call, call_flags) = (p.caller, p.caller_call, p.flags);
        let peers = &self.peers;
        let target = self.names.pick(service, |id| {
            peers.get(id).map_or(u32::MAX, |p| p.outstanding)
        });
        let Some(target) = target else {
            if call_flags & flags::NO_WAIT != 0 {
                let msg = format!("no service is registered under the name {service:?}");
                return self.finish(bid, Outcome::Error(ErrorCode::NoSuchService, msg), now);
            }
            self.names.park(service, bid);
            if let Some(p) = self.pending.get_mut(bid) {
                p.set_stage(Stage::Parked);
            }
            return;
        };
        let max_queued = self.config.max_queued_bytes;
        let (caller_instance, caller_id) = caller_ident.unwrap_or_else(|| {
            self.peers
                .get(caller)
                .map_or((0, Caller::default()), |p| (p.instance, p.creds.caller()))
        });
        let Some(t) = self.peers.get_mut(target) else {
            return;
        };
        let queued = t.io.queue.borrow().len_bytes();
        if t.user.limited() && t.user.queued_bytes.get() + payload.len() > self.quota.queued_bytes {
            let msg = format!(
                "the services of uid {} do not read their requests ({} bytes queued, more than its per-user quota: queued_bytes in [quota] of the policy)",
                t.creds.uid,
                t.user.queued_bytes.get()
            );
            self.log_refusal(target, &msg);
            return self.finish(bid, Outcome::Error(ErrorCode::LimitExceeded, msg), now);
        }
        if queued > max_queued {
            let msg = format!(
                "service {service:?} is not reading its requests ({queued} bytes queued, limit --max-queued-bytes)"
            );
            self.log_refusal(target, &msg);
            return self.finish(bid, Outcome::Error(ErrorCode::LimitExceeded, msg), now);
        }
        let env = Envelope::Request {
            id: bid,
            service,
            method,
            timeout_ms,
            caller_instance,
            caller_call,
            caller: Some(caller_id),
        };
        // Requests written to it and not answered yet.
        let working = t
            .outstanding
            .saturating_sub(t.io.queue.borrow().queued_frames());
        let busy = working >= crate::queue::FLUSH_EVERY_FRAMES;
        t.outstanding += 1;
        self.out.enqueue_for(&t.io, &env, payload, busy);
        if let Some(p) = self.pending.get_mut(bid) {
            p.set_stage(Stage::Delivered(target));
        }
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
        match p.stage() {
            Stage::Delivered(svc) => {
                let mut cancel = false;
                if let Some(s) = self.peers.get_mut(svc) {
                    s.outstanding = s.outstanding.saturating_sub(1);
                    if replied {
                        s.served += 1;
                    } else {
                        s.failed += 1;
                        cancel = cancel_service;
                    }
                }
                if cancel {
                    self.send(svc, &Envelope::Cancel { id: bid }, Payload::EMPTY);
                }
            }
            Stage::Parked => self.names.unpark(service, bid),
        }
        let size = p.payload.len();
        self.pending_bytes -= size;
        if matches!(outcome, Outcome::CallerGone | Outcome::CallerLeft) {
            // (otherwise `send_result` releases the call, in the same lookup)
            if let Some(c) = self.peers.get_mut(p.caller) {
                c.calling = c.calling.saturating_sub(1);
                c.calling_bytes = c.calling_bytes.saturating_sub(size);
                Usage::sub(&c.user.pending_calls, 1);
                Usage::sub(&c.user.pending_bytes, size);
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
            let event = CallEvent {
                caller_pid: self.peers.get(p.caller).map_or(0, |c| c.creds.pid),
                caller: p.caller,
                service,
                method: &removed.method,
                size: p.payload.len(),
                reply_size,
                latency: elapsed,
                outcome: outcome_name,
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
                let s = self.stats.service_in(stats_slot, service);
                s.answered += 1;
                if code.is_some() {
                    s.errors += 1;
                }
                s.latency.record(elapsed);
            }
            Outcome::Error(code, message) => {
                let env = Envelope::Result {
                    id: p.caller_call,
                    code: Some(code),
                    message: &message,
                };
                self.send_result(p.caller, size, &env, Payload::EMPTY);
                self.stats.error(code);
                self.stats.service_in(stats_slot, service).errors += 1;
                tracing::debug!(bid, service, %code, %message, "call failed");
            }
            Outcome::CallerGone | Outcome::CallerLeft => {}
        }
    }

    /// Sends an event to every monitor that wants it.
    fn emit(&mut self, event: &CallEvent<'_>) {
        let payload = monitor::encode(event);
        let mut targets = Vec::new();
        for m in &mut self.monitors {
            if m.peer != event.caller && m.wants(event.service) {
                m.seq += 1;
                targets.push((m.peer, m.seq));
            }
        }
        for (peer, seq) in targets {
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
        c.calling = c.calling.saturating_sub(1);
        c.calling_bytes = c.calling_bytes.saturating_sub(arg_size);
        Usage::sub(&c.user.pending_calls, 1);
        Usage::sub(&c.user.pending_bytes, arg_size);
        self.out.enqueue(&c.io, env, payload);
        let max = self.config.max_queued_bytes;
        if c.io.queue.borrow().len_bytes() > max
            || (c.user.limited() && c.user.queued_bytes.get() > self.quota.queued_bytes)
        {
            self.check_backlog(caller, max);
        }
    }

    /// Handles a service's answer.
    fn on_reply(
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
            }
        }
    }

    /// A call's deadline passed.
    pub fn on_timeout(&mut self, bid: u64) {
        let Some(p) = self.pending.get(bid) else {
            return;
        };
        let (service, method) = self.pending.names(p);
        let (code, msg) = match p.stage() {
            Stage::Parked => (
                ErrorCode::TimeoutNoService,
                format!("no service registered the name {service:?} before the deadline"),
            ),
            Stage::Delivered(_) => (
                ErrorCode::Timeout,
                format!("service {service:?} did not answer {method:?} before the deadline"),
            ),
        };
        self.finish(bid, Outcome::Error(code, msg), Instant::now());
    }
}
