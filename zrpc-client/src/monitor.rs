//! Watching the broker's events: [`Monitor`], the client face of
//! `zrpcd.monitor` (used by `zrpc monitor`).

use std::time::Duration;

use bytes::Bytes;

use crate::{BlockingClient, CallOptions, ClientBuilder, Error, Result};

/// A subscription to the broker's monitor (`zrpcd.monitor`): one event per
/// finished call, as a MessagePack map (fields in docs/protocol.md). Made
/// with [`ClientBuilder::monitor`]; it has a connection of its own.
///
/// If the connection to the broker is lost, [`next_event`](Monitor::next_event) returns
/// the error (events of that gap are lost) and
/// [`resubscribe`](Monitor::resubscribe) subscribes again, reconnecting
/// with the client's backoff for as long as it takes.
#[derive(Debug)]
pub struct Monitor {
    client: BlockingClient,
    /// The `monitor` call's payload: the services watched (nil: all).
    filter: Bytes,
}

/// How long the subscription call may take once connected.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(10);

impl Monitor {
    /// Connects with `builder` and subscribes to the events of `services`
    /// (every service if empty).
    pub(crate) fn start(builder: ClientBuilder, services: &[String]) -> Result<Monitor> {
        let filter = if services.is_empty() {
            rmpv::Value::Nil
        } else {
            rmpv::Value::Array(
                services
                    .iter()
                    .map(|s| rmpv::Value::from(s.as_str()))
                    .collect(),
            )
        };
        let mut payload = Vec::new();
        rmpv::encode::write_value(&mut payload, &filter)
            .map_err(|e| Error::Protocol(format!("cannot encode the service list: {e}")))?;
        let m = Monitor {
            client: builder.connect_blocking()?,
            filter: payload.into(),
        };
        m.subscribe(Some(SUBSCRIBE_TIMEOUT))?;
        Ok(m)
    }

    fn subscribe(&self, timeout: Option<Duration>) -> Result<()> {
        let opts = CallOptions::from(timeout).no_wait();
        self.client
            .call_raw(
                zrpc_proto::BROKER_SERVICE,
                "monitor",
                self.filter.clone(),
                opts,
            )
            .map(drop)
    }

    /// The next event's payload (one MessagePack map), waiting as long as
    /// it takes. An error means the connection was lost: call
    /// [`resubscribe`](Monitor::resubscribe).
    pub fn next_event(&mut self) -> Result<Bytes> {
        self.client.inner.next_event()
    }

    /// Subscribes again after [`next_event`](Monitor::next_event) failed: reconnects
    /// (with the client's backoff, for as long as it takes) and subscribes.
    pub fn resubscribe(&mut self) -> Result<()> {
        self.subscribe(None)
    }
}
