//! The subcommands about payload descriptors: `fd-hog`, `fd-serve`,
//! `fd-get`, `junk-fd` and `junk-together` (see the module docs of
//! `main.rs`).

use zrpc_proto::Envelope;
use zrpc_tests::raw::Raw;

use super::{connect_caps, say};

/// `fd-hog`: see the module docs.
pub fn fd_hog(
    count: u64,
    clients: u64,
    mut paced: bool,
    junk: bool,
    size: usize,
    plain_client: bool,
) {
    use std::os::fd::AsRawFd;
    let mut svc = connect_caps(None, zrpc_proto::caps::FD_PAYLOADS);
    svc.send(
        &Envelope::Register {
            req: 1,
            name: "hog",
            shared: false,
        },
        b"",
    );
    let client_caps = if plain_client {
        0
    } else {
        zrpc_proto::caps::FD_PAYLOADS
    };
    let mut held = Vec::new();
    for k in 0..clients {
        let instance = (1 << 33) | (k << 40) | u64::from(std::process::id());
        let mut cli = connect_caps(Some(instance), client_caps);
        for id in 1..=count {
            let call = Envelope::Call {
                id,
                service: "hog",
                method: "m",
                timeout_ms: None,
                flags: 0,
            };
            cli.send(&call, b"\xc0");
        }
        held.push(cli);
    }
    let count = count * clients;
    // Bytes the clients have been sent and not read.
    let unread = |held: &[Raw]| -> i64 {
        held.iter()
            .map(|c| {
                let mut n: libc::c_int = 0;
                // SAFETY: FIONREAD writes one int to the pointer given,
                // which points at `n`, alive for the call.
                unsafe { libc::ioctl(c.s.as_raw_fd(), libc::FIONREAD, &mut n as *mut libc::c_int) };
                i64::from(n)
            })
            .sum()
    };
    let memfd = zrpc_io::fdpass::SealedFd::create(&vec![0xc0; size.max(1)]).expect("memfd");
    let mut sent = 0;
    while sent < count {
        let Some(f) = svc.recv_frame() else { break };
        match f.decode() {
            Ok(Envelope::Request { id, .. }) => {
                let reply = Envelope::Reply {
                    id,
                    code: None,
                    message: "",
                };
                let mut out = bytes::BytesMut::new();
                zrpc_proto::encode_fd_header(&mut out, &reply);
                let fds = [memfd.as_raw_fd()];
                let before = unread(&held);
                if zrpc_io::fdpass::send_with_fds(svc.s.as_raw_fd(), &[&out], &fds).is_err() {
                    break;
                }
                sent += 1;
                if paced {
                    let t = std::time::Instant::now();
                    while unread(&held) <= before {
                        if t.elapsed() > std::time::Duration::from_secs(2) {
                            // The answer went nowhere (a client was
                            // closed): no pacing from now on.
                            paced = false;
                            break;
                        }
                        std::thread::yield_now();
                    }
                }
            }
            Ok(Envelope::Ping { nonce }) => svc.send(&Envelope::Pong { nonce }, b""),
            Ok(Envelope::Fatal { .. }) => break,
            _ => {}
        }
    }
    say(&format!("hogged {sent}"));
    if junk {
        for c in &mut held {
            // An envelope that is not an array: Fatal{Protocol}.
            let _ = std::io::Write::write_all(&mut c.s, b"\x00\x00\x00\x01\x00\x00\x00\x01\xc1");
        }
    }
    // Stays, the clients never reading, until killed.
    loop {
        std::thread::sleep(std::time::Duration::from_secs(60));
    }
}

/// `fd-serve`: see the module docs.
pub fn fd_serve(name: &str, size: usize) {
    use std::os::fd::AsRawFd;
    let mut svc = connect_caps(None, zrpc_proto::caps::FD_PAYLOADS);
    svc.send(
        &Envelope::Register {
            req: 1,
            name,
            shared: false,
        },
        b"",
    );
    let memfd = zrpc_io::fdpass::SealedFd::create(&vec![0xc0u8; size]).expect("memfd");
    loop {
        let Some((f, fd)) = svc.recv_frame_fd() else {
            return;
        };
        drop(fd);
        match f.decode() {
            Ok(Envelope::Ack { code: None, .. }) => say("ack ok"),
            Ok(Envelope::Ack {
                code: Some(c),
                message,
                ..
            }) => return say(&format!("ack {c} {message}")),
            Ok(Envelope::Request { id, .. }) => {
                let reply = Envelope::Reply {
                    id,
                    code: None,
                    message: "",
                };
                let mut out = bytes::BytesMut::new();
                zrpc_proto::encode_fd_header(&mut out, &reply);
                let fds = [memfd.as_raw_fd()];
                if zrpc_io::fdpass::send_with_fds(svc.s.as_raw_fd(), &[&out], &fds).is_err() {
                    return;
                }
            }
            Ok(Envelope::Ping { nonce }) => svc.send(&Envelope::Pong { nonce }, b""),
            Ok(Envelope::Fatal { code, message }) => {
                return say(&format!("fatal {code} {message}"))
            }
            _ => {}
        }
    }
}

/// `fd-get`: see the module docs.
pub fn fd_get(service: &str) {
    let mut r = connect_caps(None, zrpc_proto::caps::FD_PAYLOADS);
    let call = Envelope::Call {
        id: 1,
        service,
        method: "m",
        timeout_ms: Some(10_000),
        flags: 0,
    };
    r.send(&call, b"\xc0");
    loop {
        let Some((f, fd)) = r.recv_frame_fd() else {
            return say("fatal closed");
        };
        match f.decode() {
            Ok(Envelope::Result { code: None, .. }) => {
                let line = match fd {
                    Some(fd) => {
                        let len = std::fs::File::from(fd).metadata().map_or(0, |m| m.len());
                        format!("result ok fd {len}")
                    }
                    None => format!("result ok inline {}", f.payload.len()),
                };
                return say(&line);
            }
            Ok(Envelope::Result {
                code: Some(c),
                message,
                ..
            }) => return say(&format!("result {c} {message}")),
            Ok(Envelope::Fatal { code, message }) => {
                return say(&format!("fatal {code} {message}"));
            }
            _ => {}
        }
    }
}

/// `junk-fd`: see the module docs.
pub fn junk_fd(path: &str, count: usize, per_conn: u64, plain: bool) {
    use std::os::fd::AsRawFd;
    let dir = zrpc_proto::resolve_socket_dir(None);
    let caps = if plain {
        0
    } else {
        zrpc_proto::caps::FD_PAYLOADS
    };
    for _ in 0..count {
        let mut r = Raw::connect(&dir);
        // Everything at once, before any answer: a connection the broker
        // refuses at accept has the descriptors in its socket unread.
        let mut out = bytes::BytesMut::new();
        let hello = Envelope::Hello {
            version: zrpc_proto::PROTOCOL_VERSION,
            instance: (1 << 34) | u64::from(std::process::id()),
            agent: "junk",
            caps,
        };
        zrpc_proto::encode_frame(&mut out, &hello, b"");
        let mut sent_all = std::io::Write::write_all(&mut r.s, &out).is_ok();
        for nonce in 1..=per_conn {
            let file = std::fs::File::open(path).expect("open the junk file");
            let mut ping = bytes::BytesMut::new();
            zrpc_proto::encode_frame(&mut ping, &Envelope::Ping { nonce }, b"");
            let fds = [file.as_raw_fd()];
            sent_all &= zrpc_io::fdpass::send_with_fds(r.s.as_raw_fd(), &[&ping], &fds).is_ok();
        }
        if !sent_all {
            say("unsent");
        }
        let mut pongs = 0;
        let line = loop {
            let Some(f) = r.recv_frame() else {
                break "fatal closed".to_string();
            };
            match f.decode() {
                Ok(Envelope::Pong { .. }) => {
                    pongs += 1;
                    if pongs == per_conn {
                        break format!("pong {pongs}");
                    }
                }
                Ok(Envelope::Fatal { code, message }) => break format!("fatal {code} {message}"),
                _ => {}
            }
        };
        say(&line);
    }
}

/// `junk-together`: see the module docs.
pub fn junk_together(path: &str, count: usize, per_conn: usize) {
    use std::os::fd::AsRawFd;
    let dir = zrpc_proto::resolve_socket_dir(None);
    // All greeted (admitted) before any descriptor is sent.
    let mut conns: Vec<Raw> = (0..count)
        .map(|_| {
            let mut r = Raw::connect(&dir);
            r.handshake();
            r
        })
        .collect();
    for r in &mut conns {
        let files: Vec<std::fs::File> = (0..per_conn)
            .map(|_| std::fs::File::open(path).expect("open the junk file"))
            .collect();
        let fds: Vec<i32> = files.iter().map(|f| f.as_raw_fd()).collect();
        let mut ping = bytes::BytesMut::new();
        zrpc_proto::encode_frame(&mut ping, &Envelope::Ping { nonce: 1 }, b"");
        if zrpc_io::fdpass::send_with_fds(r.s.as_raw_fd(), &[&ping], &fds).is_err() {
            say("unsent");
        }
    }
    for r in &mut conns {
        let line = loop {
            let Some(f) = r.recv_frame() else {
                break "fatal closed".to_string();
            };
            match f.decode() {
                Ok(Envelope::Pong { .. }) => break "pong 1".to_string(),
                Ok(Envelope::Fatal { code, message }) => break format!("fatal {code} {message}"),
                _ => {}
            }
        };
        say(&line);
    }
}

/// A sealed 2 MiB memfd made with `MFD_HUGETLB`, never written (`None` if
/// this kernel makes none).
pub fn huge_memfd() -> Option<std::os::fd::OwnedFd> {
    use rustix::fs::{MemfdFlags, SealFlags};
    let flags = MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING | MemfdFlags::HUGETLB;
    let fd = rustix::fs::memfd_create("zrpc-test-peer", flags).ok()?;
    rustix::fs::ftruncate(&fd, 2 << 20).ok()?;
    let seals = SealFlags::WRITE | SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL;
    rustix::fs::fcntl_add_seals(&fd, seals).ok()?;
    Some(fd)
}
