//! Drives a [`Broker`] with an arbitrary byte string, as a set of hostile
//! peers would: frames (well-formed envelopes with fuzzed fields, or raw
//! bytes), disconnects, deadlines passing, heartbeats, partial frames. Used
//! by the `broker` fuzz target (`fuzz/fuzz_targets/broker.rs`) and by the
//! tests below, so that "no peer input can panic the broker" is checked on
//! the routing logic itself, not only on the decoder.
//!
//! After the input is consumed every peer disconnects, and the broker must
//! be empty again: no pending call, no name, no partial-frame bytes, no
//! per-connection call list.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::Interest;
use zrpc_io::reactor::register;
use zrpc_proto::{Envelope, ErrorCode, PROTOCOL_VERSION};

use crate::broker::Broker;
use crate::payload::Payload;
use crate::peers::{Creds, PeerId};
use crate::queue::PeerIo;
use crate::Config;

/// Peers driven at once.
const PEERS: usize = 4;
/// Names the peers pick from (a small set, so that they collide).
const NAMES: [&str; 4] = ["svc", "zrpcd", "other", "bad name"];

thread_local! {
    static RUNTIME: Option<tokio::runtime::Runtime> = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok();
}

/// Reads the input front to back; every read past the end yields zeros.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    fn u64(&mut self) -> u64 {
        (0..8).fold(0, |v, _| (v << 8) | u64::from(self.u8()))
    }
    /// A u64 biased towards the values that matter (0, 1, small, huge).
    fn num(&mut self) -> u64 {
        match self.u8() % 6 {
            0 => 0,
            1 => u64::from(self.u8()),
            2 => u64::MAX - u64::from(self.u8()),
            3 => 1 << (self.u8() % 64),
            _ => self.u64(),
        }
    }
    fn bytes(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
    fn name(&mut self) -> &'static str {
        NAMES[usize::from(self.u8()) % NAMES.len()]
    }
}

fn connect(broker: &mut Broker, keep: &mut Vec<std::os::unix::net::UnixStream>) -> Option<PeerId> {
    let (a, b) = std::os::unix::net::UnixStream::pair().ok()?;
    a.set_nonblocking(true).ok()?;
    let rd = Rc::new(register(a, Interest::READABLE).ok()?);
    keep.push(b);
    // Two users besides root, so that the per-user quotas play too.
    let uid = [0, 1000, 1001][keep.len() % 3];
    let creds = Creds {
        pid: 1,
        uid,
        gid: uid,
    };
    Some(broker.add_peer(Rc::new(PeerIo::new(rd)), creds))
}

/// Ends a connection the way its task does: the broker forgets it.
fn disconnect(broker: &mut Broker, peer: PeerId) {
    broker.remove_peer(peer);
}

/// Runs `data` against a fresh broker; panics if the broker panics or is
/// not empty once every peer is gone.
pub fn drive(data: &[u8]) {
    RUNTIME.with(|rt| {
        let Some(rt) = rt else { return };
        {
            let _entered = rt.enter();
            drive_in_runtime(data);
        }
        // The sockets' registrations dropped by this run are released only
        // when the runtime's I/O driver turns (a running broker turns it all
        // the time); without this, every run left its registrations behind
        // and a fuzzing process grew by about 5 KB a run until libFuzzer's
        // memory limit stopped it (reported as an "oom" input).
        rt.block_on(tokio::task::yield_now());
    });
}

fn drive_in_runtime(data: &[u8]) {
    let mut config = Config::new(Some("/nonexistent".into()));
    config.max_pending_per_conn = 8;
    config.max_pending_total = 16;
    config.max_names_per_conn = 2;
    config.max_stats_names = 2;
    config.max_partial_bytes = 1 << 20;
    config.max_pending_bytes_per_conn = 12;
    config.max_pending_bytes = 20;
    let broker = Rc::new(RefCell::new(Broker::new(config)));
    let mut b = broker.borrow_mut();
    let mut keep = Vec::new();
    let mut peers: Vec<PeerId> = (0..PEERS)
        .filter_map(|_| connect(&mut b, &mut keep))
        .collect();
    if peers.len() != PEERS {
        return;
    }
    let start = Instant::now();
    let mut input = Input(data);
    let mut buf = BytesMut::new();
    while !input.0.is_empty() {
        let op = input.u8();
        let slot = usize::from(op >> 4) % PEERS;
        let peer = peers[slot];
        let now = start + Duration::from_millis(u64::from(input.u8()) * 10);
        buf.clear();
        let env = match op % 16 {
            0 => Envelope::Hello {
                version: if input.u8() == 0 { 2 } else { PROTOCOL_VERSION },
                instance: input.num(),
                agent: "replay",
                caps: 0,
            },
            1 => Envelope::Register {
                req: input.num(),
                name: input.name(),
                shared: input.u8() & 1 == 1,
            },
            2 => Envelope::Unregister {
                req: input.num(),
                name: input.name(),
            },
            3..=5 => Envelope::Call {
                id: input.num() % 8,
                service: input.name(),
                method: ["m", "ping", "stats", "list", "peers", "monitor"]
                    [usize::from(input.u8()) % 6],
                timeout_ms: (input.u8() & 1 == 1).then(|| input.num()),
                flags: u32::from(input.u8() & 3),
            },
            6 | 7 => {
                // A reply to a call the broker delivered (or a made-up id).
                let ids = b.pending.ids_where(|_| true);
                let pick = usize::from(input.u8());
                let id = match ids.len() {
                    0 => input.num(),
                    n => ids[pick % n],
                };
                let code = ErrorCode::from_u16(u16::from(input.u8() % 20));
                Envelope::Reply {
                    id,
                    code,
                    message: "",
                }
            }
            8 => Envelope::Cancel {
                id: input.num() % 8,
            },
            9 => Envelope::Ping { nonce: input.num() },
            10 => {
                // Raw envelope bytes.
                let n = usize::from(input.u8());
                let raw = input.bytes(n).to_vec();
                let payload_len = usize::from(input.u8() % 8);
                let payload = input.bytes(payload_len).to_vec();
                if let Err(f) = b.on_frame_parts(peer, &raw, Payload::Borrowed(&payload), now) {
                    b.fatal(peer, &f);
                    disconnect(&mut b, peer);
                    match connect(&mut b, &mut keep) {
                        Some(p) => peers[slot] = p,
                        None => return,
                    }
                }
                continue;
            }
            11 => {
                disconnect(&mut b, peer);
                match connect(&mut b, &mut keep) {
                    Some(p) => peers[slot] = p,
                    None => return,
                }
                continue;
            }
            12 => {
                let ids = b.pending.ids_where(|_| true);
                if !ids.is_empty() {
                    let id = ids[usize::from(input.u8()) % ids.len()];
                    b.on_timeout(id);
                }
                continue;
            }
            13 => {
                b.heartbeat();
                continue;
            }
            14 => {
                let held = usize::from(input.u8()) << 14;
                let new_frame = input.u8() & 1 == 1;
                if let Err(f) = b.note_partial(peer, held, new_frame, now) {
                    b.fatal(peer, &f);
                }
                b.expire_partial_frames(now + Duration::from_secs(u64::from(input.u8())));
                continue;
            }
            _ => {
                b.begin_shutdown();
                continue;
            }
        };
        env.encode(&mut buf);
        let payload_len = usize::from(input.u8() % 8);
        let payload = input.bytes(payload_len).to_vec();
        if let Err(f) = b.on_frame_parts(peer, &buf, Payload::Borrowed(&payload), now) {
            b.fatal(peer, &f);
            disconnect(&mut b, peer);
            match connect(&mut b, &mut keep) {
                Some(p) => peers[slot] = p,
                None => return,
            }
        }
    }
    check_accounts(&b);
    for p in peers {
        disconnect(&mut b, p);
    }
    // Closed connections' unsent frames go with the last write.
    b.flush();
    b.collect_users();
    assert!(b.peers().is_empty(), "peers left: {}", b.peers().len());
    assert_eq!(b.pending.len(), 0, "calls left once every peer is gone");
    assert_eq!(b.names().len(), 0, "names left once every peer is gone");
    assert_eq!(b.peers().partial_total(), 0, "partial-frame bytes left");
    assert_eq!(b.pending.payload_bytes(), 0, "pending payload bytes left");
    assert_eq!(
        b.pending.peers_len(),
        0,
        "per-connection call lists left once every peer is gone"
    );
    assert!(
        b.users().is_empty(),
        "per-user accounts left: {}",
        b.users().len()
    );
}

/// Every user's account is the sum of its live connections' counters.
fn check_accounts(b: &Broker) {
    let mut sums: std::collections::BTreeMap<u32, (usize, usize, usize, usize, usize)> =
        Default::default();
    for p in b.peers().iter() {
        let e = sums.entry(p.creds().uid).or_default();
        e.0 += 1;
        e.1 += p.calling() as usize;
        e.2 += p.calling_bytes();
        e.3 += p.partial_bytes();
        e.4 += p.io().queue.borrow().len_bytes();
    }
    for p in b.peers().iter() {
        let u = p.user();
        let want = sums[&p.creds().uid];
        let have = (u.pending_calls(), u.pending_bytes(), u.partial_bytes());
        assert_eq!(
            have,
            (want.1, want.2, want.3),
            "uid {}: account vs connections",
            p.creds().uid
        );
        // Closed connections' sockets still count until they are closed
        // (their queues dropped); at the end none is left (`users()` empty).
        assert!(
            u.connections() >= want.0,
            "uid {}: {} sockets counted for {} connections",
            p.creds().uid,
            u.connections(),
            want.0
        );
        // Closed connections' unsent frames still count until written or
        // dropped.
        assert!(
            u.queued_bytes() >= want.4,
            "uid {}: queued bytes",
            p.creds().uid
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fixed pseudo-random corpus (the fuzz target explores further):
    /// every input must leave the broker whole and empty.
    #[test]
    fn random_inputs_leave_the_broker_empty() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for len in 0..2000usize {
            let data: Vec<u8> = (0..len % 512)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            drive(&data);
        }
    }

    /// The inputs of issue 14: huge and zero deadlines, registered and
    /// parked, then every peer leaves.
    #[test]
    fn huge_and_zero_timeouts() {
        // Hello from peers 0 and 1: op, time, version, instance, payload.
        let mut d = vec![0x00, 0, 1, 1, 7, 0, 0x10, 0, 1, 1, 8, 0];
        // Peer 1 registers NAMES[0] = "svc": op, time, req, name, shared,
        // payload.
        d.extend([0x11, 0, 0, 0, 0, 0]);
        // Peer 0 calls "svc".m with timeout u64::MAX, 0 and 2^40: op, time,
        // id, service, method, has-timeout, timeout, flags, payload.
        for (i, t) in [&[2u8, 0][..], &[0], &[3, 40]].into_iter().enumerate() {
            d.extend([0x03, 0, 1, i as u8, 0, 0, 1]);
            d.extend(t);
            d.extend([0, 0]);
        }
        // The same to a name nobody holds (parked).
        d.extend([0x03, 0, 1, 5, 2, 0, 1, 2, 0, 0, 0]);
        // Peer 1 answers a delivered call: op, time, pick, code, payload.
        d.extend([0x16, 0, 0, 0, 0]);
        drive(&d);
    }
}
