//! `zrpc stats`.

use rmpv::Value;
use zrpc_client::Client;

use crate::cli::{StatsArgs, StatsFormat};
use crate::fmt::{self, field, u};
use crate::{write_line, write_out};

/// Runs `zrpc stats`.
pub async fn run(client: &Client, args: &StatsArgs) -> Result<(), crate::error::Failure> {
    let st = crate::list::broker_call(client, "stats", args.timeout).await?;
    match (args.json, args.format) {
        (true, _) | (_, StatsFormat::Json) => write_line(&fmt::json_line(&st)),
        (_, StatsFormat::Openmetrics) => write_out(&crate::openmetrics::render(&st)),
        (_, StatsFormat::Text) => write_out(&render(&st)),
    }
}

fn pairs(v: Option<&Value>) -> &[(Value, Value)] {
    v.and_then(Value::as_map)
        .map(Vec::as_slice)
        .unwrap_or_default()
}

/// The keys shown by name in [`render`]; other integer counters are listed
/// after them as they come.
const KNOWN: &[&str] = &[
    "uptime_s",
    "connections",
    "connections_total",
    "connections_refused",
    "names",
    "calls",
    "calls_ok",
    "timeouts",
    "cancelled",
    "redelivered",
    "pending",
    "timers",
    "late_replies",
    "protocol_errors",
    "monitors",
];

/// The human-readable form of a `zrpcd.stats` answer.
fn render(st: &Value) -> String {
    let mut rows: Vec<Vec<String>> = Vec::new();
    let row = |rows: &mut Vec<Vec<String>>, k: &str, v: String| rows.push(vec![k.to_string(), v]);
    row(&mut rows, "uptime", fmt::secs(fmt::f(st, "uptime_s")));
    row(
        &mut rows,
        "connections",
        format!(
            "{} open, {} total, {} refused",
            u(st, "connections"),
            u(st, "connections_total"),
            u(st, "connections_refused")
        ),
    );
    row(&mut rows, "names", u(st, "names").to_string());
    row(
        &mut rows,
        "calls",
        format!(
            "{} total, {} ok, {} timeouts, {} cancelled, {} redelivered",
            u(st, "calls"),
            u(st, "calls_ok"),
            u(st, "timeouts"),
            u(st, "cancelled"),
            u(st, "redelivered")
        ),
    );
    row(
        &mut rows,
        "pending",
        format!("{} calls, {} timers", u(st, "pending"), u(st, "timers")),
    );
    row(&mut rows, "late replies", u(st, "late_replies").to_string());
    row(
        &mut rows,
        "protocol errors",
        u(st, "protocol_errors").to_string(),
    );
    row(&mut rows, "monitors", u(st, "monitors").to_string());
    let errors: Vec<String> = pairs(field(st, "errors"))
        .iter()
        .map(|(k, n)| format!("{} {}", k.as_str().unwrap_or("?"), n.as_u64().unwrap_or(0)))
        .collect();
    row(
        &mut rows,
        "errors",
        if errors.is_empty() {
            "none".into()
        } else {
            errors.join(", ")
        },
    );
    // The NATS bridge's calls (a broker built with it and running it).
    if let Some(b) = field(st, "bridge") {
        row(
            &mut rows,
            "bridged (NATS)",
            format!(
                "{} imported ({} errors), {} exported ({} errors), {} cancels sent, {} received, \
                 {} NATS clients replaced",
                u(b, "imported"),
                u(b, "imported_errors"),
                u(b, "exported"),
                u(b, "exported_errors"),
                u(b, "cancels_sent"),
                u(b, "cancels_received"),
                u(b, "clients_replaced")
            ),
        );
    }
    // Counters this version does not know about yet.
    for (k, v) in pairs(Some(st)) {
        let (Some(k), Some(n)) = (k.as_str(), v.as_u64()) else {
            continue;
        };
        if !KNOWN.contains(&k) {
            rows.push(vec![k.replace('_', " "), n.to_string()]);
        }
    }
    let mut out = fmt::table(&rows);
    let services = pairs(field(st, "services"));
    if !services.is_empty() {
        let mut rows = vec![[
            "SERVICE", "ANSWERED", "ERRORS", "P50", "P99", "|", "LAST 60S", "ERRORS", "P50", "P99",
        ]
        .map(String::from)
        .to_vec()];
        for (name, s) in services {
            let r = field(s, "recent").unwrap_or(&Value::Nil);
            rows.push(vec![
                name.as_str().unwrap_or("?").to_string(),
                u(s, "answered").to_string(),
                u(s, "errors").to_string(),
                fmt::micros(u(s, "p50_us")),
                fmt::micros(u(s, "p99_us")),
                "|".to_string(),
                u(r, "answered").to_string(),
                u(r, "errors").to_string(),
                fmt::micros(u(r, "p50_us")),
                fmt::micros(u(r, "p99_us")),
            ]);
        }
        out.push('\n');
        out.push_str(&fmt::table(&rows));
        out.push_str(
            "latency at the broker (accept to reply); P50/P99 are interpolated within \
             buckets 1/8 of an octave wide (within 12.5 %); since start, and over the last minute\n",
        );
    }
    out
}
