//! zrpcd reports panics through its log (`zrpcd::log`), in the log's
//! format, and they unwind as before. The test runs itself again as a
//! child process (the hook and the subscriber are the process's) with the
//! daemon's logging installed, and reads what the child wrote on stderr.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Set in the child's environment.
const CHILD: &str = "ZRPCD_PANIC_LOG_CHILD";
const TEST: &str = "panics_are_logged_in_the_daemons_format_and_unwind_as_before";

/// Writes a line on stdout at once (not through the test harness's
/// capture).
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// The child: the daemon's logging, then a panic in a named thread, in a
/// task of a runtime like the daemon's, and in the test's own thread.
fn child() {
    zrpcd::log::init("info");
    let thread = std::thread::Builder::new()
        .name("worker".into())
        .spawn(|| panic!("deliberate panic in a thread"))
        .expect("spawn");
    if thread.join().is_err() {
        say("the thread unwound");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let local = tokio::task::LocalSet::new();
    let r = local.block_on(&rt, async {
        tokio::task::spawn_local(async { panic!("deliberate panic in a task: {}", 42) }).await
    });
    if r.is_err_and(|e| e.is_panic()) {
        say("tokio caught the task's panic");
    }
    panic!("deliberate panic in the test's thread");
}

#[test]
fn panics_are_logged_in_the_daemons_format_and_unwind_as_before() {
    if std::env::var_os(CHILD).is_some() {
        child();
        return;
    }
    let exe = std::env::current_exe().expect("current_exe");
    let mut c = Command::new(exe)
        .args(["--exact", TEST, "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the child");
    let mut pipes = (
        c.stdout.take().expect("stdout"),
        c.stderr.take().expect("stderr"),
    );
    let reader = std::thread::spawn(move || {
        let (mut out, mut err) = (String::new(), String::new());
        let _ = pipes.0.read_to_string(&mut out);
        let _ = pipes.1.read_to_string(&mut err);
        (out, err)
    });
    let until = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = c.try_wait().expect("try_wait") {
            break Some(st);
        }
        if Instant::now() >= until {
            // SAFETY: kill(2) of our own child, by its pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGKILL) };
            let _ = c.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let (out, err) = reader.join().expect("reader");
    let status = status.unwrap_or_else(|| panic!("the child did not end\n{out}\n{err}"));
    let all = format!("stdout:\n{out}\nstderr:\n{err}");

    // Unwinding as before: a thread's panic ends the thread, tokio catches
    // a task's, and the panic of the test's thread fails the test (101).
    assert!(out.contains("the thread unwound"), "{all}");
    assert!(out.contains("tokio caught the task's panic"), "{all}");
    assert_eq!(status.code(), Some(101), "{all}");
    // Each panic is one ERROR event of the log, with its message, its
    // location and its thread; Rust's default report is not printed.
    for (message, thread) in [
        ("deliberate panic in a thread", "worker"),
        ("deliberate panic in a task: 42", ""),
        ("deliberate panic in the test's thread", ""),
    ] {
        let line = err
            .lines()
            .find(|l| l.contains(message))
            .unwrap_or_else(|| panic!("{message:?} not logged\n{all}"));
        assert!(
            line.contains(" ERROR zrpcd: panicked (a bug in zrpcd or a library it uses): ")
                && line.contains("location=zrpcd/tests/panic_log.rs:")
                && line.contains(&format!("thread=\"{thread}")),
            "not in the log's format: {line}\n{all}"
        );
    }
    assert!(!err.contains("panicked at"), "the default report: {all}");
}
