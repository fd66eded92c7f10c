//! The original zrpc example client, in Rust (blocking).
//!
//! ```text
//! client = Client()
//! response = client.call(service='test_server', method='func',
//!                        payload={'haha': 'brt'})
//! ```
//!
//! Run `test_server` first. The socket directory comes from
//! `$ZRPC_SOCKET_DIR` (default: `/run/zrpc` for root or when a system broker
//! runs there, else `$XDG_RUNTIME_DIR/zrpc`).

use std::time::{Duration, SystemTime};

use zrpc_client::{BlockingClient, CallOptions, Value};
use zrpc_examples::TestServerBlockingClient;

fn main() {
    let client = match BlockingClient::connect() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("test_client: {e}");
            std::process::exit(1);
        }
    };
    // The typed client of the shared interface: a wrong argument type does
    // not compile. Like the original, a timeout turns into a typed error;
    // here we wait at most 10 s (CallOptions::default() waits indefinitely).
    let test_server = TestServerBlockingClient::new(client)
        .with_options(CallOptions::timeout(Duration::from_secs(10)));
    let payload = Value::Map(vec![(Value::from("haha"), Value::from("brt"))]);
    let response = test_server.func(payload);
    let timestamp = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    match response {
        Ok((name, value)) => println!("RPC response [{timestamp:.3}]: ({name:?}, {value})"),
        Err(e) => {
            eprintln!("test_client: {e}");
            std::process::exit(1);
        }
    }
}
