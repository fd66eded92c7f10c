//! The bridge's connection to its own broker: an ordinary zrpc peer
//! (docs/protocol.md) over one end of a socket pair whose other end the
//! broker admitted with the bridge's credentials.

use std::cell::{Cell, RefCell};

use bytes::{Bytes, BytesMut};
use rustc_hash::FxHashMap;
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot};
use zrpc_proto::{encode_frame, Envelope, ErrorCode};

/// A call's outcome: the broker's `Result`.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The error code (None: success).
    pub code: Option<ErrorCode>,
    /// The error's message.
    pub message: String,
    /// The return value or error value, unchanged.
    pub payload: Bytes,
}

/// The sending side of the link, and the calls and registrations awaiting
/// their answers.
pub struct Link {
    out: mpsc::UnboundedSender<Bytes>,
    conn_id: Cell<u64>,
    next: Cell<u64>,
    calls: RefCell<FxHashMap<u64, oneshot::Sender<Answer>>>,
    acks: RefCell<FxHashMap<u64, oneshot::Sender<Option<ErrorCode>>>>,
}

impl Link {
    /// A link whose frames go to `out` (written by [`writer`]).
    pub fn new(out: mpsc::UnboundedSender<Bytes>) -> Link {
        Link {
            out,
            conn_id: Cell::new(0),
            next: Cell::new(1),
            calls: RefCell::default(),
            acks: RefCell::default(),
        }
    }

    /// Queues one frame; false if the link is closed.
    pub fn send(&self, env: &Envelope<'_>, payload: &[u8]) -> bool {
        let mut buf = BytesMut::with_capacity(64 + payload.len());
        encode_frame(&mut buf, env, payload);
        self.out.send(buf.freeze()).is_ok()
    }

    /// The broker's id of this connection (0 before `Welcome`).
    pub fn conn_id(&self) -> u64 {
        self.conn_id.get()
    }

    pub(super) fn welcomed(&self, conn_id: u64) {
        self.conn_id.set(conn_id);
    }

    fn next_id(&self) -> u64 {
        let id = self.next.get();
        self.next.set(id.wrapping_add(1));
        id
    }

    /// Calls a local service through the broker; None if the link closed
    /// before the answer.
    pub async fn call(
        &self,
        service: &str,
        method: &str,
        timeout_ms: Option<u64>,
        payload: &[u8],
    ) -> Option<Answer> {
        self.start_call(None, service, method, timeout_ms, payload)?
            .1
            .await
            .ok()
    }

    /// Sends a call, with the given id (one not in flight) or a new one;
    /// its id (for [`Link::cancel_call`]) and where its answer arrives.
    /// None if the link is closed.
    pub fn start_call(
        &self,
        id: Option<u64>,
        service: &str,
        method: &str,
        timeout_ms: Option<u64>,
        payload: &[u8],
    ) -> Option<(u64, oneshot::Receiver<Answer>)> {
        let id = id.unwrap_or_else(|| self.next_id());
        let (tx, rx) = oneshot::channel();
        self.calls.borrow_mut().insert(id, tx);
        let sent = self.send(
            &Envelope::Call {
                id,
                service,
                method,
                timeout_ms,
                flags: 0,
            },
            payload,
        );
        if !sent {
            self.calls.borrow_mut().remove(&id);
            return None;
        }
        Some((id, rx))
    }

    /// Cancels call `id` at the broker (which then sends no `Result`); its
    /// answer is `Cancelled`.
    pub fn cancel_call(&self, id: u64) {
        if let Some(tx) = self.calls.borrow_mut().remove(&id) {
            self.send(&zrpc_proto::Envelope::Cancel { id }, &[]);
            let _ = tx.send(Answer {
                code: Some(ErrorCode::Cancelled),
                message: "the remote caller cancelled the call".to_owned(),
                payload: Bytes::new(),
            });
        }
    }

    /// Registers `name` (not shared); the `Ack`'s error code, or None
    /// inside Some on success; None if the link closed.
    pub async fn register(&self, name: &str) -> Option<Option<ErrorCode>> {
        let req = self.next_id();
        let (tx, rx) = oneshot::channel();
        self.acks.borrow_mut().insert(req, tx);
        if !self.send(
            &Envelope::Register {
                req,
                name,
                shared: false,
            },
            &[],
        ) {
            self.acks.borrow_mut().remove(&req);
            return None;
        }
        rx.await.ok()
    }

    pub(super) fn on_result(&self, id: u64, answer: Answer) {
        if let Some(tx) = self.calls.borrow_mut().remove(&id) {
            let _ = tx.send(answer);
        }
    }

    pub(super) fn on_ack(&self, req: u64, code: Option<ErrorCode>) {
        if let Some(tx) = self.acks.borrow_mut().remove(&req) {
            let _ = tx.send(code);
        }
    }
}

/// Writes the queued frames to the broker until the link is dropped or the
/// socket fails.
pub async fn writer(
    mut wr: tokio::net::unix::OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Bytes>,
) {
    while let Some(frame) = rx.recv().await {
        if let Err(e) = wr.write_all(&frame).await {
            tracing::error!(error = %e, "the NATS bridge cannot write to the broker");
            return;
        }
    }
}
