//! A raw protocol peer for the security tests, run as another uid
//! (`CommandExt::uid`): it says exactly what the broker answered, on
//! standard output, one line per answer.
//!
//! ```text
//! zrpc-test-peer call --service S --method M [--instance I] [--id N] [--payload HEX]
//!     -> "result ok <payload hex>" | "result <code> <message>" | "fatal <code> <message>"
//! zrpc-test-peer park --service S --count N [--payload-size B | --payload HEX] [--method M]
//!         [--then-service S2 --then-count N2]
//!     -> the immediate answers ("result ..."), then "sent N"; stays
//! zrpc-test-peer partial --size N --sent M
//!     -> "sent" once M bytes of an N-byte frame are written; "closed ..."
//! zrpc-test-peer watch
//!     -> the result of zrpcd.monitor as `call` prints it, then
//!        "event <service>.<method>" per call event; stays
//! zrpc-test-peer flood --count N [--register NAME] [--conns C]
//!     -> "flooded" once N pings are written (pongs never read); stays
//! zrpc-test-peer flood-calls --conns C --count N [--paced B] [--ragged]
//!     -> on C connections at once, N NO_WAIT calls each to a name nobody
//!        holds, written as fast as the broker takes them (answers read and
//!        dropped; with --paced: B calls at a time, each burst once the
//!        answers to the last are read, so that the socket runs dry
//!        between bursts; with --ragged: first frames that grow the
//!        broker's read buffer to 16 MiB, then every write ends inside a
//!        frame, so that it never empties): "flooding" once all are
//!        connected, "flooded" when all are written; stays
//! zrpc-test-peer bloat --conns C [--call]
//!     -> on each of C connections, frames that grow the broker's read
//!        buffer to about 8 MiB and leave a partial frame at its end (with
//!        --call: a pending call's 9,000-byte argument read with them):
//!        "bloated K" once sent on K connections; stays
//! zrpc-test-peer backlog --conns C --mib M --leave L
//!     -> a service of its own answers calls of C connections of its own
//!        with 8,000 bytes each, M MiB per connection, left queued in the
//!        broker until all are answered, then read but the last L bytes:
//!        "pinned K" once done on K connections ("refused", "unanswered"
//!        or "closed" if not); stays
//! zrpc-test-peer churn --threads T --count N
//!     -> T threads each connect, complete the handshake and close, N
//!        times; "churned K" with the handshakes completed
//! zrpc-test-peer probe-stats --count N
//!     -> N calls of zrpcd.stats one after another on one connection,
//!        printing "calls <count>" (its counter of calls) for each
//! zrpc-test-peer register --name N [--shared] [--instance I] [--stay]
//!     -> "ack ok" | "ack <code> <message>"; then serves the name, answering
//!        every request with the string "HIJACKED" and printing
//!        "request <service>.<method> uid <caller uid>", until killed
//!        (with --stall: never reads again after "ack ok"; with --silent:
//!        answers only calls of the method "cancels", with the number of
//!        `Cancel` frames it received, and prints nothing more; with
//!        --stay: after a refusal too, staying connected and serving
//!        whatever the broker sends it, until killed or closed, then
//!        "fatal closed")
//! zrpc-test-peer register-many --prefix P --count N [--cycle [--cycles C]]
//!     -> registers P0, P1, ... P<N-1> on one connection, one at a time,
//!        stopping at the first refusal, which it prints as
//!        "ack <code> <message>" (with --cycle: then unregisters them all
//!        and registers them again, C times); then "registered K" with the names it
//!        holds; stays (answering pings) until killed
//! zrpc-test-peer listen --path P
//!     -> a plain listening socket at P (not a broker): "listening", then
//!        per connection accepted "conn read <N>", N the bytes of its first
//!        read (0: the peer closed its end without sending anything), and
//!        closes it
//! zrpc-test-peer page --method list|peers [--limit N]
//!     -> pages through zrpcd.<method> ({"after", "limit"} payloads):
//!        "paged <entries> in <pages> pages", or the failed call's
//!        "result <code> <message>"
//! zrpc-test-peer fd-hog --count N [--clients M] [--paced] [--junk] [--size B] [--plain-client]
//!     -> a service of its own answers N calls of each of M clients of its
//!        own (default 1), which never read, each with a payload descriptor
//!        (a sealed memfd of B bytes, default 1; the clients take
//!        descriptors unless --plain-client; with --paced: each once the previous answer reached its client,
//!        unpaced from the first that has not within 2 s); "hogged K" with
//!        the replies it could send; stays (with --junk: then each client
//!        sends a malformed frame, which gets it closed by the broker, and
//!        keeps its end open unread)
//! zrpc-test-peer fd-serve --name N --size B
//!     -> "ack ok" | "ack <code> <message>"; then serves the name, answering
//!        every request with a payload of B bytes in a sealed memfd, until
//!        killed
//! zrpc-test-peer fd-get --service S
//!     -> one call, offering payload descriptors: "result ok fd <bytes>" or
//!        "result ok inline <bytes>" (how the payload came), or as `call`
//!        prints the others
//! zrpc-test-peer fd-call --service S [--count N] [--huge]
//!     -> N NO_WAIT calls whose argument is a payload descriptor (with
//!        --huge: a sealed 2 MiB memfd made with MFD_HUGETLB and never
//!        written; "unsupported" if none can be made), sent at once; their
//!        results as `call` prints them
//! zrpc-test-peer junk-fd --path P [--count N] [--per-conn M] [--plain]
//!     -> on each of N connections: Hello (offering payload descriptors
//!        unless --plain), then M pings each sent with a fresh descriptor
//!        of P attached, all at once; then one line: "pong K" (all
//!        answered, the descriptors closed unread), "fatal <code> <message>"
//!        or "fatal closed"; "unsent" first if a send failed
//! zrpc-test-peer junk-together --path P --count N --per-conn M
//!     -> N connections made and greeted (Hello without payload
//!        descriptors, Welcome) first, then on each one ping sent with M
//!        fresh descriptors of P attached in the same message; then one
//!        line per connection as junk-fd prints them
//! ```
//!
//! The socket directory comes from `ZRPC_SOCKET_DIR`.

use std::io::Write;

use clap::Parser;
use zrpc_proto::{Envelope, Kind};
use zrpc_tests::raw::Raw;

mod buffers;
mod fds;
mod names;

#[derive(Debug, Parser)]
enum Cmd {
    /// Make one call and print its result.
    Call {
        #[arg(long)]
        service: String,
        #[arg(long)]
        method: String,
        /// Hello instance id (default: from the pid, unique per process).
        #[arg(long)]
        instance: Option<u64>,
        #[arg(long, default_value_t = 1)]
        id: u64,
        /// The payload, in hex (default: nil).
        #[arg(long, default_value = "c0")]
        payload: String,
    },
    /// Send COUNT calls without a deadline (to a name nobody serves, they
    /// stay pending), print the immediate answers, then "sent N" and stay.
    Park {
        #[arg(long)]
        service: String,
        #[arg(long)]
        count: u64,
        /// Each call's payload: a bin of this many bytes (default nil).
        #[arg(long, default_value_t = 0)]
        payload_size: usize,
        /// Each call's payload, in hex (instead of --payload-size).
        #[arg(long)]
        payload: Option<String>,
        /// The method called (default "m").
        #[arg(long, default_value = "m")]
        method: String,
        /// Hello instance id (default: from the pid, unique per process).
        #[arg(long)]
        instance: Option<u64>,
        /// Then this many more calls (ids after the first COUNT) ...
        #[arg(long, default_value_t = 0)]
        then_count: u64,
        /// ... to this service (default: SERVICE).
        #[arg(long)]
        then_service: Option<String>,
        /// Every call due this many milliseconds after the first is sent
        /// (all at one instant); results are then counted, not printed:
        /// "results N" once N have come.
        #[arg(long)]
        due_in_ms: Option<u64>,
    },
    /// Subscribe with zrpcd.monitor, print the result, then one line
    /// `event <service>.<method>` per Event frame (until killed).
    Watch {
        #[arg(long)]
        instance: Option<u64>,
    },
    /// Send COUNT pings and never read the pongs; print "flooded", then
    /// wait (until killed).
    Flood {
        #[arg(long)]
        count: u64,
        #[arg(long)]
        instance: Option<u64>,
        /// Register this name first (the connection is then a service).
        #[arg(long)]
        register: Option<String>,
        /// Flood on this many connections, made (and registered, NAME0,
        /// NAME1, ...) before any floods.
        #[arg(long, default_value_t = 1)]
        conns: usize,
    },
    /// NO_WAIT calls to a name nobody holds, on many connections at once.
    FloodCalls {
        #[arg(long)]
        conns: usize,
        #[arg(long)]
        count: u64,
        #[arg(long)]
        paced: Option<u64>,
        /// First grow the broker's read buffer for each connection to
        /// 16 MiB, then end every write inside a frame (so that the buffer
        /// never empties), with a 4 MiB send buffer.
        #[arg(long)]
        ragged: bool,
    },
    /// Read buffers grown to about 8 MiB holding a partial frame at their
    /// end, on CONNS connections.
    Bloat {
        #[arg(long)]
        conns: usize,
        /// A pending call with a 9,000-byte argument in place of the
        /// partial frame.
        #[arg(long)]
        call: bool,
    },
    /// Answers queued in the broker for CONNS connections of its own,
    /// MIB MiB each, then read but the last LEAVE bytes.
    Backlog {
        #[arg(long)]
        conns: usize,
        #[arg(long)]
        mib: usize,
        #[arg(long)]
        leave: usize,
    },
    /// Connections made and closed in a loop.
    Churn {
        #[arg(long)]
        threads: usize,
        #[arg(long)]
        count: u64,
    },
    /// zrpcd.stats calls in a row, printing one of its counters each time
    /// ("KEY N").
    ProbeStats {
        #[arg(long)]
        count: u64,
        /// The counter (default: calls).
        #[arg(long, default_value = "calls")]
        key: String,
    },
    /// Send the first SENT bytes of a frame announcing SIZE bytes, print
    /// "sent", then wait (printing "fatal ..." if the broker closes it).
    Partial {
        #[arg(long)]
        size: u32,
        #[arg(long)]
        sent: usize,
        #[arg(long)]
        instance: Option<u64>,
    },
    /// Open COUNT connections at once (all connected before any says
    /// Hello), then say Hello on each; print "welcomed K" with how many the
    /// broker took.
    Burst {
        #[arg(long)]
        count: usize,
    },
    /// Answer COUNT calls of a client that never reads, each with a
    /// payload descriptor, from a service of its own (name "hog").
    FdHog {
        #[arg(long)]
        count: u64,
        /// Bytes of the memfd each reply carries.
        #[arg(long, default_value_t = 1)]
        size: usize,
        /// The client does not negotiate descriptor passing (the broker
        /// sends it the replies' bytes inline).
        #[arg(long)]
        plain_client: bool,
        #[arg(long, default_value_t = 1)]
        clients: u64,
        #[arg(long)]
        paced: bool,
        #[arg(long)]
        junk: bool,
    },
    /// Serve NAME, answering with SIZE bytes in a sealed memfd.
    FdServe {
        #[arg(long)]
        name: String,
        #[arg(long)]
        size: usize,
    },
    /// One call offering payload descriptors; how its payload came.
    FdGet {
        #[arg(long)]
        service: String,
    },
    /// COUNT NO_WAIT calls whose argument is a payload descriptor.
    FdCall {
        #[arg(long)]
        service: String,
        #[arg(long, default_value_t = 1)]
        count: u64,
        /// A sealed 2 MiB memfd made with MFD_HUGETLB, never written.
        #[arg(long)]
        huge: bool,
    },
    /// Descriptors that are not payloads (PATH opened anew for each),
    /// sent on COUNT connections, PER_CONN pings each.
    JunkFd {
        #[arg(long)]
        path: String,
        #[arg(long, default_value_t = 1)]
        count: usize,
        #[arg(long, default_value_t = 1)]
        per_conn: u64,
        /// Do not offer payload descriptors in Hello.
        #[arg(long)]
        plain: bool,
    },
    /// COUNT connections greeted first, then PER_CONN descriptors of PATH
    /// sent on each in one message.
    JunkTogether {
        #[arg(long)]
        path: String,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        per_conn: usize,
    },
    /// Register `PREFIX0` to `PREFIX<COUNT-1>` on one connection.
    RegisterMany {
        #[arg(long)]
        prefix: String,
        #[arg(long)]
        count: u64,
        /// Unregister them all, then register them again.
        #[arg(long)]
        cycle: bool,
        /// With --cycle: that many times.
        #[arg(long, default_value_t = 1)]
        cycles: u64,
    },
    /// A plain listener at PATH: how many bytes each connection sent
    /// before closing (its first read).
    Listen {
        #[arg(long)]
        path: String,
    },
    /// Page through zrpcd.METHOD.
    Page {
        #[arg(long)]
        method: String,
        #[arg(long, default_value_t = 100)]
        limit: u64,
    },
    /// Register a name and serve it.
    Register {
        #[arg(long)]
        name: String,
        #[arg(long)]
        shared: bool,
        /// Hello instance id (default: from the pid, unique per process).
        #[arg(long)]
        instance: Option<u64>,
        /// After "ack ok", never read again (a service whose requests
        /// queue up), until killed.
        #[arg(long)]
        stall: bool,
        /// Answer only calls of the method "cancels": with the number of
        /// `Cancel` frames received so far (a service whose calls stay
        /// delivered).
        #[arg(long)]
        silent: bool,
        /// After a refusal, stay connected and serve anyway (so that a
        /// broker that let it join the name after all routes calls to it).
        #[arg(long)]
        stay: bool,
    },
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("hex payload"))
        .collect()
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Connects with `instance`; prints the `Fatal` and exits if refused.
fn connect(instance: Option<u64>) -> Raw {
    connect_caps(instance, 0)
}

/// [`connect`] offering the capabilities `caps`.
fn connect_caps(instance: Option<u64>, caps: u32) -> Raw {
    let instance = instance.unwrap_or((1 << 32) | u64::from(std::process::id()));
    let dir = zrpc_proto::resolve_socket_dir(None);
    let mut r = Raw::connect(&dir);
    match r.hello_caps(instance, caps) {
        Some((Kind::Welcome, _)) => r,
        Some((_, f)) => {
            if let Ok(Envelope::Fatal { code, message }) = f.decode() {
                say(&format!("fatal {code} {message}"));
            }
            std::process::exit(0);
        }
        None => {
            say("fatal closed");
            std::process::exit(0);
        }
    }
}

/// Prints the first `Result` (or `Fatal`) on `r`, as `call` does.
fn say_result(r: &mut Raw) {
    loop {
        let Some(f) = r.recv_frame() else {
            return say("fatal closed");
        };
        match f.decode() {
            Ok(Envelope::Result { code: None, .. }) => {
                return say(&format!("result ok {}", hex(&f.payload)));
            }
            Ok(Envelope::Result {
                code: Some(c),
                message,
                ..
            }) => return say(&format!("result {c} {message}")),
            Ok(Envelope::Fatal { code, message }) => {
                return say(&format!("fatal {code} {message}"));
            }
            _ => {}
        }
    }
}

fn main() {
    match Cmd::parse() {
        Cmd::RegisterMany {
            prefix,
            count,
            cycle,
            cycles,
        } => names::register_many(&prefix, count, if cycle { cycles } else { 0 }),
        Cmd::Page { method, limit } => names::page(&method, limit),
        Cmd::Listen { path } => {
            let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
            say("listening");
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let mut buf = [0u8; 4096];
                let n = std::io::Read::read(&mut conn, &mut buf).unwrap_or(0);
                say(&format!("conn read {n}"));
            }
        }
        Cmd::JunkTogether {
            path,
            count,
            per_conn,
        } => fds::junk_together(&path, count, per_conn),
        Cmd::JunkFd {
            path,
            count,
            per_conn,
            plain,
        } => fds::junk_fd(&path, count, per_conn, plain),
        Cmd::FdHog {
            count,
            clients,
            paced,
            junk,
            size,
            plain_client,
        } => fds::fd_hog(count, clients, paced, junk, size, plain_client),
        Cmd::FdServe { name, size } => fds::fd_serve(&name, size),
        Cmd::FdGet { service } => fds::fd_get(&service),
        Cmd::FdCall {
            service,
            count,
            huge,
        } => {
            let mut r = connect_caps(None, zrpc_proto::caps::FD_PAYLOADS);
            let memfd: std::os::fd::OwnedFd = if huge {
                match fds::huge_memfd() {
                    Some(fd) => fd,
                    None => return say("unsupported"),
                }
            } else {
                let memfd = zrpc_io::fdpass::SealedFd::create(b"\xc0").expect("memfd");
                std::os::fd::AsFd::as_fd(&memfd)
                    .try_clone_to_owned()
                    .expect("dup")
            };
            for id in 1..=count {
                r.send_fd(
                    &Envelope::Call {
                        id,
                        service: &service,
                        method: "m",
                        timeout_ms: Some(10_000),
                        flags: zrpc_proto::flags::NO_WAIT,
                    },
                    &memfd,
                    &[],
                );
            }
            for _ in 0..count {
                say_result(&mut r);
            }
        }
        Cmd::Call {
            service,
            method,
            instance,
            id,
            payload,
        } => {
            let mut r = connect(instance);
            r.send(
                &Envelope::Call {
                    id,
                    service: &service,
                    method: &method,
                    timeout_ms: Some(10_000),
                    flags: 0,
                },
                &unhex(&payload),
            );
            say_result(&mut r);
        }
        Cmd::Watch { instance } => {
            let mut r = connect(instance);
            r.send(
                &Envelope::Call {
                    id: 1,
                    service: "zrpcd",
                    method: "monitor",
                    timeout_ms: Some(10_000),
                    flags: 0,
                },
                b"\xc0",
            );
            say_result(&mut r);
            while let Some(f) = r.recv_frame() {
                match f.decode() {
                    Ok(Envelope::Event { .. }) => {
                        let v = rmpv::decode::read_value(&mut &f.payload[..]).ok();
                        let field = |k: &str| {
                            v.as_ref()
                                .and_then(|v| v.as_map())
                                .and_then(|m| m.iter().find(|(key, _)| key.as_str() == Some(k)))
                                .and_then(|(_, v)| v.as_str().map(str::to_owned))
                                .unwrap_or_default()
                        };
                        say(&format!("event {}.{}", field("service"), field("method")));
                    }
                    Ok(Envelope::Ping { nonce }) => r.send(&Envelope::Pong { nonce }, b""),
                    _ => {}
                }
            }
            say("fatal closed");
        }
        Cmd::Park {
            service,
            count,
            payload_size,
            payload,
            method,
            instance,
            then_count,
            then_service,
            due_in_ms,
        } => {
            let mut r = connect(instance);
            let start = std::time::Instant::now();
            let timeout_ms =
                || due_in_ms.map(|d| d.saturating_sub(start.elapsed().as_millis() as u64).max(1));
            let payload = if let Some(hex) = payload {
                unhex(&hex)
            } else if payload_size == 0 {
                vec![0xc0]
            } else {
                let mut p = vec![0xc6];
                p.extend_from_slice(&(payload_size as u32).to_be_bytes());
                p.resize(5 + payload_size, 0x55);
                p
            };
            let then = then_service.as_deref().unwrap_or(&service);
            for id in 1..=count + then_count {
                r.send(
                    &Envelope::Call {
                        id,
                        service: if id <= count { &service } else { then },
                        method: &method,
                        timeout_ms: timeout_ms(),
                        flags: 0,
                    },
                    &payload,
                );
            }
            // A ping round trip: every immediate answer has arrived.
            r.send(&Envelope::Ping { nonce: 7 }, b"");
            let mut results = 0;
            while let Some(f) = r.recv_frame() {
                match f.decode() {
                    Ok(Envelope::Result { .. }) if due_in_ms.is_some() => {
                        results += 1;
                        if results == count + then_count {
                            say(&format!("results {results}"));
                        }
                    }
                    Ok(Envelope::Result { code, message, .. }) => say(&format!(
                        "result {} {message}",
                        code.map_or("ok".to_string(), |c| c.to_string())
                    )),
                    Ok(Envelope::Pong { nonce: 7 }) => say(&format!("sent {count}")),
                    Ok(Envelope::Ping { nonce }) => r.send(&Envelope::Pong { nonce }, b""),
                    _ => {}
                }
            }
        }
        Cmd::Partial {
            size,
            sent,
            instance,
        } => {
            let mut r = connect(instance);
            let mut head = size.to_be_bytes().to_vec();
            head.extend_from_slice(&3u32.to_be_bytes());
            let mut body = vec![0x91, 0x0b, 0x00];
            body.resize(sent, 0);
            let _ = std::io::Write::write_all(&mut r.s, &head);
            let _ = std::io::Write::write_all(&mut r.s, &body);
            say("sent");
            match r.recv_frame().map(|f| f.decode().map(|e| format!("{e:?}"))) {
                Some(Ok(e)) if e.starts_with("Fatal") => say(&format!("closed {e}")),
                _ => say("closed"),
            }
        }
        Cmd::Burst { count } => {
            let dir = zrpc_proto::resolve_socket_dir(None);
            let mut conns: Vec<Raw> = (0..count).map(|_| Raw::connect(&dir)).collect();
            let base = (1u64 << 40) | (u64::from(std::process::id()) << 16);
            let mut welcomed = 0;
            for (i, r) in conns.iter_mut().enumerate() {
                if matches!(r.hello_as(base + i as u64), Some((Kind::Welcome, _))) {
                    welcomed += 1;
                }
            }
            say(&format!("welcomed {welcomed}"));
        }
        Cmd::Flood {
            count,
            instance,
            register,
            conns,
        } => {
            let mut all: Vec<_> = (0..conns.max(1)).map(|_| connect(instance)).collect();
            if let Some(name) = register {
                for (i, r) in all.iter_mut().enumerate() {
                    let name = if conns > 1 {
                        format!("{name}{i}")
                    } else {
                        name.clone()
                    };
                    zrpc_tests::raw::register(r, &name);
                }
            }
            let mut out = bytes::BytesMut::new();
            for nonce in 0..count {
                zrpc_proto::encode_frame(&mut out, &Envelope::Ping { nonce }, b"");
            }
            for r in &mut all {
                // The broker may close the connection before taking it all.
                let _ = std::io::Write::write_all(&mut r.s, &out);
            }
            say("flooded");
            std::thread::sleep(std::time::Duration::from_secs(60));
        }
        Cmd::FloodCalls {
            conns,
            count,
            paced,
            ragged,
        } => {
            let all: Vec<_> = (0..conns.max(1)).map(|_| connect(None)).collect();
            let whole = if ragged { 10_000 } else { count };
            let burst = paced.unwrap_or(whole).clamp(1, count.max(1));
            let mut out = bytes::BytesMut::new();
            for id in 1..=burst {
                let call = Envelope::Call {
                    id,
                    service: "nobody",
                    method: "m",
                    timeout_ms: None,
                    flags: zrpc_proto::flags::NO_WAIT,
                };
                zrpc_proto::encode_frame(&mut out, &call, b"\xc0");
            }
            let out = out.freeze();
            say("flooding");
            let writers: Vec<_> = all
                .into_iter()
                .map(|mut r| {
                    let out = out.clone();
                    std::thread::spawn(move || {
                        if paced.is_some() {
                            // A burst, then its answers, then the next.
                            for _ in 0..count / burst {
                                if r.s.write_all(&out).is_err() {
                                    break;
                                }
                                for _ in 0..burst {
                                    if r.recv_frame().is_none() {
                                        return r.s;
                                    }
                                }
                            }
                            return r.s;
                        }
                        let mut rd = r.s.try_clone().expect("clone the socket");
                        let _ = rd.set_read_timeout(None);
                        std::thread::spawn(move || {
                            let mut buf = vec![0u8; 1 << 16];
                            while matches!(std::io::Read::read(&mut rd, &mut buf), Ok(n) if n > 0) {
                            }
                        });
                        // The broker may close the connection before taking it all.
                        if ragged {
                            buffers::ragged(&mut r.s, &out, count / burst);
                            return r.s;
                        }
                        for _ in 0..count / burst {
                            if r.s.write_all(&out).is_err() {
                                break;
                            }
                        }
                        r.s
                    })
                })
                .collect();
            // Kept open until killed.
            let _open: Vec<_> = writers.into_iter().filter_map(|w| w.join().ok()).collect();
            say("flooded");
            std::thread::sleep(std::time::Duration::from_secs(60));
        }
        Cmd::Bloat { conns, call } => buffers::bloat(conns, call),
        Cmd::Backlog { conns, mib, leave } => buffers::backlog(conns, mib, leave),
        Cmd::Churn { threads, count } => {
            let done: u64 = (0..threads.max(1))
                .map(|_| {
                    std::thread::spawn(move || {
                        let mut n = 0;
                        for _ in 0..count {
                            let dir = zrpc_proto::resolve_socket_dir(None);
                            let mut r = Raw::connect(&dir);
                            if matches!(r.hello_as(7), Some((Kind::Welcome, _))) {
                                n += 1;
                            }
                        }
                        n
                    })
                })
                .collect::<Vec<_>>()
                .into_iter()
                .map(|t| t.join().unwrap_or(0))
                .sum();
            say(&format!("churned {done}"));
        }
        Cmd::ProbeStats { count, key } => {
            let mut r = connect(None);
            for id in 1..=count {
                r.send(
                    &Envelope::Call {
                        id,
                        service: "zrpcd",
                        method: "stats",
                        timeout_ms: None,
                        flags: 0,
                    },
                    b"\xc0",
                );
                let Some(f) = r.recv_frame() else {
                    return say("fatal closed");
                };
                match f.decode() {
                    Ok(Envelope::Result { code: None, .. }) => {
                        let stats =
                            rmpv::decode::read_value(&mut &f.payload[..]).expect("a stats map");
                        let n = stats
                            .as_map()
                            .and_then(|m| m.iter().find(|(k, _)| k.as_str() == Some(key.as_str())))
                            .and_then(|(_, v)| v.as_u64())
                            .expect("the counter in the stats");
                        say(&format!("{key} {n}"));
                    }
                    Ok(Envelope::Result { code, message, .. }) => {
                        return say(&format!("result {code:?} {message}"));
                    }
                    _ => return say("unexpected frame"),
                }
            }
        }
        Cmd::Register {
            name,
            shared,
            instance,
            stall,
            silent,
            stay,
        } => {
            let mut r = connect(instance);
            let mut cancels: u64 = 0;
            r.send(
                &Envelope::Register {
                    req: 1,
                    name: &name,
                    shared,
                },
                b"",
            );
            while let Some(f) = r.recv_frame() {
                match f.decode() {
                    Ok(Envelope::Ack { code: None, .. }) => {
                        say("ack ok");
                        if stall {
                            loop {
                                std::thread::park();
                            }
                        }
                    }
                    Ok(Envelope::Ack {
                        code: Some(c),
                        message,
                        ..
                    }) => {
                        say(&format!("ack {c} {message}"));
                        if !stay {
                            return;
                        }
                        // Until killed: no read timeout (a refused
                        // connection is sent nothing, not even pings).
                        let _ = r.s.set_read_timeout(None);
                    }
                    Ok(Envelope::Cancel { .. }) => cancels += 1,
                    Ok(Envelope::Request { id, method, .. }) if silent && method == "cancels" => {
                        let count = rmp_serde::to_vec(&cancels).expect("encode a count");
                        r.send(
                            &Envelope::Reply {
                                id,
                                code: None,
                                message: "",
                            },
                            &count,
                        );
                    }
                    Ok(Envelope::Request { .. }) if silent => {}
                    Ok(Envelope::Request {
                        id,
                        service,
                        method,
                        caller,
                        ..
                    }) => {
                        say(&format!(
                            "request {service}.{method} uid {}",
                            caller.map_or(-1, |c| i64::from(c.uid))
                        ));
                        r.send(
                            &Envelope::Reply {
                                id,
                                code: None,
                                message: "",
                            },
                            b"\xa8HIJACKED",
                        );
                    }
                    Ok(Envelope::Ping { nonce }) => r.send(&Envelope::Pong { nonce }, b""),
                    _ => {}
                }
            }
            if stay {
                say("fatal closed");
            }
        }
    }
}
