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
//! data should use `serde_bytes` so it travels as MessagePack `bin`. A
//! [`Value`] keeps every MessagePack type through a round trip (`f32` stays
//! `f32`, `bin` stays `bin`, `ext` stays `ext`, maps may have non-string
//! keys); the only exception is a `str` holding invalid UTF-8, which comes
//! back as `bin` (use [`Client::call_raw`] for byte-exact handling).

#![warn(missing_docs)]

mod blocking;
mod client;
mod common;
mod error;
mod options;

pub use blocking::BlockingClient;
pub use client::{Client, ClientBuilder};
pub use error::{Error, Result};
pub use options::CallOptions;
pub use rmpv::Value;
pub use zrpc_proto::ErrorCode;

#[cfg(test)]
mod tests;
