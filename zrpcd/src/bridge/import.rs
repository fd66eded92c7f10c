//! Import: a call the broker delivers to the bridge (which holds the
//! `[import]` names) goes out as a NATS request with the remaining
//! deadline; the reply becomes the call's `Reply`, code and payload
//! unchanged.

use std::rc::Rc;
use std::time::Duration;

use async_nats::{HeaderMap, RequestErrorKind};
use bytes::Bytes;
use tokio::time::Instant;
use zrpc_proto::{flags, Envelope, ErrorCode};

use super::nats::REPLACEMENT_WAIT;
use super::{
    header, too_large, Shared, H_CALLER, H_CODE, H_EPOCH, H_MESSAGE, H_METHOD, H_ORIGIN, H_REQUEST,
    H_TIMEOUT_MS,
};
use crate::broker::bridged::BridgeCounters;

/// An imported call being forwarded.
pub(super) struct InFlight {
    task: tokio::task::AbortHandle,
    service: String,
    request: u64,
}

/// One call delivered to the bridge.
pub(super) struct Forward {
    /// The broker's id of the call.
    pub id: u64,
    /// The call's flags (`NO_WAIT`).
    pub flags: u32,
    pub service: String,
    pub method: String,
    pub timeout_ms: Option<u64>,
    /// `<uid>.<instance>.<call>` of the caller.
    pub caller: String,
    pub payload: Bytes,
}

/// Spawns the forwarding of one call; `Cancel` aborts it ([`cancel`]).
pub(super) fn forward(shared: &Rc<Shared>, call: Forward) {
    let id = call.id;
    let request = shared.next_request.get();
    shared.next_request.set(request.wrapping_add(1));
    let service = call.service.clone();
    let task = tokio::task::spawn_local(run(shared.clone(), call, request));
    shared.imports.borrow_mut().insert(
        id,
        InFlight {
            task: task.abort_handle(),
            service,
            request,
        },
    );
}

/// The broker cancelled call `id` (its caller gave up or its deadline
/// passed): the NATS request is abandoned, and the exporting hosts are
/// told (`<prefix>.cancel.<name>`), so that the one running it cancels it.
pub(super) fn cancel(shared: &Rc<Shared>, id: u64) {
    let Some(call) = shared.imports.borrow_mut().remove(&id) else {
        return;
    };
    call.task.abort();
    BridgeCounters::bump(&shared.counters.cancels_sent);
    let shared = shared.clone();
    tokio::task::spawn_local(async move {
        let headers = || {
            let mut headers = HeaderMap::new();
            headers.insert(H_ORIGIN, shared.config.host_id.as_str());
            headers.insert(H_EPOCH, shared.epoch.as_str());
            headers.insert(H_REQUEST, call.request.to_string().as_str());
            headers
        };
        let subject = shared.config.cancel_subject(&call.service).into();
        if let Err(e) = shared.nats.publish(subject, headers, Bytes::new()).await {
            tracing::debug!(error = %e, "cannot send a cancel message on NATS");
        }
    });
}

async fn run(shared: Rc<Shared>, call: Forward, request_no: u64) {
    let (code, message, payload) = request(&shared, &call, request_no).await;
    BridgeCounters::bump(&shared.counters.imported);
    if code.is_some() {
        BridgeCounters::bump(&shared.counters.imported_errors);
    }
    shared.imports.borrow_mut().remove(&call.id);
    shared.link.send(
        &Envelope::Reply {
            id: call.id,
            code,
            message: &message,
        },
        &payload,
    );
}

/// The first pause before asking NATS again when no host serves a name
/// (doubling up to [`RETRY_MAX`]).
const RETRY_FIRST: Duration = Duration::from_millis(50);
/// The longest pause between two attempts.
const RETRY_MAX: Duration = Duration::from_secs(1);
/// How long before the deadline the bridge gives up waiting for a host,
/// so that its `TimeoutNoService` arrives before the broker's `Timeout`.
const MARGIN: Duration = Duration::from_millis(20);

async fn request(
    shared: &Shared,
    call: &Forward,
    request_no: u64,
) -> (Option<ErrorCode>, String, Bytes) {
    let subject = shared.config.subject(&call.service);
    // Not connected (NATS down, refusing the credentials, or the client
    // died and the next one is not there yet): fail now rather than wait
    // out the deadline for a reconnection.
    if !shared.nats.connected() {
        return (
            Some(ErrorCode::ServiceGone),
            format!(
                "the broker's NATS bridge is not connected to NATS ({}), so {} is unreachable; see zrpcd's log",
                shared.config.servers.join(","),
                call.service
            ),
            Bytes::new(),
        );
    }
    if let Some(message) = too_large(&shared.nats.client(), call.payload.len(), "the arguments") {
        return (Some(ErrorCode::LimitExceeded), message, Bytes::new());
    }
    let deadline = call
        .timeout_ms
        .map(|ms| Instant::now() + Duration::from_millis(ms));
    let mut pause = RETRY_FIRST;
    loop {
        let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let mut headers = HeaderMap::new();
        headers.insert(H_REQUEST, request_no.to_string().as_str());
        headers.insert(H_EPOCH, shared.epoch.as_str());
        headers.insert(H_METHOD, call.method.as_str());
        if let Some(r) = remaining {
            headers.insert(H_TIMEOUT_MS, (r.as_millis() as u64).to_string().as_str());
        }
        headers.insert(H_ORIGIN, shared.config.host_id.as_str());
        headers.insert(H_CALLER, call.caller.as_str());
        let request = async_nats::Request::new()
            .headers(headers)
            .payload(call.payload.clone())
            .timeout(remaining);
        let nats = shared.nats.current();
        let e = match nats.client.send_request(subject.clone(), request).await {
            Ok(msg) => {
                let headers = msg.headers.as_ref();
                let code = header(headers, H_CODE)
                    .and_then(|c| c.parse::<u16>().ok())
                    .and_then(ErrorCode::from_u16);
                let message = header(headers, H_MESSAGE).unwrap_or_default().to_owned();
                return (code, message, msg.payload);
            }
            Err(e) => e,
        };
        let (code, message) = match e.kind() {
            // Like a local call to a name nobody holds: fail at once with
            // NO_WAIT, else wait (within the deadline) for a host to serve
            // it.
            RequestErrorKind::NoResponders if call.flags & flags::NO_WAIT == 0 => match remaining {
                Some(r) if r <= pause + MARGIN => {
                    tokio::time::sleep(r.saturating_sub(MARGIN)).await;
                    (
                        ErrorCode::TimeoutNoService,
                        format!(
                            "no host served {} on NATS (subject {subject}) before the deadline",
                            call.service
                        ),
                    )
                }
                _ => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(RETRY_MAX);
                    continue;
                }
            },
            RequestErrorKind::NoResponders => (
                ErrorCode::NoSuchService,
                format!(
                    "no host serves {} on NATS (subject {subject}; is it exported there?)",
                    call.service
                ),
            ),
            RequestErrorKind::TimedOut => (
                ErrorCode::Timeout,
                format!(
                    "{} did not answer over NATS within the deadline",
                    call.service
                ),
            ),
            // The request's answer went with its client's connection task,
            // which had taken the request (nothing else fails a request
            // so): it may have been sent, and run. Not sent again: that
            // would go to echo's queue group anew, maybe to another
            // exporting host, which knows nothing of the first (the
            // repeated-call key is per exporting host), so the call could
            // run twice. Answered as a local instance that disconnected.
            RequestErrorKind::Other if may_have_been_sent(&e) => (
                ErrorCode::ServiceGone,
                format!(
                    "the bridge's NATS client died after it took the request to {subject} \
                     (the call may have run)"
                ),
            ),
            // The client's connection task had ended before it took the
            // request (its command channel was closed): never sent, so sent
            // on the next client, within the deadline, with the same
            // identity.
            RequestErrorKind::Other => {
                let wait = remaining.map_or(REPLACEMENT_WAIT, |r| {
                    r.saturating_sub(MARGIN).min(REPLACEMENT_WAIT)
                });
                if let Ok(Some(_)) =
                    tokio::time::timeout(wait, shared.nats.replaced(nats.number)).await
                {
                    tracing::debug!(service = %call.service, request_no, "sent again on the NATS bridge's new client");
                    continue;
                }
                (
                    ErrorCode::ServiceGone,
                    format!("the NATS request to {subject} failed: {e}"),
                )
            }
        };
        return (Some(code), message, Bytes::new());
    }
}

/// Whether a request that failed with [`RequestErrorKind::Other`] may have
/// been sent: its client's connection task took it (async-nats 0.46 then
/// fails it with the `RecvError` of the answer's channel, dropped with
/// the task), rather than refusing it (a closed command channel).
fn may_have_been_sent(e: &async_nats::RequestError) -> bool {
    std::error::Error::source(e).is_some_and(|s| s.is::<tokio::sync::oneshot::error::RecvError>())
}
