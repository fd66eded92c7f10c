//! Per-call options.

use std::time::Duration;

/// Options of one call.
///
/// The default waits forever (like the original zrpc), waits for the service
/// to register if it is not there yet, lets the broker re-deliver the call
/// if the instance handling it disconnects, and lets the client resubmit it
/// after a reconnection to the broker (see the
/// [crate documentation](crate#restarts-and-reconnection)).
///
/// ```
/// # use std::time::Duration;
/// # use zrpc_client::CallOptions;
/// let opts = CallOptions::timeout(Duration::from_secs(5)).no_wait().no_retry();
/// assert!(opts.no_wait && opts.no_retry);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CallOptions {
    /// Deadline of the call, enforced by the broker; `None` waits forever.
    /// Locally the client gives up at `timeout + 2 s` if the broker does not
    /// answer (a safety net against a wedged broker).
    pub timeout: Option<Duration>,
    /// Fail at once with [`Error::NoSuchService`](crate::Error::NoSuchService)
    /// when no service holds the name, instead of waiting for one; and with
    /// [`Error::ServiceGone`](crate::Error::ServiceGone) when the instance
    /// handling the call disconnects and no other instance holds the name
    /// (the call may have run).
    pub no_wait: bool,
    /// At most once: never send the call a second time. The broker fails it
    /// with [`Error::ServiceGone`](crate::Error::ServiceGone) when the
    /// instance handling it disconnects, instead of re-delivering it; the
    /// client fails it with
    /// [`Error::Disconnected`](crate::Error::Disconnected) when the
    /// connection to the broker is lost while the call is on the broker
    /// (and with [`Error::Shutdown`](crate::Error::Shutdown) when a broker
    /// shutting down answers it so), instead of resubmitting it after
    /// reconnecting. In every such case the call may or may not have run.
    pub no_retry: bool,
}

impl CallOptions {
    /// Default options with the given timeout.
    pub fn timeout(timeout: Duration) -> CallOptions {
        CallOptions {
            timeout: Some(timeout),
            ..CallOptions::default()
        }
    }

    /// These options with `timeout` replaced (`None` waits forever).
    pub fn with_timeout(mut self, timeout: Option<Duration>) -> CallOptions {
        self.timeout = timeout;
        self
    }

    /// These options with `no_wait` set.
    pub fn no_wait(mut self) -> CallOptions {
        self.no_wait = true;
        self
    }

    /// These options with `no_retry` set: the call is sent at most once
    /// (see [`no_retry`](CallOptions#structfield.no_retry)).
    pub fn no_retry(mut self) -> CallOptions {
        self.no_retry = true;
        self
    }

    /// The `flags` field of the `Call` envelope.
    pub(crate) fn flags(&self) -> u32 {
        let mut f = 0;
        if self.no_wait {
            f |= zrpc_proto::flags::NO_WAIT;
        }
        if self.no_retry {
            f |= zrpc_proto::flags::NO_RETRY;
        }
        f
    }

    /// The `timeout_ms` field of the `Call` envelope (rounded up, so that a
    /// sub-millisecond timeout does not become "expire at once").
    pub(crate) fn timeout_ms(&self) -> Option<u64> {
        self.timeout.map(crate::common::duration_ms)
    }
}

impl From<Option<Duration>> for CallOptions {
    fn from(timeout: Option<Duration>) -> CallOptions {
        CallOptions::default().with_timeout(timeout)
    }
}

impl From<Duration> for CallOptions {
    fn from(timeout: Duration) -> CallOptions {
        CallOptions::timeout(timeout)
    }
}
