"""A peer whose envelope fields have the wrong types (a buggy or foreign "broker") gets the
package's typed errors, never a raw ``TypeError`` from deep inside: the fields are checked
against docs/protocol.md's types as the envelope is decoded (``ProtocolError``: the
connection is dropped as for any bad frame)."""

import asyncio
import contextlib

import pytest

from zrpc import _proto, aio, errors
from zrpc.client import Client
from zrpc.server import Server, rpc_method

from conftest import FakeBroker

WELCOME = _proto.encode_frame([_proto.WELCOME, _proto.PROTOCOL_VERSION, 1, 1 << 20])


class Fake(FakeBroker):
    """A "broker": answers each ``Hello`` with ``welcome``, then sends ``then`` (frames) after
    the peer's next frame (the ``Call`` or the ``Register``)."""

    def __init__(self, socket_dir, welcome=WELCOME, then=()):
        self.welcome_frame = welcome
        self.then = list(then)
        super().__init__(socket_dir)

    def serve(self, conn, n):
        conn.recv(4096)  # the Hello
        conn.sendall(self.welcome_frame)
        if self.then and conn.recv(4096):
            for frame in self.then:
                conn.sendall(frame)


@pytest.fixture
def fake(socket_dir):
    made = []

    def make(**kw):
        made.append(Fake(socket_dir, **kw))
        return made[-1]
    yield make
    for f in made:
        f.close()


BAD_WELCOMES = {
    "max_message_size a string": [_proto.WELCOME, _proto.PROTOCOL_VERSION, 1, "big"],
    "conn_id nil": [_proto.WELCOME, _proto.PROTOCOL_VERSION, None, 1 << 20],
    "conn_id a float": [_proto.WELCOME, _proto.PROTOCOL_VERSION, 1.5, 1 << 20],
}


@pytest.mark.parametrize("bad", list(BAD_WELCOMES))
def test_a_welcome_with_bad_fields_is_a_protocol_error(socket_dir, fake, bad):
    fake(welcome=_proto.encode_frame(BAD_WELCOMES[bad]))
    with pytest.raises(errors.ProtocolError):
        Client(socket_dir, connect_timeout=2)
    with pytest.raises(errors.ProtocolError):
        asyncio.run(aio.Client.connect(socket_dir, connect_timeout=2))


BAD_RESULTS = {
    "id an array": [_proto.RESULT, [1], 0, ""],
    "code a string": [_proto.RESULT, 1, "2", "no"],
    "message an array": [_proto.RESULT, 1, errors.NO_SUCH_SERVICE, ["no"]],
}


@pytest.mark.parametrize("bad", list(BAD_RESULTS))
def test_a_result_with_bad_fields_drops_the_connection_and_the_call_times_out(socket_dir, fake, caplog, bad):
    # The bad frame ends the connection (as any bad frame does); the call is resubmitted to the
    # same bad peer until its deadline: a typed RPCTimeoutError, not a TypeError.
    fake(then=[_proto.encode_frame(BAD_RESULTS[bad])])
    client = Client(socket_dir)
    try:
        with pytest.raises(errors.RPCTimeoutError):
            client.call("svc", "m", timeout=0.5)
    finally:
        client.close()

    async def aio_call():
        c = await aio.Client.connect(socket_dir)
        try:
            await c.call("svc", "m", timeout=0.5)
        finally:
            await c.close()
    with pytest.raises(errors.RPCTimeoutError):
        asyncio.run(aio_call())
    assert "data_received() call failed" not in caplog.text


class Echo(Server):
    @rpc_method
    def m(self, payload):
        return payload


class AioEcho(aio.Server):
    @rpc_method
    async def m(self, payload):
        return payload


BAD_REQUESTS = {
    "timeout_ms a string": [_proto.REQUEST, 1, "echo", "m", "soon", 1, 1, 0, 0, 0],
    "caller_instance a string": [_proto.REQUEST, 1, "echo", "m", None, "me", 1, 0, 0, 0],
    "method an integer": [_proto.REQUEST, 1, "echo", 3, None, 1, 1, 0, 0, 0],
}


@pytest.mark.parametrize("bad", list(BAD_REQUESTS))
def test_a_request_with_bad_fields_is_a_protocol_error_not_a_type_error(socket_dir, fake, caplog, bad):
    # The Request comes with the Ack of the first registration: the first connection fails
    # with ProtocolError (or, read apart, the connection is dropped and set up again, as for
    # any bad frame); the blocking server ended with a TypeError.
    fake(then=[_proto.encode_frame([_proto.ACK, 1, 0, ""]), _proto.encode_frame(BAD_REQUESTS[bad])])
    server = Echo(name="echo", socket_dir=socket_dir, stop_on_signals=False)
    try:
        with contextlib.suppress(errors.ProtocolError):
            assert server.run_once(0.5) is False
    finally:
        server.close()

    async def aio_serve():
        s = AioEcho(name="echo", socket_dir=socket_dir, stop_on_signals=False)
        task = asyncio.ensure_future(s.serve())
        await asyncio.wait([task], timeout=0.5)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, errors.ZRPCError):
            await task
    asyncio.run(aio_serve())
    assert "data_received() call failed" not in caplog.text
