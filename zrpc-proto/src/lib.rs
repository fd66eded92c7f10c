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

pub mod blob;
#[cfg(feature = "reactor")]
pub mod busy_poll;
mod codec;
mod envelope;
mod error;
mod inline;
pub mod mp;
mod names;
pub mod payload;
#[cfg(feature = "reactor")]
pub mod reactor;
mod sd;
pub mod trust;

pub use blob::Blob;
pub use codec::{
    encode_frame, encode_header, Batch, BatchFrames, Frame, FrameDecoder, FrameSize, HEADER_LEN,
};
pub use envelope::{flags, Caller, Envelope, Kind};
pub use error::{ErrorCode, ProtoError};
pub use inline::InlineBytes;
pub use names::{to_snake_case, validate_name, MAX_NAME_LEN};
pub use payload::{decode_payload, MAX_TIMEOUT_MS};
pub use sd::{sd_notify, watchdog_interval};
pub use trust::{check_broker, UntrustedBroker};

/// Version of the protocol spoken by this crate, sent in `Hello`/`Welcome`.
pub const PROTOCOL_VERSION: u32 = 1;

/// File name of the broker's socket inside the socket directory.
pub const SOCKET_FILE: &str = "zrpcd.sock";

/// File name of the lock file the broker holds inside the socket directory.
pub const LOCK_FILE: &str = "zrpcd.lock";

/// The original zrpc's socket directory. No longer the default: any local
/// user could create it first (see [`trust::default_socket_dir`]); set
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
/// `$ZRPC_SOCKET_DIR`, then [`trust::default_socket_dir`].
pub fn resolve_socket_dir(explicit: Option<&std::path::Path>) -> std::path::PathBuf {
    if let Some(p) = explicit {
        return p.to_path_buf();
    }
    match std::env::var_os(SOCKET_DIR_ENV) {
        Some(v) if !v.is_empty() => v.into(),
        _ => trust::default_socket_dir(),
    }
}

/// What to check when connecting to the broker's socket failed with `e`,
/// as a parenthesised hint to append to the error message: whether zrpcd
/// runs (no socket, connection refused), or whether this user may open its
/// socket (permission denied).
pub fn connect_hint(e: &std::io::Error) -> &'static str {
    use std::io::ErrorKind;
    match e.kind() {
        ErrorKind::PermissionDenied => {
            " (a permission problem, not a missing broker: this user may not open zrpcd's socket or its directory; check their owner and mode, see zrpcd --socket-mode)"
        }
        ErrorKind::NotFound | ErrorKind::ConnectionRefused => {
            " (is zrpcd running? is the socket directory right? see --socket-dir and $ZRPC_SOCKET_DIR)"
        }
        _ => "",
    }
}

/// Reads what `sock` has into the spare capacity of `buf` (one `read(2)`,
/// at most the spare capacity) and extends `buf` by what was read. The one
/// way the broker and the libraries read a socket into a buffer without
/// initialising its spare capacity first: no `&mut [u8]` to uninitialised
/// memory is ever made. Errors (`WouldBlock` included) are `read(2)`'s.
pub fn read_spare(
    sock: &impl std::os::fd::AsRawFd,
    buf: &mut bytes::BytesMut,
) -> std::io::Result<usize> {
    use bytes::BufMut;
    let spare = buf.chunk_mut();
    let (ptr, cap) = (spare.as_mut_ptr(), spare.len());
    // SAFETY: `ptr` points to `cap` bytes of `buf`'s spare capacity, valid
    // for writes while `buf` is borrowed here; read(2) writes at most `cap`
    // bytes there and nothing else, through a raw pointer (no reference to
    // uninitialised bytes is created).
    let n = unsafe { libc::read(sock.as_raw_fd(), ptr.cast(), cap) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let n = n as usize;
    // SAFETY: the kernel initialised the first `n <= cap` spare bytes.
    unsafe { buf.advance_mut(n) };
    Ok(n)
}

/// Path of the broker socket inside `socket_dir`.
pub fn socket_path(socket_dir: &std::path::Path) -> std::path::PathBuf {
    socket_dir.join(SOCKET_FILE)
}

#[cfg(test)]
mod tests;
