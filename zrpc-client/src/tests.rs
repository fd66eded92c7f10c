//! Unit tests: value round trips, error mapping, and both clients against a
//! tiny fake broker speaking the protocol through `zrpc-proto`.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use zrpc_proto::{encode_frame, Envelope, Frame, FrameDecoder};

use crate::common::{call_frame, decode_payload, resubmit_parts, OutFrame, Payload};
use crate::*;

// ---------------------------------------------------------------- values

fn all_values() -> Vec<Value> {
    vec![
        Value::Nil,
        Value::Boolean(true),
        Value::Boolean(false),
        Value::from(u64::MAX),
        Value::from(i64::MIN),
        Value::from(i64::MAX),
        Value::from(0),
        Value::from(-1),
        Value::F32(1.5),
        Value::F32(f32::INFINITY),
        Value::F32(f32::NEG_INFINITY),
        Value::F32(f32::NAN),
        Value::F64(0.1),
        Value::F64(f64::INFINITY),
        Value::F64(f64::NEG_INFINITY),
        Value::F64(f64::NAN),
        Value::from("héllo"),
        Value::from(""),
        Value::Binary(vec![]),
        Value::Binary(vec![0, 1, 2, 255]),
        Value::Binary(vec![7; 70_000]),
        Value::Ext(5, vec![1, 2, 3, 4]),
        Value::Ext(-3, vec![9; 20]),
        Value::Ext(127, vec![]),
        Value::Array(vec![]),
        Value::Array(vec![Value::F32(2.0), Value::Binary(vec![1]), Value::Nil]),
        Value::Map(vec![
            (Value::from(1), Value::from("int key")),
            (Value::Binary(vec![0]), Value::Nil),
            (Value::Array(vec![Value::from(true)]), Value::F32(0.5)),
            (Value::Nil, Value::Ext(1, vec![2])),
        ]),
    ]
}

/// Bitwise equality (NaN == NaN, F32 != F64).
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::F32(x), Value::F32(y)) => x.to_bits() == y.to_bits(),
        (Value::F64(x), Value::F64(y)) => x.to_bits() == y.to_bits(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b))
        }
        (Value::Map(x), Value::Map(y)) => {
            x.len() == y.len()
                && x.iter()
                    .zip(y)
                    .all(|((ka, va), (kb, vb))| same(ka, kb) && same(va, vb))
        }
        _ => a == b,
    }
}

/// A `Call` frame with default options and a serde payload, no size limit.
fn serde_frame<P: serde::Serialize + ?Sized>(
    id: u64,
    service: &str,
    method: &str,
    payload: &P,
) -> Result<OutFrame> {
    call_frame(
        id,
        service,
        method,
        &CallOptions::default(),
        Payload::Serde(payload),
        u32::MAX,
        false,
    )
}

#[test]
fn values_round_trip_exactly() {
    for v in all_values() {
        // What the client puts on the wire...
        let frame = serde_frame(1, "svc", "m", &v).expect("encode");
        let f = FrameDecoder::new(u32::MAX)
            .decode(&mut BytesMut::from(&frame.to_vec()[..]))
            .expect("valid frame")
            .expect("complete frame");
        // ... is byte for byte the canonical rmpv encoding ...
        let mut exact = Vec::new();
        rmpv::encode::write_value(&mut exact, &v).expect("rmpv encode");
        assert_eq!(&f.payload[..], &exact[..], "wire bytes of {v:?}");
        // ... and decodes back to the same value and type.
        let back: Value = decode_payload(&exact).expect("decode");
        assert!(same(&v, &back), "{v:?} came back as {back:?}");
        let via_rmpv = rmpv::decode::read_value(&mut &f.payload[..]).expect("rmpv decode");
        assert!(same(&v, &via_rmpv));
    }
}

#[test]
fn empty_result_payload_is_nil() {
    assert_eq!(decode_payload::<Value>(&[]).expect("nil"), Value::Nil);
    decode_payload::<()>(&[]).expect("unit");
    assert_eq!(decode_payload::<Option<u32>>(&[]).expect("none"), None);
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Args {
    name: String,
    #[serde(with = "serde_bytes")]
    data: Vec<u8>,
}

#[test]
fn structs_are_maps_and_bytes_are_bin() {
    let a = Args {
        name: "x".into(),
        data: vec![1, 2],
    };
    let frame = serde_frame(1, "svc", "m", &a).expect("encode");
    let f = FrameDecoder::new(u32::MAX)
        .decode(&mut BytesMut::from(&frame.to_vec()[..]))
        .expect("valid")
        .expect("complete");
    let v = rmpv::decode::read_value(&mut &f.payload[..]).expect("decode");
    assert_eq!(
        v,
        Value::Map(vec![
            (Value::from("name"), Value::from("x")),
            (Value::from("data"), Value::Binary(vec![1, 2])),
        ])
    );
    assert_eq!(decode_payload::<Args>(&f.payload).expect("decode"), a);
}

#[test]
fn call_frame_fields_and_limits() {
    let opts = CallOptions::timeout(Duration::from_micros(1500))
        .no_wait()
        .no_retry();
    let frame = call_frame(
        42,
        "svc",
        "m",
        &opts,
        Payload::<()>::Raw(&Bytes::new()),
        1024,
        false,
    )
    .expect("ok");
    let f = FrameDecoder::new(1024)
        .decode(&mut BytesMut::from(&frame.to_vec()[..]))
        .expect("valid")
        .expect("complete");
    assert_eq!(
        f.decode().expect("envelope"),
        Envelope::Call {
            id: 42,
            service: "svc",
            method: "m",
            timeout_ms: Some(2),
            flags: zrpc_proto::flags::NO_WAIT | zrpc_proto::flags::NO_RETRY,
        }
    );
    assert_eq!(
        &f.payload[..],
        zrpc_proto::NIL_PAYLOAD,
        "empty raw payload becomes nil"
    );
    let big = vec![0u8; 2000];
    let err =
        call_frame(1, "svc", "m", &opts, Payload::Serde(&big), 1024, false).expect_err("too big");
    assert!(matches!(err, Error::LimitExceeded(_)), "{err}");
    let err = call_frame(
        1,
        "svc",
        "m",
        &opts,
        Payload::<()>::Raw(&Bytes::from(big.clone())),
        1024,
        false,
    )
    .expect_err("too big");
    assert!(matches!(err, Error::LimitExceeded(_)), "{err}");
    assert_eq!(CallOptions::default().timeout_ms(), None);
    assert_eq!(CallOptions::default().flags(), 0);
    assert_eq!(CallOptions::timeout(Duration::ZERO).timeout_ms(), Some(0));
}

#[test]
fn large_raw_payloads_are_sent_and_resubmitted_by_reference() {
    let payload = Bytes::from(
        rmp_serde::to_vec(&serde_bytes::ByteBuf::from(vec![7u8; 100_000])).expect("encode"),
    );
    let opts = CallOptions::timeout(Duration::from_secs(5));
    let frame = call_frame(
        9,
        "svc",
        "m",
        &opts,
        Payload::<()>::Raw(&payload),
        u32::MAX,
        false,
    )
    .expect("frame");
    assert_eq!(
        frame.tail.as_ptr(),
        payload.as_ptr(),
        "the payload is not copied"
    );
    let check = |f: &crate::common::OutFrame, timeout_ms: Option<u64>| {
        let decoded = FrameDecoder::new(u32::MAX)
            .decode(&mut BytesMut::from(&f.to_vec()[..]))
            .expect("valid")
            .expect("complete");
        assert_eq!(&decoded.payload[..], &payload[..]);
        assert_eq!(
            decoded.decode().expect("envelope"),
            Envelope::Call {
                id: 9,
                service: "svc",
                method: "m",
                timeout_ms,
                flags: 0
            }
        );
    };
    check(&frame, Some(5000));
    let again = resubmit_parts(&frame, Some(Duration::from_millis(1500)), u32::MAX).expect("again");
    assert_eq!(
        again.tail.as_ptr(),
        payload.as_ptr(),
        "resubmission reuses the payload"
    );
    check(&again, Some(1500));
    // A small payload stays inline, and resubmits the same way.
    let small = Bytes::from_static(&[0xc0]);
    let f = call_frame(
        9,
        "svc",
        "m",
        &opts,
        Payload::<()>::Raw(&small),
        u32::MAX,
        false,
    )
    .expect("small");
    assert!(f.tail.is_empty());
    let again = resubmit_parts(&f, None, u32::MAX).expect("again");
    assert_eq!(&again.tail[..], &[0xc0]);
    // The size limit still applies to the whole frame.
    assert!(matches!(
        resubmit_parts(&frame, None, 1000),
        Err(Error::LimitExceeded(_))
    ));
}

#[test]
fn serde_frames_share_the_encode_buffer_safely() {
    // Frames encoded back to back stay intact while earlier ones are alive
    // (they share the per-thread buffer), and after they are dropped.
    let mut kept = Vec::new();
    for i in 0..2000u32 {
        let v = (i, vec![i as u8; (i as usize * 37) % 3000]);
        let f = serde_frame(u64::from(i), "s", "m", &v).expect("frame");
        if i % 3 == 0 {
            kept.push((v, f));
        }
        if i % 500 == 0 {
            kept.clear();
        }
    }
    // Small frames have allocations of their own (a call keeps its frame
    // until answered: it must not pin the thread's encode buffer); large
    // ones are split off it, and the buffer is reused once they are gone.
    let small = serde_frame(1, "s", "m", &1u8).expect("small");
    assert!(small.is_inline(), "a small frame is stored inline");
    let medium = serde_frame(1, "s", "m", &vec![7u8; 1000]).expect("medium");
    assert!(!medium.is_inline());
    let at = medium.head().as_ptr() as usize;
    let (base, cap) = crate::common::scratch_range();
    assert!(
        at < base || at >= base + cap,
        "a medium frame is outside the encode buffer"
    );
    let big = vec![3u8; 200_000];
    let first = serde_frame(2, "s", "m", &big).expect("big");
    let addr = first.head().as_ptr();
    drop(first);
    let again = serde_frame(3, "s", "m", &big).expect("big");
    assert_eq!(again.head().as_ptr(), addr, "the encode buffer is reused");
    for (v, f) in &kept {
        let decoded = FrameDecoder::new(u32::MAX)
            .decode(&mut BytesMut::from(&f.to_vec()[..]))
            .expect("valid")
            .expect("complete");
        let back: (u32, Vec<u8>) = decode_payload(&decoded.payload).expect("decode");
        assert_eq!(&back, v);
    }
}

#[test]
fn error_codes_map_to_variants() {
    use ErrorCode as C;
    let e = |c| Error::from_call(c, "msg".into(), Bytes::new(), "svc", "meth");
    assert!(
        matches!(e(C::Timeout), Error::Timeout { service, method, no_service: false } if service == "svc" && method == "meth")
    );
    let unserved = e(C::TimeoutNoService);
    assert!(matches!(
        &unserved,
        Error::Timeout {
            no_service: true,
            ..
        }
    ));
    assert_eq!(unserved.code(), Some(C::TimeoutNoService));
    assert!(
        unserved
            .to_string()
            .contains("no service registered the name \"svc\""),
        "{unserved}"
    );
    assert!(matches!(e(C::NoSuchService), Error::NoSuchService { service } if service == "svc"));
    assert!(matches!(e(C::NoSuchMethod), Error::NoSuchMethod { method, .. } if method == "meth"));
    assert!(matches!(e(C::Remote), Error::Remote { message, .. } if message == "msg"));
    assert!(matches!(e(C::BadPayload), Error::BadPayload { message, .. } if message == "msg"));
    assert!(matches!(e(C::ServiceGone), Error::ServiceGone { .. }));
    assert!(matches!(e(C::Shutdown), Error::Shutdown));
    assert!(matches!(e(C::Protocol), Error::Protocol(m) if m == "msg"));
    assert!(matches!(e(C::VersionMismatch), Error::VersionMismatch(_)));
    assert!(matches!(e(C::LimitExceeded), Error::LimitExceeded(_)));
    for c in [
        C::NameTaken,
        C::InvalidName,
        C::Cancelled,
        C::NotRegistered,
        C::Unknown(999),
    ] {
        assert!(matches!(e(c), Error::Broker { code, .. } if code == c));
    }
    // `code()` gives back the wire code for every broker-reported error.
    for v in 1..=20u16 {
        let c = ErrorCode::from_u16(v).expect("non-zero");
        assert_eq!(e(c).code(), Some(c), "{c}");
    }
    assert_eq!(Error::Disconnected("x".into()).code(), None);
    let msg = e(C::Remote).to_string();
    assert!(msg.contains("svc.meth") && msg.contains("msg"), "{msg}");
}

// ------------------------------------------------------------ fake broker

const BOUND: Duration = Duration::from_secs(10);

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "zrpc-client-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A listening fake broker; it can stop listening and listen again on the
/// same path (a broker restart).
struct Fake {
    dir: TempDir,
    listener: Option<UnixListener>,
}

impl Fake {
    fn new() -> Fake {
        let dir = TempDir::new();
        let listener = UnixListener::bind(zrpc_proto::socket_path(&dir.0)).expect("bind");
        Fake {
            dir,
            listener: Some(listener),
        }
    }

    fn dir(&self) -> PathBuf {
        self.dir.0.clone()
    }

    /// Stops listening and removes the socket: connection attempts fail.
    fn stop(&mut self) {
        self.listener = None;
        let _ = std::fs::remove_file(zrpc_proto::socket_path(&self.dir.0));
    }

    /// Listens again on the same path.
    fn start(&mut self) {
        self.listener =
            Some(UnixListener::bind(zrpc_proto::socket_path(&self.dir.0)).expect("bind"));
    }

    /// Runs `f` on the next connection, in a thread.
    fn serve<F>(&self, f: F) -> JoinHandle<()>
    where
        F: FnOnce(Peer) + Send + 'static,
    {
        let l = self
            .listener
            .as_ref()
            .expect("listening")
            .try_clone()
            .expect("clone listener");
        std::thread::spawn(move || {
            let (s, _) = l.accept().expect("accept");
            f(Peer::new(s))
        })
    }
}

/// The broker side of one connection.
struct Peer {
    s: UnixStream,
    buf: BytesMut,
    dec: FrameDecoder,
}

impl Peer {
    fn new(s: UnixStream) -> Peer {
        s.set_read_timeout(Some(BOUND)).expect("timeout");
        Peer {
            s,
            buf: BytesMut::new(),
            dec: FrameDecoder::new(u32::MAX),
        }
    }

    /// The next frame, or `None` at end of stream.
    fn try_frame(&mut self) -> Option<Frame> {
        loop {
            if let Some(f) = self.dec.decode(&mut self.buf).expect("valid frame") {
                return Some(f);
            }
            let mut chunk = [0u8; 65536];
            let n = match self.s.read(&mut chunk) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => 0,
                Err(e) => panic!("fake broker read: {e}"),
            };
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn frame(&mut self) -> Frame {
        self.try_frame().expect("a frame, not end of stream")
    }

    fn send(&mut self, env: &Envelope<'_>, payload: &[u8]) {
        let mut out = BytesMut::new();
        encode_frame(&mut out, env, payload);
        self.s.write_all(&out).expect("fake broker write");
    }

    /// Answers the client's `Hello`; returns its instance id.
    fn handshake_with(&mut self, max_message_size: u32) -> u64 {
        let f = self.frame();
        let instance = match f.decode().expect("envelope") {
            Envelope::Hello {
                version,
                agent,
                instance,
                ..
            } => {
                assert_eq!(version, zrpc_proto::PROTOCOL_VERSION);
                assert!(agent.starts_with("zrpc-client/"), "{agent}");
                instance
            }
            other => panic!("expected Hello, got {other:?}"),
        };
        self.send(
            &Envelope::Welcome {
                version: zrpc_proto::PROTOCOL_VERSION,
                conn_id: 1,
                max_message_size,
                caps: 0,
            },
            &[],
        );
        instance
    }

    fn handshake(&mut self) -> u64 {
        self.handshake_with(zrpc_proto::DEFAULT_MAX_MESSAGE_SIZE)
    }

    /// Reads `n` calls, keyed by method name.
    fn calls(&mut self, n: usize) -> std::collections::HashMap<String, SeenCall> {
        let mut out = std::collections::HashMap::new();
        for _ in 0..n {
            let (id, method, timeout_ms, flags, payload) = self.call();
            let prev = out.insert(
                method.clone(),
                SeenCall {
                    id,
                    timeout_ms,
                    flags,
                    payload,
                },
            );
            assert!(prev.is_none(), "call {method:?} seen twice");
        }
        out
    }

    fn error(&mut self, id: u64, code: ErrorCode) {
        self.send(
            &Envelope::Result {
                id,
                code: Some(code),
                message: "fake",
            },
            &[],
        );
    }

    /// Reads the next Call: (id, method, timeout_ms, flags, payload).
    fn call(&mut self) -> (u64, String, Option<u64>, u32, Bytes) {
        loop {
            let f = self.frame();
            match f.decode().expect("envelope") {
                Envelope::Call {
                    id,
                    service,
                    method,
                    timeout_ms,
                    flags,
                } => {
                    assert_eq!(service, "svc");
                    return (id, method.to_owned(), timeout_ms, flags, f.payload.clone());
                }
                Envelope::Pong { .. } | Envelope::Cancel { .. } => continue,
                other => panic!("expected Call, got {other:?}"),
            }
        }
    }

    fn result(&mut self, id: u64, payload: &[u8]) {
        self.send(
            &Envelope::Result {
                id,
                code: None,
                message: "",
            },
            payload,
        );
    }

    /// Waits for the `Cancel` of call `id`.
    fn expect_cancel(&mut self, id: u64) {
        loop {
            let f = self.frame();
            match f.decode().expect("envelope") {
                Envelope::Cancel { id: got } => {
                    assert_eq!(got, id);
                    return;
                }
                Envelope::Pong { .. } => continue,
                other => panic!("expected Cancel, got {other:?}"),
            }
        }
    }

    /// Waits for the client to close the connection.
    fn expect_eof(&mut self) {
        while let Some(f) = self.try_frame() {
            match f.decode().expect("envelope") {
                Envelope::Cancel { .. } | Envelope::Pong { .. } => {}
                other => panic!("expected end of stream, got {other:?}"),
            }
        }
    }
}

/// A `Call` as the fake broker saw it.
#[derive(Debug, Clone)]
struct SeenCall {
    id: u64,
    timeout_ms: Option<u64>,
    flags: u32,
    payload: Bytes,
}

/// Answers `n` calls in reverse order of arrival with their own payload,
/// pinging in between and checking the pong.
fn echo_reversed(p: &mut Peer, n: usize) {
    let mut calls = Vec::new();
    for _ in 0..n {
        calls.push(p.call());
    }
    p.send(&Envelope::Ping { nonce: 77 }, &[]);
    let f = p.frame();
    assert_eq!(
        f.decode().expect("envelope"),
        Envelope::Pong { nonce: 77 },
        "pong"
    );
    for (id, method, _, _, payload) in calls.into_iter().rev() {
        if method == "fail" {
            p.send(
                &Envelope::Result {
                    id,
                    code: Some(ErrorCode::Remote),
                    message: "boom",
                },
                &[],
            );
        } else {
            p.result(id, &payload);
        }
    }
}

fn rt_multi() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn rt_current() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Joins the fake broker while driving the runtime, so that the client's
/// tasks (on a current-thread runtime) can flush and close the socket.
fn finish(rt: &tokio::runtime::Runtime, peer: JoinHandle<()>) {
    rt.block_on(async { bounded(tokio::task::spawn_blocking(move || peer.join())).await })
        .expect("join task")
        .expect("fake broker");
}

async fn bounded<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(BOUND, f).await.expect("bounded wait")
}

/// Polls a call once (it is sent and its caller registered); it must not
/// be answered yet.
async fn poll_once<F: std::future::Future + Unpin>(f: &mut F)
where
    F::Output: std::fmt::Debug,
{
    tokio::select! {
        biased;
        r = f => panic!("answered before the broker answered: {r:?}"),
        () = std::future::ready(()) => {}
    }
}

/// Waits (bounded) until `n` answered calls wait for their callers.
async fn wait_answered(client: &Client, n: usize) {
    wait_until(|| client.answered() == n).await;
}

/// Waits until `cond` holds, within [`BOUND`].
async fn wait_until(cond: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + BOUND;
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "condition never met");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

// ------------------------------------------------------------ async tests

fn async_concurrent_out_of_order(rt: tokio::runtime::Runtime) {
    const N: usize = 16;
    let fake = Fake::new();
    let peer = fake.serve(|mut p| {
        p.handshake();
        echo_reversed(&mut p, N + 1);
        p.expect_eof();
    });
    let dir = fake.dir();
    rt.block_on(async move {
        let client = bounded(Client::connect_to(&dir)).await.expect("connect");
        let mut tasks = Vec::new();
        for i in 0..N {
            let c = client.clone();
            tasks.push(tokio::spawn(async move {
                let v = Value::Array(vec![Value::from(i), Value::F32(i as f32)]);
                let got: Value = c
                    .call("svc", "echo", &v, Some(Duration::from_secs(30)))
                    .await
                    .expect("call");
                assert!(same(&got, &v));
            }));
        }
        let c = client.clone();
        tasks.push(tokio::spawn(async move {
            let err = c
                .call_with::<_, Value>("svc", "fail", &(), CallOptions::default())
                .await
                .expect_err("remote error");
            assert!(
                matches!(&err, Error::Remote { message, .. } if message == "boom"),
                "{err}"
            );
        }));
        for t in tasks {
            bounded(t).await.expect("task");
        }
        drop(client);
    });
    finish(&rt, peer);
}

#[test]
fn async_concurrent_calls_multi_thread() {
    async_concurrent_out_of_order(rt_multi());
}

#[test]
fn async_concurrent_calls_current_thread() {
    async_concurrent_out_of_order(rt_current());
}

/// Results answered in one write (the client reads them where they lie in
/// its read buffer), small and large, empty and not, for typed and raw
/// calls, with a `Ping` and an error among them: every caller gets its own.
#[test]
fn async_results_of_every_size_in_one_write() {
    // Encoded sizes of the typed results: 2, 3, 68, 69, 70, 71, 202, 5003;
    // the "nil" call's result is empty.
    const TYPED: [usize; 8] = [0, 1, 66, 67, 68, 69, 200, 5000];
    // Raw results (one MessagePack bin each): 12, 70, 102 bytes.
    const RAW: [usize; 3] = [10, 68, 100];
    let value = |i: usize, n: usize| Value::Binary(vec![i as u8; n]);
    let encoded = |v: &Value| {
        let mut b = Vec::new();
        rmpv::encode::write_value(&mut b, v).expect("encode");
        b
    };
    let fake = Fake::new();
    let calls = TYPED.len() + RAW.len() + 2;
    let peer = fake.serve(move |mut p| {
        p.handshake();
        let mut all = BytesMut::new();
        for k in 0..calls {
            let (id, method, _, _, payload) = p.call();
            if k == calls / 2 {
                encode_frame(&mut all, &Envelope::Ping { nonce: 5 }, &[]);
            }
            let env = Envelope::Result {
                id,
                code: (method == "fail").then_some(ErrorCode::Remote),
                message: if method == "fail" { "no" } else { "" },
            };
            // Echo: each result is the call's own payload.
            let payload = if method == "nil" {
                Bytes::new()
            } else {
                payload
            };
            encode_frame(&mut all, &env, &payload);
        }
        p.s.write_all(&all).expect("write");
        let f = p.frame();
        assert_eq!(f.decode().expect("envelope"), Envelope::Pong { nonce: 5 });
        p.expect_eof();
    });
    let dir = fake.dir();
    let rt = rt_current();
    rt.block_on(async move {
        let client = bounded(Client::connect_to(&dir)).await.expect("connect");
        let mut tasks = Vec::new();
        for (i, &n) in TYPED.iter().enumerate() {
            let c = client.clone();
            let v = value(i, n);
            tasks.push(tokio::spawn(async move {
                let got: Value = c.call("svc", "typed", &v, None).await.expect("call");
                assert_eq!(got, v, "typed result of {n} bytes");
            }));
        }
        for (i, &n) in RAW.iter().enumerate() {
            let c = client.clone();
            let raw = Bytes::from(encoded(&value(100 + i, n)));
            tasks.push(tokio::spawn(async move {
                let got = c
                    .call_raw("svc", "raw", raw.clone(), CallOptions::default())
                    .await
                    .expect("call");
                assert_eq!(got, raw, "raw result of {} bytes", raw.len());
            }));
        }
        let c = client.clone();
        tasks.push(tokio::spawn(async move {
            let got: Value = c.call("svc", "nil", &1, None).await.expect("call");
            assert_eq!(got, Value::Nil);
        }));
        let c = client.clone();
        tasks.push(tokio::spawn(async move {
            let err = c
                .call::<_, Value>("svc", "fail", &(), None)
                .await
                .expect_err("remote error");
            assert!(
                matches!(&err, Error::Remote { message, .. } if message == "no"),
                "{err}"
            );
        }));
        for t in tasks {
            bounded(t).await.expect("task");
        }
        drop(client);
    });
    finish(&rt, peer);
}

#[test]
fn async_call_fields_and_raw() {
    let fake = Fake::new();
    let peer = fake.serve(|mut p| {
        p.handshake();
        let (id, method, timeout_ms, flags, payload) = p.call();
        assert_eq!(method, "raw");
        assert_eq!(timeout_ms, Some(5000));
        assert_eq!(flags, zrpc_proto::flags::NO_WAIT);
        assert_eq!(&payload[..], &[0x92, 0x01, 0x02]);
        p.result(id, &[]); // empty result payload = nil
        let (id, _, timeout_ms, flags, _) = p.call();
        assert_eq!((timeout_ms, flags), (None, 0));
        p.result(id, &[0x2a]);
        p.expect_eof();
    });
    let dir = fake.dir();
    let rt = rt_current();
    rt.block_on(async move {
        let client = bounded(Client::builder().socket_dir(&dir).connect())
            .await
            .expect("connect");
        let opts = CallOptions::timeout(Duration::from_secs(5)).no_wait();
        let out = bounded(client.call_raw("svc", "raw", Bytes::from_static(&[0x92, 1, 2]), opts))
            .await
            .expect("raw");
        assert!(out.is_empty());
        let n: u8 = bounded(client.call("svc", "n", &(), None))
            .await
            .expect("call");
        assert_eq!(n, 42);
    });
    finish(&rt, peer);
}

#[test]
fn async_version_mismatch() {
    let fake = Fake::new();
    let peer = fake.serve(|mut p| {
        p.frame();
        p.send(
            &Envelope::Fatal {
                code: ErrorCode::VersionMismatch,
                message: "only version 7",
            },
            &[],
        );
    });
    let dir = fake.dir();
    let rt = rt_current();
    let err = rt
        .block_on(bounded(Client::connect_to(&dir)))
        .expect_err("mismatch");
    assert!(
        matches!(&err, Error::VersionMismatch(m) if m.contains("version 7")),
        "{err}"
    );
    peer.join().expect("fake broker");

    // A Welcome with another version is a mismatch too.
    let peer = fake.serve(|mut p| {
        p.frame();
        p.send(
            &Envelope::Welcome {
                version: 2,
                conn_id: 1,
                max_message_size: 1024,
                caps: 0,
            },
            &[],
        );
    });
    let err = rt
        .block_on(bounded(Client::connect_to(&dir)))
        .expect_err("mismatch");
    assert!(matches!(err, Error::VersionMismatch(_)), "{err}");
    peer.join().expect("fake broker");
}

#[test]
fn async_dropped_call_sends_cancel() {
    let fake = Fake::new();
    let (id_tx, id_rx) = std::sync::mpsc::channel();
    let peer = fake.serve(move |mut p| {
        p.handshake();
        let (id, ..) = p.call();
        id_tx.send(id).expect("signal");
        p.expect_cancel(id);
        // The connection keeps working.
        let (id, ..) = p.call();
        p.result(id, &[0x01]);
        p.expect_eof();
    });
    let dir = fake.dir();
    let rt = rt_multi();
    rt.block_on(async move {
        let client = bounded(Client::connect_to(&dir)).await.expect("connect");
        let c = client.clone();
        let task = tokio::spawn(async move { c.call::<_, Value>("svc", "slow", &(), None).await });
        let id = bounded(tokio::task::spawn_blocking(move || {
            id_rx.recv_timeout(BOUND)
        }))
        .await
        .expect("join")
        .expect("call seen");
        assert!(id >= 1);
        task.abort();
        let _ = bounded(task).await;
        let n: u8 = bounded(client.call("svc", "next", &(), None))
            .await
            .expect("call");
        assert_eq!(n, 1);
    });
    finish(&rt, peer);
}

#[test]
fn async_answered_call_dropped_before_its_caller_looks_sends_no_cancel() {
    let fake = Fake::new();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let peer = fake.serve(move |mut p| {
        p.handshake();
        let (id, ..) = p.call();
        // Answered only once the caller has been polled (and is pending).
        go_rx.recv_timeout(BOUND).expect("go");
        p.result(id, &[0x07]);
        // The next frame is the next call: no `Cancel` for the answered
        // call whose caller went away without taking its outcome.
        loop {
            let f = p.frame();
            match f.decode().expect("envelope") {
                Envelope::Call { id, method, .. } => {
                    assert_eq!(method, "next");
                    p.result(id, &[0x01]);
                    break;
                }
                Envelope::Pong { .. } => continue,
                other => panic!("expected the next Call, got {other:?}"),
            }
        }
        p.expect_eof();
    });
    let dir = fake.dir();
    let rt = rt_multi();
    rt.block_on(async move {
        let client = bounded(Client::connect_to(&dir)).await.expect("connect");
        let mut call = Box::pin(client.call::<_, Value>("svc", "m", &(), None));
        // Polled once: the call is sent and its caller registered (the
        // fake broker answers only after this).
        poll_once(&mut call).await;
        go_tx.send(()).expect("go");
        wait_answered(&client, 1).await;
        assert_eq!(client.pending(), 1, "the outcome waits for its caller");
        drop(call);
        assert_eq!(client.pending(), 0, "dropping the caller drops the outcome");
        let n: u8 = bounded(client.call("svc", "next", &(), None))
            .await
            .expect("call");
        assert_eq!(n, 1);
    });
    finish(&rt, peer);
}

/// An outcome its caller keeps without taking it (a future polled once,
/// then left aside) does not hold other callers' calls back: they are
/// written and answered.
#[test]
fn async_an_untaken_outcome_does_not_hold_other_calls() {
    let fake = Fake::new();
    let peer = fake.serve(move |mut p| {
        p.handshake();
        let (id, method, ..) = p.call();
        assert_eq!(method, "kept");
        p.result(id, &[0x01]);
        for _ in 0..2 {
            let (id, method, ..) = p.call();
            p.result(id, &[if method == "b" { 0x0b } else { 0x0c }]);
        }
        p.expect_eof();
    });
    let dir = fake.dir();
    let rt = rt_multi();
    rt.block_on(async move {
        let client = bounded(Client::connect_to(&dir)).await.expect("connect");
        let mut kept = Box::pin(client.call::<_, u8>("svc", "kept", &(), None));
        poll_once(&mut kept).await;
        wait_answered(&client, 1).await;
        // Three calls in flight: b and c go through the writer.
        let call = |m: &'static str| {
            let c = client.clone();
            tokio::spawn(async move { c.call::<_, u8>("svc", m, &(), None).await })
        };
        let (b, c) = (call("b"), call("c"));
        assert_eq!(bounded(b).await.expect("task").expect("b"), 0x0b);
        assert_eq!(bounded(c).await.expect("task").expect("c"), 0x0c);
        assert_eq!(bounded(kept).await.expect("kept"), 0x01);
    });
    finish(&rt, peer);
}

#[test]
fn async_local_safety_timeout() {
    let fake = Fake::new();
    let peer = fake.serve(|mut p| {
        p.handshake();
        let (id, _, timeout_ms, ..) = p.call();
        assert_eq!(timeout_ms, Some(10));
        // Never answer: the client gives up after timeout + 2 s.
        p.expect_cancel(id);
        p.expect_eof();
    });
    let dir = fake.dir();
    let rt = rt_current();
    rt.block_on(async move {
        let client = bounded(Client::connect_to(&dir)).await.expect("connect");
        let started = Instant::now();
        let err =
            bounded(client.call::<_, Value>("svc", "x", &(), Some(Duration::from_millis(10))))
                .await
                .expect_err("timeout");
        let took = started.elapsed();
        assert!(
            matches!(&err, Error::Timeout { service, method, .. } if service == "svc" && method == "x"),
            "{err}"
        );
        assert!(took >= Duration::from_secs(2), "{took:?}");
        assert!(took < Duration::from_secs(6), "{took:?}");
    });
    finish(&rt, peer);
}

#[test]
fn async_limit_and_connect_errors() {
    let fake = Fake::new();
    let peer = fake.serve(|mut p| {
        p.handshake_with(1024);
        // Nothing is sent for the oversized call.
        let (id, ..) = p.call();
        p.result(id, &[0xc3]);
        p.expect_eof();
    });
    let dir = fake.dir();
    let rt = rt_current();
    rt.block_on(async move {
        let client = bounded(Client::connect_to(&dir)).await.expect("connect");
        let big = serde_bytes::ByteBuf::from(vec![0u8; 4096]);
        let err = client
            .call::<_, Value>("svc", "big", &big, None)
            .await
            .expect_err("too big");
        assert!(matches!(err, Error::LimitExceeded(_)), "{err}");
        assert_eq!(err.code(), Some(ErrorCode::LimitExceeded));
        let ok: bool = bounded(client.call("svc", "small", &(), None))
            .await
            .expect("ok");
        assert!(ok);
    });
    finish(&rt, peer);

    let empty = TempDir::new();
    let err = rt_current()
        .block_on(Client::connect_to(&empty.0))
        .expect_err("no broker");
    let msg = err.to_string();
    assert!(matches!(err, Error::Connect { .. }));
    assert!(
        msg.contains("zrpcd.sock") && msg.contains("is zrpcd running?"),
        "{msg}"
    );
    let err = BlockingClient::connect_to(&empty.0).expect_err("no broker");
    assert!(matches!(err, Error::Connect { .. }), "{err}");
}

// --------------------------------------------------------- blocking tests

#[test]
fn blocking_concurrent_calls_out_of_order() {
    const N: usize = 8;
    let fake = Fake::new();
    let peer = fake.serve(|mut p| {
        p.handshake();
        for _ in 0..3 {
            echo_reversed(&mut p, N + 1);
        }
        p.expect_eof();
    });
    let client = BlockingClient::connect_to(fake.dir()).expect("connect");
    for round in 0..3 {
        let handles: Vec<_> = (0..=N)
            .map(|i| {
                let c = client.clone();
                std::thread::spawn(move || {
                    if i == N {
                        let err = c
                            .call::<_, Value>("svc", "fail", &(), Some(BOUND))
                            .expect_err("remote");
                        assert!(matches!(err, Error::Remote { .. }), "{err}");
                        return;
                    }
                    let v = Value::Map(vec![(
                        Value::from(round * 100 + i),
                        Value::Binary(vec![i as u8; 100_000 * (i % 2)]),
                    )]);
                    let got: Value = c.call("svc", "echo", &v, Some(BOUND)).expect("call");
                    assert!(same(&got, &v));
                })
            })
            .collect();
        for h in handles {
            h.join().expect("caller thread");
        }
    }
    drop(client);
    peer.join().expect("fake broker");
}

#[test]
fn blocking_partial_frames_survive_reader_change() {
    let fake = Fake::new();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let peer = fake.serve(move |mut p| {
        p.handshake();
        let mut ids = std::collections::HashMap::new();
        for _ in 0..2 {
            let (id, method, ..) = p.call();
            ids.insert(method, id);
        }
        let (a, b) = (ids["a"], ids["b"]);
        // B's full result then the first half of A's: whoever reads gets B's
        // result and leaves a partial frame behind.
        let mut out = BytesMut::new();
        encode_frame(
            &mut out,
            &Envelope::Result {
                id: b,
                code: None,
                message: "",
            },
            &[0x0b],
        );
        let mut second = BytesMut::new();
        encode_frame(
            &mut second,
            &Envelope::Result {
                id: a,
                code: None,
                message: "",
            },
            &[0x0a],
        );
        let cut = out.len() + 5;
        out.extend_from_slice(&second);
        p.s.write_all(&out[..cut]).expect("write");
        go_rx.recv_timeout(BOUND).expect("go");
        p.s.write_all(&out[cut..]).expect("write");
        p.expect_eof();
    });
    let client = BlockingClient::connect_to(fake.dir()).expect("connect");
    let c = client.clone();
    let ta = std::thread::spawn(move || c.call::<_, u8>("svc", "a", &(), Some(BOUND)));
    let c = client.clone();
    let tb = std::thread::spawn(move || c.call::<_, u8>("svc", "b", &(), Some(BOUND)));
    let b = tb.join().expect("thread b").expect("b");
    go_tx.send(()).expect("go");
    let a = ta.join().expect("thread a").expect("a");
    assert_eq!((a, b), (0x0a, 0x0b));
    drop(client);
    peer.join().expect("fake broker");
}

#[test]
fn blocking_version_mismatch_and_local_timeout() {
    let fake = Fake::new();
    let dir = fake.dir();
    // Version mismatch at connect.
    let peer = fake.serve(|mut p| {
        p.frame();
        p.send(
            &Envelope::Fatal {
                code: ErrorCode::VersionMismatch,
                message: "no",
            },
            &[],
        );
    });
    let err = BlockingClient::connect_to(&dir).expect_err("mismatch");
    assert!(matches!(err, Error::VersionMismatch(_)), "{err}");
    peer.join().expect("fake broker");

    // A local safety timeout sends Cancel; the connection stays usable.
    let peer = fake.serve(|mut p| {
        p.handshake();
        let (id, ..) = p.call();
        p.expect_cancel(id);
        let (id, ..) = p.call();
        p.result(id, &[0x05]);
        p.expect_eof();
    });
    let client = BlockingClient::builder()
        .socket_dir(&dir)
        .agent("zrpc-client/test")
        .connect_blocking()
        .expect("connect");
    let started = Instant::now();
    let err = client
        .call::<_, Value>("svc", "x", &(), Some(Duration::from_millis(1)))
        .expect_err("timeout");
    let took = started.elapsed();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(6),
        "{took:?}"
    );
    let n: u8 = client
        .call("svc", "y", &(), Some(BOUND))
        .expect("still usable");
    assert_eq!(n, 5);
    drop(client);
    peer.join().expect("fake broker");
}

// ------------------------------------------------ reconnection (both flavours)

/// Either client, with a blocking `call` so that one scenario serves both.
#[derive(Clone)]
enum Caller {
    Async(std::sync::Arc<tokio::runtime::Runtime>, Client),
    Blocking(BlockingClient),
}

#[derive(Debug, Clone, Copy)]
enum Flavor {
    Async,
    Blocking,
}

impl Caller {
    fn connect(flavor: Flavor, dir: &std::path::Path) -> Caller {
        let b = Client::builder()
            .socket_dir(dir)
            .reconnect_backoff(Duration::from_millis(5), Duration::from_millis(50));
        match flavor {
            Flavor::Async => {
                let rt = std::sync::Arc::new(rt_multi());
                let c = rt.block_on(bounded(b.connect())).expect("connect");
                Caller::Async(rt, c)
            }
            Flavor::Blocking => Caller::Blocking(b.connect_blocking().expect("connect")),
        }
    }

    /// Calls `svc.method(method)`: the payload is the method name.
    fn call(&self, method: &str, opts: CallOptions) -> Result<String> {
        match self {
            Caller::Async(rt, c) => rt.block_on(c.call_with("svc", method, &method, opts)),
            Caller::Blocking(c) => c.call_with("svc", method, &method, opts),
        }
    }

    /// The same in a thread; also returns how long the call took.
    fn spawn(&self, method: &str, opts: CallOptions) -> JoinHandle<(Result<String>, Duration)> {
        let c = self.clone();
        let method = method.to_owned();
        std::thread::spawn(move || {
            let t = Instant::now();
            let r = c.call(&method, opts);
            (r, t.elapsed())
        })
    }

    fn connected(&self) -> bool {
        match self {
            Caller::Async(_, c) => c.connected(),
            Caller::Blocking(c) => c.connected(),
        }
    }

    fn pending(&self) -> usize {
        match self {
            Caller::Async(_, c) => c.pending(),
            Caller::Blocking(c) => c.pending(),
        }
    }
}

/// Polls `cond` until true, panicking after [`BOUND`].
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < BOUND, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn join_call(h: JoinHandle<(Result<String>, Duration)>) -> (Result<String>, Duration) {
    let start = Instant::now();
    while !h.is_finished() {
        assert!(start.elapsed() < BOUND, "call did not finish");
        std::thread::sleep(Duration::from_millis(2));
    }
    h.join().expect("caller thread")
}

/// Answers every call of `calls` with its payload (the method name).
fn echo_all(p: &mut Peer, calls: &std::collections::HashMap<String, SeenCall>) {
    for c in calls.values() {
        p.result(c.id, &c.payload);
    }
}

fn msgpack_str(s: &str) -> Bytes {
    Bytes::from(rmp_serde::to_vec(s).expect("encode"))
}

/// The connection drops mid-call and the broker comes back on the same
/// path: the client reconnects with the same instance id and resubmits
/// every call with the same id, flags and payload and a smaller budget; a
/// call made while disconnected is queued and sent after the handshake.
fn reconnect_resubmits(flavor: Flavor) {
    let mut fake = Fake::new();
    let (seen_tx, seen_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let peer = fake.serve(move |mut p| {
        let instance = p.handshake();
        let calls = p.calls(2);
        seen_tx.send((instance, calls)).expect("signal");
        go_rx.recv_timeout(BOUND).expect("go");
        // Dropping `p` closes the connection mid-call.
    });
    let c = Caller::connect(flavor, &fake.dir());
    let a = c.spawn("a", CallOptions::timeout(Duration::from_secs(30)));
    let b = c.spawn("b", CallOptions::default().no_wait());
    let (instance, first) = seen_rx.recv_timeout(BOUND).expect("calls seen");
    // The broker goes away: nothing listens until `start`.
    fake.stop();
    go_tx.send(()).expect("go");
    peer.join().expect("fake broker");
    wait_for("the client to notice", || !c.connected());
    let queued = c.spawn("c", CallOptions::timeout(Duration::from_secs(30)));
    wait_for("the queued call", || c.pending() == 3);

    fake.start();
    let (seen_tx, seen_rx) = std::sync::mpsc::channel();
    let peer = fake.serve(move |mut p| {
        let instance = p.handshake();
        let calls = p.calls(3);
        echo_all(&mut p, &calls);
        seen_tx.send((instance, calls)).expect("signal");
        p.expect_eof();
    });
    for (h, want) in [(a, "a"), (b, "b"), (queued, "c")] {
        let (r, _) = join_call(h);
        assert_eq!(r.expect("answered after the reconnect"), want);
    }
    let (instance2, second) = seen_rx.recv_timeout(BOUND).expect("calls seen");
    assert_eq!(
        instance2, instance,
        "the same instance id across reconnects"
    );
    for m in ["a", "b"] {
        let (x, y) = (&first[m], &second[m]);
        assert_eq!(y.id, x.id, "{m}: same call id");
        assert_eq!(y.flags, x.flags, "{m}: same flags");
        assert_eq!(y.payload, x.payload, "{m}: same payload");
        assert_eq!(&y.payload[..], &msgpack_str(m)[..]);
    }
    assert_eq!(first["b"].flags, zrpc_proto::flags::NO_WAIT);
    assert_eq!(second["b"].timeout_ms, None, "no deadline stays none");
    let (t1, t2) = (
        first["a"].timeout_ms.expect("budget"),
        second["a"].timeout_ms.expect("budget"),
    );
    assert!(t1 <= 30_000 && t2 < t1, "remaining budget: {t1} then {t2}");
    assert_eq!(second["c"].timeout_ms.map(|t| t <= 30_000), Some(true));
    assert!(![first["a"].id, first["b"].id].contains(&second["c"].id));
    drop(c);
    peer.join().expect("fake broker");
}

#[test]
fn async_reconnect_resubmits() {
    reconnect_resubmits(Flavor::Async);
}

#[test]
fn blocking_reconnect_resubmits() {
    reconnect_resubmits(Flavor::Blocking);
}

/// `Result{Shutdown}` keeps a call pending for the next broker (then comes
/// `Fatal{Shutdown}`); with `no_retry` it surfaces as `Error::Shutdown`.
fn shutdown_result_resubmits(flavor: Flavor) {
    let mut fake = Fake::new();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let (seen_tx, seen_rx) = std::sync::mpsc::channel();
    let peer = fake.serve(move |mut p| {
        p.handshake();
        let calls = p.calls(2);
        p.error(calls["a"].id, ErrorCode::Shutdown);
        p.error(calls["n"].id, ErrorCode::Shutdown);
        seen_tx.send(calls).expect("signal");
        go_rx.recv_timeout(BOUND).expect("go");
        p.send(
            &Envelope::Fatal {
                code: ErrorCode::Shutdown,
                message: "bye",
            },
            &[],
        );
    });
    let c = Caller::connect(flavor, &fake.dir());
    let a = c.spawn("a", CallOptions::timeout(Duration::from_secs(30)));
    let n = c.spawn(
        "n",
        CallOptions::timeout(Duration::from_secs(30)).no_retry(),
    );
    let first = seen_rx.recv_timeout(BOUND).expect("calls seen");
    let (r, _) = join_call(n);
    assert!(matches!(r, Err(Error::Shutdown)), "{r:?}");
    assert!(!a.is_finished(), "the retried call still waits");
    fake.stop();
    go_tx.send(()).expect("go");
    peer.join().expect("fake broker");
    wait_for("the client to notice", || !c.connected());
    fake.start();
    let peer = fake.serve(move |mut p| {
        p.handshake();
        let calls = p.calls(1);
        assert_eq!(calls["a"].id, first["a"].id, "same id");
        echo_all(&mut p, &calls);
        p.expect_eof();
    });
    let (r, _) = join_call(a);
    assert_eq!(r.expect("answered by the next broker"), "a");
    drop(c);
    peer.join().expect("fake broker");
}

#[test]
fn async_shutdown_result_resubmits() {
    shutdown_result_resubmits(Flavor::Async);
}

#[test]
fn blocking_shutdown_result_resubmits() {
    shutdown_result_resubmits(Flavor::Blocking);
}

/// `no_retry` calls on a lost connection fail at once with `Disconnected`
/// and are not resubmitted; the others are.
fn no_retry_fails_on_loss(flavor: Flavor) {
    let mut fake = Fake::new();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let (seen_tx, seen_rx) = std::sync::mpsc::channel();
    let peer = fake.serve(move |mut p| {
        p.handshake();
        seen_tx.send(p.calls(2)).expect("signal");
        go_rx.recv_timeout(BOUND).expect("go");
    });
    let c = Caller::connect(flavor, &fake.dir());
    let a = c.spawn("a", CallOptions::default());
    let n = c.spawn("n", CallOptions::default().no_retry());
    seen_rx.recv_timeout(BOUND).expect("calls seen");
    fake.stop();
    go_tx.send(()).expect("go");
    peer.join().expect("fake broker");
    // Fails while no broker listens, i.e. without waiting for a reconnect.
    let (r, _) = join_call(n);
    assert!(matches!(r, Err(Error::Disconnected(_))), "{r:?}");
    fake.start();
    let peer = fake.serve(move |mut p| {
        p.handshake();
        let calls = p.calls(1);
        assert!(calls.contains_key("a"));
        echo_all(&mut p, &calls);
        // `n` is never resubmitted (expect_eof fails on a Call).
        p.expect_eof();
    });
    let (r, _) = join_call(a);
    assert_eq!(r.expect("resubmitted"), "a");
    drop(c);
    peer.join().expect("fake broker");
}

#[test]
fn async_no_retry_fails_on_loss() {
    no_retry_fails_on_loss(Flavor::Async);
}

#[test]
fn blocking_no_retry_fails_on_loss() {
    no_retry_fails_on_loss(Flavor::Blocking);
}

/// A call whose deadline passes while the client is disconnected fails with
/// `Timeout` at its deadline (not at the local safety deadline) and is not
/// resubmitted; a call without a deadline waits for the broker.
fn deadline_passes_while_disconnected(flavor: Flavor) {
    let mut fake = Fake::new();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let (seen_tx, seen_rx) = std::sync::mpsc::channel();
    let peer = fake.serve(move |mut p| {
        p.handshake();
        seen_tx.send(p.calls(2)).expect("signal");
        go_rx.recv_timeout(BOUND).expect("go");
    });
    let c = Caller::connect(flavor, &fake.dir());
    // `long` first, so that (blocking) the short call's thread is likely to
    // be the reader and must hand the role on when it gives up.
    let long = c.spawn("long", CallOptions::default());
    let short = c.spawn("short", CallOptions::timeout(Duration::from_millis(400)));
    seen_rx.recv_timeout(BOUND).expect("calls seen");
    fake.stop();
    go_tx.send(()).expect("go");
    peer.join().expect("fake broker");
    wait_for("the client to notice", || !c.connected());
    let queued = c.spawn("queued", CallOptions::timeout(Duration::from_millis(200)));
    for h in [short, queued] {
        let (r, took) = join_call(h);
        assert!(matches!(r, Err(Error::Timeout { .. })), "{r:?}");
        assert!(took < Duration::from_millis(1500), "{took:?}");
    }
    assert!(!long.is_finished(), "a call without a deadline waits");
    fake.start();
    let peer = fake.serve(move |mut p| {
        p.handshake();
        let calls = p.calls(1);
        assert!(calls.contains_key("long"), "{calls:?}");
        echo_all(&mut p, &calls);
        p.expect_eof();
    });
    let (r, _) = join_call(long);
    assert_eq!(r.expect("answered after the reconnect"), "long");
    drop(c);
    peer.join().expect("fake broker");
}

#[test]
fn async_deadline_passes_while_disconnected() {
    deadline_passes_while_disconnected(Flavor::Async);
}

#[test]
fn blocking_deadline_passes_while_disconnected() {
    deadline_passes_while_disconnected(Flavor::Blocking);
}

/// The connection is lost while the client is idle: the next call goes to
/// the new connection (for the blocking client even a `no_retry` one: it
/// was never sent on the old one).
fn idle_loss_then_call(flavor: Flavor) {
    let fake = Fake::new();
    let peer = fake.serve(|mut p| {
        p.handshake();
    });
    let c = Caller::connect(flavor, &fake.dir());
    peer.join().expect("fake broker");
    let peer = fake.serve(move |mut p| {
        p.handshake();
        let calls = p.calls(1);
        echo_all(&mut p, &calls);
        p.expect_eof();
    });
    // The blocking client learns of the loss from its write (EPIPE, nothing
    // sent), so even a no_retry call is safe to send again. The async
    // client may hand the frame to its writer task before its reader has
    // seen the end of stream; a no_retry call would then correctly fail
    // with Disconnected, so this checks the default (retrying) call there.
    let opts = match flavor {
        Flavor::Blocking => CallOptions::timeout(BOUND).no_retry(),
        Flavor::Async => CallOptions::timeout(BOUND),
    };
    let r = c.call("n", opts);
    assert_eq!(r.expect("sent on the new connection"), "n");
    drop(c);
    peer.join().expect("fake broker");
}

#[test]
fn async_idle_loss_then_call() {
    idle_loss_then_call(Flavor::Async);
}

#[test]
fn blocking_idle_loss_then_call() {
    idle_loss_then_call(Flavor::Blocking);
}

#[test]
fn backoff_doubles_caps_and_jitters() {
    use crate::common::{Backoff, Retry};
    let b = Backoff::default();
    assert_eq!(b.min, Duration::from_millis(10));
    assert_eq!(b.max, Duration::from_secs(1));
    let bases: Vec<_> = (0..10).map(|n| b.base(n).as_millis()).collect();
    assert_eq!(bases, [10, 20, 40, 80, 160, 320, 640, 1000, 1000, 1000]);
    assert_eq!(b.base(u32::MAX), Duration::from_secs(1));
    let mut seen = std::collections::HashSet::new();
    for n in 0..200 {
        let base = b.base(n % 12);
        let d = b.delay(n % 12);
        assert!(d >= base.mul_f64(0.75) && d <= base.mul_f64(1.25), "{d:?}");
        seen.insert(d);
    }
    assert!(seen.len() > 20, "jitter varies the delays");
    let mut r = Retry::default();
    r.next_delay(&b);
    r.next_delay(&b);
    assert_eq!(r.attempt, 2);
    r.connection_ended(&b, Duration::from_millis(10));
    assert_eq!(r.attempt, 2, "a short-lived connection does not reset");
    r.connection_ended(&b, Duration::from_secs(1));
    assert_eq!(r.attempt, 0);
    let odd = Backoff::new(Duration::ZERO, Duration::ZERO);
    assert_eq!(
        (odd.min, odd.max),
        (Duration::from_millis(1), Duration::from_millis(1))
    );
}

#[test]
fn clients_are_send_sync_clone() {
    fn check<T: Send + Sync + Clone + 'static>() {}
    check::<Client>();
    check::<BlockingClient>();
    fn send_future<F: std::future::Future + Send>(_: &F) {}
    let rt = rt_current();
    let fake = Fake::new();
    let peer = fake.serve(|mut p| {
        p.handshake();
        p.expect_eof();
    });
    rt.block_on(async {
        let c = bounded(Client::connect_to(fake.dir()))
            .await
            .expect("connect");
        let fut = c.call::<_, Value>("svc", "x", &1u8, None);
        send_future(&fut);
    });
    finish(&rt, peer);
}

/// Rough speed check against an echoing fake broker (no real broker in
/// between): `cargo test -p zrpc-client --release -- --ignored --nocapture`.
#[test]
#[ignore]
fn speed_against_fake_echo() {
    fn echo_forever(mut p: Peer) {
        p.handshake();
        let mut out = BytesMut::new();
        loop {
            // Answer everything that is complete, in one write.
            let Some(f) = p.try_frame() else { return };
            let mut frames = vec![f];
            while let Ok(Some(f)) = p.dec.decode(&mut p.buf) {
                frames.push(f);
            }
            for f in frames {
                if let Ok(Envelope::Call { id, .. }) = f.decode() {
                    encode_frame(
                        &mut out,
                        &Envelope::Result {
                            id,
                            code: None,
                            message: "",
                        },
                        &f.payload,
                    );
                }
            }
            if p.s.write_all(&out).is_err() {
                return;
            }
            out.clear();
        }
    }
    const N: u32 = 20_000;
    let payload = serde_bytes::ByteBuf::from(vec![7u8; 64]);

    let fake = Fake::new();
    // Baseline: the same exchange by hand on a raw socket.
    let peer = fake.serve(echo_forever);
    let mut raw =
        Peer::new(UnixStream::connect(zrpc_proto::socket_path(&fake.dir())).expect("raw"));
    raw.send(
        &Envelope::Hello {
            version: 1,
            instance: 1,
            agent: "zrpc-client/raw",
            caps: 0,
        },
        &[],
    );
    raw.frame();
    let t = Instant::now();
    for id in 0..N as u64 {
        let mut out = BytesMut::new();
        encode_frame(
            &mut out,
            &Envelope::Call {
                id,
                service: "svc",
                method: "echo",
                timeout_ms: None,
                flags: 0,
            },
            &rmp_serde::to_vec(&payload).expect("enc"),
        );
        raw.s.write_all(&out).expect("write");
        let f = raw.frame();
        let _: serde_bytes::ByteBuf = rmp_serde::from_slice(&f.payload).expect("dec");
    }
    println!("raw socket sequential: {:?}/call", t.elapsed() / N);
    drop(raw);
    peer.join().expect("peer");

    let peer = fake.serve(echo_forever);
    let c = BlockingClient::connect_to(fake.dir()).expect("connect");
    let t = Instant::now();
    for _ in 0..N {
        let _: serde_bytes::ByteBuf = c.call("svc", "echo", &payload, Some(BOUND)).expect("call");
    }
    println!("blocking sequential: {:?}/call", t.elapsed() / N);
    drop(c);
    peer.join().expect("peer");

    for (name, rt) in [
        ("current-thread", rt_current()),
        ("multi-thread", rt_multi()),
    ] {
        let peer = fake.serve(echo_forever);
        let dir = fake.dir();
        let payload = payload.clone();
        rt.block_on(async move {
            let c = Client::connect_to(&dir).await.expect("connect");
            let t = Instant::now();
            for _ in 0..N {
                let _: serde_bytes::ByteBuf = c
                    .call("svc", "echo", &payload, Some(BOUND))
                    .await
                    .expect("call");
            }
            println!("async {name} sequential: {:?}/call", t.elapsed() / N);
            let t = Instant::now();
            let mut set = tokio::task::JoinSet::new();
            for _ in 0..64 {
                let c = c.clone();
                let payload = payload.clone();
                set.spawn(async move {
                    for _ in 0..N / 64 {
                        let _: serde_bytes::ByteBuf =
                            c.call("svc", "echo", &payload, None).await.expect("call");
                    }
                });
            }
            while set.join_next().await.is_some() {}
            println!(
                "async {name} 64 in flight: {:.0} calls/s",
                (N / 64 * 64) as f64 / t.elapsed().as_secs_f64()
            );
        });
        finish(&rt, peer);
    }
}

/// A monitor gets the events that came in before the `Fatal` that ended its
/// connection, then the end with the broker's code (a slow monitor's
/// `LimitExceeded`, which `zrpc monitor` does not retry); `resubscribe`
/// returns a refusal that reconnecting cannot fix instead of retrying it.
#[test]
fn a_monitor_gets_the_events_before_the_fatal_then_its_code() {
    let fake = Fake::new();
    let t = fake.serve(|mut p| {
        p.handshake();
        let f = p.frame();
        let id = match f.decode().expect("envelope") {
            Envelope::Call {
                id,
                service,
                method,
                ..
            } => {
                assert_eq!((service, method), ("zrpcd", "monitor"));
                id
            }
            other => panic!("expected the subscription, got {other:?}"),
        };
        p.send(
            &Envelope::Result {
                id,
                code: None,
                message: "",
            },
            &[0xc3],
        );
        // Two events and the end, in one write.
        let mut out = BytesMut::new();
        encode_frame(&mut out, &Envelope::Event { seq: 1 }, &[0x01]);
        encode_frame(&mut out, &Envelope::Event { seq: 2 }, &[0x02]);
        encode_frame(
            &mut out,
            &Envelope::Fatal {
                code: ErrorCode::LimitExceeded,
                message: "the monitor reads too slowly",
            },
            &[],
        );
        p.s.write_all(&out).expect("write");
    });
    let mut m = ClientBuilder::default()
        .socket_dir(fake.dir())
        .reconnect_backoff(Duration::from_millis(1), Duration::from_millis(5))
        .monitor(&[])
        .expect("subscribed");
    assert_eq!(&m.next_event().expect("first event")[..], &[0x01]);
    assert_eq!(&m.next_event().expect("second event")[..], &[0x02]);
    match m.next_event() {
        Err(Error::LimitExceeded(msg)) => assert!(msg.contains("too slowly"), "{msg}"),
        other => panic!("expected LimitExceeded, got {other:?}"),
    }
    t.join().expect("fake broker");
    // The next broker refuses the connection: returned, not retried.
    let t = fake.serve(|mut p| {
        let _hello = p.frame();
        p.send(
            &Envelope::Fatal {
                code: ErrorCode::AccessDenied,
                message: "not for you",
            },
            &[],
        );
    });
    match m.resubscribe() {
        Err(e) => assert_eq!(e.code(), Some(ErrorCode::AccessDenied), "{e}"),
        Ok(()) => panic!("resubscribed to a broker that refused"),
    }
    t.join().expect("fake broker");
}

/// A plain client ignores `Event` frames (it keeps nothing of them).
#[test]
fn a_plain_client_keeps_no_events() {
    let fake = Fake::new();
    let t = fake.serve(|mut p| {
        p.handshake();
        let f = p.frame();
        let Envelope::Call { id, .. } = f.decode().expect("envelope") else {
            panic!("expected a call");
        };
        for seq in 0..10 {
            p.send(&Envelope::Event { seq }, &[0x01]);
        }
        p.send(
            &Envelope::Result {
                id,
                code: None,
                message: "",
            },
            &[0x2a],
        );
    });
    let c = BlockingClient::connect_to(fake.dir()).expect("connect");
    let v: u8 = c
        .call("zrpcd", "monitor", &(), Some(BOUND))
        .expect("result");
    assert_eq!(v, 42);
    assert_eq!(c.inner.pop_event(), None);
    t.join().expect("fake broker");
}

/// On a connection that passes descriptors, a serde payload reaching
/// `FD_PAYLOAD_MIN` is encoded straight into a sealed memfd (the frame's
/// tail is its mapping), which is the descriptor sent, and sent again on a
/// resubmission, not a copy; the frame's bytes are those of the inline
/// encoding. Below the threshold, or without descriptors, it stays inline.
#[test]
fn large_serde_payloads_are_encoded_into_the_memfd_that_is_sent() {
    let min = zrpc_io::fdpass::FD_PAYLOAD_MIN;
    let blob = zrpc_proto::Blob::from(vec![0xa5u8; min]);
    let frame = |v: &zrpc_proto::Blob, fds: bool| {
        let opts = CallOptions::default();
        call_frame(7, "svc", "m", &opts, Payload::Serde(v), u32::MAX, fds).expect("frame")
    };
    let inline = frame(&blob, false);
    assert!(inline.tail.is_empty() || zrpc_io::mapped::sealed_whole(&inline.tail).is_none());
    let spilled = frame(&blob, true);
    let fd = zrpc_io::mapped::sealed_whole(&spilled.tail).expect("the tail is a sealed memfd");
    assert_eq!(fd.len(), min + 5, "bin32 header and the bytes");
    assert_eq!(spilled.to_vec(), inline.to_vec(), "the same frame");
    let (_, sent) = spilled.to_fd_form().expect("fd form");
    assert!(std::sync::Arc::ptr_eq(&sent, &fd), "that memfd is sent");
    let again = resubmit_parts(&spilled, None, u32::MAX).expect("resubmit");
    let (_, resent) = again.to_fd_form().expect("fd form");
    assert!(std::sync::Arc::ptr_eq(&resent, &fd), "and sent again");
    let small = zrpc_proto::Blob::from(vec![1u8; min / 2]);
    let f = frame(&small, true);
    assert!(f.tail.is_empty(), "below the threshold: inline");
}

/// A fake broker that completes the handshake and then reads nothing more
/// (stopped, or wedged) until `stop` says so.
fn stopped_broker(fake: &Fake) -> (std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>) {
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let peer = fake.serve(move |mut p| {
        p.handshake();
        let _ = stop_rx.recv_timeout(Duration::from_secs(30));
        drop(p);
    });
    (stop_tx, peer)
}

/// A MessagePack bin of `n` zero bytes, encoded.
fn encoded_bin(n: u32) -> Bytes {
    let mut v = vec![0xc6u8];
    v.extend_from_slice(&n.to_be_bytes());
    v.resize(5 + n as usize, 0);
    Bytes::from(v)
}

/// A blocking call whose frame does not fit in the socket buffer of a
/// broker that stopped reading still ends by its timeout + 2 s (the
/// client's safety deadline covers a broker "gone or stopped"): its write
/// gives up after `SAFETY_MARGIN` without progress. It used to block in
/// the write for ever.
#[test]
fn blocking_call_to_a_stopped_broker_ends_by_its_safety_deadline() {
    let fake = Fake::new();
    let (stop, peer) = stopped_broker(&fake);
    let client = BlockingClient::connect_to(fake.dir()).expect("connect");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let started = Instant::now();
        // 600 KiB inline: more than the socket buffer.
        let opts = CallOptions::timeout(Duration::from_millis(500));
        let r = client.call_raw("svc", "x", encoded_bin(600 * 1024), opts);
        let _ = tx.send((r.map(|_| ()), started.elapsed()));
    });
    let got = rx.recv_timeout(Duration::from_secs(10));
    let _ = stop.send(());
    let (r, took) = got.expect("the call did not end within 10 s");
    assert!(matches!(r, Err(Error::Timeout { .. })), "{r:?}");
    assert!(took < Duration::from_secs(4), "{took:?}");
    let _ = peer.join();
}

/// The same with many small calls from many threads, which fill the
/// socket buffer together: every call ends by its safety deadline (a
/// thread past it does not wait behind another's write to send `Cancel`).
#[test]
fn blocking_small_calls_to_a_stopped_broker_end_by_their_safety_deadline() {
    const THREADS: usize = 64;
    let fake = Fake::new();
    let (stop, peer) = stopped_broker(&fake);
    let client = BlockingClient::connect_to(fake.dir()).expect("connect");
    let (tx, rx) = std::sync::mpsc::channel();
    for _ in 0..THREADS {
        let (c, tx) = (client.clone(), tx.clone());
        std::thread::spawn(move || {
            let started = Instant::now();
            // 64 x 8 KiB: more than the socket buffer.
            let opts = CallOptions::timeout(Duration::from_millis(200));
            let _ = c.call_raw("svc", "x", encoded_bin(8192), opts);
            let _ = tx.send(started.elapsed());
        });
    }
    drop(tx);
    let until = Instant::now() + Duration::from_secs(10);
    let mut done = 0;
    while let Ok(took) = rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
        assert!(took < Duration::from_secs(5), "a call took {took:?}");
        done += 1;
    }
    let _ = stop.send(());
    assert_eq!(
        done,
        THREADS,
        "{} of {THREADS} calls never ended",
        THREADS - done
    );
    let _ = peer.join();
}
