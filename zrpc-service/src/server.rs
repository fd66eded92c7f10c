//! The public face of the service library: [`Server`], its settings, and
//! the run methods (blocking on a private runtime, or async under the
//! caller's).

use std::future::Future;
use std::rc::Rc;
use std::time::Duration;

use tokio::time::Instant;
use zrpc_io::busy_poll::BusyPoll;

use crate::cache::{ReplyCache, DEFAULT_MAX_BYTES, DEFAULT_MAX_ENTRIES};
use crate::dispatch::{Dispatch, Next};
use crate::error::{Error, Event};
use crate::fds::{self, FdSource, FdWatch};
use crate::link::{Link, Setup, Work};
use crate::running::{Meta, Running, DEFAULT_MAX_QUEUED};
use crate::stop::{Step, Stop};
use crate::{HandlerError, Service};

mod settings;

/// The least time a stop gives its last replies to be written out (see
/// `close_stopped`).
const FINAL_FLUSH: Duration = Duration::from_secs(1);

/// `serve` lets other tasks run after this many steps (see `block_on`).
const YIELD_EVERY_STEPS: u32 = 512;

/// A zrpc server: connects a [`Service`] to the broker under one or more
/// names and serves its requests, plus callbacks for registered file
/// descriptors.
///
/// Handlers taking `&self` run concurrently (`async fn`s overlap while they
/// wait; up to [`max_concurrent`](Self::max_concurrent) at a time), all on
/// the server's thread; a handler taking `&mut self`, and a file descriptor
/// callback, runs alone, once the running `&self` handlers are done. Pings,
/// cancels and `zrpc.describe` are answered while handlers run.
///
/// The connection is made lazily by the first [`run`](Self::run),
/// [`run_once`](Self::run_once), [`serve`](Self::serve) or
/// [`serve_once`](Self::serve_once). Use either the blocking methods (which
/// drive a private current-thread tokio runtime, kept between calls) or the
/// async ones under your own runtime, not both: the connection and the
/// watched descriptors belong to the runtime that created them.
///
/// If the first connection fails, the run methods return the error. Once
/// connected, a lost connection is re-established by the loop itself (see
/// [`reconnect`](Self::reconnect) and the crate documentation); with
/// `reconnect(false)` the run methods return the error instead, and calling
/// one again reconnects and registers the names again.
pub struct Server<S: Service> {
    /// Shared with the running `&self` handlers; exclusive (`Rc::get_mut`)
    /// when none runs.
    service: Rc<S>,
    /// The running `&self` handlers (dropped before the runtime).
    running: Running,
    /// Requests queued beyond which the broker connection is not read.
    max_queued: usize,
    setup: Setup,
    counter: u64,
    fds: Vec<FdWatch<S>>,
    next_fd: usize,
    cache: ReplyCache,
    link: Link,
    /// Busy-poll window of `run`/`run_once`, and the poller once made.
    busy_poll_window: Duration,
    busy_poll: Option<Rc<BusyPoll>>,
    /// Stop requests, signals and the drain in progress.
    stop: Stop,
    // Declared last: dropped after everything registered with it.
    rt: Option<tokio::runtime::Runtime>,
}

impl<S: Service> std::fmt::Debug for Server<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("names", &self.setup.names)
            .field("shared", &self.setup.shared)
            .field("socket_dir", &self.setup.socket_dir)
            .field("instance", &self.setup.instance)
            .field("counter", &self.counter)
            .field("running", &self.running.len())
            .field("fds", &self.fds.iter().map(|w| w.fd).collect::<Vec<_>>())
            .field("connected", &self.link.conn.is_some())
            .field("reconnect", &self.link.reconnect)
            .field("cached_replies", &self.cache.len())
            .finish()
    }
}

impl<S: Service> Server<S> {
    /// A server for `service`, named [`Service::service_name`] (the type
    /// name in snake_case for macro services), using the default socket
    /// directory (`$ZRPC_SOCKET_DIR`, else the default, `/run/zrpc`).
    pub fn new(service: S) -> Self {
        let name = service.service_name();
        Server {
            service: Rc::new(service),
            running: Running::new(),
            max_queued: DEFAULT_MAX_QUEUED,
            setup: Setup {
                names: vec![name],
                shared: false,
                socket_dir: None,
                instance: zrpc_io::random_id(),
                timeout: crate::link::HANDSHAKE_TIMEOUT,
            },
            counter: 0,
            fds: Vec::new(),
            next_fd: 0,
            cache: ReplyCache::new(DEFAULT_MAX_ENTRIES, DEFAULT_MAX_BYTES),
            link: Link::new(),
            busy_poll_window: BusyPoll::window_from_env(zrpc_io::busy_poll::DEFAULT_WINDOW_US),
            busy_poll: None,
            stop: Stop::new(),
            rt: None,
        }
    }

    /// Number of `&self` handlers running now (after a
    /// [`run_once`](Self::run_once), those it started and that have not
    /// finished yet: they go on at the next call).
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// Number of replies in the reply cache.
    pub fn cached_replies(&self) -> usize {
        self.cache.len()
    }

    /// Bytes of reply payloads and error messages in the reply cache.
    pub fn cached_reply_bytes(&self) -> usize {
        self.cache.bytes()
    }

    /// Whether the server is connected to the broker right now.
    pub fn is_connected(&self) -> bool {
        self.link.conn.is_some()
    }

    /// The random instance id sent in `Hello` (kept across reconnects).
    pub fn instance(&self) -> u64 {
        self.setup.instance
    }

    /// Calls `callback` inside the service loop whenever `fd` is ready to be
    /// read (the original `register(fd, callback)`). The callback has
    /// exclusive access to the service: it runs when no `&self` handler
    /// does.
    ///
    /// The library never reads from, and never closes, the descriptor:
    /// reading is the callback's job. As with the original's `select`, the
    /// callback runs again as long as the descriptor stays readable
    /// (level-triggered). Pass a raw descriptor or a reference to anything
    /// implementing `AsRawFd` (`&file`; see [`FdSource`]). The loop watches a private
    /// duplicate of the descriptor, so [`unregister`](Self::unregister) it
    /// before closing it (otherwise the duplicate keeps the file open).
    /// Registering a descriptor again replaces its callback. The descriptor
    /// must be pollable by epoll (pipes, sockets, terminals, eventfds; not
    /// regular files), otherwise the run methods return [`Error::Fd`].
    ///
    /// Callbacks keep running while the loop reconnects to the broker.
    /// Like synchronous handlers, a callback blocks the loop (and the
    /// answers to the broker's pings) while it runs.
    ///
    /// ```no_run
    /// # use zrpc_service::{Server, ServiceBuilder};
    /// let stdin = std::io::stdin();
    /// let mut server = Server::new(ServiceBuilder::new("reader").build());
    /// server.register(&stdin, |_svc| {
    ///     let mut line = String::new();
    ///     let _ = std::io::stdin().read_line(&mut line);
    ///     println!("got {line:?}");
    /// });
    /// ```
    pub fn register(&mut self, fd: impl FdSource, callback: impl FnMut(&mut S) + 'static) {
        let fd = fd.raw_fd();
        if let Some(w) = self.fds.iter_mut().find(|w| w.fd == fd) {
            w.callback = Box::new(callback);
        } else {
            self.fds.push(FdWatch {
                fd,
                callback: Box::new(callback),
                async_fd: None,
            });
        }
    }

    /// Stops watching `fd` (the original `unregister(fd)`). Unknown
    /// descriptors are ignored.
    pub fn unregister(&mut self, fd: impl FdSource) {
        let fd = fd.raw_fd();
        self.fds.retain(|w| w.fd != fd);
    }

    /// Number of requests received so far (the original `self.counter`):
    /// every request, `zrpc.describe` and unknown methods included; re-sent
    /// calls answered from the reply cache do not count.
    pub fn counter(&self) -> u64 {
        self.counter
    }

    /// The service.
    pub fn service(&self) -> &S {
        &self.service
    }

    /// The service, mutably.
    ///
    /// # Panics
    ///
    /// If `&self` handlers are still running (only possible between
    /// [`run_once`](Self::run_once) calls: see [`running`](Self::running));
    /// [`try_service_mut`](Self::try_service_mut) returns `None` then.
    pub fn service_mut(&mut self) -> &mut S {
        match Rc::get_mut(&mut self.service) {
            Some(s) => s,
            None => panic!(
                "Server::service_mut: {} handler(s) taking &self are still running; \
                 call run_once until Server::running() is 0, or use try_service_mut",
                self.running.len()
            ),
        }
    }

    /// The service, mutably, unless `&self` handlers are still running.
    pub fn try_service_mut(&mut self) -> Option<&mut S> {
        Rc::get_mut(&mut self.service)
    }

    /// Consumes the server and returns the service. Handlers still running
    /// are dropped (cancelled) first.
    ///
    /// # Panics
    ///
    /// If a hand-written [`Service::handle_shared`] kept a clone of the
    /// service's `Rc` beyond its future.
    pub fn into_service(self) -> S {
        let Server {
            service, running, ..
        } = self;
        drop(running);
        match Rc::try_unwrap(service) {
            Ok(s) => s,
            Err(_) => panic!("Server::into_service: the service's Rc is still shared"),
        }
    }

    /// Serves on a private tokio runtime until stopped: returns `Ok(())`
    /// after a graceful stop (SIGTERM, SIGINT or a [`ShutdownHandle`](crate::ShutdownHandle):
    /// see [`stop_on_signals`](Self::stop_on_signals)), or a hard error:
    /// the first connection failing, [`Error::NameTaken`] when registering
    /// again after a reconnect, or (with [`reconnect(false)`](Self::reconnect))
    /// any connection error.
    pub fn run(&mut self) -> Result<(), Error> {
        self.block_on(|s| Box::pin(s.serve()))?
    }

    /// Waits for one event, handles it and returns it: a request answered,
    /// a re-sent request answered from the reply cache, a request cancelled
    /// while running, or one file descriptor callback run. Returns
    /// `Ok(None)` if nothing happened within `timeout` (`None` waits
    /// forever). Connection and buffers persist between calls. The timeout
    /// bounds the wait for an event, not the handler once started.
    ///
    /// A lost connection is re-established within the same budget: if
    /// `timeout` runs out while reconnecting, `run_once` returns `Ok(None)`
    /// and the next call carries on where it stopped (same backoff).
    pub fn run_once(&mut self, timeout: Option<Duration>) -> Result<Option<Event>, Error> {
        self.block_on(move |s| Box::pin(s.serve_once(timeout)))?
    }

    /// Serves until stopped; the async form of [`run`](Self::run) for use
    /// under an existing tokio runtime (any flavour; the future is not
    /// `Send`, so use `block_on`, a `LocalSet` or `spawn_local`). Returns
    /// `Ok(())` after a graceful stop (SIGTERM, SIGINT or a
    /// [`ShutdownHandle`](crate::ShutdownHandle): see [`stop_on_signals`](Self::stop_on_signals)),
    /// or a hard error as `run` does. Dropping the future abandons the
    /// request being handled (the broker re-delivers it to another
    /// instance, or the caller times out).
    pub async fn serve(&mut self) -> Result<(), Error> {
        self.recover_abandoned_serve();
        self.stop.arm(self.link.reconnect)?;
        let r = self.serve_until_stopped().await;
        self.link.reconnect = self.stop.saved_reconnect();
        self.stop.disarm();
        r
    }

    /// A `serve` future dropped before it returned left its stop armed
    /// (signals still taken, `serve_once` draining) and, if it was
    /// stopping, the names released on a connection that is still up and
    /// reconnection turned off: undone before serving again. The names are
    /// registered again on a new connection.
    #[inline]
    fn recover_abandoned_serve(&mut self) {
        if !self.stop.is_armed() {
            return;
        }
        if self.stop.is_draining() {
            self.link.reset();
        }
        self.link.reconnect = self.stop.saved_reconnect();
        self.stop.disarm();
    }

    async fn serve_until_stopped(&mut self) -> Result<(), Error> {
        let mut steps = 0u32;
        loop {
            // Replies are written out whenever the loop would wait, so a
            // burst of requests is answered with one write.
            match self.step(None, false).await {
                Ok(Some(_)) => {}
                // Without a timeout, only a stop ends a step without an
                // event.
                Ok(None) => {
                    if let Some(end) = self.stop.ended() {
                        self.close_stopped(end).await;
                        return Ok(());
                    }
                }
                Err(e) if self.stop.is_draining() && e.is_connection_error() => {
                    tracing::warn!("lost the zrpcd connection while stopping: {e}");
                    self.close_stopped(Step::GiveUp).await;
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
            steps = steps.wrapping_add(1);
            if steps % YIELD_EVERY_STEPS == 0 {
                // Under `run()` the loop is exempt from tokio's cooperative
                // budget; let other tasks on the runtime (spawned by
                // handlers) run now and then under sustained load.
                tokio::task::yield_now().await;
            }
        }
    }

    /// The end of a stop: the handlers still running dropped (with
    /// `GiveUp`: their calls are re-delivered, or fail with `ServiceGone`
    /// if made with `no_retry`), the last replies written (until the
    /// drain's deadline) and the connection closed, which tells the broker
    /// we are gone.
    async fn close_stopped(&mut self, end: Step) {
        if end == Step::GiveUp {
            self.running = Running::new();
        }
        if let (Some(conn), Some(by)) = (self.link.conn.as_mut(), self.stop.deadline()) {
            // At least a moment for replies of calls that ran (cut, their
            // calls would be re-delivered and run again), even at the
            // deadline.
            let by = by.max(Instant::now() + FINAL_FLUSH);
            if let Ok(Err(e)) = tokio::time::timeout_at(by, conn.flush()).await {
                tracing::warn!("cannot write the last replies: {e}");
            }
        }
        self.link.reset();
    }

    /// The async form of [`run_once`](Self::run_once).
    pub async fn serve_once(&mut self, timeout: Option<Duration>) -> Result<Option<Event>, Error> {
        self.recover_abandoned_serve();
        self.step(timeout, true).await
    }

    /// One event; with `flush_reply` the reply is written before returning.
    async fn step(
        &mut self,
        timeout: Option<Duration>,
        flush_reply: bool,
    ) -> Result<Option<Event>, Error> {
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        if self.running.is_empty() {
            // A hard error kept while handlers ran (see `next_event`).
            if let Some(e) = self.link.deferred.take() {
                return Err(e);
            }
        }
        // Never during a drain: the names were released, and a connection
        // lost meanwhile is not set up again (that would register them
        // again at the broker; see `crate::stop`).
        if self.link.conn.is_none() && !self.link.reconnecting() && !self.stop.is_draining() {
            // The first connection (or any, without reconnect): fail fast.
            let attempt = self.setup.attempt()?;
            let conn = attempt.await?;
            self.link.install(conn);
        }
        let result = self.next_event(deadline, flush_reply).await;
        if let Err(e) = &result {
            if e.is_connection_error() && self.link.conn.is_some() {
                tracing::debug!("dropping the zrpcd connection: {e}");
                self.link.reset();
            }
        }
        result
    }

    fn block_on<T>(
        &mut self,
        f: impl for<'a> FnOnce(&'a mut Self) -> std::pin::Pin<Box<dyn Future<Output = T> + 'a>>,
    ) -> Result<T, Error> {
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err(Error::NestedRuntime);
        }
        let rt = match self.rt.take() {
            Some(rt) => rt,
            None => {
                // A previous runtime (if any) is gone, e.g. after a panic in
                // a callback: drop everything registered with it.
                self.link.reset();
                for w in &mut self.fds {
                    w.async_fd = None;
                }
                // The busy poller lives as long as the runtime (and the
                // connections it watches): made once here, not per call.
                self.busy_poll = BusyPoll::new_or_off(self.busy_poll_window);
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .on_thread_park(zrpc_io::busy_poll::before_park)
                    .build()
                    .map_err(Error::Runtime)?
            }
        };
        // Installed on this thread for this call only (the park hook and a
        // new connection find it there), also if it unwinds.
        let installed = BusyPoll::scoped(self.busy_poll.clone());
        // Exempt from tokio's cooperative budget: the service loop is this
        // private runtime's main work, and running out of budget in the
        // middle of a burst of requests forced a yield and an extra
        // `epoll_wait` every ~50 requests (3,536 epoll_waits for 1,606 reads
        // at 64 in flight; 2,338 for 2,305 without). `serve` yields on its
        // own every YIELD_EVERY_STEPS steps instead.
        let out = rt.block_on(tokio::task::unconstrained(f(self)));
        drop(installed);
        self.rt = Some(rt);
        Ok(out)
    }

    /// The loop behind every run method: handles the frames read so far
    /// and writes replies out, applies cancels to running handlers, handles
    /// the next request ([`Dispatch::handle_next`]: answered, or started
    /// beside the running ones), or else waits for the broker, a running
    /// handler to finish, a watched descriptor or the timeout
    /// ([`Self::wait`]).
    async fn next_event(
        &mut self,
        deadline: Option<Instant>,
        flush_reply: bool,
    ) -> Result<Option<Event>, Error> {
        fds::watch_all(&mut self.fds)?;
        loop {
            if self.running.is_empty() {
                // A hard error met while handlers ran: returned once they
                // are done (their outcomes are cached).
                if let Some(e) = self.link.deferred.take() {
                    return Err(e);
                }
            }
            // Handle the frames read so far (requests queued, pings
            // answered, cancels applied) and write the batched replies out
            // if the flush policy says so. One clock read per request, for
            // the flush interval and the request's deadline (again after a
            // flush that had to wait for a full socket).
            let mut now = std::time::Instant::now();
            if let Some(conn) = self.link.conn.as_mut() {
                let r = async {
                    conn.process()?;
                    if conn.should_flush(now) {
                        conn.flush().await?;
                        now = now.max(conn.last_flush);
                    }
                    Ok(())
                }
                .await;
                if let Err(e) = r {
                    self.lost(e)?;
                    continue;
                }
                let generation = self.link.generation;
                for id in conn.cancels.drain(..) {
                    if !self.running.cancel(generation, id) {
                        tracing::trace!(id, "cancel of a request that is not running");
                    }
                }
            }
            if self.stop.ended().is_some() {
                // Given up inside an exclusive handler: the requests still
                // queued are not started (the broker re-delivers them).
                return Ok(None);
            }
            if self.link.has_request(now) {
                match self.dispatch().handle_next(flush_reply).await? {
                    Next::Done(event) => return Ok(Some(event)),
                    Next::Started => continue,
                    // Introspection does not wait behind a blocked request.
                    Next::Blocked if self.dispatch().describe_first() => continue,
                    Next::Blocked | Next::Idle => {}
                }
            }
            // Before waiting (at least once per batch read), a look at the
            // stop: the names released (sent by the flush below), or the
            // drain over (see `crate::stop`).
            let running = &self.running;
            match self
                .stop
                .step(&self.setup.names, &mut self.link, || running.len())
            {
                Step::Serve => {}
                Step::Done | Step::GiveUp => return Ok(None),
            }
            // About to wait: nothing batched may stay unsent meanwhile
            // (the flush policy above may have held replies back for a
            // request that cannot start yet).
            if let Some(conn) = self.link.conn.as_mut().filter(|c| c.has_output()) {
                if let Err(e) = conn.flush().await {
                    self.lost(e)?;
                    continue;
                }
            }
            match self.wait(deadline).await {
                Wake::Link(r) => {
                    if let Err(e) = r {
                        self.lost(e)?;
                    }
                }
                Wake::Done(meta, outcome) => {
                    let generation = self.link.generation;
                    let copies = self.running.unpark(generation, meta.key);
                    let mut d = self.dispatch();
                    let event = d.finish(meta, outcome, flush_reply).await;
                    // Re-sent copies of that call, set aside while it ran:
                    // next in line, answered from the cache (or run, if it
                    // was cancelled and left no outcome).
                    if let Some(conn) = self.link.conn.as_mut() {
                        for req in copies.into_iter().rev() {
                            conn.queue.push_front(req);
                        }
                    }
                    return event.map(Some);
                }
                Wake::Timeout => return Ok(None),
                // Looked at on the next round.
                Wake::Stop => {}
                Wake::Fd(r) => {
                    let idx = r?;
                    self.next_fd = idx + 1;
                    let w = &mut self.fds[idx];
                    let fd = w.fd;
                    // Only waited for while no `&self` handler runs.
                    if let Some(service) = Rc::get_mut(&mut self.service) {
                        fds::run_callback(w, service).await;
                    }
                    return Ok(Some(Event::Fd(fd)));
                }
            }
        }
    }

    /// A hard connection error: returned at once if no handler runs, else
    /// kept until they are done.
    fn lost(&mut self, e: Error) -> Result<(), Error> {
        let e = match self.link.lost(e) {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if self.running.is_empty() {
            return Err(e);
        }
        self.link.deferred = Some(e);
        Ok(())
    }

    fn dispatch(&mut self) -> Dispatch<'_, S> {
        Dispatch {
            service: &mut self.service,
            link: &mut self.link,
            setup: &self.setup,
            cache: &mut self.cache,
            counter: &mut self.counter,
            running: &mut self.running,
            max_queued: self.max_queued,
            stop: &mut self.stop,
        }
    }

    /// Waits for the connection to make progress (frames read, a
    /// reconnection attempt; not while a hard error waits for the running
    /// handlers, nor reading while the request queue is full), a running
    /// handler to finish, a watched descriptor to become readable (only
    /// while no handler runs), or `deadline`.
    async fn wait(&mut self, deadline: Option<Instant>) -> Wake {
        let fds = &self.fds;
        let link_ok = self.link.deferred.is_none();
        let read = self
            .link
            .conn
            .as_ref()
            .is_none_or(|c| c.queue.len() < self.max_queued);
        let idle = self.running.is_empty();
        tokio::select! {
            r = self.link.work(&self.setup, None, read), if link_ok => Wake::Link(r),
            (meta, outcome) = self.running.next(), if !idle => Wake::Done(meta, outcome),
            r = fds::ready(fds, self.next_fd), if idle && !fds.is_empty() => Wake::Fd(r),
            _ = sleep_until_opt(deadline) => Wake::Timeout,
            _ = self.stop.wake() => Wake::Stop,
        }
    }
}

/// What [`Server::wait`] waited for.
enum Wake {
    Link(Result<Work, Error>),
    /// A running handler finished (`None`: it was cancelled).
    Done(Meta, Option<Result<bytes::Bytes, HandlerError>>),
    Fd(Result<usize, Error>),
    Timeout,
    /// A stop request, or a drain's deadline.
    Stop,
}

/// Sleeps until `deadline`, or for ever without one.
pub(crate) async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
