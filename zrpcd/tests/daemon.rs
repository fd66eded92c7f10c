//! The zrpcd binary on its own, driven over a raw socket with zrpc-proto:
//! start-up, single-instance lock, stale socket, bad input, shutdown.

use std::io::Write;
use std::process::Command;

use zrpc_proto::{Envelope, ErrorCode};
use zrpc_tests::raw::Raw;
use zrpc_tests::{bin, Broker, WAIT};

#[test]
fn second_broker_refuses_and_stale_socket_is_replaced() {
    let mut d = Broker::start();
    let second = Command::new(bin("zrpcd"))
        .arg("--socket-dir")
        .arg(d.dir())
        .output()
        .expect("second zrpcd");
    assert!(!second.status.success());
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("already running"), "{err}");
    // The first one still serves.
    let mut r = Raw::hello(d.dir());
    assert_eq!(r.call(1, "zrpcd", "ping", None).0, None);
    // SIGKILL leaves a stale socket file behind; a new broker replaces it.
    d.proc.signal(libc::SIGKILL);
    assert!(d.proc.wait_exit(WAIT).is_some(), "zrpcd did not die");
    assert!(d.socket().exists(), "stale socket left behind");
    d.respawn();
    let mut r = Raw::hello(d.dir());
    assert_eq!(r.call(1, "zrpcd", "ping", None).0, None);
}

#[test]
fn sigterm_exits_zero_and_removes_socket() {
    let mut d = Broker::start();
    let mut r = Raw::hello(d.dir());
    // A call pending on a missing service is answered with Shutdown.
    r.send(
        &Envelope::Call {
            id: 7,
            service: "nobody",
            method: "m",
            timeout_ms: None,
            flags: 0,
        },
        b"\xc0",
    );
    // Make sure the call reached the broker before signalling.
    assert_eq!(r.call(8, "zrpcd", "ping", None).0, None);
    d.proc.signal(libc::SIGTERM);
    let f = r.recv_frame().expect("result for the pending call");
    match f.decode().expect("envelope") {
        Envelope::Result { id, code, .. } => {
            assert_eq!(id, 7);
            assert_eq!(code, Some(ErrorCode::Shutdown));
        }
        other => panic!("{other:?}"),
    }
    r.expect_fatal(ErrorCode::Shutdown);
    let status = d.proc.wait_exit(WAIT).expect("zrpcd exits on SIGTERM");
    assert!(status.success(), "{status:?}");
    assert!(!d.socket().exists(), "socket file removed");
}

#[test]
fn bad_input_closes_only_the_offender() {
    let d = Broker::start_with(&["--max-message-size", "4096", "--handshake-timeout", "0.3"]);
    let mut good = Raw::hello(d.dir());

    // Garbage bytes: an absurd length prefix.
    let mut r = Raw::connect(d.dir());
    r.s.write_all(b"GET / HTTP/1.1\r\n\r\n").expect("write");
    r.expect_fatal(ErrorCode::LimitExceeded);

    // Oversized frame announced.
    let mut r = Raw::hello(d.dir());
    r.s.write_all(&[0, 0, 0x20, 0, 0, 0, 0, 1]).expect("write");
    let msg = r.expect_fatal(ErrorCode::LimitExceeded);
    assert!(msg.contains("4096"), "{msg}");

    // Envelope length larger than the body.
    let mut r = Raw::hello(d.dir());
    r.s.write_all(&[0, 0, 0, 2, 0, 0, 0, 3, 0x91, 0x0b])
        .expect("write");
    r.expect_fatal(ErrorCode::Protocol);

    // Invalid MessagePack envelope.
    let mut r = Raw::hello(d.dir());
    r.s.write_all(&[0, 0, 0, 2, 0, 0, 0, 2, 0xc1, 0xc1])
        .expect("write");
    r.expect_fatal(ErrorCode::Protocol);

    // Unknown message kind.
    let mut r = Raw::hello(d.dir());
    r.s.write_all(&[0, 0, 0, 2, 0, 0, 0, 2, 0x91, 0x63])
        .expect("write");
    r.expect_fatal(ErrorCode::Protocol);

    // A kind peers may not send.
    let mut r = Raw::hello(d.dir());
    r.send(
        &Envelope::Result {
            id: 1,
            code: None,
            message: "",
        },
        b"",
    );
    r.expect_fatal(ErrorCode::Protocol);

    // Wrong protocol version.
    let mut r = Raw::connect(d.dir());
    r.send(
        &Envelope::Hello {
            version: 99,
            instance: 1,
            agent: "future",
            caps: 0,
        },
        b"",
    );
    let msg = r.expect_fatal(ErrorCode::VersionMismatch);
    assert!(msg.contains("99"), "{msg}");

    // No Hello first.
    let mut r = Raw::connect(d.dir());
    r.send(&Envelope::Ping { nonce: 1 }, b"");
    r.expect_fatal(ErrorCode::Protocol);

    // Silent peer: handshake timeout.
    let mut r = Raw::connect(d.dir());
    r.expect_fatal(ErrorCode::Protocol);

    // Truncated frame, then the peer goes away: nothing to answer, no harm.
    let mut r = Raw::hello(d.dir());
    r.s.write_all(&[0, 0, 0, 100, 0, 0, 0, 3, 0x93])
        .expect("write");
    drop(r);

    // Invalid service name in a call: a typed error, connection stays.
    let mut r = Raw::hello(d.dir());
    let (code, msg, _) = r.call(1, "bad name!", "m", Some(1000));
    assert_eq!(code, Some(ErrorCode::InvalidName), "{msg}");
    assert_eq!(r.call(2, "zrpcd", "ping", None).0, None);

    // Invalid name in a registration: a typed Ack error.
    r.send(
        &Envelope::Register {
            req: 5,
            name: "../etc",
            shared: false,
        },
        b"",
    );
    let f = r.recv_frame().expect("ack");
    assert!(matches!(
        f.decode().expect("env"),
        Envelope::Ack {
            req: 5,
            code: Some(ErrorCode::InvalidName),
            ..
        }
    ));

    // The first connection was never disturbed.
    let (code, _, payload) = good.call(1, "zrpcd", "ping", None);
    assert_eq!(code, None);
    assert_eq!(&payload[..], b"\xa4pong");
}

#[test]
fn pings_are_answered() {
    let d = Broker::start();
    let mut r = Raw::hello(d.dir());
    r.send(&Envelope::Ping { nonce: 42 }, b"");
    let f = r.recv_frame().expect("pong");
    assert_eq!(f.decode().expect("env"), Envelope::Pong { nonce: 42 });
}

/// SIGINT or SIGTERM (each every other start) sent as soon as the socket
/// accepts connections stops the broker cleanly: exit status 0 and the
/// socket removed, every time (signal handling is installed before the
/// socket is bound).
#[test]
fn signal_right_after_start_exits_cleanly() {
    for i in 0..200 {
        let (sig, name) = if i % 2 == 0 {
            (libc::SIGINT, "SIGINT")
        } else {
            (libc::SIGTERM, "SIGTERM")
        };
        let dir = zrpc_tests::TempDir::new();
        let sock = dir.path().join("zrpcd.sock");
        let mut c = Command::new(bin("zrpcd"));
        c.arg("--socket-dir")
            .arg(dir.path())
            .env("RUST_LOG", "error");
        let mut p = zrpc_tests::Proc::spawn("zrpcd", c);
        // Poll without pausing (bounded in time): the signal must land as
        // close as possible to the moment the socket starts accepting.
        let t0 = std::time::Instant::now();
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            assert!(t0.elapsed() < WAIT, "start {i}: zrpcd did not accept");
            std::hint::spin_loop();
        }
        p.signal(sig);
        let status = p
            .wait_exit(WAIT)
            .unwrap_or_else(|| panic!("start {i}: zrpcd did not exit on {name}"));
        assert!(status.success(), "start {i}, {name}: {status:?}");
        assert!(!sock.exists(), "start {i}, {name}: socket left behind");
    }
}

/// A duration flag past the longest allowed (365 days) is refused at
/// start, naming the flag: added to the clock it would overflow and panic
/// a connection's writer (`--close-flush-timeout`) or the exit.
#[test]
fn a_duration_flag_past_a_year_is_refused_at_start() {
    let dir = zrpc_tests::TempDir::new();
    let mut c = Command::new(bin("zrpcd"));
    c.arg("--socket-dir")
        .arg(dir.path())
        .args(["--close-flush-timeout", "1e12"])
        .stderr(std::process::Stdio::piped());
    let mut p = zrpc_tests::Proc::adopt(c.spawn().expect("start zrpcd"), "zrpcd");
    let status = p.wait_exit(WAIT).expect("zrpcd did not exit");
    assert!(!status.success());
    let mut err = String::new();
    if let Some(mut e) = p.child.stderr.take() {
        std::io::Read::read_to_string(&mut e, &mut err).expect("stderr");
    }
    assert!(
        err.contains("--close-flush-timeout") && err.contains("365 days"),
        "{err}"
    );
}
