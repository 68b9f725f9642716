"""A trio stream over one ``TcpConnection`` whose segments some runtime carries.

The runtime that owns the connection (the gateway terminating a guest connection for
a local service, a port forward's active open into a guest, the fake guest's client
stack) passes a ``kick`` callback that sends whatever the engine produced and re-arms
its timer, and calls ``notify()`` with the engine's events after feeding it segments.
The stream itself never touches a socket or a link.
"""

from __future__ import annotations

from typing import Callable

import trio

from .tcp import TcpConnection
from .tcp.events import Closed, Connected, Event, Reset, TimedOut
from .tcp.state import TcpState

__all__ = ["EngineStream"]

_RECEIVE_STATES = frozenset({TcpState.ESTABLISHED, TcpState.FIN_WAIT_1, TcpState.FIN_WAIT_2})


class EngineStream(trio.abc.HalfCloseableStream):
    """``send_all``/``receive_some``/``send_eof``/``aclose`` over a TCP engine connection."""

    def __init__(self, conn: TcpConnection, kick: Callable[[], None]) -> None:
        self.conn = conn
        self._kick = kick
        self._changed = trio.Event()
        self._failed: str | None = None
        self._connected = conn.state not in (TcpState.SYN_SENT, TcpState.SYN_PENDING, TcpState.SYN_RECEIVED)
        self._closed_locally = False
        self._send_lock = trio.StrictFIFOLock()
        self._receive_guard = False

    # ----- called by the owning runtime -----
    def notify(self, events: list[Event]) -> None:
        """Take the engine's events; the owner transmits the engine's output afterwards."""
        if self._closed_locally and self.conn.received_size and not self.conn.is_closed:
            # Data for a stream nobody will read again: reset, as a kernel socket does.
            self.conn.abort(trio.current_time())
        for event in events:
            kind = type(event)
            if kind is Connected:
                self._connected = True
            elif kind is Reset:
                self._failed = "connection refused" if event.refused else "connection reset by peer"
            elif kind is TimedOut:
                self._failed = "connection timed out"
            elif kind is Closed and self._failed is None and not self._connected:
                self._failed = "connection closed before it was established"
        self._changed.set()

    async def _wait_change(self) -> None:
        self._changed = trio.Event()
        await self._changed.wait()

    # ----- connection setup -----
    async def wait_connected(self) -> None:
        """For an active open: return once established; raise ``OSError`` if it failed."""
        while not self._connected:
            if self._failed is not None:
                raise ConnectionRefusedError(self._failed) if "refused" in self._failed else OSError(self._failed)
            await self._wait_change()

    # ----- trio.abc.Stream -----
    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed_locally:
            raise trio.ClosedResourceError("stream was closed")
        async with self._send_lock:
            view = memoryview(data).cast("B")
            while view:
                if self._failed is not None:
                    raise trio.BrokenResourceError(self._failed)
                n = self.conn.send(view, trio.current_time())
                if n:
                    view = view[n:]
                    self._kick()
                    continue
                if self.conn.is_closed or self.conn.state not in (TcpState.ESTABLISHED, TcpState.CLOSE_WAIT,
                                                                  TcpState.SYN_RECEIVED, TcpState.SYN_SENT):
                    raise trio.BrokenResourceError("connection can no longer send")
                await self._wait_change()
            await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        while not self.conn.send_space() and self._failed is None and not self.conn.is_closed:
            await self._wait_change()

    async def send_eof(self) -> None:
        async with self._send_lock:
            self.conn.shutdown(trio.current_time())
            self._kick()
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._closed_locally:
            raise trio.ClosedResourceError("stream was closed")
        if self._receive_guard:
            raise trio.BusyResourceError("another task is receiving")
        self._receive_guard = True
        try:
            while True:
                if self.conn.received_size:
                    data = self.conn.read(trio.current_time(), max_bytes or 65536)
                    self._kick()
                    await trio.lowlevel.checkpoint()
                    return data
                if self.conn.peer_finished:
                    await trio.lowlevel.checkpoint()
                    return b""
                if self._failed is not None:
                    raise trio.BrokenResourceError(self._failed)
                if self.conn.is_closed:
                    await trio.lowlevel.checkpoint()
                    return b""
                await self._wait_change()
        finally:
            self._receive_guard = False

    async def aclose(self) -> None:
        if not self._closed_locally:
            self._closed_locally = True
            now = trio.current_time()
            if self.conn.received_size and not self.conn.is_closed:
                self.conn.abort(now)  # unread data: reset, as a kernel socket does
            else:
                self.conn.shutdown(now)
            self._kick()
            self._changed.set()
        await trio.lowlevel.checkpoint()
