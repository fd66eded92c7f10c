//! `zrpc stats --format openmetrics`: the broker's statistics as
//! OpenMetrics text (which Prometheus also reads), for node_exporter's
//! textfile collector or any scraper that runs a command.
//!
//! Families (all prefixed `zrpc_`):
//! - gauges: `uptime_seconds`, `connections`, `connections_open`, `names`,
//!   `pending_calls`, `timers`, `monitors`;
//! - counters (`_total` samples): `connections_accepted`,
//!   `connections_refused`, `calls`, `calls_ok`, `timeouts`, `cancelled`,
//!   `redelivered`, `late_replies`, `protocol_errors`, `heartbeat_timeouts`,
//!   `errors{code}`, `service_calls{service}`, `service_errors{service}`;
//! - histogram `service_latency_seconds{service}` (broker-side, accept to
//!   reply, since start): `_bucket{le}`, `_sum`, `_count`;
//! - gauges over the last minute (`window="60s"`): `service_recent_calls`,
//!   `service_recent_errors`, and `service_recent_latency_seconds{quantile}`
//!   (interpolated within a bucket 1/8 of an octave wide: within 12.5 %).

use std::fmt::Write;

use rmpv::Value;

use crate::fmt::{f, field, u};

/// Counters and gauges read from the top level of the answer:
/// (family, type, key in the answer, help).
const TOP: &[(&str, &str, &str, &str)] = &[
    (
        "zrpc_connections",
        "gauge",
        "connections",
        "Open connections.",
    ),
    (
        "zrpc_connections_open",
        "gauge",
        "connections_open",
        "Sockets zrpcd holds open, closed connections still flushing or waiting for their peer included (what --max-connections bounds).",
    ),
    ("zrpc_names", "gauge", "names", "Registered service names."),
    (
        "zrpc_pending_calls",
        "gauge",
        "pending",
        "Calls in progress.",
    ),
    ("zrpc_timers", "gauge", "timers", "Armed call deadlines."),
    (
        "zrpc_monitors",
        "gauge",
        "monitors",
        "Connections watching calls (zrpc monitor).",
    ),
    (
        "zrpc_connections_accepted",
        "counter",
        "connections_total",
        "Connections accepted since start.",
    ),
    (
        "zrpc_connections_refused",
        "counter",
        "connections_refused",
        "Connections refused at the connection limit.",
    ),
    ("zrpc_calls", "counter", "calls", "Calls accepted."),
    (
        "zrpc_calls_ok",
        "counter",
        "calls_ok",
        "Calls answered without an error.",
    ),
    (
        "zrpc_timeouts",
        "counter",
        "timeouts",
        "Calls whose deadline passed.",
    ),
    (
        "zrpc_cancelled",
        "counter",
        "cancelled",
        "Calls cancelled by their caller.",
    ),
    (
        "zrpc_redelivered",
        "counter",
        "redelivered",
        "Calls delivered again after their service instance went away.",
    ),
    (
        "zrpc_late_replies",
        "counter",
        "late_replies",
        "Replies that arrived after their call had ended.",
    ),
    (
        "zrpc_protocol_errors",
        "counter",
        "protocol_errors",
        "Connections closed for protocol errors.",
    ),
    (
        "zrpc_heartbeat_timeouts",
        "counter",
        "heartbeat_timeouts",
        "Services disconnected for missing heartbeats.",
    ),
];

/// A label value with `\`, `"` and newlines escaped.
fn escape(s: &str) -> String {
    s.replace('\\', r"\\")
        .replace('"', r#"\""#)
        .replace('\n', r"\n")
}

/// A number of seconds as OpenMetrics parsers expect a `le` or `quantile`
/// label ("canonical": `1e-05`, `0.00025`, `1.0`, `60.0`).
fn canonical(x: f64) -> String {
    let s = format!("{x:?}");
    // Rust writes `1e-5` where the canonical form (Go's, Python's) is `1e-05`.
    match s.split_once("e-") {
        Some((m, e)) if e.len() == 1 => format!("{m}e-0{e}"),
        _ => s,
    }
}

/// A float sample value.
fn num(x: f64) -> String {
    if x.is_finite() {
        format!("{x:?}")
    } else {
        "NaN".into()
    }
}

fn head(out: &mut String, name: &str, ty: &str, help: &str, unit: Option<&str>) {
    let _ = writeln!(out, "# TYPE {name} {ty}");
    if let Some(unit) = unit {
        let _ = writeln!(out, "# UNIT {name} {unit}");
    }
    let _ = writeln!(out, "# HELP {name} {help}");
}

fn pairs(v: Option<&Value>) -> &[(Value, Value)] {
    v.and_then(Value::as_map)
        .map(Vec::as_slice)
        .unwrap_or_default()
}

/// Renders a `zrpcd.stats` answer as OpenMetrics text, ending with `# EOF`.
pub fn render(st: &Value) -> String {
    let mut out = String::new();
    head(
        &mut out,
        "zrpc_uptime_seconds",
        "gauge",
        "Seconds since the broker started.",
        Some("seconds"),
    );
    let _ = writeln!(out, "zrpc_uptime_seconds {}", num(f(st, "uptime_s")));
    for &(name, ty, key, help) in TOP {
        head(&mut out, name, ty, help, None);
        let suffix = if ty == "counter" { "_total" } else { "" };
        let _ = writeln!(out, "{name}{suffix} {}", u(st, key));
    }
    head(
        &mut out,
        "zrpc_errors",
        "counter",
        "Calls that ended with an error, by code.",
        None,
    );
    for (code, n) in pairs(field(st, "errors")) {
        let _ = writeln!(
            out,
            "zrpc_errors_total{{code=\"{}\"}} {}",
            escape(code.as_str().unwrap_or("?")),
            n.as_u64().unwrap_or(0)
        );
    }
    let services: Vec<(String, &Value)> = pairs(field(st, "services"))
        .iter()
        .map(|(k, v)| (escape(k.as_str().unwrap_or("?")), v))
        .collect();

    head(
        &mut out,
        "zrpc_service_calls",
        "counter",
        "Calls answered by the service (with or without an error of its own).",
        None,
    );
    for (name, s) in &services {
        let _ = writeln!(
            out,
            "zrpc_service_calls_total{{service=\"{name}\"}} {}",
            u(s, "answered")
        );
    }
    head(
        &mut out,
        "zrpc_service_errors",
        "counter",
        "Calls to the service that ended in an error of any kind.",
        None,
    );
    for (name, s) in &services {
        let _ = writeln!(
            out,
            "zrpc_service_errors_total{{service=\"{name}\"}} {}",
            u(s, "errors")
        );
    }

    let h = "zrpc_service_latency_seconds";
    head(
        &mut out,
        h,
        "histogram",
        "Latency of answered calls at the broker, from accepting the call to forwarding the reply.",
        Some("seconds"),
    );
    for (name, s) in &services {
        for b in field(s, "buckets")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let Some([le, n]) = b.as_array().map(Vec::as_slice) else {
                continue;
            };
            let le = le.as_u64().unwrap_or(0) as f64 / 1e6;
            let _ = writeln!(
                out,
                "{h}_bucket{{service=\"{name}\",le=\"{}\"}} {}",
                canonical(le),
                n.as_u64().unwrap_or(0)
            );
        }
        let count = u(s, "answered");
        let _ = writeln!(out, "{h}_bucket{{service=\"{name}\",le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{h}_sum{{service=\"{name}\"}} {}",
            num(u(s, "sum_us") as f64 / 1e6)
        );
        let _ = writeln!(out, "{h}_count{{service=\"{name}\"}} {count}");
    }

    let window = |s: &Value| {
        format!(
            "{}s",
            u(field(s, "recent").unwrap_or(&Value::Nil), "window_s")
        )
    };
    head(
        &mut out,
        "zrpc_service_recent_calls",
        "gauge",
        "Calls answered by the service in the last minute.",
        None,
    );
    for (name, s) in &services {
        let r = field(s, "recent").unwrap_or(&Value::Nil);
        let _ = writeln!(
            out,
            "zrpc_service_recent_calls{{service=\"{name}\",window=\"{}\"}} {}",
            window(s),
            u(r, "answered")
        );
    }
    head(
        &mut out,
        "zrpc_service_recent_errors",
        "gauge",
        "Calls to the service that ended in an error in the last minute.",
        None,
    );
    for (name, s) in &services {
        let r = field(s, "recent").unwrap_or(&Value::Nil);
        let _ = writeln!(
            out,
            "zrpc_service_recent_errors{{service=\"{name}\",window=\"{}\"}} {}",
            window(s),
            u(r, "errors")
        );
    }
    let q = "zrpc_service_recent_latency_seconds";
    head(&mut out, q, "gauge", "Latency quantiles of the calls answered in the last minute, interpolated within buckets 1/8 of an octave wide (within 12.5 %); 0 without calls.", Some("seconds"));
    for (name, s) in &services {
        let r = field(s, "recent").unwrap_or(&Value::Nil);
        for (key, quantile) in [("p50_us", 0.5), ("p90_us", 0.9), ("p99_us", 0.99)] {
            let _ = writeln!(
                out,
                "{q}{{service=\"{name}\",window=\"{}\",quantile=\"{}\"}} {}",
                window(s),
                canonical(quantile),
                num(u(r, key) as f64 / 1e6)
            );
        }
    }
    out.push_str("# EOF\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_numbers() {
        assert_eq!(canonical(1e-5), "1e-05");
        assert_eq!(canonical(2.5e-5), "2.5e-05");
        assert_eq!(canonical(0.00025), "0.00025");
        assert_eq!(canonical(1.0), "1.0");
        assert_eq!(canonical(60.0), "60.0");
        assert_eq!(escape("a\"b\\c\nd"), r#"a\"b\\c\nd"#);
    }
}
