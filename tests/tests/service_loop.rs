//! The service library's loop against the real broker: `run_once`,
//! `register(fd, callback)` / `unregister` with a pipe, and async `serve`.
//! The service runs in this test process; the broker is the real `zrpcd`.

use std::cell::Cell;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::time::{Duration, Instant};

use zrpc_client::{BlockingClient, Client, Value};
use zrpc_service::{Context, Event, Server, ServiceBuilder};
use zrpc_tests::{wait_registered, Broker, WAIT};

const T: Option<Duration> = Some(Duration::from_secs(20));

fn echo_service() -> zrpc_service::FnService {
    ServiceBuilder::new("looper")
        .method("echo", |_ctx: &Context, v: Value| Ok::<_, String>(v))
        .doc("Returns its argument.")
        .build()
}

fn pipe() -> (RawFd, RawFd) {
    let mut fds = [0; 2];
    // SAFETY: pipe(2) writes two fds into the array.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    (fds[0], fds[1])
}

fn write_byte(fd: RawFd) {
    // SAFETY: writing one byte from a valid buffer to our pipe.
    assert_eq!(unsafe { libc::write(fd, b"x".as_ptr().cast(), 1) }, 1);
}

fn read_byte(fd: RawFd) -> bool {
    let mut b = [0u8; 1];
    // SAFETY: reading one byte into a valid buffer from our pipe.
    unsafe { libc::read(fd, b.as_mut_ptr().cast(), 1) == 1 }
}

#[test]
fn run_once_serves_exactly_one_event_or_times_out() {
    let b = Broker::start();
    let mut server = Server::new(echo_service()).socket_dir(b.dir());
    // No traffic: returns None after the timeout (and registers the name).
    let start = Instant::now();
    let ev = server
        .run_once(Some(Duration::from_millis(200)))
        .expect("run_once");
    assert!(ev.is_none(), "{ev:?}");
    assert!(start.elapsed() >= Duration::from_millis(190));
    wait_registered(b.dir(), "looper", 1);

    let dir = b.dir().to_path_buf();
    let caller = std::thread::spawn(move || {
        let c = BlockingClient::connect_to(&dir).expect("connect");
        let a: Value = c.call("looper", "echo", &"one", T).expect("one");
        let b: Value = c.call("looper", "echo", &"two", T).expect("two");
        (a, b)
    });
    for _ in 0..2 {
        match server.run_once(Some(WAIT)).expect("run_once") {
            Some(Event::Request { method }) => assert_eq!(method, "echo"),
            other => panic!("expected one request, got {other:?}"),
        }
    }
    let (a, bb) = caller.join().expect("caller");
    assert_eq!((a, bb), (Value::from("one"), Value::from("two")));
    assert_eq!(server.counter(), 2);
}

#[test]
fn fd_callbacks_run_in_the_loop_until_unregistered() {
    let b = Broker::start();
    let (rd, wr) = pipe();
    let calls = Rc::new(Cell::new(0u32));
    let mut server = Server::new(echo_service()).socket_dir(b.dir());
    let seen = calls.clone();
    // The callback reads the byte itself: the library never reads the fd.
    server.register(rd, move |_svc| {
        seen.set(seen.get() + 1);
        read_byte(rd);
    });
    assert!(server
        .run_once(Some(Duration::from_millis(100)))
        .expect("idle")
        .is_none());
    assert_eq!(calls.get(), 0);

    write_byte(wr);
    match server.run_once(Some(WAIT)).expect("run_once") {
        Some(Event::Fd(fd)) => assert_eq!(fd, rd),
        other => panic!("expected an fd event, got {other:?}"),
    }
    assert_eq!(calls.get(), 1);
    // Drained by the callback: nothing more to report.
    assert!(server
        .run_once(Some(Duration::from_millis(100)))
        .expect("idle")
        .is_none());

    // Two bytes, one read per callback: the callback runs again while the
    // fd stays readable (level-triggered, like the original).
    write_byte(wr);
    write_byte(wr);
    for _ in 0..2 {
        assert!(matches!(
            server.run_once(Some(WAIT)).expect("fd"),
            Some(Event::Fd(_))
        ));
    }
    assert_eq!(calls.get(), 3);

    // Requests and fd events are served by the same loop.
    let dir = b.dir().to_path_buf();
    let caller = std::thread::spawn(move || {
        let c = BlockingClient::connect_to(&dir).expect("connect");
        c.call::<_, Value>("looper", "echo", &5, T)
    });
    assert!(matches!(
        server.run_once(Some(WAIT)).expect("request"),
        Some(Event::Request { .. })
    ));
    assert_eq!(
        caller.join().expect("caller").expect("reply"),
        Value::from(5)
    );

    server.unregister(rd);
    write_byte(wr);
    assert!(server
        .run_once(Some(Duration::from_millis(200)))
        .expect("idle")
        .is_none());
    assert_eq!(calls.get(), 3, "no callback after unregister");
    // SAFETY: closing our own pipe fds.
    unsafe {
        libc::close(rd);
        libc::close(wr);
    }
}

#[test]
fn async_serve_on_a_current_thread_runtime() {
    let b = Broker::start();
    let dir = b.dir().to_path_buf();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let local = tokio::task::LocalSet::new();
    let answers = local.block_on(&rt, async move {
        let mut server = Server::new(echo_service()).socket_dir(&dir);
        let serving = tokio::task::spawn_local(async move { server.serve().await });
        let c = Client::connect_to(&dir).await.expect("connect");
        let mut answers = Vec::new();
        for i in 0..10u32 {
            let v: u32 = c.call("looper", "echo", &i, T).await.expect("call");
            answers.push(v);
        }
        serving.abort();
        answers
    });
    assert_eq!(answers, (0..10).collect::<Vec<u32>>());
}
