//! `FrameDecoder::decode` on an arbitrary byte stream delivered in
//! arbitrary chunks, with a small frame size limit, decoding every frame's
//! envelope.
//!
//! Input layout: the first 4 bytes seed the chunk sizes (1 to 64 bytes, or
//! a larger read now and then); the rest is the stream. The seed corpus in
//! `fuzz/corpus/frame_decoder` follows this layout.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use zrpc_proto::{Envelope, FrameDecoder, HEADER_LEN};

/// Small limit, so that `FrameTooLarge` is easy to reach and every valid
/// frame in the stream is cheap.
const MAX_BODY: u32 = 512;

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let (seed, stream) = data.split_at(4);
    let mut rng = u32::from_le_bytes(seed.try_into().unwrap()) | 1;
    let mut next = move || {
        // xorshift32
        rng ^= rng << 13;
        rng ^= rng >> 17;
        rng ^= rng << 5;
        rng
    };

    let dec = FrameDecoder::new(MAX_BODY);
    let mut buf = BytesMut::new();
    let mut pos = 0;
    let mut frames = 0usize;
    while pos < stream.len() {
        let r = next();
        let want = if r % 16 == 0 {
            1 + (r >> 8) % 2048
        } else {
            1 + (r >> 8) % 64
        };
        let n = (want as usize).min(stream.len() - pos);
        buf.extend_from_slice(&stream[pos..pos + n]);
        pos += n;
        loop {
            let before_len = buf.len();
            let header: Option<[u8; 8]> = buf.get(..HEADER_LEN).map(|h| h.try_into().unwrap());
            match dec.decode(&mut buf) {
                Ok(None) => {
                    assert_eq!(buf.len(), before_len, "Ok(None) consumed bytes");
                    if let Some(total) = dec.needed(&buf) {
                        assert!(total > buf.len() && total <= HEADER_LEN + MAX_BODY as usize);
                    }
                    break;
                }
                Ok(Some(frame)) => {
                    let h = header.expect("a frame needs a header");
                    let body = u32::from_be_bytes(h[0..4].try_into().unwrap()) as usize;
                    let env = u32::from_be_bytes(h[4..8].try_into().unwrap()) as usize;
                    assert!(body <= MAX_BODY as usize && env >= 1 && env <= body);
                    assert_eq!(buf.len(), before_len - HEADER_LEN - body);
                    assert_eq!(frame.envelope.len(), env);
                    assert_eq!(frame.payload.len(), body - env);
                    frames += 1;
                    assert!(frames * (HEADER_LEN + 1) <= stream.len());
                    if let Ok(e) = frame.decode() {
                        let mut out = BytesMut::new();
                        e.encode(&mut out);
                        assert_eq!(Envelope::decode(&out).expect("re-encoded"), e);
                    }
                }
                // The connection would be closed: nothing more to decode.
                Err(_) => return,
            }
        }
    }
});
