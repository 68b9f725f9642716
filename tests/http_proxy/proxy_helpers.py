"""Loopback-only test servers and clients for the HTTP proxy tests.

Every server here listens on 127.0.0.1; every outbound connection made by the proxy
under test goes through ``LoopbackConnector``, which maps test names (origin.test...)
to loopback ports and refuses anything that is not loopback, so no test can reach
another address (nor ask a DNS server anything).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import ipaddress
import json
import os
import ssl
import subprocess
from urllib.parse import parse_qs, urlsplit

import h11
import trio

from netkit.testing import require_tool

LOOPBACK = "127.0.0.1"


# --- outbound connections ----------------------------------------------------------

class LoopbackConnector:
    """``connect(host, port, outbound)`` for HttpProxy: names in ``names`` map to a
    loopback port (the requested port is recorded but ignored), loopback literals connect
    as asked, everything else fails like a DNS error. ``outbounds`` records what each
    connection was for (None when the test's own upstream proxy calls it)."""

    def __init__(self, names: dict[str, int] | None = None) -> None:
        self.names: dict[str, int] = dict(names or {})
        self.calls: list[tuple[str, int]] = []
        self.outbounds: list = []
        self.delay: dict[str, float] = {}

    async def __call__(self, host: str, port: int, outbound=None) -> trio.abc.Stream:
        self.calls.append((host, port))
        self.outbounds.append(outbound)
        if host in self.delay:
            await trio.sleep(self.delay[host])
        if host in self.names:
            return await trio.open_tcp_stream(LOOPBACK, self.names[host])
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise OSError(-2, "Name or service not known (test resolver)") from None
        if not ip.is_loopback:
            raise AssertionError(f"test tried to reach a non-loopback address {host}")
        return await trio.open_tcp_stream(host, port)


async def serve(nursery: trio.Nursery, handler) -> int:
    """Run ``handler(stream)`` for each connection to a fresh 127.0.0.1 port."""
    listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host=LOOPBACK))
    return listeners[0].socket.getsockname()[1]


async def serve_proxy(nursery: trio.Nursery, proxy) -> int:
    async def handler(stream: trio.SocketStream) -> None:
        await proxy.handle_client(stream, stream.socket.getpeername())

    return await serve(nursery, handler)


async def serve_transparent(nursery: trio.Nursery, proxy, original_dst, tls: bool) -> int:
    async def handler(stream: trio.SocketStream) -> None:
        await proxy.handle_transparent(stream, stream.socket.getpeername(), original_dst, tls)

    return await serve(nursery, handler)


def closed_port() -> int:
    """A loopback port with nothing listening (connections are refused)."""
    import socket

    s = socket.socket()
    s.bind((LOOPBACK, 0))
    port = s.getsockname()[1]
    s.close()
    return port


def pattern(n: int, offset: int = 0) -> bytes:
    """Deterministic bytes for body checks."""
    block = bytes(range(256)) * 256  # 64 KiB
    out = bytearray()
    pos = offset % len(block)
    while len(out) < n:
        take = min(n - len(out), len(block) - pos)
        out += block[pos:pos + take]
        pos = 0
    return bytes(out)


# --- HTTP plumbing -----------------------------------------------------------------

class H11Stream:
    def __init__(self, stream: trio.abc.Stream, role) -> None:
        self.stream = stream
        self.conn = h11.Connection(role)

    async def next_event(self):
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(await self.stream.receive_some(65536))
                continue
            return event

    async def send(self, event) -> None:
        data = self.conn.send(event)
        if data:
            await self.stream.send_all(data)


class Origin:
    """A tiny keep-alive HTTP/1.1 origin server (h11) with a few routes:

    /hello, /headers (JSON of the request headers), /echo (sha256+length of the body),
    /big?n=N[&chunked=1][&delay=S] (N pattern bytes, S seconds between 64 KiB blocks),
    /slow?s=S, /sneaky-close (answers keep-alive, then closes the socket), /arm-drop
    (the next request on this connection is dropped unanswered), /reject-upload (413
    before reading the body)."""

    def __init__(self, name: str = "origin") -> None:
        self.name = name
        self.requests: list[tuple[bytes, bytes, dict]] = []
        self.connections = 0
        self.port = 0

    async def start(self, nursery: trio.Nursery) -> "Origin":
        self.port = await serve(nursery, self.handle)
        return self

    async def handle(self, stream: trio.abc.Stream) -> None:
        self.connections += 1
        h = H11Stream(stream, h11.SERVER)
        h.drop_next = False
        try:
            while True:
                event = await h.next_event()
                if type(event) is not h11.Request:
                    return
                if h.drop_next:
                    return  # close without an answer (a keep-alive race, made certain)
                close = await self.respond(h, event)
                if close == "linger":
                    # Like a real server: FIN, then drain, so the answer is not lost
                    # to a reset caused by unread request bytes.
                    await stream.send_eof()
                    with trio.move_on_after(2):
                        while await stream.receive_some(65536):
                            pass
                    return
                if close or h.conn.our_state is not h11.DONE:
                    return
                h.conn.start_next_cycle()
        except (h11.RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async def respond(self, h: H11Stream, req: h11.Request) -> bool:
        headers = {k.decode(): v.decode() for k, v in req.headers}
        self.requests.append((req.method, req.target, headers))
        url = urlsplit(req.target.decode())
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        digest = hashlib.sha256()
        length = 0
        if url.path == "/reject-upload":
            await h.send(h11.Response(status_code=413, headers=[("Content-Length", "9"),
                                                                ("Connection", "close")]))
            await h.send(h11.Data(data=b"too big!\n"))
            await h.send(h11.EndOfMessage())
            return "linger"
        if url.path == "/echo" and "100-continue" in headers.get("expect", ""):
            await h.send(h11.InformationalResponse(status_code=100, headers=[]))
        while True:
            event = await h.next_event()
            if type(event) is h11.EndOfMessage:
                break
            digest.update(event.data)
            length += len(event.data)

        async def reply(body: bytes, status: int = 200, extra=()) -> None:
            await h.send(h11.Response(status_code=status, headers=[
                ("Content-Length", str(len(body))), ("Content-Type", "text/plain"),
                ("X-Origin", self.name), *extra]))
            if req.method != b"HEAD":
                await h.send(h11.Data(data=body))
            await h.send(h11.EndOfMessage())

        if url.path == "/hello":
            await reply(f"hello from {self.name}\n".encode(),
                        extra=[("Connection", "keep-alive, X-Secret"), ("X-Secret", "hop"),
                               ("Keep-Alive", "timeout=5"), ("Proxy-Authenticate", "Basic")])
        elif url.path == "/headers":
            await reply(json.dumps({"target": req.target.decode(), "headers": [
                [k.decode(), v.decode()] for k, v in req.headers.raw_items()]}).encode())
        elif url.path == "/echo":
            await reply(json.dumps({"sha256": digest.hexdigest(), "length": length}).encode())
        elif url.path == "/slow":
            await trio.sleep(float(q.get("s", "10")))
            await reply(b"slow\n")
        elif url.path == "/big":
            n = int(q.get("n", "0"))
            delay = float(q.get("delay", "0"))
            head = [("X-Origin", self.name)]
            if q.get("chunked") != "1":
                head.append(("Content-Length", str(n)))
            await h.send(h11.Response(status_code=200, headers=head))
            sent = 0
            while sent < n:
                block = pattern(min(65536, n - sent), sent)
                await h.send(h11.Data(data=block))
                sent += len(block)
                if delay:
                    await trio.sleep(delay)
            await h.send(h11.EndOfMessage())
        elif url.path == "/arm-drop":
            h.drop_next = True
            await reply(b"armed\n")
        elif url.path == "/sneaky-close":
            await reply(b"bye\n")
            return True
        else:
            await reply(b"not found\n", status=404)
        return False


class TestProxy:
    """A small upstream proxy for chaining tests: optional Basic auth (407 without it),
    absolute-form forwarding (streamed response) and CONNECT tunnels. Names are
    resolved with a LoopbackConnector. Records what it was asked."""

    __test__ = False

    def __init__(self, connector: LoopbackConnector, user: str | None = None,
                 password: str | None = None) -> None:
        self.connector = connector
        self.auth = None
        if user is not None:
            self.auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.requests: list[tuple[str, str, dict]] = []
        self.port = 0

    async def start(self, nursery: trio.Nursery) -> "TestProxy":
        self.port = await serve(nursery, self.handle)
        return self

    async def handle(self, stream: trio.abc.Stream) -> None:
        h = H11Stream(stream, h11.SERVER)
        try:
            while True:
                event = await h.next_event()
                if type(event) is not h11.Request:
                    return
                headers = {k.decode(): v.decode() for k, v in event.headers}
                self.requests.append((event.method.decode(), event.target.decode(), headers))
                body = b""
                while True:
                    e = await h.next_event()
                    if type(e) is h11.EndOfMessage:
                        break
                    body += e.data
                if self.auth and headers.get("proxy-authorization") != self.auth:
                    await h.send(h11.Response(status_code=407, headers=[
                        ("Proxy-Authenticate", 'Basic realm="test"'), ("Content-Length", "4")]))
                    await h.send(h11.Data(data=b"auth"))
                    await h.send(h11.EndOfMessage())
                elif event.method == b"CONNECT":
                    host, _, port = event.target.decode().rpartition(":")
                    remote = await self.connector(host, int(port))
                    await h.send(h11.Response(status_code=200, headers=[]))
                    data, _ = h.conn.trailing_data
                    if data:
                        await remote.send_all(data)
                    await tunnel(stream, remote)
                    return
                else:
                    await self.forward(h, event, body)
                if h.conn.our_state is not h11.DONE:
                    return
                h.conn.start_next_cycle()
        except (h11.RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async def forward(self, h: H11Stream, req: h11.Request, body: bytes) -> None:
        url = urlsplit(req.target.decode())
        assert url.scheme == "http", req.target
        remote = await self.connector(url.hostname, url.port or 80)
        o = H11Stream(remote, h11.CLIENT)
        headers = [(k, v) for k, v in req.headers if k not in (b"proxy-authorization", b"connection",
                                                               b"transfer-encoding", b"content-length")]
        headers.append((b"Content-Length", str(len(body)).encode()))
        await o.send(h11.Request(method=req.method, target=(url.path or "/") + (f"?{url.query}" if url.query else ""),
                                 headers=headers))
        await o.send(h11.Data(data=body))
        await o.send(h11.EndOfMessage())
        resp = await o.next_event()
        out = [(k, v) for k, v in resp.headers if k not in (b"connection", b"transfer-encoding")]
        await h.send(h11.Response(status_code=resp.status_code, headers=out + [(b"X-Upstream", b"yes")]))
        while True:
            e = await o.next_event()
            if type(e) is h11.EndOfMessage:
                break
            await h.send(h11.Data(data=e.data))
        await h.send(h11.EndOfMessage())
        await remote.aclose()


async def tunnel(a: trio.abc.HalfCloseableStream, b: trio.abc.HalfCloseableStream) -> None:
    async def pump(src, dst):
        try:
            while data := await src.receive_some(65536):
                await dst.send_all(data)
            await dst.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass

    async with trio.open_nursery() as n:
        n.start_soon(pump, a, b)
        n.start_soon(pump, b, a)
    await b.aclose()


# --- clients ---------------------------------------------------------------------------

class HttpClient:
    """An h11 client on one keep-alive TCP connection (to the proxy under test)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.h = H11Stream(stream, h11.CLIENT)
        self.stream = stream

    @classmethod
    async def connect(cls, port: int) -> "HttpClient":
        return cls(await trio.open_tcp_stream(LOOPBACK, port))

    async def request(self, method: str, target: str, headers=(), body=None,
                      host: str | None = None):
        """Send a request; ``body`` is bytes or an async iterator of bytes (sent
        chunked). Returns (h11.Response, body bytes)."""
        hdrs = list(headers)
        if host is None:
            host = urlsplit(target).netloc or "unknown"
        hdrs.insert(0, ("Host", host))
        if isinstance(body, (bytes, bytearray)):
            hdrs.append(("Content-Length", str(len(body))))
        elif body is not None:
            hdrs.append(("Transfer-Encoding", "chunked"))
        await self.h.send(h11.Request(method=method, target=target, headers=hdrs))
        if isinstance(body, (bytes, bytearray)):
            await self.h.send(h11.Data(data=bytes(body)))
        elif body is not None:
            async for block in body:
                await self.h.send(h11.Data(data=block))
        await self.h.send(h11.EndOfMessage())
        return await self.read_response()

    async def read_response(self):
        resp = await self.h.next_event()
        while type(resp) is h11.InformationalResponse:
            resp = await self.h.next_event()
        assert type(resp) is h11.Response, resp
        chunks = []
        while True:
            event = await self.h.next_event()
            if type(event) is h11.EndOfMessage:
                break
            chunks.append(event.data)
        if self.h.conn.our_state is h11.DONE and self.h.conn.their_state is h11.DONE:
            self.h.conn.start_next_cycle()
        return resp, b"".join(chunks)

    async def aclose(self) -> None:
        await self.stream.aclose()


async def raw_exchange(port: int, data: bytes, *, timeout: float = 5) -> bytes:
    """Send raw bytes to the proxy and read until it closes."""
    with trio.fail_after(timeout):
        stream = await trio.open_tcp_stream(LOOPBACK, port)
        await stream.send_all(data)
        out = bytearray()
        try:
            while chunk := await stream.receive_some(65536):
                out += chunk
        except trio.BrokenResourceError:
            pass
        await stream.aclose()
        return bytes(out)


def header(resp: h11.Response, name: str) -> str | None:
    for k, v in resp.headers:
        if k.decode().lower() == name.lower():
            return v.decode()
    return None


def curl_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["NO_PROXY"] = ""
    return env


async def curl(*args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    # curl and openssl come from scripts/install-debian-tools.sh: missing, the test
    # skips, or fails under NETKIT_REQUIRE_PRIVILEGED=1 (as CI runs).
    curl_path = require_tool("curl")
    with trio.fail_after(timeout):
        return await trio.run_process(
            [curl_path, "--silent", "--show-error", "--max-time", str(int(timeout)), *args],
            capture_stdout=True, capture_stderr=True, check=False, env=curl_env())


# --- TLS -------------------------------------------------------------------------------

def make_cert(directory) -> tuple[str, str]:
    """A self-signed EC certificate for tls.test/localhost/127.0.0.1 (openssl CLI)."""
    openssl = require_tool("openssl")
    cert = os.path.join(directory, "cert.pem")
    key = os.path.join(directory, "key.pem")
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=tls.test",
         "-addext", "subjectAltName=DNS:tls.test,DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True)
    return cert, key


class TlsServer:
    """A TLS server on 127.0.0.1 that answers one HTTP request with the SNI it saw."""

    def __init__(self, cert: str, key: str) -> None:
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ctx.load_cert_chain(cert, key)
        self.server_names: list[str | None] = []
        self.ctx.sni_callback = self._sni
        self.port = 0

    def _sni(self, sslobj, name, ctx) -> None:
        self.server_names.append(name)

    async def start(self, nursery: trio.Nursery) -> "TlsServer":
        self.port = await serve(nursery, self.handle)
        return self

    async def handle(self, stream: trio.abc.Stream) -> None:
        tls = trio.SSLStream(stream, self.ctx, server_side=True)
        seen = len(self.server_names)
        try:
            buf = b""
            while b"\r\n\r\n" not in buf:
                data = await tls.receive_some(65536)
                if not data:
                    return
                buf += data
            sni = self.server_names[-1] if len(self.server_names) > seen else None
            body = f"hello over tls, sni={sni}\n".encode()
            await tls.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: " + str(len(body)).encode()
                               + b"\r\nConnection: close\r\n\r\n" + body)
            await tls.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError):
            await trio.aclose_forcefully(stream)


def client_context(cafile: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=cafile)


async def tls_get(stream: trio.abc.Stream, cafile: str, server_hostname: str | None,
                  path: str = "/") -> bytes:
    """A GET over TLS on an already-open stream; returns the whole response."""
    ctx = client_context(cafile)
    if server_hostname is None:
        ctx.check_hostname = False
    tls = trio.SSLStream(stream, ctx, server_hostname=server_hostname)
    await tls.send_all(f"GET {path} HTTP/1.1\r\nHost: {server_hostname or 'x'}\r\n\r\n".encode())
    out = b""
    try:
        while data := await tls.receive_some(65536):
            out += data
    except trio.BrokenResourceError:
        pass
    await trio.aclose_forcefully(tls)
    return out
