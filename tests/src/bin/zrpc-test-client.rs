//! A client process used by the end-to-end tests: makes `--calls N` echo
//! calls with `--concurrency K` in flight over one connection, each with a
//! unique nonce, checks every answer carries its own nonce, and prints
//! `ok <answered> mismatched <n> failed <n>`.
//!
//! Usage: `zrpc-test-client [--service echo] [--method echo] [--calls 100] [--concurrency 8] [--timeout-ms 10000]`
//! (another method than `echo` is called with a nil argument and its
//! answers are not decoded: they count as mismatched, its errors as failed,
//! unprinted).

use std::time::Duration;

use bytes::Bytes;
use zrpc_client::{CallOptions, Client, Value};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut service = "echo".to_string();
    let mut method = "echo".to_string();
    let mut calls = 100u64;
    let mut concurrency = 8u64;
    let mut timeout_ms = 10_000u64;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let v = args.next().unwrap_or_default();
        match a.as_str() {
            "--service" => service = v,
            "--method" => method = v,
            "--calls" => calls = v.parse().unwrap_or(calls),
            "--concurrency" => concurrency = v.parse().unwrap_or(concurrency).max(1),
            "--timeout-ms" => timeout_ms = v.parse().unwrap_or(timeout_ms),
            other => {
                eprintln!("zrpc-test-client: unknown argument {other:?}");
                std::process::exit(2);
            }
        }
    }
    let client = match Client::connect().await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("zrpc-test-client: {e}");
            std::process::exit(1);
        }
    };
    let pid = std::process::id() as u64;
    let mut tasks = Vec::new();
    for worker in 0..concurrency {
        let client = client.clone();
        let (service, method) = (service.clone(), method.clone());
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut bad, mut failed) = (0u64, 0u64, 0u64);
            let mut i = worker;
            while i < calls {
                if method != "echo" {
                    // Not an echo: the answer is taken as bytes, undecoded.
                    let opts = CallOptions::timeout(Duration::from_millis(timeout_ms));
                    match client
                        .call_raw(&service, &method, Bytes::from_static(&[0xc0]), opts)
                        .await
                    {
                        Ok(_) => bad += 1,
                        Err(_) => failed += 1,
                    }
                    i += concurrency;
                    continue;
                }
                let nonce = Value::Array(vec![pid.into(), i.into()]);
                let r: Result<Value, _> = client
                    .call(
                        &service,
                        &method,
                        &nonce,
                        Some(Duration::from_millis(timeout_ms)),
                    )
                    .await;
                match r {
                    Ok(v) if v == nonce => ok += 1,
                    Ok(_) => bad += 1,
                    Err(e) => {
                        eprintln!("zrpc-test-client: call {i}: {e}");
                        failed += 1;
                    }
                }
                i += concurrency;
            }
            (ok, bad, failed)
        }));
    }
    let (mut ok, mut bad, mut failed) = (0, 0, 0);
    for t in tasks {
        if let Ok((o, b, f)) = t.await {
            ok += o;
            bad += b;
            failed += f;
        }
    }
    println!("ok {ok} mismatched {bad} failed {failed}");
}
