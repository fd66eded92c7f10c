//! `zrpc stats --format openmetrics` against a real `zrpcd` with a real
//! service, parsed by a real OpenMetrics parser: Python's
//! `prometheus_client` (`prometheus_client.openmetrics.parser`), which
//! `.ci/run` installs into `target/pyvenv` (the venv of the Python
//! package's tests). Without it the test is
//! skipped with a message on stderr, and fails when `CI=true`.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde_json::Value as Json;
use zrpc_tests::{wait_until, Broker, Proc, WAIT};

/// Parses stdin with the OpenMetrics parser and prints every sample as
/// JSON: [[family, type, sample name, labels, value], ...]. The parser
/// raises on anything that is not valid OpenMetrics (a missing `# EOF`, a
/// counter sample without `_total`, non-cumulative buckets, a bad `le`).
const PARSE: &str = r#"
import json, math, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = []
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        v = s.value if math.isfinite(s.value) else str(s.value)
        out.append([fam.name, fam.type, s.name, s.labels, v])
print(json.dumps(out))
"#;

/// The Python that has `prometheus_client`, if any: `$ZRPC_PYTHON` (as for
/// the Python package's tests), else `target/pyvenv/bin/python`, else
/// `python3` on PATH.
fn parser_python() -> Option<PathBuf> {
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/pyvenv/bin/python");
    let candidates = std::env::var_os("ZRPC_PYTHON")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .into_iter()
        .chain([venv, PathBuf::from("python3")]);
    for py in candidates {
        let ok = Command::new(&py)
            .args(["-c", "import prometheus_client.openmetrics.parser"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Some(py);
        }
    }
    None
}

/// Runs `cmd` to completion (bounded; killed by pid otherwise) with
/// `input` on stdin; returns (success, stdout, stderr).
fn run(mut cmd: Command, input: &str) -> (bool, String, String) {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().expect("spawn");
    let mut p = Proc::adopt(child, "child");
    let mut stdin = p.child.stdin.take().expect("stdin");
    let input = input.to_owned();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(input.as_bytes());
    });
    let read = |r: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut r) = r {
                let _ = r.read_to_string(&mut s);
            }
            s
        })
    };
    let out = read(p.child.stdout.take().map(|o| Box::new(o) as _));
    let err = read(p.child.stderr.take().map(|o| Box::new(o) as _));
    let status = p.wait_exit(WAIT);
    drop(p);
    let _ = writer.join();
    (
        status.is_some_and(|s| s.success()),
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    )
}

fn zrpc(b: &Broker, args: &[&str]) -> String {
    let mut c = b.command("zrpc");
    c.args(args);
    let (ok, out, err) = run(c, "");
    assert!(ok, "zrpc {args:?} failed: {err}");
    out
}

/// The value of the sample named `sample` whose labels include `labels`.
fn sample(parsed: &[Json], sample: &str, labels: &[(&str, &str)]) -> f64 {
    parsed
        .iter()
        .find(|s| s[2] == sample && labels.iter().all(|(k, v)| s[3][k].as_str() == Some(v)))
        .and_then(|s| s[4].as_f64())
        .unwrap_or_else(|| panic!("no sample {sample} {labels:?}"))
}

#[test]
fn openmetrics_export_parses_and_counts_the_calls() {
    let Some(python) = parser_python() else {
        let msg = "prometheus_client (Python) is not installed: the OpenMetrics export is not \
                   checked by a parser. .ci/run installs it into target/pyvenv \
                   (python3 -m venv target/pyvenv && target/pyvenv/bin/pip install prometheus_client)";
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{msg}");
        }
        eprintln!("SKIPPED openmetrics_export_parses_and_counts_the_calls: {msg}");
        return;
    };
    let b = Broker::start();
    let _svc = b.spawn("zrpc-test-svc", &[]);
    assert!(
        wait_until(WAIT, || zrpc(&b, &["list"]).contains("echo")),
        "echo registered"
    );
    for _ in 0..5 {
        zrpc(&b, &["call", "echo", "echo", "1"]);
    }
    let mut c = b.command("zrpc");
    c.args(["call", "echo", "fail", "\"x\""]);
    let (ok, _, _) = run(c, "");
    assert!(!ok, "fail fails");

    let text = zrpc(&b, &["stats", "--format", "openmetrics"]);
    assert!(text.ends_with("# EOF\n"), "{text}");
    assert_eq!(
        zrpc(&b, &["stats", "--format", "prometheus"])
            .lines()
            .filter(|l| l.starts_with("# TYPE"))
            .count(),
        text.lines().filter(|l| l.starts_with("# TYPE")).count(),
        "prometheus is an alias"
    );

    let mut py = Command::new(&python);
    py.args(["-c", PARSE]);
    let (ok, out, err) = run(py, &text);
    assert!(
        ok,
        "the OpenMetrics parser refused the export: {err}\n{text}"
    );
    let parsed: Vec<Json> = serde_json::from_str(&out).expect("parser output");
    let parsed = parsed.as_slice();

    let family_type = |fam: &str| {
        parsed
            .iter()
            .find(|s| s[0] == fam)
            .and_then(|s| s[1].as_str())
            .unwrap_or_else(|| panic!("no family {fam}"))
            .to_string()
    };
    assert_eq!(family_type("zrpc_service_latency_seconds"), "histogram");
    assert_eq!(family_type("zrpc_calls"), "counter");
    assert_eq!(family_type("zrpc_connections"), "gauge");
    assert_eq!(family_type("zrpc_connections_open"), "gauge");
    // The test's own connection at least, and never fewer sockets than
    // live connections.
    assert!(
        sample(parsed, "zrpc_connections_open", &[]) >= sample(parsed, "zrpc_connections", &[])
    );
    assert!(sample(parsed, "zrpc_connections_open", &[]) >= 1.0);

    let echo = [("service", "echo")];
    // 6 calls answered by the service, one of them with its own error.
    assert_eq!(sample(parsed, "zrpc_service_calls_total", &echo), 6.0);
    assert_eq!(sample(parsed, "zrpc_service_errors_total", &echo), 1.0);
    assert_eq!(
        sample(parsed, "zrpc_errors_total", &[("code", "remote")]),
        1.0
    );
    assert!(sample(parsed, "zrpc_calls_total", &[]) >= 6.0);
    let count = sample(parsed, "zrpc_service_latency_seconds_count", &echo);
    assert_eq!(count, 6.0);
    let sum = sample(parsed, "zrpc_service_latency_seconds_sum", &echo);
    assert!(sum > 0.0 && sum < 6.0 * WAIT.as_secs_f64(), "{sum}");
    let inf = sample(
        parsed,
        "zrpc_service_latency_seconds_bucket",
        &[("service", "echo"), ("le", "+Inf")],
    );
    assert_eq!(inf, count);
    // Buckets are cumulative (the parser checks it too) and the 60 s
    // bucket holds every call of this test.
    let le60 = sample(
        parsed,
        "zrpc_service_latency_seconds_bucket",
        &[("service", "echo"), ("le", "60.0")],
    );
    assert_eq!(le60, count);

    // The last minute holds all of them too.
    let recent = [("service", "echo"), ("window", "60s")];
    assert_eq!(sample(parsed, "zrpc_service_recent_calls", &recent), 6.0);
    assert_eq!(sample(parsed, "zrpc_service_recent_errors", &recent), 1.0);
    let p50 = sample(
        parsed,
        "zrpc_service_recent_latency_seconds",
        &[("service", "echo"), ("quantile", "0.5")],
    );
    let p99 = sample(
        parsed,
        "zrpc_service_recent_latency_seconds",
        &[("service", "echo"), ("quantile", "0.99")],
    );
    assert!(0.0 < p50 && p50 <= p99, "{p50} {p99}");
}
