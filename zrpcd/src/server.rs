//! The broker's event loop: the accept loop (admitting connections with
//! [`crate::conn::admit`]), the broker's own tasks (deadlines, the flusher,
//! heartbeats, the partial-frame sweep, systemd notifications), policy
//! reloads on SIGHUP, and graceful shutdown.

use std::cell::RefCell;
use std::future::Future;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::net::UnixListener;
use zrpc_io::busy_poll::BusyPoll;
use zrpc_proto::{encode_frame, Envelope, ErrorCode};

use crate::broker::Broker;
use crate::config::Config;
use crate::conn;
use crate::log::RefusalLog;

/// Runs the broker on an already bound listener until `shutdown` resolves,
/// then shuts down gracefully; each `reload` signal (SIGHUP) re-reads the
/// policy file. Must run inside a `tokio::task::LocalSet`.
pub async fn run(
    config: Config,
    listener: std::os::unix::net::UnixListener,
    shutdown: impl Future<Output = ()>,
    mut reload: tokio::signal::unix::Signal,
) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let listener = UnixListener::from_std(listener)?;
    let grace = config.shutdown_grace;
    crate::log::set_warn_interval(config.warn_interval);
    let broker = Rc::new(RefCell::new(Broker::new(config)));
    let mut timers = tokio::task::spawn_local(timer_loop(broker.clone()));
    let mut flusher = tokio::task::spawn_local(flush_loop(broker.clone()));
    let busy_poll = broker.borrow().busy_poll().cloned();
    if let Some(bp) = &busy_poll {
        bp.watch_or_log(listener.as_raw_fd());
        tracing::debug!(
            window_us = bp.window().as_micros() as u64,
            "busy polling on"
        );
    }
    // The park hook installed by `main` finds it here while the broker runs.
    let _installed = BusyPoll::scoped(busy_poll);
    #[cfg(feature = "nats")]
    let _bridge = {
        let config = broker.borrow().config.bridge.clone();
        match config {
            Some(bridge) => Some(crate::bridge::start(&broker, bridge)?),
            None => None,
        }
    };
    let mut heartbeats = tokio::task::spawn_local(heartbeat_loop(broker.clone()));
    let mut sweeper = tokio::task::spawn_local(sweep_loop(broker.clone()));
    let mut orphans = tokio::task::spawn_local(orphan_loop(broker.clone()));
    let systemd = std::env::var_os("NOTIFY_SOCKET")
        .map(|_| tokio::task::spawn_local(systemd_loop(broker.clone())));
    sd_notify(&format!(
        "READY=1\nSTATUS={}",
        status_line(&broker.borrow(), 0.0)
    ));
    tokio::pin!(shutdown);
    // The broker's own tasks never end while it runs; one that does
    // panicked (a bug): the broker then shuts down and exits with an error,
    // so that its supervisor restarts it, rather than run on without
    // deadlines or heartbeats.
    // The connection tasks, so that shutdown can wait for their writers.
    let mut conns = tokio::task::JoinSet::new();
    let mut refusals = RefusalLog::default();
    let failed = loop {
        tokio::select! {
            // Reaped as they end (a finished task's slot is freed).
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            _ = &mut timers => break Some("timer"),
            _ = &mut flusher => break Some("flush"),
            _ = &mut heartbeats => break Some("heartbeat"),
            _ = &mut sweeper => break Some("partial-frame sweep"),
            _ = &mut orphans => break Some("orphan"),
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => match conn::admit(&broker, stream) {
                    Ok(admitted) => {
                        conns.spawn_local(conn::serve(broker.clone(), admitted));
                    }
                    Err(conn::Refused::Limit(stream, msg)) => {
                        refuse(&broker, stream, &msg, &mut refusals, Instant::now())
                    }
                    Err(conn::Refused::Broken) => {}
                },
                Err(e) => {
                    // EMFILE and friends: log, back off briefly, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = reload.recv() => reload_policy(&broker),
            _ = &mut shutdown => break None,
        }
    };
    if let Some(task) = failed {
        tracing::error!(
            task,
            "an internal task of zrpcd ended (a bug); shutting down"
        );
    }
    drop(listener);
    tracing::info!("shutting down");
    sd_notify("STOPPING=1\nSTATUS=shutting down");
    if let Some(t) = systemd {
        t.abort();
    }
    // Let delivered calls finish within the grace period (bounded poll).
    broker.borrow_mut().begin_shutdown();
    let deadline = tokio::time::Instant::now() + grace;
    while !broker.borrow().pending.is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    broker.borrow_mut().shutdown();
    // Bounded wait for every connection task to end: each flushes what its
    // peer was sent (a reply that came within the grace, the `Fatal`)
    // before it ends. Not the peer table: a peer leaves it before its
    // writer has flushed.
    let drained = async { while conns.join_next().await.is_some() {} };
    let flush_bound = broker
        .borrow()
        .config
        .close_flush_timeout
        .saturating_add(FLUSH_MARGIN);
    if tokio::time::timeout(flush_bound, drained).await.is_err() {
        tracing::warn!("connections still flushing at exit");
    }
    timers.abort();
    flusher.abort();
    heartbeats.abort();
    orphans.abort();
    sweeper.abort();
    match failed {
        None => Ok(()),
        Some(task) => Err(std::io::Error::other(format!(
            "the broker's {task} task ended unexpectedly"
        ))),
    }
}

/// Re-reads the policy file (SIGHUP). A file that does not load keeps the
/// policy in force, and says why. Connections stay; the new rules apply to
/// registrations and calls from now on, and names held against its
/// `[[own]]` rules are taken back (`Broker::set_policy`).
fn reload_policy(broker: &RefCell<Broker>) {
    let Some(path) = broker.borrow().config.policy_path.clone() else {
        tracing::info!("SIGHUP: no policy file to reload (the built-in defaults are in force)");
        return;
    };
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    match crate::policy::Policy::load(&path, uid) {
        Ok(p) => {
            tracing::info!(policy = %path.display(), rules = p.rules(), "access policy reloaded");
            broker.borrow_mut().set_policy(p);
        }
        Err(e) => {
            tracing::error!(error = %e, "SIGHUP: the policy file does not load; keeping the policy in force")
        }
    }
}

fn refuse(
    broker: &RefCell<Broker>,
    stream: tokio::net::UnixStream,
    msg: &str,
    log: &mut RefusalLog,
    now: Instant,
) {
    let mut b = broker.borrow_mut();
    b.stats.connections_refused += 1;
    match log.warn_now(now) {
        Some(0) => tracing::warn!(message = msg, "connection refused"),
        Some(quiet) => tracing::warn!(
            message = msg,
            "connection refused ({quiet} more refused since the last such warning, logged at debug level)"
        ),
        None => tracing::debug!(message = msg, "connection refused"),
    }
    let mut out = BytesMut::new();
    encode_frame(
        &mut out,
        &Envelope::Fatal {
            code: ErrorCode::LimitExceeded,
            message: msg,
        },
        &Bytes::new(),
    );
    // Best effort: the socket buffer of a new connection has room for it.
    let _ = stream.try_write(&out);
}

/// How much longer than a closing connection's own bound
/// (`--close-flush-timeout`) shutdown waits for final frames to be
/// flushed, so that each writer ends by its own rule first.
const FLUSH_MARGIN: Duration = Duration::from_secs(1);

async fn heartbeat_loop(broker: Rc<RefCell<Broker>>) {
    let every = broker.borrow().config.heartbeat_interval;
    let mut interval = tokio::time::interval(every);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let mut b = broker.borrow_mut();
        b.heartbeat();
        b.flush();
    }
}

fn sd_notify(state: &str) {
    if let Err(e) = zrpc_io::sd::sd_notify(state) {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}

fn status_line(b: &Broker, calls_per_s: f64) -> String {
    format!(
        "{} connections, {} services, {} pending calls, {:.0} calls/s",
        b.peers().len(),
        b.names().len(),
        b.pending.len(),
        calls_per_s
    )
}

/// Pings the systemd watchdog from the broker's own event loop (so a wedged
/// loop stops pinging) and keeps `STATUS=` current.
async fn systemd_loop(broker: Rc<RefCell<Broker>>) {
    const STATUS_EVERY: Duration = Duration::from_secs(2);
    let watchdog = zrpc_io::sd::watchdog_interval().map(|d| d / 2);
    let tick = watchdog.map_or(STATUS_EVERY, |w| w.min(STATUS_EVERY));
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = (tokio::time::Instant::now(), broker.borrow().stats.calls);
    loop {
        interval.tick().await;
        if watchdog.is_some() {
            sd_notify("WATCHDOG=1");
        }
        let now = tokio::time::Instant::now();
        if now - last.0 >= STATUS_EVERY {
            let b = broker.borrow();
            let rate = (b.stats.calls - last.1) as f64 / (now - last.0).as_secs_f64();
            let line = status_line(&b, rate);
            last = (now, b.stats.calls);
            drop(b);
            sd_notify(&format!("STATUS={line}"));
        }
    }
}

/// Writes the peers that read batches queued frames to, once per wake-up of
/// the runtime (see [`crate::outbox`]).
async fn flush_loop(broker: Rc<RefCell<Broker>>) {
    let wake = broker.borrow().out.waker();
    loop {
        wake.notified().await;
        broker.borrow_mut().flush();
    }
}

/// Closes connections whose partly received frame stalled (see
/// [`crate::broker::partial`]), stops counting the descriptors peers have
/// received since ([`Broker::release_received`]), forgets users with
/// nothing left, and
/// starts the descriptor-closing threads that could not be started
/// ([`crate::closer::start_stalled`]).
async fn sweep_loop(broker: Rc<RefCell<Broker>>) {
    let every = crate::broker::partial::sweep_interval(broker.borrow().config.frame_timeout);
    let mut interval = tokio::time::interval(every);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let mut b = broker.borrow_mut();
        b.expire_partial_frames(std::time::Instant::now());
        b.release_received();
        b.collect_users();
        b.flush();
        drop(b);
        crate::closer::start_stalled();
    }
}

/// Cancels orphaned calls at their services when their caller's grace
/// ends (see [`crate::orphans`]), at most [`DUE_BATCH`] before the other
/// tasks get a turn.
async fn orphan_loop(broker: Rc<RefCell<Broker>>) {
    let wake = broker.borrow().orphans().waker();
    loop {
        let next = broker.borrow().orphans().next_deadline();
        match next {
            Some(t) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(t.into()) => {}
                    _ = wake.notified() => continue,
                }
            }
            None => {
                wake.notified().await;
                continue;
            }
        }
        loop {
            let full = {
                let mut b = broker.borrow_mut();
                let n = b.cancel_orphans(std::time::Instant::now(), DUE_BATCH);
                b.flush();
                n == DUE_BATCH
            };
            if !full {
                break;
            }
            tokio::task::yield_now().await;
        }
    }
}

/// How many calls due at one instant (deadlines, orphans' graces) the
/// broker ends before its connections get a turn: one user's calls due
/// together hold up another user's call for at most this many.
const DUE_BATCH: usize = 64;

/// Ends the calls whose deadline passed, [`DUE_BATCH`] at a time.
async fn timer_loop(broker: Rc<RefCell<Broker>>) {
    loop {
        let first = std::future::poll_fn(|cx| broker.borrow_mut().pending.poll_expired(cx)).await;
        let full = {
            let mut b = broker.borrow_mut();
            b.on_timeout(first);
            // The rest of a batch without waiting: polled with a waker that
            // does nothing, so the loop's next `poll_fn` registers the task's
            // own again before it can sleep.
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            let mut n = 1;
            while n < DUE_BATCH {
                let std::task::Poll::Ready(id) = b.pending.poll_expired(&mut cx) else {
                    break;
                };
                b.on_timeout(id);
                n += 1;
            }
            b.flush();
            n == DUE_BATCH
        };
        if full {
            tokio::task::yield_now().await;
        }
    }
}
