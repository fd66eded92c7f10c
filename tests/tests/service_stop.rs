//! Stopping a service gracefully (`zrpc_service::Server::stop_on_signals`,
//! `drain_timeout`, `ShutdownHandle`): a real broker, the real
//! `zrpc-test-typed` service stopped with real signals, and real callers.
//! A stop releases the names, answers what was delivered, and exits 0;
//! calls made meanwhile wait for the next instance.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use zrpc_client::{BlockingClient, CallOptions, Client, Error};
use zrpc_service::{Context, Server, ServiceBuilder};
use zrpc_tests::typed::{CalcBlockingClient, CalcClient, HoldStats};
use zrpc_tests::{runtime, wait_registered, wait_until, Broker, Proc, WAIT};

fn service(b: &Broker, env: &[(&str, &str)]) -> Proc {
    let mut c = b.command("zrpc-test-typed");
    for (k, v) in env {
        c.env(k, v);
    }
    let p = Proc::spawn("zrpc-test-typed", c);
    wait_registered(b.dir(), "calc", 1);
    p
}

fn stats(b: &Broker) -> HoldStats {
    CalcBlockingClient::new(BlockingClient::connect_to(b.dir()).expect("connect"))
        .with_options(CallOptions::timeout(WAIT))
        .hold_stats()
        .expect("hold_stats")
}

/// `n` calls of `hold(ms)` with `no_retry` (a call cut off by its service's
/// end fails with `ServiceGone` instead of running again elsewhere), on a
/// thread of their own; their results come through the receiver.
fn holds(b: &Broker, n: usize, ms: u64) -> mpsc::Receiver<Vec<zrpc_client::Result<u64>>> {
    let dir = b.dir().to_path_buf();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let rt = runtime();
        let results = rt.block_on(async {
            let calc = CalcClient::new(Client::connect_to(&dir).await.expect("connect"));
            let mut set = tokio::task::JoinSet::new();
            for _ in 0..n {
                let calc = calc.clone();
                set.spawn(async move {
                    calc.hold_with(ms, CallOptions::timeout(WAIT).no_retry())
                        .await
                });
            }
            let mut all = Vec::new();
            while let Some(r) = set.join_next().await {
                all.push(r.expect("task"));
            }
            all
        });
        let _ = tx.send(results);
    });
    rx
}

/// A broker, the `calc` service (with `env`) and `n` of its `hold(ms)`
/// calls running (see [`holds`]).
fn holding(
    env: &[(&str, &str)],
    n: usize,
    ms: u64,
) -> (Broker, Proc, mpsc::Receiver<Vec<zrpc_client::Result<u64>>>) {
    let b = Broker::start();
    let svc = service(&b, env);
    let running = holds(&b, n, ms);
    assert!(wait_until(WAIT, || stats(&b).running == n as u64));
    (b, svc, running)
}

/// A `no_retry` call of `zrpc-test-svc`'s exclusive `sleep(ms)` on a
/// thread of its own, once the broker has it pending (delivered: one more
/// pending call than before); its
/// result (the service's pid) comes through the receiver.
fn sleeping(b: &Broker, ms: u64, opts: CallOptions) -> mpsc::Receiver<zrpc_client::Result<u32>> {
    let before = zrpc_tests::broker_stat(b.dir(), "pending");
    let dir = b.dir().to_path_buf();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let r = runtime().block_on(async {
            let c = Client::connect_to(&dir).await.expect("connect");
            c.call_with::<_, u32>("echo", "sleep", &ms, opts).await
        });
        let _ = tx.send(r);
    });
    assert!(wait_until(WAIT, || zrpc_tests::broker_stat(
        b.dir(),
        "pending"
    ) == before + 1));
    rx
}

/// `svc` must exit with status 0 within 10 s of `start` (a stop that
/// waited for a 60 s handler would miss that).
fn exits_0_within_10_s(svc: &mut Proc, start: Instant) {
    let status = svc.wait_exit(WAIT).expect("the service exits");
    assert!(status.success(), "{status:?}");
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "the stop took {:?}",
        start.elapsed()
    );
}

/// Sends `sig` to `svc`, which must exit 0 within 10 s (not wait for its
/// call), and its one running `no_retry` call must fail with `ServiceGone`.
fn exits_at_once_cutting_off_its_call(
    svc: &mut Proc,
    sig: i32,
    running: &mpsc::Receiver<Vec<zrpc_client::Result<u64>>>,
) {
    let start = Instant::now();
    svc.signal(sig);
    exits_0_within_10_s(svc, start);
    let results = running.recv_timeout(WAIT).expect("the hold ends");
    assert!(
        matches!(results[..], [Err(Error::ServiceGone { .. })]),
        "{results:?}"
    );
}

#[test]
fn sigterm_answers_the_running_calls_and_the_next_instance_takes_new_ones() {
    let (b, mut first, running) = holding(&[], 4, 1500);
    first.signal(libc::SIGTERM);
    // The name is released while the four still run...
    wait_registered(b.dir(), "calc", 0);
    // ...so a call made now waits for the next instance.
    let later = {
        let dir = b.dir().to_path_buf();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let c = BlockingClient::connect_to(&dir).expect("connect");
            let calc = CalcBlockingClient::new(c).with_options(CallOptions::timeout(WAIT));
            let _ = tx.send(calc.hold(1));
        });
        rx
    };
    let status = first.wait_exit(WAIT).expect("the service exits");
    assert!(
        status.success(),
        "the stopped service exited with {status:?}"
    );
    let results = running.recv_timeout(WAIT).expect("the holds end");
    for r in &results {
        assert!(
            matches!(r, Ok(1500)),
            "a running call was cut off: {results:?}"
        );
    }
    assert!(
        later.try_recv().is_err(),
        "the call made during the stop did not wait for the next instance"
    );
    let _second = service(&b, &[]);
    let r = later.recv_timeout(WAIT).expect("the later call ends");
    assert!(matches!(r, Ok(1)), "{r:?}");
    // It ran at the new instance.
    let s = stats(&b);
    assert_eq!((s.started, s.finished), (1, 1), "{s:?}");
}

#[test]
fn a_stop_gives_up_the_handlers_still_running_at_the_drain_timeout() {
    let (_broker, mut svc, running) = holding(&[("ZRPC_TEST_DRAIN_TIMEOUT_MS", "300")], 1, 60_000);
    exits_at_once_cutting_off_its_call(&mut svc, libc::SIGTERM, &running);
}

#[test]
fn a_second_sigterm_stops_at_once() {
    let (b, mut svc, running) = holding(&[], 1, 60_000);
    svc.signal(libc::SIGTERM);
    wait_registered(b.dir(), "calc", 0);
    assert!(
        svc.child.try_wait().expect("try_wait").is_none(),
        "the service did not wait for its running call"
    );
    exits_at_once_cutting_off_its_call(&mut svc, libc::SIGINT, &running);
}

#[test]
fn without_stop_on_signals_sigterm_kills_the_service_and_its_calls() {
    // What the graceful stop saves its callers from: the same calls as in
    // the first test, cut off.
    let (_broker, mut svc, running) = holding(&[("ZRPC_TEST_NO_STOP_SIGNALS", "1")], 4, 1500);
    svc.signal(libc::SIGTERM);
    let status = svc.wait_exit(WAIT).expect("the service dies");
    assert!(!status.success(), "{status:?}");
    let results = running.recv_timeout(WAIT).expect("the holds end");
    assert_eq!(results.len(), 4);
    for r in &results {
        assert!(matches!(r, Err(Error::ServiceGone { .. })), "{results:?}");
    }
}

#[test]
fn a_shutdown_handle_stops_run_which_can_serve_again() {
    // Two names: both are released at each stop, and registered again.
    let b = Broker::start();
    let dir = b.dir().to_path_buf();
    let (tx, rx) = mpsc::channel();
    let (handle_tx, handle_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    // A `Server` is not `Send`: made on the thread that runs it.
    std::thread::spawn(move || {
        let svc = ServiceBuilder::new("stopme")
            .method("pid", |_ctx: &Context, (): ()| {
                Ok::<_, String>(std::process::id())
            })
            .build();
        let mut server = Server::new(svc)
            .add_name("stopme_too")
            .socket_dir(&dir)
            .stop_on_signals(false);
        let _ = handle_tx.send(server.shutdown_handle());
        // Each round when told to.
        while go_rx.recv().is_ok() {
            let _ = tx.send(server.run());
        }
    });
    let handle = handle_rx.recv_timeout(WAIT).expect("the server's handle");
    let client = BlockingClient::connect_to(b.dir()).expect("connect");
    for round in 0..2 {
        go_tx.send(()).expect("the server thread");
        wait_registered(b.dir(), "stopme", 1);
        wait_registered(b.dir(), "stopme_too", 1);
        let pid: u32 = client.call("stopme", "pid", &(), Some(WAIT)).expect("call");
        assert_eq!(pid, std::process::id());
        handle.shutdown();
        let r = rx.recv_timeout(WAIT).expect("run returns");
        assert!(r.is_ok(), "round {round}: {r:?}");
        // Every name is released, not only the first.
        wait_registered(b.dir(), "stopme", 0);
        wait_registered(b.dir(), "stopme_too", 0);
    }
}

#[test]
fn sigterm_during_an_exclusive_handler_waits_for_it() {
    // `zrpc-test-svc`'s `sleep` takes `&mut self`: it runs alone, inside
    // the service loop, while the signal arrives.
    let b = Broker::start();
    let mut svc = b.spawn("zrpc-test-svc", &[]);
    wait_registered(b.dir(), "echo", 1);
    let pid = u32::try_from(svc.pid()).expect("pid");
    let rx = sleeping(&b, 1500, CallOptions::timeout(WAIT).no_retry());
    svc.signal(libc::SIGTERM);
    let status = svc.wait_exit(WAIT).expect("the service exits");
    assert!(status.success(), "{status:?}");
    let r = rx.recv_timeout(WAIT).expect("the call ends");
    assert!(matches!(r, Ok(p) if p == pid), "{r:?}");
}

#[test]
fn the_drain_timeout_ends_an_exclusive_handler_too() {
    // `block` would hold the loop for a minute; `sleep` (exclusive, async)
    // is given up at the drain timeout.
    let b = Broker::start();
    let mut c = b.command("zrpc-test-svc");
    c.env("ZRPC_TEST_DRAIN_TIMEOUT_MS", "300");
    let mut svc = Proc::spawn("zrpc-test-svc", c);
    wait_registered(b.dir(), "echo", 1);
    let rx = sleeping(&b, 60_000, CallOptions::timeout(WAIT).no_retry());
    let start = Instant::now();
    svc.signal(libc::SIGTERM);
    // The name is released at once, while the handler runs.
    wait_registered(b.dir(), "echo", 0);
    exits_0_within_10_s(&mut svc, start);
    let r = rx.recv_timeout(WAIT).expect("the call ends");
    assert!(matches!(r, Err(Error::ServiceGone { .. })), "{r:?}");
}

#[test]
fn sigterm_during_a_long_exclusive_handler_releases_the_names_at_once() {
    // The default drain timeout (30 s) is longer than `wait_registered`'s
    // bound (20 s): the name must go while the handler still runs, not
    // when the drain gives up on it.
    // No heartbeat ping within the test either: the broker sends the
    // service nothing while the handler runs.
    let b = Broker::start_with(&["--heartbeat-interval", "120", "--heartbeat-timeout", "360"]);
    let mut svc = b.spawn("zrpc-test-svc", &[]);
    wait_registered(b.dir(), "echo", 1);
    let rx = sleeping(
        &b,
        60_000,
        CallOptions::timeout(Duration::from_secs(120)).no_retry(),
    );
    svc.signal(libc::SIGTERM);
    // Released at once: the `Unregister` is written, not left in the
    // output until the broker happens to send something.
    wait_registered(b.dir(), "echo", 0);
    assert!(
        svc.child.try_wait().expect("try_wait").is_none(),
        "the service did not wait for its running handler"
    );
    svc.signal(libc::SIGTERM);
    let status = svc.wait_exit(WAIT).expect("the service exits");
    assert!(status.success(), "{status:?}");
    let r = rx.recv_timeout(WAIT).expect("the call ends");
    assert!(matches!(r, Err(Error::ServiceGone { .. })), "{r:?}");
}

/// A service whose `wait` handlers (`&self`, concurrent) run until the
/// test adds permits to `gate`.
struct Gated {
    started: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    gate: std::sync::Arc<tokio::sync::Semaphore>,
}

#[zrpc_service::service(name = "gated")]
impl Gated {
    #[zrpc_service::rpc_method]
    async fn wait(&self) -> u32 {
        self.started
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if let Ok(p) = self.gate.acquire().await {
            p.forget();
        }
        1
    }
}

#[test]
fn a_draining_service_does_not_register_again_after_losing_the_broker() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let mut b = Broker::start();
    let started = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let (tx, rx) = mpsc::channel();
    let (handle_tx, handle_rx) = mpsc::channel();
    {
        let dir = b.dir().to_path_buf();
        let (started, gate) = (started.clone(), gate.clone());
        std::thread::spawn(move || {
            let mut server = Server::new(Gated { started, gate })
                .socket_dir(&dir)
                .stop_on_signals(false);
            let _ = handle_tx.send(server.shutdown_handle());
            let _ = tx.send(server.run());
        });
    }
    let handle = handle_rx.recv_timeout(WAIT).expect("the server's handle");
    wait_registered(b.dir(), "gated", 1);
    // Two calls running (their callers see the broker die: no_retry).
    {
        let dir = b.dir().to_path_buf();
        std::thread::spawn(move || {
            runtime().block_on(async {
                let c = Client::connect_to(&dir).await.expect("connect");
                let opts = CallOptions::timeout(WAIT).no_retry();
                let a = c.call_with::<_, u32>("gated", "wait", &(), opts);
                let b = c.call_with::<_, u32>("gated", "wait", &(), opts);
                let _ = tokio::join!(a, b);
            });
        });
    }
    assert!(wait_until(WAIT, || started.load(Ordering::SeqCst) == 2));
    handle.shutdown();
    wait_registered(b.dir(), "gated", 0);
    // The broker restarts while the two handlers still run.
    b.restart(libc::SIGKILL);
    // The draining server finishes its handlers and returns: a lost
    // connection is not set up again during a stop, so the new broker
    // never sees the name.
    gate.add_permits(2);
    let r = rx.recv_timeout(WAIT).expect("run returns");
    assert!(r.is_ok(), "the stopped server: {r:?}");
    let stats: rmpv::Value = BlockingClient::connect_to(b.dir())
        .expect("connect")
        .call("zrpcd", "stats", &(), Some(WAIT))
        .expect("zrpcd.stats");
    let services = stats
        .as_map()
        .and_then(|m| m.iter().find(|(k, _)| k.as_str() == Some("services")))
        .map(|(_, v)| v.to_string())
        .unwrap_or_default();
    assert!(
        !services.contains("gated"),
        "the draining server registered its name at the new broker: {services}"
    );
}

#[test]
fn serving_again_after_dropping_a_serve_future_mid_stop_registers_the_names() {
    // `serve` is cancel-safe by its documentation ("dropping the future
    // abandons the request being handled"): a server whose `serve` was
    // dropped while stopping serves its names again with `serve_once`.
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let b = Broker::start();
    let started = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let (handle_tx, handle_rx) = mpsc::channel();
    let (abandon_tx, abandon_rx) = tokio::sync::oneshot::channel::<()>();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let (out_tx, out_rx) = mpsc::channel();
    {
        let dir = b.dir().to_path_buf();
        let (started, gate) = (started.clone(), gate.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let mut server = Server::new(Gated { started, gate })
                    .socket_dir(&dir)
                    .stop_on_signals(false);
                let _ = handle_tx.send(server.shutdown_handle());
                tokio::select! {
                    r = server.serve() => {
                        let _ = out_tx.send(format!("serve returned {r:?}"));
                        return;
                    }
                    _ = abandon_rx => {}
                }
                while done_rx.try_recv().is_err() {
                    if let Err(e) = server.serve_once(Some(Duration::from_millis(50))).await {
                        let _ = out_tx.send(format!("serve_once: {e}"));
                        return;
                    }
                }
                let _ = out_tx.send("done".to_string());
            });
        });
    }
    let handle = handle_rx.recv_timeout(WAIT).expect("the server's handle");
    wait_registered(b.dir(), "gated", 1);
    let call = {
        let dir = b.dir().to_path_buf();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let r = runtime().block_on(async {
                let c = Client::connect_to(&dir).await.expect("connect");
                c.call_with::<_, u32>("gated", "wait", &(), CallOptions::timeout(WAIT))
                    .await
            });
            let _ = tx.send(r);
        });
        rx
    };
    assert!(wait_until(WAIT, || started.load(Ordering::SeqCst) == 1));
    handle.shutdown();
    // Draining (the handler still runs) when the serve future is dropped.
    wait_registered(b.dir(), "gated", 0);
    abandon_tx.send(()).expect("the server thread");
    // Served again: the name is back, and the call is answered.
    wait_registered(b.dir(), "gated", 1);
    gate.add_permits(1);
    let r = call.recv_timeout(WAIT).expect("the call ends");
    assert!(matches!(r, Ok(1)), "{r:?}");
    done_tx.send(()).expect("the server thread");
    let out = out_rx.recv_timeout(WAIT).expect("the server thread ends");
    assert_eq!(out, "done");
}

#[test]
fn a_second_signal_does_not_start_the_requests_still_queued() {
    // Three exclusive 60 s calls: one runs, two wait in the service's
    // queue. Stopping at once must not run those two first.
    let b = Broker::start();
    let mut svc = b.spawn("zrpc-test-svc", &[]);
    wait_registered(b.dir(), "echo", 1);
    let opts = || CallOptions::timeout(Duration::from_secs(120)).no_retry();
    let calls: Vec<_> = (0..3).map(|_| sleeping(&b, 60_000, opts())).collect();
    svc.signal(libc::SIGTERM);
    wait_registered(b.dir(), "echo", 0);
    let start = Instant::now();
    svc.signal(libc::SIGINT);
    exits_0_within_10_s(&mut svc, start);
    for rx in calls {
        let r = rx.recv_timeout(WAIT).expect("the call ends");
        assert!(matches!(r, Err(Error::ServiceGone { .. })), "{r:?}");
    }
}
