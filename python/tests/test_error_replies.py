"""What a service sends when its handler fails: error replies stay within the broker's
max message size (long messages are truncated, and the reply cache keeps the truncated
outcome), and the broker's own error codes become ``Remote``."""

import os
import sys
import textwrap
import time

import pytest

from conftest import Broker, wait_registered
from zrpc import _calls, _proto, _service, errors
from zrpc.client import Client

# `big` raises an exception whose text is $SIZE characters long (appending a line to
# $LOG each time it runs); `code` raises the zrpc error named by its argument, as a
# handler that lets the error of a nested call escape would.
SERVICE = textwrap.dedent('''
    import os
    from zrpc import errors
    from zrpc.{module} import Server, rpc_method

    class Failing(Server):
        @rpc_method
        def big(self, payload):
            with open(os.environ["LOG"], "a") as f:
                f.write("ran\\n")
            raise ValueError("é" + "x" * int(os.environ["SIZE"]))

        @rpc_method
        def code(self, name):
            cls = getattr(errors, name)
            raise cls("nested call failed: " + name, code=cls.code)

        @rpc_method
        def echo(self, payload):
            return payload

        @rpc_method
        def no_service(self, payload):
            raise errors.RPCTimeoutError("nested call: nobody there", code=errors.TIMEOUT_NO_SERVICE)

    Failing().run()
''')

SERVERS = ["server", "aio"]


def start(procs, socket_dir, module, **env):
    log = os.path.join(socket_dir, "log")
    open(log, "w").close()
    procs.spawn([sys.executable, "-c", SERVICE.format(module=module)],
                env=dict(procs.env, LOG=log, SIZE=str(env.get("SIZE", 10))))
    wait_registered(socket_dir, "failing")
    return log


def lines(path):
    with open(path) as f:
        return f.read().splitlines()


@pytest.mark.parametrize("module", SERVERS)
def test_oversized_error_message_is_truncated_to_fit(procs, socket_dir, monkeypatch, module):
    """An exception text larger than the broker's max message size: the service sends it
    truncated (with a marker) instead of a frame the broker refuses, which used to end the
    service's connection, get the call re-delivered and answered from the reply cache with
    the same oversized frame, over and over until the caller's deadline."""
    limit = 65536
    monkeypatch.setenv("ZRPC_SOCKET_DIR", socket_dir)
    Broker(procs, socket_dir, ["--max-message-size", str(limit)])
    log = start(procs, socket_dir, module, SIZE=100_000)
    c = Client()
    t0 = time.monotonic()
    with pytest.raises(errors.RemoteError) as e:
        c.call("failing", "big", timeout=10)
    assert time.monotonic() - t0 < 5
    msg = e.value.message
    assert "ValueError: éxxx" in msg and _service.TRUNCATED_MARK in msg
    assert len(msg.encode()) < limit
    assert lines(log) == ["ran"]
    stats = c.call("zrpcd", "stats", timeout=5)
    assert stats["redelivered"] == 0 and stats["protocol_errors"] == 0, stats

    # The reply cache holds the truncated outcome: a resubmission (same instance and call id,
    # on new connections) is answered from it, within the limit, without running the handler.
    instance = _proto.random_id()
    answers = []
    for _ in range(2):
        sock, _w, reader, frames = _proto.connect(socket_dir, instance)
        sock.sendall(_proto.call_frame(7, "failing", "big", 10_000, 0, b""))
        while not frames:
            frames = reader.feed(sock.recv(65536))
        env, payload = frames[0]
        assert env[:3] == [_proto.RESULT, 7, errors.REMOTE] and payload == b""
        answers.append(env[3])
        sock.close()
    assert answers[0] == answers[1] and _service.TRUNCATED_MARK in answers[0]
    assert lines(log) == ["ran", "ran"]


@pytest.mark.parametrize("module", SERVERS)
def test_a_value_accepted_as_a_payload_can_be_echoed(procs, socket_dir, monkeypatch, module):
    """A payload that fits in a ``Call`` at the broker's limit fits in the ``Reply`` too: the
    library keeps 16 bytes for a result's envelope, as zrpc-service (it kept 64, longer than a
    ``Call``'s envelope, so an echo close to the limit was answered ``LimitExceeded``)."""
    limit = 65536
    monkeypatch.setenv("ZRPC_SOCKET_DIR", socket_dir)
    Broker(procs, socket_dir, ["--max-message-size", str(limit)])
    start(procs, socket_dir, module)
    # The largest payload the client sends at this limit (it counts the longest Call envelope
    # the two names can make): a bin16 of n bytes.
    n = limit - _calls.CALL_OVERHEAD - len("failing") - len("echo") - 3
    packed = len(_proto.pack(b"x" * n))
    assert limit - 64 < packed <= limit - 16
    assert Client().call("failing", "echo", b"x" * n, timeout=10) == b"x" * n


@pytest.mark.parametrize("module", SERVERS)
def test_error_message_truncated_at_a_tiny_limit(procs, socket_dir, monkeypatch, module):
    """Even a limit smaller than the usual messages: every error reply fits."""
    monkeypatch.setenv("ZRPC_SOCKET_DIR", socket_dir)
    Broker(procs, socket_dir, ["--max-message-size", "300"])
    log = start(procs, socket_dir, module, SIZE=1000)
    c = Client()
    with pytest.raises(errors.RemoteError, match="ValueError: éxx") as e:
        c.call("failing", "big", timeout=10)
    assert e.value.message.endswith(_service.TRUNCATED_MARK + " (Remote)")
    assert lines(log) == ["ran"]
    with pytest.raises(errors.NoSuchMethodError):
        c.call("failing", "nope_" + "y" * 120, timeout=10)


#: The broker's own codes (what they report is the broker's, its connection's or the
#: call's fate, not the service's outcome); ``RPCTimeoutError`` is Timeout.
BROKER_ONLY = ["ShutdownError", "ServiceGoneError", "CancelledError", "ProtocolError",
               "VersionMismatchError", "NoSuchServiceError", "NameTakenError",
               "NotRegisteredError", "InvalidNameError", "RPCTimeoutError"]
#: The codes a service sends.
SERVICE_CODES = ["AccessDeniedError", "LimitExceededError", "BadPayloadError", "NoSuchMethodError",
                 "RemoteError"]


@pytest.mark.parametrize("module", SERVERS)
def test_broker_only_codes_raised_by_a_handler_become_remote(broker, procs, socket_dir, module):
    """A handler that lets a zrpc error with one of the broker's own codes escape (the error of a
    nested call, say) answers Remote with its text: a caller takes Shutdown for a broker going away
    and waits to resend the call (until its deadline, or for ever), TimeoutNoService for a call
    that never ran, and so on. The codes a service may send pass unchanged."""
    start(procs, socket_dir, module)
    c = Client()
    for name in BROKER_ONLY:
        with pytest.raises(errors.RemoteError, match="%s: nested call failed: %s" % (name, name)) as e:
            c.call("failing", "code", name, timeout=10)
        assert e.value.code == errors.REMOTE
    with pytest.raises(errors.RemoteError, match="RPCTimeoutError: nested call: nobody there"):
        c.call("failing", "no_service", timeout=10)
    for name in SERVICE_CODES:
        with pytest.raises(getattr(errors, name), match="nested call failed: %s" % name) as e:
            c.call("failing", "code", name, timeout=10)
        assert e.value.code == getattr(errors, name).code
