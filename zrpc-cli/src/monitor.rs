//! `zrpc monitor`: prints one line per finished call, from the broker's
//! monitor events ([`zrpc_client::Monitor`]). If the broker goes away it
//! says so on standard error and subscribes again once a broker accepts.

use std::path::Path;
use std::time::Duration;

use rmpv::Value;
use zrpc_client::{ClientBuilder, Monitor};

use crate::cli::MonitorArgs;
use crate::error::{exit, Failure};
use crate::fmt::{self, f, s, u};
use crate::write_line;

/// First delay before subscribing again after the broker went away.
const RECONNECT_MIN: Duration = Duration::from_millis(20);
/// Largest delay between attempts to subscribe again.
const RECONNECT_MAX: Duration = Duration::from_secs(1);

/// Runs `zrpc monitor`. If the connection to the broker is lost (the
/// broker restarts or stops), it says so on standard error and subscribes
/// again once a broker accepts, with the clients' backoff; it ends only with
/// `--count`, Ctrl-C or an error that reconnecting cannot fix.
pub fn run(dir: &Path, args: &MonitorArgs) -> Result<(), Failure> {
    for name in &args.services {
        zrpc_proto::validate_name(name)
            .map_err(|e| Failure::usage(format!("invalid service name {name:?}: {e}")))?;
    }
    // The first connection fails at once: no broker to watch is a mistake.
    let mut mon = ClientBuilder::default()
        .agent(crate::AGENT)
        .socket_dir(dir)
        .reconnect_backoff(RECONNECT_MIN, RECONNECT_MAX)
        .monitor(&args.services)?;
    let mut seen = 0u64;
    while args.count.is_none_or(|n| seen < n) {
        match mon.next_event() {
            Ok(payload) => {
                print_event(&payload, args)?;
                seen += 1;
            }
            Err(e) => resubscribe(&mut mon, e)?,
        }
    }
    Ok(())
}

/// After the connection was lost with `lost`: says so, and subscribes
/// again (the client reconnects for as long as it takes).
fn resubscribe(mon: &mut Monitor, lost: zrpc_client::Error) -> Result<(), Failure> {
    let lost = Failure::from(lost);
    if !reconnectable(&lost) {
        return Err(lost);
    }
    eprintln!("zrpc: {}; reconnecting...", fmt::printable(&lost.message));
    mon.resubscribe()?;
    eprintln!("zrpc: reconnected to zrpcd; watching again");
    Ok(())
}

/// Whether a failure is the broker going away (restart, stop, not up
/// yet), which reconnecting fixes.
fn reconnectable(f: &Failure) -> bool {
    matches!(f.code, exit::CONNECTION | exit::SHUTDOWN)
}

/// Prints one event (a MessagePack map) as a line.
fn print_event(payload: &[u8], args: &MonitorArgs) -> Result<(), Failure> {
    let mut rd = payload;
    let ev = rmpv::decode::read_value(&mut rd)
        .map_err(|e| Failure::new(exit::PROTOCOL, format!("bad event payload from zrpcd: {e}")))?;
    let line = if args.json {
        fmt::json_line(&ev)
    } else {
        human(&ev)
    };
    write_line(&line)
}

/// One event as a line for humans:
/// `12:34:56.789  pid 4242  echo.echo  12B -> 12B  347µs  ok`.
fn human(ev: &Value) -> String {
    let bridged = match ev.as_map().and_then(|m| {
        m.iter()
            .find(|(k, _)| k.as_str() == Some("bridged"))
            .and_then(|(_, v)| v.as_str())
    }) {
        Some(b) => format!("  [{b}]"),
        None => String::new(),
    };
    format!(
        "{}  pid {:<7}  {:<24}  {:>7} -> {:<7}  {:>8}  {}{bridged}",
        local_time(f(ev, "time")),
        u(ev, "caller_pid"),
        format!("{}.{}", s(ev, "service"), s(ev, "method")),
        fmt::bytes(u(ev, "size")),
        fmt::bytes(u(ev, "reply_size")),
        fmt::micros(u(ev, "latency_us")),
        s(ev, "outcome"),
    )
}

/// `HH:MM:SS.mmm` in the local time zone.
fn local_time(unix: f64) -> String {
    let secs = unix.floor();
    let millis = ((unix - secs) * 1000.0).floor().clamp(0.0, 999.0) as u32;
    let t = secs as libc::time_t;
    // SAFETY: localtime_r writes only into `tm`, which we own.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let ok = unsafe { !libc::localtime_r(&t, &mut tm).is_null() };
    if !ok {
        return format!("{unix:.3}");
    }
    format!(
        "{:02}:{:02}:{:02}.{millis:03}",
        tm.tm_hour, tm.tm_min, tm.tm_sec
    )
}
