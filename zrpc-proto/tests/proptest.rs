//! Property tests for the wire format: round trips of every envelope kind
//! through frames split at arbitrary points, and robustness of the frame
//! decoder and the envelope parser against random and mutated input (no
//! panic, no endless loop, only `Ok` or `Err`).
//!
//! The default case count is kept small so the file runs in a few seconds in
//! a debug build; raise it with `PROPTEST_CASES=10000` for a longer run. The
//! coverage-guided fuzzers for the same code live in `fuzz/`
//! (`bash scripts/fuzz.sh`).

use bytes::BytesMut;
use proptest::prelude::*;
use proptest::sample::Index;
use zrpc_proto::{encode_frame, mp, Envelope, ErrorCode, FrameDecoder, ProtoError, HEADER_LEN};

/// Cases per property unless `PROPTEST_CASES` says otherwise.
const DEFAULT_CASES: u32 = 96;

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_CASES);
    ProptestConfig {
        cases,
        // Failures are reported with their minimal input in the test output;
        // no persistence file is written into the source tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------
// Generators
// ---------------------------------------------------------------------------

/// An owned envelope: `Envelope` borrows its strings, so the strategies
/// generate this and borrow an `Envelope` from it.
#[derive(Debug, Clone)]
enum Owned {
    Hello(u32, u64, String),
    Welcome(u32, u64, u32),
    Register(u64, String, bool),
    Unregister(u64, String),
    Ack(u64, Option<ErrorCode>, String),
    Call(u64, String, String, Option<u64>, u32),
    Request(
        u64,
        String,
        String,
        Option<u64>,
        u64,
        u64,
        Option<(u32, u32, u32)>,
    ),
    Reply(u64, Option<ErrorCode>, String),
    Result(u64, Option<ErrorCode>, String),
    Cancel(u64),
    Ping(u64),
    Pong(u64),
    Event(u64),
    Fatal(ErrorCode, String),
}

impl Owned {
    fn env(&self) -> Envelope<'_> {
        match self {
            Owned::Hello(version, instance, agent) => Envelope::Hello {
                version: *version,
                instance: *instance,
                agent,
                caps: 0,
            },
            Owned::Welcome(version, conn_id, max) => Envelope::Welcome {
                version: *version,
                conn_id: *conn_id,
                max_message_size: *max,
                caps: 0,
            },
            Owned::Register(req, name, shared) => Envelope::Register {
                req: *req,
                name,
                shared: *shared,
            },
            Owned::Unregister(req, name) => Envelope::Unregister { req: *req, name },
            Owned::Ack(req, code, message) => Envelope::Ack {
                req: *req,
                code: *code,
                message,
            },
            Owned::Call(id, service, method, timeout_ms, flags) => Envelope::Call {
                id: *id,
                service,
                method,
                timeout_ms: *timeout_ms,
                flags: *flags,
            },
            Owned::Request(id, service, method, timeout_ms, ci, cc, who) => Envelope::Request {
                id: *id,
                service,
                method,
                timeout_ms: *timeout_ms,
                caller_instance: *ci,
                caller_call: *cc,
                caller: who.map(|(uid, gid, pid)| zrpc_proto::Caller { uid, gid, pid }),
            },
            Owned::Reply(id, code, message) => Envelope::Reply {
                id: *id,
                code: *code,
                message,
            },
            Owned::Result(id, code, message) => Envelope::Result {
                id: *id,
                code: *code,
                message,
            },
            Owned::Cancel(id) => Envelope::Cancel { id: *id },
            Owned::Ping(nonce) => Envelope::Ping { nonce: *nonce },
            Owned::Pong(nonce) => Envelope::Pong { nonce: *nonce },
            Owned::Event(seq) => Envelope::Event { seq: *seq },
            Owned::Fatal(code, message) => Envelope::Fatal {
                code: *code,
                message,
            },
        }
    }

    /// The same envelope built with rmpv, the reference MessagePack library.
    fn rmpv_value(&self) -> rmpv::Value {
        use rmpv::Value;
        let u = |v: u64| Value::from(v);
        let s = |v: &str| Value::from(v);
        let opt = |v: Option<u64>| v.map_or(Value::Nil, Value::from);
        let code = |c: Option<ErrorCode>| Value::from(c.map_or(0, |c| c.to_u16()));
        let e = self.env();
        let mut fields = vec![u(e.kind() as u64)];
        fields.extend(match self {
            Owned::Hello(v, i, a) => vec![u(*v as u64), u(*i), s(a)],
            Owned::Welcome(v, c, m) => vec![u(*v as u64), u(*c), u(*m as u64)],
            Owned::Register(r, n, sh) => vec![u(*r), s(n), Value::from(*sh)],
            Owned::Unregister(r, n) => vec![u(*r), s(n)],
            Owned::Ack(r, c, m) | Owned::Reply(r, c, m) | Owned::Result(r, c, m) => {
                vec![u(*r), code(*c), s(m)]
            }
            Owned::Call(i, sv, m, t, f) => vec![u(*i), s(sv), s(m), opt(*t), u(*f as u64)],
            Owned::Request(i, sv, m, t, ci, cc, who) => {
                let mut v = vec![u(*i), s(sv), s(m), opt(*t), u(*ci), u(*cc)];
                if let Some((uid, gid, pid)) = who {
                    v.extend([u(*uid as u64), u(*gid as u64), u(*pid as u64)]);
                }
                v
            }
            Owned::Cancel(n) | Owned::Ping(n) | Owned::Pong(n) | Owned::Event(n) => vec![u(*n)],
            Owned::Fatal(c, m) => vec![code(Some(*c)), s(m)],
        });
        Value::Array(fields)
    }
}

/// Integers spread over every MessagePack encoding width, with the
/// boundaries between widths over-represented.
fn int() -> impl Strategy<Value = u64> {
    prop_oneof![
        0..128u64,
        128..=255u64,
        256..=65_535u64,
        65_536..=u32::MAX as u64,
        any::<u64>(),
        prop::sample::select(vec![
            0,
            127,
            128,
            255,
            256,
            65_535,
            65_536,
            u32::MAX as u64,
            u32::MAX as u64 + 1,
            u64::MAX,
        ]),
    ]
}

fn int32() -> impl Strategy<Value = u32> {
    int().prop_map(|v| v as u32)
}

/// Strings of up to a few hundred bytes, crossing the fixstr/str8/str16
/// boundaries (31/32 and 255/256 bytes), ASCII and arbitrary Unicode.
fn string() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z0-9_.-]{0,40}",
        prop::collection::vec(0x20u8..0x7f, 25..300)
            .prop_map(|b| String::from_utf8(b).expect("ascii")),
        prop::collection::vec(any::<char>(), 0..120).prop_map(String::from_iter),
    ]
}

/// Error codes as they come off the wire: `from_u16` of any value, so known
/// codes are never represented as `Unknown(known)`.
fn code() -> impl Strategy<Value = Option<ErrorCode>> {
    prop_oneof![Just(0u16), 1..20u16, any::<u16>()].prop_map(ErrorCode::from_u16)
}

fn opt_int() -> impl Strategy<Value = Option<u64>> {
    prop::option::of(int())
}

fn owned() -> impl Strategy<Value = Owned> {
    prop_oneof![
        (int32(), int(), string()).prop_map(|(a, b, c)| Owned::Hello(a, b, c)),
        (int32(), int(), int32()).prop_map(|(a, b, c)| Owned::Welcome(a, b, c)),
        (int(), string(), any::<bool>()).prop_map(|(a, b, c)| Owned::Register(a, b, c)),
        (int(), string()).prop_map(|(a, b)| Owned::Unregister(a, b)),
        (int(), code(), string()).prop_map(|(a, b, c)| Owned::Ack(a, b, c)),
        (int(), string(), string(), opt_int(), int32())
            .prop_map(|(a, b, c, d, e)| Owned::Call(a, b, c, d, e)),
        (
            (int(), string(), string(), opt_int(), int(), int()),
            proptest::option::of((int32(), int32(), int32()))
        )
            .prop_map(|((a, b, c, d, e, f), g)| Owned::Request(a, b, c, d, e, f, g)),
        (int(), code(), string()).prop_map(|(a, b, c)| Owned::Reply(a, b, c)),
        (int(), code(), string()).prop_map(|(a, b, c)| Owned::Result(a, b, c)),
        int().prop_map(Owned::Cancel),
        int().prop_map(Owned::Ping),
        int().prop_map(Owned::Pong),
        int().prop_map(Owned::Event),
        (code(), string()).prop_map(|(c, m)| Owned::Fatal(c.unwrap_or(ErrorCode::Unknown(0)), m)),
    ]
}

fn payload() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..200)
}

/// Chunk sizes used to split a byte stream, from single bytes to larger
/// reads.
fn chunks() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(prop_oneof![1..4usize, 1..64usize, 1..2048usize], 1..64)
}

fn stream(frames: &[(Owned, Vec<u8>)]) -> Vec<u8> {
    let mut buf = BytesMut::new();
    for (e, p) in frames {
        encode_frame(&mut buf, &e.env(), p);
    }
    buf.to_vec()
}

// ---------------------------------------------------------------------------
// A decoding driver that checks the decoder's contract at every step
// ---------------------------------------------------------------------------

/// What came out of feeding a stream into a `FrameDecoder`.
#[derive(Debug, Default)]
struct Outcome {
    /// `(envelope bytes, payload bytes)` of every frame, in order.
    frames: Vec<(Vec<u8>, Vec<u8>)>,
    /// The decoder's error, which ends the stream (the connection closes).
    error: Option<ProtoError>,
}

/// Feeds `data` into a `BytesMut` in chunks of the given sizes (cycled),
/// decoding every complete frame as soon as it is available, and decoding
/// every frame's envelope. Asserts the decoder's contract:
/// - `Ok(None)` leaves the buffer untouched, and `needed` then agrees;
/// - `Ok(Some)` removes exactly `8 + body_len` bytes, splitting them into an
///   envelope of `env_len` bytes and the rest as payload;
/// - the number of frames is bounded by the input length (no endless loop).
fn feed(dec: FrameDecoder, data: &[u8], sizes: &[usize]) -> Outcome {
    let mut out = Outcome::default();
    let mut buf = BytesMut::new();
    let mut pos = 0;
    let mut i = 0;
    while pos < data.len() {
        let n = sizes[i % sizes.len()].max(1).min(data.len() - pos);
        i += 1;
        buf.extend_from_slice(&data[pos..pos + n]);
        pos += n;
        loop {
            let before = buf.clone();
            match dec.decode(&mut buf) {
                Ok(None) => {
                    assert_eq!(buf, before, "Ok(None) must not consume bytes");
                    if let Some(total) = dec.needed(&buf) {
                        assert!(total > buf.len());
                    }
                    break;
                }
                Ok(Some(frame)) => {
                    let body = u32::from_be_bytes(before[0..4].try_into().unwrap()) as usize;
                    let env = u32::from_be_bytes(before[4..8].try_into().unwrap()) as usize;
                    assert!(body <= dec.max_body() as usize);
                    assert!(env >= 1 && env <= body);
                    assert_eq!(buf.len(), before.len() - HEADER_LEN - body);
                    assert_eq!(&frame.envelope[..], &before[HEADER_LEN..HEADER_LEN + env]);
                    assert_eq!(
                        &frame.payload[..],
                        &before[HEADER_LEN + env..HEADER_LEN + body]
                    );
                    // Whatever the envelope holds, decoding it must not panic,
                    // and a decoded envelope must survive a round trip.
                    if let Ok(e) = frame.decode() {
                        check_reencode(&e);
                    }
                    out.frames
                        .push((frame.envelope.to_vec(), frame.payload.to_vec()));
                    assert!(
                        out.frames.len() * (HEADER_LEN + 1) <= data.len(),
                        "more frames than the input can hold"
                    );
                }
                Err(e) => {
                    out.error = Some(e);
                    return out;
                }
            }
        }
    }
    out
}

/// A decoded envelope re-encodes to bytes that decode to the same envelope.
fn check_reencode(e: &Envelope<'_>) {
    let mut b = BytesMut::new();
    e.encode(&mut b);
    assert_eq!(
        &Envelope::decode(&b).expect("re-encoded envelope decodes"),
        e
    );
}

// ---------------------------------------------------------------------------
// Mutations of valid streams
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Mutation {
    /// Flip one bit.
    BitFlip(Index, u8),
    /// Overwrite one byte.
    SetByte(Index, u8),
    /// Cut the stream short.
    Truncate(Index),
    /// Insert bytes at a position.
    Insert(Index, Vec<u8>),
    /// Remove up to 16 bytes at a position.
    Delete(Index, usize),
    /// Overwrite a u32 of the first frame's header (`body_len` or `env_len`)
    /// with an interesting value.
    FirstHeader(bool, u32),
    /// Overwrite the 4 bytes at a position with an interesting length.
    Length(Index, u32),
}

fn interesting_len() -> impl Strategy<Value = u32> {
    prop_oneof![
        0..300u32,
        prop::sample::select(vec![
            0,
            1,
            7,
            8,
            9,
            255,
            256,
            65_535,
            65_536,
            1 << 24,
            (1 << 24) + 1,
            i32::MAX as u32,
            u32::MAX - 8,
            u32::MAX - 1,
            u32::MAX,
        ]),
        any::<u32>(),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<Index>(), 0..8u8).prop_map(|(i, b)| Mutation::BitFlip(i, b)),
        (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::SetByte(i, b)),
        any::<Index>().prop_map(Mutation::Truncate),
        (any::<Index>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(i, b)| Mutation::Insert(i, b)),
        (any::<Index>(), 1..16usize).prop_map(|(i, n)| Mutation::Delete(i, n)),
        (any::<bool>(), interesting_len()).prop_map(|(f, v)| Mutation::FirstHeader(f, v)),
        (any::<Index>(), interesting_len()).prop_map(|(i, v)| Mutation::Length(i, v)),
    ]
}

fn mutate(data: &mut Vec<u8>, m: &Mutation) {
    if data.is_empty() {
        if let Mutation::Insert(_, b) = m {
            data.extend_from_slice(b);
        }
        return;
    }
    let len = data.len();
    match m {
        Mutation::BitFlip(i, bit) => data[i.index(len)] ^= 1 << bit,
        Mutation::SetByte(i, b) => data[i.index(len)] = *b,
        Mutation::Truncate(i) => data.truncate(i.index(len)),
        Mutation::Insert(i, b) => {
            let at = i.index(len + 1);
            data.splice(at..at, b.iter().copied());
        }
        Mutation::Delete(i, n) => {
            let at = i.index(len);
            data.drain(at..(at + n).min(len));
        }
        Mutation::FirstHeader(env, v) => {
            let at = if *env { 4 } else { 0 };
            if len >= at + 4 {
                data[at..at + 4].copy_from_slice(&v.to_be_bytes());
            }
        }
        Mutation::Length(i, v) => {
            if len >= 4 {
                let at = i.index(len - 3);
                data[at..at + 4].copy_from_slice(&v.to_be_bytes());
            }
        }
    }
}

/// Envelope-shaped bytes: an array header, a plausible kind, then random
/// bytes, so the parser gets past its first checks more often than with
/// uniformly random bytes.
fn envelope_like() -> impl Strategy<Value = Vec<u8>> {
    (
        prop_oneof![0x90..=0x9fu8, Just(0xdc), Just(0xdd)],
        0..16u8,
        prop::collection::vec(
            prop_oneof![
                any::<u8>(),
                // Type bytes whose lengths or counts come next.
                prop::sample::select(vec![
                    0xc0u8, 0xc1, 0xc2, 0xc3, 0xc4, 0xc5, 0xc6, 0xc7, 0xc8, 0xc9, 0xcc, 0xcd, 0xce,
                    0xcf, 0xd0, 0xd3, 0xd9, 0xda, 0xdb, 0xdc, 0xdd, 0xde, 0xdf, 0xff,
                ]),
            ],
            0..64,
        ),
    )
        .prop_map(|(hdr, kind, rest)| {
            let mut b = vec![hdr];
            match hdr {
                0xdc => b.extend_from_slice(&[0, 6]),
                0xdd => b.extend_from_slice(&[0, 0, 0, 6]),
                _ => {}
            }
            b.push(kind);
            b.extend(rest);
            b
        })
}

// ---------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------

proptest! {
    #![proptest_config(config())]

    /// (a) Every envelope survives encode/decode, alone and framed.
    #[test]
    fn envelope_round_trips(o in owned(), p in payload()) {
        let e = o.env();
        let mut b = BytesMut::new();
        e.encode(&mut b);
        prop_assert_eq!(&Envelope::decode(&b)?, &e);
        // The writer reserves `max_encoded_len` and panics past it: the
        // bound must hold for every envelope (and stay an upper bound).
        prop_assert!(b.len() <= e.max_encoded_len());

        let mut f = BytesMut::new();
        encode_frame(&mut f, &e, &p);
        let dec = FrameDecoder::new(u32::MAX);
        let frame = dec.decode(&mut f)?.expect("complete frame");
        prop_assert!(f.is_empty());
        prop_assert_eq!(&frame.envelope[..], &b[..]);
        prop_assert_eq!(&frame.payload[..], &p[..]);
        prop_assert_eq!(&frame.decode()?, &e);
    }

    /// (a) Many frames in one stream, split at random points and fed chunk
    /// by chunk, come out whole and in order.
    #[test]
    fn split_streams_round_trip(
        frames in prop::collection::vec((owned(), payload()), 1..24),
        sizes in chunks(),
    ) {
        let data = stream(&frames);
        let out = feed(FrameDecoder::new(1 << 20), &data, &sizes);
        prop_assert_eq!(out.error, None);
        prop_assert_eq!(out.frames.len(), frames.len());
        for ((env, pay), (o, p)) in out.frames.iter().zip(&frames) {
            prop_assert_eq!(&Envelope::decode(env)?, &o.env());
            prop_assert_eq!(pay, p);
        }
    }

    /// (b) Random bytes never panic: each step decodes a frame, waits for
    /// more, or fails.
    #[test]
    fn random_bytes_never_panic(
        data in prop::collection::vec(any::<u8>(), 0..1024),
        sizes in chunks(),
        max in prop_oneof![0..64u32, 64..4096u32, Just(u32::MAX)],
    ) {
        feed(FrameDecoder::new(max), &data, &sizes);
    }

    /// (b) Random bytes behind a plausible header (small lengths, so the
    /// decoder gets to split frames) never panic.
    #[test]
    fn plausible_headers_never_panic(
        parts in prop::collection::vec(
            (0..64u32, 0..64u32, prop::collection::vec(any::<u8>(), 0..64)),
            1..16,
        ),
        sizes in chunks(),
    ) {
        let mut data = Vec::new();
        for (body, env, bytes) in &parts {
            data.extend_from_slice(&body.to_be_bytes());
            data.extend_from_slice(&env.to_be_bytes());
            data.extend_from_slice(bytes);
        }
        feed(FrameDecoder::new(48), &data, &sizes);
    }

    /// (b) Valid streams with bit flips, truncation, insertion, deletion and
    /// tampered length fields never panic. Frames that end before the first
    /// mutated byte still decode exactly as sent.
    #[test]
    fn mutated_streams_never_panic(
        frames in prop::collection::vec((owned(), payload()), 1..8),
        muts in prop::collection::vec(mutation(), 1..6),
        sizes in chunks(),
        max in prop_oneof![Just(256u32), Just(1 << 20)],
    ) {
        let original = stream(&frames);
        let mut data = original.clone();
        for m in &muts {
            mutate(&mut data, m);
        }
        let out = feed(FrameDecoder::new(max), &data, &sizes);

        // Frames entirely before the first differing byte are unaffected.
        let first_diff = original
            .iter()
            .zip(&data)
            .position(|(a, b)| a != b)
            .unwrap_or(original.len().min(data.len()));
        let mut end = 0;
        for (i, (o, p)) in frames.iter().enumerate() {
            let mut one = BytesMut::new();
            encode_frame(&mut one, &o.env(), p);
            end += one.len();
            if end > first_diff || one.len() - HEADER_LEN > max as usize {
                break;
            }
            prop_assert!(out.frames.len() > i, "intact frame {} lost", i);
            prop_assert_eq!(&Envelope::decode(&out.frames[i].0)?, &o.env());
            prop_assert_eq!(&out.frames[i].1, p);
        }
    }

    /// (c) The envelope parser never panics on arbitrary bytes, and what it
    /// accepts re-encodes to an equal envelope.
    #[test]
    fn envelope_decode_never_panics(data in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(e) = Envelope::decode(&data) {
            check_reencode(&e);
        }
    }

    /// (c) Same with envelope-shaped input, which gets deeper into the parser.
    #[test]
    fn envelope_like_never_panics(data in envelope_like()) {
        if let Ok(e) = Envelope::decode(&data) {
            check_reencode(&e);
        }
    }

    /// (c) Mutated valid envelopes never panic either.
    #[test]
    fn mutated_envelopes_never_panic(o in owned(), muts in prop::collection::vec(mutation(), 1..4)) {
        let mut b = BytesMut::new();
        o.env().encode(&mut b);
        let mut data = b.to_vec();
        for m in &muts {
            mutate(&mut data, m);
        }
        if let Ok(e) = Envelope::decode(&data) {
            check_reencode(&e);
        }
    }

    /// (c) `mp::Reader::skip` on arbitrary bytes never panics and never
    /// reads past the end.
    #[test]
    fn skip_never_panics(data in prop::collection::vec(any::<u8>(), 0..256)) {
        let mut r = mp::Reader::new(&data);
        while r.remaining() > 0 {
            let before = r.remaining();
            if r.skip().is_err() {
                break;
            }
            prop_assert!(r.remaining() < before, "skip consumed nothing");
        }
    }

    /// (d) The encoder writes standard MessagePack: rmpv reads exactly one
    /// value spanning the whole envelope, equal to the same envelope built
    /// with rmpv; and our parser reads rmpv's encoding of it.
    #[test]
    fn encoding_is_standard_msgpack(o in owned()) {
        let mut b = BytesMut::new();
        o.env().encode(&mut b);
        let mut rd = &b[..];
        let v = rmpv::decode::read_value(&mut rd).expect("rmpv reads the envelope");
        prop_assert!(rd.is_empty(), "bytes after the MessagePack value");
        let want = o.rmpv_value();
        prop_assert_eq!(&v, &want);

        let mut theirs = Vec::new();
        rmpv::encode::write_value(&mut theirs, &want).expect("rmpv encodes");
        prop_assert_eq!(&Envelope::decode(&theirs)?, &o.env());
    }

    /// (d) Integers in any MessagePack integer encoding (not only the most
    /// compact one, and signed encodings of non-negative values) decode to
    /// the same envelope; extra trailing fields of any type are skipped.
    #[test]
    fn other_encodings_are_accepted(n in int(), width in 0..8u8, extra in prop::collection::vec(any::<i64>(), 0..4)) {
        let mut b = Vec::new();
        rmp::encode::write_array_len(&mut b, 2 + extra.len() as u32).unwrap();
        rmp::encode::write_pfix(&mut b, 11).unwrap();
        let fits = |max: u64| n <= max;
        match width {
            1 if fits(u8::MAX as u64) => rmp::encode::write_u8(&mut b, n as u8).unwrap(),
            2 if fits(u16::MAX as u64) => rmp::encode::write_u16(&mut b, n as u16).unwrap(),
            3 if fits(u32::MAX as u64) => rmp::encode::write_u32(&mut b, n as u32).unwrap(),
            4 if fits(i8::MAX as u64) => rmp::encode::write_i8(&mut b, n as i8).unwrap(),
            5 if fits(i16::MAX as u64) => rmp::encode::write_i16(&mut b, n as i16).unwrap(),
            6 if fits(i32::MAX as u64) => rmp::encode::write_i32(&mut b, n as i32).unwrap(),
            7 if fits(i64::MAX as u64) => rmp::encode::write_i64(&mut b, n as i64).unwrap(),
            _ => rmp::encode::write_u64(&mut b, n).unwrap(),
        }
        for x in &extra {
            rmp::encode::write_sint(&mut b, *x).unwrap();
        }
        prop_assert_eq!(Envelope::decode(&b)?, Envelope::Ping { nonce: n });
    }
}

/// Strings longer than 65535 bytes use `str32`; they round-trip too (too big
/// to generate in every proptest case).
#[test]
fn str32_strings_round_trip() {
    let long = "x".repeat(70_000);
    let e = Envelope::Hello {
        version: 1,
        instance: 3,
        agent: &long,
        caps: 0,
    };
    let mut b = BytesMut::new();
    e.encode(&mut b);
    assert_eq!(b[4], 0xdb);
    assert_eq!(Envelope::decode(&b), Ok(e));
    let v = rmpv::decode::read_value(&mut &b[..]).expect("standard");
    assert_eq!(v[3].as_str().map(str::len), Some(70_000));
}

/// Writes the committed seed corpus of the fuzz targets in `fuzz/corpus/`:
/// one file per envelope kind for `envelope`, and short valid streams for
/// `frame_decoder` (4 bytes that seed its chunk sizes, then frames).
/// Regenerate with
/// `cargo test -p zrpc-proto --test proptest -- --ignored write_fuzz_seed_corpus`.
#[test]
#[ignore = "writes files into fuzz/corpus"]
fn write_fuzz_seed_corpus() {
    let envs: Vec<(&str, Envelope<'static>)> = vec![
        (
            "hello",
            Envelope::Hello {
                version: 1,
                instance: 0x0123_4567_89ab_cdef,
                agent: "zrpc-client/0.1",
                caps: 0,
            },
        ),
        (
            "welcome",
            Envelope::Welcome {
                version: 1,
                conn_id: 7,
                max_message_size: 16 << 20,
                caps: 0,
            },
        ),
        (
            "register",
            Envelope::Register {
                req: 1,
                name: "test_server",
                shared: true,
            },
        ),
        (
            "unregister",
            Envelope::Unregister {
                req: 2,
                name: "test_server",
            },
        ),
        (
            "ack",
            Envelope::Ack {
                req: 1,
                code: Some(ErrorCode::NameTaken),
                message: "name \"test_server\" is taken",
            },
        ),
        (
            "call",
            Envelope::Call {
                id: 300,
                service: "test_server",
                method: "func",
                timeout_ms: Some(70_000),
                flags: 3,
            },
        ),
        (
            "request",
            Envelope::Request {
                id: 1 << 40,
                service: "test_server",
                method: "func",
                timeout_ms: None,
                caller_instance: u64::MAX,
                caller_call: 300,
                caller: Some(zrpc_proto::Caller {
                    uid: 1000,
                    gid: 100,
                    pid: 4242,
                }),
            },
        ),
        (
            "reply",
            Envelope::Reply {
                id: 1 << 40,
                code: None,
                message: "",
            },
        ),
        (
            "result",
            Envelope::Result {
                id: 300,
                code: Some(ErrorCode::Unknown(999)),
                message: "a message long enough to need the str8 encoding",
            },
        ),
        ("cancel", Envelope::Cancel { id: 300 }),
        ("ping", Envelope::Ping { nonce: 65_536 }),
        ("pong", Envelope::Pong { nonce: 255 }),
        ("event", Envelope::Event { seq: 1 }),
        (
            "fatal",
            Envelope::Fatal {
                code: ErrorCode::Protocol,
                message: "bad frame",
            },
        ),
    ];
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    let env_dir = root.join("envelope");
    let frame_dir = root.join("frame_decoder");
    std::fs::create_dir_all(&env_dir).unwrap();
    std::fs::create_dir_all(&frame_dir).unwrap();

    for (name, e) in &envs {
        let mut b = BytesMut::new();
        e.encode(&mut b);
        std::fs::write(env_dir.join(format!("seed-{name}")), &b).unwrap();
    }
    // An envelope with extension fields after the known ones.
    let ext = rmpv::Value::Array(vec![
        10.into(),
        77.into(),
        rmpv::Value::Map(vec![("trace".into(), rmpv::Value::Binary(vec![1, 2]))]),
        rmpv::Value::F64(1.5),
        rmpv::Value::Ext(5, vec![0; 4]),
    ]);
    let mut b = Vec::new();
    rmpv::encode::write_value(&mut b, &ext).unwrap();
    std::fs::write(env_dir.join("seed-extensions"), &b).unwrap();

    // Payloads: nil, a small map, a string, binary.
    let payloads: [&[u8]; 4] = [
        &[0xc0],
        &[0x81, 0xa4, b'h', b'a', b'h', b'a', 0xa3, b'b', b'r', b't'],
        &[0xa4, b'f', b'u', b'n', b'c'],
        &[0xc4, 0x03, 1, 2, 3],
    ];
    for (i, (name, e)) in envs.iter().enumerate() {
        let mut b = BytesMut::new();
        // Chunk-size seed: varies per file.
        b.extend_from_slice(&(0x9e37_79b9u32.wrapping_mul(i as u32 + 1)).to_le_bytes());
        let p = if matches!(
            e,
            Envelope::Call { .. } | Envelope::Request { .. } | Envelope::Reply { .. }
        ) {
            payloads[i % payloads.len()]
        } else {
            &[]
        };
        encode_frame(&mut b, e, p);
        std::fs::write(frame_dir.join(format!("seed-{name}")), &b).unwrap();
    }
    // A whole conversation in one stream: handshake, register, call, reply.
    let mut b = BytesMut::from(&[1u8, 2, 3, 4][..]);
    for (_, e) in envs.iter().take(8) {
        encode_frame(&mut b, e, payloads[1]);
    }
    std::fs::write(frame_dir.join("seed-conversation"), &b).unwrap();
}
