//! Handling one request: the reply cache for re-sent calls, running the
//! handler while the connection is still served (pings, cancels,
//! reconnects), and the reply.

use std::future::{poll_fn, Future};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::rc::Rc;
use std::task::Poll;

use bytes::Bytes;

use crate::cache::{Outcome, ReplyCache};
use crate::conn::{own_reply, wire_outcome, Pending};
use crate::error::{Error, Event};
use crate::link::{Link, Setup, Work};
use crate::running::{Meta, Running};
use crate::stop::{Step, Stop};
use crate::unwind::{panicked, CatchUnwind};
use crate::{Context, HandlerError, MethodInfo, Service, DESCRIBE_METHOD};

#[derive(serde::Serialize)]
struct Describe<'a> {
    service: &'a str,
    methods: Vec<MethodInfo>,
}

fn describe<S: Service>(service: &S, ctx: &Context) -> Result<Bytes, HandlerError> {
    let methods =
        catch_unwind(AssertUnwindSafe(|| service.methods())).map_err(|p| panicked(&*p))?;
    crate::encode_value(&Describe {
        service: ctx.service(),
        methods,
    })
}

/// Runs one exclusive handler (`&mut self`) to completion while still
/// serving the connection: pings are answered, new requests queued, a lost
/// connection is re-established (when reconnecting), and a `Cancel` of this
/// request drops the handler (`None`). A handler is never dropped because
/// the connection is lost: it runs to its end, and a hard error met
/// meanwhile is kept in [`Link::deferred`].
async fn run_exclusive<S: Service>(
    service: &mut S,
    link: &mut Link,
    setup: &Setup,
    ctx: &Context,
    payload: Bytes,
    max_queued: usize,
    stop: &mut Stop,
) -> Option<Result<Bytes, HandlerError>> {
    let fut = match catch_unwind(AssertUnwindSafe(|| {
        service.handle(ctx, ctx.method(), payload)
    })) {
        Ok(f) => f,
        Err(p) => return Some(Err(panicked(&*p))),
    };
    let mut fut = CatchUnwind::new(fut);
    // Synchronous handlers finish in their first poll; only flush the
    // replies batched so far when this one has to wait.
    if let Poll::Ready(r) = poll_once(&mut fut).await {
        return Some(r);
    }
    flush_or_defer(link).await;
    let running = Some((link.generation, ctx.request_id()));
    while link.deferred.is_none() {
        // Requests read meanwhile queue up to `max_queued`, then the
        // connection is not read (backpressure to the broker).
        let read = link
            .conn
            .as_ref()
            .is_none_or(|c| c.queue.len() < max_queued);
        tokio::select! {
            biased;
            r = &mut fut => return Some(r),
            w = link.work(setup, running, read) => match w {
                Ok(Work::CancelledRunning) => return None,
                Ok(Work::Progress) => {}
                Err(e) => link.deferred = Some(e),
            },
            // A stop starts (the names released), or gives up: the handler
            // is dropped like a cancelled one (the broker re-delivers its
            // call once the connection is closed).
            () = stop.wake() => {
                if stop.step(&setup.names, link, || 1) == Step::GiveUp {
                    return None;
                }
                // The `Unregister`s a drain just queued go out now: the
                // broker may send nothing (no call, no ping) for as long
                // as the handler runs, and `link.work` writes only after
                // a read.
                flush_or_defer(link).await;
            }
        }
    }
    // The connection is gone for good: finish the handler anyway, so that
    // its outcome is cached.
    Some(fut.await)
}

/// Polls `fut` once with the current task's waker.
async fn poll_once<F: Future + Unpin>(fut: &mut F) -> Poll<F::Output> {
    poll_fn(|cx| Poll::Ready(Pin::new(&mut *fut).poll(cx))).await
}

/// Writes out the replies batched so far; a failure is handled as a lost
/// connection (kept in [`Link::deferred`] if it is a hard error).
async fn flush_or_defer(link: &mut Link) {
    if let Some(conn) = link.conn.as_mut() {
        if let Err(e) = conn.flush().await {
            if let Err(e) = link.lost(e) {
                link.deferred = Some(e);
            }
        }
    }
}

/// What [`Dispatch::handle_next`] did.
pub(crate) enum Next {
    /// No request is queued.
    Idle,
    /// The request at the front must wait for running handlers: it needs
    /// exclusive access, or the limit of concurrent handlers is reached.
    Blocked,
    /// A concurrent handler was started, or a re-sent copy of a running
    /// call was set aside until that call's execution ends.
    Started,
    /// A request was handled.
    Done(Event),
}

/// What handling one request needs: the service, the link its reply goes
/// out on, the reply cache, the request counter and the running handlers.
pub(crate) struct Dispatch<'a, S: Service> {
    pub(crate) service: &'a mut Rc<S>,
    pub(crate) link: &'a mut Link,
    pub(crate) setup: &'a Setup,
    pub(crate) cache: &'a mut ReplyCache,
    pub(crate) counter: &'a mut u64,
    pub(crate) running: &'a mut Running,
    /// [`Server::max_queued`](crate::Server::max_queued).
    pub(crate) max_queued: usize,
    /// A stop that gives up ends an exclusive handler too.
    pub(crate) stop: &'a mut Stop,
}

impl<S: Service> Dispatch<'_, S> {
    /// Handles the request at the front of the connection's queue:
    /// answered from the reply cache if it is a re-sent call already
    /// handled; else a synchronous handler runs at once, a `&self` handler
    /// is started beside the running ones ([`Next::Started`]; its reply is
    /// [`finish`](Self::finish)ed when it is done), and a `&mut self`
    /// handler runs alone once the others are done (while the connection is
    /// still served). With `flush_reply` a reply is written out before
    /// returning.
    pub(crate) async fn handle_next(&mut self, flush_reply: bool) -> Result<Next, Error> {
        let Some(front) = self.link.conn.as_ref().and_then(|c| c.queue.front()) else {
            return Ok(Next::Idle);
        };
        let key = if front.method.as_str() == DESCRIBE_METHOD {
            None
        } else {
            // A broker without the security model sends no caller: uid 0
            // then (the key as before it).
            self.cache.key(
                front.caller_instance,
                front.caller_call,
                front.caller.map_or(0, |c| c.uid),
            )
        };
        let describe_front = front.method.as_str() == DESCRIBE_METHOD;
        if let Some(k) = key.filter(|k| self.running.runs(*k)) {
            // A re-sent copy of a running call waits for its outcome (then
            // comes from the cache): never two executions of one call. It
            // waits aside, so that the requests behind it go on.
            if let Some(req) = self.link.conn.as_mut().and_then(|c| c.queue.pop_front()) {
                self.running.park(self.link.generation, k, req);
            }
            return Ok(Next::Started);
        }
        if !describe_front && !self.running.is_empty() && !self.running.has_room() {
            return Ok(Next::Blocked);
        }
        let Some(req) = self.link.conn.as_mut().and_then(|c| c.queue.pop_front()) else {
            return Ok(Next::Idle);
        };
        if let Some(key) = key {
            if let Some(outcome) = self
                .cache
                .get(key, req.service.as_str(), req.method.as_str())
            {
                return self
                    .replay(req, &outcome, flush_reply)
                    .await
                    .map(Next::Done);
            }
        }
        let ctx = Context {
            counter: *self.counter + 1,
            request_id: req.id,
            service: req.service,
            method: req.method,
            caller_instance: req.caller_instance,
            caller_call: req.caller_call,
            caller: req.caller,
            deadline: req.deadline,
        };
        let request = req.payload.as_ptr_range();
        let meta = Meta {
            id: req.id,
            generation: self.link.generation,
            key,
            service: ctx.service.clone(),
            method: ctx.method.clone(),
            request: (request.start as usize, request.end as usize, req.own_buffer),
            request_alive: req.payload.clone(),
        };
        let payload = req.payload;
        if ctx.method() == DESCRIBE_METHOD {
            *self.counter += 1;
            let r = describe(&**self.service, &ctx);
            return self
                .finish(meta, Some(r), flush_reply)
                .await
                .map(Next::Done);
        }
        // Nothing else runs: a synchronous method runs here, without a
        // boxed future.
        if let Some(service) = Rc::get_mut(self.service) {
            let r = catch_unwind(AssertUnwindSafe(|| {
                service.handle_now(&ctx, ctx.method(), &payload)
            }));
            let r = match r {
                Ok(Some(r)) => Some(r),
                Ok(None) => None,
                Err(p) => Some(Err(panicked(&*p))),
            };
            if let Some(r) = r {
                *self.counter += 1;
                return self
                    .finish(meta, Some(r), flush_reply)
                    .await
                    .map(Next::Done);
            }
        }
        // A `&self` method: started beside the running ones.
        let shared = catch_unwind(AssertUnwindSafe(|| {
            S::handle_shared(
                Rc::clone(self.service),
                ctx.clone(),
                ctx.method(),
                payload.clone(),
            )
        }));
        match shared {
            Ok(Some(fut)) => {
                *self.counter += 1;
                let mut fut = CatchUnwind::new(fut);
                if let Poll::Ready(r) = poll_once(&mut fut).await {
                    return self
                        .finish(meta, Some(r), flush_reply)
                        .await
                        .map(Next::Done);
                }
                self.running.push(meta, fut);
                return Ok(Next::Started);
            }
            Ok(None) => {}
            Err(p) => {
                *self.counter += 1;
                let r = Err(panicked(&*p));
                return self
                    .finish(meta, Some(r), flush_reply)
                    .await
                    .map(Next::Done);
            }
        }
        // A `&mut self` method: alone, once the running ones are done.
        let Some(service) = Rc::get_mut(self.service) else {
            let req = Pending {
                id: meta.id,
                service: ctx.service,
                method: ctx.method,
                deadline: ctx.deadline,
                caller_instance: ctx.caller_instance,
                caller_call: ctx.caller_call,
                caller: ctx.caller,
                payload,
                own_buffer: meta.request.2,
            };
            if let Some(conn) = self.link.conn.as_mut() {
                conn.queue.push_front(req);
            }
            return Ok(Next::Blocked);
        };
        *self.counter += 1;
        let outcome = run_exclusive(
            service,
            self.link,
            self.setup,
            &ctx,
            payload,
            self.max_queued,
            self.stop,
        )
        .await;
        self.finish(meta, outcome, flush_reply)
            .await
            .map(Next::Done)
    }

    /// Moves the first queued `zrpc.describe` request to the front of the
    /// queue, if one waits behind others: introspection is answered while
    /// the request at the front is blocked. Whether one was moved.
    pub(crate) fn describe_first(&mut self) -> bool {
        let Some(conn) = self.link.conn.as_mut() else {
            return false;
        };
        match conn
            .queue
            .iter()
            .position(|r| r.method.as_str() == DESCRIBE_METHOD)
        {
            Some(pos) if pos > 0 => {
                if let Some(req) = conn.queue.remove(pos) {
                    conn.queue.push_front(req);
                }
                true
            }
            _ => false,
        }
    }

    /// Sends and caches the outcome of the handler of `meta`'s request
    /// (`None`: it was cancelled). The reply is sent only on the connection
    /// the request came on; it is cached either way, so that the call
    /// re-sent after a reconnect is answered from the cache.
    pub(crate) async fn finish(
        &mut self,
        meta: Meta,
        outcome: Option<Result<Bytes, HandlerError>>,
        flush_reply: bool,
    ) -> Result<Event, Error> {
        let method = meta.method.as_str();
        let Some(result) = outcome else {
            tracing::debug!(id = meta.id, method, "request cancelled");
            return Ok(Event::Cancelled {
                method: method.to_owned(),
            });
        };
        if let Err(e) = &result {
            // Quoted: the text may hold what the caller sent (serde's
            // "unknown variant ..."), line breaks included.
            tracing::debug!(method, code = %e.code(), error = ?e.to_string(), "request failed");
        }
        let mut outcome = wire_outcome(result, self.link.max_message_size);
        let mut owned = false;
        if meta.key.is_some() && !ReplyCache::stores_inline(&outcome) {
            (outcome, owned) = own_reply(outcome, meta.request);
        }
        drop(meta.request_alive);
        // Written first (a small reply is copied into the write buffer),
        // then moved into the cache: no clone of it.
        let sent = match self.link.conn.as_mut() {
            Some(conn) if self.link.generation == meta.generation => {
                conn.write_outcome(meta.id, &outcome);
                true
            }
            _ => {
                tracing::debug!(
                    id = meta.id,
                    method,
                    cached = meta.key.is_some(),
                    "the connection the request came on is gone; reply not sent"
                );
                false
            }
        };
        if let Some(key) = meta.key {
            self.cache
                .insert(key, meta.service.as_str(), method, outcome, owned);
        }
        if sent && flush_reply {
            flush_or_defer(self.link).await;
        }
        // `serve` drops its events: no copy of the name for it.
        let method = if flush_reply {
            method.to_owned()
        } else {
            String::new()
        };
        Ok(Event::Request { method })
    }

    /// Answers a re-sent request from the reply cache.
    async fn replay(
        &mut self,
        req: Pending,
        outcome: &Outcome,
        flush_reply: bool,
    ) -> Result<Event, Error> {
        tracing::debug!(
            id = req.id,
            method = %req.method,
            caller_instance = req.caller_instance,
            caller_call = req.caller_call,
            "re-sent request answered from the reply cache"
        );
        if let Some(conn) = self.link.conn.as_mut() {
            // Made under the broker of the first execution, whose limit
            // may have been larger.
            let outcome = crate::conn::fit_outcome(outcome.clone(), conn.max_message_size);
            conn.write_outcome(req.id, &outcome);
            if flush_reply {
                if let Err(e) = conn.flush().await {
                    self.link.lost(e)?;
                }
            }
        }
        Ok(Event::Replayed {
            method: req.method.as_str().to_owned(),
        })
    }
}
