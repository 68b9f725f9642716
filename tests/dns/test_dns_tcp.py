"""UDP truncation and DNS over TCP (serve_tcp): framing, pipelining, idle timeout."""

import functools
import logging
import struct

import pytest
import trio
import trio.testing
from dns_helpers import CLIENT, ask, make_query, rdata, receive_exactly
from dnslib import QTYPE, RCODE, DNSRecord

BIG_ZONE = [("big.example.test", "TXT", f"{'y' * 200} {i}") for i in range(8)]  # ~1.8 kB


def _big_service(make_service, *upstreams, **changes):
    service = make_service(*upstreams, **changes)
    service.add_zone("example.test", BIG_ZONE + [("www.example.test", "A", "10.1.2.3")])
    return service


async def test_udp_answer_over_512_is_truncated_with_tc(make_service):
    service = _big_service(make_service)
    wire = await service.handle_query(make_query("big.example.test", "TXT").pack(), client=CLIENT,
                                      transport="udp")
    assert len(wire) <= 512
    reply = DNSRecord.parse(wire)
    assert reply.header.tc == 1 and reply.rr == [] and str(reply.q.qname) == "big.example.test."
    assert service.statistics()["truncated"] == 1


async def test_udp_limit_follows_edns_payload_and_mtu(make_service):
    service = _big_service(make_service)
    # 4096 asked, but netkit sends at most 1232 (and never more than the MTU allows)
    wire = await service.handle_query(make_query("big.example.test", "TXT", edns=4096).pack(),
                                      client=CLIENT, transport="udp")
    reply = DNSRecord.parse(wire)
    assert reply.header.tc == 1 and len(wire) <= 1232
    assert [rr.rtype for rr in reply.ar] == [QTYPE.OPT]
    small = _big_service(make_service)
    small.add_zone("example.test", BIG_ZONE[:4])  # ~900 bytes
    wire = await small.handle_query(make_query("big.example.test", "TXT", edns=1232).pack(),
                                    client=CLIENT, transport="udp")
    assert DNSRecord.parse(wire).header.tc == 0 and 512 < len(wire) <= 1232
    tiny_mtu = _big_service(make_service, mtu=576)
    tiny_mtu.add_zone("example.test", BIG_ZONE[:3])  # ~700 bytes
    wire = await tiny_mtu.handle_query(make_query("big.example.test", "TXT", edns=1232).pack(),
                                       client=CLIENT, transport="udp")
    assert DNSRecord.parse(wire).header.tc == 1 and len(wire) <= 576 - 28


async def test_same_query_over_tcp_is_whole(make_service):
    service = _big_service(make_service)
    reply = await ask(service, "big.example.test", "TXT", transport="tcp")
    assert reply.header.tc == 0 and len(reply.rr) == 8


async def _tcp_exchange(client_stream, queries: list[DNSRecord]) -> None:
    await client_stream.send_all(b"".join(struct.pack("!H", len(w)) + w for w in (q.pack() for q in queries)))


async def _read_answer(client_stream) -> DNSRecord | None:
    head = await receive_exactly(client_stream, 2)
    if head is None:
        return None
    return DNSRecord.parse(await receive_exactly(client_stream, struct.unpack("!H", head)[0]))


async def test_serve_tcp_pipelined_queries(make_service, upstream):
    service = _big_service(make_service, upstream)
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(service.serve_tcp, server_stream, CLIENT)
        queries = [make_query("big.example.test", "TXT", qid=1), make_query("www.example.test", qid=2),
                   make_query("example.test", qid=3), make_query("host.docker.internal", qid=4)]
        # one query split across writes, the rest in one write
        first = queries[0].pack()
        framed = struct.pack("!H", len(first)) + first
        await client_stream.send_all(framed[:1])
        await trio.testing.wait_all_tasks_blocked()  # the server has read the lone byte
        await client_stream.send_all(framed[1:5])
        await client_stream.send_all(framed[5:])
        await _tcp_exchange(client_stream, queries[1:])
        answers = {}
        for _ in queries:
            reply = await _read_answer(client_stream)
            answers[reply.header.id] = reply
        assert len(answers[1].rr) == 8
        assert rdata(answers[2]) == ["10.1.2.3"]
        # example.test is inside the zone, with no A: NODATA (not forwarded)
        assert answers[3].header.rcode == RCODE.NOERROR and answers[3].rr == []
        assert rdata(answers[4]) == ["192.168.65.2"]
        await client_stream.send_eof()
        assert await client_stream.receive_some(10) == b""  # the server closed
    assert service.statistics()["tcp_connections"] == 1


async def test_serve_tcp_answers_out_of_order(make_service, upstream):
    upstream.add("slow.test. 60 IN A 10.0.0.70")
    fast_answer_read = trio.Event()

    async def handler(query, transport):
        if str(query.q.qname) == "slow.test.":
            await fast_answer_read.wait()  # answered only once the later query's answer is out
        return upstream.answer(query)

    upstream.handler = handler
    service = make_service(upstream, dns_timeout=5.0)
    client_stream, server_stream = trio.testing.memory_stream_pair()
    with trio.fail_after(4):  # answering in order would never get the slow one released
        async with trio.open_nursery() as nursery:
            nursery.start_soon(service.serve_tcp, server_stream, CLIENT)
            await _tcp_exchange(client_stream, [make_query("slow.test", qid=1), make_query("example.test", qid=2)])
            first = await _read_answer(client_stream)
            fast_answer_read.set()
            second = await _read_answer(client_stream)
            assert (first.header.id, second.header.id) == (2, 1)
            assert rdata(second) == ["10.0.0.70"]
            await client_stream.aclose()


async def test_serve_tcp_eof_waits_for_outstanding_answers(make_service, upstream):
    asked = trio.Event()
    release = trio.Event()

    async def handler(query, transport):
        asked.set()
        await release.wait()
        return upstream.answer(query)

    upstream.handler = handler
    service = make_service(upstream)
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(service.serve_tcp, server_stream, CLIENT)
        await _tcp_exchange(client_stream, [make_query("example.test", qid=9)])
        await asked.wait()
        await client_stream.send_eof()
        await trio.testing.wait_all_tasks_blocked()  # the server has seen the EOF
        release.set()  # only now is the answer ready
        reply = await _read_answer(client_stream)
        assert reply.header.id == 9 and rdata(reply) == ["10.0.0.1"]
        assert await _read_answer(client_stream) is None


async def test_serve_tcp_idle_timeout_closes(make_service, autojump_clock):
    service = make_service(dns_tcp_idle_timeout=5.0)
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(service.serve_tcp, server_stream, CLIENT)
        await _tcp_exchange(client_stream, [make_query("host.internal", qid=5)])
        assert (await _read_answer(client_stream)).header.id == 5
        start = trio.current_time()
        assert await _read_answer(client_stream) is None  # closed by the server
        assert 4.9 <= trio.current_time() - start <= 5.1


async def test_serve_tcp_client_that_never_reads_is_dropped(make_service, autojump_clock):
    service = make_service(dns_tcp_idle_timeout=5.0)
    client_stream, server_stream = trio.testing.lockstep_stream_pair()
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(service.serve_tcp, server_stream, CLIENT)
        await _tcp_exchange(client_stream, [make_query("host.internal", qid=5)] * 40)
        # the client reads nothing; the server gives up after the idle timeout
    assert trio.current_time() - start < 6


async def test_serve_tcp_client_vanishing_ends_quietly(make_service, upstream, caplog):
    """The client closes while its query is still upstream: serve_tcp returns at once
    when the answer comes (not after the idle timeout), raises nothing, logs nothing,
    counts no error, and closes its end."""
    asked = trio.Event()
    release = trio.Event()

    async def handler(query, transport):
        asked.set()
        await release.wait()
        return upstream.answer(query)

    upstream.handler = handler
    service = make_service(upstream, dns_timeout=5.0, dns_tcp_idle_timeout=60.0)
    client_stream, server_stream = trio.testing.memory_stream_pair()
    with trio.fail_after(3):  # far less than the idle timeout
        async with trio.open_nursery() as nursery:
            nursery.start_soon(service.serve_tcp, server_stream, CLIENT)
            await _tcp_exchange(client_stream, [make_query("example.test")])
            await asked.wait()  # the query is upstream, its answer not ready
            await client_stream.aclose()
            release.set()
    stats = service.statistics()
    assert stats["forwarded"] == 1 and stats["in_flight"] == 0
    assert stats["internal_errors"] == 0 and stats["tcp_connections"] == 1
    with pytest.raises(trio.ClosedResourceError):
        await server_stream.send_all(b"x")  # serve_tcp closed it
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_serve_tcp_garbage_does_not_kill_connection(make_service):
    service = make_service()
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(service.serve_tcp, server_stream, CLIENT)
        await client_stream.send_all(b"\x00\x03abc" + b"\x00\x00")  # garbage, empty message
        await _tcp_exchange(client_stream, [make_query("host.internal", qid=6)])
        assert (await _read_answer(client_stream)).header.id == 6
        await client_stream.aclose()
    assert service.statistics()["dropped_malformed"] == 2


async def test_serve_tcp_over_real_loopback_connection(make_service, nursery):
    service = _big_service(make_service)
    serve = functools.partial(trio.serve_tcp, lambda s: service.serve_tcp(s, CLIENT), 0, host="127.0.0.1")
    listeners = await nursery.start(serve)
    port = listeners[0].socket.getsockname()[1]
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await _tcp_exchange(stream, [make_query("big.example.test", "TXT", qid=11)])
        reply = await _read_answer(stream)
        assert reply.header.id == 11 and len(reply.rr) == 8
