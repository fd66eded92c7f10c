//! Support for the end-to-end tests: start the real `zrpcd` binary and real
//! helper processes in a fresh socket directory, wait on conditions with a
//! bound, and kill every process by its pid when the test ends.

#![warn(missing_docs)]

pub mod fuse;
pub mod nats;
pub mod raw;
pub mod typed;

/// Every `rust` code block of the README, compiled as a doc-test (`no_run`:
/// they need a broker), so that the README's code cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Default bound for waits in tests.
pub const WAIT: Duration = Duration::from_secs(20);

/// Polls `cond` every few milliseconds until it is true or `bound` passes.
/// Returns whether it became true.
pub fn wait_until(bound: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if start.elapsed() > bound {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Says loudly that `test` did not run, and why. Straight to the
/// process's stderr: the test harness hides what a passing test prints
/// with `eprintln!`, and a skip must be seen.
pub fn skipped(test: &str, why: &str) {
    let bar = "!".repeat(72);
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!("\n{bar}\n!!! SKIPPED {test}: {why}\n{bar}\n").as_bytes(),
    );
}

/// Whether the tests run as root, which `test` needs (`why`: "needs root
/// to run processes as another uid", say). If they do not, the test is
/// [`skipped`], saying so; under CI (`CI=true`), which runs the tests as
/// root, it fails instead, so that a test needing root never passes there
/// without running.
pub fn is_root(test: &str, why: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{test} {why}, and CI must run the tests as root"
    );
    skipped(test, why);
    false
}

/// Directory holding the workspace's built binaries (`target/debug`).
pub fn bin_dir() -> PathBuf {
    // Test executables live in target/<profile>/deps/, binaries (such as
    // zrpc-chaos) in target/<profile>/.
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("exe dir");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().expect("profile dir").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// A multi-thread tokio runtime with two workers, timers and I/O: the one
/// an async client in a test runs on (its tasks keep running while the
/// test thread waits outside the runtime).
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Path of a workspace binary, with a clear message if it is not built.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is not built; run the tests with `cargo test --workspace` (which builds every binary)",
        p.display()
    );
    p
}

/// A fresh temporary socket directory, removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates a unique directory under the system temp dir.
    pub fn new() -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let p = std::env::temp_dir().join(format!(
            "zrpc-t{}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed),
            nanos % 100_000
        ));
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }

    /// The path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Default for TempDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process killed (SIGKILL, by pid) and reaped on drop.
#[derive(Debug)]
pub struct Proc {
    /// The child.
    pub child: Child,
    /// A name for messages.
    pub name: String,
    /// Its stdout once [`Proc::read_until`] read it, buffered across calls
    /// (a reader made per call would drop the lines it read ahead).
    out: Option<BufReader<std::process::ChildStdout>>,
}

impl Proc {
    /// Spawns `cmd` with stdout piped (read it with [`Proc::read_until`] or [`Proc::output`])
    /// and stderr inherited (shown by the test harness on failure).
    pub fn spawn(name: &str, mut cmd: Command) -> Proc {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc::adopt(child, name)
    }

    /// Takes charge of a child spawned elsewhere (killed by pid on drop;
    /// its stdout, if piped, is what [`Proc::read_until`] reads).
    pub fn adopt(child: Child, name: &str) -> Proc {
        Proc {
            child,
            name: name.to_string(),
            out: None,
        }
    }

    /// The process id.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Its resident memory (`VmRSS`), in KiB.
    pub fn rss_kib(&self) -> u64 {
        self.status_kib("VmRSS:")
    }

    /// The most resident memory it has had (`VmHWM`), in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        self.status_kib("VmHWM:")
    }

    fn status_kib(&self, field: &str) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("status");
        s.lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc/{}/status", self.pid()))
    }

    /// Sends a signal.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) with our own child's pid.
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    /// Stops the process (`SIGSTOP`) and waits (bounded by [`WAIT`]) until
    /// the kernel shows it stopped; returns whether it did. A stopped
    /// broker keeps its connections and its listen backlog but reads
    /// nothing: a wedged broker, as its peers see it.
    pub fn stop(&self) -> bool {
        self.signal(libc::SIGSTOP);
        let stat = format!("/proc/{}/stat", self.pid());
        wait_until(WAIT, || {
            std::fs::read_to_string(&stat).is_ok_and(|s| {
                s.rsplit_once(')')
                    .is_some_and(|(_, rest)| rest.trim_start().starts_with('T'))
            })
        })
    }

    /// Waits (bounded) for the process to exit; returns its exit status.
    pub fn wait_exit(&mut self, bound: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            if start.elapsed() > bound {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Reads lines from stdout until one satisfies `pred` (bounded by the
    /// child's lifetime; the caller keeps its own bound by killing it).
    pub fn read_until(&mut self, pred: impl Fn(&str) -> bool) -> Option<String> {
        if self.out.is_none() {
            self.out = self.child.stdout.take().map(BufReader::new);
        }
        let r = self.out.as_mut()?;
        let mut line = String::new();
        loop {
            line.clear();
            match r.read_line(&mut line) {
                Ok(0) | Err(_) => return None,
                Ok(_) if pred(line.trim_end()) => return Some(line.trim_end().to_string()),
                Ok(_) => {}
            }
        }
    }

    /// Collects all of stdout until the process exits, with a bound: the
    /// process is killed if it runs longer.
    pub fn output(mut self, bound: Duration) -> (Option<std::process::ExitStatus>, String) {
        let mut stdout = self
            .out
            .take()
            .or_else(|| self.child.stdout.take().map(BufReader::new));
        let reader = std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(o) = stdout.as_mut() {
                let _ = std::io::Read::read_to_string(o, &mut s);
            }
            s
        });
        let status = self.wait_exit(bound);
        if status.is_none() {
            self.signal(libc::SIGKILL);
        }
        let out = reader.join().unwrap_or_default();
        (status, out)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.signal(libc::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

/// A running `zrpcd` in its own temporary socket directory.
#[derive(Debug)]
pub struct Broker {
    /// The broker process.
    pub proc: Proc,
    /// Its socket directory.
    pub dir: TempDir,
    /// Extra flags it was started with.
    pub args: Vec<String>,
    /// The file its log (standard error) goes to, if not the test's
    /// standard error ([`Broker::start_logged`]).
    pub log: Option<PathBuf>,
}

impl Broker {
    /// Starts `zrpcd` in a fresh directory and waits until it accepts.
    pub fn start() -> Broker {
        Self::start_with(&[])
    }

    /// Same, with extra command-line flags.
    pub fn start_with(args: &[&str]) -> Broker {
        Self::start_in(TempDir::new(), args, None)
    }

    /// Same, with the broker's log (its standard error) written to a file
    /// in its socket directory instead of the test's standard error, kept
    /// across restarts: read it with [`Broker::log`], to wait for a line.
    pub fn start_logged(args: &[&str]) -> Broker {
        let dir = TempDir::new();
        let log = dir.path().join("zrpcd.log");
        Self::start_in(dir, args, Some(log))
    }

    fn start_in(dir: TempDir, args: &[&str], log: Option<PathBuf>) -> Broker {
        let proc = spawn_broker(dir.path(), args, log.as_deref());
        let mut b = Broker {
            proc,
            dir,
            args: args.iter().map(|s| s.to_string()).collect(),
            log,
        };
        b.wait_ready();
        b
    }

    /// What the broker has logged so far, if started with
    /// [`Broker::start_logged`] (else nothing).
    pub fn log(&self) -> String {
        self.log
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    /// Kills the broker with `sig`, waits for it, and starts it again on the
    /// same directory.
    pub fn restart(&mut self, sig: i32) {
        self.proc.signal(sig);
        assert!(self.proc.wait_exit(WAIT).is_some(), "broker did not exit");
        self.respawn();
    }

    /// Starts the broker again on the same directory (after the previous
    /// process exited) and waits until it accepts.
    pub fn respawn(&mut self) {
        let args: Vec<&str> = self.args.iter().map(|s| s.as_str()).collect();
        self.proc = spawn_broker(self.dir.path(), &args, self.log.as_deref());
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let sock = self.socket();
        let child = &mut self.proc.child;
        let mut exited = None;
        let up = wait_until(WAIT, || {
            if let Ok(Some(st)) = child.try_wait() {
                exited = Some(st);
                return true;
            }
            UnixStream::connect(&sock).is_ok()
        });
        if let Some(st) = exited {
            panic!("zrpcd exited at start-up ({st}); see its stderr above");
        }
        assert!(up, "zrpcd did not start listening on {}", sock.display());
    }

    /// The socket directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The socket path.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("zrpcd.sock")
    }

    /// A command for a workspace binary with `ZRPC_SOCKET_DIR` set to this
    /// broker's directory.
    pub fn command(&self, name: &str) -> Command {
        let mut c = Command::new(bin(name));
        c.env("ZRPC_SOCKET_DIR", self.dir());
        c
    }

    /// Starts a workspace binary against this broker.
    pub fn spawn(&self, name: &str, args: &[&str]) -> Proc {
        let mut c = self.command(name);
        c.args(args);
        Proc::spawn(name, c)
    }
}

fn spawn_broker(dir: &Path, args: &[&str], log: Option<&Path>) -> Proc {
    let mut c = Command::new(bin("zrpcd"));
    c.arg("--socket-dir").arg(dir).args(args);
    if args.contains(&"--log") {
        // The test's own filter (`RUST_LOG` would override it).
        c.env_remove("RUST_LOG");
    } else {
        c.env(
            "RUST_LOG",
            std::env::var("ZRPC_TEST_LOG").unwrap_or_else(|_| "warn".into()),
        );
    }
    let Some(log) = log else {
        return Proc::spawn("zrpcd", c);
    };
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", log.display()));
    c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(file);
    let child = c
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start zrpcd: {e}"));
    Proc::adopt(child, "zrpcd")
}

/// Waits (bounded by [`WAIT`]) until the broker in `dir` lists `name` with
/// exactly `instances` instances.
pub fn wait_registered(dir: &Path, name: &str, instances: usize) {
    let client = zrpc_client::BlockingClient::connect_to(dir).expect("connect to zrpcd");
    let ok = wait_until(WAIT, || {
        let list: Result<rmpv::Value, _> =
            client.call("zrpcd", "list", &(), Some(Duration::from_secs(5)));
        let Ok(rmpv::Value::Array(entries)) = list else {
            return false;
        };
        let count = |e: &rmpv::Value| {
            let field = |k: &str| {
                e.as_map()
                    .and_then(|m| m.iter().find(|(key, _)| key.as_str() == Some(k)))
                    .map(|(_, v)| v.clone())
            };
            if field("name")
                .and_then(|v| v.as_str().map(str::to_string))
                .as_deref()
                == Some(name)
            {
                field("instances").and_then(|v| v.as_array().map(|a| a.len()))
            } else {
                None
            }
        };
        // A name without instances is not listed at all.
        entries.iter().find_map(count).unwrap_or(0) == instances
    });
    assert!(
        ok,
        "service {name:?} did not register {instances} instance(s)"
    );
}

/// Reads one counter from the broker's `zrpcd.stats`.
pub fn broker_stat(dir: &Path, key: &str) -> u64 {
    let client = zrpc_client::BlockingClient::connect_to(dir).expect("connect to zrpcd");
    let stats: rmpv::Value = client
        .call("zrpcd", "stats", &(), Some(Duration::from_secs(5)))
        .expect("zrpcd.stats");
    stats
        .as_map()
        .and_then(|m| m.iter().find(|(k, _)| k.as_str() == Some(key)))
        .and_then(|(_, v)| v.as_u64())
        .unwrap_or_else(|| panic!("no counter {key:?} in {stats}"))
}
