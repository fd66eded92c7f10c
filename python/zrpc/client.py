"""The blocking zrpc client.

Example (the original zrpc's)::

    from zrpc.client import Client

    client = Client()
    response = client.call(service='test_server', method='func',
                           payload={'haha': 'brt'})

A lost connection to the broker (a broker restart, for instance) is
reconnected with backoff, and a call in flight is resubmitted with the same
instance and call id and its remaining budget, so that it is answered exactly
once; calls made with ``no_retry=True`` fail with
:class:`zrpc.errors.DisconnectedError` instead (and with
:class:`zrpc.errors.ShutdownError` when a broker shutting down answers them so),
and may or may not have run.
"""

import select
import socket
import threading
import time
from typing import Any, Optional

from . import _calls, _proto, errors
from .errors import RPCTimeoutError  # noqa: F401  (the original's import path)

__all__ = ["Client", "RPCTimeoutError"]


class Client:
    """A blocking client of the zrpcd broker.

    ``socket_dir`` is the broker's socket directory: when ``None``,
    ``$ZRPC_SOCKET_DIR``, else ``/run/zrpc`` for root or when a system
    broker runs, else ``$XDG_RUNTIME_DIR/zrpc`` (the original's default
    ``/tmp/zrpc_sockets`` is not used unless given: any user could create it
    first). The constructor connects and fails fast
    (:class:`zrpc.errors.ConnectError`) when no broker answers; later losses
    of the connection are reconnected.

    ``connect_timeout`` (seconds, default 5) bounds connecting to the broker
    and the handshake (its ``Welcome``), for the first connection and every
    reconnection: a broker that takes the connection and does not answer
    (stopped, wedged) fails the constructor with
    :class:`zrpc.errors.ConnectError` once it has passed; a reconnection for
    a call waits at most this long, or what is left of the call's deadline
    if that is less, and is tried again after its backoff. It must be a
    number > 0 (else :class:`ValueError`).

    A client makes one call at a time (calls from several threads are
    serialised); use :mod:`zrpc.aio` for many calls in flight. :meth:`close`
    may be called from any thread: a call blocked in another thread fails
    at once with :class:`zrpc.errors.DisconnectedError`.
    """

    def __init__(self, socket_dir: Optional[str] = None, *, agent: str = _proto.AGENT,
                 connect_timeout: float = _proto.HANDSHAKE_TIMEOUT):
        #: Seconds connecting and the handshake may take (see the class's description).
        self.connect_timeout = _proto.check_connect_timeout(connect_timeout)
        self.socket_dir = _proto.resolve_socket_dir(socket_dir)
        #: The instance id sent in ``Hello``, kept across reconnects.
        self.instance = _proto.random_id()
        self.agent = agent
        self._lock = threading.Lock()
        self._table = _calls.CallTable()
        self._backoff = _proto.Backoff()
        self._sock = None
        self._reader: Optional[_proto.FrameReader] = None
        self._gen = 0
        self._up_since = 0.0
        self._max = _proto.DEFAULT_MAX_MESSAGE_SIZE
        self._closed = False
        #: Set by close(): cuts a reconnect backoff delay short.
        self._closing = threading.Event()
        #: A socket pair made at the first reconnection: close() writes to the second, which
        #: gives up a reconnection's connect and handshake (`_proto.connect`'s `wake`).
        self._wake: Optional[tuple] = None
        self._pending_frames: list = []
        self._connect()

    # -- connection -----------------------------------------------------

    def _connect(self, timeout: Optional[float] = None, wake: Any = None) -> None:
        """Connects and handshakes within ``timeout`` seconds (``None``: :attr:`connect_timeout`),
        giving up if ``wake`` becomes readable."""
        if timeout is None:
            timeout = self.connect_timeout
        sock, welcome, reader, frames = _proto.connect(self.socket_dir, self.instance, self.agent,
                                                       timeout=timeout, wake=wake)
        self._sock, self._reader = sock, reader
        self._gen += 1
        self._up_since = time.monotonic()
        self._max = welcome.max_message_size
        #: The broker's id of the current connection.
        self.conn_id = welcome.conn_id
        self._pending_frames = frames
        for frame in self._table.resubmit(self._gen):
            self._send(frame)

    def _lost(self, why: str) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self._backoff.connection_ended(time.monotonic() - self._up_since)
            self._table.lost(self._gen, why)

    def _reconnect(self, call: _calls.PendingCall) -> None:
        """One reconnect attempt, after the backoff delay (the call fails at its deadline meanwhile)."""
        retry_at = time.monotonic() + self._backoff.next_delay()
        while True:
            step = self._table.backoff_step(retry_at)
            if step is None:
                break
            if self._closing.wait(step):
                return
        if self._wake is None:
            self._wake = socket.socketpair()
            for end in self._wake:
                end.setblocking(False)
        if call.done or self._closed:  # (close() from now on wakes the connection below)
            return
        # A broker that accepts and does not answer must not hold the call past its deadline
        # (nor longer than connect_timeout).
        timeout = self.connect_timeout
        if call.deadline is not None:
            timeout = min(timeout, max(0.05, call.deadline - time.monotonic()))
        try:
            self._connect(timeout, self._wake[0])
        except errors.ZRPCError as e:
            # Retried until the call's deadline unless retrying cannot help
            # (an untrusted broker, another protocol version).
            if not _proto.reconnect_may_help(e):
                self._table.finish(call, e)

    def _send(self, frame: bytes) -> None:
        if self._sock is None:
            return
        try:
            self._sock.sendall(frame)
        except OSError as e:
            self._lost("write error: %s" % e)

    def _dispatch(self, frames: list) -> None:
        why = self._table.dispatch(frames, self._send)
        if why is not None:
            self._lost(why)

    def _read(self, wait: Optional[float]) -> None:
        """Waits up to ``wait`` seconds for frames from the broker and handles them."""
        if self._pending_frames:
            frames, self._pending_frames = self._pending_frames, []
            self._dispatch(frames)
            return
        sock = self._sock
        try:
            ready, _, _ = select.select([sock], [], [], wait)
        except InterruptedError:
            return
        except (OSError, ValueError):  # closed under us by close()
            ready = [sock]
        if not ready or self._closed:
            return
        try:
            data = sock.recv(262144)
        except OSError as e:
            self._lost("read error: %s" % e)
            return
        if not data:
            self._lost("the broker closed the connection")
            return
        try:
            frames = self._reader.feed(data)
        except errors.ZRPCError as e:
            self._lost(str(e))
            return
        self._dispatch(frames)

    # -- calls ----------------------------------------------------------

    def call(self, service: str, method: str, payload: Any = None, timeout: Optional[float] = None,
             *, no_wait: bool = False, no_retry: bool = False) -> Any:
        """Calls ``method`` of ``service`` with ``payload``; returns the decoded return value.

        ``timeout`` is in seconds; ``None`` (or a negative number, as in the
        original zrpc) waits indefinitely; on expiry
        :class:`zrpc.errors.RPCTimeoutError` is raised. ``no_wait``: fail at
        once with :class:`zrpc.errors.NoSuchServiceError` when no service
        holds the name (instead of waiting for one). ``no_retry``: do not
        resubmit the call after a lost connection or a broker's ``Shutdown``
        answer, nor re-deliver it after its service instance died
        (:class:`zrpc.errors.DisconnectedError`,
        :class:`zrpc.errors.ShutdownError`,
        :class:`zrpc.errors.ServiceGoneError`: in every such case the call may
        or may not have run). Other failures raise the
        :class:`zrpc.errors.ZRPCError` subclass of the wire error code.
        """
        with self._lock:
            if self._closed:
                raise errors.DisconnectedError("the client is closed", service=service, method=method)
            call = self._table.new(service, method, payload, timeout, no_wait, no_retry, self._max)
            try:
                if self._sock is not None:
                    frame = self._table.frame(call, self._gen, time.monotonic())
                    if frame is not None:
                        self._send(frame)
                self._wait(call)
            except BaseException:
                if not call.done:
                    self._cancel(call)
                raise
            finally:
                if self._closed:  # by another thread while this call waited
                    self._shut()
            return _calls.result_value(call)

    def _wait(self, call: _calls.PendingCall) -> None:
        while not call.done:
            if self._closed:
                self._table.finish(call, self._closed_error(call))
                return
            now = time.monotonic()
            if call.deadline is not None and now >= call.deadline + _proto.SAFETY_MARGIN:
                self._cancel(call, _calls.timeout_error(call, "no answer from zrpcd"))
                return
            if self._sock is None:
                self._reconnect(call)
                continue
            wait = None if call.deadline is None else call.deadline + _proto.SAFETY_MARGIN - now
            self._read(wait)

    def _cancel(self, call: _calls.PendingCall, outcome: Any = None) -> None:
        """Abandons ``call`` (see :meth:`zrpc._calls.CallTable.abandon`)."""
        self._table.abandon(call, self._gen, self._send if self._sock is not None else None, outcome)

    @staticmethod
    def _closed_error(call: _calls.PendingCall) -> errors.DisconnectedError:
        return errors.DisconnectedError("the client was closed while %s.%s waited for its answer"
                                        % (call.service, call.method), service=call.service, method=call.method)

    def close(self) -> None:
        """Closes the connection; later calls raise :class:`zrpc.errors.DisconnectedError`.

        From another thread, a call blocked there fails at once with
        :class:`zrpc.errors.DisconnectedError` (the connection is shut down
        under it, which wakes it; it closes the socket on its way out).
        """
        self._closed = True
        self._closing.set()
        wake = self._wake
        if wake is not None:
            try:
                wake[1].send(b"\0")
            except OSError:  # closed by the calling thread already, or full (woken anyway)
                pass
        _proto.shut_down(self._sock)
        if self._lock.acquire(blocking=False):
            try:
                self._shut()
            finally:
                self._lock.release()

    def _shut(self) -> None:
        """Closes the socket of a closed client (holding the lock) and fails what is still pending."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._wake is not None:
            for end in self._wake:
                end.close()
        self._table.fail_all(self._closed_error)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return "Client(socket_dir=%r, instance=%#x)" % (self.socket_dir, self.instance)
