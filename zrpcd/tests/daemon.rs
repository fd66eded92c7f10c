//! The zrpcd binary on its own, driven over a raw socket with zrpc-proto:
//! start-up, single-instance lock, stale socket, bad input, shutdown.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use zrpc_proto::{Envelope, ErrorCode};
use zrpc_tests::raw::Raw;

const WAIT: Duration = Duration::from_secs(20);

struct Daemon {
    child: Child,
    dir: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn temp_dir(tag: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("zrpcd-t{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    p
}

fn spawn(dir: &Path, extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_zrpcd"))
        .arg("--socket-dir")
        .arg(dir)
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn zrpcd")
}

fn wait_until(mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < WAIT {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

fn start(tag: &str, extra: &[&str]) -> Daemon {
    let dir = temp_dir(tag);
    let child = spawn(&dir, extra);
    let sock = dir.join("zrpcd.sock");
    let d = Daemon { child, dir };
    assert!(
        wait_until(|| UnixStream::connect(&sock).is_ok()),
        "zrpcd did not start"
    );
    d
}

#[test]
fn second_broker_refuses_and_stale_socket_is_replaced() {
    let mut d = start("lock", &[]);
    let second = spawn(&d.dir, &[]).wait_with_output().expect("second zrpcd");
    assert!(!second.status.success());
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("already running"), "{err}");
    // The first one still serves.
    let mut r = Raw::hello(&d.dir);
    assert_eq!(r.call(1, "zrpcd", "ping", None).0, None);
    // SIGKILL leaves a stale socket file behind; a new broker replaces it.
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(d.child.id() as i32, libc::SIGKILL) };
    d.child.wait().expect("reap");
    assert!(
        d.dir.join("zrpcd.sock").exists(),
        "stale socket left behind"
    );
    d.child = spawn(&d.dir, &[]);
    let sock = d.dir.join("zrpcd.sock");
    assert!(wait_until(|| UnixStream::connect(&sock).is_ok()));
    let mut r = Raw::hello(&d.dir);
    assert_eq!(r.call(1, "zrpcd", "ping", None).0, None);
}

#[test]
fn sigterm_exits_zero_and_removes_socket() {
    let mut d = start("term", &[]);
    let mut r = Raw::hello(&d.dir);
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
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(d.child.id() as i32, libc::SIGTERM) };
    let f = r.recv_frame().expect("result for the pending call");
    match f.decode().expect("envelope") {
        Envelope::Result { id, code, .. } => {
            assert_eq!(id, 7);
            assert_eq!(code, Some(ErrorCode::Shutdown));
        }
        other => panic!("{other:?}"),
    }
    r.expect_fatal(ErrorCode::Shutdown);
    let start = Instant::now();
    let status = loop {
        if let Some(s) = d.child.try_wait().expect("wait") {
            break s;
        }
        assert!(start.elapsed() < WAIT, "zrpcd did not exit on SIGTERM");
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(status.success(), "{status:?}");
    assert!(!d.dir.join("zrpcd.sock").exists(), "socket file removed");
}

#[test]
fn bad_input_closes_only_the_offender() {
    let d = start(
        "bad",
        &["--max-message-size", "4096", "--handshake-timeout", "0.3"],
    );
    let mut good = Raw::hello(&d.dir);

    // Garbage bytes: an absurd length prefix.
    let mut r = Raw::connect(&d.dir);
    r.s.write_all(b"GET / HTTP/1.1\r\n\r\n").expect("write");
    r.expect_fatal(ErrorCode::LimitExceeded);

    // Oversized frame announced.
    let mut r = Raw::hello(&d.dir);
    r.s.write_all(&[0, 0, 0x20, 0, 0, 0, 0, 1]).expect("write");
    let msg = r.expect_fatal(ErrorCode::LimitExceeded);
    assert!(msg.contains("4096"), "{msg}");

    // Envelope length larger than the body.
    let mut r = Raw::hello(&d.dir);
    r.s.write_all(&[0, 0, 0, 2, 0, 0, 0, 3, 0x91, 0x0b])
        .expect("write");
    r.expect_fatal(ErrorCode::Protocol);

    // Invalid MessagePack envelope.
    let mut r = Raw::hello(&d.dir);
    r.s.write_all(&[0, 0, 0, 2, 0, 0, 0, 2, 0xc1, 0xc1])
        .expect("write");
    r.expect_fatal(ErrorCode::Protocol);

    // Unknown message kind.
    let mut r = Raw::hello(&d.dir);
    r.s.write_all(&[0, 0, 0, 2, 0, 0, 0, 2, 0x91, 0x63])
        .expect("write");
    r.expect_fatal(ErrorCode::Protocol);

    // A kind peers may not send.
    let mut r = Raw::hello(&d.dir);
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
    let mut r = Raw::connect(&d.dir);
    r.send(
        &Envelope::Hello {
            version: 99,
            instance: 1,
            agent: "future",
        },
        b"",
    );
    let msg = r.expect_fatal(ErrorCode::VersionMismatch);
    assert!(msg.contains("99"), "{msg}");

    // No Hello first.
    let mut r = Raw::connect(&d.dir);
    r.send(&Envelope::Ping { nonce: 1 }, b"");
    r.expect_fatal(ErrorCode::Protocol);

    // Silent peer: handshake timeout.
    let mut r = Raw::connect(&d.dir);
    r.expect_fatal(ErrorCode::Protocol);

    // Truncated frame, then the peer goes away: nothing to answer, no harm.
    let mut r = Raw::hello(&d.dir);
    r.s.write_all(&[0, 0, 0, 100, 0, 0, 0, 3, 0x93])
        .expect("write");
    drop(r);

    // Invalid service name in a call: a typed error, connection stays.
    let mut r = Raw::hello(&d.dir);
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
    let d = start("ping", &[]);
    let mut r = Raw::hello(&d.dir);
    r.send(&Envelope::Ping { nonce: 42 }, b"");
    let f = r.recv_frame().expect("pong");
    assert_eq!(f.decode().expect("env"), Envelope::Pong { nonce: 42 });
}
