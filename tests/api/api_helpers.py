"""Helpers shared by the control API tests."""

from __future__ import annotations

from dataclasses import dataclass

import trio

from netkit.api.client import ApiClient
from netkit.api.server import ApiServer


def parse_http_response(raw: bytes) -> tuple[int, str, dict[str, str]]:
    """(status, body, lower-cased headers) of the last response in ``raw`` (one response)."""
    head, _, body = raw.partition(b"\r\n\r\n")
    while head.startswith(b"HTTP/1.1 1"):  # skip informational heads (100 Continue)
        head, _, body = body.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, body.decode(), headers


@dataclass
class ApiHarness:
    """The API of ``netkit_switch`` on ``path``, and ways to talk to it."""

    path: str
    server: ApiServer
    switch: object
    token: str | None = None

    def client(self, **kwargs) -> ApiClient:
        kwargs.setdefault("token", self.token)
        return ApiClient(self.path, **kwargs)

    async def call(self, method: str, *args, **kwargs):
        """``ApiClient.<method>(*args)`` in a worker thread (the client is synchronous)."""
        def run():
            with self.client() as api:
                return getattr(api, method)(*args, **kwargs)
        return await trio.to_thread.run_sync(run)

    async def curl(self, *args: str, path: str = "/", method: str | None = None, data: str | None = None,
                   headers: tuple[str, ...] = ()) -> tuple[int, str, dict[str, str]]:
        """curl --unix-socket: (status, body, headers)."""
        argv = ["curl", "-sS", "--max-time", "5", "--unix-socket", self.path, "-D", "-", *args]
        if method:
            argv += ["-X", method]
        if data is not None:
            argv += ["--data-binary", data, "-H", "Content-Type: application/json"]
        for header in headers:
            argv += ["-H", header]
        argv.append(f"http://localhost{path}")
        proc = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
        assert proc.returncode == 0, proc.stderr.decode()
        return parse_http_response(proc.stdout)

    async def raw(self, data: bytes, *, timeout: float = 5.0) -> bytes:
        """Send ``data`` on a fresh connection and read until the server closes it."""
        stream = await trio.open_unix_socket(self.path)
        out = bytearray()
        with trio.fail_after(timeout):
            async with stream:
                if data:
                    await stream.send_all(data)
                while True:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        break
                    out += chunk
        return bytes(out)
