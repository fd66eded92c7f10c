"""Every documented API point of the original zrpc, and zrpc's own options and errors."""

import os
import sys
import textwrap
import time

import pytest

from conftest import service_names, wait_for, wait_registered
from zrpc import errors
from zrpc.client import Client, RPCTimeoutError
from zrpc.server import Server, current_call, rpc_method

SERVICE = textwrap.dedent('''
    import os, sys, time
    from zrpc.server import Server, rpc_method, current_call
    from zrpc import errors

    class MyClass(Server):
        @rpc_method
        def echo(self, payload):
            """Returns its payload."""
            return payload

        @rpc_method
        def sleep(self, seconds):
            time.sleep(seconds)
            return seconds

        @rpc_method
        def fail(self, payload):
            raise ValueError("bad value %r" % (payload,))

        @rpc_method
        def deny(self, payload):
            raise errors.AccessDeniedError("no, not you")

        @rpc_method
        def who(self, payload):
            c = current_call()
            return {"uid": c.caller_uid, "pid": c.caller_pid, "counter": self.counter,
                    "method": c.method, "deadline": c.deadline is not None}

    MyClass(**eval(sys.argv[1] if len(sys.argv) > 1 else "{}")).run()
''')


@pytest.fixture
def my_class(broker, procs):
    """The service above, registered under its derived name ``my_class``."""
    procs.spawn([sys.executable, "-u", "-c", SERVICE])
    wait_registered(broker.socket_dir, "my_class")
    return Client()


def test_name_is_derived_from_the_class_name(my_class):
    assert my_class.call("my_class", "echo", "x", timeout=5) == "x"


def test_explicit_name_and_socket_dir(broker, procs, monkeypatch):
    procs.spawn([sys.executable, "-c", SERVICE, "{'name': 'other_name', 'socket_dir': %r}" % broker.socket_dir])
    monkeypatch.delenv("ZRPC_SOCKET_DIR")
    wait_registered(broker.socket_dir, "other_name")
    c = Client(socket_dir=broker.socket_dir)
    assert c.call(service="other_name", method="echo", payload=[1], timeout=5) == [1]


VALUES = [
    None, True, False, 0, -1, 2**64 - 1, -2**63, 1.5, float("inf"), float("-inf"),
    "", "héllo", b"", b"\x00\xffbytes", [], [1, [2, [3]]], {}, {"a": {"b": [1, b"x"]}},
    {1: "int key"}, "x" * 100_000, b"y" * 1_000_000,
]


# Short ids: pytest puts the id in $PYTEST_CURRENT_TEST, and a 1 MB id makes
# the environment of spawned processes too large (E2BIG).
@pytest.mark.parametrize("value", VALUES, ids=["%s-%d" % (type(v).__name__, i) for i, v in enumerate(VALUES)])
def test_every_msgpack_type_round_trips(my_class, value):
    got = my_class.call("my_class", "echo", value, timeout=10)
    assert got == value and type(got) is type(value)


def test_nan_round_trips(my_class):
    got = my_class.call("my_class", "echo", float("nan"), timeout=5)
    assert got != got


def test_tuples_arrive_as_lists(my_class):
    assert my_class.call("my_class", "echo", (1, "a"), timeout=5) == [1, "a"]


def test_payload_defaults_to_nil(my_class):
    assert my_class.call("my_class", "echo") is None


def test_timeout_raises_rpc_timeout_error(my_class):
    t0 = time.monotonic()
    with pytest.raises(RPCTimeoutError) as e:
        my_class.call("my_class", "sleep", 3, timeout=0.3)
    assert 0.25 < time.monotonic() - t0 < 2.5
    assert e.value.code == errors.TIMEOUT and not e.value.no_service
    # The service is free again after the 3 s sleep, and the client still works.
    assert my_class.call("my_class", "echo", 7, timeout=10) == 7


def test_timeout_zero_is_an_immediate_timeout(my_class):
    with pytest.raises(RPCTimeoutError):
        my_class.call("my_class", "echo", 1, timeout=0)


def test_timeout_none_waits_for_the_service(broker, procs):
    """Nobody holds the name yet: the call (timeout=None) waits until the service registers."""
    client = procs.python("from zrpc.client import Client\nprint(Client().call('my_class', 'echo', 'late'))")
    c = Client()
    wait_for(lambda: c.call("zrpcd", "stats", timeout=5)["pending"] == 1, what="the call to wait at the broker")
    procs.spawn([sys.executable, "-c", SERVICE])
    out, err = client.communicate(timeout=20)
    assert out.strip() == "late", err


def test_no_service_timeout_and_no_wait(broker):
    c = Client()
    with pytest.raises(RPCTimeoutError) as e:
        c.call("nobody", "x", timeout=0.2)
    assert e.value.no_service and e.value.code == errors.TIMEOUT_NO_SERVICE
    with pytest.raises(errors.NoSuchServiceError):
        c.call("nobody", "x", no_wait=True)


def test_remote_errors_are_typed(my_class):
    with pytest.raises(errors.RemoteError, match="ValueError: bad value 3"):
        my_class.call("my_class", "fail", 3, timeout=5)
    with pytest.raises(errors.NoSuchMethodError):
        my_class.call("my_class", "nope", timeout=5)
    with pytest.raises(errors.AccessDeniedError, match="no, not you"):
        my_class.call("my_class", "deny", timeout=5)
    with pytest.raises(errors.InvalidNameError):
        my_class.call("bad name", "x")


def test_limit_exceeded_for_an_oversized_payload(procs, socket_dir, monkeypatch):
    from conftest import Broker
    monkeypatch.setenv("ZRPC_SOCKET_DIR", socket_dir)
    Broker(procs, socket_dir, ["--max-message-size", "100000"])
    c = Client()
    with pytest.raises(errors.LimitExceededError):
        c.call("zrpcd", "ping", b"x" * 200_000)
    assert c.call("zrpcd", "ping") == "pong"


def test_unencodable_payload_is_an_encode_error(broker):
    with pytest.raises(errors.EncodeError):
        Client().call("zrpcd", "ping", object())


def test_caller_identity_and_counter(my_class):
    first = my_class.call("my_class", "who", timeout=5)
    second = my_class.call("my_class", "who")
    assert first["uid"] == os.geteuid() and first["pid"] == os.getpid()
    assert first["method"] == "who" and first["deadline"] and not second["deadline"]
    assert second["counter"] == first["counter"] + 1


def test_describe_reports_docstrings(my_class):
    d = my_class.call("my_class", "zrpc.describe", timeout=5)
    assert d["service"] == "my_class"
    echo = next(m for m in d["methods"] if m["name"] == "echo")
    assert echo["doc"] == "Returns its payload." and echo["params"] == [{"name": "payload", "type": "any"}]


def test_broker_builtins(my_class):
    assert my_class.call("zrpcd", "ping") == "pong"
    assert "my_class" in [r["name"] for r in my_class.call("zrpcd", "list")]


def test_name_taken(my_class, broker):
    s = Server(name="my_class")
    with pytest.raises(errors.NameTakenError):
        s.run_once(0)


def test_connect_error_without_broker(socket_dir):
    with pytest.raises(errors.ConnectError, match="is zrpcd running"):
        Client(socket_dir=socket_dir)


class PipeServer(Server):
    @rpc_method
    def ping(self, payload):
        return "pong"


def test_register_unregister_with_a_pipe(broker):
    s = PipeServer()
    assert s.name == "pipe_server"
    r, w = os.pipe()
    seen = []

    def on_read():
        seen.append(os.read(r, 100))

    s.register(r, on_read)
    os.write(w, b"hello")
    assert s.run_once(timeout=5) is True
    assert seen == [b"hello"]
    s.unregister(r)
    os.write(w, b"ignored")
    # Unregistered: the pending bytes are no event any more.
    assert s.run_once(timeout=0.2) is False
    assert seen == [b"hello"]
    assert os.read(r, 100) == b"ignored"
    # A file object works too.
    with os.fdopen(r, "rb", buffering=0) as f:
        s.register(f, lambda: seen.append(f.read(100)))
        os.write(w, b"again")
        assert s.run_once(timeout=5)
        s.unregister(f)
    os.close(w)
    assert seen == [b"hello", b"again"]


def test_run_once_with_timeout_and_no_event(broker):
    s = PipeServer()
    t0 = time.monotonic()
    assert s.run_once(timeout=0.3) is False
    assert 0.28 <= time.monotonic() - t0 < 2
    assert s.connected and "pipe_server" in service_names(broker.socket_dir)


def test_run_once_handles_one_request(broker, procs):
    s = PipeServer()
    s.run_once(0)  # registers
    client = procs.python("from zrpc.client import Client\nprint(Client().call('pipe_server', 'ping', timeout=10))")
    assert s.run_once(timeout=10) is True
    out, _ = client.communicate(timeout=10)
    assert out.strip() == "pong" and s.counter == 1


def test_current_call_is_none_outside_a_handler():
    assert current_call() is None


def test_server_answers_broker_pings(procs, socket_dir, monkeypatch):
    """With a 1 s heartbeat and 2 s timeout, a service that did not answer pings would be dropped."""
    from conftest import Broker
    monkeypatch.setenv("ZRPC_SOCKET_DIR", socket_dir)
    Broker(procs, socket_dir, ["--heartbeat-interval", "0.2", "--heartbeat-timeout", "1"])
    s = PipeServer()
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:
        s.run_once(timeout=0.1)
    c = Client()
    peers = c.call("zrpcd", "peers", timeout=5)
    holder = [p for p in peers if "pipe_server" in p["names"]]
    # Still the first connection: it was never dropped for silence.
    assert len(holder) == 1 and holder[0]["connected_s"] >= 2.4, holder


class Slow(Server):
    @rpc_method
    def slow(self, seconds):
        time.sleep(seconds)
        return seconds


def test_long_handler_still_answers_pings(procs, socket_dir, monkeypatch):
    """A handler running longer than the heartbeat timeout: the keeper thread answers the pings."""
    from conftest import Broker
    monkeypatch.setenv("ZRPC_SOCKET_DIR", socket_dir)
    Broker(procs, socket_dir, ["--heartbeat-interval", "0.2", "--heartbeat-timeout", "1"])
    s = Slow()
    s.run_once(0)
    client = procs.python("from zrpc.client import Client\nprint(Client().call('slow', 'slow', 2.5, timeout=20))")
    assert s.run_once(timeout=10) is True
    out, err = client.communicate(timeout=20)
    assert out.strip() == "2.5", err
    assert s.counter == 1  # ran once: the service was not dropped and the call not re-delivered
    peers = Client().call("zrpcd", "peers", timeout=5)
    holder = [p for p in peers if "slow" in p["names"]]
    assert len(holder) == 1 and holder[0]["connected_s"] >= 2.4, holder
    s.close()


def test_local_safety_timeout_is_rpc_timeout_error(broker):
    """A broker that stops answering (SIGSTOP): the call fails locally at its deadline plus the
    safety margin, with RPCTimeoutError (the documented timeout error), not CancelledError."""
    import signal
    from zrpc import _proto
    c = Client()
    os.kill(broker.proc.pid, signal.SIGSTOP)
    t0 = time.monotonic()
    with pytest.raises(RPCTimeoutError) as e:
        c.call("nobody", "f", timeout=0.3)
    took = time.monotonic() - t0
    assert 0.3 + _proto.SAFETY_MARGIN - 0.05 <= took < 0.3 + _proto.SAFETY_MARGIN + 1.5, took
    assert e.value.code == errors.TIMEOUT and not e.value.no_service
    assert "no answer from zrpcd" in str(e.value)


def test_deadline_is_kept_while_the_broker_is_down(broker):
    """The reconnect backoff (up to 1 s) is cut at the call's deadline."""
    c = Client()
    broker.kill()
    for timeout in (2, 0.3, 0.3, 0.3):
        t0 = time.monotonic()
        with pytest.raises(RPCTimeoutError):
            c.call("nobody", "f", timeout=timeout)
        took = time.monotonic() - t0
        assert timeout - 0.05 <= took < timeout + 0.35, (timeout, took)


def test_maps_with_array_keys_round_trip(my_class):
    """msgpack map keys that are arrays (a Rust map keyed by tuples, say) decode as tuples
    (Python dict keys must be hashable); everything else decodes as before."""
    value = {(1, 2): "a", (3, (4, b"x")): [5, 6], "s": {"t": [7]}, 8: None}
    got = my_class.call("my_class", "echo", value, timeout=5)
    assert got == value and isinstance(got["s"]["t"], list)


def _raw_echo_result(broker, payload: bytes) -> list:
    """The ``Result`` envelope of one ``my_class.echo`` call whose payload bytes are sent as
    they are, on a raw connection (the client would refuse to encode some of them)."""
    from zrpc import _proto
    sock, _w, reader, frames = _proto.connect(broker.socket_dir, _proto.random_id())
    sock.sendall(_proto.call_frame(1, "my_class", "echo", 10_000, 0, payload))
    while not frames:
        frames = reader.feed(sock.recv(65536))
    sock.close()
    env, _ = frames[0]
    return env


def test_maps_with_map_keys_are_a_clear_error(my_class, broker):
    """A map key that is itself a map has no hashable Python form: the service answers
    BadPayload naming the problem; a client gets DecodeError."""
    from zrpc import _proto
    map_keyed = b"\x81\x81\x01\x02\x03"  # {{1: 2}: 3}
    env = _raw_echo_result(broker, map_keyed)
    assert env[:3] == [_proto.RESULT, 1, errors.BAD_PAYLOAD] and "map key" in env[3], env
    with pytest.raises(errors.DecodeError, match="map key"):
        _proto.unpack(map_keyed)
    with pytest.raises(errors.DecodeError, match="map key"):
        _proto.unpack(b"\x81\x91\x81\x01\x02\x03")  # {[{1: 2}]: 3}


def test_map_keys_crafted_to_share_a_hash_are_refused(my_class, broker):
    """Python hashes ints and tuples without a seed: a map whose array keys were crafted
    so that their tuples share a hash made building the dict quadratic (one call of
    60,000 keys held a service's only thread for a minute, its pings unanswered, and the
    broker handed the call on to the next instance). Such a map is refused with
    BadPayload; maps keyed otherwise decode as before."""
    import msgpack
    from conftest import colliding_tuple_keys
    from zrpc import _proto
    keys = colliding_tuple_keys(1000, 5_000)
    # Packed by hand: a dict cannot hold them without the very cost at stake.
    crafted = b"\xde" + len(keys).to_bytes(2, "big") + b"".join(
        msgpack.packb(list(k)) + b"\xc0" for k in keys)
    env = _raw_echo_result(broker, crafted)
    assert env[:3] == [_proto.RESULT, 1, errors.BAD_PAYLOAD] and "same hash" in env[3], env
    with pytest.raises(errors.DecodeError, match="same hash"):
        _proto.unpack(crafted)
    assert my_class.call("my_class", "echo", [1], timeout=5) == [1]
    # Int, tuple and str keys as usual, also many of them.
    many = {i: i for i in range(10_000)}
    assert _proto.unpack(msgpack.packb(many)) == many
    assert _proto.unpack(msgpack.packb({(1, 2): 3, "a": 1})) == {(1, 2): 3, "a": 1}
    assert my_class.call("my_class", "echo", {7: [1, 2]}, timeout=5) == {7: [1, 2]}


@pytest.mark.parametrize("nested", [
    b"\x91" * 50_000 + b"\xc0",  # [[[...nil...]]]: past msgpack's bound
    b"\x81" + b"\x91" * 1000 + b"\xc0\xc0",  # {[[...]]: nil}: the key made hashable
])
def test_values_nested_too_deeply_are_a_clear_error(my_class, broker, nested):
    """A payload nesting arrays 50,000 deep (msgpack's bound), or a map key nesting them
    1,000 deep (past Python's recursion limit when made hashable), is answered BadPayload
    naming the depth, as the Rust services do; the service carries on."""
    from zrpc import _proto
    env = _raw_echo_result(broker, nested)
    assert env[:3] == [_proto.RESULT, 1, errors.BAD_PAYLOAD] and "depth limit" in env[3], env
    with pytest.raises(errors.DecodeError, match="depth limit"):
        _proto.unpack(nested)
    assert my_class.call("my_class", "echo", [1], timeout=5) == [1]
