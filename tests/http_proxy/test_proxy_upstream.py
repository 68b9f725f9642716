"""Chaining through upstream proxies, the exclude list and reconfiguration."""

import hashlib

import h11
import trio
from proxy_helpers import (H11Stream, HttpClient, LOOPBACK, LoopbackConnector, TestProxy,
                           closed_port, curl, header, pattern, serve_proxy, tls_get)

from netkit.http_proxy import HttpProxy, ProxySettings


async def test_http_via_upstream_with_basic_auth(nursery, origin, connector):
    upstream = await TestProxy(connector, "alice", "s3cr:t").start(nursery)
    settings = ProxySettings(http=f"http://alice:s3cr%3At@127.0.0.1:{upstream.port}")
    proxy = HttpProxy(settings, connect=connector)
    port = await serve_proxy(nursery, proxy)
    client = await HttpClient.connect(port)
    resp, body = await client.request("GET", "http://origin.test/hello?q=1",
                                      headers=[("Proxy-Authorization", "Basic Z3Vlc3Q6Z3Vlc3Q=")])
    assert resp.status_code == 200
    assert body == b"hello from origin\n"
    assert header(resp, "x-upstream") == "yes"
    method, target, headers = upstream.requests[-1]
    assert (method, target) == ("GET", "http://origin.test/hello?q=1")  # absolute-form
    assert headers["proxy-authorization"] == "Basic YWxpY2U6czNjcjp0"  # ours, not the guest's
    assert headers["host"] == "origin.test"
    # Keep-alive to the upstream proxy too.
    resp, body = await client.request("GET", "http://origin.test/hello")
    assert resp.status_code == 200
    assert [c for c in connector.calls if c[0] == "127.0.0.1"] == [("127.0.0.1", upstream.port)]
    await client.aclose()


async def test_upstream_without_credentials_gets_readable_502(nursery, origin, connector):
    upstream = await TestProxy(connector, "alice", "pw").start(nursery)
    # Sanity: the test upstream itself answers 407 without credentials.
    stream = await trio.open_tcp_stream(LOOPBACK, upstream.port)
    h = H11Stream(stream, h11.CLIENT)
    await h.send(h11.Request(method="GET", target="http://origin.test/", headers=[("Host", "origin.test")]))
    await h.send(h11.EndOfMessage())
    assert (await h.next_event()).status_code == 407
    await stream.aclose()

    proxy = HttpProxy(ProxySettings(http=f"http://127.0.0.1:{upstream.port}",
                                    https=f"http://127.0.0.1:{upstream.port}"), connect=connector)
    port = await serve_proxy(nursery, proxy)
    client = await HttpClient.connect(port)
    resp, body = await client.request("GET", "http://origin.test/hello")
    assert resp.status_code == 502
    assert b"requires authentication (407)" in body
    await client.aclose()
    result = await curl("-k", "-x", f"http://127.0.0.1:{port}", "-w", "%{http_connect}",
                        "https://tls.test/")
    assert result.returncode != 0 and result.stdout == b"502", (result.stdout, result.stderr)


async def test_connect_via_upstream(nursery, connector, tls_server, cafile):
    connector.names["tls.test"] = tls_server.port
    upstream = await TestProxy(connector, "bob", "pw").start(nursery)
    proxy = HttpProxy(ProxySettings(https=f"bob:pw@127.0.0.1:{upstream.port}"), connect=connector)
    port = await serve_proxy(nursery, proxy)
    result = await curl("-k", "-x", f"http://127.0.0.1:{port}", "https://tls.test/")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"hello over tls, sni=tls.test\n"
    method, target, headers = upstream.requests[-1]
    assert (method, target) == ("CONNECT", "tls.test:443")
    assert headers["proxy-authorization"] == "Basic Ym9iOnB3"
    assert ("tls.test", 443) in connector.calls  # made by the upstream, not by us
    assert ("127.0.0.1", upstream.port) in connector.calls


async def test_excluded_hosts_go_direct(nursery, origin, connector):
    upstream = await TestProxy(connector).start(nursery)
    connector.names["api.internal.test"] = origin.port
    settings = ProxySettings(http=f"http://127.0.0.1:{upstream.port}",
                             exclude=("*.internal.test", "localhost"))
    proxy = HttpProxy(settings, connect=connector)
    port = await serve_proxy(nursery, proxy)
    client = await HttpClient.connect(port)
    resp, _ = await client.request("GET", "http://api.internal.test/hello")
    assert resp.status_code == 200 and header(resp, "x-upstream") is None
    assert upstream.requests == []
    assert ("api.internal.test", 80) in connector.calls
    resp, _ = await client.request("GET", "http://origin.test/hello")
    assert resp.status_code == 200 and header(resp, "x-upstream") == "yes"
    assert upstream.requests[-1][1] == "http://origin.test/hello"
    await client.aclose()


async def test_dead_upstream_gets_502(nursery, connector):
    dead = closed_port()
    proxy = HttpProxy(ProxySettings(http=f"http://127.0.0.1:{dead}",
                                    https=f"http://127.0.0.1:{dead}"), connect=connector)
    port = await serve_proxy(nursery, proxy)
    client = await HttpClient.connect(port)
    resp, body = await client.request("GET", "http://origin.test/hello")
    assert resp.status_code == 502
    assert f"upstream proxy http://127.0.0.1:{dead}".encode() in body
    await client.aclose()
    result = await curl("-x", f"http://127.0.0.1:{port}", "-w", "%{http_code}", "-o", "/dev/null",
                        "http://origin.test/hello")
    assert result.stdout == b"502"


async def test_reconfigure_during_download_keeps_it_going(nursery, origin, connector):
    first = await TestProxy(connector).start(nursery)
    second = await TestProxy(connector).start(nursery)
    proxy = HttpProxy(ProxySettings(http=f"http://127.0.0.1:{first.port}"), connect=connector)
    port = await serve_proxy(nursery, proxy)
    size = 4 * 1024 * 1024
    digest = hashlib.sha256()
    client = await HttpClient.connect(port)
    h = client.h
    await h.send(h11.Request(method="GET", target=f"http://origin.test/big?n={size}&delay=0.005",
                             headers=[("Host", "origin.test")]))
    await h.send(h11.EndOfMessage())
    resp = await h.next_event()
    assert resp.status_code == 200
    received = 0
    switched = False
    with trio.fail_after(20):
        while True:
            event = await h.next_event()
            if type(event) is h11.EndOfMessage:
                break
            digest.update(event.data)
            received += len(event.data)
            if not switched and received > size // 4:
                proxy.reconfigure(ProxySettings(http=f"http://127.0.0.1:{second.port}"))
                switched = True
                # A new request on another connection already uses the new upstream.
                other = await HttpClient.connect(port)
                r, _ = await other.request("GET", "http://origin.test/hello")
                assert r.status_code == 200
                await other.aclose()
    assert switched and received == size
    assert digest.digest() == hashlib.sha256(pattern(size)).digest()
    assert [r[1] for r in first.requests] == [f"http://origin.test/big?n={size}&delay=0.005"]
    assert [r[1] for r in second.requests] == ["http://origin.test/hello"]
    # And the same client connection switches for its next request.
    h.conn.start_next_cycle()
    r, _ = await client.request("GET", "http://origin.test/hello")
    assert r.status_code == 200 and len(second.requests) == 2
    await client.aclose()


async def test_chain_of_two_netkit_proxies(nursery, origin, connector, tls_server, cafile):
    connector.names["tls.test"] = tls_server.port
    inner = HttpProxy(ProxySettings(), connect=connector)
    inner_port = await serve_proxy(nursery, inner)
    outer = HttpProxy(ProxySettings(http=f"127.0.0.1:{inner_port}", https=f"127.0.0.1:{inner_port}"),
                      connect=connector)
    port = await serve_proxy(nursery, outer)
    client = await HttpClient.connect(port)
    resp, body = await client.request("GET", "http://origin.test/headers")
    assert resp.status_code == 200
    assert header(resp, "via") == "1.1 netkit, 1.1 netkit" or \
        [v for k, v in resp.headers if k == b"via"] == [b"1.1 netkit", b"1.1 netkit"]
    assert inner.statistics()["requests"] == 1
    await client.aclose()
    result = await curl("--cacert", cafile, "-x", f"http://127.0.0.1:{port}", "https://tls.test/")
    assert result.returncode == 0, result.stderr
    assert inner.statistics()["tunnels"] == 1 and outer.statistics()["tunnels"] == 1


async def test_upstream_routing_uses_https_setting_for_connect_only(nursery, origin, connector,
                                                                  tls_server, cafile):
    connector.names["tls.test"] = tls_server.port
    http_up = await TestProxy(connector).start(nursery)
    proxy = HttpProxy(ProxySettings(http=f"http://127.0.0.1:{http_up.port}"), connect=connector)
    port = await serve_proxy(nursery, proxy)
    stream = await trio.open_tcp_stream(LOOPBACK, port)
    await stream.send_all(b"CONNECT tls.test:443 HTTP/1.1\r\nHost: tls.test:443\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        head += await stream.receive_some(1)
    assert head.startswith(b"HTTP/1.1 200 ")
    out = await tls_get(stream, cafile, "tls.test")
    assert out.endswith(b"sni=tls.test\n")
    assert http_up.requests == []  # no https upstream configured: CONNECT went direct


async def test_many_keepalive_clients_through_upstream(nursery, origin, connector):
    upstream = await TestProxy(connector).start(nursery)
    proxy = HttpProxy(ProxySettings(http=f"http://127.0.0.1:{upstream.port}"), connect=connector)
    port = await serve_proxy(nursery, proxy)

    async def one(i):
        c = await HttpClient.connect(port)
        for j in range(3):
            r, b = await c.request("GET", f"http://origin.test/big?n={1000 + i * 10 + j}")
            assert b == pattern(1000 + i * 10 + j)
        await c.aclose()

    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            for i in range(10):
                n.start_soon(one, i)
    assert len(upstream.requests) == 30


def test_loopback_connector_refuses_other_addresses():
    import pytest

    c = LoopbackConnector()
    with pytest.raises(AssertionError):
        trio.run(c, "192.0.2.1", 80)
    with pytest.raises(OSError):
        trio.run(c, "example.invalid", 80)
