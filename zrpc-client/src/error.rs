//! The client's error type.

use std::path::PathBuf;

use zrpc_proto::ErrorCode;

/// Why a call or a connection attempt failed.
///
/// Errors reported by the broker or the service carry the service (and
/// method) they concern; [`Error::code`] gives the wire [`ErrorCode`], handy
/// for command-line exit codes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The call's deadline passed: the broker answered `Timeout` (or
    /// `TimeoutNoService`: no service held the name while the call waited,
    /// and it was never delivered, so it never ran), the deadline passed while the client was
    /// reconnecting to the broker, or the local safety deadline (timeout +
    /// 2 s) passed without any answer.
    #[error("call to {service}.{method} timed out{}", if *no_service {
        format!(": no service registered the name {service:?} before the deadline")
    } else {
        String::new()
    })]
    Timeout {
        /// Target service.
        service: String,
        /// Target method.
        method: String,
        /// True when the broker reports that no service held the name until
        /// the deadline passed (a misspelt or stopped service): the call was
        /// never delivered. False for a call whose instance disconnected and
        /// that then waited for a new one, or that the client resubmitted
        /// after losing its broker: it may have run.
        no_service: bool,
    },
    /// No service holds the name (only with `no_wait`): the call was never
    /// delivered (a call resubmitted after losing the broker gets
    /// [`Error::ServiceGone`] instead).
    #[error("no service named {service:?} is registered")]
    NoSuchService {
        /// Target service.
        service: String,
    },
    /// The broker's access policy does not allow this caller to call the
    /// service or method (or to use the broker's introspection).
    #[error("not allowed to call {service}.{method}: {message}")]
    AccessDenied {
        /// Target service.
        service: String,
        /// Target method.
        method: String,
        /// The broker's explanation (which rule, which uid).
        message: String,
    },
    /// The service has no such method.
    #[error("service {service:?} has no method {method:?}")]
    NoSuchMethod {
        /// Target service.
        service: String,
        /// Target method.
        method: String,
    },
    /// The handler returned an error or panicked.
    #[error("{service}.{method} failed: {message}")]
    Remote {
        /// Target service.
        service: String,
        /// Target method.
        method: String,
        /// The handler's error text.
        message: String,
        /// The handler's error value, MessagePack-encoded, when its type is
        /// serialisable (a `#[service]` method returning `Result<T, E>`
        /// with `E: Serialize`); empty otherwise (a panic, a `Display`-only
        /// error). Decode it with [`Error::remote_value`]; the typed
        /// clients do it for you.
        value: bytes::Bytes,
    },
    /// The service could not decode the call's arguments.
    #[error("{service}.{method} could not decode its arguments: {message}")]
    BadPayload {
        /// Target service.
        service: String,
        /// Target method.
        method: String,
        /// The decoder's error text.
        message: String,
    },
    /// The instance handling the call disconnected and the call had
    /// `no_retry`, or had `no_wait` and no other instance held the name; or
    /// a `no_wait` call the client resubmitted after losing its broker
    /// found no instance of the name at the new one. The call may have run.
    #[error("the instance of service {service:?} handling the call disconnected")]
    ServiceGone {
        /// Target service.
        service: String,
    },
    /// The broker is shutting down: it did not finish a `no_retry` call
    /// (other calls are resubmitted to the next broker instead), or it
    /// refused a new connection. Such a call may or may not have run: the
    /// broker answers so both the calls it never delivered and those
    /// delivered but not finished within its `--shutdown-grace`.
    #[error("the zrpcd broker is shutting down")]
    Shutdown,
    /// The broker socket could not be connected to. The message says what
    /// to check: whether zrpcd runs (no socket, connection refused), or
    /// whether this user may open its socket (permission denied).
    #[error("cannot connect to zrpcd at {}: {source}{}", path.display(), zrpc_io::connect_hint(source))]
    Connect {
        /// The socket path tried.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The broker at the socket runs as a user this process does not trust
    /// (not root, not itself, not `$ZRPC_BROKER_UID`): nothing was sent to
    /// it.
    #[error(transparent)]
    UntrustedBroker(#[from] zrpc_io::UntrustedBroker),
    /// The connection to the broker was lost while a `no_retry` call was on
    /// the broker (the call may or may not have run), or the client's
    /// connection task stopped. Calls without `no_retry` are resubmitted
    /// after reconnecting instead.
    #[error("connection to zrpcd lost: {0}")]
    Disconnected(String),
    /// The broker (or this library) detected a protocol violation.
    #[error("zrpc protocol error: {0}")]
    Protocol(String),
    /// The broker does not speak our protocol version.
    #[error("zrpc protocol version mismatch: {0}")]
    VersionMismatch(String),
    /// A configured limit was hit, e.g. the payload exceeds the broker's
    /// maximum message size.
    #[error("limit exceeded: {0}")]
    LimitExceeded(String),
    /// The arguments could not be encoded as MessagePack.
    #[error("cannot encode the call's arguments: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
    /// The result could not be decoded into the requested type.
    #[error("cannot decode the call's result: {}", zrpc_proto::blob::decode_error_text(.0))]
    Decode(#[from] rmp_serde::decode::Error),
    /// Any other error code from the broker.
    #[error("zrpcd error ({code}): {message}")]
    Broker {
        /// The wire error code.
        code: ErrorCode,
        /// The broker's message.
        message: String,
    },
}

impl Error {
    /// The wire error code this error corresponds to, if any (local errors
    /// such as [`Error::Connect`], [`Error::Disconnected`], [`Error::Encode`]
    /// and [`Error::Decode`] have none).
    pub fn code(&self) -> Option<ErrorCode> {
        Some(match self {
            Error::Timeout {
                no_service: true, ..
            } => ErrorCode::TimeoutNoService,
            Error::Timeout { .. } => ErrorCode::Timeout,
            Error::NoSuchService { .. } => ErrorCode::NoSuchService,
            Error::NoSuchMethod { .. } => ErrorCode::NoSuchMethod,
            Error::Remote { .. } => ErrorCode::Remote,
            Error::BadPayload { .. } => ErrorCode::BadPayload,
            Error::AccessDenied { .. } => ErrorCode::AccessDenied,
            Error::ServiceGone { .. } => ErrorCode::ServiceGone,
            Error::Shutdown => ErrorCode::Shutdown,
            Error::Protocol(_) => ErrorCode::Protocol,
            Error::VersionMismatch(_) => ErrorCode::VersionMismatch,
            Error::LimitExceeded(_) => ErrorCode::LimitExceeded,
            Error::Broker { code, .. } => *code,
            Error::Connect { .. }
            | Error::UntrustedBroker(_)
            | Error::Disconnected(_)
            | Error::Encode(_)
            | Error::Decode(_) => return None,
        })
    }

    /// The service's error value of a [`Error::Remote`], decoded as `E`:
    /// `None` for other errors, when the service sent no value, or when it
    /// does not decode as `E`.
    pub fn remote_value<E: serde::de::DeserializeOwned>(&self) -> Option<E> {
        match self {
            Error::Remote { value, .. } if !value.is_empty() => {
                zrpc_proto::decode_payload(value).ok()
            }
            _ => None,
        }
    }

    /// `Ok(e)` if this is a [`Error::Remote`] whose value decodes as `E`,
    /// else `Err(self)` unchanged (what a typed client returns for a method
    /// declared `-> Result<T, E>`).
    pub fn into_remote<E: serde::de::DeserializeOwned>(self) -> Result<E, Error> {
        match self.remote_value() {
            Some(e) => Ok(e),
            None => Err(self),
        }
    }

    /// Maps a call's `Result{code, message}` (and its payload) to an error.
    pub(crate) fn from_call(
        code: ErrorCode,
        message: String,
        value: bytes::Bytes,
        service: &str,
        method: &str,
    ) -> Error {
        let service = service.to_owned();
        match code {
            ErrorCode::Timeout | ErrorCode::TimeoutNoService => Error::Timeout {
                service,
                method: method.to_owned(),
                no_service: code == ErrorCode::TimeoutNoService,
            },
            ErrorCode::NoSuchService => Error::NoSuchService { service },
            ErrorCode::NoSuchMethod => Error::NoSuchMethod {
                service,
                method: method.to_owned(),
            },
            ErrorCode::Remote => Error::Remote {
                service,
                method: method.to_owned(),
                message,
                value,
            },
            ErrorCode::BadPayload => Error::BadPayload {
                service,
                method: method.to_owned(),
                message,
            },
            ErrorCode::ServiceGone => Error::ServiceGone { service },
            ErrorCode::AccessDenied => Error::AccessDenied {
                service,
                method: method.to_owned(),
                message,
            },
            other => Error::from_fatal(other, message),
        }
    }

    /// Maps a connection-level `Fatal{code, message}` (or a call error that
    /// does not concern the call's target) to an error.
    pub(crate) fn from_fatal(code: ErrorCode, message: String) -> Error {
        match code {
            ErrorCode::Shutdown => Error::Shutdown,
            ErrorCode::Protocol => Error::Protocol(message),
            ErrorCode::VersionMismatch => Error::VersionMismatch(message),
            ErrorCode::LimitExceeded => Error::LimitExceeded(message),
            code => Error::Broker { code, message },
        }
    }
}

impl From<zrpc_io::HandshakeError> for Error {
    fn from(e: zrpc_io::HandshakeError) -> Error {
        use zrpc_io::HandshakeError as H;
        match e {
            H::Connect { path, source } => Error::Connect { path, source },
            H::Untrusted(u) => Error::UntrustedBroker(u),
            v @ H::Version { .. } => Error::VersionMismatch(v.to_string()),
            H::Fatal { code, message } => Error::from_fatal(code, message),
            H::Protocol(m) => Error::Protocol(m),
        }
    }
}

/// `Result` with [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
