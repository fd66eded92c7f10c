//! The original example client with the async (tokio) client: the same call,
//! plus ten concurrent calls multiplexed over one connection.

use std::collections::BTreeMap;
use std::time::Duration;

use zrpc_client::{Client, Value};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), zrpc_client::Error> {
    let client = Client::connect().await?;
    let timeout = Some(Duration::from_secs(10));
    let payload = BTreeMap::from([("haha", "brt")]);
    let response: (String, Value) = client
        .call("test_server", "func", &payload, timeout)
        .await?;
    println!("RPC response: ({:?}, {})", response.0, response.1);

    // Clones share the connection; calls run concurrently.
    let calls = (0..10).map(|i| {
        let client = client.clone();
        async move {
            let r: (String, Value) = client.call("test_server", "func", &i, timeout).await?;
            Ok::<_, zrpc_client::Error>(r)
        }
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
