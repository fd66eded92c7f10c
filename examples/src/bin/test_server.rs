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
//! The service name `test_server` is derived from the type name. The socket
//! directory comes from `$ZRPC_SOCKET_DIR` (default `/run/zrpc`).

use zrpc_service::{rpc_method, service, Context, Server, Value};

/// The example service.
struct TestServer;

#[service]
impl TestServer {
    /// Returns `("func", payload)`: the method name and the payload it got.
    #[rpc_method]
    fn func(&mut self, ctx: &Context, payload: Value) -> (String, Value) {
        println!("RPC request [{}]: {}", ctx.counter(), payload);
        ("func".to_string(), payload)
    }
}

fn main() {
    if let Err(e) = Server::new(TestServer).run() {
        eprintln!("test_server: {e}");
        std::process::exit(1);
    }
}
