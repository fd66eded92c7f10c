"""A Python service called by a hostile caller, and a client answered by a
hostile service (red-team pass 8): every call is answered, the service
stays up, and what a caller never reads is never decoded."""

import sys
import textwrap
import time

import pytest

from conftest import wait_registered
from zrpc import _calls, _proto, errors
from zrpc.client import Client

# 1,000 nested one-element arrays: within msgpack's depth limit (1,024), past
# Python's repr (about 1,000), so str() of an exception holding it raises
# RecursionError.
DEEP = b"\x91" * 1000 + b"\xc0"

# `check` raises an exception holding the payload, the common
# `raise ValueError(payload)`; `echo` answers.
SERVICES = {
    "sync": textwrap.dedent('''
        from zrpc.server import Server, rpc_method

        class Victim(Server):
            @rpc_method
            def check(self, payload):
                raise ValueError(payload)

            @rpc_method
            def echo(self, payload):
                return payload

        Victim().run()
    '''),
    "aio": textwrap.dedent('''
        import asyncio
        from zrpc import aio

        class Victim(aio.Server):
            @aio.rpc_method
            def check(self, payload):
                raise ValueError(payload)

            @aio.rpc_method
            async def check_async(self, payload):
                await asyncio.sleep(0)
                raise ValueError(payload)

            @aio.rpc_method
            async def echo(self, payload):
                return payload

        asyncio.run(Victim().serve())
    '''),
}


def raw_call(socket_dir, service, method, payload, timeout_s=10.0):
    """Sends one ``Call`` with ``payload`` as it is (bytes the library would not
    encode) and returns the ``Result``'s code, message and payload."""
    sock, welcome, reader, frames = _proto.connect(socket_dir, _proto.random_id())
    try:
        sock.sendall(_proto.call_frame(1, service, method, int(timeout_s * 1000), 0, payload))
        deadline = time.monotonic() + timeout_s + 5
        while True:
            for env, body in frames:
                if env[0] == _proto.RESULT and env[1] == 1:
                    return env[2], env[3], body
            remaining = deadline - time.monotonic()
            assert remaining > 0, "no Result"
            sock.settimeout(remaining)
            data = sock.recv(65536)
            assert data, "the broker closed the connection"
            frames = reader.feed(data)
    finally:
        sock.close()


@pytest.mark.parametrize("kind,method", [("sync", "check"), ("aio", "check"), ("aio", "check_async")])
def test_an_exception_whose_text_cannot_be_made_is_answered(broker, procs, socket_dir, kind, method):
    service = procs.spawn([sys.executable, "-c", SERVICES[kind]])
    wait_registered(socket_dir, "victim")
    code, message, _ = raw_call(socket_dir, "victim", method, DEEP)
    assert code == errors.REMOTE, (code, message)
    assert message == "ValueError (its text could not be made: RecursionError)", message
    # The service is still up and answers the next caller.
    assert Client().call("victim", "echo", "still here", timeout=10) == "still here"
    assert service.poll() is None


def test_a_payload_that_is_not_one_value_is_decoded_once(monkeypatch):
    # Bad UTF-8, bytes after the value and a value cut short fail the first
    # decode; only a map key the first decode refuses is worth a second one.
    calls = []
    real = _proto.msgpack.unpackb

    def counting(*args, **kw):
        calls.append(kw.get("strict_map_key"))
        return real(*args, **kw)

    monkeypatch.setattr(_proto.msgpack, "unpackb", counting)
    for bad in (b"\xa1\xff", b"\x01\x02", b"\x92\x01", b"\x91" * 1100 + b"\xc0"):
        calls.clear()
        with pytest.raises((ValueError, errors.DecodeError)):
            _proto.unpack(bad)
        assert calls == [True], (bad, calls)
    calls.clear()
    assert _proto.unpack(b"\x81\x01\x02") == {1: 2}
    assert calls == [True, False]


def test_a_large_payload_is_decoded_with_the_collector_paused(monkeypatch):
    import gc
    seen = []
    real = _proto.msgpack.unpackb

    def watching(*args, **kw):
        seen.append(gc.isenabled())
        return real(*args, **kw)

    monkeypatch.setattr(_proto.msgpack, "unpackb", watching)
    assert gc.isenabled()
    big = _proto.pack([[]] * (_proto.GC_PAUSE_MIN + 1))
    assert len(_proto.unpack(big)) == _proto.GC_PAUSE_MIN + 1
    assert _proto.unpack(_proto.pack([1, 2])) == [1, 2]
    assert seen == [False, True]
    assert gc.isenabled(), "the collector is back on"
    with pytest.raises(ValueError):
        _proto.unpack(big + b"\x00")
    assert gc.isenabled(), "the collector is back on after a failed decode"


def test_a_remote_error_value_is_decoded_only_when_read(monkeypatch):
    decoded = []
    real = _proto.unpack

    def counting(data):
        decoded.append(len(data))
        return real(data)

    monkeypatch.setattr(_proto, "unpack", counting)
    table = _calls.CallTable()
    call = table.new("svc", "m", None, None, False, False, 1 << 20)
    env = [_proto.RESULT, call.cid, errors.REMOTE, "boom"]
    table.on_result(env, _proto.pack({"why": "x"}))
    with pytest.raises(errors.RemoteError) as e:
        _calls.result_value(call)
    assert decoded == [], "decoded before anyone read it"
    assert e.value.value == {"why": "x"}
    assert e.value.value == {"why": "x"}
    assert len(decoded) == 1, "decoded once"
    # A value that cannot be decoded reads as None; the message says it all.
    call = table.new("svc", "m", None, None, False, False, 1 << 20)
    table.on_result([_proto.RESULT, call.cid, errors.REMOTE, "boom"], b"\xa1\xff")
    with pytest.raises(errors.RemoteError) as e:
        _calls.result_value(call)
    assert e.value.value is None


def nested_empty_maps(outer: int, inner: int) -> bytes:
    """``outer`` arrays of ``inner`` empty maps each: a byte a value."""
    one = b"\xdc" + inner.to_bytes(2, "big") + b"\x80" * inner
    return b"\xdd" + outer.to_bytes(4, "big") + one * outer


def test_a_payload_of_more_values_than_the_bound_is_refused(monkeypatch):
    monkeypatch.setattr(_proto, "MAX_VALUES", 1000)
    refused = [
        [[]] * 2000,                              # one array past the bound (from its header)
        {str(i): i for i in range(1001)},         # one map past it
        {i: i for i in range(1001)},              # the same, through the second decode
        [[0] * 400, [0] * 400, [0] * 400],        # small containers, too many values in all
        [{str(i): i for i in range(400)}] * 3,    # maps: their values count
        {(i,): [0] * 300 for i in range(4)},      # array keys: the second decode counts too
    ]
    for value in refused:
        data = _proto.pack(value)
        assert len(data) > 1000
        with pytest.raises(errors.DecodeError, match="more than 1000 values"):
            _proto.unpack(data)
    # At the bound, and large payloads of few values, decode.
    assert _proto.unpack(_proto.pack([0] * 999)) == [0] * 999
    assert len(_proto.unpack(_proto.pack({str(i): i for i in range(999)}))) == 999
    # Records: each map and its values count, its keys do not (333 x 3).
    assert len(_proto.unpack(_proto.pack([{"a": i, "b": i} for i in range(333)]))) == 333
    assert _proto.unpack(_proto.pack(b"x" * 100_000)) == b"x" * 100_000
    assert _proto.unpack(_proto.pack(["y" * 5000] * 10)) == ["y" * 5000] * 10
    # No bound.
    monkeypatch.setattr(_proto, "MAX_VALUES", 0)
    assert len(_proto.unpack(_proto.pack([[]] * 2000))) == 2000


def test_a_client_refuses_a_result_of_too_many_values(monkeypatch):
    monkeypatch.setattr(_proto, "MAX_VALUES", 1000)
    table = _calls.CallTable()
    call = table.new("svc", "m", None, None, False, False, 1 << 20)
    table.on_result([_proto.RESULT, call.cid, 0, ""], nested_empty_maps(10, 200))
    with pytest.raises(errors.DecodeError, match="more than 1000 values"):
        _calls.result_value(call)


@pytest.mark.parametrize("env,expected", [(None, 4 << 20), ("5000", 5000), ("0", 0), ("many", 4 << 20)])
def test_the_bound_on_values_comes_from_the_environment(env, expected):
    import os
    import subprocess
    e = dict(os.environ)
    e.pop("ZRPC_MAX_PAYLOAD_VALUES", None)
    if env is not None:
        e["ZRPC_MAX_PAYLOAD_VALUES"] = env
    out = subprocess.run([sys.executable, "-c", "from zrpc import _proto; print(_proto.MAX_VALUES)"],
                         env=e, capture_output=True, text=True, timeout=60, check=True)
    assert int(out.stdout) == expected
    if env == "many":
        assert "ZRPC_MAX_PAYLOAD_VALUES='many' is not a number of values" in out.stderr


def peak_rss_kib(pid: int) -> int:
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


@pytest.mark.parametrize("kind", ["sync", "aio"])
def test_a_service_refuses_an_argument_of_too_many_values(broker, procs, socket_dir, kind):
    service = procs.spawn([sys.executable, "-c", SERVICES[kind]])
    wait_registered(socket_dir, "victim")
    # 15 MiB: 3,840 arrays of 4,095 empty maps, 15.7 million values. Decoded
    # whole it takes 1.1 GB (a process decoding it, peak RSS); refused past
    # the bound (4,194,304 values), 172 MB.
    code, message, _ = raw_call(socket_dir, "victim", "echo", nested_empty_maps(3840, 4095), timeout_s=30)
    assert code == errors.BAD_PAYLOAD, (code, message)
    assert "more than 4194304 values" in message, message
    assert peak_rss_kib(service.pid) < 400 * 1024, peak_rss_kib(service.pid)
    assert Client().call("victim", "echo", "still here", timeout=10) == "still here"
    assert service.poll() is None
