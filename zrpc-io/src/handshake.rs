//! Connecting to the broker: the one handshake of zrpc.
//!
//! A connection starts with the peer checking who the broker is
//! ([`crate::trust::check_broker`], before anything is sent), then sending
//! `Hello` and reading the broker's first frame: `Welcome` (the broker's
//! protocol version and maximum message size) or `Fatal` (refused). The
//! bytes read after `Welcome` are handed back with the socket, so nothing
//! the broker sent early is lost. [`connect`] does it on tokio,
//! [`connect_blocking`] on a blocking socket.

use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::BytesMut;
use zrpc_proto::{encode_frame, Envelope, ErrorCode, Frame, FrameDecoder, PROTOCOL_VERSION};

use crate::read::read_spare;
use crate::trust::{check_broker, UntrustedBroker};

/// Largest frame accepted during the handshake.
pub const MAX_BODY: u32 = 64 * 1024;

/// What the broker said in `Welcome`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Welcome {
    /// The broker's id for this connection (shown in its logs).
    pub conn_id: u64,
    /// The broker's limit on `body_len`.
    pub max_message_size: u32,
}

impl Welcome {
    /// Decoder limit for frames coming from the broker (its limit plus
    /// [`zrpc_proto::INCOMING_SLACK`]).
    pub fn incoming_limit(&self) -> u32 {
        self.max_message_size
            .saturating_add(zrpc_proto::INCOMING_SLACK)
    }
}

/// Why a connection could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// Connecting, writing `Hello` or reading the answer failed (the
    /// broker closed the connection: `UnexpectedEof`; no answer in time:
    /// `TimedOut`).
    #[error("cannot connect to zrpcd at {}: {source}", path.display())]
    Connect {
        /// The broker's socket.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
    /// The broker runs as a uid this process does not trust.
    #[error(transparent)]
    Untrusted(#[from] UntrustedBroker),
    /// The broker speaks another protocol version.
    #[error(
        "the broker speaks protocol version {broker}, this library version {PROTOCOL_VERSION}"
    )]
    Version {
        /// The broker's version.
        broker: u32,
    },
    /// The broker refused the connection with `Fatal`.
    #[error("zrpcd refused the connection ({}): {message}", code.as_str())]
    Fatal {
        /// The `Fatal` frame's code.
        code: ErrorCode,
        /// Its message.
        message: String,
    },
    /// The broker's answer was not a `Welcome`.
    #[error("protocol error during the handshake: {0}")]
    Protocol(String),
}

/// A connection that completed the handshake.
#[derive(Debug)]
pub struct Connected {
    /// The socket: non-blocking from [`connect`], blocking from
    /// [`connect_blocking`].
    pub sock: UnixStream,
    /// What the broker said.
    pub welcome: Welcome,
    /// Bytes read after `Welcome` (the beginning of the next frames).
    pub leftover: BytesMut,
}

/// The `Hello` frame of a peer with this `instance` id and `agent` string.
pub fn hello_frame(instance: u64, agent: &str) -> BytesMut {
    let mut out = BytesMut::with_capacity(64 + agent.len());
    encode_frame(
        &mut out,
        &Envelope::Hello {
            version: PROTOCOL_VERSION,
            instance,
            agent,
        },
        &[],
    );
    out
}

/// Interprets the first frame the broker sends.
pub fn parse_welcome(frame: &Frame) -> Result<Welcome, HandshakeError> {
    match frame.decode() {
        Ok(Envelope::Welcome {
            version,
            conn_id,
            max_message_size,
        }) => {
            if version != PROTOCOL_VERSION {
                return Err(HandshakeError::Version { broker: version });
            }
            Ok(Welcome {
                conn_id,
                max_message_size,
            })
        }
        Ok(Envelope::Fatal { code, message }) => Err(HandshakeError::Fatal {
            code,
            message: message.to_owned(),
        }),
        Ok(other) => Err(HandshakeError::Protocol(format!(
            "expected Welcome from the broker, got {:?}",
            other.kind()
        ))),
        Err(e) => Err(HandshakeError::Protocol(format!(
            "bad handshake frame: {e}"
        ))),
    }
}

/// The handshake's reading side: bytes in, `Welcome` out.
struct Reading {
    buf: BytesMut,
    dec: FrameDecoder,
}

impl Reading {
    fn new() -> Reading {
        Reading {
            buf: BytesMut::with_capacity(16 * 1024),
            dec: FrameDecoder::new(MAX_BODY),
        }
    }

    /// `Some` once the first frame is complete.
    fn welcome(&mut self) -> Option<Result<Welcome, HandshakeError>> {
        match self.dec.decode(&mut self.buf) {
            Ok(Some(frame)) => Some(parse_welcome(&frame)),
            Ok(None) => None,
            Err(e) => Some(Err(HandshakeError::Protocol(format!(
                "bad handshake frame: {e}"
            )))),
        }
    }
}

fn closed() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the broker closed the connection during the handshake",
    )
}

fn timed_out(timeout: Duration) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!("no answer to Hello within {timeout:?}"),
    )
}

/// Connects to the broker at `path`, checks who it is, says `hello` (see
/// [`hello_frame`]) and waits up to `timeout` for `Welcome`. Must run inside
/// a tokio runtime.
pub async fn connect(
    path: &Path,
    hello: &[u8],
    timeout: Duration,
) -> Result<Connected, HandshakeError> {
    let err = |source| HandshakeError::Connect {
        path: path.to_path_buf(),
        source,
    };
    let stream = tokio::net::UnixStream::connect(path).await.map_err(err)?;
    check_broker(&stream, path)?;
    let exchange = async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = stream;
        stream.write_all(hello).await.map_err(err)?;
        let mut r = Reading::new();
        loop {
            if let Some(w) = r.welcome() {
                return Ok((stream, w?, r.buf));
            }
            if stream.read_buf(&mut r.buf).await.map_err(err)? == 0 {
                return Err(err(closed()));
            }
        }
    };
    let (stream, welcome, leftover) = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| err(timed_out(timeout)))??;
    let sock = stream.into_std().map_err(err)?;
    Ok(Connected {
        sock,
        welcome,
        leftover,
    })
}

/// [`connect`] on a blocking socket, for code without a runtime.
pub fn connect_blocking(
    path: &Path,
    hello: &[u8],
    timeout: Duration,
) -> Result<Connected, HandshakeError> {
    let err = |source| HandshakeError::Connect {
        path: path.to_path_buf(),
        source,
    };
    let sock = UnixStream::connect(path).map_err(err)?;
    check_broker(&sock, path)?;
    sock.set_read_timeout(Some(timeout)).map_err(err)?;
    crate::write::write_all_blocking(&sock, &[hello]).map_err(|(_, e)| err(e))?;
    let mut r = Reading::new();
    let welcome = loop {
        if let Some(w) = r.welcome() {
            break w?;
        }
        if r.buf.capacity() == r.buf.len() {
            r.buf.reserve(16 * 1024);
        }
        match read_spare(&sock, &mut r.buf) {
            Ok(0) => return Err(err(closed())),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(err(timed_out(timeout)))
            }
            Err(e) => return Err(err(e)),
        }
    };
    sock.set_read_timeout(None).map_err(err)?;
    Ok(Connected {
        sock,
        welcome,
        leftover: r.buf,
    })
}
