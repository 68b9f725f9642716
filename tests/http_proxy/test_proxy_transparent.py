"""Transparent mode: guest connections to port 80 (Host header) and 443 (TLS SNI).

The "original destination" is a documentation address (203.0.113.0/24) that the
LoopbackConnector refuses to reach: a test that routed by it would fail loudly."""

import json

import trio
from proxy_helpers import (HttpClient, LOOPBACK, TestProxy, raw_exchange, serve_transparent,
                           tls_get)

from netkit.http_proxy import HttpProxy, ProxySettings

NOWHERE_HTTP = ("203.0.113.7", 80)
NOWHERE_TLS = ("203.0.113.8", 443)


async def test_transparent_http_routes_by_host(nursery, proxy, origin, connector):
    port = await serve_transparent(nursery, proxy, NOWHERE_HTTP, tls=False)
    client = await HttpClient.connect(port)
    resp, body = await client.request("GET", "/hello", host="origin.test")
    assert resp.status_code == 200 and body == b"hello from origin\n"
    resp, body = await client.request("GET", "/headers?a=b", host="origin.test")
    assert json.loads(body)["target"] == "/headers?a=b"
    assert connector.calls == [("origin.test", 80)]  # one connection, reused
    await client.aclose()


async def test_transparent_http_via_upstream_uses_absolute_form(nursery, origin, connector):
    upstream = await TestProxy(connector, "u", "p").start(nursery)
    proxy = HttpProxy(ProxySettings(http=f"http://u:p@127.0.0.1:{upstream.port}"), connect=connector)
    port = await serve_transparent(nursery, proxy, NOWHERE_HTTP, tls=False)
    client = await HttpClient.connect(port)
    resp, body = await client.request("GET", "/hello", host="origin.test:8080")
    assert resp.status_code == 200
    method, target, headers = upstream.requests[-1]
    assert (method, target) == ("GET", "http://origin.test:8080/hello")
    assert headers["host"] == "origin.test:8080"
    await client.aclose()


async def test_transparent_http_without_host_uses_original_ip(nursery, proxy, origin):
    port = await serve_transparent(nursery, proxy, (LOOPBACK, origin.port), tls=False)
    out = await raw_exchange(port, b"GET /hello HTTP/1.0\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200 ") and out.endswith(b"hello from origin\n")
    assert origin.requests[-1][2]["host"] == f"{LOOPBACK}:{origin.port}"


async def test_transparent_http_allow_list(nursery, origin, connector):
    proxy = HttpProxy(ProxySettings(allow=("*.corp.test",), deny_message="no {host}"),
                      connect=connector)
    port = await serve_transparent(nursery, proxy, NOWHERE_HTTP, tls=False)
    client = await HttpClient.connect(port)
    resp, body = await client.request("GET", "/hello", host="origin.test")
    assert resp.status_code == 403 and body == b"no origin.test\n"
    assert connector.calls == []
    await client.aclose()


async def test_transparent_https_routes_by_sni(nursery, proxy, connector, tls_server, cafile):
    connector.names["tls.test"] = tls_server.port
    port = await serve_transparent(nursery, proxy, NOWHERE_TLS, tls=True)
    stream = await trio.open_tcp_stream(LOOPBACK, port)
    out = await tls_get(stream, cafile, "tls.test")
    assert out.endswith(b"hello over tls, sni=tls.test\n")
    assert connector.calls == [("tls.test", 443)]
    assert proxy.statistics()["sni_found"] == 1


async def test_transparent_https_via_upstream_connects_by_name(nursery, connector, tls_server, cafile):
    connector.names["tls.test"] = tls_server.port
    upstream = await TestProxy(connector, "u", "p").start(nursery)
    proxy = HttpProxy(ProxySettings(https=f"http://u:p@127.0.0.1:{upstream.port}"), connect=connector)
    port = await serve_transparent(nursery, proxy, NOWHERE_TLS, tls=True)
    stream = await trio.open_tcp_stream(LOOPBACK, port)
    out = await tls_get(stream, cafile, "tls.test")
    assert out.endswith(b"sni=tls.test\n")
    assert upstream.requests[-1][:2] == ("CONNECT", "tls.test:443")


async def test_transparent_https_without_sni_uses_original_ip(nursery, proxy, tls_server, cafile):
    port = await serve_transparent(nursery, proxy, (LOOPBACK, tls_server.port), tls=True)
    stream = await trio.open_tcp_stream(LOOPBACK, port)
    out = await tls_get(stream, cafile, None)
    assert out.endswith(b"sni=None\n")
    assert proxy.statistics()["sni_no_sni"] == 1


async def test_transparent_tls_garbage_falls_back_to_ip(nursery, proxy):
    async def echo(stream):
        while data := await stream.receive_some(65536):
            await stream.send_all(data)

    from proxy_helpers import serve
    echo_port = await serve(nursery, echo)
    port = await serve_transparent(nursery, proxy, (LOOPBACK, echo_port), tls=True)
    stream = await trio.open_tcp_stream(LOOPBACK, port)
    await stream.send_all(b"not tls at all\n")
    with trio.fail_after(5):
        got = b""
        while len(got) < 15:
            got += await stream.receive_some(100)
    assert got == b"not tls at all\n"
    assert proxy.statistics()["sni_invalid"] == 1
    await stream.aclose()


async def test_transparent_https_denied_closes(nursery, connector, tls_server, cafile):
    connector.names["tls.test"] = tls_server.port
    proxy = HttpProxy(ProxySettings(allow=("other.test",)), connect=connector)
    port = await serve_transparent(nursery, proxy, NOWHERE_TLS, tls=True)
    stream = await trio.open_tcp_stream(LOOPBACK, port)
    import ssl

    with trio.fail_after(5):
        try:
            await tls_get(stream, cafile, "tls.test")
        except (trio.BrokenResourceError, ssl.SSLError):
            pass
    assert connector.calls == []
    assert proxy.statistics()["denied"] == 1


def test_transparent_kind():
    s = ProxySettings()
    assert s.transparent_kind(80) is None  # nothing to do: leave it to NAT
    s = ProxySettings(http="http://127.0.0.1:3128", transparent_http_ports=(80, 8080))
    assert s.transparent_kind(8080) == "http" and s.transparent_kind(443) is None
    s = ProxySettings(allow=("x.test",))
    assert s.transparent_kind(80) == "http" and s.transparent_kind(443) == "https"


async def test_transparent_https_hello_in_tiny_pieces(nursery, proxy, connector, tls_server):
    import ssl

    connector.names["tls.test"] = tls_server.port
    port = await serve_transparent(nursery, proxy, NOWHERE_TLS, tls=True)
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="tls.test")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello = outgoing.read()
    stream = await trio.open_tcp_stream(LOOPBACK, port)
    stream.setsockopt(6, 1, 1)  # TCP_NODELAY: really one byte per segment
    with trio.fail_after(5):
        for i in range(len(hello)):
            await stream.send_all(hello[i:i + 1])
            await trio.sleep(0.0005)
        assert await stream.receive_some(5)  # the server's answer came through the tunnel
    assert connector.calls == [("tls.test", 443)]
    await stream.aclose()
