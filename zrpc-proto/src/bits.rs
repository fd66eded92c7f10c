//! Small types the envelopes carry: a `Call`'s flags, the capabilities
//! offered in `Hello` and `Welcome`, and a caller's kernel identity.

/// Capability bits of `Hello` and `Welcome` (their optional 5th element).
pub mod caps {
    /// Payloads of [`crate::FD_PAYLOAD_FLAG`] frames: the payload travels
    /// as a sealed memfd passed with `SCM_RIGHTS` (docs/protocol.md,
    /// "Payloads in descriptors"). In `Hello`: the peer can send and
    /// receive them; in `Welcome`: the broker accepts them from this
    /// connection and may send them to it.
    pub const FD_PAYLOADS: u32 = 1;
}

/// Flags carried by a `Call` envelope.
pub mod flags {
    /// Fail the call at once with `NoSuchService` when no service holds the
    /// name, instead of waiting for one to register until the deadline;
    /// with `ServiceGone` when the instance handling it disconnects and no
    /// other instance holds the name (it may have run).
    pub const NO_WAIT: u32 = 1 << 0;
    /// Do not re-deliver the call to another instance if the instance
    /// handling it disconnects; fail it with `ServiceGone` instead.
    pub const NO_RETRY: u32 = 1 << 1;
}

/// The identity of a caller as the kernel reported it to the broker
/// (`SO_PEERCRED` when the caller connected): carried in every `Request`
/// so that a service can authorise calls itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Caller {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Process id when the caller connected (0 if unknown). A pid is a
    /// snapshot: the process may have exited and the number been reused.
    pub pid: u32,
}
