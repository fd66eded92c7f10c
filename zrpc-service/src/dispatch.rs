//! Handling one request: the reply cache for re-sent calls, running the
//! handler while the connection is still served (pings, cancels,
//! reconnects), and the reply.

use std::future::{poll_fn, Future};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::task::Poll;

use bytes::Bytes;

use crate::cache::{Outcome, ReplyCache};
use crate::conn::{own_reply, wire_outcome, Pending};
use crate::error::{Error, Event};
use crate::link::{Link, Setup, Work};
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

/// Runs one handler to completion while still serving the connection:
/// pings are answered, new requests queued, a lost connection is
/// re-established (when reconnecting), and a `Cancel` of this request drops
/// the handler (`None`). A handler is never dropped because the connection
/// is lost: it runs to its end, and a hard error met meanwhile is kept in
/// [`Link::deferred`].
async fn run_handler<S: Service>(
    service: &mut S,
    link: &mut Link,
    setup: &Setup,
    ctx: &Context,
    payload: Bytes,
) -> Option<Result<Bytes, HandlerError>> {
    if ctx.method() == DESCRIBE_METHOD {
        return Some(describe(service, ctx));
    }
    // A synchronous method runs here, without a boxed future.
    match catch_unwind(AssertUnwindSafe(|| {
        service.handle_now(ctx, ctx.method(), &payload)
    })) {
        Ok(Some(r)) => return Some(r),
        Ok(None) => {}
        Err(p) => return Some(Err(panicked(&*p))),
    }
    let fut = match catch_unwind(AssertUnwindSafe(|| {
        service.handle(ctx, ctx.method(), payload)
    })) {
        Ok(f) => f,
        Err(p) => return Some(Err(panicked(&*p))),
    };
    let mut fut = CatchUnwind::new(fut);
    // Synchronous handlers finish in their first poll; only flush the
    // replies batched so far when this one has to wait.
    if let Poll::Ready(r) = poll_fn(|cx| Poll::Ready(Pin::new(&mut fut).poll(cx))).await {
        return Some(r);
    }
    if let Some(conn) = link.conn.as_mut() {
        if let Err(e) = conn.flush().await {
            if let Err(e) = link.lost(e) {
                link.deferred = Some(e);
            }
        }
    }
    let running = Some((link.generation, ctx.request_id()));
    while link.deferred.is_none() {
        tokio::select! {
            biased;
            r = &mut fut => return Some(r),
            w = link.work(setup, running) => match w {
                Ok(Work::CancelledRunning) => return None,
                Ok(Work::Progress) => {}
                Err(e) => link.deferred = Some(e),
            }
        }
    }
    // The connection is gone for good: finish the handler anyway, so that
    // its outcome is cached.
    Some(fut.await)
}

/// What handling one request needs: the service, the link its reply goes
/// out on, the reply cache and the request counter.
pub(crate) struct Dispatch<'a, S: Service> {
    pub(crate) service: &'a mut S,
    pub(crate) link: &'a mut Link,
    pub(crate) setup: &'a Setup,
    pub(crate) cache: &'a mut ReplyCache,
    pub(crate) counter: &'a mut u64,
}

impl<S: Service> Dispatch<'_, S> {
    /// Handles the request at the front of the connection's queue (taken
    /// off it here, not moved through a call): answered from the reply
    /// cache if it is a re-sent call already handled, else its handler runs
    /// (while the connection is still served) and the reply is written and
    /// cached. With `flush_reply` the reply is written out before
    /// returning. `None`: there was no request.
    pub(crate) async fn handle_next(&mut self, flush_reply: bool) -> Result<Option<Event>, Error> {
        let Some(req) = self.link.conn.as_mut().and_then(|c| c.queue.pop_front()) else {
            return Ok(None);
        };
        let key = if req.method.as_str() == DESCRIBE_METHOD {
            None
        } else {
            // A broker without the security model sends no caller: uid 0
            // then (the key as before it).
            self.cache.key(
                req.caller_instance,
                req.caller_call,
                req.caller.map_or(0, |c| c.uid),
            )
        };
        if let Some(key) = key {
            if let Some(outcome) = self
                .cache
                .get(key, req.service.as_str(), req.method.as_str())
            {
                return self.replay(req, &outcome, flush_reply).await.map(Some);
            }
        }
        *self.counter += 1;
        let ctx = Context {
            counter: *self.counter,
            request_id: req.id,
            service: req.service,
            method: req.method,
            caller_instance: req.caller_instance,
            caller_call: req.caller_call,
            caller: req.caller,
            deadline: req.deadline,
        };
        let generation = self.link.generation;
        let request = req.payload.as_ptr_range();
        let request = (request.start as usize, request.end as usize, req.own_buffer);
        // Kept alive until `own_reply` has compared addresses: freed
        // earlier, its memory could be reused by an unrelated buffer the
        // reply points into.
        let request_alive = req.payload.clone();
        let outcome = run_handler(self.service, self.link, self.setup, &ctx, req.payload).await;
        let method = ctx.method.as_str();
        let Some(result) = outcome else {
            tracing::debug!(id = req.id, method, "request cancelled");
            return Ok(Some(Event::Cancelled {
                method: method.to_owned(),
            }));
        };
        if let Err(e) = &result {
            tracing::debug!(method, code = %e.code(), "request failed: {e}");
        }
        let mut outcome = wire_outcome(result, self.link.max_message_size);
        let mut owned = false;
        if key.is_some() && !ReplyCache::stores_inline(&outcome) {
            (outcome, owned) = own_reply(outcome, request);
        }
        drop(request_alive);
        // Written first (a small reply is copied into the write buffer),
        // then moved into the cache: no clone of it.
        let sent = match self.link.conn.as_mut() {
            Some(conn) if self.link.generation == generation => {
                conn.write_outcome(req.id, &outcome);
                true
            }
            _ => {
                tracing::debug!(
                    id = req.id,
                    method,
                    cached = key.is_some(),
                    "the connection the request came on is gone; reply not sent"
                );
                false
            }
        };
        if let Some(key) = key {
            self.cache
                .insert(key, ctx.service.as_str(), method, outcome, owned);
        }
        if sent && flush_reply {
            if let Some(conn) = self.link.conn.as_mut() {
                if let Err(e) = conn.flush().await {
                    if let Err(e) = self.link.lost(e) {
                        self.link.deferred = Some(e);
                    }
                }
            }
        }
        // `serve` drops its events: no copy of the name for it.
        let method = if flush_reply {
            method.to_owned()
        } else {
            String::new()
        };
        Ok(Some(Event::Request { method }))
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
            conn.write_outcome(req.id, outcome);
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
