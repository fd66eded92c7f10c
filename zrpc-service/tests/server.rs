//! `Server` against a tiny fake broker speaking the protocol with
//! zrpc-proto. Every wait is bounded.

use std::io::{Read, Write};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use bytes::BytesMut;
use serde::Serialize;
use zrpc_proto::{
    encode_frame, Envelope, ErrorCode, Frame, FrameDecoder, DEFAULT_MAX_MESSAGE_SIZE,
};
use zrpc_service::{rpc_method, service, Context, Error, Event, Server, Value};

const WAIT: Duration = Duration::from_secs(10);

struct Broker {
    dir: PathBuf,
    listener: UnixListener,
}

impl Broker {
    fn new(tag: &str) -> Broker {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "zrpc-service-test-{}-{}-{tag}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let listener = UnixListener::bind(zrpc_proto::socket_path(&dir)).expect("bind");
        Broker { dir, listener }
    }

    fn accept(&self) -> Peer {
        let mut p = libc::pollfd {
            fd: self.listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: valid pollfd for the duration of the call.
        let r = unsafe { libc::poll(&mut p, 1, WAIT.as_millis() as i32) };
        assert!(r == 1, "no connection within {WAIT:?}");
        let (stream, _) = self.listener.accept().expect("accept");
        stream.set_read_timeout(Some(WAIT)).expect("timeout");
        Peer {
            stream,
            buf: BytesMut::new(),
            dec: FrameDecoder::new(DEFAULT_MAX_MESSAGE_SIZE),
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct Peer {
    stream: UnixStream,
    buf: BytesMut,
    dec: FrameDecoder,
}

impl Peer {
    /// The next frame, or `None` at end of stream.
    fn try_recv(&mut self) -> Option<Frame> {
        loop {
            if let Some(f) = self.dec.decode(&mut self.buf).expect("valid frame") {
                return Some(f);
            }
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).expect("read (timed out?)");
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn recv(&mut self) -> Frame {
        self.try_recv().expect("connection closed")
    }

    fn send(&mut self, env: Envelope<'_>, payload: &[u8]) {
        let mut out = BytesMut::new();
        encode_frame(&mut out, &env, payload);
        self.stream.write_all(&out).expect("write");
    }

    fn handshake(&mut self, names: &[&str], shared: bool) {
        let f = self.recv();
        match f.decode().expect("hello") {
            Envelope::Hello { version, agent, .. } => {
                assert_eq!(version, 1);
                assert!(agent.starts_with("zrpc-service/"), "{agent}");
            }
            other => panic!("expected Hello, got {other:?}"),
        }
        self.send(
            Envelope::Welcome {
                version: 1,
                conn_id: 1,
                max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            },
            &[],
        );
        for want in names {
            let f = self.recv();
            match f.decode().expect("register") {
                Envelope::Register {
                    req,
                    name,
                    shared: s,
                } => {
                    assert_eq!(&name, want);
                    assert_eq!(s, shared);
                    self.send(
                        Envelope::Ack {
                            req,
                            code: None,
                            message: "",
                        },
                        &[],
                    );
                }
                other => panic!("expected Register, got {other:?}"),
            }
        }
    }

    fn request(&mut self, id: u64, method: &str, payload: &[u8]) {
        self.send(
            Envelope::Request {
                id,
                service: "echo",
                method,
                timeout_ms: Some(60_000),
                caller_instance: 77,
                caller_call: id + 1000,
            },
            payload,
        );
    }

    /// The next frame must be a Reply; returns (id, code, message, value).
    fn reply(&mut self) -> (u64, Option<ErrorCode>, String, Option<Value>) {
        let f = self.recv();
        match f.decode().expect("reply") {
            Envelope::Reply { id, code, message } => {
                let v = (!f.payload.is_empty()).then(|| {
                    rmpv::decode::read_value(&mut &f.payload[..]).expect("msgpack payload")
                });
                (id, code, message.to_string(), v)
            }
            other => panic!("expected Reply, got {other:?}"),
        }
    }
}

fn enc<T: Serialize>(v: &T) -> Vec<u8> {
    rmp_serde::encode::to_vec_named(v).expect("encode")
}

/// Sets a flag when dropped (to see that a cancelled handler was dropped).
struct DropFlag(Arc<AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

struct Echo {
    started: Option<mpsc::Sender<()>>,
    dropped: Arc<AtomicBool>,
}

impl Echo {
    fn new() -> Self {
        Echo {
            started: None,
            dropped: Arc::new(AtomicBool::new(false)),
        }
    }
}

#[service]
impl Echo {
    /// Returns ("func", payload) and the request counter.
    #[rpc_method]
    fn func(&mut self, ctx: &Context, payload: Value) -> (String, Value, u64, u64, u64) {
        (
            "func".into(),
            payload,
            ctx.counter(),
            ctx.caller_instance(),
            ctx.caller_call(),
        )
    }

    #[rpc_method]
    fn add(&self, (a, b): (i64, i64)) -> i64 {
        a + b
    }

    #[rpc_method]
    fn boom(&self) -> u8 {
        panic!("kaboom")
    }

    /// Never finishes on its own.
    #[rpc_method]
    async fn slow(&mut self) -> u8 {
        let _guard = DropFlag(self.dropped.clone());
        if let Some(tx) = &self.started {
            let _ = tx.send(());
        }
        tokio::time::sleep(Duration::from_secs(3600)).await;
        1
    }
}

/// Runs `f` with a server on its own thread; returns what `f` returns.
fn server_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> mpsc::Receiver<T> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx
}

#[test]
fn handshake_request_and_timeout() {
    let broker = Broker::new("basic");
    let dir = broker.dir.clone();
    let rx = server_thread(move || {
        let mut srv = Server::new(Echo::new()).socket_dir(dir);
        assert_eq!(srv.names(), ["echo"]);
        let e1 = srv.run_once(Some(WAIT));
        let e2 = srv.run_once(Some(Duration::from_millis(100)));
        (
            e1.map_err(|e| e.to_string()),
            e2.map_err(|e| e.to_string()),
            srv.counter(),
        )
    });
    let mut peer = broker.accept();
    peer.handshake(&["echo"], false);
    // Pings are answered while waiting; they are not events.
    peer.send(Envelope::Ping { nonce: 99 }, &[]);
    match peer.recv().decode().expect("pong") {
        Envelope::Pong { nonce } => assert_eq!(nonce, 99),
        other => panic!("expected Pong, got {other:?}"),
    }
    peer.request(5, "func", &enc(&"hi"));
    let (id, code, _, v) = peer.reply();
    assert_eq!((id, code), (5, None));
    assert_eq!(
        v,
        Some(Value::Array(vec![
            "func".into(),
            "hi".into(),
            1.into(),
            77.into(),
            1005.into()
        ]))
    );
    let (e1, e2, counter) = rx.recv_timeout(WAIT).expect("server thread");
    assert_eq!(
        e1,
        Ok(Some(Event::Request {
            method: "func".into()
        }))
    );
    assert_eq!(e2, Ok(None));
    assert_eq!(counter, 1);
}

#[test]
fn errors_describe_and_panics() {
    let broker = Broker::new("errors");
    let dir = broker.dir.clone();
    let rx = server_thread(move || {
        let mut srv = Server::new(Echo::new())
            .name("echo")
            .add_name("echo2")
            .shared(true)
            .socket_dir(dir);
        let mut events = Vec::new();
        for _ in 0..5 {
            events.push(srv.run_once(Some(WAIT)).map_err(|e| e.to_string()));
        }
        (events, srv.counter())
    });
    let mut peer = broker.accept();
    peer.handshake(&["echo", "echo2"], true);

    peer.request(1, "nope", &[]);
    let (id, code, msg, v) = peer.reply();
    assert_eq!((id, code, v), (1, Some(ErrorCode::NoSuchMethod), None));
    assert!(msg.contains("nope") && msg.contains("echo"), "{msg}");

    peer.request(2, "add", &enc(&"not a pair"));
    let (id, code, msg, _) = peer.reply();
    assert_eq!((id, code), (2, Some(ErrorCode::BadPayload)));
    assert!(msg.contains("add"), "{msg}");

    peer.request(3, "boom", &[]);
    let (id, code, msg, _) = peer.reply();
    assert_eq!((id, code), (3, Some(ErrorCode::Remote)));
    assert_eq!(msg, "handler panicked: kaboom");

    // Still alive after the panic.
    peer.request(4, "add", &enc(&(40, 2)));
    assert_eq!(peer.reply(), (4, None, String::new(), Some(42.into())));

    peer.request(5, "zrpc.describe", &[]);
    let (id, code, _, v) = peer.reply();
    assert_eq!((id, code), (5, None));
    let v = v.expect("describe payload");
    let get = |v: &Value, k: &str| -> Value {
        v.as_map()
            .expect("map")
            .iter()
            .find(|(key, _)| key.as_str() == Some(k))
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("no key {k}"))
    };
    assert_eq!(get(&v, "service"), Value::from("echo"));
    let methods = get(&v, "methods");
    let methods = methods.as_array().expect("methods");
    assert_eq!(methods.len(), 4);
    assert_eq!(get(&methods[0], "name"), Value::from("func"));
    assert_eq!(
        get(&methods[0], "doc"),
        Value::from("Returns (\"func\", payload) and the request counter.")
    );
    let params = get(&methods[0], "params");
    assert_eq!(get(&params[0], "name"), Value::from("payload"));
    assert_eq!(get(&params[0], "type"), Value::from("Value"));
    assert_eq!(get(&methods[1], "returns"), Value::from("i64"));

    let (events, counter) = rx.recv_timeout(WAIT).expect("server thread");
    assert_eq!(counter, 5);
    let methods: Vec<_> = events
        .into_iter()
        .map(|e| match e {
            Ok(Some(Event::Request { method })) => method,
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(methods, ["nope", "add", "boom", "add", "zrpc.describe"]);
}

#[test]
fn cancel_drops_running_handler_and_queued_requests() {
    let broker = Broker::new("cancel");
    let dir = broker.dir.clone();
    let (started_tx, started_rx) = mpsc::channel();
    let dropped = Arc::new(AtomicBool::new(false));
    let dropped2 = dropped.clone();
    let rx = server_thread(move || {
        let mut echo = Echo::new();
        echo.started = Some(started_tx);
        echo.dropped = dropped2;
        let mut srv = Server::new(echo).socket_dir(dir);
        let e1 = srv.run_once(Some(WAIT));
        let e2 = srv.run_once(Some(WAIT));
        (e1.map_err(|e| e.to_string()), e2.map_err(|e| e.to_string()))
    });
    let mut peer = broker.accept();
    peer.handshake(&["echo"], false);
    peer.request(1, "slow", &[]);
    started_rx.recv_timeout(WAIT).expect("slow handler started");
    // While 1 runs: 2 and 3 are queued, 2 is cancelled in the queue, then
    // the running 1 is cancelled.
    peer.request(2, "add", &enc(&(1, 1)));
    peer.request(3, "add", &enc(&(2, 2)));
    peer.send(Envelope::Cancel { id: 2 }, &[]);
    peer.send(Envelope::Cancel { id: 1 }, &[]);
    // Nothing for 1 or 2: the next frame is the reply to 3.
    assert_eq!(peer.reply(), (3, None, String::new(), Some(4.into())));
    let (e1, e2) = rx.recv_timeout(WAIT).expect("server thread");
    assert_eq!(
        e1,
        Ok(Some(Event::Cancelled {
            method: "slow".into()
        }))
    );
    assert_eq!(
        e2,
        Ok(Some(Event::Request {
            method: "add".into()
        }))
    );
    assert!(
        dropped.load(Ordering::SeqCst),
        "the slow handler was dropped"
    );
}

struct FdService {
    calls: u32,
    drain: bool,
}

#[service]
impl FdService {
    #[rpc_method]
    fn calls(&self) -> u32 {
        self.calls
    }
}

fn pipe() -> (RawFd, RawFd) {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors.
    let r = unsafe { libc::pipe(fds.as_mut_ptr()) };
    assert_eq!(r, 0, "pipe");
    (fds[0], fds[1])
}

fn write_byte(fd: RawFd) {
    // SAFETY: writes one byte from a valid buffer.
    let n = unsafe { libc::write(fd, b"x".as_ptr().cast(), 1) };
    assert_eq!(n, 1);
}

#[test]
fn registered_fd_callbacks() {
    let broker = Broker::new("fd");
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let dir = broker.dir.clone();
    let broker_thread = std::thread::spawn(move || {
        let mut peer = broker.accept();
        peer.handshake(&["fd_service"], false);
        // Hold the connection until the test is over.
        let _ = done_rx.recv_timeout(WAIT);
        drop(peer);
    });

    let (r, w) = pipe();
    let mut srv = Server::new(FdService {
        calls: 0,
        drain: true,
    })
    .socket_dir(dir);
    srv.register(r, move |s: &mut FdService| {
        s.calls += 1;
        if s.drain {
            let mut b = [0u8; 16];
            // SAFETY: reads into a valid buffer.
            let n = unsafe { libc::read(r, b.as_mut_ptr().cast(), b.len()) };
            assert!(n > 0);
        }
    });
    let short = Some(Duration::from_millis(100));

    write_byte(w);
    assert_eq!(
        srv.run_once(Some(WAIT)).expect("run_once"),
        Some(Event::Fd(r))
    );
    assert_eq!(srv.service().calls, 1);
    // Drained: nothing more to do.
    assert_eq!(srv.run_once(short).expect("run_once"), None);

    // Not drained: level-triggered, the callback runs again.
    srv.service_mut().drain = false;
    write_byte(w);
    assert_eq!(
        srv.run_once(Some(WAIT)).expect("run_once"),
        Some(Event::Fd(r))
    );
    assert_eq!(
        srv.run_once(Some(WAIT)).expect("run_once"),
        Some(Event::Fd(r))
    );
    assert_eq!(srv.service().calls, 3);

    // A BorrowedFd works as well as a RawFd.
    // SAFETY: `r` stays open while the BorrowedFd lives.
    let borrowed = unsafe { std::os::unix::io::BorrowedFd::borrow_raw(r) };
    srv.unregister(borrowed);
    assert_eq!(srv.run_once(short).expect("run_once"), None);
    assert_eq!(srv.service().calls, 3);

    // Registering again works, and the data is still there.
    srv.service_mut().drain = true;
    srv.register(r, move |s: &mut FdService| {
        s.calls += 10;
        let mut b = [0u8; 16];
        // SAFETY: reads into a valid buffer.
        unsafe { libc::read(r, b.as_mut_ptr().cast(), b.len()) };
    });
    assert_eq!(
        srv.run_once(Some(WAIT)).expect("run_once"),
        Some(Event::Fd(r))
    );
    assert_eq!(srv.service().calls, 13);
    srv.unregister(r);

    let _ = done_tx.send(());
    broker_thread.join().expect("broker thread");
    // SAFETY: closing our own pipe ends.
    unsafe {
        libc::close(r);
        libc::close(w);
    }
}

#[test]
fn name_taken_is_a_typed_error() {
    let broker = Broker::new("taken");
    let dir = broker.dir.clone();
    let rx = server_thread(move || {
        let mut srv = Server::new(Echo::new()).socket_dir(dir);
        srv.run_once(Some(WAIT)).map(|_| ()).map_err(|e| match e {
            Error::NameTaken { name } => name,
            other => panic!("unexpected {other}"),
        })
    });
    let mut peer = broker.accept();
    let _hello = peer.recv();
    peer.send(
        Envelope::Welcome {
            version: 1,
            conn_id: 1,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
        },
        &[],
    );
    let f = peer.recv();
    let Envelope::Register { req, .. } = f.decode().expect("register") else {
        panic!("expected Register")
    };
    peer.send(
        Envelope::Ack {
            req,
            code: Some(ErrorCode::NameTaken),
            message: "taken",
        },
        &[],
    );
    assert_eq!(
        rx.recv_timeout(WAIT).expect("server thread"),
        Err("echo".to_string())
    );
}

#[test]
fn connect_error_names_the_socket() {
    let dir =
        std::env::temp_dir().join(format!("zrpc-service-test-{}-nobroker", std::process::id()));
    let mut srv = Server::new(Echo::new()).socket_dir(&dir);
    let err = srv.run_once(Some(WAIT)).expect_err("no broker");
    assert!(matches!(err, Error::Connect { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains(&dir.join("zrpcd.sock").display().to_string()),
        "{msg}"
    );
    assert!(msg.contains("is zrpcd running?"), "{msg}");

    let mut srv = Server::new(Echo::new()).name("bad name").socket_dir(&dir);
    assert!(matches!(srv.run_once(None), Err(Error::InvalidName { .. })));
}

#[test]
fn disconnect_then_reconnect() {
    let broker = Broker::new("disconnect");
    let dir = broker.dir.clone();
    let rx = server_thread(move || {
        let mut srv = Server::new(Echo::new()).socket_dir(dir);
        let instance = srv.instance();
        let e1 = srv.run_once(Some(WAIT)).map_err(|e| e.to_string());
        let e2 = srv.run_once(Some(WAIT)).map_err(|e| e.to_string());
        (e1, e2, instance)
    });
    let mut peer = broker.accept();
    peer.handshake(&["echo"], false);
    drop(peer);
    let mut peer = broker.accept();
    let f = peer.recv();
    let Envelope::Hello { instance, .. } = f.decode().expect("hello") else {
        panic!("expected Hello")
    };
    peer.send(
        Envelope::Welcome {
            version: 1,
            conn_id: 2,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
        },
        &[],
    );
    let f = peer.recv();
    let Envelope::Register { req, name, .. } = f.decode().expect("register") else {
        panic!("expected Register")
    };
    assert_eq!(name, "echo");
    peer.send(
        Envelope::Ack {
            req,
            code: None,
            message: "",
        },
        &[],
    );
    peer.request(1, "add", &enc(&(1, 2)));
    assert_eq!(peer.reply(), (1, None, String::new(), Some(3.into())));
    let (e1, e2, inst) = rx.recv_timeout(WAIT).expect("server thread");
    assert_eq!(e1, Err(Error::Disconnected.to_string()));
    assert_eq!(
        e2,
        Ok(Some(Event::Request {
            method: "add".into()
        }))
    );
    assert_eq!(instance, inst, "the instance id survives reconnects");
}

#[test]
fn serve_under_a_user_runtime() {
    let broker = Broker::new("serve");
    let dir = broker.dir.clone();
    let rx = server_thread(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let mut srv = Server::new(Echo::new()).socket_dir(dir);
        let r = rt.block_on(async {
            // run() inside a runtime is refused with a typed error.
            assert!(matches!(srv.run_once(None), Err(Error::NestedRuntime)));
            srv.serve().await
        });
        r.map_err(|e| e.to_string())
    });
    let mut peer = broker.accept();
    peer.handshake(&["echo"], false);
    for i in 0..3 {
        peer.request(i, "add", &enc(&(i, 1)));
    }
    for i in 0..3u64 {
        assert_eq!(peer.reply(), (i, None, String::new(), Some((i + 1).into())));
    }
    drop(peer);
    assert_eq!(
        rx.recv_timeout(WAIT).expect("server thread"),
        Err(Error::Disconnected.to_string())
    );
}
