"""The asyncio server (:class:`zrpc.aio.Server`; see :mod:`zrpc.aio`). Internal
module: import the server from :mod:`zrpc.aio`.
"""

import asyncio
import signal
import threading
import time
from typing import Any, Callable, Dict, List, Optional

from . import _proto, _service, errors
from ._aio_conn import _Conn, _open, _raise


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
