//! The broker: its state and the handling of every frame. Everything here
//! is synchronous: connection tasks call in with a decoded frame, and
//! frames to send are queued on the destination peers (see
//! [`crate::outbox`]).
//!
//! The state's parts are private; the connection tasks ([`crate::conn`])
//! and the server loop ([`crate::server`]) use the methods of this file.
//! The handling is split by concern, each part an `impl Broker` of its own:
//! [`calls`] (a call's way in, to its service and back: the hot path),
//! [`answers`] (what the broker answers itself: refusals, its built-in
//! methods, deadlines), [`owning`] (registering names, with the access
//! checks), [`lifecycle`] (a connection's start and end, heartbeats,
//! shutdown), [`turns`] (calls waiting on a name, for an instance or for
//! room in one, taken in turns by caller uid) and [`partial`] (bounds on
//! partly received frames).

pub mod answers;
#[cfg(feature = "nats")]
pub mod bridged;
pub mod calls;
pub mod fds;
pub mod lifecycle;
pub mod owning;
pub mod partial;
pub mod turns;

use std::rc::Rc;
use std::time::Instant;

use zrpc_proto::{Envelope, ErrorCode, Frame};

use crate::config::Config;
use crate::log::RefusalLog;
use crate::monitor::Monitors;
use crate::names::Names;
use crate::orphans::Orphans;
use crate::outbox::Outbox;
use crate::payload::Payload;
use crate::peers::{PeerId, Peers};
use crate::pending::PendingCalls;
use crate::quota::{Quota, Users};
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

/// The whole broker state: peers, names, pending calls, statistics.
///
/// Four parts are public fields because the routing tests and benchmark
/// (`tests/routing.rs`, `benches/routing.rs`) read or set them directly:
/// the settings, the pending calls, the counters and the outbox. The rest
/// is private to this module and its children.
#[derive(Debug)]
pub struct Broker {
    /// Limits and settings.
    pub config: Config,
    /// Calls in flight.
    pub pending: PendingCalls,
    /// Counters.
    pub stats: Stats,
    /// Peers with frames queued, written once per wake-up (see [`Outbox`]).
    pub out: Outbox,
    /// Live connections.
    peers: Peers,
    /// Service names.
    names: Names,
    /// When the broker started.
    started: Instant,
    /// Set once shutdown began: new calls are refused.
    shutting_down: bool,
    /// Connections watching calls (`zrpc monitor`).
    monitors: Monitors,
    /// `zrpcd.stats`' per-service rows, encoded.
    stats_cache: crate::builtin::StatsCache,
    ping_nonce: u64,
    /// Connections closed with `Fatal` (protocol errors, quotas, dead
    /// services): logged at warn at most once per interval, the rest at
    /// debug ([`crate::log`]).
    closings: RefusalLog,
    /// The first refusal of each connection: the same.
    refusals: RefusalLog,
    /// Adaptive busy polling (None: off); read batches are reported here.
    busy_poll: Option<Rc<BusyPoll>>,
    /// Users with live connections, and what each holds.
    users: Users,
    /// What one user may hold (see [`crate::quota`]).
    quota: Quota,
    /// Delivered calls whose caller left, cancelled at their service unless
    /// resubmitted within the caller's grace (see [`crate::orphans`]).
    orphans: Orphans,
    /// Names kept for their user after their last instance left (see
    /// [`crate::reserved`]).
    reserved: crate::reserved::Reserved,
    /// Whether names were registered or released since they were last
    /// saved (`Config::names_file`).
    names_changed: bool,
    /// Whether the last save failed (logged once).
    names_unsaved: bool,
    /// When the names were last saved (at most once a second, however
    /// fast they change).
    names_saved_at: Option<Instant>,
    /// The broker's thread shared out by user (see [`crate::fair`]).
    rounds: Rc<crate::fair::Rounds>,
    /// Payload descriptors the broker holds: received and kept, or queued
    /// towards peers (`--max-fds`).
    fds_total: Rc<std::cell::Cell<usize>>,
    /// The counts and limits of descriptors queued towards peers or in
    /// flight in their sockets (shared with their queues).
    fd_accounts: Rc<crate::queue::FdAccounts>,
    /// Closed connections whose peer still has descriptors to read, kept
    /// open (counted against their user) until it has read them or closed
    /// its end ([`Broker::linger`]).
    lingering: Vec<Rc<crate::queue::PeerIo>>,
    /// The NATS bridge's connection and counters (see [`bridged`]).
    #[cfg(feature = "nats")]
    bridge: Option<(PeerId, Rc<bridged::BridgeCounters>)>,
    /// The NATS bridge's place in the rounds: its own, not its uid's (a
    /// local user of that uid must not take the bridge's turns, nor the
    /// bridge a local user's).
    #[cfg(feature = "nats")]
    bridge_share: Rc<crate::fair::Share>,
    /// Moves on at each pull of waiting calls (see `turns`), so that a
    /// connection's freed slots go round its names.
    pull_turn: usize,
}

impl Broker {
    /// An empty broker.
    pub fn new(config: Config) -> Self {
        let max_stats_names = config.max_stats_names;
        // Mappings of payloads kept for peers without descriptor passing
        // share the descriptors' budget (see `payload::inline_bytes`).
        crate::payload::set_max_kept_mappings(config.max_fds);
        let quota = Quota::new(config.quota_limits(), config.policy.quota());
        let fds_total: Rc<std::cell::Cell<usize>> = Rc::default();
        let fd_accounts = Rc::new(crate::queue::FdAccounts {
            total: fds_total.clone(),
            in_flight: Default::default(),
            per_conn: config.max_fds_per_conn,
            per_user: quota.fds.into(),
            max_total: config.max_fds,
        });
        let mut reserved = crate::reserved::Reserved::new(config.name_grace, config.max_names);
        let mut loaded = false;
        // The names the last broker held or kept stay their users' for the
        // grace: the services come back to them after a restart.
        if let Some(path) = &config.names_file {
            match crate::reserved::load(path) {
                Ok(names) => {
                    let now = Instant::now();
                    for (name, uid) in &names {
                        if !config.policy.mentions(name) {
                            reserved.release(name, *uid, now, (*uid != 0).then_some(quota.names));
                        }
                    }
                    // Saved again (and so dropped once their grace ends:
                    // a broker restarting in a loop must not keep them for
                    // ever).
                    loaded = !names.is_empty();
                    if loaded {
                        tracing::info!(names = names.len(), path = %path.display(), "names kept for their users from the last run");
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, path = %path.display(), "cannot read the names of the last run; none kept")
                }
            }
        }
        let round_quantum = config.round_quantum;
        Broker {
            busy_poll: BusyPoll::new_or_off(config.busy_poll),
            config,
            peers: Peers::default(),
            names: Names::default(),
            pending: PendingCalls::default(),
            stats: {
                let mut s = Stats::new(max_stats_names);
                s.set_max_per_uid(quota.stats_names);
                s
            },
            started: Instant::now(),
            shutting_down: false,
            monitors: Monitors::default(),
            stats_cache: crate::builtin::StatsCache::default(),
            ping_nonce: 0,
            closings: RefusalLog::default(),
            refusals: RefusalLog::default(),
            out: Outbox::default(),
            users: Users::default(),
            quota,
            orphans: Orphans::default(),
            reserved,
            names_changed: loaded,
            names_unsaved: false,
            names_saved_at: None,
            rounds: Rc::new(crate::fair::Rounds::new(round_quantum)),
            pull_turn: 0,
            fds_total,
            fd_accounts,
            lingering: Vec::new(),
            #[cfg(feature = "nats")]
            bridge: None,
            #[cfg(feature = "nats")]
            bridge_share: Rc::default(),
        }
    }

    /// Calls whose caller left while a service ran them (read only).
    pub fn orphans(&self) -> &Orphans {
        &self.orphans
    }

    /// Cancels, at their services, up to `max` of the orphaned calls whose
    /// caller did not come back within its grace (see [`crate::orphans`]);
    /// returns how many.
    pub fn cancel_orphans(&mut self, now: Instant, max: usize) -> usize {
        let expired = self.orphans.expired(now, max);
        let n = expired.len();
        for o in expired {
            tracing::debug!(
                service = o.service,
                request = o.request,
                "the caller did not come back; cancelling its call at the service"
            );
            self.cancel_orphan(&o);
            // Its place in the window goes to a call waiting for one.
            if self.names.waiting() > 0 && self.peers.get(o.service).is_some() {
                self.pull_waiting(o.service, now);
            }
        }
        n
    }

    /// Cancels an orphaned call (and the deliveries it adopted) at the
    /// service running it, if that service is still connected. The place
    /// it took in the service's window is for the caller to hand on
    /// ([`Broker::pull_waiting`]) once it is done changing the tables.
    pub(crate) fn cancel_orphan(&mut self, o: &crate::orphans::Orphan) {
        if o.service != crate::orphans::NO_SERVICE && self.peers.get(o.service).is_some() {
            for id in o.requests() {
                self.send(o.service, &Envelope::Cancel { id }, Payload::EMPTY);
            }
        }
    }

    /// Live connections (read only).
    pub fn peers(&self) -> &Peers {
        &self.peers
    }

    /// Service names (read only).
    pub fn names(&self) -> &Names {
        &self.names
    }

    /// Users with live connections, and what each holds (read only).
    pub fn users(&self) -> &Users {
        &self.users
    }

    /// Adaptive busy polling, if on.
    pub fn busy_poll(&self) -> Option<&Rc<BusyPoll>> {
        self.busy_poll.as_ref()
    }

    /// Whether an event of `peer`'s user that changes who holds a name is
    /// logged at info (see [`Users::log_name_event`]).
    pub(crate) fn name_event_at_info(&mut self, peer: PeerId) -> bool {
        match self.peers.get(peer).map(|p| p.creds().uid) {
            Some(uid) => self.name_event_of_uid_at_info(uid),
            None => false,
        }
    }

    /// Whether an event of `uid` that changes who holds a name is logged
    /// at info (see [`Users::log_name_event`]); if the user's events were
    /// logged at debug only since its last one at info, a line says how
    /// many first.
    pub(crate) fn name_event_of_uid_at_info(&mut self, uid: u32) -> bool {
        let per_second = self.config.name_logs_per_second;
        match self.users.log_name_event(uid, Instant::now(), per_second) {
            Some(0) => true,
            Some(quiet) => {
                tracing::info!(
                    uid,
                    "{quiet} more name events of this user were logged at debug level only (--name-logs-per-second)"
                );
                true
            }
            None => false,
        }
    }

    /// Forgets the users nothing refers to any more (see [`Users::collect`]).
    pub fn collect_users(&mut self) {
        self.users.collect(Instant::now());
    }

    /// Puts a reloaded access policy in force: its quota from now on, and
    /// the monitor subscriptions it no longer allows end now, as do the
    /// holds on names its `[[own]]` rules reserve for others (a name taken
    /// before the rule existed is not kept by the squatter). Connections
    /// stay.
    pub fn set_policy(&mut self, policy: crate::policy::Policy) {
        self.quota = Quota::new(self.config.quota_limits(), policy.quota());
        self.fd_accounts.per_user.set(self.quota.fds);
        self.stats.set_max_per_uid(self.quota.stats_names);
        self.config.policy = policy;
        let (peers, policy) = (&self.peers, &self.config.policy);
        self.monitors.retain(|m| {
            peers.get(m.peer).is_some_and(|p| {
                policy.may_introspect(&p.identity(), crate::policy::Introspection::Monitor)
            })
        });
        self.release_reserved_names();
        self.deny_waiting_calls();
    }

    /// Fails with `AccessDenied` the calls waiting for their name (parked,
    /// or held back for a busy service) that the policy, just reloaded, no
    /// longer lets their callers make: checked when they came, they would
    /// be delivered under the old rules (a user expecting a rule could park
    /// calls ahead of it). A scan of the pending calls, on a reload only.
    fn deny_waiting_calls(&mut self) {
        if !self.config.policy.guards_calls() {
            return;
        }
        let waiting = self
            .pending
            .ids_where(|p| p.stage() == crate::pending::Stage::Parked);
        let mut denied = Vec::new();
        for id in waiting {
            let Some(p) = self.pending.get(id) else {
                continue;
            };
            let Some(caller) = self.peers.get(p.caller) else {
                continue;
            };
            let (service, method) = self.pending.names(p);
            if let Err(msg) = self
                .config
                .policy
                .may_call(&caller.identity(), service, method)
            {
                denied.push((id, msg));
            }
        }
        let now = Instant::now();
        for (id, msg) in denied {
            self.finish(id, Outcome::Error(ErrorCode::AccessDenied, msg), now);
        }
    }

    /// Takes every name from the connections the policy's `[[own]]` rules
    /// no longer let own it (the service is not told: calls to the name
    /// go to the allowed holders, or wait for one to register). The NATS
    /// bridge's imported names are left to its configuration.
    fn release_reserved_names(&mut self) {
        if !self.config.policy.reserves_names() {
            return;
        }
        #[cfg(feature = "nats")]
        let bridge = self.bridge.as_ref().map(|(p, _)| *p);
        #[cfg(not(feature = "nats"))]
        let bridge: Option<PeerId> = None;
        let policy = &self.config.policy;
        let mut lost: Vec<(PeerId, Box<str>)> = Vec::new();
        for p in self.peers.iter().filter(|p| Some(p.id()) != bridge) {
            for name in p.names() {
                let shared = self.names.is_shared(name);
                if policy.may_own(&p.identity(), name, shared).is_err() {
                    lost.push((p.id(), name.clone()));
                }
            }
        }
        for (peer, name) in lost {
            if !self.names.unregister(&name, peer) {
                continue;
            }
            self.peers.remove_name(peer, &name);
            self.names_changed = true;
            if !self.names.is_held(&name) {
                self.stats.unregistered(&name);
                self.no_instance_left(&name, Instant::now());
            }
            tracing::warn!(
                peer,
                name = &*name,
                "the reloaded policy reserves the name for others: taken from this connection"
            );
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
        self.out.enqueue(p.io(), env, payload);
        let max = self.config.max_queued_bytes;
        let limit = if p.is_serving() {
            max.saturating_mul(2)
        } else {
            max
        };
        if lifecycle::over_backlog(p, limit, &self.quota) {
            self.check_backlog(peer, limit);
        }
        true
    }

    /// Writes out every peer that got frames since the last flush: one
    /// vectored write per peer (called by the flusher task, and wherever a
    /// change must go out at once).
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
        let ready = self.peers.get(peer).is_some_and(|p| p.is_ready());
        if !ready {
            return match env {
                Envelope::Hello {
                    version,
                    instance,
                    agent,
                    caps,
                } => self.on_hello(peer, version, instance, agent, caps),
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
        let (uid, pid) = (p.creds().uid, p.creds().pid);
        // A connection's first refusal, unless one was logged at warn
        // lately: a user reconnecting in a loop must not flood the log.
        let warn = if p.first_refusal() {
            self.refusals.warn_now(Instant::now())
        } else {
            None
        };
        if let Some(0) = warn {
            tracing::warn!(
                peer,
                uid,
                pid,
                message,
                "refused (further refusals on this connection are logged at debug level)"
            );
        } else if let Some(quiet) = warn {
            tracing::warn!(
                peer,
                uid,
                pid,
                message,
                "refused (further refusals on this connection are logged at debug level, as were {quiet} refusals of other connections since the last such warning)"
            );
        } else {
            tracing::debug!(peer, uid, pid, message, "refused");
        }
    }
}

/// The narrow interface of a connection task ([`crate::conn`]): one read
/// batch at a time.
impl Broker {
    /// A read batch of `peer` begins at `now`: the peer was seen, and the
    /// frames it hands in belong to one batch of the outbox. False if the
    /// broker dropped the peer (the connection is to end).
    pub fn begin_read_batch(&mut self, peer: PeerId, now: Instant) -> bool {
        match self.peers.get_mut(peer) {
            Some(p) => p.saw(now),
            None => return false,
        }
        self.out.begin_batch();
        true
    }

    /// The frames of a read batch of `read_bytes` bytes are handled: the
    /// peers they queued frames to are written after this wake-up's other
    /// reads (see [`Outbox::end_batch`]), and busy polling hears of the
    /// batch.
    pub fn end_read_batch(&mut self, now: Instant, read_bytes: usize) {
        self.out.end_batch();
        if let Some(bp) = &self.busy_poll {
            bp.batch(now, read_bytes);
        }
    }

    /// The rounds in which the broker's thread is shared out by user
    /// ([`crate::fair`]), and `peer`'s user's place in them (none for root,
    /// which is not held to them; the broker's own NATS bridge has a place
    /// of its own, as one more user: before, it was not held to them, and
    /// a NATS publisher's requests made another user's calls wait for
    /// seconds, red-team pass 7).
    pub fn rounds_for(
        &self,
        peer: PeerId,
    ) -> (Rc<crate::fair::Rounds>, Option<Rc<crate::fair::Share>>) {
        #[cfg(feature = "nats")]
        if self.is_bridge(peer) {
            return (self.rounds.clone(), Some(self.bridge_share.clone()));
        }
        let share = self
            .peers
            .get(peer)
            .filter(|p| p.user().limited())
            .map(|p| p.user().share().clone());
        (self.rounds.clone(), share)
    }

    /// Whether `peer` sent its `Hello`.
    pub fn is_ready(&self, peer: PeerId) -> bool {
        self.peers.get(peer).is_some_and(|p| p.is_ready())
    }

    /// Sends `Fatal` to `peer`, closes it and writes it out now.
    pub fn close_with(&mut self, peer: PeerId, fatal: &Fatal) {
        self.fatal(peer, fatal);
        self.flush();
    }
}
