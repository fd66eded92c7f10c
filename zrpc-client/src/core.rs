//! The client core, without I/O: the calls in flight, what each frame from
//! the broker does to them, and what a lost or a new connection does to
//! them. Both clients are thin faces over it: the async [`Client`]
//! (callers are tokio tasks, woken through their `Waker`) and the
//! [`BlockingClient`] (callers are threads, woken by unparking them). The
//! faces own the sockets and decide when to read and write; the core is
//! fed frames and told about connections, and hands back what to send.
//!
//! Every call lives in the core from the moment it is submitted until its
//! caller takes its outcome: sent on a connection (`sent_on`), waiting for
//! the next connection (`sent_on` `None`: queued while disconnected, or
//! answered `Shutdown` by a broker going away), or answered (`done`).
//!
//! [`Client`]: crate::Client
//! [`BlockingClient`]: crate::BlockingClient

use std::collections::hash_map::Entry;
use std::task::{Poll, Waker};
use std::thread::Thread;
use std::time::Instant;

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};
use rustc_hash::FxHashMap;
use zrpc_proto::{Batch, Envelope, ErrorCode};

use crate::common::{control_frame, reconnect_timeout, resubmit_parts, Dead, OutFrame, Outcome};
use crate::{Error, Result};

/// Most `Event` payloads kept for a monitor: a bound in case its owner
/// stops taking them while the connection is still read (the broker itself
/// disconnects a monitor whose connection is not read).
const MAX_EVENTS: usize = 65_536;

/// Who waits for a call's outcome.
#[derive(Debug)]
pub(crate) enum Waiter {
    /// An async caller.
    Task(Waker),
    /// A blocking caller.
    Thread(Thread),
}

impl Waiter {
    /// Wakes the caller and keeps the waiter (the call goes on).
    fn wake_by_ref(&self) {
        match self {
            Waiter::Task(w) => w.wake_by_ref(),
            Waiter::Thread(t) => t.unpark(),
        }
    }

    /// Wakes the caller for the last time (its call is answered): the
    /// waker is consumed, no reference to it is left to drop later.
    fn wake(self) {
        match self {
            Waiter::Task(w) => w.wake(),
            Waiter::Thread(t) => t.unpark(),
        }
    }
}

/// A call whose caller has not taken its outcome yet.
#[derive(Debug)]
struct Call {
    /// The outcome, once known; the call is then only waiting for its
    /// caller, and is skipped by everything else.
    done: Option<Outcome>,
    /// The caller, woken when the outcome arrives (and when the call goes
    /// back to waiting for a connection, so that a blocking caller re-arms
    /// its timer for the call's own deadline).
    waiter: Option<Waiter>,
    /// The encoded `Call` frame, for resubmission.
    frame: OutFrame,
    /// The call's deadline (without the local safety margin).
    deadline: Option<Instant>,
    no_retry: bool,
    /// Generation of the connection the call was sent on; `None` while it
    /// waits for the next connection.
    sent_on: Option<u64>,
    /// The call was sent on a connection that ended (or was answered
    /// `Shutdown`) before its outcome came: a broker may have delivered it,
    /// so a later broker's "no service held the name" does not prove it
    /// never ran (see [`Core::dispatch`]).
    may_have_run: bool,
}

impl Call {
    /// Hands the call its outcome and wakes its caller. The call is then no
    /// longer on any connection (nothing to cancel or resend).
    fn finish(&mut self, outcome: Outcome) {
        if self.done.is_some() {
            return;
        }
        self.done = Some(outcome);
        self.sent_on = None;
        if let Some(w) = self.waiter.take() {
            w.wake();
        }
    }

    /// The call goes back to waiting for the next connection.
    fn requeue(&mut self) {
        self.sent_on = None;
        self.may_have_run = true;
        if let Some(w) = &self.waiter {
            w.wake_by_ref();
        }
    }

    fn answered(&self) -> bool {
        self.done.is_some()
    }
}

/// Where a call stands, for a caller deciding how long to wait.
#[derive(Debug)]
pub(crate) enum Stand {
    /// Answered: the outcome, taken out of the core.
    Done(Outcome),
    /// On the broker (`true`), or waiting for the next connection.
    Waiting { sent: bool },
    /// Unknown (the client's tasks stopped and dropped it).
    Gone,
}

/// What one batch of frames from the broker did.
#[derive(Debug, Default)]
pub(crate) struct Dispatched {
    /// The connection must end, for this reason.
    pub end: Option<Dead>,
    /// The `Pong` frames to send, encoded.
    pub pongs: Option<BytesMut>,
    /// Calls that got their outcome.
    pub delivered: usize,
    /// `Event` frames queued.
    pub events: usize,
    /// The call `watch` got its outcome or went back to waiting for a
    /// connection.
    pub watched: bool,
}

impl Dispatched {
    /// Nothing dispatched: the connection must end for `why`.
    pub fn ended(why: Dead) -> Dispatched {
        Dispatched {
            end: Some(why),
            ..Dispatched::default()
        }
    }
}

/// The code and message of a result for a call that an earlier broker may
/// have delivered: "no service held the name" (`NoSuchService` of a
/// `no_wait` call, `TimeoutNoService`) speaks only for the broker that
/// answered, so it becomes what a call that may have run gets
/// (`ServiceGone`, `Timeout`).
fn may_have_run(code: ErrorCode, message: &str) -> (ErrorCode, String) {
    let code = match code {
        ErrorCode::NoSuchService => ErrorCode::ServiceGone,
        ErrorCode::TimeoutNoService => ErrorCode::Timeout,
        other => return (other, message.to_owned()),
    };
    let message = format!("{message} (the call was sent before a reconnection and may have run)");
    (code, message)
}

/// The calls of one client. Connections are told apart by generation
/// numbers the faces give them.
#[derive(Debug, Default)]
pub(crate) struct Core {
    calls: FxHashMap<u64, Call>,
    /// Payloads of the broker's `Event` frames not taken yet, at most
    /// [`MAX_EVENTS`]; `None` (the default) unless a `zrpc_client::Monitor`
    /// owns the client: a plain client ignores `Event` frames.
    events: Option<VecDeque<Bytes>>,
    /// The client was closed: no more calls.
    closed: bool,
}

impl Core {
    /// Registers call `id` (a copy of its frame is kept for
    /// resubmission), about to be sent on connection `on` (`None`: it is
    /// sent once connected). Returns the number of calls in the core.
    #[inline]
    pub fn submit(
        &mut self,
        id: u64,
        frame: &OutFrame,
        deadline: Option<Instant>,
        no_retry: bool,
        waiter: Waiter,
        on: Option<u64>,
    ) -> Result<usize> {
        if self.closed {
            return Err(Error::Disconnected("the client was closed".into()));
        }
        // Built in place in the table: a call is ~150 bytes, not worth
        // moving through the faces.
        self.calls.insert(
            id,
            Call {
                done: None,
                waiter: Some(waiter),
                frame: frame.clone(),
                deadline,
                no_retry,
                sent_on: on,
                may_have_run: false,
            },
        );
        Ok(self.calls.len())
    }

    /// The outcome of call `id` if it is known (the call leaves the core);
    /// otherwise remembers `waker` as its waiter. `Ready(None)`: the call is
    /// unknown.
    pub fn poll(&mut self, id: u64, waker: &Waker) -> Poll<Option<Outcome>> {
        match self.calls.entry(id) {
            Entry::Occupied(e) if e.get().answered() => Poll::Ready(e.remove().done),
            Entry::Occupied(mut e) => {
                let c = e.get_mut();
                if !matches!(&c.waiter, Some(Waiter::Task(w)) if w.will_wake(waker)) {
                    c.waiter = Some(Waiter::Task(waker.clone()));
                }
                Poll::Pending
            }
            Entry::Vacant(_) => Poll::Ready(None),
        }
    }

    /// Where call `id` stands; an answered call leaves the core.
    pub fn stand(&mut self, id: u64) -> Stand {
        match self.calls.entry(id) {
            Entry::Occupied(e) if e.get().answered() => match e.remove().done {
                Some(o) => Stand::Done(o),
                None => Stand::Gone,
            },
            Entry::Occupied(e) => Stand::Waiting {
                sent: e.get().sent_on.is_some(),
            },
            Entry::Vacant(_) => Stand::Gone,
        }
    }

    /// Whether call `id` waits for its outcome on the broker (`true`) or
    /// for a connection (`false`); `None` if it is answered or unknown.
    pub fn waiting(&self, id: u64) -> Option<bool> {
        self.calls
            .get(&id)
            .filter(|c| !c.answered())
            .map(|c| c.sent_on.is_some())
    }

    /// Call `id` was certainly not written to connection `gen`: it waits
    /// for the next connection.
    pub fn unsend(&mut self, id: u64, gen: u64) {
        if let Some(c) = self.calls.get_mut(&id) {
            if c.sent_on == Some(gen) {
                c.sent_on = None;
            }
        }
    }

    /// The call's own deadline passed: if it is not on the broker (waiting
    /// for a connection), forget it and return true; nobody else would
    /// answer it.
    pub fn expire_unsent(&mut self, id: u64) -> bool {
        match self.calls.get(&id) {
            Some(c) if c.sent_on.is_none() && !c.answered() => {
                self.calls.remove(&id);
                true
            }
            _ => false,
        }
    }

    /// Abandons call `id`. Returns the generation of the connection it was
    /// sent on, if any (the face sends `Cancel` there if that connection is
    /// still live; an answered call is on none).
    pub fn cancel(&mut self, id: u64) -> Option<u64> {
        self.calls.remove(&id)?.sent_on
    }

    /// The client was closed: every unanswered call fails with `why`.
    pub fn close(&mut self, why: &Dead) {
        self.closed = true;
        self.fail_all(why);
    }

    /// Every unanswered call fails with `why` (the client's tasks stopped).
    pub fn fail_all(&mut self, why: &Dead) {
        for c in self.calls.values_mut() {
            c.finish(Outcome::Dead(why.clone()));
        }
    }

    /// Keeps the broker's `Event` frames from now on (for a monitor).
    pub fn watch_events(&mut self) {
        self.events.get_or_insert_with(VecDeque::new);
    }

    /// The oldest `Event` payload not taken yet.
    pub fn pop_event(&mut self) -> Option<Bytes> {
        self.events.as_mut()?.pop_front()
    }

    /// Whether the client was closed.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Whether some call waits for its outcome.
    pub fn has_unanswered(&self) -> bool {
        self.calls.values().any(|c| !c.answered())
    }

    /// Calls in the core (answered ones whose callers have not taken the
    /// outcome included).
    pub fn len(&self) -> usize {
        self.calls.len()
    }

    /// Answered calls whose callers have not taken the outcome yet.
    #[cfg(test)]
    pub fn answered(&self) -> usize {
        self.calls.values().filter(|c| c.answered()).count()
    }

    /// Wakes the caller of some unanswered call (a blocking client hands
    /// the reader role on to it).
    pub fn wake_one(&self) {
        if let Some(w) = self
            .calls
            .values()
            .filter(|c| !c.answered())
            .find_map(|c| c.waiter.as_ref())
        {
            w.wake_by_ref();
        }
    }

    /// Connection `gen` ended for `why`: calls whose deadline passed time
    /// out, calls sent on it with `no_retry` fail (they may or may not have
    /// run), the rest wait for the next connection. Returns how many wait.
    pub fn lost(&mut self, gen: u64, why: &Dead, now: Instant) -> usize {
        let mut waiting = 0;
        for c in self.calls.values_mut().filter(|c| !c.answered()) {
            if c.deadline.is_some_and(|d| now >= d) {
                c.finish(reconnect_timeout());
            } else if c.sent_on == Some(gen) && c.no_retry {
                c.finish(Outcome::Dead(why.clone()));
            } else {
                if c.sent_on == Some(gen) {
                    c.requeue();
                }
                waiting += 1;
            }
        }
        waiting
    }

    /// Connection `gen` is up (the broker's limit is `max`): every call
    /// waiting for a connection is resubmitted on it, with the same id and
    /// the remaining budget, through `send` (in the order they are to be
    /// written: before any call made later). Returns how many.
    pub fn install(
        &mut self,
        gen: u64,
        max: u32,
        now: Instant,
        mut send: impl FnMut(&OutFrame),
    ) -> usize {
        let mut resent = 0;
        for c in self.calls.values_mut() {
            if c.answered() || c.sent_on.is_some() {
                continue;
            }
            let remaining = match c.deadline {
                None => None,
                Some(d) => match d.checked_duration_since(now) {
                    Some(r) if !r.is_zero() => Some(r),
                    _ => {
                        c.finish(reconnect_timeout());
                        continue;
                    }
                },
            };
            match resubmit_parts(&c.frame, remaining, max) {
                Ok(frame) => {
                    send(&frame);
                    c.sent_on = Some(gen);
                    resent += 1;
                }
                Err(e) => c.finish(Outcome::Failed(
                    e.code().unwrap_or(ErrorCode::Protocol),
                    e.to_string(),
                    Bytes::new(),
                )),
            }
        }
        resent
    }

    /// Handles a batch of frames from the broker: results go to their
    /// calls (a `Shutdown` result sends a call that may be retried back to
    /// waiting for the next broker), pings are answered, `Fatal` or a bad
    /// frame ends the connection. `watch` is a call whose change the face
    /// wants to know about (see [`Dispatched::watched`]).
    ///
    /// `mapped` holds, in order, the payloads of the batch's frames that
    /// came in descriptors (already verified and mapped by the face).
    pub fn dispatch(
        &mut self,
        batch: &Batch,
        watch: Option<u64>,
        mapped: &mut VecDeque<Bytes>,
    ) -> Dispatched {
        let mut out = Dispatched::default();
        let mut frames = batch.frames();
        while let Some((envelope, payload, has_fd)) = frames.next_with_fd() {
            let in_fd = if has_fd { mapped.pop_front() } else { None };
            let payload_of = |p: &[u8]| in_fd.clone().unwrap_or_else(|| batch.payload(p));
            match Envelope::decode(envelope) {
                Ok(Envelope::Result { id, code, message }) => {
                    let Some(c) = self.calls.get_mut(&id).filter(|c| !c.answered()) else {
                        continue;
                    };
                    if code == Some(ErrorCode::Shutdown) && !c.no_retry {
                        // The broker is going away without having run the
                        // call: send it again to the next broker.
                        c.requeue();
                    } else {
                        c.finish(match code {
                            Some(code) => {
                                // An error's value is copied: kept in an
                                // `Error`, a view would pin the whole batch.
                                let value = Bytes::copy_from_slice(&payload_of(payload));
                                let (code, message) = if c.may_have_run {
                                    may_have_run(code, message)
                                } else {
                                    (code, message.to_owned())
                                };
                                Outcome::Failed(code, message, value)
                            }
                            None => Outcome::Ok(payload_of(payload)),
                        });
                        out.delivered += 1;
                    }
                    out.watched |= watch == Some(id);
                }
                Ok(Envelope::Ping { nonce }) => {
                    let pongs = out.pongs.get_or_insert_with(|| BytesMut::with_capacity(16));
                    control_frame(pongs, &Envelope::Pong { nonce });
                }
                Ok(Envelope::Pong { .. }) => {}
                Ok(Envelope::Event { .. }) => {
                    // Kept only for a monitor (see `watch_events`).
                    if let Some(events) = self.events.as_mut() {
                        if events.len() == MAX_EVENTS {
                            tracing::debug!(
                                "zrpc-client: monitor events not taken; dropping the oldest"
                            );
                            events.pop_front();
                        }
                        events.push_back(payload_of(payload));
                        out.events += 1;
                    }
                }
                Ok(Envelope::Fatal { code, message }) => {
                    out.end = Some(Dead::Fatal(code, message.to_owned()));
                    break;
                }
                Ok(other) => {
                    tracing::debug!(kind = ?other.kind(), "zrpc-client: ignoring unexpected frame");
                }
                Err(e) => {
                    out.end = Some(Dead::Fatal(
                        ErrorCode::Protocol,
                        format!("bad envelope from the broker: {e}"),
                    ));
                    break;
                }
            }
        }
        out
    }
}
