"""Forwarding to upstream servers (fakes on 127.0.0.1): every type, failover, timeouts,
TC -> TCP, the in-flight cap, spoofing resistance."""

import struct

import pytest
import trio
from dns_helpers import CLIENT, FakeUpstream, ask, free_udp_port, make_query, rdata
from dnslib import QTYPE, RCODE, RR, DNSHeader, DNSQuestion, DNSRecord

from netkit.dns import Forwarder, Question, UpstreamError
from netkit.dns.upstream import match_response
from netkit.testing.wait import wait_until


@pytest.fixture
def records(upstream):
    upstream.add(
        "www.example.test. 300 IN A 10.0.0.10",
        "www.example.test. 300 IN AAAA 2001:db8::10",
        "example.test. 300 IN MX 10 mail.example.test.",
        'example.test. 300 IN TXT "v=spf1 -all"',
        "_sip._tcp.example.test. 300 IN SRV 0 5 5060 sip.example.test.",
        "10.0.0.10.in-addr.arpa. 300 IN PTR www.example.test.",
        "alias.example.test. 300 IN CNAME www.example.test.",
    )
    return upstream


@pytest.mark.parametrize("name,qtype,expected", [
    ("www.example.test", "A", ["10.0.0.10"]),
    ("www.example.test", "AAAA", ["2001:db8::10"]),
    ("example.test", "MX", ["10 mail.example.test."]),
    ("example.test", "TXT", ['"v=spf1 -all"']),
    ("_sip._tcp.example.test", "SRV", ["0 5 5060 sip.example.test."]),
    ("10.0.0.10.in-addr.arpa", "PTR", ["www.example.test."]),
    ("alias.example.test", "CNAME", ["www.example.test."]),
])
async def test_forwards_every_type(make_service, records, name, qtype, expected):
    service = make_service(records)
    reply = await ask(service, name, qtype)
    assert reply.header.rcode == RCODE.NOERROR
    assert rdata(reply, qtype) == expected
    assert reply.header.ra == 1 and reply.header.aa == 0
    assert service.statistics()["forwarded"] == 1


async def test_cname_chain_forwarded_whole(make_service, records):
    reply = await ask(make_service(records), "alias.example.test", "A")
    assert [QTYPE[rr.rtype] for rr in reply.rr] == ["CNAME", "A"]
    assert rdata(reply, "A") == ["10.0.0.10"]


async def test_nxdomain_passes_through_with_soa(make_service, records):
    reply = await ask(make_service(records), "nope.example.test", "A")
    assert reply.header.rcode == RCODE.NXDOMAIN
    assert [QTYPE[rr.rtype] for rr in reply.auth] == ["SOA"]


async def test_question_case_and_id_are_the_clients(make_service, records):
    reply = await ask(make_service(records), "WwW.ExAmPlE.tEsT", "A", qid=4321)
    assert str(reply.q.qname) == "WwW.ExAmPlE.tEsT."
    assert reply.header.id == 4321


async def test_upstream_query_has_random_id_rd_and_edns(make_service, records):
    service = make_service(records)
    for i in range(20):
        await ask(service, f"n{i}.example.test", "A", qid=7)
    ids = {q.header.id for _, q in records.queries}
    assert len(ids) > 10
    _, q = records.queries[0]
    assert q.header.rd == 1
    assert [rr.edns_len for rr in q.ar if rr.rtype == QTYPE.OPT] == [1232]


async def test_edns_client_gets_opt_back_and_plain_client_does_not(make_service, records):
    service = make_service(records)
    plain = await ask(service, "www.example.test", "A")
    assert not [rr for rr in plain.ar if rr.rtype == QTYPE.OPT]
    edns = await ask(service, "www.example.test", "A", edns=4096)
    assert [rr.rtype for rr in edns.ar] == [QTYPE.OPT]


async def test_upstream_servfail_fails_over_then_passes_through(make_service, upstream, upstream2):
    upstream.handler = lambda q, t: _rcode_reply(q, RCODE.SERVFAIL)
    service = make_service(upstream, upstream2)
    reply = await ask(service, "example.test", "A")
    assert rdata(reply) == ["10.0.0.2"]
    upstream2.handler = lambda q, t: _rcode_reply(q, RCODE.REFUSED)
    with trio.fail_after(0.5):
        reply = await ask(service, "other.test", "A")
    assert reply.header.rcode in (RCODE.SERVFAIL, RCODE.REFUSED)


def _rcode_reply(query: DNSRecord, rcode: int) -> DNSRecord:
    reply = query.reply()
    reply.header.rcode = rcode
    return reply


async def test_dead_upstream_servfails_promptly(make_service):
    service = make_service(f"127.0.0.1:{free_udp_port()}", dns_timeout=5.0)
    start = trio.current_time()
    reply = await ask(service, "example.test", "A")
    assert reply.header.rcode == RCODE.SERVFAIL
    assert trio.current_time() - start < 1.0  # port unreachable: no need to wait the timeout
    stats = service.statistics()
    assert stats["servfail"] == 1 and stats["upstream_failures"] == 1 and stats["nxdomain"] == 0


async def test_silent_upstream_servfails_within_timeout(make_service, upstream):
    upstream.silent = True
    service = make_service(upstream, dns_timeout=0.6)
    start = trio.current_time()
    reply = await ask(service, "example.test", "A")
    elapsed = trio.current_time() - start
    assert reply.header.rcode == RCODE.SERVFAIL
    assert 0.55 < elapsed < 1.5
    # the retries went to the same (only) server within the deadline: sent before it,
    # received by the fake upstream whenever its task gets to them
    assert service.statistics()["resolver"]["udp_queries"] == 3
    await wait_until(lambda: upstream.count("example.test", "udp") == 3, timeout=5)


async def test_failover_to_second_upstream_when_first_is_dead(make_service, upstream2):
    service = make_service(f"127.0.0.1:{free_udp_port()}", upstream2, dns_timeout=5.0)
    start = trio.current_time()
    reply = await ask(service, "example.test", "A")
    assert rdata(reply) == ["10.0.0.2"]
    assert trio.current_time() - start < 0.8  # at once, not after the stagger (5 / 6 s)


async def test_failover_to_second_upstream_when_first_is_silent(make_service, upstream, upstream2):
    upstream.silent = True
    service = make_service(upstream, upstream2, dns_timeout=3.0)
    start = trio.current_time()
    reply = await ask(service, "example.test", "A")
    assert rdata(reply) == ["10.0.0.2"]
    # the second server is asked after timeout / (servers * rounds) = 0.5 s
    assert 0.45 < trio.current_time() - start < 2.0
    assert upstream.count("example.test") == 1 and upstream2.count("example.test") == 1


async def test_slow_upstream_blocks_no_other_query(make_service, upstream):
    """A query stuck upstream holds up nothing else: the others are answered meanwhile."""
    upstream.add("fast.test. 60 IN A 10.9.9.9", "slow.test. 60 IN A 10.8.8.8")
    release = trio.Event()

    async def handler(query, transport):
        if str(query.q.qname) == "slow.test.":
            await release.wait()
        return upstream.answer(query)

    upstream.handler = handler
    service = make_service(upstream, dns_timeout=10.0, dns_retries=0)
    slow = {}

    async def ask_slow():
        slow["reply"] = await ask(service, "slow.test", "A")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask_slow)
        await wait_until(lambda: upstream.count("slow.test") == 1)  # stuck upstream
        with trio.fail_after(5):
            assert rdata(await ask(service, "fast.test", "A")) == ["10.9.9.9"]
            async with trio.open_nursery() as others:
                for i in range(5):
                    others.start_soon(ask, service, f"x{i}.example.test", "A")
        assert "reply" not in slow and service.statistics()["in_flight"] == 1
        release.set()
    assert rdata(slow["reply"]) == ["10.8.8.8"]


async def test_in_flight_cap_servfails_beyond(make_service, upstream):
    release = trio.Event()

    async def handler(query, transport):
        await release.wait()
        return upstream.answer(query)

    upstream.handler = handler
    service = make_service(upstream, dns_max_in_flight=3, dns_timeout=10.0)
    replies = []

    async def one(i):
        replies.append(await ask(service, f"n{i}.example.test", "A"))

    async with trio.open_nursery() as nursery:
        for i in range(3):
            nursery.start_soon(one, i)
        await wait_until(lambda: upstream.count() == 3)  # all three stuck upstream
        assert service.statistics()["in_flight"] == 3
        with trio.fail_after(2):  # over the cap: SERVFAIL at once, not after 10 s
            reply = await ask(service, "extra.example.test", "A")
        assert reply.header.rcode == RCODE.SERVFAIL
        release.set()
    assert [r.header.rcode for r in replies] == [RCODE.NXDOMAIN] * 3
    stats = service.statistics()
    assert stats["over_in_flight_limit"] == 1 and stats["in_flight"] == 0
    assert upstream.count("extra.example.test") == 0


async def test_upstream_truncation_retries_over_tcp(make_service, upstream):
    upstream.always_truncate_udp = True
    service = make_service(upstream)
    reply = await ask(service, "example.test", "A")
    assert rdata(reply) == ["10.0.0.1"]
    assert upstream.count("example.test", "udp") == 1
    assert upstream.count("example.test", "tcp") == 1
    assert service.statistics()["resolver"]["tcp_queries"] == 1


def _bare_truncated(query: DNSRecord, qid: int | None = None) -> bytes:
    """A reply with TC set and nothing else: no question, no records."""
    header = DNSHeader(id=query.header.id if qid is None else qid, qr=1, tc=1, ra=1)
    return bytes(DNSRecord(header).pack())


async def test_upstream_truncation_without_question_retries_over_tcp(make_service, upstream):
    """Some servers truncate to the bare header; dig then asks over TCP, and so must we."""
    upstream.handler = lambda query, transport: (
        _bare_truncated(query) if transport == "udp" else upstream.answer(query))
    service = make_service(upstream)
    reply = await ask(service, "example.test", "A")
    assert reply.header.rcode == RCODE.NOERROR and rdata(reply) == ["10.0.0.1"]
    assert upstream.count("example.test", "udp") == 1
    assert upstream.count("example.test", "tcp") == 1
    stats = service.statistics()["resolver"]
    assert stats["tcp_queries"] == 1 and stats["mismatched"] == 0


async def test_bare_truncated_reply_over_tcp_is_never_an_answer(make_service, upstream):
    """Over TCP there is nothing to fall back to: a bare TC reply is a failed attempt,
    not an empty NOERROR answer about the name."""
    upstream.handler = lambda query, transport: _bare_truncated(query)
    service = make_service(upstream, dns_timeout=0.5)
    reply = await ask(service, "example.test", "A")
    assert reply.header.rcode == RCODE.SERVFAIL
    stats = service.statistics()["resolver"]
    assert stats["tcp_queries"] >= 1 and stats["mismatched"] == stats["tcp_queries"]


async def test_spoofed_truncation_signals_trigger_nothing(make_service, upstream, nursery):
    """An off-path attacker who knows the query id sends a bare TC reply to netkit's
    query port from another port and from another address; a garbage TC reply with a
    wrong id comes from the server itself. None may start a TCP query: the first two
    never reach the forwarder (its socket is connected to the server), the third is
    counted as mismatched. The real answer, sent last, is the one taken."""
    spoof_port = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    await spoof_port.bind(("127.0.0.1", 0))
    spoof_address = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    await spoof_address.bind(("127.0.0.2", upstream.port))  # the server's port, another address

    async def handler(query, transport):
        assert transport == "udp"
        victim = upstream.udp_peers[-1]
        for sock in (spoof_port, spoof_address):
            await sock.sendto(_bare_truncated(query), victim)
        wrong_id = _bare_truncated(query, qid=query.header.id ^ 0x0101)
        return [wrong_id, b"\x00", upstream.answer(query).pack()]

    upstream.handler = handler
    service = make_service(upstream)
    with spoof_port, spoof_address:
        reply = await ask(service, "example.test", "A")
    assert rdata(reply) == ["10.0.0.1"]
    assert upstream.count(transport="tcp") == 0
    stats = service.statistics()["resolver"]
    assert stats["tcp_queries"] == 0 and stats["mismatched"] == 2


async def test_big_upstream_answer_comes_whole_over_tcp(make_service, upstream):
    upstream.add(*[f"big.test. 60 IN TXT {'x' * 200}{i}" for i in range(10)])  # ~2.1 kB
    service = make_service(upstream)
    reply = await ask(service, "big.test", "TXT", transport="tcp")
    assert len(reply.rr) == 10
    assert upstream.count("big.test", "tcp") == 1


async def test_spoofed_and_mismatched_answers_are_ignored(make_service, upstream):
    """Answers with the wrong id or question come first; the real one is still taken."""

    def handler(query, transport):
        wrong_id = upstream.answer(query)
        wrong_id.header.id ^= 0x5555
        wrong_id.rr = RR.fromZone("example.test. 60 A 6.6.6.6")
        wrong_q = DNSRecord(DNSHeader(id=query.header.id, bitmap=0, qr=1), q=DNSQuestion("evil.test"))
        wrong_q.add_answer(*RR.fromZone("evil.test. 60 A 6.6.6.6"))
        return [wrong_id.pack(), wrong_q.pack(), b"junk", upstream.answer(query).pack()]

    upstream.handler = handler
    service = make_service(upstream)
    reply = await ask(service, "example.test", "A")
    assert rdata(reply) == ["10.0.0.1"]
    assert service.statistics()["resolver"]["mismatched"] == 3


def test_match_response_checks_id_question_and_qr():
    question = Question(make_query("a.test").q.qname, QTYPE.A)
    good = make_query("A.TEST", qid=99).reply()
    assert match_response(good.pack(), 99, question) is not None
    assert match_response(good.pack(), 98, question) is None
    assert match_response(make_query("a.test", qid=99).pack(), 99, question) is None  # not a response
    other = make_query("a.test", "AAAA", qid=99).reply()
    assert match_response(other.pack(), 99, question) is None
    nxdomain_without_question = DNSRecord(DNSHeader(id=99, qr=1, rcode=RCODE.NXDOMAIN))
    assert match_response(nxdomain_without_question.pack(), 99, question) is None
    bare_truncated = DNSRecord(DNSHeader(id=99, qr=1, tc=1)).pack()
    assert match_response(bare_truncated, 99, question) is not None  # "ask over TCP"
    assert match_response(bare_truncated, 98, question) is None
    assert match_response(bare_truncated, 99, question, udp=False) is None
    assert match_response(b"\x00\x63\x80", 99, question) is None


async def test_unparseable_upstream_records_are_relayed_raw(make_service, upstream):
    def handler(query, transport):
        reply = upstream.answer(query)
        reply.add_answer(*RR.fromZone("example.test. 60 A 10.0.0.1"))
        wire = bytearray(reply.pack())
        # append a record dnslib rejects (an A record with empty RDATA) and fix ANCOUNT
        wire += b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 0)
        wire[6:8] = struct.pack("!H", struct.unpack("!H", wire[6:8])[0] + 1)
        return bytes(wire)

    upstream.handler = handler
    service = make_service(upstream)
    wire = await service.handle_query(make_query("example.test", qid=77).pack(), client=CLIENT, transport="udp")
    assert wire[:2] == b"\x00\x4d" and wire[2] & 0x80 and wire[3] & 0xF == RCODE.NOERROR
    assert struct.unpack("!H", wire[6:8])[0] == 3


async def test_formerr_to_edns_is_retried_without_edns(make_service, upstream):
    def handler(query, transport):
        if any(rr.rtype == QTYPE.OPT for rr in query.ar):
            return _rcode_reply(query, RCODE.FORMERR)
        return upstream.answer(query)

    upstream.handler = handler
    service = make_service(upstream)
    reply = await ask(service, "example.test", "A")
    assert rdata(reply) == ["10.0.0.1"]
    assert service.statistics()["resolver"]["edns_fallbacks"] == 1


async def test_no_upstreams_is_servfail(make_service):
    service = make_service()
    reply = await ask(service, "example.test", "A")
    assert reply.header.rcode == RCODE.SERVFAIL


async def test_forwarder_alone_raises_on_failure():
    forwarder = Forwarder([("127.0.0.1", free_udp_port())], timeout=0.5, retries=1)
    with pytest.raises(UpstreamError):
        await forwarder.resolve(Question(make_query("a.test").q.qname, QTYPE.A))
    assert forwarder.stats["network_errors"] == 2


async def test_ipv6_loopback_upstream(make_service, nursery):
    import socket

    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    sock = trio.socket.socket(trio.socket.AF_INET6, trio.socket.SOCK_DGRAM)
    try:
        await sock.bind(("::1", 0))
    except OSError:
        pytest.skip("no ::1")
    port = sock.getsockname()[1]
    fake = FakeUpstream()
    fake.add("v6.test. 60 IN A 10.6.6.6")
    nursery.start_soon(fake._serve_udp, sock)
    service = make_service(f"[::1]:{port}")
    reply = await ask(service, "v6.test", "A")
    assert rdata(reply) == ["10.6.6.6"]
