"""The graceful stop of the blocking and the asyncio server, with real processes and real
signals: SIGTERM releases the name and answers what was delivered, the drain timeout and a
second signal end it at once, ``stop_on_signals=False`` keeps the signals' default action,
and ``shutdown()`` stops ``run()``/``serve()`` from another thread or task."""

import asyncio
import os
import signal
import sys
import textwrap
import threading

import pytest

from conftest import Call, lines, outstanding, service_names, wait_for, wait_registered
from zrpc import aio, errors, server
from zrpc.client import Client

# A service whose `slow` appends "slow <payload> <pid>" to $LOG, then waits (up to 30 s) for
# the file $GO; `work` answers at once. Constructor keywords come from argv[1]; "run returned"
# is printed when run() returns.
COMMON = '''
import os, sys, time

def note(line):
    with open(os.environ["LOG"], "a") as f:
        f.write(line + "\\n")

def answer(payload):
    return {"done": payload, "pid": os.getpid()}
'''

SERVICES = {
    "server": COMMON + textwrap.dedent('''
        from zrpc.server import Server, rpc_method

        class Stopper(Server):
            @rpc_method
            def slow(self, payload):
                note("slow %s %d" % (payload, os.getpid()))
                deadline = time.monotonic() + 30
                while not os.path.exists(os.environ["GO"]) and time.monotonic() < deadline:
                    time.sleep(0.01)
                return answer(payload)

            @rpc_method
            def work(self, payload):
                note("work %s %d" % (payload, os.getpid()))
                return answer(payload)

        Stopper(**eval(sys.argv[1] if len(sys.argv) > 1 else "{}")).run()
        print("run returned", flush=True)
    '''),
    "aio": COMMON + textwrap.dedent('''
        import asyncio
        from zrpc import aio

        class Stopper(aio.Server):
            @aio.rpc_method
            async def slow(self, payload):
                note("slow %s %d" % (payload, os.getpid()))
                deadline = time.monotonic() + 30
                while not os.path.exists(os.environ["GO"]) and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                return answer(payload)

            @aio.rpc_method
            async def work(self, payload):
                note("work %s %d" % (payload, os.getpid()))
                return answer(payload)

        Stopper(**eval(sys.argv[1] if len(sys.argv) > 1 else "{}")).run()
        print("run returned", flush=True)
    '''),
}

MODULES = ["server", "aio"]
# Far below the 30 s a `slow` handler waits: a stop that waited for it would miss this bound.
PROMPT = 10


def start(procs, module, **kw):
    """Starts the service (``Stopper``, registered as ``stopper``) and waits for it."""
    p = procs.spawn([sys.executable, "-c", SERVICES[module], repr(kw)])
    wait_for(lambda: p.pid in holders(p) or p.poll() is not None, what="the service to register")
    assert p.poll() is None, p.communicate()
    return p


def holders(p):
    """Pids of the connections that hold ``stopper``."""
    with Client() as c:
        return [q.get("pid") for q in c.call("zrpcd", "peers", timeout=5) if "stopper" in q["names"]]


def exit_status(p, timeout=PROMPT):
    """Waits (bounded) for ``p`` to exit; returns its code and its stdout and stderr."""
    try:
        out, err = p.communicate(timeout=timeout)
    except Exception:
        raise AssertionError("the service did not exit within %s s" % timeout)
    return p.returncode, out, err


def waiting_for_a_service():
    """Calls the broker holds that were not delivered (pending calls less the outstanding ones)."""
    with Client() as c:
        pending = c.call("zrpcd", "stats", timeout=5)["pending"]
        return pending - sum(p["outstanding"] for p in c.call("zrpcd", "peers", timeout=5))


@pytest.mark.parametrize("module", MODULES)
def test_sigterm_answers_what_was_delivered_and_releases_the_name(broker, procs, files, module):
    log, go = files
    a = start(procs, module)
    # Two calls delivered to A: the first one running, the second queued (blocking server)
    # or running too (asyncio). With no_retry, a call cut off by the stop fails with ServiceGone.
    first = Call("stopper", "slow", 1, timeout=60, no_retry=True)
    wait_for(lambda: "slow 1 %d" % a.pid in lines(log), what="the handler to start")
    second = Call("stopper", "slow", 2, timeout=60, no_retry=True)
    wait_for(lambda: outstanding(broker.socket_dir, "stopper") == 2, what="the second call to be delivered")

    os.kill(a.pid, signal.SIGTERM)
    # The name is released while the handler still runs, and a new call waits for the next instance.
    wait_for(lambda: "stopper" not in service_names(broker.socket_dir), what="the name to be released")
    later = Call("stopper", "work", "later", timeout=60)
    wait_for(lambda: waiting_for_a_service() == 1, what="the later call to wait at the broker")
    assert a.poll() is None, "the service did not wait for its calls"

    open(go, "w").close()
    assert first.outcome() == {"done": 1, "pid": a.pid}
    assert second.outcome() == {"done": 2, "pid": a.pid}
    code, out, err = exit_status(a)
    assert code == 0, err
    assert out == "run returned\n"
    assert later.is_alive(), later.outcome()

    b = start(procs, module)
    assert later.outcome() == {"done": "later", "pid": b.pid}
    assert lines(log) == ["slow 1 %d" % a.pid, "slow 2 %d" % a.pid, "work later %d" % b.pid]


@pytest.mark.parametrize("module", MODULES)
def test_sigint_stops_an_idle_service(broker, procs, files, module):
    a = start(procs, module)
    os.kill(a.pid, signal.SIGINT)
    code, out, err = exit_status(a)
    assert (code, out) == (0, "run returned\n"), err
    assert "stopper" not in service_names(broker.socket_dir)


@pytest.mark.parametrize("module", MODULES)
def test_without_stop_on_signals_sigterm_kills(broker, procs, files, module):
    """The baseline the graceful stop is compared to: the call is cut off."""
    log, _ = files
    a = start(procs, module, stop_on_signals=False)
    call = Call("stopper", "slow", 1, timeout=60, no_retry=True)
    wait_for(lambda: "slow 1 %d" % a.pid in lines(log), what="the handler to start")
    os.kill(a.pid, signal.SIGTERM)
    assert exit_status(a)[0] == -signal.SIGTERM
    assert isinstance(call.outcome(), errors.ServiceGoneError), call.outcome()


@pytest.mark.parametrize("module", MODULES)
def test_drain_timeout_ends_the_stop(broker, procs, files, module):
    log, _ = files
    a = start(procs, module, drain_timeout=0.5)
    call = Call("stopper", "slow", 1, timeout=60, no_retry=True)
    wait_for(lambda: "slow 1 %d" % a.pid in lines(log), what="the handler to start")
    os.kill(a.pid, signal.SIGTERM)
    # The handler would run 30 s more: the stop gives it up after 0.5 s.
    code, out, err = exit_status(a)
    assert (code, out) == (0, "run returned\n"), err
    assert "drain timeout" in err
    assert isinstance(call.outcome(), errors.ServiceGoneError), call.outcome()


@pytest.mark.parametrize("module", MODULES)
def test_second_signal_stops_at_once(broker, procs, files, module):
    log, go = files
    a = start(procs, module)
    call = Call("stopper", "slow", 1, timeout=60)  # re-delivered when A gives it up
    wait_for(lambda: "slow 1 %d" % a.pid in lines(log), what="the handler to start")
    os.kill(a.pid, signal.SIGTERM)
    wait_for(lambda: "stopper" not in service_names(broker.socket_dir), what="the name to be released")
    os.kill(a.pid, signal.SIGTERM)
    code, out, err = exit_status(a)
    assert (code, out) == (0, "run returned\n"), err
    assert "second stop request" in err
    # The broker re-delivers the call to the next instance.
    b = start(procs, module)
    wait_for(lambda: "slow 1 %d" % b.pid in lines(log), what="the call to be re-delivered")
    open(go, "w").close()
    assert call.outcome() == {"done": 1, "pid": b.pid}


@pytest.mark.parametrize("module", MODULES)
def test_connection_lost_during_the_stop_is_not_set_up_again(broker, procs, files, module):
    log, _ = files
    a = start(procs, module)
    call = Call("stopper", "slow", 1, timeout=60, no_retry=True)
    wait_for(lambda: "slow 1 %d" % a.pid in lines(log), what="the handler to start")
    os.kill(a.pid, signal.SIGTERM)
    wait_for(lambda: "stopper" not in service_names(broker.socket_dir), what="the name to be released")
    broker.restart()
    # Not connected again (the name is not registered at the new broker): the stop ends.
    code, out, err = exit_status(a)
    assert (code, out) == (0, "run returned\n"), err
    assert "lost the zrpcd connection while stopping" in err
    assert "stopper" not in service_names(broker.socket_dir)
    assert isinstance(call.outcome(), errors.DisconnectedError), call.outcome()


class Gate(server.Server):
    """An in-process blocking service whose ``hold`` waits for ``release``."""

    def __init__(self, **kw):
        super().__init__(name="gate", **kw)
        self.started = threading.Event()
        self.release = threading.Event()

    @server.rpc_method
    def hold(self, payload):
        self.started.set()
        self.release.wait(30)
        return payload


def test_shutdown_from_another_thread_stops_run(broker):
    s = Gate()
    runner = threading.Thread(target=s.run, daemon=True)  # not the main thread: no signal handlers
    runner.start()
    try:
        wait_registered(broker.socket_dir, "gate")
        call = Call("gate", "hold", "held", timeout=60, no_retry=True)
        assert s.started.wait(10)
        s.shutdown()
        wait_for(lambda: "gate" not in service_names(broker.socket_dir), what="the name to be released")
        assert runner.is_alive()
        s.release.set()
        assert call.outcome() == "held"
        runner.join(PROMPT)
        assert not runner.is_alive(), "run() did not return"
        assert not s.connected
        # It can serve again, and stop again.
        runner = threading.Thread(target=s.run, daemon=True)
        runner.start()
        wait_registered(broker.socket_dir, "gate")
        assert Client().call("gate", "hold", "again", timeout=10) == "again"
        s.shutdown()
        runner.join(PROMPT)
        assert not runner.is_alive(), "run() did not return the second time"
    finally:
        s.release.set()
        s.shutdown()
        s.close()


class NotReturned(Exception):
    pass


def test_run_on_the_main_thread_restores_the_signal_handlers(broker):
    def mine(signum, frame):
        pass

    def watchdog(signum, frame):
        raise NotReturned("run() did not return within %s s of shutdown()" % PROMPT)

    s = Gate()
    seen = {}
    returned = threading.Event()
    main = threading.get_ident()

    def stopper():
        wait_registered(broker.socket_dir, "gate")
        seen["during"] = signal.getsignal(signal.SIGTERM)
        try:
            s.shutdown()
        finally:
            # Bounded: a run() that does not return is interrupted (SIGUSR1 raises in it).
            if not returned.wait(PROMPT):
                signal.pthread_kill(main, signal.SIGUSR1)

    previous = signal.signal(signal.SIGTERM, mine)
    previous_usr1 = signal.signal(signal.SIGUSR1, watchdog)
    t = threading.Thread(target=stopper, daemon=True)
    try:
        t.start()
        s.run()
        returned.set()
        t.join(PROMPT)
        assert seen["during"] == s._on_signal
        assert signal.getsignal(signal.SIGTERM) is mine
        assert "gate" not in service_names(broker.socket_dir)
    finally:
        returned.set()
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGUSR1, previous_usr1)
        s.close()


@pytest.mark.parametrize("caller", ["task", "thread"])
def test_aio_shutdown_stops_serve(broker, caller):
    class AsyncGate(aio.Server):
        def __init__(self):
            super().__init__(name="gate", stop_on_signals=False)
            self.started = asyncio.Event()
            self.release = asyncio.Event()

        @aio.rpc_method
        async def hold(self, payload):
            self.started.set()
            await self.release.wait()
            return payload

    def released():
        return "gate" not in service_names(broker.socket_dir)

    async def main():
        loop = asyncio.get_running_loop()
        s = AsyncGate()
        serving = asyncio.ensure_future(s.serve())
        await s.registered.wait()
        c = await aio.Client.connect()
        call = asyncio.ensure_future(c.call("gate", "hold", "held", timeout=60, no_retry=True))
        await asyncio.wait_for(s.started.wait(), 10)
        if caller == "task":
            s.shutdown()
        else:
            await loop.run_in_executor(None, s.shutdown)
        await loop.run_in_executor(None, wait_for, released)
        assert not serving.done()
        s.release.set()
        assert await call == "held"
        await asyncio.wait_for(serving, PROMPT)
        # It can serve again, and stop again.
        serving = asyncio.ensure_future(s.serve())
        await asyncio.wait_for(s.registered.wait(), 10)
        assert await c.call("gate", "hold", "again", timeout=10) == "again"
        s.shutdown()
        await asyncio.wait_for(serving, PROMPT)
        await c.close()

    asyncio.run(asyncio.wait_for(main(), 60))


CAREFUL = COMMON + textwrap.dedent('''
    import asyncio
    from zrpc import aio

    class Stopper(aio.Server):
        @aio.rpc_method
        async def careful(self, payload):
            note("careful %s %d" % (payload, os.getpid()))
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                await asyncio.sleep(0.01)  # a clean-up that awaits
                note("cleaned up %s" % payload)
                raise
            return answer(payload)

    Stopper(drain_timeout=0.5).run()
    note("run returned")
''')


@pytest.mark.parametrize("second_signal", [False, True])
def test_aio_handlers_given_up_finish_their_cancellation_before_serve_returns(broker, procs, files,
                                                                              second_signal):
    """A cancelled handler's clean-up runs before serve() returns (as a blocking handler unwinds
    before run() returns), not cancelled again by asyncio.run() after it."""
    log, _ = files
    a = procs.spawn([sys.executable, "-c", CAREFUL])
    wait_for(lambda: a.pid in holders(a) or a.poll() is not None, what="the service to register")
    call = Call("stopper", "careful", 1, timeout=60, no_retry=True)
    wait_for(lambda: "careful 1 %d" % a.pid in lines(log), what="the handler to start")
    os.kill(a.pid, signal.SIGTERM)
    if second_signal:
        wait_for(lambda: "stopper" not in service_names(broker.socket_dir), what="the name to be released")
        os.kill(a.pid, signal.SIGTERM)
    code, out, err = exit_status(a)
    assert code == 0, err
    assert lines(log) == ["careful 1 %d" % a.pid, "cleaned up 1", "run returned"], err
    assert isinstance(call.outcome(), errors.ServiceGoneError), call.outcome()


def test_aio_cancelled_serve_leaves_the_server_unregistered(broker):
    """serve() cancelled: the connection is closed, `registered` cleared, the handlers cancelled
    and awaited, the signal handlers put back."""
    class AsyncGate(aio.Server):
        def __init__(self):
            super().__init__(name="gate")
            self.started = asyncio.Event()
            self.cleaned = False

        @aio.rpc_method
        async def hold(self, payload):
            self.started.set()
            try:
                await asyncio.sleep(30)
            finally:
                await asyncio.sleep(0)
                self.cleaned = True

    async def main():
        before = signal.getsignal(signal.SIGTERM)
        s = AsyncGate()
        serving = asyncio.ensure_future(s.serve())
        await asyncio.wait_for(s.registered.wait(), 10)
        c = await aio.Client.connect()
        call = asyncio.ensure_future(c.call("gate", "hold", "held", timeout=60, no_retry=True))
        await asyncio.wait_for(s.started.wait(), 10)
        serving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(serving, PROMPT)
        assert not s.registered.is_set()
        assert s.cleaned
        assert signal.getsignal(signal.SIGTERM) is before
        with pytest.raises(errors.ServiceGoneError):
            await asyncio.wait_for(call, PROMPT)
        await c.close()

    asyncio.run(asyncio.wait_for(main(), 60))
