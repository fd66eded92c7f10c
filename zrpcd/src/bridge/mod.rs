//! The bridge from this broker to NATS (feature `nats`, `zrpcd --bridge
//! FILE`; design and semantics in docs/bridge.md).
//!
//! The bridge is a peer of the broker inside its process: [`start`] makes
//! a socket pair, admits one end with the bridge's configured credentials
//! ([`crate::conn::admit_as`]) and runs the bridge on the other end, where
//! it speaks the ordinary protocol (module `link`). The broker's call path is
//! untouched. Module `export` offers locally served names on NATS; `import`
//! holds imported names and forwards their calls to NATS; `nats` holds the
//! NATS client and makes a new one when async-nats's connection task dies.

mod cancels;
mod config;
mod dedupe;
mod export;
mod import;
mod link;
mod nats;

use std::cell::RefCell;
use std::rc::Rc;

use async_nats::HeaderMap;
use bytes::BytesMut;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use zrpc_proto::{Envelope, ErrorCode, FrameDecoder};

pub use config::{BridgeConfig, BridgeConfigError};

use crate::broker::bridged::BridgeCounters;
use crate::broker::Broker;
use crate::peers::Creds;
use link::{Answer, Link};

/// Request header: the method.
pub const H_METHOD: &str = "Zrpc-Method";
/// Request header: the remaining budget in ms when sent (absent: none).
pub const H_TIMEOUT_MS: &str = "Zrpc-Timeout-Ms";
/// Request header: the origin host's id.
pub const H_ORIGIN: &str = "Zrpc-Origin";
/// Request header: `<uid>.<instance>.<call>` of the original caller.
pub const H_CALLER: &str = "Zrpc-Caller";
/// Request and cancel header: the origin bridge's number for the request
/// (with `Zrpc-Origin` and `Zrpc-Epoch`, names it in a cancel message).
pub const H_REQUEST: &str = "Zrpc-Request";
/// Request and cancel header: a random number of the origin bridge's
/// process, since its request numbers start at 1 again when it restarts
/// (absent from bridges before it: an empty epoch).
pub const H_EPOCH: &str = "Zrpc-Epoch";
/// The longest `Zrpc-Origin`, `Zrpc-Caller` or `Zrpc-Epoch` the exporting
/// bridge accepts (a `host_id` is at most this long; a caller and an epoch
/// are much shorter). It remembers them (cancels that came before their
/// request, repeated-call keys), so their size must not be a NATS
/// message's: a request with a longer one is refused, a cancel ignored.
pub const MAX_ID_LEN: usize = 255;
/// Reply header: the error code (absent: success).
pub const H_CODE: &str = "Zrpc-Code";
/// Reply header: the error's message.
pub const H_MESSAGE: &str = "Zrpc-Message";

/// How often the bridge reads the broker's names to (un)subscribe exported
/// names and register imported ones.
const SYNC_INTERVAL: std::time::Duration = std::time::Duration::from_millis(250);

/// Why the bridge stopped.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// The NATS connection could not be set up.
    #[error("cannot connect to NATS ({servers}): {source}")]
    Connect {
        /// The configured servers.
        servers: String,
        /// The cause.
        source: async_nats::ConnectError,
    },
    /// The NATS client's thread could not be started.
    #[error("cannot start the NATS client's thread: {0}")]
    Thread(String),
    /// The broker is shutting down.
    #[error("the broker is shutting down")]
    Shutdown,
    /// The link to the broker broke.
    #[error("the bridge's link to the broker failed: {0}")]
    Link(String),
}

/// The running bridge; stops it when dropped.
pub struct Bridge {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Bridge {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Everything the bridge's tasks share.
struct Shared {
    config: BridgeConfig,
    /// The current NATS client (a new one after one died).
    nats: nats::Nats,
    link: Link,
    /// Imported calls in flight, by the broker's id: aborted on `Cancel`.
    imports: RefCell<rustc_hash::FxHashMap<u64, import::InFlight>>,
    /// The number of the next imported call's NATS request.
    next_request: std::cell::Cell<u64>,
    /// This process's `Zrpc-Epoch`: with the request number, names an
    /// imported call's NATS request across restarts of this broker.
    epoch: String,
    /// Exported calls in flight, by what their cancel messages name.
    exports: RefCell<cancels::Cancels>,
    /// What `zrpcd.stats` shows under `bridge`.
    counters: Rc<BridgeCounters>,
    /// Resubmitted exported calls (at most once).
    dedupe: RefCell<dedupe::Dedupe>,
    /// Requests from NATS being answered (`[export] max_in_flight`).
    exported_in_flight: std::cell::Cell<usize>,
}

/// Warns about each `[export]` and `[import]` pattern that no `[[own]]`
/// rule of the policy covers: any local user may then serve such a name,
/// and take a share of its calls from every host (exported names: one NATS
/// queue group per name) or the calls of this host's callers (an exact
/// imported name: local first). Red-team pass 7 did both; docs/bridge.md.
fn warn_unreserved(policy: &crate::policy::Policy, config: &BridgeConfig) {
    for (kind, pattern) in config
        .export
        .iter()
        .map(|p| ("export", p))
        .chain(config.import.iter().map(|p| ("import", p)))
    {
        if !policy.covers(pattern) {
            tracing::warn!(
                pattern = %pattern,
                "[{kind}] {pattern:?} has no [[own]] rule in the policy: any local user may serve such a name and take calls meant for the service on this or another host; reserve it for the uid that serves it (docs/bridge.md)"
            );
        }
    }
}

/// Starts the bridge: admits its connection to `broker` and spawns its
/// task (on the current `LocalSet`). Errors only if the connection cannot
/// be made.
pub fn start(broker: &Rc<RefCell<Broker>>, config: BridgeConfig) -> std::io::Result<Bridge> {
    warn_unreserved(&broker.borrow().config.policy, &config);
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
    ours.set_nonblocking(true)?;
    theirs.set_nonblocking(true)?;
    let theirs = tokio::net::UnixStream::from_std(theirs)?;
    let creds = Creds {
        pid: i32::try_from(std::process::id()).unwrap_or(0),
        uid: config.uid,
        gid: config.gid,
    };
    let counters = match crate::conn::admit_as(broker, theirs, creds, Some(Box::new([]))) {
        Ok(admitted) => {
            let counters = broker.borrow_mut().set_bridge_peer(admitted.id());
            tokio::task::spawn_local(crate::conn::serve(broker.clone(), admitted));
            counters
        }
        Err(_) => {
            return Err(std::io::Error::other(
                "the broker refused the NATS bridge's connection (connection limit or quota)",
            ))
        }
    };
    let ours = tokio::net::UnixStream::from_std(ours)?;
    let task = tokio::task::spawn_local(async move {
        match run(config, ours, counters).await {
            Ok(()) | Err(BridgeError::Shutdown) => tracing::info!("the NATS bridge stopped"),
            Err(e) => {
                tracing::error!(error = %e, "the NATS bridge stopped; local calls are not affected")
            }
        }
    });
    Ok(Bridge { task })
}

async fn run(
    config: BridgeConfig,
    stream: tokio::net::UnixStream,
    counters: Rc<BridgeCounters>,
) -> Result<(), BridgeError> {
    let nats = nats::Nats::new(nats::connect(&config).await?);
    let (mut rd, wr) = stream.into_split();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::task::spawn_local(link::writer(wr, rx));
    let agent = format!("zrpcd-nats-bridge {}", config.host_id);
    let dedupe = RefCell::new(dedupe::Dedupe::new(config.max_joins));
    let shared = Rc::new(Shared {
        config,
        nats,
        link: Link::new(tx),
        imports: RefCell::default(),
        next_request: std::cell::Cell::new(1),
        epoch: format!("{:016x}", random_u64()),
        exports: RefCell::default(),
        counters,
        dedupe,
        exported_in_flight: std::cell::Cell::new(0),
    });
    shared.link.send(
        &Envelope::Hello {
            version: zrpc_proto::PROTOCOL_VERSION,
            instance: random_u64(),
            agent: &agent,
            // No descriptor passing: the broker inlines large payloads for
            // the bridge, which sends bytes over NATS anyway.
            caps: 0,
        },
        &[],
    );
    let sync = tokio::task::spawn_local(export::sync_loop(shared.clone()));
    let _stop_sync = AbortOnDrop(sync.abort_handle());
    let heal = tokio::task::spawn_local({
        let shared = shared.clone();
        async move {
            let backoff = zrpc_io::Backoff::default();
            let replaced = &shared.counters.clients_replaced;
            nats::heal(&shared.nats, &shared.config, backoff, replaced).await
        }
    });
    let _stop_heal = AbortOnDrop(heal.abort_handle());
    let decoder = FrameDecoder::new(u32::MAX);
    let mut buf = BytesMut::with_capacity(64 * 1024);
    loop {
        loop {
            let frame = match decoder.decode(&mut buf) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => return Err(BridgeError::Link(format!("bad frame from broker: {e}"))),
            };
            let env = frame
                .decode()
                .map_err(|e| BridgeError::Link(format!("bad envelope from broker: {e}")))?;
            on_frame(&shared, env, frame.payload.clone())?;
        }
        match rd.read_buf(&mut buf).await {
            Ok(0) => return Err(BridgeError::Link("the broker closed the link".into())),
            Ok(_) => {}
            Err(e) => return Err(BridgeError::Link(e.to_string())),
        }
    }
}

fn on_frame(
    shared: &Rc<Shared>,
    env: Envelope<'_>,
    payload: bytes::Bytes,
) -> Result<(), BridgeError> {
    match env {
        Envelope::Welcome { conn_id, .. } => shared.link.welcomed(conn_id),
        Envelope::Ping { nonce } => {
            shared.link.send(&Envelope::Pong { nonce }, &[]);
        }
        Envelope::Ack { req, code, .. } => shared.link.on_ack(req, code),
        Envelope::Result { id, code, message } => shared.link.on_result(
            id,
            Answer {
                code,
                message: message.to_owned(),
                payload,
            },
        ),
        Envelope::Request {
            id,
            service,
            method,
            timeout_ms,
            caller_instance,
            caller_call,
            caller,
        } => import::forward(
            shared,
            import::Forward {
                id,
                flags: shared.counters.flags.borrow_mut().remove(&id).unwrap_or(0),
                service: service.to_owned(),
                method: method.to_owned(),
                timeout_ms,
                caller: format!(
                    "{}.{caller_instance}.{caller_call}",
                    caller.map_or(u32::MAX, |c| c.uid)
                ),
                payload,
            },
        ),
        Envelope::Cancel { id } => {
            shared.counters.flags.borrow_mut().remove(&id);
            import::cancel(shared, id)
        }
        Envelope::Fatal {
            code: ErrorCode::Shutdown,
            ..
        } => return Err(BridgeError::Shutdown),
        Envelope::Fatal { code, message } => {
            return Err(BridgeError::Link(format!(
                "the broker closed the link: {} ({message})",
                code.as_str()
            )))
        }
        _ => {}
    }
    Ok(())
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A random number (the instance id of the bridge's `Hello`, its epoch).
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.finish()
}

/// Headers of a reply carrying `code` and `message`.
fn reply_headers(code: Option<ErrorCode>, message: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if let Some(code) = code {
        headers.insert(H_CODE, code.to_u16().to_string().as_str());
        let clean: String = message
            .chars()
            .map(|c| if c == '\r' || c == '\n' { ' ' } else { c })
            .collect();
        headers.insert(H_MESSAGE, clean.as_str());
    }
    headers
}

/// Room left for the headers of a message when checking its payload
/// against the server's `max_payload` (which counts both).
const HEADER_ROOM: usize = 1024;

/// The error for a payload of `len` bytes the NATS server would refuse,
/// if it would: NATS closes a connection that sends one, so it is checked
/// before sending.
fn too_large(nats: &async_nats::Client, len: usize, what: &str) -> Option<String> {
    let max = nats.server_info().max_payload;
    (max > 0 && len + HEADER_ROOM > max).then(|| {
        format!(
            "{what} ({len} bytes) do not fit in a NATS message (max_payload {max} bytes, \
             less {HEADER_ROOM} for headers); raise max_payload on the NATS servers"
        )
    })
}

/// A header's value, if present.
fn header<'a>(headers: Option<&'a HeaderMap>, name: &str) -> Option<&'a str> {
    headers.and_then(|h| h.get(name)).map(|v| v.as_str())
}
