"""Forwarding queries to upstream DNS servers.

:class:`Forwarder` is the default :class:`Resolver`. For one question it races attempts
over the server list within one overall deadline (``timeout``, 2 s by default):

* the schedule is the server list repeated ``retries + 1`` times; attempt *k* starts
  when ``timeout / len(schedule)`` has passed since attempt *k-1*, or at once when an
  attempt has failed (port unreachable, SERVFAIL, REFUSED, garbage). Earlier attempts
  keep listening, so a slow first server still wins if it answers first, and a dead
  one costs nothing but the stagger;
* an answer with TC set is fetched again over TCP from the same server (no new UDP
  attempts start while that runs). Like dig, a UDP reply with TC and no question
  section (some servers truncate everything) counts as a truncation signal when its id
  matches; it only ever leads to the TCP query, never to an answer;
* FORMERR to a query with EDNS is retried once without it (RFC 6891 6.2.2);
* when the deadline passes with no usable answer, :class:`UpstreamError` is raised (the
  service answers SERVFAIL), or, if every server answered SERVFAIL/REFUSED/NOTIMP, the
  last such answer is returned. A failure never turns into NXDOMAIN.

Spoofing resistance (RFC 5452): every attempt uses its own UDP socket, connected to the
server, so the kernel picks a fresh random source port for it and drops datagrams from
any other address; the query id comes from ``secrets``. An answer is accepted only if it
is a response with that id *and* the same question (name compared case-insensitively,
type, class); anything else is counted and ignored while the attempt keeps listening.
That is ~32 bits an off-path attacker must guess, against 16 for one shared socket with
random ids, and a late answer to an abandoned query can never be taken for the answer
to a new one. The cost, one socket per attempt, is bounded by ``dns_max_in_flight``.
A bare TC reply with the right id (no question) is the one exception, and it can only
start the TCP query to the same server, whose answer is checked the same way; a forged
one (from another address or port) never reaches the attempt's connected socket.

What goes upstream is a fresh query: the client's question, RD, CD and AD set, and an
OPT record with netkit's own payload size (1232) and the client's DO bit. Client EDNS
options (cookies, client subnet, padding) are not passed on.
"""

from __future__ import annotations

import logging
import math
import secrets
import struct
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import trio
from dnslib import EDNS0, RCODE, DNSBuffer, DNSHeader, DNSQuestion, DNSRecord

from .message import UPSTREAM_EDNS_PAYLOAD, Question

__all__ = ["Resolver", "Forwarder", "UpstreamReply", "UpstreamError", "build_query", "match_response"]

log = logging.getLogger("netkit.dns")

Server = tuple[str, int]
#: Upstream rcodes that mean "ask someone else" rather than an answer about the name.
_RETRY_RCODES = frozenset({RCODE.SERVFAIL, RCODE.REFUSED, RCODE.NOTIMP, RCODE.FORMERR})
_MAX_MESSAGE = 65535


class UpstreamError(Exception):
    """No usable answer from any upstream within the deadline."""


@dataclass(frozen=True, slots=True)
class UpstreamReply:
    """An upstream answer. ``record`` is None when dnslib could not parse past the
    question (an exotic record); the service then relays ``wire`` as it came."""

    record: DNSRecord | None
    wire: bytes = b""
    server: str = ""
    #: Seconds to cache this answer, overriding the TTLs in it (synthesized answers).
    cache_ttl: float | None = None

    @property
    def rcode(self) -> int:
        if self.record is not None:
            return self.record.header.rcode
        return self.wire[3] & 0xF if len(self.wire) >= 4 else RCODE.SERVFAIL


class Resolver(Protocol):
    """Answers a question for the DNS service; raises :class:`UpstreamError` on failure.
    Must be cancellable, and must not serialize concurrent calls."""

    async def resolve(self, question: Question) -> UpstreamReply: ...


def build_query(question: Question, qid: int, *, edns: bool, payload: int = UPSTREAM_EDNS_PAYLOAD) -> bytes:
    header = DNSHeader(id=qid, bitmap=0, rd=1, ad=1, cd=int(question.cd))
    record = DNSRecord(header, questions=[DNSQuestion(question.qname, question.qtype, question.qclass)])
    if edns:
        record.add_ar(EDNS0(udp_len=payload, flags="do" if question.do else ""))
    return record.pack()


def match_response(data: bytes, qid: int, question: Question, *, udp: bool = True) -> UpstreamReply | None:
    """``data`` as an answer to query ``qid`` for ``question``, or None if it is not one.

    Over UDP (``udp``) a reply with TC set and no question is accepted too: the caller
    must then ask again over TCP, never use it as an answer."""
    if len(data) < 12:
        return None
    buffer = DNSBuffer(data)
    try:
        header = DNSHeader.parse(buffer)
        if not header.qr or header.id != qid or header.opcode != 0:
            return None
        if header.q == 0:
            # Some servers truncate to the bare header. Over UDP that is a request to
            # ask again over TCP (the id still had to match, and the socket is
            # connected to the server, so only it or an on-path attacker can send it).
            if udp and header.tc:
                return UpstreamReply(DNSRecord(header), data)
            # Some servers send errors without the question. Acceptable only as an
            # error, which is never cached nor passed on as an answer about the name.
            if header.rcode not in _RETRY_RCODES:
                return None
            return UpstreamReply(DNSRecord(header), data)
        if header.q != 1 or not question.matches(DNSQuestion.parse(buffer)):
            return None
    except Exception:
        return None
    try:
        record = DNSRecord.parse(data)
    except Exception:  # valid header and question, records dnslib cannot read
        record = None
    return UpstreamReply(record, data)


class _Race:
    """State shared by the attempts for one question."""

    def __init__(self) -> None:
        self.result: UpstreamReply | None = None
        self.fallback: UpstreamReply | None = None
        self.outstanding = 0
        self.failed = False
        self.tcp = 0
        self.wake = trio.Event()

    def notify(self) -> None:
        self.wake.set()


class _AttemptFailed(Exception):
    pass


class Forwarder:
    """See the module docstring. ``servers`` is a list of (address, port) or a callable
    giving one (so a re-read resolv.conf applies to the next query)."""

    def __init__(self, servers: Sequence[Server] | Callable[[], Sequence[Server]], *,
                 timeout: float = 2.0, retries: int = 2,
                 socket_factory: Callable[..., trio.socket.SocketType] = trio.socket.socket,
                 payload: int = UPSTREAM_EDNS_PAYLOAD) -> None:
        self._servers = servers if callable(servers) else (lambda: servers)
        self.timeout = timeout
        self.retries = retries
        self.payload = payload
        self._socket_factory = socket_factory
        self.stats = {"udp_queries": 0, "tcp_queries": 0, "mismatched": 0, "server_errors": 0,
                      "network_errors": 0, "edns_fallbacks": 0, "timeouts": 0}

    def servers(self) -> list[Server]:
        return list(self._servers())

    async def resolve(self, question: Question) -> UpstreamReply:
        servers = self.servers()
        if not servers:
            raise UpstreamError("no upstream servers")
        schedule = [server for _ in range(self.retries + 1) for server in servers]
        interval = self.timeout / len(schedule)
        race = _Race()
        launched = 0
        with trio.move_on_after(self.timeout):
            async with trio.open_nursery() as nursery:
                next_launch = trio.current_time()
                while race.result is None:
                    may_launch = launched < len(schedule) and race.tcp == 0
                    if may_launch and (race.failed or race.outstanding == 0
                                       or trio.current_time() >= next_launch):
                        race.failed = False
                        race.outstanding += 1
                        nursery.start_soon(self._attempt, schedule[launched], question, race)
                        launched += 1
                        next_launch = trio.current_time() + interval
                        continue
                    if launched >= len(schedule) and race.outstanding == 0:
                        break
                    race.wake = trio.Event()
                    with trio.move_on_at(next_launch if may_launch else math.inf):
                        await race.wake.wait()
                nursery.cancel_scope.cancel()
        if race.result is not None:
            return race.result
        if race.fallback is not None:
            return race.fallback
        if launched and race.outstanding:
            self.stats["timeouts"] += 1
        raise UpstreamError("no answer from " + ", ".join(_fmt(s) for s in servers))

    async def _attempt(self, server: Server, question: Question, race: _Race) -> None:
        try:
            reply = await self._udp_exchange(server, question, race)
        except (OSError, _AttemptFailed, trio.BrokenResourceError, trio.ClosedResourceError) as e:
            if isinstance(e, OSError):
                self.stats["network_errors"] += 1
            log.debug("dns: %s failed for %s: %s", _fmt(server), question.qname, e)
            reply = None
        race.outstanding -= 1
        if reply is not None and reply.rcode not in _RETRY_RCODES:
            race.result = reply
        else:
            if reply is not None:
                self.stats["server_errors"] += 1
                race.fallback = reply
            race.failed = True
        race.notify()

    async def _udp_exchange(self, server: Server, question: Question, race: _Race) -> UpstreamReply:
        host, port = server
        family = trio.socket.AF_INET6 if ":" in host else trio.socket.AF_INET
        sock = self._socket_factory(family, trio.socket.SOCK_DGRAM)
        with sock:
            await sock.connect((host, port))
            edns = True
            while True:
                qid = secrets.randbits(16)
                self.stats["udp_queries"] += 1
                await sock.send(build_query(question, qid, edns=edns, payload=self.payload))
                while True:
                    data = await sock.recv(_MAX_MESSAGE)
                    reply = match_response(data, qid, question)
                    if reply is not None:
                        break
                    self.stats["mismatched"] += 1
                if reply.rcode == RCODE.FORMERR and edns:
                    self.stats["edns_fallbacks"] += 1
                    edns = False
                    continue
                break
        if not (reply.wire[2] & 0x02):  # TC
            return _with_server(reply, server)
        race.tcp += 1
        try:
            return _with_server(await self._tcp_exchange(server, question, edns), server)
        finally:
            race.tcp -= 1
            race.notify()

    async def _tcp_exchange(self, server: Server, question: Question, edns: bool) -> UpstreamReply:
        host, port = server
        family = trio.socket.AF_INET6 if ":" in host else trio.socket.AF_INET
        sock = self._socket_factory(family, trio.socket.SOCK_STREAM)
        try:
            await sock.connect((host, port))
        except BaseException:
            sock.close()
            raise
        async with trio.SocketStream(sock) as stream:
            qid = secrets.randbits(16)
            self.stats["tcp_queries"] += 1
            wire = build_query(question, qid, edns=edns, payload=self.payload)
            await stream.send_all(struct.pack("!H", len(wire)) + wire)
            (length,) = struct.unpack("!H", await _receive_exactly(stream, 2))
            data = await _receive_exactly(stream, length)
        reply = match_response(data, qid, question, udp=False)
        if reply is None:
            self.stats["mismatched"] += 1
            raise _AttemptFailed("TCP answer does not match the query")
        return reply


def _with_server(reply: UpstreamReply, server: Server) -> UpstreamReply:
    return UpstreamReply(reply.record, reply.wire, _fmt(server), reply.cache_ttl)


async def _receive_exactly(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = await stream.receive_some(n - len(data))
        if not chunk:
            raise _AttemptFailed("connection closed mid-answer")
        data += chunk
    return bytes(data)


def _fmt(server: Server) -> str:
    host, port = server
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
