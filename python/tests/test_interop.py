"""Python <-> Rust: the Python client calls Rust services (payload conventions
of docs/protocol.md: structs as maps, tuples as arrays, unit and None as nil,
Blob as bin), and the Rust clients call a Python service."""

import os
import sys

import pytest

from conftest import rust_bin, wait_registered
from zrpc import errors
from zrpc.client import Client


@pytest.fixture
def rust_echo(broker, procs):
    """zrpc-test-svc: the Rust service `echo` of the end-to-end tests."""
    procs.spawn([rust_bin("zrpc-test-svc")])
    wait_registered(broker.socket_dir, "echo")
    return Client()


@pytest.fixture
def rust_calc(broker, procs):
    """zrpc-test-typed: the Rust `calc` service (an #[interface] trait)."""
    procs.spawn([rust_bin("zrpc-test-typed")])
    wait_registered(broker.socket_dir, "calc")
    return Client()


def test_struct_is_a_map_with_field_names(rust_echo):
    got = rust_echo.call("echo", "shift", {"x": 1, "y": 2.0, "label": "p", "raw": b"\x01\x02"}, timeout=10)
    assert got == {"x": 2, "y": 3.5, "label": "p", "raw": b"\x01\x02"}


def test_tuple_argument_is_an_array_and_tuple_result_a_list(rust_echo):
    assert rust_echo.call("echo", "record", (41, 0), timeout=10) == [41, 1]
    assert rust_echo.call("echo", "record", [41, 0], timeout=10) == [41, 2]


def test_option_and_unit_are_nil(rust_echo):
    who = rust_echo.call("echo", "whoami", timeout=10)
    assert who == [os.geteuid(), os.getegid(), os.getpid()]


def test_blob_is_bin(rust_echo):
    data = bytes(range(256)) * 10
    got = rust_echo.call("echo", "blob", data, timeout=10)
    assert got == data and isinstance(got, bytes)


def test_all_msgpack_values_through_a_rust_echo(rust_echo):
    value = {"n": None, "t": True, "i": -2**63, "u": 2**64 - 1, "f": 0.25, "inf": float("inf"),
             "ninf": float("-inf"), "s": "é", "b": b"\x00", "l": [1, [2]], "m": {"k": {}}}
    assert rust_echo.call("echo", "echo", value, timeout=10) == value


def test_rust_errors_are_typed(rust_echo):
    with pytest.raises(errors.RemoteError, match="boom"):
        rust_echo.call("echo", "fail", "boom", timeout=10)
    with pytest.raises(errors.RemoteError, match="deliberate panic"):
        rust_echo.call("echo", "panic", timeout=10)
    with pytest.raises(errors.BadPayloadError):
        rust_echo.call("echo", "shift", "not a point", timeout=10)
    with pytest.raises(errors.NoSuchMethodError):
        rust_echo.call("echo", "nope", timeout=10)


def test_rust_interface_service(rust_calc):
    assert rust_calc.call("calc", "add", {"a": 1.5, "b": 2.0}, timeout=10) == 3.5
    assert isinstance(rust_calc.call("calc", "version", timeout=10), str)
    assert rust_calc.call("calc", "bump", timeout=10) is None  # unit is nil
    assert rust_calc.call("calc", "bumps", timeout=10) == 1
    assert rust_calc.call("calc", "double_later", 21, timeout=10) == 42
    with pytest.raises(errors.RemoteError, match="division by zero") as e:
        rust_calc.call("calc", "divide", {"a": 1.0, "b": 0.0}, timeout=10)
    assert e.value.value == "DivisionByZero"  # the error value beside the message
    d = rust_calc.call("calc", "zrpc.describe", timeout=10)
    add = next(m for m in d["methods"] if m["name"] == "add")
    assert add["doc"] == "A struct argument." and add["returns"] == "f64"
    # Shapes: how the argument is encoded, language-neutral.
    assert add["params"] == [{"name": "p", "type": "Pair", "shape": {
        "kind": "struct", "name": "Pair", "fields": [
            {"name": "a", "shape": {"kind": "f64"}},
            {"name": "b", "shape": {"kind": "f64"}}]}}]
    assert add["returns_shape"] == {"kind": "f64"}
    divide = next(m for m in d["methods"] if m["name"] == "divide")
    assert divide["error_shape"] == {"kind": "enum", "name": "CalcError",
                                     "variants": [{"name": "DivisionByZero"}]}


PY_ECHO = '''
from zrpc.server import Server, rpc_method

class Echo(Server):
    @rpc_method
    def echo(self, payload):
        return payload

    @rpc_method
    def pid(self, payload):
        import os
        return os.getpid()

Echo().run()
'''


def test_rust_client_cli_calls_a_python_service(broker, procs):
    """zrpc-test-client (the Rust client of the end-to-end tests) against a Python `echo`."""
    procs.spawn([sys.executable, "-c", PY_ECHO])
    wait_registered(broker.socket_dir, "echo")
    client = procs.spawn([rust_bin("zrpc-test-client"), "--calls", "200", "--concurrency", "8"])
    out, err = client.communicate(timeout=60)
    assert client.returncode == 0 and out.strip() == "ok 200 mismatched 0 failed 0", (out, err)
