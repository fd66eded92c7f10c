//! Error codes carried on the wire, and decoding errors.

use thiserror::Error;

/// Why a call, a registration or a connection failed, as carried in the
/// `code` field of `Result`, `Reply`, `Ack` and `Fatal` envelopes.
///
/// Code `0` means success and is represented by `Option::None` in the
/// envelope types. Unknown codes decode as [`ErrorCode::Unknown`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The call's deadline passed before a reply arrived (1).
    Timeout,
    /// No service holds the name, and the caller asked not to wait (2): the
    /// call was never delivered.
    NoSuchService,
    /// The service has no method of that name (3).
    NoSuchMethod,
    /// The handler returned an error or panicked; the message says why (4).
    Remote,
    /// The service could not decode the call's payload into the method's
    /// parameter type (5).
    BadPayload,
    /// The name is held by another live service (6).
    NameTaken,
    /// The name is not a valid service name (7).
    InvalidName,
    /// The service instance handling the call disconnected, and the call was
    /// marked not to be retried, or not to wait and no other instance held
    /// the name (8). The call may have run.
    ServiceGone,
    /// The broker is shutting down (9).
    Shutdown,
    /// The peer violated the protocol (10).
    Protocol,
    /// The peer speaks an unsupported protocol version (11).
    VersionMismatch,
    /// A configured limit was exceeded (12).
    LimitExceeded,
    /// The call was cancelled (13).
    Cancelled,
    /// The name is not registered by this connection (14).
    NotRegistered,
    /// The call's deadline passed while no service held the name: it was
    /// never delivered (15). A call whose instance disconnected gets
    /// `Timeout` instead (it may have run). A kind of timeout: clients report it as their
    /// timeout error, saying that the name was not registered.
    TimeoutNoService,
    /// The broker's access policy does not allow this (calling the service
    /// or method, owning the name, using the broker's introspection); the
    /// message says which rule and for which uid (16).
    AccessDenied,
    /// A code this version does not know.
    Unknown(u16),
}

impl ErrorCode {
    /// The numeric wire value.
    pub fn to_u16(self) -> u16 {
        match self {
            ErrorCode::Timeout => 1,
            ErrorCode::NoSuchService => 2,
            ErrorCode::NoSuchMethod => 3,
            ErrorCode::Remote => 4,
            ErrorCode::BadPayload => 5,
            ErrorCode::NameTaken => 6,
            ErrorCode::InvalidName => 7,
            ErrorCode::ServiceGone => 8,
            ErrorCode::Shutdown => 9,
            ErrorCode::Protocol => 10,
            ErrorCode::VersionMismatch => 11,
            ErrorCode::LimitExceeded => 12,
            ErrorCode::Cancelled => 13,
            ErrorCode::NotRegistered => 14,
            ErrorCode::TimeoutNoService => 15,
            ErrorCode::AccessDenied => 16,
            ErrorCode::Unknown(v) => v,
        }
    }

    /// Decodes a wire value; `0` (success) yields `None`.
    pub fn from_u16(v: u16) -> Option<ErrorCode> {
        Some(match v {
            0 => return None,
            1 => ErrorCode::Timeout,
            2 => ErrorCode::NoSuchService,
            3 => ErrorCode::NoSuchMethod,
            4 => ErrorCode::Remote,
            5 => ErrorCode::BadPayload,
            6 => ErrorCode::NameTaken,
            7 => ErrorCode::InvalidName,
            8 => ErrorCode::ServiceGone,
            9 => ErrorCode::Shutdown,
            10 => ErrorCode::Protocol,
            11 => ErrorCode::VersionMismatch,
            12 => ErrorCode::LimitExceeded,
            13 => ErrorCode::Cancelled,
            14 => ErrorCode::NotRegistered,
            15 => ErrorCode::TimeoutNoService,
            16 => ErrorCode::AccessDenied,
            v => ErrorCode::Unknown(v),
        })
    }

    /// Whether the code is a timeout ([`ErrorCode::Timeout`] or
    /// [`ErrorCode::TimeoutNoService`]).
    pub fn is_timeout(self) -> bool {
        matches!(self, ErrorCode::Timeout | ErrorCode::TimeoutNoService)
    }

    /// A short stable name, used in logs, statistics and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Timeout => "timeout",
            ErrorCode::NoSuchService => "no_such_service",
            ErrorCode::NoSuchMethod => "no_such_method",
            ErrorCode::Remote => "remote",
            ErrorCode::BadPayload => "bad_payload",
            ErrorCode::NameTaken => "name_taken",
            ErrorCode::InvalidName => "invalid_name",
            ErrorCode::ServiceGone => "service_gone",
            ErrorCode::Shutdown => "shutdown",
            ErrorCode::Protocol => "protocol",
            ErrorCode::VersionMismatch => "version_mismatch",
            ErrorCode::LimitExceeded => "limit_exceeded",
            ErrorCode::Cancelled => "cancelled",
            ErrorCode::NotRegistered => "not_registered",
            ErrorCode::TimeoutNoService => "timeout_no_service",
            ErrorCode::AccessDenied => "access_denied",
            ErrorCode::Unknown(_) => "unknown",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ErrorCode::Unknown(v) => write!(f, "unknown error code {v}"),
            other => f.write_str(other.as_str()),
        }
    }
}

/// A frame or envelope could not be decoded.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ProtoError {
    /// The frame announces a body larger than the configured limit.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge {
        /// Announced body length.
        len: u64,
        /// Configured limit.
        max: u32,
    },
    /// The header's envelope length is 0 or larger than the body (or, on a
    /// frame whose payload travels in a descriptor, not equal to it).
    #[error("bad envelope length {env_len} in a frame body of {body_len} bytes (it must be from 1 to the body length, and equal to it with the descriptor flag)")]
    BadEnvelopeLength {
        /// Announced envelope length.
        env_len: u32,
        /// Announced body length.
        body_len: u32,
    },
    /// The envelope is not valid MessagePack of the expected shape.
    #[error("malformed envelope: {0}")]
    Envelope(&'static str),
    /// The envelope names a message kind this version does not know.
    #[error("unknown message kind {0}")]
    UnknownKind(u64),
    /// A service or method name breaks the naming rules.
    #[error("invalid name {0:?}: names are 1-128 ASCII letters, digits, '_', '-' or '.', starting with a letter or '_'")]
    InvalidName(String),
}
