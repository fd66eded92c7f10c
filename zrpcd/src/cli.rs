//! `zrpcd`'s command line (clap derive), in the library so that the man
//! page generator (`cargo xtask man`) reads the same definitions.

use std::path::PathBuf;

use clap::Parser;

/// zrpcd: the zrpc broker. Services register names over a persistent
/// connection; clients call them; the broker routes calls, correlates replies
/// and enforces deadlines.
#[derive(Debug, Parser)]
#[command(name = "zrpcd", version, about)]
pub struct Args {
    /// Directory of the broker socket (zrpcd.sock) [default: /run/zrpc for
    /// root; $XDG_RUNTIME_DIR/zrpc for other users, /run/zrpc if it is
    /// unset]
    #[arg(long, env = "ZRPC_SOCKET_DIR")]
    pub socket_dir: Option<PathBuf>,
    /// Permission bits of the socket file, in octal (who may connect)
    #[arg(long, default_value = "666", value_parser = parse_octal)]
    pub socket_mode: u32,
    /// Largest message (envelope + payload) accepted, in bytes
    #[arg(long, default_value_t = zrpc_proto::DEFAULT_MAX_MESSAGE_SIZE)]
    pub max_message_size: u32,
    /// Most simultaneous connections
    #[arg(long, default_value_t = 16_384)]
    pub max_connections: usize,
    /// Most calls pending per connection
    #[arg(long, default_value_t = 65_536)]
    pub max_pending_per_conn: usize,
    /// Most calls pending in the whole broker
    #[arg(long, default_value_t = 1_048_576)]
    pub max_pending_total: usize,
    /// Most calls delivered to one service connection and not yet answered;
    /// more wait in the broker and are delivered as answers come, in turns
    /// by caller uid, so that one user's flood cannot starve others' calls
    /// to a shared service (at least 1)
    #[arg(long, default_value_t = crate::config::DEFAULT_MAX_DELIVERED_PER_CONN)]
    pub max_delivered_per_conn: u32,
    /// Most payload bytes of one connection's pending calls
    #[arg(long, default_value_t = crate::config::DEFAULT_MAX_PENDING_BYTES_PER_CONN)]
    pub max_pending_bytes_per_conn: usize,
    /// Most payload bytes of pending calls in the whole broker
    #[arg(long, default_value_t = crate::config::DEFAULT_MAX_PENDING_BYTES)]
    pub max_pending_bytes: usize,
    /// Most names one connection may register
    #[arg(long, default_value_t = 256)]
    pub max_names_per_conn: usize,
    /// Most names registered in the whole broker (each holder of a shared
    /// name counts); a user's quota (the policy's `names` quota) defaults
    /// to a quarter of it
    #[arg(long, default_value_t = crate::config::DEFAULT_MAX_NAMES)]
    pub max_names: usize,
    /// Most bytes queued towards one peer before the broker pushes back
    #[arg(long, default_value_t = 64 * 1024 * 1024)]
    pub max_queued_bytes: usize,
    /// Most bytes queued unread towards all peers together: past it, the
    /// users holding more than their fair share of it (max-min fair: the
    /// level at which all holdings, capped at it, add up to this) are
    /// pushed back as past their queued_bytes quota
    #[arg(long, default_value_t = crate::config::DEFAULT_MAX_QUEUED_TOTAL)]
    pub max_queued_total: usize,
    /// Seconds a new connection may take to send its Hello
    #[arg(long, default_value_t = 5.0)]
    pub handshake_timeout: f64,
    /// Seconds a connection the broker closes (a fatal error, a limit) may
    /// take to read the frames it was sent last; then they are dropped. At
    /// exit the broker waits this long plus 1 s for all connections
    #[arg(long, default_value_t = crate::config::DEFAULT_CLOSE_FLUSH_TIMEOUT.as_secs_f64())]
    pub close_flush_timeout: f64,
    /// Most service names in one `zrpcd.monitor` filter (`zrpc monitor
    /// NAME...`)
    #[arg(long, default_value_t = crate::config::DEFAULT_MAX_MONITOR_NAMES)]
    pub max_monitor_names: usize,
    /// Name events (a name registered, unregistered, or released by a
    /// connection that closed) of one user other than root logged at info
    /// level a second, ten seconds' worth at once; the rest at debug level,
    /// counted in the user's next line at info. 0: no limit
    #[arg(long, default_value_t = crate::config::DEFAULT_NAME_LOGS_PER_SECOND)]
    pub name_logs_per_second: u32,
    /// Seconds between two warnings of one kind that any user can cause
    /// (refused connections, closed connections, refused calls, descriptors
    /// the kernel would not pass); the others are logged at debug level,
    /// and all are counted in zrpcd.stats
    #[arg(long, default_value_t = crate::config::DEFAULT_WARN_INTERVAL.as_secs_f64())]
    pub warn_interval: f64,
    /// Seconds a frame may take to arrive completely once its first bytes
    /// arrived; a connection whose frame stalls longer is closed
    #[arg(long, default_value_t = crate::config::DEFAULT_FRAME_TIMEOUT.as_secs_f64())]
    pub frame_timeout: f64,
    /// Most bytes of read buffer held for partly received frames, all
    /// connections together; the connection that would pass it is closed
    #[arg(long, default_value_t = crate::config::DEFAULT_MAX_PARTIAL_BYTES)]
    pub max_partial_bytes: usize,
    /// Most payload descriptors (sealed memfds carrying large payloads)
    /// held for one connection; 0 turns descriptor passing off (payloads
    /// then travel inline)
    #[arg(long, default_value_t = crate::config::DEFAULT_MAX_FDS_PER_CONN)]
    pub max_fds_per_conn: usize,
    /// Most payload descriptors held by the broker in all
    #[arg(long, default_value_t = crate::config::DEFAULT_MAX_FDS)]
    pub max_fds: usize,
    /// Most service names with rows of their own in `zrpc stats` (names that
    /// are or were registered); the rest are counted under "(other)"
    #[arg(long, default_value_t = crate::config::DEFAULT_MAX_STATS_NAMES,
          value_parser = clap::value_parser!(u64).range(0..=crate::stats::MAX_STATS_NAMES as u64))]
    pub max_stats_names: u64,
    /// Seconds shutdown lets delivered calls finish before answering the rest
    /// with a Shutdown error
    #[arg(long, default_value_t = 2.0)]
    pub shutdown_grace: f64,
    /// Seconds a call keeps running at its service after its caller
    /// disconnected, for the caller to reconnect and resubmit it (capped by
    /// the call's timeout); then the service is told to cancel it. 0
    /// cancels at once. Such calls count like pending calls: past a user's
    /// pending_calls quota of them (or --max-pending-total in all), the
    /// oldest are cancelled at once
    #[arg(long, default_value_t = crate::config::DEFAULT_CALLER_GRACE.as_secs_f64())]
    pub caller_grace: f64,
    /// Seconds a name no `[[own]]` rule of the policy file mentions stays its
    /// user's after its last instance unregistered it or disconnected:
    /// within them only that user (not even root, unless it is that user)
    /// may register it again, so a restarting service keeps its name and
    /// its waiting calls from other users. Names held or kept when the
    /// broker stops or dies are kept as long after the next one starts
    /// (saved in zrpcd.names in the socket directory). 0: free at once
    #[arg(long, default_value_t = crate::config::DEFAULT_NAME_GRACE.as_secs_f64())]
    pub name_grace: f64,
    /// Frames each user other than root may have handled in a round of the
    /// broker's thread, however many connections it uses; then its
    /// connections wait for the next round, so that a user with many busy
    /// connections gets about what one busy connection gets (large reads
    /// count one more per 64 KiB, a new connection 16). 0: no rounds
    #[arg(long, default_value_t = crate::fair::QUANTUM)]
    pub round_quantum: u32,
    /// Seconds between pings to services
    #[arg(long, default_value_t = 5.0)]
    pub heartbeat_interval: f64,
    /// Seconds of silence after which a service is considered dead
    #[arg(long, default_value_t = 15.0)]
    pub heartbeat_timeout: f64,
    /// Microseconds the broker polls its sockets before sleeping when it
    /// runs out of work while frames arrive back to back (most within this
    /// long): trades CPU, only while calls flow that fast, for latency and
    /// throughput. 0 turns it off; at most 1000; off on a single CPU
    #[arg(long, default_value_t = crate::config::DEFAULT_BUSY_POLL_US,
          value_parser = clap::value_parser!(u64).range(0..=zrpc_io::busy_poll::MAX_WINDOW_US))]
    pub busy_poll_us: u64,
    /// Access policy file (TOML; see docs/security.md), re-read on SIGHUP
    /// [default: /etc/zrpc/policy.toml if it exists, else the built-in
    /// defaults]
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// Bridge to NATS: its configuration file (TOML; see docs/bridge.md).
    /// Credentials stay in the file, never on the command line
    #[cfg(feature = "nats")]
    #[arg(long, value_name = "FILE")]
    pub bridge: Option<PathBuf>,
    /// Log filter (tracing EnvFilter syntax); RUST_LOG overrides it
    #[arg(long, default_value = "info")]
    pub log: String,
}

/// Parses an octal permission mode (`--socket-mode 660`).
pub fn parse_octal(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s, 8).map_err(|e| format!("not an octal mode: {e}"))
}
