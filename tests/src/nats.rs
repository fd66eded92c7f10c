//! A minimal blocking NATS client speaking the text protocol over TCP, for
//! the bridge tests that play a remote host by hand: they publish requests
//! and cancel messages with the headers of their choice (docs/bridge.md,
//! *Subject scheme*), several in one write when the order matters.
//!
//! Only what those tests need: `CONNECT` with headers, `SUB`, `HPUB`,
//! `PING`/`PONG`, and reading `MSG`/`HMSG`. Every read, write and
//! connect has a bound.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// One message received on a subscription.
#[derive(Debug, Clone)]
pub struct Message {
    /// Its subject.
    pub subject: String,
    /// Its reply subject, if any.
    pub reply: Option<String>,
    /// Its headers, in order (empty for a `MSG`).
    pub headers: Vec<(String, String)>,
    /// Its payload.
    pub payload: Vec<u8>,
}

impl Message {
    /// The first value of header `name` (case-insensitive), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// What the server sent.
enum Op {
    Ping,
    Pong,
    Err(String),
    Msg(Message),
    Other,
}

/// A connection to a NATS server.
pub struct RawNats {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Messages read while waiting for something else.
    queued: VecDeque<Message>,
    next_sid: u64,
}

impl RawNats {
    /// Connects to `url` (`nats://HOST:PORT`) and completes the handshake
    /// within `bound`.
    pub fn connect(url: &str, bound: Duration) -> io::Result<RawNats> {
        let addr = url.strip_prefix("nats://").unwrap_or(url);
        let addr = std::net::ToSocketAddrs::to_socket_addrs(addr)?
            .next()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no address"))?;
        let stream = TcpStream::connect_timeout(&addr, bound)?;
        stream.set_nodelay(true)?;
        // Writes are bounded too: a server that stops reading fails the
        // test instead of hanging it.
        stream.set_write_timeout(Some(bound))?;
        let mut nats = RawNats {
            stream,
            buf: Vec::new(),
            queued: VecDeque::new(),
            next_sid: 1,
        };
        nats.write(
            b"CONNECT {\"verbose\":false,\"pedantic\":false,\"headers\":true,\
              \"no_responders\":true,\"protocol\":1,\"name\":\"zrpc-tests\"}\r\n",
        )?;
        nats.flush(bound)?;
        Ok(nats)
    }

    /// Subscribes to `subject` (wildcards allowed) and waits until the
    /// server has it.
    pub fn subscribe(&mut self, subject: &str, bound: Duration) -> io::Result<()> {
        let sid = self.next_sid;
        self.next_sid += 1;
        self.write(format!("SUB {subject} {sid}\r\n").as_bytes())?;
        self.flush(bound)
    }

    /// The bytes of one `HPUB` (headers always, maybe none): give several
    /// to [`RawNats::send`] to have them sent in one write.
    pub fn hpub(
        subject: &str,
        reply: Option<&str>,
        headers: &[(&str, &str)],
        payload: &[u8],
    ) -> Vec<u8> {
        let mut head = String::from("NATS/1.0\r\n");
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        let reply = reply.map(|r| format!(" {r}")).unwrap_or_default();
        let mut out = format!(
            "HPUB {subject}{reply} {} {}\r\n",
            head.len(),
            head.len() + payload.len()
        )
        .into_bytes();
        out.extend_from_slice(head.as_bytes());
        out.extend_from_slice(payload);
        out.extend_from_slice(b"\r\n");
        out
    }

    /// Sends `bytes` (e.g. several [`RawNats::hpub`]) in one write and
    /// waits until the server has processed them.
    pub fn send(&mut self, bytes: &[u8], bound: Duration) -> io::Result<()> {
        self.write(bytes)?;
        self.flush(bound)
    }

    /// The next message received, waiting at most `bound`; None if none
    /// came.
    pub fn next_message(&mut self, bound: Duration) -> io::Result<Option<Message>> {
        if let Some(m) = self.queued.pop_front() {
            return Ok(Some(m));
        }
        let deadline = Instant::now() + bound;
        loop {
            if Instant::now() >= deadline {
                return Ok(None);
            }
            match self.read_op(deadline)? {
                Some(Op::Msg(m)) => return Ok(Some(m)),
                Some(_) => {}
                None => return Ok(None),
            }
        }
    }

    /// Sends `PING` and reads until its `PONG` (queueing messages read
    /// meanwhile): the server has processed everything sent before.
    fn flush(&mut self, bound: Duration) -> io::Result<()> {
        self.write(b"PING\r\n")?;
        let deadline = Instant::now() + bound;
        loop {
            // read_op returns what is buffered before looking at the
            // clock: a steady stream of messages must not outlast it.
            let op = if Instant::now() >= deadline {
                None
            } else {
                self.read_op(deadline)?
            };
            match op {
                Some(Op::Pong) => return Ok(()),
                Some(Op::Msg(m)) => self.queued.push_back(m),
                Some(_) => {}
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no PONG from the NATS server",
                    ))
                }
            }
        }
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// The next operation from the server (answering its `PING`s); None
    /// if none came before `deadline`.
    fn read_op(&mut self, deadline: Instant) -> io::Result<Option<Op>> {
        loop {
            if let Some(op) = self.parse()? {
                match op {
                    Op::Ping => self.write(b"PONG\r\n")?,
                    Op::Err(e) => return Err(io::Error::other(format!("NATS -ERR {e}"))),
                    op => return Ok(Some(op)),
                }
                continue;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.stream.set_read_timeout(Some(left))?;
            let mut chunk = [0u8; 64 * 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the NATS server closed the connection",
                    ))
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(None)
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One complete operation from the buffer, if there is one.
    fn parse(&mut self) -> io::Result<Option<Op>> {
        let Some(eol) = self.buf.windows(2).position(|w| w == b"\r\n") else {
            return Ok(None);
        };
        let line = String::from_utf8_lossy(&self.buf[..eol]).into_owned();
        let mut words = line.split_ascii_whitespace();
        let verb = words.next().unwrap_or_default().to_ascii_uppercase();
        let args: Vec<&str> = words.collect();
        let bad = || io::Error::new(io::ErrorKind::InvalidData, format!("bad line {line:?}"));
        let (hdr_len, total, reply) = match (verb.as_str(), args.len()) {
            ("MSG", 3) => (0, args[2], None),
            ("MSG", 4) => (0, args[3], Some(args[2])),
            ("HMSG", 4) => (args[2].parse().map_err(|_| bad())?, args[3], None),
            ("HMSG", 5) => (args[3].parse().map_err(|_| bad())?, args[4], Some(args[2])),
            _ => {
                self.buf.drain(..eol + 2);
                return Ok(Some(match verb.as_str() {
                    "PING" => Op::Ping,
                    "PONG" => Op::Pong,
                    "-ERR" => Op::Err(line),
                    _ => Op::Other,
                }));
            }
        };
        let total: usize = total.parse().map_err(|_| bad())?;
        if hdr_len > total {
            return Err(bad());
        }
        let start = eol + 2;
        if self.buf.len() < start + total + 2 {
            return Ok(None);
        }
        let body = &self.buf[start..start + total];
        let headers = String::from_utf8_lossy(&body[..hdr_len])
            .split("\r\n")
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect();
        let msg = Message {
            subject: args[0].to_owned(),
            reply: reply.map(str::to_owned),
            headers,
            payload: body[hdr_len..].to_vec(),
        };
        self.buf.drain(..start + total + 2);
        Ok(Some(Op::Msg(msg)))
    }
}
