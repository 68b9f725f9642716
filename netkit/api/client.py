"""A small synchronous client for the control API (the ``netkit`` CLI uses it).

    from netkit.api.client import ApiClient
    with ApiClient("/run/netkit/api.sock") as api:
        api.expose("tcp", "127.0.0.1:8080", "192.168.65.3:80")
        print(api.connections())

Errors: ``ApiUnavailable`` when nothing answers on the socket (missing, refused,
permission denied, timed out), ``ApiRequestError`` when the server answers with an
error status (``.status`` and the server's ``.message``).
"""

from __future__ import annotations

import errno
import http.client
import json
import os
import socket
from typing import Any
from urllib.parse import quote, urlencode

from .paths import default_api_path

__all__ = ["ApiClient", "ApiClientError", "ApiUnavailable", "ApiRequestError", "UnixHTTPConnection"]


class ApiClientError(Exception):
    """Base of the client's errors; ``str()`` is a message for a person."""


class ApiUnavailable(ApiClientError):
    """No API server answers on the socket."""


class ApiRequestError(ApiClientError):
    """The server answered with an error status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{message} (HTTP {status})")
        self.status = status
        self.message = message


class UnixHTTPConnection(http.client.HTTPConnection):
    """``http.client`` over a unix stream socket."""

    def __init__(self, path: str, timeout: float | None = 10.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.unix_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class ApiClient:
    """Talks to ``netkit-switch --api PATH``; one keep-alive connection, reopened as needed."""

    def __init__(self, path: str | None = None, *, token: str | None = None, timeout: float = 10.0) -> None:
        self.path = path or default_api_path()
        self.token = token
        self.timeout = timeout
        self._conn: UnixHTTPConnection | None = None

    def __enter__(self) -> "ApiClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # ----- transport -----
    def request(self, method: str, target: str, body: Any = None, *, raw: bool = False) -> Any:
        """Send a request; return the decoded JSON (or text, or None for an empty body)."""
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json"}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        for attempt in (0, 1):
            reused = self._conn is not None
            if self._conn is None:
                self._conn = UnixHTTPConnection(self.path, timeout=self.timeout)
            try:
                self._conn.request(method, target, body=payload, headers=headers)
                response = self._conn.getresponse()
                data = response.read()
                status = response.status
                content_type = response.getheader("Content-Type", "")
                if response.will_close:
                    self.close()
                break
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as e:
                self.close()
                if reused and attempt == 0:
                    continue  # the server closed an idle keep-alive connection: retry once
                raise ApiUnavailable(f"the API server at {self.path} closed the connection: {e}") from None
            except OSError as e:
                self.close()
                raise ApiUnavailable(_explain(self.path, e)) from None
            except http.client.HTTPException as e:
                self.close()
                raise ApiUnavailable(f"bad answer from {self.path}: {e!r}") from None
        text = data.decode("utf-8", errors="replace")
        is_json = content_type.startswith("application/json")
        if status >= 400:
            message = text.strip()
            if is_json:
                try:
                    message = json.loads(text).get("error", message)
                except (ValueError, AttributeError):
                    pass
            raise ApiRequestError(status, message or http.client.responses.get(status, "error"))
        if raw or not is_json:
            return text
        return json.loads(text) if text.strip() else None

    # ----- routes -----
    def health(self) -> dict:
        return self.request("GET", "/health")

    def forwards(self) -> list[dict]:
        return self.request("GET", "/forwards")

    def expose(self, proto: str, local: str, remote: str) -> dict:
        return self.request("POST", "/forwards", {"proto": proto, "local": local, "remote": remote})

    def unexpose(self, proto: str, local: str) -> dict:
        return self.request("DELETE", "/forwards", {"proto": proto, "local": local})

    def leases(self) -> list[dict]:
        return self.request("GET", "/leases")

    def stats(self) -> dict:
        return self.request("GET", "/stats")

    def connections(self, *, protocol: str | None = None, limit: int | None = None) -> dict:
        query = {k: v for k, v in (("protocol", protocol), ("limit", limit)) if v is not None}
        return self.request("GET", "/connections" + (f"?{urlencode(query)}" if query else ""))

    def metrics(self) -> str:
        return self.request("GET", "/metrics", raw=True)

    def http_proxy(self) -> dict:
        return self.request("GET", "/http-proxy")

    def set_http_proxy(self, settings: dict) -> dict:
        return self.request("PUT", "/http-proxy", settings)

    def add_zone(self, name: str, records: list | str) -> dict:
        return self.request("POST", "/dns/zones", {"name": name, "records": records})

    def remove_zone(self, name: str) -> dict:
        return self.request("DELETE", "/dns/zones/" + quote(name, safe=""))

    def capture_start(self, path: str, max_bytes: int | None = None) -> dict:
        body: dict[str, Any] = {"action": "start", "path": os.path.abspath(path)}
        if max_bytes is not None:
            body["max_bytes"] = max_bytes
        return self.request("POST", "/pcap", body)

    def capture_stop(self) -> dict:
        return self.request("POST", "/pcap", {"action": "stop"})

    def capture_status(self) -> dict:
        return self.request("GET", "/pcap")


def _explain(path: str, error: OSError) -> str:
    if isinstance(error, FileNotFoundError) or error.errno == errno.ENOENT:
        return (f"no netkit API socket at {path} (is netkit-switch running with --api {path}? "
                "Use --api PATH or $NETKIT_API to name another socket)")
    if isinstance(error, ConnectionRefusedError) or error.errno == errno.ECONNREFUSED:
        return f"nothing is listening on {path} (a stale socket: is netkit-switch still running?)"
    if isinstance(error, PermissionError) or error.errno in (errno.EACCES, errno.EPERM):
        return (f"permission denied on {path} (the API socket is mode 0600: run as the user that "
                "started netkit-switch)")
    if isinstance(error, (socket.timeout, TimeoutError)):
        return f"the API server at {path} did not answer in time"
    if error.errno == errno.ENOTSOCK or error.errno == errno.ECONNREFUSED:
        return f"{path} is not a netkit API socket"
    return f"cannot reach the API at {path}: {error.strerror or error}"
