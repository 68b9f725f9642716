"""Explicit proxy (absolute-form requests) against a loopback origin."""

import hashlib
import json

import trio
from proxy_helpers import (HttpClient, LoopbackConnector, Origin, closed_port, curl, header,
                           pattern, raw_exchange, serve, serve_proxy)

from netkit.http_proxy import HttpProxy, ProxySettings


async def test_get_through_proxy(nursery, proxy, origin):
    port = await serve_proxy(nursery, proxy)
    client = await HttpClient.connect(port)
    resp, body = await client.request("GET", "http://origin.test/hello")
    assert resp.status_code == 200
    assert body == b"hello from origin\n"
    assert header(resp, "via") == "1.1 netkit"
    # Hop-by-hop response headers (and the one named in Connection) are gone.
    for name in ("x-secret", "keep-alive", "proxy-authenticate"):
        assert header(resp, name) is None, name
    method, target, headers = origin.requests[-1]
    assert (method, target) == (b"GET", b"/hello")  # origin-form towards the origin
    assert headers["host"] == "origin.test"
    assert headers["via"] == "1.1 netkit"
    await client.aclose()


async def test_curl_get(nursery, proxy, origin):
    port = await serve_proxy(nursery, proxy)
    result = await curl("-x", f"http://127.0.0.1:{port}", "http://origin.test/hello")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"hello from origin\n"


async def test_request_hop_by_hop_headers_removed(nursery, proxy, origin):
    port = await serve_proxy(nursery, proxy)
    client = await HttpClient.connect(port)
    resp, body = await client.request("GET", "http://origin.test:80/headers?x=1", headers=[
        ("Connection", "keep-alive, X-Drop-Me"), ("X-Drop-Me", "1"), ("Keep-Alive", "300"),
        ("Proxy-Authorization", "Basic Zm9vOmJhcg=="), ("Proxy-Connection", "keep-alive"),
        ("TE", "trailers"), ("Upgrade", "websocket"), ("X-Keep", "yes"), ("Via", "1.0 guest")])
    assert resp.status_code == 200
    seen = json.loads(body)
    assert seen["target"] == "/headers?x=1"
    names = [k.lower() for k, _ in seen["headers"]]
    for gone in ("connection", "x-drop-me", "keep-alive", "proxy-authorization",
                 "proxy-connection", "te", "upgrade"):
        assert gone not in names, gone
    assert ["X-Keep", "yes"] in seen["headers"]
    assert [v for k, v in seen["headers"] if k.lower() == "via"] == ["1.0 guest", "1.1 netkit"]
    assert [v for k, v in seen["headers"] if k.lower() == "host"] == ["origin.test"]
    await client.aclose()


async def test_keep_alive_many_requests_one_origin_connection(nursery, proxy, origin):
    port = await serve_proxy(nursery, proxy)
    client = await HttpClient.connect(port)
    for i in range(5):
        resp, body = await client.request("GET", f"http://origin.test/headers?i={i}")
        assert resp.status_code == 200
        assert json.loads(body)["target"] == f"/headers?i={i}"
    resp, body = await client.request("HEAD", "http://origin.test/hello")
    assert resp.status_code == 200 and body == b""
    assert header(resp, "content-length") == "18"
    resp, body = await client.request("GET", "http://origin.test/big?n=100000&chunked=1")
    assert body == pattern(100000)
    assert header(resp, "transfer-encoding") == "chunked"
    assert origin.connections == 1  # the origin connection was reused each time
    assert proxy.statistics()["requests"] == 7
    await client.aclose()


async def test_origin_closing_an_idle_connection_is_not_an_error(nursery, proxy, origin):
    port = await serve_proxy(nursery, proxy)
    client = await HttpClient.connect(port)
    resp, _ = await client.request("GET", "http://origin.test/sneaky-close")
    assert resp.status_code == 200
    await trio.sleep(0.05)
    for _ in range(2):
        resp, body = await client.request("GET", "http://origin.test/hello")
        assert resp.status_code == 200 and body == b"hello from origin\n"
    await client.aclose()


async def test_post_chunked_50mb_streams_intact(nursery, proxy, origin):
    port = await serve_proxy(nursery, proxy)
    client = await HttpClient.connect(port)
    total = 50 * 1024 * 1024
    digest = hashlib.sha256()

    async def body():
        sent = 0
        while sent < total:
            block = pattern(min(256 * 1024, total - sent), sent)
            digest.update(block)
            sent += len(block)
            yield block

    with trio.fail_after(30):
        resp, data = await client.request("POST", "http://origin.test/echo", body=body())
    assert resp.status_code == 200
    assert json.loads(data) == {"sha256": digest.hexdigest(), "length": total}
    assert proxy.statistics()["request_bytes"] == total
    # Still usable afterwards.
    resp, data = await client.request("GET", "http://origin.test/hello")
    assert data == b"hello from origin\n"
    await client.aclose()


async def test_large_download_content_length(nursery, proxy, origin):
    port = await serve_proxy(nursery, proxy)
    result = await curl("-x", f"http://127.0.0.1:{port}", "http://origin.test/big?n=5000000",
                        "-o", "-")
    assert result.returncode == 0, result.stderr
    assert hashlib.sha256(result.stdout).digest() == hashlib.sha256(pattern(5000000)).digest()


async def test_curl_post_with_expect_100_continue(nursery, proxy, origin, tmp_path):
    port = await serve_proxy(nursery, proxy)
    data = pattern(3 * 1024 * 1024)
    (tmp_path / "body").write_bytes(data)
    with trio.fail_after(10):
        result = await curl("-x", f"http://127.0.0.1:{port}", "--data-binary",
                            f"@{tmp_path / 'body'}", "-H", "Expect: 100-continue",
                            "http://origin.test/echo")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"sha256": hashlib.sha256(data).hexdigest(),
                                         "length": len(data)}


async def test_malformed_request_gets_400(nursery, proxy):
    port = await serve_proxy(nursery, proxy)
    out = await raw_exchange(port, b"THIS IS NOT HTTP\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400 ")
    assert b"malformed request" in out
    assert proxy.statistics()["bad_requests"] == 1


async def test_bad_chunked_body_gets_400(nursery, proxy, origin):
    port = await serve_proxy(nursery, proxy)
    out = await raw_exchange(port, b"POST http://origin.test/echo HTTP/1.1\r\nHost: origin.test\r\n"
                                   b"Transfer-Encoding: chunked\r\n\r\nzz\r\n")
    assert out.startswith(b"HTTP/1.1 400 "), out


async def test_origin_form_on_the_explicit_port_gets_400(nursery, proxy):
    port = await serve_proxy(nursery, proxy)
    out = await raw_exchange(port, b"GET / HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400 ")
    assert b"absolute URL" in out


async def test_oversized_headers_get_431(nursery, connector):
    proxy = HttpProxy(ProxySettings(max_header_bytes=4096), connect=connector)
    port = await serve_proxy(nursery, proxy)
    out = await raw_exchange(port, b"GET http://origin.test/ HTTP/1.1\r\nHost: origin.test\r\n"
                                   + b"X-Big: " + b"a" * 200000 + b"\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 431 "), out[:100]


async def test_refused_origin_gets_502(nursery, proxy):
    port = await serve_proxy(nursery, proxy)
    client = await HttpClient.connect(port)
    dead = closed_port()
    resp, body = await client.request("GET", f"http://127.0.0.1:{dead}/")
    assert resp.status_code == 502
    assert f"127.0.0.1:{dead}".encode() in body and b"refused" in body.lower()
    # The client connection stays usable after an error answer.
    resp, body = await client.request("GET", "http://origin.test/hello")
    assert resp.status_code == 200
    await client.aclose()


async def test_unknown_host_gets_502(nursery, proxy):
    port = await serve_proxy(nursery, proxy)
    client = await HttpClient.connect(port)
    resp, body = await client.request("GET", "http://no-such-host.test/")
    assert resp.status_code == 502
    assert b"no-such-host.test" in body and b"not known" in body
    await client.aclose()


async def test_default_connect_to_loopback_literal(nursery, origin):
    proxy = HttpProxy(ProxySettings())  # trio.open_tcp_stream; an IP literal needs no DNS
    port = await serve_proxy(nursery, proxy)
    client = await HttpClient.connect(port)
    resp, body = await client.request("GET", f"http://127.0.0.1:{origin.port}/hello")
    assert resp.status_code == 200 and body == b"hello from origin\n"
    await client.aclose()


async def test_connect_timeout_gets_504(nursery, connector):
    connector.delay["origin.test"] = 5
    proxy = HttpProxy(ProxySettings(connect_timeout=0.3), connect=connector)
    port = await serve_proxy(nursery, proxy)
    client = await HttpClient.connect(port)
    with trio.fail_after(3):
        resp, body = await client.request("GET", "http://origin.test/hello")
    assert resp.status_code == 504
    assert b"timed out" in body
    await client.aclose()


async def test_slow_origin_504_while_other_clients_are_served(nursery, connector):
    proxy = HttpProxy(ProxySettings(response_timeout=1.0), connect=connector)
    port = await serve_proxy(nursery, proxy)
    results = {}

    async def slow():
        client = await HttpClient.connect(port)
        resp, body = await client.request("GET", "http://origin.test/slow?s=30")
        results["slow"] = (resp.status_code, body, trio.current_time())

    async def fast():
        await trio.sleep(0.1)
        client = await HttpClient.connect(port)
        for _ in range(3):
            resp, body = await client.request("GET", "http://origin.test/hello")
            assert resp.status_code == 200
        results["fast"] = trio.current_time()

    start = trio.current_time()
    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            n.start_soon(slow)
            n.start_soon(fast)
    status, body, when = results["slow"]
    assert status == 504
    assert b"no response from origin.test:80 within 1s" in body
    assert 0.9 < when - start < 3
    assert results["fast"] < when  # the fast client did not wait for the slow one


async def test_allow_list_403_with_message(nursery, origin):
    connector = LoopbackConnector({"origin.test": origin.port, "other.test": origin.port})
    settings = ProxySettings(allow=("origin.test", "10.0.0.0/8"),
                             deny_message="Blocked: {host} is not on the list.")
    proxy = HttpProxy(settings, connect=connector)
    port = await serve_proxy(nursery, proxy)
    client = await HttpClient.connect(port)
    resp, body = await client.request("GET", "http://other.test/hello")
    assert resp.status_code == 403
    assert body == b"Blocked: other.test is not on the list.\n"
    resp, body = await client.request("GET", "http://origin.test/hello")
    assert resp.status_code == 200
    assert ("other.test", 80) not in connector.calls
    result = await curl("-x", f"http://127.0.0.1:{port}", "-w", "%{http_code}",
                        "http://other.test/")
    assert result.stdout.endswith(b"403")
    await client.aclose()


async def test_max_connections_503(nursery, connector):
    proxy = HttpProxy(ProxySettings(max_connections=1), connect=connector)
    port = await serve_proxy(nursery, proxy)
    first = await HttpClient.connect(port)
    resp, _ = await first.request("GET", "http://origin.test/hello")
    assert resp.status_code == 200
    out = await raw_exchange(port, b"GET http://origin.test/hello HTTP/1.1\r\nHost: origin.test\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 503 ")
    assert b"too many connections" in out
    assert proxy.statistics()["rejected_busy"] == 1
    await first.aclose()
    await trio.sleep(0.1)
    second = await HttpClient.connect(port)
    resp, _ = await second.request("GET", "http://origin.test/hello")
    assert resp.status_code == 200
    await second.aclose()


async def test_idle_client_connection_is_closed(nursery, connector):
    proxy = HttpProxy(ProxySettings(idle_timeout=0.3), connect=connector)
    port = await serve_proxy(nursery, proxy)
    with trio.fail_after(3):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        assert await stream.receive_some(100) == b""
    assert proxy.statistics()["active_connections"] == 0


async def test_https_absolute_form_is_refused_readably(nursery, proxy):
    port = await serve_proxy(nursery, proxy)
    client = await HttpClient.connect(port)
    resp, body = await client.request("GET", "https://origin.test/")
    assert resp.status_code == 400 and b"CONNECT" in body
    await client.aclose()


async def test_second_origin_in_same_connection(nursery, proxy, connector):
    other = await Origin("other").start(nursery)
    connector.names["other.test"] = other.port
    port = await serve_proxy(nursery, proxy)
    client = await HttpClient.connect(port)
    for host in ("origin.test", "other.test", "origin.test", "other.test"):
        resp, _ = await client.request("GET", f"http://{host}/hello")
        assert header(resp, "x-origin") == host.split(".")[0]
    assert other.connections == 1
    await client.aclose()


async def test_reused_connection_dropped_by_origin_is_retried(nursery, proxy, origin):
    port = await serve_proxy(nursery, proxy)
    client = await HttpClient.connect(port)
    resp, _ = await client.request("GET", "http://origin.test/arm-drop")
    assert resp.status_code == 200
    resp, body = await client.request("GET", "http://origin.test/hello")
    assert resp.status_code == 200 and body == b"hello from origin\n"
    assert origin.connections == 2
    assert proxy.statistics()["retries"] == 1
    await client.aclose()


async def test_close_delimited_http10_response(nursery, proxy, connector):
    async def old_origin(stream):
        head = b""
        while b"\r\n\r\n" not in head:
            head += await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n")
        await stream.send_all(pattern(200000))
        await stream.aclose()

    from proxy_helpers import serve
    connector.names["old.test"] = await serve(nursery, old_origin)
    port = await serve_proxy(nursery, proxy)
    client = await HttpClient.connect(port)
    for _ in range(2):  # the client connection survives the origin's close
        resp, body = await client.request("GET", "http://old.test/")
        assert resp.status_code == 200 and body == pattern(200000)
        assert header(resp, "transfer-encoding") == "chunked"
    await client.aclose()


async def test_early_response_to_an_upload(nursery, proxy, origin, tmp_path):
    port = await serve_proxy(nursery, proxy)
    (tmp_path / "body").write_bytes(pattern(20 * 1024 * 1024))
    with trio.fail_after(15):
        result = await curl("-x", f"http://127.0.0.1:{port}", "-H", "Expect:", "--data-binary",
                            f"@{tmp_path / 'body'}", "-w", "%{http_code}",
                            "http://origin.test/reject-upload")
    assert result.stdout.endswith(b"413"), (result.stdout, result.stderr)


async def test_stalled_request_body_gets_408(nursery, connector, origin):
    proxy = HttpProxy(ProxySettings(idle_timeout=0.3), connect=connector)
    port = await serve_proxy(nursery, proxy)
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"POST http://origin.test/echo HTTP/1.1\r\nHost: origin.test\r\n"
                              b"Content-Length: 100\r\n\r\nonly ten b")
        out = b""
        while data := await stream.receive_some(65536):
            out += data
    assert out.startswith(b"HTTP/1.1 408 ") and b"Connection: close" in out
    assert b"stopped arriving" in out


async def test_trickled_request_head_gets_408_at_the_deadline(nursery, connector):
    proxy = HttpProxy(ProxySettings(header_timeout=0.5, idle_timeout=60), connect=connector)
    port = await serve_proxy(nursery, proxy)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    head = b"GET http://origin.test/hello HTTP/1.1\r\nX-Slow: " + b"a" * 1000
    received = b""
    start = trio.current_time()

    async def trickle():
        try:
            for i in range(len(head)):
                await stream.send_all(head[i:i + 1])
                await trio.sleep(0.02)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async with trio.open_nursery() as inner:
        inner.start_soon(trickle)
        with trio.fail_after(5):
            while chunk := await stream.receive_some(4096):
                received += chunk
        inner.cancel_scope.cancel()
    assert received.startswith(b"HTTP/1.1 408 "), received
    assert trio.current_time() - start < 3  # the bytes kept coming; the deadline held
    assert proxy.statistics()["header_timeouts"] == 1
    await stream.aclose()


async def test_keep_alive_wait_is_idle_timeout_then_head_deadline(nursery, connector):
    proxy = HttpProxy(ProxySettings(header_timeout=0.5, idle_timeout=60), connect=connector)
    port = await serve_proxy(nursery, proxy)
    client = await HttpClient.connect(port)
    resp, _ = await client.request("GET", "http://origin.test/hello")
    assert resp.status_code == 200
    await trio.sleep(1.0)  # longer than header_timeout, idle between requests: still open
    resp, _ = await client.request("GET", "http://origin.test/hello")
    assert resp.status_code == 200
    await client.aclose()


async def test_one_client_over_its_share_gets_503_alone(nursery, connector):
    proxy = HttpProxy(ProxySettings(max_connections=10, max_connections_per_client=2), connect=connector)
    port = await serve_proxy(nursery, proxy)
    held = [await HttpClient.connect(port) for _ in range(2)]
    for client in held:
        resp, _ = await client.request("GET", "http://origin.test/hello")
        assert resp.status_code == 200
    out = await raw_exchange(port, b"GET http://origin.test/hello HTTP/1.1\r\nHost: origin.test\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 503 ") and b"per client" in out
    assert proxy.statistics()["rejected_client_busy"] == 1
    # Another client (here: another address) is still served.
    async with trio.open_nursery() as inner:
        async def other(stream):
            await proxy.handle_client(stream, ("192.168.65.9", 1234))
        other_port = await serve(inner, other)
        client = await HttpClient.connect(other_port)
        resp, _ = await client.request("GET", "http://origin.test/hello")
        assert resp.status_code == 200
        await client.aclose()
        inner.cancel_scope.cancel()
    for client in held:
        await client.aclose()
