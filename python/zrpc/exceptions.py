"""The original zrpc's exception names, for code written against it.

The original library raised these from ``zrpc.exceptions``; here each name is
one of :mod:`zrpc.errors`' classes, so that the original's imports, ``except``
clauses and ``isinstance`` checks keep working::

    from zrpc.exceptions import RPCTimeoutError, RPCError

    try:
        client.call('my_service', 'method', payload, timeout=1)
    except RPCError as e:       # a timeout, or the handler's exception, ...
        ...

=====================  =================================================
original name          here
=====================  =================================================
``ZRPCBaseError``      :class:`zrpc.errors.ZRPCError`: every error zrpc raises
``RPCError``           :class:`zrpc.errors.RPCError`: every error a call can
                       fail with: :class:`~zrpc.errors.RPCTimeoutError`,
                       :class:`~zrpc.errors.RemoteError` (the handler's
                       exception), :class:`~zrpc.errors.NoSuchMethodError`, ...
``RPCTimeoutError``    :class:`zrpc.errors.RPCTimeoutError` (an ``RPCError``)
``ConnectError``       :class:`zrpc.errors.ConnectError`: no broker answers
``SerializationError`` :class:`zrpc.errors.SerializationError`: the base of
                       :class:`~zrpc.errors.EncodeError` and
                       :class:`~zrpc.errors.DecodeError`
=====================  =================================================

As in the original, ``RPCTimeoutError`` is an ``RPCError``, every one of them a
``ZRPCBaseError``, and ``ConnectError`` and ``SerializationError`` are not
``RPCError``\\ s. One difference: ``str(e)`` of a handler's exception names
the call and the code (``"my_service.method: ValueError: bad thing 1
(Remote)"``); the original's text alone (``"ValueError: bad thing 1"``) is
``e.remote_message``.
"""

from .errors import (  # noqa: F401  (re-exported)
    ConnectError,
    RPCError,
    RPCTimeoutError,
    SerializationError,
    ZRPCError as ZRPCBaseError,
)

__all__ = ["ZRPCBaseError", "SerializationError", "ConnectError", "RPCError", "RPCTimeoutError"]
