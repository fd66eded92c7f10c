"""The asyncio client and server against a real zrpcd."""

import asyncio
import os
import sys
import textwrap
import time

import pytest

from conftest import outstanding, wait_for, wait_registered
from zrpc import aio, errors
from zrpc.client import Client

ASYNC_SERVICE = textwrap.dedent('''
    import asyncio, os
    from zrpc import aio

    class Sleeper(aio.Server):
        @aio.rpc_method
        async def sleep(self, seconds):
            """Sleeps, then returns its argument."""
            log = os.environ.get("LOG")
            try:
                await asyncio.sleep(seconds)
            except asyncio.CancelledError:
                if log:
                    with open(log, "a") as f:
                        f.write("cancelled %s\\n" % seconds)
                raise
            if log:
                with open(log, "a") as f:
                    f.write("slept %s\\n" % seconds)
            return seconds

        @aio.rpc_method
        def echo(self, payload):
            return payload

        @aio.rpc_method
        async def fail(self, payload):
            raise KeyError(payload)

    Sleeper().run()
''')


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


@pytest.fixture
def sleeper(broker, procs, socket_dir):
    log = os.path.join(socket_dir, "log")
    open(log, "w").close()
    procs.spawn([sys.executable, "-c", ASYNC_SERVICE], env=dict(procs.env, LOG=log))
    wait_registered(broker.socket_dir, "sleeper")
    return log


def read(path):
    with open(path) as f:
        return f.read().splitlines()


def test_ten_concurrent_async_calls(sleeper):
    async def main():
        async with await aio.Client.connect() as c:
            t0 = time.monotonic()
            got = await asyncio.gather(*[c.call("sleeper", "sleep", 0.5, timeout=10) for _ in range(10)])
            return got, time.monotonic() - t0

    got, took = run(main())
    assert got == [0.5] * 10
    # Concurrent in the server too: ten 0.5 s sleeps take about 0.5 s, not 5 s.
    assert took < 2.5, took


def test_async_errors_and_types(sleeper):
    async def main():
        c = await aio.Client.connect()
        try:
            assert await c.call("sleeper", "echo", {"b": b"\x00", "i": float("-inf")}) == {"b": b"\x00", "i": float("-inf")}
            with pytest.raises(errors.RemoteError, match="KeyError"):
                await c.call("sleeper", "fail", "k")
            with pytest.raises(errors.RPCTimeoutError):
                await c.call("sleeper", "sleep", 5, timeout=0.2)
            with pytest.raises(errors.NoSuchServiceError):
                await c.call("nobody", "x", no_wait=True)
            d = await c.call("sleeper", "zrpc.describe")
            assert {"name": "sleep", "doc": "Sleeps, then returns its argument.",
                    "params": [{"name": "seconds", "type": "any"}], "returns": "any"} in d["methods"]
        finally:
            await c.close()

    run(main())


def test_broker_cancel_cancels_the_async_handler(sleeper):
    with pytest.raises(errors.RPCTimeoutError):
        Client().call("sleeper", "sleep", 30, timeout=0.3)
    wait_for(lambda: read(sleeper) == ["cancelled 30"], what="the handler to be cancelled")


def test_cancelling_the_caller_task_cancels_the_call(sleeper, socket_dir):
    async def main():
        c = await aio.Client.connect()
        task = asyncio.ensure_future(c.call("sleeper", "sleep", 20))
        await asyncio.get_running_loop().run_in_executor(
            None, wait_for, lambda: outstanding(socket_dir, "sleeper") == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The broker passes the Cancel to the service.
        deadline = time.monotonic() + 20
        while read(sleeper) != ["cancelled 20"]:
            assert time.monotonic() < deadline, f"the handler was not cancelled: {read(sleeper)}"
            await asyncio.sleep(0.01)
        assert await c.call("sleeper", "echo", 1) == 1
        await c.close()

    run(main())


def test_async_client_resubmits_after_broker_restart(broker, procs, socket_dir):
    log = os.path.join(socket_dir, "log")
    open(log, "w").close()
    procs.spawn([sys.executable, "-c", ASYNC_SERVICE], env=dict(procs.env, LOG=log))
    wait_registered(broker.socket_dir, "sleeper")

    async def main():
        c = await aio.Client.connect()
        calls = [asyncio.ensure_future(c.call("sleeper", "sleep", 1.0, timeout=30)) for _ in range(3)]
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, wait_for, lambda: outstanding(socket_dir, "sleeper") == 3)
        await loop.run_in_executor(None, broker.restart)
        got = await asyncio.gather(*calls)
        await c.close()
        return got

    assert run(main()) == [1.0, 1.0, 1.0]
    # Each call ran once: the re-sent ones waited for (or were answered from) the first execution.
    assert read(log) == ["slept 1.0"] * 3


def test_async_server_register_and_counter(broker):
    class Counter(aio.Server):
        @aio.rpc_method
        async def count(self, payload):
            return self.counter

    async def main():
        s = Counter()
        r, w = os.pipe()
        serving = asyncio.ensure_future(s.serve())
        await s.registered.wait()
        got = asyncio.get_running_loop().create_future()
        s.register(r, lambda: got.set_result(os.read(r, 10)))
        os.write(w, b"ping")
        assert await got == b"ping"
        s.unregister(r)
        c = await aio.Client.connect()
        assert [await c.call("counter", "count") for _ in range(3)] == [1, 2, 3]
        await c.close()
        serving.cancel()
        os.close(r)
        os.close(w)

    run(main())


def test_async_server_served_again_in_another_loop(broker):
    """A server served in one ``asyncio.run`` and then in another: ``registered`` works in
    both (an asyncio.Event is bound to the loop that first waits on it)."""
    class Again(aio.Server):
        @aio.rpc_method
        async def ping(self, payload):
            return "pong"

    s = Again()

    async def once():
        serving = asyncio.ensure_future(s.serve())
        await asyncio.wait_for(s.registered.wait(), 10)
        c = await aio.Client.connect()
        assert await c.call("again", "ping", timeout=5) == "pong"
        await c.close()
        serving.cancel()
        try:
            await serving
        except asyncio.CancelledError:
            pass

    run(once())
    run(once())


def test_async_local_safety_timeout_is_rpc_timeout_error(broker):
    """A broker that stops answering (SIGSTOP): the call fails locally at its deadline plus the
    safety margin, with RPCTimeoutError (the documented timeout error), not CancelledError."""
    import signal
    from zrpc import _proto

    async def main():
        c = await aio.Client.connect()
        os.kill(broker.proc.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        try:
            with pytest.raises(errors.RPCTimeoutError) as e:
                await c.call("nobody", "f", timeout=0.3)
        finally:
            await c.close()
        return e.value, time.monotonic() - t0

    err, took = run(main())
    assert 0.3 + _proto.SAFETY_MARGIN - 0.05 <= took < 0.3 + _proto.SAFETY_MARGIN + 1.5, took
    assert err.code == errors.TIMEOUT and "no answer from zrpcd" in str(err)


def test_async_deadline_is_kept_while_the_broker_is_down(broker):
    """The reconnect backoff (up to 1 s) is cut at the earliest deadline of the waiting calls:
    a call fails with RPCTimeoutError at its deadline, not up to a backoff delay later."""
    async def main():
        c = await aio.Client.connect()
        await asyncio.get_running_loop().run_in_executor(None, broker.kill)
        took = []
        # The first call lets the backoff grow to its longest delays.
        for timeout in (2, 0.3, 0.3, 0.3):
            t0 = time.monotonic()
            with pytest.raises(errors.RPCTimeoutError):
                await c.call("nobody", "f", timeout=timeout)
            took.append((timeout, time.monotonic() - t0))
        await c.close()
        return took

    for timeout, took in run(main()):
        assert timeout - 0.05 <= took < timeout + 0.35, (timeout, took)
