//! Broker configuration: every limit, with its default.

use std::path::PathBuf;
use std::time::Duration;

/// Default busy-poll window, microseconds (`--busy-poll-us`).
pub const DEFAULT_BUSY_POLL_US: u64 = zrpc_io::busy_poll::DEFAULT_WINDOW_US;

/// Default `--frame-timeout`: a frame on a local socket arrives in
/// milliseconds; 30 s leaves room for a stopped-and-resumed or swapping
/// sender.
pub const DEFAULT_FRAME_TIMEOUT: Duration = Duration::from_secs(30);

/// Default `--max-partial-bytes`: 256 MiB, sixteen maximum-size messages in
/// flight at once.
pub const DEFAULT_MAX_PARTIAL_BYTES: usize = 256 * 1024 * 1024;

/// Default `--max-pending-bytes-per-conn`: 256 MiB (sixteen calls of the
/// largest message size).
pub const DEFAULT_MAX_PENDING_BYTES_PER_CONN: usize = 256 * 1024 * 1024;

/// Default `--max-pending-bytes`: 1 GiB.
pub const DEFAULT_MAX_PENDING_BYTES: usize = 1024 * 1024 * 1024;

/// Default `--max-fds-per-conn`: payload descriptors held by the broker
/// for one connection.
pub const DEFAULT_MAX_FDS_PER_CONN: usize = 64;

/// Default `--max-fds`: payload descriptors held by the broker in all.
pub const DEFAULT_MAX_FDS: usize = 4096;

/// Default `--max-names`: names registered in all (a name held by several
/// connections, shared, counts once for each); a user's quota defaults to a
/// quarter of it.
pub const DEFAULT_MAX_NAMES: usize = 65_536;

/// Default `--max-stats-names`.
pub const DEFAULT_MAX_STATS_NAMES: u64 = 1024;

/// Default [`Config::max_queued_total`]: four users' default `queued_bytes`
/// quota.
pub const DEFAULT_MAX_QUEUED_TOTAL: usize = 1024 * 1024 * 1024;

/// Default [`Config::max_delivered_per_conn`]: no more than a
/// `zrpc-service` server takes in by default (1024 queued, 64 running), so
/// that its own queue does not fill up before the broker holds calls back.
pub const DEFAULT_MAX_DELIVERED_PER_CONN: u32 = 1024;

/// Default `--caller-grace`: a client reconnects within milliseconds when
/// only its connection broke (its backoff starts at 10 ms and is at most
/// 1 s), so a few seconds cover it; a caller that died does not hold its
/// service's handler much longer.
pub const DEFAULT_CALLER_GRACE: Duration = Duration::from_secs(5);

/// Default `--name-grace`: a service restarted by systemd
/// (`RestartSec=100ms` by default, a few seconds with backoff) or by hand
/// registers its names again well within it; a name whose user is gone for
/// good is free again soon after.
pub const DEFAULT_NAME_GRACE: Duration = Duration::from_secs(10);

/// Default of `--close-flush-timeout`: how long a connection the broker
/// closes may take to read the frames it was sent last.
pub const DEFAULT_CLOSE_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// Default of `--max-monitor-names`: names in one `zrpcd.monitor` filter.
pub const DEFAULT_MAX_MONITOR_NAMES: usize = 256;

/// Default of `--warn-interval`: warnings a user can cause at will are
/// logged at warn at most once per this interval ([`crate::log`]).
pub const DEFAULT_WARN_INTERVAL: Duration = Duration::from_secs(10);

/// Default `--name-logs-per-second`.
pub const DEFAULT_NAME_LOGS_PER_SECOND: u32 = 10;

/// Everything the broker needs to know to run. Built from command-line flags
/// by `main.rs`; tests and embedders can build it directly.
#[derive(Debug, Clone)]
pub struct Config {
    /// Directory holding `zrpcd.sock` and `zrpcd.lock`.
    pub socket_dir: PathBuf,
    /// Permission bits of the socket file (who may connect).
    pub socket_mode: u32,
    /// Largest frame body (envelope + payload) accepted, in bytes.
    pub max_message_size: u32,
    /// Most simultaneous connections; further ones get `LimitExceeded`.
    pub max_connections: usize,
    /// Most calls one connection may have pending at once.
    pub max_pending_per_conn: usize,
    /// Most calls pending in the whole broker.
    pub max_pending_total: usize,
    /// Most calls delivered to one service connection and not yet
    /// answered; more wait in the broker (see [`crate::waiting`]). The
    /// NATS bridge's connection has no such bound.
    pub max_delivered_per_conn: u32,
    /// Most payload bytes of one connection's pending calls (kept by the
    /// broker until answered, for re-delivery).
    pub max_pending_bytes_per_conn: usize,
    /// Most payload bytes of pending calls in the whole broker.
    pub max_pending_bytes: usize,
    /// Most names one connection may hold.
    pub max_names_per_conn: usize,
    /// Most names registered in the whole broker (each holder of a shared
    /// name counts); a user's quota defaults to a quarter of it
    /// (`--max-names`).
    pub max_names: usize,
    /// Most bytes queued towards one peer before the broker pushes back
    /// (calls to a saturated service fail with `LimitExceeded`; a client that
    /// does not read its results is disconnected).
    pub max_queued_bytes: usize,
    /// Most bytes queued unread towards all peers together (see
    /// [`crate::quota::QueuedTotal`]).
    pub max_queued_total: usize,
    /// How long a new connection may take to send `Hello`.
    pub handshake_timeout: Duration,
    /// How long a connection the broker closes (a `Fatal`, a limit, its
    /// peer gone) may take to read the frames it was sent last; then they
    /// are dropped and the socket closed (`--close-flush-timeout`). At
    /// exit the broker waits this long plus 1 s for all of them.
    pub close_flush_timeout: Duration,
    /// Most names in one `zrpcd.monitor` filter (`--max-monitor-names`).
    pub max_monitor_names: usize,
    /// Warnings a user can cause at will (refused connections, closed
    /// connections, refused calls, `ETOOMANYREFS`) are logged at warn at
    /// most once per this interval per kind, the others at debug
    /// (`--warn-interval`).
    pub warn_interval: Duration,
    /// Name events of one user other than root logged at info a second,
    /// ten seconds' worth at once, the rest at debug
    /// (`--name-logs-per-second`; 0: no limit; see
    /// [`crate::quota::Users::log_name_event`]).
    pub name_logs_per_second: u32,
    /// How long shutdown lets delivered calls finish (and queued frames
    /// flush) before answering the rest with `Shutdown`.
    pub shutdown_grace: Duration,
    /// How long a delivered call keeps running at its service after its
    /// caller disconnected, for the caller to come back and resubmit it
    /// (capped by the call's deadline); then the service is sent `Cancel`.
    pub caller_grace: Duration,
    /// How long a name the policy does not reserve stays its user's after
    /// its last instance left (see [`crate::reserved`]); zero: not kept.
    pub name_grace: Duration,
    /// Where the names held and kept are saved for the next broker (see
    /// [`crate::reserved`]); `None`: nowhere (zrpcd sets its socket
    /// directory's [`crate::reserved::STATE_FILE`]).
    pub names_file: Option<PathBuf>,
    /// Frames each user other than root handles per round of the broker's
    /// thread (see [`crate::fair`]); 0: no rounds.
    pub round_quantum: u32,
    /// How often services (connections holding names or handling calls) are
    /// pinged.
    pub heartbeat_interval: Duration,
    /// A service from which nothing arrived for this long is considered dead
    /// (a stopped process): it is disconnected and its calls re-delivered.
    pub heartbeat_timeout: Duration,
    /// How long a frame may take to arrive completely once its first bytes
    /// arrived; a connection whose frame stalls longer is closed with
    /// `Fatal{Timeout}` (`--frame-timeout`).
    pub frame_timeout: Duration,
    /// Most bytes of read buffer the broker holds for partly received
    /// frames, across all connections; the connection whose partial frame
    /// would take it past this gets `Fatal{LimitExceeded}`
    /// (`--max-partial-bytes`).
    pub max_partial_bytes: usize,
    /// Most service names with statistics of their own in `zrpcd.stats`
    /// (names that are or were registered; at most
    /// [`crate::stats::MAX_STATS_NAMES`]); further ones are counted under
    /// [`crate::stats::OTHER`] (`--max-stats-names`).
    pub max_stats_names: usize,
    /// The access policy (the defaults, or the file `policy_path`).
    pub policy: crate::policy::Policy,
    /// The policy file, re-read on SIGHUP (None: the defaults, nothing to
    /// reload).
    pub policy_path: Option<PathBuf>,
    /// How long the broker polls its sockets before sleeping when it runs
    /// out of work while frames arrive back to back (zero: never; at most
    /// 1 ms; see [`zrpc_io::busy_poll`]).
    pub busy_poll: Duration,
    /// Most payload descriptors (sealed memfds, see `docs/protocol.md`)
    /// the broker holds for one connection: received and kept for its
    /// calls, or queued towards it; 0 turns descriptor passing off for
    /// everyone (payloads then travel inline) (`--max-fds-per-conn`).
    pub max_fds_per_conn: usize,
    /// Most payload descriptors the broker holds in all
    /// (`--max-fds`); a user's quota defaults to a quarter of it.
    pub max_fds: usize,
    /// The bridge to NATS (`--bridge FILE`, docs/bridge.md); None: no
    /// bridge.
    #[cfg(feature = "nats")]
    pub bridge: Option<crate::bridge::BridgeConfig>,
}

impl Config {
    /// The broker-wide limits that per-user quotas take their defaults
    /// from ([`crate::quota::Quota::new`]).
    pub fn quota_limits(&self) -> crate::quota::Limits {
        crate::quota::Limits {
            max_connections: self.max_connections,
            max_pending_total: self.max_pending_total,
            max_pending_bytes: self.max_pending_bytes,
            max_partial_bytes: self.max_partial_bytes,
            max_queued_bytes: self.max_queued_bytes,
            max_fds: self.max_fds,
            max_names: self.max_names,
            max_queued_total: self.max_queued_total,
            max_stats_names: self.max_stats_names,
        }
    }

    /// The defaults, with the socket directory resolved from
    /// `$ZRPC_SOCKET_DIR` or the default
    /// ([`zrpc_proto::default_socket_dir`]).
    pub fn new(socket_dir: Option<PathBuf>) -> Self {
        Config {
            socket_dir: zrpc_proto::resolve_socket_dir(socket_dir.as_deref()),
            socket_mode: 0o666,
            max_message_size: zrpc_proto::DEFAULT_MAX_MESSAGE_SIZE,
            max_connections: 16_384,
            max_pending_per_conn: 65_536,
            max_pending_total: 1_048_576,
            max_delivered_per_conn: DEFAULT_MAX_DELIVERED_PER_CONN,
            max_pending_bytes_per_conn: DEFAULT_MAX_PENDING_BYTES_PER_CONN,
            max_pending_bytes: DEFAULT_MAX_PENDING_BYTES,
            max_names_per_conn: 256,
            max_names: DEFAULT_MAX_NAMES,
            max_queued_bytes: 64 * 1024 * 1024,
            max_queued_total: DEFAULT_MAX_QUEUED_TOTAL,
            handshake_timeout: Duration::from_secs(5),
            close_flush_timeout: DEFAULT_CLOSE_FLUSH_TIMEOUT,
            max_monitor_names: DEFAULT_MAX_MONITOR_NAMES,
            warn_interval: DEFAULT_WARN_INTERVAL,
            name_logs_per_second: DEFAULT_NAME_LOGS_PER_SECOND,
            shutdown_grace: Duration::from_secs(2),
            caller_grace: DEFAULT_CALLER_GRACE,
            name_grace: DEFAULT_NAME_GRACE,
            names_file: None,
            round_quantum: crate::fair::QUANTUM,
            heartbeat_interval: Duration::from_secs(5),
            heartbeat_timeout: Duration::from_secs(15),
            busy_poll: Duration::from_micros(DEFAULT_BUSY_POLL_US),
            // SAFETY: geteuid has no preconditions.
            policy: crate::policy::Policy::default_for(unsafe { libc::geteuid() }),
            policy_path: None,
            frame_timeout: DEFAULT_FRAME_TIMEOUT,
            max_partial_bytes: DEFAULT_MAX_PARTIAL_BYTES,
            max_stats_names: DEFAULT_MAX_STATS_NAMES as usize,
            max_fds_per_conn: DEFAULT_MAX_FDS_PER_CONN,
            max_fds: DEFAULT_MAX_FDS,
            #[cfg(feature = "nats")]
            bridge: None,
        }
    }
}
