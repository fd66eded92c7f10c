//! `zrpc list` and `zrpc list SERVICE`.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use rmpv::Value;
use zrpc_client::{CallOptions, Client, Error};

use crate::cli::ListArgs;
use crate::error::{exit, Failure};
use crate::fmt::{self, field, s, u};
use crate::{write_line, write_out};

/// The shape under `key` of a described method or parameter (shapes came
/// with zrpc.describe's `returns_shape`, `error_shape` and a parameter's
/// `shape`; older services send none).
/// `any` (a dynamic value) is left out: the written type says more.
fn shape(v: &Value, key: &str) -> Option<zrpc_proto::Shape> {
    rmpv::ext::from_value(field(v, key)?.clone())
        .ok()
        .filter(|s| *s != zrpc_proto::Shape::Any)
}

/// Runs `zrpc list`.
pub async fn run(client: &Client, args: &ListArgs) -> Result<(), Failure> {
    match &args.service {
        None => services(client, args).await,
        Some(name) => methods(client, name, args).await,
    }
}

/// Calls a method of the broker's own service.
pub async fn broker_call(
    client: &Client,
    method: &str,
    timeout: Duration,
) -> Result<Value, Failure> {
    let opts = CallOptions::timeout(timeout);
    let r = client
        .call_raw(zrpc_proto::BROKER_SERVICE, method, Bytes::new(), opts)
        .await?;
    fmt::decode(&r)
}

/// Most entries asked for per page of `zrpcd.list` and `zrpcd.peers`
/// (the broker's most, `zrpcd::paging::MAX_LIMIT`).
const PAGE: u64 = 4096;

/// All the entries of `zrpcd.list` or `zrpcd.peers`, page after page
/// (an answer of any size; a broker from before pages answers the whole
/// array at once, and that is taken as it is).
pub async fn broker_entries(
    client: &Client,
    method: &str,
    timeout: Duration,
) -> Result<Vec<Value>, Failure> {
    let mut entries = Vec::new();
    let mut after = Value::Nil;
    loop {
        let page = map(vec![("after", after), ("limit", Value::from(PAGE))]);
        let mut payload = Vec::new();
        // Writing to a Vec cannot fail.
        let _ = rmpv::encode::write_value(&mut payload, &page);
        let opts = CallOptions::timeout(timeout);
        let r = client
            .call_raw(zrpc_proto::BROKER_SERVICE, method, payload.into(), opts)
            .await?;
        let answer = fmt::decode(&r)?;
        if let Value::Array(all) = answer {
            return Ok(all);
        }
        if let Some(Value::Array(got)) = field(&answer, "entries") {
            entries.extend(got.iter().cloned());
        }
        match field(&answer, "next") {
            Some(next) if !next.is_nil() => after = next.clone(),
            _ => return Ok(entries),
        }
    }
}

fn map(pairs: Vec<(&str, Value)>) -> Value {
    Value::Map(
        pairs
            .into_iter()
            .map(|(k, v)| (Value::from(k), v))
            .collect(),
    )
}

async fn services(client: &Client, args: &ListArgs) -> Result<(), Failure> {
    let entries = broker_entries(client, "list", args.timeout).await?;
    let peers = broker_entries(client, "peers", args.timeout).await?;
    let peers: HashMap<u64, &Value> = peers.iter().map(|p| (u(p, "conn_id"), p)).collect();
    // One combined value: [{name, instances: [{conn_id, pid, ...}]}].
    let combined: Vec<Value> = entries
        .iter()
        .map(|e| {
            let instances = field(e, "instances")
                .and_then(Value::as_array)
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .map(|id| {
                    let id = id.as_u64().unwrap_or(0);
                    let Some(p) = peers.get(&id) else {
                        // The connection went away between the two calls.
                        return map(vec![("conn_id", Value::from(id))]);
                    };
                    let keep = |k: &str| field(p, k).cloned().unwrap_or(Value::Nil);
                    map(vec![
                        ("conn_id", Value::from(id)),
                        ("pid", keep("pid")),
                        ("uid", keep("uid")),
                        ("gid", keep("gid")),
                        ("agent", keep("agent")),
                        ("connected_s", keep("connected_s")),
                        ("served", keep("served")),
                        ("failed", keep("failed")),
                        ("outstanding", keep("outstanding")),
                    ])
                })
                .collect();
            let mut entry = vec![
                ("name", field(e, "name").cloned().unwrap_or(Value::Nil)),
                ("instances", Value::Array(instances)),
            ];
            // An imported name, served on another host through the
            // broker's NATS bridge.
            if let Some(remote) = field(e, "remote") {
                entry.push(("remote", remote.clone()));
            }
            map(entry)
        })
        .collect();
    if args.json {
        return write_line(&fmt::json_line(&Value::Array(combined)));
    }
    if combined.is_empty() {
        return write_line("no services registered");
    }
    let mut rows = vec![[
        "SERVICE", "CONN", "PID", "UID", "UPTIME", "SERVED", "FAILED", "AGENT",
    ]
    .map(String::from)
    .to_vec()];
    for e in &combined {
        let instances = field(e, "instances").and_then(Value::as_array);
        for i in instances.map(Vec::as_slice).unwrap_or_default() {
            // What the broker does not show this user (another uid's
            // instance: pid, uptime, counts) comes as nil: "-".
            let shown = |k: &str| field(i, k).filter(|v| !v.is_nil());
            let num = |k: &str| shown(k).map_or("-".to_string(), |v| v.to_string());
            let remote = field(e, "remote").and_then(Value::as_bool) == Some(true);
            rows.push(vec![
                if remote {
                    format!("{} (remote, NATS)", s(e, "name"))
                } else {
                    s(e, "name").to_string()
                },
                num("conn_id"),
                num("pid"),
                num("uid"),
                shown("connected_s").map_or("-".into(), |_| fmt::secs(fmt::f(i, "connected_s"))),
                num("served"),
                num("failed"),
                s(i, "agent").to_string(),
            ]);
        }
    }
    write_out(&fmt::table(&rows))
}

async fn methods(client: &Client, name: &str, args: &ListArgs) -> Result<(), Failure> {
    let opts = CallOptions::timeout(args.timeout).no_wait();
    let desc = match client.call_raw(name, "zrpc.describe", Bytes::new(), opts).await {
        Ok(r) => fmt::decode(&r)?,
        Err(Error::NoSuchMethod { .. }) => {
            return Err(Failure::new(
                exit::NO_SUCH_METHOD,
                format!("service {name:?} does not describe itself (it has no method \"zrpc.describe\"; services built with zrpc-service do)"),
            ))
        }
        Err(e) => return Err(e.into()),
    };
    if args.json {
        return write_line(&fmt::json_line(&desc));
    }
    let methods = field(&desc, "methods")
        .and_then(Value::as_array)
        .ok_or_else(|| {
            Failure::new(
                exit::PROTOCOL,
                format!(
                    "unexpected answer to {name}.zrpc.describe: {}",
                    fmt::json_line(&desc)
                ),
            )
        })?;
    // What a service says of itself is its user's text: shown printable.
    let mut out = format!(
        "service {}: {} method{}\n",
        fmt::printable(match s(&desc, "service") {
            "" => name,
            n => n,
        }),
        methods.len(),
        if methods.len() == 1 { "" } else { "s" }
    );
    for m in methods {
        let params: Vec<String> = field(m, "params")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .map(|p| match shape(p, "shape") {
                Some(sh) => format!(
                    "{}: {}",
                    fmt::printable(s(p, "name")),
                    fmt::printable(&sh.to_string())
                ),
                None => format!(
                    "{}: {}",
                    fmt::printable(s(p, "name")),
                    fmt::printable(s(p, "type"))
                ),
            })
            .collect();
        let written = s(m, "returns");
        let value = shape(m, "returns_shape").map(|sh| sh.to_string());
        let ret = match (shape(m, "error_shape"), value) {
            (Some(e), v) => format!("Result<{}, {e}>", v.as_deref().unwrap_or("any")),
            // A `Result` whose error has no shape: as written.
            (None, _) if written.starts_with("Result") => written.to_string(),
            (None, Some(v)) => v,
            (None, None) => written.to_string(),
        };
        out.push('\n');
        out.push_str(&format!(
            "{}({})",
            fmt::printable(s(m, "name")),
            params.join(", ")
        ));
        if !ret.is_empty() && ret != "()" {
            out.push_str(&format!(" -> {}", fmt::printable(&ret)));
        }
        out.push('\n');
        let doc = s(m, "doc").trim();
        if doc.is_empty() {
            out.push_str("    (undocumented)\n");
        }
        for line in doc.lines() {
            out.push_str(format!("    {}", fmt::printable(line)).trim_end());
            out.push('\n');
        }
    }
    write_out(&out)
}
