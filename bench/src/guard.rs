//! The quiet-machine guard: how much CPU processes other than ours use.
//!
//! Machine-wide busy time comes from `/proc/stat` (user + nice + system +
//! irq + softirq; idle, iowait and steal excluded). Our own share is the
//! benchmark process's `utime + stime + cutime + cstime` (reaped clients
//! land in the last two) plus the `utime + stime` of every live child. The
//! difference, per second of wall time, is what "other processes" used, in
//! cores.

use std::time::{Duration, Instant};

/// A snapshot of CPU counters.
#[derive(Debug, Clone, Copy)]
pub struct Snap {
    at: Instant,
    busy: u64,
    ours: u64,
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

fn machine_busy() -> u64 {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = s.lines().next() else {
        return 0;
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let get = |i: usize| v.get(i).copied().unwrap_or(0);
    get(0) + get(1) + get(2) + get(5) + get(6)
}

/// Inter-processor interrupts the machine has taken so far: the
/// function-call and rescheduling interrupts (`CAL` and `RES` in
/// `/proc/interrupts`) summed over all CPUs. A wake-up of a task on another,
/// idle CPU is one; on a VM whose idle vCPUs halt, each costs a trip
/// through the hypervisor (docs/performance.md, "Third pass"). `None` when
/// the file cannot be read.
pub fn ipis() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/interrupts").ok()?;
    let mut n = 0;
    for line in s.lines() {
        let mut f = line.split_whitespace();
        if matches!(f.next(), Some("CAL:" | "RES:")) {
            n += f.map_while(|x| x.parse::<u64>().ok()).sum::<u64>();
        }
    }
    Some(n)
}

/// CPU time (user + system) a process has used so far, in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    proc_ticks(&pid.to_string(), false) as f64 / clk_tck()
}

/// utime+stime (and cutime+cstime when `children`) of a process, in ticks.
fn proc_ticks(pid: &str, children: bool) -> u64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    let Some(close) = s.rfind(')') else {
        return 0;
    };
    // Fields after ")": state is field 3, utime 14, stime 15, cutime 16,
    // cstime 17 (1-based, as in proc(5)).
    let f: Vec<&str> = s[close + 1..].split_whitespace().collect();
    let get = |n: usize| {
        f.get(n - 3)
            .and_then(|x| x.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let mut t = get(14) + get(15);
    if children {
        t += get(16) + get(17);
    }
    t
}

/// Takes a snapshot; `pids` are our live children.
pub fn snap(pids: &[u32]) -> Snap {
    let mut ours = proc_ticks("self", true);
    for p in pids {
        ours += proc_ticks(&p.to_string(), false);
    }
    Snap {
        at: Instant::now(),
        busy: machine_busy(),
        ours,
    }
}

/// CPU used by other processes between two snapshots, in cores.
pub fn others_cores(a: &Snap, b: &Snap) -> f64 {
    let dt = (b.at - a.at).as_secs_f64();
    if dt <= 0.0 {
        return 0.0;
    }
    let busy = b.busy.saturating_sub(a.busy) as f64;
    let ours = b.ours.saturating_sub(a.ours) as f64;
    ((busy - ours).max(0.0) / clk_tck()) / dt
}

/// Guard settings.
#[derive(Debug, Clone, Copy)]
pub struct Guard {
    /// Other processes may use at most this many cores for the machine to
    /// count as quiet (before a run) or a run as clean (during it).
    pub threshold: f64,
    /// Longest wait for a quiet machine before a run.
    pub max_wait: Duration,
    /// How often a disturbed run is repeated.
    pub retries: u32,
}

impl Guard {
    /// Waits (bounded) until other processes use less than the threshold
    /// over a 300 ms window. Returns the last window's figure and how long
    /// we waited.
    pub fn wait_quiet(&self, pids: &[u32]) -> (f64, Duration) {
        let start = Instant::now();
        loop {
            let a = snap(pids);
            std::thread::sleep(Duration::from_millis(300));
            let b = snap(pids);
            let o = others_cores(&a, &b);
            if o < self.threshold || start.elapsed() >= self.max_wait {
                return (o, start.elapsed());
            }
        }
    }
}
