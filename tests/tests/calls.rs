//! The whole call path end to end: the real `zrpcd` binary, real service
//! processes (`zrpc-test-svc`), real client processes (`zrpc-test-client`)
//! and clients in this test process, over real UNIX sockets.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use zrpc_client::{BlockingClient, CallOptions, Client, Error, Value};
use zrpc_tests::{broker_stat, wait_registered, wait_until, Broker, WAIT};

const T: Option<Duration> = Some(Duration::from_secs(20));

fn client(b: &Broker) -> BlockingClient {
    BlockingClient::connect_to(b.dir()).expect("connect")
}

/// Runs `f` with an async client of `b`, on a current-thread runtime whose
/// `block_on` future is the caller.
fn on_async_client<T, F: std::future::Future<Output = T>>(
    b: &Broker,
    f: impl FnOnce(Client) -> F,
) -> T {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async { f(async_client(b).await).await })
}

async fn async_client(b: &Broker) -> Client {
    Client::builder()
        .socket_dir(b.dir())
        .connect()
        .await
        .expect("connect")
}

fn echo_broker() -> (Broker, zrpc_tests::Proc) {
    let b = Broker::start();
    let svc = b.spawn("zrpc-test-svc", &[]);
    wait_registered(b.dir(), "echo", 1);
    (b, svc)
}

#[test]
fn basic_call_and_request_counter() {
    let (b, _svc) = echo_broker();
    let c = client(&b);
    let r: Value = c.call("echo", "echo", &"hello", T).expect("echo");
    assert_eq!(r, Value::from("hello"));
    let counts: Vec<u64> = (0..3)
        .map(|_| c.call("echo", "counter", &(), T).expect("counter"))
        .collect();
    assert_eq!(counts, vec![2, 3, 4], "the counter counts every request");
}

#[test]
fn every_msgpack_type_round_trips() {
    let (b, _svc) = echo_broker();
    let c = client(&b);
    let values = vec![
        Value::Nil,
        Value::Boolean(true),
        Value::Boolean(false),
        Value::from(u64::MAX),
        Value::from(i64::MIN),
        Value::from(-1i64),
        Value::from(0u64),
        Value::F32(1.5),
        Value::F32(f32::INFINITY),
        Value::F64(f64::INFINITY),
        Value::F64(f64::NEG_INFINITY),
        Value::F64(-0.0),
        Value::F64(1e300),
        Value::from("héllo wörld"),
        Value::from(""),
        Value::Binary(vec![0, 1, 2, 255]),
        Value::Binary(vec![]),
        Value::Array(vec![Value::Nil, Value::from(1), Value::Array(vec![])]),
        Value::Map(vec![
            (Value::from(1), Value::from("int key")),
            (Value::Binary(vec![9]), Value::from("bin key")),
            (Value::Nil, Value::Boolean(true)),
            (Value::from("k"), Value::Map(vec![])),
        ]),
        Value::Ext(5, vec![1, 2, 3]),
    ];
    for v in values {
        let r: Value = c.call("echo", "echo", &v, T).expect("echo");
        assert_eq!(r, v, "round trip of {v}");
        // Same type, not just an equal value (f32 stays f32, bin stays bin).
        assert_eq!(format!("{r:?}"), format!("{v:?}"));
    }
    // NaN is not equal to itself: check the type and NaN-ness.
    for v in [Value::F64(f64::NAN), Value::F32(f32::NAN)] {
        let r: Value = c.call("echo", "echo", &v, T).expect("echo");
        match (&v, &r) {
            (Value::F64(_), Value::F64(x)) => assert!(x.is_nan()),
            (Value::F32(_), Value::F32(x)) => assert!(x.is_nan()),
            _ => panic!("{v:?} came back as {r:?}"),
        }
    }
    // Bytes through serde_bytes stay MessagePack bin on the wire.
    let bytes = serde_bytes::ByteBuf::from(vec![7u8; 1000]);
    let r: Value = c.call("echo", "echo", &bytes, T).expect("echo bytes");
    assert_eq!(r, Value::Binary(vec![7u8; 1000]));
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Point {
    x: i64,
    y: f64,
    label: String,
    #[serde(with = "serde_bytes")]
    raw: Vec<u8>,
}

#[test]
fn typed_structs_and_large_payloads() {
    let (b, _svc) = echo_broker();
    let c = client(&b);
    let p = Point {
        x: 41,
        y: 1.0,
        label: "p".into(),
        raw: vec![1, 2],
    };
    let r: Point = c.call("echo", "shift", &p, T).expect("shift");
    assert_eq!(
        r,
        Point {
            x: 42,
            y: 2.5,
            label: "p".into(),
            raw: vec![1, 2]
        }
    );
    // A 4 MiB payload goes through (forwarded without re-encoding).
    let big = serde_bytes::ByteBuf::from((0..4 << 20).map(|i| i as u8).collect::<Vec<u8>>());
    let r: serde_bytes::ByteBuf = c.call("echo", "echo", &big, T).expect("big echo");
    assert!(r == big, "4 MiB payload came back intact");
    // The same through the raw API of both clients: a large raw payload is
    // written by reference, behind its own header.
    let encoded = bytes::Bytes::from(rmp_serde::to_vec(&big).expect("encode"));
    let r = c
        .call_raw("echo", "echo", encoded.clone(), CallOptions::from(T))
        .expect("raw echo");
    assert!(
        r == encoded,
        "raw 4 MiB payload came back intact (blocking)"
    );
    on_async_client(&b, |ac| async move {
        for _ in 0..3 {
            let r = ac
                .call_raw("echo", "echo", encoded.clone(), CallOptions::from(T))
                .await
                .expect("raw echo");
            assert!(r == encoded, "raw 4 MiB payload came back intact (async)");
        }
    });
}

#[test]
fn blobs_round_trip_through_both_clients() {
    let (b, _svc) = echo_broker();
    let c = client(&b);
    let sizes = [0usize, 1, 100, 70_000, 1 << 20, 3 << 20];
    let blob =
        |n: usize| zrpc_client::Blob::from((0..n).map(|i| (i * 7) as u8).collect::<Vec<u8>>());
    for n in sizes {
        let sent = blob(n);
        let r: zrpc_client::Blob = c.call("echo", "blob", &sent, T).expect("blob echo");
        assert!(r == sent, "{n} bytes came back intact (blocking)");
        // A Blob is wire-compatible with serde_bytes::ByteBuf.
        let r: serde_bytes::ByteBuf = c.call("echo", "blob", &sent, T).expect("as ByteBuf");
        assert_eq!(&r[..], &sent[..]);
    }
    on_async_client(&b, |ac| async move {
        // Keep replies alive across later calls: each stays intact.
        let mut kept = Vec::new();
        for n in sizes.into_iter().chain(sizes) {
            let sent = blob(n);
            let r: zrpc_client::Blob = ac.call("echo", "blob", &sent, T).await.expect("blob echo");
            assert!(r == sent, "{n} bytes came back intact (async)");
            kept.push((sent, r));
        }
        for (sent, r) in &kept {
            assert!(r == sent, "a kept reply was not overwritten");
        }
    });
}

#[test]
fn async_client_reuses_its_read_buffer_for_large_replies() {
    // A reply dropped before the next call's reply arrives gives its memory
    // back to the read buffer: the next large reply lands at the same
    // address instead of in a freshly allocated (page-faulted) buffer. The
    // caller here is the runtime's block_on future, not a spawned task.
    let (b, _svc) = echo_broker();
    let payload = bytes::Bytes::from(
        rmp_serde::to_vec(&serde_bytes::ByteBuf::from(vec![5u8; 300_000])).expect("encode"),
    );
    let addrs: Vec<usize> = on_async_client(&b, |c| async move {
        let mut addrs = Vec::new();
        for _ in 0..6 {
            let r = c
                .call_raw("echo", "echo", payload.clone(), CallOptions::from(T))
                .await
                .expect("echo");
            assert!(r == payload);
            addrs.push(r.as_ptr() as usize);
        }
        addrs
    });
    let same = addrs[2..].iter().filter(|a| **a == addrs[1]).count();
    assert!(
        same >= 3,
        "replies landed at {addrs:x?}: the read buffer was not reused"
    );
}

#[test]
fn errors_are_typed() {
    let (b, _svc) = echo_broker();
    let c = client(&b);
    // A serialisable error (String) arrives as its message and its value.
    match c.call::<_, ()>("echo", "fail", &"disk on fire", T) {
        Err(e @ Error::Remote { .. }) => {
            assert!(e.to_string().contains("disk on fire"), "{e}");
            assert_eq!(e.remote_value::<String>().as_deref(), Some("disk on fire"));
        }
        other => panic!("expected Remote, got {other:?}"),
    }
    // A Display-only error: the message alone, no value.
    match c.call::<_, ()>("echo", "fail_io", &"disk on fire", T) {
        Err(Error::Remote { message, value, .. }) => {
            assert_eq!(message, "disk on fire");
            assert!(value.is_empty(), "a Display-only error sent a value");
        }
        other => panic!("expected Remote, got {other:?}"),
    }
    match c.call::<_, u32>("echo", "panic", &(), T) {
        Err(Error::Remote { message, value, .. }) => {
            assert!(message.contains("panic"), "{message}");
            assert!(value.is_empty(), "a panic sent a value");
        }
        other => panic!("expected Remote for a panic, got {other:?}"),
    }
    // The service survived the panic.
    let r: Value = c.call("echo", "echo", &1, T).expect("alive after panic");
    assert_eq!(r, Value::from(1));
    match c.call::<_, Value>("echo", "nope", &(), T) {
        Err(Error::NoSuchMethod { method, .. }) => assert_eq!(method, "nope"),
        other => panic!("expected NoSuchMethod, got {other:?}"),
    }
    match c.call::<_, Value>("echo", "shift", &"not a point", T) {
        Err(Error::BadPayload { .. }) => {}
        other => panic!("expected BadPayload, got {other:?}"),
    }
}

#[test]
fn missing_service_times_out_or_fails_at_once() {
    let b = Broker::start();
    let c = client(&b);
    let start = Instant::now();
    match c.call::<_, Value>("ghost", "m", &(), Some(Duration::from_millis(300))) {
        Err(Error::Timeout { service, .. }) => assert_eq!(service, "ghost"),
        other => panic!("expected Timeout, got {other:?}"),
    }
    assert!(start.elapsed() >= Duration::from_millis(290));
    let opts = CallOptions::timeout(Duration::from_secs(10)).no_wait();
    match c.call_with::<_, Value>("ghost", "m", &(), opts) {
        Err(Error::NoSuchService { service }) => assert_eq!(service, "ghost"),
        other => panic!("expected NoSuchService, got {other:?}"),
    }
    assert_eq!(broker_stat(b.dir(), "pending"), 0);
}

#[test]
fn call_waits_for_a_service_that_registers_later() {
    let b = Broker::start();
    let dir = b.dir().to_path_buf();
    let caller = std::thread::spawn(move || {
        let c = BlockingClient::connect_to(&dir).expect("connect");
        c.call::<_, Value>("echo", "echo", &"late", T)
    });
    // The call is parked at the broker before the service exists.
    assert!(wait_until(WAIT, || broker_stat(b.dir(), "pending") == 1));
    let _svc = b.spawn("zrpc-test-svc", &[]);
    let r = caller.join().expect("caller thread").expect("answered");
    assert_eq!(r, Value::from("late"));
}

/// Calls `echo.sleep` (a handler that never answers in time) with a
/// `timeout_ms` deadline and checks that it fails with `Timeout` after about
/// that long (bounded above by 10 s). `what` labels a failure.
fn sleep_call_times_out(c: &BlockingClient, timeout_ms: u64, what: &str) {
    let start = Instant::now();
    match c.call::<_, u32>(
        "echo",
        "sleep",
        &60_000u64,
        Some(Duration::from_millis(timeout_ms)),
    ) {
        Err(Error::Timeout { .. }) => {}
        other => panic!("{what}: expected Timeout, got {other:?}"),
    }
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(timeout_ms - 10) && took < Duration::from_secs(10),
        "{what}: {took:?}"
    );
}

#[test]
fn service_that_never_replies_times_out_and_state_is_freed() {
    let (b, _svc) = echo_broker();
    let c = client(&b);
    // An async handler: the broker's Cancel drops it.
    sleep_call_times_out(&c, 300, "");
    assert_eq!(broker_stat(b.dir(), "pending"), 0, "pending call freed");
    assert_eq!(broker_stat(b.dir(), "timers"), 0, "timer freed");
    assert_eq!(broker_stat(b.dir(), "timeouts"), 1);
    // The service dropped the cancelled handler and serves again at once.
    let r: Value = c
        .call("echo", "echo", &2, Some(Duration::from_secs(5)))
        .expect("served");
    assert_eq!(r, Value::from(2));

    // A blocking handler cannot be cancelled: its late reply is dropped and
    // counted by the broker.
    match c.call::<_, u32>("echo", "block", &500u64, Some(Duration::from_millis(100))) {
        Err(Error::Timeout { .. }) => {}
        other => panic!("expected Timeout, got {other:?}"),
    }
    assert!(
        wait_until(WAIT, || broker_stat(b.dir(), "late_replies") == 1),
        "late reply counted"
    );
    assert_eq!(broker_stat(b.dir(), "pending"), 0);
}

#[test]
fn many_concurrent_calls_from_several_client_processes() {
    let (b, _svc) = echo_broker();
    let clients: Vec<_> = (0..4)
        .map(|_| {
            b.spawn(
                "zrpc-test-client",
                &["--calls", "500", "--concurrency", "16"],
            )
        })
        .collect();
    // And concurrent calls from this process on one shared async client.
    let in_process = on_async_client(&b, |c| async move {
        let mut set = tokio::task::JoinSet::new();
        for i in 0..200u64 {
            let c = c.clone();
            set.spawn(async move {
                let r: Value = c.call("echo", "echo", &i, T).await.expect("echo");
                r == Value::from(i)
            });
        }
        let mut ok = 0;
        while let Some(r) = set.join_next().await {
            ok += r.expect("task") as u32;
        }
        ok
    });
    assert_eq!(in_process, 200);
    for p in clients {
        let (status, out) = p.output(WAIT * 3);
        assert!(status.is_some_and(|s| s.success()), "client failed: {out}");
        assert_eq!(out.trim(), "ok 500 mismatched 0 failed 0");
    }
    assert_eq!(broker_stat(b.dir(), "pending"), 0);
}

#[test]
fn several_services_at_once() {
    let b = Broker::start();
    let names = ["alpha", "beta", "gamma"];
    let _svcs: Vec<_> = names
        .iter()
        .map(|n| b.spawn("zrpc-test-svc", &["--name", n]))
        .collect();
    for n in names {
        wait_registered(b.dir(), n, 1);
    }
    let c = client(&b);
    let pids: HashSet<u32> = names
        .iter()
        .map(|n| c.call(n, "pid", &(), T).expect("pid"))
        .collect();
    assert_eq!(pids.len(), 3, "each name served by its own process");
}

#[test]
fn two_instances_share_the_load() {
    let b = Broker::start();
    let a = b.spawn("zrpc-test-svc", &["--shared"]);
    let bb = b.spawn("zrpc-test-svc", &["--shared"]);
    wait_registered(b.dir(), "echo", 2);
    let pids = on_async_client(&b, |c| async move {
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..20 {
            let c = c.clone();
            set.spawn(async move { c.call::<_, u32>("echo", "sleep", &50u64, T).await });
        }
        let mut pids = Vec::new();
        while let Some(r) = set.join_next().await {
            pids.push(r.expect("task").expect("call"));
        }
        pids
    });
    let a_n = pids.iter().filter(|p| **p == a.pid() as u32).count();
    let b_n = pids.iter().filter(|p| **p == bb.pid() as u32).count();
    assert_eq!(a_n + b_n, 20);
    // Fewest outstanding first: concurrent calls alternate.
    assert!(a_n >= 5 && b_n >= 5, "unbalanced: {a_n} vs {b_n}");
}

#[test]
fn second_exclusive_registration_is_rejected() {
    let (b, _first) = echo_broker();
    let second = b.spawn("zrpc-test-svc", &[]);
    let mut cmd = b.command("zrpc-test-svc");
    cmd.stderr(std::process::Stdio::piped());
    let out = cmd.output().expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("echo") && err.contains("taken"), "{err}");
    // The same through a spawned process: it exits with an error.
    let mut second = second;
    let status = second.wait_exit(WAIT).expect("second instance exits");
    assert!(!status.success());
    wait_registered(b.dir(), "echo", 1);
    // A shared instance cannot join an exclusive one either.
    let out = b
        .command("zrpc-test-svc")
        .arg("--shared")
        .stderr(std::process::Stdio::piped())
        .output()
        .expect("run");
    assert!(!out.status.success());
}

#[test]
fn killed_service_mid_call() {
    let b = Broker::start();
    let a = b.spawn("zrpc-test-svc", &["--shared"]);
    wait_registered(b.dir(), "echo", 1);
    let c = client(&b);

    // NO_RETRY: the caller gets ServiceGone promptly.
    let dir = b.dir().to_path_buf();
    let call = std::thread::spawn(move || {
        let c = BlockingClient::connect_to(&dir).expect("connect");
        let opts = CallOptions::timeout(Duration::from_secs(60)).no_retry();
        let start = Instant::now();
        (
            c.call_with::<_, u32>("echo", "sleep", &60_000u64, opts),
            start,
        )
    });
    assert!(wait_until(WAIT, || broker_stat(b.dir(), "pending") == 1));
    a.signal(libc::SIGKILL);
    let (r, start) = call.join().expect("thread");
    match r {
        Err(Error::ServiceGone { service }) => assert_eq!(service, "echo"),
        other => panic!("expected ServiceGone, got {other:?}"),
    }
    assert!(start.elapsed() < Duration::from_secs(30));
    wait_registered(b.dir(), "echo", 0);

    // Default (retry): the call in flight on a dying instance is re-delivered
    // to another instance.
    let first = b.spawn("zrpc-test-svc", &["--shared"]);
    wait_registered(b.dir(), "echo", 1);
    let dir = b.dir().to_path_buf();
    let call = std::thread::spawn(move || {
        let c = BlockingClient::connect_to(&dir).expect("connect");
        c.call::<_, u32>("echo", "sleep", &300u64, Some(Duration::from_secs(30)))
    });
    assert!(wait_until(WAIT, || broker_stat(b.dir(), "pending") == 1));
    let second = b.spawn("zrpc-test-svc", &["--shared"]);
    wait_registered(b.dir(), "echo", 2);
    first.signal(libc::SIGKILL);
    let pid = call
        .join()
        .expect("thread")
        .expect("answered by the other instance");
    assert_eq!(pid, second.pid() as u32);
    assert_eq!(broker_stat(b.dir(), "redelivered"), 1);
    drop(first);

    // With no other instance, a retried call waits for a restart within
    // its deadline, and without one it times out (never hangs).
    let dir = b.dir().to_path_buf();
    let call = std::thread::spawn(move || {
        let c = BlockingClient::connect_to(&dir).expect("connect");
        c.call::<_, u32>(
            "echo",
            "sleep",
            &60_000u64,
            Some(Duration::from_millis(1500)),
        )
    });
    assert!(wait_until(WAIT, || broker_stat(b.dir(), "pending") == 1));
    second.signal(libc::SIGKILL);
    match call.join().expect("thread") {
        Err(Error::Timeout { .. }) => {}
        other => panic!("expected Timeout, got {other:?}"),
    }
    let r: Result<Value, _> = c.call_with("echo", "echo", &1, CallOptions::default().no_wait());
    assert!(matches!(r, Err(Error::NoSuchService { .. })), "{r:?}");
}

/// Starts a call to `echo.sleep` (60 s) with `opts` from a thread, waits
/// until the broker delivered it to `svc` (the only instance of `echo`:
/// a call to a held name is delivered as it is accepted, so one pending
/// call is a delivered one), SIGKILLs `svc` and returns the call's outcome
/// and how long it took.
fn call_then_kill_its_instance(
    b: &Broker,
    svc: &zrpc_tests::Proc,
    opts: CallOptions,
) -> (Result<u32, Error>, Duration) {
    let dir = b.dir().to_path_buf();
    let call = std::thread::spawn(move || {
        let c = BlockingClient::connect_to(&dir).expect("connect");
        let start = Instant::now();
        let r = c.call_with::<_, u32>("echo", "sleep", &60_000u64, opts);
        (r, start.elapsed())
    });
    assert!(wait_until(WAIT, || broker_stat(b.dir(), "pending") == 1));
    svc.signal(libc::SIGKILL);
    call.join().expect("caller thread")
}

/// A call delivered to an instance that then died may have run: with no
/// other instance of the name, the broker must not answer it with a code
/// that says "never ran" (`NoSuchService`, `TimeoutNoService`).
#[test]
fn a_call_whose_instance_died_is_not_reported_as_never_delivered() {
    let b = Broker::start();

    // `no_wait`: the dead instance may have run it, so `ServiceGone` (as
    // a `no_retry` call gets), not `NoSuchService`.
    let svc = b.spawn("zrpc-test-svc", &[]);
    wait_registered(b.dir(), "echo", 1);
    let opts = CallOptions::timeout(Duration::from_secs(60)).no_wait();
    let (r, took) = call_then_kill_its_instance(&b, &svc, opts);
    match r {
        Err(Error::ServiceGone { service }) => assert_eq!(service, "echo"),
        other => panic!("expected ServiceGone, got {other:?}"),
    }
    assert!(took < Duration::from_secs(30), "{took:?}");
    drop(svc);
    wait_registered(b.dir(), "echo", 0);

    // Waiting for a new instance until the deadline: a plain timeout (the
    // call may have run), not "no service held the name".
    let svc = b.spawn("zrpc-test-svc", &[]);
    wait_registered(b.dir(), "echo", 1);
    let opts = CallOptions::timeout(Duration::from_millis(1500));
    let (r, took) = call_then_kill_its_instance(&b, &svc, opts);
    match r {
        Err(Error::Timeout {
            service,
            no_service: false,
            ..
        }) => assert_eq!(service, "echo"),
        other => panic!("expected Timeout {{ no_service: false }}, got {other:?}"),
    }
    assert!(took < Duration::from_secs(30), "{took:?}");
    drop(svc);
    wait_registered(b.dir(), "echo", 0);

    // Calls that were never delivered still say so.
    let c = client(&b);
    let opts = CallOptions::timeout(Duration::from_secs(10)).no_wait();
    let r = c.call_with::<_, u32>("echo", "sleep", &1u64, opts);
    assert!(matches!(r, Err(Error::NoSuchService { .. })), "{r:?}");
    let opts = CallOptions::timeout(Duration::from_millis(200));
    let r = c.call_with::<_, u32>("echo", "sleep", &1u64, opts);
    assert!(
        matches!(
            r,
            Err(Error::Timeout {
                no_service: true,
                ..
            })
        ),
        "{r:?}"
    );
    assert_eq!(broker_stat(b.dir(), "pending"), 0);
}

/// The same across a broker restart: the call was delivered by the first
/// broker, its instance died with it, and the next broker (which has no
/// instance of the name) cannot know. The client, which resubmitted the
/// call, must not pass on "never ran" either. Both faces of the client.
#[test]
fn a_call_resubmitted_after_a_broker_restart_is_not_reported_as_never_delivered() {
    let mut b = Broker::start();
    let restart_without_the_service = |b: &mut Broker, mut svc: zrpc_tests::Proc| {
        assert!(wait_until(WAIT, || broker_stat(b.dir(), "pending") == 1));
        b.proc.signal(libc::SIGKILL);
        assert!(b.proc.wait_exit(WAIT).is_some(), "broker did not exit");
        svc.signal(libc::SIGKILL);
        assert!(svc.wait_exit(WAIT).is_some(), "service did not exit");
        b.respawn();
    };

    // `no_wait`, blocking client: `ServiceGone`, not `NoSuchService`.
    let svc = b.spawn("zrpc-test-svc", &[]);
    wait_registered(b.dir(), "echo", 1);
    let dir = b.dir().to_path_buf();
    let call = std::thread::spawn(move || {
        let c = BlockingClient::connect_to(&dir).expect("connect");
        let opts = CallOptions::timeout(Duration::from_secs(60)).no_wait();
        c.call_with::<_, u32>("echo", "sleep", &60_000u64, opts)
    });
    restart_without_the_service(&mut b, svc);
    match call.join().expect("caller thread") {
        Err(Error::ServiceGone { service }) => assert_eq!(service, "echo"),
        other => panic!("expected ServiceGone, got {other:?}"),
    }

    // Waiting until the deadline, async client: a plain `Timeout`.
    let svc = b.spawn("zrpc-test-svc", &[]);
    wait_registered(b.dir(), "echo", 1);
    let dir = b.dir().to_path_buf();
    let call = std::thread::spawn(move || {
        let rt = zrpc_tests::runtime();
        rt.block_on(async {
            let c = Client::connect_to(&dir).await.expect("connect");
            let opts = CallOptions::timeout(Duration::from_secs(4));
            c.call_with::<_, u32>("echo", "sleep", &60_000u64, opts)
                .await
        })
    });
    restart_without_the_service(&mut b, svc);
    match call.join().expect("caller thread") {
        Err(Error::Timeout {
            service,
            no_service: false,
            ..
        }) => assert_eq!(service, "echo"),
        other => panic!("expected Timeout {{ no_service: false }}, got {other:?}"),
    }
}

#[test]
fn broker_sigterm_answers_pending_calls_with_shutdown() {
    // A short grace period: the call below cannot finish within it.
    let b = Broker::start_with(&["--shutdown-grace", "0.3"]);
    let _svc = b.spawn("zrpc-test-svc", &[]);
    wait_registered(b.dir(), "echo", 1);
    let dir = b.dir().to_path_buf();
    let call = std::thread::spawn(move || {
        let c = BlockingClient::connect_to(&dir).expect("connect");
        // no_retry: surface the Shutdown error instead of resubmitting the
        // call to the next broker (the default).
        let opts = CallOptions::default().no_retry();
        c.call_with::<_, u32>("echo", "sleep", &60_000u64, opts)
    });
    assert!(wait_until(WAIT, || broker_stat(b.dir(), "pending") == 1));
    let mut b = b;
    b.proc.signal(libc::SIGTERM);
    match call.join().expect("thread") {
        Err(Error::Shutdown) => {}
        other => panic!("expected Shutdown, got {other:?}"),
    }
    let st = b.proc.wait_exit(WAIT).expect("broker exits");
    assert!(st.success());
    assert!(!b.socket().exists());
}

/// Busy polling (broker `--busy-poll-us`, service `ZRPC_BUSY_POLL_US`) is an
/// optimisation only: calls, new connections and the broker's timers work
/// the same with it off and with the longest window (1 ms, longer than the
/// gaps between these calls: the processes poll instead of sleeping).
#[test]
fn calls_and_timeouts_work_with_busy_polling_off_and_with_a_long_window() {
    for window_us in ["0", "1000"] {
        let b = Broker::start_with(&["--busy-poll-us", window_us]);
        let mut cmd = b.command("zrpc-test-svc");
        cmd.env("ZRPC_BUSY_POLL_US", window_us);
        let _svc = zrpc_tests::Proc::spawn("zrpc-test-svc", cmd);
        wait_registered(b.dir(), "echo", 1);
        let c = client(&b);
        for i in 0..200u32 {
            let r: u32 = c.call("echo", "echo", &i, T).expect("echo");
            assert_eq!(r, i, "window {window_us} us");
        }
        // A second client connects while the broker may be polling.
        let c2 = client(&b);
        let r: Value = c2.call("echo", "echo", &"second", T).expect("echo");
        assert_eq!(r, Value::from("second"));
        // The broker's deadline still fires (at most one window late).
        sleep_call_times_out(&c, 200, window_us);
        let r: u32 = c.call("echo", "echo", &7u32, T).expect("served after");
        assert_eq!(r, 7);
    }
}

#[test]
fn an_async_client_with_busy_polling_gets_every_reply_and_its_timers_fire() {
    let (b, _svc) = echo_broker();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .on_thread_park(zrpc_client::busy_poll::before_park)
        .build()
        .expect("runtime");
    // The longest window, so that the poller is armed for sure.
    let polling = zrpc_client::busy_poll::enable(Duration::from_micros(
        zrpc_client::busy_poll::MAX_WINDOW_US,
    ))
    .expect("poller");
    rt.block_on(async {
        let c = async_client(&b).await;
        // 16 callers in flight, 2,000 calls: every reply reaches its caller.
        let tasks: Vec<_> = (0..16u32)
            .map(|t| {
                let c = c.clone();
                tokio::spawn(async move {
                    for i in 0..125u32 {
                        let v = t * 1000 + i;
                        let r: u32 = c.call("echo", "echo", &v, T).await.expect("echo");
                        assert_eq!(r, v);
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("caller");
        }
        // The broker's deadline reaches a polling client.
        let r = c
            .call::<_, u32>(
                "echo",
                "sleep",
                &60_000u64,
                Some(Duration::from_millis(200)),
            )
            .await;
        assert!(matches!(r, Err(Error::Timeout { .. })), "{r:?}");
        // The runtime's own timers still fire while it polls.
        let start = Instant::now();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(start.elapsed() >= Duration::from_millis(20));
        let r: u32 = c.call("echo", "echo", &7u32, T).await.expect("after");
        assert_eq!(r, 7);
    });
    // None on a single-CPU machine, where polling is off.
    if let Some(s) = polling.stats() {
        assert!(s.rounds > 0 && s.caught > 0, "the client polled: {s:?}");
    }
}

/// Calls written in one go with payloads on both sides of the broker's
/// in-place limit (frames with payloads up to 256 bytes are handled where
/// they lie in the read buffer, larger ones are split off and forwarded by
/// reference), and a frame cut across two writes: each call is answered
/// with its own payload.
#[test]
fn payloads_of_every_size_in_one_write_are_each_routed() {
    use std::io::Write;
    use zrpc_proto::{encode_frame, Envelope};

    let (b, _svc) = echo_broker();
    let mut raw = zrpc_tests::raw::Raw::hello(b.dir());
    // Encoded lengths (bin8 adds 2 bytes, bin16 3): 2, 3, 72, 73, 255,
    // 256, 257, 259, 303, 9003, 5, 20003.
    let sizes = [0usize, 1, 70, 71, 253, 254, 255, 256, 300, 9000, 3, 20000];
    let payload = |id: u64, n: usize| -> Vec<u8> {
        rmp_serde::to_vec(&serde_bytes::Bytes::new(&vec![id as u8; n])).expect("encode")
    };
    let call = |id: u64| Envelope::Call {
        id,
        service: "echo",
        method: "echo",
        timeout_ms: Some(20_000),
        flags: 0,
    };
    let mut out = bytes::BytesMut::new();
    for (i, &n) in sizes.iter().enumerate() {
        encode_frame(&mut out, &call(i as u64 + 1), &payload(i as u64 + 1, n));
    }
    let last_id = sizes.len() as u64 + 1;
    let mut last = bytes::BytesMut::new();
    encode_frame(&mut last, &call(last_id), &payload(last_id, 40));
    let cut = last.len() / 2;
    out.extend_from_slice(&last[..cut]);
    raw.s.write_all(&out).expect("write");

    let mut expect: std::collections::HashMap<u64, Vec<u8>> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| (i as u64 + 1, payload(i as u64 + 1, n)))
        .collect();
    let check = |raw: &mut zrpc_tests::raw::Raw,
                 expect: &mut std::collections::HashMap<u64, Vec<u8>>| {
        let f = raw.recv_frame().expect("a result");
        match f.decode().expect("envelope") {
            Envelope::Result { id, code, message } => {
                assert_eq!(code, None, "call {id}: {message}");
                let want = expect.remove(&id).expect("one result per call");
                assert_eq!(&f.payload[..], &want[..], "call {id}");
            }
            other => panic!("expected a Result, got {other:?}"),
        }
    };
    for _ in 0..sizes.len() {
        check(&mut raw, &mut expect);
    }
    // The rest of the cut frame completes it.
    expect.insert(last_id, payload(last_id, 40));
    raw.s.write_all(&last[cut..]).expect("write");
    check(&mut raw, &mut expect);
    assert!(expect.is_empty());
}

/// A call compares at most 16 instances of a shared name at a time
/// (`PICK_AMONG` in zrpcd/src/names.rs), from a window that moves on with
/// each delivery. With 32 instances taking one call each
/// (`--max-delivered-per-conn 1`) and more calls than instances, every
/// call must still reach an instance with room as one frees: a first
/// version looked at different windows when checking for room and when
/// delivering, and could park a waiting call again and again without end
/// (a review found it). All calls finish, spread over all instances, and
/// the broker answers meanwhile.
#[test]
fn calls_to_a_name_with_more_instances_than_a_pick_compares_all_finish() {
    let b = Broker::start_with(&["--max-delivered-per-conn", "1"]);
    let _svcs: Vec<_> = (0..32)
        .map(|_| b.spawn("zrpc-test-svc", &["--name", "wide", "--shared"]))
        .collect();
    wait_registered(b.dir(), "wide", 32);
    let client = BlockingClient::connect_to(b.dir()).expect("connect");
    let pids = std::sync::Mutex::new(HashSet::new());
    std::thread::scope(|s| {
        for _ in 0..48 {
            s.spawn(|| {
                for _ in 0..3 {
                    let pid: u32 = client
                        .call("wide", "sleep", &50u64, Some(Duration::from_secs(30)))
                        .expect("wide.sleep");
                    pids.lock().expect("lock").insert(pid);
                }
            });
        }
        // The broker's thread is not stuck meanwhile.
        let pong: String = client
            .call("zrpcd", "ping", &(), Some(Duration::from_secs(10)))
            .expect("zrpcd.ping during the calls");
        assert_eq!(pong, "pong");
    });
    let pids = pids.into_inner().expect("lock");
    assert_eq!(pids.len(), 32, "instances that ran calls: {}", pids.len());
}
