"""A real client: dig against the DNS service served on 127.0.0.1 (UDP and TCP).

dig is told the server's address (@127.0.0.1), so it asks nothing else. dig comes from
scripts/install-debian-tools.sh (dnsutils); without it these tests skip, or fail under
NETKIT_REQUIRE_PRIVILEGED=1 as every tool-driven test does.
"""

import pytest
import trio
from dns_helpers import CLIENT
from dnslib import DNSHeader, DNSRecord

from netkit.testing import require_tool


@pytest.fixture(autouse=True)
def _dig():
    require_tool("dig")


async def serve_on_loopback(service, nursery) -> int:
    """Serve ``service`` on 127.0.0.1 (UDP and TCP on one port), as the gateway would."""
    while True:
        udp = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
        await udp.bind(("127.0.0.1", 0))
        port = udp.getsockname()[1]
        tcp = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
        try:
            await tcp.bind(("127.0.0.1", port))
            break
        except OSError:
            udp.close()
            tcp.close()
    tcp.listen(8)

    async def answer(data, peer):
        wire = await service.handle_query(data, client=CLIENT, transport="udp")
        if wire is not None:
            await udp.sendto(wire, peer)

    async def serve_udp():
        async with trio.open_nursery() as queries:
            while True:
                data, peer = await udp.recvfrom(65535)
                queries.start_soon(answer, data, peer)

    nursery.start_soon(serve_udp)
    nursery.start_soon(trio.serve_listeners, lambda s: service.serve_tcp(s, CLIENT), [trio.SocketListener(tcp)])
    return port


async def dig(port: int, *args: str) -> str:
    result = await trio.run_process(["dig", "@127.0.0.1", "-p", str(port), "+tries=1", "+time=3",
                                     "+nosearch", *args], capture_stdout=True, capture_stderr=True)
    return result.stdout.decode()


async def test_dig_builtin_forwarded_and_truncated(make_service, upstream, nursery):
    upstream.add("www.example.test. 60 IN A 10.0.0.10")
    service = make_service(upstream)
    service.add_zone("big.test", [("big.test", "TXT", f"{'z' * 200} {i}") for i in range(8)])
    port = await serve_on_loopback(service, nursery)

    out = await dig(port, "+short", "host.docker.internal")
    assert out.split() == ["192.168.65.2"]
    out = await dig(port, "www.example.test", "A")
    assert "status: NOERROR" in out and "10.0.0.10" in out
    out = await dig(port, "host.docker.internal", "AAAA")
    assert "status: NOERROR" in out and "ANSWER: 0" in out
    out = await dig(port, "nothing.example.test")
    assert "status: NXDOMAIN" in out
    # 8 x 200-byte TXT: truncated over UDP, dig retries over TCP by itself
    out = await dig(port, "+bufsize=1232", "big.test", "TXT")
    assert "Truncated, retrying in TCP mode" in out and "ANSWER: 8" in out
    out = await dig(port, "+tcp", "-x", "192.168.65.1")
    assert "gateway.docker.internal." in out
    assert service.statistics()["truncated"] == 1


async def test_dig_gets_the_answer_when_upstream_truncates_to_a_bare_header(make_service, upstream, nursery):
    """The upstream answers UDP with TC and no question (as some servers do) and TCP in
    full: netkit falls back to TCP itself, and dig, asking over UDP (+notcp, its
    default), gets the answer without having to retry."""
    upstream.add("www.example.test. 60 IN A 10.0.0.10")

    def handler(query, transport):
        if transport == "udp":
            return bytes(DNSRecord(DNSHeader(id=query.header.id, qr=1, tc=1, ra=1)).pack())
        return upstream.answer(query)

    upstream.handler = handler
    service = make_service(upstream)
    port = await serve_on_loopback(service, nursery)
    out = await dig(port, "+notcp", "www.example.test", "A")
    assert "status: NOERROR" in out and "10.0.0.10" in out
    assert "Truncated" not in out
    assert upstream.count("www.example.test", "udp") == 1
    assert upstream.count("www.example.test", "tcp") == 1
    assert service.statistics()["resolver"]["tcp_queries"] == 1
