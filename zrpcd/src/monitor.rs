//! `zrpc monitor`: connections that subscribed with `zrpcd.monitor` get an
//! `Event` frame for every call that finishes. When nobody monitors, the only
//! cost on the routing path is checking that the list is empty.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use rmpv::Value;

use crate::peers::PeerId;

/// One subscriber.
#[derive(Debug)]
pub struct Monitor {
    /// The subscribed connection.
    pub peer: PeerId,
    /// Only calls to these services (all if `None`); at most
    /// `--max-monitor-names` valid names.
    pub filter: Option<rustc_hash::FxHashSet<Box<str>>>,
    /// Last event sequence number sent.
    pub seq: u64,
}

/// What one finished call looked like.
#[derive(Debug)]
pub struct CallEvent<'a> {
    /// Calling process (from SO_PEERCRED).
    pub caller_pid: i32,
    /// Calling connection.
    pub caller: PeerId,
    /// Service name.
    pub service: &'a str,
    /// Method name.
    pub method: &'a str,
    /// Request payload size.
    pub size: usize,
    /// Reply payload size (0 on error).
    pub reply_size: usize,
    /// Time from acceptance to the end of the call.
    pub latency: Duration,
    /// `"ok"`, an error code name, or `"cancelled"`.
    pub outcome: &'a str,
    /// A call through the NATS bridge: `"from NATS"` (a remote caller's,
    /// run here) or `"to NATS"` (a local caller's, sent to another host).
    pub bridged: Option<&'static str>,
}

impl Monitor {
    /// Whether this subscriber wants events about `service`.
    pub fn wants(&self, service: &str) -> bool {
        self.filter.as_ref().is_none_or(|f| f.contains(service))
    }
}

/// Every subscriber, in the order they subscribed.
#[derive(Debug, Default)]
pub struct Monitors {
    list: Vec<Monitor>,
}

impl Monitors {
    /// Subscribes `peer` (again: its earlier subscription is replaced).
    pub fn subscribe(&mut self, peer: PeerId, filter: Option<rustc_hash::FxHashSet<Box<str>>>) {
        self.list.retain(|m| m.peer != peer);
        self.list.push(Monitor {
            peer,
            filter,
            seq: 0,
        });
    }

    /// Ends the subscriptions for which `keep` says false.
    pub fn retain(&mut self, keep: impl FnMut(&Monitor) -> bool) {
        self.list.retain(keep);
    }

    /// Ends `peer`'s subscription, if any.
    pub fn remove(&mut self, peer: PeerId) {
        self.list.retain(|m| m.peer != peer);
    }

    /// Number of subscribers.
    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// True without subscribers (the routing path's only cost then).
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The subscribers that get `event`, each with the event's sequence
    /// number for it (counted here); not the caller itself.
    pub fn recipients(&mut self, event: &CallEvent<'_>) -> Vec<(PeerId, u64)> {
        let mut targets = Vec::new();
        for m in &mut self.list {
            if m.peer != event.caller && m.wants(event.service) {
                m.seq += 1;
                targets.push((m.peer, m.seq));
            }
        }
        targets
    }
}

/// Reads a `zrpcd.monitor` argument: nil (or no payload) for all services,
/// or an array of at most `max_names` valid service names
/// (`--max-monitor-names`). The array's length is checked before anything
/// is decoded, so a huge argument costs nothing.
pub fn parse_filter(
    payload: &[u8],
    max_names: usize,
) -> Result<Option<rustc_hash::FxHashSet<Box<str>>>, String> {
    const USAGE: &str = "monitor takes nil or an array of service names";
    if payload.is_empty() || payload == zrpc_proto::NIL_PAYLOAD {
        return Ok(None);
    }
    let mut r = zrpc_proto::mp::Reader::new(payload);
    let n = r.array_len().map_err(|_| USAGE.to_string())?;
    if n as usize > max_names {
        return Err(format!(
            "monitor takes at most {max_names} service names (--max-monitor-names), not {n}"
        ));
    }
    let mut names = rustc_hash::FxHashSet::default();
    for _ in 0..n {
        let name = r.str().map_err(|_| USAGE.to_string())?;
        zrpc_proto::validate_name(name).map_err(|e| e.to_string())?;
        names.insert(Box::from(name));
    }
    if r.remaining() != 0 {
        return Err("the monitor argument has bytes after its array".into());
    }
    Ok(Some(names))
}

/// Encodes an event as the payload of an `Event` frame: a map with keys
/// `time` (UNIX seconds, float), `caller_pid`, `caller` (connection id),
/// `service`, `method`, `size`, `reply_size`, `latency_us`, `outcome`.
pub fn encode(e: &CallEvent<'_>) -> Bytes {
    let time = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let v = Value::Map(vec![
        ("time".into(), Value::from(time)),
        ("caller_pid".into(), Value::from(e.caller_pid)),
        ("caller".into(), Value::from(e.caller)),
        ("service".into(), Value::from(e.service)),
        ("method".into(), Value::from(e.method)),
        ("size".into(), Value::from(e.size as u64)),
        ("reply_size".into(), Value::from(e.reply_size as u64)),
        (
            "latency_us".into(),
            Value::from(e.latency.as_micros() as u64),
        ),
        ("outcome".into(), Value::from(e.outcome)),
    ]);
    let v = match (v, e.bridged) {
        (Value::Map(mut m), Some(b)) => {
            m.push(("bridged".into(), Value::from(b)));
            Value::Map(m)
        }
        (v, _) => v,
    };
    let mut out = Vec::with_capacity(160);
    // Writing to a Vec cannot fail.
    let _ = rmpv::encode::write_value(&mut out, &v);
    out.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_are_bounded_and_validated() {
        assert_eq!(parse_filter(b"", 256), Ok(None));
        assert_eq!(parse_filter(b"\xc0", 256), Ok(None));
        let two = parse_filter(b"\x92\xa4echo\xa4calc", 256).expect("two names");
        assert!(two.is_some_and(|f| f.len() == 2 && f.contains("echo")));
        // An array announcing 16M entries is refused before decoding.
        let err = parse_filter(b"\xdd\x01\x00\x00\x00\xa0", 256).expect_err("too many");
        assert!(err.contains("at most 256"), "{err}");
        assert!(
            parse_filter(b"\x92\xa4echo\xa4calc", 1).is_err(),
            "past the flag"
        );
        assert!(parse_filter(b"\x91\xa4echo", 1).is_ok());
        assert!(parse_filter(b"\x91\xa0", 256).is_err(), "empty name");
        assert!(parse_filter(b"\x91\x01", 256).is_err(), "not a string");
        assert!(
            parse_filter(b"\x91\xa4echo\x00", 256).is_err(),
            "trailing bytes"
        );
    }
}
