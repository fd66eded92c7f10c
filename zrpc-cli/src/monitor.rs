//! `zrpc monitor`: a raw protocol connection (the client library does not
//! deliver `Event` frames). `Hello` → `Welcome`, `Call zrpcd.monitor` →
//! `Result`, then one `Event` frame per finished call; `Ping` is answered
//! with `Pong`.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use bytes::BytesMut;
use rmpv::Value;
use zrpc_proto::{encode_frame, Envelope, ErrorCode, Frame, FrameDecoder};

use crate::cli::MonitorArgs;
use crate::error::{code_exit, exit, Failure};
use crate::fmt::{self, f, s, u};
use crate::write_line;

/// Id of the subscription call.
const CALL_ID: u64 = 1;

/// How long to wait for `Welcome` and for the subscription's `Result`.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

struct Conn {
    sock: UnixStream,
    buf: BytesMut,
    dec: FrameDecoder,
}

fn lost(e: impl std::fmt::Display) -> Failure {
    Failure::new(exit::CONNECTION, format!("connection to zrpcd lost: {e}"))
}

impl Conn {
    fn send(&mut self, env: &Envelope<'_>, payload: &[u8]) -> Result<(), Failure> {
        let mut out = BytesMut::with_capacity(64 + payload.len());
        encode_frame(&mut out, env, payload);
        zrpc_io::write::write_all_blocking(&self.sock, &[&out]).map_err(|(_, e)| lost(e))
    }

    /// The next frame; a `Fatal` frame or the end of the stream is an error.
    fn recv(&mut self) -> Result<Frame, Failure> {
        loop {
            match self.dec.decode(&mut self.buf) {
                Ok(Some(frame)) => return Ok(frame),
                Ok(None) => {}
                Err(e) => {
                    return Err(Failure::new(
                        exit::PROTOCOL,
                        format!("bad frame from zrpcd: {e}"),
                    ))
                }
            }
            zrpc_io::ReadPolicy::CLIENT.make_room(&self.dec, &mut self.buf);
            match zrpc_io::read_spare(&self.sock, &mut self.buf) {
                Ok(0) => return Err(lost("the broker closed the connection")),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(Failure::new(exit::TIMEOUT, "zrpcd did not answer in time"))
                }
                Err(e) => return Err(lost(e)),
            };
        }
    }
}

fn fatal(code: ErrorCode, message: &str) -> Failure {
    Failure::new(
        code_exit(code),
        format!("zrpcd closed the connection ({code}): {message}"),
    )
}

fn bad_envelope(e: impl std::fmt::Display) -> Failure {
    Failure::new(exit::PROTOCOL, format!("bad envelope from zrpcd: {e}"))
}

/// Connects, says hello and subscribes.
fn subscribe(dir: &Path, services: &[String]) -> Result<Conn, Failure> {
    let path = zrpc_proto::socket_path(dir);
    let hello = zrpc_io::handshake::hello_frame(zrpc_io::random_id(), crate::AGENT);
    let c = zrpc_io::handshake::connect_blocking(&path, &hello, SETUP_TIMEOUT)
        .map_err(|e| Failure::from(zrpc_client::Error::from(e)))?;
    c.sock.set_read_timeout(Some(SETUP_TIMEOUT)).map_err(lost)?;
    let mut c = Conn {
        sock: c.sock,
        buf: c.leftover,
        dec: FrameDecoder::new(c.welcome.incoming_limit()),
    };
    let filter = if services.is_empty() {
        Value::Nil
    } else {
        Value::Array(services.iter().map(|s| Value::from(s.as_str())).collect())
    };
    let mut payload = Vec::new();
    rmpv::encode::write_value(&mut payload, &filter)
        .map_err(|e| Failure::usage(format!("cannot encode the service list: {e}")))?;
    c.send(
        &Envelope::Call {
            id: CALL_ID,
            service: zrpc_proto::BROKER_SERVICE,
            method: "monitor",
            timeout_ms: Some(SETUP_TIMEOUT.as_millis() as u64),
            flags: zrpc_proto::flags::NO_WAIT,
        },
        &payload,
    )?;
    loop {
        let frame = c.recv()?;
        match frame.decode().map_err(bad_envelope)? {
            Envelope::Result {
                id: CALL_ID,
                code,
                message,
            } => match code {
                None => break,
                Some(code) => {
                    return Err(Failure::new(
                        code_exit(code),
                        format!("zrpcd.monitor failed ({code}): {message}"),
                    ))
                }
            },
            Envelope::Ping { nonce } => c.send(&Envelope::Pong { nonce }, &[])?,
            Envelope::Fatal { code, message } => return Err(fatal(code, message)),
            _ => {}
        }
    }
    // Events may be rare: wait for them as long as it takes.
    c.sock.set_read_timeout(None).map_err(lost)?;
    Ok(c)
}

/// Runs `zrpc monitor`. If the connection to the broker is lost (the
/// broker restarts or stops), it says so on standard error and subscribes
/// again once a broker accepts, with the clients' backoff; it ends only with
/// `--count`, Ctrl-C or an error that reconnecting cannot fix.
pub fn run(dir: &Path, args: &MonitorArgs) -> Result<(), Failure> {
    for name in &args.services {
        zrpc_proto::validate_name(name)
            .map_err(|e| Failure::usage(format!("invalid service name {name:?}: {e}")))?;
    }
    let backoff = zrpc_client::Backoff::new(RECONNECT_MIN, RECONNECT_MAX);
    // The first connection fails at once: no broker to watch is a mistake.
    let mut c = subscribe(dir, &args.services)?;
    let mut seen = 0u64;
    loop {
        let lost = match watch(&mut c, args, &mut seen) {
            Ok(()) => return Ok(()),
            Err(f) if reconnectable(&f) => f,
            Err(f) => return Err(f),
        };
        eprintln!("zrpc: {}; reconnecting...", lost.message);
        let mut attempt = 0;
        c = loop {
            std::thread::sleep(backoff.delay(attempt));
            attempt = attempt.saturating_add(1);
            match subscribe(dir, &args.services) {
                Ok(c) => break c,
                Err(f) if reconnectable(&f) => continue,
                Err(f) => return Err(f),
            }
        };
        eprintln!("zrpc: reconnected to zrpcd; watching again");
    }
}

/// First delay before subscribing again after the broker went away.
const RECONNECT_MIN: Duration = Duration::from_millis(20);
/// Largest delay between attempts to subscribe again.
const RECONNECT_MAX: Duration = Duration::from_secs(1);

/// Whether a failure is the broker going away (restart, stop, not up
/// yet), which reconnecting fixes.
fn reconnectable(f: &Failure) -> bool {
    matches!(f.code, exit::CONNECTION | exit::SHUTDOWN)
}

/// Prints events until `--count` is reached (`Ok`) or the connection fails.
fn watch(c: &mut Conn, args: &MonitorArgs, seen: &mut u64) -> Result<(), Failure> {
    while args.count.is_none_or(|n| *seen < n) {
        let frame = c.recv()?;
        match frame.decode().map_err(bad_envelope)? {
            Envelope::Event { .. } => {
                let mut rd = &frame.payload[..];
                let ev = rmpv::decode::read_value(&mut rd).map_err(|e| {
                    Failure::new(exit::PROTOCOL, format!("bad event payload from zrpcd: {e}"))
                })?;
                let line = if args.json {
                    fmt::json_line(&ev)
                } else {
                    human(&ev)
                };
                write_line(&line)?;
                *seen += 1;
            }
            Envelope::Ping { nonce } => c.send(&Envelope::Pong { nonce }, &[])?,
            Envelope::Fatal { code, message } => return Err(fatal(code, message)),
            _ => {}
        }
    }
    Ok(())
}

/// One event as a line for humans:
/// `12:34:56.789  pid 4242  echo.echo  12B -> 12B  347µs  ok`.
fn human(ev: &Value) -> String {
    format!(
        "{}  pid {:<7}  {:<24}  {:>7} -> {:<7}  {:>8}  {}",
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
