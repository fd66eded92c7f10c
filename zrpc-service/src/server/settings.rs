//! The settings of a [`Server`]: its names, socket directory, reconnection,
//! busy polling, reply cache, concurrency limits and how it stops.

use std::path::PathBuf;
use std::time::Duration;

use super::Server;
use crate::stop::ShutdownHandle;
use crate::Service;

impl<S: Service> Server<S> {
    /// Registers the service under `name` instead of its default name
    /// (replaces all names set so far).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.setup.names = vec![name.into()];
        self
    }

    /// Registers the service under an additional name.
    pub fn add_name(mut self, name: impl Into<String>) -> Self {
        let name = name.into();
        if !self.setup.names.contains(&name) {
            self.setup.names.push(name);
        }
        self
    }

    /// The names the service registers.
    pub fn names(&self) -> &[String] {
        &self.setup.names
    }

    /// With `true`, join other instances of the same name (all of which must
    /// be shared) instead of requiring the name exclusively; the broker
    /// spreads calls over the instances.
    pub fn shared(mut self, yes: bool) -> Self {
        self.setup.shared = yes;
        self
    }

    /// How long connecting to the broker, the handshake and registering
    /// the names may take, for the first connection and every reconnection
    /// (default 10 s; at least 1 ms): past it, [`Error::HandshakeTimeout`](crate::Error::HandshakeTimeout)
    /// (the first connection fails with it; a reconnection tries again
    /// after its backoff).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.setup.timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// The directory holding the broker socket `zrpcd.sock` (the original's
    /// `socket_dir`). It must match the broker's.
    pub fn socket_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.setup.socket_dir = Some(dir.into());
        self
    }

    /// With `true` (the default), a lost broker connection (end of stream,
    /// I/O error, `Fatal` from the broker, e.g. `Shutdown`) is re-established
    /// by the run methods themselves: they log a warning, reconnect with
    /// capped exponential backoff ([`reconnect_backoff`](Self::reconnect_backoff)),
    /// register every name again and only then take calls again; they do
    /// not return. With `false`, they return the error (the behaviour before
    /// reconnection existed). The very first connection fails fast either
    /// way.
    pub fn reconnect(mut self, yes: bool) -> Self {
        self.link.reconnect = yes;
        self
    }

    /// The reconnection backoff: the first attempt after a loss waits `min`
    /// (default 10 ms), each failed attempt doubles the wait up to `max`
    /// (default 1 s); every wait is randomised by +-25 % so that many
    /// services do not reconnect in lock-step. `min` is at least 1 ms and
    /// `max` at least `min`.
    pub fn reconnect_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.link.backoff = zrpc_io::Backoff::new(min, max);
        self
    }

    /// How long [`run`](Server::run) and [`run_once`](Server::run_once) keep
    /// polling the broker connection, when requests have been arriving less
    /// than this apart, before the thread sleeps until the next one (default
    /// 50 us, or `$ZRPC_BUSY_POLL_US`; zero turns it off; at most 1 ms;
    /// always off on a single CPU and under [`serve`](Server::serve)).
    ///
    /// Polling saves the wake-up of a sleeping process per request under
    /// load (on a VM the costliest part of a call: at 64 calls in flight
    /// ~1.2x the requests per second, one call at a time about half the
    /// latency, docs/performance.md), at the price of CPU while requests
    /// flow that fast: a process whose requests arrive back to back polls
    /// instead of sleeping between them, up to one CPU. It polls only while
    /// at least three in four recent requests arrived within a window of
    /// the process running out of work: never when idle, nor for a request
    /// every 100 us or more. The broker connection is polled, and so is the
    /// connection of a `zrpc_client::Client` that a handler connects on
    /// this runtime (its replies are watched too); the readiness of file
    /// descriptors added with [`register`](Server::register) and timers
    /// are seen at the end of a poll, at most one window late. Set it
    /// before the first `run`/`run_once`. How it works:
    /// `zrpc_io::busy_poll`.
    pub fn busy_poll(mut self, window: Duration) -> Self {
        self.busy_poll_window = window;
        self
    }

    /// Bounds of the reply cache (defaults: 10,000 entries and 16 MiB of
    /// reply payloads and error messages), for all callers together; the
    /// oldest entry of the caller uid holding the largest share is evicted
    /// first (one user calling fast does not evict another's). Either bound
    /// 0 disables the cache, and with it the de-duplication of re-sent
    /// calls. See the crate documentation.
    ///
    /// The cache must hold the replies sent shortly before a connection
    /// broke, until their calls are re-sent after the reconnect; while the
    /// broker is away no new calls arrive, so the byte bound only needs to
    /// cover the replies of the calls in flight then (16 MiB: sixteen
    /// 1 MiB replies). Raise it for services with many large concurrent
    /// calls.
    pub fn reply_cache(mut self, max_entries: usize, max_bytes: usize) -> Self {
        self.cache.set_bounds(max_entries, max_bytes);
        self
    }

    /// How many `&self` handlers may run at once (default 64, at least 1).
    /// Requests beyond it wait in the server's queue (see
    /// [`max_queued`](Self::max_queued)). `&mut self` handlers always run
    /// alone.
    pub fn max_concurrent(mut self, n: usize) -> Self {
        self.running.limit = n.max(1);
        self
    }

    /// How many received requests may wait in the server's queue while
    /// concurrent handlers run (default 1024, at least 1). With the queue
    /// full the server stops reading from the broker until handlers finish:
    /// the requests wait in the broker instead (bounded there by
    /// `--max-queued-bytes` and the pending-call limits). Pings wait too
    /// then; a queue that stays full for longer than the broker's heartbeat
    /// timeout gets the service disconnected (its calls are re-delivered).
    pub fn max_queued(mut self, n: usize) -> Self {
        self.max_queued = n.max(1);
        self
    }

    /// With `true` (the default), [`serve`](Self::serve) and
    /// [`run`](Self::run) stop gracefully on SIGTERM (what `systemctl
    /// stop` sends) and SIGINT (Ctrl-C): they release the service's names,
    /// answer every call already delivered, and return `Ok(())`; a second
    /// signal stops at once. With `false`, the signals keep their default
    /// action (the process dies, and the broker re-delivers its calls).
    /// Once `serve` has listened for them, the signals stay caught for the
    /// life of the process (tokio does not restore the default action):
    /// while no `serve` runs they are ignored. Stopping through a
    /// [`ShutdownHandle`] works either way.
    pub fn stop_on_signals(mut self, yes: bool) -> Self {
        self.stop.on_signals = yes;
        self
    }

    /// How long a graceful stop may wait for the calls already delivered
    /// (default 30 s): then the handlers still running are dropped, as if
    /// the process had died (the broker re-delivers their calls, or the
    /// callers of `no_retry` calls get `ServiceGone`). The replies of the
    /// calls that did run get at least 1 s more to be written out. Keep it
    /// below systemd's `TimeoutStopSec` (90 s by default).
    ///
    /// Not bounded by it: a handler that blocks the thread (a synchronous
    /// one), and writing replies to a broker that stopped reading (the
    /// process then waits for systemd's `SIGKILL`).
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.stop.timeout = timeout;
        self
    }

    /// A handle that stops [`serve`](Self::serve) or [`run`](Self::run)
    /// gracefully from any thread or task, like SIGTERM (see
    /// [`stop_on_signals`](Self::stop_on_signals)).
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.stop.handle()
    }
}
