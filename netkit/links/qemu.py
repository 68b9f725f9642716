"""QEMU's stream netdev: frames with a 4-byte big-endian length prefix, no handshake.

Point QEMU at a ``QemuListener`` path with::

    -netdev stream,id=n0,server=off,addr.type=unix,addr.path=PATH
    -netdev socket,id=n0,connect=...      (older QEMU; same framing over TCP)
"""

from __future__ import annotations

import os
import socket
from typing import Any

import trio

from .base import DEFAULT_SEND_QUEUE_BYTES, Link
from .stream import BE32_LENGTH, DEFAULT_MAX_FRAME, StreamFramedLink, StreamListener

__all__ = ["QemuListener", "qemu_connect", "StreamFramedLink", "QEMU_LENGTH_PREFIX"]

QEMU_LENGTH_PREFIX = BE32_LENGTH


class QemuListener(StreamListener):
    """Serves QEMU ``-netdev stream`` clients on a unix socket path.

    Each accepted connection becomes a ``StreamFramedLink`` (named "qemu:PATH#N") handed
    to ``on_link`` in ``serve``; see ``StreamListener`` for ownership. A stale socket
    file is replaced; the path is unlinked when ``serve`` ends. A length prefix above
    ``max_frame`` is counted in the link's ``stats.receive_errors`` and ends that
    connection.
    """

    kind = "qemu"

    def __init__(
        self,
        socket_or_path: Any,
        *,
        max_frame: int = DEFAULT_MAX_FRAME,
        send_queue_bytes: int = DEFAULT_SEND_QUEUE_BYTES,
        backlog: int = 128,
    ) -> None:
        super().__init__(socket_or_path, backlog=backlog)
        self._max_frame = max_frame
        self._send_queue_bytes = send_queue_bytes

    async def _make_link(self, conn: Any, name: str) -> Link | None:
        return StreamFramedLink.from_socket(
            conn,
            length_prefix=QEMU_LENGTH_PREFIX,
            max_frame=self._max_frame,
            name=name,
            send_queue_bytes=self._send_queue_bytes,
        )


async def qemu_connect(
    path: str | os.PathLike[str],
    *,
    max_frame: int = DEFAULT_MAX_FRAME,
    send_queue_bytes: int = DEFAULT_SEND_QUEUE_BYTES,
) -> StreamFramedLink:
    """Connect to a unix socket as QEMU's stream netdev would (for tests and fake guests)."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.connect(os.fspath(path))
    except BaseException:
        sock.close()
        raise
    return StreamFramedLink.from_socket(
        sock,
        length_prefix=QEMU_LENGTH_PREFIX,
        max_frame=max_frame,
        name=f"qemu-client:{os.fspath(path)}",
        send_queue_bytes=send_queue_bytes,
    )
