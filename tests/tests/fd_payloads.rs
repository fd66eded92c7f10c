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
/// Descriptors of the broker `pid` that payloads may have left behind:
/// memfds and pipes past its standard streams (not its sockets and epoll
/// sets, which it opens lazily, so that a count taken right after start
/// may lack one).
fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("the broker's /proc/pid/fd")
        .flatten()
        .filter(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) > Some(2))
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter(|l| {
            let l = l.to_string_lossy();
            l.starts_with("/memfd:") || l.starts_with("pipe:")
        })
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
    echoed_back_as_the_same_memfd(|b| {
        rt.block_on(c.call("echo", "blob", b, Some(WAIT)))
            .expect("echo")
    });
}

/// The same with the `BlockingClient`: it negotiates descriptors too, its
/// large result arrives in a memfd, and sent again it travels as that
/// memfd.
#[test]
fn a_received_memfd_payload_is_echoed_back_as_the_same_memfd_by_the_blocking_client() {
    let (broker, _svc) = echo_broker(&[]);
    let c = zrpc_client::BlockingClient::connect_to(broker.dir()).expect("connect blocking");
    echoed_back_as_the_same_memfd(|b| c.call("echo", "blob", b, Some(WAIT)).expect("echo"));
}

/// The scenario of the two tests above, with `echo` calling the test
/// service's `blob` method through one client or the other.
fn echoed_back_as_the_same_memfd(echo: impl Fn(&zrpc_client::Blob) -> zrpc_client::Blob) {
    let n = zrpc_io::fdpass::FD_PAYLOAD_MIN + 1000;
    let b = blob(n, 9);
    let first = echo(&b);
    assert!(first == b);
    let inode = payload_memfd_inode(first.as_ptr()).expect("the result is in a memfd");
    let again = echo(&first);
    assert!(again == b, "the same bytes");
    assert_eq!(
        payload_memfd_inode(again.as_ptr()),
        Some(inode),
        "the same memfd came back"
    );
    // A part of it (not the whole memfd): a new memfd, the right bytes.
    let part = zrpc_client::Blob::from(again.clone().into_bytes().slice(1..));
    let back = echo(&part);
    assert!(back == part, "the part came back exactly");
    let other = payload_memfd_inode(back.as_ptr()).expect("in a memfd");
    assert_ne!(other, inode, "copied into a memfd of its own");
}

/// A broker started with `args` and the test service registered as `echo`.
fn echo_broker(args: &[&str]) -> (Broker, zrpc_tests::Proc) {
    let broker = Broker::start_with(args);
    let svc = broker.spawn("zrpc-test-svc", &[]);
    zrpc_tests::wait_registered(broker.dir(), "echo", 1);
    (broker, svc)
}

/// A broker, the test service registered as `echo`, a multi-thread
/// runtime and an async client connected on it.
fn echo_setup() -> (
    Broker,
    zrpc_tests::Proc,
    tokio::runtime::Runtime,
    zrpc_client::Client,
) {
    let (broker, svc) = echo_broker(&[]);
    let rt = zrpc_tests::runtime();
    let c = rt
        .block_on(zrpc_client::Client::connect_to(broker.dir()))
        .expect("connect");
    (broker, svc, rt, c)
}

/// The libraries use descriptors on their own: both clients and the
/// service negotiate them, echoes of `FD_PAYLOAD_MIN` (1 MiB) and 8 MiB
/// round-trip exactly, and the result a client gets is a view into a
/// memfd mapping (it crossed no socket); half of that goes inline.
#[test]
fn library_echoes_of_large_blobs_travel_in_memfds() {
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
        assert_eq!(
            in_payload_memfd(back.as_ptr()),
            n >= min,
            "the blocking client's {n}-byte result is in a payload memfd iff >= {min} bytes"
        );
    }
}

/// With a broker that takes no descriptors (`--max-fds-per-conn 0`), the
/// `BlockingClient`'s large calls and their results travel inline, and
/// arrive exactly; so does a payload that is a memfd received earlier
/// from a broker that did take them (sent inline from its mapping).
#[test]
fn a_blocking_clients_large_calls_go_inline_to_a_broker_without_descriptors() {
    let (broker, _svc) = echo_broker(&["--max-fds-per-conn", "0"]);
    let c = zrpc_client::BlockingClient::connect_to(broker.dir()).expect("connect blocking");
    let (fd_broker, _fd_svc) = echo_broker(&[]);
    let fd_client =
        zrpc_client::BlockingClient::connect_to(fd_broker.dir()).expect("connect blocking");
    let min = zrpc_io::fdpass::FD_PAYLOAD_MIN;
    for (i, n) in [(1u8, min), (2, 3 << 20)] {
        let b = blob(n, i);
        let back: zrpc_client::Blob = c.call("echo", "blob", &b, Some(WAIT)).expect("echo");
        assert!(back == b, "{n} bytes came back exactly");
        assert!(!in_payload_memfd(back.as_ptr()), "inline");
        let in_memfd: zrpc_client::Blob = fd_client
            .call("echo", "blob", &b, Some(WAIT))
            .expect("echo");
        assert!(
            in_payload_memfd(in_memfd.as_ptr()),
            "a memfd from the other broker"
        );
        let back: zrpc_client::Blob = c.call("echo", "blob", &in_memfd, Some(WAIT)).expect("echo");
        assert!(back == b, "a received memfd's {n} bytes, sent inline");
        assert!(!in_payload_memfd(back.as_ptr()), "inline");
    }
}

/// A large call in flight while the broker is killed and restarted is
/// resubmitted with its payload (the client keeps its sealed memfd and
/// sends that same memfd again to the new broker: the first broker's copy
/// of the descriptor died with it), and answered exactly once: the service
/// ran it once. For 1 MiB (the size) and 3 MiB, from either client.
#[test]
fn a_large_call_resubmitted_after_a_broker_restart_is_answered_exactly_once() {
    resubmitted_once((1 << 20) + 100, 4241, Via::Async, &[]);
    resubmitted_once(3 << 20, 4242, Via::Async, &[]);
}

/// The same with the `BlockingClient`.
#[test]
fn a_large_blocking_call_resubmitted_after_a_broker_restart_is_answered_exactly_once() {
    resubmitted_once((1 << 20) + 100, 4243, Via::Blocking, &[]);
    resubmitted_once(3 << 20, 4244, Via::Blocking, &[]);
}

/// A large blocking call sent in a memfd to a broker that dies, and
/// resubmitted to one that takes no descriptors (`--max-fds-per-conn 0`):
/// its payload goes inline, read from the memfd's mapping, exactly once.
#[test]
fn a_large_blocking_call_resubmitted_to_a_broker_without_descriptors_goes_inline() {
    resubmitted_once(3 << 20, 4245, Via::Blocking, &["--max-fds-per-conn", "0"]);
}

/// Which client makes the call of [`resubmitted_once`].
#[derive(Debug, Clone, Copy)]
enum Via {
    Async,
    Blocking,
}

/// The inodes of the payload memfds mapped in this process now.
fn mapped_payload_memfds() -> Vec<u64> {
    let maps = std::fs::read_to_string("/proc/self/maps").expect("maps");
    maps.lines()
        .filter(|l| l.contains("memfd:zrpc-payload"))
        .filter_map(|l| l.split_whitespace().nth(4)?.parse().ok())
        .collect()
}

/// Whether process `pid` holds a descriptor of a file with one of `inodes`
/// (a memfd: the same file as one of this process's mappings).
fn holds_one_of(pid: i32, inodes: &[u64]) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    dir.flatten().any(|e| {
        let memfd = std::fs::read_link(e.path())
            .is_ok_and(|t| t.to_string_lossy().contains("memfd:zrpc-payload"));
        memfd && std::fs::metadata(e.path()).is_ok_and(|m| inodes.contains(&m.ino()))
    })
}

/// A `record_blob` call of `size` bytes made through `via`, running at the
/// service when the broker is killed (SIGKILL) and started again with
/// `restart_args`: it is answered once, with its payload, in a memfd
/// unless the new broker takes no descriptors. While it waits at the new
/// broker, that broker holds the very memfd the client sent the first
/// time (the same file, not a copy).
fn resubmitted_once(size: usize, key: u64, via: Via, restart_args: &[&str]) {
    let (mut broker, _svc) = echo_broker(&[]);
    let rt = zrpc_tests::runtime();
    let b = blob(size, key as u8);
    let args = (key, 3000u64, b.clone());
    let timeout = Some(std::time::Duration::from_secs(30));
    type Answer = zrpc_client::Result<(u64, zrpc_client::Blob)>;
    let answer: Box<dyn FnOnce() -> Answer> = match via {
        Via::Async => {
            let c = rt
                .block_on(zrpc_client::Client::connect_to(broker.dir()))
                .expect("connect");
            let call = rt.spawn(async move { c.call("echo", "record_blob", &args, timeout).await });
            let rt = &rt;
            Box::new(move || rt.block_on(call).expect("task"))
        }
        Via::Blocking => {
            let c = zrpc_client::BlockingClient::connect_to(broker.dir()).expect("connect");
            let call = std::thread::spawn(move || c.call("echo", "record_blob", &args, timeout));
            Box::new(move || call.join().expect("thread"))
        }
    };
    // The call is pending at the broker (delivered to the idle service,
    // which sleeps in it) when the broker dies. Not waited for through
    // `executions`: that method takes `&mut self` too, so it runs only once
    // `record_blob` has returned, and by then the call is answered.
    assert!(
        wait_until(WAIT, || zrpc_tests::broker_stat(broker.dir(), "pending")
            == 1),
        "the call reached the broker"
    );
    let sent = mapped_payload_memfds();
    assert!(!sent.is_empty(), "the pending call keeps its memfd mapped");
    broker.args = restart_args.iter().map(|a| a.to_string()).collect();
    broker.restart(libc::SIGKILL);
    let fds = restart_args.is_empty();
    if fds {
        let pid = broker.proc.pid();
        assert!(
            wait_until(WAIT, || holds_one_of(pid, &sent)),
            "the new broker got the memfd the client sent the first time"
        );
    }
    let (n, back) = answer().expect("the call succeeds after the restart");
    assert!(
        back == b,
        "the resubmitted call still had its {size}-byte payload"
    );
    assert_eq!(n, 1, "answered from the first execution");
    assert_eq!(
        in_payload_memfd(back.as_ptr()),
        fds,
        "the result in a memfd iff the new broker takes descriptors"
    );
    zrpc_tests::wait_registered(broker.dir(), "echo", 1);
    let bc = zrpc_client::BlockingClient::connect_to(broker.dir()).expect("connect");
    let runs: u64 = bc
        .call("echo", "executions", &key, Some(WAIT))
        .expect("executions");
    assert_eq!(runs, 1, "the service ran the call exactly once");
}

/// `n` large echoes (`echo.blob`) from `c`, one thread each, with
/// `timeout`: whether each came back exactly, or its error.
fn echo_threads(
    c: &zrpc_client::BlockingClient,
    n: usize,
    timeout: std::time::Duration,
) -> Vec<std::thread::JoinHandle<zrpc_client::Result<bool>>> {
    (0..n)
        .map(|i| {
            let c = c.clone();
            let b = blob(zrpc_io::fdpass::FD_PAYLOAD_MIN + 10, i as u8);
            std::thread::spawn(move || {
                let r: zrpc_client::Result<zrpc_client::Blob> =
                    c.call("echo", "blob", &b, Some(timeout));
                r.map(|back| back == b)
            })
        })
        .collect()
}

/// Large calls waiting at the broker for a service that has not
/// registered yet (clients that reconnected before it, after a restart)
/// are sent to it with their descriptors right behind its `Ack`: each
/// request gets its own payload. The service used to read the frames that
/// came with the `Ack` without taking their descriptors: the first request
/// ran with no payload and each later one with the previous one's.
#[test]
fn large_calls_waiting_for_a_service_reach_it_with_their_own_payloads() {
    let broker = Broker::start();
    let c = zrpc_client::BlockingClient::connect_to(broker.dir()).expect("connect");
    let calls = echo_threads(&c, 4, std::time::Duration::from_secs(20));
    assert!(
        wait_until(WAIT, || zrpc_tests::broker_stat(broker.dir(), "pending")
            == 4),
        "the calls did not all reach the broker"
    );
    let _svc = broker.spawn("zrpc-test-svc", &[]);
    for call in calls {
        let r = call.join().expect("thread");
        assert!(
            matches!(r, Ok(true)),
            "an echo did not come back exactly: {r:?}"
        );
    }
}

/// More large calls resubmitted at once than the new broker lets one
/// connection hold descriptors for (`--max-fds-per-conn 4`, 6 calls: one
/// `sendmsg` carries all six descriptors): the calls past the limit are
/// answered `LimitExceeded`, the others run. The broker used to count the
/// six as "sent ahead of their frames" before the frames took them and end
/// the connection, and the client resubmitted the same batch on every
/// reconnection until every call timed out.
#[test]
fn calls_resubmitted_past_the_descriptor_limit_are_refused_one_by_one() {
    let (mut broker, _svc) = echo_broker(&[]);
    let c = zrpc_client::BlockingClient::connect_to(broker.dir()).expect("connect");
    let timeout = std::time::Duration::from_secs(30);
    let calls: Vec<_> = (0..6u64)
        .map(|key| {
            let c = c.clone();
            let b = blob(zrpc_io::fdpass::FD_PAYLOAD_MIN + 10, key as u8);
            std::thread::spawn(move || {
                let r: zrpc_client::Result<(u64, zrpc_client::Blob)> = c.call(
                    "echo",
                    "record_blob",
                    &(0x6d0 + key, 500u64, b.clone()),
                    Some(timeout),
                );
                r.map(|(_, back)| back == b)
            })
        })
        .collect();
    // All six pending (the service runs them one at a time, 500 ms each).
    assert!(
        wait_until(WAIT, || zrpc_tests::broker_stat(broker.dir(), "pending")
            == 6),
        "the calls did not all reach the broker"
    );
    broker.args = vec!["--max-fds-per-conn".into(), "4".into()];
    broker.restart(libc::SIGKILL);
    let (mut ok, mut refused) = (0, 0);
    for call in calls {
        match call.join().expect("thread") {
            Ok(true) => ok += 1,
            Err(zrpc_client::Error::LimitExceeded(_)) => refused += 1,
            other => panic!("neither answered exactly nor refused: {other:?}"),
        }
    }
    assert!(refused >= 2, "{refused} of 6 refused past a limit of 4");
    assert!(ok >= 1, "none of the calls within the limit ran");
}

/// Descriptors sent ahead of their frames and never claimed count like
/// held ones: in `--max-fds` (and their user's `fds` quota). Connections
/// that each leave 64 of them unclaimed (within `--max-fds-per-conn`) are
/// ended with `LimitExceeded` once the broker would hold more than
/// `--max-fds` and one message's worth; before, they were counted nowhere
/// and one user could hold every descriptor the broker may open.
#[test]
fn unclaimed_descriptors_count_in_the_brokers_limit() {
    use std::os::fd::AsRawFd;
    let broker = Broker::start_with(&["--max-fds", "64"]);
    let pid = broker.proc.pid();
    let baseline = fd_count(pid);
    let memfd = SealedFd::create(b"\xc0").expect("memfd");
    let mut ping = bytes::BytesMut::new();
    zrpc_proto::encode_frame(&mut ping, &Envelope::Ping { nonce: 1 }, b"");
    let mut alive = Vec::new();
    let mut refused = 0;
    for _ in 0..10 {
        let (mut r, _) = Raw::hello_fds(broker.dir());
        for _ in 0..2 {
            let fds = [memfd.as_raw_fd(); zrpc_io::fdpass::MAX_FDS_PER_MSG];
            // May fail once the broker has ended the connection.
            let _ = zrpc_io::fdpass::send_with_fds(r.s.as_raw_fd(), &[&ping], &fds);
        }
        // The broker has read all of it once it answers a later ping (the
        // write fails if it has ended the connection already).
        let mut pong = bytes::BytesMut::new();
        zrpc_proto::encode_frame(&mut pong, &Envelope::Ping { nonce: 2 }, b"");
        let _ = std::io::Write::write_all(&mut r.s, &pong);
        loop {
            match r.recv_frame().map(|f| f.decode().map(|e| format!("{e:?}"))) {
                Some(Ok(e)) if e.contains("Pong") && e.contains('2') => {
                    alive.push(r);
                    break;
                }
                Some(Ok(e)) if e.contains("Fatal") => {
                    assert!(e.contains("LimitExceeded"), "{e}");
                    refused += 1;
                    break;
                }
                Some(_) => {}
                None => {
                    refused += 1;
                    break;
                }
            }
        }
    }
    let held = fd_count(pid).saturating_sub(baseline);
    assert!(refused > 0, "no connection was refused");
    assert!(
        held <= 64 + zrpc_io::fdpass::MAX_FDS_PER_MSG,
        "the broker holds {held} unclaimed descriptors past --max-fds 64"
    );
}

/// Mappings of memfd payloads the broker holds now (`/proc/PID/maps`).
fn memfd_mappings(b: &Broker) -> usize {
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", b.proc.pid())).expect("maps");
    maps.lines().filter(|l| l.contains("/memfd:")).count()
}

/// A peer that takes no descriptors gets a memfd payload's bytes inline.
/// The broker keeps a mapping for it in the peer's queue only for a large
/// payload and only up to `--max-fds` of them; the rest are copied.
/// Uncounted, mappings escaped every limit (a mapping outlives its
/// descriptor) and, past the kernel's ~65,530 per process, even the
/// allocator failed and the broker aborted: three users answering with
/// 8 KiB memfds to their own clients that never read were enough.
#[test]
fn payload_mappings_kept_for_peers_without_descriptors_are_bounded() {
    // Small memfds: copied, none kept.
    let b = Broker::start();
    let mut hog = b.spawn(
        "zrpc-test-peer",
        &[
            "fd-hog",
            "--count",
            "200",
            "--size",
            "8192",
            "--plain-client",
        ],
    );
    assert_eq!(
        hog.read_until(|l| l.starts_with("hogged")).as_deref(),
        Some("hogged 200")
    );
    assert!(
        wait_until(WAIT, || zrpc_tests::broker_stat(b.dir(), "pending") == 0),
        "the replies were not all handled"
    );
    assert_eq!(memfd_mappings(&b), 0, "small payloads kept mapped");
    assert_eq!(zrpc_tests::broker_stat(b.dir(), "mappings"), 0);
    drop(hog);
    drop(b);
    // Large ones: at most --max-fds kept, the rest copied.
    let b = Broker::start_with(&["--max-fds", "8"]);
    let mut hog = b.spawn(
        "zrpc-test-peer",
        &[
            "fd-hog",
            "--count",
            "20",
            "--size",
            "1048576",
            "--plain-client",
        ],
    );
    assert_eq!(
        hog.read_until(|l| l.starts_with("hogged")).as_deref(),
        Some("hogged 20")
    );
    assert!(
        wait_until(WAIT, || zrpc_tests::broker_stat(b.dir(), "pending") == 0),
        "the replies were not all handled"
    );
    let kept = memfd_mappings(&b);
    assert!(kept <= 8, "{kept} payload mappings kept, past --max-fds 8");
    assert_eq!(zrpc_tests::broker_stat(b.dir(), "mappings"), kept as u64);
}
