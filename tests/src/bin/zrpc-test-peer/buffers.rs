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
/// near the end of the buffer. With `call`, a whole call with a 300-byte
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
        let mut arg = vec![0xc5, 0x01, 0x2c];
        arg.resize(3 + 300, 0);
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
    let size: libc::c_int = 4 << 20;
    // SAFETY: setsockopt with a pointer to a live c_int and its size.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
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
