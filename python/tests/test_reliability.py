"""zrpc's promises with real processes: re-delivery after a service crash, a
broker SIGKILL mid-call answered exactly once, a killed client, Cancel, the
reply cache, and the broker identity check."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading

import pytest

from conftest import Call, find_zrpcd, lines, rust_bin, service_names, wait_for, wait_registered
from zrpc import _proto, errors
from zrpc.client import Client

# A service whose `work` appends a line to $LOG, then (for `slow`) waits for
# the file $GO, and crashes in the handler when $CRASH is set.
WORKER = textwrap.dedent('''
    import os, time
    from zrpc.server import Server, rpc_method

    class Worker(Server):
        @rpc_method
        def work(self, payload):
            with open(os.environ["LOG"], "a") as f:
                f.write("%s %d\\n" % (payload, os.getpid()))
            if os.environ.get("CRASH"):
                os._exit(3)
            return {"done": payload, "pid": os.getpid(), "counter": self.counter}

        @rpc_method
        def slow(self, payload):
            with open(os.environ["LOG"], "a") as f:
                f.write("slow %s\\n" % payload)
            deadline = time.monotonic() + 30
            while not os.path.exists(os.environ["GO"]) and time.monotonic() < deadline:
                time.sleep(0.01)
            return "slow done %s" % payload

    Worker(shared=True, reply_cache=int(os.environ.get("CACHE", "10000"))).run()
''')


def test_service_crash_mid_call_is_redelivered(broker, procs, files):
    log, _ = files
    crashing = procs.spawn([sys.executable, "-c", WORKER], env=dict(procs.env, CRASH="1"))
    wait_registered(broker.socket_dir, "worker")
    call = Call("worker", "work", "job", timeout=30)
    crashing.wait(timeout=30)
    assert crashing.returncode == 3
    healthy = procs.spawn([sys.executable, "-c", WORKER])
    got = call.outcome()
    assert got == {"done": "job", "pid": healthy.pid, "counter": 1}, got
    assert lines(log) == ["job %d" % crashing.pid, "job %d" % healthy.pid]


def test_service_crash_with_no_retry_is_service_gone(broker, procs, files):
    crashing = procs.spawn([sys.executable, "-c", WORKER], env=dict(procs.env, CRASH="1"))
    wait_registered(broker.socket_dir, "worker")
    with pytest.raises(errors.ServiceGoneError):
        Client().call("worker", "work", "x", timeout=30, no_retry=True)
    assert crashing.wait(timeout=10) == 3


def test_broker_sigkill_mid_call_is_answered_exactly_once(broker, procs, files):
    log, go = files
    procs.spawn([sys.executable, "-c", WORKER])
    wait_registered(broker.socket_dir, "worker")
    call = Call("worker", "slow", 1, timeout=60)
    wait_for(lambda: lines(log) == ["slow 1"], what="the handler to start")
    broker.restart()
    open(go, "w").close()
    # The client resubmitted its call (same instance and id) to the new broker,
    # the service re-registered and answered it from its reply cache.
    assert call.outcome() == "slow done 1"
    assert lines(log) == ["slow 1"], "the handler ran more than once"
    assert Client().call("worker", "slow", 2, timeout=30) == "slow done 2"
    assert lines(log) == ["slow 1", "slow 2"]


def test_broker_sigkill_no_retry_call_is_disconnected(broker, procs, files):
    log, go = files
    procs.spawn([sys.executable, "-c", WORKER])
    wait_registered(broker.socket_dir, "worker")
    call = Call("worker", "slow", 1, timeout=60, no_retry=True)
    wait_for(lambda: lines(log) == ["slow 1"], what="the handler to start")
    broker.restart()
    assert isinstance(call.outcome(), errors.DisconnectedError)
    open(go, "w").close()


def _restart_without_the_worker(broker, worker, log, first_line):
    """Kills broker and worker (SIGKILL) while the worker runs a call, then starts a broker
    on which no instance holds the name."""
    wait_for(lambda: lines(log) == [first_line], what="the handler to start")
    broker.kill()
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait(timeout=10)
    broker.start()


def test_a_resubmitted_call_is_not_reported_as_never_delivered(broker, procs, files):
    # The old broker delivered the call and its service may have run it; the
    # new broker has no instance of the name and cannot know: the client,
    # which resubmitted the call, must not pass on "never ran"
    # (NoSuchService, TimeoutNoService).
    import asyncio
    from zrpc import aio
    log, _ = files
    worker = procs.spawn([sys.executable, "-c", WORKER])
    wait_registered(broker.socket_dir, "worker")
    call = Call("worker", "slow", 1, timeout=60, no_wait=True)
    _restart_without_the_worker(broker, worker, log, "slow 1")
    assert isinstance(call.outcome(), errors.ServiceGoneError), call.outcome()

    open(log, "w").close()
    worker = procs.spawn([sys.executable, "-c", WORKER])
    wait_registered(broker.socket_dir, "worker")

    async def waiting_call():
        c = await aio.Client.connect()
        try:
            return await c.call("worker", "slow", 2, timeout=4)
        except errors.ZRPCError as e:
            return e
        finally:
            await c.close()

    def in_a_loop(out):
        out.append(asyncio.run(waiting_call()))

    out = []
    t = threading.Thread(target=in_a_loop, args=(out,), daemon=True)
    t.start()
    _restart_without_the_worker(broker, worker, log, "slow 2")
    t.join(30)
    assert not t.is_alive(), "the async call did not return"
    assert isinstance(out[0], errors.RPCTimeoutError), out
    assert not out[0].no_service, out[0]


def test_killed_client_does_not_disturb_the_service(broker, procs, files):
    log, go = files
    procs.spawn([sys.executable, "-c", WORKER])
    wait_registered(broker.socket_dir, "worker")
    client = procs.python("from zrpc.client import Client\nClient().call('worker', 'slow', 'killed')")
    wait_for(lambda: lines(log) == ["slow killed"], what="the handler to start")
    os.kill(client.pid, signal.SIGKILL)
    client.wait(timeout=10)
    open(go, "w").close()
    c = Client()
    # The service finishes the orphaned call (its reply is dropped) and serves the next one.
    assert c.call("worker", "work", "after", timeout=30)["done"] == "after"
    assert [ln.split()[0] for ln in lines(log)] == ["slow", "after"]


def test_cancel_drops_a_queued_request(broker, procs, files):
    """A request the broker cancels (its deadline passed) while queued behind a slow one never runs."""
    log, go = files
    procs.spawn([sys.executable, "-c", WORKER])
    wait_registered(broker.socket_dir, "worker")
    slow = Call("worker", "slow", 1, timeout=60)
    wait_for(lambda: lines(log) == ["slow 1"], what="the slow handler to start")
    with pytest.raises(errors.RPCTimeoutError):
        Client().call("worker", "work", "cancelled", timeout=0.3)
    open(go, "w").close()
    assert slow.outcome() == "slow done 1"
    assert Client().call("worker", "work", "next", timeout=30)["done"] == "next"
    assert [ln.split()[0] for ln in lines(log)] == ["slow", "next"]


def test_resubmitted_call_is_answered_from_the_reply_cache(broker, procs, files):
    """The same (instance, call id) sent on two connections runs the handler once."""
    log, _ = files
    procs.spawn([sys.executable, "-c", WORKER])
    wait_registered(broker.socket_dir, "worker")
    instance = _proto.random_id()
    answers = []
    for _ in range(2):
        sock, _w, reader, frames = _proto.connect(broker.socket_dir, instance)
        sock.sendall(_proto.call_frame(7, "worker", "work", 10_000, 0, _proto.pack("once")))
        while not frames:
            frames = reader.feed(sock.recv(65536))
        env, payload = frames[0]
        assert env[:3] == [_proto.RESULT, 7, 0]
        answers.append(_proto.unpack(payload))
        sock.close()
    assert answers[0] == answers[1] and answers[0]["counter"] == 1
    assert len(lines(log)) == 1


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv to call as another uid")
def test_another_users_flood_does_not_evict_a_cached_reply(broker, procs, files, socket_dir):
    """docs/security.md: a user calling fast evicts its own cached replies, not the one
    another user's resubmission needs (the cache holds 50; the other user makes 300 calls)."""
    log, _ = files
    os.chmod(socket_dir, 0o755)
    procs.spawn([sys.executable, "-c", WORKER], env=dict(procs.env, CACHE="50"))
    wait_registered(broker.socket_dir, "worker")
    instance = _proto.random_id()

    def call_once():
        sock, _w, reader, frames = _proto.connect(broker.socket_dir, instance)
        sock.settimeout(30)
        sock.sendall(_proto.call_frame(7, "worker", "work", 10_000, 0, _proto.pack("once")))
        while not frames:
            frames = reader.feed(sock.recv(65536))
        env, payload = frames[0]
        assert env[:3] == [_proto.RESULT, 7, 0]
        sock.close()
        return _proto.unpack(payload)

    first = call_once()
    out = os.path.join(socket_dir, "flood.out")
    with open(out, "w") as f:
        procs.spawn(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
                     rust_bin("zrpc-test-peer"), "park", "--service", "worker", "--method", "work",
                     "--count", "300", "--payload", _proto.pack("flood").hex()], stdout=f)

    def answered():
        with open(out) as f:
            return sum(1 for ln in f if ln.startswith("result"))

    wait_for(lambda: answered() == 300, timeout=60, what="the other user's 300 calls to be answered")
    with open(out) as f:
        results = [ln.strip() for ln in f if ln.startswith("result")]
    assert all(r.startswith("result ok") for r in results), results[:3]
    assert call_once() == first, "the call ran again"
    assert [ln.split()[0] for ln in lines(log)].count("once") == 1
    assert len(lines(log)) == 301


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv to run zrpcd as another uid")
def test_untrusted_broker_is_refused(procs, socket_dir, monkeypatch):
    # zrpcd wants a directory only its own user may write to.
    os.chmod(socket_dir, 0o755)
    socket_dir = os.path.join(socket_dir, "other")
    os.mkdir(socket_dir, 0o755)
    os.chown(socket_dir, 65534, 65534)
    monkeypatch.setenv("ZRPC_SOCKET_DIR", socket_dir)
    monkeypatch.delenv("ZRPC_BROKER_UID", raising=False)
    procs.spawn(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
                 find_zrpcd(), "--socket-dir", socket_dir],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: os.path.exists(os.path.join(socket_dir, "zrpcd.sock")), what="the other user's zrpcd")

    def refused():
        try:
            Client()
        except errors.UntrustedBrokerError as e:
            return e
        except errors.ConnectError:
            return None

    e = wait_for(refused, what="the untrusted broker to be refused")
    assert "uid 65534" in str(e)
    monkeypatch.setenv("ZRPC_BROKER_UID", "65534")
    assert Client().call("zrpcd", "ping", timeout=5) == "pong"


def test_server_reconnects_after_broker_restart(broker, procs, files):
    procs.spawn([sys.executable, "-c", WORKER])
    wait_registered(broker.socket_dir, "worker")
    broker.restart()
    wait_registered(broker.socket_dir, "worker")
    assert Client().call("worker", "work", "again", timeout=30)["done"] == "again"
    assert service_names(broker.socket_dir) == ["worker"]



# ---- a Fatal answer to Hello on reconnect --------------------------------
#
# docs/protocol.md: a library treats Fatal like a lost connection and reconnects
# with backoff, unless the code is VersionMismatch. The processes under test reach
# the broker through a symlink, $ZRPC_SOCKET_DIR/zrpcd.sock, to broker A's socket;
# broker B runs with --max-connections 2, both taken. The symlink is switched to B
# and A killed: the reconnect gets Fatal{LimitExceeded} until a slot is freed.

ECHO_SERVICE = textwrap.dedent('''
    from zrpc.{module} import Server, rpc_method

    class Echo(Server):
        @rpc_method
        def echo(self, payload):
            return payload

    Echo().run()
''')


class Switch:
    """Brokers A (plain) and B (two connections at most), and the symlink ``link_dir/zrpcd.sock``."""

    def __init__(self, procs, socket_dir):
        self.procs = procs
        self.dirs = {}
        for n in ("a", "b", "link"):
            self.dirs[n] = os.path.join(socket_dir, n)
            os.mkdir(self.dirs[n], 0o700)
        from conftest import Broker
        self.a = Broker(procs, self.dirs["a"])
        self.b = Broker(procs, self.dirs["b"], ["--max-connections", "2"])
        self.link = os.path.join(self.dirs["link"], _proto.SOCKET_FILE)
        os.symlink(self.a.socket, self.link)
        self.env = dict(procs.env, ZRPC_SOCKET_DIR=self.dirs["link"])

    def to_b(self):
        tmp = self.link + ".new"
        os.symlink(self.b.socket, tmp)
        os.replace(tmp, self.link)

    def admitted(self, make):
        """``make()`` once B admits it (a slot of a connection that just closed may take a moment to free)."""
        def attempt():
            try:
                return make()
            except errors.LimitExceededError:
                return None
        return wait_for(attempt, what="broker B to admit a connection")

    def refused(self, monitor):
        return monitor.call("zrpcd", "stats", timeout=5)["connections_refused"]


@pytest.mark.parametrize("module", ["server", "aio"])
def test_server_retries_a_fatal_answer_to_hello(procs, socket_dir, module):
    sw = Switch(procs, socket_dir)
    server = procs.spawn([sys.executable, "-c", ECHO_SERVICE.format(module=module)], env=sw.env)
    wait_registered(sw.dirs["a"], "echo")
    monitor = sw.admitted(lambda: Client(sw.dirs["b"]))
    hog = sw.admitted(lambda: Client(sw.dirs["b"]))
    refused = sw.refused(monitor)
    sw.to_b()
    sw.a.kill()
    wait_for(lambda: sw.refused(monitor) >= refused + 2 or server.poll() is not None,
             what="broker B to refuse the server twice")
    assert server.poll() is None, server.communicate()[1]
    hog.close()
    wait_for(lambda: "echo" in [r["name"] for r in monitor.call("zrpcd", "list", timeout=5)],
             what="the server to register at broker B")
    assert monitor.call("echo", "echo", "again", timeout=10) == "again"


def echo_at_b(sw, procs):
    """Starts the echo service at broker B and waits for it; returns a client admitted at B."""
    procs.spawn([sys.executable, "-c", ECHO_SERVICE.format(module="server")],
                env=dict(procs.env, ZRPC_SOCKET_DIR=sw.dirs["b"]))
    monitor = sw.admitted(lambda: Client(sw.dirs["b"]))
    wait_for(lambda: "echo" in [r["name"] for r in monitor.call("zrpcd", "list", timeout=5)],
             what="the service to register at broker B")
    return monitor


def test_blocking_client_retries_a_fatal_answer_to_hello(procs, socket_dir, monkeypatch):
    sw = Switch(procs, socket_dir)
    # The service runs at B from the start; A has none, so the call waits there.
    monitor = echo_at_b(sw, procs)
    monkeypatch.setenv("ZRPC_SOCKET_DIR", sw.dirs["link"])
    call = Call("echo", "echo", "through", timeout=30)
    wait_for(lambda: Client(sw.dirs["a"]).call("zrpcd", "stats", timeout=5)["pending"] == 1,
             what="the call to wait at broker A")
    refused = sw.refused(monitor)
    sw.to_b()
    sw.a.kill()
    wait_for(lambda: sw.refused(monitor) >= refused + 2 or not call.is_alive(),
             what="broker B to refuse the client twice")
    assert call.is_alive(), call.outcome()
    monitor.close()
    assert call.outcome() == "through"


def test_async_client_retries_a_fatal_answer_to_hello(procs, socket_dir, monkeypatch):
    import asyncio
    from zrpc import aio
    sw = Switch(procs, socket_dir)
    monitor = echo_at_b(sw, procs)

    async def main():
        loop = asyncio.get_running_loop()

        def run(f, *a):
            return loop.run_in_executor(None, f, *a)

        c = await aio.Client.connect(sw.dirs["link"])
        calls = [asyncio.ensure_future(c.call("echo", "echo", i, timeout=30)) for i in range(3)]
        await run(wait_for, lambda: Client(sw.dirs["a"]).call("zrpcd", "stats", timeout=5)["pending"] == 3)
        refused = sw.refused(monitor)
        sw.to_b()
        await run(sw.a.kill)
        await run(wait_for, lambda: sw.refused(monitor) >= refused + 2 or any(t.done() for t in calls))
        assert not any(t.done() for t in calls), [t.result() if not t.exception() else t.exception()
                                                  for t in calls if t.done()]
        await run(monitor.close)
        got = await asyncio.gather(*calls)
        await c.close()
        return got

    assert asyncio.run(asyncio.wait_for(main(), 60)) == [0, 1, 2]


# ---- Client.close() from another thread ------------------------------------

def test_close_from_another_thread_fails_a_blocked_call(broker, procs, files):
    log, go = files
    procs.spawn([sys.executable, "-c", WORKER])
    wait_registered(broker.socket_dir, "worker")
    call = Call("worker", "slow", 1)  # no timeout
    wait_for(lambda: lines(log) == ["slow 1"], what="the handler to start")
    call.client.close()
    call.join(5)
    assert not call.is_alive(), "close() did not wake the call blocked in another thread"
    assert isinstance(call.error, errors.DisconnectedError) and "closed" in str(call.error), call.error
    with pytest.raises(errors.DisconnectedError):
        call.client.call("zrpcd", "ping", timeout=5)
    open(go, "w").close()


def test_close_from_another_thread_fails_a_call_waiting_to_reconnect(broker, procs, files):
    call = Call("nobody", "f")  # no timeout: waits for the name, then for a broker
    wait_for(lambda: Client().call("zrpcd", "stats", timeout=5)["pending"] == 1, what="the call to wait at the broker")
    broker.kill()
    # Let the client's backoff grow past its first short delays.
    wait_for(lambda: call.client._backoff.attempt >= 8, what="the client to retry a few times")
    call.client.close()
    call.join(5)
    assert not call.is_alive(), "close() did not wake the call reconnecting in another thread"
    assert isinstance(call.error, errors.DisconnectedError) and "closed" in str(call.error), call.error


class ScriptedBroker:
    """A fake broker on ``socket_dir/zrpcd.sock``: welcomes each connection, then acknowledges its
    ``Register``, or, for the connections numbered in ``reset_at`` (counting from 1), closes with
    the ``Register`` unread (the peer's next read fails with ECONNRESET). Closes each acknowledged
    connection in ``drop_after`` right away."""

    def __init__(self, socket_dir, reset_at=(), drop_after=()):
        import socket as _socket
        self.path = os.path.join(socket_dir, _proto.SOCKET_FILE)
        self.listener = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(8)
        self.reset_at, self.drop_after = set(reset_at), set(drop_after)
        self.acked = 0
        self.connections = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        import socket as _socket
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            n = self.connections
            reader = _proto.FrameReader(1 << 20)
            conn.sendall(_proto.encode_frame([_proto.WELCOME, _proto.PROTOCOL_VERSION, n, 1 << 24]))
            done = False
            if n in self.reset_at:
                # Closed with the Register unread: the server's next recv gets ECONNRESET.
                conn.recv(1, _socket.MSG_PEEK)
                conn.close()
                continue
            while not done:
                data = conn.recv(65536)
                if not data:
                    break
                for env, _payload in reader.feed(data):
                    if env[0] != _proto.REGISTER:
                        continue
                    conn.sendall(_proto.encode_frame([_proto.ACK, env[1], None, ""]))
                    self.acked += 1
                    done = n in self.drop_after
            if done:
                conn.close()
            else:
                self.keep = conn

    def close(self):
        self.listener.close()


def test_server_retries_a_connection_reset_while_registering(procs, socket_dir):
    # Connection 1 registers and is dropped; connection 2 is reset at its Register (an OSError
    # in the server, which used to end it); connection 3 registers.
    fake = ScriptedBroker(socket_dir, reset_at={2}, drop_after={1})
    try:
        server = procs.spawn([sys.executable, "-c", ECHO_SERVICE.format(module="server")],
                             env=dict(procs.env, ZRPC_SOCKET_DIR=socket_dir))
        wait_for(lambda: fake.acked >= 2 or server.poll() is not None,
                 what="the server to register again after the reset")
        assert server.poll() is None, server.communicate()[1]
        assert fake.connections >= 3
    finally:
        fake.close()


def test_a_reconnect_handshake_does_not_hold_a_call_past_its_deadline(broker, socket_dir):
    # The broker is replaced by one that accepts and never answers Hello: the call fails at its
    # deadline, not after the 5 s handshake timeout.
    import socket as _socket
    import time
    client = Client(socket_dir)
    assert client.call("zrpcd", "ping", timeout=5) == "pong"
    broker.kill()
    path = os.path.join(socket_dir, _proto.SOCKET_FILE)
    if os.path.exists(path):
        os.unlink(path)
    silent = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    silent.bind(path)
    silent.listen(8)
    try:
        start = time.monotonic()
        with pytest.raises(errors.RPCTimeoutError):
            client.call("zrpcd", "ping", timeout=0.5)
        took = time.monotonic() - start
        assert took < 2.0, "the call took %.2f s" % took
    finally:
        silent.close()
        client.close()


def test_aio_server_registration_is_bounded(socket_dir):
    # A "broker" that takes the connection and says Welcome, then never answers the Register:
    # serve() must fail (ConnectError) within the handshake timeout, not hang.
    import asyncio
    import socket
    from zrpc import aio
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(os.path.join(socket_dir, _proto.SOCKET_FILE))
    listener.listen(1)
    held = []

    def broker():
        conn, _ = listener.accept()
        held.append(conn)
        conn.recv(4096)  # the Hello
        conn.sendall(_proto.encode_frame([_proto.WELCOME, _proto.PROTOCOL_VERSION, 1, 1 << 20, 0]))

    threading.Thread(target=broker, daemon=True).start()

    class Mute(aio.Server):
        @aio.rpc_method
        async def nothing(self):
            return None

    out = []

    def serve():
        try:
            asyncio.run(Mute(name="mute", socket_dir=socket_dir, stop_on_signals=False).serve())
            out.append("returned")
        except errors.ZRPCError as e:
            out.append(e)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    t.join(_proto.HANDSHAKE_TIMEOUT + 10)
    try:
        assert not t.is_alive(), "serve() still waits for the Ack"
        assert isinstance(out[0], errors.ConnectError), out
        assert "did not answer the registration" in str(out[0]), out
    finally:
        for c in held:
            c.close()
        listener.close()


def test_a_no_retry_call_answered_shutdown_may_have_run(procs, socket_dir, files, monkeypatch):
    """A broker stopping (SIGTERM) answers ``Shutdown`` to a ``no_retry`` call it delivered
    and that did not finish within ``--shutdown-grace``: both clients raise
    :class:`errors.ShutdownError` (not resubmitted, not ``DisconnectedError``), although the
    handler ran. So ``Shutdown`` for a ``no_retry`` call says "may or may not have run", as
    for the Rust client (``Error::Shutdown``, ``tests/tests/calls.rs``
    ``broker_sigterm_answers_pending_calls_with_shutdown``) and docs/reliability.md."""
    import asyncio
    from conftest import Broker
    from zrpc import aio
    monkeypatch.setenv("ZRPC_SOCKET_DIR", socket_dir)
    log, go = files
    broker = Broker(procs, socket_dir, ["--shutdown-grace", "0.3"])
    # Two instances: each runs one of the two calls.
    procs.spawn([sys.executable, "-c", WORKER])
    wait_registered(socket_dir, "worker")
    blocking = Call("worker", "slow", 1, timeout=60, no_retry=True)
    wait_for(lambda: lines(log) == ["slow 1"], what="the first handler to start")
    procs.spawn([sys.executable, "-c", WORKER])
    wait_for(lambda: instances(socket_dir, "worker") == 2, what="the second instance")

    async def async_call():
        async with await aio.Client.connect() as c:
            try:
                return await c.call("worker", "slow", 2, timeout=60, no_retry=True)
            except errors.ZRPCError as e:
                return e

    result = {}
    t = threading.Thread(target=lambda: result.update(r=asyncio.run(async_call())), daemon=True)
    t.start()
    wait_for(lambda: lines(log) == ["slow 1", "slow 2"], what="the second handler to start")
    broker.proc.send_signal(signal.SIGTERM)
    t.join(30)
    assert not t.is_alive(), "the async call did not return"
    for got in (blocking.outcome(), result["r"]):
        assert isinstance(got, errors.ShutdownError), repr(got)
        assert got.code == errors.SHUTDOWN and got.service == "worker", repr(got)
    assert broker.proc.wait(timeout=10) == 0
    open(go, "w").close()
    # Each handler ran once: the calls were delivered, and not sent again.
    assert lines(log) == ["slow 1", "slow 2"]


def instances(socket_dir, name):
    """How many instances hold ``name`` (``zrpcd.list``)."""
    with Client(socket_dir) as c:
        return sum(len(row["instances"]) for row in c.call("zrpcd", "list", timeout=5) if row["name"] == name)
