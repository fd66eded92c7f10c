//! Small helpers shared by every role: clocks, `/proc` readers, resource
//! limits, percentiles, child processes and the line protocol between the
//! orchestrator and its children.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

/// Nanoseconds of `CLOCK_MONOTONIC`: comparable between processes of one
/// machine (used to combine the start and end times of several clients).
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to fill in.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Raises this process's `RLIMIT_NOFILE` soft limit to the hard limit (and
/// the hard limit to `want` when we are allowed to). Returns the new soft
/// limit.
pub fn raise_nofile(want: u64) -> u64 {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `rl` is a valid rlimit for getrlimit to fill in.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) };
    if rl.rlim_max < want {
        let up = libc::rlimit {
            rlim_cur: want,
            rlim_max: want,
        };
        // SAFETY: plain syscall on a valid struct; failure is handled below.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &up) } == 0 {
            return want;
        }
    }
    rl.rlim_cur = rl.rlim_max.min(want.max(rl.rlim_cur));
    // SAFETY: as above.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &rl) };
    rl.rlim_cur
}

/// `VmRSS` of a process, in bytes.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Percentile (0..=100) of a sorted slice.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let idx = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// What one client process measured (all times in nanoseconds).
#[derive(Debug, Clone, Copy, Default)]
pub struct ClientResult {
    /// Calls completed in the measured phase.
    pub calls: u64,
    /// `mono_ns` when measuring began.
    pub start: u64,
    /// `mono_ns` when the last call finished.
    pub end: u64,
    /// Median round trip.
    pub p50: u64,
    /// 99th percentile round trip.
    pub p99: u64,
    /// CPU time (user + system, all threads) the client used in the
    /// measured phase, in milliseconds, when it reports it.
    pub cpu_ms: Option<u64>,
}

impl ClientResult {
    /// Builds the result from raw latencies.
    pub fn from_latencies(mut lat: Vec<u64>, start: u64, end: u64) -> Self {
        lat.sort_unstable();
        ClientResult {
            calls: lat.len() as u64,
            start,
            end,
            p50: percentile(&lat, 50.0),
            p99: percentile(&lat, 99.0),
            cpu_ms: None,
        }
    }

    /// The same with the client's CPU time in the measured phase.
    pub fn with_cpu(mut self, cpu_seconds: f64) -> Self {
        self.cpu_ms = Some((cpu_seconds * 1e3).round() as u64);
        self
    }

    /// The line a client prints on stdout.
    pub fn to_line(self) -> String {
        let line = format!(
            "result {} {} {} {} {}",
            self.calls, self.start, self.end, self.p50, self.p99
        );
        match self.cpu_ms {
            Some(ms) => format!("{line} {ms}"),
            None => line,
        }
    }

    /// Parses [`ClientResult::to_line`].
    pub fn parse(line: &str) -> Option<Self> {
        let mut it = line.strip_prefix("result ")?.split_whitespace();
        let mut next = || it.next()?.parse::<u64>().ok();
        Some(ClientResult {
            calls: next()?,
            start: next()?,
            end: next()?,
            p50: next()?,
            p99: next()?,
            cpu_ms: next(),
        })
    }
}

/// The child side of the start barrier: prints `ready`, waits for a line on
/// stdin.
pub fn barrier() {
    println!("ready");
    let _ = std::io::stdout().flush();
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
}

/// The measured phase of an async client: the start barrier, then `run`
/// (a future, so nothing runs before the barrier) timed, with this
/// process's CPU time over it; prints the result line.
pub async fn measured(run: impl std::future::Future<Output = Vec<u64>>) {
    barrier();
    let cpu0 = crate::guard::cpu_seconds(std::process::id());
    let start = mono_ns();
    let lat = run.await;
    let end = mono_ns();
    let cpu = crate::guard::cpu_seconds(std::process::id()) - cpu0;
    println!(
        "{}",
        ClientResult::from_latencies(lat, start, end)
            .with_cpu(cpu)
            .to_line()
    );
}

/// Waits until stdin is closed (the orchestrator ends a holding role that
/// way, or kills it).
pub fn hold() {
    let mut line = String::new();
    while std::io::stdin().read_line(&mut line).is_ok_and(|n| n > 0) {
        line.clear();
    }
}

/// A child process of the benchmark. Killed (by pid) and reaped on drop.
pub struct Proc {
    /// What it is, for messages.
    pub what: String,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Option<BufReader<ChildStdout>>,
}

/// How to start a child.
pub struct Spawn {
    cmd: Command,
    what: String,
}

impl Spawn {
    /// Re-executes this benchmark binary with `args` (a hidden role).
    pub fn role(args: &[&str]) -> Spawn {
        let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("zrpc-bench"));
        let mut cmd = Command::new(exe);
        cmd.args(args);
        Spawn {
            cmd,
            what: args.first().copied().unwrap_or("child").to_string(),
        }
    }

    /// Runs another program.
    pub fn program(path: &Path, args: &[&str], what: &str) -> Spawn {
        let mut cmd = Command::new(path);
        cmd.args(args);
        Spawn {
            cmd,
            what: what.to_string(),
        }
    }

    /// Sets an environment variable of the child.
    pub fn env(mut self, key: &str, value: &str) -> Spawn {
        self.cmd.env(key, value);
        self
    }

    /// Starts the child with `RLIMIT_NOFILE` raised to `n` (as far as the
    /// hard limit, or beyond it when we may).
    pub fn nofile(mut self, n: u64) -> Spawn {
        // SAFETY: the closure only calls async-signal-safe getrlimit/setrlimit.
        unsafe {
            self.cmd.pre_exec(move || {
                let _ = raise_nofile(n);
                Ok(())
            });
        }
        self
    }

    /// Starts it with piped stdin/stdout and inherited stderr.
    pub fn start(mut self) -> std::io::Result<Proc> {
        let mut child = self
            .cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().map(BufReader::new);
        Ok(Proc {
            what: self.what,
            child,
            stdin,
            stdout,
        })
    }
}

impl Proc {
    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Reads one line of the child's stdout (without the newline).
    pub fn line(&mut self) -> Result<String, String> {
        let mut s = String::new();
        let out = self
            .stdout
            .as_mut()
            .ok_or_else(|| format!("{}: no stdout", self.what))?;
        match out.read_line(&mut s) {
            Ok(0) => Err(format!("{} exited early", self.what)),
            Ok(_) => Ok(s.trim_end().to_string()),
            Err(e) => Err(format!("{}: {e}", self.what)),
        }
    }

    /// Reads lines until one equals `want`.
    pub fn expect(&mut self, want: &str) -> Result<(), String> {
        loop {
            let l = self.line()?;
            if l == want {
                return Ok(());
            }
            if let Some(e) = l.strip_prefix("error ") {
                return Err(format!("{}: {e}", self.what));
            }
        }
    }

    /// Reads lines until a `result` line.
    pub fn result(&mut self) -> Result<ClientResult, String> {
        loop {
            let l = self.line()?;
            if let Some(r) = ClientResult::parse(&l) {
                return Ok(r);
            }
            if let Some(e) = l.strip_prefix("error ") {
                return Err(format!("{}: {e}", self.what));
            }
        }
    }

    /// Writes a line to the child's stdin.
    pub fn send(&mut self, line: &str) {
        if let Some(i) = self.stdin.as_mut() {
            let _ = writeln!(i, "{line}");
            let _ = i.flush();
        }
    }

    /// Waits for the child to exit by itself (bounded), then kills it.
    pub fn finish(mut self, within: Duration) {
        self.stdin.take();
        let until = Instant::now() + within;
        while Instant::now() < until {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) on the pid of our own unreaped child.
            unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGKILL) };
        }
        let _ = self.child.wait();
    }
}

/// Prints an error line for the orchestrator and exits.
pub fn die(msg: impl std::fmt::Display) -> ! {
    println!("error {msg}");
    let _ = std::io::stdout().flush();
    eprintln!("zrpc-bench: {msg}");
    std::process::exit(1);
}
