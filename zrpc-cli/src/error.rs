//! The tool's error type and its exit codes.

use zrpc_client::{Error, ErrorCode};

/// Exit codes of `zrpc`, one per kind of failure.
pub mod exit {
    /// Success.
    pub const OK: u8 = 0;
    /// Bad usage (unknown flag, invalid JSON payload, invalid name) or any
    /// other local failure.
    pub const USAGE: u8 = 1;
    /// The broker could not be reached or the connection was lost (is
    /// `zrpcd` running? is `--socket-dir` right?).
    pub const CONNECTION: u8 = 2;
    /// The call timed out.
    pub const TIMEOUT: u8 = 3;
    /// No service holds the name (with `--no-wait`).
    pub const NO_SUCH_SERVICE: u8 = 4;
    /// The service has no such method.
    pub const NO_SUCH_METHOD: u8 = 5;
    /// The handler returned an error or panicked.
    pub const REMOTE: u8 = 6;
    /// The service could not decode the arguments.
    pub const BAD_PAYLOAD: u8 = 7;
    /// The instance handling the call disconnected (with `--no-retry`).
    pub const SERVICE_GONE: u8 = 8;
    /// The broker is shutting down.
    pub const SHUTDOWN: u8 = 9;
    /// Protocol error, version mismatch, a limit exceeded (e.g. the payload
    /// is larger than the broker's maximum message size), or an unexpected
    /// answer.
    pub const PROTOCOL: u8 = 10;
    /// The broker's access policy refused the call (or the broker is not
    /// one this user trusts).
    pub const ACCESS_DENIED: u8 = 11;
    /// A finite `--concurrency` run was interrupted with Ctrl-C.
    pub const INTERRUPTED: u8 = 130;
}

/// The exit-code table as shown in `zrpc call --help`.
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
   0  success
   1  usage error (bad flag, invalid JSON payload, invalid name) or other local error
   2  cannot connect to zrpcd, or the connection was lost
   3  timeout
   4  no such service (with --no-wait)
   5  no such method
   6  remote error: the handler failed or panicked
   7  bad payload: the service could not decode the arguments
   8  service gone: the instance disconnected during the call (with --no-retry)
   9  the broker is shutting down
  10  protocol error, version mismatch or limit exceeded
  11  access denied by the broker's policy, or an untrusted broker
 130  interrupted (Ctrl-C during a --concurrency run with a finite --count)";

/// A failure: what to print (after `zrpc: `) and the exit code.
#[derive(Debug)]
pub struct Failure {
    /// The message, without the `zrpc: ` prefix.
    pub message: String,
    /// The process exit code.
    pub code: u8,
}

impl Failure {
    /// A usage error (exit code 1).
    pub fn usage(message: impl Into<String>) -> Failure {
        Failure {
            message: message.into(),
            code: exit::USAGE,
        }
    }

    /// A failure with an explicit exit code.
    pub fn new(code: u8, message: impl Into<String>) -> Failure {
        Failure {
            message: message.into(),
            code,
        }
    }
}

/// The exit code for a wire error code.
pub fn code_exit(code: ErrorCode) -> u8 {
    match code {
        ErrorCode::Timeout | ErrorCode::TimeoutNoService => exit::TIMEOUT,
        ErrorCode::NoSuchService => exit::NO_SUCH_SERVICE,
        ErrorCode::NoSuchMethod => exit::NO_SUCH_METHOD,
        ErrorCode::Remote => exit::REMOTE,
        ErrorCode::BadPayload => exit::BAD_PAYLOAD,
        ErrorCode::ServiceGone => exit::SERVICE_GONE,
        ErrorCode::Shutdown => exit::SHUTDOWN,
        ErrorCode::InvalidName => exit::USAGE,
        ErrorCode::AccessDenied => exit::ACCESS_DENIED,
        ErrorCode::Protocol
        | ErrorCode::VersionMismatch
        | ErrorCode::LimitExceeded
        | ErrorCode::NameTaken
        | ErrorCode::Cancelled
        | ErrorCode::NotRegistered
        | ErrorCode::Unknown(_) => exit::PROTOCOL,
    }
}

/// The exit code for a client error.
pub fn error_exit(e: &Error) -> u8 {
    match e.code() {
        Some(code) => code_exit(code),
        None => match e {
            Error::Connect { .. } | Error::Disconnected(_) => exit::CONNECTION,
            Error::UntrustedBroker(_) => exit::ACCESS_DENIED,
            Error::Encode(_) => exit::USAGE,
            _ => exit::PROTOCOL,
        },
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        let mut message = e.to_string();
        // A service's error value (a typed error), shown as JSON unless it
        // is just the message's text.
        if let Some(v) = e
            .remote_value::<zrpc_client::Value>()
            .filter(|v| !v.is_str())
        {
            message.push_str(&format!(" (error value: {})", crate::fmt::json_line(&v)));
        }
        Failure {
            code: error_exit(&e),
            message,
        }
    }
}

/// A short name for the kind of a client error, used in summaries and JSON
/// output: the wire code's name (`timeout`, `remote`, ...) or `connection`,
/// `encode`, `decode`.
pub fn error_kind(e: &Error) -> &'static str {
    match e.code() {
        Some(c) => c.as_str(),
        None => match e {
            Error::Connect { .. } | Error::Disconnected(_) => "connection",
            Error::Encode(_) => "encode",
            Error::Decode(_) => "decode",
            _ => "other",
        },
    }
}
