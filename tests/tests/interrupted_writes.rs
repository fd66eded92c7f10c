//! A blocking client's writes under a continuous stream of signals, against
//! the real `zrpcd` stopped (`SIGSTOP`: it keeps the connection but reads
//! nothing). A write to such a broker is bounded by the client's stall
//! bound (`SO_SNDTIMEO`); a signal interrupts the blocked send (`EINTR`,
//! even with `SA_RESTART`, as the socket has a send timeout), and the
//! retried send must not get the whole bound again: a profiler's
//! `SIGPROF`, or a timer faster than the bound, would otherwise keep the
//! write blocked for as long as the signals come.
//!
//! Its own test binary: the signal handler installed here is the
//! process's.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use zrpc_client::{BlockingClient, CallOptions, Error};
use zrpc_tests::{Broker, WAIT};

/// Signals handled so far.
static HANDLED: AtomicUsize = AtomicUsize::new(0);

extern "C" fn count_signal(_: libc::c_int) {
    HANDLED.fetch_add(1, Ordering::Relaxed);
}

/// Installs [`count_signal`] for `sig` without `SA_RESTART`: an interrupted
/// blocking syscall fails with `EINTR`.
fn install_handler(sig: libc::c_int) {
    // SAFETY: a zeroed sigaction is valid (empty mask, no flags); the
    // handler is an `extern "C" fn(c_int)` that only touches an atomic
    // (async-signal-safe).
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = count_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        sa.sa_flags = 0;
        libc::sigemptyset(&mut sa.sa_mask);
        assert_eq!(
            libc::sigaction(sig, &sa, std::ptr::null_mut()),
            0,
            "sigaction: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// A MessagePack bin of `n` zero bytes, encoded.
fn encoded_bin(n: u32) -> bytes::Bytes {
    let mut v = vec![0xc6u8];
    v.extend_from_slice(&n.to_be_bytes());
    v.resize(5 + n as usize, 0);
    bytes::Bytes::from(v)
}

/// A call whose frame does not fit in the socket buffer of a stopped
/// broker fails with `Timeout` by the same bound whether or not its
/// thread receives a signal every 2 ms while it writes: signals do not
/// restart the write's stall bound.
#[test]
fn a_write_to_a_stopped_broker_is_bounded_under_a_stream_of_signals() {
    const SIG: libc::c_int = libc::SIGUSR1;
    // Signals sent at most (every 2 ms: 10 s and more), so that the test
    // ends even if the write never fails while they come.
    const MOST_SIGNALS: usize = 5000;
    install_handler(SIG);
    let b = Broker::start();
    let client = BlockingClient::connect_to(b.dir()).expect("connect");
    assert!(b.proc.stop(), "zrpcd did not stop");

    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    // The writer exits only once told, so that it is never signalled
    // after it ended (pthread_kill of an ended thread is undefined).
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let writer = std::thread::spawn(move || {
        // SAFETY: pthread_self has no preconditions.
        let _ = tid_tx.send(unsafe { libc::pthread_self() });
        let started = Instant::now();
        // 600 KiB: more than the socket buffer, and inline (below the
        // size of payloads sent in descriptors).
        let opts = CallOptions::timeout(Duration::from_millis(500));
        let r = client.call_raw("svc", "x", encoded_bin(600 * 1024), opts);
        let _ = done_tx.send((r.map(|_| ()), started.elapsed()));
        let _ = release_rx.recv_timeout(WAIT);
    });
    let tid = tid_rx.recv_timeout(WAIT).expect("the writer did not start");
    let mut sent = 0;
    let got = loop {
        if let Ok(got) = done_rx.try_recv() {
            break Some(got);
        }
        if sent == MOST_SIGNALS {
            break None;
        }
        // SAFETY: `tid` is the writer's, which has not ended (it waits
        // for `release` once its call is done).
        let rc = unsafe { libc::pthread_kill(tid, SIG) };
        assert_eq!(
            rc,
            0,
            "pthread_kill: {}",
            std::io::Error::from_raw_os_error(rc)
        );
        sent += 1;
        std::thread::sleep(Duration::from_millis(2));
    };
    let got = got.or_else(|| done_rx.recv_timeout(WAIT).ok());
    drop(release_tx);
    let _ = writer.join();
    b.proc.signal(libc::SIGCONT);

    let handled = HANDLED.load(Ordering::Relaxed);
    let (r, took) = got.expect("the call did not end, even after the signals stopped");
    // The write waits for the stall bound (1 s) at most twice (the send
    // that fills the buffer, then the next one): 2 s; the call has then
    // timed out.
    assert!(
        took < Duration::from_secs(4),
        "the call ended after {took:?} ({r:?}), with {sent} signals sent and {handled} handled: the signals kept its write blocked"
    );
    assert!(matches!(r, Err(Error::Timeout { .. })), "{r:?}");
    assert!(
        handled >= 100,
        "only {handled} signals handled: the write was hardly interrupted"
    );
}
