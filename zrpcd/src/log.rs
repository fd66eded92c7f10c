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

/// Sends `tracing` events to stderr, filtered by `$RUST_LOG` if set and
/// valid, else by `default_filter` (`--log`), colored only on a terminal;
/// then reports panics through it ([`log_panic`]). Call once, at startup.
pub fn init(default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
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
