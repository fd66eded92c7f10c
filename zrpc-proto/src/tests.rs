use bytes::BytesMut;

use crate::*;

fn all_envelopes() -> Vec<Envelope<'static>> {
    vec![
        Envelope::Hello {
            version: PROTOCOL_VERSION,
            instance: u64::MAX,
            agent: "zrpc-client/0.1",
            caps: 0,
        },
        Envelope::Welcome {
            version: 1,
            conn_id: 7,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            caps: 0,
        },
        Envelope::Register {
            req: 1,
            name: "test_server",
            shared: true,
        },
        Envelope::Unregister { req: 2, name: "x" },
        Envelope::Ack {
            req: 3,
            code: Some(ErrorCode::NameTaken),
            message: "taken",
        },
        Envelope::Call {
            id: 300,
            service: "svc",
            method: "m",
            timeout_ms: Some(70_000),
            flags: flags::NO_WAIT,
        },
        Envelope::Call {
            id: 0,
            service: "svc",
            method: "m",
            timeout_ms: None,
            flags: 0,
        },
        Envelope::Request {
            id: 1 << 40,
            service: "svc",
            method: "m",
            timeout_ms: Some(5),
            caller_instance: 42,
            caller_call: 43,
            caller: Some(Caller {
                uid: 1000,
                gid: 1000,
                pid: 4242,
            }),
        },
        Envelope::Request {
            id: 2,
            service: "svc",
            method: "m",
            timeout_ms: None,
            caller_instance: 42,
            caller_call: 44,
            caller: None,
        },
        Envelope::Reply {
            id: 9,
            code: None,
            message: "",
        },
        Envelope::Result {
            id: 9,
            code: Some(ErrorCode::Unknown(999)),
            message: "long message long message long message long message long message",
        },
        Envelope::Cancel { id: 5 },
        Envelope::Ping { nonce: 1 },
        Envelope::Pong { nonce: 2 },
        Envelope::Event { seq: 3 },
        Envelope::Fatal {
            code: ErrorCode::VersionMismatch,
            message: "bye",
        },
    ]
}

#[test]
fn envelopes_round_trip_through_frames() {
    let dec = FrameDecoder::new(DEFAULT_MAX_MESSAGE_SIZE);
    let mut buf = BytesMut::new();
    let envs = all_envelopes();
    for (i, e) in envs.iter().enumerate() {
        encode_frame(&mut buf, e, &vec![i as u8; i]);
    }
    for (i, e) in envs.iter().enumerate() {
        let f = dec.decode(&mut buf).expect("valid").expect("complete");
        assert_eq!(&f.decode().expect("envelope"), e);
        assert_eq!(&f.payload[..], &vec![i as u8; i][..]);
    }
    assert!(buf.is_empty());
}

#[test]
fn envelopes_match_rmpv_encoding() {
    // Our hand-written encoder must produce standard MessagePack.
    for e in all_envelopes() {
        let mut b = BytesMut::new();
        e.encode(&mut b);
        let v = rmpv::decode::read_value(&mut &b[..]).expect("standard msgpack");
        let arr = v.as_array().expect("array");
        assert_eq!(arr[0].as_u64(), Some(e.kind() as u64));
    }
}

#[test]
fn unknown_trailing_fields_are_skipped() {
    let v = rmpv::Value::Array(vec![
        10.into(),
        77.into(),
        rmpv::Value::Map(vec![("trace".into(), rmpv::Value::Binary(vec![1, 2]))]),
        rmpv::Value::F64(1.5),
    ]);
    let mut b = Vec::new();
    rmpv::encode::write_value(&mut b, &v).expect("encode");
    assert_eq!(Envelope::decode(&b), Ok(Envelope::Cancel { id: 77 }));
}

#[test]
fn partial_frames_wait_for_more() {
    let dec = FrameDecoder::new(1024);
    let mut full = BytesMut::new();
    encode_frame(&mut full, &Envelope::Ping { nonce: 3 }, b"\xc0");
    for cut in 0..full.len() {
        let mut part = BytesMut::from(&full[..cut]);
        assert!(
            dec.decode(&mut part).expect("no error").is_none(),
            "cut {cut}"
        );
        assert_eq!(part.len(), cut);
    }
}

#[test]
fn bad_frames_are_rejected() {
    let dec = FrameDecoder::new(1024);
    let mut b = BytesMut::from(&[0, 0, 0x10, 0, 0, 0, 0, 1][..]);
    assert!(matches!(
        dec.decode(&mut b),
        Err(ProtoError::FrameTooLarge { .. })
    ));
    let mut b = BytesMut::from(&[0, 0, 0, 4, 0, 0, 0, 5, 1, 2, 3, 4][..]);
    assert!(matches!(
        dec.decode(&mut b),
        Err(ProtoError::BadEnvelopeLength { .. })
    ));
    let mut b = BytesMut::from(&[0, 0, 0, 1, 0, 0, 0, 0, 1][..]);
    assert!(matches!(
        dec.decode(&mut b),
        Err(ProtoError::BadEnvelopeLength { .. })
    ));
    for bad in [
        &[0x91, 0x63][..],                               // unknown kind 99
        &[0x92, 0x0a][..],                               // truncated
        &[0x93, 0x0a, 0x01][..],                         // truncated trailing field
        &[0x92, 0x0a, 0x01, 0x00][..],                   // trailing bytes
        &[0x82, 0x0a, 0x01][..],                         // not an array
        &[0x92, 0x0a, 0xa1, 0x41][..],                   // string where int expected
        &[0x94, 0x03, 0x01, 0xa2, 0xff, 0xfe, 0xc3][..], // invalid utf-8
        &[0x90][..],
        &[0xdd, 0xff, 0xff, 0xff, 0xff, 0x0a][..],
    ] {
        assert!(Envelope::decode(bad).is_err(), "{bad:x?}");
    }
}

#[test]
fn deep_nesting_is_bounded() {
    let mut b = vec![0x93, 0x0a, 0x01];
    b.extend(std::iter::repeat_n(0x91, 10_000));
    b.push(0xc0);
    assert!(Envelope::decode(&b).is_err());
}

#[test]
fn error_codes_round_trip() {
    for v in 1..=20u16 {
        let c = ErrorCode::from_u16(v).expect("non-zero");
        assert_eq!(c.to_u16(), v);
    }
    assert_eq!(ErrorCode::from_u16(0), None);
}

/// The successful `Reply`/`Result` with an empty message (every answered
/// call's envelope) has a short path in `encode_header` and
/// `Envelope::decode`: it writes the canonical bytes, and it reads exactly
/// what the general decoder reads.
#[test]
fn plain_answers_take_the_short_path_and_agree_with_the_general_one() {
    let ids = [
        0,
        1,
        127,
        128,
        255,
        256,
        65_535,
        65_536,
        u32::MAX as u64,
        u32::MAX as u64 + 1,
        u64::MAX,
    ];
    for id in ids {
        for env in [
            Envelope::Reply {
                id,
                code: None,
                message: "",
            },
            Envelope::Result {
                id,
                code: None,
                message: "",
            },
        ] {
            let mut out = BytesMut::new();
            encode_header(&mut out, &env, 3);
            let env_len = u32::from_be_bytes([out[4], out[5], out[6], out[7]]) as usize;
            let body_len = u32::from_be_bytes([out[0], out[1], out[2], out[3]]) as usize;
            assert_eq!(out.len(), HEADER_LEN + env_len);
            assert_eq!(body_len, env_len + 3);
            // The canonical encoding, as the general writer makes it.
            let mut general = BytesMut::new();
            env.encode_into(&mut general);
            assert_eq!(&out[HEADER_LEN..], &general[..], "{env:?}");
            let v = rmpv::Value::Array(vec![
                (env.kind() as u8).into(),
                id.into(),
                0.into(),
                "".into(),
            ]);
            let mut exact = Vec::new();
            rmpv::encode::write_value(&mut exact, &v).expect("encode");
            assert_eq!(&general[..], &exact[..], "{env:?}");
            assert_eq!(Envelope::decode_plain_answer(&exact), Some(env.clone()));
            assert_eq!(Envelope::decode(&exact), Ok(env));
        }
    }
    // Anything the short path accepts, the general decoder reads the same
    // way: every middle of up to 10 bytes drawn at random between the
    // fixed ends, and fully random short buffers.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut short = 0;
    for i in 0..200_000 {
        let mut buf = Vec::new();
        if i % 2 == 0 {
            buf.extend_from_slice(&[0x94, 8 + (next() % 2) as u8]);
            let lead = [0x00, 0x7f, 0x80, 0xcc, 0xcd, 0xce, 0xcf, 0xd0, 0xa0, 0xc0];
            let b = lead[(next() % lead.len() as u64) as usize];
            // Half the time the length the lead byte calls for.
            let n = match (b, next() % 2) {
                (0xcc, 0) => 2,
                (0xcd, 0) => 3,
                (0xce, 0) => 5,
                (0xcf, 0) => 9,
                _ => 1 + (next() % 10) as usize,
            };
            buf.push(b);
            for _ in 1..n {
                buf.push(next() as u8);
            }
            buf.extend_from_slice(&[0x00, 0xa0]);
        } else {
            let n = (next() % 16) as usize;
            for _ in 0..n {
                buf.push(next() as u8);
            }
        }
        if let Some(fast) = Envelope::decode_plain_answer(&buf) {
            short += 1;
            assert_eq!(Envelope::decode_general(&buf), Ok(fast), "{buf:x?}");
        }
    }
    assert!(short > 20_000, "the short path was taken {short} times");
    // The general path still reads answers the short one leaves to it.
    let signed = [0x94, 0x08, 0xd0, 0x05, 0x00, 0xa0];
    assert_eq!(Envelope::decode_plain_answer(&signed), None);
    assert_eq!(
        Envelope::decode(&signed),
        Ok(Envelope::Reply {
            id: 5,
            code: None,
            message: ""
        })
    );
    let trailing = [0x94, 0x08, 0x05, 0x00, 0xa0, 0x00];
    assert!(Envelope::decode(&trailing).is_err());
}

/// `Call` and `Request` envelopes with short ASCII names have a short path
/// in `Envelope::decode`: whatever it accepts, the general decoder reads
/// identically; what it leaves (long or non-ASCII names, signed or
/// oversized integers, extra fields) the general decoder still reads.
#[test]
fn calls_and_requests_take_the_short_path_and_agree_with_the_general_one() {
    let long = "n".repeat(40);
    let cases = [
        Envelope::Call {
            id: 7,
            service: "bench_echo",
            method: "echo",
            timeout_ms: Some(30_000),
            flags: 0,
        },
        Envelope::Call {
            id: u64::MAX,
            service: "s",
            method: "",
            timeout_ms: None,
            flags: u32::MAX,
        },
        Envelope::Request {
            id: 1 << 40,
            service: "svc",
            method: "m",
            timeout_ms: Some(0),
            caller_instance: u64::MAX,
            caller_call: 128,
            caller: Some(Caller {
                uid: u32::MAX,
                gid: 0,
                pid: 1,
            }),
        },
    ];
    for env in cases {
        let mut b = BytesMut::new();
        env.encode_into(&mut b);
        assert_eq!(Envelope::decode_call_or_request(&b), Some(env.clone()));
        assert_eq!(Envelope::decode(&b), Ok(env));
    }
    // Left to the general path, and read by it.
    for env in [
        Envelope::Call {
            id: 1,
            service: &long,
            method: "m",
            timeout_ms: None,
            flags: 0,
        },
        Envelope::Request {
            id: 1,
            service: "gr\u{fc}n",
            method: "m",
            timeout_ms: None,
            caller_instance: 1,
            caller_call: 2,
            caller: None,
        },
    ] {
        let mut b = BytesMut::new();
        env.encode_into(&mut b);
        assert_eq!(Envelope::decode_call_or_request(&b), None);
        assert_eq!(Envelope::decode(&b), Ok(env));
    }
    // Random mutations of valid envelopes and random fields: whatever the
    // short path accepts, the general decoder reads the same way.
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let field = |r: u64, out: &mut Vec<u8>| match r % 9 {
        0 => out.push((r >> 8) as u8 & 0x7f),
        1 => out.extend_from_slice(&[0xcc, (r >> 8) as u8]),
        2 => out.extend_from_slice(&[0xcd, (r >> 8) as u8, (r >> 16) as u8]),
        3 => out.extend_from_slice(&[0xce, 1, 2, 3, (r >> 8) as u8]),
        4 => out.extend_from_slice(&[0xcf, 0, 0, 0, 1, 2, 3, 4, (r >> 8) as u8]),
        5 => out.push(0xc0),
        6 => out.extend_from_slice(&[0xa3, b'a', b'b', (r >> 8) as u8]),
        7 => out.extend_from_slice(&[0xd0, (r >> 8) as u8]),
        _ => out.push(0xa0),
    };
    let mut short = 0;
    for i in 0..200_000 {
        let mut buf = Vec::new();
        if i % 2 == 0 {
            buf.extend_from_slice(&[0x96, 6]);
        } else {
            buf.extend_from_slice(&[0x9a, 7]);
        }
        // Mostly the right kind of value at each position (an integer, two
        // names, an integer or nil, integers), sometimes anything, and
        // sometimes a field too few or too many.
        let n = if i % 2 == 0 { 5 } else { 9 };
        let fields = match next() % 8 {
            0 => n - 1,
            1 => n + 1,
            _ => n,
        };
        for k in 0..fields {
            let r = next();
            let valid: &[u64] = match k {
                1 | 2 => &[6, 8],
                3 => &[0, 1, 2, 3, 4, 5],
                _ => &[0, 1, 2, 3, 4],
            };
            let pick = if r % 5 == 0 {
                r >> 3
            } else {
                valid[((r >> 3) % valid.len() as u64) as usize] + 9 * (r >> 32)
            };
            field(pick, &mut buf);
        }
        if next() % 8 == 0 && !buf.is_empty() {
            let at = (next() as usize) % buf.len();
            buf[at] = next() as u8;
        }
        if let Some(fast) = Envelope::decode_call_or_request(&buf) {
            short += 1;
            assert_eq!(Envelope::decode_general(&buf), Ok(fast), "{buf:x?}");
        }
    }
    assert!(short > 20_000, "the short path was taken {short} times");
}

/// `take_batch` takes every complete frame off the front of the buffer as
/// one batch (a cut frame stays behind), reports corruption after them,
/// and the batch's frames and payloads are the frames' own.
#[test]
fn batches_take_whole_frames_and_stop_at_corruption() {
    let dec = FrameDecoder::new(1024);
    let mut buf = BytesMut::new();
    let envs = [
        Envelope::Cancel { id: 1 },
        Envelope::Ping { nonce: 2 },
        Envelope::Cancel { id: 3 },
    ];
    for (i, e) in envs.iter().enumerate() {
        encode_frame(&mut buf, e, &vec![i as u8; i]);
    }
    let mut cut = BytesMut::new();
    encode_frame(&mut cut, &Envelope::Pong { nonce: 4 }, b"tail");
    buf.extend_from_slice(&cut[..cut.len() - 1]);
    let (batch, corrupt) = dec.take_batch(&mut buf);
    assert!(corrupt.is_none());
    assert_eq!(buf.len(), cut.len() - 1, "the cut frame stays");
    let frames: Vec<_> = batch.frames().collect();
    assert_eq!(frames.len(), envs.len());
    for (i, (env, payload)) in frames.into_iter().enumerate() {
        assert_eq!(Envelope::decode(env), Ok(envs[i].clone()));
        assert_eq!(payload, &vec![i as u8; i][..]);
        let owned = batch.payload(payload);
        assert_eq!(&owned[..], payload);
        if payload.is_empty() {
            assert!(owned.is_empty());
        } else {
            assert_eq!(owned.as_ptr(), payload.as_ptr(), "a view, not a copy");
        }
    }
    // Corruption after a complete frame: the frame is taken, the error
    // reported; nothing at all: an empty batch.
    let mut buf = BytesMut::new();
    encode_frame(&mut buf, &Envelope::Cancel { id: 9 }, &[]);
    buf.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 9, 0, 0, 0, 0]);
    let (batch, corrupt) = dec.take_batch(&mut buf);
    assert_eq!(batch.frames().count(), 1);
    assert!(matches!(
        corrupt,
        Some(ProtoError::BadEnvelopeLength { .. })
    ));
    let (batch, corrupt) = dec.take_batch(&mut BytesMut::new());
    assert!(batch.is_empty() && corrupt.is_none());
}
