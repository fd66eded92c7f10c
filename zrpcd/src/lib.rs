//! `zrpcd`, the zrpc broker, as a library: `main.rs` is a thin wrapper.
//!
//! The state is split the way `dbus-broker` splits it, each registry with
//! a narrow API of its own:
//! - [`peers`]: connections and what each holds (counters changed only in
//!   charge/release pairs), with [`queue`] (a peer's outbound frames) and
//!   [`outbox`] (which peers to write, and when),
//! - [`names`]: service names and their instances,
//! - [`pending`]: calls in flight (slab, route interner, deadlines, kept
//!   payloads),
//! - [`monitor`]: `zrpc monitor` subscriptions; [`stats`]: counters,
//! - [`policy`]: who may own, call and watch what; [`quota`]: what one user
//!   may hold,
//! - [`builtin`]: the broker's own `zrpcd` service, a table of methods over
//!   a read-only view of those registries,
//!
//! tied together by [`broker::Broker`], whose handling is split by concern
//! ([`broker::calls`]: the call path; [`broker::owning`]: registering
//! names; [`broker::lifecycle`]: a connection's start and end, shutdown;
//! [`broker::partial`]: bounds on partly received frames), and driven by
//! [`conn`] (one reader and one writer task per connection) and [`server`]
//! (accept loop, the broker's tasks, shutdown). Everything runs on one
//! thread: cross-thread wake-ups are the largest per-call cost on small
//! machines.

#![warn(missing_docs)]

#[cfg(feature = "nats")]
pub mod bridge;
pub mod broker;
pub mod builtin;
pub mod cli;
pub mod closer;
pub mod config;
pub mod conn;
pub mod fair;
pub mod hashing;
pub mod log;
pub mod monitor;
pub mod names;
pub mod orphans;
pub mod outbox;
pub mod paging;
pub mod payload;
pub mod peers;
pub mod pending;
pub mod policy;
pub mod queue;
pub mod quota;
pub mod rate;
pub mod replay;
pub mod reserved;
pub mod server;
pub mod socket;
pub mod stats;
pub mod waiting;

pub use config::Config;
