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
import time
from typing import Any, Optional

from . import _calls, _proto, errors
from ._aio_conn import _Conn, _open
from ._aio_server import Server
from ._service import CallInfo, current_call, rpc_method

__all__ = ["Client", "Server", "rpc_method", "current_call", "CallInfo"]


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
        self._table = _calls.CallTable()
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
            self._cancel(call, _calls.timeout_error(call, "no answer from zrpcd"))
        except BaseException:
            self._cancel(call)
            raise
        return _calls.result_value(call)

    def _cancel(self, call: _calls.PendingCall, outcome: Any = None) -> None:
        """Abandons ``call`` (see :meth:`zrpc._calls.CallTable.abandon`)."""
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
