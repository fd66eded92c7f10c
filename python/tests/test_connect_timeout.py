"""The ``connect_timeout`` keyword of the clients and servers bounds connecting, the handshake
and a server's registration (default ``_proto.HANDSHAKE_TIMEOUT``, 5 s).

A real zrpcd is SIGSTOPped: connections still complete in the kernel's listen backlog, but
``Hello`` is never answered. With ``connect_timeout=0.3`` every first connection fails with
``ConnectError`` after 0.3 s; were the keyword ignored, after 5 s (outside the bound checked).
"""

import asyncio
import contextlib
import os
import signal
import socket
import threading
import time

import pytest

from zrpc import _proto, aio, errors
from zrpc.client import Client
from zrpc.server import Server

from conftest import FakeBroker

SHORT = 0.3
#: The bounds on how long a failed connection with ``connect_timeout=SHORT`` may take.
AT_LEAST, AT_MOST = 0.25, 3.0


@contextlib.contextmanager
def stopped(broker):
    """zrpcd stopped (SIGSTOP) for the duration; continued (SIGCONT) after, whatever happens."""
    os.kill(broker.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(broker.proc.pid, signal.SIGCONT)


def fails_in_time(run):
    """Runs ``run()``, which must raise ConnectError within [AT_LEAST, AT_MOST] s; returns the error."""
    start = time.monotonic()
    with pytest.raises(errors.ConnectError) as info:
        run()
    took = time.monotonic() - start
    assert AT_LEAST <= took <= AT_MOST, "failed after %.2f s: %s" % (took, info.value)
    return info.value


class Mute(Server):
    pass


class AioMute(aio.Server):
    pass


def test_a_clients_connect_timeout_bounds_the_handshake_with_a_stopped_broker(broker, socket_dir):
    with stopped(broker):
        e = fails_in_time(lambda: Client(socket_dir, connect_timeout=SHORT))
    assert "no answer to Hello" in str(e), e


def test_an_aio_clients_connect_timeout_bounds_the_handshake_with_a_stopped_broker(broker, socket_dir):
    with stopped(broker):
        e = fails_in_time(lambda: asyncio.run(aio.Client.connect(socket_dir, connect_timeout=SHORT)))
    assert "no answer to Hello" in str(e), e


def test_a_servers_connect_timeout_bounds_its_first_connection_to_a_stopped_broker(broker, socket_dir):
    server = Mute(name="mute", socket_dir=socket_dir, stop_on_signals=False, connect_timeout=SHORT)
    with stopped(broker):
        e = fails_in_time(server.run)
    assert "no answer to Hello" in str(e), e


def test_an_aio_servers_connect_timeout_bounds_its_first_connection_to_a_stopped_broker(broker, socket_dir):
    server = AioMute(name="mute", socket_dir=socket_dir, stop_on_signals=False, connect_timeout=SHORT)
    with stopped(broker):
        e = fails_in_time(lambda: asyncio.run(server.serve()))
    assert "no answer to Hello" in str(e), e


class WelcomeOnly(FakeBroker):
    """A "broker" that answers ``Hello`` with ``Welcome`` and then never answers (no ``Ack``)."""

    def serve(self, conn, n):
        self.welcome(conn)


@pytest.mark.parametrize("kind", ["blocking", "aio"])
def test_a_servers_connect_timeout_bounds_its_registration(socket_dir, kind):
    fake = WelcomeOnly(socket_dir)
    try:
        if kind == "blocking":
            server = Mute(name="mute", socket_dir=socket_dir, stop_on_signals=False, connect_timeout=SHORT)
            run = server.run
        else:
            server = AioMute(name="mute", socket_dir=socket_dir, stop_on_signals=False, connect_timeout=SHORT)
            run = lambda: asyncio.run(server.serve())  # noqa: E731
        e = fails_in_time(run)
        assert "regist" in str(e), e
    finally:
        fake.close()


@pytest.mark.parametrize("kind", ["blocking", "aio"])
def test_a_clients_connect_timeout_bounds_each_reconnection(broker, socket_dir, kind):
    # The broker is replaced by a listener that takes the reconnection and never answers
    # Hello; once a real broker is back, the call (deadline 20 s) is answered after the
    # attempt on the silent listener gave up (0.3 s) and the next one after the backoff
    # (at most 1 s more), not after the 5 s the attempt would wait by default.
    result = {}

    if kind == "blocking":
        client = Client(socket_dir, connect_timeout=SHORT)
        assert client.call("zrpcd", "ping", timeout=5) == "pong"

        def call():
            try:
                result["value"] = client.call("zrpcd", "ping", timeout=20)
            except Exception as e:  # reported to the test
                result["value"] = e
    else:
        loop = asyncio.new_event_loop()
        client = loop.run_until_complete(aio.Client.connect(socket_dir, connect_timeout=SHORT))
        assert loop.run_until_complete(client.call("zrpcd", "ping", timeout=5)) == "pong"

        def call():
            try:
                result["value"] = loop.run_until_complete(client.call("zrpcd", "ping", timeout=20))
            except Exception as e:  # reported to the test
                result["value"] = e

    broker.kill()
    path = os.path.join(socket_dir, _proto.SOCKET_FILE)
    if os.path.exists(path):
        os.unlink(path)
    silent = socket.socket(socket.AF_UNIX)
    silent.bind(path)
    silent.listen(8)
    silent.settimeout(10)
    held = []
    t = threading.Thread(target=call, daemon=True)
    t.start()
    try:
        held.append(silent.accept()[0])  # the reconnection waits for Welcome from here on
        since = time.monotonic()
        silent.close()
        os.unlink(path)
        broker.start()
        t.join(15)
        took = time.monotonic() - since
        assert not t.is_alive(), "the call did not return"
        assert result["value"] == "pong", result
        assert took <= AT_MOST, "answered %.2f s after the reconnection reached the silent listener" % took
    finally:
        silent.close()
        for c in held:
            c.close()
        t.join(25)
        if kind == "blocking":
            client.close()
        else:
            loop.run_until_complete(client.close())
            loop.close()


BAD = [0, -1, 0.0, float("nan"), float("inf"), 1e10, "1", None, True]


@pytest.mark.parametrize("bad", BAD, ids=repr)
def test_connect_timeout_must_be_a_positive_number(socket_dir, bad):
    # Checked before anything connects (no broker runs here).
    with pytest.raises(ValueError, match="connect_timeout"):
        Client(socket_dir, connect_timeout=bad)
    with pytest.raises(ValueError, match="connect_timeout"):
        aio.Client(socket_dir, connect_timeout=bad)
    with pytest.raises(ValueError, match="connect_timeout"):
        asyncio.run(aio.Client.connect(socket_dir, connect_timeout=bad))
    with pytest.raises(ValueError, match="connect_timeout"):
        Mute(name="mute", socket_dir=socket_dir, connect_timeout=bad)
    with pytest.raises(ValueError, match="connect_timeout"):
        AioMute(name="mute", socket_dir=socket_dir, connect_timeout=bad)


def test_connect_timeout_defaults_to_the_handshake_timeout(socket_dir):
    assert _proto.HANDSHAKE_TIMEOUT == 5.0
    assert Mute(name="mute", socket_dir=socket_dir).connect_timeout == 5.0
    assert AioMute(name="mute", socket_dir=socket_dir).connect_timeout == 5.0
    assert aio.Client(socket_dir).connect_timeout == 5.0
    assert Client.__init__.__kwdefaults__["connect_timeout"] == 5.0


class Trickle(FakeBroker):
    """A "broker" that answers slowly, one byte every ``GAP`` seconds (less than the connect
    timeout, so that each read gets something in time): ``Welcome`` (padded, so that the whole
    takes several seconds), and, with ``ack``, after a prompt ``Welcome``, the ``Ack`` of the
    first registration. It stops writing when the peer goes away."""

    GAP = 0.2
    PAD = "x" * 24

    def __init__(self, socket_dir, ack=False):
        self.ack = ack
        super().__init__(socket_dir)

    def _trickle(self, conn, frame):
        for i in range(len(frame)):
            if self.closed.wait(self.GAP):
                return
            conn.sendall(frame[i:i + 1])

    def serve(self, conn, n):
        if not self.ack:
            conn.recv(4096)  # the Hello
            self._trickle(conn, _proto.encode_frame(
                [_proto.WELCOME, _proto.PROTOCOL_VERSION, 1, 1 << 20, 0, self.PAD]))
            return
        self.welcome(conn)
        conn.recv(4096)  # the Register (req 1)
        self._trickle(conn, _proto.encode_frame([_proto.ACK, 1, 0, self.PAD]))


SLOW_TIMEOUT = 0.6


def _in_thread(run, out=None):
    """Starts ``run()`` on a daemon thread; returns the thread and ``out`` (a new dict if
    ``None``), which gets ``error`` (what ``run()`` raised, if anything) and ``ended``
    (``time.monotonic()`` when it returned)."""
    out = {} if out is None else out

    def target():
        try:
            run()
        except Exception as e:  # reported to the test
            out["error"] = e
        out["ended"] = time.monotonic()

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, out


def _first_connection(kind, socket_dir):
    """Makes a first connection of ``kind`` with ``connect_timeout=SLOW_TIMEOUT`` (in a thread,
    waited for at most 5 s: a server that connected serves, and is stopped then); returns its
    error (``None`` if it raised none) and how long it took."""
    server = None
    if kind == "server":
        server = Mute(name="mute", socket_dir=socket_dir, stop_on_signals=False, drain_timeout=1,
                        connect_timeout=SLOW_TIMEOUT)
        run = server.run
    elif kind == "aio server":
        server = AioMute(name="mute", socket_dir=socket_dir, stop_on_signals=False, drain_timeout=1,
                        connect_timeout=SLOW_TIMEOUT)
        run = lambda: asyncio.run(server.serve())  # noqa: E731
    elif kind == "client":
        run = lambda: Client(socket_dir, connect_timeout=SLOW_TIMEOUT).close()  # noqa: E731
    else:
        async def aio_client():
            await (await aio.Client.connect(socket_dir, connect_timeout=SLOW_TIMEOUT)).close()
        run = lambda: asyncio.run(aio_client())  # noqa: E731
    start = time.monotonic()
    t, out = _in_thread(run)
    t.join(5)
    if t.is_alive() and server is not None:
        server.shutdown()
    t.join(15)
    assert not t.is_alive(), "the %s did not return" % kind
    return out.get("error"), out["ended"] - start


@pytest.mark.parametrize("kind", ["client", "aio client", "server", "aio server"])
def test_connect_timeout_bounds_a_welcome_that_trickles_in(socket_dir, kind):
    # Each byte of Welcome comes within the timeout, the whole after ~6 s: the timeout bounds
    # the handshake as a whole, not each read of it (which let it last ~6 s, or for ever).
    fake = Trickle(socket_dir)
    try:
        e, took = _first_connection(kind, socket_dir)
        assert isinstance(e, errors.ConnectError), "%r after %.2f s" % (e, took)
        assert SLOW_TIMEOUT - 0.05 <= took <= SLOW_TIMEOUT + 1.5, "failed after %.2f s: %s" % (took, e)
    finally:
        fake.close()


@pytest.mark.parametrize("kind", ["server", "aio server"])
def test_connect_timeout_bounds_a_registration_ack_that_trickles_in(socket_dir, kind):
    # Welcome comes at once; each byte of the Ack within the timeout, the whole after ~4 s.
    fake = Trickle(socket_dir, ack=True)
    try:
        e, took = _first_connection(kind, socket_dir)
        assert isinstance(e, errors.ConnectError), "%r after %.2f s" % (e, took)
        assert SLOW_TIMEOUT - 0.05 <= took <= SLOW_TIMEOUT + 1.5, "failed after %.2f s: %s" % (took, e)
        assert "regist" in str(e), e
    finally:
        fake.close()


class Backlogged(FakeBroker):
    """A "broker" whose listen backlog is full: it accepts nothing until ``open()``, then
    answers every ``Hello`` with ``Welcome``."""

    def __init__(self, socket_dir):
        super().__init__(socket_dir, backlog=0, accepting=False)
        while True:  # fill the backlog: a non-blocking connect fails with EAGAIN once it is full
            s = socket.socket(socket.AF_UNIX)
            s.setblocking(False)
            try:
                s.connect(self.path)
            except BlockingIOError:
                s.close()
                break
            self.held.append(s)
        self.open = self.accept

    def serve(self, conn, n):
        conn.settimeout(0.2)  # (the fillers send no Hello)
        self.welcome(conn)


@pytest.mark.parametrize("kind", ["client", "aio client"])
def test_a_full_listen_backlog_is_waited_for_within_connect_timeout(socket_dir, kind):
    # A broker too busy to accept at once (its backlog full) is waited for, up to
    # connect_timeout, as a broker slow to answer Hello is (and as zrpc-io's blocking
    # connect_until does), instead of failing at once with a bare EAGAIN.
    fake = Backlogged(socket_dir)
    try:
        timer = threading.Timer(0.3, fake.open)
        timer.start()
        start = time.monotonic()
        if kind == "client":
            Client(socket_dir, connect_timeout=5).close()
        else:
            async def connect():
                await (await aio.Client.connect(socket_dir, connect_timeout=5)).close()
            asyncio.run(connect())
        took = time.monotonic() - start
        assert took >= 0.25, "connected after %.2f s, before the broker accepted?" % took
        timer.join()
    finally:
        fake.close()


def test_a_full_listen_backlog_fails_at_connect_timeout_saying_so(socket_dir):
    fake = Backlogged(socket_dir)
    try:
        e = fails_in_time(lambda: Client(socket_dir, connect_timeout=SHORT))
        assert "backlog" in str(e), e
    finally:
        fake.close()


def _fds():
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("kind", ["aio client", "aio server"])
def test_a_cancelled_aio_connect_closes_its_socket_at_once(socket_dir, kind):
    # The broker takes the connection and never answers Hello. Cancelling the connect
    # (aio.Client.connect, or serve() connecting) closes the client's socket at once, leaves
    # no thread behind, and asyncio.run() returns at once: the handshake ran in an executor
    # thread, which went on, socket open, until connect_timeout (5 s) had passed, and
    # asyncio.run() waited for it.
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(os.path.join(socket_dir, _proto.SOCKET_FILE))
    listener.listen(8)
    listener.setblocking(False)
    threads = threading.active_count()
    seen = {}

    async def main():
        loop = asyncio.get_running_loop()
        base = _fds()
        if kind == "aio client":
            task = asyncio.ensure_future(aio.Client.connect(socket_dir, connect_timeout=5))
        else:
            server = AioMute(name="mute", socket_dir=socket_dir, stop_on_signals=False, connect_timeout=5)
            task = asyncio.ensure_future(server.serve())
        held, _ = await asyncio.wait_for(loop.sock_accept(listener), 5)
        # The Hello has arrived: the client awaits its answer.
        assert await asyncio.wait_for(loop.sock_recv(held, 4096), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        held.setblocking(False)
        seen["eof"] = False
        try:
            while not seen["eof"]:  # the rest of the Hello, then the end of the stream (if closed)
                seen["eof"] = held.recv(4096) == b""
        except BlockingIOError:
            pass  # the client's end is still open
        held.close()
        seen["fds"] = _fds() - base
        seen["threads"] = threading.active_count() - threads

    start = time.monotonic()
    try:
        asyncio.run(main())
    finally:
        listener.close()
    took = time.monotonic() - start
    assert seen["eof"], "the cancelled connect's socket is still open"
    # (At most: the fakes of earlier tests may still be closing theirs.)
    assert seen["fds"] <= 0, "%d descriptors more than before the connect" % seen["fds"]
    assert seen["threads"] <= 0, "%d threads more than before the connect" % seen["threads"]
    assert took < 2.5, "asyncio.run() returned %.2f s after the start" % took


class FirstOnly(FakeBroker):
    """A "broker" that registers the first connection (``Welcome``, ``Ack`` of req 1, then the
    frames ``then``), ends it on ``dropped``, then takes the next connections and never
    answers them (``second`` set)."""

    def __init__(self, socket_dir, then=()):
        self.then = list(then)
        self.dropped = threading.Event()
        self.second = threading.Event()
        super().__init__(socket_dir)

    def serve(self, conn, n):
        if n > 1:
            self.second.set()
            return
        self.welcome(conn)
        conn.recv(4096)  # the Register (or a client's Call)
        conn.sendall(_proto.encode_frame([_proto.ACK, 1, 0, ""]))
        for frame in self.then:
            conn.sendall(frame)
        self.dropped.wait()
        conn.shutdown(socket.SHUT_RDWR)

    def close(self):
        self.dropped.set()
        super().close()


@pytest.mark.parametrize("kind", ["server", "aio server"])
def test_a_stop_while_reconnecting_to_a_silent_broker_does_not_wait_for_connect_timeout(socket_dir, kind):
    # The server lost its broker; the new one takes the reconnection and never answers. A
    # stop then has nothing to drain (nothing is delivered while not registered): run() /
    # serve() returns at once, not once the handshake gave up (connect_timeout, 5 s) or,
    # answered, after a registration to release again.
    fake = FirstOnly(socket_dir)
    if kind == "server":
        server = Mute(name="mute", socket_dir=socket_dir, stop_on_signals=False, drain_timeout=0.5)
        run = server.run
    else:
        server = AioMute(name="mute", socket_dir=socket_dir, stop_on_signals=False, drain_timeout=0.5)
        run = lambda: asyncio.run(server.serve())  # noqa: E731
    t, out = _in_thread(run)
    try:
        fake.dropped.set()
        assert fake.second.wait(10), "the server did not reconnect"
        stop = time.monotonic()
        server.shutdown()
        t.join(15)
        assert not t.is_alive(), "the server did not stop"
        assert "error" not in out, out
        took = out["ended"] - stop
        assert took < 1.5, "stopped %.2f s after shutdown()" % took
    finally:
        fake.close()
        t.join(15)


class AioHang(aio.Server):
    """An asyncio service whose ``hang`` runs until cancelled (``started``, ``unwound``)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.started = threading.Event()
        self.unwound = threading.Event()

    @aio.rpc_method
    async def hang(self, payload):
        self.started.set()
        try:
            await asyncio.sleep(3600)
        finally:
            self.unwound.set()


def test_an_aio_stop_while_reconnecting_gives_up_the_handlers_of_the_lost_connection(socket_dir):
    # A handler still runs from the lost connection when the stop comes during the
    # reconnection: serve() returns once it is cancelled and unwound (as a stop while waiting
    # out the backoff does), not leaving it running.
    request = _proto.encode_frame([_proto.REQUEST, 1, "mute", "hang", None, 7, 1, 0, 0, 0], _proto.pack(None))
    fake = FirstOnly(socket_dir, then=[request])
    server = AioHang(name="mute", socket_dir=socket_dir, stop_on_signals=False, drain_timeout=0.5)
    out = {}

    async def serve():
        await server.serve()
        # (Checked before asyncio.run() cancels the tasks left.)
        out["unwound"] = server.unwound.is_set()

    t, out = _in_thread(lambda: asyncio.run(serve()), out)
    try:
        assert server.started.wait(10), "the handler did not start"
        fake.dropped.set()
        assert fake.second.wait(10), "the server did not reconnect"
        server.shutdown()
        t.join(15)
        assert not t.is_alive(), "the server did not stop"
        assert "error" not in out, out
        assert out["unwound"], "serve() returned with the handler still running"
    finally:
        fake.close()
        t.join(15)


def test_close_wakes_a_call_waiting_for_a_reconnection_handshake(socket_dir):
    # Client.close() from another thread fails a call blocked there at once, also while it
    # waits for the new broker's Welcome (not once connect_timeout has passed).
    fake = FirstOnly(socket_dir)
    client = Client(socket_dir, connect_timeout=5)
    out = {}

    def call():
        try:
            client.call("svc", "m", timeout=20)
        except Exception as e:  # reported to the test
            out["error"] = e
        out["ended"] = time.monotonic()

    t = threading.Thread(target=call, daemon=True)
    t.start()
    try:
        fake.dropped.set()  # once the fake has the Call
        assert fake.second.wait(10), "the client did not reconnect"
        time.sleep(0.05)  # (not a synchronisation: lets the Hello go out, the test holds without it)
        closed = time.monotonic()
        client.close()
        t.join(15)
        assert not t.is_alive(), "the call did not return"
        assert isinstance(out.get("error"), errors.DisconnectedError), out
        took = out["ended"] - closed
        assert took < 1.0, "the call failed %.2f s after close()" % took
    finally:
        fake.close()
        t.join(15)
