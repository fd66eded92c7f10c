//! The accept loop, the timer task and graceful shutdown.

use std::cell::RefCell;
use std::future::Future;
use std::rc::Rc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::net::UnixListener;
use zrpc_proto::{encode_frame, Envelope, ErrorCode};

use crate::broker::Broker;
use crate::config::Config;
use crate::conn;

/// Runs the broker on an already bound listener until `shutdown` resolves,
/// then shuts down gracefully. Must run inside a `tokio::task::LocalSet`.
pub async fn run(
    config: Config,
    listener: std::os::unix::net::UnixListener,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let listener = UnixListener::from_std(listener)?;
    let grace = config.shutdown_grace;
    let broker = Rc::new(RefCell::new(Broker::new(config)));
    let timers = tokio::task::spawn_local(timer_loop(broker.clone()));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let full = {
                        let b = broker.borrow();
                        b.peers.len() >= b.config.max_connections
                    };
                    if full {
                        refuse(&broker, stream);
                    } else {
                        tokio::task::spawn_local(conn::serve(broker.clone(), stream));
                    }
                }
                Err(e) => {
                    // EMFILE and friends: log, back off briefly, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = &mut shutdown => break,
        }
    }
    drop(listener);
    tracing::info!("shutting down");
    broker.borrow_mut().shutdown();
    // Bounded wait for writers to flush and peers to disconnect.
    let deadline = tokio::time::Instant::now() + grace;
    while !broker.borrow().peers.is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    timers.abort();
    Ok(())
}

fn refuse(broker: &RefCell<Broker>, stream: tokio::net::UnixStream) {
    let mut b = broker.borrow_mut();
    b.stats.connections_refused += 1;
    let max = b.config.max_connections;
    tracing::warn!(max, "connection refused: too many connections");
    let msg = format!("zrpcd already has {max} connections, the limit (--max-connections)");
    let mut out = BytesMut::new();
    encode_frame(
        &mut out,
        &Envelope::Fatal {
            code: ErrorCode::LimitExceeded,
            message: &msg,
        },
        &Bytes::new(),
    );
    // Best effort: the socket buffer of a new connection has room for it.
    let _ = stream.try_write(&out);
}

async fn timer_loop(broker: Rc<RefCell<Broker>>) {
    loop {
        let id = std::future::poll_fn(|cx| broker.borrow_mut().pending.poll_expired(cx)).await;
        let mut b = broker.borrow_mut();
        b.on_timeout(id);
        b.flush();
    }
}
