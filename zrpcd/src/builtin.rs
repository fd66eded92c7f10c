//! The broker's own service, callable as `zrpcd.<method>` like any other,
//! and built like any service: a table of methods ([`METHODS`]), each with
//! its handler and its description, from which the answer to
//! `zrpc.describe` is generated (in the format every `zrpc-service`
//! service uses). Handlers see the broker's state through a [`View`]: the
//! registries they read and the monitor list they add to, not the broker.
//!
//! Methods (the payload is ignored unless said otherwise):
//! - `ping`: returns `"pong"`.
//! - `list`: the registered names, by name: `[{name, instances:
//!   [conn_id...]}]`.
//! - `peers`: every connection, by conn_id: `[{conn_id, pid, uid, gid,
//!   agent, names, connected_s, outstanding, calling, served, failed,
//!   calls_made}]`.
//!
//!   `list` and `peers` take a payload: nil for the whole array (refused
//!   with `LimitExceeded` if it passes `--max-message-size`), or
//!   `{"after": KEY, "limit": N}` (both optional) for a page, answered as
//!   `{"entries": [...], "next": KEY or nil}`: KEY is a name for `list`, a
//!   conn_id for `peers`; pass `next` as `after` until it is nil (see
//!   [`crate::paging`]). Either way the broker encodes at most one
//!   message's worth of entries per call.
//! - `stats`: broker-wide counters and per-service latency percentiles.
//! - `monitor`: payload nil (all services) or an array of service names;
//!   from then on the connection receives an `Event` frame for each finished
//!   call (see [`crate::monitor`]) until it disconnects. Returns `true`.
//! - `zrpc.describe`: the methods above.
//!
//! Calls to `list`, `peers` and `stats`, whose answers grow with the broker,
//! count against the caller's `introspection_per_second` quota
//! ([`Method::metered`]), one more for each 64 KiB of the answer past the
//! first ([`crate::quota::Users::charge_introspection`]).

use std::time::Instant;

use bytes::Bytes;
use rmpv::Value;
use zrpc_proto::ErrorCode;

use crate::monitor::Monitors;
use crate::names::Names;
use crate::paging;
use crate::peers::{Peer, PeerId, Peers};
use crate::pending::PendingCalls;
use crate::policy::{Introspection, Policy};
use crate::quota::Users;
use crate::rate::{Gcra, Rate};
use crate::stats::{Histogram, ServiceStats, Stats};

/// What the built-in methods see of the broker: the registries they read,
/// and the monitor list (`monitor` subscribes the caller).
#[derive(Debug)]
pub struct View<'a> {
    /// The calling connection.
    pub caller: PeerId,
    /// Live connections.
    pub peers: &'a Peers,
    /// Service names.
    pub names: &'a Names,
    /// Calls in flight.
    pub pending: &'a PendingCalls,
    /// Delivered calls whose caller left, kept for its grace.
    pub orphans: usize,
    /// Bytes queued unread towards all connections.
    pub queued_total: usize,
    /// Payload descriptors the broker holds (queued and in flight ones
    /// included).
    pub fds_held: usize,
    /// Payload descriptors sent to peers and not yet received.
    pub fds_in_flight: usize,
    /// Closed connections kept open until their peer has received the
    /// descriptors sent to it.
    pub lingering: usize,
    /// Rounds of the broker's thread ended early because a user had used
    /// its quantum (`crate::fair`).
    pub round_waits: u64,
    /// Sockets the broker holds open: live connections, and closed ones
    /// still flushing or lingering (what `--max-connections` bounds).
    pub open_connections: usize,
    /// Counters.
    pub stats: &'a Stats,
    /// The access policy in force.
    pub policy: &'a Policy,
    /// Connections watching calls.
    pub monitors: &'a mut Monitors,
    /// `stats`' encoded per-service rows.
    pub stats_cache: &'a mut StatsCache,
    /// When the broker started.
    pub started: Instant,
    /// When the call arrived.
    pub now: Instant,
    /// Every user's rate of calls to the metered methods ([`Method::metered`]).
    pub users: &'a mut Users,
    /// The policy's `introspection_per_second` quota for this caller (0:
    /// no limit, as for the broker's own NATS bridge).
    pub introspection_per_second: u32,
    /// Most bytes an answer's payload may take (from `--max-message-size`).
    pub budget: usize,
    /// Most names in a `monitor` filter (`--max-monitor-names`).
    pub max_monitor_names: usize,
    /// The NATS bridge's connection and counters, if it runs.
    #[cfg(feature = "nats")]
    pub bridge: Option<(PeerId, &'a crate::broker::bridged::BridgeCounters)>,
}

impl View<'_> {
    fn caller(&self) -> Option<&Peer> {
        self.peers.get(self.caller)
    }

    /// Whether the policy lets the caller use `what`.
    fn allowed(&self, what: Introspection) -> bool {
        self.caller()
            .is_some_and(|p| self.policy.may_introspect(&p.identity(), what))
    }
}

/// A method's answer: its result, encoded, or an error code and message.
type Answer = Result<Bytes, (ErrorCode, String)>;

/// One parameter of a method, as `zrpc.describe` shows it.
#[derive(Debug)]
pub struct Param {
    /// Parameter name.
    pub name: &'static str,
    /// Its type, as the Rust type a `zrpc-service` method would take.
    pub ty: &'static str,
}

/// One method of the broker's service.
#[derive(Debug)]
pub struct Method {
    /// Method name.
    pub name: &'static str,
    /// Parameters.
    pub params: &'static [Param],
    /// What it returns, as a Rust-like type.
    pub returns: &'static str,
    /// What it does.
    pub doc: &'static str,
    /// The right a caller needs (else `AccessDenied`); `None`: anyone may
    /// call it (the handler may still show less to some callers).
    pub requires: Option<Introspection>,
    /// Its answer grows with the broker: calls count against the caller's
    /// `introspection_per_second` quota ([`crate::quota::Users::introspect`]).
    pub metered: bool,
    handler: fn(&mut View<'_>, &[u8]) -> Answer,
}

/// The methods of the broker's service, in the order `zrpc.describe` lists
/// them.
pub const METHODS: &[Method] = &[
    Method {
        name: "ping",
        params: &[],
        returns: "String",
        doc: "Returns \"pong\".",
        requires: None,
        metered: false,
        handler: |_, _| Ok(encode(&Value::from("pong"))),
    },
    Method {
        name: "list",
        params: &[PAGE],
        returns: "Vec<{name, instances}> | {entries: Vec<{name, instances}>, next: Option<String>}",
        doc: "The registered service names with the connection ids of their instances, sorted by name. Payload nil: all of them (LimitExceeded if they pass --max-message-size); {after, limit}: the page after the name `after`, and `next` to pass as `after` for the following one (nil on the last).",
        requires: None,
        metered: true,
        handler: list,
    },
    Method {
        name: "peers",
        params: &[PAGE],
        returns: "Vec<{conn_id, pid, uid, gid, agent, names, connected_s, outstanding, calling, served, failed, calls_made}> | {entries: Vec<...>, next: Option<u64>}",
        doc: "Every connection, by conn_id; pid, uid and gid come from the socket (SO_PEERCRED). Payload nil: all of them (LimitExceeded if they pass --max-message-size); {after, limit}: the page after the conn_id `after`, and `next` to pass as `after` for the following one (nil on the last).",
        requires: None,
        metered: true,
        handler: peers,
    },
    Method {
        name: "stats",
        params: &[],
        returns: "{uptime_s, connections, calls, timeouts, errors, services, ...}",
        doc: "Broker-wide counters and per-service latency: answered, errors, p50_us/p90_us/p99_us (interpolated within 1/8-octave buckets, within 12.5 %), sum_us, buckets ([le_us, cumulative count]); the same over the last minute under recent.",
        requires: Some(Introspection::Stats),
        metered: true,
        handler: |v, _| stats(v),
    },
    Method {
        name: "monitor",
        params: &[Param {
            name: "services",
            ty: "Option<Vec<String>>",
        }],
        returns: "bool",
        doc: "Subscribes this connection to Event frames, one per finished call (all services, or only these). Use `zrpc monitor`.",
        requires: Some(Introspection::Monitor),
        metered: false,
        handler: subscribe,
    },
];

/// The optional payload of `list` and `peers` ([`crate::paging`]).
const PAGE: Param = Param {
    name: "page",
    ty: "Option<{after: Option<name | conn_id>, limit: Option<u32>}>",
};

/// The method every `zrpc-service` service answers with its description.
const DESCRIBE: &str = "zrpc.describe";

fn map(pairs: Vec<(&str, Value)>) -> Value {
    Value::Map(
        pairs
            .into_iter()
            .map(|(k, v)| (Value::from(k), v))
            .collect(),
    )
}

fn encode(v: &Value) -> Bytes {
    let mut out = Vec::with_capacity(256);
    // Writing to a Vec cannot fail.
    let _ = rmpv::encode::write_value(&mut out, v);
    out.into()
}

/// Answers a call to the broker's service. Returns the error code (None on
/// success), the error message and the payload.
pub fn handle(
    mut view: View<'_>,
    method: &str,
    payload: &[u8],
) -> (Option<ErrorCode>, String, Bytes) {
    let answer = if method == DESCRIBE {
        Ok(encode(&describe()))
    } else {
        match METHODS.iter().find(|m| m.name == method) {
            Some(m) => call(&mut view, m, payload),
            None => Err((ErrorCode::NoSuchMethod, no_such_method(method))),
        }
    };
    match answer {
        Ok(bytes) => (None, String::new(), bytes),
        Err((code, message)) => (Some(code), message, Bytes::new()),
    }
}

/// Calls `m` after checking the caller's right to.
fn call(view: &mut View<'_>, m: &Method, payload: &[u8]) -> Answer {
    if let Some(what) = m.requires {
        if !view.allowed(what) {
            let uid = view.caller().map_or(u32::MAX, |p| p.creds().uid);
            let msg = format!(
                "{} does not allow uid {uid} to use zrpcd.{}",
                view.policy.source(),
                m.name
            );
            return Err((ErrorCode::AccessDenied, msg));
        }
    }
    if m.metered {
        let uid = view.caller().map_or(u32::MAX, |p| p.creds().uid);
        let n = view.introspection_per_second;
        if !view.users.introspect(uid, view.now, n) {
            let msg = format!(
                "uid {uid} called zrpcd.list, zrpcd.peers and zrpcd.stats more than {n} times in a second (each 64 KiB of an answer past the first counts as a call more), past its per-user quota (introspection_per_second in [quota] of {}); call again later, or ask for smaller pages",
                view.policy.source()
            );
            return Err((ErrorCode::LimitExceeded, msg));
        }
        let answer = (m.handler)(view, payload);
        let size = match &answer {
            Ok(bytes) => bytes.len(),
            // A whole answer found too large once a message's worth of it
            // was encoded (`paging`).
            Err((ErrorCode::LimitExceeded, _)) => view.budget,
            Err(_) => 0,
        };
        view.users.charge_introspection(uid, size, n);
        return answer;
    }
    (m.handler)(view, payload)
}

fn no_such_method(method: &str) -> String {
    let mut known: Vec<&str> = METHODS.iter().map(|m| m.name).collect();
    known.push(DESCRIBE);
    format!(
        "service \"zrpcd\" has no method {method:?} (try {})",
        known.join(", ")
    )
}

/// The broker's own service described like any `zrpc-service` service,
/// from [`METHODS`].
fn describe() -> Value {
    let method = |m: &Method| {
        let params = m
            .params
            .iter()
            .map(|p| map(vec![("name", p.name.into()), ("type", p.ty.into())]))
            .collect();
        map(vec![
            ("name", m.name.into()),
            ("doc", m.doc.into()),
            ("params", Value::Array(params)),
            ("returns", m.returns.into()),
        ])
    };
    map(vec![
        ("service", zrpc_proto::BROKER_SERVICE.into()),
        (
            "methods",
            Value::Array(METHODS.iter().map(method).collect()),
        ),
    ])
}

fn subscribe(v: &mut View<'_>, payload: &[u8]) -> Answer {
    let filter = crate::monitor::parse_filter(payload, v.max_monitor_names)
        .map_err(|msg| (ErrorCode::BadPayload, msg))?;
    v.monitors.subscribe(v.caller, filter);
    Ok(encode(&Value::Boolean(true)))
}

/// Answers `req` from `entries` within the view's budget: the paged
/// methods' common end.
fn paged<K: paging::Key>(
    v: &View<'_>,
    req: &paging::Request<K>,
    entries: impl Iterator<Item = (K, Value)>,
) -> Answer {
    paging::answer(req, entries, v.budget).map_err(|e| (ErrorCode::LimitExceeded, e.to_string()))
}

fn bad_payload(msg: String) -> (ErrorCode, String) {
    (ErrorCode::BadPayload, msg)
}

fn list(v: &mut View<'_>, payload: &[u8]) -> Answer {
    let req = paging::parse::<String>(payload).map_err(bad_payload)?;
    #[cfg(feature = "nats")]
    let bridge = v.bridge.map(|(peer, _)| peer);
    #[cfg(not(feature = "nats"))]
    let bridge: Option<PeerId> = None;
    let entries = v
        .names
        .after(req.after().map(String::as_str))
        .map(|(name, inst)| {
            let mut entry = vec![
                ("name", Value::from(name)),
                (
                    "instances",
                    Value::Array(inst.iter().map(|i| Value::from(*i)).collect()),
                ),
            ];
            // Held by the NATS bridge: an imported name, served on
            // another host (docs/bridge.md).
            if bridge.is_some_and(|b| inst == [b]) {
                entry.push(("remote", Value::from(true)));
            }
            (name.to_owned(), map(entry))
        });
    paged(v, &req, entries)
}

/// The bridge's counters for `zrpcd.stats`, if it runs.
fn bridge_stats(v: &View<'_>) -> Option<(&'static str, Value)> {
    #[cfg(feature = "nats")]
    if let Some((_, c)) = v.bridge {
        return Some((
            "bridge",
            map(vec![
                ("imported", Value::from(c.imported.get())),
                ("imported_errors", Value::from(c.imported_errors.get())),
                ("exported", Value::from(c.exported.get())),
                ("exported_errors", Value::from(c.exported_errors.get())),
                ("cancels_sent", Value::from(c.cancels_sent.get())),
                ("cancels_received", Value::from(c.cancels_received.get())),
                ("clients_replaced", Value::from(c.clients_replaced.get())),
            ]),
        ));
    }
    let _ = v;
    None
}

fn peers(v: &mut View<'_>, payload: &[u8]) -> Answer {
    let req = paging::parse::<u64>(payload).map_err(bad_payload)?;
    // Without the right to see everyone: full entries for the caller's
    // own uid, the connection id and names only for the others.
    let only_uid =
        (!v.allowed(Introspection::Peers)).then(|| v.caller().map_or(u32::MAX, |p| p.creds().uid));
    let entries = v
        .peers
        .after(req.after().copied())
        .map(|p| (p.id(), peer(p, only_uid)));
    paged(v, &req, entries)
}

/// One entry of `peers`.
fn peer(p: &Peer, only_uid: Option<u32>) -> Value {
    let names = || Value::Array(p.names().iter().map(|n| Value::from(&**n)).collect());
    let creds = p.creds();
    if only_uid.is_some_and(|u| u != creds.uid) {
        return map(vec![("conn_id", Value::from(p.id())), ("names", names())]);
    }
    map(vec![
        ("conn_id", Value::from(p.id())),
        ("pid", Value::from(creds.pid)),
        ("uid", Value::from(creds.uid)),
        ("gid", Value::from(creds.gid)),
        ("agent", Value::from(p.agent())),
        ("names", names()),
        (
            "connected_s",
            Value::from(p.since().elapsed().as_secs_f64()),
        ),
        ("outstanding", Value::from(p.outstanding())),
        ("calling", Value::from(p.calling())),
        ("served", Value::from(p.served())),
        ("failed", Value::from(p.failed())),
        ("calls_made", Value::from(p.calls_made())),
    ])
}

/// The quantiles `stats` reports, as (key, q).
const QUANTILES: [(&str, f64); 3] = [("p50_us", 0.5), ("p90_us", 0.9), ("p99_us", 0.99)];

/// Latency figures of a histogram: the quantiles (interpolated within a
/// fine bucket, see [`Histogram::quantile_us`]), the sum, and the
/// cumulative export buckets as `[upper bound µs, calls at most that long]`.
fn latency_fields(h: &Histogram, out: &mut Vec<(&'static str, Value)>) {
    for (key, q) in QUANTILES {
        out.push((key, Value::from(h.quantile_us(q).round() as u64)));
    }
    out.push(("sum_us", Value::from(h.sum_us())));
    out.push((
        "buckets",
        Value::Array(
            h.cumulative_export()
                .map(|(le, n)| Value::Array(vec![Value::from(le), Value::from(n)]))
                .collect(),
        ),
    ));
}

/// One row of `stats`' `services`: since start, and `recent` (the last
/// minute).
fn service_stats(st: &ServiceStats, now_epoch: u64) -> Value {
    let mut fields = vec![
        ("answered", Value::from(st.answered)),
        ("errors", Value::from(st.errors)),
    ];
    latency_fields(&st.latency, &mut fields);
    let recent = st.recent.view(now_epoch);
    let mut r = vec![
        (
            "window_s",
            Value::from(crate::stats::SLOT.as_secs() * crate::stats::SLOTS as u64),
        ),
        ("answered", Value::from(recent.latency.count())),
        ("errors", Value::from(recent.errors)),
    ];
    latency_fields(&recent.latency, &mut r);
    fields.push(("recent", map(r)));
    map(fields)
}

/// The per-service rows of `zrpcd.stats` are encoded again, when they
/// changed, at most [`STATS_ROWS_BURST`] times at once, then at most once
/// per this interval, whoever asks and however often. See [`StatsCache`].
pub const STATS_ROWS_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// See [`STATS_ROWS_EVERY`].
pub const STATS_ROWS_BURST: u32 = 8;

const ROWS_RATE: Rate = Rate {
    every: STATS_ROWS_EVERY,
    burst: STATS_ROWS_BURST,
};

/// The per-service rows of `zrpcd.stats` (all but the broker's own),
/// encoded once and shared by the answers that follow.
///
/// Each row carries two histograms and takes some 400 bytes;
/// `--max-stats-names` rows (1,024 by default) took 20-36 ms of the
/// broker's only thread to encode, and rows stay after their names are
/// unregistered: any user could register many names once, then call
/// `zrpcd.stats` in a loop from many connections and starve every other
/// user. The rows are now encoded again only when they changed
/// ([`Stats::version`]) or the last-minute window moved on, and then at
/// a bounded rate ([`STATS_ROWS_EVERY`], [`STATS_ROWS_BURST`]): past it,
/// an answer's rows may be up to that interval older than its broker-wide
/// counters, which are always current, as is the broker's own row. The
/// answer is the same for every caller allowed to see it.
#[derive(Debug, Default)]
pub struct StatsCache {
    /// The encoded rows (map entries, name then row, by name), without the
    /// broker's own; it goes at `split`.
    rows: Vec<u8>,
    split: usize,
    count: usize,
    /// What they were encoded from, and when.
    version: u64,
    epoch: u64,
    /// The rate limit of encodings (`ROWS_RATE`); started once the rows
    /// were encoded.
    limit: Gcra,
    /// Times the rows were encoded (`stats_rows_encoded` in the answer).
    pub encoded: u64,
    /// Answers that reused them (`stats_rows_reused`).
    pub reused: u64,
}

impl StatsCache {
    /// Encodes the rows again if they are out of date and the rate limit
    /// allows it at `now`.
    fn refresh(&mut self, s: &Stats, now: Instant, now_epoch: u64) {
        let current =
            self.limit.started() && self.version == s.version() && self.epoch == now_epoch;
        if current || !self.limit.allow(now, ROWS_RATE) {
            self.reused += 1;
            return;
        }
        // The `(other)` row only once something was counted in it.
        let mut rows: Vec<_> = s
            .services
            .iter()
            .filter(|(name, _)| name != zrpc_proto::BROKER_SERVICE)
            .filter(|(name, st)| name != crate::stats::OTHER || st.answered + st.errors > 0)
            .collect();
        rows.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        self.rows.clear();
        self.split = 0;
        for (name, st) in &rows {
            // Writing to a Vec cannot fail.
            let _ = rmpv::encode::write_value(&mut self.rows, &Value::from(name.as_str()));
            let _ = rmpv::encode::write_value(&mut self.rows, &service_stats(st, now_epoch));
            if name.as_str() < zrpc_proto::BROKER_SERVICE {
                self.split = self.rows.len();
            }
        }
        self.count = rows.len();
        self.version = s.version();
        self.epoch = now_epoch;
        self.encoded += 1;
    }
}

/// Writes a MessagePack map header for `n` entries.
fn map_len(out: &mut Vec<u8>, n: usize) {
    match n {
        0..=15 => out.push(0x80 | n as u8),
        16..=0xffff => {
            out.push(0xde);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        _ => {
            out.push(0xdf);
            out.extend_from_slice(&(n as u32).to_be_bytes());
        }
    }
}

fn stats(b: &mut View<'_>) -> Answer {
    let s = b.stats;
    let now = Instant::now();
    let now_epoch = crate::stats::epoch(now);
    b.stats_cache.refresh(s, now, now_epoch);
    let cache = &*b.stats_cache;
    let mut errors: Vec<_> = s.errors.iter().collect();
    errors.sort_unstable();
    let errors = errors
        .into_iter()
        .map(|(code, n)| {
            let name = ErrorCode::from_u16(*code).map_or("ok", |c| c.as_str());
            (Value::from(name), Value::from(*n))
        })
        .collect();
    let fields = vec![
        ("uptime_s", Value::from(b.started.elapsed().as_secs_f64())),
        ("connections", Value::from(b.peers.len() as u64)),
        ("connections_open", Value::from(b.open_connections as u64)),
        ("connections_total", Value::from(s.connections_total)),
        ("connections_refused", Value::from(s.connections_refused)),
        ("names", Value::from(b.names.len() as u64)),
        ("pending", Value::from(b.pending.len() as u64)),
        ("orphans", Value::from(b.orphans as u64)),
        ("waiting", Value::from(b.names.waiting() as u64)),
        ("queued_bytes", Value::from(b.queued_total as u64)),
        (
            "mappings",
            Value::from(crate::payload::kept_mappings() as u64),
        ),
        ("timers", Value::from(b.pending.timers_len() as u64)),
        ("fds_held", Value::from(b.fds_held as u64)),
        ("fds_in_flight", Value::from(b.fds_in_flight as u64)),
        ("connections_lingering", Value::from(b.lingering as u64)),
        ("round_waits", Value::from(b.round_waits)),
        ("calls", Value::from(s.calls)),
        ("calls_ok", Value::from(s.calls_ok)),
        ("timeouts", Value::from(s.timeouts)),
        ("late_replies", Value::from(s.late_replies)),
        ("cancelled", Value::from(s.cancelled)),
        ("redelivered", Value::from(s.redelivered)),
        ("protocol_errors", Value::from(s.protocol_errors)),
        ("heartbeat_timeouts", Value::from(s.heartbeat_timeouts)),
        ("monitors", Value::from(b.monitors.len() as u64)),
        ("stats_rows_encoded", Value::from(cache.encoded)),
        ("stats_rows_reused", Value::from(cache.reused)),
        ("errors", Value::Map(errors)),
    ];
    let bridge = bridge_stats(b);
    // The broker's own row, always current (every call to the broker's
    // service changes it), spliced into the encoded rows at its place by
    // name.
    let own = service_stats(s.broker_row(), now_epoch);
    let mut out = Vec::with_capacity(cache.rows.len() + 2048);
    // Writing to a Vec cannot fail.
    map_len(&mut out, fields.len() + 1 + usize::from(bridge.is_some()));
    for (k, v) in &fields {
        let _ = rmpv::encode::write_value(&mut out, &Value::from(*k));
        let _ = rmpv::encode::write_value(&mut out, v);
    }
    let _ = rmpv::encode::write_value(&mut out, &Value::from("services"));
    map_len(&mut out, cache.count + 1);
    out.extend_from_slice(&cache.rows[..cache.split]);
    let _ = rmpv::encode::write_value(&mut out, &Value::from(zrpc_proto::BROKER_SERVICE));
    let _ = rmpv::encode::write_value(&mut out, &own);
    out.extend_from_slice(&cache.rows[cache.split..]);
    if let Some((k, v)) = bridge {
        let _ = rmpv::encode::write_value(&mut out, &Value::from(k));
        let _ = rmpv::encode::write_value(&mut out, &v);
    }
    Ok(out.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hand-written description the table replaced, kept to check that
    /// the generated one is the same, byte for byte.
    fn hand_written() -> Value {
        let page = (
            "page",
            "Option<{after: Option<name | conn_id>, limit: Option<u32>}>",
        );
        let m = |name: &str, param: Option<(&str, &str)>, returns: &str, doc: &str| {
            let params = param
                .map(|(n, t)| map(vec![("name", n.into()), ("type", t.into())]))
                .into_iter()
                .collect();
            map(vec![
                ("name", name.into()),
                ("doc", doc.into()),
                ("params", Value::Array(params)),
                ("returns", returns.into()),
            ])
        };
        map(vec![
            ("service", "zrpcd".into()),
            (
                "methods",
                Value::Array(vec![
                    m("ping", None, "String", "Returns \"pong\"."),
                    m(
                        "list",
                        Some(page),
                        "Vec<{name, instances}> | {entries: Vec<{name, instances}>, next: Option<String>}",
                        "The registered service names with the connection ids of their instances, sorted by name. Payload nil: all of them (LimitExceeded if they pass --max-message-size); {after, limit}: the page after the name `after`, and `next` to pass as `after` for the following one (nil on the last).",
                    ),
                    m(
                        "peers",
                        Some(page),
                        "Vec<{conn_id, pid, uid, gid, agent, names, connected_s, outstanding, calling, served, failed, calls_made}> | {entries: Vec<...>, next: Option<u64>}",
                        "Every connection, by conn_id; pid, uid and gid come from the socket (SO_PEERCRED). Payload nil: all of them (LimitExceeded if they pass --max-message-size); {after, limit}: the page after the conn_id `after`, and `next` to pass as `after` for the following one (nil on the last).",
                    ),
                    m(
                        "stats",
                        None,
                        "{uptime_s, connections, calls, timeouts, errors, services, ...}",
                        "Broker-wide counters and per-service latency: answered, errors, p50_us/p90_us/p99_us (interpolated within 1/8-octave buckets, within 12.5 %), sum_us, buckets ([le_us, cumulative count]); the same over the last minute under recent.",
                    ),
                    m(
                        "monitor",
                        Some(("services", "Option<Vec<String>>")),
                        "bool",
                        "Subscribes this connection to Event frames, one per finished call (all services, or only these). Use `zrpc monitor`.",
                    ),
                ]),
            ),
        ])
    }

    #[test]
    fn map_headers_are_messagepacks() {
        for n in [0, 1, 15, 16, 0xffff, 0x1_0000] {
            let mut ours = Vec::new();
            map_len(&mut ours, n);
            let mut theirs = Vec::new();
            let _ = rmpv::encode::write_value(
                &mut theirs,
                &Value::Map(vec![(Value::Nil, Value::Nil); n]),
            );
            assert_eq!(ours, theirs[..theirs.len() - 2 * n], "{n}");
        }
    }

    #[test]
    fn the_generated_description_is_the_hand_written_one() {
        assert_eq!(encode(&describe()), encode(&hand_written()));
    }

    #[test]
    fn an_unknown_method_lists_the_table() {
        assert_eq!(
            no_such_method("nope"),
            "service \"zrpcd\" has no method \"nope\" (try ping, list, peers, stats, monitor, zrpc.describe)"
        );
    }
}
