"""A small 9P2000.L client over any trio stream: for tests and for poking at a server.

``await client.call("Twalk", fid=0, newfid=1, wnames=["a"])`` sends one request and
returns the decoded reply fields (raising :class:`RemoteError` for ``Rlerror``).
``send``/``receive`` give raw access for pipelining, Tflush and malformed input.
"""

from __future__ import annotations

import errno
import os
from typing import Any

import trio

from .protocol import HEADER, NAMES, NOFID, NOTAG, decode, decode_dirents, encode

__all__ = ["Client9P", "RemoteError"]


class RemoteError(OSError):
    """The server answered ``Rlerror(errno)``."""

    def __init__(self, code: int, request: str = "") -> None:
        super().__init__(code, f"{request}: {os.strerror(code)} ({errno.errorcode.get(code, code)})")


class Client9P:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._buf = bytearray()
        self._tag = 0
        self.msize = 8192

    def next_tag(self) -> int:
        self._tag = (self._tag + 1) % NOTAG
        return self._tag

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def receive(self) -> tuple[str, int, dict[str, Any] | bytes] | None:
        """The next reply as ``(name, tag, fields)``; ``None`` at EOF. Unknown types come
        back with their raw body."""
        while True:
            if len(self._buf) >= 4:
                size = int.from_bytes(self._buf[:4], "little")
                if size < HEADER.size:
                    raise ValueError(f"bad reply size {size}")
                if len(self._buf) >= size:
                    _, mtype, tag = HEADER.unpack_from(self._buf)
                    body = bytes(self._buf[HEADER.size:size])
                    del self._buf[:size]
                    name = NAMES.get(mtype)
                    return (name, tag, decode(mtype, body)) if name else (str(mtype), tag, body)
            data = await self.stream.receive_some(1 << 20)
            if not data:
                return None
            self._buf += data

    async def call(self, name: str, /, **fields: Any) -> dict[str, Any]:
        tag = NOTAG if name == "Tversion" else self.next_tag()
        await self.send(encode(name, tag, **fields))
        reply = await self.receive()
        if reply is None:
            raise EOFError(f"connection closed waiting for the reply to {name}")
        rname, rtag, rfields = reply
        if rtag != tag:
            raise AssertionError(f"reply tag {rtag} for request tag {tag}")
        if rname == "Rlerror":
            raise RemoteError(rfields["ecode"], name)  # type: ignore[index]
        if rname != "R" + name[1:]:
            raise AssertionError(f"{rname} in reply to {name}")
        return rfields  # type: ignore[return-value]

    # ------------------------------------------------------------------ conveniences

    async def version(self, msize: int = 65536, version: str = "9P2000.L") -> dict[str, Any]:
        reply = await self.call("Tversion", msize=msize, version=version)
        self.msize = reply["msize"]
        return reply

    async def attach(self, fid: int, aname: str, uname: str = "root", n_uname: int = 0) -> dict[str, Any]:
        return await self.call("Tattach", fid=fid, afid=NOFID, uname=uname, aname=aname, n_uname=n_uname)

    async def walk(self, fid: int, newfid: int, *names: str) -> list:
        return (await self.call("Twalk", fid=fid, newfid=newfid, wnames=list(names)))["qids"]

    async def readdir_all(self, fid: int, count: int = 4096) -> list:
        out, offset = [], 0
        while True:
            data = (await self.call("Treaddir", fid=fid, offset=offset, count=count))["data"]
            entries = decode_dirents(data)
            if not entries:
                return out
            out.extend(entries)
            offset = entries[-1][1]

    async def read_all(self, fid: int, count: int = 65536) -> bytes:
        out, offset = bytearray(), 0
        while True:
            data = (await self.call("Tread", fid=fid, offset=offset, count=count))["data"]
            if not data:
                return bytes(out)
            out += data
            offset += len(data)

    async def aclose(self) -> None:
        await self.stream.aclose()
