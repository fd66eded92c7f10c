//! Every limit of the broker, liveness detection and backpressure, against
//! the real `zrpcd`: the offender gets a typed error, everybody else carries
//! on, and the broker's memory stays bounded.

use std::io::Write;
use std::os::unix::fs::symlink;
use std::process::Command;
use std::time::Duration;

use zrpc_client::{BlockingClient, CallOptions, Error, Value};
use zrpc_proto::{Envelope, ErrorCode};
use zrpc_tests::raw::Raw;
use zrpc_tests::{bin, broker_stat, wait_registered, wait_until, Broker, TempDir, WAIT};

const T: Option<Duration> = Some(Duration::from_secs(20));

fn call_env<'a>(id: u64, service: &'a str) -> Envelope<'a> {
    Envelope::Call {
        id,
        service,
        method: "m",
        timeout_ms: Some(60_000),
        flags: 0,
    }
}

fn result_code(r: &mut Raw, want_id: u64) -> Option<ErrorCode> {
    loop {
        let f = r.recv_frame().expect("a result");
        if let Ok(Envelope::Result { id, code, .. }) = f.decode() {
            if id == want_id {
                return code;
            }
        }
    }
}

#[test]
fn max_connections() {
    let b = Broker::start_with(&["--max-connections", "3"]);
    let first = Raw::hello(b.dir());
    let _second = Raw::hello(b.dir());
    let _third = Raw::hello(b.dir());
    let mut fourth = Raw::connect(b.dir());
    let msg = fourth.expect_fatal(ErrorCode::LimitExceeded);
    assert!(msg.contains("--max-connections"), "{msg}");
    drop(first);
    // Once one leaves, a new connection is accepted again.
    assert!(wait_until(WAIT, || {
        let mut r = Raw::connect(b.dir());
        r.send(
            &Envelope::Hello {
                version: 1,
                instance: 9,
                agent: "t",
                caps: 0,
            },
            b"",
        );
        matches!(r.recv(), Some((zrpc_proto::Kind::Welcome, _)))
    }));
}

#[test]
fn max_pending_per_connection_and_total() {
    let b = Broker::start_with(&["--max-pending-per-conn", "2", "--max-pending-total", "3"]);
    let mut one = Raw::hello(b.dir());
    // Calls to a missing name wait (pending) at the broker.
    one.send(&call_env(1, "ghost"), b"\xc0");
    one.send(&call_env(2, "ghost"), b"\xc0");
    one.send(&call_env(3, "ghost"), b"\xc0");
    assert_eq!(result_code(&mut one, 3), Some(ErrorCode::LimitExceeded));
    let mut two = Raw::hello(b.dir());
    two.send(&call_env(1, "ghost"), b"\xc0");
    two.send(&call_env(2, "ghost"), b"\xc0");
    assert_eq!(result_code(&mut two, 2), Some(ErrorCode::LimitExceeded));
    assert_eq!(broker_stat(b.dir(), "pending"), 3);
    // The connection itself stays usable.
    assert_eq!(two.call(9, "zrpcd", "ping", None).0, None);
}

#[test]
fn max_names_per_connection() {
    let b = Broker::start_with(&["--max-names-per-conn", "2"]);
    let mut r = Raw::hello(b.dir());
    for (req, name) in [(1, "a"), (2, "b"), (3, "c")] {
        r.send(
            &Envelope::Register {
                req,
                name,
                shared: false,
            },
            b"",
        );
    }
    let mut codes = Vec::new();
    while codes.len() < 3 {
        let f = r.recv_frame().expect("ack");
        if let Ok(Envelope::Ack { code, .. }) = f.decode() {
            codes.push(code);
        }
    }
    assert_eq!(codes, vec![None, None, Some(ErrorCode::LimitExceeded)]);
}

#[test]
fn stopped_service_is_detected_by_heartbeats_and_its_call_redelivered() {
    let b = Broker::start_with(&["--heartbeat-interval", "0.1", "--heartbeat-timeout", "1"]);
    let stopped = b.spawn("zrpc-test-svc", &["--shared"]);
    wait_registered(b.dir(), "echo", 1);
    stopped.signal(libc::SIGSTOP);
    // The call is delivered to the stopped instance...
    let dir = b.dir().to_path_buf();
    let call = std::thread::spawn(move || {
        let c = BlockingClient::connect_to(&dir).expect("connect");
        c.call::<_, u32>("echo", "pid", &(), T)
    });
    assert!(wait_until(WAIT, || broker_stat(b.dir(), "pending") == 1));
    // ...and re-delivered to a live one once the broker declares it dead.
    let live = b.spawn("zrpc-test-svc", &["--shared"]);
    let pid = call.join().expect("thread").expect("answered");
    assert_eq!(pid, live.pid() as u32);
    assert_eq!(broker_stat(b.dir(), "heartbeat_timeouts"), 1);
    wait_registered(b.dir(), "echo", 1);
    stopped.signal(libc::SIGCONT);
}

/// Raises this process's soft limit of open descriptors to its hard limit
/// (filling a listen backlog takes one per queued connection: up to
/// `net.core.somaxconn`, 4096 by default).
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write the rlimit we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Fills the listen backlog of the (stopped) broker at `sock` with
/// non-blocking connections until the kernel refuses one (`EAGAIN`), and
/// returns them (they keep the backlog full while they are open).
fn fill_backlog(sock: &std::path::Path) -> Vec<std::os::fd::OwnedFd> {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    raise_fd_limit();
    let addr = SocketAddrUnix::new(sock).expect("socket address");
    let mut queued = Vec::new();
    // Bounded: somaxconn is at most 65535 (plus one the kernel lets in).
    for _ in 0..70_000 {
        let fd = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::STREAM,
            SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
            None,
        )
        .expect("socket (raise the limit of open files: ulimit -n)");
        match rustix::net::connect(&fd, &addr) {
            Ok(()) => queued.push(fd),
            Err(rustix::io::Errno::AGAIN) => return queued,
            Err(e) => panic!(
                "connect #{} to fill the backlog: {e} (ulimit -n too low?)",
                queued.len()
            ),
        }
    }
    panic!("the listen backlog did not fill after 70,000 connections");
}

/// Runs `f` on a thread; the returned function waits until `until` at
/// most for its result and how long it took (`None`: it is still running).
fn by<T: Send + 'static>(
    until: std::time::Instant,
    f: impl FnOnce() -> T + Send + 'static,
) -> impl FnOnce() -> Option<(T, Duration)> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let start = std::time::Instant::now();
        let r = f();
        let _ = tx.send((r, start.elapsed()));
    });
    move || {
        rx.recv_timeout(until.saturating_duration_since(std::time::Instant::now()))
            .ok()
    }
}

/// Connecting to a broker that is stopped (SIGSTOP) or wedged with its
/// listen backlog full is bounded by the handshake's timeout: a blocking
/// connect to a UNIX socket whose backlog is full waits until the listener
/// accepts, for ever, unless bounded.
#[test]
fn connecting_to_a_stopped_broker_with_a_full_backlog_is_bounded() {
    use zrpc_io::handshake::{connect, connect_blocking, hello_frame, HandshakeError};
    let mut b = Broker::start();
    // A client connected before: its broker is replaced by one that is
    // stopped, and its next call must reconnect.
    let c = BlockingClient::connect_to(b.dir()).expect("connect");
    b.restart(libc::SIGKILL);
    assert!(b.proc.stop(), "zrpcd did not stop");
    let sock = b.socket();
    let queued = fill_backlog(&sock);
    assert!(!queued.is_empty());

    // Every attempt below is bounded by far less than this.
    let until = std::time::Instant::now() + WAIT;
    let short = Duration::from_millis(300);
    let path = sock.clone();
    let blocking = by(until, move || {
        connect_blocking(&path, &hello_frame(1, "t"), short).map(|_| ())
    });
    // The async connect fails at once (a non-blocking connect to a full
    // backlog says EAGAIN): its timeout, far longer than `slow` below,
    // tells that apart from waiting it out.
    let path = sock.clone();
    let on_tokio = by(until, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(connect(&path, &hello_frame(2, "t"), 2 * WAIT))
            .map(|_| ())
    });
    // The client's connect has its own timeout (10 s by default).
    let dir = b.dir().to_path_buf();
    let client = by(until, move || {
        BlockingClient::builder()
            .socket_dir(dir)
            .connect_timeout(short)
            .connect_blocking()
            .map(|_| ())
    });
    // The call's deadline bounds its reconnection.
    let call = by(until, move || {
        c.call::<_, Value>("zrpcd", "ping", &(), Some(Duration::from_secs(1)))
    });
    let (blocking, on_tokio, client, call) = (blocking(), on_tokio(), client(), call());
    b.proc.signal(libc::SIGCONT);
    drop(queued);

    // Every outcome is checked before failing, so that a failure shows
    // all of them.
    let mut wrong = Vec::new();
    let slow = Duration::from_secs(5);
    let says_why = |e: &dyn std::fmt::Display| e.to_string().contains("listen backlog is full");
    match blocking {
        Some((Err(HandshakeError::Connect { path, source }), took))
            if path == sock
                && source.kind() == std::io::ErrorKind::TimedOut
                && says_why(&source)
                && took < slow => {}
        Some((r, took)) => wrong.push(format!(
            "connect_blocking: expected a TimedOut connect error within {slow:?}, got {r:?} after {took:?}"
        )),
        None => wrong.push("connect_blocking did not return".into()),
    }
    match on_tokio {
        Some((Err(HandshakeError::Connect { path, source }), took))
            if path == sock && says_why(&source) && took < slow => {}
        Some((r, took)) => wrong.push(format!(
            "connect: expected a connect error within {slow:?}, got {r:?} after {took:?}"
        )),
        None => wrong.push("connect did not return".into()),
    }
    match client {
        Some((Err(e @ Error::Connect { .. }), _)) if says_why(&e) => {}
        Some((r, took)) => wrong.push(format!(
            "BlockingClient::connect: expected Connect, got {r:?} after {took:?}"
        )),
        None => wrong.push("BlockingClient::connect did not return".into()),
    }
    match call {
        Some((Err(Error::Timeout { .. }), took)) if took < slow => {}
        Some((r, took)) => wrong.push(format!(
            "a call reconnecting: expected Timeout within {slow:?}, got {r:?} after {took:?}"
        )),
        None => wrong.push("a call reconnecting did not return".into()),
    }
    assert!(
        wrong.is_empty(),
        "against a stopped broker with a full backlog, within {WAIT:?}:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn client_that_never_reads_is_disconnected_and_others_carry_on() {
    let b = Broker::start_with(&["--max-queued-bytes", "1048576"]);
    let _svc = b.spawn("zrpc-test-svc", &[]);
    let _other = b.spawn("zrpc-test-svc", &["--name", "other"]);
    wait_registered(b.dir(), "echo", 1);
    wait_registered(b.dir(), "other", 1);
    let good = BlockingClient::connect_to(b.dir()).expect("connect");
    // 256 KiB bin payload, echoed back: results pile up unread.
    let mut payload = vec![0xc6, 0, 4, 0, 0];
    payload.resize(5 + 256 * 1024, 7);
    let mut greedy = Raw::hello(b.dir());
    greedy
        .s
        .set_write_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut sent = 0u64;
    for id in 1..=400u64 {
        let env = Envelope::Call {
            id,
            service: "echo",
            method: "echo",
            timeout_ms: Some(60_000),
            flags: 0,
        };
        let mut out = bytes::BytesMut::new();
        zrpc_proto::encode_frame(&mut out, &env, &payload);
        if greedy.s.write_all(&out).is_err() {
            break; // disconnected by the broker (or our write blocked)
        }
        sent += 1;
        if id % 20 == 0 {
            let r: Value = good
                .call("other", "echo", &id, T)
                .expect("others are served");
            assert_eq!(r, Value::from(id));
        }
    }
    assert!(sent > 4, "sent {sent}");
    // The broker dropped the greedy client: our good client, the two
    // services and the stats connection remain.
    assert!(
        wait_until(WAIT, || broker_stat(b.dir(), "connections") == 4),
        "greedy client still connected"
    );
    // The broker closes the greedy client's socket even though it never
    // reads: reading what is buffered ends with end of stream.
    greedy.s.set_read_timeout(Some(WAIT)).expect("timeout");
    let mut sink = vec![0u8; 1 << 20];
    let eof = loop {
        match std::io::Read::read(&mut greedy.s, &mut sink) {
            Ok(0) => break true,
            Ok(_) => {}
            Err(_) => break false,
        }
    };
    assert!(eof, "the broker closed the greedy client's socket");
    let r: Value = good
        .call("other", "echo", &"after", T)
        .expect("still served");
    assert_eq!(r, Value::from("after"));
    // Memory stayed bounded: far below 400 x 256 KiB = 100 MiB.
    let rss = b.proc.rss_kib();
    assert!(rss < 64 * 1024, "broker RSS {rss} KiB");
}

#[test]
fn service_that_never_reads_gets_calls_refused_not_memory() {
    let b = Broker::start_with(&["--max-queued-bytes", "1048576"]);
    let _svc = b.spawn("zrpc-test-svc", &[]);
    wait_registered(b.dir(), "echo", 1);
    // A "service" that registers and then never reads.
    let mut sink = Raw::hello(b.dir());
    sink.send(
        &Envelope::Register {
            req: 1,
            name: "sink",
            shared: false,
        },
        b"",
    );
    let f = sink.recv_frame().expect("ack");
    assert!(matches!(f.decode(), Ok(Envelope::Ack { code: None, .. })));
    let c = BlockingClient::connect_to(b.dir()).expect("connect");
    let big = serde_bytes::ByteBuf::from(vec![1u8; 256 * 1024]);
    let opts = CallOptions::timeout(Duration::from_millis(200));
    let mut refused = 0;
    for i in 0..200 {
        match c.call_with::<_, Value>("sink", "m", &big, opts) {
            Err(Error::LimitExceeded(msg)) => {
                assert!(msg.contains("sink"), "{msg}");
                refused += 1;
                break;
            }
            Err(Error::Timeout { .. }) => {}
            other => panic!("call {i}: {other:?}"),
        }
    }
    assert_eq!(refused, 1, "calls to the saturated service are refused");
    // Other services are not affected.
    let r: Value = c.call("echo", "echo", &1, T).expect("echo served");
    assert_eq!(r, Value::from(1));
    let rss = b.proc.rss_kib();
    assert!(rss < 64 * 1024, "broker RSS {rss} KiB");
    drop(sink);
}

fn vm_kib(pid: i32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("field")
}

#[test]
fn announced_frame_sizes_do_not_reserve_memory_up_front() {
    // Headers announcing 15 MiB frames, and nothing more, on 40
    // connections: the broker must not reserve 40 x 15 MiB for them (it
    // reserves at most 4 MiB up front per frame).
    let b = Broker::start();
    let pid = b.proc.pid();
    let before = vm_kib(pid, "VmSize:");
    let mut conns: Vec<_> = (0..40).map(|_| Raw::hello(b.dir())).collect();
    for r in &mut conns {
        let header = [&(15u32 << 20).to_be_bytes()[..], &8u32.to_be_bytes()[..]].concat();
        r.s.write_all(&header).expect("write");
    }
    // The broker's single loop handles ready connections in order: once it
    // answers a ping sent after the headers, it has read them.
    let mut probe = Raw::hello(b.dir());
    probe.send(&Envelope::Ping { nonce: 7 }, b"");
    let (kind, _) = probe.recv().expect("pong");
    assert_eq!(kind, zrpc_proto::Kind::Pong);
    let grown_mib = vm_kib(pid, "VmSize:").saturating_sub(before) / 1024;
    assert!(
        grown_mib < 40 * 15 / 2,
        "VmSize grew by {grown_mib} MiB for 40 header-only 15 MiB frames"
    );
    drop(conns);
}

#[test]
fn unsafe_socket_dirs_are_refused() {
    let tmp = TempDir::new();
    let real = tmp.path().join("real");
    std::fs::create_dir(&real).expect("mkdir");
    let link = tmp.path().join("link");
    symlink(&real, &link).expect("symlink");
    let out = Command::new(bin("zrpcd"))
        .arg("--socket-dir")
        .arg(&link)
        .output()
        .expect("run zrpcd");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("symbolic link"), "{err}");

    if zrpc_tests::is_root(
        "unsafe_socket_dirs_are_refused (a directory of another owner)",
        "needs root to chown a directory to another uid",
    ) {
        let other = tmp.path().join("other");
        std::fs::create_dir(&other).expect("mkdir");
        std::os::unix::fs::chown(&other, Some(4242), Some(4242)).expect("chown");
        let out = Command::new(bin("zrpcd"))
            .arg("--socket-dir")
            .arg(&other)
            .output()
            .expect("run zrpcd");
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("owned by uid 4242"), "{err}");
    }
}

#[test]
fn a_connect_timeout_bounds_the_handshake_with_a_stopped_broker() {
    // A stopped broker still has room in its listen backlog: the kernel
    // completes the connection, but nobody answers `Hello`. Both faces
    // give up at their connect timeout (default 10 s).
    let b = Broker::start();
    b.proc.signal(libc::SIGSTOP);
    let short = Duration::from_millis(300);
    let start = std::time::Instant::now();
    let r = BlockingClient::builder()
        .socket_dir(b.dir())
        .connect_timeout(short)
        .connect_blocking();
    let blocking_took = start.elapsed();
    let rt = zrpc_tests::runtime();
    let start = std::time::Instant::now();
    let a = rt.block_on(
        zrpc_client::Client::builder()
            .socket_dir(b.dir())
            .connect_timeout(short)
            .connect(),
    );
    let async_took = start.elapsed();
    b.proc.signal(libc::SIGCONT);
    assert!(matches!(r, Err(Error::Connect { .. })), "{r:?}");
    assert!(matches!(a, Err(Error::Connect { .. })), "{:?}", a.err());
    for took in [blocking_took, async_took] {
        assert!(
            took >= Duration::from_millis(250) && took < Duration::from_secs(5),
            "gave up after {took:?} with a 300 ms connect timeout"
        );
    }
    // The broker, running again, takes the same clients.
    BlockingClient::builder()
        .socket_dir(b.dir())
        .connect_timeout(short)
        .connect_blocking()
        .expect("connect after SIGCONT");
}

#[test]
fn a_services_connect_timeout_bounds_its_first_connection_to_a_stopped_broker() {
    let b = Broker::start();
    b.proc.signal(libc::SIGSTOP);
    let dir = b.dir().to_path_buf();
    let start = std::time::Instant::now();
    let (tx, rx) = std::sync::mpsc::channel();
    // A `Server` is not `Send`: made on the thread that runs it.
    std::thread::spawn(move || {
        let svc = zrpc_service::ServiceBuilder::new("late")
            .method("nothing", |_ctx: &zrpc_service::Context, (): ()| {
                Ok::<_, String>(())
            })
            .build();
        let r = zrpc_service::Server::new(svc)
            .socket_dir(&dir)
            .stop_on_signals(false)
            .connect_timeout(Duration::from_millis(300))
            .run();
        let _ = tx.send(r);
    });
    let r = rx.recv_timeout(WAIT).expect("run returns");
    let took = start.elapsed();
    b.proc.signal(libc::SIGCONT);
    assert!(
        matches!(r, Err(zrpc_service::Error::HandshakeTimeout(t)) if t == Duration::from_millis(300)),
        "{r:?}"
    );
    assert!(took < Duration::from_secs(5), "gave up after {took:?}");
}

#[test]
fn max_names_in_the_whole_broker() {
    let b = Broker::start_with(&["--max-names", "3"]);
    let mut one = Raw::hello(b.dir());
    let mut two = Raw::hello(b.dir());
    for name in ["a", "b"] {
        zrpc_tests::raw::register(&mut one, name);
    }
    zrpc_tests::raw::register(&mut two, "c");
    // Root too: this limit is the broker's, not a user's quota.
    let mut three = Raw::hello(b.dir());
    three.send(
        &Envelope::Register {
            req: 9,
            name: "d",
            shared: false,
        },
        b"",
    );
    let msg = loop {
        let f = three.recv_frame().expect("ack");
        if let Ok(Envelope::Ack { code, message, .. }) = f.decode() {
            assert_eq!(code, Some(ErrorCode::LimitExceeded), "{message}");
            break message.to_string();
        }
    };
    assert!(msg.contains("--max-names)"), "{msg}");
    // Freed when a holder leaves.
    drop(one);
    assert!(wait_until(WAIT, || broker_stat(b.dir(), "names") == 1));
    zrpc_tests::raw::register(&mut three, "d");
}

/// A service connection is given at most `--max-delivered-per-conn` calls
/// at once; the rest wait in the broker and are delivered as answers free
/// room, and a service that leaves has its calls re-delivered into that
/// wait, all of them then delivered to the next instance.
#[test]
fn calls_past_a_services_window_wait_in_the_broker() {
    let b = Broker::start_with(&["--max-delivered-per-conn", "4"]);
    // A service that reads its requests and never answers.
    let mut silent = b.spawn(
        "zrpc-test-peer",
        &["register", "--name", "sink", "--silent"],
    );
    silent
        .read_until(|l| l == "ack ok")
        .expect("sink registered");
    let mut caller = b.spawn(
        "zrpc-test-peer",
        &["park", "--service", "sink", "--count", "10"],
    );
    assert_eq!(
        caller.read_until(|l| l.starts_with("sent")).as_deref(),
        Some("sent 10")
    );
    assert_eq!(broker_stat(b.dir(), "waiting"), 6, "4 delivered, 6 waiting");
    assert_eq!(broker_stat(b.dir(), "pending"), 10);
    // The service leaves: its 4 calls are re-delivered, and wait with the
    // rest for an instance.
    drop(silent);
    assert!(
        wait_until(WAIT, || broker_stat(b.dir(), "waiting") == 10),
        "the departed service's calls do not wait"
    );
    // An instance that answers: the 10 calls go through its window of 4.
    let mut answering = b.spawn("zrpc-test-peer", &["register", "--name", "sink"]);
    answering.read_until(|l| l == "ack ok").expect("registered");
    let answered = std::cell::Cell::new(0);
    caller
        .read_until(|l| {
            if l.starts_with("result ok") {
                answered.set(answered.get() + 1);
            }
            answered.get() == 10
        })
        .expect("all 10 calls answered");
    assert_eq!(broker_stat(b.dir(), "waiting"), 0);
    assert_eq!(broker_stat(b.dir(), "pending"), 0);
}
