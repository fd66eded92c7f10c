//! The handlers running concurrently (`&self` methods started by
//! [`Service::handle_shared`](crate::Service::handle_shared)): polled
//! together by the server loop, each cancellable by its request id, each
//! carrying what its reply needs.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};

use bytes::Bytes;
use futures_util::future::{AbortHandle, Abortable};
use futures_util::stream::{FuturesUnordered, StreamExt};

use crate::cache::CallKey as Key;
use crate::conn::Pending;
use crate::context::Name;
use crate::unwind::CatchUnwind;
use crate::{HandlerError, HandlerFuture};

/// Default of [`Server::max_concurrent`](crate::Server::max_concurrent).
pub const DEFAULT_MAX_CONCURRENT: usize = 64;

/// Default of [`Server::max_queued`](crate::Server::max_queued).
pub const DEFAULT_MAX_QUEUED: usize = 1024;

/// What the reply of one request needs once its handler is done.
pub(crate) struct Meta {
    pub(crate) id: u64,
    /// The connection the request came on.
    pub(crate) generation: u64,
    pub(crate) key: Option<Key>,
    pub(crate) service: Name,
    pub(crate) method: Name,
    /// The request payload's address range and whether its frame had an
    /// allocation of its own (see `conn::own_reply`).
    pub(crate) request: (usize, usize, bool),
    /// The request payload, kept alive until `own_reply` has compared
    /// addresses: freed earlier, its memory could be reused by an unrelated
    /// buffer the reply points into.
    pub(crate) request_alive: Bytes,
}

/// One running handler: its future (abortable) and its [`Meta`].
struct Task {
    meta: Option<Meta>,
    fut: Abortable<CatchUnwind<HandlerFuture<'static>>>,
}

impl Future for Task {
    /// The request and its outcome; `None`: cancelled.
    type Output = (Meta, Option<Result<Bytes, HandlerError>>);

    fn poll(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let outcome = match Pin::new(&mut this.fut).poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(r) => r.ok(),
        };
        match this.meta.take() {
            Some(meta) => Poll::Ready((meta, outcome)),
            // Polled again after it was done: FuturesUnordered never does.
            None => Poll::Pending,
        }
    }
}

/// The set of running concurrent handlers, at most `limit` of them.
pub(crate) struct Running {
    set: FuturesUnordered<Task>,
    /// `(generation, request id, reply-cache key, abort handle)` of each
    /// running handler: found by id to cancel it, by key to hold back a
    /// re-sent copy of its call.
    handles: Vec<(u64, u64, Option<Key>, AbortHandle)>,
    /// Re-sent copies of running calls, with the connection generation
    /// they came on: set aside (so that the requests behind them go on)
    /// until their first execution ends, then queued again and answered
    /// from the reply cache.
    parked: Vec<(u64, Key, Pending)>,
    pub(crate) limit: usize,
}

impl Running {
    pub(crate) fn new() -> Self {
        Running {
            set: FuturesUnordered::new(),
            handles: Vec::new(),
            parked: Vec::new(),
            limit: DEFAULT_MAX_CONCURRENT,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.handles.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Whether another handler may start.
    pub(crate) fn has_room(&self) -> bool {
        self.handles.len() < self.limit
    }

    /// Whether the call `key` identifies is running.
    pub(crate) fn runs(&self, key: Key) -> bool {
        self.handles.iter().any(|h| h.2 == Some(key))
    }

    /// Sets aside `req`, a re-sent copy of the running call `key`, that
    /// came on connection `generation`.
    pub(crate) fn park(&mut self, generation: u64, key: Key, req: Pending) {
        self.parked.push((generation, key, req));
    }

    /// The copies set aside for the call `key` (whose execution ended), in
    /// arrival order, that came on connection `generation` (copies from an
    /// earlier connection are dropped: the broker re-delivers them).
    pub(crate) fn unpark(&mut self, generation: u64, key: Option<Key>) -> Vec<Pending> {
        let Some(key) = key else {
            return Vec::new();
        };
        if !self.parked.iter().any(|p| p.1 == key) {
            return Vec::new();
        }
        let (mine, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.parked)
            .into_iter()
            .partition(|p| p.1 == key);
        self.parked = rest;
        mine.into_iter()
            .filter(|p| p.0 == generation)
            .map(|p| p.2)
            .collect()
    }

    /// Adds a started handler.
    pub(crate) fn push(&mut self, meta: Meta, fut: CatchUnwind<HandlerFuture<'static>>) {
        let (handle, registration) = AbortHandle::new_pair();
        self.handles
            .push((meta.generation, meta.id, meta.key, handle));
        self.set.push(Task {
            meta: Some(meta),
            fut: Abortable::new(fut, registration),
        });
    }

    /// Cancels the handler of request `id` on connection `generation`, if
    /// it runs: it is dropped at its next poll and reported as cancelled.
    /// A copy of a running call set aside under that id is dropped (its
    /// caller is gone: it must not run once the execution it waits for is
    /// cancelled too, as the broker does for a call its caller resubmitted
    /// and then left for good).
    pub(crate) fn cancel(&mut self, generation: u64, id: u64) -> bool {
        let parked = self.parked.len();
        self.parked.retain(|p| !(p.0 == generation && p.2.id == id));
        match self.handles.iter().find(|h| h.0 == generation && h.1 == id) {
            Some(h) => {
                h.3.abort();
                true
            }
            None => self.parked.len() != parked,
        }
    }

    /// The next handler to finish (pending while none has; never ready
    /// when the set is empty).
    pub(crate) async fn next(&mut self) -> (Meta, Option<Result<Bytes, HandlerError>>) {
        loop {
            if self.set.is_empty() {
                std::future::pending::<()>().await;
            }
            if let Some(done) = self.set.next().await {
                let (generation, id) = (done.0.generation, done.0.id);
                self.handles.retain(|h| !(h.0 == generation && h.1 == id));
                return done;
            }
        }
    }
}
