"""Stream plumbing for the proxy: an h11 connection over a trio stream, a byte splice
for tunnels (half-close aware), a lingering close, and a per-client origin pool."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import h11
import trio

RECV_SIZE = 64 * 1024
STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class PeerGone(Exception):
    """The peer closed or reset the connection (or the stream is unusable)."""

    def __init__(self, peer: "Peer | None", detail: str = "") -> None:
        super().__init__(detail or "connection lost")
        self.peer = peer


class PeerTimeout(Exception):
    """The peer sent nothing for longer than allowed."""

    def __init__(self, peer: "Peer") -> None:
        super().__init__("timed out")
        self.peer = peer


class Peer:
    """One side of an HTTP exchange: a trio stream and the h11 connection on it.

    Sending and receiving may run in two tasks at once (trio streams allow one of
    each); h11 state changes happen between awaits, so that is safe."""

    __slots__ = ("stream", "conn", "received", "sent")

    def __init__(self, stream: trio.abc.Stream, conn: h11.Connection) -> None:
        self.stream = stream
        self.conn = conn
        self.received = 0
        self.sent = 0

    async def next_event(self, timeout: float | None = None):
        """The next h11 event; raises h11.RemoteProtocolError, PeerGone, PeerTimeout."""
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            self.conn.receive_data(await self.receive(timeout))

    async def receive(self, timeout: float | None = None) -> bytes:
        try:
            if timeout is None or math.isinf(timeout):
                data = await self.stream.receive_some(RECV_SIZE)
            else:
                with trio.move_on_after(timeout) as scope:
                    data = await self.stream.receive_some(RECV_SIZE)
                if scope.cancelled_caught:
                    raise PeerTimeout(self)
        except STREAM_ERRORS as e:
            raise PeerGone(self, str(e)) from None
        self.received += len(data)
        return data

    async def send(self, event) -> None:
        data = self.conn.send(event)
        if data:
            await self.send_raw(data)

    async def send_raw(self, data: bytes) -> None:
        try:
            await self.stream.send_all(data)
        except STREAM_ERRORS as e:
            raise PeerGone(self, str(e)) from None
        self.sent += len(data)


async def splice(a: trio.abc.Stream, b: trio.abc.Stream, *, a_to_b: bytes = b"",
                 b_to_a: bytes = b"", a_eof: bool = False, counts: dict | None = None) -> None:
    """Copy bytes both ways until both directions have ended.

    ``a_to_b``/``b_to_a`` are bytes already read from one side (sent first); ``a_eof``
    says ``a`` has already sent EOF. An EOF is passed on with ``send_eof`` where the
    other stream is half-closeable, so a half-closed tunnel keeps working the other
    way. An error on either side ends both directions."""

    async def pump(src, dst, first: bytes, src_eof: bool, key: str, cancel) -> None:
        try:
            if first:
                await dst.send_all(first)
                if counts is not None:
                    counts[key] = counts.get(key, 0) + len(first)
            while not src_eof:
                data = await src.receive_some(RECV_SIZE)
                if not data:
                    break
                await dst.send_all(data)
                if counts is not None:
                    counts[key] = counts.get(key, 0) + len(data)
            if isinstance(dst, trio.abc.HalfCloseableStream):
                await dst.send_eof()
        except STREAM_ERRORS:
            cancel()

    async with trio.open_nursery() as nursery:
        cancel = nursery.cancel_scope.cancel
        nursery.start_soon(pump, a, b, a_to_b, a_eof, "tunnel_bytes_out", cancel)
        nursery.start_soon(pump, b, a, b_to_a, False, "tunnel_bytes_in", cancel)


async def lingering_close(stream: trio.abc.Stream, timeout: float = 2.0, limit: int = 1 << 20) -> None:
    """Close after an error response without losing it to a TCP reset: send FIN, then
    read and drop what the client still sends (bounded in time and bytes)."""
    with trio.move_on_after(timeout):
        try:
            if isinstance(stream, trio.abc.HalfCloseableStream):
                await stream.send_eof()
            total = 0
            while total < limit:
                data = await stream.receive_some(RECV_SIZE)
                if not data:
                    break
                total += len(data)
        except STREAM_ERRORS:
            pass
    await trio.aclose_forcefully(stream)


@dataclass(eq=False)
class _Idle:
    key: tuple
    peer: Peer
    scope: trio.CancelScope
    done: trio.Event = field(default_factory=trio.Event)
    taken: bool = False
    broken: bool = False


class OriginPool:
    """Idle origin (or upstream proxy) connections kept for reuse by one client session.

    Each idle connection has a watcher task that notices the origin closing it (or
    sending stray bytes) and drops it, and that closes it after ``idle_timeout``.
    Only ``trio.SocketStream`` connections are pooled: the watcher relies on a
    cancelled ``receive_some`` losing no data, which holds for plain sockets."""

    def __init__(self, nursery: trio.Nursery, limit: int = 8) -> None:
        self._nursery = nursery
        self._limit = limit
        self._idle: list[_Idle] = []
        self.reused = 0

    def __len__(self) -> int:
        return len(self._idle)

    async def take(self, key: tuple) -> Peer | None:
        for entry in [e for e in self._idle if e.key == key]:
            self._idle.remove(entry)
            entry.taken = True
            entry.scope.cancel()
            await entry.done.wait()
            if not entry.broken:
                self.reused += 1
                return entry.peer
            await trio.aclose_forcefully(entry.peer.stream)
        return None

    def put(self, key: tuple, peer: Peer, idle_timeout: float) -> bool:
        """Keep ``peer`` (whose h11 connection is ready for the next request); False if
        it cannot be kept and the caller must close it."""
        if not isinstance(peer.stream, trio.SocketStream) or self._limit <= 0:
            return False
        if peer.conn.our_state is not h11.IDLE or peer.conn.trailing_data[0]:
            return False
        while len(self._idle) >= self._limit:
            oldest = self._idle.pop(0)
            oldest.scope.cancel()  # its watcher closes it
        entry = _Idle(key, peer, trio.CancelScope(deadline=trio.current_time() + idle_timeout))
        self._idle.append(entry)
        self._nursery.start_soon(self._watch, entry)
        return True

    async def _watch(self, entry: _Idle) -> None:
        try:
            with entry.scope:
                await entry.peer.stream.receive_some(1)
                entry.broken = True  # EOF or unexpected bytes: not reusable
        except STREAM_ERRORS:
            entry.broken = True
        finally:
            drop = entry.broken or not entry.taken
            if entry in self._idle:
                self._idle.remove(entry)
            entry.done.set()
            if drop and not entry.taken:
                await trio.aclose_forcefully(entry.peer.stream)
