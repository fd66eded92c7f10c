//! Adaptive busy polling: when a process (the broker, a service) runs out
//! of work while frames are arriving in quick succession, it polls its
//! sockets for a short window before letting the runtime sleep in
//! `epoll_wait`.
//!
//! Why: on the machines zrpc is measured on, waking a sleeping process is
//! the single largest cost of a call under load (the writer's
//! `sock_def_readable` -> `try_to_wake_up`, an inter-processor interrupt
//! that goes through the hypervisor on a VM, then the context switch). A
//! process that is still polling when the next frame arrives needs no
//! wake-up. Measured figures are in docs/performance.md.
//!
//! How: tokio calls [`before_park`] (installed with
//! `Builder::on_thread_park`) when the runtime has no task left to run and
//! is about to block. Only then, it waits for up to the window for any
//! connection (or the listener) to become readable, polling a second,
//! level-triggered epoll set that holds the same sockets
//! ([`BusyPoll::watch`]) with a zero timeout, and yielding the CPU to any
//! other runnable process between polls. As soon as a socket is readable
//! it returns and tokio's own `epoll_wait` finds the event at once. A busy
//! process never polls (it never parks), and timers are late by at most one
//! window.
//!
//! What it costs: CPU, and only while calls are flowing. A polling round
//! that ends without a readable socket is a miss; after two misses in a
//! row it stops polling until two read batches arrive less than a window
//! apart. So an idle process never polls, one receiving a call every
//! millisecond polls at most two windows per quiet spell, and one receiving
//! frames less than a window apart polls instead of sleeping between them.
//! On a single CPU it is off (polling would only delay the peers it waits
//! for).

use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

/// The default polling window, microseconds.
pub const DEFAULT_WINDOW_US: u64 = 50;

/// After this many polling rounds in a row that found nothing, polling
/// waits for a gap shorter than the window before it starts again.
const MAX_MISSES: u32 = 2;

/// The busy poller of one runtime thread.
#[derive(Debug)]
pub struct BusyPoll {
    window: Duration,
    /// A level-triggered epoll set holding every connection and the
    /// listener, polled with a zero timeout while polling.
    epoll: OwnedFd,
    /// When the last read batch was handled.
    last: Cell<Option<Instant>>,
    /// Consecutive polling rounds that found nothing readable.
    misses: Cell<u32>,
}

thread_local! {
    static CURRENT: RefCell<Option<Rc<BusyPoll>>> = const { RefCell::new(None) };
}

impl BusyPoll {
    /// A busy poller with the given window; `Ok(None)` when the window is
    /// zero or the machine offers a single CPU.
    pub fn new(window: Duration) -> io::Result<Option<Rc<Self>>> {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        if window.is_zero() || cpus < 2 {
            return Ok(None);
        }
        // SAFETY: plain syscall; the returned descriptor is checked and
        // owned below.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Some(Rc::new(BusyPoll {
            window,
            // SAFETY: `fd` is a fresh descriptor nobody else owns.
            epoll: unsafe { OwnedFd::from_raw_fd(fd) },
            last: Cell::new(None),
            misses: Cell::new(0),
        })))
    }

    /// The polling window.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// The poller installed on the current thread, if any.
    pub fn current() -> Option<Rc<BusyPoll>> {
        CURRENT.with(|c| c.borrow().clone())
    }

    /// Installs `bp` (or nothing) as the current thread's poller.
    pub fn set_current(bp: Option<Rc<BusyPoll>>) {
        CURRENT.with(|c| *c.borrow_mut() = bp);
    }

    /// Makes this the poller [`before_park`] uses on the current thread.
    pub fn install(self: &Rc<Self>) {
        CURRENT.with(|c| *c.borrow_mut() = Some(self.clone()));
    }

    /// Adds a socket to the polled set. A closed descriptor leaves the set
    /// by itself (as long as it was not duplicated).
    pub fn watch(&self, fd: RawFd) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: fd as u64,
        };
        // SAFETY: both descriptors are open; `ev` is a valid event.
        let r =
            unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Removes a socket from the polled set (needed only when the
    /// descriptor stays open, or was duplicated).
    pub fn unwatch(&self, fd: RawFd) {
        let mut ev = libc::epoll_event { events: 0, u64: 0 };
        // SAFETY: valid epoll descriptor; an unknown `fd` is an error we
        // ignore.
        unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_DEL, fd, &mut ev) };
    }

    /// Records a read batch handled at `now`: a gap shorter than the window
    /// since the previous one re-enables polling after misses.
    pub fn batch(&self, now: Instant) {
        if self
            .last
            .replace(Some(now))
            .is_some_and(|last| now.saturating_duration_since(last) < self.window)
        {
            self.misses.set(0);
        }
    }

    /// Whether a polling round would run now.
    fn armed(&self) -> bool {
        self.misses.get() < MAX_MISSES
    }

    /// One polling round: returns once a watched socket is readable or the
    /// window has passed; counts the round as a hit or a miss.
    fn poll_round(&self) {
        if !self.armed() {
            return;
        }
        let start = Instant::now();
        let mut ev = [libc::epoll_event { events: 0, u64: 0 }];
        loop {
            // SAFETY: valid epoll descriptor and a one-element buffer.
            let n = unsafe { libc::epoll_wait(self.epoll.as_raw_fd(), ev.as_mut_ptr(), 1, 0) };
            if n > 0 {
                self.misses.set(0);
                return;
            }
            if n < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                return;
            }
            if start.elapsed() >= self.window {
                self.misses.set(self.misses.get() + 1);
                return;
            }
            // Polling is only worth it on a CPU that would otherwise idle:
            // give it to any other runnable process first.
            std::thread::yield_now();
        }
    }
}

/// The runtime's park hook: one polling round with the poller installed on
/// this thread, if any.
pub fn before_park() {
    let bp = CURRENT.with(|c| c.borrow().clone());
    if let Some(bp) = bp {
        bp.poll_round();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    fn poller(window: Duration) -> Option<Rc<BusyPoll>> {
        // None on a single-CPU machine: nothing to test there.
        BusyPoll::new(window).expect("epoll_create1")
    }

    #[test]
    fn zero_window_is_off() {
        assert!(BusyPoll::new(Duration::ZERO)
            .expect("no epoll needed")
            .is_none());
    }

    #[test]
    fn a_readable_socket_ends_the_round_as_a_hit() {
        let Some(bp) = poller(Duration::from_secs(30)) else {
            return;
        };
        let (mut a, b) = UnixStream::pair().expect("socketpair");
        bp.watch(b.as_raw_fd()).expect("watch");
        a.write_all(b"x").expect("write");
        bp.misses.set(1);
        let t = Instant::now();
        bp.poll_round();
        assert!(t.elapsed() < Duration::from_secs(10), "returned at once");
        assert_eq!(bp.misses.get(), 0);
    }

    #[test]
    fn misses_disarm_until_a_short_gap() {
        let Some(bp) = poller(Duration::from_millis(2)) else {
            return;
        };
        let (_a, b) = UnixStream::pair().expect("socketpair");
        bp.watch(b.as_raw_fd()).expect("watch");
        bp.poll_round();
        bp.poll_round();
        assert_eq!(bp.misses.get(), MAX_MISSES);
        assert!(!bp.armed());
        // A disarmed round returns at once and stays a miss.
        let t = Instant::now();
        bp.poll_round();
        assert!(t.elapsed() < Duration::from_secs(1));
        assert!(!bp.armed());
        // Batches far apart do not re-arm; two close together do.
        let t0 = Instant::now();
        bp.batch(t0);
        bp.batch(t0 + Duration::from_millis(100));
        assert!(!bp.armed());
        bp.batch(t0 + Duration::from_millis(101));
        assert!(bp.armed());
    }
}
