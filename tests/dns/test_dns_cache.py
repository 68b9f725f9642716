"""The answer cache: TTLs (with an injected clock), LRU cap, negative caching."""

from dns_helpers import FakeClock, ask, make_query, rdata
from dnslib import QTYPE, RCODE, RR, SOA, DNSRecord

from netkit.dns.cache import DnsCache, cache_ttl


async def test_cache_hit_respects_ttl(make_service, upstream):
    upstream.add("short.test. 10 IN A 10.0.0.7")
    clock = FakeClock()
    service = make_service(upstream, clock=clock)
    assert rdata(await ask(service, "short.test")) == ["10.0.0.7"]
    clock.advance(4.5)
    reply = await ask(service, "SHORT.test")
    assert rdata(reply) == ["10.0.0.7"]
    assert reply.rr[0].ttl == 6  # aged by the whole seconds spent in the cache
    assert upstream.count("short.test") == 1
    assert service.statistics()["cache_hits"] == 1
    clock.advance(5.6)  # 10.1 s after: expired
    await ask(service, "short.test")
    assert upstream.count("short.test") == 2


async def test_cache_key_includes_type_and_do_bit(make_service, upstream):
    upstream.add("k.test. 60 IN A 10.0.0.8", "k.test. 60 IN AAAA fd00::8")
    service = make_service(upstream, clock=FakeClock())
    await ask(service, "k.test", "A")
    await ask(service, "k.test", "AAAA")
    query = make_query("k.test", "A", edns=1232, do=True)
    await service.handle_query(query.pack(), client=(None, 0), transport="udp")
    assert upstream.count("k.test") == 3
    await ask(service, "k.test", "AAAA")
    assert upstream.count("k.test") == 3


async def test_negative_answers_cached_per_soa_and_bounded(make_service, upstream):
    clock = FakeClock()
    upstream.negative_ttl = 3600
    service = make_service(upstream, clock=clock, dns_negative_cache_max_ttl=30)
    assert (await ask(service, "gone.test")).header.rcode == RCODE.NXDOMAIN
    clock.advance(29)
    assert (await ask(service, "gone.test")).header.rcode == RCODE.NXDOMAIN
    assert upstream.count("gone.test") == 1
    clock.advance(2)  # past the 30 s bound, though the SOA said an hour
    await ask(service, "gone.test")
    assert upstream.count("gone.test") == 2
    # NODATA is cached the same way
    await ask(service, "example.test", "MX")
    await ask(service, "example.test", "MX")
    assert upstream.count("example.test") == 1


async def test_servfail_is_not_cached(make_service, upstream):
    failing = {"on": True}

    def handler(query, transport):
        if failing["on"]:
            reply = query.reply()
            reply.header.rcode = RCODE.SERVFAIL
            return reply
        return upstream.answer(query)

    upstream.handler = handler
    service = make_service(upstream, clock=FakeClock(), dns_retries=0)
    assert (await ask(service, "example.test")).header.rcode == RCODE.SERVFAIL
    failing["on"] = False
    assert rdata(await ask(service, "example.test")) == ["10.0.0.1"]


async def test_cache_disabled(make_service, upstream):
    service = make_service(upstream, clock=FakeClock(), dns_cache_entries=0)
    await ask(service, "example.test")
    await ask(service, "example.test")
    assert upstream.count("example.test") == 2


def _answer(name: str, ttl: int) -> DNSRecord:
    reply = make_query(name).reply()
    reply.add_answer(*RR.fromZone(f"{name}. {ttl} IN A 10.0.0.1"))
    return reply


def test_lru_cap():
    cache = DnsCache(3)
    for i in range(3):
        cache.put(("n", i), _answer(f"n{i}.test", 60), now=0)
    assert cache.get(("n", 0), now=1) is not None  # n0 is now the most recent
    cache.put(("n", 3), _answer("n3.test", 60), now=1)
    assert len(cache) == 3 and cache.evictions == 1
    assert cache.get(("n", 1), now=1) is None  # the least recently used went
    assert cache.get(("n", 0), now=1) is not None
    assert cache.get(("n", 3), now=1) is not None


def test_cache_ttl_rules():
    limits = dict(max_ttl=100, negative_max_ttl=50)
    assert cache_ttl(_answer("a.test", 300), **limits) == 100
    assert cache_ttl(_answer("a.test", 0), **limits) == 0
    assert cache_ttl(_answer("a.test", 0x80000000), **limits) == 0  # RFC 2181 8
    nx = make_query("a.test").reply()
    nx.header.rcode = RCODE.NXDOMAIN
    assert cache_ttl(nx, **limits) == 0  # no SOA: not cached
    nx.add_auth(RR("test.", QTYPE.SOA, ttl=40, rdata=SOA("ns.test.", "a.test.", (1, 2, 3, 4, 20))))
    assert cache_ttl(nx, **limits) == 20  # min(SOA TTL, MINIMUM)
    truncated = _answer("a.test", 60)
    truncated.header.tc = 1
    assert cache_ttl(truncated, **limits) == 0
    refused = _answer("a.test", 60)
    refused.header.rcode = RCODE.REFUSED
    assert cache_ttl(refused, **limits) == 0


def test_clock_going_backwards_drops_entry():
    cache = DnsCache(10)
    cache.put("k", _answer("a.test", 60), now=100)
    assert cache.get("k", now=50) is None
