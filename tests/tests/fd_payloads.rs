//! Large payloads in sealed memfds through the real `zrpcd`, spoken at the
//! frame level: the broker forwards the descriptor to a peer that
//! negotiated descriptor passing and inlines the bytes for one that did
//! not; descriptors that are not sealed memfds, and floods of them, get a
//! typed `Fatal` or `LimitExceeded`, and the broker keeps no descriptor
//! once the peers are gone.

use std::io::Write;
use std::os::fd::OwnedFd;

use zrpc_io::fdpass::SealedFd;
use zrpc_proto::{caps, Envelope, ErrorCode};
use zrpc_tests::raw::Raw;
use zrpc_tests::{wait_until, Broker, WAIT};

/// A MessagePack `bin` value of `n` bytes with a recognisable pattern.
fn bin_payload(n: usize, seed: u8) -> Vec<u8> {
    let data: Vec<u8> = (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    rmp_serde::to_vec(&serde_bytes::Bytes::new(&data)).expect("encode")
}

/// The payload of a frame: its descriptor's bytes (verified and mapped, as
/// a library does) or its inline bytes. Returns (bytes, came in a fd).
fn payload_of(f: &zrpc_proto::Frame, fd: Option<OwnedFd>) -> (Vec<u8>, bool) {
    match fd {
        Some(fd) => {
            let s = SealedFd::verify(fd, 64 << 20).expect("a sealed memfd from the broker");
            (s.map().expect("map").to_vec(), true)
        }
        None => (f.payload.to_vec(), false),
    }
}

/// The next `Request` (answering pings): its id, payload and whether the
/// payload came in a descriptor.
fn next_request(r: &mut Raw) -> (u64, Vec<u8>, bool) {
    loop {
        let (f, fd) = r.recv_frame_fd().expect("a Request frame");
        match f.decode().expect("envelope") {
            Envelope::Request { id, .. } => {
                let (p, in_fd) = payload_of(&f, fd);
                return (id, p, in_fd);
            }
            Envelope::Ping { nonce } => r.send(&Envelope::Pong { nonce }, b""),
            other => panic!("expected Request, got {other:?}"),
        }
    }
}

/// The next `Result`: id, code, payload, whether it came in a descriptor.
fn next_result(r: &mut Raw) -> (u64, Option<ErrorCode>, Vec<u8>, bool) {
    loop {
        let (f, fd) = r.recv_frame_fd().expect("a Result frame");
        if let Ok(Envelope::Result { id, code, .. }) = f.decode() {
            let (p, in_fd) = payload_of(&f, fd);
            return (id, code, p, in_fd);
        }
    }
}

fn call_env<'a>(id: u64, service: &'a str) -> Envelope<'a> {
    Envelope::Call {
        id,
        service,
        method: "echo",
        timeout_ms: Some(10_000),
        flags: 0,
    }
}

/// Open descriptors of process `pid`.
fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("the broker's /proc/pid/fd")
        .count()
}

#[test]
fn descriptors_are_forwarded_to_peers_that_take_them_and_inlined_for_the_others() {
    let broker = Broker::start();
    let pid = broker.proc.pid();
    let baseline = fd_count(pid);

    let (mut fast, accepted) = Raw::hello_fds(broker.dir());
    assert_eq!(
        accepted,
        caps::FD_PAYLOADS,
        "the broker accepts fd payloads"
    );
    zrpc_tests::raw::register(&mut fast, "fdsvc");
    let mut plain = Raw::hello(broker.dir());
    zrpc_tests::raw::register(&mut plain, "plain");
    let (mut client, _) = Raw::hello_fds(broker.dir());

    for (i, size) in [(1u64, 1usize << 20), (2, 8 << 20)] {
        // Client -> broker -> service, all in descriptors.
        let args = bin_payload(size, i as u8);
        let memfd = SealedFd::create(&args).expect("memfd");
        client.send_fd(&call_env(i, "fdsvc"), &memfd, &[]);
        drop(memfd);
        let (bid, got, in_fd) = next_request(&mut fast);
        assert!(in_fd, "a peer that negotiated it gets the descriptor");
        assert!(got == args, "the {size}-byte arguments arrive exactly");
        // And back: the reply in a descriptor too.
        let reply = bin_payload(size, 100 + i as u8);
        let memfd = SealedFd::create(&reply).expect("memfd");
        fast.send_fd(
            &Envelope::Reply {
                id: bid,
                code: None,
                message: "",
            },
            &memfd,
            &[],
        );
        let (id, code, back, in_fd) = next_result(&mut client);
        assert_eq!((id, code, in_fd), (i, None, true));
        assert!(back == reply, "the {size}-byte result arrives exactly");

        // To a service that did not negotiate it: the bytes, inline.
        let memfd = SealedFd::create(&args).expect("memfd");
        client.send_fd(&call_env(10 + i, "plain"), &memfd, &[]);
        let (bid, got, in_fd) = next_request(&mut plain);
        assert!(!in_fd && got == args, "inlined exactly for an older peer");
        plain.send(
            &Envelope::Reply {
                id: bid,
                code: None,
                message: "",
            },
            &reply,
        );
        let (id, code, back, _) = next_result(&mut client);
        assert_eq!((id, code), (10 + i, None));
        assert!(back == reply);
    }
    assert_eq!(client.unclaimed_fds(), 0);
    drop((fast, plain, client));
    assert!(
        wait_until(WAIT, || fd_count(pid) <= baseline),
        "the broker keeps no descriptor: {} open, {baseline} before",
        fd_count(pid)
    );
}

#[test]
fn descriptors_that_are_not_sealed_memfds_are_refused_and_closed() {
    let broker = Broker::start_with(&["--max-fds-per-conn", "4"]);
    let pid = broker.proc.pid();
    let baseline = fd_count(pid);
    let payload = bin_payload(100_000, 7);

    // A memfd that is not sealed: its bytes could change after sending.
    let (mut r, _) = Raw::hello_fds(broker.dir());
    let fd = rustix::fs::memfd_create(
        "unsealed",
        rustix::fs::MemfdFlags::CLOEXEC | rustix::fs::MemfdFlags::ALLOW_SEALING,
    )
    .expect("memfd");
    std::fs::File::from(fd.try_clone().expect("dup"))
        .write_all(&payload)
        .expect("write");
    r.send_fd(&call_env(1, "nobody"), &fd, &[]);
    let msg = r.expect_fatal(ErrorCode::Protocol);
    assert!(msg.contains("not sealed"), "{msg}");

    // Not a memfd at all: a pipe, a socket.
    let (mut r, _) = Raw::hello_fds(broker.dir());
    let (pipe_r, _pipe_w) = std::io::pipe().expect("pipe");
    r.send_fd(&call_env(1, "nobody"), &pipe_r, &[]);
    let msg = r.expect_fatal(ErrorCode::Protocol);
    assert!(msg.contains("not a memfd"), "{msg}");

    // A flood: more descriptors than frames, past --max-fds-per-conn.
    let (mut r, _) = Raw::hello_fds(broker.dir());
    let one = SealedFd::create(&payload).expect("memfd");
    let extra: Vec<SealedFd> = (0..8)
        .map(|_| SealedFd::create(b"\xc0").expect("memfd"))
        .collect();
    let refs: Vec<&dyn std::os::fd::AsRawFd> = extra
        .iter()
        .map(|s| s as &dyn std::os::fd::AsRawFd)
        .collect();
    r.send_fd(&call_env(1, "nobody"), &one, &refs);
    let msg = r.expect_fatal(ErrorCode::LimitExceeded);
    assert!(msg.contains("--max-fds-per-conn"), "{msg}");

    // Calls that each hold a descriptor while pending: past the limit,
    // the call is refused with LimitExceeded and the connection stays.
    let (mut r, _) = Raw::hello_fds(broker.dir());
    for id in 1..=5u64 {
        let memfd = SealedFd::create(&payload).expect("memfd");
        r.send_fd(&call_env(id, "nobody"), &memfd, &[]);
    }
    let (id, code, _, _) = next_result(&mut r);
    assert_eq!((id, code), (5, Some(ErrorCode::LimitExceeded)));
    let (code, _, _) = r.call(6, "zrpcd", "ping", None);
    assert_eq!(code, None, "the connection is still served");

    // A peer that did not negotiate descriptors and sends some anyway:
    // they are closed unread, and frames with the flag are malformed.
    let mut old = Raw::hello(broker.dir());
    let (code, _, _) = old.call(1, "zrpcd", "ping", None);
    assert_eq!(code, None);
    let memfd = SealedFd::create(&payload).expect("memfd");
    old.send_fd(&call_env(2, "nobody"), &memfd, &[]);
    old.expect_fatal(ErrorCode::Protocol);

    drop(r);
    assert!(
        wait_until(WAIT, || fd_count(pid) <= baseline),
        "refused descriptors are closed: {} open, {baseline} before",
        fd_count(pid)
    );
}

#[test]
fn descriptor_passing_can_be_turned_off() {
    let broker = Broker::start_with(&["--max-fds-per-conn", "0"]);
    let (mut r, accepted) = Raw::hello_fds(broker.dir());
    assert_eq!(accepted, 0, "Welcome accepts no fd payloads");
    let memfd = SealedFd::create(&bin_payload(100_000, 1)).expect("memfd");
    r.send_fd(&call_env(1, "nobody"), &memfd, &[]);
    r.expect_fatal(ErrorCode::Protocol);
}

/// A blob of `n` bytes with a recognisable pattern.
fn blob(n: usize, seed: u8) -> zrpc_client::Blob {
    zrpc_client::Blob::from(
        (0..n)
            .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
            .collect::<Vec<u8>>(),
    )
}

/// Whether `p` points into a mapping of a payload memfd of this process
/// (`/proc/self/maps` names them `/memfd:zrpc-payload`).
fn in_payload_memfd(p: *const u8) -> bool {
    payload_memfd_inode(p).is_some()
}

/// The inode of the payload memfd whose mapping `p` points into, if any
/// (the same inode in two mappings: the same memfd, whatever descriptors
/// carried it).
fn payload_memfd_inode(p: *const u8) -> Option<u64> {
    let maps = std::fs::read_to_string("/proc/self/maps").expect("maps");
    let p = p as usize;
    maps.lines().find_map(|l| {
        let mut cols = l.split_whitespace();
        let (a, b) = cols.next()?.split_once('-')?;
        let (a, b) = (
            usize::from_str_radix(a, 16).ok()?,
            usize::from_str_radix(b, 16).ok()?,
        );
        let inode = cols.nth(3)?.parse().ok()?;
        (a <= p && p < b && l.contains("memfd:zrpc-payload")).then_some(inode)
    })
}

/// A result received in a memfd, sent again, is passed on as that same
/// memfd by the client and echoed back as it by the service: no copy
/// anywhere (the client sees the very same memfd come back). A payload
/// that is not the whole of a received memfd (a part of it) is copied, and
/// comes back exactly.
#[test]
fn a_received_memfd_payload_is_echoed_back_as_the_same_memfd() {
    let (_broker, _svc, rt, c) = echo_setup();
    let n = zrpc_io::fdpass::FD_PAYLOAD_MIN + 1000;
    let b = blob(n, 9);
    let first: zrpc_client::Blob = rt
        .block_on(c.call("echo", "blob", &b, Some(WAIT)))
        .expect("echo");
    assert!(first == b);
    let inode = payload_memfd_inode(first.as_ptr()).expect("the result is in a memfd");
    let again: zrpc_client::Blob = rt
        .block_on(c.call("echo", "blob", &first, Some(WAIT)))
        .expect("echo");
    assert!(again == b, "the same bytes");
    assert_eq!(
        payload_memfd_inode(again.as_ptr()),
        Some(inode),
        "the same memfd came back"
    );
    // A part of it (not the whole memfd): a new memfd, the right bytes.
    let part = zrpc_client::Blob::from(again.clone().into_bytes().slice(1..));
    let back: zrpc_client::Blob = rt
        .block_on(c.call("echo", "blob", &part, Some(WAIT)))
        .expect("echo");
    assert!(back == part, "the part came back exactly");
    let other = payload_memfd_inode(back.as_ptr()).expect("in a memfd");
    assert_ne!(other, inode, "copied into a memfd of its own");
}

/// A broker, the test service registered as `echo`, a multi-thread
/// runtime and an async client connected on it.
fn echo_setup() -> (
    Broker,
    zrpc_tests::Proc,
    tokio::runtime::Runtime,
    zrpc_client::Client,
) {
    let broker = Broker::start();
    let svc = broker.spawn("zrpc-test-svc", &[]);
    zrpc_tests::wait_registered(broker.dir(), "echo", 1);
    let rt = zrpc_tests::runtime();
    let c = rt
        .block_on(zrpc_client::Client::connect_to(broker.dir()))
        .expect("connect");
    (broker, svc, rt, c)
}

/// The libraries use descriptors on their own: the async client and the
/// service negotiate them, echoes of `FD_PAYLOAD_MIN` (1 MiB) and 8 MiB
/// round-trip exactly, and the result the client gets is a view into a
/// memfd mapping (it crossed no socket); half of that goes inline. The
/// blocking client, which does not negotiate them, gets the same bytes
/// inline, to and from the same service.
#[test]
fn library_echoes_of_large_blobs_travel_in_memfds_and_inline_for_the_blocking_client() {
    let (broker, _svc, rt, c) = echo_setup();
    let bc = zrpc_client::BlockingClient::connect_to(broker.dir()).expect("connect blocking");
    let min = zrpc_io::fdpass::FD_PAYLOAD_MIN;
    for (i, n) in [(1u8, min), (2, 8 << 20), (3, min / 2)] {
        let b = blob(n, i);
        let back: zrpc_client::Blob = rt
            .block_on(c.call("echo", "blob", &b, Some(WAIT)))
            .expect("echo");
        assert!(back == b, "{n} bytes came back exactly");
        assert_eq!(
            in_payload_memfd(back.as_ptr()),
            n >= min,
            "the {n}-byte result is a view into a payload memfd iff >= {min} bytes"
        );
        let back: zrpc_client::Blob = bc.call("echo", "blob", &b, Some(WAIT)).expect("echo");
        assert!(
            back == b,
            "{n} bytes came back exactly to the blocking client"
        );
        assert!(!in_payload_memfd(back.as_ptr()), "inline for it");
    }
}

/// A large call in flight while the broker is killed and restarted is
/// resubmitted with its payload (the client keeps its sealed memfd and
/// sends it again to the new broker: the first broker's copy of the
/// descriptor died with it), and answered exactly once: the service ran it
/// once. For 1 MiB (the size) and 3 MiB.
#[test]
fn a_large_call_resubmitted_after_a_broker_restart_is_answered_exactly_once() {
    resubmitted_once((1 << 20) + 100, 4241);
    resubmitted_once(3 << 20, 4242);
}

fn resubmitted_once(size: usize, key: u64) {
    let mut broker = Broker::start();
    let _svc = broker.spawn("zrpc-test-svc", &[]);
    zrpc_tests::wait_registered(broker.dir(), "echo", 1);
    let rt = zrpc_tests::runtime();
    let c = rt
        .block_on(zrpc_client::Client::connect_to(broker.dir()))
        .expect("connect");
    let b = blob(size, key as u8);
    let call = {
        let (c, b) = (c.clone(), b.clone());
        rt.spawn(async move {
            c.call::<_, (u64, zrpc_client::Blob)>(
                "echo",
                "record_blob",
                &(key, 1500u64, b),
                Some(std::time::Duration::from_secs(30)),
            )
            .await
        })
    };
    // The call is running at the service when the broker dies.
    assert!(
        wait_until(WAIT, || {
            let bc = zrpc_client::BlockingClient::connect_to(broker.dir()).expect("connect");
            bc.call::<_, u64>("echo", "executions", &key, Some(WAIT))
                .is_ok_and(|n| n == 1)
        }),
        "the call reached the service"
    );
    broker.restart(libc::SIGKILL);
    let (n, back) = rt
        .block_on(call)
        .expect("task")
        .expect("the call succeeds after the restart");
    assert!(
        back == b,
        "the resubmitted call still had its {size}-byte payload"
    );
    assert_eq!(n, 1, "answered from the first execution");
    zrpc_tests::wait_registered(broker.dir(), "echo", 1);
    let bc = zrpc_client::BlockingClient::connect_to(broker.dir()).expect("connect");
    let runs: u64 = bc
        .call("echo", "executions", &key, Some(WAIT))
        .expect("executions");
    assert_eq!(runs, 1, "the service ran the call exactly once");
}
