//! Adaptive busy polling: when a process (the broker, a service, a client
//! that opts in with `zrpc_client::busy_poll`) runs out
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
//! is about to block. Only then, it waits for up to the window (at most
//! [`MAX_WINDOW_US`]) for any watched socket (the broker's connections and
//! listener, a service's broker connection, an opted-in client's
//! connections) to become readable, polling a
//! second, level-triggered epoll set that holds them ([`BusyPoll::watch`])
//! with a zero timeout, and yielding the CPU to any other runnable process
//! between polls. As soon as a socket is readable it returns and tokio's
//! own `epoll_wait` finds the event at once. A busy process never polls
//! (it never parks). What is not watched (timers, signals, a socket waited
//! on for writability, other descriptors and wake-ups from other threads)
//! is seen at the end of a round, at most one window late.
//!
//! When: only while it pays. Every read tells whether polling would have
//! caught it: the process had been out of work for less than the window
//! when it arrived, or not at all, and it was smaller than 64 KiB (a large
//! frame streaming in costs far more than a wake-up, and polling would
//! only compete for a CPU with the peers moving it); a second round that
//! polls in vain without a read in between counts like a long gap. The process polls only while at least three
//! in four of these recent samples (a moving average) were short. Frames
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

/// The longest polling window, microseconds: polling exists to save a
/// wake-up (microseconds); a longer window would only delay what the polled
/// set does not watch (timers, signals, writability) for longer.
pub const MAX_WINDOW_US: u64 = 1000;

/// A read at least this large does not count towards polling.
const LARGE_READ: usize = 64 * 1024;

/// Weight of the newest gap in the moving average (1/8).
const EWMA_WEIGHT: f64 = 0.125;

/// Polling runs while the moving average of short gaps exceeds this.
const ARM_ABOVE: f64 = 0.75;

/// Identities of pollers, from 1 (see [`BusyPoll::id`]).
static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// The busy poller of one runtime thread.
#[derive(Debug)]
pub struct BusyPoll {
    /// Unique in the process, never reused.
    id: u64,
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
    /// A polling round found nothing since the last read.
    vain: Cell<bool>,
    /// Rounds that polled, and those a readable socket ended.
    rounds: Cell<u64>,
    caught: Cell<u64>,
}

/// What a poller has done so far ([`BusyPoll::stats`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PollStats {
    /// Rounds that polled (the runtime ran out of work while armed).
    pub rounds: u64,
    /// Rounds that ended because a watched socket became readable: the
    /// wake-ups saved.
    pub caught: u64,
}

thread_local! {
    static CURRENT: RefCell<Option<Rc<BusyPoll>>> = const { RefCell::new(None) };
}

impl BusyPoll {
    /// A busy poller with the given window (at most [`MAX_WINDOW_US`]);
    /// `Ok(None)` when the window is zero or the machine offers a single
    /// CPU.
    pub fn new(window: Duration) -> io::Result<Option<Rc<Self>>> {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        if window.is_zero() || cpus < 2 {
            return Ok(None);
        }
        let window = window.min(Duration::from_micros(MAX_WINDOW_US));
        // SAFETY: plain syscall; the returned descriptor is checked and
        // owned below.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Some(Rc::new(BusyPoll {
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            window,
            // SAFETY: `fd` is a fresh descriptor nobody else owns.
            epoll: unsafe { OwnedFd::from_raw_fd(fd) },
            idle_since: Cell::new(None),
            short_gaps: Cell::new(0.0),
            vain: Cell::new(false),
            rounds: Cell::new(0),
            caught: Cell::new(0),
        })))
    }

    /// This poller's identity, unique in the process and never reused: a
    /// socket watched by one poller should feed [`batch`](Self::batch)
    /// only of that poller, also when it is read on another thread.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// [`BusyPoll::new`] for a process that would rather run without
    /// polling than fail: an error (no epoll set) is logged, polling is off.
    pub fn new_or_off(window: Duration) -> Option<Rc<Self>> {
        BusyPoll::new(window).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "busy polling off: cannot create its epoll set");
            None
        })
    }

    /// The window from `$ZRPC_BUSY_POLL_US` (microseconds; 0 turns polling
    /// off), else `default_us`. An unreadable value is logged and ignored.
    pub fn window_from_env(default_us: u64) -> Duration {
        let us = match std::env::var("ZRPC_BUSY_POLL_US") {
            Ok(v) => v.trim().parse().unwrap_or_else(|_| {
                tracing::warn!(value = %v, default_us, "ZRPC_BUSY_POLL_US is not a number of microseconds; using the default");
                default_us
            }),
            Err(_) => default_us,
        };
        Duration::from_micros(us)
    }

    /// The polling window.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// Rounds polled and wake-ups saved so far.
    pub fn stats(&self) -> PollStats {
        PollStats {
            rounds: self.rounds.get(),
            caught: self.caught.get(),
        }
    }

    /// The poller installed on the current thread, if any.
    pub fn current() -> Option<Rc<BusyPoll>> {
        CURRENT.with(|c| c.borrow().clone())
    }

    /// Runs `f` with the poller installed on the current thread, if any
    /// (no reference count taken).
    pub fn with_current(f: impl FnOnce(&BusyPoll)) {
        CURRENT.with(|c| {
            if let Some(bp) = &*c.borrow() {
                f(bp);
            }
        });
    }

    /// Makes `bp` (or none) the poller [`before_park`] and
    /// [`BusyPoll::current`] see on this thread until the returned guard is
    /// dropped (also by a panic), which restores the previous one.
    ///
    /// Guards dropped out of order (possible with guards a user holds) do
    /// not bring back a poller whose own guard is gone: a guard restores
    /// only if its poller is still the current one, and only a previous
    /// poller that something else still keeps alive.
    pub fn scoped(bp: Option<Rc<BusyPoll>>) -> Installed {
        let mine = bp.as_ref().map(Rc::as_ptr);
        let previous = CURRENT.with(|c| std::mem::replace(&mut *c.borrow_mut(), bp));
        Installed {
            previous: previous.as_ref().map(Rc::downgrade),
            mine,
        }
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

    /// [`watch`](Self::watch), for callers that carry on without polling
    /// the socket if it cannot be watched: the error is logged; returns
    /// whether the socket is watched.
    pub fn watch_or_log(&self, fd: RawFd) -> bool {
        match self.watch(fd) {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(error = %e, fd, "busy polling: cannot watch a socket");
                false
            }
        }
    }

    /// Records a read of `bytes` at `now`: whether polling since the
    /// runtime last ran out of work would have caught it. A read without
    /// the runtime having run out of work in between (a busy process)
    /// counts as caught; a large read (>= 64 KiB) never does: moving that
    /// much data costs far more than a wake-up, and polling would only
    /// compete for a CPU with the peers moving it.
    pub fn batch(&self, now: Instant, bytes: usize) {
        self.vain.set(false);
        let idle = self
            .idle_since
            .take()
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
        self.sample(idle < self.window && bytes < LARGE_READ);
    }

    fn sample(&self, short: bool) {
        let avg = self.short_gaps.get();
        self.short_gaps
            .set(avg + (f64::from(u8::from(short)) - avg) * EWMA_WEIGHT);
    }

    /// Whether a polling round would run now: while most recent reads
    /// came within a window of the runtime running out of work.
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
        self.rounds.set(self.rounds.get() + 1);
        let mut ev = [libc::epoll_event { events: 0, u64: 0 }];
        loop {
            // SAFETY: valid epoll descriptor and a one-element buffer.
            let n = unsafe { libc::epoll_wait(self.epoll.as_raw_fd(), ev.as_mut_ptr(), 1, 0) };
            if n > 0 {
                self.caught.set(self.caught.get() + 1);
                return;
            }
            if n < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                return;
            }
            if start.elapsed() >= self.window {
                // Polled in vain twice without a read in between: counts
                // like a long gap, so that polling stops when frames stop
                // even if the runtime keeps waking up for other reasons
                // (timers, other descriptors). One round in vain between
                // reads is already counted by the next read's gap.
                if self.vain.replace(true) {
                    self.sample(false);
                }
                return;
            }
            // Polling is only worth it on a CPU that would otherwise idle:
            // give it to any other runnable process first.
            std::thread::yield_now();
        }
    }
}

/// Keeps a poller installed on this thread (see [`BusyPoll::scoped`]).
#[must_use = "the poller is uninstalled when this guard is dropped"]
#[derive(Debug)]
pub struct Installed {
    previous: Option<std::rc::Weak<BusyPoll>>,
    /// What this guard installed (`None`: no poller).
    mine: Option<*const BusyPoll>,
}

impl Drop for Installed {
    fn drop(&mut self) {
        let previous = self.previous.take().and_then(|w| w.upgrade());
        // `try_with`: the thread may be exiting.
        let _ = CURRENT.try_with(|c| {
            let mut c = c.borrow_mut();
            if c.as_ref().map(Rc::as_ptr) == self.mine {
                *c = previous;
            }
        });
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
    fn guards_restore_only_what_is_still_theirs() {
        let (Some(p1), Some(p2)) = (
            poller(Duration::from_micros(50)),
            poller(Duration::from_micros(50)),
        ) else {
            return; // one CPU: no pollers
        };
        assert_ne!(p1.id(), p2.id());
        let current = || BusyPoll::current().map(|p| p.id());
        // Nested: each guard restores the one before.
        let a = BusyPoll::scoped(Some(p1.clone()));
        let b = BusyPoll::scoped(Some(p2.clone()));
        assert_eq!(current(), Some(p2.id()));
        drop(b);
        assert_eq!(current(), Some(p1.id()));
        drop(a);
        assert_eq!(current(), None);
        // Out of order, the first poller gone with its guard: dropping the
        // second guard does not bring it back.
        let a = BusyPoll::scoped(Some(p1.clone()));
        let b = BusyPoll::scoped(Some(p2.clone()));
        drop(a);
        assert_eq!(current(), Some(p2.id()), "a guard leaves another's poller");
        drop(p1);
        drop(b);
        assert_eq!(current(), None);
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
            bp.batch(*t, 100);
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
            bp.batch(t, 100);
        }
        assert!(bp.armed());
        // Large reads (a big frame streaming in) disarm it.
        for _ in 0..20 {
            bp.batch(t, LARGE_READ);
        }
        assert!(!bp.armed());
    }

    #[test]
    fn a_readable_socket_ends_the_round() {
        let Some(bp) = poller(Duration::from_millis(1)) else {
            return;
        };
        let (mut a, b) = UnixStream::pair().expect("socketpair");
        bp.watch(b.as_raw_fd()).expect("watch");
        a.write_all(b"x").expect("write");
        bp.short_gaps.set(1.0);
        let t = Instant::now();
        bp.poll_round();
        assert!(t.elapsed() < Duration::from_secs(10), "returned");
        assert_eq!(
            bp.short_gaps.get(),
            1.0,
            "a round that found a frame is no miss"
        );
    }

    #[test]
    fn a_round_ends_after_the_window_and_a_disarmed_one_at_once() {
        let Some(bp) = poller(Duration::from_secs(5)) else {
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
        assert_eq!(bp.window(), Duration::from_micros(MAX_WINDOW_US), "capped");
        bp.short_gaps.set(1.0);
        let t = Instant::now();
        bp.poll_round();
        let took = t.elapsed();
        assert!(
            took >= Duration::from_micros(MAX_WINDOW_US) && took < Duration::from_secs(5),
            "{took:?}"
        );
        assert_eq!(
            bp.short_gaps.get(),
            1.0,
            "one round in vain: the next read tells"
        );
        bp.poll_round();
        assert!(
            bp.short_gaps.get() < 1.0,
            "a second round in vain without a read counts as a long gap"
        );
    }
}
