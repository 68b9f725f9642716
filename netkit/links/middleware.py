"""Links that wrap a link: packet capture, fault injection, filtering.

Each wrapper is itself a ``Link`` and can wrap any link (or another wrapper), as in
vpnkit's ``Capture.Make(Filter.Make(...))``. A wrapper shares the inner link's
``stats``, ``name`` and ``offload``; other attributes (``mtu``, ``mac``, ...) are read
through to the inner link. Order matters: ``PcapCapture(FaultInjector(link))`` records
what the stack sent and what it was given; ``FaultInjector(PcapCapture(link))`` records
what really crossed the wire.
"""

from __future__ import annotations

import os
import random
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import trio

from .base import Frame, Link, LinkClosed, LinkStatistics, TxOffload
from ._util import logger

__all__ = [
    "LinkWrapper",
    "PcapCapture",
    "PcapWriter",
    "CaptureStatistics",
    "FaultInjector",
    "FaultCounts",
    "FaultStatistics",
    "CountingFilter",
    "FilterStatistics",
    "LINKTYPE_ETHERNET",
]

LINKTYPE_ETHERNET = 1
_ETHERNET_HEADER_LEN = 14
_DIRECTIONS = frozenset({"receive", "send"})


class LinkWrapper(Link):
    """Base for middleware: forwards everything to ``inner``. Subclasses override
    ``receive_batch``/``send`` (and ``aclose`` to release their own resources)."""

    def __init__(self, inner: Link) -> None:
        super().__init__(send_queue_bytes=0)  # the inner link owns the real queue
        self.inner = inner
        self.stats: LinkStatistics = inner.stats

    @property  # type: ignore[override]
    def name(self) -> str:
        return self.inner.name

    @property  # type: ignore[override]
    def offload(self) -> bool:
        return self.inner.offload

    @property
    def checksums_trusted(self) -> bool:
        return self.inner.checksums_trusted

    def __getattr__(self, attr: str) -> Any:
        # Only reached for attributes this wrapper lacks: mtu, mac, uuid, fileno, ...
        if attr == "inner":
            raise AttributeError(attr)
        return getattr(self.inner, attr)

    async def receive_batch(self) -> list[Frame]:
        return await self.inner.receive_batch()

    def send(self, frame: Frame, offload: TxOffload | None = None) -> bool:
        return self.inner.send(frame, offload)

    async def run_sender(self) -> None:
        await self.inner.run_sender()

    @property
    def closed(self) -> bool:
        return self.inner.closed

    async def aclose(self) -> None:
        self._closed = True
        await self.inner.aclose()

    def statistics(self) -> LinkStatistics:
        return self.inner.stats

    # The wrapper overrides the public methods, so the base's hooks are never used.
    async def _receive_batch(self) -> list[Frame]:  # pragma: no cover
        raise AssertionError("LinkWrapper overrides receive_batch")

    def _try_send(self, frame: Frame, offload: TxOffload | None) -> bool:  # pragma: no cover
        raise AssertionError("LinkWrapper overrides send")

    async def _wait_send_ready(self) -> None:  # pragma: no cover
        raise AssertionError("LinkWrapper overrides run_sender")


# ----- capture -----
@dataclass(slots=True)
class CaptureStatistics:
    """Records written by a ``PcapWriter``."""

    frames: int = 0
    bytes: int = 0
    #: True once capture stopped (size limit reached or the file failed).
    stopped: bool = False


class PcapWriter:
    """A libpcap file (LINKTYPE_ETHERNET, microsecond timestamps) that one or several
    ``PcapCapture`` wrappers write to.

    ``file_or_path``: a path (created; closed by ``close``) or a binary file object (not
    closed here). The file header is written unless the file object is already past its
    start, so several writers made over one regular file produce one valid capture; for a
    pipe, share one ``PcapWriter`` instead. Frames longer than ``snaplen`` are truncated
    in the file; after ``max_bytes`` of records, capture stops. A failing file stops
    capture and is logged, never raised. Writes are buffered, blocking file I/O.
    """

    def __init__(
        self,
        file_or_path: str | os.PathLike[str] | BinaryIO,
        *,
        snaplen: int = 262144,
        max_bytes: int | None = None,
    ) -> None:
        if isinstance(file_or_path, (str, os.PathLike)):
            self._file: BinaryIO = open(file_or_path, "wb")
            self._owns_file = True
            at_start = True
        else:
            self._file = file_or_path
            self._owns_file = False
            try:
                at_start = self._file.tell() == 0
            except (OSError, ValueError):
                at_start = True  # a pipe: nobody can have written a header we could see
        self.snaplen = snaplen
        self.max_bytes = max_bytes
        self.stats = CaptureStatistics()
        if at_start:
            # magic, version 2.4, thiszone, sigfigs, snaplen, linktype
            self._write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, snaplen, LINKTYPE_ETHERNET))

    def _write(self, data: bytes | memoryview) -> None:
        try:
            self._file.write(data)
        except (OSError, ValueError) as e:  # ValueError: the file was closed under us
            logger.error("pcap capture stopped: %s", e)
            self.stats.stopped = True

    def write_frame(self, frame: Frame) -> None:
        st = self.stats
        if st.stopped:
            return
        length = len(frame)
        kept = min(length, self.snaplen)
        if self.max_bytes is not None and st.bytes + _PCAP_RECORD.size + kept > self.max_bytes:
            st.stopped = True
            return
        sec, usec = divmod(time.time_ns() // 1000, 1_000_000)
        # Header and data with no await in between: records from several links sharing
        # this file never interleave.
        self._write(_PCAP_RECORD.pack(sec, usec, kept, length))
        self._write(frame if kept == length else memoryview(frame)[:kept])
        st.frames += 1
        st.bytes += _PCAP_RECORD.size + kept

    def flush(self) -> None:
        try:
            self._file.flush()
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        self.flush()
        if self._owns_file:
            self._file.close()


_PCAP_RECORD = struct.Struct("<IIII")  # ts_sec, ts_usec, incl_len, orig_len


class PcapCapture(LinkWrapper):
    """Records every frame received and sent to a libpcap file, readable by Wireshark,
    tcpdump and dpkt.

    ``file_or_path``: a path (the file is created, and closed with the link), a binary
    file object (flushed, not closed, on ``aclose``) or a ``PcapWriter`` shared with
    other links (left open). Frames are recorded as the inner link gives them (with
    offloads: possibly larger than the MTU, with partial checksums); sent frames are
    recorded when the inner link accepts them. ``snaplen``/``max_bytes``: see
    ``PcapWriter``. Counts are in ``capture_stats``.
    """

    def __init__(
        self,
        link: Link,
        file_or_path: str | os.PathLike[str] | BinaryIO | PcapWriter,
        *,
        snaplen: int = 262144,
        max_bytes: int | None = None,
    ) -> None:
        super().__init__(link)
        if isinstance(file_or_path, PcapWriter):
            self.writer = file_or_path
            self._owns_writer = False
        else:
            self.writer = PcapWriter(file_or_path, snaplen=snaplen, max_bytes=max_bytes)
            self._owns_writer = True
        self.capture_stats = self.writer.stats

    async def receive_batch(self) -> list[Frame]:
        frames = await self.inner.receive_batch()
        for frame in frames:
            self.writer.write_frame(frame)
        return frames

    def send(self, frame: Frame, offload: TxOffload | None = None) -> bool:
        accepted = self.inner.send(frame, offload)
        if accepted:
            self.writer.write_frame(frame)
        return accepted

    def flush(self) -> None:
        self.writer.flush()

    async def aclose(self) -> None:
        try:
            await self.inner.aclose()
        finally:
            if self._owns_writer:
                self.writer.close()
            else:
                self.writer.flush()


# ----- fault injection -----
@dataclass(slots=True)
class FaultCounts:
    """Faults injected in one direction."""

    dropped: int = 0
    duplicated: int = 0
    reordered: int = 0
    corrupted: int = 0


@dataclass(slots=True)
class FaultStatistics:
    """Faults injected by a ``FaultInjector``, per direction."""

    receive: FaultCounts = field(default_factory=FaultCounts)
    send: FaultCounts = field(default_factory=FaultCounts)


#: A frame and the ``TxOffload`` travelling with it (None on the receive side).
_Item = tuple[Frame, "TxOffload | None"]


class _FaultPlan:
    """The decisions for one direction: a seeded generator and the frame held back."""

    def __init__(self, rng: random.Random, drop: float, duplicate: float, reorder: float,
                 corrupt: float, counts: FaultCounts) -> None:
        self.rng = rng
        self.drop, self.duplicate, self.reorder, self.corrupt = drop, duplicate, reorder, corrupt
        self.counts = counts
        self.held: _Item | None = None
        #: Bumped whenever a frame is held, so a timer can tell "still the same one".
        self.generation = 0

    def apply(self, item: _Item) -> list[_Item]:
        """Decide the fate of one frame; return what to pass on now, in order."""
        rng, counts = self.rng, self.counts
        # Draw all four numbers for every frame, so one kind's probability does not
        # shift the random stream the others see.
        r_drop, r_corrupt, r_duplicate, r_reorder = rng.random(), rng.random(), rng.random(), rng.random()
        if r_drop < self.drop:
            counts.dropped += 1
            return []
        frame, offload = item
        if r_corrupt < self.corrupt and len(frame) > _ETHERNET_HEADER_LEN:
            damaged = bytearray(frame)
            damaged[rng.randrange(_ETHERNET_HEADER_LEN, len(damaged))] ^= rng.randrange(1, 256)
            item = (bytes(damaged), offload)
            counts.corrupted += 1
        out = [item]
        if r_duplicate < self.duplicate:
            counts.duplicated += 1
            out.append(item)
        if self.held is not None:
            # The frame held back goes right after this one: reordered, never lost.
            out.append(self.held)
            self.held = None
        elif r_reorder < self.reorder:
            counts.reordered += 1
            self.held = out.pop(0)
            self.generation += 1
        return out

    def release(self) -> _Item | None:
        held, self.held = self.held, None
        return held


class FaultInjector(LinkWrapper):
    """Drops, duplicates, reorders and corrupts frames at random, reproducibly.

    Each of ``drop``, ``duplicate``, ``reorder``, ``corrupt`` is a per-frame
    probability; ``directions`` picks where faults apply ("receive", "send"). Each
    direction draws from its own ``random.Random`` seeded from ``seed``, so a test sees
    the same faults every run whatever the interleaving of the two directions.

    - reorder: the frame is held back and passed on right after the next frame; if none
      follows within ``hold_time`` seconds it is passed on anyway (on the send side by
      ``run_sender``, so run it). A held frame is only lost if the link closes.
    - corrupt: one random byte beyond the Ethernet header is flipped.
    - duplicate: the frame is passed on twice.

    Counts are in ``faults.receive`` and ``faults.send``. An injected drop looks like
    loss on the wire: ``send`` still returns True.
    """

    def __init__(
        self,
        link: Link,
        *,
        seed: int | str,
        drop: float = 0.0,
        duplicate: float = 0.0,
        reorder: float = 0.0,
        corrupt: float = 0.0,
        directions: Iterable[str] = ("receive", "send"),
        hold_time: float = 0.005,
    ) -> None:
        super().__init__(link)
        for what, p in (("drop", drop), ("duplicate", duplicate), ("reorder", reorder), ("corrupt", corrupt)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{what}: probability {p} is outside 0..1")
        self.directions = frozenset(directions)
        if not self.directions <= _DIRECTIONS:
            raise ValueError(f"directions must be among {sorted(_DIRECTIONS)}, got {sorted(self.directions)}")
        self.faults = FaultStatistics()
        self._hold_time = hold_time
        self._rx = _FaultPlan(random.Random(f"{seed}/receive"), drop, duplicate, reorder, corrupt, self.faults.receive)
        self._tx = _FaultPlan(random.Random(f"{seed}/send"), drop, duplicate, reorder, corrupt, self.faults.send)
        self._tx_held = trio.Event()
        self._corrupts_received = corrupt > 0 and "receive" in self.directions

    @property
    def checksums_trusted(self) -> bool:
        # Corrupted frames must be caught by checksum verification, as a NIC would.
        return self.inner.checksums_trusted and not self._corrupts_received

    async def receive_batch(self) -> list[Frame]:
        if "receive" not in self.directions:
            return await self.inner.receive_batch()
        while True:
            if self._rx.held is None:
                frames = await self.inner.receive_batch()
            else:
                # A frame is held back: give the next frame a short time to overtake it.
                # (receive_batch is cancel-safe, so the timeout loses nothing.)
                frames = []
                with trio.move_on_after(self._hold_time):
                    try:
                        frames = await self.inner.receive_batch()
                    except LinkClosed:
                        pass  # deliver the held frame now; the next call raises again
                if not frames:
                    held = self._rx.release()
                    assert held is not None
                    return [held[0]]
            out: list[Frame] = []
            for frame in frames:
                out.extend(f for f, _ in self._rx.apply((frame, None)))
            if out:
                return out

    def send(self, frame: Frame, offload: TxOffload | None = None) -> bool:
        if "send" not in self.directions:
            return self.inner.send(frame, offload)
        generation = self._tx.generation
        accepted = True
        for f, o in self._tx.apply((frame, offload)):
            accepted = self.inner.send(f, o) and accepted
        if self._tx.generation != generation:
            self._tx_held.set()  # start the clock on the frame just held back
        return accepted

    async def run_sender(self) -> None:
        if "send" not in self.directions:
            await self.inner.run_sender()
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._release_held_sends)
            await self.inner.run_sender()
            nursery.cancel_scope.cancel()

    async def _release_held_sends(self) -> None:
        while True:
            await self._tx_held.wait()
            self._tx_held = trio.Event()
            generation = self._tx.generation
            await trio.sleep(self._hold_time)
            if self._tx.generation == generation:
                held = self._tx.release()
                if held is not None:
                    self.inner.send(*held)

    async def aclose(self) -> None:
        self._tx.held = None
        await super().aclose()


# ----- filtering -----
@dataclass(slots=True)
class FilterStatistics:
    """Frames a ``CountingFilter`` rejected, per direction."""

    receive_rejected: int = 0
    send_rejected: int = 0


class CountingFilter(LinkWrapper):
    """Passes only frames ``allow(frame)`` accepts; counts the rest in ``filter_stats``.

    A predicate that raises on a (malformed) frame counts as a rejection. A rejected
    ``send`` returns False.
    """

    def __init__(self, link: Link, allow: Callable[[Frame], bool], *,
                 directions: Iterable[str] = ("receive", "send")) -> None:
        super().__init__(link)
        self._allow = allow
        self.directions = frozenset(directions)
        if not self.directions <= _DIRECTIONS:
            raise ValueError(f"directions must be among {sorted(_DIRECTIONS)}, got {sorted(self.directions)}")
        self.filter_stats = FilterStatistics()

    def _allowed(self, frame: Frame) -> bool:
        try:
            return bool(self._allow(frame))
        except Exception:
            return False

    async def receive_batch(self) -> list[Frame]:
        if "receive" not in self.directions:
            return await self.inner.receive_batch()
        while True:
            frames = await self.inner.receive_batch()
            kept = [f for f in frames if self._allowed(f)]
            self.filter_stats.receive_rejected += len(frames) - len(kept)
            if kept:
                return kept

    def send(self, frame: Frame, offload: TxOffload | None = None) -> bool:
        if "send" in self.directions and not self._allowed(frame):
            self.filter_stats.send_rejected += 1
            return False
        return self.inner.send(frame, offload)

