//! Watching the broker's events: [`Monitor`], the client face of
//! `zrpcd.monitor` (used by `zrpc monitor`).

use std::time::Duration;

use bytes::Bytes;

use crate::{BlockingClient, CallOptions, ClientBuilder, Error, Result};

/// A subscription to the broker's monitor (`zrpcd.monitor`): one event per
/// finished call, as a MessagePack map (fields in docs/protocol.md). Made
/// with [`ClientBuilder::monitor`]; it has a connection of its own.
///
/// If the connection to the broker is lost, [`next_event`](Monitor::next_event)
/// first returns the events that arrived before the loss, then the error
/// (events of the gap are lost; a `Fatal` from the broker keeps its code:
/// [`Error::Shutdown`] when the broker stops, [`Error::LimitExceeded`] when
/// this monitor fell too far behind). [`resubscribe`](Monitor::resubscribe)
/// then connects again, with the builder's backoff, for as long as no broker
/// accepts, and subscribes.
#[derive(Debug)]
pub struct Monitor {
    client: BlockingClient,
    /// How to connect again.
    builder: ClientBuilder,
    /// The `monitor` call's payload: the services watched (nil: all).
    filter: Bytes,
    /// The loss of the connection, kept until the events before it are
    /// taken.
    lost: Option<Error>,
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
        let filter: Bytes = payload.into();
        let client = subscribe(&builder, &filter)?;
        Ok(Monitor {
            client,
            builder,
            filter,
            lost: None,
        })
    }

    /// The next event's payload (one MessagePack map), waiting as long as
    /// it takes. An error means the connection was lost: call
    /// [`resubscribe`](Monitor::resubscribe).
    pub fn next_event(&mut self) -> Result<Bytes> {
        if let Some(ev) = self.client.inner.pop_event() {
            return Ok(ev);
        }
        if let Some(e) = self.lost.take() {
            return Err(e);
        }
        match self.client.inner.next_event() {
            Ok(ev) => Ok(ev),
            Err(e) => match self.client.inner.pop_event() {
                // Events that came in the same read as the loss go first.
                Some(ev) => {
                    self.lost = Some(e);
                    Ok(ev)
                }
                None => Err(e),
            },
        }
    }

    /// Subscribes again after [`next_event`](Monitor::next_event) failed:
    /// connects again, waiting out the builder's backoff between attempts
    /// for as long as no broker accepts (or one is shutting down), and
    /// subscribes. Other errors (an untrusted broker, a refused connection
    /// or subscription) are returned.
    pub fn resubscribe(&mut self) -> Result<()> {
        let backoff = self.builder.backoff();
        let mut retry = zrpc_io::Retry::default();
        loop {
            std::thread::sleep(retry.next_delay(&backoff));
            match subscribe(&self.builder, &self.filter) {
                Ok(client) => {
                    self.client = client;
                    self.lost = None;
                    return Ok(());
                }
                Err(Error::Connect { .. } | Error::Disconnected(_) | Error::Shutdown) => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// A client of its own, subscribed with `filter`.
fn subscribe(builder: &ClientBuilder, filter: &Bytes) -> Result<BlockingClient> {
    let client = builder.clone().connect_blocking()?;
    client.inner.watch_events();
    let opts = CallOptions::from(Some(SUBSCRIBE_TIMEOUT)).no_wait();
    client.call_raw(zrpc_proto::BROKER_SERVICE, "monitor", filter.clone(), opts)?;
    Ok(client)
}
