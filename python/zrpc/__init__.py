"""zrpc for Python: a client and a service library for the zrpcd broker.

* :mod:`zrpc.client` -- :class:`~zrpc.client.Client`, the blocking client;
* :mod:`zrpc.server` -- :class:`~zrpc.server.Server` and :func:`~zrpc.server.rpc_method`;
* :mod:`zrpc.aio` -- the asyncio client and server;
* :mod:`zrpc.errors` -- the exceptions, one per wire error code;
* :mod:`zrpc.exceptions` -- the original zrpc's exception names, mapped onto :mod:`zrpc.errors`.

``python -m zrpc SERVICE METHOD [PAYLOAD]`` is the original's command line.

The wire protocol is described in zrpc's ``docs/protocol.md``.
"""

__version__ = "0.1.0"
