//! A raw protocol connection for tests that need to speak frames directly.

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use bytes::{Bytes, BytesMut};
use zrpc_io::fdpass::{read_spare_fds, FdQueue};
use zrpc_proto::{caps, encode_frame, Envelope, ErrorCode, FrameDecoder, PROTOCOL_VERSION};

use crate::WAIT;

/// A raw protocol connection.
pub struct Raw {
    /// The socket.
    pub s: UnixStream,
    buf: BytesMut,
    /// Descriptors received and not yet claimed by a frame.
    fds: FdQueue,
}

impl Raw {
    /// Connects to the broker in `dir` (no handshake).
    pub fn connect(dir: &Path) -> Raw {
        let s = UnixStream::connect(dir.join("zrpcd.sock")).expect("connect");
        s.set_read_timeout(Some(WAIT)).expect("timeout");
        Raw {
            s,
            buf: BytesMut::new(),
            fds: FdQueue::new(),
        }
    }

    /// Connects and completes the handshake.
    pub fn hello(dir: &Path) -> Raw {
        let mut r = Raw::connect(dir);
        r.handshake();
        r
    }

    /// Sends `Hello` and expects `Welcome`.
    pub fn handshake(&mut self) {
        let (kind, _) = self.hello_as(1).expect("welcome");
        assert_eq!(kind, zrpc_proto::Kind::Welcome);
    }

    /// Sends `Hello` with instance id `instance` and returns the answer
    /// (`Welcome`, or `Fatal`). A broker that refused the connection at
    /// accept may have closed it already: the write may fail, and the
    /// `Fatal` it sent first is still there to read.
    pub fn hello_as(&mut self, instance: u64) -> Option<(zrpc_proto::Kind, zrpc_proto::Frame)> {
        self.hello_caps(instance, 0)
    }

    /// Connects and completes a handshake offering payloads in descriptors;
    /// returns the capabilities the broker's `Welcome` accepted.
    pub fn hello_fds(dir: &Path) -> (Raw, u32) {
        let mut r = Raw::connect(dir);
        let (_, f) = r.hello_caps(1, caps::FD_PAYLOADS).expect("welcome");
        match f.decode().expect("envelope") {
            Envelope::Welcome { caps, .. } => (r, caps),
            other => panic!("expected Welcome, got {other:?}"),
        }
    }

    /// Sends `Hello` offering `caps`; returns the answer.
    pub fn hello_caps(
        &mut self,
        instance: u64,
        caps: u32,
    ) -> Option<(zrpc_proto::Kind, zrpc_proto::Frame)> {
        let mut out = BytesMut::new();
        let hello = Envelope::Hello {
            version: PROTOCOL_VERSION,
            instance,
            agent: "test",
            caps,
        };
        encode_frame(&mut out, &hello, b"");
        let _ = self.s.write_all(&out);
        self.recv()
    }

    /// Sends one frame.
    pub fn send(&mut self, env: &Envelope<'_>, payload: &[u8]) {
        let mut out = BytesMut::new();
        encode_frame(&mut out, env, payload);
        self.s.write_all(&out).expect("write");
    }

    /// Sends one frame whose payload is the descriptor `fd`
    /// ([`zrpc_proto::FD_PAYLOAD_FLAG`]), attached with `SCM_RIGHTS`; any
    /// `extra` descriptors are attached to the same message (a flood).
    pub fn send_fd(&mut self, env: &Envelope<'_>, fd: &impl AsRawFd, extra: &[&dyn AsRawFd]) {
        let mut out = BytesMut::new();
        zrpc_proto::encode_fd_header(&mut out, env);
        let all: Vec<i32> = std::iter::once(fd.as_raw_fd())
            .chain(extra.iter().map(|f| f.as_raw_fd()))
            .collect();
        let n = zrpc_io::fdpass::send_with_fds(self.s.as_raw_fd(), &[&out], &all).expect("sendmsg");
        assert_eq!(n, out.len(), "sent whole");
    }

    /// Next frame; None on EOF or error. A frame that came with a
    /// descriptor is returned with it by [`Raw::recv_frame_fd`] only.
    pub fn recv_frame(&mut self) -> Option<zrpc_proto::Frame> {
        self.recv_frame_fd().map(|(f, _)| f)
    }

    /// Next frame, and the descriptor its payload travels in, if any.
    pub fn recv_frame_fd(&mut self) -> Option<(zrpc_proto::Frame, Option<OwnedFd>)> {
        let dec = FrameDecoder::new(u32::MAX).with_fds(true);
        loop {
            let fd_frame = dec
                .complete(&self.buf)
                .expect("valid frame from broker")
                .map(|size| size.has_fd());
            if let Some(has_fd) = fd_frame {
                let fd = if has_fd {
                    Some(self.fds.pop_front().expect("the frame's descriptor"))
                } else {
                    None
                };
                let size = dec.complete(&self.buf).ok()??;
                return Some((size.split_off(&mut self.buf), fd));
            }
            self.buf.reserve(65536);
            let n = read_spare_fds(&self.s, &mut self.buf, &mut self.fds).ok()?;
            if n == 0 {
                return None;
            }
        }
    }

    /// Descriptors received that no frame claimed.
    pub fn unclaimed_fds(&self) -> usize {
        self.fds.len()
    }

    /// Next frame with its kind.
    pub fn recv(&mut self) -> Option<(zrpc_proto::Kind, zrpc_proto::Frame)> {
        let f = self.recv_frame()?;
        let kind = f.decode().expect("valid envelope").kind();
        Some((kind, f))
    }

    /// Expects a `Fatal` with `code`, then the connection closing.
    pub fn expect_fatal(&mut self, code: ErrorCode) -> String {
        let f = self.recv_frame().expect("a Fatal frame before close");
        let msg = match f.decode().expect("envelope") {
            Envelope::Fatal { code: c, message } => {
                assert_eq!(c, code, "{message}");
                message.to_string()
            }
            other => panic!("expected Fatal, got {other:?}"),
        };
        assert!(self.recv_frame().is_none(), "connection closed after Fatal");
        msg
    }

    /// Makes one call with a nil payload and returns its result.
    pub fn call(
        &mut self,
        id: u64,
        service: &str,
        method: &str,
        timeout_ms: Option<u64>,
    ) -> (Option<ErrorCode>, String, Bytes) {
        self.send(
            &Envelope::Call {
                id,
                service,
                method,
                timeout_ms,
                flags: 0,
            },
            b"\xc0",
        );
        let f = self.recv_frame().expect("result");
        match f.decode().expect("envelope") {
            Envelope::Result {
                id: rid,
                code,
                message,
            } => {
                assert_eq!(rid, id);
                (code, message.to_string(), f.payload.clone())
            }
            other => panic!("expected Result, got {other:?}"),
        }
    }
}

/// Registers `name` on a raw connection and waits for its `Ack`.
pub fn register(r: &mut Raw, name: &str) {
    r.send(
        &Envelope::Register {
            req: 1,
            name,
            shared: false,
        },
        b"",
    );
    // A connection holding a name is pinged by the heartbeat: a ping may
    // come before the Ack (a slow test machine), and is answered.
    loop {
        match r.recv_frame().expect("ack").decode().expect("envelope") {
            Envelope::Ack { code, message, .. } => {
                assert_eq!(code, None, "{message}");
                return;
            }
            Envelope::Ping { nonce } => r.send(&Envelope::Pong { nonce }, b""),
            other => panic!("expected Ack, got {other:?}"),
        }
    }
}
