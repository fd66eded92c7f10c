//! The original zrpc example service, in Rust.
//!
//! ```text
//! class TestServer(Server):
//!     @rpc_method
//!     def func(self, payload):
//!         print('RPC request [%s]: %s' % (self.counter, payload))
//!         return 'func', payload
//!
//! TestServer(name='test_server').run()
//! ```
//!
//! The service name `test_server` is derived from the interface's name. The
//! socket directory comes from `$ZRPC_SOCKET_DIR` (default: `/run/zrpc` for
//! root or when a system broker runs there, else `$XDG_RUNTIME_DIR/zrpc`).

use zrpc_examples::TestServer;
use zrpc_service::{service, Context, Server, Value};

/// The example service.
struct Example;

// The interface (`zrpc_examples::TestServer`) is shared with the clients;
// its service name, `test_server`, is derived from the trait's name. An
// inherent `#[service] impl` with `#[rpc_method]` methods works too (see the
// README): it needs no shared crate, and its methods may take `ctx:
// &Context`.
#[service]
impl TestServer for Example {
    fn func(&mut self, payload: Value) -> (String, Value) {
        let counter = Context::current().map_or(0, |c| c.counter());
        println!("RPC request [{counter}]: {payload}");
        ("func".to_string(), payload)
    }

    async fn sleep_ms(&self, ms: u64) -> u64 {
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        ms
    }
}

fn main() {
    if let Err(e) = Server::new(Example).run() {
        eprintln!("test_server: {e}");
        std::process::exit(1);
    }
}
