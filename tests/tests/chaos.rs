//! The chaos test in CI size: `zrpc-chaos run` (see its docs) for a bounded
//! time. Run it longer by hand with
//! `cargo build --workspace && target/debug/zrpc-chaos run --duration 300`.

use zrpc_tests::{bin, Proc, WAIT};

#[test]
fn chaos_loses_no_call_and_executes_none_twice() {
    let mut c = std::process::Command::new(bin("zrpc-chaos"));
    c.args([
        "run",
        "--duration",
        "12",
        "--clients",
        "3",
        "--concurrency",
        "4",
    ]);
    let (status, out) = Proc::spawn("zrpc-chaos", c).output(WAIT * 6);
    println!("{out}");
    assert!(out.contains("chaos: PASS"), "chaos test failed:\n{out}");
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
}

/// `zrpc-chaos run --help` prints its usage and exits; it does not start a
/// chaos run.
#[test]
fn chaos_help_does_not_start_a_run() {
    let mut c = std::process::Command::new(bin("zrpc-chaos"));
    c.args(["run", "--help"]);
    let (status, out) = Proc::spawn("zrpc-chaos", c).output(WAIT);
    assert!(status.is_some_and(|s| s.success()), "{status:?}\n{out}");
    assert!(out.contains("Usage: zrpc-chaos run"), "{out}");
    assert!(!out.contains("chaos: seed"), "{out}");
}
