"""IPv4 fragment reassembly (sans-I/O) with memory caps and a timeout.

Guests may send UDP datagrams larger than the MTU as fragments. ``Reassembler.add``
takes each fragment and returns the whole packet (as one IPv4 packet, fragment fields
cleared) once every piece has arrived. Limits: bytes held across all partial datagrams
(``max_bytes``), bytes held for one guest (``guest_bytes``: a guest is whatever the
caller passes, the switch port), bytes per datagram (65535), and a timeout after the
first fragment. Held bytes include a fixed cost per fragment and per datagram, so a
flood of tiny fragments is charged what it really holds.

At a guest's share, that guest's own oldest datagram is dropped to make room; at the
total, the oldest datagram of the guest holding the most. So one guest's incomplete
fragments can never take the room another guest needs. Datagrams are keyed by guest
too: a guest cannot add pieces to another guest's datagram. Overlapping fragments drop
the whole datagram (they are an attack, not a retransmission: RFC 5722 reasons apply to
IPv4 too).
"""

from __future__ import annotations

import collections
import struct
from dataclasses import dataclass, field
from typing import Hashable

from .wire.checksum import checksum
from .wire.ipv4 import IPV4_HEADER_LEN, Ipv4View

__all__ = ["Reassembler", "MAX_DATAGRAM", "FRAGMENT_COST", "DATAGRAM_COST"]

MAX_DATAGRAM = 65535
#: Memory a held fragment costs beyond its payload (bytes object, dict entry), and a
#: partial datagram (its record, key and dicts); charged against the limits.
FRAGMENT_COST = 96
DATAGRAM_COST = 512


@dataclass(eq=False)
class _Partial:
    started: float
    guest: Hashable
    header: bytes | None = None  # from the fragment at offset 0
    pieces: dict[int, bytes] = field(default_factory=dict)  # offset -> data
    total: int | None = None  # payload length, known once the last fragment arrives
    held: int = 0  # payload bytes
    cost: int = DATAGRAM_COST  # what it counts against the limits


@dataclass(eq=False)
class _Share:
    held: int = 0
    #: The guest's partial datagrams, oldest first.
    keys: dict[tuple, None] = field(default_factory=dict)


class Reassembler:
    def __init__(self, *, max_bytes: int = 4 << 20, timeout: float = 30.0, guest_bytes: int | None = None) -> None:
        self.max_bytes = max_bytes
        self.guest_bytes = max_bytes if guest_bytes is None else min(guest_bytes, max_bytes)
        self.timeout = timeout
        self._partials: collections.OrderedDict[tuple, _Partial] = collections.OrderedDict()
        self._shares: dict[Hashable, _Share] = {}
        self.held_bytes = 0
        self.stats: collections.Counter[str] = collections.Counter()

    def add(self, ip: Ipv4View, now: float, guest: Hashable = None) -> bytes | None:
        """Take one fragment from ``guest``; return the reassembled IPv4 packet when complete."""
        self.expire(now)
        key = (guest, ip.src, ip.dst, ip.protocol, ip.ident)
        offset = ip.fragment_offset
        payload = ip.payload
        size = len(payload)
        end = offset + size
        if end > MAX_DATAGRAM - IPV4_HEADER_LEN or (ip.more_fragments and size % 8):
            self.stats["invalid"] += 1
            self._drop(key)
            return None
        partial = self._partials.get(key)
        total = None
        if partial is not None:
            for other_offset, other in partial.pieces.items():
                if offset < other_offset + len(other) and other_offset < end:
                    self.stats["overlap"] += 1
                    self._drop(key)
                    return None
            total = partial.total
        if not ip.more_fragments:
            if total is not None and total != end:
                self.stats["invalid"] += 1
                self._drop(key)
                return None
            total = end
        if total is not None and end > total:
            self.stats["invalid"] += 1
            self._drop(key)
            return None
        cost = size + FRAGMENT_COST + (0 if partial is not None else DATAGRAM_COST)
        if not self._make_room(key, guest, cost):
            self.stats["over-limit"] += 1
            self._drop(key)
            return None
        share = self._shares.get(guest)
        if share is None:
            share = self._shares[guest] = _Share()
        if partial is None:
            partial = self._partials[key] = _Partial(now, guest)
            share.keys[key] = None
            cost -= DATAGRAM_COST  # the record's cost is counted in partial.cost already
            share.held += DATAGRAM_COST
            self.held_bytes += DATAGRAM_COST
        partial.total = total
        partial.pieces[offset] = bytes(payload)
        partial.held += size
        partial.cost += cost
        share.held += cost
        self.held_bytes += cost
        if offset == 0:
            partial.header = bytes(ip.header)
        self.stats["fragments"] += 1
        if partial.total is None or partial.header is None or partial.held != partial.total:
            return None
        data = b"".join(partial.pieces[o] for o in sorted(partial.pieces))
        self._drop(key)
        self.stats["reassembled"] += 1
        header = bytearray(partial.header)
        struct.pack_into("!HHH", header, 2, len(header) + len(data), ip.ident, 0)
        header[10:12] = b"\0\0"
        header[6:8] = b"\0\0"
        struct.pack_into("!H", header, 10, checksum(header))
        return bytes(header) + data

    def _make_room(self, key: tuple, guest: Hashable, cost: int) -> bool:
        """Evict datagrams until ``cost`` more bytes fit: first the guest's own oldest
        (its share), then, at the total, the oldest of whichever guest holds the most."""
        share = self._shares.get(guest)
        if share is not None:
            while share.held + cost > self.guest_bytes:
                victim = next((k for k in share.keys if k != key), None)
                if victim is None:
                    return False
                self.stats["guest-evicted"] += 1
                self._drop(victim)
        elif cost > self.guest_bytes:
            return False
        while self.held_bytes + cost > self.max_bytes:
            biggest = max(self._shares.values(), key=lambda s: s.held)
            victim = next((k for k in biggest.keys if k != key), None)
            if victim is None:
                return False
            self.stats["evicted"] += 1
            self._drop(victim)
        return True

    def _drop(self, key: tuple) -> None:
        partial = self._partials.pop(key, None)
        if partial is None:
            return
        self.held_bytes -= partial.cost
        share = self._shares[partial.guest]
        share.held -= partial.cost
        del share.keys[key]
        if not share.keys:
            del self._shares[partial.guest]

    def forget(self, guest: Hashable) -> None:
        """Drop everything held for ``guest`` (its port is gone)."""
        share = self._shares.get(guest)
        if share is not None:
            for key in list(share.keys):
                self._drop(key)

    def held_by(self, guest: Hashable) -> int:
        """Bytes (with their fixed costs) held for ``guest``."""
        share = self._shares.get(guest)
        return share.held if share is not None else 0

    def expire(self, now: float) -> None:
        while self._partials:
            key, partial = next(iter(self._partials.items()))
            if now - partial.started < self.timeout:
                break
            self.stats["timed-out"] += 1
            self._drop(key)

    def __len__(self) -> int:
        return len(self._partials)
