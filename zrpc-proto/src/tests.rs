use bytes::BytesMut;

use crate::*;

fn all_envelopes() -> Vec<Envelope<'static>> {
    vec![
        Envelope::Hello {
            version: PROTOCOL_VERSION,
            instance: u64::MAX,
            agent: "zrpc-client/0.1",
        },
        Envelope::Welcome {
            version: 1,
            conn_id: 7,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
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
