//! Services survive broker restarts: a `zrpc-test-svc` process reconnects by
//! itself after zrpcd is killed (SIGKILL) or stopped (SIGTERM) and started
//! again on the same socket directory, registers its name again (shared
//! instances too), and answers a call re-sent after the restart from its
//! reply cache instead of running it twice. Every wait is bounded.

use std::time::Duration;

use zrpc_client::BlockingClient;
use zrpc_proto::{Envelope, ErrorCode, PROTOCOL_VERSION};
use zrpc_tests::raw::Raw;
use zrpc_tests::{wait_registered, wait_until, Broker, Proc, WAIT};

const T: Option<Duration> = Some(Duration::from_secs(20));

fn client(b: &Broker) -> BlockingClient {
    BlockingClient::connect_to(b.dir()).expect("connect to zrpcd")
}

fn still_running(p: &mut Proc) -> bool {
    matches!(p.child.try_wait(), Ok(None))
}

fn name(sig: i32) -> &'static str {
    if sig == libc::SIGKILL {
        "SIGKILL"
    } else {
        "SIGTERM"
    }
}

/// One service process keeps serving across two restarts by `sig`.
fn survives(sig: i32) {
    let mut b = Broker::start();
    let mut svc = b.spawn("zrpc-test-svc", &[]);
    wait_registered(b.dir(), "echo", 1);
    let v: rmpv::Value = client(&b).call("echo", "echo", &"before", T).expect("call");
    assert_eq!(v, rmpv::Value::from("before"));

    for round in 0..2 {
        b.restart(sig);
        // No new service process: the same one registers again.
        wait_registered(b.dir(), "echo", 1);
        assert!(
            still_running(&mut svc),
            "the service exited after a broker {} (round {round})",
            name(sig)
        );
        let c = client(&b);
        let v: rmpv::Value = c
            .call("echo", "echo", &round, T)
            .expect("call after restart");
        assert_eq!(v, rmpv::Value::from(round));
        let pid: u32 = c.call("echo", "pid", &(), T).expect("pid");
        assert_eq!(pid, svc.pid() as u32, "answered by the original process");
    }
}

#[test]
fn service_survives_broker_sigkill() {
    survives(libc::SIGKILL);
}

#[test]
fn service_survives_broker_sigterm() {
    survives(libc::SIGTERM);
}

#[test]
fn two_shared_instances_both_come_back() {
    let mut b = Broker::start();
    let mut one = b.spawn("zrpc-test-svc", &["--shared"]);
    let mut two = b.spawn("zrpc-test-svc", &["--shared"]);
    wait_registered(b.dir(), "echo", 2);

    for sig in [libc::SIGKILL, libc::SIGTERM] {
        b.restart(sig);
        wait_registered(b.dir(), "echo", 2);
        assert!(still_running(&mut one) && still_running(&mut two));
        // Concurrent calls are spread over both instances (fewest
        // outstanding first): both answer.
        let dir = b.dir().to_path_buf();
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let dir = dir.clone();
                std::thread::spawn(move || {
                    let c = BlockingClient::connect_to(&dir).expect("connect");
                    c.call::<_, u32>("echo", "sleep", &300u64, T)
                })
            })
            .collect();
        let pids: Vec<u32> = threads
            .into_iter()
            .map(|t| t.join().expect("thread").expect("call"))
            .collect();
        for p in [&one, &two] {
            assert!(
                pids.contains(&(p.pid() as u32)),
                "instance {} did not answer after a broker {}: {pids:?}",
                p.pid(),
                name(sig)
            );
        }
    }
}

/// A raw client with a chosen instance id, so that a call can be re-sent
/// with the same identity `(instance, id)` after a broker restart, as a
/// reconnecting client does.
fn raw_client(b: &Broker, instance: u64) -> Raw {
    let mut r = Raw::connect(b.dir());
    r.send(
        &Envelope::Hello {
            version: PROTOCOL_VERSION,
            instance,
            agent: "service_restart test",
            caps: 0,
        },
        b"",
    );
    let (kind, _) = r.recv().expect("welcome");
    assert_eq!(kind, zrpc_proto::Kind::Welcome);
    r
}

fn send_record(r: &mut Raw, id: u64, key: u64, ms: u64) {
    let payload = rmp_serde::to_vec(&(key, ms)).expect("encode");
    r.send(
        &Envelope::Call {
            id,
            service: "echo",
            method: "record",
            timeout_ms: Some(WAIT.as_millis() as u64),
            flags: 0,
        },
        &payload,
    );
}

/// The next `Result` on `r`: (id, code, decoded payload).
fn result(r: &mut Raw) -> (u64, Option<ErrorCode>, Option<(u64, u64)>) {
    let f = r.recv_frame().expect("a Result");
    match f.decode().expect("envelope") {
        Envelope::Result { id, code, .. } => {
            let v = code
                .is_none()
                .then(|| rmp_serde::from_slice(&f.payload).expect("(key, n)"));
            (id, code, v)
        }
        other => panic!("expected Result, got {other:?}"),
    }
}

/// A call in flight when the broker dies, re-sent with the same identity
/// after the restart, is answered from the service's reply cache: the
/// handler ran once.
fn resent_call_runs_once(sig: i32) {
    let mut b = Broker::start();
    let mut svc = b.spawn("zrpc-test-svc", &[]);
    wait_registered(b.dir(), "echo", 1);
    let instance = 0x5eed_0000_0000_0000 | u64::from(std::process::id());
    let key = 42;

    // Longer than zrpcd's default shutdown grace (2 s), so that SIGTERM
    // fails the call with Shutdown instead of waiting for it.
    let ms = 4000;
    let mut r = raw_client(&b, instance);
    send_record(&mut r, 7, key, ms);
    assert!(
        wait_until(WAIT, || zrpc_tests::broker_stat(b.dir(), "pending") == 1),
        "the call did not reach the broker"
    );
    b.restart(sig);
    // The old connection ends (SIGTERM first answers Shutdown); each read
    // is bounded by the socket's read timeout.
    while let Some(f) = r.recv_frame() {
        match f.decode().expect("envelope") {
            Envelope::Result { code, .. } => assert_eq!(code, Some(ErrorCode::Shutdown)),
            Envelope::Fatal { code, .. } => assert_eq!(code, ErrorCode::Shutdown),
            other => panic!("unexpected {other:?}"),
        }
    }
    // Re-sent with the same identity: the answer of the first execution.
    let mut r = raw_client(&b, instance);
    send_record(&mut r, 7, key, ms);
    assert_eq!(result(&mut r), (7, None, Some((key, 1))));
    // And once more, later.
    send_record(&mut r, 7, key, 0);
    assert_eq!(result(&mut r), (7, None, Some((key, 1))));

    let c = client(&b);
    let n: u64 = c.call("echo", "executions", &key, T).expect("executions");
    assert_eq!(n, 1, "the handler ran once for the re-sent call");
    // A new call (new identity) with the same argument does run.
    let v: (u64, u64) = c.call("echo", "record", &(key, 0u64), T).expect("record");
    assert_eq!(v, (key, 2));
    assert!(still_running(&mut svc));
}

#[test]
fn resent_call_after_broker_sigkill_runs_once() {
    resent_call_runs_once(libc::SIGKILL);
}

#[test]
fn resent_call_after_broker_sigterm_runs_once() {
    resent_call_runs_once(libc::SIGTERM);
}

/// End to end with the real client library: a call in flight while zrpcd is
/// killed is resubmitted by the client after the restart and answered from
/// the service's reply cache; the handler ran once.
fn client_call_across_restart_runs_once(sig: i32) {
    let mut b = Broker::start();
    let _svc = b.spawn("zrpc-test-svc", &[]);
    wait_registered(b.dir(), "echo", 1);
    let key = 77;
    let dir = b.dir().to_path_buf();
    let call = std::thread::spawn(move || {
        let c = BlockingClient::connect_to(&dir).expect("connect");
        c.call::<_, (u64, u64)>("echo", "record", &(key, 4000u64), T)
    });
    assert!(
        wait_until(WAIT, || zrpc_tests::broker_stat(b.dir(), "pending") == 1),
        "the call did not reach the broker"
    );
    b.restart(sig);
    let r = call
        .join()
        .expect("thread")
        .expect("answered after the restart");
    assert_eq!(r, (key, 1));
    let n: u64 = client(&b)
        .call("echo", "executions", &key, T)
        .expect("executions");
    assert_eq!(n, 1, "the handler ran once");
}

#[test]
fn client_call_across_broker_sigkill_runs_once() {
    client_call_across_restart_runs_once(libc::SIGKILL);
}

#[test]
fn client_call_across_broker_sigterm_runs_once() {
    client_call_across_restart_runs_once(libc::SIGTERM);
}

/// A client that loses only its own connection (the broker stays up) and
/// re-sends its call with the same identity: the broker did not cancel the
/// first execution, so the service answers the re-sent call from its cache.
#[test]
fn client_reconnect_without_broker_restart_runs_once() {
    let b = Broker::start();
    let _svc = b.spawn("zrpc-test-svc", &[]);
    wait_registered(b.dir(), "echo", 1);
    let instance = 0x0c11_0000_0000_0000 | u64::from(std::process::id());
    let key = 77;
    let mut r = raw_client(&b, instance);
    send_record(&mut r, 3, key, 500);
    assert!(
        wait_until(WAIT, || zrpc_tests::broker_stat(b.dir(), "pending") == 1),
        "the call did not reach the broker"
    );
    drop(r); // the client's connection is lost mid-call
    let mut r = raw_client(&b, instance);
    send_record(&mut r, 3, key, 500);
    assert_eq!(result(&mut r), (3, None, Some((key, 1))));
    let c = client(&b);
    let n: u64 = c.call("echo", "executions", &key, T).expect("executions");
    assert_eq!(n, 1, "the handler ran once");
}
