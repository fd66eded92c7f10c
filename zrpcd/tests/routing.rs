//! The routing logic in process (frames are fed to the broker directly, not
//! read from sockets): broker call ids of reused pending-call slots, late
//! replies, cancel, re-delivery and caller disconnect, as seen in the frames
//! queued for each peer; and when those frames are written to the peer's
//! socket.

use std::rc::Rc;

use bytes::BytesMut;
use zrpc_io::reactor;
use zrpc_proto::{encode_frame, Envelope, ErrorCode, Frame, FrameDecoder, PROTOCOL_VERSION};
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

/// A frame queued for a peer, decoded to owned parts.
#[derive(Debug, PartialEq)]
enum Out {
    Request {
        id: u64,
        method: String,
        caller_call: u64,
        payload: Vec<u8>,
    },
    Result {
        id: u64,
        code: Option<ErrorCode>,
        payload: Vec<u8>,
    },
    Cancel {
        id: u64,
    },
    Other,
}

struct Peer {
    id: PeerId,
    io: Rc<PeerIo>,
    other_end: std::os::unix::net::UnixStream,
}

impl Peer {
    /// Everything queued for this peer since the last call.
    fn take(&self) -> Vec<Out> {
        let mut chunks = Vec::new();
        self.io.queue.borrow_mut().take_into(&mut chunks);
        let mut buf = BytesMut::new();
        for c in chunks {
            buf.extend_from_slice(&c);
        }
        decode_outs(&mut buf)
    }

    /// Frames that reached the peer's end of the socket so far.
    fn written(&self) -> Vec<Out> {
        use std::io::Read;
        let mut sock = &self.other_end;
        sock.set_nonblocking(true).expect("nonblocking");
        let mut buf = BytesMut::new();
        let mut chunk = [0u8; 4096];
        loop {
            match sock.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("read: {e}"),
            }
        }
        let out = decode_outs(&mut buf);
        assert!(buf.is_empty(), "whole frames only");
        out
    }
}

fn decode_outs(buf: &mut BytesMut) -> Vec<Out> {
    let dec = FrameDecoder::new(u32::MAX);
    let mut out = Vec::new();
    while let Some(f) = dec.decode(buf).expect("valid frames") {
        out.push(match f.decode().expect("valid envelope") {
            Envelope::Request {
                id,
                method,
                caller_call,
                ..
            } => Out::Request {
                id,
                method: method.into(),
                caller_call,
                payload: f.payload.to_vec(),
            },
            Envelope::Result { id, code, .. } => Out::Result {
                id,
                code,
                payload: f.payload.to_vec(),
            },
            Envelope::Cancel { id } => Out::Cancel { id },
            _ => Out::Other,
        });
    }
    out
}

fn connect(b: &mut Broker, instance: u64) -> Peer {
    let (a, other_end) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    a.set_nonblocking(true).expect("nonblocking");
    let fd = reactor::register(a, tokio::io::Interest::READABLE).expect("register");
    let io = Rc::new(PeerIo::new(Rc::new(fd)));
    let id = b.add_peer(io.clone(), Creds::default());
    let hello = Envelope::Hello {
        version: PROTOCOL_VERSION,
        instance,
        agent: "routing-test",
        caps: 0,
    };
    b.on_frame(id, frame(&hello, b"")).expect("hello");
    let p = Peer { id, io, other_end };
    p.take();
    p
}

fn register(b: &mut Broker, p: &Peer, name: &str) {
    let reg = Envelope::Register {
        req: 1,
        name,
        shared: true,
    };
    b.on_frame(p.id, frame(&reg, b"")).expect("register");
    p.take();
}

fn call(b: &mut Broker, p: &Peer, id: u64, method: &str, payload: &[u8]) {
    let env = Envelope::Call {
        id,
        service: "svc",
        method,
        timeout_ms: None,
        flags: 0,
    };
    b.on_frame(p.id, frame(&env, payload)).expect("call");
}

fn reply(b: &mut Broker, p: &Peer, id: u64, payload: &[u8]) {
    let env = Envelope::Reply {
        id,
        code: None,
        message: "",
    };
    b.on_frame(p.id, frame(&env, payload)).expect("reply");
}

fn request_id(outs: &[Out]) -> u64 {
    match outs {
        [Out::Request { id, .. }] => *id,
        other => panic!("expected one Request, got {other:?}"),
    }
}

fn with_broker(f: impl FnOnce(&mut Broker)) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _enter = rt.enter();
    let dir = std::env::temp_dir().join(format!("zrpcd-routing-test-{}", std::process::id()));
    let mut b = Broker::new(zrpcd::Config::new(Some(dir)));
    f(&mut b);
}

#[test]
fn a_late_reply_never_reaches_the_call_that_reused_the_slot() {
    with_broker(|b| {
        let client = connect(b, 1);
        let svc = connect(b, 2);
        register(b, &svc, "svc");
        call(b, &client, 7, "a", b"first");
        let first = request_id(&svc.take());
        // Cancelled: the slot is freed (and reused by the next call).
        b.on_frame(client.id, frame(&Envelope::Cancel { id: 7 }, b""))
            .expect("cancel");
        assert_eq!(svc.take(), vec![Out::Cancel { id: first }]);
        call(b, &client, 7, "b", b"second");
        let outs = svc.take();
        let second = request_id(&outs);
        assert_ne!(first, second, "a reused slot gets a new id");
        assert_eq!(
            outs,
            vec![Out::Request {
                id: second,
                method: "b".into(),
                caller_call: 7,
                payload: b"second".to_vec(),
            }]
        );
        // The late reply to the first call is dropped.
        reply(b, &svc, first, b"late");
        assert_eq!(client.take(), vec![]);
        assert_eq!(b.stats.late_replies, 1);
        reply(b, &svc, second, b"answer");
        assert_eq!(
            client.take(),
            vec![Out::Result {
                id: 7,
                code: None,
                payload: b"answer".to_vec(),
            }]
        );
        assert!(b.pending.is_empty());
        assert_eq!(b.stats.service("svc").answered, 1);
    });
}

#[test]
fn redelivery_keeps_the_payload_and_caller_disconnect_does_not_cancel() {
    with_broker(|b| {
        let client = connect(b, 1);
        let svc1 = connect(b, 2);
        let svc2 = connect(b, 3);
        register(b, &svc1, "svc");
        call(b, &client, 1, "m", b"payload");
        call(b, &client, 2, "m", b"");
        let mut on_1 = svc1.take();
        let mut on_2 = svc2.take();
        // Register the second instance now: both calls went to the first.
        register(b, &svc2, "svc");
        assert_eq!((on_1.len(), on_2.len()), (2, 0), "{on_1:?}");
        b.remove_peer(svc1.id);
        on_2.extend(svc2.take());
        on_1.sort_by_key(|o| match o {
            Out::Request { caller_call, .. } => *caller_call,
            _ => 0,
        });
        on_2.sort_by_key(|o| match o {
            Out::Request { caller_call, .. } => *caller_call,
            _ => 0,
        });
        assert_eq!(on_1, on_2, "re-delivered with the same ids and payloads");
        assert_eq!(b.stats.redelivered, 2);
        // The caller leaves: its calls are freed, the service is not told.
        b.remove_peer(client.id);
        assert!(b.pending.is_empty());
        assert_eq!(svc2.take(), vec![]);
        // The answers come late and are dropped.
        for o in &on_2 {
            if let Out::Request { id, .. } = o {
                reply(b, &svc2, *id, b"x");
            }
        }
        assert_eq!(b.stats.late_replies, 2);
    });
}

#[test]
fn duplicate_ids_and_limits_are_refused() {
    with_broker(|b| {
        b.config.max_pending_per_conn = 2;
        let client = connect(b, 1);
        let svc = connect(b, 2);
        register(b, &svc, "svc");
        call(b, &client, 1, "m", b"");
        call(b, &client, 1, "m", b"");
        call(b, &client, 2, "m", b"");
        call(b, &client, 3, "m", b"");
        assert_eq!(
            client.take(),
            vec![
                Out::Result {
                    id: 1,
                    code: Some(ErrorCode::Protocol),
                    payload: vec![],
                },
                Out::Result {
                    id: 3,
                    code: Some(ErrorCode::LimitExceeded),
                    payload: vec![],
                },
            ]
        );
        assert_eq!(svc.take().len(), 2);
        assert_eq!(b.pending.len(), 2);
        // Invalid names are refused before anything is stored.
        let env = Envelope::Call {
            id: 9,
            service: "svc",
            method: "bad name",
            timeout_ms: None,
            flags: 0,
        };
        b.on_frame(client.id, frame(&env, b"")).expect("call");
        assert_eq!(
            client.take(),
            vec![Out::Result {
                id: 9,
                code: Some(ErrorCode::InvalidName),
                payload: vec![],
            }]
        );
        assert_eq!(b.pending.len(), 2);
    });
}

fn request_ids(outs: &[Out]) -> Vec<u64> {
    outs.iter()
        .filter_map(|o| match o {
            Out::Request { id, .. } => Some(*id),
            _ => None,
        })
        .collect()
}

#[test]
fn a_peer_is_written_every_16_frames_and_the_rest_at_the_end_of_the_batch() {
    with_broker(|b| {
        let svc = connect(b, 1);
        register(b, &svc, "svc");
        let clients: Vec<Peer> = (0..3).map(|i| connect(b, 10 + i)).collect();
        // One client's burst of 20 calls: the service gets the first 16 at
        // once, the other 4 when the batch ends.
        for id in 0..20 {
            call(b, &clients[0], id, "m", b"x");
        }
        let mut ids = request_ids(&svc.written());
        assert_eq!(ids.len(), 16);
        b.flush();
        ids.extend(request_ids(&svc.written()));
        assert_eq!(ids.len(), 20);
        // Calls spread over two more clients (5 each): nobody reaches 16.
        for c in &clients[1..] {
            for id in 0..5 {
                call(b, c, id, "m", b"x");
            }
        }
        b.flush();
        ids.extend(request_ids(&svc.written()));
        assert_eq!(ids.len(), 30);
        assert!(svc.take().is_empty(), "nothing left queued");
        // All 30 answered in one batch: the first client's 20 results are
        // written at 16 and at the end; the others' 5 each once, at the end.
        for id in ids {
            reply(b, &svc, id, b"r");
        }
        assert_eq!(clients[0].written().len(), 16);
        assert_eq!(clients[1].written().len() + clients[2].written().len(), 0);
        b.flush();
        assert_eq!(clients[0].written().len(), 4);
        assert_eq!(clients[1].written().len(), 5);
        assert_eq!(clients[2].written().len(), 5);
    });
}

#[test]
fn frames_from_several_read_batches_wait_for_the_end_of_the_wake_up() {
    with_broker(|b| {
        let svc = connect(b, 1);
        register(b, &svc, "svc");
        let clients: Vec<Peer> = (0..3).map(|i| connect(b, 10 + i)).collect();
        // Three connections read in one wake-up, 10 calls each: 30 frames
        // for the service, but no read batch reaches 16, so nothing is
        // written until the flusher runs, and then all 30 go at once.
        for c in &clients {
            b.out.begin_batch();
            for id in 0..10 {
                call(b, c, id, "m", b"x");
            }
            b.out.end_batch();
        }
        assert!(svc.written().is_empty(), "written before the wake-up ended");
        b.flush();
        let first = request_ids(&svc.written());
        assert_eq!(first.len(), 30);
        // The service has 30 requests to work on: a read batch of 16 more
        // waits for the end of the wake-up too (writing it early would not
        // start the service any sooner).
        b.out.begin_batch();
        for id in 10..26 {
            call(b, &clients[1], id, "m", b"x");
        }
        assert!(svc.written().is_empty(), "written early to a busy service");
        b.flush();
        let second = request_ids(&svc.written());
        assert_eq!(second.len(), 16);
        // Answered down to 15 open requests, it is short of work: the next
        // read batch of 16 is written as soon as it reaches 16.
        for &id in first.iter().chain(&second).take(31) {
            reply(b, &svc, id, b"r");
        }
        b.flush();
        b.out.begin_batch();
        for id in 10..26 {
            call(b, &clients[2], id, "m", b"x");
        }
        assert_eq!(request_ids(&svc.written()).len(), 16);
        assert!(svc.take().is_empty(), "nothing left queued");
    });
}

#[test]
fn a_large_payload_is_written_at_once() {
    with_broker(|b| {
        let svc = connect(b, 1);
        register(b, &svc, "svc");
        let c = connect(b, 2);
        b.out.begin_batch();
        call(b, &c, 1, "m", b"small");
        assert!(
            svc.written().is_empty(),
            "a small frame waits for the flusher"
        );
        let big = vec![7u8; zrpcd::queue::ZERO_COPY_MIN];
        call(b, &c, 2, "m", &big);
        // Written with what was queued before it, without waiting.
        assert_eq!(request_ids(&svc.written()).len(), 2);
    });
}

#[test]
fn a_closing_peer_is_left_to_its_writer_task() {
    with_broker(|b| {
        let svc = connect(b, 1);
        register(b, &svc, "svc");
        let c = connect(b, 2);
        // Closing (e.g. its writes failed, or it was sent `Fatal`): the
        // writer task writes what was queued before, within a bound;
        // routing neither writes nor queues anything more to it, even past
        // 16 frames (the calls are re-delivered when it is torn down).
        svc.io.close();
        for id in 0..20 {
            call(b, &c, id, "m", b"x");
        }
        b.flush();
        assert!(svc.written().is_empty());
        assert!(
            request_ids(&svc.take()).is_empty(),
            "nothing queued once closing"
        );
    });
}
