"""Fixtures: a real zrpcd per test in a fresh socket directory, and real processes.

zrpcd is found through ``$ZRPCD``, else ``target/debug/zrpcd`` of the
repository this package sits in, else ``PATH``. The Rust example binaries
(``test_server``, ``test_client``) are looked up next to it. Every process a
test starts is killed by its pid at the end; waits poll a condition with a
bound instead of sleeping a fixed time.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PYTHON_DIR = os.path.join(REPO, "python")


def find_zrpcd() -> str:
    """The zrpcd binary to test against."""
    env = os.environ.get("ZRPCD")
    if env:
        return env
    local = os.path.join(REPO, "target", "debug", "zrpcd")
    if os.path.exists(local):
        return local
    found = shutil.which("zrpcd")
    if found:
        return found
    pytest.exit("zrpcd not found: set $ZRPCD, build it (cargo build -p zrpcd) or put it on PATH", returncode=2)


def rust_bin(name: str) -> str:
    """A Rust example binary built next to zrpcd (the test fails, not skips, when it is missing)."""
    path = os.path.join(os.path.dirname(find_zrpcd()), name)
    if not os.path.exists(path):
        pytest.fail("%s not found next to zrpcd (build it: cargo build -p zrpc-examples --bins)" % path)
    return path


def colliding_tuple_keys(uid, n):
    """``n`` keys ``(instance, call, uid)`` whose Python tuple hashes are all equal: the
    tuple hash (xxHash's round, since Python 3.8) of ints is unseeded and invertible."""
    m = 1 << 64
    p1, p2, p5 = 11400714785074694791, 14029467366897019727, 2870177450012600261

    def rotl(x, r):
        return ((x << r) | (x >> (64 - r))) % m

    def rotr(x, r):
        return ((x >> r) | (x << (64 - r))) % m

    p1i, p2i = pow(p1, -1, m), pow(p2, -1, m)
    acc3 = (0x123456789ABCDEF - (3 ^ (p5 ^ 3527539))) % m
    acc2 = (rotr(acc3 * p1i % m, 31) - uid * p2) % m
    want = rotr(acc2 * p1i % m, 31)
    keys, instance = [], 1
    while len(keys) < n:
        acc1 = rotl((p5 + instance * p2) % m, 31) * p1 % m
        call = (want - acc1) * p2i % m
        if call < (1 << 61) - 1:  # hash(call) == call
            keys.append((instance, call, uid))
        instance += 1
    return keys


def wait_for(cond, timeout=10.0, what="condition"):
    """Polls ``cond()`` every 10 ms until it is truthy (returns it) or ``timeout`` passes (fails the test)."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise AssertionError("timed out after %.1f s waiting for %s" % (timeout, what))
        time.sleep(0.01)


class Procs:
    """The processes a test started; all are killed by pid at the end."""

    def __init__(self, env):
        self.env = env
        self.procs = []

    def spawn(self, args, **kw):
        """Starts a process with the test's environment; output is captured (text)."""
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        p = subprocess.Popen(args, env=kw.pop("env", self.env), text=True, **kw)
        self.procs.append(p)
        return p

    def python(self, code, **kw):
        """Runs ``code`` in a new Python interpreter (the one running the tests)."""
        return self.spawn([sys.executable, "-u", "-c", code], **kw)

    def kill_all(self):
        for p in self.procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            for f in (p.stdout, p.stderr):
                if f is not None:
                    f.close()


class Broker:
    """A zrpcd running in its own socket directory."""

    def __init__(self, procs, socket_dir, extra_args=()):
        self.procs = procs
        self.socket_dir = socket_dir
        self.extra_args = list(extra_args)
        self.proc = None
        self.start()

    @property
    def socket(self):
        return os.path.join(self.socket_dir, "zrpcd.sock")

    def start(self):
        """Starts zrpcd and waits until it accepts connections."""
        self.proc = self.procs.spawn([find_zrpcd(), "--socket-dir", self.socket_dir] + self.extra_args,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self._accepts, what="zrpcd to accept connections")

    def _accepts(self):
        import socket
        if self.proc.poll() is not None:
            raise AssertionError("zrpcd exited with %s" % self.proc.returncode)
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(self.socket)
            return True
        except OSError:
            return False
        finally:
            s.close()

    def kill(self, sig=signal.SIGKILL):
        """Sends ``sig`` to zrpcd and waits for it to exit."""
        os.kill(self.proc.pid, sig)
        self.proc.wait(timeout=10)

    def restart(self):
        """SIGKILLs zrpcd and starts a new one on the same directory."""
        self.kill()
        self.start()


class FakeBroker:
    """A stand-in for zrpcd on the socket of ``socket_dir``, to script a broker's misbehaviour:
    each connection accepted is handed to :meth:`serve` (``conn``, ``n`` counting from 1) in a
    thread of its own; the default holds it and says nothing. An ``OSError`` in ``serve`` (the
    peer went away, :meth:`close`) ends that connection's thread. With ``accepting=False``
    nothing is accepted until :meth:`accept`, so that the listen backlog (``backlog``) fills.
    ``closed`` is set by :meth:`close`, which ends everything."""

    def __init__(self, socket_dir, backlog=8, accepting=True):
        from zrpc import _proto
        self.path = os.path.join(socket_dir, _proto.SOCKET_FILE)
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(self.path)
        self.listener.listen(backlog)
        self.held = []
        self.closed = threading.Event()
        if accepting:
            self.accept()

    def accept(self):
        """Starts accepting connections."""
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        n = 0
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # closed
            n += 1
            self.held.append(conn)
            threading.Thread(target=self._serve, args=(conn, n), daemon=True).start()

    def _serve(self, conn, n):
        try:
            self.serve(conn, n)
        except OSError:
            pass

    def serve(self, conn, n):
        """Handles connection ``n`` (override); the default says nothing."""

    def welcome(self, conn, *extra):
        """Reads the ``Hello`` on ``conn`` and answers ``Welcome`` (1 MiB limit; ``extra`` fields after it)."""
        from zrpc import _proto
        conn.recv(4096)
        conn.sendall(_proto.encode_frame([_proto.WELCOME, _proto.PROTOCOL_VERSION, 1, 1 << 20] + list(extra)))

    def close(self):
        self.closed.set()
        # shutdown() wakes the accept() and the reads blocked in the threads (close() alone may not).
        for s in [self.listener] + self.held:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


@pytest.fixture
def socket_dir():
    d = tempfile.mkdtemp(prefix="zrpc-py-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def procs(socket_dir):
    env = dict(os.environ)
    env["ZRPC_SOCKET_DIR"] = socket_dir
    env["PYTHONPATH"] = PYTHON_DIR + os.pathsep + env.get("PYTHONPATH", "")
    p = Procs(env)
    yield p
    p.kill_all()


@pytest.fixture
def broker(procs, socket_dir, monkeypatch):
    """A fresh zrpcd; ``$ZRPC_SOCKET_DIR`` points at it in this process and its children."""
    monkeypatch.setenv("ZRPC_SOCKET_DIR", socket_dir)
    return Broker(procs, socket_dir)


@pytest.fixture
def files(socket_dir, procs):
    """A log file and a "go" file path in the socket directory, passed to services as $LOG
    and $GO (test services append to the log and wait for the go file)."""
    log = os.path.join(socket_dir, "log")
    go = os.path.join(socket_dir, "go")
    procs.env.update(LOG=log, GO=go)
    open(log, "w").close()
    return log, go


def lines(path):
    """The lines of a file."""
    with open(path) as f:
        return f.read().splitlines()


def service_names(socket_dir):
    """Names registered at the broker (``zrpcd.list``)."""
    from zrpc.client import Client
    with Client(socket_dir) as c:
        return [row["name"] for row in c.call("zrpcd", "list", timeout=5)]


def wait_registered(socket_dir, name, timeout=10.0):
    """Waits until a service holds ``name``."""
    wait_for(lambda: name in service_names(socket_dir), timeout, "service %r to register" % name)


def outstanding(socket_dir, name):
    """Calls delivered to the holder of ``name`` and not yet answered (``zrpcd.peers``)."""
    from zrpc.client import Client
    with Client(socket_dir) as c:
        peers = c.call("zrpcd", "peers", timeout=5)
    return sum(p["outstanding"] for p in peers if name in p["names"])


class Call(threading.Thread):
    """A blocking call made in a thread; ``result`` or ``error`` once ``join``\\ ed."""

    def __init__(self, service, method, payload=None, **kw):
        super().__init__(daemon=True)
        self.args_ = (service, method, payload)
        self.kw = kw
        self.result = self.error = None
        from zrpc.client import Client
        self.client = Client()
        self.start()

    def run(self):
        try:
            self.result = self.client.call(*self.args_, **self.kw)
        except Exception as e:  # reported to the test
            self.error = e

    def outcome(self, timeout=30):
        self.join(timeout)
        assert not self.is_alive(), "the call did not return"
        return self.result if self.error is None else self.error
