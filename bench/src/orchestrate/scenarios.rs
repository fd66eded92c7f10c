//! The scenarios themselves: which processes each one starts, what it
//! measures against which baseline, and the rows it adds to the table.

use super::*;

pub(super) fn run_all(ctx: &Ctx) -> Result<Vec<Row>, String> {
    let c = ctx.counts;
    let mut rows = Vec::new();

    // Broker A: the latency/throughput scenarios.
    let (broker, zdir) = ctx.broker("a", &["--max-names-per-conn", "20000"])?;
    let zd = zdir.to_string_lossy().to_string();
    let mut svc_args = vec!["service", "--dir", zd.as_str()];
    if ctx.no_cache {
        svc_args.push("--no-cache");
    }
    let service = Spawn::role(&svc_args)
        .start()
        .map_err(|e| format!("spawn service: {e}"))?;
    wait_service(&zdir, ECHO_SERVICE)?;
    svc_args.push("--raw");
    let raw_service = Spawn::role(&svc_args)
        .start()
        .map_err(|e| format!("spawn raw service: {e}"))?;
    wait_service(&zdir, RAW_ECHO_SERVICE)?;
    let relay_path = ctx.tmp.join("relay.sock");
    let rp = relay_path.to_string_lossy().to_string();
    let mut relay = Spawn::role(&["relay", "--path", &rp])
        .start()
        .map_err(|e| format!("spawn relay: {e}"))?;
    relay.expect("ready")?;
    let mut raw_server = Spawn::role(&["raw-server", "--path", &rp])
        .start()
        .map_err(|e| format!("spawn raw server: {e}"))?;
    raw_server.expect("ready")?;
    let daemons = [
        broker.pid(),
        service.pid(),
        raw_service.pid(),
        relay.pid(),
        raw_server.pid(),
    ];

    // seq_small (also the reference of names, client_flavour and the
    // raw-API diagnostic).
    let need_seq = ["seq_small", "large_1mib", "names", "client_flavour"]
        .iter()
        .any(|s| ctx.want(s));
    let (z_seq, r_seq) = if need_seq {
        ctx.log("seq_small");
        let z = ctx.measure(
            &daemons,
            &|| vec![zrpc_client(&zdir, "current", 1, c.seq_warmup, c.seq, SMALL)],
            SMALL,
        )?;
        let r = ctx.measure(
            &daemons,
            &|| vec![raw_client(&relay_path, 1, c.seq_warmup, c.seq, SMALL)],
            SMALL,
        )?;
        (z, r)
    } else {
        (Measure::default(), Measure::default())
    };
    if ctx.want("seq_small") {
        rows.push(Row {
            scenario: "seq_small",
            metric: "p50 (us)",
            zrpc: z_seq.p50_us,
            baseline: Some(r_seq.p50_us),
            target: Some(Target::RatioAtMost(1.25)),
            guard: Some(z_seq.guard),
            note: guard_note(&r_seq),
        });
        rows.push(Row {
            scenario: "seq_small",
            metric: "p99 (us)",
            zrpc: z_seq.p99_us,
            baseline: Some(r_seq.p99_us),
            target: None,
            guard: None,
            note: String::new(),
        });
        rows.push(Row {
            scenario: "seq_small",
            metric: "calls/s",
            zrpc: z_seq.calls_per_s,
            baseline: Some(r_seq.calls_per_s),
            target: None,
            guard: None,
            note: String::new(),
        });
    }

    let mut r_conc = None;
    if ctx.want("conc_small_64") {
        // conc_small_64
        ctx.log("conc_small_64");
        let z = ctx.measure(&daemons, &|| vec![conc_client(&zdir, &c)], SMALL)?;
        let r = ctx.measure(
            &daemons,
            &|| {
                vec![raw_client(
                    &relay_path,
                    CONC_INFLIGHT,
                    c.seq_warmup,
                    c.conc,
                    SMALL,
                )]
            },
            SMALL,
        )?;
        r_conc = Some(r.clone());
        rows.push(Row {
            scenario: "conc_small_64",
            metric: "calls/s",
            zrpc: z.calls_per_s,
            baseline: Some(r.calls_per_s),
            target: Some(Target::RatioAtLeast(0.5)),
            guard: Some(z.guard),
            note: guard_note(&r),
        });
        rows.push(Row {
            scenario: "conc_small_64",
            metric: "p50 (us)",
            zrpc: z.p50_us,
            baseline: Some(r.p50_us),
            target: None,
            guard: None,
            note: String::new(),
        });
        rows.push(Row {
            scenario: "conc_small_64",
            metric: "p99 (us)",
            zrpc: z.p99_us,
            baseline: Some(r.p99_us),
            target: None,
            guard: None,
            note: String::new(),
        });
        // What a client that does not opt in to busy polling gets.
        let q = ctx.measure(
            &daemons,
            &|| vec![conc_client(&zdir, &c).env("ZRPC_BUSY_POLL_US", "0")],
            SMALL,
        )?;
        rows.push(Row {
            scenario: "conc_small_64_client_nopoll",
            metric: "calls/s",
            zrpc: q.calls_per_s,
            baseline: Some(r.calls_per_s),
            target: None,
            guard: Some(q.guard),
            note: "diagnostic: the client not polling (broker, service as default)".into(),
        });
    }

    if ctx.want("many_clients") {
        // many_clients
        ctx.log("many_clients");
        let per = c.many_per_client;
        let warm = c.seq_warmup / 4;
        let z = ctx.measure(
            &daemons,
            &|| {
                (0..MANY_CLIENTS)
                    .map(|_| zrpc_client(&zdir, "current", MANY_INFLIGHT, warm, per, SMALL))
                    .collect()
            },
            SMALL,
        )?;
        let r = ctx.measure(
            &daemons,
            &|| {
                (0..MANY_CLIENTS)
                    .map(|_| raw_client(&relay_path, MANY_INFLIGHT, warm, per, SMALL))
                    .collect()
            },
            SMALL,
        )?;
        rows.push(Row {
            scenario: "many_clients",
            metric: "calls/s (16x16)",
            zrpc: z.calls_per_s,
            baseline: Some(r.calls_per_s),
            target: Some(Target::RatioAtLeast(0.5)),
            guard: Some(z.guard),
            note: guard_note(&r),
        });
        let q = ctx.measure(
            &daemons,
            &|| {
                (0..MANY_CLIENTS)
                    .map(|_| {
                        zrpc_client(&zdir, "current", MANY_INFLIGHT, warm, per, SMALL)
                            .env("ZRPC_BUSY_POLL_US", "0")
                    })
                    .collect()
            },
            SMALL,
        )?;
        rows.push(Row {
            scenario: "many_clients_client_nopoll",
            metric: "calls/s (16x16)",
            zrpc: q.calls_per_s,
            baseline: Some(r.calls_per_s),
            target: None,
            guard: Some(q.guard),
            note: "diagnostic: the clients not polling (broker, service as default)".into(),
        });
    }

    if ctx.want("default_client") {
        defaults::default_client(ctx, &daemons, &zdir, &relay_path, &mut rows)?;
    }

    if ctx.want("large_8mib") {
        // Payloads in sealed memfds (descriptor passing, from
        // `zrpc_io::fdpass::FD_PAYLOAD_MIN` on): the bytes cross no socket.
        ctx.log("large_8mib");
        let n = (c.large / 4).max(10);
        let lw = (n / 10).max(2);
        let z = ctx.measure(
            &daemons,
            &|| vec![zrpc_client(&zdir, "current", 1, lw, n, HUGE)],
            HUGE,
        )?;
        let r = ctx.measure(
            &daemons,
            &|| vec![raw_client(&relay_path, 1, lw, n, HUGE)],
            HUGE,
        )?;
        rows.push(Row {
            scenario: "large_8mib",
            metric: "MB/s (one way)",
            zrpc: z.mb_per_s,
            baseline: Some(r.mb_per_s),
            target: None,
            guard: Some(z.guard),
            note: format!("payloads in sealed memfds (fd passing); {}", guard_note(&r)),
        });
    }

    if ctx.want("large_1mib") {
        // large_1mib
        ctx.log("large_1mib");
        let lw = (c.large / 10).max(5);
        let z = ctx.measure(
            &daemons,
            &|| vec![zrpc_client(&zdir, "current", 1, lw, c.large, LARGE)],
            LARGE,
        )?;
        let r = ctx.measure(
            &daemons,
            &|| vec![raw_client(&relay_path, 1, lw, c.large, LARGE)],
            LARGE,
        )?;
        rows.push(Row {
            scenario: "large_1mib",
            metric: "MB/s (one way)",
            zrpc: z.mb_per_s,
            baseline: Some(r.mb_per_s),
            // Issue 19's target (it was 0.7x); not met, and out of reach on
            // the 2-core VM: see docs/performance.md, "Payloads in
            // descriptors".
            target: Some(Target::RatioAtLeast(3.0)),
            guard: Some(z.guard),
            note: guard_note(&r),
        });
        rows.push(Row {
            scenario: "large_1mib",
            metric: "p50 (us)",
            zrpc: z.p50_us,
            baseline: Some(r.p50_us),
            target: None,
            guard: None,
            note: String::new(),
        });
        defaults::large_1mib_inline(ctx, lw, &r, &mut rows)?;

        // The same with the client as the README writes it (`#[tokio::main]`:
        // a multi-thread runtime, no busy polling); same relay figure.
        let z = ctx.measure(
            &daemons,
            &|| vec![zrpc_client(&zdir, "multi", 1, lw, c.large, LARGE)],
            LARGE,
        )?;
        rows.push(Row {
            scenario: "large_1mib_default",
            metric: "MB/s (one way)",
            zrpc: z.mb_per_s,
            baseline: Some(r.mb_per_s),
            target: Some(Target::RatioAtLeast(3.0)),
            guard: Some(z.guard),
            note: "the default client (multi-thread runtime, as in the README)".into(),
        });

        // Diagnostic: the same with serde_bytes::ByteBuf instead of Blob
        // (decoding copies the megabyte on both sides).
        let z = ctx.measure(
            &daemons,
            &|| vec![zrpc_client(&zdir, "bytebuf", 1, lw, c.large, LARGE)],
            LARGE,
        )?;
        rows.push(Row {
            scenario: "large_1mib_bytebuf",
            metric: "MB/s (one way)",
            zrpc: z.mb_per_s,
            baseline: Some(r.mb_per_s),
            target: None,
            guard: Some(z.guard),
            note: "diagnostic: serde_bytes::ByteBuf payloads (decode copies) instead of Blob"
                .into(),
        });

        // Diagnostics: the same without serde (Client::call_raw to a service
        // that returns the request payload as is).
        ctx.log("raw payload API");
        let z = ctx.measure(
            &daemons,
            &|| vec![zrpc_client(&zdir, "raw", 1, lw, c.large, LARGE)],
            LARGE,
        )?;
        rows.push(Row {
            scenario: "large_1mib_rawapi",
            metric: "MB/s (one way)",
            zrpc: z.mb_per_s,
            baseline: Some(r.mb_per_s),
            target: None,
            guard: Some(z.guard),
            note: "diagnostic: call_raw + service returning the payload Bytes".into(),
        });
        let z = ctx.measure(
            &daemons,
            &|| vec![zrpc_client(&zdir, "raw", 1, c.seq_warmup, c.seq, SMALL)],
            SMALL,
        )?;
        rows.push(Row {
            scenario: "seq_small_rawapi",
            metric: "p50 (us)",
            zrpc: z.p50_us,
            baseline: Some(r_seq.p50_us),
            target: None,
            guard: Some(z.guard),
            note: "diagnostic: call_raw + service returning the payload Bytes".into(),
        });
    }

    if ctx.want("names") {
        // names: A (1 name) B (10,000 more) A B ..., same broker and service.
        ctx.log("names");
        let seq = || vec![zrpc_client(&zdir, "current", 1, c.seq_warmup, c.seq, SMALL)];
        let mut one = vec![z_seq.p50_us];
        let mut many = Vec::new();
        let mut many_guard = GuardInfo::default();
        for round_no in 0..c.names_rounds {
            if round_no > 0 {
                one.push(ctx.measure(&daemons, &seq, SMALL)?.p50_us);
            }
            let mut namer = Spawn::role(&["namer", "--dir", &zd, "--count", &c.names.to_string()])
                .start()
                .map_err(|e| format!("spawn namer: {e}"))?;
            namer.expect("ready")?;
            let mut d2 = daemons.to_vec();
            d2.push(namer.pid());
            let m = ctx.measure(&d2, &seq, SMALL)?;
            many.push(m.p50_us);
            many_guard = m.guard;
            namer.finish(Duration::from_secs(2));
        }
        // Medians of the alternating runs: sequential latency on these VMs
        // is bimodal (a run's p50 lands near one of two values, depending on
        // how the vCPUs wake), so a mean of two runs mostly measures which
        // mode each run hit.
        let median = |v: &[f64]| {
            let mut v = v.to_vec();
            v.sort_by(f64::total_cmp);
            v.get(v.len() / 2).copied().unwrap_or(0.0)
        };
        rows.push(Row {
            scenario: "names",
            metric: "seq p50, 10k names (us)",
            zrpc: median(&many),
            baseline: Some(median(&one)),
            target: Some(Target::RatioAtMost(1.05)),
            guard: Some(many_guard),
            note: format!(
                "baseline = zrpc with 1 name; runs 1-name {:?} / 10k {:?}",
                one.iter().map(|x| round(*x, 1)).collect::<Vec<_>>(),
                many.iter().map(|x| round(*x, 1)).collect::<Vec<_>>()
            ),
        });
    }

    if ctx.want("client_flavour") {
        // Client runtime flavours for seq_small.
        ctx.log("flavours");
        for (flavour, metric) in [
            ("multi", "seq p50, multi-thread rt"),
            ("blocking", "seq p50, BlockingClient"),
        ] {
            let m = ctx.measure(
                &daemons,
                &|| vec![zrpc_client(&zdir, flavour, 1, c.seq_warmup, c.seq, SMALL)],
                SMALL,
            )?;
            rows.push(Row {
                scenario: "client_flavour",
                metric,
                zrpc: m.p50_us,
                baseline: Some(z_seq.p50_us),
                target: None,
                guard: Some(m.guard),
                note: "baseline = current-thread client (seq_small)".into(),
            });
        }
    }

    drop(raw_server);
    drop(relay);
    drop(raw_service);
    drop(service);
    drop(broker);

    if ctx.want("idle_connections") {
        // idle_connections: a fresh broker.
        ctx.log("idle_connections");
        let (broker, bdir) = ctx.broker("idle", &[])?;
        let bd = bdir.to_string_lossy().to_string();
        let mut idle = Spawn::role(&["idle", "--dir", &bd, "--count", &c.idle.to_string()])
            .start()
            .map_err(|e| format!("spawn idle: {e}"))?;
        idle.expect("ready")?;
        std::thread::sleep(Duration::from_millis(200));
        let before = crate::util::rss_bytes(broker.pid()).unwrap_or(0);
        idle.send("go");
        idle.expect("done")?;
        std::thread::sleep(Duration::from_millis(500));
        let after = crate::util::rss_bytes(broker.pid()).unwrap_or(0);
        rows.push(Row {
            scenario: "idle_connections",
            metric: "broker B/connection",
            zrpc: after.saturating_sub(before) as f64 / c.idle as f64,
            baseline: None,
            target: Some(Target::AtMost(8192.0)),
            guard: None,
            note: format!(
                "{} conns; broker RSS {} -> {} KiB",
                c.idle,
                before / 1024,
                after / 1024
            ),
        });
        drop(idle);
        drop(broker);
    }

    if ctx.want("pending_calls") {
        // pending_calls: a fresh broker and a service that never answers.
        ctx.log("pending_calls");
        // The service is given at most a window of them (the default,
        // spelt out here); the rest wait in the broker, pending all the same.
        const WINDOW: usize = 1024;
        let limit = (c.pending + 1000).to_string();
        let window = WINDOW.to_string();
        let (broker, pdir) = ctx.broker(
            "pending",
            &[
                "--max-pending-per-conn",
                &limit,
                "--max-delivered-per-conn",
                &window,
            ],
        )?;
        let pd = pdir.to_string_lossy().to_string();
        let n = c.pending.to_string();
        let delivered = c.pending.min(WINDOW).to_string();
        let mut sink = Spawn::role(&[
            "sink",
            "--dir",
            &pd,
            "--name",
            "bench_sink",
            "--count",
            &delivered,
        ])
        .start()
        .map_err(|e| format!("spawn sink: {e}"))?;
        sink.expect("ready")?;
        let mut caller = Spawn::role(&[
            "caller",
            "--dir",
            &pd,
            "--name",
            "bench_sink",
            "--count",
            &n,
        ])
        .start()
        .map_err(|e| format!("spawn caller: {e}"))?;
        caller.expect("ready")?;
        std::thread::sleep(Duration::from_millis(200));
        let before = crate::util::rss_bytes(broker.pid()).unwrap_or(0);
        caller.send("go");
        caller.expect("sent")?;
        sink.expect("done")?;
        std::thread::sleep(Duration::from_millis(500));
        let after = crate::util::rss_bytes(broker.pid()).unwrap_or(0);
        rows.push(Row {
            scenario: "pending_calls",
            metric: "broker B/pending call",
            zrpc: after.saturating_sub(before) as f64 / c.pending as f64,
            baseline: None,
            target: Some(Target::AtMost(256.0)),
            guard: None,
            note: format!(
                "{} calls, nil payload; broker RSS {} -> {} KiB",
                c.pending,
                before / 1024,
                after / 1024
            ),
        });
        drop(caller);
        drop(sink);
        drop(broker);
    }

    if ctx.want("busy_poll_cost") {
        let relay = need_seq.then_some(r_seq);
        busy_poll_cost(ctx, &mut rows, relay, r_conc)?;
    }

    Ok(rows)
}

/// Call rates of `busy_poll_cost`, with their metric names.
const PACED: [(u64, &str, &str); 3] = [
    (1_000, "CPU cores at 1k calls/s", "p50 (us) at 1k calls/s"),
    (5_000, "CPU cores at 5k calls/s", "p50 (us) at 5k calls/s"),
    (
        10_000,
        "CPU cores at 10k calls/s",
        "p50 (us) at 10k calls/s",
    ),
];

/// busy_poll_cost: what busy polling costs and buys at moderate, paced
/// load. One `BlockingClient` calls the echo service at a fixed rate; the
/// broker's and the service's CPU (cores) and the call's p50 are measured
/// with polling on (the defaults) and off (`--busy-poll-us 0`,
/// `ZRPC_BUSY_POLL_US=0`). Informational: no target. With polling off it
/// also measures seq_small and conc_small_64 again, against the relay's
/// figures of this run (`relay_seq`, `relay_conc`) when they were measured.
fn busy_poll_cost(
    ctx: &Ctx,
    rows: &mut Vec<Row>,
    relay_seq: Option<Measure>,
    relay_conc: Option<Measure>,
) -> Result<(), String> {
    ctx.log("busy_poll_cost");
    let secs = ctx.counts.paced_seconds.to_string();
    // (cores, p50 us) per rate: polling on, then off.
    let mut got: [Vec<(f64, f64)>; 2] = [Vec::new(), Vec::new()];
    for (k, (tag, extra, env)) in [
        ("poll_on", &[][..], None),
        ("poll_off", &["--busy-poll-us", "0"][..], Some("0")),
    ]
    .into_iter()
    .enumerate()
    {
        let (broker, dir) = ctx.broker(tag, extra)?;
        let d = dir.to_string_lossy().to_string();
        let mut svc = Spawn::role(&["service", "--dir", &d]);
        if let Some(v) = env {
            svc = svc.env("ZRPC_BUSY_POLL_US", v);
        }
        let service = svc.start().map_err(|e| format!("spawn service: {e}"))?;
        wait_service(&dir, ECHO_SERVICE)?;
        for (rate, _, _) in PACED {
            let rate_s = rate.to_string();
            let mut p = Spawn::role(&["paced", "--dir", &d, "--rate", &rate_s, "--seconds", &secs])
                .start()
                .map_err(|e| format!("spawn paced client: {e}"))?;
            p.expect("ready")?;
            let cpu = || {
                crate::guard::cpu_seconds(broker.pid()) + crate::guard::cpu_seconds(service.pid())
            };
            let (c0, t0) = (cpu(), Instant::now());
            p.send("go");
            let line = p.line()?;
            let cores = (cpu() - c0) / t0.elapsed().as_secs_f64();
            let p50_ns: f64 = line
                .split_whitespace()
                .nth(2)
                .and_then(|x| x.parse().ok())
                .ok_or_else(|| format!("paced client: unexpected line {line:?}"))?;
            got[k].push((cores, p50_ns / 1000.0));
        }
        if env.is_some() {
            let c = ctx.counts;
            let daemons = [broker.pid(), service.pid()];
            if let Some(r) = &relay_seq {
                let z = ctx.measure(
                    &daemons,
                    &|| {
                        vec![zrpc_client(&dir, "current", 1, c.seq_warmup, c.seq, SMALL)
                            .env("ZRPC_BUSY_POLL_US", "0")]
                    },
                    SMALL,
                )?;
                rows.push(Row {
                    scenario: "seq_small_nopoll",
                    metric: "p50 (us)",
                    zrpc: z.p50_us,
                    baseline: Some(r.p50_us),
                    // Issue 19: with every kind of polling off, at most
                    // the relay's p50.
                    target: Some(Target::RatioAtMost(1.0)),
                    guard: Some(z.guard),
                    note: "seq_small with busy polling off everywhere".into(),
                });
            }
            if let Some(r) = &relay_conc {
                let z = ctx.measure(
                    &daemons,
                    &|| vec![conc_client(&dir, &c).env("ZRPC_BUSY_POLL_US", "0")],
                    SMALL,
                )?;
                rows.push(Row {
                    scenario: "conc_small_64_nopoll",
                    metric: "calls/s",
                    zrpc: z.calls_per_s,
                    baseline: Some(r.calls_per_s),
                    target: None,
                    guard: Some(z.guard),
                    note: "diagnostic: conc_small_64 with busy polling off".into(),
                });
            }
        }
        drop(service);
        drop(broker);
    }
    for (i, (rate, cpu_metric, p50_metric)) in PACED.into_iter().enumerate() {
        let (on, off) = (got[0][i], got[1][i]);
        let note = format!("broker + service; baseline = polling off; {rate} calls/s");
        rows.push(Row {
            scenario: "busy_poll_cost",
            metric: cpu_metric,
            zrpc: on.0,
            baseline: Some(off.0),
            target: None,
            guard: None,
            note: note.clone(),
        });
        rows.push(Row {
            scenario: "busy_poll_cost",
            metric: p50_metric,
            zrpc: on.1,
            baseline: Some(off.1),
            target: None,
            guard: None,
            note,
        });
    }
    Ok(())
}

/// The interrupts per call of a zrpc run and its relay run, for a row's
/// note: on a VM whose idle vCPUs halt, they say which mode a run was in
/// (docs/performance.md, "Third pass").
pub(super) fn ipi_note(zrpc: &Measure, relay: &Measure) -> String {
    let f = |m: &Measure| m.ipis_per_call.map_or("?".into(), |x| format!("{x:.2}"));
    format!("IPIs per call {} zrpc, {} relay", f(zrpc), f(relay))
}

pub(super) fn guard_note(baseline: &Measure) -> String {
    let g = baseline.guard;
    format!(
        "relay run {} ({:.2} cores)",
        if g.clean { "clean" } else { "NOISY" },
        g.during
    )
}
