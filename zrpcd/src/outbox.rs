//! Which peers have frames waiting, and when they are written.
//!
//! Routing only queues frames (`PeerIo::push`). Each connection's read
//! batch ends with [`Outbox::end_batch`], which does not write: it wakes the
//! broker's flusher task once. The flusher runs after every other task woken
//! by the same wake-up of the runtime (tokio's current-thread scheduler runs
//! woken tasks in order), so when 16 clients' calls arrive together, every
//! client connection is read first and the service gets them all in one
//! write, not one write per client: one write per peer per wake-up of the
//! broker, as the raw relay does with its `epoll_wait` batch.
//!
//! Frames with a large payload (8 KiB or more, queued by reference) are
//! written at once: batching saves nothing there.
//!
//! The other exception is a burst: once one read batch has queued
//! [`FLUSH_EVERY_FRAMES`](crate::queue::FLUSH_EVERY_FRAMES) frames to a peer,
//! that peer is written at once (with 64 calls arriving in one read, the
//! service starts on the first 16 while the broker routes the rest: the
//! three processes overlap instead of taking turns on a whole batch),
//! unless the peer is a service that already has that many requests written
//! to it and unanswered: it has work, so the early write would not start it
//! sooner, and waiting lets the burst share the wake-up's one write (16
//! clients x 16 calls: 4 times fewer writes to the service, measured).

use std::rc::Rc;

use tokio::sync::Notify;
use zrpc_proto::Envelope;

use crate::payload::Payload;
use crate::queue::PeerIo;

/// The peers with queued frames, and the flusher's wake-up.
#[derive(Debug, Default)]
pub struct Outbox {
    dirty: Vec<Rc<PeerIo>>,
    /// Number of the current read batch (wrapping).
    batch: u32,
    /// The flusher was woken and has not flushed yet.
    scheduled: bool,
    /// Wakes the flusher task (see [`Outbox::end_batch`]).
    wake: Rc<Notify>,
}

impl Outbox {
    /// Queues a frame to `io` and remembers `io` as dirty; writes it out at
    /// once if the current read batch has now queued
    /// [`FLUSH_EVERY_FRAMES`](crate::queue::FLUSH_EVERY_FRAMES) frames to it.
    pub fn enqueue(&mut self, io: &Rc<PeerIo>, env: &Envelope<'_>, payload: Payload<'_>) {
        self.enqueue_for(io, env, payload, false);
    }

    /// [`Outbox::enqueue`] for a request to a service; `busy`: the service
    /// already has [`FLUSH_EVERY_FRAMES`](crate::queue::FLUSH_EVERY_FRAMES)
    /// written requests to work on, so an early write would not start it
    /// any sooner: the frame waits for the end of the wake-up, where it
    /// shares one write with the rest (when 16 clients call at once, the
    /// service gets a few large writes instead of one per client read).
    pub fn enqueue_for(
        &mut self,
        io: &Rc<PeerIo>,
        env: &Envelope<'_>,
        payload: Payload<'_>,
        busy: bool,
    ) {
        // A large payload is written at once: batching saves nothing on a
        // write that large, and the peer starts on it sooner.
        let large = payload.len() >= crate::queue::ZERO_COPY_MIN;
        let full = (io.push(env, payload, self.batch) && !busy) || large;
        if !io.dirty.replace(true) {
            self.dirty.push(io.clone());
        }
        if full {
            io.flush();
        }
    }

    /// A connection starts handing in the frames of one read.
    pub fn begin_batch(&mut self) {
        self.batch = self.batch.wrapping_add(1);
    }

    /// A connection's read batch is routed: the dirty peers are written by
    /// the flusher task, after the other tasks woken with this one.
    pub fn end_batch(&mut self) {
        if !self.dirty.is_empty() && !self.scheduled {
            self.scheduled = true;
            self.wake.notify_one();
        }
    }

    /// What the flusher task waits on.
    pub fn waker(&self) -> Rc<Notify> {
        self.wake.clone()
    }

    /// Writes out every dirty peer now: one vectored write each.
    pub fn flush(&mut self) {
        self.scheduled = false;
        for io in self.dirty.drain(..) {
            io.dirty.set(false);
            io.flush();
        }
    }
}
