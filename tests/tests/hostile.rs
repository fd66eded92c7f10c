//! Input a hostile local program can send, against the real `zrpcd`: huge
//! and zero deadlines, made-up names, stalled and oversized partial frames,
//! payloads with trailing bytes. Each gets a typed answer or a typed
//! `Fatal`, and nothing it did stays behind in the broker.

use std::io::Write;
use std::time::Duration;

use zrpc_client::{BlockingClient, CallOptions, Error, Value};
use zrpc_proto::{flags, Envelope, ErrorCode, Kind, MAX_TIMEOUT_MS};
use zrpc_tests::raw::Raw;
use zrpc_tests::{broker_stat, wait_registered, wait_until, Broker, WAIT};

/// Sends a call with a nil payload.
fn send_call(r: &mut Raw, id: u64, service: &str, timeout_ms: Option<u64>, call_flags: u32) {
    r.send(
        &Envelope::Call {
            id,
            service,
            method: "m",
            timeout_ms,
            flags: call_flags,
        },
        b"\xc0",
    );
}

/// The next `Result` on `r`: (id, code, message).
fn next_result(r: &mut Raw) -> (u64, Option<ErrorCode>, String) {
    loop {
        let f = r.recv_frame().expect("a Result frame");
        if let Ok(Envelope::Result { id, code, message }) = f.decode() {
            return (id, code, message.to_string());
        }
    }
}

/// The next `Request` on a service connection: (broker id, timeout_ms).
fn next_request(r: &mut Raw) -> (u64, Option<u64>) {
    loop {
        let f = r.recv_frame().expect("a Request frame");
        match f.decode().expect("envelope") {
            Envelope::Request { id, timeout_ms, .. } => return (id, timeout_ms),
            Envelope::Ping { nonce } => r.send(&Envelope::Pong { nonce }, b""),
            _ => {}
        }
    }
}

fn reply(r: &mut Raw, id: u64, payload: &[u8]) {
    r.send(
        &Envelope::Reply {
            id,
            code: None,
            message: "",
        },
        payload,
    );
}

/// Item 1: any `timeout_ms` up to u64::MAX is accepted. Beyond the
/// documented maximum it means "no deadline": the service is told none,
/// the call is answered, and the broker (whose timer wheel panicked on
/// 2^36 ms before) keeps serving the connection.
#[test]
fn huge_timeouts_mean_no_deadline_and_every_call_is_answered() {
    let b = Broker::start();
    let mut svc = Raw::hello(b.dir());
    zrpc_tests::raw::register(&mut svc, "svc");
    let mut caller = Raw::hello(b.dir());
    // The caller also holds a name: a connection torn down by a panic used
    // to keep it forever.
    zrpc_tests::raw::register(&mut caller, "callers-name");
    for (i, ms) in [
        1u64 << 36,
        1 << 40,
        u64::MAX - 1,
        u64::MAX,
        MAX_TIMEOUT_MS + 1,
    ]
    .into_iter()
    .enumerate()
    {
        let id = 10 + i as u64;
        send_call(&mut caller, id, "svc", Some(ms), 0);
        let (bid, told) = next_request(&mut svc);
        assert_eq!(
            told, None,
            "timeout_ms {ms} is beyond the maximum: no deadline"
        );
        reply(&mut svc, bid, b"\x2a");
        assert_eq!(next_result(&mut caller), (id, None, String::new()));
    }
    // At the maximum, the deadline is kept and passed on.
    send_call(&mut caller, 20, "svc", Some(MAX_TIMEOUT_MS), 0);
    let (bid, told) = next_request(&mut svc);
    assert!(
        told.is_some_and(|t| t > MAX_TIMEOUT_MS - 60_000),
        "{told:?}"
    );
    reply(&mut svc, bid, b"\xc0");
    assert_eq!(next_result(&mut caller).1, None);
    // Parked (no service) and not allowed to wait: an immediate answer.
    send_call(&mut caller, 21, "nobody", Some(1 << 40), flags::NO_WAIT);
    assert_eq!(next_result(&mut caller).1, Some(ErrorCode::NoSuchService));
    // Parked with a huge timeout, then the caller leaves: nothing stays.
    send_call(&mut caller, 22, "nobody", Some(u64::MAX), 0);
    assert_eq!(caller.call(23, "zrpcd", "ping", None).0, None);
    assert_eq!(broker_stat(b.dir(), "pending"), 1);
    assert_eq!(
        broker_stat(b.dir(), "timers"),
        0,
        "no timer for 'no deadline'"
    );
    drop(caller);
    assert!(wait_until(WAIT, || broker_stat(b.dir(), "pending") == 0));
    let mut again = Raw::hello(b.dir());
    assert!(wait_until(WAIT, || {
        again.send(
            &Envelope::Register {
                req: 2,
                name: "callers-name",
                shared: false,
            },
            b"",
        );
        matches!(
            again.recv_frame().map(|f| f
                .decode()
                .map(|e| matches!(e, Envelope::Ack { code: None, .. }))),
            Some(Ok(true))
        )
    }));
}

/// Item 2: a deadline already past (timeout 0) fails at once with a typed
/// timeout, without a timer and without reaching the service.
#[test]
fn timeout_zero_fails_at_once_without_delivery() {
    let b = Broker::start();
    let mut svc = Raw::hello(b.dir());
    zrpc_tests::raw::register(&mut svc, "svc");
    let mut caller = Raw::hello(b.dir());
    send_call(&mut caller, 1, "svc", Some(0), 0);
    let (id, code, msg) = next_result(&mut caller);
    assert_eq!((id, code), (1, Some(ErrorCode::Timeout)), "{msg}");
    // The service never saw it: the next request it gets is call 2's.
    send_call(&mut caller, 2, "svc", Some(60_000), 0);
    let (bid, _) = next_request(&mut svc);
    reply(&mut svc, bid, b"\x02");
    assert_eq!(next_result(&mut caller), (2, None, String::new()));
    // To a name nobody holds: TimeoutNoService, or NoSuchService with
    // NO_WAIT.
    send_call(&mut caller, 3, "nobody", Some(0), 0);
    assert_eq!(
        next_result(&mut caller).1,
        Some(ErrorCode::TimeoutNoService)
    );
    send_call(&mut caller, 4, "nobody", Some(0), flags::NO_WAIT);
    assert_eq!(next_result(&mut caller).1, Some(ErrorCode::NoSuchService));

    // The original's promise, through the async library: 1001 calls with
    // timeout 0 to an unserved name all fail with a timeout that names the
    // missing service, and nothing leaks.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = b.dir().to_path_buf();
    rt.block_on(async move {
        let client = zrpc_client::Client::connect_to(&dir)
            .await
            .expect("connect");
        for _ in 0..1001 {
            let r: Result<Value, Error> = client
                .call("unserved", "m", &(), Some(Duration::ZERO))
                .await;
            match r {
                Err(Error::Timeout {
                    no_service: true, ..
                }) => {}
                other => panic!("expected a timeout naming the missing service, got {other:?}"),
            }
        }
    });
    assert_eq!(broker_stat(b.dir(), "pending"), 0);
    assert_eq!(broker_stat(b.dir(), "timers"), 0);
}

/// Item 7 (library part): a timeout while no service held the name says so.
#[test]
fn timeout_while_unregistered_names_the_missing_service() {
    let b = Broker::start();
    let client = BlockingClient::connect_to(b.dir()).expect("connect");
    let err = client
        .call::<_, Value>("nosvc", "foo", &(), Some(Duration::from_millis(50)))
        .expect_err("nobody serves nosvc");
    assert!(
        matches!(
            err,
            Error::Timeout {
                no_service: true,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains("no service registered the name \"nosvc\""),
        "{err}"
    );
    // A service that holds the name but does not answer: a plain timeout.
    let mut svc = Raw::hello(b.dir());
    zrpc_tests::raw::register(&mut svc, "slow");
    let opts = CallOptions::timeout(Duration::from_millis(50)).no_retry();
    let err = client
        .call_with::<_, Value>("slow", "m", &(), opts)
        .expect_err("slow does not answer");
    assert!(
        matches!(
            err,
            Error::Timeout {
                no_service: false,
                ..
            }
        ),
        "{err:?}"
    );
}

/// Item 4: calls to made-up names do not grow the statistics table.
#[test]
fn stats_rows_are_bounded() {
    let b = Broker::start_with(&["--max-stats-names", "3"]);
    let mut r = Raw::hello(b.dir());
    for i in 0..200u64 {
        let name = format!("made-up-{i}");
        send_call(&mut r, i, &name, None, flags::NO_WAIT);
        assert_eq!(next_result(&mut r).1, Some(ErrorCode::NoSuchService));
    }
    // Five registered names, three rows at most: names no longer registered
    // give theirs up.
    let mut svcs = Vec::new();
    for i in 0..5 {
        let mut s = Raw::hello(b.dir());
        zrpc_tests::raw::register(&mut s, &format!("real-{i}"));
        svcs.push(s);
    }
    let client = BlockingClient::connect_to(b.dir()).expect("connect");
    let stats: Value = client
        .call("zrpcd", "stats", &(), Some(WAIT))
        .expect("stats");
    let services = stats
        .as_map()
        .and_then(|m| m.iter().find(|(k, _)| k.as_str() == Some("services")))
        .and_then(|(_, v)| v.as_map())
        .expect("services")
        .iter()
        .map(|(k, _)| k.as_str().unwrap_or("?").to_string())
        .collect::<Vec<_>>();
    // zrpcd, (other), and at most 3 registered names.
    assert!(services.len() <= 5, "{services:?}");
    assert!(services.iter().any(|s| s == "(other)"), "{services:?}");
    assert!(
        !services.iter().any(|s| s.starts_with("made-up")),
        "{services:?}"
    );
    let other_errors = stats
        .as_map()
        .and_then(|m| m.iter().find(|(k, _)| k.as_str() == Some("services")))
        .and_then(|(_, v)| v.as_map())
        .and_then(|m| m.iter().find(|(k, _)| k.as_str() == Some("(other)")))
        .and_then(|(_, v)| v.as_map())
        .and_then(|m| m.iter().find(|(k, _)| k.as_str() == Some("errors")))
        .and_then(|(_, v)| v.as_u64());
    assert_eq!(other_errors, Some(200));
}

/// The header of a frame announcing `body` bytes with a `Call` envelope to
/// the broker's `ping`, and that envelope: the caller sends the rest of
/// the body (payload bytes) itself.
fn big_call_head(id: u64, payload_len: usize) -> Vec<u8> {
    let mut out = bytes::BytesMut::new();
    zrpc_proto::encode_header(
        &mut out,
        &Envelope::Call {
            id,
            service: "zrpcd",
            method: "ping",
            timeout_ms: None,
            flags: 0,
        },
        payload_len,
    );
    out.to_vec()
}

/// A MessagePack `bin 32` payload of `len` bytes in all.
fn bin_payload(len: usize) -> Vec<u8> {
    let n = len - 5;
    let mut p = vec![0xc6];
    p.extend_from_slice(&(n as u32).to_be_bytes());
    p.resize(len, 0x55);
    p
}

/// Item 5: a frame that stalls half-sent is closed after --frame-timeout
/// with `Fatal{Timeout}`, and partial frames together cannot hold more than
/// --max-partial-bytes.
#[test]
fn stalled_and_oversized_partial_frames_are_bounded() {
    let b = Broker::start_with(&["--frame-timeout", "0.3", "--max-partial-bytes", "3000000"]);
    // Stalls: closed with a timeout.
    let mut stalled = Raw::hello(b.dir());
    let head = big_call_head(1, 1 << 20);
    stalled.s.write_all(&head).expect("write");
    stalled
        .s
        .write_all(&bin_payload(1 << 20)[..100_000])
        .expect("write");
    let msg = stalled.expect_fatal(ErrorCode::Timeout);
    assert!(msg.contains("--frame-timeout"), "{msg}");

    // Two connections hold about 1 MiB each; the third passes 3,000,000
    // bytes and is closed; the first two complete their frames normally.
    let b = Broker::start_with(&["--max-partial-bytes", "3000000"]);
    let payload = bin_payload(1 << 20);
    let mut holders: Vec<Raw> = (0..2).map(|_| Raw::hello(b.dir())).collect();
    for (i, h) in holders.iter_mut().enumerate() {
        h.s.write_all(&big_call_head(i as u64, payload.len()))
            .expect("write");
        h.s.write_all(&payload[..600_000]).expect("write");
    }
    // Wait until the broker has read what the two sent.
    let mut third = Raw::hello(b.dir());
    assert_eq!(third.call(1, "zrpcd", "ping", None).0, None);
    third
        .s
        .write_all(&big_call_head(7, payload.len()))
        .expect("write");
    // The broker may close the connection before it has taken all of it.
    let _ = third.s.write_all(&payload[..600_000]);
    let msg = third.expect_fatal(ErrorCode::LimitExceeded);
    assert!(msg.contains("--max-partial-bytes"), "{msg}");
    for (i, h) in holders.iter_mut().enumerate() {
        h.s.write_all(&payload[600_000..]).expect("write");
        let (id, code, msg) = next_result(h);
        assert_eq!((id, code), (i as u64, None), "{msg}");
    }
}

/// Item 6: a payload with bytes after its value is `BadPayload`, not its
/// first value.
#[test]
fn trailing_bytes_after_a_payload_are_bad_payload() {
    let b = Broker::start();
    let _svc = b.spawn("zrpc-test-svc", &[]);
    wait_registered(b.dir(), "echo", 1);
    let mut r = Raw::hello(b.dir());
    r.send(
        &Envelope::Call {
            id: 1,
            service: "echo",
            method: "echo",
            timeout_ms: Some(20_000),
            flags: 0,
        },
        b"\x01\x02",
    );
    let (_, code, msg) = next_result(&mut r);
    assert_eq!(code, Some(ErrorCode::BadPayload), "{msg}");
    assert!(msg.contains("bytes left"), "{msg}");
    // The exact value still works.
    r.send(
        &Envelope::Call {
            id: 2,
            service: "echo",
            method: "echo",
            timeout_ms: Some(20_000),
            flags: 0,
        },
        b"\x01",
    );
    let f = loop {
        let f = r.recv_frame().expect("result");
        if f.decode().expect("envelope").kind() == Kind::Result {
            break f;
        }
    };
    assert_eq!(&f.payload[..], b"\x01");
}

/// A call the broker accepts at the message size limit reaches its service:
/// the `Request` the broker sends is longer than the `Call`, and the
/// service used to refuse it as too large, reconnect, and get it again.
#[test]
fn a_call_at_the_size_limit_reaches_the_service() {
    let b = Broker::start_with(&["--max-message-size", "4096"]);
    let _svc = b.spawn("zrpc-test-svc", &[]);
    wait_registered(b.dir(), "echo", 1);
    let mut r = Raw::hello(b.dir());
    let env = Envelope::Call {
        id: 1,
        service: "echo",
        method: "echo",
        timeout_ms: Some(20_000),
        flags: flags::NO_RETRY,
    };
    let mut head = bytes::BytesMut::new();
    env.encode(&mut head);
    // A bin payload that makes the body exactly 4096 bytes.
    let payload = bin_payload(4096 - head.len());
    r.send(&env, &payload);
    let (id, code, msg) = next_result(&mut r);
    assert_eq!((id, code), (1, None), "{msg}");
    assert_eq!(broker_stat(b.dir(), "redelivered"), 0);
}

/// Calls `zrpcd.monitor` with `payload` on a new connection: the
/// connection and the result.
fn monitor_call(b: &Broker, payload: &[u8]) -> (Raw, (u64, Option<ErrorCode>, String)) {
    let mut mon = Raw::hello(b.dir());
    mon.send(
        &Envelope::Call {
            id: 1,
            service: "zrpcd",
            method: "monitor",
            timeout_ms: None,
            flags: 0,
        },
        payload,
    );
    let result = next_result(&mut mon);
    (mon, result)
}

/// A `zrpcd.monitor` subscription to every service, on a new connection.
fn subscribe_monitor(b: &Broker) -> Raw {
    let (mon, result) = monitor_call(b, b"\xc0");
    assert_eq!(result.1, None, "{}", result.2);
    mon
}

/// Makes `caller` fail calls (one event each for the monitor, ~100 bytes)
/// until the broker has disconnected the monitor, which does not read:
/// past the socket buffer, its events queue in the broker.
fn flood_a_monitor_until_disconnected(b: &Broker, caller: &mut Raw) {
    let mut id = 0;
    let gone = wait_until(WAIT, || {
        for _ in 0..200 {
            id += 1;
            send_call(caller, id, "nobody", None, flags::NO_WAIT);
        }
        for _ in 0..200 {
            assert_eq!(next_result(caller).1, Some(ErrorCode::NoSuchService));
        }
        broker_stat(b.dir(), "monitors") == 0
    });
    assert!(gone, "the monitor was not disconnected after {id} events");
}

/// A monitor that never reads is disconnected once its events pass
/// --max-queued-bytes, like a client that never reads its results.
#[test]
fn a_monitor_that_never_reads_is_disconnected() {
    let b = Broker::start_with(&["--max-queued-bytes", "20000"]);
    let mut mon = subscribe_monitor(&b);
    assert_eq!(broker_stat(b.dir(), "monitors"), 1);
    let mut caller = Raw::hello(b.dir());
    flood_a_monitor_until_disconnected(&b, &mut caller);
    // What it finds when it finally reads: events, then the reason.
    let fatal = loop {
        let f = mon.recv_frame().expect("a Fatal frame before close");
        if let Ok(Envelope::Fatal { code, message }) = f.decode() {
            break (code, message.to_string());
        }
    };
    assert_eq!(fatal.0, ErrorCode::LimitExceeded, "{}", fatal.1);
    assert!(fatal.1.contains("--max-queued-bytes"), "{}", fatal.1);
}

/// The arguments of pending calls are bounded in bytes, per connection and
/// in total, not only in number.
#[test]
fn pending_call_bytes_are_bounded() {
    let b = Broker::start_with(&[
        "--max-pending-bytes-per-conn",
        "12000",
        "--max-pending-bytes",
        "20000",
    ]);
    let payload = bin_payload(4500);
    let call = |r: &mut Raw, id: u64| {
        r.send(
            &Envelope::Call {
                id,
                service: "nobody",
                method: "m",
                timeout_ms: None,
                flags: 0,
            },
            &payload,
        );
    };
    let mut one = Raw::hello(b.dir());
    call(&mut one, 1);
    call(&mut one, 2);
    call(&mut one, 3);
    let (id, code, msg) = next_result(&mut one);
    assert_eq!((id, code), (3, Some(ErrorCode::LimitExceeded)), "{msg}");
    assert!(msg.contains("--max-pending-bytes-per-conn"), "{msg}");
    let mut two = Raw::hello(b.dir());
    call(&mut two, 1);
    let mut three = Raw::hello(b.dir());
    call(&mut three, 1);
    call(&mut three, 2);
    let (id, code, msg) = next_result(&mut three);
    assert_eq!((id, code), (2, Some(ErrorCode::LimitExceeded)), "{msg}");
    assert!(msg.contains("--max-pending-bytes)"), "{msg}");
    assert_eq!(broker_stat(b.dir(), "pending"), 4);
    // Freed when the callers leave.
    drop((one, two, three));
    assert!(wait_until(WAIT, || broker_stat(b.dir(), "pending") == 0));
    let mut four = Raw::hello(b.dir());
    call(&mut four, 1);
    call(&mut four, 2);
    assert_eq!(four.call(3, "zrpcd", "ping", None).0, None);
    assert_eq!(broker_stat(b.dir(), "pending"), 2);
}

/// A built-in answer larger than the caller could receive is refused with
/// `LimitExceeded` instead of breaking the caller's connection.
#[test]
fn an_oversized_builtin_answer_is_refused() {
    let b = Broker::start_with(&["--max-message-size", "4096"]);
    let _many: Vec<Raw> = (0..40).map(|_| Raw::hello(b.dir())).collect();
    let mut r = Raw::hello(b.dir());
    let (code, msg, _) = r.call(1, "zrpcd", "peers", None);
    assert_eq!(code, Some(ErrorCode::LimitExceeded), "{msg}");
    assert!(msg.contains("--max-message-size"), "{msg}");
    // The connection is fine.
    assert_eq!(r.call(2, "zrpcd", "ping", None).0, None);
}

/// A service that sends without reading what it is answered (acks here) is
/// disconnected once they pass twice --max-queued-bytes: the broker's
/// memory for it stays bounded.
#[test]
fn a_service_that_never_reads_its_acks_is_disconnected() {
    let b = Broker::start_with(&["--max-queued-bytes", "20000"]);
    let mut svc = Raw::hello(b.dir());
    zrpc_tests::raw::register(&mut svc, "svc");
    let mut frame = bytes::BytesMut::new();
    for _ in 0..1000 {
        zrpc_proto::encode_frame(
            &mut frame,
            &Envelope::Register {
                req: 2,
                name: "svc",
                shared: false,
            },
            b"",
        );
    }
    // Each batch of 1000 registrations gets 1000 acks nobody reads: past
    // the socket buffer they queue in the broker, until it gives up.
    let gone = wait_until(WAIT, || {
        if svc.s.write_all(&frame).is_err() {
            return true;
        }
        Raw::hello(b.dir()).call(1, "zrpcd", "list", None).2.len() < 4
    });
    assert!(gone, "the service was not disconnected");
    let fatal = loop {
        let f = svc.recv_frame().expect("a Fatal frame before close");
        if let Ok(Envelope::Fatal { code, message }) = f.decode() {
            break (code, message.to_string());
        }
    };
    assert_eq!(fatal.0, ErrorCode::LimitExceeded, "{}", fatal.1);
}

/// A service cannot answer with the broker's own `Shutdown`: clients take
/// it for a broker going away and wait for the next connection to send the
/// call again (on a healthy connection, until the call's deadline, or for
/// ever without one). The caller gets `Remote` at once.
#[test]
fn a_service_cannot_answer_with_the_brokers_shutdown_code() {
    let b = Broker::start();
    let mut svc = Raw::hello(b.dir());
    zrpc_tests::raw::register(&mut svc, "svc");
    let mut caller = Raw::hello(b.dir());
    send_call(&mut caller, 1, "svc", None, 0);
    let (bid, _) = next_request(&mut svc);
    svc.send(
        &Envelope::Reply {
            id: bid,
            code: Some(ErrorCode::Shutdown),
            message: "going away, honest",
        },
        b"",
    );
    let (id, code, message) = next_result(&mut caller);
    assert_eq!(id, 1);
    assert_eq!(code, Some(ErrorCode::Remote), "{message}");
    assert!(message.contains("Shutdown"), "{message}");
}

/// A TCP socket whose last close(2) would wait an hour: `SO_LINGER` of
/// 3,600 s and unsent data towards a peer that never reads. Returns it
/// with the peer, which must stay open.
fn lingering_socket() -> (std::net::TcpStream, std::net::TcpStream) {
    use std::os::fd::AsRawFd;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let mut tcp =
        std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
    let (peer, _) = listener.accept().expect("accept");
    tcp.set_nonblocking(true).expect("nonblocking");
    // Until the send buffer is full: data that will never be acknowledged.
    let chunk = vec![0u8; 65536];
    while tcp.write(&chunk).is_ok() {}
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 3600,
    };
    // SAFETY: setsockopt reads `size_of::<linger>()` bytes of `linger`.
    let r = unsafe {
        libc::setsockopt(
            tcp.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "SO_LINGER");
    (tcp, peer)
}

/// A descriptor whose close would block, passed to the broker and then
/// left to it (the sender closes its own copy, then the connection): the
/// broker answers `Fatal{Protocol}` (not a memfd) and closes it on a thread
/// of its own, its linger off. It used to hold it until the connection
/// ended and close it on its only thread, which then waited the linger
/// time: nobody could use the broker for an hour.
#[test]
fn a_descriptor_whose_close_would_block_does_not_wedge_the_broker() {
    use std::os::fd::AsRawFd;
    let b = Broker::start();
    let (tcp, _peer) = lingering_socket();
    let (mut r, caps) = Raw::hello_fds(b.dir());
    assert_eq!(caps, zrpc_proto::caps::FD_PAYLOADS);
    let mut ping = bytes::BytesMut::new();
    zrpc_proto::encode_frame(&mut ping, &Envelope::Ping { nonce: 1 }, b"");
    zrpc_io::fdpass::send_with_fds(r.s.as_raw_fd(), &[&ping], &[tcp.as_raw_fd()]).expect("send");
    let message = r.expect_fatal(ErrorCode::Protocol);
    assert!(message.contains("not a memfd"), "{message}");
    drop(tcp);
    drop(r);
    // Another client is served.
    assert_eq!(broker_stat(b.dir(), "pending"), 0);
    let mut other = Raw::hello(b.dir());
    send_call(&mut other, 1, "nobody", None, flags::NO_WAIT);
    assert_eq!(next_result(&mut other).1, Some(ErrorCode::NoSuchService));
}

/// Waits for the answer to a ping: the broker has handled everything `r`
/// sent before it.
fn round_trip(r: &mut Raw, nonce: u64) {
    r.send(&Envelope::Ping { nonce }, b"");
    loop {
        let f = r.recv_frame().expect("a Pong");
        if let Ok(Envelope::Pong { nonce: n }) = f.decode() {
            if n == nonce {
                return;
            }
        }
    }
}

/// Calls waiting for a name that nobody holds can end in any order
/// (cancelled by their caller, or timed out) without the broker searching
/// the whole list of waiting calls for each one: cancelling 40,000 of them
/// newest first searched 800 million entries on the broker's event loop
/// before (seconds during which no other connection was served).
#[test]
fn parked_calls_cancelled_newest_first_all_end() {
    const N: u64 = 40_000;
    let b = Broker::start();
    let mut r = Raw::hello(b.dir());
    for id in 1..=N {
        send_call(&mut r, id, "nobody", None, 0);
    }
    round_trip(&mut r, 1);
    assert_eq!(broker_stat(b.dir(), "pending"), N);
    let started = std::time::Instant::now();
    for id in (1..=N).rev() {
        r.send(&Envelope::Cancel { id }, b"");
    }
    round_trip(&mut r, 2);
    eprintln!(
        "{N} parked calls cancelled newest first in {:?}",
        started.elapsed()
    );
    assert_eq!(broker_stat(b.dir(), "pending"), 0);
    // Nothing of them is left waiting: a service taking the name gets no
    // request, and the broker answers a new call to it.
    let mut svc = Raw::hello(b.dir());
    zrpc_tests::raw::register(&mut svc, "nobody");
    let mut c = Raw::hello(b.dir());
    send_call(&mut c, 1, "nobody", Some(60_000), 0);
    let (bid, _) = next_request(&mut svc);
    reply(&mut svc, bid, b"\xc3");
    assert_eq!(next_result(&mut c), (1, None, String::new()));
}

/// Stops the broker, then counts the warnings in its log that contain
/// `what`.
fn warnings_logged(broker: &mut Broker, what: &str) -> usize {
    broker.proc.signal(libc::SIGTERM);
    assert!(broker.proc.wait_exit(WAIT).is_some(), "zrpcd did not exit");
    broker
        .log()
        .lines()
        .filter(|l| l.contains("WARN") && l.contains(what))
        .count()
}

/// A user reconnecting in a loop, sending a bad frame each time: each
/// connection is closed with `Fatal`, but the broker's log gets at most one
/// warning per interval for them all (the rest at debug), not one each
/// (the red team's flood wrote 71,941 warn lines in 3 s, past journald's
/// rate limit, which then dropped zrpcd's other lines).
#[test]
fn a_flood_of_bad_connections_logs_a_handful_of_warnings() {
    let mut b = Broker::start_logged(&[]);
    let sock = b.socket();
    const BAD: u64 = 2000;
    for _ in 0..BAD {
        let mut s = std::os::unix::net::UnixStream::connect(&sock).expect("connect");
        // A frame of one byte that is no MessagePack value.
        let _ = s.write_all(b"\x00\x00\x00\x01\x00\x00\x00\x01\xc1");
    }
    assert!(
        wait_until(WAIT, || broker_stat(b.dir(), "protocol_errors") == BAD),
        "not every bad connection was closed for a protocol error"
    );
    let warnings = warnings_logged(&mut b, "closing connection");
    assert!(
        (1..=3).contains(&warnings),
        "{warnings} 'closing connection' warnings for {BAD} bad connections"
    );
}

/// Registers a name on each of `n` new connections, each refused with
/// `LimitExceeded` (the broker runs with `--max-names 0`).
fn refuse_a_name_on_new_connections(b: &Broker, n: usize) {
    for i in 0..n {
        let mut r = Raw::hello(b.dir());
        r.send(
            &Envelope::Register {
                req: 1,
                name: &format!("n{i}"),
                shared: false,
            },
            b"",
        );
        let code = loop {
            let f = r.recv_frame().expect("ack");
            if let Ok(Envelope::Ack { code, .. }) = f.decode() {
                break code;
            }
        };
        assert_eq!(code, Some(ErrorCode::LimitExceeded));
    }
}

/// The same with a request refused on each new connection (a connection's
/// first refusal is logged at warn): at most one warning per interval for
/// all connections together.
#[test]
fn a_refusal_on_each_of_many_connections_logs_a_handful_of_warnings() {
    let mut b = Broker::start_logged(&["--max-names", "0"]);
    const REFUSED: usize = 500;
    refuse_a_name_on_new_connections(&b, REFUSED);
    let warnings = warnings_logged(&mut b, "refused");
    assert!(
        (1..=3).contains(&warnings),
        "{warnings} 'refused' warnings for {REFUSED} connections refused once each"
    );
}

/// `--warn-interval`: with 0, every connection's first refusal is a
/// warning (the interval is the flag, not a constant).
#[test]
fn the_interval_between_warnings_is_a_flag() {
    let mut b = Broker::start_logged(&["--max-names", "0", "--warn-interval", "0"]);
    const REFUSED: usize = 20;
    refuse_a_name_on_new_connections(&b, REFUSED);
    let warnings = warnings_logged(&mut b, "refused");
    assert_eq!(warnings, REFUSED, "one warning per refused connection");
}

/// `--max-monitor-names`: a `zrpcd.monitor` filter of more names is
/// refused with `BadPayload` naming the flag; one of that many is taken.
#[test]
fn the_monitor_filter_bound_is_a_flag() {
    let b = Broker::start_with(&["--max-monitor-names", "2"]);
    let subscribe = |payload: &[u8]| monitor_call(&b, payload).1;
    let (_, code, msg) = subscribe(b"\x93\xa1a\xa1b\xa1c");
    assert_eq!(code, Some(ErrorCode::BadPayload), "{msg}");
    assert!(
        msg.contains("at most 2") && msg.contains("--max-monitor-names"),
        "{msg}"
    );
    let (_, code, msg) = subscribe(b"\x92\xa1a\xa1b");
    assert_eq!(code, None, "{msg}");
}

/// `--close-flush-timeout`: a connection the broker closed, whose peer
/// does not read, has its socket closed once the flag's time is up (0.1 s
/// here; the default, 2 s, is far past the bound of the wait), its unsent
/// frames, the `Fatal` last, dropped.
#[test]
fn the_closing_flush_bound_is_a_flag() {
    let b = Broker::start_with(&[
        "--max-queued-bytes",
        "20000",
        "--close-flush-timeout",
        "0.1",
    ]);
    let fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", b.proc.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    let mut caller = Raw::hello(b.dir());
    let mut mon = subscribe_monitor(&b);
    let with_monitor = fds();
    flood_a_monitor_until_disconnected(&b, &mut caller);
    // Its socket is closed within the flag's time (and some scheduling),
    // well before the default's 2 s.
    let closed = wait_until(Duration::from_millis(1500), || fds() < with_monitor);
    assert!(closed, "the broker still holds the closed monitor's socket");
    // What the monitor finds when it reads: events, then the end, no Fatal
    // (it was dropped with the frames before it).
    while let Some(f) = mon.recv_frame() {
        if let Ok(Envelope::Fatal { code, message }) = f.decode() {
            panic!("the Fatal ({code}: {message}) was flushed, not dropped");
        }
    }
}

/// A connection the broker closed but still flushes (its peer does not
/// read) holds a socket, and counts against `--max-connections` (and its
/// user's `connections` quota) until it is closed: it was no longer
/// counted, so connections closed that way in a loop could pile up sockets
/// past the limit (docs/security.md).
#[test]
fn a_closing_connection_counts_until_its_socket_is_closed() {
    let b = Broker::start_with(&[
        "--max-connections",
        "3",
        "--max-queued-bytes",
        "20000",
        "--close-flush-timeout",
        "60",
    ]);
    let mut mon = subscribe_monitor(&b);
    let mut caller = Raw::hello(b.dir());
    flood_a_monitor_until_disconnected(&b, &mut caller);
    // zrpcd.stats tells the sockets apart: the monitor's is open, not a
    // live connection (one answer; retried while the connection that asked
    // last is still closing and the limit refuses the next).
    let mut seen = (0, 0);
    let told = wait_until(WAIT, || {
        let stats: Option<Value> = BlockingClient::connect_to(b.dir())
            .ok()
            .and_then(|c| c.call("zrpcd", "stats", &(), Some(WAIT)).ok());
        let Some(stats) = stats else { return false };
        seen = (
            stats["connections_open"].as_u64().unwrap_or(0),
            stats["connections"].as_u64().unwrap_or(0),
        );
        seen.0 > seen.1
    });
    assert!(told, "sockets open vs connections: {seen:?}");
    // The monitor's socket is open, flushing: with the caller, two of the
    // three places are taken; a third connection is taken (once the
    // connection that asked for the stats above is closed), a fourth is not.
    let mut third = None;
    let taken = wait_until(WAIT, || {
        let mut r = Raw::connect(b.dir());
        let welcome = matches!(r.hello_as(3), Some((Kind::Welcome, _)));
        if welcome {
            third = Some(r);
        }
        welcome
    });
    assert!(taken, "no third connection");
    let mut fourth = Raw::connect(b.dir());
    match fourth.hello_as(1) {
        Some((Kind::Fatal, f)) => match f.decode() {
            Ok(Envelope::Fatal { code, message }) => {
                assert_eq!(code, ErrorCode::LimitExceeded, "{message}");
                assert!(message.contains("--max-connections"), "{message}");
            }
            other => panic!("not a Fatal: {other:?}"),
        },
        other => panic!("a fourth connection was taken: {other:?}"),
    }
    // The monitor reads what it was sent, to the end: its socket is closed,
    // and its place free.
    while mon.recv_frame().is_some() {}
    drop(third);
    let taken = wait_until(WAIT, || {
        let mut r = Raw::connect(b.dir());
        matches!(r.hello_as(2), Some((Kind::Welcome, _)))
    });
    assert!(taken, "the closed monitor's place was not freed");
}

/// A call resubmitted by a caller that came back, while the instance that
/// ran it for the caller's first connection has given up the name
/// (stopping): that execution answers nobody now, and is cancelled there
/// (it ran on uncounted before, its place in the window given back).
#[test]
fn a_resubmission_cancels_the_execution_its_instance_gave_up() {
    let b = Broker::start_with(&["--caller-grace", "60"]);
    let mut svc = Raw::hello(b.dir());
    zrpc_tests::raw::register(&mut svc, "s");
    let call = |r: &mut Raw| {
        r.send(
            &Envelope::Call {
                id: 7,
                service: "s",
                method: "m",
                timeout_ms: None,
                flags: 0,
            },
            b"\xc0",
        );
    };
    const INSTANCE: u64 = 0x6a6a;
    let mut caller = Raw::connect(b.dir());
    assert!(matches!(
        caller.hello_as(INSTANCE),
        Some((Kind::Welcome, _))
    ));
    call(&mut caller);
    let (first, _) = next_request(&mut svc);
    drop(caller);
    assert!(wait_until(WAIT, || broker_stat(b.dir(), "orphans") == 1));
    // The service gives the name up; the caller comes back and sends the
    // call again.
    svc.send(&Envelope::Unregister { req: 2, name: "s" }, b"");
    let mut again = Raw::connect(b.dir());
    assert!(matches!(again.hello_as(INSTANCE), Some((Kind::Welcome, _))));
    call(&mut again);
    let deadline = std::time::Instant::now() + WAIT;
    let cancelled = loop {
        assert!(
            std::time::Instant::now() < deadline,
            "no Cancel at the service"
        );
        let f = svc.recv_frame().expect("a frame at the service");
        match f.decode() {
            Ok(Envelope::Cancel { id }) => break id,
            Ok(Envelope::Ping { nonce }) => svc.send(&Envelope::Pong { nonce }, b""),
            _ => {}
        }
    };
    assert_eq!(cancelled, first);
}

/// A service connection serving several names shares its window among
/// them: a flood of calls to one name does not take every slot the others
/// need (turns were per name, and the first name with calls waiting took
/// every freed slot of the connection).
#[test]
fn one_names_flood_does_not_take_a_connections_slots_from_its_other_names() {
    let b = Broker::start_with(&["--max-delivered-per-conn", "2"]);
    let mut svc = Raw::hello(b.dir());
    zrpc_tests::raw::register(&mut svc, "alpha");
    zrpc_tests::raw::register(&mut svc, "beta");
    // 20 calls to alpha: 2 delivered, 18 waiting.
    let mut flood = Raw::hello(b.dir());
    for id in 1..=20 {
        send_call(&mut flood, id, "alpha", None, 0);
    }
    round_trip(&mut flood, 1);
    let mut caller = Raw::hello(b.dir());
    send_call(&mut caller, 1, "beta", None, 0);
    round_trip(&mut caller, 2);
    assert_eq!(broker_stat(b.dir(), "waiting"), 19);
    // The service answers its requests one by one: beta's comes within a
    // few of the freed slots, not after alpha's 20.
    let mut order = Vec::new();
    while order.len() < 21 {
        let f = svc.recv_frame().expect("a Request");
        match f.decode().expect("envelope") {
            Envelope::Request { id, service, .. } => {
                order.push(service.to_string());
                reply(&mut svc, id, b"\xc0");
            }
            Envelope::Ping { nonce } => svc.send(&Envelope::Pong { nonce }, b""),
            _ => {}
        }
    }
    let at = order
        .iter()
        .position(|s| s == "beta")
        .expect("beta delivered");
    assert!(
        at <= 4,
        "beta's call was delivered after {at} of alpha's: {order:?}"
    );
    assert_eq!(next_result(&mut caller), (1, None, String::new()));
}

/// A `NO_WAIT` call held back by a full window fails as soon as the name
/// has no instance left, as it would have on arrival (it waited for ever).
#[test]
fn a_no_wait_call_held_by_the_window_fails_when_the_name_goes() {
    let b = Broker::start_with(&["--max-delivered-per-conn", "1"]);
    let mut svc = Raw::hello(b.dir());
    zrpc_tests::raw::register(&mut svc, "one");
    let mut caller = Raw::hello(b.dir());
    send_call(&mut caller, 1, "one", None, 0);
    send_call(&mut caller, 2, "one", None, flags::NO_WAIT);
    round_trip(&mut caller, 1);
    assert_eq!(broker_stat(b.dir(), "waiting"), 1);
    let _ = next_request(&mut svc);
    // The instance leaves: call 1 (delivered) waits for the next one; call
    // 2, never delivered and not to wait, fails now.
    drop(svc);
    let (id, code, msg) = next_result(&mut caller);
    assert_eq!((id, code), (2, Some(ErrorCode::NoSuchService)), "{msg}");
    assert_eq!(broker_stat(b.dir(), "waiting"), 1);
}

/// `zrpcd.stats`' count of calls, asked on `r` (a call of its own, id `id`).
fn calls_counted(r: &mut Raw, id: u64) -> u64 {
    let (code, msg, payload) = r.call(id, "zrpcd", "stats", None);
    assert_eq!(code, None, "zrpcd.stats: {msg}");
    let stats = rmpv::decode::read_value(&mut &payload[..]).expect("stats payload");
    stats
        .as_map()
        .and_then(|m| m.iter().find(|(k, _)| k.as_str() == Some("calls")))
        .and_then(|(_, v)| v.as_u64())
        .unwrap_or_else(|| panic!("no calls in {stats}"))
}

/// The broker has one thread, and a connection's task used to go on
/// reading while its socket stayed readable, up to tokio's budget of 128
/// reads of 8 KiB: some 35,000 small frames in a row while everyone else
/// waited. A peer that keeps its socket full now gets turns of 250 µs or
/// 256 frames (`TURN` in zrpcd/src/conn.rs). Seen from another connection: its calls
/// are answered while the flood lasts, and between two of them in a row
/// the broker handles a few turns of the flood, not all of it.
#[test]
fn a_connection_that_keeps_its_socket_full_does_not_hold_up_the_others() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let b = Broker::start_with(&[]);
    let flood = Raw::hello(b.dir());
    let mut w = flood.s.try_clone().expect("clone the socket");
    let done = std::sync::Arc::new(AtomicBool::new(false));
    // 400,000 NO_WAIT calls to a name nobody holds, each answered at once
    // (answers left unread: ~40 MB, under --max-queued-bytes), written as
    // fast as the socket takes them, 2,000 per write.
    let writer = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut chunk = bytes::BytesMut::new();
            for round in 0..200u64 {
                chunk.clear();
                for i in 0..2000 {
                    let call = Envelope::Call {
                        id: round * 2000 + i + 1,
                        service: "nobody",
                        method: "m",
                        timeout_ms: None,
                        flags: flags::NO_WAIT,
                    };
                    zrpc_proto::encode_frame(&mut chunk, &call, b"\xc0");
                }
                if w.write_all(&chunk).is_err() {
                    break;
                }
            }
            done.store(true, Ordering::Release);
        })
    };
    let mut probe = Raw::hello(b.dir());
    let mut id = 0;
    let mut next = || {
        id += 1;
        id
    };
    // The flood is under way.
    let started = wait_until(WAIT, || calls_counted(&mut probe, next()) > 20_000);
    assert!(started, "the flood did not start");
    let mut gaps = Vec::new();
    let mut last = calls_counted(&mut probe, next());
    while !done.load(Ordering::Acquire) && gaps.len() < 50 {
        let now = calls_counted(&mut probe, next());
        gaps.push(now - last);
        last = now;
    }
    let _ = writer.join();
    drop(flood);
    // Without turns, the probe's calls waited for the end of the flood
    // (none answered while it lasted); with them, 656-1,966 of the flood's
    // calls were handled between two of them here (debug build).
    // The bound below is loose (tokio's budget alone allowed some 35,000).
    assert!(
        gaps.len() >= 5,
        "only {} of another connection's calls were answered while the flood lasted: {gaps:?}",
        gaps.len()
    );
    let least = gaps.iter().copied().min().unwrap_or(u64::MAX);
    assert!(
        least <= 30_000,
        "between two calls in a row of another connection, the broker handled at least {least} of the flood's calls: {gaps:?}"
    );
}

/// A `Call` of `method` of the test service (`echo`) with a 10 s deadline.
fn echo_call(id: u64, method: &'static str) -> Envelope<'static> {
    Envelope::Call {
        id,
        service: "echo",
        method,
        timeout_ms: Some(10_000),
        flags: 0,
    }
}

/// A payload nesting arrays 50,000 deep would overflow a recursive
/// decoder's stack and abort the service (and with it every call it
/// holds): the Rust services stop at 256 levels (`zrpc_proto::depth`) and
/// answer `BadPayload` naming the depth, then carry on. (The Python
/// service: `python/tests/test_api.py`
/// `test_values_nested_too_deeply_are_a_clear_error`.)
#[test]
fn a_payload_nested_too_deeply_is_a_bad_payload_not_a_crash() {
    let b = Broker::start_with(&[]);
    let _svc = b.spawn("zrpc-test-svc", &[]);
    wait_registered(b.dir(), "echo", 1);
    let mut r = Raw::hello(b.dir());
    let mut nested = vec![0x91u8; 50_000];
    nested.push(0xc0);
    let call = |id| echo_call(id, "echo");
    r.send(&call(1), &nested);
    let (id, code, message) = next_result(&mut r);
    assert_eq!(id, 1);
    assert_eq!(code, Some(ErrorCode::BadPayload), "{message}");
    assert!(message.contains("depth limit"), "{message}");
    // The service is still there.
    r.send(&call(2), b"\x91\x01");
    let (id, code, message) = next_result(&mut r);
    assert_eq!((id, code), (2, None), "{message}");
}

/// Levels rmp-serde does not count (enum variants, newtypes, options)
/// overflowed a service's stack: 100,000 levels of `{"Neg": ...}` (500 KB)
/// into a recursive enum, and the one byte `01` into
/// `struct Chain(Option<Box<Chain>>)`, which recursed for ever (red-team
/// pass 9). The service answers `BadPayload` and carries on.
#[test]
fn levels_of_enum_variants_and_options_cannot_overflow_a_services_stack() {
    let b = Broker::start_with(&[]);
    let _svc = b.spawn("zrpc-test-svc", &[]);
    wait_registered(b.dir(), "echo", 1);
    let mut r = Raw::hello(b.dir());
    let call = echo_call;
    let mut negs = b"\x81\xa3Neg".repeat(100_000);
    negs.extend_from_slice(b"\x81\xa3Lit\x07");
    r.send(&call(1, "eval"), &negs);
    let (id, code, message) = next_result(&mut r);
    assert_eq!((id, code), (1, Some(ErrorCode::BadPayload)), "{message}");
    assert!(message.contains("depth limit"), "{message}");
    r.send(&call(2, "chain"), b"\x01");
    let (id, code, message) = next_result(&mut r);
    assert_eq!((id, code), (2, Some(ErrorCode::BadPayload)), "{message}");
    assert!(message.contains("depth limit"), "{message}");
    // Within the bound both decode, and the service is still there.
    r.send(&call(3, "eval"), b"\x81\xa3Neg\x81\xa3Neg\x81\xa3Lit\x07");
    let (id, code, message) = next_result(&mut r);
    assert_eq!((id, code), (3, None), "{message}");
    r.send(&call(4, "chain"), b"\xc0");
    let (id, code, message) = next_result(&mut r);
    assert_eq!((id, code), (4, None), "{message}");
}

/// Each decoded value can take tens of bytes for one byte on the wire: 8
/// MiB of nils in 2,048 arrays, decoded into `rmpv::Value`s, took a
/// service to 350 MB (16 MiB: twice that). The Rust libraries decode at most
/// `zrpc_proto::depth::max_values()` values a payload (4,194,304 by
/// default) and answer `BadPayload` naming the bound. (The Python library:
/// `python/tests/test_hostile_callers.py`
/// `test_a_service_refuses_an_argument_of_too_many_values`.)
#[test]
fn a_payload_of_more_values_than_the_bound_is_a_bad_payload() {
    let b = Broker::start_with(&[]);
    let svc = b.spawn("zrpc-test-svc", &[]);
    wait_registered(b.dir(), "echo", 1);
    let mut r = Raw::hello(b.dir());
    // 2,048 arrays of 4,095 nils: 8,388,609 values in 8 MiB.
    let mut one = vec![0xdc, 0x0f, 0xff];
    one.resize(3 + 4095, 0xc0);
    let mut many = vec![0xdd, 0x00, 0x00, 0x08, 0x00];
    for _ in 0..2048 {
        many.extend_from_slice(&one);
    }
    r.send(&echo_call(1, "echo"), &many);
    let (id, code, message) = next_result(&mut r);
    assert_eq!((id, code), (1, Some(ErrorCode::BadPayload)), "{message}");
    assert!(message.contains("more than 4194304 values"), "{message}");
    // Measured (debug build): 178 MB at the bound, 350 MB decoding it all.
    let peak = svc.peak_rss_kib();
    assert!(peak < 260 * 1024, "the service's peak RSS: {peak} KiB");
    // The service is still there.
    r.send(&echo_call(2, "echo"), b"\x91\x01");
    let (id, code, message) = next_result(&mut r);
    assert_eq!((id, code), (2, None), "{message}");
}

/// The client side of the above: another user's service (names are first
/// come) answering a typed client with 100,000 levels of enum variants, as
/// a result or as a `Remote` error's value, aborted the client with a stack
/// overflow (red-team pass 9). The client reports a decode error, or no
/// error value, and carries on.
#[test]
fn a_hostile_result_cannot_overflow_a_clients_stack() {
    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    enum Expr {
        Lit(i64),
        Neg(Box<Expr>),
    }
    let b = Broker::start();
    let mut svc = Raw::hello(b.dir());
    zrpc_tests::raw::register(&mut svc, "svc");
    let mut negs = b"\x81\xa3Neg".repeat(100_000);
    negs.extend_from_slice(b"\x81\xa3Lit\x07");
    // The client calls from a thread with a tokio worker's stack (2 MiB).
    let dir = b.dir().to_path_buf();
    let client = std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(move || {
            let c = BlockingClient::connect_to(&dir).expect("connect");
            let result = c.call::<_, Expr>("svc", "get", &(), Some(Duration::from_secs(10)));
            let error = c.call::<_, Expr>("svc", "fail", &(), Some(Duration::from_secs(10)));
            let value = error.as_ref().err().map(|e| e.remote_value::<Expr>());
            (
                format!("{result:?}"),
                format!("{error:?}"),
                value.is_some_and(|v| v.is_none()),
            )
        })
        .expect("spawn");
    let (bid, _) = next_request(&mut svc);
    reply(&mut svc, bid, &negs);
    let (bid, _) = next_request(&mut svc);
    svc.send(
        &Envelope::Reply {
            id: bid,
            code: Some(ErrorCode::Remote),
            message: "no",
        },
        &negs,
    );
    let (result, error, no_value) = client.join().expect("the client overflowed or panicked");
    assert!(result.contains("depth limit"), "{result}");
    assert!(error.contains("Remote"), "{error}");
    assert!(no_value, "the error value decoded: {error}");
}
