"""The control API server: HTTP/1.1 (h11) with JSON bodies on a unix stream socket.

It runs in the switch's own trio thread. Every route handler is a quick synchronous
call into the switch (add a forward, read the lease table, render statistics...), so
the data path is never blocked for longer than one such call; all waiting (reading a
slow client, writing to a client that does not read) happens in the API connection's
own task, bounded by an idle timeout.

Limits: request heads of at most 16 KiB, bodies of at most ``max_body`` bytes (413
beyond), ``max_connections`` API connections at once (503 beyond), and a connection
idle for ``idle_timeout`` seconds (between requests, or while a request or response
is stuck) is closed.

The socket is created mode 0600 (``fchmod`` before ``bind``, so it is never wider,
whatever the umask), and its directory is created mode 0700 if missing. A stale socket left
by a dead server is replaced; a live one, or anything that is not a socket, is not.

Routes (``netkit.api.server.ROUTES`` lists them):

=====================================  =============================================
``GET /health``                         liveness and a few counts
``GET /forwards``                       port forwards
``POST /forwards``                      ``{"proto","local","remote"}`` -> 201
``DELETE /forwards``                    ``proto`` and ``local`` in the body or query
``POST /services/forwarder/expose``     gvproxy: ``{"local","remote","protocol"}``
``POST /services/forwarder/unexpose``   gvproxy: ``{"local","protocol"}``
``GET /services/forwarder/all``         gvproxy: ``[{"local","remote","protocol"}]``
``GET /services/dhcp/leases``           gvproxy: ``{ip: mac}``
``GET /leases``                         DHCP leases
``GET /stats``                          frames, bytes, drops, flows, DNS, proxy...
``GET /connections``                    live TCP/UDP flows (``?protocol=``, ``?limit=``)
``GET /metrics``                        Prometheus text format
``GET|PUT /http-proxy``                 vpnkit's ``--http`` JSON (503 without a proxy)
``POST /dns/zones``                     ``{"name","records"}`` -> 201
``DELETE /dns/zones/NAME``              404 if there is no such zone
``GET|POST /pcap``                      ``{"action":"start","path",["max_bytes"]}`` or ``{"action":"stop"}``
=====================================  =============================================

Errors are JSON ``{"error": MESSAGE}`` with 400 (bad JSON, unknown or missing fields),
401 (bearer token required), 404, 405 (with ``Allow``), 409 (conflict), 413, 503.
The gvproxy routes answer as gvproxy does: 200 with an empty body, or a plain-text
message with 400 (bad request) or 500 (the forward could not be made or found).
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import hmac
import json
import logging
import os
import re
import socket
import stat
import sys
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Any, AsyncIterator, Callable
from urllib.parse import parse_qsl, unquote, urlsplit

import h11
import trio

from . import views

__all__ = ["serve_api", "open_api", "ApiServer", "ApiServerError", "ROUTES", "DEFAULT_MAX_BODY",
           "DEFAULT_IDLE_TIMEOUT", "DEFAULT_MAX_CONNECTIONS"]

log = logging.getLogger("netkit.api")

DEFAULT_MAX_BODY = 1 << 20
DEFAULT_IDLE_TIMEOUT = 30.0
DEFAULT_MAX_CONNECTIONS = 32
MAX_HEADER_BYTES = 16 * 1024
_READ_SIZE = 64 * 1024
#: Most connections ``GET /connections`` lists unless ``?limit=`` says otherwise.
DEFAULT_CONNECTIONS_LIMIT = 10000

_REASONS = {200: "OK", 201: "Created", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
            405: "Method Not Allowed", 408: "Request Timeout", 409: "Conflict", 413: "Content Too Large",
            500: "Internal Server Error", 503: "Service Unavailable"}


class ApiServerError(Exception):
    """The API socket cannot be created; the message says why."""


class ApiError(Exception):
    """A request fails with ``status``; ``message`` goes back to the client."""

    def __init__(self, status: int, message: str, *, headers: list[tuple[str, str]] | None = None,
                 plain: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or []
        self.plain = plain


@dataclass
class Request:
    method: str
    path: str
    query: list[tuple[str, str]]
    headers: dict[str, str]
    body: bytes
    params: dict[str, str] = field(default_factory=dict)

    def json(self, *, plain_errors: bool = False) -> Any:
        """The body as JSON (None if empty); 400 if it is not valid JSON."""
        if not self.body.strip():
            return None
        try:
            return json.loads(self.body, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as e:
            raise ApiError(400, f"malformed JSON body: {e}", plain=plain_errors) from None

    def query_dict(self, allowed: tuple[str, ...]) -> dict[str, str]:
        out: dict[str, str] = {}
        for key, value in self.query:
            if key not in allowed:
                raise ApiError(400, f"unknown query parameter {key!r}"
                                    + (f" (expected {', '.join(allowed)})" if allowed else ""))
            out[key] = value
        return out


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)


def _json_default(value: Any) -> Any:
    if isinstance(value, (IPv4Address, os.PathLike)):
        return str(value)
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, collections.Counter):
        return dict(value)
    return str(value)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def json_response(value: Any, status: int = 200) -> Response:
    try:
        text = json.dumps(value, default=_json_default, allow_nan=False)
    except ValueError:  # NaN or infinity somewhere: JSON has no such numbers
        text = json.dumps(_finite(value), default=_json_default, allow_nan=False)
    return Response(status, text.encode() + b"\n")


def error_response(error: ApiError) -> Response:
    if error.plain:
        return Response(error.status, error.message.encode() + b"\n", "text/plain; charset=utf-8",
                        list(error.headers))
    response = json_response({"error": error.message}, error.status)
    response.headers.extend(error.headers)
    return response


def _fields(value: Any, *, required: tuple[str, ...] = (), optional: tuple[str, ...] = (),
            plain: bool = False) -> dict[str, Any]:
    """A JSON object with exactly these keys; 400 naming what is wrong otherwise."""
    if not isinstance(value, dict):
        raise ApiError(400, "request body must be a JSON object", plain=plain)
    unknown = [k for k in value if k not in required and k not in optional]
    if unknown:
        expected = ", ".join(required + optional)
        raise ApiError(400, f"unknown field(s): {', '.join(map(repr, unknown))} (expected {expected})", plain=plain)
    missing = [k for k in required if k not in value]
    if missing:
        raise ApiError(400, f"missing field(s): {', '.join(map(repr, missing))}", plain=plain)
    return value


def _string(body: dict, key: str, *, plain: bool = False, default: str | None = None) -> str:
    value = body.get(key, default)
    if not isinstance(value, str) or not value:
        raise ApiError(400, f"{key!r} must be a non-empty string", plain=plain)
    return value


# ----------------------------------------------------------------------------- socket
def _socket_is_live(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(path)
    except BlockingIOError:  # backlog full: someone is listening
        return True
    except OSError:
        return False
    else:
        return True
    finally:
        probe.close()


def bind_unix_socket(path: str, *, backlog: int = 64) -> socket.socket:
    """A listening unix stream socket at ``path``, mode 0600 from the moment it exists."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise ApiServerError(f"{path}: {e.strerror}") from None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise ApiServerError(f"{path} exists and is not a socket (not removing it)")
        if _socket_is_live(path):
            raise ApiServerError(f"{path}: another server is listening on this socket")
        try:
            os.unlink(path)
        except OSError as e:
            raise ApiServerError(f"{path}: cannot remove the stale socket: {e.strerror}") from None
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        try:
            os.makedirs(parent, mode=0o700)
        except OSError as e:
            raise ApiServerError(f"{parent}: cannot create the socket's directory: {e.strerror}") from None
    else:
        owner = os.stat(parent).st_uid
        if owner not in (os.geteuid(), 0):
            raise ApiServerError(f"{parent} belongs to another user (uid {owner}); not creating the API socket there")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # Linux creates the socket's file with the socket inode's mode (minus the umask),
        # so an fchmod before bind means the file is 0600 from the moment it exists,
        # without touching the process-wide umask (other threads may be creating files).
        # Elsewhere, tighten the umask around bind instead.
        os.fchmod(sock.fileno(), 0o600)
        if sys.platform.startswith("linux"):
            sock.bind(path)
        else:  # pragma: no cover
            old = os.umask(0o177)
            try:
                sock.bind(path)
            finally:
                os.umask(old)
        os.chmod(path, 0o600)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        reason = e.strerror or str(e)
        if e.errno == errno.EADDRINUSE:
            reason = "address in use"
        raise ApiServerError(f"{path}: cannot listen: {reason}") from None
    return sock


# ----------------------------------------------------------------------------- server
Handler = Callable[[Request], Response]


class ApiServer:
    """The control API of one switch. ``bind()`` then ``await serve()``; or use
    ``serve_api`` / ``open_api``."""

    def __init__(self, switch, path: str, *, token: str | None = None, max_body: int = DEFAULT_MAX_BODY,
                 idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS) -> None:
        self.switch = switch
        self.path = path
        self.token = token or None
        self.max_body = max_body
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self._sock: socket.socket | None = None
        self._inode: tuple[int, int] | None = None
        self._started = trio.current_time()
        self._active = 0
        self._stats: collections.Counter[str] = collections.Counter()
        self._responses: collections.Counter[int] = collections.Counter()
        #: gvproxy forwards as their client named them: (proto, normalized local) -> (forward, local, remote).
        self._gv_names: dict[tuple[str, str], tuple[object, str, str]] = {}
        self._capture_path: str | None = None
        self._routes: list[tuple[re.Pattern, dict[str, Handler]]] = [
            (re.compile(pattern), {method: getattr(self, name) for method, name in methods.items()})
            for pattern, methods in ROUTES
        ]

    # ----- lifecycle -----
    def bind(self) -> None:
        """Create the socket now (raises ``ApiServerError`` with a reason)."""
        if self._sock is None:
            self._sock = bind_unix_socket(self.path)
            st = os.stat(self.path)
            self._inode = (st.st_dev, st.st_ino)

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self.bind()
        assert self._sock is not None
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(self._sock))
        log.info("control API listening on %s%s", self.path, " (bearer token required)" if self.token else "")
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(trio.serve_listeners, self._handle_connection, [listener])
                task_status.started(self)
        finally:
            self.close()

    def close(self) -> None:
        """Remove the socket file (if it is still ours)."""
        if self._sock is not None:
            self._sock.close()
        if self._inode is not None:
            try:
                st = os.lstat(self.path)
                if (st.st_dev, st.st_ino) == self._inode:
                    os.unlink(self.path)
            except OSError:
                pass
            self._inode = None

    def statistics(self) -> dict:
        return {"active_connections": self._active, "connections": self._stats["connections"],
                "rejected_connections": self._stats["rejected"], "requests": self._stats["requests"],
                "responses": dict(self._responses)}

    # ----- connections -----
    async def _handle_connection(self, stream: trio.SocketStream) -> None:
        try:
            if self._active >= self.max_connections:
                self._stats["rejected"] += 1
                await self._reject(stream)
                return
            self._active += 1
            self._stats["connections"] += 1
            try:
                await self._converse(stream)
            finally:
                self._active -= 1
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:  # never let one API client take the switch down
            log.exception("control API connection failed")
        finally:
            with trio.move_on_after(1) as scope:
                scope.shield = True
                await stream.aclose()

    async def _reject(self, stream: trio.SocketStream) -> None:
        body = json.dumps({"error": f"too many API connections (limit {self.max_connections})"}).encode() + b"\n"
        head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        self._responses[503] += 1
        with trio.move_on_after(1):
            await stream.send_all(head + body)
            await self._linger(stream, seconds=0.5, budget=_READ_SIZE)

    async def _converse(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        while True:
            response: Response | None = None
            request: Request | None = None
            with trio.move_on_after(self.idle_timeout):
                try:
                    request = await self._read_request(conn, stream)
                    if request is None:
                        return  # the client closed
                except ApiError as e:
                    response = error_response(e)
                except h11.RemoteProtocolError as e:
                    response = error_response(ApiError(e.error_status_hint, f"bad HTTP request: {e}"))
            if request is None and response is None:
                # Idle (or a request stuck half-way) for too long.
                started = conn.their_state is not h11.IDLE or bool(conn.trailing_data[0])
                if started and conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    response = error_response(ApiError(408, "request timed out"))
                else:
                    return
            if response is None:
                assert request is not None
                response = self.dispatch(request)
            # A request not read to its end (413, bad framing, timeout) ends the connection.
            close = conn.their_state is not h11.DONE
            with trio.move_on_after(self.idle_timeout) as scope:
                sent = await self._send_response(conn, stream, response, close=close)
            if scope.cancelled_caught or not sent:
                return
            if close:
                await self._linger(stream)
                return
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return

    async def _linger(self, stream: trio.SocketStream, *, seconds: float = 1.0, budget: int | None = None) -> None:
        """After an error answer to a request we did not read to its end: stop sending,
        and read (and discard) what the client is still sending for a little while, so
        closing does not reset the connection before the client has read the answer."""
        try:
            await stream.send_eof()
        except trio.ClosedResourceError:  # pragma: no cover
            return
        if budget is None:
            budget = 4 * self.max_body + MAX_HEADER_BYTES
        with trio.move_on_after(min(seconds, self.idle_timeout)):
            while budget > 0:
                data = await stream.receive_some(_READ_SIZE)
                if not data:
                    return
                budget -= len(data)

    async def _read_request(self, conn: h11.Connection, stream: trio.SocketStream) -> Request | None:
        head: h11.Request | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                if conn.they_are_waiting_for_100_continue:  # curl asks before bodies over 1 KiB
                    await stream.send_all(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
                data = await stream.receive_some(_READ_SIZE)
                conn.receive_data(data)
                continue
            if isinstance(event, h11.ConnectionClosed):
                return None
            if isinstance(event, h11.Request):
                head = event
                for name, value in event.headers:
                    if name == b"content-length" and int(value) > self.max_body:
                        raise ApiError(413, f"request body too large (limit {self.max_body} bytes)")
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > self.max_body:
                    raise ApiError(413, f"request body too large (limit {self.max_body} bytes)")
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                return self._make_request(head, bytes(body))
            elif event is h11.PAUSED:  # pragma: no cover - we never pipeline past a response
                return None

    def _make_request(self, head: h11.Request, body: bytes) -> Request:
        target = head.target.decode("latin-1")
        parts = urlsplit(target)
        headers: dict[str, str] = {}
        for name, value in head.headers:
            headers[name.decode("latin-1")] = value.decode("latin-1")
        try:
            query = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False)
        except ValueError:
            query = []
        return Request(head.method.decode("latin-1").upper(), parts.path or "/", query, headers, body)

    async def _send_response(self, conn: h11.Connection, stream: trio.SocketStream, response: Response, *,
                             close: bool) -> bool:
        self._responses[response.status] += 1
        headers = [("Content-Type", response.content_type), ("Content-Length", str(len(response.body))),
                   ("Cache-Control", "no-store"), *response.headers]
        if close:
            headers.append(("Connection", "close"))
        try:
            data = conn.send(h11.Response(status_code=response.status, headers=headers,
                                          reason=_REASONS.get(response.status, "").encode()))
            data += conn.send(h11.Data(data=response.body)) if response.body else b""
            data += conn.send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            return False
        await stream.send_all(data)
        return True

    # ----- routing -----
    def dispatch(self, request: Request) -> Response:
        """Answer one request (synchronously; handlers never await)."""
        self._stats["requests"] += 1
        try:
            self._authorize(request)
            handler = self._route(request)
            return handler(request)
        except ApiError as e:
            return error_response(e)
        except Exception as e:  # a handler's bug: 500, logged, the switch carries on
            log.exception("control API: %s %s failed", request.method, request.path)
            return error_response(ApiError(500, f"internal error: {type(e).__name__}: {e}"))

    def _authorize(self, request: Request) -> None:
        if self.token is None:
            return
        supplied = request.headers.get("authorization", "")
        scheme, _, credentials = supplied.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(credentials.strip().encode(), self.token.encode()):
            raise ApiError(401, "a valid bearer token is required (Authorization: Bearer TOKEN)",
                           headers=[("WWW-Authenticate", 'Bearer realm="netkit"')])

    def _route(self, request: Request) -> Handler:
        for pattern, methods in self._routes:
            match = pattern.fullmatch(request.path)
            if match is None:
                continue
            handler = methods.get(request.method)
            if handler is None:
                allow = ", ".join(sorted(methods))
                raise ApiError(405, f"method {request.method} not allowed on {request.path} (allowed: {allow})",
                               headers=[("Allow", allow)])
            request.params = {k: unquote(v) for k, v in match.groupdict().items()}
            return handler
        raise ApiError(404, f"no such endpoint: {request.path}")

    # ----- handlers: health -----
    def get_health(self, request: Request) -> Response:
        request.query_dict(())
        forwarder = self.switch.forwarder
        return json_response({"status": "ok", "uptime": round(trio.current_time() - self._started, 3),
                              "ports": len(self.switch.ports()), "leases": len(self.switch.leases()),
                              "forwards": len(forwarder.forwards()) if forwarder is not None else 0,
                              "capturing": bool(self.switch.capturing)})

    # ----- handlers: forwards -----
    def _forwarder(self, *, plain: bool = False):
        forwarder = self.switch.forwarder
        if forwarder is None:
            raise ApiError(503, "port forwarding is not available on this switch", plain=plain)
        return forwarder

    def get_forwards(self, request: Request) -> Response:
        request.query_dict(())
        return json_response([views.forward_view(f) for f in self._forwarder().forwards()])

    def post_forwards(self, request: Request) -> Response:
        from ..forward import ForwardError

        request.query_dict(())
        body = _fields(request.json(), required=("local", "remote"), optional=("proto",))
        proto = _string(body, "proto", default="tcp")
        local = _string(body, "local")
        remote = _string(body, "remote")
        try:
            forward = self._forwarder().add(proto, local, remote)
        except ForwardError as e:
            raise ApiError(_forward_error_status(e), str(e)) from None
        return json_response(views.forward_view(forward), 201)

    def delete_forwards(self, request: Request) -> Response:
        query = request.query_dict(("proto", "local"))
        body = request.json()
        if body is None:
            body = query
        elif query:
            raise ApiError(400, "give proto and local in the body or in the query, not both")
        body = _fields(body, required=("local",), optional=("proto",))
        proto = _string(body, "proto", default="tcp")
        local = _string(body, "local")
        found = _remove_forward(self._forwarder(), proto, local)
        if found is None:
            raise ApiError(404, f"no {proto} forward on {local}")
        return json_response({"removed": views.forward_view(found)})

    # ----- handlers: gvproxy's forwarder -----
    def gv_expose(self, request: Request) -> Response:
        from ..forward import ForwardError

        body = _fields(request.json(plain_errors=True), required=("local", "remote"), optional=("protocol",),
                       plain=True)
        proto = body.get("protocol") or "tcp"
        if not isinstance(proto, str):
            raise ApiError(400, "'protocol' must be a string", plain=True)
        local = _string(body, "local", plain=True)
        remote = _string(body, "remote", plain=True)
        target = remote
        if proto == "unix":
            # gvproxy names the guest end of a unix forward as a URI: tcp://IP:PORT.
            scheme, sep, rest = remote.partition("://")
            if sep:
                if scheme != "tcp":
                    raise ApiError(500, f"remote protocol for unix forwarder is not implemented: {scheme}",
                                   plain=True)
                target = rest.rstrip("/")
        if target.startswith(":"):
            raise ApiError(400, "remote must name the guest's IP (IP:PORT): a unix-socket client has no IP "
                                "to default to", plain=True)
        try:
            forward = self._forwarder(plain=True).add(proto, local, target)
        except ForwardError as e:
            raise ApiError(500, str(e), plain=True) from None
        self._gv_names[(forward.proto, forward.local)] = (forward, local, remote)
        return Response(200, b"", "text/plain; charset=utf-8")

    def gv_unexpose(self, request: Request) -> Response:
        body = _fields(request.json(plain_errors=True), required=("local",), optional=("protocol",), plain=True)
        proto = body.get("protocol") or "tcp"
        if not isinstance(proto, str):
            raise ApiError(400, "'protocol' must be a string", plain=True)
        local = _string(body, "local", plain=True)
        found = _remove_forward(self._forwarder(plain=True), proto, local)
        if found is None:
            raise ApiError(500, "proxy not found", plain=True)
        self._gv_names.pop((found.proto, found.local), None)
        return Response(200, b"", "text/plain; charset=utf-8")

    def gv_all(self, request: Request) -> Response:
        out = []
        for forward in self._forwarder(plain=True).forwards():
            named = self._gv_names.get((forward.proto, forward.local))
            if named is not None and named[0] is forward:
                local, remote = named[1], named[2]
            else:
                local, remote = forward.local, forward.remote
            out.append({"local": local, "remote": remote, "protocol": forward.proto})
        out.sort(key=lambda d: (d["local"], d["protocol"]))
        return json_response(out)

    def gv_dhcp_leases(self, request: Request) -> Response:
        return json_response({lease["ip"]: lease["mac"] for lease in views.leases_view(self.switch)})

    # ----- handlers: state -----
    def get_leases(self, request: Request) -> Response:
        request.query_dict(())
        return json_response(views.leases_view(self.switch))

    def get_stats(self, request: Request) -> Response:
        request.query_dict(())
        return json_response(views.stats_view(self.switch, self.statistics()))

    def get_connections(self, request: Request) -> Response:
        query = request.query_dict(("protocol", "limit"))
        protocol = query.get("protocol") or None
        if protocol not in (None, "tcp", "udp"):
            raise ApiError(400, "protocol must be tcp or udp")
        limit = DEFAULT_CONNECTIONS_LIMIT
        if "limit" in query:
            try:
                limit = int(query["limit"])
            except ValueError:
                raise ApiError(400, "limit must be an integer") from None
            if limit < 0:
                raise ApiError(400, "limit must not be negative")
        return json_response(views.connections_view(self.switch, protocol=protocol, limit=limit))

    def get_metrics(self, request: Request) -> Response:
        request.query_dict(())
        text = views.render_metrics(self.switch, self.statistics())
        return Response(200, text.encode(), "text/plain; version=0.0.4; charset=utf-8")

    # ----- handlers: HTTP proxy -----
    def _proxy(self):
        proxy = self.switch.http_proxy
        if proxy is None:
            raise ApiError(503, "the HTTP proxy is not enabled on this switch")
        return proxy

    def get_http_proxy(self, request: Request) -> Response:
        request.query_dict(())
        return json_response(self._proxy().settings.to_vpnkit_json())

    def put_http_proxy(self, request: Request) -> Response:
        from ..config import ConfigError
        from ..http_proxy.settings import VPNKIT_KEYS, ProxySettings

        request.query_dict(())
        proxy = self._proxy()
        body = request.json()
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object (vpnkit's --http settings)")
        known = set(VPNKIT_KEYS) | {"allow"} | {f.name for f in dataclasses.fields(ProxySettings) if f.init}
        unknown = [k for k in body if k.replace("-", "_") not in known]
        if unknown:
            raise ApiError(400, f"unknown field(s): {', '.join(map(repr, unknown))} (expected "
                                f"{', '.join(VPNKIT_KEYS)}, allow, or another ProxySettings field)")
        try:
            settings = ProxySettings.from_vpnkit_json(body, base=proxy.settings)
        except (ConfigError, TypeError, ValueError) as e:
            raise ApiError(400, str(e)) from None
        proxy.reconfigure(settings)
        return json_response(proxy.settings.to_vpnkit_json())

    # ----- handlers: DNS -----
    def _dns(self):
        dns = self.switch.dns
        if dns is None:
            raise ApiError(503, "the DNS service is not running on this switch")
        return dns

    def post_dns_zones(self, request: Request) -> Response:
        request.query_dict(())
        body = _fields(request.json(), required=("name", "records"))
        name = _string(body, "name")
        records = body["records"]
        if isinstance(records, list):
            triples = []
            for i, record in enumerate(records):
                if (not isinstance(record, list) or len(record) != 3
                        or not all(isinstance(part, str) for part in record)):
                    raise ApiError(400, f"records[{i}] must be [name, type, value] (three strings)")
                triples.append(tuple(record))
            records = triples
        elif not isinstance(records, str):
            raise ApiError(400, "records must be a list of [name, type, value] or zone-file text")
        try:
            self._dns().add_zone(name, records)
        except ValueError as e:
            raise ApiError(400, f"zone {name}: {e}") from None
        return json_response({"name": name, "records": len(records) if isinstance(records, list) else None}, 201)

    def delete_dns_zone(self, request: Request) -> Response:
        request.query_dict(())
        name = request.params["name"]
        if not self._dns().remove_zone(name):
            raise ApiError(404, f"no such zone: {name}")
        return json_response({"removed": name})

    # ----- handlers: capture -----
    def get_pcap(self, request: Request) -> Response:
        request.query_dict(())
        capturing = bool(self.switch.capturing)
        return json_response({"capturing": capturing, "path": self._capture_path if capturing else None})

    def post_pcap(self, request: Request) -> Response:
        from ..switch import SwitchError

        request.query_dict(())
        body = request.json()
        if not isinstance(body, dict) or "action" not in body:
            raise ApiError(400, 'body must be {"action": "start", "path": FILE} or {"action": "stop"}')
        action = body["action"]
        if action == "start":
            body = _fields(body, required=("action", "path"), optional=("max_bytes",))
            path = _string(body, "path")
            if not os.path.isabs(path):
                raise ApiError(400, f"path must be absolute (the switch's working directory is not yours): {path}")
            max_bytes = body.get("max_bytes")
            if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int)
                                          or max_bytes <= 0):
                raise ApiError(400, "max_bytes must be a positive integer")
            try:
                self.switch.start_capture(path, max_bytes=max_bytes)
            except SwitchError as e:
                raise ApiError(409, str(e)) from None
            except OSError as e:
                raise ApiError(400, f"cannot write {path}: {e.strerror or e}") from None
            self._capture_path = path
            return json_response({"capturing": True, "path": path})
        if action == "stop":
            _fields(body, required=("action",))
            path = self.switch.stop_capture()
            self._capture_path = None
            return json_response({"capturing": False, "path": path, "stopped": path is not None})
        raise ApiError(400, f"action must be 'start' or 'stop', not {action!r}")


def _forward_error_status(error: Exception) -> int:
    text = str(error)
    return 409 if ("already" in text or "in use" in text) else 400


def _remove_forward(forwarder, proto: str, local: str):
    """Remove the forward (the forwarder normalizes ``local``); return it, or None."""
    before = forwarder.forwards()
    if not forwarder.remove(proto, local):
        return None
    after = set(forwarder.forwards())
    gone = [f for f in before if f not in after]
    return gone[0] if gone else None


#: (path regex, {method: ApiServer handler name}).
ROUTES: list[tuple[str, dict[str, str]]] = [
    ("/health", {"GET": "get_health"}),
    ("/forwards", {"GET": "get_forwards", "POST": "post_forwards", "DELETE": "delete_forwards"}),
    ("/services/forwarder/expose", {"POST": "gv_expose"}),
    ("/services/forwarder/unexpose", {"POST": "gv_unexpose"}),
    ("/services/forwarder/all", {"GET": "gv_all"}),
    ("/services/dhcp/leases", {"GET": "gv_dhcp_leases"}),
    ("/leases", {"GET": "get_leases"}),
    ("/stats", {"GET": "get_stats"}),
    ("/connections", {"GET": "get_connections"}),
    ("/metrics", {"GET": "get_metrics"}),
    ("/http-proxy", {"GET": "get_http_proxy", "PUT": "put_http_proxy"}),
    ("/dns/zones", {"POST": "post_dns_zones"}),
    ("/dns/zones/(?P<name>[^/]+)", {"DELETE": "delete_dns_zone"}),
    ("/pcap", {"GET": "get_pcap", "POST": "post_pcap"}),
]


async def serve_api(switch, path: str, *, token: str | None = None, task_status=trio.TASK_STATUS_IGNORED,
                    **limits) -> None:
    """Serve the control API of ``switch`` on a unix socket at ``path`` until cancelled.

    ``task_status.started(server)`` is called once the socket listens (mode 0600). Raises
    ``ApiServerError`` (before starting) if the socket cannot be created. ``limits``:
    ``max_body``, ``idle_timeout``, ``max_connections``.
    """
    server = ApiServer(switch, path, token=token, **limits)
    server.bind()
    await server.serve(task_status=task_status)


@asynccontextmanager
async def open_api(switch, path: str | None, *, token: str | None = None, **limits) -> AsyncIterator[ApiServer | None]:
    """Serve the control API for the duration of the block (nothing when ``path`` is None).

    The socket is created on entry, so ``ApiServerError`` is raised there, not from
    inside a nursery.
    """
    if path is None:
        yield None
        return
    server = ApiServer(switch, path, token=token, **limits)
    server.bind()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            try:
                yield server
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
    finally:
        server.close()
