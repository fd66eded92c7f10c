//! One connection: a reader that feeds every complete frame to the broker,
//! and a writer that flushes the peer's queue with one vectored write per
//! wake-up.

use std::cell::RefCell;
use std::rc::Rc;

use bytes::BytesMut;
use tokio::io::AsyncReadExt;
use tokio::net::unix::OwnedReadHalf;
use tokio::net::UnixStream;
use tokio::time::Instant;
use zrpc_proto::{ErrorCode, FrameDecoder, ProtoError};

use crate::broker::{Broker, Fatal};
use crate::peers::{Creds, PeerId};
use crate::queue::PeerIo;

/// Read buffer size for ordinary reads.
const READ_CHUNK: usize = 8 * 1024;

/// Serves one accepted connection until it closes.
pub async fn serve(broker: Rc<RefCell<Broker>>, stream: UnixStream) {
    let creds = stream
        .peer_cred()
        .map(|c| Creds {
            pid: c.pid().unwrap_or(0),
            uid: c.uid(),
            gid: c.gid(),
        })
        .unwrap_or_default();
    let (rd, wr) = stream.into_split();
    let io = Rc::new(PeerIo::new(wr));
    let (id, decoder, handshake) = {
        let mut b = broker.borrow_mut();
        let id = b.add_peer(io.clone(), creds);
        (
            id,
            FrameDecoder::new(b.config.max_message_size),
            b.config.handshake_timeout,
        )
    };
    let writer = tokio::task::spawn_local(write_loop(io.clone()));
    let reason = read_loop(&broker, &io, id, rd, decoder, Instant::now() + handshake).await;
    tracing::debug!(peer = id, pid = creds.pid, %reason, "connection closed");
    {
        let mut b = broker.borrow_mut();
        b.remove_peer(id);
        b.flush();
    }
    io.close();
    let _ = writer.await;
}

async fn read_loop(
    broker: &RefCell<Broker>,
    io: &PeerIo,
    id: PeerId,
    mut rd: OwnedReadHalf,
    decoder: FrameDecoder,
    hello_deadline: Instant,
) -> String {
    let mut buf = BytesMut::new();
    let mut ready = false;
    loop {
        // Reserve the whole frame at once when a large one is arriving.
        let want = decoder.needed(&buf).map_or(READ_CHUNK, |n| n - buf.len());
        if buf.capacity() - buf.len() < want.min(READ_CHUNK) || buf.capacity() - buf.len() < want {
            buf.reserve(want.max(READ_CHUNK));
        }
        let read = tokio::select! {
            r = rd.read_buf(&mut buf) => r,
            _ = io.kill.notified() => return "closed by the broker".into(),
            _ = tokio::time::sleep_until(hello_deadline), if !ready => {
                let fatal = Fatal {
                    code: ErrorCode::Protocol,
                    message: "no Hello within the handshake timeout".into(),
                };
                close_with(broker, id, &fatal);
                return "handshake timeout".into();
            }
        };
        match read {
            Ok(0) => return "end of stream".into(),
            Ok(_) => {}
            Err(e) => return format!("read error: {e}"),
        }
        let mut b = broker.borrow_mut();
        match b.peers.get_mut(id) {
            Some(p) => p.last_seen = std::time::Instant::now(),
            None => return "closed by the broker".into(),
        }
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(frame)) => {
                    if let Err(fatal) = b.on_frame(id, frame) {
                        b.fatal(id, &fatal);
                        b.flush();
                        return fatal.message;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let code = match e {
                        ProtoError::FrameTooLarge { .. } => ErrorCode::LimitExceeded,
                        _ => ErrorCode::Protocol,
                    };
                    let fatal = Fatal {
                        code,
                        message: e.to_string(),
                    };
                    b.fatal(id, &fatal);
                    b.flush();
                    return fatal.message;
                }
            }
        }
        b.flush();
        ready = ready || b.peers.get(id).is_some_and(|p| p.ready);
        drop(b);
        // An idle connection keeps no read buffer.
        if buf.is_empty() {
            buf = BytesMut::new();
        }
    }
}

fn close_with(broker: &RefCell<Broker>, id: PeerId, fatal: &Fatal) {
    let mut b = broker.borrow_mut();
    b.fatal(id, fatal);
    b.flush();
}

/// Takes over flushing when the socket is full (waits until it is
/// writable), and on close flushes what is left and shuts the socket down.
async fn write_loop(io: Rc<PeerIo>) {
    loop {
        if io.queue.borrow().is_empty() {
            io.writer_busy.set(false);
            if io.closed.get() {
                break;
            }
            io.notify.notified().await;
            continue;
        }
        io.writer_busy.set(true);
        if io.wr.writable().await.is_err() {
            break;
        }
        let result = io.queue.borrow_mut().write_now(&io.wr);
        if let Err(e) = result {
            tracing::debug!(error = %e, "write failed");
            io.closed.set(true);
            break;
        }
    }
    io.writer_busy.set(false);
    io.shutdown_write();
}
