//! Client library for zrpc: call services through the `zrpcd` broker.
//!
//! Two flavours share one wire format (see `docs/protocol.md`):
//!
//! - [`Client`], async on tokio: cheap to clone, clones multiplex many
//!   concurrent calls over one connection;
//! - [`BlockingClient`], for synchronous code: no background thread, callers
//!   take turns reading the connection.
//!
//! ```no_run
//! # async fn f() -> zrpc_client::Result<()> {
//! use std::time::Duration;
//! let client = zrpc_client::Client::connect().await?;
//! let sum: i64 = client.call("calc", "add", &(1, 2), Some(Duration::from_secs(5))).await?;
//! # Ok(()) }
//! ```
//!
//! Arguments are encoded as MessagePack with structs as maps
//! (`rmp_serde::encode::to_vec_named`), results decoded with
//! `rmp_serde::from_slice`; an empty result payload decodes as nil. Binary
//! data should be a [`Blob`] (a `Bytes`; a result blob of 4 KiB or more is a
//! view into the buffer the reply was read into, no copy) or use
//! `serde_bytes`, so it travels as MessagePack `bin`. A
//! [`Value`] keeps every MessagePack type through a round trip (`f32` stays
//! `f32`, `bin` stays `bin`, `ext` stays `ext`, maps may have non-string
//! keys); the only exception is a `str` holding invalid UTF-8, which comes
//! back as `bin` (use [`Client::call_raw`] for byte-exact handling).
//!
//! # Typed clients
//!
//! [`macro@interface`] on a trait (in a crate of its own, shared with the
//! service) generates `<Trait>Client` and `<Trait>BlockingClient`, one typed
//! method per trait method; the service implements the trait with
//! `#[zrpc_service::service] impl Trait for Type`. The untyped
//! [`Client::call`] stays for dynamic use.
//!
//! # How it is built
//!
//! One core and two faces: `core.rs` holds the calls in flight and decides
//! what every frame from the broker, every lost connection and every new
//! connection does to them, without doing any I/O; the async [`Client`]
//! (`client.rs`: the handles and the call path; `supervisor.rs`: the task
//! that reads the connection and reconnects; `conn.rs`: the connection and
//! its writer task) and the [`BlockingClient`] (`blocking.rs`: callers take
//! turns reading) feed it frames and send what it hands back. Sockets are
//! read, written and connected with `zrpc-io`, as in the broker and the
//! service library. `docs/architecture.md` follows one call through it.
//!
//! # Restarts and reconnection
//!
//! A restart of the broker is invisible to callers, apart from extra
//! latency. Both clients behave the same way:
//!
//! - **Connection loss does not fail calls.** When the connection to the
//!   broker ends (end of stream, a read or write error, or a `Fatal` frame of
//!   any code, including `Shutdown`), the client reconnects by itself and
//!   resubmits every call still pending, with the **same call id** and the
//!   **remaining budget** as its `timeout_ms` (the arguments are not encoded
//!   again). It keeps its `instance` id in `Hello`, so a call keeps its
//!   identity (instance id, call id) across reconnects: the service library
//!   uses it to answer a resubmitted call from its reply cache instead of
//!   running it twice.
//! - **Backoff.** Reconnection attempts are spaced by a capped exponential
//!   backoff with jitter: the first attempt waits 10 ms, each further one
//!   twice as long, up to 1 s, and every delay is multiplied by a random
//!   factor between 0.75 and 1.25. The sequence starts over once a
//!   connection has stayed up for at least the cap. Both bounds are set with
//!   [`ClientBuilder::reconnect_backoff`].
//! - **Deadlines still hold.** A call whose deadline passes while the
//!   client is disconnected fails at that moment with [`Error::Timeout`]; it
//!   is not resubmitted. A call without a deadline waits for as long as it
//!   takes: there is no limit on reconnection attempts (give calls a timeout
//!   to bound them). The local safety deadline (the call's timeout plus 2 s,
//!   for a broker that never answers) applies as before.
//! - **New calls while reconnecting** are queued and sent right after the
//!   handshake on the new connection, after the resubmitted calls.
//! - **`Result{Shutdown}`.** A broker that shuts down answers the calls it
//!   could not finish within its grace period with `Shutdown`, then closes.
//!   Such a call is treated like connection loss: it stays pending and is
//!   resubmitted to the next broker.
//! - **At-most-once calls: [`CallOptions::no_retry`].** A `no_retry` call is
//!   never resubmitted: if the connection is lost while it is on the broker,
//!   it fails at once with [`Error::Disconnected`] (it may or may not have
//!   run), and a `Shutdown` result surfaces as [`Error::Shutdown`]. A
//!   `no_retry` call made while the client is reconnecting is simply sent
//!   on the next connection, and so is one whose write fails before any
//!   byte of it was sent, where the client can tell (always for the
//!   blocking client; for the async client when the caller writes the frame
//!   itself, which it does when no other call is in flight). `no_retry`
//!   also tells the broker not to re-deliver the call to another instance
//!   if the service instance handling it disconnects
//!   ([`Error::ServiceGone`]).
//! - **The first connection is not retried.** [`Client::connect`] and
//!   [`BlockingClient::connect`] fail with [`Error::Connect`] when no broker
//!   is running; reconnection only starts once a client has connected.
//! - **Idle clients.** The async client notices a lost connection at once
//!   and reconnects when it is next used (or at once, if calls are pending).
//!   The blocking client has no background thread: it notices a lost
//!   connection when a thread next reads or writes it, and the thread
//!   currently acting as reader reconnects (bounded by its own call's
//!   deadline; when its call completes, another waiting thread takes over).
//!
//! # Heartbeats
//!
//! The broker may `Ping` a connection; the clients answer `Pong`. The async
//! client always reads its connection, so it answers at once. The blocking
//! client reads only while some thread is inside a call, so an idle
//! `BlockingClient` answers pings late (when it is next used); a broker that
//! treats an unanswered ping as a dead peer closes such a connection, and
//! the next call reconnects transparently.

#![warn(missing_docs)]

mod blocking;
pub mod busy_poll;
mod client;
mod common;
mod conn;
mod core;
mod error;
mod fds;
mod monitor;
mod options;
mod supervisor;

pub use blocking::BlockingClient;
pub use client::{Client, ClientBuilder};
pub use error::{Error, Result};
pub use monitor::Monitor;
pub use options::CallOptions;
pub use rmpv::Value;
/// How long connecting to the broker and the handshake may take unless
/// [`ClientBuilder::connect_timeout`] says otherwise (10 s).
pub use zrpc_io::handshake::DEFAULT_TIMEOUT as DEFAULT_CONNECT_TIMEOUT;
pub use zrpc_io::Backoff;
pub use zrpc_macros::interface;
pub use zrpc_proto::{Blob, ErrorCode};

#[cfg(test)]
mod tests;
