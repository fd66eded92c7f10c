"""The asyncio client and server.

Example::

    import asyncio
    from zrpc import aio

    class Echo(aio.Server):
        @aio.rpc_method
        async def echo(self, payload):
            return payload

    async def main():
        client = await aio.Client.connect()
        print(await client.call('echo', 'echo', [1, 2], timeout=5))

Many calls may be in flight on one :class:`Client`. The client reconnects
after a lost connection and resubmits its pending calls (same instance, same
ids, remaining budget). The :class:`Server` runs each request's handler as a
task (``async def`` handlers run concurrently; plain functions run in the
event loop), cancels the task on the broker's ``Cancel``, answers pings and
``zrpc.describe``, and keeps the same reply cache as :mod:`zrpc.server`: a
re-sent call is answered from it, and a re-sent call that arrives while the
first execution still runs waits for that execution's outcome. The server
stops gracefully on SIGTERM, SIGINT or :meth:`Server.shutdown` (see
:meth:`Server.serve`).
"""

import asyncio
import signal
import socket
import threading
import time
from typing import Any, Callable, Dict, List, Optional

from . import _proto, _service, errors
from ._service import CallInfo, current_call, rpc_method

__all__ = ["Client", "Server", "rpc_method", "current_call", "CallInfo"]


class _Conn(asyncio.Protocol):
    """One connection to the broker: frames in (``on_frames(conn, frames)``), bytes out (``send``)."""

    def __init__(self, reader: _proto.FrameReader, on_frames: Callable[[list], None]):
        self.reader = reader
        self.on_frames = on_frames
        self.transport: Optional[asyncio.Transport] = None
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.reader.feed(data)
        except errors.ZRPCError as e:
            self.abort(str(e))
            return
        if frames:
            self.on_frames(self, frames)

    def connection_lost(self, exc) -> None:
        if not self.closed.done():
            self.closed.set_result("the broker closed the connection" if exc is None else "connection error: %s" % exc)

    def send(self, frame: bytes) -> None:
        """Queues ``frame`` for writing (dropped once the connection is closed)."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame)

    def abort(self, why: str) -> None:
        """Closes the connection now."""
        if not self.closed.done():
            self.closed.set_result(why)
        if self.transport is not None:
            self.transport.abort()

    async def close(self, by: float) -> None:
        """Closes the connection once what was sent is written, or aborts it at ``by`` (``time.monotonic()``)."""
        if self.transport is not None and not self.closed.done():
            self.transport.close()  # connection_lost (and `closed`) comes when the buffer is written
            try:
                await asyncio.wait_for(asyncio.shield(self.closed), max(0.0, by - time.monotonic()))
            except asyncio.TimeoutError:
                pass
        self.abort("stopped")


async def _open(socket_dir: str, instance: int, agent: str, on_frames, timeout: float) -> tuple:
    """Connects and handshakes within ``timeout`` seconds (the steps of the blocking
    :func:`zrpc._proto.connect`, awaited), then hands the socket to asyncio. Cancelled, it
    closes the socket at once."""
    loop = asyncio.get_running_loop()
    path = _proto.broker_path(socket_dir)
    deadline = time.monotonic() + timeout
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        for pause in _proto.connect_steps(sock, path, deadline, timeout):
            await asyncio.sleep(pause)
        _proto.check_broker(sock, path)
        hs = _proto.Handshake(path, instance, agent, timeout)

        async def exchange():
            await loop.sock_sendall(sock, hs.hello)
            outcome = None
            while outcome is None:
                outcome = hs.feed(await loop.sock_recv(sock, 65536))
            return outcome

        try:
            welcome, frames = await asyncio.wait_for(exchange(), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise hs.timed_out() from None
        except OSError as e:
            raise hs.failed(e) from None
        conn = _Conn(hs.reader, on_frames)
        await loop.create_unix_connection(lambda: conn, sock=sock)
    except BaseException:
        sock.close()
        raise
    return conn, welcome, frames


def _raise(exc: BaseException) -> None:
    """Raises ``exc`` (from a callback of the event loop: a ``SystemExit`` then ends ``run_forever``)."""
    raise exc


class Client:
    """An asyncio client of the zrpcd broker; create it with ``await Client.connect(socket_dir=None)``,
    or use ``async with Client(socket_dir=None) as c:``, which connects on entering (and fails
    as ``connect()`` does). A ``Client()`` connected neither way refuses calls at once with
    :class:`zrpc.errors.DisconnectedError` (the constructor cannot connect: it is not ``async``).

    ``socket_dir`` is resolved as in :class:`zrpc.client.Client`.
    ``connect_timeout`` (seconds, default 5; a number > 0, else
    :class:`ValueError`) bounds connecting and the handshake, for the first
    connection (``connect()`` raises :class:`zrpc.errors.ConnectError` once
    it has passed) and every reconnection (tried again after its backoff
    while calls wait).
    """

    def __init__(self, socket_dir: Optional[str] = None, *, agent: str = _proto.AGENT,
                 connect_timeout: float = _proto.HANDSHAKE_TIMEOUT):
        #: Seconds connecting and the handshake may take.
        self.connect_timeout = _proto.check_connect_timeout(connect_timeout)
        self.socket_dir = _proto.resolve_socket_dir(socket_dir)
        #: The instance id sent in ``Hello``, kept across reconnects.
        self.instance = _proto.random_id()
        self.agent = agent
        self._table = _proto.CallTable()
        self._conn: Optional[_Conn] = None
        self._gen = 0
        self._max = _proto.DEFAULT_MAX_MESSAGE_SIZE
        self._supervisor: Optional[asyncio.Task] = None
        #: Wakes the supervisor; made by `_start`, in the running loop (on Python 3.9 an
        #: ``asyncio.Event`` binds to the loop current when it is made, and a ``Client()``
        #: may be made before any runs).
        self._wake: Optional[asyncio.Event] = None
        self._closed = False

    @classmethod
    async def connect(cls, socket_dir: Optional[str] = None, *, agent: str = _proto.AGENT,
                      connect_timeout: float = _proto.HANDSHAKE_TIMEOUT) -> "Client":
        """Connects to the broker (failing fast with :class:`zrpc.errors.ConnectError` if none
        answers, or none answers within ``connect_timeout`` seconds)."""
        c = cls(socket_dir, agent=agent, connect_timeout=connect_timeout)
        await c._start()
        return c

    async def _start(self) -> None:
        """Makes the first connection (its error is raised) and starts the supervisor, which
        reconnects after a loss."""
        self._wake = asyncio.Event()
        await self._install()
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise())

    async def _install(self) -> None:
        conn, welcome, frames = await _open(self.socket_dir, self.instance, self.agent, self._on_frames,
                                            self.connect_timeout)
        self._gen += 1
        self._max = welcome.max_message_size
        self._conn = conn
        for frame in self._table.resubmit(self._gen):
            conn.send(frame)
        if frames:
            self._on_frames(conn, frames)

    async def _supervise(self) -> None:
        """Watches the connection; after a loss, reconnects with backoff while calls are pending."""
        backoff = _proto.Backoff()
        while not self._closed:
            conn = self._conn
            up = time.monotonic()
            why = await conn.closed
            conn.abort(why)
            self._conn = None
            backoff.connection_ended(time.monotonic() - up)
            self._table.lost(self._gen, why)
            while not self._closed:
                if not self._table.calls:
                    # An idle client reconnects when it is next used.
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                if not await self._backoff(backoff):
                    continue
                try:
                    await self._install()
                    break
                except errors.ZRPCError as e:
                    if _proto.reconnect_may_help(e):
                        # Retried while calls wait (each until its deadline).
                        self._table.lost(self._gen, "reconnecting")
                    else:
                        self._table.fail_all(lambda _c, e=e: e)

    async def _backoff(self, backoff: _proto.Backoff) -> bool:
        """Waits the backoff delay before a reconnect attempt; calls whose deadline passes meanwhile
        fail then, not at the end of the delay (a call made while waiting counts too: it wakes
        the wait). Returns whether calls still wait for the connection."""
        retry_at = time.monotonic() + backoff.next_delay()
        while not self._closed:
            step = self._table.backoff_step(retry_at)
            if step is None:
                break
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), step)
            except asyncio.TimeoutError:
                pass
        return not self._closed and bool(self._table.calls)

    def _on_frames(self, conn: _Conn, frames: list) -> None:
        why = self._table.dispatch(frames, conn.send)
        if why is not None:
            conn.abort(why)

    async def call(self, service: str, method: str, payload: Any = None, timeout: Optional[float] = None,
                   *, no_wait: bool = False, no_retry: bool = False) -> Any:
        """Calls ``method`` of ``service``; the options and errors are those of :meth:`zrpc.client.Client.call`.

        Cancelling the awaiting task sends ``Cancel`` to the broker.
        """
        if self._closed:
            raise errors.DisconnectedError("the client is closed", service=service, method=method)
        if self._supervisor is None:
            raise errors.DisconnectedError(
                "the client is not connected: make it with `await aio.Client.connect()`, or use it "
                "as `async with aio.Client() as c:`, which connects", service=service, method=method)
        call = self._table.new(service, method, payload, timeout, no_wait, no_retry, self._max)
        call.waiter = asyncio.get_running_loop().create_future()
        conn = self._conn
        if conn is not None:
            frame = self._table.frame(call, self._gen, time.monotonic())
            if frame is not None:
                conn.send(frame)
        elif self._wake is not None:
            self._wake.set()
        try:
            if call.deadline is None:
                await call.waiter
            else:
                left = call.deadline + _proto.SAFETY_MARGIN - time.monotonic()
                await asyncio.wait_for(call.waiter, max(0.0, left))
        except asyncio.TimeoutError:
            self._cancel(call, _proto.timeout_error(call, "no answer from zrpcd"))
        except BaseException:
            self._cancel(call)
            raise
        return _proto.result_value(call)

    def _cancel(self, call: _proto.PendingCall, outcome: Any = None) -> None:
        """Abandons ``call`` (see :meth:`zrpc._proto.CallTable.abandon`)."""
        if call.done:
            return
        call.waiter = None
        conn = self._conn
        self._table.abandon(call, self._gen, conn.send if conn is not None else None, outcome)

    async def close(self) -> None:
        """Closes the connection; pending calls fail with :class:`zrpc.errors.DisconnectedError`."""
        self._closed = True
        if self._wake is not None:
            self._wake.set()
        if self._conn is not None:
            self._conn.abort("closed")
        if self._supervisor is not None:
            self._supervisor.cancel()
            try:
                await self._supervisor
            except asyncio.CancelledError:
                pass
        self._table.fail_all(lambda c: errors.DisconnectedError("the client was closed", service=c.service,
                                                                method=c.method))

    async def __aenter__(self) -> "Client":
        """Connects a client made with ``Client()`` (as :meth:`connect`: its errors are raised);
        a client already connected (``async with await Client.connect()``) is used as it is."""
        if self._closed:
            raise errors.DisconnectedError("the client is closed")
        if self._supervisor is None:
            await self._start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


class Server(_service.ServerBase):
    """An asyncio zrpc service: subclass it and mark methods (``async def`` or plain) with :func:`rpc_method`.

    The arguments are those of :class:`zrpc.server.Server`. Run it with
    ``await server.serve()`` (until stopped) or ``server.run()``. File
    descriptors are watched with the event loop's own ``add_reader``.
    """

    def __init__(self, name: Optional[str] = None, socket_dir: Optional[str] = None, *,
                 shared: bool = False, reply_cache: int = _service.DEFAULT_CACHE_ENTRIES,
                 agent: str = _proto.AGENT, drain_timeout: float = _service.DEFAULT_DRAIN_TIMEOUT,
                 stop_on_signals: bool = True, connect_timeout: float = _proto.HANDSHAKE_TIMEOUT):
        _service.ServerBase.__init__(self, name, socket_dir, shared, reply_cache, agent,
                                     drain_timeout, stop_on_signals, connect_timeout)
        self._conn: Optional[_Conn] = None
        self._tasks: Dict[int, asyncio.Task] = {}
        self._inflight: Dict[tuple, asyncio.Future] = {}
        self._acks: Dict[int, asyncio.Future] = {}
        self._req = 0
        self._registered: Optional[asyncio.Event] = None
        self._registered_loop: Optional[asyncio.AbstractEventLoop] = None
        # The stop: requests counted by `_request_stop` (in the loop), `_stop_wake` set on each.
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._stop_requests = 0
        self._stop_wake: Optional[asyncio.Event] = None
        #: The watched descriptors (see `register`): number -> (what was given, callback).
        self._fds: Dict[int, tuple] = {}

    @property
    def registered(self) -> asyncio.Event:
        """An event set while the name is held on a live connection (use it inside the server's event loop)."""
        try:
            loop: Optional[asyncio.AbstractEventLoop] = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        # An asyncio.Event belongs to one loop: a server served again in another loop (a second
        # asyncio.run) gets a new one, as it is not registered between the two.
        if self._registered is None or (loop is not None and self._registered_loop not in (None, loop)):
            self._registered = asyncio.Event()
            self._registered_loop = loop
        elif self._registered_loop is None:
            self._registered_loop = loop
        return self._registered

    @property
    def counter(self) -> int:
        """Number of requests whose handler started (replies from the cache do not count)."""
        return self._core.counter

    async def _connect(self) -> _Conn:
        conn, welcome, frames = await _open(self.socket_dir, self.instance, self.agent, self._on_frames,
                                            self.connect_timeout)
        self._conn = conn
        self._core.max_reply = welcome.max_message_size
        self._req += 1
        ack = asyncio.get_running_loop().create_future()
        self._acks[self._req] = ack
        conn.send(_service.register_frame(self._req, self.name, self.shared))
        if frames:
            self._on_frames(conn, frames)
        # Bounded like the blocking server's registration (connect_timeout): a broker that
        # takes the connection but never answers must not hold serve() for ever.
        try:
            done, _ = await asyncio.wait([ack, conn.closed], timeout=self.connect_timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            conn.abort("registration cancelled")
            if self._conn is conn:
                self._conn = None
            raise
        finally:
            self._acks.pop(self._req, None)
        if ack not in done:
            if conn.closed.done():
                why = "the broker closed the connection while registering %r: %s" % (
                    self.name, conn.closed.result())
            else:
                why = "the broker did not answer the registration of %r within %g s" % (
                    self.name, self.connect_timeout)
                conn.abort("registration timed out")
            raise errors.ConnectError(why)
        try:
            _service.check_ack(ack.result(), self.name)
        except BaseException:
            conn.abort("registration failed")
            raise
        self.registered.set()
        return conn

    async def serve(self) -> None:
        """Registers the name and serves until stopped, reconnecting after a lost connection.

        The first connection fails fast (its error is raised).

        It stops gracefully on SIGTERM, SIGINT (with ``stop_on_signals``) or
        :meth:`shutdown`: the name is released (``Unregister``: the broker
        delivers no new call here; calls for the name wait for the next
        instance, or go to the other instances of a shared name); what was
        delivered before the broker took the release in is served as usual
        (running handlers finish, pings are answered) and the replies are
        written; then the connection is closed and ``serve()`` returns (a
        stop while connecting or registering gives that up at once: nothing
        was delivered yet). The
        drain lasts at most ``drain_timeout`` seconds; past it, on a second
        signal or ``shutdown()``, or if the connection is lost, the handlers
        still running are cancelled and ``serve()`` returns once they have
        unwound (at most 1 s more; the broker re-delivers their calls, or
        fails the ``no_retry`` ones with ``ServiceGone``).

        The signals are handled with ``loop.add_signal_handler``, which works
        in the main thread only: elsewhere ``serve()`` stops on ``shutdown()``
        only. A signal the loop already handles (``add_signal_handler``
        called before) is left alone. The previous handlers are put back when
        ``serve()`` returns. A plain (not ``async``) handler blocks the loop,
        and so the stop too, while it runs. Cancelling ``serve()`` closes the
        connection at once, clears :attr:`registered` and cancels the
        handlers (waiting at most 1 s for them to unwind).
        """
        loop = asyncio.get_running_loop()
        self._watch_fds(loop)
        self._loop = loop
        self._stop_wake = asyncio.Event()
        if self._stop_requests:
            self._stop_wake.set()
        restore = self._install_signals(loop)
        try:
            await self._serve_until_stopped()
        except asyncio.CancelledError:
            if self._conn is not None:
                self._conn.abort("server stopped")
                self._conn = None
            self.registered.clear()
            cancelled = self._cancel_tasks()
            if cancelled:
                # The handlers unwind before serve() ends (a cancellation of this wait is
                # absorbed by the CancelledError being raised anyway).
                try:
                    await asyncio.wait(cancelled, timeout=_service.FINAL_FLUSH)
                except asyncio.CancelledError:
                    pass
            raise
        finally:
            self._restore_signals(loop, restore)
            for n in self._fds:  # kept for the next serve()
                loop.remove_reader(n)
            self._loop = None
            self._stop_wake = None
            self._stop_requests = 0

    async def _serve_until_stopped(self) -> None:
        if self._stop_requests:
            return  # asked to stop before serving: nothing was delivered
        backoff = _proto.Backoff()
        conn = await self._connect_unless_stopped()
        if conn is None:
            return
        while True:
            up = time.monotonic()
            if await self._stop_or_closed(conn.closed):
                await self._drain(conn)
                return
            conn.abort("lost")
            self.registered.clear()
            self._conn = None
            backoff.connection_ended(time.monotonic() - up)
            while True:
                if await self._stop_or_closed(None, backoff.next_delay()):
                    # Nothing can be answered; the calls were re-delivered or failed already.
                    await self._give_up_tasks()
                    return
                try:
                    conn = await self._connect_unless_stopped()
                    if conn is None:
                        # Stopped while connecting: nothing was delivered on this connection;
                        # the handlers of the lost one are given up as just above.
                        await self._give_up_tasks()
                        return
                    break
                except errors.ZRPCError as e:
                    # Retried for ever (see zrpc._service.reregister_may_help).
                    if not _service.reregister_may_help(e):
                        raise

    async def _connect_unless_stopped(self) -> Optional[_Conn]:
        """:meth:`_connect`, given up (``None``) on a stop request: a broker slow to answer the
        handshake or the registration (up to ``connect_timeout`` each) does not hold the stop,
        and nothing is delivered before the name is registered."""
        attempt = asyncio.ensure_future(self._connect())
        try:
            if not await self._stop_or_closed(attempt) or attempt.done():
                return attempt.result()
        except asyncio.CancelledError:  # serve() is cancelled: so is the attempt (its socket closed)
            if not attempt.done():
                attempt.cancel()
                try:
                    await asyncio.wait([attempt])
                except asyncio.CancelledError:
                    pass
            raise
        attempt.cancel()
        await asyncio.wait([attempt])  # its socket closed (a stop is no cancellation of serve())
        if not attempt.cancelled() and attempt.exception() is None:
            return attempt.result()  # registered just before the cancellation: drained as usual
        return None

    async def _stop_or_closed(self, closed: Optional[asyncio.Future], timeout: Optional[float] = None) -> bool:
        """Waits for a stop request (returns True), ``closed`` or ``timeout`` (returns False)."""
        wake = asyncio.ensure_future(self._stop_wake.wait())
        try:
            await asyncio.wait([wake] + ([closed] if closed is not None else []), timeout=timeout,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            wake.cancel()
        return self._stop_requests > 0

    async def _drain(self, conn: _Conn) -> None:
        """The stop while connected: releases the name, waits for the handlers running (within
        the drain timeout), then closes the connection once the replies are written."""
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + self.drain_timeout
        self._stop_requests -= 1
        self._stop_wake.clear()
        ack = loop.create_future()
        self._acks[_service.UNREGISTER_REQ] = ack
        conn.send(_service.unregister_frame(_service.UNREGISTER_REQ, self.name))
        why = None
        try:
            while True:
                if self._stop_requests:
                    why = "second stop request"
                elif conn.closed.done():
                    why = "lost the zrpcd connection while stopping"
                elif ack.done() and not self._tasks:
                    break  # every delivered call was answered
                elif time.monotonic() >= deadline:
                    why = "drain timeout (%g s)" % self.drain_timeout
                if why is not None:
                    break
                wake = asyncio.ensure_future(self._stop_wake.wait())
                try:
                    await asyncio.wait([wake, ack, conn.closed] + list(self._tasks.values()),
                                       timeout=max(0.0, deadline - time.monotonic()),
                                       return_when=asyncio.FIRST_COMPLETED)
                finally:
                    wake.cancel()
        finally:
            self._acks.pop(_service.UNREGISTER_REQ, None)
        self.registered.clear()
        if why is not None:
            _service.log.warning("stopping %r now: %s (%d running handlers cancelled)",
                                 self.name, why, len(self._tasks))
            cancelled = self._cancel_tasks()
        # The replies of the calls that ran get a moment to be written, even at the deadline.
        await conn.close(max(deadline, time.monotonic() + _service.FINAL_FLUSH))
        self._conn = None
        if why is not None:
            await self._give_up_tasks(cancelled)

    def _cancel_tasks(self) -> List[asyncio.Task]:
        """Cancels the handlers' tasks; returns them."""
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        return tasks

    async def _give_up_tasks(self, cancelled: Optional[List[asyncio.Task]] = None) -> None:
        """Cancels the handlers' tasks (unless given the ones already cancelled) and waits, at
        most :data:`zrpc._service.FINAL_FLUSH` seconds, for them to end: a handler's clean-up
        on ``CancelledError`` runs before ``serve()`` returns (as a blocking server's handler
        unwinds before ``run()`` returns), instead of being cancelled again by whatever ends
        the event loop after it (``asyncio.run``)."""
        if cancelled is None:
            cancelled = self._cancel_tasks()
        if cancelled:
            await asyncio.wait(cancelled, timeout=_service.FINAL_FLUSH)

    def shutdown(self) -> None:
        """Asks :meth:`serve` to stop gracefully; returns at once.

        Call it in the server's event loop, or from any other thread (it
        then hands the request to the loop). A second call during the stop
        ends it at once. A call made while ``serve()`` is not running
        applies to the next ``serve()``.
        """
        loop = self._loop
        if loop is not None:
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is not loop:
                try:
                    loop.call_soon_threadsafe(self._request_stop)
                    return
                except RuntimeError:  # the loop is closed
                    pass
        self._request_stop()

    def _request_stop(self) -> None:
        self._stop_requests += 1
        if self._stop_wake is not None:
            self._stop_wake.set()

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> Dict[int, Any]:
        """Installs the stop signals' handlers (``stop_on_signals``, main thread only); returns the
        previous Python-level handlers of the signals it took."""
        old: Dict[int, Any] = {}
        if not self.stop_on_signals or threading.current_thread() is not threading.main_thread():
            return old
        loop_owned = getattr(getattr(asyncio, "unix_events", None), "_sighandler_noop", None)
        for sig in _service.STOP_SIGNALS:
            previous = signal.getsignal(sig)
            if loop_owned is not None and previous is loop_owned:
                continue  # the loop has a handler of its own for it: left alone
            try:
                loop.add_signal_handler(sig, self._request_stop)
            except (NotImplementedError, RuntimeError, ValueError):
                continue
            old[sig] = previous
        return old

    def _restore_signals(self, loop: asyncio.AbstractEventLoop, old: Dict[int, Any]) -> None:
        for sig, previous in old.items():
            loop.remove_signal_handler(sig)
            if previous is not None:
                signal.signal(sig, previous)

    def run(self) -> None:
        """Serves until stopped in a new event loop (``asyncio.run(self.serve())``)."""
        asyncio.run(self.serve())

    def _on_frames(self, conn: _Conn, frames: List[tuple]) -> None:
        for env, payload in frames:
            kind = env[0]
            if kind == _proto.REQUEST:
                self._request(conn, env, payload)
            elif kind == _proto.PING:
                conn.send(_proto.pong_frame(_proto.field(env, 1, 0)))
            elif kind == _proto.CANCEL:
                task = self._tasks.pop((conn, _proto.field(env, 1)), None)
                if task is not None:
                    task.cancel()
            elif kind == _proto.ACK:
                fut = self._acks.get(_proto.field(env, 1))
                if fut is not None and not fut.done():
                    fut.set_result(env)
            elif kind == _proto.FATAL:
                conn.abort("zrpcd sent Fatal (%s)" % errors.code_name(_proto.field(env, 1, 0)))
                return

    def _request(self, conn: _Conn, env: list, payload: bytes) -> None:
        reply, job = self._core.plan(env, payload)
        if reply is not None:
            conn.send(reply)
            return
        first = self._inflight.get(job.key) if job.key is not None else None
        if first is not None:
            # A re-sent call while its first execution runs: wait for that outcome.
            self._core.counter -= 1
            self._tasks[(conn, job.rid)] = asyncio.ensure_future(self._await_first(conn, job, first))
            return
        if not asyncio.iscoroutinefunction(job.handler):
            conn.send(self._core.run_sync(job))
            return
        done: Optional[asyncio.Future] = None
        if job.key is not None:
            done = asyncio.get_running_loop().create_future()
            self._inflight[job.key] = done
        self._tasks[(conn, job.rid)] = asyncio.ensure_future(self._run(conn, job, done))

    def _settle(self, conn: _Conn, job: _service.Job, done: Optional[asyncio.Future]) -> None:
        """An execution of ``job`` (or a copy waiting for one) ended: its task entry goes, and
        if it ran as the call's execution in flight (``done``), copies waiting on it wake up."""
        self._forget_task(conn, job.rid)
        if done is not None:
            if self._inflight.get(job.key) is done:
                del self._inflight[job.key]
            done.set_result(None)

    def _forget_task(self, conn: _Conn, rid: int) -> None:
        """Drops the entry of request ``rid`` on ``conn`` if it is the current task's (request
        ids are per connection: after a reconnect another task may hold the same id)."""
        key = (conn, rid)
        if self._tasks.get(key) is asyncio.current_task():
            del self._tasks[key]

    async def _execute(self, job: _service.Job) -> bytes:
        """Runs the handler of ``job`` (awaited if it is a coroutine function); returns the reply frame.

        A handler raising ``SystemExit`` ends the process, as a plain handler run from the
        event loop's callback does (:func:`zrpc._service.handler_exits` says so): it is
        raised again from a callback of the loop, out of ``serve()``, and the handler's task
        ends cancelled (no outcome, no reply), so that asyncio does not also print it as a
        task exception "never retrieved".
        """
        try:
            if not asyncio.iscoroutinefunction(job.handler):
                return self._core.run_sync(job)
            token = _service._current.set(job.info)
            try:
                result = await job.call()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                return self._core.finish(job, exc=e)
            except SystemExit as e:
                _service.handler_exits(job, e)
                raise
            finally:
                _service._current.reset(token)
            return self._core.finish(job, result)
        except SystemExit as e:
            asyncio.get_running_loop().call_soon(_raise, e)
            raise asyncio.CancelledError() from None

    async def _run(self, conn: _Conn, job: _service.Job, done: Optional[asyncio.Future]) -> None:
        try:
            reply = await self._execute(job)
        except asyncio.CancelledError:
            return  # cancelled by the broker: no outcome, no reply
        finally:
            self._settle(conn, job, done)
        # The request id belongs to `conn`; after a reconnect the broker
        # re-delivers the call and the reply cache answers it.
        if self._conn is conn:
            conn.send(reply)

    async def _await_first(self, conn: _Conn, job: _service.Job, first: asyncio.Future) -> None:
        done: Optional[asyncio.Future] = None
        try:
            await asyncio.shield(first)
            reply = self._core.cached(job)
            if reply is None:  # the first execution left no outcome (it was cancelled): run this one
                later = self._inflight.get(job.key)
                if later is not None:
                    # Another copy runs it already: wait for that one instead.
                    await asyncio.shield(later)
                    reply = self._core.cached(job)
                if reply is None:
                    done = asyncio.get_running_loop().create_future()
                    self._inflight[job.key] = done
                    self._core.counter += 1
                    reply = await self._execute(job)
        except asyncio.CancelledError:
            return
        finally:
            self._settle(conn, job, done)
        if self._conn is conn:
            conn.send(reply)

    def register(self, fd: Any, callback: Callable[[], Any]) -> None:
        """Calls ``callback()`` whenever ``fd`` (a file-like object or a descriptor number) is
        readable while :meth:`serve` runs (the callback reads it), with the event loop's
        ``add_reader``.

        May be called at any time, as with the blocking server: before ``serve()`` (in
        ``__init__``, say, with no event loop running yet) the registration is kept and
        applied when ``serve()`` starts; it is kept too when ``serve()`` returns, for the
        next one. Call it from the server's event loop (or before ``serve()``).

        A descriptor that cannot be watched (a regular file or a directory: epoll refuses
        them, they are always readable; a closed descriptor) raises
        :class:`zrpc.errors.NotPollableError` at once, with the ``OSError`` as its cause.
        """
        n = _service.fileno(fd)
        self.unregister(n)
        loop = self._loop
        if loop is None:
            _service.check_pollable(fd)
        else:
            try:
                loop.add_reader(fd, callback)
            except OSError as e:
                raise _service.not_pollable(n, e) from e
        self._fds[n] = (fd, callback)

    def unregister(self, fd: Any) -> None:
        """Stops watching ``fd`` (unknown descriptors are ignored)."""
        n = _service.fileno(fd)
        if self._fds.pop(n, None) is not None and self._loop is not None:
            self._loop.remove_reader(n)

    def _watch_fds(self, loop: asyncio.AbstractEventLoop) -> None:
        """Starts watching the descriptors registered before :meth:`serve` (on its loop)."""
        done = []
        try:
            for n, (fd, callback) in self._fds.items():
                try:
                    loop.add_reader(fd, callback)
                except OSError as e:  # closed (or replaced) since register()
                    raise _service.not_pollable(n, e) from e
                except ValueError as e:  # a file object closed since register()
                    raise errors.NotPollableError(
                        "cannot watch file descriptor %d for reading: it was closed after "
                        "register()" % n) from e
                done.append(n)
        except BaseException:
            for n in done:
                loop.remove_reader(n)
            raise
