//! The `zrpcd` broker daemon.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};
use zrpcd::cli::Args;
use zrpcd::Config;

/// A duration flag: non-negative seconds, at most 365 days (the longest a
/// call's deadline may be; longer ones would overflow the clock when added
/// to it).
fn secs(v: f64, what: &str) -> Result<Duration, String> {
    let d = Duration::try_from_secs_f64(v).map_err(|e| format!("--{what}: {e}"))?;
    let max = Duration::from_millis(zrpc_proto::MAX_TIMEOUT_MS);
    if d > max {
        return Err(format!(
            "--{what}: {v} s is more than the longest allowed, 365 days ({} s)",
            max.as_secs()
        ));
    }
    Ok(d)
}

/// Keeps large freed buffers in the heap for reuse. By default glibc returns
/// them to the kernel, so every megabyte-sized message would be page-faulted
/// in again (measured: 480 faults and 3 brk calls per 1 MiB call).
fn tune_allocator() {
    // SAFETY: mallopt only changes allocator parameters; called before any
    // other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 * 1024 * 1024);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 * 1024 * 1024);
    }
}

/// Raises the soft limit on open files to the hard limit: every connection
/// is one file descriptor.
fn raise_nofile() {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) == 0 && rl.rlim_cur < rl.rlim_max {
            rl.rlim_cur = rl.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &rl);
        }
    }
}

fn main() -> ExitCode {
    tune_allocator();
    raise_nofile();
    let args = Args::parse();
    zrpcd::log::init(&args.log);
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("zrpcd: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let dir_chosen = args.socket_dir.is_some()
        || std::env::var_os(zrpc_proto::SOCKET_DIR_ENV).is_some_and(|d| !d.is_empty());
    let mut config = Config::new(args.socket_dir);
    config.socket_mode = args.socket_mode;
    config.max_message_size = args.max_message_size;
    config.max_connections = args.max_connections;
    config.max_pending_per_conn = args.max_pending_per_conn;
    config.max_delivered_per_conn = args.max_delivered_per_conn.max(1);
    config.max_pending_total = args.max_pending_total;
    config.max_names_per_conn = args.max_names_per_conn;
    config.max_names = args.max_names;
    config.max_pending_bytes_per_conn = args.max_pending_bytes_per_conn;
    config.max_pending_bytes = args.max_pending_bytes;
    config.max_queued_bytes = args.max_queued_bytes;
    config.max_queued_total = args.max_queued_total;
    config.handshake_timeout = secs(args.handshake_timeout, "handshake-timeout")?;
    config.shutdown_grace = secs(args.shutdown_grace, "shutdown-grace")?;
    config.caller_grace = secs(args.caller_grace, "caller-grace")?;
    config.name_grace = secs(args.name_grace, "name-grace")?;
    config.names_file =
        (!config.name_grace.is_zero()).then(|| config.socket_dir.join(zrpcd::reserved::STATE_FILE));
    config.round_quantum = args.round_quantum;
    config.heartbeat_interval = secs(args.heartbeat_interval, "heartbeat-interval")?;
    config.heartbeat_timeout = secs(args.heartbeat_timeout, "heartbeat-timeout")?;
    config.busy_poll = std::time::Duration::from_micros(args.busy_poll_us);
    config.frame_timeout = secs(args.frame_timeout, "frame-timeout")?;
    config.close_flush_timeout = secs(args.close_flush_timeout, "close-flush-timeout")?;
    config.max_monitor_names = args.max_monitor_names;
    config.warn_interval = secs(args.warn_interval, "warn-interval")?;
    config.name_logs_per_second = args.name_logs_per_second;
    config.max_partial_bytes = args.max_partial_bytes;
    config.max_fds_per_conn = args.max_fds_per_conn;
    config.max_fds = args.max_fds;
    config.max_stats_names = args.max_stats_names as usize;
    // SAFETY: geteuid has no preconditions.
    let broker_uid = unsafe { libc::geteuid() };
    let default_policy = std::path::Path::new(zrpcd::policy::DEFAULT_POLICY_PATH);
    config.policy_path = match args.policy {
        Some(p) => Some(p),
        None if default_policy.exists() => Some(default_policy.to_path_buf()),
        None => None,
    };
    if let Some(path) = &config.policy_path {
        config.policy = zrpcd::policy::Policy::load(path, broker_uid)?;
        tracing::info!(
            policy = %path.display(),
            rules = config.policy.rules(),
            "access policy loaded"
        );
    }
    #[cfg(feature = "nats")]
    if let Some(path) = &args.bridge {
        let bridge = zrpcd::bridge::BridgeConfig::load(path)?;
        tracing::info!(bridge = %path.display(), host_id = %bridge.host_id, "NATS bridge configured");
        config.bridge = Some(bridge);
    }
    if config.heartbeat_interval.is_zero() {
        return Err("--heartbeat-interval must be positive".into());
    }

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .on_thread_park(zrpc_io::busy_poll::before_park)
        .build()?;
    // Signal handling is installed before the socket exists: a SIGTERM or
    // SIGINT sent as soon as the socket accepts connections must stop the
    // broker cleanly (exit 0, socket removed), not kill it by the signal's
    // default action.
    let (mut term, mut int, hup) = {
        let _rt = rt.enter();
        (
            signal(SignalKind::terminate())?,
            signal(SignalKind::interrupt())?,
            signal(SignalKind::hangup())?,
        )
    };
    let bound = match zrpcd::socket::adopt_listen_fds(&config.socket_dir)? {
        Some(b) => {
            tracing::info!(socket = %b.path.display(), "adopted the socket passed by systemd");
            b
        }
        None => zrpcd::socket::bind(&config.socket_dir, config.socket_mode)
            .map_err(|e| with_dir_hint(e, dir_chosen))?,
    };
    let local = tokio::task::LocalSet::new();
    let path = bound.path.clone();
    let result = local.block_on(&rt, async move {
        tracing::info!(socket = %path.display(), pid = std::process::id(), "zrpcd listening");
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = int.recv() => tracing::info!("SIGINT received"),
            }
        };
        // The broker runs as a task of its own: `block_on` polls this
        // future at every wake-up of any task of the LocalSet (every read
        // batch), so it only waits on that task's handle, a cheap check,
        // instead of polling the listener and the signal streams each time.
        let broker =
            tokio::task::spawn_local(zrpcd::server::run(config, bound.listener, shutdown, hup));
        broker.await.unwrap_or_else(|e| {
            Err(std::io::Error::other(format!(
                "the broker task failed: {e}"
            )))
        })
    });
    // The tasks still in the LocalSet (the NATS bridge's subscriptions
    // among them, which spawn a task of their own when dropped) are
    // dropped inside the runtime: outside it that spawn panicked, in a
    // destructor, and the process aborted.
    {
        let _rt = rt.enter();
        drop(local);
    }
    if bound.remove_on_exit {
        let _ = std::fs::remove_file(&bound.path);
    }
    tracing::info!("zrpcd stopped");
    result?;
    Ok(())
}

/// A user other than root without `$XDG_RUNTIME_DIR` (a cron job, `su`
/// without a login session) gets the system broker's directory by default,
/// which only root may create or bind in: say so, and what to do.
fn with_dir_hint(e: zrpcd::socket::SetupError, dir_chosen: bool) -> Box<dyn std::error::Error> {
    let denied = matches!(&e, zrpcd::socket::SetupError::Io { source, .. }
        if source.kind() == std::io::ErrorKind::PermissionDenied);
    let no_runtime_dir = std::env::var_os("XDG_RUNTIME_DIR").is_none_or(|d| d.is_empty());
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if denied && !dir_chosen && no_runtime_dir && !root {
        format!(
            "{e} ($XDG_RUNTIME_DIR is not set, so the default is the system broker's directory {}; pass --socket-dir DIR or set {} to run a broker of your own)",
            zrpc_proto::SYSTEM_SOCKET_DIR,
            zrpc_proto::SOCKET_DIR_ENV
        )
        .into()
    } else {
        e.into()
    }
}
