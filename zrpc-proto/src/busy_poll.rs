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
//! When: only while it pays. Every read batch tells whether polling would
//! have caught it: the process had been out of work (idle) for less than
//! the window when it arrived, or not at all. The process polls only while at least three in four recent gaps
//! (a moving average over the last few batches) were that short. Frames
//! arriving back to back (under load, or a caller making calls one after
//! the other) arm it; a call every 100 us or more does not, nor does a call
//! whose reply comes quickly followed by a pause (one gap in two). So an
//! idle process never polls, and one that polls waits in vain in at most
//! about one round in four. On a single CPU it is off (polling would only
//! delay the peers it waits for).
//!
//! What it costs: CPU while frames arrive back to back: the process polls
//! instead of sleeping between them (up to one CPU); the `busy_poll_cost`
//! rows of `zrpc-bench` measure it.

use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

/// The default polling window, microseconds.
pub const DEFAULT_WINDOW_US: u64 = 50;

/// Weight of the newest gap in the moving average (1/8).
const EWMA_WEIGHT: f64 = 0.125;

/// Polling runs while the moving average of short gaps exceeds this.
const ARM_ABOVE: f64 = 0.75;

/// The busy poller of one runtime thread.
#[derive(Debug)]
pub struct BusyPoll {
    window: Duration,
    /// A level-triggered epoll set holding every connection and the
    /// listener, polled with a zero timeout while polling.
    epoll: OwnedFd,
    /// When the runtime last ran out of work (set on every park, cleared by
    /// the next read batch): the start of the idle gap before that batch.
    idle_since: Cell<Option<Instant>>,
    /// Moving average of "the gap before a batch was shorter than the
    /// window" (1) or not (0).
    short_gaps: Cell<f64>,
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
            idle_since: Cell::new(None),
            short_gaps: Cell::new(0.0),
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

    /// Records a read batch read at `now`: whether polling since the
    /// runtime last ran out of work would have caught it. A batch read
    /// without the runtime having run out of work in between (a busy
    /// process) counts as caught.
    pub fn batch(&self, now: Instant) {
        let idle = self
            .idle_since
            .take()
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
        let short = f64::from(u8::from(idle < self.window));
        let avg = self.short_gaps.get();
        self.short_gaps.set(avg + (short - avg) * EWMA_WEIGHT);
    }

    /// Whether a polling round would run now: while most recent frames
    /// came within a window of the previous ones.
    fn armed(&self) -> bool {
        self.short_gaps.get() > ARM_ABOVE
    }

    /// One polling round, if armed: returns once a watched socket is
    /// readable or the window has passed.
    fn poll_round(&self) {
        let start = Instant::now();
        if self.idle_since.get().is_none() {
            self.idle_since.set(Some(start));
        }
        if !self.armed() {
            return;
        }
        let mut ev = [libc::epoll_event { events: 0, u64: 0 }];
        loop {
            // SAFETY: valid epoll descriptor and a one-element buffer.
            let n = unsafe { libc::epoll_wait(self.epoll.as_raw_fd(), ev.as_mut_ptr(), 1, 0) };
            if n > 0 {
                return;
            }
            if n < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                return;
            }
            if start.elapsed() >= self.window {
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

    /// Feeds batches that each arrive `gaps` (microseconds) after the
    /// runtime ran out of work, starting at `t`.
    fn feed(bp: &BusyPoll, t: &mut Instant, gaps: &[u64]) {
        for g in gaps {
            bp.idle_since.set(Some(*t));
            *t += Duration::from_micros(*g);
            bp.batch(*t);
        }
    }

    #[test]
    fn back_to_back_frames_arm_it_and_pauses_disarm_it() {
        let Some(bp) = poller(Duration::from_micros(50)) else {
            return;
        };
        let mut t = Instant::now();
        assert!(!bp.armed(), "nothing known yet");
        // Frames 10-30 us apart: polling would have caught each of them
        // (from nothing, eleven such gaps arm it).
        feed(&bp, &mut t, &[10, 20, 30, 10, 20, 30, 10, 20, 30, 10]);
        assert!(!bp.armed());
        feed(&bp, &mut t, &[20]);
        assert!(bp.armed());
        // A call, its reply 30 us later, then a pause: one gap in two.
        for _ in 0..20 {
            feed(&bp, &mut t, &[170, 30]);
        }
        assert!(!bp.armed(), "a call every 200 us does not pay");
        // Mostly back to back with an occasional pause: still worth it.
        for _ in 0..10 {
            feed(&bp, &mut t, &[5, 5, 5, 5, 5, 5, 5, 500]);
        }
        assert!(bp.armed());
        // Back to back again.
        feed(&bp, &mut t, &[15; 20]);
        assert!(bp.armed());
        // Idle: a few long pauses disarm it.
        feed(&bp, &mut t, &[1_000_000; 3]);
        assert!(!bp.armed());
        // Batches read without the runtime running out of work in between
        // (a busy process) count as caught.
        for _ in 0..20 {
            bp.batch(t);
        }
        assert!(bp.armed());
    }

    #[test]
    fn a_readable_socket_ends_the_round() {
        let Some(bp) = poller(Duration::from_secs(30)) else {
            return;
        };
        let (mut a, b) = UnixStream::pair().expect("socketpair");
        bp.watch(b.as_raw_fd()).expect("watch");
        a.write_all(b"x").expect("write");
        bp.short_gaps.set(1.0);
        let t = Instant::now();
        bp.poll_round();
        assert!(t.elapsed() < Duration::from_secs(10), "returned at once");
    }

    #[test]
    fn a_round_ends_after_the_window_and_a_disarmed_one_at_once() {
        let Some(bp) = poller(Duration::from_millis(200)) else {
            return;
        };
        let (_a, b) = UnixStream::pair().expect("socketpair");
        bp.watch(b.as_raw_fd()).expect("watch");
        let t = Instant::now();
        bp.poll_round();
        assert!(
            t.elapsed() < Duration::from_millis(100),
            "disarmed: no polling"
        );
        bp.short_gaps.set(1.0);
        let t = Instant::now();
        bp.poll_round();
        let took = t.elapsed();
        assert!(
            took >= Duration::from_millis(200) && took < Duration::from_secs(10),
            "{took:?}"
        );
    }
}
