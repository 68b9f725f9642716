"""vfkit / macOS Virtualization.framework: one Ethernet frame per unix datagram.

vfkit (``--device virtio-net,unixSocketPath=PATH``) connects a datagram socket to the
path we bind and sends frames; it may first send the 4-byte magic ``b"VFKT"`` so we
learn its address before any frame. We reply to the address the first datagram came
from. A later ``VFKT`` from a different address means vfkit restarted: the link
switches to the new peer. So does a frame from a new address once the current peer is
gone (its socket is no longer bound: a VM restarted with a new socket path and no
``VFKT``); while the current peer is alive, other senders are ignored. On the switch
the new peer is the same port, so a new MAC it uses replaces the old one's binding.
"""

from __future__ import annotations

import errno
import os
import socket

import trio

from .base import DEFAULT_SEND_QUEUE_BYTES, Frame, Link, LinkClosed, TxOffload
from ._util import MAX_BATCH_FRAMES, logger, prepare_unix_path, unlink_if_same

__all__ = ["VfkitLink", "VFKIT_MAGIC"]

VFKIT_MAGIC = b"VFKT"

#: Receive buffer: a 64 KiB frame plus headroom; anything longer is truncated by the
#: kernel, detected with MSG_TRUNC and counted.
_RECV_BUFFER = 65535 + 1024
#: Socket buffer sizes asked for (best effort; the kernel caps them). A deeper receive
#: buffer absorbs bursts from the VM; unix datagram sockets count these per datagram.
_SO_RCVBUF = 4 * 1024 * 1024
_SO_SNDBUF = 1 * 1024 * 1024
#: While the peer's receive queue is full, retry after this long (doubling up to the
#: max). Linux gives no wakeup for "an unconnected datagram peer has room again" (poll
#: only reports our own buffer), so the sender has to poll.
_SEND_RETRY_MIN = 0.0005
_SEND_RETRY_MAX = 0.02


class VfkitLink(Link):
    """A link over a bound unix datagram socket, speaking to one vfkit peer.

    Create with ``VfkitLink.bind(path)``. Frames sent before the peer is known are
    dropped (``stats.send_dropped``). Datagrams from an address other than the peer's
    are counted in ``stats.receive_errors`` and dropped while the peer is alive; ``VFKT``
    from a new address, or any datagram once the peer is gone, re-targets the link.
    The path is unlinked on close.
    """

    def __init__(self, sock: socket.socket, path: str, *, send_queue_bytes: int = DEFAULT_SEND_QUEUE_BYTES) -> None:
        super().__init__(send_queue_bytes=send_queue_bytes)
        self.name = f"vfkit:{path}"
        self.path = path
        self._sock = sock
        self._inode = os.lstat(path).st_ino
        #: The peer's address (its bound path), learned from the first datagram.
        self.peer: str | None = None
        self._send_retry_delay = _SEND_RETRY_MIN

    @classmethod
    def bind(cls, path: str | os.PathLike[str], *, send_queue_bytes: int = DEFAULT_SEND_QUEUE_BYTES) -> "VfkitLink":
        """Bind a datagram socket at ``path`` (replacing a stale socket file)."""
        path = os.fspath(path)
        prepare_unix_path(path, socket.SOCK_DGRAM)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            for opt, size in ((socket.SO_RCVBUF, _SO_RCVBUF), (socket.SO_SNDBUF, _SO_SNDBUF)):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, opt, size)
                except OSError:
                    pass
            sock.bind(path)
            return cls(sock, path, send_queue_bytes=send_queue_bytes)
        except BaseException:
            sock.close()
            raise

    # ----- receiving -----
    async def _receive_batch(self) -> list[Frame]:
        await trio.lowlevel.checkpoint()
        while True:
            frames = self._read_available()
            if frames:
                return frames
            if self._closed:
                raise LinkClosed(self.name)
            try:
                await trio.lowlevel.wait_readable(self._sock)
            except (trio.ClosedResourceError, OSError):
                raise LinkClosed(self.name) from None

    def _read_available(self) -> list[Frame]:
        frames: list[Frame] = []
        if self._sock.fileno() < 0:
            return frames
        while len(frames) < MAX_BATCH_FRAMES:
            try:
                data, _, flags, addr = self._sock.recvmsg(_RECV_BUFFER)
            except BlockingIOError:
                break
            except OSError as e:
                # Datagram sockets have no connection to lose; an error here is about one
                # datagram (or transient), not the end of the link.
                logger.warning("%s: recvmsg failed: %s", self.name, e)
                self.stats.receive_errors += 1
                break
            if flags & socket.MSG_TRUNC:
                self.stats.receive_errors += 1
                continue
            if data == VFKIT_MAGIC:
                if addr and addr != self.peer:
                    if self.peer is not None:
                        logger.info("%s: vfkit peer changed from %s to %s", self.name, self.peer, addr)
                    self.peer = addr
                continue
            if not addr:
                # An unbound sender: we could never answer it.
                self.stats.receive_errors += 1
                continue
            if self.peer is None:
                self.peer = addr
            elif addr != self.peer:
                if self._peer_alive(self.peer):
                    self.stats.receive_errors += 1
                    continue
                logger.info("%s: vfkit peer %s is gone; %s takes the link", self.name, self.peer, addr)
                self.peer = addr
            if not data:
                self.stats.receive_errors += 1
                continue
            frames.append(data)
        return frames

    @staticmethod
    def _peer_alive(peer: str) -> bool:
        """True while a socket is bound at ``peer`` (connecting a datagram socket sends
        nothing; it fails with ECONNREFUSED or ENOENT once the peer is gone). Only asked
        when a datagram comes from another address, which is rare."""
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            probe.connect(peer)
        except OSError as e:
            return e.errno not in (errno.ECONNREFUSED, errno.ENOENT)
        finally:
            probe.close()
        return True

    # ----- sending -----
    def _try_send(self, frame: Frame, offload: TxOffload | None) -> bool:
        if self.peer is None:
            raise OSError(errno.ENOTCONN, f"{self.name}: no vfkit peer has sent anything yet")
        try:
            self._sock.sendto(frame, self.peer)
        except BlockingIOError:
            return False
        self._send_retry_delay = _SEND_RETRY_MIN
        return True

    async def _wait_send_ready(self) -> None:
        await trio.lowlevel.wait_writable(self._sock)
        # Writable only means *our* buffer has room; the usual reason to wait is a full
        # peer queue, which poll() cannot report. Back off a little each time.
        await trio.sleep(self._send_retry_delay)
        self._send_retry_delay = min(self._send_retry_delay * 2, _SEND_RETRY_MAX)

    # ----- lifecycle -----
    async def _close(self) -> None:
        trio.lowlevel.notify_closing(self._sock)
        self._sock.close()
        unlink_if_same(self.path, self._inode)
        await trio.lowlevel.checkpoint()
