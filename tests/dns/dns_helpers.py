"""Helpers for the DNS tests: a scriptable fake upstream server on 127.0.0.1 (UDP and
TCP on one port) and a client that asks a DnsService.

Tests only ever talk to 127.0.0.1: every upstream is one of these fakes, started by the
test in its own nursery.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Awaitable, Callable

import trio
from dnslib import EDNS0, QTYPE, RCODE, RR, SOA, DNSHeader, DNSLabel, DNSQuestion, DNSRecord

CLIENT = (IPv4Address("192.168.65.3"), 40000)

Handler = Callable[[DNSRecord, str], "DNSRecord | bytes | None | Awaitable[DNSRecord | bytes | None]"]


def key(name: str) -> str:
    return str(DNSLabel(name)).lower()


@dataclass
class FakeUpstream:
    """A DNS server on 127.0.0.1 that answers from ``records`` (zone-file lines), or
    through ``handler`` when set (return a reply, raw bytes, a list of raw datagrams to
    send in order, or None for no answer). A slow upstream is an async handler that
    waits on an event the test sets, so the test decides when the answer is ready."""

    records: dict[tuple[str, int], list[RR]] = field(default_factory=dict)
    handler: Handler | None = None
    #: Answer nothing at all over UDP (a black hole).
    silent: bool = False
    #: Answer every UDP query with TC set and no records.
    always_truncate_udp: bool = False
    #: Negative answers carry an SOA with this TTL and MINIMUM.
    negative_ttl: int = 60
    #: (transport, query) for every query received, in order.
    queries: list[tuple[str, DNSRecord]] = field(default_factory=list)
    #: The (address, port) each UDP query came from, in order.
    udp_peers: list[tuple[str, int]] = field(default_factory=list)
    port: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def add(self, *zone_lines: str) -> None:
        for line in zone_lines:
            for rr in RR.fromZone(line):
                self.records.setdefault((str(rr.rname).lower(), rr.rtype), []).append(rr)

    def names(self) -> set[str]:
        return {name for name, _ in self.records}

    def count(self, name: str | None = None, transport: str | None = None) -> int:
        return sum(1 for t, q in self.queries
                   if (name is None or key(name) == str(q.q.qname).lower())
                   and (transport is None or t == transport))

    # --- answering ---

    def answer(self, query: DNSRecord) -> DNSRecord:
        q = query.q
        name = str(q.qname).lower()
        reply = DNSRecord(DNSHeader(id=query.header.id, bitmap=0, qr=1, rd=query.header.rd, ra=1),
                          questions=[q])
        seen = set()
        while name not in seen:
            seen.add(name)
            found = self.records.get((name, q.qtype))
            if found:
                reply.add_answer(*found)
                break
            cname = self.records.get((name, QTYPE.CNAME))
            if cname and q.qtype != QTYPE.CNAME:
                reply.add_answer(*cname)
                name = str(cname[0].rdata.label).lower()
                continue
            if name not in self.names():
                reply.header.rcode = RCODE.NXDOMAIN
            soa = RR("test.", QTYPE.SOA, ttl=self.negative_ttl,
                     rdata=SOA("ns.test.", "admin.test.", (1, 3600, 600, 86400, self.negative_ttl)))
            reply.add_auth(soa)
            break
        return reply

    async def _reply_for(self, query: DNSRecord, transport: str) -> bytes | None:
        if self.handler is not None:
            out = self.handler(query, transport)
            if hasattr(out, "__await__"):
                out = await out
        else:
            out = self.answer(query)
        if out is None or isinstance(out, (bytes, list)):
            return out
        if transport == "udp":
            opts = [rr for rr in query.ar if rr.rtype == QTYPE.OPT]
            limit = max(512, opts[0].edns_len) if opts else 512
            wire = out.pack()
            if self.always_truncate_udp or len(wire) > limit:
                short = DNSRecord(DNSHeader(id=out.header.id, bitmap=out.header.bitmap),
                                  questions=out.questions)
                short.header.tc = 1
                return short.pack()
        return out.pack()

    # --- serving ---

    async def start(self, nursery: trio.Nursery) -> "FakeUpstream":
        for _ in range(50):
            udp = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
            await udp.bind(("127.0.0.1", 0))
            port = udp.getsockname()[1]
            tcp = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
            try:
                await tcp.bind(("127.0.0.1", port))
            except OSError as e:
                udp.close()
                tcp.close()
                if e.errno == errno.EADDRINUSE:
                    continue
                raise
            break
        else:  # pragma: no cover
            raise RuntimeError("no port free for UDP and TCP")
        tcp.listen(16)
        self.port = port
        nursery.start_soon(self._serve_udp, udp)
        nursery.start_soon(trio.serve_listeners, self._serve_tcp_conn, [trio.SocketListener(tcp)])
        return self

    async def _serve_udp(self, sock) -> None:
        with sock:
            async with trio.open_nursery() as nursery:
                while True:
                    data, peer = await sock.recvfrom(65535)
                    nursery.start_soon(self._udp_one, sock, data, peer)

    async def _udp_one(self, sock, data: bytes, peer) -> None:
        try:
            query = DNSRecord.parse(data)
        except Exception:
            return
        self.queries.append(("udp", query))
        self.udp_peers.append(peer)
        if self.silent:
            return
        wire = await self._reply_for(query, "udp")
        for datagram in wire if isinstance(wire, list) else [wire] if wire is not None else []:
            await sock.sendto(datagram, peer)

    async def _serve_tcp_conn(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                while True:
                    head = await receive_exactly(stream, 2)
                    if head is None:
                        return
                    data = await receive_exactly(stream, struct.unpack("!H", head)[0])
                    if data is None:
                        return
                    query = DNSRecord.parse(data)
                    self.queries.append(("tcp", query))
                    wire = await self._reply_for(query, "tcp")
                    if wire is not None:
                        await stream.send_all(struct.pack("!H", len(wire)) + wire)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass


async def receive_exactly(stream, n: int) -> bytes | None:
    data = bytearray()
    while len(data) < n:
        chunk = await stream.receive_some(n - len(data))
        if not chunk:
            return None
        data += chunk
    return bytes(data)


def free_udp_port() -> int:
    """A loopback UDP port nothing listens on (queries to it get port unreachable)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_query(name: str, qtype: str = "A", *, qid: int = 0x1234, edns: int | None = None,
               do: bool = False) -> DNSRecord:
    query = DNSRecord(DNSHeader(id=qid), q=DNSQuestion(name, getattr(QTYPE, qtype)))
    if edns is not None:
        query.add_ar(EDNS0(udp_len=edns, flags="do" if do else ""))
    return query


async def ask(service, name: str, qtype: str = "A", *, transport: str = "udp", client=CLIENT,
              edns: int | None = None, qid: int = 0x1234) -> DNSRecord:
    """Ask ``service`` one question; parse and sanity-check the answer."""
    query = make_query(name, qtype, qid=qid, edns=edns)
    wire = await service.handle_query(query.pack(), client=client, transport=transport)
    assert wire is not None
    reply = DNSRecord.parse(wire)
    assert reply.header.id == qid and reply.header.qr == 1
    if transport == "udp":
        limit = max(512, edns) if edns else 512
        assert len(wire) <= limit
    return reply


def rdata(reply: DNSRecord, rtype: str | None = None) -> list[str]:
    return [str(rr.rdata) for rr in reply.rr if rtype is None or rr.rtype == getattr(QTYPE, rtype)]


class FakeClock:
    """A clock the test moves by hand (for TTLs and file-reload intervals)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
