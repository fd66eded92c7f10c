//! Micro-benchmarks of the frame codec: encoding a `Call` frame with a
//! 64-byte payload, splitting frames off a read buffer, and decoding
//! envelopes. Run with `cargo bench -p zrpc-proto`.

use std::hint::black_box;

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use zrpc_proto::{encode_frame, Envelope, FrameDecoder};

/// A 64-byte MessagePack `bin` payload (`c4 3e` + 62 bytes), as
/// `serde_bytes` encodes it.
fn payload() -> Vec<u8> {
    let mut p = vec![0xc4, 62];
    p.extend_from_slice(&[0x5a; 62]);
    p
}

fn call() -> Envelope<'static> {
    Envelope::Call {
        id: 123_456,
        service: "bench_echo",
        method: "echo",
        timeout_ms: Some(5_000),
        flags: 0,
    }
}

fn codec(c: &mut Criterion) {
    let payload = payload();
    let env = call();

    let mut g = c.benchmark_group("codec");
    g.throughput(Throughput::Elements(1));
    g.bench_function("encode_frame/call_64B", |b| {
        let mut out = BytesMut::with_capacity(64 * 1024);
        b.iter(|| {
            if out.len() > 60 * 1024 {
                out.clear();
            }
            encode_frame(&mut out, black_box(&env), black_box(&payload));
        })
    });

    let mut one = BytesMut::new();
    encode_frame(&mut one, &env, &payload);
    let dec = FrameDecoder::new(zrpc_proto::DEFAULT_MAX_MESSAGE_SIZE);
    g.bench_function("encode+decode/call_64B", |b| {
        let mut buf = BytesMut::with_capacity(64 * 1024);
        b.iter(|| {
            encode_frame(&mut buf, black_box(&env), black_box(&payload));
            let f = dec.decode(&mut buf).unwrap().unwrap();
            black_box(f.decode().unwrap());
            if buf.capacity() < 1024 {
                buf.reserve(64 * 1024);
            }
        })
    });

    // What a reader does after one read of 64 pipelined calls.
    const BATCH: usize = 64;
    let mut many = BytesMut::new();
    for _ in 0..BATCH {
        encode_frame(&mut many, &env, &payload);
    }
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("FrameDecoder::decode/64_calls_64B", |b| {
        b.iter_batched_ref(
            || many.clone(),
            |buf| {
                let mut n = 0;
                while let Some(f) = dec.decode(buf).unwrap() {
                    black_box(&f);
                    n += 1;
                }
                assert_eq!(n, BATCH);
            },
            BatchSize::SmallInput,
        )
    });
    g.throughput(Throughput::Elements(1));

    let frame = dec.decode(&mut one.clone()).unwrap().unwrap();
    g.bench_function("Envelope::decode/call", |b| {
        b.iter(|| black_box(Envelope::decode(black_box(&frame.envelope)).unwrap()))
    });
    let mut reply = BytesMut::new();
    encode_frame(
        &mut reply,
        &Envelope::Reply {
            id: 987_654,
            code: None,
            message: "",
        },
        &payload,
    );
    let reply = dec.decode(&mut reply).unwrap().unwrap();
    g.bench_function("Envelope::decode/reply", |b| {
        b.iter(|| black_box(Envelope::decode(black_box(&reply.envelope)).unwrap()))
    });
    g.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
