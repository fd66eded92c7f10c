//! The zrpc wire format, shared by `zrpcd`, `zrpc-service` and `zrpc-client`.
//!
//! A frame on the wire is:
//!
//! ```text
//! +----------------+----------------+----------------------+-------------------+
//! | body_len u32BE | env_len u32BE  | envelope (env_len)   | payload (rest)    |
//! +----------------+----------------+----------------------+-------------------+
//! ```
//!
//! `body_len` counts the envelope and the payload (not the 8 header bytes).
//! The envelope is a small MessagePack array `[kind, fields...]` (see
//! [`Envelope`]); the payload is one opaque MessagePack value that the broker
//! forwards without decoding. The full specification is `docs/protocol.md`.

#![warn(missing_docs)]

mod bits;
pub mod blob;
mod codec;
pub mod depth;
mod envelope;
mod error;
mod inline;
pub mod mp;
mod names;
pub mod payload;
pub mod shape;

pub use blob::Blob;
pub use codec::{
    encode_fd_header, encode_frame, encode_header, Batch, BatchFrames, Frame, FrameDecoder,
    FrameSize, FD_PAYLOAD_FLAG, HEADER_LEN,
};
pub use envelope::{caps, flags, Caller, Envelope, Kind};
pub use error::{ErrorCode, ProtoError};
pub use inline::InlineBytes;
pub use names::{to_snake_case, validate_name, MAX_NAME_LEN};
pub use payload::{decode_payload, MAX_TIMEOUT_MS};
pub use shape::Shape;

/// Version of the protocol spoken by this crate, sent in `Hello`/`Welcome`.
pub const PROTOCOL_VERSION: u32 = 1;

/// File name of the broker's socket inside the socket directory.
pub const SOCKET_FILE: &str = "zrpcd.sock";

/// File name of the lock file the broker holds inside the socket directory.
pub const LOCK_FILE: &str = "zrpcd.lock";

/// The original zrpc's socket directory. No longer the default: any local
/// user could create it first (see [`default_socket_dir`]); set
/// `$ZRPC_SOCKET_DIR` to it to keep using it for a private broker.
pub const LEGACY_SOCKET_DIR: &str = "/tmp/zrpc_sockets";

/// Environment variable that overrides the socket directory everywhere.
pub const SOCKET_DIR_ENV: &str = "ZRPC_SOCKET_DIR";

/// Default limit on `body_len` (envelope plus payload): 16 MiB.
pub const DEFAULT_MAX_MESSAGE_SIZE: u32 = 16 * 1024 * 1024;

/// Slack a receiver adds to the broker's announced maximum message size
/// for frames *from* the broker: the envelope the broker sends may be a
/// little longer than the one it forwards (a `Request` carries the broker's
/// call id and the caller's identity where the `Call` had only flags), so a
/// call the broker accepted at the limit must not be refused by its
/// service.
pub const INCOMING_SLACK: u32 = 4096;

/// Name under which the broker serves its own built-in service.
pub const BROKER_SERVICE: &str = "zrpcd";

/// The MessagePack encoding of nil, used as the payload of calls without one.
pub const NIL_PAYLOAD: &[u8] = &[0xc0];

/// Resolves the socket directory: an explicit value wins, then
/// `$ZRPC_SOCKET_DIR`, then [`default_socket_dir`].
pub fn resolve_socket_dir(explicit: Option<&std::path::Path>) -> std::path::PathBuf {
    if let Some(p) = explicit {
        return p.to_path_buf();
    }
    match std::env::var_os(SOCKET_DIR_ENV) {
        Some(v) if !v.is_empty() => v.into(),
        _ => default_socket_dir(),
    }
}

/// Path of the broker socket inside `socket_dir`.
pub fn socket_path(socket_dir: &std::path::Path) -> std::path::PathBuf {
    socket_dir.join(SOCKET_FILE)
}

/// The system broker's socket directory: under `/run`, which only root can
/// write, so nobody can take it first (systemd's `RuntimeDirectory=zrpc`).
pub const SYSTEM_SOCKET_DIR: &str = "/run/zrpc";

/// The socket directory used when neither `--socket-dir` nor
/// `$ZRPC_SOCKET_DIR` says one: the system broker's [`SYSTEM_SOCKET_DIR`]
/// for root, and for other users when a system broker runs there;
/// otherwise, for a user with a runtime directory (`$XDG_RUNTIME_DIR`,
/// private to the user), `$XDG_RUNTIME_DIR/zrpc`, a per-user broker.
pub fn default_socket_dir() -> std::path::PathBuf {
    use std::path::Path;
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let system = Path::new(SYSTEM_SOCKET_DIR);
    if root || system.join(SOCKET_FILE).exists() {
        return system.to_path_buf();
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => Path::new(&d).join("zrpc"),
        _ => system.to_path_buf(),
    }
}

#[cfg(test)]
mod tests;
