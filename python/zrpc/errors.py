"""The exceptions of zrpc, mirroring the kinds of the Rust library's ``Error``.

Every exception derives from :class:`ZRPCError`. Errors that the broker or a
service reports carry the wire error ``code`` (see ``docs/protocol.md``,
"Error codes"); local errors (connection, encoding) have ``code = None``.
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

    def __init__(self, message: str = "", code: Optional[int] = None,
                 service: Optional[str] = None, method: Optional[str] = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.service = service
        self.method = method


class RPCTimeoutError(ZRPCError):
    """The call's deadline passed (the original zrpc's ``RPCTimeoutError``).

    ``no_service`` is true when the broker reports that no service held the
    name until the deadline (``TimeoutNoService``): the call never ran.
    """

    code = TIMEOUT

    @property
    def no_service(self) -> bool:
        """Whether no service held the name while the call waited."""
        return self.code == TIMEOUT_NO_SERVICE


class NoSuchServiceError(ZRPCError):
    """No service holds the name, and the call was made with ``no_wait``: it
    was never delivered."""

    code = NO_SUCH_SERVICE


class NoSuchMethodError(ZRPCError):
    """The service has no method of that name."""

    code = NO_SUCH_METHOD


class RemoteError(ZRPCError):
    """The handler raised an exception (or the Rust handler returned an error or panicked).

    ``value`` is the error value a Rust handler sent beside the message (its
    ``Serialize`` error type, e.g. the string ``"DivisionByZero"`` for a unit
    enum variant), or ``None``.
    """

    code = REMOTE


class BadPayloadError(ZRPCError):
    """The service could not decode the call's arguments."""

    code = BAD_PAYLOAD


class NameTakenError(ZRPCError):
    """``register``: another live connection holds the name exclusively."""

    code = NAME_TAKEN


class InvalidNameError(ZRPCError):
    """A service or method name breaks the naming rules."""

    code = INVALID_NAME


class ServiceGoneError(ZRPCError):
    """The service instance handling a ``no_retry`` call disconnected (or a
    ``no_wait`` call's, with no other instance of the name): it may have run."""

    code = SERVICE_GONE


class ShutdownError(ZRPCError):
    """The broker is shutting down: it did not finish a ``no_retry`` call (others are
    resubmitted to the next broker instead), or it refused a new connection.

    A ``no_retry`` call that gets it may or may not have run: the broker answers so both the
    calls it never delivered and those delivered but not finished within its
    ``--shutdown-grace`` (whose handler may still finish them), and the client cannot tell
    them apart. As the Rust client's ``Error::Shutdown`` (docs/reliability.md)."""

    code = SHUTDOWN


class ProtocolError(ZRPCError):
    """The broker or this library detected a protocol violation."""

    code = PROTOCOL


class VersionMismatchError(ZRPCError):
    """The broker does not speak protocol version 1."""

    code = VERSION_MISMATCH


class LimitExceededError(ZRPCError):
    """A configured limit was hit, e.g. a payload larger than the broker's maximum message size."""

    code = LIMIT_EXCEEDED


class CancelledError(ZRPCError):
    """The call was cancelled."""

    code = CANCELLED


class NotRegisteredError(ZRPCError):
    """``unregister`` of a name this connection does not hold."""

    code = NOT_REGISTERED


class AccessDeniedError(ZRPCError):
    """The broker's access policy refuses the call, the registration or the built-in method."""

    code = ACCESS_DENIED


class ConnectError(ZRPCError):
    """The broker's socket could not be connected to (is zrpcd running? is the socket directory right?)."""


class UntrustedBrokerError(ZRPCError):
    """The broker runs as a user this process does not trust (not root, not itself, not ``$ZRPC_BROKER_UID``).

    Nothing was sent to it.
    """


class DisconnectedError(ZRPCError):
    """The connection to the broker was lost while a ``no_retry`` call was on the broker, or the client was closed."""


class EncodeError(ZRPCError):
    """The payload could not be encoded as MessagePack."""


class DecodeError(ZRPCError):
    """A payload from the broker could not be decoded as exactly one MessagePack value."""


class BrokerError(ZRPCError):
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
    return cls(text, code=code, service=service, method=method)
