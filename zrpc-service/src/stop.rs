//! Stopping a service without losing a call: [`ShutdownHandle`], and the
//! drain that [`Server::serve`](crate::Server::serve) and
//! [`Server::run`](crate::Server::run) go through on SIGTERM, SIGINT or
//! [`ShutdownHandle::shutdown`].
//!
//! A drain releases every name (`Unregister`: the broker sends no new call
//! here, and calls for the names wait for the next instance, or go to the
//! other instances of a shared name), then goes on serving what was
//! delivered before the broker took the release in (running handlers,
//! requests queued in the service, pings, cancels) until all of it is
//! answered and written out, or the drain timeout passes (then the handlers
//! still running are dropped, as if the process had died: the broker
//! re-delivers their calls). The run method then closes the connection and
//! returns `Ok(())`. A second stop request ends the drain at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::Notify;
use tokio::time::Instant;
use zrpc_proto::Envelope;

use crate::error::Error;
use crate::link::Link;
use crate::server::sleep_until_opt;

/// How long a drain may take by default (see [`Server::drain_timeout`](crate::Server::drain_timeout)).
pub(crate) const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// `Unregister` requests of a drain are numbered from here (registration
/// uses 1, 2, ...): their `Ack`s are told apart by number.
pub(crate) const UNREGISTER_REQ: u64 = 1 << 63;

/// Asks a running [`Server`](crate::Server) to stop gracefully: its
/// [`serve`](crate::Server::serve) or [`run`](crate::Server::run) releases
/// the service's names, answers what was delivered, and returns `Ok(())`
/// (see the crate documentation, "Stopping"). Cheap to clone; `Send` and
/// `Sync`, so any thread or task may hold one.
#[derive(Clone, Debug, Default)]
pub struct ShutdownHandle {
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    requested: AtomicBool,
    wake: Notify,
}

impl ShutdownHandle {
    /// Requests the stop. A request made while the server is not serving
    /// applies to the next `serve`/`run`; a second request during a drain
    /// ends it at once.
    pub fn shutdown(&self) {
        self.shared.requested.store(true, Ordering::Release);
        self.shared.wake.notify_one();
    }

    /// Takes a pending request, if any.
    fn take(&self) -> bool {
        self.shared.requested.swap(false, Ordering::AcqRel)
    }
}

/// A drain in progress.
struct Drain {
    /// When the handlers still running are given up.
    deadline: Instant,
    /// Names released whose `Ack` has not come yet.
    unacked: usize,
}

/// How a stop went, for the run method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Serve on.
    Serve,
    /// Everything delivered was answered: close and return.
    Done,
    /// The drain timeout passed, or a second stop request came: give up
    /// the handlers still running, close and return.
    GiveUp,
}

/// The stop side of a server: its handle, its signals while serving, and
/// the drain in progress.
pub(crate) struct Stop {
    handle: ShutdownHandle,
    /// Whether `serve`/`run` stop on SIGTERM and SIGINT.
    pub(crate) on_signals: bool,
    pub(crate) timeout: Duration,
    /// SIGTERM and SIGINT, while `serve` runs (with `on_signals`).
    signals: Vec<Signal>,
    /// Whether `serve` runs: only it drains (not `serve_once`). Still set
    /// after a `serve` future was dropped before it returned (see
    /// `Server::recover_abandoned_serve`).
    armed: bool,
    /// The link's `reconnect` setting when `serve` started (a drain turns
    /// it off), restored when `serve` ends.
    reconnect: bool,
    drain: Option<Drain>,
    /// How the drain ended, once it has.
    ended: Option<Step>,
}

impl Stop {
    pub(crate) fn new() -> Stop {
        Stop {
            handle: ShutdownHandle::default(),
            on_signals: true,
            timeout: DEFAULT_DRAIN_TIMEOUT,
            signals: Vec::new(),
            armed: false,
            reconnect: true,
            drain: None,
            ended: None,
        }
    }

    pub(crate) fn handle(&self) -> ShutdownHandle {
        self.handle.clone()
    }

    /// `serve` starts, with the link's `reconnect` setting: listen for
    /// stop requests (and signals, with `on_signals`). Must be called
    /// inside the runtime.
    pub(crate) fn arm(&mut self, reconnect: bool) -> Result<(), Error> {
        self.drain = None;
        self.ended = None;
        if self.on_signals && self.signals.is_empty() {
            for kind in [SignalKind::terminate(), SignalKind::interrupt()] {
                match signal(kind) {
                    Ok(s) => self.signals.push(s),
                    Err(e) => {
                        self.signals.clear();
                        return Err(Error::Runtime(e));
                    }
                }
            }
        }
        self.reconnect = reconnect;
        self.armed = true;
        Ok(())
    }

    /// Whether `serve` runs, or a `serve` future was dropped before it
    /// returned.
    pub(crate) fn is_armed(&self) -> bool {
        self.armed
    }

    /// The link's `reconnect` setting when `serve` started.
    pub(crate) fn saved_reconnect(&self) -> bool {
        self.reconnect
    }

    /// `serve` ends: stop listening (signals received from now on are
    /// ignored, see the crate documentation).
    pub(crate) fn disarm(&mut self) {
        self.armed = false;
        self.drain = None;
        self.ended = None;
        self.signals.clear();
    }

    pub(crate) fn is_draining(&self) -> bool {
        self.drain.is_some()
    }

    /// The drain's deadline, if one runs.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.drain.as_ref().map(|d| d.deadline)
    }

    /// How the drain ended, once it has: the run method closes and returns.
    pub(crate) fn ended(&self) -> Option<Step> {
        self.ended
    }

    /// Whether a stop was requested since the last look, without waiting
    /// (signals become requests in [`Stop::wake`]).
    fn requested_now(&mut self) -> bool {
        self.handle.take()
    }

    /// Waits for a stop request (or, draining, for the drain's deadline);
    /// pending for ever when not armed. Cancel-safe.
    pub(crate) async fn wake(&mut self) {
        if !self.armed {
            return std::future::pending().await;
        }
        let deadline = self.drain.as_ref().map(|d| d.deadline);
        let handle = self.handle.clone();
        let signals = &mut self.signals;
        let signal = std::future::poll_fn(|cx| {
            for s in signals.iter_mut() {
                if let Poll::Ready(Some(())) = s.poll_recv(cx) {
                    return Poll::Ready(());
                }
            }
            Poll::Pending
        });
        tokio::select! {
            // The request stays set for `requested_now`.
            _ = handle.shared.wake.notified() => {}
            // The signal was taken off its stream: a request now.
            _ = signal => handle.shutdown(),
            _ = sleep_until_opt(deadline) => {}
        }
    }

    /// One look at the stop, before the serving loop waits: starts a
    /// drain on a request (releasing the names on the link's connection),
    /// and says when a
    /// drain is over (every release acknowledged, no handler `running`,
    /// nothing queued). Cheap unless a stop was requested or a drain runs.
    /// Also looked at while an exclusive handler runs (see
    /// `dispatch::run_exclusive`), so that a stop that gives up ends it.
    #[inline]
    pub(crate) fn step(
        &mut self,
        names: &[String],
        link: &mut Link,
        running: impl FnOnce() -> usize,
    ) -> Step {
        if !self.armed
            || (self.drain.is_none() && !self.handle.shared.requested.load(Ordering::Relaxed))
        {
            return Step::Serve;
        }
        if let Some(end) = self.ended {
            return end;
        }
        let step = self.look(names, link, running());
        if step != Step::Serve {
            self.ended = Some(step);
        }
        step
    }

    #[cold]
    fn look(&mut self, names: &[String], link: &mut Link, running: usize) -> Step {
        let requested = self.requested_now();
        let Some(drain) = self.drain.as_mut() else {
            if requested {
                self.begin(names, link);
            }
            return Step::Serve;
        };
        if requested {
            tracing::warn!(running, "second stop request: stopping now");
            return Step::GiveUp;
        }
        if Instant::now() >= drain.deadline {
            tracing::warn!(
                running,
                timeout = ?self.timeout,
                "drain timeout: giving up the handlers still running (their calls are re-delivered)"
            );
            return Step::GiveUp;
        }
        let Some(conn) = link.conn.as_mut() else {
            // The connection is gone: nothing more can be answered.
            return if running == 0 {
                Step::Done
            } else {
                Step::Serve
            };
        };
        drain.unacked = drain.unacked.saturating_sub(conn.take_unregistered());
        // What is left in the output is written by the run method.
        if drain.unacked == 0 && running == 0 && conn.queue.is_empty() {
            tracing::info!("drained: every delivered call was answered");
            return Step::Done;
        }
        Step::Serve
    }

    /// Starts a drain: releases every name; a lost connection is not set
    /// up again (the run method restores the setting).
    fn begin(&mut self, names: &[String], link: &mut Link) {
        tracing::info!(
            names = ?names,
            timeout = ?self.timeout,
            "stopping: names released, answering what was delivered"
        );
        crate::link::notify("STOPPING=1\nSTATUS=draining");
        link.reconnect = false;
        let unacked = match link.conn.as_mut() {
            Some(conn) => {
                for (i, name) in names.iter().enumerate() {
                    conn.send(&Envelope::Unregister {
                        req: UNREGISTER_REQ + i as u64,
                        name,
                    });
                }
                names.len()
            }
            None => 0,
        };
        self.drain = Some(Drain {
            deadline: Instant::now() + self.timeout,
            unacked,
        });
    }
}
