//! zrpcd under systemd: unit files verify, sd_notify (READY, WATCHDOG,
//! STOPPING, STATUS) against a real datagram socket, and socket activation
//! with the real `systemd-socket-activate` and with a listener held across a
//! broker restart.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use zrpc_tests::raw::Raw;
use zrpc_tests::{bin, wait_until, Proc, TempDir, WAIT};

fn which(tool: &str) -> std::path::PathBuf {
    for dir in ["/usr/bin", "/bin", "/usr/local/bin", "/usr/sbin"] {
        let p = Path::new(dir).join(tool);
        if p.exists() {
            return p;
        }
    }
    panic!("{tool} is not installed (Debian package: systemd); .ci/run installs it");
}

#[test]
fn unit_files_verify() {
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd");
    let tmp = TempDir::new();
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&units).expect("systemd/ dir") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            continue; // the example policy (security.rs loads it)
        }
        let name = path
            .file_name()
            .expect("name")
            .to_string_lossy()
            .to_string();
        let text = std::fs::read_to_string(&path).expect("read unit");
        // Point ExecStart at the binaries just built.
        let text = text
            .replace("/usr/bin/zrpcd", &bin("zrpcd").to_string_lossy())
            .replace(
                "/usr/local/lib/zrpc/examples/test_server",
                &bin("test_server").to_string_lossy(),
            );
        std::fs::write(tmp.path().join(&name), text).expect("write unit");
        names.push(name);
    }
    assert!(names.len() >= 3, "{names:?}");
    let out = Command::new(which("systemd-analyze"))
        .arg("verify")
        .arg("--man=no")
        .args(&names)
        .current_dir(tmp.path())
        .output()
        .expect("run systemd-analyze");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{stderr}"
    );
    assert!(
        stderr.trim().is_empty(),
        "systemd-analyze warnings:\n{stderr}"
    );
    // The services' sandboxing, as systemd rates it (0 safe .. 10 unsafe):
    // 1.3 and 0.9 with the system-call filter, /proc and /tmp options of
    // red-team pass 6 (3.0 and 2.8 before).
    for unit in names.iter().filter(|n| n.ends_with(".service")) {
        let out = Command::new(which("systemd-analyze"))
            .args(["security", "--offline=true", "--no-pager", "--threshold=15"])
            .arg(unit)
            .current_dir(tmp.path())
            .output()
            .expect("run systemd-analyze security");
        assert!(
            out.status.success(),
            "{unit}: exposure above 1.5:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

/// A datagram socket playing systemd's notify socket.
struct NotifySocket {
    sock: UnixDatagram,
    path: std::path::PathBuf,
}

impl NotifySocket {
    fn bind(dir: &Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).expect("bind notify socket");
        sock.set_read_timeout(Some(WAIT)).expect("timeout");
        NotifySocket { sock, path }
    }

    /// Receives messages until one contains `needle`; returns it.
    fn wait_for(&self, needle: &str) -> String {
        let start = Instant::now();
        let mut buf = [0u8; 4096];
        while start.elapsed() < WAIT {
            let n = self
                .sock
                .recv(&mut buf)
                .expect("notify message within the bound");
            let msg = String::from_utf8_lossy(&buf[..n]).to_string();
            if msg.lines().any(|l| l == needle || l.starts_with(needle)) {
                return msg;
            }
        }
        panic!("no {needle} received");
    }
}

#[test]
fn sd_notify_ready_watchdog_status_stopping() {
    let dir = TempDir::new();
    let notify = NotifySocket::bind(dir.path());
    let sockdir = dir.path().join("s");
    let mut cmd = Command::new(bin("zrpcd"));
    cmd.arg("--socket-dir")
        .arg(&sockdir)
        .env("NOTIFY_SOCKET", &notify.path)
        .env("WATCHDOG_USEC", "200000")
        .env("RUST_LOG", "warn");
    let mut broker = Proc::spawn("zrpcd", cmd);

    let ready = notify.wait_for("READY=1");
    // READY only once the socket accepts connections.
    let mut raw = Raw::hello(&sockdir);
    assert!(ready.contains("STATUS="), "{ready}");
    assert_eq!(raw.call(1, "zrpcd", "ping", None).0, None);

    // WATCHDOG=1 at half of WATCHDOG_USEC (100 ms): count pings over a
    // window. Bounds are loose: this is a shared machine.
    let start = Instant::now();
    let mut pings = 0;
    while pings < 6 {
        notify.wait_for("WATCHDOG=1");
        pings += 1;
    }
    let per_ping = start.elapsed() / pings;
    assert!(
        per_ping >= Duration::from_millis(40),
        "pinging too fast: {per_ping:?}"
    );
    assert!(
        per_ping <= Duration::from_millis(1500),
        "pinging too slowly: {per_ping:?}"
    );

    // STATUS= is refreshed with a live summary.
    let status = notify.wait_for("STATUS=");
    assert!(status.contains("connections"), "{status}");

    broker.signal(libc::SIGTERM);
    notify.wait_for("STOPPING=1");
    let st = broker.wait_exit(WAIT).expect("zrpcd exits on SIGTERM");
    assert!(st.success(), "{st:?}");
}

#[test]
fn without_systemd_nothing_changes() {
    // No NOTIFY_SOCKET and no LISTEN_FDS: the broker binds its own socket.
    let dir = TempDir::new();
    let mut cmd = Command::new(bin("zrpcd"));
    cmd.arg("--socket-dir")
        .arg(dir.path())
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID");
    let _broker = Proc::spawn("zrpcd", cmd);
    let sock = dir.path().join("zrpcd.sock");
    assert!(wait_until(WAIT, || UnixStream::connect(&sock).is_ok()));
    let mut raw = Raw::hello(dir.path());
    assert_eq!(raw.call(1, "zrpcd", "ping", None).0, None);
}

#[test]
fn socket_activation_with_systemd_socket_activate() {
    let dir = TempDir::new();
    let sock = dir.path().join("zrpcd.sock");
    let mut cmd = Command::new(which("systemd-socket-activate"));
    cmd.arg("-l")
        .arg(&sock)
        .arg(bin("zrpcd"))
        .arg("--socket-dir")
        .arg(dir.path())
        .env("RUST_LOG", "warn");
    let mut activator = Proc::spawn("systemd-socket-activate", cmd);
    assert!(
        wait_until(WAIT, || sock.exists()),
        "systemd-socket-activate did not create the socket"
    );
    // The first connection starts zrpcd, which adopts the passed socket and
    // serves this very connection.
    let mut raw = Raw::hello(dir.path());
    let (code, _, payload) = raw.call(1, "zrpcd", "ping", None);
    assert_eq!(code, None);
    assert_eq!(&payload[..], b"\xa4pong");
    // The adopted socket file belongs to the activator: zrpcd leaves it.
    activator.signal(libc::SIGTERM);
    let st = activator.wait_exit(WAIT).expect("exits");
    assert!(st.success(), "{st:?}");
}

/// Starts zrpcd with `listener` passed as fd 3 per the sd_listen_fds
/// protocol (what systemd does for zrpcd.socket).
fn spawn_activated(listener: &UnixListener, dir: &Path) -> Proc {
    spawn_with_fds(&[listener.as_raw_fd()], "LISTEN_PID=$$ LISTEN_FDS=1", dir)
}

/// Starts zrpcd with `fds` passed as fds 3, 4, ... and the shell variable
/// assignments `env` (in which `$$` is zrpcd's own pid: the shell `exec`s
/// it). zrpcd's stderr goes to its stdout, for [`Proc::output`].
fn spawn_with_fds(fds: &[RawFd], env: &str, dir: &Path) -> Proc {
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(format!("{env} exec \"$0\" \"$@\" 2>&1"))
        .arg(bin("zrpcd"))
        .arg("--socket-dir")
        .arg(dir)
        .env("RUST_LOG", "info");
    let fds = fds.to_vec();
    // SAFETY: fcntl and dup2 are async-signal-safe; no allocation.
    unsafe {
        cmd.pre_exec(move || {
            // First out of the way (a source may be one of 3, 4, ...), then
            // into place without FD_CLOEXEC.
            let mut high = [0; 8];
            for (i, &fd) in fds.iter().enumerate() {
                high[i] = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 100);
                if high[i] < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for (i, &h) in high.iter().take(fds.len()).enumerate() {
                if libc::dup2(h, 3 + i as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    Proc::spawn("zrpcd", cmd)
}

#[test]
fn activation_refuses_a_socket_that_is_not_af_unix() {
    let dir = TempDir::new();
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("bind tcp");
    let broker = spawn_with_fds(&[tcp.as_raw_fd()], "LISTEN_PID=$$ LISTEN_FDS=1", dir.path());
    let (status, out) = broker.output(WAIT);
    let status = status.expect("zrpcd exits");
    assert!(!status.success(), "a TCP socket must be refused: {out}");
    assert!(
        out.contains("systemd socket activation") && out.contains("AF_UNIX"),
        "the error says what is wrong: {out}"
    );
    assert!(
        !dir.path().join("zrpcd.sock").exists(),
        "no socket of its own either"
    );
}

#[test]
fn activation_variables_for_another_pid_are_ignored() {
    let dir = TempDir::new();
    // A held socket elsewhere, passed with a LISTEN_PID that is not
    // zrpcd's (inherited from a parent): zrpcd must bind its own.
    let other = TempDir::new();
    let held = UnixListener::bind(other.path().join("held.sock")).expect("bind");
    let _broker = spawn_with_fds(&[held.as_raw_fd()], "LISTEN_PID=1 LISTEN_FDS=1", dir.path());
    let sock = dir.path().join("zrpcd.sock");
    assert!(
        wait_until(WAIT, || UnixStream::connect(&sock).is_ok()),
        "zrpcd bound its own socket"
    );
    let mut raw = Raw::hello(dir.path());
    assert_eq!(raw.call(1, "zrpcd", "ping", None).0, None);
}

#[test]
fn activation_with_several_sockets_takes_the_named_one() {
    let dir = TempDir::new();
    let other = TempDir::new();
    let decoy = UnixListener::bind(other.path().join("decoy.sock")).expect("bind");
    let sock = dir.path().join("zrpcd.sock");
    let ours = UnixListener::bind(&sock).expect("bind");
    let broker = spawn_with_fds(
        &[decoy.as_raw_fd(), ours.as_raw_fd()],
        "LISTEN_PID=$$ LISTEN_FDS=2 LISTEN_FDNAMES=metrics:zrpcd.socket",
        dir.path(),
    );
    let mut raw = Raw::hello(dir.path());
    assert_eq!(raw.call(1, "zrpcd", "ping", None).0, None);
    drop(raw);
    broker.signal(libc::SIGTERM);
    let (status, _) = broker.output(WAIT);
    assert!(status.expect("exits").success());

    // Unnamed, the choice is ambiguous: refused with the names listed.
    let broker = spawn_with_fds(
        &[decoy.as_raw_fd(), ours.as_raw_fd()],
        "LISTEN_PID=$$ LISTEN_FDS=2 LISTEN_FDNAMES=a:b",
        dir.path(),
    );
    let (status, out) = broker.output(WAIT);
    assert!(!status.expect("exits").success(), "{out}");
    assert!(out.contains("none is named zrpcd.socket"), "{out}");
}

#[test]
fn restart_under_a_held_socket_loses_no_connection_attempt() {
    let dir = TempDir::new();
    let sock = dir.path().join("zrpcd.sock");
    let listener = UnixListener::bind(&sock).expect("bind");
    let mut broker = spawn_activated(&listener, dir.path());
    let mut raw = Raw::hello(dir.path());
    assert_eq!(raw.call(1, "zrpcd", "ping", None).0, None);
    drop(raw);

    broker.signal(libc::SIGTERM);
    assert!(broker.wait_exit(WAIT).expect("exit").success());
    assert!(sock.exists(), "an adopted socket is not removed");

    // While no broker runs, connection attempts wait in the backlog.
    let (tx, rx) = std::sync::mpsc::channel();
    let clients: Vec<_> = (0..8)
        .map(|i| {
            let dir = dir.path().to_path_buf();
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut raw = Raw::connect(&dir);
                let _ = tx.send(());
                raw.handshake();
                raw.call(i, "zrpcd", "ping", None).0
            })
        })
        .collect();
    for _ in 0..8 {
        rx.recv_timeout(WAIT)
            .expect("client connected to the held socket");
    }
    let _broker = spawn_activated(&listener, dir.path());
    for c in clients {
        assert_eq!(
            c.join().expect("client thread"),
            None,
            "every attempt served"
        );
    }
}

#[test]
fn service_library_sends_ready_once_registered() {
    let b = zrpc_tests::Broker::start();
    let notify = NotifySocket::bind(b.dir());
    let mut cmd = b.command("zrpc-test-svc");
    cmd.env("NOTIFY_SOCKET", &notify.path);
    let _svc = Proc::spawn("zrpc-test-svc", cmd);
    notify.wait_for("READY=1");
    // READY=1 came after the registration: the name is listed right now.
    let c = zrpc_client::BlockingClient::connect_to(b.dir()).expect("connect");
    let list: rmpv::Value = c
        .call("zrpcd", "list", &(), Some(Duration::from_secs(5)))
        .expect("list");
    assert!(list.to_string().contains("\"echo\""), "{list}");
}
