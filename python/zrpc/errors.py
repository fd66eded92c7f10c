"""The exceptions of zrpc, mirroring the kinds of the Rust library's ``Error``.

Every exception derives from :class:`ZRPCError`. Errors that the broker or a
service reports carry the wire error ``code`` (see ``docs/protocol.md``,
"Error codes"); local errors (connection, encoding) have ``code = None``.

Two intermediate bases keep the original zrpc's hierarchy (its names are in
:mod:`zrpc.exceptions`): :class:`RPCError`, the base of every error a call
can fail with (a timeout, the handler's exception, ...), and
:class:`SerializationError`, the base of :class:`EncodeError` and
:class:`DecodeError`.
"""

from typing import Any, Optional

# Wire error codes (docs/protocol.md, "Error codes").
TIMEOUT = 1
NO_SUCH_SERVICE = 2
NO_SUCH_METHOD = 3
REMOTE = 4
BAD_PAYLOAD = 5
NAME_TAKEN = 6
INVALID_NAME = 7
SERVICE_GONE = 8
SHUTDOWN = 9
PROTOCOL = 10
VERSION_MISMATCH = 11
LIMIT_EXCEEDED = 12
CANCELLED = 13
NOT_REGISTERED = 14
TIMEOUT_NO_SERVICE = 15
ACCESS_DENIED = 16

#: Names of the wire error codes, as the broker's statistics spell them.
CODE_NAMES = {
    TIMEOUT: "Timeout",
    NO_SUCH_SERVICE: "NoSuchService",
    NO_SUCH_METHOD: "NoSuchMethod",
    REMOTE: "Remote",
    BAD_PAYLOAD: "BadPayload",
    NAME_TAKEN: "NameTaken",
    INVALID_NAME: "InvalidName",
    SERVICE_GONE: "ServiceGone",
    SHUTDOWN: "Shutdown",
    PROTOCOL: "Protocol",
    VERSION_MISMATCH: "VersionMismatch",
    LIMIT_EXCEEDED: "LimitExceeded",
    CANCELLED: "Cancelled",
    NOT_REGISTERED: "NotRegistered",
    TIMEOUT_NO_SERVICE: "TimeoutNoService",
    ACCESS_DENIED: "AccessDenied",
}


def code_name(code: int) -> str:
    """The name of a wire error code (``Unknown(n)`` for codes this version does not know)."""
    return CODE_NAMES.get(code, "Unknown(%d)" % code)


class ZRPCError(Exception):
    """Base class of every zrpc error.

    ``code`` is the wire error code (``None`` for local errors), ``message``
    the text the broker or the service sent (or a local explanation).
    """

    code: Optional[int] = None
    #: The error value a ``Remote`` error carries (decoded), or ``None``.
    value: Any = None
    #: Whether the broker sent this error in a ``Fatal`` frame, ending the connection
    #: (when it refused a connection, for instance: ``--max-connections``).
    fatal: bool = False

    #: The bare text the broker or the service sent, for an error received from them
    #: (``None`` for local errors): ``str(e)`` and :attr:`message` add the service and
    #: method before it and the code's name after it. For a :class:`RemoteError` it is
    #: the handler's exception as the original zrpc's ``str(RPCError)`` gave it:
    #: ``"ValueError: bad thing 1"``.
    remote_message: Optional[str] = None

    def __init__(self, message: str = "", code: Optional[int] = None,
                 service: Optional[str] = None, method: Optional[str] = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.service = service
        self.method = method


class RPCError(ZRPCError):
    """Base class of the errors a call can fail with (the original zrpc's ``RPCError``).

    ``except RPCError`` catches, as in the original, a timeout
    (:class:`RPCTimeoutError`) and the handler's exception (:class:`RemoteError`), and
    also zrpc's other failures of a call: :class:`NoSuchServiceError`,
    :class:`NoSuchMethodError`, :class:`BadPayloadError`, :class:`InvalidNameError`,
    :class:`ServiceGoneError`, :class:`ShutdownError`, :class:`ProtocolError`,
    :class:`LimitExceededError`, :class:`CancelledError`, :class:`AccessDeniedError`,
    :class:`DisconnectedError` and :class:`BrokerError`. Not: :class:`ConnectError`
    and :class:`SerializationError` (separate in the original too), nor the errors of
    connecting (:class:`VersionMismatchError`, :class:`UntrustedBrokerError`), of a
    server's name (:class:`NameTakenError`, :class:`NotRegisteredError`) and of a
    server's ``register(fd, ...)`` (:class:`NotPollableError`); catch
    :class:`ZRPCError` for everything.
    """


class SerializationError(ZRPCError):
    """Base class of :class:`EncodeError` and :class:`DecodeError` (the original zrpc's ``SerializationError``)."""


class RPCTimeoutError(RPCError):
    """The call's deadline passed (the original zrpc's ``RPCTimeoutError``).

    ``no_service`` is true when the broker reports that no service held the
    name until the deadline (``TimeoutNoService``): the call never ran.
    """

    code = TIMEOUT

    @property
    def no_service(self) -> bool:
        """Whether no service held the name while the call waited."""
        return self.code == TIMEOUT_NO_SERVICE


class NoSuchServiceError(RPCError):
    """No service holds the name, and the call was made with ``no_wait``: it
    was never delivered."""

    code = NO_SUCH_SERVICE


class NoSuchMethodError(RPCError):
    """The service has no method of that name."""

    code = NO_SUCH_METHOD


class RemoteError(RPCError):
    """The handler raised an exception (or the Rust handler returned an error or panicked).

    ``value`` is the error value a Rust handler sent beside the message (its
    ``Serialize`` error type, e.g. the string ``"DivisionByZero"`` for a unit
    enum variant), or ``None``.

    ``str(e)`` is ``"service.method: ValueError: bad thing 1 (Remote)"``;
    :attr:`remote_message` is the handler's text alone, ``"ValueError: bad thing 1"``
    (what the original zrpc's ``str(RPCError)`` was).
    """

    _value: Any = None
    #: The value as it came, until :attr:`value` is first read.
    _encoded: Optional[bytes] = None

    @property
    def value(self) -> Any:  # type: ignore[override]
        """The error value, decoded when first read (``None`` if it cannot be decoded)."""
        if self._encoded is not None:
            encoded, self._encoded = self._encoded, None
            from . import _proto
            try:
                self._value = _proto.unpack(encoded)
            except Exception:  # the value is optional: the message says it all
                self._value = None
        return self._value

    @value.setter
    def value(self, value: Any) -> None:
        self._encoded = None
        self._value = value

    def set_encoded_value(self, encoded: bytes) -> None:
        """Keeps the value as received, to be decoded when :attr:`value` is read."""
        self._encoded = bytes(encoded)
        self._value = None

    code = REMOTE


class BadPayloadError(RPCError):
    """The service could not decode the call's arguments."""

    code = BAD_PAYLOAD


class NameTakenError(ZRPCError):
    """``register``: another live connection holds the name exclusively."""

    code = NAME_TAKEN


class InvalidNameError(RPCError):
    """A service or method name breaks the naming rules."""

    code = INVALID_NAME


class ServiceGoneError(RPCError):
    """The service instance handling a ``no_retry`` call disconnected (or a
    ``no_wait`` call's, with no other instance of the name): it may have run."""

    code = SERVICE_GONE


class ShutdownError(RPCError):
    """The broker is shutting down: it did not finish a ``no_retry`` call (others are
    resubmitted to the next broker instead), or it refused a new connection.

    A ``no_retry`` call that gets it may or may not have run: the broker answers so both the
    calls it never delivered and those delivered but not finished within its
    ``--shutdown-grace`` (whose handler may still finish them), and the client cannot tell
    them apart. As the Rust client's ``Error::Shutdown`` (docs/reliability.md)."""

    code = SHUTDOWN


class ProtocolError(RPCError):
    """The broker or this library detected a protocol violation."""

    code = PROTOCOL


class VersionMismatchError(ZRPCError):
    """The broker does not speak protocol version 1."""

    code = VERSION_MISMATCH


class LimitExceededError(RPCError):
    """A configured limit was hit, e.g. a payload larger than the broker's maximum message size."""

    code = LIMIT_EXCEEDED


class CancelledError(RPCError):
    """The call was cancelled."""

    code = CANCELLED


class NotRegisteredError(ZRPCError):
    """``unregister`` of a name this connection does not hold."""

    code = NOT_REGISTERED


class AccessDeniedError(RPCError):
    """The broker's access policy refuses the call, the registration or the built-in method."""

    code = ACCESS_DENIED


class ConnectError(ZRPCError):
    """The broker's socket could not be connected to (is zrpcd running? is the socket directory right?)."""


class UntrustedBrokerError(ZRPCError):
    """The broker runs as a user this process does not trust (not root, not itself, not ``$ZRPC_BROKER_UID``).

    Nothing was sent to it.
    """


class DisconnectedError(RPCError):
    """The connection to the broker was lost while a ``no_retry`` call was on the broker, or the client was closed."""


class NotPollableError(ZRPCError, ValueError):
    """A server's ``register(fd, callback)`` was given a descriptor that cannot be watched for
    readability: a regular file or a directory (epoll refuses them: they are always readable),
    or a descriptor that is not open. The ``OSError`` of the refusal is ``__cause__``.

    Also a :class:`ValueError` (the argument is unsuitable); not an :class:`RPCError`.
    """


class EncodeError(SerializationError):
    """The payload could not be encoded as MessagePack."""


class DecodeError(SerializationError):
    """A payload from the broker could not be decoded as exactly one MessagePack value."""


class BrokerError(RPCError):
    """Any other error code from the broker (codes this version does not know)."""


_BY_CODE = {
    TIMEOUT: RPCTimeoutError,
    TIMEOUT_NO_SERVICE: RPCTimeoutError,
    NO_SUCH_SERVICE: NoSuchServiceError,
    NO_SUCH_METHOD: NoSuchMethodError,
    REMOTE: RemoteError,
    BAD_PAYLOAD: BadPayloadError,
    NAME_TAKEN: NameTakenError,
    INVALID_NAME: InvalidNameError,
    SERVICE_GONE: ServiceGoneError,
    SHUTDOWN: ShutdownError,
    PROTOCOL: ProtocolError,
    VERSION_MISMATCH: VersionMismatchError,
    LIMIT_EXCEEDED: LimitExceededError,
    CANCELLED: CancelledError,
    NOT_REGISTERED: NotRegisteredError,
    ACCESS_DENIED: AccessDeniedError,
}


def from_code(code: int, message: str, service: Optional[str] = None,
              method: Optional[str] = None) -> ZRPCError:
    """The exception for wire error ``code`` with the peer's ``message``."""
    cls = _BY_CODE.get(code, BrokerError)
    where = ""
    if service is not None:
        where = "%s.%s: " % (service, method) if method else "%s: " % service
    text = "%s%s (%s)" % (where, message, code_name(code))
    e = cls(text, code=code, service=service, method=method)
    e.remote_message = message
    return e
