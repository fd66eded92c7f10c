//! `default_client`: the configuration users get by default (issue 19).
//! Every zrpc client here is the async `Client` on the multi-thread runtime
//! that `#[tokio::main]` builds, without the busy-polling opt-in, exactly
//! as the README writes it; broker and service run with their defaults.
//! Each row has the raw relay beside it, measured in the same run with the
//! same number of processes and calls in flight.

use super::scenarios::{guard_note, ipi_note};
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
    // `procs` client processes with `inflight` calls in flight each and
    // `calls` in all, each made by `one(inflight, warmup, calls)`.
    type One<'a> = &'a dyn Fn(usize, usize, usize) -> Spawn;
    let clients = |one: One<'_>, procs: usize, inflight: usize, calls: usize| {
        let warm = (c.seq_warmup / procs).max(50);
        let per = (calls / procs).max(100);
        (0..procs)
            .map(|_| one(inflight, warm, per))
            .collect::<Vec<_>>()
    };
    let zrpc_one = |i, w, n| zrpc_client(zdir, "multi", i, w, n, SMALL);
    let relay_one = |i, w, n| raw_client(relay_path, i, w, n, SMALL);
    let floor_one = |i, w, n| raw_tokio_client(relay_path, i, w, n, SMALL);
    let zrpc = |procs, inflight, calls| clients(&zrpc_one, procs, inflight, calls);
    let relay = |procs, inflight, calls| clients(&relay_one, procs, inflight, calls);
    let floor = |procs, inflight, calls| clients(&floor_one, procs, inflight, calls);
    // One `default_*` row: zrpc's README client and the relay's blocking
    // client under the same load; with `floor_metric`, also the tokio floor
    // (two more rows, `floor_rows`).
    let pair = |rows: &mut Vec<Row>,
                scenario: &'static str,
                metric: &'static str,
                (procs, inflight, calls): (usize, usize, usize),
                target: Option<Target>,
                latency: bool,
                floor_metric: Option<&'static str>|
     -> Result<(Measure, Measure), String> {
        let z = ctx.measure(daemons, &|| zrpc(procs, inflight, calls), SMALL)?;
        let r = ctx.measure(daemons, &|| relay(procs, inflight, calls), SMALL)?;
        let pick = |m: &Measure| if latency { m.p50_us } else { m.calls_per_s };
        rows.push(Row {
            scenario,
            metric,
            zrpc: pick(&z),
            baseline: Some(pick(&r)),
            target,
            guard: Some(z.guard),
            note: format!("{}; {}", guard_note(&r), ipi_note(&z, &r)),
        });
        if let Some(metric) = floor_metric {
            let f = ctx.measure(daemons, &|| floor(procs, inflight, calls), SMALL)?;
            floor_rows(metric, [pick(&z), pick(&r), pick(&f)], &f, rows);
        }
        Ok((z, r))
    };
    let (seq, relay_seq) = pair(
        rows,
        "default_seq",
        "p50 (us)",
        (1, 1, c.seq),
        None,
        true,
        Some("p50 (us), sequential"),
    )?;
    pair(
        rows,
        "default_conc_64",
        "calls/s",
        (1, CONC_INFLIGHT, c.conc),
        Some(Target::RatioAtLeast(0.8)),
        false,
        Some("calls/s, 1 process x 64"),
    )?;
    // A few calls in flight from one process: where tokio's second worker
    // costs most (docs/performance.md, "Fourteenth pass"); informational.
    pair(
        rows,
        "default_conc_4",
        "calls/s",
        (1, 4, (c.conc / 2).max(1_000)),
        None,
        false,
        Some("calls/s, 1 process x 4"),
    )?;
    let (procs, inflight) = PROCS_16X4;
    pair(
        rows,
        "default_procs_16x4",
        "calls/s",
        (procs, inflight, c.conc),
        Some(Target::RatioAtLeast(0.5)),
        false,
        Some("calls/s, 16 processes x 4"),
    )?;
    for procs in SCALING {
        let (metric, floor_metric): (&'static str, _) = match procs {
            1 => ("calls/s, 1 process x 1", None),
            4 => ("calls/s, 4 processes x 1", None),
            16 => (
                "calls/s, 16 processes x 1",
                Some("calls/s, 16 processes x 1"),
            ),
            _ => (
                "calls/s, 64 processes x 1",
                Some("calls/s, 64 processes x 1"),
            ),
        };
        pair(
            rows,
            "default_scaling",
            metric,
            (procs, 1, c.conc),
            None,
            false,
            floor_metric,
        )?;
    }
    // What the defaults cost in CPU during the sequential loop (busy
    // polling in the broker and the service), per process, and at rest.
    let broker = seq.daemon_cores.first().copied().unwrap_or(0.0);
    let service = seq.daemon_cores.get(1).copied().unwrap_or(0.0);
    let client = seq.client_cores.unwrap_or(0.0);
    // The same in CPU time per call: the cores above grow with the calls
    // per second (polling saves wake-ups that cost CPU too).
    let per_call = |cores: f64| cores * 1e6 / seq.calls_per_s.max(1e-9);
    rows.push(Row {
        scenario: "default_seq_cpu",
        metric: "us CPU per call, all three",
        zrpc: per_call(broker + service + client),
        baseline: None,
        target: None,
        guard: None,
        note: format!(
            "broker {:.1} + service {:.1} + client {:.1} us per call",
            per_call(broker),
            per_call(service),
            per_call(client)
        ),
    });
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
    default_seq_nopoll(ctx, &relay_seq, rows)?;
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

/// The tokio floor beside a `default_*` row: the plainest client of the
/// relay's protocol on the runtime `#[tokio::main]` builds
/// (`raw-tokio-client`, bench/src/raw_tokio.rs: a loop in the `block_on`
/// future for one call in flight, tasks with a reader and a writer task for
/// more), against the relay's blocking client and against zrpc's README
/// client, all three measured in the same run (`[zrpc, relay, floor]`,
/// calls/s or p50). What the floor loses to the relay is what the runtime
/// costs a plain client design before any broker or service work; it is a
/// reference, not a bound no design can pass.
fn floor_rows(metric: &'static str, [z, r, f]: [f64; 3], floor: &Measure, rows: &mut Vec<Row>) {
    rows.push(Row {
        scenario: "tokio_floor",
        metric,
        zrpc: f,
        baseline: Some(r),
        target: None,
        guard: Some(floor.guard),
        note: format!(
            "no zrpc: the relay's protocol from tokio (raw-tokio-client), against the relay's blocking client; IPIs per call {}",
            floor.ipis_per_call.map_or("?".into(), |x| format!("{x:.2}"))
        ),
    });
    rows.push(Row {
        scenario: "default_vs_tokio_floor",
        metric,
        zrpc: z,
        baseline: Some(f),
        target: None,
        guard: None,
        note: "zrpc's README client against the tokio floor of the same load (baseline column: the floor)".into(),
    });
}

/// `default_seq` with every kind of polling off (`zrpcd --busy-poll-us 0`,
/// `ZRPC_BUSY_POLL_US=0` for the service; the default client does not
/// poll): issue 19 wants its p50 at most the relay's (`relay`, measured
/// beside `default_seq`).
fn default_seq_nopoll(ctx: &Ctx, relay: &Measure, rows: &mut Vec<Row>) -> Result<(), String> {
    let c = ctx.counts;
    let (broker, dir) = ctx.broker("default_nopoll", &["--busy-poll-us", "0"])?;
    let d = dir.to_string_lossy().to_string();
    let service = Spawn::role(&["service", "--dir", &d])
        .env("ZRPC_BUSY_POLL_US", "0")
        .start()
        .map_err(|e| format!("spawn service: {e}"))?;
    wait_service(&dir, ECHO_SERVICE)?;
    let z = ctx.measure(
        &[broker.pid(), service.pid()],
        &|| vec![zrpc_client(&dir, "multi", 1, c.seq_warmup, c.seq, SMALL)],
        SMALL,
    )?;
    rows.push(Row {
        scenario: "default_seq_nopoll",
        metric: "p50 (us)",
        zrpc: z.p50_us,
        baseline: Some(relay.p50_us),
        target: Some(Target::RatioAtMost(1.0)),
        guard: Some(z.guard),
        note: format!(
            "default_seq with busy polling off everywhere; relay figure of default_seq; {}",
            ipi_note(&z, relay)
        ),
    });
    let cores = z.daemon_cores.iter().sum::<f64>() + z.client_cores.unwrap_or(0.0);
    rows.push(Row {
        scenario: "default_seq_nopoll",
        metric: "us CPU per call, all three",
        zrpc: cores * 1e6 / z.calls_per_s.max(1e-9),
        baseline: None,
        target: None,
        guard: None,
        note: format!("{cores:.2} cores during the loop, against default_seq_cpu with polling"),
    });
    Ok(())
}

/// `large_1mib` without descriptor passing (a broker with
/// `--max-fds-per-conn 0`: the payload crosses the sockets inline), against
/// the same relay figure (`relay`): the row with and without fd passing
/// side by side.
pub(super) fn large_1mib_inline(
    ctx: &Ctx,
    warmup: usize,
    relay: &Measure,
    rows: &mut Vec<Row>,
) -> Result<(), String> {
    let c = ctx.counts;
    let (broker, dir) = ctx.broker("large_inline", &["--max-fds-per-conn", "0"])?;
    let d = dir.to_string_lossy().to_string();
    let service = Spawn::role(&["service", "--dir", &d])
        .start()
        .map_err(|e| format!("spawn service: {e}"))?;
    wait_service(&dir, ECHO_SERVICE)?;
    let z = ctx.measure(
        &[broker.pid(), service.pid()],
        &|| vec![zrpc_client(&dir, "current", 1, warmup, c.large, LARGE)],
        LARGE,
    )?;
    rows.push(Row {
        scenario: "large_1mib_inline",
        metric: "MB/s (one way)",
        zrpc: z.mb_per_s,
        baseline: Some(relay.mb_per_s),
        target: None,
        guard: Some(z.guard),
        note:
            "large_1mib without fd passing (zrpcd --max-fds-per-conn 0); relay figure of large_1mib"
                .into(),
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
