//! `zrpc call`: one call, repeated calls, or a simple load run.

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rmpv::Value;
use zrpc_client::{CallOptions, Client};

use crate::cli::{CallArgs, CallTimeout, Count};
use crate::error::{error_exit, error_kind, exit, Failure};
use crate::fmt;
use crate::{write_line, write_out};

/// Runs `zrpc call`.
pub async fn run(client: Client, args: CallArgs) -> Result<(), Failure> {
    let payload = read_payload(args.payload.as_deref())?;
    let mut opts = CallOptions::default().with_timeout(args.timeout.0);
    opts.no_wait = args.no_wait;
    opts.no_retry = args.no_retry;
    match args.concurrency {
        None => sequential(&client, &args, payload, opts).await,
        Some(k) => load(client, &args, payload, opts, k).await,
    }
}

/// Parses the JSON payload argument (`-` = standard input, none = nil) and
/// encodes it as MessagePack.
pub fn read_payload(arg: Option<&str>) -> Result<Bytes, Failure> {
    let text;
    let src = match arg {
        None => return Ok(Bytes::from_static(zrpc_proto::NIL_PAYLOAD)),
        Some("-") => {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s).map_err(|e| {
                Failure::usage(format!("cannot read the payload from standard input: {e}"))
            })?;
            text = s;
            text.as_str()
        }
        Some(s) => s,
    };
    let j: serde_json::Value = serde_json::from_str(src)
        .map_err(|e| Failure::usage(format!("the payload is not valid JSON: {e}")))?;
    let v =
        crate::json::to_msgpack(&j).map_err(|e| Failure::usage(format!("invalid payload: {e}")))?;
    let mut out = Vec::with_capacity(src.len() + 8);
    rmpv::encode::write_value(&mut out, &v)
        .map_err(|e| Failure::usage(format!("cannot encode the payload: {e}")))?;
    Ok(out.into())
}

fn render(v: &Value, json: bool) -> String {
    if json {
        fmt::json_line(v)
    } else {
        fmt::json_pretty(v)
    }
}

async fn sequential(
    client: &Client,
    args: &CallArgs,
    payload: Bytes,
    opts: CallOptions,
) -> Result<(), Failure> {
    let mut done = 0u64;
    while args.count == Count::Inf || Count::N(done) != args.count {
        let call = client.call_raw(&args.service, &args.method, payload.clone(), opts);
        let result = if done == 0 && !opts.no_wait {
            with_waiting_notice(client, &args.service, args.timeout, call).await?
        } else {
            call.await?
        };
        let v = fmt::decode_at_most(&result, args.max_values)?;
        write_line(&render(&v, args.json))?;
        done += 1;
    }
    Ok(())
}

/// How long a call runs before `zrpc` checks whether it is waiting for an
/// unregistered name.
const NOTICE_AFTER: Duration = Duration::from_secs(1);

/// Runs `call`; if it takes longer than [`NOTICE_AFTER`] and no service
/// holds `service`, says on standard error that the call waits for one (a
/// misspelt name would otherwise wait in silence).
async fn with_waiting_notice<F: std::future::Future>(
    client: &Client,
    service: &str,
    timeout: CallTimeout,
    call: F,
) -> F::Output {
    tokio::pin!(call);
    tokio::select! {
        r = &mut call => return r,
        () = tokio::time::sleep(NOTICE_AFTER) => {}
    }
    if let Ok(false) = is_registered(client, service).await {
        let until = match timeout.0 {
            Some(t) => format!("up to {}s in all", t.as_secs_f64()),
            None => "with no timeout".to_string(),
        };
        eprintln!(
            "zrpc: no service {service:?} is registered; waiting for one to register ({until}; --no-wait fails at once)..."
        );
    }
    call.await
}

/// Whether a service holds `name`, from `zrpcd.list`.
async fn is_registered(client: &Client, name: &str) -> Result<bool, Failure> {
    let entries = crate::list::broker_entries(client, "list", Duration::from_secs(5)).await?;
    Ok(entries.iter().any(|e| {
        e.as_map().is_some_and(|m| {
            m.iter()
                .any(|(k, v)| k.as_str() == Some("name") && v.as_str() == Some(name))
        })
    }))
}

/// What a load run measured.
#[derive(Default)]
struct Tally {
    latencies_us: Vec<u64>,
    errors: BTreeMap<&'static str, u64>,
    first_error: Option<Failure>,
}

async fn load(
    client: Client,
    args: &CallArgs,
    payload: Bytes,
    opts: CallOptions,
    k: usize,
) -> Result<(), Failure> {
    let limit = match args.count {
        Count::N(n) => Some(n),
        Count::Inf => None,
    };
    let next = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let workers = limit.map_or(k, |n| k.min(usize::try_from(n).unwrap_or(usize::MAX)));
    let service: Arc<str> = args.service.as_str().into();
    let method: Arc<str> = args.method.as_str().into();
    let start = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let (client, next, stop, tally) =
            (client.clone(), next.clone(), stop.clone(), tally.clone());
        let (service, method, payload) = (service.clone(), method.clone(), payload.clone());
        set.spawn(async move {
            loop {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                if limit.is_some_and(|n| i >= n) {
                    break;
                }
                let t0 = Instant::now();
                let r = client
                    .call_raw(&service, &method, payload.clone(), opts)
                    .await;
                let us = u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX);
                let mut t = tally.lock().unwrap_or_else(|e| e.into_inner());
                match r {
                    Ok(_) => t.latencies_us.push(us),
                    Err(e) => {
                        *t.errors.entry(error_kind(&e)).or_default() += 1;
                        // Without a broker every call fails at once: stop.
                        if matches!(error_exit(&e), exit::CONNECTION | exit::SHUTDOWN) {
                            stop.store(true, Ordering::Relaxed);
                        }
                        if t.first_error.is_none() {
                            t.first_error = Some(e.into());
                        }
                    }
                }
            }
        });
    }
    let interrupted = tokio::select! {
        _ = async { while set.join_next().await.is_some() {} } => false,
        _ = tokio::signal::ctrl_c() => true,
    };
    if interrupted {
        set.abort_all();
    }
    let elapsed = start.elapsed();
    let mut t = std::mem::take(&mut *tally.lock().unwrap_or_else(|e| e.into_inner()));
    summary(&mut t, elapsed, args.json)?;
    let failed: u64 = t.errors.values().sum();
    match t.first_error {
        Some(first) => Err(Failure::new(
            first.code,
            format!(
                "{failed} of {} calls failed; first error: {}",
                failed + t.latencies_us.len() as u64,
                first.message
            ),
        )),
        // Ctrl-C is how `--count inf` ends; a finite run cut short exits
        // like a process killed by SIGINT.
        None if interrupted && limit.is_some() => {
            Err(Failure::new(exit::INTERRUPTED, "interrupted"))
        }
        None => Ok(()),
    }
}

/// The `q` quantile (nearest rank) of sorted values.
fn quantile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn summary(t: &mut Tally, elapsed: Duration, json: bool) -> Result<(), Failure> {
    t.latencies_us.sort_unstable();
    let ok = t.latencies_us.len() as u64;
    let errors: u64 = t.errors.values().sum();
    let calls = ok + errors;
    let secs = elapsed.as_secs_f64();
    let rate = if secs > 0.0 { calls as f64 / secs } else { 0.0 };
    let (p50, p99, max) = (
        quantile(&t.latencies_us, 0.5),
        quantile(&t.latencies_us, 0.99),
        t.latencies_us.last().copied().unwrap_or(0),
    );
    if json {
        let by_kind: serde_json::Map<String, serde_json::Value> = t
            .errors
            .iter()
            .map(|(k, n)| ((*k).to_owned(), (*n).into()))
            .collect();
        let j = serde_json::json!({
            "calls": calls,
            "ok": ok,
            "errors": errors,
            "errors_by_kind": by_kind,
            "elapsed_s": secs,
            "calls_per_s": rate,
            "p50_us": p50,
            "p99_us": p99,
            "max_us": max,
        });
        return write_line(&j.to_string());
    }
    let mut out = format!(
        "calls    {calls} ({ok} ok, {errors} errors)\n\
         elapsed  {secs:.3}s\n\
         rate     {rate:.1} calls/s\n\
         latency  p50 {}, p99 {}, max {}\n",
        fmt::micros(p50),
        fmt::micros(p99),
        fmt::micros(max)
    );
    if !t.errors.is_empty() {
        let list: Vec<String> = t.errors.iter().map(|(k, n)| format!("{k} {n}")).collect();
        out.push_str(&format!("errors   {}\n", list.join(", ")));
    }
    write_out(&out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(quantile(&v, 0.5), 50);
        assert_eq!(quantile(&v, 0.99), 99);
        assert_eq!(quantile(&[7], 0.99), 7);
        assert_eq!(quantile(&[], 0.5), 0);
    }

    #[test]
    fn payloads() {
        assert_eq!(&read_payload(None).expect("nil")[..], &[0xc0]);
        assert_eq!(
            &read_payload(Some("[1]")).expect("array")[..],
            &[0x91, 0x01]
        );
        assert_eq!(read_payload(Some("{")).map_err(|f| f.code).err(), Some(1));
    }
}
