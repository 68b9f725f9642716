"""Fuzz: malformed queries, TCP streams and upstream answers never raise.

Each example runs in its own ``trio.run`` with an in-process resolver, so the fuzzing is
fast and sends nothing anywhere.
"""

from __future__ import annotations

import dataclasses
import struct

import trio
import trio.testing
from dns_helpers import CLIENT, FakeUpstream, make_query
from dnslib import QTYPE, DNSQuestion, DNSRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netkit.config import Config
from netkit.dns import DnsService, Question, UpstreamReply
from netkit.dns.local import parse_zone
from netkit.dns.upstream import match_response

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class InProcessResolver:
    def __init__(self) -> None:
        self.fake = FakeUpstream()
        self.fake.add("example.test. 60 IN A 10.0.0.1", "example.test. 60 IN MX 10 mx.example.test.",
                      "c.example.test. 60 IN CNAME example.test.")

    async def resolve(self, question: Question) -> UpstreamReply:
        query = DNSRecord(q=DNSQuestion(question.qname, question.qtype, question.qclass))
        wire = self.fake.answer(query).pack()
        return UpstreamReply(DNSRecord.parse(wire), wire)


def _service() -> DnsService:
    config = dataclasses.replace(Config(), vm_names=("vm.test",), dns_resolv_conf="/nonexistent")
    service = DnsService(config, resolver=InProcessResolver())
    service.add_zone("zone.test", [("www.zone.test", "A", "10.1.1.1"), ("*.w.zone.test", "TXT", "x"),
                                   ("c.zone.test", "CNAME", "example.test")])
    return service


SERVICE = _service()

VALID = [
    make_query("example.test").pack(),
    make_query("example.test", "MX", edns=1232).pack(),
    make_query("c.example.test", "A", edns=4096, do=True).pack(),
    make_query("host.docker.internal", "AAAA").pack(),
    make_query("www.zone.test", "ANY", edns=512).pack(),
    make_query("a.w.zone.test", "TXT").pack(),
    make_query("c.zone.test", "A").pack(),
    make_query("2.65.168.192.in-addr.arpa", "PTR").pack(),
    make_query("vm.test", "A").pack(),
]

mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 200), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 200), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 200), st.integers(0, 255)),
    st.tuples(st.just("delete"), st.integers(0, 200), st.just(0)),
)


def mutate(data: bytes, mutations) -> bytes:
    out = bytearray(data)
    for kind, position, value in mutations:
        position = position % (len(out) + 1)
        if kind == "flip" and position < len(out):
            out[position] ^= value
        elif kind == "truncate":
            del out[position:]
        elif kind == "insert":
            out[position:position] = bytes([value])
        elif kind == "delete" and position < len(out):
            del out[position]
    return bytes(out)


def check(query: bytes, transport: str = "udp") -> None:
    async def main():
        return await SERVICE.handle_query(query, client=CLIENT, transport=transport)

    wire = trio.run(main)
    if wire is None:
        return
    assert len(query) >= 12 and not query[2] & 0x80  # dropped only without a header, or responses
    assert wire[:2] == query[:2] and wire[2] & 0x80
    if transport == "udp":
        assert len(wire) <= 1232
    DNSRecord.parse(wire)  # every answer is well-formed


@FUZZ
@given(st.binary(max_size=600))
def test_random_bytes(data):
    check(data)


@FUZZ
@given(st.sampled_from(VALID), st.lists(mutation, min_size=1, max_size=6), st.sampled_from(["udp", "tcp"]))
def test_mutated_queries(query, mutations, transport):
    check(mutate(query, mutations), transport)


@FUZZ
@given(st.integers(0, 0xFFFF), st.integers(0, 0x7FFF), st.lists(st.integers(0, 3), min_size=4, max_size=4),
       st.binary(max_size=100))
def test_structured_headers(qid, flags, counts, body):
    check(struct.pack("!HHHHHH", qid, flags, *counts) + body)


def test_compression_pointer_chain_is_bounded():
    # a question name made of a long chain of backward pointers: FORMERR, quickly
    body = bytearray(b"\x00")
    for i in range(2000):
        body += struct.pack("!H", 0xC000 | (12 + len(body) - 2))
    query = struct.pack("!HHHHHH", 1, 0x0100, 1, 0, 0, 0) + bytes(body) + b"\x00\x01\x00\x01"
    check(query, "tcp")


@FUZZ
@given(st.lists(st.binary(max_size=80), max_size=8))
def test_tcp_stream_fuzz(chunks):
    async def main():
        client, server = trio.testing.memory_stream_pair()
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(SERVICE.serve_tcp, server, CLIENT)
                for chunk in chunks:
                    await client.send_all(chunk)
                await client.send_eof()
                while await client.receive_some(65536):
                    pass  # the server answers what it can and closes

    trio.run(main)


UPSTREAM_ANSWERS = [
    FakeUpstream().answer(make_query("a.test", qid=5)).pack(),
]
_fake = FakeUpstream()
_fake.add("a.test. 60 IN A 10.0.0.1", "a.test. 60 IN A 10.0.0.2")
UPSTREAM_ANSWERS.append(_fake.answer(make_query("a.test", qid=5)).pack())


@FUZZ
@given(st.sampled_from(UPSTREAM_ANSWERS), st.lists(mutation, min_size=1, max_size=6))
def test_mutated_upstream_answers(answer, mutations):
    question = Question(make_query("a.test").q.qname, QTYPE.A)
    reply = match_response(mutate(answer, mutations), 5, question)
    if reply is not None:
        assert reply.wire[:2] == b"\x00\x05"


@FUZZ
@given(st.text(max_size=200))
def test_zone_text_fuzz(text):
    try:
        parse_zone("fuzz.test", text)
    except ValueError:
        pass
