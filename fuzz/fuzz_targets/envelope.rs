//! `Envelope::decode` on arbitrary bytes: it must return `Ok` or `Err`,
//! never panic, and what it accepts must re-encode to bytes that decode to
//! an equal envelope.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use zrpc_proto::{mp, Envelope};

fuzz_target!(|data: &[u8]| {
    if let Ok(env) = Envelope::decode(data) {
        let mut out = BytesMut::new();
        env.encode(&mut out);
        let again = Envelope::decode(&out).expect("a re-encoded envelope decodes");
        assert_eq!(again, env);
        // Our own encoding is canonical: encoding it again is a fixed point.
        let mut out2 = BytesMut::new();
        again.encode(&mut out2);
        assert_eq!(out, out2);
    }
    // The generic skipper must consume something or fail, and stay in bounds.
    let mut r = mp::Reader::new(data);
    while r.remaining() > 0 {
        let before = r.remaining();
        if r.skip().is_err() {
            break;
        }
        assert!(r.remaining() < before);
    }
});
