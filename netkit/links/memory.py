"""An in-process pair of links: what one end sends, the other receives.

For tests and fake guests. Each end has a bounded inbox; a sender whose peer's inbox
is full is told "would block" (the frame waits in the sender's own bounded queue and
``run_sender`` delivers it once the peer drains), exactly like a socket whose peer
reads slowly.
"""

from __future__ import annotations

import collections
import errno

import trio

from .base import DEFAULT_SEND_QUEUE_BYTES, Frame, Link, LinkClosed, TxOffload
from ._util import MAX_BATCH_FRAMES

__all__ = ["MemoryLink", "memory_link_pair", "DEFAULT_CAPACITY_BYTES"]

#: Default bytes an end's inbox holds before the peer's sends would block.
DEFAULT_CAPACITY_BYTES = 1024 * 1024

#: Ethernet header plus one VLAN tag: what a frame may carry beyond the MTU.
_L2_OVERHEAD = 14 + 4


class MemoryLink(Link):
    """One end of an in-process link pair; create with ``memory_link_pair``.

    Frames longer than ``mtu`` + 18 (Ethernet header and a VLAN tag) are dropped on
    send like an oversized frame on a wire, unless the pair was made with
    ``offload=True`` (then frames up to 64 KiB pass, as on an offloading tap).
    """

    def __init__(self, *, name: str, mtu: int, capacity_bytes: int, offload: bool, send_queue_bytes: int) -> None:
        super().__init__(send_queue_bytes=send_queue_bytes)
        self.name = name
        self.mtu = mtu
        self.offload = offload
        # In-process frames are never corrupted on the way; an offloading pair's frames
        # may carry partial checksums, which must not be verified.
        self.checksums_trusted = offload
        self._max_frame = 65535 + _L2_OVERHEAD if offload else mtu + _L2_OVERHEAD
        self._capacity = capacity_bytes
        self._inbox: collections.deque[bytes] = collections.deque()
        self._inbox_bytes = 0
        self._peer: MemoryLink | None = None
        self._peer_closed = False
        self._frames_arrived = trio.lowlevel.ParkingLot()  # our reader parks here
        self._space_freed = trio.lowlevel.ParkingLot()  # the peer's run_sender parks here

    def _has_room_for(self, length: int) -> bool:
        # An empty inbox takes any frame, so a frame larger than the capacity cannot
        # wedge the pair forever.
        return self._inbox_bytes == 0 or self._inbox_bytes + length <= self._capacity

    # ----- receiving -----
    async def _receive_batch(self) -> list[Frame]:
        await trio.lowlevel.checkpoint()
        while not self._inbox:
            if self._closed or self._peer_closed:
                raise LinkClosed(self.name)
            await self._frames_arrived.park()
        count = min(len(self._inbox), MAX_BATCH_FRAMES)
        frames: list[Frame] = [self._inbox.popleft() for _ in range(count)]
        self._inbox_bytes -= sum(len(f) for f in frames)
        self._space_freed.unpark_all()
        return frames

    # ----- sending -----
    def _try_send(self, frame: Frame, offload: TxOffload | None) -> bool:
        peer = self._peer
        if peer is None or peer._closed:
            raise BrokenPipeError(errno.EPIPE, f"{self.name}: the other end is closed")
        if len(frame) > self._max_frame:
            raise OSError(errno.EMSGSIZE, f"{self.name}: {len(frame)}-byte frame exceeds the MTU")
        if not peer._has_room_for(len(frame)):
            return False
        # bytes() copies only when the caller passed a mutable buffer it may reuse.
        data = bytes(frame)
        peer._inbox.append(data)
        peer._inbox_bytes += len(data)
        peer._frames_arrived.unpark_all()
        return True

    async def _wait_send_ready(self) -> None:
        peer = self._peer
        if peer is None or peer._closed or self._closed:
            await trio.lowlevel.checkpoint()
            return
        # The frame at the head of our queue decides whether there is room; without it
        # any freed space is worth a retry.
        head = len(self._queue[0][0]) if self._queue else 0
        if peer._has_room_for(head):
            await trio.lowlevel.checkpoint()
            return
        await peer._space_freed.park()

    # ----- lifecycle -----
    async def _close(self) -> None:
        self._inbox.clear()
        self._inbox_bytes = 0
        self._frames_arrived.unpark_all()
        self._space_freed.unpark_all()
        peer = self._peer
        if peer is not None:
            # The peer drains what it already has, then sees LinkClosed; its sender
            # wakes and finds the pipe broken.
            peer._peer_closed = True
            peer._frames_arrived.unpark_all()
        await trio.lowlevel.checkpoint()


def memory_link_pair(
    *,
    mtu: int = 1500,
    capacity_bytes: int = DEFAULT_CAPACITY_BYTES,
    offload: bool = False,
    send_queue_bytes: int = DEFAULT_SEND_QUEUE_BYTES,
    names: tuple[str, str] = ("memory:a", "memory:b"),
) -> tuple[MemoryLink, MemoryLink]:
    """Return two connected in-process links.

    ``capacity_bytes`` bounds each end's inbox; beyond it the sender's frames wait in its
    own send queue (bounded by ``send_queue_bytes``, then dropped and counted).
    """
    a = MemoryLink(name=names[0], mtu=mtu, capacity_bytes=capacity_bytes, offload=offload,
                   send_queue_bytes=send_queue_bytes)
    b = MemoryLink(name=names[1], mtu=mtu, capacity_bytes=capacity_bytes, offload=offload,
                   send_queue_bytes=send_queue_bytes)
    a._peer, b._peer = b, a
    return a, b
