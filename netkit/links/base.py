"""The link contract: a point-to-point carrier of whole Ethernet frames.

A link is read in batches (``receive_batch`` waits for at least one frame and returns
every frame already available) and written without blocking (``send`` writes straight
to the fd when it can and queues a bounded number of bytes when the peer is slow).
Whoever attaches a link runs ``run_sender`` beside the reader: it drains the queue as
the peer becomes writable. Nothing here parses above layer 2.

Subclasses implement ``_receive_batch``, ``_try_send`` and ``_wait_send_ready`` (and
``_close``); the base class owns the queue, the counters and the closed state.
"""

from __future__ import annotations

import abc
import collections
from dataclasses import dataclass

import trio

__all__ = ["Link", "LinkClosed", "LinkStatistics", "TxOffload", "DEFAULT_SEND_QUEUE_BYTES"]

DEFAULT_SEND_QUEUE_BYTES = 4 * 1024 * 1024

Frame = bytes | bytearray | memoryview


class LinkClosed(Exception):
    """The link has ended (peer went away, or it was closed locally)."""


@dataclass(frozen=True, slots=True)
class TxOffload:
    """Work a sender leaves to an offloading link (virtio-net header semantics).

    ``csum_start``/``csum_offset``: the L4 checksum field at ``csum_start + csum_offset``
    holds only the pseudo-header sum; the receiver completes it.
    ``gso_type``/``gso_size``: the frame is one large TCP segment to be cut into
    ``gso_size``-byte segments (``gso_type`` is ``VIRTIO_NET_HDR_GSO_TCPV4`` = 1).
    Only pass this to a link whose ``offload`` attribute is true.
    """

    csum_start: int
    csum_offset: int
    gso_type: int = 0
    gso_size: int = 0
    hdr_len: int = 0


@dataclass(slots=True)
class LinkStatistics:
    frames_received: int = 0
    bytes_received: int = 0
    frames_sent: int = 0
    bytes_sent: int = 0
    #: Frames dropped on send because the queue towards the peer was full.
    send_dropped: int = 0
    #: Frames the link itself could not make sense of (bad framing) and dropped.
    receive_errors: int = 0
    queued_bytes: int = 0


class Link(abc.ABC):
    """Base class for every link. See the module docstring for the contract."""

    #: Human-readable identity, used in logs and statistics ("tap:nk0", "qemu:/path#3").
    name: str = "link"
    #: True when frames may be exchanged with virtio-net offloads: received frames may
    #: carry partial L4 checksums (do not verify them) and ``send`` accepts ``TxOffload``.
    offload: bool = False
    #: True when every received frame was built by a trusted kernel (a tap): its IP and
    #: L4 checksums are valid (or partial, with offloads), so receivers skip verifying
    #: them. Links that carry frames from other processes, or may corrupt them, say False.
    checksums_trusted: bool = False

    def __init__(self, *, send_queue_bytes: int = DEFAULT_SEND_QUEUE_BYTES) -> None:
        self._queue: collections.deque[tuple[Frame, TxOffload | None]] = collections.deque()
        self._queue_limit = send_queue_bytes
        self._queue_nonempty = trio.Event()
        self._closed = False
        self.stats = LinkStatistics()

    # ----- receiving -----
    async def receive_batch(self) -> list[Frame]:
        """Wait for at least one frame; return all frames available now.

        Raises ``LinkClosed`` when the link has ended.
        """
        if self._closed:
            raise LinkClosed(self.name)
        frames = await self._receive_batch()
        st = self.stats
        st.frames_received += len(frames)
        for f in frames:
            st.bytes_received += len(f)
        return frames

    # ----- sending -----
    def send(self, frame: Frame, offload: TxOffload | None = None) -> bool:
        """Send or queue ``frame`` without blocking. Returns False if it was dropped."""
        if self._closed:
            self.stats.send_dropped += 1
            return False
        if not self._queue and not self._has_pending():
            try:
                if self._try_send(frame, offload):
                    self.stats.frames_sent += 1
                    self.stats.bytes_sent += len(frame)
                    if self._has_pending():
                        # A partial write left a tail: wake run_sender to finish it, or
                        # it would sit there until the next send().
                        self._queue_nonempty.set()
                    return True
            except OSError:
                self.stats.send_dropped += 1
                return False
        if self.stats.queued_bytes + len(frame) > self._queue_limit:
            self.stats.send_dropped += 1
            return False
        self._queue.append((frame, offload))
        self.stats.queued_bytes += len(frame)
        self._queue_nonempty.set()
        return True

    async def run_sender(self) -> None:
        """Drain the send queue as the peer becomes writable; runs until closed."""
        while not self._closed:
            if not self._queue and not self._has_pending():
                self._queue_nonempty = trio.Event()
                await self._queue_nonempty.wait()
                continue
            try:
                await self._wait_send_ready()
            except (OSError, trio.ClosedResourceError, LinkClosed):
                return
            if self._has_pending():
                try:
                    if not self._flush_pending():
                        continue
                except OSError:
                    return
            while self._queue:
                frame, offload = self._queue[0]
                try:
                    sent = self._try_send(frame, offload)
                except OSError:
                    sent = True  # the frame is lost; keep draining the rest
                    self.stats.send_dropped += 1
                else:
                    if sent:
                        self.stats.frames_sent += 1
                        self.stats.bytes_sent += len(frame)
                if not sent:
                    break
                self._queue.popleft()
                self.stats.queued_bytes -= len(frame)
                if self._has_pending():
                    # That frame was only partly written; writing the next one now
                    # would interleave its bytes with the unwritten tail.
                    break

    # ----- lifecycle -----
    @property
    def closed(self) -> bool:
        return self._closed

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.clear()
        self.stats.queued_bytes = 0
        self._queue_nonempty.set()
        await self._close()

    async def __aenter__(self) -> "Link":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def statistics(self) -> LinkStatistics:
        return self.stats

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"

    # ----- for subclasses -----
    @abc.abstractmethod
    async def _receive_batch(self) -> list[Frame]:
        """Wait for and return at least one frame; raise LinkClosed at EOF.

        Must be cancel-safe: if cancelled, no frame may have been consumed (so a caller
        may wrap ``receive_batch`` in a timeout without losing frames).
        """

    @abc.abstractmethod
    def _try_send(self, frame: Frame, offload: TxOffload | None) -> bool:
        """Write one frame now. Return False (having written nothing) if it would block.

        A stream link that manages a partial write must accept the frame (return True)
        and keep the unwritten tail, reported by ``_has_pending``.
        """

    @abc.abstractmethod
    async def _wait_send_ready(self) -> None:
        """Wait until ``_try_send`` may make progress."""

    def _has_pending(self) -> bool:
        """True while a partially written frame's tail is waiting (stream links)."""
        return False

    def _flush_pending(self) -> bool:
        """Try to finish the pending tail; return True when it is all written."""
        return True

    async def _close(self) -> None:
        """Release the underlying resource."""
