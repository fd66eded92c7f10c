"""The blocking zrpc service library.

Example (the original zrpc's)::

    from zrpc.server import Server, rpc_method

    class TestServer(Server):
        @rpc_method
        def func(self, payload):
            print('RPC request [%s]: %s' % (self.counter, payload))
            return 'func', payload

    TestServer(name='test_server').run()

Requests are handled one at a time, in order. The server answers the
broker's pings, drops a queued request the broker cancels, answers
``zrpc.describe``, and keeps a reply cache so that a call re-sent after a
reconnect (of the client, of this service or of the broker) is answered
again instead of running twice. A lost connection is reconnected with
backoff and the name registered again.
"""

import select
import selectors
import threading
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, Optional

from . import _proto, _service, errors
from ._service import CallInfo, current_call, rpc_method

__all__ = ["Server", "rpc_method", "current_call", "CallInfo"]

#: Seconds a handler runs before the keeper thread reads the broker for it.
KEEPER_AFTER = 0.5


def _fileno(fd: Any) -> int:
    return fd if isinstance(fd, int) else fd.fileno()


class Server(_service.ServerBase):
    """A zrpc service: subclass it and mark methods with :func:`rpc_method`.

    ``name``: the service name; ``None`` derives it from the class name
    (CamelCase to snake_case: ``MyClass`` -> ``my_class``). ``socket_dir``:
    the broker's socket directory, resolved as in :class:`zrpc.client.Client`.
    ``shared``: register the name shared, so that several instances split the
    calls. ``reply_cache``: bound on cached replies (0 disables the cache).

    The first connection (at the first :meth:`run` / :meth:`run_once`) fails
    fast with :class:`zrpc.errors.ConnectError` or the registration's error
    (:class:`zrpc.errors.NameTakenError`, ...); later losses are reconnected.
    """

    def __init__(self, name: Optional[str] = None, socket_dir: Optional[str] = None, *,
                 shared: bool = False, reply_cache: int = _service.DEFAULT_CACHE_ENTRIES,
                 agent: str = _proto.AGENT):
        _service.ServerBase.__init__(self, name, socket_dir, shared, reply_cache, agent)
        self._sel = selectors.DefaultSelector()
        self._fds: Dict[int, Callable[[], Any]] = {}
        self._sock = None
        self._reader: Optional[_proto.FrameReader] = None
        self._queue: Deque[tuple] = deque()
        self._backoff = _proto.Backoff()
        self._ever_connected = False
        self._up_since = 0.0
        self._next_attempt = 0.0
        self._req = 0
        self._closed = False
        self._running: Optional[_service.Job] = None
        self._io_lock = threading.Lock()
        self._keeper_lost = False
        self._keeper: Optional[threading.Thread] = None

    @property
    def counter(self) -> int:
        """Number of requests whose handler ran so far, including the one running (replies from the cache do not count)."""
        return self._core.counter

    @property
    def connected(self) -> bool:
        """Whether the server holds its name on a live connection to the broker."""
        return self._sock is not None

    # -- file descriptors ----------------------------------------------

    def register(self, fd: Any, callback: Callable[[], Any]) -> None:
        """Calls ``callback()`` whenever ``fd`` (a file-like object or a descriptor number) is readable.

        The server does not read from ``fd``: the callback must.
        """
        self.unregister(fd)
        n = _fileno(fd)
        self._fds[n] = callback
        self._sel.register(n, selectors.EVENT_READ, ("fd", callback))

    def unregister(self, fd: Any) -> None:
        """Stops watching ``fd`` (unknown descriptors are ignored)."""
        n = _fileno(fd)
        if self._fds.pop(n, None) is not None:
            self._sel.unregister(n)

    # -- the connection ------------------------------------------------

    def _connect(self) -> None:
        sock, welcome, reader, frames = _proto.connect(self.socket_dir, self.instance, self.agent)
        try:
            # A broker that accepts but never acknowledges must not hold the server for ever.
            sock.settimeout(_proto.HANDSHAKE_TIMEOUT)
            self._req += 1
            req = self._req
            sock.sendall(_service.register_frame(req, self.name, self.shared))
            acked = False
            while True:
                for env, payload in frames:
                    if env[0] == _proto.ACK and _proto.field(env, 1) == req:
                        _service.check_ack(env, self.name)
                        acked = True
                    elif env[0] == _proto.FATAL:
                        raise _proto.fatal_error(env, "zrpcd ended the connection while registering %r" % self.name)
                    else:
                        self._queue.append((env, payload))
                if acked:
                    break
                data = sock.recv(65536)
                if not data:
                    raise errors.ConnectError("the broker closed the connection while registering %r" % self.name)
                frames = reader.feed(data)
        except OSError as e:
            # A reset, a timeout: like a lost connection (retried once connected before).
            sock.close()
            raise errors.ConnectError("the connection to zrpcd failed while registering %r: %s"
                                      % (self.name, e)) from e
        except BaseException:
            sock.close()
            raise
        sock.settimeout(None)
        self._core.max_reply = welcome.max_message_size
        self._sock, self._reader = sock, reader
        self._sel.register(sock, selectors.EVENT_READ, ("broker", None))
        self._ever_connected = True
        self._up_since = time.monotonic()
        if self._keeper is None:
            self._keeper = threading.Thread(target=self._keep, name="zrpc-keeper", daemon=True)
            self._keeper.start()

    def _lost(self) -> None:
        if self._sock is not None:
            self._sel.unregister(self._sock)
            self._sock.close()
            self._sock = None
            self._backoff.connection_ended(time.monotonic() - self._up_since)
            # Requests received but not started are dropped: the broker re-delivers them.
            self._queue.clear()

    def _try_connect(self) -> None:
        """Connects now if the backoff allows (the first connection raises its error; later ones retry)."""
        if not self._ever_connected:
            self._connect()
            return
        now = time.monotonic()
        if now < self._next_attempt:
            return
        try:
            self._connect()
        except errors.ZRPCError as e:
            # The broker is restarting, refused the connection (Fatal), or still holds
            # our old connection's name: retried for ever.
            if not _service.reregister_may_help(e):
                raise
            self._next_attempt = time.monotonic() + self._backoff.next_delay()

    def _send(self, frame: bytes) -> None:
        if self._sock is None:
            return
        try:
            self._sock.sendall(frame)
        except OSError:
            self._lost()

    def _read_broker(self) -> bool:
        """Reads the broker's frames: answers pings, drops cancelled queued requests, queues requests.

        Returns False when the connection is gone (the caller calls ``_lost``).
        """
        try:
            data = self._sock.recv(262144)
            frames = self._reader.feed(data) if data else None
        except (OSError, errors.ZRPCError):
            return False
        if not frames:
            return frames is not None
        for env, payload in frames:
            kind = env[0]
            if kind == _proto.PING:
                try:
                    self._sock.sendall(_proto.pong_frame(_proto.field(env, 1, 0)))
                except OSError:
                    return False
            elif kind == _proto.CANCEL:
                rid = _proto.field(env, 1)
                # A cancelled request that has not started is dropped unanswered.
                self._queue = deque(q for q in self._queue if not (q[0][0] == _proto.REQUEST and q[0][1] == rid))
            elif kind == _proto.FATAL:
                return False
            elif kind in (_proto.REQUEST, _proto.ACK):
                self._queue.append((env, payload))
        return True

    def _run_handler(self, job: _service.Job) -> bytes:
        """Runs a handler; a long one is watched by the keeper thread (see :meth:`_keep`)."""
        self._running = job
        try:
            return self._core.run_sync(job)
        finally:
            self._running = None
            with self._io_lock:  # the keeper is not reading now, and will not until the next handler
                pass
            if self._keeper_lost:
                self._keeper_lost = False
                self._lost()

    def _keep(self) -> None:
        """The keeper thread: while a handler has run for more than :data:`KEEPER_AFTER` seconds,
        reads the broker for it: answers pings (a handler running longer than the broker's
        heartbeat timeout must not get the service disconnected), queues new requests and
        drops the queued ones the broker cancels. Short handlers never see it.
        """
        while not self._closed:
            job = self._running
            if job is None or self._keeper_lost or time.monotonic() - job.info.started < KEEPER_AFTER:
                time.sleep(KEEPER_AFTER / 2)
                continue
            sock = self._sock
            try:
                ready, _, _ = select.select([sock], [], [], 0.05)
            except (OSError, ValueError, TypeError):
                time.sleep(KEEPER_AFTER / 2)
                continue
            if not ready:
                continue
            with self._io_lock:
                if self._running is job and not self._keeper_lost and not self._read_broker():
                    self._keeper_lost = True

    def _handle_queued(self) -> bool:
        """Handles one queued request; returns whether there was one."""
        while self._queue:
            env, payload = self._queue.popleft()
            if env[0] != _proto.REQUEST:
                continue  # the Ack of an unregister-and-register is not an event
            reply, job = self._core.plan(env, payload)
            if job is not None:
                reply = self._run_handler(job)
            self._send(reply)
            return True
        return False

    # -- the loop --------------------------------------------------------

    def run_once(self, timeout: Optional[float] = None) -> bool:
        """Waits for one event (a request or a readable registered descriptor) and handles it.

        ``timeout`` in seconds bounds the wait (``None``: wait until an event).
        Returns whether an event was handled. Pings, cancels and reconnecting
        are handled on the way and are not events.
        """
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        while True:
            if self._sock is None:
                self._try_connect()
            if self._handle_queued():
                return True
            now = time.monotonic()
            if deadline is not None and now >= deadline and timeout != 0:
                return False
            wait = None if deadline is None else max(0.0, deadline - now)
            if self._sock is None:
                retry_in = max(0.0, self._next_attempt - now)
                wait = retry_in if wait is None else min(wait, retry_in)
            for key, _ in self._sel.select(wait):
                what, callback = key.data
                if what == "broker":
                    if not self._read_broker():
                        self._lost()
                else:
                    callback()
                    return True
            if self._handle_queued():
                return True
            if timeout == 0 or (deadline is not None and time.monotonic() >= deadline):
                return False

    def run(self) -> None:
        """Serves forever."""
        while True:
            self.run_once(None)

    def close(self) -> None:
        """Disconnects from the broker (releasing the name) and stops the keeper thread."""
        self._closed = True
        self._lost()
