//! The zrpc side of the benchmark: the echo service, the measuring client
//! (async on a current-thread or multi-thread runtime, or blocking), and the
//! helpers of the memory and names scenarios, which speak the wire protocol
//! directly through `zrpc-proto`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use serde_bytes::ByteBuf;
use zrpc_client::{BlockingClient, CallOptions, Client};
use zrpc_proto::{encode_frame, Envelope, FrameDecoder, PROTOCOL_VERSION};
use zrpc_service::{
    rpc_method, service, Blob, Context, HandlerFuture, MethodInfo, Server, Service,
};

use crate::util::{barrier, die, hold, mono_ns, ClientResult};

/// Name the echo service registers.
pub const ECHO_SERVICE: &str = "bench_echo";

/// The echo service: returns its `bin` payload.
pub struct Echo;

#[service(name = "bench_echo")]
impl Echo {
    /// Returns the payload unchanged (MessagePack `bin` both ways), as a
    /// [`Blob`]: decoded as a view into the request, no copy.
    #[rpc_method]
    fn echo(&mut self, payload: Blob) -> Blob {
        payload
    }

    /// The same with `serde_bytes::ByteBuf` (decoding copies), for the
    /// `_bytebuf` diagnostic.
    #[rpc_method]
    fn echo_bytebuf(&mut self, payload: ByteBuf) -> ByteBuf {
        payload
    }
}

/// Name the raw-payload echo service registers.
pub const RAW_ECHO_SERVICE: &str = "bench_echo_raw";

/// A hand-written service whose `echo` returns the request payload as the
/// very `Bytes` it arrived in (no MessagePack decoding or encoding): the
/// lower bound of what the service library can do.
pub struct RawEcho;

impl Service for RawEcho {
    fn service_name(&self) -> String {
        RAW_ECHO_SERVICE.to_string()
    }

    fn methods(&self) -> Vec<MethodInfo> {
        Vec::new()
    }

    fn handle<'a>(
        &'a mut self,
        _ctx: &'a Context,
        _method: &'a str,
        payload: Bytes,
    ) -> HandlerFuture<'a> {
        Box::pin(std::future::ready(Ok(payload)))
    }
}

/// Runs the echo service (`raw`: [`RawEcho`]) until killed; `no_cache`
/// turns the library's reply cache off (a diagnostic).
pub fn service(dir: &Path, raw: bool, no_cache: bool) {
    let r = if raw {
        let mut s = Server::new(RawEcho).socket_dir(dir);
        if no_cache {
            s = s.reply_cache(0, 0);
        }
        s.run()
    } else {
        let mut s = Server::new(Echo).socket_dir(dir);
        if no_cache {
            s = s.reply_cache(0, 0);
        }
        s.run()
    };
    if let Err(e) = r {
        die(format!("echo service: {e}"));
    }
}

/// Which client flavour measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    /// Async `Client` on a current-thread tokio runtime.
    Current,
    /// Async `Client` on a multi-thread tokio runtime (default worker count).
    Multi,
    /// `BlockingClient` (one call in flight).
    Blocking,
    /// Async `Client::call_raw` on a current-thread runtime, to the
    /// [`RawEcho`] service: no serde on either side.
    Raw,
    /// Async `Client` on a current-thread runtime with
    /// `serde_bytes::ByteBuf` payloads instead of [`Blob`]s (method
    /// `echo_bytebuf`): decoding copies on both sides.
    ByteBuf,
}

impl Flavour {
    /// Parses `current`, `multi` or `blocking`.
    pub fn parse(s: &str) -> Option<Flavour> {
        match s {
            "current" => Some(Flavour::Current),
            "multi" => Some(Flavour::Multi),
            "blocking" => Some(Flavour::Blocking),
            "raw" => Some(Flavour::Raw),
            "bytebuf" => Some(Flavour::ByteBuf),
            _ => None,
        }
    }
}

/// What one echo call sends: the payload as a [`Blob`], as a `ByteBuf`, or
/// pre-encoded for `call_raw`.
#[derive(Clone)]
struct EchoPayload {
    flavour: Flavour,
    blob: Blob,
    bytebuf: ByteBuf,
    encoded: Bytes,
}

/// One echo call; returns the size of the echoed payload.
async fn echo_once(client: &Client, p: &EchoPayload) -> usize {
    let r = match p.flavour {
        Flavour::Raw => client
            .call_raw(
                RAW_ECHO_SERVICE,
                "echo",
                p.encoded.clone(),
                CallOptions::default(),
            )
            .await
            .map(|r| r.len()),
        Flavour::ByteBuf => client
            .call::<_, ByteBuf>(ECHO_SERVICE, "echo_bytebuf", &p.bytebuf, None)
            .await
            .map(|r| r.len()),
        _ => client
            .call::<_, Blob>(ECHO_SERVICE, "echo", &p.blob, None)
            .await
            .map(|r| r.len()),
    };
    r.unwrap_or_else(|e| die(format!("call: {e}")))
}

async fn run_async(
    client: &Client,
    flavour: Flavour,
    inflight: usize,
    n: usize,
    size: usize,
) -> Vec<u64> {
    let blob = Blob::from(vec![0x5au8; size]);
    // The same value pre-encoded as MessagePack bin, for `call_raw`.
    let encoded = Bytes::from(rmp_serde::to_vec(&blob).unwrap_or_else(|e| die(e)));
    let expect = if flavour == Flavour::Raw {
        encoded.len()
    } else {
        size
    };
    let payload = Arc::new(EchoPayload {
        flavour,
        bytebuf: ByteBuf::from(vec![0x5au8; size]),
        blob,
        encoded,
    });
    if inflight == 1 {
        let mut lat = Vec::with_capacity(n);
        for _ in 0..n {
            let t = mono_ns();
            let len = echo_once(client, &payload).await;
            lat.push(mono_ns() - t);
            if len != expect {
                die("echo returned a different size");
            }
        }
        return lat;
    }
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..inflight {
        let (client, next, payload) = (client.clone(), next.clone(), payload.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(n / inflight + 1);
            while next.fetch_add(1, Ordering::Relaxed) < n {
                let t = mono_ns();
                let len = echo_once(&client, &payload).await;
                lat.push(mono_ns() - t);
                if len != expect {
                    die("echo returned a different size");
                }
            }
            lat
        }));
    }
    let mut all = Vec::with_capacity(n);
    for t in tasks {
        all.extend(t.await.unwrap_or_else(|e| die(e)));
    }
    all
}

/// The measuring client: `warmup` calls, the start barrier, then `calls`
/// calls with `inflight` in flight; prints a result line.
pub fn client(
    dir: &Path,
    flavour: Flavour,
    inflight: usize,
    warmup: usize,
    calls: usize,
    size: usize,
) {
    if flavour == Flavour::Blocking {
        let c = BlockingClient::builder()
            .socket_dir(dir)
            .connect_blocking()
            .unwrap_or_else(|e| die(format!("connect: {e}")));
        let payload = Blob::from(vec![0x5au8; size]);
        let run = |n: usize| {
            let mut lat = Vec::with_capacity(n);
            for _ in 0..n {
                let t = mono_ns();
                let r: Blob = c
                    .call(ECHO_SERVICE, "echo", &payload, None)
                    .unwrap_or_else(|e| die(format!("call: {e}")));
                lat.push(mono_ns() - t);
                if r.len() != size {
                    die("echo returned a different size");
                }
            }
            lat
        };
        run(warmup);
        barrier();
        let start = mono_ns();
        let lat = run(calls);
        let end = mono_ns();
        println!(
            "{}",
            ClientResult::from_latencies(lat, start, end).to_line()
        );
        return;
    }
    let rt = match flavour {
        Flavour::Multi => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
        _ => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .on_thread_park(zrpc_client::busy_poll::before_park)
            .build(),
    }
    .unwrap_or_else(|e| die(e));
    // Busy polling as a client opts in to it (`zrpc_client::busy_poll`):
    // the default window unless ZRPC_BUSY_POLL_US says otherwise (0 in the
    // `*_nopoll` rows). Only the current-thread flavours opt in: the
    // multi-thread one is the README's client, which does not (no poller,
    // not even an unused one watching the socket).
    let _polling = (flavour != Flavour::Multi).then(|| {
        zrpc_client::busy_poll::enable(zrpc_client::busy_poll::default_window())
            .unwrap_or_else(|e| die(e))
    });
    rt.block_on(async {
        let c = Client::builder()
            .socket_dir(dir)
            .connect()
            .await
            .unwrap_or_else(|e| die(format!("connect: {e}")));
        run_async(&c, flavour, inflight, warmup, size).await;
        // The barrier blocks this thread; nothing is in flight meanwhile.
        crate::util::measured(run_async(&c, flavour, inflight, calls, size)).await;
    });
}

/// The paced client of `busy_poll_cost`: a `BlockingClient` calling echo
/// at a fixed `rate` for `seconds` (sleeping until each call's start time,
/// so that it does not compete for a CPU; a late call starts at once),
/// after 200 warm-up calls and the start barrier; prints `done N P50_NS`.
pub fn paced(dir: &Path, rate: u64, seconds: f64) {
    let c = BlockingClient::builder()
        .socket_dir(dir)
        .connect_blocking()
        .unwrap_or_else(|e| die(format!("connect: {e}")));
    let payload = Blob::from(vec![0x5au8; 64]);
    let call = || {
        let r: Blob = c
            .call(ECHO_SERVICE, "echo", &payload, None)
            .unwrap_or_else(|e| die(format!("call: {e}")));
        if r.len() != payload.len() {
            die("echo returned a different size");
        }
    };
    for _ in 0..200 {
        call();
    }
    barrier();
    let n = (rate.max(1) as f64 * seconds) as u64;
    let gap = 1_000_000_000 / rate.max(1);
    let start = mono_ns();
    let mut lat = Vec::with_capacity(n as usize);
    for i in 0..n {
        let at = start + i * gap;
        let now = mono_ns();
        if at > now {
            std::thread::sleep(std::time::Duration::from_nanos(at - now));
        }
        let t = mono_ns();
        call();
        lat.push(mono_ns() - t);
    }
    lat.sort_unstable();
    println!("done {n} {}", crate::util::percentile(&lat, 50.0));
}

/// A raw protocol connection (for the memory and names helpers).
struct RawConn {
    s: UnixStream,
    rbuf: BytesMut,
    dec: FrameDecoder,
}

impl RawConn {
    fn connect(dir: &Path) -> std::io::Result<RawConn> {
        let mut s = UnixStream::connect(zrpc_proto::socket_path(dir))?;
        let mut out = BytesMut::new();
        encode_frame(
            &mut out,
            &Envelope::Hello {
                version: PROTOCOL_VERSION,
                instance: u64::from(std::process::id()) << 20 | mono_ns() & 0xfffff,
                agent: "zrpc-bench",
                caps: 0,
            },
            &[],
        );
        s.write_all(&out)?;
        Ok(RawConn {
            s,
            rbuf: BytesMut::new(),
            dec: FrameDecoder::new(zrpc_proto::DEFAULT_MAX_MESSAGE_SIZE),
        })
    }

    /// Reads until one frame is complete; calls `f` with its envelope.
    fn next<T>(&mut self, mut f: impl FnMut(Envelope<'_>) -> T) -> T {
        loop {
            match self.dec.decode(&mut self.rbuf) {
                Ok(Some(frame)) => match frame.decode() {
                    Ok(env) => return f(env),
                    Err(e) => die(format!("bad envelope: {e}")),
                },
                Ok(None) => {}
                Err(e) => die(format!("bad frame: {e}")),
            }
            let mut tmp = [0u8; 64 * 1024];
            match self.s.read(&mut tmp) {
                Ok(0) => die("the broker closed the connection"),
                Ok(n) => self.rbuf.extend_from_slice(&tmp[..n]),
                Err(e) => die(e),
            }
        }
    }

    fn welcome(&mut self) {
        self.next(|env| match env {
            Envelope::Welcome { .. } => {}
            other => die(format!("expected Welcome, got {other:?}")),
        });
    }

    /// Registers names (one write), waits for every Ack.
    fn register(&mut self, names: &[String]) {
        let mut out = BytesMut::new();
        for (i, name) in names.iter().enumerate() {
            encode_frame(
                &mut out,
                &Envelope::Register {
                    req: i as u64 + 1,
                    name,
                    shared: false,
                },
                &[],
            );
        }
        self.s.write_all(&out).unwrap_or_else(|e| die(e));
        let mut acked = 0;
        while acked < names.len() {
            self.next(|env| match env {
                Envelope::Ack { code: None, .. } => acked += 1,
                Envelope::Ack { code, message, .. } => {
                    die(format!("register failed: {code:?} {message}"))
                }
                _ => {}
            });
        }
    }
}

/// Holds `count` idle connections (each said Hello and got Welcome) until
/// stdin closes.
pub fn idle(dir: &Path, count: usize) {
    let limit = crate::util::raise_nofile(count as u64 + 1024);
    if limit < count as u64 + 64 {
        die(format!("RLIMIT_NOFILE is only {limit}"));
    }
    barrier();
    let mut conns = Vec::with_capacity(count);
    for _ in 0..count {
        conns.push(RawConn::connect(dir).unwrap_or_else(|e| die(format!("connect: {e}"))));
    }
    for c in &mut conns {
        c.welcome();
        c.rbuf = BytesMut::new();
    }
    println!("done");
    let _ = std::io::stdout().flush();
    hold();
}

/// Registers `count` names (spread over connections of at most 10,000
/// names each) and holds them until stdin closes.
pub fn namer(dir: &Path, count: usize, prefix: &str) {
    let names: Vec<String> = (0..count).map(|i| format!("{prefix}{i:06}")).collect();
    let mut conns = Vec::new();
    for chunk in names.chunks(10_000) {
        let mut c = RawConn::connect(dir).unwrap_or_else(|e| die(format!("connect: {e}")));
        c.welcome();
        c.register(chunk);
        conns.push(c);
    }
    println!("ready");
    let _ = std::io::stdout().flush();
    hold();
}

/// A service that registers `name`, reads and counts requests and never
/// answers. Prints `done` once `count` requests arrived, then keeps reading.
pub fn sink(dir: &Path, name: &str, count: usize) {
    let mut c = RawConn::connect(dir).unwrap_or_else(|e| die(format!("connect: {e}")));
    c.welcome();
    c.register(&[name.to_string()]);
    println!("ready");
    let _ = std::io::stdout().flush();
    let mut got = 0;
    let mut said = false;
    loop {
        c.next(|env| {
            if let Envelope::Request { .. } = env {
                got += 1;
            }
        });
        if got >= count && !said {
            said = true;
            println!("done");
            let _ = std::io::stdout().flush();
        }
    }
}

/// Sends `count` calls without deadline (payload: MessagePack nil, what a
/// zrpc client sends for "no argument") to `name` after the
/// start barrier, then holds the connection until stdin closes.
pub fn caller(dir: &Path, name: &str, count: usize) {
    let mut c = RawConn::connect(dir).unwrap_or_else(|e| die(format!("connect: {e}")));
    c.welcome();
    barrier();
    let mut out = BytesMut::with_capacity(64 * 1024);
    for id in 1..=count as u64 {
        encode_frame(
            &mut out,
            &Envelope::Call {
                id,
                service: name,
                method: "wait",
                timeout_ms: None,
                flags: 0,
            },
            zrpc_proto::NIL_PAYLOAD,
        );
        if out.len() > 60 * 1024 {
            c.s.write_all(&out).unwrap_or_else(|e| die(e));
            out.clear();
        }
    }
    c.s.write_all(&out).unwrap_or_else(|e| die(e));
    println!("sent");
    let _ = std::io::stdout().flush();
    hold();
}

/// The socket directory argument as a path.
pub fn dir_arg(s: &str) -> PathBuf {
    PathBuf::from(s)
}
