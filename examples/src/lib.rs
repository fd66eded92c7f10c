//! The interface of the example service, shared by `test_server` (which
//! implements it) and `test_client` / `test_client_async` (which call it
//! through the generated `TestServerBlockingClient` / `TestServerClient`).
//! A crate like this one needs only `zrpc-client` and `serde`.

use zrpc_client::Value;

/// The original example's service: `test_server`.
#[zrpc_client::interface]
pub trait TestServer {
    /// Returns `("func", payload)`: the method name and the payload it got.
    fn func(&mut self, payload: Value) -> (String, Value);

    /// Sleeps `ms` milliseconds, then returns `ms`. Calls overlap: it takes
    /// `&self` and waits asynchronously, so eight calls at once take about
    /// `ms`, not eight times `ms`.
    async fn sleep_ms(&self, ms: u64) -> u64;
}
