//! Per-peer outbound queue: frames are appended by the routing code and
//! flushed by the peer's writer task, all queued frames in one vectored write
//! per wake-up.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};
use tokio::sync::Notify;
use zrpc_proto::{encode_header, Envelope};

/// Payloads at least this large are queued as their own slice (forwarded as
/// the very bytes they arrived in) instead of being copied.
const ZERO_COPY_MIN: usize = 8 * 1024;

/// Frames waiting to be written to one peer.
#[derive(Debug, Default)]
pub struct OutQueue {
    chunks: VecDeque<Bytes>,
    cur: BytesMut,
    bytes: usize,
}

impl OutQueue {
    /// Appends a frame. Small payloads are copied next to their header so a
    /// burst of small frames becomes one contiguous buffer; large payloads
    /// are queued by reference.
    pub fn push(&mut self, env: &Envelope<'_>, payload: &Bytes) {
        let before = self.cur.len();
        encode_header(&mut self.cur, env, payload.len());
        self.bytes += self.cur.len() - before + payload.len();
        if payload.len() >= ZERO_COPY_MIN {
            let head = self.cur.split().freeze();
            self.chunks.push_back(head);
            self.chunks.push_back(payload.clone());
        } else {
            self.cur.extend_from_slice(payload);
        }
    }

    /// Bytes queued and not yet handed to the writer.
    pub fn len_bytes(&self) -> usize {
        self.bytes
    }

    /// Takes everything queued, in order, into `out`.
    pub fn take_into(&mut self, out: &mut Vec<Bytes>) {
        out.extend(self.chunks.drain(..));
        if !self.cur.is_empty() {
            out.push(self.cur.split().freeze());
        }
        self.bytes = 0;
        // Give back memory from a burst once idle (small idle connections).
        if self.cur.capacity() > 256 * 1024 {
            self.cur = BytesMut::new();
        }
    }
}

/// The part of a peer its writer task shares with the routing code.
#[derive(Debug, Default)]
pub struct PeerIo {
    /// Frames to write.
    pub queue: RefCell<OutQueue>,
    /// Wakes the writer.
    pub notify: Notify,
    /// Set when the connection is to be closed once the queue is flushed.
    pub closed: Cell<bool>,
    /// Set while the peer is on the broker's list of writers to wake.
    pub dirty: Cell<bool>,
    /// Wakes the reader to make it stop (the broker dropped the peer).
    pub kill: Notify,
}

impl PeerIo {
    /// Queues a frame (the caller wakes the writer via the dirty list).
    pub fn push(&self, env: &Envelope<'_>, payload: &Bytes) {
        self.queue.borrow_mut().push(env, payload);
    }

    /// Asks the writer to flush what is queued and close, and the reader to
    /// stop reading.
    pub fn close(&self) {
        if !self.closed.replace(true) {
            self.notify.notify_one();
            self.kill.notify_one();
        }
    }
}
