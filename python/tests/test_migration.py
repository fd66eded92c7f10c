"""What code written for the original Python zrpc relies on beyond its README:
the service-name rule, ``zrpc.exceptions``, negative timeouts, the error's text
and ``python -m zrpc``."""

import asyncio
import re
import sys
import textwrap
import time

import pytest

from conftest import wait_registered
from zrpc import _proto, aio, errors
from zrpc.client import Client
from zrpc.server import Server

# The original's zrpc/server.py: name = re.sub('([A-Z]+)', r'_\1', class_name).strip('_').lower()
ORIGINAL_RULE = lambda name: re.sub('([A-Z]+)', r'_\1', name).strip('_').lower()  # noqa: E731

NAMES = [
    ("HTTPServer", "httpserver"),
    ("MyHTTPServer", "my_httpserver"),
    ("TestServer", "test_server"),
    ("XMLRpcThing", "xmlrpc_thing"),
    ("Server2Go", "server2_go"),
    ("A", "a"),
    ("MyClass", "my_class"),
    ("lower", "lower"),
    ("_Private", "private"),
    ("My_Class", "my__class"),
    ("ABC", "abc"),
    ("aBC", "a_bc"),
]


@pytest.mark.parametrize("name,expected", NAMES)
def test_service_name_follows_the_original_rule(name, expected):
    assert _proto.snake_case(name) == expected == ORIGINAL_RULE(name)
    cls = type(name, (Server,), {})
    assert cls().name == expected
    acls = type(name, (aio.Server,), {})
    assert acls().name == expected


def test_service_name_rule_matches_the_original_on_many_names():
    import random
    rng = random.Random(7)
    alphabet = "AaBbXyZz09_"
    for _ in range(5000):
        name = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 10)))
        assert _proto.snake_case(name) == ORIGINAL_RULE(name), name


def test_acronym_class_registers_under_the_original_name(broker):
    class MyHTTPServer(Server):
        pass

    s = MyHTTPServer()
    s.run_once(0)
    try:
        wait_registered(broker.socket_dir, "my_httpserver")
    finally:
        s.close()


SERVICE = textwrap.dedent('''
    import time
    from zrpc.server import Server, rpc_method

    class MyClass(Server):
        @rpc_method
        def echo(self, payload):
            return payload

        @rpc_method
        def boom(self, payload):
            raise ValueError("bad thing %s" % payload)

        @rpc_method
        def slow(self, seconds):
            time.sleep(seconds)
            return "slept %s" % seconds

    MyClass().run()
''')


@pytest.fixture
def my_class(broker, procs):
    procs.python(SERVICE)
    wait_registered(broker.socket_dir, "my_class")
    return Client()


# -- zrpc.exceptions ------------------------------------------------------

def test_exceptions_module_keeps_the_original_hierarchy():
    from zrpc import exceptions as x
    assert issubclass(x.RPCTimeoutError, x.RPCError)
    for name in ("SerializationError", "ConnectError", "RPCError", "RPCTimeoutError"):
        assert issubclass(getattr(x, name), x.ZRPCBaseError), name
    assert not issubclass(x.ConnectError, x.RPCError)
    assert not issubclass(x.SerializationError, x.RPCError)
    assert x.ZRPCBaseError is errors.ZRPCError
    assert x.RPCTimeoutError is errors.RPCTimeoutError
    assert x.ConnectError is errors.ConnectError
    assert issubclass(errors.RemoteError, x.RPCError)
    assert issubclass(errors.EncodeError, x.SerializationError)
    assert issubclass(errors.DecodeError, x.SerializationError)
    # Every error zrpc defines is a ZRPCBaseError.
    for obj in vars(errors).values():
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, x.ZRPCBaseError), obj
    # The original's classes can still be raised and caught by user code.
    with pytest.raises(x.RPCError, match="mine"):
        raise x.RPCError("mine")


def test_except_rpc_error_catches_a_timeout(my_class):
    from zrpc.exceptions import RPCError, RPCTimeoutError
    try:
        my_class.call("my_class", "slow", 1, timeout=0.2)
    except RPCError as e:
        assert isinstance(e, RPCTimeoutError)
    else:
        pytest.fail("no timeout")


def test_except_rpc_error_catches_a_handler_exception(my_class):
    from zrpc.exceptions import RPCError, RPCTimeoutError, ZRPCBaseError
    try:
        my_class.call("my_class", "boom", 1, timeout=5)
    except RPCError as e:
        assert isinstance(e, errors.RemoteError) and isinstance(e, ZRPCBaseError)
        assert not isinstance(e, RPCTimeoutError)
    else:
        pytest.fail("no error")
    # A method the service lacks (the original's handler-less call failed as RPCError too).
    with pytest.raises(RPCError):
        my_class.call("my_class", "nope", timeout=5)


def test_original_client_code_runs_unchanged(my_class, procs):
    code = textwrap.dedent('''
        from zrpc.client import Client
        from zrpc.exceptions import RPCTimeoutError, RPCError

        client = Client()
        for method, payload, timeout in [("echo", 1, 5), ("boom", 2, 5), ("slow", 2, 0.2)]:
            try:
                print("ok", client.call("my_class", method, payload, timeout=timeout))
            except RPCTimeoutError:
                print("timeout")
            except RPCError as e:
                print("error", e.remote_message)
    ''')
    p = procs.python(code)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert out.splitlines() == ["ok 1", "error ValueError: bad thing 2", "timeout"], (out, err)


def test_zrpc_base_error_catches_connect_and_serialization_errors(socket_dir, broker):
    from zrpc.exceptions import ConnectError, SerializationError, ZRPCBaseError
    import tempfile
    empty = tempfile.mkdtemp(prefix="zrpc-py-empty-")
    with pytest.raises(ConnectError):
        Client(socket_dir=empty)
    with pytest.raises(ZRPCBaseError):
        Client(socket_dir=empty)
    c = Client()
    with pytest.raises(SerializationError) as e:
        c.call("zrpcd", "ping", object())
    assert isinstance(e.value, errors.EncodeError) and isinstance(e.value, ZRPCBaseError)
    with pytest.raises(SerializationError) as e:
        _proto.unpack(b"\x81\x81\x01\x02\x03")  # {{1: 2}: 3}: a map key that is a map
    assert isinstance(e.value, errors.DecodeError)
    with pytest.raises(ZRPCBaseError):
        c.call("bad name", "x")


# -- negative timeouts ------------------------------------------------------

def test_run_once_with_a_negative_timeout_waits_for_an_event(broker):
    # The original's run_once(timeout<0) polled without a bound (zmq).
    import os
    import threading

    class Waiter(Server):
        pass

    s = Waiter()
    r, w = os.pipe()
    s.register(r, lambda: os.read(r, 1))
    out = {}

    def run():
        out["handled"] = s.run_once(timeout=-1)
        out["at"] = time.monotonic()

    t = threading.Thread(target=run)
    t.start()
    time.sleep(0.2)  # the behaviour under test: nothing happens for a while
    written = time.monotonic()
    os.write(w, b"x")
    t.join(10)
    assert not t.is_alive()
    assert out["handled"] is True
    assert out["at"] >= written, "run_once(-1) returned before the event"
    os.close(r)
    os.close(w)


def test_negative_timeout_waits_indefinitely(my_class):
    t0 = time.monotonic()
    assert my_class.call("my_class", "slow", 0.3, timeout=-1) == "slept 0.3"
    assert time.monotonic() - t0 >= 0.28


def test_negative_timeout_waits_indefinitely_asyncio(my_class):
    async def main():
        c = await aio.Client.connect()
        try:
            return await c.call("my_class", "slow", 0.3, timeout=-1)
        finally:
            await c.close()

    t0 = time.monotonic()
    assert asyncio.run(asyncio.wait_for(main(), 30)) == "slept 0.3"
    assert time.monotonic() - t0 >= 0.28


# -- the error's text -------------------------------------------------------

def test_remote_message_is_the_original_text(my_class):
    with pytest.raises(errors.RemoteError) as e:
        my_class.call("my_class", "boom", 1, timeout=5)
    assert e.value.remote_message == "ValueError: bad thing 1"
    assert str(e.value) == "my_class.boom: ValueError: bad thing 1 (Remote)"
    assert errors.ZRPCError("local").remote_message is None


# -- python -m zrpc ---------------------------------------------------------

def run_cli(procs, *args):
    p = procs.spawn([sys.executable, "-m", "zrpc"] + list(args))
    out, err = p.communicate(timeout=30)
    return p.returncode, out, err


def test_cli_calls_with_a_python_literal(my_class, procs):
    code, out, err = run_cli(procs, "my_class", "echo", "{'a': (1, 2.5), 'b': b'x', 'c': None}")
    assert code == 0, err
    assert out == "{'a': [1, 2.5], 'b': b'x', 'c': None}\n"
    code, out, err = run_cli(procs, "my_class", "echo")
    assert (code, out) == (0, "None\n"), err
    code, out, err = run_cli(procs, "-d", "my_class", "slow", "0.3")
    assert (code, out) == (0, "slept 0.3\n"), err


def test_cli_logs_errors(my_class, procs):
    code, out, err = run_cli(procs, "my_class", "boom", "1")
    assert (code, out) == (1, "") and "ERROR:root:ValueError: bad thing 1\n" in err, err
    # As the original: a payload that is not a Python literal is argparse's error (a bare name)
    # or a logged one (a syntax error, raised through argparse).
    code, out, err = run_cli(procs, "my_class", "echo", "foo")
    assert code == 2 and "invalid literal_eval value: 'foo'" in err, err
    code, out, err = run_cli(procs, "my_class", "echo", "not a literal")
    assert code == 1 and "ERROR:root:" in err, err


def test_cli_escapes_what_could_drive_the_terminal(my_class, procs):
    hostile = "\x1b]0;owned\x07\x1b[2J\rzrpc \u202e ok\nline two"
    code, out, err = run_cli(procs, "my_class", "echo", repr(hostile))
    assert code == 0, err
    assert out == "\\x1b]0;owned\\x07\\x1b[2J\\rzrpc \\u202e ok\nline two\n", out
    code, out, err = run_cli(procs, "my_class", "boom", repr(hostile))
    assert code == 1 and "\x1b" not in err and "\r" not in err and "\\x1b]0;owned" in err, err
    assert "\\nline two" in err and "\nline two" not in err, err
    # What is not a control is shown as it is (a family emoji: three joined by U+200D).
    family = "\U0001F468\u200d\U0001F469\u200d\U0001F467 \u00a0x"
    code, out, err = run_cli(procs, "my_class", "echo", repr(family))
    assert (code, out) == (0, family + "\n"), (out, err)


def test_cli_without_broker(procs, socket_dir):
    code, out, err = run_cli(procs, "my_class", "echo", "1")
    assert code == 1 and "ERROR:root:" in err and "is zrpcd running" in err, err
