//! A floor for a client written on tokio: the relay's raw protocol
//! (`raw.rs`) spoken by the plainest clients tokio offers. No
//! serialisation, no deadlines, no reconnection, no broker: what this
//! client loses against the blocking `raw-client` on the same relay is what
//! the runtime costs a plain design. It is a reference, not a proof that no
//! design can do better (zrpc's client beats it with one call in flight
//! per process, where zrpc's broker and service poll and the relay does
//! not).
//!
//! One call in flight: a loop in the `block_on` future, as a README `main`
//! writes it, that writes each frame and reads its echo itself (the shape
//! of mini-redis's client). More: `inflight` spawned tasks take calls from
//! one counter (the shape of tarpc's client); each call puts a oneshot
//! sender in a shared map, appends its frame to a shared buffer and
//! notifies the writer task (which yields once, then writes everything
//! queued in one write); the reader task reads whatever is available and
//! completes each frame's oneshot. `--flavour multi` runs on the runtime
//! `#[tokio::main]` builds, `current` on a current-thread runtime.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{oneshot, Notify};

use crate::raw::RAW_HEADER;
use crate::util::{die, measured, mono_ns};

struct Shared {
    pending: Mutex<HashMap<u64, oneshot::Sender<()>>>,
    out: Mutex<Vec<u8>>,
    wake_writer: Notify,
    next_id: AtomicU64,
    size: usize,
}

impl Shared {
    async fn call(&self, payload: &[u8]) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tx);
        {
            let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
            out.extend_from_slice(&((12 + payload.len()) as u32).to_be_bytes());
            out.extend_from_slice(&0u32.to_be_bytes());
            out.extend_from_slice(&id.to_be_bytes());
            out.extend_from_slice(payload);
        }
        self.wake_writer.notify_one();
        rx.await.unwrap_or_else(|_| die("reader ended"));
    }
}

async fn writer(shared: Arc<Shared>, mut w: tokio::net::unix::OwnedWriteHalf) {
    let mut buf = Vec::new();
    loop {
        shared.wake_writer.notified().await;
        // Let the callers woken with this one queue their frames first, so
        // that one write carries them all (without it the LIFO slot runs the
        // writer after each caller: +10-20% calls/s at 64 in flight here).
        tokio::task::yield_now().await;
        std::mem::swap(
            &mut buf,
            &mut *shared.out.lock().unwrap_or_else(|e| e.into_inner()),
        );
        if !buf.is_empty() {
            w.write_all(&buf).await.unwrap_or_else(|e| die(e));
            buf.clear();
        }
    }
}

async fn reader(shared: Arc<Shared>, mut r: tokio::net::unix::OwnedReadHalf) {
    let mut buf = vec![0u8; 256 * 1024];
    let mut len = 0;
    loop {
        let n = r.read(&mut buf[len..]).await.unwrap_or_else(|e| die(e));
        if n == 0 {
            return;
        }
        len += n;
        let mut off = 0;
        while len - off >= RAW_HEADER {
            let body = u32::from_be_bytes([buf[off], buf[off + 1], buf[off + 2], buf[off + 3]]);
            let l = 4 + body as usize;
            if l != RAW_HEADER + shared.size {
                die("bad echo frame");
            }
            if len - off < l {
                break;
            }
            let mut id = [0u8; 8];
            id.copy_from_slice(&buf[off + 8..off + 16]);
            let tx = shared
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&u64::from_be_bytes(id));
            match tx {
                Some(tx) => {
                    let _ = tx.send(());
                }
                None => die("echo of an unknown id"),
            }
            off += l;
        }
        buf.copy_within(off..len, 0);
        len -= off;
        if len == buf.len() {
            buf.resize(2 * len, 0);
        }
    }
}

/// `n` calls one after the other from the calling future, which writes each
/// frame and reads its echo itself; `next_id` numbers them.
async fn sequential(s: &mut UnixStream, size: usize, n: usize, next_id: &mut u64) -> Vec<u64> {
    let payload = vec![0x5au8; size];
    let mut frame = Vec::with_capacity(RAW_HEADER + size);
    let mut echo = vec![0u8; RAW_HEADER + size];
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let t = mono_ns();
        frame.clear();
        frame.extend_from_slice(&((12 + size) as u32).to_be_bytes());
        frame.extend_from_slice(&0u32.to_be_bytes());
        frame.extend_from_slice(&next_id.to_be_bytes());
        frame.extend_from_slice(&payload);
        s.write_all(&frame).await.unwrap_or_else(|e| die(e));
        s.read_exact(&mut echo).await.unwrap_or_else(|e| die(e));
        if echo[..4] != frame[..4] || echo[8..16] != frame[8..16] {
            die("bad echo frame");
        }
        *next_id += 1;
        lat.push(mono_ns() - t);
    }
    lat
}

async fn run(shared: &Arc<Shared>, inflight: usize, n: usize) -> Vec<u64> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..inflight {
        let (shared, next) = (shared.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let payload = vec![0x5au8; shared.size];
            let mut lat = Vec::with_capacity(n / inflight + 1);
            while next.fetch_add(1, Ordering::Relaxed) < n {
                let t = mono_ns();
                shared.call(&payload).await;
                lat.push(mono_ns() - t);
            }
            lat
        }));
    }
    let mut all = Vec::with_capacity(n);
    for t in tasks {
        all.extend(t.await.unwrap_or_else(|e| die(e)));
    }
    all
}

/// Runs the tokio floor client against the relay at `path` and prints a
/// result line (`multi`: the multi-thread runtime; otherwise current-thread).
pub fn client(path: &Path, multi: bool, inflight: usize, warmup: usize, calls: usize, size: usize) {
    let rt = if multi {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    }
    .unwrap_or_else(|e| die(e));
    rt.block_on(async {
        let mut s = UnixStream::connect(path)
            .await
            .unwrap_or_else(|e| die(format!("connect relay: {e}")));
        s.write_all(b"C").await.unwrap_or_else(|e| die(e));
        if inflight == 1 {
            let mut next_id = 0;
            sequential(&mut s, size, warmup, &mut next_id).await;
            measured(sequential(&mut s, size, calls, &mut next_id)).await;
            return;
        }
        let (r, w) = s.into_split();
        let shared = Arc::new(Shared {
            pending: Mutex::new(HashMap::new()),
            out: Mutex::new(Vec::new()),
            wake_writer: Notify::new(),
            next_id: AtomicU64::new(0),
            size,
        });
        tokio::spawn(reader(shared.clone(), r));
        tokio::spawn(writer(shared.clone(), w));
        run(&shared, inflight, warmup).await;
        measured(run(&shared, inflight, calls)).await;
    });
}
