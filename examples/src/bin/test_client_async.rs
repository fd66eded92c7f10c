//! The original example client with the async (tokio) client: the same call,
//! plus ten concurrent calls multiplexed over one connection.

use std::time::Duration;

use zrpc_client::{CallOptions, Client, Value};
use zrpc_examples::TestServerClient;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), zrpc_client::Error> {
    // The typed client of the shared interface (zrpc_examples::TestServer).
    let test_server = TestServerClient::new(Client::connect().await?)
        .with_options(CallOptions::timeout(Duration::from_secs(10)));
    let payload = Value::Map(vec![(Value::from("haha"), Value::from("brt"))]);
    let response = test_server.func(payload).await?;
    println!("RPC response: ({:?}, {})", response.0, response.1);

    // Clones share the connection; calls run concurrently.
    let calls = (0..10).map(|i| {
        let test_server = test_server.clone();
        async move { test_server.func(Value::from(i)).await }
    });
    let mut joined = Vec::new();
    for c in calls {
        joined.push(tokio::spawn(c));
    }
    for (i, j) in joined.into_iter().enumerate() {
        let r = j
            .await
            .map_err(|e| zrpc_client::Error::Disconnected(e.to_string()))??;
        println!("concurrent call {i}: ({:?}, {})", r.0, r.1);
    }
    Ok(())
}
