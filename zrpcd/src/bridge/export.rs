//! Export: locally served names matching `[export]` are subscribed on NATS
//! (one queue group per name); each NATS request becomes a local call whose
//! `Result` is the reply. Also keeps the `[import]` names registered
//! ([`sync_loop`] reads the broker's `zrpcd.list` for both).

use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use rmpv::Value;
use zrpc_proto::ErrorCode;

use super::cancels::Key as CancelKey;
use super::dedupe::{Joined, Plan};
use super::link::Answer;
use super::{header, reply_headers, too_large, AbortOnDrop, Shared, H_CALLER, H_METHOD, H_ORIGIN};
use super::{H_EPOCH, H_TIMEOUT_MS, MAX_ID_LEN, SYNC_INTERVAL};
use crate::broker::bridged::BridgeCounters;

/// Every [`SYNC_INTERVAL`], and at once when the bridge has a new NATS
/// client: subscribes the exported names a local service holds and
/// unsubscribes those no longer held; registers the imported names nobody
/// holds.
pub(super) async fn sync_loop(shared: Rc<Shared>) {
    let mut subs: BTreeMap<String, AbortOnDrop> = BTreeMap::new();
    // The number of the NATS client `subs` are on.
    let mut subs_client = shared.nats.current().number;
    let mut changes = shared.nats.changes();
    let mut tick = tokio::time::interval(SYNC_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Exports and withdrawals at info once per --warn-interval each, the
    // rest at debug: any local user can make them, registering and
    // unregistering names the exports match (red-team pass 7: 57,000 lines
    // in 9.5 s, past its own --name-logs-per-second).
    let (mut exported_log, mut withdrawn_log) =
        (crate::log::RefusalLog::new(), crate::log::RefusalLog::new());
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            Ok(()) = changes.changed() => {}
        }
        let held = match all_held(&shared).await {
            None => return,
            Some(Ok(held)) => held,
            Some(Err(why)) => {
                tracing::warn!(%why, "the bridge cannot list the broker's names");
                continue;
            }
        };
        // A dead client's subscriptions are gone with it: all are made
        // again on the new one.
        let nats = shared.nats.current();
        if nats.number != subs_client {
            if !subs.is_empty() {
                tracing::info!(
                    client = nats.number,
                    "exporting again on the NATS bridge's new client"
                );
            }
            subs.clear();
            subs_client = nats.number;
        }
        let own = shared.link.conn_id();
        let served: BTreeSet<&str> = held
            .iter()
            .filter(|(name, holders)| {
                // A name with an empty token (`a..b`, `a.`) is a valid zrpc
                // name but no NATS subject: the server would refuse it.
                shared.config.exports(name)
                    && !name.split('.').any(str::is_empty)
                    && holders.iter().any(|&h| h != own)
            })
            .map(|(name, _)| name.as_str())
            .collect();
        subs.retain(|name, _| {
            let keep = served.contains(name.as_str());
            if !keep {
                // Any local user's names that the exports match come and
                // go as it likes: at info once per --warn-interval.
                match withdrawn_log.warn_now(Instant::now()) {
                    Some(quiet) => tracing::info!(service = %name, quiet, "no longer served here: withdrawn from NATS (`quiet` more since the last such line, at debug level)"),
                    None => tracing::debug!(service = %name, "no longer served here: withdrawn from NATS"),
                }
            }
            keep
        });
        for name in served {
            // On a dead client, until the next one.
            if subs.contains_key(name) || !nats.alive {
                continue;
            }
            let subject = shared.config.subject(name);
            let subscribed = async {
                let calls = nats
                    .client
                    .queue_subscribe(subject.clone(), shared.config.queue_group(name))
                    .await?;
                let cancels = nats
                    .client
                    .subscribe(shared.config.cancel_subject(name))
                    .await?;
                Ok::<_, async_nats::SubscribeError>((calls, cancels))
            };
            match subscribed.await {
                Ok((calls, cancels)) => {
                    match exported_log.warn_now(Instant::now()) {
                        Some(quiet) => {
                            tracing::info!(service = %name, %subject, quiet, "exported on NATS (`quiet` more since the last such line, at debug level)")
                        }
                        None => tracing::debug!(service = %name, %subject, "exported on NATS"),
                    }
                    let task = tokio::task::spawn_local(serve(
                        shared.clone(),
                        name.to_owned(),
                        calls,
                        cancels,
                    ));
                    subs.insert(name.to_owned(), AbortOnDrop(task.abort_handle()));
                }
                Err(e) => {
                    tracing::warn!(service = %name, error = %e, "cannot subscribe on NATS; retrying")
                }
            }
        }
        // Imported names are taken only while NATS is reachable: a call
        // to one waits (within its deadline) for the bridge to connect,
        // e.g. a call resubmitted just after this broker restarted.
        let connected = shared.nats.connected();
        for name in shared.config.imported_names() {
            if !connected || held.contains_key(name) {
                continue;
            }
            match shared.link.register(name).await {
                None => return,
                Some(None) => tracing::info!(service = %name, "imported from NATS"),
                Some(Some(code)) => {
                    tracing::debug!(service = %name, code = code.as_str(), "cannot hold an imported name; retrying")
                }
            }
        }
    }
}

/// Most names asked for per page of `zrpcd.list` (the broker's most,
/// [`crate::paging::MAX_LIMIT`]).
const PAGE: u64 = crate::paging::MAX_LIMIT as u64;

/// Every name the broker holds with its holders' connection ids, from
/// `zrpcd.list` page after page. None if the bridge's connection is gone;
/// Err with why if an answer was refused or unreadable.
async fn all_held(shared: &Shared) -> Option<Result<BTreeMap<String, Vec<u64>>, String>> {
    let mut out = BTreeMap::new();
    let mut after = Value::Nil;
    loop {
        let page = Value::Map(vec![
            (Value::from("after"), after),
            (Value::from("limit"), Value::from(PAGE)),
        ]);
        let mut payload = Vec::new();
        // Writing to a Vec cannot fail.
        let _ = rmpv::encode::write_value(&mut payload, &page);
        let answer = shared
            .link
            .call(zrpc_proto::BROKER_SERVICE, "list", Some(5_000), &payload)
            .await?;
        if let Some(code) = answer.code {
            return Some(Err(format!("{}: {}", code.as_str(), answer.message)));
        }
        let Some(next) = held_names(&answer.payload, &mut out) else {
            return Some(Err("unreadable zrpcd.list answer".to_owned()));
        };
        match next {
            Some(next) => after = Value::from(next),
            None => return Some(Ok(out)),
        }
    }
}

/// Adds the names in a `zrpcd.list` answer (a page `{entries, next}`, or
/// the whole array) to `out` with their holders' connection ids; returns
/// the page's `next` (None: the last page). None if unreadable.
fn held_names(payload: &[u8], out: &mut BTreeMap<String, Vec<u64>>) -> Option<Option<String>> {
    let value = rmpv::decode::read_value(&mut &payload[..]).ok()?;
    let field = |k: &str| {
        value
            .as_map()
            .and_then(|m| m.iter().find(|(key, _)| key.as_str() == Some(k)))
            .map(|(_, v)| v)
    };
    let (entries, next) = match &value {
        Value::Array(all) => (all, None),
        _ => {
            let next = match field("next")? {
                Value::Nil => None,
                v => Some(v.as_str()?.to_owned()),
            };
            (field("entries")?.as_array()?, next)
        }
    };
    for entry in entries {
        let mut name = None;
        let mut holders = Vec::new();
        for (k, v) in entry.as_map()? {
            match k.as_str() {
                Some("name") => name = v.as_str().map(str::to_owned),
                Some("instances") => {
                    holders = v.as_array()?.iter().filter_map(Value::as_u64).collect();
                }
                _ => {}
            }
        }
        out.insert(name?, holders);
    }
    Some(next)
}

/// Serves one exported name's NATS requests and cancel messages until
/// unsubscribed.
async fn serve(
    shared: Rc<Shared>,
    name: String,
    mut calls: async_nats::Subscriber,
    mut cancels: async_nats::Subscriber,
) {
    loop {
        tokio::select! {
            msg = calls.next() => match msg {
                Some(msg) => match Place::take(&shared) {
                    Some(place) => {
                        tokio::task::spawn_local(answer(place, name.clone(), msg));
                    }
                    // Refused at once, in this loop: a NATS flood costs the
                    // broker's thread one small reply a request, in turns
                    // with its connections, never a task or a local call.
                    None => refuse_busy(&shared, &name, msg).await,
                },
                None => return,
            },
            msg = cancels.next() => match msg {
                Some(msg) => {
                    if let Some(key) = CancelKey::new(&name, msg.headers.as_ref()) {
                        let id = shared.exports.borrow_mut().cancel(&key, Instant::now());
                        if let Some(id) = id {
                            tracing::debug!(service = %name, ?key, "the remote caller cancelled");
                            shared.link.cancel_call(id);
                            BridgeCounters::bump(&shared.counters.cancels_received);
                        }
                    }
                }
                None => return,
            },
        }
    }
}

/// A local call to make for a NATS request.
struct LocalCall<'a> {
    name: &'a str,
    method: &'a str,
    timeout_ms: Option<u64>,
    /// `timeout_ms` is `[export] max_timeout_ms`, not the request's own.
    capped: bool,
    /// The arguments, dropped once sent to the broker.
    payload: bytes::Bytes,
    /// The at-most-once key (name, origin, caller).
    once: Option<super::dedupe::Key>,
    /// What cancel messages name it by.
    cancel_key: Option<CancelKey>,
}

/// An answer made here with `code`, `message` and no value.
fn error(code: ErrorCode, message: String) -> Answer {
    Answer {
        code: Some(code),
        message,
        payload: bytes::Bytes::new(),
    }
}

/// Makes the local call (with local id `id`, or a new one) and waits for
/// its answer; None if the link to the broker closed. A call whose cancel
/// came first is answered `Cancelled` without a local call.
async fn call_local(shared: &Shared, call: LocalCall<'_>, id: Option<u64>) -> Option<Answer> {
    if let Some(key) = &call.cancel_key {
        if shared
            .exports
            .borrow_mut()
            .cancelled_early(key, Instant::now())
        {
            tracing::debug!(service = %call.name, ?key, "the remote caller cancelled before the call started");
            BridgeCounters::bump(&shared.counters.cancels_received);
            return Some(error(
                ErrorCode::Cancelled,
                "the remote caller cancelled the call".to_owned(),
            ));
        }
    }
    // From here to filing the call nothing awaits: a cancel handled
    // meanwhile was remembered above, one handled after finds the call.
    let (id, rx) =
        shared
            .link
            .start_call(id, call.name, call.method, call.timeout_ms, &call.payload)?;
    drop(call.payload);
    if let Some(k) = call.once {
        shared.dedupe.borrow_mut().started(k, id);
    }
    if let Some(key) = &call.cancel_key {
        shared.exports.borrow_mut().file(key.clone(), id);
    }
    // Annotated before the answer is shared with requests that joined the
    // call: the bound was this call's deadline, whatever theirs.
    let answer = rx
        .await
        .ok()
        .map(|a| bounded_by_max_timeout(a, call.capped, shared.config.max_timeout_ms));
    if let Some(key) = &call.cancel_key {
        shared.exports.borrow_mut().unfile(key, id);
    }
    shared.dedupe.borrow_mut().finished(id, answer.as_ref());
    answer
}

/// Waits for the answer of the running call a request joined, at most
/// until the request's own deadline (`capped`: `[export] max_timeout_ms`,
/// `max`); None if the link to the broker closed.
async fn join(joined: Joined, timeout_ms: Option<u64>, capped: bool, max: u64) -> Option<Answer> {
    let Some(ms) = timeout_ms else {
        return joined.answer.await.ok();
    };
    match tokio::time::timeout(Duration::from_millis(ms), joined.answer).await {
        Ok(answer) => answer.ok(),
        Err(_) => Some(bounded_by_max_timeout(
            error(
                ErrorCode::Timeout,
                "the call this request repeats did not answer within the request's deadline"
                    .to_owned(),
            ),
            capped,
            max,
        )),
    }
}

/// A NATS request's place among those answered at once (`[export]
/// max_in_flight`), given back when dropped. Without such a bound a NATS
/// publisher made the broker's thread start a task and a local call per
/// request, outside the rounds that share it between local users (red-team
/// pass 7: another user's calls waited 2.6 s).
struct Place(Rc<Shared>);

impl Place {
    /// A place, if one is free.
    fn take(shared: &Rc<Shared>) -> Option<Place> {
        let n = shared.exported_in_flight.get();
        if n >= shared.config.max_in_flight {
            return None;
        }
        shared.exported_in_flight.set(n + 1);
        Some(Place(shared.clone()))
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let n = self.0.exported_in_flight.get();
        self.0.exported_in_flight.set(n.saturating_sub(1));
    }
}

/// Answers a NATS request refused because `[export] max_in_flight`
/// requests are being answered.
async fn refuse_busy(shared: &Shared, name: &str, msg: async_nats::Message) {
    let Some(reply) = msg.reply else {
        return;
    };
    tracing::debug!(service = %name, "a call from NATS refused: max_in_flight requests are being answered");
    let max = shared.config.max_in_flight;
    let answer = error(
        ErrorCode::LimitExceeded,
        format!(
            "the exporting host's bridge answers at most {max} requests at once \
             ([export] max_in_flight, docs/bridge.md); try again later"
        ),
    );
    // Bounded: while the client reconnects it takes no commands, and this
    // loop must not stop handling the subscription's cancels meanwhile
    // (the requester times out anyway).
    let _ = tokio::time::timeout(
        REFUSAL_PUBLISH_WAIT,
        publish_answer(shared, name, reply, answer),
    )
    .await;
}

/// How long a refusal's reply may wait to be handed to the NATS client.
const REFUSAL_PUBLISH_WAIT: Duration = Duration::from_millis(100);

/// Makes one NATS request a local call and publishes its outcome.
async fn answer(place: Place, name: String, msg: async_nats::Message) {
    let shared = &place.0;
    let async_nats::Message {
        reply,
        headers,
        payload,
        ..
    } = msg;
    let Some(reply) = reply else {
        tracing::debug!(service = %name, "a NATS message without reply subject: ignored");
        return;
    };
    let answer = outcome(shared, &name, headers, payload)
        .await
        .unwrap_or_else(|| {
            error(
                ErrorCode::Shutdown,
                "the exporting broker's bridge stopped".to_owned(),
            )
        });
    publish_answer(shared, &name, reply, answer).await;
}

/// Publishes the answer to a NATS request on its reply subject (a value
/// too large for NATS becomes `LimitExceeded`).
async fn publish_answer(shared: &Shared, name: &str, reply: async_nats::Subject, answer: Answer) {
    let (code, message, payload) = match too_large(
        &shared.nats.client(),
        answer.payload.len(),
        "the reply's value",
    ) {
        Some(m) => (Some(ErrorCode::LimitExceeded), m, bytes::Bytes::new()),
        None => (answer.code, answer.message, answer.payload),
    };
    BridgeCounters::bump(&shared.counters.exported);
    if code.is_some() {
        BridgeCounters::bump(&shared.counters.exported_errors);
    }
    // On the current client, which may be newer than the one the request
    // came on: the reply subject is the requester's.
    if let Err(e) = shared
        .nats
        .publish(reply, || reply_headers(code, &message), payload)
        .await
    {
        tracing::warn!(service = %name, error = %e, "cannot send a reply on NATS");
    }
}

/// The answer to a NATS request for `name`; None if the link to the
/// broker closed.
async fn outcome(
    shared: &Shared,
    name: &str,
    headers: Option<async_nats::HeaderMap>,
    payload: bytes::Bytes,
) -> Option<Answer> {
    let h = headers.as_ref();
    let requested = match header(h, H_TIMEOUT_MS).map(str::parse::<u64>) {
        None => None,
        Some(Ok(ms)) => Some(ms),
        Some(Err(_)) => return Some(malformed()),
    };
    // A remote caller without a deadline must not keep a place of
    // max_in_flight (or max_joins) for ever.
    let (timeout_ms, capped) = shared.config.cap_timeout(requested);
    let Some(method) = header(h, H_METHOD) else {
        return Some(malformed());
    };
    if [H_ORIGIN, H_CALLER, H_EPOCH]
        .into_iter()
        .any(|n| header(h, n).is_some_and(|v| v.len() > MAX_ID_LEN))
    {
        return Some(malformed());
    }
    tracing::debug!(
        service = %name,
        method,
        timeout_ms,
        origin = header(h, H_ORIGIN).unwrap_or("?"),
        caller = header(h, H_CALLER).unwrap_or("?"),
        "a call from NATS"
    );
    let once = header(h, H_ORIGIN)
        .zip(header(h, H_CALLER))
        .map(|(o, c)| (name.to_owned(), o.to_owned(), c.to_owned()));
    let plan = match &once {
        Some(k) => shared.dedupe.borrow_mut().plan(k),
        None => Plan::New,
    };
    let local = |payload| LocalCall {
        name,
        method,
        timeout_ms,
        capped,
        payload,
        once,
        cancel_key: CancelKey::new(name, h),
    };
    match plan {
        Plan::Full(max) => {
            tracing::debug!(service = %name, max, "a resubmitted call refused: max_joins requests wait already");
            Some(error(
                ErrorCode::LimitExceeded,
                format!(
                    "{max} requests already wait for calls running here that they repeat \
                     ([export] max_joins of the exporting host's bridge, docs/bridge.md)"
                ),
            ))
        }
        Plan::Join(joined) => {
            tracing::debug!(service = %name, "a resubmitted call joins the one running");
            // Held until the call answers: only its place in max_joins.
            drop((payload, headers));
            join(joined, timeout_ms, capped, shared.config.max_timeout_ms).await
        }
        Plan::Resend(id) => {
            tracing::debug!(service = %name, id, "a resubmitted call is sent again with its id");
            call_local(shared, local(payload), Some(id)).await
        }
        Plan::New => call_local(shared, local(payload), None).await,
    }
}

/// A timeout (`Timeout` or `TimeoutNoService`) of a call whose deadline
/// came from `[export] max_timeout_ms` (`capped`), not from the request,
/// says so: its caller may have sent none.
fn bounded_by_max_timeout(mut answer: Answer, capped: bool, max: u64) -> Answer {
    if capped && answer.code.is_some_and(ErrorCode::is_timeout) {
        answer.message = format!(
            "{} (the exporting host's bridge bounds calls from NATS to [export] \
             max_timeout_ms = {max} ms, docs/bridge.md)",
            answer.message
        );
    }
    answer
}

/// The answer to a request without `Zrpc-Method`, with a non-numeric
/// `Zrpc-Timeout-Ms`, or with an identity longer than [`MAX_ID_LEN`].
fn malformed() -> Answer {
    error(
        ErrorCode::Protocol,
        format!(
            "a NATS request needs the header {H_METHOD}, a numeric {H_TIMEOUT_MS}, and \
             {H_ORIGIN}, {H_CALLER} and {H_EPOCH} of at most {MAX_ID_LEN} bytes (docs/bridge.md)"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(v: &Value) -> Vec<u8> {
        let mut out = Vec::new();
        let _ = rmpv::encode::write_value(&mut out, v);
        out
    }

    fn entry(name: &str, holder: u64) -> Value {
        Value::Map(vec![
            (Value::from("name"), Value::from(name)),
            (
                Value::from("instances"),
                Value::Array(vec![Value::from(holder)]),
            ),
        ])
    }

    #[test]
    fn zrpcd_list_is_read_whole_or_paged() {
        let mut out = BTreeMap::new();
        let whole = Value::Array(vec![entry("a", 1)]);
        assert_eq!(held_names(&encode(&whole), &mut out), Some(None));
        let page = |entries, next: Value| {
            Value::Map(vec![
                (Value::from("entries"), Value::Array(entries)),
                (Value::from("next"), next),
            ])
        };
        let first = page(vec![entry("b", 2)], Value::from("b"));
        assert_eq!(
            held_names(&encode(&first), &mut out),
            Some(Some("b".to_owned()))
        );
        let last = page(vec![entry("c", 3)], Value::Nil);
        assert_eq!(held_names(&encode(&last), &mut out), Some(None));
        let names: Vec<_> = out.keys().map(String::as_str).collect();
        assert_eq!(names, ["a", "b", "c"]);
        assert_eq!(held_names(&encode(&Value::from(1)), &mut out), None);
    }
}
