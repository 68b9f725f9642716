"""A real client: dig against the DNS service served on 127.0.0.1 (UDP and TCP).

dig is told the server's address (@127.0.0.1), so it asks nothing else.
"""

import shutil

import pytest
import trio
from dns_helpers import CLIENT

pytestmark = pytest.mark.skipif(shutil.which("dig") is None, reason="dig not installed")


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
