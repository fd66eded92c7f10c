//! What the broker answers itself, not a service: errors for calls it
//! refuses (`result_error`), its built-in methods (`zrpcd.*`,
//! [`crate::builtin`]), and deadlines, on arrival (timeout 0) or in
//! flight. The call path that gets here is in `calls.rs`.

use std::time::Instant;

use zrpc_proto::{flags, Envelope, ErrorCode};

use super::{Broker, Outcome};
use crate::payload::Payload;
use crate::peers::PeerId;
use crate::pending::Stage;

/// Bytes of a message left for the `Result` envelope around a built-in
/// method's answer: the answer's payload may take the rest of
/// `--max-message-size`.
const ANSWER_HEADROOM: usize = 64;

impl Broker {
    /// Answers call `id` of `peer` with an error (logged if a refusal).
    pub(super) fn result_error(&mut self, peer: PeerId, id: u64, code: ErrorCode, message: &str) {
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

    /// Answers a call that arrived with a deadline already past (timeout
    /// 0): `NoSuchService` if it may not wait and nobody holds the name,
    /// else a timeout that says whether a service held the name.
    pub(super) fn expired_on_arrival(
        &mut self,
        peer: PeerId,
        id: u64,
        service: &str,
        call_flags: u32,
    ) {
        // The resubmission of a call its caller left while an instance had
        // it (an orphan): that instance may have run it, or still runs it
        // (it is cancelled now: the call is over), so the answer must not
        // say that it never ran, whoever holds the name now.
        let orphan = match self.peers.get(peer) {
            Some(p) if !self.orphans.is_empty() => {
                let key = (p.creds().caller().uid, p.instance(), id);
                self.orphans.adopt(key)
            }
            _ => None,
        };
        if let Some(o) = orphan {
            self.cancel_orphan(&o);
            let msg = format!(
                "the call to {service:?} was sent again with its deadline already passed (timeout 0); an instance had it before (it may have run)"
            );
            return self.result_error(peer, id, ErrorCode::Timeout, &msg);
        }
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
    pub(super) fn call_builtin(&mut self, peer: PeerId, id: u64, method: &str, payload: &[u8]) {
        if let Some(p) = self.peers.get_mut(peer) {
            p.count_call();
        }
        let started = Instant::now();
        // The bridge lists the names to export every 250 ms, page by page,
        // as its configured uid (nobody by default): a local user of that
        // uid must not starve it of its introspection allowance.
        #[cfg(feature = "nats")]
        let metered = self.bridge_peer() != Some(peer);
        #[cfg(not(feature = "nats"))]
        let metered = true;
        let view = crate::builtin::View {
            caller: peer,
            peers: &self.peers,
            names: &self.names,
            pending: &self.pending,
            orphans: self.orphans.len(),
            queued_total: self.users.queued_total(),
            fds_held: self.fds_total.get(),
            fds_in_flight: self.fd_accounts.in_flight.get(),
            lingering: self.lingering.len(),
            round_waits: self.rounds.waits(),
            open_connections: self.users.open_connections(),
            stats: &self.stats,
            policy: &self.config.policy,
            monitors: &mut self.monitors,
            stats_cache: &mut self.stats_cache,
            started: self.started,
            now: started,
            users: &mut self.users,
            introspection_per_second: if metered {
                self.quota.introspection_per_second
            } else {
                0
            },
            // Room for the envelope (see the check below).
            budget: (self.config.max_message_size as usize).saturating_sub(ANSWER_HEADROOM),
            max_monitor_names: self.config.max_monitor_names,
            #[cfg(feature = "nats")]
            bridge: self.bridge.as_ref().map(|(p, c)| (*p, &**c)),
        };
        let (mut code, mut message, mut payload) = crate::builtin::handle(view, method, payload);
        // An answer the caller could not receive is refused instead (the
        // paged methods keep within the budget: only a single entry larger
        // than a message, crate::paging, comes here).
        let max = self.config.max_message_size as usize;
        if payload.len() + message.len() + ANSWER_HEADROOM > max {
            code = Some(ErrorCode::LimitExceeded);
            message = format!(
                "the answer of zrpcd.{method} ({} bytes) exceeds --max-message-size ({max})",
                payload.len()
            );
            payload = bytes::Bytes::new();
        }
        if matches!(
            code,
            Some(ErrorCode::AccessDenied | ErrorCode::LimitExceeded)
        ) {
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
        let now = Instant::now();
        self.stats
            .broker_service()
            .answered(now.saturating_duration_since(started), false, now);
    }

    /// A call's deadline passed.
    pub fn on_timeout(&mut self, bid: u64) {
        let Some(p) = self.pending.get(bid) else {
            return;
        };
        let (service, method) = self.pending.names(p);
        let (code, msg) = match p.stage() {
            // `TimeoutNoService` says the call never ran: not so for a call
            // whose instance disconnected while it had it.
            Stage::Parked if p.was_delivered() => (
                ErrorCode::Timeout,
                format!(
                    "the service instance that had {method:?} disconnected or gave up the name, and no instance of {service:?} took the call over before the deadline (the call may have run)"
                ),
            ),
            // Held back while every instance had its window of calls in
            // hand: never delivered, but a service held the name.
            Stage::Parked if self.names.is_held(service) => (
                ErrorCode::Timeout,
                format!(
                    "every instance of {service:?} had {} calls in hand (--max-delivered-per-conn) until the deadline; {method:?} waited in the broker and was never delivered",
                    self.config.max_delivered_per_conn
                ),
            ),
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
