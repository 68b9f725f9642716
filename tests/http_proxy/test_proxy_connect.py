"""CONNECT tunnels through the explicit proxy."""

import hashlib

import h11
import trio
from proxy_helpers import (H11Stream, LOOPBACK, closed_port, curl, raw_exchange, serve,
                           serve_proxy, tls_get)

from netkit.http_proxy import HttpProxy, ProxySettings


async def open_tunnel(port: int, authority: str) -> tuple[trio.SocketStream, h11.Response, bytes]:
    stream = await trio.open_tcp_stream(LOOPBACK, port)
    h = H11Stream(stream, h11.CLIENT)
    await h.send(h11.Request(method="CONNECT", target=authority, headers=[("Host", authority)]))
    await h.send(h11.EndOfMessage())
    resp = await h.next_event()
    return stream, resp, h.conn.trailing_data[0]


async def test_connect_to_tls_server(nursery, proxy, connector, tls_server, cafile):
    connector.names["tls.test"] = tls_server.port
    port = await serve_proxy(nursery, proxy)
    stream, resp, extra = await open_tunnel(port, "tls.test:443")
    assert resp.status_code == 200 and extra == b""
    out = await tls_get(stream, cafile, "tls.test")
    assert out.startswith(b"HTTP/1.1 200 OK")
    assert out.endswith(b"hello over tls, sni=tls.test\n")
    assert ("tls.test", 443) in connector.calls
    assert proxy.statistics()["tunnels"] == 1


async def test_curl_https_through_proxy(nursery, proxy, connector, tls_server):
    connector.names["tls.test"] = tls_server.port
    port = await serve_proxy(nursery, proxy)
    result = await curl("-k", "-x", f"http://127.0.0.1:{port}", "https://tls.test/")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"hello over tls, sni=tls.test\n"


async def test_tunnel_is_half_close_aware(nursery, proxy, connector):
    async def digest_server(stream):
        # Reads until EOF, then answers: works only if the EOF crosses the tunnel.
        h = hashlib.sha256()
        n = 0
        while data := await stream.receive_some(65536):
            h.update(data)
            n += len(data)
        await stream.send_all(f"{n} {h.hexdigest()}".encode())
        await stream.aclose()

    connector.names["digest.test"] = await serve(nursery, digest_server)
    port = await serve_proxy(nursery, proxy)
    stream, resp, _ = await open_tunnel(port, "digest.test:9")
    assert resp.status_code == 200
    payload = b"x" * 3_000_000
    with trio.fail_after(10):
        await stream.send_all(payload)
        await stream.send_eof()
        out = b""
        while data := await stream.receive_some(65536):
            out += data
    assert out == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}".encode()


async def test_bytes_sent_right_after_connect_are_kept(nursery, proxy, connector):
    async def echo(stream):
        while data := await stream.receive_some(65536):
            await stream.send_all(data)

    connector.names["echo.test"] = await serve(nursery, echo)
    port = await serve_proxy(nursery, proxy)
    stream = await trio.open_tcp_stream(LOOPBACK, port)
    # The request and the first tunnel bytes in one segment (as some clients do).
    await stream.send_all(b"CONNECT echo.test:7 HTTP/1.1\r\nHost: echo.test:7\r\n\r\nearly bytes")
    got = b""
    with trio.fail_after(5):
        while not got.endswith(b"early bytes"):
            got += await stream.receive_some(65536)
    assert got.startswith(b"HTTP/1.1 200 ")
    await stream.aclose()


async def test_connect_refused_gets_502(nursery, proxy):
    port = await serve_proxy(nursery, proxy)
    dead = closed_port()
    stream, resp, _ = await open_tunnel(port, f"127.0.0.1:{dead}")
    assert resp.status_code == 502
    await stream.aclose()


async def test_connect_denied_gets_403(nursery, connector):
    proxy = HttpProxy(ProxySettings(allow=("*.allowed.test",), deny_message="nope {host}"),
                      connect=connector)
    port = await serve_proxy(nursery, proxy)
    out = await raw_exchange(port, b"CONNECT tls.test:443 HTTP/1.1\r\nHost: tls.test:443\r\n"
                                   b"Connection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 403 ")
    assert out.endswith(b"nope tls.test\n")
    assert connector.calls == []


async def test_connect_bad_authority_gets_400(nursery, proxy):
    port = await serve_proxy(nursery, proxy)
    out = await raw_exchange(port, b"CONNECT bad host:x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400 ")
