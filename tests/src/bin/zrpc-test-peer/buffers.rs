//! The subcommand about the broker's read buffers: `bloat` (see the module
//! docs of `main.rs`).

use std::io::Write;
use std::os::fd::AsRawFd;

use super::{connect, say};

/// A frame of exactly `total` bytes (header included) with no payload: a
/// `Pong` whose envelope carries an ignored extra element of padding (the
/// extension rule), handled where it lies in the broker's buffer.
fn padded_pong(total: usize) -> Vec<u8> {
    let pad = total - 16;
    let mut env = vec![0x93, 0x0c, 0x00, 0xdb];
    env.extend_from_slice(&(pad as u32).to_be_bytes());
    env.resize(env.len() + pad, b'a');
    let len = (env.len() as u32).to_be_bytes();
    let mut f = Vec::with_capacity(total);
    f.extend_from_slice(&len);
    f.extend_from_slice(&len);
    f.extend_from_slice(&env);
    f
}

/// On each of `conns` connections: a 4.5 MiB frame but its last KiB,
/// which makes the broker grow that connection's read buffer to about
/// 8 MiB; once the broker has read it (bounded wait), that last KiB and the
/// first 20 bytes of a small frame in one write, which the broker reads
/// together: the large frame is handled and the small one stays, partial,
/// near the end of the buffer. With `call`, a whole call with a 9,000-byte
/// argument instead of the partial frame, to a name nobody holds: it stays
/// pending, its argument kept. Prints "bloated N" once the broker has read
/// everything (or "refused K ..." at the first connection the broker
/// closed, "unread" if it did not read it within the tests' bound), then
/// stays, sending nothing more.
pub fn bloat(conns: usize, call: bool) {
    let first = padded_pong(4_718_592 + 8);
    let (head, last) = first.split_at(first.len() - 1024);
    let mut rest = last.to_vec();
    if call {
        let mut frame = bytes::BytesMut::new();
        let env = zrpc_proto::Envelope::Call {
            id: 1,
            service: "nobody",
            method: "m",
            timeout_ms: Some(600_000),
            flags: 0,
        };
        // Past what the broker copies anyway (`queue::ZERO_COPY_MIN`).
        let mut arg = vec![0xc5, 0x23, 0x28];
        arg.resize(3 + 9000, 0);
        zrpc_proto::encode_frame(&mut frame, &env, &arg);
        rest.extend_from_slice(&frame);
    } else {
        rest.extend_from_slice(&padded_pong(99)[..20]);
    }
    let mut held = Vec::with_capacity(conns);
    for i in 0..conns {
        let mut r = connect(None);
        let sent = r.s.write_all(head).and_then(|()| {
            read_by_the_broker(&r.s);
            r.s.write_all(&rest)
        });
        if let Err(e) = sent {
            say(&format!("refused {i} {e}"));
            break;
        }
        held.push(r);
    }
    if !held.iter().all(|r| read_by_the_broker(&r.s)) {
        say("unread");
    }
    say(&format!("bloated {}", held.len()));
    loop {
        std::thread::park();
    }
}

/// Waits (bounded) until the broker has read all that was sent on `s`;
/// false if it has not within the tests' bound.
fn read_by_the_broker(s: &std::os::unix::net::UnixStream) -> bool {
    let deadline = std::time::Instant::now() + zrpc_tests::WAIT;
    while zrpc_io::fdpass::unread_sent(s.as_raw_fd()).is_ok_and(|n| n > 0) {
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    true
}

/// Writes `batch` `times` over `s`, first growing the broker's read buffer
/// for it to 16 MiB (a ladder of frames without payload, each larger than
/// the last), and ending every write inside a frame: a buffer that never
/// empties is never dropped, and before reads were bounded each of them
/// took all that the socket held (up to the send buffer: 4 MiB asked here,
/// as much as the system's `wmem_max` allows) as one batch of the
/// broker's thread.
pub fn ragged(s: &mut std::os::unix::net::UnixStream, batch: &[u8], times: u64) {
    set_buffer(s, libc::SO_SNDBUF, 4 << 20);
    let mut ladder = Vec::new();
    let mut n = 12.0 * 1024.0;
    for _ in 0..12 {
        ladder.extend_from_slice(&padded_pong(n as usize));
        n *= 1.9;
    }
    let cut = batch.len() - 3;
    ladder.extend_from_slice(&batch[..cut]);
    if s.write_all(&ladder).is_err() {
        return;
    }
    let mut turn = batch[cut..].to_vec();
    turn.extend_from_slice(&batch[..cut]);
    for _ in 1..times {
        if s.write_all(&turn).is_err() {
            return;
        }
    }
    let _ = s.write_all(&batch[cut..]);
}

/// On each of `conns` connections (a receive buffer of 4 KiB asked), calls
/// to a service of its own answered with 8,000 bytes each, `mib` MiB of
/// answers in all, left unread until all are answered (they queue in the
/// broker); then all of them read but the last `leave` bytes. Prints
/// "pinned N" once done on N connections; stays, reading nothing more.
pub fn backlog(conns: usize, mib: usize, leave: usize) {
    use std::io::Read;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use zrpc_proto::Envelope;
    let name = format!("backlog{}", std::process::id());
    let mut svc = connect(None);
    zrpc_tests::raw::register(&mut svc, &name);
    let answered = Arc::new(AtomicU64::new(0));
    let payload = {
        let mut p = vec![0xc5, 0x1f, 0x38]; // bin 16 of 7,992 bytes
        p.resize(3 + 7992, 7);
        p
    };
    {
        let (answered, payload) = (answered.clone(), payload.clone());
        let _ = svc.s.set_read_timeout(None);
        std::thread::spawn(move || {
            while let Some(f) = svc.recv_frame() {
                match f.decode() {
                    Ok(Envelope::Request { id, .. }) => {
                        let reply = Envelope::Reply {
                            id,
                            code: None,
                            message: "",
                        };
                        svc.send(&reply, &payload);
                        answered.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(Envelope::Ping { nonce }) => svc.send(&Envelope::Pong { nonce }, b""),
                    _ => {}
                }
            }
        });
    }
    let calls = (mib << 20) / payload.len();
    let mut held = Vec::with_capacity(conns);
    for _ in 0..conns {
        let mut c = connect(None);
        set_buffer(&c.s, libc::SO_RCVBUF, 4096);
        let before = answered.load(Ordering::SeqCst);
        let mut out = bytes::BytesMut::new();
        let mut total = 0;
        for id in 1..=calls as u64 {
            let call = Envelope::Call {
                id,
                service: &name,
                method: "m",
                timeout_ms: Some(600_000),
                flags: 0,
            };
            zrpc_proto::encode_frame(&mut out, &call, b"\xc0");
            let mut result = bytes::BytesMut::new();
            let env = Envelope::Result {
                id,
                code: None,
                message: "",
            };
            zrpc_proto::encode_frame(&mut result, &env, &payload);
            total += result.len();
        }
        if c.s.write_all(&out).is_err() {
            return say("refused");
        }
        let deadline = std::time::Instant::now() + zrpc_tests::WAIT;
        while answered.load(Ordering::SeqCst) < before + calls as u64 {
            if std::time::Instant::now() > deadline {
                return say("unanswered");
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        // All but `leave` bytes of the answers.
        let mut left = total - leave.min(total);
        let mut buf = vec![0u8; 1 << 16];
        while left > 0 {
            match c.s.read(&mut buf[..left.min(1 << 16)]) {
                Ok(0) | Err(_) => return say("closed"),
                Ok(n) => left -= n,
            }
        }
        held.push(c);
    }
    say(&format!("pinned {}", held.len()));
    loop {
        std::thread::park();
    }
}

/// Asks for a socket buffer (`SO_SNDBUF` or `SO_RCVBUF`) of `bytes`; the
/// kernel caps it (`wmem_max`, `rmem_max`) for a user other than root.
fn set_buffer(s: &std::os::unix::net::UnixStream, opt: libc::c_int, bytes: libc::c_int) {
    // SAFETY: setsockopt with a pointer to a live c_int and its size.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&bytes as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}
