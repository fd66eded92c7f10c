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
use std::time::{Duration, Instant};

use bytes::BytesMut;
use zrpc_proto::{encode_frame, Envelope, ErrorCode, Frame, FrameDecoder, PROTOCOL_VERSION};

use crate::fdpass::{read_spare_fds, FdQueue};
use crate::trust::{check_broker, UntrustedBroker};

/// Largest frame accepted during the handshake.
pub const MAX_BODY: u32 = 64 * 1024;

/// How long connecting to the broker and the handshake may take unless the
/// peer says otherwise (`ClientBuilder::connect_timeout`,
/// `Server::connect_timeout`, the `zrpc` commands' `--timeout`).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest timeout [`connect_blocking`] keeps (a longer one is cut to
/// it).
const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);

/// What the broker said in `Welcome`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Welcome {
    /// The broker's id for this connection (shown in its logs).
    pub conn_id: u64,
    /// The broker's limit on `body_len`.
    pub max_message_size: u32,
    /// The capabilities of `Hello` the broker accepted
    /// ([`zrpc_proto::caps`]).
    pub caps: u32,
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
    /// Descriptors received with those bytes (for frames that carry one).
    pub leftover_fds: FdQueue,
}

impl Welcome {
    /// Whether the broker accepted payloads in descriptors on this
    /// connection (see [`crate::fdpass`]).
    pub fn fd_payloads(&self) -> bool {
        self.caps & zrpc_proto::caps::FD_PAYLOADS != 0
    }
}

/// The `Hello` frame of a peer with this `instance` id and `agent` string,
/// offering no capabilities.
pub fn hello_frame(instance: u64, agent: &str) -> BytesMut {
    hello_frame_caps(instance, agent, 0)
}

/// The `Hello` frame of a peer with this `instance` id and `agent` string,
/// offering `caps` ([`zrpc_proto::caps`]).
pub fn hello_frame_caps(instance: u64, agent: &str, caps: u32) -> BytesMut {
    let mut out = BytesMut::with_capacity(64 + agent.len());
    encode_frame(
        &mut out,
        &Envelope::Hello {
            version: PROTOCOL_VERSION,
            instance,
            agent,
            caps,
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
            caps,
        }) => {
            if version != PROTOCOL_VERSION {
                return Err(HandshakeError::Version { broker: version });
            }
            Ok(Welcome {
                conn_id,
                max_message_size,
                caps,
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
    /// Descriptors read with the bytes (they belong to frames after
    /// `Welcome`: read with the descriptors, so that none is lost).
    fds: FdQueue,
    dec: FrameDecoder,
}

impl Reading {
    fn new() -> Reading {
        Reading {
            buf: BytesMut::with_capacity(16 * 1024),
            fds: FdQueue::new(),
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

/// What the broker's full listen backlog looks like to [`connect`] (at
/// once) and to [`connect_blocking`] (after its timeout, `TimedOut`).
fn backlog_full(kind: io::ErrorKind, waited: Option<Duration>) -> io::Error {
    let waited = waited.map_or(String::new(), |t| format!(" within {t:?}"));
    io::Error::new(
        kind,
        format!(
            "zrpcd did not accept the connection{waited}: its listen backlog is full (is it stopped, wedged or overloaded?)"
        ),
    )
}

/// Whether something listens on the UNIX socket at `path`, without
/// waiting: a connection accepted, or refused only because the listen
/// backlog is full (a listener that is stopped or wedged), counts as
/// listening; no socket, or a socket file nobody listens on (left by a dead
/// process), does not. (`UnixStream::connect` would block on a full
/// backlog until the listener accepts, without bound.)
pub fn is_listening(path: &Path) -> bool {
    let Ok((fd, addr)) = unix_socket(path, rustix::net::SocketFlags::NONBLOCK) else {
        return false;
    };
    matches!(
        rustix::net::connect(&fd, &addr),
        Ok(()) | Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INPROGRESS)
    )
}

/// An unconnected UNIX stream socket (close-on-exec, plus `flags`) and the
/// address of `path`, for [`is_listening`] and [`connect_until`].
fn unix_socket(
    path: &Path,
    flags: rustix::net::SocketFlags,
) -> io::Result<(std::os::fd::OwnedFd, rustix::net::SocketAddrUnix)> {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let addr = SocketAddrUnix::new(path)?;
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC | flags,
        None,
    )?;
    Ok((fd, addr))
}

/// Connects a blocking socket to `path`, waiting until `deadline` at most
/// for the broker to accept. A blocking `connect` to a UNIX socket whose
/// listen backlog is full (a broker stopped or wedged) waits until the
/// listener accepts, without bound; a non-blocking one fails at once with
/// `EAGAIN` and, unlike TCP, leaves no connection in progress to poll for.
/// The kernel bounds the blocking wait by the socket's send timeout
/// (`SO_SNDTIMEO`), so the socket is made, given it, then connected (what
/// `UnixStream::connect` cannot do); the timeout is cleared afterwards.
fn connect_until(path: &Path, timeout: Duration, deadline: Instant) -> io::Result<UnixStream> {
    use rustix::net::sockopt::{set_socket_timeout, Timeout};
    let (fd, addr) = unix_socket(path, rustix::net::SocketFlags::empty())?;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(backlog_full(io::ErrorKind::TimedOut, Some(timeout)));
        }
        set_socket_timeout(&fd, Timeout::Send, Some(left))?;
        match rustix::net::connect(&fd, &addr) {
            Ok(()) => break,
            // A signal while waiting: the socket is still unconnected.
            Err(rustix::io::Errno::INTR) => {}
            // The send timeout ran out with the backlog still full.
            Err(rustix::io::Errno::AGAIN) => {
                return Err(backlog_full(io::ErrorKind::TimedOut, Some(timeout)))
            }
            Err(e) => return Err(e.into()),
        }
    }
    set_socket_timeout(&fd, Timeout::Send, None)?;
    Ok(UnixStream::from(fd))
}

/// Connects to the broker at `path`, checks who it is, says `hello` (see
/// [`hello_frame`]) and waits up to `timeout` for `Welcome`. Must run inside
/// a tokio runtime. A broker whose listen backlog is full (stopped, wedged
/// or overloaded) fails the connection at once (`WouldBlock`): the
/// kernel's non-blocking connect does not wait for room.
pub async fn connect(
    path: &Path,
    hello: &[u8],
    timeout: Duration,
) -> Result<Connected, HandshakeError> {
    let err = |source| HandshakeError::Connect {
        path: path.to_path_buf(),
        source,
    };
    let stream = match tokio::net::UnixStream::connect(path).await {
        Ok(s) => s,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            return Err(err(backlog_full(io::ErrorKind::WouldBlock, None)))
        }
        Err(e) => return Err(err(e)),
    };
    check_broker(&stream, path)?;
    let exchange = async {
        use tokio::io::AsyncWriteExt;
        let mut stream = stream;
        stream.write_all(hello).await.map_err(err)?;
        let mut r = Reading::new();
        loop {
            if let Some(w) = r.welcome() {
                return Ok((stream, w?, r));
            }
            if r.buf.capacity() == r.buf.len() {
                r.buf.reserve(16 * 1024);
            }
            stream.readable().await.map_err(err)?;
            let read = stream.try_io(tokio::io::Interest::READABLE, || {
                read_spare_fds(&stream, &mut r.buf, &mut r.fds)
            });
            match read {
                Ok(0) => return Err(err(closed())),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(err(e)),
            }
        }
    };
    let (stream, welcome, r) = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| err(timed_out(timeout)))??;
    let sock = stream.into_std().map_err(err)?;
    Ok(Connected {
        sock,
        welcome,
        leftover: r.buf,
        leftover_fds: r.fds,
    })
}

/// [`connect`] on a blocking socket, for code without a runtime. `timeout`
/// bounds it all: connecting (a broker whose listen backlog is full, being
/// stopped or wedged, is waited for until then, and the error is then
/// `TimedOut`), saying `hello` and reading `Welcome`.
pub fn connect_blocking(
    path: &Path,
    hello: &[u8],
    timeout: Duration,
) -> Result<Connected, HandshakeError> {
    let err = |source| HandshakeError::Connect {
        path: path.to_path_buf(),
        source,
    };
    // A zero timeout would mean none to the socket options; a year is as
    // good as forever (and keeps the deadline representable).
    let timeout = timeout.clamp(Duration::from_millis(1), YEAR);
    let deadline = Instant::now() + timeout;
    let sock = connect_until(path, timeout, deadline).map_err(err)?;
    check_broker(&sock, path)?;
    // The time left, or the timeout's error once it ran out: the socket
    // timeouts bound one send or read each, so each is given what is left
    // (a broker answering a byte at a time, or signals restarting the
    // reads, would otherwise stretch the handshake without bound).
    let left = || {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(err(timed_out(timeout)))
        } else {
            Ok(left)
        }
    };
    sock.set_write_timeout(Some(left()?)).map_err(err)?;
    crate::write::write_all_blocking(&sock, &[hello]).map_err(|(_, e)| {
        err(if crate::read::is_timeout(&e) {
            timed_out(timeout)
        } else {
            e
        })
    })?;
    let mut r = Reading::new();
    let welcome = loop {
        if let Some(w) = r.welcome() {
            break w?;
        }
        if r.buf.capacity() == r.buf.len() {
            r.buf.reserve(16 * 1024);
        }
        sock.set_read_timeout(Some(left()?)).map_err(err)?;
        match read_spare_fds(&sock, &mut r.buf, &mut r.fds) {
            Ok(0) => return Err(err(closed())),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if crate::read::is_timeout(&e) => return Err(err(timed_out(timeout))),
            Err(e) => return Err(err(e)),
        }
    };
    sock.set_read_timeout(None).map_err(err)?;
    sock.set_write_timeout(None).map_err(err)?;
    Ok(Connected {
        sock,
        welcome,
        leftover: r.buf,
        leftover_fds: r.fds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;

    /// `zrpcd.sock` in a new directory of its own under the temp dir.
    fn fresh_socket_path(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "zrpc-io-{tag}-{}-{}",
            std::process::id(),
            crate::backoff::random_id()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir.join("zrpcd.sock")
    }

    /// A broker at a fresh socket that reads the `Hello` and answers with
    /// `answer` (raw bytes); returns the socket's path and the thread.
    fn fake(answer: Vec<u8>) -> (PathBuf, std::thread::JoinHandle<Vec<u8>>) {
        let path = fresh_socket_path("hs");
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let l = UnixListener::bind(&path).expect("bind");
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().expect("accept");
            let mut hello = vec![0u8; 256];
            let n = s.read(&mut hello).expect("read hello");
            hello.truncate(n);
            s.write_all(&answer).expect("answer");
            let _ = std::fs::remove_dir_all(&dir);
            hello
        });
        (path, t)
    }

    fn frame(env: &Envelope<'_>) -> Vec<u8> {
        let mut out = BytesMut::new();
        encode_frame(&mut out, env, &[]);
        out.to_vec()
    }

    #[test]
    fn welcome_and_the_bytes_after_it_come_back() {
        let mut answer = frame(&Envelope::Welcome {
            version: PROTOCOL_VERSION,
            conn_id: 7,
            max_message_size: 1000,
            caps: 0,
        });
        answer.extend_from_slice(b"next");
        let (path, t) = fake(answer);
        let c = connect_blocking(&path, &hello_frame(42, "t/1"), Duration::from_secs(5))
            .expect("connected");
        assert_eq!(
            c.welcome,
            Welcome {
                conn_id: 7,
                max_message_size: 1000,
                caps: 0,
            }
        );
        assert_eq!(
            c.welcome.incoming_limit(),
            1000 + zrpc_proto::INCOMING_SLACK
        );
        assert_eq!(&c.leftover[..], b"next");
        let hello = t.join().expect("fake");
        let mut buf = BytesMut::from(&hello[..]);
        let f = FrameDecoder::new(MAX_BODY)
            .decode(&mut buf)
            .expect("frame")
            .expect("whole");
        match f.decode().expect("envelope") {
            Envelope::Hello {
                version,
                instance,
                agent,
                ..
            } => assert_eq!((version, instance, agent), (PROTOCOL_VERSION, 42, "t/1")),
            other => panic!("expected Hello, got {other:?}"),
        }
    }

    #[test]
    fn refusals_and_surprises_are_typed_errors() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                frame(&Envelope::Fatal {
                    code: ErrorCode::LimitExceeded,
                    message: "too many connections",
                }),
                "fatal",
            ),
            (
                frame(&Envelope::Welcome {
                    version: PROTOCOL_VERSION + 1,
                    conn_id: 1,
                    max_message_size: 1000,
                    caps: 0,
                }),
                "version",
            ),
            (frame(&Envelope::Ping { nonce: 1 }), "protocol"),
            (Vec::new(), "eof"),
        ];
        for (answer, want) in cases {
            let (path, t) = fake(answer);
            let e = connect_blocking(&path, &hello_frame(1, "t"), Duration::from_secs(5))
                .expect_err(want);
            match (&e, want) {
                (HandshakeError::Fatal { code, message }, "fatal") => {
                    assert_eq!(*code, ErrorCode::LimitExceeded);
                    assert_eq!(message, "too many connections");
                }
                (HandshakeError::Version { broker }, "version") => {
                    assert_eq!(*broker, PROTOCOL_VERSION + 1)
                }
                (HandshakeError::Protocol(m), "protocol") => assert!(m.contains("Welcome"), "{m}"),
                (HandshakeError::Connect { source, .. }, "eof") => {
                    assert_eq!(source.kind(), io::ErrorKind::UnexpectedEof)
                }
                _ => panic!("{want}: unexpected {e:?}"),
            }
            t.join().expect("fake");
        }
    }

    #[test]
    fn no_broker_is_a_connect_error_naming_the_socket() {
        let path = std::env::temp_dir().join(format!(
            "zrpc-io-none-{}/zrpcd.sock",
            crate::backoff::random_id()
        ));
        match connect_blocking(&path, &hello_frame(1, "t"), Duration::from_secs(1)) {
            Err(HandshakeError::Connect { path: p, source }) => {
                assert_eq!(p, path);
                assert_eq!(source.kind(), io::ErrorKind::NotFound);
                assert!(crate::connect_hint(&source).contains("is zrpcd running"));
            }
            other => panic!("expected a connect error, got {other:?}"),
        }
    }

    /// A listener at a fresh socket with the smallest backlog (one
    /// connection waits to be accepted), and that connection (the backlog
    /// is then full).
    fn full_backlog() -> (PathBuf, UnixListener, std::os::fd::OwnedFd) {
        use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
        let path = fresh_socket_path("full");
        let addr = SocketAddrUnix::new(&path).expect("address");
        let socket = |flags| {
            rustix::net::socket_with(AddressFamily::UNIX, SocketType::STREAM, flags, None)
                .expect("socket")
        };
        let l = socket(SocketFlags::CLOEXEC);
        rustix::net::bind(&l, &addr).expect("bind");
        rustix::net::listen(&l, 0).expect("listen");
        let queued = socket(SocketFlags::NONBLOCK | SocketFlags::CLOEXEC);
        rustix::net::connect(&queued, &addr).expect("the one connection the backlog holds");
        let refused = socket(SocketFlags::NONBLOCK | SocketFlags::CLOEXEC);
        assert_eq!(
            rustix::net::connect(&refused, &addr),
            Err(rustix::io::Errno::AGAIN),
            "the backlog is full"
        );
        (path, UnixListener::from(l), queued)
    }

    #[test]
    fn is_listening_tells_a_live_listener_even_with_a_full_backlog_from_a_stale_file() {
        let (path, l, queued) = full_backlog();
        let (tx, rx) = std::sync::mpsc::channel();
        let p = path.clone();
        std::thread::spawn(move || {
            let _ = tx.send(is_listening(&p));
        });
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(10)),
            Ok(true),
            "a listener with a full backlog (within 10 s)"
        );
        drop((l, queued));
        // The socket file stays; nobody listens on it.
        assert!(path.exists());
        assert!(!is_listening(&path));
        assert!(!is_listening(&path.with_extension("absent")));
    }

    #[test]
    fn a_full_backlog_bounds_the_connect_and_room_in_it_ends_the_wait() {
        // Nobody accepts: the blocking connect gives up at its timeout,
        // the async one at once.
        let (path, l, _queued) = full_backlog();
        let (tx, rx) = std::sync::mpsc::channel();
        let p = path.clone();
        std::thread::spawn(move || {
            let start = std::time::Instant::now();
            let r = connect_blocking(&p, &hello_frame(1, "t"), Duration::from_millis(200));
            let _ = tx.send((r.map(|_| ()), start.elapsed()));
        });
        let (r, took) = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("connect_blocking returned (within 10 s)");
        match r.expect_err("nobody accepts") {
            HandshakeError::Connect { source, .. } => {
                assert_eq!(source.kind(), io::ErrorKind::TimedOut, "{source}");
                assert!(
                    source.to_string().contains("listen backlog is full"),
                    "{source}"
                );
            }
            other => panic!("expected a connect error, got {other:?}"),
        }
        assert!(took >= Duration::from_millis(190), "{took:?}");
        assert!(took < Duration::from_secs(5), "{took:?}");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        match rt.block_on(connect(&path, &hello_frame(1, "a"), Duration::from_secs(5))) {
            Err(HandshakeError::Connect { source, .. }) => {
                assert_eq!(source.kind(), io::ErrorKind::WouldBlock, "{source}");
                assert!(
                    source.to_string().contains("listen backlog is full"),
                    "{source}"
                );
            }
            other => panic!("expected a connect error, got {other:?}"),
        }

        // The listener accepts (while the blocking connect waits, or
        // before): it gets in, and the handshake completes within the same
        // timeout.
        let answer = frame(&Envelope::Welcome {
            version: PROTOCOL_VERSION,
            conn_id: 9,
            max_message_size: 1000,
            caps: 0,
        });
        let broker = std::thread::spawn(move || {
            // The queued connection first, then the waiting one.
            let _first = l.accept().expect("accept the queued connection");
            let (mut s, _) = l.accept().expect("accept the waiting one");
            let mut hello = vec![0u8; 256];
            let n = s.read(&mut hello).expect("read hello");
            assert!(n > 0, "a Hello");
            s.write_all(&answer).expect("answer");
            s
        });
        let c = connect_blocking(&path, &hello_frame(2, "t"), Duration::from_secs(10))
            .expect("connected once the broker accepted");
        assert_eq!(c.welcome.conn_id, 9);
        let _s = broker.join().expect("broker");
        // Blocking, and without the timeouts of the handshake.
        assert_eq!(c.sock.read_timeout().expect("read timeout"), None);
        assert_eq!(c.sock.write_timeout().expect("write timeout"), None);
        if let Some(dir) = path.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }

    /// A broker that answers `Hello` a byte at a time, each byte well
    /// within the timeout but the whole `Welcome` far past it: the
    /// timeout bounds the handshake, not each read.
    #[test]
    fn a_welcome_trickling_in_does_not_outlast_the_timeout() {
        let path = fresh_socket_path("trickle");
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let l = UnixListener::bind(&path).expect("bind");
        let answer = frame(&Envelope::Welcome {
            version: PROTOCOL_VERSION,
            conn_id: 4,
            max_message_size: 1000,
            caps: 0,
        });
        let whole = Duration::from_millis(150) * u32::try_from(answer.len()).expect("small");
        assert!(whole >= Duration::from_secs(2), "{whole:?}");
        let broker = std::thread::spawn(move || {
            let (mut s, _) = l.accept().expect("accept");
            let mut hello = vec![0u8; 256];
            let _ = s.read(&mut hello).expect("read hello");
            // The pace of the broker's answer, not a synchronisation: it
            // stops when the client gives up (EPIPE).
            for b in answer {
                if s.write_all(&[b]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(150));
            }
        });
        let timeout = Duration::from_millis(400);
        let start = Instant::now();
        let r = connect_blocking(&path, &hello_frame(1, "t"), timeout);
        let took = start.elapsed();
        match r {
            Err(HandshakeError::Connect { source, .. })
                if source.kind() == io::ErrorKind::TimedOut => {}
            other => panic!(
                "expected a TimedOut connect error after {timeout:?}, got {:?} after {took:?}",
                other.map(|c| c.welcome)
            ),
        }
        assert!(took < Duration::from_millis(1500), "gave up after {took:?}");
        broker.join().expect("broker");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_async_handshake_agrees() {
        let (path, t) = fake(frame(&Envelope::Welcome {
            version: PROTOCOL_VERSION,
            conn_id: 3,
            max_message_size: 2000,
            caps: 0,
        }));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let c = rt
            .block_on(connect(&path, &hello_frame(5, "a"), Duration::from_secs(5)))
            .expect("connected");
        assert_eq!(c.welcome.conn_id, 3);
        t.join().expect("fake");
        // The async connect hands back a non-blocking socket (ready for the
        // reactor).
        use std::os::fd::AsRawFd;
        // SAFETY: F_GETFL only reads the flags of a descriptor we own.
        let flags = unsafe { libc::fcntl(c.sock.as_raw_fd(), libc::F_GETFL) };
        assert!(flags >= 0 && flags & libc::O_NONBLOCK != 0, "{flags:#x}");
    }
}
