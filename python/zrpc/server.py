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

:meth:`Server.run` stops gracefully on SIGTERM, SIGINT or
:meth:`Server.shutdown`: the name is released, the calls already delivered
are answered, and ``run()`` returns (see :meth:`Server.run`).
"""

import select
import selectors
import signal
import socket
import threading
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, Optional

from . import _proto, _service, errors
from ._service import CallInfo, current_call, rpc_method

__all__ = ["Server", "rpc_method", "current_call", "CallInfo"]

#: Seconds a handler runs before the keeper thread reads the broker for it.
KEEPER_AFTER = 0.5
#: How often the keeper thread looks for a stop request while a handler runs.
KEEPER_TICK = 0.05


class _StopNow(BaseException):
    """Raised by the stop signal handler inside a running handler when the stop gives up
    (second signal, drain timeout): unwinds the handler; :meth:`Server.run` catches it."""


class Server(_service.ServerBase):
    """A zrpc service: subclass it and mark methods with :func:`rpc_method`.

    ``name``: the service name; ``None`` derives it from the class name
    by the original zrpc's rule (``_`` before each run of capitals, then
    lower case: ``MyClass`` -> ``my_class``, ``MyHTTPServer`` ->
    ``my_httpserver``). ``socket_dir``:
    the broker's socket directory, resolved as in :class:`zrpc.client.Client`.
    ``shared``: register the name shared, so that several instances split the
    calls. ``reply_cache``: bound on cached replies, shared among caller uids (the
    largest holder's oldest entry is evicted first; 0 disables the cache).
    ``drain_timeout``: seconds a graceful stop waits for the calls already
    delivered (see :meth:`run`). ``stop_on_signals``: whether :meth:`run`
    stops gracefully on SIGTERM and SIGINT (``False`` leaves the signals'
    handlers alone: SIGTERM then kills the process). ``connect_timeout``
    (seconds, default 5; a number > 0, else :class:`ValueError`) bounds
    connecting to the broker and the handshake, and then, again, the
    registration of the name, for the first connection and every
    reconnection: a broker that takes the connection and does not answer
    (stopped, wedged) fails the first connection with
    :class:`zrpc.errors.ConnectError`; a reconnection is tried again after
    its backoff.

    The first connection (at the first :meth:`run` / :meth:`run_once`) fails
    fast with :class:`zrpc.errors.ConnectError` or the registration's error
    (:class:`zrpc.errors.NameTakenError`, ...); later losses are reconnected.
    """

    def __init__(self, name: Optional[str] = None, socket_dir: Optional[str] = None, *,
                 shared: bool = False, reply_cache: int = _service.DEFAULT_CACHE_ENTRIES,
                 agent: str = _proto.AGENT, drain_timeout: float = _service.DEFAULT_DRAIN_TIMEOUT,
                 stop_on_signals: bool = True, connect_timeout: float = _proto.HANDSHAKE_TIMEOUT):
        _service.ServerBase.__init__(self, name, socket_dir, shared, reply_cache, agent,
                                     drain_timeout, stop_on_signals, connect_timeout)
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
        # The stop (see `run`). `shutdown()` and the signal handler only append to
        # `_stop_requests` (thread-safe, and safe in a signal handler) and write a byte to
        # `_wake_w`, which wakes the selector. The rest is done by the thread running `run()`,
        # or by the keeper thread while a handler runs (under `_io_lock`, see `_keep`).
        self._stop_requests: Deque[None] = deque()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        #: Whether `run()` is serving (only it stops: not `run_once()`).
        self._armed = False
        #: When the drain in progress gives up (None: no drain).
        self._drain_deadline: Optional[float] = None
        #: The `req` of the `Unregister` sent whose `Ack` has not come yet.
        self._unacked: set = set()
        #: The stop gives up: the connection is closed without waiting any longer.
        self._give_up = False
        #: The signal handler raised `_StopNow` (it does so once per `run()`).
        self._stop_raised = False
        #: The thread running `run()`, while the stop signals' handlers are installed.
        self._signal_thread: Optional[int] = None

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

        The server does not read from ``fd``: the callback must. A descriptor
        that cannot be watched (a regular file or a directory: epoll refuses
        them, they are always readable; a closed descriptor) raises
        :class:`zrpc.errors.NotPollableError`, with the ``OSError`` as its
        cause, and is not registered.
        """
        self.unregister(fd)
        n = _service.fileno(fd)
        try:
            self._sel.register(n, selectors.EVENT_READ, ("fd", callback))
        except OSError as e:
            raise _service.not_pollable(n, e) from e
        self._fds[n] = callback

    def unregister(self, fd: Any) -> None:
        """Stops watching ``fd`` (unknown descriptors are ignored)."""
        n = _service.fileno(fd)
        if self._fds.pop(n, None) is not None:
            self._sel.unregister(n)

    # -- the connection ------------------------------------------------

    def _connect(self) -> None:
        # Under run(), a stop request (a byte on the wake socket) gives the connection up: a
        # broker slow to answer must not hold the stop, and nothing is delivered before the
        # name is registered.
        wake = self._wake_r if self._armed else None
        sock, welcome, reader, frames = _proto.connect(self.socket_dir, self.instance, self.agent,
                                                       timeout=self.connect_timeout, wake=wake)
        try:
            # A broker that accepts but never acknowledges (or trickles the Ack in) must not
            # hold the server for ever: the registration as a whole is bounded.
            deadline = time.monotonic() + self.connect_timeout
            sock.settimeout(self.connect_timeout)
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
                data = _proto.recv_by(sock, deadline, wake)
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
            try:
                self._connect()
            except errors.ZRPCError:
                if not self._stopping():
                    raise
            return
        now = time.monotonic()
        if now < self._next_attempt:
            return
        try:
            self._connect()
        except errors.ZRPCError as e:
            # The broker is restarting, refused the connection (Fatal), or still holds
            # our old connection's name: retried for ever.
            if not _service.reregister_may_help(e) and not self._stopping():
                raise
            self._next_attempt = time.monotonic() + self._backoff.next_delay()

    def _stopping(self) -> bool:
        """Whether :meth:`run` was asked to stop (a connection failing now is not reported: the
        serving loop stops next)."""
        return self._armed and bool(self._stop_requests)

    def _send(self, frame: bytes) -> None:
        if self._sock is None:
            return
        try:
            self._sock.sendall(frame)
        except OSError:
            self._lost()

    def _read_broker(self) -> bool:
        """Reads the broker's frames: answers pings, drops cancelled queued requests, queues
        requests, takes the ``Ack`` of a stop's ``Unregister``.

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
            elif kind == _proto.ACK and _proto.field(env, 1) in self._unacked:
                # The name is released (or was not held: NotRegistered); no call comes after this.
                self._unacked.discard(_proto.field(env, 1))
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

        While a handler runs under :meth:`run`, it also carries out a stop request: releases
        the name at once (the handler may run long), and gives up the drain on a second
        request or at its deadline (see :meth:`_keeper_stop`).
        """
        me = threading.current_thread()
        while not self._closed and self._keeper is me:
            job = self._running
            if job is None or self._give_up:
                time.sleep(KEEPER_AFTER / 2)
                continue
            if self._armed and (self._stop_requests or self._drain_deadline is not None):
                with self._io_lock:
                    if self._running is job:
                        self._keeper_stop()
            if self._keeper_lost or time.monotonic() - job.info.started < KEEPER_AFTER:
                time.sleep(KEEPER_TICK)
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

    def _keeper_stop(self) -> None:
        """The keeper's part of a stop while a handler runs (called with ``_io_lock`` held and
        the handler still running, so that the serving thread neither writes nor stops now).

        Starts the drain (sends ``Unregister``) on a first request; gives up on a second
        request, at the drain's deadline or when the connection is lost (`_give_up_now`).
        """
        if self._drain_deadline is None:
            if not self._stop_requests:
                return
            self._stop_requests.popleft()
            if not self._begin_drain():  # (after a loss the keeper saw, it gives up just below)
                self._keeper_lost = True
        elif self._give_up:
            return
        why = self._give_up_reason(self._keeper_lost)
        if why is not None:
            self._give_up_now(why)

    def _give_up_now(self, why: str) -> None:
        """The keeper gives up the drain while a handler runs: the connection is shut down now
        (the broker re-delivers the call, or fails it with ``ServiceGone`` for ``no_retry``),
        and the handler is interrupted if :meth:`run` installed the stop signals' handlers
        (the signal makes the handler raise; a handler in a thread cannot be interrupted
        otherwise: ``run()`` then returns when it does)."""
        _service.log.warning("stopping %r now: %s (the running handler is given up)", self.name, why)
        self._give_up = True
        _proto.shut_down(self._sock)
        self._keeper_lost = True
        # `run()` cannot have restored the handlers: it waits for `_io_lock`, held now.
        if self._signal_thread is not None and not self._stop_raised:
            signal.pthread_kill(self._signal_thread, _service.STOP_SIGNALS[0])

    # -- stopping --------------------------------------------------------

    def shutdown(self) -> None:
        """Asks :meth:`run` to stop gracefully; returns at once.

        May be called from any thread (and from a signal handler). A second
        call during the stop ends it at once. A call made while ``run()`` is
        not serving applies to the next ``run()``; :meth:`run_once` does not
        stop by itself.
        """
        self._stop_requests.append(None)
        try:
            self._wake_w.send(b"\0")
        except OSError:  # the buffer is full (the wake is pending anyway), or closed
            pass

    def _on_signal(self, signum, frame) -> None:
        """The handler of SIGTERM and SIGINT while :meth:`run` serves (in the serving thread)."""
        self.shutdown()
        if self._running is None or self._stop_raised:
            return
        if self._give_up or len(self._stop_requests) + (self._drain_deadline is not None) >= 2:
            # A second signal (or the keeper's, past the deadline) while a handler runs in this
            # thread: unwind it, `run()` closes the connection and returns.
            self._stop_raised = True
            raise _StopNow("drain given up" if self._give_up else "second stop request")

    def _install_signals(self) -> Dict[int, Any]:
        """Installs the stop signals' handlers (``stop_on_signals``, main thread only); returns the old ones."""
        old: Dict[int, Any] = {}
        if not self.stop_on_signals or threading.current_thread() is not threading.main_thread():
            return old
        for sig in _service.STOP_SIGNALS:
            old[sig] = signal.signal(sig, self._on_signal)
        self._signal_thread = threading.get_ident()
        return old

    def _restore_signals(self, old: Dict[int, Any]) -> None:
        for sig, handler in old.items():
            # None: a handler not installed from Python, which cannot be put back.
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self._signal_thread = None

    def _begin_drain(self) -> bool:
        """Starts a drain: releases the name (``Unregister``). Returns False if the connection failed."""
        self._drain_deadline = time.monotonic() + self.drain_timeout
        if self._sock is None:
            return True
        self._unacked.add(_service.UNREGISTER_REQ)
        try:
            self._sock.sendall(_service.unregister_frame(_service.UNREGISTER_REQ, self.name))
        except OSError:
            return False
        return True

    def _give_up_reason(self, lost: bool) -> Optional[str]:
        """Why the drain in progress must give up now, if it must."""
        if self._stop_requests:
            return "second stop request"
        if lost or self._sock is None:
            return "lost the zrpcd connection while stopping"
        if time.monotonic() >= self._drain_deadline:
            return "drain timeout (%g s)" % self.drain_timeout
        return None

    def _stop_step(self) -> bool:
        """One look at the stop, by the serving loop of :meth:`run` (no handler runs): starts a
        drain on a request; returns True when ``run()`` is to close and return (the drain is
        over, or gives up)."""
        if self._drain_deadline is None:
            if not self._stop_requests:
                return False
            self._stop_requests.popleft()
            if not self._begin_drain():
                self._lost()
            if self._sock is None:
                # Not connected (the stop came before the first connection, or while
                # reconnecting): nothing delivered is left to answer.
                return True
        if self._give_up:
            return True
        why = self._give_up_reason(False)
        if why is not None:
            _service.log.warning("stopping %r now: %s", self.name, why)
            return True
        return not self._unacked and not any(env[0] == _proto.REQUEST for env, _ in self._queue)

    def _take_wake(self) -> None:
        """Empties the wake socket (its bytes only wake the selector)."""
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass

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

        ``timeout`` in seconds bounds the wait (``None``, or a negative value
        as with the original zrpc: wait until an event). Returns whether an
        event was handled. Pings, cancels and reconnecting are handled on the
        way and are not events.
        """
        if timeout is not None and timeout < 0:
            timeout = None
        deadline = None if timeout is None else time.monotonic() + timeout
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
                elif what == "wake":
                    self._take_wake()
                else:
                    callback()
                    return True
            if self._handle_queued():
                return True
            if timeout == 0 or (deadline is not None and time.monotonic() >= deadline):
                return False

    def run(self) -> None:
        """Serves until stopped, then returns.

        It stops gracefully on SIGTERM, SIGINT (with ``stop_on_signals``) or
        :meth:`shutdown`: the name is released (``Unregister``: the broker
        delivers no new call here; calls for the name wait for the next
        instance, or go to the other instances of a shared name); what was
        delivered before the broker took the release in is served as usual
        (the running handler finishes, queued requests run, pings are
        answered) and the replies are written; then the connection is closed
        and ``run()`` returns. So a restart loses no call and runs none
        twice, and a ``no_retry`` caller gets its result instead of
        ``ServiceGone``. A stop while connecting or registering (a broker
        slow to answer) gives that up at once and returns: nothing was
        delivered yet.

        The drain lasts at most ``drain_timeout`` seconds; past it, or on a
        second signal or :meth:`shutdown`, or if the connection is lost, the
        stop gives up at once: the connection is closed (the broker
        re-delivers the calls not answered, or fails the ``no_retry`` ones
        with ``ServiceGone``) and the running handler is interrupted (an
        internal ``BaseException`` raised in it by the signal handler).

        Signal handlers can only be installed in the main thread: ``run()``
        installs its SIGTERM and SIGINT handlers only when called there, and
        puts the previous ones back when it returns. Called in another
        thread, it stops on :meth:`shutdown` only, and cannot interrupt a
        running handler when giving up: the connection is closed at once
        all the same, and ``run()`` returns when the handler does.
        """
        old = self._install_signals()
        self._armed = True
        try:
            self._serve_until_stopped()
        except _StopNow as e:
            if not self._give_up:  # else the keeper said why
                _service.log.warning("stopping %r now: %s (the running handler is given up)", self.name, e)
        finally:
            self._armed = False
            self._restore_signals(old)
            self._end_stop()

    def _serve_until_stopped(self) -> None:
        while True:
            if self._stop_step():
                return
            if self._sock is None and self._drain_deadline is None:
                self._try_connect()
            if self._handle_queued():
                continue
            now = time.monotonic()
            wait = None
            if self._drain_deadline is not None:
                wait = max(0.0, self._drain_deadline - now)
            elif self._sock is None:
                wait = max(0.0, self._next_attempt - now)
            for key, _ in self._sel.select(wait):
                what, callback = key.data
                if what == "broker":
                    if self._sock is not None and not self._read_broker():
                        self._lost()
                elif what == "wake":
                    self._take_wake()
                else:
                    callback()

    def _end_stop(self) -> None:
        """The end of ``run()``: closes the connection (after a stop) and resets the stop."""
        stopped = self._drain_deadline is not None or self._give_up or self._stop_raised
        self._running = None
        self._drain_deadline = None
        self._unacked.clear()
        self._give_up = self._stop_raised = False
        self._stop_requests.clear()
        self._take_wake()
        if stopped:
            # The replies were written (sendall); closing tells the broker that we are gone.
            self._lost()
            self._keeper_lost = False
            # The keeper thread ends; a later run() starts another.
            self._keeper = None

    def close(self) -> None:
        """Disconnects from the broker (releasing the name) and stops the keeper thread."""
        self._closed = True
        self._lost()
        if self._wake_r.fileno() >= 0:
            self._sel.unregister(self._wake_r)
            self._wake_r.close()
            self._wake_w.close()
