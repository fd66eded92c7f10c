"""The asyncio side's connection to the broker, shared by :class:`zrpc.aio.Client`
and :class:`zrpc.aio.Server`. Internal.
"""

import asyncio
import socket
import time
from typing import Callable, Optional

from . import _proto, errors


class _Conn(asyncio.Protocol):
    """One connection to the broker: frames in (``on_frames(conn, frames)``), bytes out (``send``)."""

    def __init__(self, reader: _proto.FrameReader, on_frames: Callable[[list], None]):
        self.reader = reader
        self.on_frames = on_frames
        self.transport: Optional[asyncio.Transport] = None
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.reader.feed(data)
        except errors.ZRPCError as e:
            self.abort(str(e))
            return
        if frames:
            self.on_frames(self, frames)

    def connection_lost(self, exc) -> None:
        if not self.closed.done():
            self.closed.set_result("the broker closed the connection" if exc is None else "connection error: %s" % exc)

    def send(self, frame: bytes) -> None:
        """Queues ``frame`` for writing (dropped once the connection is closed)."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame)

    def abort(self, why: str) -> None:
        """Closes the connection now."""
        if not self.closed.done():
            self.closed.set_result(why)
        if self.transport is not None:
            self.transport.abort()

    async def close(self, by: float) -> None:
        """Closes the connection once what was sent is written, or aborts it at ``by`` (``time.monotonic()``)."""
        if self.transport is not None and not self.closed.done():
            self.transport.close()  # connection_lost (and `closed`) comes when the buffer is written
            try:
                await asyncio.wait_for(asyncio.shield(self.closed), max(0.0, by - time.monotonic()))
            except asyncio.TimeoutError:
                pass
        self.abort("stopped")


async def _open(socket_dir: str, instance: int, agent: str, on_frames, timeout: float) -> tuple:
    """Connects and handshakes within ``timeout`` seconds (the steps of the blocking
    :func:`zrpc._proto.connect`, awaited), then hands the socket to asyncio. Cancelled, it
    closes the socket at once."""
    loop = asyncio.get_running_loop()
    path = _proto.broker_path(socket_dir)
    deadline = time.monotonic() + timeout
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        for pause in _proto.connect_steps(sock, path, deadline, timeout):
            await asyncio.sleep(pause)
        _proto.check_broker(sock, path)
        hs = _proto.Handshake(path, instance, agent, timeout)

        async def exchange():
            await loop.sock_sendall(sock, hs.hello)
            outcome = None
            while outcome is None:
                outcome = hs.feed(await loop.sock_recv(sock, 65536))
            return outcome

        try:
            welcome, frames = await asyncio.wait_for(exchange(), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise hs.timed_out() from None
        except OSError as e:
            raise hs.failed(e) from None
        conn = _Conn(hs.reader, on_frames)
        await loop.create_unix_connection(lambda: conn, sock=sock)
    except BaseException:
        sock.close()
        raise
    return conn, welcome, frames


def _raise(exc: BaseException) -> None:
    """Raises ``exc`` (from a callback of the event loop: a ``SystemExit`` then ends ``run_forever``)."""
    raise exc
