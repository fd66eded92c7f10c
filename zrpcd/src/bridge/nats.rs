//! The bridge's NATS client, and its re-creation when it dies.
//!
//! async-nats runs a client's connection in a task of its own, which
//! reconnects by itself when a connection to a server breaks. When that
//! task ends, though, the client is dead for good: its subscriptions'
//! streams end, its publishes and requests fail, and its
//! `connection_state()` stays what it was. async-nats 0.46 panics in that
//! task on a message whose subject or reply subject is not UTF-8 (which
//! nats-server passes on: any peer that may publish on the bridge's
//! subjects can send one; fixed in async-nats 0.48, which needs a newer
//! Rust than the workspace's); tokio ends the task and zrpcd runs on.
//!
//! [`heal`] notices (a flush fails only once that task ended) and connects
//! a new client after zrpc's reconnection backoff ([`zrpc_io::Backoff`]: 10
//! ms doubling to 1 s, started over once a client lived 1 s), so a peer
//! sending such messages nonstop costs about one new client a second.
//! Users take the current client each time ([`Nats::client`]): the export
//! side subscribes again on a new one ([`Nats::changes`]); a reply or a
//! cancel that met a dead client is published once more on the next
//! ([`Nats::publish`]); an imported call whose request one refused is
//! sent again, one whose request one took fails with `ServiceGone` (it
//! may have run; module `import`).

use std::cell::Cell;
use std::time::{Duration, Instant};

use async_nats::client::{FlushError, PublishError, PublishErrorKind};
use async_nats::{HeaderMap, Subject};
use bytes::Bytes;
use tokio::sync::watch;
use zrpc_io::{Backoff, Retry};

use super::{BridgeConfig, BridgeError};

/// How often [`heal`] checks that the client's connection task still runs.
const PROBE_INTERVAL: Duration = Duration::from_millis(100);

/// How long a reply, a cancel or an imported call's request that met a
/// dead client waits for the next one (it comes within about 1.4 s: the
/// probe, the backoff's cap and its jitter).
pub(super) const REPLACEMENT_WAIT: Duration = Duration::from_secs(5);

/// One of the bridge's successive NATS clients.
#[derive(Clone)]
pub(super) struct Generation {
    /// The client.
    pub(super) client: async_nats::Client,
    /// 1 for the first client, one more for each new one.
    pub(super) number: u64,
    /// False once its connection task is known to have ended.
    pub(super) alive: bool,
}

/// The bridge's current NATS client.
pub(super) struct Nats {
    current: watch::Sender<Generation>,
}

impl Nats {
    /// Holds `client`, the first.
    pub(super) fn new(client: async_nats::Client) -> Nats {
        Nats {
            current: watch::Sender::new(Generation {
                client,
                number: 1,
                alive: true,
            }),
        }
    }

    /// The current client.
    pub(super) fn client(&self) -> async_nats::Client {
        self.current.borrow().client.clone()
    }

    /// The current client, its number and whether it is alive.
    pub(super) fn current(&self) -> Generation {
        self.current.borrow().clone()
    }

    /// Whether the current client is alive and connected to a server.
    pub(super) fn connected(&self) -> bool {
        let current = self.current.borrow();
        current.alive
            && current.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Told of each death and each new client.
    pub(super) fn changes(&self) -> watch::Receiver<Generation> {
        self.current.subscribe()
    }

    /// The first client after client `number`, once there is one.
    pub(super) async fn replaced(&self, number: u64) -> Option<async_nats::Client> {
        let mut changes = self.current.subscribe();
        let next = changes.wait_for(|g| g.number > number).await.ok()?;
        Some(next.client.clone())
    }

    /// Client `number`'s connection task ended.
    fn died(&self, number: u64) {
        self.current.send_if_modified(|g| {
            let news = g.number == number && g.alive;
            g.alive &= !news;
            news
        });
    }

    /// `client` replaces the current one.
    fn replace(&self, client: async_nats::Client) -> u64 {
        let mut number = 0;
        self.current.send_modify(|g| {
            g.number += 1;
            g.client = client;
            g.alive = true;
            number = g.number;
        });
        number
    }

    /// Publishes on the current client; if that one is dead, once more on
    /// the next (waiting for it at most [`REPLACEMENT_WAIT`]).
    pub(super) async fn publish(
        &self,
        subject: Subject,
        headers: impl Fn() -> HeaderMap,
        payload: Bytes,
    ) -> Result<(), PublishError> {
        let Generation { client, number, .. } = self.current();
        let sent = client
            .publish_with_headers(subject.clone(), headers(), payload.clone())
            .await;
        drop(client);
        // `Send`: the client's command channel is closed, i.e. its
        // connection task ended.
        let error = match sent {
            Err(e) if matches!(e.kind(), PublishErrorKind::Send) => e,
            done => return done,
        };
        match tokio::time::timeout(REPLACEMENT_WAIT, self.replaced(number)).await {
            Ok(Some(next)) => next.publish_with_headers(subject, headers(), payload).await,
            _ => Err(error),
        }
    }
}

/// The NATS client's events logged at warn (error) at most once per
/// `--warn-interval` each kind, the rest at debug.
static SERVER_ERRORS: std::sync::Mutex<crate::log::RefusalLog> =
    std::sync::Mutex::new(crate::log::RefusalLog::new());
static OTHER_EVENTS: std::sync::Mutex<crate::log::RefusalLog> =
    std::sync::Mutex::new(crate::log::RefusalLog::new());

/// Whether an event of the kind `log` counts is logged at warn now (and how
/// many were not since).
fn warn_now(log: &std::sync::Mutex<crate::log::RefusalLog>) -> Option<u64> {
    log.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .warn_now(std::time::Instant::now())
}

/// Connects a client for the bridge (in the background: it returns at
/// once, and the client connects and reconnects by itself). Errors only
/// on servers that cannot be parsed.
pub(super) async fn connect(config: &BridgeConfig) -> Result<async_nats::Client, BridgeError> {
    let mut opts = async_nats::ConnectOptions::new()
        .name(format!("zrpcd-bridge {}", config.host_id))
        .retry_on_initial_connect()
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Connected => tracing::info!("the bridge is connected to NATS"),
                async_nats::Event::Closed => {
                    tracing::info!("the bridge's NATS connection is closed")
                }
                // Authorization errors come from the server (so do refusals
                // of what a request made it do: its reason says which).
                async_nats::Event::ServerError(_) => match warn_now(&SERVER_ERRORS) {
                    Some(quiet) => tracing::error!(
                        %event,
                        quiet,
                        "the NATS server refused something the bridge did (an authorization error: check [nats] in the bridge configuration; `quiet` more since the last such line)"
                    ),
                    None => tracing::debug!(%event, "the NATS server refused something the bridge did"),
                },
                // Slow consumers, disconnections: a NATS publisher flooding
                // an exported name causes them at will.
                _ => match warn_now(&OTHER_EVENTS) {
                    Some(quiet) => tracing::warn!(%event, quiet, "NATS bridge (`quiet` more events since the last such line, at debug level)"),
                    None => tracing::debug!(%event, "NATS bridge"),
                },
            }
        });
    if let Some((user, password)) = &config.user_password {
        opts = opts.user_and_password(user.clone(), password.clone());
    }
    if let Some(token) = &config.token {
        opts = opts.token(token.clone());
    }
    if config.tls_required {
        opts = opts.require_tls(true);
    }
    if let Some(ca) = &config.root_certificates {
        opts = opts.add_root_certificates(ca.clone());
    }
    if let Some((cert, key)) = &config.client_cert {
        opts = opts.add_client_certificate(cert.clone(), key.clone());
    }
    let servers = config.servers.clone();
    let connected = runtime()?
        .spawn(async move { opts.connect(servers.as_slice()).await })
        .await
        .map_err(|e| BridgeError::Thread(e.to_string()))?;
    connected.map_err(|source| BridgeError::Connect {
        servers: config.servers.join(","),
        source,
    })
}

/// The thread the NATS clients run on: their connection task reads and
/// parses what the server sends there, not on the broker's thread, whose
/// time is shared out between local users in rounds. A NATS publisher
/// flooding an exported name sends hundreds of thousands of messages a
/// second; parsed on the broker's thread they made another user's calls
/// wait for seconds (red-team pass 7). What the bridge does with the
/// messages (one local call each, at most `[export] max_in_flight` at
/// once) stays on the broker's thread, in the bridge's own share of the
/// rounds.
fn runtime() -> Result<&'static tokio::runtime::Runtime, BridgeError> {
    // Built once, by the first caller (`get_or_init` runs one builder: a
    // second runtime dropped from within async code would panic).
    static RUNTIME: std::sync::OnceLock<Result<tokio::runtime::Runtime, String>> =
        std::sync::OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("zrpcd-nats")
                .enable_all()
                .build()
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| BridgeError::Thread(e.clone()))
}

/// Keeps the bridge's NATS client alive: whenever the current one's
/// connection task has ended, connects a new one after `backoff`, and
/// counts it in `replaced`. Runs until dropped (on the current
/// `LocalSet`).
pub(super) async fn heal(
    nats: &Nats,
    config: &BridgeConfig,
    backoff: Backoff,
    replaced: &Cell<u64>,
) {
    let mut retry = Retry::default();
    loop {
        let Generation { client, number, .. } = nats.current();
        let born = Instant::now();
        let error = ended(&client).await;
        drop(client);
        nats.died(number);
        let lived = born.elapsed();
        retry.connection_ended(&backoff, lived);
        let mut delay = retry.next_delay(&backoff);
        tracing::warn!(
            client = number,
            lived_ms = lived.as_millis() as u64,
            retry_in_ms = delay.as_millis() as u64,
            %error,
            "the NATS bridge's client died (its connection task ended: async-nats \
             panicked, e.g. on a message whose subject is not UTF-8; docs/bridge.md); \
             the bridge is off NATS until a new client connects"
        );
        loop {
            tokio::time::sleep(delay).await;
            // In a task of its own: a panic in async-nats is then a failed
            // attempt, not the end of the healing.
            let config = config.clone();
            let made = match tokio::task::spawn_local(async move { connect(&config).await }).await {
                Ok(made) => made.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match made {
                Ok(client) => {
                    let number = nats.replace(client);
                    replaced.set(replaced.get() + 1);
                    tracing::info!(client = number, "the NATS bridge has a new NATS client");
                    break;
                }
                Err(error) => {
                    delay = retry.next_delay(&backoff);
                    tracing::warn!(
                        %error,
                        retry_in_ms = delay.as_millis() as u64,
                        "the NATS bridge cannot make a new NATS client"
                    );
                }
            }
        }
    }
}

/// Waits until `client`'s connection task has ended: only then does a
/// flush fail (its command channel, or the flush's answer, went with the
/// task). One flush at a time, so that a client waiting for a server
/// (which takes no commands meanwhile) does not fill its channel.
async fn ended(client: &async_nats::Client) -> FlushError {
    loop {
        match client.flush().await {
            Ok(()) => tokio::time::sleep(PROBE_INTERVAL).await,
            Err(e) => return e,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// What a fake server sends a poisoned client after its handshake: a
    /// message whose reply subject is not UTF-8, on which async-nats 0.46
    /// panics in the client's connection task.
    const POISON: &[u8] = b"MSG zrpc.svc.echo 1 _INBOX.\xff\xfe 0\r\n\r\n";

    /// A NATS server of a few lines on 127.0.0.1: completes each client's
    /// handshake, then poisons the first `poisoned` clients. Its URL, and
    /// how many clients connected.
    async fn fake_server(poisoned: usize) -> (String, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a port on 127.0.0.1");
        let url = format!(
            "nats://{}",
            listener.local_addr().expect("the listener's address")
        );
        let clients = Arc::new(AtomicUsize::new(0));
        let count = clients.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let n = count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let info = b"INFO {\"max_payload\":1048576,\"headers\":true,\"proto\":1}\r\n";
                    if stream.write_all(info).await.is_err() {
                        return;
                    }
                    // CONNECT, then PING: answered, then maybe poisoned.
                    let mut seen = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !seen.windows(6).any(|w| w == b"PING\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(k) => seen.extend_from_slice(&buf[..k]),
                        }
                    }
                    let mut answer = b"PONG\r\n".to_vec();
                    if n < poisoned {
                        answer.extend_from_slice(POISON);
                    }
                    if stream.write_all(&answer).await.is_err() {
                        return;
                    }
                    // Until the client goes.
                    while let Ok(1..) = stream.read(&mut buf).await {}
                });
            }
        });
        (url, clients)
    }

    fn config(url: &str) -> BridgeConfig {
        BridgeConfig::from_text(&format!("host_id = \"t\"\n[nats]\nservers = [\"{url}\"]\n"))
            .expect("a valid configuration")
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_client_whose_connection_task_panicked_is_replaced() {
        let (url, clients) = fake_server(1).await;
        let config = config(&url);
        let nats = Nats::new(connect(&config).await.expect("a client"));
        let replaced = Cell::new(0);
        let local = tokio::task::LocalSet::new();
        let flushed = local
            .run_until(async {
                let flushed = async {
                    let next = nats.replaced(1).await.expect("a new client");
                    next.flush().await
                };
                tokio::select! {
                    _ = heal(&nats, &config, Backoff::default(), &replaced) => unreachable!("heal returned"),
                    r = tokio::time::timeout(Duration::from_secs(10), flushed) => r,
                }
            })
            .await;
        let flushed = flushed.expect("no new client within 10 s");
        assert!(flushed.is_ok(), "the new client does not work: {flushed:?}");
        let current = nats.current();
        assert_eq!((current.number, current.alive), (2, true));
        assert!(nats.connected());
        assert_eq!(clients.load(Ordering::SeqCst), 2);
        assert_eq!(replaced.get(), 1);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn clients_killed_as_soon_as_they_connect_are_replaced_at_a_bounded_rate() {
        let (url, clients) = fake_server(usize::MAX).await;
        let config = config(&url);
        let nats = Nats::new(connect(&config).await.expect("a client"));
        let replaced = Cell::new(0);
        // Not a wait for a condition: the time over which the clients are
        // counted.
        let window = Duration::from_secs(3);
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                tokio::select! {
                    _ = heal(&nats, &config, Backoff::default(), &replaced) => unreachable!("heal returned"),
                    _ = tokio::time::sleep(window) => {}
                }
            })
            .await;
        let made = clients.load(Ordering::SeqCst);
        eprintln!("{made} clients in {window:?}");
        // Delays from 10 ms doubling to 1 s, times 0.75 at least: the first
        // 7 take 0.95 s, each next one 0.75 s, so in 3 s the first client
        // and at most 7 + 3 more (9 in all when measured). With a zero
        // backoff: 618 clients (and 0.83 s of CPU, measured when the client
        // ran on the test's thread; it runs on `zrpcd-nats`, shared with the
        // tests running beside this one, so its CPU is not asserted).
        assert!(made <= 11, "{made} clients in {window:?}");
        assert!(made >= 4, "it stopped making clients: {made} in {window:?}");
    }
}
