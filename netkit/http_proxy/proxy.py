"""The HTTP proxy: explicit (gateway port 3128) and transparent (guest port 80/443).

``HttpProxy`` works on trio streams only; the gateway hands it a guest TCP connection
(terminated by netkit's TCP engine) and it opens outbound connections through an
injectable ``connect(host, port, outbound)``: by default ``GateConnector``, which goes
through ``netkit.nat.gate.HostGate`` (translation, the outbound policy with the guest's
identity, the host socket) like every other connection netkit makes for a guest. A
policy refusal is answered 403. See ``netkit/http_proxy/__init__.py`` for the list of
behaviours.
"""

from __future__ import annotations

import http
import ipaddress
import logging
import math
import os
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import h11
import trio

from ..policy import Refused
from ._streams import (STREAM_ERRORS, OriginPool, Peer, PeerGone, PeerTimeout, RECV_SIZE,
                       lingering_close, splice)
from .settings import ConfigError, ProxySettings, Upstream
from .sni import MAX_CLIENT_HELLO, SniStatus, parse_client_hello_untrusted

__all__ = ["HttpProxy", "Connector", "Outbound", "GateConnector"]

log = logging.getLogger("netkit.http_proxy")


@dataclass(frozen=True, slots=True)
class Outbound:
    """What an outbound connection of the proxy is for, handed to the connector."""

    #: The guest (client) the connection is made for: (address, port).
    client: tuple
    #: "proxy" (the explicit port) or "transparent-proxy".
    via: str
    #: The origin the guest asked for, host as it named it (a name or an IP literal).
    origin: tuple[str, int]
    #: The upstream proxy the connection goes to instead of the origin, or None.
    upstream: "Upstream | None" = None


#: ``await connect(host, port, outbound)``: a stream to ``host:port`` (the origin, or the
#: upstream proxy) for ``outbound``. Raise ``netkit.policy.Refused`` to refuse (403 when
#: its reason is "denied"), ``OSError`` when the connection fails (502).
Connector = Callable[[str, int, Outbound], Awaitable[trio.abc.Stream]]

VIA = b"1.1 netkit"
#: A request that already went through netkit this many times is a loop.
_MAX_VIA_HOPS = 8
_IDEMPOTENT = {b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"}
_HOP_BY_HOP = {b"connection", b"keep-alive", b"te", b"trailer", b"trailers",
               b"transfer-encoding", b"upgrade", b"content-length", b"host"}
_HOST_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


class _Fail(Exception):
    """Answer the client with ``status`` and a readable ``message``."""

    def __init__(self, status: int, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retryable = retryable


class _Abort(Exception):
    """The exchange cannot go on and no error response is possible: close."""


class _HeadTimeout(Exception):
    """The client did not complete a request head within ``header_timeout``."""


@dataclass(frozen=True, slots=True)
class _Target:
    host: str
    port: int
    path: bytes  # origin-form target ("/x?y", or "*")

    @property
    def authority(self) -> str:
        return _authority(self.host, self.port, default=80)

    @property
    def absolute(self) -> bytes:
        path = self.path if self.path.startswith(b"/") else b"/"
        return b"http://" + self.authority.encode("ascii") + path


def _authority(host: str, port: int, default: int | None = None) -> str:
    h = f"[{host}]" if ":" in host else host
    return h if port == default else f"{h}:{port}"


def split_authority(text: str, default_port: int | None) -> tuple[str, int]:
    """``host``, ``host:port`` or ``[v6]:port`` -> (host, port); ValueError if bad."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError("unterminated IPv6 literal")
        host, rest = text[1:end], text[end + 1:]
        ipaddress.IPv6Address(host)
        if rest and not rest.startswith(":"):
            raise ValueError("junk after IPv6 literal")
        port_text = rest[1:]
    else:
        host, _, port_text = text.partition(":")
        if ":" in port_text:
            raise ValueError("IPv6 address must be in brackets")
        if not host or not _HOST_RE.match(host) or len(host) > 253:
            raise ValueError("bad host name")
    if port_text:
        if not port_text.isdigit() or len(port_text) > 5 or not 0 < int(port_text) < 65536:
            raise ValueError("bad port")
        port = int(port_text)
    elif default_port is None:
        raise ValueError("port missing")
    else:
        port = default_port
    host = host.lower()
    if host.endswith(".") and not host.startswith("["):
        host = host.rstrip(".") or host
    return host, port


def _parse_target(req: h11.Request, dst: tuple[str, int] | None) -> _Target:
    """Where a (non-CONNECT) request goes. ``dst`` is the guest's original destination
    in transparent mode (None on the explicit proxy port)."""
    target = req.target
    if target[:7].lower() == b"http://":
        rest = target[7:]
        cut = len(rest)
        for sep in (b"/", b"?", b"#"):
            i = rest.find(sep)
            if i >= 0:
                cut = min(cut, i)
        authority, path = rest[:cut], rest[cut:]
        if b"#" in path:
            path = path[:path.index(b"#")]
        if not path.startswith(b"/"):
            path = b"/" + path
        authority = authority.rpartition(b"@")[2]  # drop user:pass@
        try:
            host, port = split_authority(authority.decode("ascii"), 80)
        except (ValueError, UnicodeDecodeError):
            raise _Fail(400, f"bad host in request URL {target[:200].decode('latin-1')!r}") from None
        return _Target(host, port, path)
    if target[:8].lower() == b"https://":
        raise _Fail(400, "https:// URLs must be requested with CONNECT through this proxy")
    if b"://" in target[:16]:
        raise _Fail(400, "only http:// URLs are proxied (use CONNECT for anything else)")
    if dst is None:
        raise _Fail(400, "this is an HTTP proxy: the request must contain an absolute URL "
                         "such as http://example.com/")
    if not (target.startswith(b"/") or target == b"*"):
        raise _Fail(400, "bad request target")
    host_values = [v for n, v in req.headers if n == b"host"]
    if len(host_values) > 1:
        raise _Fail(400, "more than one Host header")
    if host_values:
        try:
            host, port = split_authority(host_values[0].decode("ascii"), dst[1])
        except (ValueError, UnicodeDecodeError):
            raise _Fail(400, "bad Host header") from None
    else:
        host, port = dst
    return _Target(host, port, target)


def _has_body(req: h11.Request) -> bool:
    for name, value in req.headers:
        if name == b"transfer-encoding":
            return True
        if name == b"content-length" and value.strip() not in (b"0", b""):
            return True
    return False


def _framing(headers) -> tuple[bool, bytes | None]:
    chunked, length = False, None
    for name, value in headers:
        if name == b"transfer-encoding":
            chunked = True
        elif name == b"content-length":
            length = value
    return chunked, (None if chunked else length)


def _end_to_end(headers) -> list[tuple[bytes, bytes]]:
    """Headers minus hop-by-hop ones (RFC 9110 7.6.1), the ones named in Connection,
    Proxy-*, and the framing/Host headers that the proxy sets itself."""
    named = set()
    for name, value in headers:
        if name == b"connection":
            named.update(t.strip().lower() for t in value.split(b","))
    out = []
    for raw_name, value in headers.raw_items():
        name = raw_name.lower()
        if name in _HOP_BY_HOP or name in named or name.startswith(b"proxy-"):
            continue
        out.append((raw_name, value))
    return out


def _via_hops(headers) -> int:
    return sum(value.lower().count(b"netkit") for name, value in headers if name == b"via")


def _reason(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


def _describe(e: BaseException) -> str:
    # trio.open_tcp_stream raises "all attempts to connect ... failed" with the real
    # errors (one per address) in an exception group as the cause.
    cause = e.__cause__
    if isinstance(cause, BaseExceptionGroup):
        reasons = []
        for sub in cause.exceptions:
            text = _describe(sub)
            if text not in reasons:
                reasons.append(text)
        if reasons:
            return "; ".join(reasons)
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


@dataclass
class _Exchange:
    request_done: bool
    response_started: bool = False
    response_done: bool = False
    fail: _Fail | None = None
    abort: bool = False

    def set_fail(self, fail: _Fail) -> None:
        if self.fail is None and not self.abort:
            self.fail = fail

    def set_abort(self) -> None:
        if self.fail is None:
            self.abort = True


class HttpProxy:
    """An HTTP/1.1 forward proxy over trio streams.

    ``handle_client`` serves the explicit proxy port (absolute-form requests and
    CONNECT); ``handle_transparent`` serves guest connections to port 80/443 of any
    destination, routed by Host header or TLS SNI. Both own the stream and close it.
    Settings are replaced with ``reconfigure`` and apply to new requests.
    """

    def __init__(self, settings: ProxySettings | None = None, *,
                 connect: Connector | None = None) -> None:
        self._settings = settings if settings is not None else ProxySettings()
        if not isinstance(self._settings, ProxySettings):
            raise TypeError("settings must be a ProxySettings")
        self._connect: Connector = connect if connect is not None else GateConnector()
        self._active = 0
        #: Client address -> connections it holds (its share of ``max_connections``).
        self._per_client: dict[object, int] = {}
        self._stats: dict[str, int] = {}

    # --- configuration and observability ------------------------------------------

    @property
    def settings(self) -> ProxySettings:
        return self._settings

    def reconfigure(self, settings: ProxySettings) -> None:
        """Use ``settings`` for new requests; connections in flight keep going."""
        if not isinstance(settings, ProxySettings):
            raise TypeError("settings must be a ProxySettings")
        if settings != self._settings:
            log.info("http proxy settings: http=%s https=%s exclude=%s allow=%s",
                     settings.http_upstream, settings.https_upstream,
                     ",".join(settings.exclude) or "-",
                     "all" if settings.allow is None else ",".join(settings.allow))
        self._settings = settings
        self._count("reconfigurations")

    def statistics(self) -> dict:
        out = dict(self._stats)
        out["active_connections"] = self._active
        out["active_clients"] = len(self._per_client)
        return out

    def load_file(self, path: str | os.PathLike) -> ProxySettings:
        """Read vpnkit's ``--http`` JSON file and apply it; ConfigError if it is bad."""
        try:
            with open(path, "rb") as f:
                text = f.read(1 << 20)
        except OSError as e:
            raise ConfigError(f"--http: cannot read {os.fspath(path)}: {_describe(e)}") from None
        settings = ProxySettings.from_vpnkit_json(text, base=self._settings)
        self.reconfigure(settings)
        return settings

    async def watch_file(self, path: str | os.PathLike, *, interval: float = 1.0,
                         task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Load ``path`` now and again whenever it changes (polled every ``interval``
        seconds). A bad or missing file is logged and the current settings stay."""
        last: tuple | None | bool = False
        started = False
        while True:
            try:
                st = os.stat(path)
                signature: tuple | None = (st.st_mtime_ns, st.st_size, st.st_ino)
            except OSError:
                signature = None
            if signature != last:
                last = signature
                if signature is None:
                    log.warning("--http: %s is missing; keeping the current proxy settings",
                                os.fspath(path))
                else:
                    try:
                        self.load_file(path)
                        self._count("file_reloads")
                    except ConfigError as e:
                        self._count("file_errors")
                        log.warning("%s; keeping the current proxy settings", e)
            if not started:
                started = True
                task_status.started()
            await trio.sleep(interval)

    def _count(self, key: str, n: int = 1) -> None:
        self._stats[key] = self._stats.get(key, 0) + n

    # --- entry points --------------------------------------------------------------

    async def handle_client(self, stream: trio.abc.Stream, client: tuple) -> None:
        """Serve one connection to the explicit proxy port (e.g. gateway:3128)."""
        await self._session(stream, client, None, False)

    async def handle_transparent(self, stream: trio.abc.Stream, client: tuple,
                                 original_dst: tuple[str, int], tls: bool) -> None:
        """Serve a guest connection to ``original_dst`` (port 80-like if not ``tls``,
        443-like if ``tls``), routed by its Host header or TLS server name."""
        await self._session(stream, client, (str(original_dst[0]), int(original_dst[1])), tls)

    async def _session(self, stream, client, dst, tls: bool) -> None:
        settings = self._settings
        # One guest's share: the client address (a guest's leased IP) is its identity.
        who = client[0] if isinstance(client, tuple) and client else client
        held = self._per_client.get(who, 0)
        limit = None
        if held >= settings.max_connections_per_client:
            self._count("rejected_client_busy")
            limit = f"{held} connections from {who} (limit {settings.max_connections_per_client} per client)"
        elif self._active >= settings.max_connections:
            self._count("rejected_busy")
            limit = f"{self._active} connections (limit {settings.max_connections})"
        if limit is not None:
            log.warning("http proxy: %s open, refusing %s", limit, client)
            if tls:
                await trio.aclose_forcefully(stream)
            else:
                await self._reject_busy(stream, limit)
            return
        self._active += 1
        self._per_client[who] = held + 1
        self._count("connections")
        try:
            if tls:
                await self._serve_tls(stream, client, dst)
            else:
                await self._serve_http(stream, client, dst)
        except Exception:
            self._count("internal_errors")
            log.exception("http proxy: unexpected error serving %s", client)
        finally:
            self._active -= 1
            remaining = self._per_client[who] - 1
            if remaining:
                self._per_client[who] = remaining
            else:
                del self._per_client[who]
            await trio.aclose_forcefully(stream)

    async def _reject_busy(self, stream, limit: str) -> None:
        body = f"netkit proxy: too many connections ({limit}); try again later\n".encode()
        head = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n"
                b"Via: " + VIA + b"\r\nRetry-After: 1\r\n\r\n")
        with trio.move_on_after(5):
            try:
                await stream.send_all(head + body)
            except STREAM_ERRORS:
                pass
        await lingering_close(stream, timeout=1.0)

    # --- HTTP ----------------------------------------------------------------------

    async def _serve_http(self, stream, client, dst) -> None:
        peer = Peer(stream, h11.Connection(
            h11.SERVER, max_incomplete_event_size=self._settings.max_header_bytes))
        linger = False
        async with trio.open_nursery() as nursery:
            pool = OriginPool(nursery)
            try:
                linger = await self._http_loop(peer, client, dst, pool)
            finally:
                self._count("origin_reuses", pool.reused)
                nursery.cancel_scope.cancel()
        if linger:
            await lingering_close(stream)

    async def _http_loop(self, cp: Peer, client, dst, pool: OriginPool) -> bool:
        """Serve requests until the connection ends; True to close with lingering."""
        conn = cp.conn
        first = True
        while True:
            settings = self._settings
            try:
                event = await self._next_request(cp, settings, first)
            except h11.RemoteProtocolError as e:
                self._count("bad_requests")
                log.info("http proxy: malformed request from %s: %s", client, e)
                await self._send_error(cp, e.error_status_hint, f"malformed request: {e}")
                return True
            except _HeadTimeout:
                self._count("header_timeouts")
                log.info("http proxy: %s did not send a complete request head within %gs",
                         client, settings.header_timeout)
                await self._send_error(cp, 408, f"the request line and headers did not arrive within "
                                                f"{settings.header_timeout:g}s")
                return True
            except (PeerGone, PeerTimeout):
                return False
            first = False
            if type(event) is not h11.Request:
                return False  # ConnectionClosed (or PAUSED, which cannot happen here)
            try:
                await self._handle_request(cp, event, client, dst, pool, settings)
            except (PeerGone, PeerTimeout):
                return False
            if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                conn.start_next_cycle()
                continue
            # The response went out but the request body was not read: close gently.
            return (conn.our_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED)
                    and conn.their_state is h11.SEND_BODY)

    async def _next_request(self, cp: Peer, settings: ProxySettings, first: bool):
        """The next request head (or the end of the connection).

        Waiting for its first byte: at most ``idle_timeout`` between requests, and no
        longer than ``header_timeout`` for the first one (then a quiet close). From the
        first byte on, the whole head must arrive within ``header_timeout``
        (``_HeadTimeout``): a deadline, so bytes trickled one at a time cannot hold the
        connection open (h11 already bounds the head to ``max_header_bytes``)."""
        conn = cp.conn
        deadline = None
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            now = trio.current_time()
            if deadline is None and conn.trailing_data[0]:
                deadline = now + settings.header_timeout  # part of the head is already here
            if deadline is None:
                wait = min(settings.idle_timeout, settings.header_timeout) if first else settings.idle_timeout
                data = await cp.receive(wait)
                deadline = trio.current_time() + settings.header_timeout
            else:
                if now >= deadline:
                    raise _HeadTimeout()
                try:
                    data = await cp.receive(deadline - now)
                except PeerTimeout:
                    raise _HeadTimeout() from None
            conn.receive_data(data)

    async def _handle_request(self, cp: Peer, req: h11.Request, client, dst,
                              pool: OriginPool, settings: ProxySettings) -> None:
        self._count("requests")
        has_body = _has_body(req)
        if not has_body:
            # Read the (empty) end of the request now, so an error answer keeps the
            # connection alive.
            try:
                event = await cp.next_event(timeout=settings.idle_timeout)
            except h11.RemoteProtocolError as e:
                self._count("bad_requests")
                await self._send_error(cp, e.error_status_hint, f"malformed request: {e}")
                return
            if type(event) is not h11.EndOfMessage:
                raise PeerGone(cp)
        if req.method == b"CONNECT":
            await self._handle_connect(cp, req, client, settings, has_body)
            return
        try:
            target = _parse_target(req, dst)
            if _via_hops(req.headers) >= _MAX_VIA_HOPS:
                raise _Fail(508, "request loop detected (it has passed through netkit too often)")
            if not settings.allowed(target.host, target.port):
                self._count("denied")
                log.info("http proxy: %s %s:%d denied by the allow list", client,
                         target.host, target.port)
                raise _Fail(403, settings.deny_text(target.host))
        except _Fail as f:
            if f.status == 400:
                self._count("bad_requests")
            await self._send_error(cp, f.status, f.message)
            return
        upstream = settings.upstream_for(target.host, target.port, tls=False)
        log.debug("http proxy: %s %s http://%s%s via %s", client, req.method.decode("latin-1"),
                  target.authority, target.path.decode("latin-1"), upstream or "direct")
        via = "proxy" if dst is None else "transparent-proxy"
        await self._forward(cp, req, target, upstream, has_body, pool, settings, Outbound(
            client, via, (target.host, target.port), upstream))

    async def _send_error(self, cp: Peer, status: int, message: str) -> None:
        """Answer with ``status`` if no response has started (else nothing)."""
        conn = cp.conn
        self._count(f"status_{status}")
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        if status == 403:
            text = message if message.endswith("\n") else message + "\n"
        else:
            text = f"netkit proxy: {message}\n"
        body = text.encode("utf-8", "replace")
        headers = [(b"Content-Type", b"text/plain; charset=utf-8"),
                   (b"Content-Length", str(len(body)).encode()),
                   (b"Via", VIA)]
        if conn.their_state not in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED,
                                    h11.MIGHT_SWITCH_PROTOCOL):
            headers.append((b"Connection", b"close"))
        try:
            await cp.send(h11.Response(status_code=status, reason=_reason(status), headers=headers))
            await cp.send(h11.Data(data=body))
            await cp.send(h11.EndOfMessage())
        except (PeerGone, h11.LocalProtocolError):
            pass

    async def _open_stream(self, host: str, port: int, settings: ProxySettings,
                           label: str, outbound: Outbound) -> trio.abc.Stream:
        try:
            with trio.fail_after(settings.connect_timeout):
                return await self._connect(host, port, outbound)
        except Refused as e:
            if e.reason == "denied":
                self._count("policy_denied")
                log.info("http proxy: %s: %s", outbound.client, e.message)
                raise _Fail(403, f"netkit proxy: {e.message}") from None
            if e.reason == "busy":
                self._count("lookups_busy")
                raise _Fail(503, e.message) from None
            self._count("connect_errors")
            raise _Fail(502, e.message) from None
        except trio.TooSlowError:
            self._count("connect_timeouts")
            raise _Fail(504, f"timed out after {settings.connect_timeout:g}s connecting to {label}") from None
        except (OSError, trio.BrokenResourceError, ValueError) as e:
            self._count("connect_errors")
            raise _Fail(502, f"cannot connect to {label}: {_describe(e)}") from None

    async def _forward(self, cp: Peer, req: h11.Request, target: _Target,
                       upstream: Upstream | None, has_body: bool, pool: OriginPool,
                       settings: ProxySettings, outbound: Outbound) -> None:
        headers = [(b"Host", target.authority.encode("ascii"))] + _end_to_end(req.headers)
        chunked, length = _framing(req.headers)
        if chunked:
            headers.append((b"Transfer-Encoding", b"chunked"))
        elif length is not None:
            headers.append((b"Content-Length", length))
        headers.append((b"Via", VIA))
        if upstream is not None:
            if upstream.authorization:
                headers.append((b"Proxy-Authorization", upstream.authorization))
            # Per origin: the policy was asked about this origin when the connection
            # was made, so a pooled one never carries a request for another origin.
            key = (*upstream.key, target.host, target.port)
            out_target = target.absolute
            label = f"upstream proxy {upstream}"
        else:
            key = ("origin", target.host, target.port)
            out_target = target.path
            label = _authority(target.host, target.port)
        request = h11.Request(method=req.method, target=out_target, headers=headers)
        retry_ok = not has_body and req.method in _IDEMPOTENT
        for attempt in (0, 1):
            origin = await pool.take(key) if attempt == 0 else None
            reused = origin is not None
            if origin is None:
                try:
                    if upstream is not None:
                        stream = await self._open_stream(upstream.host, upstream.port, settings, label,
                                                         outbound)
                    else:
                        stream = await self._open_stream(target.host, target.port, settings, label,
                                                         outbound)
                except _Fail as f:
                    log.info("http proxy: %s", f.message)
                    await self._send_error(cp, f.status, f.message)
                    return
                origin = Peer(stream, h11.Connection(
                    h11.CLIENT, max_incomplete_event_size=settings.max_header_bytes))
            try:
                ex = await self._exchange(cp, origin, request, has_body, settings, upstream, label)
            except BaseException:
                await trio.aclose_forcefully(origin.stream)
                raise
            conn = origin.conn
            if (ex.fail is None and not ex.abort and conn.our_state is h11.DONE
                    and conn.their_state is h11.DONE):
                conn.start_next_cycle()
                if pool.put(key, origin, settings.pool_idle_timeout):
                    return
            await trio.aclose_forcefully(origin.stream)
            if ex.fail is None and not ex.abort:
                return
            if (ex.fail is not None and ex.fail.retryable and reused and retry_ok
                    and attempt == 0 and origin.received == 0):
                self._count("retries")
                continue
            if ex.abort or ex.response_started:
                self._count("aborted")
                raise PeerGone(cp)
            log.info("http proxy: %s %s: %s", req.method.decode("latin-1"),
                     target.authority, ex.fail.message)
            await self._send_error(cp, ex.fail.status, ex.fail.message)
            return

    async def _exchange(self, cp: Peer, op: Peer, request: h11.Request, has_body: bool,
                        settings: ProxySettings, upstream: Upstream | None, label: str) -> _Exchange:
        """Send ``request`` to ``op`` and relay the response to ``cp``, streaming the
        request body concurrently. Never raises for I/O or protocol errors."""
        ex = _Exchange(request_done=not has_body)
        op.received = 0  # bytes from the origin in this exchange (a retry needs none)
        try:
            await op.send(request)
            if not has_body:
                await op.send(h11.EndOfMessage())
        except PeerGone:
            ex.set_fail(_Fail(502, f"{label} closed the connection", retryable=True))
            return ex
        deadline = trio.current_time() + settings.response_timeout if ex.request_done else math.inf
        response_scope = trio.CancelScope(deadline=deadline)

        async def pump_request(cancel) -> None:
            try:
                while True:
                    event = await cp.next_event(timeout=settings.idle_timeout)
                    if type(event) is h11.Data:
                        await op.send(h11.Data(data=event.data))
                        self._count("request_bytes", len(event.data))
                    elif type(event) is h11.EndOfMessage:
                        ex.request_done = True  # (read from the client: keep-alive is fine)
                        await op.send(h11.EndOfMessage())
                        if not ex.response_started:
                            response_scope.deadline = trio.current_time() + settings.response_timeout
                        return
                    else:
                        raise PeerGone(cp)
            except h11.RemoteProtocolError as e:
                ex.set_fail(_Fail(400, f"malformed request body: {e}"))
                cancel()
            except (PeerGone, PeerTimeout) as e:
                if e.peer is op:
                    # The origin stopped reading; its response (if any) still counts.
                    if not ex.response_started:
                        response_scope.deadline = min(
                            response_scope.deadline,
                            trio.current_time() + settings.response_timeout)
                    return
                if isinstance(e, PeerTimeout):
                    ex.set_fail(_Fail(408, "the request body stopped arriving"))
                else:
                    ex.set_abort()
                cancel()

        async def relay_response(cancel) -> None:
            try:
                await self._relay_response(cp, op, ex, response_scope, settings, upstream, label)
                ex.response_done = True
            except _Fail as f:
                ex.set_fail(f)
            except h11.RemoteProtocolError as e:
                if ex.response_started:
                    ex.set_abort()
                elif op.received == 0:
                    ex.set_fail(_Fail(502, f"{label} closed the connection without a response",
                                      retryable=True))
                else:
                    ex.set_fail(_Fail(502, f"bad response from {label}: {e}"))
            except PeerTimeout as e:
                if e.peer is op and not ex.response_started:
                    ex.set_fail(_Fail(504, f"{label} stopped sending"))
                else:
                    ex.set_abort()
            except PeerGone as e:
                if e.peer is op and not ex.response_started:
                    ex.set_fail(_Fail(502, f"{label} closed the connection without a response",
                                      retryable=True))
                else:
                    ex.set_abort()
            except h11.LocalProtocolError as e:
                log.info("http proxy: cannot relay the response of %s: %s", label, e)
                if ex.response_started:
                    ex.set_abort()
                else:
                    ex.set_fail(_Fail(502, f"cannot relay the response of {label}: {e}"))
            cancel()  # done (or failed): stop pumping a request body nobody will read

        async with trio.open_nursery() as nursery:
            cancel = nursery.cancel_scope.cancel
            if has_body:
                nursery.start_soon(pump_request, cancel)
            nursery.start_soon(relay_response, cancel)
        return ex

    async def _relay_response(self, cp: Peer, op: Peer, ex: _Exchange,
                              response_scope: trio.CancelScope, settings: ProxySettings,
                              upstream: Upstream | None, label: str) -> None:
        head = None
        with response_scope:
            while True:
                event = await op.next_event()
                if type(event) is h11.InformationalResponse:
                    if event.status_code == 101:
                        raise _Fail(502, f"{label} tried to switch protocols")
                    await cp.send(h11.InformationalResponse(
                        status_code=event.status_code, reason=event.reason,
                        headers=_end_to_end(event.headers) + [(b"Via", VIA)]))
                    continue
                head = event
                break
        if head is None:
            self._count("response_timeouts")
            raise _Fail(504, f"no response from {label} within {settings.response_timeout:g}s")
        if type(head) is not h11.Response:
            raise PeerGone(op)
        if upstream is not None and head.status_code == 407:
            raise _Fail(502, f"upstream proxy {upstream} requires authentication (407): "
                             "put user:password@ in the proxy URL")
        headers = _end_to_end(head.headers)
        chunked, length = _framing(head.headers)
        if length is not None:
            headers.append((b"Content-Length", length))
        headers.append((b"Via", VIA))
        if cp.conn.their_state is not h11.DONE:
            # An early answer: the rest of the request body will not be read.
            headers.append((b"Connection", b"close"))
        ex.response_started = True
        await cp.send(h11.Response(status_code=head.status_code, reason=head.reason,
                                   headers=headers))
        while True:
            event = await op.next_event(timeout=settings.idle_timeout)
            if type(event) is h11.Data:
                await cp.send(h11.Data(data=event.data))
                self._count("response_bytes", len(event.data))
            elif type(event) is h11.EndOfMessage:
                await cp.send(h11.EndOfMessage())  # trailers are dropped
                return
            else:
                raise PeerGone(op)

    # --- CONNECT and tunnels -----------------------------------------------------------

    async def _handle_connect(self, cp: Peer, req: h11.Request, client,
                              settings: ProxySettings, has_body: bool) -> None:
        self._count("connect_requests")
        if has_body:
            await self._send_error(cp, 400, "CONNECT with a body")
            return
        try:
            host, port = split_authority(req.target.decode("ascii"), 443)
        except (ValueError, UnicodeDecodeError):
            self._count("bad_requests")
            await self._send_error(cp, 400, "CONNECT needs host:port")
            return
        if not settings.allowed(host, port):
            self._count("denied")
            log.info("http proxy: %s CONNECT %s:%d denied by the allow list", client, host, port)
            await self._send_error(cp, 403, settings.deny_text(host))
            return
        upstream = settings.upstream_for(host, port, tls=True)
        log.debug("http proxy: %s CONNECT %s:%d via %s", client, host, port, upstream or "direct")
        try:
            remote, leftover = await self._open_tunnel(host, port, upstream, settings,
                                                       Outbound(client, "proxy", (host, port), upstream))
        except _Fail as f:
            log.info("http proxy: CONNECT %s:%d: %s", host, port, f.message)
            await self._send_error(cp, f.status, f.message)
            return
        try:
            await cp.send(h11.Response(status_code=200, reason=b"Connection established",
                                       headers=[(b"Via", VIA)]))
            data, closed = cp.conn.trailing_data
            self._count("tunnels")
            await splice(cp.stream, remote, a_to_b=data, b_to_a=leftover, a_eof=closed,
                         counts=self._stats)
        finally:
            await trio.aclose_forcefully(remote)

    async def _open_tunnel(self, host: str, port: int, upstream: Upstream | None,
                           settings: ProxySettings, outbound: Outbound) -> tuple[trio.abc.Stream, bytes]:
        """A byte stream to ``host:port``, direct or through ``upstream`` (CONNECT);
        plus bytes the upstream already sent past its response."""
        authority = _authority(host, port)
        if upstream is None:
            return await self._open_stream(host, port, settings, authority, outbound), b""
        label = f"upstream proxy {upstream}"
        stream = await self._open_stream(upstream.host, upstream.port, settings, label, outbound)
        ok = False
        try:
            peer = Peer(stream, h11.Connection(
                h11.CLIENT, max_incomplete_event_size=settings.max_header_bytes))
            headers = [(b"Host", authority.encode("ascii")), (b"Via", VIA)]
            if upstream.authorization:
                headers.append((b"Proxy-Authorization", upstream.authorization))
            await peer.send(h11.Request(method=b"CONNECT", target=authority.encode("ascii"),
                                        headers=headers))
            await peer.send(h11.EndOfMessage())
            event = None
            with trio.move_on_after(settings.response_timeout):
                event = await peer.next_event()
                while type(event) is h11.InformationalResponse:
                    event = await peer.next_event()
            if event is None:
                self._count("response_timeouts")
                raise _Fail(504, f"{label} did not answer CONNECT {authority} "
                                 f"within {settings.response_timeout:g}s")
            if type(event) is not h11.Response:
                raise PeerGone(peer)
            status = event.status_code
            if 200 <= status < 300:
                ok = True
                return stream, peer.conn.trailing_data[0]
            reason = event.reason.decode("latin-1")
            if status == 407:
                raise _Fail(502, f"{label} requires authentication (407): "
                                 "put user:password@ in the proxy URL")
            raise _Fail(status if 400 <= status < 600 else 502,
                        f"{label} refused CONNECT {authority}: {status} {reason}")
        except PeerGone:
            raise _Fail(502, f"{label} closed the connection") from None
        except h11.RemoteProtocolError as e:
            raise _Fail(502, f"bad response from {label}: {e}") from None
        finally:
            if not ok:
                await trio.aclose_forcefully(stream)

    async def _serve_tls(self, stream, client, dst: tuple[str, int]) -> None:
        settings = self._settings
        buf = bytearray()
        eof = False
        result = parse_client_hello_untrusted(buf)
        with trio.move_on_after(settings.sni_timeout):
            while not result.done and len(buf) < MAX_CLIENT_HELLO:
                try:
                    data = await stream.receive_some(RECV_SIZE)
                except STREAM_ERRORS:
                    return
                if not data:
                    eof = True
                    break
                buf += data
                if len(buf) >= result.need:
                    result = parse_client_hello_untrusted(buf)
        if not result.done:
            result = parse_client_hello_untrusted(buf)
        self._count(f"sni_{result.status.value}")
        host = result.server_name if result.status is SniStatus.FOUND else dst[0]
        port = dst[1]
        if not settings.allowed(host, port):
            self._count("denied")
            log.info("http proxy: %s TLS to %s:%d denied by the allow list", client, host, port)
            return
        upstream = settings.upstream_for(host, port, tls=True)
        log.debug("http proxy: %s TLS %s:%d (sni %s) via %s", client, host, port,
                  result.status.value, upstream or "direct")
        try:
            remote, leftover = await self._open_tunnel(
                host, port, upstream, settings, Outbound(client, "transparent-proxy", (host, port), upstream))
        except _Fail as f:
            # No HTTP here to answer with: the guest sees the connection close.
            log.info("http proxy: transparent TLS to %s:%d: %s", host, port, f.message)
            return
        try:
            self._count("tunnels")
            await splice(stream, remote, a_to_b=bytes(buf), b_to_a=leftover, a_eof=eof,
                         counts=self._stats)
        finally:
            await trio.aclose_forcefully(remote)


class GateConnector:
    """The proxy's way out: every connection goes through ``HostGate.open_proxy_stream``
    with the guest's address, the path (``via``) and the origin it asked for.

    ``port_of(guest_ip)`` may give the guest's switch port id for the policy hook. Built
    without a gate (a proxy used on its own, outside a switch), it uses one with the
    default ``Config`` and policy, so the cloud metadata address stays refused."""

    def __init__(self, gate=None, port_of: Callable[[ipaddress.IPv4Address], int | None] | None = None) -> None:
        if gate is None:
            from ..config import Config
            from ..nat.gate import HostGate
            from ..policy import Policy

            config = Config()
            gate = HostGate(config, Policy(config.allow, config.deny, config.default_deny))
        self.gate = gate
        self.port_of = port_of

    async def __call__(self, host: str, port: int, outbound: Outbound) -> trio.abc.Stream:
        try:
            guest = ipaddress.IPv4Address(str(outbound.client[0]))
        except (ValueError, IndexError, TypeError):
            raise Refused("denied", f"no IPv4 identity for client {outbound.client!r}") from None
        switch_port = self.port_of(guest) if self.port_of is not None else None
        upstream = (host, port) if outbound.upstream is not None else None
        return await self.gate.open_proxy_stream(
            guest, outbound.origin[0], outbound.origin[1], via=outbound.via, upstream=upstream,
            switch_port=switch_port)

