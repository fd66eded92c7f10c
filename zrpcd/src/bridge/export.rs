//! Export: locally served names matching `[export]` are subscribed on NATS
//! (one queue group per name); each NATS request becomes a local call whose
//! `Result` is the reply. Also keeps the `[import]` names registered
//! ([`sync_loop`] reads the broker's `zrpcd.list` for both).

use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

use futures_util::StreamExt;
use rmpv::Value;
use zrpc_proto::ErrorCode;

use super::{header, reply_headers, AbortOnDrop, Shared, H_CALLER, H_METHOD, H_ORIGIN};
use super::{H_TIMEOUT_MS, SYNC_INTERVAL};

/// Every [`SYNC_INTERVAL`]: subscribes the exported names a local service
/// holds and unsubscribes those no longer held; registers the imported
/// names nobody holds.
pub(super) async fn sync_loop(shared: Rc<Shared>) {
    let mut subs: BTreeMap<String, AbortOnDrop> = BTreeMap::new();
    let mut tick = tokio::time::interval(SYNC_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(answer) = shared
            .link
            .call(zrpc_proto::BROKER_SERVICE, "list", Some(5_000), &[])
            .await
        else {
            return;
        };
        if let Some(code) = answer.code {
            tracing::warn!(code = code.as_str(), message = %answer.message, "the bridge cannot list the broker's names");
            continue;
        }
        let Some(held) = held_names(&answer.payload) else {
            tracing::warn!("the bridge cannot read the broker's zrpcd.list answer");
            continue;
        };
        let own = shared.link.conn_id();
        let served: BTreeSet<&str> = held
            .iter()
            .filter(|(name, holders)| {
                shared.config.exports(name) && holders.iter().any(|&h| h != own)
            })
            .map(|(name, _)| name.as_str())
            .collect();
        subs.retain(|name, _| {
            let keep = served.contains(name.as_str());
            if !keep {
                tracing::info!(service = %name, "no longer served here: withdrawn from NATS");
            }
            keep
        });
        for name in served {
            if subs.contains_key(name) {
                continue;
            }
            let subject = shared.config.subject(name);
            match shared
                .nats
                .queue_subscribe(subject.clone(), shared.config.queue_group(name))
                .await
            {
                Ok(sub) => {
                    tracing::info!(service = %name, %subject, "exported on NATS");
                    let task =
                        tokio::task::spawn_local(serve(shared.clone(), name.to_owned(), sub));
                    subs.insert(name.to_owned(), AbortOnDrop(task.abort_handle()));
                }
                Err(e) => {
                    tracing::warn!(service = %name, error = %e, "cannot subscribe on NATS; retrying")
                }
            }
        }
        for name in &shared.config.import {
            if held.contains_key(name) {
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

/// The names in a `zrpcd.list` answer with their holders' connection ids.
fn held_names(payload: &[u8]) -> Option<BTreeMap<String, Vec<u64>>> {
    let value = rmpv::decode::read_value(&mut &payload[..]).ok()?;
    let mut out = BTreeMap::new();
    for entry in value.as_array()? {
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
    Some(out)
}

/// Serves one exported name's NATS requests until unsubscribed.
async fn serve(shared: Rc<Shared>, name: String, mut sub: async_nats::Subscriber) {
    while let Some(msg) = sub.next().await {
        tokio::task::spawn_local(answer(shared.clone(), name.clone(), msg));
    }
}

/// Makes one NATS request a local call and publishes its outcome.
async fn answer(shared: Rc<Shared>, name: String, msg: async_nats::Message) {
    let Some(reply) = msg.reply else {
        tracing::debug!(service = %name, "a NATS message without reply subject: ignored");
        return;
    };
    let headers = msg.headers.as_ref();
    let method = header(headers, H_METHOD);
    let timeout = header(headers, H_TIMEOUT_MS).map(str::parse::<u64>);
    let (code, message, payload) = match (method, timeout) {
        (Some(method), None | Some(Ok(_))) => {
            let timeout_ms = header(headers, H_TIMEOUT_MS).and_then(|t| t.parse::<u64>().ok());
            tracing::debug!(
                service = %name,
                method,
                timeout_ms,
                origin = header(headers, H_ORIGIN).unwrap_or("?"),
                caller = header(headers, H_CALLER).unwrap_or("?"),
                "a call from NATS"
            );
            match shared
                .link
                .call(&name, method, timeout_ms, &msg.payload)
                .await
            {
                Some(a) => (a.code, a.message, a.payload),
                None => (
                    Some(ErrorCode::Shutdown),
                    "the exporting broker's bridge stopped".to_owned(),
                    bytes::Bytes::new(),
                ),
            }
        }
        _ => (
            Some(ErrorCode::Protocol),
            format!("a NATS request needs the header {H_METHOD} and a numeric {H_TIMEOUT_MS} (docs/bridge.md)"),
            bytes::Bytes::new(),
        ),
    };
    if let Err(e) = shared
        .nats
        .publish_with_headers(reply, reply_headers(code, &message), payload)
        .await
    {
        tracing::warn!(service = %name, error = %e, "cannot send a reply on NATS");
    }
}
