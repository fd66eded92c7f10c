//! Runs the Python package's pytest suite (`python/tests`) against the
//! zrpcd and example binaries of this build, so that `cargo test
//! --workspace` covers the Python library too.
//!
//! The interpreter is `$ZRPC_PYTHON`, else `target/pyvenv/bin/python` (made
//! by `.ci/run`; see the README's "Tests"), else `python3`. It needs
//! `msgpack` and `pytest`; without them the test prints a loud SKIPPED
//! message, and fails when `CI=true` (a skipped Python suite never passes
//! silently in CI).

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn interpreter() -> PathBuf {
    if let Some(p) = std::env::var_os("ZRPC_PYTHON").filter(|p| !p.is_empty()) {
        return p.into();
    }
    let venv = zrpc_tests::bin_dir()
        .parent()
        .expect("target dir")
        .join("pyvenv/bin/python");
    if venv.exists() {
        return venv;
    }
    "python3".into()
}

#[test]
fn python_package_pytest_suite() {
    let python = interpreter();
    let probe = Command::new(&python)
        .args(["-c", "import msgpack, pytest"])
        .output();
    let usable = matches!(&probe, Ok(o) if o.status.success());
    if !usable {
        let why = match &probe {
            Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_string(),
            Err(e) => e.to_string(),
        };
        let msg = format!(
            "\n\n********************************************************************\n\
             SKIPPED python_package_pytest_suite: {} cannot import msgpack and pytest ({why}).\n\
             Make the venv: python3 -m venv target/pyvenv && target/pyvenv/bin/pip install msgpack pytest ./python\n\
             (or set $ZRPC_PYTHON to an interpreter that has them)\n\
             ********************************************************************\n",
            python.display()
        );
        // Straight to stderr, not through eprintln!: the test harness
        // captures the output of passing tests, and this must be seen.
        let _ = std::io::Write::write_all(&mut std::io::stderr(), msg.as_bytes());
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("the Python suite cannot run in CI: {msg}");
        }
        return;
    }
    let python_dir = repo().join("python");
    let out = Command::new(&python)
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"])
        .current_dir(&python_dir)
        .env("ZRPCD", zrpc_tests::bin("zrpcd"))
        .env("PYTHONPATH", &python_dir)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env_remove("ZRPC_SOCKET_DIR")
        .output()
        .expect("run pytest");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "the Python suite failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(
        stdout.contains(" passed"),
        "pytest ran no tests:\n{stdout}\n{stderr}"
    );
    // A Python test that needs root says so as a pytest skip: its summary
    // goes where it is seen (the harness hides a passing test's output).
    if let Some(summary) = stdout.lines().rev().find(|l| l.contains(" skipped")) {
        zrpc_tests::skipped("some Python tests", summary.trim());
    }
}
