"""What the blocking and the asyncio service share: method discovery, the
``Request`` decision (reply cache, ``zrpc.describe``, unknown methods, bad
payloads), building ``Reply`` frames, and the reply cache. Internal.
"""

import contextvars
import errno
import inspect
import logging
import selectors
import signal
import time
from collections import OrderedDict
from typing import Any, Callable, Dict, Optional, Tuple

from . import _proto, errors

#: Default bound on the number of cached replies (as zrpc-service).
DEFAULT_CACHE_ENTRIES = 10_000
#: Default bound on the bytes of cached reply payloads and error messages.
DEFAULT_CACHE_BYTES = 16 * 1024 * 1024
#: Longest error message (UTF-8 bytes) sent in a ``Reply`` (as zrpc-service); longer ones,
#: and ones that would not fit in the broker's max message size, are truncated.
MAX_ERROR_MESSAGE = 64 * 1024
#: Room kept for an error ``Reply``'s envelope besides its message.
REPLY_OVERHEAD = 64
#: Room kept for a successful ``Reply``'s envelope besides its payload (as zrpc-service):
#: ``[REPLY, rid, 0, ""]`` takes at most 13 bytes. A value the broker accepted as a call's
#: payload therefore fits in the reply (the ``Call`` envelope is longer).
RESULT_OVERHEAD = 16
#: What ends a truncated error message.
TRUNCATED_MARK = "... [truncated]"
#: Default bound, in seconds, on a graceful stop's drain (as zrpc-service).
DEFAULT_DRAIN_TIMEOUT = 30.0
#: Seconds a stop gives its last replies to be written out at least, even at the drain's
#: deadline (cut there, the calls that ran would be re-delivered and run again; as zrpc-service).
FINAL_FLUSH = 1.0
#: The signals on which a server's ``run()``/``serve()`` stops gracefully (unless
#: ``stop_on_signals=False``).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
#: The ``req`` of the ``Unregister`` a stop sends (registrations count from 1; as zrpc-service).
UNREGISTER_REQ = 1 << 63

#: Where the servers report a stop that gave up (drain timeout, second request, lost connection).
log = logging.getLogger("zrpc")

#: The error codes a service sends in a ``Reply``. A handler's :class:`zrpc.errors.ZRPCError`
#: with another code (the broker's own: ``Shutdown``, ``Timeout``, ``ServiceGone``, ...,
#: escaping from a nested call, say) is sent as ``Remote``: callers act on those codes as
#: reports about the broker, their connection or the call's delivery (a ``Shutdown`` result
#: is resent on the next connection; ``TimeoutNoService`` means that the call never ran).
SERVICE_CODES = frozenset({errors.NO_SUCH_METHOD, errors.REMOTE, errors.BAD_PAYLOAD,
                           errors.LIMIT_EXCEEDED, errors.ACCESS_DENIED})

_MARK = "_zrpc_rpc_method"


def rpc_method(func: Callable) -> Callable:
    """Marks a method of a :class:`zrpc.server.Server` (or :class:`zrpc.aio.Server`) subclass as callable over zrpc.

    The method is called with the decoded payload as its one argument and
    its return value is sent back (tuples arrive as arrays). A method that
    takes no payload parameter (``def ping(self)``) is called without one,
    whatever payload came (callers send ``None``; as a Rust method without
    parameters). An exception it
    raises is sent as a ``Remote`` error with its type and text; raising a
    :class:`zrpc.errors.ZRPCError` whose code a service may send
    (``AccessDenied``, ``LimitExceeded``, ``BadPayload``, ``NoSuchMethod``,
    ``Remote``) sends that code; one with a code only the broker sends
    (``Shutdown``, ``Timeout``, ``ServiceGone``, ...) is sent as ``Remote``
    too. A message too long for the broker's max message size (or longer
    than 64 KiB) is truncated, ending with ``... [truncated]``. A handler
    raising ``SystemExit`` (``sys.exit()``) ends the process, as in any
    Python code; the ``zrpc`` logger says so, naming the method, and the
    broker re-delivers the call (or fails a ``no_retry`` call with
    ``ServiceGone``). Its docstring and annotations are what
    ``zrpc.describe`` reports (``"any"`` for a parameter or return value
    without annotation).
    """
    setattr(func, _MARK, True)
    return func


class CallInfo:
    """Who made the request being handled (``Request`` fields; uid/gid/pid come from the kernel via the broker)."""

    __slots__ = ("service", "method", "caller_instance", "caller_call", "caller_uid", "caller_gid",
                 "caller_pid", "deadline", "counter", "started")

    def __init__(self, env: list, counter: int):
        f = _proto.field
        self.service: str = f(env, 2)
        self.method: str = f(env, 3)
        timeout_ms = f(env, 4)
        #: ``time.monotonic()`` deadline of the call, or ``None``.
        self.deadline: Optional[float] = None if timeout_ms is None else time.monotonic() + timeout_ms / 1000
        self.caller_instance: int = f(env, 5, 0)
        self.caller_call: int = f(env, 6, 0)
        self.caller_uid: Optional[int] = f(env, 7)
        self.caller_gid: Optional[int] = f(env, 8)
        self.caller_pid: Optional[int] = f(env, 9)
        #: The server's request counter including this request.
        self.counter = counter
        #: ``time.monotonic()`` when the request was taken up.
        self.started = time.monotonic()


_current: contextvars.ContextVar = contextvars.ContextVar("zrpc_current_call", default=None)


def current_call() -> Optional[CallInfo]:
    """The :class:`CallInfo` of the request whose handler is running (``None`` outside a handler)."""
    return _current.get()


def methods_of(obj: Any) -> Dict[str, Callable]:
    """The ``@rpc_method`` methods of ``obj``, bound, by name."""
    out = {}
    for name in dir(type(obj)):
        attr = getattr(type(obj), name, None)
        if callable(attr) and getattr(attr, _MARK, False):
            out[name] = getattr(obj, name)
    return out


#: The type ``zrpc.describe`` reports for a parameter or return value without annotation (the
#: name of the shape of a dynamic value, docs/protocol.md; what ``zrpc list`` then prints).
ANY_TYPE = "any"


def takes_payload(fn: Callable) -> bool:
    """Whether the (bound) handler ``fn`` has a parameter for the payload: a positional
    parameter or ``*args``. One without (``def ping(self)``) is called with no argument."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # no signature to read (a builtin): as before, one argument
        return True
    return any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL) for p in params)


def describe(service: str, methods: Dict[str, Callable]) -> dict:
    """The answer to ``zrpc.describe``: the service's methods with their docstrings and
    annotations (:data:`ANY_TYPE` where there is none)."""
    out = []
    for name in sorted(methods):
        fn = methods[name]
        sig = inspect.signature(fn)
        params = []
        for p in sig.parameters.values():
            ann = ANY_TYPE if p.annotation is inspect.Parameter.empty else _type_name(p.annotation)
            params.append({"name": p.name, "type": ann})
        ret = ANY_TYPE if sig.return_annotation is inspect.Signature.empty else _type_name(sig.return_annotation)
        out.append({"name": name, "doc": inspect.getdoc(fn) or "", "params": params, "returns": ret})
    return {"service": service, "methods": out}


def _type_name(t: Any) -> str:
    return t if isinstance(t, str) else getattr(t, "__name__", repr(t))

_U64 = 1 << 64


def _dict_key(key: tuple) -> bytes:
    """The key of an entry in its uid's dict: the caller's instance and call ids as bytes.

    Not the tuple: Python's hash of a tuple of ints is the same in every process and can be
    inverted, so a caller could pick instance and call ids that all collide and make every
    insertion into its entries compare with all of them (5,000 such entries: ~100 us a put
    instead of 0.5). Bytes hash with the process's random seed (``PYTHONHASHSEED``)."""
    return key[0].to_bytes(8, "little") + key[1].to_bytes(8, "little")


def _cost(payload: bytes, message: str) -> int:
    """Bytes an outcome counts against the byte bound (as zrpc-service: the message in UTF-8)."""
    return len(payload) + (len(message.encode("utf-8", "replace")) if message else 0)


class ReplyCache:
    """Recent outcomes by call identity ``(caller_instance, caller_call, caller_uid)``.

    An entry holds ``(service, method, code, message, payload)``; it answers
    only a request to the same service and method. Each caller uid has its
    own entries, oldest evicted first, and the bounds hold for all uids
    together: when they are reached, the entry evicted is the oldest of the
    uid holding the largest share of the cache (the larger of its fractions
    of the two bounds), so one user calling fast evicts its own replies, not
    the ones another user's client needs after a reconnect (as zrpc-service
    does, docs/security.md).
    """

    def __init__(self, max_entries: int = DEFAULT_CACHE_ENTRIES, max_bytes: int = DEFAULT_CACHE_BYTES):
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0
        self.count = 0
        #: uid -> [OrderedDict of its entries, its bytes]
        self.users: Dict[int, list] = {}

    def __len__(self) -> int:
        return self.count

    def get(self, key: tuple, service: str, method: str) -> Optional[tuple]:
        """The cached outcome ``(code, message, payload)`` of ``key`` for this service and method."""
        u = self.users.get(key[2])
        e = None if u is None else u[0].get(_dict_key(key))
        if e is None or e[0] != service or e[1] != method:
            return None
        return e[2:]

    def _share(self, u: list) -> int:
        return max(len(u[0]) * self.max_bytes, u[1] * self.max_entries)

    def _evict_largest(self) -> None:
        uid = max(self.users, key=lambda k: self._share(self.users[k]))
        u = self.users[uid]
        _, e = u[0].popitem(last=False)
        size = _cost(e[4], e[3])
        u[1] -= size
        self.bytes -= size
        self.count -= 1
        if not u[0]:
            del self.users[uid]

    def put(self, key: tuple, service: str, method: str, code: int, message: str, payload: bytes) -> None:
        """Keeps an outcome (not when the cache is disabled or the outcome is larger than the byte bound)."""
        size = _cost(payload, message)
        if self.max_entries <= 0 or self.max_bytes <= 0 or size > self.max_bytes:
            return
        u = self.users.get(key[2])
        k = _dict_key(key)
        if u is not None:
            old = u[0].pop(k, None)
            if old is not None:
                old_size = _cost(old[4], old[3])
                u[1] -= old_size
                self.bytes -= old_size
                self.count -= 1
        while self.users and (self.count + 1 > self.max_entries or self.bytes + size > self.max_bytes):
            self._evict_largest()
        u = self.users.setdefault(key[2], [OrderedDict(), 0])
        u[0][k] = (service, method, code, message, payload)
        u[1] += size
        self.bytes += size
        self.count += 1


def reply_frame(rid: int, code: int, message: str, payload: bytes = b"") -> bytes:
    """A ``Reply`` frame."""
    return _proto.encode_frame([_proto.REPLY, rid, code, message], payload if code == 0 else b"")


def bound_message(message: str, room: int) -> str:
    """``message`` cut to at most ``room`` UTF-8 bytes (and :data:`MAX_ERROR_MESSAGE`), ending
    with :data:`TRUNCATED_MARK` when cut. Characters UTF-8 cannot encode (lone surrogates)
    become ``?``."""
    room = max(0, min(room, MAX_ERROR_MESSAGE))
    data = message.encode("utf-8", "replace")
    if len(data) <= room:
        return data.decode("utf-8")
    if room <= len(TRUNCATED_MARK):
        return TRUNCATED_MARK[:room]
    return data[:room - len(TRUNCATED_MARK)].decode("utf-8", "ignore") + TRUNCATED_MARK


#: The ``arg`` of a :class:`Job` whose handler takes no payload parameter.
NO_PAYLOAD = object()


class Job:
    """A request that is to run a handler: what :meth:`ServiceCore.plan` hands to the server loop."""

    __slots__ = ("rid", "key", "info", "handler", "arg")

    def __init__(self, rid, key, info, handler, arg):
        self.rid = rid
        self.key = key
        self.info = info
        self.handler = handler
        self.arg = arg

    def call(self) -> Any:
        """Calls the handler: with the payload, or with no argument if it takes none
        (:data:`NO_PAYLOAD`). Returns what it returns (a coroutine for an ``async def``)."""
        if self.arg is NO_PAYLOAD:
            return self.handler()
        return self.handler(self.arg)


def handler_exits(job: Job, exc: SystemExit) -> None:
    """Says on the ``zrpc`` logger that the handler of ``job`` raised ``SystemExit``, which the
    caller then lets end the process (as it would without zrpc): otherwise the service would
    vanish without a word."""
    log.error("the handler of %s.%s raised SystemExit(%r): the process exits without answering "
              "(the broker re-delivers the call, or fails it with ServiceGone if no_retry)",
              job.info.service, job.info.method, exc.code)


class ServerBase:
    """What the blocking and the asyncio ``Server`` share: the service's
    name (derived from the class name when not given), socket directory,
    ``shared`` flag, agent string, connect timeout, drain timeout, instance id and
    :class:`ServiceCore`."""

    def __init__(self, name: Optional[str], socket_dir: Optional[str], shared: bool,
                 reply_cache: int, agent: str, drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
                 stop_on_signals: bool = True, connect_timeout: float = _proto.HANDSHAKE_TIMEOUT):
        #: Seconds connecting and the handshake may take, and then the registration
        #: (each; see :class:`zrpc.server.Server`).
        self.connect_timeout = _proto.check_connect_timeout(connect_timeout)
        self.name = name if name is not None else _proto.snake_case(type(self).__name__)
        self.socket_dir = _proto.resolve_socket_dir(socket_dir)
        self.shared = shared
        self.agent = agent
        if not drain_timeout >= 0:
            raise ValueError("drain_timeout must be a number of seconds >= 0, not %r" % (drain_timeout,))
        #: Seconds a graceful stop waits for the calls already delivered (see ``shutdown``).
        self.drain_timeout = float(drain_timeout)
        #: Whether ``run()``/``serve()`` stop gracefully on SIGTERM and SIGINT.
        self.stop_on_signals = bool(stop_on_signals)
        #: The instance id sent in ``Hello``, kept across reconnects.
        self.instance = _proto.random_id()
        self._core = ServiceCore(self, self.name, reply_cache, DEFAULT_CACHE_BYTES)


class ServiceCore:
    """The request logic of a service object, independent of how it does I/O."""

    def __init__(self, obj: Any, name: str, cache_entries: int, cache_bytes: int):
        if name == _proto.BROKER_SERVICE:
            raise errors.InvalidNameError(
                "invalid service name %r: the name %r is reserved for the broker (zrpcd's built-in "
                "service); choose another name" % (name, name), service=name)
        if not _proto.valid_name(name):
            raise _proto.name_error("service", name, service=name)
        self.obj = obj
        self.name = name
        self.methods = methods_of(obj)
        #: The names of the methods that take no payload parameter (called without one).
        self.no_payload = {n for n, fn in self.methods.items() if not takes_payload(fn)}
        self.cache = ReplyCache(cache_entries, cache_bytes)
        self.counter = 0
        self.max_reply = _proto.DEFAULT_MAX_MESSAGE_SIZE

    def plan(self, env: list, payload: bytes) -> Tuple[Optional[bytes], Optional[Job]]:
        """Decides what a ``Request`` needs: ``(reply_frame, None)`` when it is answered at once
        (reply cache, ``zrpc.describe``, unknown method, undecodable payload), else ``(None, job)``.
        """
        rid = _proto.field(env, 1)
        method = _proto.field(env, 3)
        service = _proto.field(env, 2)
        if method == _proto.DESCRIBE_METHOD:
            return self._reply(rid, 0, "", _proto.pack(describe(self.name, self.methods))), None
        instance = _proto.field(env, 5, 0)
        call_id = _proto.field(env, 6, 0)
        key = None
        # (The broker sends u64 ids; anything else is not cached.)
        if isinstance(instance, int) and 0 < instance < _U64 and isinstance(call_id, int) \
                and 0 <= call_id < _U64:
            key = (instance, call_id, _proto.field(env, 7))
            hit = self.cache.get(key, service, method)
            if hit is not None:
                return self._reply(rid, *hit), None
        handler = self.methods.get(method)
        if handler is None:
            return self._outcome(rid, key, service, method, errors.NO_SUCH_METHOD,
                                 "service %r has no method %r" % (self.name, method), b""), None
        if method in self.no_payload:
            # As a Rust method without parameters (docs/protocol.md, Payloads):
            # whatever payload came is ignored, not even decoded.
            arg = NO_PAYLOAD
        else:
            try:
                arg = _proto.unpack(payload)
            except Exception as e:
                return self._outcome(rid, key, service, method, errors.BAD_PAYLOAD,
                                     "cannot decode the arguments: %s" % e, b""), None
        self.counter += 1
        return None, Job(rid, key, CallInfo(env, self.counter), handler, arg)

    def _bounded(self, code: int, message: str, payload: bytes) -> Tuple[int, str, bytes]:
        """The outcome as sent, within the broker's max message size: a return value too large
        becomes a ``LimitExceeded`` error, an error message too long is truncated."""
        if code == 0:
            if len(payload) + RESULT_OVERHEAD <= self.max_reply:
                return code, message, payload
            code, message = (errors.LIMIT_EXCEEDED,
                             "the reply of %d bytes exceeds the broker's maximum message size of %d bytes"
                             % (len(payload), self.max_reply))
        return code, bound_message(message, self.max_reply - REPLY_OVERHEAD), b""

    def _reply(self, rid: int, code: int, message: str, payload: bytes) -> bytes:
        """The ``Reply`` frame of an outcome (bounded: the limit may have changed since it was cached)."""
        return reply_frame(rid, *self._bounded(code, message, payload))

    def _outcome(self, rid, key, service, method, code, message, payload) -> bytes:
        """The ``Reply`` frame of an outcome, bounded; the bounded outcome is what is cached."""
        code, message, payload = self._bounded(code, message, payload)
        if key is not None:
            self.cache.put(key, service, method, code, message, payload)
        return reply_frame(rid, code, message, payload)

    def cached(self, job: Job) -> Optional[bytes]:
        """The reply of ``job`` from the cache, if a duplicate of it finished meanwhile."""
        if job.key is None:
            return None
        hit = self.cache.get(job.key, job.info.service, job.info.method)
        return None if hit is None else self._reply(job.rid, *hit)

    def finish(self, job: Job, result: Any = None, exc: Optional[BaseException] = None) -> bytes:
        """The ``Reply`` frame of a handler's return value (or exception); caches the outcome.

        The outcome is bounded (see :meth:`_bounded`) before it is cached, so that a
        re-sent call is answered with a frame the broker accepts too.
        """
        try:
            code, message, data = _wire_outcome(result, exc)
        except Exception as e:
            # Making the text of an exception runs the handler's code (its
            # ``__str__``) and ``repr`` of whatever it holds, which may be a
            # caller's payload: a 1,000-deep list makes ``str`` raise
            # RecursionError. Every call gets an answer all the same.
            name = type(exc).__name__ if exc is not None else "the return value"
            code, message, data = (errors.REMOTE, "%s (its text could not be made: %s)"
                                   % (name, type(e).__name__), b"")
        return self._outcome(job.rid, job.key, job.info.service, job.info.method, code, message, data)

    def run_sync(self, job: Job) -> bytes:
        """Runs a synchronous handler and returns its reply frame."""
        token = _current.set(job.info)
        try:
            result = job.call()
        except Exception as e:
            return self.finish(job, exc=e)
        except SystemExit as e:
            handler_exits(job, e)
            raise
        finally:
            _current.reset(token)
        return self.finish(job, result)


def _wire_outcome(result: Any, exc: Optional[BaseException]) -> Tuple[int, str, bytes]:
    """The code, message and payload a handler's return value (or exception) is answered with."""
    if exc is None:
        try:
            return 0, "", _proto.pack(result)
        except errors.EncodeError as e:
            return errors.REMOTE, "cannot encode the return value: %s" % e, b""
    if isinstance(exc, errors.ZRPCError) and exc.code in SERVICE_CODES:
        return exc.code, exc.message or str(exc), b""
    return errors.REMOTE, "%s: %s" % (type(exc).__name__, exc), b""


def fileno(fd: Any) -> int:
    """The descriptor number of ``fd``: a file-like object (``fileno()``) or a number."""
    return fd if isinstance(fd, int) else fd.fileno()


def not_pollable(n: int, exc: OSError) -> errors.NotPollableError:
    """The error of a descriptor ``n`` that a selector refused to watch with ``exc``."""
    if exc.errno == errno.EPERM:
        why = ("epoll cannot watch it: it is a regular file or a directory (always readable); "
               "read such a file directly, or watch a pipe, socket, FIFO, terminal or eventfd")
    elif exc.errno == errno.EBADF:
        why = "it is not an open file descriptor"
    else:
        why = exc.strerror or str(exc)
    return errors.NotPollableError("cannot watch file descriptor %d for reading: %s" % (n, why))


def check_pollable(fd: Any) -> None:
    """Raises :class:`zrpc.errors.NotPollableError` if ``fd`` cannot be watched for
    readability (with the ``OSError`` as its cause)."""
    n = fileno(fd)
    sel = selectors.DefaultSelector()
    try:
        sel.register(n, selectors.EVENT_READ)
    except OSError as e:
        raise not_pollable(n, e) from e
    finally:
        sel.close()


def reregister_may_help(exc: BaseException) -> bool:
    """Whether a server's failed reconnect (connect and register) is worth retrying with backoff:
    when :func:`zrpc._proto.reconnect_may_help` says so, and when the registration was refused
    with ``NameTaken`` (the broker still holds the old connection's name) or ``Shutdown``."""
    return _proto.reconnect_may_help(exc) or isinstance(exc, (errors.NameTakenError, errors.ShutdownError))


def register_frame(req: int, name: str, shared: bool) -> bytes:
    """A ``Register`` frame."""
    return _proto.encode_frame([_proto.REGISTER, req, name, bool(shared)])


def unregister_frame(req: int, name: str) -> bytes:
    """An ``Unregister`` frame."""
    return _proto.encode_frame([_proto.UNREGISTER, req, name])


def check_ack(env: list, name: str) -> None:
    """Raises the error of a failed ``Ack`` of ``Register``/``Unregister``."""
    code = _proto.field(env, 2, 0)
    if code:
        raise errors.from_code(code, _proto.field(env, 3, ""), service=name)
