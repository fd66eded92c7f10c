//! The transport layer of zrpc: how bytes get between a process and the
//! broker. One implementation of each piece, used by `zrpcd`,
//! `zrpc-service` and both clients of `zrpc-client` alike:
//!
//! - [`read`]: reading a socket into a frame buffer (one sound
//!   read-into-spare-capacity, one buffer policy with per-role sizes);
//! - [`write`](mod@write): the outbound queue of one socket, written with vectored,
//!   partial, non-blocking writes (and waiting for writability only while
//!   the socket is full);
//! - [`handshake`]: connecting to the broker, checking who it is
//!   ([`trust`]) and the `Hello`/`Welcome` exchange, async and blocking;
//! - [`backoff`]: the reconnection backoff and the process's random ids;
//! - [`fdpass`]: large payloads as sealed memfds passed with
//!   `SCM_RIGHTS` (creating, verifying, mapping; reading descriptors off a
//!   socket); [`mapped`]: payloads mapped from sealed memfds, recognised
//!   by address so that they are sent again without a copy; [`spill`]:
//!   encoding a large payload straight into a memfd;
//! - [`reactor`]: registering a socket with tokio for one interest only;
//! - [`busy_poll`]: adaptive busy polling before a runtime parks;
//! - [`sd`]: the systemd notification protocol.
//!
//! The wire format itself (frames, envelopes, payloads) is
//! [`zrpc_proto`], which knows nothing of sockets or runtimes.

#![warn(missing_docs)]

pub mod backoff;
pub mod busy_poll;
pub mod fdpass;
pub mod handshake;
pub mod mapped;
pub mod prefill;
pub mod ratelog;
pub mod reactor;
pub mod read;
pub mod sd;
pub mod spill;
pub mod trust;
pub mod write;

pub use backoff::{random_id, Backoff, Retry};
pub use handshake::{Connected, HandshakeError, Welcome};
pub use reactor::Registered;
pub use read::{read_spare, ReadPolicy};
pub use trust::{check_broker, connect_hint, UntrustedBroker};
pub use write::OutQueue;
