//! The subcommands about many names: `register-many` and `page` (see
//! the module docs of `main.rs`).

use zrpc_proto::Envelope;
use zrpc_tests::raw::Raw;

use super::{connect, say};

/// Sends `env` and waits for its ack (answering pings meanwhile): None if
/// accepted, else the refusal as printed. Exits if the broker closes.
fn acked(r: &mut Raw, env: &Envelope<'_>) -> Option<String> {
    r.send(env, b"");
    loop {
        let Some(f) = r.recv_frame() else {
            say("fatal closed");
            std::process::exit(0);
        };
        match f.decode() {
            Ok(Envelope::Ack { code: None, .. }) => return None,
            Ok(Envelope::Ack {
                code: Some(c),
                message,
                ..
            }) => return Some(format!("ack {c} {message}")),
            Ok(Envelope::Ping { nonce }) => r.send(&Envelope::Pong { nonce }, b""),
            _ => {}
        }
    }
}

/// Registers `prefix`0.. on `r`, up to `count` or the first refusal
/// (printed): how many it holds.
fn register_all(r: &mut Raw, prefix: &str, count: u64) -> u64 {
    for i in 0..count {
        let name = format!("{prefix}{i}");
        let env = Envelope::Register {
            req: i,
            name: &name,
            shared: false,
        };
        if let Some(refused) = acked(r, &env) {
            say(&refused);
            return i;
        }
    }
    count
}

/// `register-many` (unregistering and registering them again `cycles`
/// times): see the module docs.
pub fn register_many(prefix: &str, count: u64, cycles: u64) {
    let mut r = connect(None);
    let mut held = register_all(&mut r, prefix, count);
    for _ in 0..cycles {
        if held != count {
            break;
        }
        for i in 0..count {
            let name = format!("{prefix}{i}");
            if let Some(refused) = acked(
                &mut r,
                &Envelope::Unregister {
                    req: i,
                    name: &name,
                },
            ) {
                say(&refused);
            }
        }
        held = register_all(&mut r, prefix, count);
    }
    say(&format!("registered {held}"));
    while let Some(f) = r.recv_frame() {
        if let Ok(Envelope::Ping { nonce }) = f.decode() {
            r.send(&Envelope::Pong { nonce }, b"");
        }
    }
}

/// `page`: see the module docs.
pub fn page(method: &str, limit: u64) {
    use rmpv::Value;
    let mut r = connect(None);
    let (mut entries, mut pages) = (0, 0);
    let mut after = Value::Nil;
    for id in 1.. {
        let payload = Value::Map(vec![
            (Value::from("after"), after.clone()),
            (Value::from("limit"), Value::from(limit)),
        ]);
        let mut bytes = Vec::new();
        let _ = rmpv::encode::write_value(&mut bytes, &payload);
        r.send(
            &Envelope::Call {
                id,
                service: "zrpcd",
                method,
                timeout_ms: Some(10_000),
                flags: 0,
            },
            &bytes,
        );
        let answer = loop {
            let Some(f) = r.recv_frame() else {
                return say("fatal closed");
            };
            match f.decode() {
                Ok(Envelope::Result { code: None, .. }) => {
                    break rmpv::decode::read_value(&mut &f.payload[..]).unwrap_or(Value::Nil);
                }
                Ok(Envelope::Result {
                    code: Some(c),
                    message,
                    ..
                }) => return say(&format!("result {c} {message}")),
                _ => {}
            }
        };
        let field = |k: &str| {
            answer
                .as_map()
                .and_then(|m| m.iter().find(|(key, _)| key.as_str() == Some(k)))
                .map(|(_, v)| v.clone())
        };
        let Some(Value::Array(got)) = field("entries") else {
            return say("result bad_answer no entries");
        };
        pages += 1;
        entries += got.len();
        after = field("next").unwrap_or(Value::Nil);
        if after.is_nil() {
            break;
        }
    }
    say(&format!("paged {entries} in {pages} pages"));
}
