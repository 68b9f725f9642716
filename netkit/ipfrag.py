"""IPv4 fragment reassembly (sans-I/O) with a memory cap and a timeout.

Guests may send UDP datagrams larger than the MTU as fragments. ``Reassembler.add``
takes each fragment and returns the whole packet (as one IPv4 packet, fragment fields
cleared) once every piece has arrived. Limits: total bytes held across all partial
datagrams, bytes per datagram (65535), and a timeout after the first fragment. Overlapping
fragments drop the whole datagram (they are an attack, not a retransmission: RFC 5722
reasons apply to IPv4 too).
"""

from __future__ import annotations

import collections
import struct
from dataclasses import dataclass, field

from .wire.checksum import checksum
from .wire.ipv4 import IPV4_HEADER_LEN, Ipv4View

__all__ = ["Reassembler", "MAX_DATAGRAM"]

MAX_DATAGRAM = 65535


@dataclass(eq=False)
class _Partial:
    started: float
    header: bytes | None = None  # from the fragment at offset 0
    pieces: dict[int, bytes] = field(default_factory=dict)  # offset -> data
    total: int | None = None  # payload length, known once the last fragment arrives
    held: int = 0


class Reassembler:
    def __init__(self, *, max_bytes: int = 4 << 20, timeout: float = 30.0) -> None:
        self.max_bytes = max_bytes
        self.timeout = timeout
        self._partials: collections.OrderedDict[tuple, _Partial] = collections.OrderedDict()
        self.held_bytes = 0
        self.stats: collections.Counter[str] = collections.Counter()

    def add(self, ip: Ipv4View, now: float) -> bytes | None:
        """Take one fragment; return the reassembled IPv4 packet when complete."""
        self.expire(now)
        key = (ip.src, ip.dst, ip.protocol, ip.ident)
        offset = ip.fragment_offset
        data = bytes(ip.payload)
        end = offset + len(data)
        if end > MAX_DATAGRAM - IPV4_HEADER_LEN or (ip.more_fragments and len(data) % 8):
            self.stats["invalid"] += 1
            self._drop(key)
            return None
        partial = self._partials.get(key)
        if partial is None:
            partial = self._partials[key] = _Partial(now)
        for other_offset, other in partial.pieces.items():
            if offset < other_offset + len(other) and other_offset < end:
                self.stats["overlap"] += 1
                self._drop(key)
                return None
        if not ip.more_fragments:
            if partial.total is not None and partial.total != end:
                self.stats["invalid"] += 1
                self._drop(key)
                return None
            partial.total = end
        if partial.total is not None and end > partial.total:
            self.stats["invalid"] += 1
            self._drop(key)
            return None
        while self.held_bytes + len(data) > self.max_bytes:
            victim = next((k for k in self._partials if k != key), None)
            if victim is None:
                break
            self.stats["evicted"] += 1
            self._drop(victim)
        if self.held_bytes + len(data) > self.max_bytes:
            self.stats["over-limit"] += 1
            self._drop(key)
            return None
        partial.pieces[offset] = data
        partial.held += len(data)
        self.held_bytes += len(data)
        if offset == 0:
            partial.header = bytes(ip.header)
        self.stats["fragments"] += 1
        if partial.total is None or partial.header is None or partial.held != partial.total:
            return None
        payload = b"".join(partial.pieces[o] for o in sorted(partial.pieces))
        self._drop(key)
        self.stats["reassembled"] += 1
        header = bytearray(partial.header)
        struct.pack_into("!HHH", header, 2, len(header) + len(payload), ip.ident, 0)
        header[10:12] = b"\0\0"
        header[6:8] = b"\0\0"
        struct.pack_into("!H", header, 10, checksum(header))
        return bytes(header) + payload

    def _drop(self, key: tuple) -> None:
        partial = self._partials.pop(key, None)
        if partial is not None:
            self.held_bytes -= partial.held

    def expire(self, now: float) -> None:
        while self._partials:
            key, partial = next(iter(self._partials.items()))
            if now - partial.started < self.timeout:
                break
            self.stats["timed-out"] += 1
            self._drop(key)

    def __len__(self) -> int:
        return len(self._partials)
