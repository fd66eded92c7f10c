//! The reconnecting link to the broker: how a connection is set up
//! (connect, handshake, register every name) and how it is got back when it
//! is lost (backoff, the same names again), plus the systemd notifications
//! that follow it.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use tokio::time::Instant;
use zrpc_io::handshake::hello_frame_caps;
use zrpc_io::{Backoff, Retry};
use zrpc_proto::{socket_path, validate_name, Envelope, ErrorCode, DEFAULT_MAX_MESSAGE_SIZE};

use crate::conn::Conn;
use crate::error::Error;

/// How long connecting, the handshake and name registration may take, by
/// default ([`Server::connect_timeout`](crate::Server::connect_timeout)):
/// the clients' default too.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = zrpc_io::handshake::DEFAULT_TIMEOUT;

/// The `agent` string sent in `Hello`.
const AGENT: &str = concat!("zrpc-service/", env!("CARGO_PKG_VERSION"));

/// What a connection is set up with.
#[derive(Debug, Clone)]
pub(crate) struct Setup {
    pub(crate) names: Vec<String>,
    pub(crate) shared: bool,
    pub(crate) socket_dir: Option<PathBuf>,
    pub(crate) instance: u64,
    /// How long connecting, the handshake and registration may take.
    pub(crate) timeout: Duration,
}

type ConnectFuture = Pin<Box<dyn Future<Output = Result<Conn, Error>>>>;

impl Setup {
    /// A connection attempt (connect, handshake, register every name),
    /// bounded by `timeout`. The future owns its inputs, so it
    /// can be kept across `select!` iterations.
    pub(crate) fn attempt(&self) -> Result<ConnectFuture, Error> {
        if self.names.is_empty() {
            return Err(Error::NoName);
        }
        for name in &self.names {
            if let Err(e) = validate_name(name) {
                return Err(Error::InvalidName {
                    name: name.clone(),
                    message: e.to_string(),
                });
            }
        }
        let dir = zrpc_proto::resolve_socket_dir(self.socket_dir.as_deref());
        let path = socket_path(&dir);
        tracing::debug!(path = %path.display(), names = ?self.names, "connecting to zrpcd");
        let names = self.names.clone();
        let (instance, shared, timeout) = (self.instance, self.shared, self.timeout);
        Ok(Box::pin(async move {
            tokio::time::timeout(timeout, connect(path, instance, &names, shared, timeout))
                .await
                .map_err(|_| Error::HandshakeTimeout(timeout))?
        }))
    }
}

/// What [`Link::work`] did.
pub(crate) enum Work {
    /// Frames were read and handled, or a reconnection attempt failed.
    Progress,
    /// The broker cancelled the running request.
    CancelledRunning,
}

/// The broker connection plus everything needed to get it back when it is
/// lost: the reconnection policy and its state.
pub(crate) struct Link {
    pub(crate) conn: Option<Conn>,
    /// Incremented for every new connection: request ids are only
    /// meaningful on the connection they arrived on.
    pub(crate) generation: u64,
    /// The reconnection attempt in progress, kept across wake-ups.
    connecting: Option<ConnectFuture>,
    /// No reconnection attempt before this instant (backoff).
    retry_at: Option<Instant>,
    /// Attempts since the connection was lost (the backoff's position).
    retry: Retry,
    /// Whether a connection was ever set up (the first one fails fast).
    ever_connected: bool,
    /// Whether READY=1 was sent to systemd.
    notified: bool,
    /// The max message size of the latest connection.
    pub(crate) max_message_size: u32,
    /// A hard error met while a handler was running, returned once the
    /// handler has finished.
    pub(crate) deferred: Option<Error>,
    pub(crate) reconnect: bool,
    pub(crate) backoff: Backoff,
}

impl Link {
    pub(crate) fn new() -> Self {
        Link {
            conn: None,
            generation: 0,
            connecting: None,
            retry_at: None,
            retry: Retry::default(),
            ever_connected: false,
            notified: false,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            deferred: None,
            reconnect: true,
            backoff: Backoff::default(),
        }
    }

    /// Whether a lost connection is re-established by the loop itself.
    pub(crate) fn reconnecting(&self) -> bool {
        self.reconnect && self.ever_connected
    }

    /// Takes a freshly registered connection into use.
    pub(crate) fn install(&mut self, conn: Conn) {
        self.generation += 1;
        self.max_message_size = conn.max_message_size;
        self.conn = Some(conn);
        self.connecting = None;
        self.retry_at = None;
        if self.ever_connected {
            tracing::info!(
                attempts = self.retry.attempt,
                "reconnected to zrpcd; names registered again"
            );
        }
        self.retry.reset();
        self.ever_connected = true;
        let state = if self.notified {
            "STATUS=serving"
        } else {
            self.notified = true;
            "READY=1\nSTATUS=serving"
        };
        notify(state);
    }

    /// Forgets the connection (e.g. its runtime is gone).
    pub(crate) fn reset(&mut self) {
        self.conn = None;
        self.connecting = None;
    }

    /// The connection failed with `e`. Returns `Ok` if the loop reconnects
    /// by itself, else the error.
    pub(crate) fn lost(&mut self, e: Error) -> Result<(), Error> {
        self.conn = None;
        self.connecting = None;
        if !(self.reconnecting() && e.is_transient()) {
            tracing::debug!("dropping the zrpcd connection: {e}");
            return Err(e);
        }
        tracing::warn!("lost the connection to zrpcd ({e}); reconnecting");
        notify("STATUS=reconnecting to zrpcd");
        self.retry.reset();
        self.schedule_retry();
        Ok(())
    }

    /// Sets the time of the next attempt (the backoff's next delay).
    fn schedule_retry(&mut self) {
        let delay = self.retry.next_delay(&self.backoff);
        self.retry_at = Instant::now().checked_add(delay);
    }

    /// Drops the requests at the front of the queue whose deadline passed
    /// at `now` (the broker has already answered their callers with
    /// Timeout); returns whether a request is left to handle.
    #[inline(always)]
    pub(crate) fn has_request(&mut self, now: std::time::Instant) -> bool {
        let Some(conn) = self.conn.as_mut() else {
            return false;
        };
        while let Some(req) = conn.queue.front() {
            if req.deadline.is_none_or(|d| now <= d) {
                return true;
            }
            tracing::debug!(id = req.id, method = %req.method, "skipping expired request");
            conn.queue.pop_front();
        }
        false
    }

    /// One unit of connection work; cancel-safe (all progress is kept in
    /// `self`). Connected: reads what is available (unless `read` is false:
    /// the request queue is full), handles the frames (queues requests,
    /// answers pings, applies cancels of queued requests and reports one of
    /// `running`, the exclusively running request's connection generation
    /// and id) and flushes.
    /// Disconnected (and reconnecting): waits for the backoff, then drives a
    /// connection attempt to its end.
    pub(crate) async fn work(
        &mut self,
        setup: &Setup,
        running: Option<(u64, u64)>,
        read: bool,
    ) -> Result<Work, Error> {
        let generation = self.generation;
        if let Some(conn) = self.conn.as_mut() {
            let running = running.filter(|(g, _)| *g == generation).map(|(_, id)| id);
            let r = async {
                if read {
                    conn.read_more().await?;
                } else {
                    // Only the flush: wait for the handlers to drain the
                    // queue (the caller selects on them), with a sign of
                    // life now and then: the broker's pings are not read
                    // meanwhile, and a busy service must not be taken for
                    // a dead one (see `Conn::keepalive_every`).
                    conn.flush().await?;
                    loop {
                        tokio::time::sleep(conn.keepalive_every()).await;
                        conn.queue_keepalive();
                        conn.flush().await?;
                    }
                }
                conn.process()?;
                let cancelled = running.is_some_and(|id| conn.cancels.contains(&id));
                if running.is_some() {
                    // Nothing else runs while an exclusive handler does.
                    conn.cancels.clear();
                }
                conn.flush().await?;
                Ok(cancelled)
            }
            .await;
            return match r {
                Ok(true) => Ok(Work::CancelledRunning),
                Ok(false) => Ok(Work::Progress),
                Err(e) => self.lost(e).map(|()| Work::Progress),
            };
        }
        if !self.reconnecting() {
            return Err(Error::Disconnected);
        }
        if self.connecting.is_none() {
            if let Some(t) = self.retry_at {
                tokio::time::sleep_until(t).await;
                self.retry_at = None;
            }
            self.connecting = Some(setup.attempt()?);
        }
        let Some(attempt) = self.connecting.as_mut() else {
            return Ok(Work::Progress);
        };
        let r = attempt.await;
        self.connecting = None;
        match r {
            Ok(conn) => {
                self.install(conn);
                Ok(Work::Progress)
            }
            Err(e) if e.is_transient() => {
                let attempts = self.retry.attempt;
                if attempts == 10 || attempts.checked_rem(100) == Some(0) {
                    tracing::warn!(attempts, "still reconnecting to zrpcd: {e}");
                } else {
                    tracing::debug!("reconnection attempt failed: {e}");
                }
                self.schedule_retry();
                Ok(Work::Progress)
            }
            Err(e) => {
                tracing::error!("cannot register again after reconnecting: {e}");
                Err(e)
            }
        }
    }
}

/// Sends `state` to systemd if `$NOTIFY_SOCKET` is set.
pub(crate) fn notify(state: &str) {
    match zrpc_io::sd::sd_notify(state) {
        Ok(true) => tracing::debug!(state, "notified systemd"),
        Ok(false) => {}
        Err(e) => tracing::warn!(error = %e, "cannot notify systemd"),
    }
}

/// Connects to the broker, says hello and registers `names`. This is the
/// single place a connection is set up (a reconnect calls it again).
async fn connect(
    path: PathBuf,
    instance: u64,
    names: &[String],
    shared: bool,
    timeout: Duration,
) -> Result<Conn, Error> {
    let c = zrpc_io::handshake::connect(
        &path,
        &hello_frame_caps(instance, AGENT, zrpc_proto::caps::FD_PAYLOADS),
        timeout,
    )
    .await
    .map_err(|e| handshake_error(e, timeout))?;
    let mut conn = Conn::new(c.sock).map_err(Error::from_io)?;
    conn.welcomed(c.welcome, c.leftover, c.leftover_fds);

    // Register every name; requests may arrive as soon as the first Ack.
    for (i, name) in names.iter().enumerate() {
        conn.send(&Envelope::Register {
            req: i as u64 + 1,
            name,
            shared,
        });
    }
    let mut acked = vec![false; names.len()];
    while acked.iter().any(|a| !a) {
        conn.flush().await?;
        conn.read_more().await?;
        // Through `process`: requests may follow the first `Ack` at once,
        // with their descriptors (a request's payload must not be taken
        // from the next one's).
        conn.process_acks(|req, code, message| {
            let idx = req
                .checked_sub(1)
                .and_then(|i| usize::try_from(i).ok())
                .filter(|&i| i < names.len())
                .ok_or_else(|| Error::Unexpected(format!("Ack for unknown request {req}")))?;
            let name = names[idx].clone();
            match code {
                None => {
                    tracing::debug!(name, "registered");
                    acked[idx] = true;
                    Ok(())
                }
                Some(ErrorCode::NameTaken) => Err(Error::NameTaken { name }),
                Some(ErrorCode::AccessDenied) => Err(Error::AccessDenied { name, message }),
                Some(ErrorCode::InvalidName) => Err(Error::InvalidName { name, message }),
                Some(code) => Err(Error::Register {
                    name,
                    code,
                    message,
                }),
            }
        })?;
    }
    conn.flush().await?;
    Ok(conn)
}

/// The service's error for a failed handshake whose bound was `timeout`.
fn handshake_error(e: zrpc_io::HandshakeError, timeout: Duration) -> Error {
    use zrpc_io::HandshakeError as H;
    match e {
        H::Connect { path, source } if source.kind() == std::io::ErrorKind::TimedOut => {
            tracing::debug!(path = %path.display(), "{source}");
            Error::HandshakeTimeout(timeout)
        }
        H::Connect { path, source } => Error::Connect { path, source },
        H::Untrusted(u) => Error::UntrustedBroker(u),
        H::Fatal { code, message } => Error::Fatal { code, message },
        v @ H::Version { .. } => Error::Fatal {
            code: ErrorCode::VersionMismatch,
            message: v.to_string(),
        },
        H::Protocol(m) => Error::Unexpected(m),
    }
}
