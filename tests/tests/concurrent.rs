//! Concurrent handlers inside one service process (`&self` methods), the
//! limit on them, introspection and pings while they run, and the
//! cancellation of a handler whose caller is gone: a real broker, the real
//! `zrpc-test-typed` service (the `Calc` interface) and real callers.

use std::time::{Duration, Instant};

use zrpc_client::{BlockingClient, CallOptions, Client};
use zrpc_tests::typed::{CalcBlockingClient, CalcClient, HoldStats};
use zrpc_tests::{wait_registered, wait_until, Broker, Proc};

const WAIT: Duration = Duration::from_secs(20);

fn service(b: &Broker, max_concurrent: Option<usize>) -> Proc {
    let mut c = b.command("zrpc-test-typed");
    if let Some(n) = max_concurrent {
        c.env("ZRPC_TEST_MAX_CONCURRENT", n.to_string());
    }
    let p = Proc::spawn("zrpc-test-typed", c);
    wait_registered(b.dir(), "calc", 1);
    p
}

fn blocking(b: &Broker) -> CalcBlockingClient {
    CalcBlockingClient::new(BlockingClient::connect_to(b.dir()).expect("connect"))
        .with_options(CallOptions::timeout(WAIT))
}

fn stats(calc: &CalcBlockingClient) -> HoldStats {
    calc.hold_stats().expect("hold_stats")
}

/// Runs `n` calls of `hold(ms)` at once on one async client; returns how
/// long they took together.
fn holds_at_once(b: &Broker, n: usize, ms: u64) -> Duration {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let calc = CalcClient::new(Client::connect_to(b.dir()).await.expect("connect"))
            .with_options(CallOptions::timeout(WAIT));
        let start = Instant::now();
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..n {
            let calc = calc.clone();
            set.spawn(async move { calc.hold(ms).await });
        }
        while let Some(r) = set.join_next().await {
            assert_eq!(r.expect("task").expect("hold"), ms);
        }
        start.elapsed()
    })
}

#[test]
fn eight_async_handlers_run_at_once_in_one_process() {
    let b = Broker::start();
    let _svc = service(&b, None);
    let took = holds_at_once(&b, 8, 500);
    let s = stats(&blocking(&b));
    assert_eq!((s.started, s.finished, s.dropped), (8, 8, 0), "{s:?}");
    // All eight were running at the same time...
    assert_eq!(s.max_overlap, 8, "{s:?}");
    // ...so together they took about one handler's time, not eight.
    assert!(
        took < Duration::from_millis(1000),
        "8 overlapping 500 ms handlers took {took:?}"
    );
}

#[test]
fn the_concurrency_limit_holds_and_the_rest_queue() {
    let b = Broker::start();
    let _svc = service(&b, Some(3));
    holds_at_once(&b, 7, 150);
    let s = stats(&blocking(&b));
    assert_eq!((s.started, s.finished, s.dropped), (7, 7, 0), "{s:?}");
    assert_eq!(s.max_overlap, 3, "{s:?}");
}

#[test]
fn exclusive_and_sync_methods_still_work_beside_running_handlers() {
    let b = Broker::start();
    let _svc = service(&b, None);
    let calc = blocking(&b);
    let bg = {
        let dir = b.dir().to_path_buf();
        std::thread::spawn(move || {
            let c = BlockingClient::connect_to(&dir).expect("connect");
            CalcBlockingClient::new(c)
                .with_options(CallOptions::timeout(WAIT))
                .hold(800)
        })
    };
    assert!(wait_until(WAIT, || stats(&calc).running == 1));
    // A synchronous `&self` method runs beside it.
    assert_eq!(
        calc.add(zrpc_tests::typed::Pair { a: 1.0, b: 2.0 })
            .expect("add"),
        3.0
    );
    assert_eq!(stats(&calc).running, 1, "add waited for hold");
    // An unknown method is answered at once too (it needs no exclusive
    // access).
    match calc
        .client()
        .call::<_, zrpc_client::Value>("calc", "nope", &(), Some(WAIT))
    {
        Err(zrpc_client::Error::NoSuchMethod { method, .. }) => assert_eq!(method, "nope"),
        other => panic!("expected NoSuchMethod, got {other:?}"),
    }
    assert_eq!(stats(&calc).running, 1, "nope waited for hold");
    // A `&mut self` method waits for it, then runs alone.
    calc.bump().expect("bump");
    let s = stats(&calc);
    assert_eq!(
        (s.running, s.finished),
        (0, 1),
        "bump ran beside hold: {s:?}"
    );
    assert_eq!(calc.bumps().expect("bumps"), 1);
    assert_eq!(bg.join().expect("thread").expect("hold"), 800);
}

#[test]
fn introspection_and_pings_are_answered_while_a_handler_outlives_the_heartbeat() {
    // The broker pings every 100 ms and cuts a service off after 600 ms
    // of silence; the handler runs for 2 s.
    let b = Broker::start_with(&["--heartbeat-interval", "0.1", "--heartbeat-timeout", "0.6"]);
    let _svc = service(&b, None);
    let calc = blocking(&b);
    let bg = {
        let dir = b.dir().to_path_buf();
        std::thread::spawn(move || {
            let c = BlockingClient::connect_to(&dir).expect("connect");
            CalcBlockingClient::new(c)
                .with_options(CallOptions::timeout(WAIT))
                .hold(2000)
        })
    };
    assert!(wait_until(WAIT, || stats(&calc).running == 1));
    let d: zrpc_client::Value = calc
        .client()
        .call("calc", "zrpc.describe", &(), Some(Duration::from_secs(5)))
        .expect("describe while a handler runs");
    assert!(
        d["methods"].as_array().is_some_and(|m| m.len() >= 10),
        "{d}"
    );
    assert_eq!(
        stats(&calc).running,
        1,
        "the handler ended before describe was answered"
    );
    assert_eq!(bg.join().expect("thread").expect("hold"), 2000);
    // The service was never cut off: the call ran once, not re-delivered.
    let s = stats(&calc);
    assert_eq!((s.started, s.finished, s.dropped), (1, 1, 0), "{s:?}");
    assert_eq!(zrpc_tests::broker_stat(b.dir(), "redelivered"), 0);
}

#[test]
fn a_service_whose_queue_is_full_is_not_cut_off_by_the_heartbeat() {
    // One handler at a time and one request queued: the rest of the calls
    // wait in the broker, and the service reads nothing more (not the
    // broker's pings either) until the running handler ends, 1.5 s later,
    // while the broker cuts off a service after 600 ms without a sign of
    // life. A busy service must not be taken for a dead one (its calls
    // re-delivered, its running handlers' work lost with the connection).
    let b = Broker::start_with(&["--heartbeat-interval", "0.1", "--heartbeat-timeout", "0.6"]);
    let mut c = b.command("zrpc-test-typed");
    c.env("ZRPC_TEST_MAX_CONCURRENT", "1")
        .env("ZRPC_TEST_MAX_QUEUED", "1");
    let _svc = Proc::spawn("zrpc-test-typed", c);
    wait_registered(b.dir(), "calc", 1);
    let took = holds_at_once(&b, 4, 1500);
    assert_eq!(
        zrpc_tests::broker_stat(b.dir(), "heartbeat_timeouts"),
        0,
        "the busy service was cut off as dead"
    );
    assert_eq!(zrpc_tests::broker_stat(b.dir(), "redelivered"), 0);
    assert!(took >= Duration::from_millis(6000), "{took:?}");
}

#[test]
fn a_handler_whose_caller_is_gone_is_cancelled() {
    // The caller's grace to come back and resubmit: 300 ms.
    let b = Broker::start_with(&["--caller-grace", "0.3"]);
    let _svc = service(&b, None);
    let calc = blocking(&b);
    let caller = b.spawn(
        "zrpc",
        &["call", "calc", "hold", "60000", "--timeout", "120"],
    );
    assert!(wait_until(WAIT, || stats(&calc).running == 1));
    caller.signal(libc::SIGKILL);
    // The broker cancels the call at the service once the caller has not
    // come back within its grace; the handler is dropped.
    let mut last = HoldStats::default();
    let cancelled = wait_until(WAIT, || {
        last = stats(&calc);
        last.dropped == 1
    });
    assert!(cancelled, "the handler was not cancelled: {last:?}");
    assert_eq!(
        (last.started, last.finished, last.running),
        (1, 0, 0),
        "{last:?}"
    );
}

/// A raw caller with instance id `instance` sends `hold ms` as its call 7.
fn raw_hold(b: &Broker, instance: u64, ms: u16) -> zrpc_tests::raw::Raw {
    raw_hold_with(b, instance, ms, 0, 30_000)
}

/// The same with call `flags` and a deadline of `timeout_ms`.
fn raw_hold_with(
    b: &Broker,
    instance: u64,
    ms: u16,
    flags: u32,
    timeout_ms: u64,
) -> zrpc_tests::raw::Raw {
    let mut raw = zrpc_tests::raw::Raw::connect(b.dir());
    let (kind, _) = raw.hello_as(instance).expect("welcome");
    assert_eq!(kind, zrpc_proto::Kind::Welcome);
    raw.send(
        &zrpc_proto::Envelope::Call {
            id: 7,
            service: "calc",
            method: "hold",
            timeout_ms: Some(timeout_ms),
            flags,
        },
        &uint16(ms),
    );
    raw
}

/// The result of a `raw_hold` call (call 7): a success; its payload.
fn hold_result(raw: &mut zrpc_tests::raw::Raw) -> bytes::Bytes {
    let f = raw.recv_frame().expect("the result of call 7");
    match f.decode().expect("envelope") {
        zrpc_proto::Envelope::Result { id, code, message } => {
            assert_eq!((id, code), (7, None), "{message}");
        }
        other => panic!("expected the Result of call 7, got {other:?}"),
    }
    f.payload.clone()
}

/// `n` as a MessagePack uint 16.
fn uint16(n: u16) -> [u8; 3] {
    let [hi, lo] = n.to_be_bytes();
    [0xcd, hi, lo]
}

#[test]
fn a_caller_that_comes_back_within_its_grace_gets_the_first_execution() {
    // The caller's connection breaks while the broker stays up; it comes
    // back with the same instance and call id within its grace (1 s): the
    // handler (2.5 s, longer than the grace) is not cancelled when the
    // grace ends, and the resubmission is answered from it (one
    // execution). Without the adoption it would be dropped at 1 s and run
    // again for the resubmission (started 2).
    let b = Broker::start_with(&["--caller-grace", "1"]);
    let _svc = service(&b, None);
    let calc = blocking(&b);
    let first = raw_hold(&b, 42, 2500);
    assert!(wait_until(WAIT, || stats(&calc).running == 1));
    let before = zrpc_tests::broker_stat(b.dir(), "cancelled");
    drop(first);
    // The broker has seen the caller leave (its call counted as cancelled
    // by the caller) before the resubmission arrives.
    assert!(wait_until(WAIT, || {
        zrpc_tests::broker_stat(b.dir(), "cancelled") > before
    }));
    let mut again = raw_hold(&b, 42, 2500);
    assert_eq!(&hold_result(&mut again)[..], &uint16(2500));
    let s = stats(&calc);
    assert_eq!((s.started, s.finished, s.dropped), (1, 1, 0), "{s:?}");
}

#[test]
fn a_caller_that_comes_back_once_then_leaves_for_good_has_its_handler_cancelled() {
    // Back within the grace (0.3 s), the resubmission adopts the running
    // handler (it waits for its outcome at the service); gone again for
    // good, the handler must be dropped when the second grace ends. The
    // broker used to cancel only the second delivery (a copy waiting at
    // the service), and the handler ran on.
    let b = Broker::start_with(&["--caller-grace", "0.3"]);
    let _svc = service(&b, None);
    let calc = blocking(&b);
    let pending = || zrpc_tests::broker_stat(b.dir(), "pending");
    let first = raw_hold(&b, 46, 20_000);
    assert!(wait_until(WAIT, || stats(&calc).running == 1));
    drop(first);
    // The broker has seen the caller leave: the call is no longer pending.
    assert!(wait_until(WAIT, || pending() == 0));
    let again = raw_hold(&b, 46, 20_000);
    // Adopted: pending again, at the same instance.
    assert!(wait_until(WAIT, || pending() == 1));
    drop(again);
    let mut last = HoldStats::default();
    let cancelled = wait_until(WAIT, || {
        last = stats(&calc);
        last.dropped == 1
    });
    assert!(
        cancelled,
        "the handler of a caller gone for good runs on: {last:?}"
    );
    assert_eq!((last.started, last.running), (1, 0), "{last:?}");
}

#[test]
fn a_caller_that_comes_back_after_its_grace_runs_the_call_again() {
    // Past the grace (0.3 s) the first execution was cancelled: it left no
    // outcome, so the late resubmission runs the handler again.
    let b = Broker::start_with(&["--caller-grace", "0.3"]);
    let _svc = service(&b, None);
    let calc = blocking(&b);
    let first = raw_hold(&b, 43, 800);
    assert!(wait_until(WAIT, || stats(&calc).running == 1));
    drop(first);
    assert!(wait_until(WAIT, || stats(&calc).dropped == 1));
    let mut again = raw_hold(&b, 43, 800);
    assert_eq!(&hold_result(&mut again)[..], &uint16(800));
    let s = stats(&calc);
    assert_eq!((s.started, s.finished, s.dropped), (2, 1, 1), "{s:?}");
}

/// A raw caller with `instance` making call 7, `calc.hold(3000)`, with
/// `flags` and a deadline of `timeout_ms`.
fn raw_hold_3s(b: &Broker, instance: u64, flags: u32, timeout_ms: u64) -> zrpc_tests::raw::Raw {
    raw_hold_with(b, instance, 3000, flags, timeout_ms)
}

/// The code and message of the result of call 7.
fn code_of(raw: &mut zrpc_tests::raw::Raw) -> (Option<zrpc_proto::ErrorCode>, String) {
    let f = raw.recv_frame().expect("the result of call 7");
    match f.decode().expect("envelope") {
        zrpc_proto::Envelope::Result {
            id: 7,
            code,
            message,
        } => (code, message.to_owned()),
        other => panic!("expected the Result of call 7, got {other:?}"),
    }
}

/// A caller back within its grace whose call's instance gave up the name
/// meanwhile (a graceful stop: it still runs the call) and with no other
/// instance of it: the broker delivered the call, so the resubmission must
/// not be answered as if it never ran (`NoSuchService` for a `no_wait`
/// call, `TimeoutNoService` for one that waits until its deadline), the
/// same rule as for a call whose instance died.
#[test]
fn a_resubmission_whose_instance_gave_up_the_name_is_not_reported_as_never_delivered() {
    use zrpc_proto::{flags, ErrorCode};
    let b = Broker::start_with(&["--caller-grace", "10"]);
    let mut svc = service(&b, None);
    let calc = blocking(&b);
    let pending = || zrpc_tests::broker_stat(b.dir(), "pending");
    let call = |instance, flags, timeout_ms| raw_hold_3s(&b, instance, flags, timeout_ms);
    // Two callers' calls run; both callers leave.
    let firsts = [call(44, flags::NO_WAIT, 30_000), call(45, 0, 30_000)];
    assert!(wait_until(WAIT, || stats(&calc).running == 2));
    drop(firsts);
    assert!(wait_until(WAIT, || pending() == 0));
    // The instance stops: it gives up the name and finishes the calls.
    svc.signal(libc::SIGTERM);
    wait_registered(b.dir(), "calc", 0);
    // Both come back within the grace.
    let (no_wait, no_wait_message) = code_of(&mut call(44, flags::NO_WAIT, 30_000));
    let (waits, waits_message) = code_of(&mut call(45, 0, 300));
    assert!(svc.wait_exit(WAIT).is_some_and(|s| s.success()));
    // A no_wait resubmission, and one that waits until its deadline.
    assert_eq!(
        (no_wait, waits),
        (Some(ErrorCode::ServiceGone), Some(ErrorCode::Timeout)),
        "{no_wait_message:?}, {waits_message:?}"
    );
}

/// The same when the instance that had the call died while its caller was
/// away: a caller that left while its call ran (an orphan) and one that
/// left while its call waited for a new instance after the first died both
/// come back within their grace, with no instance of the name: the broker
/// delivered their calls, which may have run. So does a third, whose call
/// was left running too and comes back with its deadline already passed
/// (timeout 0: answered at once, without routing).
#[test]
fn a_resubmission_whose_instance_died_while_its_caller_was_away_is_not_reported_as_never_delivered()
{
    use zrpc_proto::{flags, ErrorCode};
    let b = Broker::start_with(&["--caller-grace", "10"]);
    let mut svc = service(&b, None);
    let calc = blocking(&b);
    let pending = || zrpc_tests::broker_stat(b.dir(), "pending");
    let orphan = raw_hold_3s(&b, 46, flags::NO_WAIT, 30_000);
    let parked = raw_hold_3s(&b, 47, 0, 30_000);
    let expiring = raw_hold_3s(&b, 48, 0, 30_000);
    assert!(wait_until(WAIT, || stats(&calc).running == 3));
    drop(calc);
    // Two callers leave while their calls run...
    drop(orphan);
    drop(expiring);
    assert!(wait_until(WAIT, || pending() == 1));
    // ...the instance dies (the other call waits for a new one)...
    svc.signal(libc::SIGKILL);
    assert!(svc.wait_exit(WAIT).is_some(), "the service did not exit");
    wait_registered(b.dir(), "calc", 0);
    // ...and the other caller leaves too.
    drop(parked);
    assert!(wait_until(WAIT, || pending() == 0));
    let (no_wait, no_wait_message) = code_of(&mut raw_hold_3s(&b, 46, flags::NO_WAIT, 30_000));
    let (waits, waits_message) = code_of(&mut raw_hold_3s(&b, 47, 0, 300));
    let (expired, expired_message) = code_of(&mut raw_hold_3s(&b, 48, 0, 0));
    assert_eq!(
        (no_wait, waits, expired),
        (
            Some(ErrorCode::ServiceGone),
            Some(ErrorCode::Timeout),
            Some(ErrorCode::Timeout)
        ),
        "{no_wait_message:?}, {waits_message:?}, {expired_message:?}"
    );
}

/// Calls outstanding at services, by the broker's `zrpcd.peers`.
fn outstanding(b: &Broker) -> u64 {
    let c = BlockingClient::connect_to(b.dir()).expect("connect");
    let peers: zrpc_client::Value = c
        .call("zrpcd", "peers", &(), Some(WAIT))
        .expect("zrpcd.peers");
    peers
        .as_array()
        .map(|ps| ps.iter().filter_map(|p| p["outstanding"].as_u64()).sum())
        .unwrap_or(0)
}

/// `hold(ms)` on a thread of its own, with a client of its own.
fn hold_in_background(b: &Broker, ms: u64) -> std::thread::JoinHandle<zrpc_client::Result<u64>> {
    let dir = b.dir().to_path_buf();
    std::thread::spawn(move || {
        let c = BlockingClient::connect_to(&dir).expect("connect");
        CalcBlockingClient::new(c)
            .with_options(CallOptions::timeout(WAIT))
            .hold(ms)
    })
}

#[test]
fn a_resent_copy_of_a_running_call_does_not_hold_up_the_requests_behind_it() {
    let b = Broker::start();
    let _svc = service(&b, None);
    let calc = blocking(&b);
    // The same call (instance 44, call 7) on two connections at once: the
    // second reaches the service while the first runs.
    let mut first = raw_hold(&b, 44, 1500);
    assert!(wait_until(WAIT, || stats(&calc).running == 1));
    let mut copy = raw_hold(&b, 44, 1500);
    // Requests behind the copy are not held up by it.
    let version = calc.version().expect("version");
    assert_eq!(version, "calc/1");
    assert_eq!(stats(&calc).running, 1, "version waited for hold");
    // Both get the one execution's result.
    for raw in [&mut first, &mut copy] {
        assert_eq!(&hold_result(raw)[..], &uint16(1500));
    }
    let s = stats(&calc);
    assert_eq!((s.started, s.finished, s.dropped), (1, 1, 0), "{s:?}");
}

#[test]
fn introspection_does_not_wait_for_blocked_requests() {
    // One handler at a time: a second hold waits in the queue.
    let b = Broker::start();
    let _svc = service(&b, Some(1));
    let calc = blocking(&b);
    // (With the limit reached every method waits, `hold_stats` too: the
    // broker's count of outstanding calls tells where the calls are.)
    let first = hold_in_background(&b, 1500);
    assert!(wait_until(WAIT, || outstanding(&b) == 1));
    let second = hold_in_background(&b, 10);
    // The second hold reaches the service (two calls outstanding there,
    // by the broker's count).
    assert!(wait_until(WAIT, || outstanding(&b) == 2));
    // Behind it, describe is answered at once.
    let d: zrpc_client::Value = calc
        .client()
        .call("calc", "zrpc.describe", &(), Some(WAIT))
        .expect("describe");
    assert!(
        d["methods"].as_array().is_some_and(|m| !m.is_empty()),
        "{d}"
    );
    assert!(!first.is_finished(), "describe waited for the first hold");
    assert_eq!(first.join().expect("thread").expect("hold"), 1500);
    assert_eq!(second.join().expect("thread").expect("hold"), 10);
}

#[test]
fn a_resubmission_within_the_grace_goes_to_the_instance_running_the_call() {
    // Two instances share the name. The caller's call runs on one of them
    // when its connection breaks; by the time it comes back the other
    // instance is the less loaded one. The resubmission still goes to the
    // instance running the call, whose reply cache answers it: the answer
    // is the first execution's (3000), not a new run of the resubmitted
    // arguments (100).
    let b = Broker::start_with(&["--caller-grace", "5"]);
    let mut procs = Vec::new();
    for _ in 0..2 {
        let mut c = b.command("zrpc-test-typed");
        c.env("ZRPC_TEST_SHARED", "1");
        procs.push(Proc::spawn("zrpc-test-typed", c));
    }
    wait_registered(b.dir(), "calc", 2);
    // Instance loads (outstanding calls): one busy with a long hold ...
    let busy = hold_in_background(&b, 6000);
    assert!(wait_until(WAIT, || outstanding(&b) == 1));
    // ... so the caller's call goes to the other one.
    let first = raw_hold(&b, 45, 3000);
    assert!(wait_until(WAIT, || outstanding(&b) == 2));
    let before = zrpc_tests::broker_stat(b.dir(), "cancelled");
    drop(first);
    assert!(wait_until(WAIT, || {
        zrpc_tests::broker_stat(b.dir(), "cancelled") > before
    }));
    // Now both instances have one call running; a second background hold
    // makes the caller's instance the more loaded one by the broker's
    // count (the left caller's call no longer counts there).
    let busy2 = hold_in_background(&b, 6000);
    assert!(wait_until(WAIT, || outstanding(&b) == 2));
    let mut again = raw_hold(&b, 45, 100);
    assert_eq!(
        &hold_result(&mut again)[..],
        &uint16(3000),
        "the resubmission ran again elsewhere instead of getting the first execution's result"
    );
    assert_eq!(busy.join().expect("thread").expect("hold"), 6000);
    assert_eq!(busy2.join().expect("thread").expect("hold"), 6000);
}
