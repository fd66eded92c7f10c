//! Descriptors whose close(2) never returns, against the real `zrpcd`: a
//! file on a FUSE mount whose daemon never answers the `FLUSH` that
//! closing it sends (a hostile user's daemon, here [`StuckFs`] in the
//! test process). The broker closes descriptors that are not payloads off
//! its event loop (zrpcd/src/closer.rs); these tests show that such closes
//! cannot make it hold descriptors without bound, nor delay another user's.
//! Not as root, or without `/dev/fuse`, each test says it was skipped and
//! why.

use std::os::unix::process::CommandExt;

use zrpc_io::fdpass::MAX_FDS_PER_MSG;
use zrpc_tests::fuse::StuckFs;
use zrpc_tests::{is_root, skipped, wait_registered, wait_until, Broker, Proc, WAIT};

/// The hostile user, and another one.
const HOSTILE: u32 = 65534;
const VICTIM: u32 = 65533;

/// `zrpc-test-peer ARGS` as uid `uid` (gid the same), against `b`.
fn as_uid(b: &Broker, uid: u32, args: &[&str]) -> Proc {
    let mut c = b.command("zrpc-test-peer");
    c.args(args).uid(uid).gid(uid);
    Proc::spawn("zrpc-test-peer", c)
}

/// Runs `zrpc-test-peer ARGS` as `uid` to completion: its output lines.
fn run_as(b: &Broker, uid: u32, args: &[&str]) -> Vec<String> {
    let (status, out) = as_uid(b, uid, args).output(WAIT);
    assert!(status.is_some(), "zrpc-test-peer {args:?} did not finish");
    out.lines().map(str::to_string).collect()
}

/// A broker started with `--max-fds max_fds`, and a FUSE file system
/// whose file that broker can never close (its `FLUSH`es get no answer).
/// `None`, after a loud SKIPPED, when not root or without FUSE.
struct StuckBroker {
    // Dropped in this order: the mount's end ends the broker's blocked
    // close, and only then can the broker be killed and reaped.
    fs: StuckFs,
    b: Broker,
}

impl StuckBroker {
    fn start(test: &str, max_fds: &str) -> Option<StuckBroker> {
        if !is_root(
            test,
            "needs root to mount a FUSE file system and switch uids",
        ) {
            return None;
        }
        let b = Broker::start_with(&["--max-fds", max_fds]);
        let fs = match StuckFs::mount() {
            Ok(fs) => fs,
            Err(e) => {
                skipped(test, &e.0);
                return None;
            }
        };
        fs.block_flushes_of(b.proc.pid() as u32);
        Some(StuckBroker { fs, b })
    }

    /// The broker's open descriptors.
    fn open(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.b.proc.pid())).map_or(0, |d| d.count())
    }

    /// The path of the file whose close blocks.
    fn stuck(&self) -> String {
        self.fs.file().display().to_string()
    }

    /// `uid` hands the broker the file whose close blocks; returns once
    /// the broker is stuck closing it, the `n`th such close in all.
    fn stick(&self, uid: u32, n: usize) {
        let said = run_as(&self.b, uid, &["junk-fd", "--path", &self.stuck()]);
        assert_eq!(said.len(), 1, "uid {uid}: {said:?}");
        assert!(
            wait_until(WAIT, || self.fs.blocked_closes() == n),
            "the broker never closed uid {uid}'s FUSE file ({said:?})"
        );
    }
}

/// One user's descriptors whose close blocks (one stuck FUSE close, then
/// junk descriptors over many connections, with and without payload
/// descriptors negotiated) count against that user's `fds` quota while
/// they wait for their close: past it, the user's connections are refused
/// (`LimitExceeded`), so the broker's open descriptors stay bounded. A
/// descriptor left unread in a refused connection's socket is dropped by
/// the kernel without a `FLUSH`. Another user's junk is closed at once
/// (not behind the stuck close), and its calls are served. Before, one
/// closing thread served everyone: after the stuck close, every later
/// junk descriptor stayed open in the broker, counted nowhere (about one
/// more open descriptor per junk descriptor, up to `RLIMIT_NOFILE`).
#[test]
fn descriptors_whose_close_blocks_are_bounded_per_user() {
    const TEST: &str = "descriptors_whose_close_blocks_are_bounded_per_user";
    // --max-fds 256: a user's fds quota is 64.
    let Some(sb) = StuckBroker::start(TEST, "256") else {
        return;
    };
    let (b, fs) = (&sb.b, &sb.fs);
    let open = || sb.open();
    let stuck = sb.stuck();
    let null = "/dev/null";

    // The hostile user's stuck close.
    sb.stick(HOSTILE, 1);
    let baseline = open();

    // Then junk descriptors: 100 on one connection that did not negotiate
    // payload descriptors (closed unread, the connection stays), then one
    // each on 200 connections that did (each gets `Fatal{Protocol}`); the
    // open count after each batch.
    let quota = 64;
    let bound = baseline + quota + MAX_FDS_PER_MSG;
    let mut trend = vec![baseline];
    let plain = run_as(
        b,
        HOSTILE,
        &["junk-fd", "--path", null, "--plain", "--per-conn", "100"],
    );
    trend.push(open());
    let mut lines = Vec::new();
    for _ in 0..4 {
        lines.extend(run_as(
            b,
            HOSTILE,
            &["junk-fd", "--path", null, "--count", "50"],
        ));
        trend.push(open());
    }
    eprintln!("{TEST}: the broker's open descriptors, from the stuck close on: {trend:?}");
    assert!(
        wait_until(WAIT, || open() <= bound),
        "the broker holds {} descriptors, more than {bound} (trend {trend:?}): one user's junk \
         descriptors, waiting behind a close that blocks, are not bounded",
        open()
    );
    assert!(
        plain
            .last()
            .is_some_and(|l| l.starts_with("fatal limit_exceeded")),
        "a connection without payload descriptors kept sending junk: {plain:?}"
    );
    assert!(
        lines
            .iter()
            .all(|l| !l.starts_with("fatal limit_exceeded") || l.contains("uid 65534"))
            && lines
                .last()
                .is_some_and(|l| l.starts_with("fatal limit_exceeded")),
        "the user is not refused: {lines:?}"
    );

    // Refused at accept with the FUSE file unread in its socket: the
    // kernel drops it without a FLUSH (a close on the event loop would wait
    // for it, and the calls below would never be answered).
    let said = run_as(b, HOSTILE, &["junk-fd", "--path", &stuck]);
    eprintln!("{TEST}: the FUSE file on a refused connection: {said:?}");
    assert!(
        said.last()
            .is_some_and(|l| l.starts_with("fatal limit_exceeded")),
        "{said:?}"
    );

    // Another user: its junk is closed (not queued behind the stuck
    // close), and it is served.
    let _svc = b.spawn("zrpc-test-svc", &[]);
    wait_registered(b.dir(), "echo", 1);
    let before = open();
    let said = run_as(b, VICTIM, &["junk-fd", "--path", null, "--count", "20"]);
    assert!(
        said.iter().all(|l| !l.contains("limit_exceeded")),
        "{said:?}"
    );
    assert!(
        wait_until(WAIT, || open() <= before),
        "another user's junk descriptors wait behind the stuck close: {} open, {before} before",
        open()
    );
    let said = run_as(
        b,
        VICTIM,
        &["call", "--service", "echo", "--method", "echo"],
    );
    assert_eq!(said, ["result ok c0"], "another user is not served");
    assert_eq!(
        fs.blocked_closes(),
        1,
        "the broker closed a FUSE file more than once"
    );
}

/// What the broker's refusals rely on: a file in flight (`SCM_RIGHTS`) in
/// a socket closed unread is dropped by the kernel without a `FLUSH` (its
/// last reference goes through fput, not close(2)), so closing such a
/// socket does not wait for a FUSE daemon. The sockets are closed on a
/// thread of its own, waited for with a bound.
#[test]
fn a_file_left_unread_in_a_closed_socket_is_dropped_without_a_flush() {
    const TEST: &str = "a_file_left_unread_in_a_closed_socket_is_dropped_without_a_flush";
    use std::os::fd::AsRawFd;
    if !is_root(TEST, "needs root to mount a FUSE file system") {
        return;
    }
    let fs = match StuckFs::mount() {
        Ok(fs) => fs,
        Err(e) => return skipped(TEST, &e.0),
    };
    let (a, b) = std::os::unix::net::UnixStream::pair().expect("pair");
    {
        // Our own copy is closed (and flushed) before flushes block.
        let file = std::fs::File::open(fs.file()).expect("open the FUSE file");
        let n = zrpc_io::fdpass::send_with_fds(a.as_raw_fd(), &[b"x"], &[file.as_raw_fd()])
            .expect("sendmsg");
        assert_eq!(n, 1);
    }
    fs.block_flushes_of(std::process::id());
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let closer = {
        let done = done.clone();
        std::thread::spawn(move || {
            drop(b);
            drop(a);
            done.store(true, std::sync::atomic::Ordering::SeqCst);
        })
    };
    let closed = wait_until(WAIT, || done.load(std::sync::atomic::Ordering::SeqCst));
    assert_eq!(fs.blocked_closes(), 0, "closing the socket sent a FLUSH");
    assert!(
        closed,
        "closing a socket with a FUSE file unread in it blocked"
    );
    // (If it blocked, unmounting the file system ends the wait.)
    drop(fs);
    closer.join().expect("closer thread");
}

/// The quota is checked when descriptors are read, not only after: a
/// user's connections admitted while it was under its quota cannot each
/// bring one more message of descriptors once it is full. The hostile
/// user, with its stuck close, greets 16 connections first (all admitted:
/// one descriptor waits), then sends 32 junk descriptors on each in one
/// message. The broker may take the message that fills the quota (one
/// message's worth past it, as elsewhere), and no more: before, each
/// connection's message was read (its descriptors queued behind the stuck
/// close) before the connection was refused, 1 + 16 x 32 descriptors in
/// all, whatever the quota of 64.
#[test]
fn connections_admitted_under_the_quota_cannot_each_add_a_message_past_it() {
    const TEST: &str = "connections_admitted_under_the_quota_cannot_each_add_a_message_past_it";
    // --max-fds 256: a user's fds quota is 64.
    let Some(sb) = StuckBroker::start(TEST, "256") else {
        return;
    };
    let (b, fs) = (&sb.b, &sb.fs);
    let open = || sb.open();

    sb.stick(HOSTILE, 1);
    let baseline = open();
    let quota = 64;
    let bound = baseline + quota + MAX_FDS_PER_MSG;
    let per_conn = MAX_FDS_PER_MSG.to_string();
    let lines = run_as(
        b,
        HOSTILE,
        &[
            "junk-together",
            "--path",
            "/dev/null",
            "--count",
            "16",
            "--per-conn",
            &per_conn,
        ],
    );
    eprintln!("{TEST}: {lines:?}");
    // The peer is gone: its connections' sockets are closed by now or soon.
    assert!(
        wait_until(WAIT, || open() <= bound),
        "the broker holds {} descriptors, more than {bound} (baseline {baseline}): \
         connections admitted before the quota filled each added a message of \
         descriptors past it",
        open()
    );
    assert!(
        lines
            .iter()
            .filter(|l| l.starts_with("fatal limit_exceeded"))
            .count()
            >= 14,
        "the user is not refused: {lines:?}"
    );
    assert_eq!(
        fs.blocked_closes(),
        1,
        "the broker closed a FUSE file more than once"
    );
}

/// A pids cgroup holding one process, whose task limit the test sets (v1
/// hierarchy at /sys/fs/cgroup/pids, or v2 with the pids controller).
/// On drop: the limit lifted, the process moved back, the cgroup removed.
struct PidsCgroup {
    dir: std::path::PathBuf,
    parent: std::path::PathBuf,
    pid: i32,
}

impl PidsCgroup {
    /// Moves `pid` into a new pids cgroup, or says why it cannot.
    fn new(pid: i32) -> Result<PidsCgroup, String> {
        let v1 = std::path::Path::new("/sys/fs/cgroup/pids");
        let v2 = std::path::Path::new("/sys/fs/cgroup");
        let parent = if v1.join("cgroup.procs").exists() {
            v1.to_path_buf()
        } else if std::fs::read_to_string(v2.join("cgroup.subtree_control"))
            .is_ok_and(|c| c.split_whitespace().any(|c| c == "pids"))
        {
            v2.to_path_buf()
        } else {
            return Err("no pids cgroup controller to limit zrpcd's threads".into());
        };
        let dir = parent.join(format!("zrpc-test-{}-{pid}", std::process::id()));
        std::fs::create_dir(&dir).map_err(|e| format!("cannot make {}: {e}", dir.display()))?;
        let cg = PidsCgroup { dir, parent, pid };
        std::fs::write(cg.dir.join("cgroup.procs"), pid.to_string())
            .map_err(|e| format!("cannot move zrpcd into {}: {e}", cg.dir.display()))?;
        Ok(cg)
    }

    /// No new task (thread) may start in the cgroup.
    fn freeze_tasks(&self) {
        let current = std::fs::read_to_string(self.dir.join("pids.current")).expect("pids.current");
        std::fs::write(self.dir.join("pids.max"), current.trim()).expect("pids.max");
    }

    /// Tasks may start again.
    fn lift(&self) {
        let _ = std::fs::write(self.dir.join("pids.max"), "max");
    }
}

impl Drop for PidsCgroup {
    fn drop(&mut self) {
        self.lift();
        let _ = std::fs::write(self.parent.join("cgroup.procs"), self.pid.to_string());
        // Empty once the process moved out (or exited): bounded retries.
        wait_until(WAIT, || std::fs::remove_dir(&self.dir).is_ok());
    }
}

/// A closing thread that could not be started (no task left to zrpcd: a
/// pids limit, threads-max, memory) is started later by itself, not only
/// when the same user sends another descriptor: the descriptors it would
/// have closed are closed once threads can start again, and their count in
/// the user's quota and in --max-fds is released. Before, they stayed open
/// and counted until that user sent zrpcd another descriptor that is not a
/// memfd (never, for a user refused at its quota: refused for good).
#[test]
fn descriptors_whose_closing_thread_could_not_start_are_closed_later() {
    const TEST: &str = "descriptors_whose_closing_thread_could_not_start_are_closed_later";
    if !is_root(TEST, "needs root to limit zrpcd's tasks and switch uids") {
        return;
    }
    let b = Broker::start();
    let pid = b.proc.pid();
    let cg = match PidsCgroup::new(pid) {
        Ok(cg) => cg,
        Err(why) => return skipped(TEST, &why),
    };
    let open = || std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    let baseline = open();
    cg.freeze_tasks();
    let said = run_as(
        &b,
        HOSTILE,
        &[
            "junk-fd",
            "--path",
            "/dev/null",
            "--plain",
            "--per-conn",
            "3",
        ],
    );
    assert_eq!(said, ["pong 3"], "the junk was not taken");
    // Its connection is gone; the 3 descriptors are queued, no thread to
    // close them.
    assert!(
        wait_until(WAIT, || open() == baseline + 3),
        "expected the 3 junk descriptors held while no thread can start: {} open, {baseline} before",
        open()
    );
    cg.lift();
    assert!(
        wait_until(WAIT, || open() <= baseline),
        "the junk descriptors are still open ({} open, {baseline} before) once threads can \
         start again: nothing retried their closing thread",
        open()
    );
    drop(cg);
}

/// An `fds` quota of 0 (`[quota] fds = 0`), or `--max-fds 0`, leaves users
/// no payload descriptors; it does not refuse their connections, since
/// nothing of theirs waits for its close. Before, the closing limits
/// (`mine >= quota`, `all >= --max-fds`) held with nothing waiting, so
/// every connection of every user but root was refused at accept.
#[test]
fn a_zero_fds_limit_does_not_refuse_connections() {
    const TEST: &str = "a_zero_fds_limit_does_not_refuse_connections";
    if !is_root(TEST, "needs root to switch uids") {
        return;
    }
    let dir = zrpc_tests::TempDir::new();
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, "[quota]\nfds = 0\n").expect("write the policy");
    let policy = policy.display().to_string();
    for args in [&["--policy", policy.as_str()][..], &["--max-fds", "0"][..]] {
        let b = Broker::start_with(args);
        let said = run_as(
            &b,
            HOSTILE,
            &["call", "--service", "zrpcd", "--method", "ping"],
        );
        assert!(
            said.first().is_some_and(|l| l.starts_with("result ok")),
            "zrpcd {args:?}: a user's call: {said:?}"
        );
    }
}

/// When the descriptors waiting for their close fill `--max-fds` (here 4
/// uids each with one stuck FUSE close, `--max-fds 4`), the users with
/// none waiting still connect and are served: only the descriptors they
/// would send are refused (the broker reads theirs with no room, so its
/// open descriptors stay bounded). Before, every uid but root was refused
/// at accept, whether it had anything waiting or not: four uids (one user
/// with subordinate uids, say) locked every other user out of zrpcd for
/// as long as their closes block.
#[test]
fn users_with_nothing_waiting_still_connect_when_waiting_descriptors_fill_max_fds() {
    const TEST: &str =
        "users_with_nothing_waiting_still_connect_when_waiting_descriptors_fill_max_fds";
    let Some(sb) = StuckBroker::start(TEST, "4") else {
        return;
    };
    let (b, fs) = (&sb.b, &sb.fs);
    let open = || sb.open();
    for (n, uid) in (65529..65533).enumerate() {
        sb.stick(uid, n + 1);
    }
    // All four wait: --max-fds is full.
    let said = run_as(
        b,
        65529,
        &["call", "--service", "zrpcd", "--method", "ping"],
    );
    assert!(
        said.first()
            .is_some_and(|l| l.starts_with("fatal limit_exceeded")),
        "a uid with a descriptor waiting is not refused: {said:?}"
    );
    let said = run_as(
        b,
        HOSTILE,
        &["call", "--service", "zrpcd", "--method", "ping"],
    );
    assert!(
        said.first().is_some_and(|l| l.starts_with("result ok")),
        "a uid with nothing waiting is refused while --max-fds is full: {said:?}"
    );
    // Its descriptors are refused, never installed.
    let before = open();
    let said = run_as(
        b,
        HOSTILE,
        &[
            "junk-fd",
            "--path",
            "/dev/null",
            "--plain",
            "--per-conn",
            "20",
        ],
    );
    assert!(
        said.last()
            .is_some_and(|l| l.starts_with("fatal limit_exceeded")),
        "{said:?}"
    );
    assert!(
        wait_until(WAIT, || open() <= before),
        "the broker took descriptors past --max-fds: {} open, {before} before",
        open()
    );
    assert_eq!(fs.blocked_closes(), 4);
}
