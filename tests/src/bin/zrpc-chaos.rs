//! The chaos test: a broker, several services (two instances of one name)
//! and several client processes making calls with a nonce in each payload,
//! while a driver kills service instances (SIGKILL) and restarts them, and
//! restarts the broker (SIGKILL and SIGTERM).
//!
//! ```text
//! zrpc-chaos run [--duration SECS] [--clients N] [--concurrency K] [--timeout-ms MS] [--seed N]
//! ```
//!
//! At the end it prints totals: calls issued, answered, failed by error
//! kind, executed twice in one service process, answered with another call's
//! nonce, unanswered past their deadline plus a slack, and the broker's peak
//! RSS. It exits 1 if any of the must-be-zero counts is not zero.
//!
//! Roles (the binary re-executes itself): `service --name N [--shared] --log FILE`
//! and `client --duration SECS --concurrency K --timeout-ms MS`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use clap::Parser;
use zrpc_client::{Client, Value};
use zrpc_service::{Context, Server, ServiceBuilder};
use zrpc_tests::{bin, wait_registered, wait_until, Proc, TempDir, WAIT};

/// Extra time past a call's deadline before it counts as "unanswered".
const SLACK: Duration = Duration::from_secs(3);

/// The chaos test: a broker, services and clients under SIGKILL/SIGTERM.
#[derive(Debug, Parser)]
#[command(name = "zrpc-chaos")]
enum Cmd {
    /// Run the whole chaos test and print its totals (exit 1 if a
    /// must-be-zero count is not zero).
    Run(RunArgs),
    /// Role: a service logging every execution (started by `run`).
    Service(ServiceArgs),
    /// Role: a client process making calls (started by `run`).
    Client(ClientArgs),
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Seconds of chaos.
    #[arg(long, default_value_t = 20.0)]
    duration: f64,
    /// Client processes.
    #[arg(long, default_value_t = 3)]
    clients: u32,
    /// Calls in flight per client process.
    #[arg(long, default_value_t = 4)]
    concurrency: u32,
    /// Timeout of each call, in milliseconds.
    #[arg(long, default_value_t = 4000)]
    timeout_ms: u64,
    /// Seed of the chaos schedule (default: from the pid).
    #[arg(long)]
    seed: Option<u64>,
}

#[derive(Debug, clap::Args)]
struct ServiceArgs {
    /// Name to serve.
    #[arg(long, default_value = "chaos_a")]
    name: String,
    /// Register the name as shared.
    #[arg(long)]
    shared: bool,
    /// File that gets one line per execution.
    #[arg(long, default_value = "/dev/null")]
    log: PathBuf,
}

#[derive(Debug, clap::Args)]
struct ClientArgs {
    /// Seconds to keep calling.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Calls in flight.
    #[arg(long, default_value_t = 4)]
    concurrency: u64,
    /// Timeout of each call, in milliseconds.
    #[arg(long, default_value_t = 4000)]
    timeout_ms: u64,
}

fn main() {
    match Cmd::parse() {
        Cmd::Run(a) => std::process::exit(run(&a)),
        Cmd::Service(a) => service(a),
        Cmd::Client(a) => client(&a),
    }
}

/// A service that logs every execution (one nonce per line, in a file of
/// its own process) and answers with the nonce after a short pause.
fn service(args: ServiceArgs) {
    let ServiceArgs { name, shared, log } = args;
    let svc = ServiceBuilder::new(name)
        .async_method("nonce", move |_ctx: Context, nonce: String| {
            let log = log.clone();
            async move {
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .map_err(|e| e.to_string())?;
                writeln!(f, "{nonce}").map_err(|e| e.to_string())?;
                // Widen the window in which kills hit calls in flight.
                let pause = nonce.bytes().fold(0u64, |a, b| a.wrapping_add(b as u64)) % 20;
                tokio::time::sleep(Duration::from_millis(pause)).await;
                Ok::<_, String>(nonce)
            }
        })
        .build();
    if let Err(e) = Server::new(svc).shared(shared).run() {
        eprintln!("zrpc-chaos service: {e}");
        std::process::exit(1);
    }
}

#[derive(Debug, Default)]
struct Tally {
    issued: u64,
    answered: u64,
    mismatched: u64,
    late: u64,
    errors: BTreeMap<String, u64>,
}

/// A client process: `--concurrency` tasks calling until `--duration` ends.
fn client(args: &ClientArgs) {
    let duration = Duration::try_from_secs_f64(args.duration).unwrap_or(Duration::ZERO);
    let concurrency = args.concurrency;
    let timeout = Duration::from_millis(args.timeout_ms);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let tally = rt.block_on(async move {
        let client = Client::connect().await.expect("connect to zrpcd");
        let end = Instant::now() + duration;
        let pid = std::process::id();
        let mut tasks = Vec::new();
        for task in 0..concurrency {
            let client = client.clone();
            tasks.push(tokio::spawn(async move {
                let mut t = Tally::default();
                let mut seq = 0u64;
                while Instant::now() < end {
                    seq += 1;
                    let nonce = format!("{pid}-{task}-{seq}");
                    let service = if seq % 3 == 0 { "chaos_b" } else { "chaos_a" };
                    let start = Instant::now();
                    t.issued += 1;
                    let r: Result<Value, _> =
                        client.call(service, "nonce", &nonce, Some(timeout)).await;
                    if start.elapsed() > timeout + SLACK {
                        t.late += 1;
                    }
                    match r {
                        Ok(v) if v.as_str() == Some(nonce.as_str()) => t.answered += 1,
                        Ok(_) => t.mismatched += 1,
                        Err(e) => {
                            let kind = e.code().map_or_else(
                                || {
                                    format!("{e:?}")
                                        .split([' ', '(', '{'])
                                        .next()
                                        .unwrap_or("other")
                                        .to_lowercase()
                                },
                                |c| c.as_str().to_string(),
                            );
                            *t.errors.entry(kind).or_default() += 1;
                        }
                    }
                }
                t
            }));
        }
        let mut total = Tally::default();
        for t in tasks {
            if let Ok(t) = t.await {
                total.issued += t.issued;
                total.answered += t.answered;
                total.mismatched += t.mismatched;
                total.late += t.late;
                for (k, v) in t.errors {
                    *total.errors.entry(k).or_default() += v;
                }
            }
        }
        total
    });
    let errors: Vec<String> = tally
        .errors
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    println!(
        "RESULT issued={} answered={} mismatched={} late={} errors={}",
        tally.issued,
        tally.answered,
        tally.mismatched,
        tally.late,
        errors.join(",")
    );
}

/// xorshift64*: enough randomness for choosing what to kill.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

struct Svc {
    name: &'static str,
    shared: bool,
    proc: Proc,
}

struct Chaos {
    dir: TempDir,
    logs: PathBuf,
    broker: Proc,
    broker_peak_kib: u64,
    services: Vec<Svc>,
}

fn peak_rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn spawn_broker(dir: &Path) -> Proc {
    let mut c = Command::new(bin("zrpcd"));
    c.arg("--socket-dir")
        .arg(dir)
        .args(["--heartbeat-interval", "0.5", "--heartbeat-timeout", "3"])
        .args(["--shutdown-grace", "0.5"])
        .env("RUST_LOG", "error");
    let p = Proc::spawn("zrpcd", c);
    let sock = dir.join("zrpcd.sock");
    assert!(
        wait_until(WAIT, || std::os::unix::net::UnixStream::connect(&sock)
            .is_ok()),
        "zrpcd did not come up"
    );
    p
}

impl Chaos {
    fn spawn_service(&self, name: &'static str, shared: bool) -> Svc {
        let mut c = Command::new(std::env::current_exe().expect("current_exe"));
        c.arg("service")
            .args(["--name", name])
            .env("ZRPC_SOCKET_DIR", self.dir.path())
            .env("RUST_LOG", "error");
        if shared {
            c.arg("--shared");
        }
        // Each process logs to its own file, named after a counter, so a
        // restarted instance gets a fresh one.
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        c.arg("--log")
            .arg(self.logs.join(format!("{name}-{n}.log")));
        Svc {
            name,
            shared,
            proc: Proc::spawn("service", c),
        }
    }

    fn restart_broker(&mut self, sig: i32) {
        self.broker_peak_kib = self.broker_peak_kib.max(peak_rss_kib(self.broker.pid()));
        self.broker.signal(sig);
        assert!(self.broker.wait_exit(WAIT).is_some(), "broker did not exit");
        self.broker = spawn_broker(self.dir.path());
    }

    /// A supervisor's job (systemd's Restart=): restart services that died
    /// (for example because their broker connection went away).
    fn respawn_dead(&mut self) -> u64 {
        let mut n = 0;
        for i in 0..self.services.len() {
            if let Ok(Some(_)) = self.services[i].proc.child.try_wait() {
                let (name, shared) = (self.services[i].name, self.services[i].shared);
                self.services[i] = self.spawn_service(name, shared);
                n += 1;
            }
        }
        n
    }
}

fn run(args: &RunArgs) -> i32 {
    let duration = Duration::try_from_secs_f64(args.duration).unwrap_or(Duration::ZERO);
    let (clients, concurrency, timeout_ms) = (args.clients, args.concurrency, args.timeout_ms);
    let seed = args
        .seed
        .unwrap_or(0x9e37_79b9_7f4a_7c15 ^ std::process::id() as u64);
    let mut rng = Rng(seed | 1);
    println!("chaos: seed {seed}, {clients} clients x {concurrency} in flight, {duration:?}");

    let dir = TempDir::new();
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs).expect("log dir");
    let broker = spawn_broker(dir.path());
    let mut chaos = Chaos {
        dir,
        logs,
        broker,
        broker_peak_kib: 0,
        services: Vec::new(),
    };
    for (name, shared) in [("chaos_a", true), ("chaos_a", true), ("chaos_b", false)] {
        let s = chaos.spawn_service(name, shared);
        chaos.services.push(s);
    }
    wait_registered(chaos.dir.path(), "chaos_a", 2);
    wait_registered(chaos.dir.path(), "chaos_b", 1);

    let client_procs: Vec<Proc> = (0..clients)
        .map(|_| {
            let mut c = Command::new(std::env::current_exe().expect("current_exe"));
            c.arg("client")
                .args(["--duration", &duration.as_secs_f64().to_string()])
                .args(["--concurrency", &concurrency.to_string()])
                .args(["--timeout-ms", &timeout_ms.to_string()])
                .env("ZRPC_SOCKET_DIR", chaos.dir.path())
                .env("RUST_LOG", "error");
            Proc::spawn("client", c)
        })
        .collect();

    let (mut svc_kills, mut broker_kills, mut broker_terms, mut respawns) =
        (0u64, 0u64, 0u64, 0u64);
    let end = Instant::now() + duration.saturating_sub(Duration::from_secs(1));
    while Instant::now() < end {
        // Pace the chaos (load pacing, not synchronisation).
        std::thread::sleep(Duration::from_millis(300 + rng.below(500)));
        respawns += chaos.respawn_dead();
        match rng.below(10) {
            0..=5 => {
                let i = rng.below(chaos.services.len() as u64) as usize;
                chaos.services[i].proc.signal(libc::SIGKILL);
                let _ = chaos.services[i].proc.wait_exit(WAIT);
                let (name, shared) = (chaos.services[i].name, chaos.services[i].shared);
                chaos.services[i] = chaos.spawn_service(name, shared);
                svc_kills += 1;
            }
            6 | 7 => {
                chaos.restart_broker(libc::SIGKILL);
                broker_kills += 1;
            }
            _ => {
                chaos.restart_broker(libc::SIGTERM);
                broker_terms += 1;
            }
        }
    }
    // Calm down: let every service come back so calls can complete.
    respawns += chaos.respawn_dead();

    let mut total = Tally::default();
    let mut client_failures = 0;
    for p in client_procs {
        let bound = duration + Duration::from_millis(timeout_ms) + SLACK + WAIT;
        let (status, out) = p.output(bound);
        let line = out.lines().find(|l| l.starts_with("RESULT "));
        match (status, line) {
            (Some(st), Some(line)) if st.success() => {
                for field in line["RESULT ".len()..].split(' ') {
                    let (k, v) = field.split_once('=').unwrap_or((field, ""));
                    let n = |v: &str| v.parse::<u64>().unwrap_or(0);
                    match k {
                        "issued" => total.issued += n(v),
                        "answered" => total.answered += n(v),
                        "mismatched" => total.mismatched += n(v),
                        "late" => total.late += n(v),
                        "errors" => {
                            for e in v.split(',').filter(|e| !e.is_empty()) {
                                let (kind, c) = e.split_once('=').unwrap_or((e, "0"));
                                *total.errors.entry(kind.to_string()).or_default() += n(c);
                            }
                        }
                        _ => {}
                    }
                }
            }
            _ => {
                eprintln!("chaos: a client process failed or hung: {status:?} {out}");
                client_failures += 1;
            }
        }
    }
    chaos.broker_peak_kib = chaos.broker_peak_kib.max(peak_rss_kib(chaos.broker.pid()));

    // Executions per service process: a nonce twice in one file is a call
    // executed twice by one process.
    let mut double = 0u64;
    let mut executed = 0u64;
    let mut executed_nonces = HashSet::new();
    for entry in std::fs::read_dir(&chaos.logs).expect("logs").flatten() {
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        let mut seen: HashMap<&str, u32> = HashMap::new();
        for line in text.lines() {
            executed += 1;
            executed_nonces.insert(line.to_string());
            let c = seen.entry(line).or_default();
            *c += 1;
            if *c == 2 {
                double += 1;
                eprintln!("chaos: {line} executed twice in {}", entry.path().display());
            }
        }
    }
    let failed: u64 = total.errors.values().sum();
    let errors: Vec<String> = total
        .errors
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    println!("chaos: broker restarts: {broker_kills} by SIGKILL, {broker_terms} by SIGTERM; service kills: {svc_kills}; supervisor respawns: {respawns}");
    println!(
        "chaos: issued {} answered {} failed {} ({})",
        total.issued,
        total.answered,
        failed,
        if errors.is_empty() {
            "none".to_string()
        } else {
            errors.join(", ")
        }
    );
    println!(
        "chaos: executions {} (distinct calls {}), executed twice in one service process {}",
        executed,
        executed_nonces.len(),
        double
    );
    println!(
        "chaos: answered with another call's nonce {}, unanswered past deadline + {:?} {}",
        total.mismatched, SLACK, total.late
    );
    println!("chaos: broker peak RSS {} KiB", chaos.broker_peak_kib);
    let unaccounted = total
        .issued
        .saturating_sub(total.answered + failed + total.mismatched);
    if unaccounted > 0 {
        println!("chaos: {unaccounted} calls neither answered nor failed");
    }
    let bad = double + total.mismatched + total.late + client_failures + unaccounted;
    if bad == 0 && total.answered > 0 {
        println!("chaos: PASS");
        0
    } else {
        println!("chaos: FAIL");
        1
    }
}
