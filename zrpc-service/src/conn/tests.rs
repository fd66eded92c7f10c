//! Unit tests of the broker connection's reply writing.

use super::*;
use tokio::io::AsyncReadExt;

fn range(b: &Bytes) -> (usize, usize, bool) {
    let r = b.as_ptr_range();
    (r.start as usize, r.end as usize, false)
}

/// Small replies, large ones queued by reference and control frames
/// come out whole and in order, also when the socket takes them in
/// pieces.
#[test]
fn large_replies_are_written_in_order() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (a, mut b) = tokio::net::UnixStream::pair().unwrap();
        let mut conn = Conn::new(a.into_std().unwrap()).unwrap();
        let big = |n: usize, v: u8| -> Outcome { Ok(Bytes::from(vec![v; n])) };
        let sent: Vec<(u64, Outcome)> = vec![
            (1, Ok(Bytes::from_static(b"\xa1x"))),
            (2, big(LARGE_PAYLOAD, 2)),
            (3, big(3 * 1024 * 1024, 3)),
            (4, Err((ErrorCode::Remote, "no".into(), Bytes::new()))),
            (5, big(100_000, 5)),
            (6, big(10, 6)),
        ];
        for (id, o) in &sent {
            conn.write_outcome(*id, o);
        }
        encode_frame(conn.out.tail(), &Envelope::Pong { nonce: 9 }, &[]);
        let reader = async move {
            let mut buf = BytesMut::new();
            let dec = FrameDecoder::new(DEFAULT_MAX_MESSAGE_SIZE);
            let mut frames = Vec::new();
            while frames.len() < 7 {
                while let Some(f) = dec.decode(&mut buf).unwrap() {
                    frames.push(f);
                }
                if frames.len() < 7 {
                    buf.reserve(64 * 1024);
                    assert!(b.read_buf(&mut buf).await.unwrap() > 0);
                }
            }
            frames
        };
        let (w, frames) = tokio::join!(conn.flush(), reader);
        w.unwrap();
        assert_eq!(conn.pending_write(), 0);
        assert!(conn.out.is_empty());
        for ((id, o), f) in sent.iter().zip(&frames) {
            match (f.decode().unwrap(), o) {
                (
                    Envelope::Reply {
                        id: got,
                        code: None,
                        ..
                    },
                    Ok(p),
                ) => {
                    assert_eq!(got, *id);
                    assert_eq!(&f.payload, p);
                }
                (
                    Envelope::Reply {
                        id: got,
                        code: Some(c),
                        message,
                    },
                    Err((code, msg, value)),
                ) => {
                    assert_eq!((got, c, message), (*id, *code, msg.as_str()));
                    assert_eq!(&f.payload, value);
                }
                (e, _) => panic!("unexpected {e:?} for {id}"),
            }
        }
        assert!(matches!(
            frames[6].decode().unwrap(),
            Envelope::Pong { nonce: 9 }
        ));
    });
}

#[test]
fn own_reply_keeps_only_private_buffers() {
    let none = (0, 0, false);
    // An encoded value: its own exact allocation, kept by reference.
    let p = Bytes::from(vec![7u8; 1000]);
    let ptr = p.as_ptr();
    let (o, owned) = own_reply(Ok(p), none);
    assert!(owned);
    assert_eq!(o.as_ref().unwrap().as_ptr(), ptr);
    assert_eq!(o.unwrap(), vec![7u8; 1000]);
    // A view of the request, shared or not: copied.
    let req = Bytes::from(vec![1u8; 100]);
    let (_, owned) = own_reply(Ok(req.slice(10..20)), range(&req));
    assert!(!owned);
    // Shared with another handle, or static: copied.
    let (_, owned) = own_reply(Ok(req.clone()), none);
    assert!(!owned);
    // The sole handle left to the request's buffer: still copied.
    let r = range(&req);
    let view = req.slice(10..20);
    drop(req);
    assert!(view.is_unique());
    let (_, owned) = own_reply(Ok(view.clone()), r);
    assert!(!owned);
    // A view of a request read into an allocation of its own: kept.
    let (o, owned) = own_reply(Ok(view.clone()), (r.0, r.1, true));
    assert!(owned);
    assert_eq!(o.unwrap().as_ptr(), view.as_ptr());
    let (_, owned) = own_reply(Ok(Bytes::from_static(b"abc")), none);
    assert!(!owned);
    // A small value in a large allocation: copied.
    let mut v = Vec::with_capacity(64 * 1024);
    v.extend_from_slice(b"small");
    let (o, owned) = own_reply(Ok(Bytes::from(v)), none);
    assert!(!owned);
    assert_eq!(o.unwrap(), &b"small"[..]);
    // Errors and empty payloads are not payloads to keep.
    let (_, owned) = own_reply(Err((ErrorCode::Remote, "x".into(), Bytes::new())), none);
    assert!(!owned);
}
