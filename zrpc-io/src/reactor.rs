//! Registering a std UNIX socket with tokio's reactor for one interest only
//! (shared by zrpcd, zrpc-service and zrpc-client).
//!
//! tokio's own `UnixStream` registers for READABLE|WRITABLE, edge-triggered,
//! and then every time the peer reads what we wrote, `EPOLLOUT` wakes the
//! process for nothing. zrpc registers its sockets for readability only,
//! writes to them directly, and waits for writability through a duplicate
//! registered for that alone, only while a socket is full.

use std::io;
use std::os::unix::net::UnixStream;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// A non-blocking std socket registered with the reactor.
pub type Registered = AsyncFd<UnixStream>;

/// Registers `sock` itself (it must be non-blocking) for `interest` only.
/// Must be called inside a tokio runtime.
pub fn register(sock: UnixStream, interest: Interest) -> io::Result<Registered> {
    // SAFETY: the AsyncFd owns the socket, so its fd stays open and refers
    // to the same file description for the AsyncFd's whole lifetime.
    unsafe { AsyncFd::register_with_interest(sock, interest) }.map_err(|e| e.into_parts().1)
}

/// Registers a duplicate of `sock` for `interest` only (e.g. writability
/// while the socket is full, next to a readability registration of the
/// socket itself). Must be called inside a tokio runtime.
pub fn register_dup(sock: &UnixStream, interest: Interest) -> io::Result<Registered> {
    register(sock.try_clone()?, interest)
}
