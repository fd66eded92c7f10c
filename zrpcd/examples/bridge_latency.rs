//! Latency and throughput of a call through the NATS bridge, against a
//! direct local call and plain NATS request/reply, in the same run
//! (docs/bridge.md, *Cost*).
//!
//! ```sh
//! cargo build --release -p zrpcd --features nats -p zrpc-tests --bins
//! cargo run --release -p zrpcd --features nats --example bridge_latency [CALLS]
//! ```
//!
//! Starts `nats-server` (from `PATH` or /usr/sbin) on a free port, two
//! brokers (`target/release/zrpcd`, hosts A and B, each with a bridge) and
//! `zrpc-test-svc` (`echo`) on A; then measures `echo.echo` with a 16-byte
//! string: from a client on A (local), from a client on B (bridged: B's
//! broker, B's bridge, NATS, A's bridge, A's broker, the service and back),
//! and a plain NATS request/reply with a responder in this process
//! (`async-nats`, no zrpc at all). Latency is one call at a time;
//! throughput is 32 callers for 2 s. Every process it starts is killed by
//! pid at the end.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;

type Error = Box<dyn std::error::Error>;

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn release_dir() -> Result<PathBuf, Error> {
    // target/release/examples/bridge_latency -> target/release
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or("cannot find target/release")?;
    Ok(dir.to_path_buf())
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) -> Result<(), Error> {
    let start = Instant::now();
    while !cond() {
        if start.elapsed() > Duration::from_secs(20) {
            return Err(format!("{what} did not happen within 20 s").into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

fn spawn(cmd: &mut Command) -> Result<Killed, Error> {
    Ok(Killed(
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?,
    ))
}

struct Stats {
    p50_us: f64,
    p99_us: f64,
    mean_us: f64,
}

fn stats(mut samples: Vec<Duration>) -> Stats {
    samples.sort_unstable();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let n = samples.len().max(1);
    Stats {
        p50_us: us(samples[n / 2]),
        p99_us: us(samples[(n * 99 / 100).min(n - 1)]),
        mean_us: samples.iter().map(|&d| us(d)).sum::<f64>() / n as f64,
    }
}

async fn zrpc_latency(client: &zrpc_client::Client, calls: usize) -> Result<Stats, Error> {
    let mut samples = Vec::with_capacity(calls);
    for _ in 0..calls {
        let t = Instant::now();
        let _: String = client
            .call(
                "echo",
                "echo",
                "0123456789abcdef",
                Some(Duration::from_secs(5)),
            )
            .await?;
        samples.push(t.elapsed());
    }
    Ok(stats(samples))
}

async fn zrpc_throughput(client: &zrpc_client::Client) -> Result<f64, Error> {
    let end = Instant::now() + Duration::from_secs(2);
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < end {
                let r: Result<String, _> = client
                    .call(
                        "echo",
                        "echo",
                        "0123456789abcdef",
                        Some(Duration::from_secs(5)),
                    )
                    .await;
                if r.is_ok() {
                    n += 1;
                }
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await?;
    }
    Ok(total as f64 / 2.0)
}

async fn nats_latency(nats: &async_nats::Client, calls: usize) -> Result<Stats, Error> {
    let mut samples = Vec::with_capacity(calls);
    for _ in 0..calls {
        let t = Instant::now();
        nats.request("bench.echo", "0123456789abcdef".into())
            .await?;
        samples.push(t.elapsed());
    }
    Ok(stats(samples))
}

async fn nats_throughput(nats: &async_nats::Client) -> Result<f64, Error> {
    let end = Instant::now() + Duration::from_secs(2);
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let nats = nats.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < end {
                if nats
                    .request("bench.echo", "0123456789abcdef".into())
                    .await
                    .is_ok()
                {
                    n += 1;
                }
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await?;
    }
    Ok(total as f64 / 2.0)
}

fn main() -> Result<(), Error> {
    let calls: usize = match std::env::args().nth(1) {
        Some(a) => a.parse()?,
        None => 2000,
    };
    let bin = release_dir()?;
    let nats_server = ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .ok_or("nats-server is not installed (apt-get install nats-server)")?;
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let _nats =
        spawn(Command::new(nats_server).args(["-a", "127.0.0.1", "-p", &port.to_string()]))?;
    wait_for("nats-server listening", || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    })?;
    let url = format!("nats://127.0.0.1:{port}");
    let tmp = std::env::temp_dir().join(format!("zrpc-bridge-bench-{}", std::process::id()));
    let mut procs = Vec::new();
    let mut dirs = Vec::new();
    for (host, export, import) in [("a", "\"echo\"", ""), ("b", "", "\"echo\"")] {
        let dir = tmp.join(host);
        std::fs::create_dir_all(&dir)?;
        let conf = tmp.join(format!("{host}.toml"));
        std::fs::write(
            &conf,
            format!(
                "host_id = \"{host}\"\n[nats]\nservers = [\"{url}\"]\n\
                 [export]\nnames = [{export}]\n[import]\nnames = [{import}]\n"
            ),
        )?;
        procs.push(spawn(
            Command::new(bin.join("zrpcd"))
                .arg("--socket-dir")
                .arg(&dir)
                .arg("--bridge")
                .arg(&conf)
                .env("RUST_LOG", "warn"),
        )?);
        let sock = dir.join("zrpcd.sock");
        wait_for("zrpcd listening", || {
            std::os::unix::net::UnixStream::connect(&sock).is_ok()
        })?;
        dirs.push(dir);
    }
    procs.push(spawn(
        Command::new(bin.join("zrpc-test-svc")).env("ZRPC_SOCKET_DIR", &dirs[0]),
    )?);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = rt.block_on(async {
        let local = zrpc_client::Client::connect_to(&dirs[0]).await?;
        let bridged = zrpc_client::Client::connect_to(&dirs[1]).await?;
        // Until the exported name is reachable from B.
        let start = Instant::now();
        loop {
            let r: Result<String, _> = bridged
                .call("echo", "echo", "x", Some(Duration::from_secs(5)))
                .await;
            if r.is_ok() {
                break;
            }
            if start.elapsed() > Duration::from_secs(20) {
                return Err::<(), Error>("echo never became reachable through the bridge".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let responder = async_nats::connect(url.as_str()).await?;
        let mut sub = responder.subscribe("bench.echo").await?;
        tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                if let Some(reply) = msg.reply {
                    let _ = responder.publish(reply, msg.payload).await;
                }
            }
        });
        let requester = async_nats::connect(url.as_str()).await?;
        // Warm-up.
        zrpc_latency(&local, 200).await?;
        zrpc_latency(&bridged, 200).await?;
        nats_latency(&requester, 200).await?;
        println!(
            "{calls} sequential calls, then 32 concurrent callers for 2 s; 16-byte string payload"
        );
        println!(
            "{:<28} {:>9} {:>9} {:>9} {:>12}",
            "path", "p50 us", "p99 us", "mean us", "calls/s"
        );
        let rows: [(&str, Stats, f64); 3] = [
            (
                "zrpc local (A -> A)",
                zrpc_latency(&local, calls).await?,
                zrpc_throughput(&local).await?,
            ),
            (
                "zrpc bridged (B -> NATS -> A)",
                zrpc_latency(&bridged, calls).await?,
                zrpc_throughput(&bridged).await?,
            ),
            (
                "plain NATS request/reply",
                nats_latency(&requester, calls).await?,
                nats_throughput(&requester).await?,
            ),
        ];
        for (name, s, tput) in rows {
            println!(
                "{name:<28} {:>9.1} {:>9.1} {:>9.1} {:>12.0}",
                s.p50_us, s.p99_us, s.mean_us, tput
            );
        }
        Ok(())
    });
    drop(procs);
    let _ = std::fs::remove_dir_all(&tmp);
    result
}
