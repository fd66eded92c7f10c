//! `zrpcd`, the zrpc broker, as a library: `main.rs` is a thin wrapper.
//!
//! The state is split the way `dbus-broker` splits it:
//! - [`peers`]: connections and their outbound queues,
//! - [`names`]: service names and their instances,
//! - [`pending`]: calls in flight, with one timer structure for all deadlines,
//! - [`builtin`]: the broker's own `zrpcd` service,
//! - [`policy`]: who may own, call and watch what; [`quota`]: what one user
//!   may hold,
//!
//! with the broker's handling split by concern: [`owning`] (registering
//! names, with the access checks), [`lifecycle`] (a connection's start and
//! end, shutdown), [`partial`] (bounds on partly received frames),
//! tied together by [`broker::Broker`] (the routing logic) and driven by
//! [`conn`] (one reader and one writer task per connection) and [`server`]
//! (accept loop and shutdown). Everything runs on one thread: cross-thread
//! wake-ups are the largest per-call cost on small machines.

#![warn(missing_docs)]

pub mod broker;
pub mod builtin;
pub mod config;
pub mod conn;
pub mod monitor;
pub mod names;
pub mod outbox;
pub mod payload;
pub mod peers;
pub mod pending;
pub mod policy;
pub mod queue;
pub mod quota;
pub mod replay;
pub mod server;
pub mod socket;
pub mod stats;

pub use config::Config;
