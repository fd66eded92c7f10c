//! A service used by the end-to-end tests.
//!
//! Usage: `zrpc-test-svc [--name NAME] [--shared]` (default name `echo`);
//! `$ZRPC_TEST_DRAIN_TIMEOUT_MS` sets `Server::drain_timeout`.

use std::collections::HashMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use zrpc_service::{rpc_method, service, Context, Server, Value};

/// Typed payload for the typed-struct round trip.
#[derive(Debug, Serialize, Deserialize)]
struct Point {
    x: i64,
    y: f64,
    label: String,
    #[serde(with = "serde_bytes")]
    raw: Vec<u8>,
}

/// A recursive argument whose levels are enum variants (an expression
/// tree): how deep a caller may nest it is bounded by the library.
#[derive(Debug, Serialize, Deserialize)]
enum Expr {
    Lit(i64),
    Neg(Box<Expr>),
}

impl Expr {
    fn eval(&self) -> i64 {
        let (mut e, mut sign) = (self, 1i64);
        loop {
            match e {
                Expr::Lit(n) => return sign.wrapping_mul(*n),
                Expr::Neg(inner) => {
                    sign = -sign;
                    e = inner;
                }
            }
        }
    }
}

/// A newtype around an option of itself.
#[derive(Debug, Serialize, Deserialize)]
struct Chain(Option<Box<Chain>>);

#[derive(Default)]
struct TestSvc {
    /// How often `record` ran for each key (to detect double execution).
    executions: HashMap<u64, u64>,
}

#[service(name = "echo")]
impl TestSvc {
    /// Returns its payload unchanged.
    #[rpc_method]
    fn echo(&mut self, payload: Value) -> Value {
        payload
    }

    /// Returns its binary payload unchanged; `Blob` arguments are views
    /// into the request (no copy).
    #[rpc_method]
    fn blob(&mut self, b: zrpc_service::Blob) -> zrpc_service::Blob {
        b
    }

    /// Moves a typed point by (1, 1.5).
    #[rpc_method]
    fn shift(&mut self, p: Point) -> Point {
        Point {
            x: p.x + 1,
            y: p.y + 1.5,
            ..p
        }
    }

    /// `n` bytes (a reply larger than its arguments).
    #[rpc_method]
    fn bytes(&mut self, n: u64) -> serde_bytes::ByteBuf {
        serde_bytes::ByteBuf::from(vec![0x5a; usize::try_from(n).unwrap_or(0).min(16 << 20)])
    }

    /// Fails with the given message.
    #[rpc_method]
    fn fail(&mut self, msg: String) -> Result<(), String> {
        Err(msg)
    }

    /// Fails with an error that is `Display` only (not `Serialize`).
    #[rpc_method]
    fn fail_io(&mut self, msg: String) -> Result<(), std::io::Error> {
        Err(std::io::Error::other(msg))
    }

    /// Evaluates an expression tree.
    #[rpc_method]
    fn eval(&mut self, e: Expr) -> i64 {
        e.eval()
    }

    /// How many links a chain has.
    #[rpc_method]
    fn chain(&mut self, c: Chain) -> u64 {
        let (mut n, mut next) = (0, c.0.as_deref());
        while let Some(c) = next {
            n += 1;
            next = c.0.as_deref();
        }
        n
    }

    /// Panics.
    #[rpc_method]
    fn panic(&mut self) -> u32 {
        panic!("deliberate panic in a handler")
    }

    /// Sleeps `ms` milliseconds, then returns this process's pid.
    #[rpc_method]
    async fn sleep(&mut self, ms: u64) -> u32 {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        std::process::id()
    }

    /// Blocks the service thread for `ms` milliseconds (cannot be
    /// cancelled), then returns this process's pid.
    #[rpc_method]
    fn block(&mut self, ms: u64) -> u32 {
        std::thread::sleep(Duration::from_millis(ms));
        std::process::id()
    }

    /// This process's pid.
    #[rpc_method]
    fn pid(&mut self) -> u32 {
        std::process::id()
    }

    /// The caller's identity as the broker reported it: (uid, gid, pid),
    /// or nil.
    #[rpc_method]
    fn whoami(&mut self, ctx: &Context) -> Option<(u32, u32, u32)> {
        ctx.caller().map(|c| (c.uid, c.gid, c.pid))
    }

    /// The request counter as the handler sees it.
    #[rpc_method]
    fn counter(&mut self, ctx: &Context) -> u64 {
        ctx.counter()
    }

    /// Counts one execution for `key`, sleeps `ms` milliseconds
    /// (asynchronously), then returns `(key, executions so far for key)`.
    #[rpc_method]
    async fn record(&mut self, (key, ms): (u64, u64)) -> (u64, u64) {
        let n = self.executions.entry(key).or_insert(0);
        *n += 1;
        let n = *n;
        tokio::time::sleep(Duration::from_millis(ms)).await;
        (key, n)
    }

    /// [`record`](Self::record) with a binary payload: counts one
    /// execution for `key`, sleeps `ms` milliseconds, then returns the
    /// executions so far and the bytes unchanged (large payloads travel as
    /// sealed memfds; resubmissions must still have them).
    #[rpc_method]
    async fn record_blob(
        &mut self,
        (key, ms, b): (u64, u64, zrpc_service::Blob),
    ) -> (u64, zrpc_service::Blob) {
        let n = self.executions.entry(key).or_insert(0);
        *n += 1;
        let n = *n;
        tokio::time::sleep(Duration::from_millis(ms)).await;
        (n, b)
    }

    /// How often `record` ran for `key` in this process.
    #[rpc_method]
    fn executions(&mut self, key: u64) -> u64 {
        self.executions.get(&key).copied().unwrap_or(0)
    }
}

fn main() {
    let mut name = None;
    let mut shared = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--name" => name = args.next(),
            "--shared" => shared = true,
            other => {
                eprintln!("zrpc-test-svc: unknown argument {other:?}");
                std::process::exit(2);
            }
        }
    }
    let mut server = Server::new(TestSvc::default()).shared(shared);
    if let Some(ms) = std::env::var("ZRPC_TEST_DRAIN_TIMEOUT_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        server = server.drain_timeout(Duration::from_millis(ms));
    }
    if let Some(n) = std::env::var("ZRPC_TEST_REPLY_CACHE")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        // Entries (the byte bound stays the default).
        server = server.reply_cache(n, 16 << 20);
    }
    if let Some(n) = name {
        server = server.name(n);
    }
    if let Err(e) = server.run() {
        eprintln!("zrpc-test-svc: {e}");
        std::process::exit(1);
    }
}
