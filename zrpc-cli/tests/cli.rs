//! The `zrpc` command-line tool end to end: the real `zrpc` binary against
//! the real `zrpcd` and real services (`zrpc-test-svc`, name `echo`).

use std::io::{Read, Write};
use std::process::{Command, Stdio};

use serde_json::{json, Value as Json};
use zrpc_tests::{bin, wait_until, Broker, Proc, TempDir, WAIT};

/// What one `zrpc` run produced.
#[derive(Debug)]
struct Out {
    code: i32,
    stdout: String,
    stderr: String,
    pid: i32,
}

impl Out {
    /// Stdout parsed as one JSON document.
    fn json(&self) -> Json {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {:?}", self.stdout))
    }

    /// Asserts success.
    fn ok(self) -> Out {
        assert_eq!(self.code, 0, "zrpc failed: {self:?}");
        self
    }
}

/// Runs `cmd` to completion with a bound (the process is killed, by pid,
/// if it runs longer), feeding it `stdin`.
fn run_cmd(mut cmd: Command, stdin: Option<&str>) -> Out {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let child = cmd.spawn().expect("start zrpc");
    let mut p = Proc::adopt(child, "zrpc");
    if let (Some(data), Some(mut si)) = (stdin, p.child.stdin.take()) {
        si.write_all(data.as_bytes()).expect("write stdin");
    }
    let reader = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut r) = pipe {
                let _ = r.read_to_string(&mut s);
            }
            s
        })
    };
    let out = reader(p.child.stdout.take().map(|o| Box::new(o) as _));
    let err = reader(p.child.stderr.take().map(|o| Box::new(o) as _));
    let status = p.wait_exit(WAIT);
    let pid = p.pid();
    drop(p); // kills it if it is still running
    let status = status.unwrap_or_else(|| panic!("zrpc did not finish within {WAIT:?}"));
    Out {
        code: status.code().unwrap_or(-1),
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
        pid,
    }
}

/// `zrpc ARGS...` against broker `b`.
fn zrpc(b: &Broker, args: &[&str]) -> Out {
    let mut c = b.command("zrpc");
    c.args(args);
    run_cmd(c, None)
}

/// The services listed by `zrpc list --json`, as (name, pids).
fn listed(b: &Broker) -> Vec<(String, Vec<i64>)> {
    let out = zrpc(b, &["list", "--json"]);
    if out.code != 0 {
        return Vec::new();
    }
    let j = out.json();
    j.as_array()
        .expect("list --json is an array")
        .iter()
        .map(|e| {
            let pids = e["instances"]
                .as_array()
                .expect("instances")
                .iter()
                .filter_map(|i| i["pid"].as_i64())
                .collect();
            (e["name"].as_str().expect("name").to_string(), pids)
        })
        .collect()
}

/// A broker with one `zrpc-test-svc` registered as `echo`.
fn echo_broker() -> (Broker, Proc) {
    let b = Broker::start();
    let svc = b.spawn("zrpc-test-svc", &[]);
    assert!(
        wait_until(WAIT, || listed(&b).iter().any(|(n, _)| n == "echo")),
        "echo did not show up in `zrpc list`"
    );
    (b, svc)
}

#[test]
fn call_prints_the_result_for_humans_and_machines() {
    let (b, _svc) = echo_broker();
    let payload = r#"{"a": [1, -2, 2.5, null, true], "s": "héllo", "big": 18446744073709551615, "neg": -9223372036854775808}"#;
    let expected: Json = serde_json::from_str(payload).expect("payload");

    let human = zrpc(&b, &["call", "echo", "echo", payload]).ok();
    assert!(
        human.stdout.lines().count() > 1,
        "indented: {:?}",
        human.stdout
    );
    assert_eq!(human.json(), expected);

    let machine = zrpc(&b, &["call", "echo", "echo", payload, "--json"]).ok();
    assert_eq!(machine.stdout.lines().count(), 1, "{:?}", machine.stdout);
    assert_eq!(machine.json(), expected);

    // No payload is nil; the broker's own service answers too.
    assert_eq!(zrpc(&b, &["call", "echo", "echo"]).ok().json(), Json::Null);
    assert_eq!(
        zrpc(&b, &["call", "zrpcd", "ping"]).ok().json(),
        json!("pong")
    );
}

#[test]
fn tagged_json_forms_round_trip() {
    let (b, _svc) = echo_broker();
    for v in [
        r#"{"$bytes":"AAH/"}"#,
        r#"{"$bytes":""}"#,
        r#"{"$float":"inf"}"#,
        r#"{"$float":"-inf"}"#,
        r#"{"$float":"nan"}"#,
        r#"{"$map":[[1,"one"],[[2],{"$bytes":"Ag=="}]]}"#,
        r#"{"$map":[["$bytes","not bytes"]]}"#,
        r#"{"$ext":[5,"AQID"]}"#,
        r#"{"k":{"$bytes":"/w=="},"l":[{"$bytes":"AA=="}]}"#,
    ] {
        let out = zrpc(&b, &["call", "echo", "echo", v, "--json"]).ok();
        assert_eq!(out.stdout.trim_end(), v);
    }
    // Bytes into a typed method (serde_bytes field) and back.
    let out = zrpc(
        &b,
        &[
            "call",
            "echo",
            "shift",
            r#"{"x": 1, "y": 2.0, "label": "p", "raw": {"$bytes": "AQID"}}"#,
            "--json",
        ],
    )
    .ok();
    assert_eq!(
        out.json(),
        json!({"x": 2, "y": 3.5, "label": "p", "raw": {"$bytes": "AQID"}})
    );
}

#[test]
fn payload_from_stdin() {
    let (b, _svc) = echo_broker();
    let mut c = b.command("zrpc");
    c.args(["call", "echo", "echo", "-", "--json"]);
    let out = run_cmd(c, Some("{\"from\": \"stdin\", \"n\": [1, 2]}\n")).ok();
    assert_eq!(out.json(), json!({"from": "stdin", "n": [1, 2]}));
}

#[test]
fn exit_codes_by_error_kind() {
    let (b, _svc) = echo_broker();
    let cases: &[(&[&str], i32, &str)] = &[
        (
            &["call", "echo", "sleep", "5000", "--timeout", "0.2"],
            3,
            "timed out",
        ),
        (&["call", "nosuch", "x", "--no-wait"], 4, "nosuch"),
        (&["call", "echo", "nosuch"], 5, "nosuch"),
        (&["call", "echo", "fail", "\"deliberate\""], 6, "deliberate"),
        (&["call", "echo", "panic"], 6, "panic"),
        (&["call", "echo", "shift", "\"not a point\""], 7, "decode"),
        (&["call", "echo", "echo", "{not json"], 1, "JSON"),
        (
            &["call", "echo", "echo", r#"{"$bytes": "!!"}"#],
            1,
            "base64",
        ),
        (&["call", "echo", "echo", "--count", "0"], 1, "count"),
        (&["call", "echo"], 1, "METHOD"),
        (&["frobnicate"], 1, "frobnicate"),
    ];
    for (args, code, msg) in cases {
        let out = zrpc(&b, args);
        assert_eq!(out.code, *code, "{args:?}: {out:?}");
        assert!(out.stderr.contains(msg), "{args:?}: {out:?}");
        assert!(out.stdout.is_empty(), "{args:?}: {out:?}");
    }
    // Errors from the tool itself are prefixed with `zrpc: `.
    let out = zrpc(&b, &["call", "echo", "fail", "\"x\""]);
    assert!(out.stderr.starts_with("zrpc: "), "{out:?}");
}

#[test]
fn connection_error_without_a_broker() {
    let empty = TempDir::new();
    // Through the environment ...
    let mut c = Command::new(bin("zrpc"));
    c.env("ZRPC_SOCKET_DIR", empty.path())
        .args(["call", "echo", "echo", "1"]);
    let out = run_cmd(c, None);
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.starts_with("zrpc: "), "{out:?}");
    assert!(out.stderr.contains("zrpcd"), "{out:?}");
    // ... and through the flag, for every subcommand that talks to zrpcd.
    for args in [
        &["call", "echo", "echo"][..],
        &["list"],
        &["list", "echo"],
        &["stats"],
        &["monitor"],
    ] {
        let mut c = Command::new(bin("zrpc"));
        c.env_remove("ZRPC_SOCKET_DIR")
            .arg("--socket-dir")
            .arg(empty.path())
            .args(args);
        let out = run_cmd(c, None);
        assert_eq!(out.code, 2, "{args:?}: {out:?}");
    }
}

/// A stopped broker (SIGSTOP) still completes connections from its listen
/// backlog but never answers `Hello`: `--timeout` bounds the connection
/// too (at least 1 s), so each command gives up (exit 2) about when it says
/// it would, not at the client's 10 s connect timeout.
#[test]
fn timeout_bounds_connecting_to_a_stopped_broker() {
    let b = Broker::start();
    b.proc.signal(libc::SIGSTOP);
    let runs: Vec<_> = [
        &["call", "echo", "echo", "1", "--timeout", "0.5"][..],
        &["list", "--timeout", "0.5"],
        &["stats", "--timeout", "0.5"],
    ]
    .into_iter()
    .map(|args| {
        let start = std::time::Instant::now();
        let out = zrpc(&b, args);
        (args, out, start.elapsed())
    })
    .collect();
    b.proc.signal(libc::SIGCONT);
    for (args, out, took) in runs {
        assert_eq!(out.code, 2, "{args:?}: {out:?}");
        assert!(
            took < std::time::Duration::from_secs(4),
            "{args:?} gave up after {took:?} with --timeout 0.5: {out:?}"
        );
    }
}

#[test]
fn socket_dir_flag_wins_over_the_environment() {
    let (b, _svc) = echo_broker();
    let empty = TempDir::new();
    let mut c = Command::new(bin("zrpc"));
    c.env("ZRPC_SOCKET_DIR", empty.path())
        .arg("--socket-dir")
        .arg(b.dir())
        .args(["call", "echo", "echo", "\"flag\""]);
    assert_eq!(run_cmd(c, None).ok().json(), json!("flag"));
}

#[test]
fn count_repeats_the_call() {
    let (b, _svc) = echo_broker();
    let out = zrpc(&b, &["call", "echo", "counter", "--count", "3", "--json"]).ok();
    let n: Vec<u64> = out
        .stdout
        .lines()
        .map(|l| l.parse().expect("a counter"))
        .collect();
    assert_eq!(n.len(), 3, "{out:?}");
    assert_eq!(n[1], n[0] + 1);
    assert_eq!(n[2], n[1] + 1);
    // Repetition stops at the first error, with its exit code.
    let out = zrpc(&b, &["call", "echo", "fail", "\"x\"", "--count", "inf"]);
    assert_eq!(out.code, 6, "{out:?}");
}

#[test]
fn concurrency_prints_a_summary() {
    let (b, _svc) = echo_broker();
    let out = zrpc(
        &b,
        &[
            "call",
            "echo",
            "echo",
            "\"load\"",
            "--concurrency",
            "4",
            "--count",
            "40",
            "--json",
        ],
    )
    .ok();
    let s = out.json();
    assert_eq!(s["calls"], json!(40), "{s}");
    assert_eq!(s["ok"], json!(40), "{s}");
    assert_eq!(s["errors"], json!(0), "{s}");
    assert!(s["calls_per_s"].as_f64().expect("rate") > 0.0, "{s}");
    let (p50, p99) = (
        s["p50_us"].as_u64().expect("p50"),
        s["p99_us"].as_u64().expect("p99"),
    );
    assert!(p50 > 0 && p50 <= p99, "{s}");

    let human = zrpc(&b, &["call", "echo", "echo", "1", "-c", "4", "-n", "40"]).ok();
    for word in ["40 ok", "0 errors", "calls/s", "p50", "p99"] {
        assert!(human.stdout.contains(word), "{word}: {human:?}");
    }

    // Errors are counted, and the exit code is the first error's.
    let out = zrpc(
        &b,
        &[
            "call", "echo", "fail", "\"x\"", "-c", "4", "-n", "8", "--json",
        ],
    );
    assert_eq!(out.code, 6, "{out:?}");
    let s = out.json();
    assert_eq!(s["errors"], json!(8), "{s}");
    assert_eq!(s["errors_by_kind"]["remote"], json!(8), "{s}");
}

#[test]
fn list_shows_services_with_their_pids() {
    let (b, svc) = echo_broker();
    let other = b.spawn("zrpc-test-svc", &["--name", "other"]);
    assert!(wait_until(WAIT, || listed(&b).len() == 2));
    let list = listed(&b);
    assert_eq!(
        list,
        vec![
            ("echo".to_string(), vec![i64::from(svc.pid())]),
            ("other".to_string(), vec![i64::from(other.pid())]),
        ]
    );
    let j = zrpc(&b, &["list", "--json"]).ok().json();
    let inst = &j[0]["instances"][0];
    assert_eq!(inst["uid"], json!(unsafe { libc::getuid() }), "{j}");
    for key in ["conn_id", "connected_s", "served", "failed", "agent"] {
        assert!(!inst[key].is_null(), "{key} in {j}");
    }

    let human = zrpc(&b, &["list"]).ok();
    let line = human
        .stdout
        .lines()
        .find(|l| l.starts_with("echo "))
        .unwrap_or_else(|| panic!("no echo line: {human:?}"));
    assert!(
        line.split_whitespace().any(|w| w == svc.pid().to_string()),
        "{line}"
    );
    assert!(human.stdout.starts_with("SERVICE"), "{human:?}");
}

/// More names than one `zrpcd.list` answer holds (--max-message-size
/// 16384): `zrpc list` pages through `list` and `peers`.
#[test]
fn list_pages_through_more_names_than_one_message_holds() {
    let b = Broker::start_with(&["--max-message-size", "16384"]);
    let prefix = "a-rather-long-service-name-to-fill-the-pages-";
    let _hogs: Vec<Proc> = (0..4)
        .map(|i| {
            let mut p = b.spawn(
                "zrpc-test-peer",
                &[
                    "register-many",
                    "--prefix",
                    &format!("{prefix}{i}-"),
                    "--count",
                    "250",
                ],
            );
            let line = p
                .read_until(|l| l.starts_with("registered"))
                .unwrap_or_default();
            assert_eq!(line, "registered 250");
            p
        })
        .collect();
    let j = zrpc(&b, &["list", "--json"]).ok().json();
    let entries = j.as_array().expect("an array");
    assert_eq!(entries.len(), 1000);
    // Each instance found in zrpcd.peers, paged too.
    assert!(
        entries.iter().all(|e| !e["instances"][0]["pid"].is_null()),
        "{}",
        entries[999]
    );
}

#[test]
fn list_service_shows_methods_and_docs() {
    let (b, _svc) = echo_broker();
    let out = zrpc(&b, &["list", "echo"]).ok();
    for want in [
        "echo(payload: Value) -> Value",
        "Returns its payload unchanged.",
        "sleep(ms: u64) -> u32",
        "Sleeps `ms` milliseconds, then returns this process's pid.",
        // Shapes: how the values are encoded, from the serde types.
        "fail(msg: str) -> Result<(), str>",
        "Fails with the given message.",
        "fail_io(msg: str) -> Result<(), std::io::Error>",
        "shift(p: Point { x: i64, y: f64, label: str, raw: bytes }) \
         -> Point { x: i64, y: f64, label: str, raw: bytes }",
    ] {
        assert!(out.stdout.contains(want), "{want:?} in {}", out.stdout);
    }
    let j = zrpc(&b, &["list", "echo", "--json"]).ok().json();
    assert_eq!(j["service"], json!("echo"));
    let methods = j["methods"].as_array().expect("methods");
    let shift = methods
        .iter()
        .find(|m| m["name"] == json!("shift"))
        .expect("shift");
    let point = json!({"kind": "struct", "name": "Point", "fields": [
        {"name": "x", "shape": {"kind": "i64"}},
        {"name": "y", "shape": {"kind": "f64"}},
        {"name": "label", "shape": {"kind": "str"}},
        {"name": "raw", "shape": {"kind": "bytes"}},
    ]});
    assert_eq!(
        shift["params"],
        json!([{"name": "p", "type": "Point", "shape": point}])
    );
    assert_eq!(shift["returns"], json!("Point"));
    assert_eq!(shift["returns_shape"], point);
    assert!(shift["doc"]
        .as_str()
        .expect("doc")
        .contains("Moves a typed point"));

    // The broker's own service is described too; unknown services fail fast.
    let out = zrpc(&b, &["list", "zrpcd"]).ok();
    assert!(out.stdout.contains("monitor("), "{out:?}");
    let out = zrpc(&b, &["list", "nosuch"]);
    assert_eq!(out.code, 4, "{out:?}");
}

#[test]
fn monitor_prints_calls_as_they_finish() {
    let (b, _svc) = echo_broker();
    let mon = b.spawn("zrpc", &["monitor", "echo", "--count", "2", "--json"]);
    let human = b.spawn("zrpc", &["monitor", "--count", "1"]);
    let monitors = || {
        let out = zrpc(&b, &["stats", "--json"]);
        out.code == 0 && out.json()["monitors"].as_u64().unwrap_or(0) >= 2
    };
    assert!(wait_until(WAIT, monitors), "the monitors did not subscribe");

    let first = zrpc(&b, &["call", "echo", "echo", "\"seen\""]).ok();
    let second = zrpc(&b, &["call", "echo", "fail", "\"oops\""]);
    assert_eq!(second.code, 6);

    let (status, out) = mon.output(WAIT);
    assert!(status.is_some_and(|s| s.success()), "{status:?} {out:?}");
    let events: Vec<Json> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON event per line"))
        .collect();
    assert_eq!(events.len(), 2, "{out}");
    assert_eq!(events[0]["service"], json!("echo"));
    assert_eq!(events[0]["method"], json!("echo"));
    assert_eq!(events[0]["outcome"], json!("ok"));
    assert_eq!(events[0]["caller_pid"], json!(first.pid));
    assert_eq!(
        events[0]["size"],
        json!(5),
        "\"seen\" is 5 bytes of MessagePack"
    );
    assert!(events[0]["latency_us"].is_u64());
    assert!(events[0]["time"].as_f64().expect("time") > 1.0e9);
    assert_eq!(events[1]["method"], json!("fail"));
    assert_eq!(events[1]["outcome"], json!("remote"));
    assert_eq!(events[1]["caller_pid"], json!(second.pid));

    let (status, out) = human.output(WAIT);
    assert!(status.is_some_and(|s| s.success()), "{status:?} {out:?}");
    assert_eq!(out.lines().count(), 1, "{out}");
    for want in ["echo.echo", " ok", &format!("pid {}", first.pid)] {
        assert!(out.contains(want), "{want:?} in {out:?}");
    }
}

#[test]
fn stats_counts_calls() {
    let (b, _svc) = echo_broker();
    for _ in 0..3 {
        zrpc(&b, &["call", "echo", "echo", "1"]).ok();
    }
    assert_eq!(zrpc(&b, &["call", "echo", "fail", "\"x\""]).code, 6);
    let s = zrpc(&b, &["stats", "--json"]).ok().json();
    assert!(s["calls"].as_u64().expect("calls") >= 4, "{s}");
    assert_eq!(s["services"]["echo"]["answered"], json!(4), "{s}");
    assert_eq!(s["services"]["echo"]["errors"], json!(1), "{s}");
    assert_eq!(s["errors"]["remote"], json!(1), "{s}");
    assert!(s["services"]["echo"]["p50_us"].is_u64(), "{s}");

    let human = zrpc(&b, &["stats"]).ok();
    for want in ["uptime", "calls", "remote 1", "SERVICE", "P99"] {
        assert!(human.stdout.contains(want), "{want:?} in {}", human.stdout);
    }
    assert!(
        human.stdout.lines().any(|l| l.starts_with("echo ")),
        "{}",
        human.stdout
    );
}

#[test]
fn completions_and_help() {
    let b = Broker::start();
    for shell in ["bash", "zsh", "fish"] {
        let out = zrpc(&b, &["completions", shell]).ok();
        assert!(out.stdout.len() > 100, "{shell}: {out:?}");
        assert!(out.stdout.contains("monitor"), "{shell}");
    }
    assert_eq!(zrpc(&b, &["completions", "tcsh"]).code, 1);
    for sub in ["call", "list", "monitor", "stats", "completions"] {
        let out = zrpc(&b, &[sub, "--help"]).ok();
        assert!(out.stdout.contains("Examples"), "{sub}: {}", out.stdout);
        assert!(out.stdout.contains("zrpc "), "{sub}");
    }
    let call = zrpc(&b, &["call", "--help"]).ok().stdout;
    for want in [
        "Exit codes",
        "$bytes",
        "$map",
        "$float",
        "--timeout",
        "--concurrency",
    ] {
        assert!(call.contains(want), "{want:?} in call --help");
    }
    assert!(zrpc(&b, &["--help"]).ok().stdout.contains("Examples"));
}

#[test]
fn a_call_to_an_unregistered_name_says_so_and_times_out() {
    let b = Broker::start();
    let out = zrpc(&b, &["call", "nosvc", "foo", "--timeout", "2"]);
    assert_eq!(out.code, 3, "{out:?}");
    assert!(
        out.stderr
            .contains("no service \"nosvc\" is registered; waiting for one to register"),
        "{out:?}"
    );
    assert!(
        out.stderr
            .contains("no service registered the name \"nosvc\" before the deadline"),
        "{out:?}"
    );
    // A registered service that is slow gets no such notice.
    let (b, _svc) = echo_broker();
    let out = zrpc(&b, &["call", "echo", "sleep", "1500", "--timeout", "0.2"]);
    assert_eq!(out.code, 3, "{out:?}");
    assert!(!out.stderr.contains("registered"), "{out:?}");
}

#[test]
fn call_timeout_defaults_to_30_s_and_inf_means_none() {
    let (b, _svc) = echo_broker();
    let help = zrpc(&b, &["call", "--help"]).ok();
    assert!(help.stdout.contains("[default: 30]"), "{}", help.stdout);
    let out = zrpc(
        &b,
        &[
            "call",
            "echo",
            "echo",
            "\"no deadline\"",
            "--timeout",
            "inf",
        ],
    )
    .ok();
    assert_eq!(out.json(), json!("no deadline"));
    let out = zrpc(&b, &["call", "echo", "echo", "--timeout", "abc"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("seconds"), "{out:?}");
}

#[test]
fn monitor_reconnects_after_a_broker_restart() {
    let (mut b, _svc) = echo_broker();
    let mon = b.spawn("zrpc", &["monitor", "echo", "--count", "2", "--json"]);
    let subscribed = |b: &Broker| {
        wait_until(WAIT, || {
            let out = zrpc(b, &["stats", "--json"]);
            out.code == 0 && out.json()["monitors"].as_u64().unwrap_or(0) >= 1
        })
    };
    assert!(subscribed(&b), "the monitor did not subscribe");
    zrpc(&b, &["call", "echo", "echo", "\"before\""]).ok();
    b.restart(libc::SIGTERM);
    assert!(subscribed(&b), "the monitor did not subscribe again");
    // The service reconnects on its own too.
    assert!(
        wait_until(WAIT, || listed(&b).iter().any(|(n, _)| n == "echo")),
        "echo did not come back"
    );
    zrpc(&b, &["call", "echo", "echo", "\"after\""]).ok();
    let (status, out) = mon.output(WAIT);
    assert!(status.is_some_and(|s| s.success()), "{status:?} {out:?}");
    let methods: Vec<Json> = out
        .lines()
        .map(|l| serde_json::from_str::<Json>(l).expect("JSON event")["method"].clone())
        .collect();
    assert_eq!(methods, vec![json!("echo"), json!("echo")], "{out}");
}

/// A user who may not open the socket is told it is a permission problem,
/// not that zrpcd is not running. Needs root (to run `zrpc` as another
/// uid).
#[test]
fn permission_denied_is_reported_as_such() {
    use std::os::unix::process::CommandExt;
    if !zrpc_tests::is_root(
        "permission_denied_is_reported_as_such",
        "needs root to run zrpc as another uid",
    ) {
        return;
    }
    let b = Broker::start_with(&["--socket-mode", "600"]);
    for args in [&["call", "zrpcd", "ping"][..], &["monitor"]] {
        let mut c = b.command("zrpc");
        c.args(args).uid(65534).gid(65534);
        let out = run_cmd(c, None);
        assert_eq!(out.code, 2, "{args:?}: {out:?}");
        assert!(
            out.stderr.contains("a permission problem"),
            "{args:?}: {out:?}"
        );
        assert!(
            !out.stderr.contains("is zrpcd running"),
            "{args:?}: {out:?}"
        );
    }
}

/// What the broker hides from a non-root user about another user's
/// instance (pid, uptime, counts) comes as nil; `zrpc list` shows "-", not
/// "nil" or an uptime of 0.0s. Needs root (to run `zrpc` as another uid).
#[test]
fn list_shows_a_dash_for_what_another_users_instance_hides() {
    use std::os::unix::process::CommandExt;
    if !zrpc_tests::is_root(
        "list_shows_a_dash_for_what_another_users_instance_hides",
        "needs root to run zrpc as another uid",
    ) {
        return;
    }
    let (b, svc) = echo_broker();
    let mut c = b.command("zrpc");
    c.arg("list").uid(65534).gid(65534);
    let out = run_cmd(c, None).ok();
    let line = out
        .stdout
        .lines()
        .find(|l| l.starts_with("echo "))
        .unwrap_or_else(|| panic!("no echo line: {out:?}"));
    assert!(!line.contains("nil"), "{line}");
    assert!(!line.contains("0.0s"), "{line}");
    assert!(
        !line.split_whitespace().any(|w| w == svc.pid().to_string()),
        "another user's pid shown: {line}"
    );
    assert!(line.split_whitespace().any(|w| w == "-"), "{line}");
}

/// A service's error message (another user's text) reaches the terminal
/// with its control characters escaped: no escape sequence, no forged line.
#[test]
fn a_services_error_message_cannot_drive_the_terminal() {
    let (b, _svc) = echo_broker();
    let out = zrpc(
        &b,
        &[
            "call",
            "echo",
            "fail",
            r#""\u001b]0;owned\u0007\u001b[2J\r\nzrpc: call ok""#,
        ],
    );
    assert_ne!(out.code, 0, "{out:?}");
    assert!(out.stderr.contains("owned"), "{out:?}");
    assert!(
        !out.stderr.contains(['\u{1b}', '\u{7}', '\r']),
        "raw control characters: {out:?}"
    );
    assert!(
        !out.stderr.lines().any(|l| l.starts_with("zrpc: call ok")),
        "a forged line: {out:?}"
    );
    // A result carrying them prints as JSON escapes.
    let out = zrpc(&b, &["call", "echo", "echo", r#""\u009b2J\u001b[2J""#]).ok();
    assert!(!out.stdout.contains(['\u{1b}', '\u{9b}']), "{out:?}");
    assert!(out.stdout.contains(r"\u009b2J\u001b[2J"), "{out:?}");
}

/// A result is counted before it is decoded: past `--max-values` values
/// (1,000,000 by default) `zrpc call` refuses it instead of building it in
/// memory (16 MiB of empty arrays took it to 1.96 GB; red-team pass 6).
#[test]
fn a_result_with_too_many_values_is_refused_before_it_is_decoded() {
    let (b, _svc) = echo_broker();
    let out = zrpc(
        &b,
        &["call", "echo", "echo", "[[],[],[]]", "--max-values", "3"],
    );
    assert_eq!(out.code, 10, "{out:?}"); // a limit: PROTOCOL
    assert!(out.stderr.contains("more than 3 values"), "{out:?}");
    assert!(out.stderr.contains("--max-values"), "{out:?}");
    let out = zrpc(
        &b,
        &["call", "echo", "echo", "[[],[],[]]", "--max-values", "4"],
    )
    .ok();
    assert_eq!(
        out.stdout.split_whitespace().collect::<String>(),
        "[[],[],[]]"
    );
    // The default bound, with a payload of 1,000,001 values.
    let many = format!("[{}0]", "0,".repeat(1_000_000));
    let mut c = b.command("zrpc");
    c.args(["call", "echo", "echo", "-", "--json"]);
    let out = run_cmd(c, Some(&many));
    assert_eq!(out.code, 10, "{}", out.stderr);
    assert!(
        out.stderr.contains("more than 1000000 values"),
        "{}",
        out.stderr
    );
}
