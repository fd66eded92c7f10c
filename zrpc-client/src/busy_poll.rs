//! Opt-in adaptive busy polling for the async [`Client`](crate::Client).
//!
//! Under load, the largest cost of a call is often not zrpc's work but
//! waking the sleeping process its reply is written to (on a VM, an
//! inter-processor interrupt through the hypervisor, then a context
//! switch). `zrpcd` and services run with [`Server::run`] avoid it by
//! polling their sockets for a short window (50 µs by default) before they
//! sleep, while frames arrive back to back; see `zrpc_io::busy_poll` for
//! the rule (a client polls only while most recent replies came within the
//! window of it running out of work). The client cannot install that on a runtime it does not own,
//! so it is offered here, in two steps:
//!
//! ```no_run
//! # fn main() -> std::io::Result<()> {
//! use std::time::Duration;
//!
//! // 1. The runtime calls the poller when it runs out of work.
//! let rt = tokio::runtime::Builder::new_current_thread()
//!     .enable_all()
//!     .on_thread_park(zrpc_client::busy_poll::before_park)
//!     .build()?;
//! // 2. A poller on this thread (the one that runs `block_on`): clients
//! //    connect on it from now on are polled; dropping the guard stops it.
//! let _polling = zrpc_client::busy_poll::enable(zrpc_client::busy_poll::default_window())?;
//! rt.block_on(async {
//!     let client = zrpc_client::Client::connect().await.expect("zrpcd is running");
//!     // ... calls ...
//! #   drop(client);
//! });
//! # Ok(())
//! # }
//! ```
//!
//! What it costs: CPU while replies arrive back to back (the thread polls
//! instead of sleeping between them, up to one CPU); nothing when idle, and
//! nothing for a caller making a call every 100 µs or more. Timers and other
//! descriptors on that runtime are seen at most one window late while it
//! polls. It is off with a zero window and on a machine with one CPU.
//!
//! Scope: a current-thread runtime (each thread of a multi-thread runtime
//! would need its own poller; not offered). The [`BlockingClient`] does not
//! poll: it blocks in `read` instead.
//!
//! [`Server::run`]: https://docs.rs/zrpc-service
//! [`BlockingClient`]: crate::BlockingClient

use std::io;
use std::rc::Rc;
use std::time::Duration;

use zrpc_io::busy_poll::{BusyPoll, Installed};

pub use zrpc_io::busy_poll::{before_park, PollStats, MAX_WINDOW_US};

/// The window [`default_window`] suggests for a client, microseconds:
/// longer than the broker's and a service's (50 µs), because what a client
/// waits for is a whole round trip through the broker and a service, which
/// under load on a 2-CPU machine takes 50-200 µs; a 50 µs window caught
/// almost none of those replies (docs/performance.md).
pub const DEFAULT_WINDOW_US: u64 = 200;

/// `$ZRPC_BUSY_POLL_US` microseconds if set (0 turns polling off), else
/// [`DEFAULT_WINDOW_US`]. An unreadable value is logged and ignored.
pub fn default_window() -> Duration {
    BusyPoll::window_from_env(DEFAULT_WINDOW_US)
}

/// Keeps busy polling enabled on this thread; dropping it restores what was
/// there before (usually: no polling).
#[must_use = "polling stops when this guard is dropped"]
#[derive(Debug)]
pub struct Enabled {
    poller: Option<Rc<BusyPoll>>,
    _installed: Installed,
}

impl Enabled {
    /// What the poller has done so far; `None` when polling is off (a zero
    /// window, or one CPU).
    pub fn stats(&self) -> Option<PollStats> {
        self.poller.as_ref().map(|p| p.stats())
    }
}

/// Enables busy polling on the current thread, with `window` (at most
/// [`MAX_WINDOW_US`] µs): connections that clients open on this thread from
/// now on are polled by [`before_park`] when the runtime runs out of work.
/// A zero window, or a machine with one CPU, enables nothing.
///
/// # Errors
///
/// The poller's `epoll` set could not be created (out of descriptors).
pub fn enable(window: Duration) -> io::Result<Enabled> {
    let poller = BusyPoll::new(window)?;
    Ok(Enabled {
        _installed: BusyPoll::scoped(poller.clone()),
        poller,
    })
}
