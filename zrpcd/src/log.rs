//! The daemon's log: `tracing` events to stderr, and panics reported
//! through it.
//!
//! A panic (a bug in zrpcd, or in a dependency such as the NATS client of
//! the `nats` feature's bridge) would otherwise print Rust's default
//! report on stderr, outside the log's format and filter: a log collector
//! parsing the daemon's lines would miss it or take it apart. The hook
//! installed here reports it as one `ERROR` event (message, location,
//! thread, and the backtrace when `RUST_BACKTRACE` asks for one) and does
//! nothing else: the panic then unwinds as before (tokio catches a task's
//! panic, a panic in the main thread ends the process with status 101).

use std::backtrace::{Backtrace, BacktraceStatus};
use std::io::IsTerminal;
use std::panic::PanicHookInfo;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Sends `tracing` events to stderr, filtered by `$RUST_LOG` if set and
/// valid, else by `default_filter` (`--log`), colored only on a terminal;
/// then reports panics through it ([`log_panic`]). Call once, at startup.
pub fn init(default_filter: &str) {
    let text = std::env::var("RUST_LOG").unwrap_or_default();
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    // The NATS client of the bridge logs each of its events at info (a
    // NATS publisher flooding an exported name made it log "slow
    // consumers" 5,000 times a second); the bridge logs those that matter
    // itself, rate-limited. Named in the filter, it is logged as asked.
    if !text.contains("async_nats") && !default_filter.contains("async_nats") {
        if let Ok(quiet) = "async_nats=warn".parse() {
            filter = filter.add_directive(quiet);
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    std::panic::set_hook(Box::new(log_panic));
}

/// The panic hook: the panic as one `ERROR` event, in place of Rust's
/// default report.
pub fn log_panic(info: &PanicHookInfo<'_>) {
    let payload = info.payload();
    let message = payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(a panic without a message)");
    let location = info
        .location()
        .map_or_else(|| "an unknown location".to_owned(), ToString::to_string);
    let thread = std::thread::current();
    let thread = thread.name().unwrap_or("<unnamed>");
    // Captured only if RUST_BACKTRACE (or RUST_LIB_BACKTRACE) asks for it,
    // as the default hook does.
    let backtrace = Backtrace::capture();
    if backtrace.status() == BacktraceStatus::Captured {
        tracing::error!(
            target: "zrpcd",
            %location,
            thread,
            %backtrace,
            "panicked (a bug in zrpcd or a library it uses): {message}"
        );
    } else {
        tracing::error!(
            target: "zrpcd",
            %location,
            thread,
            "panicked (a bug in zrpcd or a library it uses): {message}"
        );
    }
}

/// Warnings a user can cause at will (a connection refused at accept, a
/// connection closed for a protocol error or a quota, a request refused,
/// descriptors the kernel would not pass) are logged at warn at most once
/// per this interval for each kind, the others at debug: a user
/// reconnecting in a loop must not flood the log (journald's default rate
/// limit, 10,000 lines in 30 s, would then drop zrpcd's other lines, and
/// the log is written from the event loop). `zrpcd.stats` counts them all
/// (`connections_refused`, `protocol_errors`). In milliseconds;
/// `--warn-interval` ([`set_warn_interval`]).
static WARN_INTERVAL_MS: AtomicU64 =
    AtomicU64::new(crate::config::DEFAULT_WARN_INTERVAL.as_millis() as u64);

/// Sets the interval between two warnings of one kind (`--warn-interval`;
/// the broker sets it from its [`crate::Config`] when it starts).
pub fn set_warn_interval(every: Duration) {
    let ms = u64::try_from(every.as_millis()).unwrap_or(u64::MAX);
    WARN_INTERVAL_MS.store(ms, Ordering::Relaxed);
}

/// The interval between two warnings of one kind.
pub(crate) fn warn_interval() -> Duration {
    Duration::from_millis(WARN_INTERVAL_MS.load(Ordering::Relaxed))
}

/// One kind of warning, rate-limited: logged at warn at most once per
/// [`warn_interval`] ([`zrpc_io::ratelog::RateLog`]).
#[derive(Debug)]
pub(crate) struct RefusalLog(zrpc_io::ratelog::RateLog);

impl Default for RefusalLog {
    fn default() -> RefusalLog {
        RefusalLog::new()
    }
}

impl RefusalLog {
    /// None logged yet.
    pub(crate) const fn new() -> RefusalLog {
        RefusalLog(zrpc_io::ratelog::RateLog::new())
    }

    /// Whether an occurrence at `now` is logged at warn; if so, also how
    /// many were logged at debug only since the last one.
    pub(crate) fn warn_now(&mut self, now: Instant) -> Option<u64> {
        self.0.warn_now(now, warn_interval())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_logged_at_warn_at_most_once_per_interval() {
        let mut log = RefusalLog::default();
        let t0 = Instant::now();
        assert_eq!(log.warn_now(t0), Some(0));
        for i in 1..=5 {
            assert_eq!(log.warn_now(t0 + Duration::from_millis(i)), None);
        }
        let every = warn_interval();
        let later = t0 + every;
        assert_eq!(log.warn_now(later), Some(5));
        assert_eq!(log.warn_now(later + Duration::from_millis(1)), None);
        assert_eq!(log.warn_now(later + every), Some(1));
    }
}
