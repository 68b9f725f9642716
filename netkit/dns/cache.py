"""The answer cache: TTL-respecting, LRU-bounded, with RFC 2308 negative caching.

Sans-I/O: every call takes ``now``. Entries are whole upstream replies keyed by
(name, type, class, DO, CD). A reply is kept for the smallest TTL among its answer and
authority records (capped by ``max_ttl``); a negative reply (NXDOMAIN, or NOERROR with
no answer) for min(SOA TTL, SOA MINIMUM) from its authority section (RFC 2308 5, capped
by ``negative_max_ttl``), and not at all without an SOA. SERVFAIL and other errors are
never cached, so an upstream outage ends for clients as soon as the upstream is back.
On a hit, every TTL in the copy handed out is reduced by the time the entry has spent
in the cache.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass

from dnslib import QTYPE, RCODE, RR, DNSHeader, DNSRecord

__all__ = ["DnsCache", "cache_ttl"]

_SKIP_TYPES = frozenset({QTYPE.OPT, 250, 24})  # OPT, TSIG, SIG: per message, not data


def cache_ttl(reply: DNSRecord, *, max_ttl: int, negative_max_ttl: int) -> int:
    """Seconds ``reply`` may be cached (0: not at all)."""
    rcode = reply.header.rcode
    if reply.header.tc or rcode not in (RCODE.NOERROR, RCODE.NXDOMAIN):
        return 0
    records = [rr for rr in reply.rr + reply.auth if rr.rtype not in _SKIP_TYPES]
    if rcode == RCODE.NOERROR and reply.rr:
        return min(min(_ttl(rr) for rr in records), max_ttl)
    soa = [rr for rr in reply.auth if rr.rtype == QTYPE.SOA]
    if not soa:
        return 0  # RFC 2308 5: negative answers without an SOA are not cached
    rr = soa[0]
    try:
        minimum = rr.rdata.times[4]
    except (AttributeError, IndexError):  # an SOA dnslib could not decode
        return 0
    return min(_ttl(rr), minimum, negative_max_ttl)


@dataclass(slots=True)
class _Entry:
    reply: DNSRecord
    stored: float
    expires: float


class DnsCache:
    """An LRU map from question keys to replies, each with its own expiry."""

    def __init__(self, max_entries: int, *, max_ttl: int = 86400, negative_max_ttl: int = 300) -> None:
        self.max_entries = max_entries
        self.max_ttl = max_ttl
        self.negative_max_ttl = negative_max_ttl
        self._entries: collections.OrderedDict[tuple, _Entry] = collections.OrderedDict()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def put(self, key: tuple, reply: DNSRecord, now: float, ttl: float | None = None) -> bool:
        """Store ``reply`` (for its own TTL unless ``ttl`` is given). True if stored."""
        if self.max_entries <= 0:
            return False
        if ttl is None:
            ttl = cache_ttl(reply, max_ttl=self.max_ttl, negative_max_ttl=self.negative_max_ttl)
        if ttl <= 0:
            self._entries.pop(key, None)
            return False
        self._entries[key] = _Entry(reply, now, now + ttl)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
            self.evictions += 1
        return True

    def get(self, key: tuple, now: float) -> DNSRecord | None:
        """A copy of the cached reply with TTLs aged to ``now``, or None."""
        entry = self._entries.get(key)
        if entry is None or now >= entry.expires or now < entry.stored:
            if entry is not None:
                del self._entries[key]
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        age = math.floor(now - entry.stored)
        reply = entry.reply
        return DNSRecord(DNSHeader(id=reply.header.id, bitmap=reply.header.bitmap),
                         questions=list(reply.questions),
                         rr=[_aged(rr, age) for rr in reply.rr],
                         auth=[_aged(rr, age) for rr in reply.auth],
                         ar=[_aged(rr, age) for rr in reply.ar])


def _aged(rr: RR, age: int) -> RR:
    if rr.rtype in _SKIP_TYPES:
        return rr
    return RR(rr.rname, rr.rtype, rr.rclass, max(0, _ttl(rr) - age), rr.rdata)


def _ttl(rr: RR) -> int:
    """RFC 2181 8: a TTL with the top bit set is treated as zero."""
    return 0 if rr.ttl > 0x7FFFFFFF else rr.ttl
