//! The raw UNIX-socket relay baseline: the floor for any broker design.
//!
//! Frames are `[body_len u32 BE][tag u32][id u64][payload]` with
//! `body_len = 12 + payload length`. A connection first sends one role byte,
//! `S` (the echo server; the relay answers `K`) or `C` (a client). The relay
//! overwrites `tag` of a client's frame with the client's slot (4 bytes
//! rewritten in place, like a broker rewriting a call id) and sends it to the
//! server; the server echoes frames unchanged; the relay sends each echoed
//! frame to the client named by its tag. Nothing is (de)serialised.
//!
//! The relay is a hand-written, single-threaded, level-triggered `epoll`
//! loop over non-blocking sockets: per readable connection one `read` of
//! whatever is available (into a reused buffer), every complete frame
//! appended to its destination's outbound buffer, and after each
//! `epoll_wait` batch one `write` per destination carrying all its frames.
//! A large frame whose destination has nothing queued is written straight
//! from the read buffer (no copy), as a broker forwarding a payload by
//! reference would.

use std::io::{IoSlice, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use crate::util::{barrier, die, mono_ns, ClientResult};

/// Bytes before the payload: body_len, tag, id.
pub const RAW_HEADER: usize = 16;
/// Frames at least this large are written from the read buffer directly.
const DIRECT_MIN: usize = 64 * 1024;
/// Read buffer size for ordinary reads.
const READ_BUF: usize = 256 * 1024;

fn frame_len(buf: &[u8]) -> Option<usize> {
    if buf.len() < 4 {
        return None;
    }
    Some(4 + u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize)
}

#[derive(PartialEq, Eq, Clone, Copy)]
enum Role {
    Unknown,
    Client,
    Server,
}

struct RConn {
    stream: UnixStream,
    role: Role,
    rbuf: Vec<u8>,
    rlen: usize,
    out: Vec<u8>,
    out_off: usize,
    /// EPOLLOUT is armed (a previous write was partial).
    blocked: bool,
    dirty: bool,
}

fn epoll_ctl(ep: i32, op: i32, fd: i32, events: u32, data: u64) {
    let mut ev = libc::epoll_event { events, u64: data };
    // SAFETY: valid epoll fd and event struct; errors are ignored (a closed
    // connection is dropped anyway).
    unsafe { libc::epoll_ctl(ep, op, fd, &mut ev) };
}

fn write_some(stream: &UnixStream, buf: &[u8]) -> Result<usize, ()> {
    match (&*stream).write(buf) {
        Ok(n) => Ok(n),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(0),
        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ok(0),
        Err(_) => Err(()),
    }
}

/// Runs the relay on `path` until killed.
pub fn relay(path: &Path) {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).unwrap_or_else(|e| die(format!("relay bind: {e}")));
    listener.set_nonblocking(true).ok();
    // SAFETY: plain syscall.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if ep < 0 {
        die("epoll_create1 failed");
    }
    const LISTENER: u64 = u64::MAX;
    epoll_ctl(
        ep,
        libc::EPOLL_CTL_ADD,
        listener.as_raw_fd(),
        libc::EPOLLIN as u32,
        LISTENER,
    );
    let mut conns: Vec<Option<RConn>> = Vec::new();
    let mut server: Option<usize> = None;
    let mut dirty: Vec<usize> = Vec::new();
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 64];
    println!("ready");
    let _ = std::io::stdout().flush();
    loop {
        // SAFETY: `events` is a valid buffer of 64 entries.
        let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), 64, -1) };
        if n < 0 {
            continue;
        }
        for ev in &events[..n as usize] {
            let (flags, slot) = (ev.events, ev.u64);
            if slot == LISTENER {
                while let Ok((s, _)) = listener.accept() {
                    s.set_nonblocking(true).ok();
                    let idx = conns.iter().position(|c| c.is_none()).unwrap_or_else(|| {
                        conns.push(None);
                        conns.len() - 1
                    });
                    epoll_ctl(
                        ep,
                        libc::EPOLL_CTL_ADD,
                        s.as_raw_fd(),
                        libc::EPOLLIN as u32,
                        idx as u64,
                    );
                    conns[idx] = Some(RConn {
                        stream: s,
                        role: Role::Unknown,
                        rbuf: vec![0; READ_BUF],
                        rlen: 0,
                        out: Vec::new(),
                        out_off: 0,
                        blocked: false,
                        dirty: false,
                    });
                }
                continue;
            }
            let slot = slot as usize;
            if flags & libc::EPOLLOUT as u32 != 0 {
                flush_one(ep, &mut conns, slot);
            }
            if flags & (libc::EPOLLIN | libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0
                && !on_readable(&mut conns, slot, &mut server, &mut dirty)
            {
                if let Some(c) = conns[slot].take() {
                    epoll_ctl(ep, libc::EPOLL_CTL_DEL, c.stream.as_raw_fd(), 0, 0);
                }
                if server == Some(slot) {
                    server = None;
                }
            }
        }
        for d in dirty.drain(..) {
            if let Some(c) = conns[d].as_mut() {
                c.dirty = false;
            }
            flush_one(ep, &mut conns, d);
        }
    }
}

/// Writes what is queued for `slot` with one `write`; arms or disarms
/// EPOLLOUT as needed.
fn flush_one(ep: i32, conns: &mut [Option<RConn>], slot: usize) {
    let Some(c) = conns.get_mut(slot).and_then(|c| c.as_mut()) else {
        return;
    };
    if c.out_off < c.out.len() {
        match write_some(&c.stream, &c.out[c.out_off..]) {
            Ok(n) => c.out_off += n,
            Err(()) => {
                c.out.clear();
                c.out_off = 0;
            }
        }
    }
    let pending = c.out_off < c.out.len();
    if !pending {
        c.out.clear();
        c.out_off = 0;
    }
    if pending != c.blocked {
        c.blocked = pending;
        let ev = if pending {
            (libc::EPOLLIN | libc::EPOLLOUT) as u32
        } else {
            libc::EPOLLIN as u32
        };
        epoll_ctl(
            ep,
            libc::EPOLL_CTL_MOD,
            c.stream.as_raw_fd(),
            ev,
            slot as u64,
        );
    }
}

/// Handles a readable connection. Returns false when it closed.
fn on_readable(
    conns: &mut [Option<RConn>],
    slot: usize,
    server: &mut Option<usize>,
    dirty: &mut Vec<usize>,
) -> bool {
    let Some(c) = conns[slot].as_mut() else {
        return false;
    };
    // Make room for a large incomplete frame.
    if let Some(need) = frame_len(&c.rbuf[..c.rlen]) {
        if need > c.rbuf.len() {
            c.rbuf.resize(need, 0);
        }
    }
    let n = match (&c.stream).read(&mut c.rbuf[c.rlen..]) {
        Ok(0) => return false,
        Ok(n) => n,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return true,
        Err(_) => return false,
    };
    c.rlen += n;
    let mut off = 0;
    if c.role == Role::Unknown {
        c.role = if c.rbuf[0] == b'S' {
            Role::Server
        } else {
            Role::Client
        };
        off = 1;
        if c.role == Role::Server {
            *server = Some(slot);
            let _ = (&c.stream).write_all(b"K");
        }
    }
    let role = c.role;
    // Take the read buffer out so destinations can be borrowed mutably.
    let mut rbuf = std::mem::take(&mut c.rbuf);
    let rlen = c.rlen;
    while let Some(len) = frame_len(&rbuf[off..rlen]) {
        if off + len > rlen {
            break;
        }
        let frame = &mut rbuf[off..off + len];
        let dest = if role == Role::Client {
            frame[4..8].copy_from_slice(&(slot as u32).to_be_bytes());
            *server
        } else {
            Some(u32::from_be_bytes([frame[4], frame[5], frame[6], frame[7]]) as usize)
        };
        off += len;
        let Some(d) = dest.and_then(|d| conns.get_mut(d)).and_then(|d| d.as_mut()) else {
            continue;
        };
        let frame = &*frame;
        if len >= DIRECT_MIN && d.out.len() == d.out_off && !d.blocked {
            // Forward the large frame from the read buffer itself.
            match write_some(&d.stream, frame) {
                Ok(w) if w < len => d.out.extend_from_slice(&frame[w..]),
                _ => {}
            }
            if !d.out.is_empty() && !d.dirty {
                d.dirty = true;
                dirty.push(dest.unwrap_or(0));
            }
        } else {
            d.out.extend_from_slice(frame);
            if !d.dirty {
                d.dirty = true;
                dirty.push(dest.unwrap_or(0));
            }
        }
    }
    let Some(c) = conns[slot].as_mut() else {
        return false;
    };
    rbuf.copy_within(off..rlen, 0);
    c.rlen = rlen - off;
    c.rbuf = rbuf;
    if c.rlen == 0 && c.rbuf.len() > READ_BUF {
        c.rbuf = vec![0; READ_BUF];
    }
    true
}

/// The raw echo server: connects to the relay, then echoes every complete
/// frame back, all complete frames of one read with one write.
pub fn server(path: &Path) {
    let mut s = UnixStream::connect(path).unwrap_or_else(|e| die(format!("connect relay: {e}")));
    s.write_all(b"S").unwrap_or_else(|e| die(e));
    let mut k = [0u8; 1];
    s.read_exact(&mut k).unwrap_or_else(|e| die(e));
    println!("ready");
    let _ = std::io::stdout().flush();
    let mut buf = vec![0u8; READ_BUF];
    let mut len = 0;
    loop {
        if let Some(need) = frame_len(&buf[..len]) {
            if need > buf.len() {
                buf.resize(need, 0);
            }
        }
        let n = match s.read(&mut buf[len..]) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        len += n;
        let mut off = 0;
        while let Some(l) = frame_len(&buf[off..len]) {
            if off + l > len {
                break;
            }
            off += l;
        }
        if off > 0 {
            if s.write_all(&buf[..off]).is_err() {
                return;
            }
            buf.copy_within(off..len, 0);
            len -= off;
        }
    }
}

/// The raw client: `inflight` frames outstanding, `warmup` then `calls`
/// measured, payload of `size` bytes. Everything that completes in one read
/// is answered with one write of the replacement frames.
pub fn client(path: &Path, inflight: usize, warmup: usize, calls: usize, size: usize) {
    let mut s = UnixStream::connect(path).unwrap_or_else(|e| die(format!("connect relay: {e}")));
    s.write_all(b"C").unwrap_or_else(|e| die(e));
    let payload = vec![0x5au8; size];
    let mut rbuf = vec![0u8; READ_BUF.max(2 * (size + RAW_HEADER))];
    let mut run = |n: usize, lat: &mut Vec<u64>| {
        let mut sent_at = vec![0u64; n];
        let mut sent = 0usize;
        let mut done = 0usize;
        let mut wbuf: Vec<u8> = Vec::with_capacity(inflight * (RAW_HEADER + size.min(4096)));
        let mut rlen = 0usize;
        let queue = |wbuf: &mut Vec<u8>, id: usize, sent_at: &mut [u64]| {
            sent_at[id] = mono_ns();
            wbuf.extend_from_slice(&((12 + size) as u32).to_be_bytes());
            wbuf.extend_from_slice(&0u32.to_be_bytes());
            wbuf.extend_from_slice(&(id as u64).to_be_bytes());
            if size < DIRECT_MIN {
                wbuf.extend_from_slice(&payload);
            }
        };
        let send = |s: &mut UnixStream, wbuf: &mut Vec<u8>| {
            if size < DIRECT_MIN {
                s.write_all(wbuf).unwrap_or_else(|e| die(e));
            } else {
                // Header and payload in one writev per frame.
                for hdr in wbuf.chunks(RAW_HEADER) {
                    write_all_vectored(s, hdr, &payload);
                }
            }
            wbuf.clear();
        };
        while sent < inflight.min(n) {
            queue(&mut wbuf, sent, &mut sent_at);
            sent += 1;
        }
        send(&mut s, &mut wbuf);
        while done < n {
            if let Some(need) = frame_len(&rbuf[..rlen]) {
                if need > rbuf.len() {
                    rbuf.resize(need, 0);
                }
            }
            let r = s.read(&mut rbuf[rlen..]).unwrap_or_else(|e| die(e));
            if r == 0 {
                die("relay closed the connection");
            }
            rlen += r;
            let mut off = 0;
            while let Some(l) = frame_len(&rbuf[off..rlen]) {
                if off + l > rlen {
                    break;
                }
                let f = &rbuf[off..off + l];
                let id = u64::from_be_bytes(f[8..16].try_into().unwrap_or([0; 8])) as usize;
                if l != RAW_HEADER + size || id >= n {
                    die("bad echo frame");
                }
                lat.push(mono_ns() - sent_at[id]);
                done += 1;
                off += l;
                if sent < n {
                    queue(&mut wbuf, sent, &mut sent_at);
                    sent += 1;
                }
            }
            rbuf.copy_within(off..rlen, 0);
            rlen -= off;
            if !wbuf.is_empty() {
                send(&mut s, &mut wbuf);
            }
        }
    };
    let mut lat = Vec::with_capacity(calls.max(warmup));
    run(warmup, &mut lat);
    lat.clear();
    barrier();
    let start = mono_ns();
    run(calls, &mut lat);
    let end = mono_ns();
    println!(
        "{}",
        ClientResult::from_latencies(lat, start, end).to_line()
    );
}

fn write_all_vectored(s: &mut UnixStream, hdr: &[u8], payload: &[u8]) {
    let total = hdr.len() + payload.len();
    let mut done = 0;
    while done < total {
        let n = if done < hdr.len() {
            s.write_vectored(&[IoSlice::new(&hdr[done..]), IoSlice::new(payload)])
        } else {
            s.write(&payload[done - hdr.len()..])
        };
        match n {
            Ok(0) => die("write returned 0"),
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => die(e),
        }
    }
}
