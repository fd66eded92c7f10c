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
    /// Only calls to these services (all if `None`).
    pub filter: Option<Vec<String>>,
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
}

impl Monitor {
    /// Whether this subscriber wants events about `service`.
    pub fn wants(&self, service: &str) -> bool {
        self.filter
            .as_ref()
            .is_none_or(|f| f.iter().any(|s| s == service))
    }
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
    let mut out = Vec::with_capacity(160);
    // Writing to a Vec cannot fail.
    let _ = rmpv::encode::write_value(&mut out, &v);
    out.into()
}
