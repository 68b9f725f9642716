"""The vpnkit protocol over AF_VSOCK (how a Hyper-V or Firecracker-style VM reaches us).

The framing and handshake are exactly those of ``VpnkitListener``; only the listening
socket differs, so this module just makes that socket.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable
from typing import Any

import trio

from .base import DEFAULT_SEND_QUEUE_BYTES
from .stream import OnLink
from .vpnkit import DEFAULT_HANDSHAKE_TIMEOUT, Allocate, VpnkitListener

__all__ = ["VsockListener", "VsockUnavailable", "open_vsock_listener", "VMADDR_CID_ANY"]

VMADDR_CID_ANY: int = getattr(socket, "VMADDR_CID_ANY", 0xFFFFFFFF)


class VsockUnavailable(OSError):
    """AF_VSOCK sockets cannot be created here (no kernel support, or not Linux)."""


def open_vsock_listener(port: int, cid: int = VMADDR_CID_ANY, *, backlog: int = 128) -> socket.socket:
    """Create, bind and listen on an AF_VSOCK stream socket.

    Raises ``VsockUnavailable`` with an explanation when the host lacks vsock support.
    """
    family = getattr(socket, "AF_VSOCK", None)
    if family is None:
        raise VsockUnavailable(errno.EAFNOSUPPORT, "this Python/OS has no AF_VSOCK support")
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as e:
        raise VsockUnavailable(e.errno, f"cannot create an AF_VSOCK socket ({e.strerror}); "
                               "is the vsock kernel module (vsock/vhost_vsock/hv_sock) loaded?") from e
    try:
        sock.bind((cid, port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


class VsockListener:
    """Serves the vpnkit protocol on vsock ``port`` (any CID by default).

    The listening socket is made here, so a host without vsock fails at construction
    with ``VsockUnavailable``. ``socket_factory(port, cid)`` makes it; the default makes
    an AF_VSOCK one, and tests inject a unix one. ``serve`` then owns the socket and
    closes it when it ends; call ``close`` instead if ``serve`` is never run. Everything
    else is ``VpnkitListener``.
    """

    def __init__(
        self,
        port: int,
        cid: int = VMADDR_CID_ANY,
        *,
        mtu: int,
        allocate: Allocate,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        send_queue_bytes: int = DEFAULT_SEND_QUEUE_BYTES,
        socket_factory: Callable[[int, int], Any] = open_vsock_listener,
    ) -> None:
        self.port = port
        self.cid = cid
        self._sock = socket_factory(port, cid)
        #: The VpnkitListener doing the work.
        self.listener = VpnkitListener.from_socket(
            self._sock,
            mtu=mtu,
            allocate=allocate,
            handshake_timeout=handshake_timeout,
            send_queue_bytes=send_queue_bytes,
        )

    async def serve(self, on_link: OnLink, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the vpnkit protocol on the vsock socket; see ``VpnkitListener.serve``."""
        self._sock = None  # owned by the VpnkitListener from here on
        await self.listener.serve(on_link, task_status=task_status)

    def close(self) -> None:
        """Close the socket of a listener that was never served."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
