//! The errors of the service loop, and the events it reports.

use std::io;
use std::os::unix::io::RawFd;
use std::path::PathBuf;
use std::time::Duration;

use zrpc_proto::{ErrorCode, ProtoError};

/// Errors of the service loop.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The broker socket could not be connected.
    #[error("cannot connect to zrpcd at {}: {source}{}", path.display(), zrpc_io::connect_hint(source))]
    Connect {
        /// The socket path tried.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The broker at the socket runs as a user this process does not trust
    /// (not root, not itself, not `$ZRPC_BROKER_UID`): nothing was sent to
    /// it, and no name registered.
    #[error(transparent)]
    UntrustedBroker(#[from] zrpc_io::UntrustedBroker),
    /// Reading from or writing to the broker connection failed.
    #[error("I/O error on the zrpcd connection: {0}")]
    Io(#[source] io::Error),
    /// The broker closed the connection.
    #[error("zrpcd closed the connection")]
    Disconnected,
    /// The broker sent a frame or envelope that does not decode.
    #[error("protocol error from zrpcd: {0}")]
    Protocol(#[from] ProtoError),
    /// The broker sent a message this library does not expect.
    #[error("unexpected message from zrpcd: {0}")]
    Unexpected(String),
    /// A payload descriptor from the broker was missing, not a sealed
    /// memfd, or could not be mapped.
    #[error("bad payload descriptor from zrpcd: {0}")]
    FdPayload(String),
    /// The broker reported a fatal error and closed the connection.
    #[error("zrpcd reported a fatal error ({code}): {message}")]
    Fatal {
        /// The error code.
        code: ErrorCode,
        /// The broker's explanation.
        message: String,
    },
    /// The handshake or the registration of the names took too long.
    #[error("zrpcd did not complete the handshake within {0:?}")]
    HandshakeTimeout(Duration),
    /// Another live service holds the name exclusively (or this server is
    /// not shared while the holders are, or the other way round).
    #[error("service name {name:?} is already taken (use .shared(true) on every instance to run several)")]
    NameTaken {
        /// The name.
        name: String,
    },
    /// The broker's access policy does not let this user own the name (it
    /// is reserved for another user, held by another user's service, or
    /// kept for the user whose service held it until less than
    /// `zrpcd --name-grace` ago).
    #[error("not allowed to register service name {name:?}: {message}")]
    AccessDenied {
        /// The name.
        name: String,
        /// The broker's explanation (which rule, which uid).
        message: String,
    },
    /// The service name breaks the naming rules.
    #[error("invalid service name {name:?}: {message}")]
    InvalidName {
        /// The name.
        name: String,
        /// Why.
        message: String,
    },
    /// Registering a name failed for another reason (e.g. a limit).
    #[error("cannot register service name {name:?} ({code}): {message}")]
    Register {
        /// The name.
        name: String,
        /// The broker's error code.
        code: ErrorCode,
        /// The broker's explanation.
        message: String,
    },
    /// The server has no name to register.
    #[error("the server has no service name to register")]
    NoName,
    /// A registered file descriptor cannot be watched (e.g. it is closed or
    /// is a regular file, which epoll does not support). The registration
    /// is removed.
    #[error("cannot watch file descriptor {fd}: {source}")]
    Fd {
        /// The descriptor.
        fd: RawFd,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The internal tokio runtime could not be created.
    #[error("cannot create the tokio runtime: {0}")]
    Runtime(#[source] io::Error),
    /// `run`/`run_once` was called from inside a tokio runtime.
    #[error("Server::run/run_once cannot be called from within a tokio runtime; use `serve().await` or `serve_once().await`")]
    NestedRuntime,
}

impl Error {
    pub(crate) fn from_io(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::UnexpectedEof => Error::Disconnected,
            _ => Error::Io(e),
        }
    }

    /// Whether the error ends the broker connection (the next call of a run
    /// method reconnects and registers the names again).
    pub fn is_connection_error(&self) -> bool {
        !matches!(
            self,
            Error::Fd { .. } | Error::Runtime(_) | Error::NestedRuntime
        )
    }

    /// Whether a lost connection with this error is worth reconnecting:
    /// I/O errors, end of stream, handshake timeouts, undecodable frames
    /// and `Fatal` of any code except `VersionMismatch` (retrying cannot
    /// help there). Registration refusals (`NameTaken`, `InvalidName`,
    /// other `Ack` errors) are not.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Connect { .. }
            | Error::Io(_)
            | Error::Disconnected
            | Error::Protocol(_)
            | Error::Unexpected(_)
            | Error::FdPayload(_)
            | Error::HandshakeTimeout(_) => true,
            Error::Fatal { code, .. } => *code != ErrorCode::VersionMismatch,
            _ => false,
        }
    }
}

/// What one step of the service loop did ([`Server::run_once`](crate::Server::run_once)).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A request was handled and answered (successfully or with an error).
    /// If the connection it came on was lost while its handler ran, the
    /// answer could not be sent; it is in the reply cache for the re-sent
    /// call.
    Request {
        /// The called method.
        method: String,
    },
    /// The broker cancelled the running request; its handler was dropped and
    /// no reply was sent.
    Cancelled {
        /// The method whose handler was dropped.
        method: String,
    },
    /// A re-sent request (same `(caller_instance, caller_call)` as one
    /// already handled) was answered from the reply cache; the handler did
    /// not run and the request counter did not change.
    Replayed {
        /// The called method.
        method: String,
    },
    /// The callback of a registered file descriptor ran.
    Fd(RawFd),
}
