//! The protocol test vectors (`docs/protocol-vectors.json`), checked against
//! this crate's decoder and encoder. `python/tests/test_vectors.py` checks
//! the same file against the Python library.

use bytes::BytesMut;
use serde_json::{json, Value};
use zrpc_proto::{encode_frame, Envelope, ErrorCode, FrameDecoder, DEFAULT_MAX_MESSAGE_SIZE};

fn vectors() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/protocol-vectors.json");
    let text = std::fs::read_to_string(path).expect("docs/protocol-vectors.json");
    serde_json::from_str(&text).expect("valid JSON")
}

fn unhex(s: &str) -> Vec<u8> {
    assert!(s.len() % 2 == 0, "odd hex length: {s}");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

fn code(c: Option<ErrorCode>) -> u16 {
    c.map_or(0, ErrorCode::to_u16)
}

/// The kind code and the named fields of an envelope, as the vectors spell them.
fn meaning(env: &Envelope<'_>) -> (u8, Value) {
    let (kind, fields) = match *env {
        Envelope::Hello {
            version,
            instance,
            agent,
            caps,
        } => {
            let mut v = json!({"version": version, "instance": instance, "agent": agent});
            if caps != 0 {
                v["caps"] = json!(caps);
            }
            (1, v)
        }
        Envelope::Welcome {
            version,
            conn_id,
            max_message_size,
            caps,
        } => {
            let mut v = json!({"version": version, "conn_id": conn_id, "max_message_size": max_message_size});
            if caps != 0 {
                v["caps"] = json!(caps);
            }
            (2, v)
        }
        Envelope::Register { req, name, shared } => {
            (3, json!({"req": req, "name": name, "shared": shared}))
        }
        Envelope::Unregister { req, name } => (4, json!({"req": req, "name": name})),
        Envelope::Ack {
            req,
            code: c,
            message,
        } => (5, json!({"req": req, "code": code(c), "message": message})),
        Envelope::Call {
            id,
            service,
            method,
            timeout_ms,
            flags,
        } => (
            6,
            json!({"id": id, "service": service, "method": method, "timeout_ms": timeout_ms, "flags": flags}),
        ),
        Envelope::Request {
            id,
            service,
            method,
            timeout_ms,
            caller_instance,
            caller_call,
            caller,
        } => {
            let mut m = json!({"id": id, "service": service, "method": method, "timeout_ms": timeout_ms,
                "caller_instance": caller_instance, "caller_call": caller_call});
            if let Some(c) = caller {
                let o = m.as_object_mut().expect("object");
                o.insert("caller_uid".into(), c.uid.into());
                o.insert("caller_gid".into(), c.gid.into());
                o.insert("caller_pid".into(), c.pid.into());
            }
            (7, m)
        }
        Envelope::Reply {
            id,
            code: c,
            message,
        } => (8, json!({"id": id, "code": code(c), "message": message})),
        Envelope::Result {
            id,
            code: c,
            message,
        } => (9, json!({"id": id, "code": code(c), "message": message})),
        Envelope::Cancel { id } => (10, json!({ "id": id })),
        Envelope::Ping { nonce } => (11, json!({ "nonce": nonce })),
        Envelope::Pong { nonce } => (12, json!({ "nonce": nonce })),
        Envelope::Fatal { code: c, message } => {
            (13, json!({"code": c.to_u16(), "message": message}))
        }
        Envelope::Event { seq } => (14, json!({ "seq": seq })),
    };
    (kind, fields)
}

#[test]
fn frames_decode_to_their_meaning_and_canonical_ones_encode_back() {
    let v = vectors();
    let frames = v["frames"].as_array().expect("frames");
    assert!(frames.len() >= 20, "too few vectors");
    for f in frames {
        let name = f["name"].as_str().expect("name");
        let bytes = unhex(f["hex"].as_str().expect("hex"));
        let mut buf = BytesMut::from(&bytes[..]);
        let frame = FrameDecoder::new(DEFAULT_MAX_MESSAGE_SIZE)
            .decode(&mut buf)
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .unwrap_or_else(|| panic!("{name}: incomplete frame"));
        assert!(buf.is_empty(), "{name}: bytes left after the frame");
        let env = frame.decode().unwrap_or_else(|e| panic!("{name}: {e}"));
        let (kind, fields) = meaning(&env);
        assert_eq!(u64::from(kind), f["kind_code"], "{name}: kind");
        assert_eq!(
            fields,
            Value::Object(f["fields"].as_object().expect("fields").clone()),
            "{name}: fields"
        );
        let payload = unhex(f["payload_hex"].as_str().expect("payload_hex"));
        assert_eq!(&frame.payload[..], &payload[..], "{name}: payload");
        if let Some(expected) = f.get("payload") {
            let decoded: Value = rmp_serde::from_slice(&payload).expect("payload decodes");
            assert_eq!(&decoded, expected, "{name}: payload value");
        }
        if f["canonical"] == Value::Bool(true) {
            let mut out = BytesMut::new();
            encode_frame(&mut out, &env, &payload);
            assert_eq!(&out[..], &bytes[..], "{name}: encoding");
        }
    }
}

#[test]
fn invalid_frames_are_rejected() {
    let v = vectors();
    let invalid = v["invalid"].as_array().expect("invalid");
    assert!(!invalid.is_empty());
    for f in invalid {
        let name = f["name"].as_str().expect("name");
        let mut buf = BytesMut::from(&unhex(f["hex"].as_str().expect("hex"))[..]);
        let rejected = match FrameDecoder::new(DEFAULT_MAX_MESSAGE_SIZE).decode(&mut buf) {
            Err(_) => true,
            Ok(Some(frame)) => frame.decode().is_err(),
            Ok(None) => panic!("{name}: the decoder waits for more bytes instead of rejecting"),
        };
        assert!(rejected, "{name}: accepted");
    }
}
