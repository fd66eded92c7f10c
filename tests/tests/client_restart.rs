//! Broker restarts are invisible to callers: while the real `zrpcd` is
//! killed (SIGKILL) or stopped (SIGTERM) and started again on the same
//! socket directory, calls in flight from an async `Client` and from a
//! `BlockingClient` shared by threads, and new calls made during the
//! restart, all succeed, with only extra latency. Calls marked `no_retry`
//! fail promptly instead (`Disconnected` when the broker is killed,
//! `Shutdown` when it answers them during its shutdown). Every call is
//! counted, and every wait is bounded.
//!
//! The service process (`zrpc-test-svc`) reconnects and registers its name
//! again by itself; it runs its handlers one at a time, so the latencies
//! printed include queueing behind the `sleep` calls.

use std::os::unix::net::UnixStream;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use zrpc_client::{BlockingClient, CallOptions, Client, Error, Value};
use zrpc_tests::{bin, broker_stat, wait_registered, wait_until, Broker, Proc, WAIT};

/// Deadline of the calls expected to succeed: far more than a restart
/// takes.
const T: Duration = Duration::from_secs(30);

/// Duration of the `sleep` calls in flight when the broker goes down. The
/// test service runs its handlers one at a time (`&mut self`), so these
/// calls (and the `echo` calls queued behind them) are answered one after
/// the other: the last one about 2 s after the first.
const SLEEP_MS: u64 = 300;

/// `sleep` calls in flight from each client.
const ASYNC_IN_FLIGHT: u64 = 4;
const BLOCKING_IN_FLIGHT: u64 = 3;

/// Duration of the `no_retry` calls: longer than any restart (SIGTERM:
/// the default 2 s shutdown grace), so that a prompt error proves they were
/// neither resubmitted nor left hanging.
const NO_RETRY_SLEEP_MS: u64 = 3_000;

/// Interval between new calls made by each issuer during the restart.
const ISSUE_EVERY: Duration = Duration::from_millis(25);

/// One finished call.
#[derive(Debug)]
struct Rec {
    who: &'static str,
    start: Instant,
    took: Duration,
    result: Result<(), String>,
}

type Log = Arc<Mutex<Vec<Rec>>>;

fn record(log: &Log, who: &'static str, start: Instant, result: Result<(), String>) {
    log.lock().unwrap().push(Rec {
        who,
        start,
        took: start.elapsed(),
        result,
    });
}

/// `Ok` if `r` is the echo of `i`.
fn check_echo(i: u64, r: Result<Value, Error>) -> Result<(), String> {
    match r {
        Ok(v) if v == Value::from(i) => Ok(()),
        Ok(v) => Err(format!("echo of {i} came back as {v}")),
        Err(e) => Err(format!("{e:?}")),
    }
}

/// Joins a thread, polling so that the wait is bounded.
fn join_bounded<T>(h: JoinHandle<T>, what: &str) -> T {
    assert!(
        wait_until(2 * WAIT, || h.is_finished()),
        "{what} did not finish"
    );
    h.join().expect(what)
}

fn sig_name(sig: i32) -> &'static str {
    if sig == libc::SIGKILL {
        "SIGKILL"
    } else {
        "SIGTERM"
    }
}

fn restart_is_invisible(sig: i32, outage: bool) {
    let mut b = Broker::start();
    let mut svc = b.spawn("zrpc-test-svc", &[]);
    wait_registered(b.dir(), "echo", 1);
    let rt = zrpc_tests::runtime();
    let ac = rt
        .block_on(Client::connect_to(b.dir()))
        .expect("connect async");
    let bc = BlockingClient::connect_to(b.dir()).expect("connect blocking");
    let log: Log = Arc::default();

    // Calls in flight when the broker goes down.
    let mut in_flight_tasks = Vec::new();
    for _ in 0..ASYNC_IN_FLIGHT {
        let (c, log) = (ac.clone(), log.clone());
        in_flight_tasks.push(rt.spawn(async move {
            let start = Instant::now();
            let r = c.call::<_, u32>("echo", "sleep", &SLEEP_MS, Some(T)).await;
            record(
                &log,
                "async in flight",
                start,
                r.map(drop).map_err(|e| format!("{e:?}")),
            );
        }));
    }
    let mut in_flight_threads = Vec::new();
    for _ in 0..BLOCKING_IN_FLIGHT {
        let (c, log) = (bc.clone(), log.clone());
        in_flight_threads.push(std::thread::spawn(move || {
            let start = Instant::now();
            let r = c.call::<_, u32>("echo", "sleep", &SLEEP_MS, Some(T));
            record(
                &log,
                "blocking in flight",
                start,
                r.map(drop).map_err(|e| format!("{e:?}")),
            );
        }));
    }
    // `no_retry` calls: they must fail at once, not be resubmitted.
    let no_retry = CallOptions::timeout(T).no_retry();
    let c = ac.clone();
    let async_no_retry = rt.spawn(async move {
        let start = Instant::now();
        let r = c
            .call_with::<_, u32>("echo", "sleep", &NO_RETRY_SLEEP_MS, no_retry)
            .await;
        (r, start.elapsed())
    });
    let c = bc.clone();
    let blocking_no_retry = std::thread::spawn(move || {
        let start = Instant::now();
        let r = c.call_with::<_, u32>("echo", "sleep", &NO_RETRY_SLEEP_MS, no_retry);
        (r, start.elapsed())
    });
    let all = ASYNC_IN_FLIGHT + BLOCKING_IN_FLIGHT + 2;
    assert!(
        wait_until(WAIT, || broker_stat(b.dir(), "pending") >= all),
        "the calls did not all reach the service"
    );

    // New calls, one every few milliseconds from each client, before,
    // during and after the restart.
    let stop = Arc::new(AtomicBool::new(false));
    let issued_async = Arc::new(AtomicU64::new(0));
    let issued_blocking = Arc::new(AtomicU64::new(0));
    let async_issuer = {
        let (c, log, stop, issued) = (ac.clone(), log.clone(), stop.clone(), issued_async.clone());
        rt.spawn(async move {
            let mut tasks = Vec::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                issued.fetch_add(1, Ordering::Relaxed);
                let (c, log) = (c.clone(), log.clone());
                tasks.push(tokio::spawn(async move {
                    let start = Instant::now();
                    let r = c.call::<_, Value>("echo", "echo", &i, Some(T)).await;
                    record(&log, "async new", start, check_echo(i, r));
                }));
                i += 1;
                tokio::time::sleep(ISSUE_EVERY).await;
            }
            for t in tasks {
                t.await.expect("call task");
            }
        })
    };
    let blocking_issuer = {
        let (c, log, stop, issued) = (
            bc.clone(),
            log.clone(),
            stop.clone(),
            issued_blocking.clone(),
        );
        std::thread::spawn(move || {
            let mut threads = Vec::new();
            let mut i = 1_000_000u64;
            while !stop.load(Ordering::Relaxed) {
                issued.fetch_add(1, Ordering::Relaxed);
                let (c, log) = (c.clone(), log.clone());
                threads.push(std::thread::spawn(move || {
                    let start = Instant::now();
                    let r = c.call::<_, Value>("echo", "echo", &i, Some(T));
                    record(&log, "blocking new", start, check_echo(i, r));
                }));
                i += 1;
                std::thread::sleep(ISSUE_EVERY);
            }
            for t in threads {
                join_bounded(t, "blocking call thread");
            }
        })
    };

    // Both issuers have calls pending when the broker goes down.
    assert!(wait_until(WAIT, || {
        issued_async.load(Ordering::Relaxed) >= 2 && issued_blocking.load(Ordering::Relaxed) >= 2
    }));
    let down = Instant::now();
    if outage {
        // Stop the broker, let both clients make new calls while none runs,
        // then start it again.
        b.proc.signal(sig);
        assert!(b.proc.wait_exit(WAIT).is_some(), "broker did not exit");
        let (a0, b0) = (
            issued_async.load(Ordering::Relaxed),
            issued_blocking.load(Ordering::Relaxed),
        );
        assert!(wait_until(WAIT, || {
            issued_async.load(Ordering::Relaxed) >= a0 + 3
                && issued_blocking.load(Ordering::Relaxed) >= b0 + 3
        }));
        b.proc = start_broker(&b);
    } else {
        b.restart(sig);
    }
    let up = Instant::now();
    // The service reconnects and registers again by itself.
    wait_registered(b.dir(), "echo", 1);
    assert!(
        matches!(svc.child.try_wait(), Ok(None)),
        "the service process survived"
    );
    let pid: u32 = bc.call("echo", "pid", &(), Some(T)).expect("pid");
    assert_eq!(pid, svc.pid() as u32, "the same service process answers");

    // Let new calls flow on the new broker for a moment, then stop.
    let ok_after = |who: &str| {
        log.lock()
            .unwrap()
            .iter()
            .filter(|r| r.who == who && r.start > up && r.result.is_ok())
            .count()
    };
    assert!(
        wait_until(WAIT, || ok_after("async new") >= 5
            && ok_after("blocking new") >= 5),
        "new calls after the restart"
    );
    stop.store(true, Ordering::Relaxed);
    rt.block_on(async { tokio::time::timeout(2 * WAIT, async_issuer).await })
        .expect("async issuer finished")
        .expect("async issuer");
    join_bounded(blocking_issuer, "blocking issuer");
    for t in in_flight_tasks {
        rt.block_on(async { tokio::time::timeout(2 * WAIT, t).await })
            .expect("in-flight task finished")
            .expect("in-flight task");
    }
    for t in in_flight_threads {
        join_bounded(t, "in-flight thread");
    }

    // The no_retry calls failed promptly, without being resubmitted.
    let (r_async, took_async) = rt
        .block_on(async { tokio::time::timeout(2 * WAIT, async_no_retry).await })
        .expect("async no_retry call finished")
        .expect("task");
    let (r_blocking, took_blocking) = join_bounded(blocking_no_retry, "blocking no_retry call");
    for (who, r, took) in [
        ("async", r_async, took_async),
        ("blocking", r_blocking, took_blocking),
    ] {
        match (sig, &r) {
            (libc::SIGKILL, Err(Error::Disconnected(_))) => {}
            (libc::SIGTERM, Err(Error::Shutdown)) => {}
            _ => panic!("{who} no_retry call under {}: {r:?}", sig_name(sig)),
        }
        assert!(
            took < Duration::from_millis(NO_RETRY_SLEEP_MS),
            "{who} no_retry call took {took:?}"
        );
    }

    // Every call is accounted for, and every one succeeded.
    let issued_async = issued_async.load(Ordering::Relaxed);
    let issued_blocking = issued_blocking.load(Ordering::Relaxed);
    let log = log.lock().unwrap();
    let count = |who: &str| log.iter().filter(|r| r.who == who).count() as u64;
    assert_eq!(count("async in flight"), ASYNC_IN_FLIGHT);
    assert_eq!(count("blocking in flight"), BLOCKING_IN_FLIGHT);
    assert_eq!(
        count("async new"),
        issued_async,
        "every new async call finished"
    );
    assert_eq!(
        count("blocking new"),
        issued_blocking,
        "every new blocking call finished"
    );
    let failed: Vec<_> = log.iter().filter(|r| r.result.is_err()).collect();
    assert!(failed.is_empty(), "failed calls: {failed:#?}");
    // New calls pending across the restart, and new calls made while it
    // went on (the broker down, or shutting down: SIGTERM gives it a grace
    // period of 2 s).
    let across = |who: &str| {
        log.iter()
            .filter(|r| r.who == who && r.start <= up && r.start + r.took >= down)
            .count()
    };
    let during = |who: &str| {
        log.iter()
            .filter(|r| r.who == who && r.start >= down && r.start <= up)
            .count()
    };
    for who in ["async new", "blocking new"] {
        assert!(across(who) > 0, "{who}: no call pending across the restart");
        if sig == libc::SIGTERM || outage {
            assert!(during(who) > 0, "{who}: no call made during the shutdown");
        }
    }
    let slowest = log.iter().map(|r| r.took).max().unwrap_or_default();
    assert!(slowest < T, "{slowest:?}");
    println!(
        "{}{}: restart took {:?}; {} calls in flight, {} new calls ({} pending across the restart, {} made during it), all ok; slowest {:?}",
        sig_name(sig),
        if outage { " with an outage" } else { "" },
        up - down,
        ASYNC_IN_FLIGHT + BLOCKING_IN_FLIGHT,
        issued_async + issued_blocking,
        across("async new") + across("blocking new"),
        during("async new") + during("blocking new"),
        slowest,
    );
}

/// Starts `zrpcd` again on `b`'s directory, as the harness does, and waits
/// until it listens.
fn start_broker(b: &Broker) -> Proc {
    let mut c = Command::new(bin("zrpcd"));
    c.arg("--socket-dir").arg(b.dir()).args(&b.args);
    c.env(
        "RUST_LOG",
        std::env::var("ZRPC_TEST_LOG").unwrap_or_else(|_| "warn".into()),
    );
    let p = Proc::spawn("zrpcd", c);
    assert!(
        wait_until(WAIT, || UnixStream::connect(b.socket()).is_ok()),
        "zrpcd did not start listening"
    );
    p
}

#[test]
fn broker_sigkill_restart_is_invisible_to_callers() {
    restart_is_invisible(libc::SIGKILL, false);
}

#[test]
fn broker_sigterm_restart_is_invisible_to_callers() {
    restart_is_invisible(libc::SIGTERM, false);
}

/// The same with the broker down for a while: calls made while no broker
/// runs are queued by both clients and sent once it is back.
#[test]
fn calls_made_while_no_broker_runs_succeed() {
    restart_is_invisible(libc::SIGKILL, true);
}
