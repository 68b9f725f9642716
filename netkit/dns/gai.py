"""``dns_mode = "getaddrinfo"``: answer A and AAAA through the host's getaddrinfo.

This makes guests see exactly what host programs see: the host's hosts file, nsswitch,
mDNS, VPN split-DNS and per-interface resolvers (on macOS, where resolv.conf tells only
part of the story). getaddrinfo runs in a worker thread (``trio.socket.getaddrinfo``),
so a slow lookup blocks no other query; trio's thread limiter bounds how many run at
once, and the service's deadline abandons a lookup that takes too long.

What getaddrinfo cannot say, and how it is answered:

* other types (MX, TXT, SRV, PTR, ...) are forwarded to the upstream servers; with no
  upstream servers they are answered NOTIMP;
* TTLs: getaddrinfo has none, so answers carry (and are cached for) ``GAI_TTL`` seconds;
* "no such name" versus "no address of this family": EAI_NODATA/EAI_ADDRFAMILY mean
  NOERROR with no answers; EAI_NONAME is NXDOMAIN only if the other family does not
  resolve either (otherwise NOERROR, no answers). Any other error is a failure
  (SERVFAIL), never NXDOMAIN;
* a name that is an IP literal ("10.0.0.1") is not passed to getaddrinfo (which would
  just echo it back): it is NXDOMAIN, as it is in the DNS;
* no CNAMEs and no DNSSEC: answers are plain address records.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Awaitable, Callable

import trio
from dnslib import AAAA, CLASS, QTYPE, RCODE, RR, A, DNSHeader, DNSQuestion, DNSRecord

from .message import Question
from .upstream import Forwarder, UpstreamError, UpstreamReply

__all__ = ["GetaddrinfoResolver", "GAI_TTL"]

#: TTL of (and cache lifetime for) answers made from getaddrinfo.
GAI_TTL = 10
_NODATA_ERRORS = {getattr(socket, name) for name in ("EAI_NODATA", "EAI_ADDRFAMILY") if hasattr(socket, name)}
_NONAME_ERRORS = {socket.EAI_NONAME}

GetaddrinfoFn = Callable[..., Awaitable[list]]


class GetaddrinfoResolver:
    """A :class:`~netkit.dns.upstream.Resolver` on getaddrinfo (see the module docstring)."""

    def __init__(self, *, fallback: Forwarder | None = None,
                 getaddrinfo: GetaddrinfoFn = trio.socket.getaddrinfo, ttl: int = GAI_TTL) -> None:
        self.fallback = fallback
        self._getaddrinfo = getaddrinfo
        self.ttl = ttl
        self.stats = {"lookups": 0, "errors": 0, "forwarded": 0, "notimp": 0}

    async def resolve(self, question: Question) -> UpstreamReply:
        if question.qtype not in (QTYPE.A, QTYPE.AAAA) or question.qclass != CLASS.IN:
            if self.fallback is not None and self.fallback.servers():
                self.stats["forwarded"] += 1
                return await self.fallback.resolve(question)
            self.stats["notimp"] += 1
            return self._reply(question, RCODE.NOTIMP, [], cache=False)
        name = str(question.qname).rstrip(".")
        if not name:
            return self._reply(question, RCODE.NOERROR, [])
        try:
            ipaddress.ip_address(name)
        except ValueError:
            pass
        else:
            return self._reply(question, RCODE.NXDOMAIN, [])
        family = socket.AF_INET if question.qtype == QTYPE.A else socket.AF_INET6
        outcome = await self._lookup(name, family)
        if outcome == "noname":
            other = socket.AF_INET6 if family == socket.AF_INET else socket.AF_INET
            if await self._lookup(name, other) == "noname":
                return self._reply(question, RCODE.NXDOMAIN, [])
            outcome = []
        elif outcome == "nodata":
            outcome = []
        return self._reply(question, RCODE.NOERROR, outcome)

    async def _lookup(self, name: str, family: int) -> list | str:
        """Addresses, or "noname" / "nodata"; raises UpstreamError on other failures."""
        self.stats["lookups"] += 1
        try:
            infos = await self._getaddrinfo(name, None, family, socket.SOCK_STREAM)
        except socket.gaierror as e:
            if e.errno in _NONAME_ERRORS:
                return "noname"
            if e.errno in _NODATA_ERRORS:
                return "nodata"
            self.stats["errors"] += 1
            raise UpstreamError(f"getaddrinfo({name!r}): {e}") from None
        except (OSError, UnicodeError) as e:
            self.stats["errors"] += 1
            raise UpstreamError(f"getaddrinfo({name!r}): {e}") from None
        addresses: list[str] = []
        for info in infos:
            if info[0] != family:
                continue
            address = info[4][0].split("%", 1)[0]
            if address not in addresses:
                addresses.append(address)
        return addresses

    def _reply(self, question: Question, rcode: int, addresses: list[str], *, cache: bool = True) -> UpstreamReply:
        header = DNSHeader(bitmap=0, qr=1, rd=1, ra=1, rcode=rcode)
        record = DNSRecord(header, questions=[DNSQuestion(question.qname, question.qtype, question.qclass)])
        rdata = A if question.qtype == QTYPE.A else AAAA
        for address in addresses:
            record.add_answer(RR(question.qname, question.qtype, ttl=self.ttl, rdata=rdata(address)))
        return UpstreamReply(record, cache_ttl=self.ttl if cache else 0)
