"""The DNS service on the gateway: local names, a cache, and a forwarder.

The gateway hands :meth:`DnsService.handle_query` each UDP query to port 53 (one task
per query, so a slow upstream never holds up another query) and each TCP connection to
port 53 to :meth:`DnsService.serve_tcp`. A query is answered, in order, from:

1. local data (:mod:`netkit.dns.local`): runtime zones, the hosts file, the built-in
   names (host.docker.internal and friends), PTR for those addresses;
2. the cache (:mod:`netkit.dns.cache`);
3. the resolver: by default a :class:`~netkit.dns.upstream.Forwarder` over
   ``dns_upstreams`` (or the nameservers of ``dns_resolv_conf``), or with
   ``dns_mode = "getaddrinfo"`` a :class:`~netkit.dns.gai.GetaddrinfoResolver`.

At most ``dns_max_in_flight`` resolutions run at once; a query beyond that is answered
SERVFAIL at once (and counted), which keeps a flood from holding unbounded sockets and
tasks. Every query gets an answer within ``dns_timeout`` (SERVFAIL at worst, never a
made-up NXDOMAIN). Input is untrusted: a message without a readable header, or a
response, is dropped; one with a readable header but a bad body gets FORMERR;
``handle_query`` never raises (except for cancellation).

UDP answers larger than the client can take (512 bytes, or its EDNS payload size, and
never more than fits the link MTU) are cut to the header and question with TC set, so
the client asks again over TCP, where the whole answer goes.
"""

from __future__ import annotations

import collections
import logging
import struct
from ipaddress import IPv4Address
from typing import Callable

import trio
from dnslib import QTYPE, RCODE, RR, A, DNSRecord

from ..config import Config, parse_dns_server
from .cache import DnsCache
from .files import HostsTable, WatchedFile, parse_hosts, parse_resolv_conf
from .gai import GetaddrinfoResolver
from .local import LocalNames
from .message import (MAX_MESSAGE_LEN, REFUSED_TYPES, BadQuery, Query, Question, fit_udp,
                      parse_query_untrusted, reply_for, with_edns)
from .upstream import Forwarder, Resolver, UpstreamError, UpstreamReply

__all__ = ["DnsService", "default_resolver"]

log = logging.getLogger("netkit.dns")

Client = tuple[IPv4Address, int]
_DEADLINE_SLACK = 0.05


def default_resolver(config: Config, clock: Callable[[], float] = trio.current_time) -> Resolver:
    """The resolver ``config`` asks for: a Forwarder (over ``dns_upstreams``, or the
    nameservers of ``dns_resolv_conf``, re-read when it changes), wrapped in a
    GetaddrinfoResolver when ``dns_mode`` is "getaddrinfo"."""
    if config.dns_upstreams:
        fixed = [parse_dns_server(s) for s in config.dns_upstreams]
        servers: Callable[[], list[tuple[str, int]]] = lambda: fixed
    else:
        resolv_conf = WatchedFile(config.dns_resolv_conf, parse_resolv_conf, (), clock=clock)
        servers = lambda: list(resolv_conf.get())  # noqa: E731
    forwarder = Forwarder(servers, timeout=config.dns_timeout, retries=config.dns_retries)
    if config.dns_mode == "getaddrinfo":
        return GetaddrinfoResolver(fallback=forwarder)
    return forwarder


class DnsService:
    """See the module docstring."""

    def __init__(self, config: Config, *, resolver: Resolver | None = None,
                 clock: Callable[[], float] = trio.current_time) -> None:
        self.config = config
        self.clock = clock
        self._hosts: WatchedFile[HostsTable] | None = None
        if config.dns_hosts_file:
            self._hosts = WatchedFile(config.dns_hosts_file, parse_hosts, HostsTable(), clock=clock)
        self.local = LocalNames(config, hosts=self._hosts.get if self._hosts is not None else None)
        self.cache = DnsCache(config.dns_cache_entries, max_ttl=config.dns_cache_max_ttl,
                              negative_max_ttl=config.dns_negative_cache_max_ttl)
        self.resolver: Resolver = resolver if resolver is not None else default_resolver(config, clock)
        #: Maps a client's IP to the address its vm names resolve to (its own lease).
        self.vm_name_resolver: Callable[[IPv4Address], IPv4Address | None] = lambda ip: ip
        #: The switch's ``netkit.policy.Policy`` (set by open_switch): asked about every query.
        self.policy = None
        self._in_flight = 0
        self._stats: collections.Counter[str] = collections.Counter()

    # --- runtime control ---

    def add_zone(self, name: str, records: list[tuple[str, str, str]] | str) -> None:
        """Answer the names of zone ``name`` locally (replacing a zone of that name).
        ``records`` is a list of (name, type, value) with absolute names (a trailing dot
        is optional; a name not ending in the zone's is taken as relative to it, "@" is
        the apex), or zone-file text (names relative to the zone unless they end in a
        dot; $TTL and $ORIGIN work). Raises ValueError on a bad record."""
        self.local.add_zone(name, records)

    def remove_zone(self, name: str) -> bool:
        return self.local.remove_zone(name)

    def statistics(self) -> dict:
        stats = {key: 0 for key in ("queries", "answered_local", "forwarded", "cache_hits", "servfail",
                                    "nxdomain", "truncated", "dropped_malformed", "formerr",
                                    "notimp", "refused", "over_in_flight_limit", "upstream_failures",
                                    "upstream_timeouts", "internal_errors", "tcp_connections")}
        stats.update(self._stats)
        stats["in_flight"] = self._in_flight
        stats["cache_entries"] = len(self.cache)
        stats["zones"] = len(self.local.zones)
        resolver_stats = getattr(self.resolver, "stats", None)
        if isinstance(resolver_stats, dict):
            stats["resolver"] = dict(resolver_stats)
            fallback = getattr(self.resolver, "fallback", None)
            if fallback is not None and isinstance(getattr(fallback, "stats", None), dict):
                stats["resolver"]["fallback"] = dict(fallback.stats)
        return stats

    # --- queries ---

    async def handle_query(self, query: bytes, *, client: Client, transport: str) -> bytes | None:
        """The wire answer to one query from ``client`` ("udp" or "tcp"), or None to send
        nothing. Never raises (but for cancellation)."""
        self._stats["queries"] += 1
        try:
            try:
                parsed = parse_query_untrusted(query)
            except BadQuery as e:
                if e.reply is None:
                    self._stats["dropped_malformed"] += 1
                    return None
                return self._count_rcode(e.reply.pack(), e.reply.header.rcode)
            try:
                return self._finish(parsed, await self._answer(parsed, client), transport)
            except Exception:  # a bug must cost one SERVFAIL, not the service
                log.exception("dns: internal error answering %s from %s", parsed.question, client[0])
                self._stats["internal_errors"] += 1
                return self._finish(parsed, reply_for(parsed, RCODE.SERVFAIL), transport)
        except Exception:
            log.exception("dns: cannot answer a query from %s", client[0] if client else None)
            self._stats["internal_errors"] += 1
            return None

    def _count_rcode(self, wire: bytes, rcode: int) -> bytes:
        name = {RCODE.SERVFAIL: "servfail", RCODE.NXDOMAIN: "nxdomain", RCODE.FORMERR: "formerr",
                RCODE.NOTIMP: "notimp", RCODE.REFUSED: "refused"}.get(rcode)
        if name:
            self._stats[name] += 1
        return wire

    def _finish(self, query: Query, reply: DNSRecord | bytes, transport: str) -> bytes:
        limit = query.udp_limit(self.config.mtu) if transport == "udp" else MAX_MESSAGE_LEN
        if isinstance(reply, bytes):  # relayed as the upstream sent it
            if len(reply) <= limit:
                return self._count_rcode(reply, reply[3] & 0xF)
            reply = reply_for(query, reply[3] & 0xF)
            reply.header.tc = 1
        with_edns(reply, query.edns)
        wire, truncated = fit_udp(reply, reply.pack(), limit)
        if truncated:
            self._stats["truncated"] += 1
        return self._count_rcode(wire, reply.header.rcode)

    async def _answer(self, query: Query, client: Client) -> DNSRecord | bytes:
        q = query.question
        if q.qtype in REFUSED_TYPES:
            return reply_for(query, RCODE.REFUSED)
        if self.policy is not None:
            decision = self.policy.check_dns(client[0], str(q.qname), QTYPE.get(q.qtype, str(q.qtype)))
            if decision.action == "deny":
                return reply_for(query, RCODE.NXDOMAIN, aa=True)
            if decision.action == "redirect":
                reply = reply_for(query, RCODE.NOERROR, aa=True)
                if q.qtype == QTYPE.A:
                    reply.add_answer(RR(q.qname, QTYPE.A, ttl=0, rdata=A(str(decision.address))))
                return reply
        local = self.local.lookup(q.qname, q.qtype, q.qclass, vm_address=lambda: self._vm_address(client))
        if local is not None:
            self._stats["answered_local"] += 1
            reply = reply_for(query, local.rcode, aa=True)
            reply.rr = list(local.answers)
            reply.auth = list(local.authority)
            if local.chase is not None:
                # A local CNAME to a name outside: resolve the target as a recursive
                # server would, and answer with the whole chain.
                reply.header.aa = 0
                tail = await self._resolve(Question(local.chase, q.qtype, q.qclass, query.do, query.cd))
                if tail is not None and tail.record is not None:
                    reply.rr += tail.record.rr
                    reply.auth = list(tail.record.auth)
                    reply.header.rcode = tail.record.header.rcode
            return reply
        upstream = await self._resolve(query.as_question())
        if upstream is None:
            return reply_for(query, RCODE.SERVFAIL)
        if upstream.record is None:
            wire = bytearray(upstream.wire)
            wire[0:2] = struct.pack("!H", query.id)
            return bytes(wire)
        record = upstream.record
        reply = reply_for(query, record.header.rcode)
        reply.header.ad = record.header.ad if (query.do or query.header.ad) else 0
        reply.rr = list(record.rr)
        reply.auth = list(record.auth)
        reply.ar = list(record.ar)
        return reply

    async def _resolve(self, question: Question) -> UpstreamReply | None:
        """The cache's or the resolver's answer; None means SERVFAIL."""
        key = question.key
        cached = self.cache.get(key, self.clock())
        if cached is not None:
            self._stats["cache_hits"] += 1
            return UpstreamReply(cached)
        if self._in_flight >= self.config.dns_max_in_flight:
            self._stats["over_in_flight_limit"] += 1
            return None
        self._in_flight += 1
        self._stats["forwarded"] += 1
        try:
            # The resolver has its own deadline of dns_timeout (and then answers with what
            # it has); this one, a little later, bounds resolvers that do not.
            with trio.move_on_after(self.config.dns_timeout + _DEADLINE_SLACK) as scope:
                reply = await self.resolver.resolve(question)
            if scope.cancelled_caught:
                self._stats["upstream_timeouts"] += 1
                return None
        except UpstreamError as e:
            log.debug("dns: %s: %s", question.qname, e)
            self._stats["upstream_failures"] += 1
            return None
        except Exception:
            log.exception("dns: resolver failed for %s", question.qname)
            self._stats["internal_errors"] += 1
            return None
        finally:
            self._in_flight -= 1
        if reply.record is not None:
            record = reply.record
            record.ar = [rr for rr in record.ar if rr.rtype not in (41, 250, 24)]  # OPT, TSIG, SIG
            record.set_header_qa()
            self.cache.put(key, record, self.clock(), ttl=reply.cache_ttl)
        return reply

    def _vm_address(self, client: Client) -> IPv4Address | None:
        try:
            return self.vm_name_resolver(client[0])
        except Exception:
            log.exception("dns: vm_name_resolver failed for %s", client[0])
            return None

    # --- TCP ---

    async def serve_tcp(self, stream: trio.abc.Stream, client: Client) -> None:
        """Answer length-prefixed queries on ``stream`` (RFC 1035 4.2.2, RFC 7766) until
        the client closes it or it stays idle for ``dns_tcp_idle_timeout``; answers go
        out as they are ready (possibly out of order); at most ``dns_tcp_pipeline``
        queries are worked on at once. Closes ``stream``."""
        self._stats["tcp_connections"] += 1
        idle = self.config.dns_tcp_idle_timeout
        send_lock = trio.Lock()
        slots = trio.Semaphore(self.config.dns_tcp_pipeline)
        state = {"outstanding": 0, "deadline": trio.current_time() + idle}

        async def answer(message: bytes, cancel_scope: trio.CancelScope) -> None:
            try:
                wire = await self.handle_query(message, client=client, transport="tcp")
                if wire is not None:
                    # A client that stops reading holds the connection no longer than
                    # an idle one.
                    with trio.move_on_after(idle) as send_scope:
                        async with send_lock:
                            await stream.send_all(struct.pack("!H", len(wire)) + wire)
                    if send_scope.cancelled_caught:
                        cancel_scope.cancel()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                cancel_scope.cancel()  # the client is gone: stop everything
            finally:
                state["outstanding"] -= 1
                state["deadline"] = trio.current_time() + idle
                slots.release()

        try:
            async with trio.open_nursery() as nursery:
                buffer = bytearray()
                while True:
                    while len(buffer) >= 2:
                        (length,) = struct.unpack_from("!H", buffer)
                        if len(buffer) < 2 + length:
                            break
                        message = bytes(buffer[2:2 + length])
                        del buffer[:2 + length]
                        await slots.acquire()
                        state["outstanding"] += 1
                        nursery.start_soon(answer, message, nursery.cancel_scope)
                    with trio.move_on_at(state["deadline"]) as scope:
                        try:
                            data = await stream.receive_some(65536)
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            nursery.cancel_scope.cancel()
                            break
                    if scope.cancelled_caught:
                        if state["outstanding"]:
                            state["deadline"] = trio.current_time() + idle
                            continue
                        break
                    if not data:
                        break  # the client is done sending; the nursery waits for answers
                    state["deadline"] = trio.current_time() + idle
                    buffer += data
        finally:
            with trio.CancelScope(shield=True):
                with trio.move_on_after(1):
                    try:
                        await stream.aclose()
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
