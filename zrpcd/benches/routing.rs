//! Micro-benchmark of the broker's routing step, without sockets: a client
//! peer's `Call` (64-byte payload) goes through `Broker::on_frame` to the
//! service peer's queue, the service's `Reply` back through `on_frame` to
//! the client's queue; both queues are drained as the writers would. Also
//! with 10,000 other names registered (routing must not depend on it).
//! Run with `cargo bench -p zrpcd`.
//!
//! With `ZRPCD_ROUTING_COUNT=N` in the environment it skips criterion and
//! runs N round trips of each case once (for instruction counts, e.g.
//! `valgrind --tool=callgrind`: the difference between two values of N
//! divided by their difference is the cost of one call+reply).

use std::hint::black_box;
use std::rc::Rc;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, Criterion, Throughput};
use zrpc_io::reactor;
use zrpc_proto::{encode_frame, Envelope, Frame, FrameDecoder, PROTOCOL_VERSION};
use zrpcd::broker::Broker;
use zrpcd::peers::{Creds, PeerId};
use zrpcd::queue::PeerIo;

fn frame(env: &Envelope<'_>, payload: &[u8]) -> Frame {
    let mut buf = BytesMut::new();
    encode_frame(&mut buf, env, payload);
    FrameDecoder::new(u32::MAX)
        .decode(&mut buf)
        .expect("valid frame")
        .expect("complete frame")
}

/// Everything queued for a peer, concatenated (what its writer would send).
fn drain(io: &PeerIo, scratch: &mut Vec<Bytes>) -> BytesMut {
    io.queue.borrow_mut().take_into(scratch);
    let mut out = BytesMut::new();
    for b in scratch.drain(..) {
        out.extend_from_slice(&b);
    }
    out
}

struct Setup {
    broker: Broker,
    client: PeerId,
    client_io: Rc<PeerIo>,
    service: PeerId,
    service_io: Rc<PeerIo>,
    _names: Option<(PeerId, Rc<PeerIo>)>,
}

/// A `PeerIo` over one end of a socket pair (the other end is dropped: the
/// benchmark drains the queue itself and never writes). Needs a runtime.
fn peer_io() -> PeerIo {
    let (a, _b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    a.set_nonblocking(true).expect("nonblocking");
    let fd = reactor::register(a, tokio::io::Interest::READABLE).expect("register");
    PeerIo::new(Rc::new(fd))
}

fn connect(broker: &mut Broker, instance: u64) -> (PeerId, Rc<PeerIo>) {
    let io = Rc::new(peer_io());
    let id = broker.add_peer(io.clone(), Creds::default());
    let hello = Envelope::Hello {
        version: PROTOCOL_VERSION,
        instance,
        agent: "routing-bench",
        caps: 0,
    };
    broker.on_frame(id, frame(&hello, &[])).expect("hello");
    (id, io)
}

fn register(broker: &mut Broker, peer: PeerId, names: impl Iterator<Item = String>) {
    for (i, name) in names.enumerate() {
        let reg = Envelope::Register {
            req: i as u64 + 1,
            name: &name,
            shared: false,
        };
        broker.on_frame(peer, frame(&reg, &[])).expect("register");
    }
}

fn setup(dir: &std::path::Path, other_names: usize) -> Setup {
    let mut config = zrpcd::Config::new(Some(dir.to_path_buf()));
    config.max_names_per_conn = other_names.max(256);
    let mut broker = Broker::new(config);
    let (client, client_io) = connect(&mut broker, 1);
    let (service, service_io) = connect(&mut broker, 2);
    register(
        &mut broker,
        service,
        std::iter::once("bench_echo".to_string()),
    );
    let names = (other_names > 0).then(|| {
        let (p, io) = connect(&mut broker, 3);
        register(
            &mut broker,
            p,
            (0..other_names).map(|i| format!("other_{i:06}")),
        );
        (p, io)
    });
    broker.flush();
    let mut scratch = Vec::new();
    drain(&client_io, &mut scratch);
    drain(&service_io, &mut scratch);
    if let Some((_, io)) = &names {
        drain(io, &mut scratch);
    }
    Setup {
        broker,
        client,
        client_io,
        service,
        service_io,
        _names: names,
    }
}

/// One call and its reply through the broker; returns the result bytes.
fn round_trip(s: &mut Setup, call: &Frame, payload: &[u8], scratch: &mut Vec<Bytes>) -> usize {
    // No `flush`: that would write to the socket; the queues are drained
    // here instead, so only the routing step is measured.
    s.broker.on_frame(s.client, call.clone()).expect("call");
    let mut req = drain(&s.service_io, scratch);
    let f = FrameDecoder::new(u32::MAX)
        .decode(&mut req)
        .expect("frame")
        .expect("request");
    let id = match f.decode().expect("envelope") {
        Envelope::Request { id, .. } => id,
        other => panic!("expected a Request, got {other:?}"),
    };
    let reply = Envelope::Reply {
        id,
        code: None,
        message: "",
    };
    s.broker
        .on_frame(s.service, frame(&reply, payload))
        .expect("reply");
    drain(&s.client_io, scratch).len()
}

const CASES: [(&str, usize, Option<u64>); 3] = [
    ("call+reply/64B/no_deadline", 0, None),
    ("call+reply/64B/deadline", 0, Some(5_000)),
    ("call+reply/64B/10k_names", 10_000, Some(5_000)),
];

fn call_frame(timeout_ms: Option<u64>, payload: &[u8]) -> Frame {
    frame(
        &Envelope::Call {
            id: 1,
            service: "bench_echo",
            method: "echo",
            timeout_ms,
            flags: 0,
        },
        payload,
    )
}

fn bench_payload() -> Vec<u8> {
    let mut payload = vec![0xc4, 62];
    payload.extend_from_slice(&[0x5a; 62]);
    payload
}

/// `ZRPCD_ROUTING_COUNT=N`: N round trips per case, no criterion. The case
/// can be narrowed with `ZRPCD_ROUTING_CASE=<substring of its label>`.
fn count_mode(n: usize) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _enter = rt.enter();
    let dir = std::env::temp_dir().join(format!("zrpcd-routing-bench-{}", std::process::id()));
    let only = std::env::var("ZRPCD_ROUTING_CASE").unwrap_or_default();
    let payload = bench_payload();
    for (label, names, timeout_ms) in CASES {
        if !label.contains(&only) {
            continue;
        }
        let mut s = setup(&dir, names);
        let call = call_frame(timeout_ms, &payload);
        let mut scratch = Vec::new();
        let mut total = 0;
        for _ in 0..n {
            total += round_trip(&mut s, &call, &payload, &mut scratch);
        }
        println!("{label}: {n} round trips, {total} result bytes");
    }
}

fn main() {
    if let Some(n) = std::env::var("ZRPCD_ROUTING_COUNT")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return count_mode(n);
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}

fn routing(c: &mut Criterion) {
    // DelayQueue (deadlines) needs a tokio time driver in context.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _enter = rt.enter();
    let dir = std::env::temp_dir().join(format!("zrpcd-routing-bench-{}", std::process::id()));
    let payload = bench_payload();

    let mut g = c.benchmark_group("routing");
    g.throughput(Throughput::Elements(1));
    for (label, names, timeout_ms) in CASES {
        let mut s = setup(&dir, names);
        let call = call_frame(timeout_ms, &payload);
        let mut scratch = Vec::new();
        g.bench_function(label, |b| {
            b.iter(|| black_box(round_trip(&mut s, &call, &payload, &mut scratch)))
        });
    }
    g.finish();
}

criterion_group!(benches, routing);
