//! A raw protocol connection for tests that need to speak frames directly.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use bytes::{Bytes, BytesMut};
use zrpc_proto::{encode_frame, Envelope, ErrorCode, FrameDecoder, PROTOCOL_VERSION};

use crate::WAIT;

/// A raw protocol connection.
pub struct Raw {
    /// The socket.
    pub s: UnixStream,
    buf: BytesMut,
}

impl Raw {
    /// Connects to the broker in `dir` (no handshake).
    pub fn connect(dir: &Path) -> Raw {
        let s = UnixStream::connect(dir.join("zrpcd.sock")).expect("connect");
        s.set_read_timeout(Some(WAIT)).expect("timeout");
        Raw {
            s,
            buf: BytesMut::new(),
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
        let mut out = BytesMut::new();
        let hello = Envelope::Hello {
            version: PROTOCOL_VERSION,
            instance,
            agent: "test",
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

    /// Next frame; None on EOF or error.
    pub fn recv_frame(&mut self) -> Option<zrpc_proto::Frame> {
        let dec = FrameDecoder::new(u32::MAX);
        loop {
            if let Some(f) = dec.decode(&mut self.buf).expect("valid frame from broker") {
                return Some(f);
            }
            let mut tmp = [0u8; 65536];
            let n = self.s.read(&mut tmp).ok()?;
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&tmp[..n]);
        }
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
