//! A service implementing the `Calc` interface (`zrpc_tests::typed`) for
//! the typed-client and concurrency tests. Socket directory:
//! `$ZRPC_SOCKET_DIR`; `$ZRPC_TEST_MAX_CONCURRENT` sets
//! `Server::max_concurrent`, `$ZRPC_TEST_MAX_QUEUED` `Server::max_queued`,
//! `$ZRPC_TEST_DRAIN_TIMEOUT_MS`
//! `Server::drain_timeout`, and `$ZRPC_TEST_NO_STOP_SIGNALS` turns
//! `Server::stop_on_signals` off.

use std::cell::Cell;
use std::time::Duration;

use zrpc_tests::typed::{Calc, CalcError, HoldStats, Pair, Refusal};

struct CalcServer {
    bumps: u64,
    holds: Cell<HoldStats>,
}

/// Counts one `hold` handler from its start to its end or its drop.
struct Holding<'a> {
    stats: &'a Cell<HoldStats>,
    finished: bool,
}

impl<'a> Holding<'a> {
    fn new(stats: &'a Cell<HoldStats>) -> Self {
        let mut s = stats.get();
        s.started += 1;
        s.running += 1;
        s.max_overlap = s.max_overlap.max(s.running);
        stats.set(s);
        Holding {
            stats,
            finished: false,
        }
    }
}

impl Drop for Holding<'_> {
    fn drop(&mut self) {
        let mut s = self.stats.get();
        s.running -= 1;
        if self.finished {
            s.finished += 1;
        } else {
            s.dropped += 1;
        }
        self.stats.set(s);
    }
}

#[zrpc_service::service]
impl Calc for CalcServer {
    fn add(&self, p: Pair) -> f64 {
        p.a + p.b
    }

    fn version(&self) -> String {
        "calc/1".into()
    }

    fn divide(&self, p: Pair) -> Result<f64, CalcError> {
        if p.b == 0.0 {
            return Err(CalcError::DivisionByZero);
        }
        Ok(p.a / p.b)
    }

    fn check(&self, x: i64) -> Result<i64, Refusal> {
        match x {
            ..=10 => Ok(x),
            _ => Err(Refusal { limit: 10 }),
        }
    }

    async fn double_later(&self, x: u64) -> u64 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        x * 2
    }

    fn bump(&mut self) {
        self.bumps += 1;
    }

    fn bumps(&self) -> u64 {
        self.bumps
    }

    fn counter(&self) -> u64 {
        zrpc_service::Context::current().map_or(0, |c| c.counter())
    }

    async fn counter_later(&self) -> u64 {
        tokio::time::sleep(Duration::from_millis(5)).await;
        zrpc_service::Context::current().map_or(0, |c| c.counter())
    }

    async fn hold(&self, ms: u64) -> u64 {
        let mut holding = Holding::new(&self.holds);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        holding.finished = true;
        ms
    }

    fn hold_stats(&self) -> HoldStats {
        self.holds.get()
    }
}

fn main() -> Result<(), zrpc_service::Error> {
    let mut server = zrpc_service::Server::new(CalcServer {
        bumps: 0,
        holds: Cell::new(HoldStats::default()),
    });
    if let Some(n) = std::env::var("ZRPC_TEST_MAX_CONCURRENT")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        server = server.max_concurrent(n);
    }
    if let Some(n) = std::env::var("ZRPC_TEST_MAX_QUEUED")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        server = server.max_queued(n);
    }
    if std::env::var_os("ZRPC_TEST_SHARED").is_some() {
        server = server.shared(true);
    }
    if let Some(ms) = std::env::var("ZRPC_TEST_DRAIN_TIMEOUT_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        server = server.drain_timeout(Duration::from_millis(ms));
    }
    if std::env::var_os("ZRPC_TEST_NO_STOP_SIGNALS").is_some() {
        server = server.stop_on_signals(false);
    }
    server.run()
}
