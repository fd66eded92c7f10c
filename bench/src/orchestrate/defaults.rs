//! `default_client`: the configuration users get by default (issue 19).
//! Every zrpc client here is the async `Client` on the multi-thread runtime
//! that `#[tokio::main]` builds, without the busy-polling opt-in, exactly
//! as the README writes it; broker and service run with their defaults.
//! Each row has the raw relay beside it, measured in the same run with the
//! same number of processes and calls in flight.

use super::scenarios::guard_note;
use super::*;

/// Client processes of the scaling rows (one call in flight each).
const SCALING: [usize; 4] = [1, 4, 16, 64];

/// Processes and calls in flight of the many-processes row.
const PROCS_16X4: (usize, usize) = (16, 4);

/// Adds the `default_*` rows.
pub(super) fn default_client(
    ctx: &Ctx,
    daemons: &[u32],
    zdir: &Path,
    relay_path: &Path,
    rows: &mut Vec<Row>,
) -> Result<(), String> {
    let c = ctx.counts;
    ctx.log("default_client");
    let zrpc = |procs: usize, inflight: usize, calls: usize| {
        let warm = (c.seq_warmup / procs).max(50);
        let per = (calls / procs).max(100);
        (0..procs)
            .map(|_| zrpc_client(zdir, "multi", inflight, warm, per, SMALL))
            .collect::<Vec<_>>()
    };
    let relay = |procs: usize, inflight: usize, calls: usize| {
        let warm = (c.seq_warmup / procs).max(50);
        let per = (calls / procs).max(100);
        (0..procs)
            .map(|_| raw_client(relay_path, inflight, warm, per, SMALL))
            .collect::<Vec<_>>()
    };
    let mut pair = |scenario: &'static str,
                    metric: &'static str,
                    (procs, inflight, calls): (usize, usize, usize),
                    target: Option<Target>,
                    latency: bool|
     -> Result<Measure, String> {
        let z = ctx.measure(daemons, &|| zrpc(procs, inflight, calls), SMALL)?;
        let r = ctx.measure(daemons, &|| relay(procs, inflight, calls), SMALL)?;
        let (zv, rv) = if latency {
            (z.p50_us, r.p50_us)
        } else {
            (z.calls_per_s, r.calls_per_s)
        };
        rows.push(Row {
            scenario,
            metric,
            zrpc: zv,
            baseline: Some(rv),
            target,
            guard: Some(z.guard),
            note: guard_note(&r),
        });
        Ok(z)
    };
    let seq = pair("default_seq", "p50 (us)", (1, 1, c.seq), None, true)?;
    pair(
        "default_conc_64",
        "calls/s",
        (1, CONC_INFLIGHT, c.conc),
        Some(Target::RatioAtLeast(0.8)),
        false,
    )?;
    let (procs, inflight) = PROCS_16X4;
    pair(
        "default_procs_16x4",
        "calls/s",
        (procs, inflight, c.conc),
        Some(Target::RatioAtLeast(0.5)),
        false,
    )?;
    for procs in SCALING {
        let metric: &'static str = match procs {
            1 => "calls/s, 1 process x 1",
            4 => "calls/s, 4 processes x 1",
            16 => "calls/s, 16 processes x 1",
            _ => "calls/s, 64 processes x 1",
        };
        pair(
            "default_scaling",
            metric,
            (procs, 1, c.conc / 4),
            None,
            false,
        )?;
    }
    // What the defaults cost in CPU during the sequential loop (busy
    // polling in the broker and the service), per process, and at rest.
    let broker = seq.daemon_cores.first().copied().unwrap_or(0.0);
    let service = seq.daemon_cores.get(1).copied().unwrap_or(0.0);
    let client = seq.client_cores.unwrap_or(0.0);
    for (metric, cores, target) in [
        ("cores, broker", broker, None),
        ("cores, service", service, None),
        ("cores, client", client, None),
        (
            "cores, broker + service + client",
            broker + service + client,
            Some(Target::AtMost(1.0)),
        ),
    ] {
        rows.push(Row {
            scenario: "default_seq_cpu",
            metric,
            zrpc: cores,
            baseline: None,
            target,
            guard: None,
            note: "CPU during the default_seq loop (/proc/<pid>/stat, 10 ms ticks)".into(),
        });
    }
    rows.push(Row {
        scenario: "default_idle_cpu",
        metric: "cores, broker + service, 2 s idle",
        zrpc: idle_cores(&daemons[..2.min(daemons.len())]),
        baseline: None,
        target: Some(Target::AtMost(0.01)),
        guard: None,
        note: "no calls: an idle system spends nothing".into(),
    });
    Ok(())
}

/// CPU (cores) the processes `pids` use together over 2 s without calls.
fn idle_cores(pids: &[u32]) -> f64 {
    let cpu = || -> f64 { pids.iter().map(|p| crate::guard::cpu_seconds(*p)).sum() };
    // The busy-polling windows of the last calls end within milliseconds.
    std::thread::sleep(Duration::from_millis(200));
    let (c0, t0) = (cpu(), Instant::now());
    std::thread::sleep(Duration::from_secs(2));
    (cpu() - c0) / t0.elapsed().as_secs_f64()
}
