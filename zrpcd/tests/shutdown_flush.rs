//! A reply that completes a delivered call within the shutdown grace
//! reaches its caller, also when it is too large for one write and the
//! caller reads it a while later: the broker waits for its connections'
//! writers before it exits (it used to wait for its peer table only, which
//! a peer leaves before its writer has flushed, and cut the frame).

use std::time::Duration;

use zrpc_proto::Envelope;
use zrpc_tests::raw::{register, Raw};
use zrpc_tests::{wait_until, Broker, WAIT};

/// The next `Request` on `s` (answering the broker's pings): its id.
fn next_request(s: &mut Raw) -> u64 {
    loop {
        match s
            .recv_frame()
            .expect("a Request")
            .decode()
            .expect("envelope")
        {
            Envelope::Request { id, .. } => return id,
            Envelope::Ping { nonce } => s.send(&Envelope::Pong { nonce }, b""),
            _ => {}
        }
    }
}

fn reply_in_grace_reaches_the_caller(caller_delay: Duration) {
    let mut b = Broker::start_with(&["--shutdown-grace", "5"]);
    let mut s = Raw::hello(b.dir());
    register(&mut s, "big");
    let mut c = Raw::hello(b.dir());
    c.send(
        &Envelope::Call {
            id: 1,
            service: "big",
            method: "m",
            timeout_ms: None,
            flags: 0,
        },
        b"\xc0",
    );
    let bid = next_request(&mut s);
    b.proc.signal(libc::SIGTERM);
    // Shutting down: the listener is closed, the grace runs.
    let sock = b.socket();
    assert!(wait_until(WAIT, || {
        std::os::unix::net::UnixStream::connect(&sock).is_err()
    }));
    // 12 MiB: far more than one write to the caller's socket.
    let n = 12 << 20;
    let mut payload = vec![0xc6u8];
    payload.extend_from_slice(&(n as u32).to_be_bytes());
    payload.resize(5 + n, 0x5a);
    s.send(
        &Envelope::Reply {
            id: bid,
            code: None,
            message: "",
        },
        &payload,
    );
    // Not synchronisation: the caller is slow to read (within the bound).
    std::thread::sleep(caller_delay);
    let f = c
        .recv_frame()
        .expect("the Result (EOF: the reply was cut at shutdown)");
    match f.decode().expect("envelope") {
        Envelope::Result { id, code, .. } => assert_eq!((id, code), (1, None)),
        other => panic!("expected the Result, got {other:?}"),
    }
    assert_eq!(f.payload.len(), payload.len());
    assert!(b.proc.wait_exit(WAIT).is_some(), "zrpcd did not exit");
}

#[test]
fn a_reply_within_the_grace_reaches_a_prompt_caller() {
    reply_in_grace_reaches_the_caller(Duration::ZERO);
}

#[test]
fn a_reply_within_the_grace_reaches_a_caller_that_reads_late() {
    reply_in_grace_reaches_the_caller(Duration::from_millis(300));
}
