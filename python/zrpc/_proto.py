"""The zrpc wire protocol: framing, envelopes, the handshake, the broker
identity check and reconnect backoff (the table of pending calls is
:mod:`zrpc._calls`).

This is the one implementation of these that the blocking
(:mod:`zrpc.client`, :mod:`zrpc.server`) and the asyncio (:mod:`zrpc.aio`)
sides share. Internal: the format is described in ``docs/protocol.md``.
"""

import contextlib
import gc
import logging
import numbers
import os
import random
import re
import select
import socket
import struct
import time
from typing import Any, Dict, List, Optional, Tuple

import msgpack

from . import errors

PROTOCOL_VERSION = 1
SOCKET_FILE = "zrpcd.sock"
SOCKET_DIR_ENV = "ZRPC_SOCKET_DIR"
BROKER_UID_ENV = "ZRPC_BROKER_UID"
SYSTEM_SOCKET_DIR = "/run/zrpc"
BROKER_SERVICE = "zrpcd"
DESCRIBE_METHOD = "zrpc.describe"
#: Timeouts above this many milliseconds (365 days) mean "no deadline".
MAX_TIMEOUT_MS = 365 * 24 * 3600 * 1000
#: Default broker limit on body_len (announced again in Welcome).
DEFAULT_MAX_MESSAGE_SIZE = 16 * 1024 * 1024
#: Slack added to the announced maximum for frames *from* the broker.
INCOMING_SLACK = 4096
#: Largest frame accepted before Welcome says the real limit.
HANDSHAKE_MAX_BODY = 64 * 1024
#: Default bound, in seconds, on connecting and the handshake (and, for a server, on the
#: registration that follows); the ``connect_timeout`` keyword of the clients and servers.
HANDSHAKE_TIMEOUT = 5.0
#: Exclusive upper bound on ``connect_timeout`` (a socket timeout must be finite).
MAX_CONNECT_TIMEOUT = 1e9
#: The local safety margin added to a call's timeout: if neither the broker's
#: Timeout nor a Result arrived by then, the call fails locally.
SAFETY_MARGIN = 2.0
HEADER = struct.Struct(">II")
NIL = b"\xc0"
AGENT = "zrpc-python/0.1.0"

# Message kinds.
HELLO, WELCOME, REGISTER, UNREGISTER, ACK, CALL, REQUEST, REPLY, RESULT, \
    CANCEL, PING, PONG, FATAL, EVENT = range(1, 15)

# Call flags.
NO_WAIT = 1
NO_RETRY = 2

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,127}$")


#: The naming rule of services and methods (docs/protocol.md, "Names"), as error messages state it.
NAME_RULE = ("names are 1-128 bytes of ASCII letters, digits, '_', '-' and '.', "
             "starting with a letter or '_'")


def valid_name(name: str) -> bool:
    """Whether ``name`` follows the naming rules (1-128 ASCII letters, digits, ``_-.``, starting with a letter or ``_``)."""
    # (fullmatch: `$` alone also matches before a final newline.)
    return isinstance(name, str) and _NAME.fullmatch(name) is not None and name.isascii()


def a_type(value: Any) -> str:
    """The type of ``value`` with its article, for error messages: ``a dict``, ``an int``."""
    name = type(value).__name__
    return ("an " if name[:1] in "aeiou" else "a ") + name


def name_error(kind: str, name: Any, service: Any = None, method: Any = None) -> errors.InvalidNameError:
    """The :class:`errors.InvalidNameError` of an invalid ``kind`` (``"service"`` or ``"method"``)
    name: what is wrong with it, and the rule (:data:`NAME_RULE`)."""
    if not isinstance(name, str):
        why = "it is %s, not a str" % a_type(name)
    elif not name:
        why = "it is empty"
    elif len(name.encode("utf-8", "replace")) > 128:
        why = "it is %d bytes long" % len(name.encode("utf-8", "replace"))
    elif not (name[0].isascii() and (name[0].isalpha() or name[0] == "_")):
        why = "it starts with %r" % name[0]
    else:
        bad = next((c for c in name if not (c.isascii() and (c.isalnum() or c in "_-."))), None)
        why = "it breaks the rule" if bad is None else "%r is not allowed in it" % bad
    shown = name if not isinstance(name, str) or len(name) <= 60 else name[:40] + "..."
    return errors.InvalidNameError("invalid %s name %r: %s; %s" % (kind, shown, why, NAME_RULE),
                                   service=service, method=method)


def snake_case(name: str) -> str:
    """A class name as a service name, by the original zrpc's rule (and zrpc-proto's ``to_snake_case``):
    ``_`` before every run of capitals, ``_`` stripped at both ends, lower case.

    ``TestServer`` -> ``test_server``, ``HTTPServer`` -> ``httpserver``,
    ``MyHTTPServer`` -> ``my_httpserver``, ``Server2Go`` -> ``server2_go``.
    """
    return re.sub("([A-Z]+)", r"_\1", name).strip("_").lower()


def resolve_socket_dir(explicit: Optional[str] = None) -> str:
    """The socket directory: ``explicit``, else ``$ZRPC_SOCKET_DIR``, else the default.

    The default is ``/run/zrpc`` for root and whenever a system broker's
    socket exists there, else ``$XDG_RUNTIME_DIR/zrpc`` (as the Rust libraries).
    """
    if explicit:
        return os.fspath(explicit)
    env = os.environ.get(SOCKET_DIR_ENV)
    if env:
        return env
    if os.geteuid() == 0 or os.path.exists(os.path.join(SYSTEM_SOCKET_DIR, SOCKET_FILE)):
        return SYSTEM_SOCKET_DIR
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return os.path.join(xdg, "zrpc")
    return SYSTEM_SOCKET_DIR


def random_id() -> int:
    """A random non-zero u64 (instance ids)."""
    return random.SystemRandom().getrandbits(64) or 1


# ---- payloads --------------------------------------------------------------

def pack(value: Any) -> bytes:
    """Encodes a payload: one MessagePack value (str as str, bytes as bin, tuples as arrays)."""
    try:
        return msgpack.packb(value, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:
        raise errors.EncodeError("cannot encode the payload as MessagePack: %s" % e) from None


#: Payloads at least this large are decoded with the garbage collector paused.
GC_PAUSE_MIN = 64 * 1024


@contextlib.contextmanager
def _gc_paused(size: int):
    """Pauses the cyclic garbage collector while a large payload is decoded.

    Decoding allocates one Python object per value, and every 700 allocations
    the collector walks the young objects: 16 MiB of empty arrays took 7.6 s
    with it and 0.8 s without (red-team pass 8). The objects made hold no
    cycles. Not for small payloads (no gain, and the collector's switch is
    process-wide); not if it is already off. Another thread's decode may turn
    it back on first: that one is then only slower.
    """
    if size < GC_PAUSE_MIN or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


#: The environment variable that sets :data:`MAX_VALUES` (0: no bound).
MAX_VALUES_ENV = "ZRPC_MAX_PAYLOAD_VALUES"

#: The default of :data:`MAX_VALUES` (the Rust libraries' too).
DEFAULT_MAX_VALUES = 4 << 20


def _max_values_from_env() -> int:
    value = os.environ.get(MAX_VALUES_ENV)
    if value is None:
        return DEFAULT_MAX_VALUES
    try:
        n = int(value.strip())
    except ValueError:
        n = -1
    if n < 0:
        logging.getLogger("zrpc").warning(
            "%s=%r is not a number of values; using the default, %d",
            MAX_VALUES_ENV, value, DEFAULT_MAX_VALUES)
        return DEFAULT_MAX_VALUES
    return n


#: The most values one payload may decode into, counting the elements of
#: every array and the values of every map, once each (map keys are not
#: counted: msgpack interns str keys, and field names are not counted in
#: Rust either) (0: no bound). Each decoded value is a Python object of
#: up to ~70 bytes (an empty dict) for one byte on the wire: a caller's 16
#: MiB of empty maps took a service to 1.5 GB while its handler ran
#: (red-team pass 8). Past the bound a service answers ``BadPayload`` and a
#: client raises :class:`errors.DecodeError`. Payloads of at most this many
#: bytes are not counted (each value takes at least a byte). What it does
#: not bound: see docs/security.md (values of an array are counted when the
#: array completes, so arrays nested in the last element of others hold up
#: to about 40 bytes per payload byte before the count sees them). From
#: ``$ZRPC_MAX_PAYLOAD_VALUES`` when the module is imported, else
#: 4,194,304.
MAX_VALUES = _max_values_from_env()


def _too_many(bound: int) -> errors.DecodeError:
    return errors.DecodeError(
        "the payload holds more than %d values (a bound on what one payload may allocate, "
        "set by $%s where the payload is decoded; send bytes as bin, one value; "
        "docs/security.md)" % (bound, MAX_VALUES_ENV))


def _unpackb(data: bytes, bound: int, strict: bool) -> Any:
    """One decode: map keys str and bytes only (``strict``), or any, with the
    maps built from their pairs; at most ``bound`` values (0: no bound).

    The bound: no array or map longer than it is made (msgpack checks a
    container's header before making it), and hooks count each smaller
    container's elements (an array's, a map's values) as it completes. The
    hooks cost: a 1 MiB payload of 150,000 small maps decodes in 57 ms
    instead of 37 ms. Payloads no longer than ``bound`` in bytes are not
    counted (a value takes a byte at least).
    """
    kw: Dict[str, Any] = {"raw": False, "use_list": True, "strict_map_key": strict}
    if not bound or len(data) <= bound:
        if not strict:
            kw["object_pairs_hook"] = _map_of_pairs
        return msgpack.unpackb(data, **kw)
    left = [bound]

    def array(items: list, len=len) -> list:
        left[0] -= len(items)
        if left[0] < 0:
            raise _too_many(bound)
        return items

    def map_(m: Any, len=len) -> Any:
        left[0] -= len(m)
        if left[0] < 0:
            raise _too_many(bound)
        return m

    def pairs(p: list) -> dict:
        return _map_of_pairs(map_(p))

    kw.update(list_hook=array, max_array_len=bound, max_map_len=bound)
    if strict:
        kw["object_hook"] = map_
    else:
        kw["object_pairs_hook"] = pairs
    try:
        return msgpack.unpackb(data, **kw)
    except ValueError as e:
        if "max_array_len" in str(e) or "max_map_len" in str(e):
            raise _too_many(bound) from None
        raise


def unpack(data: bytes) -> Any:
    """Decodes a payload: exactly one MessagePack value; empty means nil.

    Arrays decode as lists, except map keys that are arrays: those decode as
    tuples (nested arrays in them too), since dict keys must be hashable. A
    map key that is (or holds) a map has no such form: :class:`errors.DecodeError`.
    So has a payload of more than :data:`MAX_VALUES` values.
    Raises ``ValueError`` (or a subclass) when ``data`` is not exactly one value.
    """
    if not data:
        return None
    try:
        with _gc_paused(len(data)):
            try:
                # Maps keyed by str and bytes only: their hashes are seeded.
                return _unpackb(data, MAX_VALUES, strict=True)
            except ValueError as e:
                if "strict_map_key" not in str(e):
                    # Not a map key (bad UTF-8, bytes after the value, a value
                    # cut short, too deep, too many values): decoding again
                    # would fail the same way, at the same cost.
                    raise
                # Other map keys (ints, arrays...): decode again, building maps
                # from their pairs, with keys checked for crafted hashes.
                return _unpackb(data, MAX_VALUES, strict=False)
    except (msgpack.StackError, RecursionError):
        # msgpack's own bound (1,024 levels; its error has no message), or
        # Python's on array map keys made hashable (the Rust libraries stop
        # at 256 levels, counting enum variants and options too).
        raise errors.DecodeError("depth limit exceeded: the value nests arrays and maps too deeply") from None


#: Most keys of one map that may share a hash. Python hashes str and bytes
#: with a seed chosen at random per process, but not ints, floats or
#: tuples: keys crafted to share one make building the dict quadratic (one
#: call with 60,000 such keys, 1.1 MB, held a service's only thread for a
#: minute, its pings unanswered, and the broker handed the call on to the
#: next instance). A map with more is refused (:class:`errors.DecodeError`).
MAX_KEYS_SHARING_A_HASH = 64


def _map_of_pairs(pairs: list) -> dict:
    keys = [_hashable_key(k) for k, _ in pairs]
    if len(keys) > MAX_KEYS_SHARING_A_HASH:
        seen: Dict[int, int] = {}
        for k in keys:
            h = hash(k)
            n = seen.get(h, 0) + 1
            if n > MAX_KEYS_SHARING_A_HASH:
                raise errors.DecodeError(
                    "a map has more than %d keys with the same hash (keys crafted to make "
                    "decoding slow?)" % MAX_KEYS_SHARING_A_HASH)
            seen[h] = n
    return dict(zip(keys, (v for _, v in pairs)))


def _hashable_key(key: Any) -> Any:
    """A decoded map key as a dict key: arrays as tuples."""
    if isinstance(key, list):
        return tuple(_hashable_key(k) for k in key)
    if isinstance(key, dict):
        raise errors.DecodeError("a map key is itself a map, which cannot be a Python dict key")
    return key


# ---- frames ----------------------------------------------------------------

def encode_frame(envelope: list, payload: bytes = b"") -> bytes:
    """One frame: the two lengths, the envelope (a MessagePack array) and the payload."""
    env = msgpack.packb(envelope, use_bin_type=True)
    return HEADER.pack(len(env) + len(payload), len(env)) + env + payload


class FrameReader:
    """Splits a byte stream into frames, checking the two lengths.

    ``feed`` returns the complete frames as ``(envelope, payload)`` pairs,
    ``envelope`` being the decoded array (a list whose first element is the
    kind). A bad frame raises :class:`errors.ProtocolError` (or
    :class:`errors.LimitExceededError` for an oversized one).
    """

    def __init__(self, max_body: int = HANDSHAKE_MAX_BODY):
        self.buf = bytearray()
        self.max_body = max_body

    def feed(self, data: bytes) -> List[Tuple[list, bytes]]:
        """Adds ``data``; returns the frames completed by it."""
        buf = self.buf
        buf += data
        out = []
        pos = 0
        n = len(buf)
        while n - pos >= 8:
            body_len, env_len = HEADER.unpack_from(buf, pos)
            if body_len > self.max_body:
                raise errors.LimitExceededError(
                    "frame of %d bytes exceeds the limit of %d" % (body_len, self.max_body))
            if env_len < 1 or env_len > body_len:
                raise errors.ProtocolError("bad frame: env_len %d, body_len %d" % (env_len, body_len))
            end = pos + 8 + body_len
            if end > n:
                break
            env_end = pos + 8 + env_len
            out.append((decode_envelope(bytes(buf[pos + 8:env_end])), bytes(buf[env_end:end])))
            pos = end
        if pos:
            del buf[:pos]
        return out


def decode_envelope(data: bytes) -> list:
    """Decodes an envelope: one MessagePack array whose first element is the kind."""
    try:
        env = msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True)
    except Exception as e:  # msgpack raises several unrelated types
        raise errors.ProtocolError("bad envelope: %s" % e) from None
    if not isinstance(env, list) or not env or not isinstance(env[0], int) or isinstance(env[0], bool):
        raise errors.ProtocolError("bad envelope: not an array starting with a kind: %r" % (env,))
    types = FIELD_TYPES.get(env[0])
    if types is not None:
        for t, v in zip(types, env[1:]):
            if type(v) not in t:
                raise _bad_field(env, types)
    return env


def _bad_field(env: list, types: tuple) -> errors.ProtocolError:
    """The error of the first field of ``env`` whose type is not the one of ``types``."""
    i, t = next((i, t) for i, t in enumerate(types, 1) if type(env[i]) not in t)
    return errors.ProtocolError("bad envelope of kind %d: field %d is %r, not %s"
                                % (env[0], i, env[i], _TYPE_NAMES[t]))


_U = frozenset({int})
_N = frozenset({int, type(None)})
_S = frozenset({str})
_B = frozenset({bool})
_TYPE_NAMES = {_U: "an integer", _N: "an integer or nil", _S: "a string", _B: "a boolean"}
#: What each field after the kind must be, by kind (docs/protocol.md): an integer
#: (MessagePack's, never a boolean), one or nil, a string, a boolean. A peer may send fewer
#: fields (the readers' defaults apply) or more (later extensions: not checked). The success
#: code of ``Ack``, ``Reply`` and ``Result`` may be nil (read as 0, as before).
FIELD_TYPES = {HELLO: (_U, _U, _S, _U), WELCOME: (_U, _U, _U, _U), REGISTER: (_U, _S, _B),
               UNREGISTER: (_U, _S), ACK: (_U, _N, _S), CALL: (_U, _S, _S, _N, _U),
               REQUEST: (_U, _S, _S, _N, _U, _U, _N, _N, _N), REPLY: (_U, _N, _S),
               RESULT: (_U, _N, _S), CANCEL: (_U,), PING: (_U,), PONG: (_U,), FATAL: (_U, _S),
               EVENT: (_U,)}


def field(env: list, i: int, default: Any = None) -> Any:
    """Field ``i`` of an envelope (after the kind at 0), ``default`` when the peer sent fewer."""
    return env[i] if len(env) > i else default


def pong_frame(nonce: int) -> bytes:
    """The answer to ``Ping{nonce}``."""
    return encode_frame([PONG, nonce])


def call_frame(cid: int, service: str, method: str, timeout_ms: Optional[int], flags: int,
               payload: bytes) -> bytes:
    """A ``Call`` frame."""
    return encode_frame([CALL, cid, service, method, timeout_ms, flags], payload)


# ---- connecting ------------------------------------------------------------

def check_broker(sock: socket.socket, path: str) -> None:
    """Continues only if the broker's uid (``SO_PEERCRED``) is 0, our own, or ``$ZRPC_BROKER_UID``.

    Raises :class:`errors.UntrustedBrokerError` otherwise (nothing has been sent yet).
    """
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    own = os.geteuid()
    expected = None
    try:
        expected = int(os.environ.get(BROKER_UID_ENV, "").strip())
    except ValueError:
        pass
    if uid in (0, own) or uid == expected:
        return
    also = " and uid %d ($%s)" % (expected, BROKER_UID_ENV) if expected is not None else ""
    raise errors.UntrustedBrokerError(
        "refusing the zrpcd at %s: it runs as uid %d, but this process (uid %d) trusts only "
        "root, itself%s; another user may have taken the socket directory first (set "
        "%s=<uid> to trust a broker that runs as that user)" % (path, uid, own, also, BROKER_UID_ENV))


def _connect_hint(e: OSError) -> str:
    if isinstance(e, PermissionError):
        return (" (a permission problem, not a missing broker: this user may not open zrpcd's "
                "socket or its directory; check their owner and mode)")
    if isinstance(e, (FileNotFoundError, ConnectionRefusedError)):
        return " (is zrpcd running? is the socket directory right? see $ZRPC_SOCKET_DIR)"
    return ""


def check_connect_timeout(value: Any) -> float:
    """``value`` as a ``connect_timeout``: a number of seconds > 0 and below
    :data:`MAX_CONNECT_TIMEOUT`, as a float; anything else raises :class:`ValueError`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < MAX_CONNECT_TIMEOUT:
        raise ValueError("connect_timeout must be a number of seconds > 0 and < %g, not %r"
                         % (MAX_CONNECT_TIMEOUT, value))
    return float(value)


class Welcome:
    """What the broker's ``Welcome`` said."""

    def __init__(self, conn_id: int, max_message_size: int):
        self.conn_id = conn_id
        self.max_message_size = max_message_size


#: Longest pause between two attempts to connect to a broker whose listen backlog is full.
BACKLOG_POLL = 0.05


def broker_path(socket_dir: str) -> str:
    """The broker's socket in ``socket_dir``."""
    return os.path.join(socket_dir, SOCKET_FILE)


def connect_steps(sock: socket.socket, path: str, deadline: float, timeout: float):
    """Connects ``sock`` (non-blocking, or with a timeout) to the broker's socket at ``path``,
    waiting until ``deadline`` (a ``time.monotonic()`` time; ``timeout`` is the whole, for the
    message) for room in its listen backlog. A generator: it yields how many seconds to pause
    before the next attempt (the blocking flavour sleeps, the asyncio one awaits) and ends
    once connected.

    A UNIX socket's connect fails at once with ``EAGAIN`` when the backlog is full (a broker
    stopped, wedged or overloaded) and leaves nothing to wait on, so it is tried again, every
    few ms up to :data:`BACKLOG_POLL` s (as zrpc-io's ``connect_until`` waits). Raises
    :class:`errors.ConnectError`.
    """
    pause = 0.001
    while True:
        try:
            sock.connect(path)
            return
        except BlockingIOError:
            pass
        except OSError as e:
            raise errors.ConnectError("cannot connect to zrpcd at %s: %s%s" % (path, e, _connect_hint(e))) from None
        left = deadline - time.monotonic()
        if left <= 0:
            raise errors.ConnectError(
                "zrpcd at %s did not accept the connection within %g s: its listen backlog is "
                "full (is it stopped, wedged or overloaded?)" % (path, timeout))
        yield min(pause, left)
        pause = min(pause * 2, BACKLOG_POLL)


class Handshake:
    """The client side of the handshake, without I/O: send :attr:`hello`, then :meth:`feed`
    what the broker sends until it returns the outcome. Shared by :func:`connect` (blocking)
    and :mod:`zrpc.aio`."""

    def __init__(self, path: str, instance: int, agent: str, timeout: float):
        self.path = path
        self.timeout = timeout
        self.hello = encode_frame([HELLO, PROTOCOL_VERSION, instance, agent])
        #: The frame reader to keep using (sized to the announced limit once welcomed).
        self.reader = FrameReader(HANDSHAKE_MAX_BODY)

    def timed_out(self) -> errors.ConnectError:
        """The error of a handshake that did not end within the timeout."""
        return errors.ConnectError("no answer to Hello from %s within %g s" % (self.path, self.timeout))

    def failed(self, e: OSError) -> errors.ConnectError:
        """The error of a handshake whose connection failed."""
        return errors.ConnectError("cannot connect to zrpcd at %s: %s" % (self.path, e))

    def feed(self, data: bytes) -> Optional[Tuple[Welcome, list]]:
        """Takes bytes read (``b""``: the broker closed the connection); returns ``None`` until
        the answer to ``Hello`` is complete, then the welcome and any frames after it. Raises
        :class:`errors.ConnectError`, :class:`errors.ProtocolError`,
        :class:`errors.VersionMismatchError` or the error of a ``Fatal``."""
        if not data:
            raise errors.ConnectError("the broker at %s closed the connection during the handshake" % self.path)
        try:
            frames = self.reader.feed(data)
        except errors.ZRPCError as e:
            raise errors.ProtocolError("bad answer to Hello from %s: %s" % (self.path, e)) from None
        if not frames:
            return None
        env, _ = frames[0]
        if env[0] == FATAL:
            raise fatal_error(env, "zrpcd refused the connection")
        if env[0] != WELCOME:
            raise errors.ProtocolError("expected Welcome from the broker, got kind %r" % env[0])
        if field(env, 1) != PROTOCOL_VERSION:
            raise errors.VersionMismatchError(
                "the broker speaks protocol version %r, this library version %d" % (field(env, 1), PROTOCOL_VERSION))
        welcome = Welcome(field(env, 2, 0), field(env, 3, DEFAULT_MAX_MESSAGE_SIZE))
        self.reader.max_body = welcome.max_message_size + INCOMING_SLACK
        return welcome, frames[1:]


def connect(socket_dir: str, instance: int, agent: str = AGENT,
            timeout: float = HANDSHAKE_TIMEOUT, wake: Any = None) -> Tuple[socket.socket, Welcome, FrameReader, list]:
    """Connects to the broker in ``socket_dir``: checks its uid, sends ``Hello``, waits for
    ``Welcome``, all within ``timeout`` seconds. ``wake``: a socket whose becoming readable
    gives the connection up (:class:`errors.ConnectError`; a blocking server's stop request).

    Returns the blocking socket, the welcome, the frame reader to keep using
    (sized to the announced limit) and any frames that arrived after the
    welcome. Raises :class:`errors.ConnectError`,
    :class:`errors.UntrustedBrokerError`, :class:`errors.VersionMismatchError`
    or the error of a ``Fatal``.
    """
    path = broker_path(socket_dir)
    deadline = time.monotonic() + timeout
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        for pause in connect_steps(sock, path, deadline, timeout):
            if wait_woken(wake, pause):
                raise given_up()
        check_broker(sock, path)
        hs = Handshake(path, instance, agent, timeout)
        try:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            sock.sendall(hs.hello)
            outcome = None
            while outcome is None:
                outcome = hs.feed(recv_by(sock, deadline, wake))
        except socket.timeout:
            raise hs.timed_out() from None
        except OSError as e:
            raise hs.failed(e) from None
        sock.settimeout(None)
        return sock, outcome[0], hs.reader, outcome[1]
    except BaseException:
        sock.close()
        raise


def recv_by(sock: socket.socket, deadline: float, wake: Any = None, size: int = 65536) -> bytes:
    """``sock.recv(size)`` bounded by ``deadline`` (a ``time.monotonic()`` time) as a whole: a
    peer trickling bytes in cannot stretch a wait bounded this way (a socket timeout bounds
    each read only). Raises ``socket.timeout`` once the deadline has passed, and
    :class:`errors.ConnectError` (see :func:`given_up`) if ``wake`` (a socket, or ``None``)
    becomes readable first."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise socket.timeout("timed out")
    if wake is not None:
        ready, _, _ = select.select([sock, wake], [], [], left)
        if sock not in ready:
            if ready:
                raise given_up()
            raise socket.timeout("timed out")
        left = max(deadline - time.monotonic(), 0.001)
    sock.settimeout(left)
    return sock.recv(size)


def wait_woken(wake: Any, seconds: float) -> bool:
    """Sleeps ``seconds``; with ``wake`` (a socket), returns early, True, if it becomes readable."""
    if wake is None:
        time.sleep(seconds)
        return False
    return bool(select.select([wake], [], [], seconds)[0])


def given_up() -> errors.ConnectError:
    """The error of a connection (or registration) given up by a stop request."""
    return errors.ConnectError("connecting to zrpcd was given up: the server is stopping")


def fatal_error(env: list, what: str) -> errors.ZRPCError:
    """The error of a ``Fatal`` frame (``fatal`` set), its message prefixed with ``what``."""
    e = errors.from_code(field(env, 1, errors.PROTOCOL), "%s: %s" % (what, field(env, 2, "")))
    e.fatal = True
    return e


def reconnect_may_help(exc: BaseException) -> bool:
    """Whether a failed reconnect (:func:`connect`) is worth retrying with backoff.

    As ``docs/protocol.md`` says: yes when no broker answered or it closed the
    connection (:class:`errors.ConnectError`), when its answer was not a
    ``Welcome`` (:class:`errors.ProtocolError`), and when it answered ``Hello``
    with ``Fatal`` of any code (a connection limit, a broker shutting down,
    ...) but ``VersionMismatch``; not for a broker of another protocol version
    or one running as an untrusted user.
    """
    if isinstance(exc, (errors.VersionMismatchError, errors.UntrustedBrokerError)):
        return False
    return isinstance(exc, (errors.ConnectError, errors.ProtocolError)) or getattr(exc, "fatal", False)


class Backoff:
    """Reconnect delays: doubling from 10 ms up to 1 s, with +-25 % jitter (as zrpc-io's ``Backoff``).

    ``attempt`` is reset once a connection stayed up at least ``max`` seconds.
    """

    def __init__(self, minimum: float = 0.010, maximum: float = 1.0):
        self.min = max(minimum, 0.001)
        self.max = max(maximum, self.min)
        self.attempt = 0

    def next_delay(self) -> float:
        """The delay before the next attempt."""
        base = min(self.min * (2 ** min(self.attempt, 31)), self.max)
        self.attempt += 1
        return base * random.uniform(0.75, 1.25)

    def connection_ended(self, up: float) -> None:
        """A connection that was up ``up`` seconds ended."""
        if up >= self.max:
            self.attempt = 0


def shut_down(sock: Optional[socket.socket]) -> None:
    """Shuts ``sock`` down both ways (if any), waking a thread blocked on it; errors (already
    closed, not connected) are ignored."""
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
