//! The broker's own service, callable as `zrpcd.<method>` like any other.
//!
//! Methods (all take no arguments; the payload is ignored):
//! - `ping`: returns `"pong"`.
//! - `zrpc.describe`: the method list below, in the format every
//!   `zrpc-service` service uses.
//! - `list`: the registered names: `[{name, instances: [conn_id...]}]`.
//! - `peers`: every connection: `[{conn_id, pid, uid, gid, agent, names,
//!   connected_s, outstanding, calling, served, failed, calls_made}]`.
//! - `stats`: broker-wide counters and per-service latency percentiles.
//! - `monitor`: payload nil (all services) or an array of service names;
//!   from then on the connection receives an `Event` frame for each finished
//!   call (see [`crate::monitor`]) until it disconnects. Returns `true`.

use bytes::Bytes;
use rmpv::Value;
use zrpc_proto::ErrorCode;

use crate::broker::Broker;
use crate::peers::PeerId;
use crate::policy::Introspection;

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
    broker: &mut Broker,
    caller: PeerId,
    method: &str,
    payload: &[u8],
) -> (Option<ErrorCode>, String, Bytes) {
    let denied = |what: &str, uid: u32| {
        (
            Some(ErrorCode::AccessDenied),
            format!(
                "{} does not allow uid {uid} to use zrpcd.{what}",
                broker.config.policy.source()
            ),
            Bytes::new(),
        )
    };
    let uid = broker.peers.get(caller).map_or(u32::MAX, |p| p.creds.uid);
    let allowed = |what| {
        broker
            .peers
            .get(caller)
            .is_some_and(|p| broker.config.policy.may_introspect(&p.identity(), what))
    };
    let value = match method {
        "monitor" if !allowed(Introspection::Monitor) => return denied("monitor", uid),
        "monitor" => match subscribe(broker, caller, payload) {
            Ok(v) => v,
            Err(msg) => return (Some(ErrorCode::BadPayload), msg, Bytes::new()),
        },
        "ping" => Value::from("pong"),
        "zrpc.describe" => describe(),
        "list" => list(broker),
        // Without the right to see everyone: full entries for the caller's
        // own uid, the connection id and names only for the others.
        "peers" => peers(broker, (!allowed(Introspection::Peers)).then_some(uid)),
        "stats" if !allowed(Introspection::Stats) => return denied("stats", uid),
        "stats" => stats(broker),
        other => {
            return (
                Some(ErrorCode::NoSuchMethod),
                format!(
                "service \"zrpcd\" has no method {other:?} (try ping, list, peers, stats, monitor, zrpc.describe)"
            ),
                Bytes::new(),
            )
        }
    };
    (None, String::new(), encode(&value))
}

/// The broker's own service described like any `zrpc-service` service.
fn describe() -> Value {
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
                    None,
                    "Vec<{name, instances}>",
                    "The registered service names with the connection ids of their instances, sorted by name.",
                ),
                m(
                    "peers",
                    None,
                    "Vec<{conn_id, pid, uid, gid, agent, names, connected_s, outstanding, calling, served, failed, calls_made}>",
                    "Every connection; pid, uid and gid come from the socket (SO_PEERCRED).",
                ),
                m(
                    "stats",
                    None,
                    "{uptime_s, connections, calls, timeouts, errors, services, ...}",
                    "Broker-wide counters and per-service latency percentiles (p50_us, p99_us).",
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

fn subscribe(b: &mut Broker, caller: PeerId, payload: &[u8]) -> Result<Value, String> {
    let filter = crate::monitor::parse_filter(payload)?;
    b.monitors.retain(|m| m.peer != caller);
    b.monitors.push(crate::monitor::Monitor {
        peer: caller,
        filter,
        seq: 0,
    });
    Ok(Value::Boolean(true))
}

fn list(b: &Broker) -> Value {
    Value::Array(
        b.names
            .list()
            .into_iter()
            .map(|(name, inst)| {
                map(vec![
                    ("name", Value::from(name)),
                    (
                        "instances",
                        Value::Array(inst.iter().map(|i| Value::from(*i)).collect()),
                    ),
                ])
            })
            .collect(),
    )
}

fn peers(b: &Broker, only_uid: Option<u32>) -> Value {
    let mut v: Vec<_> = b.peers.iter().collect();
    v.sort_unstable_by_key(|p| p.id);
    Value::Array(
        v.into_iter()
            .map(|p| {
                let names = || Value::Array(p.names.iter().map(|n| Value::from(&**n)).collect());
                if only_uid.is_some_and(|u| u != p.creds.uid) {
                    return map(vec![("conn_id", Value::from(p.id)), ("names", names())]);
                }
                map(vec![
                    ("conn_id", Value::from(p.id)),
                    ("pid", Value::from(p.creds.pid)),
                    ("uid", Value::from(p.creds.uid)),
                    ("gid", Value::from(p.creds.gid)),
                    ("agent", Value::from(p.agent.as_str())),
                    ("names", names()),
                    ("connected_s", Value::from(p.since.elapsed().as_secs_f64())),
                    ("outstanding", Value::from(p.outstanding)),
                    ("calling", Value::from(p.calling)),
                    ("served", Value::from(p.served)),
                    ("failed", Value::from(p.failed)),
                    ("calls_made", Value::from(p.calls_made)),
                ])
            })
            .collect(),
    )
}

fn stats(b: &Broker) -> Value {
    let s = &b.stats;
    let mut errors: Vec<_> = s.errors.iter().collect();
    errors.sort_unstable();
    let errors = errors
        .into_iter()
        .map(|(code, n)| {
            let name = ErrorCode::from_u16(*code).map_or("ok", |c| c.as_str());
            (Value::from(name), Value::from(*n))
        })
        .collect();
    // The `(other)` row only once something was counted in it.
    let mut services: Vec<_> = s
        .services
        .iter()
        .filter(|(name, st)| name != crate::stats::OTHER || st.answered + st.errors > 0)
        .collect();
    services.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    let services = services
        .into_iter()
        .map(|(name, st)| {
            (
                Value::from(&**name),
                map(vec![
                    ("answered", Value::from(st.answered)),
                    ("errors", Value::from(st.errors)),
                    ("p50_us", Value::from(st.latency.quantile_us(0.5))),
                    ("p99_us", Value::from(st.latency.quantile_us(0.99))),
                ]),
            )
        })
        .collect();
    map(vec![
        ("uptime_s", Value::from(b.started.elapsed().as_secs_f64())),
        ("connections", Value::from(b.peers.len() as u64)),
        ("connections_total", Value::from(s.connections_total)),
        ("connections_refused", Value::from(s.connections_refused)),
        ("names", Value::from(b.names.len() as u64)),
        ("pending", Value::from(b.pending.len() as u64)),
        ("timers", Value::from(b.pending.timers_len() as u64)),
        ("calls", Value::from(s.calls)),
        ("calls_ok", Value::from(s.calls_ok)),
        ("timeouts", Value::from(s.timeouts)),
        ("late_replies", Value::from(s.late_replies)),
        ("cancelled", Value::from(s.cancelled)),
        ("redelivered", Value::from(s.redelivered)),
        ("protocol_errors", Value::from(s.protocol_errors)),
        ("heartbeat_timeouts", Value::from(s.heartbeat_timeouts)),
        ("monitors", Value::from(b.monitors.len() as u64)),
        ("errors", Value::Map(errors)),
        ("services", Value::Map(services)),
    ])
}
