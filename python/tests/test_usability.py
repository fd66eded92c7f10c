"""What users moving from the original zrpc run into: an ``aio.Client()`` made with the
plain constructor, ``register()`` of a descriptor epoll cannot watch (and, on the asyncio
server, before the event loop runs), methods without a payload parameter and what
``zrpc.describe`` says of them, the naming rule in ``InvalidNameError``, and a handler
that calls ``sys.exit()``."""

import asyncio
import os
import sys
import textwrap
import time

import pytest

from conftest import wait_registered
from zrpc import aio, errors
from zrpc.client import Client
from zrpc.server import Server, rpc_method

NAME_RULE = ("names are 1-128 bytes of ASCII letters, digits, '_', '-' and '.', "
             "starting with a letter or '_'")


def run(coro, timeout=30):
    return asyncio.run(asyncio.wait_for(coro, timeout))


# -- 1. aio.Client() ----------------------------------------------------------


def test_async_with_aio_client_connects(broker):
    async def main():
        async with aio.Client() as c:
            t0 = time.monotonic()
            got = await c.call("zrpcd", "ping", timeout=1)
            return got, time.monotonic() - t0

    got, took = run(main())
    assert got == "pong" and took < 1, took


def test_async_with_an_already_connected_aio_client_does_not_connect_again(broker):
    async def main():
        c = await aio.Client.connect()
        conn = c._conn
        async with c:
            assert c._conn is conn
            return await c.call("zrpcd", "ping", timeout=1)

    assert run(main()) == "pong"


def test_a_call_on_an_unconnected_aio_client_fails_at_once(broker):
    async def main():
        c = aio.Client()
        try:
            for timeout in (1, None):
                t0 = time.monotonic()
                with pytest.raises(errors.DisconnectedError) as e:
                    # (Without a timeout this used to wait for ever.)
                    await asyncio.wait_for(c.call("zrpcd", "ping", timeout=timeout), 5)
                assert time.monotonic() - t0 < 0.5
                assert "not connected" in str(e.value) and "aio.Client.connect()" in str(e.value)
                assert "async with aio.Client() as c" in str(e.value)
        finally:
            await c.close()

    run(main())


def test_async_with_aio_client_fails_fast_without_a_broker(socket_dir):
    async def main():
        async with aio.Client(socket_dir):
            pass

    with pytest.raises(errors.ConnectError):
        run(main(), 10)


# -- 2. register() of a descriptor epoll cannot watch --------------------------


def _regular_file(socket_dir):
    path = os.path.join(socket_dir, "regular")
    with open(path, "w") as f:
        f.write("x\n")
    return open(path)


def test_register_of_a_regular_file_is_a_clear_error_and_leaves_nothing_behind(broker, socket_dir):
    s = Server(name="fd_user", stop_on_signals=False)
    f = _regular_file(socket_dir)
    r, w = os.pipe()
    try:
        with pytest.raises(errors.NotPollableError, match="regular file") as e:
            s.register(f, lambda: None)
        assert isinstance(e.value, ValueError) and isinstance(e.value.__cause__, PermissionError)
        s.unregister(f)  # documented to ignore unknown descriptors: no KeyError
        with pytest.raises(errors.NotPollableError, match="not an open file descriptor"):
            s.register(f.fileno() + 1000, lambda: None)
        # The server still works, and watches what can be watched.
        seen = []
        s.register(r, lambda: seen.append(os.read(r, 10)))
        os.write(w, b"go")
        assert s.run_once(5) and seen == [b"go"]
    finally:
        f.close()
        s.close()
        os.close(r)
        os.close(w)


def test_aio_register_of_a_regular_file_is_a_clear_error(socket_dir):
    s = aio.Server(name="fd_user", stop_on_signals=False)
    f = _regular_file(socket_dir)
    try:
        with pytest.raises(errors.NotPollableError, match="regular file") as e:
            s.register(f, lambda: None)
        assert isinstance(e.value.__cause__, PermissionError)
        s.unregister(f)
    finally:
        f.close()


# -- 4. aio.Server.register() before the loop runs -------------------------------


class Watcher(aio.Server):
    """Registers a pipe in ``__init__``, with no event loop running."""

    def __init__(self, fd, **kw):
        super().__init__(name="watcher", stop_on_signals=False, **kw)
        self.fd = fd
        self.seen = []
        self.register(fd, self.on_readable)

    def on_readable(self):
        self.seen.append(os.read(self.fd, 10))

    @rpc_method
    async def seen_so_far(self):
        return self.seen


def test_aio_register_before_serve_is_applied_when_serving(broker):
    r, w = os.pipe()
    try:
        s = Watcher(r)
        os.write(w, b"early")

        async def main():
            serving = asyncio.ensure_future(s.serve())
            await asyncio.wait_for(s.registered.wait(), 10)
            async with aio.Client() as c:
                for _ in range(200):
                    if s.seen:
                        break
                    await asyncio.sleep(0.02)
                got = await c.call("watcher", "seen_so_far", timeout=5)
            s.shutdown()
            await serving
            # Kept for the next serve().
            os.write(w, b"again")
            serving = asyncio.ensure_future(s.serve())
            await asyncio.wait_for(s.registered.wait(), 10)
            for _ in range(200):
                if len(s.seen) == 2:
                    break
                await asyncio.sleep(0.02)
            s.unregister(r)
            s.unregister(r)  # unknown: ignored
            s.shutdown()
            await serving
            return got

        assert run(main()) == [b"early"]
        assert s.seen == [b"early", b"again"]
    finally:
        os.close(r)
        os.close(w)


# -- 3. methods without a payload parameter; describe's types ---------------------

NO_PAYLOAD_SERVICE = textwrap.dedent('''
    import sys
    from zrpc import aio
    from zrpc.server import Server, rpc_method

    class NoArg(Server):
        @rpc_method
        def noarg(self):
            """Takes nothing."""
            return "noarg ran %d" % self.counter

        @rpc_method
        def untyped(self, payload):
            return payload

        @rpc_method
        def typed(self, n: int) -> str:
            return str(n)

    class AioNoArg(aio.Server):
        @aio.rpc_method
        async def noarg(self):
            return "async noarg ran"

        @aio.rpc_method
        def plain_noarg(self):
            return "plain noarg ran"

    (AioNoArg if sys.argv[1] == "aio" else NoArg)().run()
''')


def test_a_method_without_a_payload_parameter_is_callable(broker, procs):
    procs.spawn([sys.executable, "-c", NO_PAYLOAD_SERVICE, "blocking"])
    wait_registered(broker.socket_dir, "no_arg")
    c = Client()
    assert c.call("no_arg", "noarg", timeout=5) == "noarg ran 1"
    # A payload sent anyway is ignored, as by a Rust method without parameters.
    assert c.call("no_arg", "noarg", 1, timeout=5) == "noarg ran 2"
    assert c.call("no_arg", "noarg", None, timeout=5) == "noarg ran 3"
    methods = {m["name"]: m for m in c.call("no_arg", "zrpc.describe", timeout=5)["methods"]}
    assert methods["noarg"]["params"] == [] and methods["noarg"]["returns"] == "any"
    assert methods["noarg"]["doc"] == "Takes nothing."
    assert methods["untyped"]["params"] == [{"name": "payload", "type": "any"}]
    assert methods["untyped"]["returns"] == "any"
    assert methods["typed"]["params"] == [{"name": "n", "type": "int"}] and methods["typed"]["returns"] == "str"


def test_a_method_without_a_payload_parameter_does_not_decode_it(broker, procs):
    """Ignored, as by a Rust method without parameters: not even decoded (an undecodable or
    costly payload changes nothing)."""
    from zrpc import _proto
    procs.spawn([sys.executable, "-c", NO_PAYLOAD_SERVICE, "blocking"])
    wait_registered(broker.socket_dir, "no_arg")
    sock, _w, reader, frames = _proto.connect(broker.socket_dir, _proto.random_id())
    try:
        sock.sendall(_proto.call_frame(1, "no_arg", "noarg", 10_000, 0, b"\xc1"))  # not msgpack
        while not frames:
            frames = reader.feed(sock.recv(65536))
    finally:
        sock.close()
    env, payload = frames[0]
    assert env[:3] == [_proto.RESULT, 1, 0], env  # code 0: a value
    assert _proto.unpack(payload) == "noarg ran 1"


def test_an_aio_method_without_a_payload_parameter_is_callable(broker, procs):
    procs.spawn([sys.executable, "-c", NO_PAYLOAD_SERVICE, "aio"])
    wait_registered(broker.socket_dir, "aio_no_arg")
    c = Client()
    assert c.call("aio_no_arg", "noarg", timeout=5) == "async noarg ran"
    assert c.call("aio_no_arg", "plain_noarg", timeout=5) == "plain noarg ran"
    assert c.call("aio_no_arg", "noarg", {"a": 1}, timeout=5) == "async noarg ran"


# -- 5. the naming rule in InvalidNameError -----------------------------------------


def test_invalid_names_state_the_rule(broker):
    c = Client()
    for name, why in [("has space", "' ' is not allowed"), ("x" * 300, "300 bytes long"),
                      ("", "empty"), ("9lives", "starts with '9'")]:
        with pytest.raises(errors.InvalidNameError) as e:
            c.call(name, "m", timeout=1)
        assert why in str(e.value) and NAME_RULE in str(e.value), str(e.value)
        assert len(str(e.value)) < 250  # (the 300-char name is shortened)
        with pytest.raises(errors.InvalidNameError, match="invalid method name") as e:
            c.call("svc", name, timeout=1)
        assert NAME_RULE in str(e.value)
        with pytest.raises(errors.InvalidNameError) as e:
            Server(name=name)
        assert NAME_RULE in str(e.value)


def test_a_trailing_newline_makes_a_name_invalid(broker):
    with pytest.raises(errors.InvalidNameError, match=r"'\\n' is not allowed"):
        Client().call("svc\n", "m", timeout=1)


def test_zrpcd_is_reserved_for_the_broker(broker):
    with pytest.raises(errors.InvalidNameError, match="reserved for the broker"):
        Server(name="zrpcd")
    with pytest.raises(errors.InvalidNameError, match="reserved for the broker"):
        aio.Server(name="zrpcd")
    # Calling it is fine: it is the broker's own service.
    assert Client().call("zrpcd", "ping", timeout=5) == "pong"


# -- 6. a handler raising SystemExit ------------------------------------------------

EXITING_SERVICE = textwrap.dedent('''
    import sys
    from zrpc import aio
    from zrpc.server import Server, rpc_method

    class Quitter(Server):
        @rpc_method
        def quit_now(self, payload):
            sys.exit(3)

    class AioQuitter(aio.Server):
        @aio.rpc_method
        async def quit_now(self, payload):
            sys.exit(3)

        @aio.rpc_method
        def plain_quit(self, payload):
            sys.exit(3)

    (AioQuitter if sys.argv[1] == "aio" else Quitter)().run()
''')


@pytest.mark.parametrize("kind,service,method", [
    ("blocking", "quitter", "quit_now"),
    ("aio", "aio_quitter", "quit_now"),
    ("aio", "aio_quitter", "plain_quit"),
])
def test_a_handler_raising_system_exit_is_logged(broker, procs, kind, service, method):
    p = procs.spawn([sys.executable, "-c", EXITING_SERVICE, kind])
    wait_registered(broker.socket_dir, service)
    with pytest.raises(errors.ServiceGoneError):
        Client().call(service, method, None, timeout=10, no_retry=True)
    assert p.wait(timeout=10) == 3
    err = [line for line in p.stderr.read().splitlines() if line.strip()]
    assert len(err) == 1, err
    assert "%s.%s" % (service, method) in err[0] and "SystemExit(3)" in err[0], err
