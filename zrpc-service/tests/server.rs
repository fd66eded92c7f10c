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

impl Broker {
    /// A new listener on the same path, as a restarted broker would have;
    /// the old one is closed.
    fn restart(&mut self) {
        let path = zrpc_proto::socket_path(&self.dir);
        let _ = std::fs::remove_file(&path);
        self.listener = UnixListener::bind(&path).expect("bind again");
    }

    /// No broker at all: the socket is gone.
    fn stop(&mut self) {
        let path = zrpc_proto::socket_path(&self.dir);
        let _ = std::fs::remove_file(&path);
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
                caps: 0,
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

    /// Expects `Hello`; returns the instance id.
    fn hello(&mut self) -> u64 {
        let f = self.recv();
        match f.decode().expect("hello") {
            Envelope::Hello { instance, .. } => instance,
            other => panic!("expected Hello, got {other:?}"),
        }
    }

    fn welcome(&mut self) {
        self.send(
            Envelope::Welcome {
                version: 1,
                conn_id: 1,
                max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
                caps: 0,
            },
            &[],
        );
    }

    /// Expects one `Register` per name, in order, with `shared`; returns
    /// their request numbers (not acknowledged yet).
    fn registers(&mut self, names: &[&str], shared: bool) -> Vec<u64> {
        names
            .iter()
            .map(|want| match self.recv().decode().expect("register") {
                Envelope::Register {
                    req,
                    name,
                    shared: s,
                } => {
                    assert_eq!(&name, want);
                    assert_eq!(s, shared, "the shared flag of {name:?}");
                    req
                }
                other => panic!("expected Register of {want:?}, got {other:?}"),
            })
            .collect()
    }

    fn ack(&mut self, req: u64, code: Option<ErrorCode>) {
        self.send(
            Envelope::Ack {
                req,
                code,
                message: if code.is_some() { "refused" } else { "" },
            },
            &[],
        );
    }

    /// Sends a ping and expects its pong as the next frame.
    fn ping(&mut self, nonce: u64) {
        self.send(Envelope::Ping { nonce }, &[]);
        match self.recv().decode().expect("pong") {
            Envelope::Pong { nonce: n } => assert_eq!(n, nonce),
            other => panic!("expected Pong {nonce}, got {other:?}"),
        }
    }

    /// A request with an explicit call identity.
    fn call(&mut self, id: u64, method: &str, payload: &[u8], caller: (u64, u64)) {
        self.send(
            Envelope::Request {
                id,
                service: "gate",
                method,
                timeout_ms: Some(60_000),
                caller_instance: caller.0,
                caller_call: caller.1,
                caller: None,
            },
            payload,
        );
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
                caller: None,
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
            caps: 0,
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
fn disconnect_then_reconnect_without_auto_reconnect() {
    let broker = Broker::new("disconnect");
    let dir = broker.dir.clone();
    let rx = server_thread(move || {
        let mut srv = Server::new(Echo::new()).socket_dir(dir).reconnect(false);
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
            caps: 0,
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
        let mut srv = Server::new(Echo::new()).socket_dir(dir).reconnect(false);
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

// ---------------------------------------------------------------------------
// Reconnection and the reply cache.

/// A service that counts how often its handlers ran; `held` waits until the
/// test releases it.
struct Gate {
    runs: Arc<AtomicUsize>,
    started: Option<mpsc::Sender<u64>>,
    release: Arc<tokio::sync::Notify>,
}

impl Gate {
    fn new() -> (Gate, Arc<AtomicUsize>, Arc<tokio::sync::Notify>) {
        let runs = Arc::new(AtomicUsize::new(0));
        let release = Arc::new(tokio::sync::Notify::new());
        let gate = Gate {
            runs: runs.clone(),
            started: None,
            release: release.clone(),
        };
        (gate, runs, release)
    }
}

#[service]
impl Gate {
    /// Counts the run and returns (key, run number).
    #[rpc_method]
    fn quick(&mut self, key: u64) -> (u64, usize) {
        (key, self.runs.fetch_add(1, Ordering::SeqCst) + 1)
    }

    /// Counts the run, says so, waits for the test, returns (key, run number).
    #[rpc_method]
    async fn held(&mut self, key: u64) -> (u64, usize) {
        let n = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
        if let Some(tx) = &self.started {
            let _ = tx.send(key);
        }
        self.release.notified().await;
        (key, n)
    }

    /// Blocks the loop for `ms` milliseconds (a slow synchronous handler).
    #[rpc_method]
    fn spin(&mut self, ms: u64) -> u64 {
        std::thread::sleep(Duration::from_millis(ms));
        ms
    }

    /// Counts the run and fails.
    #[rpc_method]
    fn fail(&mut self) -> Result<u8, String> {
        let n = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
        Err(format!("failure number {n}"))
    }

    /// Counts the run and panics.
    #[rpc_method]
    fn boom(&mut self) -> u8 {
        let n = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
        panic!("panic number {n}")
    }
}

fn pair(a: u64, n: u64) -> Option<Value> {
    Some(Value::Array(vec![a.into(), n.into()]))
}

/// Lets a server blocked in `run()` return: the next registration is refused
/// with `NameTaken`, which is a hard error.
fn refuse_next_registration(broker: &mut Broker, names: &[&str], shared: bool) {
    broker.restart();
    let mut peer = broker.accept();
    peer.hello();
    peer.welcome();
    let reqs = peer.registers(names, shared);
    peer.ack(reqs[0], Some(ErrorCode::NameTaken));
}

#[test]
fn reconnects_and_registers_every_name_before_serving() {
    let mut broker = Broker::new("reconnect");
    let dir = broker.dir.clone();
    let (gate, runs, _) = Gate::new();
    let (inst_tx, inst_rx) = mpsc::channel();
    let rx = server_thread(move || {
        let mut srv = Server::new(gate)
            .name("gate")
            .add_name("gate2")
            .shared(true)
            .socket_dir(dir)
            .reconnect_backoff(Duration::from_millis(1), Duration::from_millis(20));
        let _ = inst_tx.send(srv.instance());
        let r = srv.run();
        (r.map_err(|e| e.to_string()), srv.counter())
    });
    let instance = inst_rx.recv_timeout(WAIT).expect("instance");
    let names = ["gate", "gate2"];

    // First connection: serve one call, then the broker says Shutdown.
    let mut peer = broker.accept();
    assert_eq!(peer.hello(), instance);
    peer.welcome();
    for req in peer.registers(&names, true) {
        peer.ack(req, None);
    }
    peer.call(1, "quick", &enc(&1u64), (5, 1));
    assert_eq!(peer.reply(), (1, None, String::new(), pair(1, 1)));
    broker.restart();
    peer.send(
        Envelope::Fatal {
            code: ErrorCode::Shutdown,
            message: "zrpcd is shutting down",
        },
        &[],
    );
    drop(peer);

    // Second connection, on a new listener: same instance, every name
    // again with the same shared flag, before anything else. A request sent
    // before the Acks is not served until every name is registered.
    let mut peer = broker.accept();
    assert_eq!(
        peer.hello(),
        instance,
        "the instance id survives reconnects"
    );
    peer.welcome();
    let reqs = peer.registers(&names, true);
    peer.call(2, "quick", &enc(&2u64), (5, 2));
    peer.ping(10);
    peer.ack(reqs[0], None);
    peer.ping(11);
    peer.ack(reqs[1], None);
    assert_eq!(peer.reply(), (2, None, String::new(), pair(2, 2)));

    // Lost by end of stream this time (the old listener stays: plain EOF).
    drop(peer);
    let mut peer = broker.accept();
    assert_eq!(peer.hello(), instance);
    peer.welcome();
    for req in peer.registers(&names, true) {
        peer.ack(req, None);
    }
    peer.call(3, "quick", &enc(&3u64), (5, 3));
    assert_eq!(peer.reply(), (3, None, String::new(), pair(3, 3)));
    drop(peer);

    // NameTaken when registering again is a hard error: run() returns it.
    refuse_next_registration(&mut broker, &names, true);
    let (r, counter) = rx.recv_timeout(WAIT).expect("server thread");
    let err = r.expect_err("run returns NameTaken");
    assert!(err.contains("gate") && err.contains("taken"), "{err}");
    assert_eq!(counter, 3);
    assert_eq!(runs.load(Ordering::SeqCst), 3);
}

#[test]
fn run_once_reconnects_within_its_budget() {
    let mut broker = Broker::new("budget");
    let dir = broker.dir.clone();
    let (gate, _, _) = Gate::new();
    let (cmd_tx, cmd_rx) = mpsc::channel::<Option<Duration>>();
    let (ev_tx, ev_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut srv = Server::new(gate).name("gate").socket_dir(dir);
        while let Ok(t) = cmd_rx.recv() {
            let r = srv.run_once(t).map_err(|e| e.to_string());
            if ev_tx.send((r, srv.is_connected())).is_err() {
                break;
            }
        }
    });
    cmd_tx.send(Some(WAIT)).expect("cmd");
    let mut peer = broker.accept();
    peer.handshake(&["gate"], false);
    peer.call(1, "quick", &enc(&1u64), (5, 1));
    assert_eq!(peer.reply(), (1, None, String::new(), pair(1, 1)));
    let (r, connected) = ev_rx.recv_timeout(WAIT).expect("event");
    assert_eq!(
        r,
        Ok(Some(Event::Request {
            method: "quick".into()
        }))
    );
    assert!(connected);

    // The broker goes away and does not come back within the budget.
    broker.stop();
    drop(peer);
    cmd_tx.send(Some(Duration::from_millis(300))).expect("cmd");
    let (r, connected) = ev_rx.recv_timeout(WAIT).expect("event");
    assert_eq!(r, Ok(None), "the budget runs out while reconnecting");
    assert!(!connected);

    // It comes back: the next run_once reconnects and serves.
    broker.restart();
    cmd_tx.send(Some(WAIT)).expect("cmd");
    let mut peer = broker.accept();
    peer.handshake(&["gate"], false);
    peer.call(2, "quick", &enc(&2u64), (5, 2));
    assert_eq!(peer.reply(), (2, None, String::new(), pair(2, 2)));
    let (r, connected) = ev_rx.recv_timeout(WAIT).expect("event");
    assert_eq!(
        r,
        Ok(Some(Event::Request {
            method: "quick".into()
        }))
    );
    assert!(connected);
}

#[test]
fn duplicate_request_is_answered_from_the_cache() {
    let broker = Broker::new("dup");
    let dir = broker.dir.clone();
    let (gate, runs, _) = Gate::new();
    let rx = server_thread(move || {
        let mut srv = Server::new(gate).name("gate").socket_dir(dir);
        let mut events = Vec::new();
        for _ in 0..10 {
            events.push(srv.run_once(Some(WAIT)).map_err(|e| e.to_string()));
        }
        (events, srv.counter(), srv.cached_replies())
    });
    let mut peer = broker.accept();
    peer.handshake(&["gate"], false);

    // A success, then the same call identity again under another id.
    peer.call(1, "quick", &enc(&7u64), (9, 100));
    assert_eq!(peer.reply(), (1, None, String::new(), pair(7, 1)));
    peer.call(2, "quick", &enc(&7u64), (9, 100));
    assert_eq!(peer.reply(), (2, None, String::new(), pair(7, 1)));
    // Another caller instance with the same call number is another call.
    peer.call(3, "quick", &enc(&7u64), (10, 100));
    assert_eq!(peer.reply(), (3, None, String::new(), pair(7, 2)));

    // A returned error and a panic are cached too.
    peer.call(4, "fail", &[], (9, 101));
    let (id, code, msg, _) = peer.reply();
    assert_eq!(
        (id, code, msg.as_str()),
        (4, Some(ErrorCode::Remote), "failure number 3")
    );
    peer.call(5, "fail", &[], (9, 101));
    let (id, code, msg, _) = peer.reply();
    assert_eq!(
        (id, code, msg.as_str()),
        (5, Some(ErrorCode::Remote), "failure number 3")
    );
    peer.call(6, "boom", &[], (9, 102));
    let (id, code, msg, _) = peer.reply();
    assert_eq!(
        (id, code, msg.as_str()),
        (
            6,
            Some(ErrorCode::Remote),
            "handler panicked: panic number 4"
        )
    );
    peer.call(7, "boom", &[], (9, 102));
    let (id, code, msg, _) = peer.reply();
    assert_eq!(
        (id, code, msg.as_str()),
        (
            7,
            Some(ErrorCode::Remote),
            "handler panicked: panic number 4"
        )
    );
    // So is NoSuchMethod (harmless: it would be the same answer).
    peer.call(8, "nope", &[], (9, 103));
    assert_eq!(peer.reply().1, Some(ErrorCode::NoSuchMethod));
    peer.call(9, "nope", &[], (9, 103));
    assert_eq!(peer.reply().1, Some(ErrorCode::NoSuchMethod));
    // zrpc.describe is never cached (and always answered).
    peer.call(10, "zrpc.describe", &[], (9, 104));
    assert_eq!(peer.reply().1, None);

    let (events, counter, cached) = rx.recv_timeout(WAIT).expect("server thread");
    let kinds: Vec<_> = events
        .into_iter()
        .map(|e| match e {
            Ok(Some(Event::Request { method })) => format!("run {method}"),
            Ok(Some(Event::Replayed { method })) => format!("replay {method}"),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "run quick",
            "replay quick",
            "run quick",
            "run fail",
            "replay fail",
            "run boom",
            "replay boom",
            "run nope",
            "replay nope",
            "run zrpc.describe"
        ]
    );
    // Replays neither run the handler nor count as requests.
    assert_eq!(runs.load(Ordering::SeqCst), 4);
    assert_eq!(counter, 6);
    assert_eq!(cached, 5);
}

#[test]
fn in_flight_duplicate_waits_for_the_first_execution() {
    let broker = Broker::new("inflight");
    let dir = broker.dir.clone();
    let (mut gate, runs, release) = Gate::new();
    let (started_tx, started_rx) = mpsc::channel();
    gate.started = Some(started_tx);
    let rx = server_thread(move || {
        let mut srv = Server::new(gate).name("gate").socket_dir(dir);
        let mut events = Vec::new();
        for _ in 0..3 {
            events.push(srv.run_once(Some(WAIT)).map_err(|e| e.to_string()));
        }
        events
    });
    let mut peer = broker.accept();
    peer.handshake(&["gate"], false);
    peer.call(1, "held", &enc(&5u64), (9, 1));
    assert_eq!(started_rx.recv_timeout(WAIT).expect("started"), 5);
    // The same call again while the first runs, and a queued duplicate of
    // a call that has not run yet, twice.
    peer.call(2, "held", &enc(&5u64), (9, 1));
    peer.call(3, "quick", &enc(&6u64), (9, 2));
    peer.call(4, "quick", &enc(&6u64), (9, 2));
    // Pings are answered while the handler runs: all four were read.
    peer.ping(1);
    release.notify_one();
    assert_eq!(peer.reply(), (1, None, String::new(), pair(5, 1)));
    assert_eq!(peer.reply(), (2, None, String::new(), pair(5, 1)));
    assert_eq!(peer.reply(), (3, None, String::new(), pair(6, 2)));
    let events = rx.recv_timeout(WAIT).expect("server thread");
    // The third run_once answered request 3; request 4 is still queued.
    assert_eq!(
        events,
        [
            Ok(Some(Event::Request {
                method: "held".into()
            })),
            Ok(Some(Event::Replayed {
                method: "held".into()
            })),
            Ok(Some(Event::Request {
                method: "quick".into()
            })),
        ]
    );
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

#[test]
fn cache_bounds_evict_the_oldest_and_zero_disables() {
    let broker = Broker::new("bounds");
    let dir = broker.dir.clone();
    let (gate, runs, _) = Gate::new();
    let rx = server_thread(move || {
        let mut srv = Server::new(gate)
            .name("gate")
            .socket_dir(dir)
            .reply_cache(2, 1 << 20);
        let mut cached = Vec::new();
        for _ in 0..6 {
            srv.run_once(Some(WAIT)).expect("run_once");
            cached.push(srv.cached_replies());
        }
        cached
    });
    let mut peer = broker.accept();
    peer.handshake(&["gate"], false);
    for (id, call) in [(1, 1), (2, 2), (3, 3)] {
        peer.call(id, "quick", &enc(&call), (9, call));
        assert_eq!(peer.reply(), (id, None, String::new(), pair(call, call)));
    }
    // Call 1 was evicted (oldest): it runs again. Call 3 is still cached.
    peer.call(4, "quick", &enc(&3u64), (9, 3));
    assert_eq!(peer.reply(), (4, None, String::new(), pair(3, 3)));
    peer.call(5, "quick", &enc(&1u64), (9, 1));
    assert_eq!(peer.reply(), (5, None, String::new(), pair(1, 4)));
    // Re-running call 1 evicted call 2, the oldest then.
    peer.call(6, "quick", &enc(&2u64), (9, 2));
    assert_eq!(peer.reply(), (6, None, String::new(), pair(2, 5)));
    assert_eq!(
        rx.recv_timeout(WAIT).expect("server thread"),
        [1, 2, 2, 2, 2, 2]
    );
    assert_eq!(runs.load(Ordering::SeqCst), 5);

    // Disabled: the duplicate runs twice.
    let broker = Broker::new("nocache");
    let dir = broker.dir.clone();
    let (gate, runs, _) = Gate::new();
    let rx = server_thread(move || {
        let mut srv = Server::new(gate)
            .name("gate")
            .socket_dir(dir)
            .reply_cache(0, 0);
        for _ in 0..2 {
            srv.run_once(Some(WAIT)).expect("run_once");
        }
        srv.cached_replies()
    });
    let mut peer = broker.accept();
    peer.handshake(&["gate"], false);
    peer.call(1, "quick", &enc(&1u64), (9, 1));
    assert_eq!(peer.reply(), (1, None, String::new(), pair(1, 1)));
    peer.call(2, "quick", &enc(&1u64), (9, 1));
    assert_eq!(peer.reply(), (2, None, String::new(), pair(1, 2)));
    assert_eq!(rx.recv_timeout(WAIT).expect("server thread"), 0);
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

#[test]
fn handler_running_when_the_connection_drops_completes_and_is_replayed() {
    let mut broker = Broker::new("midcall");
    let dir = broker.dir.clone();
    let (mut gate, runs, release) = Gate::new();
    let (started_tx, started_rx) = mpsc::channel();
    gate.started = Some(started_tx);
    let rx = server_thread(move || {
        let mut srv = Server::new(gate)
            .name("gate")
            .socket_dir(dir)
            .reconnect_backoff(Duration::from_millis(1), Duration::from_millis(20));
        let r = srv.run();
        (r.map_err(|e| e.to_string()), srv.counter())
    });
    let mut peer = broker.accept();
    peer.handshake(&["gate"], false);
    peer.call(1, "held", &enc(&8u64), (9, 1));
    assert_eq!(started_rx.recv_timeout(WAIT).expect("started"), 8);

    // The broker restarts while the handler runs.
    broker.restart();
    drop(peer);
    // The service reconnects while the handler is still running...
    let mut peer = broker.accept();
    peer.handshake(&["gate"], false);
    // ...answers pings meanwhile...
    peer.ping(3);
    // ...and the re-sent call waits for the running execution.
    peer.call(50, "held", &enc(&8u64), (9, 1));
    peer.ping(4);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    release.notify_one();
    assert_eq!(peer.reply(), (50, None, String::new(), pair(8, 1)));
    // Re-sent once more, later: still from the cache.
    peer.call(51, "held", &enc(&8u64), (9, 1));
    assert_eq!(peer.reply(), (51, None, String::new(), pair(8, 1)));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    drop(peer);

    refuse_next_registration(&mut broker, &["gate"], false);
    let (r, counter) = rx.recv_timeout(WAIT).expect("server thread");
    assert!(r.expect_err("NameTaken").contains("taken"));
    assert_eq!(counter, 1);
}

#[test]
fn handler_running_when_reconnect_is_off_completes_then_the_error_is_returned() {
    let broker = Broker::new("midcall-off");
    let dir = broker.dir.clone();
    let (mut gate, runs, release) = Gate::new();
    let (started_tx, started_rx) = mpsc::channel();
    gate.started = Some(started_tx);
    let release2 = release.clone();
    let rx = server_thread(move || {
        let mut srv = Server::new(gate)
            .name("gate")
            .socket_dir(dir)
            .reconnect(false);
        let e1 = srv.run_once(Some(WAIT)).map_err(|e| e.to_string());
        let e2 = srv.run_once(Some(WAIT)).map_err(|e| e.to_string());
        (e1, e2, srv.cached_replies())
    });
    let mut peer = broker.accept();
    peer.handshake(&["gate"], false);
    peer.call(1, "held", &enc(&8u64), (9, 1));
    assert_eq!(started_rx.recv_timeout(WAIT).expect("started"), 8);
    drop(peer);
    release2.notify_one();
    let (e1, e2, cached) = rx.recv_timeout(WAIT).expect("server thread");
    // The handler finished (its outcome is cached), then the loss is
    // reported.
    assert_eq!(
        e1,
        Ok(Some(Event::Request {
            method: "held".into()
        }))
    );
    assert_eq!(e2, Err(Error::Disconnected.to_string()));
    assert_eq!(cached, 1);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[test]
fn pings_are_answered_before_a_queue_of_slow_synchronous_requests() {
    let broker = Broker::new("pingq");
    let dir = broker.dir.clone();
    let (gate, _, _) = Gate::new();
    let rx = server_thread(move || {
        let mut srv = Server::new(gate).name("gate").socket_dir(dir);
        for _ in 0..4 {
            srv.run_once(Some(WAIT)).expect("run_once");
        }
    });
    let mut peer = broker.accept();
    peer.handshake(&["gate"], false);
    // Four slow requests and a ping in one write: the pong goes out first,
    // not after the queue is drained.
    let mut out = BytesMut::new();
    for id in 1..=4u64 {
        encode_frame(
            &mut out,
            &Envelope::Request {
                id,
                service: "gate",
                method: "spin",
                timeout_ms: None,
                caller_instance: 9,
                caller_call: id,
                caller: None,
            },
            &enc(&30u64),
        );
    }
    encode_frame(&mut out, &Envelope::Ping { nonce: 5 }, &[]);
    peer.stream.write_all(&out).expect("write");
    match peer.recv().decode().expect("frame") {
        Envelope::Pong { nonce } => assert_eq!(nonce, 5),
        other => panic!("expected the Pong first, got {other:?}"),
    }
    for id in 1..=4u64 {
        assert_eq!(peer.reply(), (id, None, String::new(), Some(30.into())));
    }
    rx.recv_timeout(WAIT).expect("server thread");
}

#[test]
fn cancel_then_shutdown_in_one_batch_keeps_the_handler_running() {
    // zrpcd's shutdown cancels every delivered call and then sends
    // Fatal{Shutdown}; the client resubmits those calls to the next broker.
    // Seen together, the loss wins: the handler finishes and the re-sent
    // call is answered from the cache.
    let mut broker = Broker::new("cancel-shutdown");
    let dir = broker.dir.clone();
    let (mut gate, runs, release) = Gate::new();
    let (started_tx, started_rx) = mpsc::channel();
    gate.started = Some(started_tx);
    let rx = server_thread(move || {
        let mut srv = Server::new(gate)
            .name("gate")
            .socket_dir(dir)
            .reconnect_backoff(Duration::from_millis(1), Duration::from_millis(20));
        srv.run().map_err(|e| e.to_string())
    });
    let mut peer = broker.accept();
    peer.handshake(&["gate"], false);
    peer.call(1, "held", &enc(&3u64), (9, 1));
    assert_eq!(started_rx.recv_timeout(WAIT).expect("started"), 3);
    broker.restart();
    let mut out = BytesMut::new();
    encode_frame(&mut out, &Envelope::Cancel { id: 1 }, &[]);
    encode_frame(
        &mut out,
        &Envelope::Fatal {
            code: ErrorCode::Shutdown,
            message: "zrpcd is shutting down",
        },
        &[],
    );
    peer.stream.write_all(&out).expect("write");
    drop(peer);
    let mut peer = broker.accept();
    peer.handshake(&["gate"], false);
    peer.call(2, "held", &enc(&3u64), (9, 1));
    peer.ping(1);
    release.notify_one();
    assert_eq!(peer.reply(), (2, None, String::new(), pair(3, 1)));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    drop(peer);
    refuse_next_registration(&mut broker, &["gate"], false);
    assert!(rx.recv_timeout(WAIT).expect("server thread").is_err());
}

/// Requests of every size in one write: small ones read where they lie in
/// the read buffer, a 100 KiB one read into an allocation of its own
/// (larger than `OWN_BUFFER_FRAME`), small ones after it, a request with
/// an empty payload (nil) and a ping: each gets its own answer.
#[test]
fn requests_of_every_size_in_one_write() {
    let broker = Broker::new("sizes");
    let dir = broker.dir.clone();
    let sizes = [0usize, 1, 60, 300, 5000, 100_000, 2, 70, 0];
    let n = sizes.len() + 1;
    let rx = server_thread(move || {
        let mut srv = Server::new(Echo::new()).socket_dir(dir);
        for _ in 0..n {
            srv.run_once(Some(WAIT)).expect("run_once");
        }
    });
    let mut peer = broker.accept();
    peer.handshake(&["echo"], false);
    let value = |i: usize, n: usize| Value::Binary(vec![i as u8; n]);
    let mut out = BytesMut::new();
    for (i, &len) in sizes.iter().enumerate() {
        let env = Envelope::Request {
            id: i as u64 + 1,
            service: "echo",
            method: "func",
            timeout_ms: None,
            caller_instance: 77,
            caller_call: i as u64 + 1000,
            caller: None,
        };
        encode_frame(&mut out, &env, &enc(&value(i, len)));
        if i == 3 {
            encode_frame(&mut out, &Envelope::Ping { nonce: 8 }, &[]);
        }
    }
    let nil = Envelope::Request {
        id: 99,
        service: "echo",
        method: "func",
        timeout_ms: None,
        caller_instance: 77,
        caller_call: 1099,
        caller: None,
    };
    encode_frame(&mut out, &nil, &[]);
    peer.stream.write_all(&out).expect("write");
    let mut replies = std::collections::HashMap::new();
    while replies.len() < n {
        let f = peer.recv();
        match f.decode().expect("frame") {
            Envelope::Pong { nonce } => assert_eq!(nonce, 8),
            Envelope::Reply { id, code, message } => {
                assert_eq!(code, None, "{message}");
                let v = rmpv::decode::read_value(&mut &f.payload[..]).expect("msgpack payload");
                replies.insert(id, v);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    for (i, &len) in sizes.iter().enumerate() {
        let Value::Array(fields) = &replies[&(i as u64 + 1)] else {
            panic!("reply {i} is not an array");
        };
        assert_eq!(fields[1], value(i, len), "payload of request {i}");
        assert_eq!(
            fields[4],
            Value::from(i as u64 + 1000),
            "caller_call of {i}"
        );
    }
    let Value::Array(fields) = &replies[&99] else {
        panic!("reply 99 is not an array");
    };
    assert_eq!(fields[1], Value::Nil);
    rx.recv_timeout(WAIT).expect("server thread");
}

struct Big;

#[service]
impl Big {
    #[rpc_method]
    fn make(&mut self, n: u64) -> serde_bytes::ByteBuf {
        serde_bytes::ByteBuf::from(vec![7u8; n as usize])
    }
}

/// A reply cached under one broker and replayed to the resubmission under
/// a restarted broker announcing a smaller max message size: it is bounded
/// by the new limit (`LimitExceeded`), not sent whole (the broker would
/// answer `Fatal`, re-deliver, and the cache replay it again until the
/// caller's deadline).
#[test]
fn a_cached_reply_replayed_to_a_broker_with_a_smaller_limit_fits_it() {
    let mut broker = Broker::new("replay-max");
    let dir = broker.dir.clone();
    let _rx = server_thread(move || {
        let mut srv = Server::new(Big)
            .socket_dir(dir)
            .reconnect_backoff(Duration::from_millis(1), Duration::from_millis(20));
        srv.run().map_err(|e| e.to_string())
    });
    let mut peer = broker.accept();
    peer.handshake(&["big"], false);
    let req = |peer: &mut Peer, id: u64| {
        peer.send(
            Envelope::Request {
                id,
                service: "big",
                method: "make",
                timeout_ms: Some(60_000),
                caller_instance: 5,
                caller_call: 9,
                caller: None,
            },
            &enc(&200_000u64),
        )
    };
    req(&mut peer, 1);
    let (id, code, _, _) = peer.reply();
    assert_eq!((id, code), (1, None));
    broker.restart();
    drop(peer);
    let mut peer = broker.accept();
    peer.hello();
    peer.send(
        Envelope::Welcome {
            version: 1,
            conn_id: 2,
            max_message_size: 100_000,
            caps: 0,
        },
        &[],
    );
    let r = peer.registers(&["big"], false);
    peer.ack(r[0], None);
    req(&mut peer, 2);
    let f = peer.recv();
    let size = f.envelope.len() + f.payload.len();
    assert!(
        size <= 100_000,
        "a {size}-byte frame to a broker announcing 100000"
    );
    match f.decode().expect("reply") {
        Envelope::Reply { id, code, .. } => {
            assert_eq!((id, code), (2, Some(ErrorCode::LimitExceeded)));
        }
        other => panic!("expected Reply, got {other:?}"),
    }
}
